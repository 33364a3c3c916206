//! What the tests' interrupt handler saw: which vectors arrived, in what order, when, and
//! which event-channel ports an upcall delivered (docs/abi.md 8.8, 14).
//!
//! [`install`] makes [`on_interrupt`] the handler of vectors 32-255. The upcall vector
//! ([`UPCALL_VECTOR`]) is handled the way docs/abi.md 8.8 asks of a guest: clear
//! `evtchn_upcall_pending` first, then take the selector word by word and, for each pending and
//! unmasked port, clear its pending bit and record it. Any other vector is taken to come from
//! the emulated local APIC: the handler notes whether it was in service, and signals EOI when
//! [`use_apic`] asked for it.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use lamina_abi::event_channel::NR_PORT_WORDS;

use crate::shared;
use crate::x86::{apic, idt, rdtsc};

/// The vector the tests register for event upcalls.
pub(crate) const UPCALL_VECTOR: u8 = 0xf0;

const VECTORS: usize = 256;
const ORDER_SLOTS: usize = 32;

static COUNTS: [AtomicU32; VECTORS] = [const { AtomicU32::new(0) }; VECTORS];
/// System time (pvclock) when each vector last arrived.
static LAST_NS: [AtomicU64; VECTORS] = [const { AtomicU64::new(0) }; VECTORS];
/// TSC when each vector last arrived.
static LAST_TSC: [AtomicU64; VECTORS] = [const { AtomicU64::new(0) }; VECTORS];
/// Whether the APIC had each vector in service while its handler ran.
static IN_SERVICE_SEEN: [AtomicBool; VECTORS] = [const { AtomicBool::new(false) }; VECTORS];
/// The vectors in order of arrival (the first `ORDER_SLOTS`).
static ORDER: [AtomicU8; ORDER_SLOTS] = [const { AtomicU8::new(0) }; ORDER_SLOTS];
static ORDER_LEN: AtomicUsize = AtomicUsize::new(0);
/// Ports the upcall handler found pending and unmasked (and cleared).
static DELIVERED: [AtomicU64; NR_PORT_WORDS] = [const { AtomicU64::new(0) }; NR_PORT_WORDS];
/// Ports bound to another vCPU ([`bound_to_another_vcpu`]): the upcall leaves them alone.
static OTHER_VCPUS_PORTS: [AtomicU64; NR_PORT_WORDS] = [const { AtomicU64::new(0) }; NR_PORT_WORDS];
static AUTO_EOI: AtomicBool = AtomicBool::new(false);
static APIC_IN_USE: AtomicBool = AtomicBool::new(false);

/// Makes [`on_interrupt`] the handler of every interrupt vector.
pub(crate) fn install() {
    idt::set_interrupt_handler(on_interrupt);
}

/// Treats non-upcall vectors as the local APIC's: note their in-service bit and, if
/// `auto_eoi`, signal EOI before returning.
pub(crate) fn use_apic(auto_eoi: bool) {
    APIC_IN_USE.store(true, Ordering::SeqCst);
    AUTO_EOI.store(auto_eoi, Ordering::SeqCst);
}

/// The handler of vectors 32-255.
fn on_interrupt(vector: u8) {
    let index = usize::from(vector);
    LAST_NS[index].store(shared::now(), Ordering::SeqCst);
    LAST_TSC[index].store(rdtsc(), Ordering::SeqCst);
    let slot = ORDER_LEN.fetch_add(1, Ordering::SeqCst);
    if let Some(entry) = ORDER.get(slot) {
        entry.store(vector, Ordering::SeqCst);
    }
    if vector == UPCALL_VECTOR {
        deliver_events();
    } else if APIC_IN_USE.load(Ordering::SeqCst) {
        IN_SERVICE_SEEN[index].store(apic::in_service(vector), Ordering::SeqCst);
        if AUTO_EOI.load(Ordering::SeqCst) {
            apic::eoi();
        }
    }
    COUNTS[index].fetch_add(1, Ordering::SeqCst);
}

/// The guest's side of an upcall (docs/abi.md 8.8).
fn deliver_events() {
    shared::upcall_pending().store(0, Ordering::SeqCst);
    let mut selector = shared::pending_sel().swap(0, Ordering::SeqCst);
    while selector != 0 {
        let word = selector.trailing_zeros() as usize;
        selector &= selector - 1;
        // The pending bits are shared by every vCPU; the selector is this vCPU's. A port
        // bound to a sibling may be pending in the same word: it is the sibling's to take
        // (docs/abi.md 8.8), as a kernel's handler filters by the ports bound to its CPU.
        let ready = shared::pending_word(word)
            & !shared::mask_word(word)
            & !OTHER_VCPUS_PORTS[word].load(Ordering::SeqCst);
        let mut ports = ready;
        while ports != 0 {
            let port = (word * 64) as u64 + u64::from(ports.trailing_zeros());
            ports &= ports - 1;
            shared::clear_pending(port);
        }
        DELIVERED[word].fetch_or(ready, Ordering::SeqCst);
    }
}

/// Marks `port` as bound to a vCPU other than the one taking upcalls: the upcall handler
/// neither clears nor records it.
pub(crate) fn bound_to_another_vcpu(port: u64) {
    OTHER_VCPUS_PORTS[(port / 64) as usize].fetch_or(1 << (port % 64), Ordering::SeqCst);
}

/// How many times `vector` arrived.
pub(crate) fn count(vector: u8) -> u32 {
    COUNTS[usize::from(vector)].load(Ordering::SeqCst)
}

/// How many interrupts arrived, all vectors together.
pub(crate) fn total() -> u32 {
    COUNTS
        .iter()
        .map(|count| count.load(Ordering::SeqCst))
        .sum()
}

/// System time when `vector` last arrived.
pub(crate) fn last_ns(vector: u8) -> u64 {
    LAST_NS[usize::from(vector)].load(Ordering::SeqCst)
}

/// TSC when `vector` last arrived.
pub(crate) fn last_tsc(vector: u8) -> u64 {
    LAST_TSC[usize::from(vector)].load(Ordering::SeqCst)
}

/// Whether the APIC had `vector` in service while its handler last ran.
pub(crate) fn was_in_service(vector: u8) -> bool {
    IN_SERVICE_SEEN[usize::from(vector)].load(Ordering::SeqCst)
}

/// The vectors that arrived, in order (the first 32).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrivals {
    vectors: [u8; ORDER_SLOTS],
    len: usize,
}

impl Arrivals {
    /// A list to compare with (at most 32 vectors).
    pub(crate) fn of(expected: &[u8]) -> Arrivals {
        let mut vectors = [0; ORDER_SLOTS];
        let len = expected.len().min(ORDER_SLOTS);
        vectors[..len].copy_from_slice(&expected[..len]);
        Arrivals { vectors, len }
    }
}

impl core::fmt::Debug for Arrivals {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list()
            .entries(
                self.vectors[..self.len]
                    .iter()
                    .map(|v| crate::framework::Hex(*v)),
            )
            .finish()
    }
}

/// The vectors that arrived so far, in order.
pub(crate) fn arrivals() -> Arrivals {
    let len = ORDER_LEN.load(Ordering::SeqCst).min(ORDER_SLOTS);
    let mut vectors = [0; ORDER_SLOTS];
    for (slot, entry) in vectors.iter_mut().zip(&ORDER).take(len) {
        *slot = entry.load(Ordering::SeqCst);
    }
    Arrivals { vectors, len }
}

/// Whether an upcall delivered `port`.
pub(crate) fn delivered(port: u64) -> bool {
    DELIVERED[(port / 64) as usize].load(Ordering::SeqCst) & 1 << (port % 64) != 0
}

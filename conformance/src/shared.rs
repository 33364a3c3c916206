//! The pages the hypervisor shares with the domain (docs/abi.md 8, 10, 13): the event bitmaps
//! and `VcpuInfo` of the shared-info page, the pvclock, the wall clock and the console ring.
//!
//! The hypervisor writes these pages while the vCPU is out of the guest; the guest reads and
//! writes them with atomic or volatile accesses, so that every access in the program text is
//! one access to memory (a bit the guest clears is not cached in a register across a
//! hypercall, an interrupt handler sees what the test wrote). Ports are `u64` everywhere, as
//! the hypercalls take them.

use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicU32, AtomicU64, Ordering, compiler_fence};

use lamina_abi::console::ConsoleRing;
use lamina_abi::shared_info::{SharedInfo, VcpuInfo, VcpuTimeInfo, pvclock_ns};
use lamina_guest_sdk::start_info;

use crate::x86;

/// The shared-info page, where StartInfo says it is.
pub(crate) fn shared_info() -> *mut SharedInfo {
    start_info().shared_info_gpa as *mut SharedInfo
}

/// An atomic view of a `u64` of a shared page.
fn atomic_u64(word: *mut u64) -> &'static AtomicU64 {
    // SAFETY: the word lies in a shared page of identity-mapped RAM that stays in place for the
    // life of the domain; it is aligned, and it is only ever accessed atomically by the guest.
    unsafe { AtomicU64::from_ptr(word) }
}

/// The pending word holding `port`'s bit, and the bit.
fn pending_bit(port: u64) -> (&'static AtomicU64, u64) {
    let word = (port / 64) as usize;
    // SAFETY: only the address of the field is taken; `port` < 1024 keeps it in the array.
    let field = unsafe { &raw mut (*shared_info()).evtchn_pending[word] };
    (atomic_u64(field), 1 << (port % 64))
}

/// The mask word holding `port`'s bit, and the bit.
fn mask_bit(port: u64) -> (&'static AtomicU64, u64) {
    let word = (port / 64) as usize;
    // SAFETY: as in `pending_bit`.
    let field = unsafe { &raw mut (*shared_info()).evtchn_mask[word] };
    (atomic_u64(field), 1 << (port % 64))
}

/// Pending word `word` (0-15).
pub(crate) fn pending_word(word: usize) -> u64 {
    pending_bit(word as u64 * 64).0.load(Ordering::SeqCst)
}

/// Mask word `word` (0-15).
pub(crate) fn mask_word(word: usize) -> u64 {
    mask_bit(word as u64 * 64).0.load(Ordering::SeqCst)
}

/// Whether `port`'s pending bit is set.
pub(crate) fn is_pending(port: u64) -> bool {
    let (word, bit) = pending_bit(port);
    word.load(Ordering::SeqCst) & bit != 0
}

/// Clears `port`'s pending bit, as a guest does before handling the event.
pub(crate) fn clear_pending(port: u64) {
    let (word, bit) = pending_bit(port);
    word.fetch_and(!bit, Ordering::SeqCst);
}

/// Whether `port`'s mask bit is set.
pub(crate) fn is_masked(port: u64) -> bool {
    let (word, bit) = mask_bit(port);
    word.load(Ordering::SeqCst) & bit != 0
}

/// Sets or clears `port`'s mask bit (the guest masks directly; unmasking a pending port
/// needs the Unmask hypercall to be delivered).
pub(crate) fn set_masked(port: u64, masked: bool) {
    let (word, bit) = mask_bit(port);
    if masked {
        word.fetch_or(bit, Ordering::SeqCst);
    } else {
        word.fetch_and(!bit, Ordering::SeqCst);
    }
}

/// Where vCPU 0's `VcpuInfo` is when it has been moved (RegisterVcpuInfo); null: in the
/// shared-info page.
static MOVED_VCPU_INFO: AtomicPtr<VcpuInfo> = AtomicPtr::new(core::ptr::null_mut());

/// vCPU 0's `VcpuInfo`, wherever it is now.
pub(crate) fn vcpu_info() -> *mut VcpuInfo {
    let moved = MOVED_VCPU_INFO.load(Ordering::SeqCst);
    if moved.is_null() {
        boot_vcpu_info()
    } else {
        moved
    }
}

/// vCPU 0's `VcpuInfo` in the shared-info page.
pub(crate) fn boot_vcpu_info() -> *mut VcpuInfo {
    // SAFETY: only the address of the field is taken.
    unsafe { &raw mut (*shared_info()).vcpu_info[0] }
}

/// Records that vCPU 0's `VcpuInfo` now lives at `to` (after RegisterVcpuInfo succeeded).
pub(crate) fn vcpu_info_moved_to(to: *mut VcpuInfo) {
    MOVED_VCPU_INFO.store(to, Ordering::SeqCst);
}

/// `evtchn_upcall_pending` of the `VcpuInfo` at `info`.
pub(crate) fn upcall_pending_of(info: *mut VcpuInfo) -> &'static AtomicU8 {
    // SAFETY: `info` is a `VcpuInfo` the hypervisor keeps in RAM for good (the shared-info page
    // or a registered area); the byte is only accessed atomically by the guest.
    unsafe { AtomicU8::from_ptr(&raw mut (*info).evtchn_upcall_pending) }
}

/// `evtchn_upcall_mask` of the `VcpuInfo` at `info`.
pub(crate) fn upcall_mask_of(info: *mut VcpuInfo) -> &'static AtomicU8 {
    // SAFETY: as in `upcall_pending_of`.
    unsafe { AtomicU8::from_ptr(&raw mut (*info).evtchn_upcall_mask) }
}

/// `evtchn_pending_sel` of the `VcpuInfo` at `info`.
pub(crate) fn pending_sel_of(info: *mut VcpuInfo) -> &'static AtomicU64 {
    // SAFETY: as in `upcall_pending_of`.
    atomic_u64(unsafe { &raw mut (*info).evtchn_pending_sel })
}

/// vCPU 0's `evtchn_upcall_pending`.
pub(crate) fn upcall_pending() -> &'static AtomicU8 {
    upcall_pending_of(vcpu_info())
}

/// vCPU 0's `evtchn_upcall_mask`.
pub(crate) fn upcall_mask() -> &'static AtomicU8 {
    upcall_mask_of(vcpu_info())
}

/// vCPU 0's `evtchn_pending_sel`.
pub(crate) fn pending_sel() -> &'static AtomicU64 {
    pending_sel_of(vcpu_info())
}

/// Clears vCPU 0's upcall state and every pending bit: a clean slate for a test.
pub(crate) fn clear_all_events() {
    upcall_pending().store(0, Ordering::SeqCst);
    pending_sel().store(0, Ordering::SeqCst);
    for word in 0..lamina_abi::event_channel::NR_PORT_WORDS {
        pending_bit(word as u64 * 64).0.store(0, Ordering::SeqCst);
    }
}

// ----- time (10) -----

/// A consistent copy of the pvclock parameters at `info`, and a TSC reading taken inside the
/// same version window: the seqlock protocol of docs/abi.md 10.1 (read `version`, the fields,
/// `version` again; retry while it is odd or changed).
pub(crate) fn read_time_of(info: *mut VcpuInfo) -> (VcpuTimeInfo, u64) {
    // SAFETY: only the address of the field is taken.
    let time = unsafe { &raw const (*info).time };
    loop {
        // SAFETY: `time` lies in RAM the hypervisor keeps for good; volatile reads are not
        // merged or reordered with each other, and x86 keeps loads in order.
        let before = unsafe { core::ptr::read_volatile(&raw const (*time).version) };
        compiler_fence(Ordering::SeqCst);
        // SAFETY: as above; every bit pattern is a valid `VcpuTimeInfo`.
        let copy = unsafe { core::ptr::read_volatile(time) };
        let tsc = x86::rdtsc();
        compiler_fence(Ordering::SeqCst);
        // SAFETY: as above.
        let after = unsafe { core::ptr::read_volatile(&raw const (*time).version) };
        if before == after && before.is_multiple_of(2) {
            return (copy, tsc);
        }
    }
}

/// The current `VcpuTimeInfo` of vCPU 0 (consistent copy).
pub(crate) fn time_info() -> VcpuTimeInfo {
    read_time_of(vcpu_info()).0
}

/// System time now, in ns, from vCPU 0's pvclock.
pub(crate) fn now() -> u64 {
    let (time, tsc) = read_time_of(vcpu_info());
    pvclock_ns(&time, tsc)
}

/// The wall clock at system time 0: `(wc_version, wc_sec, wc_nsec)`, read as a seqlock.
pub(crate) fn wall_clock() -> (u32, u64, u32) {
    let info = shared_info();
    loop {
        // SAFETY: the shared-info page lies in RAM for good; volatile reads stay in order.
        let (before, sec, nsec, after) = unsafe {
            let before = core::ptr::read_volatile(&raw const (*info).wc_version);
            compiler_fence(Ordering::SeqCst);
            let sec = core::ptr::read_volatile(&raw const (*info).wc_sec);
            let nsec = core::ptr::read_volatile(&raw const (*info).wc_nsec);
            compiler_fence(Ordering::SeqCst);
            (
                before,
                sec,
                nsec,
                core::ptr::read_volatile(&raw const (*info).wc_version),
            )
        };
        if before == after && before.is_multiple_of(2) {
            return (before, sec, nsec);
        }
    }
}

/// `SharedInfo::tsc_khz`.
pub(crate) fn shared_tsc_khz() -> u64 {
    // SAFETY: the shared-info page lies in RAM for good.
    unsafe { core::ptr::read_volatile(&raw const (*shared_info()).tsc_khz) }
}

// ----- the console ring (13) -----

/// The console ring, where StartInfo says it is.
pub(crate) fn console_ring() -> *mut ConsoleRing {
    start_info().console_ring_gpa as *mut ConsoleRing
}

/// An atomic view of an index of the console ring.
fn ring_index(index: *mut u32) -> &'static AtomicU32 {
    // SAFETY: the index lies in the console ring page, in RAM for good, aligned; the guest only
    // accesses it atomically.
    unsafe { AtomicU32::from_ptr(index) }
}

/// The ring's `out_cons` (the hypervisor's consumer index).
pub(crate) fn ring_out_cons() -> &'static AtomicU32 {
    // SAFETY: only the address of the field is taken.
    ring_index(unsafe { &raw mut (*console_ring()).out_cons })
}

/// The ring's `out_prod` (the guest's producer index).
pub(crate) fn ring_out_prod() -> &'static AtomicU32 {
    // SAFETY: only the address of the field is taken.
    ring_index(unsafe { &raw mut (*console_ring()).out_prod })
}

/// Copies `bytes` into the ring's output at `out_prod` (modulo the buffer size, wrapping
/// around its end) and then advances `out_prod`, as a producer does. Does not check for room.
pub(crate) fn ring_write(bytes: &[u8]) {
    let ring = console_ring();
    let prod = ring_out_prod().load(Ordering::SeqCst);
    for (offset, &byte) in bytes.iter().enumerate() {
        let index = prod.wrapping_add(offset as u32) as usize
            % lamina_abi::console::CONSOLE_RING_OUTPUT_BYTES;
        // SAFETY: `index` is inside the output buffer of the ring page, which is ours to fill
        // between `out_prod` and `out_cons` (the hypervisor reads it only up to `out_prod`).
        unsafe { core::ptr::write_volatile(&raw mut (*ring).output[index], byte) };
    }
    // The bytes before the index (a release store: x86 keeps stores in order).
    ring_out_prod().store(prod.wrapping_add(bytes.len() as u32), Ordering::Release);
}

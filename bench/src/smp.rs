//! The SMP rows (docs/abi.md 20): an IPI to this vCPU, paravirtual (send_ipi on an IPI slot,
//! the upcall, no EOI) against the x2APIC's (an ICR write and an EOI, two exits); and a TLB
//! shootdown of a sibling that is not running, paravirtual (flush_tlb: the sibling is not
//! disturbed) against IPI-based (the sibling must run to flush and acknowledge).
//!
//! The IPI-based shootdown sends its IPI as an event (send_ipi), because the emulated x2APIC
//! delivers IPIs to the sending vCPU only (docs/abi.md 14): what it shows is what any
//! shootdown by IPI pays, the target's wake-up and the two switches, not the x2APIC's exits.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lamina_abi::vcpu::VcpuStartState;
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::hypercall::HypercallError;
use lamina_guest_sdk::{interrupts, memory, sched, shared, vcpu, x2apic};

/// The IPI slot of the rows.
const SLOT: u8 = 0;
/// The x2APIC self-IPI vector (the same as the idle rows' handler).
const SELF_IPI_VECTOR: u64 = 0xe0;
/// ICR destination shorthand "self" (Intel SDM Vol. 3A 11.6.1).
const ICR_SELF: u64 = 1 << 18;

/// Upcalls of this vCPU's slot port.
pub(crate) static IPI_EVENTS: AtomicU64 = AtomicU64::new(0);
/// Set by the sibling once it flushed for the shootdown in progress.
static ACKED: AtomicBool = AtomicBool::new(false);
/// Shootdowns the sibling handled.
pub(crate) static SHOOTDOWNS: AtomicU64 = AtomicU64::new(0);
/// The sibling's slot port.
static SIBLING_PORT: AtomicU64 = AtomicU64::new(0);
/// Set by the IPI handler the self-IPI rows wait for.
static FIRED: AtomicBool = AtomicBool::new(false);

/// vCPU 1's stack.
#[repr(C, align(16))]
struct Stack([u8; 8192]);

struct SharedStack(core::cell::UnsafeCell<Stack>);
// SAFETY: only vCPU 1 uses the stack, once vCPU 0 has started it.
unsafe impl Sync for SharedStack {}
static STACK: SharedStack = SharedStack(core::cell::UnsafeCell::new(Stack([0; 8192])));

fn on_ipi(_port: Port) {
    IPI_EVENTS.fetch_add(1, Ordering::Relaxed);
    FIRED.store(true, Ordering::Release);
}

/// vCPU 1: blocks (interrupts and upcall vector off) until its slot port is raised, then
/// flushes its TLB and acknowledges: a kernel's shootdown handler.
extern "C" fn sibling(_argument: u64) -> ! {
    let port = Port::new(SIBLING_PORT.load(Ordering::SeqCst) as u32);
    let own = shared::vcpu_shared(1);
    loop {
        let _ = sched::block();
        own.upcall_pending().store(0, Ordering::SeqCst);
        own.pending_sel().store(0, Ordering::SeqCst);
        if events::clear_pending(port) {
            // SAFETY: reloading CR3 with its value only drops TLB entries.
            unsafe {
                core::arch::asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack));
            }
            SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
            ACKED.store(true, Ordering::Release);
        }
    }
}

/// Binds the slot on both vCPUs and starts vCPU 1, which blocks. `Err` names what failed.
pub(crate) fn setup() -> Result<(), (&'static str, HypercallError)> {
    let own = events::bind_ipi_slot(0, SLOT).map_err(|e| ("bind_ipi_slot(0)", e))?;
    events::set_handler(own, on_ipi);
    // The number may be one an earlier row masked and closed (close leaves the mask bit).
    events::unmask(own).map_err(|e| ("unmask", e))?;
    let other = events::bind_ipi_slot(1, SLOT).map_err(|e| ("bind_ipi_slot(1)", e))?;
    events::unmask(other).map_err(|e| ("unmask", e))?;
    SIBLING_PORT.store(u64::from(other.number()), Ordering::SeqCst);
    let top = STACK.0.get() as u64 + size_of::<Stack>() as u64;
    let start = VcpuStartState {
        rip: sibling as *const () as usize as u64,
        rsp: top - 8,
        cr3: {
            let cr3: u64;
            // SAFETY: reading CR3 has no side effect.
            unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
            cr3 & !0xfff
        },
        argument: 0,
    };
    vcpu::initialise(1, &start).map_err(|e| ("vcpu_op initialise(1)", e))?;
    // SAFETY: `sibling` runs on a stack of its own and shares only atomics with vCPU 0.
    unsafe { vcpu::up(1) }.map_err(|e| ("vcpu_op up(1)", e))?;
    // Let it reach its first block.
    for _ in 0..4 {
        let _ = sched::yield_now();
    }
    Ok(())
}

/// Until the handler fired, upcalls masked while looking (as `ops::wait_with_block`).
fn wait_fired() {
    loop {
        events::mask_upcalls();
        if FIRED.load(Ordering::Acquire) {
            events::unmask_upcalls();
            return;
        }
        let _ = sched::block();
    }
}

/// send_ipi to this vCPU: one exit, the upcall injected on the way back, no EOI.
pub(crate) fn ipi_self_pv() {
    FIRED.store(false, Ordering::Relaxed);
    let _ = events::send_ipi(0b01, SLOT);
    wait_fired();
}

/// The x2APIC's IPI to this vCPU (ICR, shorthand self): the ICR write exits, the interrupt
/// comes on the way back, and its handler's EOI exits again.
pub(crate) fn ipi_self_x2apic() {
    let before = crate::ops::SELF_IPIS.load(Ordering::Acquire);
    // SAFETY: setup checked the x2APIC; the IDT handles the vector (ops::setup).
    unsafe { x2apic::write_icr(ICR_SELF | SELF_IPI_VECTOR) };
    while crate::ops::SELF_IPIS.load(Ordering::Acquire) == before {
        interrupts::enable_and_halt();
    }
}

/// flush_tlb of one address on the blocked sibling: one exit, the sibling is not woken.
pub(crate) fn shootdown_pv_blocked() {
    let addresses = [STACK.0.get() as u64];
    let _ = memory::flush_tlb(0b10, &addresses);
}

/// The same shootdown by IPI: send_ipi to the sibling, then yield until it ran, flushed and
/// acknowledged.
pub(crate) fn shootdown_ipi_blocked() {
    ACKED.store(false, Ordering::Relaxed);
    let _ = events::send_ipi(0b10, SLOT);
    while !ACKED.load(Ordering::Acquire) {
        let _ = sched::yield_now();
    }
}

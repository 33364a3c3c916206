//! The operations, one function per loop body, and what they need set up: the IDT, the event
//! upcall, a loopback port, VIRQ_TIMER, the emulated x2APIC.
//!
//! Every body leaves the vCPU as it found it: interrupts on, upcalls unmasked, nothing
//! pending. The interrupt and event handlers count what they saw, so that the driver can check
//! that every iteration really took the path it claims to measure.

use core::hint::black_box;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lamina_abi::cpuid::LEAF_TIMING;
use lamina_abi::multicall::MULTICALL_MAX;
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::hypercall::{self, HypercallError};
use lamina_guest_sdk::interrupts::{self, TrapFrame};
use lamina_guest_sdk::multicall::{Batch, Call};
use lamina_guest_sdk::x2apic::{self, TimerMode};
use lamina_guest_sdk::{console, cpuid, port, sched, time, timer};

/// The event upcall (the SDK's usual vector, Linux's `HYPERVISOR_CALLBACK_VECTOR`).
pub(crate) const UPCALL_VECTOR: u8 = 0xf3;
/// The x2APIC self-IPI that wakes HLT.
const SELF_IPI_VECTOR: u8 = 0xe0;
/// The x2APIC timer (Linux's `LOCAL_TIMER_VECTOR`).
const APIC_TIMER_VECTOR: u8 = 0xec;
/// The x2APIC's spurious interrupts.
const SPURIOUS_VECTOR: u8 = 0xff;

/// A hypercall number the ABI does not define: the cheapest round trip, answered `-ENOSYS`.
pub(crate) const UNKNOWN_HYPERCALL: u64 = 0x7fff;

/// How far ahead both timers are set. Long enough that the vCPU is always waiting (blocked or
/// halted) when the deadline comes, on both emulators (50 us is 50 000 ticks under QEMU
/// -icount, 5 000 under Bochs at 100 MHz; setting the timer and getting to the wait takes
/// about 2 000); the wait itself is taken out of the figures.
pub(crate) const TIMER_DELAY_NS: u64 = 50_000;

/// Events the loopback port's handler saw.
pub(crate) static LOOPBACK_EVENTS: AtomicU64 = AtomicU64::new(0);
/// VIRQ_TIMER events.
pub(crate) static PV_TIMER_EVENTS: AtomicU64 = AtomicU64::new(0);
/// x2APIC self-IPIs taken.
pub(crate) static SELF_IPIS: AtomicU64 = AtomicU64::new(0);
/// x2APIC timer interrupts taken.
pub(crate) static APIC_TIMER_INTERRUPTS: AtomicU64 = AtomicU64::new(0);

/// Set by the handler the current body waits for.
static FIRED: AtomicBool = AtomicBool::new(false);

/// What [`setup`] made.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Setup {
    /// A port this domain sends to itself.
    pub(crate) loopback: Port,
    /// Whether the x2APIC timer runs in TSC-deadline mode (otherwise one-shot).
    pub(crate) tsc_deadline: bool,
    /// TSC ticks in [`TIMER_DELAY_NS`].
    pub(crate) delay_ticks: u64,
    /// x2APIC timer counts in [`TIMER_DELAY_NS`] (one-shot mode).
    pub(crate) delay_counts: u32,
}

/// Why the benchmark cannot run.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SetupError {
    Hypercall(&'static str, HypercallError),
    NoX2apic,
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SetupError::Hypercall(what, error) => write!(f, "{what} failed: {error}"),
            SetupError::NoX2apic => f.write_str("no x2APIC (CPUID.1:ECX bit 21 clear)"),
        }
    }
}

fn on_loopback(_port: Port) {
    LOOPBACK_EVENTS.fetch_add(1, Ordering::Relaxed);
    FIRED.store(true, Ordering::Release);
}

fn on_pv_timer(_port: Port) {
    PV_TIMER_EVENTS.fetch_add(1, Ordering::Relaxed);
    FIRED.store(true, Ordering::Release);
}

fn on_self_ipi(_frame: &mut TrapFrame) {
    SELF_IPIS.fetch_add(1, Ordering::Relaxed);
    FIRED.store(true, Ordering::Release);
    // SAFETY: setup checked the x2APIC; this is the handler of an APIC interrupt.
    unsafe { x2apic::eoi() };
}

fn on_apic_timer(_frame: &mut TrapFrame) {
    APIC_TIMER_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    FIRED.store(true, Ordering::Release);
    // SAFETY: as above.
    unsafe { x2apic::eoi() };
}

fn on_spurious(_frame: &mut TrapFrame) {
    // Spurious interrupts take no EOI (SDM Vol. 3A 12.9).
}

/// Loads the IDT, routes the upcall, makes the loopback port and binds VIRQ_TIMER, enables the
/// x2APIC with its timer masked-in but unarmed, then turns interrupts and upcalls on.
pub(crate) fn setup() -> Result<Setup, SetupError> {
    if !x2apic::available() {
        return Err(SetupError::NoX2apic);
    }
    interrupts::init();
    events::install_upcall(UPCALL_VECTOR)
        .map_err(|e| SetupError::Hypercall("vcpu_op set_upcall_vector", e))?;
    let loopback = events::alloc_loopback()
        .map_err(|e| SetupError::Hypercall("event_channel_op alloc_unbound", e))?;
    events::set_handler(loopback, on_loopback);
    timer::bind(on_pv_timer)
        .map_err(|e| SetupError::Hypercall("event_channel_op bind_virq(TIMER)", e))?;

    interrupts::set_handler(SELF_IPI_VECTOR, on_self_ipi);
    interrupts::set_handler(APIC_TIMER_VECTOR, on_apic_timer);
    interrupts::set_handler(SPURIOUS_VECTOR, on_spurious);
    let tsc_deadline = x2apic::tsc_deadline_available();
    let mode = if tsc_deadline {
        TimerMode::TscDeadline
    } else {
        TimerMode::OneShot
    };
    // SAFETY: CPUID says the x2APIC is there and the IDT handles all three vectors. In
    // TSC-deadline mode `start_timer` arms nothing; in one-shot mode an initial count of 0
    // leaves the timer stopped.
    unsafe {
        x2apic::enable(SPURIOUS_VECTOR);
        x2apic::start_timer(APIC_TIMER_VECTOR, mode, 0);
    }
    let delay_ticks = TIMER_DELAY_NS * time::tsc_khz() / 1_000_000;
    let delay_counts = x2apic::counts_for(TIMER_DELAY_NS, x2apic::timer_khz()) as u32;

    interrupts::enable();
    events::unmask_upcalls();
    Ok(Setup {
        loopback,
        tsc_deadline,
        delay_ticks,
        delay_counts,
    })
}

/// A hypercall the ABI does not define (`-ENOSYS`).
pub(crate) fn null_hypercall() {
    // SAFETY: an undefined number touches nothing; the hypervisor returns -ENOSYS.
    black_box(unsafe { hypercall::hypercall0(UNKNOWN_HYPERCALL) });
}

/// `version`.
pub(crate) fn version_hypercall() {
    let _ = black_box(hypercall::version());
}

/// CPUID leaf 0, which the hypervisor intercepts.
pub(crate) fn cpuid_trap() {
    black_box(cpuid::cpuid(black_box(0), 0));
}

/// `count` version calls, one exit each.
pub(crate) fn calls(count: usize) {
    for _ in 0..count {
        version_hypercall();
    }
}

/// A batch of `N` version calls for [`multicall`].
pub(crate) fn version_batch<const N: usize>() -> Batch<'static, N> {
    const { assert!(N as u64 <= MULTICALL_MAX) };
    let mut batch = Batch::new();
    for _ in 0..N {
        // A batch of N takes N calls.
        let _ = batch.push(Call::version());
    }
    batch
}

/// One multicall of the batch.
pub(crate) fn multicall<const N: usize>(batch: &mut Batch<'static, N>) {
    let _ = black_box(batch.submit());
}

/// System time from the pvclock: no exit.
pub(crate) fn pvclock_read() {
    black_box(time::now_ns());
}

/// What an unported kernel does for the time: RDTSC, and the TSC frequency from CPUID leaf
/// 0x40000010 (trapped) to scale it.
pub(crate) fn rdtsc_cpuid() {
    let khz = u64::from(cpuid::cpuid(LEAF_TIMING, 0).eax).max(1);
    let tsc = time::rdtsc();
    black_box((u128::from(tsc) * 1_000_000 / u128::from(khz)) as u64);
}

/// A send on the loopback port with upcalls on: the upcall runs on the way back.
pub(crate) fn event_send_self_upcall(setup: &Setup) {
    FIRED.store(false, Ordering::Relaxed);
    let _ = events::send(setup.loopback);
    wait_with_block();
}

/// An event made pending on the (unmasked) loopback port while upcalls are masked, then
/// `sched_op` block, which returns at once and lets the upcall in (the paravirtual idle).
pub(crate) fn block_wake_pending(setup: &Setup) {
    FIRED.store(false, Ordering::Relaxed);
    events::mask_upcalls();
    let _ = events::send(setup.loopback);
    // Block clears the upcall mask; the upcall comes on the entry that ends it.
    let _ = sched::block();
    wait_with_block();
}

/// A self-IPI made pending with interrupts off, then `sti; hlt`, which the hypervisor ends at
/// once with the interrupt (the native idle); the handler's EOI is one more exit.
pub(crate) fn hlt_wake_pending() {
    FIRED.store(false, Ordering::Relaxed);
    interrupts::disable();
    // SAFETY: setup checked the x2APIC; the IDT handles the vector.
    unsafe { lamina_guest_sdk::msr::wrmsr(x2apic::SELF_IPI, u64::from(SELF_IPI_VECTOR)) };
    wait_with_hlt();
}

/// A paravirtual one-shot timer [`TIMER_DELAY_NS`] ahead, then block until its VIRQ_TIMER
/// upcall.
pub(crate) fn timer_pv() {
    FIRED.store(false, Ordering::Relaxed);
    let _ = timer::set_deadline(time::now_ns() + TIMER_DELAY_NS);
    wait_with_block();
}

/// The x2APIC timer [`TIMER_DELAY_NS`] ahead (TSC-deadline, else one-shot), `sti; hlt` until
/// its interrupt, whose handler writes EOI.
pub(crate) fn timer_x2apic(setup: &Setup) {
    FIRED.store(false, Ordering::Relaxed);
    interrupts::disable();
    // SAFETY: setup checked the x2APIC and put the timer in this mode.
    unsafe {
        if setup.tsc_deadline {
            x2apic::set_tsc_deadline(time::rdtsc() + setup.delay_ticks);
        } else {
            lamina_guest_sdk::msr::wrmsr(x2apic::INITIAL_COUNT, u64::from(setup.delay_counts));
        }
    }
    wait_with_hlt();
}

/// Blocks for `ns` on the paravirtual timer (not a benchmark: see `settle` in main.rs).
pub(crate) fn sleep(ns: u64) {
    FIRED.store(false, Ordering::Relaxed);
    let _ = timer::set_deadline(time::now_ns() + ns);
    wait_with_block();
}

/// Until the handler fired: mask upcalls, look, block (which unmasks; the upcall comes on
/// the entry that ends the block). Checking with upcalls masked loses no wake-up.
fn wait_with_block() {
    loop {
        events::mask_upcalls();
        if FIRED.load(Ordering::Acquire) {
            events::unmask_upcalls();
            return;
        }
        let _ = sched::block();
    }
}

/// Until the handler fired, with interrupts off on entry: look, `sti; hlt`, `cli`. Returns
/// with interrupts on.
fn wait_with_hlt() {
    while !FIRED.load(Ordering::Acquire) {
        interrupts::enable_and_halt();
        interrupts::disable();
    }
    interrupts::enable();
}

/// The 80-byte line (79 characters and a newline) the console benchmarks print.
pub(crate) const LINE: &[u8; 80] =
    b"bench: an 80-byte console line, 79 characters and a newline ...................\n";

/// One byte of [`LINE`] to the emulated UART's transmit register: one exit. (A driver that
/// polls the line status register first pays a second.)
pub(crate) fn uart_byte(index: &mut usize) {
    // SAFETY: COM1 is the domain's emulated UART; writing THR transmits one byte.
    unsafe { port::outb(lamina_guest_sdk::uart::COM1, LINE[*index]) };
    *index = (*index + 1) % LINE.len();
}

/// [`LINE`] through the console hypercall: one exit.
pub(crate) fn console_line_hypercall() {
    let _ = black_box(hypercall::console_write(LINE));
}

/// [`LINE`] into the console ring, no notification: exits only when the ring is full and the
/// writer has the hypervisor drain it.
pub(crate) fn console_line_ring() {
    let _ = black_box(console::ring::write(LINE));
}

/// Has the hypervisor print what the ring holds (a send on the console port): the drain of
/// the ring's last, partial fill.
pub(crate) fn console_ring_flush() {
    let _ = console::ring::flush();
}

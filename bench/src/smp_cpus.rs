//! The `smp2` rows: what crosses between two vCPUs on two physical CPUs (`cargo xtask bench`
//! boots these with two CPUs and `vcpus=2 groups=smp2`). vCPU 1 runs on the other CPU and
//! waits in the way each row needs: blocked (a paravirtual IPI wakes it), halted (an x2APIC
//! IPI wakes it), spinning with interrupts on (a shootdown reaches it running), or polling
//! (an event round trip). vCPU 0 measures from its side; vCPU 1's own exits are read with
//! `stats_op` and printed on a line of their own (`bench: <op>: vCPU 1 ...`).

use core::sync::atomic::{AtomicU64, Ordering};

use lamina_abi::event_channel::DOMID_SELF;
use lamina_abi::vcpu::VcpuStartState;
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::interrupts::{self, TrapFrame};
use lamina_guest_sdk::pvops::icr_fixed;
use lamina_guest_sdk::{memory, percpu, println, sched, stats, vcpu, x2apic};

use crate::measure::{self, Group, OpInfo, Path};
use crate::{WARMUP, fail, info, settle};

/// IPI slots: 0 wakes vCPU 1, 1 carries the round trip's events.
const WAKE_SLOT: u8 = 0;
const PING_SLOT: u8 = 1;
/// vCPU 1's x2APIC vectors: a wake-up, and the shootdown by IPI.
const WAKE_VECTOR: u8 = 0xe1;
const FLUSH_VECTOR: u8 = 0xe2;

/// What vCPU 1 does (vCPU 0 sets it, vCPU 1 echoes it in [`MODE_SEEN`]).
const BLOCK: u64 = 1;
const HALT: u64 = 2;
const SPIN: u64 = 3;
const PONG: u64 = 4;
static MODE: AtomicU64 = AtomicU64::new(0);
static MODE_SEEN: AtomicU64 = AtomicU64::new(0);

/// Wake-ups vCPU 1 handled (event or interrupt), and shootdowns it acknowledged.
static WOKEN: AtomicU64 = AtomicU64::new(0);
static FLUSHED: AtomicU64 = AtomicU64::new(0);
/// vCPU 1's ports (its slot ports; the ping port of vCPU 0 is kept by vCPU 0).
static PONG_PORT: AtomicU64 = AtomicU64::new(0);
static PING_PORT: AtomicU64 = AtomicU64::new(0);
/// What vCPU 1 reads while it spins (its TLB holds the translation the rows flush).
static TOUCHED: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct Stack([u8; 16384]);
struct SharedStack(core::cell::UnsafeCell<Stack>);
// SAFETY: only vCPU 1 uses the stack, once vCPU 0 started it.
unsafe impl Sync for SharedStack {}
static STACK: SharedStack = SharedStack(core::cell::UnsafeCell::new(Stack([0; 16384])));

fn on_wake_event(_port: Port) {
    WOKEN.fetch_add(1, Ordering::SeqCst);
}

fn on_wake_vector(_frame: &mut TrapFrame) {
    WOKEN.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the handler of an x2APIC interrupt.
    unsafe { x2apic::eoi() };
}

fn on_flush_vector(_frame: &mut TrapFrame) {
    // A kernel's shootdown handler: drop the translation, acknowledge, EOI.
    // SAFETY: INVLPG only drops a translation.
    unsafe {
        core::arch::asm!("invlpg [{}]", in(reg) TOUCHED.as_ptr() as u64, options(nostack));
    }
    FLUSHED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the handler of an x2APIC interrupt.
    unsafe { x2apic::eoi() };
}

/// vCPU 1: its own SDK state (per-vCPU number, IDT, upcall, x2APIC), then the mode loop.
extern "C" fn sibling(_argument: u64) -> ! {
    if percpu::init_this_vcpu(1).is_err() || !interrupts::load_on_this_vcpu() {
        fail(format_args!("smp2: vCPU 1 could not set itself up"));
    }
    if events::install_upcall(crate::ops::UPCALL_VECTOR).is_err() {
        fail(format_args!("smp2: vCPU 1's set_upcall_vector failed"));
    }
    events::unmask_upcalls();
    // SAFETY: CPUID offered the x2APIC (ops::setup checked); the IDT handles the spurious
    // vector (ops::setup).
    unsafe { x2apic::enable(0xff) };
    interrupts::enable();
    let pong = Port::new(PONG_PORT.load(Ordering::SeqCst) as u32);
    loop {
        let mode = MODE.load(Ordering::SeqCst);
        MODE_SEEN.store(mode, Ordering::SeqCst);
        match mode {
            BLOCK => {
                events::mask_upcalls();
                let _ = sched::block();
            }
            HALT => interrupts::enable_and_halt(),
            PONG => {
                if sched::poll(&[pong], None).is_ok() && events::clear_pending(pong) {
                    let _ = events::send_ipi(0b01, PING_SLOT);
                }
            }
            _ => {
                TOUCHED.load(Ordering::Relaxed);
                core::hint::spin_loop();
            }
        }
    }
}

/// Binds the slots, starts vCPU 1 (on the other CPU: vCPU 0 keeps this one).
fn setup() -> Result<Port, &'static str> {
    percpu::init_this_vcpu(0).map_err(|_| "percpu")?;
    let wake = events::bind_ipi_slot(1, WAKE_SLOT).map_err(|_| "bind_ipi_slot(1, wake)")?;
    events::set_handler(wake, on_wake_event);
    events::unmask(wake).map_err(|_| "unmask")?;
    let pong = events::bind_ipi_slot(1, PING_SLOT).map_err(|_| "bind_ipi_slot(1, ping)")?;
    let ping = events::bind_ipi_slot(0, PING_SLOT).map_err(|_| "bind_ipi_slot(0, ping)")?;
    // Polled only: masked, so that no upcall consumes them.
    events::mask(pong);
    events::mask(ping);
    PONG_PORT.store(u64::from(pong.number()), Ordering::SeqCst);
    PING_PORT.store(u64::from(ping.number()), Ordering::SeqCst);
    interrupts::set_handler(WAKE_VECTOR, on_wake_vector);
    interrupts::set_handler(FLUSH_VECTOR, on_flush_vector);
    MODE.store(SPIN, Ordering::SeqCst);
    let cr3: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    let start = VcpuStartState {
        rip: sibling as *const () as usize as u64,
        rsp: STACK.0.get() as u64 + size_of::<Stack>() as u64 - 8,
        cr3: cr3 & !0xfff,
        argument: 1,
    };
    vcpu::initialise(1, &start).map_err(|_| "vcpu_op initialise(1)")?;
    // SAFETY: `sibling` runs on its own stack and shares only atomics with vCPU 0.
    unsafe { vcpu::up(1) }.map_err(|_| "vcpu_op up(1)")?;
    switch_mode(SPIN)?;
    Ok(ping)
}

/// Moves vCPU 1 to `mode` (waking it from the current one) and waits until it is there.
fn switch_mode(mode: u64) -> Result<(), &'static str> {
    MODE.store(mode, Ordering::SeqCst);
    for _ in 0..10_000_000u64 {
        if MODE_SEEN.load(Ordering::SeqCst) == mode {
            return Ok(());
        }
        // Whatever it waits in, one of these ends the wait.
        let _ = events::send_ipi(0b10, WAKE_SLOT);
        // SAFETY: the x2APIC is there; vCPU 1 handles the vector.
        unsafe { x2apic::write_icr(icr_fixed(1, WAKE_VECTOR)) };
        for _ in 0..1000 {
            core::hint::spin_loop();
        }
    }
    Err("vCPU 1 never took its new mode")
}

/// Measures `op` `n` times (after [`WARMUP`]) and reports it with vCPU 1's exits; `counter`
/// must have moved once per run.
fn measure_row(info: OpInfo, n: u64, counter: Option<&AtomicU64>, op: impl FnMut()) {
    settle(crate::REPORT_LINE_BYTES);
    let count_before = counter.map(|c| c.load(Ordering::SeqCst));
    let sibling_before = stats::exit_counters(DOMID_SELF, 1).ok();
    let sample = measure::run(WARMUP, n, op, || {});
    let sibling_after = stats::exit_counters(DOMID_SELF, 1).ok();
    if let (Some(counter), Some(before)) = (counter, count_before) {
        let seen = counter.load(Ordering::SeqCst) - before;
        if seen != WARMUP + n {
            fail(format_args!(
                "{}: vCPU 1 handled {seen}, expected {}",
                info.name,
                WARMUP + n
            ));
        }
    }
    measure::report(info, &sample);
    if let (Some(after), Some(before)) = (sibling_after, sibling_before) {
        let exits = stats::delta(&after, &before).total;
        println!(
            "bench: {}: vCPU 1 (the other CPU) made {} exits per operation",
            info.name,
            measure::Hundredths::ratio(exits, WARMUP + n)
        );
    }
}

/// The `smp2` rows. Skipped with one vCPU.
pub(crate) fn rows(n: u64, nr_vcpus: u32) {
    let rows = [
        info("ipi_cpu1_pv", Group::Smp2, Path::Pv),
        info("ipi_cpu1_x2apic", Group::Smp2, Path::Trap),
        info("shootdown_cpu1_pv", Group::Smp2, Path::Pv),
        info("shootdown_cpu1_ipi", Group::Smp2, Path::Trap),
        info("event_roundtrip_cpus", Group::Smp2, Path::Pv),
    ];
    if nr_vcpus < 2 {
        for row in rows {
            measure::report_skipped(row, "needs-vcpus=2");
        }
        return;
    }
    let ping = match setup() {
        Ok(ping) => ping,
        Err(what) => {
            fail(format_args!("smp2: {what} failed"));
            return;
        }
    };
    let [ipi_pv, ipi_x2apic, flush_pv, flush_ipi, roundtrip] = rows;
    let wait_for = |counter: &AtomicU64, before: u64| {
        while counter.load(Ordering::SeqCst) == before {
            core::hint::spin_loop();
        }
    };

    let step = |mode: u64| {
        if let Err(what) = switch_mode(mode) {
            fail(format_args!("smp2: {what}"));
            return false;
        }
        true
    };
    if !step(BLOCK) {
        return;
    }
    measure_row(ipi_pv, n, Some(&WOKEN), || {
        let before = WOKEN.load(Ordering::SeqCst);
        let _ = events::send_ipi(0b10, WAKE_SLOT);
        wait_for(&WOKEN, before);
    });
    if !step(HALT) {
        return;
    }
    measure_row(ipi_x2apic, n, Some(&WOKEN), || {
        let before = WOKEN.load(Ordering::SeqCst);
        // SAFETY: the x2APIC is there; vCPU 1 handles the vector.
        unsafe { x2apic::write_icr(icr_fixed(1, WAKE_VECTOR)) };
        wait_for(&WOKEN, before);
    });
    if !step(SPIN) {
        return;
    }
    let address = [TOUCHED.as_ptr() as u64];
    measure_row(flush_pv, n, None, || {
        let _ = memory::flush_tlb(0b10, &address);
    });
    measure_row(flush_ipi, n, Some(&FLUSHED), || {
        let before = FLUSHED.load(Ordering::SeqCst);
        // SAFETY: the x2APIC is there; vCPU 1 handles the vector.
        unsafe { x2apic::write_icr(icr_fixed(1, FLUSH_VECTOR)) };
        wait_for(&FLUSHED, before);
    });
    if !step(PONG) {
        return;
    }
    measure_row(roundtrip, n, None, || {
        let _ = events::send_ipi(0b10, PING_SLOT);
        if sched::poll(&[ping], None).is_ok() {
            events::clear_pending(ping);
        }
    });
}

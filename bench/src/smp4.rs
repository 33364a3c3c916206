//! The `smp4` rows: four vCPUs on one physical CPU (`cargo xtask bench` boots these with
//! `vcpus=4 groups=smp4` and one CPU), so that while vCPU 0 measures, every sibling that is
//! ready is preempted by construction. The rows set what each sibling does: blocked (a
//! paravirtual IPI wakes it), halted (an x2APIC IPI wakes it), spinning (ready, so preempted:
//! a shootdown must reach it), or holding the lock vCPU 0 wants and preempted with it.
//!
//! The trapping paths use the SDK's native `smp` backend ([`NativeSmp`]: x2APIC ICR writes,
//! an IPI-based shootdown that spins for every target's acknowledgement, a pause loop); the
//! paravirtual ones use [`PvSmp`] and a directed yield. A wait for a preempted vCPU on the
//! trapping path lasts until the hypervisor runs it: the rest of the waiter's 10 ms slice and
//! the slices of whoever runs first. Those rows measure few operations
//! ([`SLOW_ITERATIONS`]): that cost, millions of instructions per operation under -icount, is
//! what the paravirtual path removes.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lamina_abi::event_channel::DOMID_SELF;
use lamina_abi::vcpu::{VcpuStartState, runstate};
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::interrupts::{self, TrapFrame};
use lamina_guest_sdk::pvops::{
    NativeSmp, PvSmp, SHOOTDOWN_KIND, SmpOps, handle_shootdown_ipi, icr_fixed, ipi_vector,
};
use lamina_guest_sdk::vcpu::RunstateArea;
use lamina_guest_sdk::{percpu, println, sched, stats, vcpu, x2apic};

use crate::measure::{self, Group, OpInfo, Path};
use crate::{fail, info, settle};

/// The vCPUs; vCPU 0 measures, 1 to 3 are the siblings.
const VCPUS: usize = 4;
/// Operations measured, and warm-up runs, of a row that waits for preempted vCPUs.
pub(crate) const SLOW_ITERATIONS: u64 = 16;
const SLOW_WARMUP: u64 = 1;
/// Warm-up runs of the other rows (the harness's [`crate::WARMUP`]).
const WARMUP: u64 = crate::WARMUP;

/// The IPI slot that wakes a sibling.
const WAKE_SLOT: u8 = 0;
/// The x2APIC vector that wakes a halted sibling (the self-IPI rows' 0xe0 is below).
const WAKE_VECTOR: u8 = 0xe1;

/// What a sibling does (vCPU 0 sets [`MODE`], the sibling echoes it in [`MODE_SEEN`]).
const BLOCK: u64 = 1;
const HALT: u64 = 2;
const SPIN: u64 = 3;
/// vCPU 1 only: hold [`LOCK`], yield with it, and hand it over when vCPU 0 wants it.
const HOLD: u64 = 4;
static MODE: [AtomicU64; VCPUS] = [const { AtomicU64::new(0) }; VCPUS];
static MODE_SEEN: [AtomicU64; VCPUS] = [const { AtomicU64::new(0) }; VCPUS];

/// Wake-ups (event or interrupt) and shootdowns each sibling handled.
static WOKEN: [AtomicU64; VCPUS] = [const { AtomicU64::new(0) }; VCPUS];
static FLUSHED: [AtomicU64; VCPUS] = [const { AtomicU64::new(0) }; VCPUS];
/// What the spinning siblings read (their TLBs hold the translation the rows flush).
static TOUCHED: AtomicU64 = AtomicU64::new(0);

/// The siblings' run-state areas: the IPI rows wait until their targets wait again.
static RUNSTATES: [RunstateArea; VCPUS] = [const { RunstateArea::new() }; VCPUS];

/// The contended lock: 0 free, `v + 1` held by vCPU `v`.
static LOCK: AtomicU64 = AtomicU64::new(0);
/// vCPU 0 wants the lock; vCPU 1 holds it (set once it took it back); hand-overs done.
static WANT: AtomicBool = AtomicBool::new(false);
static HOLDS: AtomicBool = AtomicBool::new(false);
static ROUND: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct Stack([u8; 16384]);
struct SharedStacks(core::cell::UnsafeCell<[Stack; VCPUS - 1]>);
// SAFETY: sibling `v` alone uses stack `v - 1`, once vCPU 0 started it.
unsafe impl Sync for SharedStacks {}
static STACKS: SharedStacks = SharedStacks(core::cell::UnsafeCell::new(
    [const { Stack([0; 16384]) }; VCPUS - 1],
));

fn on_wake_event(_port: Port) {
    WOKEN[percpu::current() as usize % VCPUS].fetch_add(1, Ordering::SeqCst);
}

fn on_wake_vector(_frame: &mut TrapFrame) {
    WOKEN[percpu::current() as usize % VCPUS].fetch_add(1, Ordering::SeqCst);
    // SAFETY: the handler of an x2APIC interrupt.
    unsafe { x2apic::eoi() };
}

fn on_shootdown_vector(_frame: &mut TrapFrame) {
    let this = percpu::current();
    FLUSHED[this as usize % VCPUS].fetch_add(1, Ordering::SeqCst);
    // SAFETY: the handler of the native shootdown's x2APIC interrupt.
    unsafe { handle_shootdown_ipi(this) };
}

/// vCPU 1's part of one lock hand-over (mode [`HOLD`]): take the lock, be preempted holding
/// it (a yield to vCPU 0) until vCPU 0 wants it, release it, and wait (yielding) until vCPU 0
/// took and released it.
fn hold_once() {
    while LOCK
        .compare_exchange(0, 2, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        let _ = sched::yield_to(0);
    }
    HOLDS.store(true, Ordering::SeqCst);
    while !WANT.load(Ordering::SeqCst) {
        if MODE[1].load(Ordering::SeqCst) != HOLD {
            HOLDS.store(false, Ordering::SeqCst);
            LOCK.store(0, Ordering::SeqCst);
            return;
        }
        let _ = sched::yield_to(0);
    }
    let round = ROUND.load(Ordering::SeqCst);
    HOLDS.store(false, Ordering::SeqCst);
    LOCK.store(0, Ordering::SeqCst);
    while ROUND.load(Ordering::SeqCst) == round {
        let _ = sched::yield_to(0);
    }
}

/// Siblings: their own SDK state (per-vCPU number, IDT, upcall, x2APIC), then the mode loop.
extern "C" fn sibling(this: u64) -> ! {
    let this = this as u32;
    if percpu::init_this_vcpu(this).is_err() || !interrupts::load_on_this_vcpu() {
        fail(format_args!("smp4: vCPU {this} could not set itself up"));
    }
    if events::install_upcall(crate::ops::UPCALL_VECTOR).is_err() {
        fail(format_args!("smp4: vCPU {this}'s set_upcall_vector failed"));
    }
    events::unmask_upcalls();
    // SAFETY: CPUID offered the x2APIC (ops::setup checked); the IDT handles the spurious
    // vector (ops::setup).
    unsafe { x2apic::enable(0xff) };
    interrupts::enable();
    let v = this as usize;
    loop {
        let mode = MODE[v].load(Ordering::SeqCst);
        MODE_SEEN[v].store(mode, Ordering::SeqCst);
        match mode {
            BLOCK => {
                events::mask_upcalls();
                let _ = sched::block();
            }
            HALT => interrupts::enable_and_halt(),
            HOLD if v == 1 => hold_once(),
            _ => {
                TOUCHED.load(Ordering::Relaxed);
                core::hint::spin_loop();
            }
        }
    }
}

/// Binds the wake slot on each sibling, sets the handlers and starts the siblings (blocked:
/// started spinning, each took a whole 10 ms slice before the first row, and vCPU 1, still
/// 4 ms of CPU time ahead of vCPU 0 midway through `ipi_all_pv`, was rightly run after vCPU 0
/// at each of its yields there).
fn setup() -> Result<(), &'static str> {
    percpu::init_this_vcpu(0).map_err(|_| "percpu")?;
    for v in 1..VCPUS as u32 {
        let wake = events::bind_ipi_slot(v, WAKE_SLOT).map_err(|_| "bind_ipi_slot")?;
        events::set_handler(wake, on_wake_event);
        events::unmask(wake).map_err(|_| "unmask")?;
    }
    interrupts::set_handler(WAKE_VECTOR, on_wake_vector);
    interrupts::set_handler(ipi_vector(SHOOTDOWN_KIND), on_shootdown_vector);
    let cr3: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    let stacks = STACKS.0.get() as u64;
    for v in 1..VCPUS as u32 {
        MODE[v as usize].store(BLOCK, Ordering::SeqCst);
        let start = VcpuStartState {
            rip: sibling as *const () as usize as u64,
            rsp: stacks + u64::from(v) * size_of::<Stack>() as u64 - 8,
            cr3: cr3 & !0xfff,
            argument: u64::from(v),
        };
        vcpu::register_runstate(v, &RUNSTATES[v as usize]).map_err(|_| "register_runstate")?;
        vcpu::initialise(v, &start).map_err(|_| "vcpu_op initialise")?;
        // SAFETY: `sibling` runs on a stack of its own and shares only atomics with the others.
        unsafe { vcpu::up(v) }.map_err(|_| "vcpu_op up")?;
    }
    switch_modes(&[BLOCK, BLOCK, BLOCK])
}

/// Moves siblings 1 to 3 to `modes` (waking them from the current ones) and waits until they
/// are there.
fn switch_modes(modes: &[u64; VCPUS - 1]) -> Result<(), &'static str> {
    for (v, &mode) in modes.iter().enumerate() {
        MODE[v + 1].store(mode, Ordering::SeqCst);
    }
    for _ in 0..100_000u64 {
        let mut lagging = 0u64;
        for (v, &mode) in modes.iter().enumerate() {
            if MODE_SEEN[v + 1].load(Ordering::SeqCst) != mode {
                lagging |= 1 << (v + 1);
            }
        }
        if lagging == 0 {
            return Ok(());
        }
        // Whatever they wait in, one of these ends the wait; then let them run.
        let _ = events::send_ipi(lagging, WAKE_SLOT);
        let mut targets = lagging;
        while targets != 0 {
            let v = targets.trailing_zeros();
            targets &= targets - 1;
            // SAFETY: the x2APIC is there; the siblings handle the vector.
            unsafe { x2apic::write_icr(icr_fixed(v, WAKE_VECTOR)) };
        }
        let _ = sched::yield_now();
    }
    Err("a sibling never took its new mode")
}

/// The sum of `counters` over the vCPUs of `mask`.
fn sum(counters: &[AtomicU64; VCPUS], mask: u64) -> u64 {
    (0..VCPUS)
        .filter(|v| mask & (1 << v) != 0)
        .map(|v| counters[v].load(Ordering::SeqCst))
        .sum()
}

/// Exits of siblings 1 to 3 so far.
fn sibling_exits() -> Option<u64> {
    (1..VCPUS as u32)
        .map(|v| stats::exit_counters(DOMID_SELF, v).ok().map(|c| c.total))
        .sum()
}

/// Measures `op` `n` times after `warmup` and reports it with the siblings' exits; the
/// siblings of `mask` must have moved `counters` once each per run.
fn measure_row(
    info: OpInfo,
    warmup: u64,
    n: u64,
    checked: Option<(&[AtomicU64; VCPUS], u64)>,
    op: impl FnMut(),
) {
    settle(crate::REPORT_LINE_BYTES * 2);
    let counted_before = checked.map(|(counters, mask)| sum(counters, mask));
    let siblings_before = sibling_exits();
    let sample = measure::run(warmup, n, op, || {});
    let siblings_after = sibling_exits();
    if let (Some((counters, mask)), Some(before)) = (checked, counted_before) {
        let seen = sum(counters, mask) - before;
        let expected = (warmup + n) * u64::from(mask.count_ones());
        if seen != expected {
            fail(format_args!(
                "{}: the siblings handled {seen}, expected {expected}",
                info.name
            ));
        }
    }
    measure::report(info, &sample);
    if let (Some(after), Some(before)) = (siblings_after, siblings_before) {
        println!(
            "bench: {}: vCPUs 1-3 made {} exits per operation",
            info.name,
            measure::Hundredths::ratio(after - before, warmup + n)
        );
    }
}

/// Yields until the siblings of `mask` moved `counters` past `before`, one each, and wait
/// (blocked or halted) again, so that every IPI finds its targets waiting.
fn yield_until(counters: &[AtomicU64; VCPUS], mask: u64, before: u64) {
    let want = before + u64::from(mask.count_ones());
    while sum(counters, mask) < want {
        let _ = sched::yield_now();
    }
    let waiting = |v: usize| RUNSTATES[v].read().state == runstate::BLOCKED;
    while !(1..VCPUS).all(|v| mask & (1 << v) == 0 || waiting(v)) {
        let _ = sched::yield_now();
    }
}

/// One hand-over of the lock from preempted vCPU 1 to vCPU 0 and back. `wait` is how vCPU 0
/// waits while vCPU 1 holds it; vCPU 0 then waits (yielding, on both paths) until vCPU 1 holds
/// it again, preempted, for the next run.
fn lock_round(wait: impl Fn()) {
    WANT.store(true, Ordering::SeqCst);
    while LOCK
        .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        wait();
    }
    WANT.store(false, Ordering::SeqCst);
    LOCK.store(0, Ordering::SeqCst);
    ROUND.fetch_add(1, Ordering::SeqCst);
    while !HOLDS.load(Ordering::SeqCst) {
        let _ = sched::yield_to(1);
    }
}

/// The `smp4` rows. Skipped with fewer than four vCPUs.
pub(crate) fn rows(n: u64, nr_vcpus: u32) {
    let rows = [
        info("ipi_one_pv", Group::Smp4, Path::Pv),
        info("ipi_one_x2apic", Group::Smp4, Path::Trap),
        info("ipi_all_pv", Group::Smp4, Path::Pv),
        info("ipi_all_x2apic", Group::Smp4, Path::Trap),
        info("lock_preempted_yield_to", Group::Smp4, Path::Pv),
        info("lock_preempted_pause", Group::Smp4, Path::Trap),
        info("shootdown_1_preempted_pv", Group::Smp4, Path::Pv),
        info("shootdown_1_preempted_ipi", Group::Smp4, Path::Trap),
        info("shootdown_2_preempted_pv", Group::Smp4, Path::Pv),
        info("shootdown_2_preempted_ipi", Group::Smp4, Path::Trap),
        info("shootdown_4_preempted_pv", Group::Smp4, Path::Pv),
        info("shootdown_4_preempted_ipi", Group::Smp4, Path::Trap),
    ];
    if (nr_vcpus as usize) < VCPUS {
        for row in rows {
            measure::report_skipped(row, "needs-vcpus=4");
        }
        return;
    }
    if let Err(what) = setup() {
        fail(format_args!("smp4: {what} failed"));
        return;
    }
    let [
        ipi_one_pv,
        ipi_one_x2apic,
        ipi_all_pv,
        ipi_all_x2apic,
        lock_pv,
        lock_pause,
        flush1_pv,
        flush1_ipi,
        flush2_pv,
        flush2_ipi,
        flush4_pv,
        flush4_ipi,
    ] = rows;
    let step = |modes: [u64; VCPUS - 1]| match switch_modes(&modes) {
        Ok(()) => true,
        Err(what) => {
            fail(format_args!("smp4: {what}"));
            false
        }
    };

    // IPIs to waiting vCPUs: the sender sends, then yields until each target handled its own.
    const ONE: u64 = 0b0010;
    const ALL: u64 = 0b1110;
    if !step([BLOCK, BLOCK, BLOCK]) {
        return;
    }
    for (row, mask) in [(ipi_one_pv, ONE), (ipi_all_pv, ALL)] {
        measure_row(row, WARMUP, n, Some((&WOKEN, mask)), || {
            let before = sum(&WOKEN, mask);
            let _ = PvSmp.send_ipi(mask, WAKE_SLOT);
            yield_until(&WOKEN, mask, before);
        });
    }
    if !step([HALT, HALT, HALT]) {
        return;
    }
    for (row, mask) in [(ipi_one_x2apic, ONE), (ipi_all_x2apic, ALL)] {
        measure_row(row, WARMUP, n, Some((&WOKEN, mask)), || {
            let before = sum(&WOKEN, mask);
            let mut targets = mask;
            while targets != 0 {
                let v = targets.trailing_zeros();
                targets &= targets - 1;
                // SAFETY: the x2APIC is there; the siblings handle the vector.
                unsafe { x2apic::write_icr(icr_fixed(v, WAKE_VECTOR)) };
            }
            yield_until(&WOKEN, mask, before);
        });
    }

    // The lock, held by vCPU 1 and preempted with it; vCPUs 2 and 3 blocked.
    if !step([HOLD, BLOCK, BLOCK]) {
        return;
    }
    measure_row(lock_pv, WARMUP, n, None, || {
        lock_round(|| {
            let _ = sched::yield_to(1);
        })
    });
    measure_row(lock_pause, SLOW_WARMUP, SLOW_ITERATIONS, None, || {
        lock_round(core::hint::spin_loop)
    });

    // Shootdowns of one address; the targets other than vCPU 0 spin, so they are preempted.
    if !step([SPIN, SPIN, SPIN]) {
        return;
    }
    let address = [TOUCHED.as_ptr() as u64];
    for (pv, ipi, mask) in [
        (flush1_pv, flush1_ipi, 0b0010u64),
        (flush2_pv, flush2_ipi, 0b0110),
        (flush4_pv, flush4_ipi, 0b1111),
    ] {
        measure_row(pv, WARMUP, n, None, || {
            let _ = PvSmp.flush_tlb(mask, &address);
        });
        measure_row(
            ipi,
            SLOW_WARMUP,
            SLOW_ITERATIONS,
            Some((&FLUSHED, mask & !1)),
            || {
                let _ = NativeSmp.flush_tlb(mask, &address);
            },
        );
    }
}

//! Tests of several vCPUs in one domain (docs/abi.md 19): `vcpu_op` initialise, up, down and
//! is_up, their argument checks, a secondary vCPU that runs, stops and resumes, and its own
//! exit counters (15).
//!
//! The secondary vCPU runs [`secondary_main`] on its own static stack and talks to vCPU 0
//! through atomics only; all checks and output stay on vCPU 0.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use lamina_abi::event_channel::DOMID_SELF;
use lamina_abi::stats::{ExitCounters, exit_kind};
use lamina_abi::vcpu::{RunstateInfo, VcpuOp, VcpuStartState, runstate};
use lamina_abi::{Errno, Hypercall};
use lamina_guest_sdk::start_info;

use super::common::{RunstateArea, bad_vcpus, register_runstate_area};
use crate::framework::{Hex, Status, check, check_eq, expect_ok};
use crate::hv;
use crate::x86::{self, RacyCell};

/// `vcpu_op` `op` on `vcpu` with an argument the hypervisor only reads, or none.
fn op(op: VcpuOp, vcpu: u64, arg: u64) -> Status {
    // SAFETY: initialise reads 32 bytes at `arg`; up, down and is_up touch no memory.
    unsafe { hv::vcpu_op(op as u64, vcpu, arg) }
}

/// A start state at a static place, for initialise.
#[repr(C, align(8))]
struct StartArea([u64; 8]);

static START_AREA: RacyCell<StartArea> = RacyCell::new(StartArea([0; 8]));

/// Initialise of `vcpu` with `start`, written to [`START_AREA`] (at byte `offset`).
fn initialise_with(vcpu: u64, start: VcpuStartState, offset: u64) -> Status {
    let at = START_AREA.get() as u64 + offset;
    // SAFETY: the area is ours and large enough for a start state at offset <= 24; only
    // vCPU 0 writes it, and the hypervisor only reads it.
    unsafe { core::ptr::write_unaligned(at as *mut VcpuStartState, start) };
    op(VcpuOp::Initialise, vcpu, at)
}

/// The secondary vCPU's stack.
#[repr(C, align(16))]
struct Stack([u8; 16384]);

static SECONDARY_STACK: RacyCell<Stack> = RacyCell::new(Stack([0; 16384]));

/// What the secondary vCPU saw and did.
static SECONDARY_ARGUMENT: AtomicU64 = AtomicU64::new(0);
static SECONDARY_APIC_ID: AtomicU32 = AtomicU32::new(u32::MAX);
static SECONDARY_ROUNDS: AtomicU64 = AtomicU64::new(0);
/// Asks the secondary to take itself down; it stores what down returned when it is back.
static DOWN_SELF: AtomicBool = AtomicBool::new(false);
static DOWN_SELF_RESULT: AtomicU64 = AtomicU64::new(u64::MAX);

const MAGIC: u64 = 0x5ec0_0d0a_1234_5678;

/// vCPU 1's code: records its argument and APIC id, then counts rounds, yielding.
extern "C" fn secondary_main(argument: u64) -> ! {
    SECONDARY_ARGUMENT.store(argument, Ordering::SeqCst);
    SECONDARY_APIC_ID.store(core::arch::x86_64::__cpuid(1).ebx >> 24, Ordering::SeqCst);
    loop {
        SECONDARY_ROUNDS.fetch_add(1, Ordering::SeqCst);
        if DOWN_SELF.swap(false, Ordering::SeqCst) {
            let status = op(VcpuOp::Down, 1, 0);
            DOWN_SELF_RESULT.store(status.0, Ordering::SeqCst);
        }
        hv::sched_yield();
    }
}

/// A start state that runs [`secondary_main`] on its stack with [`MAGIC`].
fn good_start() -> VcpuStartState {
    let top = SECONDARY_STACK.get() as u64 + size_of::<Stack>() as u64;
    VcpuStartState {
        rip: secondary_main as *const () as usize as u64,
        // As after a call: the return address slot below a 16-byte boundary.
        rsp: top - 8,
        cr3: x86::read_cr3() & !0xfff,
        argument: MAGIC,
    }
}

/// Yields until `done` holds, at most `rounds` times; whether it held.
fn yield_until(rounds: u32, done: impl Fn() -> bool) -> bool {
    for _ in 0..rounds {
        if done() {
            return true;
        }
        hv::sched_yield();
    }
    done()
}

conformance_test! {
    title: "initialise, up, down and is_up check their arguments in the documented order",
    section: "19 Several vCPUs",
    expect: Success,
    cmdline: "vcpus=2",
}
pub(super) fn smp_vcpu_ops_check_args() {
    check_eq!("StartInfo.nr_vcpus", 2, start_info().nr_vcpus);
    check_eq!("is_up(0)", Status(1), op(VcpuOp::IsUp, 0, 0));
    check_eq!("is_up(1) at start", Status(0), op(VcpuOp::IsUp, 1, 0));
    for vcpu in bad_vcpus() {
        for operation in [VcpuOp::Initialise, VcpuOp::Up, VcpuOp::Down, VcpuOp::IsUp] {
            check_eq!(
                format_args!("{operation:?} on vCPU {vcpu:#x}"),
                Status::err(Errno::ENOENT),
                op(operation, vcpu, START_AREA.get() as u64)
            );
        }
    }
    let good = good_start();
    check_eq!(
        "initialise vCPU 0",
        Status::err(Errno::EEXIST),
        initialise_with(0, good, 0)
    );
    check_eq!(
        "initialise from a misaligned address",
        Status::err(Errno::EINVAL),
        initialise_with(1, good, 4)
    );
    let mem = start_info().mem_bytes;
    check_eq!(
        "initialise from 16 bytes before the end of RAM",
        Status::err(Errno::EFAULT),
        op(VcpuOp::Initialise, 1, mem - 16)
    );
    let bad_states = [
        (
            "a non-canonical RIP",
            VcpuStartState {
                rip: 1 << 47,
                ..good
            },
        ),
        (
            "a non-canonical RSP",
            VcpuStartState {
                rsp: 0xffff_0000_0000_0000,
                ..good
            },
        ),
        (
            "a CR3 that is not page-aligned",
            VcpuStartState {
                cr3: good.cr3 | 0x8,
                ..good
            },
        ),
        (
            "a CR3 at the end of RAM",
            VcpuStartState { cr3: mem, ..good },
        ),
        (
            "a CR3 far outside RAM",
            VcpuStartState {
                cr3: 1 << 40,
                ..good
            },
        ),
    ];
    for (what, state) in bad_states {
        check_eq!(
            format_args!("initialise with {what}"),
            Status::err(Errno::EINVAL),
            initialise_with(1, state, 0)
        );
    }
    check_eq!(
        "up of a vCPU never initialised",
        Status::err(Errno::EINVAL),
        op(VcpuOp::Up, 1, 0)
    );
    check_eq!(
        "down of a vCPU that is down",
        Status(0),
        op(VcpuOp::Down, 1, 0)
    );
    check_eq!(
        "down of vCPU 0, the only one up",
        Status::err(Errno::EBUSY),
        op(VcpuOp::Down, 0, 0)
    );
    // SAFETY: an unknown operation does nothing.
    let unknown = unsafe { hv::vcpu_op(9, 1, 0) };
    check_eq!("vcpu_op 9", Status::err(Errno::ENOSYS), unknown);
    check_eq!("is_up(1) after all that", Status(0), op(VcpuOp::IsUp, 1, 0));
    check_eq!(
        "the secondary never ran",
        0,
        SECONDARY_ROUNDS.load(Ordering::SeqCst)
    );
}

/// Room for vCPU 1's runstate area.
static SECONDARY_RUNSTATE: RacyCell<RunstateArea> = RacyCell::new(RunstateArea::UNSET);

fn secondary_runstate() -> u32 {
    // SAFETY: aligned, ours; the hypervisor writes it only while vCPU 0 is out of the guest.
    unsafe { core::ptr::read_volatile(&raw const (*SECONDARY_RUNSTATE.get()).0.state) }
}

conformance_test! {
    title: "a secondary vCPU starts from its start state, stops when taken down and resumes where it stopped",
    section: "19 Several vCPUs",
    expect: Success,
    cmdline: "vcpus=2",
}
pub(super) fn smp_secondary_stops_resumes() {
    register_runstate_area(1, &SECONDARY_RUNSTATE);
    check_eq!(
        "vCPU 1's run state before up",
        runstate::OFFLINE,
        secondary_runstate()
    );
    check_eq!(
        "periodic timer on vCPU 1",
        Status(0),
        hv::set_periodic_timer(1, 1_000_000)
    );
    check_eq!(
        "periodic timer on vCPU 1 off",
        Status(0),
        hv::set_periodic_timer(1, 0)
    );
    if expect_ok("initialise vCPU 1", initialise_with(1, good_start(), 0)).is_none() {
        return;
    }
    check_eq!(
        "initialise vCPU 1 again",
        Status::err(Errno::EEXIST),
        initialise_with(1, good_start(), 0)
    );
    check_eq!("up(1)", Status(0), op(VcpuOp::Up, 1, 0));
    let started = yield_until(10_000, || SECONDARY_ARGUMENT.load(Ordering::SeqCst) != 0);
    check!(started, "vCPU 1 never ran after up");
    if !started {
        return;
    }
    check_eq!(
        "the argument vCPU 1 found in RDI",
        Hex(MAGIC),
        Hex(SECONDARY_ARGUMENT.load(Ordering::SeqCst))
    );
    check_eq!(
        "vCPU 1's initial APIC id (CPUID.1:EBX[31:24])",
        1,
        SECONDARY_APIC_ID.load(Ordering::SeqCst)
    );
    check_eq!("is_up(1)", Status(1), op(VcpuOp::IsUp, 1, 0));
    check_eq!("up(1) again", Status(0), op(VcpuOp::Up, 1, 0));
    let rounds = SECONDARY_ROUNDS.load(Ordering::SeqCst);
    check!(
        yield_until(10_000, || SECONDARY_ROUNDS.load(Ordering::SeqCst)
            > rounds + 2),
        "vCPU 1 stopped counting while up"
    );

    // Down from vCPU 0: it stops at once.
    check_eq!("down(1)", Status(0), op(VcpuOp::Down, 1, 0));
    check_eq!("is_up(1) after down", Status(0), op(VcpuOp::IsUp, 1, 0));
    let stopped_at = SECONDARY_ROUNDS.load(Ordering::SeqCst);
    yield_until(200, || false);
    check_eq!(
        "vCPU 1's rounds while down",
        stopped_at,
        SECONDARY_ROUNDS.load(Ordering::SeqCst)
    );
    check_eq!(
        "vCPU 1's run state while down",
        runstate::OFFLINE,
        secondary_runstate()
    );
    check_eq!(
        "down of vCPU 0, the only one up again",
        Status::err(Errno::EBUSY),
        op(VcpuOp::Down, 0, 0)
    );

    // Up again: it goes on where it stopped (no second start).
    check_eq!("up(1) after down", Status(0), op(VcpuOp::Up, 1, 0));
    check!(
        yield_until(10_000, || SECONDARY_ROUNDS.load(Ordering::SeqCst)
            > stopped_at + 2),
        "vCPU 1 did not resume after up"
    );

    // Down of itself: the call returns 0 once it is brought up again.
    DOWN_SELF.store(true, Ordering::SeqCst);
    check!(
        yield_until(10_000, || op(VcpuOp::IsUp, 1, 0) == Status(0)),
        "vCPU 1 did not take itself down"
    );
    check_eq!(
        "down(1) on vCPU 1 has not returned",
        u64::MAX,
        DOWN_SELF_RESULT.load(Ordering::SeqCst)
    );
    check_eq!("up(1) after its own down", Status(0), op(VcpuOp::Up, 1, 0));
    check!(
        yield_until(10_000, || DOWN_SELF_RESULT.load(Ordering::SeqCst)
            != u64::MAX),
        "vCPU 1's down did not return after up"
    );
    check_eq!(
        "what down(1) returned on vCPU 1",
        Status(0),
        Status(DOWN_SELF_RESULT.load(Ordering::SeqCst))
    );
    check_eq!("down(1) at the end", Status(0), op(VcpuOp::Down, 1, 0));
}

/// CPUID instructions [`counting_secondary`] executes before it takes itself down.
const SECONDARY_CPUIDS: u64 = 7;
/// Set by [`counting_secondary`] right before its `down`.
static COUNTING_DONE: AtomicBool = AtomicBool::new(false);

/// vCPU 1's code for [`smp_stats_per_vcpu`]: [`SECONDARY_CPUIDS`] CPUIDs, then down of
/// itself (its only hypercall), and again each time it is brought up.
extern "C" fn counting_secondary(_argument: u64) -> ! {
    loop {
        for leaf in 0..SECONDARY_CPUIDS {
            core::hint::black_box(core::arch::x86_64::__cpuid(leaf as u32 % 2));
        }
        COUNTING_DONE.store(true, Ordering::SeqCst);
        op(VcpuOp::Down, 1, 0);
    }
}

/// vCPU `vcpu`'s counters of this domain, or `None` (recorded) if the call failed.
fn counters_of(vcpu: u64) -> Option<ExitCounters> {
    let mut counters = ExitCounters::default();
    let status = hv::exit_counters(DOMID_SELF, vcpu, &mut counters);
    expect_ok(format_args!("stats_op of vCPU {vcpu}"), status).map(|_| counters)
}

conformance_test! {
    title: "each vCPU has its own exit counters: what vCPU 1 causes is counted on vCPU 1, not on vCPU 0",
    section: "15 Exit accounting",
    expect: Success,
    cmdline: "vcpus=2",
}
pub(super) fn smp_stats_per_vcpu() {
    let mut counters = ExitCounters::default();
    check_eq!(
        "stats_op of vCPU 2 of 2",
        Status::err(Errno::ENOENT),
        hv::exit_counters(DOMID_SELF, 2, &mut counters)
    );
    let Some(before_up) = counters_of(1) else {
        return;
    };
    check_eq!("vCPU 1's exits before it ever ran", 0, before_up.total);
    let Some(own_before) = counters_of(0) else {
        return;
    };
    let start = VcpuStartState {
        rip: counting_secondary as *const () as usize as u64,
        ..good_start()
    };
    if expect_ok("initialise vCPU 1", initialise_with(1, start, 0)).is_none() {
        return;
    }
    check_eq!("up(1)", Status(0), op(VcpuOp::Up, 1, 0));
    let done = yield_until(10_000, || {
        COUNTING_DONE.load(Ordering::SeqCst) && op(VcpuOp::IsUp, 1, 0) == Status(0)
    });
    check!(done, "vCPU 1 did not count and take itself down");
    if !done {
        return;
    }
    let (Some(own_after), Some(secondary)) = (counters_of(0), counters_of(1)) else {
        return;
    };
    check_eq!(
        "vCPU 1's CPUID exits",
        SECONDARY_CPUIDS,
        secondary.by_kind[exit_kind::CPUID]
    );
    check_eq!(
        "vCPU 1's hypercall exits (its down)",
        1,
        secondary.by_kind[exit_kind::HYPERCALL]
    );
    check_eq!(
        "vCPU 1's vcpu_op calls",
        1,
        secondary.by_hypercall[Hypercall::VcpuOp as usize]
    );
    check_eq!(
        "vCPU 1's total, the sum of its kinds",
        secondary.by_kind.iter().sum::<u64>(),
        secondary.total
    );
    check_eq!(
        "vCPU 0's CPUID exits meanwhile",
        own_before.by_kind[exit_kind::CPUID],
        own_after.by_kind[exit_kind::CPUID]
    );
    check!(
        own_after.by_hypercall[Hypercall::SchedOp as usize]
            > own_before.by_hypercall[Hypercall::SchedOp as usize],
        "vCPU 0's yields are counted on vCPU 0"
    );
}

/// Rounds each spinning vCPU of [`smp_steal_time_overcommit`] has counted (0: not started).
static SPINS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// Times a spinner found its own run state other than running right after a yield returned.
static NOT_RUNNING_SEEN: AtomicU64 = AtomicU64::new(0);

/// vCPUs 1 and 2 of [`smp_steal_time_overcommit`]: spin until taken down (RDI: the vCPU's
/// number), yielding every 4,096 rounds and then reading their own run state, which must say
/// running (docs/abi.md 9.2: a copy taken on the vCPU itself is consistent).
extern "C" fn spinner(index: u64) -> ! {
    let i = (index as usize).clamp(1, 2);
    let slot = &SPINS[i];
    loop {
        let round = slot.fetch_add(1, Ordering::Relaxed);
        if round % 4096 == 4095 {
            hv::sched_yield();
            if spinner_runstate(i - 1).state != runstate::RUNNING {
                NOT_RUNNING_SEEN.fetch_add(1, Ordering::SeqCst);
            }
        }
        core::hint::spin_loop();
    }
}

/// vCPUs 1 and 2's runstate areas.
static SPINNER_RUNSTATES: RacyCell<[RunstateArea; 2]> = RacyCell::new([RunstateArea::UNSET; 2]);

/// A copy of the runstate area of spinner `i` (vCPU `i + 1`).
fn spinner_runstate(i: usize) -> RunstateInfo {
    // SAFETY: aligned and ours; the hypervisor writes it only while that vCPU does not run:
    // it is down when vCPU 0 reads it, and running when the spinner reads its own.
    unsafe { core::ptr::read_volatile(&raw const (*SPINNER_RUNSTATES.get())[i].0) }
}

/// How long the three vCPUs spin together, in ns of system time.
const OVERCOMMIT_NS: u64 = 100_000_000;

conformance_test! {
    title: "three spinning vCPUs on fewer CPUs: each one's steal time (runnable) grows while it waits, running plus runnable covers all the time it was up, and a vCPU always reads its own state as running",
    section: "9.2 register_runstate",
    expect: Success,
    cmdline: "vcpus=3",
}
pub(super) fn smp_steal_time_overcommit() {
    for i in 0..2 {
        // SAFETY: only the address of our static is taken.
        let area = unsafe { &raw mut (*SPINNER_RUNSTATES.get())[i] } as u64;
        // SAFETY: the area is our static, 8-byte aligned and ours for good: the hypervisor
        // may write it whenever that vCPU is not running.
        let status = unsafe { hv::register_runstate(i as u64 + 1, area) };
        check_eq!(
            format_args!("register_runstate of vCPU {}", i + 1),
            Status(0),
            status
        );
    }
    // Each spinner on its own stack: the halves of the secondary stack.
    let top = SECONDARY_STACK.get() as u64 + size_of::<Stack>() as u64;
    for i in 0..2u64 {
        let start = VcpuStartState {
            rip: spinner as *const () as usize as u64,
            rsp: top - i * (size_of::<Stack>() as u64 / 2) - 8,
            cr3: x86::read_cr3() & !0xfff,
            argument: i + 1,
        };
        if expect_ok("initialise a spinner", initialise_with(i + 1, start, 0)).is_none() {
            return;
        }
        check_eq!("up of a spinner", Status(0), op(VcpuOp::Up, i + 1, 0));
    }
    // Both spinners going before the window opens.
    let started = yield_until(10_000, || {
        SPINS[1].load(Ordering::Relaxed) != 0 && SPINS[2].load(Ordering::Relaxed) != 0
    });
    check!(started, "the spinners did not start");
    if !started {
        return;
    }
    let opened = crate::shared::now();
    while crate::shared::now() - opened < OVERCOMMIT_NS {
        core::hint::spin_loop();
    }
    let closed = crate::shared::now();
    for vcpu in 1..=2 {
        check_eq!(
            format_args!("down({vcpu})"),
            Status(0),
            op(VcpuOp::Down, vcpu, 0)
        );
    }
    let window = closed - opened;
    check_eq!(
        "times a spinner saw its own run state other than running",
        0,
        NOT_RUNNING_SEEN.load(Ordering::SeqCst)
    );
    for i in 0..2 {
        let info = spinner_runstate(i);
        let vcpu = i + 1;
        check_eq!(
            format_args!("vCPU {vcpu}'s run state after down"),
            runstate::OFFLINE,
            info.state
        );
        let [running, runnable, blocked, _offline] = info.time;
        check_eq!(
            format_args!("vCPU {vcpu}'s blocked time (it never waited)"),
            0,
            blocked
        );
        // Up before the window opened and down after it closed, it was running or runnable
        // for all of it.
        check!(
            running + runnable >= window,
            "vCPU {vcpu}: running {running} + runnable {runnable} ns < the {window} ns it spun"
        );
        // Three vCPUs that never wait share fewer than three CPUs: each waits at least a
        // third of the time on two CPUs, two thirds on one.
        check!(
            runnable >= window / 10,
            "vCPU {vcpu}: {runnable} ns of steal time in {window} ns beside two other spinning vCPUs"
        );
        check!(
            running >= window / 10,
            "vCPU {vcpu}: ran only {running} ns in {window} ns"
        );
    }
}

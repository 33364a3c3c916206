//! Taking a measurement: TSC ticks around a loop, the domain's own exit counters before and
//! after it (`stats_op`, docs/abi.md 15), the time the vCPU spent blocked (its run-state
//! area), and the `BENCH` line that reports them.
//!
//! Under QEMU with `-icount shift=0` and under Bochs the TSC advances once per emulated
//! instruction, guest and hypervisor alike, so "TSC ticks per operation" is "instructions per
//! operation" and the same in every run. While the vCPU is blocked the emulators advance the
//! clock without executing anything; those ticks are waiting, not work, and are taken out
//! (see [`Sample::work_ticks`]).

use core::fmt;

use lamina_abi::vcpu::runstate;
use lamina_guest_sdk::stats::{self, ExitCounters, exit_kind};
use lamina_guest_sdk::vcpu::{self, RunstateArea};
use lamina_guest_sdk::{println, time};

/// This domain's exit counters (vCPU 0), through `stats_op` (the SDK's
/// [`stats::own_exit_counters`]); `None` when the hypervisor does not offer the call
/// (`-ENOSYS`). The call is an exit itself, counted in the counters it returns.
fn exits_so_far() -> Option<ExitCounters> {
    stats::own_exit_counters().ok()
}

/// Whether `stats_op` answers; printed once at the start.
pub(crate) fn describe_stats() -> &'static str {
    match exits_so_far() {
        Some(_) => "stats_op available",
        None => "stats_op unavailable (exits shown as -)",
    }
}

/// The vCPU's run-state area, for the time it spent blocked.
static RUNSTATE: RunstateArea = RunstateArea::new();

/// Has the hypervisor keep [`RUNSTATE`] current; false when it refuses.
pub(crate) fn register_runstate() -> bool {
    vcpu::register_runstate(0, &RUNSTATE).is_ok()
}

/// Nanoseconds vCPU 0 has spent blocked (0 when the area is not registered). The hypervisor
/// only writes the area while the vCPU is not running, so this copy is consistent.
fn blocked_ns() -> u64 {
    RUNSTATE.read().time[runstate::BLOCKED as usize]
}

/// When vCPU 0's run state last changed (0 when the area is not registered): it changes when
/// another vCPU takes the CPU from this one, and again when this one runs again.
pub(crate) fn runstate_entry_time() -> u64 {
    RUNSTATE.read().state_entry_time
}

/// What one measured loop came to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    /// Operations in the measured loop.
    pub(crate) iterations: u64,
    /// TSC ticks from before the loop to after it.
    pub(crate) ticks: u64,
    /// TSC ticks of those that the vCPU spent blocked.
    pub(crate) blocked_ticks: u64,
    /// The exits the loop caused, without the `stats_op` calls around it; `None` without
    /// `stats_op`.
    pub(crate) exits: Option<ExitCounters>,
}

impl Sample {
    /// Ticks of work: the loop's ticks minus those spent blocked (guest and hypervisor
    /// instructions under -icount; the blocked time also hides the few instructions of the
    /// hypervisor's idle loop).
    pub(crate) fn work_ticks(&self) -> u64 {
        self.ticks.saturating_sub(self.blocked_ticks)
    }
}

/// TSC ticks in `ns` at `tsc_khz`.
fn ns_to_ticks(ns: u64, tsc_khz: u64) -> u64 {
    (u128::from(ns) * u128::from(tsc_khz) / 1_000_000) as u64
}

/// Runs `op` `warmup` times unmeasured, then `iterations` times measured, then `tail` once
/// inside the measurement (for work an operation leaves behind, such as the console ring's
/// last drain).
pub(crate) fn run(
    warmup: u64,
    iterations: u64,
    mut op: impl FnMut(),
    tail: impl FnOnce(),
) -> Sample {
    for _ in 0..warmup {
        op();
    }
    let blocked_before = blocked_ns();
    let exits_before = exits_so_far();
    let start = time::rdtsc();
    for _ in 0..iterations {
        op();
    }
    tail();
    let end = time::rdtsc();
    let exits_after = exits_so_far();
    let blocked_after = blocked_ns();
    let exits = match (exits_before, exits_after) {
        // The second `stats_op` is counted in the counters it returned; the first is not in
        // the difference.
        (Some(before), Some(after)) => {
            let mut delta = stats::delta(&after, &before);
            delta.total = delta.total.saturating_sub(1);
            delta.by_kind[exit_kind::HYPERCALL] =
                delta.by_kind[exit_kind::HYPERCALL].saturating_sub(1);
            Some(delta)
        }
        _ => None,
    };
    Sample {
        iterations,
        ticks: end.wrapping_sub(start),
        blocked_ticks: ns_to_ticks(
            blocked_after.saturating_sub(blocked_before),
            time::tsc_khz(),
        ),
        exits,
    }
}

/// [`run`] without a tail, for an operation whose waiting is work
/// done elsewhere (the peer domain of `event_pingpong`): the blocked ticks stay in the figure.
/// Returns the sample (with no blocked ticks) and the ticks the vCPU spent blocked.
pub(crate) fn run_counting_blocked(
    warmup: u64,
    iterations: u64,
    op: impl FnMut(),
) -> (Sample, u64) {
    let mut sample = run(warmup, iterations, op, || {});
    let blocked = core::mem::take(&mut sample.blocked_ticks);
    (sample, blocked)
}

/// `total / count` with two decimals, rounded: `Hundredths(12345)` prints `123.45`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hundredths(pub(crate) u64);

impl Hundredths {
    /// `total / count`, to the nearest hundredth (`count` 0 gives 0).
    pub(crate) fn ratio(total: u64, count: u64) -> Hundredths {
        if count == 0 {
            return Hundredths(0);
        }
        let scaled = u128::from(total) * 100;
        let count = u128::from(count);
        Hundredths(((scaled + count / 2) / count) as u64)
    }
}

impl fmt::Display for Hundredths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

/// The operation group of the report and chart (the `group=` value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Group {
    Console,
    Hypercall,
    Cpuid,
    Idle,
    Timer,
    Events,
    Multicall,
    Time,
    Pingpong,
    Smp,
    Smp2,
    Smp4,
}

impl Group {
    /// As the `BENCH` line and `groups=` name it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Group::Console => "console",
            Group::Hypercall => "hypercall",
            Group::Cpuid => "cpuid",
            Group::Idle => "idle",
            Group::Timer => "timer",
            Group::Events => "events",
            Group::Multicall => "multicall",
            Group::Time => "time",
            Group::Pingpong => "pingpong",
            Group::Smp => "smp",
            Group::Smp2 => "smp2",
            Group::Smp4 => "smp4",
        }
    }
}

/// Paravirtual (the ABI) or trapping (an unported kernel's instruction or device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    Pv,
    Trap,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Pv => "pv",
            Path::Trap => "trap",
        }
    }
}

/// What is being measured: the `op=`, `group=` and `path=` of its line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OpInfo {
    pub(crate) name: &'static str,
    pub(crate) group: Group,
    pub(crate) path: Path,
}

/// Prints the machine-readable line of a measured operation:
/// `BENCH op=<name> group=<group> path=<pv|trap> iterations=<n> tsc_per_op=<x.yy>
/// exits_per_op=<x.yy|->`, plus ` blocked_tsc_per_op=<x.yy>` when the vCPU waited (those
/// ticks are not in `tsc_per_op`) and ` kinds=<kind>:<x.yy>,...`, the exits per operation by
/// kind (the hypervisor summary's names).
pub(crate) fn report(info: OpInfo, sample: &Sample) {
    let tsc = Hundredths::ratio(sample.work_ticks(), sample.iterations);
    let exits = Optional(
        sample
            .exits
            .map(|exits| Hundredths::ratio(exits.total, sample.iterations)),
    );
    let blocked = Hundredths::ratio(sample.blocked_ticks, sample.iterations);
    let blocked = BlockedSuffix((blocked.0 != 0).then_some(blocked));
    let kinds = KindsSuffix {
        exits: sample.exits,
        iterations: sample.iterations,
    };
    println!(
        "BENCH op={} group={} path={} iterations={} tsc_per_op={tsc} exits_per_op={exits}{blocked}{kinds}",
        info.name,
        info.group.name(),
        info.path.name(),
        sample.iterations,
    );
}

/// ` kinds=hypercall:1.00,irq_window:0.01`: the kinds with exits, per operation; nothing
/// without `stats_op` or without exits.
struct KindsSuffix {
    exits: Option<ExitCounters>,
    iterations: u64,
}

impl fmt::Display for KindsSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(exits) = &self.exits else {
            return Ok(());
        };
        let mut separator = " kinds=";
        for (kind, &count) in exits.by_kind.iter().enumerate() {
            if count != 0 {
                let per_op = Hundredths::ratio(count, self.iterations);
                write!(f, "{separator}{}:{per_op}", stats::kind_name(kind))?;
                separator = ",";
            }
        }
        Ok(())
    }
}

/// ` blocked_tsc_per_op=<x.yy>`, or nothing.
struct BlockedSuffix(Option<Hundredths>);

impl fmt::Display for BlockedSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(blocked) => write!(f, " blocked_tsc_per_op={blocked}"),
            None => Ok(()),
        }
    }
}

/// Prints the line of an operation that cannot be measured here, with why.
pub(crate) fn report_skipped(info: OpInfo, why: &str) {
    println!(
        "BENCH op={} group={} path={} iterations=0 tsc_per_op=- exits_per_op=- skipped={why}",
        info.name,
        info.group.name(),
        info.path.name(),
    );
}

/// A value or `-`.
struct Optional<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for Optional<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("-"),
        }
    }
}

//! Scenarios that do more than boot and read the log: they drive the run (gdb at QEMU's stub,
//! input typed into the console, a trace recorded) and check what that gave, besides the
//! serial log's lines as every scenario does.

use std::time::Duration;

use crate::emulator::{self, RunDir, RunExtras, RunRecord, Streaming, Vendor};
use crate::error::Result;
use crate::report::{Judgement, Status};

use super::{Scenario, boot_modules, gdb, input, judge, smp, trace};

/// A scenario with a driver.
pub struct Driven {
    /// Its modules, the result and the lines its serial log must show.
    pub scenario: Scenario,
    /// Where it can run (QEMU alone has a gdb stub).
    pub vendors: &'static [Vendor],
    /// Boots and drives the run; returns the record and the problems its own checks found.
    pub drive: fn(&Driven, &Context<'_>) -> Result<DriveOutcome>,
}

/// What a driver returns: the run's record and the problems its own checks found.
pub type DriveOutcome = (RunRecord, Vec<String>);

/// Where and how long a driven run goes.
pub struct Context<'a> {
    pub vendor: Vendor,
    pub dir: &'a RunDir,
    pub timeout: Duration,
    pub streaming: &'a Streaming,
    /// The machine's CPUs when the scenario does not set them (`--smp`); None: one.
    pub cpus: Option<u16>,
}

pub const DRIVEN: &[Driven] = &[
    gdb::GDB_BREAKPOINTS,
    input::CONSOLE_INPUT,
    trace::TRACE_PING_PONG,
    smp::SMP_BOOT,
    smp::SMP_DOMAINS,
    smp::SAMPLE_GUEST_SMP2,
    smp::SAMPLE_GUEST_SMP4,
    smp::FAIRNESS_2CPUS,
    smp::SMP_STRESS,
    smp::SMP_STRESS_TEARDOWN,
];

/// The driven scenarios whose name contains `filter` (all without a filter).
pub fn select(filter: Option<&str>) -> Vec<&'static Driven> {
    DRIVEN
        .iter()
        .filter(|d| filter.is_none_or(|f| d.scenario.name.contains(f)))
        .collect()
}

impl Driven {
    /// Boots the scenario's modules with `hv_cmdline` and `extras`; `icount`: QEMU's TSC
    /// counts instructions (and idle time passes at once, so not for runs that wait for input).
    pub fn boot(
        &self,
        context: &Context<'_>,
        hv_cmdline: &str,
        icount: bool,
        mut extras: RunExtras,
    ) -> Result<RunRecord> {
        let modules = boot_modules(&self.scenario, context.dir)?;
        extras.cpus = extras.cpus.or(context.cpus);
        emulator::boot(&emulator::Boot {
            vendor: context.vendor,
            dir: context.dir,
            hv_cmdline,
            modules: &modules,
            timeout: context.timeout,
            streaming: context.streaming,
            icount,
            extras,
        })
    }

    /// Runs the scenario: the log judged as any scenario's, plus the driver's own problems.
    pub fn run(&self, context: &Context<'_>) -> (Option<RunRecord>, Judgement) {
        match (self.drive)(self, context) {
            Err(err) => (None, Judgement::new(Status::Error, err.to_string())),
            Ok((record, problems)) => {
                let mut judgement = judge(&self.scenario, &record);
                if !problems.is_empty() && judgement.status == Status::Pass {
                    judgement.status = Status::Fail;
                }
                judgement.problems.extend(problems);
                (Some(record), judgement)
            }
        }
    }
}

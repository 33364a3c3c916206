//! The emulated test scenarios: which modules to boot, and what the serial log must show.
//!
//! Each scenario is plain data; [`judge`] applies it to a finished run. The conformance suite
//! is not listed here: its modules and expectations come from the conformance catalog (see
//! `conformance.rs`).

use std::fs;

use crate::emulator::{RunDir, RunOutcome, RunRecord};
use crate::error::{Context, Result};
use crate::iso::BootModule;
use crate::report::{Judgement, Status};
use crate::serial_log::{HvResult, LinePattern};
use crate::workspace::Artifact;

/// Where a module's bytes come from.
#[derive(Clone, Copy, Debug)]
pub enum ModuleSource {
    /// A binary of the workspace.
    Built(Artifact),
    /// A file xtask writes: `len` copies of `byte` (never a valid ELF).
    Garbage {
        file_name: &'static str,
        len: usize,
        byte: u8,
    },
}

/// One boot module of a scenario.
#[derive(Clone, Copy, Debug)]
pub struct ModuleSpec {
    pub source: ModuleSource,
    pub cmdline: &'static str,
}

/// One emulated scenario.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub name: &'static str,
    /// Boot modules in GRUB order (module indices in the hv's output count from 1).
    pub modules: &'static [ModuleSpec],
    /// The `lamina: result:` line the run must end with.
    pub expect: HvResult,
    /// Each must match some line.
    pub required_lines: &'static [LinePattern],
    /// None may match any line.
    pub forbidden_lines: &'static [LinePattern],
}

/// A hypervisor panic is never a pass.
const NO_PANIC: LinePattern = LinePattern::Contains("lamina: PANIC");

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "sample-guest-powers-off",
        modules: &[ModuleSpec {
            source: ModuleSource::Built(Artifact::SampleGuest),
            cmdline: "sample-guest",
        }],
        expect: HvResult::Success,
        required_lines: &[
            LinePattern::Contains("lamina: domain 1 sample-guest end=poweroff"),
            // The banner, through the console hypercall.
            LinePattern::StartsWithContaining {
                prefix: "(d1) ",
                needle: "Lamina",
            },
            // The emulated UART path.
            LinePattern::Contains("(d1) hello from the trapped UART"),
        ],
        forbidden_lines: &[NO_PANIC],
    },
    Scenario {
        name: "bad-elf-rejected-good-runs",
        modules: &[
            ModuleSpec {
                source: ModuleSource::Garbage {
                    file_name: "bad-elf",
                    len: 4096,
                    byte: 0xab,
                },
                cmdline: "bad-elf",
            },
            // A valid ELF linked at 1 MiB, below the area guests may occupy.
            ModuleSpec {
                source: ModuleSource::Built(Artifact::Hypervisor),
                cmdline: "hv-as-guest",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::SampleGuest),
                cmdline: "sample-guest",
            },
        ],
        // A rejected module makes the whole run a failure, by the protocol.
        expect: HvResult::Failure,
        required_lines: &[
            LinePattern::Contains("lamina: module 1 bad-elf rejected:"),
            LinePattern::Contains("lamina: module 2 hv-as-guest rejected:"),
            // Rejected modules take no domain id: the good guest is still domain 1.
            LinePattern::Contains("lamina: domain 1 sample-guest end=poweroff"),
        ],
        forbidden_lines: &[NO_PANIC],
    },
];

/// The scenarios whose name contains `filter` (all without a filter).
pub fn select(filter: Option<&str>) -> Vec<&'static Scenario> {
    SCENARIOS
        .iter()
        .filter(|s| filter.is_none_or(|f| s.name.contains(f)))
        .collect()
}

/// The scenario's modules as files, writing the generated ones into `dir`.
pub fn boot_modules(scenario: &Scenario, dir: &RunDir) -> Result<Vec<BootModule>> {
    let mut modules = Vec::with_capacity(scenario.modules.len());
    for spec in scenario.modules {
        let path = match spec.source {
            ModuleSource::Built(artifact) => artifact.path(),
            ModuleSource::Garbage {
                file_name,
                len,
                byte,
            } => {
                let path = dir.path.join(file_name);
                fs::write(&path, vec![byte; len])
                    .context(|| format!("writing {}", path.display()))?;
                path
            }
        };
        modules.push(BootModule {
            path,
            cmdline: spec.cmdline.to_string(),
        });
    }
    Ok(modules)
}

/// Holds a finished run against the scenario's expectations.
pub fn judge(scenario: &Scenario, record: &RunRecord) -> Judgement {
    let log = &record.log;
    let mut problems = Vec::new();
    let status = match record.outcome() {
        RunOutcome::Timeout => {
            problems.push(format!(
                "no `lamina: result:` line within {:.0} s",
                record.elapsed.as_secs_f64()
            ));
            Status::Timeout
        }
        RunOutcome::Crash => {
            problems.push(format!("no `lamina: result:` line; {}", record.ending()));
            Status::Crash
        }
        RunOutcome::Success | RunOutcome::Failure => Status::Pass,
    };
    if let Some(result) = log.result()
        && result != scenario.expect
    {
        problems.push(format!(
            "result {}, expected {}",
            result.word(),
            scenario.expect.word()
        ));
    }
    for &pattern in scenario.required_lines {
        if !log.has_line(pattern) {
            problems.push(format!("missing {}", pattern.describe()));
        }
    }
    for &pattern in scenario.forbidden_lines {
        if let Some(line) = log.lines.iter().find(|line| pattern.matches(line)) {
            problems.push(format!("forbidden line: {line}"));
        }
    }
    let status = if status == Status::Pass && !problems.is_empty() {
        Status::Fail
    } else {
        status
    };
    Judgement { status, problems }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::Vendor;
    use crate::serial_log::SerialLog;
    use std::path::PathBuf;
    use std::time::Duration;

    fn record(text: &str, timed_out: bool) -> RunRecord {
        RunRecord {
            vendor: Vendor::Amd,
            dir: RunDir::new(PathBuf::from("/nonexistent")),
            log: SerialLog::from_bytes(text.as_bytes()),
            timed_out,
            elapsed: Duration::from_secs(3),
            time_to_result: None,
            exit_status: None,
        }
    }

    const GOOD_SAMPLE_RUN: &str = "\
lamina: domain 1 sample-guest started mem=16M
(d1) Lamina sample guest, ABI 0.1
(d1) hello from the trapped UART
lamina: summary
lamina: domain 1 sample-guest end=poweroff exits=12 vmcall=10 io=2
lamina: result: success
";

    #[test]
    fn a_complete_sample_run_passes() {
        let judgement = judge(&SCENARIOS[0], &record(GOOD_SAMPLE_RUN, false));
        assert_eq!(judgement.status, Status::Pass, "{:?}", judgement.problems);
    }

    #[test]
    fn missing_lines_and_wrong_result_fail() {
        let text = GOOD_SAMPLE_RUN
            .replace("(d1) hello from the trapped UART\n", "")
            .replace("result: success", "result: failure");
        let judgement = judge(&SCENARIOS[0], &record(&text, false));
        assert_eq!(judgement.status, Status::Fail);
        assert_eq!(judgement.problems.len(), 2, "{:?}", judgement.problems);
    }

    #[test]
    fn no_result_line_is_a_timeout_or_a_crash() {
        let text = "lamina: domain 1 sample-guest started mem=16M\n";
        assert_eq!(
            judge(&SCENARIOS[0], &record(text, true)).status,
            Status::Timeout
        );
        assert_eq!(
            judge(&SCENARIOS[0], &record(text, false)).status,
            Status::Crash
        );
    }

    #[test]
    fn a_panic_fails_even_with_the_expected_result() {
        let text = format!("lamina: PANIC #PF at rip=0x1234\n{GOOD_SAMPLE_RUN}");
        assert_eq!(
            judge(&SCENARIOS[0], &record(&text, false)).status,
            Status::Fail
        );
    }

    #[test]
    fn filter_selects_by_substring() {
        assert_eq!(select(Some("bad-elf")).len(), 1);
        assert_eq!(select(None).len(), SCENARIOS.len());
        assert!(select(Some("nothing-like-this")).is_empty());
    }
}

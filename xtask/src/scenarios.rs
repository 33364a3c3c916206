//! The emulated test scenarios: which modules to boot, and what the serial log must show.
//!
//! Each scenario is plain data; [`judge`] applies it to a finished run. The conformance suite
//! is not listed here: its modules and expectations come from the conformance catalog (see
//! `conformance.rs`).

mod domains;
pub mod driven;
mod gdb;
mod hog;
mod input;
pub mod out_of_tree;
mod smp;
mod trace;

use std::fs;

use crate::emulator::{RunDir, RunOutcome, RunRecord};
use crate::error::{Context, Result};
use crate::iso::BootModule;
use crate::report::{Judgement, Status};
use crate::serial_log::SerialLog;
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
    /// A well-formed x86-64 executable whose one segment lies below `KERNEL_MIN_GPA` (1 MiB),
    /// which docs/abi.md 4.2 forbids, see [`elf_below_kernel_area`].
    ElfBelowKernelArea { file_name: &'static str },
}

/// Where [`elf_below_kernel_area`] puts its segment: low memory, where the boot structures live.
const LOW_SEGMENT_GPA: u64 = 0x8000;

/// A minimal valid ELF64 `ET_EXEC` for x86-64: one `PT_LOAD` (read + execute) at
/// [`LOW_SEGMENT_GPA`] covering the whole file, entry on a `hlt; jmp` loop inside it. Everything
/// about it is right except where it wants to be loaded.
pub fn elf_below_kernel_area() -> Vec<u8> {
    const EHDR_SIZE: u16 = 64;
    const PHDR_SIZE: u16 = 56;
    const CODE: [u8; 3] = [0xf4, 0xeb, 0xfd]; // hlt; jmp back to hlt
    let code_offset = u64::from(EHDR_SIZE + PHDR_SIZE);
    let file_len = code_offset + CODE.len() as u64;

    let mut elf = Vec::with_capacity(file_len as usize);
    // e_ident: magic, ELFCLASS64, little endian, version 1, System V ABI, padding.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&(LOW_SEGMENT_GPA + code_offset).to_le_bytes()); // e_entry
    elf.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
    for half in [EHDR_SIZE, PHDR_SIZE, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R + X
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&LOW_SEGMENT_GPA.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOW_SEGMENT_GPA.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&file_len.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&file_len.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(&CODE);
    elf
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
    /// A check of the whole log beyond line patterns.
    pub check: Option<LogCheck>,
}

/// A check of a whole serial log: `Ok(report)` or `Err(problem)`.
pub type LogCheck = fn(&SerialLog) -> std::result::Result<String, String>;

/// A hypervisor panic is never a pass.
const NO_PANIC: LinePattern = LinePattern::Contains("lamina: PANIC");

/// What sample-guest's kernel computes, identical whichever operation groups it uses.
const SAMPLE_GUEST_RESULTS: &str =
    "(d1) sample-guest: results: ticks=20 counter=21 fibonacci=11:89 cpu-probes=6/6 reports=5";

/// The fairness scenario's domains: (name, weight); they spin over the same interval.
const FAIRNESS_DOMAINS: [(&str, u32); 3] = [("w100", 100), ("w200", 200), ("w400", 400)];
/// How far a domain's CPU share may be from its weight's share (relative).
const FAIRNESS_TOLERANCE: f64 = 0.10;

/// CPU time shares of the spinning domains (`cpu_ms=` of the summary) against their weights.
fn check_fair_shares(log: &SerialLog) -> std::result::Result<String, String> {
    fair_shares(log, &FAIRNESS_DOMAINS)
}

/// The napping domain's CPU share beside the spinning one against their weights.
fn check_napper_share(log: &SerialLog) -> std::result::Result<String, String> {
    fair_shares(log, &[("spinner", 100), ("napper", 200)])
}

/// Whether each of `domains` (name, weight) had its weight's share of the CPU time they all
/// had, within [`FAIRNESS_TOLERANCE`], from the summary's `cpu_ms=`.
pub(crate) fn fair_shares(
    log: &SerialLog,
    domains: &[(&str, u32)],
) -> std::result::Result<String, String> {
    let mut cpu_ms = Vec::new();
    for (name, _) in domains {
        let needle = format!(" {name} end=poweroff cpu_ms=");
        let value = log
            .lines
            .iter()
            .find_map(|line| line.split_once(&needle).map(|(_, rest)| rest.to_string()))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
            .ok_or_else(|| format!("no summary line with cpu_ms= for {name}"))?;
        cpu_ms.push(value);
    }
    let total: f64 = cpu_ms.iter().sum();
    let weights: f64 = domains.iter().map(|(_, w)| f64::from(*w)).sum();
    let mut report = Vec::new();
    let mut worst: f64 = 0.0;
    for ((name, weight), ms) in domains.iter().zip(&cpu_ms) {
        let share = ms / total;
        let ideal = f64::from(*weight) / weights;
        worst = worst.max((share - ideal).abs() / ideal);
        report.push(format!(
            "{name} {:.1}% (ideal {:.1}%)",
            share * 100.0,
            ideal * 100.0
        ));
    }
    let report = format!(
        "CPU shares {} over {total:.0} ms; worst {:.1}% off",
        report.join(", "),
        worst * 100.0
    );
    if worst <= FAIRNESS_TOLERANCE {
        Ok(report)
    } else {
        Err(report)
    }
}

/// A `sample-domains` role reporting a check that failed (`<role>: error: ...`).
const PING_ERROR: LinePattern = LinePattern::Contains("ping: error:");
const PONG_ERROR: LinePattern = LinePattern::Contains("pong: error:");
const SNOOP_ERROR: LinePattern = LinePattern::Contains("snoop: error:");
const CONTROL_ERROR: LinePattern = LinePattern::Contains("control: error:");
const WORKER_ERROR: LinePattern = LinePattern::Contains("worker: error:");
const HOG_ERROR: LinePattern = LinePattern::Contains("hog: error:");
const NEIGHBOUR_ERROR: LinePattern = LinePattern::Contains("neighbour: error:");
const QUIET_ERROR: LinePattern = LinePattern::Contains("quiet: error:");
const PARTNER_ERROR: LinePattern = LinePattern::Contains("partner: error:");

/// `resource-hog`: the neighbour (1), its ping-pong partner (2), the quiet domain (3) and the
/// hog (4), all of one weight, with the same phases.
const RESOURCE_HOG_MODULES: [ModuleSpec; 4] = [
    ModuleSpec {
        source: ModuleSource::Built(Artifact::SampleDomains),
        cmdline: "neighbour role=neighbour partner=2 start_ms=100 phase_ms=600 gap_ms=20 mem=4M",
    },
    ModuleSpec {
        source: ModuleSource::Built(Artifact::SampleDomains),
        cmdline: "partner role=partner peer=1 start_ms=100 phase_ms=600 gap_ms=20 mem=4M",
    },
    ModuleSpec {
        source: ModuleSource::Built(Artifact::SampleDomains),
        cmdline: "quiet role=quiet start_ms=100 phase_ms=600 gap_ms=20 mem=4M",
    },
    ModuleSpec {
        source: ModuleSource::Built(Artifact::SampleDomains),
        cmdline: "hog role=hog peer=1 vcpus=2 start_ms=100 phase_ms=600 gap_ms=20 mem=4M",
    },
];

/// The ping/pong pair of `sample-domains` as domains 1 and 2, ping with `ping_cmdline`.
const fn ping_pong_pair(ping_cmdline: &'static str) -> [ModuleSpec; 2] {
    [
        ModuleSpec {
            source: ModuleSource::Built(Artifact::SampleDomains),
            cmdline: ping_cmdline,
        },
        ModuleSpec {
            source: ModuleSource::Built(Artifact::SampleDomains),
            cmdline: "pong role=pong peer=1 mem=4M",
        },
    ]
}

const PING_PONG_MODULES: [ModuleSpec; 2] =
    ping_pong_pair("ping role=ping peer=2 messages=10000 mem=4M");

const GRANT_REQUIRED_MODULES: [ModuleSpec; 3] = {
    let [ping, pong] = ping_pong_pair("ping role=ping peer=2 messages=2000 mem=4M");
    [
        ping,
        pong,
        ModuleSpec {
            source: ModuleSource::Built(Artifact::SampleDomains),
            cmdline: "snoop role=snoop peer=1 mem=4M",
        },
    ]
};

const CRASH_CONTAINED_MODULES: [ModuleSpec; 2] =
    ping_pong_pair("ping role=ping peer=2 messages=5000 crash_after=500 mem=4M");

const CONTROL_OPS_MODULES: [ModuleSpec; 2] = [
    ModuleSpec {
        source: ModuleSource::Built(Artifact::SampleDomains),
        cmdline: "control role=control privileged=1 worker=2 mem=4M",
    },
    ModuleSpec {
        source: ModuleSource::Built(Artifact::SampleDomains),
        cmdline: "worker role=worker peer=1 mem=4M",
    },
];

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
            // The kernel's work, paravirtual: the same line as in native mode below.
            LinePattern::Contains("(d1) sample-guest: mode=pv "),
            LinePattern::Contains(SAMPLE_GUEST_RESULTS),
        ],
        forbidden_lines: &[NO_PANIC],
        check: None,
    },
    Scenario {
        name: "sample-guest-native-ops",
        modules: &[ModuleSpec {
            source: ModuleSource::Built(Artifact::SampleGuest),
            cmdline: "sample-guest ops=native",
        }],
        expect: HvResult::Success,
        required_lines: &[
            LinePattern::Contains("lamina: domain 1 sample-guest end=poweroff"),
            // Every operation group trapping: UART, HLT, x2APIC timer and EOI, TSC, CPUID.
            LinePattern::Contains("(d1) sample-guest: mode=native "),
            LinePattern::Contains(SAMPLE_GUEST_RESULTS),
        ],
        forbidden_lines: &[NO_PANIC],
        check: None,
    },
    Scenario {
        name: "fairness-by-weight",
        modules: &[
            ModuleSpec {
                source: ModuleSource::Built(Artifact::Bench),
                cmdline: "w100 weight=100 spin_until_ms=1500 mem=4M",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::Bench),
                cmdline: "w200 weight=200 spin_until_ms=1500 mem=4M",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::Bench),
                cmdline: "w400 weight=400 spin_until_ms=1500 mem=4M",
            },
        ],
        expect: HvResult::Success,
        required_lines: &[LinePattern::Contains("(d3) spin: ")],
        forbidden_lines: &[NO_PANIC],
        check: Some(check_fair_shares),
    },
    Scenario {
        // A domain that naps 10 us after every 300 us of work wakes hundreds of times a
        // second; each wake-up may keep up to a slice of what it was owed, never more
        // (docs/abi.md 3.3): it gets its weight's share beside a spinning domain, neither
        // a fraction of it (clamped to the spinner at each wake-up) nor more.
        name: "fairness-napper",
        modules: &[
            ModuleSpec {
                source: ModuleSource::Built(Artifact::Bench),
                cmdline: "spinner weight=100 spin_until_ms=1500 mem=4M",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::Bench),
                cmdline: "napper weight=200 spin_until_ms=1500 nap_us=10 nap_every_us=300 mem=4M",
            },
        ],
        expect: HvResult::Success,
        required_lines: &[LinePattern::Contains("(d2) spin: ")],
        forbidden_lines: &[NO_PANIC],
        check: Some(check_napper_share),
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
            // A valid ELF that must not be loaded. (Not the hv's own ELF: it is linked at
            // 1 MiB = KERNEL_MIN_GPA and fits a 16 MiB domain, so the hv rightly accepts it.)
            ModuleSpec {
                source: ModuleSource::ElfBelowKernelArea {
                    file_name: "elf-below-kernel-area",
                },
                cmdline: "elf-below-kernel-area",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::SampleGuest),
                cmdline: "sample-guest",
            },
            // A good kernel with a command line the hv refuses: more vCPUs than a domain can have.
            ModuleSpec {
                source: ModuleSource::Built(Artifact::SampleGuest),
                cmdline: "nine-vcpus vcpus=9",
            },
            // A name longer than StartInfo holds is refused, not cut.
            ModuleSpec {
                source: ModuleSource::Built(Artifact::SampleGuest),
                cmdline: "name-longer-than-thirty-one-bytes",
            },
        ],
        // A rejected module makes the whole run a failure, by the protocol.
        expect: HvResult::Failure,
        required_lines: &[
            LinePattern::Contains("lamina: module 1 bad-elf rejected:"),
            LinePattern::Contains("lamina: module 2 elf-below-kernel-area rejected:"),
            LinePattern::Contains(
                "lamina: module 4 nine-vcpus rejected: vcpus= is not a number from 1 to 8",
            ),
            LinePattern::Contains(
                "lamina: module 5 name-longer-than-thirty-one-bytes rejected: the domain name is 33 bytes long, more than 31",
            ),
            // Rejected modules take no domain id: the good guest is still domain 1.
            LinePattern::Contains("lamina: domain 1 sample-guest end=poweroff"),
        ],
        forbidden_lines: &[NO_PANIC],
        check: None,
    },
    Scenario {
        name: "ping-pong-grant",
        modules: &PING_PONG_MODULES,
        expect: HvResult::Success,
        required_lines: &[
            LinePattern::Contains("(d1) ping: pong connected; sending 10000 messages"),
            LinePattern::Contains("(d2) pong: mapped domain 1's grant 0 at 0x40000000"),
            LinePattern::Contains("(d1) ping: grant ended, port closed; powering off"),
            LinePattern::Contains("(d2) pong: unmapped; ping ended its grant and closed its port"),
            LinePattern::Contains("lamina: domain 1 ping end=poweroff"),
            LinePattern::Contains("lamina: domain 2 pong end=poweroff"),
            LinePattern::Contains("lamina: domain 1 ping torn down: "),
            LinePattern::Contains("lamina: domain 2 pong torn down: "),
        ],
        forbidden_lines: &[NO_PANIC, PING_ERROR, PONG_ERROR],
        check: Some(domains::check_ping_pong),
    },
    Scenario {
        name: "grant-required",
        modules: &GRANT_REQUIRED_MODULES,
        // The snoop ends stopped by the hypervisor, which makes the run a failure.
        expect: HvResult::Failure,
        required_lines: &[
            LinePattern::Contains(
                "(d3) snoop: map of grant 0 (granted to another domain), read-only: EPERM",
            ),
            LinePattern::Contains("(d3) snoop: map of grant 17 (never granted): ENOENT"),
            LinePattern::Contains("(d3) snoop: copy from grant 0: EPERM"),
            LinePattern::Contains("(d3) snoop: copy from grant 17 (never granted): ENOENT"),
            LinePattern::Contains("(d3) snoop: 7 of 7 attempts refused"),
            LinePattern::Contains("lamina: domain 3 snoop stopped: "),
            LinePattern::Contains("lamina: domain 3 snoop end=fault"),
            LinePattern::Contains("lamina: domain 1 ping end=poweroff"),
            LinePattern::Contains("lamina: domain 2 pong end=poweroff"),
            LinePattern::Contains("lamina: domain 3 snoop torn down: "),
            LinePattern::Contains("lamina: domain 1 ping torn down: "),
            LinePattern::Contains("lamina: domain 2 pong torn down: "),
        ],
        forbidden_lines: &[NO_PANIC, PING_ERROR, PONG_ERROR, SNOOP_ERROR],
        check: Some(domains::check_grant_required),
    },
    Scenario {
        name: "crash-contained",
        modules: &CRASH_CONTAINED_MODULES,
        // Ping's crash makes the run a failure.
        expect: HvResult::Failure,
        required_lines: &[
            LinePattern::Contains("(d1) ping: crash_after=500: "),
            LinePattern::Contains("(d1) panic: crash_after=500 reached"),
            LinePattern::Contains("lamina: domain 1 ping end=crash"),
            LinePattern::Contains("lamina: domain 1 ping torn down: "),
            LinePattern::Contains("(d2) pong: domain 1 is gone after "),
            LinePattern::Contains(
                "(d2) pong: the mapped page of domain 1 now reads 4096 of 4096 bytes as zero",
            ),
            LinePattern::Contains("(d2) pong: mapping domain 1's grant again: ENOENT"),
            LinePattern::Contains("(d2) pong: unmapped the page"),
            LinePattern::Contains(
                "(d2) pong: still running: 2000 more messages through a ring of its own, 0 errors",
            ),
            LinePattern::Contains("lamina: domain 2 pong end=poweroff"),
            LinePattern::Contains("lamina: domain 2 pong torn down: "),
        ],
        forbidden_lines: &[NO_PANIC, PONG_ERROR],
        check: Some(domains::check_crash_contained),
    },
    Scenario {
        name: "control-ops",
        modules: &CONTROL_OPS_MODULES,
        // A destroyed domain did not power off, which makes the run a failure.
        expect: HvResult::Failure,
        required_lines: &[
            LinePattern::Contains("(d2) worker: domctl refused with EPERM: 6 of 6 operations"),
            LinePattern::Contains("(d1) control: read the worker's console"),
            LinePattern::Contains("(d1) control: paused the worker: state=paused"),
            LinePattern::Contains("(d1) control: unpaused the worker: state="),
            LinePattern::Contains(
                "(d1) control: destroyed the worker: state=shutdown ending=destroyed memory_bytes=0",
            ),
            LinePattern::Contains("lamina: domain 1 control end=poweroff"),
            LinePattern::Contains("lamina: domain 2 worker end=destroyed"),
            LinePattern::Contains("lamina: domain 2 worker torn down: "),
            LinePattern::Contains("lamina: domain 1 control torn down: "),
        ],
        forbidden_lines: &[NO_PANIC, CONTROL_ERROR, WORKER_ERROR],
        check: Some(domains::check_control_ops),
    },
    Scenario {
        name: "resource-hog",
        modules: &RESOURCE_HOG_MODULES,
        expect: HvResult::Success,
        required_lines: &[
            LinePattern::Contains("(d1) neighbour: result: "),
            LinePattern::Contains("(d1) neighbour: pingpong: "),
            LinePattern::Contains("(d1) neighbour: timer: "),
            LinePattern::Contains("(d2) partner: result: "),
            LinePattern::Contains("(d3) quiet: result: "),
            LinePattern::Contains("(d4) hog: result: "),
            LinePattern::Contains("lamina: domain 1 neighbour end=poweroff"),
            LinePattern::Contains("lamina: domain 2 partner end=poweroff"),
            LinePattern::Contains("lamina: domain 3 quiet end=poweroff"),
            LinePattern::Contains("lamina: domain 4 hog end=poweroff"),
        ],
        forbidden_lines: &[
            NO_PANIC,
            HOG_ERROR,
            NEIGHBOUR_ERROR,
            QUIET_ERROR,
            PARTNER_ERROR,
        ],
        check: Some(hog::check_resource_hog),
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
            ModuleSource::ElfBelowKernelArea { file_name } => {
                let path = dir.path.join(file_name);
                fs::write(&path, elf_below_kernel_area())
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
    problems.extend(log.memory_problem());
    for &pattern in scenario.forbidden_lines {
        if let Some(line) = log.lines.iter().find(|line| pattern.matches(line)) {
            problems.push(format!("forbidden line: {line}"));
        }
    }
    if let Some(check) = scenario.check {
        match check(log) {
            Ok(report) => eprintln!(
                "xtask: {} on {}: {report}",
                scenario.name,
                record.vendor.name()
            ),
            Err(problem) => problems.push(problem),
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
(d1) sample-guest: mode=pv (console=pv idle=pv timer=pv time=pv cpu=pv)
(d1) sample-guest: results: ticks=20 counter=21 fibonacci=11:89 cpu-probes=6/6 reports=5
lamina: summary
lamina: domain 1 sample-guest end=poweroff exits=12 vmcall=10 io=2
lamina: memory: 500000 KiB free before domains, 500000 KiB at the end, 0 KiB leaked
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
    fn a_leak_fails_the_run() {
        let text = GOOD_SAMPLE_RUN.replace(
            "500000 KiB at the end, 0 KiB",
            "499996 KiB at the end, 4 KiB",
        );
        let judgement = judge(&SCENARIOS[0], &record(&text, false));
        assert_eq!(judgement.status, Status::Fail);
        assert!(
            judgement.problems[0].contains("leaked 4 KiB"),
            "{:?}",
            judgement.problems
        );
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
    fn the_low_elf_is_well_formed() {
        let elf = elf_below_kernel_area();
        let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]);
        let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!((u16_at(16), u16_at(18)), (2, 0x3e), "ET_EXEC for x86-64");
        assert_eq!(
            (u64_at(32), u16_at(54), u16_at(56)),
            (64, 56, 1),
            "one program header"
        );
        let (vaddr, filesz) = (u64_at(64 + 16), u64_at(64 + 32));
        assert_eq!(filesz, elf.len() as u64, "the segment covers the file");
        assert!(vaddr < 0x10_0000, "below KERNEL_MIN_GPA");
        let entry = u64_at(24);
        assert!((vaddr..vaddr + filesz).contains(&entry));
        assert_eq!(elf[(entry - vaddr) as usize], 0xf4, "entry is the hlt");
    }

    #[test]
    fn filter_selects_by_substring() {
        assert_eq!(select(Some("bad-elf")).len(), 1);
        assert_eq!(select(None).len(), SCENARIOS.len());
        assert!(select(Some("nothing-like-this")).is_empty());
    }
}

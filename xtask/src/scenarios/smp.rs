//! The scenarios of a machine with two CPUs.
//!
//! `smp-boot`: the sample guest alone. The hypervisor must find the second CPU in the MADT,
//! start it, turn its virtualization extension on, wake it with work posted to it
//! (`smp::run_on`, at boot), and run the guest to its power-off.
//!
//! `smp-domains`: what `cargo xtask run --smp 2` boots: the sample guest with two vCPUs (its
//! second brought up by `vcpu_op`, counting primes) beside the ping/pong pair, whose 10,000
//! messages cross a granted page with inter-domain events. Ping is pinned to CPU 0 and pong
//! to CPU 1 (`affinity=`), so every message crosses CPUs. Both CPUs must run vCPUs, each
//! pinned vCPU only on its CPU, every message arrive intact, and nothing leak.
//!
//! `fairness-2cpus`: four CPU-bound domains with weights 1:2:4:4 on two CPUs (the largest
//! share, 4/11 of two CPUs, fits on one CPU, so the weights can hold): each must get its
//! weight's share of the CPU time within 10%, and both CPUs must run vCPUs.

use crate::emulator::{RunExtras, RunRecord, Vendor};
use crate::error::Result;
use crate::serial_log::{HvResult, LinePattern, SerialLog};
use crate::workspace::Artifact;

use super::driven::{Context, Driven};
use super::{ModuleSource, ModuleSpec, NO_PANIC, SAMPLE_GUEST_RESULTS, Scenario};

const CPUS: u16 = 2;

pub const SMP_BOOT: Driven = Driven {
    scenario: Scenario {
        name: "smp-boot",
        modules: &[ModuleSpec {
            source: ModuleSource::Built(Artifact::SampleGuest),
            cmdline: "sample-guest",
        }],
        expect: HvResult::Success,
        required_lines: &[
            LinePattern::Contains("lamina: cpu 0 (APIC id "),
            LinePattern::Contains("lamina: cpu 1 (APIC id "),
            LinePattern::Contains(SAMPLE_GUEST_RESULTS),
            LinePattern::Contains("lamina: domain 1 sample-guest end=poweroff"),
        ],
        forbidden_lines: &[
            NO_PANIC,
            // A CPU not started, not ready, or not running work posted to it (the boot CPU
            // posts some to each at boot) is a warning.
            LinePattern::Contains("[hv] WARN"),
            LinePattern::Contains("cannot enable"),
            LinePattern::Contains("lamina: cpu 2 "),
        ],
        check: None,
    },
    vendors: &Vendor::ALL,
    drive,
};

pub const SMP_DOMAINS: Driven = Driven {
    scenario: Scenario {
        name: "smp-domains",
        modules: &[
            ModuleSpec {
                source: ModuleSource::Built(Artifact::SampleGuest),
                cmdline: "sample-guest vcpus=2",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::SampleDomains),
                cmdline: "ping role=ping peer=3 messages=10000 mem=4M affinity=0",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::SampleDomains),
                cmdline: "pong role=pong peer=2 mem=4M affinity=1",
            },
        ],
        expect: HvResult::Success,
        required_lines: &[
            LinePattern::Contains("lamina: domain 1 sample-guest started mem=16M vcpus=2"),
            LinePattern::Contains("(d1) sample-guest: vCPU 1 (APIC id 1) counted 1941 primes"),
            LinePattern::Contains("(d1) sample-guest: 1 secondary vCPU(s) ran"),
            LinePattern::Contains(SAMPLE_GUEST_RESULTS),
            LinePattern::Contains("(d3) pong: result: messages=10000 errors=0"),
            LinePattern::Contains("(d2) ping: result: messages=10000 errors=0"),
            LinePattern::Contains("lamina: domain 1 sample-guest end=poweroff"),
            // Pinned: ping only on CPU 0, pong only on CPU 1 (`affinity=`).
            LinePattern::Contains("lamina: domain 2 ping started mem=4M affinity=0"),
            LinePattern::Contains("lamina: domain 3 pong started mem=4M affinity=1"),
            LinePattern::Contains("lamina: domain 2 vcpu 0: cpus=0 cpu_ms="),
            LinePattern::Contains("lamina: domain 3 vcpu 0: cpus=1 cpu_ms="),
            LinePattern::Contains(", 0 KiB leaked"),
        ],
        forbidden_lines: &[
            NO_PANIC,
            LinePattern::Contains("[hv] WARN"),
            LinePattern::Contains("[hv] ERROR"),
        ],
        check: None,
    },
    vendors: &Vendor::ALL,
    drive: drive_domains,
};

/// The domains of `fairness-2cpus` and their weights.
const FAIRNESS_2CPUS_DOMAINS: [(&str, u32); 4] =
    [("a100", 100), ("b200", 200), ("c400", 400), ("d400", 400)];

pub const FAIRNESS_2CPUS: Driven = Driven {
    scenario: Scenario {
        name: "fairness-2cpus",
        modules: &[
            ModuleSpec {
                source: ModuleSource::Built(Artifact::Bench),
                cmdline: "a100 weight=100 spin_until_ms=1500 mem=4M",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::Bench),
                cmdline: "b200 weight=200 spin_until_ms=1500 mem=4M",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::Bench),
                cmdline: "c400 weight=400 spin_until_ms=1500 mem=4M",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::Bench),
                cmdline: "d400 weight=400 spin_until_ms=1500 mem=4M",
            },
        ],
        expect: HvResult::Success,
        required_lines: &[LinePattern::Contains("(d4) spin: ")],
        forbidden_lines: &[NO_PANIC, LinePattern::Contains("[hv] WARN")],
        check: Some(check_fair_shares_2cpus),
    },
    vendors: &Vendor::ALL,
    drive: drive_domains,
};

fn check_fair_shares_2cpus(log: &SerialLog) -> std::result::Result<String, String> {
    super::fair_shares(log, &FAIRNESS_2CPUS_DOMAINS)
}

fn drive_domains(driven: &Driven, context: &Context<'_>) -> Result<(RunRecord, Vec<String>)> {
    let extras = RunExtras {
        cpus: Some(CPUS),
        ..RunExtras::default()
    };
    let record = driven.boot(context, "", true, extras)?;
    let mut problems = check(&record.log, context.vendor);
    problems.extend(every_cpu_ran_vcpus(&record.log));
    Ok((record, problems))
}

/// The summary's `lamina: cpu N: S slices, ...` line of every CPU shows slices run.
fn every_cpu_ran_vcpus(log: &SerialLog) -> Vec<String> {
    (0..CPUS)
        .filter_map(|cpu| {
            let prefix = format!("lamina: cpu {cpu}: ");
            let slices = log.lines.iter().find_map(|l| {
                l.strip_prefix(&prefix)?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            });
            match slices {
                Some(n) if n > 0 => None,
                Some(_) => Some(format!("cpu {cpu} ran no vCPU")),
                None => Some(format!("no `{prefix}<slices> slices` line in the summary")),
            }
        })
        .collect()
}

fn drive(driven: &Driven, context: &Context<'_>) -> Result<(RunRecord, Vec<String>)> {
    let extras = RunExtras {
        cpus: Some(CPUS),
        ..RunExtras::default()
    };
    let record = driven.boot(context, "", true, extras)?;
    let problems = check(&record.log, context.vendor);
    Ok((record, problems))
}

/// Each CPU online once, and the second one with the vendor's extension on.
fn check(log: &SerialLog, vendor: Vendor) -> Vec<String> {
    let extension = match vendor {
        Vendor::Amd => "AMD-V",
        Vendor::Intel => "Intel VT-x",
    };
    let mut problems = Vec::new();
    for cpu in 0..CPUS {
        let online = format!("lamina: cpu {cpu} (APIC id ");
        let count = log.lines.iter().filter(|l| l.contains(&online)).count();
        if count != 1 {
            problems.push(format!("{count} lines `{online}...) online`, expected 1"));
        }
    }
    let on = format!("lamina: cpu 1: {extension} on");
    if !log.lines.iter().any(|l| l.contains(&on)) {
        problems.push(format!("no line `{on}`"));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_cpus_online_and_the_extension_on() {
        let good = SerialLog::from_bytes(
            b"lamina: cpu 0 (APIC id 0) online\nlamina: cpu 1 (APIC id 1) online\nlamina: cpu 1: AMD-V on\n",
        );
        assert!(check(&good, Vendor::Amd).is_empty());
        assert_eq!(check(&good, Vendor::Intel).len(), 1, "wrong vendor's line");
        let one_cpu = SerialLog::from_bytes(b"lamina: cpu 0 (APIC id 0) online\n");
        assert_eq!(check(&one_cpu, Vendor::Amd).len(), 2);
    }

    #[test]
    fn every_cpu_must_have_run_slices() {
        let both = SerialLog::from_bytes(
            b"lamina: cpu 0: 12 slices, 3 ms running vCPUs\nlamina: cpu 1: 7 slices, 2 ms running vCPUs\n",
        );
        assert!(every_cpu_ran_vcpus(&both).is_empty());
        let idle = SerialLog::from_bytes(
            b"lamina: cpu 0: 12 slices, 3 ms running vCPUs\nlamina: cpu 1: 0 slices, 0 ms running vCPUs\n",
        );
        assert_eq!(every_cpu_ran_vcpus(&idle), ["cpu 1 ran no vCPU"]);
        let none = SerialLog::from_bytes(b"lamina: cpu 0: 12 slices, 3 ms running vCPUs\n");
        assert_eq!(every_cpu_ran_vcpus(&none).len(), 1);
    }
}

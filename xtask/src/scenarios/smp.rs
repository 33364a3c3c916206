//! The scenarios of a machine with two CPUs.
//!
//! `smp-boot`: the sample guest alone. The hypervisor must find the second CPU in the MADT,
//! start it, turn its virtualization extension on, wake it with work posted to it
//! (`smp::run_on`, at boot), and run the guest to its power-off.
//!
//! `smp-domains`: what `cargo xtask run --smp 2` boots: the sample guest with two vCPUs (its
//! SMP part paravirtual: the second brought up by `vcpu_op`, work moved by IPI, a contended
//! lock, a shootdown) beside the ping/pong pair, whose 10,000
//! messages cross a granted page with inter-domain events. Ping is pinned to CPU 0 and pong
//! to CPU 1 (`affinity=`), so every message crosses CPUs. Both CPUs must run vCPUs, each
//! pinned vCPU only on its CPU, every message arrive intact, and nothing leak.
//!
//! `sample-guest-smp2`, `sample-guest-smp4`: the sample guest with 2 and 4 vCPUs twice in one
//! boot, paravirtual (domain 1) and native (domain 2, `ops=native`): both must print the same
//! `smp results` line, the one below, so the smp group's two backends (x2APIC IPIs,
//! INIT-SIPI-SIPI and the shootdown by IPI against send_ipi, vcpu_op and flush_tlb) give one
//! kernel the same results; no stale translation after a shootdown, nothing leaked.
//!
//! `fairness-2cpus`: four CPU-bound domains with weights 1:2:4:4 on two CPUs (the largest
//! share, 4/11 of two CPUs, fits on one CPU, so the weights can hold): each must get its
//! weight's share of the CPU time within 10%, and both CPUs must run vCPUs.
//!
//! `smp-stress`: two `stress` domains of `sample-domains` with two vCPUs each; every vCPU of
//! both is client and server of its lane at once, so four vCPUs on two CPUs hammer the same
//! inter-domain channels, grants (grant_access, map, copy both ways, unmap, end_access) and
//! multicall batches for [`STRESS_MS`] of guest time. Every message carries its number and
//! checksum and is checked on both sides; each side's rounds must be the other's served, lane
//! by lane; no warning, nothing leaked.
//!
//! `smp-stress-teardown`: a privileged `control` domain destroys a `stress` domain whose two
//! vCPUs are busy with a peer's two (on both CPUs) once it is under way on every lane. The
//! hypervisor must stop both vCPUs, revoke and unmap, scrub and give all memory back; the
//! survivor sees its peer's ports unbound and its mailbox turned to zeros, ends its own
//! grants at once, says so and powers off, as does the control domain.

use std::time::Duration;

use crate::emulator::{RunExtras, RunRecord, Vendor};
use crate::error::Result;
use crate::serial_log::{HvResult, LinePattern, SerialLog};
use crate::workspace::Artifact;

use super::driven::{Context, Driven};
use super::{ModuleSource, ModuleSpec, NO_PANIC, SAMPLE_GUEST_RESULTS, Scenario};

const CPUS: u16 = 2;

/// Guest time the stress pair's clients send for (`ms=`), unless they sent `rounds=2000`
/// requests each first: without `-icount`, QEMU's guest time can run much slower than the
/// wall clock on a loaded machine (once 3 s of it took 45 s), and the bound keeps such a run
/// short (Bochs, slower, stops at the time).
const STRESS_MS: u32 = 3000;
/// Rounds each lane must at least complete in that time, for the run to count as a stress.
const STRESS_MIN_ROUNDS: u64 = 100;

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
            LinePattern::Contains(
                "(d1) sample-guest: smp: vCPUs 1-1 started by vcpu_op initialise and up",
            ),
            LinePattern::Contains(SMP_RESULTS_2_D1),
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

/// The sample guest's SMP results with 2 vCPUs (sample-guest/src/smp), in every mode.
const SMP_RESULTS_2: &str = "sample-guest: smp results: vcpus=2 stages=8,8 forwards=12 checksum=0x6692ca276b50e232 locked-increments=2000/2000 shootdowns=2 stale-reads=0";
/// The same with 4 vCPUs.
const SMP_RESULTS_4: &str = "sample-guest: smp results: vcpus=4 stages=16,16,16,16 forwards=56 checksum=0x6a1788ee112c9acc locked-increments=4000/4000 shootdowns=2 stale-reads=0";
const SMP_RESULTS_2_D1: &str = "(d1) sample-guest: smp results: vcpus=2 stages=8,8 forwards=12 checksum=0x6692ca276b50e232 locked-increments=2000/2000 shootdowns=2 stale-reads=0";

/// The sample guest with `vcpus` vCPUs, paravirtual (domain 1) and native (domain 2).
const fn sample_smp(
    name: &'static str,
    modules: &'static [ModuleSpec; 2],
    check: fn(&SerialLog) -> std::result::Result<String, String>,
) -> Driven {
    Driven {
        scenario: Scenario {
            name,
            modules,
            expect: HvResult::Success,
            required_lines: &[
                LinePattern::Contains("(d1) sample-guest: mode=pv "),
                LinePattern::Contains("(d2) sample-guest: mode=native "),
                LinePattern::Contains("started by vcpu_op initialise and up"),
                LinePattern::Contains("started by INIT-SIPI-SIPI"),
                LinePattern::Contains(SAMPLE_GUEST_RESULTS),
                LinePattern::Contains("lamina: domain 1 sample-guest end=poweroff"),
                LinePattern::Contains("lamina: domain 2 sample-native end=poweroff"),
                LinePattern::Contains(", 0 KiB leaked"),
            ],
            forbidden_lines: &[
                NO_PANIC,
                LinePattern::Contains("[hv] WARN"),
                LinePattern::Contains("[hv] ERROR"),
                LinePattern::Contains("sample-guest: error"),
            ],
            check: Some(check),
        },
        vendors: &Vendor::ALL,
        drive: drive_domains,
    }
}

pub const SAMPLE_GUEST_SMP2: Driven = sample_smp(
    "sample-guest-smp2",
    &[
        ModuleSpec {
            source: ModuleSource::Built(Artifact::SampleGuest),
            cmdline: "sample-guest vcpus=2",
        },
        ModuleSpec {
            source: ModuleSource::Built(Artifact::SampleGuest),
            cmdline: "sample-native vcpus=2 ops=native",
        },
    ],
    check_smp_results_2,
);

pub const SAMPLE_GUEST_SMP4: Driven = sample_smp(
    "sample-guest-smp4",
    &[
        ModuleSpec {
            source: ModuleSource::Built(Artifact::SampleGuest),
            cmdline: "sample-guest vcpus=4",
        },
        ModuleSpec {
            source: ModuleSource::Built(Artifact::SampleGuest),
            cmdline: "sample-native vcpus=4 ops=native",
        },
    ],
    check_smp_results_4,
);

fn check_smp_results_2(log: &SerialLog) -> std::result::Result<String, String> {
    same_smp_results(log, SMP_RESULTS_2)
}

fn check_smp_results_4(log: &SerialLog) -> std::result::Result<String, String> {
    same_smp_results(log, SMP_RESULTS_4)
}

/// Domains 1 (paravirtual) and 2 (native) each print `expected` as their one `smp results`
/// line.
fn same_smp_results(log: &SerialLog, expected: &str) -> std::result::Result<String, String> {
    let results = |domain: u32| -> Vec<&str> {
        let prefix = format!("(d{domain}) ");
        log.lines
            .iter()
            .filter_map(|line| line.strip_prefix(&prefix))
            .filter(|rest| rest.starts_with("sample-guest: smp results:"))
            .collect()
    };
    let (pv, native) = (results(1), results(2));
    if pv != [expected] || native != [expected] {
        return Err(format!(
            "smp results: paravirtual {pv:?}, native {native:?}; expected both `{expected}`"
        ));
    }
    Ok("the same smp results line paravirtual and native".to_string())
}

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

pub const SMP_STRESS: Driven = Driven {
    scenario: Scenario {
        name: "smp-stress",
        modules: &[
            ModuleSpec {
                source: ModuleSource::Built(Artifact::SampleDomains),
                cmdline: "stress-a role=stress peer=2 vcpus=2 ms=3000 rounds=2000 mem=4M",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::SampleDomains),
                cmdline: "stress-b role=stress peer=1 vcpus=2 ms=3000 rounds=2000 mem=4M",
            },
        ],
        expect: HvResult::Success,
        required_lines: &[
            LinePattern::StartsWithContaining {
                prefix: "(d1) stress: result: lanes=2 ",
                needle: " errors=0 ",
            },
            LinePattern::StartsWithContaining {
                prefix: "(d2) stress: result: lanes=2 ",
                needle: " errors=0 ",
            },
            LinePattern::Contains("lamina: domain 1 stress-a end=poweroff"),
            LinePattern::Contains("lamina: domain 2 stress-b end=poweroff"),
            LinePattern::Contains(", 0 KiB leaked"),
        ],
        forbidden_lines: &[
            NO_PANIC,
            LinePattern::Contains("[hv] WARN"),
            LinePattern::Contains("[hv] ERROR"),
            LinePattern::Contains("stress: error:"),
        ],
        check: None,
    },
    vendors: &Vendor::ALL,
    drive: drive_stress,
};

pub const SMP_STRESS_TEARDOWN: Driven = Driven {
    scenario: Scenario {
        name: "smp-stress-teardown",
        modules: &[
            ModuleSpec {
                source: ModuleSource::Built(Artifact::SampleDomains),
                cmdline: "control role=control privileged=1 worker=2 mem=4M",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::SampleDomains),
                cmdline: "victim role=stress peer=3 vcpus=2 destroyed=1 ms=30000 mem=4M",
            },
            ModuleSpec {
                source: ModuleSource::Built(Artifact::SampleDomains),
                cmdline: "survivor role=stress peer=2 vcpus=2 peer_dies=1 ms=30000 mem=4M",
            },
        ],
        // A destroyed domain did not power off, which makes the run a failure.
        expect: HvResult::Failure,
        required_lines: &[
            LinePattern::Contains("(d2) stress: under way on every lane"),
            LinePattern::Contains("(d1) control: read the worker's console"),
            LinePattern::Contains("(d1) control: paused the worker: state=paused"),
            LinePattern::Contains(
                "(d1) control: destroyed the worker: state=shutdown ending=destroyed memory_bytes=0",
            ),
            LinePattern::StartsWithContaining {
                prefix: "(d1) control: result: ",
                needle: " failed=0",
            },
            LinePattern::Contains("(d3) stress: domain 2 is gone: "),
            LinePattern::StartsWithContaining {
                prefix: "(d3) stress: result: lanes=2 ",
                needle: " errors=0 ",
            },
            LinePattern::Contains("lamina: domain 1 control end=poweroff"),
            LinePattern::Contains("lamina: domain 2 victim end=destroyed"),
            LinePattern::Contains("lamina: domain 2 victim torn down: "),
            LinePattern::Contains("lamina: domain 3 survivor end=poweroff"),
            LinePattern::Contains(", 0 KiB leaked"),
        ],
        forbidden_lines: &[
            NO_PANIC,
            LinePattern::Contains("[hv] WARN"),
            LinePattern::Contains("[hv] ERROR"),
            LinePattern::Contains("stress: error:"),
            LinePattern::Contains("control: error:"),
            // The victim never gets to its own end.
            LinePattern::Contains("(d2) stress: result:"),
        ],
        check: None,
    },
    vendors: &Vendor::ALL,
    drive: drive_teardown,
};

/// The stress scenarios' timeout: at least [`STRESS_TIMEOUT`], for a loaded machine.
fn patient<'a>(context: &Context<'a>) -> Context<'a> {
    Context {
        vendor: context.vendor,
        dir: context.dir,
        timeout: context.timeout.max(STRESS_TIMEOUT),
        streaming: context.streaming,
        cpus: context.cpus,
    }
}

/// What a stress scenario may take (normally 5 to 50 s).
const STRESS_TIMEOUT: Duration = Duration::from_secs(240);

fn drive_stress(driven: &Driven, context: &Context<'_>) -> Result<(RunRecord, Vec<String>)> {
    let context = &patient(context);
    let extras = RunExtras {
        cpus: Some(CPUS),
        ..RunExtras::default()
    };
    // Without `-icount`, QEMU runs each emulated CPU on a thread of its own: the two CPUs
    // really run at the same time, which is what a stress of the locks wants.
    let record = driven.boot(context, "", false, extras)?;
    let mut problems = check(&record.log, context.vendor);
    problems.extend(every_cpu_ran_vcpus(&record.log));
    problems.extend(stress_counts_agree(&record.log, 1, 2));
    Ok((record, problems))
}

fn drive_teardown(driven: &Driven, context: &Context<'_>) -> Result<(RunRecord, Vec<String>)> {
    let context = &patient(context);
    let extras = RunExtras {
        cpus: Some(CPUS),
        ..RunExtras::default()
    };
    // Both CPUs at the same time, as for `smp-stress`.
    let record = driven.boot(context, "", false, extras)?;
    let mut problems = check(&record.log, context.vendor);
    problems.extend(every_cpu_ran_vcpus(&record.log));
    Ok((record, problems))
}

/// `(d<id>) stress: lane <j>: rounds=<r> served=<s> ...`: (rounds, served) of each lane.
fn stress_lanes(log: &SerialLog, domain: u32) -> Vec<(u64, u64)> {
    let prefix = format!("(d{domain}) stress: lane ");
    log.lines
        .iter()
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(|rest| {
            let value = |key: &str| {
                rest.split(' ')
                    .find_map(|word| word.strip_prefix(key)?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (value("rounds="), value("served="))
        })
        .collect()
}

/// Lane by lane, what each domain sent and had answered is what the other served, and
/// every lane did at least [`STRESS_MIN_ROUNDS`].
fn stress_counts_agree(log: &SerialLog, a: u32, b: u32) -> Vec<String> {
    let (lanes_a, lanes_b) = (stress_lanes(log, a), stress_lanes(log, b));
    if lanes_a.len() != 2 || lanes_b.len() != 2 {
        return vec![format!(
            "expected 2 `stress: lane` lines per domain, found {} and {}",
            lanes_a.len(),
            lanes_b.len()
        )];
    }
    let mut problems = Vec::new();
    for (lane, (&(rounds_a, served_a), &(rounds_b, served_b))) in
        lanes_a.iter().zip(&lanes_b).enumerate()
    {
        if rounds_a != served_b || rounds_b != served_a {
            problems.push(format!(
                "lane {lane}: d{a} rounds={rounds_a} served={served_a}, d{b} rounds={rounds_b} served={served_b}"
            ));
        }
        for (domain, rounds) in [(a, rounds_a), (b, rounds_b)] {
            if rounds < STRESS_MIN_ROUNDS {
                problems.push(format!(
                    "lane {lane} of d{domain}: {rounds} rounds, at least {STRESS_MIN_ROUNDS} expected in {STRESS_MS} ms"
                ));
            }
        }
    }
    problems
}

fn drive_domains(driven: &Driven, context: &Context<'_>) -> Result<(RunRecord, Vec<String>)> {
    let extras = RunExtras {
        cpus: Some(CPUS),
        ..RunExtras::default()
    };
    // Without `-icount`: under it QEMU runs the emulated CPUs in turn on one thread, and in
    // some runs CPU 0 did all 70 ms of this work before CPU 1 had a turn (every one of those
    // runs identical), failing the check below for the emulator's schedule, not the hv's.
    let record = driven.boot(context, "", false, extras)?;
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
    fn both_modes_must_print_the_expected_smp_results() {
        let line = |d: u32, text: &str| format!("(d{d}) {text}\n");
        let good = line(1, SMP_RESULTS_2) + &line(2, SMP_RESULTS_2);
        assert!(check_smp_results_2(&SerialLog::from_bytes(good.as_bytes())).is_ok());
        assert!(check_smp_results_4(&SerialLog::from_bytes(good.as_bytes())).is_err());
        let differ = line(1, SMP_RESULTS_2)
            + &line(2, &SMP_RESULTS_2.replace("stale-reads=0", "stale-reads=1"));
        assert!(check_smp_results_2(&SerialLog::from_bytes(differ.as_bytes())).is_err());
        let one = line(1, SMP_RESULTS_2);
        assert!(check_smp_results_2(&SerialLog::from_bytes(one.as_bytes())).is_err());
        assert!(SMP_RESULTS_2_D1.ends_with(SMP_RESULTS_2));
    }

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
    fn the_stress_pair_runs_for_stress_ms() {
        let ms = format!(" ms={STRESS_MS} ");
        for module in SMP_STRESS.scenario.modules {
            assert!(module.cmdline.contains(&ms), "{}", module.cmdline);
        }
    }

    #[test]
    fn stress_counts_must_agree_lane_by_lane() {
        let good = SerialLog::from_bytes(
            b"(d1) stress: lane 0: rounds=300 served=310 errors=0\n(d1) stress: lane 1: rounds=250 served=260 errors=0\n\
              (d2) stress: lane 0: rounds=310 served=300 errors=0\n(d2) stress: lane 1: rounds=260 served=250 errors=0\n",
        );
        assert!(stress_counts_agree(&good, 1, 2).is_empty());
        let lost = SerialLog::from_bytes(
            b"(d1) stress: lane 0: rounds=300 served=310\n(d1) stress: lane 1: rounds=250 served=260\n\
              (d2) stress: lane 0: rounds=310 served=299\n(d2) stress: lane 1: rounds=260 served=250\n",
        );
        assert_eq!(stress_counts_agree(&lost, 1, 2).len(), 1);
        let few = SerialLog::from_bytes(
            b"(d1) stress: lane 0: rounds=3 served=3\n(d1) stress: lane 1: rounds=250 served=260\n\
              (d2) stress: lane 0: rounds=3 served=3\n(d2) stress: lane 1: rounds=260 served=250\n",
        );
        assert_eq!(
            stress_counts_agree(&few, 1, 2).len(),
            2,
            "both sides of lane 0"
        );
        let one_lane = SerialLog::from_bytes(b"(d1) stress: lane 0: rounds=300 served=300\n");
        assert_eq!(stress_counts_agree(&one_lane, 1, 2).len(), 1);
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

//! `smp-boot`: the sample guest on a machine with two CPUs. The hypervisor must find the
//! second CPU in the MADT, start it, turn its virtualization extension on, wake it with work
//! posted to it (`smp::run_on`, at boot), and still run the guest to its power-off on the boot
//! CPU.

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
}

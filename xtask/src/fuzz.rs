//! `cargo xtask fuzz --host`: the libFuzzer targets of `fuzz/` (the hypervisor's vendor-neutral
//! code on the host), and the `fuzz-host` step of `cargo xtask test`.
//!
//! cargo-fuzz needs a nightly toolchain (sanitizer coverage flags); both are installed when
//! missing (`rustup toolchain install nightly --profile minimal`, `cargo install --locked
//! cargo-fuzz`: about 40 s on a 2-core machine). Every reproducer kept in
//! `fuzz/artifacts/<target>/` is run first, as a regression test; then each target fuzzes for
//! the time asked, from the seed corpus `fuzz/corpus/<target>/`, writing what it learns to
//! `target/lamina/fuzz-corpus/<target>/` (the repository's corpus is only read) and any new
//! finding to `target/lamina/fuzz-findings/<target>/`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::error::{Context, Error, Result, failed};
use crate::serial_log::SerialLog;
use crate::workspace;

/// The step's name in `cargo xtask test` (and for `--filter`).
pub const HOST_STEP: &str = "fuzz-host";

/// Every host target (fuzz/fuzz_targets/<name>.rs).
pub const TARGETS: [&str; 13] = [
    "hypercalls",
    "multicall",
    "grant_table",
    "event_channel",
    "domctl",
    "guest_paging",
    "vlapic_msr",
    "elf_builder",
    "cmdline",
    "control_regs",
    "string_io",
    "xsetbv",
    "entry_checks",
];

/// Seconds per target in `cargo xtask test`.
pub const SUITE_SECONDS: u64 = 5;

/// What one target came to.
pub struct TargetOutcome {
    pub target: &'static str,
    pub passed: bool,
    pub runs: u64,
    pub regressions: usize,
    pub seconds: f64,
}

fn fuzz_dir() -> PathBuf {
    workspace::root().join("fuzz")
}

/// Where the fuzz crate builds: its own target directory below ours.
fn fuzz_target_dir() -> PathBuf {
    workspace::target_dir().join("fuzz-host")
}

/// A rustup `cargo` for the nightly toolchain, without what the `cargo` running xtask put in
/// the environment (which would pin the nested builds to the stable toolchain).
fn nightly_cargo() -> Command {
    let mut command = Command::new("cargo");
    command
        .arg("+nightly")
        .current_dir(fuzz_dir())
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTFLAGS")
        .env("CARGO_TARGET_DIR", fuzz_target_dir());
    command
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs what is missing: a C++ compiler (libfuzzer-sys builds libFuzzer), the nightly
/// toolchain and cargo-fuzz.
fn ensure_tools() -> Result<()> {
    if !succeeds(Command::new("c++").arg("--version")) {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let installed = root && {
            eprintln!("xtask: apt-get install -y g++ (libFuzzer is C++)");
            succeeds(Command::new("apt-get").arg("update"))
                && succeeds(Command::new("apt-get").args(["install", "-y", "g++"]))
        };
        if !installed {
            return Err(Error::MissingTools(
                "host fuzzing builds libFuzzer, which needs a C++ compiler: run \
                 `sudo apt-get install -y g++`"
                    .into(),
            ));
        }
    }
    if !succeeds(nightly_cargo().arg("--version")) {
        let install = ["toolchain", "install", "nightly", "--profile", "minimal"];
        eprintln!("xtask: rustup {}", install.join(" "));
        let status = Command::new("rustup").args(install).status();
        if !status.is_ok_and(|s| s.success()) {
            return Err(Error::MissingTools(format!(
                "host fuzzing needs a nightly toolchain: run `rustup {}`",
                install.join(" ")
            )));
        }
    }
    if !succeeds(nightly_cargo().args(["fuzz", "--version"])) {
        let started = Instant::now();
        eprintln!("xtask: cargo install --locked cargo-fuzz (about 40 s)");
        let status = Command::new("cargo")
            .args(["+nightly", "install", "--locked", "cargo-fuzz"])
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN")
            .status();
        if !status.is_ok_and(|s| s.success()) {
            return Err(Error::MissingTools(
                "host fuzzing needs cargo-fuzz: run `cargo +nightly install --locked cargo-fuzz`"
                    .into(),
            ));
        }
        eprintln!(
            "xtask: cargo-fuzz installed in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn binary(target: &str) -> PathBuf {
    fuzz_target_dir()
        .join("x86_64-unknown-linux-gnu")
        .join("release")
        .join(target)
}

/// The files of a directory (none if it does not exist).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// `cargo xtask fuzz --host`: builds the targets, reruns the kept reproducers, then fuzzes
/// each selected target for `seconds`. `stream`: show libFuzzer's own progress lines.
pub fn host(only: Option<&str>, seconds: u64, stream: bool) -> Result<(bool, Vec<TargetOutcome>)> {
    let targets: Vec<&'static str> = TARGETS
        .into_iter()
        .filter(|t| only.is_none_or(|o| *t == o))
        .collect();
    if targets.is_empty() {
        return Err(failed(format!(
            "no fuzz target {}; the targets are {}",
            only.unwrap_or(""),
            TARGETS.join(", ")
        )));
    }
    ensure_tools()?;
    eprintln!("xtask: building the fuzz targets (cargo +nightly fuzz build -O, in fuzz/)");
    let mut build = nightly_cargo();
    build.args(["fuzz", "build", "-O"]);
    // One target, or (without a name) all of them.
    if let Some(only) = only {
        build.arg(only);
    }
    if !build
        .status()
        .context(|| "starting cargo fuzz build".into())?
        .success()
    {
        return Err(failed("cargo fuzz build failed"));
    }
    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(run_target(target, seconds, stream)?);
    }
    Ok((outcomes.iter().all(|o| o.passed), outcomes))
}

fn run_target(target: &'static str, seconds: u64, stream: bool) -> Result<TargetOutcome> {
    let started = Instant::now();
    let binary = binary(target);
    // Regressions first: every kept reproducer must pass now.
    let reproducers = files_in(&fuzz_dir().join("artifacts").join(target));
    let mut passed = true;
    if !reproducers.is_empty() {
        let status = Command::new(&binary)
            .args(&reproducers)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context(|| format!("starting {}", binary.display()))?;
        if !status.success() {
            eprintln!(
                "xtask: {target}: a kept reproducer fails again; rerun them with\n  {} {}",
                binary.display(),
                fuzz_dir()
                    .join("artifacts")
                    .join(target)
                    .join("*")
                    .display()
            );
            passed = false;
        }
    }
    let scratch = workspace::lamina_dir().join("fuzz-corpus").join(target);
    let findings = workspace::lamina_dir().join("fuzz-findings").join(target);
    for dir in [&scratch, &findings] {
        fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    }
    let seeds = fuzz_dir().join("corpus").join(target);
    let mut command = Command::new(&binary);
    command
        .arg(format!("-max_total_time={seconds}"))
        .arg("-timeout=10")
        .arg("-max_len=1024")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", findings.display()))
        .arg(&scratch);
    if seeds.is_dir() {
        command.arg(&seeds);
    }
    eprintln!(
        "xtask: fuzz {target} for {seconds} s: {} -max_total_time={seconds} ...",
        binary.display()
    );
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context(|| format!("starting {}", binary.display()))?;
    let mut runs = 0;
    let mut report = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
                runs = n.trim().parse().unwrap_or(0);
            }
            if stream && (line.contains("pulse") || line.contains("DONE")) {
                eprintln!("  {target}: {line}");
            }
            if line.contains("panicked") || line.contains("ERROR:") || !report.is_empty() {
                report.push(line);
            }
        }
    }
    let status = child.wait().context(|| format!("waiting for {target}"))?;
    if !status.success() {
        passed = false;
        for line in report.iter().take(20) {
            eprintln!("  {target}: {line}");
        }
        eprintln!(
            "xtask: {target}: FINDING, reproducer in {} (keep it in fuzz/artifacts/{target}/ once fixed)",
            findings.display()
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "xtask: {target}: {} ({runs} runs, {} reproducers, {seconds:.0} s)",
        if passed { "pass" } else { "FAIL" },
        reproducers.len()
    );
    Ok(TargetOutcome {
        target,
        passed,
        runs,
        regressions: reproducers.len(),
        seconds,
    })
}

/// The step's name in `cargo xtask test` for the short guest campaign.
pub const GUEST_STEP: &str = "fuzz-guest";
/// Seeds whose boot was not OK once, one a line (`#` comments): rerun by every campaign.
const GUEST_REGRESSIONS: &str = "fuzz/guest-seeds.txt";
/// The short campaign of `cargo xtask test`, on each vendor.
pub const SUITE_SEEDS: std::ops::RangeInclusive<u64> = 1..=4;
pub const SUITE_OPS: u32 = 10_000;
/// The fuzzer's vCPUs in `cargo xtask test`: a second one throws calls at the same time.
pub const SUITE_VCPUS: u32 = 2;
/// How long the canary checks its memory, in ms of system time.
const CANARY_MS: u64 = 300;
/// Boots of a seed whose emulator dies of a signal before it is classified EMULATOR-CRASH.
const EMULATOR_TRIES: u32 = 3;

/// How one boot of the fuzzer beside the canary ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestClass {
    Ok,
    /// The hypervisor panicked, or the emulator ended without a result line.
    HvCrash,
    /// No result line before the timeout, the canary done: the fuzzer waits or spins for
    /// ever while the others were scheduled (its own business, not a failure).
    Hang,
    /// The canary saw its memory change or time stand still, or did not finish.
    Canary,
    /// The hypervisor's summary reports memory not returned.
    Leak,
    /// The emulator itself died of a signal, with no hypervisor panic in the log, on every
    /// try: an emulator bug, which says nothing of the hypervisor. QEMU 7.2's TCG segfaults
    /// in `cpu_breakpoint_remove_by_ref` now and then when a guest changes its debug
    /// registers on a machine of several CPUs (the fuzzer's MOV to DR7; `--smp 2`).
    EmulatorCrash,
}

impl GuestClass {
    pub const ALL: [GuestClass; 6] = [
        GuestClass::Ok,
        GuestClass::HvCrash,
        GuestClass::Hang,
        GuestClass::Canary,
        GuestClass::Leak,
        GuestClass::EmulatorCrash,
    ];

    pub fn label(self) -> &'static str {
        match self {
            GuestClass::Ok => "OK",
            GuestClass::HvCrash => "HV-CRASH",
            GuestClass::Hang => "HANG",
            GuestClass::Canary => "CANARY",
            GuestClass::Leak => "LEAK",
            GuestClass::EmulatorCrash => "EMULATOR-CRASH",
        }
    }
}

/// How a boot ended: its serial log, whether we killed the emulator at the timeout, and the
/// signal the emulator died of, if it did.
fn classify(log: &SerialLog, timed_out: bool, signal: Option<i32>) -> GuestClass {
    if log.panic_line().is_some() {
        return GuestClass::HvCrash;
    }
    let canary_ok = log.guest_lines(1).any(|l| l.starts_with("canary: ok"));
    if log.result().is_none() {
        return match (timed_out, canary_ok, signal) {
            (true, true, _) => GuestClass::Hang,
            (true, false, _) => GuestClass::Canary,
            // A hypervisor that fails ends the emulator through its exit port or a triple
            // fault (an exit status); a segfault is the emulator's own.
            (false, _, Some(_)) => GuestClass::EmulatorCrash,
            (false, _, None) => GuestClass::HvCrash,
        };
    }
    if !canary_ok {
        return GuestClass::Canary;
    }
    if log.memory_problem().is_some() {
        return GuestClass::Leak;
    }
    GuestClass::Ok
}

fn regression_seeds() -> Vec<u64> {
    let text = fs::read_to_string(workspace::root().join(GUEST_REGRESSIONS)).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split('#').next())
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A guest campaign: what `cargo xtask fuzz` boots.
pub struct GuestCampaign<'a> {
    pub vendors: &'a [crate::emulator::Vendor],
    pub seeds: std::ops::RangeInclusive<u64>,
    /// Operations per boot.
    pub ops: u32,
    /// The fuzzer prints every operation from this one on.
    pub trace_from: Option<u32>,
    /// The fuzzer is privileged, with a second canary to aim domain control at.
    pub privileged: bool,
    /// The fuzzer domain's vCPUs (`vcpus=`): its random `vcpu_op` calls then reach vCPUs
    /// that exist, and may start them anywhere.
    pub vcpus: u32,
    /// The machine's CPUs (None: one).
    pub cpus: Option<u16>,
    /// Wall-clock limit per boot (None: the vendor's default).
    pub timeout: Option<std::time::Duration>,
}

/// `cargo xtask fuzz`: boots the fuzzer guest (`seed=` each seed of `seeds` and every kept
/// regression seed, `ops=`) beside the canary on each vendor, classifies each boot, keeps the
/// seeds that were not OK. Returns whether every boot was OK, and the operations done per
/// vendor.
pub fn guest(campaign: &GuestCampaign<'_>) -> Result<(bool, Vec<(crate::emulator::Vendor, u64)>)> {
    let GuestCampaign {
        vendors,
        ref seeds,
        ops,
        trace_from,
        privileged,
        vcpus,
        cpus,
        timeout,
    } = *campaign;
    let seeds = seeds.clone();
    use crate::emulator::{self, RunDir, RunRequest, Streaming};
    use crate::iso::{self, BootModule};
    use crate::workspace::Artifact;
    crate::tools::ensure(vendors)?;
    crate::build_images::build_images()?;
    let mut all: Vec<u64> = regression_seeds();
    all.extend(seeds.filter(|s| !all.contains(s)).collect::<Vec<_>>());
    let total = all.len() * vendors.len();
    let mut counts = [0usize; GuestClass::ALL.len()];
    let mut failing = Vec::new();
    // Seeds whose emulator died on every try: not kept (the hypervisor showed nothing wrong),
    // but the campaign did not test them, so it does not pass.
    let mut untested = 0;
    let mut per_vendor = Vec::new();
    let mut boot = 0;
    for &vendor in vendors {
        let mut operations = 0u64;
        for &seed in &all {
            boot += 1;
            let dir = RunDir::new(
                workspace::lamina_dir()
                    .join("fuzz-guest")
                    .join(vendor.name())
                    .join(if privileged {
                        format!("{seed}-privileged")
                    } else {
                        seed.to_string()
                    }),
            );
            fs::create_dir_all(&dir.path).context(|| format!("creating {}", dir.path.display()))?;
            let mut modules = vec![
                BootModule {
                    path: Artifact::SampleDomains.path(),
                    cmdline: format!("canary role=canary ms={CANARY_MS} mem=4M"),
                },
                BootModule {
                    path: Artifact::SampleDomains.path(),
                    cmdline: format!(
                        "fuzz role=fuzz seed={seed} ops={ops} mem=4M{}{}{}",
                        if vcpus > 1 {
                            format!(" vcpus={vcpus}")
                        } else {
                            String::new()
                        },
                        trace_from
                            .map(|n| format!(" trace={n}"))
                            .unwrap_or_default(),
                        // Domain control at domain 3 and at itself, never at domain 1, whose
                        // canary still decides the class.
                        if privileged {
                            " privileged=1 protect=1 target=3"
                        } else {
                            ""
                        }
                    ),
                },
            ];
            if privileged {
                modules.push(BootModule {
                    path: Artifact::SampleDomains.path(),
                    cmdline: format!("target role=canary ms={CANARY_MS} mem=4M"),
                });
            }
            iso::build_iso(
                &Artifact::Hypervisor.path(),
                "",
                &modules,
                &dir.staging(),
                &dir.iso(),
            )?;
            // An emulator that dies of a signal is booted again (without -icount the run
            // differs, and the emulator's race rarely strikes twice): the seed is tested, not
            // lost to the emulator's bug.
            let mut tries = 0;
            let (record, class) = loop {
                tries += 1;
                let record = emulator::run_with(
                    &RunRequest {
                        vendor,
                        dir: &dir,
                        timeout: timeout.unwrap_or(vendor.default_timeout()),
                        streaming: &Streaming::Off,
                        icount: false,
                    },
                    &emulator::RunExtras {
                        cpus,
                        ..emulator::RunExtras::default()
                    },
                )?;
                let signal = record.exit_status.and_then(|status| status.signal());
                let class = classify(&record.log, record.timed_out, signal);
                if class != GuestClass::EmulatorCrash || tries == EMULATOR_TRIES {
                    break (record, class);
                }
                eprintln!(
                    "xtask: {} seed {seed}: the emulator died of signal {} (its bug, not the \
                     hypervisor's: no panic in the log); booting it again",
                    vendor.name(),
                    signal.unwrap_or(0)
                );
            };
            let done = record
                .log
                .guest_lines(2)
                .filter_map(|l| {
                    // The fuzzer's own console writes may precede its line.
                    let (_, rest) = l.rsplit_once("fuzz: ")?;
                    let rest = rest.strip_prefix("done, ").unwrap_or(rest);
                    rest.strip_suffix(" operations")?.parse::<u64>().ok()
                })
                .max()
                .unwrap_or(0);
            operations += done;
            // Privileged instructions at CPL 3 that did not fault, and the like: not a class
            // of their own, but never silent.
            let unexpected = record
                .log
                .guest_lines(2)
                .filter(|l| l.contains("fuzz: unexpected:"))
                .count();
            counts[GuestClass::ALL
                .iter()
                .position(|c| *c == class)
                .unwrap_or(0)] += 1;
            match class {
                GuestClass::Ok | GuestClass::Hang => {}
                GuestClass::EmulatorCrash => untested += 1,
                _ => failing.push(seed),
            }
            let so_far: Vec<String> = GuestClass::ALL
                .iter()
                .zip(counts)
                .map(|(c, n)| format!("{} {n}", c.label()))
                .collect();
            eprintln!(
                "xtask: [{boot}/{total}] {} seed {seed}: {}{} (>= {done} operations, {:.1} s; {}; log {})",
                vendor.name(),
                class.label(),
                if unexpected > 0 {
                    format!(", {unexpected} unexpected outcomes (fuzz: unexpected: in the log)")
                } else {
                    String::new()
                },
                record.elapsed.as_secs_f64(),
                so_far.join(", "),
                crate::emulator::show_path(&dir.serial_log())
            );
        }
        per_vendor.push((vendor, operations));
    }
    let kept = regression_seeds();
    let new: Vec<u64> = failing
        .iter()
        .copied()
        .filter(|s| !kept.contains(s))
        .collect();
    if privileged && !new.is_empty() {
        // The kept seeds are rerun unprivileged: these are reported, not kept.
        eprintln!("xtask: privileged seeds {new:?} failed: rerun them with --privileged --seeds");
        return Ok((false, per_vendor));
    }
    if !new.is_empty() {
        let path = workspace::root().join(GUEST_REGRESSIONS);
        let mut text = fs::read_to_string(&path).unwrap_or_default();
        for seed in &new {
            text.push_str(&format!("{seed}\n"));
        }
        fs::write(&path, text).context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "xtask: seeds {new:?} kept in {GUEST_REGRESSIONS} (rerun by every campaign until fixed)"
        );
    }
    if untested > 0 {
        eprintln!(
            "xtask: {untested} boots untested: the emulator died on each of {EMULATOR_TRIES} tries"
        );
    }
    Ok((failing.is_empty() && untested == 0, per_vendor))
}

#[cfg(test)]
mod guest_class_tests {
    use super::*;

    fn log(text: &str) -> SerialLog {
        SerialLog::from_bytes(text.as_bytes())
    }

    const SEGV: Option<i32> = Some(11);

    #[test]
    fn an_emulator_that_dies_of_a_signal_is_its_own_crash_not_the_hypervisors() {
        let cut_off = log("(d1) canary: ok, 6084 checks\n(d2) fuzz: 1000 operations\n");
        assert_eq!(classify(&cut_off, false, SEGV), GuestClass::EmulatorCrash);
        // Ended by an exit status (the hypervisor's exit port, a triple fault with
        // -no-reboot) and no result line: the hypervisor's.
        assert_eq!(classify(&cut_off, false, None), GuestClass::HvCrash);
    }

    #[test]
    fn a_hypervisor_panic_is_a_hypervisor_crash_whatever_the_emulator_died_of() {
        let panicked = log("lamina: PANIC at hv/src/x.rs:1: boom\n");
        assert_eq!(classify(&panicked, false, SEGV), GuestClass::HvCrash);
        assert_eq!(classify(&panicked, false, None), GuestClass::HvCrash);
    }

    #[test]
    fn timeouts_and_finished_boots_keep_their_classes() {
        let waiting = log("(d1) canary: ok, 6084 checks\n");
        assert_eq!(classify(&waiting, true, SEGV), GuestClass::Hang);
        assert_eq!(
            classify(&log("(d2) fuzz: 0 operations\n"), true, None),
            GuestClass::Canary
        );
        let done = "(d1) canary: ok, 6084 checks\nlamina: memory: 509269 KiB free before domains, \
                    509269 KiB at the end, 0 KiB leaked\nlamina: result: success\n";
        assert_eq!(classify(&log(done), false, None), GuestClass::Ok);
    }
}

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
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::error::{Context, Error, Result, failed};
use crate::workspace;

/// The step's name in `cargo xtask test` (and for `--filter`).
pub const HOST_STEP: &str = "fuzz-host";

/// Every host target (fuzz/fuzz_targets/<name>.rs).
pub const TARGETS: [&str; 9] = [
    "hypercalls",
    "multicall",
    "grant_table",
    "event_channel",
    "domctl",
    "guest_paging",
    "vlapic_msr",
    "elf_builder",
    "cmdline",
];

/// Seconds per target in `cargo xtask test`.
pub const SUITE_SECONDS: u64 = 8;

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

//! `out-of-tree-guest`: a kernel crate outside the workspace, built and booted the way its
//! author would, with `cargo run` and `cargo test` in its own directory.
//!
//! `cargo xtask new-guest` writes the crate into `target/lamina/out-of-tree-guest/my-kernel`
//! (afresh, with a target directory of its own, once per `cargo xtask test`); the scenario
//! then changes it the way an existing kernel is: the SDK's features off, its own `_start` on
//! its own stack, its own panic handler, its own IDT (every vector through the SDK's entry
//! stubs) with the paravirtual timer routed through it, its own print macro, COM1 driven by
//! the `uart_16550` crate from crates.io (init and loopback self-test); and a
//! `should_panic` test in `tests/`. Per vendor (`LAMINA_VENDOR`) it runs
//! 1. `cargo run`: the kernel counts 10 timer ticks through its own IDT and powers off; exit 0;
//! 2. `cargo run -- panic=now`: its panic handler reports and crashes; a non-zero exit;
//! 3. `cargo test --test should_panic`: the test panics, which is its success; exit 0.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::emulator::{RunDir, RunRecord, Vendor};
use crate::guest;
use crate::report::{Judgement, Status};
use crate::serial_log::{HvResult, LinePattern, SerialLog};
use crate::workspace;

/// The scenario's name, for `--filter` and the table.
pub const NAME: &str = "out-of-tree-guest";
/// The guest crate's name (and domain name).
const CRATE: &str = "my-kernel";

const MAIN_RS: &str = include_str!("out_of_tree_main.rs.txt");
/// The `uart_16550` dependency: the crate's current release, which initialises COM1 with a
/// loopback self-test (docs/abi.md 7.1 emulates what it needs).
const UART_CRATE: &str = "uart_16550 = \"0.9\"";
const SHOULD_PANIC_RS: &str = include_str!("out_of_tree_should_panic.rs.txt");

/// One `cargo` invocation in the guest's directory and what its run must show.
struct Step {
    name: &'static str,
    cargo_args: &'static [&'static str],
    /// Whether cargo must exit 0 (the kernel powered off) or not (it crashed).
    exit_success: bool,
    expect: HvResult,
    required_lines: &'static [LinePattern],
}

const STEPS: [Step; 3] = [
    Step {
        name: "run",
        cargo_args: &["run"],
        exit_success: true,
        expect: HvResult::Success,
        required_lines: &[
            LinePattern::Contains(
                "(d1) kernel: its own _start: StartInfo of domain 1, command line \"my-kernel\"",
            ),
            LinePattern::Contains(
                "(d1) kernel: a line through the uart_16550 crate, after its loopback test",
            ),
            LinePattern::Contains(
                "timer ticks through its own IDT (vectors [243]); still its own IDT: true; SDK IDT loaded: false",
            ),
            LinePattern::Contains("lamina: domain 1 my-kernel end=poweroff"),
        ],
    },
    Step {
        name: "panic",
        cargo_args: &["run", "--", "panic=now"],
        exit_success: false,
        expect: HvResult::Failure,
        required_lines: &[
            LinePattern::Contains("(d1) kernel: its own panic handler runs"),
            LinePattern::Contains("(d1) panic: asked to panic on the command line at src/main.rs:"),
            LinePattern::Contains("lamina: domain 1 my-kernel end=crash"),
        ],
    },
    Step {
        name: "test",
        cargo_args: &["test", "--test", "should_panic"],
        exit_success: true,
        expect: HvResult::Success,
        required_lines: &[
            LinePattern::Contains(
                "(d1) panic: the test panics on purpose at tests/should_panic.rs:",
            ),
            LinePattern::Contains("(d1) [ok] panicked as it should"),
            LinePattern::Contains("lamina: domain 1 should_panic end=poweroff"),
        ],
    },
];

/// The guest crate, written once per xtask process (both vendors share it and its build).
static PREPARED: Mutex<Option<Result<PathBuf, String>>> = Mutex::new(None);

fn guest_dir() -> PathBuf {
    workspace::lamina_dir().join(NAME).join(CRATE)
}

/// Writes the crate with `new-guest` and changes it (module documentation).
fn write_guest(dir: &Path) -> Result<(), String> {
    if let Some(parent) = dir.parent()
        && parent.exists()
    {
        fs::remove_dir_all(parent)
            .map_err(|err| format!("removing {}: {err}", parent.display()))?;
    }
    guest::new_guest(dir).map_err(|err| err.to_string())?;
    let manifest_path = dir.join("Cargo.toml");
    let manifest = fs::read_to_string(&manifest_path)
        .map_err(|err| format!("reading {}: {err}", manifest_path.display()))?;
    let sdk = format!(
        "lamina-guest-sdk = {{ path = \"{}/guest-sdk\" }}",
        workspace::root().display()
    );
    if !manifest.contains(&sdk) {
        return Err(format!("new-guest's Cargo.toml has no line {sdk}"));
    }
    let own = sdk.replace(" }", ", default-features = false }");
    // The rust-osdev serial driver, from crates.io, as a kernel author adds it.
    let own = format!("{own}\n{UART_CRATE}");
    let manifest =
        manifest.replace(&sdk, &own) + "\n[[test]]\nname = \"should_panic\"\nharness = false\n";
    let files = [
        (manifest_path, manifest),
        (dir.join("src/main.rs"), MAIN_RS.to_string()),
        (
            dir.join("tests/should_panic.rs"),
            SHOULD_PANIC_RS.to_string(),
        ),
    ];
    for (path, contents) in files {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .map_err(|err| format!("creating {}: {err}", parent.display()))?;
        }
        fs::write(&path, contents).map_err(|err| format!("writing {}: {err}", path.display()))?;
    }
    Ok(())
}

fn prepared_guest() -> Result<PathBuf, String> {
    let mut prepared = PREPARED
        .lock()
        .map_err(|_| "a thread preparing the guest crate panicked".to_string())?;
    prepared
        .get_or_insert_with(|| {
            let dir = guest_dir();
            write_guest(&dir).map(|()| dir)
        })
        .clone()
}

/// What one step came to.
struct StepOutcome {
    log: SerialLog,
    status: ExitStatus,
    elapsed: Duration,
    problems: Vec<String>,
}

fn run_step(
    step: &Step,
    guest: &Path,
    vendor: Vendor,
    dir: &RunDir,
    timeout: Option<Duration>,
) -> Result<StepOutcome, String> {
    let run_dir = dir.path.join(step.name);
    fs::create_dir_all(&run_dir).map_err(|err| format!("creating {}: {err}", run_dir.display()))?;
    let serial = RunDir::new(run_dir.clone()).serial_log();
    if serial.exists() {
        fs::remove_file(&serial).map_err(|err| format!("removing {}: {err}", serial.display()))?;
    }
    let output_path = dir.path.join(format!("{}.cargo.out", step.name));
    let output = fs::File::create(&output_path)
        .map_err(|err| format!("creating {}: {err}", output_path.display()))?;
    let output_err = output
        .try_clone()
        .map_err(|err| format!("opening {}: {err}", output_path.display()))?;
    let mut command = guest::guest_cargo(guest);
    command
        .args(step.cargo_args)
        .env(guest::VENDOR_VAR, vendor.name())
        .env(guest::RUN_DIR_VAR, &run_dir)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(output_err);
    if let Some(timeout) = timeout {
        command.env(guest::TIMEOUT_VAR, timeout.as_secs().to_string());
    }
    let started = Instant::now();
    let status = command
        .status()
        .map_err(|err| format!("starting cargo {}: {err}", step.cargo_args.join(" ")))?;
    let elapsed = started.elapsed();
    let shown = crate::emulator::show_path(&output_path);
    let bytes = fs::read(&serial).unwrap_or_default();
    let log = SerialLog::from_bytes(&bytes);
    let mut problems = Vec::new();
    let what = format!("`cargo {}`", step.cargo_args.join(" "));
    if status.success() != step.exit_success {
        let expected = if step.exit_success { "0" } else { "non-zero" };
        problems.push(format!(
            "{what} exited with {status}, expected {expected} (see {shown})"
        ));
    }
    match log.result() {
        Some(result) if result == step.expect => {}
        Some(result) => problems.push(format!(
            "{what}: result {}, expected {}",
            result.word(),
            step.expect.word()
        )),
        None => problems.push(format!("{what}: no `lamina: result:` line (see {shown})")),
    }
    for &pattern in step.required_lines {
        if !log.has_line(pattern) {
            problems.push(format!("{what}: missing {}", pattern.describe()));
        }
    }
    problems.extend(log.memory_problem());
    if let Some(line) = log.panic_line() {
        problems.push(format!("{what}: {line}"));
    }
    Ok(StepOutcome {
        log,
        status,
        elapsed,
        problems,
    })
}

/// Runs the scenario on `vendor` in `dir`; the record is the `cargo run` boot's.
pub fn run(
    vendor: Vendor,
    dir: &RunDir,
    timeout: Option<Duration>,
) -> (Judgement, Option<RunRecord>) {
    let guest = match prepared_guest() {
        Ok(guest) => guest,
        Err(why) => return (Judgement::new(Status::Error, why), None),
    };
    if let Err(err) = fs::create_dir_all(&dir.path) {
        let why = format!("creating {}: {err}", dir.path.display());
        return (Judgement::new(Status::Error, why), None);
    }
    let mut problems = Vec::new();
    let mut record = None;
    let mut elapsed = Duration::ZERO;
    for step in &STEPS {
        match run_step(step, &guest, vendor, dir, timeout) {
            Err(why) => problems.push(why),
            Ok(outcome) => {
                problems.extend(outcome.problems);
                elapsed += outcome.elapsed;
                if record.is_none() {
                    record = Some(RunRecord {
                        vendor,
                        dir: RunDir::new(dir.path.join(step.name)),
                        log: outcome.log,
                        timed_out: false,
                        elapsed,
                        time_to_result: None,
                        exit_status: Some(outcome.status),
                    });
                }
            }
        }
    }
    if let Some(record) = &mut record {
        record.elapsed = elapsed;
    }
    let judgement = if problems.is_empty() {
        Judgement::pass()
    } else {
        Judgement {
            status: Status::Fail,
            problems,
        }
    };
    (judgement, record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_changed_kernel_turns_the_sdk_features_off_in_its_source_too() {
        // The kernel defines what the features would: both must be off in Cargo.toml.
        assert!(MAIN_RS.contains("#[panic_handler]"));
        assert!(MAIN_RS.contains(".global _start"));
        assert!(SHOULD_PANIC_RS.contains("pub extern \"sysv64\" fn _start"));
        assert!(!MAIN_RS.contains("entry!("));
    }

    #[test]
    fn every_step_expects_a_poweroff_or_a_crash_of_its_own() {
        assert_eq!(STEPS.iter().filter(|s| s.exit_success).count(), 2);
        for step in &STEPS {
            assert!(!step.required_lines.is_empty(), "{}", step.name);
            let ends = if step.exit_success {
                "end=poweroff"
            } else {
                "end=crash"
            };
            assert!(
                step.required_lines
                    .iter()
                    .any(|line| line.describe().contains(ends)),
                "{}",
                step.name
            );
        }
    }
}

//! Kernels that live outside this workspace: `cargo xtask runner`, the cargo runner that
//! boots a guest ELF on Lamina (what `cargo run` and `cargo test` of a guest crate call), and
//! `cargo xtask new-guest`, which writes a minimal guest crate set up for it.
//!
//! A guest crate's `.cargo/config.toml` names the runner ([`runner_line`]): a `sh -c` that
//! changes into the Lamina workspace and runs `cargo xtask runner --from <the guest's
//! directory> ELF ARGS`. The change of directory is needed: cargo reads `.cargo/config.toml`
//! from the directory it runs in, whatever `--manifest-path` says, so a runner started in the
//! guest's directory would build xtask for the guest's `build.target` (bare metal); started in
//! the Lamina workspace it finds Lamina's own config, its `xtask` alias and its toolchain
//! file. `--from` resolves the ELF path, which cargo gives relative to where it ran.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use crate::emulator::{self, RunDir, RunOutcome, RunRecord, RunRequest, Streaming, Vendor};
use crate::error::{Context, Result, failed};
use crate::iso::{self, BootModule};
use crate::workspace::{self, Artifact, BARE_METAL_TARGET};
use crate::{toolchain, tools};

/// Environment variable that picks the vendor of `cargo xtask runner` (`amd` or `intel`)
/// when `--vendor` is not given.
pub const VENDOR_VAR: &str = "LAMINA_VENDOR";
/// Environment variable with the runner's wall-clock limit in seconds.
pub const TIMEOUT_VAR: &str = "LAMINA_TIMEOUT";
/// Environment variable naming the runner's run directory (ISO, serial log), instead of
/// `target/lamina/runner/<vendor>/<name>/`.
pub const RUN_DIR_VAR: &str = "LAMINA_RUN_DIR";

/// The longest domain name the hypervisor keeps (StartInfo's `name` is 32 bytes with a NUL).
const DOMAIN_NAME_MAX: usize = 31;

/// What `cargo xtask runner` was asked to do.
#[derive(Debug)]
pub struct RunnerOptions {
    pub vendor: Option<Vendor>,
    pub timeout: Option<Duration>,
    pub hv_cmdline: String,
    /// The directory a relative `elf` is relative to (the guest's, where cargo ran).
    pub from: Option<PathBuf>,
    pub elf: PathBuf,
    pub args: Vec<String>,
}

/// The domain name for an ELF cargo built: its file name without the `-<16 hex digits>`
/// cargo adds to test binaries, at most [`DOMAIN_NAME_MAX`] bytes.
pub fn domain_name(elf: &Path) -> String {
    let stem = elf
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "guest".to_string());
    let stem = match stem.rsplit_once('-') {
        Some((name, hash))
            if !name.is_empty()
                && hash.len() == 16
                && hash.chars().all(|c| c.is_ascii_hexdigit()) =>
        {
            name.to_string()
        }
        _ => stem,
    };
    let mut name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(DOMAIN_NAME_MAX);
    name
}

/// The module command line: the domain name, then the runner's arguments (what follows
/// `cargo run --`, or the test filters of `cargo test`) as the guest's own words.
pub fn module_cmdline(name: &str, args: &[String]) -> String {
    let mut words = vec![name.to_string()];
    words.extend(args.iter().filter(|arg| !arg.is_empty()).cloned());
    words.join(" ")
}

/// The vendor: `--vendor`, else `LAMINA_VENDOR`, else AMD-V.
fn pick_vendor(option: Option<Vendor>) -> Result<Vendor> {
    if let Some(vendor) = option {
        return Ok(vendor);
    }
    match env::var(VENDOR_VAR) {
        Err(_) => Ok(Vendor::Amd),
        Ok(value) => match value.trim() {
            "" | "amd" => Ok(Vendor::Amd),
            "intel" => Ok(Vendor::Intel),
            other => Err(failed(format!(
                "{VENDOR_VAR}={other}: expected amd (QEMU, AMD-V) or intel (Bochs, VT-x)"
            ))),
        },
    }
}

fn pick_timeout(option: Option<Duration>, vendor: Vendor) -> Result<Duration> {
    if let Some(timeout) = option {
        return Ok(timeout);
    }
    match env::var(TIMEOUT_VAR) {
        Err(_) => Ok(vendor.default_timeout()),
        Ok(value) => value
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&secs| secs > 0)
            .map(Duration::from_secs)
            .ok_or_else(|| failed(format!("{TIMEOUT_VAR}={value}: expected seconds (> 0)"))),
    }
}

/// Builds the hypervisor only (release, bare metal): the guest is the caller's.
fn build_hypervisor() -> Result<PathBuf> {
    toolchain::ensure_bare_metal_target()?;
    let status = workspace::cargo()
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            BARE_METAL_TARGET,
        ])
        .args(["-p", Artifact::Hypervisor.package()])
        .status()
        .context(|| "starting cargo build of the hypervisor".to_string())?;
    let path = Artifact::Hypervisor.path();
    if status.success() && path.is_file() {
        Ok(path)
    } else {
        Err(failed("cargo build of the hypervisor failed (see above)"))
    }
}

/// `cargo xtask runner`: boots `elf` as domain 1 and streams the serial console; the exit
/// status is 0 when the hypervisor reports `lamina: result: success` (every domain powered
/// off), 1 otherwise (a crash, a fault, a timeout).
pub fn runner(options: RunnerOptions) -> Result<ExitCode> {
    let vendor = pick_vendor(options.vendor)?;
    let timeout = pick_timeout(options.timeout, vendor)?;
    let elf = match &options.from {
        Some(from) if options.elf.is_relative() => from.join(&options.elf),
        _ => options.elf.clone(),
    };
    if !elf.is_file() {
        return Err(failed(format!("{} is not a file", elf.display())));
    }
    let elf = elf
        .canonicalize()
        .context(|| format!("resolving {}", elf.display()))?;
    let name = domain_name(&elf);
    let cmdline = module_cmdline(&name, &options.args);
    iso::check_cmdline(&cmdline)?;
    tools::ensure(&[vendor])?;
    let hv = build_hypervisor()?;
    let dir = match env::var_os(RUN_DIR_VAR) {
        Some(dir) if !dir.is_empty() => RunDir::new(PathBuf::from(dir)),
        _ => RunDir::new(
            workspace::lamina_dir()
                .join("runner")
                .join(vendor.name())
                .join(&name),
        ),
    };
    fs::create_dir_all(&dir.path).context(|| format!("creating {}", dir.path.display()))?;
    let modules = [BootModule { path: elf, cmdline }];
    iso::build_iso(
        &hv,
        &options.hv_cmdline,
        &modules,
        &dir.staging(),
        &dir.iso(),
    )?;
    eprintln!(
        "lamina-runner: booting {name} on {} ({}), timeout {} s; serial log: {}",
        vendor.name(),
        match vendor {
            Vendor::Amd => "QEMU, AMD-V",
            Vendor::Intel => "Bochs, Intel VT-x",
        },
        timeout.as_secs(),
        emulator::show_path(&dir.serial_log())
    );
    let record = emulator::run_with(
        &RunRequest {
            vendor,
            dir: &dir,
            timeout,
            streaming: &Streaming::Plain,
            icount: false,
        },
        &emulator::RunExtras::default(),
    )?;
    let passed = verdict(&record);
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints one line on how the run ended; returns whether it is a success.
fn verdict(record: &RunRecord) -> bool {
    let ending = match record.outcome() {
        RunOutcome::Success => None,
        RunOutcome::Failure => Some(format!("failure ({})", record.ending())),
        RunOutcome::Crash => Some(format!("no result line; {}", record.ending())),
        RunOutcome::Timeout => Some(format!(
            "no result line within {:.0} s; emulator killed",
            record.elapsed.as_secs_f64()
        )),
    };
    let problem = ending.or_else(|| record.log.memory_problem());
    match problem {
        None => {
            eprintln!("lamina-runner: success");
            true
        }
        Some(problem) => {
            eprintln!("lamina-runner: FAILED: {problem}");
            false
        }
    }
}

/// The crate name `new-guest` gives a directory: its last component, as cargo would.
pub fn crate_name(path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let valid = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(name)
    } else {
        Err(failed(format!(
            "{}: the directory name becomes the crate name: letters, digits, - and _, starting \
             with a letter",
            path.display()
        )))
    }
}

/// The files of a new guest crate named `name`, depending on the SDK at `lamina`:
/// (path relative to the crate, contents).
pub fn template(name: &str, lamina: &Path) -> Vec<(&'static str, String)> {
    let lamina = lamina.display().to_string();
    let cargo_toml = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

# A crate of its own, even when it lies inside another workspace's directory.
[workspace]

[dependencies]
# The SDK: `_start`, the panic handler, console, hypercalls (see its crate documentation).
# A kernel with its own `#[panic_handler]` or `_start` adds `default-features = false` and
# lists what it keeps, e.g. `features = ["entry"]`.
lamina-guest-sdk = {{ path = "{lamina}/guest-sdk" }}

[[bin]]
name = "{name}"
# The bare-metal target has no libtest: tests are files in tests/ with `harness = false`
# (or a custom test framework), each its own kernel that `cargo test` boots.
test = false
bench = false

[profile.dev]
panic = "abort"

[profile.release]
panic = "abort"
"#
    );
    let config = format!(
        r#"# Build for bare metal, and boot what `cargo run` and `cargo test` build on Lamina.
[build]
target = "x86_64-unknown-none"

[target.x86_64-unknown-none]
# Linked at a fixed address (no PIE), as Lamina loads it (docs/abi.md 4.2).
rustflags = ["-C", "relocation-model=static"]
# `cargo xtask runner ELF [ARGS]` of the Lamina workspace boots the kernel as domain 1 under
# QEMU (AMD-V; LAMINA_VENDOR=intel: Bochs, VT-x), prints its console and exits 0 when it
# powered off. ARGS (after `cargo run --`) go on the kernel's command line. It runs in the
# Lamina workspace (the path after the script), so that cargo reads Lamina's configuration
# rather than this one; `--from` says where the ELF path is relative to.
runner = {runner}
"#,
        runner = runner_line(Path::new(&lamina)),
    );
    let main_rs = format!(
        r#"//! {name}: a kernel for Lamina, made by `cargo xtask new-guest`.
//!
//! `cargo run` builds it for `x86_64-unknown-none` and boots it on Lamina (see
//! `.cargo/config.toml`); the exit status says whether it powered off. Lamina's
//! docs/porting.md says how to grow it, or how to port a kernel you already have.
#![no_std]
#![no_main]

use lamina_guest_sdk::{{StartInfo, println}};

// The SDK's `_start` checks the StartInfo the hypervisor passes and calls `kernel_main`; its
// panic handler prints the panic and ends the domain as crashed.
lamina_guest_sdk::entry!(kernel_main);

fn kernel_main(start: &'static StartInfo) {{
    println!(
        "hello from {name}, domain {{}} with {{}} MiB of RAM; command line {{:?}}",
        start.domain_id,
        start.mem_bytes >> 20,
        lamina_guest_sdk::cmdline(),
    );
}} // Returning powers the domain off.
"#
    );
    vec![
        ("Cargo.toml", cargo_toml),
        (".cargo/config.toml", config),
        ("src/main.rs", main_rs),
        (".gitignore", "/target\n".to_string()),
    ]
}

/// The `runner = [...]` value of a guest's `.cargo/config.toml` for the workspace at
/// `lamina` (module documentation). The workspace path is the script's `$0`, so it needs no
/// shell quoting.
pub fn runner_line(lamina: &Path) -> String {
    const SCRIPT: &str = r#"from=$(pwd) && cd "$0" && exec cargo xtask runner --from "$from" "$@""#;
    let quote = |text: &str| format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""));
    format!(
        "[\"sh\", \"-c\", {}, {}]",
        quote(SCRIPT),
        quote(&lamina.display().to_string())
    )
}

/// `cargo xtask new-guest PATH`: writes the template into `path`, which must not exist or be
/// empty. Returns the crate name.
pub fn new_guest(path: &Path) -> Result<String> {
    let name = crate_name(path)?;
    if path.exists() {
        let mut entries = fs::read_dir(path).context(|| format!("reading {}", path.display()))?;
        if entries.next().is_some() {
            return Err(failed(format!(
                "{} exists and is not empty; new-guest writes into a new directory",
                path.display()
            )));
        }
    }
    // The guest builds with the pinned toolchain's bare-metal target.
    toolchain::ensure_bare_metal_target()?;
    for (file, contents) in template(&name, &workspace::root()) {
        let file = path.join(file);
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
        }
        fs::write(&file, contents).context(|| format!("writing {}", file.display()))?;
    }
    Ok(name)
}

/// `cargo` for a guest crate in `dir`: the toolchain that runs us, without the variables our
/// own cargo set for xtask (a guest build must not see them).
pub fn guest_cargo(dir: &Path) -> Command {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(dir);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" {
            command.env_remove(key.as_ref());
        }
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_names_drop_the_test_hash_and_fit_the_start_info() {
        assert_eq!(
            domain_name(Path::new("/t/debug/should_panic-0123456789abcdef")),
            "should_panic"
        );
        assert_eq!(domain_name(Path::new("/t/debug/my-kernel")), "my-kernel");
        let long = domain_name(Path::new("/t/a-very-long-kernel-name-that-goes-on-and-on"));
        assert_eq!(long.len(), DOMAIN_NAME_MAX);
        assert_eq!(domain_name(Path::new("/t/odd name")), "odd_name");
    }

    #[test]
    fn runner_arguments_follow_the_name_on_the_command_line() {
        let args = vec!["ops=native".to_string(), String::new(), "x=1".to_string()];
        assert_eq!(module_cmdline("k", &args), "k ops=native x=1");
        assert_eq!(module_cmdline("k", &[]), "k");
    }

    #[test]
    fn crate_names_come_from_the_directory() {
        assert_eq!(
            crate_name(Path::new("/tmp/my-kernel")).unwrap(),
            "my-kernel"
        );
        assert!(crate_name(Path::new("/tmp/1kernel")).is_err());
        assert!(crate_name(Path::new("/tmp/my kernel")).is_err());
    }

    #[test]
    fn the_template_points_at_the_sdk_and_the_runner() {
        let files = template("k", Path::new("/opt/lamina"));
        let file = |name: &str| &files.iter().find(|(path, _)| *path == name).unwrap().1;
        assert!(file("Cargo.toml").contains(r#"path = "/opt/lamina/guest-sdk""#));
        assert!(file("Cargo.toml").contains("[workspace]"));
        let config = file(".cargo/config.toml");
        assert!(config.contains(r#"target = "x86_64-unknown-none""#));
        assert!(config.contains(r#""-C", "relocation-model=static""#));
        assert!(config.contains(&format!(
            "runner = {}",
            runner_line(Path::new("/opt/lamina"))
        )));
        assert!(file("src/main.rs").contains("entry!(kernel_main)"));
    }
}

//! Cargo invocations: the release build of the bare-metal images, and the host unit tests.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{Context, Result, failed};
use crate::toolchain;
use crate::workspace::{self, Artifact, BARE_METAL_TARGET};

/// Packages whose unit tests run on the host (the hypervisor and the SDK keep their logic in
/// host-testable modules).
const HOST_TESTED_PACKAGES: [&str; 5] = [
    "lamina-abi",
    "lamina-hv",
    "lamina-guest-sdk",
    "sample-domains",
    "xtask",
];

/// Builds the hypervisor and the guests for `x86_64-unknown-none` in release mode.
pub fn build_images() -> Result<()> {
    toolchain::ensure_bare_metal_target()?;
    let mut command = workspace::cargo();
    command.args(["build", "--release", "--target", BARE_METAL_TARGET]);
    for artifact in Artifact::ALL {
        command.args(["-p", artifact.package()]);
    }
    run_to_completion(&mut command, "cargo build")?
        .then_some(())
        .ok_or_else(|| failed("cargo build failed (see its output above)"))?;
    for artifact in Artifact::ALL {
        let path = artifact.path();
        if !path.is_file() {
            return Err(failed(format!(
                "cargo build succeeded but {} is missing",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Runs the host unit tests; returns whether they passed and how long they took.
pub fn run_host_unit_tests() -> Result<(bool, Duration)> {
    let mut command = workspace::cargo();
    command.arg("test");
    for package in HOST_TESTED_PACKAGES {
        command.args(["-p", package]);
    }
    let started = Instant::now();
    let passed = run_to_completion(&mut command, "cargo test")?;
    Ok((passed, started.elapsed()))
}

/// The checks an editor runs, as steps of `cargo xtask test` (by name, for `--filter`).
pub const LINT_STEPS: [&str; 3] = ["fmt", "clippy-host", "clippy-bare-metal"];

/// The bare-metal crates, checked for `x86_64-unknown-none` (the host build checks the
/// whole workspace, these included, under `cfg(not(target_os = "none"))`).
const BARE_METAL_PACKAGES: [&str; 7] = [
    "lamina-abi",
    "lamina-hv",
    "lamina-guest-sdk",
    "sample-guest",
    "sample-domains",
    "lamina-conformance",
    "lamina-bench",
];

/// Runs lint step `name` of [`LINT_STEPS`]; returns whether it passed and how long it took.
/// Warnings fail it (`-D warnings`).
pub fn run_lint_step(name: &str) -> Result<(bool, Duration)> {
    let mut command = workspace::cargo();
    match name {
        "fmt" => {
            toolchain::ensure_cargo_tool("fmt", "rustfmt")?;
            command.args(["fmt", "--all", "--", "--check"]);
        }
        "clippy-host" => {
            toolchain::ensure_cargo_tool("clippy", "clippy")?;
            command.args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]);
        }
        "clippy-bare-metal" => {
            toolchain::ensure_cargo_tool("clippy", "clippy")?;
            toolchain::ensure_bare_metal_target()?;
            command.args(["clippy", "--target", BARE_METAL_TARGET]);
            for package in BARE_METAL_PACKAGES {
                command.args(["-p", package]);
            }
            command.args(["--", "-D", "warnings"]);
        }
        other => return Err(failed(format!("no lint step {other}"))),
    }
    let started = Instant::now();
    let passed = run_to_completion(&mut command, name)?;
    Ok((passed, started.elapsed()))
}

/// Runs a command with inherited stdio; `Ok(true)` if it exited with status 0.
fn run_to_completion(command: &mut Command, what: &str) -> Result<bool> {
    let status = command.status().context(|| format!("starting {what}"))?;
    Ok(status.success())
}

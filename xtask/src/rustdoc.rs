//! The `rustdoc` step of `cargo xtask test`: the API documentation of the crates kernel
//! authors read, `lamina-abi` and `lamina-guest-sdk`, builds for the bare-metal target
//! without a warning (broken intra-doc links, missing docs, bad code blocks).

use std::time::{Duration, Instant};

use crate::error::{Context, Result};
use crate::toolchain;
use crate::workspace::{self, BARE_METAL_TARGET};

/// Name of the step, for `--filter` and the report.
pub const NAME: &str = "rustdoc";

/// The packages whose documentation must build cleanly.
const DOCUMENTED_PACKAGES: [&str; 2] = ["lamina-abi", "lamina-guest-sdk"];

/// `RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps -p lamina-abi -p lamina-guest-sdk --target
/// x86_64-unknown-none`; returns whether it passed and how long it took. The docs land in
/// `target/x86_64-unknown-none/doc/`.
pub fn run_rustdoc() -> Result<(bool, Duration)> {
    toolchain::ensure_bare_metal_target()?;
    let mut command = workspace::cargo();
    command.env("RUSTDOCFLAGS", "-Dwarnings").args([
        "doc",
        "--no-deps",
        "--target",
        BARE_METAL_TARGET,
    ]);
    for package in DOCUMENTED_PACKAGES {
        command.args(["-p", package]);
    }
    let started = Instant::now();
    let status = command
        .status()
        .context(|| "starting cargo doc".to_string())?;
    Ok((status.success(), started.elapsed()))
}

//! The Rust side of a fresh machine: the bare-metal target of the pinned toolchain.
//!
//! rustup installs the `targets` of `rust-toolchain.toml` only when it installs the toolchain
//! itself; a machine that already has 1.95.0 without `x86_64-unknown-none` fails the first
//! bare-metal build with E0463 ("can't find crate for `core`"). So every build checks the
//! toolchain's sysroot first (no network, a few milliseconds) and runs `rustup target add`,
//! a no-op when the target is there, only when it is missing.

use std::env;
use std::path::PathBuf;
use std::process::Command;

use crate::error::{Context, Error, Result, failed};
use crate::workspace::{self, BARE_METAL_TARGET};

/// Makes sure the toolchain that builds the images has `core` for `x86_64-unknown-none`.
pub fn ensure_bare_metal_target() -> Result<()> {
    if has_target(BARE_METAL_TARGET)? {
        return Ok(());
    }
    ensure_with_rustup(&["target", "add", BARE_METAL_TARGET])?;
    if has_target(BARE_METAL_TARGET)? {
        Ok(())
    } else {
        Err(failed(format!(
            "`rustup target add {BARE_METAL_TARGET}` succeeded but the toolchain still has no \
             {BARE_METAL_TARGET} standard library"
        )))
    }
}

/// Makes sure a rustup component (e.g. `clippy`, `rustfmt`) of the pinned toolchain is there.
pub fn ensure_component(component: &str) -> Result<()> {
    ensure_with_rustup(&["component", "add", component])
}

/// Makes sure `cargo <subcommand>` runs, adding rustup `component` when it does not (a
/// fresh machine's toolchain may lack rustfmt or clippy).
pub fn ensure_cargo_tool(subcommand: &str, component: &str) -> Result<()> {
    let works = |subcommand: &str| {
        workspace::cargo()
            .args([subcommand, "--version"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if works(subcommand) {
        return Ok(());
    }
    ensure_component(component)?;
    if works(subcommand) {
        Ok(())
    } else {
        Err(failed(format!(
            "`rustup component add {component}` succeeded but `cargo {subcommand}` still fails"
        )))
    }
}

/// Runs `rustup <arguments>` in the workspace root, so that rust-toolchain.toml picks the
/// toolchain; without rustup, says what to install.
fn ensure_with_rustup(arguments: &[&str]) -> Result<()> {
    let rustup = env::var_os("RUSTUP").unwrap_or_else(|| "rustup".into());
    eprintln!("xtask: rustup {}", arguments.join(" "));
    let status = Command::new(&rustup)
        .args(arguments)
        .current_dir(workspace::root())
        .status();
    match status {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(failed(format!(
            "`rustup {}` failed ({status})",
            arguments.join(" ")
        ))),
        Err(_) => Err(Error::MissingTools(format!(
            "the Rust toolchain needs `{}` and rustup is not on PATH; install rustup \
             (https://rustup.rs) and run `rustup {}` in {}",
            arguments.join(" "),
            arguments.join(" "),
            workspace::root().display()
        ))),
    }
}

/// Whether the toolchain cargo uses here has the standard library of `target`.
fn has_target(target: &str) -> Result<bool> {
    Ok(sysroot()?
        .join("lib")
        .join("rustlib")
        .join(target)
        .join("lib")
        .is_dir())
}

/// `rustc --print sysroot`, run in the workspace root so that rust-toolchain.toml applies.
fn sysroot() -> Result<PathBuf> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = Command::new(rustc)
        .args(["--print", "sysroot"])
        .current_dir(workspace::root())
        .output()
        .context(|| "running rustc --print sysroot".to_string())?;
    if !output.status.success() {
        return Err(failed(format!(
            "rustc --print sysroot failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_target_is_found_and_a_made_up_one_is_not() {
        assert!(sysroot().unwrap().is_dir());
        assert!(!has_target("no-such-target-for-lamina").unwrap());
    }
}

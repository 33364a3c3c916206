//! The system tools runs need (emulators, firmware, GRUB), installed with apt when missing.
//!
//! Only what the requested vendors need is checked: QEMU and gdb for AMD-V, Bochs and its firmware for
//! VT-x, GRUB and its helpers for both.

use std::env;
use std::path::Path;
use std::process::Command;

use crate::bochs;
use crate::emulator::Vendor;
use crate::error::{Context, Error, Result, failed};

/// Something on the host a run needs, and the Debian package that provides it.
#[derive(Clone, Copy, Debug)]
struct Requirement {
    kind: RequirementKind,
    package: &'static str,
}

#[derive(Clone, Copy, Debug)]
enum RequirementKind {
    /// An executable on `PATH`.
    Program(&'static str),
    /// A file or directory.
    Path(&'static str),
}

impl Requirement {
    const fn program(name: &'static str, package: &'static str) -> Self {
        Requirement {
            kind: RequirementKind::Program(name),
            package,
        }
    }
    const fn path(path: &'static str, package: &'static str) -> Self {
        Requirement {
            kind: RequirementKind::Path(path),
            package,
        }
    }

    fn is_present(self) -> bool {
        match self.kind {
            RequirementKind::Program(name) => find_program(name),
            RequirementKind::Path(path) => Path::new(path).exists(),
        }
    }

    fn describe(self) -> &'static str {
        match self.kind {
            RequirementKind::Program(name) | RequirementKind::Path(name) => name,
        }
    }
}

/// ISO building: grub-mkrescue drives xorriso, needs mtools for the EFI image and the BIOS
/// GRUB modules to make the image bootable on a PC.
const FOR_ISO: &[Requirement] = &[
    Requirement::program("grub-mkrescue", "grub-common"),
    Requirement::program("xorriso", "xorriso"),
    Requirement::program("mformat", "mtools"),
    Requirement::path("/usr/lib/grub/i386-pc", "grub-pc-bin"),
];
/// QEMU, and gdb for its stub (`cargo xtask run --gdb` and the `gdb-breakpoints` scenario).
const FOR_AMD: &[Requirement] = &[
    Requirement::program("qemu-system-x86_64", "qemu-system-x86"),
    Requirement::program("gdb", "gdb"),
];
const FOR_INTEL: &[Requirement] = &[
    Requirement::program("bochs", "bochs"),
    Requirement::path(bochs::BIOS_IMAGE, "bochsbios"),
    Requirement::path(bochs::VGA_BIOS_IMAGE, "vgabios"),
];

/// Makes sure everything runs for `vendors` need is installed: installs what is missing when
/// we are root, otherwise fails with [`Error::MissingTools`] naming the command to run.
pub fn ensure(vendors: &[Vendor]) -> Result<()> {
    let missing = missing_packages(vendors);
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get install -y {}", missing.join(" "));
    if !running_as_root() {
        return Err(Error::MissingTools(format!(
            "missing system packages: {}\nInstall them with:\n  sudo apt-get update && sudo {install}",
            missing.join(", ")
        )));
    }
    eprintln!(
        "xtask: installing missing system packages: {}",
        missing.join(" ")
    );
    apt(&["update"])?;
    let mut arguments = vec!["install", "-y"];
    arguments.extend(missing.iter().copied());
    apt(&arguments)?;
    let still_missing = missing_packages(vendors);
    if still_missing.is_empty() {
        Ok(())
    } else {
        Err(failed(format!(
            "still missing after `{install}`: {}",
            still_missing.join(", ")
        )))
    }
}

/// The packages to install, each once, in a stable order.
fn missing_packages(vendors: &[Vendor]) -> Vec<&'static str> {
    let mut requirements: Vec<Requirement> = FOR_ISO.to_vec();
    if vendors.contains(&Vendor::Amd) {
        requirements.extend_from_slice(FOR_AMD);
    }
    if vendors.contains(&Vendor::Intel) {
        requirements.extend_from_slice(FOR_INTEL);
    }
    let mut packages = Vec::new();
    for requirement in requirements {
        if !requirement.is_present() && !packages.contains(&requirement.package) {
            eprintln!(
                "xtask: {} not found (package {})",
                requirement.describe(),
                requirement.package
            );
            packages.push(requirement.package);
        }
    }
    packages
}

fn apt(arguments: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(arguments)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context(|| "starting apt-get".to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(failed(format!(
            "`apt-get {}` failed ({status})",
            arguments.join(" ")
        )))
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// Whether `name` is an executable file in one of `PATH`'s directories.
fn find_program(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = env::var_os("PATH") else {
        return false;
    };
    env::split_paths(&path).any(|dir| {
        dir.join(name)
            .metadata()
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_on_path() {
        assert!(find_program("sh"));
        assert!(!find_program("no-such-program-for-lamina"));
    }
}

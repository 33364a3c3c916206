//! Where things are: the workspace root, the target directory, the built images, and the
//! directory under which scenario ISOs and logs go.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The bare-metal target the hypervisor and the guests are built for.
pub const BARE_METAL_TARGET: &str = "x86_64-unknown-none";

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` like cargo does.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                root().join(dir)
            }
        }
        _ => root().join("target"),
    }
}

/// Everything xtask writes (ISOs, serial logs, reports) lives below `target/lamina/`.
pub fn lamina_dir() -> PathBuf {
    target_dir().join("lamina")
}

/// A `cargo` command: the one that runs us (`CARGO`), so the toolchain stays the same.
pub fn cargo() -> Command {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(root());
    command
}

/// The images `cargo xtask build` produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Artifact {
    Hypervisor,
    SampleGuest,
    /// The multi-domain samples: ping, pong, snoop, control, worker (`role=`).
    SampleDomains,
    Conformance,
    Bench,
}

impl Artifact {
    pub const ALL: [Artifact; 5] = [
        Artifact::Hypervisor,
        Artifact::SampleGuest,
        Artifact::SampleDomains,
        Artifact::Conformance,
        Artifact::Bench,
    ];

    /// The cargo package that builds it.
    pub fn package(self) -> &'static str {
        match self {
            Artifact::Hypervisor => "lamina-hv",
            Artifact::SampleGuest => "sample-guest",
            Artifact::SampleDomains => "sample-domains",
            Artifact::Conformance => "lamina-conformance",
            Artifact::Bench => "lamina-bench",
        }
    }

    /// The binary's file name.
    pub fn file_name(self) -> &'static str {
        match self {
            Artifact::Hypervisor => "lamina-hv",
            Artifact::SampleGuest => "sample-guest",
            Artifact::SampleDomains => "sample-domains",
            Artifact::Conformance => "lamina-conformance",
            Artifact::Bench => "lamina-bench",
        }
    }

    /// Where the release build puts it.
    pub fn path(self) -> PathBuf {
        target_dir()
            .join(BARE_METAL_TARGET)
            .join("release")
            .join(self.file_name())
    }
}

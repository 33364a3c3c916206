//! Host-side fuzzing of the hypervisor's vendor-neutral code (`hv/src/common`).
//!
//! `lamina-hv` is a binary crate, so its `common` module is compiled here from its own sources
//! (`#[path]`), as the hypervisor's host unit tests compile it: the crate root offers what
//! `hv/src/main.rs` offers (`crate::common`), and `--cfg fuzzing` (set by `build.rs`) turns
//! on the same test support the unit tests use (the scripted vCPU, guest memory backed by a
//! host vector, fake physical-memory figures). Nothing here changes how the hypervisor is
//! built. The targets are in `fuzz_targets/`; each checks invariants after every input, not
//! only that nothing panicked.
#![allow(unreachable_pub, dead_code, unused_imports, missing_docs)]
#![allow(clippy::all)]

extern crate alloc;

#[path = "../../hv/src/common/mod.rs"]
pub mod common;

#[path = "../../hv/src/platform/spec_ctrl.rs"]
pub mod spec_ctrl;

/// The platform code `common` calls that runs on the host (the rest is bare metal only).
pub mod platform {
    pub use crate::spec_ctrl;
}

pub mod guarded;
pub mod input;
pub mod world;

//! The contract between Lamina and its guests.
//!
//! Everything a guest kernel and the hypervisor must agree on lives here, one module per
//! hypercall family, and nowhere else: numbers, status codes, `#[repr(C)]` structures with
//! compile-time layout checks, and the ABI version. `docs/abi.md` is the prose specification of
//! the same contract; a change here changes that document, the guest SDK and the conformance
//! tests in the same commit.
#![no_std]
#![warn(missing_docs)]

pub mod console;
pub mod cpuid;
pub mod domctl;
pub mod event_channel;
pub mod grant_table;
pub mod hypercall;
pub mod layout;
pub mod memory;
pub mod multicall;
pub mod sched;
pub mod shared_info;
pub mod start_info;
pub mod stats;
pub mod status;
pub mod vcpu;

pub use hypercall::Hypercall;
pub use start_info::StartInfo;
pub use status::Errno;

/// ABI major version: incremented on incompatible changes.
pub const ABI_VERSION_MAJOR: u16 = 1;
/// ABI minor version: incremented when calls or fields are added compatibly.
pub const ABI_VERSION_MINOR: u16 = 8;

/// The ABI version as one word, `major << 16 | minor`, as returned by the version hypercall and
/// CPUID leaf [`cpuid::LEAF_VERSION`].
pub const fn abi_version() -> u32 {
    (ABI_VERSION_MAJOR as u32) << 16 | ABI_VERSION_MINOR as u32
}

/// The text of a NUL-padded name field (up to the first NUL; invalid UTF-8 yields `"?"`).
pub fn nul_padded_str(bytes: &[u8]) -> &str {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..len]).unwrap_or("?")
}

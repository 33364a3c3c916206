//! Grant tables (`grant_table_op`, docs/abi.md 16, ABI 1.3): share pages with another domain.
//!
//! The granter offers a page with [`grant_access`] and tells the grantee the reference (by
//! convention, or over an event channel's partner); the grantee either maps it into its grant
//! window with [`map`] and reads or writes it like RAM, or copies through the hypervisor with
//! [`copy_from`]/[`copy_to`]. The granter ends the grant with [`end_access`], which fails with
//! `EBUSY` while the grantee still has it mapped.
//!
//! ```ignore
//! // granter (domain 1), sharing `page` with domain 2 read-write:
//! let grant = grant::grant_access(2, page_gpa, Access::ReadWrite)?;   // GrantRef(0)
//! // grantee (domain 2):
//! let slot = grant::window_slot(0);
//! grant::map(1, GrantRef::new(0), slot, Access::ReadWrite)?;
//! let shared = slot as *mut u8; // the boot page tables map the grant window
//! ```
//!
//! Check feature bit [`GRANT_TABLES`](lamina_abi::cpuid::features::GRANT_TABLES) (or ABI 1.3)
//! first: an older hypervisor returns `-ENOSYS`.

use lamina_abi::Hypercall;
use lamina_abi::grant_table::{GrantCopy, GrantTableOp, copy_direction, grant_flags, map_flags};
use lamina_abi::layout::{GRANT_WINDOW_GPA, GRANT_WINDOW_PAGES};

pub use lamina_abi::grant_table::{GRANT_PAGE_BYTES, GRANT_TABLE_ENTRIES};

use crate::hypercall::{self, HypercallError};

/// A grant reference: names one grant in its granter's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantRef(u32);

impl GrantRef {
    /// The reference with this number.
    pub const fn new(number: u32) -> Self {
        GrantRef(number)
    }
    /// Its number.
    pub const fn number(self) -> u32 {
        self.0
    }
}

/// What the grantee may do with a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read only.
    ReadOnly,
    /// Read and write.
    ReadWrite,
}

/// The guest-physical (and, under the boot page tables, virtual) address of page `index` of
/// the grant window, or `None` past its end.
pub const fn window_slot(index: u64) -> Option<u64> {
    if index < GRANT_WINDOW_PAGES {
        Some(GRANT_WINDOW_GPA + index * GRANT_PAGE_BYTES)
    } else {
        None
    }
}

/// Grants domain `grantee` access to the page at guest-physical `page_gpa` (page-aligned, in
/// this domain's RAM). Errors: `ENOENT` no such domain (or it ended), `EINVAL` the grantee is
/// this domain or `page_gpa` is not page-aligned, `EFAULT` the page is not in RAM, `ENOSPC`
/// every reference is in use.
pub fn grant_access(
    grantee: u32,
    page_gpa: u64,
    access: Access,
) -> Result<GrantRef, HypercallError> {
    let flags = match access {
        Access::ReadOnly => grant_flags::READONLY,
        Access::ReadWrite => 0,
    };
    // SAFETY: the hypervisor reads no guest memory for this operation; the page stays ours.
    let number = unsafe {
        hypercall::call(
            Hypercall::GrantTableOp,
            [
                GrantTableOp::GrantAccess as u64,
                u64::from(grantee),
                page_gpa,
                flags,
                0,
            ],
        )
    }?;
    Ok(GrantRef(number as u32))
}

/// Ends a grant. Errors: `ENOENT` no such grant, `EBUSY` the grantee has it mapped.
pub fn end_access(grant: GrantRef) -> Result<(), HypercallError> {
    // SAFETY: touches no guest memory.
    unsafe {
        hypercall::call(
            Hypercall::GrantTableOp,
            [GrantTableOp::EndAccess as u64, u64::from(grant.0), 0, 0, 0],
        )
    }
    .map(drop)
}

/// Maps grant `grant` of domain `granter` at `slot`, a page of the grant window
/// ([`window_slot`]). Errors: `ENOENT` no such domain or grant, `EPERM` the grant is for
/// another domain or read-only while `access` is read-write, `EINVAL` `slot` is not a page
/// of the window, `EEXIST` something is mapped there already.
pub fn map(granter: u32, grant: GrantRef, slot: u64, access: Access) -> Result<(), HypercallError> {
    let flags = match access {
        Access::ReadOnly => map_flags::READONLY,
        Access::ReadWrite => 0,
    };
    // SAFETY: the hypervisor changes only what the grant window maps; no RAM of ours.
    unsafe {
        hypercall::call(
            Hypercall::GrantTableOp,
            [
                GrantTableOp::Map as u64,
                u64::from(granter),
                u64::from(grant.0),
                slot,
                flags,
            ],
        )
    }
    .map(drop)
}

/// Unmaps the grant at `slot`. Errors: `EINVAL` not a page of the window, `ENOENT` nothing is
/// mapped there.
pub fn unmap(slot: u64) -> Result<(), HypercallError> {
    // SAFETY: as for `map`; the caller stops using `slot` before calling.
    unsafe {
        hypercall::call(
            Hypercall::GrantTableOp,
            [GrantTableOp::Unmap as u64, slot, 0, 0, 0],
        )
    }
    .map(drop)
}

/// Runs one [`GrantCopy`] as it is (tests use this to pass bad fields). Returns the bytes copied.
pub fn copy_raw(request: &GrantCopy) -> Result<u64, HypercallError> {
    // SAFETY: the hypervisor reads the request and reads or writes the range it names, which
    // the safe callers below make a borrowed buffer; a raw request naming other memory of ours
    // only changes that memory, which every caller of this domain owns anyway.
    unsafe {
        hypercall::call(
            Hypercall::GrantTableOp,
            [
                GrantTableOp::Copy as u64,
                request as *const GrantCopy as u64,
                0,
                0,
                0,
            ],
        )
    }
}

/// Copies `buffer.len()` bytes from offset `offset` of grant `grant` of domain `granter`.
pub fn copy_from(
    granter: u32,
    grant: GrantRef,
    offset: u32,
    buffer: &mut [u8],
) -> Result<u64, HypercallError> {
    copy_raw(&GrantCopy {
        domain: granter as u16,
        direction: copy_direction::FROM_GRANT,
        reserved: 0,
        grant_ref: grant.0,
        offset,
        len: buffer.len() as u32,
        local_gpa: buffer.as_mut_ptr() as u64,
    })
}

/// Copies `data` to offset `offset` of grant `grant` of domain `granter` (read-write grants).
pub fn copy_to(
    granter: u32,
    grant: GrantRef,
    offset: u32,
    data: &[u8],
) -> Result<u64, HypercallError> {
    copy_raw(&GrantCopy {
        domain: granter as u16,
        direction: copy_direction::TO_GRANT,
        reserved: 0,
        grant_ref: grant.0,
        offset,
        len: data.len() as u32,
        local_gpa: data.as_ptr() as u64,
    })
}

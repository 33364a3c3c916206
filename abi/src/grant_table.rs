//! Grant tables (`Hypercall::GrantTableOp`): one domain lets another reach a page of its RAM.
//!
//! Xen's grant tables v1 are the model, with one difference: the table of grants is kept by the
//! hypervisor, not in a page the guest writes. Granting is a hypercall, so there is no shared
//! entry for granter and hypervisor to race on, and ending a grant that is mapped is refused
//! (`-EBUSY`) instead of being detected in the entry's flags.
//!
//! - The **granter** offers one page of its RAM to one **grantee**, read-only or read-write
//!   ([`GrantTableOp::GrantAccess`]); it gets a grant reference, lowest free first.
//! - The grantee maps it into its **grant window** ([`crate::layout::GRANT_WINDOW_GPA`]), a
//!   guest-physical range above RAM that the boot page tables already map, through its own
//!   EPT/NPT ([`GrantTableOp::Map`]); it unmaps it with [`GrantTableOp::Unmap`]. Or it asks
//!   the hypervisor to copy to or from the page ([`GrantTableOp::Copy`]).
//! - A grantee can only reach pages granted to it, and never write a read-only grant: a write
//!   through a read-only mapping stops the grantee as any access outside its memory does.
//! - When the granter ends, its grants are revoked: each slot that mapped one maps a page of
//!   zeros private to the grantee until it is unmapped. When the grantee ends, its mappings
//!   are dropped, so the granter can end its grants.
//!
//! `RDI` = operation, `RSI`.. = arguments. docs/abi.md section 16 is the specification.

/// Operations (RDI).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrantTableOp {
    /// Grant domain `RSI` access to the caller's page at guest-physical `RDX` (page-aligned,
    /// inside RAM); `R10` = [`grant_flags`]. Returns the grant reference.
    GrantAccess = 0,
    /// End grant `RSI`: the grantee can no longer map or copy it. `-EBUSY` while it is mapped.
    EndAccess = 1,
    /// Map grant `RDX` of domain `RSI` at the caller's guest-physical `R10` (a page of the grant
    /// window); `R8` = [`map_flags`]. Returns 0.
    Map = 2,
    /// Unmap the grant mapped at the caller's guest-physical `RSI`. Returns 0.
    Unmap = 3,
    /// Copy between the caller's RAM and a page granted to it: `RSI` = guest-physical address
    /// of a [`GrantCopy`]. Returns the number of bytes copied.
    Copy = 4,
}

impl TryFrom<u64> for GrantTableOp {
    type Error = crate::Errno;

    fn try_from(op: u64) -> Result<Self, Self::Error> {
        Ok(match op {
            0 => GrantTableOp::GrantAccess,
            1 => GrantTableOp::EndAccess,
            2 => GrantTableOp::Map,
            3 => GrantTableOp::Unmap,
            4 => GrantTableOp::Copy,
            _ => return Err(crate::Errno::ENOSYS),
        })
    }
}

/// Grant references per domain: a reference is in `0..GRANT_TABLE_ENTRIES`.
pub const GRANT_TABLE_ENTRIES: u32 = 256;

/// The size of a granted page.
pub const GRANT_PAGE_BYTES: u64 = 4096;

/// Flags of [`GrantTableOp::GrantAccess`] (`R10`); other bits are reserved (`-EINVAL`).
pub mod grant_flags {
    /// The grantee may only read the page.
    pub const READONLY: u64 = 1 << 0;
    /// Every defined bit.
    pub const ALL: u64 = READONLY;
}

/// Flags of [`GrantTableOp::Map`] (`R8`); other bits are reserved (`-EINVAL`).
pub mod map_flags {
    /// Map the page read-only (required for a read-only grant).
    pub const READONLY: u64 = 1 << 0;
    /// Every defined bit.
    pub const ALL: u64 = READONLY;
}

/// Values of [`GrantCopy::direction`].
pub mod copy_direction {
    /// From the granted page into the caller's RAM.
    pub const FROM_GRANT: u8 = 0;
    /// From the caller's RAM into the granted page (needs a read-write grant).
    pub const TO_GRANT: u8 = 1;
}

/// One copy between the caller's RAM and a granted page ([`GrantTableOp::Copy`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantCopy {
    /// The granter's domain id.
    pub domain: u16,
    /// [`copy_direction`].
    pub direction: u8,
    /// Reserved, zero.
    pub reserved: u8,
    /// The grant reference.
    pub grant_ref: u32,
    /// Byte offset in the granted page.
    pub offset: u32,
    /// Bytes to copy; `offset + len` must not pass the end of the page.
    pub len: u32,
    /// Guest-physical address of the caller's side of the copy, inside its RAM.
    pub local_gpa: u64,
}

const _: () = assert!(core::mem::size_of::<GrantCopy>() == 24);
const _: () = assert!(core::mem::offset_of!(GrantCopy, grant_ref) == 4);
const _: () = assert!(core::mem::offset_of!(GrantCopy, local_gpa) == 16);

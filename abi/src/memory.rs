//! The domain's memory (`Hypercall::MemoryOp`).
//!
//! `RDI` = operation, `RSI`.. = arguments.

/// Memory operations (RDI).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryOp {
    /// Copy the memory map into the array of [`MemoryRegion`] at guest-physical `RSI`, which
    /// holds `RDX` entries. Returns the number of regions in the map, which may be more than
    /// were written.
    GetMemoryMap = 0,
    /// Returns the size of the domain's RAM in bytes.
    CurrentReservation = 1,
}

impl TryFrom<u64> for MemoryOp {
    type Error = crate::Errno;

    fn try_from(op: u64) -> Result<Self, Self::Error> {
        match op {
            0 => Ok(MemoryOp::GetMemoryMap),
            1 => Ok(MemoryOp::CurrentReservation),
            _ => Err(crate::Errno::ENOSYS),
        }
    }
}

/// A region of guest-physical address space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub length: u64,
    /// [`region_kind`].
    pub kind: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

const _: () = assert!(core::mem::size_of::<MemoryRegion>() == 24);

/// Values of [`MemoryRegion::kind`].
pub mod region_kind {
    /// RAM the kernel owns (its image and stack included).
    pub const RAM: u32 = 1;
    /// RAM holding the boot and shared structures (`crate::layout`): the kernel may read it
    /// and must keep the shared pages (shared info, console ring) where they are.
    pub const BOOT: u32 = 2;
    /// The grant window: not RAM; pages granted by other domains are mapped here (ABI 1.3).
    pub const GRANT_WINDOW: u32 = 3;
}

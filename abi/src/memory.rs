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
    /// Flush guest TLB entries on the vCPUs of the mask `RSI` (bit `v`: vCPU `v` of the
    /// caller's domain): the `R10` guest-virtual addresses of the array of `u64` at
    /// guest-physical `RDX`, or every entry when `R10` is 0. When the call returns, no vCPU
    /// of the mask uses a translation it cached before the call: a running one was
    /// interrupted and flushed, one that is not running is flushed before it next runs
    /// (without being woken). Returns 0. `-EINVAL`: an empty mask, a count above
    /// [`FLUSH_ADDRESSES_MAX`] or a non-canonical address; `-ENOENT`: a bit names no vCPU;
    /// `-EFAULT`: the array is outside RAM. Since ABI 1.6.
    FlushTlb = 2,
}

/// Most addresses one [`MemoryOp::FlushTlb`] takes (a page of them).
pub const FLUSH_ADDRESSES_MAX: u64 = 512;

impl TryFrom<u64> for MemoryOp {
    type Error = crate::Errno;

    fn try_from(op: u64) -> Result<Self, Self::Error> {
        match op {
            0 => Ok(MemoryOp::GetMemoryMap),
            1 => Ok(MemoryOp::CurrentReservation),
            2 => Ok(MemoryOp::FlushTlb),
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

/// Values of [`MemoryRegion::kind`]. Since ABI 1.4 every RAM region that is not free has a
/// kind of its own, so a frame allocator may take every [`region_kind::RAM`] region as free.
pub mod region_kind {
    /// Free RAM: the kernel's to use, with nothing in it (before 1.4 this region also held the
    /// kernel image and the stack).
    pub const RAM: u32 = 1;
    /// Boot information: page 0 (unused), StartInfo, the command line and the boot GDT. The
    /// kernel's once it has read them and loaded a GDT of its own. Before 1.4 this kind was
    /// the whole boot area, shared pages and page tables included.
    pub const BOOT: u32 = 2;
    /// The grant window: not RAM; pages granted by other domains are mapped here (ABI 1.3).
    pub const GRANT_WINDOW: u32 = 3;
    /// The kernel image: its ELF segments, from the first page to `image_end` (ABI 1.4).
    pub const KERNEL_IMAGE: u32 = 4;
    /// The initial stack and, below it, its unmapped guard page (ABI 1.4).
    pub const BOOT_STACK: u32 = 5;
    /// The boot page tables (`CR3` at entry): the kernel's once it runs on tables of its own
    /// (ABI 1.4).
    pub const BOOT_PAGE_TABLES: u32 = 6;
    /// The shared-info page and the console ring, which the hypervisor writes for the
    /// domain's life: never the kernel's to reuse (ABI 1.4).
    pub const SHARED: u32 = 7;
}

/// Most regions a memory map has (ABI 1.4: nine).
pub const MEMORY_MAP_MAX_REGIONS: usize = 9;

//! The domain's memory (`memory_op`, docs/abi.md 11): its map and its size.

use lamina_abi::Hypercall;
use lamina_abi::memory::{MemoryOp, MemoryRegion, region_kind};

use crate::hypercall::{self, HypercallError};

/// Fills `regions` with the start of the memory map and returns how many regions the map has
/// (which may be more than `regions` holds).
pub fn memory_map(regions: &mut [MemoryRegion]) -> Result<usize, HypercallError> {
    // SAFETY: the hypervisor writes at most `regions.len()` entries into the slice, which we
    // borrow mutably for the call; every bit pattern is a valid MemoryRegion.
    let count = unsafe {
        hypercall::call(
            Hypercall::MemoryOp,
            [
                MemoryOp::GetMemoryMap as u64,
                regions.as_mut_ptr() as u64,
                regions.len() as u64,
                0,
                0,
            ],
        )
    }?;
    Ok(count as usize)
}

/// The size of the domain's RAM in bytes.
pub fn current_reservation() -> Result<u64, HypercallError> {
    // SAFETY: touches no guest memory.
    unsafe {
        hypercall::call(
            Hypercall::MemoryOp,
            [MemoryOp::CurrentReservation as u64, 0, 0, 0, 0],
        )
    }
}

/// A name for a [`MemoryRegion::kind`].
pub const fn kind_name(kind: u32) -> &'static str {
    match kind {
        region_kind::RAM => "ram",
        region_kind::BOOT => "boot",
        _ => "unknown",
    }
}

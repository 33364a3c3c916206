//! The domain's memory (`memory_op`, docs/abi.md 11): its map, its size, and TLB shootdowns.

use lamina_abi::memory::{FLUSH_ADDRESSES_MAX, MemoryOp, MemoryRegion, region_kind};
use lamina_abi::{Errno, Hypercall};

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

/// Flushes the TLB entries of `addresses` (all of them when empty) on the vCPUs of `mask`
/// (bit `v`: vCPU `v`), in one hypercall (docs/abi.md 11; ABI 1.6): running vCPUs are
/// interrupted and flushed before this returns, preempted ones are flushed before they next
/// run, without being woken or waited for. At most [`FLUSH_ADDRESSES_MAX`] addresses (more is
/// `EINVAL`, without a call). Since ABI 1.7 a short list (up to 16 pages pending per vCPU) is
/// flushed page by page and a longer one whole; either way no listed translation survives.
pub fn flush_tlb(mask: u64, addresses: &[u64]) -> Result<(), HypercallError> {
    if addresses.len() as u64 > FLUSH_ADDRESSES_MAX {
        return Err(HypercallError::Errno(Errno::EINVAL));
    }
    // SAFETY: the hypervisor only reads the array, which we borrow for the call.
    unsafe {
        hypercall::call(
            Hypercall::MemoryOp,
            [
                MemoryOp::FlushTlb as u64,
                mask,
                addresses.as_ptr() as u64,
                addresses.len() as u64,
                0,
            ],
        )
    }
    .map(|_| ())
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
        region_kind::GRANT_WINDOW => "grant-window",
        region_kind::KERNEL_IMAGE => "kernel-image",
        region_kind::BOOT_STACK => "boot-stack",
        region_kind::BOOT_PAGE_TABLES => "boot-page-tables",
        region_kind::SHARED => "shared",
        _ => "unknown",
    }
}

/// Whether a frame allocator may take a region as free: since ABI 1.4 exactly the RAM-kind
/// regions (before 1.4 the RAM region also held the kernel image and the boot stack, which a
/// kernel had to carve out itself, from `StartInfo`'s `image_start`/`image_end` and
/// `stack_top`).
pub const fn is_free(region: &MemoryRegion) -> bool {
    region.kind == region_kind::RAM
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_name_and_only_ram_is_free() {
        for kind in 1..=7 {
            assert_ne!(kind_name(kind), "unknown", "kind {kind}");
            let region = MemoryRegion {
                kind,
                ..MemoryRegion::default()
            };
            assert_eq!(is_free(&region), kind == region_kind::RAM);
        }
        assert_eq!(kind_name(8), "unknown");
    }
}

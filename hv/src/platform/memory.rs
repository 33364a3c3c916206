//! The hypervisor's memory: the physical allocator filled from the Multiboot2 memory map, and
//! the heap.
//!
//! All RAM below 4 GiB is identity-mapped by the boot page tables, so a physical address
//! returned here is also a pointer the hypervisor may use. Guests never see these addresses:
//! they reach memory only through their own EPT/NPT.

use super::multiboot::BootInfo;
use super::phys_alloc::PhysAllocator;
use core::sync::atomic::{AtomicU64, Ordering};
use linked_list_allocator::LockedHeap;
use spin::Mutex;

/// RAM the boot page tables map (and so the hypervisor can use).
const MAPPED_LIMIT: u64 = 4 << 30;
const HEAP_BYTES: usize = 8 << 20;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

#[repr(C, align(4096))]
struct HeapArea([u8; HEAP_BYTES]);
static mut HEAP_AREA: HeapArea = HeapArea([0; HEAP_BYTES]);

/// Free physical memory for domains, page tables and VMCS/VMCB pages.
pub static PHYS: Mutex<PhysAllocator> = Mutex::new(PhysAllocator::new());

/// What [`PHYS`] manages: the memory that was free once boot took its share.
static MANAGED_BYTES: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    static __hv_image_start: u8;
    static __hv_image_end: u8;
}

/// Fills the physical allocator and sets up the heap. `boot_info` is `[start, end)` of the
/// Multiboot2 information, which must stay intact (module command lines point into it).
pub fn init(info: &BootInfo<'_>, boot_info: (u64, u64)) {
    // SAFETY: HEAP_AREA is used only here, once, as the heap's backing store.
    unsafe { HEAP.lock().init((&raw mut HEAP_AREA).cast(), HEAP_BYTES) };
    let mut phys = PHYS.lock();
    for range in info.ram.iter() {
        let end = range.start.saturating_add(range.len).min(MAPPED_LIMIT);
        phys.add(range.start, end);
    }
    // The first MiB holds firmware data; the rest are in use by the hypervisor.
    phys.remove(0, 1 << 20);
    let image = (
        &raw const __hv_image_start as u64,
        &raw const __hv_image_end as u64,
    );
    phys.remove(image.0, image.1);
    phys.remove(boot_info.0, boot_info.1);
    for module in info.modules.iter() {
        phys.remove(module.start, module.end);
    }
    MANAGED_BYTES.store(phys.free_bytes(), Ordering::Relaxed);
}

/// Bytes the allocator manages (free or in use), and bytes free now.
pub fn figures() -> (u64, u64) {
    let free = PHYS.lock().free_bytes();
    (MANAGED_BYTES.load(Ordering::Relaxed), free)
}

/// Allocates `bytes` of zeroed, `align`-aligned physical memory; returns its address.
pub fn allocate_zeroed(bytes: u64, align: u64) -> Option<u64> {
    let start = PHYS.lock().allocate(bytes, align)?;
    // SAFETY: the range was free RAM below 4 GiB, identity-mapped, and is now ours alone.
    unsafe { core::ptr::write_bytes(start as *mut u8, 0, bytes as usize) };
    Some(start)
}

/// Scrubs and frees memory from [`allocate_zeroed`].
pub fn release(start: u64, bytes: u64) {
    // SAFETY: the caller owned the range; scrubbing before release keeps one domain's data
    // from reaching the next owner.
    unsafe { core::ptr::write_bytes(start as *mut u8, 0, bytes as usize) };
    PHYS.lock().release(start, bytes);
}

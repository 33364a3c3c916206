//! Second-level address translation tables, built by shared code for both vendors.
//!
//! EPT (Intel SDM Vol. 3C 29.3) and NPT (AMD APM Vol. 2 15.25) are both 4-level radix trees of
//! 512 eight-byte entries; only the entry bits differ, and each backend supplies them through
//! [`EntryFormat`]. A domain's RAM is mapped with 2 MiB leaves: fewer tables and TLB entries,
//! and a guest-physical address maps to exactly one host range. The grant window alone has
//! 4 KiB leaves, mapped and unmapped at run time through [`NestedMap`]; its tables are
//! allocated when the domain is built, so mapping a grant never needs memory.

use crate::common::memory::nested_map::{NestedMap, NestedMapError};
use crate::hw::HwError;
use crate::platform::memory;
use core::marker::PhantomData;

const ENTRIES: u64 = 512;
const PAGE: u64 = 0x1000;
const LARGE_PAGE: u64 = 2 << 20;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Page size bit of a directory entry: a leaf, not a table, in both formats (SDM Vol. 3C
/// 29.3.2, APM Vol. 2 15.25.5 with the long-mode PS bit).
const LARGE_BIT: u64 = 1 << 7;

/// How a vendor encodes nested page-table entries.
pub trait EntryFormat {
    /// An entry pointing at the next-level table at `table`.
    fn table(table: u64) -> u64;
    /// A 2 MiB leaf mapping `host` read/write/execute, write-back.
    fn large_leaf(host: u64) -> u64;
    /// A 4 KiB leaf mapping `host` readable and executable, writable when `writable`,
    /// write-back.
    fn small_leaf(host: u64, writable: bool) -> u64;
    /// Whether `entry` is present.
    fn is_present(entry: u64) -> bool;
}

/// One domain's nested page table.
pub struct NestedPageTable<F: EntryFormat> {
    root: u64,
    tables: alloc::vec::Vec<u64>,
    /// Guest-physical `[start, end)` whose page tables exist for 4 KiB leaves.
    small_pages: (u64, u64),
    _format: PhantomData<F>,
}

fn table_slot(table: u64, index: u64) -> *mut u64 {
    (table + index * 8) as *mut u64
}

impl<F: EntryFormat> NestedPageTable<F> {
    /// An empty table (nothing mapped).
    pub fn new() -> Result<Self, HwError> {
        let root = memory::allocate_zeroed(0x1000, 0x1000).ok_or(HwError::OutOfMemory)?;
        Ok(NestedPageTable {
            root,
            tables: alloc::vec![root],
            small_pages: (0, 0),
            _format: PhantomData,
        })
    }

    /// Host-physical address of the top-level table (for EPTP / nCR3).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Maps guest-physical `[gpa, gpa + bytes)` to host-physical `[hpa, hpa + bytes)`; all
    /// three must be 2 MiB multiples.
    pub fn map_large(&mut self, gpa: u64, hpa: u64, bytes: u64) -> Result<(), HwError> {
        debug_assert!((gpa | hpa | bytes).is_multiple_of(LARGE_PAGE));
        for offset in (0..bytes).step_by(LARGE_PAGE as usize) {
            let address = gpa + offset;
            let mut table = self.root;
            for level in [4u32, 3] {
                let index = (address >> (12 + 9 * (level - 1))) % ENTRIES;
                table = self.next_table(table, index)?;
            }
            let index = (address >> 21) % ENTRIES;
            // SAFETY: `table` is a page-table page this structure allocated (identity-mapped).
            unsafe { table_slot(table, index).write_volatile(F::large_leaf(hpa + offset)) };
        }
        Ok(())
    }

    /// Allocates the page tables for 4 KiB leaves over guest-physical `[gpa, gpa + bytes)`
    /// (2 MiB multiples, not RAM), with nothing mapped yet. One range per table.
    pub fn prepare_small_pages(&mut self, gpa: u64, bytes: u64) -> Result<(), HwError> {
        debug_assert!((gpa | bytes).is_multiple_of(LARGE_PAGE));
        for offset in (0..bytes).step_by(LARGE_PAGE as usize) {
            let mut table = self.root;
            for level in [4u32, 3, 2] {
                let index = ((gpa + offset) >> (12 + 9 * (level - 1))) & (ENTRIES - 1);
                table = self.next_table(table, index)?;
            }
        }
        self.small_pages = (gpa, gpa + bytes);
        Ok(())
    }

    /// The 4 KiB leaf entry for `gpa`, if `gpa` is a page of the prepared range.
    fn small_leaf_slot(&self, gpa: u64) -> Option<*mut u64> {
        let (start, end) = self.small_pages;
        if !(start..end).contains(&gpa) || !gpa.is_multiple_of(PAGE) {
            return None;
        }
        let mut table = self.root;
        for level in [4u32, 3, 2] {
            let index = (gpa >> (12 + 9 * (level - 1))) & (ENTRIES - 1);
            // SAFETY: `table` is a page-table page this structure allocated (identity-mapped).
            let entry = unsafe { table_slot(table, index).read_volatile() };
            if !F::is_present(entry) || entry & LARGE_BIT != 0 {
                return None;
            }
            table = entry & ADDRESS_MASK;
        }
        Some(table_slot(table, (gpa >> 12) & (ENTRIES - 1)))
    }

    fn next_table(&mut self, table: u64, index: u64) -> Result<u64, HwError> {
        // SAFETY: `table` is a page-table page this structure allocated (identity-mapped).
        let entry = unsafe { table_slot(table, index).read_volatile() };
        if F::is_present(entry) && entry & LARGE_BIT != 0 {
            return Err(HwError::Layout("a 4 KiB range overlaps a 2 MiB leaf"));
        }
        if F::is_present(entry) {
            return Ok(entry & ADDRESS_MASK);
        }
        let next = memory::allocate_zeroed(0x1000, 0x1000).ok_or(HwError::OutOfMemory)?;
        self.tables.push(next);
        // SAFETY: as above.
        unsafe { table_slot(table, index).write_volatile(F::table(next)) };
        Ok(next)
    }
}

impl<F: EntryFormat> NestedMap for NestedPageTable<F> {
    fn map_page(&mut self, gpa: u64, hpa: u64, writable: bool) -> Result<(), NestedMapError> {
        let slot = self
            .small_leaf_slot(gpa)
            .ok_or(NestedMapError::NotSmallPageRange)?;
        // SAFETY: `slot` is an entry of a page-table page this structure allocated.
        unsafe { slot.write_volatile(F::small_leaf(hpa & ADDRESS_MASK, writable)) };
        Ok(())
    }

    fn unmap_page(&mut self, gpa: u64) -> bool {
        let Some(slot) = self.small_leaf_slot(gpa) else {
            return false;
        };
        // SAFETY: as in `map_page`.
        let old = unsafe { slot.read_volatile() };
        // SAFETY: as in `map_page`.
        unsafe { slot.write_volatile(0) };
        F::is_present(old)
    }
}

impl<F: EntryFormat> Drop for NestedPageTable<F> {
    fn drop(&mut self) {
        for table in self.tables.drain(..) {
            memory::release(table, 0x1000);
        }
    }
}

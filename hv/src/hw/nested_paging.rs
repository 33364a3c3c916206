//! Second-level address translation tables, built by shared code for both vendors.
//!
//! EPT (Intel SDM Vol. 3C 29.3) and NPT (AMD APM Vol. 2 15.25) are both 4-level radix trees of
//! 512 eight-byte entries; only the entry bits differ, and each backend supplies them through
//! [`EntryFormat`]. A domain's RAM is mapped with 2 MiB leaves: fewer tables and TLB entries,
//! and a guest-physical address maps to exactly one host range.

use crate::hw::HwError;
use crate::platform::memory;
use core::marker::PhantomData;

const ENTRIES: u64 = 512;
const LARGE_PAGE: u64 = 2 << 20;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// How a vendor encodes nested page-table entries.
pub trait EntryFormat {
    /// An entry pointing at the next-level table at `table`.
    fn table(table: u64) -> u64;
    /// A 2 MiB leaf mapping `host` read/write/execute, write-back.
    fn large_leaf(host: u64) -> u64;
    /// Whether `entry` is present.
    fn is_present(entry: u64) -> bool;
}

/// One domain's nested page table.
pub struct NestedPageTable<F: EntryFormat> {
    root: u64,
    tables: alloc::vec::Vec<u64>,
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

    fn next_table(&mut self, table: u64, index: u64) -> Result<u64, HwError> {
        // SAFETY: `table` is a page-table page this structure allocated (identity-mapped).
        let entry = unsafe { table_slot(table, index).read_volatile() };
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

impl<F: EntryFormat> Drop for NestedPageTable<F> {
    fn drop(&mut self) {
        for table in self.tables.drain(..) {
            memory::release(table, 0x1000);
        }
    }
}

//! EPT entry bits (Intel SDM Vol. 3C 29.3.2): read, write, execute; write-back leaves.

use crate::hw::nested_paging::EntryFormat;

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const EXECUTE: u64 = 1 << 2;
const READ_WRITE_EXECUTE: u64 = READ | WRITE | EXECUTE;
const MEMORY_TYPE_WRITE_BACK: u64 = 6 << 3;
const LARGE: u64 = 1 << 7;

/// Intel extended page tables.
pub struct Ept;

impl EntryFormat for Ept {
    fn table(table: u64) -> u64 {
        table | READ_WRITE_EXECUTE
    }
    fn large_leaf(host: u64) -> u64 {
        host | READ_WRITE_EXECUTE | MEMORY_TYPE_WRITE_BACK | LARGE
    }
    fn small_leaf(host: u64, writable: bool) -> u64 {
        // A 4 KiB leaf: bits 2:0 access rights, bits 5:3 memory type (SDM Vol. 3C 29.3.2).
        let write = if writable { WRITE } else { 0 };
        host | READ | write | EXECUTE | MEMORY_TYPE_WRITE_BACK
    }
    fn is_present(entry: u64) -> bool {
        entry & READ_WRITE_EXECUTE != 0
    }
}

/// The EPT pointer for a root table: write-back, 4-level walk (SDM Vol. 3C 25.6.11).
pub fn eptp(root: u64) -> u64 {
    root | (3 << 3) | 6
}

//! NPT entry bits (AMD APM Vol. 2 15.25.5): ordinary long-mode page-table entries. Nested
//! walks are user accesses, so every level sets U/S.

use crate::hw::nested_paging::EntryFormat;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;

/// AMD nested page tables.
pub struct Npt;

impl EntryFormat for Npt {
    fn table(table: u64) -> u64 {
        table | PRESENT | WRITABLE | USER
    }
    fn large_leaf(host: u64) -> u64 {
        host | PRESENT | WRITABLE | USER | LARGE
    }
    fn small_leaf(host: u64, writable: bool) -> u64 {
        // A 4 KiB PTE; R/W clear makes a write fault as a nested page fault (APM Vol. 2 15.25.5).
        let write = if writable { WRITABLE } else { 0 };
        host | PRESENT | write | USER
    }
    fn is_present(entry: u64) -> bool {
        entry & PRESENT != 0
    }
}

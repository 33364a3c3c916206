//! Walking a guest's own page tables, to read the instruction at a guest RIP.
//!
//! Only needed off the hot path (decoding the other vendor's hypercall instruction after a
//! #UD). Handles 4-level IA-32e paging with 1 GiB and 2 MiB pages (Intel SDM Vol. 3A 4.5,
//! AMD APM Vol. 2 5.3); every table read goes through [`GuestMemory`] bounds checks.

use crate::common::guest_memory::GuestMemory;

/// The guest's paging mode, from its CR0, CR4 and EFER.
#[derive(Clone, Copy, Debug)]
pub struct PagingMode {
    /// CR0.PG.
    pub paging: bool,
    /// EFER.LMA (4-level paging when `paging`).
    pub long_mode: bool,
    /// CR3.
    pub cr3: u64,
}

const PRESENT: u64 = 1;
const LARGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates a guest-virtual address; `None` when not mapped, outside RAM, or in a paging
/// mode other than none or 4-level.
pub fn translate(mem: &GuestMemory, mode: PagingMode, va: u64) -> Option<u64> {
    if !mode.paging {
        return Some(va);
    }
    if !mode.long_mode {
        return None;
    }
    let mut table = mode.cr3 & ADDRESS_MASK;
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (va >> shift) & 0x1ff;
        let entry = mem.read_u64(table + index * 8).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        if level == 1 || (level <= 3 && entry & LARGE != 0) {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDRESS_MASK & !page_mask) | (va & page_mask));
        }
        table = entry & ADDRESS_MASK;
    }
    None
}

/// Reads up to `buf.len()` instruction bytes at guest-virtual `rip` (may cross one page).
pub fn read_code(mem: &GuestMemory, mode: PagingMode, rip: u64, buf: &mut [u8]) -> Option<()> {
    for (i, byte) in buf.iter_mut().enumerate() {
        let gpa = translate(mem, mode, rip.wrapping_add(i as u64))?;
        let mut one = [0u8];
        mem.read(gpa, &mut one).ok()?;
        *byte = one[0];
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::guest_memory::testing::test_memory;

    #[test]
    fn walks_4k_2m_pages_and_refuses_the_unmapped() {
        let t = test_memory(0x40_0000);
        let m = &t.mem;
        // PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000: PD[0] -> PT 0x4000, PD[1] 2 MiB page at 0x20_0000.
        m.write_u64(0x1000, 0x2000 | 3).unwrap();
        m.write_u64(0x2000, 0x3000 | 3).unwrap();
        m.write_u64(0x3000, 0x4000 | 3).unwrap();
        m.write_u64(0x3008, 0x20_0000 | 3 | LARGE).unwrap();
        m.write_u64(0x4000 + 5 * 8, 0x7000 | 3).unwrap();
        let mode = PagingMode {
            paging: true,
            long_mode: true,
            cr3: 0x1000,
        };
        assert_eq!(translate(m, mode, 0x5123), Some(0x7123));
        assert_eq!(translate(m, mode, 0x20_1234), Some(0x20_1234));
        assert_eq!(translate(m, mode, 0x6000), None, "PTE not present");
        assert_eq!(translate(m, mode, 1 << 39), None, "PML4E not present");
        let outside = PagingMode {
            cr3: 0x100_0000_0000,
            ..mode
        };
        assert_eq!(translate(m, outside, 0x5123), None, "tables outside RAM");
        assert_eq!(
            translate(
                m,
                PagingMode {
                    paging: false,
                    ..mode
                },
                0x5123
            ),
            Some(0x5123)
        );
    }
}

//! Walking a guest's own page tables: to read the instruction at a guest RIP, and to reach a
//! string instruction's buffer with the checks and #PF error codes of the CPU.
//!
//! Only needed off the hot path (the other vendor's hypercall instruction after a #UD, CR
//! accesses under SVM without decode assists, string I/O). Handles 4-level IA-32e paging with 1 GiB and 2 MiB pages (Intel SDM Vol. 3A 4.5,
//! AMD APM Vol. 2 5.3); every table read goes through [`GuestMemory`] bounds checks.

use crate::common::memory::guest_memory::GuestMemory;

/// The guest's paging mode, from its CR0, CR4 and EFER.
#[derive(Clone, Copy, Debug)]
pub struct PagingMode {
    /// CR0.PG.
    pub paging: bool,
    /// EFER.LMA (4-level paging when `paging`).
    pub long_mode: bool,
    /// CR3.
    pub cr3: u64,
    /// CR0.WP: supervisor writes honour read-only pages.
    pub write_protect: bool,
}

/// A data access checked against the guest's page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// A write (else a read).
    pub write: bool,
    /// At CPL 3.
    pub user: bool,
}

/// Where a checked access lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// The guest-physical address (possibly outside RAM: the tables may point anywhere).
    Mapped(u64),
    /// The access raises #PF with this error code (P, W/R, U/S; SDM Vol. 3A 4.7).
    PageFault {
        /// The #PF error code.
        error_code: u32,
    },
}

const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;

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

/// Translates `va` for a data `access` as the CPU would (SDM Vol. 3A 4.6): every level must be
/// present, writable for a write (supervisor writes only with CR0.WP set) and user-accessible
/// for CPL 3. Sets the accessed flags on the way, and the dirty flag of the page written, as
/// the CPU does. Tables outside RAM read as not present.
pub fn translate_checked(
    mem: &GuestMemory,
    mode: PagingMode,
    va: u64,
    access: Access,
) -> Translation {
    let error = |present: bool| {
        let mut code = 0;
        if present {
            code |= 1;
        }
        if access.write {
            code |= 2;
        }
        if access.user {
            code |= 4;
        }
        Translation::PageFault { error_code: code }
    };
    if !mode.paging {
        return Translation::Mapped(va);
    }
    if !mode.long_mode {
        return error(false);
    }
    let mut table = mode.cr3 & ADDRESS_MASK;
    let (mut writable, mut user) = (true, true);
    let mut walked = [(0u64, 0u64); 4];
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (va >> shift) & 0x1ff;
        let at = table + index * 8;
        let Ok(entry) = mem.read_u64(at) else {
            return error(false);
        };
        if entry & PRESENT == 0 {
            return error(false);
        }
        walked[(4 - level) as usize] = (at, entry);
        writable &= entry & WRITABLE != 0;
        user &= entry & USER != 0;
        if level == 1 || (level <= 3 && entry & LARGE != 0) {
            let denied = (access.user && !user)
                || (access.write && !writable && (access.user || mode.write_protect));
            if denied {
                return error(true);
            }
            for (i, (at, entry)) in walked.iter().enumerate().take((5 - level) as usize) {
                let leaf = i == (4 - level) as usize;
                let flags = ACCESSED | if leaf && access.write { DIRTY } else { 0 };
                if entry & flags != flags {
                    let _ = mem.write_u64(*at, entry | flags);
                }
            }
            let page_mask = (1u64 << shift) - 1;
            return Translation::Mapped((entry & ADDRESS_MASK & !page_mask) | (va & page_mask));
        }
        table = entry & ADDRESS_MASK;
    }
    error(false)
}

/// Reads up to `buf.len()` instruction bytes at guest-virtual `rip` (may cross one page): one
/// walk per page touched.
pub fn read_code(mem: &GuestMemory, mode: PagingMode, rip: u64, buf: &mut [u8]) -> Option<()> {
    let mut done = 0;
    while done < buf.len() {
        let va = rip.wrapping_add(done as u64);
        let in_page = (0x1000 - (va & 0xfff)) as usize;
        let chunk = in_page.min(buf.len() - done);
        let gpa = translate(mem, mode, va)?;
        mem.read(gpa, &mut buf[done..done + chunk]).ok()?;
        done += chunk;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::memory::guest_memory::testing::test_memory;

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
            write_protect: true,
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

    #[test]
    fn checked_walks_fault_like_the_cpu_and_set_accessed_and_dirty() {
        let t = test_memory(0x40_0000);
        let m = &t.mem;
        // PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000: page 5 writable, page 6
        // read-only, page 7 supervisor only.
        m.write_u64(0x1000, 0x2000 | 7).unwrap();
        m.write_u64(0x2000, 0x3000 | 7).unwrap();
        m.write_u64(0x3000, 0x4000 | 7).unwrap();
        m.write_u64(0x4000 + 5 * 8, 0x7000 | 7).unwrap();
        m.write_u64(0x4000 + 6 * 8, 0x8000 | 5).unwrap();
        m.write_u64(0x4000 + 7 * 8, 0x9000 | 3).unwrap();
        let mode = PagingMode {
            paging: true,
            long_mode: true,
            cr3: 0x1000,
            write_protect: true,
        };
        let kernel_write = Access {
            write: true,
            user: false,
        };
        let user_read = Access {
            write: false,
            user: true,
        };
        assert_eq!(
            translate_checked(m, mode, 0x5010, kernel_write),
            Translation::Mapped(0x7010)
        );
        assert_eq!(
            m.read_u64(0x4000 + 5 * 8).unwrap(),
            0x7000 | 7 | ACCESSED | DIRTY
        );
        assert_eq!(m.read_u64(0x1000).unwrap(), 0x2000 | 7 | ACCESSED);
        assert_eq!(
            translate_checked(m, mode, 0x6000, kernel_write),
            Translation::PageFault { error_code: 3 }
        );
        let no_wp = PagingMode {
            write_protect: false,
            ..mode
        };
        assert_eq!(
            translate_checked(m, no_wp, 0x6000, kernel_write),
            Translation::Mapped(0x8000)
        );
        assert_eq!(
            translate_checked(m, mode, 0x7000, user_read),
            Translation::PageFault { error_code: 5 }
        );
        assert_eq!(
            translate_checked(m, mode, 0xa000, user_read),
            Translation::PageFault { error_code: 4 }
        );
    }
}

//! The guest-physical layout of a freshly built domain.
//!
//! A domain's RAM is guest-physical `[0, mem_bytes)`. The hypervisor fills the low pages
//! below with boot structures and enters the kernel in 64-bit long mode with paging on and
//! every byte of RAM identity-mapped (virtual address == guest-physical address) by 2 MiB
//! pages, except the top 2 MiB, mapped by 4 KiB pages so that the guard page below the stack
//! is not mapped (ABI 1.4). The kernel's ELF segments must lie in
//! `[KERNEL_MIN_GPA, stack_guard_gpa(mem_bytes))`.

/// The [`crate::StartInfo`] page. RDI holds this address at entry.
pub const START_INFO_GPA: u64 = 0x1000;
/// The domain's command line (NUL-terminated, at most [`CMDLINE_MAX`] bytes before the NUL).
pub const CMDLINE_GPA: u64 = 0x2000;
/// Longest command line passed to a guest.
pub const CMDLINE_MAX: usize = 1023;
/// The boot GDT: null, 64-bit code ([`BOOT_CODE_SELECTOR`]), data ([`BOOT_DATA_SELECTOR`]).
pub const BOOT_GDT_GPA: u64 = 0x3000;
/// The boot page tables: PML4, PDPT, PD (one page each); CR3 at entry.
pub const BOOT_PML4_GPA: u64 = 0x4000;
/// The boot page-directory-pointer table, PML4 entry 0.
pub const BOOT_PDPT_GPA: u64 = 0x5000;
/// The boot page directory (2 MiB entries) of the identity map.
pub const BOOT_PD_GPA: u64 = 0x6000;
const _: () =
    assert!(BOOT_PDPT_GPA == BOOT_PML4_GPA + 0x1000 && BOOT_PD_GPA == BOOT_PDPT_GPA + 0x1000);
/// The shared-info page ([`crate::shared_info::SharedInfo`]).
pub const SHARED_INFO_GPA: u64 = 0x7000;
/// The console ring page ([`crate::console::ConsoleRing`]).
pub const CONSOLE_RING_GPA: u64 = 0x8000;
/// The boot page directory that maps the grant window (ABI 1.3).
pub const BOOT_GRANT_PD_GPA: u64 = 0x9000;
/// The boot page table of the top 2 MiB of RAM (4 KiB pages), whose entry for the stack's
/// guard page is not present (ABI 1.4).
pub const BOOT_STACK_PT_GPA: u64 = 0xa000;
/// End of the boot area: `[0, BOOT_AREA_END)` holds the structures above.
pub const BOOT_AREA_END: u64 = 0x1_0000;
/// First byte a kernel image may occupy.
pub const KERNEL_MIN_GPA: u64 = 0x10_0000;
/// Size of the initial stack at the top of RAM. RSP = `mem_bytes` at entry.
pub const STACK_BYTES: u64 = 64 * 1024;
/// The guard page just below the initial stack: RAM, but not mapped by the boot page tables,
/// so a stack overflow page-faults instead of overwriting what lies below (ABI 1.4).
pub const STACK_GUARD_BYTES: u64 = 4096;

/// The guard page of a domain with `mem_bytes` of RAM: `[stack_guard_gpa, + STACK_GUARD_BYTES)`,
/// just below the initial stack. It is also the end of the kernel area.
/// (0 for a size below the smallest RAM, which no domain has.)
pub const fn stack_guard_gpa(mem_bytes: u64) -> u64 {
    mem_bytes.saturating_sub(STACK_BYTES + STACK_GUARD_BYTES)
}
/// 64-bit code segment selector in the boot GDT.
pub const BOOT_CODE_SELECTOR: u16 = 0x08;
/// Data segment selector in the boot GDT. Since ABI 1.4 the kernel enters with null data
/// selectors (DS, ES, SS, FS, GS = 0); this descriptor is there for a kernel that loads it.
pub const BOOT_DATA_SELECTOR: u16 = 0x10;

/// Smallest domain RAM.
pub const MEM_MIN_BYTES: u64 = 4 << 20;
/// Largest domain RAM (the boot page tables map one 1 GiB PD).
pub const MEM_MAX_BYTES: u64 = 1 << 30;
/// Domain RAM when the command line says nothing.
pub const MEM_DEFAULT_BYTES: u64 = 16 << 20;
/// RAM sizes are rounded up to this granule (one large page).
pub const MEM_GRANULE_BYTES: u64 = 2 << 20;

/// The grant window: guest-physical pages where grants of other domains are mapped (ABI 1.3).
/// It starts just above the largest RAM and is identity-mapped by the boot page tables with one
/// 2 MiB page; a page of it that has no grant mapped is outside the domain's memory.
pub const GRANT_WINDOW_GPA: u64 = MEM_MAX_BYTES;
/// Pages in the grant window.
pub const GRANT_WINDOW_PAGES: u64 = 512;
/// Bytes in the grant window.
pub const GRANT_WINDOW_BYTES: u64 = GRANT_WINDOW_PAGES * 4096;

const _: () = assert!(GRANT_WINDOW_GPA >= MEM_MAX_BYTES);
const _: () = assert!(
    GRANT_WINDOW_BYTES == MEM_GRANULE_BYTES,
    "one boot 2 MiB page maps it"
);
const _: () = assert!(
    STACK_BYTES + STACK_GUARD_BYTES <= MEM_GRANULE_BYTES,
    "the guard page lies in the top 2 MiB, which BOOT_STACK_PT_GPA maps"
);
const _: () = assert!(BOOT_STACK_PT_GPA + 0x1000 <= BOOT_AREA_END);

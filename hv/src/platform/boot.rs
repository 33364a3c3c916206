//! From GRUB to Rust: the Multiboot2 header and the 32-bit to 64-bit trampoline.
//!
//! GRUB enters `_start` in 32-bit protected mode with paging off, EAX = the Multiboot2 magic
//! and EBX = the physical address of the boot information (Multiboot2 specification, "Machine
//! state"). The trampoline identity-maps the first 4 GiB with 2 MiB pages, turns on long mode
//! (Intel SDM Vol. 3A 10.8.5, "Initializing IA-32e Mode") and calls [`hv_entry`](super::super::hv_entry)
//! with the magic and the boot-information address.

use core::arch::global_asm;

/// Size of the boot (and only) hypervisor stack of the bootstrap CPU.
pub const BOOT_STACK_BYTES: usize = 64 * 1024;

global_asm!(
    r#"
    .section .multiboot2, "a"
    .balign 8
mb2_header_start:
    .long 0xE85250D6
    .long 0
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - (0xE85250D6 + (mb2_header_end - mb2_header_start))
    /* Module alignment tag: modules start on page boundaries. */
    .balign 8
    .short 6
    .short 0
    .long 8
    /* End tag. */
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:

    .section .text.boot, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    mov edi, eax
    mov esi, ebx
    mov esp, offset boot_stack_top

    /* PML4[0] -> PDPT; PDPT[0..4] -> four PDs; PD entries map 2 MiB each (P|RW|PS). */
    mov eax, offset boot_pdpt
    or eax, 3
    mov dword ptr [boot_pml4], eax
    xor ecx, ecx
1:
    mov eax, ecx
    shl eax, 12
    add eax, offset boot_pds
    or eax, 3
    mov dword ptr [boot_pdpt + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jne 1b
    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov dword ptr [boot_pds + ecx * 8], eax
    mov edx, ecx
    shr edx, 11
    mov dword ptr [boot_pds + ecx * 8 + 4], edx
    inc ecx
    cmp ecx, 2048
    jne 2b

    mov eax, cr4
    or eax, 0x20            /* PAE */
    mov cr4, eax
    mov eax, offset boot_pml4
    mov cr3, eax
    mov ecx, 0xC0000080     /* IA32_EFER */
    rdmsr
    or eax, 0x100           /* LME */
    wrmsr
    mov eax, cr0
    or eax, 0x80010021      /* PG | WP | NE | PE */
    mov cr0, eax
    lgdt [boot_gdt_pointer]
    mov eax, offset long_mode_entry
    push 0x08
    push eax
    retf

    .code64
long_mode_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov edi, edi            /* zero-extend the magic and the boot information address */
    mov esi, esi
    mov rsp, offset boot_stack_top
    xor ebp, ebp
    call hv_entry
3:
    cli
    hlt
    jmp 3b

    .section .rodata
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
boot_gdt_end:
boot_gdt_pointer:
    .short boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .section .bss
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
    .global boot_pds
boot_pds:
    .skip 4096 * 4
    .balign 16
    .global boot_stack_bottom
boot_stack_bottom:
    .skip {stack}
    .global boot_stack_top
boot_stack_top:
"#,
    stack = const BOOT_STACK_BYTES,
);

unsafe extern "C" {
    /// The four page directories of the boot identity map (2 MiB pages, first 4 GiB).
    static mut boot_pds: [u64; 2048];
}

/// Marks the 2 MiB page holding `address` (below 4 GiB) uncacheable, for device registers.
pub fn make_uncached(address: u64) {
    const PWT_PCD: u64 = 0b11 << 3;
    let index = (address >> 21) as usize;
    // SAFETY: the boot page directories are the live identity map; setting PCD|PWT on one
    // entry only changes its caching, and the INVLPG drops the stale translation.
    unsafe {
        let entry = &raw mut boot_pds[index];
        entry.write_volatile(entry.read_volatile() | PWT_PCD);
        core::arch::asm!("invlpg [{}]", in(reg) address, options(nostack));
    }
}

//! Tests of the start-of-day state (docs/abi.md section 4): CPU state at entry, the boot page
//! tables, StartInfo. They run before anything else changes that state: the conformance
//! kernel loads its own GDT and IDT only in the tests that need them.

use core::arch::asm;

use lamina_abi::abi_version;
use lamina_abi::layout::{
    BOOT_CODE_SELECTOR, BOOT_GDT_GPA, BOOT_PD_GPA, BOOT_PDPT_GPA, BOOT_PML4_GPA, CMDLINE_GPA,
    CMDLINE_MAX, CONSOLE_RING_GPA, KERNEL_MIN_GPA, MEM_GRANULE_BYTES, MEM_MAX_BYTES, MEM_MIN_BYTES,
    SHARED_INFO_GPA, STACK_BYTES, START_INFO_GPA, stack_guard_gpa,
};
use lamina_abi::start_info::{START_FLAG_PRIVILEGED, START_INFO_MAGIC};
use lamina_guest_sdk::{cmdline, start_info, start_info_gpa};

use crate::framework::{self, Hex, check, check_eq};
use crate::x86::{self, idt};

/// RFLAGS bits that must be clear at entry: TF, IF, DF, IOPL, NT, AC.
const RFLAGS_CLEAR_AT_ENTRY: u64 = 1 << 8 | 1 << 9 | 1 << 10 | 3 << 12 | 1 << 14 | 1 << 18;
const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;

conformance_test! {
    title: "segments (null data selectors, 1.4), flags, control registers and descriptor tables at entry are as specified",
    section: "4.1 Entry state",
    expect: Success,
}
pub(super) fn entry_state_matches_spec() {
    // Null data selectors since 1.4: in a kernel's own GDT 0x10 may be anything (a TSS).
    for (name, selector) in x86::segment_selectors() {
        let expected = if name == "CS" { BOOT_CODE_SELECTOR } else { 0 };
        check_eq!(
            format_args!("{name} selector"),
            Hex(expected),
            Hex(selector)
        );
    }
    let rflags = x86::read_rflags();
    check_eq!(
        "RFLAGS & (TF|IF|DF|IOPL|NT|AC)",
        Hex(0),
        Hex(rflags & RFLAGS_CLEAR_AT_ENTRY)
    );

    let gdtr = x86::sgdt();
    let (gdt_base, gdt_limit) = (gdtr.base, gdtr.limit);
    check_eq!("GDTR base", Hex(BOOT_GDT_GPA), Hex(gdt_base));
    check!(
        gdt_limit >= 3 * 8 - 1,
        "GDTR limit {gdt_limit:#x} too small for null, code, data"
    );
    let idt_limit = x86::sidt().limit;
    check_eq!("IDTR limit", Hex(0), Hex(idt_limit));

    let cr0 = x86::read_cr0();
    check_eq!(
        "CR0.PE and CR0.PG",
        Hex(CR0_PE | CR0_PG),
        Hex(cr0 & (CR0_PE | CR0_PG))
    );
    let cr4 = x86::read_cr4();
    check_eq!("CR4.PAE", Hex(CR4_PAE), Hex(cr4 & CR4_PAE));
    check_eq!(
        "CR4.SMEP and CR4.SMAP",
        Hex(0),
        Hex(cr4 & (CR4_SMEP | CR4_SMAP))
    );
    check_eq!(
        "CR3 page-table base",
        Hex(BOOT_PML4_GPA),
        Hex(x86::read_cr3() & PAGE_ADDRESS)
    );

    let mem = start_info().mem_bytes;
    let rsp = x86::read_rsp();
    check!(
        rsp < mem && rsp >= mem - STACK_BYTES,
        "RSP {rsp:#x} outside the initial stack [{:#x}, {mem:#x})",
        mem - STACK_BYTES
    );
}

/// Bits 12-51 of a page-table entry or CR3: the address of the next table.
const PAGE_ADDRESS: u64 = 0x000f_ffff_ffff_f000;
/// Bits 21-51 of a 2 MiB page entry: the page's address.
const LARGE_PAGE_ADDRESS: u64 = 0x000f_ffff_ffe0_0000;
const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
const LARGE_PAGE_BYTES: u64 = 2 << 20;

/// Entry `index` of the page table at `table`.
fn table_entry(table: u64, index: u64) -> u64 {
    // SAFETY: the tables lie in RAM below the kernel (checked by the caller), which is
    // identity-mapped; reading a page-table entry has no side effect.
    unsafe { core::ptr::read_volatile((table + index * 8) as *const u64) }
}

/// Checks that the table at `table` lies among the boot structures.
fn check_table_placement(what: &str, table: u64) -> bool {
    check!(
        (BOOT_PML4_GPA..KERNEL_MIN_GPA).contains(&table),
        "{what} at {table:#x}, outside the boot area [{BOOT_PML4_GPA:#x}, {KERNEL_MIN_GPA:#x})"
    )
}

conformance_test! {
    title: "the boot page tables map all RAM 1:1, writable and user, by 2 MiB pages and the top 2 MiB by 4 KiB pages without the guard page",
    section: "4.2 Guest-physical layout",
    expect: Success,
}
pub(super) fn boot_tables_identity_map_ram() {
    let mem = start_info().mem_bytes;
    let pml4 = x86::read_cr3() & PAGE_ADDRESS;
    if !check_table_placement("PML4", pml4) {
        return;
    }
    let pml4e = table_entry(pml4, 0);
    check_eq!(
        "PML4[0] P, RW, U",
        Hex(PRESENT | WRITABLE | USER),
        Hex(pml4e & (PRESENT | WRITABLE | USER))
    );
    let pdpt = pml4e & PAGE_ADDRESS;
    check_eq!("PDPT address (4.2)", Hex(BOOT_PDPT_GPA), Hex(pdpt));
    if !check_table_placement("PDPT", pdpt) {
        return;
    }
    let pdpte = table_entry(pdpt, 0);
    let wanted = PRESENT | WRITABLE | USER | LARGE;
    check_eq!(
        "PDPT[0] P, RW, U, PS (no 1 GiB page)",
        Hex(wanted & !LARGE),
        Hex(pdpte & wanted)
    );
    let pd = pdpte & PAGE_ADDRESS;
    check_eq!("PD address (4.2)", Hex(BOOT_PD_GPA), Hex(pd));
    if !check_table_placement("PD", pd) {
        return;
    }
    let top = mem / LARGE_PAGE_BYTES - 1;
    for index in 0..top {
        let pde = table_entry(pd, index);
        let ok = check_eq!(
            format_args!("PD[{index}] P, RW, U, PS"),
            Hex(wanted),
            Hex(pde & wanted)
        ) && check_eq!(
            format_args!("PD[{index}] address"),
            Hex(index * LARGE_PAGE_BYTES),
            Hex(pde & LARGE_PAGE_ADDRESS)
        );
        if !ok {
            return; // one bad entry says enough
        }
    }
    // Since 1.4 the top 2 MiB by 4 KiB pages, all present but the stack's guard page.
    let pde = table_entry(pd, top);
    check_eq!(
        "PD[top] P, RW, U, no PS (a page table)",
        Hex(PRESENT | WRITABLE | USER),
        Hex(pde & wanted)
    );
    let pt = pde & PAGE_ADDRESS;
    if !check_table_placement("stack PT", pt) {
        return;
    }
    let guard = stack_guard_gpa(mem);
    for index in 0..512 {
        let page = top * LARGE_PAGE_BYTES + index * 4096;
        let pte = table_entry(pt, index);
        let ok = if page == guard {
            check_eq!("PT entry of the guard page", Hex(0), Hex(pte & PRESENT))
        } else {
            check_eq!(
                format_args!("PT[{index}] P, RW, U and address"),
                Hex(page | PRESENT | WRITABLE | USER),
                Hex(pte & (PAGE_ADDRESS | PRESENT | WRITABLE | USER))
            )
        };
        if !ok {
            return;
        }
    }
    check_ram_is_distinct_and_writable();
}

/// Writes a different word into every 2 MiB page of free RAM (between the image and the
/// stack), then reads them all back: each page must be real, writable and not an alias.
fn check_ram_is_distinct_and_writable() {
    let info = start_info();
    let free = info.image_end..stack_guard_gpa(info.mem_bytes) - 8;
    // The first free word of each 2 MiB page that has one.
    let probe_address = |page: u64| {
        (page * LARGE_PAGE_BYTES)
            .max(free.start)
            .next_multiple_of(8)
    };
    let pages = || {
        (0..info.mem_bytes / LARGE_PAGE_BYTES).filter(|&page| {
            let address = probe_address(page);
            free.contains(&address) && address < (page + 1) * LARGE_PAGE_BYTES
        })
    };
    for page in pages() {
        // SAFETY: the word lies in free RAM, above the image and below the stack, which no one
        // else uses in this domain.
        unsafe {
            core::ptr::write_volatile(
                probe_address(page) as *mut u64,
                0x1a31_4a00_0000_0000 | page,
            )
        };
    }
    for page in pages() {
        // SAFETY: as above; we wrote this word.
        let read = unsafe { core::ptr::read_volatile(probe_address(page) as *const u64) };
        check_eq!(
            format_args!("word written at {:#x}", probe_address(page)),
            Hex(0x1a31_4a00_0000_0000 | page),
            Hex(read)
        );
    }
    check!(
        pages().count() > 0,
        "no free 2 MiB page to write to in [{:#x}, {:#x})",
        free.start,
        free.end
    );
}

unsafe extern "C" {
    /// The ELF header, the first byte of the image (defined by the linker).
    static __ehdr_start: u8;
    /// The end of `.bss`, the last byte of the image (defined by the linker).
    static _end: u8;
}

conformance_test! {
    title: "every StartInfo field is consistent with the layout and the command line",
    section: "4.3 StartInfo",
    expect: Success,
}
pub(super) fn start_info_fields_valid() {
    let info = start_info();
    check_eq!(
        "StartInfo address (RDI at entry)",
        Hex(START_INFO_GPA),
        Hex(start_info_gpa())
    );
    check_eq!("magic", Hex(START_INFO_MAGIC), Hex(info.magic));
    check_eq!("abi_version", Hex(abi_version()), Hex(info.abi_version));
    check!(
        info.domain_id >= 1,
        "domain_id {} (domains count from 1)",
        info.domain_id
    );
    check_eq!(
        "flags other than PRIVILEGED",
        Hex(0),
        Hex(info.flags & !START_FLAG_PRIVILEGED)
    );
    check_eq!("nr_vcpus >= 1", true, info.nr_vcpus >= 1);
    check_eq!(
        "console_port (allocated by the hypervisor at boot)",
        1,
        info.console_port
    );
    check_eq!(
        "shared_info_gpa",
        Hex(SHARED_INFO_GPA),
        Hex(info.shared_info_gpa)
    );
    check_eq!(
        "console_ring_gpa",
        Hex(CONSOLE_RING_GPA),
        Hex(info.console_ring_gpa)
    );
    check!(info.tsc_khz > 0, "tsc_khz is 0");

    let mem = info.mem_bytes;
    check!(
        (MEM_MIN_BYTES..=MEM_MAX_BYTES).contains(&mem) && mem.is_multiple_of(MEM_GRANULE_BYTES),
        "mem_bytes {mem:#x} not a multiple of {MEM_GRANULE_BYTES:#x} in [{MEM_MIN_BYTES:#x}, {MEM_MAX_BYTES:#x}]"
    );
    check_eq!("stack_top", Hex(mem), Hex(info.stack_top));

    let image_first = &raw const __ehdr_start as u64;
    let image_last = &raw const _end as u64;
    check_eq!(
        "image_start (our first PT_LOAD address)",
        Hex(image_first),
        Hex(info.image_start)
    );
    check_eq!(
        "image_end (the page above our .bss)",
        Hex(image_last.next_multiple_of(4096)),
        Hex(info.image_end)
    );
    check!(
        info.image_start >= KERNEL_MIN_GPA,
        "image_start {:#x} below {KERNEL_MIN_GPA:#x}",
        info.image_start
    );
    check!(
        info.image_end <= stack_guard_gpa(mem),
        "image_end {:#x} reaches into the stack's guard page at {:#x}",
        info.image_end,
        stack_guard_gpa(mem)
    );

    check_eq!("cmdline_gpa", Hex(CMDLINE_GPA), Hex(info.cmdline_gpa));
    check!(
        info.cmdline_len <= CMDLINE_MAX as u64,
        "cmdline_len {} > {CMDLINE_MAX}",
        info.cmdline_len
    );
    if info.cmdline_gpa == CMDLINE_GPA && info.cmdline_len <= CMDLINE_MAX as u64 {
        // SAFETY: the command line page lies in identity-mapped RAM and nobody writes it; we
        // read `cmdline_len` bytes and the NUL after them, inside that page.
        let raw = unsafe {
            core::slice::from_raw_parts(CMDLINE_GPA as *const u8, info.cmdline_len as usize + 1)
        };
        let (line, nul) = raw.split_at(raw.len() - 1);
        check_eq!("byte after the command line", 0, nul[0]);
        check_eq!(
            "NUL bytes inside the command line",
            0,
            line.iter().filter(|&&b| b == 0).count()
        );
        check_eq!(
            "command line as the SDK copied it",
            line,
            cmdline().as_bytes()
        );
    }

    check_name(info);
}

/// The name is the first bare word of the command line, or `d<ID>` without one; NUL-padded.
fn check_name(info: &lamina_abi::StartInfo) {
    let name = info.name();
    let used = info
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.name.len());
    check!(
        !name.is_empty() && name != "?",
        "name {:?} empty or not UTF-8",
        info.name
    );
    check!(
        info.name[used..].iter().all(|&b| b == 0),
        "name {:?} not NUL-padded",
        info.name
    );
    match lamina_guest_sdk::cmdline::first_bare_word(cmdline()) {
        Some(word) => {
            check!(
                word.starts_with(name),
                "name {name:?}, but the command line names {word:?}"
            );
        }
        None => {
            let id = name
                .strip_prefix('d')
                .and_then(|digits| digits.parse::<u32>().ok());
            check_eq!(
                format_args!("default name {name:?} as d<ID>"),
                Some(info.domain_id),
                id
            );
        }
    }
}

/// #PF.
const PAGE_FAULT: u8 = 14;
/// `mov [rax], rcx` and `mov rcx, [rax]`: REX.W, opcode, ModRM.
const MOV_RAX_INDIRECT_LEN: u8 = 3;
/// #PF error code bit 1: the access was a write (bit 0 clear: the page was not present).
const PF_WRITE: u64 = 1 << 1;

conformance_test! {
    title: "a write and a read of the guard page below the boot stack raise #PF with CR2 = its address",
    section: "4.2 Guest-physical layout",
    expect: Success,
}
pub(super) fn stack_guard_page_faults() {
    let mem = start_info().mem_bytes;
    let guard = mem - STACK_BYTES - 4096;
    check_eq!(
        "the guard page (layout::stack_guard_gpa)",
        Hex(guard),
        Hex(stack_guard_gpa(mem))
    );
    // Where a push would land first when the stack overflows: its last 8 bytes.
    let target = guard + 4096 - 8;
    for (what, write) in [("write", true), ("read", false)] {
        let mut rip = 0;
        let taken = idt::expect_trap(PAGE_FAULT, MOV_RAX_INDIRECT_LEN, || {
            // SAFETY: the guard page is not mapped, so the access faults and the armed handler
            // resumes after it; were it mapped, it is RAM no one uses (below the stack).
            unsafe {
                if write {
                    asm!(
                        "lea {rip}, [rip + 2f]",
                        "2:",
                        "mov [rax], rcx",
                        rip = out(reg) rip,
                        in("rax") target,
                        in("rcx") 0x5741_5244_u64,
                        options(nostack),
                    )
                } else {
                    asm!(
                        "lea {rip}, [rip + 2f]",
                        "2:",
                        "mov rcx, [rax]",
                        rip = out(reg) rip,
                        in("rax") target,
                        out("rcx") _,
                        options(nostack),
                    )
                }
            };
        });
        let cr2 = x86::read_cr2();
        let Some(record) = taken else {
            framework::fail(format_args!(
                "a {what} of the guard page at {target:#x} did not fault"
            ));
            continue;
        };
        check_eq!(format_args!("{what}: vector"), PAGE_FAULT, record.vector);
        check_eq!(
            format_args!("{what}: #PF error code (not present, kernel)"),
            Hex(if write { PF_WRITE } else { 0 }),
            Hex(record.error_code)
        );
        check_eq!(
            format_args!("{what}: RIP of the fault"),
            Hex(rip),
            Hex(record.rip)
        );
        check_eq!(format_args!("{what}: CR2"), Hex(target), Hex(cr2));
    }
    // The pages around it are mapped: the stack above, free RAM below.
    for address in [guard + 4096, guard - 8] {
        // SAFETY: mapped RAM (the bottom of the initial stack, far below where we run, and
        // free RAM below the guard page); reading has no side effect.
        let _ = unsafe { core::ptr::read_volatile(address as *const u64) };
    }
    // The exceptions were taken and returned (iretq) with the null data selectors of entry.
    for (name, selector) in x86::segment_selectors() {
        if name != "CS" {
            check_eq!(
                format_args!("{name} after an exception and iretq"),
                Hex(0),
                Hex(selector)
            );
        }
    }
}

/// #DF.
const DOUBLE_FAULT: u8 = 8;

core::arch::global_asm!(
    ".global lamina_conf_overflow_double_fault",
    "lamina_conf_overflow_double_fault:",
    // On the IST stack: RSP points at the CPU's frame (error code, RIP, CS, RFLAGS, RSP, SS).
    "mov rdi, rsp",
    "and rsp, -16",
    "call {handler}",
    "ud2",
    handler = sym overflow_double_fault,
);

unsafe extern "C" {
    fn lamina_conf_overflow_double_fault();
}

/// The #DF handler of [`stack_overflow_double_faults`]: the overflow ended here, on the IST
/// stack. Checks what the CPU reports and ends the test (there is no going back to the
/// overflowed stack).
extern "sysv64" fn overflow_double_fault(frame: *const [u64; 6]) -> ! {
    // SAFETY: the stub passes the frame the CPU pushed on the IST stack.
    let [error_code, _rip, _cs, _rflags, rsp, _ss] = unsafe { *frame };
    let guard = stack_guard_gpa(start_info().mem_bytes);
    let cr2 = x86::read_cr2();
    check_eq!("#DF error code", Hex(0), Hex(error_code));
    check!(
        (guard..guard + 4096).contains(&cr2),
        "CR2 {cr2:#x} is not in the guard page [{guard:#x}, {:#x})",
        guard + 4096
    );
    check_eq!(
        "the overflowed RSP in the #DF frame",
        Hex(guard + 4096),
        Hex(rsp)
    );
    crate::console::println!(
        "stack_overflow_double_faults: #PF at {cr2:#x} in the guard page, then #DF on the IST stack"
    );
    framework::finish()
}

conformance_test! {
    title: "a boot stack overflow faults in the guard page and, with an IST #DF gate, ends in the kernel's #DF handler",
    section: "4.2 Guest-physical layout",
    expect: Success,
}
/// The tutorial's double-fault test: the boot stack overflows into the guard page; the #PF
/// cannot push its frame there either, so it becomes a #DF, which a gate with an IST stack
/// takes. The handler ends the test.
pub(super) fn stack_overflow_double_faults() {
    let guard = stack_guard_gpa(start_info().mem_bytes);
    idt::set_exception_gate_on_ist(
        DOUBLE_FAULT,
        lamina_conf_overflow_double_fault as *const () as u64,
        x86::gdt::DOUBLE_FAULT_IST,
    );
    // SAFETY: RSP is moved to the bottom of the boot stack (far below where we run, nothing
    // lives there) and a push goes below it, into the guard page: it faults, and the #DF
    // handler never returns here. Should the push not fault, RSP is restored at once.
    unsafe {
        asm!(
            "mov {saved}, rsp",
            "mov rsp, {bottom}",
            "push rax",
            "mov rsp, {saved}",
            saved = out(reg) _,
            bottom = in(reg) guard + 4096,
        )
    };
    framework::fail(format_args!(
        "a push below the boot stack, into the guard page at {guard:#x}, did not fault"
    ));
}

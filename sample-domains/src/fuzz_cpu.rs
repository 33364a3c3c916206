//! The fuzzer's instruction-level operations: port I/O (IN/OUT, INS/OUTS with REP), RDMSR and
//! WRMSR, CPUID, MOV to and from CR0/CR3/CR4/CR8 (and CLTS, LMSW), MOV to and from DR0-7,
//! XSETBV, INT n, HLT with the APIC timer armed, and random instruction bytes, at CPL 0 or 3.
//!
//! Every operation is a few instruction bytes written to a code page and run through
//! [`exec`]: it saves the kernel's registers (a recovery point), IRETQs to the code at the
//! CPL asked, and comes back when the code ends (`int 0x81`, DPL 3) or when any exception or
//! interrupt is taken: every IDT gate runs on a stack of its own (IST 1, so even a wrecked RSP
//! comes back), records the vector, error code and RIP, and resumes at the recovery point.
//! Registers a write changed (control and debug registers, MSRs, XCR0, the x87/SSE state) are
//! put back afterwards, so that the kernel goes on. Random bytes at CPL 0 run without the
//! instructions that would take that recovery away (CLI, POPF, IRET, LGDT/LIDT and the rest
//! of 0F 00/0F 01, MOV to CR/DR, WRMSR, SYSCALL/SYSENTER and their returns); everything else
//! they may do to the kernel is the fuzzer's own business. CPL 3 has no such filter.
//!
//! A privileged instruction at CPL 3 must raise #GP (XSETBV without CR4.OSXSAVE #UD): when it
//! does not, the fuzzer prints `fuzz: unexpected: ...` (the hypervisor then did at CPL 3 what
//! only CPL 0 may do).

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use lamina_guest_sdk::msr::wrmsr;
use lamina_guest_sdk::{println, x2apic};

use lamina_abi::layout::GRANT_WINDOW_GPA;

use crate::fuzz::{Context, Rng, interesting};

const KERNEL_CODE: u64 = 0x08;
const KERNEL_DATA: u64 = 0x10;
const USER_DATA: u64 = 0x18 | 3;
const USER_CODE: u64 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;
/// `int DONE_VECTOR` ends an operation's code (gate DPL 3).
const DONE_VECTOR: u8 = 0x81;
/// The APIC timer's vector: it ends a HLT and any code that runs too long.
const TIMER_VECTOR: u8 = 0xf0;

const GP: u8 = 13;
const UD: u8 = 6;

/// A static the fuzzer's one vCPU changes only between operations.
struct Racy<T>(UnsafeCell<T>);
// SAFETY: one vCPU, and the handlers touch these only through the assembly below, while the
// Rust code that owns them waits in `exec`.
unsafe impl<T> Sync for Racy<T> {}
impl<T> Racy<T> {
    const fn new(value: T) -> Self {
        Racy(UnsafeCell::new(value))
    }
    fn get(&self) -> *mut T {
        self.0.get()
    }
}

#[repr(C, align(4096))]
struct Page<const N: usize>([u8; N]);

/// The code page and the page tables live below the kernel image (linked at 2 MiB; RAM from
/// 1 MiB is the kernel's, docs/abi.md 4.2), apart from each other and from the IDT, GDT and
/// stacks: a store relative to RIP with a small displacement, which random code makes often,
/// then lands in the code page or in nothing the fuzzer needs.
const CODE_GPA: u64 = 0x1c_0000;
/// Eight pages for the copy of the boot page tables ([`own_page_tables`]).
const TABLES_GPA: u64 = 0x18_0000;
const TABLES_MAX: usize = 8;
/// What the operations' loads and stores point at.
static SANDBOX: Racy<Page<8192>> = Racy::new(Page([0; 8192]));
/// The stack the operations run on.
static OP_STACK: Racy<Page<16384>> = Racy::new(Page([0; 16384]));
/// The stack every gate switches to (IST 1), and RSP0.
static TRAP_STACK: Racy<Page<16384>> = Racy::new(Page([0; 16384]));

#[repr(C, packed(4))]
struct Tss64 {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    io_map_base: u16,
}
const _: () = assert!(size_of::<Tss64>() == 104);

static TSS: Racy<Tss64> = Racy::new(Tss64 {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    // No I/O permission bitmap: port I/O at CPL 3 raises #GP.
    io_map_base: 104,
});
static GDT: Racy<[u64; 7]> = Racy::new([0; 7]);
static IDT: Racy<[[u64; 2]; 256]> = Racy::new([[0; 2]; 256]);

#[repr(C, packed)]
struct TablePointer {
    limit: u16,
    base: u64,
}

global_asm!(
    ".section .text.lamina_fuzz_cpu,\"ax\",@progbits",
    // One 16-byte stub per vector: a dummy error code where the CPU pushes none (SDM table
    // 6-1: 8, 10-14, 17, 21, 29, 30 have one), the vector, then the common path.
    ".altmacro",
    ".macro LAMINA_FUZZ_STUB vector, has_error",
    "    .balign 16",
    "    .if \\has_error == 0",
    "    push 0",
    "    .endif",
    "    push \\vector",
    "    jmp lamina_fuzz_trap",
    ".endm",
    ".balign 16",
    ".global lamina_fuzz_stubs",
    "lamina_fuzz_stubs:",
    "LAMINA_FUZZ_STUB 0, 0",
    "LAMINA_FUZZ_STUB 1, 0",
    "LAMINA_FUZZ_STUB 2, 0",
    "LAMINA_FUZZ_STUB 3, 0",
    "LAMINA_FUZZ_STUB 4, 0",
    "LAMINA_FUZZ_STUB 5, 0",
    "LAMINA_FUZZ_STUB 6, 0",
    "LAMINA_FUZZ_STUB 7, 0",
    "LAMINA_FUZZ_STUB 8, 1",
    "LAMINA_FUZZ_STUB 9, 0",
    "LAMINA_FUZZ_STUB 10, 1",
    "LAMINA_FUZZ_STUB 11, 1",
    "LAMINA_FUZZ_STUB 12, 1",
    "LAMINA_FUZZ_STUB 13, 1",
    "LAMINA_FUZZ_STUB 14, 1",
    "LAMINA_FUZZ_STUB 15, 0",
    "LAMINA_FUZZ_STUB 16, 0",
    "LAMINA_FUZZ_STUB 17, 1",
    "LAMINA_FUZZ_STUB 18, 0",
    "LAMINA_FUZZ_STUB 19, 0",
    "LAMINA_FUZZ_STUB 20, 0",
    "LAMINA_FUZZ_STUB 21, 1",
    "LAMINA_FUZZ_STUB 22, 0",
    "LAMINA_FUZZ_STUB 23, 0",
    "LAMINA_FUZZ_STUB 24, 0",
    "LAMINA_FUZZ_STUB 25, 0",
    "LAMINA_FUZZ_STUB 26, 0",
    "LAMINA_FUZZ_STUB 27, 0",
    "LAMINA_FUZZ_STUB 28, 0",
    "LAMINA_FUZZ_STUB 29, 1",
    "LAMINA_FUZZ_STUB 30, 1",
    "LAMINA_FUZZ_STUB 31, 0",
    ".set lamina_fuzz_vector, 32",
    ".rept 224",
    "    LAMINA_FUZZ_STUB %lamina_fuzz_vector, 0",
    "    .set lamina_fuzz_vector, lamina_fuzz_vector + 1",
    ".endr",
    ".noaltmacro",
    // On the IST stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.
    "lamina_fuzz_trap:",
    "    cmp byte ptr [rip + lamina_fuzz_armed], 0",
    "    je 2f",
    "    mov byte ptr [rip + lamina_fuzz_armed], 0",
    "    mov [rip + lamina_fuzz_taken + 32], rax",
    "    mov [rip + lamina_fuzz_taken + 40], rdx",
    "    mov rax, [rsp]",
    "    mov [rip + lamina_fuzz_taken], rax",
    "    mov rax, [rsp + 8]",
    "    mov [rip + lamina_fuzz_taken + 8], rax",
    "    mov rax, [rsp + 16]",
    "    mov [rip + lamina_fuzz_taken + 16], rax",
    "    mov rax, [rsp + 24]",
    "    mov [rip + lamina_fuzz_taken + 24], rax",
    "    mov eax, {kernel_data}",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    mov rsp, [rip + lamina_fuzz_kernel_rsp]",
    "    popfq",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbp",
    "    pop rbx",
    "    ret",
    // Not inside an operation: an interrupt (a timer that fired late, an upcall) is dropped
    // with an EOI; an exception is the kernel's own, and fatal.
    "2:",
    "    cmp qword ptr [rsp], 32",
    "    jb 3f",
    "    push rax",
    "    push rcx",
    "    push rdx",
    "    mov ecx, 0x80b",
    "    xor eax, eax",
    "    xor edx, edx",
    "    wrmsr",
    "    pop rdx",
    "    pop rcx",
    "    pop rax",
    "    add rsp, 16",
    "    iretq",
    "3:",
    "    mov rdi, [rsp]",
    "    mov rsi, [rsp + 16]",
    "    and rsp, -16",
    "    call {unexpected}",
    "    ud2",
    // extern "sysv64" fn(frame: &[u64; 5] /* RIP, CS, RFLAGS, RSP, SS */, regs: &[u64; 16])
    ".global lamina_fuzz_exec",
    "lamina_fuzz_exec:",
    "    push rbx",
    "    push rbp",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    pushfq",
    "    mov [rip + lamina_fuzz_kernel_rsp], rsp",
    "    push qword ptr [rdi + 32]",
    "    push qword ptr [rdi + 24]",
    "    push qword ptr [rdi + 16]",
    "    push qword ptr [rdi + 8]",
    "    push qword ptr [rdi]",
    "    mov rax, [rsi]",
    "    mov rcx, [rsi + 8]",
    "    mov rdx, [rsi + 16]",
    "    mov rbx, [rsi + 24]",
    "    mov rbp, [rsi + 40]",
    "    mov rdi, [rsi + 56]",
    "    mov r8, [rsi + 64]",
    "    mov r9, [rsi + 72]",
    "    mov r10, [rsi + 80]",
    "    mov r11, [rsi + 88]",
    "    mov r12, [rsi + 96]",
    "    mov r13, [rsi + 104]",
    "    mov r14, [rsi + 112]",
    "    mov r15, [rsi + 120]",
    "    mov rsi, [rsi + 48]",
    "    mov byte ptr [rip + lamina_fuzz_armed], 1",
    "    iretq",
    ".section .bss.lamina_fuzz_cpu,\"aw\",@nobits",
    ".balign 8",
    "lamina_fuzz_kernel_rsp:",
    "    .zero 8",
    ".global lamina_fuzz_taken",
    "lamina_fuzz_taken:",
    "    .zero 48",
    "lamina_fuzz_armed:",
    "    .zero 1",
    kernel_data = const KERNEL_DATA,
    unexpected = sym unexpected,
);

unsafe extern "sysv64" {
    fn lamina_fuzz_stubs();
    fn lamina_fuzz_exec(frame: &[u64; 5], regs: &[u64; 16]);
    /// Vector, error code, RIP, CS of what ended the last operation, and RAX, RDX then.
    static lamina_fuzz_taken: [u64; 6];
}

extern "sysv64" fn unexpected(vector: u64, rip: u64) -> ! {
    crate::fail(
        "fuzz",
        format_args!("exception {vector} in the fuzzer's own code at RIP {rip:#x}"),
    )
}

static INSTALLED: AtomicBool = AtomicBool::new(false);
static mut TIMER_COUNTS: u32 = 0;

/// Loads the fuzzer's GDT (with CPL 3 segments and a TSS) and IDT, enables the x2APIC.
pub(crate) fn install() {
    if INSTALLED.swap(true, Ordering::Relaxed) {
        return;
    }
    // SAFETY: the copy maps everything as the boot tables do.
    unsafe { own_page_tables() };
    let trap_top = TRAP_STACK.get() as u64 + 16384;
    let tss = TSS.get();
    // SAFETY: before `ltr`; nothing else uses the TSS.
    unsafe {
        (*tss).rsp[0] = trap_top;
        (*tss).ist[0] = trap_top;
    }
    let base = tss as u64;
    let tss_low = 103 | (base & 0xff_ffff) << 16 | 0x89 << 40 | (base >> 24 & 0xff) << 56;
    // SAFETY: not loaded yet.
    unsafe {
        *GDT.get() = [
            0,
            0x00af_9a00_0000_ffff, // kernel code, L=1
            0x00cf_9200_0000_ffff, // kernel data
            0x00cf_f200_0000_ffff, // user data, DPL 3
            0x00af_fa00_0000_ffff, // user code, L=1, DPL 3
            tss_low,
            base >> 32,
        ];
    }
    fill_idt();
    let gdtr = TablePointer {
        limit: 7 * 8 - 1,
        base: GDT.get() as u64,
    };
    let idtr = TablePointer {
        limit: 256 * 16 - 1,
        base: IDT.get() as u64,
    };
    // SAFETY: same kernel selectors as the boot GDT; the TSS is valid and not busy; every
    // gate points at its stub. Interrupts are off.
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "push {code}",
            "lea {scratch}, [rip + 2f]",
            "push {scratch}",
            "retfq",
            "2:",
            "mov {scratch:e}, {data}",
            "mov ds, {scratch:x}",
            "mov es, {scratch:x}",
            "mov ss, {scratch:x}",
            "mov {scratch:e}, {tss}",
            "ltr {scratch:x}",
            "lidt [{idtr}]",
            gdtr = in(reg) &raw const gdtr,
            idtr = in(reg) &raw const idtr,
            code = const KERNEL_CODE,
            data = const KERNEL_DATA,
            tss = const TSS_SELECTOR,
            scratch = out(reg) _,
        )
    };
    if x2apic::available() {
        let khz = x2apic::timer_khz().max(1_000);
        // SAFETY: x2APIC present; every vector has a gate.
        unsafe {
            x2apic::enable(0xff);
            TIMER_COUNTS = x2apic::counts_for(2_000_000, khz) as u32;
        }
    }
}

static mut TABLES_USED: usize = 0;

/// Writes every gate of the IDT (again: random CPL 0 code may have written over one).
fn fill_idt() {
    let stubs = lamina_fuzz_stubs as *const () as u64;
    for vector in 0..256u64 {
        let handler = stubs + vector * 16;
        let dpl = if vector == u64::from(DONE_VECTOR) {
            3
        } else {
            0
        };
        let low = (handler & 0xffff)
            | KERNEL_CODE << 16
            | 1 << 32 // IST 1
            | (0x8e | dpl << 5) << 40
            | (handler >> 16 & 0xffff) << 48;
        // SAFETY: between operations, with interrupts off: no gate is being used.
        unsafe {
            core::ptr::write_volatile(&raw mut (*IDT.get())[vector as usize], [low, handler >> 32])
        };
    }
}

/// Whether CPL 3 code may touch the page at `address`: only its code page, the sandbox and
/// the operations' stack (and what lies outside RAM, the grant window, as the boot tables map
/// it). The rest of the kernel is out of its reach.
fn user_page(address: u64) -> bool {
    let sandbox = SANDBOX.get() as u64;
    let stack = OP_STACK.get() as u64;
    address >= 1 << 30
        || (CODE_GPA..CODE_GPA + 4096).contains(&address)
        || (sandbox..sandbox + 8192).contains(&address)
        || (stack..stack + 16384).contains(&address)
}

const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;

/// A fresh page of the tables' area, or `None` when out of room.
///
/// # Safety
/// One vCPU, before any operation.
unsafe fn new_table() -> Option<&'static mut [u64; 512]> {
    // SAFETY: the caller's.
    let used = unsafe { TABLES_USED };
    if used == TABLES_MAX {
        return None;
    }
    // SAFETY: as above.
    unsafe { TABLES_USED = used + 1 };
    // SAFETY: page `used` of the tables' area, in RAM, identity-mapped, handed out once.
    Some(unsafe { &mut *((TABLES_GPA + used as u64 * 4096) as *mut [u64; 512]) })
}

/// Copies the level-`level` table at `table` (4 = PML4), mapping linear addresses from
/// `base`, and everything below it to [`TABLES_GPA`]: leaves keep U only where
/// [`user_page`] says so (a 2 MiB page that holds such a page is split into 4 KiB ones).
/// Returns the copy's address (identity-mapped) or `None` when out of room.
///
/// # Safety
/// `table` is a page table of this domain, identity-mapped; one vCPU, before any operation.
unsafe fn copy_table(table: u64, level: u32, base: u64) -> Option<u64> {
    // SAFETY: the caller's.
    let copy = unsafe { new_table() }?;
    let shift = 12 + 9 * (level - 1);
    for (i, slot) in copy.iter_mut().enumerate() {
        let address = base + ((i as u64) << shift);
        // SAFETY: the caller's table, 512 entries.
        let entry = unsafe { core::ptr::read_volatile((table as *const u64).add(i)) };
        let present = entry & 1 != 0;
        *slot = if !present {
            entry
        } else if level == 1 {
            if user_page(address) {
                entry
            } else {
                entry & !USER
            }
        } else if level == 2 && entry & LARGE != 0 {
            // SAFETY: as above.
            let split = unsafe { new_table() }?;
            let frame = entry & ADDRESS & !0x1f_ffff;
            for (j, small) in split.iter_mut().enumerate() {
                let at = address + j as u64 * 4096;
                let flags = entry & (0x1f | 1 << 63);
                *small =
                    (frame + j as u64 * 4096) | if user_page(at) { flags } else { flags & !USER };
            }
            (entry & !(ADDRESS | LARGE | 1 << 12)) | split.as_ptr() as u64
        } else if level == 3 && entry & LARGE != 0 {
            entry
        } else {
            // SAFETY: a present entry of the boot tables points at a table in RAM.
            let below = unsafe { copy_table(entry & ADDRESS, level - 1, address) }?;
            (entry & !ADDRESS) | below
        };
    }
    Some(copy.as_ptr() as u64)
}

/// Moves the fuzzer onto a copy of the boot page tables below its image: its hypercalls may
/// write anywhere in its RAM, the boot tables at 0x4000-0xafff too, and a page of them gone
/// wrong would end the boot at the next instruction operation that touches it. The copy
/// also keeps CPL 3 code away from the kernel ([`user_page`]).
///
/// # Safety
/// Paging is the boot identity map (docs/abi.md 4.2).
unsafe fn own_page_tables() {
    let cr3 = read_cr(3);
    // SAFETY: CR3 holds the boot PML4; one vCPU, before any operation.
    if let Some(pml4) = unsafe { copy_table(cr3 & ADDRESS, 4, 0) } {
        // SAFETY: the copy maps every address as the boot tables do.
        unsafe {
            asm!("mov cr3, {}", in(reg) pml4 | (cr3 & 0xfff), options(nostack, preserves_flags))
        };
    }
}

/// What ended an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Its code ran to the end.
    Done,
    /// An exception or interrupt: vector, error code, RIP.
    Trap(u8, u64, u64),
}

#[repr(C, align(64))]
struct FxArea([u8; 512]);
static FX: Racy<FxArea> = Racy::new(FxArea([0; 512]));

/// Runs `code` (then `int DONE_VECTOR`) at `cpl` with `regs` (RAX, RCX, RDX, RBX, RSP
/// (ignored), RBP, RSI, RDI, R8-R15) and RFLAGS `rflags` (IF may be set: with `watchdog` the
/// APIC timer fires 2 ms later).
fn exec(code: &[u8], cpl: u8, regs: &[u64; 16], rflags: u64, watchdog: bool) -> Ended {
    exec_with_result(code, cpl, regs, rflags, watchdog).0
}

/// [`exec`], with RAX and RDX as the code left them.
fn exec_with_result(
    code: &[u8],
    cpl: u8,
    regs: &[u64; 16],
    rflags: u64,
    watchdog: bool,
) -> (Ended, u64, u64) {
    let page = CODE_GPA as *mut u8;
    let n = code.len().min(64);
    // SAFETY: inside the code page; only this vCPU runs it, and not now.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), page, n);
        // `int 0x81` repeated resynchronizes whatever the code's last instruction swallowed.
        for i in (n..n + 64).step_by(2) {
            page.add(i).write(0xcd);
            page.add(i + 1).write(DONE_VECTOR);
        }
    }
    let (cs, ss) = if cpl == 3 {
        (USER_CODE, USER_DATA)
    } else {
        (KERNEL_CODE, KERNEL_DATA)
    };
    let frame = [
        page as u64,
        cs,
        rflags | 2,
        OP_STACK.get() as u64 + 16384 - 256,
        ss,
    ];
    // The kernel's own code needs CR0.TS/EM clear and CR4.OSFXSR set, whatever the code did.
    let (cr0, cr4) = (read_cr(0), read_cr(4));
    let fx = FX.get();
    // SAFETY: a 512-byte, 16-aligned area.
    unsafe { asm!("fxsave64 [{}]", in(reg) fx, options(nostack, preserves_flags)) };
    // SAFETY: the x2APIC is present when TIMER_COUNTS is not 0.
    let counts = unsafe { TIMER_COUNTS };
    // Random code may have written over a gate (a timer interrupt through a broken gate
    // raises #GP instead, and stays in service): 4 KiB of stores, no exit.
    fill_idt();
    if watchdog && counts != 0 {
        // SAFETY: the timer's vector has a gate; the APIC is enabled.
        unsafe {
            x2apic::start_timer(TIMER_VECTOR, x2apic::TimerMode::OneShot, counts);
        }
    }
    // SAFETY: the GDT, TSS and IDT are ours (`install`); the code runs on its own stack and
    // comes back through a gate to the recovery point, which restores every register the
    // SysV ABI asks a callee to keep, RSP and RFLAGS.
    unsafe { lamina_fuzz_exec(&frame, regs) };
    // SAFETY: writing back values the registers held before, which the CPU accepted then.
    unsafe {
        if read_cr(0) != cr0 {
            asm!("mov cr0, {}", in(reg) cr0, options(nostack, preserves_flags));
        }
        if read_cr(4) != cr4 {
            asm!("mov cr4, {}", in(reg) cr4, options(nostack, preserves_flags));
        }
    }
    // SAFETY: as above.
    unsafe { asm!("fxrstor64 [{}]", in(reg) fx, options(nostack, preserves_flags)) };
    // SAFETY: written by the trap path before it resumed here.
    let [vector, error, rip, _, rax, rdx] =
        unsafe { core::ptr::read_volatile(&raw const lamina_fuzz_taken) };
    // SAFETY: stops the watchdog, and ends an interrupt the code was ended by (the vector
    // has a gate; EOI with nothing in service does nothing).
    unsafe {
        if watchdog && counts != 0 {
            wrmsr(x2apic::INITIAL_COUNT, 0);
            wrmsr(
                x2apic::LVT_TIMER,
                x2apic::LVT_MASKED | u64::from(TIMER_VECTOR),
            );
        }
        // An interrupt the code was ended by, or one whose delivery faulted (#GP/#NP with
        // the external bit): it is in service either way. EOI with nothing in service does
        // nothing.
        if (vector >= 32 || (watchdog && error & 1 != 0)) && counts != 0 {
            wrmsr(x2apic::EOI, 0);
        }
    }
    let ended = if vector == u64::from(DONE_VECTOR) {
        Ended::Done
    } else {
        Ended::Trap(vector as u8, error, rip)
    };
    (ended, rax, rdx)
}

/// Runs one instruction `code` at CPL 0 with RAX, RCX, RDX as given (no watchdog, IF clear).
fn exec0(code: &[u8], rax: u64, rcx: u64, rdx: u64) -> Ended {
    let mut regs = [0u64; 16];
    regs[0] = rax;
    regs[1] = rcx;
    regs[2] = rdx;
    exec(code, 0, &regs, 0, false)
}

fn read_cr(cr: u8) -> u64 {
    let value: u64;
    // SAFETY: reading a control register at CPL 0 has no side effect.
    unsafe {
        match cr {
            0 => asm!("mov {}, cr0", out(reg) value, options(nomem, nostack, preserves_flags)),
            3 => asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)),
            4 => asm!("mov {}, cr4", out(reg) value, options(nomem, nostack, preserves_flags)),
            _ => asm!("mov {}, cr8", out(reg) value, options(nomem, nostack, preserves_flags)),
        }
    }
    value
}

/// MOV CRn, RAX (with REX.R for CR8).
fn mov_to_cr(cr: u8) -> ([u8; 4], usize) {
    let modrm = 0xc0 | (cr & 7) << 3;
    if cr >= 8 {
        ([0x44, 0x0f, 0x22, modrm], 4)
    } else {
        ([0x0f, 0x22, modrm, 0x90], 3)
    }
}

/// The MSRs worth trying: architectural, the x2APIC, the hypervisor range, AMD's.
const MSRS: [u32; 34] = [
    0x10,
    0x1b,
    0x3a,
    0x3b,
    0x48,
    0x49,
    0x8b,
    0xfe,
    0x10a,
    0x174,
    0x175,
    0x176,
    0x1a0,
    0x1d9,
    0x277,
    0x2ff,
    0x6e0,
    0x802,
    0x808,
    0x80b,
    0x80f,
    0x830,
    0x832,
    0x838,
    0x83f,
    0x4000_0000,
    0x4000_0001,
    0xc000_0080,
    0xc000_0081,
    0xc000_0082,
    0xc000_0100,
    0xc000_0102,
    0xc000_0103,
    0xc001_0114,
];

/// Interesting ports: the emulated UART, PIC, PIT, keyboard controller, CMOS, PCI, reset.
const PORTS: [u16; 16] = [
    0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x20, 0x21, 0x40, 0x43, 0x60, 0x64, 0x70, 0x71, 0xcf8,
    0xcfc, 0xcf9,
];

fn port(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => rng.next() & 0xffff,
        1 => 0x3f8,
        _ => u64::from(PORTS[rng.below(PORTS.len() as u64) as usize]),
    }
}

fn address(rng: &mut Rng, cx: &Context) -> u64 {
    let sandbox = SANDBOX.get() as u64;
    match rng.below(4) {
        0 => value(rng, cx),
        _ => sandbox + rng.below(8192),
    }
}

/// [`interesting`], but never in the grant window (an access to a window page with nothing
/// mapped stops the domain, docs/abi.md 4.2) nor in the kernel's own RAM outside the sandbox
/// (a store there would wreck the fuzzer, not test the hypervisor): both are moved into the
/// sandbox. Addresses past RAM, non-canonical and unmapped ones stay.
fn value(rng: &mut Rng, cx: &Context) -> u64 {
    let v = interesting(rng, cx);
    let sandbox = SANDBOX.get() as u64;
    let in_window = (GRANT_WINDOW_GPA..GRANT_WINDOW_GPA + (2 << 20)).contains(&v);
    let in_ram = v < cx.ram && !(sandbox..sandbox + 8192).contains(&v);
    if in_window || in_ram {
        sandbox + v % 8192
    } else {
        v
    }
}

/// What the operations did, for the summary line.
pub(crate) struct Tally {
    pub(crate) ops: u64,
    /// By vector (32: any interrupt).
    pub(crate) traps: [u32; 33],
    pub(crate) unexpected: u32,
}

impl Tally {
    pub(crate) const fn new() -> Self {
        Tally {
            ops: 0,
            traps: [0; 33],
            unexpected: 0,
        }
    }

    fn count(&mut self, ended: Ended) {
        self.ops += 1;
        if let Ended::Trap(vector, ..) = ended {
            self.traps[usize::from(vector.min(32))] += 1;
        }
    }
}

/// One instruction-level operation, deterministic from `rng`.
pub(crate) fn operation(rng: &mut Rng, cx: &Context, tally: &mut Tally, trace: bool) {
    install();
    let cpl = if rng.below(4) == 0 { 3 } else { 0 };
    let kind = rng.below(11);
    // Random bytes at CPL 0 may jump anywhere and run what they find there unfiltered: one
    // in three runs there, the rest at CPL 3, where the kernel is out of reach.
    let cpl = if kind == 10 && rng.below(3) != 0 {
        3
    } else {
        cpl
    };
    let mut regs = [0u64; 16];
    for reg in &mut regs {
        *reg = if rng.below(2) == 0 {
            address(rng, cx)
        } else {
            value(rng, cx)
        };
    }
    let mut code = [0x90u8; 16];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        for &b in bytes {
            if len < code.len() {
                code[len] = b;
                len += 1;
            }
        }
    };
    let mut rflags = if rng.below(8) == 0 { 1 << 10 } else { 0 };
    let mut watchdog = false;
    // What to put back afterwards: (CR, value), (MSR, value), DR7, XCR0.
    let mut restore_cr = None;
    let mut restore_msr = None;
    let mut restore_dr = false;
    let mut restore_xcr0 = None;
    // The privileged ones must #GP at CPL 3.
    let mut privileged = true;
    let name: &str;
    match kind {
        0 => {
            name = "in/out";
            regs[2] = port(rng);
            let size = rng.below(3);
            if size == 1 {
                push(&[0x66]);
            }
            let out = rng.below(2) == 0;
            if out && regs[2] == 0x3f8 {
                // Console bytes stay printable.
                regs[0] = 0x20 + rng.below(0x5f);
            }
            let opcode = 0xec | u8::from(size != 0) | if out { 2 } else { 0 };
            if rng.below(3) == 0 {
                // The immediate-port form.
                push(&[opcode - 8, regs[2] as u8]);
            } else {
                push(&[opcode]);
            }
        }
        1 => {
            name = "ins/outs";
            regs[2] = port(rng);
            if rng.below(2) == 0 {
                push(&[0xf3]);
            }
            let mut operand_size = 4;
            let mut address_mask = u64::MAX;
            for _ in 0..rng.below(3) {
                let prefix = [0x66, 0x67, 0x2e, 0x64, 0x65, 0x26][rng.below(6) as usize];
                if prefix == 0x66 {
                    operand_size = 2;
                }
                if prefix == 0x67 {
                    address_mask = 0xffff_ffff;
                }
                push(&[prefix]);
            }
            let out = rng.below(2) == 0;
            if out && regs[2] == 0x3f8 {
                regs[2] = 0x3f9;
            }
            let wide = rng.below(2) == 0;
            let size = if wide { operand_size } else { 1 };
            push(&[0x6c | u8::from(wide) | if out { 2 } else { 0 }]);
            // Past one exit's 4,096 elements sometimes; the stores stay in the sandbox
            // (8 KiB), or start where they fault.
            let most = 8000 / size;
            regs[1] = match rng.below(4) {
                0 => value(rng, cx),
                1 => rng.below(most),
                _ => rng.below(64),
            };
            let backwards = rflags & 1 << 10 != 0;
            let sandbox = SANDBOX.get() as u64;
            let in_sandbox = if backwards {
                sandbox + 8188 - rng.below(64)
            } else {
                sandbox + rng.below(64)
            };
            let buffer = match rng.below(8) {
                0 => cx.ram + rng.below(16),
                1 => 1 << 63 | rng.below(4096),
                2 => 0xffff_8000_0000_0000 + rng.below(1 << 20),
                _ => in_sandbox,
            };
            // INS stores at RDI, OUTS loads from RSI: a buffer in RAM holds at most `most`
            // elements (INS beyond the sandbox would wreck the kernel; OUTS of 2^64 would read
            // all of RAM first, slowly). With 0x67 the address is the index's low 32 bits
            // (and the count ECX).
            if regs[1] & address_mask > most && buffer & address_mask < cx.ram {
                regs[1] = most;
            }
            let other = address(rng, cx);
            (regs[6], regs[7]) = if out {
                (buffer, other)
            } else {
                (other, buffer)
            };
        }
        2 | 3 => {
            let write = kind == 3;
            name = if write { "wrmsr" } else { "rdmsr" };
            let msr = match rng.below(4) {
                0 => rng.next() as u32,
                1 => 0x800 + rng.below(0x100) as u32,
                _ => MSRS[rng.below(MSRS.len() as u64) as usize],
            };
            regs[1] = u64::from(msr);
            // Writing the TSC would move the fuzzer's own clock (its poll deadlines).
            let write = write && !matches!(msr, 0x10 | 0x3b);
            if write {
                let value = if rng.below(2) == 0 {
                    value(rng, cx)
                } else {
                    rng.next() & 0xffff
                };
                regs[0] = value & 0xffff_ffff;
                regs[2] = value >> 32;
                if cpl == 0 {
                    // The value before, if there is one to read.
                    let mut saved = [0u64; 16];
                    saved[1] = u64::from(msr);
                    if let (Ended::Done, eax, edx) =
                        exec_with_result(&[0x0f, 0x32], 0, &saved, 0, false)
                    {
                        restore_msr = Some((msr, edx << 32 | eax & 0xffff_ffff));
                    }
                }
                push(&[0x0f, 0x30]);
            } else {
                push(&[0x0f, 0x32]);
            }
        }
        4 => {
            name = "cpuid";
            privileged = false;
            regs[0] = match rng.below(4) {
                0 => rng.next() & 0xffff_ffff,
                1 => 0x4000_0000 + rng.below(0x20),
                2 => 0x8000_0000 + rng.below(0x20),
                _ => rng.below(0x20),
            };
            regs[1] = rng.below(4);
            push(&[0x0f, 0xa2]);
        }
        5 => {
            name = "mov cr";
            let cr = [0u8, 3, 4, 8, 2][rng.below(5) as usize];
            let current = if cr == 2 { 0 } else { read_cr(cr) };
            regs[0] = match rng.below(4) {
                0 => current ^ 1 << rng.below(64),
                1 => value(rng, cx),
                2 => current,
                _ => current ^ (rng.next() & 0xfff),
            };
            if cr == 3 {
                // Never other page tables: the same base, with other low bits or with bits
                // no MAXPHYADDR allows (#GP).
                regs[0] = match rng.below(3) {
                    0 => current ^ (rng.next() & 0x18),
                    1 => current | 1 << (52 + rng.below(12)),
                    _ => current,
                };
            }
            if cr == 4 {
                // Not SMEP or SMAP: every boot page is a user page (docs/abi.md 4.2), so the
                // kernel could not run or take an exception under them.
                regs[0] &= !(3 << 20);
            }
            match rng.below(6) {
                0 => push(&[0x0f, 0x20, 0xc0 | (cr & 7) << 3]),
                1 | 2 => {
                    // CLTS, LMSW AX: both write CR0.
                    if rng.below(2) == 0 {
                        push(&[0x0f, 0x06]);
                    } else {
                        push(&[0x0f, 0x01, 0xf0]);
                    }
                    restore_cr = Some((0, read_cr(0)));
                }
                _ => {
                    let (bytes, n) = mov_to_cr(cr);
                    push(&bytes[..n]);
                    if cr != 2 {
                        restore_cr = Some((cr, current));
                    }
                }
            }
            if cpl == 3 {
                restore_cr = None;
            }
        }
        6 => {
            name = "mov dr";
            let dr = rng.below(8) as u8;
            regs[0] = if rng.below(2) == 0 {
                value(rng, cx)
            } else {
                rng.next() & 0xffff_ffff
            };
            let opcode = if rng.below(3) == 0 { 0x21 } else { 0x23 };
            push(&[0x0f, opcode, 0xc0 | dr << 3]);
            restore_dr = cpl == 0;
        }
        7 => {
            name = "xsetbv";
            regs[1] = if rng.below(4) == 0 {
                rng.next() & 0xff
            } else {
                0
            };
            let value = match rng.below(4) {
                0 => value(rng, cx),
                _ => {
                    rng.below(8)
                        | if rng.below(4) == 0 {
                            1 << rng.below(64)
                        } else {
                            0
                        }
                }
            };
            regs[0] = value & 0xffff_ffff;
            regs[2] = value >> 32;
            let osxsave = read_cr(4) & 1 << 18 != 0;
            if osxsave && cpl == 0 {
                let xcr0: u64;
                // SAFETY: XGETBV of XCR0 with CR4.OSXSAVE set.
                unsafe {
                    let (lo, hi): (u32, u32);
                    asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack));
                    xcr0 = u64::from(hi) << 32 | u64::from(lo);
                }
                restore_xcr0 = Some(xcr0);
            }
            push(&[0x0f, 0x01, 0xd1]);
        }
        8 => {
            name = "int n";
            let n = rng.below(256) as u8;
            match rng.below(5) {
                0 => push(&[0xcc]),
                1 => push(&[0xf1]),
                2 => push(&[0xce]),
                _ => push(&[0xcd, n]),
            }
            privileged = false;
        }
        9 => {
            name = "hlt";
            rflags |= 1 << 9;
            watchdog = true;
            push(&[0xf4]);
        }
        _ => {
            name = "bytes";
            privileged = false;
            rflags |= 1 << 9;
            watchdog = true;
            let n = 1 + rng.below(15) as usize;
            let mut bytes = [0u8; 15];
            for b in bytes.iter_mut().take(n) {
                *b = rng.next() as u8;
            }
            if cpl == 0 {
                filter_cpl0(&mut bytes[..n]);
            }
            push(&bytes[..n]);
        }
    }
    if trace {
        println!(
            "fuzz: cpu {name} at CPL {cpl}: code {:x?} rax {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x}",
            &code[..len],
            regs[0],
            regs[1],
            regs[2],
            regs[6],
            regs[7]
        );
    }
    let ended = exec(&code[..len], cpl, &regs, rflags, watchdog);
    tally.count(ended);
    if trace {
        println!("fuzz: cpu {name}: {ended:x?}");
    }
    if cpl == 3 && privileged {
        // An interrupt (the watchdog, an upcall) may come before the instruction ran.
        let expected = matches!(ended, Ended::Trap(GP, 0, _) | Ended::Trap(32..=255, ..))
            || (kind == 7 && matches!(ended, Ended::Trap(UD, ..)));
        if !expected {
            tally.unexpected += 1;
            println!(
                "fuzz: unexpected: {name} at CPL 3 ({:x?}, rax {:#x} rcx {:#x} rdx {:#x}) ended {ended:x?}, not #GP(0)",
                &code[..len],
                regs[0],
                regs[1],
                regs[2]
            );
        }
    }
    // Put back what a write changed.
    if let Some((cr, value)) = restore_cr {
        let (bytes, n) = mov_to_cr(cr);
        let _ = exec0(&bytes[..n], value, 0, 0);
    }
    if let Some((msr, value)) = restore_msr {
        let _ = exec0(
            &[0x0f, 0x30],
            value & 0xffff_ffff,
            u64::from(msr),
            value >> 32,
        );
    }
    if restore_dr {
        // Twice: with DR7.GD set the first MOV DR raises #DB (which clears GD).
        for _ in 0..2 {
            let _ = exec0(&[0x0f, 0x23, 0xf8], 0x400, 0, 0);
        }
        let _ = exec0(&[0x0f, 0x23, 0xf0], 0xffff_0ff0, 0, 0);
    }
    if let Some(xcr0) = restore_xcr0 {
        let _ = exec0(&[0x0f, 0x01, 0xd1], xcr0 & 0xffff_ffff, 0, xcr0 >> 32);
    }
}

/// Takes from random CPL 0 code what would take the fuzzer's recovery away.
fn filter_cpl0(bytes: &mut [u8]) {
    for i in 0..bytes.len() {
        match bytes[i] {
            0xfa | 0x9d | 0xcf | 0x8e | 0x17 => bytes[i] = 0x90,
            0x0f => {
                if let Some(next) = bytes.get_mut(i + 1)
                    && matches!(
                        *next,
                        0x00 | 0x01 | 0x05 | 0x07 | 0x22 | 0x23 | 0x30 | 0x34 | 0x35
                    )
                {
                    *next = 0x1f;
                }
            }
            _ => {}
        }
    }
}

/// The summary: operations and what ended them.
pub(crate) fn summary(tally: &Tally) {
    const NAMES: [&str; 20] = [
        "#DE",
        "#DB",
        "NMI",
        "#BP",
        "#OF",
        "#BR",
        "#UD",
        "#NM",
        "#DF",
        "CSO",
        "#TS",
        "#NP",
        "#SS",
        "#GP",
        "#PF",
        "vector 15",
        "#MF",
        "#AC",
        "#MC",
        "#XM",
    ];
    let mut line = heapless_line();
    for (vector, count) in tally.traps.iter().enumerate() {
        if *count == 0 {
            continue;
        }
        match NAMES.get(vector) {
            Some(name) => line.push(format_args!("{name}"), *count),
            None if vector == 32 => line.push(format_args!("interrupts"), *count),
            None => line.push(format_args!("vector {vector}"), *count),
        }
    }
    println!(
        "fuzz: {} instruction operations; ended by {}; {} unexpected",
        tally.ops,
        line.as_str(),
        tally.unexpected
    );
}

/// A fixed-size line builder (no allocator in the kernel).
struct Line {
    bytes: [u8; 256],
    len: usize,
}

fn heapless_line() -> Line {
    Line {
        bytes: [0; 256],
        len: 0,
    }
}

impl Line {
    fn push(&mut self, name: core::fmt::Arguments<'_>, count: u32) {
        use core::fmt::Write;
        let _ = write!(
            self,
            "{}{name} {count}",
            if self.len == 0 { "" } else { ", " }
        );
    }
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("?")
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.bytes.len() - self.len;
        let n = s.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

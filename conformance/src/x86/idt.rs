//! An IDT for all 256 vectors, a way to expect an exception, and a hook for interrupts
//! (SDM 6.10 IDT, 6.14.1 64-bit gates, 6.14.2 stack frame, 6.15 exception reference).
//!
//! Every vector enters a small stub that pushes a dummy error code where the CPU pushes none,
//! then the vector, then jumps to a common path that saves the general registers into a
//! [`TrapFrame`] and calls [`trap_handler`], which returns with `iretq`.
//!
//! - Exceptions (0-31): a test that provokes a fault arms [`expect_trap`]: the handler records
//!   the fault and resumes after the faulting instruction. Any other exception is a test
//!   failure, reported before the domain powers off.
//! - Interrupts (32-255): the handler calls the function set with [`set_interrupt_handler`]
//!   (see `crate::irq`). Without one, an interrupt is a test failure: nothing should send
//!   one to a test that did not ask for it.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use super::gdt::KERNEL_CODE;
use super::{DescriptorTablePointer, RacyCell};
use crate::framework;

/// #GP.
pub(crate) const GENERAL_PROTECTION: u8 = 13;

/// The registers and CPU frame as the common trap path leaves them, lowest address first:
/// general registers in encoding order without RSP, then the stub's vector and error code,
/// then what the CPU pushed.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct TrapFrame {
    pub(crate) rax: u64,
    pub(crate) rcx: u64,
    pub(crate) rdx: u64,
    pub(crate) rbx: u64,
    pub(crate) rbp: u64,
    pub(crate) rsi: u64,
    pub(crate) rdi: u64,
    pub(crate) r8: u64,
    pub(crate) r9: u64,
    pub(crate) r10: u64,
    pub(crate) r11: u64,
    pub(crate) r12: u64,
    pub(crate) r13: u64,
    pub(crate) r14: u64,
    pub(crate) r15: u64,
    pub(crate) vector: u64,
    pub(crate) error_code: u64,
    pub(crate) rip: u64,
    pub(crate) cs: u64,
    pub(crate) rflags: u64,
    pub(crate) rsp: u64,
    pub(crate) ss: u64,
}

// The common path below pushes 15 registers over the stub's vector and error code.
const _: () = assert!(core::mem::offset_of!(TrapFrame, vector) == 15 * 8);
const _: () = assert!(core::mem::offset_of!(TrapFrame, rip) == 17 * 8);
const _: () = assert!(size_of::<TrapFrame>() == 22 * 8);

global_asm!(
    // One stub per vector; `has_error` says whether the CPU pushes an error code (SDM table
    // 6-1: vectors 8, 10-14, 17, 21, 29, 30).
    ".macro LAMINA_TRAP_STUB vector, has_error",
    "lamina_conf_trap_\\vector:",
    ".if \\has_error == 0",
    "    push 0",
    ".endif",
    "    push \\vector",
    "    jmp lamina_conf_trap_common",
    ".endm",
    ".section .text.lamina_conf_traps,\"ax\",@progbits",
    "LAMINA_TRAP_STUB 0, 0",
    "LAMINA_TRAP_STUB 1, 0",
    "LAMINA_TRAP_STUB 2, 0",
    "LAMINA_TRAP_STUB 3, 0",
    "LAMINA_TRAP_STUB 4, 0",
    "LAMINA_TRAP_STUB 5, 0",
    "LAMINA_TRAP_STUB 6, 0",
    "LAMINA_TRAP_STUB 7, 0",
    "LAMINA_TRAP_STUB 8, 1",
    "LAMINA_TRAP_STUB 9, 0",
    "LAMINA_TRAP_STUB 10, 1",
    "LAMINA_TRAP_STUB 11, 1",
    "LAMINA_TRAP_STUB 12, 1",
    "LAMINA_TRAP_STUB 13, 1",
    "LAMINA_TRAP_STUB 14, 1",
    "LAMINA_TRAP_STUB 15, 0",
    "LAMINA_TRAP_STUB 16, 0",
    "LAMINA_TRAP_STUB 17, 1",
    "LAMINA_TRAP_STUB 18, 0",
    "LAMINA_TRAP_STUB 19, 0",
    "LAMINA_TRAP_STUB 20, 0",
    "LAMINA_TRAP_STUB 21, 1",
    "LAMINA_TRAP_STUB 22, 0",
    "LAMINA_TRAP_STUB 23, 0",
    "LAMINA_TRAP_STUB 24, 0",
    "LAMINA_TRAP_STUB 25, 0",
    "LAMINA_TRAP_STUB 26, 0",
    "LAMINA_TRAP_STUB 27, 0",
    "LAMINA_TRAP_STUB 28, 0",
    "LAMINA_TRAP_STUB 29, 1",
    "LAMINA_TRAP_STUB 30, 1",
    "LAMINA_TRAP_STUB 31, 0",
    // Vectors 32-255: no error code. One 16-byte slot per vector, so that the stub of vector
    // `v` is at `lamina_conf_interrupt_stubs + (v - 32) * 16` (each is at most 12 bytes).
    ".balign 16",
    ".global lamina_conf_interrupt_stubs",
    "lamina_conf_interrupt_stubs:",
    ".altmacro",
    ".macro LAMINA_INTERRUPT_STUB vector",
    "    .balign 16",
    "    push 0",
    "    push \\vector",
    "    jmp lamina_conf_trap_common",
    ".endm",
    ".set lamina_conf_vector, 32",
    ".rept 224",
    "    LAMINA_INTERRUPT_STUB %lamina_conf_vector",
    "    .set lamina_conf_vector, lamina_conf_vector + 1",
    ".endr",
    ".noaltmacro",
    // The CPU aligned RSP to 16 before pushing its 5-word frame; with the error code and the
    // vector that is 7 words, and 15 registers more make 22: RSP is 16-byte aligned at the call.
    "lamina_conf_trap_common:",
    "    push r15",
    "    push r14",
    "    push r13",
    "    push r12",
    "    push r11",
    "    push r10",
    "    push r9",
    "    push r8",
    "    push rdi",
    "    push rsi",
    "    push rbp",
    "    push rbx",
    "    push rdx",
    "    push rcx",
    "    push rax",
    "    mov rdi, rsp",
    "    cld",
    "    call {handler}",
    "    pop rax",
    "    pop rcx",
    "    pop rdx",
    "    pop rbx",
    "    pop rbp",
    "    pop rsi",
    "    pop rdi",
    "    pop r8",
    "    pop r9",
    "    pop r10",
    "    pop r11",
    "    pop r12",
    "    pop r13",
    "    pop r14",
    "    pop r15",
    "    add rsp, 16",
    "    iretq",
    // The stubs' addresses, in vector order.
    ".section .rodata.lamina_conf_trap_stubs,\"a\",@progbits",
    ".balign 8",
    ".global lamina_conf_trap_stubs",
    "lamina_conf_trap_stubs:",
    ".irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad lamina_conf_trap_\\vector",
    ".endr",
    handler = sym trap_handler,
);

unsafe extern "C" {
    /// The entry stubs of vectors 0-31 (above).
    static lamina_conf_trap_stubs: [u64; 32];
    /// The first of the 16-byte entry stubs of vectors 32-255 (above).
    fn lamina_conf_interrupt_stubs();
}

/// Bytes between the entry stubs of two consecutive interrupt vectors.
const INTERRUPT_STUB_BYTES: u64 = 16;

/// An IDT gate descriptor (SDM 6.14.1, figure 6-8).
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attributes: u8,
    offset_middle: u16,
    offset_high: u32,
    reserved: u32,
}

const _: () = assert!(size_of::<Gate>() == 16);

impl Gate {
    const MISSING: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attributes: 0,
        offset_middle: 0,
        offset_high: 0,
        reserved: 0,
    };

    /// A present 64-bit interrupt gate (type 14: IF cleared on entry) callable from `dpl`.
    fn interrupt(handler: u64, dpl: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: KERNEL_CODE,
            ist: 0,
            type_attributes: 0x80 | (dpl & 3) << 5 | 0xe,
            offset_middle: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

const IDT_ENTRIES: usize = 256;
static IDT: RacyCell<[Gate; IDT_ENTRIES]> = RacyCell::new([Gate::MISSING; IDT_ENTRIES]);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Fills all 256 vectors and loads the IDT (once per domain).
pub(crate) fn install() {
    if INSTALLED.swap(true, Ordering::Relaxed) {
        return;
    }
    // SAFETY: the stub table is immutable data defined in the assembly above.
    let stubs = unsafe { lamina_conf_trap_stubs };
    let idt = IDT.get();
    for (vector, stub) in stubs.into_iter().enumerate() {
        // SAFETY: the IDT is not loaded yet; nothing reads it concurrently.
        unsafe { (*idt)[vector] = Gate::interrupt(stub, 0) };
    }
    let first_interrupt_stub = lamina_conf_interrupt_stubs as *const () as u64;
    for vector in 32..IDT_ENTRIES {
        let stub = first_interrupt_stub + (vector as u64 - 32) * INTERRUPT_STUB_BYTES;
        // SAFETY: as above.
        unsafe { (*idt)[vector] = Gate::interrupt(stub, 0) };
    }
    let idtr = DescriptorTablePointer {
        limit: (size_of::<[Gate; IDT_ENTRIES]>() - 1) as u16,
        base: IDT.get() as u64,
    };
    // SAFETY: the IDT is static and every gate points at a valid stub of its own vector.
    unsafe { asm!("lidt [{}]", in(reg) &raw const idtr, options(nostack, preserves_flags)) };
}

/// What vectors 32-255 call, with the vector; 0 while none is set.
static INTERRUPT_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Has every interrupt (vectors 32-255) call `handler` with its vector, with interrupts off,
/// and loads the IDT if it is not yet. The handler returns to the interrupted code.
pub(crate) fn set_interrupt_handler(handler: fn(u8)) {
    install();
    INTERRUPT_HANDLER.store(handler as usize, Ordering::SeqCst);
}

/// Points `vector` (32-255) at `handler`, callable with `int vector` from `dpl`.
pub(crate) fn set_gate(vector: u8, handler: u64, dpl: u8) {
    install();
    assert!(vector >= 32, "vectors 0-31 are the exception stubs'");
    // SAFETY: interrupts are off and no `int` runs while we write; a 16-byte store cannot be
    // observed half-done by this vCPU.
    unsafe { (*IDT.get())[usize::from(vector)] = Gate::interrupt(handler, dpl) };
}

/// Points exception `vector` at `handler` with its own stack, IST slot `ist` of the TSS, which
/// [`super::gdt::install`] loads (SDM 6.14.5). `handler` gets the CPU's frame as it is.
pub(crate) fn set_exception_gate_on_ist(vector: u8, handler: u64, ist: u8) {
    super::gdt::install();
    install();
    let mut gate = Gate::interrupt(handler, 0);
    gate.ist = ist & 7;
    // SAFETY: interrupts are off and the exception is not being taken while we write.
    unsafe { (*IDT.get())[usize::from(vector)] = gate };
}

/// Loads an IDT of limit 0: any exception after this triple-faults.
pub(crate) fn load_empty() {
    let idtr = DescriptorTablePointer { limit: 0, base: 0 };
    // SAFETY: the point: from here on any exception shuts the domain down (triple fault).
    unsafe { asm!("lidt [{}]", in(reg) &raw const idtr, options(nostack, preserves_flags)) };
}

/// An exception taken while [`expect_trap`] was armed for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TrapRecord {
    pub(crate) vector: u8,
    pub(crate) error_code: u64,
    pub(crate) rip: u64,
}

const NOT_ARMED: u64 = u64::MAX;
/// `vector | instruction length << 8` while armed.
static ARMED: AtomicU64 = AtomicU64::new(NOT_ARMED);
static TAKEN: AtomicU64 = AtomicU64::new(NOT_ARMED);
/// The armed exception may come from CPL 3 too ([`expect_trap_from_user`]).
static ARMED_FOR_USER: AtomicBool = AtomicBool::new(false);
static TAKEN_ERROR_CODE: AtomicU64 = AtomicU64::new(0);
static TAKEN_RIP: AtomicU64 = AtomicU64::new(0);

/// Runs `provoke`, during which exception `vector` at CPL 0 is expected: the handler records
/// it and resumes `insn_len` bytes after the faulting instruction. `provoke` must raise it at
/// most once, from an instruction of exactly `insn_len` bytes. Returns what was taken, if
/// anything.
pub(crate) fn expect_trap(vector: u8, insn_len: u8, provoke: impl FnOnce()) -> Option<TrapRecord> {
    install();
    TAKEN.store(NOT_ARMED, Ordering::SeqCst);
    ARMED.store(
        u64::from(vector) | u64::from(insn_len) << 8,
        Ordering::SeqCst,
    );
    provoke();
    ARMED.store(NOT_ARMED, Ordering::SeqCst);
    match TAKEN.load(Ordering::SeqCst) {
        NOT_ARMED => None,
        taken => Some(TrapRecord {
            vector: taken as u8,
            error_code: TAKEN_ERROR_CODE.load(Ordering::SeqCst),
            rip: TAKEN_RIP.load(Ordering::SeqCst),
        }),
    }
}

/// [`expect_trap`] for an exception that user code `provoke` runs raises at CPL 3: the
/// handler resumes the user code `insn_len` bytes after the faulting instruction.
pub(crate) fn expect_trap_from_user(
    vector: u8,
    insn_len: u8,
    provoke: impl FnOnce(),
) -> Option<TrapRecord> {
    ARMED_FOR_USER.store(true, Ordering::SeqCst);
    let taken = expect_trap(vector, insn_len, provoke);
    ARMED_FOR_USER.store(false, Ordering::SeqCst);
    taken
}

/// The conventional mnemonic of exception `vector`.
pub(crate) fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved",
        "reserved", "reserved", "reserved", "reserved", "#HV", "#VC", "#SX", "reserved",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("interrupt")
}

/// Called by the common trap path with the saved state, which it may change.
extern "sysv64" fn trap_handler(frame: &mut TrapFrame) {
    if frame.vector >= 32 {
        let vector = frame.vector as u8;
        match INTERRUPT_HANDLER.load(Ordering::SeqCst) {
            0 => {
                framework::fail(format_args!(
                    "unexpected interrupt, vector {vector:#x}, at RIP {:#x}",
                    frame.rip
                ));
                framework::finish()
            }
            handler => {
                // SAFETY: only `set_interrupt_handler` stores here, and it stores a `fn(u8)`.
                let handler: fn(u8) = unsafe { core::mem::transmute::<usize, fn(u8)>(handler) };
                handler(vector);
                return;
            }
        }
    }
    let armed = ARMED.load(Ordering::SeqCst);
    let from_cpl0 = frame.cs & 3 == 0 || ARMED_FOR_USER.load(Ordering::SeqCst);
    if armed != NOT_ARMED && frame.vector == armed & 0xff && from_cpl0 {
        ARMED.store(NOT_ARMED, Ordering::SeqCst);
        TAKEN_ERROR_CODE.store(frame.error_code, Ordering::SeqCst);
        TAKEN_RIP.store(frame.rip, Ordering::SeqCst);
        TAKEN.store(frame.vector, Ordering::SeqCst);
        frame.rip += armed >> 8;
        return;
    }
    framework::fail(format_args!(
        "unexpected exception {} (vector {}, error code {:#x}) at RIP {:#x}, CS {:#x}, RSP {:#x}",
        exception_name(frame.vector),
        frame.vector,
        frame.error_code,
        frame.rip,
        frame.cs,
        frame.rsp
    ));
    framework::finish()
}

//! A static IDT for kernels: exception stubs that report and crash, interrupt handlers by
//! vector, and a hook on the way out of every interrupt where a kernel may switch tasks.
//!
//! References: Intel SDM Vol. 3A, 6.10 (IDT), 6.12.1 (interrupt gates clear IF), 6.14.1
//! (64-bit gate descriptors), 6.14.2 (the 64-bit stack frame: RSP is aligned to 16 bytes
//! before SS, RSP, RFLAGS, CS, RIP are pushed), 6.15 (which exceptions push an error code).
//! AMD's APM Vol. 2, 8.9 says the same.
//!
//! Every vector enters a 16-byte stub (`global_asm!`, since `extern "x86-interrupt"` is not
//! stable) that pushes a dummy error code where the CPU pushes none, then the vector, and
//! jumps to a common path. That path saves the general registers into a [`TrapFrame`] on the
//! current stack and calls the dispatcher, which
//! 1. calls the handler registered with [`set_handler`] for the vector; without one, an
//!    exception (vectors 0-31) or stray interrupt is reported on the console with its vector,
//!    error code and RIP, and the domain shuts down with `Crash`;
//! 2. calls the switch hook ([`set_switch_hook`]), if any, which returns the frame to resume:
//!    the interrupted one, or another task's;
//! 3. returns that frame's address; the common path loads it into RSP, restores the registers
//!    from it and `iretq`s.
//!
//! # Bring your own IDT
//!
//! A kernel that keeps its own IDT (usually the `x86_64` crate's `InterruptDescriptorTable`)
//! does not call [`init`], and asks the SDK's helpers for the same
//! ([`Routing::KernelIdt`], e.g. [`TimerOps::start_periodic_routed`](crate::pvops::TimerOps::start_periodic_routed)):
//! they then register their handlers with the dispatcher and set up the hardware or the
//! hypervisor, but never load an IDT. The kernel routes each vector the helper names
//! ([`TimerOps::vectors`](crate::pvops::TimerOps::vectors), or the vector it passed to
//! [`events::install_upcall`](crate::events::install_upcall)) in one of two ways:
//!
//! - to the SDK's stub for that vector, [`entry_point`]: the gate runs the same path as in
//!   the SDK's IDT (registers saved, the handler of [`set_handler`], the switch hook, `iretq`).
//!   Works on stable Rust; with the `x86_64` crate:
//!   `unsafe { idt[vector].set_handler_addr(VirtAddr::new(interrupts::entry_point(vector))) };`
//! - or to a handler of its own (an `extern "x86-interrupt"` function on nightly) that calls
//!   the SDK's function for the vector: [`events::dispatch_pending`](crate::events::dispatch_pending)
//!   for the upcall, [`pvops::handle_timer_interrupt`](crate::pvops::handle_timer_interrupt)
//!   for the native timer, nothing for the spurious vector; or [`handle_vector`] for any
//!   vector with a handler registered here.
//!
//! Exceptions stay the kernel's: vectors it leaves to [`entry_point`] without a handler are
//! reported and crash the domain, as in the SDK's IDT.
//!
//! All gates are interrupt gates: handlers run with interrupts off and are never nested
//! (except by an exception inside a handler, which crashes). There is no TSS and no IST: the
//! handler runs on the interrupted stack, which is fine at CPL 0 with the red zone disabled
//! (the `x86_64-unknown-none` target disables it and uses no SSE registers, so the general
//! registers are the whole state to save).

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use lamina_abi::sched::ShutdownReason;

/// What the common path saves, lowest address first: the general registers in encoding
/// order (without RSP), the stub's vector and error code, then the CPU's frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)] // register names
pub struct TrapFrame {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    /// The vector the stub pushed.
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors without one.
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// The common path pushes 15 registers over the stub's two words; the CPU's frame follows.
const _: () = assert!(core::mem::offset_of!(TrapFrame, vector) == 15 * 8);
const _: () = assert!(core::mem::offset_of!(TrapFrame, rip) == 17 * 8);
const _: () = assert!(size_of::<TrapFrame>() == 22 * 8);
// 22 words from a 16-byte-aligned RSP leave RSP aligned for the call into Rust.
const _: () = assert!(size_of::<TrapFrame>().is_multiple_of(16));

/// RFLAGS.IF.
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS bit 1, which always reads as 1.
pub const RFLAGS_RESERVED_ONE: u64 = 1 << 1;

/// An interrupt or exception handler. It may change the frame (for example advance `rip`
/// past a faulting instruction).
pub type InterruptHandler = fn(&mut TrapFrame);

/// Called on the way out of every interrupt with the interrupted frame; returns the frame to
/// resume (see [`set_switch_hook`]).
pub type SwitchHook = fn(*mut TrapFrame) -> *mut TrapFrame;

/// Vectors the CPU reserves for exceptions.
pub const FIRST_INTERRUPT_VECTOR: u8 = 32;

/// The short names of the exceptions (SDM table 6-1), by vector.
pub const EXCEPTION_NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25",
    "#26", "#27", "#HV", "#VC", "#SX", "#31",
];

/// The vectors for which the CPU pushes an error code (SDM 6.15).
pub const fn pushes_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// A 64-bit IDT gate descriptor (SDM 6.14.1, figure 6-8).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const _: () = assert!(size_of::<Gate>() == 16);

/// Present, DPL 0, type 0xE (64-bit interrupt gate).
const INTERRUPT_GATE: u8 = 0x8e;

impl Gate {
    const fn interrupt(handler: u64, selector: u16) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector,
            ist: 0,
            attributes: INTERRUPT_GATE,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

/// The IDT: written once by [`init`], then only read by the CPU.
#[repr(C, align(16))]
struct Idt(core::cell::UnsafeCell<[Gate; 256]>);

// SAFETY: written only by the one caller of `init` that wins `IDT_LOADED`, before the IDT is
// loaded; afterwards only the CPU reads it.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(core::cell::UnsafeCell::new(
    [Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        attributes: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    }; 256],
));
static IDT_LOADED: AtomicBool = AtomicBool::new(false);

static HANDLERS: [AtomicPtr<()>; 256] = [const { AtomicPtr::new(core::ptr::null_mut()) }; 256];
static SWITCH_HOOK: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

// The stubs: 256 of 16 bytes each, `.org` refusing to assemble one that does not fit.
#[cfg(target_os = "none")]
core::arch::global_asm!(
    ".pushsection .text.lamina_idt,\"ax\",@progbits",
    ".balign 16",
    ".global lamina_idt_stubs",
    ".hidden lamina_idt_stubs",
    "lamina_idt_stubs:",
    ".set lamina_vector, 0",
    ".rept 256",
    "  .if (lamina_vector == 8) || ((lamina_vector >= 10) && (lamina_vector <= 14)) || (lamina_vector == 17) || (lamina_vector == 21) || (lamina_vector == 29) || (lamina_vector == 30)",
    "  .else",
    "    pushq $0",
    "  .endif",
    "  pushq $lamina_vector",
    "  jmp lamina_idt_common",
    "  .org lamina_idt_stubs + (lamina_vector + 1) * 16, 0xcc",
    "  .set lamina_vector, lamina_vector + 1",
    ".endr",
    "lamina_idt_common:",
    // Registers in reverse encoding order, so RAX ends up at the lowest address.
    "  pushq %r15",
    "  pushq %r14",
    "  pushq %r13",
    "  pushq %r12",
    "  pushq %r11",
    "  pushq %r10",
    "  pushq %r9",
    "  pushq %r8",
    "  pushq %rdi",
    "  pushq %rsi",
    "  pushq %rbp",
    "  pushq %rbx",
    "  pushq %rdx",
    "  pushq %rcx",
    "  pushq %rax",
    "  movq %rsp, %rdi",
    "  cld",
    "  call {dispatch}",
    // The frame to resume: the same one, or another task's.
    "  movq %rax, %rsp",
    "  popq %rax",
    "  popq %rcx",
    "  popq %rdx",
    "  popq %rbx",
    "  popq %rbp",
    "  popq %rsi",
    "  popq %rdi",
    "  popq %r8",
    "  popq %r9",
    "  popq %r10",
    "  popq %r11",
    "  popq %r12",
    "  popq %r13",
    "  popq %r14",
    "  popq %r15",
    // The vector and the error code.
    "  addq $16, %rsp",
    "  iretq",
    ".popsection",
    dispatch = sym lamina_idt_dispatch,
    options(att_syntax),
);

/// Whose IDT an SDK helper that takes interrupts routes its vectors through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// The SDK's IDT: the helper calls [`init`] (loading the SDK's IDT over whatever was
    /// loaded, the first time) and registers its handlers with [`set_handler`].
    SdkIdt,
    /// The kernel's own IDT, which the helper never touches: it registers its handlers with
    /// [`set_handler`], and the kernel routes the vectors to them (module documentation, "Bring
    /// your own IDT").
    KernelIdt,
}

/// The address of the SDK's entry stub for `vector`, for a gate in the kernel's own IDT (an
/// interrupt gate, DPL 0, through the kernel's 64-bit code segment). The stub saves the
/// registers, runs the handler registered with [`set_handler`] (or reports and crashes), the
/// switch hook, and returns with `iretq`, exactly as through the SDK's IDT.
#[cfg(target_os = "none")]
pub fn entry_point(vector: u8) -> u64 {
    stub_address(vector)
}

/// Runs the handler registered with [`set_handler`] for `vector`, for a kernel whose own
/// interrupt handler (`extern "x86-interrupt"`, say) owns the CPU's frame: the handler gets a
/// [`TrapFrame`] that carries only the vector (the registers and the CPU's frame read as 0,
/// and what the handler changes in it is dropped), and the switch hook is not called. The
/// SDK's own handlers (upcall, timer, spurious) need nothing else. Returns false, and does
/// nothing, when no handler is registered.
pub fn handle_vector(vector: u8) -> bool {
    let raw = HANDLERS[usize::from(vector)].load(Ordering::Acquire);
    if raw.is_null() {
        return false;
    }
    // SAFETY: `set_handler` is the only writer of non-null values, each an
    // `InterruptHandler` cast to a pointer.
    let handler = unsafe { core::mem::transmute::<*mut (), InterruptHandler>(raw) };
    let mut frame = TrapFrame {
        vector: u64::from(vector),
        ..TrapFrame::default()
    };
    handler(&mut frame);
    true
}

/// Address of vector `vector`'s stub.
#[cfg(target_os = "none")]
fn stub_address(vector: u8) -> u64 {
    unsafe extern "C" {
        /// The first stub, defined by the `global_asm!` above.
        static lamina_idt_stubs: u8;
    }
    (&raw const lamina_idt_stubs) as u64 + 16 * u64::from(vector)
}

#[cfg(not(target_os = "none"))]
fn stub_address(_vector: u8) -> u64 {
    unreachable!("the SDK's IDT exists on the bare-metal target only")
}

/// The selector in CS.
pub fn code_selector() -> u16 {
    let cs: u16;
    // SAFETY: reading a segment register has no side effect.
    unsafe { asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs
}

/// The selector in SS.
pub fn stack_selector() -> u16 {
    let ss: u16;
    // SAFETY: reading a segment register has no side effect.
    unsafe { asm!("mov {:x}, ss", out(reg) ss, options(nomem, nostack, preserves_flags)) };
    ss
}

/// Fills the SDK's IDT (every vector to its stub, through the current code segment) and loads
/// it with `lidt`. Only the first call does anything. Interrupts stay as they are. A kernel
/// that keeps its own IDT never calls it (module documentation, "Bring your own IDT").
pub fn init() {
    if IDT_LOADED.swap(true, Ordering::AcqRel) {
        return;
    }
    let selector = code_selector();
    // SAFETY: only the caller that flipped `IDT_LOADED` gets here, and the CPU does not use
    // the table before the `lidt` below.
    let gates = unsafe { &mut *IDT.0.get() };
    for (vector, gate) in gates.iter_mut().enumerate() {
        *gate = Gate::interrupt(stub_address(vector as u8), selector);
    }
    load_idt();
}

/// Loads the SDK's IDT on the calling vCPU, which [`init`] filled on another: each vCPU of a
/// kernel with several has its own IDTR. The vCPU must use the code segment [`init`] saw (the
/// boot GDT's `0x08` for a vCPU started by `vcpu_op` or a SIPI, docs/abi.md 19.1, 14.2).
/// Returns false, loading nothing, before [`init`].
pub fn load_on_this_vcpu() -> bool {
    if !IDT_LOADED.load(Ordering::Acquire) {
        return false;
    }
    load_idt();
    true
}

fn load_idt() {
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let pointer = Pointer {
        limit: (size_of::<[Gate; 256]>() - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the table is static, complete, and every gate points at a stub that saves the
    // state it changes and returns with `iretq`.
    unsafe {
        asm!("lidt [{}]", in(reg) &raw const pointer, options(readonly, nostack, preserves_flags))
    };
}

/// Whether [`init`] has loaded the SDK's IDT.
pub fn initialized() -> bool {
    IDT_LOADED.load(Ordering::Acquire)
}

/// Has the dispatcher call `handler` for `vector`. For an exception vector (0-31) it replaces
/// the report-and-crash default. The dispatcher serves the SDK's IDT and the [`entry_point`]s
/// a kernel's own IDT routes to alike.
pub fn set_handler(vector: u8, handler: InterruptHandler) {
    HANDLERS[usize::from(vector)].store(handler as *mut (), Ordering::Release);
}

/// Forgets `vector`'s handler.
pub fn remove_handler(vector: u8) {
    HANDLERS[usize::from(vector)].store(core::ptr::null_mut(), Ordering::Release);
}

/// Installs the hook called on the way out of every interrupt (after the handler), or removes
/// it (`None`). A scheduler uses it to resume another task: it stores the interrupted frame
/// pointer and returns the frame of the task to run.
///
/// # Safety
/// Every pointer the hook returns must be the interrupted frame or a frame that the common
/// path or [`new_thread_frame`] built, on a stack that nothing else uses, and that has not
/// been resumed since it was saved.
pub unsafe fn set_switch_hook(hook: Option<SwitchHook>) {
    let raw = hook.map_or(core::ptr::null_mut(), |hook| hook as *mut ());
    SWITCH_HOOK.store(raw, Ordering::Release);
}

/// The Rust side of the common path.
#[cfg_attr(not(target_os = "none"), allow(dead_code))] // called from the stubs only
extern "sysv64" fn lamina_idt_dispatch(frame: *mut TrapFrame) -> *mut TrapFrame {
    // SAFETY: the common path passes the frame it just built on this stack; nothing else
    // refers to it while the handler runs.
    let trap = unsafe { &mut *frame };
    let vector = trap.vector as u8;
    let raw = HANDLERS[usize::from(vector)].load(Ordering::Acquire);
    if raw.is_null() {
        report_and_crash(trap);
    }
    // SAFETY: `set_handler` is the only writer of non-null values, each an
    // `InterruptHandler` cast to a pointer.
    let handler = unsafe { core::mem::transmute::<*mut (), InterruptHandler>(raw) };
    handler(trap);
    let hook = SWITCH_HOOK.load(Ordering::Acquire);
    if hook.is_null() {
        return frame;
    }
    // SAFETY: `set_switch_hook` is the only writer, storing a `SwitchHook`.
    let hook = unsafe { core::mem::transmute::<*mut (), SwitchHook>(hook) };
    hook(frame)
}

/// CR2, the address of the last page fault.
fn cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 at CPL 0 has no side effect.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Reports an exception or interrupt nobody handles and ends the domain.
fn report_and_crash(frame: &TrapFrame) -> ! {
    let vector = frame.vector as u8;
    crate::console::finish_line();
    if vector < FIRST_INTERRUPT_VECTOR {
        let cr2 = if vector == 14 { cr2() } else { 0 };
        crate::println!(
            "lamina-guest-sdk: unhandled exception {} (vector {vector}), error code {:#x}, at RIP {:#x}, RSP {:#x}, RFLAGS {:#x}, CR2 {cr2:#x}",
            EXCEPTION_NAMES[usize::from(vector)],
            frame.error_code,
            frame.rip,
            frame.rsp,
            frame.rflags,
        );
    } else {
        crate::println!(
            "lamina-guest-sdk: interrupt vector {vector} without a handler, at RIP {:#x}",
            frame.rip
        );
    }
    crate::hypercall::shutdown(ShutdownReason::Crash)
}

/// Builds the frame a new kernel thread starts from, at the top of its stack: resuming it
/// (through the switch hook) calls `entry(argument)` on that stack with interrupts on.
///
/// # Safety
/// `[stack_top - 256, stack_top)` must be writable memory of a stack that nothing else uses,
/// and large enough for what `entry` does.
pub unsafe fn new_thread_frame(
    stack_top: u64,
    entry: extern "sysv64" fn(u64) -> !,
    argument: u64,
) -> *mut TrapFrame {
    let top = stack_top & !0xf;
    // A zero return address: the entry starts with RSP = 8 (mod 16), as after a `call`.
    let entry_rsp = top - 8;
    let frame = ((top - 64 - size_of::<TrapFrame>() as u64) & !0xf) as *mut TrapFrame;
    // SAFETY: both writes are inside the caller's stack, below its top.
    unsafe {
        (entry_rsp as *mut u64).write(0);
        frame.write(TrapFrame {
            rdi: argument,
            rip: entry as usize as u64,
            cs: u64::from(code_selector()),
            rflags: RFLAGS_IF | RFLAGS_RESERVED_ONE,
            rsp: entry_rsp,
            ss: u64::from(stack_selector()),
            ..TrapFrame::default()
        });
    }
    frame
}

/// Enables interrupts (`sti`). Also a compiler barrier.
pub fn enable() {
    // SAFETY: enabling interrupts lets handlers run; the SDK's handlers and any the kernel
    // registered save and restore the state they touch.
    unsafe { asm!("sti", options(nostack)) };
}

/// Disables interrupts (`cli`). Also a compiler barrier.
pub fn disable() {
    // SAFETY: disabling interrupts only delays them.
    unsafe { asm!("cli", options(nostack)) };
}

/// Whether RFLAGS.IF is set.
pub fn are_enabled() -> bool {
    let rflags: u64;
    // SAFETY: `pushfq; pop` reads RFLAGS through the stack, leaving it balanced.
    unsafe { asm!("pushfq", "pop {}", out(reg) rflags, options(nomem, preserves_flags)) };
    rflags & RFLAGS_IF != 0
}

/// Runs `f` with interrupts off, then restores IF as it was.
pub fn without<R>(f: impl FnOnce() -> R) -> R {
    let were_enabled = are_enabled();
    disable();
    let result = f();
    if were_enabled {
        enable();
    }
    result
}

/// `sti; hlt`: enables interrupts and waits for one, with no window between the two (STI
/// delays interrupts by one instruction, SDM Vol. 2B "STI"). Returns after the handler ran,
/// with interrupts on.
pub fn enable_and_halt() {
    // SAFETY: as for `enable`; HLT only waits.
    unsafe { asm!("sti", "hlt", options(nostack)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_split_the_handler_address() {
        let gate = Gate::interrupt(0x1122_3344_5566_7788, 0x08);
        assert_eq!(gate.offset_low, 0x7788);
        assert_eq!(gate.offset_mid, 0x5566);
        assert_eq!(gate.offset_high, 0x1122_3344);
        assert_eq!(gate.selector, 0x08);
        assert_eq!(gate.attributes, 0x8e);
    }

    #[test]
    fn error_codes_follow_the_sdm_table() {
        let with: Vec<u8> = (0..32).filter(|&v| pushes_error_code(v)).collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
        assert_eq!(EXCEPTION_NAMES[13], "#GP");
        assert_eq!(EXCEPTION_NAMES[14], "#PF");
    }

    #[test]
    fn handle_vector_runs_the_registered_handler_with_the_vector() {
        use core::sync::atomic::AtomicU64;
        static SEEN: AtomicU64 = AtomicU64::new(0);
        fn record(frame: &mut TrapFrame) {
            SEEN.store(frame.vector, Ordering::SeqCst);
        }
        const VECTOR: u8 = 0xa7;
        assert!(!handle_vector(VECTOR), "no handler yet");
        set_handler(VECTOR, record);
        assert!(handle_vector(VECTOR));
        assert_eq!(SEEN.load(Ordering::SeqCst), u64::from(VECTOR));
        remove_handler(VECTOR);
        SEEN.store(0, Ordering::SeqCst);
        assert!(!handle_vector(VECTOR));
        assert_eq!(SEEN.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_thread_frame_starts_the_entry_with_its_argument() {
        extern "sysv64" fn entry(_: u64) -> ! {
            unreachable!()
        }
        let mut stack = vec![0u8; 4096];
        let top = stack.as_mut_ptr() as u64 + 4096;
        // SAFETY: the vector is ours and large enough.
        let frame = unsafe { &*new_thread_frame(top, entry, 7) };
        assert_eq!(frame.rdi, 7);
        let entry_address = entry as extern "sysv64" fn(u64) -> ! as usize as u64;
        assert_eq!(frame.rip, entry_address);
        assert_eq!(frame.rsp % 16, 8);
        assert!(frame.rsp < top);
        assert!((frame as *const TrapFrame as u64) + size_of::<TrapFrame>() as u64 <= frame.rsp);
        assert_ne!(frame.rflags & RFLAGS_IF, 0);
    }
}

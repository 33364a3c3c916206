//! The x86 machinery tests need that a kernel would normally own: reading the CPU state left
//! at entry, our own GDT/TSS and IDT, dropping to CPL 3, a register-exact hypercall probe,
//! MSRs and the local APIC, and opening windows for interrupts.
//!
//! References are to the Intel SDM, Volume 3A (system programming); AMD's APM Volume 2 says
//! the same for everything used here.

pub(crate) mod apic;
pub(crate) mod gdt;
pub(crate) mod idt;
pub(crate) mod msr;
pub(crate) mod probe;
pub(crate) mod user;

use core::arch::asm;
use core::cell::UnsafeCell;

/// A static that the one vCPU of a test domain changes only at well-defined points: before
/// loading it into the CPU, or with interrupts off outside any handler that reads it.
pub(crate) struct RacyCell<T>(UnsafeCell<T>);

// SAFETY: a conformance domain runs on its boot vCPU only, and every user of a `RacyCell`
// documents why its accesses cannot overlap (see the `SAFETY` comments at the call sites).
unsafe impl<T> Sync for RacyCell<T> {}

impl<T> RacyCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        RacyCell(UnsafeCell::new(value))
    }

    pub(crate) const fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// A stack for another privilege level, 16-byte aligned.
#[repr(C, align(16))]
pub(crate) struct Stack<const N: usize>([u8; N]);

impl<const N: usize> Stack<N> {
    pub(crate) const fn new() -> Self {
        Stack([0; N])
    }
}

impl<const N: usize> RacyCell<Stack<N>> {
    /// The address just above the stack, where RSP starts.
    pub(crate) fn top(&self) -> u64 {
        self.get() as u64 + N as u64
    }
}

/// What `SGDT` or `SIDT` stores (SDM 3.5.1, 6.10).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub(crate) struct DescriptorTablePointer {
    pub(crate) limit: u16,
    pub(crate) base: u64,
}

/// The GDTR.
pub(crate) fn sgdt() -> DescriptorTablePointer {
    let mut gdtr = DescriptorTablePointer::default();
    // SAFETY: SGDT writes 10 bytes to `gdtr`, which is exactly its size.
    unsafe { asm!("sgdt [{}]", in(reg) &raw mut gdtr, options(nostack, preserves_flags)) };
    gdtr
}

/// The IDTR.
pub(crate) fn sidt() -> DescriptorTablePointer {
    let mut idtr = DescriptorTablePointer::default();
    // SAFETY: SIDT writes 10 bytes to `idtr`, which is exactly its size.
    unsafe { asm!("sidt [{}]", in(reg) &raw mut idtr, options(nostack, preserves_flags)) };
    idtr
}

/// Reads a control register; `$cr` is `cr0`, `cr3` or `cr4`.
macro_rules! read_cr {
    ($cr:literal) => {{
        let value: u64;
        // SAFETY: reading a control register at CPL 0 has no side effect.
        unsafe {
            asm!(concat!("mov {}, ", $cr), out(reg) value, options(nomem, nostack, preserves_flags))
        };
        value
    }};
}

/// CR0.
pub(crate) fn read_cr0() -> u64 {
    read_cr!("cr0")
}

/// CR2: the address of the last page fault.
pub(crate) fn read_cr2() -> u64 {
    read_cr!("cr2")
}

/// CR3.
pub(crate) fn read_cr3() -> u64 {
    read_cr!("cr3")
}

/// CR4.
pub(crate) fn read_cr4() -> u64 {
    read_cr!("cr4")
}

/// Reads a segment register; `$seg` is `cs`, `ds`, `es` or `ss`.
macro_rules! read_segment {
    ($seg:literal) => {{
        let selector: u16;
        // SAFETY: reading a segment selector has no side effect.
        unsafe {
            asm!(concat!("mov {:x}, ", $seg), out(reg) selector, options(nomem, nostack, preserves_flags))
        };
        selector
    }};
}

/// The selectors in CS, DS, ES, SS, FS and GS.
pub(crate) fn segment_selectors() -> [(&'static str, u16); 6] {
    [
        ("CS", read_segment!("cs")),
        ("DS", read_segment!("ds")),
        ("ES", read_segment!("es")),
        ("SS", read_segment!("ss")),
        ("FS", read_segment!("fs")),
        ("GS", read_segment!("gs")),
    ]
}

/// RFLAGS.
pub(crate) fn read_rflags() -> u64 {
    let rflags: u64;
    // SAFETY: PUSHFQ/POP use 8 bytes of our stack and change nothing else.
    unsafe { asm!("pushfq", "pop {}", out(reg) rflags, options(nomem, preserves_flags)) };
    rflags
}

/// RSP, approximately (the caller's frame).
pub(crate) fn read_rsp() -> u64 {
    let rsp: u64;
    // SAFETY: copying RSP has no side effect.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    rsp
}

/// The time-stamp counter, read after every earlier instruction has completed (`LFENCE`
/// first, SDM Vol. 2B RDTSC).
pub(crate) fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: LFENCE and RDTSC only read the TSC into EDX:EAX.
    unsafe {
        asm!("lfence", "rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    u64::from(high) << 32 | u64::from(low)
}

/// Disables maskable interrupts (CLI).
pub(crate) fn disable_interrupts() {
    // SAFETY: CLI only clears RFLAGS.IF. Not `nomem`: interrupt handlers change memory, and
    // the compiler must not move accesses across the point where they stop.
    unsafe { asm!("cli", options(nostack)) };
}

/// Enables maskable interrupts (STI); they can arrive after the next instruction. The IDT
/// with an interrupt handler (`crate::irq::install`) must be in place.
pub(crate) fn enable_interrupts() {
    // SAFETY: STI only sets RFLAGS.IF; every vector has a gate once the IDT is installed. Not
    // `nomem`: interrupt handlers change memory from here on.
    unsafe { asm!("sti", options(nostack)) };
}

/// Enables interrupts for a few instructions and disables them again: any interrupt that is
/// deliverable, or becomes so in the window (the hypervisor asks for an interrupt-window
/// exit when IF is 0), is taken inside it. STI delays recognition by one instruction (SDM
/// Vol. 2B STI), so the window is several NOPs long.
pub(crate) fn interrupt_window() {
    // SAFETY: as for `enable_interrupts`; the handlers run on this stack and return.
    unsafe { asm!("sti", "nop", "nop", "nop", "nop", "cli", options(nostack)) };
}

/// `STI; HLT; CLI`: waits with interrupts enabled until an interrupt arrives and has been
/// handled, then disables them. STI's one-instruction shadow makes `STI; HLT` atomic: an
/// interrupt cannot slip in between and leave HLT waiting for the next one.
pub(crate) fn halt_with_interrupts() {
    // SAFETY: as for `enable_interrupts`; HLT only waits.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
}

//! The local APIC in x2APIC mode, as Lamina emulates it (docs/abi.md 14; SDM Vol. 3A chapter
//! 11: 11.12 x2APIC MSRs, 11.5.4 timer, 11.8 interrupt handling, 11.8.3.1 priorities).
//!
//! Registers are MSRs `0x800 + (xAPIC offset >> 4)`. The emulated timer counts at 1 GHz
//! before the divider (CPUID leaf 0x4000_0010 EBX), so with the divider at 1 an initial count
//! of `n` is `n` ns.

use super::msr;

/// IA32_APIC_BASE.
pub(crate) const APIC_BASE: u32 = 0x1b;
/// IA32_APIC_BASE bit 8: this is the bootstrap processor.
pub(crate) const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE bit 10: x2APIC mode.
pub(crate) const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE bit 11: the APIC is enabled.
pub(crate) const APIC_BASE_EN: u64 = 1 << 11;
/// The architectural base address of the xAPIC page.
pub(crate) const APIC_BASE_ADDRESS: u64 = 0xfee0_0000;
/// IA32_TSC_DEADLINE.
pub(crate) const TSC_DEADLINE: u32 = 0x6e0;

/// Local APIC ID.
pub(crate) const ID: u32 = 0x802;
/// Version.
pub(crate) const VERSION: u32 = 0x803;
/// Task priority.
pub(crate) const TPR: u32 = 0x808;
/// Processor priority (read-only).
pub(crate) const PPR: u32 = 0x80a;
/// End of interrupt (write 0).
pub(crate) const EOI: u32 = 0x80b;
/// Logical destination (read-only in x2APIC mode).
pub(crate) const LDR: u32 = 0x80d;
/// Spurious-interrupt vector; bit 8 enables the APIC.
pub(crate) const SVR: u32 = 0x80f;
/// In-service register, 8 MSRs of 32 vectors each (read-only).
pub(crate) const ISR0: u32 = 0x810;
/// Trigger-mode register, 8 MSRs (read-only).
pub(crate) const TMR0: u32 = 0x818;
/// Interrupt-request register, 8 MSRs (read-only).
pub(crate) const IRR0: u32 = 0x820;
/// Error status (write 0).
pub(crate) const ESR: u32 = 0x828;
/// Interrupt command register.
pub(crate) const ICR: u32 = 0x830;
/// LVT timer.
pub(crate) const LVT_TIMER: u32 = 0x832;
/// Timer initial count.
pub(crate) const TIMER_INITIAL_COUNT: u32 = 0x838;
/// Timer current count (read-only).
pub(crate) const TIMER_CURRENT_COUNT: u32 = 0x839;
/// Timer divide configuration.
pub(crate) const TIMER_DIVIDE: u32 = 0x83e;
/// Self IPI (write the vector).
pub(crate) const SELF_IPI: u32 = 0x83f;

/// SVR bit 8: APIC software-enabled.
pub(crate) const SVR_ENABLE: u64 = 1 << 8;
/// The spurious vector the tests program (never expected to arrive).
pub(crate) const SPURIOUS_VECTOR: u64 = 0xff;
/// LVT bit 16: masked.
pub(crate) const LVT_MASKED: u64 = 1 << 16;
/// LVT timer mode bits 17-18: one-shot.
pub(crate) const TIMER_ONE_SHOT: u64 = 0 << 17;
/// LVT timer mode bits 17-18: periodic.
pub(crate) const TIMER_PERIODIC: u64 = 1 << 17;
/// LVT timer mode bits 17-18: TSC-deadline.
pub(crate) const TIMER_TSC_DEADLINE: u64 = 2 << 17;
/// Divide configuration value for divide by 1 (SDM figure 11-10).
pub(crate) const DIVIDE_BY_1: u64 = 0b1011;
/// Divide configuration value for divide by 2.
pub(crate) const DIVIDE_BY_2: u64 = 0b0000;
/// ICR destination shorthand bits 18-19: self.
pub(crate) const ICR_SELF: u64 = 1 << 18;
/// The version register Lamina reports: version 0x14, 6 LVT entries (max LVT 5).
pub(crate) const LAMINA_VERSION: u64 = 0x50014;

/// The ISR or IRR MSR holding `vector`, and its bit there.
const fn vector_slot(first: u32, vector: u8) -> (u32, u64) {
    (first + (vector as u32 >> 5), 1 << (vector & 31))
}

/// Whether `vector` is in service (its ISR bit).
pub(crate) fn in_service(vector: u8) -> bool {
    let (register, bit) = vector_slot(ISR0, vector);
    msr::read(register) & bit != 0
}

/// Whether `vector` is requested (its IRR bit).
pub(crate) fn requested(vector: u8) -> bool {
    let (register, bit) = vector_slot(IRR0, vector);
    msr::read(register) & bit != 0
}

/// Writes an APIC register.
///
/// # Safety
/// The write must not make an interrupt arrive that the IDT does not expect.
pub(crate) unsafe fn write(register: u32, value: u64) {
    // SAFETY: APIC registers change no CPU state of the guest; the caller vouches for the
    // interrupts that may follow.
    unsafe { msr::write(register, value) };
}

/// Software-enables the APIC with TPR 0, the timer stopped and masked, divide by 1.
pub(crate) fn enable() {
    // SAFETY: none of these writes requests an interrupt: the timer is masked and stopped.
    unsafe {
        write(SVR, SVR_ENABLE | SPURIOUS_VECTOR);
        write(TPR, 0);
        write(LVT_TIMER, LVT_MASKED);
        write(TIMER_INITIAL_COUNT, 0);
        write(TIMER_DIVIDE, DIVIDE_BY_1);
    }
}

/// Signals the end of the highest-priority interrupt in service.
pub(crate) fn eoi() {
    // SAFETY: EOI may let a pending interrupt through, which the tests' handler expects.
    unsafe { write(EOI, 0) };
}

/// Sends `vector` to this vCPU through the self-IPI register.
pub(crate) fn self_ipi(vector: u8) {
    // SAFETY: the interrupt is what the caller asked for; its handler is installed.
    unsafe { write(SELF_IPI, u64::from(vector)) };
}

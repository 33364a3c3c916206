//! The emulated x2APIC, through its MSRs (docs/abi.md 14; Intel SDM Vol. 3A 12.12 x2APIC,
//! 12.5.4 APIC timer): what the native timer backend of [`crate::pvops`] drives.
//!
//! Every access is an `RDMSR` or `WRMSR`, so every access is an exit; the paravirtual timer
//! (`vcpu_op` timers and event upcalls) replaces the timer programming and the EOI.

use lamina_abi::cpuid::LEAF_TIMING;

use crate::msr::{rdmsr, wrmsr};

/// Local APIC ID (read-only).
pub const ID: u32 = 0x802;
/// Version (read-only).
pub const VERSION: u32 = 0x803;
/// Task priority.
pub const TPR: u32 = 0x808;
/// Processor priority (read-only).
pub const PPR: u32 = 0x80a;
/// End of interrupt (write 0).
pub const EOI: u32 = 0x80b;
/// Logical destination (read-only).
pub const LDR: u32 = 0x80d;
/// Spurious interrupt vector; bit 8 enables the APIC.
pub const SVR: u32 = 0x80f;
/// In-service register, 8 MSRs from here (read-only).
pub const ISR0: u32 = 0x810;
/// Interrupt request register, 8 MSRs from here (read-only).
pub const IRR0: u32 = 0x820;
/// Error status.
pub const ESR: u32 = 0x828;
/// Interrupt command: IPIs to this and the other vCPUs of the domain, INIT and STARTUP
/// (docs/abi.md 14.1, 14.2).
pub const ICR: u32 = 0x830;
/// LVT timer: vector bits 0-7, mask bit 16, mode bits 17-18.
pub const LVT_TIMER: u32 = 0x832;
/// Timer initial count.
pub const INITIAL_COUNT: u32 = 0x838;
/// Timer current count (read-only).
pub const CURRENT_COUNT: u32 = 0x839;
/// Timer divide configuration.
pub const DIVIDE_CONFIG: u32 = 0x83e;
/// Self IPI: write a vector.
pub const SELF_IPI: u32 = 0x83f;

/// SVR bit 8: APIC software enable.
pub const SVR_ENABLE: u64 = 1 << 8;
/// LVT bit 16: masked.
pub const LVT_MASKED: u64 = 1 << 16;
/// Divide configuration value for "divide by 1" (SDM Vol. 3A figure 12-10).
pub const DIVIDE_BY_1: u64 = 0b1011;

/// LVT timer modes (bits 17-18).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    /// Count down once from the initial count.
    OneShot = 0,
    /// Count down, reload, repeat.
    Periodic = 1 << 17,
    /// Fire when the TSC reaches IA32_TSC_DEADLINE.
    TscDeadline = 2 << 17,
}

/// CPUID.1:ECX bit 21: x2APIC. Asked once: CPUID is an exit under a hypervisor, and the
/// native IPI path asks at every send (the bit never changes).
pub fn available() -> bool {
    use core::sync::atomic::{AtomicU8, Ordering};
    const UNKNOWN: u8 = 0;
    const PRESENT: u8 = 1;
    const ABSENT: u8 = 2;
    static KNOWN: AtomicU8 = AtomicU8::new(UNKNOWN);
    match KNOWN.load(Ordering::Relaxed) {
        PRESENT => true,
        ABSENT => false,
        _ => {
            let present = crate::cpuid::cpuid(1, 0).ecx & (1 << 21) != 0;
            KNOWN.store(if present { PRESENT } else { ABSENT }, Ordering::Relaxed);
            present
        }
    }
}

/// CPUID.1:ECX bit 24: TSC-deadline timer mode.
pub fn tsc_deadline_available() -> bool {
    crate::cpuid::cpuid(1, 0).ecx & (1 << 24) != 0
}

/// The APIC timer's input clock in kHz before the divider (CPUID leaf 0x40000010 EBX; 0
/// when the hypervisor does not say).
pub fn timer_khz() -> u64 {
    u64::from(crate::cpuid::cpuid(LEAF_TIMING, 0).ebx)
}

/// Timer counts for `period_ns` with a clock of `timer_khz` and divide-by-1, at least 1.
pub const fn counts_for(period_ns: u64, timer_khz: u64) -> u64 {
    let counts = period_ns as u128 * timer_khz as u128 / 1_000_000;
    if counts == 0 {
        1
    } else if counts > u32::MAX as u128 {
        u32::MAX as u64
    } else {
        counts as u64
    }
}

/// Software-enables the APIC with `spurious_vector` for spurious interrupts.
///
/// # Safety
/// An x2APIC must be present ([`available`]) and the IDT must handle `spurious_vector`.
pub unsafe fn enable(spurious_vector: u8) {
    // SAFETY: the caller checked the x2APIC; SVR only enables delivery.
    unsafe { wrmsr(SVR, SVR_ENABLE | u64::from(spurious_vector)) };
}

/// Starts the timer: `vector` in `mode`, counting down from `initial_count` at the undivided
/// clock. (For TSC-deadline mode, write the deadline with [`set_tsc_deadline`] instead.)
///
/// # Safety
/// An x2APIC must be present and the IDT must handle `vector`.
pub unsafe fn start_timer(vector: u8, mode: TimerMode, initial_count: u32) {
    // SAFETY: the caller checked the x2APIC; the order (divider, LVT, count) is the SDM's
    // (writing the initial count starts the timer).
    unsafe {
        wrmsr(DIVIDE_CONFIG, DIVIDE_BY_1);
        wrmsr(LVT_TIMER, mode as u64 | u64::from(vector));
        if mode != TimerMode::TscDeadline {
            wrmsr(INITIAL_COUNT, u64::from(initial_count));
        }
    }
}

/// Arms a TSC-deadline timer (0 disarms).
///
/// # Safety
/// As for [`start_timer`], in TSC-deadline mode.
pub unsafe fn set_tsc_deadline(tsc: u64) {
    // SAFETY: the caller checked the x2APIC and chose the mode.
    unsafe { wrmsr(crate::msr::IA32_TSC_DEADLINE, tsc) };
}

/// Stops the timer: masks its LVT entry and clears the count.
///
/// # Safety
/// An x2APIC must be present.
pub unsafe fn stop_timer() {
    // SAFETY: the caller checked the x2APIC; masking only suppresses interrupts.
    unsafe {
        let lvt = rdmsr(LVT_TIMER);
        wrmsr(LVT_TIMER, lvt | LVT_MASKED);
        wrmsr(INITIAL_COUNT, 0);
        wrmsr(crate::msr::IA32_TSC_DEADLINE, 0);
    }
}

/// Signals the end of the interrupt in service.
///
/// # Safety
/// An x2APIC must be present; the caller is the handler of an APIC interrupt.
pub unsafe fn eoi() {
    // SAFETY: the caller checked the x2APIC; EOI takes 0 and clears the highest ISR bit.
    unsafe { wrmsr(EOI, 0) };
}

/// Writes the interrupt command register: sends the IPI `value` describes (Intel SDM Vol. 3A
/// 11.12.9; `pvops::smp::icr_fixed` builds a fixed one).
///
/// # Safety
/// An x2APIC must be present; the receivers' IDTs must handle the vector.
pub unsafe fn write_icr(value: u64) {
    // SAFETY: the caller checked the x2APIC and the receivers; the write only sends an IPI.
    unsafe { wrmsr(ICR, value) };
}

/// This vCPU's APIC ID.
///
/// # Safety
/// An x2APIC must be present.
pub unsafe fn id() -> u32 {
    // SAFETY: the caller checked the x2APIC; the ID register is read-only.
    unsafe { rdmsr(ID) as u32 }
}

/// Sets the task-priority class through CR8 (docs/abi.md 18.4): interrupts of class `class`
/// (`vector >> 4`) and below are held until it drops. CR8 is the TPR's bits 7:4, so this is
/// the same as writing `class << 4` to the TPR MSR; one exit either way.
///
/// # Safety
/// CPL 0; `class` must be at most 15 (otherwise #GP).
pub unsafe fn set_priority_class(class: u8) {
    // SAFETY: the caller runs at CPL 0 with a valid class; CR8 only holds interrupts back.
    unsafe { core::arch::asm!("mov cr8, {}", in(reg) u64::from(class), options(nostack)) };
}

/// The task-priority class (CR8, the TPR's bits 7:4, docs/abi.md 18.4).
///
/// # Safety
/// CPL 0.
pub unsafe fn priority_class() -> u8 {
    let class: u64;
    // SAFETY: the caller runs at CPL 0; reading CR8 has no effect.
    unsafe { core::arch::asm!("mov {}, cr8", out(reg) class, options(nomem, nostack)) };
    class as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_the_timer_clock() {
        // Lamina's 1 GHz timer clock: one count per ns.
        assert_eq!(counts_for(1_000_000, 1_000_000), 1_000_000);
        assert_eq!(counts_for(1_000_000, 25_000), 25_000);
        assert_eq!(counts_for(1, 1000), 1, "never zero: zero stops the timer");
        assert_eq!(counts_for(u64::MAX, 1_000_000), u64::from(u32::MAX));
    }
}

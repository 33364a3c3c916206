//! RDMSR and WRMSR (SDM Vol. 2B; Vol. 4 lists the MSRs), plainly or expecting `#GP`.
//!
//! The plain forms leave an unexpected `#GP` to the IDT's handler, which reports it as a test
//! failure; the `try_` forms expect one and return it as an error.

use core::arch::asm;

use super::idt::{self, GENERAL_PROTECTION, TrapRecord};

/// RDMSR (0F 32) and WRMSR (0F 30) are two bytes long.
const MSR_INSN_LEN: u8 = 2;

/// Executes RDMSR; the IDT must be installed.
fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: RDMSR of the MSRs the tests name changes no state; a missing one raises #GP,
    // which the installed IDT handles (as a failure, or as expected under `expect_trap`).
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    u64::from(high) << 32 | u64::from(low)
}

/// Executes WRMSR; the IDT must be installed.
///
/// # Safety
/// Writing `value` to `msr` must not break the conformance kernel.
unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the write; a #GP is handled as for `rdmsr`. Not `nomem`:
    // an MSR write can make an interrupt arrive, whose handler changes memory.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// Reads `msr`; a `#GP` fails the test.
pub(crate) fn read(msr: u32) -> u64 {
    idt::install();
    rdmsr(msr)
}

/// Writes `value` to `msr`; a `#GP` fails the test.
///
/// # Safety
/// Writing `value` to `msr` must not break the conformance kernel.
pub(crate) unsafe fn write(msr: u32, value: u64) {
    idt::install();
    // SAFETY: forwarded.
    unsafe { wrmsr(msr, value) };
}

/// Reads `msr`, expecting that it may raise `#GP`: `Err` with the exception if it did.
pub(crate) fn try_read(msr: u32) -> Result<u64, TrapRecord> {
    let mut value = 0;
    match idt::expect_trap(GENERAL_PROTECTION, MSR_INSN_LEN, || value = rdmsr(msr)) {
        Some(record) => Err(record),
        None => Ok(value),
    }
}

/// Writes `value` to `msr`, expecting that it may raise `#GP`: `Err` with the exception if it
/// did.
///
/// # Safety
/// Should the write be accepted, it must not break the conformance kernel.
pub(crate) unsafe fn try_write(msr: u32, value: u64) -> Result<(), TrapRecord> {
    // SAFETY: forwarded.
    match idt::expect_trap(GENERAL_PROTECTION, MSR_INSN_LEN, || unsafe {
        wrmsr(msr, value)
    }) {
        Some(record) => Err(record),
        None => Ok(()),
    }
}

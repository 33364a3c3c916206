//! Model-specific registers: `rdmsr` and `wrmsr`, and the numbers the SDK uses (docs/abi.md
//! 7.3 and 14).
//!
//! On Lamina every `RDMSR` and `WRMSR` exits to the hypervisor; an MSR it does not implement
//! raises `#GP(0)` in the guest, as on a processor without it.

use core::arch::asm;

/// IA32_APIC_BASE (SDM Vol. 3A 12.4.4): reads `0xfee00000 | BSP | EXTD | EN` on Lamina.
pub const IA32_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE (SDM Vol. 3A 12.5.4.1).
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Reads MSR `msr`.
///
/// # Safety
/// The caller must be at CPL 0 and know that the MSR exists (otherwise `#GP`), and that reading
/// it has no side effect the caller is not prepared for.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: the caller vouches for the MSR; RDMSR touches no memory.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    u64::from(high) << 32 | u64::from(low)
}

/// Writes `value` to MSR `msr`.
///
/// # Safety
/// The caller must be at CPL 0 and know what the write does: MSRs reconfigure the processor.
/// Not `nomem`: a write may make interrupts arrive, whose handlers touch memory.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the MSR and the value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

//! Extended state: x87, SSE and AVX (docs/abi.md 18.1, 18.2).
//!
//! Every vCPU has its own x87/SSE/AVX registers and XCR0, kept by the hypervisor across
//! switches as a CPU keeps them; a kernel uses them as on hardware. A vCPU starts with CR4.OSFXSR
//! set (SSE usable), CR4.OSXSAVE clear and XCR0 = x87 | SSE. To use AVX, set CR4.OSXSAVE and
//! write XCR0 with XSETBV ([`enable_all`] does both for what the hypervisor offers).
//!
//! Lamina's own kernels are built soft-float (the `x86_64-unknown-none` target): the compiler
//! never uses these registers, so a kernel that wants them uses inline assembly or a target
//! with SSE enabled.

use crate::cpuid::cpuid;
use core::arch::asm;

/// XCR0 bit 0: x87.
pub const XCR0_X87: u64 = 1 << 0;
/// XCR0 bit 1: SSE (XMM registers, MXCSR).
pub const XCR0_SSE: u64 = 1 << 1;
/// XCR0 bit 2: AVX (upper halves of the YMM registers).
pub const XCR0_AVX: u64 = 1 << 2;
/// CR4.OSXSAVE.
pub const CR4_OSXSAVE: u64 = 1 << 18;

/// The XCR0 bits the hypervisor lets this vCPU enable: CPUID.(EAX=0DH,ECX=0):EDX:EAX, or 0
/// when XSAVE is not offered (CPUID.1:ECX bit 26).
pub fn offered_xcr0() -> u64 {
    if cpuid(0, 0).eax < 0xd || cpuid(1, 0).ecx & (1 << 26) == 0 {
        return 0;
    }
    let leaf = cpuid(0xd, 0);
    u64::from(leaf.eax) | u64::from(leaf.edx) << 32
}

/// Whether AVX can be enabled: offered by CPUID.1:ECX bit 28 and by XCR0's bit 2.
pub fn avx_offered() -> bool {
    cpuid(1, 0).ecx & (1 << 28) != 0 && offered_xcr0() & XCR0_AVX != 0
}

/// Reads extended control register `xcr` (0: XCR0) with XGETBV; CR4.OSXSAVE must be set
/// (otherwise #UD).
pub fn xgetbv(xcr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: XGETBV only reads an extended control register into EDX:EAX.
    unsafe {
        asm!("xgetbv", in("ecx") xcr, out("eax") low, out("edx") high,
             options(nomem, nostack, preserves_flags));
    }
    u64::from(high) << 32 | u64::from(low)
}

/// Writes extended control register `xcr` with XSETBV.
///
/// # Safety
/// At CPL 0 with CR4.OSXSAVE set; a value the hypervisor refuses raises #GP(0) (docs/abi.md
/// 18.2), which the kernel must be ready for. Disabling state the kernel's code relies on
/// breaks it.
pub unsafe fn xsetbv(xcr: u32, value: u64) {
    // SAFETY: per the function contract.
    unsafe {
        asm!("xsetbv", in("ecx") xcr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nomem, nostack, preserves_flags));
    }
}

/// Reads CR4.
pub fn read_cr4() -> u64 {
    let value: u64;
    // SAFETY: reading CR4 at CPL 0 has no side effect.
    unsafe { asm!("mov {}, cr4", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Sets or clears CR4.OSXSAVE.
///
/// # Safety
/// At CPL 0. Clearing it makes XSAVE-family instructions and AVX raise #UD.
pub unsafe fn set_osxsave(enabled: bool) {
    let cr4 = if enabled {
        read_cr4() | CR4_OSXSAVE
    } else {
        read_cr4() & !CR4_OSXSAVE
    };
    // SAFETY: per the function contract; only OSXSAVE changes.
    unsafe { asm!("mov cr4, {}", in(reg) cr4, options(nomem, nostack, preserves_flags)) };
}

/// Sets CR4.OSXSAVE and XCR0 to every feature the hypervisor offers (x87, SSE and, where the
/// CPU has it, AVX). Returns the new XCR0, or `None` when XSAVE is not offered.
///
/// # Safety
/// At CPL 0, before anything relies on CR4.OSXSAVE being clear.
pub unsafe fn enable_all() -> Option<u64> {
    let offered = offered_xcr0();
    if offered == 0 {
        return None;
    }
    let xcr0 = offered & (XCR0_X87 | XCR0_SSE | XCR0_AVX);
    // SAFETY: per the function contract; the value is one the hypervisor offers.
    unsafe {
        set_osxsave(true);
        xsetbv(0, xcr0);
    }
    Some(xcr0)
}

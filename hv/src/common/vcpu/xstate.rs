//! Extended-state policy (docs/abi.md 18.1, 18.2): which XCR0 features a guest may enable, how
//! big its XSAVE area is, and what an XSETBV may do. Pure functions of CPUID, so they are the
//! same for both vendors and unit-tested on the host; `platform::xstate` does the saving.
//!
//! Intel SDM Vol. 1 13 (XSAVE-managed state) and the XSETBV entry in Vol. 2; AMD APM Vol. 2
//! 11.5 and Vol. 3 (XSETBV).

use crate::common::vcpu::cpuid::CpuidResult;
use crate::common::vcpu::vector;
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::registers::xcontrol::XCr0Flags;

/// XCR0 bit 0: x87 state (must always be set).
pub const XCR0_X87: u64 = XCr0Flags::X87.bits();
/// XCR0 bit 1: SSE state (XMM registers, MXCSR).
pub const XCR0_SSE: u64 = XCr0Flags::SSE.bits();
/// XCR0 bit 2: AVX state (upper halves of the YMM registers).
pub const XCR0_AVX: u64 = XCr0Flags::AVX.bits();
/// The components the hypervisor saves per vCPU; a guest may enable no other.
pub const XCR0_SAVED: u64 = XCR0_X87 | XCR0_SSE | XCR0_AVX;
/// A new vCPU's XCR0: x87 and SSE, as it starts with CR4.OSFXSR set (docs/abi.md 4.1).
pub const XCR0_RESET: u64 = XCR0_X87 | XCR0_SSE;
/// The legacy region (x87 and SSE, 512 bytes) and the XSAVE header (64 bytes).
pub const LEGACY_AND_HEADER_BYTES: u32 = 576;
/// FXSAVE's area, where the CPU has no XSAVE.
pub const FXSAVE_BYTES: u32 = 512;

const CPUID1_ECX_XSAVE: u32 = 1 << 26;

/// [`guest_xcr0_mask`] of this machine, set once at boot (with `platform::xstate::init`).
static GUEST_MASK: AtomicU64 = AtomicU64::new(0);

/// The XCR0 features guests may enable on this machine (0 until boot set them, or without
/// XSAVE).
#[inline]
pub fn guest_mask() -> u64 {
    GUEST_MASK.load(Ordering::Relaxed)
}

/// Records what [`guest_mask`] returns from now on.
pub fn set_guest_mask(mask: u64) {
    GUEST_MASK.store(mask, Ordering::Relaxed);
}

/// The XCR0 features guests may enable on this CPU: those the hypervisor saves, intersected
/// with what the processor supports (CPUID.(EAX=0DH,ECX=0):EAX). 0 without XSAVE.
pub fn guest_xcr0_mask(host: impl Fn(u32, u32) -> CpuidResult) -> u64 {
    if host(0, 0)[0] < 0xd || host(1, 0)[2] & CPUID1_ECX_XSAVE == 0 {
        return 0;
    }
    let supported = u64::from(host(0xd, 0)[0]) | (u64::from(host(0xd, 0)[3]) << 32);
    // x87 and SSE are always supported where XSAVE is; AVX needs SSE.
    let mask = supported & XCR0_SAVED;
    if mask & (XCR0_X87 | XCR0_SSE) != XCR0_X87 | XCR0_SSE {
        return 0;
    }
    mask
}

/// Bytes of a standard-format XSAVE area holding the components in `xcr0`: the end of the
/// furthest component (CPUID.(EAX=0DH,ECX=i):EBX offset, EAX size), at least the legacy region
/// and header.
pub fn xsave_bytes(xcr0: u64, host: impl Fn(u32, u32) -> CpuidResult) -> u32 {
    (2..63)
        .filter(|bit| xcr0 & (1 << bit) != 0)
        .map(|bit| {
            let [size, offset, _, _] = host(0xd, bit);
            offset.saturating_add(size)
        })
        .fold(LEGACY_AND_HEADER_BYTES, u32::max)
}

/// The fault an XSETBV raises, in the SDM's order: #UD while CR4.OSXSAVE is clear, #GP(0) at
/// CPL > 0, for an ECX other than 0 (XCR0 is the only XCR), without x87, with AVX but not SSE,
/// or with a bit outside `allowed`. `None`: XCR0 takes `value`.
pub fn xsetbv_fault(
    osxsave: bool,
    cpl: u8,
    ecx: u32,
    value: u64,
    allowed: u64,
) -> Option<(u8, Option<u32>)> {
    const GP: Option<(u8, Option<u32>)> = Some((vector::GENERAL_PROTECTION, Some(0)));
    if !osxsave || allowed == 0 {
        return Some((vector::INVALID_OPCODE, None));
    }
    if cpl != 0 || ecx != 0 {
        return GP;
    }
    if value & XCR0_X87 == 0
        || value & !allowed != 0
        || (value & XCR0_AVX != 0 && value & XCR0_SSE == 0)
    {
        return GP;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU with XSAVE and x87, SSE, AVX and AVX-512 (bits 5-7) in XCR0.
    fn host(leaf: u32, subleaf: u32) -> CpuidResult {
        match (leaf, subleaf) {
            (0, _) => [0x16, 0, 0, 0],
            (1, _) => [0, 0, CPUID1_ECX_XSAVE, 0],
            (0xd, 0) => [0xe7, 2688, 2688, 0],
            (0xd, 2) => [256, 576, 0, 0],
            (0xd, 5) => [64, 1088, 0, 0],
            _ => [0; 4],
        }
    }

    #[test]
    fn guests_get_x87_sse_and_avx_only() {
        assert_eq!(guest_xcr0_mask(host), 0b111);
        let no_avx = |l, s| match (l, s) {
            (0xd, 0) => [0b11, 576, 576, 0],
            _ => host(l, s),
        };
        assert_eq!(guest_xcr0_mask(no_avx), 0b11);
        let no_xsave = |l, s| match l {
            1 => [0; 4],
            _ => host(l, s),
        };
        assert_eq!(guest_xcr0_mask(no_xsave), 0);
    }

    #[test]
    fn the_area_ends_with_the_furthest_enabled_component() {
        assert_eq!(xsave_bytes(0b11, host), 576);
        assert_eq!(xsave_bytes(0b111, host), 832);
        assert_eq!(xsave_bytes(0b100111, host), 1152);
    }

    #[test]
    fn xsetbv_faults_as_the_sdm_says() {
        let ud = Some((vector::INVALID_OPCODE, None));
        let gp = Some((vector::GENERAL_PROTECTION, Some(0)));
        assert_eq!(xsetbv_fault(true, 0, 0, 0b111, 0b111), None);
        assert_eq!(xsetbv_fault(true, 0, 0, 0b11, 0b111), None);
        assert_eq!(xsetbv_fault(true, 0, 0, 0b1, 0b111), None);
        assert_eq!(
            xsetbv_fault(false, 0, 0, 0b11, 0b111),
            ud,
            "CR4.OSXSAVE clear"
        );
        assert_eq!(xsetbv_fault(false, 3, 1, 0, 0b111), ud, "#UD first");
        assert_eq!(xsetbv_fault(true, 0, 0, 0b11, 0), ud, "no XSAVE at all");
        assert_eq!(xsetbv_fault(true, 3, 0, 0b11, 0b111), gp, "CPL 3");
        assert_eq!(xsetbv_fault(true, 0, 1, 0b11, 0b111), gp, "ECX 1");
        assert_eq!(xsetbv_fault(true, 0, 0, 0b110, 0b111), gp, "no x87");
        assert_eq!(
            xsetbv_fault(true, 0, 0, 0b101, 0b111),
            gp,
            "AVX without SSE"
        );
        assert_eq!(xsetbv_fault(true, 0, 0, 0b111, 0b11), gp, "AVX not offered");
        assert_eq!(
            xsetbv_fault(true, 0, 0, 0xe7, 0b111),
            gp,
            "AVX-512 not saved"
        );
        assert_eq!(xsetbv_fault(true, 0, 0, 1 << 63, 0b111), gp, "reserved bit");
    }
}

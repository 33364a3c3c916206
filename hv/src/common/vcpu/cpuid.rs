//! The CPUID a guest sees: the host's, with the hypervisor-present bit set, the virtualization
//! extensions hidden, and Lamina's discovery leaves (`lamina_abi::cpuid`) at 0x40000000.
//! Extended state is shown as the vCPU has it (docs/abi.md 18.1): OSXSAVE mirrors the guest's
//! CR4, leaf 0xD offers only what the hypervisor saves, sized for the guest's XCR0.

use crate::common::vcpu::xstate::{self, XCR0_AVX};
use lamina_abi::cpuid::{
    LEAF_MAX, LEAF_SIGNATURE, LEAF_TIMING, LEAF_VERSION, features, signature_regs,
};

/// Frequency of the emulated APIC timer before its divider: one tick per nanosecond.
pub const APIC_TIMER_KHZ: u32 = 1_000_000;

/// `[eax, ebx, ecx, edx]`.
pub type CpuidResult = [u32; 4];

const HYPERVISOR_RANGE: core::ops::RangeInclusive<u32> = 0x4000_0000..=0x4fff_ffff;

/// The extended state of the vCPU asking, as far as CPUID shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XstateView {
    /// XCR0 features guests may enable (`xstate::guest_xcr0_mask`); 0: no XSAVE offered.
    pub mask: u64,
    /// The guest's XCR0.
    pub xcr0: u64,
    /// The guest's CR4.OSXSAVE.
    pub osxsave: bool,
}

// CPUID.1:ECX.
const LEAF1_ECX_FMA: u32 = 1 << 12;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_F16C: u32 = 1 << 29;
// CPUID.(7,0): features whose state lives in XCR0/XSS components the hypervisor does not save
// (MPX, AVX-512, PKU, CET, AMX), hidden so that no guest looks for them; AVX2 goes with AVX.
const LEAF7_EBX_AVX2: u32 = 1 << 5;
const LEAF7_EBX_UNSAVED: u32 = (1 << 14)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
const LEAF7_ECX_UNSAVED: u32 =
    (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 11) | (1 << 12) | (1 << 14);
const LEAF7_EDX_UNSAVED: u32 =
    (1 << 2) | (1 << 3) | (1 << 8) | (1 << 20) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);
/// Speculation-control MSRs guests do not get (docs/abi.md 7.3): leaf 7 EDX IBRS/IBPB (26),
/// STIBP (27), L1D_FLUSH (28), ARCH_CAPABILITIES (29), CORE_CAPABILITIES (30), SSBD (31).
/// MD_CLEAR (10) stays: VERW is an instruction, the guest's to use.
const LEAF7_EDX_SPECULATION_MSRS: u32 = 0b11_1111 << 26;
/// Leaf 0x8000_0008 EBX: IBPB (12), IBRS (14), STIBP (15), the always-on and preference bits
/// (16-18), SSBD (24), VIRT_SSBD (25), SSB_NO (26).
const EXT8_EBX_SPECULATION_MSRS: u32 = (1 << 12) | (0b111_1111 << 14) | (0b111 << 24);
/// CPUID.(0xD,1):EAX bits offered: XSAVEOPT and XGETBV with ECX = 1. XSAVEC and XSAVES
/// (compacted areas, IA32_XSS) are not.
const LEAF_D1_EAX_OFFERED: u32 = (1 << 0) | (1 << 2);

/// What the guest's CPUID(`leaf`, `subleaf`) returns, given the host's answer `host`, the
/// TSC frequency in kHz and the asking vCPU's extended state (asked for only by the leaves
/// that show it: 1, 7 and 0xD). Inlined into the CPUID exit, which is a hot trapping path.
#[inline(always)]
pub fn emulate(
    leaf: u32,
    subleaf: u32,
    tsc_khz: u32,
    xstate: impl FnOnce() -> XstateView,
    host: impl Fn(u32, u32) -> CpuidResult,
) -> CpuidResult {
    if HYPERVISOR_RANGE.contains(&leaf) {
        return match leaf {
            LEAF_SIGNATURE => {
                let [ebx, ecx, edx] = signature_regs();
                [LEAF_MAX, ebx, ecx, edx]
            }
            LEAF_VERSION => [lamina_abi::abi_version(), features::ALL, 0, 0],
            LEAF_TIMING => [tsc_khz, APIC_TIMER_KHZ, 0, 0],
            _ => [0; 4],
        };
    }
    let mut regs = host(leaf, subleaf);
    match leaf {
        1 => {
            regs[2] |= 1 << 31; // hypervisor present
            regs[2] &= !(1 << 5); // VMX
            regs[2] &= !(1 << 3); // MONITOR/MWAIT: not offered to guests
            regs[2] |= (1 << 21) | (1 << 24); // the emulated x2APIC, with TSC-deadline mode
            show_extended_state(leaf, subleaf, &mut regs, xstate(), &host);
        }
        7 | 0xd => show_extended_state(leaf, subleaf, &mut regs, xstate(), &host),
        0x8000_0001 => regs[2] &= !(1 << 2), // SVM
        0x8000_0008 => regs[1] &= !EXT8_EBX_SPECULATION_MSRS,
        0x8000_000a => regs = [0; 4], // SVM features
        _ => {}
    }
    regs
}

/// Puts vCPU `vcpu`'s APIC id where CPUID reports the initial APIC id (leaf 1 EBX[31:24],
/// the x2APIC id in EDX of leaves 0xB and 0x1F; SDM Vol. 2A CPUID), instead of the host
/// CPU's: the vCPU number, which the emulated x2APIC also reports (docs/abi.md 14, 19).
pub fn show_apic_id(leaf: u32, regs: &mut CpuidResult, vcpu: u32) {
    match leaf {
        1 => regs[1] = (regs[1] & 0x00ff_ffff) | ((vcpu & 0xff) << 24),
        0xb | 0x1f => regs[3] = vcpu,
        _ => {}
    }
}

/// Leaves 1, 7 and 0xD as the vCPU's extended state has them (docs/abi.md 18). Out of line:
/// the other leaves stay cheap.
#[inline(never)]
fn show_extended_state(
    leaf: u32,
    subleaf: u32,
    regs: &mut CpuidResult,
    xstate: XstateView,
    host: &impl Fn(u32, u32) -> CpuidResult,
) {
    match leaf {
        1 => {
            regs[2] &= !LEAF1_ECX_OSXSAVE;
            if xstate.mask == 0 {
                regs[2] &= !(LEAF1_ECX_XSAVE | LEAF1_ECX_AVX | LEAF1_ECX_FMA | LEAF1_ECX_F16C);
            } else if xstate.osxsave {
                regs[2] |= LEAF1_ECX_OSXSAVE;
            }
            if xstate.mask & XCR0_AVX == 0 {
                regs[2] &= !(LEAF1_ECX_AVX | LEAF1_ECX_FMA | LEAF1_ECX_F16C);
            }
        }
        7 if subleaf == 0 => {
            regs[1] &= !LEAF7_EBX_UNSAVED;
            if xstate.mask & XCR0_AVX == 0 {
                regs[1] &= !LEAF7_EBX_AVX2;
            }
            regs[2] &= !LEAF7_ECX_UNSAVED;
            regs[3] &= !(LEAF7_EDX_UNSAVED | LEAF7_EDX_SPECULATION_MSRS);
        }
        0xd => *regs = extended_state_leaf(subleaf, xstate, host),
        _ => {}
    }
}

/// Leaf 0xD (SDM Vol. 2, CPUID): the components guests may enable, the area for the guest's
/// XCR0 (sub-leaf 0 EBX) and for all of them (ECX); each offered component's size and offset.
fn extended_state_leaf(
    subleaf: u32,
    xstate: XstateView,
    host: &impl Fn(u32, u32) -> CpuidResult,
) -> CpuidResult {
    if xstate.mask == 0 {
        return [0; 4];
    }
    let guest_bytes = xstate::xsave_bytes(xstate.xcr0 & xstate.mask, host);
    match subleaf {
        0 => [
            xstate.mask as u32,
            guest_bytes,
            xstate::xsave_bytes(xstate.mask, host),
            (xstate.mask >> 32) as u32,
        ],
        1 => [host(0xd, 1)[0] & LEAF_D1_EAX_OFFERED, guest_bytes, 0, 0],
        2..=62 if xstate.mask & (1 << subleaf) != 0 => host(0xd, subleaf),
        _ => [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(leaf: u32, _: u32) -> CpuidResult {
        match leaf {
            1 => [0x806f8, 0, (1 << 5) | (1 << 3) | 1, 0xffff],
            0x8000_0001 => [0, 0, (1 << 2) | 1, 0],
            0xd => [0, 0, 0, 0],
            _ => [leaf, 1, 2, 3],
        }
    }

    const NO_XSAVE: XstateView = XstateView {
        mask: 0,
        xcr0: 0,
        osxsave: false,
    };

    #[test]
    fn the_guest_sees_lamina_and_no_virtualization_extensions() {
        let sig = emulate(LEAF_SIGNATURE, 0, 2_000_000, || NO_XSAVE, host);
        let bytes: Vec<u8> = sig[1..].iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(&bytes, b"LaminaLamina");
        assert_eq!(sig[0], LEAF_MAX);
        assert_eq!(
            emulate(LEAF_VERSION, 0, 2_000_000, || NO_XSAVE, host)[0],
            lamina_abi::abi_version()
        );
        assert_eq!(
            emulate(0x4000_0100, 0, 2_000_000, || NO_XSAVE, host),
            [0; 4]
        );
        let mut basic = emulate(1, 0, 2_000_000, || NO_XSAVE, host);
        show_apic_id(1, &mut basic, 3);
        assert_eq!(basic[1] >> 24, 3, "the vCPU number is the initial APIC id");
        let mut topology = [0, 0, 0, 7];
        show_apic_id(0xb, &mut topology, 5);
        assert_eq!(topology[3], 5, "and the x2APIC id");
        assert_eq!(basic[2], (1 << 31) | (1 << 24) | (1 << 21) | 1);
        assert_eq!(
            emulate(LEAF_TIMING, 0, 2_000_000, || NO_XSAVE, host),
            [2_000_000, APIC_TIMER_KHZ, 0, 0]
        );
        assert_eq!(emulate(0x8000_0001, 0, 2_000_000, || NO_XSAVE, host)[2], 1);
        assert_eq!(
            emulate(6, 0, 2_000_000, || NO_XSAVE, host),
            [6, 1, 2, 3],
            "other leaves pass through"
        );
    }

    /// A CPU with XSAVE, AVX, AVX2 and AVX-512, whose own CR4.OSXSAVE is set.
    fn avx_host(leaf: u32, subleaf: u32) -> CpuidResult {
        match (leaf, subleaf) {
            (1, _) => [0, 0, (0xf << 26) | (1 << 12), 0],
            (7, 0) => [0, (1 << 5) | (1 << 16) | (1 << 31), 1 << 3, 0],
            (0xd, 0) => [0xe7, 2688, 2688, 0],
            (0xd, 1) => [0xf, 2688, 0, 0],
            (0xd, 2) => [256, 576, 0, 0],
            (0xd, 5) => [64, 1088, 0, 0],
            _ => [0; 4],
        }
    }

    #[test]
    fn guests_see_no_speculation_control_msrs() {
        let all = |_: u32, _: u32| [u32::MAX; 4];
        let leaf7 = emulate(7, 0, 2_000_000, || NO_XSAVE, all);
        assert_eq!(leaf7[3] & LEAF7_EDX_SPECULATION_MSRS, 0);
        assert_ne!(leaf7[3] & (1 << 10), 0, "MD_CLEAR (VERW) stays");
        let ext = emulate(0x8000_0008, 0, 2_000_000, || NO_XSAVE, all);
        assert_eq!(ext[1] & ((1 << 12) | (1 << 14) | (1 << 15) | (1 << 24)), 0);
        assert_eq!(ext[0], u32::MAX, "the address sizes pass through");
    }

    #[test]
    fn osxsave_follows_the_guests_cr4_not_the_hosts() {
        let mut view = XstateView {
            mask: 0b111,
            xcr0: 0b11,
            osxsave: false,
        };
        let ecx = emulate(1, 0, 1, || view, avx_host)[2];
        assert_eq!(
            ecx & (0xf << 26),
            0b1101 << 26,
            "XSAVE, AVX, F16C; no OSXSAVE"
        );
        view.osxsave = true;
        assert_ne!(emulate(1, 0, 1, || view, avx_host)[2] & (1 << 27), 0);
        let without = XstateView { mask: 0, ..view };
        assert_eq!(emulate(1, 0, 1, || without, avx_host)[2] & (0xf << 26), 0);
        assert_eq!(
            emulate(1, 0, 1, || without, avx_host)[2] & (1 << 12),
            0,
            "FMA"
        );
    }

    #[test]
    fn leaf_d_offers_what_is_saved_sized_for_the_guests_xcr0() {
        let mut view = XstateView {
            mask: 0b111,
            xcr0: 0b11,
            osxsave: true,
        };
        assert_eq!(emulate(0xd, 0, 1, || view, avx_host), [0b111, 576, 832, 0]);
        view.xcr0 = 0b111;
        assert_eq!(emulate(0xd, 0, 1, || view, avx_host), [0b111, 832, 832, 0]);
        assert_eq!(emulate(0xd, 1, 1, || view, avx_host), [0b101, 832, 0, 0]);
        assert_eq!(emulate(0xd, 2, 1, || view, avx_host), [256, 576, 0, 0]);
        assert_eq!(
            emulate(0xd, 5, 1, || view, avx_host),
            [0; 4],
            "AVX-512 not offered"
        );
        let leaf7 = emulate(7, 0, 1, || view, avx_host);
        assert_eq!(
            (leaf7[1], leaf7[2]),
            (1 << 5, 0),
            "AVX2 kept, AVX-512 and PKU hidden"
        );
        view.mask = 0b11;
        assert_eq!(
            emulate(7, 0, 1, || view, avx_host)[1],
            0,
            "no AVX2 without AVX"
        );
    }
}

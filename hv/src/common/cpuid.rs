//! The CPUID a guest sees: the host's, with the hypervisor-present bit set, the virtualization
//! extensions hidden, and Lamina's discovery leaves (`lamina_abi::cpuid`) at 0x40000000.

use lamina_abi::cpuid::{
    LEAF_MAX, LEAF_SIGNATURE, LEAF_TIMING, LEAF_VERSION, features, signature_regs,
};

/// Frequency of the emulated APIC timer before its divider: one tick per nanosecond.
pub const APIC_TIMER_KHZ: u32 = 1_000_000;

/// `[eax, ebx, ecx, edx]`.
pub type CpuidResult = [u32; 4];

const HYPERVISOR_RANGE: core::ops::RangeInclusive<u32> = 0x4000_0000..=0x4fff_ffff;

/// What the guest's CPUID(`leaf`, `subleaf`) returns, given the host's answer `host` and the
/// TSC frequency in kHz.
pub fn emulate(
    leaf: u32,
    subleaf: u32,
    tsc_khz: u32,
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
        }
        0x8000_0001 => regs[2] &= !(1 << 2), // SVM
        0x8000_000a => regs = [0; 4],        // SVM features
        _ => {}
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(leaf: u32, _: u32) -> CpuidResult {
        match leaf {
            1 => [0x806f8, 0, (1 << 5) | (1 << 3) | 1, 0xffff],
            0x8000_0001 => [0, 0, (1 << 2) | 1, 0],
            _ => [leaf, 1, 2, 3],
        }
    }

    #[test]
    fn the_guest_sees_lamina_and_no_virtualization_extensions() {
        let sig = emulate(LEAF_SIGNATURE, 0, 2_000_000, host);
        let bytes: Vec<u8> = sig[1..].iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(&bytes, b"LaminaLamina");
        assert_eq!(sig[0], LEAF_MAX);
        assert_eq!(
            emulate(LEAF_VERSION, 0, 2_000_000, host)[0],
            lamina_abi::abi_version()
        );
        assert_eq!(emulate(0x4000_0100, 0, 2_000_000, host), [0; 4]);
        let basic = emulate(1, 0, 2_000_000, host);
        assert_eq!(basic[2], (1 << 31) | (1 << 24) | (1 << 21) | 1);
        assert_eq!(
            emulate(LEAF_TIMING, 0, 2_000_000, host),
            [2_000_000, APIC_TIMER_KHZ, 0, 0]
        );
        assert_eq!(emulate(0x8000_0001, 0, 2_000_000, host)[2], 1);
        assert_eq!(
            emulate(7, 0, 2_000_000, host),
            [7, 1, 2, 3],
            "other leaves pass through"
        );
    }
}

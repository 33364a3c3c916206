//! Lamina discovery through CPUID (docs/abi.md section 5).
//!
//! CPUID.1:ECX bit 31 says "a hypervisor is present"; leaf `0x4000_0000` then names it
//! ("LaminaLamina" in EBX, ECX, EDX; highest leaf in EAX) and leaf `0x4000_0001` gives the ABI
//! version (EAX) and feature bits (EBX, [`lamina_abi::cpuid::features`]); leaf `0x4000_0010`
//! gives the TSC and APIC timer frequencies ([`timing`]).

use core::arch::x86_64::{__cpuid_count, CpuidResult};
use core::fmt;

use lamina_abi::cpuid::{LEAF_SIGNATURE, LEAF_TIMING, LEAF_VERSION, features, signature_regs};

/// Executes CPUID with EAX = `leaf`, ECX = `subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    __cpuid_count(leaf, subleaf)
}

/// The CPU vendor string of leaf 0 (EBX, EDX, ECX), e.g. `*b"GenuineIntel"`.
pub fn vendor() -> [u8; 12] {
    let leaf0 = cpuid(0, 0);
    let mut vendor = [0; 12];
    vendor[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    vendor[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    vendor
}

/// CPUID.1:ECX bit 31, "hypervisor present".
pub fn hypervisor_bit() -> bool {
    cpuid(1, 0).ecx & (1 << 31) != 0
}

/// What the Lamina CPUID leaves say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaminaLeaves {
    /// Highest Lamina leaf (EAX of `0x4000_0000`).
    pub max_leaf: u32,
    /// ABI version, `major << 16 | minor` (EAX of `0x4000_0001`).
    pub version: u32,
    /// Feature bits (EBX of `0x4000_0001`).
    pub features: Features,
}

/// Reads the Lamina leaves, or `None` when we do not run on Lamina (no hypervisor bit, another
/// signature, or no version leaf).
pub fn lamina_leaves() -> Option<LaminaLeaves> {
    if !hypervisor_bit() {
        return None;
    }
    let signature = cpuid(LEAF_SIGNATURE, 0);
    if [signature.ebx, signature.ecx, signature.edx] != signature_regs()
        || signature.eax < LEAF_VERSION
    {
        return None;
    }
    let version = cpuid(LEAF_VERSION, 0);
    Some(LaminaLeaves {
        max_leaf: signature.eax,
        version: version.eax,
        features: Features(version.ebx),
    })
}

/// Whether we run on Lamina.
pub fn lamina_present() -> bool {
    lamina_leaves().is_some()
}

/// The ABI version from CPUID, `major << 16 | minor`, if we run on Lamina.
pub fn lamina_version() -> Option<u32> {
    lamina_leaves().map(|leaves| leaves.version)
}

/// What the timing leaf `0x4000_0010` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// TSC frequency in kHz (EAX).
    pub tsc_khz: u32,
    /// Emulated local APIC timer frequency in kHz, before the divider (EBX).
    pub apic_timer_khz: u32,
}

/// Reads the timing leaf, if we run on Lamina and it is there.
pub fn timing() -> Option<Timing> {
    let leaves = lamina_leaves()?;
    if leaves.max_leaf < LEAF_TIMING {
        return None;
    }
    let timing = cpuid(LEAF_TIMING, 0);
    Some(Timing {
        tsc_khz: timing.eax,
        apic_timer_khz: timing.ebx,
    })
}

/// Feature bits of leaf `0x4000_0001` EBX. `Display` names them, e.g.
/// `any-hypercall-insn console-io`, and shows unknown bits in hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features(pub u32);

impl Features {
    /// Every defined bit with its name, in bit order.
    pub const NAMES: [(u32, &'static str); 16] = [
        (features::ANY_HYPERCALL_INSN, "any-hypercall-insn"),
        (features::CONSOLE_IO, "console-io"),
        (features::SCHED_OP, "sched-op"),
        (features::EMULATED_UART, "emulated-uart"),
        (features::EVENT_CHANNELS, "event-channels"),
        (features::PVCLOCK, "pvclock"),
        (features::PV_TIMERS, "pv-timers"),
        (features::MULTICALL, "multicall"),
        (features::MEMORY_OP, "memory-op"),
        (features::CONSOLE_RING, "console-ring"),
        (features::EMULATED_X2APIC, "emulated-x2apic"),
        (features::EXIT_STATS, "exit-stats"),
        (features::INTERDOMAIN_EVENTS, "interdomain-events"),
        (features::GRANT_TABLES, "grant-tables"),
        (features::DOMAIN_CONTROL, "domain-control"),
        (features::PV_SMP, "pv-smp"),
    ];

    /// Whether every bit of `bits` is set.
    pub const fn contains(self, bits: u32) -> bool {
        self.0 & bits == bits
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut known = 0;
        let mut separator = "";
        for (bit, name) in Self::NAMES {
            known |= bit;
            if self.0 & bit != 0 {
                write!(f, "{separator}{name}")?;
                separator = " ";
            }
        }
        match self.0 & !known {
            0 if separator.is_empty() => f.write_str("none"),
            0 => Ok(()),
            unknown => write!(f, "{separator}unknown={unknown:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_name_their_bits() {
        assert_eq!(Features(0).to_string(), "none");
        assert_eq!(
            Features(features::ALL).to_string(),
            "any-hypercall-insn console-io sched-op emulated-uart event-channels pvclock \
             pv-timers multicall memory-op console-ring emulated-x2apic exit-stats \
             interdomain-events grant-tables domain-control pv-smp"
        );
        assert_eq!(
            Features(features::CONSOLE_IO | 1 << 20).to_string(),
            "console-io unknown=0x100000"
        );
        assert_eq!(Features(1 << 31).to_string(), "unknown=0x80000000");
        assert!(Features(features::ALL).contains(features::SCHED_OP));
    }

    #[test]
    fn names_cover_all_features() {
        let named = Features::NAMES.iter().fold(0, |bits, (bit, _)| bits | bit);
        assert_eq!(named, features::ALL);
    }
}

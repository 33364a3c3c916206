//! The CPU group: CPUID and MSR reads.

pub use core::arch::x86_64::CpuidResult;

use lamina_abi::cpuid::{LEAF_SIGNATURE, LEAF_TIMING, LEAF_VERSION, features};

use crate::msr::IA32_APIC_BASE;
use crate::sync::WriteOnce;
use crate::x2apic;

/// CPUID and MSR access.
pub trait CpuOps: Sync {
    /// The backend's name, for logs.
    fn name(&self) -> &'static str;
    /// CPUID with EAX = `leaf`, ECX = `subleaf`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult;
    /// Reads MSR `msr`.
    ///
    /// # Safety
    /// As for [`crate::msr::rdmsr`].
    unsafe fn read_msr(&self, msr: u32) -> u64;
    /// Writes MSR `msr` (always the instruction: no backend caches a write).
    ///
    /// # Safety
    /// As for [`crate::msr::wrmsr`].
    unsafe fn write_msr(&self, msr: u32, value: u64) {
        // SAFETY: forwarded to the caller.
        unsafe { crate::msr::wrmsr(msr, value) }
    }
}

/// Native: the instruction every time, one exit each.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrappingCpu;

impl CpuOps for TrappingCpu {
    fn name(&self) -> &'static str {
        "trapping"
    }

    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        crate::cpuid::cpuid(leaf, subleaf)
    }

    unsafe fn read_msr(&self, msr: u32) -> u64 {
        // SAFETY: forwarded to the caller.
        unsafe { crate::msr::rdmsr(msr) }
    }
}

/// The CPUID leaves whose values docs/abi.md section 5 fixes for a vCPU's life, so they may
/// be cached: the vendor and basic features (leaf 0x1 ECX bit 27, OSXSAVE, follows CR4 on
/// hardware: a kernel that sets CR4.OSXSAVE after selecting reads leaf 0x1 through the
/// trapping backend), the highest extended leaf, and Lamina's leaves.
pub const CACHED_LEAVES: [u32; 6] = [0, 1, 0x8000_0000, LEAF_SIGNATURE, LEAF_VERSION, LEAF_TIMING];

/// The MSRs the ABI fixes (docs/abi.md 14): IA32_APIC_BASE, the x2APIC ID, version and
/// logical destination. Cached only when the x2APIC is emulated.
pub const CACHED_MSRS: [u32; 4] = [IA32_APIC_BASE, x2apic::ID, x2apic::VERSION, x2apic::LDR];

struct CpuCache {
    leaves: [CpuidResult; CACHED_LEAVES.len()],
    msrs: Option<[u64; CACHED_MSRS.len()]>,
}

static CACHE: WriteOnce<CpuCache> = WriteOnce::new();

/// Reads the cached leaves and MSRs once (the trapping instructions, at boot).
pub(super) fn fill_cache() {
    if CACHE.get().is_some() {
        return;
    }
    let leaves = CACHED_LEAVES.map(|leaf| crate::cpuid::cpuid(leaf, 0));
    let lamina = crate::cpuid::lamina_leaves();
    let emulated_x2apic = lamina
        .is_some_and(|leaves| leaves.features.contains(features::EMULATED_X2APIC))
        && x2apic::available();
    let msrs = emulated_x2apic.then(|| {
        // SAFETY: the hypervisor says it emulates the x2APIC, whose MSRs these are; reading
        // them has no side effect.
        CACHED_MSRS.map(|msr| unsafe { crate::msr::rdmsr(msr) })
    });
    let _ = CACHE.set(CpuCache { leaves, msrs });
}

/// Paravirtual: the values the ABI fixes, cached at boot ([`CACHED_LEAVES`], [`CACHED_MSRS`]),
/// with no exit; anything else through the instruction.
#[derive(Clone, Copy, Debug, Default)]
pub struct CachedCpu;

impl CpuOps for CachedCpu {
    fn name(&self) -> &'static str {
        "cached"
    }

    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        // None of the cached leaves has subleaves.
        let cached = CACHE.get().and_then(|cache| {
            let index = CACHED_LEAVES.iter().position(|&cached| cached == leaf)?;
            Some(cache.leaves[index])
        });
        cached.unwrap_or_else(|| crate::cpuid::cpuid(leaf, subleaf))
    }

    unsafe fn read_msr(&self, msr: u32) -> u64 {
        let cached = CACHE.get().and_then(|cache| {
            let index = CACHED_MSRS.iter().position(|&cached| cached == msr)?;
            cache.msrs.map(|msrs| msrs[index])
        });
        // SAFETY: forwarded to the caller.
        cached.unwrap_or_else(|| unsafe { crate::msr::rdmsr(msr) })
    }
}

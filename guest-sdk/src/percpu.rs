//! Which vCPU the code runs on, for kernels with several vCPUs (docs/abi.md 19).
//!
//! Until a kernel calls [`init_this_vcpu`], the SDK assumes it runs on vCPU 0 only, as a
//! one-vCPU kernel does, and [`current`] costs nothing. A kernel that starts siblings calls
//! [`init_this_vcpu`] on every vCPU, on vCPU 0 before it starts the first sibling and on each
//! sibling before it uses the SDK (events, idle, the smp group): it points IA32_GS_BASE at a
//! per-vCPU record holding the vCPU number (one `WRMSR` exit per vCPU, once), which [`current`]
//! then reads with a `gs:` load and no exit, as Linux's `this_cpu_read` and Xen's per-CPU
//! area do. The SDK's event dispatcher, upcall mask and upcall vector then act on the calling
//! vCPU's `VcpuInfo` instead of vCPU 0's.
//!
//! The kernel must leave IA32_GS_BASE alone afterwards (it never runs SWAPGS at CPL 0 only).

use core::sync::atomic::{AtomicBool, Ordering};

use lamina_abi::shared_info::MAX_VCPUS;

/// IA32_GS_BASE (SDM Vol. 4, table 2-2).
const IA32_GS_BASE: u32 = 0xc000_0101;

/// What GS points at on each vCPU: its number first.
#[repr(C, align(64))]
struct Record {
    vcpu: u64,
}

static RECORDS: [Record; MAX_VCPUS] = {
    let mut records = [const { Record { vcpu: 0 } }; MAX_VCPUS];
    let mut index = 0;
    while index < MAX_VCPUS {
        records[index].vcpu = index as u64;
        index += 1;
    }
    records
};

/// Set once vCPU 0 called [`init_this_vcpu`]: from then on [`current`] reads GS.
static IN_USE: AtomicBool = AtomicBool::new(false);

/// Why [`init_this_vcpu`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotThisVcpu {
    /// What the caller said.
    pub claimed: u32,
    /// What CPUID says (docs/abi.md 19: the initial APIC id is the vCPU number).
    pub actual: u32,
}

impl core::fmt::Display for NotThisVcpu {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "init_this_vcpu({}) called on vCPU {}",
            self.claimed, self.actual
        )
    }
}

/// Records that the caller runs on vCPU `vcpu` (checked against CPUID, one exit) and makes
/// [`current`] answer from GS on this vCPU. See the module documentation for when to call it.
pub fn init_this_vcpu(vcpu: u32) -> Result<(), NotThisVcpu> {
    let actual = crate::vcpu::this_vcpu();
    if actual != vcpu || vcpu as usize >= MAX_VCPUS {
        return Err(NotThisVcpu {
            claimed: vcpu,
            actual,
        });
    }
    let record = &raw const RECORDS[vcpu as usize] as u64;
    // SAFETY: IA32_GS_BASE exists in long mode (docs/abi.md 7.3); the SDK is the only user of
    // GS (module documentation), and the record is 'static.
    unsafe { crate::msr::wrmsr(IA32_GS_BASE, record) };
    IN_USE.store(true, Ordering::Release);
    // After IN_USE: from here on `this_vcpu` asks `current`, on every vCPU.
    crate::shared::forget_this_vcpu();
    Ok(())
}

/// The vCPU the caller runs on: 0 before [`init_this_vcpu`], the number it recorded after.
/// Inlined: the SDK's hot paths (the pvclock read, the upcall mask) ask it on every call.
#[inline(always)]
pub fn current() -> u32 {
    if !IN_USE.load(Ordering::Acquire) {
        return 0;
    }
    let vcpu: u64;
    // SAFETY: `init_this_vcpu` pointed GS at this vCPU's record, whose first word is the
    // number; the load has no other effect.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) vcpu, options(nostack, readonly, preserves_flags))
    };
    vcpu as u32
}

/// Whether [`init_this_vcpu`] has been called (on vCPU 0 at least).
#[inline]
pub fn in_use() -> bool {
    IN_USE.load(Ordering::Acquire)
}

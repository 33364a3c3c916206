//! Intel VT-x: VMX with EPT and VPID (Intel SDM Vol. 3C, chapters 24-29).
//!
//! Enabling follows SDM 24.7 ("Enabling and Entering VMX Operation"): IA32_FEATURE_CONTROL,
//! the CR0/CR4 fixed bits, a VMXON region with the revision identifier, on the CPU that calls
//! `enable` (each CPU calls it once, with its own VMXON region). A VMCS's host state (TR,
//! GS base, GDTR) is the CPU's that created it: to run its vCPU on another CPU it must be
//! VMCLEARed on the old one, loaded on the new one and those fields rewritten (SDM 25.11.1). Each vCPU has its own
//! VMCS, EPT and VPID. Controls are adjusted against the capability MSRs (SDM Appendix A), so
//! a required control the CPU cannot provide is reported instead of failing VM entry.

mod entry_checks;
mod ept;
mod vcpu;
mod vmcs;

use crate::common::memory::guest_memory::GuestMemory;
use crate::hw::nested_paging::NestedPageTable;
use crate::hw::{DomainVcpus, EntryState, HwError, Virtualization, rdmsr, wrmsr};
use crate::platform::memory;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::arch::asm;
use lamina_abi::layout::{GRANT_WINDOW_BYTES, GRANT_WINDOW_GPA};
pub use vcpu::VmxVcpu;
use x86_64::registers::control::Cr4Flags;

const MSR_FEATURE_CONTROL: u32 = 0x3a;
const MSR_VMX_BASIC: u32 = 0x480;
const MSR_VMX_PINBASED: u32 = 0x481;
const MSR_VMX_PROCBASED: u32 = 0x482;
const MSR_VMX_EXIT: u32 = 0x483;
const MSR_VMX_ENTRY: u32 = 0x484;
const MSR_VMX_MISC: u32 = 0x485;
const MSR_VMX_CR0_FIXED0: u32 = 0x486;
const MSR_VMX_CR0_FIXED1: u32 = 0x487;
const MSR_VMX_CR4_FIXED0: u32 = 0x488;
const MSR_VMX_CR4_FIXED1: u32 = 0x489;
const MSR_VMX_PROCBASED2: u32 = 0x48b;
const MSR_VMX_EPT_VPID_CAP: u32 = 0x48c;
const MSR_VMX_TRUE_PINBASED: u32 = 0x48d;
const MSR_VMX_TRUE_PROCBASED: u32 = 0x48e;
const MSR_VMX_TRUE_EXIT: u32 = 0x48f;
const MSR_VMX_TRUE_ENTRY: u32 = 0x490;

const FEATURE_CONTROL_LOCKED: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
// IA32_VMX_EPT_VPID_CAP bits (SDM Vol. 3D A.10).
const EPT_CAP_INVEPT: u64 = 1 << 20;
const EPT_CAP_INVEPT_SINGLE_CONTEXT: u64 = 1 << 25;
const EPT_CAP_INVEPT_ALL_CONTEXT: u64 = 1 << 26;
/// IA32_VMX_EPT_VPID_CAP: INVVPID, and its individual-address type (SDM Vol. 3C A.10).
const VPID_CAP_INVVPID: u64 = 1 << 32;
const VPID_CAP_INVVPID_ADDRESS: u64 = 1 << 40;
/// Secondary controls "enable EPT" and "enable VPID": either makes IA32_VMX_EPT_VPID_CAP exist.
const SECONDARY_EPT_OR_VPID: u64 = (1 << 1) | (1 << 5);

/// INVEPT types (SDM Vol. 3C 31.3, INVEPT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
enum InveptType {
    /// Translations derived from one EPTP.
    SingleContext = 1,
    /// Translations derived from every EPTP.
    AllContext = 2,
}

/// The controls this CPU accepts, read once from the capability MSRs.
#[derive(Clone, Copy)]
struct ControlCapabilities {
    revision: u32,
    pin: u64,
    primary: u64,
    secondary: u64,
    exit: u64,
    entry: u64,
    cr0_fixed: (u64, u64),
    cr4_fixed: (u64, u64),
    /// IA32_VMX_MISC bits 4:0: the preemption timer ticks once per 2^this TSC ticks.
    preemption_timer_shift: u8,
    /// How stale EPT translations are dropped: single-context when supported.
    invept: InveptType,
    /// INVVPID of one linear address is supported: a guest page is flushed alone.
    invvpid_address: bool,
    /// INS/OUTS exits report address size and segment (IA32_VMX_BASIC bit 54).
    string_io_info: bool,
}

/// Applies a capability MSR (allowed-0 settings low, allowed-1 high) to `wanted`; `Err` when a
/// wanted bit cannot be set.
fn adjust(capability: u64, wanted: u32, what: &'static str) -> Result<u32, HwError> {
    let must_be_one = capability as u32;
    let may_be_one = (capability >> 32) as u32;
    if wanted & !may_be_one != 0 {
        return Err(HwError::Missing(what));
    }
    Ok((wanted | must_be_one) & may_be_one)
}

/// VMX operation on this CPU.
pub struct Vmx {
    caps: ControlCapabilities,
}

impl Virtualization for Vmx {
    type Vcpu = VmxVcpu;
    const NAME: &'static str = "Intel VT-x (VMX + EPT + VPID)";

    fn enable() -> Result<Self, HwError> {
        if core::arch::x86_64::__cpuid(1).ecx & (1 << 5) == 0 {
            return Err(HwError::Missing("VMX"));
        }
        // SAFETY: every MSR read here is architectural on a CPU that reports VMX.
        let caps = unsafe {
            let feature_control = rdmsr(MSR_FEATURE_CONTROL);
            if feature_control & FEATURE_CONTROL_LOCKED == 0 {
                wrmsr(
                    MSR_FEATURE_CONTROL,
                    feature_control | FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMX_OUTSIDE_SMX,
                );
            } else if feature_control & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
                return Err(HwError::Disabled(
                    "VMX (IA32_FEATURE_CONTROL locked without it)",
                ));
            }
            let basic = rdmsr(MSR_VMX_BASIC);
            let true_controls = basic & (1 << 55) != 0;
            let pick = |plain, true_msr| {
                if true_controls {
                    rdmsr(true_msr)
                } else {
                    rdmsr(plain)
                }
            };
            let primary = pick(MSR_VMX_PROCBASED, MSR_VMX_TRUE_PROCBASED);
            let secondary = if primary >> 32 & (1 << 31) != 0 {
                rdmsr(MSR_VMX_PROCBASED2)
            } else {
                0
            };
            let ept_vpid = if (secondary >> 32) & SECONDARY_EPT_OR_VPID != 0 {
                rdmsr(MSR_VMX_EPT_VPID_CAP)
            } else {
                0
            };
            let invept = if ept_vpid & EPT_CAP_INVEPT == 0 {
                return Err(HwError::Missing("INVEPT"));
            } else if ept_vpid & EPT_CAP_INVEPT_SINGLE_CONTEXT != 0 {
                InveptType::SingleContext
            } else if ept_vpid & EPT_CAP_INVEPT_ALL_CONTEXT != 0 {
                InveptType::AllContext
            } else {
                return Err(HwError::Missing("INVEPT single- or all-context"));
            };
            ControlCapabilities {
                revision: basic as u32 & 0x7fff_ffff,
                pin: pick(MSR_VMX_PINBASED, MSR_VMX_TRUE_PINBASED),
                primary,
                secondary,
                exit: pick(MSR_VMX_EXIT, MSR_VMX_TRUE_EXIT),
                entry: pick(MSR_VMX_ENTRY, MSR_VMX_TRUE_ENTRY),
                cr0_fixed: (rdmsr(MSR_VMX_CR0_FIXED0), rdmsr(MSR_VMX_CR0_FIXED1)),
                cr4_fixed: (rdmsr(MSR_VMX_CR4_FIXED0), rdmsr(MSR_VMX_CR4_FIXED1)),
                preemption_timer_shift: (rdmsr(MSR_VMX_MISC) & 0x1f) as u8,
                invept,
                invvpid_address: ept_vpid & VPID_CAP_INVVPID != 0
                    && ept_vpid & VPID_CAP_INVVPID_ADDRESS != 0,
                string_io_info: basic & (1 << 54) != 0,
            }
        };
        let vmxon_region = memory::allocate_zeroed(0x1000, 0x1000).ok_or(HwError::OutOfMemory)?;
        // SAFETY: the region is a fresh page; CR0/CR4 get only the bits VMX operation requires
        // (SDM 24.8), which the hypervisor's own code does not depend on.
        unsafe {
            (vmxon_region as *mut u32).write(caps.revision);
            let cr0 = x86_64::registers::control::Cr0::read_raw();
            x86_64::registers::control::Cr0::write_raw((cr0 | caps.cr0_fixed.0) & caps.cr0_fixed.1);
            let cr4 = x86_64::registers::control::Cr4::read_raw();
            x86_64::registers::control::Cr4::write_raw(
                (cr4 | Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS.bits() | caps.cr4_fixed.0)
                    & caps.cr4_fixed.1,
            );
            let failed: u8;
            asm!("vmxon [{}]", "setna {}", in(reg) &vmxon_region, out(reg_byte) failed);
            if failed != 0 {
                return Err(HwError::VmxInstruction("VMXON", 0));
            }
        }
        log::info!(
            "VMX on: VMCS revision {:#x}, INVEPT {:?}, INVVPID of an address {}",
            caps.revision,
            caps.invept,
            caps.invvpid_address
        );
        Ok(Vmx { caps })
    }

    fn create_vcpus(
        &mut self,
        memory: &GuestMemory,
        entries: &[EntryState],
    ) -> Result<DomainVcpus<VmxVcpu>, HwError> {
        let mut ept = NestedPageTable::<ept::Ept>::new()?;
        ept.map_large(0, memory.host_base(), memory.size())?;
        ept.prepare_small_pages(GRANT_WINDOW_GPA, GRANT_WINDOW_BYTES)?;
        let vcpus = entries
            .iter()
            .map(|entry| VmxVcpu::new(ept.root(), &self.caps, entry))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((vcpus, Box::new(ept)))
    }
}

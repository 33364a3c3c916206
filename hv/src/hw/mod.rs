//! The two hardware backends and what they share.
//!
//! `vmx` (Intel VT-x: VMX, EPT, VPID) and `svm` (AMD-V: SVM, NPT, ASID) mirror each other file
//! for file; one is chosen at run time from CPUID, so a single image runs on both. Each fills
//! the [`Virtualization`] trait; nothing outside this folder knows which vendor is underneath.

pub mod nested_paging;
pub mod svm;
pub mod vmx;

use crate::common::memory::guest_memory::GuestMemory;
use crate::common::memory::nested_map::NestedMap;
use crate::common::vcpu::VirtualCpu;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::model_specific::EferFlags;

/// CR0 a guest starts with (docs/abi.md 4.1): paging with write protection, protected mode,
/// native x87 errors.
pub const GUEST_BOOT_CR0: Cr0Flags = Cr0Flags::PAGING
    .union(Cr0Flags::WRITE_PROTECT)
    .union(Cr0Flags::NUMERIC_ERROR)
    .union(Cr0Flags::EXTENSION_TYPE)
    .union(Cr0Flags::MONITOR_COPROCESSOR)
    .union(Cr0Flags::PROTECTED_MODE_ENABLE);
/// CR4 a guest starts with: PAE (long mode needs it), SSE enabled with its exceptions.
pub const GUEST_BOOT_CR4: Cr4Flags = Cr4Flags::PHYSICAL_ADDRESS_EXTENSION
    .union(Cr4Flags::OSFXSR)
    .union(Cr4Flags::OSXMMEXCPT_ENABLE);
/// EFER a guest starts with: long mode enabled and active.
pub const GUEST_BOOT_EFER: EferFlags =
    EferFlags::LONG_MODE_ENABLE.union(EferFlags::LONG_MODE_ACTIVE);
/// RFLAGS a guest starts with: only bit 1, reserved and always 1 (SDM Vol. 1 3.4.3), which
/// `x86_64::registers::rflags::RFlags` does not name.
pub const GUEST_BOOT_RFLAGS: u64 = 1 << 1;
const _: () = assert!(GUEST_BOOT_CR0.bits() == 0x8001_0033);
const _: () = assert!(GUEST_BOOT_CR4.bits() == 0x0620);
const _: () = assert!(GUEST_BOOT_EFER.bits() == 0x0500);

/// The CPU's virtualization extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// Intel VT-x.
    Intel,
    /// AMD-V.
    Amd,
}

/// Why the hardware could not be used.
#[derive(Debug)]
pub enum HwError {
    /// The CPU lacks a feature Lamina needs.
    Missing(&'static str),
    /// Firmware disabled or locked the extension.
    Disabled(&'static str),
    /// A VMX instruction failed; the VM-instruction error number, if any.
    VmxInstruction(&'static str, u64),
    /// No physical memory for control structures or page tables.
    OutOfMemory,
    /// Nested page tables asked for an impossible layout (a hypervisor bug).
    Layout(&'static str),
}

impl fmt::Display for HwError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HwError::Missing(what) => write!(f, "the CPU has no {what}"),
            HwError::Disabled(what) => write!(f, "{what} is disabled by firmware"),
            HwError::VmxInstruction(what, error) => {
                write!(f, "{what} failed (VM-instruction error {error})")
            }
            HwError::OutOfMemory => write!(f, "out of memory for virtualization structures"),
            HwError::Layout(what) => write!(f, "nested paging layout: {what}"),
        }
    }
}

/// The architectural state a vCPU starts in (docs/abi.md, "Start of day").
#[derive(Clone, Copy, Debug)]
pub struct EntryState {
    /// First instruction.
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// First argument register: the start-info address.
    pub rdi: u64,
    /// Root of the guest's boot page tables.
    pub cr3: u64,
    /// Boot GDT base and limit.
    pub gdt: (u64, u16),
    /// TLB tag of the vCPU (VPID or ASID), never 0.
    pub tlb_tag: u16,
}

/// A domain's vCPUs, by number, and the nested page table they all run on.
pub type DomainVcpus<V> = (Vec<V>, Box<dyn NestedMap>);

/// A virtualization extension, enabled on the current CPU.
pub trait Virtualization: Sized + 'static {
    /// The backend's vCPU.
    type Vcpu: VirtualCpu + 'static;
    /// Human-readable name ("Intel VT-x", "AMD-V").
    const NAME: &'static str;

    /// Checks the CPU's features and turns the extension on for this CPU.
    fn enable() -> Result<Self, HwError>;

    /// Builds the vCPUs of a domain with RAM `memory`, one per entry state (each with its own
    /// TLB tag), all mapped through one nested page table, which is returned alongside for
    /// the domain to own (the grant window is prepared for 4 KiB pages, with nothing mapped).
    /// No vCPU may run once that table is dropped.
    fn create_vcpus(
        &mut self,
        memory: &GuestMemory,
        entries: &[EntryState],
    ) -> Result<DomainVcpus<Self::Vcpu>, HwError>;
}

/// Detects the vendor's virtualization extension from CPUID.
pub fn detect_vendor() -> Option<Vendor> {
    let leaf0 = core::arch::x86_64::__cpuid(0);
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &vendor {
        b"GenuineIntel" => Some(Vendor::Intel),
        b"AuthenticAMD" => Some(Vendor::Amd),
        _ => {
            // Emulators may report another vendor string; go by the feature bits instead.
            let vmx = core::arch::x86_64::__cpuid(1).ecx & (1 << 5) != 0;
            let svm = core::arch::x86_64::__cpuid(0x8000_0001).ecx & (1 << 2) != 0;
            match (vmx, svm) {
                (true, _) => Some(Vendor::Intel),
                (_, true) => Some(Vendor::Amd),
                _ => None,
            }
        }
    }
}

/// Reads an MSR.
///
/// # Safety
/// `msr` must exist on this CPU (otherwise #GP in the hypervisor).
pub unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: the caller guarantees the MSR exists.
    unsafe { x86_64::registers::model_specific::Msr::new(msr).read() }
}

/// Writes an MSR.
///
/// # Safety
/// `msr` must exist and `value` must be valid for it; the write must not break the hypervisor.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the MSR and value are valid.
    unsafe { x86_64::registers::model_specific::Msr::new(msr).write(value) }
}

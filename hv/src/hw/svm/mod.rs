//! AMD-V: SVM with nested paging (NPT) and ASIDs (AMD APM Vol. 2, chapter 15).
//!
//! Enabling sets EFER.SVME and the host save area (15.4, 15.30.4), on the CPU that calls
//! `enable`: each CPU calls it once and keeps its own `Svm`. Each vCPU gets a VMCB,
//! an I/O and an MSR permission map that intercept everything, and its own ASID. Under QEMU
//! TCG there is no NRIP-save, so the next RIP is computed from the exit kind.

mod npt;
mod vcpu;
mod vmcb;
mod vmrun_checks;

use crate::common::memory::guest_memory::GuestMemory;
use crate::hw::nested_paging::NestedPageTable;
use crate::hw::{DomainVcpus, EntryState, HwError, Virtualization, rdmsr, wrmsr};
use crate::platform::memory;
use alloc::boxed::Box;
use alloc::vec::Vec;
use lamina_abi::layout::{GRANT_WINDOW_BYTES, GRANT_WINDOW_GPA};
pub use vcpu::SvmVcpu;
use x86_64::registers::model_specific::{Efer, EferFlags};

const MSR_VM_CR: u32 = 0xc001_0114;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const VM_CR_SVMDIS: u64 = 1 << 4;
/// CPUID 0x8000_000a EDX: TLB_CONTROL can flush one ASID (APM Vol. 2 15.16.1).
const FEATURE_FLUSH_BY_ASID: u32 = 1 << 6;
/// CPUID 8000_000A EDX bit 3: NRIP-save (APM Vol. 2 15.7.1).
const FEATURE_NRIP_SAVE: u32 = 1 << 3;

/// SVM enabled on this CPU.
pub struct Svm {
    /// Page where VMSAVE keeps the host's FS/GS/TR/LDTR and syscall MSRs while a guest runs.
    /// This CPU's: its GS base is this CPU's `PerCpu` and its TR this CPU's TSS, so a vCPU
    /// created from this `Svm` (which VMLOADs the page after every exit) must enter on this
    /// CPU, or be given the page of the CPU it enters on.
    host_state_vmcb: u64,
    /// Permission maps shared by all vCPUs: every port and every MSR is intercepted.
    io_permission_map: u64,
    msr_permission_map: u64,
    asids: u32,
    /// TLB_CONTROL 3 (flush this guest's entries) exists; otherwise only 1 (flush all).
    flush_by_asid: bool,
    /// No NRIP-save (QEMU TCG, AMD CPUs before 2010): interrupts for a guest at CPL 0 are
    /// injected as software interrupts ([`vcpu::SvmVcpu`]'s `inject_interrupt` says why).
    soft_interrupts_at_cpl0: bool,
}

impl Virtualization for Svm {
    type Vcpu = SvmVcpu;
    const NAME: &'static str = "AMD-V (SVM + NPT)";

    fn enable() -> Result<Self, HwError> {
        use core::arch::x86_64::__cpuid;
        if __cpuid(0x8000_0001).ecx & (1 << 2) == 0 {
            return Err(HwError::Missing("SVM"));
        }
        let svm_features = __cpuid(0x8000_000a);
        if svm_features.edx & 1 == 0 {
            return Err(HwError::Missing("nested paging (NPT)"));
        }
        // SAFETY: VM_CR exists on every CPU with SVM (APM Vol. 2 15.30.1).
        if unsafe { rdmsr(MSR_VM_CR) } & VM_CR_SVMDIS != 0 {
            return Err(HwError::Disabled("SVM"));
        }
        let host_save_area = memory::allocate_zeroed(0x1000, 0x1000).ok_or(HwError::OutOfMemory)?;
        let host_state_vmcb =
            memory::allocate_zeroed(0x1000, 0x1000).ok_or(HwError::OutOfMemory)?;
        let io_permission_map =
            memory::allocate_zeroed(0x3000, 0x1000).ok_or(HwError::OutOfMemory)?;
        let msr_permission_map =
            memory::allocate_zeroed(0x2000, 0x1000).ok_or(HwError::OutOfMemory)?;
        // SAFETY: both maps were just allocated with these sizes and are ours alone.
        unsafe {
            core::ptr::write_bytes(io_permission_map as *mut u8, 0xff, 0x3000);
            core::ptr::write_bytes(msr_permission_map as *mut u8, 0xff, 0x2000);
        }
        // SAFETY: SVM is present and not disabled; the host save area is a fresh page.
        unsafe {
            Efer::update(|efer| efer.insert(EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE));
            wrmsr(MSR_VM_HSAVE_PA, host_save_area);
            // The world switch VMLOADs this page after every exit: it must hold the host's
            // own FS, GS, TR, LDTR and syscall MSRs.
            core::arch::asm!("vmsave rax", in("rax") host_state_vmcb);
        }
        // A vCPU arriving on this CPU switches to this page (`SvmVcpu::activate`).
        crate::platform::percpu::this_cpu()
            .svm_host_state
            .store(host_state_vmcb, core::sync::atomic::Ordering::Relaxed);
        let flush_by_asid = svm_features.edx & FEATURE_FLUSH_BY_ASID != 0;
        let nrip_save = svm_features.edx & FEATURE_NRIP_SAVE != 0;
        log::info!(
            "SVM on: {} ASIDs, NRIP-save {}, flush by ASID {}{}",
            svm_features.ebx,
            nrip_save,
            flush_by_asid,
            if nrip_save {
                ""
            } else {
                "; interrupts into CPL 0 injected as software interrupts"
            }
        );
        Ok(Svm {
            host_state_vmcb,
            io_permission_map,
            msr_permission_map,
            asids: svm_features.ebx,
            flush_by_asid,
            soft_interrupts_at_cpl0: !nrip_save,
        })
    }

    fn create_vcpus(
        &mut self,
        memory: &GuestMemory,
        entries: &[EntryState],
    ) -> Result<DomainVcpus<SvmVcpu>, HwError> {
        let mut npt = NestedPageTable::<npt::Npt>::new()?;
        npt.map_large(0, memory.host_base(), memory.size())?;
        npt.prepare_small_pages(GRANT_WINDOW_GPA, GRANT_WINDOW_BYTES)?;
        let mut vcpus = Vec::with_capacity(entries.len());
        for entry in entries {
            // ASID 0 is the host's. With more vCPUs than ASIDs, tags are shared and the TLB
            // is flushed whenever the CPU switches between vCPUs (APM Vol. 2 15.16).
            let usable = self.asids.saturating_sub(1).max(1);
            let asid = 1 + (u32::from(entry.tlb_tag).saturating_sub(1)) % usable;
            if u32::from(entry.tlb_tag) > usable {
                vcpu::ASIDS_SHARED.store(true, core::sync::atomic::Ordering::Relaxed);
            }
            vcpus.push(SvmVcpu::new(npt.root(), self, entry, asid)?);
        }
        Ok((vcpus, Box::new(npt)))
    }
}

//! A VMX vCPU: VMCS set-up for a 64-bit guest (Intel SDM Vol. 3C 26.3 lists the checks it
//! must pass), the VMLAUNCH/VMRESUME world switch, and the translation of exit reasons (SDM
//! Vol. 3D Appendix C) into [`VmExit`]. CLTS and MOV from CR3 complete here; control-register
//! writes and CR8 go to the common checks (`common::vcpu::control_regs`), and the guest's view of
//! CR0/CR4 lives in the read shadows.

use super::entry_checks;
use super::ept::eptp;
use super::vmcs::{self, read, write, write_host, write_unchecked};
use super::{ControlCapabilities, InveptType, adjust};
use crate::common::memory::guest_paging::PagingMode;
use crate::common::vcpu::control_regs;
use crate::common::vcpu::string_io;
use crate::common::vcpu::{
    ArchMsr, ArchState, CrOperand, GuestRegisters, VirtualCpu, VmExit, reg, vector,
};
use crate::hw::{
    EntryState, GUEST_BOOT_CR0, GUEST_BOOT_CR4, GUEST_BOOT_EFER, GUEST_BOOT_RFLAGS, HwError, rdmsr,
    wrmsr,
};
use crate::platform::debug_regs::DebugRegisters;
use crate::platform::memory;
use crate::platform::xstate::ExtendedState;
use core::arch::{asm, global_asm};
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::model_specific::EferFlags;
use x86_64::registers::rflags::RFlags;

mod reason {
    pub(super) const EXCEPTION_OR_NMI: u64 = 0;
    pub(super) const EXTERNAL_INTERRUPT: u64 = 1;
    pub(super) const TRIPLE_FAULT: u64 = 2;
    pub(super) const INTERRUPT_WINDOW: u64 = 7;
    pub(super) const PREEMPTION_TIMER: u64 = 52;
    pub(super) const CPUID: u64 = 10;
    pub(super) const HLT: u64 = 12;
    pub(super) const VMCALL: u64 = 18;
    pub(super) const VMCLEAR: u64 = 19;
    pub(super) const VMXON: u64 = 27;
    pub(super) const CR_ACCESS: u64 = 28;
    pub(super) const IO: u64 = 30;
    pub(super) const RDMSR: u64 = 31;
    pub(super) const WRMSR: u64 = 32;
    pub(super) const EPT_VIOLATION: u64 = 48;
    pub(super) const INVEPT: u64 = 50;
    pub(super) const INVVPID: u64 = 53;
    pub(super) const XSETBV: u64 = 55;
    pub(super) const ENTRY_INVALID_GUEST_STATE: u64 = 33;
    pub(super) const ENTRY_MSR_LOADING: u64 = 34;
    pub(super) const ENTRY_MACHINE_CHECK: u64 = 41;
}

// Controls (SDM Vol. 3C 25.6, 25.7, 25.8).
const PIN_EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
/// NMIs exit the guest instead of reaching it (SDM Vol. 3C 25.6.1); the hypervisor takes them.
const PIN_NMI_EXITING: u32 = 1 << 3;
/// Interruption type of an NMI in the exit interruption information (SDM Vol. 3C 25.9.2).
const INTERRUPTION_TYPE_NMI: u64 = 2;
const PIN_PREEMPTION_TIMER: u32 = 1 << 6;
const EXIT_SAVE_PREEMPTION_TIMER: u32 = 1 << 22;
const PRIMARY_INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
const PRIMARY_HLT_EXITING: u32 = 1 << 7;
/// Without a TPR shadow, MOV to/from CR8 would reach the real TPR (SDM Vol. 3C 25.6.2).
const PRIMARY_CR8_EXITING: u32 = (1 << 19) | (1 << 20);
const PRIMARY_UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;
const PRIMARY_ACTIVATE_SECONDARY: u32 = 1 << 31;
const SECONDARY_ENABLE_EPT: u32 = 1 << 1;
const SECONDARY_ENABLE_RDTSCP: u32 = 1 << 3;
const SECONDARY_ENABLE_VPID: u32 = 1 << 5;
/// DR7 and IA32_DEBUGCTL are saved at exit and loaded at entry: the guest's own (docs/abi.md
/// 18.8). Without them a VM exit leaves the guest's DR7 at 0x400 (SDM Vol. 3C 28.5.1).
const EXIT_SAVE_DEBUG_CONTROLS: u32 = 1 << 2;
const ENTRY_LOAD_DEBUG_CONTROLS: u32 = 1 << 2;
const EXIT_HOST_64BIT: u32 = 1 << 9;
const EXIT_SAVE_EFER: u32 = 1 << 20;
const EXIT_LOAD_EFER: u32 = 1 << 21;
const ENTRY_IA32E_GUEST: u32 = 1 << 9;
const ENTRY_LOAD_EFER: u32 = 1 << 15;

/// CR4.VMXE: set in VMX operation, hidden from the guest (its read shadow never shows it).
const CR4_VMXE: u64 = Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS.bits();
const MSR_EFER: u32 = 0xc000_0080;
/// The syscall MSRs VMX does not switch; loaded by hand when another vCPU's VMCS becomes current.
const SWITCHED_MSRS: [(ArchMsr, u32); 5] = [
    (ArchMsr::Star, 0xc000_0081),
    (ArchMsr::Lstar, 0xc000_0082),
    (ArchMsr::Cstar, 0xc000_0083),
    (ArchMsr::Sfmask, 0xc000_0084),
    (ArchMsr::KernelGsBase, 0xc000_0102),
];

/// CR0.CD and CR0.NW: owned by the hypervisor, the guest's values kept in the read shadow.
const CR0_CACHE_BITS: u64 = Cr0Flags::CACHE_DISABLE.bits() | Cr0Flags::NOT_WRITE_THROUGH.bits();

/// The VMCS that is current on this CPU (its physical address).
fn current_vmcs() -> &'static AtomicU64 {
    &crate::platform::percpu::this_cpu().guest_control
}

/// A guest vCPU on VT-x.
pub struct VmxVcpu {
    vmcs: u64,
    regs: GuestRegisters,
    launched: bool,
    cr0_fixed: (u64, u64),
    cr4_fixed: (u64, u64),
    switched_msrs: [u64; SWITCHED_MSRS.len()],
    /// The primary processor-based controls as written (interrupt-window exiting toggles).
    primary_controls: u64,
    /// The VMX-preemption timer counts TSC >> this (IA32_VMX_MISC bits 4:0), when in use.
    preemption_timer_shift: Option<u8>,
    /// The TSC at which the preemption timer must end the guest's run: it counts only in
    /// VMX non-root operation (SDM 26.5.1), so after a long exit what is left is loaded again,
    /// or a slice whose guest spends most of it in long exits would overrun by all that time.
    preemption_deadline_tsc: u64,
    /// The EPT pointer of the domain's nested page table (the domain owns the table).
    eptp: u64,
    invept: InveptType,
    /// INVVPID can drop one guest page (else a guest page flush is an INVEPT).
    invvpid_address: bool,
    /// The VPID the vCPU's translations are tagged with.
    vpid: u16,
    /// x87/SSE/AVX registers and XCR0 (docs/abi.md 18).
    xstate: ExtendedState,
    /// DR0-DR3 and DR6 (docs/abi.md 18.8); DR7 is in the VMCS.
    debug_regs: DebugRegisters,
    /// The CPU reports INS/OUTS address size and segment (IA32_VMX_BASIC bit 54).
    string_io_info: bool,
    /// The guest's CR2 while the vCPU does not run: VMX does not switch CR2, so it is saved
    /// when the vCPU leaves the CPU and loaded when it comes back (no domain sees another's).
    cr2: u64,
    /// The CPU whose host state (TR, GDTR, IDTR, GS base) the VMCS holds: the one the vCPU
    /// ran on last.
    host_cpu: usize,
}

const EVENT_VALID: u64 = 1 << 31;

unsafe extern "C" {
    /// Runs the guest until the next VM exit (returns 0) or a failed VM entry (returns 1).
    fn vmx_world_switch(regs: *mut GuestRegisters, launched: u64) -> u64;
    /// Where the CPU continues after a VM exit (HOST_RIP).
    fn vmx_exit_entry();
}

fn load_vmcs(vmcs: u64) -> Result<(), HwError> {
    let failed: u8;
    // SAFETY: `vmcs` is a VMCS page with the right revision identifier, owned by one vCPU.
    unsafe { asm!("vmptrld [{}]", "setna {}", in(reg) &vmcs, out(reg_byte) failed) };
    if failed != 0 {
        return Err(HwError::VmxInstruction("VMPTRLD", 0));
    }
    current_vmcs().store(vmcs, Ordering::Relaxed);
    Ok(())
}

impl VmxVcpu {
    pub(super) fn new(
        ept_root: u64,
        caps: &ControlCapabilities,
        entry: &EntryState,
    ) -> Result<Self, HwError> {
        let xstate = ExtendedState::new().ok_or(HwError::OutOfMemory)?;
        let vmcs = memory::allocate_zeroed(0x1000, 0x1000).ok_or(HwError::OutOfMemory)?;
        // SAFETY: a fresh page owned by this vCPU; VMCLEAR initialises it (SDM 24.11.3).
        unsafe {
            (vmcs as *mut u32).write(caps.revision);
            let failed: u8;
            asm!("vmclear [{}]", "setna {}", in(reg) &vmcs, out(reg_byte) failed);
            if failed != 0 {
                memory::release(vmcs, 0x1000);
                return Err(HwError::VmxInstruction("VMCLEAR", 0));
            }
        }
        // From here on, dropping the vCPU (on an error too) gives the VMCS back.
        let mut vcpu = VmxVcpu {
            vmcs,
            regs: GuestRegisters::default(),
            launched: false,
            cr0_fixed: caps.cr0_fixed,
            cr4_fixed: caps.cr4_fixed,
            switched_msrs: [0; SWITCHED_MSRS.len()],
            primary_controls: 0,
            preemption_timer_shift: None,
            preemption_deadline_tsc: u64::MAX,
            eptp: eptp(ept_root),
            invept: caps.invept,
            invvpid_address: caps.invvpid_address,
            vpid: entry.tlb_tag,
            xstate,
            debug_regs: DebugRegisters::new(true),
            string_io_info: caps.string_io_info,
            cr2: 0,
            host_cpu: crate::platform::percpu::this_cpu().index,
        };
        load_vmcs(vcpu.vmcs)?;
        vcpu.write_controls(caps, entry)?;
        vcpu.write_host_state()?;
        vcpu.write_guest_state(entry)?;
        vcpu.regs.gpr[reg::RDI] = entry.rdi;
        // SAFETY: writing zeros to the syscall MSRs the hypervisor never uses.
        unsafe { vcpu.load_switched_msrs() };
        Ok(vcpu)
    }

    fn write_controls(
        &mut self,
        caps: &ControlCapabilities,
        entry: &EntryState,
    ) -> Result<(), HwError> {
        // External interrupts exit the guest; the VMX-preemption timer ends a slice even where
        // they do not (Bochs delivers them only while the guest's IF is set, unlike SDM 26.3).
        let mut wanted_pin = PIN_EXTERNAL_INTERRUPT_EXITING | PIN_NMI_EXITING;
        let mut wanted_exit = 0;
        if (caps.pin >> 32) as u32 & PIN_PREEMPTION_TIMER != 0
            && (caps.exit >> 32) as u32 & EXIT_SAVE_PREEMPTION_TIMER != 0
        {
            wanted_pin |= PIN_PREEMPTION_TIMER;
            wanted_exit = EXIT_SAVE_PREEMPTION_TIMER;
            self.preemption_timer_shift = Some(caps.preemption_timer_shift);
        }
        let pin = adjust(caps.pin, wanted_pin, "external-interrupt and NMI exiting")?;
        write(vmcs::PIN_BASED_CONTROLS, pin.into())?;
        let primary = PRIMARY_HLT_EXITING
            | PRIMARY_UNCONDITIONAL_IO_EXITING
            | PRIMARY_CR8_EXITING
            | PRIMARY_ACTIVATE_SECONDARY;
        let primary = adjust(caps.primary, primary, "HLT/I/O/CR8 exiting")?;
        if (caps.primary >> 32) as u32 & PRIMARY_INTERRUPT_WINDOW_EXITING == 0 {
            return Err(HwError::Missing("interrupt-window exiting"));
        }
        self.primary_controls = primary.into();
        write(vmcs::PRIMARY_PROCESSOR_CONTROLS, self.primary_controls)?;
        let mut secondary = SECONDARY_ENABLE_EPT | SECONDARY_ENABLE_VPID;
        if (caps.secondary >> 32) as u32 & SECONDARY_ENABLE_RDTSCP != 0 {
            secondary |= SECONDARY_ENABLE_RDTSCP;
        }
        write(
            vmcs::SECONDARY_PROCESSOR_CONTROLS,
            adjust(caps.secondary, secondary, "EPT and VPID")?.into(),
        )?;
        let exit = EXIT_HOST_64BIT
            | EXIT_SAVE_DEBUG_CONTROLS
            | EXIT_SAVE_EFER
            | EXIT_LOAD_EFER
            | wanted_exit;
        write(
            vmcs::EXIT_CONTROLS,
            adjust(caps.exit, exit, "64-bit host exit controls")?.into(),
        )?;
        let entry_controls = ENTRY_IA32E_GUEST | ENTRY_LOAD_DEBUG_CONTROLS | ENTRY_LOAD_EFER;
        write(
            vmcs::ENTRY_CONTROLS,
            adjust(caps.entry, entry_controls, "IA-32e guest entry")?.into(),
        )?;
        write(vmcs::EXCEPTION_BITMAP, 1 << vector::INVALID_OPCODE)?;
        // SAFETY: the domain's EPT root, which maps only its own RAM and grant window.
        unsafe { write_host(vmcs::EPT_POINTER, self.eptp) }?;
        write(vmcs::VPID, entry.tlb_tag.into())?;
        // SAFETY: all ones: no shadow VMCS (SDM Vol. 3C 26.2.1.1).
        unsafe { write_host(vmcs::VMCS_LINK_POINTER, u64::MAX) }?;
        // Bits VMX fixes in CR0/CR4 are owned by the hypervisor: the guest reads its own view
        // from the shadow and a write that would change them exits (handled in `cr_access`).
        // So are CD and NW: VM entry and VM exit leave them as they are in the physical CR0
        // (SDM Vol. 3C 27.3.2.1, 28.5.1), so a guest's CD would slow the hypervisor and be
        // read by the next guest on this CPU. The guest keeps its own in the shadow.
        let cr0_mask = self.cr0_fixed.0 | !self.cr0_fixed.1 & 0xffff_ffff | CR0_CACHE_BITS;
        // Every CR4 bit is owned: a write exits and is checked against what CPUID offers the
        // guest (LA57, PCIDE, ...), not only against the VMX fixed bits (docs/abi.md 18.3).
        let cr4_mask = u64::MAX;
        write(vmcs::CR0_GUEST_HOST_MASK, cr0_mask)?;
        write(vmcs::CR4_GUEST_HOST_MASK, cr4_mask)?;
        Ok(())
    }

    fn write_host_state(&self) -> Result<(), HwError> {
        use x86_64::instructions::segmentation::{CS, SS, Segment};
        use x86_64::instructions::tables::{sgdt, sidt};
        use x86_64::registers::control::{Cr0, Cr3, Cr4};
        // The host state is this CPU's own, read from it now: a VM exit returns the hypervisor
        // to exactly the state it runs in (SDM Vol. 3C 28.5). HOST_RSP is written by the world
        // switch, the stack it runs on.
        let (cr3_frame, cr3_flags) = Cr3::read_raw();
        // SAFETY: the CPU's current CR0.
        unsafe { write_host(vmcs::HOST_CR0, Cr0::read_raw()) }?;
        let cr3 = cr3_frame.start_address().as_u64() | u64::from(cr3_flags);
        // SAFETY: the CPU's current CR3: the hypervisor's own page tables.
        unsafe { write_host(vmcs::HOST_CR3, cr3) }?;
        // SAFETY: the CPU's current CR4.
        unsafe { write_host(vmcs::HOST_CR4, Cr4::read_raw()) }?;
        let data = SS::get_reg().0;
        // SAFETY: the CPU's current code segment.
        unsafe { write_host(vmcs::HOST_CS_SELECTOR, CS::get_reg().0.into()) }?;
        for field in [
            vmcs::HOST_SS_SELECTOR,
            vmcs::HOST_DS_SELECTOR,
            vmcs::HOST_ES_SELECTOR,
        ] {
            // SAFETY: the CPU's current data segment.
            unsafe { write_host(field, data.into()) }?;
        }
        // SAFETY: null FS and GS selectors; FS base 0, which the hypervisor does not use;
        // GS base this CPU's own per-CPU state (`percpu::this_cpu` reads it after each exit).
        unsafe {
            write_host(vmcs::HOST_FS_SELECTOR, 0)?;
            write_host(vmcs::HOST_GS_SELECTOR, 0)?;
            write_host(vmcs::HOST_FS_BASE, 0)?;
            write_host(vmcs::HOST_GS_BASE, crate::platform::percpu::gs_base())?;
        }
        let (tr_selector, tr_base) = crate::platform::cpu::task_register();
        // SAFETY: this CPU's task register and its TSS.
        unsafe {
            write_host(vmcs::HOST_TR_SELECTOR, tr_selector.into())?;
            write_host(vmcs::HOST_TR_BASE, tr_base)?;
        }
        // SAFETY: the CPU's current GDT and IDT.
        unsafe {
            write_host(vmcs::HOST_GDTR_BASE, sgdt().base.as_u64())?;
            write_host(vmcs::HOST_IDTR_BASE, sidt().base.as_u64())?;
        }
        // SAFETY: SYSENTER is not used by the hypervisor.
        unsafe {
            write_host(vmcs::HOST_SYSENTER_CS, 0)?;
            write_host(vmcs::HOST_SYSENTER_ESP, 0)?;
            write_host(vmcs::HOST_SYSENTER_EIP, 0)?;
        }
        // SAFETY: EFER exists on every 64-bit CPU; its current value is the host's.
        let efer = unsafe { rdmsr(MSR_EFER) };
        // SAFETY: the CPU's current EFER.
        unsafe { write_host(vmcs::HOST_IA32_EFER, efer) }?;
        // SAFETY: the world switch's exit half, which expects exactly this host state.
        unsafe { write_host(vmcs::HOST_RIP, vmx_exit_entry as *const () as u64) }?;
        Ok(())
    }

    fn write_guest_state(&mut self, entry: &EntryState) -> Result<(), HwError> {
        // Data selectors are null (docs/abi.md 4.1), legal at CPL 0 in 64-bit mode (SDM Vol. 3A
        // 5.4.1.1). The hidden state stays a usable flat data segment of DPL 0: SS.DPL is the
        // CPL (SDM 26.3.1.2), and 64-bit mode ignores the rest for DS, ES, FS and GS.
        let (code, null) = (lamina_abi::layout::BOOT_CODE_SELECTOR, 0);
        // ES, CS, SS, DS, FS, GS, LDTR, TR: selector, base, limit, access rights (SDM 24.4.1).
        let segments: [(u16, u32, u32); 8] = [
            (null, 0xffff_ffff, 0xc093),
            (code, 0xffff_ffff, 0xa09b),
            (null, 0xffff_ffff, 0xc093),
            (null, 0xffff_ffff, 0xc093),
            (null, 0xffff_ffff, 0xc093),
            (null, 0xffff_ffff, 0xc093),
            (0, 0, 0x1_0000),  // LDTR unusable
            (0, 0x67, 0x008b), // TR: busy 64-bit TSS
        ];
        for (i, (selector, limit, rights)) in segments.into_iter().enumerate() {
            write(vmcs::GUEST_ES_SELECTOR.of_segment(i), selector.into())?;
            write(vmcs::GUEST_ES_BASE.of_segment(i), 0)?;
            write(vmcs::GUEST_ES_LIMIT.of_segment(i), limit.into())?;
            write(vmcs::GUEST_ES_ACCESS_RIGHTS.of_segment(i), rights.into())?;
        }
        write(vmcs::GUEST_GDTR_BASE, entry.gdt.0)?;
        write(vmcs::GUEST_GDTR_LIMIT, entry.gdt.1.into())?;
        write(vmcs::GUEST_IDTR_BASE, 0)?;
        write(vmcs::GUEST_IDTR_LIMIT, 0)?;
        let cr0 = GUEST_BOOT_CR0.bits();
        write(vmcs::GUEST_CR0, (cr0 | self.cr0_fixed.0) & self.cr0_fixed.1)?;
        write(vmcs::CR0_READ_SHADOW, cr0)?;
        let cr4 = GUEST_BOOT_CR4.bits();
        write(
            vmcs::GUEST_CR4,
            (cr4 | CR4_VMXE | self.cr4_fixed.0) & self.cr4_fixed.1,
        )?;
        write(vmcs::CR4_READ_SHADOW, cr4)?;
        write(vmcs::GUEST_CR3, entry.cr3)?;
        write(vmcs::GUEST_IA32_EFER, GUEST_BOOT_EFER.bits())?;
        write(vmcs::GUEST_DR7, 0x400)?;
        write(vmcs::GUEST_IA32_DEBUGCTL, 0)?;
        write(vmcs::GUEST_RFLAGS, GUEST_BOOT_RFLAGS)?;
        write(vmcs::GUEST_RIP, entry.rip)?;
        write(vmcs::GUEST_RSP, entry.rsp)?;
        write(vmcs::GUEST_INTERRUPTIBILITY, 0)?;
        write(vmcs::GUEST_ACTIVITY_STATE, 0)?;
        write(vmcs::GUEST_PENDING_DEBUG, 0)?;
        write(vmcs::GUEST_SYSENTER_CS, 0)?;
        write(vmcs::GUEST_SYSENTER_ESP, 0)?;
        write(vmcs::GUEST_SYSENTER_EIP, 0)?;
        Ok(())
    }

    /// # Safety
    /// Only the guest's syscall MSRs are written; the hypervisor never uses SYSCALL or SWAPGS.
    unsafe fn load_switched_msrs(&self) {
        for ((_, index), value) in SWITCHED_MSRS.iter().zip(self.switched_msrs) {
            // SAFETY: per the function contract.
            unsafe { wrmsr(*index, value) };
        }
    }

    fn make_current(&mut self) -> Result<(), HwError> {
        if current_vmcs().load(Ordering::Relaxed) != self.vmcs {
            load_vmcs(self.vmcs)?;
            // SAFETY: see `load_switched_msrs`.
            unsafe { self.load_switched_msrs() };
        }
        Ok(())
    }

    /// [`VirtualCpu::activate`] when another VMCS is current on CPU `cpu` or the vCPU ran on
    /// another CPU last.
    #[cold]
    #[inline(never)]
    fn switch_in(&mut self, cpu: usize) {
        if let Err(error) = self.make_current() {
            log::error!("vmx: {error}");
        }
        if self.host_cpu != cpu {
            // Arrived from another CPU (which VMCLEARed it, `release`): this CPU's TR, GDT,
            // IDT and GS base are the host state now (SDM Vol. 3C 25.5.1), and what the VPID
            // and EPTP left here in an earlier stint may be stale.
            if let Err(error) = self.write_host_state() {
                log::error!("vmx: {error}");
            }
            self.host_cpu = cpu;
            self.invalidate_nested_translations();
        }
    }

    /// A CR-access exit (SDM Vol. 3C Table 28-3). CLTS and MOV from CR3 are completed here
    /// (`None`); writes and CR8 reads go to the common checks (docs/abi.md 18.3, 18.4).
    #[inline(never)]
    fn cr_access(&mut self) -> Option<VmExit> {
        let qualification = read(vmcs::EXIT_QUALIFICATION);
        let cr = (qualification & 0xf) as u8;
        let access = (qualification >> 4) & 0x3;
        let gpr = ((qualification >> 8) & 0xf) as u8;
        match (access, cr) {
            (0, _) => Some(VmExit::CrAccess {
                cr,
                write: true,
                operand: CrOperand::Gpr(gpr),
            }),
            (1, 3) => {
                self.set_gpr(gpr.into(), read(vmcs::GUEST_CR3));
                self.skip_instruction();
                None
            }
            (1, _) => Some(VmExit::CrAccess {
                cr,
                write: false,
                operand: CrOperand::Gpr(gpr),
            }),
            (2, _) => {
                // CLTS: TS is not a fixed bit and never invalid to clear.
                write_unchecked(
                    vmcs::GUEST_CR0,
                    read(vmcs::GUEST_CR0) & !Cr0Flags::TASK_SWITCHED.bits(),
                );
                write_unchecked(
                    vmcs::CR0_READ_SHADOW,
                    read(vmcs::CR0_READ_SHADOW) & !Cr0Flags::TASK_SWITCHED.bits(),
                );
                self.skip_instruction();
                None
            }
            _ => {
                // LMSW: the source data is in bits 31:16 of the qualification.
                let source = (qualification >> 16) & 0xffff;
                let value = control_regs::lmsw_value(read(vmcs::CR0_READ_SHADOW), source);
                Some(VmExit::CrAccess {
                    cr: 0,
                    write: true,
                    operand: CrOperand::Value(value),
                })
            }
        }
    }

    /// A VM exit for a failed VM entry (exit reason bit 31, SDM Vol. 3C 26.8), named.
    #[cold]
    #[inline(never)]
    fn entry_failure(&self, exit_reason: u64) -> VmExit {
        let what = match exit_reason & 0xffff {
            reason::ENTRY_INVALID_GUEST_STATE => self.invalid_guest_state(),
            reason::ENTRY_MSR_LOADING => "loading an entry of the VM-entry MSR-load area",
            reason::ENTRY_MACHINE_CHECK => "a machine-check event during VM entry",
            _ => "an unknown VM-entry failure",
        };
        VmExit::EntryFailed(what, exit_reason)
    }

    /// Why VM entry refused the guest state (exit reason 33, SDM Vol. 3C 26.3.1), as far as
    /// the VMCS shows it.
    fn invalid_guest_state(&self) -> &'static str {
        entry_checks::invalid_guest_state_reason(&entry_checks::GuestStateCheck {
            cr0: read(vmcs::GUEST_CR0),
            cr3: read(vmcs::GUEST_CR3),
            cr4: read(vmcs::GUEST_CR4),
            efer: read(vmcs::GUEST_IA32_EFER),
            rflags: read(vmcs::GUEST_RFLAGS),
            cr0_fixed: self.cr0_fixed,
            cr4_fixed: self.cr4_fixed,
            max_phys_bits: max_phys_bits(),
            qualification: read(vmcs::EXIT_QUALIFICATION),
        })
    }

    /// An event whose delivery this exit interrupted is delivered again at the next entry
    /// (SDM Vol. 3C 28.2.4 and 27.2.4).
    fn reinject_interrupted_event(&mut self) {
        let info = read(vmcs::IDT_VECTORING_INFO);
        if info & EVENT_VALID == 0 {
            return;
        }
        write_unchecked(vmcs::ENTRY_INTERRUPTION_INFO, info & !(1 << 12));
        if info & (1 << 11) != 0 {
            write_unchecked(
                vmcs::ENTRY_EXCEPTION_ERROR_CODE,
                read(vmcs::IDT_VECTORING_ERROR_CODE),
            );
        }
        // Software interrupts and exceptions need their instruction length again.
        if matches!((info >> 8) & 7, 4..=6) {
            write_unchecked(
                vmcs::ENTRY_INSTRUCTION_LENGTH,
                read(vmcs::EXIT_INSTRUCTION_LENGTH),
            );
        }
    }

    fn set_gpr(&mut self, gpr: usize, value: u64) {
        if gpr == 4 {
            write_unchecked(vmcs::GUEST_RSP, value);
        } else {
            self.regs.gpr[gpr] = value;
        }
    }
}

/// The guest's MAXPHYADDR from the host's CPUID (the guest sees the same).
fn max_phys_bits() -> u8 {
    if core::arch::x86_64::__cpuid(0x8000_0000).eax >= 0x8000_0008 {
        core::arch::x86_64::__cpuid(0x8000_0008).eax as u8
    } else {
        36
    }
}

impl Drop for VmxVcpu {
    fn drop(&mut self) {
        let failed: u8;
        // SAFETY: `vmcs` is this vCPU's VMCS, which no VMX instruction uses after this. VMCLEAR
        // writes back what the CPU keeps of it and makes it inactive (and no longer current),
        // so that the page can be reused (SDM Vol. 3C 24.11.3).
        unsafe { asm!("vmclear [{}]", "setna {}", in(reg) &self.vmcs, out(reg_byte) failed) };
        let _ = current_vmcs().compare_exchange(self.vmcs, 0, Ordering::Relaxed, Ordering::Relaxed);
        if failed != 0 {
            // The CPU may still write the page: better lost (the summary reports it as leaked)
            // than handed to someone else.
            log::error!(
                "vmx: VMCLEAR of VMCS {:#x} failed; not freeing it",
                self.vmcs
            );
            return;
        }
        memory::release(self.vmcs, 0x1000);
        // The EPT belongs to the domain, which frees it (grants::release_domain).
    }
}

impl VirtualCpu for VmxVcpu {
    fn activate(&mut self) {
        // VMREAD and VMWRITE reach the current VMCS only: every accessor below relies on this.
        // The common case, the vCPU that ran last on this CPU coming back, costs two compares.
        let cpu = crate::platform::percpu::this_cpu();
        if cpu.guest_control.load(Ordering::Relaxed) != self.vmcs || self.host_cpu != cpu.index {
            self.switch_in(cpu.index);
        }
        self.xstate.schedule_in();
        self.debug_regs.restore();
        self.set_cr2(self.cr2);
    }

    fn deactivate(&mut self) {
        self.cr2 = x86_64::registers::control::Cr2::read_raw();
        self.debug_regs.save();
    }

    fn release(&mut self) {
        self.xstate.release();
        let failed: u8;
        // SAFETY: the vCPU's own VMCS, current on this CPU (activated for this slice). VMCLEAR
        // writes back what the CPU caches of it and makes it inactive, so that another CPU
        // may VMPTRLD it (SDM Vol. 3C 24.1, 24.11.3); the next entry is a VMLAUNCH.
        unsafe { asm!("vmclear [{}]", "setna {}", in(reg) &self.vmcs, out(reg_byte) failed) };
        if failed != 0 {
            log::error!("vmx: VMCLEAR of VMCS {:#x} failed", self.vmcs);
            return;
        }
        self.launched = false;
        let _ = current_vmcs().compare_exchange(self.vmcs, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    // Inlined into each run loop (one CPU, several CPUs): the exit decoding is the hot path.
    #[inline(always)]
    fn run(&mut self) -> VmExit {
        // `activate` made this VMCS current when the vCPU was scheduled in.
        debug_assert_eq!(current_vmcs().load(Ordering::Relaxed), self.vmcs);
        loop {
            crate::platform::spec_ctrl::before_vmx_entry();
            // SAFETY: the VMCS is current and fully initialised; its EPT maps only this
            // domain's RAM; host state points back into `vmx_world_switch`.
            let failed = unsafe { vmx_world_switch(&mut self.regs, self.launched.into()) };
            if failed != 0 {
                let error = read(vmcs::VM_INSTRUCTION_ERROR);
                return VmExit::EntryFailed(entry_checks::vm_instruction_error(error), error);
            }
            self.launched = true;
            self.reinject_interrupted_event();
            let exit_reason = read(vmcs::EXIT_REASON);
            // The hot path first: a VMCALL's reason has no flag bits set.
            if exit_reason == reason::VMCALL {
                return VmExit::Hypercall;
            }
            let basic = exit_reason & 0xffff;
            if exit_reason & (1 << 31) != 0 {
                return self.entry_failure(exit_reason);
            }
            return match basic {
                reason::VMCALL => VmExit::Hypercall,
                reason::CPUID => VmExit::Cpuid,
                reason::HLT => VmExit::Hlt,
                reason::RDMSR => VmExit::MsrRead,
                reason::WRMSR => VmExit::MsrWrite,
                reason::IO => {
                    // Qualification: size-1 in bits 0-2, IN in bit 3, string in bit 4, port in 16-31.
                    let q = read(vmcs::EXIT_QUALIFICATION);
                    if q & (1 << 4) != 0 {
                        let info = self
                            .string_io_info
                            .then(|| read(vmcs::EXIT_INSTRUCTION_INFO));
                        match string_io::decode_vmx(q, info) {
                            Some(io) => VmExit::StringIo(io),
                            None => VmExit::Unexpected {
                                code: basic,
                                info1: q,
                                info2: 0,
                            },
                        }
                    } else {
                        VmExit::Io {
                            port: (q >> 16) as u16,
                            size: ((q & 7) + 1) as u8,
                            write: q & (1 << 3) == 0,
                        }
                    }
                }
                reason::EXCEPTION_OR_NMI => {
                    let info = read(vmcs::EXIT_INTERRUPTION_INFO);
                    if (info >> 8) & 7 == INTERRUPTION_TYPE_NMI {
                        // NMI exiting: the NMI was the hypervisor's. The exit left NMIs
                        // blocked; INT 2 runs the host's handler, whose IRET unblocks them
                        // (SDM Vol. 3C 27.? "NMI blocking" after VM exits due to NMIs).
                        // SAFETY: vector 2 of the hypervisor's IDT is its NMI handler, which
                        // only counts and returns.
                        unsafe { asm!("int 2", options(nomem, nostack)) };
                        VmExit::Nmi
                    } else if info & 0xff == u64::from(vector::INVALID_OPCODE) {
                        VmExit::InvalidOpcode
                    } else {
                        VmExit::Unexpected {
                            code: basic,
                            info1: info,
                            info2: 0,
                        }
                    }
                }
                reason::EXTERNAL_INTERRUPT => VmExit::ExternalInterrupt,
                reason::INTERRUPT_WINDOW => VmExit::InterruptWindow,
                reason::PREEMPTION_TIMER => VmExit::ExternalInterrupt,
                reason::TRIPLE_FAULT => {
                    // A shutdown may leave CR0.CD and NW set on this CPU (Bochs sets them, as
                    // INIT does), and no VM entry or exit clears them: the host clears them.
                    // SAFETY: caches on is the hypervisor's normal state.
                    unsafe {
                        x86_64::registers::control::Cr0::update(|cr0| {
                            cr0.remove(Cr0Flags::CACHE_DISABLE | Cr0Flags::NOT_WRITE_THROUGH)
                        })
                    };
                    VmExit::TripleFault
                }
                // Unconditional in VMX non-root operation (SDM Vol. 3C 26.1.2).
                reason::XSETBV => VmExit::Xsetbv,
                reason::EPT_VIOLATION => VmExit::NestedPageFault {
                    gpa: read(vmcs::GUEST_PHYSICAL_ADDRESS),
                    write: read(vmcs::EXIT_QUALIFICATION) & (1 << 1) != 0,
                },
                reason::CR_ACCESS => match self.cr_access() {
                    Some(exit) => exit,
                    None => continue,
                },
                reason::VMCLEAR..=reason::VMXON | reason::INVEPT | reason::INVVPID => {
                    // VMX instructions are not offered to guests: they see #UD.
                    self.inject_exception(vector::INVALID_OPCODE, None);
                    continue;
                }
                _ => VmExit::Unexpected {
                    code: basic,
                    info1: read(vmcs::EXIT_QUALIFICATION),
                    info2: read(vmcs::GUEST_PHYSICAL_ADDRESS),
                },
            };
        }
    }

    fn regs(&mut self) -> &mut GuestRegisters {
        &mut self.regs
    }

    fn rip(&self) -> u64 {
        read(vmcs::GUEST_RIP)
    }

    fn set_rip(&mut self, rip: u64) {
        write_unchecked(vmcs::GUEST_RIP, rip);
    }

    #[inline]
    fn skip_instruction(&mut self) {
        let next = self.rip() + read(vmcs::EXIT_INSTRUCTION_LENGTH);
        self.set_rip(next);
        // The instruction after STI or MOV SS completed: its blocking ends with it (SDM 25.4.2).
        let interruptibility = read(vmcs::GUEST_INTERRUPTIBILITY);
        if interruptibility & 0b11 != 0 {
            write_unchecked(vmcs::GUEST_INTERRUPTIBILITY, interruptibility & !0b11);
        }
    }

    fn cpl(&self) -> u8 {
        // CPL is SS.DPL (SDM Vol. 3C 26.3.1.2); SS access rights are the third segment.
        ((read(vmcs::GUEST_SS_ACCESS_RIGHTS) >> 5) & 3) as u8
    }

    fn paging_mode(&self) -> PagingMode {
        PagingMode {
            paging: read(vmcs::GUEST_CR0) & Cr0Flags::PAGING.bits() != 0,
            long_mode: read(vmcs::GUEST_IA32_EFER) & EferFlags::LONG_MODE_ACTIVE.bits() != 0,
            cr3: read(vmcs::GUEST_CR3),
            write_protect: read(vmcs::GUEST_CR0) & Cr0Flags::WRITE_PROTECT.bits() != 0,
        }
    }

    fn arch_state(&self) -> ArchState {
        let interrupted = read(vmcs::IDT_VECTORING_INFO);
        ArchState {
            rsp: read(vmcs::GUEST_RSP),
            rflags: read(vmcs::GUEST_RFLAGS),
            cr0: read(vmcs::CR0_READ_SHADOW),
            // VMX keeps no guest CR2: the hypervisor never takes a page fault, so the CPU's
            // CR2 is still the guest's.
            cr2: x86_64::registers::control::Cr2::read_raw(),
            cr3: read(vmcs::GUEST_CR3),
            cr4: read(vmcs::CR4_READ_SHADOW),
            efer: read(vmcs::GUEST_IA32_EFER),
            cs: read(vmcs::GUEST_CS_SELECTOR) as u16,
            ss: read(vmcs::GUEST_SS_SELECTOR) as u16,
            interrupted_event: interrupted as u32,
            interrupted_error: if interrupted & (1 << 11) != 0 {
                read(vmcs::IDT_VECTORING_ERROR_CODE) as u32
            } else {
                0
            },
        }
    }

    fn set_rsp(&mut self, rsp: u64) {
        write_unchecked(vmcs::GUEST_RSP, rsp);
    }

    fn set_control_register(&mut self, cr: u8, value: u64) {
        match cr {
            0 => {
                // CD and NW stay in the shadow (`write_controls`): caching stays on.
                write_unchecked(
                    vmcs::GUEST_CR0,
                    (value & !CR0_CACHE_BITS | self.cr0_fixed.0) & self.cr0_fixed.1,
                );
                write_unchecked(vmcs::CR0_READ_SHADOW, value);
            }
            3 => write_unchecked(vmcs::GUEST_CR3, value),
            4 => {
                write_unchecked(
                    vmcs::GUEST_CR4,
                    (value | CR4_VMXE | self.cr4_fixed.0) & self.cr4_fixed.1,
                );
                write_unchecked(vmcs::CR4_READ_SHADOW, value);
            }
            _ => return,
        }
        // The MOV did not reach the TLB: drop this guest's translations as it would have
        // (single-context INVEPT also drops the combined linear mappings of the EPTP).
        self.invalidate_nested_translations();
    }

    fn set_cr2(&mut self, cr2: u64) {
        // SAFETY: the hypervisor does not use CR2 (it never takes a page fault); the value is
        // the guest's until the next entry.
        unsafe { asm!("mov cr2, {}", in(reg) cr2, options(nostack, nomem)) };
    }

    fn cr4_hardware_allowed(&self) -> u64 {
        self.cr4_fixed.1 & !CR4_VMXE
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        // Interruption information: vector, type 3 (hardware exception), valid (SDM 25.8.3).
        let mut info = u64::from(vector) | (3 << 8) | (1 << 31);
        if let Some(code) = error_code {
            info |= 1 << 11;
            write_unchecked(vmcs::ENTRY_EXCEPTION_ERROR_CODE, code.into());
        }
        write_unchecked(vmcs::ENTRY_INTERRUPTION_INFO, info);
    }

    fn interrupt_flag(&self) -> bool {
        read(vmcs::GUEST_RFLAGS) & RFlags::INTERRUPT_FLAG.bits() != 0
    }

    fn interrupt_window_open(&self) -> bool {
        // Blocking by STI or MOV SS is bits 0 and 1 of the interruptibility state.
        self.interrupt_flag()
            && read(vmcs::GUEST_INTERRUPTIBILITY) & 0b11 == 0
            && read(vmcs::ENTRY_INTERRUPTION_INFO) & EVENT_VALID == 0
    }

    fn inject_interrupt(&mut self, vector: u8) {
        // Interruption type 0: external interrupt.
        write_unchecked(
            vmcs::ENTRY_INTERRUPTION_INFO,
            u64::from(vector) | EVENT_VALID,
        );
    }

    fn set_interrupt_window_exiting(&mut self, enabled: bool) {
        if enabled {
            self.primary_controls |= u64::from(PRIMARY_INTERRUPT_WINDOW_EXITING);
        } else {
            self.primary_controls &= !u64::from(PRIMARY_INTERRUPT_WINDOW_EXITING);
        }
        write_unchecked(vmcs::PRIMARY_PROCESSOR_CONTROLS, self.primary_controls);
    }

    fn set_preemption_deadline(&mut self, tsc_ticks: u64) {
        if let Some(shift) = self.preemption_timer_shift {
            // One TSC reading: the whole slice is left.
            self.preemption_deadline_tsc = rdtsc().saturating_add(tsc_ticks);
            write_preemption_timer(tsc_ticks, shift);
        }
    }

    fn preemption_deadline_tsc(&self) -> u64 {
        // u64::MAX when the timer is not in use: never set.
        self.preemption_deadline_tsc
    }

    fn reload_preemption_deadline(&mut self) {
        if let Some(shift) = self.preemption_timer_shift {
            write_preemption_timer(self.preemption_deadline_tsc.saturating_sub(rdtsc()), shift);
        }
    }

    fn invalidate_nested_translations(&mut self) {
        // INVEPT (SDM Vol. 3C 31.3; 29.4.3.1): single-context drops the guest-physical and
        // combined mappings derived from this EPTP, for every VPID; all-context those of all.
        let descriptor: [u64; 2] = [self.eptp, 0];
        let failed: u8;
        // SAFETY: INVEPT only drops cached translations; the descriptor is a valid 128-bit
        // operand (EPTP, reserved 0) and the type one the CPU reports it supports.
        unsafe {
            asm!("invept {}, [{}]", "setna {}", in(reg) self.invept as u64,
                 in(reg) descriptor.as_ptr(), out(reg_byte) failed, options(nostack));
        }
        if failed != 0 {
            log::error!("vmx: INVEPT {:?} failed", self.invept);
        }
    }

    fn flush_guest_tlb(&mut self) {
        // With EPT on, every guest-linear translation is a combined mapping (SDM Vol. 3C
        // 29.4.1), and single-context INVEPT drops those derived from this EPTP for every
        // VPID (29.4.3.1): it flushes more than the guest's own TLB, never less.
        self.invalidate_nested_translations();
    }

    fn flush_guest_tlb_pages(&mut self, pages: &[u64]) {
        if !self.invvpid_address || self.vpid == 0 {
            self.flush_guest_tlb();
            return;
        }
        for &page in pages {
            // Individual-address INVVPID (SDM Vol. 3C 31.3 "INVVPID", 29.4.3.3) drops the
            // linear and combined mappings of the address tagged with the VPID, global ones
            // included, for every EP4TA; it fails on VPID 0 or a non-canonical address,
            // which the caller never passes (flush_tlb checked every address).
            let descriptor: [u64; 2] = [u64::from(self.vpid), page];
            let failed: u8;
            // SAFETY: INVVPID only drops cached translations; the descriptor is a valid
            // 128-bit operand and type 0 one the CPU reports (IA32_VMX_EPT_VPID_CAP bit 40).
            unsafe {
                asm!("invvpid {}, [{}]", "setna {}", in(reg) 0u64,
                     in(reg) descriptor.as_ptr(), out(reg_byte) failed, options(nostack));
            }
            if failed != 0 {
                log::error!("vmx: INVVPID of {page:#x} failed; flushing the whole guest TLB");
                self.flush_guest_tlb();
                return;
            }
        }
    }

    fn read_msr(&self, msr: ArchMsr) -> u64 {
        match msr {
            // Guests run with TSC offset 0.
            ArchMsr::Tsc => rdtsc(),
            ArchMsr::Efer => read(vmcs::GUEST_IA32_EFER),
            ArchMsr::FsBase => read(vmcs::GUEST_FS_BASE),
            ArchMsr::GsBase => read(vmcs::GUEST_GS_BASE),
            ArchMsr::SysenterCs => read(vmcs::GUEST_SYSENTER_CS),
            ArchMsr::SysenterEsp => read(vmcs::GUEST_SYSENTER_ESP),
            ArchMsr::SysenterEip => read(vmcs::GUEST_SYSENTER_EIP),
            // Not loaded on entry: reads return what the guest wrote (write-back memory).
            ArchMsr::Pat => 0x0007_0406_0007_0406,
            _ => SWITCHED_MSRS
                .iter()
                .position(|(m, _)| *m == msr)
                .map_or(0, |i| self.switched_msrs[i]),
        }
    }

    fn write_msr(&mut self, msr: ArchMsr, value: u64) {
        match msr {
            ArchMsr::Tsc | ArchMsr::Pat => {}
            ArchMsr::Efer => write_unchecked(vmcs::GUEST_IA32_EFER, value),
            ArchMsr::FsBase => write_unchecked(vmcs::GUEST_FS_BASE, value),
            ArchMsr::GsBase => write_unchecked(vmcs::GUEST_GS_BASE, value),
            ArchMsr::SysenterCs => write_unchecked(vmcs::GUEST_SYSENTER_CS, value),
            ArchMsr::SysenterEsp => write_unchecked(vmcs::GUEST_SYSENTER_ESP, value),
            ArchMsr::SysenterEip => write_unchecked(vmcs::GUEST_SYSENTER_EIP, value),
            _ => {
                if let Some(i) = SWITCHED_MSRS.iter().position(|(m, _)| *m == msr) {
                    self.switched_msrs[i] = value;
                    // SAFETY: this vCPU's VMCS is current, so its syscall MSRs are live; the
                    // hypervisor does not use them.
                    unsafe { wrmsr(SWITCHED_MSRS[i].1, value) };
                }
            }
        }
    }

    fn osxsave_enabled(&self) -> bool {
        // OSXSAVE is not among the bits VMX fixes, so the guest owns it in GUEST_CR4; the
        // shadow answers for any bit the mask gives the hypervisor.
        let mask = read(vmcs::CR4_GUEST_HOST_MASK);
        let cr4 = read(vmcs::GUEST_CR4) & !mask | read(vmcs::CR4_READ_SHADOW) & mask;
        cr4 & Cr4Flags::OSXSAVE.bits() != 0
    }

    fn xcr0(&self) -> u64 {
        self.xstate.xcr0()
    }

    fn set_xcr0(&mut self, value: u64) {
        self.xstate.set_xcr0(value);
    }

    fn dump(&self, out: &mut dyn fmt::Write) -> fmt::Result {
        write!(
            out,
            "vmx: reason={:#x} qualification={:#x} interruption={:#x} idt_vectoring={:#x} gpa={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} rsp={:#x} rflags={:#x} cs_ar={:#x}",
            read(vmcs::EXIT_REASON),
            read(vmcs::EXIT_QUALIFICATION),
            read(vmcs::EXIT_INTERRUPTION_INFO),
            read(vmcs::IDT_VECTORING_INFO),
            read(vmcs::GUEST_PHYSICAL_ADDRESS),
            read(vmcs::GUEST_CR0),
            read(vmcs::GUEST_CR3),
            read(vmcs::GUEST_CR4),
            read(vmcs::GUEST_IA32_EFER),
            read(vmcs::GUEST_RSP),
            read(vmcs::GUEST_RFLAGS),
            read(vmcs::GUEST_CS_ACCESS_RIGHTS),
        )
    }
}

// The world switch (SDM Vol. 3C 27.5, 28.5): VM exit restores the host's RSP and RIP from the
// VMCS, nothing else of the general registers, so they are switched here. HOST_RSP is set on
// every entry because the caller's stack depth may differ between calls.
global_asm!(
    r#"
    .section .text
    .global vmx_world_switch
vmx_world_switch:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rdi                /* guest registers */
    mov rax, 0x6c14         /* HOST_RSP */
    vmwrite rax, rsp
    cmp byte ptr [rip + {verw_on_entry}], 0
    je 3f
    verw word ptr [rip + {verw_selector}]   /* MDS: clear the CPU buffers (spec_ctrl) */
3:
    test rsi, rsi
    mov rax, rdi
    mov rcx, [rax + 8]
    mov rdx, [rax + 16]
    mov rbx, [rax + 24]
    mov rbp, [rax + 40]
    mov rsi, [rax + 48]
    mov rdi, [rax + 56]
    mov r8, [rax + 64]
    mov r9, [rax + 72]
    mov r10, [rax + 80]
    mov r11, [rax + 88]
    mov r12, [rax + 96]
    mov r13, [rax + 104]
    mov r14, [rax + 112]
    mov r15, [rax + 120]
    mov rax, [rax]
    jnz 1f
    vmlaunch
    jmp 2f
1:
    vmresume
2:
    /* VM entry failed: nothing of the guest ran. */
    pop rdi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    mov eax, 1
    ret

    .global vmx_exit_entry
vmx_exit_entry:
    push rax
    mov rax, [rsp + 8]
    mov [rax + 8], rcx
    mov [rax + 16], rdx
    mov [rax + 24], rbx
    mov [rax + 40], rbp
    mov [rax + 48], rsi
    mov [rax + 56], rdi
    mov [rax + 64], r8
    mov [rax + 72], r9
    mov [rax + 80], r10
    mov [rax + 88], r11
    mov [rax + 96], r12
    mov [rax + 104], r13
    mov [rax + 112], r14
    mov [rax + 120], r15
    pop rcx
    mov [rax], rcx
    cmp byte ptr [rip + {rsb_fill}], 0
    je 4f
    call lamina_rsb_fill    /* before any ret: no return predicted from the guest's RSB */
4:
    pop rdi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    xor eax, eax
    ret
"#,
    rsb_fill = sym crate::platform::spec_ctrl::RSB_FILL,
    verw_on_entry = sym crate::platform::spec_ctrl::VERW_ON_ENTRY,
    verw_selector = sym crate::platform::spec_ctrl::VERW_SELECTOR,
);

/// Loads the VMX-preemption timer with `tsc_ticks` (it counts TSC >> `shift`, SDM Vol. 3C
/// 26.5.1): at least 1, at most what the 32-bit field holds.
#[inline(always)]
fn write_preemption_timer(tsc_ticks: u64, shift: u8) {
    write_unchecked(
        vmcs::PREEMPTION_TIMER_VALUE,
        (tsc_ticks >> shift).clamp(1, u64::from(u32::MAX)),
    );
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

//! An SVM vCPU: VMCB set-up for a 64-bit guest, the VMRUN world switch, and the translation
//! of #VMEXIT codes (AMD APM Vol. 2, Appendix C) into [`VmExit`].

use super::Svm;
use super::vmcb::{Segment, Vmcb};
use super::vmrun_checks;
use crate::common::memory::guest_paging::PagingMode;
use crate::common::vcpu::string_io;
use crate::common::vcpu::{
    ArchMsr, ArchState, CrOperand, GuestRegisters, VirtualCpu, VmExit, reg, vector,
};
use crate::hw::{
    EntryState, GUEST_BOOT_CR0, GUEST_BOOT_CR4, GUEST_BOOT_EFER, GUEST_BOOT_RFLAGS, HwError,
};
use crate::platform::debug_regs::DebugRegisters;
use crate::platform::memory;
use crate::platform::xstate::ExtendedState;
use core::arch::{asm, global_asm};
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::model_specific::EferFlags;
use x86_64::registers::rflags::RFlags;

/// Set once two vCPUs share an ASID: then a switch between vCPUs must flush the TLB.
pub(super) static ASIDS_SHARED: AtomicBool = AtomicBool::new(false);
/// The VMCB that ran last on this CPU.
fn last_vmcb() -> &'static AtomicU64 {
    &crate::platform::percpu::this_cpu().guest_control
}

mod exit_code {
    pub(super) const READ_CR0: u64 = 0x00;
    pub(super) const WRITE_CR15: u64 = 0x1f;
    pub(super) const EXCEPTION_UD: u64 = 0x46;
    pub(super) const NMI: u64 = 0x61;
    pub(super) const INVALID: u64 = u64::MAX;
    pub(super) const INTR: u64 = 0x60;
    pub(super) const VINTR: u64 = 0x64;
    pub(super) const CPUID: u64 = 0x72;
    pub(super) const HLT: u64 = 0x78;
    pub(super) const IOIO: u64 = 0x7b;
    pub(super) const MSR: u64 = 0x7c;
    pub(super) const SHUTDOWN: u64 = 0x7f;
    pub(super) const VMRUN: u64 = 0x80;
    pub(super) const VMMCALL: u64 = 0x81;
    pub(super) const SKINIT: u64 = 0x86;
    pub(super) const XSETBV: u64 = 0x8d;
    pub(super) const NPF: u64 = 0x400;
}

// Intercept bits (APM Vol. 2, Table B-1).
const MISC1_INTR: u32 = 1 << 0;
const MISC1_NMI: u32 = 1 << 1;
const MISC1_VINTR: u32 = 1 << 4;
const MISC1_CPUID: u32 = 1 << 18;
const MISC1_HLT: u32 = 1 << 24;
const MISC1_IOIO: u32 = 1 << 27;
const MISC1_MSR: u32 = 1 << 28;
const MISC1_SHUTDOWN: u32 = 1 << 31;
/// CR intercepts (APM Vol. 2 15.9): reads of CR8; writes of CR0, CR3, CR4 (checked by the
/// hypervisor, which QEMU's nested SVM does not do) and CR8. CR8 is the emulated TPR;
/// intercepting it also keeps guests off a QEMU TCG assertion.
const INTERCEPT_CR_READS: u16 = 1 << 8;
const INTERCEPT_CR_WRITES: u16 = (1 << 0) | (1 << 3) | (1 << 4) | (1 << 8);
/// VMRUN (mandatory), VMMCALL, VMLOAD, VMSAVE, STGI, CLGI, SKINIT.
const MISC2_SVM_INSTRUCTIONS: u32 = 0x7f;
/// XSETBV: XCR0 is the guest's own (docs/abi.md 18.2), never the physical one as written.
const MISC2_XSETBV: u32 = 1 << 13;

// V_INTR bits (APM Vol. 2 15.21).
const V_IRQ: u64 = 1 << 8;
const V_INTR_PRIO_HIGHEST: u64 = 0xf << 16;
const V_IGN_TPR: u64 = 1 << 20;
/// Physical interrupts are masked by the host's RFLAGS.IF, not the guest's (APM 15.21.1).
const V_INTR_MASKING: u64 = 1 << 24;
const EVENT_VALID: u64 = 1 << 31;
/// EVENTINJ TYPE 4: software interrupt (INTn).
const EVENT_TYPE_SOFTWARE: u64 = 4 << 8;
// TLB_CONTROL values (APM Vol. 2 15.16.1).
const TLB_FLUSH_ALL: u8 = 1;
const TLB_FLUSH_THIS_ASID: u8 = 3;

/// A guest vCPU on AMD-V.
pub struct SvmVcpu {
    vmcb: Vmcb,
    regs: GuestRegisters,
    host_state_vmcb: u64,
    /// The CPU whose host-state page `host_state_vmcb` is: the one the vCPU ran on last.
    host_cpu: usize,
    /// Length of the instruction behind the last exit (0: not an instruction exit).
    instruction_len: u64,
    /// TLB_CONTROL can flush this guest's ASID alone.
    flush_by_asid: bool,
    /// Interrupts into CPL 0 go in as software interrupts (see `inject_interrupt`).
    soft_interrupts_at_cpl0: bool,
    /// x87/SSE/AVX registers and XCR0 (docs/abi.md 18).
    xstate: ExtendedState,
    /// DR0-DR3 (docs/abi.md 18.8); DR6 and DR7 are in the VMCB.
    debug_regs: DebugRegisters,
}

unsafe extern "C" {
    /// Loads the guest registers, runs the guest, stores them back (assembly below).
    fn svm_world_switch(regs: *mut GuestRegisters, guest_vmcb: u64, host_vmcb: u64);
}

impl SvmVcpu {
    pub(super) fn new(
        npt_root: u64,
        svm: &Svm,
        entry: &EntryState,
        asid: u32,
    ) -> Result<Self, HwError> {
        let xstate = ExtendedState::new().ok_or(HwError::OutOfMemory)?;
        let page = memory::allocate_zeroed(0x1000, 0x1000).ok_or(HwError::OutOfMemory)?;
        // SAFETY: a fresh zeroed page owned by this vCPU.
        let mut v = unsafe { Vmcb::new(page) };
        let c = &mut v.control;
        c.intercept_exceptions = 1 << vector::INVALID_OPCODE;
        c.intercept_misc1 = MISC1_INTR
            | MISC1_NMI
            | MISC1_CPUID
            | MISC1_HLT
            | MISC1_IOIO
            | MISC1_MSR
            | MISC1_SHUTDOWN;
        c.intercept_cr_reads = INTERCEPT_CR_READS;
        c.intercept_cr_writes = INTERCEPT_CR_WRITES;
        c.intercept_misc2 = MISC2_SVM_INSTRUCTIONS | MISC2_XSETBV;
        // SAFETY: `Svm::enable` allocated both maps (12 KiB and 8 KiB) for as long as SVM is
        // on, and filled them to intercept everything.
        unsafe { c.set_permission_maps(svm.io_permission_map, svm.msr_permission_map) };
        c.guest_asid = asid;
        c.tlb_control = TLB_FLUSH_ALL; // on the first run
        c.v_intr = V_INTR_MASKING;
        // SAFETY: the domain's nested page table, which maps only its RAM and grant window;
        // the vCPU does not run once it is dropped (`Virtualization::create_vcpu`).
        unsafe { c.enable_nested_paging(npt_root) };

        // 64-bit guest state (APM Vol. 2 15.5.1; attributes in VMCB compressed form).
        // Data selectors are null (docs/abi.md 4.1), legal at CPL 0 in 64-bit mode (SDM Vol. 3A
        // 5.4.1.1; AMD64 alike); the hidden state stays a flat writable data segment of DPL 0.
        let code = lamina_abi::layout::BOOT_CODE_SELECTOR;
        let segment = |selector, attributes, limit, base| Segment {
            selector,
            attributes,
            limit,
            base,
        };
        let s = &mut v.save;
        s.cs = segment(code, 0x029b, 0xffff_ffff, 0);
        let null_data = segment(0, 0x0c93, 0xffff_ffff, 0);
        (s.ds, s.es, s.ss, s.fs, s.gs) = (null_data, null_data, null_data, null_data, null_data);
        s.tr = segment(0, 0x008b, 0x67, 0);
        s.ldtr = segment(0, 0x0082, 0, 0);
        s.gdtr = segment(0, 0, u32::from(entry.gdt.1), entry.gdt.0);
        s.idtr = segment(0, 0, 0, 0);
        s.cpl = 0;
        s.efer = (GUEST_BOOT_EFER | EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE).bits();
        s.cr0 = GUEST_BOOT_CR0.bits();
        s.cr3 = entry.cr3;
        s.cr4 = GUEST_BOOT_CR4.bits();
        s.dr6 = 0xffff_0ff0;
        s.dr7 = 0x400;
        s.rflags = GUEST_BOOT_RFLAGS;
        s.rip = entry.rip;
        s.rsp = entry.rsp;
        s.g_pat = 0x0007_0406_0007_0406;
        let mut regs = GuestRegisters::default();
        regs.gpr[reg::RDI] = entry.rdi;
        Ok(SvmVcpu {
            vmcb: v,
            regs,
            host_state_vmcb: svm.host_state_vmcb,
            host_cpu: crate::platform::percpu::this_cpu().index,
            instruction_len: 0,
            flush_by_asid: svm.flush_by_asid,
            soft_interrupts_at_cpl0: svm.soft_interrupts_at_cpl0,
            xstate,
            debug_regs: DebugRegisters::new(false),
        })
    }

    fn enter(&mut self) {
        self.vmcb.save.rax = self.regs.gpr[reg::RAX];
        // SAFETY: the VMCB is valid for a 64-bit guest, its nested page table maps only this
        // domain's RAM, and the host VMCB page was given to this CPU by `Svm::enable`.
        unsafe { svm_world_switch(&mut self.regs, self.vmcb.address(), self.host_state_vmcb) };
        self.regs.gpr[reg::RAX] = self.vmcb.save.rax;
        // A flush asked for happened with that entry: TLB_CONTROL is a command for one VMRUN.
        // One store costs less than a test of whether one was asked for.
        self.vmcb.control.tlb_control = 0;
    }
}

impl SvmVcpu {
    /// Which consistency check of VMRUN (APM Vol. 2 15.5.1, "Canonicalization and Consistency
    /// Checks") the guest state fails, as far as the VMCB shows it.
    #[cold]
    #[inline(never)]
    fn invalid_state(&self) -> &'static str {
        let (c, s) = (&self.vmcb.control, &self.vmcb.save);
        vmrun_checks::invalid_state_reason(&vmrun_checks::VmrunState {
            efer: s.efer,
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            dr6: s.dr6,
            dr7: s.dr7,
            cs_attributes: s.cs.attributes,
            asid: c.guest_asid,
            intercepts_vmrun: c.intercept_misc2 & 1 != 0,
            event_injection: c.event_injection,
        })
    }
}

impl Drop for SvmVcpu {
    fn drop(&mut self) {
        // Not the last VMCB run any more: a VMCB later allocated at the same address must not
        // be taken for it.
        for cpu in crate::platform::percpu::cpus() {
            let _ = cpu.guest_control.compare_exchange(
                self.vmcb.address(),
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        // No VMRUN uses the VMCB again (the CPU keeps nothing of it between VMRUNs: no clean
        // bits are set). The nested page tables belong to the domain, which frees them.
        memory::release(self.vmcb.address(), 0x1000);
    }
}

impl VirtualCpu for SvmVcpu {
    fn activate(&mut self) {
        let cpu = crate::platform::percpu::this_cpu();
        if self.host_cpu != cpu.index {
            // Arrived from another CPU: the world switch must VMLOAD this CPU's host state,
            // and translations this vCPU's ASID left here in an earlier stint may be stale.
            self.host_state_vmcb = cpu.svm_host_state.load(Ordering::Relaxed);
            self.host_cpu = cpu.index;
            self.vmcb.control.tlb_control = TLB_FLUSH_ALL;
        }
        // Every VMCB is its own page: nothing to load. With more vCPUs than ASIDs, a vCPU
        // that follows another on this CPU must not see that one's translations.
        let previous = last_vmcb().swap(self.vmcb.address(), Ordering::Relaxed);
        if previous != self.vmcb.address() && ASIDS_SHARED.load(Ordering::Relaxed) {
            self.vmcb.control.tlb_control = TLB_FLUSH_ALL;
        }
        self.xstate.schedule_in();
        self.debug_regs.restore();
    }

    fn deactivate(&mut self) {
        self.debug_regs.save();
    }

    fn release(&mut self) {
        self.xstate.release();
    }

    // Inlined into each run loop (one CPU, several CPUs): the exit decoding is the hot path.
    #[inline(always)]
    fn run(&mut self) -> VmExit {
        loop {
            self.enter();
            let code = self.vmcb.control.exit_code;
            // An event whose delivery this exit interrupted is delivered again at the next
            // entry (APM Vol. 2 15.7.2).
            let interrupted = self.vmcb.control.exit_int_info;
            if interrupted & EVENT_VALID != 0 {
                self.vmcb.control.event_injection = interrupted;
            }
            // Instruction lengths for the exits common code completes: there is no NRIP-save
            // under QEMU TCG, and VMMCALL, CPUID, HLT, RDMSR and WRMSR have fixed encodings.
            let (exit, length) = match code {
                exit_code::VMMCALL => (VmExit::Hypercall, 3),
                exit_code::CPUID => (VmExit::Cpuid, 2),
                exit_code::HLT => (VmExit::Hlt, 1),
                exit_code::MSR => {
                    let write = self.vmcb.control.exit_info1 & 1 != 0;
                    (
                        if write {
                            VmExit::MsrWrite
                        } else {
                            VmExit::MsrRead
                        },
                        2,
                    )
                }
                exit_code::IOIO => {
                    // EXITINFO1: bit 0 IN, bit 2 string, bits 4-6 size, bits 16-31 port;
                    // EXITINFO2: the next RIP (APM 15.10.2).
                    let info1 = self.vmcb.control.exit_info1;
                    let next = self.vmcb.control.exit_info2;
                    if info1 & (1 << 2) != 0 {
                        // SEG is reported only with decode assists, which QEMU lacks: the
                        // common code reads the prefixes instead.
                        match string_io::decode_svm(info1, false) {
                            Some(io) => (VmExit::StringIo(io), next.wrapping_sub(self.rip())),
                            None => (
                                VmExit::Unexpected {
                                    code,
                                    info1,
                                    info2: next,
                                },
                                0,
                            ),
                        }
                    } else {
                        let io = VmExit::Io {
                            port: (info1 >> 16) as u16,
                            size: ((info1 >> 4) & 0x7) as u8,
                            write: info1 & 1 == 0,
                        };
                        (io, next.wrapping_sub(self.rip()))
                    }
                }
                // 0F 01 D1.
                exit_code::XSETBV => (VmExit::Xsetbv, 3),
                exit_code::READ_CR0..=exit_code::WRITE_CR15 => {
                    // No decode assists under QEMU TCG: the common code decodes the
                    // instruction for its operand and length.
                    let access = VmExit::CrAccess {
                        cr: (code & 0xf) as u8,
                        write: code > 0xf,
                        operand: CrOperand::Decode,
                    };
                    (access, 0)
                }
                exit_code::NMI => (VmExit::Nmi, 0),
                exit_code::INVALID => (VmExit::EntryFailed(self.invalid_state(), code), 0),
                exit_code::EXCEPTION_UD => (VmExit::InvalidOpcode, 0),
                exit_code::INTR => (VmExit::ExternalInterrupt, 0),
                exit_code::VINTR => (VmExit::InterruptWindow, 0),
                exit_code::SHUTDOWN => (VmExit::TripleFault, 0),
                exit_code::NPF => {
                    let gpa = self.vmcb.control.exit_info2;
                    let write = self.vmcb.control.exit_info1 & (1 << 1) != 0;
                    (VmExit::NestedPageFault { gpa, write }, 0)
                }
                exit_code::VMRUN..=exit_code::SKINIT => {
                    // SVM instructions are not offered to guests: they see #UD.
                    self.inject_exception(vector::INVALID_OPCODE, None);
                    continue;
                }
                _ => {
                    let info1 = self.vmcb.control.exit_info1;
                    let info2 = self.vmcb.control.exit_info2;
                    (VmExit::Unexpected { code, info1, info2 }, 0)
                }
            };
            self.instruction_len = length;
            return exit;
        }
    }

    fn regs(&mut self) -> &mut GuestRegisters {
        &mut self.regs
    }

    fn rip(&self) -> u64 {
        self.vmcb.save.rip
    }

    fn set_rip(&mut self, rip: u64) {
        self.vmcb.save.rip = rip;
    }

    #[inline]
    fn skip_instruction(&mut self) {
        let next = self.rip().wrapping_add(self.instruction_len);
        self.set_rip(next);
        // The instruction after STI or MOV SS completed: its interrupt shadow ends with it.
        self.vmcb.control.interrupt_shadow = 0;
    }

    fn cpl(&self) -> u8 {
        self.vmcb.save.cpl
    }

    fn paging_mode(&self) -> PagingMode {
        let s = &self.vmcb.save;
        let cr0 = s.cr0;
        PagingMode {
            paging: cr0 & Cr0Flags::PAGING.bits() != 0,
            long_mode: s.efer & EferFlags::LONG_MODE_ACTIVE.bits() != 0,
            cr3: s.cr3,
            write_protect: cr0 & Cr0Flags::WRITE_PROTECT.bits() != 0,
        }
    }

    fn arch_state(&self) -> ArchState {
        let s = &self.vmcb.save;
        let interrupted = self.vmcb.control.exit_int_info;
        ArchState {
            rsp: s.rsp,
            rflags: s.rflags,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer & !EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE.bits(),
            cs: s.cs.selector,
            ss: s.ss.selector,
            interrupted_event: interrupted as u32,
            interrupted_error: (interrupted >> 32) as u32,
        }
    }

    fn set_rsp(&mut self, rsp: u64) {
        self.vmcb.save.rsp = rsp;
    }

    fn set_control_register(&mut self, cr: u8, value: u64) {
        let s = &mut self.vmcb.save;
        let field = match cr {
            0 => &mut s.cr0,
            3 => &mut s.cr3,
            4 => &mut s.cr4,
            _ => return,
        };
        *field = value;
        // The intercepted MOV did not reach the TLB: flush as it would have (a CR3 load drops
        // non-global translations, CR0.PG/WP and CR4.PGE/PAE/PCIDE changes drop more; the
        // whole ASID is the simple superset).
        self.invalidate_nested_translations();
    }

    fn set_cr2(&mut self, cr2: u64) {
        self.vmcb.save.cr2 = cr2;
    }

    fn cr4_hardware_allowed(&self) -> u64 {
        // The guest's CPUID is the host's (less SVM): what it offers, the CPU has.
        u64::MAX
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        // EVENTINJ: vector, type 3 (exception), EV, V (APM Vol. 2 15.20).
        let mut event = u64::from(vector) | (3 << 8) | (1 << 31);
        if let Some(code) = error_code {
            event |= (1 << 11) | (u64::from(code) << 32);
        }
        self.vmcb.control.event_injection = event;
    }

    fn interrupt_flag(&self) -> bool {
        self.vmcb.save.rflags & RFlags::INTERRUPT_FLAG.bits() != 0
    }

    fn interrupt_window_open(&self) -> bool {
        self.interrupt_flag()
            && self.vmcb.control.interrupt_shadow & 1 == 0
            && self.vmcb.control.event_injection & EVENT_VALID == 0
    }

    fn inject_interrupt(&mut self, vector: u8) {
        // EVENTINJ type 0: external interrupt (APM Vol. 2 15.20). QEMU TCG delivers one from
        // VMRUN but keeps its vector as the pending exception, and delivers it a second time,
        // whatever RFLAGS.IF, if its vCPU thread is told to leave the guest before the next
        // exit (an icount deadline, another CPU's kick): about once in 3,600 injections of
        // the upcall test, deterministically under -icount. QEMU delivers a type 4 (software
        // interrupt) through its exception path, which clears it. At CPL 0 the two differ in
        // nothing a guest sees (the gate's DPL check passes; the return RIP is the VMCB's,
        // as nothing ran since), so where NRIP-save is missing, as in QEMU TCG, CPL 0 gets
        // type 4; a CPU without NRIP-save returns to the VMCB's RIP too.
        let soft = self.soft_interrupts_at_cpl0 && self.vmcb.save.cpl == 0;
        let kind = if soft { EVENT_TYPE_SOFTWARE } else { 0 };
        self.vmcb.control.event_injection = u64::from(vector) | kind | EVENT_VALID;
    }

    fn set_interrupt_window_exiting(&mut self, enabled: bool) {
        // A virtual interrupt of the highest priority is made pending; the VINTR intercept
        // exits when the guest is about to take it, which is when it could take ours.
        let c = &mut self.vmcb.control;
        let window = V_IRQ | V_INTR_PRIO_HIGHEST | V_IGN_TPR;
        if enabled {
            c.v_intr |= window;
            c.intercept_misc1 |= MISC1_VINTR;
        } else {
            c.v_intr &= !window;
            c.intercept_misc1 &= !MISC1_VINTR;
        }
    }

    fn invalidate_nested_translations(&mut self) {
        // TLB_CONTROL (APM Vol. 2 15.16.1): 3 flushes this guest's ASID, global entries
        // included; without FlushByAsid (QEMU TCG) 1, the whole TLB, is the only choice. A
        // whole flush already asked for (activate) is kept.
        let control = if self.flush_by_asid {
            TLB_FLUSH_THIS_ASID
        } else {
            TLB_FLUSH_ALL
        };
        if self.vmcb.control.tlb_control != TLB_FLUSH_ALL {
            self.vmcb.control.tlb_control = control;
        }
    }

    fn flush_guest_tlb(&mut self) {
        // With nested paging the TLB holds the guest's translations tagged with its ASID
        // (APM Vol. 2 15.16, 15.25.4): flushing the ASID drops them, as a guest's own
        // whole flush (MOV to CR3 without PCID, global pages included) would.
        self.invalidate_nested_translations();
    }

    fn flush_guest_tlb_pages(&mut self, pages: &[u64]) {
        if self.vmcb.control.tlb_control != 0 {
            // A flush of the ASID or more is due at the next VMRUN anyway.
            return;
        }
        let asid = self.vmcb.control.guest_asid;
        for &page in pages {
            // INVLPGA (APM Vol. 3, "INVLPGA") drops this CPU's TLB entry of the page for the
            // ASID, as the guest's INVLPG would (global ones too: KVM emulates a guest's
            // INVLPG with it). The vCPU runs on this CPU next; a move to another CPU
            // flushes the ASID there (`activate`). QEMU's TCG flushes the page for all.
            // SAFETY: at CPL 0 with EFER.SVME set (SVM is on on this CPU), INVLPGA only
            // drops a cached translation.
            unsafe {
                asm!("invlpga rax, ecx", in("rax") page, in("ecx") asid,
                     options(nostack, preserves_flags));
            }
        }
    }

    fn read_msr(&self, msr: ArchMsr) -> u64 {
        let s = &self.vmcb.save;
        match msr {
            ArchMsr::Tsc => {
                // SAFETY: RDTSC has no side effects; guests run with TSC offset 0.
                unsafe { core::arch::x86_64::_rdtsc() }
            }
            ArchMsr::Efer => s.efer & !EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE.bits(),
            ArchMsr::FsBase => s.fs.base,
            ArchMsr::GsBase => s.gs.base,
            ArchMsr::KernelGsBase => s.kernel_gs_base,
            ArchMsr::Star => s.star,
            ArchMsr::Lstar => s.lstar,
            ArchMsr::Cstar => s.cstar,
            ArchMsr::Sfmask => s.sfmask,
            ArchMsr::SysenterCs => s.sysenter_cs,
            ArchMsr::SysenterEsp => s.sysenter_esp,
            ArchMsr::SysenterEip => s.sysenter_eip,
            ArchMsr::Pat => s.g_pat,
        }
    }

    fn write_msr(&mut self, msr: ArchMsr, value: u64) {
        let s = &mut self.vmcb.save;
        let field = match msr {
            ArchMsr::Tsc => return,
            // SVME stays set under a guest (APM Vol. 2 15.5.1); the guest never sees it.
            ArchMsr::Efer => {
                s.efer = value | EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE.bits();
                return;
            }
            ArchMsr::FsBase => &mut s.fs.base,
            ArchMsr::GsBase => &mut s.gs.base,
            ArchMsr::KernelGsBase => &mut s.kernel_gs_base,
            ArchMsr::Star => &mut s.star,
            ArchMsr::Lstar => &mut s.lstar,
            ArchMsr::Cstar => &mut s.cstar,
            ArchMsr::Sfmask => &mut s.sfmask,
            ArchMsr::SysenterCs => &mut s.sysenter_cs,
            ArchMsr::SysenterEsp => &mut s.sysenter_esp,
            ArchMsr::SysenterEip => &mut s.sysenter_eip,
            ArchMsr::Pat => &mut s.g_pat,
        };
        *field = value;
    }

    fn osxsave_enabled(&self) -> bool {
        self.vmcb.save.cr4 & Cr4Flags::OSXSAVE.bits() != 0
    }

    fn xcr0(&self) -> u64 {
        self.xstate.xcr0()
    }

    fn set_xcr0(&mut self, value: u64) {
        self.xstate.set_xcr0(value);
    }

    fn dump(&self, out: &mut dyn fmt::Write) -> fmt::Result {
        let (c, s) = (&self.vmcb.control, &self.vmcb.save);
        write!(
            out,
            "svm: exitcode={:#x} exitinfo1={:#x} exitinfo2={:#x} exitintinfo={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} rsp={:#x} rflags={:#x} cpl={} cs={:#x}",
            c.exit_code,
            c.exit_info1,
            c.exit_info2,
            c.exit_int_info,
            s.cr0,
            s.cr3,
            s.cr4,
            s.efer,
            s.rsp,
            s.rflags,
            s.cpl,
            s.cs.selector,
        )
    }
}

// The world switch (APM Vol. 2 15.5): VMRUN saves and restores the host's RSP, RIP, RAX and
// control state itself; the other general registers are ours to switch. VMLOAD/VMSAVE move
// the guest's FS, GS, TR, LDTR and syscall MSRs in and out, and a final VMLOAD puts the
// host's back. GIF stays clear across the switch so no host interrupt lands in between; the
// host's IF is set at VMRUN so that, with V_INTR_MASKING, a host interrupt exits the guest
// (and stays pending in the APIC until the scheduler lets it in).
global_asm!(
    r#"
    .section .text
    .global svm_world_switch
svm_world_switch:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rdx                /* host VMCB */
    push rdi                /* guest registers */
    mov rax, rsi            /* guest VMCB: VMRUN hands it back in RAX after the exit */
    mov rcx, [rdi + 8]
    mov rdx, [rdi + 16]
    mov rbx, [rdi + 24]
    mov rbp, [rdi + 40]
    mov rsi, [rdi + 48]
    mov r8, [rdi + 64]
    mov r9, [rdi + 72]
    mov r10, [rdi + 80]
    mov r11, [rdi + 88]
    mov r12, [rdi + 96]
    mov r13, [rdi + 104]
    mov r14, [rdi + 112]
    mov r15, [rdi + 120]
    mov rdi, [rdi + 56]
    cmp byte ptr [rip + {verw_on_entry}], 0
    je 3f
    verw word ptr [rip + {verw_selector}]   /* MDS: clear the CPU buffers (spec_ctrl) */
3:
    clgi
    sti                     /* held off by GIF = 0 until VMRUN; lets host interrupts exit the guest */
    vmload rax
    vmrun rax
    vmsave rax
    cli
    xchg rdi, [rsp]         /* RDI = guest registers, the stack slot = the guest's RDI */
    mov [rdi + 8], rcx
    mov [rdi + 16], rdx
    mov [rdi + 24], rbx
    mov [rdi + 40], rbp
    mov [rdi + 48], rsi
    mov [rdi + 64], r8
    mov [rdi + 72], r9
    mov [rdi + 80], r10
    mov [rdi + 88], r11
    mov [rdi + 96], r12
    mov [rdi + 104], r13
    mov [rdi + 112], r14
    mov [rdi + 120], r15
    pop rax
    mov [rdi + 56], rax
    pop rax                 /* host VMCB */
    vmload rax
    cmp byte ptr [rip + {rsb_fill}], 0
    je 4f
    call lamina_rsb_fill    /* before any ret: no return predicted from the guest's RSB */
4:
    stgi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
"#,
    rsb_fill = sym crate::platform::spec_ctrl::RSB_FILL,
    verw_on_entry = sym crate::platform::spec_ctrl::VERW_ON_ENTRY,
    verw_selector = sym crate::platform::spec_ctrl::VERW_SELECTOR,
);

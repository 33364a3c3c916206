//! The vCPU: the one interface between vendor-neutral code and the two hardware backends
//! ([`VirtualCpu`], here), what the hypervisor keeps of each vCPU beyond its hardware state
//! ([`state`]), and the architectural state it emulates the same way on both vendors
//! (control registers, CPUID, XCR0 and the extended state, string I/O).
//!
//! A backend (`hw::vmx` or `hw::svm`) runs a vCPU until an exit that common code must see,
//! handles the exits that only matter to its architecture itself (CLTS and CR3 reads under VMX,
//! SVM instructions a guest must not use...), and translates the rest into [`VmExit`]. Everything
//! else (hypercalls, devices, MSR policy, CPUID policy, scheduling) is written once against
//! [`VirtualCpu`].

pub mod control_regs;
pub mod cpuid;
pub mod state;
pub mod string_io;
pub mod xstate;

use crate::common::memory::guest_paging::PagingMode;
use core::fmt;

/// General-purpose registers in x86 encoding order (rax=0, rcx=1, ..., r15=15), so a
/// register number from exit information indexes [`GuestRegisters::gpr`] directly.
/// Slot 4 (RSP) is unused here: RSP lives in the VMCS/VMCB.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestRegisters {
    /// The registers, indexed by encoding.
    pub gpr: [u64; 16],
}
const _: () = assert!(core::mem::size_of::<GuestRegisters>() == 128);

/// Register numbers.
#[allow(missing_docs)]
pub mod reg {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    pub const R8: usize = 8;
    pub const R10: usize = 10;
}

/// Whether a 64-bit linear address is canonical: bits 63:47 all equal (48-bit linear
/// addresses, SDM Vol. 1 3.3.7.1).
pub fn is_canonical(address: u64) -> bool {
    ((address as i64) << 16 >> 16) as u64 == address
}

/// Why a vCPU stopped running, in vendor-neutral terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmExit {
    /// VMCALL on Intel or VMMCALL on AMD; RIP still points at it.
    Hypercall,
    /// The guest executed an undefined instruction (possibly the other vendor's hypercall
    /// instruction); nothing was injected yet.
    InvalidOpcode,
    /// CPUID with EAX/ECX as the guest set them.
    Cpuid,
    /// HLT.
    Hlt,
    /// IN or OUT of `size` bytes (1, 2, 4) at `port`; string forms arrive as [`VmExit::StringIo`].
    Io {
        /// The I/O port.
        port: u16,
        /// Access size in bytes.
        size: u8,
        /// OUT (true) or IN (false).
        write: bool,
    },
    /// INS or OUTS, with or without REP; RIP still points at it.
    StringIo(crate::common::vcpu::string_io::StringIo),
    /// A control-register access the backend leaves to common code: a write to CR0, CR3, CR4
    /// or CR8, or a read of CR8 (the TPR). RIP still points at the instruction.
    CrAccess {
        /// The control register.
        cr: u8,
        /// A write (MOV to CR, LMSW, CLTS); a read otherwise.
        write: bool,
        /// Where the value comes from or goes.
        operand: CrOperand,
    },
    /// An NMI arrived for the hypervisor while the guest ran (NMI exiting); nothing for the
    /// guest.
    Nmi,
    /// VM entry (VMX) or VMRUN (SVM) refused the vCPU's state: the text names what is wrong.
    EntryFailed(&'static str, u64),
    /// RDMSR with ECX as the MSR.
    MsrRead,
    /// WRMSR with ECX as the MSR and EDX:EAX as the value.
    MsrWrite,
    /// The guest touched a guest-physical address its nested page tables do not map.
    NestedPageFault {
        /// The guest-physical address.
        gpa: u64,
        /// The access was a write.
        write: bool,
    },
    /// The guest triple-faulted (SVM: shutdown intercept; VMX: exit reason 2); the
    /// interrupted event, if the hardware recorded one, is in [`ArchState`].
    TripleFault,
    /// A host interrupt arrived while the guest ran; nothing for the guest.
    ExternalInterrupt,
    /// XSETBV with ECX and EDX:EAX as the guest set them; RIP still points at it. The
    /// backend checked nothing: common code validates (docs/abi.md 18.2).
    Xsetbv,
    /// The guest can now take an external interrupt (asked for with
    /// [`VirtualCpu::set_interrupt_window_exiting`]).
    InterruptWindow,
    /// Anything else: the domain is stopped and the vendor details reported.
    Unexpected {
        /// Vendor exit code (VMX basic exit reason or SVM EXITCODE).
        code: u64,
        /// Exit qualification / EXITINFO1.
        info1: u64,
        /// Guest-physical or linear address / EXITINFO2 where relevant.
        info2: u64,
    },
}

/// The operand of a [`VmExit::CrAccess`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrOperand {
    /// A general register (x86 encoding; 4 is RSP).
    Gpr(u8),
    /// The value to write, computed by the backend (VMX LMSW).
    Value(u64),
    /// Unknown: decode the instruction at RIP (SVM without decode assists).
    Decode,
}

/// The architectural state a report of a stopped domain shows, and what CR-write checks
/// start from. CR0 and CR4 are the guest's view (VMX read shadows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArchState {
    #[allow(missing_docs)]
    pub rsp: u64,
    #[allow(missing_docs)]
    pub rflags: u64,
    #[allow(missing_docs)]
    pub cr0: u64,
    #[allow(missing_docs)]
    pub cr2: u64,
    #[allow(missing_docs)]
    pub cr3: u64,
    #[allow(missing_docs)]
    pub cr4: u64,
    /// EFER as the guest sees it (SVME hidden).
    pub efer: u64,
    /// CS selector.
    pub cs: u16,
    /// SS selector.
    pub ss: u16,
    /// The event whose delivery the exit interrupted (VMX IDT-vectoring information, SVM
    /// EXITINTINFO bits 31:0: vector 7:0, type 10:8, error code valid 11, valid 31).
    pub interrupted_event: u32,
    /// Its error code, when bit 11 says there is one.
    pub interrupted_error: u32,
}

/// MSRs whose state lives in the VMCS/VMCB (or must be switched per vCPU) and that guests
/// may use. Every other MSR raises #GP in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ArchMsr {
    Tsc,
    Efer,
    FsBase,
    GsBase,
    KernelGsBase,
    Star,
    Lstar,
    Cstar,
    Sfmask,
    SysenterCs,
    SysenterEsp,
    SysenterEip,
    Pat,
}

impl ArchMsr {
    /// The MSR for an index, if guests may use it.
    pub fn from_index(index: u32) -> Option<Self> {
        Some(match index {
            0x10 => ArchMsr::Tsc,
            0xc000_0080 => ArchMsr::Efer,
            0xc000_0100 => ArchMsr::FsBase,
            0xc000_0101 => ArchMsr::GsBase,
            0xc000_0102 => ArchMsr::KernelGsBase,
            0xc000_0081 => ArchMsr::Star,
            0xc000_0082 => ArchMsr::Lstar,
            0xc000_0083 => ArchMsr::Cstar,
            0xc000_0084 => ArchMsr::Sfmask,
            0x174 => ArchMsr::SysenterCs,
            0x175 => ArchMsr::SysenterEsp,
            0x176 => ArchMsr::SysenterEip,
            0x277 => ArchMsr::Pat,
            _ => return None,
        })
    }
}

/// Exception vectors the common code injects.
pub mod vector {
    /// #UD.
    pub const INVALID_OPCODE: u8 = 6;
    /// #SS.
    pub const STACK_FAULT: u8 = 12;
    /// #GP.
    pub const GENERAL_PROTECTION: u8 = 13;
    /// #PF.
    pub const PAGE_FAULT: u8 = 14;
    /// Exception mnemonics by vector, for reports.
    pub fn name(vector: u8) -> &'static str {
        const NAMES: [&str; 22] = [
            "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#MF", "#TS", "#NP",
            "#SS", "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
        ];
        NAMES.get(usize::from(vector)).copied().unwrap_or("vector")
    }
}

/// A virtual CPU as common code drives it.
pub trait VirtualCpu {
    /// Makes this vCPU the one whose hardware state the accessors below reach (VMX: loads
    /// its VMCS). Called when the vCPU is scheduled in, before anything else touches it.
    fn activate(&mut self);
    /// The vCPU stops running on this CPU for now (end of its slice, or it stopped): the
    /// backend saves what the CPU holds of it and no world switch saves (VMX: CR2; both: the
    /// debug registers the world switch leaves alone).
    fn deactivate(&mut self) {}
    /// The vCPU may next run on another CPU: this CPU writes back everything it holds of it
    /// (VMX: VMCLEAR; both: the extended state). [`Self::activate`] on the next CPU takes it
    /// up there (the host state of that CPU, translations of an earlier stint dropped).
    fn release(&mut self) {}
    /// Enters the guest and runs it until the next exit common code must handle.
    fn run(&mut self) -> VmExit;
    /// The guest's general-purpose registers (RAX included; RSP is not).
    fn regs(&mut self) -> &mut GuestRegisters;
    /// Guest RIP.
    fn rip(&self) -> u64;
    /// Sets guest RIP.
    fn set_rip(&mut self, rip: u64);
    /// Moves RIP past the instruction that caused the last exit (the backend knows its
    /// length; under SVM without NRIP-save it was computed from the exit kind).
    fn skip_instruction(&mut self);
    /// Current privilege level of the guest.
    fn cpl(&self) -> u8;
    /// The guest's paging mode, for walking its page tables.
    fn paging_mode(&self) -> PagingMode;
    /// Queues an exception for delivery at the next entry.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);
    /// RFLAGS.IF of the guest.
    fn interrupt_flag(&self) -> bool;
    /// Whether an external interrupt can be injected at the next entry: RFLAGS.IF set, no
    /// interrupt shadow (STI, MOV SS), and no other event already queued.
    fn interrupt_window_open(&self) -> bool;
    /// Queues external interrupt `vector` for the next entry (the window must be open).
    fn inject_interrupt(&mut self, vector: u8);
    /// Exit as soon as the guest can take an external interrupt ([`VmExit::InterruptWindow`]).
    fn set_interrupt_window_exiting(&mut self, enabled: bool);
    /// Exit (as [`VmExit::ExternalInterrupt`]) once `tsc_ticks` have passed from now, time in
    /// the hypervisor included, even if no host interrupt can reach the guest: a backstop for
    /// the end of a time slice. Backends whose host timer always preempts the guest need not
    /// do anything.
    fn set_preemption_deadline(&mut self, tsc_ticks: u64) {
        let _ = tsc_ticks;
    }
    /// The hypervisor spent long handling an exit: a backend whose preemption deadline counts
    /// only guest time (VMX) takes that time off what is left of it.
    fn reload_preemption_deadline(&mut self) {}
    /// The TSC at which [`Self::set_preemption_deadline`] said to exit; `u64::MAX` for a
    /// backend that needs no reload.
    fn preemption_deadline_tsc(&self) -> u64 {
        u64::MAX
    }
    /// Drops the guest-physical translations the TLB may hold for this vCPU's nested page
    /// table, effective before the next entry (VMX: INVEPT; SVM: a VMCB TLB flush). Called
    /// after a nested mapping of its domain went away or lost permissions.
    fn invalidate_nested_translations(&mut self);
    /// Drops the guest-virtual translations the TLB may hold for this vCPU (what a guest's
    /// own full TLB flush drops), effective before the next entry: a sibling's `flush_tlb`
    /// named it (docs/abi.md 11). Called while the vCPU is active on this CPU; a vCPU that
    /// moves CPUs drops what it cached elsewhere at [`Self::activate`].
    fn flush_guest_tlb(&mut self);
    /// Drops the guest-virtual translations of `pages` (canonical, page-aligned) the TLB
    /// may hold for this vCPU, global ones included (what a guest's INVLPG of each drops),
    /// effective before the next entry: a sibling's `flush_tlb` listed them (docs/abi.md
    /// 11). Called as [`Self::flush_guest_tlb`]; a backend without an instruction for one
    /// address flushes everything instead.
    fn flush_guest_tlb_pages(&mut self, pages: &[u64]);
    /// The architectural state for CR-write checks and reports.
    fn arch_state(&self) -> ArchState;
    /// Sets RSP (a MOV from CR8 into RSP).
    fn set_rsp(&mut self, rsp: u64);
    /// Loads control register 0, 3 or 4 with a value [`crate::common::vcpu::control_regs`] accepted,
    /// with the TLB effects of a MOV to that register (the guest's translations flushed).
    fn set_control_register(&mut self, cr: u8, value: u64);
    /// Sets CR2 (before injecting a #PF).
    fn set_cr2(&mut self, cr2: u64);
    /// CR4 bits the hardware can run this guest with (VMX: the fixed-1 bits without VMXE).
    fn cr4_hardware_allowed(&self) -> u64;
    /// Reads an MSR whose state the hardware keeps per vCPU.
    fn read_msr(&self, msr: ArchMsr) -> u64;
    /// Writes such an MSR; the value was already validated by common code.
    fn write_msr(&mut self, msr: ArchMsr, value: u64);
    /// The guest's CR4.OSXSAVE, as the guest sees its CR4.
    fn osxsave_enabled(&self) -> bool;
    /// The guest's XCR0 (docs/abi.md 18.2).
    fn xcr0(&self) -> u64;
    /// Sets the guest's XCR0 to a value common code validated, effective at the next entry.
    fn set_xcr0(&mut self, value: u64);
    /// Writes the vendor state that explains a failure (control registers, segments, exit
    /// information) for a report.
    fn dump(&self, out: &mut dyn fmt::Write) -> fmt::Result;
}

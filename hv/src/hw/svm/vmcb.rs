//! The VMCB as a typed structure: the control area and the state-save area of AMD APM Vol. 2,
//! Appendix B "Layout of VMCB" (Tables B-1 and B-2), every used offset checked at compile time.
//!
//! Fields are read and written as ordinary memory, not volatile: the processor touches a VMCB
//! only inside VMRUN (it reads the whole VMCB at VMRUN, no clean bits being set, and writes the
//! guest state and exit information back at #VMEXIT), and VMRUN runs inside
//! `svm_world_switch`, an external function that is given the VMCB's address. The compiler
//! must assume that call reads and writes the VMCB, so it neither keeps a field in a register
//! across it nor moves a store past it; between two VMRUNs the page is this vCPU's alone.
//!
//! The fields that point the CPU at host memory for the guest (the nested page table root,
//! nested paging itself, the I/O and MSR permission maps) are private: a wrong value there
//! opens the host to the guest, so they are set only through `unsafe` methods.

use core::mem::{offset_of, size_of};
use core::ptr::NonNull;

/// A segment register in the state-save area (APM Vol. 2 Table B-2): the attributes in
/// the VMCB's compressed form (descriptor bits 55:52 and 47:40).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Segment {
    pub selector: u16,
    pub attributes: u16,
    pub limit: u32,
    pub base: u64,
}

/// Control area, VMCB offsets 0x000-0x3ff (APM Vol. 2 Table B-1).
#[repr(C)]
pub struct ControlArea {
    /// Intercepts of reads of CR0-CR15, bit n for CRn.
    pub intercept_cr_reads: u16,
    /// Intercepts of writes of CR0-CR15, bit n for CRn.
    pub intercept_cr_writes: u16,
    pub intercept_dr_reads: u16,
    pub intercept_dr_writes: u16,
    /// Exception intercepts, bit n for vector n.
    pub intercept_exceptions: u32,
    /// Instruction intercepts, vector 3 (INTR, NMI, ..., SHUTDOWN).
    pub intercept_misc1: u32,
    /// Instruction intercepts, vector 4 (VMRUN, VMMCALL, ..., XSETBV).
    pub intercept_misc2: u32,
    /// Instruction intercepts, vector 5.
    pub intercept_misc3: u32,
    _reserved_018: [u8; 0x03c - 0x018],
    pub pause_filter_threshold: u16,
    pub pause_filter_count: u16,
    /// Physical address of the I/O permission map.
    iopm_base: u64,
    /// Physical address of the MSR permission map.
    msrpm_base: u64,
    pub tsc_offset: u64,
    pub guest_asid: u32,
    /// TLB_CONTROL (APM Vol. 2 15.16.1).
    pub tlb_control: u8,
    _reserved_05d: [u8; 3],
    /// V_TPR 7:0, V_IRQ 8, V_INTR_PRIO 19:16, V_IGN_TPR 20, V_INTR_MASKING 24 (APM 15.21).
    pub v_intr: u64,
    /// Bit 0: the guest is in an interrupt shadow.
    pub interrupt_shadow: u64,
    pub exit_code: u64,
    pub exit_info1: u64,
    pub exit_info2: u64,
    /// EXITINTINFO: the event whose delivery the exit interrupted.
    pub exit_int_info: u64,
    /// Bit 0: nested paging enable.
    np_enable: u64,
    pub avic_apic_bar: u64,
    pub ghcb_gpa: u64,
    /// EVENTINJ (APM Vol. 2 15.20).
    pub event_injection: u64,
    /// Nested page table root.
    n_cr3: u64,
    pub lbr_virtualization: u64,
    pub clean_bits: u32,
    _reserved_0c4: u32,
    pub next_rip: u64,
    pub guest_instruction_count: u8,
    pub guest_instruction_bytes: [u8; 15],
    pub avic_backing_page: u64,
    _reserved_0e8: u64,
    pub avic_logical_table: u64,
    pub avic_physical_table: u64,
    _reserved_100: u64,
    pub vmsa_pointer: u64,
    _reserved_110: [u8; 0x3e0 - 0x110],
    _reserved_for_host: [u8; 0x20],
}

impl ControlArea {
    /// Turns nested paging on with the nested page table at `root` (APM Vol. 2 15.25).
    ///
    /// # Safety
    /// `root` must be the host-physical root of nested page tables that map only memory the
    /// guest may reach, and stay so whenever the VMCB runs.
    pub unsafe fn enable_nested_paging(&mut self, root: u64) {
        self.np_enable = 1;
        self.n_cr3 = root;
    }

    /// Sets the I/O and MSR permission maps (APM Vol. 2 15.10.1, 15.11).
    ///
    /// # Safety
    /// `io` must be 12 KiB and `msr` 8 KiB of physically contiguous, page-aligned memory that
    /// stays allocated whenever the VMCB runs; every access they let through reaches the
    /// hardware directly.
    pub unsafe fn set_permission_maps(&mut self, io: u64, msr: u64) {
        self.iopm_base = io;
        self.msrpm_base = msr;
    }
}

/// State-save area, VMCB offsets 0x400 on (APM Vol. 2 Table B-2, offsets from 0x400).
#[repr(C)]
pub struct StateSaveArea {
    pub es: Segment,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub fs: Segment,
    pub gs: Segment,
    /// Limit and base only.
    pub gdtr: Segment,
    pub ldtr: Segment,
    /// Limit and base only.
    pub idtr: Segment,
    pub tr: Segment,
    _reserved_0a0: [u8; 0x0cb - 0x0a0],
    pub cpl: u8,
    _reserved_0cc: u32,
    pub efer: u64,
    _reserved_0d8: [u8; 0x148 - 0x0d8],
    pub cr4: u64,
    pub cr3: u64,
    pub cr0: u64,
    pub dr7: u64,
    pub dr6: u64,
    pub rflags: u64,
    pub rip: u64,
    _reserved_180: [u8; 0x1d8 - 0x180],
    pub rsp: u64,
    pub s_cet: u64,
    pub ssp: u64,
    pub isst_addr: u64,
    pub rax: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub cr2: u64,
    _reserved_248: [u8; 0x268 - 0x248],
    /// Guest PAT (used with nested paging).
    pub g_pat: u64,
    pub dbgctl: u64,
    pub br_from: u64,
    pub br_to: u64,
    pub last_exception_from: u64,
    pub last_exception_to: u64,
    _reserved_298: [u8; 0x2e0 - 0x298],
    pub spec_ctrl: u64,
}

/// One VMCB: the 4 KiB page VMRUN takes, 4 KiB-aligned (APM Vol. 2 15.5.1).
#[repr(C, align(4096))]
pub struct VmcbPage {
    pub control: ControlArea,
    pub save: StateSaveArea,
    _reserved: [u8; 0x1000 - 0x400 - size_of::<StateSaveArea>()],
}

const _: () = assert!(size_of::<Segment>() == 0x10);
const _: () = assert!(offset_of!(Segment, attributes) == 2);
const _: () = assert!(offset_of!(Segment, limit) == 4);
const _: () = assert!(offset_of!(Segment, base) == 8);
const _: () = assert!(size_of::<ControlArea>() == 0x400);
const _: () = assert!(size_of::<StateSaveArea>() == 0x2e8);
const _: () = assert!(size_of::<VmcbPage>() == 0x1000);
const _: () = assert!(core::mem::align_of::<VmcbPage>() == 0x1000);

/// `field` lies at VMCB offset `offset` (APM Vol. 2 Tables B-1 and B-2, offsets from the
/// start of the VMCB).
macro_rules! vmcb_offset {
    ($($field:ident).+ = $offset:expr) => {
        const _: () = assert!(offset_of!(VmcbPage, $($field).+) == $offset);
    };
}
vmcb_offset!(control.intercept_cr_reads = 0x000);
vmcb_offset!(control.intercept_cr_writes = 0x002);
vmcb_offset!(control.intercept_exceptions = 0x008);
vmcb_offset!(control.intercept_misc1 = 0x00c);
vmcb_offset!(control.intercept_misc2 = 0x010);
vmcb_offset!(control.intercept_misc3 = 0x014);
vmcb_offset!(control.iopm_base = 0x040);
vmcb_offset!(control.msrpm_base = 0x048);
vmcb_offset!(control.guest_asid = 0x058);
vmcb_offset!(control.tlb_control = 0x05c);
vmcb_offset!(control.v_intr = 0x060);
vmcb_offset!(control.interrupt_shadow = 0x068);
vmcb_offset!(control.exit_code = 0x070);
vmcb_offset!(control.exit_info1 = 0x078);
vmcb_offset!(control.exit_info2 = 0x080);
vmcb_offset!(control.exit_int_info = 0x088);
vmcb_offset!(control.np_enable = 0x090);
vmcb_offset!(control.event_injection = 0x0a8);
vmcb_offset!(control.n_cr3 = 0x0b0);
vmcb_offset!(control.clean_bits = 0x0c0);
vmcb_offset!(control.next_rip = 0x0c8);
vmcb_offset!(control.guest_instruction_bytes = 0x0d1);
vmcb_offset!(control.vmsa_pointer = 0x108);
vmcb_offset!(save = 0x400);
vmcb_offset!(save.es = 0x400);
vmcb_offset!(save.cs = 0x410);
vmcb_offset!(save.cs.attributes = 0x412);
vmcb_offset!(save.cs.limit = 0x414);
vmcb_offset!(save.cs.base = 0x418);
vmcb_offset!(save.ss = 0x420);
vmcb_offset!(save.ds = 0x430);
vmcb_offset!(save.fs = 0x440);
vmcb_offset!(save.fs.base = 0x448);
vmcb_offset!(save.gs = 0x450);
vmcb_offset!(save.gs.base = 0x458);
vmcb_offset!(save.gdtr = 0x460);
vmcb_offset!(save.ldtr = 0x470);
vmcb_offset!(save.idtr = 0x480);
vmcb_offset!(save.tr = 0x490);
vmcb_offset!(save.cpl = 0x4cb);
vmcb_offset!(save.efer = 0x4d0);
vmcb_offset!(save.cr4 = 0x548);
vmcb_offset!(save.cr3 = 0x550);
vmcb_offset!(save.cr0 = 0x558);
vmcb_offset!(save.dr7 = 0x560);
vmcb_offset!(save.dr6 = 0x568);
vmcb_offset!(save.rflags = 0x570);
vmcb_offset!(save.rip = 0x578);
vmcb_offset!(save.rsp = 0x5d8);
vmcb_offset!(save.rax = 0x5f8);
vmcb_offset!(save.star = 0x600);
vmcb_offset!(save.lstar = 0x608);
vmcb_offset!(save.cstar = 0x610);
vmcb_offset!(save.sfmask = 0x618);
vmcb_offset!(save.kernel_gs_base = 0x620);
vmcb_offset!(save.sysenter_cs = 0x628);
vmcb_offset!(save.sysenter_esp = 0x630);
vmcb_offset!(save.sysenter_eip = 0x638);
vmcb_offset!(save.cr2 = 0x640);
vmcb_offset!(save.g_pat = 0x668);
vmcb_offset!(save.spec_ctrl = 0x6e0);

/// A vCPU's VMCB page, identity-mapped, owned by this value; its fields are reached through
/// `Deref` to [`VmcbPage`].
pub struct Vmcb {
    page: NonNull<VmcbPage>,
}

impl Vmcb {
    /// Takes ownership of the page at host-physical (identity-mapped) address `page`.
    ///
    /// # Safety
    /// `page` must be a non-zero, 4 KiB-aligned, zeroed or valid VMCB page that nothing else
    /// uses for the value's lifetime (only VMRUN given [`Vmcb::address`] by its owner).
    pub unsafe fn new(page: u64) -> Self {
        let page = core::ptr::with_exposed_provenance_mut::<VmcbPage>(page as usize);
        // SAFETY: the caller gives a non-zero address.
        let page = unsafe { NonNull::new_unchecked(page) };
        Vmcb { page }
    }

    /// Host-physical address of the page (the VMRUN operand).
    pub fn address(&self) -> u64 {
        self.page.as_ptr().expose_provenance() as u64
    }
}

impl core::ops::Deref for Vmcb {
    type Target = VmcbPage;

    fn deref(&self) -> &VmcbPage {
        // SAFETY: the page is valid, aligned and ours (`Vmcb::new`); the processor writes it
        // only inside VMRUN, which runs while no reference from here is alive.
        unsafe { self.page.as_ref() }
    }
}

impl core::ops::DerefMut for Vmcb {
    fn deref_mut(&mut self) -> &mut VmcbPage {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference.
        unsafe { self.page.as_mut() }
    }
}

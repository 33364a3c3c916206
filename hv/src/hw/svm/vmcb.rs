//! The VMCB: field offsets (AMD APM Vol. 2, Appendix B "Layout of VMCB") and typed access to
//! one VMCB page.

// A complete offset table: not every field is used yet.
#![allow(dead_code)]

/// Control area: CR read/write intercepts (u16 each).
pub const INTERCEPT_CR: usize = 0x000;
/// Exception intercepts (u32, bit per vector).
pub const INTERCEPT_EXCEPTIONS: usize = 0x008;
/// Instruction intercepts, word 1 (u32).
pub const INTERCEPT_MISC1: usize = 0x00c;
/// Instruction intercepts, word 2 (u32).
pub const INTERCEPT_MISC2: usize = 0x010;
/// Physical address of the I/O permission map.
pub const IOPM_BASE: usize = 0x040;
/// Physical address of the MSR permission map.
pub const MSRPM_BASE: usize = 0x048;
/// Guest ASID (u32).
pub const GUEST_ASID: usize = 0x058;
/// TLB control (u8).
pub const TLB_CONTROL: usize = 0x05c;
/// Virtual interrupt control: V_TPR, V_IRQ (bit 8), V_INTR_PRIO (16-19), V_IGN_TPR (20),
/// V_INTR_MASKING (24).
pub const V_INTR: usize = 0x060;
/// Interrupt shadow (bit 0).
pub const INTERRUPT_SHADOW: usize = 0x068;
/// EXITCODE.
pub const EXIT_CODE: usize = 0x070;
/// EXITINFO1.
pub const EXIT_INFO1: usize = 0x078;
/// EXITINFO2.
pub const EXIT_INFO2: usize = 0x080;
/// EXITINTINFO.
pub const EXIT_INT_INFO: usize = 0x088;
/// Nested paging enable (bit 0).
pub const NP_ENABLE: usize = 0x090;
/// Event injection.
pub const EVENT_INJECTION: usize = 0x0a8;
/// Nested page table root.
pub const N_CR3: usize = 0x0b0;
/// VMCB clean bits.
pub const CLEAN_BITS: usize = 0x0c0;

/// Save area: segment registers, 16 bytes each: selector u16, attributes u16, limit u32, base u64.
pub const ES: usize = 0x400;
/// CS.
pub const CS: usize = 0x410;
/// SS.
pub const SS: usize = 0x420;
/// DS.
pub const DS: usize = 0x430;
/// FS.
pub const FS: usize = 0x440;
/// GS.
pub const GS: usize = 0x450;
/// GDTR (limit and base only).
pub const GDTR: usize = 0x460;
/// LDTR.
pub const LDTR: usize = 0x470;
/// IDTR (limit and base only).
pub const IDTR: usize = 0x480;
/// TR.
pub const TR: usize = 0x490;
/// CPL (u8).
pub const CPL: usize = 0x4cb;
/// EFER.
pub const EFER: usize = 0x4d0;
/// CR4.
pub const CR4: usize = 0x548;
/// CR3.
pub const CR3: usize = 0x550;
/// CR0.
pub const CR0: usize = 0x558;
/// DR7.
pub const DR7: usize = 0x560;
/// DR6.
pub const DR6: usize = 0x568;
/// RFLAGS.
pub const RFLAGS: usize = 0x570;
/// RIP.
pub const RIP: usize = 0x578;
/// RSP.
pub const RSP: usize = 0x5d8;
/// RAX.
pub const RAX: usize = 0x5f8;
/// STAR.
pub const STAR: usize = 0x600;
/// LSTAR.
pub const LSTAR: usize = 0x608;
/// CSTAR.
pub const CSTAR: usize = 0x610;
/// SFMASK.
pub const SFMASK: usize = 0x618;
/// KernelGSBase.
pub const KERNEL_GS_BASE: usize = 0x620;
/// SYSENTER_CS.
pub const SYSENTER_CS: usize = 0x628;
/// SYSENTER_ESP.
pub const SYSENTER_ESP: usize = 0x630;
/// SYSENTER_EIP.
pub const SYSENTER_EIP: usize = 0x638;
/// CR2.
pub const CR2: usize = 0x640;
/// Guest PAT (used with nested paging).
pub const G_PAT: usize = 0x668;

/// Offset of a segment's base within its 16-byte record.
pub const SEGMENT_BASE: usize = 8;

/// One 4 KiB VMCB page, identity-mapped.
pub struct Vmcb {
    page: u64,
}

impl Vmcb {
    /// Wraps the page at host-physical `page`.
    ///
    /// # Safety
    /// `page` must be a zeroed or valid VMCB page owned by the caller for the value's lifetime.
    pub unsafe fn new(page: u64) -> Self {
        Vmcb { page }
    }

    /// Host-physical address of the page (the VMRUN operand).
    pub fn address(&self) -> u64 {
        self.page
    }

    /// Reads a field.
    pub fn read<T: Copy>(&self, offset: usize) -> T {
        debug_assert!(offset + core::mem::size_of::<T>() <= 0x1000);
        // SAFETY: the offset lies inside the page this value owns; fields are naturally aligned.
        unsafe { ((self.page as usize + offset) as *const T).read_volatile() }
    }

    /// Writes a field.
    pub fn write<T: Copy>(&mut self, offset: usize, value: T) {
        debug_assert!(offset + core::mem::size_of::<T>() <= 0x1000);
        // SAFETY: as in `read`.
        unsafe { ((self.page as usize + offset) as *mut T).write_volatile(value) }
    }

    /// Writes a segment record.
    pub fn write_segment(
        &mut self,
        at: usize,
        selector: u16,
        attributes: u16,
        limit: u32,
        base: u64,
    ) {
        self.write(at, selector);
        self.write(at + 2, attributes);
        self.write(at + 4, limit);
        self.write(at + SEGMENT_BASE, base);
    }
}

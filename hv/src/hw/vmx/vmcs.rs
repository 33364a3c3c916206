//! VMCS field encodings (Intel SDM Vol. 3D, Appendix B) and the VMREAD/VMWRITE accessors.
//!
//! Fields come in two types. A [`Field`] (guest state, controls, exit information) is written
//! by safe code. A [`HostField`] holds what the CPU trusts as the host's: the host-state area,
//! loaded at every VM exit (SDM Vol. 3C 28.5), and the host-physical addresses the CPU
//! dereferences for the guest (EPT pointer, VMCS link pointer). A wrong value there breaks the
//! hypervisor itself, so it is written only through the `unsafe` [`write_host`].

// A complete encoding table: not every field is used yet.
#![allow(missing_docs, dead_code)]

use crate::hw::HwError;
use core::arch::asm;

/// A VMCS field that safe code may write: a wrong value can hurt only the guest (a failed
/// VM entry, a wrong guest state), never the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field(u64);

/// A VMCS field the host's safety depends on: host state and host-physical pointers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostField(u64);

impl Field {
    /// The field with `encoding`, checked at compile time not to be a host-state field (bits
    /// 11:10 of an encoding are its type, 3 for host state: SDM Vol. 3D B.1).
    const fn new(encoding: u64) -> Field {
        assert!(
            (encoding >> 10) & 3 != 3,
            "a host-state field is a HostField"
        );
        Field(encoding)
    }

    /// The same field of segment `index` (ES, CS, SS, DS, FS, GS, LDTR, TR: 0 to 7, taken
    /// modulo 8), for a field of ES: these follow each other 2 apart (SDM Vol. 3D B.1-B.4).
    /// Bits 11:10 of an encoding give its type (3: host state); every field below has bits
    /// 9:0 under 0x3f0, so adding at most 14 never turns it into a host-state field.
    pub const fn of_segment(self, index: usize) -> Field {
        Field(self.0 + 2 * (index as u64 & 7))
    }
}

// 16-bit fields.
pub const VPID: Field = Field::new(0x0000);
pub const GUEST_ES_SELECTOR: Field = Field::new(0x0800);
pub const GUEST_CS_SELECTOR: Field = Field::new(0x0802);
pub const GUEST_SS_SELECTOR: Field = Field::new(0x0804);
pub const GUEST_DS_SELECTOR: Field = Field::new(0x0806);
pub const GUEST_FS_SELECTOR: Field = Field::new(0x0808);
pub const GUEST_GS_SELECTOR: Field = Field::new(0x080a);
pub const GUEST_LDTR_SELECTOR: Field = Field::new(0x080c);
pub const GUEST_TR_SELECTOR: Field = Field::new(0x080e);
pub const HOST_ES_SELECTOR: HostField = HostField(0x0c00);
pub const HOST_CS_SELECTOR: HostField = HostField(0x0c02);
pub const HOST_SS_SELECTOR: HostField = HostField(0x0c04);
pub const HOST_DS_SELECTOR: HostField = HostField(0x0c06);
pub const HOST_FS_SELECTOR: HostField = HostField(0x0c08);
pub const HOST_GS_SELECTOR: HostField = HostField(0x0c0a);
pub const HOST_TR_SELECTOR: HostField = HostField(0x0c0c);

// 64-bit fields.
pub const EPT_POINTER: HostField = HostField(0x201a);
pub const GUEST_PHYSICAL_ADDRESS: Field = Field::new(0x2400);
pub const VMCS_LINK_POINTER: HostField = HostField(0x2800);
pub const GUEST_IA32_DEBUGCTL: Field = Field::new(0x2802);
pub const GUEST_IA32_EFER: Field = Field::new(0x2806);
pub const HOST_IA32_EFER: HostField = HostField(0x2c02);

// 32-bit fields.
pub const PIN_BASED_CONTROLS: Field = Field::new(0x4000);
pub const PRIMARY_PROCESSOR_CONTROLS: Field = Field::new(0x4002);
pub const EXCEPTION_BITMAP: Field = Field::new(0x4004);
pub const EXIT_CONTROLS: Field = Field::new(0x400c);
pub const ENTRY_CONTROLS: Field = Field::new(0x4012);
pub const ENTRY_INTERRUPTION_INFO: Field = Field::new(0x4016);
pub const ENTRY_EXCEPTION_ERROR_CODE: Field = Field::new(0x4018);
pub const ENTRY_INSTRUCTION_LENGTH: Field = Field::new(0x401a);
pub const SECONDARY_PROCESSOR_CONTROLS: Field = Field::new(0x401e);
pub const VM_INSTRUCTION_ERROR: Field = Field::new(0x4400);
pub const EXIT_REASON: Field = Field::new(0x4402);
pub const EXIT_INTERRUPTION_INFO: Field = Field::new(0x4404);
pub const IDT_VECTORING_INFO: Field = Field::new(0x4408);
pub const IDT_VECTORING_ERROR_CODE: Field = Field::new(0x440a);
pub const EXIT_INSTRUCTION_LENGTH: Field = Field::new(0x440c);
pub const EXIT_INSTRUCTION_INFO: Field = Field::new(0x440e);
pub const GUEST_ES_LIMIT: Field = Field::new(0x4800);
pub const GUEST_GDTR_LIMIT: Field = Field::new(0x4810);
pub const GUEST_IDTR_LIMIT: Field = Field::new(0x4812);
pub const GUEST_ES_ACCESS_RIGHTS: Field = Field::new(0x4814);
pub const GUEST_CS_ACCESS_RIGHTS: Field = Field::new(0x4816);
pub const GUEST_SS_ACCESS_RIGHTS: Field = Field::new(0x4818);
pub const GUEST_INTERRUPTIBILITY: Field = Field::new(0x4824);
pub const GUEST_ACTIVITY_STATE: Field = Field::new(0x4826);
pub const GUEST_SYSENTER_CS: Field = Field::new(0x482a);
pub const PREEMPTION_TIMER_VALUE: Field = Field::new(0x482e);
pub const HOST_SYSENTER_CS: HostField = HostField(0x4c00);

// Natural-width fields.
pub const CR0_GUEST_HOST_MASK: Field = Field::new(0x6000);
pub const CR4_GUEST_HOST_MASK: Field = Field::new(0x6002);
pub const CR0_READ_SHADOW: Field = Field::new(0x6004);
pub const CR4_READ_SHADOW: Field = Field::new(0x6006);
pub const EXIT_QUALIFICATION: Field = Field::new(0x6400);
pub const GUEST_CR0: Field = Field::new(0x6800);
pub const GUEST_CR3: Field = Field::new(0x6802);
pub const GUEST_CR4: Field = Field::new(0x6804);
pub const GUEST_ES_BASE: Field = Field::new(0x6806);
pub const GUEST_FS_BASE: Field = Field::new(0x680e);
pub const GUEST_GS_BASE: Field = Field::new(0x6810);
pub const GUEST_GDTR_BASE: Field = Field::new(0x6816);
pub const GUEST_IDTR_BASE: Field = Field::new(0x6818);
pub const GUEST_DR7: Field = Field::new(0x681a);
pub const GUEST_RSP: Field = Field::new(0x681c);
pub const GUEST_RIP: Field = Field::new(0x681e);
pub const GUEST_RFLAGS: Field = Field::new(0x6820);
pub const GUEST_PENDING_DEBUG: Field = Field::new(0x6822);
pub const GUEST_SYSENTER_ESP: Field = Field::new(0x6824);
pub const GUEST_SYSENTER_EIP: Field = Field::new(0x6826);
pub const HOST_CR0: HostField = HostField(0x6c00);
pub const HOST_CR3: HostField = HostField(0x6c02);
pub const HOST_CR4: HostField = HostField(0x6c04);
pub const HOST_FS_BASE: HostField = HostField(0x6c06);
pub const HOST_GS_BASE: HostField = HostField(0x6c08);
pub const HOST_TR_BASE: HostField = HostField(0x6c0a);
pub const HOST_GDTR_BASE: HostField = HostField(0x6c0c);
pub const HOST_IDTR_BASE: HostField = HostField(0x6c0e);
pub const HOST_SYSENTER_ESP: HostField = HostField(0x6c10);
pub const HOST_SYSENTER_EIP: HostField = HostField(0x6c12);
pub const HOST_RSP: HostField = HostField(0x6c14);
pub const HOST_RIP: HostField = HostField(0x6c16);

/// Reads a field of the current VMCS.
pub fn read(field: Field) -> u64 {
    let value;
    // SAFETY: VMREAD only reads the current VMCS; with none loaded it fails without effect.
    unsafe { asm!("vmread {}, {}", out(reg) value, in(reg) field.0, options(nostack)) };
    value
}

/// Writes `encoding` of the current VMCS, reporting VMfail.
///
/// # Safety
/// A host field must hold a value the hypervisor can run with (see [`write_host`]).
unsafe fn vmwrite(encoding: u64, value: u64) -> Result<(), HwError> {
    let failed: u8;
    // SAFETY: VMWRITE changes only the current VMCS, which this CPU owns; the caller answers
    // for the value.
    unsafe {
        asm!("vmwrite {}, {}", "setna {}", in(reg) encoding, in(reg) value, out(reg_byte) failed, options(nostack))
    };
    if failed != 0 {
        Err(HwError::VmxInstruction(
            "VMWRITE",
            read(VM_INSTRUCTION_ERROR),
        ))
    } else {
        Ok(())
    }
}

/// Writes a guest-state or control field of the current VMCS, reporting VMfail.
pub fn write(field: Field, value: u64) -> Result<(), HwError> {
    // SAFETY: not a host field.
    unsafe { vmwrite(field.0, value) }
}

/// Writes a host-state field or host-physical pointer of the current VMCS, reporting VMfail.
///
/// # Safety
/// `value` must be what the hypervisor runs with at every VM exit on this CPU (the host
/// state, SDM Vol. 3C 28.5), or the root of structures that map only memory the guest may
/// reach (EPT pointer) or all ones (VMCS link pointer).
pub unsafe fn write_host(field: HostField, value: u64) -> Result<(), HwError> {
    // SAFETY: the caller answers for the value.
    unsafe { vmwrite(field.0, value) }
}

/// Writes a guest-state or control field on the hot path, where the field is known to exist.
pub fn write_unchecked(field: Field, value: u64) {
    // SAFETY: VMWRITE changes only the current VMCS, which this CPU owns, and `field` is not
    // a host field.
    unsafe { asm!("vmwrite {}, {}", in(reg) field.0, in(reg) value, options(nostack)) };
}

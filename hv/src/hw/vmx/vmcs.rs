//! VMCS field encodings (Intel SDM Vol. 3D, Appendix B) and the VMREAD/VMWRITE accessors.

// A complete encoding table: not every field is used yet.
#![allow(missing_docs, dead_code)]

use crate::hw::HwError;
use core::arch::asm;

// 16-bit fields.
pub const VPID: u64 = 0x0000;
pub const GUEST_ES_SELECTOR: u64 = 0x0800;
pub const GUEST_CS_SELECTOR: u64 = 0x0802;
pub const GUEST_SS_SELECTOR: u64 = 0x0804;
pub const GUEST_DS_SELECTOR: u64 = 0x0806;
pub const GUEST_FS_SELECTOR: u64 = 0x0808;
pub const GUEST_GS_SELECTOR: u64 = 0x080a;
pub const GUEST_LDTR_SELECTOR: u64 = 0x080c;
pub const GUEST_TR_SELECTOR: u64 = 0x080e;
pub const HOST_ES_SELECTOR: u64 = 0x0c00;
pub const HOST_CS_SELECTOR: u64 = 0x0c02;
pub const HOST_SS_SELECTOR: u64 = 0x0c04;
pub const HOST_DS_SELECTOR: u64 = 0x0c06;
pub const HOST_FS_SELECTOR: u64 = 0x0c08;
pub const HOST_GS_SELECTOR: u64 = 0x0c0a;
pub const HOST_TR_SELECTOR: u64 = 0x0c0c;

// 64-bit fields.
pub const EPT_POINTER: u64 = 0x201a;
pub const GUEST_PHYSICAL_ADDRESS: u64 = 0x2400;
pub const VMCS_LINK_POINTER: u64 = 0x2800;
pub const GUEST_IA32_EFER: u64 = 0x2806;
pub const HOST_IA32_EFER: u64 = 0x2c02;

// 32-bit fields.
pub const PIN_BASED_CONTROLS: u64 = 0x4000;
pub const PRIMARY_PROCESSOR_CONTROLS: u64 = 0x4002;
pub const EXCEPTION_BITMAP: u64 = 0x4004;
pub const EXIT_CONTROLS: u64 = 0x400c;
pub const ENTRY_CONTROLS: u64 = 0x4012;
pub const ENTRY_INTERRUPTION_INFO: u64 = 0x4016;
pub const ENTRY_EXCEPTION_ERROR_CODE: u64 = 0x4018;
pub const ENTRY_INSTRUCTION_LENGTH: u64 = 0x401a;
pub const SECONDARY_PROCESSOR_CONTROLS: u64 = 0x401e;
pub const VM_INSTRUCTION_ERROR: u64 = 0x4400;
pub const EXIT_REASON: u64 = 0x4402;
pub const EXIT_INTERRUPTION_INFO: u64 = 0x4404;
pub const IDT_VECTORING_INFO: u64 = 0x4408;
pub const IDT_VECTORING_ERROR_CODE: u64 = 0x440a;
pub const EXIT_INSTRUCTION_LENGTH: u64 = 0x440c;
pub const EXIT_INSTRUCTION_INFO: u64 = 0x440e;
pub const GUEST_ES_LIMIT: u64 = 0x4800;
pub const GUEST_GDTR_LIMIT: u64 = 0x4810;
pub const GUEST_IDTR_LIMIT: u64 = 0x4812;
pub const GUEST_ES_ACCESS_RIGHTS: u64 = 0x4814;
pub const GUEST_INTERRUPTIBILITY: u64 = 0x4824;
pub const GUEST_ACTIVITY_STATE: u64 = 0x4826;
pub const GUEST_SYSENTER_CS: u64 = 0x482a;
pub const PREEMPTION_TIMER_VALUE: u64 = 0x482e;
pub const HOST_SYSENTER_CS: u64 = 0x4c00;

// Natural-width fields.
pub const CR0_GUEST_HOST_MASK: u64 = 0x6000;
pub const CR4_GUEST_HOST_MASK: u64 = 0x6002;
pub const CR0_READ_SHADOW: u64 = 0x6004;
pub const CR4_READ_SHADOW: u64 = 0x6006;
pub const EXIT_QUALIFICATION: u64 = 0x6400;
pub const GUEST_CR0: u64 = 0x6800;
pub const GUEST_CR3: u64 = 0x6802;
pub const GUEST_CR4: u64 = 0x6804;
pub const GUEST_ES_BASE: u64 = 0x6806;
pub const GUEST_FS_BASE: u64 = 0x680e;
pub const GUEST_GS_BASE: u64 = 0x6810;
pub const GUEST_GDTR_BASE: u64 = 0x6816;
pub const GUEST_IDTR_BASE: u64 = 0x6818;
pub const GUEST_DR7: u64 = 0x681a;
pub const GUEST_RSP: u64 = 0x681c;
pub const GUEST_RIP: u64 = 0x681e;
pub const GUEST_RFLAGS: u64 = 0x6820;
pub const GUEST_PENDING_DEBUG: u64 = 0x6822;
pub const GUEST_SYSENTER_ESP: u64 = 0x6824;
pub const GUEST_SYSENTER_EIP: u64 = 0x6826;
pub const HOST_CR0: u64 = 0x6c00;
pub const HOST_CR3: u64 = 0x6c02;
pub const HOST_CR4: u64 = 0x6c04;
pub const HOST_FS_BASE: u64 = 0x6c06;
pub const HOST_GS_BASE: u64 = 0x6c08;
pub const HOST_TR_BASE: u64 = 0x6c0a;
pub const HOST_GDTR_BASE: u64 = 0x6c0c;
pub const HOST_IDTR_BASE: u64 = 0x6c0e;
pub const HOST_SYSENTER_ESP: u64 = 0x6c10;
pub const HOST_SYSENTER_EIP: u64 = 0x6c12;
pub const HOST_RSP: u64 = 0x6c14;
pub const HOST_RIP: u64 = 0x6c16;

/// Segment field stride: ES, CS, SS, DS, FS, GS, LDTR, TR follow each other 2 apart.
pub const SEGMENT_STRIDE: u64 = 2;

/// Reads a field of the current VMCS.
pub fn read(field: u64) -> u64 {
    let value;
    // SAFETY: VMREAD only reads the current VMCS; with none loaded it fails without effect.
    unsafe { asm!("vmread {}, {}", out(reg) value, in(reg) field, options(nostack)) };
    value
}

/// Writes a field of the current VMCS, reporting VMfail.
pub fn write(field: u64, value: u64) -> Result<(), HwError> {
    let failed: u8;
    // SAFETY: VMWRITE changes only the current VMCS, which this CPU owns; host-state fields are
    // written only with the hypervisor's own values.
    unsafe {
        asm!("vmwrite {}, {}", "setna {}", in(reg) field, in(reg) value, out(reg_byte) failed, options(nostack))
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

/// Writes a field on the hot path, where the field is known to exist.
pub fn write_unchecked(field: u64, value: u64) {
    // SAFETY: as in `write`.
    unsafe { asm!("vmwrite {}, {}", in(reg) field, in(reg) value, options(nostack)) };
}

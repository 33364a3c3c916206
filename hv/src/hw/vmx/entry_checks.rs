//! Why a VM entry failed (Intel SDM Vol. 3C 26.3 guest-state checks, 31.4 VM-instruction
//! errors): what the hypervisor reports instead of a bare exit reason. Pure, host-tested.

use x86_64::registers::model_specific::EferFlags;

/// RFLAGS bits 3, 5 and 15: reserved, must be 0 (SDM Vol. 3C 26.3.1.4); `RFlags` does not
/// name reserved bits.
const RFLAGS_RESERVED_ZERO: u64 = (1 << 3) | (1 << 5) | (1 << 15);
/// RFLAGS bit 1: reserved, must be 1.
const RFLAGS_RESERVED_ONE: u64 = 1 << 1;

/// What VM entry checks of the guest state (SDM Vol. 3C 26.3.1).
pub(super) struct GuestStateCheck {
    pub(super) cr0: u64,
    pub(super) cr3: u64,
    pub(super) cr4: u64,
    pub(super) efer: u64,
    pub(super) rflags: u64,
    pub(super) cr0_fixed: (u64, u64),
    pub(super) cr4_fixed: (u64, u64),
    pub(super) max_phys_bits: u8,
    pub(super) qualification: u64,
}

/// The first guest-state check of VM entry (SDM Vol. 3C 26.3.1) that `s` fails.
pub(super) fn invalid_guest_state_reason(s: &GuestStateCheck) -> &'static str {
    match s.qualification {
        2 => return "a PDPTE (PAE paging) has a reserved bit set",
        3 => return "the NMI-blocking state does not allow the injected NMI",
        4 => return "the VMCS link pointer is invalid",
        _ => {}
    }
    if s.cr0 & s.cr0_fixed.0 != s.cr0_fixed.0 || s.cr0 & !s.cr0_fixed.1 != 0 {
        "guest CR0 does not respect IA32_VMX_CR0_FIXED0/1"
    } else if s.cr4 & s.cr4_fixed.0 != s.cr4_fixed.0 || s.cr4 & !s.cr4_fixed.1 != 0 {
        "guest CR4 does not respect IA32_VMX_CR4_FIXED0/1"
    } else if s.cr3 >> s.max_phys_bits.clamp(32, 52) != 0 {
        "guest CR3 has bits set above MAXPHYADDR"
    } else if !EferFlags::from_bits_retain(s.efer)
        .contains(EferFlags::LONG_MODE_ACTIVE | EferFlags::LONG_MODE_ENABLE)
    {
        "guest IA32_EFER.LMA/LME do not match the IA-32e mode guest entry control"
    } else if s.rflags >> 22 != 0
        || s.rflags & RFLAGS_RESERVED_ZERO != 0
        || s.rflags & RFLAGS_RESERVED_ONE == 0
    {
        "guest RFLAGS has a reserved bit wrong"
    } else {
        "a guest-state check the VMCS fields read here do not show (segment registers, descriptor tables, activity or interruptibility state)"
    }
}

/// The VM-instruction error of a VMLAUNCH/VMRESUME that failed (SDM Vol. 3C 31.4).
pub(super) fn vm_instruction_error(error: u64) -> &'static str {
    match error {
        4 => "VMLAUNCH with a VMCS that is not clear",
        5 => "VMRESUME with a VMCS that was not launched",
        7 => "VM entry with invalid control fields",
        8 => "VM entry with invalid host-state fields",
        12 => "VM entry with an invalid executive-VMCS pointer",
        13 => "VM entry with a non-launched executive VMCS",
        26 => "VM entry with events blocked by MOV SS",
        _ => "VM entry failed (VM-instruction error)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> GuestStateCheck {
        GuestStateCheck {
            cr0: 0x8001_0033 | 0x20,
            cr3: 0x4000,
            cr4: 0x2620,
            efer: 0x500,
            rflags: 0x2,
            cr0_fixed: (0x8000_0021, 0xffff_ffff),
            cr4_fixed: (0x2000, 0x3f_ffff),
            max_phys_bits: 40,
            qualification: 0,
        }
    }

    #[test]
    fn an_invalid_guest_state_entry_failure_names_the_field() {
        let cases = [
            (
                GuestStateCheck {
                    cr0: 0x33,
                    ..good()
                },
                "guest CR0 does not respect IA32_VMX_CR0_FIXED0/1",
            ),
            (
                GuestStateCheck {
                    cr4: 0x620,
                    ..good()
                },
                "guest CR4 does not respect IA32_VMX_CR4_FIXED0/1",
            ),
            (
                GuestStateCheck {
                    cr3: 1 << 45,
                    ..good()
                },
                "guest CR3 has bits set above MAXPHYADDR",
            ),
            (
                GuestStateCheck {
                    rflags: 0,
                    ..good()
                },
                "guest RFLAGS has a reserved bit wrong",
            ),
            (
                GuestStateCheck {
                    qualification: 4,
                    ..good()
                },
                "the VMCS link pointer is invalid",
            ),
        ];
        for (state, expected) in cases {
            assert_eq!(invalid_guest_state_reason(&state), expected);
        }
        assert_eq!(
            vm_instruction_error(7),
            "VM entry with invalid control fields"
        );
    }
}

//! Which VMRUN consistency check (AMD APM Vol. 2 15.5.1) a guest state fails: what the
//! hypervisor reports for VMEXIT_INVALID instead of a bare exit code. Pure, host-tested.

use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::model_specific::EferFlags;

const EVENT_VALID: u64 = 1 << 31;

/// The VMCB fields VMRUN checks.
pub(super) struct VmrunState {
    pub(super) efer: u64,
    pub(super) cr0: u64,
    pub(super) cr3: u64,
    pub(super) cr4: u64,
    pub(super) dr6: u64,
    pub(super) dr7: u64,
    pub(super) cs_attributes: u16,
    pub(super) asid: u32,
    pub(super) intercepts_vmrun: bool,
    pub(super) event_injection: u64,
}

/// The first VMRUN consistency check (APM Vol. 2 15.5.1) `s` fails.
pub(super) fn invalid_state_reason(s: &VmrunState) -> &'static str {
    // CR4 bits no AMD CPU defines (reserved: 15, 19, 24 and up, MBZ per APM 3.7): local,
    // since `Cr4Flags` also names Intel's bits 19 (Key Locker) and 24 (PKS).
    const CR4_RESERVED: u64 = !0x00f7_7fff;
    let efer = EferFlags::from_bits_retain(s.efer);
    let cr0 = Cr0Flags::from_bits_retain(s.cr0);
    let long_mode = efer.contains(EferFlags::LONG_MODE_ENABLE) && cr0.contains(Cr0Flags::PAGING);
    if !efer.contains(EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE) {
        "EFER.SVME is clear"
    } else if cr0.contains(Cr0Flags::NOT_WRITE_THROUGH) && !cr0.contains(Cr0Flags::CACHE_DISABLE) {
        "CR0.NW set with CR0.CD clear"
    } else if s.cr0 >> 32 != 0 {
        "CR0 bits 63:32 are not zero"
    } else if s.cr4 & CR4_RESERVED != 0 {
        "CR4 has a reserved bit set"
    } else if long_mode && s.cr3 >> 52 != 0 {
        "CR3 has bits set above the physical-address width"
    } else if s.dr6 >> 32 != 0 || s.dr7 >> 32 != 0 {
        "DR6 or DR7 bits 63:32 are not zero"
    } else if long_mode && s.cr4 & Cr4Flags::PHYSICAL_ADDRESS_EXTENSION.bits() == 0 {
        "EFER.LME and CR0.PG set with CR4.PAE clear"
    } else if long_mode && !cr0.contains(Cr0Flags::PROTECTED_MODE_ENABLE) {
        "EFER.LME and CR0.PG set with CR0.PE clear"
    } else if long_mode && s.cs_attributes & (1 << 9) != 0 && s.cs_attributes & (1 << 10) != 0 {
        "EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D all set"
    } else if !s.intercepts_vmrun {
        "the VMRUN intercept is clear"
    } else if s.asid == 0 {
        "guest ASID 0"
    } else if s.event_injection & EVENT_VALID != 0
        // APM Table 15-1 defines types 0, 2, 3 and 4 only.
        && matches!((s.event_injection >> 8) & 7, 1 | 5..=7)
    {
        "EVENTINJ has an illegal event type"
    } else {
        "a check the VMCB does not show (CR3 or CR4 bits the CPU does not support, MSR or I/O permission map addresses, or the guest PAT)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EFER_LME: u64 = EferFlags::LONG_MODE_ENABLE.bits();
    const EFER_LMA: u64 = EferFlags::LONG_MODE_ACTIVE.bits();
    const EFER_SVME: u64 = EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE.bits();

    fn good() -> VmrunState {
        VmrunState {
            efer: EFER_LME | EFER_LMA | EFER_SVME,
            cr0: 0x8001_0033,
            cr3: 0x4000,
            cr4: 0x620,
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            cs_attributes: 0x029b,
            asid: 1,
            intercepts_vmrun: true,
            event_injection: 0,
        }
    }

    #[test]
    fn vmexit_invalid_names_the_field_that_fails_its_check() {
        let cases = [
            (
                VmrunState {
                    cr4: 0x620 | 1 << 15,
                    ..good()
                },
                "CR4 has a reserved bit set",
            ),
            (
                VmrunState {
                    cr4: 0x600,
                    ..good()
                },
                "EFER.LME and CR0.PG set with CR4.PAE clear",
            ),
            (
                VmrunState {
                    cr0: 0xa001_0033,
                    ..good()
                },
                "CR0.NW set with CR0.CD clear",
            ),
            (
                VmrunState {
                    cr3: 1 << 60,
                    ..good()
                },
                "CR3 has bits set above the physical-address width",
            ),
            (
                VmrunState {
                    efer: EFER_LME | EFER_LMA,
                    ..good()
                },
                "EFER.SVME is clear",
            ),
            (VmrunState { asid: 0, ..good() }, "guest ASID 0"),
            // Type 6 (found by fuzz/entry_checks: it was reported as a check the VMCB does
            // not show).
            (
                VmrunState {
                    event_injection: EVENT_VALID | 6 << 8 | 14,
                    ..good()
                },
                "EVENTINJ has an illegal event type",
            ),
            (
                VmrunState {
                    intercepts_vmrun: false,
                    ..good()
                },
                "the VMRUN intercept is clear",
            ),
        ];
        for (state, expected) in cases {
            assert_eq!(invalid_state_reason(&state), expected);
        }
        assert!(invalid_state_reason(&good()).starts_with("a check the VMCB does not show"));
    }
}

//! The backends' entry-failure decoders (`hw/svm/vmrun_checks.rs`, `hw/vmx/entry_checks.rs`)
//! on any state. Checked after each input against the checks as the manuals list them (AMD APM
//! Vol. 2 15.5.1 "Canonicalization and Consistency Checks", Table 15-1 event types; Intel SDM
//! Vol. 3C 26.3.1 guest-state checks): a reason names a check the state really fails; the
//! catch-all reason only when none of the checks the decoder can see fails; the VM-instruction
//! errors the SDM defines (31.4) named, any other number answered.
#![no_main]

use lamina_fuzz::input::Input;
use lamina_fuzz::svm::{VmrunState, invalid_state_reason};
use lamina_fuzz::vmx::{GuestStateCheck, invalid_guest_state_reason, vm_instruction_error};

fn bits(input: &mut Input, typical: u64) -> u64 {
    match input.u8() % 4 {
        0 => input.u64(),
        1 => typical ^ (1 << input.below(64)),
        _ => typical,
    }
}

/// APM 15.5.1: each check VMRUN makes that a VMCB field shows, with whether `s` fails it.
fn svm_failures(s: &VmrunState) -> Vec<(&'static str, bool)> {
    let long = s.efer & (1 << 8) != 0 && s.cr0 & (1 << 31) != 0;
    let event_type = (s.event_injection >> 8) & 7;
    vec![
        ("EFER.SVME is clear", s.efer & (1 << 12) == 0),
        ("CR0.NW set with CR0.CD clear", s.cr0 & (3 << 29) == 1 << 29),
        ("CR0 bits 63:32 are not zero", s.cr0 >> 32 != 0),
        // MBZ in CR4 (APM 3.7): 15, 19, 24-63.
        (
            "CR4 has a reserved bit set",
            s.cr4 & (1 << 15 | 1 << 19) != 0 || s.cr4 >> 24 != 0,
        ),
        (
            "CR3 has bits set above the physical-address width",
            long && s.cr3 >> 52 != 0,
        ),
        (
            "DR6 or DR7 bits 63:32 are not zero",
            s.dr6 >> 32 != 0 || s.dr7 >> 32 != 0,
        ),
        (
            "EFER.LME and CR0.PG set with CR4.PAE clear",
            long && s.cr4 & (1 << 5) == 0,
        ),
        (
            "EFER.LME and CR0.PG set with CR0.PE clear",
            long && s.cr0 & 1 == 0,
        ),
        (
            "EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D all set",
            long && s.cr4 & (1 << 5) != 0 && s.cs_attributes & (3 << 9) == 3 << 9,
        ),
        ("the VMRUN intercept is clear", !s.intercepts_vmrun),
        ("guest ASID 0", s.asid == 0),
        // Table 15-1: types 0 (INTR), 2 (NMI), 3 (exception), 4 (INTn); the rest reserved.
        (
            "EVENTINJ has an illegal event type",
            s.event_injection & (1 << 31) != 0 && !matches!(event_type, 0 | 2 | 3 | 4),
        ),
    ]
}

/// SDM 26.3.1 (and the exit qualification of 27.8 for the rest).
fn vmx_failures(s: &GuestStateCheck) -> Vec<(&'static str, bool)> {
    let q = s.qualification;
    vec![
        ("a PDPTE (PAE paging) has a reserved bit set", q == 2),
        (
            "the NMI-blocking state does not allow the injected NMI",
            q == 3,
        ),
        ("the VMCS link pointer is invalid", q == 4),
        (
            "guest CR0 does not respect IA32_VMX_CR0_FIXED0/1",
            !s.cr0 & s.cr0_fixed.0 != 0 || s.cr0 & !s.cr0_fixed.1 != 0,
        ),
        (
            "guest CR4 does not respect IA32_VMX_CR4_FIXED0/1",
            !s.cr4 & s.cr4_fixed.0 != 0 || s.cr4 & !s.cr4_fixed.1 != 0,
        ),
        (
            "guest CR3 has bits set above MAXPHYADDR",
            s.cr3 >> u32::from(s.max_phys_bits.clamp(32, 52)) != 0,
        ),
        (
            "guest IA32_EFER.LMA/LME do not match the IA-32e mode guest entry control",
            s.efer & (1 << 10) == 0 || s.efer & (1 << 8) == 0,
        ),
        // RFLAGS: bits 63:22, 15, 5 and 3 reserved 0, bit 1 reserved 1.
        (
            "guest RFLAGS has a reserved bit wrong",
            s.rflags >> 22 != 0 || s.rflags & (1 << 15 | 1 << 5 | 1 << 3) != 0 || s.rflags & 2 == 0,
        ),
    ]
}

fn check(reason: &str, failures: &[(&'static str, bool)], catch_all: &str, what: &str) {
    if reason.starts_with(catch_all) {
        let failing: Vec<_> = failures.iter().filter(|(_, f)| *f).collect();
        assert!(failing.is_empty(), "{what}: catch-all although {failing:?}");
        return;
    }
    let Some(position) = failures.iter().position(|(name, _)| *name == reason) else {
        panic!("{what}: unknown reason {reason:?}");
    };
    assert!(
        failures[position].1,
        "{what}: blames a check that passes: {reason}"
    );
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let svm = VmrunState {
        efer: bits(&mut input, 0x1d00),
        cr0: bits(&mut input, 0x8001_0033),
        cr3: bits(&mut input, 0x4000),
        cr4: bits(&mut input, 0x620),
        dr6: bits(&mut input, 0xffff_0ff0),
        dr7: bits(&mut input, 0x400),
        cs_attributes: bits(&mut input, 0xa9b) as u16,
        asid: if input.u8() % 8 == 0 { 0 } else { 1 },
        intercepts_vmrun: input.u8() % 8 != 0,
        event_injection: if input.bool() { input.u64() } else { 0 },
    };
    let reason = invalid_state_reason(&svm);
    check(
        reason,
        &svm_failures(&svm),
        "a check the VMCB does not show",
        &format!("{svm:x?}"),
    );
    let vmx = GuestStateCheck {
        cr0: bits(&mut input, 0x8001_0033),
        cr3: bits(&mut input, 0x4000),
        cr4: bits(&mut input, 0x2620),
        efer: bits(&mut input, 0xd00),
        rflags: bits(&mut input, 2),
        cr0_fixed: (bits(&mut input, 0x8000_0021), bits(&mut input, 0xffff_ffff)),
        cr4_fixed: (bits(&mut input, 0x2000), bits(&mut input, 0x3f_ffff)),
        max_phys_bits: input.u8(),
        qualification: if input.bool() {
            u64::from(input.below(6))
        } else {
            input.u64()
        },
    };
    let reason = invalid_guest_state_reason(&vmx);
    check(
        reason,
        &vmx_failures(&vmx),
        "a guest-state check the VMCS fields read here do not show",
        &format!("{vmx:x?}"),
    );
    let error = if input.bool() {
        u64::from(input.below(32))
    } else {
        input.u64()
    };
    let named = vm_instruction_error(error);
    assert!(!named.is_empty());
    assert_eq!(
        named == "VM entry failed (VM-instruction error)",
        ![4, 5, 7, 8, 12, 13, 26].contains(&error),
        "VM-instruction error {error}"
    );
});

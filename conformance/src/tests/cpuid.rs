//! Tests of CPUID discovery (docs/abi.md section 5): the signature, version and feature
//! leaves, and the timing leaf.

use lamina_abi::abi_version;
use lamina_abi::cpuid::{
    LEAF_MAX, LEAF_SIGNATURE, LEAF_TIMING, LEAF_VERSION, features, signature_regs,
};
use lamina_guest_sdk::cpuid::{self, cpuid};

use crate::framework::{Hex, check, check_eq};
use crate::x86::msr;

conformance_test! {
    title: "CPUID reports the hypervisor bit, the Lamina signature, version and features",
    section: "5 CPUID discovery",
    expect: Success,
}
pub(super) fn cpuid_signature_and_version() {
    check_eq!(
        "CPUID.1:ECX bit 31 (hypervisor present)",
        true,
        cpuid::hypervisor_bit()
    );

    let signature = cpuid(LEAF_SIGNATURE, 0);
    check_eq!(
        format_args!("CPUID {LEAF_SIGNATURE:#x} EAX (highest leaf)"),
        Hex(LEAF_MAX),
        Hex(signature.eax)
    );
    let [ebx, ecx, edx] = signature_regs();
    check_eq!(
        format_args!("CPUID {LEAF_SIGNATURE:#x} EBX"),
        Hex(ebx),
        Hex(signature.ebx)
    );
    check_eq!(
        format_args!("CPUID {LEAF_SIGNATURE:#x} ECX"),
        Hex(ecx),
        Hex(signature.ecx)
    );
    check_eq!(
        format_args!("CPUID {LEAF_SIGNATURE:#x} EDX"),
        Hex(edx),
        Hex(signature.edx)
    );

    let version = cpuid(LEAF_VERSION, 0);
    check_eq!(
        format_args!("CPUID {LEAF_VERSION:#x} EAX (ABI version)"),
        Hex(abi_version()),
        Hex(version.eax)
    );
    check_eq!(
        format_args!("CPUID {LEAF_VERSION:#x} EBX (features)"),
        Hex(features::ALL),
        Hex(version.ebx)
    );
    // ABI 1.1 added stats_op (docs/abi.md 15), announced by bit 11.
    check_eq!(
        format_args!("CPUID {LEAF_VERSION:#x} EBX bit 11 (EXIT_STATS)"),
        Hex(features::EXIT_STATS),
        Hex(version.ebx & features::EXIT_STATS)
    );
    // ABI 1.2 added inter-domain event channels (docs/abi.md 8.9), announced by bit 12.
    check_eq!(
        format_args!("CPUID {LEAF_VERSION:#x} EBX bit 12 (INTERDOMAIN_EVENTS)"),
        Hex(features::INTERDOMAIN_EVENTS),
        Hex(version.ebx & features::INTERDOMAIN_EVENTS)
    );
    check!(
        version.eax >> 16 == 1 && version.eax & 0xffff >= 2,
        "CPUID {LEAF_VERSION:#x} EAX {:#x}: expected ABI 1.2 or a later 1.x",
        version.eax
    );
    check_eq!(
        format_args!("CPUID {LEAF_VERSION:#x} ECX (reserved)"),
        Hex(0),
        Hex(version.ecx)
    );
    check_eq!(
        format_args!("CPUID {LEAF_VERSION:#x} EDX (reserved)"),
        Hex(0),
        Hex(version.edx)
    );

    // The SDK's view agrees.
    check_eq!("lamina_present()", true, cpuid::lamina_present());
    check_eq!(
        "lamina_version()",
        Some(abi_version()),
        cpuid::lamina_version()
    );
}

conformance_test! {
    title: "CPUID 0x40000010 reports the TSC kHz of StartInfo and a 1 GHz APIC timer",
    section: "5 CPUID discovery",
    expect: Success,
}
pub(super) fn cpuid_timing_leaf() {
    let timing = cpuid(LEAF_TIMING, 0);
    let tsc_khz = lamina_guest_sdk::start_info().tsc_khz;
    check_eq!(
        format_args!("CPUID {LEAF_TIMING:#x} EAX (TSC kHz) against StartInfo.tsc_khz"),
        tsc_khz,
        u64::from(timing.eax)
    );
    check!(timing.eax != 0, "CPUID {LEAF_TIMING:#x} EAX (TSC kHz) is 0");
    check_eq!(
        format_args!("CPUID {LEAF_TIMING:#x} EBX (APIC timer kHz: 1 GHz)"),
        1_000_000,
        timing.ebx
    );
    check_eq!(
        format_args!("CPUID {LEAF_TIMING:#x} ECX, EDX (reserved)"),
        (0, 0),
        (timing.ecx, timing.edx)
    );
}

conformance_test! {
    title: "the leaves of 0x40000000-0x4fffffff Lamina does not define read all zero",
    section: "5 CPUID discovery",
    expect: Success,
}
pub(super) fn cpuid_unused_hv_leaves_zero() {
    // Leaves of the hypervisor range that Lamina does not define.
    for leaf in [
        0x4000_0002,
        0x4000_0003,
        0x4000_000f,
        0x4000_0011,
        0x4000_0100,
        0x4fff_ffff,
    ] {
        let regs = cpuid(leaf, 0);
        check_eq!(
            format_args!("CPUID {leaf:#x} EAX, EBX, ECX, EDX"),
            (0, 0, 0, 0),
            (regs.eax, regs.ebx, regs.ecx, regs.edx)
        );
    }
}

conformance_test! {
    title: "CPUID reports no VMX, SVM or MONITOR/MWAIT to the guest",
    section: "5 CPUID discovery",
    expect: Success,
}
pub(super) fn cpuid_hides_vmx_and_svm() {
    let leaf1 = cpuid(1, 0);
    check_eq!("CPUID.1:ECX bit 5 (VMX)", 0, leaf1.ecx >> 5 & 1);
    check_eq!("CPUID.1:ECX bit 3 (MONITOR/MWAIT)", 0, leaf1.ecx >> 3 & 1);
    let extended = cpuid(0x8000_0001, 0);
    check_eq!("CPUID.80000001h:ECX bit 2 (SVM)", 0, extended.ecx >> 2 & 1);
    let svm = cpuid(0x8000_000a, 0);
    check_eq!(
        "CPUID 0x8000000a (SVM features) EAX, EBX, ECX, EDX",
        (0, 0, 0, 0),
        (svm.eax, svm.ebx, svm.ecx, svm.edx)
    );
}

conformance_test! {
    title: "CPUID offers none of the speculation-control MSRs (leaf 7 EDX 31:26, leaf 0x80000008 EBX IBPB/IBRS/STIBP/SSBD), and RDMSR/WRMSR of SPEC_CTRL, PRED_CMD, ARCH_CAPABILITIES, FLUSH_CMD raise #GP",
    section: "7.3 MSRs",
    expect: Success,
}
pub(super) fn speculation_msrs_not_offered() {
    // 7.3: CPUID offers none of the speculation-control MSRs, and each raises #GP.
    let leaf0 = cpuid(0, 0);
    if leaf0.eax >= 7 {
        let leaf7 = cpuid(7, 0);
        check_eq!(
            "CPUID.7.0:EDX bits 31:26 (IBRS/IBPB, STIBP, L1D_FLUSH, ARCH_CAPABILITIES, CORE_CAPABILITIES, SSBD)",
            Hex(0),
            Hex(u64::from(leaf7.edx >> 26))
        );
    }
    if cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        let ext = cpuid(0x8000_0008, 0);
        check_eq!(
            "CPUID.80000008h:EBX bits 12, 14-18, 24-26 (IBPB, IBRS, STIBP, SSBD...)",
            Hex(0),
            Hex(u64::from(
                ext.ebx & ((1 << 12) | (0x7f << 14) | (0x7 << 24))
            ))
        );
    }
    for (msr, name) in [
        (0x48, "IA32_SPEC_CTRL"),
        (0x49, "IA32_PRED_CMD"),
        (0x10a, "IA32_ARCH_CAPABILITIES"),
        (0x10b, "IA32_FLUSH_CMD"),
    ] {
        check!(
            msr::try_read(msr).is_err(),
            "RDMSR {msr:#x} ({name}) did not raise #GP"
        );
        // SAFETY: the write must be refused; were it accepted, bit 0 of these MSRs only
        // restricts speculation, flushes a predictor or a cache.
        let written = unsafe { msr::try_write(msr, 1) };
        check!(
            written.is_err(),
            "WRMSR {msr:#x} ({name}) did not raise #GP"
        );
    }
}

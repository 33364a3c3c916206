//! Tests of faults (docs/abi.md 7.3 and 7.5): #GP for MSRs the hypervisor does not
//! implement, and a triple fault that stops the domain.

use core::arch::asm;

use super::common::check_gp0;
use crate::console::println;

use crate::framework::{Hex, check_eq};
use crate::x86::idt::{self, GENERAL_PROTECTION, TrapRecord};

/// Neither real nor paravirtual on Lamina: made up, Hyper-V's guest OS ID, KVM's wall clock.
const UNIMPLEMENTED_MSRS: [u32; 3] = [0x1234_5678, 0x4000_0000, 0x4b56_4d00];
/// RDMSR (0F 32) and WRMSR (0F 30) are two bytes long.
const MSR_INSN_LEN: u8 = 2;

/// Checks that `taken` is #GP(0) at `rip`.
fn check_general_protection(what: core::fmt::Arguments<'_>, taken: Option<TrapRecord>, rip: u64) {
    let Some(record) = taken else {
        crate::framework::fail(format_args!(
            "{what}: expected #GP, but no exception was raised"
        ));
        return;
    };
    check_gp0(what, &record);
    check_eq!(
        format_args!("{what}: RIP of the fault (the instruction itself)"),
        Hex(rip),
        Hex(record.rip)
    );
}

conformance_test! {
    title: "RDMSR and WRMSR of an unimplemented MSR raise #GP(0) in the guest",
    section: "7.3 MSRs",
    expect: Success,
}
pub(super) fn unknown_msr_injects_gp() {
    for msr in UNIMPLEMENTED_MSRS {
        let mut rip = 0;
        let taken = idt::expect_trap(GENERAL_PROTECTION, MSR_INSN_LEN, || {
            // SAFETY: the MSR does not exist, so RDMSR faults and the armed handler resumes
            // after it; should it not fault, it only reads.
            unsafe {
                asm!(
                    "lea {rip}, [rip + 2f]",
                    "2:",
                    "rdmsr",
                    rip = out(reg) rip,
                    in("ecx") msr,
                    out("eax") _,
                    out("edx") _,
                    options(nostack),
                )
            };
        });
        check_general_protection(format_args!("RDMSR {msr:#x}"), taken, rip);

        let taken = idt::expect_trap(GENERAL_PROTECTION, MSR_INSN_LEN, || {
            // SAFETY: as above; should the write be accepted, it writes an MSR no one uses.
            unsafe {
                asm!(
                    "lea {rip}, [rip + 2f]",
                    "2:",
                    "wrmsr",
                    rip = out(reg) rip,
                    in("ecx") msr,
                    in("eax") 0,
                    in("edx") 0,
                    options(nostack),
                )
            };
        });
        check_general_protection(format_args!("WRMSR {msr:#x}"), taken, rip);
    }
}

conformance_test! {
    title: "an exception without an IDT triple-faults and the hypervisor stops the domain",
    section: "7.5 Triple faults",
    expect: StoppedByHv("triple fault"),
}
pub(super) fn triple_fault() {
    println!("triple_fault: loading an IDT of limit 0, then executing UD2");
    idt::load_empty();
    // SAFETY: the point of the test: #UD cannot be delivered, nor #GP, nor #DF, and the
    // hypervisor must stop the domain. Should it return, `main` reports the failure.
    unsafe { asm!("ud2", options(nomem, nostack)) };
}

conformance_test! {
    title: "HLT with nothing that could ever wake the vCPU stops the domain instead of spinning",
    section: "7.2 HLT",
    expect: StoppedByHv("HLT with nothing that can ever wake the vCPU"),
}
/// HLT with interrupts off and no event source: the domain can never wake, and the
/// hypervisor must say so rather than spin. Should it return, `main` reports the failure.
pub(super) fn hlt_without_wake_source_stopped() {
    println!("hlt_without_wake_source_stopped: executing HLT with nothing to wake it");
    // SAFETY: the point of the test: the hypervisor stops the domain here.
    unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
}

conformance_test! {
    title: "a write to a guest-physical address outside RAM stops the domain",
    section: "4.2 Guest-physical layout",
    expect: StoppedByHv("outside its memory"),
}
/// Maps the 2 MiB of guest-physical space just above RAM into the boot page tables and writes
/// there: no guest page fault, so the access reaches the nested page tables, which map only
/// RAM, and the hypervisor must stop the domain.
pub(super) fn access_outside_ram_stopped() {
    let start = lamina_guest_sdk::start_info();
    let above_ram = start.mem_bytes;
    // The boot PD sits two pages above the PML4 (docs/abi.md 4.2).
    let pd = (lamina_abi::layout::BOOT_PML4_GPA + 0x2000) as *mut u64;
    let index = (above_ram >> 21) as usize;
    println!("access_outside_ram_stopped: writing to guest-physical {above_ram:#x}");
    // SAFETY: RAM is identity-mapped, so the PD is writable at its guest-physical address; the
    // entry added maps the 2 MiB above RAM (present, writable, large) and nothing else uses it.
    unsafe {
        pd.add(index).write_volatile(above_ram | 0x83);
        asm!("invlpg [{}]", in(reg) above_ram, options(nostack));
        (above_ram as *mut u64).write_volatile(0x5a5a);
    }
}

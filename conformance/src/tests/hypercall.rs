//! Tests of the calling convention itself (docs/abi.md section 2): both instructions, the
//! registers a call may change, calls from CPL 3, unknown numbers.

use lamina_abi::cpuid::LEAF_VERSION;
use lamina_abi::{Errno, Hypercall, abi_version};
use lamina_guest_sdk::cpuid::cpuid;
use lamina_guest_sdk::hypercall::{self, HypercallInsn, hypercall0_with};
use lamina_guest_sdk::println;

use crate::framework::{Hex, Status, check_eq};
use crate::x86::probe::{self, NAMES, RAX, RDI, RDX, RSI, RSP, Registers};
use crate::x86::user;

/// The version hypercall through `insn`, three times (a hypervisor that does not move RIP past
/// the instruction would loop on the first).
fn version_via(insn: HypercallInsn) {
    let cpuid_version = cpuid(LEAF_VERSION, 0).eax;
    for attempt in 1..=3 {
        // SAFETY: the version call takes no arguments and touches no memory.
        let rax = unsafe { hypercall0_with(insn, Hypercall::Version as u64) };
        check_eq!(
            format_args!("version via {} (call {attempt})", insn.name()),
            Status(u64::from(abi_version())),
            Status(rax)
        );
        check_eq!(
            format_args!(
                "version via {} (call {attempt}) against CPUID {LEAF_VERSION:#x} EAX",
                insn.name()
            ),
            Hex(u64::from(cpuid_version)),
            Hex(rax)
        );
    }
}

pub(super) fn version_via_vmcall() {
    version_via(HypercallInsn::Vmcall);
}

pub(super) fn version_via_vmmcall() {
    version_via(HypercallInsn::Vmmcall);
}

/// Runs hypercall `what` through the register probe with patterned registers, `arguments`
/// set, and checks RAX against `expected_rax` and every other register against its input.
fn check_registers_across(
    insn: HypercallInsn,
    what: &str,
    arguments: &[(usize, u64)],
    expected_rax: Status,
) {
    let mut before: Registers = probe::patterned();
    for &(register, value) in arguments {
        before[register] = value;
    }
    let mut after = before;
    probe::hypercall_with_registers(insn, &mut after);
    let via = insn.name();
    check_eq!(
        format_args!("{what} via {via}: RAX"),
        expected_rax,
        Status(after[RAX])
    );
    check_eq!(
        format_args!("{what} via {via}: change of RSP"),
        0,
        after[RSP] as i64
    );
    for register in (0..before.len()).filter(|&r| r != RAX && r != RSP) {
        check_eq!(
            format_args!("{what} via {via}: {}", NAMES[register]),
            Hex(before[register]),
            Hex(after[register])
        );
    }
}

pub(super) fn hypercall_preserves_registers() {
    let line = b"hypercall_preserves_registers: a console write through the register probe\n";
    for insn in HypercallInsn::ALL {
        check_registers_across(
            insn,
            "version",
            &[(RAX, Hypercall::Version as u64)],
            Status(u64::from(abi_version())),
        );
        check_registers_across(
            insn,
            "console_io write",
            &[
                (RAX, Hypercall::ConsoleIo as u64),
                (RDI, lamina_abi::console::ConsoleOp::Write as u64),
                (RSI, hypercall::gpa_of(line)),
                (RDX, line.len() as u64),
            ],
            Status(line.len() as u64),
        );
        check_registers_across(
            insn,
            "sched_op yield",
            &[
                (RAX, Hypercall::SchedOp as u64),
                (RDI, lamina_abi::sched::SchedOp::Yield as u64),
            ],
            Status(0),
        );
    }
}

pub(super) fn unknown_hypercall_enosys() {
    // 3 is the first unassigned number; 1 << 32 would be `version` to a hypervisor that looks
    // at EAX only.
    const UNKNOWN: [u64; 5] = [3, 0x1000, 1 << 32, 1 << 63, u64::MAX];
    for insn in HypercallInsn::ALL {
        for number in UNKNOWN {
            println!(
                "unknown_hypercall_enosys: hypercall {number:#x} via {}",
                insn.name()
            );
            check_registers_across(
                insn,
                "unknown hypercall",
                &[(RAX, number)],
                Status::err(Errno::ENOSYS),
            );
        }
    }
    // The domain carries on: a known call still works.
    check_eq!(
        "version after the unknown calls",
        Ok(u64::from(abi_version())),
        hypercall::version()
    );
}

pub(super) fn hypercall_from_cpl3_eperm() {
    for insn in HypercallInsn::ALL {
        let from_user = user::version_hypercall_at_cpl3(insn);
        check_eq!(
            format_args!("CPL while executing {} (CS & 3)", insn.name()),
            3,
            from_user.cs & 3
        );
        check_eq!(
            format_args!("version via {} at CPL 3", insn.name()),
            Status::err(Errno::EPERM),
            Status(from_user.rax)
        );
    }
    check_eq!(
        "version at CPL 0 afterwards",
        Ok(u64::from(abi_version())),
        hypercall::version()
    );
}

//! Tests of the calling convention itself (docs/abi.md section 2): both instructions, the
//! registers a call may change (for the calls of ABI 0.1, 1.0 and 1.1), calls from CPL 3,
//! unknown numbers.

use crate::console::println;
use lamina_abi::cpuid::LEAF_VERSION;
use lamina_abi::{Errno, Hypercall, abi_version};
use lamina_guest_sdk::cpuid::cpuid;
use lamina_guest_sdk::hypercall::{self, HypercallInsn, hypercall0_with};

use lamina_abi::domctl::{DomctlOp, PhysInfo};
use lamina_abi::event_channel::{DOMID_SELF, EventChannelOp};
use lamina_abi::grant_table::GrantTableOp;
use lamina_abi::memory::MemoryOp;
use lamina_abi::multicall::MulticallEntry;
use lamina_abi::sched::{SchedOp, ShutdownReason};
use lamina_abi::stats::{ExitCounters, StatsOp};
use lamina_abi::vcpu::VcpuOp;
use lamina_guest_sdk::start_info;

use crate::framework::{Hex, Status, check, check_eq, expect_ok};
use crate::x86::probe::{self, NAMES, R10, RAX, RDI, RDX, RSI, RSP, Registers};
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

conformance_test! {
    title: "VMCALL reaches the hypervisor: version returns the ABI version, as CPUID does",
    section: "2.1 Hypercall instructions",
    expect: Success,
}
pub(super) fn version_via_vmcall() {
    version_via(HypercallInsn::Vmcall);
}

conformance_test! {
    title: "VMMCALL reaches the hypervisor: version returns the ABI version, as CPUID does",
    section: "2.1 Hypercall instructions",
    expect: Success,
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

conformance_test! {
    title: "version, console_io and sched_op change RAX only, with either instruction",
    section: "2.2 Registers",
    expect: Success,
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

conformance_test! {
    title: "unknown hypercall numbers return -ENOSYS and preserve every other register",
    section: "2.4 Errors",
    expect: Success,
}
pub(super) fn unknown_hypercall_enosys() {
    // 8 is the first unassigned number (ABI 1.1); 1 << 32 would be `version` to a hypervisor
    // that looks at EAX only.
    const UNKNOWN: [u64; 5] = [
        Hypercall::ALL.len() as u64,
        0x1000,
        1 << 32,
        1 << 63,
        u64::MAX,
    ];
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

conformance_test! {
    title: "a hypercall from CPL 3 returns -EPERM, with either instruction",
    section: "2.3 Privilege",
    expect: Success,
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

conformance_test! {
    title: "event_channel_op, vcpu_op, memory_op, multicall, poll (R10) and stats_op (R10) change RAX only, with either instruction",
    section: "2.2 Registers",
    expect: Success,
}
pub(super) fn v1_calls_preserve_registers() {
    let idle_ports = [0u32];
    let mut counters = ExitCounters::default();
    let counters_gpa = core::ptr::from_mut(&mut counters) as u64;
    let console_status = expect_ok("Status(1)", crate::hv::port_status(1));
    for insn in HypercallInsn::ALL {
        if let Some(packed) = console_status {
            check_registers_across(
                insn,
                "event_channel_op Status(1)",
                &[
                    (RAX, Hypercall::EventChannelOp as u64),
                    (RDI, EventChannelOp::Status as u64),
                    (RSI, 1),
                ],
                Status(packed),
            );
        }
        check_registers_across(
            insn,
            "event_channel_op Send(5000), refused",
            &[
                (RAX, Hypercall::EventChannelOp as u64),
                (RDI, EventChannelOp::Send as u64),
                (RSI, 5000),
            ],
            Status::err(Errno::EINVAL),
        );
        check_registers_across(
            insn,
            "vcpu_op SetSingleshotTimer(0, 0)",
            &[
                (RAX, Hypercall::VcpuOp as u64),
                (RDI, VcpuOp::SetSingleshotTimer as u64),
                (RSI, 0),
                (RDX, 0),
            ],
            Status(0),
        );
        check_registers_across(
            insn,
            "memory_op CurrentReservation",
            &[
                (RAX, Hypercall::MemoryOp as u64),
                (RDI, MemoryOp::CurrentReservation as u64),
            ],
            Status(start_info().mem_bytes),
        );
        check_registers_across(
            insn,
            "multicall of 0 entries",
            &[(RAX, Hypercall::Multicall as u64), (RDI, 0), (RSI, 0)],
            Status(0),
        );
        // R10 carries the deadline: 1 ns, long past.
        check_registers_across(
            insn,
            "sched_op Poll([0], deadline 1 ns)",
            &[
                (RAX, Hypercall::SchedOp as u64),
                (RDI, SchedOp::Poll as u64),
                (RSI, idle_ports.as_ptr() as u64),
                (RDX, 1),
                (R10, 1),
            ],
            Status::err(Errno::ETIMEDOUT),
        );
        // R10 carries the buffer, which the hypervisor writes.
        check_registers_across(
            insn,
            "stats_op ExitCounters(DOMID_SELF, vCPU 0)",
            &[
                (RAX, Hypercall::StatsOp as u64),
                (RDI, StatsOp::ExitCounters as u64),
                (RSI, DOMID_SELF),
                (RDX, 0),
                (R10, counters_gpa),
            ],
            Status(0),
        );
    }
    // SAFETY: ours; the hypervisor wrote it during the calls above.
    let total = unsafe { core::ptr::read_volatile(&raw const counters.total) };
    check!(
        total != 0,
        "stats_op through the register probe wrote no counters"
    );
}

/// A hypercall made at CPL 3, refused, with what it would have done at CPL 0.
struct UserCall {
    what: &'static str,
    number: u64,
    arguments: [u64; 5],
}

conformance_test! {
    title: "every hypercall from CPL 3 (shutdown, block, multicall and stats_op included) returns -EPERM and has no effect",
    section: "2.3 Privilege",
    expect: Success,
}
pub(super) fn all_hypercalls_cpl3_eperm() {
    const FIRST_UNDEFINED: u64 = Hypercall::ALL.len() as u64;
    let line = b"FAIL: a console write from CPL 3 was printed\n";
    let untouched = 0x5a5a_5a5a_5a5a_5a5a;
    let mut counters = ExitCounters {
        total: untouched,
        ..ExitCounters::default()
    };
    let mut phys = PhysInfo {
        total_bytes: untouched,
        ..PhysInfo::default()
    };
    let mut batch = [MulticallEntry {
        op: Hypercall::EventChannelOp as u64,
        args: [EventChannelOp::AllocUnbound as u64, DOMID_SELF, 0, 0, 0],
        result: 0x5a5a,
    }];
    let calls = [
        UserCall {
            what: "version",
            number: Hypercall::Version as u64,
            arguments: [0; 5],
        },
        UserCall {
            what: "console_io write",
            number: Hypercall::ConsoleIo as u64,
            arguments: [0, hypercall::gpa_of(line), line.len() as u64, 0, 0],
        },
        UserCall {
            what: "sched_op yield",
            number: Hypercall::SchedOp as u64,
            arguments: [SchedOp::Yield as u64, 0, 0, 0, 0],
        },
        UserCall {
            what: "sched_op block",
            number: Hypercall::SchedOp as u64,
            arguments: [SchedOp::Block as u64, 0, 0, 0, 0],
        },
        UserCall {
            what: "sched_op shutdown(poweroff)",
            number: Hypercall::SchedOp as u64,
            arguments: [
                SchedOp::Shutdown as u64,
                ShutdownReason::Poweroff as u64,
                0,
                0,
                0,
            ],
        },
        UserCall {
            what: "event_channel_op AllocUnbound",
            number: Hypercall::EventChannelOp as u64,
            arguments: [EventChannelOp::AllocUnbound as u64, DOMID_SELF, 0, 0, 0],
        },
        UserCall {
            what: "vcpu_op SetPeriodicTimer",
            number: Hypercall::VcpuOp as u64,
            arguments: [VcpuOp::SetPeriodicTimer as u64, 0, 1_000_000, 0, 0],
        },
        UserCall {
            what: "memory_op CurrentReservation",
            number: Hypercall::MemoryOp as u64,
            arguments: [MemoryOp::CurrentReservation as u64, 0, 0, 0, 0],
        },
        UserCall {
            what: "multicall of an AllocUnbound",
            number: Hypercall::Multicall as u64,
            arguments: [batch.as_mut_ptr() as u64, 1, 0, 0, 0],
        },
        UserCall {
            what: "stats_op ExitCounters(DOMID_SELF, vCPU 0)",
            number: Hypercall::StatsOp as u64,
            arguments: [
                StatsOp::ExitCounters as u64,
                DOMID_SELF,
                0,
                core::ptr::from_mut(&mut counters) as u64,
                0,
            ],
        },
        UserCall {
            what: "grant_table_op EndAccess(0)",
            number: Hypercall::GrantTableOp as u64,
            arguments: [GrantTableOp::EndAccess as u64, 0, 0, 0, 0],
        },
        UserCall {
            what: "domctl_op PhysInfo",
            number: Hypercall::DomctlOp as u64,
            arguments: [
                DomctlOp::PhysInfo as u64,
                core::ptr::from_mut(&mut phys) as u64,
                0,
                0,
                0,
            ],
        },
        UserCall {
            what: "the first undefined hypercall number",
            number: FIRST_UNDEFINED,
            arguments: [0; 5],
        },
    ];
    // Every defined hypercall has a call in the list.
    for defined in Hypercall::ALL {
        check!(
            calls.iter().any(|call| call.number == defined as u64),
            "all_hypercalls_cpl3_eperm makes no {} call: add one",
            defined.name()
        );
    }
    for insn in HypercallInsn::ALL {
        for call in &calls {
            let from_user = user::hypercall_at_cpl3(insn, call.number, call.arguments);
            check_eq!(
                format_args!(
                    "CPL while executing {} via {} (CS & 3)",
                    call.what,
                    insn.name()
                ),
                3,
                from_user.cs & 3
            );
            check_eq!(
                format_args!("{} via {} at CPL 3", call.what, insn.name()),
                Status::err(Errno::EPERM),
                Status(from_user.rax)
            );
        }
    }
    // None of them had an effect: no port allocated, the batch's entry not run.
    check_eq!(
        "AllocUnbound at CPL 0 afterwards (the first free port)",
        Status(2),
        crate::hv::alloc_unbound(DOMID_SELF)
    );
    // SAFETY: the array is ours; the hypervisor wrote it only if it ran the batch.
    let result = unsafe { core::ptr::read_volatile(&raw const batch[0].result) };
    check!(
        result == 0x5a5a,
        "the multicall from CPL 3 ran its entry (result {result:#x})"
    );
    // SAFETY: ours; the hypervisor wrote it only if it ran the stats_op.
    let total = unsafe { core::ptr::read_volatile(&raw const counters.total) };
    check!(
        total == untouched,
        "the stats_op from CPL 3 wrote the counters (total {total:#x})"
    );
    // SAFETY: ours; the hypervisor wrote it only if it ran the domctl_op.
    let total = unsafe { core::ptr::read_volatile(&raw const phys.total_bytes) };
    check!(
        total == untouched,
        "the domctl_op from CPL 3 wrote its PhysInfo (total_bytes {total:#x})"
    );
}

//! Tests of exit accounting (`stats_op`, docs/abi.md 15): reading the own counters, exact
//! counting by kind and by hypercall number, the call's own exit, `handling_tsc`, every
//! error in the order the section lists them, and reading another domain with and without
//! privilege.
//!
//! Counting is checked on windows between two reads of the own counters: the difference is
//! what the code in between caused plus the closing read's own exit (the copy is taken after
//! that exit was counted). Nothing in a window prints (a line is a hypercall too). Exits by
//! host interrupts (kind INTERRUPT) are the one thing a guest cannot prevent: a window that
//! caught some is retried for a clean sample, and the exits are allowed for on top of the
//! exact counts should every attempt catch one.

use core::arch::asm;

use lamina_abi::cpuid::{LEAF_SIGNATURE, LEAF_VERSION, features};
use lamina_abi::event_channel::DOMID_SELF;
use lamina_abi::start_info::START_FLAG_PRIVILEGED;
use lamina_abi::stats::{ExitCounters, HYPERCALL_SLOTS, exit_kind};
use lamina_abi::{Errno, Hypercall};
use lamina_guest_sdk::cpuid::cpuid;
use lamina_guest_sdk::hypercall::{self, HypercallInsn, hypercall0_with};
use lamina_guest_sdk::port::{inb, outb};
use lamina_guest_sdk::start::TOP_OF_RAM_SCRATCH;
use lamina_guest_sdk::start_info;
use lamina_guest_sdk::stats::{UNDEFINED_HYPERCALL_SLOT, delta, kind_name, sum_of_kinds};

use super::common::bad_vcpus;
use crate::console::println;
use crate::framework::{self, Hex, Status, check, check_eq, expect_ok};
use crate::hv;
use crate::x86::idt;
use crate::x86::{RacyCell, apic, msr, rdtsc, user};

/// The `by_hypercall` slot of `stats_op` itself.
const STATS_SLOT: usize = Hypercall::StatsOp as usize;
/// The first hypercall number ABI 1.1 does not define.
const FIRST_UNDEFINED: u64 = Hypercall::ALL.len() as u64;
/// `stats_op` ExitCounters.
const OP_EXIT_COUNTERS: u64 = lamina_abi::stats::StatsOp::ExitCounters as u64;
/// Size of `ExitCounters`, the buffer `stats_op` writes.
const COUNTERS_BYTES: usize = size_of::<ExitCounters>();
/// A value no counter reaches: marks what the hypervisor did not write.
const SENTINEL: u64 = 0xa5a5_a5a5_a5a5_a5a5;
/// Windows tried for a sample without host interrupts.
const ATTEMPTS: usize = 8;
/// COM1's transmit holding register and line status register (docs/abi.md 7.1).
const COM1_THR: u16 = 0x3f8;
const COM1_LSR: u16 = 0x3fd;
/// A port nothing emulates (docs/abi.md 7.4; the one `io.rs` uses).
const UNUSED_PORT: u16 = 0x2f0;
/// The x2APIC version register, readable at reset, and a reserved x2APIC MSR (docs/abi.md 14).
const X2APIC_RESERVED: u32 = 0x801;

/// An `ExitCounters` with [`SENTINEL`] in every field.
const fn sentinel_counters() -> ExitCounters {
    ExitCounters {
        total: SENTINEL,
        by_kind: [SENTINEL; 16],
        by_hypercall: [SENTINEL; HYPERCALL_SLOTS],
        handling_tsc: SENTINEL,
    }
}

/// Room for an `ExitCounters` on an 8-byte boundary and for misaligned attempts after it.
#[repr(C, align(8))]
struct CountersArea([u8; COUNTERS_BYTES + 16]);

static AREA: RacyCell<CountersArea> = RacyCell::new(CountersArea([0xa5; COUNTERS_BYTES + 16]));

/// The 8-byte aligned address of [`AREA`].
fn area() -> u64 {
    AREA.get() as u64
}

/// Fills [`AREA`] with the sentinel byte.
fn fill_area() {
    // SAFETY: the area is ours; the hypervisor writes it only during our calls.
    unsafe { core::ptr::write_volatile(AREA.get(), CountersArea([0xa5; COUNTERS_BYTES + 16])) };
}

/// Checks that no byte of [`AREA`] changed since [`fill_area`]: a refused call writes nothing.
fn check_area_untouched(what: core::fmt::Arguments<'_>) {
    // SAFETY: as above.
    let bytes = unsafe { core::ptr::read_volatile(AREA.get()) }.0;
    if let Some(at) = bytes.iter().position(|&b| b != 0xa5) {
        framework::fail(format_args!(
            "{what}: the refused call wrote the buffer (byte {at} is {:#x})",
            bytes[at]
        ));
    }
}

/// `stats_op` with raw arguments whose buffer is [`AREA`] (or a place the hypervisor must
/// refuse to write).
fn stats_raw(op: u64, domain: u64, vcpu: u64, gpa: u64) -> Status {
    // SAFETY: `gpa` is inside our static area, or outside RAM or misaligned, which the
    // hypervisor must refuse (the test fails on the result if it does not); the parts of
    // those that lie inside RAM are the area or the SDK's unused top of RAM.
    unsafe { hv::stats_op(op, domain, vcpu, gpa) }
}

/// Checks that `stats_op(op, domain, vcpu, gpa)` fails with `errno` and writes nothing.
fn check_refused(errno: Errno, op: u64, domain: u64, vcpu: u64, gpa: u64) {
    fill_area();
    let status = stats_raw(op, domain, vcpu, gpa);
    check_eq!(
        format_args!("stats_op({op:#x}, domain {domain:#x}, vCPU {vcpu:#x}, {gpa:#x})"),
        Status::err(errno),
        status
    );
    check_area_untouched(format_args!(
        "stats_op({op:#x}, domain {domain:#x}, vCPU {vcpu:#x}, {gpa:#x})"
    ));
}

/// The own counters (vCPU 0 through `domain`, DOMID_SELF or the own id), or `None` after
/// recording why not. Prints nothing unless it fails.
fn read_counters(domain: u64, vcpu: u64) -> Option<ExitCounters> {
    let mut counters = sentinel_counters();
    let status = hv::exit_counters(domain, vcpu, &mut counters);
    expect_ok(
        format_args!("ExitCounters(domain {domain:#x}, vCPU {vcpu})"),
        status,
    )
    .map(|_| counters)
}

/// The own counters through DOMID_SELF.
fn read_own() -> Option<ExitCounters> {
    read_counters(DOMID_SELF, 0)
}

/// This domain's id.
fn own_id() -> u64 {
    u64::from(start_info().domain_id)
}

/// What `body` caused, plus the closing read's own exit, between two reads of the own
/// counters; retried while host interrupts land in the window, unless `once` (for bodies
/// whose effect must not repeat).
fn measure(once: bool, mut body: impl FnMut()) -> Option<ExitCounters> {
    let mut window = ExitCounters::default();
    for _ in 0..if once { 1 } else { ATTEMPTS } {
        let before = read_own()?;
        body();
        let after = read_own()?;
        window = delta(&after, &before);
        if window.by_kind[exit_kind::INTERRUPT] == 0 {
            break;
        }
    }
    Some(window)
}

/// The exits a window must show.
#[derive(Clone, Copy)]
struct Expected(ExitCounters);

impl Expected {
    /// The closing read alone: one hypercall exit, number 7.
    fn closing_read() -> Expected {
        Expected(ExitCounters::default()).hypercalls(STATS_SLOT, 1)
    }

    /// `count` more exits of `kind`.
    fn exits(mut self, kind: usize, count: u64) -> Expected {
        self.0.by_kind[kind] += count;
        self.0.total += count;
        self
    }

    /// `count` more hypercall exits counted in slot `slot`.
    fn hypercalls(self, slot: usize, count: u64) -> Expected {
        let mut expected = self.exits(exit_kind::HYPERCALL, count);
        expected.0.by_hypercall[slot] += count;
        expected
    }
}

/// Checks a window field by field against `expected`, allowing host interrupts on top.
fn check_window(what: &str, expected: Expected, window: &ExitCounters) -> bool {
    let interrupts = window.by_kind[exit_kind::INTERRUPT];
    let mut ok = check_eq!(
        format_args!("{what}: total (with {interrupts} host interrupts)"),
        expected.0.total + interrupts,
        window.total
    );
    for kind in (0..16).filter(|&kind| kind != exit_kind::INTERRUPT) {
        ok &= check_eq!(
            format_args!("{what}: by_kind[{kind}] ({})", kind_name(kind)),
            expected.0.by_kind[kind],
            window.by_kind[kind]
        );
    }
    for slot in 0..HYPERCALL_SLOTS {
        ok &= check_eq!(
            format_args!("{what}: by_hypercall[{slot}]"),
            expected.0.by_hypercall[slot],
            window.by_hypercall[slot]
        );
    }
    ok
}

/// Measures `body` and checks the window against `expected` (the closing read included).
fn check_counts(what: &str, expected: Expected, once: bool, body: impl FnMut()) {
    if let Some(window) = measure(once, body) {
        check_window(what, expected, &window);
    }
}

/// Checks what holds for every copy the hypervisor writes: the kinds add up to the total, the
/// numbers to the hypercall exits, and the slots without a kind are 0.
fn check_consistent(what: &str, counters: &ExitCounters) -> bool {
    let mut ok = check_eq!(
        format_args!("{what}: total against the sum of by_kind"),
        sum_of_kinds(counters),
        counters.total
    );
    let by_number = counters
        .by_hypercall
        .iter()
        .fold(0u64, |sum, &n| sum.wrapping_add(n));
    ok &= check_eq!(
        format_args!("{what}: sum of by_hypercall against by_kind[HYPERCALL]"),
        counters.by_kind[exit_kind::HYPERCALL],
        by_number
    );
    ok &= check_eq!(
        format_args!("{what}: by_kind[13..16] (no kind)"),
        [0u64; 3],
        [
            counters.by_kind[13],
            counters.by_kind[14],
            counters.by_kind[15]
        ]
    );
    ok
}

/// Checks that no counter of `later` is below the same counter of `earlier`.
fn check_not_decreasing(what: &str, earlier: &ExitCounters, later: &ExitCounters) {
    check!(
        later.total >= earlier.total,
        "{what}: total went from {} down to {}",
        earlier.total,
        later.total
    );
    check!(
        later.handling_tsc >= earlier.handling_tsc,
        "{what}: handling_tsc went from {} down to {}",
        earlier.handling_tsc,
        later.handling_tsc
    );
    for kind in 0..16 {
        check!(
            later.by_kind[kind] >= earlier.by_kind[kind],
            "{what}: by_kind[{kind}] went from {} down to {}",
            earlier.by_kind[kind],
            later.by_kind[kind]
        );
    }
    for slot in 0..HYPERCALL_SLOTS {
        check!(
            later.by_hypercall[slot] >= earlier.by_hypercall[slot],
            "{what}: by_hypercall[{slot}] went from {} down to {}",
            earlier.by_hypercall[slot],
            later.by_hypercall[slot]
        );
    }
}

/// Another domain that exists: the one booted before this one, or else the one after it.
/// `None` (after recording a skip) when this is the only domain of the run; `refusal` is what
/// the probe of the next domain returns when it exists.
fn other_domain(refusal: Status) -> Option<u64> {
    let own = own_id();
    if own > 1 {
        // Domains are numbered 1, 2, ... in boot-module order (docs/abi.md 4.3).
        return Some(own - 1);
    }
    let mut counters = sentinel_counters();
    let status = hv::exit_counters(own + 1, 0, &mut counters);
    if status == Status::err(Errno::ENOENT) {
        framework::skip(format_args!(
            "domain {own} is the only domain of this run: no other domain to read"
        ));
        return None;
    }
    check_eq!(
        format_args!("ExitCounters(domain {}, vCPU 0), the next domain", own + 1),
        refusal,
        status
    );
    Some(own + 1)
}

conformance_test! {
    title: "EXIT_STATS is set; a domain reads its own counters through DOMID_SELF and through its own id, consistent and counted since it started",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_own_counters_readable() {
    let version = cpuid(LEAF_VERSION, 0);
    check!(
        version.ebx & features::EXIT_STATS != 0,
        "CPUID {LEAF_VERSION:#x} EBX {:#x} lacks EXIT_STATS (bit 11)",
        version.ebx
    );
    let Some(via_self) = read_own() else { return };
    let own = own_id();
    let Some(via_id) = read_counters(own, 0) else {
        return;
    };

    for (what, counters) in [("via DOMID_SELF", &via_self), ("via the own id", &via_id)] {
        check!(
            !counters.by_kind.contains(&SENTINEL) && !counters.by_hypercall.contains(&SENTINEL),
            "{what}: the copy left fields unwritten: {counters:?}"
        );
        check_consistent(what, counters);
        // Since the domain started: the SDK's CPUID at start, the `Test:` and `Checks:`
        // lines main printed through console_io, and this very call.
        check!(
            counters.by_kind[exit_kind::CPUID] >= 1,
            "{what}: by_kind[CPUID] is 0, but the kernel executed CPUID at start"
        );
        check!(
            counters.by_hypercall[Hypercall::ConsoleIo as usize] >= 2,
            "{what}: by_hypercall[1] (console_io) is {}, but two lines were printed",
            counters.by_hypercall[Hypercall::ConsoleIo as usize]
        );
    }
    // These were the domain's first two stats_op calls, and each copy includes its own exit.
    check_eq!(
        "by_hypercall[7] in the first read (DOMID_SELF): the call's own exit",
        1,
        via_self.by_hypercall[STATS_SLOT]
    );
    check_eq!(
        "by_hypercall[7] in the second read (own id): both calls",
        2,
        via_id.by_hypercall[STATS_SLOT]
    );
    // The same counters either way: the second read differs by its own exit only.
    let window = delta(&via_id, &via_self);
    if window.by_kind[exit_kind::INTERRUPT] == 0 {
        check_window(
            "ExitCounters via the own id right after DOMID_SELF",
            Expected::closing_read(),
            &window,
        );
    }
    // And with both names in a row, retried for a clean sample.
    for (first, second) in [(DOMID_SELF, own), (own, DOMID_SELF), (own, own)] {
        let mut window = None;
        for _ in 0..ATTEMPTS {
            let (Some(a), Some(b)) = (read_counters(first, 0), read_counters(second, 0)) else {
                return;
            };
            let w = delta(&b, &a);
            let clean = w.by_kind[exit_kind::INTERRUPT] == 0;
            window = Some(w);
            if clean {
                break;
            }
        }
        if let Some(window) = window {
            check_window(
                if first == DOMID_SELF {
                    "DOMID_SELF, then the own id"
                } else if second == DOMID_SELF {
                    "the own id, then DOMID_SELF"
                } else {
                    "the own id twice"
                },
                Expected::closing_read(),
                &window,
            );
        }
    }
}

conformance_test! {
    title: "the copy includes the call's own exit: a second read is larger by exactly one hypercall exit under number 7; a stats_op multicall entry sees the multicall's exit",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_read_counts_itself() {
    // Two reads in a row: the second is larger by its own exit, exactly.
    check_counts("two reads in a row", Expected::closing_read(), false, || {});
    // Three in a row: each one adds one.
    check_counts(
        "three reads in a row (one read inside the window)",
        Expected::closing_read().hypercalls(STATS_SLOT, 1),
        false,
        || {
            let _ = read_own();
        },
    );
    // A stats_op entry in a multicall copies counters that include the multicall's exit:
    // one exit, counted under 6; the entries are not exits.
    let mut in_batch = sentinel_counters();
    let mut window = None;
    for _ in 0..ATTEMPTS {
        let Some(before) = read_own() else { return };
        let mut entries = [
            hv::entry(Hypercall::Version, [0; 5], 0),
            hv::entry(
                Hypercall::StatsOp,
                [
                    OP_EXIT_COUNTERS,
                    DOMID_SELF,
                    0,
                    core::ptr::from_mut(&mut in_batch) as u64,
                    0,
                ],
                SENTINEL,
            ),
        ];
        // SAFETY: the stats_op entry writes `in_batch`, ours, borrowed for the call.
        let status = unsafe { hv::multicall(&mut entries) };
        if !check_eq!("multicall [version, stats_op]", Status(2), status) {
            return;
        }
        let result = entries[1].result;
        if !check_eq!("the stats_op entry's result", Status(0), Status(result)) {
            return;
        }
        let w = delta(&in_batch, &before);
        let clean = w.by_kind[exit_kind::INTERRUPT] == 0;
        window = Some(w);
        if clean {
            break;
        }
    }
    if let Some(window) = window {
        check_window(
            "a read, then a multicall [version, stats_op] copying the counters",
            Expected(ExitCounters::default()).hypercalls(Hypercall::Multicall as usize, 1),
            &window,
        );
    }
}

conformance_test! {
    title: "each CPUID adds exactly 1 to by_kind[CPUID] and nothing else",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_cpuid_counted_exactly() {
    check_counts(
        "one CPUID",
        Expected::closing_read().exits(exit_kind::CPUID, 1),
        false,
        || {
            cpuid(LEAF_SIGNATURE, 0);
        },
    );
    check_counts(
        "five CPUIDs of different leaves",
        Expected::closing_read().exits(exit_kind::CPUID, 5),
        false,
        || {
            for leaf in [0, 1, LEAF_SIGNATURE, LEAF_VERSION, 0x8000_0000] {
                cpuid(leaf, 0);
            }
        },
    );
}

conformance_test! {
    title: "hypercalls count under their number, either instruction, failing and CPL 3 ones too; a multicall once under 6; undefined numbers in slot 15",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_hypercalls_by_number() {
    const N: u64 = 5;
    check_counts(
        "five version calls",
        Expected::closing_read().hypercalls(Hypercall::Version as usize, N),
        false,
        || {
            for _ in 0..N {
                let _ = hv::version();
            }
        },
    );
    // Either instruction is a hypercall exit, the other vendor's one included (its #UD is not
    // an INVALID_OPCODE exit).
    for insn in HypercallInsn::ALL {
        check_counts(
            match insn {
                HypercallInsn::Vmcall => "version via VMCALL",
                HypercallInsn::Vmmcall => "version via VMMCALL",
            },
            Expected::closing_read().hypercalls(Hypercall::Version as usize, 1),
            false,
            || {
                // SAFETY: the version call takes no arguments and touches no memory.
                unsafe { hypercall0_with(insn, Hypercall::Version as u64) };
            },
        );
    }
    // Every defined call under its own number; failing ones count as well.
    let reservation = start_info().mem_bytes;
    let calls: [CountedCall; 5] = [
        (
            "event_channel_op Status(1)",
            Hypercall::EventChannelOp,
            || hv::port_status(1),
            None,
        ),
        (
            "event_channel_op Send(5000), refused",
            Hypercall::EventChannelOp,
            || hv::send(5000),
            Some(Status::err(Errno::EINVAL)),
        ),
        (
            "vcpu_op SetSingleshotTimer(0, 0)",
            Hypercall::VcpuOp,
            || hv::set_singleshot_timer(0, 0),
            Some(Status(0)),
        ),
        (
            "memory_op CurrentReservation",
            Hypercall::MemoryOp,
            hv::current_reservation,
            Some(Status(reservation)),
        ),
        (
            "multicall of 0 entries",
            Hypercall::Multicall,
            // SAFETY: an empty batch runs nothing.
            || unsafe { hv::multicall_at(0, 0) },
            Some(Status(0)),
        ),
    ];
    for (what, number, call, expected) in calls {
        let mut status = Status(0);
        check_counts(
            what,
            Expected::closing_read().hypercalls(number as usize, 1),
            false,
            || status = call(),
        );
        if let Some(expected) = expected {
            check_eq!(format_args!("{what}: result"), expected, status);
        }
    }
    let line = b"stats_hypercalls_by_number: a console write counted under number 1\n";
    check_counts(
        "a console_io write",
        Expected::closing_read().hypercalls(Hypercall::ConsoleIo as usize, 1),
        true,
        || {
            let _ = hv::console_write(line);
        },
    );
    // A multicall is one exit, under 6, whatever its entries are.
    check_counts(
        "a multicall of three version entries",
        Expected::closing_read().hypercalls(Hypercall::Multicall as usize, 1),
        false,
        || {
            let mut entries = [hv::entry(Hypercall::Version, [0; 5], 0); 3];
            // SAFETY: version entries touch no memory.
            let _ = unsafe { hv::multicall(&mut entries) };
        },
    );
    // Numbers the ABI does not define share the last slot, whatever their size.
    for number in [
        FIRST_UNDEFINED,
        14,
        15,
        16,
        0x1000,
        1 << 32,
        1 << 63,
        u64::MAX,
    ] {
        let mut status = Status(0);
        check_counts(
            undefined_label(number),
            Expected::closing_read().hypercalls(UNDEFINED_HYPERCALL_SLOT, 1),
            false,
            || {
                // SAFETY: an undefined number does nothing (1 << 32 would be `version` to a
                // hypervisor that looks at EAX only, which touches no memory either).
                status = unsafe { hv::hypercall(number, [0; 5]) };
            },
        );
        check_eq!(
            format_args!("hypercall {number:#x}: result"),
            Status::err(Errno::ENOSYS),
            status
        );
    }
    // A hypercall from CPL 3 is refused, and still an exit under its number.
    // Outside the window: the native instruction comes from CPUID.
    let native = hypercall::native_insn();
    let warm_up = user::version_hypercall_at_cpl3(native);
    check_eq!(
        "version at CPL 3",
        Status::err(Errno::EPERM),
        Status(warm_up.rax)
    );
    check_counts(
        "version at CPL 3, refused",
        Expected::closing_read().hypercalls(Hypercall::Version as usize, 1),
        false,
        || {
            user::version_hypercall_at_cpl3(native);
        },
    );
}

/// What, its number, the call, and its result where it is known.
type CountedCall = (&'static str, Hypercall, fn() -> Status, Option<Status>);

/// The label of an undefined number's window.
fn undefined_label(number: u64) -> &'static str {
    match number {
        FIRST_UNDEFINED => "hypercall 8 (the first undefined number)",
        14 => "hypercall 14 (undefined, below the last slot)",
        15 => "hypercall 15",
        16 => "hypercall 16",
        0x1000 => "hypercall 0x1000",
        0x1_0000_0000 => "hypercall 1 << 32",
        0x8000_0000_0000_0000 => "hypercall 1 << 63",
        _ => "hypercall u64::MAX",
    }
}

conformance_test! {
    title: "a COM1 byte counts IO_UART, another port IO_OTHER, RDMSR/WRMSR (also a #GP one) MSR_READ/MSR_WRITE, UD2 INVALID_OPCODE",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_trapped_exits_by_kind() {
    // Set up outside the windows: the IDT for the expected faults.
    idt::install();

    // One exit per byte through the trapped UART; the line is printed once (not retried).
    let line = b"stats_trapped_exits_by_kind: one exit per byte through COM1\n";
    check_counts(
        "a line written byte by byte to COM1",
        Expected::closing_read().exits(exit_kind::IO_UART, line.len() as u64),
        true,
        || {
            for &byte in line {
                // SAFETY: COM1 is emulated (docs/abi.md 7.1): the byte is printed.
                unsafe { outb(COM1_THR, byte) };
            }
        },
    );
    check_counts(
        "a read of COM1's line status register",
        Expected::closing_read().exits(exit_kind::IO_UART, 1),
        false,
        || {
            // SAFETY: reading the emulated LSR has no side effect.
            unsafe { inb(COM1_LSR) };
        },
    );
    check_counts(
        "a read of a port nothing emulates",
        Expected::closing_read().exits(exit_kind::IO_OTHER, 1),
        false,
        || {
            // SAFETY: nothing is at this port (docs/abi.md 7.4).
            unsafe { inb(UNUSED_PORT) };
        },
    );
    check_counts(
        "RDMSR of the x2APIC version",
        Expected::closing_read().exits(exit_kind::MSR_READ, 1),
        false,
        || {
            msr::read(apic::VERSION);
        },
    );
    check_counts(
        "RDMSR of a reserved x2APIC MSR, which raises #GP",
        Expected::closing_read().exits(exit_kind::MSR_READ, 1),
        false,
        || {
            check!(
                msr::try_read(X2APIC_RESERVED).is_err(),
                "RDMSR {X2APIC_RESERVED:#x} did not raise #GP"
            );
        },
    );
    check_counts(
        "WRMSR of IA32_TSC_DEADLINE = 0 (ignored in one-shot mode)",
        Expected::closing_read().exits(exit_kind::MSR_WRITE, 1),
        false,
        || {
            // SAFETY: at reset the LVT timer is masked and in one-shot mode, where the write
            // is ignored (docs/abi.md 14).
            unsafe { msr::write(apic::TSC_DEADLINE, 0) };
        },
    );
    check_counts(
        "UD2, reflected as #UD",
        Expected::closing_read().exits(exit_kind::INVALID_OPCODE, 1),
        false,
        || {
            let taken = idt::expect_trap(INVALID_OPCODE, UD2_LEN, || {
                // SAFETY: the armed handler resumes after the 2-byte instruction.
                unsafe { asm!("ud2", options(nomem, nostack)) };
            });
            check!(taken.is_some(), "UD2 raised no #UD");
        },
    );
}

/// #UD.
const INVALID_OPCODE: u8 = 6;
/// UD2 (0F 0B) is two bytes long.
const UD2_LEN: u8 = 2;

conformance_test! {
    title: "in every copy total is the sum of by_kind, by_hypercall adds up to the hypercall exits, unused kinds are 0, and nothing decreases",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_total_is_sum_of_kinds() {
    idt::install();
    let Some(mut earlier) = read_own() else {
        return;
    };
    check_consistent("the first read", &earlier);
    // A mix of exits between reads, and yields that let other domains (and host interrupts)
    // in: every copy adds up, and nothing goes down.
    for round in 0..6 {
        cpuid(0, 0);
        let _ = hv::version();
        // SAFETY: nothing is at this port (docs/abi.md 7.4).
        unsafe { inb(UNUSED_PORT) };
        msr::read(apic::VERSION);
        let _ = hv::sched_yield();
        let Some(later) = read_own() else { return };
        let what = match round {
            0 => "read 2",
            1 => "read 3",
            2 => "read 4",
            3 => "read 5",
            4 => "read 6",
            _ => "read 7",
        };
        check_consistent(what, &later);
        check_not_decreasing(what, &earlier, &later);
        earlier = later;
    }
}

conformance_test! {
    title: "handling_tsc grows with every read and by no more than the TSC ticks that passed",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_handling_tsc_grows() {
    let Some(first) = read_own() else { return };
    check!(
        first.handling_tsc > 0,
        "handling_tsc is 0 after {} exits",
        first.total
    );
    // Each read adds the handling of the previous read's exit at least.
    let mut previous = first;
    for read in 2..=6 {
        let Some(next) = read_own() else { return };
        check!(
            next.handling_tsc > previous.handling_tsc,
            "read {read}: handling_tsc did not grow ({} then {})",
            previous.handling_tsc,
            next.handling_tsc
        );
        previous = next;
    }
    // The hypervisor cannot spend more time handling exits than passed meanwhile: the
    // handling between two reads fits between two TSC readings around them.
    let tsc_before = rdtsc();
    let Some(a) = read_own() else { return };
    for _ in 0..10 {
        cpuid(0, 0);
    }
    let Some(b) = read_own() else { return };
    let tsc_after = rdtsc();
    let handled = b.handling_tsc.wrapping_sub(a.handling_tsc);
    let elapsed = tsc_after.wrapping_sub(tsc_before);
    check!(handled > 0, "handling_tsc did not grow over 10 CPUID exits");
    check!(
        handled <= elapsed,
        "handling_tsc grew by {handled} ticks over 10 CPUIDs, but only {elapsed} TSC ticks passed"
    );
}

conformance_test! {
    title: "unknown stats_op operations return -ENOSYS before any other check, write nothing, and still count as an exit under 7",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_unknown_op_enosys() {
    let own = own_id();
    for op in [1, 2, 0x100, 1 << 32, u64::MAX] {
        // 1 << 32 would be ExitCounters to a hypervisor that looks at EDI only: the area is
        // ours, and the check sees it written.
        check_refused(Errno::ENOSYS, op, DOMID_SELF, 0, area());
        check_refused(Errno::ENOSYS, op, own, 0, area());
    }
    // The operation is checked first (docs/abi.md 15): before the domain, vCPU and buffer.
    let mem = start_info().mem_bytes;
    check_refused(Errno::ENOSYS, 1, 9999, 0, area());
    check_refused(Errno::ENOSYS, 1, DOMID_SELF, 99, area());
    check_refused(Errno::ENOSYS, 1, DOMID_SELF, 0, area() + 1);
    check_refused(Errno::ENOSYS, 1, DOMID_SELF, 0, mem);
    // A refused call is an exit all the same, under number 7.
    check_counts(
        "stats_op operation 1, refused",
        Expected::closing_read().hypercalls(STATS_SLOT, 1),
        false,
        || {
            stats_raw(1, DOMID_SELF, 0, area());
        },
    );
}

conformance_test! {
    title: "a buffer not 8-byte aligned returns -EINVAL, before the buffer is checked, and nothing is written",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_misaligned_einval() {
    let area = area();
    for gpa in [area + 1, area + 2, area + 4, area + 7, area + 12] {
        check_refused(Errno::EINVAL, OP_EXIT_COUNTERS, DOMID_SELF, 0, gpa);
    }
    // Alignment is checked before the buffer is (docs/abi.md 15).
    let mem = start_info().mem_bytes;
    for gpa in [mem + 4, (1 << 63) | 4, u64::MAX] {
        check_refused(Errno::EINVAL, OP_EXIT_COUNTERS, DOMID_SELF, 0, gpa);
    }
    check_eq!(
        "ExitCounters into the aligned area afterwards",
        Status(0),
        stats_raw(OP_EXIT_COUNTERS, DOMID_SELF, 0, area)
    );
}

conformance_test! {
    title: "buffers not inside RAM (beyond, straddling the end, wrapping) return -EFAULT",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_buffer_oob_efault() {
    let mem = start_info().mem_bytes;
    // `mem - 16` and `mem - 8` straddle the end of RAM (the buffer is 272 bytes); their part
    // inside RAM is the SDK's unused top of RAM. `!7` wraps around.
    const _: () = assert!(TOP_OF_RAM_SCRATCH >= 16);
    for gpa in [mem - 16, mem - 8, mem, mem + 8, 1 << 40, !7, 1 << 63] {
        let status = stats_raw(OP_EXIT_COUNTERS, DOMID_SELF, 0, gpa);
        check_eq!(
            format_args!("ExitCounters(DOMID_SELF, vCPU 0, {gpa:#x})"),
            Status::err(Errno::EFAULT),
            status
        );
    }
    check_eq!(
        "ExitCounters inside RAM afterwards",
        Status(0),
        stats_raw(OP_EXIT_COUNTERS, DOMID_SELF, 0, area())
    );
}

conformance_test! {
    title: "a vCPU >= nr_vcpus returns -ENOENT, before the alignment and the buffer are checked",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_bad_vcpu_enoent() {
    let own = own_id();
    for vcpu in bad_vcpus() {
        check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, DOMID_SELF, vcpu, area());
        check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, own, vcpu, area());
    }
    // The vCPU is checked before the alignment and the buffer (docs/abi.md 15).
    let mem = start_info().mem_bytes;
    check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, DOMID_SELF, 1, area() + 4);
    check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, DOMID_SELF, 1, mem);
    check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, DOMID_SELF, 1, mem + 4);
}

conformance_test! {
    title: "a domain id that names no domain (9999, 0, truncations of DOMID_SELF) returns -ENOENT, before the vCPU and the buffer",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_no_domain_enoent() {
    check!(
        start_info().flags & START_FLAG_PRIVILEGED == 0,
        "this domain is privileged, but its command line has no privileged=1"
    );
    let own = own_id();
    // No such domains; some are DOMID_SELF or this domain to a hypervisor that truncates
    // the argument to 32 or 16 bits.
    let nobody = [
        9999,
        0,
        0x7fef,
        0x7ff1,
        1 << 32 | DOMID_SELF,
        1 << 32 | own,
        1 << 16 | own,
        u64::MAX,
    ];
    for domain in nobody {
        check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, domain, 0, area());
    }
    // The domain is checked before the vCPU, the alignment and the buffer (docs/abi.md 15).
    let mem = start_info().mem_bytes;
    check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, 9999, 1, area());
    check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, 9999, 0, area() + 4);
    check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, 9999, 0, mem);
}

conformance_test! {
    title: "an unprivileged domain reading another existing domain gets -EPERM, before the vCPU and the buffer are checked",
    section: "15 Exit accounting",
    expect: Success,
}
pub(super) fn stats_other_domain_eperm() {
    if start_info().flags & START_FLAG_PRIVILEGED != 0 {
        framework::error(format_args!(
            "this domain is privileged: it cannot check the unprivileged refusal"
        ));
        return;
    }
    let Some(other) = other_domain(Status::err(Errno::EPERM)) else {
        return;
    };
    println!(
        "stats_other_domain_eperm: domain {} reads domain {other}",
        own_id()
    );
    check_refused(Errno::EPERM, OP_EXIT_COUNTERS, other, 0, area());
    // Privilege is checked before the vCPU, the alignment and the buffer (docs/abi.md 15).
    let mem = start_info().mem_bytes;
    for vcpu in bad_vcpus() {
        check_refused(Errno::EPERM, OP_EXIT_COUNTERS, other, vcpu, area());
    }
    check_refused(Errno::EPERM, OP_EXIT_COUNTERS, other, 0, area() + 4);
    check_refused(Errno::EPERM, OP_EXIT_COUNTERS, other, 0, mem);
    // And after the operation (ENOSYS) and for domains that do not exist (ENOENT).
    check_refused(Errno::ENOSYS, 1, other, 0, area());
    check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, 9999, 0, area());
    // The own counters stay readable.
    check_eq!(
        "ExitCounters(DOMID_SELF) afterwards",
        Status(0),
        stats_raw(OP_EXIT_COUNTERS, DOMID_SELF, 0, area())
    );
}

conformance_test! {
    title: "a domain booted with privileged=1 has START_FLAG_PRIVILEGED and reads another domain's counters; the other errors still apply",
    section: "15 Exit accounting",
    expect: Success,
    cmdline: "privileged=1",
}
pub(super) fn stats_privileged_reads_other() {
    let flags = start_info().flags;
    if !check_eq!(
        "StartInfo.flags & START_FLAG_PRIVILEGED (the command line has privileged=1)",
        Hex(START_FLAG_PRIVILEGED),
        Hex(flags & START_FLAG_PRIVILEGED)
    ) {
        return;
    }
    let Some(other) = other_domain(Status(0)) else {
        return;
    };
    println!(
        "stats_privileged_reads_other: domain {} reads domain {other}",
        own_id()
    );
    let Some(first) = read_counters(other, 0) else {
        return;
    };
    check!(
        !first.by_kind.contains(&SENTINEL) && !first.by_hypercall.contains(&SENTINEL),
        "domain {other}'s copy left fields unwritten: {first:?}"
    );
    check_consistent("the other domain's counters", &first);
    // Let the other domain run, then read again: its counters only grow.
    for _ in 0..3 {
        let _ = hv::sched_yield();
    }
    let Some(second) = read_counters(other, 0) else {
        return;
    };
    check_consistent("the other domain's counters, read again", &second);
    check_not_decreasing("the other domain's counters", &first, &second);

    // The other errors still apply, in their order.
    let mem = start_info().mem_bytes;
    for vcpu in bad_vcpus() {
        check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, other, vcpu, area());
    }
    check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, other, 1, area() + 4);
    check_refused(Errno::EINVAL, OP_EXIT_COUNTERS, other, 0, area() + 4);
    check_refused(Errno::EINVAL, OP_EXIT_COUNTERS, other, 0, mem + 4);
    for gpa in [mem - 8, mem, 1 << 40, !7] {
        check_refused(Errno::EFAULT, OP_EXIT_COUNTERS, other, 0, gpa);
    }
    check_refused(Errno::ENOSYS, 1, other, 0, area());
    // Privilege does not make a domain exist.
    for domain in [9999, 0, 1 << 32 | other, u64::MAX] {
        check_refused(Errno::ENOENT, OP_EXIT_COUNTERS, domain, 0, area());
    }
    // The own counters, both ways.
    for domain in [DOMID_SELF, own_id()] {
        if let Some(own) = read_counters(domain, 0) {
            check_consistent("the own counters of a privileged domain", &own);
        }
    }
}

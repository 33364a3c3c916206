//! Tests of `multicall` (docs/abi.md 12): entries run in order with their own results, a
//! failing entry does not stop the batch, the limits, and the entries a batch may not hold.

use lamina_abi::console::ConsoleOp;
use lamina_abi::event_channel::{DOMID_SELF, EventChannelOp, PortState, PortStatus};
use lamina_abi::multicall::{MULTICALL_MAX, MulticallEntry};
use lamina_abi::sched::{SchedOp, ShutdownReason};
use lamina_abi::{Errno, Hypercall, abi_version};
use lamina_guest_sdk::start::TOP_OF_RAM_SCRATCH;
use lamina_guest_sdk::start_info;

use super::common::loopback_port;
use crate::console::println;
use crate::framework::{self, Status, check, check_eq, expect_ok};
use crate::hv::{self, entry};
use crate::shared;

/// A result no hypercall returns: left in entries that did not run.
const NOT_RUN: u64 = 0x5a5a_5a5a_5a5a_5a5a;

/// An entry for hypercall `op` with `args`, not yet run.
fn call(op: Hypercall, args: [u64; 5]) -> MulticallEntry {
    entry(op, args, NOT_RUN)
}

/// A console write entry of `line`.
fn write(line: &'static [u8]) -> MulticallEntry {
    call(
        Hypercall::ConsoleIo,
        [
            ConsoleOp::Write as u64,
            line.as_ptr() as u64,
            line.len() as u64,
            0,
            0,
        ],
    )
}

/// An event_channel_op entry.
fn evtchn(op: EventChannelOp, arg: u64) -> MulticallEntry {
    call(Hypercall::EventChannelOp, [op as u64, arg, 0, 0, 0])
}

/// A sched_op entry.
fn sched(op: u64, args: [u64; 4]) -> MulticallEntry {
    let [a2, a3, a4, a5] = args;
    call(Hypercall::SchedOp, [op, a2, a3, a4, a5])
}

/// Runs `entries`, whose calls write no guest memory but their results.
fn run(entries: &mut [MulticallEntry]) -> Status {
    // SAFETY: the entries' calls in these tests write no guest memory (console writes, event
    // channels, sched_op, version, the reservation), and the array is ours.
    unsafe { hv::multicall(entries) }
}

/// Checks each entry's result against `expected`.
fn check_results(entries: &[MulticallEntry], expected: &[Status]) {
    for (index, (entry, want)) in entries.iter().zip(expected).enumerate() {
        check_eq!(
            format_args!("result of entry {index} (hypercall {})", entry.op),
            *want,
            Status(entry.result)
        );
    }
}

conformance_test! {
    title: "a multicall runs its entries in order, writes each result and returns their number",
    section: "12 multicall",
    expect: Success,
}
pub(super) fn multicall_runs_in_order() {
    let mem = start_info().mem_bytes;
    let line = b"multicall_runs_in_order: a console write from entry 1\n";
    let mut entries = [
        call(Hypercall::Version, [0; 5]),
        write(line),
        evtchn(EventChannelOp::AllocUnbound, DOMID_SELF),
        evtchn(EventChannelOp::Status, 2),
        evtchn(EventChannelOp::Send, 2),
        sched(SchedOp::Yield as u64, [0; 4]),
        call(
            Hypercall::MemoryOp,
            [
                lamina_abi::memory::MemoryOp::CurrentReservation as u64,
                0,
                0,
                0,
                0,
            ],
        ),
    ];
    check_eq!(
        "multicall of 7 entries",
        Status(entries.len() as u64),
        run(&mut entries)
    );
    // Entry 3 sees the port entry 2 allocated: they ran in order.
    let unbound = PortStatus::unpack(entries[3].result);
    check_eq!(
        "state of port 2 seen by entry 3",
        PortState::Unbound as u8,
        unbound.state
    );
    check_results(
        &entries,
        &[
            Status(u64::from(abi_version())),
            Status(line.len() as u64),
            Status(2),
            Status(entries[3].result),
            Status(0),
            Status(0),
            Status(mem),
        ],
    );
    check!(
        shared::is_pending(2),
        "port 2 not pending after entry 4 sent on it"
    );
}

conformance_test! {
    title: "failing entries get their own error and do not stop the batch",
    section: "12 multicall",
    expect: Success,
}
pub(super) fn multicall_failure_does_not_stop() {
    let mem = start_info().mem_bytes;
    let mut entries = [
        call(Hypercall::Version, [0; 5]),
        MulticallEntry {
            op: Hypercall::ALL.len() as u64,
            args: [0; 5],
            result: NOT_RUN,
        },
        call(
            Hypercall::ConsoleIo,
            [ConsoleOp::Write as u64, mem, 16, 0, 0],
        ),
        evtchn(EventChannelOp::Close, 2),
        evtchn(EventChannelOp::AllocUnbound, DOMID_SELF),
        sched(99, [0; 4]),
        call(Hypercall::Version, [0; 5]),
    ];
    check_eq!(
        "multicall of 7 entries, 4 failing",
        Status(entries.len() as u64),
        run(&mut entries)
    );
    check_results(
        &entries,
        &[
            Status(u64::from(abi_version())),
            Status::err(Errno::ENOSYS),
            Status::err(Errno::EFAULT),
            Status::err(Errno::EINVAL),
            Status(2),
            Status::err(Errno::ENOSYS),
            Status(u64::from(abi_version())),
        ],
    );
}

conformance_test! {
    title: "more than MULTICALL_MAX entries return -E2BIG before the array is checked; 0 entries return 0",
    section: "12 multicall",
    expect: Success,
}
pub(super) fn multicall_count_limits() {
    let version = call(Hypercall::Version, [0; 5]);
    let mut entries = [version; MULTICALL_MAX as usize + 1];
    let gpa = entries.as_ptr() as u64;
    let mem = start_info().mem_bytes;
    // The count is checked before the array: beyond RAM still gives -E2BIG.
    for (count, at) in [
        (MULTICALL_MAX + 1, gpa),
        (MULTICALL_MAX + 1, mem),
        (1 << 32 | 1, gpa),
        (u64::MAX, gpa),
    ] {
        // SAFETY: the count is over the limit and must be refused; the array is ours anyway.
        let status = unsafe { hv::multicall_at(at, count) };
        check_eq!(
            format_args!("multicall of {count:#x} entries at {at:#x}"),
            Status::err(Errno::E2BIG),
            status
        );
    }
    check!(
        entries.iter().all(|entry| entry.result == NOT_RUN),
        "a refused multicall ran entries"
    );
    // Zero entries: nothing to run, nothing to read, wherever the array is.
    for at in [gpa, mem, u64::MAX] {
        // SAFETY: an empty batch touches no memory.
        let status = unsafe { hv::multicall_at(at, 0) };
        check_eq!(
            format_args!("multicall of 0 entries at {at:#x}"),
            Status(0),
            status
        );
    }
    check_eq!(
        "multicall of MULTICALL_MAX version calls",
        Status(MULTICALL_MAX),
        run(&mut entries[..MULTICALL_MAX as usize])
    );
    check!(
        entries[..MULTICALL_MAX as usize]
            .iter()
            .all(|entry| entry.result == u64::from(abi_version())),
        "not every one of MULTICALL_MAX version entries returned the version"
    );
}

/// Where the wrapped array of `multicall_oob_efault_runs_none` puts its second entry: low in
/// page 0, which no one uses (docs/abi.md 4.2).
const PAGE0_ENTRY: u64 = 0x20;

conformance_test! {
    title: "an entry array not inside RAM returns -EFAULT and runs no entry",
    section: "12 multicall",
    expect: Success,
}
pub(super) fn multicall_oob_efault_runs_none() {
    let mem = start_info().mem_bytes;
    let allocation = evtchn(EventChannelOp::AllocUnbound, DOMID_SELF);
    // An entry in page 0, and the first 16 bytes of one at the top of RAM (its op and first
    // argument): should a hypervisor run them, they would allocate port 2.
    // SAFETY: page 0 and the top `TOP_OF_RAM_SCRATCH` bytes of RAM are unused and
    // identity-mapped; both addresses are aligned for what is written.
    unsafe {
        core::ptr::write_volatile(PAGE0_ENTRY as *mut MulticallEntry, allocation);
        let top = (mem - TOP_OF_RAM_SCRATCH) as *mut u64;
        core::ptr::write_volatile(top, allocation.op);
        core::ptr::write_volatile(top.add(1), allocation.args[0]);
    }
    const _: () = assert!(TOP_OF_RAM_SCRATCH == 16);
    let entry_bytes = size_of::<MulticallEntry>() as u64;
    let cases: [(&str, u64, u64); 5] = [
        ("at the end of RAM", mem, 1),
        ("straddling the end of RAM", mem - TOP_OF_RAM_SCRATCH, 1),
        ("1 GiB above RAM", mem + (1 << 30), 1),
        (
            "wrapping around to page 0",
            PAGE0_ENTRY.wrapping_sub(entry_bytes),
            2,
        ),
        ("at a non-canonical address", 1 << 63, 1),
    ];
    for (what, gpa, count) in cases {
        // SAFETY: the array is not inside RAM and must be refused; what it reaches of RAM is
        // unused.
        let status = unsafe { hv::multicall_at(gpa, count) };
        check_eq!(
            format_args!("multicall, array {what} (gpa {gpa:#x}, {count} entries)"),
            Status::err(Errno::EFAULT),
            status
        );
    }
    // SAFETY: as above.
    let page0 = unsafe { core::ptr::read_volatile(PAGE0_ENTRY as *const MulticallEntry) };
    check_eq!(
        "result of the entry in page 0",
        Status(NOT_RUN),
        Status(page0.result)
    );
    let port2 = hv::port_status(2).value().map(PortStatus::unpack);
    check!(
        port2.is_some_and(|status| status.state == PortState::Free as u8),
        "port 2 was allocated by a refused multicall (status {port2:?})"
    );
}

conformance_test! {
    title: "nested multicall, block and poll entries get -EINVAL; the batch goes on",
    section: "12 multicall",
    expect: Success,
}
pub(super) fn multicall_nested_block_einval() {
    let Some(port) = loopback_port() else { return };
    // An event is pending, so that a Block or Poll run by mistake returns rather than waits.
    expect_ok(format_args!("Send({port})"), hv::send(port));
    let ports = [port as u32];
    let mut inner = [call(Hypercall::Version, [0; 5])];
    let mut entries = [
        call(
            Hypercall::Multicall,
            [inner.as_mut_ptr() as u64, 1, 0, 0, 0],
        ),
        sched(SchedOp::Block as u64, [0; 4]),
        sched(SchedOp::Poll as u64, [ports.as_ptr() as u64, 1, 0, 0]),
        call(Hypercall::Version, [0; 5]),
        sched(SchedOp::Yield as u64, [0; 4]),
    ];
    check_eq!(
        "multicall of 5 entries, 3 refused",
        Status(entries.len() as u64),
        run(&mut entries)
    );
    check_results(
        &entries,
        &[
            Status::err(Errno::EINVAL),
            Status::err(Errno::EINVAL),
            Status::err(Errno::EINVAL),
            Status(u64::from(abi_version())),
            Status(0),
        ],
    );
    check_eq!(
        "result of the nested batch's entry",
        Status(NOT_RUN),
        Status(inner[0].result)
    );
}

conformance_test! {
    title: "a shutdown entry ends the domain with its reason; later entries do not run",
    section: "12 multicall",
    expect: Success,
}
/// Ends the domain from a batch: the entries before the shutdown entry run (they print the
/// verdict line), the ones after do not. The body never returns: a hypervisor that goes on
/// after the shutdown entry runs a crash shutdown, in the batch or after it below, and the
/// run ends with `end=crash`, not the `end=poweroff` a pass needs.
pub(super) fn multicall_shutdown_ends_batch() {
    let verdict: &'static [u8] = match framework::outcome() {
        framework::Outcome::Success => b"Test result: SUCCESS\n",
        _ => b"Test result: FAILURE\n",
    };
    let mut entries = [
        write(b"multicall_shutdown_ends_batch: entry 0 ran, the shutdown entry is next\n"),
        write(verdict),
        sched(
            SchedOp::Shutdown as u64,
            [ShutdownReason::Poweroff as u64, 0, 0, 0],
        ),
        write(b"FAIL: an entry after the shutdown entry ran\n"),
        sched(
            SchedOp::Shutdown as u64,
            [ShutdownReason::Crash as u64, 0, 0, 0],
        ),
    ];
    let status = run(&mut entries);
    println!(
        "FAIL: the multicall returned {status:?} after its shutdown entry (results: {:?})",
        entries.map(|entry| Status(entry.result))
    );
    println!("multicall_shutdown_ends_batch: shutting down with reason crash: not a pass");
    hv::shutdown(ShutdownReason::Crash)
}

conformance_test! {
    title: "the entry array is copied before any entry runs: an entry that writes over a later one does not change what it does",
    section: "12 multicall",
    expect: Success,
}
pub(super) fn multicall_array_copied_first() {
    // Entry 0 writes three memory-map regions (72 bytes) over entry 1, whose `op` becomes the
    // first region's base, 0 (version). The array is copied before any entry runs (2.5, 12),
    // so entry 1 runs as written: an undefined hypercall.
    const UNDEFINED: u64 = 0x7fff;
    let mut entries = [
        call(Hypercall::MemoryOp, [0, 0, 3, 0, 0]),
        MulticallEntry {
            op: UNDEFINED,
            args: [0; 5],
            result: NOT_RUN,
        },
    ];
    entries[0].args[0] = lamina_abi::memory::MemoryOp::GetMemoryMap as u64;
    entries[0].args[1] = core::ptr::addr_of_mut!(entries[1]) as u64;
    // SAFETY: the memory map is written into the array itself, which is ours.
    let status = unsafe { hv::multicall(&mut entries) };
    check_eq!("multicall of 2 entries", Status(2), status);
    // SAFETY: the hypervisor wrote the array during the call; read it back as it is now.
    let after = unsafe { core::ptr::read_volatile(&entries) };
    check!(
        after[0].result >= 3,
        "entry 0 (get_memory_map) returned {:#x}, not the number of regions",
        after[0].result
    );
    check_eq!(
        "entry 1's op after entry 0 wrote the map over it",
        0,
        after[1].op
    );
    check_eq!(
        "result of entry 1: it ran as copied before the batch",
        Status::err(Errno::ENOSYS),
        Status(after[1].result)
    );
}

/// The batch of [`multicall_preempted`]: vCPU 0 runs it, vCPU 1 reads its
/// results.
static WATCHED: crate::x86::RacyCell<[MulticallEntry; MULTICALL_MAX as usize]> =
    crate::x86::RacyCell::new(
        [MulticallEntry {
            op: 0,
            args: [0; 5],
            result: NOT_RUN,
        }; MULTICALL_MAX as usize],
    );
/// vCPU 0 is between the stores around its `multicall` of [`WATCHED`].
static IN_CALL: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
/// Times vCPU 1 found [`WATCHED`] half run while vCPU 0 was in its call.
static SEEN_HALF_RUN: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// Times vCPU 1 found a state a batch never has (a result out of order or wrong).
static SEEN_WRONG: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// A `memory_op` current_reservation entry.
fn reservation_call() -> MulticallEntry {
    let op = lamina_abi::memory::MemoryOp::CurrentReservation as u64;
    call(Hypercall::MemoryOp, [op, 0, 0, 0, 0])
}

/// The result of entry `index` of [`WATCHED`], as it is now.
fn watched_result(index: usize) -> u64 {
    // SAFETY: a read of our static's field, volatile: the hypervisor writes it for vCPU 0.
    unsafe { (&raw const (*WATCHED.get())[index].result).read_volatile() }
}

/// vCPU 1: while vCPU 0 is in its call, counts the times the batch's results are a run prefix
/// and a not-run rest with both parts non-empty, and yields, forever. Both vCPUs share one
/// CPU (`affinity=0`), so it runs only while vCPU 0 does not.
extern "C" fn watch_batch(_vcpu: u64) -> ! {
    use core::sync::atomic::Ordering::SeqCst;
    let reservation = start_info().mem_bytes;
    loop {
        if IN_CALL.load(SeqCst) {
            let run = (0..MULTICALL_MAX as usize)
                .take_while(|&i| watched_result(i) == reservation)
                .count();
            let rest_not_run = (run..MULTICALL_MAX as usize).all(|i| watched_result(i) == NOT_RUN);
            if !rest_not_run {
                SEEN_WRONG.fetch_add(1, SeqCst);
            } else if run > 0 && run < MULTICALL_MAX as usize {
                SEEN_HALF_RUN.fetch_add(1, SeqCst);
            }
        }
        hv::sched_yield();
    }
}

conformance_test! {
    title: "a multicall preempted between entries is finished before its vCPU runs guest code again: a sibling on the same CPU may find it half run, the caller always gets it whole",
    section: "12 multicall",
    expect: Success,
    cmdline: "vcpus=2 affinity=0",
}
pub(super) fn multicall_preempted() {
    use core::sync::atomic::Ordering::SeqCst;
    if !super::pv_smp::start_secondary(1, watch_batch) {
        return;
    }
    let reservation = start_info().mem_bytes;
    let give_up = shared::now() + crate::timing::GIVE_UP_NS;
    let mut batches = 0u64;
    // 64 current_reservation entries again and again (cheap, and not `version`, before which a
    // batch never stops): most of vCPU 0's time is in its batches, so the end of one of its
    // slices soon falls in one.
    while SEEN_HALF_RUN.load(SeqCst) == 0 && shared::now() < give_up {
        // SAFETY: only vCPU 0 writes the batch; vCPU 1 only reads results.
        let entries = unsafe { &mut *WATCHED.get() };
        for entry in entries.iter_mut() {
            // SAFETY: a store to our static, volatile: vCPU 1 reads it.
            unsafe { (&raw mut *entry).write_volatile(reservation_call()) };
        }
        IN_CALL.store(true, SeqCst);
        let status = run(entries);
        IN_CALL.store(false, SeqCst);
        batches += 1;
        let whole = status == Status(MULTICALL_MAX)
            && (0..MULTICALL_MAX as usize).all(|i| watched_result(i) == reservation);
        if !check!(
            whole,
            "batch {batches}: returned {status:?}, results not all the reservation"
        ) {
            return;
        }
    }
    check_eq!(
        "states of the batch vCPU 1 found that no batch has",
        0,
        SEEN_WRONG.load(SeqCst)
    );
    check!(
        SEEN_HALF_RUN.load(SeqCst) > 0,
        "vCPU 1 never found a batch half run in {batches} batches (none was preempted)"
    );
    println!(
        "multicall_preempted: {batches} batches, found half run {} times",
        SEEN_HALF_RUN.load(SeqCst)
    );
}

//! Tests of `sched_op` (docs/abi.md 3.3): yield, shutdown, and waiting for events with
//! block and poll.

use core::sync::atomic::Ordering;

use lamina_abi::sched::{POLL_PORTS_MAX, SchedOp, ShutdownReason};
use lamina_abi::{Errno, Hypercall};
use lamina_guest_sdk::hypercall::{self, HypercallInsn, hypercall1_with, hypercall2};
use lamina_guest_sdk::start::TOP_OF_RAM_SCRATCH;
use lamina_guest_sdk::start_info;

use super::common::{loopback_port, timer_port, wait_until_pending};
use crate::console::println;
use crate::framework::{Status, check, check_eq, expect_ok};
use crate::hv;
use crate::shared;
use crate::timing::{LATE_BOUND_NS, MS, Stopwatch};

const SCHED_OP: u64 = Hypercall::SchedOp as u64;

conformance_test! {
    title: "sched_op yield returns 0, with either instruction",
    section: "3.3 sched_op",
    expect: Success,
}
pub(super) fn sched_yield_returns_zero() {
    for insn in HypercallInsn::ALL {
        for attempt in 1..=10 {
            // SAFETY: yield takes no buffer.
            let rax = unsafe { hypercall1_with(insn, SCHED_OP, SchedOp::Yield as u64) };
            check_eq!(
                format_args!("yield via {} (call {attempt})", insn.name()),
                Status(0),
                Status(rax)
            );
        }
    }
    check_eq!("sched_yield() of the SDK", Ok(()), hypercall::sched_yield());
}

conformance_test! {
    title: "unknown sched_op operations return -ENOSYS",
    section: "3.3 sched_op",
    expect: Success,
}
pub(super) fn sched_unknown_op_enosys() {
    // 5 is the first unassigned operation (yield, block, shutdown, poll; yield_to since ABI
    // 1.6); 1 << 32 would be yield to a hypervisor that looks at EDI only.
    for op in [5, 6, 99, 1 << 32, u64::MAX] {
        // SAFETY: an unknown operation does nothing.
        let rax = unsafe { hypercall2(SCHED_OP, op, 0) };
        check_eq!(
            format_args!("sched_op operation {op:#x}"),
            Status::err(Errno::ENOSYS),
            Status(rax)
        );
    }
}

conformance_test! {
    title: "shutdown with an unknown reason returns -EINVAL and the domain runs on",
    section: "3.3 sched_op",
    expect: Success,
}
pub(super) fn shutdown_unknown_reason_einval() {
    // 3 is Xen's crash (ours is 2). 1 << 32 would be poweroff to a hypervisor that looks at
    // ESI only: that ends the domain without a result line, which also fails the test.
    for reason in [3, 99, u64::MAX, 1 << 32] {
        // SAFETY: shutdown with an invalid reason must return; if it does not, the domain ends
        // without a `Test result:` line and the test fails, which is what we want.
        let rax = unsafe { hypercall2(SCHED_OP, SchedOp::Shutdown as u64, reason) };
        check_eq!(
            format_args!("shutdown with reason {reason:#x}"),
            Status::err(Errno::EINVAL),
            Status(rax)
        );
    }
    check_eq!(
        "version after the refused shutdowns",
        Ok(u64::from(lamina_abi::abi_version())),
        hypercall::version()
    );
}

conformance_test! {
    title: "block with an event pending returns 0 at once and clears the upcall mask",
    section: "3.3 sched_op",
    expect: Success,
}
pub(super) fn block_returns_if_event_pending() {
    let Some(port) = loopback_port() else { return };
    expect_ok(format_args!("Send({port})"), hv::send(port));
    check_eq!(
        "evtchn_upcall_pending before Block",
        1,
        shared::upcall_pending().load(Ordering::SeqCst)
    );
    // Nothing could ever wake this vCPU: had Block waited, the domain would be stopped.
    let watch = Stopwatch::start();
    let before = shared::now();
    check_eq!("Block with an event pending", Status(0), hv::block());
    let took = shared::now() - before;
    watch.check_prompt(format_args!("Block with an event pending"), took);
    check_eq!(
        "evtchn_upcall_mask after Block (Block clears it)",
        0,
        shared::upcall_mask().load(Ordering::SeqCst)
    );
}

conformance_test! {
    title: "block sleeps until the one-shot timer raises VIRQ_TIMER, never before its deadline",
    section: "3.3 sched_op",
    expect: Success,
}
pub(super) fn block_wakes_on_timer() {
    let Some(timer) = timer_port() else { return };
    let watch = Stopwatch::start();
    let deadline = shared::now() + 2 * MS;
    if expect_ok(
        "SetSingleshotTimer(now + 2 ms)",
        hv::set_singleshot_timer(0, deadline),
    )
    .is_none()
    {
        return;
    }
    check_eq!("Block until the timer", Status(0), hv::block());
    let at = shared::now();
    watch.check_on_time(format_args!("Block woken by VIRQ_TIMER"), deadline, at);
    check!(
        shared::is_pending(timer),
        "VIRQ_TIMER port {timer} not pending after Block returned"
    );
    check_eq!(
        "evtchn_upcall_pending after Block returned",
        1,
        shared::upcall_pending().load(Ordering::SeqCst)
    );
}

conformance_test! {
    title: "block with nothing that can ever wake the vCPU (VIRQ_TIMER bound, no timer armed) stops the domain",
    section: "3.3 sched_op",
    expect: StoppedByHv("blocked with nothing that can ever wake the vCPU"),
}
/// Block with a loopback port and VIRQ_TIMER bound but no timer armed: nothing can ever
/// wake the vCPU, and the hypervisor must stop the domain rather than let it sleep forever.
pub(super) fn block_without_wake_stopped() {
    let _ = (loopback_port(), timer_port());
    println!("block_without_wake_stopped: blocking with no timer armed and no VIRQ_CONSOLE");
    hv::block();
}

conformance_test! {
    title: "poll returns 0 at once when a listed port is pending, and leaves the upcall mask alone",
    section: "3.3 sched_op",
    expect: Success,
}
pub(super) fn poll_pending_returns_at_once() {
    let (Some(idle), Some(port)) = (loopback_port(), loopback_port()) else {
        return;
    };
    expect_ok(format_args!("Send({port})"), hv::send(port));
    let watch = Stopwatch::start();
    let before = shared::now();
    check_eq!(
        format_args!("Poll([{port}], no deadline) with the port pending"),
        Status(0),
        hv::poll(&[port as u32], 0)
    );
    check_eq!(
        format_args!("Poll([{idle}, {port}]) with the second port pending"),
        Status(0),
        hv::poll(&[idle as u32, port as u32], before + LATE_BOUND_NS)
    );
    let took = shared::now() - before;
    watch.check_prompt(format_args!("two polls on a pending port"), took);
    // Poll clears no pending bit (the guest consumes the event) and does not touch the
    // upcall mask (set at boot).
    check!(
        shared::is_pending(port),
        "Poll cleared the pending bit of port {port}"
    );
    check_eq!(
        "evtchn_upcall_mask after Poll",
        1,
        shared::upcall_mask().load(Ordering::SeqCst)
    );
}

conformance_test! {
    title: "poll returns -ETIMEDOUT at its deadline, never before, and at once for a past deadline",
    section: "3.3 sched_op",
    expect: Success,
}
pub(super) fn poll_deadline_etimedout() {
    let Some(idle) = loopback_port() else { return };
    for delay in [MS, 3 * MS] {
        let watch = Stopwatch::start();
        let deadline = shared::now() + delay;
        check_eq!(
            format_args!("Poll([{idle}]) with a deadline {delay} ns ahead"),
            Status::err(Errno::ETIMEDOUT),
            hv::poll(&[idle as u32], deadline)
        );
        watch.check_on_time(
            format_args!("Poll deadline {delay} ns ahead"),
            deadline,
            shared::now(),
        );
    }
    // Deadlines already past time out at once.
    for deadline in [shared::now() - MS, 1] {
        let watch = Stopwatch::start();
        let before = shared::now();
        check_eq!(
            format_args!("Poll([{idle}]) with the deadline {deadline} ns, past"),
            Status::err(Errno::ETIMEDOUT),
            hv::poll(&[idle as u32], deadline)
        );
        let took = shared::now() - before;
        watch.check_prompt(format_args!("Poll with a past deadline"), took);
    }
}

conformance_test! {
    title: "poll of 0 or more than POLL_PORTS_MAX ports, or of a port >= 1024, returns -EINVAL",
    section: "3.3 sched_op",
    expect: Success,
}
pub(super) fn poll_bad_args_einval() {
    let Some(port) = loopback_port() else { return };
    expect_ok(format_args!("Send({port})"), hv::send(port));
    let mut ports = [port as u32; POLL_PORTS_MAX as usize + 1];
    let gpa = ports.as_ptr() as u64;
    let mem = start_info().mem_bytes;
    // Counts: 0 and above the maximum, also with an array beyond RAM (the count is checked
    // first), and one a hypervisor truncating to 32 bits would take for 1.
    for (count, at) in [
        (0, gpa),
        (POLL_PORTS_MAX + 1, gpa),
        (0, mem),
        (POLL_PORTS_MAX + 1, mem),
        (1 << 32 | 1, gpa),
        (u64::MAX, gpa),
    ] {
        check_eq!(
            format_args!("Poll of {count:#x} ports at {at:#x}"),
            Status::err(Errno::EINVAL),
            hv::poll_at(at, count, 0)
        );
    }
    check_eq!(
        "Poll of POLL_PORTS_MAX ports, one pending",
        Status(0),
        hv::poll_at(gpa, POLL_PORTS_MAX, 0)
    );
    // A port number out of range, even next to a pending one.
    for bad in [1024, 1025, u32::MAX] {
        ports[1] = bad;
        check_eq!(
            format_args!("Poll([{port}, {bad:#x}])"),
            Status::err(Errno::EINVAL),
            hv::poll(&ports[..2], 0)
        );
    }
}

conformance_test! {
    title: "poll with a port array not inside RAM returns -EFAULT, even with a pending port in RAM",
    section: "3.3 sched_op",
    expect: Success,
}
pub(super) fn poll_array_oob_efault() {
    let Some(port) = loopback_port() else { return };
    expect_ok(format_args!("Send({port})"), hv::send(port));
    let mem = start_info().mem_bytes;
    // The SDK's unused top of RAM holds pending ports, so that only the bounds can fail.
    let top = mem - TOP_OF_RAM_SCRATCH;
    for slot in 0..TOP_OF_RAM_SCRATCH / 4 {
        // SAFETY: `_start` leaves `[mem - TOP_OF_RAM_SCRATCH, mem)` unused; RAM is
        // identity-mapped.
        unsafe { core::ptr::write_volatile((top + slot * 4) as *mut u32, port as u32) };
    }
    let cases: [(&str, u64, u64); 6] = [
        ("at the end of RAM", mem, 1),
        ("straddling the end of RAM by 2 bytes", mem - 2, 1),
        ("of 5 ports, the last one beyond RAM", top, 5),
        ("at the highest address", u64::MAX - 3, 1),
        ("wrapping around to low RAM", u64::MAX - 3, 2),
        ("at a non-canonical address", 1 << 63, 1),
    ];
    for (what, gpa, count) in cases {
        check_eq!(
            format_args!("Poll, array {what} (gpa {gpa:#x}, {count} ports)"),
            Status::err(Errno::EFAULT),
            hv::poll_at(gpa, count, 0)
        );
    }
    check_eq!(
        "Poll of the 4 ports at the top of RAM",
        Status(0),
        hv::poll_at(top, 4, 0)
    );
}

conformance_test! {
    title: "poll wakes when a masked VIRQ_TIMER port becomes pending, never before the deadline",
    section: "3.3 sched_op",
    expect: Success,
}
pub(super) fn poll_wakes_on_masked_timer() {
    let Some(timer) = timer_port() else { return };
    // Poll waits on pending bits: a masked port wakes it too, and upcalls stay masked.
    shared::set_masked(timer, true);
    let watch = Stopwatch::start();
    let deadline = shared::now() + 2 * MS;
    if expect_ok(
        "SetSingleshotTimer(now + 2 ms)",
        hv::set_singleshot_timer(0, deadline),
    )
    .is_none()
    {
        return;
    }
    let at = wait_until_pending("masked VIRQ_TIMER", timer);
    watch.check_on_time(
        format_args!("Poll woken by a masked VIRQ_TIMER"),
        deadline,
        at,
    );
    check!(
        shared::is_pending(timer),
        "VIRQ_TIMER port {timer} not pending after Poll returned"
    );
    check_eq!(
        "evtchn_upcall_mask after Poll",
        1,
        shared::upcall_mask().load(Ordering::SeqCst)
    );
}

conformance_test! {
    title: "poll without deadline on ports nothing can raise stops the domain",
    section: "3.3 sched_op",
    expect: StoppedByHv("blocked with nothing that can ever wake the vCPU"),
}
/// Poll without deadline on a port nothing can raise: the hypervisor must stop the domain.
pub(super) fn poll_without_wake_stopped() {
    let Some(idle) = loopback_port() else { return };
    println!("poll_without_wake_stopped: polling port {idle} with no deadline and no wake source");
    hv::poll(&[idle as u32], 0);
}

/// Shuts down with `reason`: the hypervisor reports the ending in its summary, which the
/// runner checks (no result line: the domain does not come back).
fn shut_down_with(reason: u64) {
    println!("shutting down with reason {reason}");
    // SAFETY: shutdown with a valid reason does not return; should it, `main` reports a
    // result line, which fails the test (the runner expects none).
    let _ = unsafe { hypercall2(SCHED_OP, SchedOp::Shutdown as u64, reason) };
}

conformance_test! {
    title: "shutdown with reason reboot ends the domain, reported as end=reboot",
    section: "3.3 sched_op",
    expect: Ends("reboot"),
}
pub(super) fn shutdown_reboot_reported() {
    shut_down_with(ShutdownReason::Reboot as u64);
}

conformance_test! {
    title: "shutdown with reason crash ends the domain, reported as end=crash",
    section: "3.3 sched_op",
    expect: Ends("crash"),
}
pub(super) fn shutdown_crash_reported() {
    shut_down_with(ShutdownReason::Crash as u64);
}

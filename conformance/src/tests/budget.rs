//! Tests of the console budget (docs/abi.md 13.1). The budget is spent on carriage returns,
//! which the hypervisor counts but never prints, so the tests leave no noise in the log. A
//! test checks only once the budget has grown again: its own lines need it too.

use core::sync::atomic::Ordering;

use lamina_abi::Errno;
use lamina_abi::console::{CONSOLE_BUDGET_BYTES, CONSOLE_BUDGET_BYTES_PER_S, CONSOLE_WRITE_MAX};
use lamina_guest_sdk::hypercall::gpa_of;
use lamina_guest_sdk::start_info;

use crate::framework::{Status, check, check_eq};
use crate::hv;
use crate::shared::{self, ring_out_cons, ring_out_prod, ring_write};

/// `CONSOLE_WRITE_MAX` carriage returns: counted against the budget, never printed.
static RETURNS: [u8; CONSOLE_WRITE_MAX as usize] = [b'\r'; CONSOLE_WRITE_MAX as usize];

/// What the budget earns in `ns` of system time, and a byte for the fraction.
const fn earned(ns: u64) -> u64 {
    ns * CONSOLE_BUDGET_BYTES_PER_S / 1_000_000_000 + 1
}

/// How long the budget takes to hold `bytes` again, with a margin.
const fn refill_ns(bytes: u64) -> u64 {
    bytes * 1_000_000_000 / CONSOLE_BUDGET_BYTES_PER_S + 20_000_000
}

/// Waits until system time has advanced by `ns`, polling a port of its own with a deadline.
fn sleep_ns(ns: u64) {
    let port = hv::alloc_unbound(lamina_abi::event_channel::DOMID_SELF);
    let deadline = shared::now() + ns;
    while shared::now() < deadline {
        let _ = hv::poll(&[port.0 as u32], deadline);
    }
    let _ = hv::close(port.0);
}

fn write(len: u64) -> Status {
    hv::console_io(
        lamina_abi::console::ConsoleOp::Write as u64,
        gpa_of(&RETURNS),
        len,
    )
}

/// Writes `CONSOLE_WRITE_MAX` bytes until a write is refused, then ever smaller writes down to
/// one byte: the budget is spent. Returns the bytes taken, the writes taken whole before the
/// first refusal, that refusal, and the system time just before the last write refused.
fn spend_the_budget() -> (u64, u32, Status, u64) {
    let mut taken = 0;
    let mut whole = 0;
    let mut refusal = Status(0);
    let mut last_refused_at = 0;
    for _ in 0..2 * (CONSOLE_BUDGET_BYTES / CONSOLE_WRITE_MAX) {
        let status = write(CONSOLE_WRITE_MAX);
        if status != Status(CONSOLE_WRITE_MAX) {
            refusal = status;
            break;
        }
        taken += CONSOLE_WRITE_MAX;
        whole += 1;
    }
    let mut len = CONSOLE_WRITE_MAX / 2;
    while len > 0 {
        let tried_at = shared::now();
        if write(len) == Status(len) {
            taken += len;
        } else {
            last_refused_at = tried_at;
            len /= 2;
        }
    }
    (taken, whole, refusal, last_refused_at)
}

conformance_test! {
    title: "console writes beyond the console budget return -EAGAIN until it refills",
    section: "13.1 Console budget",
    expect: Success,
}
pub(super) fn console_budget_eagain() {
    let started = shared::now();
    let (taken, whole, refusal, last_refused_at) = spend_the_budget();
    // What came back while the writes ran (other domains run in between).
    let refilled = earned(shared::now() - started);
    // The budget refills all the time, and keeps the fraction of a byte it earned: when the
    // 1-byte write was refused, less than a byte was left, so a byte may come back at any
    // moment after (once 13 us later on VT-x with 2 CPUs). Two bytes need a whole byte's
    // refill time since that refusal, which only a vCPU that lost the CPU in between gets.
    let refused_again = write(2);
    let retry_gap_ns = shared::now() - last_refused_at;
    let byte_came_back = retry_gap_ns * CONSOLE_BUDGET_BYTES_PER_S >= 1_000_000_000;
    // Room for the result lines, and for one write of 512 bytes that must then be taken.
    sleep_ns(refill_ns(1024));
    let after_refill = write(512);
    sleep_ns(refill_ns(512));
    check_eq!(
        "the first write refused",
        Status::err(Errno::EAGAIN),
        refusal
    );
    // What the suite printed before the test came out of the same budget.
    check!(
        taken + 1024 >= CONSOLE_BUDGET_BYTES && taken <= CONSOLE_BUDGET_BYTES + refilled,
        "the budget took {taken} bytes ({whole} writes of {CONSOLE_WRITE_MAX}) before refusing, expected CONSOLE_BUDGET_BYTES ({CONSOLE_BUDGET_BYTES}) and at most the {refilled} bytes earned meanwhile"
    );
    check!(
        refused_again == Status::err(Errno::EAGAIN)
            || (byte_came_back && refused_again == Status(2)),
        "a 2-byte write with the budget spent: {refused_again:?}, expected -EAGAIN ({retry_gap_ns} ns after the 1-byte write refused)"
    );
    check_eq!(
        "a 512-byte write once the budget had time to refill",
        Status(512),
        after_refill
    );
}

conformance_test! {
    title: "the console ring keeps what the spent console budget cannot print, until it refills",
    section: "13.1 Console budget",
    expect: Success,
}
pub(super) fn console_ring_waits_for_budget() {
    const BYTES: u32 = 256;
    let port = u64::from(start_info().console_port);
    let _ = spend_the_budget();
    let spent = shared::now();
    ring_write(&RETURNS[..BYTES as usize]);
    let kicked = hv::send(port);
    let refilled = earned(shared::now() - spent) as u32;
    let waiting_spent = ring_out_prod()
        .load(Ordering::SeqCst)
        .wrapping_sub(ring_out_cons().load(Ordering::SeqCst));
    sleep_ns(refill_ns(u64::from(BYTES) + 1024));
    let kicked_again = hv::send(port);
    let waiting_refilled = ring_out_prod()
        .load(Ordering::SeqCst)
        .wrapping_sub(ring_out_cons().load(Ordering::SeqCst));
    check_eq!("send on the console port", Status(0), kicked);
    // A few bytes may have come back between the last refused write and the send.
    check!(
        waiting_spent + refilled + 1 >= BYTES && waiting_spent <= BYTES && waiting_spent > 0,
        "{waiting_spent} of {BYTES} bytes left in the ring with the budget spent, expected all but the {refilled} bytes earned meanwhile"
    );
    check_eq!("send once the budget refilled", Status(0), kicked_again);
    check_eq!(
        "bytes left in the ring once the budget refilled",
        0,
        waiting_refilled
    );
}

//! Tests of the console ring (docs/abi.md 13): the guest produces output into the ring page,
//! the hypervisor consumes it when the guest sends on the console port, and at the latest at
//! the domain's next yield, poll or block. Consumed output is printed as `(dN)` lines, which
//! show in the run's log; the tests check the consumer index.

use core::fmt::{self, Write};
use core::sync::atomic::Ordering;

use lamina_abi::console::CONSOLE_RING_OUTPUT_BYTES;
use lamina_guest_sdk::start_info;

use super::common::loopback_port;
use crate::framework::{Status, check, check_eq, expect_ok};
use crate::hv;
use crate::shared::{self, ring_out_cons, ring_out_prod, ring_write};
use crate::timing::MS;

/// A line formatted on the stack.
struct Line {
    bytes: [u8; 128],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            bytes: [0; 128],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Write for Line {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let end = self.len + text.len();
        self.bytes
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Sends on the console port; records a failure if refused.
fn kick() {
    let port = u64::from(start_info().console_port);
    expect_ok(
        format_args!("Send({port}), the console port"),
        hv::send(port),
    );
}

/// Checks that the hypervisor consumed everything produced.
fn check_drained(what: core::fmt::Arguments<'_>) -> bool {
    check_eq!(
        format_args!("out_cons {what}"),
        ring_out_prod().load(Ordering::SeqCst),
        ring_out_cons().load(Ordering::SeqCst)
    )
}

conformance_test! {
    title: "a send on the console port has the hypervisor consume the ring at once",
    section: "13 Console ring",
    expect: Success,
}
pub(super) fn console_ring_drained_on_send() {
    check_drained(format_args!("at boot (an empty ring)"));
    ring_write(b"console_ring_drained_on_send: a line through the console ring\n");
    kick();
    check_drained(format_args!("after Send on the console port"));
    // The hypervisor is the port's other end: a send sets no pending bit here.
    let port = u64::from(start_info().console_port);
    check_eq!(
        format_args!("pending bit of the console port {port} after Send"),
        false,
        shared::is_pending(port)
    );
    ring_write(b"console_ring_drained_on_send: two lines\nconsole_ring_drained_on_send: at once\n");
    kick();
    check_drained(format_args!("after a second Send"));
}

conformance_test! {
    title: "output wraps around the 2 KiB ring many times, and a full ring is consumed",
    section: "13 Console ring",
    expect: Success,
}
pub(super) fn console_ring_wraps_around() {
    // About 4 KiB in lines of 80-90 bytes: the output buffer (2 KiB) wraps twice.
    for number in 0..48 {
        let mut line = Line::new();
        let _ = writeln!(
            line,
            "console_ring_wraps_around: line {number:02} at producer index {:5}, ring of 2048 bytes",
            ring_out_prod().load(Ordering::SeqCst)
        );
        ring_write(line.as_bytes());
        if number % 3 == 2 {
            kick();
            if !check_drained(format_args!("after line {number}")) {
                return;
            }
        }
    }
    // A completely full ring (out_prod - out_cons == 2048) is valid, not bogus: 32 lines of
    // 64 bytes, published with one producer update (the hypervisor may drain the ring at any
    // exit, docs/abi.md 13, so only a single update fills it for sure).
    let mut full = [0u8; CONSOLE_RING_OUTPUT_BYTES];
    for (number, chunk) in full.chunks_mut(64).enumerate() {
        let mut line = Line::new();
        let _ = write!(
            line,
            "console_ring_wraps_around: full ring, part {number:02} "
        );
        while line.len < 63 {
            let _ = line.write_char('.');
        }
        let _ = line.write_char('\n');
        chunk.copy_from_slice(line.as_bytes());
    }
    check_drained(format_args!("before filling the ring"));
    ring_write(&full);
    let waiting = ring_out_prod()
        .load(Ordering::SeqCst)
        .wrapping_sub(ring_out_cons().load(Ordering::SeqCst));
    check!(
        waiting == CONSOLE_RING_OUTPUT_BYTES as u32 || waiting == 0,
        "bytes waiting after filling the ring in one update: {waiting}, expected 2048 (or 0 if an exit drained it)"
    );
    kick();
    check_drained(format_args!("after a full ring"));
}

conformance_test! {
    title: "a bogus out_prod is treated as an empty ring; indices run across the 32-bit wrap",
    section: "13 Console ring",
    expect: Success,
}
pub(super) fn console_ring_bogus_prod_reset() {
    let cons = ring_out_cons().load(Ordering::SeqCst);
    // More than a ring's worth waiting: bogus, treated as empty, out_cons set to out_prod.
    ring_out_prod().store(cons.wrapping_add(4096), Ordering::SeqCst);
    kick();
    check_drained(format_args!("after a bogus out_prod (4096 bytes waiting)"));
    // Indices run freely: continue just below the wrap of the 32-bit indices.
    ring_out_prod().store(0xffff_ff80, Ordering::SeqCst);
    kick();
    check_drained(format_args!("after moving out_prod to 0xffffff80"));
    for number in 0..3 {
        let mut line = Line::new();
        let _ = writeln!(
            line,
            "console_ring_bogus_prod_reset: line {number} across the wrap of the 32-bit indices"
        );
        ring_write(line.as_bytes());
    }
    check_eq!(
        "out_prod wrapped past 2^32",
        true,
        ring_out_prod().load(Ordering::SeqCst) < 0x100
    );
    kick();
    check_drained(format_args!("after lines across the index wrap"));
}

conformance_test! {
    title: "the console port may be closed; the ring is then printed at the domain's exits",
    section: "13 Console ring",
    expect: Success,
}
pub(super) fn console_port_close_keeps_ring() {
    let port = u64::from(start_info().console_port);
    check_eq!(
        format_args!("Close({port}), the console port"),
        Status(0),
        hv::close(port)
    );
    if let Some(status) = super::common::port_status(port) {
        check_eq!(
            "state of the closed console port",
            lamina_abi::event_channel::PortState::Free as u8,
            status.state
        );
    }
    check_eq!(
        format_args!("Send({port}) after closing it"),
        Status::err(lamina_abi::Errno::EINVAL),
        hv::send(port)
    );
    // The ring is still printed, at the domain's exits.
    ring_write(b"console_port_close_keeps_ring: printed at a yield, the console port closed\n");
    check_eq!("yield", Status(0), hv::sched_yield());
    check_drained(format_args!("after a yield, with the console port closed"));
    // Allocations still start at 2.
    check_eq!(
        "AllocUnbound after the console port was closed",
        Status(2),
        hv::alloc_unbound(lamina_abi::event_channel::DOMID_SELF)
    );
}

conformance_test! {
    title: "the ring is consumed at the latest at the domain's next yield, poll or block",
    section: "13 Console ring",
    expect: Success,
}
pub(super) fn console_ring_drained_on_yield() {
    let Some(port) = loopback_port() else { return };
    ring_write(b"console_ring_drained_on_yield: drained by a yield\n");
    check_eq!("yield", Status(0), hv::sched_yield());
    check_drained(format_args!("after a yield"));

    ring_write(b"console_ring_drained_on_yield: drained by a poll\n");
    let _ = hv::poll(&[port as u32], shared::now() + MS);
    check_drained(format_args!("after a poll"));

    ring_write(b"console_ring_drained_on_yield: drained by a block\n");
    expect_ok(format_args!("Send({port})"), hv::send(port));
    check_eq!("Block with an event pending", Status(0), hv::block());
    check_drained(format_args!("after a block"));
}

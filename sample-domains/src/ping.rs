//! `role=ping`: the front end. Owns the ring page, grants it to pong, sends the requests and
//! checks every byte of every answer (see the crate documentation for the conventions).

use lamina_abi::Errno;
use lamina_abi::event_channel::PortState;
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::grant::{self, Access};
use lamina_guest_sdk::{println, sched, time};
use sample_domains::message;
use sample_domains::ring::{PAYLOAD_BYTES, RING_SLOTS, Received, RingPage};

use crate::{
    Decimal3, MAX_ATTEMPTS, PerMessage, RING_GRANT, RING_PORT, exit_count, exits_since, fail,
    finish, wait_for_peer,
};

/// Messages when the command line does not say (`messages=`).
pub(crate) const DEFAULT_MESSAGES: u32 = 10_000;
/// How many bad answers are described one by one before the rest are only counted.
const REPORTED_ERRORS: u64 = 5;

/// The page ping shares. A `static` is page-aligned (the type says so) and, under the boot
/// identity map, its address is its guest-physical address.
static RING: RingPage = RingPage::new();

/// What the exchange came to.
#[derive(Default)]
struct Tally {
    sent: u32,
    answered: u32,
    /// Answers with a wrong number, length or byte.
    bad_answers: u64,
    bytes_checked: u64,
}

pub(crate) fn run(peer: u32, total: u32, crash_after: Option<u32>) -> ! {
    if total == 0 {
        fail("ping", format_args!("messages= must be at least 1"));
    }
    RING.init(total);
    let page_gpa = &raw const RING as u64;
    match grant::grant_access(peer, page_gpa, Access::ReadWrite) {
        Ok(grant) if grant == RING_GRANT => {}
        Ok(grant) => fail(
            "ping",
            format_args!(
                "the ring's grant is reference {}, pong expects {}",
                grant.number(),
                RING_GRANT.number()
            ),
        ),
        Err(error) => fail(
            "ping",
            format_args!("grant_access of {page_gpa:#x} to domain {peer} failed: {error}"),
        ),
    }
    let port = match events::alloc_unbound_for(peer) {
        Ok(port) if port == RING_PORT => port,
        Ok(port) => fail("ping", format_args!("got {port}, pong expects {RING_PORT}")),
        Err(error) => fail(
            "ping",
            format_args!("alloc_unbound for domain {peer} failed: {error}"),
        ),
    };
    // Polled for, never delivered as an upcall.
    events::mask(port);
    println!(
        "ping: ring page {page_gpa:#x} granted to domain {peer} as grant {}, {port} offered; waiting for pong",
        RING_GRANT.number()
    );
    wait_until_connected(port, peer);
    println!("ping: pong connected; sending {total} messages, at most {RING_SLOTS} in flight");

    let exits_before = exit_count();
    let started_ns = time::now_ns();
    let tally = exchange(port, peer, total, crash_after);
    let elapsed_ns = time::now_ns().saturating_sub(started_ns).max(1);
    let exits = exits_since(exits_before);

    release(port, peer);
    println!(
        "ping: result: messages={} errors={} bytes_checked={} elapsed_ms={} messages_per_s={} exits_per_message={}",
        tally.answered,
        tally.bad_answers,
        tally.bytes_checked,
        Decimal3 {
            numerator: elapsed_ns,
            denominator: 1_000_000
        },
        u128::from(tally.answered) * 1_000_000_000 / u128::from(elapsed_ns),
        PerMessage(exits, tally.answered)
    );
    println!("ping: grant ended, port closed; powering off");
    finish(tally.bad_answers)
}

/// Until pong has bound to our port (it turns inter-domain), yielding meanwhile.
fn wait_until_connected(port: Port, peer: u32) {
    for _ in 0..MAX_ATTEMPTS {
        match events::port_info(port) {
            Ok(info) if info.state == Some(PortState::Interdomain) => {
                if info.peer != Some(peer as u16) {
                    fail("ping", format_args!("{port} is connected to {info}"));
                }
                return;
            }
            Ok(_) => {
                let _ = sched::yield_now();
            }
            Err(error) => fail("ping", format_args!("status of {port} failed: {error}")),
        }
    }
    fail(
        "ping",
        format_args!("pong never bound to {port} ({MAX_ATTEMPTS} attempts)"),
    )
}

/// Sends `total` requests and takes their answers, checking each; returns the tally.
fn exchange(port: Port, peer: u32, total: u32, crash_after: Option<u32>) -> Tally {
    let (mut requests, mut answers) = RING.front();
    let mut buffer = [0u8; PAYLOAD_BYTES];
    let mut tally = Tally::default();
    // Set when a wait ended: if the next round finds nothing to do, the peer may be gone.
    let mut woken = false;
    while tally.answered < total {
        // Before looking at the ring: an event that comes after this is not lost.
        events::clear_pending(port);
        let mut progress = false;
        loop {
            match answers.pop(&mut buffer) {
                Ok(Some(received)) => {
                    check_answer(&mut tally, received, &buffer);
                    progress = true;
                }
                Ok(None) => break,
                Err(error) => fail("ping", format_args!("{error} in the answers")),
            }
        }
        while tally.sent < total && tally.sent - tally.answered < RING_SLOTS {
            let len = message::fill_request(tally.sent, &mut buffer);
            if let Err(error) = requests.push(tally.sent, &buffer[..len]) {
                fail("ping", format_args!("request {}: {error}", tally.sent));
            }
            tally.sent += 1;
            progress = true;
        }
        if requests.publish()
            && let Err(error) = events::send(port)
        {
            fail("ping", format_args!("send on {port} failed: {error}"));
        }
        if let Some(limit) = crash_after
            && tally.answered >= limit
        {
            println!(
                "ping: crash_after={limit}: {} answers in, {} requests in flight; crashing on purpose",
                tally.answered,
                tally.sent - tally.answered
            );
            panic!("crash_after={limit} reached");
        }
        if progress {
            woken = false;
            continue;
        }
        match answers.prepare_to_wait() {
            Ok(true) => {}
            Ok(false) => continue,
            Err(error) => fail("ping", format_args!("{error} in the answers")),
        }
        if woken {
            check_peer_still_there(port, peer, &tally);
        }
        match wait_for_peer(port) {
            Ok(true) => woken = true,
            Ok(false) => fail(
                "ping",
                format_args!(
                    "no answer from pong for 2 s ({} of {total} answered)",
                    tally.answered
                ),
            ),
            Err(error) => fail("ping", format_args!("poll on {port} failed: {error}")),
        }
    }
    tally
}

/// The answer to request `tally.answered`: its number and every byte.
fn check_answer(tally: &mut Tally, received: Received, bytes: &[u8; PAYLOAD_BYTES]) {
    let id = tally.answered;
    let len = (received.len as usize).min(PAYLOAD_BYTES);
    let wrong_bytes = message::response_mismatches(id, &bytes[..len])
        + (received.len as usize).saturating_sub(PAYLOAD_BYTES);
    tally.bytes_checked += len as u64;
    tally.answered += 1;
    if received.id != id || wrong_bytes != 0 {
        tally.bad_answers += 1;
        if tally.bad_answers <= REPORTED_ERRORS {
            println!(
                "ping: error: answer {id}: number {}, length {} (expected {}), {wrong_bytes} wrong bytes",
                received.id,
                received.len,
                message::request_len(id)
            );
        }
    }
}

/// Woken with nothing to do: pong may have closed its end or died.
fn check_peer_still_there(port: Port, peer: u32, tally: &Tally) {
    match events::port_info(port) {
        Ok(info) if info.state == Some(PortState::Interdomain) => {}
        Ok(info) => fail(
            "ping",
            format_args!(
                "pong (domain {peer}) is gone after {} answers: {port} is {info}",
                tally.answered
            ),
        ),
        Err(error) => fail("ping", format_args!("status of {port} failed: {error}")),
    }
}

/// After the last answer: ends the grant once pong has unmapped it (pong notifies when it
/// has), then closes the port, which tells pong we are done.
fn release(port: Port, peer: u32) {
    for _ in 0..MAX_ATTEMPTS {
        events::clear_pending(port);
        match grant::end_access(RING_GRANT) {
            Ok(()) => {
                if let Err(error) = events::close(port) {
                    fail("ping", format_args!("close of {port} failed: {error}"));
                }
                return;
            }
            Err(error) if error == Errno::EBUSY => match wait_for_peer(port) {
                Ok(true) => {}
                Ok(false) => fail(
                    "ping",
                    format_args!("pong (domain {peer}) kept the ring mapped for 2 s"),
                ),
                Err(error) => fail("ping", format_args!("poll on {port} failed: {error}")),
            },
            Err(error) => fail("ping", format_args!("end_access failed: {error}")),
        }
    }
    fail(
        "ping",
        format_args!("the grant stayed busy ({MAX_ATTEMPTS} attempts)"),
    )
}

//! `role=pong`: the back end. Maps ping's ring page, checks every byte of every request and
//! answers it; survives ping's death (see the crate documentation).

use lamina_abi::Errno;
use lamina_abi::event_channel::PortState;
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::grant::{self, Access};
use lamina_guest_sdk::hypercall::HypercallError;
use lamina_guest_sdk::{println, sched};
use sample_domains::message;
use sample_domains::ring::{
    Consumer, PAGE_BYTES, PAYLOAD_BYTES, Producer, RING_MAGIC, RingError, RingPage,
};

use crate::{
    MAX_ATTEMPTS, PerMessage, RING_GRANT, RING_PORT, exit_count, exits_since, fail, finish,
    wait_for_peer,
};

/// Where pong maps the ring: the first page of its grant window.
const RING_WINDOW_PAGE: u64 = 0;
/// Messages pong sends through a ring of its own after its peer died, to show it runs on.
const MESSAGES_AFTER_PEER: u32 = 2_000;

/// Ping's page, mapped into our grant window. [`Mapping::unmap`] consumes it, so no reference
/// into the page outlives the mapping.
struct Mapping {
    slot: u64,
}

impl Mapping {
    fn map(peer: u32, slot: u64) -> Result<Mapping, HypercallError> {
        grant::map(peer, RING_GRANT, slot, Access::ReadWrite)?;
        Ok(Mapping { slot })
    }

    fn page(&self) -> &RingPage {
        // SAFETY: `slot` is a page of the grant window with a grant mapped read-write (map
        // returned 0), identity-mapped by the boot page tables, and stays mapped until
        // `unmap` consumes `self`, which this borrow prevents. `RingPage` is one page of
        // atomics, so the peer writing it meanwhile is no data race, and any bytes are a
        // valid value. If ping dies, the hypervisor puts a page of zeros there instead.
        unsafe { &*(self.slot as *const RingPage) }
    }

    fn unmap(self) -> Result<(), HypercallError> {
        grant::unmap(self.slot)
    }
}

/// How serving ended.
enum Served {
    /// Every request answered.
    Finished,
    /// Ping's end of the channel is gone (its port turned unbound).
    PeerGone { why: &'static str },
}

/// What pong saw.
#[derive(Default)]
struct Tally {
    answered: u32,
    bad_requests: u64,
    bytes_checked: u64,
}

pub(crate) fn run(peer: u32) -> ! {
    let slot = grant::window_slot(RING_WINDOW_PAGE).unwrap_or(0);
    let mapping = map_when_granted(peer, slot);
    if mapping.page().magic() != RING_MAGIC {
        fail(
            "pong",
            format_args!("domain {peer}'s grant 0 is not an initialised ring page"),
        );
    }
    let total = mapping.page().total();
    let port = bind_when_offered(peer);
    events::mask(port);
    println!(
        "pong: mapped domain {peer}'s grant {} at {slot:#x}, bound its {RING_PORT} as {port}; answering {total} messages",
        RING_GRANT.number()
    );

    let exits_before = exit_count();
    let mut tally = Tally::default();
    let served = serve(mapping.page(), port, total, &mut tally);
    let exits = exits_since(exits_before);
    match served {
        Served::Finished => {}
        Served::PeerGone { why } => survive(mapping, port, peer, &tally, total, why),
    }

    if let Err(error) = mapping.unmap() {
        fail("pong", format_args!("unmap of {slot:#x} failed: {error}"));
    }
    // Tell ping the page is free: it can end the grant now.
    if let Err(error) = events::send(port) {
        fail("pong", format_args!("send on {port} failed: {error}"));
    }
    wait_for_close(port, peer);
    println!(
        "pong: result: messages={} errors={} bytes_checked={} exits_per_message={}",
        tally.answered,
        tally.bad_requests,
        tally.bytes_checked,
        PerMessage(exits, tally.answered)
    );
    println!("pong: unmapped; ping ended its grant and closed its port; powering off");
    finish(tally.bad_requests)
}

/// Maps ping's grant, retrying while it does not exist yet.
fn map_when_granted(peer: u32, slot: u64) -> Mapping {
    for _ in 0..MAX_ATTEMPTS {
        match Mapping::map(peer, slot) {
            Ok(mapping) => return mapping,
            Err(error) if error == Errno::ENOENT => {
                let _ = sched::yield_now();
            }
            Err(error) => fail(
                "pong",
                format_args!("map of domain {peer}'s grant 0 failed: {error}"),
            ),
        }
    }
    fail(
        "pong",
        format_args!("domain {peer} never granted its ring ({MAX_ATTEMPTS} attempts)"),
    )
}

/// Binds to ping's port, retrying while it is not offered yet.
fn bind_when_offered(peer: u32) -> Port {
    for _ in 0..MAX_ATTEMPTS {
        match events::bind_interdomain(peer, RING_PORT) {
            Ok(port) => return port,
            Err(error) if error == Errno::EINVAL => {
                let _ = sched::yield_now();
            }
            Err(error) => fail(
                "pong",
                format_args!("bind to domain {peer}'s {RING_PORT} failed: {error}"),
            ),
        }
    }
    fail(
        "pong",
        format_args!("domain {peer} never offered {RING_PORT} ({MAX_ATTEMPTS} attempts)"),
    )
}

/// Answers requests until `total` are answered or ping is gone.
fn serve(page: &RingPage, port: Port, total: u32, tally: &mut Tally) -> Served {
    let (mut requests, mut answers) = page.back();
    let mut request = [0u8; PAYLOAD_BYTES];
    let mut answer = [0u8; PAYLOAD_BYTES];
    let mut woken = false;
    while tally.answered < total {
        events::clear_pending(port);
        let mut progress = false;
        loop {
            let received = match requests.pop(&mut request) {
                Ok(Some(received)) => received,
                Ok(None) => break,
                Err(error) => return ring_broken(port, error),
            };
            let len = (received.len as usize).min(PAYLOAD_BYTES);
            let wrong_bytes = message::request_mismatches(tally.answered, &request[..len])
                + (received.len as usize).saturating_sub(PAYLOAD_BYTES);
            tally.bytes_checked += len as u64;
            if received.id != tally.answered || wrong_bytes != 0 {
                tally.bad_requests += 1;
                println!(
                    "pong: error: request {}: number {}, length {}, {wrong_bytes} wrong bytes",
                    tally.answered, received.id, received.len
                );
            }
            let answer_len = message::answer(&request[..len], &mut answer);
            // Ping keeps at most RING_SLOTS requests in flight, so an answer always has room.
            if let Err(error) = answers.push(received.id, &answer[..answer_len]) {
                return ring_broken(port, error);
            }
            tally.answered += 1;
            progress = true;
        }
        if answers.publish()
            && let Err(error) = events::send(port)
        {
            fail("pong", format_args!("send on {port} failed: {error}"));
        }
        if progress {
            woken = false;
            continue;
        }
        match requests.prepare_to_wait() {
            Ok(true) => {}
            Ok(false) => continue,
            Err(error) => return ring_broken(port, error),
        }
        if woken && peer_is_gone(port) {
            return Served::PeerGone {
                why: "woken with no request",
            };
        }
        match wait_for_peer(port) {
            Ok(true) => woken = true,
            Ok(false) => fail(
                "pong",
                format_args!(
                    "no request from ping for 2 s ({} of {total} answered)",
                    tally.answered
                ),
            ),
            Err(error) => fail("pong", format_args!("poll on {port} failed: {error}")),
        }
    }
    Served::Finished
}

/// Ring indices that make no sense: ping died (its page turned to zeros) or broke the
/// protocol.
fn ring_broken(port: Port, error: RingError) -> Served {
    if peer_is_gone(port) {
        return Served::PeerGone {
            why: "the ring's indices turned to nonsense",
        };
    }
    fail("pong", format_args!("{error} in the requests"))
}

fn peer_is_gone(port: Port) -> bool {
    match events::port_info(port) {
        Ok(info) => info.state != Some(PortState::Interdomain),
        Err(error) => fail("pong", format_args!("status of {port} failed: {error}")),
    }
}

/// Until ping closes its end (ours turns unbound), after the last answer.
fn wait_for_close(port: Port, peer: u32) {
    for _ in 0..MAX_ATTEMPTS {
        events::clear_pending(port);
        if peer_is_gone(port) {
            return;
        }
        match wait_for_peer(port) {
            Ok(true) => {}
            Ok(false) => fail(
                "pong",
                format_args!("domain {peer} did not close its port within 2 s"),
            ),
            Err(error) => fail("pong", format_args!("poll on {port} failed: {error}")),
        }
    }
    fail("pong", format_args!("{port} stayed connected"))
}

/// Ping is gone mid-exchange: checks what the ABI promises the survivor (docs/abi.md 8.5,
/// 16), lets go of the page and the port, works on and powers off.
fn survive(mapping: Mapping, port: Port, peer: u32, tally: &Tally, total: u32, why: &str) -> ! {
    let mut errors = tally.bad_requests;
    let info = events::port_info(port)
        .unwrap_or_else(|error| fail("pong", format_args!("status of {port} failed: {error}")));
    println!(
        "pong: domain {peer} is gone after {} of {total} messages ({why}): {port} is {info}",
        tally.answered
    );
    if info.state != Some(PortState::Unbound) || info.peer != Some(peer as u16) {
        println!("pong: error: {port} should be unbound for domain {peer}");
        errors += 1;
    }
    let nonzero = mapping.page().nonzero_bytes();
    println!(
        "pong: the mapped page of domain {peer} now reads {} of {PAGE_BYTES} bytes as zero",
        PAGE_BYTES - nonzero
    );
    if nonzero != 0 {
        println!("pong: error: {nonzero} bytes of a dead domain's page are not zero");
        errors += 1;
    }
    // The dead domain's grants are gone for good.
    let again = grant::window_slot(RING_WINDOW_PAGE + 1).unwrap_or(0);
    match grant::map(peer, RING_GRANT, again, Access::ReadWrite) {
        Err(error) if error == Errno::ENOENT => {
            println!("pong: mapping domain {peer}'s grant again: ENOENT, as it ended")
        }
        other => {
            println!("pong: error: mapping domain {peer}'s grant again gave {other:?}, not ENOENT");
            errors += 1;
        }
    }
    match mapping.unmap() {
        Ok(()) => println!("pong: unmapped the page"),
        Err(error) => {
            println!("pong: error: unmap failed: {error}");
            errors += 1;
        }
    }
    if let Err(error) = events::close(port) {
        println!("pong: error: close of {port} failed: {error}");
        errors += 1;
    }
    let (messages, bad) = exchange_alone(MESSAGES_AFTER_PEER);
    errors += bad;
    println!(
        "pong: still running: {messages} more messages through a ring of its own, {bad} errors; powering off"
    );
    finish(errors)
}

/// Both ends of a ring in our own memory, taking turns: the work a survivor goes on with.
/// Returns the messages sent and how many came back wrong.
fn exchange_alone(total: u32) -> (u32, u64) {
    static OWN_RING: RingPage = RingPage::new();
    OWN_RING.init(total);
    let (mut requests, mut answers_in) = OWN_RING.front();
    let (mut requests_in, mut answers) = OWN_RING.back();
    let mut bad = 0;
    for id in 0..total {
        if round_trip_alone(
            id,
            &mut requests,
            &mut requests_in,
            &mut answers,
            &mut answers_in,
        ) != Ok(true)
        {
            bad += 1;
        }
    }
    (total, bad)
}

/// Request `id` through one ring of ours and its answer back: whether the answer checks out.
fn round_trip_alone(
    id: u32,
    requests: &mut Producer<'_>,
    requests_in: &mut Consumer<'_>,
    answers: &mut Producer<'_>,
    answers_in: &mut Consumer<'_>,
) -> Result<bool, RingError> {
    let (mut buffer, mut reply) = ([0u8; PAYLOAD_BYTES], [0u8; PAYLOAD_BYTES]);
    let len = message::fill_request(id, &mut buffer);
    requests.push(id, &buffer[..len])?;
    requests.publish();
    let Some(request) = requests_in.pop(&mut buffer)? else {
        return Ok(false);
    };
    let request_len = (request.len as usize).min(PAYLOAD_BYTES);
    let reply_len = message::answer(&buffer[..request_len], &mut reply);
    answers.push(request.id, &reply[..reply_len])?;
    answers.publish();
    let Some(answer) = answers_in.pop(&mut buffer)? else {
        return Ok(false);
    };
    let answer_len = (answer.len as usize).min(PAYLOAD_BYTES);
    Ok(answer.id == id && message::response_mismatches(id, &buffer[..answer_len]) == 0)
}

//! `event_pingpong`: an event sent back and forth between two domains on one physical CPU,
//! over an inter-domain event channel (ABI 1.2).
//!
//! Two copies of this guest take part. The benchmark domain (ping) finds its partner's id on
//! its command line (`pingpong_peer=<id>`); the partner is booted with `pong=<ping's id>`
//! (and the same `iterations=`) and runs [`pong`] instead of the benchmarks:
//!
//! - pong allocates a port for ping ([`events::alloc_unbound_for`]); the first port a fresh
//!   domain gets is [`PONG_PORT`] (port 1 is the console). It then loops: poll on the port,
//!   clear its pending bit, send back. After the expected number of round trips ([`crate::WARMUP`] +
//!   `iterations`) it waits once more, for ping's close, which turns its port back into an
//!   unbound one and raises it; it checks that with `Status`, reports, and powers off.
//! - ping binds to (peer, [`PONG_PORT`]) with [`events::bind_interdomain`], yielding while
//!   pong has not allocated it yet (`-EINVAL`), then, per round trip: send, poll until its own
//!   port is pending, clear it ([`round_trip`]). After the measurement it closes its port.
//!
//! Both ends mask their port, so no upcall runs: a round trip is exactly two `event_channel_op`
//! sends and two `sched_op` polls, and the two domain switches in between. Both count what they
//! sent and received and fail (crash) on a mismatch.
//!
//! `domain_switch` follows with the same two domains: after ping's close, pong yields in a loop
//! ([`pong_yields`]) and ping measures round trips of yields ([`switch_round_trip`]): ping
//! yields, the hypervisor switches to pong (saving ping's x87/SSE/AVX state and restoring
//! pong's, docs/abi.md 18.1), pong yields, and the hypervisor switches back. A switch is seen in
//! the run-state area, whose entry time changes when another vCPU took the CPU.
//!
//! The measured ticks include the time ping is blocked: that is when pong and the hypervisor's
//! switches run, which is what a round trip costs. Ping cannot read pong's exit counters
//! (`stats_op` on another domain needs privilege), so `exits_per_op` is ping's own; pong prints
//! its own per round trip on its console line.

use lamina_abi::Errno;
use lamina_abi::event_channel::PortState;
use lamina_abi::sched::ShutdownReason;
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::hypercall::HypercallError;
use lamina_guest_sdk::{println, sched, stats, time};

use crate::measure::Hundredths;

/// The port pong allocates for ping: ports are handed out lowest-free from 2 (port 1 is the
/// console), and it is pong's first.
pub(crate) const PONG_PORT: Port = Port::new(2);

/// How many times ping yields, waiting for pong to allocate its port, before giving up.
const MAX_BIND_ATTEMPTS: u64 = 10_000;

/// What one end sent and received.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counts {
    pub(crate) sent: u64,
    pub(crate) received: u64,
    /// Sends or polls the hypervisor refused.
    pub(crate) errors: u64,
}

/// Why ping cannot run the benchmark.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ConnectError {
    /// The hypervisor has no inter-domain channels (`-ENOSYS`): the benchmark is skipped.
    Unsupported,
    /// Pong never allocated its port.
    NeverAllocated,
    /// Anything else.
    Failed(HypercallError),
}

/// Ping's end: binds to pong's [`PONG_PORT`], yielding while pong has not allocated it yet.
/// The port is masked: its events are polled for, not delivered.
pub(crate) fn connect(peer: u32) -> Result<Port, ConnectError> {
    for _ in 0..MAX_BIND_ATTEMPTS {
        match events::bind_interdomain(peer, PONG_PORT) {
            Ok(port) => {
                events::mask(port);
                return Ok(port);
            }
            Err(error) if error == Errno::EINVAL => {
                let _ = sched::yield_now();
            }
            Err(error) if error == Errno::ENOSYS => return Err(ConnectError::Unsupported),
            Err(error) => return Err(ConnectError::Failed(error)),
        }
    }
    Err(ConnectError::NeverAllocated)
}

/// Polls until `port` is pending, then clears it, counting it as received (or the error).
fn wait_and_clear(port: Port, counts: &mut Counts) {
    loop {
        match sched::poll(&[port], None) {
            Ok(sched::PollOutcome::Pending) => break,
            Ok(sched::PollOutcome::TimedOut) => {}
            Err(_) => {
                counts.errors += 1;
                break;
            }
        }
    }
    if events::clear_pending(port) {
        counts.received += 1;
    }
}

/// One round trip from ping: send, poll until pong's answer is pending, clear it.
pub(crate) fn round_trip(port: Port, counts: &mut Counts) {
    match events::send(port) {
        Ok(()) => counts.sent += 1,
        Err(_) => counts.errors += 1,
    }
    wait_and_clear(port, counts);
}

/// Yields before giving up on a switch to the partner (it ended, or never started).
const MAX_YIELDS_PER_SWITCH: u64 = 64;
/// Round trips of `domain_switch` before the measured ones, after [`crate::WARMUP`]: long
/// enough for the two vCPUs' run times (which decide who runs after a yield) to even out.
pub(crate) const SWITCH_SYNC_ROUNDS: u64 = 256;
/// How long pong goes on yielding without ping taking the CPU: longer than ping's settle
/// before the measurement, and, once all round trips were seen, a short grace.
const PONG_IDLE_NS: u64 = 500_000_000;
const PONG_GRACE_NS: u64 = 5_000_000;

/// One `domain_switch` round trip from ping: yields until another vCPU (pong) took the CPU and
/// gave it back. Counts a round trip where that never happened in `stuck`.
pub(crate) fn switch_round_trip(stuck: &mut u64) {
    let before = crate::measure::runstate_entry_time();
    for _ in 0..MAX_YIELDS_PER_SWITCH {
        let _ = sched::yield_now();
        if crate::measure::runstate_entry_time() != before {
            return;
        }
    }
    *stuck += 1;
}

/// Pong's side of `domain_switch`: yields, counting the times ping took the CPU in between,
/// until it saw `rounds` of them (and a short grace passed without another), or ping has not
/// run for [`PONG_IDLE_NS`]. Returns how many it saw.
fn pong_yields(rounds: u64) -> u64 {
    if !crate::measure::register_runstate() {
        println!("pong: no run-state area: no domain_switch partner");
        return 0;
    }
    let mut seen = 0;
    let mut last_switch = time::now_ns();
    loop {
        let before = crate::measure::runstate_entry_time();
        let _ = sched::yield_now();
        let now = time::now_ns();
        if crate::measure::runstate_entry_time() != before {
            seen += 1;
            last_switch = now;
        }
        let idle = if seen >= rounds {
            PONG_GRACE_NS
        } else {
            PONG_IDLE_NS
        };
        if now.saturating_sub(last_switch) > idle {
            return seen;
        }
    }
}

/// The partner domain (`pong=<ping's id>`): answers `rounds` events from `peer`, then waits for
/// ping to close its end, and powers off (or crashes when anything did not add up).
pub(crate) fn pong(peer: u32, rounds: u64) -> ! {
    let port = match events::alloc_unbound_for(peer) {
        Ok(port) => port,
        Err(error) if error == Errno::EINVAL || error == Errno::ENOSYS => {
            // A hypervisor before ABI 1.2: ping skips the benchmark too.
            println!("pong: no inter-domain event channels ({error}): nothing to answer");
            sched::shutdown(ShutdownReason::Poweroff)
        }
        Err(error) => {
            println!("pong: error: alloc_unbound for domain {peer} failed: {error}");
            sched::shutdown(ShutdownReason::Crash)
        }
    };
    if port != PONG_PORT {
        println!("pong: error: got {port}, ping expects {PONG_PORT}");
        sched::shutdown(ShutdownReason::Crash)
    }
    events::mask(port);
    println!("pong: {port} for domain {peer}, {rounds} round trips");
    let before = stats::own_exit_counters().ok();
    let mut counts = Counts::default();
    for _ in 0..rounds {
        wait_and_clear(port, &mut counts);
        match events::send(port) {
            Ok(()) => counts.sent += 1,
            Err(_) => counts.errors += 1,
        }
    }
    let after = stats::own_exit_counters().ok();
    // Ping's close raises the port once more; an extra event from ping would come here too,
    // and the port would still be connected.
    let mut closing = Counts::default();
    wait_and_clear(port, &mut closing);
    let state = events::port_info(port).map(|info| (info.state, info.peer));
    let mut ok = counts.sent == rounds && counts.received == rounds && counts.errors == 0;
    if !ok {
        println!(
            "pong: error: {} round trips expected, received {}, sent {}, {} refused calls",
            rounds, counts.received, counts.sent, counts.errors
        );
    }
    if state != Ok((Some(PortState::Unbound), Some(peer as u16))) {
        println!(
            "pong: error: after the last round trip {port} is {state:?}, not unbound for domain {peer} (ping did not close, or sent more)"
        );
        ok = false;
    }
    let exits = match (before, after) {
        // The second stats_op is counted in what it returned.
        (Some(before), Some(after)) => {
            let total = stats::delta(&after, &before).total.saturating_sub(1);
            Some(Hundredths::ratio(total, rounds))
        }
        _ => None,
    };
    match exits {
        Some(exits) => println!(
            "pong: {} round trips answered, ping closed; pong's own exits per round trip {exits}",
            counts.received
        ),
        None => println!(
            "pong: {} round trips answered, ping closed",
            counts.received
        ),
    }
    if ok {
        // Ping's round trips: as many as the event round trips, and the synchronising ones.
        let seen = pong_yields(rounds + SWITCH_SYNC_ROUNDS);
        println!("pong: domain_switch: ping took the CPU {seen} times between pong's yields");
    }
    sched::shutdown(if ok {
        ShutdownReason::Poweroff
    } else {
        ShutdownReason::Crash
    })
}

//! `role=neighbour`, `role=partner` and `role=quiet`: the well-behaved domains of the
//! `resource-hog` scenario. The run has two phases of `phase_ms=` of system time, the first
//! starting at `start_ms=` and the second `gap_ms=` after the first ends. Beside the neighbour,
//! the quiet domain (of the same weight) spins through the first phase and sleeps through the
//! second, while the hog ([`crate::hog`]) sleeps through the first and attacks through the
//! second. So the neighbour measures the same things beside a fair competitor and beside a
//! hostile one, in one run on the same machine. After [`SETTLE_NS`], each phase has three
//! parts:
//!
//! - work (three fifths, less a rest of [`REST_NS`] at the end): rounds of computation
//!   finished, and the CPU time it got for them (its share);
//! - ping-pong (a fifth): event round trips with its partner domain (`role=partner`, which
//!   answers every event on an inter-domain channel), one every [`ROUND_TRIP_PERIOD_NS`], as
//!   `event_pingpong` of `cargo xtask bench` measures one: how many, and how long on average;
//! - timers (a fifth): one-shot PV timers [`TIMER_DELAY_NS`] ahead (a kernel's tick), each
//!   waited for by a poll on the VIRQ_TIMER port, as `timer_pv`: how many fired, and how late
//!   the neighbour ran after each deadline, on average and at worst.
//!
//! It prints
//!
//! ```text
//! neighbour: result: beside_quiet=<rounds> beside_hog=<rounds> hog_over_quiet=<ratio> cpu_us_quiet=<us> cpu_us_hog=<us>
//! neighbour: pingpong: beside_quiet=<round trips> beside_hog=<round trips> rtt_ns_quiet=<ns> rtt_ns_hog=<ns>
//! neighbour: timer: beside_quiet=<timers> beside_hog=<timers> late_ns_quiet=<ns> late_ns_hog=<ns> latest_ns_quiet=<ns> latest_ns_hog=<ns>
//! ```
//!
//! and the scenario holds each figure beside the hog against the one beside the quiet domain.

use lamina_abi::Errno;
use lamina_abi::event_channel::{PortState, Virq};
use lamina_abi::vcpu::runstate;
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::{println, sched, time, timer, vcpu};

/// The times of the two phases, in ns of system time, from the command line.
#[derive(Clone, Copy)]
pub(crate) struct Phases {
    /// Start of the phase beside the quiet domain.
    pub(crate) quiet_from: u64,
    /// Start of the phase beside the hog.
    pub(crate) hog_from: u64,
    /// Length of each phase.
    pub(crate) length: u64,
}

impl Phases {
    pub(crate) fn new(start_ms: u32, phase_ms: u32, gap_ms: u32) -> Self {
        const MS: u64 = 1_000_000;
        let quiet_from = u64::from(start_ms) * MS;
        Phases {
            quiet_from,
            hog_from: quiet_from + u64::from(phase_ms + gap_ms) * MS,
            length: u64::from(phase_ms) * MS,
        }
    }
}

/// Work the compiler cannot skip: `rounds` of 256 xorshift steps until system time `end`.
fn work_until(end: u64) -> u64 {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rounds = 0u64;
    while time::now_ns() < end {
        for _ in 0..256 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
        }
        rounds += 1;
    }
    core::hint::black_box(state);
    rounds
}

/// Sleeps (without a timer or an upcall) until system time `at`.
pub(crate) fn sleep_until(role: &str, at: u64) {
    let now = time::now_ns();
    if now < at {
        crate::sleep_ns(role, at - now);
    }
}

/// How far ahead each of the neighbour's one-shot timers is set.
pub(crate) const TIMER_DELAY_NS: u64 = 1_000_000;

/// The port the partner allocates for the neighbour: ports are handed out lowest-free from 2
/// (port 1 is the console), and it is the partner's first.
const PARTNER_PORT: Port = Port::new(2);

/// How often the neighbour starts a round trip with its partner.
pub(crate) const ROUND_TRIP_PERIOD_NS: u64 = 250_000;

/// Event round trips with the partner over `port`, one every [`ROUND_TRIP_PERIOD_NS`] (a
/// client that asks and waits for the answer, not one that would take the whole CPU), until
/// system time `end`: how many, and their total time in ns.
fn ping_pong_until(port: Port, end: u64) -> (u64, u64) {
    let (mut round_trips, mut total_ns) = (0u64, 0u64);
    let mut next = time::now_ns();
    while next < end {
        let sent_at = time::now_ns();
        if let Err(error) = events::send(port) {
            crate::fail("neighbour", format_args!("send to the partner: {error}"));
        }
        if !crate::wait_for_peer(port).unwrap_or(false) {
            crate::fail("neighbour", format_args!("the partner did not answer"));
        }
        events::clear_pending(port);
        let answered_at = time::now_ns();
        total_ns += answered_at - sent_at;
        round_trips += 1;
        next = (next + ROUND_TRIP_PERIOD_NS).max(answered_at);
        // Nothing raises the port before the next send: this waits until `next`.
        while time::now_ns() < next {
            match sched::poll(&[port], Some(next)) {
                Ok(_) => {}
                Err(error) if error == Errno::ETIMEDOUT => {}
                Err(error) => crate::fail("neighbour", format_args!("poll: {error}")),
            }
        }
    }
    (round_trips, total_ns)
}

/// One-shot timers [`TIMER_DELAY_NS`] ahead, each polled for on `port`, until system time
/// `end`: how many fired, their total lateness and the largest, in ns.
fn timers_until(port: Port, end: u64) -> (u64, u64, u64) {
    let (mut fired, mut late_ns, mut latest_ns) = (0u64, 0u64, 0u64);
    while time::now_ns() < end {
        let deadline = time::now_ns() + TIMER_DELAY_NS;
        if let Err(error) = timer::set_deadline(deadline) {
            crate::fail("neighbour", format_args!("set_deadline: {error}"));
        }
        while !events::is_pending(port) {
            if let Err(error) = sched::poll(&[port], None) {
                crate::fail("neighbour", format_args!("poll on VIRQ_TIMER: {error}"));
            }
        }
        events::clear_pending(port);
        let now = time::now_ns();
        if now < deadline {
            crate::fail(
                "neighbour",
                format_args!("the timer fired {} ns early", deadline - now),
            );
        }
        late_ns += now - deadline;
        latest_ns = latest_ns.max(now - deadline);
        fired += 1;
    }
    (fired, late_ns, latest_ns)
}

/// The neighbour's run-state area: the CPU time it got.
static RUNSTATE: vcpu::RunstateArea = vcpu::RunstateArea::new();

/// CPU time this vCPU has had so far, in ns (its run-state area, docs/abi.md 9.2).
fn running_ns() -> u64 {
    let info = RUNSTATE.read();
    let running = info.time[runstate::RUNNING as usize];
    if info.state == runstate::RUNNING {
        running + time::now_ns().saturating_sub(info.state_entry_time)
    } else {
        running
    }
}

/// What the neighbour measured in one phase.
struct PhaseFigures {
    rounds: u64,
    /// CPU time it got while it computed the rounds.
    work_cpu_ns: u64,
    /// The round trips' total time.
    round_trip_ns: u64,
    round_trips: u64,
    timers: u64,
    timer_late_ns: u64,
    timer_latest_ns: u64,
}

/// How long the neighbour computes at the start of each phase before it measures: a
/// competitor that slept before the phase starts it with up to a slice of CPU time in hand
/// (docs/abi.md 6.1, a wake-up keeps up to one slice of what it was owed), which it spends
/// first. The figures are of the steady state after that.
const SETTLE_NS: u64 = 20_000_000;

/// How long the neighbour sleeps between its work and its round trips. Computing beside a
/// competitor of its weight, it ends its work up to a slice ahead of it in CPU time for its
/// weight (the two take turns of a slice), and a woken vCPU runs first only while it is not
/// ahead of a ready one (docs/abi.md 3.3): its first wake-ups would wait for the
/// competitor to catch up, which is what fairness asks, not what the competitor does to it.
/// Asleep for a slice and a little more, it gives that back before it measures latency.
const REST_NS: u64 = 12_000_000;

fn measure_phase(from: u64, length: u64, partner: Port, timer_port: Port) -> PhaseFigures {
    work_until(from + SETTLE_NS);
    let (from, length) = (from + SETTLE_NS, length - SETTLE_NS);
    // The work first, for three fifths: its figure is a share of the CPU, which 10 ms slices
    // quantise, so it needs the longest window, and it absorbs what a competitor does first
    // (the hog takes every port and grant). Then a fifth each for round trips and timers.
    let fifth = length / 5;
    let cpu_before = running_ns();
    let rounds = work_until(from + 3 * fifth - REST_NS);
    let work_cpu_ns = running_ns() - cpu_before;
    sleep_until("neighbour", from + 3 * fifth);
    let (round_trips, round_trip_ns) = ping_pong_until(partner, from + 4 * fifth);
    let (timers, timer_late_ns, timer_latest_ns) = timers_until(timer_port, from + length);
    PhaseFigures {
        rounds,
        work_cpu_ns,
        round_trip_ns,
        round_trips,
        timers,
        timer_late_ns,
        timer_latest_ns,
    }
}

/// Binds to the partner's [`PARTNER_PORT`], yielding while it has not allocated it yet.
fn connect_partner(partner: u32) -> Port {
    for _ in 0..10_000 {
        match events::bind_interdomain(partner, PARTNER_PORT) {
            Ok(port) => {
                events::mask(port);
                return port;
            }
            Err(error) if error == Errno::EINVAL => {
                let _ = sched::yield_now();
            }
            Err(error) => crate::fail(
                "neighbour",
                format_args!("bind_interdomain to the partner: {error}"),
            ),
        }
    }
    crate::fail(
        "neighbour",
        format_args!("the partner never allocated its port"),
    )
}

pub(crate) fn run_neighbour(partner: u32, phases: Phases) -> ! {
    let partner = connect_partner(partner);
    if let Err(error) = vcpu::register_runstate(0, &RUNSTATE) {
        crate::fail("neighbour", format_args!("register_runstate: {error}"));
    }
    let timer_port = events::bind_virq(Virq::Timer, 0)
        .unwrap_or_else(|error| crate::fail("neighbour", format_args!("bind_virq: {error}")));
    events::mask(timer_port);
    if time::now_ns() >= phases.quiet_from {
        crate::fail(
            "neighbour",
            format_args!("started after its first phase began: start_ms= is too early"),
        );
    }
    sleep_until("neighbour", phases.quiet_from);
    let quiet = measure_phase(phases.quiet_from, phases.length, partner, timer_port);
    sleep_until("neighbour", phases.hog_from);
    let hog = measure_phase(phases.hog_from, phases.length, partner, timer_port);
    let _ = events::close(partner);
    let ratio = |numerator, denominator| crate::Decimal3 {
        numerator,
        denominator,
    };
    println!(
        "neighbour: result: beside_quiet={} beside_hog={} hog_over_quiet={} cpu_us_quiet={} cpu_us_hog={}",
        quiet.rounds,
        hog.rounds,
        ratio(hog.rounds, quiet.rounds),
        quiet.work_cpu_ns / 1000,
        hog.work_cpu_ns / 1000
    );
    println!(
        "neighbour: pingpong: beside_quiet={} beside_hog={} rtt_ns_quiet={} rtt_ns_hog={}",
        quiet.round_trips,
        hog.round_trips,
        quiet.round_trip_ns / quiet.round_trips.max(1),
        hog.round_trip_ns / hog.round_trips.max(1)
    );
    println!(
        "neighbour: timer: beside_quiet={} beside_hog={} late_ns_quiet={} late_ns_hog={} latest_ns_quiet={} latest_ns_hog={}",
        quiet.timers,
        hog.timers,
        quiet.timer_late_ns / quiet.timers.max(1),
        hog.timer_late_ns / hog.timers.max(1),
        quiet.timer_latest_ns,
        hog.timer_latest_ns
    );
    crate::finish(0)
}

/// The neighbour's ping-pong partner: answers every event on the port it allocated for the
/// neighbour until the neighbour closes its end (which raises the port, now unbound) or the
/// second phase is long over.
pub(crate) fn run_partner(neighbour: u32, phases: Phases) -> ! {
    let port = events::alloc_unbound_for(neighbour)
        .unwrap_or_else(|error| crate::fail("partner", format_args!("alloc_unbound: {error}")));
    if port != PARTNER_PORT {
        crate::fail(
            "partner",
            format_args!(
                "its first port is {}, not {}",
                port.number(),
                PARTNER_PORT.number()
            ),
        );
    }
    events::mask(port);
    let give_up = phases.hog_from + 2 * phases.length + crate::PEER_SILENCE_NS;
    let mut answered = 0u64;
    loop {
        if time::now_ns() > give_up {
            crate::fail(
                "partner",
                format_args!("the neighbour never closed its end"),
            );
        }
        match sched::poll(&[port], Some(give_up)) {
            Ok(sched::PollOutcome::Pending) => {}
            Ok(_) => continue,
            Err(error) => crate::fail("partner", format_args!("poll: {error}")),
        }
        events::clear_pending(port);
        // Once the phases are over, a raise may be the neighbour's close (8.5), after which
        // the port is unbound again and a send would only raise it here.
        if time::now_ns() >= phases.hog_from + phases.length {
            match events::status(port) {
                Ok(status) if status.state == PortState::Unbound as u8 => break,
                Ok(_) => {}
                Err(error) => crate::fail("partner", format_args!("status: {error}")),
            }
        }
        match events::send(port) {
            Ok(()) => answered += 1,
            Err(error) => crate::fail("partner", format_args!("send: {error}")),
        }
    }
    println!("partner: result: answered={answered}");
    crate::finish(0)
}

/// How long after the hog's phase the quiet domain sleeps on: past the neighbour's last
/// timer, [`TIMER_DELAY_NS`] at most after the phase ends.
const QUIET_AFTER_HOG_PHASE_NS: u64 = 10 * TIMER_DELAY_NS;

pub(crate) fn run_quiet(phases: Phases) -> ! {
    sleep_until("quiet", phases.quiet_from);
    let rounds = work_until(phases.quiet_from + phases.length);
    // Asleep while the hog runs: the neighbour's only competitor is then the hog. Until
    // after the neighbour's last timer (set before the phase ends, due up to a timer delay
    // after): woken, it would run first, print and end beside that timer.
    sleep_until(
        "quiet",
        phases.hog_from + phases.length + QUIET_AFTER_HOG_PHASE_NS,
    );
    println!("quiet: result: rounds={rounds}");
    crate::finish(0)
}

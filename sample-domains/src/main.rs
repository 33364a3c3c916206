//! `sample-domains`: several Lamina domains working together, Xen style. One kernel image,
//! booted once per domain; `role=` on its module command line says what that domain does
//! (without it, the domain's name is taken as the role):
//!
//! | role | what it does | command line |
//! |---|---|---|
//! | `ping` | owns a ring page, grants it to pong, sends `messages=` requests and checks every answer | `ping role=ping peer=<pong's id> [messages=10000] [crash_after=<n>]` |
//! | `pong` | maps ping's page, checks every request and answers it | `pong role=pong peer=<ping's id>` |
//! | `snoop` | tries to reach a domain's memory without a grant, and must fail | `snoop role=snoop peer=<victim's id>` |
//! | `control` | privileged: lists, watches, pauses, unpauses and destroys a worker | `control role=control privileged=1 worker=<id>` |
//! | `worker` | unprivileged: checks that domain control is refused, then works until destroyed | `worker role=worker [peer=<control's id>]` |
//! | `echo` | domain 1 only: answers each line of console input (`sum 1 2`, `quit`) | `echo role=echo` |
//! | `fuzz` | hostile: random hypercalls with hostile arguments and random instructions at CPL 0 and 3 (`cargo xtask fuzz`) | `fuzz role=fuzz seed=<n> [ops=10000] [trace=<first op printed>] [privileged=1 protect=<id> target=<id>]` |
//! | `stress` | with `vcpus=2` or more: every vCPU hammers the same inter-domain channels, grants and multicall batches as its peer's (`stress.rs`), every message checked on both sides | `stress role=stress peer=<id> vcpus=2 [ms=3000] [rounds=<n>] [destroyed=1 \| peer_dies=1]` |
//! | `neighbour` | measures its work, event round trips with `partner` and PV timer wake-ups in two phases of fixed system time: beside `quiet`, then beside `hog` (the `resource-hog` scenario) | `neighbour role=neighbour partner=<partner's id> [start_ms=100] [phase_ms=300] [gap_ms=20]` |
//! | `partner` | answers every event from the neighbour on an inter-domain channel until the neighbour closes it | `partner role=partner peer=<neighbour's id>` and the same phase keys |
//! | `quiet` | spins through the neighbour's first phase, sleeps through the second | `quiet role=quiet` and the same phase keys |
//! | `hog` | sleeps through the first phase, then takes every port and grant it may and storms the hypervisor with its dearest calls | `hog role=hog peer=<neighbour's id>` and the same phase keys |
//! | `canary` | fills 1 MiB with a pattern and checks it, its debug registers and the clock while the fuzzer runs | `canary role=canary [ms=300]` |
//!
//! # How ping and pong find each other
//!
//! Lamina has no xenstore: the two domains meet by convention (docs/abi.md 8.9 and 16). Each
//! is told the other's domain id on its command line (`peer=`). Grant references and event
//! ports are handed out lowest free first, so in a fresh domain:
//!
//! - the ring page is ping's **first grant: reference 0** ([`RING_GRANT`]), read-write, to pong;
//! - the notification channel is ping's **first allocated port: port 2** ([`RING_PORT`]; port 1
//!   is the console), offered to pong with `alloc_unbound`;
//! - pong maps the grant at **page 0 of its grant window** (`0x4000_0000`) and binds to port 2
//!   with `bind_interdomain`.
//!
//! Ping checks that it got exactly these numbers and stops if not. Whichever side starts
//! first, the other retries: pong while the map says `ENOENT` (not granted yet) or the bind
//! says `EINVAL` (not offered yet), ping until its port turns inter-domain; each retry yields
//! the CPU, and after [`MAX_ATTEMPTS`] the domain gives up with an error.
//!
//! # The exchange
//!
//! [`sample_domains::ring`] is the protocol: two rings of 16 slots in the page, requests one
//! way and answers the other, with producer and consumer indices and Xen's event indices, so
//! a side sends an event only when the other may be waiting (about once per batch of 16).
//! Both ends mask their port and wait with `sched_op` poll, so no upcall handler is needed.
//! Ping keeps at most 16 requests in flight; message `i` is a pattern derived from `i`
//! ([`sample_domains::message`]), pong checks every byte and answers with the bytes reversed
//! and inverted, and ping checks every byte of the answer. Ping measures the rate with the
//! pvclock and the exits with `stats_op` (its own counters; pong prints its own), and prints
//!
//! ```text
//! ping: result: messages=10000 errors=0 bytes_checked=... elapsed_ms=... messages_per_s=... exits_per_message=...
//! ```
//!
//! To finish, pong unmaps the page and notifies; ping ends its grant (refused with `EBUSY`
//! while pong still has it mapped) and closes its port, which turns pong's end unbound
//! (docs/abi.md 8.5); pong sees that and both power off.
//!
//! # When the peer dies
//!
//! With `crash_after=<n>`, ping crashes on purpose (a panic: shutdown with reason crash) with
//! requests in flight once `n` answers are in. The hypervisor tears it down: its grant is
//! revoked, so pong's mapping now reads zeros, and its port is closed, so pong's end turns
//! unbound and is raised (docs/abi.md 16, 17). Pong wakes, finds ring indices that make no
//! sense, sees its port unbound, checks that the whole page reads zeros, unmaps it, does more
//! work (messages through a ring of its own) and powers off.
//!
//! Every role prints `<role>: error: ...` for anything that is not as the ABI says and then
//! ends with shutdown reason crash instead of poweroff, so the scenarios in
//! `xtask/src/scenarios.rs` catch it from both the guest's lines and the hypervisor's.
#![no_std]
#![no_main]

// On the host this kernel is only checked (clippy of the whole workspace), never linked: a
// stand-in for the SDK's panic handler, which exists on bare metal only.
#[cfg(not(any(test, target_os = "none")))]
#[panic_handler]
fn host_check_only(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

mod canary;
mod control;
mod echo;
mod fuzz;
mod fuzz_cpu;
mod hog;
mod neighbour;
mod ping;
mod pong;
mod snoop;
mod stress;
mod worker;

use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};

use lamina_abi::sched::ShutdownReason;
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::grant::GrantRef;
use lamina_guest_sdk::hypercall::HypercallError;
use lamina_guest_sdk::{StartInfo, cmdline_value, println, sched, stats, time};

lamina_guest_sdk::entry!(kernel_main);

/// Ping's first grant (references are handed out lowest free first, from 0): the ring page.
pub(crate) const RING_GRANT: GrantRef = GrantRef::new(0);
/// Ping's first allocated port (port 1 is the console): the notification channel.
pub(crate) const RING_PORT: Port = Port::new(2);
/// How often a domain yields, waiting for its peer to be ready, before it gives up.
pub(crate) const MAX_ATTEMPTS: u32 = 10_000;
/// How long ping and pong wait for each other's event before they call the peer silent.
pub(crate) const PEER_SILENCE_NS: u64 = 2_000_000_000;

fn kernel_main(start: &'static StartInfo) -> ! {
    let role = cmdline_value("role").unwrap_or_else(|| start.name());
    match role {
        "ping" => ping::run(
            peer_from_cmdline("ping"),
            number_from_cmdline("ping", "messages").unwrap_or(ping::DEFAULT_MESSAGES),
            number_from_cmdline("ping", "crash_after"),
        ),
        "pong" => pong::run(peer_from_cmdline("pong")),
        "snoop" => snoop::run(peer_from_cmdline("snoop")),
        "control" => control::run(
            start,
            number_from_cmdline("control", "worker")
                .unwrap_or_else(|| fail("control", format_args!("worker=<id> is missing"))),
        ),
        "worker" => worker::run(number_from_cmdline("worker", "peer").unwrap_or(1)),
        "echo" => echo::run(),
        // `cargo xtask fuzz`: the hostile guest and the domain that watches its own memory.
        "fuzz" => fuzz::run(
            start,
            number_from_cmdline("fuzz", "seed").unwrap_or(1).into(),
            number_from_cmdline("fuzz", "ops").unwrap_or(10_000),
            number_from_cmdline("fuzz", "trace").unwrap_or(u32::MAX),
            number_from_cmdline("fuzz", "protect").map(|protect| fuzz::Spare {
                protect: protect.into(),
                target: number_from_cmdline("fuzz", "target")
                    .unwrap_or_else(|| fail("fuzz", format_args!("protect= needs target=")))
                    .into(),
            }),
        ),
        "stress" => stress::run(
            start,
            peer_from_cmdline("stress"),
            number_from_cmdline("stress", "ms"),
            number_from_cmdline("stress", "rounds"),
            number_from_cmdline("stress", "destroyed") == Some(1),
            number_from_cmdline("stress", "peer_dies") == Some(1),
        ),
        "neighbour" => neighbour::run_neighbour(
            number_from_cmdline("neighbour", "partner")
                .unwrap_or_else(|| fail("neighbour", format_args!("partner=<id> is missing"))),
            phases_from_cmdline("neighbour"),
        ),
        "partner" => {
            neighbour::run_partner(peer_from_cmdline("partner"), phases_from_cmdline("partner"))
        }
        "quiet" => neighbour::run_quiet(phases_from_cmdline("quiet")),
        "hog" => hog::run(phases_from_cmdline("hog"), peer_from_cmdline("hog")),
        "canary" => canary::run(number_from_cmdline("canary", "ms").unwrap_or(300).into()),
        other => fail(
            "sample-domains",
            format_args!(
                "unknown role {other:?}: role= is ping, pong, snoop, control, worker, echo, fuzz, canary, stress, neighbour, partner, quiet or hog"
            ),
        ),
    }
}

/// Prints `<role>: error: <what>` and ends the domain with shutdown reason crash.
pub(crate) fn fail(role: &str, what: fmt::Arguments<'_>) -> ! {
    println!("{role}: error: {what}");
    sched::shutdown(ShutdownReason::Crash)
}

/// `key=<number>` from the command line; a value that is not a number is fatal.
fn number_from_cmdline(role: &str, key: &str) -> Option<u32> {
    let value = cmdline_value(key)?;
    match value.parse() {
        Ok(number) => Some(number),
        Err(_) => fail(role, format_args!("{key}={value} is not a number")),
    }
}

/// The phases of the `resource-hog` scenario (`start_ms=`, `phase_ms=`, `gap_ms=`).
fn phases_from_cmdline(role: &str) -> neighbour::Phases {
    neighbour::Phases::new(
        number_from_cmdline(role, "start_ms").unwrap_or(100),
        number_from_cmdline(role, "phase_ms").unwrap_or(300),
        number_from_cmdline(role, "gap_ms").unwrap_or(20),
    )
}

fn peer_from_cmdline(role: &str) -> u32 {
    number_from_cmdline(role, "peer")
        .unwrap_or_else(|| fail(role, format_args!("peer=<domain id> is missing")))
}

/// Powers off, or crashes when `errors` is not 0.
pub(crate) fn finish(errors: u64) -> ! {
    sched::shutdown(if errors == 0 {
        ShutdownReason::Poweroff
    } else {
        ShutdownReason::Crash
    })
}

/// Waits until `port` is pending or [`PEER_SILENCE_NS`] passed; `false` on the timeout.
pub(crate) fn wait_for_peer(port: Port) -> Result<bool, HypercallError> {
    let deadline = time::now_ns() + PEER_SILENCE_NS;
    sched::poll(&[port], Some(deadline)).map(|outcome| outcome == sched::PollOutcome::Pending)
}

/// This vCPU's exit count, for the exits of a stretch of work: see [`exits_since`].
pub(crate) fn exit_count() -> Option<u64> {
    stats::own_exit_counters()
        .ok()
        .map(|counters| counters.total)
}

/// Exits since `before` (an [`exit_count`]), not counting the `stats_op` that reads them.
pub(crate) fn exits_since(before: Option<u64>) -> Option<u64> {
    Some(exit_count()?.saturating_sub(before?).saturating_sub(1))
}

/// `numerator / denominator` with three decimals, for rates printed by a `no_std` kernel.
pub(crate) struct Decimal3 {
    pub(crate) numerator: u64,
    pub(crate) denominator: u64,
}

impl fmt::Display for Decimal3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.denominator == 0 {
            return f.write_str("-");
        }
        let thousandths = (u128::from(self.numerator) * 1000 + u128::from(self.denominator) / 2)
            / u128::from(self.denominator);
        write!(f, "{}.{:03}", thousandths / 1000, thousandths % 1000)
    }
}

/// Exits per message, or `-` when `stats_op` is missing.
pub(crate) struct PerMessage(pub(crate) Option<u64>, pub(crate) u32);

impl fmt::Display for PerMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(exits) => Decimal3 {
                numerator: exits,
                denominator: u64::from(self.1),
            }
            .fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Sleeps `ns` of system time: polls a loopback port of its own that nothing raises, with a
/// deadline (no timer or upcall needed).
pub(crate) fn sleep_ns(role: &str, ns: u64) {
    static SLEEP_PORT: AtomicU32 = AtomicU32::new(0);
    let port = match SLEEP_PORT.load(Ordering::Relaxed) {
        0 => {
            let port = events::alloc_loopback()
                .unwrap_or_else(|error| fail(role, format_args!("no port to sleep on: {error}")));
            events::mask(port);
            SLEEP_PORT.store(port.number(), Ordering::Relaxed);
            port
        }
        number => Port::new(number),
    };
    let deadline = time::now_ns() + ns;
    while time::now_ns() < deadline {
        if let Err(error) = sched::poll(&[port], Some(deadline)) {
            fail(role, format_args!("poll to sleep failed: {error}"));
        }
        events::clear_pending(port);
    }
}

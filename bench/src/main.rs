//! `lamina-bench`: what each paravirtual operation costs next to the trapping operation it
//! replaces, in instructions and exits.
//!
//! One domain runs every benchmark in turn. Each runs its operation a few times to warm up,
//! then `iterations=<n>` times (command line, default [`DEFAULT_ITERATIONS`]) between two TSC
//! readings and two reads of the domain's own exit counters (`stats_op`), and prints one line:
//!
//! ```text
//! BENCH op=<name> group=<group> path=<pv|trap> iterations=<n> tsc_per_op=<x.yy> exits_per_op=<x.yy>
//! ```
//!
//! `cargo xtask bench` boots it under QEMU with `-icount shift=0` (AMD-V) and under Bochs
//! (VT-x), where the TSC counts emulated instructions, so `tsc_per_op` is instructions per
//! operation, guest and hypervisor together, and the same in every run. Without `stats_op`
//! (`-ENOSYS`) exits print as `-`.
//!
//! Some operations run a different number of times than `iterations`, so that their figure
//! does not depend on it (the line says how many):
//! - `uart_byte`: a multiple of 80 bytes, so that the hypervisor's line buffer ends every
//!   line it starts;
//! - the two 80-byte console lines: [`CONSOLE_LINE_PERIOD`] lines per 2000 iterations (at
//!   least 128): 128 lines of 80 bytes fill the 2048-byte console ring exactly 5 times, and
//!   the serial wire under Bochs (115200 baud of emulated time) stays out of the figures.
//!
//! Batches (`multicall_<n>`, `calls_<n>`) are reported per batch. The timer benchmarks set
//! their timer [`ops::TIMER_DELAY_NS`] ahead; the ticks the vCPU spent blocked waiting for it
//! (run-state area) are not counted in `tsc_per_op` and are printed as `blocked_tsc_per_op`.
//!
//! Before each measurement the guest sleeps long enough for the hypervisor to move the console
//! output so far to the serial wire ([`settle`]): the hypervisor does that every millisecond
//! while output waits, and those pumps would otherwise land in the next operation's figures.
//!
//! Any handler count that does not match what the loops did is printed as an error, and the
//! domain then shuts down with `Crash` instead of powering off.
#![no_std]
#![no_main]

// On the host this kernel is only checked (clippy of the whole workspace), never linked: a
// stand-in for the SDK's panic handler, which exists on bare metal only.
#[cfg(not(any(test, target_os = "none")))]
#[panic_handler]
fn host_check_only(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

mod idle;
mod measure;
mod ops;
mod pingpong;
mod smp;
mod smp4;
mod smp_cpus;

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lamina_abi::sched::ShutdownReason;
use lamina_guest_sdk::{StartInfo, cmdline_value, cpuid, events, hypercall, println, sched, time};

use crate::measure::{Group, OpInfo, Path};

lamina_guest_sdk::entry!(bench_main);

/// Iterations when the command line does not say.
const DEFAULT_ITERATIONS: u64 = 2000;
/// Unmeasured runs of each operation first.
const WARMUP: u64 = 32;
/// Unmeasured console lines first (they reach the serial wire).
const WARMUP_LINES: u64 = 4;
/// The console lines' iteration unit (see the crate documentation).
const CONSOLE_LINE_PERIOD: u64 = 128;

/// What a line of ours costs on the hypervisor's console: the `BENCH` line and its prefix.
const REPORT_LINE_BYTES: u64 = 160;
/// Time the hypervisor takes to move a byte of console output to the wire: 16 bytes per
/// millisecond pump, and under Bochs sometimes only every second one (the 16550's FIFO takes
/// 1.4 ms to empty at 115200 baud).
const WIRE_NS_PER_BYTE: u64 = 125_000;

/// Sleeps until the hypervisor has moved about `bytes` of console output to the wire, so that
/// its pumping does not land in the next measurement. Under QEMU with `-icount sleep=off` and
/// under Bochs, sleeping costs no wall-clock time to speak of.
fn settle(bytes: u64) {
    ops::sleep(2_000_000 + bytes * WIRE_NS_PER_BYTE);
}

/// Set when a check failed: the domain ends with `Crash`.
static FAILED: AtomicBool = AtomicBool::new(false);

fn fail(what: core::fmt::Arguments<'_>) {
    println!("bench: error: {what}");
    FAILED.store(true, Ordering::Relaxed);
}

const fn info(name: &'static str, group: Group, path: Path) -> OpInfo {
    OpInfo { name, group, path }
}

/// Measures `op` `iterations` times after [`WARMUP`] and prints its line.
fn bench(info: OpInfo, iterations: u64, op: impl FnMut()) {
    settle(REPORT_LINE_BYTES);
    let sample = measure::run(WARMUP, iterations, op, || {});
    measure::report(info, &sample);
}

/// [`bench`], checking that the handler counting `counter` ran once per run of `op`.
fn bench_counted(info: OpInfo, iterations: u64, counter: &AtomicU64, op: impl FnMut()) {
    settle(REPORT_LINE_BYTES);
    let before = counter.load(Ordering::Relaxed);
    let sample = measure::run(WARMUP, iterations, op, || {});
    let seen = counter.load(Ordering::Relaxed) - before;
    if seen != WARMUP + iterations {
        fail(format_args!(
            "{}: the handler ran {seen} times, expected {}",
            info.name,
            WARMUP + iterations
        ));
    }
    measure::report(info, &sample);
}

/// `spin_until_ms=<t>`: a CPU hog for the scheduler's fairness scenario. Spins until system
/// time reaches `t` ms, then reports how many loop rounds it got and powers off; domains of
/// different weights spinning over the same interval share the CPU in proportion.
fn spin_until(deadline_ms: u64) -> ! {
    let deadline = deadline_ms * 1_000_000;
    let mut rounds: u64 = 0;
    while time::now_ns() < deadline {
        rounds += 1;
        core::hint::spin_loop();
    }
    println!("spin: {rounds} rounds until {deadline_ms} ms");
    hypercall::shutdown(ShutdownReason::Poweroff)
}

/// `spin_until_ms=<t> nap_us=<n> nap_every_us=<m>`: as [`spin_until`], but after every `m` µs
/// of spinning (system time) it sleeps `n` µs in a poll that only its deadline ends: a domain
/// that naps often between stretches of work, which must get its weight's share beside
/// spinning domains and no more (docs/abi.md 3.3: a wake-up buys no lead).
fn nap_until(deadline_ms: u64, nap_us: u64, nap_every_us: u64) -> ! {
    let deadline = deadline_ms * 1_000_000;
    let Ok(port) = events::alloc_loopback() else {
        println!("nap: error: alloc_loopback failed");
        hypercall::shutdown(ShutdownReason::Crash)
    };
    let (mut rounds, mut naps) = (0u64, 0u64);
    let mut stretch_end = time::now_ns() + nap_every_us * 1_000;
    while time::now_ns() < deadline {
        rounds += 1;
        core::hint::spin_loop();
        if time::now_ns() >= stretch_end {
            let wake_at = time::now_ns() + nap_us * 1_000;
            match sched::poll(&[port], Some(wake_at)) {
                Ok(sched::PollOutcome::TimedOut) => naps += 1,
                other => {
                    println!("nap: error: poll on a port nobody raises: {other:?}");
                    hypercall::shutdown(ShutdownReason::Crash)
                }
            }
            stretch_end = time::now_ns() + nap_every_us * 1_000;
        }
    }
    println!("spin: {rounds} rounds and {naps} naps until {deadline_ms} ms");
    hypercall::shutdown(ShutdownReason::Poweroff)
}

fn bench_main(start: &'static StartInfo) {
    if let Some(deadline) = cmdline_value("spin_until_ms").and_then(|v| v.parse::<u64>().ok()) {
        let nap = |key| cmdline_value(key).and_then(|v| v.parse::<u64>().ok());
        if let (Some(nap_us), Some(every)) = (nap("nap_us"), nap("nap_every_us")) {
            nap_until(deadline, nap_us, every);
        }
        spin_until(deadline);
    }
    let iterations = match cmdline_value("iterations").map(str::parse::<u64>) {
        None => DEFAULT_ITERATIONS,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            println!("bench: error: iterations= wants a positive number");
            hypercall::shutdown(ShutdownReason::Crash)
        }
    };
    if let Some(peer) = cmdline_value("idle") {
        match peer.parse::<u32>() {
            Ok(peer) => idle::idle(peer),
            Err(_) => {
                println!("idle: error: idle= wants the benchmark domain's id");
                hypercall::shutdown(ShutdownReason::Crash)
            }
        }
    }
    if let Some(peer) = cmdline_value("pong") {
        match peer.parse::<u32>() {
            Ok(peer) => pingpong::pong(peer, WARMUP + iterations),
            Err(_) => {
                println!("pong: error: pong= wants ping's domain id");
                hypercall::shutdown(ShutdownReason::Crash)
            }
        }
    }
    let vendor = cpuid::vendor();
    println!(
        "bench: domain {}, {} iterations after {WARMUP} warm-up runs each, CPU {}, TSC {} kHz, {}",
        start.domain_id,
        iterations,
        core::str::from_utf8(&vendor).unwrap_or("?"),
        time::tsc_khz(),
        measure::describe_stats()
    );
    if !measure::register_runstate() {
        println!("bench: no run-state area: blocked time is counted as work");
    }
    let setup = match ops::setup() {
        Ok(setup) => setup,
        Err(error) => {
            println!("bench: error: cannot set up: {error}");
            hypercall::shutdown(ShutdownReason::Crash)
        }
    };
    println!(
        "bench: x2APIC timer in {} mode; timers set {} ns ahead",
        if setup.tsc_deadline {
            "TSC-deadline"
        } else {
            "one-shot"
        },
        ops::TIMER_DELAY_NS
    );
    check_null_hypercall();
    // Idle domains, blocked beside it for the whole run (`idle_domains=<A>-<B>`).
    let idle = match cmdline_value("idle_domains").map(|range| range.split_once('-')) {
        None => None,
        Some(Some((first, last))) => match (first.parse(), last.parse()) {
            (Ok(first), Ok(last)) => idle::IdleDomains::connect(first, last),
            _ => None,
        },
        Some(None) => None,
    };
    if cmdline_value("idle_domains").is_some() && idle.is_none() {
        fail(format_args!("idle_domains= names domains it cannot reach"));
    }
    // The hypervisor's start-up lines and ours so far.
    settle(1000);

    // `groups=a,b`: only the operations of those groups run (all without the key).
    let runs = |group: Group| {
        cmdline_value("groups").is_none_or(|groups| groups.split(',').any(|g| g == group.name()))
    };
    if runs(Group::Hypercall) {
        hypercalls(iterations);
    }
    if runs(Group::Multicall) {
        multicalls(iterations);
    }
    if runs(Group::Time) {
        time_reads(iterations);
    }
    if runs(Group::Events) || runs(Group::Idle) {
        events_and_idle(iterations, &setup);
    }
    if runs(Group::Timer) {
        timers(iterations, &setup);
    }
    if runs(Group::Console) {
        console(iterations);
    }
    if event_pingpong(iterations) {
        domain_switch(iterations);
    } else {
        measure::report_skipped(
            info("domain_switch", Group::Pingpong, Path::Pv),
            "needs-pingpong_peer",
        );
    }

    if runs(Group::Smp) {
        smp_rows(iterations, start);
    }
    if runs(Group::Smp2) {
        smp_cpus::rows(iterations, start.nr_vcpus);
    }
    if runs(Group::Smp4) {
        smp4::rows(iterations, start.nr_vcpus);
    }
    if let Some(idle) = &idle {
        idle.release();
    }
    if FAILED.load(Ordering::Relaxed) {
        println!("bench: done, with errors");
        hypercall::shutdown(ShutdownReason::Crash)
    }
    println!("bench: done");
}

/// The unknown number must come back as `-ENOSYS`, or the figure is not a null call.
fn check_null_hypercall() {
    // SAFETY: an undefined number touches nothing.
    let rax = unsafe { hypercall::hypercall0(ops::UNKNOWN_HYPERCALL) };
    if hypercall::decode(rax) != Err(hypercall::HypercallError::Errno(lamina_abi::Errno::ENOSYS)) {
        fail(format_args!(
            "hypercall {:#x} returned {rax:#x}, not -ENOSYS",
            ops::UNKNOWN_HYPERCALL
        ));
    }
}

fn hypercalls(n: u64) {
    bench(
        info("null_hypercall", Group::Hypercall, Path::Pv),
        n,
        ops::null_hypercall,
    );
    bench(
        info("version_hypercall", Group::Hypercall, Path::Pv),
        n,
        ops::version_hypercall,
    );
    bench(
        info("cpuid_trap", Group::Cpuid, Path::Trap),
        n,
        ops::cpuid_trap,
    );
}

fn multicalls(n: u64) {
    let mut batch1 = ops::version_batch::<1>();
    bench(info("multicall_1", Group::Multicall, Path::Pv), n, || {
        ops::multicall(&mut batch1)
    });
    let mut batch8 = ops::version_batch::<8>();
    bench(info("multicall_8", Group::Multicall, Path::Pv), n, || {
        ops::multicall(&mut batch8)
    });
    let mut batch32 = ops::version_batch::<32>();
    bench(info("multicall_32", Group::Multicall, Path::Pv), n, || {
        ops::multicall(&mut batch32)
    });
    bench(info("calls_1", Group::Multicall, Path::Pv), n, || {
        ops::calls(1)
    });
    bench(info("calls_8", Group::Multicall, Path::Pv), n, || {
        ops::calls(8)
    });
    bench(info("calls_32", Group::Multicall, Path::Pv), n, || {
        ops::calls(32)
    });
}

fn time_reads(n: u64) {
    bench(
        info("pvclock_read", Group::Time, Path::Pv),
        n,
        ops::pvclock_read,
    );
    bench(
        info("rdtsc_cpuid", Group::Time, Path::Trap),
        n,
        ops::rdtsc_cpuid,
    );
}

fn events_and_idle(n: u64, setup: &ops::Setup) {
    bench_counted(
        info("event_send_self_upcall", Group::Events, Path::Pv),
        n,
        &ops::LOOPBACK_EVENTS,
        || ops::event_send_self_upcall(setup),
    );
    bench_counted(
        info("hlt_wake_pending", Group::Idle, Path::Trap),
        n,
        &ops::SELF_IPIS,
        ops::hlt_wake_pending,
    );
    bench_counted(
        info("block_wake_pending", Group::Idle, Path::Pv),
        n,
        &ops::LOOPBACK_EVENTS,
        || ops::block_wake_pending(setup),
    );
}

fn timers(n: u64, setup: &ops::Setup) {
    bench_counted(
        info("timer_pv", Group::Timer, Path::Pv),
        n,
        &ops::PV_TIMER_EVENTS,
        ops::timer_pv,
    );
    bench_counted(
        info("timer_x2apic", Group::Timer, Path::Trap),
        n,
        &ops::APIC_TIMER_INTERRUPTS,
        || ops::timer_x2apic(setup),
    );
}

fn console(n: u64) {
    // Whole lines: the hypervisor prints a UART line at its newline.
    let bytes = n.div_ceil(80) * 80;
    let mut index = 0;
    settle(REPORT_LINE_BYTES);
    let sample = measure::run(80, bytes, || ops::uart_byte(&mut index), || {});
    measure::report(info("uart_byte", Group::Console, Path::Trap), &sample);

    let lines = CONSOLE_LINE_PERIOD * (n / 2000).max(1);
    // Each line is printed with a `(d1) ` prefix.
    let line_bytes = ops::LINE.len() as u64 + 5;
    settle(REPORT_LINE_BYTES + (80 + bytes) / 80 * line_bytes);
    let sample = measure::run(WARMUP_LINES, lines, ops::console_line_hypercall, || {});
    measure::report(
        info("console_line_hypercall", Group::Console, Path::Pv),
        &sample,
    );

    // Start from an empty ring, and count the drain of the last fill.
    for _ in 0..WARMUP_LINES {
        ops::console_line_ring();
    }
    ops::console_ring_flush();
    settle(REPORT_LINE_BYTES + (WARMUP_LINES * 2 + lines) * line_bytes);
    let sample = measure::run(0, lines, ops::console_line_ring, ops::console_ring_flush);
    measure::report(info("console_line_ring", Group::Console, Path::Pv), &sample);
}

/// `event_pingpong` against the domain named by `pingpong_peer=` (see [`pingpong`]); skipped
/// without one, or when the hypervisor has no inter-domain channels. Returns whether it ran
/// (and the partner goes on to `domain_switch`).
fn event_pingpong(n: u64) -> bool {
    let info = info("event_pingpong", Group::Pingpong, Path::Pv);
    let Some(peer) = cmdline_value("pingpong_peer") else {
        measure::report_skipped(info, "needs-pingpong_peer");
        return false;
    };
    let Ok(peer) = peer.parse::<u32>() else {
        fail(format_args!("pingpong_peer={peer} is not a domain id"));
        return false;
    };
    let port = match pingpong::connect(peer) {
        Ok(port) => port,
        Err(pingpong::ConnectError::Unsupported) => {
            measure::report_skipped(info, "needs-interdomain-events");
            return false;
        }
        Err(pingpong::ConnectError::NeverAllocated) => {
            fail(format_args!(
                "event_pingpong: domain {peer} never allocated {}",
                pingpong::PONG_PORT
            ));
            return false;
        }
        Err(pingpong::ConnectError::Failed(error)) => {
            fail(format_args!(
                "event_pingpong: bind_interdomain to domain {peer} {} failed: {error}",
                pingpong::PONG_PORT
            ));
            return false;
        }
    };
    settle(REPORT_LINE_BYTES);
    let mut counts = pingpong::Counts::default();
    // Ping's blocked time is pong's work and the switches: it is part of the round trip.
    let sample =
        measure::run_counting_blocked(WARMUP, n, || pingpong::round_trip(port, &mut counts));
    if let Err(error) = events::close(port) {
        fail(format_args!(
            "event_pingpong: closing {port} failed: {error}"
        ));
    }
    let expected = WARMUP + n;
    if counts.sent != expected || counts.received != expected || counts.errors != 0 {
        fail(format_args!(
            "event_pingpong: {expected} round trips, but sent {}, received {}, {} refused calls",
            counts.sent, counts.received, counts.errors
        ));
    }
    measure::report(info, &sample.0);
    println!(
        "bench: event_pingpong: {port} to domain {peer}; ping was blocked (pong and the switches ran) for {} of the {} ticks per round trip; exits are ping's own (pong's are on its console line)",
        measure::Hundredths::ratio(sample.1, n),
        measure::Hundredths::ratio(sample.0.work_ticks(), n),
    );
    true
}

/// The SMP rows (docs/abi.md 20), last: they start vCPU 1, which the rows before must not
/// see. Skipped with one vCPU (`vcpus=`).
fn smp_rows(n: u64, start: &StartInfo) {
    let rows = [
        info("ipi_self_pv", Group::Smp, Path::Pv),
        info("ipi_self_x2apic", Group::Smp, Path::Trap),
        info("shootdown_pv_blocked", Group::Smp, Path::Pv),
        info("shootdown_ipi_blocked", Group::Smp, Path::Pv),
    ];
    if start.nr_vcpus < 2 {
        for row in rows {
            measure::report_skipped(row, "needs-vcpus=2");
        }
        return;
    }
    if let Err((what, error)) = smp::setup() {
        fail(format_args!("smp: {what} failed: {error}"));
        return;
    }
    let [ipi_pv, ipi_x2apic, flush_pv, flush_ipi] = rows;
    bench_counted(ipi_pv, n, &smp::IPI_EVENTS, smp::ipi_self_pv);
    bench_counted(ipi_x2apic, n, &ops::SELF_IPIS, smp::ipi_self_x2apic);
    bench(flush_pv, n, smp::shootdown_pv_blocked);
    bench_counted(flush_ipi, n, &smp::SHOOTDOWNS, smp::shootdown_ipi_blocked);
}

/// `domain_switch`: round trips of yields between this domain and pong (see [`pingpong`]),
/// each two switches between vCPUs with their extended-state switch (docs/abi.md 18.1) and two
/// `sched_op` yields.
fn domain_switch(n: u64) {
    let info = info("domain_switch", Group::Pingpong, Path::Pv);
    settle(REPORT_LINE_BYTES * 2);
    let mut stuck = 0;
    let sample = measure::run(
        WARMUP + pingpong::SWITCH_SYNC_ROUNDS,
        n,
        || pingpong::switch_round_trip(&mut stuck),
        || {},
    );
    if stuck != 0 {
        fail(format_args!(
            "domain_switch: {stuck} round trips without a switch to the partner"
        ));
    }
    measure::report(info, &sample);
}

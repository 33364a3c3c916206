//! Tests of the paravirtual timers (docs/abi.md 9.3): one-shot and periodic, checked against
//! the pvclock the guest reads.
//!
//! A timer never fires early: each test reads system time (pvclock) right after it saw the
//! VIRQ_TIMER port pending and checks that it is at or past the deadline. It may be late, but
//! by less than 50 ms plus the time the vCPU waited for the CPU meanwhile (`crate::timing`):
//! a generous bound, because emulators are slow and every test domain of a run shares one
//! CPU.

use lamina_abi::Errno;
use lamina_abi::vcpu::PERIOD_MIN_NS;

use super::common::{loopback_port, timer_port, wait_until_pending};
use crate::framework::{Status, check, check_eq, expect_ok};
use crate::hv;
use crate::shared;
use crate::timing::{MS, Stopwatch};

/// Arms the one-shot timer of vCPU 0 at `deadline`; records a failure if refused.
fn arm_singleshot(deadline: u64) -> bool {
    expect_ok(
        format_args!("SetSingleshotTimer(vCPU 0, {deadline} ns)"),
        hv::set_singleshot_timer(0, deadline),
    )
    .is_some()
}

/// Checks that `port` stays idle until `deadline` (Poll times out).
fn check_stays_idle(what: &str, port: u64, deadline: u64) {
    check_eq!(
        format_args!("{what}: Poll([{port}]) until {deadline} ns"),
        Status::err(Errno::ETIMEDOUT),
        hv::poll(&[port as u32], deadline)
    );
    check!(!shared::is_pending(port), "{what}: port {port} pending");
}

conformance_test! {
    title: "one-shot timers of 0.5-5 ms raise VIRQ_TIMER never before their deadline (pvclock)",
    section: "9.3 Timers",
    expect: Success,
}
pub(super) fn singleshot_timer_never_early() {
    let Some(timer) = timer_port() else { return };
    for delay in [MS, 2 * MS, 3 * MS, MS / 2, 5 * MS] {
        let watch = Stopwatch::start();
        let deadline = shared::now() + delay;
        if !arm_singleshot(deadline) {
            return;
        }
        let at = wait_until_pending("one-shot timer", timer);
        watch.check_on_time(
            format_args!("one-shot timer armed {delay} ns ahead"),
            deadline,
            at,
        );
        shared::clear_pending(timer);
    }
}

conformance_test! {
    title: "a one-shot timer with a deadline already past fires at once",
    section: "9.3 Timers",
    expect: Success,
}
pub(super) fn singleshot_past_fires_at_once() {
    let Some(timer) = timer_port() else { return };
    // A deadline just past, and one long past (1 ns after the hypervisor started).
    for deadline in [shared::now().saturating_sub(MS), 1] {
        let watch = Stopwatch::start();
        let armed_at = shared::now();
        if !arm_singleshot(deadline) {
            return;
        }
        // Give up after a second, so that a timer that never fires fails the test.
        let status = hv::poll(&[timer as u32], armed_at + 1000 * MS);
        check_eq!(
            format_args!("Poll for a one-shot timer at {deadline} ns, in the past"),
            Status(0),
            status
        );
        watch.check_prompt(
            format_args!("a one-shot timer in the past: from arming to its event"),
            shared::now() - armed_at,
        );
        shared::clear_pending(timer);
    }
}

/// Runs `attempt` until it reports that it got its hypercalls in before the deadline it set
/// (`Some`): in a run where every test domain shares one CPU, the vCPU can be preempted for a
/// whole time slice between two calls, and a timer that expired meanwhile fired legitimately.
/// Records an error if no attempt of [`ATTEMPTS`] made it.
fn before_the_deadline(what: &str, mut attempt: impl FnMut() -> Option<()>) {
    for _ in 0..ATTEMPTS {
        if attempt().is_some() {
            return;
        }
    }
    crate::framework::error(format_args!(
        "{what}: preempted past the deadline in each of {ATTEMPTS} attempts"
    ));
}

/// How often a timing-sensitive set-up is tried.
const ATTEMPTS: usize = 5;

conformance_test! {
    title: "set_singleshot_timer of 0 cancels the armed timer",
    section: "9.3 Timers",
    expect: Success,
}
pub(super) fn singleshot_zero_cancels() {
    let Some(timer) = timer_port() else { return };
    before_the_deadline("cancelling a one-shot timer", || {
        let deadline = shared::now() + 5 * MS;
        if !arm_singleshot(deadline) {
            return Some(());
        }
        check_eq!(
            "SetSingleshotTimer(vCPU 0, 0)",
            Status(0),
            hv::set_singleshot_timer(0, 0)
        );
        if shared::now() >= deadline {
            shared::clear_pending(timer);
            return None;
        }
        check_stays_idle("cancelled one-shot timer", timer, deadline + 3 * MS);
        Some(())
    });
}

conformance_test! {
    title: "a new one-shot deadline replaces the armed one: it fires once, at the new deadline",
    section: "9.3 Timers",
    expect: Success,
}
pub(super) fn singleshot_rearm_replaces() {
    let Some(timer) = timer_port() else { return };
    // A new deadline replaces the old one: re-armed from 2 ms to 6 ms ahead, the timer fires
    // at 6 ms, not at 2.
    before_the_deadline("re-arming a one-shot timer", || {
        let watch = Stopwatch::start();
        let now = shared::now();
        if !arm_singleshot(now + 2 * MS) || !arm_singleshot(now + 6 * MS) {
            return Some(());
        }
        if shared::now() >= now + 2 * MS {
            let _ = wait_until_pending("re-armed one-shot timer", timer);
            shared::clear_pending(timer);
            return None;
        }
        let at = wait_until_pending("re-armed one-shot timer", timer);
        watch.check_on_time(
            format_args!("one-shot timer re-armed from 2 ms to 6 ms ahead"),
            now + 6 * MS,
            at,
        );
        Some(())
    });
    shared::clear_pending(timer);
    check_stays_idle(
        "one-shot timer after its only expiry",
        timer,
        shared::now() + 2 * MS,
    );
}

conformance_test! {
    title: "a 1 ms periodic timer ticks on its grid: never early, and 10 ticks take about 10 ms",
    section: "9.3 Timers",
    expect: Success,
}
pub(super) fn periodic_timer_keeps_period() {
    const PERIOD: u64 = MS;
    const TICKS: u64 = 10;
    let Some(timer) = timer_port() else { return };
    let watch = Stopwatch::start();
    let armed = shared::now();
    if expect_ok(
        "SetPeriodicTimer(vCPU 0, 1 ms)",
        hv::set_periodic_timer(0, PERIOD),
    )
    .is_none()
    {
        return;
    }
    let accepted = shared::now();
    // Ticks are at T + k * PERIOD for T, the time of the call, in [armed, accepted]. A tick
    // handled late may merge with the next one (one pending bit), so the k-th tick seen is
    // tick k or a later one: never before armed + k * PERIOD.
    let mut last = 0;
    for tick in 1..=TICKS {
        let at = wait_until_pending("periodic timer", timer);
        shared::clear_pending(timer);
        if !check!(
            at >= armed + tick * PERIOD,
            "periodic tick {tick} seen at {} ns after arming, before {} ns",
            at - armed,
            tick * PERIOD
        ) {
            break;
        }
        last = at;
    }
    // Ten periods, and the slack for the last one: the period is kept, not stretched.
    let allowed = watch.allowance();
    check!(
        last < accepted + TICKS * PERIOD + allowed,
        "{TICKS} periodic ticks of 1 ms took {} ns (allowed: {} ns)",
        last - armed,
        TICKS * PERIOD + allowed
    );
    expect_ok("SetPeriodicTimer(vCPU 0, 0)", hv::set_periodic_timer(0, 0));
}

conformance_test! {
    title: "periodic timers shorter than PERIOD_MIN_NS return -EINVAL; PERIOD_MIN_NS is accepted",
    section: "9.3 Timers",
    expect: Success,
}
pub(super) fn periodic_bad_period_einval() {
    for period in [1, 1000, PERIOD_MIN_NS - 1] {
        check_eq!(
            format_args!("SetPeriodicTimer(vCPU 0, {period} ns)"),
            Status::err(Errno::EINVAL),
            hv::set_periodic_timer(0, period)
        );
    }
    check_eq!(
        format_args!("SetPeriodicTimer(vCPU 0, {PERIOD_MIN_NS} ns), the shortest"),
        Status(0),
        hv::set_periodic_timer(0, PERIOD_MIN_NS)
    );
    check_eq!(
        "SetPeriodicTimer(vCPU 0, 0)",
        Status(0),
        hv::set_periodic_timer(0, 0)
    );
}

conformance_test! {
    title: "set_periodic_timer of 0 stops the ticks",
    section: "9.3 Timers",
    expect: Success,
}
pub(super) fn periodic_zero_stops() {
    let Some(timer) = timer_port() else { return };
    if expect_ok(
        "SetPeriodicTimer(vCPU 0, 1 ms)",
        hv::set_periodic_timer(0, MS),
    )
    .is_none()
    {
        return;
    }
    wait_until_pending("periodic timer", timer);
    check_eq!(
        "SetPeriodicTimer(vCPU 0, 0)",
        Status(0),
        hv::set_periodic_timer(0, 0)
    );
    shared::clear_pending(timer);
    check_stays_idle("stopped periodic timer", timer, shared::now() + 5 * MS);
}

conformance_test! {
    title: "a timer expiring with no VIRQ_TIMER bound is dropped, not delivered later",
    section: "9.3 Timers",
    expect: Success,
}
pub(super) fn timer_without_virq_dropped() {
    let Some(idle) = loopback_port() else { return };
    let now = shared::now();
    if !arm_singleshot(now + MS) {
        return;
    }
    // The timer expires with no port bound to VIRQ_TIMER: the tick goes nowhere.
    check_eq!(
        "Poll on an idle port past the timer's deadline",
        Status::err(Errno::ETIMEDOUT),
        hv::poll(&[idle as u32], now + 3 * MS)
    );
    let Some(timer) = timer_port() else { return };
    check!(
        !shared::is_pending(timer),
        "VIRQ_TIMER bound after its tick was dropped is pending"
    );
    check_stays_idle(
        "VIRQ_TIMER after a dropped tick",
        timer,
        shared::now() + 3 * MS,
    );
}

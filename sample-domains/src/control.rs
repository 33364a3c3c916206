//! `role=control` (booted with `privileged=1`): what a control domain does to the others with
//! `domctl_op` (docs/abi.md 17), each step checked against the ABI:
//!
//! 1. list the domains (itself privileged, the worker there);
//! 2. read the worker's console until [`worker::READY_LINE`] shows up (or, for a `stress`
//!    domain as the worker, [`stress::UNDER_WAY_LINE`]: it has 2 vCPUs busy with its peer);
//! 3. pause the worker: its CPU time must not advance while control sleeps;
//! 4. unpause it: its CPU time must advance while control sleeps;
//! 5. destroy it: it must be shut down, ending destroyed, holding no memory, and the
//!    hypervisor's free memory must grow by at least what it held;
//! 6. the refusals: itself (`EINVAL`), the ended worker (`EINVAL`), no such domain (`ENOENT`).
//!
//! It prints `control: result: checks=<n> failed=<n>` and powers off when nothing failed.

use core::fmt;

use lamina_abi::Errno;
use lamina_abi::start_info::START_FLAG_PRIVILEGED;
use lamina_guest_sdk::domctl::{
    self, CONSOLE_HISTORY_BYTES, DOMAIN_FLAG_PRIVILEGED, DomainInfo, domain_state, ending,
};
use lamina_guest_sdk::hypercall::HypercallError;
use lamina_guest_sdk::{StartInfo, println, sched};

use crate::stress::UNDER_WAY_LINE;
use crate::worker::READY_LINE;
use crate::{MAX_ATTEMPTS, fail, finish, sleep_ns};

/// How long control sleeps while the worker is paused, and again once it is unpaused.
const OBSERVE_NS: u64 = 30_000_000;
/// A domain id no boot builds.
const NO_SUCH_DOMAIN: u32 = 200;

/// Counts checks; prints each failure.
#[derive(Default)]
struct Checks {
    done: u32,
    failed: u32,
}

impl Checks {
    fn check(&mut self, ok: bool, what: fmt::Arguments<'_>) -> bool {
        self.done += 1;
        if !ok {
            self.failed += 1;
            println!("control: error: {what}");
        }
        ok
    }

    fn expect_error(&mut self, what: &str, result: Result<(), HypercallError>, expected: Errno) {
        let ok = matches!(result, Err(error) if error == expected);
        self.check(ok, format_args!("{what}: {result:?}, expected {expected}"));
    }
}

pub(crate) fn run(start: &StartInfo, worker: u32) -> ! {
    let me = start.domain_id;
    let mut checks = Checks::default();
    checks.check(
        start.flags & START_FLAG_PRIVILEGED != 0,
        format_args!("StartInfo does not say privileged: boot with privileged=1"),
    );

    list(me, worker, &mut checks);
    let console_end = find_ready_line(worker, &mut checks);
    pause_and_unpause(worker, &mut checks);
    destroy(worker, &mut checks);
    refusals(me, worker, console_end, &mut checks);

    println!(
        "control: result: checks={} failed={}",
        checks.done, checks.failed
    );
    finish(u64::from(checks.failed))
}

fn info_of(worker: u32) -> DomainInfo {
    match domctl::domain_info(worker) {
        Ok(Some(info)) => info,
        Ok(None) => fail("control", format_args!("domain {worker} is not listed")),
        Err(error) => fail("control", format_args!("list_domains failed: {error}")),
    }
}

fn state_name(state: u32) -> &'static str {
    match state {
        domain_state::RUNNING => "running",
        domain_state::BLOCKED => "blocked",
        domain_state::PAUSED => "paused",
        domain_state::SHUTDOWN => "shutdown",
        domain_state::CRASHED => "crashed",
        _ => "?",
    }
}

fn ending_name(value: u32) -> &'static str {
    match value {
        ending::NONE => "none",
        ending::POWEROFF => "poweroff",
        ending::REBOOT => "reboot",
        ending::CRASH => "crash",
        ending::FAULT => "fault",
        ending::DESTROYED => "destroyed",
        _ => "?",
    }
}

/// Step 1: every domain, one line each.
fn list(me: u32, worker: u32, checks: &mut Checks) {
    let mut infos = [DomainInfo::default(); 16];
    let count = domctl::list_domains(&mut infos)
        .unwrap_or_else(|error| fail("control", format_args!("list_domains failed: {error}")));
    println!("control: {count} domains");
    for info in &infos[..count.min(infos.len())] {
        println!(
            "control: domain {} {} state={} ending={} weight={} mem={}K cpu_ms={} console_bytes={}{}",
            info.domain_id,
            info.name(),
            state_name(info.state),
            ending_name(info.ending),
            info.weight,
            info.memory_bytes >> 10,
            info.cpu_ns / 1_000_000,
            info.console_bytes,
            if info.flags & DOMAIN_FLAG_PRIVILEGED != 0 {
                " privileged"
            } else {
                ""
            }
        );
    }
    let listed = &infos[..count.min(infos.len())];
    let own = listed.iter().find(|info| info.domain_id == me);
    checks.check(
        own.is_some_and(|info| {
            info.flags & DOMAIN_FLAG_PRIVILEGED != 0 && info.ending == ending::NONE
        }),
        format_args!("domain {me} (this one) is not listed as privileged and running"),
    );
    let theirs = listed.iter().find(|info| info.domain_id == worker);
    checks.check(
        theirs.is_some_and(|info| {
            info.flags & DOMAIN_FLAG_PRIVILEGED == 0
                && info.ending == ending::NONE
                && info.memory_bytes > 0
        }),
        format_args!("domain {worker} (the worker) is not listed as an unprivileged live domain"),
    );
    checks.check(
        listed
            .windows(2)
            .all(|pair| pair[0].domain_id < pair[1].domain_id),
        format_args!("the domains are not listed in id order"),
    );
}

/// The lines that say a worker is ready to be watched and destroyed.
const READY_LINES: [&str; 2] = [READY_LINE, UNDER_WAY_LINE];

/// Step 2: reads the worker's console (the last bytes the hypervisor keeps) until its ready
/// line is there; returns the end of its console stream then.
fn find_ready_line(worker: u32, checks: &mut Checks) -> u64 {
    let mut history = [0u8; CONSOLE_HISTORY_BYTES as usize];
    for _ in 0..MAX_ATTEMPTS {
        let end = info_of(worker).console_bytes;
        let from = end.saturating_sub(CONSOLE_HISTORY_BYTES);
        let copied = domctl::read_console(worker, from, &mut history)
            .unwrap_or_else(|error| fail("control", format_args!("read_console failed: {error}")));
        let text = &history[..copied];
        if let Some(line) = READY_LINES
            .iter()
            .find(|line| contains(text, line.as_bytes()))
        {
            println!(
                "control: read the worker's console, bytes {from}..{}: found \"{line}\"",
                from + copied as u64
            );
            // At least to the end listed: a worker running on another CPU may have printed
            // more since (never more than the 4096 bytes asked for).
            checks.check(
                from + copied as u64 >= end,
                format_args!(
                    "read_console stopped at {} of {end} bytes",
                    from + copied as u64
                ),
            );
            return end;
        }
        let _ = sched::yield_now();
    }
    fail(
        "control",
        format_args!("the worker's console never showed {READY_LINES:?}"),
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Steps 3 and 4.
fn pause_and_unpause(worker: u32, checks: &mut Checks) {
    if let Err(error) = domctl::pause(worker) {
        fail(
            "control",
            format_args!("pause of domain {worker} failed: {error}"),
        );
    }
    let paused = info_of(worker);
    sleep_ns("control", OBSERVE_NS);
    let still = info_of(worker);
    println!(
        "control: paused the worker: state={}, cpu_ns {} -> {} over {} ms",
        state_name(still.state),
        paused.cpu_ns,
        still.cpu_ns,
        OBSERVE_NS / 1_000_000
    );
    checks.check(
        paused.state == domain_state::PAUSED && still.state == domain_state::PAUSED,
        format_args!("a paused worker is {}", state_name(still.state)),
    );
    checks.check(
        still.cpu_ns == paused.cpu_ns,
        format_args!("the paused worker's CPU time advanced"),
    );
    checks.check(
        domctl::pause(worker).is_ok(),
        format_args!("pausing a paused domain is not 0"),
    );

    if let Err(error) = domctl::unpause(worker) {
        fail(
            "control",
            format_args!("unpause of domain {worker} failed: {error}"),
        );
    }
    sleep_ns("control", OBSERVE_NS);
    let running = info_of(worker);
    println!(
        "control: unpaused the worker: state={}, cpu_ns {} -> {} over {} ms",
        state_name(running.state),
        still.cpu_ns,
        running.cpu_ns,
        OBSERVE_NS / 1_000_000
    );
    checks.check(
        running.state != domain_state::PAUSED && running.ending == ending::NONE,
        format_args!("the unpaused worker is {}", state_name(running.state)),
    );
    checks.check(
        running.cpu_ns > still.cpu_ns,
        format_args!("the unpaused worker got no CPU time"),
    );
}

/// Step 5.
fn destroy(worker: u32, checks: &mut Checks) {
    let before = domctl::phys_info()
        .unwrap_or_else(|error| fail("control", format_args!("phys_info failed: {error}")));
    let held = info_of(worker).memory_bytes;
    if let Err(error) = domctl::destroy(worker) {
        fail(
            "control",
            format_args!("destroy of domain {worker} failed: {error}"),
        );
    }
    let after = domctl::phys_info()
        .unwrap_or_else(|error| fail("control", format_args!("phys_info failed: {error}")));
    let gone = info_of(worker);
    println!(
        "control: destroyed the worker: state={} ending={} memory_bytes={}; free memory {}K -> {}K (the worker held {}K)",
        state_name(gone.state),
        ending_name(gone.ending),
        gone.memory_bytes,
        before.free_bytes >> 10,
        after.free_bytes >> 10,
        held >> 10
    );
    checks.check(
        gone.state == domain_state::SHUTDOWN && gone.ending == ending::DESTROYED,
        format_args!("a destroyed domain is not shut down with ending destroyed"),
    );
    checks.check(
        gone.memory_bytes == 0 && held > 0,
        format_args!("a destroyed domain still holds memory"),
    );
    checks.check(
        after.free_bytes >= before.free_bytes + held,
        format_args!("free memory grew by less than the worker held"),
    );
    checks.check(
        after.domain_bytes + held <= before.domain_bytes,
        format_args!("domain memory shrank by less than the worker held"),
    );
}

/// Step 6, and the worker's console still readable after its end.
fn refusals(me: u32, worker: u32, console_end: u64, checks: &mut Checks) {
    checks.expect_error("pause of this domain", domctl::pause(me), Errno::EINVAL);
    checks.expect_error("destroy of this domain", domctl::destroy(me), Errno::EINVAL);
    checks.expect_error(
        "pause of the ended worker",
        domctl::pause(worker),
        Errno::EINVAL,
    );
    checks.expect_error(
        "unpause of the ended worker",
        domctl::unpause(worker),
        Errno::EINVAL,
    );
    checks.expect_error(
        "destroy of the ended worker",
        domctl::destroy(worker),
        Errno::EINVAL,
    );
    checks.expect_error(
        "pause of a domain that does not exist",
        domctl::pause(NO_SUCH_DOMAIN),
        Errno::ENOENT,
    );
    let mut byte = [0u8; 1];
    checks.expect_error(
        "read_console of a domain that does not exist",
        domctl::read_console(NO_SUCH_DOMAIN, 0, &mut byte).map(drop),
        Errno::ENOENT,
    );
    let end = info_of(worker).console_bytes;
    checks.expect_error(
        "read_console past the end of the stream",
        domctl::read_console(worker, end + 1, &mut byte).map(drop),
        Errno::EINVAL,
    );
    let mut history = [0u8; CONSOLE_HISTORY_BYTES as usize];
    let from = end.saturating_sub(CONSOLE_HISTORY_BYTES);
    let kept = domctl::read_console(worker, from, &mut history).map(|copied| {
        READY_LINES
            .iter()
            .any(|line| contains(&history[..copied], line.as_bytes()))
    });
    checks.check(
        kept == Ok(true) && end >= console_end,
        format_args!("the destroyed worker's console is no longer readable: {kept:?}"),
    );
    println!("control: refusals as docs/abi.md 17 says; the ended worker's console is kept");
}

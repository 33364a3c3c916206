//! Checking when things happen: never early, and not absurdly late.
//!
//! "Never early" is exact: a timer's event must be observed (pvclock time read right after
//! it) at or after its deadline. "Not late" needs care: in a conformance run every test domain
//! shares one CPU with a time slice of its own, so a woken vCPU may wait for the CPU for as
//! long as the other domains keep it. That wait is the hypervisor's to report: the runstate
//! area (docs/abi.md 9.2) accounts it as time RUNNABLE. A [`Stopwatch`] registers a runstate
//! area (once per domain) and allows an event to come [`LATE_BOUND_NS`] plus the time this
//! vCPU spent RUNNABLE after its deadline; should the hypervisor refuse the area, the allowance
//! is [`LATE_BOUND_NS`] alone.
//!
//! [`LATE_BOUND_NS`] (50 ms) is generous on purpose, because emulators are slow: it catches
//! timers that fire on the wrong scale or never, not jitter.

use core::sync::atomic::{AtomicU8, Ordering};

use lamina_abi::vcpu::{RunstateInfo, runstate};

use crate::console::println;
use crate::framework::check;
use crate::hv;
use crate::x86::RacyCell;

/// One millisecond in ns.
pub(crate) const MS: u64 = 1_000_000;

/// How much later than its deadline an event may be observed, beyond the time the vCPU
/// waited for the CPU.
pub(crate) const LATE_BOUND_NS: u64 = 50 * MS;

/// How long a test waits for an event that does not come before it calls it lost: long
/// past any deadline it sets, short enough that a lost event fails the test rather than the
/// whole run (which ends only when every test domain has ended).
pub(crate) const GIVE_UP_NS: u64 = 2_000 * MS;

/// The runstate area the stopwatches read.
static RUNSTATE: RacyCell<RunstateInfo> = RacyCell::new(RunstateInfo {
    state: 0,
    reserved: 0,
    state_entry_time: 0,
    time: [0; 4],
});

const NOT_TRIED: u8 = 0;
const REGISTERED: u8 = 1;
const REFUSED: u8 = 2;
static REGISTRATION: AtomicU8 = AtomicU8::new(NOT_TRIED);

/// Time this vCPU spent RUNNABLE (ready, waiting for the CPU) so far, as far as the runstate
/// area says; 0 without one.
fn time_waiting_for_cpu() -> u64 {
    if REGISTRATION.load(Ordering::SeqCst) == NOT_TRIED {
        // SAFETY: the area is a static of ours, for good.
        let status = unsafe { hv::register_runstate(0, RUNSTATE.get() as u64) };
        let registered = status.value().is_some();
        REGISTRATION.store(
            if registered { REGISTERED } else { REFUSED },
            Ordering::SeqCst,
        );
        if !registered {
            println!(
                "note: RegisterRunstate returned {status:?}: lateness is not corrected for steal time"
            );
        }
    }
    if REGISTRATION.load(Ordering::SeqCst) != REGISTERED {
        return 0;
    }
    // SAFETY: the hypervisor writes the area only while the vCPU is out of the guest; the
    // field is aligned.
    unsafe {
        core::ptr::read_volatile(&raw const (*RUNSTATE.get()).time[runstate::RUNNABLE as usize])
    }
}

/// Measures how much of a wait went to other vCPUs.
pub(crate) struct Stopwatch {
    waited_at_start: u64,
}

impl Stopwatch {
    /// Starts measuring (before arming what is awaited).
    pub(crate) fn start() -> Stopwatch {
        Stopwatch {
            waited_at_start: time_waiting_for_cpu(),
        }
    }

    /// How late an event may be observed now: [`LATE_BOUND_NS`] plus the time spent waiting
    /// for the CPU since the start.
    pub(crate) fn allowance(&self) -> u64 {
        LATE_BOUND_NS + time_waiting_for_cpu().saturating_sub(self.waited_at_start)
    }

    /// Checks that an event observed at system time `at` came no earlier than `deadline`,
    /// and not later than the allowance after it.
    pub(crate) fn check_on_time(
        &self,
        what: core::fmt::Arguments<'_>,
        deadline: u64,
        at: u64,
    ) -> bool {
        let allowed = self.allowance();
        check!(
            at >= deadline,
            "{what}: observed at {at} ns, {} ns before its deadline {deadline} ns",
            deadline.saturating_sub(at)
        ) && check!(
            at - deadline < allowed,
            "{what}: observed {} ns after its deadline {deadline} ns (allowed: {allowed} ns)",
            at - deadline
        )
    }

    /// Checks that something that should take no time took less than the allowance.
    pub(crate) fn check_prompt(&self, what: core::fmt::Arguments<'_>, took: u64) -> bool {
        let allowed = self.allowance();
        check!(
            took < allowed,
            "{what} took {took} ns (allowed: {allowed} ns)"
        )
    }
}

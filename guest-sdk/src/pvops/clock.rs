//! The time-source group: a nanosecond clock that never goes backwards.

use lamina_abi::cpuid::LEAF_TIMING;

use crate::sync::WriteOnce;
use crate::time::TscClock;

/// Clock operations.
pub trait ClockOps: Sync {
    /// The backend's name, for logs.
    fn name(&self) -> &'static str;
    /// Nanoseconds since a fixed origin (the backend's own: compare readings of one backend
    /// only).
    fn now_ns(&self) -> u64;
}

/// Paravirtual: the pvclock ([`crate::time::monotonic_ns`]); system time, no exit.
#[derive(Clone, Copy, Debug, Default)]
pub struct PvClock;

impl ClockOps for PvClock {
    fn name(&self) -> &'static str {
        "pvclock"
    }

    fn now_ns(&self) -> u64 {
        crate::time::monotonic_ns()
    }
}

/// The native clock, once calibrated.
static TSC_CLOCK: WriteOnce<TscClock> = WriteOnce::new();

/// Reads the TSC frequency from CPUID leaf 0x40000010 EAX (a trapping CPUID, once) and starts
/// the native clock at 0 now. `None` when the leaf says 0.
pub(super) fn calibrate_tsc_clock() -> Option<()> {
    if TSC_CLOCK.get().is_some() {
        return Some(());
    }
    let khz = u64::from(crate::cpuid::cpuid(LEAF_TIMING, 0).eax);
    let clock = TscClock::new(khz, crate::time::rdtsc())?;
    // A second caller racing us leaves the first calibration in place, which is as good.
    let _ = TSC_CLOCK.set(clock);
    Some(())
}

/// Native: the TSC, scaled by the frequency from CPUID leaf 0x40000010 (what a kernel that was
/// never ported does after calibrating). No exit per reading either: RDTSC is not
/// intercepted; the difference is one CPUID at boot and no pvclock page.
#[derive(Clone, Copy, Debug, Default)]
pub struct TscClockOps;

impl ClockOps for TscClockOps {
    fn name(&self) -> &'static str {
        "tsc"
    }

    fn now_ns(&self) -> u64 {
        match TSC_CLOCK.get() {
            Some(clock) => clock.ns_at(crate::time::rdtsc()),
            None => panic!("the native clock was used before pvops::select calibrated it"),
        }
    }
}

//! Time without exits (docs/abi.md 10): system time from the pvclock, a monotonic clock over
//! it, the wall clock, and the TSC arithmetic the native time backend shares.
//!
//! System time is nanoseconds since the hypervisor started. The hypervisor publishes, per
//! vCPU, a TSC reading and the system time at that reading with a multiplier and shift
//! (Xen's and KVM's pvclock); the guest reads the TSC and scales it, under the version
//! seqlock. Nothing here exits to the hypervisor (RDTSC is not intercepted).

use core::sync::atomic::{AtomicU64, Ordering};

use lamina_abi::shared_info::{VcpuTimeInfo, pvclock_ns, pvclock_scale};

/// Reads the TSC, after earlier loads completed (`lfence; rdtsc`), so it is not taken before
/// the pvclock fields it is scaled with.
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: LFENCE and RDTSC only read the time-stamp counter; RDTSC is allowed at CPL 0.
    unsafe {
        core::arch::asm!("lfence", "rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    u64::from(high) << 32 | u64::from(low)
}

/// The current vCPU's pvclock parameters and a TSC value read while they were current.
pub fn pvclock_snapshot() -> (VcpuTimeInfo, u64) {
    crate::shared::this_vcpu().time_snapshot(rdtsc)
}

/// System time in ns: since the hypervisor started. No exit.
pub fn now_ns() -> u64 {
    let (time, tsc) = pvclock_snapshot();
    pvclock_ns(&time, tsc)
}

/// The latest value [`monotonic_ns`] returned.
static LAST_MONOTONIC: AtomicU64 = AtomicU64::new(0);

/// System time that never goes backwards, even across the hypervisor's re-basing of the
/// pvclock when the vCPU is scheduled in (which may round a nanosecond down).
pub fn monotonic_ns() -> u64 {
    let now = now_ns();
    let last = LAST_MONOTONIC.fetch_max(now, Ordering::AcqRel);
    now.max(last)
}

/// A wall-clock time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    /// Seconds since 1970-01-01 00:00 UTC.
    pub seconds: u64,
    /// Nanoseconds within the second.
    pub nanoseconds: u32,
}

impl WallClock {
    /// The wall clock `system_ns` after a base of `base_seconds` and `base_nanoseconds`.
    pub const fn after(base_seconds: u64, base_nanoseconds: u32, system_ns: u64) -> WallClock {
        let total = base_nanoseconds as u64 + system_ns % 1_000_000_000;
        WallClock {
            seconds: base_seconds + system_ns / 1_000_000_000 + total / 1_000_000_000,
            nanoseconds: (total % 1_000_000_000) as u32,
        }
    }
}

/// The wall clock now: the shared-info page's base (wall time at system time 0, from the
/// RTC) plus system time.
pub fn wall_clock() -> WallClock {
    let (seconds, nanoseconds) = crate::shared::shared_page().wall_clock_base();
    WallClock::after(seconds, nanoseconds, now_ns())
}

/// The TSC frequency in kHz the hypervisor published (shared-info page; also StartInfo and
/// CPUID leaf 0x40000010).
pub fn tsc_khz() -> u64 {
    crate::shared::shared_page().tsc_khz()
}

/// A clock from the TSC alone, as a kernel that was never ported calibrates it: frequency
/// from CPUID leaf 0x40000010 EAX, origin at a TSC reading. Reuses the pvclock arithmetic.
#[derive(Clone, Copy, Debug)]
pub struct TscClock {
    params: VcpuTimeInfo,
}

impl TscClock {
    /// A clock that reads 0 at `origin_tsc` and counts `tsc_khz` ticks per millisecond.
    /// `None` for a frequency of 0.
    pub const fn new(tsc_khz: u64, origin_tsc: u64) -> Option<TscClock> {
        if tsc_khz == 0 {
            return None;
        }
        let (mul, shift) = pvclock_scale(tsc_khz * 1000);
        Some(TscClock {
            params: VcpuTimeInfo {
                version: 0,
                pad0: 0,
                tsc_timestamp: origin_tsc,
                system_time: 0,
                tsc_to_system_mul: mul,
                tsc_shift: shift,
                flags: 0,
                pad1: [0; 2],
            },
        })
    }

    /// Nanoseconds since the origin at TSC value `tsc`.
    pub const fn ns_at(&self, tsc: u64) -> u64 {
        pvclock_ns(&self.params, tsc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tsc_clock_counts_nanoseconds_from_its_origin() {
        let clock = TscClock::new(2_500_000, 1_000).unwrap();
        assert_eq!(clock.ns_at(1_000), 0);
        let one_ms = clock.ns_at(1_000 + 2_500_000);
        assert!(one_ms.abs_diff(1_000_000) <= 1, "{one_ms}");
        assert!(TscClock::new(0, 0).is_none());
    }

    #[test]
    fn the_wall_clock_carries_nanoseconds_into_seconds() {
        let wall = WallClock::after(100, 900_000_000, 1_200_000_000);
        assert_eq!(
            wall,
            WallClock {
                seconds: 102,
                nanoseconds: 100_000_000
            }
        );
    }
}

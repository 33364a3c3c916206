//! System time: nanoseconds since the hypervisor started, derived from the TSC with the same
//! pvclock arithmetic the guests use (`lamina_abi::shared_info::pvclock_ns`), so the
//! hypervisor's and a guest's idea of "now" are the same number. Also writes the per-vCPU
//! pvclock and the wall clock into guest RAM with the version seqlock (docs/abi.md 10).

use crate::common::memory::guest_memory::{GuestMemory, OutOfBounds};
use lamina_abi::shared_info::{
    SharedInfo, TIME_FLAG_TSC_STABLE, VcpuInfo, VcpuTimeInfo, pvclock_ns, pvclock_scale,
};

/// The time-stamp counter (in host unit tests, the fake one when a test set it).
pub fn read_tsc() -> u64 {
    #[cfg(any(test, fuzzing))]
    if let Some(tsc) = crate::common::testing::FAKE_TSC.with(|t| t.get()) {
        let step = crate::common::testing::FAKE_TSC_STEP.with(|s| s.get());
        if step != 0 {
            crate::common::testing::FAKE_TSC.with(|t| t.set(Some(tsc + step)));
        }
        return tsc;
    }
    // SAFETY: RDTSC has no side effects and is available on every x86-64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The clock every domain shares.
#[derive(Clone, Copy, Debug)]
pub struct TimeBase {
    /// TSC frequency.
    pub tsc_hz: u64,
    /// TSC at system time 0.
    pub tsc_at_zero: u64,
    /// Wall clock at system time 0: seconds since the epoch.
    pub wall_sec: u64,
    /// Wall clock at system time 0: nanoseconds.
    pub wall_nsec: u32,
    scale: (u32, i8),
    /// TSC ticks per ns as a 32.32 fixed-point number, for cheap duration conversions.
    ticks_per_ns_q32: u64,
}

impl TimeBase {
    /// A clock ticking at `tsc_hz` that reads 0 at TSC `tsc_at_zero`.
    pub fn new(tsc_hz: u64, tsc_at_zero: u64, wall_sec: u64, wall_nsec: u32) -> Self {
        TimeBase {
            tsc_hz,
            tsc_at_zero,
            wall_sec,
            wall_nsec,
            scale: pvclock_scale(tsc_hz),
            ticks_per_ns_q32: ((u128::from(tsc_hz) << 32) / 1_000_000_000) as u64,
        }
    }

    /// The pvclock parameters a guest computes system time from (version left 0), taken at
    /// TSC `tsc` (keeping the deltas the guest scales small, as Xen and KVM do).
    pub fn vcpu_time_info_at(&self, tsc: u64) -> VcpuTimeInfo {
        VcpuTimeInfo {
            tsc_timestamp: tsc,
            system_time: self.ns_at(tsc),
            ..self.vcpu_time_info()
        }
    }

    /// The pvclock parameters anchored at system time 0.
    pub fn vcpu_time_info(&self) -> VcpuTimeInfo {
        VcpuTimeInfo {
            tsc_timestamp: self.tsc_at_zero,
            system_time: 0,
            tsc_to_system_mul: self.scale.0,
            tsc_shift: self.scale.1,
            flags: TIME_FLAG_TSC_STABLE,
            ..VcpuTimeInfo::default()
        }
    }

    /// System time at TSC `tsc`.
    pub fn ns_at(&self, tsc: u64) -> u64 {
        pvclock_ns(&self.vcpu_time_info(), tsc)
    }

    /// The first TSC value at which system time reaches `ns` (for programming deadlines).
    pub fn tsc_at(&self, ns: u64) -> u64 {
        let ticks = (u128::from(ns) * u128::from(self.tsc_hz)).div_ceil(1_000_000_000);
        let mut tsc = self.tsc_at_zero.saturating_add(ticks as u64);
        // Rounding in the scale may leave the estimate a tick short or long: settle on the
        // first TSC that reads at least `ns`, so a deadline is never early.
        while self.ns_at(tsc) < ns {
            tsc += 1;
        }
        while tsc > self.tsc_at_zero && self.ns_at(tsc - 1) >= ns {
            tsc -= 1;
        }
        tsc
    }

    /// About how many TSC ticks `ns` nanoseconds take (a duration, not a deadline: rounding
    /// may be off by a tick).
    pub fn ticks_for(&self, ns: u64) -> u64 {
        ((u128::from(ns) * u128::from(self.ticks_per_ns_q32)) >> 32) as u64
    }

    /// TSC frequency in kHz, as published.
    pub fn tsc_khz(&self) -> u64 {
        self.tsc_hz / 1000
    }
}

const VERSION_OFFSET: u64 = core::mem::offset_of!(VcpuTimeInfo, version) as u64;
const TIME_IN_VCPU_INFO: u64 = core::mem::offset_of!(VcpuInfo, time) as u64;

/// Writes the pvclock of the VcpuInfo at `vcpu_info`, taken afresh at TSC `tsc`, with the
/// version protocol: odd while the fields change, then the next even number.
pub fn publish_vcpu_time(
    mem: &GuestMemory,
    vcpu_info: u64,
    time: &TimeBase,
    tsc: u64,
) -> Result<(), OutOfBounds> {
    let at = vcpu_info + TIME_IN_VCPU_INFO;
    let mut version = [0u8; 4];
    mem.read(at + VERSION_OFFSET, &mut version)?;
    let version = u32::from_le_bytes(version);
    let updating = (version | 1).wrapping_add(if version & 1 == 1 { 2 } else { 0 });
    mem.write(at + VERSION_OFFSET, &updating.to_le_bytes())?;
    let mut info = time.vcpu_time_info_at(tsc);
    info.version = updating;
    // SAFETY: VcpuTimeInfo is repr(C) plain data without padding (size asserted in abi).
    let bytes = unsafe {
        core::slice::from_raw_parts((&raw const info).cast::<u8>(), size_of::<VcpuTimeInfo>())
    };
    mem.write(at, bytes)?;
    mem.write(at + VERSION_OFFSET, &updating.wrapping_add(1).to_le_bytes())
}

/// Writes the wall clock and TSC frequency into the shared-info page at `shared_info`.
pub fn publish_wall_clock(
    mem: &GuestMemory,
    shared_info: u64,
    time: &TimeBase,
) -> Result<(), OutOfBounds> {
    let version_at = shared_info + core::mem::offset_of!(SharedInfo, wc_version) as u64;
    let mut version = [0u8; 4];
    mem.read(version_at, &mut version)?;
    let version = u32::from_le_bytes(version) | 1;
    mem.write(version_at, &version.to_le_bytes())?;
    mem.write(
        shared_info + core::mem::offset_of!(SharedInfo, wc_nsec) as u64,
        &time.wall_nsec.to_le_bytes(),
    )?;
    mem.write_u64(
        shared_info + core::mem::offset_of!(SharedInfo, wc_sec) as u64,
        time.wall_sec,
    )?;
    mem.write_u64(
        shared_info + core::mem::offset_of!(SharedInfo, tsc_khz) as u64,
        time.tsc_khz(),
    )?;
    mem.write(version_at, &version.wrapping_add(1).to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::memory::guest_memory::testing::test_memory;

    #[test]
    fn deadlines_convert_to_the_first_tsc_that_reaches_them() {
        for hz in [1_000_000_000, 2_394_000_000, 100_000_000] {
            let t = TimeBase::new(hz, 12_345, 0, 0);
            for ns in [0, 1, 999, 1_000_000, 123_456_789, 10_000_000_000] {
                let tsc = t.tsc_at(ns);
                assert!(t.ns_at(tsc) >= ns, "never early");
                assert!(
                    tsc == t.tsc_at_zero || t.ns_at(tsc - 1) < ns,
                    "the first such tick"
                );
            }
        }
    }

    #[test]
    fn publishing_follows_the_version_protocol() {
        let tm = test_memory(1 << 20);
        let t = TimeBase::new(1_000_000_000, 5, 1_700_000_000, 42);
        publish_vcpu_time(&tm.mem, 0x7000, &t, 5).unwrap();
        let mut raw = [0u8; 32];
        tm.mem.read(0x7000 + TIME_IN_VCPU_INFO, &mut raw).unwrap();
        // SAFETY: VcpuTimeInfo is 32 bytes of plain data.
        let info: VcpuTimeInfo = unsafe { core::ptr::read_unaligned(raw.as_ptr().cast()) };
        assert_eq!(info.version, 2, "even after an update");
        assert_eq!(pvclock_ns(&info, 5 + 1_000), 1_000);
        publish_vcpu_time(&tm.mem, 0x7000, &t, 777).unwrap();
        tm.mem.read(0x7000 + TIME_IN_VCPU_INFO, &mut raw).unwrap();
        assert_eq!(u32::from_le_bytes(raw[..4].try_into().unwrap()), 4);
        publish_wall_clock(&tm.mem, 0x7000, &t).unwrap();
        let wc_sec = tm
            .mem
            .read_u64(0x7000 + core::mem::offset_of!(SharedInfo, wc_sec) as u64)
            .unwrap();
        assert_eq!(wc_sec, 1_700_000_000);
    }
}

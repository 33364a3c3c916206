//! The shared-info page ([`crate::layout::SHARED_INFO_GPA`]): event-channel bitmaps, per-vCPU
//! upcall state and time, and the wall clock. The hypervisor writes it in guest RAM; reading
//! time costs the guest no exit.

use crate::event_channel::NR_PORT_WORDS;

/// Most vCPUs a domain can have.
pub const MAX_VCPUS: usize = 8;

/// [`VcpuTimeInfo::flags`]: the TSC runs at a constant rate and is synchronised across
/// vCPUs, so readings from different vCPUs are comparable.
pub const TIME_FLAG_TSC_STABLE: u8 = 1 << 0;

/// pvclock parameters (identical to Xen's `vcpu_time_info` and KVM's `pvclock_vcpu_time_info`).
///
/// System time now = `system_time + ((tsc - tsc_timestamp) shifted by tsc_shift) *
/// tsc_to_system_mul >> 32`, where "shifted" is `<< tsc_shift` when positive and
/// `>> -tsc_shift` when negative. Read as a seqlock: read `version`, read the fields, read
/// `version` again; retry if it changed or was odd (the hypervisor is writing).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuTimeInfo {
    /// Odd while the hypervisor updates the fields.
    pub version: u32,
    /// Reserved, zero.
    pub pad0: u32,
    /// TSC value at which `system_time` was taken.
    pub tsc_timestamp: u64,
    /// System time in ns at `tsc_timestamp`.
    pub system_time: u64,
    /// Multiplier from shifted TSC ticks to ns, as a 32.32 fixed-point fraction.
    pub tsc_to_system_mul: u32,
    /// Shift applied to TSC deltas before multiplying.
    pub tsc_shift: i8,
    /// `TIME_FLAG_*`.
    pub flags: u8,
    /// Reserved, zero.
    pub pad1: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<VcpuTimeInfo>() == 32);

/// Per-vCPU upcall state and time (64 bytes, as Xen's `vcpu_info`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VcpuInfo {
    /// Set by the hypervisor when an event became pending for this vCPU; cleared by the guest.
    pub evtchn_upcall_pending: u8,
    /// Set by the guest to hold back upcalls (events stay pending).
    pub evtchn_upcall_mask: u8,
    /// Reserved, zero.
    pub pad0: [u8; 6],
    /// Bit `i` set: word `i` of the pending bitmap may hold a port for this vCPU.
    pub evtchn_pending_sel: u64,
    /// pvclock parameters of this vCPU.
    pub time: VcpuTimeInfo,
    /// Reserved, zero.
    pub pad1: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<VcpuInfo>() == 64);
const _: () = assert!(core::mem::offset_of!(VcpuInfo, evtchn_pending_sel) == 8);
const _: () = assert!(core::mem::offset_of!(VcpuInfo, time) == 16);

/// The shared-info page.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SharedInfo {
    /// One per vCPU (until moved with `VcpuOp::RegisterVcpuInfo`).
    pub vcpu_info: [VcpuInfo; MAX_VCPUS],
    /// Pending bit per port.
    pub evtchn_pending: [u64; NR_PORT_WORDS],
    /// Mask bit per port.
    pub evtchn_mask: [u64; NR_PORT_WORDS],
    /// Wall-clock seqlock: odd while the hypervisor updates it.
    pub wc_version: u32,
    /// Wall clock at system time 0: nanoseconds part.
    pub wc_nsec: u32,
    /// Wall clock at system time 0: seconds since 1970-01-01 00:00 UTC.
    pub wc_sec: u64,
    /// TSC frequency in kHz (also in CPUID leaf 0x40000010).
    pub tsc_khz: u64,
}

const _: () = assert!(core::mem::offset_of!(SharedInfo, evtchn_pending) == 512);
const _: () = assert!(core::mem::offset_of!(SharedInfo, evtchn_mask) == 640);
const _: () = assert!(core::mem::offset_of!(SharedInfo, wc_version) == 768);
const _: () = assert!(core::mem::size_of::<SharedInfo>() == 792);

/// Converts TSC ticks to pvclock scale: `(tsc_to_system_mul, tsc_shift)` such that
/// `ns = (ticks shifted) * mul >> 32`, as the hypervisor publishes them for `tsc_hz`.
pub const fn pvclock_scale(tsc_hz: u64) -> (u32, i8) {
    // Find a shift so that ns_per_tick * 2^32 fits in 32 bits: mul = 1e9 * 2^32 / (hz << shift).
    let mut shift: i8 = 0;
    let mut hz = tsc_hz as u128;
    let ns: u128 = 1_000_000_000u128 << 32;
    // Ticks shifted left count as a faster clock, shifted right as a slower one.
    while ns / hz >= 1u128 << 32 {
        hz <<= 1;
        shift += 1;
    }
    while ns / hz < 1u128 << 31 {
        hz >>= 1;
        shift -= 1;
    }
    ((ns / hz) as u32, shift)
}

/// System time in ns from pvclock parameters and a TSC reading (the guest's computation).
pub const fn pvclock_ns(time: &VcpuTimeInfo, tsc: u64) -> u64 {
    let mut delta = tsc.wrapping_sub(time.tsc_timestamp);
    if time.tsc_shift >= 0 {
        delta <<= time.tsc_shift as u32;
    } else {
        delta >>= (-time.tsc_shift) as u32;
    }
    time.system_time
        .wrapping_add(((delta as u128 * time.tsc_to_system_mul as u128) >> 32) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hz: u64) -> VcpuTimeInfo {
        let (mul, shift) = pvclock_scale(hz);
        VcpuTimeInfo {
            tsc_timestamp: 1000,
            system_time: 5,
            tsc_to_system_mul: mul,
            tsc_shift: shift,
            ..Default::default()
        }
    }

    #[test]
    fn one_second_of_ticks_is_one_second_at_any_frequency() {
        for hz in [
            1_000_000,
            100_000_000,
            1_000_000_000,
            2_900_000_000,
            4_000_000_000,
            10_000_000_000,
        ] {
            let t = at(hz);
            let ns = pvclock_ns(&t, 1000 + hz) - 5;
            let error = ns.abs_diff(1_000_000_000);
            assert!(error <= 2, "{hz} Hz: {ns} ns");
        }
    }

    #[test]
    fn readings_never_go_backwards() {
        for hz in [1_000_000, 3_000_000_000, 7_777_777_777] {
            let t = at(hz);
            let mut last = 0;
            let mut tsc = 1000;
            for step in [0u64, 1, 1, 2, 3, 5, 1000, 1 << 20, 1 << 33] {
                tsc += step;
                let now = pvclock_ns(&t, tsc);
                assert!(now >= last);
                last = now;
            }
        }
    }
}

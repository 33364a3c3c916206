//! Tests of time (docs/abi.md 10): the TSC frequency in its three places, the pvclock in
//! `VcpuInfo` (10.1) and the wall clock (10.2).

use lamina_abi::Errno;
use lamina_abi::cpuid::LEAF_TIMING;
use lamina_abi::shared_info::{TIME_FLAG_TSC_STABLE, pvclock_ns};
use lamina_guest_sdk::cpuid::cpuid;
use lamina_guest_sdk::start_info;

use super::common::loopback_port;
use crate::framework::{Hex, Status, check, check_eq};
use crate::hv;
use crate::shared;
use crate::timing::MS;

/// One hour in ns: far more than any run takes from the hypervisor's start.
const HOUR: u64 = 3600 * 1_000_000_000;

conformance_test! {
    title: "StartInfo, SharedInfo and CPUID 0x40000010 report the same plausible TSC frequency",
    section: "10 Time",
    expect: Success,
}
pub(super) fn tsc_khz_agrees_everywhere() {
    let from_start_info = start_info().tsc_khz;
    // Bochs runs its TSC at 100 MHz and calibration may land a few kHz either side: any
    // frequency from 10 MHz up is plausible.
    check!(
        (10_000..100_000_000).contains(&from_start_info),
        "StartInfo.tsc_khz {from_start_info} is not a frequency between 10 MHz and 100 GHz"
    );
    check_eq!(
        "SharedInfo.tsc_khz against StartInfo.tsc_khz",
        from_start_info,
        shared::shared_tsc_khz()
    );
    check_eq!(
        format_args!("CPUID {LEAF_TIMING:#x} EAX against StartInfo.tsc_khz"),
        from_start_info,
        u64::from(cpuid(LEAF_TIMING, 0).eax)
    );
}

conformance_test! {
    title: "vCPU 0's pvclock is published at boot: even version, TSC_STABLE, ns since the hv started",
    section: "10.1 pvclock",
    expect: Success,
}
pub(super) fn pvclock_published_at_boot() {
    // The raw fields, before any read protocol: the hypervisor wrote them at domain build
    // and is not writing now (we are running), so the version is even and not 0.
    // SAFETY: the shared-info page lies in RAM for good; every bit pattern is valid.
    let time = unsafe { core::ptr::read_volatile(&raw const (*shared::vcpu_info()).time) };
    check!(
        time.version.is_multiple_of(2) && time.version != 0,
        "pvclock version {} (written at build: even, not 0)",
        time.version
    );
    check_eq!("pvclock flags", Hex(TIME_FLAG_TSC_STABLE), Hex(time.flags));
    check!(time.tsc_to_system_mul != 0, "tsc_to_system_mul is 0");
    check_eq!("pvclock pad0", 0, time.pad0);
    check_eq!("pvclock pad1", [0, 0], time.pad1);
    let now = shared::now();
    check!(
        now > 0 && now < HOUR,
        "system time {now} ns: not ns since the hypervisor started"
    );
    check!(
        time.system_time <= now,
        "system_time {} ns of the parameters is after now ({now} ns)",
        time.system_time
    );
}

conformance_test! {
    title: "pvclock time never goes back, between reads and across yields, polls and hypercalls",
    section: "10.1 pvclock",
    expect: Success,
}
pub(super) fn pvclock_monotonic() {
    let Some(idle) = loopback_port() else { return };
    let mut last = shared::now();
    let mut step = |what: &str| {
        let now = shared::now();
        let ok = check!(
            now >= last,
            "system time went back by {} ns {what}",
            last - now
        );
        last = now;
        ok
    };
    for _ in 0..2000 {
        if !step("between two reads") {
            return;
        }
    }
    // Across exits that reschedule the vCPU, and short sleeps.
    for round in 0..20 {
        hv::sched_yield();
        if !step("across a yield") {
            return;
        }
        let _ = hv::poll(&[idle as u32], shared::now() + MS / 4);
        if !step("across a poll") {
            return;
        }
        if round % 5 == 0 {
            hv::version();
            step("across a hypercall");
        }
    }
}

conformance_test! {
    title: "pvclock time advances at the TSC rate of tsc_khz, by its parameters and by measurement",
    section: "10.1 pvclock",
    expect: Success,
}
pub(super) fn pvclock_rate_matches_tsc_khz() {
    let Some(idle) = loopback_port() else { return };
    let khz = start_info().tsc_khz;
    // The parameters convert one second of TSC ticks into one second (within 0.01%).
    let (time, tsc) = shared::read_time_of(shared::vcpu_info());
    let second = pvclock_ns(&time, tsc + khz * 1000) - pvclock_ns(&time, tsc);
    check!(
        second.abs_diff(1_000_000_000) <= 100_000,
        "{khz} kHz worth of TSC ticks ({} ticks) convert to {second} ns, not 1 s",
        khz * 1000
    );
    // Measured across a 5 ms sleep: pvclock time and TSC ticks at tsc_khz agree (0.5%). Each
    // pair comes from one reading, so the time between two reads (which under an emulator
    // includes translating the code) cannot count on one side only.
    let (time, start_tsc) = shared::read_time_of(shared::vcpu_info());
    let start_ns = pvclock_ns(&time, start_tsc);
    check_eq!(
        "Poll on an idle port, 5 ms",
        Status::err(Errno::ETIMEDOUT),
        hv::poll(&[idle as u32], start_ns + 5 * MS)
    );
    let (time, end_tsc) = shared::read_time_of(shared::vcpu_info());
    let end_ns = pvclock_ns(&time, end_tsc);
    let by_clock = end_ns - start_ns;
    let by_tsc = (u128::from(end_tsc - start_tsc) * 1_000_000 / u128::from(khz)) as u64;
    check!(
        by_clock.abs_diff(by_tsc) <= by_tsc / 200 + 10_000,
        "over a 5 ms sleep the pvclock advanced {by_clock} ns, the TSC {by_tsc} ns at {khz} kHz"
    );
}

conformance_test! {
    title: "after the vCPU slept, its pvclock was rewritten: version advanced by steps of 2, fresh fields",
    section: "10.1 pvclock",
    expect: Success,
}
pub(super) fn pvclock_rewritten_on_schedule() {
    let Some(idle) = loopback_port() else { return };
    let before = shared::time_info();
    // The vCPU sleeps 2 ms and is scheduled in again: the hypervisor rewrites its time.
    let _ = hv::poll(&[idle as u32], shared::now() + 2 * MS);
    let after = shared::time_info();
    let advanced = after.version.wrapping_sub(before.version);
    check!(
        after.version.is_multiple_of(2) && (2..1 << 31).contains(&advanced),
        "pvclock version {} before a sleep, {} after: not rewritten (by +2 per update)",
        before.version,
        after.version
    );
    check!(
        after.tsc_timestamp > before.tsc_timestamp && after.system_time > before.system_time,
        "pvclock not taken afresh: tsc_timestamp {} -> {}, system_time {} -> {}",
        before.tsc_timestamp,
        after.tsc_timestamp,
        before.system_time,
        after.system_time
    );
}

conformance_test! {
    title: "the wall clock at system time 0 is a date between 2020 and 2100, with an even version",
    section: "10.2 Wall clock",
    expect: Success,
}
pub(super) fn wall_clock_published() {
    /// 2020-01-01 00:00 UTC and 2100-01-01 00:00 UTC.
    const YEAR_2020: u64 = 1_577_836_800;
    const YEAR_2100: u64 = 4_102_444_800;
    let (version, sec, nsec) = shared::wall_clock();
    check!(
        version.is_multiple_of(2),
        "wc_version {version} is odd while the guest runs"
    );
    check!(
        (YEAR_2020..YEAR_2100).contains(&sec),
        "wc_sec {sec} is not a time between 2020 and 2100"
    );
    check!(nsec < 1_000_000_000, "wc_nsec {nsec} is not below 1 s");
    // Wall time now is wc + system time; it moves forward with it.
    let now = shared::now();
    check!(
        sec + now / 1_000_000_000 < YEAR_2100,
        "wall time now ({sec} s + {now} ns) is past 2100"
    );
}

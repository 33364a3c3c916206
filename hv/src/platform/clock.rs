//! Measuring the machine's clocks at boot: the TSC and the local APIC timer against the PIT
//! (8254 channel 2, gated through port 0x61, as Linux's `pit_calibrate_tsc` does), and the
//! wall clock from the CMOS RTC.

use x86_64::instructions::port::Port;

const PIT_HZ: u64 = 1_193_182;
/// Length of the calibration window: 10 ms.
const CALIBRATION_TICKS: u16 = (PIT_HZ / 100) as u16;

/// Clock rates measured at boot.
#[derive(Clone, Copy, Debug)]
pub struct Rates {
    /// TSC ticks per second.
    pub tsc_hz: u64,
    /// Local APIC timer ticks per second (divide by 1).
    pub apic_timer_hz: u64,
}

/// Measures the TSC and the APIC timer over 10 ms of PIT time. `apic_count` reads the APIC
/// timer's current count, which must be counting down from a large value.
pub fn calibrate(apic_count: impl Fn() -> u32) -> Rates {
    // SAFETY: the PIT and port 0x61 belong to the hypervisor; guests never reach them.
    unsafe {
        let mut gate: Port<u8> = Port::new(0x61);
        let mut command: Port<u8> = Port::new(0x43);
        let mut channel2: Port<u8> = Port::new(0x42);
        // Gate on, speaker off; channel 2, mode 0 (interrupt on terminal count), lo/hi byte.
        let value = gate.read();
        gate.write((value & !0x02) | 0x01);
        command.write(0xb0);
        channel2.write(CALIBRATION_TICKS as u8);
        channel2.write((CALIBRATION_TICKS >> 8) as u8);
        let tsc_start = core::arch::x86_64::_rdtsc();
        let apic_start = apic_count();
        // OUT2 (bit 5) goes high when the count reaches zero.
        while gate.read() & 0x20 == 0 {
            core::hint::spin_loop();
        }
        let tsc_end = core::arch::x86_64::_rdtsc();
        let apic_end = apic_count();
        let scale = |ticks: u64| ticks * PIT_HZ / u64::from(CALIBRATION_TICKS);
        Rates {
            tsc_hz: scale(tsc_end - tsc_start),
            apic_timer_hz: scale(u64::from(apic_start.wrapping_sub(apic_end))),
        }
    }
}

fn cmos(register: u8) -> u8 {
    // SAFETY: reading CMOS registers through ports 0x70/0x71, owned by the hypervisor; bit 7
    // of the index keeps NMIs disabled as firmware leaves them.
    unsafe {
        Port::<u8>::new(0x70).write(register | 0x80);
        Port::<u8>::new(0x71).read()
    }
}

/// Seconds since 1970-01-01 00:00 UTC, read from the CMOS RTC (assumed to keep UTC).
pub fn wall_clock_seconds() -> u64 {
    // Wait for an update not to be in progress, then read twice until stable.
    let read = || {
        while cmos(0x0a) & 0x80 != 0 {
            core::hint::spin_loop();
        }
        [
            cmos(0x00),
            cmos(0x02),
            cmos(0x04),
            cmos(0x07),
            cmos(0x08),
            cmos(0x09),
            cmos(0x32),
        ]
    };
    let mut values = read();
    loop {
        let again = read();
        if again == values {
            break;
        }
        values = again;
    }
    let status_b = cmos(0x0b);
    let bcd = status_b & 0x04 == 0;
    let decode = |v: u8| {
        if bcd {
            u64::from((v & 0x0f) + (v >> 4) * 10)
        } else {
            u64::from(v)
        }
    };
    let [second, minute, hour_raw, day, month, year, century] = values;
    let mut hour = decode(hour_raw & 0x7f);
    if status_b & 0x02 == 0 && hour_raw & 0x80 != 0 {
        hour = (hour % 12) + 12; // 12-hour clock, PM
    }
    let century = match decode(century) {
        19..=21 => decode(century),
        _ => 20,
    };
    let year = century * 100 + decode(year);
    days_since_epoch(year, decode(month), decode(day)) * 86_400
        + hour * 3600
        + decode(minute) * 60
        + decode(second)
}

/// Days from 1970-01-01 to the given civil date (Howard Hinnant's algorithm).
fn days_since_epoch(year: u64, month: u64, day: u64) -> u64 {
    let (y, m) = if month <= 2 {
        (year as i64 - 1, month as i64 + 9)
    } else {
        (year as i64, month as i64 - 3)
    };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + day as i64 - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    (era * 146_097 + day_of_era - 719_468).max(0) as u64
}

//! The emulated x2APIC's MSR interface: any sequence of RDMSR/WRMSR, time passing and
//! interrupt acknowledgement. Checked after each step: a written TPR reads back, PPR is at
//! least TPR's class, a deliverable vector is legal and above PPR, and a timer deadline
//! handed to the scheduler is never in the past.
#![no_main]

use lamina_fuzz::common::devices::vlapic::VirtualLapic;
use lamina_fuzz::input::Input;

const MSRS: [u32; 18] = [
    0x1b, 0x6e0, 0x802, 0x803, 0x808, 0x80a, 0x80b, 0x80d, 0x80f, 0x828, 0x830, 0x832, 0x837,
    0x838, 0x839, 0x83e, 0x83f, 0x820,
];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // What the hypervisor configures: the timer at 1 GHz (vcpu::state::APIC_TIMER_HZ), the TSC
    // as calibrated (Bochs runs at 100 MHz).
    let timer_hz = lamina_fuzz::common::vcpu::state::APIC_TIMER_HZ;
    let tsc_hz = [
        1_000_000_000,
        100_000_000,
        1_234_567,
        2_500_000_000,
        3_000_000_000,
    ][input.below(5) as usize];
    let mut apic = VirtualLapic::new(0, timer_hz, tsc_hz);
    // LAMINA_FUZZ_TRACE=1 prints every step (to explain a reproducer).
    let trace = std::env::var_os("LAMINA_FUZZ_TRACE").is_some();
    if trace {
        eprintln!("timer_hz {timer_hz} tsc_hz {tsc_hz}");
    }
    let (mut now_ns, mut now_tsc) = (0u64, 0u64);
    for _ in 0..256 {
        if input.is_empty() {
            break;
        }
        let msr = match input.u8() % 4 {
            0 => 0x800 + u32::from(input.u8()),
            1 => input.u32(),
            _ => MSRS[input.below(MSRS.len() as u32) as usize],
        };
        match input.u8() % 6 {
            0 => {
                let _ = apic.read_msr(msr, now_ns, now_tsc);
            }
            1 | 2 => {
                let value = match input.u8() % 4 {
                    0 => input.u64(),
                    1 => u64::from(input.u32()),
                    2 => u64::from(input.u8()) << (input.below(4) * 8),
                    _ => now_tsc.saturating_add(u64::from(input.u16())),
                };
                let written = apic.write_msr(msr, value, now_ns, now_tsc);
                if trace {
                    eprintln!(
                        "wrmsr {msr:#x} {value:#x} at {now_ns} ns, TSC {now_tsc}: {written:?}"
                    );
                }
                if msr == 0x808 && written.is_ok() {
                    assert_eq!(
                        apic.read_msr(0x808, now_ns, now_tsc),
                        Ok(value & 0xff),
                        "TPR reads back"
                    );
                }
            }
            3 => {
                let step = match input.u8() % 4 {
                    0 => u64::from(input.u32()),
                    1 => input.u64() >> input.below(64),
                    _ => u64::from(input.u16()),
                };
                // Time stays below 2^62 ns (146 years): the end of u64 time is not a state a
                // running machine reaches.
                now_ns = now_ns.saturating_add(step).min(1 << 62);
                now_tsc = now_tsc
                    .saturating_add(step.saturating_mul(u64::from(input.below(4))))
                    .min(1 << 62);
                apic.advance(now_ns, now_tsc);
                if trace {
                    eprintln!("time {now_ns} ns, TSC {now_tsc}");
                }
            }
            4 => {
                if let Some(vector) = apic.deliverable_vector() {
                    apic.acknowledge(vector);
                    assert!(apic.is_in_service(vector) && !apic.is_pending(vector));
                }
            }
            _ => {
                let _ = apic.write_cr8(u64::from(input.u8() % 20));
            }
        }
        assert!(apic.ppr() >> 4 >= apic.tpr() >> 4, "PPR below TPR's class");
        if let Some(vector) = apic.deliverable_vector() {
            assert!(vector >= 16, "illegal vector {vector} deliverable");
            assert!(
                vector >> 4 > apic.ppr() >> 4,
                "vector {vector} at or below PPR"
            );
        }
        apic.advance(now_ns, now_tsc);
        if let Some(deadline) = apic.next_timer_deadline_ns() {
            assert!(
                deadline > now_ns,
                "timer deadline {deadline} not after now {now_ns}, after advance"
            );
        }
    }
});

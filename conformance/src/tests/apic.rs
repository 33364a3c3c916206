//! Tests of the emulated x2APIC (docs/abi.md 14), for kernels not yet ported to events: the
//! MSR interface, the timer in its three modes, priorities, EOI and self-IPIs.
//!
//! Timers never fire early: the handler stamps each interrupt with pvclock time (or the TSC,
//! for TSC-deadline), which must be at or past the programmed expiry, and less than 50 ms plus
//! the time the vCPU waited for the CPU meanwhile after it (`crate::timing`): generous, since
//! emulators are slow and every test domain of a run shares one CPU.

use lamina_abi::Errno;
use lamina_guest_sdk::cpuid::cpuid;
use lamina_guest_sdk::start_info;

use super::common::{check_gp0, loopback_port};
use crate::framework::{Hex, Status, check, check_eq};
use crate::hv;
use crate::irq::{self, Arrivals};
use crate::shared;
use crate::timing::{GIVE_UP_NS, MS, Stopwatch};
use crate::x86::apic::{self, write};
use crate::x86::idt::TrapRecord;
use crate::x86::{self, msr};

/// Checks that an MSR access raised `#GP(0)`.
fn check_gp<T: core::fmt::Debug>(what: core::fmt::Arguments<'_>, result: Result<T, TrapRecord>) {
    match result {
        Ok(value) => {
            crate::framework::fail(format_args!(
                "{what}: expected #GP, but it succeeded ({value:x?})"
            ));
        }
        Err(record) => {
            check_gp0(what, &record);
        }
    }
}

/// Installs the interrupt recorder for the APIC's vectors and software-enables the APIC.
fn set_up(auto_eoi: bool) {
    irq::install();
    irq::use_apic(auto_eoi);
    apic::enable();
}

/// Waits with `STI; HLT` until `vector` has arrived `count` times; gives up (and records a
/// failure) after [`GIVE_UP_NS`], should HLT keep returning without it.
fn wait_for(vector: u8, count: u32) -> bool {
    let give_up = shared::now() + GIVE_UP_NS;
    while irq::count(vector) < count {
        if shared::now() > give_up {
            crate::framework::fail(format_args!(
                "vector {vector:#x} arrived {} times, not {count}, within {GIVE_UP_NS} ns",
                irq::count(vector)
            ));
            return false;
        }
        x86::halt_with_interrupts();
    }
    true
}

/// Programs the LVT timer.
fn program_timer(lvt: u64, initial_count: u64) {
    // SAFETY: the interrupts the timer raises go to the recorder installed by `set_up`.
    unsafe {
        write(apic::LVT_TIMER, lvt);
        write(apic::TIMER_INITIAL_COUNT, initial_count);
    }
}

/// Stops and masks the timer.
fn stop_timer() {
    program_timer(apic::LVT_MASKED, 0);
}

conformance_test! {
    title: "CPUID.1:ECX reports x2APIC and TSC-deadline",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn x2apic_cpuid_bits_set() {
    let leaf1 = cpuid(1, 0);
    check_eq!("CPUID.1:ECX bit 21 (x2APIC)", 1, leaf1.ecx >> 21 & 1);
    check_eq!("CPUID.1:ECX bit 24 (TSC-deadline)", 1, leaf1.ecx >> 24 & 1);
}

conformance_test! {
    title: "IA32_APIC_BASE reads 0xfee00d00 (BSP, x2APIC, enabled); writing another value raises #GP",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn apic_base_reads_x2apic_mode() {
    let expected =
        apic::APIC_BASE_ADDRESS | apic::APIC_BASE_BSP | apic::APIC_BASE_EXTD | apic::APIC_BASE_EN;
    check_eq!(
        "IA32_APIC_BASE",
        Hex(expected),
        Hex(msr::read(apic::APIC_BASE))
    );
    // SAFETY: the value it already holds.
    let same = unsafe { msr::try_write(apic::APIC_BASE, expected) };
    check_eq!("WRMSR IA32_APIC_BASE of its own value", Ok(()), same);
    for (what, value) in [
        ("xAPIC mode (EXTD clear)", expected & !apic::APIC_BASE_EXTD),
        (
            "disabled",
            expected & !(apic::APIC_BASE_EN | apic::APIC_BASE_EXTD),
        ),
        ("moved", expected + 0x10_0000),
        ("not BSP", expected & !apic::APIC_BASE_BSP),
    ] {
        // SAFETY: the write must be refused; should it be taken, the APIC is emulated and no
        // interrupt is programmed.
        let result = unsafe { msr::try_write(apic::APIC_BASE, value) };
        check_gp(
            format_args!("WRMSR IA32_APIC_BASE {value:#x}, {what}"),
            result,
        );
    }
    check_eq!(
        "IA32_APIC_BASE after the refused writes",
        Hex(expected),
        Hex(msr::read(apic::APIC_BASE))
    );
}

conformance_test! {
    title: "the x2APIC ID is the vCPU number, the version 0x50014, LDR 1 (ID 0); PPR reads, TMR reads 0",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn x2apic_id_and_version() {
    check_eq!("x2APIC ID (vCPU 0)", Hex(0), Hex(msr::read(apic::ID)));
    check_eq!(
        "x2APIC version",
        Hex(apic::LAMINA_VERSION),
        Hex(msr::read(apic::VERSION))
    );
    // Cluster ID >> 4 in bits 16-31, 1 << (ID & 15) in bits 0-15.
    check_eq!("LDR of x2APIC ID 0", Hex(1), Hex(msr::read(apic::LDR)));
    check!(
        msr::try_read(apic::PPR).is_ok(),
        "RDMSR {:#x} (PPR) raised #GP",
        apic::PPR
    );
    for index in 0..8 {
        check_eq!(
            format_args!("TMR{index}"),
            Hex(0),
            Hex(msr::read(apic::TMR0 + index))
        );
    }
}

conformance_test! {
    title: "RDMSR and WRMSR of reserved x2APIC MSRs raise #GP(0)",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn x2apic_reserved_msr_gp() {
    // Not registers of the x2APIC (SDM table 11-6), or not emulated (docs/abi.md 14).
    const RESERVED: [u32; 19] = [
        0x800, 0x801, 0x804, 0x805, 0x806, 0x807, 0x809, 0x80c, 0x80e, 0x829, 0x82a, 0x82e, 0x831,
        0x83a, 0x83b, 0x83c, 0x83d, 0x840, 0x8ff,
    ];
    for register in RESERVED {
        check_gp(format_args!("RDMSR {register:#x}"), msr::try_read(register));
        // SAFETY: the write must be refused; should it be taken, it lands in an emulated
        // APIC register nothing uses.
        let result = unsafe { msr::try_write(register, 0) };
        check_gp(format_args!("WRMSR {register:#x}"), result);
    }
}

conformance_test! {
    title: "writes to read-only x2APIC registers, reads of self IPI and EOI of a non-zero value raise #GP(0)",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn x2apic_readonly_msrs_gp() {
    let read_only = [
        ("PPR", apic::PPR),
        ("LDR", apic::LDR),
        ("ISR0", apic::ISR0),
        ("ISR7", apic::ISR0 + 7),
        ("TMR0", apic::TMR0),
        ("IRR0", apic::IRR0),
        ("IRR7", apic::IRR0 + 7),
        ("timer current count", apic::TIMER_CURRENT_COUNT),
    ];
    for (what, register) in read_only {
        check!(
            msr::try_read(register).is_ok(),
            "RDMSR {register:#x} ({what}) raised #GP"
        );
        // SAFETY: the write must be refused; a read-only register taking it changes nothing
        // the test relies on.
        let result = unsafe { msr::try_write(register, 0) };
        check_gp(format_args!("WRMSR {register:#x} ({what})"), result);
    }
    // Self IPI is write-only.
    check_gp(
        format_args!("RDMSR {:#x} (self IPI)", apic::SELF_IPI),
        msr::try_read(apic::SELF_IPI),
    );
    // EOI takes 0 only.
    // SAFETY: nothing is in service; should the write be taken, it ends nothing.
    let result = unsafe { msr::try_write(apic::EOI, 1) };
    check_gp(format_args!("WRMSR EOI of 1"), result);
    // SAFETY: as above.
    let result = unsafe { msr::try_write(apic::EOI, 0) };
    check_eq!("WRMSR EOI of 0 with nothing in service", Ok(()), result);
}

conformance_test! {
    title: "x2APIC writes with reserved bits set (TPR, ESR, SVR, LVT timer mode 3, divider) raise #GP(0)",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn x2apic_reserved_bits_gp() {
    set_up(true);
    let cases = [
        ("TPR bit 8", apic::TPR, 0x100),
        ("ESR of 1 (only 0 is written)", apic::ESR, 1),
        ("SVR bit 12", apic::SVR, apic::SVR_ENABLE | 1 << 12 | 0xff),
        (
            "LVT timer mode 3",
            apic::LVT_TIMER,
            apic::LVT_MASKED | 3 << 17 | 0x40,
        ),
        (
            "LVT timer bit 20",
            apic::LVT_TIMER,
            apic::LVT_MASKED | 1 << 20 | 0x40,
        ),
        ("divide configuration bit 2", apic::TIMER_DIVIDE, 0b0100),
    ];
    for (what, register, value) in cases {
        // SAFETY: the write must be refused; should it be taken, the timer stays masked.
        let result = unsafe { msr::try_write(register, value) };
        check_gp(
            format_args!("WRMSR {register:#x} of {value:#x}, {what}"),
            result,
        );
    }
    // The registers kept their values.
    check_eq!(
        "TPR after the refused write",
        Hex(0),
        Hex(msr::read(apic::TPR))
    );
    check_eq!(
        "LVT timer after the refused writes",
        Hex(apic::LVT_MASKED),
        Hex(msr::read(apic::LVT_TIMER))
    );
    check_eq!(
        "divide configuration after the refused write",
        Hex(apic::DIVIDE_BY_1),
        Hex(msr::read(apic::TIMER_DIVIDE))
    );
}

conformance_test! {
    title: "with SVR bit 8 clear (as at reset) neither the timer nor a self-IPI is delivered",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn apic_disabled_delivers_nothing() {
    let Some(idle) = loopback_port() else { return };
    set_up(true);
    // SVR bit 8 clear, as at reset: every LVT masked, nothing delivered.
    // SAFETY: the point: nothing may arrive.
    unsafe { write(apic::SVR, apic::SPURIOUS_VECTOR) };
    program_timer(apic::TIMER_ONE_SHOT | 0x40, MS);
    apic::self_ipi(0x41);
    x86::enable_interrupts();
    let status = hv::poll(&[idle as u32], shared::now() + 3 * MS);
    x86::disable_interrupts();
    check_eq!(
        "Poll for 3 ms with the APIC software-disabled",
        Status::err(Errno::ETIMEDOUT),
        status
    );
    check_eq!("interrupts from a software-disabled APIC", 0, irq::total());
}

conformance_test! {
    title: "a past TSC deadline fires at once, 0 disarms; in one-shot mode IA32_TSC_DEADLINE reads 0",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn apic_tsc_deadline_past_zero() {
    const VECTOR: u8 = 0x41;
    let Some(idle) = loopback_port() else { return };
    set_up(true);
    // In one-shot mode IA32_TSC_DEADLINE reads 0 and ignores writes.
    program_timer(apic::TIMER_ONE_SHOT | u64::from(VECTOR), 0);
    // SAFETY: ignored in one-shot mode; the interrupt would go to the recorder.
    unsafe { msr::write(apic::TSC_DEADLINE, x86::rdtsc()) };
    check_eq!(
        "IA32_TSC_DEADLINE in one-shot mode",
        Hex(0),
        Hex(msr::read(apic::TSC_DEADLINE))
    );
    // SAFETY: the interrupts go to the recorder.
    unsafe {
        write(
            apic::LVT_TIMER,
            apic::TIMER_TSC_DEADLINE | u64::from(VECTOR),
        )
    };
    // A deadline already past fires at once.
    // SAFETY: as above.
    unsafe { msr::write(apic::TSC_DEADLINE, 1) };
    x86::interrupt_window();
    check_eq!(
        "interrupts right after a past TSC deadline",
        1,
        irq::count(VECTOR)
    );
    // 0 disarms. Should the vCPU be preempted past the deadline between the two writes (every
    // test domain of a run shares one CPU), the interrupt came legitimately: try again.
    let khz = start_info().tsc_khz;
    for _ in 0..5 {
        let before = irq::count(VECTOR);
        let deadline = x86::rdtsc() + 2 * khz;
        // SAFETY: as above.
        unsafe {
            msr::write(apic::TSC_DEADLINE, deadline);
            msr::write(apic::TSC_DEADLINE, 0);
        }
        if x86::rdtsc() >= deadline {
            x86::interrupt_window();
            continue;
        }
        x86::enable_interrupts();
        let status = hv::poll(&[idle as u32], shared::now() + 5 * MS);
        x86::disable_interrupts();
        check_eq!(
            "Poll for 5 ms after disarming a 2 ms TSC deadline",
            Status::err(Errno::ETIMEDOUT),
            status
        );
        check_eq!(
            "interrupts after disarming the TSC deadline",
            before,
            irq::count(VECTOR)
        );
        break;
    }
    stop_timer();
}

conformance_test! {
    title: "the one-shot APIC timer (1 GHz, divide by 1) fires never before its count has passed",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn apic_oneshot_never_early() {
    const VECTOR: u8 = 0x40;
    set_up(true);
    for (round, delay) in [MS, 2 * MS, 3 * MS].into_iter().enumerate() {
        let watch = Stopwatch::start();
        let start = shared::now();
        program_timer(apic::TIMER_ONE_SHOT | u64::from(VECTOR), delay);
        if !wait_for(VECTOR, round as u32 + 1) {
            break;
        }
        watch.check_on_time(
            format_args!("one-shot APIC timer of {delay} ns"),
            start + delay,
            irq::last_ns(VECTOR),
        );
        check_eq!(
            "current count after the one-shot expired",
            0,
            msr::read(apic::TIMER_CURRENT_COUNT)
        );
    }
    stop_timer();
}

conformance_test! {
    title: "the TSC-deadline timer fires never before the TSC reaches IA32_TSC_DEADLINE",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn apic_tsc_deadline_never_early() {
    const VECTOR: u8 = 0x41;
    set_up(true);
    let khz = start_info().tsc_khz;
    // SAFETY: the timer is not armed until IA32_TSC_DEADLINE is written.
    unsafe {
        write(
            apic::LVT_TIMER,
            apic::TIMER_TSC_DEADLINE | u64::from(VECTOR),
        )
    };
    for round in 1..=3u32 {
        let watch = Stopwatch::start();
        let deadline = x86::rdtsc() + khz * 2; // 2 ms of TSC ticks
        // SAFETY: the interrupt goes to the recorder.
        unsafe { msr::write(apic::TSC_DEADLINE, deadline) };
        if !wait_for(VECTOR, round) {
            break;
        }
        let at = irq::last_tsc(VECTOR);
        check!(
            at >= deadline,
            "TSC-deadline interrupt at TSC {at:#x}, {} ticks before the deadline {deadline:#x}",
            deadline.saturating_sub(at)
        );
        let allowed_ticks = watch.allowance() * khz / MS;
        check!(
            at < deadline + allowed_ticks,
            "TSC-deadline interrupt {} ticks after its deadline (allowed: {allowed_ticks} at {khz} kHz)",
            at.saturating_sub(deadline)
        );
    }
    stop_timer();
}

conformance_test! {
    title: "the periodic APIC timer ticks every period, never early, and stops at initial count 0",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn apic_periodic_timer_ticks() {
    const VECTOR: u8 = 0x42;
    const TICKS: u64 = 5;
    set_up(true);
    let watch = Stopwatch::start();
    let start = shared::now();
    program_timer(apic::TIMER_PERIODIC | u64::from(VECTOR), MS);
    // A tick handled late may merge with the next (one IRR bit): the k-th seen is never
    // before start + k ms.
    for tick in 1..=TICKS {
        if !wait_for(VECTOR, tick as u32) {
            break;
        }
        let at = irq::last_ns(VECTOR);
        if !check!(
            at >= start + tick * MS,
            "periodic APIC tick {tick} at {} ns after programming, before {} ns",
            at - start,
            tick * MS
        ) {
            break;
        }
    }
    let last = irq::last_ns(VECTOR);
    let allowed = TICKS * MS + watch.allowance();
    check!(
        last < start + allowed,
        "{TICKS} periodic APIC ticks of 1 ms took {} ns (allowed: {allowed} ns)",
        last - start
    );
    // Writing 0 to the initial count stops it (a tick already requested is taken first).
    program_timer(apic::TIMER_PERIODIC | u64::from(VECTOR), 0);
    x86::interrupt_window();
    let ticks = irq::count(VECTOR);
    if let Some(idle) = loopback_port() {
        x86::enable_interrupts();
        let _ = hv::poll(&[idle as u32], shared::now() + 3 * MS);
        x86::disable_interrupts();
    }
    check_eq!(
        "periodic APIC ticks after writing initial count 0",
        ticks,
        irq::count(VECTOR)
    );
    stop_timer();
}

/// Programs a masked one-shot of 100 ms with `divide`, and measures how many counts pass
/// during a 2 ms sleep, against the pvclock: returns (counts, shortest and longest ns the
/// two reads of the current count can have been apart).
fn count_down_during_sleep(divide: u64, idle: u64) -> (u64, u64, u64) {
    // SAFETY: the timer is masked: it raises no interrupt.
    unsafe { write(apic::TIMER_DIVIDE, divide) };
    program_timer(apic::LVT_MASKED | 0x43, 100 * MS);
    let t0 = shared::now();
    let first = msr::read(apic::TIMER_CURRENT_COUNT);
    let t1 = shared::now();
    let _ = hv::poll(&[idle as u32], t1 + 2 * MS);
    let t2 = shared::now();
    let second = msr::read(apic::TIMER_CURRENT_COUNT);
    let t3 = shared::now();
    check!(
        first <= 100 * MS && first > second,
        "current count {first}, then {second} (initial count 100000000)"
    );
    (first.saturating_sub(second), t2 - t1, t3 - t0)
}

conformance_test! {
    title: "the current count runs down at 1 GHz divided by the divide configuration",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn apic_current_count_counts_down() {
    let Some(idle) = loopback_port() else { return };
    set_up(true);
    // The timer counts at 1 GHz (CPUID 0x4000_0010 EBX) before the divider.
    for (divide, by) in [(apic::DIVIDE_BY_1, 1), (apic::DIVIDE_BY_2, 2)] {
        let (counts, shortest, longest) = count_down_during_sleep(divide, idle);
        let slack = 5_000 + longest / 100;
        check!(
            counts + slack / by >= shortest / by && counts <= (longest + slack) / by,
            "divide by {by}: {counts} counts passed in between {shortest} and {longest} ns"
        );
    }
    stop_timer();
}

conformance_test! {
    title: "a masked LVT timer counts down but raises no interrupt",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn apic_masked_timer_no_irq() {
    const VECTOR: u8 = 0x44;
    let Some(idle) = loopback_port() else { return };
    set_up(true);
    program_timer(
        apic::LVT_MASKED | apic::TIMER_ONE_SHOT | u64::from(VECTOR),
        MS,
    );
    x86::enable_interrupts();
    let status = hv::poll(&[idle as u32], shared::now() + 3 * MS);
    x86::disable_interrupts();
    check_eq!(
        "Poll for 3 ms with the masked timer running",
        Status::err(Errno::ETIMEDOUT),
        status
    );
    check_eq!(
        "current count after the masked one-shot expired",
        0,
        msr::read(apic::TIMER_CURRENT_COUNT)
    );
    check_eq!("interrupts from a masked timer", 0, irq::total());
    check!(
        !apic::requested(VECTOR),
        "a masked timer set its vector in the IRR"
    );
    stop_timer();
}

conformance_test! {
    title: "a delivered vector moves from IRR to ISR and sets PPR; EOI clears it",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn apic_eoi_clears_isr() {
    const VECTOR: u8 = 0x50;
    set_up(false);
    apic::self_ipi(VECTOR);
    // Interrupts are off: the vector waits in the IRR.
    check!(
        apic::requested(VECTOR),
        "self-IPI {VECTOR:#x} not in the IRR"
    );
    check!(
        !apic::in_service(VECTOR),
        "self-IPI {VECTOR:#x} in service too early"
    );
    x86::interrupt_window();
    check_eq!("deliveries of the self-IPI", 1, irq::count(VECTOR));
    check!(
        irq::was_in_service(VECTOR),
        "vector {VECTOR:#x} not in service while its handler ran"
    );
    // No EOI yet: still in service, and it sets the processor priority.
    check!(
        !apic::requested(VECTOR),
        "vector {VECTOR:#x} still requested"
    );
    check!(
        apic::in_service(VECTOR),
        "vector {VECTOR:#x} left service without EOI"
    );
    check_eq!(
        "PPR with 0x50 in service",
        Hex(0x50),
        Hex(msr::read(apic::PPR))
    );
    apic::eoi();
    check!(
        !apic::in_service(VECTOR),
        "vector {VECTOR:#x} still in service after EOI"
    );
    check_eq!("PPR after EOI", Hex(0), Hex(msr::read(apic::PPR)));
}

conformance_test! {
    title: "TPR holds back vectors of its class and below; lowering it lets them through in order",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn apic_tpr_blocks_low_priority() {
    set_up(true);
    // SAFETY: TPR only holds interrupts back.
    let set_tpr = |tpr: u64| unsafe { write(apic::TPR, tpr) };
    set_tpr(0x60);
    check_eq!("TPR read back", Hex(0x60), Hex(msr::read(apic::TPR)));
    check_eq!(
        "PPR with TPR 0x60 and nothing in service",
        Hex(0x60),
        Hex(msr::read(apic::PPR))
    );
    apic::self_ipi(0x55);
    apic::self_ipi(0x65);
    apic::self_ipi(0x75);
    x86::interrupt_window();
    // Only class 7 is above TPR class 6.
    check_eq!(
        "vectors delivered with TPR 0x60",
        Arrivals::of(&[0x75]),
        irq::arrivals()
    );
    set_tpr(0x50);
    x86::interrupt_window();
    check_eq!(
        "vectors delivered with TPR 0x50",
        Arrivals::of(&[0x75, 0x65]),
        irq::arrivals()
    );
    check!(
        apic::requested(0x55),
        "vector 0x55 left the IRR with TPR 0x50"
    );
    set_tpr(0);
    x86::interrupt_window();
    check_eq!(
        "vectors delivered with TPR 0",
        Arrivals::of(&[0x75, 0x65, 0x55]),
        irq::arrivals()
    );
}

conformance_test! {
    title: "an in-service vector holds back its class and below, a higher class nests; EOI ends the highest",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn apic_isr_priority_nesting() {
    set_up(false);
    apic::self_ipi(0x61);
    apic::self_ipi(0x71);
    x86::interrupt_window();
    // The highest first; 0x61 waits: class 6 is not above 0x71 in service.
    check_eq!("delivered first", Arrivals::of(&[0x71]), irq::arrivals());
    apic::self_ipi(0x72);
    x86::interrupt_window();
    check_eq!(
        "after 0x72 (same class as 0x71 in service)",
        Arrivals::of(&[0x71]),
        irq::arrivals()
    );
    apic::self_ipi(0x81);
    x86::interrupt_window();
    check_eq!(
        "after 0x81 (a higher class nests)",
        Arrivals::of(&[0x71, 0x81]),
        irq::arrivals()
    );
    // EOI ends the highest in service: 0x81, then 0x71.
    apic::eoi();
    x86::interrupt_window();
    check_eq!(
        "after the first EOI (0x71 still in service)",
        Arrivals::of(&[0x71, 0x81]),
        irq::arrivals()
    );
    check!(
        apic::in_service(0x71),
        "0x71 not in service after the first EOI"
    );
    apic::eoi();
    x86::interrupt_window();
    check_eq!(
        "after the second EOI",
        Arrivals::of(&[0x71, 0x81, 0x72]),
        irq::arrivals()
    );
    apic::eoi();
    x86::interrupt_window();
    check_eq!(
        "after the third EOI",
        Arrivals::of(&[0x71, 0x81, 0x72, 0x61]),
        irq::arrivals()
    );
    apic::eoi();
    for vector in [0x61, 0x71, 0x72, 0x81] {
        check!(
            !apic::in_service(vector) && !apic::requested(vector),
            "vector {vector:#x} still in service or requested at the end"
        );
    }
}

conformance_test! {
    title: "SELF_IPI and ICR (self shorthand, own ID) deliver, highest first; other IDs are ignored",
    section: "14 Emulated x2APIC",
    expect: Success,
}
pub(super) fn apic_self_ipi_delivered() {
    set_up(true);
    apic::self_ipi(0x45);
    // SAFETY: fixed delivery to this vCPU; the interrupts go to the recorder.
    unsafe {
        write(apic::ICR, apic::ICR_SELF | 0x46);
        // Destination (bits 32-63): our own x2APIC ID, 0; no shorthand.
        write(apic::ICR, 0x47);
    }
    x86::interrupt_window();
    check_eq!(
        "self-IPIs through SELF_IPI, ICR (self), ICR (own ID)",
        Arrivals::of(&[0x47, 0x46, 0x45]),
        irq::arrivals()
    );
    // Other destinations are ignored (there is no other vCPU).
    // SAFETY: ignored, or delivered to the recorder by mistake.
    unsafe { write(apic::ICR, 1 << 32 | 0x48) };
    x86::interrupt_window();
    check_eq!("IPIs to x2APIC ID 1", 0, irq::count(0x48));
}

conformance_test! {
    title: "STI; HLT with the APIC timer armed sleeps until its interrupt, never before it is due",
    section: "7.2 HLT",
    expect: Success,
}
pub(super) fn hlt_wakes_on_apic_timer() {
    const VECTOR: u8 = 0x40;
    set_up(true);
    let watch = Stopwatch::start();
    let start = shared::now();
    program_timer(apic::TIMER_ONE_SHOT | u64::from(VECTOR), 2 * MS);
    // One HLT: it must end because the timer's interrupt arrived, not before.
    x86::halt_with_interrupts();
    if check_eq!("timer interrupts when HLT returned", 1, irq::count(VECTOR)) {
        watch.check_on_time(
            format_args!("APIC timer that ended HLT"),
            start + 2 * MS,
            irq::last_ns(VECTOR),
        );
    }
}

conformance_test! {
    title: "STI; HLT with no APIC timer and no event source stops the domain",
    section: "7.2 HLT",
    expect: StoppedByHv("HLT with nothing that can ever wake the vCPU"),
}
/// `STI; HLT` with no APIC timer armed and no event source: nothing can ever wake the vCPU,
/// and the hypervisor must stop the domain.
pub(super) fn hlt_sti_without_source_stopped() {
    set_up(true);
    crate::console::println!(
        "hlt_sti_without_source_stopped: STI; HLT with no timer armed and no event source"
    );
    x86::halt_with_interrupts();
}

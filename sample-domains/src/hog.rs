//! `role=hog`: the hostile domain of the `resource-hog` scenario. It sleeps through the
//! neighbour's first phase ([`crate::neighbour`]) and, through the second, tries to take every
//! shared resource of the hypervisor and as much of its time as it can:
//!
//! - every event channel (bind_virq, bind_ipi and alloc_unbound until `ENOSPC`) and every
//!   grant reference (grant_access to the neighbour until `ENOSPC`);
//! - domain control it may not use (`EPERM`), a timer period below the minimum (`EINVAL`), a
//!   multicall over `MULTICALL_MAX` (`E2BIG`);
//! - then, until the phase ends, storms: console writes of `CONSOLE_WRITE_MAX` bytes of one
//!   long line (until the console budget answers `EAGAIN`) and the console ring refilled and
//!   kicked, multicalls of `MULTICALL_MAX` of the dearest entries it has (console writes,
//!   memory maps, exit counters, sends, timer settings), the PV periodic timer at its minimum
//!   period and the singleshot re-armed at every call, the x2APIC timer in periodic mode at a
//!   count of 1 (masked: it needs no handler), yields and polls that return at once, null
//!   hypercalls, and naps of 10 us between stretches of work (each wake-up a chance to run
//!   first);
//! - with `vcpus=2`, a second vCPU that halts with a periodic x2APIC timer of count 1 whose
//!   vector the TPR holds back: due every nanosecond, never delivered;
//!
//! and prints what it got:
//!
//! ```text
//! hog: result: ports=<n> ports_error=ENOSPC grants=<n> grants_error=ENOSPC domctl_eperm=6 ...
//! ```
//!
//! Every answer that is not what docs/abi.md promises is a `hog: error:` and a crash.

use lamina_abi::Errno;
use lamina_abi::console::CONSOLE_WRITE_MAX;
use lamina_abi::event_channel::{DOMID_SELF, NR_PORTS, Virq};
use lamina_abi::grant_table::GRANT_TABLE_ENTRIES;
use lamina_abi::hypercall::Hypercall;
use lamina_abi::memory::{MEMORY_MAP_MAX_REGIONS, MemoryOp, MemoryRegion};
use lamina_abi::multicall::MULTICALL_MAX;
use lamina_abi::stats::ExitCounters;
use lamina_abi::vcpu::PERIOD_MIN_NS;
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::grant::{self, Access};
use lamina_guest_sdk::hypercall::{self, HypercallError};
use lamina_guest_sdk::multicall::{Batch, Call};
use lamina_guest_sdk::{console, domctl, msr, println, sched, time, vcpu, x2apic};

use crate::neighbour::{Phases, sleep_until};

const MAX: usize = MULTICALL_MAX as usize;
/// How long the hog waits after its storm for the console budget to hold its result line and
/// what its ring still holds (2 KiB and a line at 8 KiB/s).
const REFILL_NS: u64 = 400_000_000;
/// The hog's naps between stretches of work ([`wake_and_compute`]).
const WAKE_SLEEP_NS: u64 = 10_000;
const WAKE_WORK_NS: u64 = 200_000;

/// A page the hog grants to its neighbour over and over.
#[repr(C, align(4096))]
struct Page([u8; 4096]);
static PAGE: Page = Page([0; 4096]);

/// One long line: `CONSOLE_WRITE_MAX` bytes of words and no newline until the last byte.
static LONG_LINE: [u8; CONSOLE_WRITE_MAX as usize] = {
    let mut line = [b'h'; CONSOLE_WRITE_MAX as usize];
    let mut i = 7;
    while i < line.len() {
        line[i] = b' ';
        i += 8;
    }
    line[CONSOLE_WRITE_MAX as usize - 1] = b'\n';
    line
};

/// What the hog got, printed on its result line.
#[derive(Default)]
struct Tally {
    ports: u32,
    grants: u32,
    domctl_eperm: u32,
    console_bytes: u64,
    console_eagain: u64,
    ring_bytes: u64,
    multicalls: u64,
    multicall_entries: u64,
    timer_sets: u64,
    yields: u64,
    polls: u64,
    hypercalls: u64,
    wakes: u64,
}

fn fail(what: core::fmt::Arguments<'_>) -> ! {
    crate::fail("hog", what)
}

/// `result` must be `Err(expected)`.
fn expect_error<T: core::fmt::Debug>(
    what: &str,
    result: Result<T, HypercallError>,
    expected: Errno,
) {
    match result {
        Err(error) if error == expected => {}
        other => fail(format_args!("{what}: {other:?}, expected {expected:?}")),
    }
}

/// Takes ports until the hypervisor says `ENOSPC`: the two VIRQs, IPIs and loopback ports in
/// turn. Returns the number taken and the IPI ports for the send storm.
fn take_every_port(tally: &mut Tally) -> [Port; 8] {
    let mut ipis = [Port::new(0); 8];
    for virq in [Virq::Timer, Virq::Console] {
        match events::bind_virq(virq, 0) {
            Ok(_) => tally.ports += 1,
            Err(error) => fail(format_args!("bind_virq {virq:?}: {error}")),
        }
    }
    let mut ipi_turn = true;
    loop {
        let taken = if ipi_turn {
            events::bind_ipi(0)
        } else {
            events::alloc_unbound(DOMID_SELF)
        };
        match taken {
            Ok(port) => {
                if ipi_turn && let Some(slot) = ipis.iter_mut().find(|p| p.number() == 0) {
                    *slot = port;
                }
                tally.ports += 1;
                ipi_turn = !ipi_turn;
            }
            Err(error) if error == Errno::ENOSPC => return ipis,
            Err(error) => fail(format_args!("port {}: {error}", tally.ports)),
        }
    }
}

fn take_every_grant(tally: &mut Tally, neighbour: u32) {
    let page = &PAGE as *const Page as u64;
    loop {
        match grant::grant_access(neighbour, page, Access::ReadOnly) {
            Ok(_) => tally.grants += 1,
            Err(error) if error == Errno::ENOSPC => return,
            Err(error) => fail(format_args!("grant {}: {error}", tally.grants)),
        }
    }
}

fn try_domain_control(tally: &mut Tally, neighbour: u32) {
    let mut infos = [domctl::DomainInfo::default(); 4];
    let mut bytes = [0u8; 64];
    let attempts = [
        domctl::list_domains(&mut infos).map(drop),
        domctl::read_console(neighbour, 0, &mut bytes).map(drop),
        domctl::pause(neighbour),
        domctl::unpause(neighbour),
        domctl::destroy(neighbour),
        domctl::phys_info().map(drop),
    ];
    for result in attempts {
        expect_error("domctl", result, Errno::EPERM);
        tally.domctl_eperm += 1;
    }
}

/// The x2APIC timer in periodic mode, divide by 1, a count of 1: due every nanosecond.
/// Masked, so it raises nothing and needs no handler.
fn x2apic_timer_at_its_fastest() {
    if !x2apic::available() {
        return;
    }
    // SAFETY: the x2APIC is present; the LVT entry is masked, so no vector is ever raised.
    unsafe {
        msr::wrmsr(x2apic::DIVIDE_CONFIG, x2apic::DIVIDE_BY_1);
        msr::wrmsr(
            x2apic::LVT_TIMER,
            x2apic::TimerMode::Periodic as u64 | x2apic::LVT_MASKED | 0xf0,
        );
        msr::wrmsr(x2apic::INITIAL_COUNT, 1);
    }
}

/// `memory_op` get_memory_map into `regions`, as a multicall entry.
fn memory_map_call(regions: &mut [MemoryRegion; MEMORY_MAP_MAX_REGIONS]) -> Call<'_> {
    // SAFETY: the hypervisor writes at most MEMORY_MAP_MAX_REGIONS entries into `regions`,
    // which the batch borrows until it has run.
    unsafe {
        Call::raw(
            Hypercall::MemoryOp as u64,
            [
                MemoryOp::GetMemoryMap as u64,
                regions.as_mut_ptr() as u64,
                MEMORY_MAP_MAX_REGIONS as u64,
                0,
                0,
            ],
        )
    }
}

/// One multicall of `MULTICALL_MAX` of the dearest entries there are.
fn multicall_storm(tally: &mut Tally, ipis: &[Port; 8]) {
    let mut regions = [MemoryRegion::default(); MEMORY_MAP_MAX_REGIONS];
    let mut counters = ExitCounters::default();
    let mut batch: Batch<'_, MAX> = Batch::new();
    let now = time::now_ns();
    let _ = batch.push(memory_map_call(&mut regions));
    let _ = batch.push(Call::exit_counters(DOMID_SELF, 0, &mut counters));
    let mut i = 0;
    while batch.len() < MAX {
        let call = match i % 4 {
            0 => Call::console_write(&LONG_LINE),
            1 => Call::evtchn_send(ipis[i % ipis.len()]),
            2 => Call::set_singleshot_timer(0, now + i as u64),
            _ => Call::alloc_unbound(DOMID_SELF),
        };
        let _ = batch.push(call);
        i += 1;
    }
    match batch.submit() {
        Ok(run) if run == MAX => {
            tally.multicalls += 1;
            tally.multicall_entries += run as u64;
        }
        other => fail(format_args!("multicall of {MAX}: {other:?}")),
    }
}

fn console_storm(tally: &mut Tally) {
    match hypercall::console_write(&LONG_LINE) {
        Ok(written) => tally.console_bytes += written,
        Err(error) if error == Errno::EAGAIN => tally.console_eagain += 1,
        Err(error) => fail(format_args!("console write: {error}")),
    }
    // Fill the ring as far as it takes bytes, and have it drained now.
    let ring = console::ring::ring();
    let before = ring.output_waiting();
    let _ = ring.write(&LONG_LINE[..1024], || false);
    tally.ring_bytes += u64::from(ring.output_waiting().saturating_sub(before));
    if let Err(error) = console::ring::flush() {
        fail(format_args!("send on the console port: {error}"));
    }
}

fn timer_storm(tally: &mut Tally) {
    let now = time::now_ns();
    for (what, result) in [
        ("singleshot now", vcpu::set_singleshot_timer(0, now)),
        ("singleshot +1", vcpu::set_singleshot_timer(0, now + 1)),
        ("periodic", vcpu::set_periodic_timer(0, PERIOD_MIN_NS)),
    ] {
        if let Err(error) = result {
            fail(format_args!("timer {what}: {error}"));
        }
        tally.timer_sets += 1;
    }
}

fn sched_storm(tally: &mut Tally, ipis: &[Port; 8]) {
    // A yield gives the CPU away, which only helps the neighbour: one in a while, and a batch
    // of yield entries (which return at once, docs/abi.md 12) for the hypervisor's work.
    if tally.multicalls.is_multiple_of(64) {
        if let Err(error) = sched::yield_now() {
            fail(format_args!("yield: {error}"));
        }
        tally.yields += 1;
    }
    let mut batch: Batch<'_, MAX> = Batch::new();
    while batch.push(Call::sched_yield()).is_ok() {}
    match batch.submit() {
        Ok(run) if run == MAX => tally.yields += run as u64,
        other => fail(format_args!("multicall of {MAX} yields: {other:?}")),
    }
    for _ in 0..4 {
        // A deadline in the past: returns at once.
        events::mask(ipis[0]);
        events::clear_pending(ipis[0]);
        match sched::poll(&ipis[..1], Some(1)) {
            Ok(_) => tally.polls += 1,
            Err(error) => fail(format_args!("poll: {error}")),
        }
    }
    for _ in 0..64 {
        if let Err(error) = hypercall::version() {
            fail(format_args!("version: {error}"));
        }
        tally.hypercalls += 1;
    }
}

/// The stack of the hog's second vCPU.
#[repr(C, align(16))]
struct Stack([u8; 16 * 1024]);
static mut SECOND_STACK: Stack = Stack([0; 16 * 1024]);

/// The hog's second vCPU: its x2APIC timer periodic at a count of 1, the vector held back by
/// the TPR, and HLT with interrupts on. It never wakes (nothing can be delivered), and every
/// nanosecond its timer is due again: a hypervisor that looked at it then would give no other
/// vCPU more than a nanosecond at a time. vCPU 0 takes it down at the end.
extern "C" fn second_vcpu_main(_: u64) -> ! {
    // SAFETY: the x2APIC is present (checked by vCPU 0 before bringing this vCPU up); the TPR
    // blocks every vector before the timer starts, so no interrupt is ever delivered and no
    // IDT is needed.
    unsafe {
        msr::wrmsr(x2apic::TPR, 0xf0);
        x2apic::enable(0xff);
        msr::wrmsr(x2apic::DIVIDE_CONFIG, x2apic::DIVIDE_BY_1);
        msr::wrmsr(x2apic::LVT_TIMER, x2apic::TimerMode::Periodic as u64 | 0x40);
        msr::wrmsr(x2apic::INITIAL_COUNT, 1);
        loop {
            core::arch::asm!("sti; hlt; cli", options(nomem, nostack));
        }
    }
}

/// Brings up the second vCPU (`vcpus=2`) at [`second_vcpu_main`]; false without one.
fn start_second_vcpu() -> bool {
    if lamina_guest_sdk::start_info().nr_vcpus < 2 || !x2apic::available() {
        return false;
    }
    let cr3: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    // Only the address is taken; the stack is the second vCPU's alone.
    let stack = core::ptr::addr_of_mut!(SECOND_STACK) as u64;
    let start = lamina_abi::vcpu::VcpuStartState {
        rip: second_vcpu_main as *const () as usize as u64,
        rsp: stack + core::mem::size_of::<Stack>() as u64 - 8,
        cr3: cr3 & !0xfff,
        argument: 0,
    };
    if let Err(error) = vcpu::initialise(1, &start) {
        fail(format_args!("initialise vCPU 1: {error}"));
    }
    // SAFETY: the code and the stack are the second vCPU's; it shares nothing with vCPU 0.
    if let Err(error) = unsafe { vcpu::up(1) } {
        fail(format_args!("up vCPU 1: {error}"));
    }
    true
}

/// Sleeps a few microseconds, then computes for longer: every wake-up is a chance to be run
/// before the others (a woken vCPU is run first, docs/abi.md 3.3), which must not add up to
/// more than the hog's share.
fn wake_and_compute(tally: &mut Tally) {
    crate::sleep_ns("hog", WAKE_SLEEP_NS);
    tally.wakes += 1;
    let until = time::now_ns() + WAKE_WORK_NS;
    let mut state = tally.wakes | 1;
    while time::now_ns() < until {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
    }
    core::hint::black_box(state);
}

pub(crate) fn run(phases: Phases, neighbour: u32) -> ! {
    sleep_until("hog", phases.hog_from);
    let end = phases.hog_from + phases.length;
    let mut tally = Tally::default();
    let ipis = take_every_port(&mut tally);
    // Port 0 is never allocated, port 1 is the console's, and one went to `sleep_until`.
    if tally.ports != NR_PORTS - 3 {
        fail(format_args!(
            "got {} ports, expected {}",
            tally.ports,
            NR_PORTS - 3
        ));
    }
    expect_error(
        "alloc_unbound with every port taken",
        events::alloc_unbound(DOMID_SELF),
        Errno::ENOSPC,
    );
    take_every_grant(&mut tally, neighbour);
    if tally.grants != GRANT_TABLE_ENTRIES {
        fail(format_args!(
            "got {} grants, expected {GRANT_TABLE_ENTRIES}",
            tally.grants
        ));
    }
    try_domain_control(&mut tally, neighbour);
    expect_error(
        "a periodic timer below PERIOD_MIN_NS",
        vcpu::set_periodic_timer(0, PERIOD_MIN_NS - 1),
        Errno::EINVAL,
    );
    let entries = [lamina_abi::multicall::MulticallEntry::default(); MAX + 1];
    // SAFETY: the hypervisor refuses the count before it reads the array.
    let too_long = hypercall::decode(unsafe {
        hypercall::hypercall2(
            Hypercall::Multicall as u64,
            entries.as_ptr() as u64,
            MULTICALL_MAX + 1,
        )
    });
    expect_error("a multicall over MULTICALL_MAX", too_long, Errno::E2BIG);
    x2apic_timer_at_its_fastest();
    let second_vcpu = start_second_vcpu();
    while time::now_ns() < end {
        console_storm(&mut tally);
        multicall_storm(&mut tally, &ipis);
        timer_storm(&mut tally);
        sched_storm(&mut tally, &ipis);
        wake_and_compute(&mut tally);
    }
    if second_vcpu && let Err(error) = vcpu::down(1) {
        fail(format_args!("down vCPU 1: {error}"));
    }
    // Quiet again: the timers stop, so the neighbour's last phase ends as it began.
    let _ = vcpu::set_periodic_timer(0, 0);
    let _ = vcpu::set_singleshot_timer(0, 0);
    if x2apic::available() {
        // SAFETY: the x2APIC is present; stopping its timer raises nothing.
        unsafe { x2apic::stop_timer() };
    }
    let Tally {
        ports,
        grants,
        domctl_eperm,
        console_bytes,
        console_eagain,
        ring_bytes,
        multicalls,
        multicall_entries,
        timer_sets,
        yields,
        polls,
        hypercalls,
        wakes,
    } = tally;
    // What the ring still holds and this line need the console budget back (docs/abi.md 13.1).
    sleep_until("hog", end + REFILL_NS);
    // End the ring's unfinished long line, so that the result lines come out whole.
    println!();
    println!(
        "hog: result: ports={ports} ports_error=ENOSPC grants={grants} grants_error=ENOSPC domctl_eperm={domctl_eperm} periodic_below_min=EINVAL multicall_over_max=E2BIG"
    );
    println!(
        "hog: storm: console_bytes={console_bytes} console_eagain={console_eagain} ring_bytes={ring_bytes} multicalls={multicalls} multicall_entries={multicall_entries}"
    );
    println!(
        "hog: storm: timer_sets={timer_sets} yields={yields} polls={polls} hypercalls={hypercalls} wakes={wakes} second_vcpu_halted={second_vcpu}"
    );
    crate::finish(0)
}

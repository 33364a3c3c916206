//! The sample guest's other vCPUs (`vcpus=` above 1, docs/abi.md 19 and 20), driven through
//! the SDK's smp group (`pv.smp=`), so the same code runs on x2APIC IPIs and a shootdown by
//! IPI natively and on send_ipi and flush_tlb paravirtually:
//!
//! 1. **Bring-up**: natively INIT-SIPI-SIPI through the ICR to a trampoline page (docs/abi.md
//!    14.2), paravirtually `vcpu_op` initialise and up (19). Each vCPU records its number
//!    (`percpu`), loads the IDT, and turns on what its IPIs arrive through: the x2APIC, or
//!    the event upcall.
//! 2. **Work that moves by IPI**: `2n` tokens, each visiting every vCPU twice in a ring; a
//!    vCPU runs a stage of work on a token and hands it to the next vCPU's queue with an IPI.
//!    Which vCPU runs which stage is fixed, so the checksum and the stages per vCPU are the
//!    same in every mode and run.
//! 3. **A contended lock** ([`lock`]): every vCPU increments a counter under one lock,
//!    waiting through the group (a poll for a kick, or a pause loop).
//! 4. **A shootdown** ([`shootdown`]): a page remapped and then unmapped while every vCPU
//!    reads it; no vCPU may read through a translation older than the last shootdown.
//!
//! vCPU 0 prints one `sample-guest: smp results:` line, identical in both modes, and checks
//! it against what it computes alone; the other vCPUs never print (the console is vCPU 0's).

mod lock;
mod shootdown;

use core::cell::UnsafeCell;
use core::fmt::Display;
use core::sync::atomic::{AtomicU64, Ordering};

use lamina_abi::memory::{MEMORY_MAP_MAX_REGIONS, MemoryRegion, region_kind};
use lamina_abi::sched::ShutdownReason;
use lamina_abi::shared_info::MAX_VCPUS;
use lamina_abi::vcpu::VcpuStartState;
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::pvops::{self, Backend, SHOOTDOWN_KIND, ipi_vector, vectors};
use lamina_guest_sdk::{hypercall, interrupts, memory, percpu, println, vcpu, x2apic};

use lock::SpinLock;

pub(crate) const MAX: usize = MAX_VCPUS;
/// The IPI kinds (IPI slots paravirtually, vectors `0xe0 + kind` natively).
pub(crate) const WORK_KIND: u8 = 0;
pub(crate) const KICK_KIND: u8 = 1;

const STACK_BYTES: usize = 16 * 1024;
/// The trampoline's page for INIT-SIPI-SIPI: free low RAM (docs/abi.md 4.2), below 1 MiB as
/// a SIPI vector needs.
const SIPI_PAGE: u64 = 0xb000;

/// The phases vCPU 0 runs the others through.
const IDLE: u64 = 0;
const PIPELINE: u64 = 1;
const LOCKING: u64 = 2;
const SHOOTDOWN: u64 = 3;
const PARK: u64 = 4;

/// Tokens per vCPU, and the times each token visits every vCPU.
const TOKENS_PER_VCPU: u64 = 2;
const LAPS: u64 = 2;
/// Work in one stage.
const STAGE_ROUNDS: u32 = 2000;
/// Lock rounds per vCPU.
const LOCK_ROUNDS: u64 = 1000;
/// Pause-loop iterations inside the lock: long enough that waiters outlast their spins.
const CRITICAL_SPINS: u32 = 100;

/// Each secondary vCPU's stack.
#[repr(C, align(16))]
struct Stacks(UnsafeCell<[[u8; STACK_BYTES]; MAX]>);

// SAFETY: each stack is used only by the vCPU vCPU 0 gave it to.
unsafe impl Sync for Stacks {}

static STACKS: Stacks = Stacks(UnsafeCell::new([[0; STACK_BYTES]; MAX]));

/// The RSP each vCPU starts with (as after a call), read by the SIPI trampoline.
static STACK_TOPS: [AtomicU64; MAX] = [const { AtomicU64::new(0) }; MAX];

static NR_VCPUS: AtomicU64 = AtomicU64::new(1);
/// vCPUs that finished their start, a bit each.
static ONLINE: AtomicU64 = AtomicU64::new(0);
static PHASE: AtomicU64 = AtomicU64::new(IDLE);
/// vCPUs that finished the current phase.
static DONE: AtomicU64 = AtomicU64::new(0);
/// IPIs of the work kind taken (handler runs; differs by mode).
static WORK_IPIS: AtomicU64 = AtomicU64::new(0);

// The INIT-SIPI-SIPI trampoline: copied to the SIPI page, started in 64-bit mode with the
// sender's CR3, RSP 0 and the x2APIC id in RDI (docs/abi.md 14.2). Absolute addresses only,
// since it runs from a copy; the kernel is linked without PIE.
#[cfg(target_os = "none")]
core::arch::global_asm!(
    ".pushsection .text.sample_guest_sipi, \"ax\"",
    ".global sample_guest_sipi_start",
    "sample_guest_sipi_start:",
    "movabs rax, offset {tops}",
    "mov rsp, [rax + rdi * 8]",
    "movabs rax, offset {entry}",
    "jmp rax",
    ".global sample_guest_sipi_end",
    "sample_guest_sipi_end:",
    ".popsection",
    tops = sym STACK_TOPS,
    entry = sym secondary_entry,
);

#[cfg(target_os = "none")]
unsafe extern "C" {
    static sample_guest_sipi_start: u8;
    static sample_guest_sipi_end: u8;
}

/// Reports what went wrong on whichever vCPU and ends the domain as crashed.
pub(crate) fn fail_here(why: impl Display) -> ! {
    println!("sample-guest: error: vCPU {}: {why}", percpu::current());
    hypercall::shutdown(ShutdownReason::Crash)
}

fn bit(vcpu: u32) -> u64 {
    1 << vcpu
}

/// Waits, idle through the idle group, until `done` holds. Whoever makes it hold sends this
/// vCPU a work IPI afterwards, so checking with interrupts off and idling loses no wake-up.
fn wait_for(done: impl Fn() -> bool) {
    loop {
        interrupts::disable();
        if done() {
            interrupts::enable();
            return;
        }
        pvops::idle().idle();
    }
}

/// Spins until `done` holds, for at most 10 s of system time.
pub(crate) fn wait_until(
    what: &'static str,
    mut done: impl FnMut() -> bool,
) -> Result<(), &'static str> {
    let deadline = pvops::clock().now_ns() + 10_000_000_000;
    while !done() {
        if pvops::clock().now_ns() > deadline {
            println!("sample-guest: error: timed out waiting for {what}");
            return Err("timed out");
        }
        core::hint::spin_loop();
    }
    Ok(())
}

fn send(mask: u64, kind: u8) {
    if let Err(error) = pvops::smp().send_ipi(mask, kind) {
        fail_here(format_args!("send_ipi({mask:#x}, {kind}) failed: {error}"));
    }
}

// ---- IPI handlers ----

fn on_work_vector(_frame: &mut interrupts::TrapFrame) {
    WORK_IPIS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the handler of an x2APIC interrupt (native smp backend).
    unsafe { x2apic::eoi() };
}

fn on_kick_vector(_frame: &mut interrupts::TrapFrame) {
    // The kick only ends a pause loop's wait; the waiter looks at the lock itself.
    // SAFETY: the handler of an x2APIC interrupt.
    unsafe { x2apic::eoi() };
}

fn on_shootdown_vector(_frame: &mut interrupts::TrapFrame) {
    // SAFETY: the handler of the native shootdown's vector.
    unsafe { pvops::handle_shootdown_ipi(percpu::current()) };
}

fn on_spurious(_frame: &mut interrupts::TrapFrame) {}

fn on_work_event(_port: Port) {
    WORK_IPIS.fetch_add(1, Ordering::Relaxed);
}

/// What every vCPU's IPIs need, set up by vCPU 0 for all `n`: handlers of the native vectors,
/// or the IPI slots bound on every vCPU (the kick ports masked: only poll looks at them).
fn prepare_ipis(n: u32) -> Result<(), &'static str> {
    match pvops::selection().smp {
        Backend::Native => {
            if !x2apic::available() {
                return Err("the native smp group needs an x2APIC");
            }
            interrupts::set_handler(ipi_vector(WORK_KIND), on_work_vector);
            interrupts::set_handler(ipi_vector(KICK_KIND), on_kick_vector);
            interrupts::set_handler(ipi_vector(SHOOTDOWN_KIND), on_shootdown_vector);
        }
        Backend::Paravirt => {
            for vcpu in 0..n {
                let work = pvops::bind_ipi_kind(vcpu, WORK_KIND)
                    .map_err(|_| "bind_ipi_slot of the work kind refused")?;
                events::set_handler(work, on_work_event);
                events::unmask(work).map_err(|_| "unmask refused")?;
                let kick = pvops::bind_ipi_kind(vcpu, KICK_KIND)
                    .map_err(|_| "bind_ipi_slot of the kick kind refused")?;
                events::mask(kick);
                lock::set_kick_port(vcpu, kick);
            }
        }
    }
    interrupts::set_handler(vectors::SPURIOUS, on_spurious);
    Ok(())
}

/// What each vCPU does for itself once: its number, its IDT, and what its IPIs and idle
/// wake-ups arrive through; then interrupts on.
fn setup_this_vcpu(me: u32) -> Result<(), &'static str> {
    percpu::init_this_vcpu(me).map_err(|_| "percpu: not the vCPU it was started as")?;
    if me != 0 && !interrupts::load_on_this_vcpu() {
        return Err("no IDT to load");
    }
    let selection = pvops::selection();
    if selection.smp == Backend::Native || selection.idle == Backend::Native {
        // SAFETY: prepare_ipis checked the x2APIC and handles the spurious vector.
        unsafe { x2apic::enable(vectors::SPURIOUS) };
    }
    if selection.smp == Backend::Paravirt || selection.idle == Backend::Paravirt {
        events::install_upcall(vectors::UPCALL).map_err(|_| "set_upcall_vector refused")?;
        events::unmask_upcalls();
    }
    interrupts::enable();
    Ok(())
}

/// Where every vCPU but 0 starts (RDI: its number), from `vcpu_op` or the SIPI trampoline.
extern "C" fn secondary_entry(index: u64) -> ! {
    let me = index as u32;
    if let Err(why) = setup_this_vcpu(me) {
        fail_here(why);
    }
    ONLINE.fetch_or(bit(me), Ordering::SeqCst);
    send(bit(0), WORK_KIND);
    let mut seen = IDLE;
    loop {
        wait_for(|| PHASE.load(Ordering::SeqCst) != seen);
        seen = PHASE.load(Ordering::SeqCst);
        match seen {
            PIPELINE => pipeline(me),
            LOCKING => lock_rounds(),
            SHOOTDOWN => shootdown::target(me),
            _ => {}
        }
        DONE.fetch_or(bit(me), Ordering::SeqCst);
        send(bit(0), WORK_KIND);
        if seen == PARK {
            park(me);
        }
    }
}

/// The end of a secondary vCPU: natively halted with its APIC on (vCPU 0 ends the domain),
/// paravirtually taken down.
fn park(me: u32) -> ! {
    loop {
        match pvops::selection().smp {
            Backend::Native => interrupts::enable_and_halt(),
            Backend::Paravirt => {
                let _ = vcpu::down(me);
            }
        }
    }
}

/// Starts vCPUs 1..n: INIT-SIPI-SIPI natively, `vcpu_op` paravirtually.
fn start_secondaries(n: u32) -> Result<&'static str, &'static str> {
    for (index, top) in STACK_TOPS.iter().enumerate().take(n as usize).skip(1) {
        // As after a call: the return address slot below a 16-byte boundary.
        top.store(
            STACKS.0.get() as u64 + ((index + 1) * STACK_BYTES) as u64 - 8,
            Ordering::SeqCst,
        );
    }
    let how = match pvops::selection().smp {
        Backend::Paravirt => {
            let cr3: u64;
            // SAFETY: reading CR3 has no side effect.
            unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
            for index in 1..n {
                let start = VcpuStartState {
                    rip: secondary_entry as *const () as usize as u64,
                    rsp: STACK_TOPS[index as usize].load(Ordering::SeqCst),
                    cr3: cr3 & !0xfff,
                    argument: u64::from(index),
                };
                vcpu::initialise(index, &start).map_err(|_| "vcpu_op initialise refused")?;
                // SAFETY: the code and stack are the new vCPU's; it shares only atomics and
                // what the locks guard.
                unsafe { vcpu::up(index) }.map_err(|_| "vcpu_op up refused")?;
            }
            "vcpu_op initialise and up"
        }
        Backend::Native => {
            copy_trampoline();
            const INIT_ASSERT: u64 = 5 << 8 | 1 << 14;
            const STARTUP: u64 = 6 << 8 | SIPI_PAGE >> 12;
            for index in 1..n {
                let destination = u64::from(index) << 32;
                // SAFETY: prepare_ipis checked the x2APIC; INIT and STARTUP start a vCPU that
                // never ran at the trampoline (docs/abi.md 14.2; SDM Vol. 3A 9.4.4).
                unsafe {
                    x2apic::write_icr(destination | INIT_ASSERT);
                    x2apic::write_icr(destination | STARTUP);
                    x2apic::write_icr(destination | STARTUP);
                }
            }
            "INIT-SIPI-SIPI"
        }
    };
    let others = ((1u64 << n) - 1) & !1;
    wait_for(|| ONLINE.load(Ordering::SeqCst) == others);
    Ok(how)
}

#[cfg(target_os = "none")]
fn copy_trampoline() {
    let start = &raw const sample_guest_sipi_start;
    let length = &raw const sample_guest_sipi_end as usize - start as usize;
    // SAFETY: the SIPI page is free low RAM (checked against the memory map), identity-mapped;
    // the trampoline is a few bytes of code.
    unsafe { core::ptr::copy_nonoverlapping(start, SIPI_PAGE as *mut u8, length.min(4096)) };
}

#[cfg(not(target_os = "none"))]
fn copy_trampoline() {}

// ---- the pipeline ----

/// A vCPU's queue of tokens (a bit each), under the lock.
struct Queue {
    lock: SpinLock,
    tokens: UnsafeCell<u64>,
    /// A copy of `tokens` for looking without the lock.
    mirror: AtomicU64,
}

// SAFETY: `tokens` is only touched with `lock` held.
unsafe impl Sync for Queue {}

impl Queue {
    const fn new() -> Queue {
        Queue {
            lock: SpinLock::new(),
            tokens: UnsafeCell::new(0),
            mirror: AtomicU64::new(0),
        }
    }

    fn push(&self, token: u64) {
        self.lock.lock();
        // SAFETY: the lock is held.
        let tokens = unsafe { &mut *self.tokens.get() };
        *tokens |= 1 << token;
        self.mirror.store(*tokens, Ordering::SeqCst);
        self.lock.unlock();
    }

    fn pop(&self) -> Option<u64> {
        if self.mirror.load(Ordering::SeqCst) == 0 {
            return None;
        }
        self.lock.lock();
        // SAFETY: the lock is held.
        let tokens = unsafe { &mut *self.tokens.get() };
        let token = (*tokens != 0).then(|| u64::from(tokens.trailing_zeros()));
        if let Some(token) = token {
            *tokens &= !(1 << token);
        }
        self.mirror.store(*tokens, Ordering::SeqCst);
        self.lock.unlock();
        token
    }

    fn is_empty(&self) -> bool {
        self.mirror.load(Ordering::SeqCst) == 0
    }
}

static QUEUES: [Queue; MAX] = [const { Queue::new() }; MAX];
static TOKEN_VALUES: [AtomicU64; 2 * MAX] = [const { AtomicU64::new(0) }; 2 * MAX];
static TOKEN_HOPS: [AtomicU64; 2 * MAX] = [const { AtomicU64::new(0) }; 2 * MAX];
static STAGES: [AtomicU64; MAX] = [const { AtomicU64::new(0) }; MAX];
static FORWARDS: AtomicU64 = AtomicU64::new(0);
static FINISHED: AtomicU64 = AtomicU64::new(0);
static CHECKSUM: AtomicU64 = AtomicU64::new(0);

fn token_seed(token: u64) -> u64 {
    0x9e37_79b9_7f4a_7c15u64.wrapping_mul(token + 1)
}

/// One stage of work on `value` by `vcpu` at hop `hop`: xorshift rounds.
fn stage_value(value: u64, vcpu: u32, hop: u64) -> u64 {
    let mut x = value ^ (u64::from(vcpu) + 1) << 40 ^ hop;
    for _ in 0..STAGE_ROUNDS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

fn token_count(n: u32) -> u64 {
    TOKENS_PER_VCPU * u64::from(n)
}

fn hop_count(n: u32) -> u64 {
    LAPS * u64::from(n)
}

fn run_stage(me: u32, n: u32, token: u64) {
    let index = token as usize;
    let hop = TOKEN_HOPS[index].load(Ordering::SeqCst);
    let value = stage_value(TOKEN_VALUES[index].load(Ordering::SeqCst), me, hop);
    TOKEN_VALUES[index].store(value, Ordering::SeqCst);
    TOKEN_HOPS[index].store(hop + 1, Ordering::SeqCst);
    STAGES[me as usize].fetch_add(1, Ordering::SeqCst);
    if hop + 1 == hop_count(n) {
        CHECKSUM.fetch_add(value, Ordering::SeqCst);
        if FINISHED.fetch_add(1, Ordering::SeqCst) + 1 == token_count(n) {
            // Everyone idle in the pipeline looks again, and finds it finished.
            send(((1u64 << n) - 1) & !bit(me), WORK_KIND);
        }
    } else {
        let next = (me + 1) % n;
        QUEUES[next as usize].push(token);
        FORWARDS.fetch_add(1, Ordering::SeqCst);
        send(bit(next), WORK_KIND);
    }
}

fn pipeline(me: u32) {
    let n = NR_VCPUS.load(Ordering::SeqCst) as u32;
    let queue = &QUEUES[me as usize];
    loop {
        if let Some(token) = queue.pop() {
            run_stage(me, n, token);
            continue;
        }
        let finished = || FINISHED.load(Ordering::SeqCst) == token_count(n);
        wait_for(|| !queue.is_empty() || finished());
        if queue.is_empty() && finished() {
            return;
        }
    }
}

/// The checksum the pipeline must reach, computed by one vCPU alone.
fn expected_checksum(n: u32) -> u64 {
    (0..token_count(n))
        .map(|token| {
            let mut value = token_seed(token);
            let mut vcpu = (token % u64::from(n)) as u32;
            for hop in 0..hop_count(n) {
                value = stage_value(value, vcpu, hop);
                vcpu = (vcpu + 1) % n;
            }
            value
        })
        .fold(0u64, u64::wrapping_add)
}

// ---- the contended lock ----

static COUNTER_LOCK: SpinLock = SpinLock::new();
/// Incremented under the lock by plain loads and stores: a lost update shows a broken lock.
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn lock_rounds() {
    for _ in 0..LOCK_ROUNDS {
        COUNTER_LOCK.lock();
        let value = COUNTER.load(Ordering::Relaxed);
        for _ in 0..CRITICAL_SPINS {
            core::hint::spin_loop();
        }
        COUNTER.store(value + 1, Ordering::Relaxed);
        COUNTER_LOCK.unlock();
    }
}

// ---- vCPU 0 ----

/// Runs `phase` on every vCPU: vCPU 0 does `own`, then waits for the others.
fn run_phase(
    phase: u64,
    others: u64,
    own: impl FnOnce() -> Result<(), &'static str>,
) -> Result<(), &'static str> {
    DONE.store(0, Ordering::SeqCst);
    PHASE.store(phase, Ordering::SeqCst);
    send(others, WORK_KIND);
    own()?;
    wait_for(|| DONE.load(Ordering::SeqCst) == others);
    Ok(())
}

/// The low pages the bring-up and the shootdown use must be free RAM.
fn check_low_pages_free() -> Result<(), &'static str> {
    let mut regions = [MemoryRegion::default(); MEMORY_MAP_MAX_REGIONS];
    let count = memory::memory_map(&mut regions).map_err(|_| "get_memory_map failed")?;
    let free = regions[..count.min(regions.len())].iter().any(|region| {
        region.kind == region_kind::RAM
            && region.base <= SIPI_PAGE
            && region.base + region.length >= shootdown::LAST_GPA
    });
    if free {
        Ok(())
    } else {
        Err("the low pages for the trampoline and the test page are not free RAM")
    }
}

/// Runs the SMP part on `nr_vcpus` vCPUs, from vCPU 0 with interrupts off; prints the
/// results line and checks it.
pub(crate) fn run(nr_vcpus: u32) -> Result<(), &'static str> {
    let n = nr_vcpus.min(MAX as u32);
    NR_VCPUS.store(u64::from(n), Ordering::SeqCst);
    let all = (1u64 << n) - 1;
    let others = all & !1;
    check_low_pages_free()?;
    prepare_ipis(n)?;
    setup_this_vcpu(0)?;
    let how = start_secondaries(n)?;
    println!(
        "sample-guest: smp: vCPUs 1-{} started by {how} (differs by mode); smp group: {}",
        n - 1,
        pvops::smp().name()
    );

    for token in 0..token_count(n) {
        TOKEN_VALUES[token as usize].store(token_seed(token), Ordering::SeqCst);
        QUEUES[(token % u64::from(n)) as usize].push(token);
    }
    run_phase(PIPELINE, others, || {
        pipeline(0);
        Ok(())
    })?;
    run_phase(LOCKING, others, || {
        lock_rounds();
        Ok(())
    })?;
    shootdown::prepare()?;
    run_phase(SHOOTDOWN, others, || shootdown::drive(all))?;
    run_phase(PARK, others, || Ok(()))?;

    let stages: [u64; MAX] = core::array::from_fn(|v| STAGES[v].load(Ordering::SeqCst));
    let stages = &stages[..n as usize];
    let checksum = CHECKSUM.load(Ordering::SeqCst);
    let forwards = FORWARDS.load(Ordering::SeqCst);
    let counter = COUNTER.load(Ordering::SeqCst);
    let stale = shootdown::STALE.load(Ordering::SeqCst);
    lamina_guest_sdk::print!("sample-guest: smp results: vcpus={n} stages=");
    for (index, count) in stages.iter().enumerate() {
        let separator = if index == 0 { "" } else { "," };
        lamina_guest_sdk::print!("{separator}{count}");
    }
    println!(
        " forwards={forwards} checksum={checksum:#018x} locked-increments={counter}/{} shootdowns=2 stale-reads={stale}",
        u64::from(n) * LOCK_ROUNDS
    );
    println!(
        "sample-guest: smp: {} work IPIs taken, lock contended {} times, {} waits for a kick, {} kicks, {} reads of the test page ({} faulted) (differs by mode)",
        WORK_IPIS.load(Ordering::SeqCst),
        lock::CONTENDED.load(Ordering::SeqCst),
        lock::WAITS.load(Ordering::SeqCst),
        lock::KICKS.load(Ordering::SeqCst),
        shootdown::READS.load(Ordering::SeqCst),
        shootdown::FAULTS.load(Ordering::SeqCst),
    );

    let per_vcpu = token_count(n) * hop_count(n) / u64::from(n);
    if stages.iter().any(|&count| count != per_vcpu) {
        return Err("a vCPU ran another number of stages than its share");
    }
    if forwards != token_count(n) * (hop_count(n) - 1) {
        return Err("tokens were forwarded another number of times than their hops");
    }
    if checksum != expected_checksum(n) {
        return Err("the pipeline's checksum differs from vCPU 0's own computation");
    }
    if counter != u64::from(n) * LOCK_ROUNDS {
        return Err("increments under the lock were lost");
    }
    if stale != 0 {
        return Err("a stale translation was used");
    }
    Ok(())
}

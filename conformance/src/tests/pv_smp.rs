//! Tests of paravirtual SMP (docs/abi.md 20): IPI slots and send_ipi (8.10, 8.11), a kick
//! ending a sibling's poll, flush_tlb (11) with a preempted and a running target, the run
//! state as the preempted flag (9.2) and yield_to (3.3).
//!
//! The secondary vCPUs run code of their own on static stacks, with interrupts off and no
//! upcall vector: they wait with block or poll, and talk to vCPU 0 through atomics. All checks
//! and output stay on vCPU 0.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lamina_abi::cpuid::{LEAF_VERSION, features};
use lamina_abi::event_channel::{EventChannelOp, IPI_SLOTS, PortState};
use lamina_abi::memory::{FLUSH_ADDRESSES_MAX, MemoryOp};
use lamina_abi::shared_info::VcpuInfo;
use lamina_abi::stats::{ExitCounters, exit_kind};
use lamina_abi::vcpu::{VcpuOp, VcpuStartState, runstate};
use lamina_abi::{Errno, Hypercall};
use lamina_guest_sdk::start_info;

use super::common::{
    RunstateArea, bad_vcpus, port_status, register_runstate_area, register_upcall_vector,
    unmask_upcalls, wait_for,
};
use crate::framework::{Hex, Status, check, check_eq, expect_ok};
use crate::irq::{self, UPCALL_VECTOR};
use crate::x86::{self, RacyCell};
use crate::{hv, shared};

/// A secondary vCPU's stack.
#[repr(C, align(16))]
struct Stack([u8; 16384]);

static STACKS: [RacyCell<Stack>; 2] = [
    RacyCell::new(Stack([0; 16384])),
    RacyCell::new(Stack([0; 16384])),
];

/// Where start states are written for initialise.
#[repr(C, align(8))]
struct StartArea(VcpuStartState);

static START_AREA: RacyCell<StartArea> = RacyCell::new(StartArea(VcpuStartState {
    rip: 0,
    rsp: 0,
    cr3: 0,
    argument: 0,
}));

/// Initialises vCPU `vcpu` (1 or 2) to run `main(vcpu)` on its stack, and brings it up.
pub(super) fn start_secondary(vcpu: u64, main: extern "C" fn(u64) -> !) -> bool {
    let stack = STACKS[vcpu as usize - 1].get() as u64 + size_of::<Stack>() as u64;
    let start = VcpuStartState {
        rip: main as *const () as usize as u64,
        // As after a call: the return address slot below a 16-byte boundary.
        rsp: stack - 8,
        cr3: x86::read_cr3() & !0xfff,
        argument: vcpu,
    };
    let area = START_AREA.get();
    // SAFETY: the area is ours; only vCPU 0 writes it, the hypervisor reads it during the call.
    unsafe { area.write(StartArea(start)) };
    // SAFETY: initialise reads 32 bytes at the area; up touches no memory.
    let initialised = unsafe { hv::vcpu_op(VcpuOp::Initialise as u64, vcpu, area as u64) };
    if expect_ok(format_args!("initialise vCPU {vcpu}"), initialised).is_none() {
        return false;
    }
    // SAFETY: as above.
    let up = unsafe { hv::vcpu_op(VcpuOp::Up as u64, vcpu, 0) };
    expect_ok(format_args!("up({vcpu})"), up).is_some()
}

/// vCPU `vcpu`'s `VcpuInfo` in the shared-info page.
fn vcpu_info(vcpu: usize) -> *mut VcpuInfo {
    // SAFETY: only the address of the field is taken.
    unsafe { &raw mut (*shared::shared_info()).vcpu_info[vcpu] }
}

/// What a secondary does with a port raised for it: clears the port's pending bit and its
/// vCPU's `evtchn_upcall_pending` and selector, as an upcall handler would.
fn consume(vcpu: usize, port: u64) {
    let info = vcpu_info(vcpu);
    shared::upcall_pending_of(info).store(0, Ordering::SeqCst);
    shared::pending_sel_of(info).store(0, Ordering::SeqCst);
    shared::clear_pending(port);
}

/// vCPU `vcpu`'s exit counters, or `None` (recorded).
fn counters_of(vcpu: u64) -> Option<ExitCounters> {
    let mut counters = ExitCounters::default();
    let status = hv::exit_counters(lamina_abi::event_channel::DOMID_SELF, vcpu, &mut counters);
    expect_ok(format_args!("stats_op of vCPU {vcpu}"), status).map(|_| counters)
}

conformance_test! {
    title: "bind_ipi_slot and send_ipi check their arguments in the documented order and raise nothing on an error",
    section: "8.11 send_ipi",
    expect: Success,
    cmdline: "vcpus=2",
}
pub(super) fn pv_ipi_checks_args() {
    let leaf = lamina_guest_sdk::cpuid::cpuid(LEAF_VERSION, 0);
    check!(
        leaf.ebx & features::PV_SMP != 0,
        "CPUID 0x40000001 EBX {:#x} lacks PV_SMP (bit 15)",
        leaf.ebx
    );
    for vcpu in bad_vcpus() {
        check_eq!(
            format_args!("bind_ipi_slot(vCPU {vcpu:#x}, 0)"),
            Status::err(Errno::ENOENT),
            hv::bind_ipi_slot(vcpu, 0)
        );
    }
    for slot in [IPI_SLOTS, IPI_SLOTS + 1, 1 << 32, u64::MAX] {
        check_eq!(
            format_args!("bind_ipi_slot(vCPU 0, slot {slot:#x})"),
            Status::err(Errno::EINVAL),
            hv::bind_ipi_slot(0, slot)
        );
    }
    check_eq!(
        "bind_ipi_slot(vCPU 5, slot 9): the vCPU is checked first",
        Status::err(Errno::ENOENT),
        hv::bind_ipi_slot(5, 9)
    );
    let Some(port0) = expect_ok("bind_ipi_slot(0, 2)", hv::bind_ipi_slot(0, 2)) else {
        return;
    };
    check_eq!(
        "bind_ipi_slot(0, 2) again",
        Status::err(Errno::EEXIST),
        hv::bind_ipi_slot(0, 2)
    );
    if let Some(status) = port_status(port0) {
        check_eq!(
            "status of a slot port: state",
            PortState::Ipi as u8,
            status.state
        );
        check_eq!("status of a slot port: vCPU", 0, status.vcpu);
    }
    // Slot 2 is bound on vCPU 0 only: every failing send below must raise nothing.
    let failing = [
        ("slot 8", 0b01, IPI_SLOTS, Errno::EINVAL),
        ("slot 2^32 + 2", 0b01, 1 << 32 | 2, Errno::EINVAL),
        ("an empty mask", 0, 2, Errno::EINVAL),
        ("an empty mask and slot 8", 0, IPI_SLOTS, Errno::EINVAL),
        ("vCPU 2 of 2", 0b101, 2, Errno::ENOENT),
        ("bit 63", 1 << 63 | 1, 2, Errno::ENOENT),
        ("vCPU 1, with nothing in slot 2", 0b11, 2, Errno::EINVAL),
        ("vCPU 0, with nothing in slot 3", 0b01, 3, Errno::EINVAL),
    ];
    for (what, mask, slot, errno) in failing {
        check_eq!(
            format_args!("send_ipi to {what}"),
            Status::err(errno),
            hv::send_ipi(mask, slot)
        );
    }
    check!(
        !shared::is_pending(port0),
        "a send_ipi that failed raised vCPU 0's slot port"
    );
    check_eq!("send_ipi to vCPU 0", Status(0), hv::send_ipi(0b01, 2));
    check!(
        shared::is_pending(port0),
        "send_ipi did not raise the slot port"
    );
    shared::clear_pending(port0);
    check_eq!("close of the slot port", Status(0), hv::close(port0));
    check_eq!(
        "send_ipi on the slot after its port was closed",
        Status::err(Errno::EINVAL),
        hv::send_ipi(0b01, 2)
    );
    check!(
        hv::bind_ipi_slot(0, 2).0 < 1024,
        "closing the port did not unbind the slot"
    );
    check_eq!(
        "event_channel_op 10",
        Status::err(Errno::ENOSYS),
        hv::event_channel_op(10, 0b01, 0)
    );
    check_eq!(
        "the numbers are the ABI's",
        (8, 9),
        (
            EventChannelOp::BindIpiSlot as u64,
            EventChannelOp::SendIpi as u64
        )
    );
}

/// The secondary's slot port, set by vCPU 0 before it is up.
static SECONDARY_PORT: AtomicU64 = AtomicU64::new(0);
/// How many times block returned with the port raised, and poll.
static BLOCK_WAKES: AtomicU64 = AtomicU64::new(0);
static POLL_WAKES: AtomicU64 = AtomicU64::new(0);
/// Asks the secondary to wait with poll instead of block.
static USE_POLL: AtomicBool = AtomicBool::new(false);
/// Asks the secondary to send_ipi to both vCPUs, once.
static SEND_TO_BOTH: AtomicBool = AtomicBool::new(false);
static SEND_RESULT: AtomicU64 = AtomicU64::new(u64::MAX);
/// Failures the secondary saw (a wait that returned with nothing pending, or an error).
static SECONDARY_ERRORS: AtomicU64 = AtomicU64::new(0);

/// vCPU 1 of [`pv_ipi_wakes_and_kicks`]: waits for its slot port with block or poll, consumes
/// it, counts; sends to both vCPUs when asked.
extern "C" fn ipi_secondary(vcpu: u64) -> ! {
    let port = SECONDARY_PORT.load(Ordering::SeqCst);
    loop {
        if SEND_TO_BOTH.swap(false, Ordering::SeqCst) {
            SEND_RESULT.store(hv::send_ipi(0b11, 0).0, Ordering::SeqCst);
        }
        let polling = USE_POLL.load(Ordering::SeqCst);
        let status = if polling {
            hv::poll(&[port as u32], 0)
        } else {
            hv::block()
        };
        if status != Status(0) || !shared::is_pending(port) {
            SECONDARY_ERRORS.fetch_add(1, Ordering::SeqCst);
        }
        consume(vcpu as usize, port);
        if polling {
            POLL_WAKES.fetch_add(1, Ordering::SeqCst);
        } else {
            BLOCK_WAKES.fetch_add(1, Ordering::SeqCst);
        }
    }
}

conformance_test! {
    title: "send_ipi wakes a blocked sibling, a send kicks a polling one, and a sibling's send_ipi reaches vCPU 0 as an upcall with no EOI",
    section: "8.11 send_ipi",
    expect: Success,
    cmdline: "vcpus=2",
}
pub(super) fn pv_ipi_wakes_and_kicks() {
    let (Some(own), Some(other)) = (
        expect_ok("bind_ipi_slot(0, 0)", hv::bind_ipi_slot(0, 0)),
        expect_ok("bind_ipi_slot(1, 0)", hv::bind_ipi_slot(1, 0)),
    ) else {
        return;
    };
    SECONDARY_PORT.store(other, Ordering::SeqCst);
    // vCPU 1 takes its own port: vCPU 0's upcalls, which scan a word of pending bits shared by
    // both, must not (they took it under vCPU 1's poll once, which then found it not pending).
    irq::bound_to_another_vcpu(other);
    register_runstate_area(1, &RUNSTATE);
    if !register_upcall_vector() || !start_secondary(1, ipi_secondary) {
        return;
    }
    const ROUNDS: u64 = 5;
    // Blocked: each send_ipi wakes it once (it blocks again at once).
    for round in 1..=ROUNDS {
        check!(
            wait_for(vcpu1_blocked),
            "vCPU 1 never blocked (round {round})"
        );
        let Some(before) = counters_of(0) else { return };
        check_eq!(
            format_args!("send_ipi to vCPU 1, round {round}"),
            Status(0),
            hv::send_ipi(0b10, 0)
        );
        let Some(after) = counters_of(0) else { return };
        let sends = |c: &ExitCounters| c.by_hypercall[Hypercall::EventChannelOp as usize];
        check_eq!(
            format_args!("event_channel_op calls of the sender for one send_ipi (round {round})"),
            1,
            sends(&after) - sends(&before)
        );
        check!(
            wait_for(|| BLOCK_WAKES.load(Ordering::SeqCst) >= round),
            "vCPU 1 did not wake from block after send_ipi {round}"
        );
    }
    // Polling: a plain send on its port is the kick (docs/abi.md 20, spin-waiting).
    USE_POLL.store(true, Ordering::SeqCst);
    check_eq!("one more send_ipi", Status(0), hv::send_ipi(0b10, 0));
    check!(
        wait_for(|| BLOCK_WAKES.load(Ordering::SeqCst) > ROUNDS),
        "vCPU 1 did not switch to poll"
    );
    for round in 1..=ROUNDS {
        check!(
            wait_for(vcpu1_blocked),
            "vCPU 1 never polled (round {round})"
        );
        check_eq!(
            format_args!("send (kick), round {round}"),
            Status(0),
            hv::send(other)
        );
        check!(
            wait_for(|| POLL_WAKES.load(Ordering::SeqCst) >= round),
            "vCPU 1 did not wake from poll after kick {round}"
        );
    }
    // vCPU 1 sends to both: vCPU 0 takes an upcall, without an EOI; vCPU 1 wakes itself.
    let Some(before) = counters_of(0) else { return };
    unmask_upcalls();
    let upcalls = irq::count(UPCALL_VECTOR);
    let polls = POLL_WAKES.load(Ordering::SeqCst);
    SEND_TO_BOTH.store(true, Ordering::SeqCst);
    check_eq!("a last kick", Status(0), hv::send(other));
    x86::enable_interrupts();
    let delivered = wait_for(|| irq::count(UPCALL_VECTOR) > upcalls);
    x86::disable_interrupts();
    check!(delivered, "vCPU 1's send_ipi never reached vCPU 0");
    check_eq!(
        "what send_ipi returned on vCPU 1",
        Status(0),
        Status(SEND_RESULT.load(Ordering::SeqCst))
    );
    check!(
        irq::delivered(own),
        "the upcall did not deliver vCPU 0's slot port"
    );
    check!(
        wait_for(|| POLL_WAKES.load(Ordering::SeqCst) >= polls + 2),
        "vCPU 1's own bit in the mask did not wake it"
    );
    if let Some(after) = counters_of(0) {
        check_eq!(
            "vCPU 0's MSR writes (an EOI would be one)",
            before.by_kind[exit_kind::MSR_WRITE],
            after.by_kind[exit_kind::MSR_WRITE]
        );
    }
    check_eq!(
        "errors seen on vCPU 1",
        0,
        SECONDARY_ERRORS.load(Ordering::SeqCst)
    );
}

/// Whether vCPU 1 waits in block or poll with nothing pending for it: its run state is
/// blocked (docs/abi.md 9.2).
fn vcpu1_blocked() -> bool {
    vcpu1_runstate() == runstate::BLOCKED
        && !shared::is_pending(SECONDARY_PORT.load(Ordering::SeqCst))
}

conformance_test! {
    title: "flush_tlb checks its arguments in the documented order",
    section: "11 memory_op",
    expect: Success,
    cmdline: "vcpus=2",
}
pub(super) fn pv_flush_checks_args() {
    let mem = start_info().mem_bytes;
    let addresses = [0x1000u64, 0xffff_8000_0000_0000, 0];
    let array = addresses.as_ptr() as u64;
    let cases = [
        ("an empty mask", 0, array, 1, Errno::EINVAL),
        (
            "an empty mask and 513 addresses",
            0,
            array,
            513,
            Errno::EINVAL,
        ),
        ("vCPU 2 of 2", 0b100, array, 1, Errno::ENOENT),
        (
            "vCPU 2 of 2 and 513 addresses",
            0b100,
            array,
            513,
            Errno::ENOENT,
        ),
        ("bit 63", 1 << 63, 0, 0, Errno::ENOENT),
        (
            "513 addresses",
            0b01,
            array,
            FLUSH_ADDRESSES_MAX + 1,
            Errno::EINVAL,
        ),
        (
            "2^32 + 1 addresses",
            0b01,
            array,
            1 << 32 | 1,
            Errno::EINVAL,
        ),
        ("513 addresses outside RAM", 0b01, mem, 513, Errno::EINVAL),
        ("an array outside RAM", 0b01, mem, 1, Errno::EFAULT),
        (
            "an array straddling the end of RAM",
            0b01,
            mem - 8,
            2,
            Errno::EFAULT,
        ),
        ("an array at u64::MAX", 0b01, u64::MAX, 1, Errno::EFAULT),
    ];
    for (what, mask, gpa, count, errno) in cases {
        check_eq!(
            format_args!("flush_tlb with {what}"),
            Status::err(errno),
            hv::flush_tlb(mask, gpa, count)
        );
    }
    let noncanonical = [0x1000u64, 1 << 47];
    check_eq!(
        "flush_tlb of a non-canonical address",
        Status::err(Errno::EINVAL),
        hv::flush_tlb(0b01, noncanonical.as_ptr() as u64, 2)
    );
    check_eq!(
        "flush_tlb of three addresses on vCPU 0",
        Status(0),
        hv::flush_tlb(0b01, array, 3)
    );
    check_eq!(
        "flush_tlb of everything on both vCPUs (vCPU 1 down), array ignored",
        Status(0),
        hv::flush_tlb(0b11, u64::MAX, 0)
    );
    // SAFETY: an unknown operation writes nothing.
    let unknown = unsafe { hv::memory_op(3, 0b01, 0) };
    check_eq!("memory_op 3", Status::err(Errno::ENOSYS), unknown);
    check_eq!("flush_tlb is memory_op 2", 2, MemoryOp::FlushTlb as u64);
    check_eq!("memory_op is hypercall 5", 5, Hypercall::MemoryOp as u64);
}

/// A page table of our own, and the two pages its first entry maps in turn at [`WINDOW`].
#[repr(C, align(4096))]
struct Page([u64; 512]);

static TABLE: RacyCell<Page> = RacyCell::new(Page([0; 512]));
static PAGE_A: RacyCell<Page> = RacyCell::new(Page([0; 512]));
static PAGE_B: RacyCell<Page> = RacyCell::new(Page([0; 512]));

/// The virtual address remapped: 512 MiB, a PD entry of the boot tables RAM never uses (RAM
/// is at most a few MiB here, the grant window at 1 GiB).
const WINDOW: u64 = 0x2000_0000;
const MARK_A: u64 = 0xa11c_e5ee_0000_000a;
const MARK_B: u64 = 0xb0b5_ee00_0000_000b;

/// Points [`WINDOW`]'s page-table entry at `page` (the caller flushes).
fn map_window(page: *mut Page) {
    let table = TABLE.get().cast::<u64>();
    // SAFETY: the table is our static, identity-mapped; only vCPU 0 writes it.
    unsafe { table.write_volatile(page as u64 | 0x3) };
}

/// Sets up [`WINDOW`]: the marks in the two pages, our table under the boot PD, the window on
/// page A, flushed on this vCPU.
fn set_up_window() {
    // SAFETY: the pages are our statics; only vCPU 0 writes them, before vCPU 1 starts.
    unsafe {
        PAGE_A.get().cast::<u64>().write_volatile(MARK_A);
        PAGE_B.get().cast::<u64>().write_volatile(MARK_B);
    }
    map_window(PAGE_A.get());
    // The boot PD sits two pages above the PML4 (docs/abi.md 4.2).
    let pd = (lamina_abi::layout::BOOT_PML4_GPA + 0x2000) as *mut u64;
    // SAFETY: RAM is identity-mapped, so the PD is writable at its guest-physical address; the
    // entry maps only the window's 2 MiB, which nothing else uses; INVLPG only flushes.
    unsafe {
        pd.add((WINDOW >> 21) as usize)
            .write_volatile(TABLE.get() as u64 | 0x3);
        core::arch::asm!("invlpg [{}]", in(reg) WINDOW, options(nostack));
    }
}

/// Set by vCPU 0 once flush_tlb returned; vCPU 1's reads after it saw this must be page B's.
static FLUSHED: AtomicBool = AtomicBool::new(false);
/// vCPU 1's reads through the window: the last value, the rounds, and stale reads (page A
/// read after it saw [`FLUSHED`]).
static LAST_READ: AtomicU64 = AtomicU64::new(0);
static READ_ROUNDS: AtomicU64 = AtomicU64::new(0);
static ROUNDS_AFTER_FLUSH: AtomicU64 = AtomicU64::new(0);
static STALE_READS: AtomicU64 = AtomicU64::new(0);

/// vCPU 1 of the flush tests: reads through the window, so that its TLB holds the
/// translation, and yields, forever.
extern "C" fn window_reader(_vcpu: u64) -> ! {
    loop {
        let flushed = FLUSHED.load(Ordering::SeqCst);
        // SAFETY: the window is mapped (vCPU 0 mapped it before bringing this vCPU up) to one
        // of two static pages; reading it has no side effect.
        let value = unsafe { (WINDOW as *const u64).read_volatile() };
        LAST_READ.store(value, Ordering::SeqCst);
        if flushed {
            ROUNDS_AFTER_FLUSH.fetch_add(1, Ordering::SeqCst);
            if value != MARK_B {
                STALE_READS.fetch_add(1, Ordering::SeqCst);
            }
        }
        READ_ROUNDS.fetch_add(1, Ordering::SeqCst);
        hv::sched_yield();
    }
}

/// vCPU 1's run-state area.
static RUNSTATE: RacyCell<RunstateArea> = RacyCell::new(RunstateArea::UNSET);

/// vCPU 0's run-state area (the pinned flush test: whether it was preempted).
static RUNSTATE_0: RacyCell<RunstateArea> = RacyCell::new(RunstateArea::UNSET);

/// When vCPU 0 last entered its run state: it changes when another vCPU took its CPU.
fn vcpu0_entry_time() -> u64 {
    // SAFETY: aligned, ours; the hypervisor writes it, we take a volatile copy.
    unsafe { core::ptr::read_volatile(&raw const (*RUNSTATE_0.get()).0.state_entry_time) }
}

fn vcpu1_runstate() -> u32 {
    // SAFETY: aligned, ours; the hypervisor writes it, we take a volatile copy.
    unsafe { core::ptr::read_volatile(&raw const (*RUNSTATE.get()).0.state) }
}

/// The body of both flush tests: vCPU 1 caches the window's translation to page A; vCPU 0
/// remaps it to page B and flushes vCPU 1 with flush_tlb; vCPU 1 must never read page A
/// again. `pinned`: both vCPUs share one CPU, so vCPU 1 is preempted (runnable) whenever
/// vCPU 0 runs.
fn flush_and_check(pinned: bool) {
    register_runstate_area(1, &RUNSTATE);
    set_up_window();
    if !start_secondary(1, window_reader) {
        return;
    }
    check!(
        wait_for(
            || LAST_READ.load(Ordering::SeqCst) == MARK_A && READ_ROUNDS.load(Ordering::SeqCst) > 3
        ),
        "vCPU 1 never read page A through the window (read {:#x})",
        LAST_READ.load(Ordering::SeqCst)
    );
    let state = vcpu1_runstate();
    if pinned {
        // Sharing vCPU 0's only CPU, it cannot be running now: preempted (it yielded).
        check_eq!(
            "vCPU 1's run state while vCPU 0 runs on their one CPU",
            runstate::RUNNABLE,
            state
        );
    } else {
        check!(
            state == runstate::RUNNABLE || state == runstate::RUNNING,
            "vCPU 1's run state {state} is neither running nor runnable"
        );
    }
    map_window(PAGE_B.get());
    let window = [WINDOW];
    if pinned {
        register_runstate_area(0, &RUNSTATE_0);
    }
    // Pinned: vCPU 1 is not running, so the flush must not interrupt it: its counters do not
    // move during the call. Measured again when vCPU 0 itself lost the CPU meanwhile (another
    // domain's timer, the slice's end): vCPU 1 may then run, for its own reasons.
    let mut measured = !pinned;
    for _ in 0..8 {
        let entered = vcpu0_entry_time();
        let Some(before) = counters_of(1) else { return };
        check_eq!(
            "flush_tlb of the window on vCPU 1",
            Status(0),
            hv::flush_tlb(0b10, window.as_ptr() as u64, 1)
        );
        let Some(after) = counters_of(1) else { return };
        if !pinned {
            break;
        }
        if vcpu0_entry_time() == entered {
            check_eq!(
                "vCPU 1's exits during the flush of it while preempted",
                before.total,
                after.total
            );
            measured = true;
            break;
        }
    }
    check!(
        measured,
        "vCPU 0 lost its CPU during each of 8 flushes: the flush of a preempted vCPU not measured"
    );
    FLUSHED.store(true, Ordering::SeqCst);
    check!(
        wait_for(|| ROUNDS_AFTER_FLUSH.load(Ordering::SeqCst) > 5),
        "vCPU 1 did not run again after the flush"
    );
    check_eq!(
        "vCPU 1's reads of page A through the window after the flush (stale)",
        0,
        STALE_READS.load(Ordering::SeqCst)
    );
    check_eq!(
        "what vCPU 1 reads through the window now",
        Hex(MARK_B),
        Hex(LAST_READ.load(Ordering::SeqCst))
    );
}

conformance_test! {
    title: "a preempted vCPU is not interrupted by flush_tlb and never uses its stale translation when it runs again",
    section: "11 memory_op",
    expect: Success,
    cmdline: "vcpus=2 affinity=0",
}
pub(super) fn pv_flush_preempted_vcpu() {
    flush_and_check(true);
}

conformance_test! {
    title: "after flush_tlb returns, a sibling running anywhere never uses its stale translation",
    section: "11 memory_op",
    expect: Success,
    cmdline: "vcpus=2",
}
pub(super) fn pv_flush_running_vcpu() {
    flush_and_check(false);
}

/// Pages of the list tests' window: more than a vCPU keeps pending (16, docs/abi.md 11).
const LIST_PAGES: usize = 24;
/// The generation vCPU 0 published after its last flush: what the list reader must find.
static LIST_GENERATION: AtomicU64 = AtomicU64::new(0);
/// The generation vCPU 0 publishes before it remaps window pages: nothing is asserted in it
/// (a page being remapped may read either frame until its flush returned).
const LIST_REMAPPING: u64 = 4;
/// The list reader's rounds, per generation it saw (0-3 and [`LIST_REMAPPING`]), and its
/// stale reads.
static LIST_ROUNDS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
static LIST_STALE: AtomicU64 = AtomicU64::new(0);

/// What window page `page` must read in generation `generation` (None: either page).
fn listed_mark(generation: u64, page: usize) -> Option<u64> {
    match generation {
        1 if page < 4 => Some(MARK_B),
        2 => Some(MARK_B),
        3 => Some(MARK_A),
        _ => None,
    }
}

fn window_page(page: usize) -> u64 {
    WINDOW + (page as u64) * 4096
}

fn read_window_page(page: usize) -> u64 {
    // SAFETY: every page of the window is mapped (vCPU 0 mapped them before bringing this
    // vCPU up) to one of two static pages; reading has no side effect.
    unsafe { (window_page(page) as *const u64).read_volatile() }
}

/// vCPU 1 of the list tests: reads every window page, each against the generation it read
/// before, and yields, forever.
extern "C" fn list_reader(_vcpu: u64) -> ! {
    loop {
        let generation = LIST_GENERATION.load(Ordering::SeqCst);
        for page in 0..LIST_PAGES {
            let value = read_window_page(page);
            if listed_mark(generation, page).is_some_and(|mark| mark != value) {
                LIST_STALE.fetch_add(1, Ordering::SeqCst);
            }
        }
        LIST_ROUNDS[generation.min(LIST_REMAPPING) as usize].fetch_add(1, Ordering::SeqCst);
        hv::sched_yield();
    }
}

/// Points window pages `pages` at `page` (the caller flushes).
fn map_window_pages(pages: core::ops::Range<usize>, page: *mut Page) {
    let table = TABLE.get().cast::<u64>();
    for index in pages {
        // SAFETY: the table is our static, identity-mapped; only vCPU 0 writes it.
        unsafe { table.add(index).write_volatile(page as u64 | 0x3) };
    }
}

/// flush_tlb of window pages `pages` (each named by an address inside it) on `mask`.
fn flush_window_pages(what: &str, mask: u64, pages: core::ops::Range<usize>) {
    let mut list = [0u64; LIST_PAGES];
    let count = pages.len();
    for (slot, page) in list.iter_mut().zip(pages) {
        *slot = window_page(page) + 0x123;
    }
    check_eq!(
        format_args!("flush_tlb of {what}"),
        Status(0),
        hv::flush_tlb(mask, list.as_ptr() as u64, count as u64)
    );
}

/// This vCPU's reads of every page listed for `generation` find what they must.
fn check_own_reads(generation: u64) {
    for page in 0..LIST_PAGES {
        if let Some(mark) = listed_mark(generation, page) {
            check_eq!(
                format_args!("vCPU 0's read of window page {page} in generation {generation}"),
                Hex(mark),
                Hex(read_window_page(page))
            );
        }
    }
}

/// Publishes [`LIST_REMAPPING`] and waits until vCPU 1 finished a round begun in it: no round
/// that checks the previous generation's marks is still under way when pages change. (Without
/// this, rounds of generation 2 still reading while generation 3 remapped every page counted
/// page A as stale.)
fn announce_remapping() {
    let rounds = &LIST_ROUNDS[LIST_REMAPPING as usize];
    let before = rounds.load(Ordering::SeqCst);
    LIST_GENERATION.store(LIST_REMAPPING, Ordering::SeqCst);
    check!(
        wait_for(|| rounds.load(Ordering::SeqCst) > before),
        "vCPU 1 did not run while pages were about to be remapped"
    );
}

/// Publishes `generation` and waits until vCPU 1 made a few rounds in it.
fn publish_and_wait(generation: u64) {
    LIST_GENERATION.store(generation, Ordering::SeqCst);
    check!(
        wait_for(|| LIST_ROUNDS[generation as usize].load(Ordering::SeqCst) > 3),
        "vCPU 1 did not run in generation {generation}"
    );
}

/// The body of both list tests. Window pages 0-23 map page A and both vCPUs read them
/// (cached). Generation 1: pages 0-3 remapped to page B, flushed with one list of 4 on both
/// vCPUs. Generation 2: pages 4-23 remapped, flushed with two lists of 10 (vCPU 1 does not
/// run between them when pinned: 20 pages pending, more than it keeps). Generation 3: all 24
/// back to page A, one list of 24 (longer than kept). After each flush returned, neither vCPU
/// may read a listed page's old frame; unlisted pages may read either; while pages are being
/// remapped ([`announce_remapping`]) any page may read either.
fn flush_lists_and_check(pinned: bool) {
    register_runstate_area(1, &RUNSTATE);
    set_up_window();
    map_window_pages(0..LIST_PAGES, PAGE_A.get());
    for page in 0..LIST_PAGES {
        // SAFETY: INVLPG only drops a translation.
        unsafe { core::arch::asm!("invlpg [{}]", in(reg) window_page(page), options(nostack)) };
        check_eq!(
            format_args!("window page {page} before any flush"),
            Hex(MARK_A),
            Hex(read_window_page(page))
        );
    }
    if !start_secondary(1, list_reader) {
        return;
    }
    check!(
        wait_for(|| LIST_ROUNDS[0].load(Ordering::SeqCst) > 3),
        "vCPU 1 never read the window"
    );
    if pinned {
        check_eq!(
            "vCPU 1's run state while vCPU 0 runs on their one CPU",
            runstate::RUNNABLE,
            vcpu1_runstate()
        );
    }

    announce_remapping();
    map_window_pages(0..4, PAGE_B.get());
    flush_window_pages("pages 0-3 on both vCPUs", 0b11, 0..4);
    check_own_reads(1);
    publish_and_wait(1);

    announce_remapping();
    map_window_pages(4..LIST_PAGES, PAGE_B.get());
    flush_window_pages("pages 4-13 on both vCPUs", 0b11, 4..14);
    flush_window_pages("pages 14-23 on both vCPUs", 0b11, 14..LIST_PAGES);
    check_own_reads(2);
    publish_and_wait(2);

    announce_remapping();
    map_window_pages(0..LIST_PAGES, PAGE_A.get());
    flush_window_pages("all 24 pages on both vCPUs", 0b11, 0..LIST_PAGES);
    check_own_reads(3);
    publish_and_wait(3);

    check_eq!(
        "vCPU 1's reads of a listed page's old frame after its flush (stale)",
        0,
        LIST_STALE.load(Ordering::SeqCst)
    );
}

conformance_test! {
    title: "flush_tlb of a list drops every listed page on the caller and on a preempted sibling, also when lists add up past what a vCPU keeps",
    section: "11 memory_op",
    expect: Success,
    cmdline: "vcpus=2 affinity=0",
}
pub(super) fn pv_flush_list_preempted() {
    flush_lists_and_check(true);
}

conformance_test! {
    title: "flush_tlb of a list drops every listed page on the caller and on a sibling running anywhere",
    section: "11 memory_op",
    expect: Success,
    cmdline: "vcpus=2",
}
pub(super) fn pv_flush_list_running() {
    flush_lists_and_check(false);
}

/// [`ready_vcpu_timer_at_run`]: vCPU 1's VIRQ_TIMER port, its one-shot
/// deadline (0 until armed), the rounds it ran again after the deadline with the port seen
/// pending / not pending at its first look.
static READY_TIMER_PORT: AtomicU64 = AtomicU64::new(0);
static READY_TIMER_DEADLINE: AtomicU64 = AtomicU64::new(0);
static READY_TIMER_SEEN: AtomicU64 = AtomicU64::new(0);
static READY_TIMER_MISSED: AtomicU64 = AtomicU64::new(0);

/// Reads vCPU 1's run-state entry time (when it last started running).
fn vcpu1_entry_time() -> u64 {
    // SAFETY: aligned, ours; the hypervisor writes it, we take a volatile copy.
    unsafe { core::ptr::read_volatile(&raw const (*RUNSTATE.get()).0.state_entry_time) }
}

/// vCPU 1 of [`ready_vcpu_timer_at_run`]: arms its one-shot timer 2 ms ahead,
/// then yields in a loop; each time it runs again having been scheduled in at or after the
/// deadline, the first thing it looks at is its timer port.
extern "C" fn ready_timer_vcpu(_vcpu: u64) -> ! {
    let port = READY_TIMER_PORT.load(Ordering::SeqCst);
    let deadline = shared::now() + 2_000_000;
    if hv::set_singleshot_timer(1, deadline) != Status(0) {
        READY_TIMER_MISSED.store(u64::MAX, Ordering::SeqCst);
    }
    READY_TIMER_DEADLINE.store(deadline, Ordering::SeqCst);
    loop {
        hv::sched_yield();
        let pending = shared::is_pending(port);
        if vcpu1_entry_time() >= deadline {
            let counter = if pending {
                &READY_TIMER_SEEN
            } else {
                &READY_TIMER_MISSED
            };
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }
}

conformance_test! {
    title: "a ready vCPU that is not running gets a timer expiry that fell due meanwhile before its first instruction when it runs",
    section: "9.3 Timers",
    expect: Success,
    cmdline: "vcpus=2 affinity=0",
}
pub(super) fn ready_vcpu_timer_at_run() {
    register_runstate_area(1, &RUNSTATE);
    let bound = hv::bind_virq(lamina_abi::event_channel::Virq::Timer as u64, 1);
    let Some(port) = expect_ok("BindVirq(VIRQ_TIMER, vCPU 1)", bound) else {
        return;
    };
    // Polled by looking at it only: masked, no upcall takes it.
    shared::set_masked(port, true);
    READY_TIMER_PORT.store(port, Ordering::SeqCst);
    if !start_secondary(1, ready_timer_vcpu) {
        return;
    }
    check!(
        wait_for(|| READY_TIMER_DEADLINE.load(Ordering::SeqCst) != 0),
        "vCPU 1 never armed its timer"
    );
    let deadline = READY_TIMER_DEADLINE.load(Ordering::SeqCst);
    // Keep the CPU, without an exit that could hand it over, until well past the deadline:
    // vCPU 1 waits ready (it yielded) while its timer falls due.
    while shared::now() < deadline + 1_000_000 {
        core::hint::spin_loop();
    }
    check!(
        wait_for(|| READY_TIMER_SEEN.load(Ordering::SeqCst)
            + READY_TIMER_MISSED.load(Ordering::SeqCst)
            > 2),
        "vCPU 1 did not run again after its deadline"
    );
    check_eq!(
        "vCPU 1's runs begun after its deadline that did not find VIRQ_TIMER pending at once",
        0,
        READY_TIMER_MISSED.load(Ordering::SeqCst)
    );
}

/// How many rounds each sibling made in [`pv_yield_to`].
static ROUNDS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// The run-state areas of vCPUs 1 and 2 of [`pv_yield_to`].
static SIBLING_RUNSTATES: RacyCell<[RunstateArea; 2]> = RacyCell::new([RunstateArea::UNSET; 2]);

/// When vCPU `vcpu` (1 or 2) last changed run state: it changes when the vCPU takes the CPU.
fn sibling_entry_time(vcpu: usize) -> u64 {
    // SAFETY: aligned and ours; the hypervisor writes it while that vCPU does not run, and
    // we take a volatile copy.
    unsafe {
        core::ptr::read_volatile(&raw const (*SIBLING_RUNSTATES.get())[vcpu - 1].0.state_entry_time)
    }
}

/// vCPUs 1 and 2 of [`pv_yield_to`]: count and yield, forever.
extern "C" fn counting_sibling(vcpu: u64) -> ! {
    loop {
        ROUNDS[vcpu as usize].fetch_add(1, Ordering::SeqCst);
        hv::sched_yield();
    }
}

conformance_test! {
    title: "yield_to runs the named preempted sibling next, and checks its argument",
    section: "3.3 sched_op",
    expect: Success,
    cmdline: "vcpus=3 affinity=0",
}
pub(super) fn pv_yield_to() {
    for vcpu in bad_vcpus() {
        check_eq!(
            format_args!("yield_to(vCPU {vcpu:#x})"),
            Status::err(Errno::ENOENT),
            hv::yield_to(vcpu)
        );
    }
    check_eq!(
        "yield_to(the caller)",
        Status::err(Errno::EINVAL),
        hv::yield_to(0)
    );
    check_eq!("yield_to(a vCPU that is down)", Status(0), hv::yield_to(1));
    for vcpu in 1..=2 {
        // SAFETY: only the address of our static is taken.
        let area = unsafe { &raw mut (*SIBLING_RUNSTATES.get())[vcpu - 1] } as u64;
        // SAFETY: the area is our static, 8-byte aligned and the hypervisor's for good.
        let status = unsafe { hv::register_runstate(vcpu as u64, area) };
        check_eq!(
            format_args!("register_runstate of vCPU {vcpu}"),
            Status(0),
            status
        );
    }
    if !start_secondary(1, counting_sibling) || !start_secondary(2, counting_sibling) {
        return;
    }
    check!(
        wait_for(|| ROUNDS[1].load(Ordering::SeqCst) > 2 && ROUNDS[2].load(Ordering::SeqCst) > 2),
        "vCPUs 1 and 2 did not both run"
    );
    // All three share one CPU: each yield_to(2) must run vCPU 2 before vCPU 0 runs again,
    // which vCPU 2's run-state area shows (9.2: it is runnable while vCPU 0 runs, and its
    // entry time changes when it takes the CPU). Its own count could miss a turn: preempted
    // (another domain's timer) between its count and its yield, it spends the turn yielding.
    for named in [2, 1] {
        let mut misses = 0;
        for _ in 0..20 {
            let before = sibling_entry_time(named);
            check_eq!(
                format_args!("yield_to({named})"),
                Status(0),
                hv::yield_to(named as u64)
            );
            if sibling_entry_time(named) == before {
                misses += 1;
            }
        }
        check_eq!(
            format_args!("yield_to({named}) after which vCPU {named} had not run"),
            0,
            misses
        );
    }
    check_eq!(
        "sched_op 5",
        Status::err(Errno::ENOSYS),
        hv::sched_op(5, [1, 0, 0, 0])
    );
}

conformance_test! {
    title: "yield with a sibling ready on the same CPU gives the CPU up: another vCPU runs before it returns, every time",
    section: "3.3 sched_op",
    expect: Success,
    cmdline: "vcpus=2 affinity=0",
}
pub(super) fn yield_gives_the_cpu_up() {
    register_runstate_area(0, &RUNSTATE_0);
    if !start_secondary(1, counting_sibling) {
        return;
    }
    check!(
        wait_for(|| ROUNDS[1].load(Ordering::SeqCst) > 2),
        "vCPU 1 did not run"
    );
    // vCPU 1 counts and yields, so it is ready whenever vCPU 0 runs on their one CPU: each
    // of vCPU 0's yields must let another vCPU (vCPU 1, or another domain's on that CPU) take
    // the CPU, whatever CPU time vCPU 0 is owed, which its own run-state area shows (9.2: a
    // vCPU that yielded stays running until another vCPU takes its CPU).
    let mut kept = 0;
    for _ in 0..40 {
        let entered = vcpu0_entry_time();
        check_eq!("yield", Ok(()), lamina_guest_sdk::sched::yield_now());
        if vcpu0_entry_time() == entered {
            kept += 1;
        }
    }
    check_eq!("yields that returned with no other vCPU run", 0, kept);
}

//! A machine of one to three domains run by the real scheduler (`run_all`, or as CPU 0 of a
//! machine of two) on scripted vCPUs
//! (`common::testing::MockVcpu`) and a fake clock: what every hypercall family, multicall,
//! grant and event-channel operation, domain control, the trapping exits and teardown see
//! from guests that do anything at all.
//!
//! Each input is a script of exits per domain (hypercalls with hostile arguments, port I/O,
//! MSRs, CPUID, HLT, nested page faults...) plus bytes planted in guest RAM (multicall
//! batches whose entries point into the batch, grant-copy requests, poll lists, garbage in the
//! shared-info page and console ring). After the run the harness checks what must hold:
//! every domain ended and was torn down, all its RAM came back, no page of zeros, port, grant
//! or mapping is left, the exit counters add up, and nothing was written outside any guest's
//! RAM (guard regions). Where every guest waits for ever (a guest's choice), the live state is
//! checked (ports and grants consistent across domains) and the domains are destroyed.

use crate::common::domain::Slot;
use crate::common::domain::stats::ExitKind;
use crate::common::domain::{DOMAIN_COUNT, Domain, DomainState, Ending};
use crate::common::events::Binding;
use crate::common::grants::{WindowSlot, zero_page_testing};
use crate::common::memory::guest_memory::OwnedRam;
use crate::common::memory::nested_map::testing::fake_nested_map;
use crate::common::memory::phys;
use crate::common::output::testing::take_lines;
use crate::common::sched::{Host, Machine, run_all};
use crate::common::testing::{FAKE_TSC, FAKE_TSC_STEP, MockVcpu, Traced, take_trace};
use crate::common::time::TimeBase;
use crate::common::vcpu::{GuestRegisters, VmExit, reg};
use crate::guarded::GuardedRam;
use crate::input::Input;
use core::cell::Cell;
use core::sync::atomic::Ordering;
use lamina_abi::Hypercall;
use lamina_abi::event_channel::DOMID_SELF;
use lamina_abi::layout::{CONSOLE_RING_GPA, GRANT_WINDOW_BYTES, GRANT_WINDOW_GPA, SHARED_INFO_GPA};
use std::collections::VecDeque;

/// Where the harness plants a multicall batch in each guest.
pub const BATCH_GPA: u64 = 0x2_0000;
/// Where it plants grant-copy requests.
pub const COPY_GPA: u64 = 0x2_1000;
/// Where it plants poll lists and other small buffers.
pub const BUFFER_GPA: u64 = 0x2_2000;
const ENTRY_BYTES: u64 = size_of::<lamina_abi::multicall::MulticallEntry>() as u64;
const MAX_DOMAINS: u32 = 3;
/// More halts than this with no guest finishing: every guest waits for ever.
const HALTS_MAX: u32 = 2_000;

/// The longest the clock jumps when the CPU halts: 1000 s.
const JUMP_MAX_NS: u64 = 1_000_000_000_000;

/// Why the harness unwinds out of `run_all` (with `resume_unwind`, which does not call the
/// panic hook, libFuzzer's abort). Both come from points where the scheduler has no operation
/// half done: the top of its loop and its idle halt.
enum Unwind {
    /// Between two slices: the harness checks the live state and calls `run_all` again.
    Checkpoint,
    /// Every guest waits for ever: the real hypervisor would halt until an interrupt that
    /// never comes (a HANG that is the guests' choice, not a finding).
    Stuck,
}

/// A clock that advances a little on every reading and jumps to the armed deadline when the
/// CPU halts (1 GHz: TSC = ns).
struct FuzzHost {
    now: Cell<u64>,
    armed: Option<u64>,
    halts: u32,
    console: VecDeque<u8>,
    /// Passes since the last checkpoint: the harness unwinds at every third, an odd period,
    /// so that a pattern of two passes (a CPU of two finding a domain to tear down, then
    /// tearing it down with the table exclusive) is not cut at the same place each time the
    /// machine is started again.
    passes_since_checkpoint: u8,
    checkpoints: bool,
    /// Passes of the scheduler's loop so far.
    passes: u64,
}

/// More passes of the scheduler's loop than any script can need: it spins without progress.
const PASSES_MAX: u64 = 200_000;

/// Time a reading of the clock takes: the scheduler's slices are not all zero long.
const TICK_NS: u64 = 10_000;

impl Host for FuzzHost {
    fn now_ns(&self) -> u64 {
        // The TSC may have moved on by itself (`tsc_step`): the clock never goes back.
        let tsc = FAKE_TSC.with(|t| t.get()).unwrap_or(0);
        let now = self.now.get().max(tsc) + TICK_NS;
        self.now.set(now);
        FAKE_TSC.with(|t| t.set(Some(now)));
        now
    }
    fn arm_timer(&mut self, deadline: Option<u64>) {
        self.armed = deadline;
    }
    fn wait_for_interrupt(&mut self) {
        self.halts += 1;
        match self.armed {
            // A guest may set a timer centuries away; a machine's clock never gets there (and
            // the hypervisor's time conversions need not hold there): waiting that long is
            // waiting for ever.
            Some(deadline)
                if self.halts <= HALTS_MAX
                    && deadline - self.now.get().min(deadline) <= JUMP_MAX_NS =>
            {
                let tsc = FAKE_TSC.with(|t| t.get()).unwrap_or(0);
                self.now.set(self.now.get().max(tsc).max(deadline));
                FAKE_TSC.with(|t| t.set(Some(self.now.get())));
            }
            _ => std::panic::resume_unwind(Box::new(Unwind::Stuck)),
        }
    }
    fn service_interrupts(&mut self) {}
    fn console_input(&mut self) -> Option<u8> {
        self.console.pop_front()
    }
    fn housekeeping(&mut self) -> Option<u64> {
        // Called first thing in each pass of the scheduler's loop.
        self.passes += 1;
        assert!(
            self.passes < PASSES_MAX,
            "the scheduler spins: {} passes, {} halts, now {} ns",
            self.passes,
            self.halts,
            self.now.get()
        );
        if self.checkpoints {
            self.passes_since_checkpoint += 1;
            if self.passes_since_checkpoint == 3 {
                self.passes_since_checkpoint = 0;
                std::panic::resume_unwind(Box::new(Unwind::Checkpoint));
            }
        }
        None
    }
}

/// The state a hypercall argument is drawn against.
struct Context {
    ram: u64,
    domains: u32,
    /// The domain whose call is being drawn.
    me: u32,
}

/// An argument: mostly the values where bounds checks go wrong.
fn arg(input: &mut Input<'_>, cx: &Context) -> u64 {
    match input.u8() % 24 {
        0 => 0,
        1 => u64::MAX,
        2 => u64::from(input.u8()),
        3 => cx.ram - u64::from(input.u8() % 64), // the last bytes of RAM
        4 => cx.ram + u64::from(input.u8() % 16), // just past it
        5 => GRANT_WINDOW_GPA + u64::from(input.u16()) % (GRANT_WINDOW_BYTES / 4096 + 2) * 4096,
        6 => 0xffff_8000_0000_0000 | (input.u64() & 0xffff_ffff_f000), // hypervisor-looking
        7 => [
            1 << 63,
            u64::from(u32::MAX),
            1 << 32,
            i64::MAX as u64,
            u64::MAX - 0xfff,
        ][input.below(5) as usize], // huge lengths
        8 => u64::from(input.below(cx.domains + 2)), // domain ids, one past the last
        9 => u64::from(input.below(8)),              // ports, grant refs, small ops
        10 => DOMID_SELF,
        11 => u64::from(input.below((cx.ram / 4096) as u32)) * 4096, // a page of RAM
        12 => BATCH_GPA + u64::from(input.below(8)) * ENTRY_BYTES + u64::from(input.below(7)) * 8,
        13 => COPY_GPA + u64::from(input.below(8)) * 24,
        14 => BUFFER_GPA + u64::from(input.u8()),
        15 => SHARED_INFO_GPA + u64::from(input.u16() % 4096),
        16 => CONSOLE_RING_GPA + u64::from(input.u16() % 4096),
        17 => u64::from(input.u16()),
        18 => (input.u64() as i64 % 64) as u64, // small negative numbers
        19 => 1_000_000 * u64::from(input.u8()), // times and periods, ns
        20 => u64::from(input.below(1030)),     // around NR_PORTS
        21 => u64::from(input.below(260)),      // around the grant table's size
        _ => input.u64(),
    }
}

/// A hypercall number: the documented ones weighted, the focus family most, unknown ones too.
fn number(input: &mut Input<'_>, focus: Option<Hypercall>) -> u64 {
    let count = Hypercall::COUNT as u32;
    match (input.u8() % 16, focus) {
        (0..=7, Some(f)) => f as u64,
        (8, _) => u64::from(count + input.below(4)),
        (9, _) => input.u64(),
        _ => u64::from(input.below(count)),
    }
}

/// What an argument slot holds, for arguments that look valid (so that calls get past the
/// first checks and build up state: ports bound across domains, grants mapped...).
#[derive(Clone, Copy)]
enum Kind {
    Domain,
    Port,
    GrantRef,
    /// A page of the caller's RAM.
    Page,
    /// A page of the grant window.
    WindowPage,
    /// 0 or 1 (flags, directions, sub-operations with two values).
    Bit,
    Small,
    /// A length or count for a buffer.
    Length,
    /// An address of the buffers the harness planted.
    Buffer,
    Time,
    Any,
}

fn typed(input: &mut Input<'_>, cx: &Context, kind: Kind) -> u64 {
    // Zeros (an exhausted record) draw the valid-looking value.
    if input.u8() % 4 == 3 {
        return arg(input, cx);
    }
    match kind {
        Kind::Domain => match input.below(8) {
            6 => DOMID_SELF,
            7 => u64::from(1 + input.below(cx.domains)),
            _ => u64::from(cx.me % cx.domains + 1), // the next domain
        },
        Kind::Port => u64::from(input.below(8)),
        Kind::GrantRef => u64::from(input.below(4)),
        Kind::Page => u64::from(input.below(16)) * 4096 + 0x3_0000,
        Kind::WindowPage => GRANT_WINDOW_GPA + u64::from(input.below(4)) * 4096,
        Kind::Bit => u64::from(input.below(2)),
        Kind::Small => u64::from(input.below(8)),
        Kind::Length => u64::from(input.below(70)),
        Kind::Buffer => match input.below(3) {
            0 => BATCH_GPA,
            1 => COPY_GPA + u64::from(input.below(4)) * 24,
            _ => BUFFER_GPA,
        },
        Kind::Time => match input.below(3) {
            0 => 0,
            1 => 50_000 + u64::from(input.u16()) * 1000,
            _ => u64::from(input.u32()),
        },
        Kind::Any => arg(input, cx),
    }
}

/// The argument kinds of (hypercall, sub-operation): RSI, RDX, R10, R8.
fn layout(nr: u64, op: u64) -> [Kind; 4] {
    use Kind::*;
    match (nr, op) {
        (1, _) => [Buffer, Length, Any, Any],          // console_io
        (2, 2) => [Small, Any, Any, Any],              // shutdown
        (2, 3) => [Buffer, Small, Time, Any],          // poll
        (2, 4) => [Bit, Any, Any, Any],                // yield_to
        (3, 0) => [Domain, Any, Any, Any],             // alloc_unbound
        (3, 1) => [Small, Bit, Any, Any],              // bind_virq
        (3, 7) => [Domain, Port, Any, Any],            // bind_interdomain
        (3, 8) => [Bit, Small, Any, Any],              // bind_ipi_slot
        (3, 9) => [Small, Small, Any, Any],            // send_ipi (a mask)
        (3, _) => [Port, Any, Any, Any],               // send, close, unmask, status
        (4, 0 | 1) => [Bit, Buffer, Any, Any],         // vcpu_info, runstate
        (4, 2 | 3) => [Bit, Time, Any, Any],           // timers
        (4, _) => [Bit, Small, Any, Any],              // upcall vector
        (5, 2) => [Small, Buffer, Length, Any],        // flush_tlb (a mask)
        (5, _) => [Buffer, Small, Any, Any],           // memory map
        (6, _) => [Length, Any, Any, Any],             // multicall (RDI is the batch, RSI its count)
        (7, _) => [Domain, Bit, Buffer, Any],          // exit counters
        (8, 0) => [Domain, Page, Bit, Any],            // grant_access
        (8, 1) => [GrantRef, Any, Any, Any],           // end_access
        (8, 2) => [Domain, GrantRef, WindowPage, Bit], // map
        (8, 3) => [WindowPage, Any, Any, Any],         // unmap
        (8, _) => [Buffer, Any, Any, Any],             // copy
        (9, 0 | 5) => [Buffer, Small, Any, Any],       // list, physinfo
        (9, 1) => [Domain, Small, Buffer, Length],     // read_console
        (9, _) => [Domain, Any, Any, Any],             // pause, unpause, destroy
        _ => [Any; 4],
    }
}

fn regs_for_hypercall(input: &mut Input<'_>, cx: &Context, nr: u64) -> GuestRegisters {
    let mut regs = GuestRegisters::default();
    regs.gpr[reg::RAX] = nr;
    // The sub-operation (for multicall: the batch), then its arguments.
    let op = match (nr, input.u8() % 4) {
        (_, 0) => arg(input, cx),
        (6, _) => BATCH_GPA + u64::from(input.below(3)) * ENTRY_BYTES,
        _ => u64::from(input.below(8)),
    };
    regs.gpr[reg::RDI] = op;
    let kinds = layout(nr, op);
    for (r, kind) in [reg::RSI, reg::RDX, reg::R10, reg::R8]
        .into_iter()
        .zip(kinds)
    {
        regs.gpr[r] = typed(input, cx, kind);
    }
    regs
}

const MSRS: [u32; 14] = [
    0x1b,
    0x6e0,
    0x802,
    0x808,
    0x80b,
    0x80f,
    0x830,
    0x832,
    0x838,
    0x83e,
    0x3f,
    0x10,
    0xc000_0080,
    0x277,
];

/// One exit of the script.
fn exit(input: &mut Input<'_>, cx: &Context, focus: Option<Hypercall>) -> (VmExit, GuestRegisters) {
    let mut regs = GuestRegisters::default();
    let kind = input.u8();
    let exit = match kind % 32 {
        0..=19 => {
            let nr = number(input, focus);
            return (VmExit::Hypercall, regs_for_hypercall(input, cx, nr));
        }
        20 | 21 => {
            regs.gpr[reg::RAX] = input.u64();
            let port = match input.u8() % 4 {
                0 => input.u16(),
                _ => 0x3f8 + input.below(8) as u16,
            };
            let size = [1, 2, 4, input.u8()][input.below(4) as usize];
            VmExit::Io {
                port,
                size,
                write: input.bool(),
            }
        }
        22 | 23 => {
            regs.gpr[reg::RCX] = match input.u8() % 4 {
                0 => u64::from(input.u32()),
                1 => 0x800 + u64::from(input.u8()),
                _ => u64::from(MSRS[input.below(MSRS.len() as u32) as usize]),
            };
            regs.gpr[reg::RAX] = arg(input, cx);
            regs.gpr[reg::RDX] = arg(input, cx);
            if kind % 32 == 22 {
                VmExit::MsrRead
            } else {
                VmExit::MsrWrite
            }
        }
        24 => {
            regs.gpr[reg::RAX] = match input.u8() % 4 {
                0 => u64::from(input.u32()),
                1 => 0x4000_0000 + u64::from(input.below(8)),
                2 => 0x8000_0000 + u64::from(input.below(9)),
                _ => u64::from(input.below(0x20)),
            };
            regs.gpr[reg::RCX] = u64::from(input.below(4));
            VmExit::Cpuid
        }
        25 => VmExit::Hlt,
        26 => VmExit::InvalidOpcode,
        27 => VmExit::NestedPageFault {
            gpa: arg(input, cx),
            write: input.bool(),
        },
        28 => VmExit::ExternalInterrupt,
        29 => VmExit::InterruptWindow,
        30 if input.u8() % 8 == 0 => VmExit::TripleFault,
        30 => VmExit::Hlt,
        _ if input.u8() % 8 == 0 => VmExit::Unexpected {
            code: input.u64(),
            info1: input.u64(),
            info2: input.u64(),
        },
        _ => VmExit::InterruptWindow,
    };
    (exit, regs)
}

/// Plants one thing a call will point at: a multicall batch entry, a grant-copy request, a
/// poll list, or garbage in the shared pages.
fn plant(input: &mut Input<'_>, ram: &GuardedRam, cx: &Context, focus: Option<Hypercall>) {
    let mem = ram.memory();
    let what = match input.u8() % 4 {
        // Mostly batch entries where batches are the focus.
        2 if focus == Some(Hypercall::Multicall) => 0,
        what => what,
    };
    match what {
        0 => {
            let at = BATCH_GPA + u64::from(input.below(8)) * ENTRY_BYTES;
            let nr = number(input, focus);
            let regs = regs_for_hypercall(input, cx, nr);
            let words = [
                nr,
                regs.gpr[reg::RDI],
                regs.gpr[reg::RSI],
                regs.gpr[reg::RDX],
                regs.gpr[reg::R10],
                regs.gpr[reg::R8],
                0xdead,
            ];
            for (w, value) in words.iter().enumerate() {
                let _ = mem.write_u64(at + 8 * w as u64, *value);
            }
        }
        1 => {
            let mut request = [0u8; 24];
            let at = COPY_GPA + u64::from(input.below(4)) * 24;
            request[0..2].copy_from_slice(&(input.below(cx.domains + 2) as u16).to_le_bytes());
            request[2] = if input.u8() % 8 == 7 {
                input.u8()
            } else {
                input.below(2) as u8
            };
            request[3] = if input.u8() % 16 == 15 { input.u8() } else { 0 };
            request[4..8].copy_from_slice(&input.below(6).to_le_bytes());
            request[8..12].copy_from_slice(&(typed(input, cx, Kind::Length) as u32).to_le_bytes());
            request[12..16].copy_from_slice(&(typed(input, cx, Kind::Length) as u32).to_le_bytes());
            request[16..24].copy_from_slice(&typed(input, cx, Kind::Page).to_le_bytes());
            let _ = mem.write(at, &request);
        }
        2 => {
            for i in 0..4 {
                let _ = mem.write(BUFFER_GPA + 4 * i, &input.below(8).to_le_bytes());
            }
        }
        _ => {
            let at = match input.u8() % 4 {
                0 => SHARED_INFO_GPA + u64::from(input.u16() % 4096),
                1 => CONSOLE_RING_GPA + u64::from(input.u16() % 4096),
                2 => BUFFER_GPA + u64::from(input.u8()),
                _ => u64::from(input.below(cx.ram as u32)),
            };
            let bytes = input.rest();
            let _ = mem.write(at, bytes);
        }
    }
}

/// Bytes of the input before the records: the machine.
const HEADER_BYTES: usize = 8;

/// How far each read of the TSC moves it on, from the header's last byte (no other use of the
/// header reaches it): the hypervisor's own work takes time, so a deadline or the end of a
/// slice can pass inside one exit, e.g. between two entries of a multicall, which then stops
/// and is finished before the vCPU runs on (docs/abi.md 12). Half the inputs keep a TSC that
/// stands still inside an exit.
fn tsc_step(header: &[u8]) -> u64 {
    match header.get(HEADER_BYTES - 1).map_or(0, |b| b % 8) {
        4 => 1_000,
        5 => 20_000,
        6 => 200_000,
        7 => 2_000_000,
        _ => 0,
    }
}
/// Bytes of a record: one exit of one domain's script, or one thing planted in its RAM. Fixed
/// size, so that a mutation of one record leaves the others as they were.
const RECORD_BYTES: usize = 16;
/// Exits per domain at most (past them, records are ignored).
const SCRIPT_MAX: usize = 64;

/// Runs one input; `focus` weights one hypercall family. Panics on any broken invariant.
pub fn run(data: &[u8], focus: Option<Hypercall>) {
    let (header, records) = data.split_at(data.len().min(HEADER_BYTES));
    let mut input = Input::new(header);
    // Per-thread test state from the previous input.
    take_trace();
    take_lines();
    FAKE_TSC.with(|t| t.set(Some(0)));
    FAKE_TSC_STEP.with(|s| s.set(tsc_step(header)));
    zero_page_testing::LIVE.with(|l| l.set(0));
    zero_page_testing::FAIL.with(|f| f.set(input.u8() % 16 == 15));
    let domains = 1 + (1 + input.below(MAX_DOMAINS)) % MAX_DOMAINS; // two unless told
    DOMAIN_COUNT.store(domains, Ordering::Relaxed);
    let ram_byte = input.u8();
    // Half the inputs run the machine as a hypervisor on two CPUs would (domain locks taken
    // per exit, a run queue per CPU, vCPUs taken from the other CPU's queue), on this one
    // thread as CPU 0.
    let two_cpus = ram_byte & 0x10 != 0;
    let ram_size = if ram_byte % 4 == 3 {
        4 << 20
    } else {
        1 << 20
    };
    let mut cx = Context {
        ram: ram_size,
        domains,
        me: 1,
    };
    let managed = u64::from(domains) * ram_size;
    phys::testing::set(managed, 0);

    let rams: Vec<GuardedRam> = (0..domains).map(|_| GuardedRam::new(ram_size)).collect();
    let mut scripts: Vec<Vec<(VmExit, GuestRegisters)>> = vec![Vec::new(); domains as usize];
    for record in records.chunks(RECORD_BYTES) {
        let mut input = Input::new(record);
        let who = (input.u8() as u32 % domains) as usize;
        cx.me = who as u32 + 1;
        let how = input.u8() % 8;
        // Batches need entries planted before they are worth running.
        let plants = how == 7 || (how == 6 && focus == Some(Hypercall::Multicall));
        if plants {
            plant(&mut input, &rams[who], &cx, focus);
        } else if scripts[who].len() < SCRIPT_MAX {
            scripts[who].push(exit(&mut input, &cx, focus));
            // Preempted after it (the host timer): the other domains run in between, so
            // their calls interleave.
            if how < 4 {
                scripts[who].push((VmExit::ExternalInterrupt, GuestRegisters::default()));
            }
        }
    }
    let mut slots: Vec<Slot<MockVcpu>> = Vec::new();
    for (i, ram) in rams.iter().enumerate() {
        let id = i as u32 + 1;
        let flags = input.u8();
        // Some domains have a second vCPU, down until a `vcpu_op` brings it up (docs/abi.md
        // 19): the calls on it (initialise, up, down, is_up, the per-vCPU ones) then reach a
        // vCPU that exists.
        let two_vcpus = flags & 0x80 != 0;
        let mut domain = Domain::with_vcpus(
            id,
            format!("f{id}"),
            ram.memory(),
            TimeBase::new(1_000_000_000, 0, 0, 0),
            if two_vcpus { 2 } else { 1 },
        );
        domain.privileged = flags & 1 == 0;
        domain.weight = [256, 1, 65535, 256][usize::from(flags >> 1 & 3)];
        domain.ram = Some(OwnedRam::new(0, ram_size, phys::testing::release));
        domain.nested = Some(fake_nested_map().0);
        // Every guest ends, unless it waits for ever (then `Stuck`).
        let mut poweroff = GuestRegisters::default();
        poweroff.gpr[reg::RAX] = Hypercall::SchedOp as u64;
        poweroff.gpr[reg::RDI] = 2;
        scripts[i].push((VmExit::Hypercall, poweroff));
        let vcpu = MockVcpu {
            script: scripts[i].iter().copied().collect(),
            interrupt_flag: true,
            // Rare, and not what an exhausted input (zeros) gives.
            cpl: if flags >> 3 & 15 == 15 { 3 } else { 0 },
            tag: id,
            ..Default::default()
        };
        let mut vcpus = vec![Some(Box::new(vcpu))];
        if two_vcpus {
            // Once up: a yield, then it takes itself down (up again, it halts with
            // interrupts off, which stops its domain, as the ABI says).
            let call = |rdi: u64, rsi: u64, nr: Hypercall| {
                let mut regs = GuestRegisters::default();
                regs.gpr[reg::RAX] = nr as u64;
                regs.gpr[reg::RDI] = rdi;
                regs.gpr[reg::RSI] = rsi;
                (VmExit::Hypercall, regs)
            };
            vcpus.push(Some(Box::new(MockVcpu {
                script: [
                    call(0, 0, Hypercall::SchedOp),
                    call(7, 1, Hypercall::VcpuOp),
                ]
                .into_iter()
                .collect(),
                interrupt_flag: true,
                tag: id + 100,
                ..Default::default()
            })));
        }
        slots.push(Slot { domain, vcpus });
    }
    let mut host = FuzzHost {
        now: Cell::new(0),
        armed: None,
        halts: 0,
        console: [input.u8()].into_iter().filter(|&b| b != 0).collect(),
        passes_since_checkpoint: 0,
        checkpoints: true,
        passes: 0,
    };
    loop {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_machine(&mut slots, &mut host, two_cpus)
        }));
        let Err(payload) = outcome else {
            break;
        };
        match payload.downcast::<Unwind>().map(|u| *u) {
            Ok(Unwind::Checkpoint) => check_live(&slots, &rams),
            Ok(Unwind::Stuck) => {
                check_live(&slots, &rams);
                // What a supervisor would do: destroy them all; everything must come back.
                for slot in slots.iter_mut() {
                    slot.domain.end(Ending::Destroyed);
                }
                host.checkpoints = false;
                run_machine(&mut slots, &mut host, two_cpus);
                break;
            }
            Err(other) => std::panic::resume_unwind(other),
        }
    }
    check_after(&slots, &rams, managed, &scripts);
}

/// Runs every domain until all ended: on one CPU (`run_all`), or as CPU 0 of two.
fn run_machine<H: Host>(slots: &mut [Slot<MockVcpu>], host: &mut H, two_cpus: bool) {
    if two_cpus {
        let machine = Machine::new(slots);
        machine.set_cpus_online(2);
        machine.run_cpu(0, host);
    } else {
        // A previous input's two CPUs are not this one's.
        crate::common::cpus::set_several(false);
        run_all(slots, host);
    }
}

/// Ports and grants agree across the domains still alive.
fn check_live(slots: &[Slot<MockVcpu>], rams: &[GuardedRam]) {
    let alive = |id: u32| {
        slots
            .iter()
            .map(|s| &s.domain)
            .find(|d| d.id == id && !d.torn_down)
    };
    for (slot, ram) in slots.iter().zip(rams) {
        let d = &slot.domain;
        ram.check_guards(&format!("domain {}", d.id));
        if d.torn_down {
            continue;
        }
        if let Err(why) = d.events.check_consistency() {
            panic!("domain {}: event channels: {why}", d.id);
        }
        let own = d.id as u16;
        for (port, binding) in d.events.bindings() {
            if let Binding::Interdomain {
                remote,
                remote_port,
            } = binding
                && let Some(peer) = alive(u32::from(remote))
            {
                let back = peer.events.bindings().find(|(p, _)| *p == remote_port);
                let expected = Binding::Interdomain {
                    remote: own,
                    remote_port: port,
                };
                assert_eq!(
                    back.map(|(_, b)| b),
                    Some(expected),
                    "domain {own} port {port} is connected to domain {remote} port {remote_port}, which is not connected back"
                );
            }
        }
        for (reference, grant) in d.grants.grants_in_use() {
            assert!(
                grant.page_gpa % 4096 == 0 && grant.page_gpa + 4096 <= ram.size(),
                "domain {} grant {reference} names a page outside its RAM: {grant:?}",
                d.id
            );
            let mapped = alive(grant.grantee).map_or(0, |grantee| {
                grantee
                    .grants
                    .window_slots()
                    .filter(|(_, s)| {
                        matches!(s, WindowSlot::Grant { granter, grant_ref, .. }
                            if *granter == d.id && *grant_ref == reference)
                    })
                    .count()
            });
            assert_eq!(
                grant.map_count as usize, mapped,
                "domain {} grant {reference}: map_count against the grantee's window",
                d.id
            );
        }
        for (gpa, mapping) in d.grants.window_slots() {
            assert!(
                (GRANT_WINDOW_GPA..GRANT_WINDOW_GPA + GRANT_WINDOW_BYTES).contains(&gpa),
                "domain {}: window slot at {gpa:#x}",
                d.id
            );
            if let WindowSlot::Grant {
                granter, grant_ref, ..
            } = mapping
            {
                let grant = alive(granter).and_then(|g| {
                    g.grants
                        .grants_in_use()
                        .find(|(r, _)| *r == grant_ref)
                        .map(|(_, g)| g)
                });
                assert!(
                    matches!(grant, Some(g) if g.grantee == d.id),
                    "domain {} maps grant {grant_ref} of domain {granter}, which is not its: {grant:?}",
                    d.id
                );
            }
        }
    }
}

/// After the run: everything ended, was torn down and came back; counters add up.
fn check_after(
    slots: &[Slot<MockVcpu>],
    rams: &[GuardedRam],
    managed: u64,
    scripts: &[Vec<(VmExit, GuestRegisters)>],
) {
    let trace = take_trace();
    let lines = take_lines();
    if std::env::var_os("LAMINA_FUZZ_TRACE").is_some() {
        for slot in slots {
            let id = slot.domain.id;
            // LAMINA_FUZZ_TRACE=1: each exit of the script and RAX after it.
            let results = crate::common::testing::results_of(&trace, id);
            for ((exit, regs), result) in scripts[id as usize - 1].iter().zip(&results) {
                let g = &regs.gpr;
                eprintln!(
                    "d{id} {exit:?} rax={:#x} rdi={:#x} rsi={:#x} rdx={:#x} r10={:#x} r8={:#x} rcx={:#x} -> {result}",
                    g[reg::RAX],
                    g[reg::RDI],
                    g[reg::RSI],
                    g[reg::RDX],
                    g[reg::R10],
                    g[reg::R8],
                    g[reg::RCX]
                );
            }
            eprintln!("d{id} ended {:?}", slot.domain.state);
        }
        for line in &lines {
            eprintln!("{line}");
        }
    }
    for (slot, ram) in slots.iter().zip(rams) {
        let d = &slot.domain;
        ram.check_guards(&format!("domain {}", d.id));
        assert!(
            matches!(d.state, DomainState::Ended(_)),
            "domain {} still {:?}",
            d.id,
            d.state
        );
        assert!(
            d.torn_down && slot.vcpus.is_empty() && d.ram.is_none() && d.nested.is_none(),
            "domain {} not fully torn down",
            d.id
        );
        assert_eq!(d.memory.size(), 0, "domain {} still reaches RAM", d.id);
        assert_eq!(
            d.events.bindings().count(),
            0,
            "domain {}: ports left after teardown",
            d.id
        );
        if let Err(why) = d.events.check_consistency() {
            panic!("domain {}: event channels after teardown: {why}", d.id);
        }
        assert_eq!(
            d.grants.grants_in_use().count() + d.grants.window_slots().count(),
            0,
            "domain {}: grants or mappings left after teardown",
            d.id
        );
        let stats = d.exit_stats();
        let counters = stats.to_counters();
        assert_eq!(
            counters.by_hypercall.iter().sum::<u64>(),
            stats.of(ExitKind::Hypercall),
            "domain {}: hypercalls by number against hypercall exits",
            d.id
        );
        let runs = trace
            .iter()
            // Every vCPU of the domain: vCPU 0 is tagged with the id, vCPU 1 with id + 100.
            .filter(|t| matches!(t, Traced::Ran(tag, _) if *tag == d.id || *tag == d.id + 100))
            .count() as u64;
        assert_eq!(
            counters.total, runs,
            "domain {}: exits counted against exits taken",
            d.id
        );
        // At most once: a checkpoint that unwinds out of `run_all` while a RAM is being
        // scrubbed drops the scrub, which returns the rest of the RAM (checked below) without
        // its report line.
        let torn = format!("lamina: domain {} f{} torn down:", d.id, d.id);
        assert!(
            lines.iter().filter(|l| l.starts_with(&torn)).count() <= 1,
            "domain {} reported torn down more than once: {lines:?}",
            d.id
        );
    }
    assert_eq!(
        phys::figures(),
        (managed, managed),
        "every domain's RAM came back"
    );
    assert_eq!(
        zero_page_testing::LIVE.with(|l| l.get()),
        0,
        "pages of zeros left"
    );
}

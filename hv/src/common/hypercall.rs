//! Hypercall dispatch and the handlers of ABI 1.0 (docs/abi.md sections 3, 8, 9, 11, 12);
//! domain control (17) is in [`crate::common::domain::domctl`].
//!
//! Every argument is validated here before use: unknown numbers and sub-operations are
//! `-ENOSYS`, bad values `-EINVAL`, buffers outside the caller's RAM `-EFAULT`, callers above
//! CPL 0 `-EPERM`. Guest buffers are copied in once through [`GuestMemory`].

use crate::common::domain::{ConsoleSource, Domain, DomainTable, Ending, domain_exists};
use crate::common::events::Binding;
use crate::common::time::read_tsc;
use crate::common::vcpu::state::{PENDING_TLB_FLUSH_MAX, PollPorts, StartState, Wait, request};
use crate::common::vcpu::{VirtualCpu, is_canonical, reg};
use alloc::boxed::Box;
use alloc::string::String;
use lamina_abi::console::{CONSOLE_RING_INPUT_BYTES, CONSOLE_WRITE_MAX, ConsoleOp, ConsoleRing};
use lamina_abi::event_channel::{DOMID_SELF, EventChannelOp, NR_PORTS};
use lamina_abi::layout::CONSOLE_RING_GPA;
use lamina_abi::memory::{FLUSH_ADDRESSES_MAX, MemoryOp, MemoryRegion};
use lamina_abi::multicall::{MULTICALL_MAX, MulticallEntry};
use lamina_abi::sched::{POLL_PORTS_MAX, SchedOp, ShutdownReason};
use lamina_abi::stats::{ExitCounters, StatsOp};
use lamina_abi::vcpu::{PERIOD_MIN_NS, VcpuOp, VcpuStartState, runstate};
use lamina_abi::{Errno, Hypercall};

/// What the vCPU does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Re-enter the same vCPU.
    Resume,
    /// Let other vCPUs run first.
    Yield,
    /// The vCPU waits (its [`Wait`] says for what); RAX already holds the result it will see.
    Sleep,
    /// The domain ended.
    Stop,
    /// The hypercall is not finished: let other vCPUs run, then execute the same instruction
    /// again (RIP stays on it).
    Again,
}

enum Done {
    Return(u64),
    /// Not finished: made again, from the same instruction, once the vCPU was rescheduled.
    Again,
    Yield,
    Sleep,
    Ended,
    /// Stopped before it did anything (or a batch before an entry) because a domain it needs
    /// was busy ([`DomainTable::busy`]): RAX and RIP are left alone, and the scheduler makes it
    /// again ([`finish`]) once it holds that domain.
    Unfinished,
    /// A batch stopped between entries because its slice is over ([`VcpuState::slice_end_tsc`]):
    /// RAX and RIP are left alone, and the scheduler finishes it ([`finish_preempted`])
    /// before the vCPU next runs guest code.
    ///
    /// [`VcpuState::slice_end_tsc`]: crate::common::vcpu::state::VcpuState::slice_end_tsc
    Preempted,
}

/// A `multicall` stopped before entry `next` ([`DomainTable::admit`]): its copy of the
/// batch, from which it goes on once the scheduler holds what that entry needs. The batch is
/// never read from guest memory again (docs/abi.md 2.5, 12). Also a batch preempted at the end
/// of its slice ([`VcpuState::preempted_batch`]).
///
/// [`VcpuState::preempted_batch`]: crate::common::vcpu::state::VcpuState::preempted_batch
#[derive(Debug)]
pub struct UnfinishedBatch {
    gpa: u64,
    count: u64,
    next: u64,
    entries: [MulticallEntry; MULTICALL_MAX as usize],
}

/// Handles the hypercall in the registers of vCPU `vcpu_index`, already counted. RIP is left
/// alone.
#[inline(always)]
pub fn handle<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    peers: &mut dyn DomainTable,
) -> Next {
    let nr = vcpu.regs().gpr[reg::RAX];
    if answer_quickly(nr, vcpu) {
        return Next::Resume;
    }
    let cpl = vcpu.cpl();
    let regs = vcpu.regs();
    let args = [
        regs.gpr[reg::RDI],
        regs.gpr[reg::RSI],
        regs.gpr[reg::RDX],
        regs.gpr[reg::R10],
        regs.gpr[reg::R8],
    ];
    let result = if cpl != 0 {
        Err(Errno::EPERM)
    } else {
        dispatch(domain, vcpu_index, nr, &args, peers)
    };
    let (rax, next) = match result {
        Ok(Done::Return(value)) => (value, Next::Resume),
        Ok(Done::Yield) => {
            domain.vcpus[vcpu_index].yielded = true;
            (0, Next::Yield)
        }
        Ok(Done::Sleep) => (0, Next::Sleep),
        Ok(Done::Ended) => return Next::Stop,
        // Made again from the same instruction (RIP stays on it), by the guest or by the
        // scheduler ([`finish`]).
        Ok(Done::Again) | Ok(Done::Unfinished) | Ok(Done::Preempted) => return Next::Again,
        Err(errno) => (errno.to_return_value(), Next::Resume),
    };
    vcpu.regs().gpr[reg::RAX] = rax;
    next
}

/// Makes the hypercall in the registers of vCPU `vcpu_index` again after it stopped
/// unfinished ([`DomainTable::busy`]), already counted, now with `peers` (the domain it
/// needs locked, or the whole table), and moves RIP past it as `exits::hypercall_exit` does.
pub fn finish<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    peers: &mut dyn DomainTable,
) -> Next {
    match handle(domain, vcpu_index, vcpu, peers) {
        Next::Stop => Next::Stop,
        Next::Again => Next::Yield,
        next => {
            vcpu.skip_instruction();
            next
        }
    }
}

/// Whether vCPU `vcpu_index` stopped in a `multicall` at the end of its last slice
/// ([`Done::Preempted`]) that [`finish_preempted`] must finish before it runs guest code: its
/// registers still hold that call. A batch they do not hold is dropped, never made from them.
pub fn has_preempted_batch<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
) -> bool {
    let Some(batch) = domain.vcpus[vcpu_index].preempted_batch.as_deref() else {
        return false;
    };
    let regs = vcpu.regs();
    let same_call = regs.gpr[reg::RAX] == Hypercall::Multicall as u64
        && regs.gpr[reg::RDI] == batch.gpa
        && regs.gpr[reg::RSI] == batch.count;
    if !same_call {
        // Cannot happen: nothing runs the guest in between, and a new start state drops it.
        domain.vcpus[vcpu_index].preempted_batch = None;
    }
    same_call
}

/// Finishes the `multicall` vCPU `vcpu_index` was preempted in, before it runs guest code
/// again, under the locks the call's exit would take (`peers`): from the entry after the last
/// that ran, with the copy made when the call began; not counted again. Returns what the vCPU
/// does next, as [`finish`] (preempted again: [`Next::Yield`], RIP still on the call), or
/// `None` when it has no such batch ([`has_preempted_batch`]).
///
/// Not through [`dispatch`]: a look for a preempted batch in [`multicall`] made every batch
/// dearer (12 instructions a call and 2 an entry of `multicall_32`, registers spent on it).
/// Stopped before an entry whose domain is busy ([`DomainTable::busy`]), it keeps its copy
/// in `peers` and returns [`Next::Again`]: the caller makes it again with [`finish`].
#[cold]
#[inline(never)]
pub fn finish_preempted<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    peers: &mut dyn DomainTable,
) -> Option<Next> {
    if !has_preempted_batch(domain, vcpu_index, vcpu) {
        return None;
    }
    let batch = domain.vcpus[vcpu_index].preempted_batch.take()?;
    let rax = match go_on_preempted(domain, vcpu_index, batch, peers) {
        Ok(Done::Return(run)) => run,
        Ok(Done::Ended) => return Some(Next::Stop),
        Ok(Done::Preempted) => return Some(Next::Yield),
        Ok(Done::Unfinished) => return Some(Next::Again),
        // A batch returns nothing else; as `handle` would.
        Ok(Done::Again) => return Some(Next::Yield),
        Ok(Done::Yield) | Ok(Done::Sleep) => 0,
        Err(errno) => errno.to_return_value(),
    };
    vcpu.regs().gpr[reg::RAX] = rax;
    vcpu.skip_instruction();
    Some(Next::Resume)
}

/// The hot path (benchmarks' null hypercall): `version` and undefined numbers need no
/// arguments and no state of the domain, so they are answered before anything else is
/// loaded, without the domain-table lock. Returns whether `nr` was one of them (RAX is set).
#[inline(always)]
pub fn answer_quickly<V: VirtualCpu>(nr: u64, vcpu: &mut V) -> bool {
    let rax = match nr {
        0 => u64::from(lamina_abi::abi_version()),
        nr if nr >= Hypercall::COUNT as u64 => Errno::ENOSYS.to_return_value(),
        _ => return false,
    };
    let rax = if vcpu.cpl() != 0 {
        Errno::EPERM.to_return_value()
    } else {
        rax
    };
    vcpu.regs().gpr[reg::RAX] = rax;
    true
}

/// Every hypercall's handler by number: a jump to each (its own frame, the size it needs),
/// so that a cheap call pays for no other's registers and stack (a batch's entries come here
/// one by one).
#[inline(never)]
fn dispatch(
    domain: &mut Domain,
    vcpu: usize,
    nr: u64,
    args: &[u64; 5],
    peers: &mut dyn DomainTable,
) -> Result<Done, Errno> {
    match Hypercall::try_from(nr)? {
        Hypercall::Version => Ok(Done::Return(lamina_abi::abi_version().into())),
        Hypercall::ConsoleIo => console_io(domain, args),
        Hypercall::SchedOp => sched_op(domain, vcpu, args),
        Hypercall::EventChannelOp => event_channel_call(domain, args, peers),
        Hypercall::VcpuOp => vcpu_op(domain, vcpu, args),
        Hypercall::MemoryOp => memory_call(domain, args),
        Hypercall::Multicall => multicall(domain, vcpu, args, peers),
        Hypercall::StatsOp => stats_call(domain, args, peers),
        Hypercall::GrantTableOp => grant_table_call(domain, args, peers),
        Hypercall::DomctlOp => domctl_call(domain, vcpu, args, peers),
        _ => Err(Errno::ENOSYS),
    }
}

#[inline(never)]
fn event_channel_call(
    domain: &mut Domain,
    args: &[u64; 5],
    peers: &mut dyn DomainTable,
) -> Result<Done, Errno> {
    event_channel_op(domain, args, peers).map(Done::Return)
}

#[inline(never)]
fn memory_call(domain: &mut Domain, args: &[u64; 5]) -> Result<Done, Errno> {
    memory_op(domain, args).map(Done::Return)
}

#[inline(never)]
fn stats_call(
    domain: &mut Domain,
    args: &[u64; 5],
    peers: &mut dyn DomainTable,
) -> Result<Done, Errno> {
    stats_op(domain, args, peers).map(Done::Return)
}

/// Grant copy reaches domains as it goes: a busy one stops it before it acts.
#[inline(never)]
fn grant_table_call(
    domain: &mut Domain,
    args: &[u64; 5],
    peers: &mut dyn DomainTable,
) -> Result<Done, Errno> {
    let result = crate::common::grants::grant_table_op(domain, *args, peers);
    if peers.busy() {
        return Ok(Done::Unfinished);
    }
    result.map(Done::Return)
}

/// The domain lists reach domains as they go: a busy one stops them before they act.
#[inline(never)]
fn domctl_call(
    domain: &mut Domain,
    vcpu: usize,
    args: &[u64; 5],
    peers: &mut dyn DomainTable,
) -> Result<Done, Errno> {
    let result = crate::common::domain::domctl::domctl_op(domain, vcpu, *args, peers);
    if peers.busy() {
        return Ok(Done::Unfinished);
    }
    match result? {
        Some(value) => Ok(Done::Return(value)),
        None => Ok(Done::Again),
    }
}

#[inline(never)]
fn console_io(domain: &mut Domain, &[op, gpa, len, ..]: &[u64; 5]) -> Result<Done, Errno> {
    let op = ConsoleOp::try_from(op)?;
    if len > CONSOLE_WRITE_MAX {
        return Err(Errno::EINVAL);
    }
    if len == 0 {
        // An empty buffer is never out of bounds, wherever it points (docs/abi.md 2.5).
        return Ok(Done::Return(0));
    }
    match op {
        ConsoleOp::Write => {
            // Refused before anything is copied: a domain over its budget costs little.
            domain.memory.check(gpa, len)?;
            let time = &domain.time;
            if !domain
                .console
                .budget
                .take(len, || time.ns_at(crate::common::time::read_tsc()))
            {
                // Over its console budget (docs/abi.md 13.1): nothing printed.
                domain.console.refused_bytes += len;
                return Err(Errno::EAGAIN);
            }
            // Copied once from guest memory (and never zeroed first): what follows may not
            // see the guest change it half-way.
            let mut buffer = [core::mem::MaybeUninit::<u8>::uninit(); CONSOLE_WRITE_MAX as usize];
            let bytes = domain
                .memory
                .read_uninit(gpa, &mut buffer[..len as usize])?;
            domain
                .console
                .write(ConsoleSource::Paravirtual, domain.id, bytes);
            Ok(Done::Return(len))
        }
        ConsoleOp::Read => {
            domain.memory.check(gpa, len)?;
            let mut buffer = [0u8; CONSOLE_WRITE_MAX as usize];
            let bytes = &mut buffer[..len as usize];
            let read = read_console_input(domain, bytes);
            domain.memory.write(gpa, &bytes[..read])?;
            Ok(Done::Return(read as u64))
        }
        _ => Err(Errno::ENOSYS),
    }
}

/// Takes waiting console input out of the ring's input buffer (docs/abi.md 13).
fn read_console_input(domain: &mut Domain, out: &mut [u8]) -> usize {
    const CONS: u64 = core::mem::offset_of!(ConsoleRing, in_cons) as u64;
    const PROD: u64 = core::mem::offset_of!(ConsoleRing, in_prod) as u64;
    const _: () = assert!(PROD == CONS + 4, "one 8-byte read takes both indices");
    let mem = &domain.memory;
    let Ok(indices) = mem.read_u64(CONSOLE_RING_GPA + CONS) else {
        return 0;
    };
    let (cons, prod) = (indices as u32, (indices >> 32) as u32);
    let waiting = (prod.wrapping_sub(cons) as usize)
        .min(CONSOLE_RING_INPUT_BYTES)
        .min(out.len());
    for (i, byte) in out[..waiting].iter_mut().enumerate() {
        let at = (cons as usize + i) % CONSOLE_RING_INPUT_BYTES;
        let mut one = [0u8];
        if mem.read(CONSOLE_RING_GPA + at as u64, &mut one).is_err() {
            return 0;
        }
        *byte = one[0];
    }
    let _ = mem.write(
        CONSOLE_RING_GPA + CONS,
        &cons.wrapping_add(waiting as u32).to_le_bytes(),
    );
    waiting
}

#[inline(never)]
fn sched_op(
    domain: &mut Domain,
    vcpu: usize,
    &[op, arg, count, deadline, _]: &[u64; 5],
) -> Result<Done, Errno> {
    let op = SchedOp::try_from(op)?;
    if matches!(
        op,
        SchedOp::Yield | SchedOp::Block | SchedOp::Poll | SchedOp::YieldTo
    ) {
        // A vCPU about to give up the CPU has its console ring printed (docs/abi.md 13).
        domain.drain_console_ring();
    }
    match op {
        SchedOp::Yield => Ok(Done::Yield),
        SchedOp::YieldTo => {
            let target = domain.events.check_vcpu(arg)?;
            if target == vcpu {
                return Err(Errno::EINVAL);
            }
            // Ready and descheduled (RUNNABLE: preempted or yielded, not on a CPU): it
            // runs next, as a woken vCPU does (docs/abi.md 3.3).
            let state = &mut domain.vcpus[target];
            if state.is_runnable() && state.runstate.state() == runstate::RUNNABLE {
                state.yielded_to = true;
            }
            Ok(Done::Yield)
        }
        SchedOp::Shutdown => {
            let ending = match ShutdownReason::try_from(arg)? {
                ShutdownReason::Poweroff => Ending::Poweroff,
                ShutdownReason::Reboot => Ending::Reboot,
                ShutdownReason::Crash => Ending::Crash,
                _ => return Err(Errno::EINVAL),
            };
            domain.end(ending);
            Ok(Done::Ended)
        }
        SchedOp::Block => {
            domain.events.set_upcall_mask(&domain.memory, vcpu, false)?;
            let (pending, _) = domain.events.upcall_flags(&domain.memory, vcpu)?;
            domain.vcpus[vcpu].requests.make(request::EVENT);
            if pending {
                return Ok(Done::Return(0));
            }
            if !domain
                .events
                .can_wake(vcpu, domain.vcpus[vcpu].timers.armed())
                && !domain.has_other_vcpu_up(vcpu)
            {
                domain.end(Ending::Fault(String::from(
                    crate::common::domain::NEVER_WAKES,
                )));
                return Ok(Done::Ended);
            }
            domain.vcpus[vcpu].wait = Wait::Block;
            Ok(Done::Sleep)
        }
        SchedOp::Poll => {
            if count == 0 || count > POLL_PORTS_MAX {
                return Err(Errno::EINVAL);
            }
            // Read a chunk at a time into a small buffer: a poll of a port or two (the
            // common case) neither zeroes the whole 512-byte array nor allocates.
            const CHUNK: u64 = 16;
            let mut ports = PollPorts::new();
            let mut raw = [0u8; 4 * CHUNK as usize];
            let mut read = 0;
            while read < count {
                let take = (count - read).min(CHUNK);
                let raw = &mut raw[..4 * take as usize];
                domain.memory.read(arg.wrapping_add(4 * read), raw)?;
                // Pushed one by one: `extend` works out size hints first (70 instructions
                // for one port).
                for c in raw.chunks_exact(4) {
                    ports.push(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                }
                read += take;
            }
            if ports.iter().any(|&p| p >= NR_PORTS) {
                return Err(Errno::EINVAL);
            }
            for &port in &ports {
                if domain.events.is_pending(&domain.memory, port)? {
                    return Ok(Done::Return(0));
                }
            }
            let deadline = (deadline != 0).then_some(deadline);
            // The clock only for a deadline (a poll without one, as the event ping-pong's,
            // saves its read and conversion).
            if let Some(due) = deadline {
                let now = domain.now();
                if due <= now {
                    // Timing out at once: first what fell due before now, as a pass would.
                    if domain.expire_timers(vcpu, now) {
                        for &port in &ports {
                            if domain.events.is_pending(&domain.memory, port)? {
                                return Ok(Done::Return(0));
                            }
                        }
                    }
                    return Err(Errno::ETIMEDOUT);
                }
            }
            if deadline.is_none()
                && !domain
                    .events
                    .can_wake(vcpu, domain.vcpus[vcpu].timers.armed())
                && !domain.has_other_vcpu_up(vcpu)
            {
                domain.end(Ending::Fault(String::from(
                    crate::common::domain::NEVER_WAKES,
                )));
                return Ok(Done::Ended);
            }
            domain.vcpus[vcpu].wait = Wait::Poll { ports, deadline };
            Ok(Done::Sleep)
        }
        _ => Err(Errno::ENOSYS),
    }
}

fn event_channel_op(
    domain: &mut Domain,
    &[op, arg, arg2, ..]: &[u64; 5],
    peers: &mut dyn DomainTable,
) -> Result<u64, Errno> {
    let own = domain.id as u16;
    match EventChannelOp::try_from(op)? {
        EventChannelOp::AllocUnbound => {
            let remote = if arg == DOMID_SELF {
                u64::from(domain.id)
            } else {
                arg
            };
            if remote != u64::from(domain.id) && !domain_exists(remote) {
                return Err(Errno::ENOENT);
            }
            Ok(domain.events.alloc_unbound(remote as u16)?.into())
        }
        EventChannelOp::BindVirq => Ok(domain.events.bind_virq(arg, arg2)?.into()),
        EventChannelOp::BindIpi => Ok(domain.events.bind_ipi(arg)?.into()),
        EventChannelOp::BindInterdomain => {
            let remote = if arg == DOMID_SELF {
                u64::from(domain.id)
            } else {
                arg
            };
            if remote == u64::from(domain.id) {
                // Both ends in this domain.
                if !domain.events.is_unbound_for(arg2, own) {
                    return Err(Errno::EINVAL);
                }
                let port = domain.events.bind_end(own, arg2 as u32)?;
                domain.events.connect(arg2 as u32, own, port);
                return Ok(port.into());
            }
            if !domain_exists(remote) {
                return Err(Errno::ENOENT);
            }
            let peer = peers.get_mut(remote as u32).ok_or(Errno::ENOENT)?;
            if !peer.is_runnable() || !peer.events.is_unbound_for(arg2, own) {
                return Err(Errno::EINVAL);
            }
            let port = domain.events.bind_end(remote as u16, arg2 as u32)?;
            peer.events.connect(arg2 as u32, own, port);
            Ok(port.into())
        }
        EventChannelOp::Send => {
            let (port, binding) = domain.events.send_target(arg)?;
            match binding {
                Binding::Console => domain.drain_console_ring(),
                Binding::Interdomain {
                    remote,
                    remote_port,
                } if remote == own => domain.raise_port(remote_port),
                Binding::Interdomain {
                    remote,
                    remote_port,
                } => {
                    if let Some(peer) = peers.get_mut(u32::from(remote)) {
                        peer.raise_port(remote_port);
                    }
                }
                _ => domain.raise_port(port),
            }
            Ok(0)
        }
        EventChannelOp::Close => {
            if let Binding::Interdomain {
                remote,
                remote_port,
            } = domain.events.close(&domain.memory, arg)?
            {
                // The peer's end turns unbound and is raised, so the peer notices.
                let peer = if remote == own {
                    Some(&mut *domain)
                } else {
                    peers.get_mut(u32::from(remote))
                };
                if let Some(peer) = peer {
                    peer.events.disconnect(remote_port, own);
                    peer.raise_port(remote_port);
                }
            }
            Ok(0)
        }
        EventChannelOp::Unmask => {
            if let Some(vcpu) = domain.events.unmask(&domain.memory, arg)? {
                domain.vcpus[vcpu].requests.make(request::EVENT);
                domain.vcpus[vcpu].requests.set_upcall_maybe_pending(true);
            }
            Ok(0)
        }
        EventChannelOp::Status => domain.events.status(&domain.memory, arg),
        EventChannelOp::BindIpiSlot => Ok(domain.events.bind_ipi_slot(arg, arg2)?.into()),
        EventChannelOp::SendIpi => {
            // Every target is validated before the first is raised (docs/abi.md 8.11).
            let targets = domain.events.ipi_targets(arg, arg2)?;
            for port in targets.ports() {
                domain.raise_port(port);
            }
            Ok(0)
        }
        _ => Err(Errno::ENOSYS),
    }
}

#[inline(never)]
fn vcpu_op(
    domain: &mut Domain,
    caller: usize,
    &[op, vcpu, arg, ..]: &[u64; 5],
) -> Result<Done, Errno> {
    let op = VcpuOp::try_from(op)?;
    let index = domain.events.check_vcpu(vcpu)?;
    let now = domain.now();
    let state = &mut domain.vcpus[index];
    match op {
        VcpuOp::RegisterVcpuInfo => {
            if arg % 64 != 0 {
                return Err(Errno::EINVAL);
            }
            domain.memory.check(arg, 64)?;
            if state.vcpu_info_moved {
                return Err(Errno::EEXIST);
            }
            domain.events.move_vcpu_info(&domain.memory, index, arg)?;
            state.vcpu_info_moved = true;
            state.requests.make(request::EVENT);
            state.requests.set_upcall_maybe_pending(true);
        }
        VcpuOp::RegisterRunstate => {
            if arg % 8 != 0 {
                return Err(Errno::EINVAL);
            }
            if arg == 0 {
                state.runstate.gpa = None;
            } else {
                domain
                    .memory
                    .check(arg, size_of::<lamina_abi::vcpu::RunstateInfo>() as u64)?;
                state.runstate.gpa = Some(arg);
                state.runstate.publish(&domain.memory)?;
            }
        }
        VcpuOp::SetPeriodicTimer | VcpuOp::SetSingleshotTimer => {
            if op == VcpuOp::SetPeriodicTimer {
                state.timers.periodic = match arg {
                    0 => None,
                    period if period < PERIOD_MIN_NS => return Err(Errno::EINVAL),
                    period => Some((now.saturating_add(period), period)),
                };
            } else {
                state.timers.singleshot = (arg != 0).then_some(arg);
            }
            state.requests.make(request::EVENT);
            // The running vCPU arms the host timer for its whole domain: it must look again,
            // whichever vCPU's timer changed.
            domain.vcpus[caller].requests.make(request::TIMERS);
        }
        VcpuOp::SetUpcallVector => {
            if arg != 0 && !(32..=255).contains(&arg) {
                return Err(Errno::EINVAL);
            }
            state.upcall_vector = arg as u8;
            state.requests.make(request::EVENT);
            state.requests.set_upcall_maybe_pending(true);
        }
        VcpuOp::Initialise => {
            if index == 0 || state.start.is_some() {
                return Err(Errno::EEXIST);
            }
            if arg % 8 != 0 {
                return Err(Errno::EINVAL);
            }
            let mut raw = [0u8; size_of::<VcpuStartState>()];
            domain.memory.read(arg, &mut raw)?;
            let field =
                |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().unwrap_or_default());
            let start = StartState {
                rip: field(0),
                rsp: field(8),
                cr3: field(16),
                argument: field(24),
            };
            let cr3_in_ram = start.cr3.is_multiple_of(4096)
                && start
                    .cr3
                    .checked_add(4096)
                    .is_some_and(|end| end <= domain.memory.size());
            if !is_canonical(start.rip) || !is_canonical(start.rsp) || !cr3_in_ram {
                return Err(Errno::EINVAL);
            }
            state.set_start(start);
        }
        VcpuOp::Up => {
            if index != 0 && state.start.is_none() {
                return Err(Errno::EINVAL);
            }
            state.bring_up(now, &domain.memory);
        }
        VcpuOp::Down => {
            if !state.up {
                return Ok(Done::Return(0));
            }
            if !domain.has_other_vcpu_up(index) {
                return Err(Errno::EBUSY);
            }
            let state = &mut domain.vcpus[index];
            state.up = false;
            if index == caller {
                // Stops here; `up` resumes it after this call, which then returns 0.
                return Ok(Done::Sleep);
            }
            // Running on another CPU: stopped before the call returns (docs/abi.md 19.3).
            state.requests.make_and_wait(request::RESCHEDULE);
            let _ = state.runstate.enter(runstate::OFFLINE, now, &domain.memory);
        }
        VcpuOp::IsUp => return Ok(Done::Return(u64::from(state.up))),
        _ => return Err(Errno::ENOSYS),
    }
    Ok(Done::Return(0))
}

fn memory_op(domain: &mut Domain, &[op, gpa, capacity, count, _]: &[u64; 5]) -> Result<u64, Errno> {
    let size = domain.memory.size();
    match MemoryOp::try_from(op)? {
        // RSI: the vCPU mask, RDX: the array, R10: its count (docs/abi.md 11).
        MemoryOp::FlushTlb => flush_tlb(domain, gpa, capacity, count),
        MemoryOp::CurrentReservation => Ok(size),
        MemoryOp::GetMemoryMap => {
            let map = domain.memory_map;
            let regions = map.regions();
            let written = (capacity as usize).min(regions.len());
            let entry = size_of::<MemoryRegion>() as u64;
            if written > 0 {
                domain.memory.check(gpa, written as u64 * entry)?;
            }
            for (i, region) in regions[..written].iter().enumerate() {
                // SAFETY: MemoryRegion is repr(C) plain data without padding (size asserted in abi).
                let bytes = unsafe {
                    core::slice::from_raw_parts(
                        (region as *const MemoryRegion).cast::<u8>(),
                        entry as usize,
                    )
                };
                domain.memory.write(gpa + i as u64 * entry, bytes)?;
            }
            Ok(regions.len() as u64)
        }
        _ => Err(Errno::ENOSYS),
    }
}

/// `memory_op` flush_tlb (docs/abi.md 11): every check first, then each vCPU of `mask` is
/// flushed before it next runs guest code; one in guest mode on another CPU is kicked and
/// out of it when this returns, one that is not running is not disturbed. A list of up to
/// [`PENDING_TLB_FLUSH_MAX`] addresses is read once and flushed page by page (until a
/// target's pending list overflows); a longer one is only validated and flushed whole.
fn flush_tlb(domain: &mut Domain, mask: u64, gpa: u64, count: u64) -> Result<u64, Errno> {
    let mask = domain.events.check_vcpu_mask(mask)?;
    if count > FLUSH_ADDRESSES_MAX {
        return Err(Errno::EINVAL);
    }
    let mut listed = [0u64; PENDING_TLB_FLUSH_MAX];
    let listed = if count > 0 {
        // The whole array must be RAM before any of it is read (docs/abi.md 2.5); then it is
        // read once, a few addresses at a time, so the call needs no page-sized buffer.
        domain.memory.check(gpa, 8 * count)?;
        const CHUNK: u64 = 32;
        let mut raw = [0u8; 8 * CHUNK as usize];
        let mut at = 0;
        while at < count {
            let take = CHUNK.min(count - at);
            let bytes = &mut raw[..8 * take as usize];
            domain.memory.read(gpa + 8 * at, bytes)?;
            for (offset, chunk) in bytes.chunks_exact(8).enumerate() {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                let address = u64::from_le_bytes(word);
                if !is_canonical(address) {
                    return Err(Errno::EINVAL);
                }
                // Kept from this one read: the guest may change the array meanwhile.
                if let Some(slot) = listed.get_mut((at as usize) + offset) {
                    *slot = address;
                }
            }
            at += take;
        }
        // Too long to list: flushed whole (an empty list).
        if count as usize <= PENDING_TLB_FLUSH_MAX {
            &listed[..count as usize]
        } else {
            &listed[..0]
        }
    } else {
        &listed[..0]
    };
    for (index, state) in domain.vcpus.iter_mut().enumerate() {
        if mask & 1 << index != 0 {
            state.pending_tlb_flush.add(listed);
            state.requests.make_quietly_and_wait(request::TLB_FLUSH);
        }
    }
    Ok(0)
}

fn stats_op(
    domain: &mut Domain,
    &[op, target, vcpu, gpa, _]: &[u64; 5],
    peers: &mut dyn DomainTable,
) -> Result<u64, Errno> {
    match StatsOp::try_from(op)? {
        StatsOp::ExitCounters => {
            let own = target == DOMID_SELF || target == u64::from(domain.id);
            if !own && !domain_exists(target) {
                return Err(Errno::ENOENT);
            }
            if !own && !domain.privileged {
                return Err(Errno::EPERM);
            }
            // The counters are copied from the vCPU's state only now: counting costs one
            // increment per exit, and nothing is published until someone asks.
            let target_domain = if own {
                &*domain
            } else {
                let id = u32::try_from(target).map_err(|_| Errno::ENOENT)?;
                peers.get_mut(id).ok_or(Errno::ENOENT)?
            };
            let counters = usize::try_from(vcpu)
                .ok()
                .and_then(|v| target_domain.vcpus.get(v))
                .ok_or(Errno::ENOENT)?
                .stats
                .to_counters();
            if gpa % 8 != 0 {
                return Err(Errno::EINVAL);
            }
            // SAFETY: ExitCounters is repr(C) plain data without padding (size asserted in abi).
            let bytes = unsafe {
                core::slice::from_raw_parts(
                    (&raw const counters).cast::<u8>(),
                    size_of::<ExitCounters>(),
                )
            };
            domain.memory.write(gpa, bytes)?;
            Ok(0)
        }
        _ => Err(Errno::ENOSYS),
    }
}

/// Out of line: its copy of the batch (3.5 KiB) would otherwise be in [`dispatch`]'s frame,
/// whose every call (each entry of a batch too) would then probe the stack for it.
#[inline(never)]
fn multicall(
    domain: &mut Domain,
    vcpu: usize,
    &[gpa, count, ..]: &[u64; 5],
    peers: &mut dyn DomainTable,
) -> Result<Done, Errno> {
    if count > MULTICALL_MAX {
        return Err(Errno::E2BIG);
    }
    if count == 0 {
        // An empty batch is never out of bounds, wherever it points (docs/abi.md 2.5).
        return Ok(Done::Return(0));
    }
    // Only a table that keeps batches may refuse an entry: with any other (one CPU, the
    // table exclusive) the entries cost no look at the table.
    let Some(kept) = peers.kept() else {
        return copy_and_run::<false>(domain, vcpu, gpa, count, peers);
    };
    // Made again by the scheduler after it stopped before an entry: the copy it kept.
    if let Some(kept) = kept.take()
        && kept.gpa == gpa
        && kept.count == count
    {
        return run_batch::<true>(
            domain,
            vcpu,
            gpa,
            &kept.entries[..count as usize],
            kept.next,
            peers,
        );
    }
    copy_and_run::<true>(domain, vcpu, gpa, count, peers)
}

/// Goes on with the batch `preempted` of vCPU `vcpu` from the entry after the last that ran.
/// Out of line: rare, and its copy of the batch is on the heap.
#[cold]
#[inline(never)]
fn go_on_preempted(
    domain: &mut Domain,
    vcpu: usize,
    mut preempted: Box<UnfinishedBatch>,
    peers: &mut dyn DomainTable,
) -> Result<Done, Errno> {
    let count = (preempted.count as usize).min(preempted.entries.len());
    let batch = &preempted.entries[..count];
    let (gpa, next) = (preempted.gpa, preempted.next);
    // Preempted again, it keeps this copy ([`keep_preempted`] notes where it stopped).
    domain.vcpus[vcpu].resuming_batch = true;
    let result = if peers.kept().is_some() {
        run_batch::<true>(domain, vcpu, gpa, batch, next, peers)
    } else {
        run_batch::<false>(domain, vcpu, gpa, batch, next, peers)
    };
    let state = &mut domain.vcpus[vcpu];
    state.resuming_batch = false;
    if matches!(result, Ok(Done::Preempted)) {
        preempted.next = state.resume_next;
        state.preempted_batch = Some(preempted);
    } else {
        // Kept for the next preemption: no allocation then.
        state.spare_batch = Some(preempted);
    }
    result
}

/// Copies the batch of `count` entries at `gpa` and runs it ([`run_batch`]).
#[inline(always)]
fn copy_and_run<const MAY_REFUSE: bool>(
    domain: &mut Domain,
    vcpu: usize,
    gpa: u64,
    count: u64,
    peers: &mut dyn DomainTable,
) -> Result<Done, Errno> {
    // The whole array is copied before any entry runs (docs/abi.md 2.5, 12): an entry whose
    // output lands on a later entry, or another vCPU rewriting the array, cannot change what
    // the later entries do. 64 entries are 3.5 KiB of the hypervisor's stack, left
    // uninitialised: zeroing it would cost more than a short batch.
    let mut storage = core::mem::MaybeUninit::<[MulticallEntry; MULTICALL_MAX as usize]>::uninit();
    let len = (count * size_of::<MulticallEntry>() as u64) as usize;
    // SAFETY: `len` is at most the size of `storage` (count <= MULTICALL_MAX); viewing its
    // bytes as uninitialised bytes is always sound.
    let bytes = unsafe {
        core::slice::from_raw_parts_mut(
            storage.as_mut_ptr().cast::<core::mem::MaybeUninit<u8>>(),
            len,
        )
    };
    domain.memory.read_uninit(gpa, bytes)?;
    // SAFETY: the first `count` entries were just written in full, and every bit pattern is a
    // valid `MulticallEntry` (seven u64s, `repr(C)`).
    let batch = unsafe {
        core::slice::from_raw_parts(storage.as_ptr().cast::<MulticallEntry>(), count as usize)
    };
    run_batch::<MAY_REFUSE>(domain, vcpu, gpa, batch, 0, peers)
}

/// Runs the entries of `batch` (the copy of the array at `gpa`) from entry `first` on. With a
/// table that may refuse (`MAY_REFUSE`: a copy of the loop without it for the others), each
/// entry's peers are taken just before it runs and let go when
/// the next needs others ([`DomainTable::admit`]); when they cannot be, the batch stops
/// before that entry and keeps its copy ([`UnfinishedBatch`]). Between entries, once the
/// vCPU's slice is over ([`VcpuState::slice_end_tsc`]: one TSC read and compare before each
/// entry of [`BATCH_LOOKED_AT`]), the batch stops and is kept in the vCPU's state
/// ([`Done::Preempted`]); the entry it starts from always runs, so a batch finishes however
/// short its slices.
///
/// [`VcpuState::slice_end_tsc`]: crate::common::vcpu::state::VcpuState::slice_end_tsc
#[inline(always)]
fn run_batch<const MAY_REFUSE: bool>(
    domain: &mut Domain,
    vcpu: usize,
    gpa: u64,
    batch: &[MulticallEntry],
    first: u64,
    peers: &mut dyn DomainTable,
) -> Result<Done, Errno> {
    let entry_size = size_of::<MulticallEntry>() as u64;
    // Where entry `i` lies, and `i` from it (no index kept: the loop's registers go to the
    // entries that are neither answered here nor looked at, see below).
    let mut at = gpa.wrapping_add(first.wrapping_mul(entry_size));
    let index = |at: u64| at.wrapping_sub(gpa) / entry_size;
    for entry in batch.get(first as usize..).unwrap_or_default() {
        let (op, args) = (entry.op, entry.args);
        // One bit test for the numbers a batch answers itself and those worth a look at the
        // clock first (a cheap batch's entries are neither: no cost added to them).
        let own_answer = if op < 64 && (BATCH_LOOKED_AT >> op) & 1 != 0 {
            if read_tsc() >= domain.vcpus[vcpu].slice_end_tsc
                && let Some(preempted) = keep_preempted(domain, vcpu, gpa, batch, first, at)
            {
                return Ok(preempted);
            }
            batch_answer(op, &args, vcpu)
        } else {
            None
        };
        let result = if let Some(result) = own_answer {
            result
        } else {
            if MAY_REFUSE && !peers.admit(domain, op, &entry.args) {
                return Ok(keep_unfinished(gpa, batch, index(at), peers));
            }
            let result = dispatch(domain, vcpu, op, &entry.args, peers);
            // Stopped before it acted (a grant copy whose domain was busy): made again.
            if MAY_REFUSE && (peers.busy() || matches!(result, Ok(Done::Unfinished))) {
                return Ok(keep_unfinished(gpa, batch, index(at), peers));
            }
            result
        };
        let value = match result {
            Ok(Done::Return(v)) => v,
            Ok(Done::Yield) | Ok(Done::Sleep) => 0,
            // Cannot be made again from inside a batch. A pause did all a batch can wait for
            // (the domain paused, its vCPUs out of the guest): 0; a destroy is not finished:
            // the caller retries (docs/abi.md 17).
            Ok(Done::Again)
                if op == Hypercall::DomctlOp as u64
                    && args[0] == lamina_abi::domctl::DomctlOp::Pause as u64 =>
            {
                0
            }
            Ok(Done::Again) | Ok(Done::Unfinished) | Ok(Done::Preempted) => {
                Errno::EAGAIN.to_return_value()
            }
            Ok(Done::Ended) => return Ok(Done::Ended),
            Err(e) => e.to_return_value(),
        };
        domain.memory.write_u64(
            at.wrapping_add(core::mem::offset_of!(MulticallEntry, result) as u64),
            value,
        )?;
        at = at.wrapping_add(entry_size);
    }
    // Every entry ran (the call returns the number run, docs/abi.md 12).
    Ok(Done::Return(batch.len() as u64))
}

/// The numbers [`batch_answer`] looks at, a bit each.
const BATCH_SPECIAL_CALLS: u64 = 1 << Hypercall::SchedOp as u64
    | 1 << Hypercall::VcpuOp as u64
    | 1 << Hypercall::Multicall as u64;
const _: () = assert!((Hypercall::COUNT as u64) <= 64);

/// The numbers before whose entries a batch looks whether its slice is over (a TSC read and
/// compare, [`run_batch`]), a bit each, [`BATCH_SPECIAL_CALLS`] among them: every call but
/// `version`. A `version` entry (and an undefined number's `-ENOSYS`) costs little more than
/// that look (some 60 instructions against 7), so a batch of them would pay 10% for it
/// (`multicall_32`); the price is that 64 of them in a row hold the CPU past the end of a
/// slice for up to some 4,000 instructions (about 1 us on hardware, 40 us under Bochs).
const BATCH_LOOKED_AT: u64 =
    ((1 << Hypercall::COUNT as u64) - 1) & !(1 << Hypercall::Version as u64);
const _: () = assert!(BATCH_LOOKED_AT & BATCH_SPECIAL_CALLS == BATCH_SPECIAL_CALLS);

/// What a batch answers itself for an entry of vCPU `vcpu` (one of [`BATCH_SPECIAL_CALLS`]):
/// a nested multicall and the calls that would wait are `-EINVAL`, a yield does nothing (docs/abi.md 12);
/// `None` for the rest, which are dispatched.
fn batch_answer(op: u64, args: &[u64; 5], vcpu: usize) -> Option<Result<Done, Errno>> {
    let waits = (op == Hypercall::SchedOp as u64
        && (args[0] == SchedOp::Block as u64 || args[0] == SchedOp::Poll as u64))
        || (op == Hypercall::VcpuOp as u64
            && args[0] == VcpuOp::Down as u64
            && args[1] == vcpu as u64);
    if op == Hypercall::Multicall as u64 || waits {
        Some(Err(Errno::EINVAL))
    } else if op == Hypercall::SchedOp as u64 && args[0] == SchedOp::Yield as u64 {
        // Gives nothing up inside a batch (docs/abi.md 12), so there is nothing to do (not
        // even the console-ring print of a vCPU leaving the CPU, 13).
        Some(Ok(Done::Return(0)))
    } else {
        None
    }
}

/// The batch stops before entry `next`: its copy is kept where the scheduler finds it when it
/// makes the call again (only a table that can refuse an entry refuses, and it keeps one).
/// Out of line: its copy of the batch would weigh on every batch's stack frame.
#[cold]
#[inline(never)]
fn keep_unfinished(
    gpa: u64,
    batch: &[MulticallEntry],
    next: u64,
    peers: &mut dyn DomainTable,
) -> Done {
    if let Some(kept) = peers.kept() {
        let mut entries = [MulticallEntry::default(); MULTICALL_MAX as usize];
        entries[..batch.len()].copy_from_slice(batch);
        *kept = Some(Box::new(UnfinishedBatch {
            gpa,
            count: batch.len() as u64,
            next,
            entries,
        }));
    }
    Done::Unfinished
}

/// The slice of vCPU `vcpu` is over before the entry at `at` of `batch` (the array at `gpa`,
/// run from entry `first`): unless that is `first` (each run makes progress), the batch stops
/// and its copy is kept in the vCPU's state, where [`finish_preempted`] finds it. Out of
/// line, as [`keep_unfinished`], and the entry's number worked out here: nothing of this is
/// kept in the loop's registers.
#[cold]
#[inline(never)]
fn keep_preempted(
    domain: &mut Domain,
    vcpu: usize,
    gpa: u64,
    batch: &[MulticallEntry],
    first: u64,
    at: u64,
) -> Option<Done> {
    let next = at.wrapping_sub(gpa) / size_of::<MulticallEntry>() as u64;
    if next <= first {
        return None;
    }
    let state = &mut domain.vcpus[vcpu];
    if state.resuming_batch {
        // Its entries are already kept ([`go_on_preempted`]): only where it stopped.
        state.resume_next = next;
        return Some(Done::Preempted);
    }
    // The storage of an earlier preemption of this vCPU, or new (once): only the entries not
    // run yet are copied, the rest is never read. (An allocation and a copy of the whole
    // batch each time took 16 us under Bochs.)
    let mut kept = state.spare_batch.take().unwrap_or_else(|| {
        Box::new(UnfinishedBatch {
            gpa: 0,
            count: 0,
            next: 0,
            entries: [MulticallEntry::default(); MULTICALL_MAX as usize],
        })
    });
    let from = (next as usize).min(batch.len());
    kept.entries[from..batch.len()].copy_from_slice(&batch[from..]);
    kept.gpa = gpa;
    kept.count = batch.len() as u64;
    kept.next = next;
    state.preempted_batch = Some(kept);
    Some(Done::Preempted)
}

/// Test support: one hypercall's dispatch, without a vCPU.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Dispatches hypercall `nr` of vCPU `vcpu` of `domain`; the value it returns, or its
    /// error (`Err(None)` for a call that yields, sleeps or ends the domain).
    pub(crate) fn dispatch_for_test(
        domain: &mut Domain,
        vcpu: usize,
        nr: u64,
        args: [u64; 5],
    ) -> Result<u64, Option<Errno>> {
        match dispatch(domain, vcpu, nr, &args, &mut crate::common::domain::NoPeers) {
            Ok(Done::Return(value)) => Ok(value),
            Ok(_) => Err(None),
            Err(errno) => Err(Some(errno)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::domain::DomainState;
    use crate::common::memory::guest_memory::testing::{TestMemory, test_memory};
    use crate::common::output::testing::take_lines;
    use crate::common::testing::MockVcpu;

    fn domain() -> (TestMemory, Domain) {
        let t = test_memory(4 << 20);
        // SAFETY: the domain's view aliases the test memory, which outlives it in the tuple.
        let mem = unsafe {
            crate::common::memory::guest_memory::GuestMemory::new(
                t.mem.host_base() as *mut u8,
                t.mem.size(),
            )
        };
        (
            t,
            Domain::new(
                1,
                "t".into(),
                mem,
                crate::common::time::TimeBase::new(1_000_000_000, 0, 0, 0),
            ),
        )
    }

    fn call(domain: &mut Domain, vcpu: &mut MockVcpu, nr: u64, args: [u64; 3]) -> (i64, Next) {
        vcpu.regs.gpr[reg::RAX] = nr;
        vcpu.regs.gpr[reg::RDI] = args[0];
        vcpu.regs.gpr[reg::RSI] = args[1];
        vcpu.regs.gpr[reg::RDX] = args[2];
        let next = handle(domain, 0, vcpu, &mut crate::common::domain::NoPeers);
        (vcpu.regs.gpr[reg::RAX] as i64, next)
    }

    const EFAULT: i64 = -(Errno::EFAULT as i64);

    #[test]
    fn console_write_copies_the_buffer_to_the_console() {
        let (t, mut d) = domain();
        let mut v = MockVcpu::default();
        t.mem.write(0x1000, b"hi there\n").unwrap();
        assert_eq!(call(&mut d, &mut v, 1, [0, 0x1000, 9]), (9, Next::Resume));
        assert_eq!(take_lines(), ["(d1) hi there"]);
        assert_eq!(call(&mut d, &mut v, 1, [0, 0x1000, 0]).0, 0, "empty write");
        assert_eq!(
            call(&mut d, &mut v, 1, [0, u64::MAX, 0]).0,
            0,
            "empty write anywhere"
        );
    }

    #[test]
    fn console_write_beyond_the_budget_is_eagain_and_prints_nothing() {
        use crate::common::domain::ConsoleBudget;
        let (t, mut d) = domain();
        let mut v = MockVcpu::default();
        t.mem.write(0x1000, b"kept\n").unwrap();
        d.console.budget = ConsoleBudget::spent();
        assert_eq!(
            call(&mut d, &mut v, 1, [0, 0x1000, 5]).0,
            -(Errno::EAGAIN as i64)
        );
        assert!(take_lines().is_empty());
        assert_eq!(d.console.refused_bytes, 5);
        // The buffer is still checked first (docs/abi.md 2.4: state last).
        assert_eq!(call(&mut d, &mut v, 1, [0, 4 << 20, 5]).0, EFAULT);
        assert_eq!(call(&mut d, &mut v, 1, [0, 0x1000, 0]).0, 0, "empty write");
    }

    #[test]
    fn console_ring_is_drained_only_as_far_as_the_budget_goes() {
        use crate::common::domain::ConsoleBudget;
        use lamina_abi::layout::CONSOLE_RING_GPA;
        const OUT: u64 = CONSOLE_RING_GPA + core::mem::offset_of!(ConsoleRing, output) as u64;
        const CONS: u64 = CONSOLE_RING_GPA + core::mem::offset_of!(ConsoleRing, out_cons) as u64;
        const PROD: u64 = CONSOLE_RING_GPA + core::mem::offset_of!(ConsoleRing, out_prod) as u64;
        let (t, mut d) = domain();
        t.mem.write(OUT, b"waits\n").unwrap();
        t.mem.write(PROD, &6u32.to_le_bytes()).unwrap();
        d.console.budget = ConsoleBudget::spent();
        d.drain_console_ring();
        assert!(take_lines().is_empty());
        assert_eq!(t.mem.read_u64(CONS).unwrap() as u32, 0, "left in the ring");
        // At the domain's end its last words are printed all the same.
        d.end(crate::common::domain::Ending::Poweroff);
        assert_eq!(take_lines(), ["(d1) waits"]);
        assert_eq!(t.mem.read_u64(CONS).unwrap() as u32, 6);
    }

    #[test]
    fn a_poll_past_its_deadline_has_seen_the_timers_due_before_it() {
        const SCHED: u64 = 2;
        const EVTCHN: u64 = 3;
        const POLL: u64 = 3;
        let (t, mut d) = domain();
        let mut v = MockVcpu::default();
        crate::common::testing::FAKE_TSC.with(|tsc| tsc.set(Some(5_000_000)));
        // A loopback port (2) to poll, and a one-shot due at 1 ms with VIRQ_TIMER unbound.
        assert_eq!(call(&mut d, &mut v, EVTCHN, [0, DOMID_SELF, 0]).0, 2);
        d.vcpus[0].timers.singleshot = Some(1_000_000);
        t.mem.write(0x1000, &2u32.to_le_bytes()).unwrap();
        v.regs.gpr[reg::R10] = 3_000_000;
        assert_eq!(
            call(&mut d, &mut v, SCHED, [POLL, 0x1000, 1]).0,
            -(Errno::ETIMEDOUT as i64)
        );
        assert_eq!(
            d.vcpus[0].timers.singleshot, None,
            "the tick was dropped, not kept"
        );
        // With VIRQ_TIMER bound and polled, a tick due before the call ends it at once.
        let timer_port = call(&mut d, &mut v, EVTCHN, [1, 0, 0]).0;
        d.vcpus[0].timers.singleshot = Some(4_000_000);
        t.mem
            .write(0x1000, &(timer_port as u32).to_le_bytes())
            .unwrap();
        v.regs.gpr[reg::R10] = 3_000_000;
        assert_eq!(call(&mut d, &mut v, SCHED, [POLL, 0x1000, 1]).0, 0);
        crate::common::testing::FAKE_TSC.with(|tsc| tsc.set(None));
    }

    #[test]
    fn console_write_refuses_buffers_outside_ram() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        let end = 4u64 << 20;
        assert_eq!(
            call(&mut d, &mut v, 1, [0, end, 1]).0,
            EFAULT,
            "just past the end"
        );
        assert_eq!(
            call(&mut d, &mut v, 1, [0, end - 1, 2]).0,
            EFAULT,
            "straddles the end"
        );
        assert_eq!(
            call(&mut d, &mut v, 1, [0, u64::MAX - 1, 16]).0,
            EFAULT,
            "wraps around"
        );
        assert_eq!(
            call(&mut d, &mut v, 1, [0, 0, CONSOLE_WRITE_MAX + 1]).0,
            -(Errno::EINVAL as i64)
        );
        assert_eq!(
            call(&mut d, &mut v, 1, [7, 0, 1]).0,
            -(Errno::ENOSYS as i64),
            "unknown op"
        );
        assert!(d.is_runnable());
    }

    #[test]
    fn unknown_numbers_and_user_mode_callers_are_refused() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        for nr in [Hypercall::COUNT as u64, 0x1000, u64::MAX] {
            assert_eq!(call(&mut d, &mut v, nr, [0; 3]).0, -(Errno::ENOSYS as i64));
        }
        v.cpl = 3;
        assert_eq!(call(&mut d, &mut v, 0, [0; 3]).0, -(Errno::EPERM as i64));
    }

    #[test]
    fn shutdown_ends_the_domain_with_its_reason_and_bad_reasons_are_einval() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        assert_eq!(
            call(&mut d, &mut v, 2, [2, 99, 0]).0,
            -(Errno::EINVAL as i64)
        );
        assert!(d.is_runnable());
        assert_eq!(call(&mut d, &mut v, 2, [2, 2, 0]).1, Next::Stop);
        assert_eq!(d.state, DomainState::Ended(Ending::Crash));
    }

    #[test]
    fn version_returns_the_abi_version() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        assert_eq!(
            call(&mut d, &mut v, 0, [0; 3]).0,
            lamina_abi::abi_version() as i64
        );
        assert_eq!(call(&mut d, &mut v, 2, [0, 0, 0]), (0, Next::Yield));
    }

    fn write_entry(t: &TestMemory, at: u64, op: u64, args: [u64; 5]) {
        t.mem.write_u64(at, op).unwrap();
        for (i, arg) in args.iter().enumerate() {
            t.mem.write_u64(at + 8 + 8 * i as u64, *arg).unwrap();
        }
        t.mem.write_u64(at + 48, 0xdead).unwrap();
    }

    #[test]
    fn multicall_runs_every_entry_in_order_and_reports_each_result() {
        let (t, mut d) = domain();
        let mut v = MockVcpu::default();
        write_entry(&t, 0x9000, 0, [0; 5]); // version
        write_entry(&t, 0x9038, 0x7fff, [0; 5]); // undefined: -ENOSYS
        write_entry(&t, 0x9070, 1, [0, 4 << 20, 8, 0, 0]); // console write outside RAM: -EFAULT
        write_entry(&t, 0x90a8, 6, [0x9000, 1, 0, 0, 0]); // nested multicall: -EINVAL
        write_entry(&t, 0x90e0, 2, [1, 0, 0, 0, 0]); // block inside a batch: -EINVAL
        assert_eq!(call(&mut d, &mut v, 6, [0x9000, 5, 0]), (5, Next::Resume));
        let results: Vec<i64> = (0..5)
            .map(|i| t.mem.read_u64(0x9000 + 56 * i + 48).unwrap() as i64)
            .collect();
        let e = |errno: Errno| -(errno as i64);
        assert_eq!(
            results,
            [
                lamina_abi::abi_version() as i64,
                e(Errno::ENOSYS),
                e(Errno::EFAULT),
                e(Errno::EINVAL),
                e(Errno::EINVAL)
            ]
        );
        assert!(
            d.is_runnable(),
            "a failing entry does not stop the batch or the domain"
        );
    }

    /// Domain 2, one of whose vCPUs a CPU still has: it cannot be torn down yet.
    struct StillRunning(Domain);

    impl DomainTable for StillRunning {
        fn get_mut(&mut self, id: u32) -> Option<&mut Domain> {
            (id == self.0.id).then_some(&mut self.0)
        }

        fn is_parked(&mut self, _id: u32) -> bool {
            false
        }
    }

    #[test]
    fn in_a_multicall_pause_of_a_running_domain_is_0_and_destroy_eagain() {
        let (t, mut d) = domain();
        d.privileged = true;
        let (_t2, mut two) = domain();
        two.id = 2;
        crate::common::domain::DOMAIN_COUNT.fetch_max(2, core::sync::atomic::Ordering::Relaxed);
        let mut peers = StillRunning(two);
        let domctl = Hypercall::DomctlOp as u64;
        write_entry(
            &t,
            0x9000,
            domctl,
            [lamina_abi::domctl::DomctlOp::Pause as u64, 2, 0, 0, 0],
        );
        write_entry(
            &t,
            0x9038,
            domctl,
            [lamina_abi::domctl::DomctlOp::Destroy as u64, 2, 0, 0, 0],
        );
        let mut v = MockVcpu::default();
        v.regs.gpr[reg::RAX] = Hypercall::Multicall as u64;
        v.regs.gpr[reg::RDI] = 0x9000;
        v.regs.gpr[reg::RSI] = 2;
        assert_eq!(handle(&mut d, 0, &mut v, &mut peers), Next::Resume);
        assert_eq!(v.regs.gpr[reg::RAX], 2);
        assert_eq!(
            [0x9000 + 48, 0x9038 + 48].map(|at| t.mem.read_u64(at).unwrap() as i64),
            [0, -(Errno::EAGAIN as i64)],
            "a batch cannot wait: the pause did what it can, the destroy is not finished"
        );
        assert_eq!(
            peers.0.state,
            DomainState::Ended(Ending::Destroyed),
            "destroyed all the same, torn down later"
        );
    }

    #[test]
    fn multicall_copies_the_array_before_running_any_entry() {
        let (t, mut d) = domain();
        let mut v = MockVcpu::default();
        // Entry 0 writes the memory map (3 regions, 72 bytes) over entry 1, whose op becomes
        // the first region's base, 0 (version). Entry 1 must still run as it was written.
        write_entry(&t, 0x9000, 5, [0, 0x9038, 3, 0, 0]); // memory_op get_memory_map
        write_entry(&t, 0x9038, 0x7fff, [0; 5]); // undefined: -ENOSYS
        assert_eq!(call(&mut d, &mut v, 6, [0x9000, 2, 0]), (2, Next::Resume));
        assert!(
            t.mem.read_u64(0x9000 + 48).unwrap() >= 3,
            "the map was written"
        );
        assert_eq!(
            t.mem.read_u64(0x9038).unwrap(),
            0,
            "entry 1 was overwritten"
        );
        assert_eq!(
            t.mem.read_u64(0x9038 + 48).unwrap() as i64,
            -(Errno::ENOSYS as i64),
            "entry 1 ran as copied before the batch, not as rewritten by entry 0"
        );
    }

    /// No other domains; refuses every entry that is not `version` until told, as a table
    /// whose peer is busy does, and keeps the batch's copy.
    struct Refusing {
        refuse: bool,
        refused: u32,
        kept: Option<Box<UnfinishedBatch>>,
    }

    impl DomainTable for Refusing {
        fn get_mut(&mut self, _id: u32) -> Option<&mut Domain> {
            None
        }
        fn admit(&mut self, _own: &Domain, nr: u64, _args: &[u64; 5]) -> bool {
            let refused = self.refuse && nr != 0;
            self.refused += u32::from(refused);
            !refused
        }
        fn busy(&self) -> bool {
            self.refused > 0 && self.refuse
        }
        fn kept(&mut self) -> Option<&mut Option<Box<UnfinishedBatch>>> {
            Some(&mut self.kept)
        }
    }

    /// A batch stopped before an entry (its peer busy) leaves RAX and RIP alone, and is
    /// finished from that entry with the copy it made at the start, not the array as the
    /// guest rewrote it meanwhile (docs/abi.md 2.5, 12); the entries before it ran once.
    #[test]
    fn a_stopped_multicall_goes_on_from_its_entry_with_its_copy() {
        let (t, mut d) = domain();
        let mut v = MockVcpu::default();
        write_entry(&t, 0x9000, 0, [0; 5]); // version
        write_entry(&t, 0x9038, 1, [0, 0x9100, 3, 0, 0]); // console write "abc"
        t.mem.write(0x9100, b"abc").unwrap();
        v.regs.gpr[reg::RAX] = Hypercall::Multicall as u64;
        v.regs.gpr[reg::RDI] = 0x9000;
        v.regs.gpr[reg::RSI] = 2;
        let mut table = Refusing {
            refuse: true,
            refused: 0,
            kept: None,
        };
        assert_eq!(handle(&mut d, 0, &mut v, &mut table), Next::Again);
        assert_eq!(
            v.regs.gpr[reg::RAX],
            Hypercall::Multicall as u64,
            "RAX alone"
        );
        assert_eq!(
            t.mem.read_u64(0x9000 + 48).unwrap(),
            u64::from(lamina_abi::abi_version()),
            "entry 0 ran"
        );
        assert_eq!(
            t.mem.read_u64(0x9038 + 48).unwrap(),
            0xdead,
            "entry 1 did not"
        );
        assert!(table.kept.is_some());
        // Rewritten after the copy: entry 0 now undefined, entry 1 a write of "zz".
        write_entry(&t, 0x9000, 0x7fff, [0; 5]);
        write_entry(&t, 0x9038, 1, [0, 0x9100, 2, 0, 0]);
        t.mem.write(0x9100, b"zz").unwrap();
        table.refuse = false;
        let _ = take_lines();
        assert_eq!(finish(&mut d, 0, &mut v, &mut table), Next::Resume);
        assert_eq!(v.regs.gpr[reg::RAX], 2, "two entries run");
        assert_eq!(v.skipped, 1, "RIP moved past the call once");
        assert_eq!(t.mem.read_u64(0x9038 + 48).unwrap(), 3, "entry 1 as copied");
        assert_eq!(
            t.mem.read_u64(0x9000 + 48).unwrap(),
            0xdead,
            "entry 0 not run again (its result as the rewrite left it)"
        );
    }

    /// A batch whose slice is over stops between entries: RAX and RIP are left alone and its
    /// copy is kept in the vCPU's state. Each time it is finished it runs at least the entry
    /// it stopped before (one a time while the slice stays over), from the copy made when the
    /// call began, and the last time it returns as a batch does and moves RIP past the call.
    #[test]
    fn a_preempted_multicall_goes_on_one_entry_at_a_time_from_its_copy() {
        const EVTCHN: u64 = 3;
        let (t, mut d) = domain();
        let mut v = MockVcpu::default();
        for i in 0..4 {
            write_entry(&t, 0x9000 + 56 * i, EVTCHN, [0, DOMID_SELF, 0, 0, 0]); // alloc_unbound
        }
        v.regs.gpr[reg::RAX] = Hypercall::Multicall as u64;
        v.regs.gpr[reg::RDI] = 0x9000;
        v.regs.gpr[reg::RSI] = 4;
        v.regs.gpr[reg::RBX] = 0x1234;
        let regs_at_the_call = v.regs;
        crate::common::testing::FAKE_TSC.with(|tsc| tsc.set(Some(1_000)));
        d.vcpus[0].slice_end_tsc = 1_000;
        let results = |t: &TestMemory| -> Vec<i64> {
            (0..4)
                .map(|i| t.mem.read_u64(0x9000 + 56 * i + 48).unwrap() as i64)
                .collect()
        };
        // The slice is over: entry 0 runs (each call makes progress), then it stops.
        assert_eq!(
            handle(&mut d, 0, &mut v, &mut crate::common::domain::NoPeers),
            Next::Again
        );
        assert_eq!(v.regs.gpr, regs_at_the_call.gpr, "no register changed");
        assert_eq!(v.skipped, 0, "RIP still on the call");
        assert_eq!(
            results(&t),
            [2, 0xdead, 0xdead, 0xdead],
            "entry 0 ran alone"
        );
        assert_eq!(d.vcpus[0].preempted_batch.as_ref().map(|b| b.next), Some(1));
        // Rewritten while it waits: the rest runs as copied.
        write_entry(&t, 0x9000 + 56 * 3, 0x7fff, [0; 5]);
        let peers = &mut crate::common::domain::NoPeers;
        assert_eq!(
            finish_preempted(&mut d, 0, &mut v, peers),
            Some(Next::Yield)
        );
        assert_eq!((v.regs.gpr, v.skipped), (regs_at_the_call.gpr, 0));
        assert_eq!(results(&t), [2, 3, 0xdead, 0xdead], "then entry 1 alone");
        // The slice is not over any more: the rest at once.
        d.vcpus[0].slice_end_tsc = u64::MAX;
        assert_eq!(
            finish_preempted(&mut d, 0, &mut v, peers),
            Some(Next::Resume)
        );
        assert_eq!(v.regs.gpr[reg::RAX], 4, "the number of entries run");
        assert_eq!(v.regs.gpr[reg::RBX], 0x1234);
        assert_eq!(v.skipped, 1, "RIP moved past the call once");
        assert_eq!(
            results(&t),
            [2, 3, 4, 5],
            "every entry once, in order, as copied"
        );
        assert!(d.vcpus[0].preempted_batch.is_none());
        assert!(
            d.vcpus[0].spare_batch.is_some(),
            "its storage kept for the next"
        );
        assert_eq!(
            finish_preempted(&mut d, 0, &mut v, peers),
            None,
            "nothing left to finish"
        );
        assert_eq!(
            d.vcpus[0].stats.to_counters().by_hypercall[Hypercall::Multicall as usize],
            0,
            "finishing it counts nothing (the exit counts the call)"
        );
        crate::common::testing::FAKE_TSC.with(|tsc| tsc.set(None));
    }

    /// A batch kept for registers that no longer hold its call is dropped, never run.
    #[test]
    fn a_preempted_batch_is_finished_only_from_its_own_call() {
        let (t, mut d) = domain();
        let mut v = MockVcpu::default();
        let is_up = [VcpuOp::IsUp as u64, 0, 0, 0, 0];
        write_entry(&t, 0x9000, Hypercall::VcpuOp as u64, is_up);
        write_entry(&t, 0x9038, Hypercall::VcpuOp as u64, is_up);
        v.regs.gpr[reg::RAX] = Hypercall::Multicall as u64;
        v.regs.gpr[reg::RDI] = 0x9000;
        v.regs.gpr[reg::RSI] = 2;
        d.vcpus[0].slice_end_tsc = 0;
        let peers = &mut crate::common::domain::NoPeers;
        assert_eq!(handle(&mut d, 0, &mut v, peers), Next::Again, "stopped");
        assert!(d.vcpus[0].preempted_batch.is_some());
        v.regs.gpr[reg::RSI] = 1;
        assert_eq!(finish_preempted(&mut d, 0, &mut v, peers), None);
        assert!(d.vcpus[0].preempted_batch.is_none(), "dropped");
        assert_eq!(t.mem.read_u64(0x9000 + 48).unwrap(), 1, "entry 0 ran");
        assert_eq!(
            t.mem.read_u64(0x9038 + 48).unwrap(),
            0xdead,
            "entry 1 never ran"
        );
        assert_eq!(v.skipped, 0);
    }

    #[test]
    fn multicall_bounds_and_shutdown_end_the_batch() {
        let (t, mut d) = domain();
        let mut v = MockVcpu::default();
        assert_eq!(
            call(&mut d, &mut v, 6, [0x9000, 65, 0]).0,
            -(Errno::E2BIG as i64)
        );
        assert_eq!(
            call(&mut d, &mut v, 6, [u64::MAX, 0, 0]).0,
            0,
            "an empty batch is never out of bounds"
        );
        assert_eq!(
            call(&mut d, &mut v, 6, [(4 << 20) - 56, 2, 0]).0,
            -(Errno::EFAULT as i64),
            "straddles the end: nothing runs"
        );
        write_entry(&t, 0x9000, 2, [2, 0, 0, 0, 0]); // shutdown(poweroff)
        write_entry(&t, 0x9038, 0, [0; 5]);
        assert_eq!(call(&mut d, &mut v, 6, [0x9000, 2, 0]).1, Next::Stop);
        assert_eq!(
            t.mem.read_u64(0x9038 + 48).unwrap(),
            0xdead,
            "the entry after the shutdown did not run"
        );
    }

    #[test]
    fn flush_tlb_checks_every_address_across_chunks_and_asks_for_the_flush() {
        let (t, mut d) = domain();
        let flush = |d: &mut Domain, mask: u64, gpa: u64, count: u64| {
            testing::dispatch_for_test(d, 0, 5, [2, mask, gpa, count, 0])
        };
        for i in 0..40u64 {
            t.mem.write_u64(0x9000 + 8 * i, 0x1000 * i).unwrap();
        }
        assert_eq!(flush(&mut d, 0b1, 0x9000, 513), Err(Some(Errno::EINVAL)));
        assert_eq!(flush(&mut d, 0b10, 0x9000, 1), Err(Some(Errno::ENOENT)));
        assert_eq!(
            flush(&mut d, 0b1, (4 << 20) - 8, 2),
            Err(Some(Errno::EFAULT))
        );
        assert!(
            !d.vcpus[0].requests.peek(request::TLB_FLUSH),
            "no partial effect"
        );
        t.mem.write_u64(0x9000 + 8 * 35, 1 << 47).unwrap();
        assert_eq!(
            flush(&mut d, 0b1, 0x9000, 40),
            Err(Some(Errno::EINVAL)),
            "a non-canonical address in the second chunk"
        );
        assert!(!d.vcpus[0].requests.peek(request::TLB_FLUSH));
        assert_eq!(flush(&mut d, 0b1, 0x9000, 35), Ok(0));
        assert!(d.vcpus[0].requests.peek(request::TLB_FLUSH));
        assert_eq!(
            flush(&mut d, 0b1, u64::MAX, 0),
            Ok(0),
            "all: the array is ignored"
        );
    }

    #[test]
    fn serial_input_lands_in_the_ring_and_console_read_takes_it() {
        let (t, mut d) = domain();
        let mut v = MockVcpu::default();
        let port = d.events.bind_virq(1, 0).unwrap(); // VIRQ_CONSOLE
        for &byte in b"ok" {
            d.receive_console_input(byte);
        }
        assert!(
            d.events.is_pending(&t.mem, port).unwrap(),
            "VIRQ_CONSOLE raised"
        );
        assert_eq!(call(&mut d, &mut v, 1, [1, 0x9000, 16]).0, 2);
        let mut read = [0u8; 2];
        t.mem.read(0x9000, &mut read).unwrap();
        assert_eq!(&read, b"ok");
        assert_eq!(
            call(&mut d, &mut v, 1, [1, 0x9000, 16]).0,
            0,
            "nothing more waiting"
        );
    }
}

//! Vendor-neutral exit handling: what a [`VmExit`] means for the domain.
//!
//! Hypercalls go to [`hypercall`]; the trapping path (CPUID, COM1 port I/O, MSRs, HLT) is
//! emulated here so unported kernels work; faults stop the domain with a report while every
//! other domain runs on.

use crate::common::devices::apic_bus;
use crate::common::devices::uart::Uart16550;
use crate::common::devices::uart::{COM1_BASE, COM1_PORTS};
use crate::common::devices::vlapic::VirtualLapic;
use crate::common::domain::DomainTable;
use crate::common::domain::stats::{ExitKind, ExitStats};
use crate::common::domain::{Domain, Ending};
use crate::common::grants::{self, WindowFault};
use crate::common::hypercall::{self, Next};
use crate::common::memory::guest_paging;
use crate::common::time::read_tsc;
use crate::common::vcpu::control_regs::{self, CrContext, CrInstruction};
use crate::common::vcpu::cpuid;
use crate::common::vcpu::state::{Requests, VcpuState, Wait, request};
use crate::common::vcpu::string_io::{self, Outcome, Ports, StringIo};
use crate::common::vcpu::xstate;
use crate::common::vcpu::{
    ArchMsr, ArchState, CrOperand, VirtualCpu, VmExit, is_canonical, reg, vector,
};
use alloc::format;
use alloc::string::String;
use lamina_abi::hypercall::{HYPERCALL_INSN_LEN, VMCALL_BYTES, VMMCALL_BYTES};
use x86_64::registers::control::Cr0Flags;
use x86_64::registers::model_specific::EferFlags;

/// A hypercall exit: the hot path, small enough to inline into the run loop.
#[inline(always)]
pub fn hypercall_exit<V: VirtualCpu>(
    domain: &mut Domain,
    index: usize,
    vcpu: &mut V,
    peers: &mut dyn DomainTable,
) -> Next {
    match enter_hypercall(domain, index, vcpu, peers) {
        Next::Stop => Next::Stop,
        Next::Again => Next::Yield,
        next => {
            vcpu.skip_instruction();
            next
        }
    }
}

/// The one entry of every hypercall, by either instruction (docs/abi.md 2.1): counted, the
/// upcall check of 8.8, dispatched. The caller moves RIP past the instruction.
#[inline(always)]
fn enter_hypercall<V: VirtualCpu>(
    domain: &mut Domain,
    index: usize,
    vcpu: &mut V,
    peers: &mut dyn DomainTable,
) -> Next {
    let nr = vcpu.regs().gpr[reg::RAX];
    // The vCPU's state looked up once for the counters and the upcall check.
    let state = &mut domain.vcpus[index];
    state.stats.count_hypercall(nr);
    // The guest may have unmasked upcalls with one pending: any hypercall delivers it
    // (docs/abi.md 8.8). Only while an upcall may be waiting does this cost anything.
    state.requests.on_hypercall();
    hypercall::handle(domain, index, vcpu, peers)
}

/// The exits that touch nothing of the domain but the running vCPU's own state, handled
/// without the domain-table lock (docs/abi.md 2.1's null hypercall, CPUID): counted in
/// `stats`, the running CPU's counters of the vCPU, merged into the domain's at the next
/// exit that takes the lock. Returns whether `exit` was one of them.
#[inline(always)]
pub fn handle_without_lock<V: VirtualCpu>(
    stats: &mut ExitStats,
    requests: &Requests,
    vcpu_index: usize,
    vcpu: &mut V,
    exit: &VmExit,
    tsc_khz: u32,
) -> bool {
    match exit {
        VmExit::Hypercall => {
            let nr = vcpu.regs().gpr[reg::RAX];
            if !answers_without_domain(nr) {
                return false;
            }
            requests.on_hypercall();
            stats.count_hypercall(nr);
            hypercall::answer_quickly(nr, vcpu);
            vcpu.skip_instruction();
            true
        }
        VmExit::Cpuid => {
            cpuid_exit(stats, vcpu_index, vcpu, tsc_khz);
            true
        }
        _ => false,
    }
}

/// Once exits took this many TSC ticks of the hypervisor's time since the last time, the
/// vCPU's preemption deadline is loaded again ([`VirtualCpu::reload_preemption_deadline`]):
/// at every entry it would cost each hypercall more than the slice can overrun by this way
/// (a few microseconds of a 10 ms slice, and none past its end: [`PreemptionClock`] reloads
/// at every exit then; a heavy exit, a 32-entry multicall, takes about 2,500 ticks: it
/// reloads every eighth time rather than every time).
pub const RELOAD_AFTER_TSC: u64 = 20_000;

/// When a slice's VMX-preemption timer is loaded again. That timer counts only while the
/// guest runs, and it is what ends a slice where host interrupts do not leave a guest that
/// runs with interrupts off (Bochs): the hypervisor's time would make the slice overrun by as
/// much. The deadline is loaded again ([`VirtualCpu::reload_preemption_deadline`]) once the
/// exits handled out of [`run_own_exits`] took [`RELOAD_AFTER_TSC`] since the last time, and
/// at every exit, quick ones included, within [`RELOAD_AFTER_TSC`] of the slice's end and
/// after it: time the hypervisor took before (quick exits' time is not counted at all) would
/// otherwise move the end of the slice past another domain's deadline by as much when the
/// guest runs on without an exit (a neighbour's timer beside `resource-hog`'s storm under
/// Bochs), and once it is over the timer ends the guest's run at the next entry. Before the
/// second rule a guest making null hypercalls in a loop
/// (never counted) kept the CPU 200 us past a neighbour's deadline under Bochs. A quick exit
/// costs one comparison, which backends without the timer compile away.
pub struct PreemptionClock {
    unreloaded_tsc: u64,
    /// [`RELOAD_AFTER_TSC`] before the slice's end: from then on every exit reloads.
    reload_from_tsc: u64,
    /// The slice's end.
    end_tsc: u64,
}

impl PreemptionClock {
    /// For a slice that ends at TSC `slice_end_tsc`.
    pub fn new(slice_end_tsc: u64) -> Self {
        PreemptionClock {
            unreloaded_tsc: 0,
            reload_from_tsc: slice_end_tsc.saturating_sub(RELOAD_AFTER_TSC),
            end_tsc: slice_end_tsc,
        }
    }

    /// Whether the slice is over at TSC `now`: an exit handled after its end does not go back
    /// into the guest (which the VMX-preemption timer or the pending host interrupt would
    /// take out again at once: an entry and an exit, 2.4 us under Bochs, added to the wait
    /// of the vCPU whose deadline ended the slice).
    #[inline(always)]
    pub fn over(&self, now: u64) -> bool {
        now >= self.end_tsc
    }

    /// An exit handled by the domain took the hypervisor `handled` TSC ticks, up to `now`.
    #[inline(always)]
    pub fn count<V: VirtualCpu>(&mut self, vcpu: &mut V, handled: u64, now: u64) {
        self.unreloaded_tsc += handled;
        if self.unreloaded_tsc > RELOAD_AFTER_TSC || now >= self.reload_from_tsc {
            self.unreloaded_tsc = 0;
            vcpu.reload_preemption_deadline();
        }
    }

    /// A quick exit was handled by TSC `now`; true once the slice is over ([`Self::over`]:
    /// looked at only near its end, so the hot path pays no more than it did).
    #[inline(always)]
    pub fn count_quick<V: VirtualCpu>(&self, vcpu: &mut V, now: u64) -> bool {
        if now >= self.reload_from_tsc {
            vcpu.reload_preemption_deadline();
            return self.over(now);
        }
        false
    }
}

/// Runs `vcpu`, vCPU `vcpu_index` whose state is `state`, for as long as its exits are ones
/// [`handle_without_lock`] finishes and nothing is requested before the next entry: the
/// inner loop of a slice, which touches nothing of the domain but the vCPU's own state (so
/// its registers hold only what that needs, and no table is indexed per exit). Returns what
/// the domain must do next and the TSC at that exit; an exit of [`OwnExits::Other`] is put in
/// `other` (so that the common ones are not moved through its storage on the way out).
/// `preemption`: the slice's [`PreemptionClock`].
#[inline(always)]
pub fn run_own_exits<V: VirtualCpu>(
    state: &mut VcpuState,
    vcpu_index: usize,
    vcpu: &mut V,
    tsc_khz: u32,
    preemption: &PreemptionClock,
    other: &mut VmExit,
) -> (OwnExits, u64) {
    loop {
        let exit = vcpu.run();
        let exited_at = read_tsc();
        // Matched by value, not through a reference: the exits that go on to the domain are
        // not stored to memory on the way (their decoding stays in registers).
        match exit {
            VmExit::Hypercall => {
                let nr = vcpu.regs().gpr[reg::RAX];
                if !answers_without_domain(nr) {
                    return (OwnExits::Hypercall, exited_at);
                }
                state.requests.on_hypercall();
                state.stats.count_hypercall(nr);
                hypercall::answer_quickly(nr, vcpu);
                vcpu.skip_instruction();
            }
            VmExit::Cpuid => cpuid_exit(&mut state.stats, vcpu_index, vcpu, tsc_khz),
            // The common trapped exits without operands leave as bare names: built again
            // where they are handled, they cost a constant, not a copy of every field.
            VmExit::Hlt => return (OwnExits::Hlt, exited_at),
            VmExit::MsrRead => return (OwnExits::MsrRead, exited_at),
            VmExit::MsrWrite => return (OwnExits::MsrWrite, exited_at),
            VmExit::ExternalInterrupt => return (OwnExits::ExternalInterrupt, exited_at),
            VmExit::Io { port, size, write } => {
                return (OwnExits::Io { port, size, write }, exited_at);
            }
            exit => {
                keep_exit(other, exit);
                return (OwnExits::Other, exited_at);
            }
        }
        if state.requests.due_before_entry() {
            return (OwnExits::Drain, exited_at);
        }
        let now = read_tsc();
        state.stats.handling_tsc += now.wrapping_sub(exited_at);
        if preemption.count_quick(vcpu, now) {
            // The slice is over: to the caller, which ends it.
            return (OwnExits::Drain, exited_at);
        }
    }
}

/// Puts an exit [`run_own_exits`] does not handle where its caller finds it. Out of line: the
/// hot loop's registers are not spent on moving it.
#[cold]
#[inline(never)]
fn keep_exit(other: &mut VmExit, exit: VmExit) {
    *other = exit;
}

/// How [`run_own_exits`] ended. A tag of its own (`repr(u8)`), not a niche in [`VmExit`]'s:
/// matched apart from the exit's kind, the bare variants never build a `VmExit` in memory.
#[repr(u8)]
pub enum OwnExits {
    /// A request is due before the next entry: drain it.
    Drain,
    /// A hypercall that needs the domain (kept apart from [`Self::Other`] so that the hot
    /// slow path does not build a [`VmExit`] in memory).
    Hypercall,
    /// [`VmExit::Hlt`] (this and the next three have no operands).
    Hlt,
    /// [`VmExit::MsrRead`].
    MsrRead,
    /// [`VmExit::MsrWrite`].
    MsrWrite,
    /// [`VmExit::ExternalInterrupt`].
    ExternalInterrupt,
    /// [`VmExit::Io`] (the trapped UART's exit, one per byte): to [`port_exit`] directly,
    /// without a [`VmExit`] built in memory and the general dispatch.
    Io { port: u16, size: u8, write: bool },
    /// Any other exit for the domain (in [`run_own_exits`]' `other`).
    Other,
}

/// Whether hypercall `nr` is one [`hypercall::answer_quickly`] answers: `version` and the
/// numbers the ABI does not define.
#[inline(always)]
fn answers_without_domain(nr: u64) -> bool {
    nr == 0 || nr >= lamina_abi::Hypercall::COUNT as u64
}

/// CPUID (docs/abi.md 5), as vCPU `vcpu_index` sees it.
#[inline(always)]
fn cpuid_exit<V: VirtualCpu>(stats: &mut ExitStats, vcpu_index: usize, vcpu: &mut V, tsc_khz: u32) {
    stats.count(ExitKind::Cpuid);
    let regs = vcpu.regs();
    let (leaf, subleaf) = (regs.gpr[reg::RAX] as u32, regs.gpr[reg::RCX] as u32);
    let view = || cpuid::XstateView {
        mask: xstate::guest_mask(),
        xcr0: vcpu.xcr0(),
        osxsave: vcpu.osxsave_enabled(),
    };
    let mut result = cpuid::emulate(leaf, subleaf, tsc_khz, view, host_cpuid);
    cpuid::show_apic_id(leaf, &mut result, vcpu_index as u32);
    let [eax, ebx, ecx, edx] = result;
    let regs = vcpu.regs();
    regs.gpr[reg::RAX] = eax.into();
    regs.gpr[reg::RBX] = ebx.into();
    regs.gpr[reg::RCX] = ecx.into();
    regs.gpr[reg::RDX] = edx.into();
    vcpu.skip_instruction();
}

/// Handles one exit of `vcpu`, vCPU `index` of `domain`.
#[inline(never)]
pub fn handle_exit<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    exit: VmExit,
    peers: &mut dyn DomainTable,
) -> Next {
    match exit {
        VmExit::Hypercall => hypercall_exit(domain, vcpu_index, vcpu, peers),
        VmExit::InvalidOpcode => invalid_opcode(domain, vcpu_index, vcpu, peers),
        VmExit::Cpuid => {
            let tsc_khz = domain.time.tsc_khz() as u32;
            cpuid_exit(
                &mut domain.vcpus[vcpu_index].stats,
                vcpu_index,
                vcpu,
                tsc_khz,
            );
            Next::Resume
        }
        VmExit::Xsetbv => {
            domain.vcpus[vcpu_index].stats.count(ExitKind::Other);
            xsetbv(vcpu);
            Next::Resume
        }
        VmExit::Hlt => hlt_exit(domain, vcpu_index, vcpu),
        VmExit::InterruptWindow => {
            domain.vcpus[vcpu_index]
                .stats
                .count(ExitKind::InterruptWindow);
            vcpu.set_interrupt_window_exiting(false);
            domain.vcpus[vcpu_index].window_requested = false;
            domain.vcpus[vcpu_index].requests.make(request::EVENT);
            Next::Resume
        }
        VmExit::Io { port, size, write } => port_io(domain, vcpu_index, vcpu, port, size, write),
        VmExit::StringIo(io) => string_port_io(domain, vcpu_index, vcpu, io),
        VmExit::CrAccess { cr, write, operand } => {
            domain.vcpus[vcpu_index].stats.count(ExitKind::Other);
            control_register_access(domain, vcpu_index, vcpu, cr, write, operand)
        }
        VmExit::Nmi => {
            // The NMI was the hypervisor's: its handler counted it (platform::cpu::HOST_NMIS);
            // the guest neither sees it nor loses anything.
            domain.vcpus[vcpu_index]
                .stats
                .count(ExitKind::ExternalInterrupt);
            Next::Resume
        }
        VmExit::EntryFailed(what, raw) => {
            domain.vcpus[vcpu_index].stats.count(ExitKind::Other);
            stop(
                domain,
                vcpu,
                format!("VM entry refused the vCPU state: {what} ({raw:#x})"),
            )
        }
        VmExit::MsrRead => msr_read_exit(domain, vcpu_index, vcpu),
        VmExit::MsrWrite => msr_write_exit(domain, vcpu_index, vcpu),
        VmExit::NestedPageFault { gpa, write } => {
            domain.vcpus[vcpu_index]
                .stats
                .count(ExitKind::NestedPageFault);
            let access = if write {
                "write to"
            } else {
                "read or fetch at"
            };
            let why = match grants::window_fault(domain, gpa, write) {
                None => format!("outside its memory: {access} guest-physical {gpa:#x}"),
                Some(WindowFault::ReadOnlyWrite) => {
                    format!("write to a read-only grant at {gpa:#x}")
                }
                Some(WindowFault::Unmapped) => format!(
                    "outside its memory: {access} guest-physical {gpa:#x} (a grant window page with nothing mapped)"
                ),
                Some(WindowFault::RevokedWithoutPage) => format!(
                    "{access} guest-physical {gpa:#x}: a revoked grant (no memory was left for its page of zeros)"
                ),
                Some(WindowFault::Stale) => {
                    // The page allows this access now: drop the old translation and retry.
                    domain.mark_nested_stale();
                    return Next::Resume;
                }
            };
            stop(domain, vcpu, why)
        }
        VmExit::TripleFault => {
            domain.vcpus[vcpu_index].stats.count(ExitKind::TripleFault);
            stop(domain, vcpu, String::from("triple fault"))
        }
        VmExit::ExternalInterrupt => {
            domain.vcpus[vcpu_index]
                .stats
                .count(ExitKind::ExternalInterrupt);
            Next::Resume
        }
        VmExit::Unexpected { code, info1, info2 } => {
            domain.vcpus[vcpu_index].stats.count(ExitKind::Other);
            stop(
                domain,
                vcpu,
                format!("unexpected exit {code:#x} (info {info1:#x} {info2:#x})"),
            )
        }
    }
}

/// A HLT exit of vCPU `vcpu_index`: the run loop calls it directly, as it does
/// [`msr_read_exit`] and [`msr_write_exit`], without the general dispatch of [`handle_exit`].
pub fn hlt_exit<V: VirtualCpu>(domain: &mut Domain, vcpu_index: usize, vcpu: &mut V) -> Next {
    domain.vcpus[vcpu_index].stats.count(ExitKind::Hlt);
    vcpu.skip_instruction();
    halt(domain, vcpu_index, vcpu)
}

/// An RDMSR exit of vCPU `vcpu_index`: the x2APIC's registers, or the architectural MSRs.
pub fn msr_read_exit<V: VirtualCpu>(domain: &mut Domain, vcpu_index: usize, vcpu: &mut V) -> Next {
    domain.vcpus[vcpu_index].stats.count(ExitKind::MsrRead);
    let index = vcpu.regs().gpr[reg::RCX] as u32;
    if VirtualLapic::owns_msr(index) {
        let tsc = read_tsc();
        let now = domain.time.ns_at(tsc);
        match domain.vcpus[vcpu_index].vlapic.read_msr(index, now, tsc) {
            Ok(value) => {
                let regs = vcpu.regs();
                regs.gpr[reg::RAX] = value & 0xffff_ffff;
                regs.gpr[reg::RDX] = value >> 32;
                vcpu.skip_instruction();
            }
            Err(_) => vcpu.inject_exception(vector::GENERAL_PROTECTION, Some(0)),
        }
        return Next::Resume;
    }
    match ArchMsr::from_index(index) {
        Some(msr) => {
            let value = vcpu.read_msr(msr);
            let regs = vcpu.regs();
            regs.gpr[reg::RAX] = value & 0xffff_ffff;
            regs.gpr[reg::RDX] = value >> 32;
            vcpu.skip_instruction();
        }
        None => vcpu.inject_exception(vector::GENERAL_PROTECTION, Some(0)),
    }
    Next::Resume
}

/// A WRMSR exit of vCPU `vcpu_index`: the x2APIC's registers, or the architectural MSRs.
pub fn msr_write_exit<V: VirtualCpu>(domain: &mut Domain, vcpu_index: usize, vcpu: &mut V) -> Next {
    domain.vcpus[vcpu_index].stats.count(ExitKind::MsrWrite);
    let regs = vcpu.regs();
    let index = regs.gpr[reg::RCX] as u32;
    let value = (regs.gpr[reg::RDX] << 32) | (regs.gpr[reg::RAX] & 0xffff_ffff);
    if VirtualLapic::owns_msr(index) {
        let tsc = read_tsc();
        let now = domain.time.ns_at(tsc);
        let state = &mut domain.vcpus[vcpu_index];
        match state.vlapic.write_msr(index, value, now, tsc) {
            Ok(ipi) => {
                // A timer, EOI or TPR change may make an interrupt due or deliverable;
                // only a timer change needs the host timer armed again.
                let timers = if state.vlapic.write_moves_timer(index) {
                    request::TIMERS
                } else {
                    0
                };
                state.requests.make(request::EVENT | timers);
                vcpu.skip_instruction();
                if let Some(ipi) = ipi {
                    apic_bus::deliver(domain, vcpu_index, ipi, || vcpu.arch_state().cr3);
                }
            }
            Err(_) => vcpu.inject_exception(vector::GENERAL_PROTECTION, Some(0)),
        }
        return Next::Resume;
    }
    match ArchMsr::from_index(index)
        .filter(|msr| msr_write_allowed(*msr, value, vcpu.read_msr(*msr)))
    {
        Some(msr) => {
            vcpu.write_msr(msr, value);
            vcpu.skip_instruction();
        }
        None => vcpu.inject_exception(vector::GENERAL_PROTECTION, Some(0)),
    }
    Next::Resume
}

/// XSETBV (docs/abi.md 18.2): XCR0 takes the value, or the guest gets the fault a CPU raises.
fn xsetbv<V: VirtualCpu>(vcpu: &mut V) {
    let regs = vcpu.regs().gpr;
    let value = (regs[reg::RDX] << 32) | (regs[reg::RAX] & 0xffff_ffff);
    let fault = xstate::xsetbv_fault(
        vcpu.osxsave_enabled(),
        vcpu.cpl(),
        regs[reg::RCX] as u32,
        value,
        xstate::guest_mask(),
    );
    match fault {
        Some((vector, error_code)) => vcpu.inject_exception(vector, error_code),
        None => {
            vcpu.set_xcr0(value);
            vcpu.skip_instruction();
        }
    }
}

/// HLT (RIP already past it): sleep until an interrupt can be injected, or stop the domain
/// when none ever can (docs/abi.md 7.2).
fn halt<V: VirtualCpu>(domain: &mut Domain, index: usize, vcpu: &mut V) -> Next {
    let state = &domain.vcpus[index];
    // The APIC first: a few loads, where the upcall's flags are a read of guest memory.
    if vcpu.interrupt_flag()
        && (state.vlapic.deliverable_vector().is_some()
            || state.upcall_vector != 0
                && matches!(
                    domain.events.upcall_flags(&domain.memory, index),
                    Ok((true, false))
                ))
    {
        // An interrupt is already due (it may have come while the vCPU was preempted between
        // STI and HLT): it is injected at the next entry and ends the HLT at once.
        domain.vcpus[index].requests.make(request::EVENT);
        return Next::Resume;
    }
    // The APIC timer first: the cheap and, for an unported kernel, the usual wake source.
    let can_wake = state.vlapic.timer_armed()
        || (state.upcall_vector != 0 && domain.events.can_wake(index, state.timers.armed()));
    // Else a sibling's IPI (docs/abi.md 14.1), unless every sibling that is up waits for
    // nothing either.
    let sibling_may_wake = state.vlapic.software_enabled() && domain.has_other_vcpu_up(index);
    if !vcpu.interrupt_flag() || !(can_wake || sibling_may_wake) {
        return stop(
            domain,
            vcpu,
            String::from(crate::common::domain::HALT_NEVER_WAKES),
        );
    }
    domain.vcpus[index].wait = Wait::Halt;
    if !can_wake && domain.never_wakes().is_some() {
        domain.vcpus[index].wait = Wait::None;
        return stop(
            domain,
            vcpu,
            String::from(crate::common::domain::HALT_NEVER_WAKES),
        );
    }
    domain.vcpus[index].requests.make(request::EVENT);
    Next::Sleep
}

/// A #UD: the other vendor's hypercall instruction is a hypercall; anything else is
/// reflected to the guest.
fn invalid_opcode<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    peers: &mut dyn DomainTable,
) -> Next {
    let mut bytes = [0u8; HYPERCALL_INSN_LEN as usize];
    let rip = vcpu.rip();
    let found =
        guest_paging::read_code(&domain.memory, vcpu.paging_mode(), rip, &mut bytes).is_some();
    if found && (bytes == VMCALL_BYTES || bytes == VMMCALL_BYTES) {
        let next = match enter_hypercall(domain, vcpu_index, vcpu, peers) {
            Next::Again => Next::Yield,
            next => {
                if next != Next::Stop {
                    vcpu.set_rip(rip.wrapping_add(HYPERCALL_INSN_LEN));
                }
                next
            }
        };
        return next;
    }
    domain.vcpus[vcpu_index]
        .stats
        .count(ExitKind::InvalidOpcode);
    vcpu.inject_exception(vector::INVALID_OPCODE, None);
    Next::Resume
}

/// The port space of a domain, as both `in`/`out` and string I/O see it (docs/abi.md 7.1, 7.4).
struct DomainPorts<'a> {
    uart: &'a mut Uart16550,
    console: &'a mut crate::common::domain::ConsoleLine,
    id: u32,
    /// The domain's clock, for the console budget.
    time: &'a crate::common::time::TimeBase,
}

fn is_uart_access(port: u16, size: u8) -> bool {
    port.wrapping_sub(COM1_BASE) < COM1_PORTS && size == 1
}

impl Ports for DomainPorts<'_> {
    fn port_in(&mut self, port: u16, size: u8) -> u32 {
        if is_uart_access(port, size) {
            u32::from(self.uart.read(port.wrapping_sub(COM1_BASE)))
        } else {
            // Reads of ports nothing emulates float high, as on real hardware.
            match size {
                1 => 0xff,
                2 => 0xffff,
                _ => 0xffff_ffff,
            }
        }
    }

    fn port_out(&mut self, port: u16, size: u8, value: u32) {
        // Writes to ports nothing emulates are dropped, as on a bus with nothing behind them.
        if is_uart_access(port, size)
            && let Some(byte) = self.uart.write(port.wrapping_sub(COM1_BASE), value as u8)
        {
            let time = self.time;
            self.console
                .uart_byte(self.id, byte, || time.ns_at(read_tsc()));
        }
    }
}

/// Counts a port access of `size` bytes at `port` (UART or other, docs/abi.md 15) and returns
/// the domain's ports, with its memory for string I/O.
fn count_port_access(
    domain: &mut Domain,
    vcpu_index: usize,
    port: u16,
    size: u8,
) -> (
    DomainPorts<'_>,
    &crate::common::memory::guest_memory::GuestMemory,
) {
    domain.vcpus[vcpu_index]
        .stats
        .count(if is_uart_access(port, size) {
            ExitKind::IoUart
        } else {
            ExitKind::IoOther
        });
    let ports = DomainPorts {
        uart: &mut domain.uart,
        console: &mut domain.console,
        id: domain.id,
        time: &domain.time,
    };
    (ports, &domain.memory)
}

/// An IN or OUT exit ([`VmExit::Io`]) of vCPU `vcpu_index`, as [`handle_exit`] handles it.
pub fn port_exit<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    port: u16,
    size: u8,
    write: bool,
) -> Next {
    port_io(domain, vcpu_index, vcpu, port, size, write)
}

#[inline(always)]
fn port_io<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    port: u16,
    size: u8,
    write: bool,
) -> Next {
    let mask: u64 = match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    };
    let (mut ports, _) = count_port_access(domain, vcpu_index, port, size);
    let regs = vcpu.regs();
    if write {
        ports.port_out(port, size, regs.gpr[reg::RAX] as u32);
    } else {
        let value = u64::from(ports.port_in(port, size));
        regs.gpr[reg::RAX] = (regs.gpr[reg::RAX] & !mask) | value;
    }
    vcpu.skip_instruction();
    Next::Resume
}

/// INS/OUTS (docs/abi.md 18.5): the elements go through the same ports as single accesses; a
/// fault on the buffer is the guest's, at the instruction.
fn string_port_io<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    io: StringIo,
) -> Next {
    let (mut ports, memory) = count_port_access(domain, vcpu_index, io.port, io.size);
    let outcome = string_io::emulate(io, vcpu, memory, &mut ports, |v| {
        let mut code = [0u8; 15];
        // Unreadable code leaves no prefixes: DS, the default.
        let _ = guest_paging::read_code(memory, v.paging_mode(), v.rip(), &mut code);
        code
    });
    match outcome {
        Outcome::Done => vcpu.skip_instruction(),
        Outcome::Partial => {}
        Outcome::Fault(fault) => {
            if let Some(cr2) = fault.cr2 {
                vcpu.set_cr2(cr2);
            }
            vcpu.inject_exception(fault.vector, Some(fault.error_code));
        }
    }
    Next::Resume
}

/// What the guest's CPU offers it for CR4 and CR3 checks: its CPUID leaves 1, 7 and
/// 0x8000_0008 as the guest reads them, and what the hardware can run.
fn cr_context<V: VirtualCpu>(domain: &Domain, vcpu: &V, state: &ArchState) -> CrContext {
    let tsc_khz = domain.time.tsc_khz() as u32;
    // The leaves as this vCPU reads them: CR4.OSXSAVE is allowed only where XSAVE is offered.
    let view = || cpuid::XstateView {
        mask: xstate::guest_mask(),
        xcr0: vcpu.xcr0(),
        osxsave: vcpu.osxsave_enabled(),
    };
    let leaf = |n: u32| cpuid::emulate(n, 0, tsc_khz, view, host_cpuid);
    let max_basic = leaf(0)[0];
    let max_extended = leaf(0x8000_0000)[0];
    let leaf7 = if max_basic >= 7 { leaf(7) } else { [0; 4] };
    let max_phys_bits = if max_extended >= 0x8000_0008 {
        leaf(0x8000_0008)[0] as u8
    } else {
        36
    };
    CrContext {
        cr0: state.cr0,
        cr3: state.cr3,
        cr4: state.cr4,
        efer: state.efer,
        cr4_allowed: control_regs::cr4_allowed_by_cpuid(leaf(1), leaf7)
            & vcpu.cr4_hardware_allowed(),
        max_phys_bits,
    }
}

/// MOV to or from a control register, LMSW or CLTS that reached the hypervisor (docs/abi.md
/// 18.3, 18.4): checked as the CPU checks it, #GP(0) with the register unchanged otherwise.
fn control_register_access<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    cr: u8,
    write: bool,
    operand: CrOperand,
) -> Next {
    let state = vcpu.arch_state();
    let rip = vcpu.rip();
    let gpr_value = |vcpu: &mut V, gpr: u8| {
        if usize::from(gpr) == 4 {
            state.rsp
        } else {
            vcpu.regs().gpr[usize::from(gpr & 0xf)]
        }
    };
    let (cr, write, value, gpr, length) = match operand {
        CrOperand::Decode => {
            let mut code = [0u8; 15];
            let readable =
                guest_paging::read_code(&domain.memory, vcpu.paging_mode(), rip, &mut code)
                    .is_some();
            match control_regs::decode_mov_cr(&code).filter(|_| readable) {
                Some(CrInstruction::Write { cr, gpr, len }) => {
                    (cr, true, gpr_value(vcpu, gpr), gpr, Some(len))
                }
                Some(CrInstruction::Read { cr, gpr, len }) => (cr, false, 0, gpr, Some(len)),
                Some(CrInstruction::Clts { len }) => (
                    0,
                    true,
                    state.cr0 & !Cr0Flags::TASK_SWITCHED.bits(),
                    0,
                    Some(len),
                ),
                Some(CrInstruction::Lmsw { gpr, len }) => {
                    let source = gpr_value(vcpu, gpr);
                    (
                        0,
                        true,
                        control_regs::lmsw_value(state.cr0, source),
                        0,
                        Some(len),
                    )
                }
                None => {
                    return stop(
                        domain,
                        vcpu,
                        format!(
                            "a control-register access at {rip:#x} the hypervisor cannot decode (LMSW with a memory operand is not emulated)"
                        ),
                    );
                }
            }
        }
        CrOperand::Gpr(gpr) => (
            cr,
            write,
            if write { gpr_value(vcpu, gpr) } else { 0 },
            gpr,
            None,
        ),
        CrOperand::Value(value) => (cr, write, value, 0, None),
    };
    if write {
        // CR8 depends on nothing else: no need to ask CPUID.
        let accepted = if cr == 8 {
            control_regs::check_cr8_write(value)
        } else {
            control_regs::check_cr_write(cr, value, &cr_context(domain, vcpu, &state))
        };
        match accepted {
            Ok(value) if cr == 8 => {
                // CR8 is the TPR (SDM Vol. 3A 10.8.6): a lower class may let a held vector in.
                let state = &mut domain.vcpus[vcpu_index];
                let _ = state.vlapic.write_cr8(value);
                state.requests.make(request::EVENT);
            }
            Ok(value) => vcpu.set_control_register(cr, value),
            Err(control_regs::Fault) => {
                vcpu.inject_exception(vector::GENERAL_PROTECTION, Some(0));
                return Next::Resume;
            }
        }
    } else {
        let value = match cr {
            8 => domain.vcpus[vcpu_index].vlapic.cr8(),
            0 => state.cr0,
            2 => state.cr2,
            3 => state.cr3,
            4 => state.cr4,
            _ => {
                vcpu.inject_exception(vector::INVALID_OPCODE, None);
                return Next::Resume;
            }
        };
        if gpr == 4 {
            vcpu.set_rsp(value);
        } else {
            vcpu.regs().gpr[usize::from(gpr & 0xf)] = value;
        }
    }
    match length {
        Some(len) => vcpu.set_rip(rip.wrapping_add(len.into())),
        None => vcpu.skip_instruction(),
    }
    Next::Resume
}

/// Whether a WRMSR value is architecturally valid; an invalid one raises #GP, as on hardware.
fn msr_write_allowed(msr: ArchMsr, value: u64, current: u64) -> bool {
    match msr {
        // The guest may toggle SCE and NXE; leaving long mode this way is not allowed, and
        // LMA is read-only.
        ArchMsr::Efer => {
            let long_mode = EferFlags::LONG_MODE_ENABLE | EferFlags::LONG_MODE_ACTIVE;
            let writable =
                long_mode | EferFlags::SYSTEM_CALL_EXTENSIONS | EferFlags::NO_EXECUTE_ENABLE;
            value & !writable.bits() == 0 && (value ^ current) & long_mode.bits() == 0
        }
        ArchMsr::FsBase
        | ArchMsr::GsBase
        | ArchMsr::KernelGsBase
        | ArchMsr::Lstar
        | ArchMsr::Cstar => is_canonical(value),
        ArchMsr::SysenterEsp | ArchMsr::SysenterEip => is_canonical(value),
        ArchMsr::Pat => value
            .to_le_bytes()
            .iter()
            .all(|t| matches!(t, 0 | 1 | 4 | 5 | 6 | 7)),
        ArchMsr::Sfmask => value >> 32 == 0,
        ArchMsr::Star | ArchMsr::SysenterCs => true,
        // Writing the TSC would move this domain's clock; not offered.
        ArchMsr::Tsc => false,
    }
}

fn stop<V: VirtualCpu>(domain: &mut Domain, vcpu: &mut V, why: String) -> Next {
    let rip = vcpu.rip();
    let state = vcpu.arch_state();
    domain.end(Ending::Fault(format!(
        "{why} ({})",
        stop_summary(rip, &state)
    )));
    report_registers(domain, vcpu, rip, &state);
    Next::Stop
}

/// The key facts of a stopped vCPU, for the `stopped:` line (docs/abi.md 18.7).
fn stop_summary(rip: u64, state: &ArchState) -> String {
    let mut text = format!("rsp={:#x} cr2={:#x} rip={:#x}", state.rsp, state.cr2, rip);
    if let Some(event) = describe_event(state.interrupted_event, state.interrupted_error) {
        text.push_str(", while delivering ");
        text.push_str(&event);
    }
    text
}

/// An interrupted event (VMX IDT-vectoring information, SVM EXITINTINFO) in words.
fn describe_event(info: u32, error: u32) -> Option<String> {
    if info & (1 << 31) == 0 {
        return None;
    }
    let vector = info as u8;
    let what = match (info >> 8) & 7 {
        0 => format!("external interrupt {vector:#x}"),
        2 => String::from("NMI"),
        3 => format!("{} (vector {vector})", vector::name(vector)),
        4 => format!("software interrupt {vector:#x}"),
        6 => format!("software exception {vector}"),
        kind => format!("event type {kind} vector {vector}"),
    };
    Some(if info & (1 << 11) != 0 {
        format!("{what} error code {error:#x}")
    } else {
        what
    })
}

/// The whole state of a stopped vCPU on `[hv]` lines after the `stopped:` line.
fn report_registers<V: VirtualCpu>(domain: &Domain, vcpu: &mut V, rip: u64, state: &ArchState) {
    let g = vcpu.regs().gpr;
    log::error!(
        "d{} {}: rip={rip:#x} rsp={:#x} rflags={:#x} cs={:#x} ss={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} event={:#x} event_error={:#x}",
        domain.id,
        domain.name,
        state.rsp,
        state.rflags,
        state.cs,
        state.ss,
        state.cr0,
        state.cr2,
        state.cr3,
        state.cr4,
        state.efer,
        state.interrupted_event,
        state.interrupted_error,
    );
    log::error!(
        "d{} {}: rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x} r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
        domain.id,
        domain.name,
        g[0],
        g[3],
        g[1],
        g[2],
        g[6],
        g[7],
        g[5],
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    );
    let mut text = String::new();
    let _ = vcpu.dump(&mut text);
    log::error!("d{} {}: {}", domain.id, domain.name, text);
}

fn host_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

#[cfg(test)]
mod tests {
    /// `handle_exit` for a domain with no other domains around.
    fn exit_alone(d: &mut Domain, v: &mut MockVcpu, exit: VmExit) -> Next {
        handle_exit(d, 0, v, exit, &mut crate::common::domain::NoPeers)
    }

    use super::*;
    use crate::common::domain::DomainState;
    use crate::common::memory::guest_memory::GuestMemory;
    use crate::common::memory::guest_memory::testing::{TestMemory, test_memory};
    use crate::common::output::testing::take_lines;
    use crate::common::testing::MockVcpu;

    fn domain() -> (TestMemory, Domain) {
        let t = test_memory(4 << 20);
        // SAFETY: the domain's view aliases the test memory, which outlives it in the tuple.
        let mem = unsafe { GuestMemory::new(t.mem.host_base() as *mut u8, t.mem.size()) };
        (
            t,
            Domain::new(
                2,
                "t".into(),
                mem,
                crate::common::time::TimeBase::new(1_000_000_000, 0, 0, 0),
            ),
        )
    }

    /// Domain 2 with two vCPUs, both up, their APICs software-enabled.
    fn two_vcpus_with_apics() -> (TestMemory, Domain) {
        let (t, mut d) = domain();
        let memory = core::mem::replace(&mut d.memory, GuestMemory::empty());
        let mut d = Domain::with_vcpus(2, "t".into(), memory, d.time, 2);
        for state in &mut d.vcpus {
            state.up = true;
            state.vlapic.write_msr(0x80f, 0x1ff, 0, 0).unwrap();
        }
        (t, d)
    }

    #[test]
    fn hlt_waits_for_a_siblings_ipi_until_every_vcpu_waits_for_nothing() {
        let (_t, mut d) = two_vcpus_with_apics();
        let mut v0 = MockVcpu {
            interrupt_flag: true,
            ..Default::default()
        };
        let mut v1 = MockVcpu {
            interrupt_flag: true,
            ..Default::default()
        };
        let peers = &mut crate::common::domain::NoPeers;
        assert_eq!(
            handle_exit(&mut d, 0, &mut v0, VmExit::Hlt, peers),
            Next::Sleep
        );
        assert_eq!(d.vcpus[0].wait, Wait::Halt);
        // vCPU 1 sends vCPU 0 an IPI and halts: vCPU 0 has an interrupt coming, so both wait.
        v1.regs.gpr[reg::RCX] = 0x830;
        v1.regs.gpr[reg::RAX] = 0x41;
        assert_eq!(
            handle_exit(&mut d, 1, &mut v1, VmExit::MsrWrite, peers),
            Next::Resume
        );
        assert_eq!(d.vcpus[0].vlapic.deliverable_vector(), Some(0x41));
        assert_eq!(
            handle_exit(&mut d, 1, &mut v1, VmExit::Hlt, peers),
            Next::Sleep
        );
        assert!(d.is_runnable());
        // Taken, and vCPU 0 halts again: nothing but each other could wake them, and neither
        // can. The domain is stopped rather than left asleep for ever.
        d.vcpus[0].vlapic.acknowledge(0x41);
        d.vcpus[0].wait = Wait::None;
        assert_eq!(
            handle_exit(&mut d, 0, &mut v0, VmExit::Hlt, peers),
            Next::Stop
        );
        assert!(!d.is_runnable());
    }

    #[test]
    fn hlt_with_a_software_disabled_apic_and_no_timer_stops_even_with_siblings() {
        let (_t, mut d) = two_vcpus_with_apics();
        d.vcpus[0].vlapic.write_msr(0x80f, 0xff, 0, 0).unwrap();
        let mut v0 = MockVcpu {
            interrupt_flag: true,
            ..Default::default()
        };
        let peers = &mut crate::common::domain::NoPeers;
        assert_eq!(
            handle_exit(&mut d, 0, &mut v0, VmExit::Hlt, peers),
            Next::Stop
        );
    }

    #[test]
    fn uart_bytes_reach_the_console_one_exit_each() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        for &byte in b"ok\n" {
            v.regs.gpr[reg::RAX] = byte.into();
            exit_alone(
                &mut d,
                &mut v,
                VmExit::Io {
                    port: 0x3f8,
                    size: 1,
                    write: true,
                },
            );
        }
        assert_eq!(take_lines(), ["(d2) ok"]);
        assert_eq!(d.vcpus[0].stats.of(ExitKind::IoUart), 3);
        assert_eq!(v.skipped, 3);
        v.regs.gpr[reg::RAX] = 0x1234_5600;
        exit_alone(
            &mut d,
            &mut v,
            VmExit::Io {
                port: 0x3fd,
                size: 1,
                write: false,
            },
        );
        assert_eq!(
            v.regs.gpr[reg::RAX],
            0x1234_5660,
            "LSR: transmitter empty, upper bytes kept"
        );
    }

    #[test]
    fn in_uart_loopback_bytes_come_back_through_in_and_print_nothing() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        let io = |d: &mut Domain, v: &mut MockVcpu, port: u16, write: bool| {
            exit_alone(
                d,
                v,
                VmExit::Io {
                    port,
                    size: 1,
                    write,
                },
            );
        };
        for (port, value) in [(0x3fc, 0x10), (0x3f8, 0xae)] {
            v.regs.gpr[reg::RAX] = value;
            io(&mut d, &mut v, port, true);
        }
        io(&mut d, &mut v, 0x3fd, false);
        assert_eq!(v.regs.gpr[reg::RAX], 0x61, "LSR: data ready");
        io(&mut d, &mut v, 0x3f8, false);
        assert_eq!(v.regs.gpr[reg::RAX], 0xae, "RBR: the byte written");
        v.regs.gpr[reg::RAX] = 0x0b;
        io(&mut d, &mut v, 0x3fc, true);
        d.end(Ending::Poweroff);
        assert!(take_lines().is_empty(), "nothing printed");
    }

    #[test]
    fn unemulated_ports_read_all_ones_and_ignore_writes() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        for (size, expected) in [(1, 0xff), (2, 0xffff), (4, 0xffff_ffff)] {
            v.regs.gpr[reg::RAX] = 0;
            exit_alone(
                &mut d,
                &mut v,
                VmExit::Io {
                    port: 0x2f0,
                    size,
                    write: false,
                },
            );
            assert_eq!(v.regs.gpr[reg::RAX], expected);
        }
        exit_alone(
            &mut d,
            &mut v,
            VmExit::Io {
                port: 0x2f0,
                size: 1,
                write: true,
            },
        );
        assert!(d.is_runnable());
    }

    #[test]
    fn unknown_msrs_and_bad_values_raise_gp() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        v.regs.gpr[reg::RCX] = 0x1234_5678;
        exit_alone(&mut d, &mut v, VmExit::MsrRead);
        assert_eq!(v.injected, Some((vector::GENERAL_PROTECTION, Some(0))));
        assert_eq!(v.skipped, 0, "a faulting instruction is not skipped");
        v.injected = None;
        v.regs.gpr[reg::RCX] = 0xc000_0100; // FS base
        v.regs.gpr[reg::RDX] = 0x8000;
        v.regs.gpr[reg::RAX] = 0;
        exit_alone(&mut d, &mut v, VmExit::MsrWrite);
        assert_eq!(
            v.injected,
            Some((vector::GENERAL_PROTECTION, Some(0))),
            "non-canonical base"
        );
        v.injected = None;
        v.regs.gpr[reg::RDX] = 0;
        v.regs.gpr[reg::RAX] = 0x1000;
        exit_alone(&mut d, &mut v, VmExit::MsrWrite);
        assert_eq!(
            (v.injected, v.msr_writes.as_slice()),
            (None, &[(ArchMsr::FsBase, 0x1000)][..])
        );
    }

    #[test]
    fn the_other_vendors_hypercall_instruction_is_a_hypercall() {
        let (t, mut d) = domain();
        let mut v = MockVcpu {
            rip: 0x20_0000,
            ..Default::default()
        };
        for bytes in [VMCALL_BYTES, VMMCALL_BYTES] {
            t.mem.write(0x20_0000, &bytes).unwrap();
            v.rip = 0x20_0000;
            v.regs.gpr[reg::RAX] = 0;
            exit_alone(&mut d, &mut v, VmExit::InvalidOpcode);
            assert_eq!(
                (v.rip, v.regs.gpr[reg::RAX]),
                (0x20_0003, lamina_abi::abi_version().into())
            );
        }
        t.mem.write(0x20_0000, &[0x0f, 0x0b, 0x90]).unwrap(); // ud2
        v.rip = 0x20_0000;
        exit_alone(&mut d, &mut v, VmExit::InvalidOpcode);
        assert_eq!(
            (v.rip, v.injected),
            (0x20_0000, Some((vector::INVALID_OPCODE, None)))
        );
    }

    #[test]
    fn faults_stop_only_the_faulting_domain_with_a_reason() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        assert_eq!(exit_alone(&mut d, &mut v, VmExit::TripleFault), Next::Stop);
        assert_eq!(
            d.state,
            DomainState::Ended(Ending::Fault(
                "triple fault (rsp=0x0 cr2=0x0 rip=0x0)".into()
            ))
        );
        let (_t2, mut d2) = domain();
        exit_alone(
            &mut d2,
            &mut v,
            VmExit::NestedPageFault {
                gpa: 0x1_0000_0000,
                write: true,
            },
        );
        assert!(
            matches!(&d2.state, DomainState::Ended(Ending::Fault(why)) if why.contains("0x100000000"))
        );
    }

    fn string_io(port: u16, size: u8, input: bool, rep: bool) -> VmExit {
        VmExit::StringIo(StringIo {
            port,
            size,
            input,
            rep,
            address_bits: 64,
            segment: Some(crate::common::vcpu::string_io::Segment::Ds),
        })
    }

    #[test]
    fn rep_outsb_to_the_uart_prints_like_single_outs() {
        let (t, mut d) = domain();
        t.mem.write(0x1_0000, b"hi there\n").unwrap();
        let mut v = MockVcpu::default();
        v.regs.gpr[reg::RSI] = 0x1_0000;
        v.regs.gpr[reg::RCX] = 9;
        exit_alone(&mut d, &mut v, string_io(0x3f8, 1, false, true));
        assert_eq!(take_lines(), ["(d2) hi there"]);
        assert_eq!((v.regs.gpr[reg::RCX], v.regs.gpr[reg::RSI]), (0, 0x1_0009));
        assert_eq!((v.skipped, v.injected), (1, None));
    }

    #[test]
    fn ins_from_nothing_reads_all_ones_and_a_buffer_past_ram_faults_in_the_guest() {
        let (t, mut d) = domain();
        let mut v = MockVcpu::default();
        v.regs.gpr[reg::RDI] = 0x2_0000;
        exit_alone(&mut d, &mut v, string_io(0x2f0, 2, true, false));
        let mut word = [0u8; 3];
        t.mem.read(0x2_0000, &mut word).unwrap();
        assert_eq!(word, [0xff, 0xff, 0]);
        assert_eq!(v.regs.gpr[reg::RDI], 0x2_0002);
        // rep insd with 4 elements, 2 of them past the end of RAM (4 MiB).
        let end = 4 << 20;
        v.regs.gpr[reg::RDI] = end - 8;
        v.regs.gpr[reg::RCX] = 4;
        v.skipped = 0;
        let next = exit_alone(&mut d, &mut v, string_io(0x2f0, 4, true, true));
        assert_eq!(next, Next::Resume, "the domain runs on");
        assert_eq!(v.injected, Some((vector::GENERAL_PROTECTION, Some(0))));
        assert_eq!((v.regs.gpr[reg::RCX], v.regs.gpr[reg::RDI]), (2, end));
        assert_eq!(v.skipped, 0, "RIP stays at the instruction");
        assert_eq!(t.mem.read_u64(end - 8).unwrap(), u64::MAX);
    }

    #[test]
    fn cr8_writes_and_reads_are_the_tpr() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        v.regs.gpr[reg::RAX] = 5;
        let write = VmExit::CrAccess {
            cr: 8,
            write: true,
            operand: CrOperand::Gpr(0),
        };
        exit_alone(&mut d, &mut v, write);
        assert_eq!(d.vcpus[0].vlapic.tpr(), 0x50);
        exit_alone(
            &mut d,
            &mut v,
            VmExit::CrAccess {
                cr: 8,
                write: false,
                operand: CrOperand::Gpr(3),
            },
        );
        assert_eq!(v.regs.gpr[reg::RBX], 5);
        v.regs.gpr[reg::RAX] = 0x10;
        exit_alone(&mut d, &mut v, write);
        assert_eq!(v.injected, Some((vector::GENERAL_PROTECTION, Some(0))));
        assert_eq!(d.vcpus[0].vlapic.tpr(), 0x50, "kept");
    }

    #[test]
    fn a_refused_cr4_write_is_a_gp_and_an_accepted_one_lands() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu {
            state: ArchState {
                cr0: 0x8001_0033,
                cr3: 0x4000,
                cr4: 0x620,
                efer: 0x500,
                ..Default::default()
            },
            ..Default::default()
        };
        let write = VmExit::CrAccess {
            cr: 4,
            write: true,
            operand: CrOperand::Gpr(0),
        };
        v.regs.gpr[reg::RAX] = 0x600; // PAE clear in long mode
        exit_alone(&mut d, &mut v, write);
        assert_eq!(v.injected, Some((vector::GENERAL_PROTECTION, Some(0))));
        assert_eq!((v.state.cr4, v.skipped), (0x620, 0));
        v.injected = None;
        v.regs.gpr[reg::RAX] = 0x624; // TSD
        exit_alone(&mut d, &mut v, write);
        assert_eq!((v.injected, v.state.cr4, v.skipped), (None, 0x624, 1));
    }

    #[test]
    fn xsetbv_sets_xcr0_or_raises_the_cpus_fault() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        let try_xsetbv = |v: &mut MockVcpu, d: &mut Domain, ecx: u64, value: u64| {
            v.injected = None;
            v.regs.gpr[reg::RCX] = ecx;
            v.regs.gpr[reg::RAX] = value & 0xffff_ffff | 0xdead_0000_0000_0000;
            v.regs.gpr[reg::RDX] = value >> 32;
            exit_alone(d, v, VmExit::Xsetbv);
            v.injected
        };
        // The mask is the machine's: whatever a test CPU offers, x87 alone is always valid
        // once XSAVE is there, and nothing is without it.
        xstate::set_guest_mask(xstate::guest_xcr0_mask(host_cpuid));
        let mask = xstate::guest_mask();
        let gp = Some((vector::GENERAL_PROTECTION, Some(0)));
        let ud = Some((vector::INVALID_OPCODE, None));
        assert_eq!(try_xsetbv(&mut v, &mut d, 0, 1), ud, "CR4.OSXSAVE clear");
        v.osxsave = true;
        if mask == 0 {
            assert_eq!(try_xsetbv(&mut v, &mut d, 0, 1), ud, "no XSAVE");
            return;
        }
        assert_eq!(try_xsetbv(&mut v, &mut d, 1, 1), gp, "ECX 1");
        assert_eq!(try_xsetbv(&mut v, &mut d, 0, 1 << 40), gp, "reserved bit");
        assert_eq!(v.xcr0(), xstate::XCR0_RESET, "unchanged by faults");
        assert_eq!(v.skipped, 0, "a faulting XSETBV is not skipped");
        assert_eq!(try_xsetbv(&mut v, &mut d, 0, 1), None);
        assert_eq!((v.xcr0(), v.skipped), (1, 1), "upper RAX ignored");
        v.cpl = 3;
        assert_eq!(try_xsetbv(&mut v, &mut d, 0, 3), gp, "CPL 3");
    }

    #[test]
    fn the_preemption_deadline_is_reloaded_after_long_handling_and_near_the_slices_end() {
        let mut v = MockVcpu::default();
        let mut clock = PreemptionClock::new(1_000_000);
        clock.count(&mut v, 1_000, 100_000);
        clock.count(&mut v, RELOAD_AFTER_TSC / 2, 200_000);
        assert_eq!(v.preemption_reloads, 0, "little handling, far from the end");
        clock.count(&mut v, RELOAD_AFTER_TSC, 300_000);
        assert_eq!(v.preemption_reloads, 1, "handling added up");
        clock.count(&mut v, 10, 1_000_000 - RELOAD_AFTER_TSC);
        assert_eq!(v.preemption_reloads, 2, "any exit near the end");
        clock.count_quick(&mut v, 1_000_000 - RELOAD_AFTER_TSC - 1);
        assert_eq!(v.preemption_reloads, 2, "quick exits: only near the end");
        clock.count_quick(&mut v, 1_000_000 - RELOAD_AFTER_TSC);
        clock.count_quick(&mut v, 1_000_000);
        assert_eq!(v.preemption_reloads, 4);
    }

    #[test]
    fn cpuid_exits_return_the_lamina_leaves() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        v.regs.gpr[reg::RAX] = 0x4000_0001;
        exit_alone(&mut d, &mut v, VmExit::Cpuid);
        assert_eq!(v.regs.gpr[reg::RAX], lamina_abi::abi_version().into());
        assert_eq!(v.skipped, 1);
    }
}

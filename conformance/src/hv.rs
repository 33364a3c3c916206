//! The hypercalls of ABI 1.3 as the conformance kernel makes them: the `lamina_abi` numbers,
//! the instruction native to the CPU, RAX returned as a [`Status`] (docs/abi.md 2 and 3).
//!
//! The tests call the hypervisor here rather than through the guest SDK, so that they check
//! the ABI itself and not a wrapper's view of it. Calls that only read guest memory, or none,
//! are safe functions whatever the address they are given (a hypervisor reading the wrong
//! memory cannot harm us); calls that make the hypervisor write guest memory are `unsafe`.

use core::arch::asm;
use core::sync::atomic::{AtomicU8, Ordering};

use lamina_abi::Hypercall;
use lamina_abi::console::ConsoleOp;
use lamina_abi::domctl::{DomainInfo, DomctlOp, PhysInfo};
use lamina_abi::event_channel::EventChannelOp;
use lamina_abi::memory::{MemoryOp, MemoryRegion};
use lamina_abi::multicall::MulticallEntry;
use lamina_abi::sched::{SchedOp, ShutdownReason};
use lamina_abi::stats::{ExitCounters, StatsOp};
use lamina_abi::vcpu::VcpuOp;

use crate::framework::Status;

/// `VMCALL` (Intel) or `VMMCALL` (AMD), chosen once from the CPUID vendor.
static NATIVE_INSN: AtomicU8 = AtomicU8::new(UNKNOWN);
const UNKNOWN: u8 = 0;
const VMCALL: u8 = 1;
const VMMCALL: u8 = 2;

/// Whether the CPU is AMD's (or Hygon's), whose native instruction is `VMMCALL`.
fn native_is_vmmcall() -> bool {
    let mut native = NATIVE_INSN.load(Ordering::Relaxed);
    if native == UNKNOWN {
        let vendor = lamina_guest_sdk::cpuid::vendor();
        native = match &vendor {
            b"AuthenticAMD" | b"HygonGenuine" => VMMCALL,
            _ => VMCALL,
        };
        NATIVE_INSN.store(native, Ordering::Relaxed);
    }
    native == VMMCALL
}

/// Hypercall `number` with `args` in RDI, RSI, RDX, R10, R8.
///
/// # Safety
/// Every buffer the call makes the hypervisor write must be memory the caller owns and may
/// have overwritten; a call that does not return (shutdown) must leave nothing undone.
pub(crate) unsafe fn hypercall(number: u64, args: [u64; 5]) -> Status {
    let [a1, a2, a3, a4, a5] = args;
    let rax: u64;
    if native_is_vmmcall() {
        // SAFETY: the caller vouches for the call; the ABI preserves every register but RAX
        // and uses no stack. Not `nomem`: the hypervisor reads and writes guest memory, and
        // an upcall may be injected right after the instruction.
        unsafe {
            asm!("vmmcall", inlateout("rax") number => rax, in("rdi") a1, in("rsi") a2,
                 in("rdx") a3, in("r10") a4, in("r8") a5, options(nostack))
        };
    } else {
        // SAFETY: as above.
        unsafe {
            asm!("vmcall", inlateout("rax") number => rax, in("rdi") a1, in("rsi") a2,
                 in("rdx") a3, in("r10") a4, in("r8") a5, options(nostack))
        };
    }
    Status(rax)
}

/// A hypercall that writes no guest memory (or only memory nobody reads).
fn call(number: Hypercall, args: [u64; 5]) -> Status {
    // SAFETY: the callers below pass calls that write no guest memory.
    unsafe { hypercall(number as u64, args) }
}

/// `version`.
pub(crate) fn version() -> Status {
    call(Hypercall::Version, [0; 5])
}

// ----- console_io (3.2) -----

/// `console_io` operation `op` on `[gpa, gpa + len)`, for operations that only read it.
pub(crate) fn console_io(op: u64, gpa: u64, len: u64) -> Status {
    call(Hypercall::ConsoleIo, [op, gpa, len, 0, 0])
}

/// Console write of `bytes`.
pub(crate) fn console_write(bytes: &[u8]) -> Status {
    console_io(
        ConsoleOp::Write as u64,
        bytes.as_ptr() as u64,
        bytes.len() as u64,
    )
}

/// Console read into `[gpa, gpa + len)`.
///
/// # Safety
/// The hypervisor may write the whole buffer: it must be ours to overwrite.
pub(crate) unsafe fn console_read_at(gpa: u64, len: u64) -> Status {
    // SAFETY: forwarded.
    unsafe {
        hypercall(
            Hypercall::ConsoleIo as u64,
            [ConsoleOp::Read as u64, gpa, len, 0, 0],
        )
    }
}

/// Console read into `buffer`.
pub(crate) fn console_read(buffer: &mut [u8]) -> Status {
    // SAFETY: the buffer is ours, borrowed mutably for the call.
    unsafe { console_read_at(buffer.as_mut_ptr() as u64, buffer.len() as u64) }
}

// ----- sched_op (3.3) -----

/// `sched_op` operation `op` with `args`, for operations that write no guest memory.
pub(crate) fn sched_op(op: u64, args: [u64; 4]) -> Status {
    let [a2, a3, a4, a5] = args;
    call(Hypercall::SchedOp, [op, a2, a3, a4, a5])
}

/// YieldTo `vcpu` (docs/abi.md 3.3).
pub(crate) fn yield_to(vcpu: u64) -> Status {
    sched_op(SchedOp::YieldTo as u64, [vcpu, 0, 0, 0])
}

/// Yield.
pub(crate) fn sched_yield() -> Status {
    sched_op(SchedOp::Yield as u64, [0; 4])
}

/// Block: clears the upcall mask and waits for `evtchn_upcall_pending`.
pub(crate) fn block() -> Status {
    sched_op(SchedOp::Block as u64, [0; 4])
}

/// Poll on `count` ports at `gpa` until one is pending or system time reaches `deadline` (0:
/// none).
pub(crate) fn poll_at(gpa: u64, count: u64, deadline: u64) -> Status {
    sched_op(SchedOp::Poll as u64, [gpa, count, deadline, 0])
}

/// Poll on `ports` until one is pending or system time reaches `deadline` (0: none).
pub(crate) fn poll(ports: &[u32], deadline: u64) -> Status {
    poll_at(ports.as_ptr() as u64, ports.len() as u64, deadline)
}

/// Shutdown with a raw reason: returns only when the hypervisor refuses it.
pub(crate) fn shutdown_raw(reason: u64) -> Status {
    sched_op(SchedOp::Shutdown as u64, [reason, 0, 0, 0])
}

/// Shutdown: does not return.
pub(crate) fn shutdown(reason: ShutdownReason) -> ! {
    shutdown_raw(reason as u64);
    loop {
        // SAFETY: should the hypervisor return from shutdown, stop here for good: CLI; HLT
        // only stops this vCPU (and the hypervisor stops a vCPU that can never wake).
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

// ----- event_channel_op (8) -----

/// `event_channel_op` operation `op`: no operation touches guest memory.
pub(crate) fn event_channel_op(op: u64, a1: u64, a2: u64) -> Status {
    call(Hypercall::EventChannelOp, [op, a1, a2, 0, 0])
}

/// BindIpiSlot: slot `slot` of vCPU `vcpu` (docs/abi.md 8.10).
pub(crate) fn bind_ipi_slot(vcpu: u64, slot: u64) -> Status {
    event_channel_op(EventChannelOp::BindIpiSlot as u64, vcpu, slot)
}

/// SendIpi: slot `slot` on the vCPUs of `mask` (docs/abi.md 8.11).
pub(crate) fn send_ipi(mask: u64, slot: u64) -> Status {
    event_channel_op(EventChannelOp::SendIpi as u64, mask, slot)
}

/// AllocUnbound for `remote`.
pub(crate) fn alloc_unbound(remote: u64) -> Status {
    event_channel_op(EventChannelOp::AllocUnbound as u64, remote, 0)
}

/// BindVirq of `virq` on `vcpu`.
pub(crate) fn bind_virq(virq: u64, vcpu: u64) -> Status {
    event_channel_op(EventChannelOp::BindVirq as u64, virq, vcpu)
}

/// BindIpi on `vcpu`.
pub(crate) fn bind_ipi(vcpu: u64) -> Status {
    event_channel_op(EventChannelOp::BindIpi as u64, vcpu, 0)
}

/// Send on `port`.
pub(crate) fn send(port: u64) -> Status {
    event_channel_op(EventChannelOp::Send as u64, port, 0)
}

/// Close `port`.
pub(crate) fn close(port: u64) -> Status {
    event_channel_op(EventChannelOp::Close as u64, port, 0)
}

/// Unmask `port`.
pub(crate) fn unmask(port: u64) -> Status {
    event_channel_op(EventChannelOp::Unmask as u64, port, 0)
}

/// BindInterdomain to `port` of domain `remote`.
pub(crate) fn bind_interdomain(remote: u64, port: u64) -> Status {
    event_channel_op(EventChannelOp::BindInterdomain as u64, remote, port)
}

/// Status of `port` (packed `PortStatus`).
pub(crate) fn port_status(port: u64) -> Status {
    event_channel_op(EventChannelOp::Status as u64, port, 0)
}

// ----- vcpu_op (9) -----

/// `vcpu_op` operation `op` on `vcpu` with `arg`.
///
/// # Safety
/// RegisterVcpuInfo and RegisterRunstate make the hypervisor write the area at `arg` from now
/// on: it must be ours for good.
pub(crate) unsafe fn vcpu_op(op: u64, vcpu: u64, arg: u64) -> Status {
    // SAFETY: forwarded.
    unsafe { hypercall(Hypercall::VcpuOp as u64, [op, vcpu, arg, 0, 0]) }
}

/// `vcpu_op` operations that write no guest memory.
fn vcpu_op_no_memory(op: VcpuOp, vcpu: u64, arg: u64) -> Status {
    // SAFETY: timers and the upcall vector write no guest memory.
    unsafe { vcpu_op(op as u64, vcpu, arg) }
}

/// SetPeriodicTimer of `vcpu` to `period` ns (0 stops).
pub(crate) fn set_periodic_timer(vcpu: u64, period: u64) -> Status {
    vcpu_op_no_memory(VcpuOp::SetPeriodicTimer, vcpu, period)
}

/// SetSingleshotTimer of `vcpu` at system time `deadline` (0 cancels).
pub(crate) fn set_singleshot_timer(vcpu: u64, deadline: u64) -> Status {
    vcpu_op_no_memory(VcpuOp::SetSingleshotTimer, vcpu, deadline)
}

/// SetUpcallVector of `vcpu` to `vector` (0: none).
pub(crate) fn set_upcall_vector(vcpu: u64, vector: u64) -> Status {
    vcpu_op_no_memory(VcpuOp::SetUpcallVector, vcpu, vector)
}

/// RegisterVcpuInfo of `vcpu` at `gpa`.
///
/// # Safety
/// As for [`vcpu_op`]: 64 bytes at `gpa` become the hypervisor's to write.
pub(crate) unsafe fn register_vcpu_info(vcpu: u64, gpa: u64) -> Status {
    // SAFETY: forwarded.
    unsafe { vcpu_op(VcpuOp::RegisterVcpuInfo as u64, vcpu, gpa) }
}

/// RegisterRunstate of `vcpu` at `gpa` (0 unregisters).
///
/// # Safety
/// As for [`vcpu_op`]: 48 bytes at `gpa` become the hypervisor's to write.
pub(crate) unsafe fn register_runstate(vcpu: u64, gpa: u64) -> Status {
    // SAFETY: forwarded.
    unsafe { vcpu_op(VcpuOp::RegisterRunstate as u64, vcpu, gpa) }
}

// ----- memory_op (11) -----

/// `memory_op` operation `op`.
///
/// # Safety
/// GetMemoryMap writes `a2` regions at `a1`: they must be ours to overwrite.
pub(crate) unsafe fn memory_op(op: u64, a1: u64, a2: u64) -> Status {
    // SAFETY: forwarded.
    unsafe { hypercall(Hypercall::MemoryOp as u64, [op, a1, a2, 0, 0]) }
}

/// GetMemoryMap into `regions`.
pub(crate) fn memory_map(regions: &mut [MemoryRegion]) -> Status {
    // SAFETY: the regions are ours, borrowed mutably for the call.
    unsafe {
        memory_op(
            MemoryOp::GetMemoryMap as u64,
            regions.as_mut_ptr() as u64,
            regions.len() as u64,
        )
    }
}

/// FlushTlb of the vCPUs of `mask`: the `count` addresses at guest-physical `gpa`, or all
/// (docs/abi.md 11).
pub(crate) fn flush_tlb(mask: u64, gpa: u64, count: u64) -> Status {
    call(
        Hypercall::MemoryOp,
        [MemoryOp::FlushTlb as u64, mask, gpa, count, 0],
    )
}

/// CurrentReservation.
pub(crate) fn current_reservation() -> Status {
    // SAFETY: CurrentReservation writes no guest memory.
    unsafe { memory_op(MemoryOp::CurrentReservation as u64, 0, 0) }
}

// ----- multicall (12) -----

/// A multicall entry for hypercall `op` with `args`, its result preset to `result`.
pub(crate) fn entry(op: Hypercall, args: [u64; 5], result: u64) -> MulticallEntry {
    MulticallEntry {
        op: op as u64,
        args,
        result,
    }
}

/// Multicall of `count` entries at `gpa`.
///
/// # Safety
/// The hypervisor writes each entry's result, and the entries' own calls may write guest
/// memory: all of it must be ours to overwrite.
pub(crate) unsafe fn multicall_at(gpa: u64, count: u64) -> Status {
    // SAFETY: forwarded.
    unsafe { hypercall(Hypercall::Multicall as u64, [gpa, count, 0, 0, 0]) }
}

/// Multicall of `entries`.
///
/// # Safety
/// The entries' own calls may write guest memory: it must be ours to overwrite.
pub(crate) unsafe fn multicall(entries: &mut [MulticallEntry]) -> Status {
    // SAFETY: the entries are ours, borrowed mutably; the caller vouches for their calls.
    unsafe { multicall_at(entries.as_mut_ptr() as u64, entries.len() as u64) }
}

// ----- stats_op (15) -----

/// `stats_op` operation `op` for vCPU `vcpu` of `domain` into the 272 bytes at `gpa`.
///
/// # Safety
/// ExitCounters writes an `ExitCounters` at `gpa`: it must be ours to overwrite.
pub(crate) unsafe fn stats_op(op: u64, domain: u64, vcpu: u64, gpa: u64) -> Status {
    // SAFETY: forwarded.
    unsafe { hypercall(Hypercall::StatsOp as u64, [op, domain, vcpu, gpa, 0]) }
}

/// ExitCounters of vCPU `vcpu` of `domain` into `out`.
pub(crate) fn exit_counters(domain: u64, vcpu: u64, out: &mut ExitCounters) -> Status {
    // SAFETY: `out` is ours, borrowed mutably for the call; any bit pattern is valid.
    unsafe {
        stats_op(
            StatsOp::ExitCounters as u64,
            domain,
            vcpu,
            core::ptr::from_mut(out) as u64,
        )
    }
}

// ----- domctl_op (17) -----

/// `domctl_op` operation `op` with RSI, RDX, R10, R8 = `args`.
///
/// # Safety
/// ListDomains, ReadConsole and PhysInfo write guest memory at the address they are given:
/// it must be ours to overwrite.
pub(crate) unsafe fn domctl_op(op: u64, args: [u64; 4]) -> Status {
    let [a2, a3, a4, a5] = args;
    // SAFETY: forwarded.
    unsafe { hypercall(Hypercall::DomctlOp as u64, [op, a2, a3, a4, a5]) }
}

/// Pause, unpause or destroy (or an unknown operation) on `domain`: writes no guest memory.
pub(crate) fn domctl(op: u64, domain: u64) -> Status {
    debug_assert!(
        op != DomctlOp::ListDomains as u64
            && op != DomctlOp::ReadConsole as u64
            && op != DomctlOp::PhysInfo as u64
    );
    // SAFETY: these operations write no guest memory.
    unsafe { domctl_op(op, [domain, 0, 0, 0]) }
}

/// ListDomains into `infos`.
pub(crate) fn list_domains(infos: &mut [DomainInfo]) -> Status {
    // SAFETY: the entries are ours, borrowed mutably; any bytes are a valid DomainInfo.
    unsafe {
        domctl_op(
            DomctlOp::ListDomains as u64,
            [infos.as_mut_ptr() as u64, infos.len() as u64, 0, 0],
        )
    }
}

/// ReadConsole of `domain` from stream offset `offset` into `buffer`.
pub(crate) fn read_console(domain: u64, offset: u64, buffer: &mut [u8]) -> Status {
    // SAFETY: the buffer is ours, borrowed mutably for the call.
    unsafe {
        domctl_op(
            DomctlOp::ReadConsole as u64,
            [
                domain,
                offset,
                buffer.as_mut_ptr() as u64,
                buffer.len() as u64,
            ],
        )
    }
}

/// PhysInfo into `out`.
pub(crate) fn phys_info(out: &mut PhysInfo) -> Status {
    // SAFETY: `out` is ours, borrowed mutably; any bytes are a valid PhysInfo.
    unsafe {
        domctl_op(
            DomctlOp::PhysInfo as u64,
            [core::ptr::from_mut(out) as u64, 0, 0, 0],
        )
    }
}

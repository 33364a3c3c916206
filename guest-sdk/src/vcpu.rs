//! Per-vCPU operations (`vcpu_op`, docs/abi.md 9 and 19): where a vCPU's shared structures
//! live, its timers, its upcall vector, and bringing secondary vCPUs up and down.
//! [`crate::timer`] has the friendlier timer interface.

use core::cell::UnsafeCell;

use lamina_abi::Hypercall;
use lamina_abi::shared_info::VcpuInfo;
use lamina_abi::vcpu::{RunstateInfo, VcpuOp, VcpuStartState};

use crate::hypercall::{self, HypercallError};

/// Makes vCPU operation `operation` on `vcpu` with argument `argument`.
///
/// # Safety
/// If the operation makes the hypervisor write guest memory at `argument`, that memory must
/// be the caller's to give away for as long as the registration lasts.
unsafe fn op(operation: VcpuOp, vcpu: u32, argument: u64) -> Result<u64, HypercallError> {
    // SAFETY: forwarded to the caller.
    unsafe {
        hypercall::call(
            Hypercall::VcpuOp,
            [operation as u64, u64::from(vcpu), argument, 0, 0],
        )
    }
}

/// Raises VIRQ_TIMER on `vcpu` every `period_ns` (at least `PERIOD_MIN_NS`), first at now +
/// period; 0 stops it (docs/abi.md 9.3).
pub fn set_periodic_timer(vcpu: u32, period_ns: u64) -> Result<(), HypercallError> {
    // SAFETY: timers touch no guest memory.
    unsafe { op(VcpuOp::SetPeriodicTimer, vcpu, period_ns) }.map(|_| ())
}

/// Raises VIRQ_TIMER on `vcpu` once system time reaches `deadline_ns`; 0 cancels
/// (docs/abi.md 9.3).
pub fn set_singleshot_timer(vcpu: u32, deadline_ns: u64) -> Result<(), HypercallError> {
    // SAFETY: timers touch no guest memory.
    unsafe { op(VcpuOp::SetSingleshotTimer, vcpu, deadline_ns) }.map(|_| ())
}

/// Delivers `vcpu`'s event upcall as interrupt `vector` (32..=255), or not at all (0)
/// (docs/abi.md 9.4). [`crate::events::install_upcall`] also installs the handler.
pub fn set_upcall_vector(vcpu: u32, vector: u8) -> Result<(), HypercallError> {
    // SAFETY: touches no guest memory.
    unsafe { op(VcpuOp::SetUpcallVector, vcpu, u64::from(vector)) }.map(|_| ())
}

/// Gives secondary vCPU `vcpu` the state it starts in (docs/abi.md 19.1): RIP, RSP, CR3 and
/// the argument it finds in RDI. Once per vCPU; vCPU 0 cannot be initialised (`-EEXIST`).
pub fn initialise(vcpu: u32, start: &VcpuStartState) -> Result<(), HypercallError> {
    // SAFETY: the hypervisor only reads the 32 bytes of `start`.
    unsafe {
        op(
            VcpuOp::Initialise,
            vcpu,
            start as *const VcpuStartState as u64,
        )
    }
    .map(|_| ())
}

/// Brings vCPU `vcpu` up (docs/abi.md 19.2): it runs from its start state, or, after
/// [`down`], from where it stopped. Nothing happens if it is up.
///
/// # Safety
/// The start state given to [`initialise`] must be code and a stack the new vCPU may use
/// concurrently with the others: it runs in the same address space, at the same time.
pub unsafe fn up(vcpu: u32) -> Result<(), HypercallError> {
    // SAFETY: forwarded to the caller; the operation itself touches no memory.
    unsafe { op(VcpuOp::Up, vcpu, 0) }.map(|_| ())
}

/// Takes vCPU `vcpu` down (docs/abi.md 19.3); called on the caller's own vCPU, returns once
/// another vCPU brings it up again. `-EBUSY` for the last vCPU that is up.
pub fn down(vcpu: u32) -> Result<(), HypercallError> {
    // SAFETY: touches no guest memory.
    unsafe { op(VcpuOp::Down, vcpu, 0) }.map(|_| ())
}

/// Whether vCPU `vcpu` is up (docs/abi.md 19.4).
pub fn is_up(vcpu: u32) -> Result<bool, HypercallError> {
    // SAFETY: touches no guest memory.
    unsafe { op(VcpuOp::IsUp, vcpu, 0) }.map(|up| up != 0)
}

/// The number of the vCPU the caller runs on: its initial APIC id, from CPUID leaf 1
/// (docs/abi.md 19). Costs an exit: a kernel keeps it in its per-CPU data.
pub fn this_vcpu() -> u32 {
    // CPUID is available on every x86-64 CPU and has no side effects.
    core::arch::x86_64::__cpuid(1).ebx >> 24
}

/// A 64-byte-aligned home for a vCPU's [`VcpuInfo`], for [`register_vcpu_info`].
#[repr(C, align(64))]
pub struct VcpuInfoArea(UnsafeCell<VcpuInfo>);

// SAFETY: once registered, the area is accessed only through `crate::shared::VcpuShared`,
// which uses atomics.
unsafe impl Sync for VcpuInfoArea {}

impl VcpuInfoArea {
    /// A zeroed area (the hypervisor copies the current contents in when it is registered).
    pub const fn new() -> Self {
        VcpuInfoArea(UnsafeCell::new(VcpuInfo {
            evtchn_upcall_pending: 0,
            evtchn_upcall_mask: 0,
            pad0: [0; 6],
            evtchn_pending_sel: 0,
            time: lamina_abi::shared_info::VcpuTimeInfo {
                version: 0,
                pad0: 0,
                tsc_timestamp: 0,
                system_time: 0,
                tsc_to_system_mul: 0,
                tsc_shift: 0,
                flags: 0,
                pad1: [0; 2],
            },
            pad1: [0; 16],
        }))
    }
}

impl Default for VcpuInfoArea {
    fn default() -> Self {
        Self::new()
    }
}

/// Moves `vcpu`'s [`VcpuInfo`] out of the shared-info page into `area` (docs/abi.md 9.1); the
/// SDK then uses the new place. Once per vCPU (`EEXIST` after).
pub fn register_vcpu_info(vcpu: u32, area: &'static VcpuInfoArea) -> Result<(), HypercallError> {
    let gpa = area.0.get() as u64;
    // SAFETY: the area is 'static, aligned, and from now on accessed only atomically.
    unsafe { op(VcpuOp::RegisterVcpuInfo, vcpu, gpa) }?;
    crate::shared::record_moved_vcpu_info(vcpu, gpa);
    Ok(())
}

/// Where the hypervisor keeps a vCPU's [`RunstateInfo`] current, for [`register_runstate`].
#[repr(C, align(8))]
pub struct RunstateArea(UnsafeCell<RunstateInfo>);

// SAFETY: the hypervisor writes it, the guest only takes volatile copies.
unsafe impl Sync for RunstateArea {}

impl RunstateArea {
    /// A zeroed area.
    pub const fn new() -> Self {
        RunstateArea(UnsafeCell::new(RunstateInfo {
            state: 0,
            reserved: 0,
            state_entry_time: 0,
            time: [0; 4],
        }))
    }

    /// A copy of what the hypervisor last wrote. Fields may come from two different updates
    /// when one happens during the copy; on the vCPU it describes, the hypervisor only writes
    /// while the vCPU is not running, so a copy taken there is consistent.
    pub fn read(&self) -> RunstateInfo {
        // SAFETY: the area is valid and every bit pattern is a valid RunstateInfo.
        unsafe { core::ptr::read_volatile(self.0.get()) }
    }
}

impl Default for RunstateArea {
    fn default() -> Self {
        Self::new()
    }
}

/// Has the hypervisor keep `area` current with `vcpu`'s run state and the time spent in each
/// state (docs/abi.md 9.2); steal time is `time[RUNNABLE]`.
pub fn register_runstate(vcpu: u32, area: &'static RunstateArea) -> Result<(), HypercallError> {
    // SAFETY: the area is 'static and only read through volatile copies.
    unsafe { op(VcpuOp::RegisterRunstate, vcpu, area.0.get() as u64) }.map(|_| ())
}

/// Stops run-state updates for `vcpu`.
pub fn unregister_runstate(vcpu: u32) -> Result<(), HypercallError> {
    // SAFETY: 0 unregisters; no memory is handed over.
    unsafe { op(VcpuOp::RegisterRunstate, vcpu, 0) }.map(|_| ())
}

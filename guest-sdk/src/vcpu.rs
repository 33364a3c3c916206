//! Per-vCPU operations (`vcpu_op`, docs/abi.md 9): where a vCPU's shared structures live, its
//! timers and its upcall vector. [`crate::timer`] has the friendlier timer interface.

use core::cell::UnsafeCell;

use lamina_abi::Hypercall;
use lamina_abi::shared_info::VcpuInfo;
use lamina_abi::vcpu::{RunstateInfo, VcpuOp};

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

//! Per-vCPU operations (`Hypercall::VcpuOp`): where the vCPU's shared structures live, its
//! timers, its upcall vector, and bringing secondary vCPUs up and down.
//!
//! `RDI` = operation, `RSI` = vCPU number (`0..nr_vcpus`, otherwise `-ENOENT`), `RDX` = the
//! operation's argument. Times are system time: nanoseconds since the hypervisor started, as
//! the pvclock in [`crate::shared_info::VcpuTimeInfo`] computes it.

/// vCPU operations (RDI).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VcpuOp {
    /// Move this vCPU's [`crate::shared_info::VcpuInfo`] out of the shared-info page to
    /// guest-physical `RDX` (64-byte aligned, otherwise `-EINVAL`; inside RAM, otherwise
    /// `-EFAULT`). The current contents are copied there. Once per vCPU (`-EEXIST` after).
    RegisterVcpuInfo = 0,
    /// Have the hypervisor keep a [`RunstateInfo`] at guest-physical `RDX` (8-byte aligned)
    /// current; 0 stops it.
    RegisterRunstate = 1,
    /// Raise VIRQ_TIMER every `RDX` ns from now (0 stops; below [`PERIOD_MIN_NS`] is
    /// `-EINVAL`). Periods are kept on a fixed grid: a late tick does not shift later ones.
    SetPeriodicTimer = 2,
    /// Raise VIRQ_TIMER once, when system time reaches `RDX` (0 cancels). A deadline already
    /// past fires at once. Never fires early.
    SetSingleshotTimer = 3,
    /// Deliver this vCPU's event upcall as interrupt vector `RDX` (32..=255; 0 = none, events
    /// then only end `block` and `poll`). Other values are `-EINVAL`.
    SetUpcallVector = 4,
    /// Give vCPU `RSI` (down, never initialised, not vCPU 0) the state it starts in: a
    /// [`VcpuStartState`] at guest-physical `RDX` (8-byte aligned). `-EEXIST` once it was
    /// initialised (vCPU 0 always was); `-EINVAL` for a non-canonical RIP or RSP or a CR3 that
    /// is not a page of RAM. Since ABI 1.5.
    Initialise = 5,
    /// Bring vCPU `RSI` up: it starts running from its start state (or, after `down`, where it
    /// stopped). `-EINVAL` if it was never initialised; 0 and nothing done if it is up.
    Up = 6,
    /// Take vCPU `RSI` down: it stops at once (the caller itself: the call returns when it is
    /// brought up again). `-EBUSY` if it is the last vCPU of the domain that is up; 0 and
    /// nothing done if it is down.
    Down = 7,
    /// 1 if vCPU `RSI` is up, 0 if down.
    IsUp = 8,
}

/// The start state of a secondary vCPU (`VcpuOp::Initialise`, docs/abi.md 19). Everything
/// else is as at the start of day (docs/abi.md 4.1): 64-bit mode, the boot GDT, interrupts
/// off, the other general registers 0, the extended state in its initial configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStartState {
    /// First instruction (canonical).
    pub rip: u64,
    /// Stack pointer (canonical).
    pub rsp: u64,
    /// Root of its page tables: a page-aligned address of a page of RAM.
    pub cr3: u64,
    /// Passed in RDI.
    pub argument: u64,
}
const _: () = assert!(core::mem::size_of::<VcpuStartState>() == 32);
const _: () = assert!(core::mem::offset_of!(VcpuStartState, cr3) == 16);

impl TryFrom<u64> for VcpuOp {
    type Error = crate::Errno;

    fn try_from(op: u64) -> Result<Self, Self::Error> {
        Ok(match op {
            0 => VcpuOp::RegisterVcpuInfo,
            1 => VcpuOp::RegisterRunstate,
            2 => VcpuOp::SetPeriodicTimer,
            3 => VcpuOp::SetSingleshotTimer,
            4 => VcpuOp::SetUpcallVector,
            5 => VcpuOp::Initialise,
            6 => VcpuOp::Up,
            7 => VcpuOp::Down,
            8 => VcpuOp::IsUp,
            _ => return Err(crate::Errno::ENOSYS),
        })
    }
}

/// Shortest periodic timer period.
pub const PERIOD_MIN_NS: u64 = 50_000;

/// Run states, as in [`RunstateInfo::state`] and the index of [`RunstateInfo::time`].
pub mod runstate {
    /// Running on a physical CPU.
    pub const RUNNING: u32 = 0;
    /// Ready, waiting for a physical CPU (steal time).
    pub const RUNNABLE: u32 = 1;
    /// Waiting for an event (block, poll).
    pub const BLOCKED: u32 = 2;
    /// Not started or stopped.
    pub const OFFLINE: u32 = 3;
}

/// Where a vCPU's time went (Xen's `vcpu_runstate_info`); steal time is `time[RUNNABLE]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RunstateInfo {
    /// Current [`runstate`].
    pub state: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// System time at which `state` was entered.
    pub state_entry_time: u64,
    /// Nanoseconds spent in each state, indexed by [`runstate`].
    pub time: [u64; 4],
}

const _: () = assert!(core::mem::size_of::<RunstateInfo>() == 48);

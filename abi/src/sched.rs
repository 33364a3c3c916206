//! Scheduling operations (`Hypercall::SchedOp`).
//!
//! `RDI` = operation, `RSI`.. = its arguments.

/// Scheduling operations (RDI).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchedOp {
    /// Give up the CPU to other runnable vCPUs. Returns 0.
    Yield = 0,
    /// The replacement for HLT: clears this vCPU's upcall mask and waits until an event is
    /// pending for it (`upcall_pending`), returning 0 at once when one already is. A vCPU
    /// with no timer armed and no event channel that could ever fire is stopped, as for HLT.
    Block = 1,
    /// Stop the domain for good. RSI = [`ShutdownReason`]. Does not return; an unknown
    /// reason returns `-EINVAL` and the domain runs on.
    Shutdown = 2,
    /// Wait until one of a set of ports is pending, or a deadline. RSI = guest-physical
    /// address of an array of `u32` ports, RDX = their number (1..=[`POLL_PORTS_MAX`]),
    /// R10 = absolute system time in ns to give up at (0: no deadline). Returns 0 when a
    /// listed port is pending (at once if one already is), `-ETIMEDOUT` at the deadline.
    /// Upcall delivery is not changed: poll works with events masked.
    Poll = 3,
    /// A directed yield: give the CPU to vCPU `RSI` of the caller's domain (the holder of a
    /// lock the caller waits for). If it is ready and not running it runs next, before other
    /// ready vCPUs; otherwise this is a plain yield. Returns 0. `-ENOENT`: no such vCPU;
    /// `-EINVAL`: the caller itself. Since ABI 1.6.
    YieldTo = 4,
}

impl TryFrom<u64> for SchedOp {
    type Error = crate::Errno;

    fn try_from(op: u64) -> Result<Self, Self::Error> {
        match op {
            0 => Ok(SchedOp::Yield),
            1 => Ok(SchedOp::Block),
            2 => Ok(SchedOp::Shutdown),
            3 => Ok(SchedOp::Poll),
            4 => Ok(SchedOp::YieldTo),
            _ => Err(crate::Errno::ENOSYS),
        }
    }
}

/// Most ports one poll may wait on.
pub const POLL_PORTS_MAX: u64 = 128;

/// Why a domain shut down (RSI of `SchedOp::Shutdown`).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShutdownReason {
    /// Orderly power-off: the only ending that counts as success.
    Poweroff = 0,
    /// The guest asks to be restarted (reported; Lamina does not restart domains yet).
    Reboot = 1,
    /// The guest detected a fatal error (for example a kernel panic).
    Crash = 2,
}

impl TryFrom<u64> for ShutdownReason {
    type Error = crate::Errno;

    fn try_from(reason: u64) -> Result<Self, Self::Error> {
        match reason {
            0 => Ok(ShutdownReason::Poweroff),
            1 => Ok(ShutdownReason::Reboot),
            2 => Ok(ShutdownReason::Crash),
            _ => Err(crate::Errno::EINVAL),
        }
    }
}

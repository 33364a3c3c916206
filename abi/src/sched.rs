//! Scheduling operations (`Hypercall::SchedOp`).
//!
//! `RDI` = operation, `RSI` = its argument.

/// Scheduling operations (RDI).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchedOp {
    /// Give up the CPU to other runnable vCPUs. Returns 0.
    Yield = 0,
    /// Stop the domain for good. RSI = [`ShutdownReason`]. Does not return; an unknown
    /// reason returns `-EINVAL` and the domain runs on.
    Shutdown = 2,
}

impl TryFrom<u64> for SchedOp {
    type Error = crate::Errno;

    fn try_from(op: u64) -> Result<Self, Self::Error> {
        match op {
            0 => Ok(SchedOp::Yield),
            2 => Ok(SchedOp::Shutdown),
            _ => Err(crate::Errno::ENOSYS),
        }
    }
}

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

//! Scheduling (`sched_op`, docs/abi.md 3.3): yield, block, poll, shutdown.

use lamina_abi::Hypercall;
use lamina_abi::sched::{POLL_PORTS_MAX, SchedOp, ShutdownReason};

use crate::events::Port;
use crate::hypercall::{self, HypercallError};
use lamina_abi::Errno;

/// Gives the CPU to another ready vCPU of this physical CPU for one turn, if one is ready;
/// after it the caller competes by CPU time for its weight as usual, so the ready vCPUs that
/// have had less than it run first too (docs/abi.md 3.3). Returns at once if none is ready.
pub fn yield_now() -> Result<(), HypercallError> {
    hypercall::sched_yield()
}

/// A directed yield: gives the CPU to vCPU `vcpu` of this domain (the holder of a lock the
/// caller waits for) if it is ready and not running, otherwise a plain yield (docs/abi.md 3.3;
/// ABI 1.6). `EINVAL` for the caller's own vCPU, `ENOENT` for one that does not exist.
pub fn yield_to(vcpu: u32) -> Result<(), HypercallError> {
    // SAFETY: yield_to takes no buffer.
    unsafe {
        hypercall::call(
            Hypercall::SchedOp,
            [SchedOp::YieldTo as u64, u64::from(vcpu), 0, 0, 0],
        )
    }
    .map(|_| ())
}

/// The replacement for HLT: clears this vCPU's upcall mask and sleeps until an event is
/// pending for it (returns at once if one is). With RFLAGS.IF set the upcall then runs the
/// handlers; with IF clear it runs at the next `sti`, so "check for work with interrupts
/// off, then block" loses no wake-up (docs/abi.md 3.3).
///
/// A vCPU that blocks with nothing that could ever wake it (no bound timer armed, no console
/// VIRQ) is stopped by the hypervisor.
pub fn block() -> Result<(), HypercallError> {
    // SAFETY: block takes no buffer.
    unsafe { hypercall::call(Hypercall::SchedOp, [SchedOp::Block as u64, 0, 0, 0, 0]) }.map(|_| ())
}

/// How a [`poll`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollOutcome {
    /// One of the ports is pending (its pending bit is still set: consume it with
    /// [`crate::events::clear_pending`] or let the dispatcher run).
    Pending,
    /// The deadline passed first.
    TimedOut,
}

/// Waits until one of `ports` is pending, or until system time reaches `deadline_ns` (`None`:
/// no deadline). Works with upcalls masked and without an upcall vector. At most
/// `POLL_PORTS_MAX` ports; none is `EINVAL`.
pub fn poll(ports: &[Port], deadline_ns: Option<u64>) -> Result<PollOutcome, HypercallError> {
    if ports.is_empty() || ports.len() as u64 > POLL_PORTS_MAX {
        return Err(HypercallError::Errno(Errno::EINVAL));
    }
    // SAFETY: the hypervisor only reads the array (`Port` is a transparent `u32`), which we
    // borrow for the call.
    let result = unsafe {
        hypercall::call(
            Hypercall::SchedOp,
            [
                SchedOp::Poll as u64,
                ports.as_ptr() as u64,
                ports.len() as u64,
                deadline_ns.unwrap_or(0),
                0,
            ],
        )
    };
    match result {
        Ok(_) => Ok(PollOutcome::Pending),
        Err(error) if error == Errno::ETIMEDOUT => Ok(PollOutcome::TimedOut),
        Err(error) => Err(error),
    }
}

/// Stops the domain for good with `reason`, after flushing the console.
pub fn shutdown(reason: ShutdownReason) -> ! {
    hypercall::shutdown(reason)
}

//! Console I/O (`Hypercall::ConsoleIo`).
//!
//! `RDI` = operation, `RSI` = guest-physical address of the buffer, `RDX` = length in bytes.
//! The whole buffer must lie inside the caller's RAM (otherwise `-EFAULT`).

/// Console operations (RDI).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsoleOp {
    /// Write `len` bytes to the domain's console. Returns the number of bytes written (all of
    /// them). `len == 0` writes nothing and returns 0, whatever the address; `len >
    /// CONSOLE_WRITE_MAX` is `-EINVAL` (checked before the address, see docs/abi.md 2.4).
    Write = 0,
}

impl TryFrom<u64> for ConsoleOp {
    type Error = crate::Errno;

    fn try_from(op: u64) -> Result<Self, Self::Error> {
        match op {
            0 => Ok(ConsoleOp::Write),
            _ => Err(crate::Errno::ENOSYS),
        }
    }
}

/// Largest buffer one console write accepts.
pub const CONSOLE_WRITE_MAX: u64 = 4096;

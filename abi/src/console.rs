//! Console I/O (`Hypercall::ConsoleIo`) and the shared console ring.
//!
//! Two ways to print. The hypercall: `RDI` = operation, `RSI` = guest-physical address of the
//! buffer, `RDX` = length; one exit per call. The ring: a page of guest RAM
//! ([`crate::layout::CONSOLE_RING_GPA`]) that the guest fills and the hypervisor drains at the
//! domain's next exit of any kind, or at once when the guest sends on
//! [`crate::StartInfo::console_port`]; many lines, no exit of their own.

/// Console operations (RDI).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsoleOp {
    /// Write `len` bytes to the domain's console. Returns the number of bytes written (all of
    /// them). `len == 0` writes nothing and returns 0, whatever the address; `len >
    /// CONSOLE_WRITE_MAX` is `-EINVAL` (checked before the address, see docs/abi.md 2.4);
    /// more than the console budget holds ([`CONSOLE_BUDGET_BYTES`]) is `-EAGAIN`, nothing
    /// printed (since 1.6).
    Write = 0,
    /// Read up to `len` bytes of console input into the buffer. Returns the number of bytes
    /// read, 0 when none is waiting (it never blocks; VIRQ_CONSOLE signals new input).
    /// `len > CONSOLE_WRITE_MAX` is `-EINVAL`.
    Read = 1,
}

impl TryFrom<u64> for ConsoleOp {
    type Error = crate::Errno;

    fn try_from(op: u64) -> Result<Self, Self::Error> {
        match op {
            0 => Ok(ConsoleOp::Write),
            1 => Ok(ConsoleOp::Read),
            _ => Err(crate::Errno::ENOSYS),
        }
    }
}

/// Largest buffer one console write or read accepts.
pub const CONSOLE_WRITE_MAX: u64 = 4096;

/// Console output a domain may have printed at once: its budget when full (docs/abi.md 13.1).
/// `console_io` write, the console ring and the UART draw on the same budget.
pub const CONSOLE_BUDGET_BYTES: u64 = 32 * 1024;
/// How fast the console budget refills, in bytes per second of system time (below the
/// 11,520 bytes a second of the machine's 115200-baud serial line, so one domain alone cannot
/// keep the line busy).
pub const CONSOLE_BUDGET_BYTES_PER_S: u64 = 8 * 1024;

/// Size of the ring's input buffer.
pub const CONSOLE_RING_INPUT_BYTES: usize = 1024;
/// Size of the ring's output buffer.
pub const CONSOLE_RING_OUTPUT_BYTES: usize = 2048;

/// The console ring page (as Xen's `xencons_interface`). Indices run freely and are reduced
/// modulo the buffer size; `prod - cons` is the number of bytes waiting.
///
/// Output: the guest writes bytes at `output[out_prod % size]`, then advances `out_prod`
/// (after a release fence); the hypervisor consumes and advances `out_cons`. Input: the
/// hypervisor produces into `input` and raises VIRQ_CONSOLE; the guest consumes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConsoleRing {
    /// Console input, produced by the hypervisor.
    pub input: [u8; CONSOLE_RING_INPUT_BYTES],
    /// Console output, produced by the guest.
    pub output: [u8; CONSOLE_RING_OUTPUT_BYTES],
    /// Input consumer index (guest).
    pub in_cons: u32,
    /// Input producer index (hypervisor).
    pub in_prod: u32,
    /// Output consumer index (hypervisor).
    pub out_cons: u32,
    /// Output producer index (guest).
    pub out_prod: u32,
}

const _: () = assert!(core::mem::size_of::<ConsoleRing>() == 3088);
const _: () = assert!(core::mem::offset_of!(ConsoleRing, in_cons) == 3072);
const _: () = assert!(core::mem::offset_of!(ConsoleRing, out_prod) == 3084);

//! Hypercalls: the raw calling convention and typed wrappers (docs/abi.md sections 2 and 3).
//!
//! The number goes in RAX, up to five arguments in RDI, RSI, RDX, R10, R8, and the result comes
//! back in RAX (`>= 0` success, `-errno` failure); every other register is preserved. Lamina
//! accepts both `VMCALL` (Intel) and `VMMCALL` (AMD) on both vendors. The SDK uses the one
//! native to the CPU by default ([`native_insn`], chosen at start of day from the CPUID vendor),
//! because a hypervisor nested under another one only sees the native instruction cheaply; the
//! `_with` variants pick one explicitly, for tests.
//!
//! The typed wrappers pass buffers by their address, which is their guest-physical address
//! under the boot identity map (see the crate documentation).

use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

use lamina_abi::console::{CONSOLE_WRITE_MAX, ConsoleOp};
use lamina_abi::sched::{SchedOp, ShutdownReason};
use lamina_abi::{Errno, Hypercall};

/// Which instruction traps to the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallInsn {
    /// Intel's `VMCALL` (0F 01 C1).
    Vmcall,
    /// AMD's `VMMCALL` (0F 01 D9).
    Vmmcall,
}

impl HypercallInsn {
    /// Both instructions, for tests that try each.
    pub const ALL: [HypercallInsn; 2] = [HypercallInsn::Vmcall, HypercallInsn::Vmmcall];

    /// The mnemonic, lower case.
    pub const fn name(self) -> &'static str {
        match self {
            HypercallInsn::Vmcall => "vmcall",
            HypercallInsn::Vmmcall => "vmmcall",
        }
    }

    /// The instruction for a CPU with this CPUID vendor string: `VMMCALL` on AMD and Hygon,
    /// `VMCALL` everywhere else.
    pub fn for_vendor(vendor: &[u8; 12]) -> HypercallInsn {
        match vendor {
            b"AuthenticAMD" | b"HygonGenuine" => HypercallInsn::Vmmcall,
            _ => HypercallInsn::Vmcall,
        }
    }
}

static DEFAULT_INSN: AtomicU8 = AtomicU8::new(HypercallInsn::Vmcall as u8);

/// The instruction native to the CPU we run on, from the CPUID vendor string.
pub fn native_insn() -> HypercallInsn {
    HypercallInsn::for_vendor(&crate::cpuid::vendor())
}

/// The instruction [`hypercall0`]..[`hypercall5`] and the typed wrappers use.
pub fn default_insn() -> HypercallInsn {
    match DEFAULT_INSN.load(Ordering::Relaxed) {
        x if x == HypercallInsn::Vmmcall as u8 => HypercallInsn::Vmmcall,
        _ => HypercallInsn::Vmcall,
    }
}

/// Changes the instruction the default functions use (the start code sets [`native_insn`]).
pub fn set_default_insn(insn: HypercallInsn) {
    DEFAULT_INSN.store(insn as u8, Ordering::Relaxed);
}

/// Emits the hypercall instruction `$insn` with RAX = `$nr` and the given argument registers,
/// and evaluates to RAX afterwards. Not `nomem`: the hypervisor reads the caller's buffers.
macro_rules! hypercall_asm {
    ($insn:expr, $nr:expr $(, $reg:tt = $arg:expr)*) => {{
        let rax: u64;
        match $insn {
            // SAFETY: the caller upholds the operation's contract (see the `# Safety` of the
            // raw functions); the ABI preserves every register except RAX and uses no stack.
            HypercallInsn::Vmcall => unsafe {
                asm!("vmcall", inlateout("rax") $nr => rax, $(in($reg) $arg,)* options(nostack))
            },
            // SAFETY: as above.
            HypercallInsn::Vmmcall => unsafe {
                asm!("vmmcall", inlateout("rax") $nr => rax, $(in($reg) $arg,)* options(nostack))
            },
        }
        rax
    }};
}

/// Hypercall `nr` with no arguments through `insn`; returns RAX.
///
/// # Safety
/// The call must keep the operation's contract (docs/abi.md section 3): any buffer the
/// hypervisor writes must be memory the caller owns, and calls that do not return (shutdown)
/// must not leave anything undone. Calls that only read guest memory cannot break the caller.
pub unsafe fn hypercall0_with(insn: HypercallInsn, nr: u64) -> u64 {
    hypercall_asm!(insn, nr)
}

/// Hypercall `nr` with one argument (RDI) through `insn`; returns RAX.
///
/// # Safety
/// As for [`hypercall0_with`].
pub unsafe fn hypercall1_with(insn: HypercallInsn, nr: u64, a1: u64) -> u64 {
    hypercall_asm!(insn, nr, "rdi" = a1)
}

/// Hypercall `nr` with two arguments (RDI, RSI) through `insn`; returns RAX.
///
/// # Safety
/// As for [`hypercall0_with`].
pub unsafe fn hypercall2_with(insn: HypercallInsn, nr: u64, a1: u64, a2: u64) -> u64 {
    hypercall_asm!(insn, nr, "rdi" = a1, "rsi" = a2)
}

/// Hypercall `nr` with three arguments (RDI, RSI, RDX) through `insn`; returns RAX.
///
/// # Safety
/// As for [`hypercall0_with`].
pub unsafe fn hypercall3_with(insn: HypercallInsn, nr: u64, a1: u64, a2: u64, a3: u64) -> u64 {
    hypercall_asm!(insn, nr, "rdi" = a1, "rsi" = a2, "rdx" = a3)
}

/// Hypercall `nr` with four arguments (RDI, RSI, RDX, R10) through `insn`; returns RAX.
///
/// # Safety
/// As for [`hypercall0_with`].
pub unsafe fn hypercall4_with(
    insn: HypercallInsn,
    nr: u64,
    a1: u64,
    a2: u64,
    a3: u64,
    a4: u64,
) -> u64 {
    hypercall_asm!(insn, nr, "rdi" = a1, "rsi" = a2, "rdx" = a3, "r10" = a4)
}

/// Hypercall `nr` with five arguments (RDI, RSI, RDX, R10, R8) through `insn`; returns RAX.
///
/// # Safety
/// As for [`hypercall0_with`].
pub unsafe fn hypercall5_with(
    insn: HypercallInsn,
    nr: u64,
    a1: u64,
    a2: u64,
    a3: u64,
    a4: u64,
    a5: u64,
) -> u64 {
    hypercall_asm!(
        insn,
        nr,
        "rdi" = a1,
        "rsi" = a2,
        "rdx" = a3,
        "r10" = a4,
        "r8" = a5
    )
}

/// [`hypercall0_with`] through [`default_insn`].
///
/// # Safety
/// As for [`hypercall0_with`].
pub unsafe fn hypercall0(nr: u64) -> u64 {
    // SAFETY: forwarded; the caller keeps the contract.
    unsafe { hypercall0_with(default_insn(), nr) }
}

/// [`hypercall1_with`] through [`default_insn`].
///
/// # Safety
/// As for [`hypercall0_with`].
pub unsafe fn hypercall1(nr: u64, a1: u64) -> u64 {
    // SAFETY: forwarded; the caller keeps the contract.
    unsafe { hypercall1_with(default_insn(), nr, a1) }
}

/// [`hypercall2_with`] through [`default_insn`].
///
/// # Safety
/// As for [`hypercall0_with`].
pub unsafe fn hypercall2(nr: u64, a1: u64, a2: u64) -> u64 {
    // SAFETY: forwarded; the caller keeps the contract.
    unsafe { hypercall2_with(default_insn(), nr, a1, a2) }
}

/// [`hypercall3_with`] through [`default_insn`].
///
/// # Safety
/// As for [`hypercall0_with`].
pub unsafe fn hypercall3(nr: u64, a1: u64, a2: u64, a3: u64) -> u64 {
    // SAFETY: forwarded; the caller keeps the contract.
    unsafe { hypercall3_with(default_insn(), nr, a1, a2, a3) }
}

/// [`hypercall4_with`] through [`default_insn`].
///
/// # Safety
/// As for [`hypercall0_with`].
pub unsafe fn hypercall4(nr: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> u64 {
    // SAFETY: forwarded; the caller keeps the contract.
    unsafe { hypercall4_with(default_insn(), nr, a1, a2, a3, a4) }
}

/// [`hypercall5_with`] through [`default_insn`].
///
/// # Safety
/// As for [`hypercall0_with`].
pub unsafe fn hypercall5(nr: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> u64 {
    // SAFETY: forwarded; the caller keeps the contract.
    unsafe { hypercall5_with(default_insn(), nr, a1, a2, a3, a4, a5) }
}

/// Why a typed hypercall wrapper failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallError {
    /// The hypervisor returned `-errno` for a defined [`Errno`].
    Errno(Errno),
    /// The hypervisor returned a negative value that is no defined code: an ABI violation.
    Undefined(i64),
}

impl HypercallError {
    /// The [`Errno`], if the code is a defined one.
    pub fn errno(self) -> Option<Errno> {
        match self {
            HypercallError::Errno(errno) => Some(errno),
            HypercallError::Undefined(_) => None,
        }
    }
}

impl PartialEq<Errno> for HypercallError {
    fn eq(&self, other: &Errno) -> bool {
        *self == HypercallError::Errno(*other)
    }
}

impl fmt::Display for HypercallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HypercallError::Errno(errno) => write!(f, "{errno}"),
            HypercallError::Undefined(raw) => write!(f, "undefined status {raw}"),
        }
    }
}

/// Splits a hypercall's RAX into success value and error ([`Errno::decode`]).
pub fn decode(rax: u64) -> Result<u64, HypercallError> {
    Errno::decode(rax).map_err(|err| match err {
        Ok(errno) => HypercallError::Errno(errno),
        Err(raw) => HypercallError::Undefined(raw),
    })
}

/// Makes hypercall `nr` with `args` in RDI, RSI, RDX, R10, R8 (unused ones zero; the ABI
/// ignores them) and decodes RAX. The typed wrappers of the other modules go through this.
///
/// # Safety
/// As for [`hypercall0_with`].
pub(crate) unsafe fn call(nr: Hypercall, args: [u64; 5]) -> Result<u64, HypercallError> {
    let [a1, a2, a3, a4, a5] = args;
    // SAFETY: forwarded; the caller keeps the contract.
    decode(unsafe { hypercall5(nr as u64, a1, a2, a3, a4, a5) })
}

/// The guest-physical address of `bytes` under the SDK's identity map.
pub fn gpa_of(bytes: &[u8]) -> u64 {
    bytes.as_ptr() as u64
}

/// The ABI version, `major << 16 | minor` (docs/abi.md 3.1).
pub fn version() -> Result<u64, HypercallError> {
    // SAFETY: the version call takes no arguments and touches no guest memory.
    decode(unsafe { hypercall0(Hypercall::Version as u64) })
}

/// Writes `bytes` to the domain's console, in chunks of at most `CONSOLE_WRITE_MAX` bytes
/// (docs/abi.md 3.2). Returns the number of bytes written; stops at the first failing chunk:
/// `EAGAIN` when the domain's console budget cannot take it (docs/abi.md 13.1; nothing of
/// that chunk was printed).
pub fn console_write(bytes: &[u8]) -> Result<u64, HypercallError> {
    let mut written = 0;
    for chunk in bytes.chunks(CONSOLE_WRITE_MAX as usize) {
        // SAFETY: the hypervisor only reads `chunk`, which is identity-mapped guest memory we
        // borrow for the duration of the call.
        let rax = unsafe {
            hypercall3(
                Hypercall::ConsoleIo as u64,
                ConsoleOp::Write as u64,
                gpa_of(chunk),
                chunk.len() as u64,
            )
        };
        written += decode(rax)?;
    }
    Ok(written)
}

/// Gives the CPU to another ready vCPU for one turn, if one is ready (docs/abi.md 3.3).
pub fn sched_yield() -> Result<(), HypercallError> {
    // SAFETY: yield takes no buffer.
    decode(unsafe { hypercall1(Hypercall::SchedOp as u64, SchedOp::Yield as u64) }).map(|_| ())
}

/// Stops the domain for good with `reason` (docs/abi.md 3.3), after handing a partial console
/// line to the console backend (the hypervisor drains the console ring at shutdown).
///
/// Should the hypervisor ever return from the call, the vCPU disables interrupts and halts,
/// which the hypervisor treats as a domain that can never run again.
pub fn shutdown(reason: ShutdownReason) -> ! {
    crate::console::flush_line_buffer();
    // SAFETY: shutdown takes no buffer; the domain ends here, and we flushed the console.
    unsafe {
        hypercall2(
            Hypercall::SchedOp as u64,
            SchedOp::Shutdown as u64,
            reason as u64,
        )
    };
    halt_forever()
}

/// Disables interrupts and halts, forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this vCPU; it touches no memory.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_instruction_follows_the_vendor() {
        assert_eq!(
            HypercallInsn::for_vendor(b"GenuineIntel"),
            HypercallInsn::Vmcall
        );
        assert_eq!(
            HypercallInsn::for_vendor(b"AuthenticAMD"),
            HypercallInsn::Vmmcall
        );
        assert_eq!(
            HypercallInsn::for_vendor(b"HygonGenuine"),
            HypercallInsn::Vmmcall
        );
        assert_eq!(
            HypercallInsn::for_vendor(b"CentaurHauls"),
            HypercallInsn::Vmcall
        );
    }

    #[test]
    fn decode_splits_success_and_errors() {
        assert_eq!(decode(0), Ok(0));
        assert_eq!(decode(4096), Ok(4096));
        assert_eq!(
            decode(Errno::EFAULT.to_return_value()),
            Err(HypercallError::Errno(Errno::EFAULT))
        );
        assert!(decode(Errno::ENOSYS.to_return_value()).unwrap_err() == Errno::ENOSYS);
        assert_eq!(
            decode(-1000i64 as u64),
            Err(HypercallError::Undefined(-1000))
        );
    }
}

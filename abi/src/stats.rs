//! Exit accounting (`Hypercall::StatsOp`): how many exits a vCPU caused, of which kinds, for
//! which hypercalls, and how long the hypervisor spent handling them (like `perf kvm stat`
//! or xentrace, but always on).
//!
//! `RDI` = operation, `RSI` = domain ([`crate::event_channel::DOMID_SELF`] or an id), `RDX`
//! = vCPU, `R10` = guest-physical address of an [`ExitCounters`] to fill. A domain may read its
//! own counters; reading another domain's needs a privileged domain (`-EPERM` otherwise), and
//! an id with no domain is `-ENOENT`.

/// Statistics operations (RDI).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StatsOp {
    /// Copy a vCPU's [`ExitCounters`] to `R10`. Returns 0.
    ExitCounters = 0,
}

impl TryFrom<u64> for StatsOp {
    type Error = crate::Errno;

    fn try_from(op: u64) -> Result<Self, Self::Error> {
        match op {
            0 => Ok(StatsOp::ExitCounters),
            _ => Err(crate::Errno::ENOSYS),
        }
    }
}

/// Indices of [`ExitCounters::by_kind`].
pub mod exit_kind {
    /// VMCALL or VMMCALL (either vendor's instruction).
    pub const HYPERCALL: usize = 0;
    /// CPUID.
    pub const CPUID: usize = 1;
    /// HLT.
    pub const HLT: usize = 2;
    /// Port I/O to the emulated UART.
    pub const IO_UART: usize = 3;
    /// Port I/O to a port nothing emulates.
    pub const IO_OTHER: usize = 4;
    /// RDMSR.
    pub const MSR_READ: usize = 5;
    /// WRMSR.
    pub const MSR_WRITE: usize = 6;
    /// An undefined instruction reflected to the guest as #UD.
    pub const INVALID_OPCODE: usize = 7;
    /// An access outside the domain's memory.
    pub const NESTED_PAGE_FAULT: usize = 8;
    /// A triple fault.
    pub const TRIPLE_FAULT: usize = 9;
    /// A host interrupt (timer, preemption) while the guest ran.
    pub const INTERRUPT: usize = 10;
    /// The guest opened its interrupt window for a pending injection.
    pub const INTERRUPT_WINDOW: usize = 11;
    /// Anything else.
    pub const OTHER: usize = 12;
    /// Number of kinds in use.
    pub const COUNT: usize = 13;
}

/// Slots in [`ExitCounters::by_hypercall`]; the last counts numbers the ABI does not define.
pub const HYPERCALL_SLOTS: usize = 16;

/// A vCPU's exit counters since the domain started.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounters {
    /// All exits.
    pub total: u64,
    /// Exits by [`exit_kind`]; unused slots are 0.
    pub by_kind: [u64; 16],
    /// Hypercalls by number; slot 15 counts every number above 14 and the undefined ones.
    pub by_hypercall: [u64; HYPERCALL_SLOTS],
    /// TSC ticks spent in the hypervisor from exit to the next entry of this vCPU.
    pub handling_tsc: u64,
}

const _: () = assert!(core::mem::size_of::<ExitCounters>() == 272);
const _: () = assert!(core::mem::offset_of!(ExitCounters, handling_tsc) == 264);

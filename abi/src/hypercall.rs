//! Hypercall numbers and the calling convention.
//!
//! A guest at CPL 0 executes `VMCALL` (0F 01 C1) or `VMMCALL` (0F 01 D9); both are accepted on
//! Intel and AMD hosts, so one guest binary runs everywhere. The number goes in RAX and up to
//! five arguments in RDI, RSI, RDX, R10, R8 (the order Xen and the Linux syscall ABI use). The
//! result comes back in RAX: non-negative on success, `-errno` ([`crate::Errno`]) on failure.
//! Every other register is preserved, except that the arithmetic flags of RFLAGS are undefined
//! afterwards. A call from CPL 1-3 returns `-EPERM`; an unknown number returns `-ENOSYS`.
//! docs/abi.md section 2 is the full convention, including the order of the error checks.

/// Length in bytes of both hypercall instructions.
pub const HYPERCALL_INSN_LEN: u64 = 3;
/// Intel's `VMCALL` encoding.
pub const VMCALL_BYTES: [u8; 3] = [0x0f, 0x01, 0xc1];
/// AMD's `VMMCALL` encoding.
pub const VMMCALL_BYTES: [u8; 3] = [0x0f, 0x01, 0xd9];

/// Hypercall numbers (RAX).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Hypercall {
    /// Returns the ABI version, `major << 16 | minor`. No arguments.
    Version = 0,
    /// Console I/O: RDI = [`crate::console::ConsoleOp`], see that module.
    ConsoleIo = 1,
    /// Scheduling: RDI = [`crate::sched::SchedOp`], see that module.
    SchedOp = 2,
    /// Event channels: RDI = [`crate::event_channel::EventChannelOp`].
    EventChannelOp = 3,
    /// Per-vCPU state and timers: RDI = [`crate::vcpu::VcpuOp`].
    VcpuOp = 4,
    /// The domain's memory: RDI = [`crate::memory::MemoryOp`].
    MemoryOp = 5,
    /// A batch of calls in one exit: RDI = entries' address, RSI = count
    /// ([`crate::multicall`]).
    Multicall = 6,
    /// Exit accounting: RDI = [`crate::stats::StatsOp`].
    StatsOp = 7,
    /// Grant tables: RDI = [`crate::grant_table::GrantTableOp`] (ABI 1.3).
    GrantTableOp = 8,
    /// Domain control, privileged domains only: RDI = [`crate::domctl::DomctlOp`] (ABI 1.3).
    DomctlOp = 9,
}

impl TryFrom<u64> for Hypercall {
    type Error = crate::Errno;

    fn try_from(nr: u64) -> Result<Self, Self::Error> {
        Ok(match nr {
            0 => Hypercall::Version,
            1 => Hypercall::ConsoleIo,
            2 => Hypercall::SchedOp,
            3 => Hypercall::EventChannelOp,
            4 => Hypercall::VcpuOp,
            5 => Hypercall::MemoryOp,
            6 => Hypercall::Multicall,
            7 => Hypercall::StatsOp,
            8 => Hypercall::GrantTableOp,
            9 => Hypercall::DomctlOp,
            _ => return Err(crate::Errno::ENOSYS),
        })
    }
}

impl Hypercall {
    /// Every defined hypercall, in number order.
    pub const ALL: [Hypercall; 10] = [
        Hypercall::Version,
        Hypercall::ConsoleIo,
        Hypercall::SchedOp,
        Hypercall::EventChannelOp,
        Hypercall::VcpuOp,
        Hypercall::MemoryOp,
        Hypercall::Multicall,
        Hypercall::StatsOp,
        Hypercall::GrantTableOp,
        Hypercall::DomctlOp,
    ];
    /// Number of slots the hypervisor keeps per-hypercall counters for (one more for unknown).
    pub const COUNT: usize = Self::ALL.len();

    /// A short name for logs and tables.
    pub const fn name(self) -> &'static str {
        match self {
            Hypercall::Version => "version",
            Hypercall::ConsoleIo => "console_io",
            Hypercall::SchedOp => "sched_op",
            Hypercall::EventChannelOp => "event_channel_op",
            Hypercall::VcpuOp => "vcpu_op",
            Hypercall::MemoryOp => "memory_op",
            Hypercall::Multicall => "multicall",
            Hypercall::StatsOp => "stats_op",
            Hypercall::GrantTableOp => "grant_table_op",
            Hypercall::DomctlOp => "domctl_op",
        }
    }
}

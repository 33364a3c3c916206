//! Domain control (`Hypercall::DomctlOp`): what a privileged domain may do to the others.
//!
//! Xen's `domctl` is the model. Only a domain booted with `privileged=1`
//! ([`crate::start_info::START_FLAG_PRIVILEGED`]) may call it; every other caller gets `-EPERM`
//! for every defined operation, before its arguments are looked at. A domain cannot pause or
//! destroy itself (`-EINVAL`: it has `sched_op` shutdown).
//!
//! `RDI` = operation, `RSI`.. = arguments. docs/abi.md section 17 is the specification.

/// Operations (RDI).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DomctlOp {
    /// Copy a [`DomainInfo`] for each domain, in id order, into the array at guest-physical
    /// `RSI` with room for `RDX` entries. Returns the number of domains, which may be more
    /// than were written.
    ListDomains = 0,
    /// Copy domain `RSI`'s console output from stream offset `RDX` into the caller's buffer at
    /// `R10` of `R8` bytes (at most [`CONSOLE_HISTORY_BYTES`]). Returns the number of bytes
    /// copied (0 at the end of the stream).
    ReadConsole = 1,
    /// Stop scheduling domain `RSI` until it is unpaused. Returns 0 (also when already paused).
    Pause = 2,
    /// Let domain `RSI` run again. Returns 0 (also when not paused).
    Unpause = 3,
    /// End domain `RSI` and tear it down. Returns 0.
    Destroy = 4,
    /// Copy the hypervisor's memory figures, a [`PhysInfo`], to guest-physical `RSI`.
    /// Returns 0.
    PhysInfo = 5,
}

impl TryFrom<u64> for DomctlOp {
    type Error = crate::Errno;

    fn try_from(op: u64) -> Result<Self, Self::Error> {
        Ok(match op {
            0 => DomctlOp::ListDomains,
            1 => DomctlOp::ReadConsole,
            2 => DomctlOp::Pause,
            3 => DomctlOp::Unpause,
            4 => DomctlOp::Destroy,
            5 => DomctlOp::PhysInfo,
            _ => return Err(crate::Errno::ENOSYS),
        })
    }
}

/// The most recent console output kept per domain, in bytes.
pub const CONSOLE_HISTORY_BYTES: u64 = 4096;

/// Values of [`DomainInfo::state`].
pub mod domain_state {
    /// Running or ready to run.
    pub const RUNNING: u32 = 0;
    /// Waiting for an event, a timer or an interrupt.
    pub const BLOCKED: u32 = 1;
    /// Paused by a privileged domain.
    pub const PAUSED: u32 = 2;
    /// Ended cleanly (powered off, rebooted, destroyed); torn down.
    pub const SHUTDOWN: u32 = 3;
    /// Crashed (said so, or was stopped by the hypervisor); torn down.
    pub const CRASHED: u32 = 4;
}

/// Values of [`DomainInfo::ending`].
pub mod ending {
    /// Has not ended.
    pub const NONE: u32 = 0;
    /// `sched_op` shutdown, poweroff.
    pub const POWEROFF: u32 = 1;
    /// `sched_op` shutdown, reboot.
    pub const REBOOT: u32 = 2;
    /// `sched_op` shutdown, crash.
    pub const CRASH: u32 = 3;
    /// Stopped by the hypervisor (triple fault, access outside its memory, ...).
    pub const FAULT: u32 = 4;
    /// Destroyed by a privileged domain.
    pub const DESTROYED: u32 = 5;
}

/// [`DomainInfo::flags`]: booted with `privileged=1`.
pub const DOMAIN_FLAG_PRIVILEGED: u32 = 1 << 0;

/// One domain, as [`DomctlOp::ListDomains`] reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainInfo {
    /// Domain id.
    pub domain_id: u32,
    /// [`domain_state`].
    pub state: u32,
    /// [`ending`].
    pub ending: u32,
    /// `DOMAIN_FLAG_*`.
    pub flags: u32,
    /// Scheduling weight.
    pub weight: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// RAM not yet back with the hypervisor, in bytes: all of it while the domain lives, then
    /// what teardown has still to scrub; 0 once it is all counted in `PhysInfo::free_bytes`.
    pub memory_bytes: u64,
    /// CPU time it has had, in ns.
    pub cpu_ns: u64,
    /// Bytes of console output it has produced: the end of its console stream.
    pub console_bytes: u64,
    /// Its name, NUL-padded.
    pub name: [u8; 32],
}

const _: () = assert!(core::mem::size_of::<DomainInfo>() == 80);
const _: () = assert!(core::mem::offset_of!(DomainInfo, memory_bytes) == 24);
const _: () = assert!(core::mem::offset_of!(DomainInfo, name) == 48);

impl DomainInfo {
    /// The name as text (up to the first NUL; invalid UTF-8 yields `"?"`).
    pub fn name(&self) -> &str {
        crate::nul_padded_str(&self.name)
    }
}

/// The hypervisor's memory, as [`DomctlOp::PhysInfo`] reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhysInfo {
    /// Memory the hypervisor manages for domains and its own structures, in bytes.
    pub total_bytes: u64,
    /// Of which free now.
    pub free_bytes: u64,
    /// RAM held by domains that have not been torn down.
    pub domain_bytes: u64,
    /// Reserved, zero.
    pub reserved: u64,
}

const _: () = assert!(core::mem::size_of::<PhysInfo>() == 32);

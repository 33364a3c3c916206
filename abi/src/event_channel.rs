//! Event channels (`Hypercall::EventChannelOp`): Xen's two-level ABI.
//!
//! A port is a numbered channel of one bit. Sending sets its bit in
//! [`crate::shared_info::SharedInfo::evtchn_pending`]; if the bit went 0 -> 1 and the port's
//! mask bit is clear, the hypervisor sets the bound vCPU's `evtchn_pending_sel` bit for the
//! port's word and its `evtchn_upcall_pending`, and injects the upcall vector
//! ([`crate::vcpu::VcpuOp::SetUpcallVector`]) once the vCPU has upcalls unmasked
//! (`evtchn_upcall_mask == 0`) and RFLAGS.IF set. The guest clears `evtchn_upcall_pending`,
//! then scans the selector and the pending words, clearing each pending bit before handling
//! it. Masked ports stay pending and are delivered by [`EventChannelOp::Unmask`].
//!
//! `RDI` = operation, `RSI`.. = arguments; operations that create a port return it.

/// Number of ports per domain (16 words of 64 bits).
pub const NR_PORTS: u32 = 1024;
/// Words in the pending and mask bitmaps.
pub const NR_PORT_WORDS: usize = (NR_PORTS / 64) as usize;

/// Event-channel operations (RDI).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventChannelOp {
    /// A port that `RSI` = remote domain may bind to later with [`EventChannelOp::BindInterdomain`]
    /// ([`DOMID_SELF`] or the caller's own id: a loopback port the caller itself sends on).
    /// Returns the port; `-ENOENT` when no such domain exists.
    AllocUnbound = 0,
    /// Bind virtual IRQ `RSI` ([`Virq`]) to a new port delivered to vCPU `RDX`. Returns the
    /// port. `-EEXIST` when that VIRQ is already bound on that vCPU.
    BindVirq = 1,
    /// A port whose sends raise an event on vCPU `RSI` of the caller (an IPI). Returns it.
    BindIpi = 2,
    /// Raise port `RSI`: for an unbound or IPI port, on the caller; for an inter-domain port,
    /// on the peer's end. Returns 0.
    Send = 3,
    /// Close port `RSI` (its pending bit is cleared, the number may be reused). Returns 0;
    /// closing a free port is `-EINVAL`. Closing one end of an inter-domain channel turns the
    /// peer's end back into an unbound port for the closer and raises it, so the peer notices.
    Close = 4,
    /// Clear port `RSI`'s mask bit; if it is pending, deliver it now. Returns 0.
    Unmask = 5,
    /// The state of port `RSI`, packed: see [`PortStatus`]. Returns the packed value.
    Status = 6,
    /// Connect to port `RDX` of domain `RSI`, which that domain allocated with
    /// [`EventChannelOp::AllocUnbound`] for the caller: both become the two ends of an
    /// inter-domain channel. Returns the caller's new port. `-ENOENT`: no such domain;
    /// `-EINVAL`: that port is not unbound for the caller.
    BindInterdomain = 7,
    /// Bind IPI slot `RDX` (`0..`[`IPI_SLOTS`]) of vCPU `RSI` to a new port: the port
    /// [`EventChannelOp::SendIpi`] raises on that vCPU for that slot. Returns the port.
    /// `-ENOENT`: no such vCPU; `-EINVAL`: slot out of range; `-EEXIST`: already bound.
    /// Since ABI 1.6.
    BindIpiSlot = 8,
    /// Raise the port bound to IPI slot `RDX` on every vCPU of the mask `RSI` (bit `v`:
    /// vCPU `v`), in one call. Returns 0. `-EINVAL`: slot out of range or an empty mask;
    /// `-ENOENT`: a bit names no vCPU; `-EINVAL`: a vCPU of the mask has nothing bound in
    /// that slot (nothing is raised then). Since ABI 1.6.
    SendIpi = 9,
}

/// IPI slots per vCPU ([`EventChannelOp::BindIpiSlot`]): one per kind of IPI a kernel sends
/// (reschedule, call function, TLB shootdown...).
pub const IPI_SLOTS: u64 = 8;

impl TryFrom<u64> for EventChannelOp {
    type Error = crate::Errno;

    fn try_from(op: u64) -> Result<Self, Self::Error> {
        Ok(match op {
            0 => EventChannelOp::AllocUnbound,
            1 => EventChannelOp::BindVirq,
            2 => EventChannelOp::BindIpi,
            3 => EventChannelOp::Send,
            4 => EventChannelOp::Close,
            5 => EventChannelOp::Unmask,
            6 => EventChannelOp::Status,
            7 => EventChannelOp::BindInterdomain,
            8 => EventChannelOp::BindIpiSlot,
            9 => EventChannelOp::SendIpi,
            _ => return Err(crate::Errno::ENOSYS),
        })
    }
}

/// The caller's own domain, where a domain id is expected.
pub const DOMID_SELF: u64 = 0x7ff0;

/// Virtual IRQs a port can be bound to.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Virq {
    /// The vCPU's one-shot or periodic timer expired.
    Timer = 0,
    /// Console input arrived.
    Console = 1,
}

/// Number of VIRQ slots (values `0..NR_VIRQS`; unassigned ones are `-EINVAL`).
pub const NR_VIRQS: u64 = 8;

impl TryFrom<u64> for Virq {
    type Error = crate::Errno;

    fn try_from(virq: u64) -> Result<Self, Self::Error> {
        match virq {
            0 => Ok(Virq::Timer),
            1 => Ok(Virq::Console),
            _ => Err(crate::Errno::EINVAL),
        }
    }
}

/// What a port is, as [`EventChannelOp::Status`] reports it in bits 0-7.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    /// Not allocated.
    Free = 0,
    /// Allocated by `AllocUnbound`, not yet bound by its remote domain.
    Unbound = 1,
    /// Connected to a port of another domain.
    Interdomain = 2,
    /// Bound to a VIRQ.
    Virq = 3,
    /// Bound as an IPI.
    Ipi = 4,
}

/// Decoded [`EventChannelOp::Status`] result: bits 0-7 state, 8-15 vCPU, 16-31 VIRQ number
/// (for `Virq`) or remote domain (for `Unbound` and `Interdomain`), 32 pending, 33 masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortStatus {
    /// What the port is.
    pub state: u8,
    /// The vCPU it is delivered to.
    pub vcpu: u8,
    /// VIRQ number or remote domain.
    pub detail: u16,
    /// Its pending bit.
    pub pending: bool,
    /// Its mask bit.
    pub masked: bool,
}

impl PortStatus {
    /// Packs into the hypercall's return value.
    pub const fn pack(self) -> u64 {
        self.state as u64
            | (self.vcpu as u64) << 8
            | (self.detail as u64) << 16
            | (self.pending as u64) << 32
            | (self.masked as u64) << 33
    }

    /// Unpacks a return value.
    pub const fn unpack(value: u64) -> Self {
        PortStatus {
            state: value as u8,
            vcpu: (value >> 8) as u8,
            detail: (value >> 16) as u16,
            pending: value & (1 << 32) != 0,
            masked: value & (1 << 33) != 0,
        }
    }
}

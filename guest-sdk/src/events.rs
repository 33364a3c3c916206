//! Event channels (docs/abi.md 8): ports, the hypercalls that make and use them, and the
//! dispatcher that runs a kernel's handlers from the upcall.
//!
//! A port is one bit of the shared-info page's pending bitmap. [`bind_virq`], [`bind_ipi`]
//! and [`alloc_unbound`] make ports, [`send`] raises one, [`close`] frees it.
//!
//! Inter-domain channels (ABI 1.2, CPUID feature bit 12, docs/abi.md 8.9) connect two
//! domains: one offers a port with [`alloc_unbound_for`] the other domain, which connects to
//! it with [`bind_interdomain`]. A send on either end raises the other. There is no directory
//! service: the two find each other's domain id and port by convention or on the command line. A kernel
//! registers a handler per port with [`set_handler`] and installs the upcall with
//! [`install_upcall`]: the hypervisor then injects that interrupt vector whenever an event is
//! pending, upcalls are unmasked ([`unmask_upcalls`]) and RFLAGS.IF is set.
//!
//! The upcall handler does what Xen's two-level ABI prescribes (docs/abi.md 8.8), in this
//! order:
//! 1. clear `evtchn_upcall_pending` (otherwise the hypervisor injects again on return),
//! 2. take the selector `evtchn_pending_sel` (swap it to 0),
//! 3. for each selected word, take the bits that are pending and not masked, and for each
//!    one clear its pending bit, *then* call its handler, so an event raised while the handler
//!    runs is seen again rather than lost,
//! 4. repeat while the hypervisor raised the upcall again meanwhile (a few rounds at most;
//!    anything left is injected again after the return).
//!
//! No EOI: the upcall is not an APIC interrupt. Handlers run in interrupt context with
//! interrupts off; they must not block.
//!
//! Every port is delivered to the vCPU it was bound to; the dispatcher scans the whole bitmap
//! with the calling vCPU's selector ([`crate::percpu`] says which vCPU that is).

use core::fmt;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use lamina_abi::Hypercall;
use lamina_abi::event_channel::{
    DOMID_SELF, EventChannelOp, NR_PORT_WORDS, NR_PORTS, PortState, PortStatus, Virq,
};

use crate::hypercall::{self, HypercallError};
use crate::shared::{SharedPage, VcpuShared};

/// An event-channel port number (`1..NR_PORTS`; port 0 is never allocated).
///
/// `repr(transparent)` over `u32`, so a `&[Port]` is the array of `u32` that
/// [`sched::poll`](crate::sched::poll) hands to the hypervisor.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(u32);

impl Port {
    /// Port `number`, as the hypervisor or StartInfo named it.
    pub const fn new(number: u32) -> Port {
        Port(number)
    }

    /// The port number.
    pub const fn number(self) -> u32 {
        self.0
    }

    /// Which word of the pending and mask bitmaps holds the port, and its bit there.
    pub const fn word_and_bit(self) -> (usize, u32) {
        ((self.0 / 64) as usize, self.0 % 64)
    }

    /// Whether the number is inside the bitmaps.
    pub const fn in_range(self) -> bool {
        self.0 < NR_PORTS
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "port {}", self.0)
    }
}

/// A handler for events on one port, called from the upcall with interrupts off.
pub type EventHandler = fn(Port);

/// Makes an event-channel operation.
fn op(operation: EventChannelOp, a2: u64, a3: u64) -> Result<u64, HypercallError> {
    // SAFETY: no event-channel operation touches guest memory other than the shared-info page,
    // which the hypervisor owns the layout of.
    unsafe { hypercall::call(Hypercall::EventChannelOp, [operation as u64, a2, a3, 0, 0]) }
}

fn port_from(value: u64) -> Port {
    Port(value as u32)
}

/// A new port that domain `remote` may bind to later; [`alloc_loopback`] for the usual case
/// of a port the caller sends to itself (docs/abi.md 8.1).
pub fn alloc_unbound(remote: u64) -> Result<Port, HypercallError> {
    op(EventChannelOp::AllocUnbound, remote, 0).map(port_from)
}

/// A port that domain `domain` may connect to with [`bind_interdomain`] (docs/abi.md 8.1):
/// the offering side of an inter-domain channel. Until then its [`status`] is
/// [`PortState::Unbound`] with `domain` as [`PortInfo::peer`].
///
/// Errors: `ENOENT` when no such domain exists; `ENOSPC` when every port is in use.
pub fn alloc_unbound_for(domain: u32) -> Result<Port, HypercallError> {
    alloc_unbound(u64::from(domain))
}

/// Connects to `port` of domain `domain`, which that domain allocated with
/// [`alloc_unbound_for`] this domain (docs/abi.md 8.9); returns this domain's end, the lowest
/// free port. Both ends are then [`PortState::Interdomain`]: a [`send`] on one raises the
/// other. Closing one end turns the other back into an unbound port for the closer, raised.
///
/// A domain may also bind to its own port allocated for itself: both ends in one domain.
///
/// Errors: `ENOENT` when no such domain exists; `EINVAL` when `port` is not an unbound port
/// for this domain (free, of another kind, offered to another domain, or out of range).
pub fn bind_interdomain(domain: u32, port: Port) -> Result<Port, HypercallError> {
    op(
        EventChannelOp::BindInterdomain,
        u64::from(domain),
        u64::from(port.0),
    )
    .map(port_from)
}

/// A new loopback port: sends on it raise it on vCPU 0 of the caller.
pub fn alloc_loopback() -> Result<Port, HypercallError> {
    alloc_unbound(DOMID_SELF)
}

/// Binds virtual IRQ `virq` of vCPU `vcpu` to a new port.
pub fn bind_virq(virq: Virq, vcpu: u32) -> Result<Port, HypercallError> {
    op(EventChannelOp::BindVirq, virq as u64, u64::from(vcpu)).map(port_from)
}

/// A new port whose sends raise an event on vCPU `vcpu` (an inter-processor interrupt).
pub fn bind_ipi(vcpu: u32) -> Result<Port, HypercallError> {
    op(EventChannelOp::BindIpi, u64::from(vcpu), 0).map(port_from)
}

/// Binds IPI slot `slot` (`0..IPI_SLOTS`) of vCPU `vcpu` to a new port: the port
/// [`send_ipi`] raises on that vCPU for that slot (docs/abi.md 8.10; ABI 1.6, CPUID feature
/// bit `PV_SMP`).
pub fn bind_ipi_slot(vcpu: u32, slot: u8) -> Result<Port, HypercallError> {
    op(
        EventChannelOp::BindIpiSlot,
        u64::from(vcpu),
        u64::from(slot),
    )
    .map(port_from)
}

/// Raises the port bound to IPI slot `slot` on every vCPU of `mask` (bit `v`: vCPU `v`) in one
/// hypercall (docs/abi.md 8.11). Nothing is raised when one of them has no port in that slot.
pub fn send_ipi(mask: u64, slot: u8) -> Result<(), HypercallError> {
    op(EventChannelOp::SendIpi, mask, u64::from(slot)).map(|_| ())
}

/// Raises `port`. On the console port it has the hypervisor drain the console ring at once.
pub fn send(port: Port) -> Result<(), HypercallError> {
    op(EventChannelOp::Send, u64::from(port.0), 0).map(|_| ())
}

/// Closes `port` and forgets its handler. Its pending bit is cleared; the number may come back
/// from a later allocation.
pub fn close(port: Port) -> Result<(), HypercallError> {
    op(EventChannelOp::Close, u64::from(port.0), 0)?;
    remove_handler(port);
    Ok(())
}

/// Clears `port`'s mask bit through the hypervisor, which delivers the event now if it is
/// pending (clearing the bit in the page directly would leave a pending event undelivered).
pub fn unmask(port: Port) -> Result<(), HypercallError> {
    op(EventChannelOp::Unmask, u64::from(port.0), 0).map(|_| ())
}

/// What the hypervisor knows about `port`, as the ABI packs it.
pub fn status(port: Port) -> Result<PortStatus, HypercallError> {
    op(EventChannelOp::Status, u64::from(port.0), 0).map(PortStatus::unpack)
}

/// What the hypervisor knows about `port`, decoded ([`PortInfo::from`]).
pub fn port_info(port: Port) -> Result<PortInfo, HypercallError> {
    status(port).map(PortInfo::from)
}

/// A decoded [`PortStatus`]: the state with the meaning of its detail field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// What the port is (`None`: a state this SDK does not know, raw value in `raw_state`).
    pub state: Option<PortState>,
    /// The raw state byte.
    pub raw_state: u8,
    /// The vCPU the port is delivered to.
    pub vcpu: u8,
    /// For `Unbound` and `Interdomain` ports: the remote domain (the one that may bind, or
    /// the one at the other end).
    pub peer: Option<u16>,
    /// For `Virq` ports: the VIRQ number.
    pub virq: Option<u16>,
    /// Its pending bit.
    pub pending: bool,
    /// Its mask bit.
    pub masked: bool,
}

impl From<PortStatus> for PortInfo {
    fn from(status: PortStatus) -> Self {
        let state = match status.state {
            0 => Some(PortState::Free),
            1 => Some(PortState::Unbound),
            2 => Some(PortState::Interdomain),
            3 => Some(PortState::Virq),
            4 => Some(PortState::Ipi),
            _ => None,
        };
        let peer = matches!(state, Some(PortState::Unbound | PortState::Interdomain))
            .then_some(status.detail);
        let virq = matches!(state, Some(PortState::Virq)).then_some(status.detail);
        PortInfo {
            state,
            raw_state: status.state,
            vcpu: status.vcpu,
            peer,
            virq,
            pending: status.pending,
            masked: status.masked,
        }
    }
}

impl fmt::Display for PortInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.state, self.peer, self.virq) {
            (Some(PortState::Unbound), Some(peer), _) => write!(f, "unbound for domain {peer}")?,
            (Some(PortState::Interdomain), Some(peer), _) => {
                write!(f, "inter-domain with domain {peer}")?
            }
            (Some(PortState::Virq), _, Some(virq)) => write!(f, "VIRQ {virq}")?,
            (Some(PortState::Free), ..) => f.write_str("free")?,
            (Some(PortState::Ipi), ..) => f.write_str("IPI")?,
            _ => write!(f, "state {}", self.raw_state)?,
        }
        write!(f, ", vCPU {}", self.vcpu)?;
        if self.pending {
            f.write_str(", pending")?;
        }
        if self.masked {
            f.write_str(", masked")?;
        }
        Ok(())
    }
}

/// Sets `port`'s mask bit in the shared-info page: its events stay pending and raise no
/// upcall until [`unmask`]. Masking needs no hypercall. Panics if the port is out of range.
pub fn mask(port: Port) {
    let (word, bit) = port.word_and_bit();
    crate::shared::shared_page()
        .mask_word(word)
        .fetch_or(1 << bit, Ordering::SeqCst);
}

/// Whether `port`'s pending bit is set. Panics if the port is out of range.
pub fn is_pending(port: Port) -> bool {
    let (word, bit) = port.word_and_bit();
    crate::shared::shared_page()
        .pending_word(word)
        .load(Ordering::SeqCst)
        & (1 << bit)
        != 0
}

/// Clears `port`'s pending bit; returns whether it was set. For kernels that consume an
/// event without the dispatcher (for example after [`sched::poll`](crate::sched::poll)).
pub fn clear_pending(port: Port) -> bool {
    let (word, bit) = port.word_and_bit();
    let before = crate::shared::shared_page()
        .pending_word(word)
        .fetch_and(!(1 << bit), Ordering::SeqCst);
    before & (1 << bit) != 0
}

/// One handler slot per port (null: none).
static HANDLERS: [AtomicPtr<()>; NR_PORTS as usize] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; NR_PORTS as usize];

/// Events that arrived on a port without a handler.
static UNHANDLED: AtomicU64 = AtomicU64::new(0);

/// Has the dispatcher call `handler` for every event on `port`. Replaces an earlier handler.
/// Panics if the port is out of range.
pub fn set_handler(port: Port, handler: EventHandler) {
    assert!(port.in_range(), "{port} is out of range");
    HANDLERS[port.0 as usize].store(handler as *mut (), Ordering::Release);
}

/// Forgets `port`'s handler: its events are counted in [`unhandled_events`] and dropped.
pub fn remove_handler(port: Port) {
    if port.in_range() {
        HANDLERS[port.0 as usize].store(core::ptr::null_mut(), Ordering::Release);
    }
}

/// How many events the dispatcher dropped because their port had no handler.
pub fn unhandled_events() -> u64 {
    UNHANDLED.load(Ordering::Relaxed)
}

/// Calls `port`'s handler, or counts the event as unhandled.
fn call_handler(port: Port) {
    let raw = HANDLERS[port.0 as usize].load(Ordering::Acquire);
    if raw.is_null() {
        UNHANDLED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // SAFETY: `set_handler` is the only writer of non-null values, and it stores an
    // `EventHandler` cast to a pointer; casting back gives the same function pointer.
    let handler = unsafe { core::mem::transmute::<*mut (), EventHandler>(raw) };
    handler(port);
}

/// Most rounds of one dispatch (step 4 of the module documentation).
pub const MAX_SCAN_ROUNDS: usize = 4;

/// The two-level scan of the module documentation over `page` and `vcpu`: calls `handle` for
/// each pending, unmasked port, after clearing its pending bit. Returns how many ports it
/// handled. Pure apart from the atomics, so it is tested on the host.
pub fn scan(page: &SharedPage, vcpu: &VcpuShared, mut handle: impl FnMut(Port)) -> usize {
    let mut handled = 0;
    for _ in 0..MAX_SCAN_ROUNDS {
        vcpu.upcall_pending().store(0, Ordering::SeqCst);
        let mut words = vcpu.pending_sel().swap(0, Ordering::SeqCst);
        if words == 0 {
            break;
        }
        while words != 0 {
            let word = words.trailing_zeros() as usize;
            words &= words - 1;
            if word >= NR_PORT_WORDS {
                continue;
            }
            let pending = page.pending_word(word);
            // A snapshot per word and round: what handlers raise meanwhile comes back through
            // the selector in the next round, so a port that re-raises itself cannot keep
            // the scan going forever.
            let mut ready =
                pending.load(Ordering::SeqCst) & !page.mask_word(word).load(Ordering::SeqCst);
            while ready != 0 {
                let bit = ready.trailing_zeros();
                ready &= ready - 1;
                let before = pending.fetch_and(!(1 << bit), Ordering::SeqCst);
                if before & (1 << bit) != 0 {
                    handle(Port(word as u32 * 64 + bit));
                    handled += 1;
                }
            }
        }
        if vcpu.upcall_pending().load(Ordering::SeqCst) == 0 {
            break;
        }
    }
    handled
}

/// Runs the handlers of every pending, unmasked event of this vCPU now. The upcall calls it;
/// a kernel may also call it after [`sched::block`](crate::sched::block) with upcalls
/// masked. A kernel whose own IDT has its own handler for the upcall vector calls it from
/// there (no EOI: the upcall is not an APIC interrupt). Returns how many events it handled.
pub fn dispatch_pending() -> usize {
    scan(
        &crate::shared::shared_page(),
        &crate::shared::this_vcpu(),
        call_handler,
    )
}

/// Holds back upcalls on this vCPU (events stay pending). Returns whether they were already
/// held back, for [`restore_upcalls`].
pub fn mask_upcalls() -> bool {
    crate::shared::this_vcpu()
        .upcall_mask()
        .swap(1, Ordering::SeqCst)
        != 0
}

/// Lets upcalls through on this vCPU. If an event is already waiting, makes a cheap
/// hypercall (`version`) so the hypervisor delivers it now rather than at the next exit
/// (docs/abi.md 8.8); it arrives once RFLAGS.IF is set.
pub fn unmask_upcalls() {
    let vcpu = crate::shared::this_vcpu();
    vcpu.upcall_mask().store(0, Ordering::SeqCst);
    if vcpu.upcall_pending().load(Ordering::SeqCst) != 0 {
        let _ = hypercall::version();
    }
}

/// Puts the upcall mask back as [`mask_upcalls`] found it.
pub fn restore_upcalls(were_masked: bool) {
    if !were_masked {
        unmask_upcalls();
    }
}

/// Whether upcalls are held back on this vCPU.
pub fn upcalls_masked() -> bool {
    crate::shared::this_vcpu()
        .upcall_mask()
        .load(Ordering::SeqCst)
        != 0
}

/// The interrupt handler of the upcall vector.
fn upcall_handler(_frame: &mut crate::interrupts::TrapFrame) {
    dispatch_pending();
}

/// Installs the event dispatcher as the handler of interrupt `vector` in the SDK's dispatcher,
/// without telling the hypervisor: for kernels that batch `VcpuOp::SetUpcallVector` with
/// other calls. The vector must reach the dispatcher: through the SDK's IDT
/// ([`crate::interrupts::init`]), or through the kernel's own IDT routing it to
/// [`crate::interrupts::entry_point`] (or calling [`dispatch_pending`] from its own handler).
pub fn install_upcall_handler(vector: u8) {
    crate::interrupts::set_handler(vector, upcall_handler);
}

/// Routes this vCPU's upcall to interrupt `vector` (32..=255): installs the dispatcher as the
/// vector's handler and tells the hypervisor (`VcpuOp::SetUpcallVector`). Upcalls stay masked
/// until [`unmask_upcalls`]. The vector must reach the dispatcher, through the SDK's IDT
/// ([`crate::interrupts::init`]) or the kernel's own ([`install_upcall_handler`]); it never
/// loads an IDT itself.
pub fn install_upcall(vector: u8) -> Result<(), HypercallError> {
    install_upcall_handler(vector);
    crate::vcpu::set_upcall_vector(crate::shared::current_vcpu(), vector)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::tests::fake_page;

    /// Raises `port` as the hypervisor does: pending bit, selector, upcall flag.
    fn raise(page: &SharedPage, port: u32) {
        let (word, bit) = Port(port).word_and_bit();
        let was = page.pending_word(word).fetch_or(1 << bit, Ordering::SeqCst);
        let masked = page.mask_word(word).load(Ordering::SeqCst) & (1 << bit) != 0;
        if was & (1 << bit) == 0 && !masked {
            let vcpu = page.vcpu_slot(0);
            vcpu.pending_sel().fetch_or(1 << word, Ordering::SeqCst);
            vcpu.upcall_pending().store(1, Ordering::SeqCst);
        }
    }

    fn scan_all(page: &SharedPage) -> Vec<u32> {
        let mut seen = Vec::new();
        scan(page, &page.vcpu_slot(0), |port| seen.push(port.number()));
        seen
    }

    #[test]
    fn scan_handles_every_pending_port_once_and_clears_the_flags() {
        let page = fake_page();
        for port in [1, 63, 64, 700, 1023] {
            raise(&page, port);
        }
        assert_eq!(scan_all(&page), [1, 63, 64, 700, 1023]);
        let vcpu = page.vcpu_slot(0);
        assert_eq!(vcpu.upcall_pending().load(Ordering::SeqCst), 0);
        assert_eq!(vcpu.pending_sel().load(Ordering::SeqCst), 0);
        assert!((0..NR_PORT_WORDS).all(|w| page.pending_word(w).load(Ordering::SeqCst) == 0));
        assert!(scan_all(&page).is_empty());
    }

    #[test]
    fn masked_ports_stay_pending() {
        let page = fake_page();
        page.mask_word(0).store(1 << 5, Ordering::SeqCst);
        page.pending_word(0).store(1 << 5, Ordering::SeqCst);
        raise(&page, 6);
        assert_eq!(scan_all(&page), [6]);
        assert_eq!(page.pending_word(0).load(Ordering::SeqCst), 1 << 5);
    }

    #[test]
    fn the_pending_bit_is_clear_before_the_handler_runs() {
        let page = fake_page();
        raise(&page, 9);
        let mut seen_pending = None;
        scan(&page, &page.vcpu_slot(0), |port| {
            seen_pending = Some(page.pending_word(0).load(Ordering::SeqCst) & (1 << 9) != 0);
            assert_eq!(port, Port(9));
        });
        assert_eq!(seen_pending, Some(false));
    }

    #[test]
    fn an_event_raised_by_a_handler_is_handled_in_the_same_dispatch() {
        let page = fake_page();
        raise(&page, 3);
        let mut seen = Vec::new();
        scan(&page, &page.vcpu_slot(0), |port| {
            seen.push(port.number());
            if port.number() == 3 {
                raise(&page, 200);
            }
        });
        assert_eq!(seen, [3, 200]);
    }

    #[test]
    fn a_port_that_keeps_raising_itself_is_bounded() {
        let page = fake_page();
        raise(&page, 2);
        let mut calls = 0;
        scan(&page, &page.vcpu_slot(0), |_| {
            calls += 1;
            raise(&page, 2);
        });
        assert_eq!(calls, MAX_SCAN_ROUNDS);
        // What is left is still flagged, so the hypervisor injects the upcall again.
        assert_eq!(page.vcpu_slot(0).upcall_pending().load(Ordering::SeqCst), 1);
    }

    #[test]
    fn port_info_names_the_peer_of_inter_domain_and_unbound_ports() {
        let status = |state: PortState, detail: u16| PortStatus {
            state: state as u8,
            vcpu: 0,
            detail,
            pending: true,
            masked: false,
        };
        let info = PortInfo::from(status(PortState::Interdomain, 7));
        assert_eq!(info.state, Some(PortState::Interdomain));
        assert_eq!(info.peer, Some(7));
        assert_eq!(info.virq, None);
        assert!(info.pending && !info.masked);
        assert_eq!(
            info.to_string(),
            "inter-domain with domain 7, vCPU 0, pending"
        );

        let info = PortInfo::from(PortStatus::unpack(status(PortState::Unbound, 3).pack()));
        assert_eq!((info.state, info.peer), (Some(PortState::Unbound), Some(3)));
        assert_eq!(info.to_string(), "unbound for domain 3, vCPU 0, pending");

        let info = PortInfo::from(status(PortState::Virq, 1));
        assert_eq!((info.peer, info.virq), (None, Some(1)));
        assert_eq!(info.to_string(), "VIRQ 1, vCPU 0, pending");

        let info = PortInfo::from(PortStatus::unpack(9 | 1 << 33));
        assert_eq!((info.state, info.raw_state, info.peer), (None, 9, None));
        assert_eq!(info.to_string(), "state 9, vCPU 0, masked");
        assert_eq!(
            PortInfo::from(PortStatus::unpack(0)).to_string(),
            "free, vCPU 0"
        );
    }

    #[test]
    fn ports_split_into_word_and_bit() {
        assert_eq!(Port(0).word_and_bit(), (0, 0));
        assert_eq!(Port(65).word_and_bit(), (1, 1));
        assert_eq!(Port(1023).word_and_bit(), (15, 63));
        assert!(!Port(1024).in_range());
    }
}

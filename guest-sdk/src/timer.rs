//! The paravirtual timers of the current vCPU (docs/abi.md 9.3): a periodic tick and a
//! one-shot deadline, both delivered as VIRQ_TIMER events.
//!
//! [`bind`] binds VIRQ_TIMER to a port once and sets its handler; then [`start_periodic`] or
//! [`set_deadline`] arm the timer. Times are system time in ns ([`crate::time::now_ns`]).
//! Without a bound VIRQ_TIMER the hypervisor drops the expiries.

use core::sync::atomic::{AtomicU32, Ordering};

use lamina_abi::event_channel::Virq;

use crate::events::{self, EventHandler, Port};
use crate::hypercall::HypercallError;
use crate::shared::current_vcpu;

/// The port VIRQ_TIMER is bound to on the current vCPU (0: not bound yet).
static TIMER_PORT: AtomicU32 = AtomicU32::new(0);

/// Binds VIRQ_TIMER of the current vCPU to a port (the first time) and has the event
/// dispatcher call `handler` on each expiry. Returns the port.
pub fn bind(handler: EventHandler) -> Result<Port, HypercallError> {
    let port = match port() {
        Some(port) => port,
        None => {
            let port = events::bind_virq(Virq::Timer, current_vcpu())?;
            TIMER_PORT.store(port.number(), Ordering::Release);
            port
        }
    };
    events::set_handler(port, handler);
    Ok(port)
}

/// The VIRQ_TIMER port, once [`bind`] made it.
pub fn port() -> Option<Port> {
    match TIMER_PORT.load(Ordering::Acquire) {
        0 => None,
        number => Some(Port::new(number)),
    }
}

/// Ticks every `period_ns` from now (the first at now + period), on a fixed grid.
pub fn start_periodic(period_ns: u64) -> Result<(), HypercallError> {
    crate::vcpu::set_periodic_timer(current_vcpu(), period_ns)
}

/// Stops the periodic tick.
pub fn stop_periodic() -> Result<(), HypercallError> {
    crate::vcpu::set_periodic_timer(current_vcpu(), 0)
}

/// Fires once when system time reaches `deadline_ns` (at once if it has passed; never early).
/// Replaces an earlier deadline.
pub fn set_deadline(deadline_ns: u64) -> Result<(), HypercallError> {
    crate::vcpu::set_singleshot_timer(current_vcpu(), deadline_ns.max(1))
}

/// Fires once `delay_ns` from now; returns the deadline.
pub fn set_timeout(delay_ns: u64) -> Result<u64, HypercallError> {
    let deadline = crate::time::now_ns().saturating_add(delay_ns);
    set_deadline(deadline).map(|()| deadline)
}

/// Cancels the one-shot deadline.
pub fn cancel_deadline() -> Result<(), HypercallError> {
    crate::vcpu::set_singleshot_timer(current_vcpu(), 0)
}

//! The timer group: a periodic tick, and acknowledging the interrupt that brings it.

use core::fmt;
use core::sync::atomic::{AtomicPtr, Ordering};

use crate::events::Port;
use crate::hypercall::HypercallError;
use crate::interrupts::{Routing, TrapFrame};
use crate::multicall::{Batch, Call};
use crate::pvops::vectors;
use crate::x2apic::{self, TimerMode};

/// Timer operations.
pub trait TimerOps: Sync {
    /// The backend's name, for logs.
    fn name(&self) -> &'static str;
    /// Calls `tick` every `period_ns`, the first time one period from now, from interrupt
    /// context with interrupts off. Installs what the backend needs in the SDK's IDT (loading
    /// it if needed) and lets its interrupts through; the kernel still has to enable
    /// interrupts (`sti`). [`start_periodic_routed`](Self::start_periodic_routed) with
    /// [`Routing::SdkIdt`].
    fn start_periodic(&self, period_ns: u64, tick: fn()) -> Result<(), TimerError> {
        self.start_periodic_routed(period_ns, tick, Routing::SdkIdt)
    }
    /// [`start_periodic`](Self::start_periodic) with the IDT chosen: with
    /// [`Routing::KernelIdt`] the backend loads no IDT, and the kernel's own IDT must route
    /// each of [`vectors`](Self::vectors) to [`interrupts::entry_point`](crate::interrupts::entry_point)
    /// or to a handler that calls [`handle_timer_interrupt`](crate::pvops::handle_timer_interrupt)
    /// (native timer) or [`events::dispatch_pending`](crate::events::dispatch_pending) (the
    /// paravirtual upcall); see [`crate::interrupts`], "Bring your own IDT".
    fn start_periodic_routed(
        &self,
        period_ns: u64,
        tick: fn(),
        routing: Routing,
    ) -> Result<(), TimerError>;
    /// The interrupt vectors the backend takes, which a kernel's own IDT must route:
    /// [`vectors::TIMER`] and [`vectors::SPURIOUS`] natively, [`vectors::UPCALL`] for the
    /// paravirtual timer.
    fn vectors(&self) -> &'static [u8];
    /// Stops the tick (a tick already raised may still arrive once).
    fn stop(&self) -> Result<(), TimerError>;
    /// Acknowledges the interrupt being handled: an x2APIC EOI natively, nothing for the
    /// paravirtual upcall (the dispatcher cleared the event's pending bit). The backend's own
    /// tick path calls it; a kernel calls it in handlers of other interrupts of the same kind.
    fn acknowledge(&self);
}

/// Why a timer backend could not start or stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerError {
    /// A hypercall failed.
    Hypercall {
        /// What the backend was doing.
        what: &'static str,
        /// The result.
        error: HypercallError,
    },
    /// CPUID.1:ECX says there is no x2APIC.
    NoX2apic,
    /// CPUID 0x40000010 EBX (the APIC timer's clock) is 0.
    NoTimerClock,
}

impl fmt::Display for TimerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimerError::Hypercall { what, error } => write!(f, "{what} failed: {error}"),
            TimerError::NoX2apic => f.write_str("no x2APIC (CPUID.1:ECX bit 21 clear)"),
            TimerError::NoTimerClock => f.write_str("CPUID 0x40000010 EBX (APIC timer kHz) is 0"),
        }
    }
}

fn failed(what: &'static str) -> impl FnOnce(HypercallError) -> TimerError {
    move |error| TimerError::Hypercall { what, error }
}

/// The kernel's tick function (null before a timer started).
static TICK: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

fn call_tick() {
    let raw = TICK.load(Ordering::Acquire);
    if !raw.is_null() {
        // SAFETY: `start_periodic` of either backend is the only writer, storing a `fn()`.
        let tick = unsafe { core::mem::transmute::<*mut (), fn()>(raw) };
        tick();
    }
}

/// Native: the x2APIC timer in periodic mode on [`vectors::TIMER`], counted from CPUID
/// 0x40000010 EBX, and an EOI MSR write per tick (docs/abi.md 14). Five MSR writes to start,
/// two exits per tick (the interrupt's and the EOI's).
#[derive(Clone, Copy, Debug, Default)]
pub struct ApicTimer;

fn apic_tick(_frame: &mut TrapFrame) {
    handle_timer_interrupt();
}

/// The native timer's interrupt work: the kernel's tick, then the x2APIC EOI. For a kernel
/// whose own IDT has its own handler for [`vectors::TIMER`] (with [`Routing::KernelIdt`]); a
/// gate to [`interrupts::entry_point`](crate::interrupts::entry_point) does the same.
pub fn handle_timer_interrupt() {
    call_tick();
    ApicTimer.acknowledge();
}

/// The SDK's IDT when asked for, loaded the first time.
fn prepare_idt(routing: Routing) {
    if routing == Routing::SdkIdt {
        crate::interrupts::init();
    }
}

fn apic_spurious(_frame: &mut TrapFrame) {
    // Spurious interrupts take no EOI (SDM Vol. 3A 12.9).
}

impl TimerOps for ApicTimer {
    fn name(&self) -> &'static str {
        "x2apic"
    }

    fn start_periodic_routed(
        &self,
        period_ns: u64,
        tick: fn(),
        routing: Routing,
    ) -> Result<(), TimerError> {
        if !x2apic::available() {
            return Err(TimerError::NoX2apic);
        }
        let timer_khz = x2apic::timer_khz();
        if timer_khz == 0 {
            return Err(TimerError::NoTimerClock);
        }
        TICK.store(tick as *mut (), Ordering::Release);
        prepare_idt(routing);
        crate::interrupts::set_handler(vectors::TIMER, apic_tick);
        crate::interrupts::set_handler(vectors::SPURIOUS, apic_spurious);
        let counts = x2apic::counts_for(period_ns, timer_khz) as u32;
        // SAFETY: CPUID says the x2APIC is there, and the IDT (the SDK's, or the kernel's as
        // `start_periodic_routed` requires) handles both vectors.
        unsafe {
            x2apic::enable(vectors::SPURIOUS);
            x2apic::start_timer(vectors::TIMER, TimerMode::Periodic, counts);
        }
        Ok(())
    }

    fn vectors(&self) -> &'static [u8] {
        &[vectors::TIMER, vectors::SPURIOUS]
    }

    fn stop(&self) -> Result<(), TimerError> {
        if !x2apic::available() {
            return Err(TimerError::NoX2apic);
        }
        // SAFETY: CPUID says the x2APIC is there.
        unsafe { x2apic::stop_timer() };
        Ok(())
    }

    fn acknowledge(&self) {
        // SAFETY: only reached from APIC interrupt handlers, after `start_periodic` checked
        // the x2APIC.
        unsafe { x2apic::eoi() };
    }
}

/// Paravirtual: VIRQ_TIMER bound to a port whose handler ticks, the upcall on
/// [`vectors::UPCALL`], and `vcpu_op` set_periodic_timer (docs/abi.md 8 and 9.3). The upcall
/// vector and the period go to the hypervisor in one multicall. One exit per tick (the
/// upcall's injection), none to acknowledge it.
#[derive(Clone, Copy, Debug, Default)]
pub struct PvTimer;

fn pv_tick(_port: Port) {
    call_tick();
}

impl TimerOps for PvTimer {
    fn name(&self) -> &'static str {
        "vcpu_op"
    }

    fn start_periodic_routed(
        &self,
        period_ns: u64,
        tick: fn(),
        routing: Routing,
    ) -> Result<(), TimerError> {
        TICK.store(tick as *mut (), Ordering::Release);
        prepare_idt(routing);
        crate::timer::bind(pv_tick).map_err(failed("event_channel_op bind_virq(TIMER)"))?;
        crate::events::install_upcall_handler(vectors::UPCALL);
        let vcpu = crate::shared::current_vcpu();
        let mut batch = Batch::<2>::new();
        let vector = batch.push(Call::set_upcall_vector(vcpu, vectors::UPCALL));
        let period = batch.push(Call::set_periodic_timer(vcpu, period_ns));
        let (Ok(vector), Ok(period)) = (vector, period) else {
            unreachable!("a batch of two holds two calls")
        };
        batch.submit().map_err(failed("multicall"))?;
        for (index, what) in [
            (vector, "vcpu_op set_upcall_vector"),
            (period, "vcpu_op set_periodic_timer"),
        ] {
            match batch.result(index) {
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(TimerError::Hypercall { what, error }),
                None => {
                    return Err(TimerError::Hypercall {
                        what,
                        error: HypercallError::Errno(lamina_abi::Errno::EAGAIN),
                    });
                }
            }
        }
        crate::events::unmask_upcalls();
        Ok(())
    }

    fn vectors(&self) -> &'static [u8] {
        &[vectors::UPCALL]
    }

    fn stop(&self) -> Result<(), TimerError> {
        crate::timer::stop_periodic().map_err(failed("vcpu_op set_periodic_timer(0)"))
    }

    fn acknowledge(&self) {}
}

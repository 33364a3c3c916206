//! The console group: where [`println!`](crate::println) output goes.

use core::sync::atomic::{AtomicBool, Ordering};

/// Console output operations.
pub trait ConsoleOps: Sync {
    /// The backend's name, for logs.
    fn name(&self) -> &'static str;
    /// Writes `bytes` (the line buffer hands over whole lines).
    fn write(&self, bytes: &[u8]);
    /// Has everything written so far printed now.
    fn flush(&self);
}

/// Native: the emulated 16550 at COM1, one trapped `out` per byte (docs/abi.md 7.1).
#[derive(Clone, Copy, Debug, Default)]
pub struct UartConsole;

impl ConsoleOps for UartConsole {
    fn name(&self) -> &'static str {
        "uart"
    }

    fn write(&self, bytes: &[u8]) {
        crate::uart::write_bytes(bytes);
    }

    fn flush(&self) {}
}

/// The boot console: one `console_io` write (one exit) per line (docs/abi.md 3.2); the UART
/// if the hypercall fails.
#[derive(Clone, Copy, Debug, Default)]
pub struct HypercallConsole;

impl ConsoleOps for HypercallConsole {
    fn name(&self) -> &'static str {
        "console_io"
    }

    fn write(&self, bytes: &[u8]) {
        if crate::hypercall::console_write(bytes).is_err() {
            crate::uart::write_bytes(bytes);
        }
    }

    fn flush(&self) {}
}

/// Set once a send on the console port failed: the ring console then writes through
/// `console_io`, having said why once.
static RING_REFUSED: AtomicBool = AtomicBool::new(false);

/// Paravirtual: the console ring, no exit per line (docs/abi.md 13). The hypervisor prints
/// the ring at the domain's next exit; [`flush`](ConsoleOps::flush) sends on the console port.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingConsole;

impl ConsoleOps for RingConsole {
    fn name(&self) -> &'static str {
        "ring"
    }

    fn write(&self, bytes: &[u8]) {
        if RING_REFUSED.load(Ordering::Relaxed) {
            HypercallConsole.write(bytes);
            return;
        }
        // With interrupts off, a task preempted in the middle of a write cannot let another
        // task's output in between its bytes and the index that publishes them: the ring has
        // one producer at a time, as it must.
        if let Err(stalled) = crate::interrupts::without(|| crate::console::ring::write(bytes)) {
            if stalled.error == lamina_abi::Errno::EAGAIN {
                // The sends were taken but the ring did not drain: the domain's console
                // budget is spent (docs/abi.md 13.1), and `console_io` would be refused too.
                // What did not fit is dropped; the ring drains as the budget grows again.
                return;
            }
            // Not hidden: one line says what the hypervisor refused.
            RING_REFUSED.store(true, Ordering::Relaxed);
            let _ = core::fmt::Write::write_fmt(
                &mut ThroughHypercall,
                format_args!(
                    "lamina-guest-sdk: console ring stalled (send on {}: {}); console_io from now on\n",
                    crate::console::ring::console_port(),
                    stalled.error,
                ),
            );
            HypercallConsole.write(&bytes[stalled.written..]);
        }
    }

    fn flush(&self) {
        if !RING_REFUSED.load(Ordering::Relaxed) {
            let _ = crate::console::ring::flush();
        }
    }
}

/// Formats straight into the console hypercall (the hypervisor joins the pieces into lines).
struct ThroughHypercall;

impl core::fmt::Write for ThroughHypercall {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        HypercallConsole.write(text.as_bytes());
        Ok(())
    }
}

/// Each backend is also a [`core::fmt::Write`] sink, unbuffered: `write!(RingConsole, ...)`
/// hands every formatted piece to the backend as it comes (the hypervisor joins the pieces of
/// one source into lines). For a kernel's own console macros or logger.
macro_rules! impl_fmt_write {
    ($($backend:ty),*) => {$(
        impl core::fmt::Write for $backend {
            fn write_str(&mut self, text: &str) -> core::fmt::Result {
                ConsoleOps::write(self, text.as_bytes());
                Ok(())
            }
        }
    )*};
}

impl_fmt_write!(UartConsole, HypercallConsole, RingConsole);

//! The kernel's spin lock, waiting through the smp group (docs/abi.md 20, "Spin-waiting").
//!
//! A waiter spins a little; if the lock is still taken it publishes itself in `waiters` and
//! tries once more, then waits for a kick: paravirtually it polls its kick port (an IPI slot
//! of its own, masked so that the upcall never consumes it) and sleeps until the holder's
//! send; natively it runs a pause loop and the holder's kick is an x2APIC IPI. The order
//! (publish, retry, wait) against the holder's (release, read `waiters`, kick), all
//! sequentially consistent, loses no kick: either the retry finds the lock free or the
//! holder sees the waiter's bit; and a poll returns at once when the kick came first.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::percpu;
use lamina_guest_sdk::pvops::{self, Backend};

/// Pause-loop iterations before a waiter publishes itself.
const SPINS: u32 = 64;

/// Each vCPU's kick port (paravirtual; unused natively).
static KICK_PORTS: [AtomicU64; super::MAX] = [const { AtomicU64::new(0) }; super::MAX];

/// Acquisitions that found the lock taken at first (differs by mode and run).
pub(crate) static CONTENDED: AtomicU64 = AtomicU64::new(0);
/// Times a vCPU found a lock taken after its spins and waited for a kick (differs by mode
/// and run).
pub(crate) static WAITS: AtomicU64 = AtomicU64::new(0);
/// Kicks sent on release.
pub(crate) static KICKS: AtomicU64 = AtomicU64::new(0);

/// Records vCPU `vcpu`'s kick port (bound by vCPU 0 at bring-up).
pub(crate) fn set_kick_port(vcpu: u32, port: Port) {
    KICK_PORTS[vcpu as usize].store(u64::from(port.number()), Ordering::Relaxed);
}

pub(crate) struct SpinLock {
    locked: AtomicBool,
    /// vCPUs waiting for a kick, a bit each.
    waiters: AtomicU64,
}

impl SpinLock {
    pub(crate) const fn new() -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            waiters: AtomicU64::new(0),
        }
    }

    fn try_lock(&self) -> bool {
        !self.locked.swap(true, Ordering::SeqCst)
    }

    pub(crate) fn lock(&self) {
        if self.try_lock() {
            return;
        }
        CONTENDED.fetch_add(1, Ordering::Relaxed);
        loop {
            for _ in 0..SPINS {
                if !self.locked.load(Ordering::Relaxed) {
                    break;
                }
                core::hint::spin_loop();
            }
            if self.try_lock() {
                return;
            }
            let me = percpu::current();
            let bit = 1u64 << me;
            self.waiters.fetch_or(bit, Ordering::SeqCst);
            if self.try_lock() {
                self.waiters.fetch_and(!bit, Ordering::SeqCst);
                return;
            }
            WAITS.fetch_add(1, Ordering::Relaxed);
            let port = Port::new(KICK_PORTS[me as usize].load(Ordering::Relaxed) as u32);
            pvops::smp().wait_for_kick(port);
            if pvops::selection().smp == Backend::Paravirt {
                // Poll leaves the pending bit to the waiter (docs/abi.md 3.3).
                events::clear_pending(port);
            }
            self.waiters.fetch_and(!bit, Ordering::SeqCst);
        }
    }

    pub(crate) fn unlock(&self) {
        self.locked.store(false, Ordering::SeqCst);
        // One waiter is enough: it takes the lock, or publishes itself again. Taking its bit
        // here kicks each wait once, not at every release until it has run (Linux's pv
        // qspinlock clears the waiter's "halted" state the same way).
        let mut waiters = self.waiters.load(Ordering::SeqCst);
        while waiters != 0 {
            let first = waiters & waiters.wrapping_neg();
            match self.waiters.compare_exchange(
                waiters,
                waiters & !first,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    KICKS.fetch_add(1, Ordering::Relaxed);
                    if let Err(error) = pvops::smp().send_ipi(first, super::KICK_KIND) {
                        super::fail_here(format_args!("kick failed: {error}"));
                    }
                    return;
                }
                Err(now) => waiters = now,
            }
        }
    }
}

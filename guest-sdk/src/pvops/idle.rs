//! The idle group: what a kernel does when it has nothing to run.

/// Idle operations.
pub trait IdleOps: Sync {
    /// The backend's name, for logs.
    fn name(&self) -> &'static str;
    /// Called with interrupts off, after the kernel found nothing to run: waits until an
    /// interrupt (native) or event (paravirtual) is pending, and returns with interrupts on,
    /// after its handler ran. No wake-up is lost between the kernel's check and the wait.
    fn idle(&self);
}

/// Native: `sti; hlt`, which the hypervisor intercepts and sleeps the vCPU until an
/// interrupt can be injected (docs/abi.md 7.2).
#[derive(Clone, Copy, Debug, Default)]
pub struct HltIdle;

impl IdleOps for HltIdle {
    fn name(&self) -> &'static str {
        "hlt"
    }

    fn idle(&self) {
        crate::interrupts::enable_and_halt();
    }
}

/// Paravirtual: `sched_op` block with interrupts still off, which returns once an event is
/// pending for this vCPU, then `sti`, which lets the upcall in (docs/abi.md 3.3).
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockIdle;

impl IdleOps for BlockIdle {
    fn name(&self) -> &'static str {
        "block"
    }

    fn idle(&self) {
        if let Err(error) = crate::sched::block() {
            panic!("sched_op block failed: {error}");
        }
        crate::interrupts::enable();
    }
}

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

/// Paravirtual: Xen's idiom, where the upcall mask plays the part of IF. Mask upcalls, `sti`,
/// then `sched_op` block, which clears the mask and sleeps until an event is pending
/// (returning at once if one already is): an event that arrives after the kernel's check is
/// held back by the mask and ends the block rather than being lost. The upcall is injected on
/// the very entry that returns from block, with no interrupt-window exit (docs/abi.md 3.3,
/// 8.8).
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockIdle;

impl IdleOps for BlockIdle {
    fn name(&self) -> &'static str {
        "block"
    }

    fn idle(&self) {
        crate::events::mask_upcalls();
        crate::interrupts::enable();
        if let Err(error) = crate::sched::block() {
            panic!("sched_op block failed: {error}");
        }
    }
}

//! The run loop: round-robin over runnable domains, one vCPU each.
//!
//! A vCPU runs until it yields or its domain ends; then the next runnable domain gets the
//! CPU. Preemption by the hypervisor's timer comes with the multi-domain scheduler.

use crate::common::domain::Domain;
use crate::common::exits::handle_exit;
use crate::common::hypercall::Next;
use crate::common::vcpu::VirtualCpu;

/// A domain and its vCPU.
pub struct Slot<V> {
    /// The domain.
    pub domain: Domain,
    /// Its only vCPU.
    pub vcpu: V,
}

/// Runs every domain until all have ended.
pub fn run_all<V: VirtualCpu>(slots: &mut [Slot<V>]) {
    while slots.iter().any(|s| s.domain.is_runnable()) {
        for slot in slots.iter_mut().filter(|s| s.domain.is_runnable()) {
            loop {
                let exit = slot.vcpu.run();
                match handle_exit(&mut slot.domain, &mut slot.vcpu, exit) {
                    Next::Resume => {}
                    Next::Yield | Next::Stop => break,
                }
            }
        }
    }
}

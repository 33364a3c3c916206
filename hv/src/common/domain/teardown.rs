//! Teardown of a domain that ended, whichever way it ended (docs/abi.md 17, "Teardown"): its
//! grants revoked, its event channels closed as a guest close would (peers notified), its vCPU
//! and nested page tables freed, its RAM scrubbed and returned. Runs once, as soon as the
//! domain ended: from the scheduler, or from the `domctl_op` destroy that ended it.
//!
//! Scrubbing RAM is the long part (a 4 MiB domain takes 0.5 ms under QEMU and 5 ms under
//! Bochs, a 1 GiB one about 0.1 s on hardware), so the scheduler does it a slice at a time
//! between its decisions, as Xen relinquishes a dead domain's memory preemptibly: other domains
//! keep their latency. Destroy scrubs before it returns.

use crate::common::domain::Slot;
use crate::common::domain::{DOMAIN_COUNT, Domain, DomainTable};
use crate::common::events::Binding;
use crate::common::memory::guest_memory::{GuestMemory, OwnedRam};
use crate::common::time::read_tsc;
use crate::common::vcpu::state::request;
use crate::common::{memory::phys, output};
use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};
use lamina_abi::event_channel::NR_PORTS;

/// RAM scrubbed and returned per step: about 20 us on hardware, 0.3 ms under Bochs.
pub const SCRUB_SLICE_BYTES: u64 = 256 << 10;

/// The RAM of a domain that was torn down, on its way back to the allocator.
pub struct Scrub {
    id: u32,
    name: String,
    ram: Option<OwnedRam>,
    /// The domain's count of RAM not yet returned, which each step brings down.
    unreturned: Arc<AtomicU64>,
    /// Bytes of RAM given back so far.
    returned: u64,
    /// Bytes of hypervisor structures (VMCS or VMCB, nested page tables) given back.
    structures: u64,
    /// TSC ticks spent scrubbing and returning the RAM.
    scrub_tsc: u64,
}

impl Scrub {
    /// Scrubs and returns the next slice; true once all of the RAM is back (and the teardown
    /// line printed).
    pub fn step(&mut self) -> bool {
        let Some(ram) = self.ram.as_mut() else {
            self.unreturned.store(0, Ordering::Relaxed);
            return true;
        };
        let before = phys::figures().1;
        let started = read_tsc();
        ram.release_front(SCRUB_SLICE_BYTES);
        self.scrub_tsc += read_tsc().wrapping_sub(started);
        self.returned += phys::figures().1.saturating_sub(before);
        // Only after the allocator has the bytes: a supervisor that sees memory_bytes drop
        // finds free_bytes grown by as much (docs/abi.md 17).
        self.unreturned.store(ram.bytes(), Ordering::Relaxed);
        if ram.bytes() > 0 {
            return false;
        }
        self.ram = None;
        self.report();
        true
    }

    /// Scrubs and returns the rest at once.
    pub fn finish(mut self) {
        while !self.step() {}
    }

    fn report(&self) {
        output::hv_line(format_args!(
            "lamina: domain {} {} torn down: {} KiB RAM and {} KiB of hypervisor structures scrubbed and returned, {} KiB free, scrub_tsc={}",
            self.id,
            self.name,
            self.returned >> 10,
            self.structures >> 10,
            phys::figures().1 >> 10,
            self.scrub_tsc
        ));
    }
}

/// Tears down `slot`'s domain, which has ended; `peers` are all the other domains. Returns
/// its RAM, still to be scrubbed and returned ([`Scrub::step`], [`Scrub::finish`]). Does
/// nothing (`None`) for a domain still running or already torn down.
#[must_use = "the RAM is returned by Scrub::step or Scrub::finish"]
pub fn tear_down<V>(slot: &mut Slot<V>, peers: &mut dyn DomainTable) -> Option<Scrub> {
    if slot.domain.is_runnable() || slot.domain.torn_down {
        return None;
    }
    let free_at_start = phys::figures().1;
    // Grants first: a grantee must stop seeing the RAM before it is scrubbed (docs/abi.md 16).
    // This also frees the domain's nested page tables and its pages of zeros.
    crate::common::grants::release_domain(&mut slot.domain, peers);
    close_event_channels(&mut slot.domain, peers);
    // The vCPUs own their control structures (VMCS or VMCB).
    drop(core::mem::take(&mut slot.vcpus));
    // A batch a vCPU was preempted in is never finished: its copy goes with the storage kept
    // for the next (docs/abi.md 12).
    for state in &mut slot.domain.vcpus {
        state.preempted_batch = None;
        state.spare_batch = None;
    }
    let structures = phys::figures().1.saturating_sub(free_at_start);
    let domain = &mut slot.domain;
    // Nothing may reach the RAM once it is handed back: the domain keeps an empty view.
    domain.memory = GuestMemory::empty();
    domain.torn_down = true;
    let ram = domain.ram.take();
    domain
        .ram_unreturned
        .store(ram.as_ref().map_or(0, OwnedRam::bytes), Ordering::Relaxed);
    Some(Scrub {
        id: domain.id,
        name: domain.name.clone(),
        ram,
        unreturned: domain.ram_unreturned.clone(),
        returned: 0,
        structures,
        scrub_tsc: 0,
    })
}

/// Closes every port of `domain`. The peer of an inter-domain channel sees its end turn
/// Unbound and raised, as after a close by the guest (docs/abi.md 8.5); every other domain
/// stops counting ports that name `domain` as able to wake it, and has its waiting vCPU
/// looked at again (it may have waited for `domain` alone).
fn close_event_channels(domain: &mut Domain, peers: &mut dyn DomainTable) {
    let own = domain.id as u16;
    for port in 1..NR_PORTS {
        let Ok(binding) = domain.events.close(&domain.memory, u64::from(port)) else {
            continue; // free
        };
        if let Binding::Interdomain {
            remote,
            remote_port,
        } = binding
            && remote != own
            && let Some(peer) = peers.get_mut(u32::from(remote))
        {
            peer.events.disconnect(remote_port, own);
            peer.raise_port(remote_port);
        }
    }
    for id in 1..=DOMAIN_COUNT.load(Ordering::Relaxed) {
        if let Some(peer) = peers.get_mut(id) {
            peer.events.remote_ended(own);
            for state in &peer.vcpus {
                state.requests.make(request::WAKE_CHECK);
            }
        }
    }
}

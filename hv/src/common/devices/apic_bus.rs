//! Delivers an IPI that one vCPU wrote to its emulated x2APIC's ICR to the other vCPUs of its
//! domain (docs/abi.md 14.1, 14.2): fixed interrupts into their IRR, INIT and STARTUP to start a
//! vCPU that never ran, the way `vcpu_op` initialise and up do (docs/abi.md 19).
//!
//! Runs in the sender's exit handler with the domain-table lock held: every vCPU's emulated
//! APIC lives in its [`crate::common::vcpu::state::VcpuState`] inside the domain, not in the
//! hardware state a running vCPU takes out of its slot, so it is reachable from here; a
//! target running on another CPU learns of it through its request bits.

use crate::common::devices::vlapic::{Ipi, IpiKind};
use crate::common::domain::Domain;
use crate::common::memory::guest_paging::{self, PagingMode};
use crate::common::vcpu::state::{StartState, request};

/// Guest-physical address bits of CR3 (bits 51:12): the PCID and the cache-control bits are
/// not part of what a started vCPU gets.
const CR3_ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// Delivers `ipi`, sent by vCPU `sender`, to every other vCPU of `domain` it names.
/// `sender_cr3` reads the sender's CR3, which only a STARTUP needs. A destination that names
/// no vCPU drops it without a trace, as a bus with no such APIC would.
pub fn deliver(domain: &mut Domain, sender: usize, ipi: Ipi, sender_cr3: impl Fn() -> u64) {
    let now = domain.now();
    for index in 0..domain.vcpus.len() {
        if index == sender || !ipi.reaches(&domain.vcpus[index].vlapic) {
            continue;
        }
        match ipi.kind {
            IpiKind::Fixed(vector) => {
                let state = &mut domain.vcpus[index];
                state.vlapic.raise(vector);
                // A target in HLT is woken by the scheduler's next look at it (an idle CPU
                // is woken for that); one in the guest on another CPU is kicked out.
                state.requests.make(request::EVENT);
            }
            IpiKind::Init => {
                // Only a vCPU that never ran can wait for a SIPI: Lamina cannot reset the
                // state of one that did (INIT to it is ignored, docs/abi.md 14.2).
                let state = &mut domain.vcpus[index];
                if index != 0 && state.start.is_none() && !state.up {
                    state.waiting_for_sipi = true;
                }
            }
            IpiKind::Startup(vector) => {
                if !domain.vcpus[index].waiting_for_sipi {
                    // Not after INIT, or started already (a second SIPI): ignored.
                    continue;
                }
                let Some(start) = sipi_start_state(domain, index, vector, sender_cr3()) else {
                    // A page the vCPU could not fetch from: ignored, it waits on.
                    continue;
                };
                let state = &mut domain.vcpus[index];
                state.waiting_for_sipi = false;
                state.set_start(start);
                state.bring_up(now, &domain.memory);
            }
        }
    }
}

/// Where a STARTUP IPI with `vector` starts vCPU `index` (docs/abi.md 14.2): RIP at the
/// vector's page, the sender's page tables, RSP 0, the x2APIC ID in RDI. `None` when the
/// page tables are not a page of RAM or do not map that page to RAM.
fn sipi_start_state(
    domain: &Domain,
    index: usize,
    vector: u8,
    sender_cr3: u64,
) -> Option<StartState> {
    let rip = u64::from(vector) << 12;
    let cr3 = sender_cr3 & CR3_ADDRESS;
    domain.memory.check(cr3, 4096).ok()?;
    let mode = PagingMode {
        paging: true,
        long_mode: true,
        cr3,
        write_protect: true,
    };
    let page = guest_paging::translate(&domain.memory, mode, rip)?;
    domain.memory.check(page & !0xfff, 4096).ok()?;
    Some(StartState {
        rip,
        rsp: 0,
        cr3,
        argument: u64::from(domain.vcpus[index].vlapic.apic_id()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::memory::guest_memory::GuestMemory;
    use crate::common::memory::guest_memory::testing::{TestMemory, test_memory};
    use crate::common::time::TimeBase;

    const RAM: u64 = 4 << 20;
    /// Page tables like the boot ones: PML4 0x4000, PDPT 0x5000, PD 0x6000, 2 MiB pages.
    const CR3: u64 = 0x4000;
    const ICR: u32 = 0x830;
    const SVR: u32 = 0x80f;

    /// A domain with `vcpus` vCPUs, 4 MiB of RAM identity-mapped by the tables at [`CR3`].
    fn domain(vcpus: usize) -> (TestMemory, Domain) {
        let t = test_memory(RAM);
        t.mem.write_u64(0x4000, 0x5000 | 3).unwrap();
        t.mem.write_u64(0x5000, 0x6000 | 3).unwrap();
        for i in 0..RAM >> 21 {
            t.mem.write_u64(0x6000 + 8 * i, (i << 21) | 0x83).unwrap();
        }
        // SAFETY: the domain's view aliases the test memory, which outlives it in the tuple.
        let mem = unsafe { GuestMemory::new(t.mem.host_base() as *mut u8, t.mem.size()) };
        let time = TimeBase::new(1_000_000_000, 0, 0, 0);
        (t, Domain::with_vcpus(1, "t".into(), mem, time, vcpus))
    }

    /// vCPU `sender` writes `icr` to its ICR with `cr3` loaded.
    fn send(d: &mut Domain, sender: usize, cr3: u64, icr: u64) {
        let sent = d.vcpus[sender].vlapic.write_msr(ICR, icr, 0, 0);
        if let Ok(Some(ipi)) = sent {
            deliver(d, sender, ipi, || cr3);
        }
    }

    fn init(target: u64) -> u64 {
        (target << 32) | (1 << 15) | (1 << 14) | (5 << 8)
    }

    fn startup(target: u64, vector: u8) -> u64 {
        (target << 32) | (6 << 8) | u64::from(vector)
    }

    #[test]
    fn init_then_startup_starts_a_vcpu_that_never_ran_at_the_vector_page() {
        let (_t, mut d) = domain(3);
        send(&mut d, 0, CR3 | 0x18, init(2));
        assert!(d.vcpus[2].waiting_for_sipi);
        assert!(!d.vcpus[2].up, "INIT alone starts nothing");
        assert!(!d.vcpus[1].waiting_for_sipi, "only the destination");
        send(&mut d, 0, CR3 | 0x18, startup(2, 0x9f));
        let state = &d.vcpus[2];
        assert!(state.up && !state.waiting_for_sipi);
        assert_eq!(
            state.start,
            Some(StartState {
                rip: 0x9f000,
                rsp: 0,
                cr3: CR3,
                argument: 2,
            }),
            "the sender's CR3 without its low bits, the APIC ID in RDI"
        );
        assert!(state.requests.peek(request::START | request::EVENT));
        assert!(!d.vcpus[1].up);
    }

    #[test]
    fn a_second_startup_and_one_without_init_are_ignored() {
        let (_t, mut d) = domain(3);
        send(&mut d, 0, CR3, startup(1, 0x10));
        assert!(!d.vcpus[1].up, "no INIT before");
        send(&mut d, 0, CR3, init(1));
        send(&mut d, 0, CR3, startup(1, 0x10));
        send(&mut d, 0, 0x8000, startup(1, 0x20));
        assert_eq!(
            d.vcpus[1].start.map(|s| (s.rip, s.cr3)),
            Some((0x10000, CR3))
        );
        // INIT to a vCPU that ran (or was given a start state) is ignored.
        send(&mut d, 0, CR3, init(1));
        assert!(!d.vcpus[1].waiting_for_sipi);
        d.vcpus[1].up = false;
        send(&mut d, 0, CR3, init(1));
        send(&mut d, 0, CR3, startup(1, 0x30));
        assert_eq!(d.vcpus[1].start.map(|s| s.rip), Some(0x10000));
        assert!(!d.vcpus[1].up, "a vCPU taken down stays down");
        // vCPU 0, taken down, never waits for a SIPI either.
        d.vcpus[0].up = false;
        send(&mut d, 2, CR3, init(0));
        assert!(!d.vcpus[0].waiting_for_sipi);
    }

    #[test]
    fn a_startup_whose_page_is_not_ram_is_ignored_and_the_vcpu_waits_on() {
        let (t, mut d) = domain(2);
        send(&mut d, 0, CR3, init(1));
        // Page tables outside RAM, or not a page of RAM at all.
        send(&mut d, 0, RAM, startup(1, 0x10));
        send(&mut d, 0, u64::MAX, startup(1, 0x10));
        // The first 2 MiB mapped above RAM, then not present.
        t.mem.write_u64(0x6000, RAM | 0x83).unwrap();
        send(&mut d, 0, CR3, startup(1, 0x10));
        t.mem.write_u64(0x6000, 0).unwrap();
        send(&mut d, 0, CR3, startup(1, 0x10));
        assert!(!d.vcpus[1].up && d.vcpus[1].start.is_none());
        assert!(d.vcpus[1].waiting_for_sipi);
        t.mem.write_u64(0x6000, 0x83).unwrap();
        send(&mut d, 0, CR3, startup(1, 0x10));
        assert!(d.vcpus[1].up, "a good SIPI after the ignored ones");
    }

    #[test]
    fn all_excluding_self_inits_and_starts_every_vcpu_that_never_ran() {
        let (_t, mut d) = domain(4);
        send(&mut d, 0, CR3, (3 << 18) | (1 << 15) | (1 << 14) | (5 << 8));
        send(&mut d, 0, CR3, (3 << 18) | (6 << 8) | 0x0c);
        for index in 1..4 {
            assert!(d.vcpus[index].up, "vCPU {index}");
            assert_eq!(d.vcpus[index].start.map(|s| s.argument), Some(index as u64));
        }
    }

    #[test]
    fn a_fixed_ipi_reaches_the_named_vcpu_only_and_asks_for_an_event() {
        let (_t, mut d) = domain(3);
        for state in &mut d.vcpus {
            state.vlapic.write_msr(SVR, 0x1ff, 0, 0).unwrap();
            state.requests.take_all();
        }
        send(&mut d, 0, CR3, (2 << 32) | 0x61);
        assert_eq!(d.vcpus[2].vlapic.deliverable_vector(), Some(0x61));
        assert!(d.vcpus[2].requests.peek(request::EVENT));
        assert_eq!(d.vcpus[1].vlapic.deliverable_vector(), None);
        assert!(!d.vcpus[1].requests.peek(request::EVENT));
        assert_eq!(d.vcpus[0].vlapic.deliverable_vector(), None);
        // No vCPU has ID 7, nor is there a logical cluster 1: dropped.
        send(&mut d, 0, CR3, (7 << 32) | 0x62);
        send(&mut d, 0, CR3, (0x0001_0001 << 32) | (1 << 11) | 0x63);
        for state in &d.vcpus {
            assert!(!state.vlapic.is_pending(0x62) && !state.vlapic.is_pending(0x63));
        }
        // All excluding self, from vCPU 2.
        send(&mut d, 2, CR3, (3 << 18) | 0x64);
        assert!(d.vcpus[0].vlapic.is_pending(0x64) && d.vcpus[1].vlapic.is_pending(0x64));
        assert!(!d.vcpus[2].vlapic.is_pending(0x64));
    }

    #[test]
    fn a_fixed_ipi_to_a_software_disabled_apic_is_dropped() {
        let (_t, mut d) = domain(2);
        d.vcpus[0].vlapic.write_msr(SVR, 0x1ff, 0, 0).unwrap();
        send(&mut d, 0, CR3, (1 << 32) | 0x70);
        assert!(!d.vcpus[1].vlapic.is_pending(0x70));
    }
}

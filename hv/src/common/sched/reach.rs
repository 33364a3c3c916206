//! Which domains an exit may reach besides its own, read from the exit and the registers
//! before any lock is taken: it decides which locks the exit is handled under
//! ([`crate::common::sched::locking`]). Whatever is not known to stay in the domain, reach
//! the one domain a register names, or reach domains only where it can still stop without
//! having acted ([`Reach::Named`]) is [`Reach::Any`] (the table exclusive). Every domain is
//! reached under its lock whatever the guess: a wrong one could make a call stop after it
//! acted, which the tests below rule out.

use crate::common::vcpu::{VirtualCpu, VmExit, reg};
use lamina_abi::Hypercall;
use lamina_abi::domctl::DomctlOp;
use lamina_abi::event_channel::{DOMID_SELF, EventChannelOp};
use lamina_abi::grant_table::GrantTableOp;
use lamina_abi::stats::StatsOp;

/// What an exit needs besides its own domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Nothing: its domain's lock is enough.
    Own,
    /// At most one other domain, named by [`PeerOf`].
    OnePeer(PeerOf),
    /// Other domains found only as the call goes (named in guest memory, or every domain in
    /// turn): grant copy, `multicall`, `list_domains`, `phys_info`. Each is locked when the
    /// call reaches it, one at a time; one that comes first in the table and is busy stops the
    /// call before it acts (a batch before the entry), to be finished once the CPU holds it
    /// (`sched::Machine::handle_locked`).
    Named,
    /// Possibly any domain: the table exclusive.
    Any,
}

/// Where the one other domain a call may reach is named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerOf {
    /// The remote end of this event-channel port of the caller (`send`, `close`), read from
    /// its own port table under its lock.
    Port(u64),
    /// This domain id, in a register (grant access and map).
    Domain(u64),
    /// The granter of what the caller's grant window maps at this guest-physical address
    /// (unmap), read from its own window under its lock.
    GrantSlot(u64),
}

/// What exit `exit` of a vCPU of domain `own_id` may reach.
#[inline(always)]
pub fn of_exit<V: VirtualCpu>(exit: &VmExit, vcpu: &mut V, own_id: u32) -> Reach {
    match exit {
        VmExit::Hypercall => {
            let regs = vcpu.regs();
            of_hypercall(
                regs.gpr[reg::RAX],
                regs.gpr[reg::RDI],
                regs.gpr[reg::RSI],
                own_id,
            )
        }
        // Possibly the other vendor's hypercall instruction, arguments not looked at: rare.
        VmExit::InvalidOpcode => Reach::Any,
        // Every other exit is handled with the running domain alone (`exits::handle_exit`
        // hands its peers only to hypercalls).
        _ => Reach::Own,
    }
}

/// What hypercall `nr` with sub-operation `op` and first argument `arg` may reach.
pub fn of_hypercall(nr: u64, op: u64, arg: u64, own_id: u32) -> Reach {
    let is_own = |id: u64| id == DOMID_SELF || id == u64::from(own_id);
    let Ok(call) = Hypercall::try_from(nr) else {
        return Reach::Own; // -ENOSYS
    };
    match call {
        Hypercall::Version
        | Hypercall::ConsoleIo
        | Hypercall::SchedOp
        | Hypercall::VcpuOp
        | Hypercall::MemoryOp => Reach::Own,
        Hypercall::EventChannelOp => match EventChannelOp::try_from(op) {
            Ok(EventChannelOp::Send) => Reach::OnePeer(PeerOf::Port(arg)),
            Ok(EventChannelOp::BindInterdomain) if is_own(arg) => Reach::Own,
            // The remote domain, named in a register (a guest retries it until the remote
            // end is offered: not rare at start).
            Ok(EventChannelOp::BindInterdomain) => Reach::OnePeer(PeerOf::Domain(arg)),
            // The remote end of the port, as for send (`EventChannels::send_target` answers
            // for every inter-domain port close unbinds).
            Ok(EventChannelOp::Close) => Reach::OnePeer(PeerOf::Port(arg)),
            // Unknown sub-operations are -ENOSYS before anything is reached.
            _ => Reach::Own,
        },
        Hypercall::StatsOp => match StatsOp::try_from(op) {
            Ok(StatsOp::ExitCounters) if !is_own(arg) => Reach::Any,
            _ => Reach::Own,
        },
        Hypercall::GrantTableOp => match GrantTableOp::try_from(op) {
            Ok(GrantTableOp::EndAccess) | Err(_) => Reach::Own,
            Ok(GrantTableOp::GrantAccess | GrantTableOp::Map) => {
                Reach::OnePeer(PeerOf::Domain(arg))
            }
            Ok(GrantTableOp::Unmap) => Reach::OnePeer(PeerOf::GrantSlot(arg)),
            // Copy names its domain in guest memory: read once, then locked.
            Ok(GrantTableOp::Copy) => Reach::Named,
            _ => Reach::Any,
        },
        // Each entry is classified as it comes (`DomainTable::admit`).
        Hypercall::Multicall => Reach::Named,
        Hypercall::DomctlOp => match DomctlOp::try_from(op) {
            Ok(DomctlOp::ReadConsole | DomctlOp::Pause | DomctlOp::Unpause) => {
                Reach::OnePeer(PeerOf::Domain(arg))
            }
            Ok(DomctlOp::ListDomains | DomctlOp::PhysInfo) => Reach::Named,
            // A teardown reaches every domain (`domctl::destroy`).
            Ok(_) => Reach::Any,
            Err(_) => Reach::Own,
        },
        _ => Reach::Any,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::domain::{Domain, DomainTable};
    use crate::common::hypercall::{Next, handle};
    use crate::common::memory::guest_memory::GuestMemory;
    use crate::common::memory::guest_memory::testing::test_memory;
    use crate::common::testing::MockVcpu;
    use crate::common::time::TimeBase;

    /// A table that records every time a hypercall reaches for another domain.
    struct Watching {
        peer: Domain,
        reached: u32,
        /// The ids asked for.
        asked: Vec<u32>,
    }

    impl DomainTable for Watching {
        fn get_mut(&mut self, id: u32) -> Option<&mut Domain> {
            self.reached += 1;
            self.asked.push(id);
            (id == self.peer.id).then_some(&mut self.peer)
        }
        fn tear_down(&mut self, id: u32, _caller: &mut Domain) -> bool {
            self.reached += 1;
            self.asked.push(id);
            false
        }
        fn is_parked(&mut self, id: u32) -> bool {
            self.reached += 1;
            self.asked.push(id);
            true
        }
    }

    fn domain(id: u32, t: &crate::common::memory::guest_memory::testing::TestMemory) -> Domain {
        // SAFETY: the view aliases the test memory, which the caller keeps alive longer.
        let mem = unsafe { GuestMemory::new(t.mem.host_base() as *mut u8, t.mem.size()) };
        Domain::new(id, "t".into(), mem, TimeBase::new(1_000_000_000, 0, 0, 0))
    }

    /// Every hypercall and sub-operation classified as staying in its domain really never
    /// asks for another one, whatever its arguments name (the other domain, itself, nothing).
    #[test]
    fn calls_said_to_stay_in_their_domain_never_reach_another() {
        crate::common::domain::DOMAIN_COUNT.fetch_max(2, core::sync::atomic::Ordering::Relaxed);
        let mut checked = 0;
        for nr in 0..Hypercall::COUNT as u64 + 1 {
            for op in 0..24u64 {
                for arg in [2u64, 1, DOMID_SELF, 0, 0x1000] {
                    if of_hypercall(nr, op, arg, 1) != Reach::Own {
                        continue;
                    }
                    let t1 = test_memory(4 << 20);
                    let t2 = test_memory(4 << 20);
                    let mut caller = domain(1, &t1);
                    let mut table = Watching {
                        peer: domain(2, &t2),
                        reached: 0,
                        asked: Vec::new(),
                    };
                    let mut vcpu = MockVcpu::default();
                    let regs = &mut vcpu.regs.gpr;
                    regs[reg::RAX] = nr;
                    regs[reg::RDI] = op;
                    regs[reg::RSI] = arg;
                    regs[reg::RDX] = 0x2000;
                    regs[reg::R10] = 0;
                    handle(&mut caller, 0, &mut vcpu, &mut table);
                    assert_eq!(table.reached, 0, "hypercall {nr} op {op} arg {arg:#x}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 100, "only {checked} combinations looked at");
    }

    /// A call said to reach the domain its first argument names reaches no other one.
    #[test]
    fn calls_that_name_their_peer_in_a_register_reach_only_that_one() {
        crate::common::domain::DOMAIN_COUNT.fetch_max(3, core::sync::atomic::Ordering::Relaxed);
        let mut checked = 0;
        for nr in 0..Hypercall::COUNT as u64 {
            for op in 0..24u64 {
                for arg in [2u64, 3, 1, DOMID_SELF] {
                    let Reach::OnePeer(PeerOf::Domain(named)) = of_hypercall(nr, op, arg, 1) else {
                        continue;
                    };
                    let t1 = test_memory(4 << 20);
                    let t2 = test_memory(4 << 20);
                    let mut caller = domain(1, &t1);
                    // Privileged, so that domain control gets past its check too.
                    caller.privileged = true;
                    let mut table = Watching {
                        peer: domain(2, &t2),
                        reached: 0,
                        asked: Vec::new(),
                    };
                    let mut vcpu = MockVcpu::default();
                    let regs = &mut vcpu.regs.gpr;
                    regs[reg::RAX] = nr;
                    regs[reg::RDI] = op;
                    regs[reg::RSI] = arg;
                    regs[reg::RDX] = 0x2000;
                    regs[reg::R10] = 0x4000_0000;
                    handle(&mut caller, 0, &mut vcpu, &mut table);
                    assert!(
                        table.asked.iter().all(|&id| u64::from(id) == named),
                        "hypercall {nr} op {op} arg {arg:#x} asked for {:?}",
                        table.asked
                    );
                    assert_eq!(table.reached as usize, table.asked.len());
                    checked += 1;
                }
            }
        }
        assert!(checked >= 8, "only {checked} combinations looked at");
    }

    /// A table whose every other domain is busy (it comes first and another CPU holds it).
    struct AllBusy {
        asked: u32,
        kept: Option<Box<crate::common::hypercall::UnfinishedBatch>>,
    }

    impl DomainTable for AllBusy {
        fn get_mut(&mut self, _id: u32) -> Option<&mut Domain> {
            self.asked += 1;
            None
        }
        fn busy(&self) -> bool {
            self.asked > 0
        }
        fn kept(&mut self) -> Option<&mut Option<Box<crate::common::hypercall::UnfinishedBatch>>> {
            Some(&mut self.kept)
        }
    }

    /// A call that reaches domains as it goes ([`Reach::Named`]) and finds one busy has done
    /// nothing when it stops: RAX as it was (the call is made again) and not a byte of guest
    /// memory written, whatever its arguments.
    #[test]
    fn calls_that_reach_domains_as_they_go_stop_before_acting_when_one_is_busy() {
        use lamina_abi::grant_table::copy_direction;
        crate::common::domain::DOMAIN_COUNT.fetch_max(3, core::sync::atomic::Ordering::Relaxed);
        let mut stopped = 0;
        for nr in 0..Hypercall::COUNT as u64 {
            for op in 0..8u64 {
                for (arg, direction) in [
                    (0x1000u64, copy_direction::FROM_GRANT),
                    (0x1000, 1),
                    (0x3000, 0),
                    (u64::MAX, 0),
                ] {
                    if of_hypercall(nr, op, arg, 1) != Reach::Named {
                        continue;
                    }
                    let t1 = test_memory(4 << 20);
                    let mut caller = domain(1, &t1);
                    caller.privileged = true;
                    // A copy request naming domain 2 at 0x1000, a batch at 0x3000 of a copy.
                    let mut request = [0u8; 24];
                    request[0] = 2;
                    request[2] = direction;
                    request[12] = 64; // len
                    request[16..24].copy_from_slice(&0x8000u64.to_le_bytes());
                    t1.mem.write(0x1000, &request).unwrap();
                    let entry: [u64; 7] = [
                        Hypercall::GrantTableOp as u64,
                        GrantTableOp::Copy as u64,
                        0x1000,
                        0,
                        0,
                        0,
                        0,
                    ];
                    for (i, word) in entry.iter().enumerate() {
                        t1.mem
                            .write(0x3000 + 8 * i as u64, &word.to_le_bytes())
                            .unwrap();
                    }
                    let mut before = vec![0u8; 0x10000];
                    t1.mem.read(0, &mut before).unwrap();
                    let mut vcpu = MockVcpu::default();
                    let regs = &mut vcpu.regs.gpr;
                    regs[reg::RAX] = nr;
                    regs[reg::RDI] = op;
                    regs[reg::RSI] = arg;
                    regs[reg::RDX] = if nr == Hypercall::Multicall as u64 {
                        1
                    } else {
                        4
                    };
                    regs[reg::R10] = 0x2000;
                    regs[reg::R8] = 64;
                    if nr == Hypercall::Multicall as u64 {
                        regs[reg::RDI] = 0x3000;
                        regs[reg::RSI] = 1;
                    }
                    let mut table = AllBusy {
                        asked: 0,
                        kept: None,
                    };
                    let next = handle(&mut caller, 0, &mut vcpu, &mut table);
                    if !table.busy() {
                        continue; // refused before it reached any domain
                    }
                    assert_eq!(next, Next::Again, "hypercall {nr} op {op} arg {arg:#x}");
                    assert_eq!(
                        vcpu.regs.gpr[reg::RAX],
                        nr,
                        "RAX left for the call made again"
                    );
                    let mut after = vec![0u8; 0x10000];
                    t1.mem.read(0, &mut after).unwrap();
                    assert!(before == after, "hypercall {nr} op {op} wrote guest memory");
                    stopped += 1;
                }
            }
        }
        // Copy both ways, a batch of a copy, list_domains, phys_info.
        assert!(stopped >= 5, "only {stopped} calls stopped");
    }

    #[test]
    fn calls_that_name_another_domain_take_the_table_or_the_send_path() {
        let ec = Hypercall::EventChannelOp as u64;
        let gt = Hypercall::GrantTableOp as u64;
        assert_eq!(
            of_hypercall(ec, EventChannelOp::Send as u64, 5, 1),
            Reach::OnePeer(PeerOf::Port(5))
        );
        assert_eq!(
            of_hypercall(gt, GrantTableOp::Map as u64, 2, 1),
            Reach::OnePeer(PeerOf::Domain(2))
        );
        assert_eq!(
            of_hypercall(ec, EventChannelOp::BindInterdomain as u64, 2, 1),
            Reach::OnePeer(PeerOf::Domain(2))
        );
        assert_eq!(
            of_hypercall(ec, EventChannelOp::Close as u64, 2, 1),
            Reach::OnePeer(PeerOf::Port(2))
        );
        assert_eq!(
            of_hypercall(ec, EventChannelOp::BindInterdomain as u64, DOMID_SELF, 1),
            Reach::Own
        );
        assert_eq!(
            of_hypercall(gt, GrantTableOp::Copy as u64, 0, 1),
            Reach::Named
        );
        assert_eq!(
            of_hypercall(Hypercall::Multicall as u64, 0, 0, 1),
            Reach::Named
        );
        let domctl = Hypercall::DomctlOp as u64;
        assert_eq!(
            of_hypercall(domctl, DomctlOp::ListDomains as u64, 0, 1),
            Reach::Named
        );
        assert_eq!(
            of_hypercall(domctl, DomctlOp::Pause as u64, 2, 1),
            Reach::OnePeer(PeerOf::Domain(2))
        );
        // Only a teardown needs every domain at once.
        assert_eq!(
            of_hypercall(domctl, DomctlOp::Destroy as u64, 2, 1),
            Reach::Any
        );
        let mut vcpu = MockVcpu::default();
        assert_eq!(of_exit(&VmExit::InvalidOpcode, &mut vcpu, 1), Reach::Any);
        assert_eq!(of_exit(&VmExit::Hlt, &mut vcpu, 1), Reach::Own);
    }
}

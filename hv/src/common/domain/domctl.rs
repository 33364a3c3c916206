//! Domain control (`domctl_op`, docs/abi.md 17): what a privileged domain does to the others:
//! list them, read their console output, pause, unpause and destroy them, and read the
//! hypervisor's memory figures.
//!
//! Checks run in the documented order: the operation (`-ENOSYS`), the caller's privilege
//! (`-EPERM`, for every operation), then each operation's own. Other domains are reached
//! through the [`DomainTable`] of the running domain's peers.

use crate::common::domain::{
    DOMAIN_COUNT, Domain, DomainState, DomainTable, Ending, domain_exists,
};
use crate::common::memory::phys;
use crate::common::vcpu::state::request;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use lamina_abi::Errno;
use lamina_abi::domctl::{
    CONSOLE_HISTORY_BYTES, DOMAIN_FLAG_PRIVILEGED, DomainInfo, DomctlOp, PhysInfo, domain_state,
    ending,
};

/// Handles `domctl_op` with `args` (RDI = operation, then RSI, RDX, R10, R8) for `domain`.
/// `Ok(None)`: not finished (a vCPU of the destroyed or paused domain is still on its way off
/// another CPU); the call is made again once the caller's vCPU was rescheduled.
pub fn domctl_op(
    domain: &mut Domain,
    vcpu: usize,
    args: [u64; 5],
    peers: &mut dyn DomainTable,
) -> Result<Option<u64>, Errno> {
    let waits = [DomctlOp::Pause as u64, DomctlOp::Destroy as u64].contains(&args[0]);
    // The same call made again after it returned "not finished" (the marker is this vCPU's).
    let again = waits
        && domain
            .vcpus
            .get_mut(vcpu)
            .and_then(|state| state.domctl_waits_for.take())
            == Some(args[1]);
    let result = if args[0] == DomctlOp::Destroy as u64 && domain.privileged {
        destroy(domain, args[1], again, peers)
    } else {
        domctl_op_now(domain, args, again, peers)
    };
    if result == Ok(None)
        && let Some(state) = domain.vcpus.get_mut(vcpu)
    {
        state.domctl_waits_for = Some(args[1]);
    }
    result
}

fn domctl_op_now(
    domain: &mut Domain,
    [op, arg1, arg2, arg3, arg4]: [u64; 5],
    again: bool,
    peers: &mut dyn DomainTable,
) -> Result<Option<u64>, Errno> {
    let op = DomctlOp::try_from(op)?;
    if !domain.privileged {
        return Err(Errno::EPERM);
    }
    match op {
        DomctlOp::ListDomains => list_domains(domain, arg1, arg2, peers).map(Some),
        DomctlOp::ReadConsole => read_console(domain, arg1, arg2, arg3, arg4, peers).map(Some),
        DomctlOp::Pause | DomctlOp::Unpause => control(domain, op, arg1, again, peers),
        DomctlOp::PhysInfo => phys_info(domain, arg1, peers).map(|()| Some(0)),
        _ => Err(Errno::ENOSYS),
    }
}

/// The domain id `id` names: one of the domains built at boot (`DOMID_SELF` is not one).
fn domain_id(id: u64) -> Result<u32, Errno> {
    if domain_exists(id) {
        Ok(id as u32)
    } else {
        Err(Errno::ENOENT)
    }
}

/// What list_domains reports about `domain`: its CPU time up to `now` (system time), or for
/// the caller's own domain (`now` None) up to the start of the slice it runs in.
pub fn domain_info(domain: &Domain, now: Option<u64>) -> DomainInfo {
    let cpu_ns = now.map_or_else(|| domain.cpu_ns(), |now| domain.cpu_ns_at(now));
    let (state, end) = match &domain.state {
        DomainState::Ended(how) => match how {
            Ending::Poweroff => (domain_state::SHUTDOWN, ending::POWEROFF),
            Ending::Reboot => (domain_state::SHUTDOWN, ending::REBOOT),
            Ending::Destroyed => (domain_state::SHUTDOWN, ending::DESTROYED),
            Ending::Crash => (domain_state::CRASHED, ending::CRASH),
            // Stopped by the hypervisor, for a fault or because no one could unpause it.
            Ending::Fault(_) | Ending::Paused => (domain_state::CRASHED, ending::FAULT),
        },
        DomainState::Runnable if domain.paused => (domain_state::PAUSED, ending::NONE),
        DomainState::Runnable if !domain.vcpus.iter().any(|v| v.is_runnable()) => {
            (domain_state::BLOCKED, ending::NONE)
        }
        DomainState::Runnable => (domain_state::RUNNING, ending::NONE),
    };
    let mut name = [0u8; 32];
    let bytes = domain.name.as_bytes();
    // At most 31 bytes, so the name stays NUL-terminated.
    let len = bytes.len().min(name.len() - 1);
    name[..len].copy_from_slice(&bytes[..len]);
    DomainInfo {
        domain_id: domain.id,
        state,
        ending: end,
        flags: if domain.privileged {
            DOMAIN_FLAG_PRIVILEGED
        } else {
            0
        },
        weight: domain.weight,
        reserved: 0,
        memory_bytes: domain.memory_bytes(),
        cpu_ns,
        console_bytes: domain.console.history.end(),
        name,
    }
}

/// Every domain's [`DomainInfo`], in id order. With the table shared each domain is reached
/// under its lock, one at a time; when one is busy ([`DomainTable::busy`]) the list stops
/// there and the caller writes nothing: the scheduler makes the call again.
fn all_infos(caller: &Domain, peers: &mut dyn DomainTable) -> Vec<DomainInfo> {
    let mut infos = Vec::new();
    for id in 1..=DOMAIN_COUNT.load(Ordering::Relaxed) {
        if id == caller.id {
            infos.push(domain_info(caller, None));
        } else if let Some(peer) = peers.get_mut(id) {
            // A vCPU of it on another CPU: the slice it runs in counts up to now.
            infos.push(domain_info(peer, Some(caller.now())));
        } else if peers.busy() {
            break;
        }
    }
    infos
}

fn list_domains(
    domain: &mut Domain,
    gpa: u64,
    capacity: u64,
    peers: &mut dyn DomainTable,
) -> Result<u64, Errno> {
    let infos = all_infos(domain, peers);
    if peers.busy() {
        return Err(Errno::EAGAIN); // not seen: made again (`hypercall::finish`)
    }
    let written = infos.len().min(capacity.try_into().unwrap_or(usize::MAX));
    let entry = size_of::<DomainInfo>();
    // An empty buffer is never out of bounds, wherever it points (docs/abi.md 2.5).
    if written > 0 {
        domain.memory.check(gpa, (written * entry) as u64)?;
    }
    for (i, info) in infos[..written].iter().enumerate() {
        // SAFETY: DomainInfo is repr(C) plain data without padding (size asserted in abi).
        let bytes =
            unsafe { core::slice::from_raw_parts((info as *const DomainInfo).cast::<u8>(), entry) };
        domain.memory.write(gpa + (i * entry) as u64, bytes)?;
    }
    Ok(infos.len() as u64)
}

fn read_console(
    domain: &mut Domain,
    target: u64,
    offset: u64,
    gpa: u64,
    len: u64,
    peers: &mut dyn DomainTable,
) -> Result<u64, Errno> {
    let id = domain_id(target)?;
    if len > CONSOLE_HISTORY_BYTES {
        return Err(Errno::EINVAL);
    }
    if len > 0 {
        domain.memory.check(gpa, len)?;
    }
    let history = if id == domain.id {
        &domain.console.history
    } else {
        &peers.get_mut(id).ok_or(Errno::ENOENT)?.console.history
    };
    if offset > history.end() {
        return Err(Errno::EINVAL);
    }
    if offset < history.start() {
        return Err(Errno::ENOENT);
    }
    let mut buffer = [0u8; CONSOLE_HISTORY_BYTES as usize];
    let copied = history.copy_from(offset, &mut buffer[..len as usize]);
    if copied > 0 {
        domain.memory.write(gpa, &buffer[..copied])?;
    }
    Ok(copied as u64)
}

/// Destroy of domain `target`: ended at once, torn down before the call returns. A vCPU of it
/// running on another CPU is kicked and, until it is back, the call is not finished: the
/// caller's vCPU makes it again after the others ran (the table lock cannot be held while
/// waiting). A domain already destroyed but not yet torn down (by this call earlier) is
/// waited for the same way. `again`: this is that call made again, and the scheduler may have
/// torn the domain down meanwhile (once its last vCPU was off its CPU): that is the call's
/// success, not a destroy of a domain that had ended, once the scheduler's scrubbing gave all
/// its RAM back.
///
/// The one domain control made with the table exclusive (`sched::reach`): the teardown
/// reaches every domain (the grants the victim gave and the mappings of them in each
/// grantee, the remote ends of its channels) and gives its RAM back, so no CPU may hold any
/// domain, or the table shared, meanwhile. The other operations take the domains they read
/// or change under their locks, one at a time.
fn destroy(
    domain: &mut Domain,
    target: u64,
    again: bool,
    peers: &mut dyn DomainTable,
) -> Result<Option<u64>, Errno> {
    let id = domain_id(target)?;
    if id == domain.id {
        return Err(Errno::EINVAL);
    }
    let peer = peers.get_mut(id).ok_or(Errno::ENOENT)?;
    match &peer.state {
        DomainState::Runnable => peer.end(Ending::Destroyed),
        DomainState::Ended(Ending::Destroyed) if !peer.torn_down => {}
        // Its RAM comes back a slice per scheduling pass; the call returns once all of it is.
        DomainState::Ended(Ending::Destroyed) if again => {
            return Ok((peer.memory_bytes() == 0).then_some(0));
        }
        DomainState::Ended(_) => return Err(Errno::EINVAL),
    }
    // The scheduler would do it before anything else runs; the caller must see it done when
    // the call returns (memory_bytes 0, phys_info).
    if peers.tear_down(id, domain) {
        Ok(Some(0))
    } else {
        Ok(None)
    }
}

/// Pause or unpause domain `target`. `Ok(None)`: paused, but a vCPU of it is still on its
/// way off another CPU (out of the guest, not yet back in the table with its CPU time
/// counted): the call is made again, as a destroy is.
/// `again`: this is a pause made again, which paused the domain before it ended.
fn control(
    domain: &mut Domain,
    op: DomctlOp,
    target: u64,
    again: bool,
    peers: &mut dyn DomainTable,
) -> Result<Option<u64>, Errno> {
    let id = domain_id(target)?;
    if id == domain.id {
        // A domain ends itself with sched_op shutdown, and cannot unpause once paused.
        return Err(Errno::EINVAL);
    }
    let peer = peers.get_mut(id).ok_or(Errno::ENOENT)?;
    if !peer.is_runnable() {
        return if again && op == DomctlOp::Pause {
            Ok(Some(0))
        } else {
            Err(Errno::EINVAL)
        };
    }
    match op {
        // Not picked again; a vCPU of it running on another CPU is stopped.
        DomctlOp::Pause => {
            peer.paused = true;
            // Its vCPUs running on other CPUs stop before the call returns.
            for state in &peer.vcpus {
                state.requests.make_and_wait(request::RESCHEDULE);
            }
            // Out of the guest is not yet off the CPU: the slice that was running ends, and
            // is added to the domain's CPU time, only once that CPU gets the domain's lock
            // this call holds. Returning before would let a caller see the time of a domain it
            // paused still advance (docs/abi.md 17).
            if !peers.is_parked(id) {
                return Ok(None);
            }
        }
        DomctlOp::Unpause => {
            if core::mem::take(&mut peer.paused) {
                for state in peer.vcpus.iter_mut() {
                    // Events and timers that came meanwhile are delivered at its next entry.
                    state.requests.make(request::EVENT);
                    // It starts level with the others rather than catching up the paused time.
                    state.boosted = state.is_runnable();
                }
            }
        }
        _ => return Err(Errno::ENOSYS),
    }
    Ok(Some(0))
}

fn phys_info(domain: &mut Domain, gpa: u64, peers: &mut dyn DomainTable) -> Result<(), Errno> {
    domain.memory.check(gpa, size_of::<PhysInfo>() as u64)?;
    let (total_bytes, free_bytes) = phys::figures();
    let infos = all_infos(domain, peers);
    if peers.busy() {
        return Err(Errno::EAGAIN); // not seen: made again (`hypercall::finish`)
    }
    let domain_bytes = infos.iter().map(|info| info.memory_bytes).sum();
    let info = PhysInfo {
        total_bytes,
        free_bytes,
        domain_bytes,
        reserved: 0,
    };
    // SAFETY: PhysInfo is repr(C) plain data without padding (size asserted in abi).
    let bytes = unsafe {
        core::slice::from_raw_parts((&raw const info).cast::<u8>(), size_of::<PhysInfo>())
    };
    domain.memory.write(gpa, bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::domain::ConsoleSource;
    use crate::common::memory::guest_memory::GuestMemory;
    use crate::common::memory::guest_memory::testing::{TestMemory, test_memory};
    use crate::common::time::TimeBase;
    use crate::common::vcpu::state::Wait;
    use lamina_abi::event_channel::DOMID_SELF;

    const MIB: u64 = 1 << 20;
    /// Where the tests put their buffers: inside the 4 MiB of RAM, above the boot area.
    const BUFFER: u64 = 0x20000;

    /// Domain `id`, 4 MiB of test memory.
    fn domain(id: u32) -> (TestMemory, Domain) {
        DOMAIN_COUNT.fetch_max(3, Ordering::Relaxed);
        let t = test_memory(4 * MIB);
        // SAFETY: the domain's view aliases the test memory, which outlives it in the tuple.
        let mem = unsafe { GuestMemory::new(t.mem.host_base() as *mut u8, t.mem.size()) };
        let name = alloc::format!("dom{id}");
        let d = Domain::new(id, name, mem, TimeBase::new(1_000_000_000, 0, 0, 0));
        (t, d)
    }

    /// The other domains, for the caller.
    struct Others<'a>(&'a mut [Domain]);

    impl DomainTable for Others<'_> {
        fn get_mut(&mut self, id: u32) -> Option<&mut Domain> {
            self.0.iter_mut().find(|d| d.id == id)
        }

        /// No vCPUs, no RAM: tearing down only marks the domain.
        fn tear_down(&mut self, id: u32, _caller: &mut Domain) -> bool {
            let Some(domain) = self.get_mut(id) else {
                return false;
            };
            domain.torn_down = true;
            true
        }
    }

    fn call(caller: &mut Domain, others: &mut [Domain], args: [u64; 5]) -> Result<u64, Errno> {
        domctl_op(caller, 0, args, &mut Others(others))
            .map(|done| done.expect("Others tears down at once"))
    }

    fn op(op: DomctlOp) -> u64 {
        op as u64
    }

    /// A privileged domain 1 and the unprivileged domains 2 and 3.
    fn three() -> ([TestMemory; 3], Domain, [Domain; 2]) {
        let (t1, mut one) = domain(1);
        one.privileged = true;
        let (t2, two) = domain(2);
        let (t3, three) = domain(3);
        ([t1, t2, t3], one, [two, three])
    }

    #[test]
    fn every_operation_needs_privilege_and_unknown_ones_are_enosys() {
        let (_t, mut one, mut others) = three();
        let (_, mut two) = domain(2);
        for number in 0..=5 {
            // Valid and invalid arguments alike: privilege is checked before them.
            for args in [[2, 0, BUFFER, 16], [u64::MAX; 4]] {
                let [a, b, c, d] = args;
                assert_eq!(
                    call(&mut two, &mut [], [number, a, b, c, d]),
                    Err(Errno::EPERM),
                    "op {number}"
                );
            }
        }
        for unknown in [6, 99, u64::MAX] {
            assert_eq!(
                call(&mut two, &mut [], [unknown, 0, 0, 0, 0]),
                Err(Errno::ENOSYS)
            );
            assert_eq!(
                call(&mut one, &mut others, [unknown, 0, 0, 0, 0]),
                Err(Errno::ENOSYS)
            );
        }
    }

    #[test]
    fn pause_unpause_destroy_check_the_domain_then_itself_then_its_state() {
        let (_t, mut one, mut others) = three();
        others[1].end(Ending::Poweroff);
        for control in [DomctlOp::Pause, DomctlOp::Unpause, DomctlOp::Destroy] {
            let c = op(control);
            for nobody in [0, 9999, DOMID_SELF, 1 << 32 | 2] {
                assert_eq!(
                    call(&mut one, &mut others, [c, nobody, 0, 0, 0]),
                    Err(Errno::ENOENT),
                    "{control:?} {nobody:#x}"
                );
            }
            assert_eq!(
                call(&mut one, &mut others, [c, 1, 0, 0, 0]),
                Err(Errno::EINVAL),
                "{control:?} itself"
            );
            assert_eq!(
                call(&mut one, &mut others, [c, 3, 0, 0, 0]),
                Err(Errno::EINVAL),
                "{control:?} an ended domain"
            );
        }
        assert_eq!(
            call(&mut one, &mut others, [op(DomctlOp::Pause), 2, 0, 0, 0]),
            Ok(0)
        );
        assert!(others[0].paused);
        assert_eq!(
            call(&mut one, &mut others, [op(DomctlOp::Pause), 2, 0, 0, 0]),
            Ok(0),
            "paused already"
        );
        for _ in 0..2 {
            assert_eq!(
                call(&mut one, &mut others, [op(DomctlOp::Unpause), 2, 0, 0, 0]),
                Ok(0),
                "also when not paused"
            );
            assert!(!others[0].paused);
        }
        assert_eq!(
            call(&mut one, &mut others, [op(DomctlOp::Destroy), 2, 0, 0, 0]),
            Ok(0)
        );
        assert_eq!(others[0].state, DomainState::Ended(Ending::Destroyed));
        assert_eq!(
            call(&mut one, &mut others, [op(DomctlOp::Destroy), 2, 0, 0, 0]),
            Err(Errno::EINVAL),
            "destroyed already"
        );
    }

    /// The other domains, one of whose vCPUs a CPU still has (`running`).
    struct Running<'a> {
        others: Others<'a>,
        running: Option<u32>,
    }

    impl DomainTable for Running<'_> {
        fn get_mut(&mut self, id: u32) -> Option<&mut Domain> {
            self.others.get_mut(id)
        }

        fn is_parked(&mut self, id: u32) -> bool {
            self.running != Some(id)
        }
    }

    #[test]
    fn pause_returns_only_once_the_paused_domains_vcpus_are_off_their_cpus() {
        let (_t, mut one, mut others) = three();
        let pause = [op(DomctlOp::Pause), 2, 0, 0, 0];
        let mut table = Running {
            others: Others(&mut others),
            running: Some(2),
        };
        assert_eq!(
            domctl_op(&mut one, 0, pause, &mut table),
            Ok(None),
            "made again: its CPU time is not counted yet"
        );
        assert!(table.others.0[0].paused, "paused at once all the same");
        assert_eq!(domctl_op(&mut one, 0, pause, &mut table), Ok(None));
        table.running = None;
        assert_eq!(domctl_op(&mut one, 0, pause, &mut table), Ok(Some(0)));
        table.running = Some(2);
        assert_eq!(
            domctl_op(&mut one, 0, [op(DomctlOp::Unpause), 2, 0, 0, 0], &mut table),
            Ok(Some(0)),
            "unpause never waits"
        );
        table.running = Some(3);
        assert_eq!(
            domctl_op(&mut one, 0, pause, &mut table),
            Ok(Some(0)),
            "another domain running does not matter"
        );
    }

    #[test]
    fn a_destroy_made_again_after_the_scheduler_tore_the_domain_down_returns_0() {
        let (_t, mut one, mut others) = three();
        let destroy = [op(DomctlOp::Destroy), 2, 0, 0, 0];
        let mut table = Running {
            others: Others(&mut others),
            running: Some(2),
        };
        // Its vCPU runs on another CPU: ended at once, torn down later.
        assert_eq!(domctl_op(&mut one, 0, destroy, &mut table), Ok(None));
        let two = &mut table.others.0[0];
        assert_eq!(two.state, DomainState::Ended(Ending::Destroyed));
        // The scheduler tears it down as soon as that vCPU is back, before the call is made
        // again; its RAM comes back a slice at a time.
        two.torn_down = true;
        two.ram_unreturned.store(4096, Ordering::Relaxed);
        let unreturned = alloc::sync::Arc::clone(&two.ram_unreturned);
        for _ in 0..2 {
            assert_eq!(
                domctl_op(&mut one, 0, destroy, &mut table),
                Ok(None),
                "made again while its RAM is still being scrubbed"
            );
        }
        unreturned.store(0, Ordering::Relaxed);
        assert_eq!(
            domctl_op(&mut one, 0, destroy, &mut table),
            Ok(Some(0)),
            "the same destroy, made again"
        );
        assert_eq!(
            domctl_op(&mut one, 0, destroy, &mut table),
            Err(Errno::EINVAL),
            "a new destroy of the ended domain"
        );
    }

    #[test]
    fn another_domains_cpu_time_counts_the_slice_it_runs_in_up_to_now() {
        let (_t, mut two) = domain(2);
        two.vcpus[0].cpu_ns = 1_000;
        assert_eq!(domain_info(&two, Some(5_000)).cpu_ns, 1_000);
        // A CPU has had its vCPU since 4000.
        two.vcpus[0].running_since = Some(4_000);
        assert_eq!(domain_info(&two, Some(5_000)).cpu_ns, 2_000);
        assert_eq!(domain_info(&two, Some(6_500)).cpu_ns, 3_500);
        assert_eq!(
            domain_info(&two, None).cpu_ns,
            1_000,
            "the caller's own: up to the start of its slice"
        );
    }

    #[test]
    fn a_pause_made_again_after_the_domain_ended_returns_0() {
        let (_t, mut one, mut others) = three();
        let pause = [op(DomctlOp::Pause), 2, 0, 0, 0];
        let mut table = Running {
            others: Others(&mut others),
            running: Some(2),
        };
        assert_eq!(domctl_op(&mut one, 0, pause, &mut table), Ok(None));
        // Its vCPU, leaving its CPU, finished a shutdown it was making.
        table.others.0[0].end(Ending::Poweroff);
        table.running = None;
        assert_eq!(domctl_op(&mut one, 0, pause, &mut table), Ok(Some(0)));
        assert_eq!(
            domctl_op(&mut one, 0, pause, &mut table),
            Err(Errno::EINVAL),
            "a new pause of the ended domain"
        );
    }

    fn read_infos(t: &TestMemory, count: usize) -> Vec<DomainInfo> {
        (0..count)
            .map(|i| {
                let mut info = DomainInfo::default();
                // SAFETY: DomainInfo is plain data; any bytes are a valid value.
                let bytes = unsafe {
                    core::slice::from_raw_parts_mut(
                        (&raw mut info).cast::<u8>(),
                        size_of::<DomainInfo>(),
                    )
                };
                t.mem.read(BUFFER + 80 * i as u64, bytes).unwrap();
                info
            })
            .collect()
    }

    #[test]
    fn list_domains_reports_every_domain_in_id_order() {
        let ([t1, ..], mut one, mut others) = three();
        one.weight = 512;
        one.vcpus[0].cpu_ns = 7;
        one.console.write(ConsoleSource::Paravirtual, 1, b"hi\n");
        others[0].paused = true;
        others[1].vcpus[0].wait = Wait::Block;
        let list = op(DomctlOp::ListDomains);
        assert_eq!(call(&mut one, &mut others, [list, BUFFER, 8, 0, 0]), Ok(3));
        let infos = read_infos(&t1, 3);
        assert_eq!(
            infos.iter().map(|i| i.domain_id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let me = &infos[0];
        assert_eq!(
            (me.state, me.ending, me.flags, me.weight, me.cpu_ns),
            (
                domain_state::RUNNING,
                ending::NONE,
                DOMAIN_FLAG_PRIVILEGED,
                512,
                7
            )
        );
        assert_eq!((me.memory_bytes, me.console_bytes), (4 * MIB, 3));
        assert_eq!(me.name(), "dom1");
        assert_eq!((infos[1].state, infos[1].flags), (domain_state::PAUSED, 0));
        assert_eq!(infos[2].state, domain_state::BLOCKED);

        // Fewer entries than domains: only those are written, the count is all of them.
        t1.mem.write(BUFFER + 80, &[0xee; 80]).unwrap();
        assert_eq!(call(&mut one, &mut others, [list, BUFFER, 1, 0, 0]), Ok(3));
        assert_eq!(t1.mem.read_u64(BUFFER + 80).unwrap(), u64::MAX / 255 * 0xee);
        assert_eq!(
            call(&mut one, &mut others, [list, u64::MAX, 0, 0, 0]),
            Ok(3),
            "nothing to write, nowhere"
        );
        // The written part must be inside RAM; then nothing is written.
        let near_end = 4 * MIB - 80;
        t1.mem.write(near_end, &[0xee; 80]).unwrap();
        assert_eq!(
            call(&mut one, &mut others, [list, near_end, 2, 0, 0]),
            Err(Errno::EFAULT)
        );
        assert_eq!(t1.mem.read_u64(near_end).unwrap(), u64::MAX / 255 * 0xee);
        assert_eq!(
            call(&mut one, &mut others, [list, near_end, 1, 0, 0]),
            Ok(3)
        );
        assert_eq!(
            call(&mut one, &mut others, [list, u64::MAX - 8, 1, 0, 0]),
            Err(Errno::EFAULT),
            "wraps around"
        );

        // Ended domains are listed with their ending.
        others[0].end(Ending::Destroyed);
        others[1].end(Ending::Fault("x".into()));
        call(&mut one, &mut others, [list, BUFFER, 3, 0, 0]).unwrap();
        let infos = read_infos(&t1, 3);
        assert_eq!(
            (infos[1].state, infos[1].ending),
            (domain_state::SHUTDOWN, ending::DESTROYED)
        );
        assert_eq!(
            (infos[2].state, infos[2].ending),
            (domain_state::CRASHED, ending::FAULT)
        );
    }

    #[test]
    fn console_history_keeps_the_last_4096_bytes_at_their_stream_offsets() {
        let (_t, mut d) = domain(2);
        let history = |d: &Domain, offset: u64, len: usize| {
            let mut out = vec![0u8; len];
            let n = d.console.history.copy_from(offset, &mut out);
            out.truncate(n);
            out
        };
        d.console
            .write(ConsoleSource::Paravirtual, 2, b"hello\r\nwor");
        assert_eq!(d.console.history.end(), 6, "a line counts once printed");
        d.console
            .write(ConsoleSource::Paravirtual, 2, b"ld\n\n\xff\n");
        assert_eq!(history(&d, 0, 100), b"hello\nworld\n\n<invalid UTF-8>\n");
        for i in 0..50 {
            let line = alloc::format!("{i:02}{}\n", "x".repeat(97));
            d.console
                .write(ConsoleSource::Paravirtual, 2, line.as_bytes());
        }
        let end = 29 + 50 * 100;
        assert_eq!(d.console.history.end(), end);
        assert_eq!(d.console.history.start(), end - 4096);
        assert_eq!(history(&d, end - 100, 4), b"49xx");
        assert_eq!(history(&d, end - 4096, 4096).len(), 4096);
        assert!(history(&d, end - 4097, 1).is_empty(), "no longer kept");
        assert!(history(&d, end, 1).is_empty(), "the end of the stream");
    }

    #[test]
    fn read_console_checks_then_copies_from_the_stream_offset() {
        let ([t1, ..], mut one, mut others) = three();
        let r = |one: &mut Domain, others: &mut [Domain], [a, b, c, d]: [u64; 4]| {
            call(one, others, [op(DomctlOp::ReadConsole), a, b, c, d])
        };
        others[0]
            .console
            .write(ConsoleSource::Paravirtual, 2, b"hello\nworld\n");
        let (o, d) = (&mut one, &mut others);
        // The order: the domain, the length, the buffer, the offset.
        assert_eq!(r(o, d, [9999, 99, u64::MAX, 5000]), Err(Errno::ENOENT));
        assert_eq!(r(o, d, [DOMID_SELF, 0, BUFFER, 16]), Err(Errno::ENOENT));
        assert_eq!(r(o, d, [2, 99, u64::MAX, 4097]), Err(Errno::EINVAL));
        assert_eq!(r(o, d, [2, 99, 4 * MIB - 8, 16]), Err(Errno::EFAULT));
        assert_eq!(
            r(o, d, [2, 13, BUFFER, 16]),
            Err(Errno::EINVAL),
            "past the end"
        );
        assert_eq!(r(o, d, [2, 6, BUFFER, 4096]), Ok(6));
        let mut copied = [0u8; 6];
        t1.mem.read(BUFFER, &mut copied).unwrap();
        assert_eq!(&copied, b"world\n");
        assert_eq!(r(o, d, [2, 0, BUFFER, 3]), Ok(3));
        assert_eq!(r(o, d, [2, 12, BUFFER, 16]), Ok(0), "at the end");
        assert_eq!(r(o, d, [2, 12, u64::MAX, 0]), Ok(0), "an empty buffer");
        assert_eq!(r(o, d, [3, 0, BUFFER, 16]), Ok(0), "nothing printed yet");
        for _ in 0..50 {
            d[0].console
                .write(ConsoleSource::Paravirtual, 2, &[b'x'; 99]);
            d[0].console.write(ConsoleSource::Paravirtual, 2, b"\n");
        }
        let end = 12 + 5000;
        assert_eq!(
            r(o, d, [2, end - 4097, BUFFER, 16]),
            Err(Errno::ENOENT),
            "no longer kept"
        );
        assert_eq!(r(o, d, [2, end - 4096, BUFFER, 4096]), Ok(4096));
        // Its own console too, and a domain's after it ended.
        o.console.write(ConsoleSource::Paravirtual, 1, b"me\n");
        assert_eq!(r(o, d, [1, 0, BUFFER, 16]), Ok(3));
        d[0].end(Ending::Destroyed);
        assert_eq!(r(o, d, [2, end - 1, BUFFER, 16]), Ok(1));
    }

    #[test]
    fn phys_info_reports_the_allocator_and_the_ram_of_domains() {
        let ([t1, ..], mut one, mut others) = three();
        phys::testing::set(100 * MIB, 40 * MIB);
        let info = op(DomctlOp::PhysInfo);
        t1.mem.write(BUFFER + 24, &[0xee; 8]).unwrap();
        assert_eq!(call(&mut one, &mut others, [info, BUFFER, 0, 0, 0]), Ok(0));
        let words: Vec<u64> = (0..4)
            .map(|i| t1.mem.read_u64(BUFFER + 8 * i).unwrap())
            .collect();
        assert_eq!(words, [100 * MIB, 40 * MIB, 12 * MIB, 0]);
        assert_eq!(
            call(&mut one, &mut others, [info, 4 * MIB - 31, 0, 0, 0]),
            Err(Errno::EFAULT)
        );
        let mut unprivileged = core::mem::replace(&mut others[0], domain(2).1);
        assert_eq!(
            call(&mut unprivileged, &mut [], [info, BUFFER, 0, 0, 0]),
            Err(Errno::EPERM)
        );
    }
}

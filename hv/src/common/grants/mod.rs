//! Grant tables (`grant_table_op`, docs/abi.md 16, ABI 1.3): a domain shares pages of its RAM
//! with one other domain, which maps them into its grant window or copies through them.
//!
//! Each domain's [`GrantTable`] holds the grants it made (up to 256: grantee, page, read-only,
//! how many window slots map it) and what its own grant window maps (which granter's grant,
//! writable or not). The table lives in the hypervisor, never in guest memory, so a guest can
//! only reach it through the checks below. A mapping is a 4 KiB leaf of the grantee's nested
//! page table ([`NestedMap`]) that points into the granter's RAM; whenever one goes away or
//! is replaced, the domain that had it is marked (`Domain::mark_nested_stale`), and the run loop drops its
//! cached translations before it runs again.

use crate::common::domain::{Domain, DomainTable, domain_exists};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use lamina_abi::Errno;
use lamina_abi::grant_table::{
    GRANT_PAGE_BYTES, GRANT_TABLE_ENTRIES, GrantCopy, GrantTableOp, copy_direction, grant_flags,
    map_flags,
};
use lamina_abi::layout::{GRANT_WINDOW_BYTES, GRANT_WINDOW_GPA};

/// One grant in its granter's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The only domain that may map or copy it.
    pub grantee: u32,
    /// The granter's page (4 KiB aligned, inside its RAM: checked when granted).
    pub page_gpa: u64,
    /// The grantee may only read it.
    pub read_only: bool,
    /// Window slots of the grantee that map it now.
    pub map_count: u32,
}

/// What one page of a domain's grant window maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowSlot {
    /// Grant `grant_ref` of domain `granter`.
    Grant {
        /// The granter's id.
        granter: u32,
        /// The reference in the granter's table.
        grant_ref: u32,
        /// Mapped read-write.
        writable: bool,
    },
    /// A grant whose granter ended: a page of zeros that belongs to this domain until it
    /// unmaps the slot (`None` when no page could be allocated: then nothing is mapped).
    Revoked {
        /// The page of zeros (host-physical).
        zero_page: Option<u64>,
        /// Mapped read-write, as the grant was.
        writable: bool,
    },
}

/// A domain's grants and its grant window.
#[derive(Debug, Default)]
pub struct GrantTable {
    /// By reference; grows on demand up to [`GRANT_TABLE_ENTRIES`].
    grants: Vec<Option<Grant>>,
    /// The window pages in use, by page index in the window.
    slots: BTreeMap<u64, WindowSlot>,
    /// [`release_domain`] ran: nothing is left and nothing is done again.
    released: bool,
}

impl GrantTable {
    /// Grant `reference`, if it is in use.
    pub fn grant(&self, reference: u64) -> Option<&Grant> {
        let index = usize::try_from(reference).ok()?;
        self.grants.get(index)?.as_ref()
    }

    fn grant_mut(&mut self, reference: u64) -> Option<&mut Grant> {
        let index = usize::try_from(reference).ok()?;
        self.grants.get_mut(index)?.as_mut()
    }

    /// Records `grant` under the lowest free reference; `None` when all are in use.
    fn insert(&mut self, grant: Grant) -> Option<u32> {
        if let Some(free) = self.grants.iter().position(Option::is_none) {
            self.grants[free] = Some(grant);
            return Some(free as u32);
        }
        if self.grants.len() >= GRANT_TABLE_ENTRIES as usize {
            return None;
        }
        self.grants.push(Some(grant));
        Some(self.grants.len() as u32 - 1)
    }

    /// What the window page at guest-physical `gpa` maps, if anything.
    pub fn slot_at(&self, gpa: u64) -> Option<WindowSlot> {
        self.slots.get(&window_index(gpa)?).copied()
    }

    /// Test support: every grant in use, by reference.
    #[cfg(fuzzing)]
    pub(crate) fn grants_in_use(&self) -> impl Iterator<Item = (u32, Grant)> + '_ {
        self.grants
            .iter()
            .enumerate()
            .filter_map(|(r, g)| Some((r as u32, (*g)?)))
    }

    /// Test support: every window page that maps something, by guest-physical address.
    #[cfg(fuzzing)]
    pub(crate) fn window_slots(&self) -> impl Iterator<Item = (u64, WindowSlot)> + '_ {
        self.slots.iter().map(|(&i, &s)| (window_gpa(i), s))
    }

    /// How many window pages map something.
    pub fn mapped_slots(&self) -> usize {
        self.slots.len()
    }
}

/// The index in the grant window of the page at `gpa`: `None` unless `gpa` is a 4096-aligned
/// address inside the window.
fn window_index(gpa: u64) -> Option<u64> {
    let offset = gpa.checked_sub(GRANT_WINDOW_GPA)?;
    (offset < GRANT_WINDOW_BYTES && offset.is_multiple_of(GRANT_PAGE_BYTES))
        .then_some(offset / GRANT_PAGE_BYTES)
}

fn window_gpa(index: u64) -> u64 {
    GRANT_WINDOW_GPA + index * GRANT_PAGE_BYTES
}

/// `grant_table_op`: RDI = operation, then its arguments (docs/abi.md 16).
pub fn grant_table_op(
    domain: &mut Domain,
    [op, arg1, arg2, arg3, arg4]: [u64; 5],
    peers: &mut dyn DomainTable,
) -> Result<u64, Errno> {
    match GrantTableOp::try_from(op)? {
        GrantTableOp::GrantAccess => grant_access(domain, arg1, arg2, arg3, peers),
        GrantTableOp::EndAccess => end_access(domain, arg1),
        GrantTableOp::Map => map(domain, arg1, arg2, arg3, arg4, peers),
        GrantTableOp::Unmap => unmap(domain, arg1, peers),
        GrantTableOp::Copy => copy(domain, arg1, peers),
        _ => Err(Errno::ENOSYS),
    }
}

/// The domain `id` names, which must be another one that has not ended: `-ENOENT` otherwise.
fn running_peer<'p>(
    caller: &Domain,
    id: u64,
    peers: &'p mut dyn DomainTable,
) -> Result<&'p mut Domain, Errno> {
    if id == u64::from(caller.id) || !domain_exists(id) {
        return Err(Errno::ENOENT);
    }
    let id = u32::try_from(id).map_err(|_| Errno::ENOENT)?;
    match peers.get_mut(id) {
        Some(peer) if peer.is_runnable() => Ok(peer),
        _ => Err(Errno::ENOENT),
    }
}

fn grant_access(
    domain: &mut Domain,
    grantee: u64,
    page_gpa: u64,
    flags: u64,
    peers: &mut dyn DomainTable,
) -> Result<u64, Errno> {
    if flags & !grant_flags::ALL != 0 || !page_gpa.is_multiple_of(GRANT_PAGE_BYTES) {
        return Err(Errno::EINVAL);
    }
    domain.memory.check(page_gpa, GRANT_PAGE_BYTES)?;
    if grantee == u64::from(domain.id) {
        return Err(Errno::EINVAL);
    }
    let grantee = running_peer(domain, grantee, peers)?.id;
    let grant = Grant {
        grantee,
        page_gpa,
        read_only: flags & grant_flags::READONLY != 0,
        map_count: 0,
    };
    let reference = domain.grants.insert(grant).ok_or(Errno::ENOSPC)?;
    Ok(reference.into())
}

fn end_access(domain: &mut Domain, reference: u64) -> Result<u64, Errno> {
    let grant = domain.grants.grant(reference).ok_or(Errno::ENOENT)?;
    if grant.map_count > 0 {
        return Err(Errno::EBUSY);
    }
    // `grant` exists, so the reference is a valid index.
    if let Some(entry) = domain.grants.grants.get_mut(reference as usize) {
        *entry = None;
    }
    Ok(0)
}

fn map(
    domain: &mut Domain,
    granter: u64,
    reference: u64,
    slot_gpa: u64,
    flags: u64,
    peers: &mut dyn DomainTable,
) -> Result<u64, Errno> {
    if flags & !map_flags::ALL != 0 {
        return Err(Errno::EINVAL);
    }
    let slot = window_index(slot_gpa).ok_or(Errno::EINVAL)?;
    let granter = running_peer(domain, granter, peers)?;
    let grant = *granter.grants.grant(reference).ok_or(Errno::ENOENT)?;
    if grant.grantee != domain.id {
        return Err(Errno::EPERM);
    }
    let writable = flags & map_flags::READONLY == 0;
    if grant.read_only && writable {
        return Err(Errno::EPERM);
    }
    if domain.grants.slots.contains_key(&slot) {
        return Err(Errno::EEXIST);
    }
    // The page was inside the granter's RAM when granted, and RAM does not move.
    let offset = granter.memory.check(grant.page_gpa, GRANT_PAGE_BYTES)?;
    let host_page = granter.memory.host_base() + offset as u64;
    let nested = domain.nested.as_mut().ok_or(Errno::ENOMEM)?;
    nested
        .map_page(slot_gpa, host_page, writable)
        .map_err(|_| Errno::ENOMEM)?;
    if let Some(grant) = granter.grants.grant_mut(reference) {
        grant.map_count += 1;
    }
    domain.grants.slots.insert(
        slot,
        WindowSlot::Grant {
            granter: granter.id,
            grant_ref: reference as u32,
            writable,
        },
    );
    Ok(0)
}

fn unmap(domain: &mut Domain, slot_gpa: u64, peers: &mut dyn DomainTable) -> Result<u64, Errno> {
    let slot = window_index(slot_gpa).ok_or(Errno::EINVAL)?;
    let mapping = domain.grants.slots.remove(&slot).ok_or(Errno::ENOENT)?;
    drop_mapping(domain, slot, mapping, peers);
    Ok(0)
}

/// Takes what window page `slot` mapped out of `domain`'s nested page table (the slot is
/// already out of its table): the granter's grant counts one mapping less, a page of zeros is
/// freed.
fn drop_mapping(domain: &mut Domain, slot: u64, mapping: WindowSlot, peers: &mut dyn DomainTable) {
    if let Some(nested) = domain.nested.as_mut() {
        nested.unmap_page(window_gpa(slot));
    }
    domain.mark_nested_stale();
    match mapping {
        WindowSlot::Grant {
            granter, grant_ref, ..
        } => {
            let grant = peers
                .get_mut(granter)
                .and_then(|g| g.grants.grant_mut(grant_ref.into()));
            if let Some(grant) = grant {
                grant.map_count = grant.map_count.saturating_sub(1);
            }
        }
        // The vCPU does not run before its translations are flushed, so nothing reaches the
        // page after it is freed.
        WindowSlot::Revoked {
            zero_page: Some(page),
            ..
        } => zero_page::release(page),
        WindowSlot::Revoked {
            zero_page: None, ..
        } => {}
    }
}

/// Reads the `GrantCopy` at `gpa` once (`-EFAULT` when it is not inside RAM).
fn read_copy_request(domain: &Domain, gpa: u64) -> Result<GrantCopy, Errno> {
    let mut raw = [0u8; size_of::<GrantCopy>()];
    domain.memory.read(gpa, &mut raw)?;
    let u32_at = |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
    let mut local = [0u8; 8];
    local.copy_from_slice(&raw[16..24]);
    Ok(GrantCopy {
        domain: u16::from_le_bytes([raw[0], raw[1]]),
        direction: raw[2],
        reserved: raw[3],
        grant_ref: u32_at(4),
        offset: u32_at(8),
        len: u32_at(12),
        local_gpa: u64::from_le_bytes(local),
    })
}

fn copy(domain: &mut Domain, request_gpa: u64, peers: &mut dyn DomainTable) -> Result<u64, Errno> {
    let request = read_copy_request(domain, request_gpa)?;
    let to_grant = match request.direction {
        copy_direction::FROM_GRANT => false,
        copy_direction::TO_GRANT => true,
        _ => return Err(Errno::EINVAL),
    };
    let (offset, len) = (u64::from(request.offset), u64::from(request.len));
    if request.reserved != 0 || offset + len > GRANT_PAGE_BYTES {
        return Err(Errno::EINVAL);
    }
    domain.memory.check(request.local_gpa, len)?;
    let granter = running_peer(domain, request.domain.into(), peers)?;
    let grant = *granter
        .grants
        .grant(request.grant_ref.into())
        .ok_or(Errno::ENOENT)?;
    if grant.grantee != domain.id || (to_grant && grant.read_only) {
        return Err(Errno::EPERM);
    }
    // Through a bounce buffer, each side bounds-checked by its own RAM.
    let mut buffer = [0u8; 512];
    let mut done = 0;
    while done < len {
        let chunk = &mut buffer[..(len - done).min(512) as usize];
        let (local, remote) = (request.local_gpa + done, grant.page_gpa + offset + done);
        if to_grant {
            domain.memory.read(local, chunk)?;
            granter.memory.write(remote, chunk)?;
        } else {
            granter.memory.read(remote, chunk)?;
            domain.memory.write(local, chunk)?;
        }
        done += chunk.len() as u64;
    }
    Ok(len)
}

/// Why an access to the grant window faulted in the nested page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowFault {
    /// A write to a page mapped read-only.
    ReadOnlyWrite,
    /// A page with nothing mapped.
    Unmapped,
    /// A revoked grant for which no page of zeros could be allocated.
    RevokedWithoutPage,
    /// The page allows the access: the fault came from a translation since replaced.
    Stale,
}

/// Classifies a nested page fault at `gpa`; `None` outside the grant window.
pub fn window_fault(domain: &Domain, gpa: u64, write: bool) -> Option<WindowFault> {
    let window = GRANT_WINDOW_GPA..GRANT_WINDOW_GPA + GRANT_WINDOW_BYTES;
    if !window.contains(&gpa) {
        return None;
    }
    let page = gpa & !(GRANT_PAGE_BYTES - 1);
    Some(match domain.grants.slot_at(page) {
        None => WindowFault::Unmapped,
        Some(WindowSlot::Revoked {
            zero_page: None, ..
        }) => WindowFault::RevokedWithoutPage,
        Some(WindowSlot::Grant { writable, .. } | WindowSlot::Revoked { writable, .. }) => {
            if write && !writable {
                WindowFault::ReadOnlyWrite
            } else {
                WindowFault::Stale
            }
        }
    })
}

/// Lets go of everything `domain` has to do with grants, once it has ended (docs/abi.md 16,
/// "When a domain ends"): every window slot of another domain that maps one of its grants
/// switches to a page of zeros owned by that domain; every grant it mapped is unmapped, so its
/// granter can end it; its grants are gone; its nested page tables are freed, since it never
/// runs again. Afterwards it holds no physical memory but its RAM and its vCPU's control
/// structures, so its RAM may then be scrubbed and returned. A second call does nothing.
pub fn release_domain(domain: &mut Domain, peers: &mut dyn DomainTable) {
    if domain.grants.released {
        return;
    }
    let grants = core::mem::take(&mut domain.grants.grants);
    for (reference, grant) in grants.iter().enumerate() {
        let Some(grant) = grant.filter(|g| g.map_count > 0) else {
            continue;
        };
        if let Some(grantee) = peers.get_mut(grant.grantee) {
            revoke(grantee, domain.id, reference as u32);
        }
    }
    let slots = core::mem::take(&mut domain.grants.slots);
    for (slot, mapping) in slots {
        drop_mapping(domain, slot, mapping, peers);
    }
    domain.grants = GrantTable {
        released: true,
        ..GrantTable::default()
    };
    domain.nested = None;
    for state in &domain.vcpus {
        state
            .requests
            .take(crate::common::vcpu::state::request::NESTED_FLUSH);
    }
}

/// Switches every slot of `grantee` that maps grant `grant_ref` of `granter` to a page of
/// zeros of its own, mapped with the same access.
fn revoke(grantee: &mut Domain, granter: u32, grant_ref: u32) {
    let mut revoked_any = false;
    for (&slot, mapping) in grantee.grants.slots.iter_mut() {
        let WindowSlot::Grant {
            granter: from,
            grant_ref: reference,
            writable,
        } = *mapping
        else {
            continue;
        };
        if from != granter || reference != grant_ref {
            continue;
        }
        let gpa = window_gpa(slot);
        let mut zero_page = zero_page::allocate();
        let mapped = match (zero_page, grantee.nested.as_mut()) {
            (Some(page), Some(nested)) => nested.map_page(gpa, page, writable).is_ok(),
            _ => false,
        };
        if !mapped {
            // No page: nothing is mapped, and an access stops the grantee with a report.
            if let Some(nested) = grantee.nested.as_mut() {
                nested.unmap_page(gpa);
            }
            if let Some(page) = zero_page.take() {
                zero_page::release(page);
            }
        }
        *mapping = WindowSlot::Revoked {
            zero_page,
            writable,
        };
        revoked_any = true;
    }
    if revoked_any {
        grantee.mark_nested_stale();
    }
}

/// Test support: the pages of zeros not yet released, and a switch that makes allocation fail.
#[cfg(fuzzing)]
pub(crate) use zero_page::testing as zero_page_testing;

/// Pages of zeros for revoked slots: from the hypervisor's physical memory, or in host tests
/// from the heap (counted, so tests can see that every page comes back).
mod zero_page {
    #[cfg(not(target_os = "none"))]
    use core::alloc::Layout;

    const PAGE: u64 = lamina_abi::grant_table::GRANT_PAGE_BYTES;

    /// A fresh page of zeros, or `None` when memory is exhausted.
    #[cfg(target_os = "none")]
    pub(super) fn allocate() -> Option<u64> {
        crate::platform::memory::allocate_zeroed(PAGE, PAGE)
    }

    /// Scrubs and returns a page from [`allocate`].
    #[cfg(target_os = "none")]
    pub(super) fn release(page: u64) {
        crate::platform::memory::release(page, PAGE)
    }

    #[cfg(not(target_os = "none"))]
    fn layout() -> Layout {
        Layout::from_size_align(PAGE as usize, PAGE as usize).unwrap_or(Layout::new::<u8>())
    }

    #[cfg(not(target_os = "none"))]
    pub(super) fn allocate() -> Option<u64> {
        #[cfg(any(test, fuzzing))]
        if testing::FAIL.with(|f| f.get()) {
            return None;
        }
        // SAFETY: the layout has a non-zero size.
        let page = unsafe { alloc::alloc::alloc_zeroed(layout()) };
        if page.is_null() {
            return None;
        }
        #[cfg(any(test, fuzzing))]
        testing::LIVE.with(|live| live.set(live.get() + 1));
        Some(page as u64)
    }

    #[cfg(not(target_os = "none"))]
    pub(super) fn release(page: u64) {
        #[cfg(any(test, fuzzing))]
        testing::LIVE.with(|live| live.set(live.get() - 1));
        // SAFETY: `page` came from `allocate`, with the same layout, and is released once.
        unsafe { alloc::alloc::dealloc(page as *mut u8, layout()) };
    }

    #[cfg(any(test, fuzzing))]
    pub(crate) mod testing {
        std::thread_local! {
            /// Pages allocated and not yet released, on this thread.
            pub(crate) static LIVE: core::cell::Cell<i64> = const { core::cell::Cell::new(0) };
            /// Make every allocation fail.
            pub(crate) static FAIL: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::domain::{DOMAIN_COUNT, Ending};
    use crate::common::memory::guest_memory::GuestMemory;
    use crate::common::memory::guest_memory::testing::{TestMemory, test_memory};
    use crate::common::memory::nested_map::testing::{Pages, fake_nested_map};
    use crate::common::time::TimeBase;
    use core::sync::atomic::Ordering;
    use lamina_abi::grant_table::GrantTableOp::{Copy, EndAccess, GrantAccess, Map, Unmap};

    const MEM: u64 = 4 << 20;
    const WINDOW: u64 = GRANT_WINDOW_GPA;
    const PAGE: u64 = GRANT_PAGE_BYTES;
    const RO: u64 = 1;
    const RW: u64 = 0;
    /// An id no test machine has.
    const NO_DOMAIN: u64 = 9999;

    /// Domains 1..=n, each with 4 MiB of RAM and a fake nested page table.
    struct Machine {
        _ram: Vec<TestMemory>,
        domains: Vec<Domain>,
        pages: Vec<Pages>,
    }

    /// The domains other than the caller.
    struct Others<'a> {
        before: &'a mut [Domain],
        after: &'a mut [Domain],
    }

    impl DomainTable for Others<'_> {
        fn get_mut(&mut self, id: u32) -> Option<&mut Domain> {
            self.before
                .iter_mut()
                .chain(self.after.iter_mut())
                .find(|d| d.id == id)
        }
    }

    fn machine(n: u32) -> Machine {
        DOMAIN_COUNT.fetch_max(n, Ordering::Relaxed);
        let mut m = Machine {
            _ram: Vec::new(),
            domains: Vec::new(),
            pages: Vec::new(),
        };
        for id in 1..=n {
            let t = test_memory(MEM);
            // SAFETY: the domain's view aliases the test memory, which the machine keeps.
            let mem = unsafe { GuestMemory::new(t.mem.host_base() as *mut u8, t.mem.size()) };
            let mut d = Domain::new(id, "t".into(), mem, TimeBase::new(1_000_000_000, 0, 0, 0));
            let (nested, pages) = fake_nested_map();
            d.nested = Some(nested);
            m._ram.push(t);
            m.domains.push(d);
            m.pages.push(pages);
        }
        m
    }

    impl Machine {
        fn with_caller<R>(
            &mut self,
            id: u32,
            f: impl FnOnce(&mut Domain, &mut dyn DomainTable) -> R,
        ) -> R {
            let (before, rest) = self.domains.split_at_mut(id as usize - 1);
            let (me, after) = rest.split_first_mut().expect("no such test domain");
            f(me, &mut Others { before, after })
        }

        fn op(&mut self, caller: u32, op: GrantTableOp, args: [u64; 4]) -> Result<u64, Errno> {
            let [a, b, c, d] = args;
            self.with_caller(caller, |me, peers| {
                grant_table_op(me, [op as u64, a, b, c, d], peers)
            })
        }

        /// Ends domain `id` and releases it.
        fn end(&mut self, id: u32) {
            self.with_caller(id, |me, peers| {
                me.end(Ending::Poweroff);
                release_domain(me, peers);
            });
        }

        fn d(&mut self, id: u32) -> &mut Domain {
            &mut self.domains[id as usize - 1]
        }

        /// What domain `id`'s nested table maps at `gpa`.
        fn nested(&self, id: u32, gpa: u64) -> Option<(u64, bool)> {
            self.pages[id as usize - 1].borrow().get(&gpa).copied()
        }

        /// Host address of guest-physical `gpa` of domain `id`.
        fn host(&self, id: u32, gpa: u64) -> u64 {
            self.domains[id as usize - 1].memory.host_base() + gpa
        }

        fn map_count(&self, id: u32, reference: u64) -> u32 {
            self.domains[id as usize - 1]
                .grants
                .grant(reference)
                .map_or(0, |g| g.map_count)
        }
    }

    fn live_zero_pages() -> i64 {
        zero_page::testing::LIVE.with(|l| l.get())
    }

    #[test]
    fn grant_access_checks_in_the_documented_order() {
        let mut m = machine(3);
        let e = Err::<u64, _>;
        // Flags first, then alignment (both -EINVAL), with every later check failing too.
        assert_eq!(m.op(1, GrantAccess, [1, 0x1001, 2, 0]), e(Errno::EINVAL));
        assert_eq!(
            m.op(1, GrantAccess, [NO_DOMAIN, MEM, 1 << 63, 0]),
            e(Errno::EINVAL)
        );
        assert_eq!(
            m.op(1, GrantAccess, [NO_DOMAIN, 0x1800, RW, 0]),
            e(Errno::EINVAL)
        );
        // The page must lie inside RAM: -EFAULT, before the grantee is looked at.
        for page in [MEM, MEM + PAGE, !(PAGE - 1), WINDOW] {
            assert_eq!(
                m.op(1, GrantAccess, [1, page, RW, 0]),
                e(Errno::EFAULT),
                "{page:#x}"
            );
        }
        // Oneself: -EINVAL, before "no such domain".
        assert_eq!(m.op(1, GrantAccess, [1, 0x1000, RW, 0]), e(Errno::EINVAL));
        for grantee in [0, NO_DOMAIN, (1 << 32) | 2, u64::MAX] {
            assert_eq!(
                m.op(1, GrantAccess, [grantee, 0x1000, RW, 0]),
                e(Errno::ENOENT),
                "{grantee:#x}"
            );
        }
        m.end(3);
        assert_eq!(
            m.op(1, GrantAccess, [3, 0x1000, RW, 0]),
            e(Errno::ENOENT),
            "ended"
        );
        // The lowest free reference, from 0; a page may be granted twice.
        assert_eq!(m.op(1, GrantAccess, [2, 0x1000, RW, 0]), Ok(0));
        assert_eq!(m.op(1, GrantAccess, [2, 0x1000, RO, 0]), Ok(1));
        assert_eq!(m.op(1, GrantAccess, [2, MEM - PAGE, RW, 0]), Ok(2));
        let g = *m.d(1).grants.grant(1).unwrap();
        assert_eq!(
            g,
            Grant {
                grantee: 2,
                page_gpa: 0x1000,
                read_only: true,
                map_count: 0
            }
        );
        assert!(!m.d(1).grants.grant(0).unwrap().read_only);
    }

    #[test]
    fn the_table_holds_256_grants_and_reuses_the_lowest_free() {
        let mut m = machine(2);
        for reference in 0..u64::from(GRANT_TABLE_ENTRIES) {
            assert_eq!(m.op(1, GrantAccess, [2, 0x10000, RW, 0]), Ok(reference));
        }
        assert_eq!(
            m.op(1, GrantAccess, [2, 0x10000, RW, 0]),
            Err(Errno::ENOSPC)
        );
        // ENOSPC comes last: a bad grantee is still -ENOENT.
        assert_eq!(
            m.op(1, GrantAccess, [NO_DOMAIN, 0x10000, RW, 0]),
            Err(Errno::ENOENT)
        );
        assert_eq!(m.op(1, EndAccess, [200, 0, 0, 0]), Ok(0));
        assert_eq!(m.op(1, EndAccess, [7, 0, 0, 0]), Ok(0));
        assert_eq!(m.op(1, GrantAccess, [2, 0x10000, RW, 0]), Ok(7));
        assert_eq!(m.op(1, GrantAccess, [2, 0x10000, RW, 0]), Ok(200));
        assert_eq!(
            m.op(1, GrantAccess, [2, 0x10000, RW, 0]),
            Err(Errno::ENOSPC)
        );
    }

    #[test]
    fn end_access_refuses_unknown_and_mapped_grants() {
        let mut m = machine(2);
        for reference in [0, 1, 255, 256, 1 << 32, u64::MAX] {
            assert_eq!(m.op(1, EndAccess, [reference, 0, 0, 0]), Err(Errno::ENOENT));
        }
        assert_eq!(m.op(1, GrantAccess, [2, 0x20000, RW, 0]), Ok(0));
        assert_eq!(m.op(2, Map, [1, 0, WINDOW, RW]), Ok(0));
        assert_eq!(m.op(2, Map, [1, 0, WINDOW + 5 * PAGE, RO]), Ok(0));
        assert_eq!(m.map_count(1, 0), 2);
        assert_eq!(m.op(1, EndAccess, [0, 0, 0, 0]), Err(Errno::EBUSY));
        assert_eq!(m.op(2, Unmap, [WINDOW, 0, 0, 0]), Ok(0));
        assert_eq!(m.map_count(1, 0), 1);
        assert_eq!(m.op(1, EndAccess, [0, 0, 0, 0]), Err(Errno::EBUSY));
        assert_eq!(m.op(2, Unmap, [WINDOW + 5 * PAGE, 0, 0, 0]), Ok(0));
        assert_eq!(m.op(1, EndAccess, [0, 0, 0, 0]), Ok(0));
        // Ended: free, and the grantee can no longer map or copy it.
        assert_eq!(m.op(1, EndAccess, [0, 0, 0, 0]), Err(Errno::ENOENT));
        assert_eq!(m.op(2, Map, [1, 0, WINDOW, RW]), Err(Errno::ENOENT));
    }

    #[test]
    fn map_checks_in_the_documented_order() {
        let mut m = machine(3);
        assert_eq!(m.op(1, GrantAccess, [2, 0x20000, RW, 0]), Ok(0));
        assert_eq!(m.op(1, GrantAccess, [2, 0x21000, RO, 0]), Ok(1));
        assert_eq!(m.op(1, GrantAccess, [3, 0x22000, RW, 0]), Ok(2));
        let e = Err::<u64, _>;
        // Flags, then the slot (both -EINVAL), before everything else.
        assert_eq!(m.op(2, Map, [NO_DOMAIN, 999, 0x1000, 2]), e(Errno::EINVAL));
        assert_eq!(
            m.op(2, Map, [NO_DOMAIN, 999, WINDOW, 1 << 63]),
            e(Errno::EINVAL)
        );
        for slot in [
            WINDOW - PAGE,
            WINDOW + 0x800,
            WINDOW + GRANT_WINDOW_BYTES,
            0,
            0x20000,
            !(PAGE - 1),
        ] {
            assert_eq!(
                m.op(2, Map, [NO_DOMAIN, 999, slot, RW]),
                e(Errno::EINVAL),
                "{slot:#x}"
            );
        }
        // The granter: not oneself, existing, running.
        for granter in [2, 0, NO_DOMAIN, (1 << 32) | 1] {
            assert_eq!(
                m.op(2, Map, [granter, 0, WINDOW, RW]),
                e(Errno::ENOENT),
                "{granter}"
            );
        }
        // The reference.
        for reference in [3, 255, 256, 1 << 32, u64::MAX] {
            assert_eq!(m.op(2, Map, [1, reference, WINDOW, RW]), e(Errno::ENOENT));
        }
        // Map the read-write grant, then check the rest against a used slot: another's grant
        // and a read-only grant asked read-write are -EPERM before -EEXIST.
        assert_eq!(m.op(2, Map, [1, 0, WINDOW, RW]), Ok(0));
        assert_eq!(m.nested(2, WINDOW), Some((m.host(1, 0x20000), true)));
        assert_eq!(
            m.op(2, Map, [1, 2, WINDOW, RW]),
            e(Errno::EPERM),
            "for domain 3"
        );
        assert_eq!(m.op(2, Map, [1, 2, WINDOW + PAGE, RO]), e(Errno::EPERM));
        assert_eq!(
            m.op(2, Map, [1, 1, WINDOW, RW]),
            e(Errno::EPERM),
            "read-only"
        );
        assert_eq!(m.op(2, Map, [1, 1, WINDOW, RO]), e(Errno::EEXIST));
        assert_eq!(m.op(2, Map, [1, 0, WINDOW, RO]), e(Errno::EEXIST));
        // A read-only grant maps read-only; a read-write grant may too.
        assert_eq!(m.op(2, Map, [1, 1, WINDOW + PAGE, RO]), Ok(0));
        assert_eq!(
            m.nested(2, WINDOW + PAGE),
            Some((m.host(1, 0x21000), false))
        );
        let last = WINDOW + GRANT_WINDOW_BYTES - PAGE;
        assert_eq!(m.op(2, Map, [1, 0, last, RO]), Ok(0));
        assert_eq!(m.nested(2, last), Some((m.host(1, 0x20000), false)));
        // Domain 3 maps its own; an ended granter is -ENOENT.
        assert_eq!(m.op(3, Map, [1, 2, WINDOW, RW]), Ok(0));
        assert_eq!(m.op(3, Unmap, [WINDOW, 0, 0, 0]), Ok(0));
        m.end(1);
        assert_eq!(m.op(3, Map, [1, 2, WINDOW, RW]), e(Errno::ENOENT));
        assert_eq!(m.d(2).grants.mapped_slots(), 3);
        assert!(matches!(
            m.d(2).grants.slot_at(last),
            Some(WindowSlot::Revoked {
                writable: false,
                ..
            })
        ));
    }

    #[test]
    fn unmap_checks_and_gives_the_mapping_back() {
        let mut m = machine(2);
        assert_eq!(m.op(1, GrantAccess, [2, 0x20000, RW, 0]), Ok(0));
        for slot in [WINDOW + 1, WINDOW - PAGE, WINDOW + GRANT_WINDOW_BYTES, 0] {
            assert_eq!(
                m.op(2, Unmap, [slot, 0, 0, 0]),
                Err(Errno::EINVAL),
                "{slot:#x}"
            );
        }
        assert_eq!(m.op(2, Unmap, [WINDOW, 0, 0, 0]), Err(Errno::ENOENT));
        assert_eq!(m.op(2, Map, [1, 0, WINDOW, RW]), Ok(0));
        assert!(
            !m.d(2).nested_flush_pending(),
            "a new mapping needs no flush"
        );
        assert_eq!(m.op(2, Unmap, [WINDOW, 0, 0, 0]), Ok(0));
        assert!(
            m.d(2).nested_flush_pending(),
            "a removed mapping must be flushed"
        );
        assert_eq!(m.nested(2, WINDOW), None);
        assert_eq!(m.map_count(1, 0), 0);
        assert_eq!(m.op(2, Unmap, [WINDOW, 0, 0, 0]), Err(Errno::ENOENT));
        // The slot can be used again, with another access.
        assert_eq!(m.op(2, Map, [1, 0, WINDOW, RO]), Ok(0));
        assert_eq!(m.nested(2, WINDOW), Some((m.host(1, 0x20000), false)));
    }

    /// Writes a GrantCopy at `gpa` of `domain`.
    fn put_request(domain: &Domain, gpa: u64, r: GrantCopy) {
        let mut raw = [0u8; 24];
        raw[0..2].copy_from_slice(&r.domain.to_le_bytes());
        raw[2] = r.direction;
        raw[3] = r.reserved;
        raw[4..8].copy_from_slice(&r.grant_ref.to_le_bytes());
        raw[8..12].copy_from_slice(&r.offset.to_le_bytes());
        raw[12..16].copy_from_slice(&r.len.to_le_bytes());
        raw[16..24].copy_from_slice(&r.local_gpa.to_le_bytes());
        domain.memory.write(gpa, &raw).unwrap();
    }

    #[test]
    fn copy_checks_in_the_documented_order_and_copies_both_ways() {
        let mut m = machine(3);
        assert_eq!(m.op(1, GrantAccess, [2, 0x20000, RW, 0]), Ok(0));
        assert_eq!(m.op(1, GrantAccess, [2, 0x21000, RO, 0]), Ok(1));
        assert_eq!(m.op(1, GrantAccess, [3, 0x22000, RW, 0]), Ok(2));
        m.d(1).memory.write(0x20010, b"granted bytes").unwrap();
        m.d(2).memory.write(0x9000, b"local bytes").unwrap();
        let good = GrantCopy {
            domain: 1,
            direction: copy_direction::FROM_GRANT,
            reserved: 0,
            grant_ref: 0,
            offset: 0x10,
            len: 13,
            local_gpa: 0x8000,
        };
        let run = |m: &mut Machine, request: GrantCopy| {
            put_request(&m.domains[1], 0x7000, request);
            m.op(2, Copy, [0x7000, 0, 0, 0])
        };
        let e = Err::<u64, _>;
        // The request itself must be inside RAM.
        for gpa in [MEM - 23, MEM, u64::MAX - 7] {
            assert_eq!(m.op(2, Copy, [gpa, 0, 0, 0]), e(Errno::EFAULT), "{gpa:#x}");
        }
        let bad = |f: fn(&mut GrantCopy)| {
            let mut r = good;
            f(&mut r);
            r
        };
        // -EINVAL for the fields, before the local range and the granter.
        for request in [
            bad(|r| (r.reserved, r.domain, r.local_gpa) = (1, 77, MEM)),
            bad(|r| (r.direction, r.domain) = (2, 77)),
            bad(|r| r.direction = 0xff),
            bad(|r| (r.offset, r.len, r.local_gpa) = (4096, 1, MEM)),
            bad(|r| (r.offset, r.len) = (0, 4097)),
            bad(|r| (r.offset, r.len) = (u32::MAX, 2)),
            bad(|r| (r.offset, r.len) = (1, u32::MAX)),
        ] {
            assert_eq!(run(&mut m, request), e(Errno::EINVAL), "{request:?}");
        }
        // The local range, before the granter.
        for request in [
            bad(|r| (r.local_gpa, r.domain) = (MEM - 12, 77)),
            bad(|r| r.local_gpa = u64::MAX - 5),
        ] {
            assert_eq!(run(&mut m, request), e(Errno::EFAULT), "{request:?}");
        }
        // The granter, then the reference, then the grantee and the access.
        for request in [
            bad(|r| (r.domain, r.grant_ref) = (2, 99)),
            bad(|r| r.domain = 0),
            bad(|r| r.domain = 9999),
            bad(|r| r.grant_ref = 3),
            bad(|r| r.grant_ref = u32::MAX),
        ] {
            assert_eq!(run(&mut m, request), e(Errno::ENOENT), "{request:?}");
        }
        for request in [
            bad(|r| r.grant_ref = 2),
            bad(|r| (r.grant_ref, r.direction) = (1, copy_direction::TO_GRANT)),
        ] {
            assert_eq!(run(&mut m, request), e(Errno::EPERM), "{request:?}");
        }
        // From the grant.
        assert_eq!(run(&mut m, good), Ok(13));
        let mut got = [0u8; 13];
        m.d(2).memory.read(0x8000, &mut got).unwrap();
        assert_eq!(&got, b"granted bytes");
        // From a read-only grant, and an empty copy anywhere in RAM.
        assert_eq!(run(&mut m, bad(|r| r.grant_ref = 1)), Ok(13));
        assert_eq!(run(&mut m, bad(|r| (r.len, r.local_gpa) = (0, MEM))), Ok(0));
        // To the grant, up to the last byte of the page.
        let to = bad(|r| {
            (r.direction, r.offset, r.len, r.local_gpa) =
                (copy_direction::TO_GRANT, 4085, 11, 0x9000)
        });
        assert_eq!(run(&mut m, to), Ok(11));
        let mut got = [0u8; 11];
        m.d(1).memory.read(0x20000 + 4085, &mut got).unwrap();
        assert_eq!(&got, b"local bytes");
        // A whole page, larger than the bounce buffer.
        m.d(2).memory.write(0x10000, &[0xab; 4096]).unwrap();
        let page = bad(|r| {
            (r.direction, r.offset, r.len, r.local_gpa) =
                (copy_direction::TO_GRANT, 0, 4096, 0x10000)
        });
        assert_eq!(run(&mut m, page), Ok(4096));
        let mut got = [0u8; 4096];
        m.d(1).memory.read(0x20000, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0xab));
        // After the grant ended, -ENOENT; a copy never holds a grant.
        assert_eq!(m.op(1, EndAccess, [0, 0, 0, 0]), Ok(0));
        assert_eq!(run(&mut m, good), e(Errno::ENOENT));
    }

    #[test]
    fn a_granter_that_ends_leaves_pages_of_zeros() {
        let live = live_zero_pages();
        let mut m = machine(2);
        m.d(1).memory.write(0x20000, &[0x5a; 16]).unwrap();
        assert_eq!(m.op(1, GrantAccess, [2, 0x20000, RW, 0]), Ok(0));
        assert_eq!(m.op(1, GrantAccess, [2, 0x21000, RO, 0]), Ok(1));
        assert_eq!(m.op(2, Map, [1, 0, WINDOW, RW]), Ok(0));
        assert_eq!(m.op(2, Map, [1, 0, WINDOW + PAGE, RW]), Ok(0));
        assert_eq!(m.op(2, Map, [1, 1, WINDOW + 2 * PAGE, RO]), Ok(0));
        m.d(2).vcpus[0]
            .requests
            .take(crate::common::vcpu::state::request::NESTED_FLUSH);
        m.end(1);
        assert!(m.d(1).nested.is_none(), "the granter's tables are freed");
        assert!(
            m.d(2).nested_flush_pending(),
            "the grantee's translations must go"
        );
        assert_eq!(live_zero_pages(), live + 3, "one page of zeros per slot");
        let mut zero_pages = Vec::new();
        for (slot, writable) in [
            (WINDOW, true),
            (WINDOW + PAGE, true),
            (WINDOW + 2 * PAGE, false),
        ] {
            let Some(WindowSlot::Revoked {
                zero_page: Some(page),
                writable: w,
            }) = m.d(2).grants.slot_at(slot)
            else {
                panic!("slot {slot:#x} not revoked");
            };
            assert_eq!(w, writable);
            assert_eq!(m.nested(2, slot), Some((page, writable)));
            // SAFETY: a live page of the test heap, 4096 bytes.
            let bytes = unsafe { core::slice::from_raw_parts(page as *const u8, 4096) };
            assert!(
                bytes.iter().all(|&b| b == 0),
                "zeros, not the granter's bytes"
            );
            zero_pages.push(page);
        }
        zero_pages.dedup();
        assert_eq!(zero_pages.len(), 3, "a page per slot");
        // The grant is gone: copies and maps are -ENOENT; unmapping frees the page.
        put_request(
            &m.domains[1],
            0x7000,
            GrantCopy {
                domain: 1,
                len: 1,
                local_gpa: 0x8000,
                ..Default::default()
            },
        );
        assert_eq!(m.op(2, Copy, [0x7000, 0, 0, 0]), Err(Errno::ENOENT));
        assert_eq!(
            m.op(2, Map, [1, 0, WINDOW + 3 * PAGE, RW]),
            Err(Errno::ENOENT)
        );
        assert_eq!(m.op(2, Map, [1, 0, WINDOW, RW]), Err(Errno::ENOENT));
        assert_eq!(m.op(2, Unmap, [WINDOW, 0, 0, 0]), Ok(0));
        assert_eq!(live_zero_pages(), live + 2);
        assert_eq!(m.nested(2, WINDOW), None);
        // Releasing the granter again changes nothing; releasing the grantee frees the rest.
        m.end(1);
        assert_eq!(live_zero_pages(), live + 2);
        m.end(2);
        assert_eq!(live_zero_pages(), live);
        assert!(m.d(2).nested.is_none());
        assert_eq!(m.d(2).grants.mapped_slots(), 0);
    }

    #[test]
    fn a_grantee_that_ends_gives_its_mappings_back() {
        let mut m = machine(3);
        assert_eq!(m.op(1, GrantAccess, [2, 0x20000, RW, 0]), Ok(0));
        assert_eq!(m.op(3, GrantAccess, [2, 0x20000, RO, 0]), Ok(0));
        assert_eq!(m.op(2, GrantAccess, [1, 0x30000, RW, 0]), Ok(0));
        assert_eq!(m.op(1, Map, [2, 0, WINDOW, RW]), Ok(0));
        assert_eq!(m.op(2, Map, [1, 0, WINDOW, RW]), Ok(0));
        assert_eq!(m.op(2, Map, [1, 0, WINDOW + PAGE, RO]), Ok(0));
        assert_eq!(m.op(2, Map, [3, 0, WINDOW + 2 * PAGE, RO]), Ok(0));
        assert_eq!(m.op(1, EndAccess, [0, 0, 0, 0]), Err(Errno::EBUSY));
        let live = live_zero_pages();
        m.end(2);
        assert_eq!((m.map_count(1, 0), m.map_count(3, 0)), (0, 0));
        assert_eq!(m.op(1, EndAccess, [0, 0, 0, 0]), Ok(0));
        assert_eq!(m.op(3, EndAccess, [0, 0, 0, 0]), Ok(0));
        assert!(m.d(2).nested.is_none());
        assert!(
            m.pages[1].borrow().is_empty(),
            "its window pages were unmapped"
        );
        // Domain 1 had mapped domain 2's grant: it now maps a page of zeros.
        assert!(matches!(
            m.d(1).grants.slot_at(WINDOW),
            Some(WindowSlot::Revoked {
                zero_page: Some(_),
                writable: true
            })
        ));
        assert_eq!(live_zero_pages(), live + 1);
        assert_eq!(
            m.op(1, GrantAccess, [2, 0x20000, RW, 0]),
            Err(Errno::ENOENT)
        );
        m.end(2);
        m.end(1);
        assert_eq!(live_zero_pages(), live);
    }

    #[test]
    fn a_revocation_without_memory_leaves_the_slot_unmapped() {
        let mut m = machine(2);
        assert_eq!(m.op(1, GrantAccess, [2, 0x20000, RW, 0]), Ok(0));
        assert_eq!(m.op(2, Map, [1, 0, WINDOW, RW]), Ok(0));
        zero_page::testing::FAIL.with(|f| f.set(true));
        m.end(1);
        zero_page::testing::FAIL.with(|f| f.set(false));
        assert_eq!(
            m.d(2).grants.slot_at(WINDOW),
            Some(WindowSlot::Revoked {
                zero_page: None,
                writable: true
            })
        );
        assert_eq!(m.nested(2, WINDOW), None);
        assert_eq!(
            window_fault(m.d(2), WINDOW + 8, false),
            Some(WindowFault::RevokedWithoutPage)
        );
        assert_eq!(m.op(2, Unmap, [WINDOW, 0, 0, 0]), Ok(0));
    }

    #[test]
    fn window_faults_are_told_apart() {
        let mut m = machine(2);
        assert_eq!(m.op(1, GrantAccess, [2, 0x20000, RO, 0]), Ok(0));
        assert_eq!(m.op(1, GrantAccess, [2, 0x21000, RW, 0]), Ok(1));
        assert_eq!(m.op(2, Map, [1, 0, WINDOW + PAGE, RO]), Ok(0));
        assert_eq!(m.op(2, Map, [1, 1, WINDOW + 2 * PAGE, RW]), Ok(0));
        let d = m.d(2);
        assert_eq!(window_fault(d, MEM, true), None, "outside the window");
        assert_eq!(window_fault(d, WINDOW - 1, true), None);
        assert_eq!(window_fault(d, WINDOW + GRANT_WINDOW_BYTES, true), None);
        assert_eq!(window_fault(d, WINDOW, false), Some(WindowFault::Unmapped));
        assert_eq!(
            window_fault(d, WINDOW + PAGE + 0x10, true),
            Some(WindowFault::ReadOnlyWrite)
        );
        assert_eq!(
            window_fault(d, WINDOW + PAGE, false),
            Some(WindowFault::Stale)
        );
        assert_eq!(
            window_fault(d, WINDOW + 2 * PAGE + 8, true),
            Some(WindowFault::Stale)
        );
    }

    #[test]
    fn grant_table_op_is_dispatched_alone_and_in_multicalls() {
        use crate::common::hypercall::handle;
        use crate::common::testing::MockVcpu;
        use crate::common::vcpu::reg;
        let mut m = machine(2);
        let mut vcpu = MockVcpu::default();
        let call = |m: &mut Machine, vcpu: &mut MockVcpu, nr: u64, args: [u64; 5]| {
            let regs = &mut vcpu.regs.gpr;
            regs[reg::RAX] = nr;
            for (r, a) in [reg::RDI, reg::RSI, reg::RDX, reg::R10, reg::R8]
                .iter()
                .zip(args)
            {
                regs[*r] = a;
            }
            m.with_caller(1, |me, peers| handle(me, 0, vcpu, peers));
            vcpu.regs.gpr[reg::RAX] as i64
        };
        let nr = lamina_abi::Hypercall::GrantTableOp as u64;
        for op in [5, 99, 1 << 32, u64::MAX] {
            assert_eq!(call(&mut m, &mut vcpu, nr, [op, 2, 0x20000, 0, 0]), -38);
        }
        assert_eq!(call(&mut m, &mut vcpu, nr, [0, 2, 0x20000, 0, 0]), 0);
        assert_eq!(call(&mut m, &mut vcpu, nr, [0, 2, 0x20000, 4, 0]), -22);
        // In a multicall: grant_access, then end_access of a free reference.
        let entries = 0x9000;
        for (i, args) in [[0u64, 2, 0x20000, 1, 0], [1, 7, 0, 0, 0]]
            .iter()
            .enumerate()
        {
            let at = entries + 56 * i as u64;
            let mem = &m.domains[0].memory;
            mem.write_u64(at, nr).unwrap();
            for (j, a) in args.iter().enumerate() {
                mem.write_u64(at + 8 + 8 * j as u64, *a).unwrap();
            }
        }
        let multicall = lamina_abi::Hypercall::Multicall as u64;
        assert_eq!(call(&mut m, &mut vcpu, multicall, [entries, 2, 0, 0, 0]), 2);
        let result = |i: u64| m.domains[0].memory.read_u64(entries + 56 * i + 48).unwrap();
        assert_eq!(result(0), 1, "the next free reference");
        assert_eq!(result(1) as i64, -2, "-ENOENT");
        assert!(m.d(1).grants.grant(1).unwrap().read_only);
        // From CPL 3: -EPERM, nothing granted.
        vcpu.cpl = 3;
        assert_eq!(call(&mut m, &mut vcpu, nr, [0, 2, 0x20000, 0, 0]), -1);
        assert!(m.d(1).grants.grant(2).is_none());
    }
}

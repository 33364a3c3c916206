//! The hypervisor's locks and the one order in which they are taken. Nothing else in the
//! code takes a lock that is not listed here.
//!
//! A CPU takes a lock only after every lock above it in this list that it will need, and
//! never the other way round:
//!
//! 1. **The domain table** ([`crate::common::sched::Machine`], a [`TableLock`]), a
//!    readers-writer lock, taken one of two ways:
//!    - *exclusive*: a teardown (the scheduler's, and `domctl` destroy, which must see it
//!      done before it returns: it reaches every domain and gives RAM back), the scheduler's
//!      pass on a machine with one CPU, and the rare exits that may reach any domain
//!      (another domain's counters, the other vendor's hypercall instruction:
//!      `sched::reach`), or that backed off twice (below).
//!      Every domain is reached without its own lock: no one else holds any.
//!    - *shared*: every other exit, and the scheduler's pass with several CPUs. It keeps each
//!      domain where it is, as Xen's `rcu_lock_domain` does: teardown needs the table
//!      exclusive, so no domain is torn down or freed under a CPU that holds it shared (the
//!      domain's vCPUs taken out of their slot for a slice are references too: a domain is
//!      torn down once all are back).
//!
//!    The writer is preferred: once a CPU waits to take it exclusive, no CPU takes it shared
//!    until that one had it, so a stream of exits on other CPUs cannot hold off the scheduler.
//! 2. **The run queue** (`sched::RunQueue`: the ready set of each CPU (`run_queues`), the
//!    heaps of timer deadlines, the RAM being scrubbed), with the table shared: one CPU at a
//!    time looks at the vCPUs that need it and picks one (a migration between two CPUs' sets
//!    happens under it too). While it is held no vCPU leaves its slot. The set of vCPUs a
//!    request was made of (`vcpu::state::Attention`) is atomic bits beside it, set without
//!    any lock by whoever makes the request.
//! 3. **A domain** ([`DomainLock`], one per domain, Xen's per-domain `event_lock` in shape):
//!    its vCPUs' hypervisor-side state, event channels, grants and console, for a CPU that
//!    holds the table shared. The scheduler's pass takes one at a time. An exit holds its
//!    running domain's, and at most one other at a time: the remote end of an event channel
//!    it sends on, binds or closes, the domain it grants a page to or maps a grant of, the granter of a grant
//!    it unmaps, the domain a domain control reads or pauses (named in a register, locked
//!    before the call runs); the granter a grant copy names in guest memory (locked once the
//!    request is read), each domain `list_domains` and `phys_info` read in turn, and for a
//!    `multicall` what each entry names, taken before that entry runs and let go when the
//!    next needs another or none (`sched::LockedPeers`). It waits for that second lock only
//!    when the peer comes after its own domain in the table (domain-id order); when it comes
//!    before, it tries once, and if the lock is busy the call stops before it has acted (a
//!    `multicall` before that entry, keeping its copy of the batch), the CPU lets both go,
//!    takes the two in domain order, waiting for each, and makes the call again from where
//!    it stopped (Linux's `ww_mutex` back-off). After two back-offs in one exit, or for an
//!    entry that may reach any domain, it goes on with the table exclusive. So no CPU waits
//!    for a lock while it holds one that comes after it, and no two CPUs wait for each other.
//! 4. **The trace ring of a CPU** (`common::trace`), each CPU its own.
//! 5. **The physical-page allocator** (`platform::memory::PHYS`): taken when nested page
//!    tables and teardown give pages back.
//! 6. **The serial port** (`platform::serial::SERIAL`): a whole line is written under it, so
//!    lines from several CPUs never interleave.
//!
//! No lock is held across a VM entry: a CPU lets every lock go before it enters a guest and
//! takes what the exit needs afterwards. Each hypercall does bounded work under what it holds
//! (the largest: a `multicall` of `MULTICALL_MAX` entries, a scrub slice; an exit backs off
//! at most twice), and a CPU that others keep overtaking at a domain lock claims it
//! (`DomainLock`), so a guest cannot make another CPU spin without bound. An exit that waits for a vCPU to leave guest mode
//! (grant unmap, pause, `down`, `flush_tlb`) may do so under its locks: the kick forces that
//! exit, and a CPU clears its vCPU's in-guest flag before it takes any lock. With one CPU the
//! table is taken exclusive for a whole slice (no one else could want it).
//!
//! A CPU that found nothing to run marks itself idle before it lets its locks go, then
//! compares [`crate::common::cpus::wake_count`] with its value when the pass began: a vCPU made
//! ready after the pass looked at it either wakes that CPU or is seen by it (the pass no
//! longer holds every domain at once, so the table alone cannot order the two).
//!
//! A vCPU's hardware state (its VMCS or VMCB, in [`crate::common::domain::Slot`]) is not
//! behind a lock: the CPU that runs a vCPU takes it out of its slot in the scheduler's pass
//! and puts it back under its domain's lock at the end of the slice; no other CPU picks that
//! vCPU meanwhile, and its domain is not torn down until every vCPU is back. What other CPUs ask of a running vCPU
//! goes through its request bits ([`crate::common::vcpu::state::Requests`]), which are atomic.
//! Its hypervisor-side state, the emulated x2APIC included, stays in its domain under the
//! domain's lock: a sibling's IPI (`common::devices::apic_bus`) sets the target's IRR there
//! from the sender's exit, then makes a request.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// How often each kind of lock was taken, and how often a CPU found it busy and waited.
#[derive(Default)]
pub struct LockCounts {
    taken: AtomicU64,
    waited: AtomicU64,
}

impl LockCounts {
    const fn new() -> Self {
        LockCounts {
            taken: AtomicU64::new(0),
            waited: AtomicU64::new(0),
        }
    }

    #[inline]
    fn count(&self, waited: bool) {
        self.taken.fetch_add(1, Ordering::Relaxed);
        if waited {
            self.waited.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (taken, waited).
    pub fn figures(&self) -> (u64, u64) {
        (
            self.taken.load(Ordering::Relaxed),
            self.waited.load(Ordering::Relaxed),
        )
    }
}

/// The table taken exclusive.
pub static TABLE_EXCLUSIVE: LockCounts = LockCounts::new();
/// The table taken shared.
pub static TABLE_SHARED: LockCounts = LockCounts::new();
/// A running domain's lock.
pub static DOMAIN_OWN: LockCounts = LockCounts::new();
/// A domain's lock taken by the scheduler's pass.
pub static DOMAIN_PASS: LockCounts = LockCounts::new();
/// The run queue's lock.
pub static RUN_QUEUE: LockCounts = LockCounts::new();
/// A second domain's lock (the remote end of a channel, a granter, a multicall entry's peer).
pub static DOMAIN_PEER: LockCounts = LockCounts::new();
/// Calls stopped because a peer that comes first was busy (then made again with the two
/// locks taken in domain order, or after two with the table exclusive).
pub static BACKED_OFF: AtomicU64 = AtomicU64::new(0);

/// Exits handled with the table exclusive: those that may reach any domain, and (counted in
/// both) those that went on that way after backing off twice ([`BACKED_OFF`]).
pub static EXITS_EXCLUSIVE: AtomicU64 = AtomicU64::new(0);
/// See [`EXITS_EXCLUSIVE`].
pub static EXITS_EXCLUSIVE_AFTER_BACK_OFF: AtomicU64 = AtomicU64::new(0);

/// Scheduler passes with the table shared, and those that found a wake-up had come during
/// the pass and passed again rather than halt.
pub static PASSES: AtomicU64 = AtomicU64::new(0);
/// See [`PASSES`].
pub static PASSES_AGAIN: AtomicU64 = AtomicU64::new(0);
/// Switches on one CPU made without the general pass (`sched::switch_directly`).
pub static DIRECT_SWITCHES: AtomicU64 = AtomicU64::new(0);

/// Exits being handled under a lock right now, on all CPUs.
static EXITS_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
/// Exits handled under a lock (several CPUs), and those of them that began while another
/// CPU was handling one: what the fine-grained locks let run in parallel (with one lock for
/// every exit, none could).
pub static EXITS_LOCKED: AtomicU64 = AtomicU64::new(0);
/// See [`EXITS_LOCKED`].
pub static EXITS_OVERLAPPED: AtomicU64 = AtomicU64::new(0);

/// An exit is handled from now, under the locks it needs.
#[inline]
pub fn exit_begins() {
    EXITS_LOCKED.fetch_add(1, Ordering::Relaxed);
    if EXITS_IN_FLIGHT.fetch_add(1, Ordering::AcqRel) > 0 {
        EXITS_OVERLAPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// The exit of [`exit_begins`] is handled.
#[inline]
pub fn exit_ends() {
    EXITS_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
}

/// The summary's line: how often each lock was taken and waited for (several CPUs only).
pub fn summary_line() -> alloc::string::String {
    let (xt, xw) = TABLE_EXCLUSIVE.figures();
    let (st, sw) = TABLE_SHARED.figures();
    let (ot, ow) = DOMAIN_OWN.figures();
    let (pt, pw) = DOMAIN_PEER.figures();
    let (qt, qw) = RUN_QUEUE.figures();
    let (dt, dw) = DOMAIN_PASS.figures();
    alloc::format!(
        "lamina: locks: table exclusive {xt} (waited {xw}; for {} exits, {} of them after \
         backing off twice), shared {st} (waited {sw}); run queue {qt} (waited {qw}); domain by its exits {ot} (waited {ow}), by the pass \
         {dt} (waited {dw}), as a peer {pt} (waited {pw}, backed off {}); passes {} (again {}); exits {} \
         ({} while another CPU handled one)",
        EXITS_EXCLUSIVE.load(Ordering::Relaxed),
        EXITS_EXCLUSIVE_AFTER_BACK_OFF.load(Ordering::Relaxed),
        BACKED_OFF.load(Ordering::Relaxed),
        PASSES.load(Ordering::Relaxed),
        PASSES_AGAIN.load(Ordering::Relaxed),
        EXITS_LOCKED.load(Ordering::Relaxed),
        EXITS_OVERLAPPED.load(Ordering::Relaxed)
    )
}

/// The domain table's lock: readers-writer, writer preferred, counted.
pub struct TableLock<T> {
    lock: spin::RwLock<T>,
    /// CPUs waiting to take it exclusive: while any does, no one takes it shared.
    writers_waiting: AtomicUsize,
}

impl<T> TableLock<T> {
    /// The lock around `value`.
    pub const fn new(value: T) -> Self {
        TableLock {
            lock: spin::RwLock::new(value),
            writers_waiting: AtomicUsize::new(0),
        }
    }

    /// Takes it exclusive: waits for the CPUs holding it shared to finish their exit.
    #[inline]
    pub fn exclusive(&self) -> spin::RwLockWriteGuard<'_, T> {
        if let Some(guard) = self.lock.try_write() {
            TABLE_EXCLUSIVE.count(false);
            return guard;
        }
        self.wait_exclusive()
    }

    #[cold]
    fn wait_exclusive(&self) -> spin::RwLockWriteGuard<'_, T> {
        self.writers_waiting.fetch_add(1, Ordering::AcqRel);
        let guard = self.lock.write();
        self.writers_waiting.fetch_sub(1, Ordering::AcqRel);
        TABLE_EXCLUSIVE.count(true);
        guard
    }

    /// Takes it shared, after any CPU already waiting to take it exclusive.
    pub fn shared(&self) -> spin::RwLockReadGuard<'_, T> {
        let mut waited = false;
        loop {
            if self.writers_waiting.load(Ordering::Acquire) == 0
                && let Some(guard) = self.lock.try_read()
            {
                TABLE_SHARED.count(waited);
                return guard;
            }
            waited = true;
            core::hint::spin_loop();
        }
    }
}

/// Takes the run queue's lock (a plain spin lock), counted.
pub fn lock_run_queue<T>(lock: &spin::Mutex<T>) -> spin::MutexGuard<'_, T> {
    if let Some(guard) = lock.try_lock() {
        RUN_QUEUE.count(false);
        return guard;
    }
    let guard = lock.lock();
    RUN_QUEUE.count(true);
    guard
}

/// A domain's lock (the data it guards is reached through the table: see
/// `sched::Table::own_slot`): a spin lock that a CPU which waited long claims next. A plain
/// spin lock let a CPU whose domain's vCPU exits in a tight loop (a `sched_op` yield spin)
/// release and take it again before a CPU waiting for it as a peer ever saw it free: under
/// QEMU TCG with two CPUs such a wait lasted 2 s, until the spinning domain ended
/// (conformance `grant_errors_b`'s copy from `grant_errors_a`, after a back-off). A ticket
/// lock ended that, but under QEMU's one-CPU-at-a-time `-icount` every contended take then
/// waited for the other CPU's turn (bench-fast `shootdown_cpu1_pv` 715 to 1,171
/// instructions on AMD-V): here the lock is taken as before unless a waiter spun
/// [`STARVING_SPINS`] times or for [`STARVING_TSC_TICKS`]; that one then claims it, and no
/// other CPU takes it (nor tries it) until the claimer has had it. The time bound is needed
/// where a spin is slow: under QEMU's multi-threaded TCG each PAUSE leaves the translated
/// code, and 65,536 of them took the 2 s of a whole test while the other CPU's domain
/// yielded in a loop (conformance `grant_ro_write_b`'s first grant call, once the debug
/// registers' switch made each of `grant_ro_write_a`'s yields a few instructions longer).
pub struct DomainLock {
    lock: spin::Mutex<()>,
    /// A waiter that spun [`STARVING_SPINS`] times takes the lock next.
    claimed: AtomicBool,
}

/// How many times a CPU tries a busy domain lock before it claims it. Far more than an
/// exit's work under the lock takes (about 10 instructions a try), so that only a CPU that
/// others keep overtaking claims it.
pub const STARVING_SPINS: u32 = 1 << 16;

/// How long, in TSC ticks, a CPU tries a busy domain lock before it claims it: about 0.3 to
/// 1 ms at the TSC rates of today's CPUs and of QEMU, 10 ms under Bochs (100 MHz); far longer
/// than any exit holds a lock.
pub const STARVING_TSC_TICKS: u64 = 1 << 20;

/// A held [`DomainLock`].
pub type DomainGuard<'l> = spin::MutexGuard<'l, ()>;

impl Default for DomainLock {
    fn default() -> Self {
        DomainLock {
            lock: spin::Mutex::new(()),
            claimed: AtomicBool::new(false),
        }
    }
}

impl DomainLock {
    /// Takes it as the running domain's lock.
    pub fn lock_own(&self) -> DomainGuard<'_> {
        self.take(&DOMAIN_OWN)
    }

    /// Takes it in the scheduler's pass (which holds no other domain's lock meanwhile).
    pub fn lock_for_pass(&self) -> DomainGuard<'_> {
        self.take(&DOMAIN_PASS)
    }

    /// Takes it as a peer's lock, waiting if busy: only for a peer after the running domain
    /// (see [`may_wait_for`]).
    pub fn lock_peer(&self) -> DomainGuard<'_> {
        self.take(&DOMAIN_PEER)
    }

    /// Takes it as a peer's lock if it is free (and not claimed by a waiter).
    pub fn try_lock_peer(&self) -> Option<DomainGuard<'_>> {
        let guard = self.try_take()?;
        DOMAIN_PEER.count(false);
        Some(guard)
    }

    /// The lock, if it is free and no waiter claimed it.
    #[inline]
    fn try_take(&self) -> Option<DomainGuard<'_>> {
        if self.claimed.load(Ordering::Acquire) {
            return None;
        }
        self.lock.try_lock()
    }

    #[inline]
    fn take(&self, counts: &LockCounts) -> DomainGuard<'_> {
        if let Some(guard) = self.try_take() {
            counts.count(false);
            return guard;
        }
        let guard = self.wait();
        counts.count(true);
        guard
    }

    /// Spins until it has the lock; after [`STARVING_SPINS`] tries or [`STARVING_TSC_TICKS`],
    /// claims it.
    #[cold]
    fn wait(&self) -> DomainGuard<'_> {
        let mut spins = 0u32;
        let since = crate::common::time::read_tsc();
        loop {
            if !self.lock.is_locked()
                && let Some(guard) = self.try_take()
            {
                return guard;
            }
            spins += 1;
            let waited = crate::common::time::read_tsc().wrapping_sub(since);
            if starving(spins, waited)
                && self
                    .claimed
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                // Whoever holds it lets it go within its exit and cannot take it back.
                let guard = loop {
                    if let Some(guard) = self.lock.try_lock() {
                        break guard;
                    }
                    core::hint::spin_loop();
                };
                self.claimed.store(false, Ordering::Release);
                return guard;
            }
            core::hint::spin_loop();
        }
    }
}

/// Whether a waiter that tried a busy domain lock `spins` times over `waited` TSC ticks claims
/// it ([`DomainLock`]).
fn starving(spins: u32, waited: u64) -> bool {
    spins >= STARVING_SPINS || waited >= STARVING_TSC_TICKS
}

/// Whether a CPU holding the lock of the domain in table slot `held` may wait for the lock
/// of the one in slot `wanted`: only in table order, so no two CPUs wait for each other.
pub fn may_wait_for(held: usize, wanted: usize) -> bool {
    wanted > held
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn a_waiter_claims_after_many_tries_or_a_long_wait_whichever_comes_first() {
        assert!(!starving(1, 0));
        assert!(!starving(STARVING_SPINS - 1, STARVING_TSC_TICKS - 1));
        // Fast spins (hardware): the count.
        assert!(starving(STARVING_SPINS, 10));
        // Slow spins (QEMU's multi-threaded TCG, where PAUSE leaves the translated code):
        // the time, after a few tries.
        assert!(starving(3, STARVING_TSC_TICKS));
    }

    #[test]
    fn shared_holders_keep_the_table_from_a_writer_and_share_it() {
        let lock = TableLock::new(5);
        let first = lock.shared();
        let second = lock.shared();
        assert_eq!(*first + *second, 10);
        assert!(lock.lock.try_write().is_none(), "readers exclude a writer");
        drop((first, second));
        let mut writer = lock.exclusive();
        *writer = 6;
        assert!(lock.lock.try_read().is_none(), "a writer excludes readers");
        drop(writer);
        assert_eq!(*lock.shared(), 6);
    }

    #[test]
    fn a_waiting_writer_goes_before_new_readers() {
        let lock = Arc::new(TableLock::new(0u32));
        let reader = lock.shared();
        let wrote = Arc::new(AtomicBool::new(false));
        let writer = {
            let (lock, wrote) = (Arc::clone(&lock), Arc::clone(&wrote));
            std::thread::spawn(move || {
                *lock.exclusive() = 1;
                wrote.store(true, Ordering::SeqCst);
            })
        };
        while lock.writers_waiting.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        // A writer waits: a new reader must not get in ahead of it, even though the table is
        // only held shared.
        let late_reader = {
            let lock = Arc::clone(&lock);
            std::thread::spawn(move || *lock.shared())
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            !wrote.load(Ordering::SeqCst),
            "the first reader still holds it"
        );
        assert!(
            !late_reader.is_finished(),
            "a new reader waits behind the writer"
        );
        drop(reader);
        writer.join().unwrap();
        assert_eq!(
            late_reader.join().unwrap(),
            1,
            "the reader came after the writer"
        );
    }

    #[test]
    fn peer_locks_are_waited_for_only_in_table_order() {
        assert!(may_wait_for(0, 1));
        assert!(!may_wait_for(1, 0));
        assert!(!may_wait_for(2, 2));
        let lock = DomainLock::default();
        let held = lock.lock_own();
        assert!(lock.try_lock_peer().is_none(), "a busy lock is not taken");
        drop(held);
        assert!(lock.try_lock_peer().is_some());
    }

    /// A waiter that spun long claims the lock: once the holder lets go, it has it before a
    /// CPU that came later, and nobody tries it meanwhile.
    #[test]
    fn a_starving_waiter_claims_the_lock_and_gets_it_first() {
        use std::sync::atomic::AtomicUsize;
        let lock = Arc::new(DomainLock::default());
        let order = Arc::new(AtomicUsize::new(0));
        let held = lock.lock_own();
        let waiter = |lock: &Arc<DomainLock>, order: &Arc<AtomicUsize>| {
            let (lock, order) = (Arc::clone(lock), Arc::clone(order));
            std::thread::spawn(move || {
                let _guard = lock.lock_peer();
                order.fetch_add(1, Ordering::SeqCst)
            })
        };
        let first = waiter(&lock, &order);
        while !lock.claimed.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        assert!(lock.try_lock_peer().is_none(), "claimed: not to be tried");
        let second = waiter(&lock, &order);
        std::thread::sleep(std::time::Duration::from_millis(10));
        drop(held);
        assert_eq!(first.join().unwrap(), 0, "the claimer had it first");
        assert_eq!(second.join().unwrap(), 1);
        assert!(
            !lock.claimed.load(Ordering::SeqCst),
            "the claim ends with the take"
        );
        assert!(lock.try_lock_peer().is_some());
    }

    /// Two CPUs, each holding its own domain, each wanting the other's: the protocol
    /// (wait only in table order, else try once and back off) never deadlocks.
    #[test]
    fn crossed_peer_locks_never_deadlock() {
        let locks = Arc::new([DomainLock::default(), DomainLock::default()]);
        let threads: Vec<_> = (0..2usize)
            .map(|own| {
                let locks = Arc::clone(&locks);
                std::thread::spawn(move || {
                    let peer = 1 - own;
                    let mut got_peer = 0u32;
                    for _ in 0..20_000 {
                        let _own = locks[own].lock_own();
                        let got = if may_wait_for(own, peer) {
                            Some(locks[peer].lock_peer())
                        } else {
                            locks[peer].try_lock_peer()
                        };
                        got_peer += u32::from(got.is_some());
                    }
                    got_peer
                })
            })
            .collect();
        let got: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        // Both finished (no deadlock); the one whose peer comes after it always got it.
        assert_eq!(got[0], 20_000);
        assert!(got[1] <= 20_000);
    }
}

//! The run loop: round-robin over runnable vCPUs with a time slice, timers, waits, and the
//! injection of interrupts before each entry.
//!
//! A vCPU runs until it yields, waits (block, poll, HLT), its domain ends, or the host timer
//! interrupts it (its slice ended or some timer is due). When nothing can run, the physical
//! CPU halts until the next timer: no busy waiting. The machine-specific parts (clock, host
//! timer, halting) come through [`Host`], so this logic is the same on every platform.

pub mod locking;
pub mod reach;
pub mod ready;
mod run_queues;

use crate::common::cpus;
use crate::common::domain::config::DEFAULT_WEIGHT;
use crate::common::domain::stats::{ExitKind, ExitStats};
use crate::common::domain::teardown::{Scrub, tear_down};
use crate::common::domain::{Domain, DomainState, DomainTable, Ending, NoPeers, Slot};
use crate::common::events::Binding;
use crate::common::exits::{
    OwnExits, PreemptionClock, handle_exit, handle_without_lock, hlt_exit, hypercall_exit,
    msr_read_exit, msr_write_exit, port_exit, run_own_exits,
};
use crate::common::grants::WindowSlot;
use crate::common::hypercall::Next;
use crate::common::time::publish_vcpu_time;
use crate::common::time::read_tsc;
use crate::common::trace;
use crate::common::vcpu::state::{Attention, StartState, Wait, request};
use crate::common::vcpu::{VirtualCpu, VmExit, reg};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use lamina_abi::Errno;
use lamina_abi::vcpu::runstate;
use locking::{DomainLock, TableLock, may_wait_for};
use reach::{PeerOf, Reach};
use ready::{Ready, UnitHeap};
use run_queues::CpuRunQueues;

/// How long a vCPU runs before others get the CPU.
pub const TIME_SLICE_NS: u64 = 10_000_000;

/// What the scheduler needs from the machine.
pub trait Host {
    /// System time now.
    fn now_ns(&self) -> u64;
    /// Have a host interrupt at system time `deadline` (`None`: no timer needed).
    fn arm_timer(&mut self, deadline: Option<u64>);
    /// Have a host interrupt at some time from `earliest` to `deadline`: a timer armed for
    /// that window that has not fired yet is kept (writing the timer again costs more than
    /// the rest of a switch's timer work).
    fn arm_timer_within(&mut self, earliest: u64, deadline: u64) {
        let _ = earliest;
        self.arm_timer(Some(deadline));
    }
    /// Halts the CPU until a host interrupt arrives (and handles it).
    fn wait_for_interrupt(&mut self);
    /// Lets host interrupts that arrived while a guest ran be handled.
    fn service_interrupts(&mut self);
    /// A byte of console input from the machine's serial port, if one arrived.
    fn console_input(&mut self) -> Option<u8>;
    /// The machine's own background work (moving console output to the wire); returns when
    /// it wants to be called again.
    fn housekeeping(&mut self) -> Option<u64>;
    /// When the last [`Self::housekeeping`] wanted to be called again.
    fn work_due(&self) -> Option<u64> {
        None
    }
    /// The host's work between two exits of a guest, in its slice (`host_work_in_slice`):
    /// what [`Self::housekeeping`] does, unless the host wants it only between passes.
    fn work_in_slice(&mut self) {}
}

/// How often console input is polled while a domain could be woken by it.
pub const CONSOLE_POLL_NS: u64 = 10_000_000;

/// All domains but one: the slots in `parts` and, when the one left out is not the running
/// domain (it is torn down by the running domain's hypercall), the running domain.
struct Peers<'a, V> {
    parts: [&'a mut [Slot<V>]; 3],
    caller: Option<&'a mut Domain>,
}

impl<'a, V> Peers<'a, V> {
    /// The slots before and after the one left out.
    fn around(before: &'a mut [Slot<V>], after: &'a mut [Slot<V>]) -> Self {
        Peers {
            parts: [before, after, &mut []],
            caller: None,
        }
    }
}

impl<V> DomainTable for Peers<'_, V> {
    fn get_mut(&mut self, id: u32) -> Option<&mut Domain> {
        if let Some(caller) = self.caller.as_deref_mut()
            && caller.id == id
        {
            return Some(caller);
        }
        let slot = self
            .parts
            .iter_mut()
            .flat_map(|part| part.iter_mut())
            .find(|s| s.domain.id == id)?;
        Some(&mut slot.domain)
    }

    fn is_parked(&mut self, id: u32) -> bool {
        self.parts
            .iter()
            .flat_map(|part| part.iter())
            .find(|s| s.domain.id == id)
            .is_none_or(Slot::is_parked)
    }

    fn tear_down(&mut self, id: u32, caller: &mut Domain) -> bool {
        // Only the table of the running domain's peers (two parts, no caller) is split here.
        if self.caller.is_some() || !self.parts[2].is_empty() {
            return false;
        }
        let [first, second, _] = &mut self.parts;
        let (part, other) = if first.iter().any(|s| s.domain.id == id) {
            (&mut **first, &mut **second)
        } else {
            (&mut **second, &mut **first)
        };
        let Some(index) = part.iter().position(|s| s.domain.id == id) else {
            return false;
        };
        let (left, rest) = part.split_at_mut(index);
        let Some((slot, right)) = rest.split_first_mut() else {
            return false;
        };
        if !slot.is_parked() {
            // A CPU runs one of its vCPUs: the scheduler tears it down once that stops.
            return false;
        }
        let scrub = tear_down(
            slot,
            &mut Peers {
                parts: [left, right, other],
                caller: Some(caller),
            },
        );
        // Destroy returns once the RAM is back (docs/abi.md 17).
        if let Some(scrub) = scrub {
            scrub.finish();
        }
        true
    }
}

fn is_ready<V>(slot: &Slot<V>, vcpu: usize) -> bool {
    slot.domain.is_runnable()
        && !slot.domain.paused
        && matches!(slot.vcpus.get(vcpu), Some(Some(_)))
        && slot.domain.vcpus[vcpu].is_runnable()
}

/// The earliest time something of vCPU `index` is due.
#[inline]
fn vcpu_deadline(domain: &Domain, index: usize) -> Option<u64> {
    let state = &domain.vcpus[index];
    let earliest = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut due = state.timers.next_deadline();
    if let Wait::Poll { deadline, .. } = &state.wait {
        due = earliest(due, *deadline);
    }
    // Most vCPUs have no APIC timer counting: no deadline to work out.
    if !state.vlapic.timer_counting() {
        return due;
    }
    earliest(due, state.vlapic.next_timer_deadline_ns())
}

/// The earliest time something of this domain is due (nothing while it is paused: what falls
/// due meanwhile is handled when it is unpaused). The run queue keeps this per vCPU
/// (`RunQueue::due`); this checks it.
#[cfg(test)]
fn next_deadline<V>(slot: &Slot<V>) -> Option<u64> {
    if !slot.domain.is_runnable() || slot.domain.paused {
        return None;
    }
    (0..slot.domain.vcpus.len())
        .filter_map(|index| vcpu_deadline(&slot.domain, index))
        .min()
}

/// The earliest time something of this domain is due that can wake one of its vCPUs: only a
/// waiting vCPU's timers need to interrupt another domain's slice. A vCPU that is ready has
/// its expiries handled when it is next scheduled in, as every pass handles them, so its
/// timers (a periodic one at the minimum period, say) cost the running domain nothing. The
/// run queue keeps this per vCPU (`RunQueue::wake_due`); this checks it.
#[cfg(test)]
fn next_wake_deadline<V>(slot: &Slot<V>) -> Option<u64> {
    if !slot.domain.is_runnable() || slot.domain.paused {
        return None;
    }
    (0..slot.domain.vcpus.len())
        .filter(|&index| slot.domain.vcpus[index].wait != Wait::None)
        .filter_map(|index| vcpu_deadline(&slot.domain, index))
        .min()
}

/// The interrupt to inject into vCPU `index` now, if any: the emulated APIC's first (a
/// kernel using it acknowledges through EOI), then the event upcall.
fn deliverable_interrupt(domain: &Domain, index: usize) -> Option<(u8, bool)> {
    let state = &domain.vcpus[index];
    if let Some(vector) = state.vlapic.deliverable_vector() {
        return Some((vector, true));
    }
    upcall_deliverable(domain, index).then_some((state.upcall_vector, false))
}

/// Whether an upcall can be delivered to vCPU `index` right now (pending, unmasked, vector
/// set).
fn upcall_deliverable(domain: &Domain, index: usize) -> bool {
    domain.vcpus[index].upcall_vector != 0
        && matches!(
            domain.events.upcall_flags(&domain.memory, index),
            Ok((true, false))
        )
}

/// Fires vCPU `index`'s due timers and ends its wait if it is over; ends the domain if a
/// teardown left one of its vCPUs waiting for nothing.
fn update<V: VirtualCpu>(slot: &mut Slot<V>, index: usize, now: u64) {
    if !slot.domain.is_runnable() {
        return;
    }
    update_vcpu(slot, index, now);
    if slot.domain.vcpus[index].requests.take(request::WAKE_CHECK) != 0
        && let Some(why) = slot.domain.never_wakes()
    {
        slot.domain.end(Ending::Fault(String::from(why)));
    }
}

/// Fires vCPU `index`'s due timers: its x2APIC timer and its PV timers.
#[inline(always)]
fn advance_timers(domain: &mut Domain, index: usize, now: u64) {
    let state = &mut domain.vcpus[index];
    // Most vCPUs have no APIC timer counting: no TSC conversion, nothing to advance.
    if state.vlapic.timer_counting() && !state.vlapic.timer_expiry_moot() {
        let tsc = domain.time.tsc_at(now);
        let apic_was_quiet = state.vlapic.deliverable_vector().is_none();
        state.vlapic.advance(now, tsc);
        if apic_was_quiet && state.vlapic.deliverable_vector().is_some() {
            state.requests.make(request::EVENT);
        }
    }
    // Only when a PV timer is due: most looks find none (an inlined test, not a call).
    if domain.vcpus[index]
        .timers
        .next_deadline()
        .is_some_and(|deadline| deadline <= now)
    {
        domain.expire_timers(index, now);
    }
}

fn update_vcpu<V: VirtualCpu>(slot: &mut Slot<V>, index: usize, now: u64) {
    if is_ready(slot, index) {
        // Its timers run when it is scheduled in (docs/abi.md 9.3), on its own time: fired
        // here, as the vCPU a slice just ended for is looked at, they cost the vCPU picked
        // next (beside `resource-hog`, whose PV timers are due at every look, 1.9 us of the
        // neighbour's timer lateness under Bochs).
        return;
    }
    let domain = &mut slot.domain;
    advance_timers(domain, index, now);
    let state = &domain.vcpus[index];
    if !state.up {
        return;
    }
    // A waiting vCPU is looked at again only when something that can end its wait happened:
    // a request made of it (an event raised for it or its ports, an interrupt for its APIC, a
    // teardown: whatever calls `Requests::make`), or its deadline passed. Idle domains then
    // cost each pass a few loads, not a read of their shared pages (docs/abi.md 19, Races).
    let deadline_passed = match &state.wait {
        Wait::None => return,
        Wait::Poll { deadline, .. } => deadline.is_some_and(|d| d <= now),
        Wait::Block | Wait::Halt => false,
    };
    if !deadline_passed && !state.requests.peek(request::EVENT | request::WAKE_CHECK) {
        return;
    }
    let woken = match &domain.vcpus[index].wait {
        Wait::None => return,
        Wait::Block => matches!(
            domain.events.upcall_flags(&domain.memory, index),
            Ok((true, _))
        ),
        Wait::Halt => deliverable_interrupt(domain, index).is_some(),
        Wait::Poll { ports, deadline } => {
            let pending = ports
                .iter()
                .any(|&p| domain.events.is_pending(&domain.memory, p).unwrap_or(false));
            if !pending
                && deadline.is_some_and(|d| d <= now)
                && let Some(Some(vcpu)) = slot.vcpus.get_mut(index)
            {
                vcpu.regs().gpr[reg::RAX] = Errno::ETIMEDOUT.to_return_value();
            }
            pending || deadline.is_some_and(|d| d <= now)
        }
    };
    if woken {
        trace::wake(domain.id);
        let state = &mut domain.vcpus[index];
        state.wait = Wait::None;
        // The pass brings the run queue up to date with it right after this.
        state.requests.make_from_scheduler(request::EVENT);
        state.boosted = true;
        let _ = state
            .runstate
            .enter(runstate::RUNNABLE, now, &domain.memory);
    }
}

/// Tears down every domain that ended and was not torn down yet, with all the others as its
/// peers; their RAM joins `scrubbing`. Returns whether it tore down any.
fn tear_down_ended<V>(slots: &mut [Slot<V>], scrubbing: &mut VecDeque<Scrub>) -> bool {
    let mut any = false;
    for index in 0..slots.len() {
        if slots[index].domain.is_runnable()
            || slots[index].domain.torn_down
            || !slots[index].is_parked()
        {
            continue;
        }
        let (before, rest) = slots.split_at_mut(index);
        if let Some((slot, after)) = rest.split_first_mut() {
            scrubbing.extend(tear_down(slot, &mut Peers::around(before, after)));
            any = true;
        }
    }
    any
}

/// Ends the paused domains that no one can unpause any more: no privileged domain is left
/// running, or nothing at all is due (so no domain will ever run again). Returns whether it
/// ended any. Called when no vCPU is ready, so that a machine always ends (docs/abi.md 17).
///
/// `nothing_due` (no deadline anywhere) means nothing can happen any more only when no vCPU
/// runs on another CPU either: one that does is not "ready" here, yet may unpause the domain,
/// arm a timer or raise an event at any moment. Its CPU looks again when it is back.
#[cfg(test)]
fn stop_unpausable<V>(slots: &mut [Slot<V>], nothing_due: bool) -> bool {
    stop_unpausable_in(slots, nothing_due)
}

/// `stop_unpausable` on the slots as the pass reaches them. With the table shared it
/// holds: the pass holds the run queue, so no vCPU leaves its slot meanwhile, and only a
/// running vCPU can unpause a domain.
fn stop_unpausable_in<V, S: Slots<V> + ?Sized>(slots: &mut S, nothing_due: bool) -> bool {
    let unpauser_left =
        slots.any(|s| s.domain.is_runnable() && s.domain.privileged && !s.domain.paused);
    if unpauser_left && (!nothing_due || slots.any(|s| s.domain.is_runnable() && !s.is_parked())) {
        return false;
    }
    let mut stopped = false;
    slots.each(|_, slot| {
        if slot.domain.is_runnable() && slot.domain.paused {
            slot.domain.end(Ending::Paused);
            stopped = true;
        }
    });
    stopped
}

/// The domains as the scheduler's pass reaches them: all at once (the table exclusive, or
/// one CPU), or one at a time under its domain lock (the table shared, [`LockedSlots`]).
trait Slots<V> {
    /// Runs `f` on slot `index`.
    fn with<R>(&mut self, index: usize, f: impl FnOnce(&mut Slot<V>) -> R) -> R;
    /// Runs `f` on every slot, in order, with its index.
    fn each(&mut self, f: impl FnMut(usize, &mut Slot<V>));
    /// Whether `f` holds for some slot (looking at them in order until it does).
    fn any(&mut self, f: impl FnMut(&mut Slot<V>) -> bool) -> bool;
    /// Tears down the domains that ended ([`tear_down_ended`]); `None` where that cannot be
    /// done (the table shared: a teardown reaches every domain).
    fn tear_down_ended(&mut self, scrubbing: &mut VecDeque<Scrub>) -> Option<bool>;
}

impl<V> Slots<V> for [Slot<V>] {
    #[inline(always)]
    fn with<R>(&mut self, index: usize, f: impl FnOnce(&mut Slot<V>) -> R) -> R {
        f(&mut self[index])
    }
    #[inline(always)]
    fn each(&mut self, mut f: impl FnMut(usize, &mut Slot<V>)) {
        for (index, slot) in self.iter_mut().enumerate() {
            f(index, slot);
        }
    }
    #[inline(always)]
    fn any(&mut self, f: impl FnMut(&mut Slot<V>) -> bool) -> bool {
        self.iter_mut().any(f)
    }
    fn tear_down_ended(&mut self, scrubbing: &mut VecDeque<Scrub>) -> Option<bool> {
        Some(tear_down_ended(self, scrubbing))
    }
}

/// The slots with the table held shared: each reached under its domain's lock, one at a time.
struct LockedSlots<'t, V> {
    cells: &'t [UnsafeCell<Slot<V>>],
    locks: &'t [DomainLock],
}

impl<V> Slots<V> for LockedSlots<'_, V> {
    fn with<R>(&mut self, index: usize, f: impl FnOnce(&mut Slot<V>) -> R) -> R {
        let _held = self.locks[index].lock_for_pass();
        // SAFETY: `cells` was borrowed from the table held shared (no CPU has it exclusive)
        // and this slot's domain lock is held, so no other CPU reaches it; the borrow ends
        // before the lock goes.
        f(unsafe { &mut *self.cells[index].get() })
    }
    fn each(&mut self, mut f: impl FnMut(usize, &mut Slot<V>)) {
        for index in 0..self.cells.len() {
            self.with(index, |slot| f(index, slot));
        }
    }
    fn any(&mut self, mut f: impl FnMut(&mut Slot<V>) -> bool) -> bool {
        (0..self.cells.len()).any(|index| self.with(index, &mut f))
    }
    fn tear_down_ended(&mut self, _scrubbing: &mut VecDeque<Scrub>) -> Option<bool> {
        None
    }
}

/// Drains the requests of vCPU `index` before it enters the guest: drops stale nested
/// translations, injects what is due, asks for an interrupt-window exit when the guest cannot
/// take it yet. Costs one load when nothing was requested. Returns the requests it took
/// that the caller acts on ([`request::TIMERS`]).
#[inline(always)]
fn prepare_entry<V: VirtualCpu>(domain: &mut Domain, index: usize, vcpu: &mut V) -> u32 {
    if !domain.vcpus[index].requests.due_before_entry() {
        return 0;
    }
    drain_requests(domain, index, vcpu)
}

/// [`prepare_entry`] when something was requested.
#[inline(never)]
fn drain_requests<V: VirtualCpu>(domain: &mut Domain, index: usize, vcpu: &mut V) -> u32 {
    // RESCHEDULE only kicks: the state it is about is looked at after every exit.
    const HERE: u32 = request::BEFORE_ENTRY;
    let all = domain.vcpus[index].requests.take_all();
    // One test for the rare ones (a flush, a request drained elsewhere).
    if all & !(request::EVENT | request::TIMERS | request::EVENT_AFTER_EXIT) != 0 {
        drain_rare_requests(domain, index, vcpu, all);
    }
    let taken = all & HERE;
    if taken & (request::EVENT | request::EVENT_AFTER_EXIT) == 0 {
        return taken;
    }
    // `deliverable_interrupt`, and forgetting a possible upcall once the guest's flag shows
    // none is pending, in one: the upcall flags are read from guest memory once, and only
    // when either needs them.
    let state = &domain.vcpus[index];
    let (vector, from_apic) = match state.vlapic.deliverable_vector() {
        Some(vector) => (vector, true),
        None => {
            let maybe_pending = state.requests.upcall_maybe_pending();
            if state.upcall_vector == 0 && !maybe_pending {
                return taken;
            }
            match domain.events.upcall_flags(&domain.memory, index) {
                Ok((true, false)) if state.upcall_vector != 0 => (state.upcall_vector, false),
                flags => {
                    // Forget a possible upcall once the guest's flag shows none is pending.
                    if maybe_pending && matches!(flags, Ok((false, _))) {
                        state.requests.set_upcall_maybe_pending(false);
                    }
                    return taken;
                }
            }
        }
    };
    let state = &mut domain.vcpus[index];
    if vcpu.interrupt_window_open() {
        vcpu.inject_interrupt(vector);
        trace::inject(domain.id, vector);
        if from_apic {
            if state.vlapic.acknowledge_needs_advance(vector) {
                let tsc = read_tsc();
                state.vlapic.advance(domain.time.ns_at(tsc), tsc);
            }
            state.vlapic.acknowledge(vector);
        }
        // Injected another way (after HLT, say): a window exit asked for earlier would only
        // cost an exit now.
        if state.window_requested {
            vcpu.set_interrupt_window_exiting(false);
            state.window_requested = false;
        }
        // Look again once the guest ran: more may be due (the upcall handler clears its
        // flag). Not before this entry: the upcall flag still shows the one just injected,
        // and a window asked for then would cost an exit per upcall.
        state.requests.look_again_after_exit();
    } else if !state.window_requested {
        vcpu.set_interrupt_window_exiting(true);
        state.window_requested = true;
    }
    taken
}

/// The rare part of [`drain_requests`] (flushes, requests drained elsewhere), out of line so
/// that its frame (a page list) is not the common path's.
#[cold]
#[inline(never)]
fn drain_rare_requests<V: VirtualCpu>(domain: &mut Domain, index: usize, vcpu: &mut V, all: u32) {
    if all & !request::BEFORE_ENTRY != 0 {
        // Drained elsewhere (START at schedule-in, WAKE_CHECK while it waits): put back.
        domain.vcpus[index]
            .requests
            .make(all & !request::BEFORE_ENTRY);
    }
    if all & request::NESTED_FLUSH != 0 {
        // A grant mapping went away or changed (docs/abi.md 16): no stale translation
        // may survive into the guest.
        vcpu.invalidate_nested_translations();
    }
    if all & request::TLB_FLUSH != 0 {
        // A sibling's flush_tlb named this vCPU (docs/abi.md 11): it was not running
        // then, or was kicked out; either way nothing it cached before that call
        // survives: the pages listed, or everything.
        match domain.vcpus[index].pending_tlb_flush.take() {
            Some((pages, count)) => vcpu.flush_guest_tlb_pages(&pages[..count]),
            None => vcpu.flush_guest_tlb(),
        }
    }
}

/// The domains as every physical CPU's run loop shares them: the table, behind a
/// readers-writer lock, and a lock per domain for the CPUs that hold the table shared. No
/// lock is held while a guest runs (every lock and its order: [`crate::common::sched::locking`]).
pub struct Machine<'a, V> {
    table: TableLock<Table<'a, V>>,
    /// A lock per domain, by slot.
    locks: Vec<DomainLock>,
    /// How many CPUs run [`Machine::run_cpu`].
    cpus_online: core::sync::atomic::AtomicUsize,
}

struct Table<'a, V> {
    /// Every domain: all of them at once with the table exclusive ([`Table::slots`]), one
    /// under its [`DomainLock`] with the table shared ([`SharedHold`]).
    cells: &'a [UnsafeCell<Slot<V>>],
    /// The domain id of each slot (fixed at boot), read without the slot's lock.
    ids: Vec<u32>,
    /// The scheduler's state: its lock is the run queue's.
    queue: spin::Mutex<RunQueue>,
    /// The vCPUs a request was made of while off the CPU (atomic: no lock).
    attention: Arc<Attention>,
}

/// The scheduler's state beside the domains: what is ready and what is due next, kept up to
/// date where it changes, so that a pass looks only at the vCPUs something happened to
/// (a request made of them, a deadline passed) and costs O(log n) in the number of vCPUs,
/// not a look at every domain. The vCPU states in the domains stay the truth; this mirrors
/// them (`check_queue` asserts it in the host tests).
struct RunQueue {
    /// Every vCPU of every domain by unit number: (slot, vCPU).
    units: Vec<(usize, usize)>,
    /// The unit number of each slot's vCPU 0 (its others follow).
    first_unit: Vec<usize>,
    /// The ready vCPUs, in their home CPU's set by boost class and virtual run time.
    ready: CpuRunQueues,
    /// The vCPUs of runnable, unpaused domains with something due that are not ready (a
    /// ready vCPU's timers run when it is scheduled in), by when.
    due: UnitHeap<u64>,
    /// The waiting ones among them: their deadlines end other vCPUs' slices.
    wake_due: UnitHeap<u64>,
    /// Slots whose domain was seen ended and is not torn down yet (listed once each).
    ended: Vec<usize>,
    listed_ended: Vec<bool>,
    /// Slots whose domain was seen paused (listed once each; some may be unpaused since).
    paused: Vec<usize>,
    listed_paused: Vec<bool>,
    /// Slots whose domain was seen ended, and how many were not.
    counted_out: Vec<bool>,
    live: usize,
    /// RAM of torn-down domains, scrubbed and returned a slice per pass.
    scrubbing: VecDeque<Scrub>,
}

impl RunQueue {
    /// The queue of the vCPUs of `slots`, each told to report its requests to it, and each
    /// marked so that the first pass looks at all of them once.
    fn new<V>(slots: &[Slot<V>], attention: &Arc<Attention>) -> Self {
        let units: Vec<(usize, usize)> = slots
            .iter()
            .enumerate()
            .flat_map(|(s, slot)| (0..slot.domain.vcpus.len()).map(move |v| (s, v)))
            .collect();
        let mut first_unit = Vec::with_capacity(slots.len());
        let mut next = 0;
        for slot in slots {
            first_unit.push(next);
            next += slot.domain.vcpus.len();
        }
        for (unit, &(s, v)) in units.iter().enumerate() {
            slots[s].domain.vcpus[v]
                .requests
                .watch(attention, unit as u32);
        }
        let count = units.len();
        RunQueue {
            first_unit,
            ready: CpuRunQueues::new(count),
            due: UnitHeap::new(count),
            wake_due: UnitHeap::new(count),
            ended: Vec::with_capacity(slots.len()),
            listed_ended: alloc::vec![false; slots.len()],
            paused: Vec::with_capacity(slots.len()),
            listed_paused: alloc::vec![false; slots.len()],
            counted_out: alloc::vec![false; slots.len()],
            live: slots.len(),
            units,
            scrubbing: VecDeque::new(),
        }
    }

    /// The unit number of vCPU `vcpu` of slot `index`.
    fn unit_of(&self, (index, vcpu): (usize, usize)) -> Option<usize> {
        Some(self.first_unit.get(index)? + vcpu)
    }

    /// Brings what the queue holds of `unit`, vCPU `vcpu` of `slot` (slot number `index`),
    /// up to date with its state. Inlined: it runs for every vCPU a pass looks at.
    #[inline(always)]
    fn sync<V>(&mut self, unit: usize, index: usize, slot: &Slot<V>, vcpu: usize) {
        let domain = &slot.domain;
        let (Some(state), true, false) =
            (domain.vcpus.get(vcpu), domain.is_runnable(), domain.paused)
        else {
            self.sync_stopped(unit, index, slot);
            return;
        };
        let waiting = state.wait != Wait::None;
        let deadline = vcpu_deadline(domain, vcpu);
        // `is_ready`, the domain's part known already.
        let ready = !waiting && state.up && matches!(slot.vcpus.get(vcpu), Some(Some(_)));
        // A ready vCPU's timers are run when it is scheduled in (`update`): a pass that fired
        // them meanwhile would only raise events it cannot see yet, at the running vCPU's
        // cost (beside `resource-hog`, whose 50 us timers came due in most of the
        // neighbour's round trips, 10 us each under Bochs).
        self.due.set(unit, deadline.filter(|_| !ready));
        self.wake_due.set(unit, deadline.filter(|_| waiting));
        if ready {
            let ready = Ready {
                vruntime: state.vruntime,
                boosted: state.boosted,
                affinity: domain.affinity,
                weight: domain.weight,
            };
            self.ready.insert(unit, ready);
        } else {
            self.ready.remove(unit);
        }
    }

    /// [`Self::sync`] for a vCPU whose domain ended or is paused: in no set; the domain
    /// listed for teardown or for [`stop_unpausable_in`].
    #[cold]
    fn sync_stopped<V>(&mut self, unit: usize, index: usize, slot: &Slot<V>) {
        let domain = &slot.domain;
        if !domain.is_runnable() {
            if !core::mem::replace(&mut self.counted_out[index], true) {
                self.live -= 1;
            }
            if !domain.torn_down && !core::mem::replace(&mut self.listed_ended[index], true) {
                self.ended.push(index);
            }
        } else if domain.paused && !core::mem::replace(&mut self.listed_paused[index], true) {
            self.paused.push(index);
        }
        self.ready.remove(unit);
        self.due.remove(unit);
        self.wake_due.remove(unit);
    }

    /// Lets go of the ended domains listed (they are torn down, or listed again when their
    /// last vCPU comes back).
    fn forget_ended(&mut self) {
        for index in self.ended.drain(..) {
            self.listed_ended[index] = false;
        }
    }
}

/// Looks at the vCPU this CPU put back (`back`), every vCPU a request was made of since the
/// last pass (`attention`), and every vCPU with something due by `now`: fires its timers, ends its wait if it is over, and
/// brings the queue up to date with it. What a look makes happen (a wake-up's own request, a
/// domain ended) is looked at in turn.
///
/// With one CPU (`!shared`) the mark a vCPU got while it was looked at (its timer raised its
/// VIRQ) is dropped: nothing else can have changed it since. With several, another CPU may
/// have, after the look read its state: the mark stays.
fn look_at_marked<V: VirtualCpu, S: Slots<V> + ?Sized>(
    slots: &mut S,
    queue: &mut RunQueue,
    attention: &Attention,
    back: Option<(usize, usize)>,
    shared: bool,
    now: u64,
) {
    let mut look = |unit: usize, (index, vcpu): (usize, usize), queue: &mut RunQueue| {
        slots.with(index, |slot| {
            update(slot, vcpu, now);
            queue.sync(unit, index, slot, vcpu);
        });
        if !shared {
            attention.unmark(unit);
        }
    };
    if let Some((index, vcpu)) = back
        && let Some(unit) = queue.unit_of((index, vcpu))
    {
        look(unit, (index, vcpu), queue);
    }
    while let Some((unit, due)) = queue.due.peek()
        && due <= now
    {
        queue.due.remove(unit);
        if let Some(&place) = queue.units.get(unit) {
            look(unit, place, queue);
        }
    }
    while attention.drain(|unit| {
        if let Some(&place) = queue.units.get(unit) {
            look(unit, place, queue);
        }
    }) {}
}

/// Whether some listed paused domain is still paused (dropping those that are not): only
/// then can [`stop_unpausable_in`] have anything to stop.
fn any_paused<V, S: Slots<V> + ?Sized>(slots: &mut S, queue: &mut RunQueue) -> bool {
    let RunQueue {
        paused,
        listed_paused,
        ..
    } = queue;
    paused.retain(|&index| {
        let still = slots.with(index, |s| s.domain.is_runnable() && s.domain.paused);
        if !still {
            listed_paused[index] = false;
        }
        still
    });
    !paused.is_empty()
}

/// Asserts that the queue mirrors the vCPU states: each vCPU is in the ready set exactly
/// when [`is_ready`] holds, with its state, and has its deadlines in the heaps.
#[cfg(all(test, debug_assertions))]
fn check_queue<V, S: Slots<V> + ?Sized>(slots: &mut S, queue: &RunQueue) {
    for (unit, &(index, vcpu)) in queue.units.iter().enumerate() {
        slots.with(index, |slot| {
            let domain = &slot.domain;
            let ready = queue.ready.get(unit);
            assert_eq!(
                ready.is_some(),
                is_ready(slot, vcpu),
                "d{} vCPU {vcpu}: in the ready set exactly when ready",
                domain.id
            );
            if let Some(ready) = ready {
                let state = &domain.vcpus[vcpu];
                assert_eq!(
                    (ready.vruntime, ready.boosted),
                    (state.vruntime, state.boosted),
                    "d{} vCPU {vcpu}",
                    domain.id
                );
            }
            if domain.is_runnable() && !domain.paused {
                let deadline = vcpu_deadline(domain, vcpu);
                assert_eq!(
                    queue.due.key(unit),
                    deadline.filter(|_| ready.is_none()),
                    "d{} vCPU {vcpu}",
                    domain.id
                );
                let waiting = domain.vcpus[vcpu].wait != Wait::None;
                assert_eq!(
                    queue.wake_due.key(unit),
                    deadline.filter(|_| waiting),
                    "d{} vCPU {vcpu}",
                    domain.id
                );
            } else {
                assert_eq!(queue.due.key(unit), None);
            }
        });
    }
    assert_eq!(
        queue.live,
        (0..queue.first_unit.len())
            .filter(|&i| slots.with(i, |s| s.domain.is_runnable()))
            .count()
    );
}

impl<V> Table<'_, V> {
    /// Every slot, for the holder of the table exclusive.
    fn slots(&mut self) -> &mut [Slot<V>] {
        let first = UnsafeCell::raw_get(self.cells.as_ptr());
        // SAFETY: `&mut self` is the table exclusive (or the machine not yet shared): no CPU
        // holds it shared, and domain locks are only taken with it shared, so nothing else
        // refers to any slot while this borrow lives. `UnsafeCell<T>` has the layout of `T`,
        // so the cells are `len` slots in a row, all inside cells.
        unsafe { core::slice::from_raw_parts_mut(first, self.cells.len()) }
    }

    /// Every slot and the run queue, for the holder of the table exclusive.
    fn split(&mut self) -> (&mut [Slot<V>], &mut RunQueue, &Attention) {
        let first = UnsafeCell::raw_get(self.cells.as_ptr());
        // SAFETY: as in `slots`; the slots are borrowed for as long as `self` is.
        let slots = unsafe { core::slice::from_raw_parts_mut(first, self.cells.len()) };
        (slots, self.queue.get_mut(), &self.attention)
    }

    /// The slot of domain `id`.
    fn index_of(&self, id: u32) -> Option<usize> {
        self.ids.iter().position(|&i| i == id)
    }
}

/// The table shared, the running domain's lock and, after a back-off, one peer's taken
/// before it in domain order ([`Machine::hold_in_order`]): what an exit that stays in its
/// domain or reaches others one at a time ([`LockedPeers`]) is handled under.
struct SharedHold<'m, 'a, V> {
    // Dropped in this order: the domain locks go before the table does.
    peer: Option<(usize, locking::DomainGuard<'m>)>,
    _own: locking::DomainGuard<'m>,
    index: usize,
    table: spin::RwLockReadGuard<'m, Table<'a, V>>,
}

impl<V> SharedHold<'_, '_, V> {
    /// The running domain's slot.
    fn own(&mut self) -> &mut Slot<V> {
        // SAFETY: the table is held shared (no CPU has it exclusive) and this slot's domain
        // lock is held (no other CPU reaches the slot); the borrow is tied to `self`.
        unsafe { &mut *self.table.cells[self.index].get() }
    }
}

/// What a CPU holds while it handles an exit of its vCPU or drains its requests.
enum Hold<'m, 'a, V> {
    Exclusive(spin::RwLockWriteGuard<'m, Table<'a, V>>),
    Shared(SharedHold<'m, 'a, V>),
}

impl<V> Hold<'_, '_, V> {
    /// The slot of the running domain (`index`).
    fn own(&mut self, index: usize) -> &mut Slot<V> {
        match self {
            Hold::Exclusive(table) => &mut table.slots()[index],
            Hold::Shared(held) => held.own(),
        }
    }
}

/// What an exit that reaches other domains could not take without waiting against the lock
/// order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wanted {
    /// The lock of the domain in this slot, which comes before the running domain's.
    Peer(usize),
    /// The table exclusive (a multicall entry that may reach any domain).
    Table,
}

/// The other domains as an exit handled with the table shared reaches them: each locked when
/// first asked for, at most one at a time (the one held before is let go). A domain after
/// the running one in the table is waited for; one before it is tried once, and when busy
/// the call stops ([`DomainTable::busy`]) and [`Machine::handle_locked`] takes the two in
/// domain order and makes the call again. So no CPU waits for a lock while it holds one that
/// comes after it.
struct LockedPeers<'h, 'a, V> {
    table: &'h Table<'a, V>,
    locks: &'h [DomainLock],
    /// The running domain's slot (its lock is held: [`SharedHold`]).
    own: usize,
    peer: Option<(usize, locking::DomainGuard<'h>)>,
    wanted: Option<Wanted>,
    kept: Option<Box<crate::common::hypercall::UnfinishedBatch>>,
}

impl<V> LockedPeers<'_, '_, V> {
    /// Locks the domain in slot `index` (not the running one), letting go of the one held
    /// before. False: it comes first and is busy (`wanted` says so).
    fn lock_slot(&mut self, index: usize) -> bool {
        if matches!(self.peer, Some((held, _)) if held == index) {
            return true;
        }
        self.peer = None;
        let guard = if may_wait_for(self.own, index) {
            Some(self.locks[index].lock_peer())
        } else {
            self.locks[index].try_lock_peer()
        };
        match guard {
            Some(guard) => {
                self.peer = Some((index, guard));
                true
            }
            None => {
                self.wanted = Some(Wanted::Peer(index));
                false
            }
        }
    }

    /// The slot of domain `id` locked, if it is another domain of the table.
    fn slot(&mut self, id: u32) -> Option<&mut Slot<V>> {
        let index = self.table.index_of(id)?;
        if index == self.own || !self.lock_slot(index) {
            return None;
        }
        // SAFETY: the table is held shared (no CPU has it exclusive) and this slot's lock is
        // held until `self.peer` changes, which needs `&mut self`, so the borrow ends first;
        // it is not the running domain's slot, which the caller borrows.
        Some(unsafe { &mut *self.table.cells[index].get() })
    }

    /// Locks the one other domain `named` for the running domain `own`, if there is one.
    /// False: it comes first in the table and is busy.
    fn lock_named(&mut self, own: &Domain, named: PeerOf) -> bool {
        let remote = match named {
            PeerOf::Port(port) => match own.events.send_target(port) {
                Ok((
                    _,
                    Binding::Interdomain {
                        remote,
                        remote_port: _,
                    },
                )) => u32::from(remote),
                // Nothing beyond the running domain (or an error the call itself returns).
                _ => return true,
            },
            PeerOf::Domain(id) => match u32::try_from(id) {
                Ok(id) => id,
                Err(_) => return true,
            },
            PeerOf::GrantSlot(gpa) => match own.grants.slot_at(gpa) {
                Some(WindowSlot::Grant { granter, .. }) => granter,
                _ => return true,
            },
        };
        match self.table.index_of(remote) {
            Some(index) if index != self.own => self.lock_slot(index),
            _ => true,
        }
    }
}

impl<V> DomainTable for LockedPeers<'_, '_, V> {
    fn get_mut(&mut self, id: u32) -> Option<&mut Domain> {
        self.slot(id).map(|slot| &mut slot.domain)
    }

    fn is_parked(&mut self, id: u32) -> bool {
        self.slot(id).is_none_or(|slot| slot.is_parked())
    }

    fn admit(&mut self, own: &Domain, nr: u64, args: &[u64; 5]) -> bool {
        match reach::of_hypercall(nr, args[0], args[1], own.id) {
            // Let the last entry's peer go: it may be what another CPU waits for.
            Reach::Own => {
                self.peer = None;
                true
            }
            Reach::OnePeer(named) => self.lock_named(own, named),
            Reach::Named => true,
            Reach::Any => {
                self.wanted = Some(Wanted::Table);
                false
            }
        }
    }

    fn busy(&self) -> bool {
        self.wanted.is_some()
    }

    fn kept(&mut self) -> Option<&mut Option<Box<crate::common::hypercall::UnfinishedBatch>>> {
        Some(&mut self.kept)
    }
}

/// The peers of the table exclusive ([`Peers`]), with the copy a `multicall` that stopped
/// with the table shared kept ([`DomainTable::kept`]).
struct Resuming<'p, V> {
    peers: Peers<'p, V>,
    kept: Option<Box<crate::common::hypercall::UnfinishedBatch>>,
}

impl<V> DomainTable for Resuming<'_, V> {
    fn get_mut(&mut self, id: u32) -> Option<&mut Domain> {
        self.peers.get_mut(id)
    }
    fn tear_down(&mut self, id: u32, caller: &mut Domain) -> bool {
        self.peers.tear_down(id, caller)
    }
    fn is_parked(&mut self, id: u32) -> bool {
        self.peers.is_parked(id)
    }
    fn kept(&mut self) -> Option<&mut Option<Box<crate::common::hypercall::UnfinishedBatch>>> {
        // It never refuses: only the copy it was given.
        self.kept.is_some().then_some(&mut self.kept)
    }
}

impl<'a, V: VirtualCpu> Machine<'a, V> {
    /// The machine of these domains, none of whose vCPUs has run.
    pub fn new(slots: &'a mut [Slot<V>]) -> Self {
        // A vCPU's unit number follows from its slot's place, so a machine built again over
        // the same slots (the fuzz harness restarts `run_all` between checkpoints) keeps the
        // set its vCPUs report to.
        let units = slots.iter().map(|s| s.domain.vcpus.len()).sum();
        let attention = slots
            .first()
            .and_then(|s| s.domain.vcpus.first())
            .and_then(|state| state.requests.watched())
            .filter(|set| set.capacity() >= units)
            .unwrap_or_else(|| Arc::new(Attention::new(units)));
        let queue = RunQueue::new(slots, &attention);
        let ids = slots.iter().map(|s| s.domain.id).collect();
        let locks = slots.iter().map(|_| DomainLock::default()).collect();
        let slots: *mut [Slot<V>] = slots;
        // SAFETY: `UnsafeCell<T>` has the layout of `T`, and the exclusive borrow of `slots`
        // for `'a` passes to the table, which hands the slots out only under its locks.
        let cells = unsafe { &*(slots as *const [UnsafeCell<Slot<V>>]) };
        Machine {
            cpus_online: core::sync::atomic::AtomicUsize::new(1),
            locks,
            table: TableLock::new(Table {
                cells,
                ids,
                queue: spin::Mutex::new(queue),
                attention,
            }),
        }
    }

    /// The table shared and the lock of the domain in slot `index`.
    fn hold_own(&self, index: usize) -> SharedHold<'_, 'a, V> {
        let table = self.table.shared();
        SharedHold {
            table,
            index,
            _own: self.locks[index].lock_own(),
            peer: None,
        }
    }

    /// The table shared and the locks of slots `index` (the running domain) and `peer`,
    /// taken in domain order, waiting for each: after a back-off ([`Self::handle_locked`]).
    fn hold_in_order(&self, index: usize, peer: usize) -> SharedHold<'_, 'a, V> {
        let table = self.table.shared();
        let (own, peer) = if peer < index {
            let peer = (peer, self.locks[peer].lock_peer());
            (self.locks[index].lock_own(), peer)
        } else {
            let own = self.locks[index].lock_own();
            (own, (peer, self.locks[peer].lock_peer()))
        };
        SharedHold {
            table,
            index,
            _own: own,
            peer: Some(peer),
        }
    }

    /// Lets `f` look at the domains (once every CPU has left [`Self::run_cpu`]: the summary).
    pub fn inspect<R>(&self, f: impl FnOnce(&[Slot<V>]) -> R) -> R {
        f(self.table.exclusive().slots())
    }

    /// Declares how many CPUs will run [`Self::run_cpu`] (1 unless told), before any does.
    pub fn set_cpus_online(&self, cpus: usize) {
        self.cpus_online
            .store(cpus.max(1), core::sync::atomic::Ordering::Relaxed);
        cpus::set_several(cpus > 1);
        // A run queue per CPU, each vCPU dealt a home among them.
        let mut table = self.table.exclusive();
        let (slots, queue, _) = table.split();
        let RunQueue { units, ready, .. } = queue;
        let homes = ready.set_cpus(cpus, |unit| {
            units
                .get(unit)
                .map_or((u64::MAX, DEFAULT_WEIGHT), |&(index, _)| {
                    (slots[index].domain.affinity, slots[index].domain.weight)
                })
        });
        for (&(index, vcpu), &home) in units.iter().zip(homes) {
            if let Some(state) = slots[index].domain.vcpus.get(vcpu) {
                state.requests.set_home_cpu(usize::from(home));
            }
        }
    }

    /// Runs this CPU's share of the vCPUs until every domain has ended and all their RAM is
    /// back.
    ///
    /// With several CPUs the scheduler's pass holds the table shared and the run queue, and
    /// reaches the domains one at a time under their locks, so that it does not stop the
    /// other CPUs' exits; it takes the table exclusive only to tear a domain down. With one
    /// CPU it holds the table exclusive (nothing else wants it).
    pub fn run_cpu<H: Host>(&self, cpu: usize, host: &mut H) {
        let shared = self.cpus_online.load(core::sync::atomic::Ordering::Relaxed) > 1;
        let mut me = ThisCpu {
            cpu: cpu.min(63),
            idle_bit: 1u64 << cpu.min(63),
            shared,
            last: None,
            yielded: None,
            named: None,
            back: None,
        };
        if !shared {
            self.run_alone(&mut me, host);
            return;
        }
        let mut exclusive = false;
        loop {
            // `now` is read once the pass may begin: time spent waiting for the other CPUs'
            // passes is nobody's slice (charged to the vCPU picked next, it skewed the
            // weights of fairness-2cpus under a loaded emulator).
            let (hold, outcome, now) = if exclusive {
                exclusive = false;
                let mut guard = self.table.exclusive();
                let now = host.now_ns();
                let (slots, queue, attention) = guard.split();
                let outcome = pass(slots, queue, attention, &mut me, host, now);
                (Hold::Exclusive(guard), outcome, now)
            } else {
                let table = self.table.shared();
                let mut queue = locking::lock_run_queue(&table.queue);
                let now = host.now_ns();
                let mut slots = LockedSlots {
                    cells: table.cells,
                    locks: &self.locks,
                };
                locking::PASSES.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                let outcome = pass(&mut slots, &mut queue, &table.attention, &mut me, host, now);
                drop(queue);
                let hold = match &outcome {
                    Pass::Run { index, .. } => Hold::Shared(SharedHold {
                        _own: self.locks[*index].lock_own(),
                        table,
                        index: *index,
                        peer: None,
                    }),
                    _ => {
                        drop(table);
                        if matches!(outcome, Pass::NeedsExclusive) {
                            exclusive = true;
                            continue;
                        }
                        if self.after_pass(outcome, &me, host) {
                            return;
                        }
                        continue;
                    }
                };
                (hold, outcome, now)
            };
            let (index, vcpu_index, mut vcpu, slice_end) = match outcome {
                Pass::Run {
                    index,
                    vcpu_index,
                    vcpu,
                    slice_end,
                } => (index, vcpu_index, vcpu, slice_end),
                outcome => {
                    drop(hold);
                    if self.after_pass(outcome, &me, host) {
                        return;
                    }
                    continue;
                }
            };
            self.run_slice(
                hold, cpu, index, vcpu_index, &mut *vcpu, host, now, slice_end,
            );
            // Any CPU may take it next.
            vcpu.release();
            // Putting it back touches its domain alone.
            let mut held = self.hold_own(index);
            let ran = host.now_ns().saturating_sub(now);
            cpus::count_slice(cpu, ran);
            put_back(held.own(), index, vcpu_index, vcpu, now, ran, &mut me);
        }
    }

    /// [`Self::run_cpu`] on a machine with one CPU: the table is held exclusive from the
    /// pass to the end of the slice (no other CPU wants it), so an exit costs what it did
    /// before SMP.
    fn run_alone<H: Host>(&self, me: &mut ThisCpu, host: &mut H) {
        // When the last slice ended: the next pass's time (one clock read per switch).
        let mut ended = None;
        loop {
            let now = ended.take().unwrap_or_else(|| host.now_ns());
            let mut guard = self.table.exclusive();
            let (slots, queue, attention) = guard.split();
            let picked = pass(slots, queue, attention, me, host, now);
            let (index, vcpu_index, mut vcpu, slice_end) = match picked {
                Pass::Run {
                    index,
                    vcpu_index,
                    vcpu,
                    slice_end,
                } => (index, vcpu_index, vcpu, slice_end),
                outcome => {
                    drop(guard);
                    if self.after_pass(outcome, me, host) {
                        return;
                    }
                    continue;
                }
            };
            let (before, rest) = guard.slots().split_at_mut(index);
            let Some((current, after)) = rest.split_first_mut() else {
                continue;
            };
            let domain = &mut current.domain;
            schedule_in(domain, vcpu_index, &mut *vcpu, host, now, slice_end, false);
            let peers = &mut Peers::around(before, after);
            // A batch preempted at the end of its last slice is finished before the guest
            // runs (out of the slice's loop, which stays as it was).
            let next = if domain.vcpus[vcpu_index].preempted_batch.is_some() {
                finish_preempted_alone(domain, vcpu_index, &mut *vcpu, peers)
            } else {
                Next::Resume
            };
            let next = if next == Next::Resume {
                run_slice_alone(domain, vcpu_index, &mut *vcpu, peers, host, slice_end)
            } else {
                next
            };
            let end = host.now_ns();
            end_slice_at(domain, vcpu_index, &mut *vcpu, next, end);
            put_back(
                current,
                index,
                vcpu_index,
                vcpu,
                now,
                end.saturating_sub(now),
                me,
            );
            ended = Some(end);
        }
    }

    /// What the CPU does after a pass that picked nothing, every lock let go: halts until
    /// `deadline` for [`Pass::Idle`], leaves for [`Pass::Done`] (returns true).
    fn after_pass<H: Host>(&self, outcome: Pass<V>, me: &ThisCpu, host: &mut H) -> bool {
        match outcome {
            Pass::Done => {
                cpus::wake_all_idle_cpus();
                true
            }
            Pass::Idle(deadline) => {
                host.arm_timer(deadline);
                trace::idle();
                host.wait_for_interrupt();
                if me.shared {
                    cpus::set_idle(me.idle_bit, false);
                }
                false
            }
            Pass::Again | Pass::NeedsExclusive | Pass::Run { .. } => false,
        }
    }

    /// Runs vCPU `vcpu_index` of slot `index`, whose hardware state `vcpu` this CPU took,
    /// until it stops being the right one to run, on a machine with several CPUs. `hold`:
    /// the table exclusive, or shared with the domain's lock. Every lock is let go while the
    /// guest runs, and each exit is handled under the locks it needs
    /// ([`Self::run_slice_shared`]).
    #[allow(clippy::too_many_arguments)]
    fn run_slice<'m, H: Host>(
        &'m self,
        mut hold: Hold<'m, 'a, V>,
        cpu: usize,
        index: usize,
        vcpu_index: usize,
        vcpu: &mut V,
        host: &mut H,
        now: u64,
        slice_end: u64,
    ) {
        let domain = &mut hold.own(index).domain;
        schedule_in(domain, vcpu_index, vcpu, host, now, slice_end, true);
        if domain.vcpus[vcpu_index].preempted_batch.is_some() {
            // A batch preempted at the end of its last slice is finished before the guest
            // runs (out of the slice's loop, which stays as it was).
            let next;
            (hold, next) = self.finish_preempted(hold, index, vcpu_index, vcpu, host);
            let domain = &mut hold.own(index).domain;
            let next = match next {
                None | Some(Next::Resume) => stopped_elsewhere(domain, vcpu_index),
                Some(next) => Some(next),
            };
            if let Some(next) = next {
                end_slice(domain, vcpu_index, vcpu, next, host);
                return;
            }
        }
        self.run_slice_shared(hold, cpu, index, vcpu_index, vcpu, host, slice_end);
    }

    /// The slice of a machine with several CPUs: every lock is let go across every entry;
    /// the exits that need nothing of the domain are handled without any, those that stay in
    /// the domain (or send to one peer) under its lock with the table shared, the rest with
    /// the table exclusive. Out of line, like [`run_slice_alone`]: each hot loop gets the
    /// registers to itself.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)] // the hot loop's state, in registers rather than a struct
    fn run_slice_shared<'m, H: Host>(
        &'m self,
        mut hold: Hold<'m, 'a, V>,
        cpu: usize,
        index: usize,
        vcpu_index: usize,
        vcpu: &mut V,
        host: &mut H,
        slice_end: u64,
    ) {
        // What the exits handled without a lock need.
        let domain = &hold.own(index).domain;
        let requests = Arc::clone(&domain.vcpus[vcpu_index].requests);
        let tsc_khz = domain.time.tsc_khz() as u32;
        let own_id = domain.id;
        let mut unmerged = ExitStats::default();
        let mut any_unmerged = false;
        let mut exited_at = None;
        let mut preemption =
            PreemptionClock::new(hold.own(index).domain.vcpus[vcpu_index].slice_end_tsc);
        loop {
            let domain = &mut hold.own(index).domain;
            if exited_at.is_some() && preemption.over(read_tsc()) {
                end_slice(domain, vcpu_index, vcpu, Next::Yield, host);
                return;
            }
            if prepare_entry(domain, vcpu_index, vcpu) & request::TIMERS != 0 {
                arm_host_timer(domain, host, slice_end, slice_end);
            }
            if let Some(exited_at) = exited_at.take() {
                let now = read_tsc();
                let handled = now.wrapping_sub(exited_at);
                domain.vcpus[vcpu_index].stats.handling_tsc += handled;
                preemption.count(vcpu, handled, now);
            } else {
                // The slice's first entry (or one after a request's drain): what the
                // hypervisor did since the deadline was set is not the guest's time.
                vcpu.reload_preemption_deadline();
            }
            drop(hold);
            // None: a request came before the entry; it is drained under the lock.
            let (exit, handled) = loop {
                if !requests.enter_guest(cpu) {
                    break (None, true);
                }
                let exit = vcpu.run();
                requests.left_guest();
                let exited_at_tsc = read_tsc();
                exited_at = Some(exited_at_tsc);
                let handled =
                    handle_without_lock(&mut unmerged, &requests, vcpu_index, vcpu, &exit, tsc_khz);
                any_unmerged |= handled;
                if !handled || requests.due_before_entry() {
                    break (Some(exit), handled);
                }
                let now = read_tsc();
                unmerged.handling_tsc += now.wrapping_sub(exited_at_tsc);
                if preemption.count_quick(vcpu, now) {
                    // The slice is over: ended at the top of the loop.
                    break (None, true);
                }
            };
            let (exit, reach) = match exit {
                Some(exit) if !handled => {
                    let reach = reach::of_exit(&exit, vcpu, own_id);
                    (Some(exit), reach)
                }
                _ => (None, Reach::Own),
            };
            hold = match reach {
                Reach::Any => {
                    locking::EXITS_EXCLUSIVE.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                    Hold::Exclusive(self.table.exclusive())
                }
                Reach::Own | Reach::OnePeer(_) | Reach::Named => Hold::Shared(self.hold_own(index)),
            };
            if any_unmerged {
                any_unmerged = false;
                hold.own(index).domain.vcpus[vcpu_index]
                    .stats
                    .absorb(&mut unmerged);
            }
            let Some(exit) = exit else {
                // Handled, or a request came: to its drain under the lock.
                let domain = &mut hold.own(index).domain;
                if let Some(next) = stopped_elsewhere(domain, vcpu_index) {
                    end_slice(domain, vcpu_index, vcpu, next, host);
                    return;
                }
                continue;
            };
            locking::exit_begins();
            // Most exits: nothing beyond their own domain, which is held (in place: no move
            // of the hold on the hot path).
            let next = if let (Reach::Own, Hold::Shared(held)) = (reach, &mut hold) {
                let domain = &mut held.own().domain;
                dispatch_exit(domain, vcpu_index, vcpu, exit, &mut NoPeers, host)
            } else {
                let next;
                (hold, next) = self.handle_reaching(
                    hold,
                    index,
                    vcpu_index,
                    vcpu,
                    Pending::Exit(exit),
                    reach,
                    host,
                );
                next
            };
            locking::exit_ends();
            let domain = &mut hold.own(index).domain;
            // Another CPU may have ended or paused the domain, or taken this vCPU down, while
            // it ran (and kicked it out of the guest).
            let next = match next {
                Next::Resume => match stopped_elsewhere(domain, vcpu_index) {
                    None => continue,
                    Some(next) => next,
                },
                next => next,
            };
            end_slice(domain, vcpu_index, vcpu, next, host);
            return;
        }
    }

    /// Handles `exit` of vCPU `vcpu_index` of slot `index`, which `reach` says what it may
    /// reach, under `hold` (the table exclusive for [`Reach::Any`], otherwise shared with the
    /// domain's lock); returns what it was handled under at the end and what the vCPU does
    /// next. Other domains are locked one at a time as the call reaches them
    /// ([`LockedPeers`]). When one that comes before the running domain is busy, the call
    /// stops before it acts (a `multicall` before the entry, keeping its copy of the batch),
    /// every lock is let go and the two are taken in domain order, and the call is made again
    /// from where it stopped; after two such back-offs, or for an entry that may reach any
    /// domain, with the table exclusive. Bounded: each try ends in at most one back-off.
    /// (The run loop, `run_slice_shared`, does the same with the fast path written in place.)
    #[cfg(test)]
    #[allow(clippy::too_many_arguments)]
    fn handle_locked<'m, H: Host>(
        &'m self,
        mut hold: Hold<'m, 'a, V>,
        index: usize,
        vcpu_index: usize,
        vcpu: &mut V,
        exit: VmExit,
        reach: Reach,
        host: &mut H,
    ) -> (Hold<'m, 'a, V>, Next) {
        // Most exits: nothing beyond their own domain, which is held.
        if let (Reach::Own, Hold::Shared(held)) = (reach, &mut hold) {
            let domain = &mut held.own().domain;
            let next = dispatch_exit(domain, vcpu_index, vcpu, exit, &mut NoPeers, host);
            return (hold, next);
        }
        self.handle_reaching(
            hold,
            index,
            vcpu_index,
            vcpu,
            Pending::Exit(exit),
            reach,
            host,
        )
    }

    /// Finishes the `multicall` vCPU `vcpu_index` of slot `index` was preempted in
    /// ([`crate::common::hypercall::finish_preempted`]) under the locks its exit would be
    /// handled under (classified from its registers, which still hold the call, as
    /// `run_slice_shared` classifies an exit), before the vCPU runs guest code. `hold`: what
    /// the slice began under. `None`: it had no such batch.
    #[cold]
    #[inline(never)]
    fn finish_preempted<'m, H: Host>(
        &'m self,
        mut hold: Hold<'m, 'a, V>,
        index: usize,
        vcpu_index: usize,
        vcpu: &mut V,
        host: &mut H,
    ) -> (Hold<'m, 'a, V>, Option<Next>) {
        let own_id = hold.own(index).domain.id;
        let reach = reach::of_exit(&VmExit::Hypercall, vcpu, own_id);
        let domain = &mut hold.own(index).domain;
        if !crate::common::hypercall::has_preempted_batch(domain, vcpu_index, vcpu) {
            return (hold, None);
        }
        if let (Reach::Any, Hold::Shared(_)) = (reach, &hold) {
            drop(hold);
            locking::EXITS_EXCLUSIVE.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            hold = Hold::Exclusive(self.table.exclusive());
        }
        let began = read_tsc();
        locking::exit_begins();
        let (mut hold, next) = self.handle_reaching(
            hold,
            index,
            vcpu_index,
            vcpu,
            Pending::Preempted,
            reach,
            host,
        );
        locking::exit_ends();
        preempted_batch_took(&mut hold.own(index).domain, vcpu_index, vcpu, began);
        (hold, Some(next))
    }

    /// [`Self::handle_locked`] for an exit that may reach other domains, out of line, or
    /// for a batch preempted at the end of its last slice ([`Pending::Preempted`],
    /// [`Self::finish_preempted`]).
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn handle_reaching<'m, H: Host>(
        &'m self,
        mut hold: Hold<'m, 'a, V>,
        index: usize,
        vcpu_index: usize,
        vcpu: &mut V,
        mut pending: Pending,
        reach: Reach,
        host: &mut H,
    ) -> (Hold<'m, 'a, V>, Next) {
        // Taken when first handled; after that the call is made again (`finish`).
        let named = match reach {
            Reach::OnePeer(named) => Some(named),
            _ => None,
        };
        let mut kept = None;
        let mut backed_off = 0;
        loop {
            let (next, wanted) = match &mut hold {
                Hold::Exclusive(table) => {
                    let (before, rest) = table.slots().split_at_mut(index);
                    let Some((current, after)) = rest.split_first_mut() else {
                        return (hold, Next::Stop);
                    };
                    let peers = &mut Resuming {
                        peers: Peers::around(before, after),
                        kept: kept.take(),
                    };
                    let domain = &mut current.domain;
                    let next = match core::mem::replace(&mut pending, Pending::Again) {
                        Pending::Exit(exit) => {
                            dispatch_exit(domain, vcpu_index, vcpu, exit, peers, host)
                        }
                        Pending::Preempted => preempted(domain, vcpu_index, vcpu, peers),
                        Pending::Again => {
                            crate::common::hypercall::finish(domain, vcpu_index, vcpu, peers)
                        }
                    };
                    (next, None)
                }
                Hold::Shared(held) => {
                    let peer = held.peer.take();
                    let table: &Table<'a, V> = &held.table;
                    // SAFETY: the table is held shared and this slot's lock is held (`held`);
                    // `peers` hands out only other slots, so the borrows do not alias.
                    let own = unsafe { &mut *table.cells[index].get() };
                    let mut peers = LockedPeers {
                        table,
                        locks: &self.locks,
                        own: index,
                        peer,
                        wanted: None,
                        kept: kept.take(),
                    };
                    let domain = &mut own.domain;
                    let next = match named {
                        // Not yet dispatched, and its one peer busy: nothing done.
                        Some(named)
                            if matches!(pending, Pending::Exit(_))
                                && !peers.lock_named(domain, named) =>
                        {
                            Next::Again
                        }
                        _ => match core::mem::replace(&mut pending, Pending::Again) {
                            Pending::Exit(exit) => {
                                dispatch_exit(domain, vcpu_index, vcpu, exit, &mut peers, host)
                            }
                            Pending::Preempted => preempted(domain, vcpu_index, vcpu, &mut peers),
                            Pending::Again => crate::common::hypercall::finish(
                                domain, vcpu_index, vcpu, &mut peers,
                            ),
                        },
                    };
                    kept = peers.kept.take();
                    (next, peers.wanted)
                }
            };
            let Some(wanted) = wanted else {
                return (hold, next);
            };
            drop(hold);
            use core::sync::atomic::Ordering::Relaxed;
            if let Wanted::Peer(_) = wanted {
                locking::BACKED_OFF.fetch_add(1, Relaxed);
                backed_off += 1;
            }
            hold = match wanted {
                Wanted::Peer(peer) if backed_off <= 2 => {
                    Hold::Shared(self.hold_in_order(index, peer))
                }
                _ => {
                    locking::EXITS_EXCLUSIVE.fetch_add(1, Relaxed);
                    if backed_off > 2 {
                        locking::EXITS_EXCLUSIVE_AFTER_BACK_OFF.fetch_add(1, Relaxed);
                    }
                    Hold::Exclusive(self.table.exclusive())
                }
            };
        }
    }
}

/// What [`Machine::handle_reaching`] is to handle.
enum Pending {
    /// An exit, not yet handled.
    Exit(VmExit),
    /// The batch the vCPU was preempted in ([`crate::common::hypercall::finish_preempted`]).
    Preempted,
    /// A call that stopped before it acted, made again ([`crate::common::hypercall::finish`]).
    Again,
}

/// Finishes the batch vCPU `vcpu_index` was preempted in, on a machine with one CPU (`peers`:
/// the table exclusive); what the vCPU does next.
#[cold]
#[inline(never)]
fn finish_preempted_alone<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    peers: &mut Peers<'_, V>,
) -> Next {
    let began = read_tsc();
    let next = preempted(domain, vcpu_index, vcpu, peers);
    preempted_batch_took(domain, vcpu_index, vcpu, began);
    next
}

/// Finishing a preempted batch took the hypervisor from TSC `began` to now: counted as the
/// handling of an exit, and taken off the slice's VMX-preemption timer (which counts guest
/// time only, `PreemptionClock`).
fn preempted_batch_took<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    began: u64,
) {
    domain.vcpus[vcpu_index].stats.handling_tsc += read_tsc().wrapping_sub(began);
    vcpu.reload_preemption_deadline();
}

/// Finishes the batch vCPU `vcpu_index` was preempted in; a batch gone meanwhile leaves the
/// vCPU to run on.
fn preempted<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    peers: &mut dyn DomainTable,
) -> Next {
    crate::common::hypercall::finish_preempted(domain, vcpu_index, vcpu, peers)
        .unwrap_or(Next::Resume)
}

/// vCPU `vcpu_index` of slot `index` comes back into `slot` (its hardware state, `vcpu`)
/// after a slice that began at `now` and lasted `ran` ns: its CPU time and virtual run time
/// are counted.
#[inline(always)]
fn put_back<V>(
    slot: &mut Slot<V>,
    index: usize,
    vcpu_index: usize,
    vcpu: Box<V>,
    now: u64,
    ran: u64,
    me: &mut ThisCpu,
) {
    trace::vcpu_out(slot.domain.id);
    slot.vcpus[vcpu_index] = Some(vcpu);
    let weight = slot.domain.weight;
    let domain = &mut slot.domain;
    let state = &mut domain.vcpus[vcpu_index];
    state.cpu_ns += ran;
    state.running_since = None;
    state.vruntime += ran * u64::from(DEFAULT_WEIGHT) / u64::from(weight);
    if me.shared {
        // Back in the pool, where any CPU may take it: preempted or yielding, it waits as
        // runnable from now (its steal time, docs/abi.md 9.2). On one CPU it stays running
        // until another vCPU takes the CPU (`last`), which saves two writes of the area when
        // it runs on; here another CPU may already be running it by then.
        if domain.state == DomainState::Runnable && state.runstate.state() == runstate::RUNNING {
            let _ = state
                .runstate
                .enter(runstate::RUNNABLE, now + ran, &domain.memory);
        }
        me.last = None;
    }
    // A yield (docs/abi.md 3.3) lets the others go first at the next pick.
    me.yielded = core::mem::take(&mut state.yielded).then_some((index, vcpu_index));
    // This CPU's next pass looks at it (`ThisCpu::back`).
    state.requests.set_off_cpu(true);
    me.back = Some((index, vcpu_index));
    // A sibling its yield_to named runs next (docs/abi.md 3.3).
    me.named = domain
        .vcpus
        .iter()
        .position(|state| state.yielded_to)
        .map(|sibling| (index, sibling));
}

/// What the run loop of one CPU remembers between passes.
struct ThisCpu {
    /// Its number.
    cpu: usize,
    /// Its bit (idle CPUs, affinities).
    idle_bit: u64,
    /// Several CPUs run vCPUs.
    shared: bool,
    /// The vCPU this CPU ran last, which may still be RUNNING in its run-state area.
    last: Option<(usize, usize)>,
    /// The vCPU this CPU ran last, if it yielded.
    yielded: Option<(usize, usize)>,
    /// The sibling the vCPU this CPU ran last named in a yield_to.
    named: Option<(usize, usize)>,
    /// The vCPU this CPU put back after its slice, for the next pass to look at.
    back: Option<(usize, usize)>,
}

/// What a pass of the scheduler decided.
enum Pass<V> {
    /// Run this vCPU, whose hardware state the pass took out of its slot, until `slice_end`.
    Run {
        index: usize,
        vcpu_index: usize,
        vcpu: Box<V>,
        slice_end: u64,
    },
    /// Nothing to run: halt until this deadline (the CPU is already marked idle).
    Idle(Option<u64>),
    /// Pass again at once.
    Again,
    /// Every domain ended and all their RAM is back.
    Done,
    /// A domain must be torn down: pass again with the table exclusive.
    NeedsExclusive,
}

/// One pass of the scheduler on this CPU at time `now`: timers and waits of every domain,
/// teardowns, a scrub slice, and the choice of the vCPU to run.
#[inline(always)]
fn pass<V: VirtualCpu, S: Slots<V> + ?Sized, H: Host>(
    slots: &mut S,
    queue: &mut RunQueue,
    attention: &Attention,
    me: &mut ThisCpu,
    host: &mut H,
    now: u64,
) -> Pass<V> {
    // Whatever a waker does after this is seen below or kicks this CPU out of its halt.
    let wakes = if me.shared { cpus::wake_count() } else { 0 };
    let host_work = host.housekeeping();
    // Serial input belongs to the first domain, as the console of a PC belongs to its OS
    // (so only that domain can be woken by it). Its lock is taken only when a byte came.
    if let Some(byte) = host.console_input() {
        slots.any(|first| {
            if !first.domain.is_runnable() {
                return false;
            }
            first.domain.receive_console_input(byte);
            while let Some(byte) = host.console_input() {
                first.domain.receive_console_input(byte);
            }
            true
        });
    }
    if !me.shared
        && let Some(run) = switch_directly(slots, queue, attention, me, now)
    {
        return run;
    }
    look_at_marked(slots, queue, attention, me.back.take(), me.shared, now);
    // A teardown can wake other domains, or leave them waiting for nothing (which ends
    // them, to be torn down in turn).
    while !queue.ended.is_empty() {
        match slots.tear_down_ended(&mut queue.scrubbing) {
            Some(any) => {
                queue.forget_ended();
                if !any {
                    break;
                }
                look_at_marked(slots, queue, attention, None, me.shared, now);
            }
            None => {
                let ended = queue.ended.iter().any(|&index| {
                    slots.with(index, |s| {
                        !s.domain.is_runnable() && !s.domain.torn_down && s.is_parked()
                    })
                });
                if ended {
                    return Pass::NeedsExclusive;
                }
                queue.forget_ended();
                break;
            }
        }
    }
    if queue.live == 0 {
        queue.scrubbing.drain(..).for_each(Scrub::finish);
        return Pass::Done;
    }
    if let Some(scrub) = queue.scrubbing.front_mut()
        && scrub.step()
    {
        queue.scrubbing.pop_front();
    }
    // (Not in release builds of the tests, which profile the pass.)
    #[cfg(all(test, debug_assertions))]
    check_queue(slots, queue);
    let yielder = me.yielded.take().and_then(|unit| queue.unit_of(unit));
    let named = me.named.take().and_then(|unit| queue.unit_of(unit));
    let picked = match named {
        // A sibling's yield_to (docs/abi.md 3.3): next, whatever the others had, if it is
        // still ready.
        Some(unit) if queue.ready.may_run(unit, me.cpu) => {
            queue.ready.move_to(unit, me.cpu);
            Some(ready::Picked { unit, floor: None })
        }
        _ => queue.ready.pick(me.cpu, yielder),
    };
    let Some(picked) = picked else {
        // Only an idle CPU polls the UART for the first domain's input.
        let mut input_wakes = false;
        slots.any(|first| {
            if !first.domain.is_runnable() {
                return false;
            }
            input_wakes = first.domain.console_input_can_wake();
            true
        });
        let poll = input_wakes.then_some(now + CONSOLE_POLL_NS);
        let deadline = poll
            .into_iter()
            .chain(host_work)
            .chain(queue.due.peek().map(|(_, due)| due))
            .min();
        let stopped = any_paused(slots, queue) && stop_unpausable_in(slots, deadline.is_none());
        if stopped || !queue.scrubbing.is_empty() {
            // Scrubbing goes on while nothing else runs (a slice per pass, looking at
            // timers in between).
            return Pass::Again;
        }
        // Idle before the locks go: whoever makes a vCPU ready after this sees the bit and
        // kicks this CPU (`wake_an_idle_cpu`); whoever did since the pass began is seen by
        // the count.
        if me.shared {
            cpus::set_idle(me.idle_bit, true);
            if cpus::wake_count() != wakes {
                locking::PASSES_AGAIN.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                cpus::set_idle(me.idle_bit, false);
                return Pass::Again;
            }
        }
        return Pass::Idle(deadline);
    };
    let Some(&(index, vcpu_index)) = queue.units.get(picked.unit) else {
        return Pass::Again;
    };
    let unit = (index, vcpu_index);
    // The vCPU's hardware state is this CPU's until the slice ends: no other CPU picks it
    // meanwhile (`is_ready`), and its domain is not torn down under it. An exit on another
    // CPU may have changed its state since it was picked (the table shared): looked at again.
    // One look at its domain (one lock with several CPUs) for all of it.
    let taken = slots.with(index, |s| {
        if me.shared && !is_ready(s, vcpu_index) {
            queue.sync(picked.unit, index, s, vcpu_index);
            return None;
        }
        let vcpu = s.vcpus[vcpu_index].take()?;
        // Its expiries that fell due while it waited ready, before its first instruction
        // (docs/abi.md 9.3): passes leave a ready vCPU's timers alone (`RunQueue::sync`).
        advance_timers(&mut s.domain, vcpu_index, now);
        let state = &mut s.domain.vcpus[vcpu_index];
        state.ran_on |= me.idle_bit;
        state.yielded_to = false;
        // A wake-up banks at most one slice of the time slept: enough to keep what a vCPU
        // that naps often between its work was owed before the nap (clamped to the least
        // of the others, it lost that at every nap and got a fraction of its share beside
        // a spinning domain). Applied as it is picked, to it alone.
        if core::mem::take(&mut state.boosted)
            && let Some(floor) = picked.floor
        {
            state.vruntime = state.vruntime.max(floor);
        }
        state.running_since = Some(now);
        state.requests.set_off_cpu(false);
        if me.shared && state.requests.last_cpu() != me.cpu {
            cpus::count_cpu_change();
        }
        trace::vcpu_in(s.domain.id);
        Some(vcpu)
    });
    let Some(vcpu) = taken else {
        return Pass::Again;
    };
    if let Some((previous, previous_vcpu)) = me.last.filter(|&p| p != unit) {
        // Another vCPU takes this CPU: the one it ran last is preempted (RUNNABLE,
        // docs/abi.md 9.2), unless another CPU has taken it up meanwhile (its hardware
        // state is out of its slot), where it is RUNNING.
        slots.with(previous, |slot| {
            let parked = matches!(slot.vcpus.get(previous_vcpu), Some(Some(_)));
            let domain = &mut slot.domain;
            let state = &mut domain.vcpus[previous_vcpu];
            if parked
                && domain.state == DomainState::Runnable
                && state.runstate.state() == runstate::RUNNING
            {
                let _ = state
                    .runstate
                    .enter(runstate::RUNNABLE, now, &domain.memory);
            }
        });
    }
    me.last = Some(unit);
    // Other domains' deadlines that can wake them; the running domain's own are looked at
    // by `run_slice`.
    // (A waiting sibling's deadline counts too: it may end the slice a little early.)
    // Not the host's work: its timer is armed too, and answered inside the slice
    // (`host_work_in_slice`).
    let others = queue.wake_due.peek().map(|(_, due)| due);
    let slice_end = others.map_or(now + TIME_SLICE_NS, |d| d.min(now + TIME_SLICE_NS));
    queue.ready.remove(picked.unit);
    if me.shared {
        // More may be ready than this CPU takes: an idle CPU that may run it looks.
        let wanted = queue.ready.wanted_cpus(me.cpu);
        if wanted != 0 {
            cpus::wake_an_idle_cpu(wanted);
        }
    }
    Pass::Run {
        index,
        vcpu_index,
        vcpu,
        slice_end,
    }
}

/// The directed switch of a machine with one CPU (issue #15; Xen's and seL4's IPC fast
/// paths are the model): the general pass would pick the one vCPU that can run next anyway,
/// so it runs without the pass. Two ways to get there:
///
/// - the vCPU that just ran went to wait (block, poll, HLT) or yielded, and the one vCPU a
///   request was made of meanwhile is now ready (the event it sent ended that vCPU's wait)
///   while no other is;
/// - it went to wait or yielded, no request was made of any vCPU, and exactly one other is
///   ready (a yielder waiting for the vCPU that now waits; the other of two that yield).
///
/// A yielder goes into the ready set behind it (docs/abi.md 3.3: its yield returns after the
/// other had the CPU; the pass's pick would give the other no floor either). Only when the
/// pass has nothing else to do: no deadline passed, no teardown or scrub, no yield_to, a
/// woken vCPU with no deadline to keep in the heaps; otherwise `None` and the pass runs (a
/// look made here is made again there, and changes nothing twice). The fairness accounting
/// is the pass's: `put_back` charged the vCPU that ran, and the one picked starts from its
/// own virtual run time.
///
/// Inlined is only the event ping-pong's case (a `poll` with no deadline and nothing asked
/// of the poller since, whose send woke the other: the pass's look at the poller would
/// change nothing); the others look at the vCPU that ran first, out of line.
#[inline(always)]
fn switch_directly<V: VirtualCpu, S: Slots<V> + ?Sized>(
    slots: &mut S,
    queue: &mut RunQueue,
    attention: &Attention,
    me: &mut ThisCpu,
    now: u64,
) -> Option<Pass<V>> {
    let back = me.back?;
    if me.named.is_some()
        || !queue.ended.is_empty()
        || !queue.scrubbing.is_empty()
        || queue.due.peek().is_some_and(|(_, due)| due <= now)
    {
        return None;
    }
    if let Some(run) = switch_to_woken(slots, queue, attention, me, now, back) {
        return Some(run);
    }
    // Nothing ready and nothing woken (a vCPU went to wait alone): no call.
    if queue.ready.is_empty() && attention.is_empty() {
        return None;
    }
    let back_unit = queue.unit_of(back)?;
    switch_after_look(slots, queue, attention, me, now, back_unit)
}

/// [`switch_directly`]'s inlined case: the vCPU that ran (`back`) waits with no deadline and
/// nothing asked of it since, no vCPU is ready, and the one a request was made of is woken.
#[inline(always)]
fn switch_to_woken<V: VirtualCpu, S: Slots<V> + ?Sized>(
    slots: &mut S,
    queue: &mut RunQueue,
    attention: &Attention,
    me: &mut ThisCpu,
    now: u64,
    back: (usize, usize),
) -> Option<Pass<V>> {
    if me.yielded.is_some() || !queue.ready.is_empty() {
        return None;
    }
    let back_unit = queue.unit_of(back)?;
    let target = attention.single()?;
    if target == back_unit || queue.due.contains(back_unit) || queue.due.contains(target) {
        return None;
    }
    let &(index, vcpu_index) = queue.units.get(target)?;
    let back_waits = slots.with(back.0, |s| {
        let domain = &s.domain;
        let state = &domain.vcpus[back.1];
        domain.is_runnable()
            && !domain.paused
            && !matches!(state.wait, Wait::None)
            && !state.requests.peek(request::EVENT | request::WAKE_CHECK)
            && vcpu_deadline(domain, back.1).is_none()
    });
    if !back_waits {
        return None;
    }
    let cpu_bit = me.idle_bit;
    let vcpu = slots.with(index, |s| {
        update(s, vcpu_index, now);
        if !is_ready(s, vcpu_index)
            || s.domain.affinity & cpu_bit == 0
            || vcpu_deadline(&s.domain, vcpu_index).is_some()
        {
            return None;
        }
        let vcpu = s.vcpus[vcpu_index].take()?;
        begin_direct_run(s, vcpu_index, cpu_bit, now);
        Some(vcpu)
    })?;
    attention.unmark(target);
    Some(direct_run(queue, me, now, (index, vcpu_index), vcpu))
}

/// vCPU `vcpu_index` of `slot`, taken out of its slot by a directed switch, runs on the CPU
/// of bit `cpu_bit` from `now`, as the pass's pick would have it (picked from one candidate:
/// no floor, `ReadySet::pick`).
#[inline(always)]
fn begin_direct_run<V>(slot: &mut Slot<V>, vcpu_index: usize, cpu_bit: u64, now: u64) {
    let state = &mut slot.domain.vcpus[vcpu_index];
    state.ran_on |= cpu_bit;
    state.yielded_to = false;
    state.boosted = false;
    state.running_since = Some(now);
    state.requests.set_off_cpu(false);
    trace::vcpu_in(slot.domain.id);
}

/// The end of a directed switch to `unit`, whose hardware state is `vcpu`: what the pass
/// would return for it.
#[inline(always)]
fn direct_run<V>(
    queue: &RunQueue,
    me: &mut ThisCpu,
    now: u64,
    unit: (usize, usize),
    vcpu: Box<V>,
) -> Pass<V> {
    me.back = None;
    // A vCPU that went to wait is BLOCKED (`end_slice`); the one that runs is RUNNING from
    // `schedule_in`.
    me.last = Some(unit);
    locking::DIRECT_SWITCHES.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    #[cfg(test)]
    tests::DIRECT_SWITCHES_HERE.with(|n| n.set(n.get() + 1));
    // Not the host's work: answered inside the slice (`host_work_in_slice`).
    let others = queue.wake_due.peek().map(|(_, due)| due);
    let slice_end = others.map_or(now + TIME_SLICE_NS, |d| d.min(now + TIME_SLICE_NS));
    Pass::Run {
        index: unit.0,
        vcpu_index: unit.1,
        vcpu,
        slice_end,
    }
}

/// [`switch_directly`] for a vCPU that yielded or that the pass must look at (`block` asks
/// for an upcall check; a yielder joins the ready set, its timers and wait as `update`).
#[inline(never)]
fn switch_after_look<V: VirtualCpu, S: Slots<V> + ?Sized>(
    slots: &mut S,
    queue: &mut RunQueue,
    attention: &Attention,
    me: &mut ThisCpu,
    now: u64,
    back_unit: usize,
) -> Option<Pass<V>> {
    let back = me.back?;
    let yielded = match me.yielded {
        None => false,
        Some(unit) if unit == back => true,
        Some(_) => return None,
    };
    // Looked for before the yielder joins the ready set.
    let (target, from_ready) = match attention.single() {
        Some(target) if queue.ready.is_empty() && !queue.due.contains(target) => (target, false),
        Some(_) => return None,
        None if attention.is_empty() => (queue.ready.only(me.cpu)?, true),
        None => return None,
    };
    if target == back_unit {
        return None;
    }
    slots.with(back.0, |s| {
        update(s, back.1, now);
        queue.sync(back_unit, back.0, s, back.1);
    });
    // Its domain ended (a teardown first), or it is ready and did not yield (the pick weighs
    // it against the other).
    if !queue.ended.is_empty() || (!yielded && queue.ready.contains(back_unit)) {
        return None;
    }
    let run = take_directly(slots, queue, attention, me, now, target, from_ready)?;
    // Preempted (docs/abi.md 9.2) if it is still RUNNING: it yielded, or its domain was
    // paused; one that went to wait is BLOCKED already. The pass does this for `last`.
    slots.with(back.0, |s| {
        let domain = &mut s.domain;
        let state = &mut domain.vcpus[back.1];
        if domain.state == DomainState::Runnable && state.runstate.state() == runstate::RUNNING {
            let _ = state
                .runstate
                .enter(runstate::RUNNABLE, now, &domain.memory);
        }
    });
    me.yielded = None;
    Some(run)
}

/// The end of [`switch_directly`]: `target` runs next if it can, woken (a request was made
/// of it) or `from_ready` (the one in the ready set).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn take_directly<V: VirtualCpu, S: Slots<V> + ?Sized>(
    slots: &mut S,
    queue: &mut RunQueue,
    attention: &Attention,
    me: &mut ThisCpu,
    now: u64,
    target: usize,
    from_ready: bool,
) -> Option<Pass<V>> {
    let &(index, vcpu_index) = queue.units.get(target)?;
    let cpu_bit = me.idle_bit;
    let vcpu = slots.with(index, |s| {
        if !from_ready {
            // Its wait ends here, as in the pass's look.
            update(s, vcpu_index, now);
            if vcpu_deadline(&s.domain, vcpu_index).is_some() {
                return None;
            }
        }
        if !is_ready(s, vcpu_index) || s.domain.affinity & cpu_bit == 0 {
            return None;
        }
        let vcpu = s.vcpus[vcpu_index].take()?;
        if from_ready {
            // Expiries that fell due while it waited ready, as the pass's pick.
            advance_timers(&mut s.domain, vcpu_index, now);
        }
        begin_direct_run(s, vcpu_index, cpu_bit, now);
        Some(vcpu)
    })?;
    if from_ready {
        queue.ready.remove(target);
    } else {
        attention.unmark(target);
    }
    Some(direct_run(queue, me, now, (index, vcpu_index), vcpu))
}

/// The slice of a machine with one CPU: the table stays locked, so the domain and its peers
/// are reached once for the whole slice. Returns how it ends (not [`Next::Resume`]), for
/// [`end_slice_at`].
#[inline(never)]
fn run_slice_alone<V: VirtualCpu, H: Host>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    peers: &mut Peers<'_, V>,
    host: &mut H,
    slice_end: u64,
) -> Next {
    let mut exited_at = None;
    let mut preemption = PreemptionClock::new(domain.vcpus[vcpu_index].slice_end_tsc);
    let tsc_khz = domain.time.tsc_khz() as u32;
    // Where `run_own_exits` puts an exit it does not handle.
    let mut other = VmExit::Hlt;
    loop {
        if exited_at.is_some() && preemption.over(read_tsc()) {
            // The slice is over: ended by the caller, as any other.
            return Next::Yield;
        }
        if prepare_entry(domain, vcpu_index, vcpu) & request::TIMERS != 0 {
            arm_host_timer(domain, host, slice_end, slice_end);
        }
        if let Some(exited_at) = exited_at {
            let now = read_tsc();
            let handled = now.wrapping_sub(exited_at);
            domain.vcpus[vcpu_index].stats.handling_tsc += handled;
            preemption.count(vcpu, handled, now);
        } else {
            // The slice's first entry: what the hypervisor did since the deadline was set
            // (the vCPU's pending events, a preempted batch) is not the guest's time.
            vcpu.reload_preemption_deadline();
        }
        // The null hypercall, `version` and CPUID loop in here.
        let state = &mut domain.vcpus[vcpu_index];
        let (exit, at) = run_own_exits(state, vcpu_index, vcpu, tsc_khz, &preemption, &mut other);
        exited_at = Some(at);
        let next = match exit {
            OwnExits::Drain => continue,
            OwnExits::Hypercall => hypercall_exit(domain, vcpu_index, vcpu, peers),
            OwnExits::Hlt => hlt_exit(domain, vcpu_index, vcpu),
            OwnExits::MsrRead => msr_read_exit(domain, vcpu_index, vcpu),
            OwnExits::MsrWrite => msr_write_exit(domain, vcpu_index, vcpu),
            OwnExits::ExternalInterrupt => {
                let exit = VmExit::ExternalInterrupt;
                match dispatch_exit(domain, vcpu_index, vcpu, exit, peers, host) {
                    Next::Yield if host_work_in_slice(domain, vcpu, host, slice_end) => {
                        Next::Resume
                    }
                    next => next,
                }
            }
            OwnExits::Io { port, size, write } => {
                port_exit(domain, vcpu_index, vcpu, port, size, write)
            }
            OwnExits::Other => dispatch_exit(domain, vcpu_index, vcpu, other, peers, host),
        };
        if next != Next::Resume {
            return next;
        }
    }
}

/// What stops vCPU `vcpu_index` that another CPU decided while it ran: its domain ended
/// (stop), it was taken down (sleep: offline), its domain paused (yield); `None` if it runs on.
fn stopped_elsewhere(domain: &Domain, vcpu_index: usize) -> Option<Next> {
    if !domain.is_runnable() {
        Some(Next::Stop)
    } else if !domain.vcpus[vcpu_index].up {
        Some(Next::Sleep)
    } else if domain.paused {
        Some(Next::Yield)
    } else {
        None
    }
}

/// Handles one exit of vCPU `vcpu_index` of `domain`, under the locks its reach needs
/// (`peers`: the other domains it may reach).
#[inline(always)]
fn dispatch_exit<V: VirtualCpu, H: Host>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    exit: VmExit,
    peers: &mut impl DomainTable,
    host: &mut H,
) -> Next {
    if matches!(exit, VmExit::Hypercall) {
        hypercall_exit(domain, vcpu_index, vcpu, peers)
    } else if matches!(exit, VmExit::ExternalInterrupt) {
        domain.vcpus[vcpu_index]
            .stats
            .count(ExitKind::ExternalInterrupt);
        host.service_interrupts();
        Next::Yield
    } else {
        handle_exit(domain, vcpu_index, vcpu, exit, peers)
    }
}

/// The slice of vCPU `vcpu_index` ends with `next` (not [`Next::Resume`]).
fn end_slice<V: VirtualCpu, H: Host>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    next: Next,
    host: &mut H,
) {
    let now = if next == Next::Sleep {
        host.now_ns()
    } else {
        0
    };
    end_slice_at(domain, vcpu_index, vcpu, next, now);
}

/// [`end_slice`] at system time `now` (read by the caller, who charges the slice up to it).
#[inline(always)]
fn end_slice_at<V: VirtualCpu>(
    domain: &mut Domain,
    vcpu_index: usize,
    vcpu: &mut V,
    next: Next,
    now: u64,
) {
    vcpu.deactivate();
    match next {
        Next::Stop => return,
        Next::Sleep => {
            trace::block(domain.id);
            let state = &mut domain.vcpus[vcpu_index];
            // A vCPU that took itself down is offline, not blocked (docs/abi.md 9.2).
            let to = if state.up {
                runstate::BLOCKED
            } else {
                runstate::OFFLINE
            };
            let _ = state.runstate.enter(to, now, &domain.memory);
        }
        // Preempted or yielding: still RUNNING until another vCPU takes the CPU. What its
        // ring holds is printed as it is next scheduled in, on its own time: printed here it
        // made the vCPU picked next wait (a domain whose ring waits on its console budget
        // gets a few bytes out at every preemption: 1.3 us of the neighbour's timer lateness
        // beside `resource-hog` under Bochs). A yield printed it already (`sched_op`).
        Next::Yield | Next::Resume | Next::Again => {
            let waiting = domain.console_ring_waiting();
            domain.vcpus[vcpu_index].console_ring_deferred |= waiting;
            return;
        }
    }
    domain.drain_console_ring();
}

/// Runs every domain on this CPU alone until all have ended.
pub fn run_all<V: VirtualCpu, H: Host>(slots: &mut [Slot<V>], host: &mut H) {
    Machine::new(slots).run_cpu(0, host);
}

/// How far behind the least-served ready vCPU (in virtual run time) a woken vCPU may start:
/// one slice.
pub const WAKE_CREDIT_NS: u64 = TIME_SLICE_NS;

/// The scheduler's policy, which [`ReadySet::pick`] implements on the run queue (this is
/// it on plain slots, for the tests; `cursor` gives the round-robin order of ties). A sibling's
/// yield_to first; then the woken vCPU that had the least CPU time for its weight first
/// (short latency for timers and events), as long as it had no more than the ready vCPU that
/// had the least, otherwise that vCPU (ties to the one that waited longest, round-robin
/// order). Woken vCPUs must not bank the time they slept: they start at most
/// [`WAKE_CREDIT_NS`] behind the least of the others (applied to the one picked, as it is
/// picked: the others get it when their turn comes). A wake-up buys no lead (as Xen's
/// credit scheduler boosts only vCPUs that are under their share): a domain that sleeps a few
/// microseconds between long stretches of work, run first at each wake-up, would take the CPU
/// from the others whatever its weight (1.6 let a woken vCPU run first while up to a slice
/// ahead, which such a domain turned into its share plus a slice, and the latency of its
/// neighbours' timers and events into its stretches of work). The vCPU that just yielded,
/// `yielded`, runs only when no other is ready (docs/abi.md 3.3: yield returns after the
/// others had the CPU), even when a wake-up left it behind the others.
///
/// Only vCPUs whose domain's affinity has the picking CPU (`cpu_bit`) are looked at. With
/// several CPUs each has its own set of ready vCPUs and applies this policy to it; how vCPUs
/// move between the sets is `run_queues`'.
#[cfg(test)]
fn pick<V>(
    slots: &mut [Slot<V>],
    units: &[(usize, usize)],
    cursor: usize,
    cpu_bit: u64,
    yielded: Option<(usize, usize)>,
) -> Option<(usize, usize)> {
    // The ready set, filled in round-robin order after `cursor` (ties go to who came first).
    let mut ready = ready::ReadySet::new(units.len());
    let count = units.len();
    for i in 1..=count {
        let at = (cursor + i) % count;
        let (index, vcpu) = units[at];
        let slot = &slots[index];
        if is_ready(slot, vcpu) {
            let state = &slot.domain.vcpus[vcpu];
            if state.yielded_to
                && slot.domain.affinity & cpu_bit != 0
                && yielded != Some((index, vcpu))
            {
                return Some((index, vcpu));
            }
            let entry = Ready {
                vruntime: state.vruntime,
                boosted: state.boosted,
                affinity: slot.domain.affinity,
                weight: slot.domain.weight,
            };
            ready.insert(at, entry);
        }
    }
    let yielder = yielded.and_then(|unit| units.iter().position(|&u| u == unit));
    let picked = ready.pick(cpu_bit, yielder)?;
    let (index, vcpu) = units[picked.unit];
    let state = &mut slots[index].domain.vcpus[vcpu];
    if state.boosted
        && let Some(floor) = picked.floor
    {
        state.vruntime = state.vruntime.max(floor);
    }
    Some((index, vcpu))
}

/// Where `unit` is in `units`, looking from `hint` (usually right after it).
#[cfg(test)]
fn index_of_unit(units: &[(usize, usize)], hint: usize, unit: (usize, usize)) -> usize {
    let count = units.len();
    (0..count)
        .map(|i| (hint + i) % count)
        .find(|&at| units[at] == unit)
        .unwrap_or(hint)
}

/// Loads the start state `vcpu_op` initialise gave (docs/abi.md 19): RIP, RSP, CR3 and RDI
/// on top of the start-of-day state the vCPU was built with.
fn load_start_state<V: VirtualCpu>(vcpu: &mut V, start: &StartState) {
    vcpu.set_rip(start.rip);
    vcpu.set_rsp(start.rsp);
    vcpu.set_control_register(3, start.cr3);
    vcpu.regs().gpr[reg::RDI] = start.argument;
}

/// A vCPU is scheduled in on this CPU: the backend makes it current, a start state from
/// initialise is loaded, its run state becomes RUNNING, its pvclock is refreshed, interrupts
/// the guest made deliverable while it was out are looked for, and the host timer is armed.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn schedule_in<V: VirtualCpu, H: Host>(
    domain: &mut Domain,
    index: usize,
    vcpu: &mut V,
    host: &mut H,
    now: u64,
    slice_end: u64,
    shared: bool,
) {
    crate::platform::spec_ctrl::on_schedule_in(domain.id);
    if core::mem::take(&mut domain.vcpus[index].console_ring_deferred) {
        domain.drain_console_ring();
    }
    vcpu.activate();
    // The vCPU's state looked up once (each index is a bounds check and a reload).
    let state = &mut domain.vcpus[index];
    if state.requests.take(request::START) != 0
        && let Some(start) = state.start
    {
        load_start_state(vcpu, &start);
    }
    if state.runstate.state() != runstate::RUNNING {
        let _ = state.runstate.enter(runstate::RUNNING, now, &domain.memory);
    }
    let tsc = crate::common::time::read_tsc();
    let _ = publish_vcpu_time(
        &domain.memory,
        domain.events.vcpu_info_gpa(index),
        &domain.time,
        tsc,
    );
    state.requests.make(request::EVENT);
    state.requests.set_upcall_maybe_pending(true);
    // Several CPUs: only a whole slice's end has a window (shorter ones are armed exactly:
    // with a window, apic_periodic_timer_ticks saw its ticks late on two CPUs, a cause not
    // found yet).
    let begun = if shared && slice_end < now.saturating_add(TIME_SLICE_NS) {
        slice_end
    } else {
        now
    };
    arm_host_timer(domain, host, begun, slice_end);
    // Where host interrupts may not preempt the guest, the hardware ends the slice itself:
    // at `slice_end`, counted from now rather than from the pass (its time and this
    // function's made every such slice overrun by as much: 15 us under Bochs).
    let started = domain.time.ns_at(tsc);
    let slice_ticks = domain.time.ticks_for(slice_end.saturating_sub(started));
    set_preemption_deadline(domain, vcpu, host, slice_end, started);
    // A batch stops between entries from then on (`hypercall::run_batch`), at the same time.
    domain.vcpus[index].slice_end_tsc = tsc.saturating_add(slice_ticks);
}

/// The part of a slice by which the host timer may end it early (an eighth: 1.25 ms of a
/// whole slice), so that the timer is not written again at every switch (issue #15:
/// re-arming it cost 193 instructions of an event ping-pong's round trip). A slice ended
/// early is charged what it ran, and the next pass arms the timer exactly again (a timer
/// that fired is not kept), so at most one early end per exact arming; the slice runs at
/// least seven eighths of its length.
pub const SLICE_END_SLACK_DIVISOR: u64 = 8;

/// The window the host timer may fire in for a slice that begins at `now` and ends at
/// `slice_end` (the end of a time slice, or the first deadline another domain or the host
/// has), whose domain's first timer is due at `due` (or later): the slice's end may come up
/// to [`SLICE_END_SLACK_DIVISOR`] of its length early, the running domain's timers are kept
/// exactly.
fn host_timer_window(now: u64, slice_end: u64, due: Option<u64>) -> (u64, u64) {
    match due {
        Some(due) if due <= slice_end => (due, due),
        _ => (
            slice_end - slice_end.saturating_sub(now) / SLICE_END_SLACK_DIVISOR,
            slice_end,
        ),
    }
}

/// Arms the host timer for the end of the slice, or the first timer of the running domain's
/// vCPUs due before it (a vCPU may set a sibling's timer). `now`: when the slice began, or
/// `slice_end` when the timer must fire exactly at it.
fn arm_host_timer<H: Host>(domain: &Domain, host: &mut H, now: u64, slice_end: u64) {
    let mut due = None::<u64>;
    for state in &domain.vcpus {
        if let Some(deadline) = state.timers.next_deadline() {
            due = Some(due.map_or(deadline, |d| d.min(deadline)));
        }
        // Most vCPUs have no APIC timer counting (an inlined test, not a call).
        if state.vlapic.timer_counting()
            && let Some(deadline) = state.vlapic.next_timer_deadline_ns()
        {
            due = Some(due.map_or(deadline, |d| d.min(deadline)));
        }
    }
    let (mut earliest, mut deadline) = host_timer_window(now, slice_end, due);
    // The host's work (the serial line) comes no later than it is due, exactly or within
    // the window.
    if let Some(work) = host.work_due()
        && work < deadline
    {
        deadline = work;
        earliest = earliest.min(work);
    }
    host.arm_timer_within(earliest, deadline);
}

/// Has the hardware end the guest's run at `slice_end` or when the host's work is due,
/// whichever comes first (counted from system time `now`): where host interrupts do not
/// leave a guest that runs with interrupts off (Bochs), the host's work waits for it.
fn set_preemption_deadline<V: VirtualCpu, H: Host>(
    domain: &Domain,
    vcpu: &mut V,
    host: &H,
    slice_end: u64,
    now: u64,
) {
    let end = slice_end.min(host.work_due().unwrap_or(u64::MAX));
    vcpu.set_preemption_deadline(domain.time.ticks_for(end.saturating_sub(now)));
}

/// A host interrupt ended the guest's run before the slice's end: on a machine with one CPU
/// that is the host timer, for the host's work (the serial line) or a timer of the domain's
/// vCPUs, or one that fired early (the APIC timer's rate is not exactly the TSC's). The host's
/// work is done here and the slice goes on (`true`), with the timer armed again, unless a
/// timer of the domain's is due, which ends the slice as before, for the pass to fire it. Ending the slice for the host's work cost whoever
/// ran a pass: beside `resource-hog`, whose console output keeps the serial line busy, a
/// tenth of the neighbour's timer wake-ups were interrupted so (1.9 us each under QEMU).
fn host_work_in_slice<V: VirtualCpu, H: Host>(
    domain: &Domain,
    vcpu: &mut V,
    host: &mut H,
    slice_end: u64,
) -> bool {
    let now = host.now_ns();
    if now >= slice_end {
        return false;
    }
    let timer_due = domain.vcpus.iter().any(|state| {
        state.timers.next_deadline().is_some_and(|due| due <= now)
            || (state.vlapic.timer_counting()
                && state
                    .vlapic
                    .next_timer_deadline_ns()
                    .is_some_and(|due| due <= now))
    });
    if timer_due {
        return false;
    }
    host.work_in_slice();
    arm_host_timer(domain, host, now, slice_end);
    set_preemption_deadline(domain, vcpu, host, slice_end, now);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::domain::{DomainState, Ending};
    use crate::common::memory::guest_memory::GuestMemory;
    use crate::common::memory::guest_memory::testing::{TestMemory, test_memory};
    use crate::common::testing::{MockVcpu, Traced, hypercall, results_of, take_trace};
    use crate::common::time::TimeBase;
    use std::cell::Cell;

    std::thread_local! {
        /// The directed switches this test's thread made (`switch_directly`).
        pub(super) static DIRECT_SWITCHES_HERE: Cell<u32> = const { Cell::new(0) };
    }

    /// A clock that jumps to the armed deadline when the CPU halts. With a 1 GHz TimeBase
    /// starting at TSC 0, system time and the (fake) TSC are the same number.
    struct FakeHost {
        now: Cell<u64>,
        armed: Option<u64>,
        halts: u32,
        /// Times the host's work was done inside a slice (`Host::work_in_slice`).
        works_in_slice: u32,
    }

    impl Host for FakeHost {
        fn now_ns(&self) -> u64 {
            // The fake TSC may have moved on by itself (`FAKE_TSC_STEP`): never back.
            let tsc = crate::common::testing::FAKE_TSC
                .with(|t| t.get())
                .unwrap_or(0);
            self.now.set(self.now.get().max(tsc));
            crate::common::testing::FAKE_TSC.with(|t| t.set(Some(self.now.get())));
            self.now.get()
        }
        fn arm_timer(&mut self, deadline: Option<u64>) {
            self.armed = deadline;
        }
        fn wait_for_interrupt(&mut self) {
            self.halts += 1;
            let deadline = self.armed.expect("halting with no timer armed would hang");
            self.now.set(self.now.get().max(deadline));
            crate::common::testing::FAKE_TSC.with(|t| t.set(Some(self.now.get())));
        }
        fn service_interrupts(&mut self) {}
        fn console_input(&mut self) -> Option<u8> {
            None
        }
        fn housekeeping(&mut self) -> Option<u64> {
            None
        }
        fn work_in_slice(&mut self) {
            self.works_in_slice += 1;
        }
    }

    /// A fake host at time 0, with the fake TSC set to match.
    fn fake_host() -> FakeHost {
        let host = FakeHost {
            now: Cell::new(0),
            armed: None,
            halts: 0,
            works_in_slice: 0,
        };
        crate::common::testing::FAKE_TSC.with(|t| t.set(None));
        host.now_ns();
        host
    }

    fn slot(
        script: Vec<(VmExit, crate::common::vcpu::GuestRegisters)>,
    ) -> (TestMemory, Slot<MockVcpu>) {
        slot_with_id(1, script)
    }

    /// Domain `id`, 4 MiB of test memory, a vCPU that plays `script` with interrupts on.
    fn slot_with_id(
        id: u32,
        script: Vec<(VmExit, crate::common::vcpu::GuestRegisters)>,
    ) -> (TestMemory, Slot<MockVcpu>) {
        let t = test_memory(4 << 20);
        // SAFETY: the domain's view aliases the test memory, which outlives it in the tuple.
        let mem = unsafe { GuestMemory::new(t.mem.host_base() as *mut u8, t.mem.size()) };
        let domain = Domain::new(id, "t".into(), mem, TimeBase::new(1_000_000_000, 0, 0, 0));
        let vcpu = MockVcpu {
            script: script.into(),
            interrupt_flag: true,
            tag: id,
            ..Default::default()
        };
        (
            t,
            Slot {
                domain,
                vcpus: vec![Some(Box::new(vcpu))],
            },
        )
    }

    /// Domain 1 with two vCPUs: vCPU 0 plays `first`, vCPU 1 (tag 2) `second`; a start state
    /// for vCPU 1 at 0x10000 (RIP 0x123000, RSP 0x200000, CR3 0x1000, argument 77).
    fn two_vcpus(
        first: Vec<(VmExit, crate::common::vcpu::GuestRegisters)>,
        second: Vec<(VmExit, crate::common::vcpu::GuestRegisters)>,
    ) -> (TestMemory, Slot<MockVcpu>) {
        let (t, mut s) = slot(first);
        for (i, value) in [0x12_3000u64, 0x20_0000, 0x1000, 77]
            .into_iter()
            .enumerate()
        {
            t.mem
                .write(0x10000 + 8 * i as u64, &value.to_le_bytes())
                .unwrap();
        }
        let time = s.domain.time;
        let memory = core::mem::replace(&mut s.domain.memory, GuestMemory::empty());
        s.domain = Domain::with_vcpus(1, "t".into(), memory, time, 2);
        s.vcpus.push(Some(Box::new(MockVcpu {
            script: second.into(),
            interrupt_flag: true,
            tag: 2,
            ..Default::default()
        })));
        (t, s)
    }

    const EVTCHN: u64 = 3;
    const VCPU_OP: u64 = 4;
    const SCHED: u64 = 2;
    const POWEROFF: [u64; 3] = [2, 0, 0];
    const YIELD: [u64; 3] = [0, 0, 0];
    use lamina_abi::vcpu::VcpuOp;

    /// Domains 1 and 2, ready, with these virtual run times; domain 2's vCPU woken or not.
    fn ready_pair(
        first_vruntime: u64,
        second_vruntime: u64,
        second_woken: bool,
    ) -> ([TestMemory; 2], [Slot<MockVcpu>; 2]) {
        let (t1, mut s1) = slot_with_id(1, vec![]);
        let (t2, mut s2) = slot_with_id(2, vec![]);
        s1.domain.vcpus[0].vruntime = first_vruntime;
        s2.domain.vcpus[0].vruntime = second_vruntime;
        s2.domain.vcpus[0].boosted = second_woken;
        ([t1, t2], [s1, s2])
    }

    const UNITS: [(usize, usize); 2] = [(0, 0), (1, 0)];
    const MS: u64 = 1_000_000;

    #[test]
    fn the_host_timer_may_end_a_slice_an_eighth_early_but_keeps_guest_timers_exact() {
        let now = 40 * MS;
        let end = now + TIME_SLICE_NS;
        let slack = TIME_SLICE_NS / SLICE_END_SLACK_DIVISOR;
        assert_eq!(host_timer_window(now, end, None), (end - slack, end));
        assert_eq!(
            host_timer_window(now, end, Some(end + 1)),
            (end - slack, end),
            "a timer after the slice"
        );
        assert_eq!(
            host_timer_window(now, end, Some(end - 1)),
            (end - 1, end - 1)
        );
        assert_eq!(host_timer_window(now, end, Some(end)), (end, end));
        assert_eq!(
            host_timer_window(now, now + 8 * 1000, None),
            (now + 7 * 1000, now + 8 * 1000),
            "a slice cut short by another deadline keeps seven eighths"
        );
        assert_eq!(
            host_timer_window(end, end, Some(end + 1)),
            (end, end),
            "exactly"
        );
    }

    #[test]
    fn a_woken_vcpu_runs_first_only_while_no_ready_vcpu_had_less() {
        let (_t, mut slots) = ready_pair(100 * MS, 100 * MS, true);
        assert_eq!(
            pick(&mut slots, &UNITS, 1, u64::MAX, None),
            Some((1, 0)),
            "level with the least served"
        );
        let (_t, mut slots) = ready_pair(100 * MS, 100 * MS + 1, true);
        assert_eq!(
            pick(&mut slots, &UNITS, 1, u64::MAX, None),
            Some((0, 0)),
            "a wake-up further ahead waits its turn"
        );
        let (_t, mut slots) = ready_pair(100 * MS, 90 * MS, false);
        assert_eq!(
            pick(&mut slots, &UNITS, 1, u64::MAX, None),
            Some((1, 0)),
            "the fairest"
        );
    }

    #[test]
    fn a_woken_vcpu_another_cpu_must_run_is_not_run_here() {
        // Domain 2 woke ahead of domain 1; domain 3 woke level with it but may run on CPU 1
        // only: CPU 0 runs domain 1 (the sample guest's SMP part beside a pinned pong once
        // ran pong on CPU 0 through a search of woken vCPUs that forgot affinity).
        let (_t, [mut s1, s2]) = ready_pair(100 * MS, 100 * MS + 1, true);
        let (_t3, mut s3) = slot_with_id(3, vec![]);
        s3.domain.vcpus[0].vruntime = 100 * MS;
        s3.domain.vcpus[0].boosted = true;
        s3.domain.affinity = 0b10;
        s1.domain.affinity = 0b11;
        let mut slots = [s1, s2, s3];
        let units = [(0, 0), (1, 0), (2, 0)];
        assert_eq!(pick(&mut slots, &units, 0, 0b01, None), Some((0, 0)));
        assert_eq!(
            pick(&mut slots, &units, 0, 0b10, None),
            Some((2, 0)),
            "CPU 1 may run it"
        );
    }

    #[test]
    fn a_wake_up_keeps_up_to_one_slice_of_what_it_was_owed() {
        let (_t, mut slots) = ready_pair(100 * MS, 95 * MS, true);
        assert_eq!(pick(&mut slots, &UNITS, 1, u64::MAX, None), Some((1, 0)));
        assert_eq!(
            slots[1].domain.vcpus[0].vruntime,
            95 * MS,
            "owed 5 ms: kept"
        );
        let (_t, mut slots) = ready_pair(100 * MS, 20 * MS, true);
        assert_eq!(pick(&mut slots, &UNITS, 1, u64::MAX, None), Some((1, 0)));
        assert_eq!(
            slots[1].domain.vcpus[0].vruntime,
            100 * MS - WAKE_CREDIT_NS,
            "a long sleep banks one slice"
        );
    }

    #[test]
    fn only_a_waiting_vcpus_timers_cut_another_domains_slice() {
        let (_t, mut s) = slot(vec![]);
        s.domain.vcpus[0].timers.periodic = Some((50_000, 50_000));
        assert_eq!(next_deadline(&s), Some(50_000));
        assert_eq!(next_wake_deadline(&s), None, "ready: handled when it runs");
        s.domain.vcpus[0].wait = Wait::Block;
        assert_eq!(next_wake_deadline(&s), Some(50_000), "waiting: it may wake");
    }

    #[test]
    fn a_yield_lets_the_others_run_first_even_when_it_was_owed_time() {
        // Domain 2 was woken 5 ms behind domain 1 and yields: domain 1 runs next.
        let (_t, mut slots) = ready_pair(100 * MS, 95 * MS, false);
        assert_eq!(
            pick(&mut slots, &UNITS, 1, u64::MAX, Some((1, 0))),
            Some((0, 0))
        );
        assert_eq!(
            pick(&mut slots, &UNITS, 0, u64::MAX, None),
            Some((1, 0)),
            "then it is owed"
        );
        // Alone, it runs on.
        slots[0].domain.end(Ending::Poweroff);
        assert_eq!(
            pick(&mut slots, &UNITS, 1, u64::MAX, Some((1, 0))),
            Some((1, 0))
        );
    }

    /// Domain 1 spins; domain 2 works 300 us and naps 10 us (out of the run queue), over
    /// and over for `duration`, waking boosted; with `yield_between`, it yields after every
    /// other stretch instead of napping. The spinner's slice ends at the napper's wake-up
    /// (a waiting vCPU's deadline). Returns the napper's share of the CPU.
    fn napper_share(weights: (u32, u32), yield_between: bool, duration: u64) -> f64 {
        let (_t, mut slots) = ready_pair(0, 0, false);
        slots[0].domain.weight = weights.0;
        slots[1].domain.weight = weights.1;
        let (mut cursor, mut now, mut ran) = (1, 0u64, [0u64; 2]);
        let mut nap_until: Option<u64> = None;
        let mut naps_next = !yield_between;
        while now < duration {
            if nap_until.is_some_and(|t| t <= now) {
                nap_until = None;
                slots[1].domain.vcpus[0].boosted = true;
            }
            let unit = if nap_until.is_some() {
                (0, 0)
            } else {
                pick(&mut slots, &UNITS, cursor, u64::MAX, None).expect("both are ready")
            };
            slots[unit.0].domain.vcpus[0].boosted = false;
            cursor = index_of_unit(&UNITS, cursor, unit);
            let run = match (unit.0, nap_until) {
                (0, Some(wake)) => wake - now,
                (0, None) => TIME_SLICE_NS,
                _ => 300_000,
            };
            ran[unit.0] += run;
            let weight = u64::from(slots[unit.0].domain.weight);
            slots[unit.0].domain.vcpus[0].vruntime += run * u64::from(DEFAULT_WEIGHT) / weight;
            now += run;
            if unit.0 == 1 {
                if naps_next {
                    nap_until = Some(now + 10_000);
                }
                if yield_between {
                    naps_next = !naps_next;
                }
            }
        }
        ran[1] as f64 / (ran[0] + ran[1]) as f64
    }

    #[test]
    fn a_napping_domain_gets_its_share_beside_a_spinning_one() {
        // Works, yields, works, naps. (Clamped to the spinner's run time at every wake-up,
        // the napper lost what the spinner's last slice had put it behind, and got about 6%.)
        let share = napper_share((DEFAULT_WEIGHT, DEFAULT_WEIGHT), true, 1000 * MS);
        assert!(
            (0.45..=0.55).contains(&share),
            "the napper's share: {share}"
        );
    }

    #[test]
    fn a_napper_gets_its_weights_share_beside_a_spinner_of_any_weight() {
        // The wake credit is one slice of the spinner's in virtual run time (a slice in ns
        // let a napper beside a spinner of weight 100 keep less than half of what it was
        // owed, and get 29% of the CPU at equal weights).
        for (spinner_weight, napper_weight) in [(256, 256), (100, 100), (100, 200), (400, 100)] {
            let share = napper_share((spinner_weight, napper_weight), false, 2000 * MS);
            let ideal = f64::from(napper_weight) / f64::from(napper_weight + spinner_weight);
            assert!(
                (share - ideal).abs() <= 0.1 * ideal,
                "weights {spinner_weight}:{napper_weight}: the napper's share {share}, ideal {ideal}"
            );
        }
    }

    const MEMORY_OP: u64 = 5;

    /// vCPU 0's prologue for two-vCPU tests: initialise and up vCPU 1.
    fn bring_up_second() -> [(VmExit, crate::common::vcpu::GuestRegisters); 2] {
        [
            hypercall(VCPU_OP, [5, 1, 0x10000]),
            hypercall(VCPU_OP, [6, 1, 0]),
        ]
    }

    #[test]
    fn send_ipi_raises_the_slot_port_of_every_vcpu_in_the_mask_or_none() {
        let mut first: Vec<_> = vec![
            hypercall(EVTCHN, [8, 0, 3]), // bind_ipi_slot(vCPU 0, slot 3) -> port 2
            hypercall(EVTCHN, [9, 0b11, 3]), // send_ipi to both: vCPU 1 has no slot 3
            hypercall(EVTCHN, [8, 1, 3]), // bind_ipi_slot(vCPU 1, slot 3) -> port 3
            hypercall(EVTCHN, [8, 1, 3]), // again: EEXIST
            hypercall(EVTCHN, [8, 1, 8]), // slot 8: EINVAL
            hypercall(EVTCHN, [9, 0b100, 3]), // vCPU 2 of 2: ENOENT
            hypercall(EVTCHN, [9, 0, 3]), // empty mask: EINVAL
            hypercall(EVTCHN, [9, 0b11, 3]), // both
            hypercall(EVTCHN, [6, 2, 0]), // status of port 2
            hypercall(EVTCHN, [6, 3, 0]), // status of port 3
        ];
        first.push(hypercall(SCHED, POWEROFF));
        let (_t, mut s) = two_vcpus(first, vec![]);
        take_trace();
        run_all(std::slice::from_mut(&mut s), &mut fake_host());
        let e = |errno: Errno| errno.to_return_value() as i64;
        let results = results_of(&take_trace(), 1);
        use lamina_abi::event_channel::PortStatus;
        for (port, status) in [(2, results[8]), (3, results[9])] {
            let status = PortStatus::unpack(status as u64);
            assert!(status.pending, "port {port}: {status:?}");
            assert_eq!(status.vcpu, port as u8 - 2);
        }
        assert_eq!(
            results[..8],
            [
                2,
                e(Errno::EINVAL),
                3,
                e(Errno::EEXIST),
                e(Errno::EINVAL),
                e(Errno::ENOENT),
                e(Errno::EINVAL),
                0
            ]
        );
    }

    #[test]
    fn send_ipi_wakes_a_blocked_sibling() {
        let mut first: Vec<_> = bring_up_second().into();
        first.extend([
            hypercall(EVTCHN, [8, 1, 0]), // slot 0 of vCPU 1 -> port 2
            hypercall(SCHED, YIELD),      // vCPU 1 blocks
            hypercall(EVTCHN, [9, 0b10, 0]),
            hypercall(SCHED, YIELD), // vCPU 1 runs again
            hypercall(SCHED, YIELD),
            hypercall(SCHED, POWEROFF),
        ]);
        let (_t, mut s) = two_vcpus(
            first,
            vec![hypercall(SCHED, [1, 0, 0]), hypercall(VCPU_OP, [7, 1, 0])],
        );
        take_trace();
        run_all(std::slice::from_mut(&mut s), &mut fake_host());
        let trace = take_trace();
        assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
        assert_eq!(results_of(&trace, 2), [0], "block returned 0 once woken");
        let woken = trace
            .iter()
            .position(|t| matches!(t, Traced::Ran(2, _)))
            .and_then(|first| {
                trace[first + 1..]
                    .iter()
                    .position(|t| matches!(t, Traced::Ran(2, _)))
            });
        assert!(woken.is_some(), "vCPU 1 ran again after the IPI: {trace:?}");
    }

    /// The IPI shootdown of bench/src/smp.rs on one CPU: vCPU 0 sends an IPI to its blocked
    /// sibling and yields until the sibling ran; the sibling blocks, then yields. Every switch
    /// is a directed one, and each is the one the general pass would make.
    #[test]
    fn a_yield_or_a_block_with_one_other_vcpu_ready_switches_to_it_directly() {
        let mut first: Vec<_> = bring_up_second().into();
        first.extend([
            hypercall(EVTCHN, [8, 1, 0]),    // slot 0 of vCPU 1 -> port 2
            hypercall(SCHED, YIELD),         // vCPU 1 (marked by its start) runs and blocks
            hypercall(EVTCHN, [9, 0b10, 0]), // its wait ends
            hypercall(SCHED, YIELD),         // vCPU 1 runs: block returns, it yields
            hypercall(SCHED, YIELD),         // vCPU 1 runs and takes itself down
            hypercall(SCHED, POWEROFF),
        ]);
        let second = vec![
            hypercall(SCHED, [1, 0, 0]),
            hypercall(SCHED, YIELD),
            hypercall(VCPU_OP, [7, 1, 0]),
        ];
        let (_t, mut s) = two_vcpus(first, second);
        let runstates = [0x20000, 0x20100];
        for (vcpu, gpa) in runstates.into_iter().enumerate() {
            s.domain.vcpus[vcpu].runstate.gpa = Some(gpa);
        }
        take_trace();
        DIRECT_SWITCHES_HERE.with(|n| n.set(0));
        // Time moves on as the hypervisor reads the clock.
        crate::common::testing::FAKE_TSC_STEP.with(|s| s.set(1_000));
        run_all(std::slice::from_mut(&mut s), &mut fake_host());
        crate::common::testing::FAKE_TSC_STEP.with(|s| s.set(0));
        let trace = take_trace();
        assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
        let order: Vec<u32> = trace
            .iter()
            .filter_map(|t| match *t {
                Traced::Ran(tag, _) => Some(tag),
                _ => None,
            })
            .collect();
        // One exit each time a vCPU runs, but vCPU 0's first four and its send_ipi.
        assert_eq!(order, [1, 1, 1, 1, 2, 1, 1, 2, 1, 2, 1], "{trace:?}");
        assert_eq!(results_of(&trace, 2), [0, 0], "block and yield returned 0");
        let switches = DIRECT_SWITCHES_HERE.with(Cell::get);
        // vCPU 0's three yields, vCPU 1's block, its yield and its going down.
        assert_eq!(switches, 6, "{trace:?}");
        // Both were charged for their slices; the run-state areas show the waits: vCPU 0
        // preempted by its yields (RUNNABLE while vCPU 1 ran), vCPU 1 blocked.
        use lamina_abi::vcpu::runstate::{BLOCKED, RUNNABLE, RUNNING};
        let mut times = [[0u64; 4]; 2];
        for (vcpu, gpa) in runstates.into_iter().enumerate() {
            assert!(s.domain.vcpus[vcpu].cpu_ns > 0, "vCPU {vcpu} charged");
            let mut area = [0u8; 48];
            _t.mem.read(gpa, &mut area).unwrap();
            let word = |i: usize| u64::from_le_bytes(area[8 * i..8 * i + 8].try_into().unwrap());
            times[vcpu] = [word(2), word(3), word(4), word(5)];
            let info = s.domain.vcpus[vcpu].runstate.info();
            assert_eq!(
                (word(0) as u32, word(1), times[vcpu]),
                (info.state, info.state_entry_time, info.time),
                "vCPU {vcpu}: the guest's copy is the hypervisor's"
            );
            assert!(
                times[vcpu].iter().sum::<u64>() <= word(1),
                "vCPU {vcpu}: {:?} before {}",
                times[vcpu],
                word(1)
            );
        }
        assert!(times.iter().all(|t| t[RUNNING as usize] > 0), "{times:?}");
        assert!(times[0][RUNNABLE as usize] > 0, "{times:?}");
        assert!(times[1][BLOCKED as usize] > 0, "{times:?}");
    }

    /// flush_tlb of the `count` addresses at guest-physical `array` on the vCPUs of `mask`.
    fn flush_list(
        mask: u64,
        array: u64,
        count: u64,
    ) -> (VmExit, crate::common::vcpu::GuestRegisters) {
        let mut call = hypercall(MEMORY_OP, [2, mask, array]);
        call.1.gpr[crate::common::vcpu::reg::R10] = count;
        call
    }

    #[test]
    fn listed_flushes_of_a_preempted_vcpu_add_up_and_overflow_into_a_whole_flush() {
        let array = 0x11000;
        let mut first: Vec<_> = bring_up_second().into();
        first.extend([
            hypercall(SCHED, YIELD),             // vCPU 1 runs once and yields back
            flush_list(0b10, array, 2),          // two pages...
            flush_list(0b10, array + 16, 1),     // ...and one more, while it waits
            hypercall(SCHED, YIELD),             // vCPU 1: those three pages alone
            flush_list(0b11, array, 12),         // 12 pages, the caller's too...
            flush_list(0b10, array + 8 * 12, 8), // ...and 8 more on vCPU 1: 20 > 16
            hypercall(SCHED, YIELD),
            flush_list(0b10, array, 17), // a list longer than kept: everything
            hypercall(SCHED, YIELD),
            hypercall(SCHED, POWEROFF),
        ]);
        let (t, mut s) = two_vcpus(
            first,
            vec![
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
            ],
        );
        for i in 0..20u64 {
            t.mem
                .write(array + 8 * i, &(0x4000_0000 + 0x1000 * i + 5).to_le_bytes())
                .unwrap();
        }
        take_trace();
        run_all(std::slice::from_mut(&mut s), &mut fake_host());
        let trace = take_trace();
        assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
        let page = |i: u64| 0x4000_0000 + 0x1000 * i;
        let flushes: Vec<&Traced> = trace
            .iter()
            .filter(|t| matches!(t, Traced::GuestTlbFlushed(_) | Traced::GuestPageFlushed(..)))
            .collect();
        let mut expected = vec![
            Traced::GuestPageFlushed(2, page(0)),
            Traced::GuestPageFlushed(2, page(1)),
            Traced::GuestPageFlushed(2, page(2)),
        ];
        // The caller's own 12 pages before it runs again, page by page.
        expected.extend((0..12).map(|i| Traced::GuestPageFlushed(1, page(i))));
        expected.push(Traced::GuestTlbFlushed(2));
        expected.push(Traced::GuestTlbFlushed(2));
        assert_eq!(flushes, expected.iter().collect::<Vec<_>>(), "{trace:?}");
    }

    #[test]
    fn a_preempted_vcpu_is_flushed_before_it_runs_again_and_only_then() {
        let mut first: Vec<_> = bring_up_second().into();
        first.extend([
            hypercall(SCHED, YIELD),             // vCPU 1 runs once and yields back
            hypercall(MEMORY_OP, [2, 0b10, 0]),  // flush_tlb(vCPU 1, everything)
            hypercall(MEMORY_OP, [2, 0, 0]),     // empty mask: EINVAL
            hypercall(MEMORY_OP, [2, 0b100, 0]), // vCPU 2 of 2: ENOENT
            hypercall(SCHED, YIELD),
            hypercall(SCHED, POWEROFF),
        ]);
        let (_t, mut s) = two_vcpus(
            first,
            vec![hypercall(SCHED, YIELD), hypercall(SCHED, YIELD)],
        );
        let runstate = 0x20000;
        s.domain.vcpus[1].runstate.gpa = Some(runstate);
        take_trace();
        run_all(std::slice::from_mut(&mut s), &mut fake_host());
        let trace = take_trace();
        let e = |errno: Errno| errno.to_return_value() as i64;
        assert_eq!(
            results_of(&trace, 1)[3..6],
            [0, e(Errno::EINVAL), e(Errno::ENOENT)]
        );
        let flushed = trace
            .iter()
            .position(|t| *t == Traced::GuestTlbFlushed(2))
            .expect("vCPU 1 was flushed");
        assert_eq!(
            trace
                .iter()
                .filter(|t| **t == Traced::GuestTlbFlushed(2))
                .count(),
            1
        );
        // vCPU 0's fourth entry makes the flush call.
        let call = trace
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t, Traced::Ran(1, _)))
            .nth(3)
            .map(|(at, _)| at)
            .unwrap();
        let next_run_of_two = trace[call..]
            .iter()
            .position(|t| matches!(t, Traced::Ran(2, _)))
            .map(|at| at + call)
            .expect("vCPU 1 ran again");
        assert!(
            call < flushed && flushed < next_run_of_two,
            "flushed after the call, before its next run: {trace:?}"
        );
        assert!(
            !trace.contains(&Traced::GuestTlbFlushed(1)),
            "the caller was not in the mask"
        );
    }

    #[test]
    fn yield_to_runs_the_named_sibling_next() {
        use crate::common::vcpu::GuestRegisters;
        // Three vCPUs: 0 yields to 2 although 1 had less CPU time.
        let (t, mut s) = two_vcpus(vec![], vec![]);
        let time = s.domain.time;
        let memory = core::mem::replace(&mut s.domain.memory, GuestMemory::empty());
        s.domain = Domain::with_vcpus(1, "t".into(), memory, time, 3);
        let mut first: Vec<(VmExit, GuestRegisters)> = vec![
            hypercall(VCPU_OP, [5, 1, 0x10000]),
            hypercall(VCPU_OP, [5, 2, 0x10000]),
            hypercall(VCPU_OP, [6, 1, 0]),
            hypercall(VCPU_OP, [6, 2, 0]),
            hypercall(SCHED, YIELD),
            hypercall(SCHED, [4, 2, 0]), // yield_to(2)
            hypercall(SCHED, [4, 0, 0]), // yield_to(itself): EINVAL
            hypercall(SCHED, [4, 3, 0]), // no vCPU 3: ENOENT
        ];
        first.push(hypercall(SCHED, POWEROFF));
        s.vcpus[0].as_mut().unwrap().script = first.into();
        let busy = || (0..6).map(|_| hypercall(SCHED, YIELD)).collect::<Vec<_>>();
        s.vcpus[1].as_mut().unwrap().script = busy().into();
        s.vcpus.push(Some(Box::new(MockVcpu {
            script: busy().into(),
            interrupt_flag: true,
            tag: 3,
            ..Default::default()
        })));
        // vCPU 1 starts behind: the fair choice after vCPU 0's yield_to is vCPU 1.
        s.domain.vcpus[2].vruntime = 1_000_000;
        let _ = &t;
        take_trace();
        run_all(std::slice::from_mut(&mut s), &mut fake_host());
        let trace = take_trace();
        let ran: Vec<u32> = trace
            .iter()
            .filter_map(|t| match t {
                Traced::Ran(who, _) => Some(*who),
                _ => None,
            })
            .collect();
        // vCPU 0's sixth entry follows its yield_to: the next one to run is vCPU 2 (tag 3).
        let after = ran
            .iter()
            .enumerate()
            .filter(|(_, who)| **who == 1)
            .nth(5)
            .map(|(at, _)| at)
            .unwrap();
        assert_eq!(ran[after + 1], 3, "{ran:?}");
        let e = |errno: Errno| errno.to_return_value() as i64;
        assert_eq!(results_of(&trace, 1)[5..7], [0, e(Errno::EINVAL)],);
        assert_eq!(results_of(&trace, 1)[7], e(Errno::ENOENT));
    }

    #[test]
    fn block_with_nothing_that_can_wake_stops_the_domain() {
        let (_t, mut s) = slot(vec![hypercall(SCHED, [1, 0, 0])]);
        let mut host = fake_host();
        run_all(std::slice::from_mut(&mut s), &mut host);
        assert!(
            matches!(&s.domain.state, DomainState::Ended(Ending::Fault(why)) if why.contains("blocked")),
            "{:?}",
            s.domain.state
        );
    }

    #[test]
    fn a_periodic_timer_wakes_a_blocked_vcpu_and_injects_the_upcall() {
        let (_t, mut s) = slot(vec![
            hypercall(EVTCHN, [1, 0, 0]),     // bind VIRQ_TIMER on vCPU 0 -> port 2
            hypercall(VCPU_OP, [4, 0, 0xf0]), // upcall vector 0xf0
            hypercall(VCPU_OP, [2, 0, 1_000_000]), // periodic 1 ms
            hypercall(SCHED, [1, 0, 0]),      // block
            hypercall(SCHED, POWEROFF),
        ]);
        let mut host = fake_host();
        take_trace();
        run_all(std::slice::from_mut(&mut s), &mut host);
        assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
        assert_eq!(host.halts, 1, "the CPU halted while the vCPU blocked");
        assert!(
            host.now.get() >= 1_000_000,
            "woken no earlier than the tick"
        );
        let injected: Vec<Traced> = take_trace()
            .into_iter()
            .filter(|t| matches!(t, Traced::Injected(..)))
            .collect();
        assert_eq!(
            injected,
            [Traced::Injected(1, 0xf0)],
            "the upcall was delivered once"
        );
    }

    #[test]
    fn block_with_an_event_already_pending_returns_at_once() {
        let (_t, mut s) = slot(vec![
            hypercall(EVTCHN, [2, 0, 0]), // bind IPI on vCPU 0 -> port 2
            hypercall(EVTCHN, [3, 2, 0]), // send on it
            hypercall(SCHED, [1, 0, 0]),  // block: returns at once
            hypercall(SCHED, POWEROFF),
        ]);
        let mut host = fake_host();
        run_all(std::slice::from_mut(&mut s), &mut host);
        assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
        assert_eq!(host.halts, 0);
    }

    #[test]
    fn poll_times_out_at_its_deadline() {
        let (t, mut s) = slot(vec![
            hypercall(EVTCHN, [2, 0, 0]),
            hypercall(SCHED, [3, 0x9000, 1]),
        ]);
        t.mem.write(0x9000, &2u32.to_le_bytes()).unwrap();
        let vcpu = s.vcpus[0].as_mut().unwrap();
        vcpu.script[1].1.gpr[crate::common::vcpu::reg::R10] = 5_000_000;
        vcpu.script.push_back(hypercall(SCHED, POWEROFF));
        let mut host = fake_host();
        run_all(std::slice::from_mut(&mut s), &mut host);
        assert_eq!(host.now.get(), 5_000_000);
        assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
    }

    #[test]
    fn a_send_across_domains_wakes_the_blocked_peer() {
        use core::sync::atomic::Ordering;
        crate::common::domain::DOMAIN_COUNT.fetch_max(2, Ordering::Relaxed);
        let (_t1, one) = slot_with_id(
            1,
            vec![
                hypercall(EVTCHN, [0, 2, 0]), // alloc_unbound for domain 2 -> port 2
                hypercall(SCHED, [1, 0, 0]),  // block until domain 2 sends
                hypercall(EVTCHN, [6, 2, 0]), // status of port 2
                hypercall(SCHED, POWEROFF),
            ],
        );
        let (_t2, two) = slot_with_id(
            2,
            vec![
                hypercall(EVTCHN, [7, 1, 2]), // bind_interdomain(domain 1, port 2) -> port 2
                hypercall(EVTCHN, [6, 2, 0]), // status of port 2
                hypercall(EVTCHN, [3, 2, 0]), // send on it
                hypercall(SCHED, POWEROFF),
            ],
        );
        let mut slots = [one, two];
        let mut host = fake_host();
        take_trace();
        run_all(&mut slots, &mut host);
        let trace = take_trace();
        for s in &slots {
            assert_eq!(
                s.domain.state,
                DomainState::Ended(Ending::Poweroff),
                "d{}",
                s.domain.id
            );
        }
        use lamina_abi::event_channel::{PortState, PortStatus};
        // Domain 2 saw both ends connected; domain 1 woke after domain 2 had powered off and
        // been torn down, which turned its end back into a raised port unbound for domain 2.
        let two = PortStatus::unpack(results_of(&trace, 2)[1] as u64);
        assert_eq!((two.state, two.detail), (PortState::Interdomain as u8, 1));
        let one = PortStatus::unpack(results_of(&trace, 1)[2] as u64);
        assert_eq!(
            (one.state, one.detail, one.pending),
            (PortState::Unbound as u8, 2, true)
        );
    }

    #[test]
    fn a_secondary_vcpu_starts_from_its_start_state_and_takes_itself_down() {
        let (_t, mut s) = two_vcpus(
            vec![
                hypercall(VCPU_OP, [5, 1, 0x10000]), // initialise vCPU 1
                hypercall(VCPU_OP, [6, 1, 0]),       // up
                hypercall(VCPU_OP, [8, 1, 0]),       // is_up -> 1
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                hypercall(VCPU_OP, [8, 1, 0]), // is_up -> 0: it took itself down
                hypercall(SCHED, POWEROFF),
            ],
            vec![
                hypercall(SCHED, YIELD),
                hypercall(VCPU_OP, [7, 1, 0]), // down of itself
            ],
        );
        take_trace();
        run_all(std::slice::from_mut(&mut s), &mut fake_host());
        let trace = take_trace();
        assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
        assert_eq!(results_of(&trace, 1), [0, 0, 1, 0, 0, 0, 0]);
        let first_of_two = trace.iter().position(|t| matches!(t, Traced::Ran(2, _)));
        let third_of_one = trace
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t, Traced::Ran(1, _)))
            .nth(2)
            .map(|(at, _)| at);
        assert!(
            first_of_two > third_of_one,
            "vCPU 1 ran only after up: {trace:?}"
        );
        assert_eq!(
            trace
                .iter()
                .filter(|t| matches!(t, Traced::Ran(2, _)))
                .count(),
            2,
            "and not after it took itself down"
        );
        assert!(s.vcpus.is_empty(), "torn down");
    }

    #[test]
    fn a_secondary_vcpu_gets_its_start_state_at_its_first_entry() {
        let (_t, mut s) = two_vcpus(vec![], vec![]);
        let mut secondary = MockVcpu::default();
        let args = [VcpuOp::Initialise as u64, 1, 0x10000, 0, 0];
        assert_eq!(
            crate::common::hypercall::testing::dispatch_for_test(&mut s.domain, 0, VCPU_OP, args),
            Ok(0)
        );
        let start = s.domain.vcpus[1].start.unwrap();
        assert!(s.domain.vcpus[1].requests.take(request::START) != 0);
        load_start_state(&mut secondary, &start);
        assert_eq!(secondary.rip, 0x12_3000);
        assert_eq!(secondary.state.cr3, 0x1000);
        assert_eq!(secondary.regs.gpr[reg::RDI], 77);
        assert!(!s.domain.vcpus[1].up, "initialise does not bring it up");
    }

    /// A WRMSR exit of `value` to `msr`.
    fn wrmsr(msr: u32, value: u64) -> (VmExit, crate::common::vcpu::GuestRegisters) {
        let mut regs = crate::common::vcpu::GuestRegisters::default();
        regs.gpr[reg::RCX] = u64::from(msr);
        regs.gpr[reg::RAX] = value & 0xffff_ffff;
        regs.gpr[reg::RDX] = value >> 32;
        (VmExit::MsrWrite, regs)
    }

    #[test]
    fn a_fixed_ipi_wakes_a_halted_sibling_and_is_injected_there() {
        const SVR: u32 = 0x80f;
        const ICR: u32 = 0x830;
        let mut second = vec![wrmsr(SVR, 0x1ff), (VmExit::Hlt, Default::default())];
        second.extend((0..10).map(|_| hypercall(SCHED, YIELD)));
        let (_t, mut s) = two_vcpus(
            vec![
                hypercall(VCPU_OP, [5, 1, 0x10000]), // initialise vCPU 1
                hypercall(VCPU_OP, [6, 1, 0]),       // up
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                wrmsr(ICR, 1 << 32 | 0x41), // fixed, physical ID 1
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                hypercall(SCHED, POWEROFF),
            ],
            second,
        );
        take_trace();
        run_all(std::slice::from_mut(&mut s), &mut fake_host());
        let trace = take_trace();
        assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
        let injected: Vec<_> = trace
            .iter()
            .filter(|t| matches!(t, Traced::Injected(..)))
            .collect();
        assert_eq!(injected, [&Traced::Injected(2, 0x41)], "{trace:?}");
        // vCPU 1 ran after its HLT only once the IPI came.
        let sent_at = trace
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t, Traced::Ran(1, _)))
            .nth(5)
            .map(|(at, _)| at);
        let second_run_after_hlt = trace
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t, Traced::Ran(2, _)))
            .nth(2)
            .map(|(at, _)| at);
        assert!(second_run_after_hlt > sent_at, "{trace:?}");
    }

    /// Runs `slots` as a machine with several CPUs would, on this one thread: the lock is
    /// dropped across every entry and the quick exits are handled without it.
    fn run_shared(slots: &mut [Slot<MockVcpu>], host: &mut FakeHost) {
        let machine = Machine::new(slots);
        machine.set_cpus_online(2);
        machine.run_cpu(0, host);
    }

    #[test]
    fn the_shared_path_counts_quick_exits_and_runs_the_same_scripts() {
        use crate::common::vcpu::GuestRegisters;
        let cpuid = (VmExit::Cpuid, GuestRegisters::default());
        let (_t, mut s) = slot(vec![
            hypercall(0, [0, 0, 0]),      // version: without the lock
            hypercall(99, [0, 0, 0]),     // unknown: without the lock
            cpuid,                        // CPUID: without the lock
            hypercall(EVTCHN, [2, 0, 0]), // bind IPI: under the lock -> port 2
            hypercall(EVTCHN, [3, 2, 0]), // send on it
            hypercall(SCHED, [1, 0, 0]),  // block: returns at once, pending
            hypercall(SCHED, POWEROFF),
        ]);
        take_trace();
        let mut host = fake_host();
        run_shared(std::slice::from_mut(&mut s), &mut host);
        let trace = take_trace();
        assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
        let version = u64::from(lamina_abi::abi_version()) as i64;
        assert_eq!(
            results_of(&trace, 1)[..2],
            [version, Errno::ENOSYS.to_return_value() as i64]
        );
        assert_eq!(results_of(&trace, 1)[3..6], [2, 0, 0]);
        assert_eq!(
            s.domain.exit_stats().of(ExitKind::Hypercall),
            6,
            "quick ones merged in"
        );
        assert_eq!(s.domain.exit_stats().of(ExitKind::Cpuid), 1);
        assert_eq!(host.halts, 0);
    }

    #[test]
    fn the_single_cpu_inner_loop_answers_its_own_exits_and_counts_them_once() {
        use crate::common::vcpu::GuestRegisters;
        let cpuid = (VmExit::Cpuid, GuestRegisters::default());
        let (_t, mut s) = slot(vec![
            hypercall(0, [0, 0, 0]),      // version: in the inner loop
            hypercall(99, [0, 0, 0]),     // unknown: in the inner loop
            cpuid,                        // CPUID: in the inner loop
            hypercall(EVTCHN, [2, 0, 0]), // bind IPI: leaves it -> port 2
            hypercall(0x7fff, [0, 0, 0]), // unknown again, after a slow one
            hypercall(EVTCHN, [3, 2, 0]), // send on it
            hypercall(SCHED, [1, 0, 0]),  // block: returns at once, pending
            hypercall(SCHED, POWEROFF),
        ]);
        take_trace();
        let mut host = fake_host();
        run_all(std::slice::from_mut(&mut s), &mut host);
        let trace = take_trace();
        assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
        let version = u64::from(lamina_abi::abi_version()) as i64;
        let enosys = Errno::ENOSYS.to_return_value() as i64;
        assert_eq!(results_of(&trace, 1)[..2], [version, enosys]);
        assert_eq!(results_of(&trace, 1)[3..7], [2, enosys, 0, 0]);
        let stats = s.domain.exit_stats();
        assert_eq!(stats.of(ExitKind::Hypercall), 7);
        assert_eq!(stats.of(ExitKind::Cpuid), 1);
        assert_eq!(stats.total(), 8);
        let counters = stats.to_counters();
        assert_eq!(counters.by_hypercall[0], 1);
        assert_eq!(counters.by_hypercall[15], 2);
        assert_eq!(counters.by_kind[0], 7);
        assert_eq!(host.halts, 0);
    }

    /// On one CPU, a host interrupt before the slice's end with no timer of the domain due
    /// (the host's work) is answered inside the slice and the guest runs on; with a timer of
    /// the domain due the slice ends, as before, and another ready vCPU that has had less CPU
    /// time runs first.
    #[test]
    fn host_work_is_done_inside_the_slice_on_one_cpu() {
        // The tag of the vCPU that ran after domain 1's host interrupt, and the host's work
        // done inside slices.
        let after_interrupt = |timer_due: bool| {
            let (_t1, s1) = slot_with_id(
                1,
                vec![
                    (VmExit::ExternalInterrupt, Default::default()),
                    hypercall(SCHED, POWEROFF),
                ],
            );
            let (_t2, s2) = slot_with_id(2, vec![hypercall(SCHED, POWEROFF)]);
            let mut slots = [s1, s2];
            // Domain 1 first; after any time of its own, domain 2 is the least served.
            slots[1].domain.vcpus[0].vruntime = 1;
            if timer_due {
                slots[0].domain.vcpus[0].timers.singleshot = Some(1);
            }
            let mut host = fake_host();
            take_trace();
            crate::common::testing::FAKE_TSC_STEP.with(|s| s.set(1_000));
            run_all(&mut slots, &mut host);
            crate::common::testing::FAKE_TSC_STEP.with(|s| s.set(0));
            let ran: Vec<u32> = take_trace()
                .into_iter()
                .filter_map(|t| match t {
                    Traced::Ran(tag, _) => Some(tag),
                    _ => None,
                })
                .collect();
            assert_eq!(ran[0], 1);
            let interrupts = slots[0].domain.exit_stats().of(ExitKind::ExternalInterrupt);
            assert_eq!(interrupts, 1);
            (ran[1], host.works_in_slice)
        };
        assert_eq!(
            after_interrupt(false),
            (1, 1),
            "the host's work, in the slice"
        );
        assert_eq!(after_interrupt(true), (2, 0), "a timer of the domain due");
    }

    #[test]
    fn a_secondary_vcpu_takes_itself_down_on_the_shared_path_too() {
        let (_t, mut s) = two_vcpus(
            vec![
                hypercall(VCPU_OP, [5, 1, 0x10000]),
                hypercall(VCPU_OP, [6, 1, 0]),
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                hypercall(VCPU_OP, [8, 1, 0]),
                hypercall(SCHED, POWEROFF),
            ],
            vec![hypercall(SCHED, YIELD), hypercall(VCPU_OP, [7, 1, 0])],
        );
        take_trace();
        run_shared(std::slice::from_mut(&mut s), &mut fake_host());
        let trace = take_trace();
        assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
        assert_eq!(results_of(&trace, 1), [0, 0, 0, 0, 0, 0]);
        assert!(s.vcpus.is_empty(), "torn down once both vCPUs were back");
    }

    const DOMCTL: u64 = 9;

    /// Two domains: 1 privileged, both playing their scripts.
    fn pair(
        one: Vec<(VmExit, crate::common::vcpu::GuestRegisters)>,
        two: Vec<(VmExit, crate::common::vcpu::GuestRegisters)>,
    ) -> ([TestMemory; 2], [Slot<MockVcpu>; 2]) {
        use core::sync::atomic::Ordering;
        crate::common::domain::DOMAIN_COUNT.fetch_max(2, Ordering::Relaxed);
        let (t1, mut s1) = slot_with_id(1, one);
        s1.domain.privileged = true;
        let (t2, s2) = slot_with_id(2, two);
        ([t1, t2], [s1, s2])
    }

    #[test]
    fn a_paused_domain_gets_no_cpu_until_it_is_unpaused() {
        let (_t, mut slots) = pair(
            vec![
                hypercall(DOMCTL, [2, 2, 0]), // pause domain 2
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                hypercall(DOMCTL, [3, 2, 0]), // unpause it
                hypercall(SCHED, YIELD),
                hypercall(SCHED, POWEROFF),
            ],
            vec![
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                hypercall(SCHED, POWEROFF),
            ],
        );
        let mut host = fake_host();
        take_trace();
        run_all(&mut slots, &mut host);
        let trace = take_trace();
        let runs: Vec<u32> = trace
            .iter()
            .filter_map(|t| match t {
                Traced::Ran(who, _) => Some(*who),
                _ => None,
            })
            .collect();
        // Domain 1's fifth entry is the unpause: domain 2 never ran before it.
        let unpause = runs
            .iter()
            .enumerate()
            .filter(|(_, who)| **who == 1)
            .nth(4)
            .map(|(at, _)| at)
            .unwrap();
        assert!(!runs[..unpause].contains(&2), "{runs:?}");
        assert_eq!(runs.iter().filter(|who| **who == 2).count(), 3, "{runs:?}");
        assert_eq!(results_of(&trace, 1)[..5], [0, 0, 0, 0, 0]);
        for s in &slots {
            assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
        }
    }

    #[test]
    fn a_paused_domain_no_one_can_unpause_is_stopped() {
        let (_t, mut slots) = pair(
            vec![
                hypercall(DOMCTL, [2, 2, 0]), // pause domain 2
                hypercall(SCHED, POWEROFF),
            ],
            vec![hypercall(SCHED, POWEROFF)],
        );
        let mut host = fake_host();
        take_trace();
        run_all(&mut slots, &mut host);
        assert!(!take_trace().contains(&Traced::Ran(2, 0)), "it never ran");
        assert_eq!(slots[1].domain.state, DomainState::Ended(Ending::Paused));
        assert!(
            slots
                .iter()
                .all(|s| s.domain.torn_down && s.vcpus.is_empty())
        );
        assert_eq!(host.halts, 0);
    }

    #[test]
    fn a_paused_domain_is_not_stopped_while_a_privileged_vcpu_runs_on_another_cpu() {
        let (_t1, mut control) = slot_with_id(1, vec![]);
        control.domain.privileged = true;
        let (_t2, mut paused) = slot_with_id(2, vec![]);
        paused.domain.paused = true;
        // CPU 1 has the control domain's vCPU: nothing is ready here and no deadline is set,
        // but that vCPU may unpause domain 2 at any moment.
        let taken = control.vcpus[0].take();
        let mut slots = [control, paused];
        assert!(!stop_unpausable(&mut slots, true));
        assert_eq!(slots[1].domain.state, DomainState::Runnable);
        // Back, and still nothing due: now no one will.
        slots[0].vcpus[0] = taken;
        assert!(stop_unpausable(&mut slots, true));
        assert_eq!(slots[1].domain.state, DomainState::Ended(Ending::Paused));
    }

    #[test]
    fn destroy_tears_the_domain_down_before_returning_and_its_peer_is_notified() {
        use crate::common::memory::guest_memory::OwnedRam;
        use crate::common::memory::phys;
        use crate::common::output::testing::take_lines;
        use lamina_abi::event_channel::{PortState, PortStatus};
        let (_t, mut slots) = pair(
            vec![
                hypercall(SCHED, YIELD),
                hypercall(EVTCHN, [7, 2, 2]), // bind_interdomain(domain 2, port 2) -> port 2
                hypercall(DOMCTL, [4, 2, 0]), // destroy domain 2
                hypercall(EVTCHN, [6, 2, 0]), // status of port 2
                hypercall(SCHED, POWEROFF),
            ],
            vec![
                hypercall(EVTCHN, [0, 1, 0]), // alloc_unbound for domain 1 -> port 2
                hypercall(SCHED, YIELD),
                hypercall(SCHED, YIELD),
                hypercall(SCHED, POWEROFF),
            ],
        );
        phys::testing::set(64 << 20, 0);
        slots[1].domain.ram = Some(OwnedRam::new(0, 4 << 20, phys::testing::release));
        let mut host = fake_host();
        take_trace();
        take_lines();
        run_all(&mut slots, &mut host);
        let trace = take_trace();
        assert_eq!(
            results_of(&trace, 1)[..3],
            [0, 2, 0],
            "yield, bind, destroy"
        );
        let status = PortStatus::unpack(results_of(&trace, 1)[3] as u64);
        assert_eq!(
            (status.state, status.detail, status.pending),
            (PortState::Unbound as u8, 2, true),
            "when destroy returned, the peer's end was closed"
        );
        let two = &slots[1];
        assert_eq!(two.domain.state, DomainState::Ended(Ending::Destroyed));
        assert!(two.domain.torn_down && two.vcpus.is_empty() && two.domain.ram.is_none());
        assert_eq!(two.domain.memory.size(), 0);
        assert_eq!(phys::figures(), (64 << 20, 4 << 20), "its RAM went back");
        let lines = take_lines();
        assert!(
            lines.iter().any(|l| l.starts_with(
                "lamina: domain 2 t torn down: 4096 KiB RAM and 0 KiB of hypervisor structures scrubbed and returned, 4096 KiB free, scrub_tsc="
            )),
            "{lines:?}"
        );
        assert_eq!(slots[0].domain.state, DomainState::Ended(Ending::Poweroff));
    }

    #[test]
    fn a_vcpu_waiting_only_for_a_domain_that_ended_is_stopped() {
        let (_t, mut slots) = pair(
            vec![
                hypercall(EVTCHN, [0, 2, 0]), // offer a port to domain 2, which never binds
                hypercall(SCHED, [1, 0, 0]),  // block: domain 2 could send
                hypercall(SCHED, POWEROFF),
            ],
            vec![hypercall(SCHED, YIELD), hypercall(SCHED, POWEROFF)],
        );
        let mut host = fake_host();
        run_all(&mut slots, &mut host);
        assert_eq!(
            slots[0].domain.state,
            DomainState::Ended(Ending::Fault(String::from(
                crate::common::domain::NEVER_WAKES
            ))),
            "reported instead of halting for ever"
        );
        assert_eq!(host.halts, 0);
    }

    #[test]
    fn the_ram_of_a_torn_down_domain_comes_back_a_slice_at_a_time() {
        use crate::common::domain::NoPeers;
        use crate::common::domain::teardown::SCRUB_SLICE_BYTES;
        use crate::common::memory::guest_memory::OwnedRam;
        use crate::common::memory::phys;
        use crate::common::output::testing::take_lines;
        let (_t, mut s) = slot(vec![]);
        phys::testing::set(64 << 20, 0);
        s.domain.ram = Some(OwnedRam::new(
            0,
            4 * SCRUB_SLICE_BYTES,
            phys::testing::release,
        ));
        assert!(tear_down(&mut s, &mut NoPeers).is_none(), "still running");
        s.domain.end(Ending::Crash);
        take_lines();
        let mut scrub = tear_down(&mut s, &mut NoPeers).unwrap();
        assert!(s.domain.torn_down && s.vcpus.is_empty() && s.domain.memory.size() == 0);
        assert_eq!(
            s.domain.memory_bytes(),
            4 * SCRUB_SLICE_BYTES,
            "memory_bytes counts the RAM until it is back"
        );
        assert!(tear_down(&mut s, &mut NoPeers).is_none(), "only once");
        for slice in 1..4 {
            assert!(!scrub.step());
            assert_eq!(phys::figures().1, slice * SCRUB_SLICE_BYTES);
            assert_eq!(s.domain.memory_bytes(), (4 - slice) * SCRUB_SLICE_BYTES);
        }
        assert!(take_lines().is_empty(), "reported once all is back");
        assert!(scrub.step());
        assert_eq!(s.domain.memory_bytes(), 0);
        let lines = take_lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with(
                "lamina: domain 1 t torn down: 1024 KiB RAM and 0 KiB of hypervisor structures scrubbed and returned, 1024 KiB free, scrub_tsc="
            ),
            "{lines:?}"
        );
    }

    #[test]
    fn run_all_returns_once_every_domain_and_all_their_ram_are_back() {
        use crate::common::memory::guest_memory::OwnedRam;
        use crate::common::memory::phys;
        let (_t, mut slots) = pair(
            vec![hypercall(SCHED, YIELD), hypercall(SCHED, POWEROFF)],
            vec![hypercall(SCHED, POWEROFF)],
        );
        phys::testing::set(64 << 20, 0);
        for s in &mut slots {
            s.domain.ram = Some(OwnedRam::new(0, 8 << 20, phys::testing::release));
        }
        run_all(&mut slots, &mut fake_host());
        assert_eq!(phys::figures().1, 16 << 20);
        assert!(slots.iter().all(|s| s.domain.ram.is_none()));
    }

    #[test]
    fn a_revoked_grant_flushes_the_grantees_translations_before_it_runs_again() {
        use crate::common::memory::nested_map::testing::fake_nested_map;
        use core::sync::atomic::Ordering;
        use lamina_abi::layout::GRANT_WINDOW_GPA;
        const GRANT_OP: u64 = 8;
        const YIELD: [u64; 3] = [0, 0, 0];
        crate::common::domain::DOMAIN_COUNT.fetch_max(2, Ordering::Relaxed);
        // Domain 1 grants a page to 2 and powers off once 2 has mapped it.
        let (_t1, mut one) = slot_with_id(
            1,
            vec![
                hypercall(GRANT_OP, [0, 2, 0x20000]), // grant_access -> reference 0
                hypercall(SCHED, YIELD),
                hypercall(SCHED, POWEROFF),
            ],
        );
        let mut map = hypercall(GRANT_OP, [2, 1, 0]); // map(domain 1, reference 0, ...)
        map.1.gpr[reg::R10] = GRANT_WINDOW_GPA;
        let (_t2, mut two) = slot_with_id(
            2,
            vec![map, hypercall(SCHED, YIELD), hypercall(SCHED, POWEROFF)],
        );
        one.domain.nested = Some(fake_nested_map().0);
        two.domain.nested = Some(fake_nested_map().0);
        let mut slots = [one, two];
        let mut host = fake_host();
        take_trace();
        run_all(&mut slots, &mut host);
        let trace = take_trace();
        let invalidations = |tag| {
            trace
                .iter()
                .filter(|t| **t == Traced::NestedInvalidated(tag))
                .count()
        };
        let [one, two] = &slots;
        assert_eq!(one.domain.state, DomainState::Ended(Ending::Poweroff));
        assert!(one.domain.nested.is_none(), "released when it ended");
        assert_eq!(invalidations(1), 0, "its own mappings never changed");
        assert_eq!(
            invalidations(2),
            1,
            "the revocation was flushed before the grantee ran again"
        );
        // Domain 2 ended too and was released: its page of zeros is gone.
        assert_eq!(two.domain.state, DomainState::Ended(Ending::Poweroff));
        assert_eq!(two.domain.grants.slot_at(GRANT_WINDOW_GPA), None);
    }

    #[test]
    #[ignore]
    fn profile_yield_pair() {
        let n = 20000;
        let (_t, mut slots) = pair(
            (0..n)
                .map(|_| hypercall(SCHED, [0, 0, 0]))
                .chain([hypercall(SCHED, [2, 0, 0])])
                .collect(),
            (0..n)
                .map(|_| hypercall(SCHED, [0, 0, 0]))
                .chain([hypercall(SCHED, [2, 0, 0])])
                .collect(),
        );
        run_all(&mut slots, &mut fake_host());
    }

    /// Two domains that yield to each other `SWITCHES` times: the cost of a pass of the
    /// scheduler, for a profiler (`valgrind --tool=callgrind`, release build).
    #[test]
    #[ignore]
    fn profile_yield_switches() {
        const SWITCHES: usize = 20_000;
        let script = || {
            let mut s: Vec<_> = (0..SWITCHES).map(|_| hypercall(SCHED, YIELD)).collect();
            s.push(hypercall(SCHED, POWEROFF));
            s
        };
        let (_t1, one) = slot_with_id(1, script());
        let (_t2, two) = slot_with_id(2, script());
        let mut slots = [one, two];
        let mut host = fake_host();
        run_all(&mut slots, &mut host);
        assert!(
            slots
                .iter()
                .all(|s| s.domain.state == DomainState::Ended(Ending::Poweroff))
        );
    }

    /// As [`profile_yield_switches`], with 64 idle domains polling a port for ever beside the
    /// two: what each idle domain adds to a pass.
    #[test]
    #[ignore]
    fn profile_yield_switches_beside_idle_domains() {
        use core::sync::atomic::Ordering;
        const SWITCHES: usize = 20_000;
        const IDLE: u32 = 64;
        crate::common::domain::DOMAIN_COUNT.fetch_max(IDLE + 2, Ordering::Relaxed);
        let script = || {
            let mut s: Vec<_> = (0..SWITCHES).map(|_| hypercall(SCHED, YIELD)).collect();
            s.push(hypercall(SCHED, POWEROFF));
            s
        };
        let mut memories = Vec::new();
        let mut slots = Vec::new();
        for id in 1..=2 {
            let (t, s) = slot_with_id(id, script());
            memories.push(t);
            slots.push(s);
        }
        for id in 3..=IDLE + 2 {
            // alloc_unbound for domain 1 (port 2), then a poll of port 2 with no deadline,
            // whose list sits at 0x1000 of its RAM.
            let (t, s) = slot_with_id(
                id,
                vec![
                    hypercall(EVTCHN, [0, 1, 0]),
                    hypercall(SCHED, [3, 0x1000, 1]),
                ],
            );
            t.mem.write(0x1000, &2u32.to_le_bytes()).unwrap();
            memories.push(t);
            slots.push(s);
        }
        let mut host = fake_host();
        run_all(&mut slots, &mut host);
        assert!(
            slots[..2]
                .iter()
                .all(|s| s.domain.state == DomainState::Ended(Ending::Poweroff))
        );
    }

    /// Domain 1 of the batch preemption tests: a yield, then a multicall at 0x9000 of 64
    /// alloc_unbound entries (each allocates the next port: 2 to 65), then poweroff.
    fn domain_with_a_long_batch() -> (TestMemory, Slot<MockVcpu>) {
        use lamina_abi::event_channel::DOMID_SELF;
        let (t1, one) = slot_with_id(
            1,
            vec![
                hypercall(SCHED, YIELD),
                hypercall(MULTICALL, [0x9000, 64, 0]),
                hypercall(SCHED, POWEROFF),
            ],
        );
        for i in 0..64 {
            put_entry(&t1, 0x9000, i, EVTCHN, [0, DOMID_SELF, 0, 0, 0]); // alloc_unbound
        }
        (t1, one)
    }

    /// Issue #11: domain 1's 64-entry batch runs past domain 2's timer (the end of its slice):
    /// it stops between entries, domain 2 runs, and the batch is finished before domain 1's
    /// guest runs again, every entry once and in order (each allocates the next port), the
    /// call counted once, and it returns as a batch does. `shared`: the loop of a machine with
    /// several CPUs, else the one-CPU loop.
    fn a_batch_stops_at_another_domains_deadline_and_finishes_before_its_guest_runs(shared: bool) {
        const PERIOD: u64 = lamina_abi::vcpu::PERIOD_MIN_NS;
        crate::common::domain::DOMAIN_COUNT.fetch_max(2, core::sync::atomic::Ordering::Relaxed);
        let (t1, one) = domain_with_a_long_batch();
        // Domain 2 sleeps until its periodic timer, due PERIOD after it is set.
        let (_t2, two) = slot_with_id(
            2,
            vec![
                hypercall(EVTCHN, [1, 0, 0]), // bind VIRQ_TIMER
                hypercall(VCPU_OP, [VcpuOp::SetPeriodicTimer as u64, 0, PERIOD]),
                hypercall(SCHED, [1, 0, 0]), // block
                hypercall(SCHED, POWEROFF),
            ],
        );
        let mut slots = [one, two];
        let mut host = fake_host();
        // The hypervisor's work takes time: 2 us a TSC read, so that the batch (a read an
        // entry) runs past the timer (about entry 20).
        crate::common::testing::FAKE_TSC_STEP.with(|s| s.set(2_000));
        take_trace();
        if shared {
            run_shared(&mut slots, &mut host);
        } else {
            run_all(&mut slots, &mut host);
        }
        crate::common::testing::FAKE_TSC_STEP.with(|s| s.set(0));
        let trace = take_trace();
        assert!(
            slots
                .iter()
                .all(|s| s.domain.state == DomainState::Ended(Ending::Poweroff))
        );
        let runs_of_one: Vec<usize> = trace
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t, Traced::Ran(1, _)))
            .map(|(at, _)| at)
            .collect();
        assert_eq!(
            results_of(&trace, 1),
            [0, 64],
            "domain 1 ran three times (never inside its batch), the batch returned 64: {trace:?}"
        );
        // Its fourth run: after its block returned.
        let woken_two = trace
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t, Traced::Ran(2, _)))
            .nth(3)
            .map(|(at, _)| at)
            .expect("domain 2 woke from its block");
        assert!(
            runs_of_one[1] < woken_two && woken_two < runs_of_one[2],
            "domain 2 ran while the batch was stopped: {trace:?}"
        );
        // Port 0 is never allocated and port 1 is the console's: 2 to 65.
        let results: Vec<u64> = (0..64).map(|i| entry_result(&t1, 0x9000, i)).collect();
        assert!(
            results.iter().zip(2..).all(|(&r, port)| r == port),
            "every entry ran once, in order: {results:?}"
        );
        assert!(slots[0].domain.vcpus[0].preempted_batch.is_none());
        let counters = slots[0].domain.vcpus[0].stats.to_counters();
        assert_eq!(counters.by_hypercall[MULTICALL as usize], 1, "counted once");
    }

    /// A domain destroyed while one of its vCPUs waits to finish a batch: the rest of the
    /// batch never runs, its vCPU never runs guest code again, and the kept copy goes with the
    /// teardown.
    #[test]
    fn a_batch_waiting_to_be_finished_goes_with_its_destroyed_domain() {
        const PERIOD: u64 = lamina_abi::vcpu::PERIOD_MIN_NS;
        const DOMCTL_OP: u64 = lamina_abi::Hypercall::DomctlOp as u64;
        let destroy = lamina_abi::domctl::DomctlOp::Destroy as u64;
        crate::common::domain::DOMAIN_COUNT.fetch_max(2, core::sync::atomic::Ordering::Relaxed);
        let (t1, one) = domain_with_a_long_batch();
        let (_t2, mut two) = slot_with_id(
            2,
            vec![
                hypercall(EVTCHN, [1, 0, 0]),
                hypercall(VCPU_OP, [VcpuOp::SetPeriodicTimer as u64, 0, PERIOD]),
                hypercall(SCHED, [1, 0, 0]),
                hypercall(DOMCTL_OP, [destroy, 1, 0]),
                hypercall(SCHED, POWEROFF),
            ],
        );
        two.domain.privileged = true;
        let mut slots = [one, two];
        let mut host = fake_host();
        crate::common::testing::FAKE_TSC_STEP.with(|s| s.set(2_000));
        take_trace();
        run_all(&mut slots, &mut host);
        crate::common::testing::FAKE_TSC_STEP.with(|s| s.set(0));
        let trace = take_trace();
        let [one, two] = &slots;
        assert_eq!(one.domain.state, DomainState::Ended(Ending::Destroyed));
        assert_eq!(two.domain.state, DomainState::Ended(Ending::Poweroff));
        assert_eq!(
            results_of(&trace, 1),
            [0],
            "never ran after its batch began: {trace:?}"
        );
        assert_eq!(entry_result(&t1, 0x9000, 0), 2, "the batch had begun");
        assert_eq!(
            entry_result(&t1, 0x9000, 63),
            u64::MAX,
            "and was never finished"
        );
        let state = &one.domain.vcpus[0];
        assert!(state.preempted_batch.is_none() && state.spare_batch.is_none());
    }

    #[test]
    fn a_batch_stops_at_another_domains_deadline_on_one_cpu() {
        a_batch_stops_at_another_domains_deadline_and_finishes_before_its_guest_runs(false);
    }

    #[test]
    fn a_batch_stops_at_another_domains_deadline_on_the_shared_path() {
        a_batch_stops_at_another_domains_deadline_and_finishes_before_its_guest_runs(true);
    }

    /// A reference to the machine that other test threads may use: the machine's locks are
    /// what make sharing it sound, as on the CPUs (`main.rs` passes its address to the APs).
    struct SharedRef<'r, T>(&'r T);
    // SAFETY: see above; the tests reach the machine only through its locking methods.
    unsafe impl<T> Sync for SharedRef<'_, T> {}
    // SAFETY: as for `Sync`.
    unsafe impl<T> Send for SharedRef<'_, T> {}

    const GRANT_OP: u64 = 8;
    const MULTICALL: u64 = 6;

    /// Exit `exit` of vCPU 0 of slot `index` (a domain whose id is `index + 1`), handled as a
    /// CPU of a machine with several CPUs handles it: classified from its registers, then
    /// under the locks that says ([`Machine::handle_locked`]). RAX after it.
    fn exit_on_shared_path(
        machine: &Machine<'_, MockVcpu>,
        index: usize,
        vcpu: &mut MockVcpu,
        (exit, regs): (VmExit, crate::common::vcpu::GuestRegisters),
    ) -> u64 {
        vcpu.regs = regs;
        let reach = reach::of_exit(&exit, vcpu, index as u32 + 1);
        let hold = match reach {
            Reach::Any => Hold::Exclusive(machine.table.exclusive()),
            _ => Hold::Shared(machine.hold_own(index)),
        };
        let (hold, next) =
            machine.handle_locked(hold, index, 0, vcpu, exit, reach, &mut fake_host());
        drop(hold);
        assert_eq!(next, Next::Resume);
        vcpu.regs.gpr[reg::RAX]
    }

    /// A grant copy request (24 bytes) at `at` of `t`.
    fn put_copy(t: &TestMemory, at: u64, r: lamina_abi::grant_table::GrantCopy) {
        let mut raw = [0u8; 24];
        raw[0..2].copy_from_slice(&r.domain.to_le_bytes());
        raw[2] = r.direction;
        raw[4..8].copy_from_slice(&r.grant_ref.to_le_bytes());
        raw[8..12].copy_from_slice(&r.offset.to_le_bytes());
        raw[12..16].copy_from_slice(&r.len.to_le_bytes());
        raw[16..24].copy_from_slice(&r.local_gpa.to_le_bytes());
        t.mem.write(at, &raw).unwrap();
    }

    /// Multicall entry `i` of the array at `at`: `op` with `args`.
    fn put_entry(t: &TestMemory, at: u64, i: u64, op: u64, args: [u64; 5]) {
        let base = at + i * 56;
        t.mem.write(base, &op.to_le_bytes()).unwrap();
        for (k, a) in args.iter().enumerate() {
            t.mem
                .write(base + 8 + 8 * k as u64, &a.to_le_bytes())
                .unwrap();
        }
        t.mem.write(base + 48, &u64::MAX.to_le_bytes()).unwrap();
    }

    fn entry_result(t: &TestMemory, at: u64, i: u64) -> u64 {
        let mut raw = [0u8; 8];
        t.mem.read(at + i * 56 + 48, &mut raw).unwrap();
        u64::from_le_bytes(raw)
    }

    /// Three domains; domain 1 (slot 0) grants its page at 0x20000, filled with `0xa5`, to
    /// domain 2 (slot 1): grant reference 0.
    fn three_with_a_grant() -> (Vec<TestMemory>, Vec<Slot<MockVcpu>>) {
        use core::sync::atomic::Ordering;
        crate::common::domain::DOMAIN_COUNT.fetch_max(3, Ordering::Relaxed);
        let (memories, slots): (Vec<_>, Vec<_>) =
            (1..=3).map(|id| slot_with_id(id, vec![])).unzip();
        memories[0].mem.write(0x20000, &[0xa5; 4096]).unwrap();
        (memories, slots)
    }

    fn copy_from_grant(local_gpa: u64, len: u32) -> lamina_abi::grant_table::GrantCopy {
        lamina_abi::grant_table::GrantCopy {
            domain: 1,
            direction: lamina_abi::grant_table::copy_direction::FROM_GRANT,
            grant_ref: 0,
            offset: 0,
            len,
            local_gpa,
            ..Default::default()
        }
    }

    /// Issue #12: a grant copy and a multicall of grant copies (domain 2 reaching domain 1) run while another CPU holds the table shared and an unrelated domain's lock
    /// (domain 3), as it does while it handles an exit of its own: neither takes the table
    /// exclusive (which would wait for that CPU) nor domain 3's lock.
    #[test]
    fn grant_copy_and_multicall_run_while_another_cpu_holds_an_unrelated_domain() {
        let (t, mut slots) = three_with_a_grant();
        let machine = Machine::new(&mut slots);
        machine.set_cpus_online(2);
        let mut one = MockVcpu::default();
        let granted =
            exit_on_shared_path(&machine, 0, &mut one, hypercall(GRANT_OP, [0, 2, 0x20000]));
        assert_eq!(granted, 0, "grant reference 0");
        put_copy(&t[1], 0x1000, copy_from_grant(0x30000, 64));
        put_copy(&t[1], 0x1100, copy_from_grant(0x31000, 4096));
        put_entry(&t[1], 0x2000, 0, GRANT_OP, [4, 0x1100, 0, 0, 0]);
        put_entry(&t[1], 0x2000, 1, GRANT_OP, [1, 7, 0, 0, 0]); // end_access: its own
        put_entry(&t[1], 0x2000, 2, GRANT_OP, [4, 0x1000, 0, 0, 0]);
        let machine = SharedRef(&machine);
        let other_cpu = (machine.0.table.shared(), machine.0.locks[2].lock_own());
        let (finished, results) = std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                let machine = &machine;
                let mut two = MockVcpu::default();
                let copied = exit_on_shared_path(
                    machine.0,
                    1,
                    &mut two,
                    hypercall(GRANT_OP, [4, 0x1000, 0]),
                );
                let run = exit_on_shared_path(
                    machine.0,
                    1,
                    &mut two,
                    hypercall(MULTICALL, [0x2000, 3, 0]),
                );
                (copied, run)
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !worker.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let finished = worker.is_finished();
            drop(other_cpu);
            (finished, worker.join().unwrap())
        });
        assert!(
            finished,
            "the copy or the multicall waited for the other CPU (table exclusive or domain 3)"
        );
        assert_eq!(results, (64, 3));
        assert_eq!(
            [0, 1, 2].map(|i| entry_result(&t[1], 0x2000, i)),
            [4096, Errno::ENOENT.to_return_value(), 64]
        );
        let mut copied = [0u8; 4096 + 64];
        t[1].mem.read(0x30000, &mut copied[..64]).unwrap();
        t[1].mem.read(0x31000, &mut copied[64..]).unwrap();
        assert!(copied.iter().all(|&b| b == 0xa5));
    }

    /// The peer a call names in guest memory comes before it in the table and another CPU
    /// holds it: the call stops before it acts (a multicall after the entries before),
    /// waits for that lock in domain order with its own, and is finished from where it
    /// stopped, with the batch as it was copied when the call began (docs/abi.md 2.5), even
    /// though the guest rewrote it meanwhile.
    #[test]
    fn a_busy_peer_before_the_caller_is_waited_for_in_order_and_the_batch_is_not_read_again() {
        let (t, mut slots) = three_with_a_grant();
        let machine = Machine::new(&mut slots);
        machine.set_cpus_online(2);
        let mut one = MockVcpu::default();
        let granted =
            exit_on_shared_path(&machine, 0, &mut one, hypercall(GRANT_OP, [0, 2, 0x20000]));
        assert_eq!(granted, 0);
        put_copy(&t[1], 0x1000, copy_from_grant(0x30000, 128));
        // A grant to domain 3 (after domain 2: waited for), then the copy from domain 1.
        put_entry(&t[1], 0x2000, 0, GRANT_OP, [0, 3, 0x40000, 0, 0]);
        put_entry(&t[1], 0x2000, 1, GRANT_OP, [4, 0x1000, 0, 0, 0]);
        let machine = SharedRef(&machine);
        let backed_off = || locking::BACKED_OFF.load(core::sync::atomic::Ordering::SeqCst);
        let before = backed_off();
        let other_cpu = (machine.0.table.shared(), machine.0.locks[0].lock_own());
        let (waited, result) = std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                let machine = &machine;
                let mut two = MockVcpu::default();
                exit_on_shared_path(machine.0, 1, &mut two, hypercall(MULTICALL, [0x2000, 2, 0]))
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while backed_off() == before && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            let waited = !worker.is_finished();
            // Too late: the batch was copied before the call stopped.
            put_entry(&t[1], 0x2000, 1, GRANT_OP, [1, 5, 0, 0, 0]);
            drop(other_cpu);
            (waited, worker.join().unwrap())
        });
        assert!(backed_off() > before, "it backed off");
        assert!(waited, "it waited for domain 1's lock");
        assert_eq!(result, 2);
        assert_eq!(
            [0, 1].map(|i| entry_result(&t[1], 0x2000, i)),
            [0, 128],
            "entry 0 ran once (reference 0), entry 1 as copied"
        );
        let grants = &slots[1].domain.grants;
        assert!(
            grants.grant(0).is_some() && grants.grant(1).is_none(),
            "one grant, not two: the batch went on from entry 1"
        );
        let mut copied = [0u8; 128];
        t[1].mem.read(0x30000, &mut copied).unwrap();
        assert!(copied.iter().all(|&b| b == 0xa5));
    }

    #[test]
    fn a_machine_built_again_over_the_same_domains_still_hears_their_requests() {
        use core::sync::atomic::Ordering;
        crate::common::domain::DOMAIN_COUNT.fetch_max(2, Ordering::Relaxed);
        let (_t1, one) = slot_with_id(
            1,
            vec![
                hypercall(EVTCHN, [0, 2, 0]), // alloc_unbound for domain 2 -> port 2
                hypercall(SCHED, [1, 0, 0]),  // block until domain 2 sends
                hypercall(SCHED, POWEROFF),
            ],
        );
        let (_t2, two) = slot_with_id(
            2,
            vec![
                hypercall(SCHED, YIELD),
                hypercall(EVTCHN, [7, 1, 2]), // bind_interdomain(domain 1, port 2) -> port 2
                hypercall(EVTCHN, [3, 2, 0]), // send on it
                hypercall(SCHED, POWEROFF),
            ],
        );
        let mut slots = [one, two];
        // The fuzz harness unwinds out of `run_all` and calls it again: the second machine
        // must hear the requests made of vCPUs the first one watched.
        drop(Machine::new(&mut slots));
        run_all(&mut slots, &mut fake_host());
        for s in &slots {
            assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
        }
    }

    /// vCPUs 0 and 1 of a domain with three name each other in yield_to, `SWITCHES` times,
    /// while vCPU 2 is ready too: the cost of a directed yield, for a profiler.
    #[test]
    #[ignore]
    fn profile_yield_to_switches() {
        const SWITCHES: usize = 20_000;
        let (_t, mut s) = two_vcpus(vec![], vec![]);
        let time = s.domain.time;
        let memory = core::mem::replace(&mut s.domain.memory, GuestMemory::empty());
        s.domain = Domain::with_vcpus(1, "t".into(), memory, time, 3);
        let mut first = vec![
            hypercall(VCPU_OP, [5, 1, 0x10000]),
            hypercall(VCPU_OP, [5, 2, 0x10000]),
            hypercall(VCPU_OP, [6, 1, 0]),
            hypercall(VCPU_OP, [6, 2, 0]),
        ];
        first.extend((0..SWITCHES).map(|_| hypercall(SCHED, [4, 1, 0])));
        first.push(hypercall(SCHED, POWEROFF));
        s.vcpus[0].as_mut().unwrap().script = first.into();
        s.vcpus[1].as_mut().unwrap().script =
            (0..SWITCHES).map(|_| hypercall(SCHED, [4, 0, 0])).collect();
        s.vcpus.push(Some(Box::new(MockVcpu {
            script: (0..SWITCHES).map(|_| hypercall(SCHED, YIELD)).collect(),
            interrupt_flag: true,
            tag: 3,
            ..Default::default()
        })));
        run_all(std::slice::from_mut(&mut s), &mut fake_host());
        assert_eq!(s.domain.state, DomainState::Ended(Ending::Poweroff));
    }
}

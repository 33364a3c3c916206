//! What the hypervisor keeps about one vCPU beyond its hardware state: how it waits, its
//! timers, its upcall vector and its run-state accounting (docs/abi.md 9).

use crate::common::devices::vlapic::VirtualLapic;
use crate::common::domain::stats::ExitStats;
use crate::common::hypercall::UnfinishedBatch;
use crate::common::memory::guest_memory::{GuestMemory, OutOfBounds};
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use lamina_abi::vcpu::{RunstateInfo, runstate};

/// What a vCPU is asked to do before it next enters the guest: one bit per request, set by
/// [`Requests::make`] from anywhere and drained by the run loop (KVM's
/// `kvm_make_request`/`kvm_check_request` shape). An entry with no bit set costs one load.
///
/// Shared (`Arc`) between the vCPU's state in its domain and the CPU that runs it, so that
/// the exits handled without the domain-table lock can read and make requests.
#[derive(Debug)]
pub struct Requests {
    bits: AtomicU32,
    /// The vCPU runs guest code on CPU [`Self::running_on`] (or is about to: set before the
    /// last look at the bits, so a request made after that look sees it and kicks).
    in_guest: AtomicBool,
    /// The CPU that runs the vCPU this slice, or ran it last: its home, whose run queue it
    /// waits in (`sched::run_queues`), the CPU woken first when a request makes it ready.
    running_on: AtomicU32,
    /// The hypervisor marked an upcall pending and has not yet seen it taken: while set, any
    /// hypercall looks for a deliverable upcall (the guest may have unmasked in memory,
    /// docs/abi.md 8.8).
    upcall_maybe_pending: AtomicBool,
    /// The CPUs that may run the vCPU (its domain's affinity), a bit each: one of them is
    /// woken when a request makes it ready.
    allowed_cpus: AtomicU64,
    /// Where the scheduler hears of requests made of the vCPU while it is off the CPU (set
    /// once, by the machine that schedules it).
    watch: spin::Once<Watch>,
    /// The vCPU is off the CPU: a request made now may change whether it is ready or when
    /// its timers are due, so the scheduler is told ([`Watch`]). A running vCPU is looked
    /// at when its slice ends anyway, which spares its own requests the mark.
    off_cpu: AtomicBool,
}

/// A vCPU's place in its scheduler's [`Attention`] set.
#[derive(Debug)]
pub struct Watch {
    set: Arc<Attention>,
    unit: u32,
}

/// The vCPUs (by scheduler unit number, a bit each) that had a request made of them since
/// the scheduler last looked: all it must look at again, rather than every vCPU of every
/// domain at every pass.
#[derive(Debug)]
pub struct Attention {
    words: Vec<AtomicU64>,
}

impl Attention {
    /// A set for `units` vCPUs, empty.
    pub fn new(units: usize) -> Self {
        Attention {
            words: (0..units.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Adds `unit`.
    #[inline]
    pub fn mark(&self, unit: u32) {
        if let Some(word) = self.words.get(unit as usize / 64) {
            word.fetch_or(1 << (unit % 64), Ordering::SeqCst);
        }
    }

    /// How many units it holds room for.
    pub fn capacity(&self) -> usize {
        self.words.len() * 64
    }

    /// Takes `unit` out of the set.
    #[inline]
    pub fn unmark(&self, unit: usize) {
        // Usually not marked: a load, no locked write.
        if let Some(word) = self.words.get(unit / 64)
            && word.load(Ordering::Relaxed) & (1 << (unit % 64)) != 0
        {
            word.fetch_and(!(1 << (unit % 64)), Ordering::AcqRel);
        }
    }

    /// Whether no unit is in the set.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.words
            .iter()
            .all(|word| word.load(Ordering::Relaxed) == 0)
    }

    /// The unit in the set if it holds exactly one (left in it).
    #[inline]
    pub fn single(&self) -> Option<usize> {
        let mut found = None;
        for (at, word) in self.words.iter().enumerate() {
            let bits = word.load(Ordering::Relaxed);
            if bits == 0 {
                continue;
            }
            if found.is_some() || bits & (bits - 1) != 0 {
                return None;
            }
            found = Some(at * 64 + bits.trailing_zeros() as usize);
        }
        found
    }

    /// Empties the set, calling `f` on each unit that was in it; whether there was any.
    #[inline]
    pub fn drain(&self, mut f: impl FnMut(usize)) -> bool {
        let mut any = false;
        for (at, word) in self.words.iter().enumerate() {
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::AcqRel);
            any |= bits != 0;
            while bits != 0 {
                f(at * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        any
    }
}

impl Default for Requests {
    fn default() -> Self {
        Requests {
            bits: AtomicU32::new(0),
            in_guest: AtomicBool::new(false),
            running_on: AtomicU32::new(0),
            upcall_maybe_pending: AtomicBool::new(false),
            allowed_cpus: AtomicU64::new(u64::MAX),
            watch: spin::Once::new(),
            off_cpu: AtomicBool::new(false),
        }
    }
}

/// The request bits.
pub mod request {
    /// Something may need injecting (an event raised, a timer fired, the APIC changed).
    pub const EVENT: u32 = 1 << 0;
    /// A timer of this vCPU changed: re-arm the host timer.
    pub const TIMERS: u32 = 1 << 1;
    /// A nested mapping of its domain went away or lost permissions: drop the cached
    /// guest-physical translations (docs/abi.md 16).
    pub const NESTED_FLUSH: u32 = 1 << 2;
    /// What could wake this waiting vCPU may be gone (another domain was torn down): check
    /// its wait again (docs/abi.md 3.3).
    pub const WAKE_CHECK: u32 = 1 << 3;
    /// `vcpu_op` initialise gave it a start state to load (docs/abi.md 19).
    pub const START: u32 = 1 << 4;
    /// Its domain ended or was paused, or it was taken down: a CPU running it stops it.
    pub const RESCHEDULE: u32 = 1 << 5;
    /// A sibling asked for its guest TLB to be flushed (`memory_op` flush_tlb, docs/abi.md
    /// 11): drop its guest-virtual translations before it next runs guest code.
    pub const TLB_FLUSH: u32 = 1 << 6;
    /// An interrupt was just injected: look for more at the first entry after the next exit,
    /// once the guest ran (its handler clears the upcall flag that would otherwise still show
    /// the upcall just injected). Never holds the entry it was made for up, nor kicks anyone.
    pub const EVENT_AFTER_EXIT: u32 = 1 << 7;
    /// The requests drained before every entry (`sched::prepare_entry`); the others
    /// (START, WAKE_CHECK) wait for the scheduler's next pass and never hold an entry up.
    pub const BEFORE_ENTRY: u32 =
        EVENT | TIMERS | NESTED_FLUSH | RESCHEDULE | TLB_FLUSH | EVENT_AFTER_EXIT;
    /// The requests that keep a CPU from entering the guest until it drained them: made by
    /// someone else, possibly after the drain ([`super::Requests::enter_guest`]).
    pub const HOLD_ENTRY: u32 = BEFORE_ENTRY & !EVENT_AFTER_EXIT;
}

impl Requests {
    /// Asks for `bits`: a vCPU in guest mode on another CPU is kicked out of it, so that it
    /// sees them before it runs guest code again; for a vCPU that waits, an idle CPU is woken
    /// to look at it.
    #[inline]
    pub fn make(&self, bits: u32) {
        self.bits.fetch_or(bits, Ordering::SeqCst);
        self.tell_scheduler();
        // One CPU: nobody to kick or wake (one load on that path).
        if crate::common::cpus::several_cpus() {
            self.kick();
        }
    }

    /// Marks the vCPU in its scheduler's [`Attention`] set if it is off the CPU.
    #[inline]
    fn tell_scheduler(&self) {
        if self.off_cpu.load(Ordering::SeqCst)
            && let Some(watch) = self.watch.get()
        {
            watch.set.mark(watch.unit);
        }
    }

    /// Puts the vCPU in `set` as `unit`, off the CPU and marked, so that the scheduler looks
    /// at it first. Once: a machine built again over the same vCPUs keeps their first set
    /// ([`Self::watched`]), where each keeps its place.
    pub fn watch(&self, set: &Arc<Attention>, unit: u32) {
        self.watch.call_once(|| Watch {
            set: Arc::clone(set),
            unit,
        });
        self.set_off_cpu(true);
        self.tell_scheduler();
    }

    /// The set the vCPU reports to, if a machine watches it.
    pub fn watched(&self) -> Option<Arc<Attention>> {
        self.watch.get().map(|watch| Arc::clone(&watch.set))
    }

    /// The vCPU leaves the CPU (the CPU that ran it has its scheduler look at it) or is
    /// taken onto one.
    #[inline]
    pub fn set_off_cpu(&self, off: bool) {
        self.off_cpu.store(off, Ordering::SeqCst);
    }

    /// As [`Self::make`], from the scheduler as it looks at this vCPU: it is not marked in
    /// the [`Attention`] set (the scheduler brings its queue up to date with the vCPU itself).
    #[inline]
    pub fn make_from_scheduler(&self, bits: u32) {
        self.bits.fetch_or(bits, Ordering::SeqCst);
        if crate::common::cpus::several_cpus() {
            self.kick();
        }
    }

    #[cold]
    fn kick(&self) {
        if self.in_guest.load(Ordering::SeqCst) {
            crate::common::cpus::kick_cpu(self.running_on.load(Ordering::Relaxed) as usize);
        } else {
            crate::common::cpus::wake_an_idle_cpu_preferring(
                self.running_on.load(Ordering::Relaxed) as usize,
                self.allowed_cpus.load(Ordering::Relaxed),
            );
        }
    }

    /// As [`Self::make`], and returns only once the vCPU is out of guest mode: it cannot use
    /// anything it cached of what the request is about (stale translations) before it has
    /// drained the request. Bounded: the kick forces a VM exit.
    pub fn make_and_wait(&self, bits: u32) {
        self.make(bits);
        while self.in_guest.load(Ordering::SeqCst) {
            core::hint::spin_loop();
        }
    }

    /// Asks for `bits` without waking anyone: a vCPU in guest mode on another CPU is kicked
    /// out of it and this returns once it is out (it drains the bits before it runs guest
    /// code again); a vCPU that is not running is left alone and finds them at its next
    /// entry. Whether it had to be kicked (docs/abi.md 11, flush_tlb).
    pub fn make_quietly_and_wait(&self, bits: u32) -> bool {
        self.bits.fetch_or(bits, Ordering::SeqCst);
        if !self.in_guest.load(Ordering::SeqCst) {
            return false;
        }
        crate::common::cpus::kick_cpu(self.running_on.load(Ordering::Relaxed) as usize);
        while self.in_guest.load(Ordering::SeqCst) {
            core::hint::spin_loop();
        }
        true
    }

    /// The running CPU is about to enter the guest: true if it may (nothing is requested),
    /// false if a request came and it must drain it first (docs: [`Self::make`]).
    #[inline]
    pub fn enter_guest(&self, cpu: usize) -> bool {
        self.running_on.store(cpu as u32, Ordering::Relaxed);
        self.in_guest.store(true, Ordering::SeqCst);
        if self.bits.load(Ordering::SeqCst) & request::HOLD_ENTRY != 0 {
            self.in_guest.store(false, Ordering::Release);
            return false;
        }
        true
    }

    /// Asks the running vCPU's own next drain, after its next exit, to look for interrupts
    /// again ([`request::EVENT_AFTER_EXIT`]): no kick, no wake-up.
    #[inline]
    pub fn look_again_after_exit(&self) {
        self.bits
            .fetch_or(request::EVENT_AFTER_EXIT, Ordering::Relaxed);
    }

    /// Whether something must be drained before the next entry.
    #[inline]
    pub fn due_before_entry(&self) -> bool {
        self.bits.load(Ordering::Relaxed) & request::BEFORE_ENTRY != 0
    }

    /// The running CPU is back from the guest.
    #[inline]
    pub fn left_guest(&self) {
        self.in_guest.store(false, Ordering::Release);
    }

    /// The CPU that ran the vCPU last (its home), or runs it.
    pub fn last_cpu(&self) -> usize {
        self.running_on.load(Ordering::Relaxed) as usize
    }

    /// Sets the vCPU's home CPU before it first runs (afterwards, the CPU it ran on last).
    pub fn set_home_cpu(&self, cpu: usize) {
        self.running_on.store(cpu as u32, Ordering::Relaxed);
    }

    /// Sets the CPUs that may run the vCPU (a bit each), which requests wake.
    pub fn set_allowed_cpus(&self, cpus: u64) {
        self.allowed_cpus.store(cpus, Ordering::Relaxed);
    }

    /// Whether anything is asked.
    pub fn any(&self) -> bool {
        self.bits.load(Ordering::Relaxed) != 0
    }

    /// Whether `bits` are asked, without taking them.
    pub fn peek(&self, bits: u32) -> bool {
        self.bits.load(Ordering::Relaxed) & bits != 0
    }

    /// Takes the requests among `bits`; returns those that were set. One load when none
    /// is (this runs on every pass of the scheduler).
    pub fn take(&self, bits: u32) -> u32 {
        if self.bits.load(Ordering::Relaxed) & bits == 0 {
            return 0;
        }
        self.bits.fetch_and(!bits, Ordering::Acquire) & bits
    }

    /// Takes every request (one exchange, on the entry path).
    pub fn take_all(&self) -> u32 {
        self.bits.swap(0, Ordering::Acquire)
    }

    /// Marks an upcall as possibly pending (it was raised or may have become deliverable).
    pub fn set_upcall_maybe_pending(&self, maybe: bool) {
        self.upcall_maybe_pending.store(maybe, Ordering::Relaxed);
    }

    /// Whether an upcall may be pending.
    pub fn upcall_maybe_pending(&self) -> bool {
        self.upcall_maybe_pending.load(Ordering::Relaxed)
    }

    /// What every hypercall does first (docs/abi.md 8.8): while an upcall may be pending, it
    /// looks for one to deliver at the next entry.
    #[inline]
    pub fn on_hypercall(&self) {
        if self.upcall_maybe_pending() {
            self.make(request::EVENT);
        }
    }
}

/// Where a secondary vCPU starts (`vcpu_op` initialise, docs/abi.md 19).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartState {
    /// First instruction.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Page-table root.
    pub cr3: u64,
    /// RDI.
    pub argument: u64,
}

/// The ports of a poll: a few inline (a poll is usually of one port), more on the heap (up to
/// `POLL_PORTS_MAX`), so that the common poll allocates nothing.
pub type PollPorts = smallvec::SmallVec<[u32; 4]>;

/// Why a vCPU is not runnable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Runnable.
    None,
    /// `sched_op` block: until `evtchn_upcall_pending`.
    Block,
    /// `sched_op` poll: until one of `ports` is pending, or `deadline` (system time).
    Poll {
        /// The ports polled.
        ports: PollPorts,
        /// Give up then (`None`: never).
        deadline: Option<u64>,
    },
    /// HLT with interrupts enabled: until an interrupt can be injected.
    Halt,
}

/// The PV timers of a vCPU (docs/abi.md 9.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvTimers {
    /// One-shot deadline.
    pub singleshot: Option<u64>,
    /// Periodic timer: next tick and period.
    pub periodic: Option<(u64, u64)>,
}

impl PvTimers {
    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        let periodic = self.periodic.map(|(next, _)| next);
        match (self.singleshot, periodic) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether any timer is armed.
    pub fn armed(&self) -> bool {
        self.singleshot.is_some() || self.periodic.is_some()
    }

    /// Consumes what expired by `now`; true if at least one timer fired. A periodic timer
    /// stays on its grid (`start + k * period`) and late ticks coalesce.
    pub fn expire(&mut self, now: u64) -> bool {
        let mut fired = false;
        if self.singleshot.is_some_and(|deadline| deadline <= now) {
            self.singleshot = None;
            fired = true;
        }
        if let Some((next, period)) = self.periodic
            && next <= now
        {
            let missed = (now - next) / period;
            self.periodic = Some((next + (missed + 1) * period, period));
            fired = true;
        }
        fired
    }
}

/// Run-state accounting (steal time and friends).
#[derive(Clone, Copy, Debug, Default)]
pub struct Runstate {
    info: RunstateInfo,
    /// Where the guest wants it, if registered.
    pub gpa: Option<u64>,
}

impl Runstate {
    /// Starts accounting in `state` at `now`.
    pub fn new(now: u64, state: u32) -> Self {
        Runstate {
            info: RunstateInfo {
                state,
                state_entry_time: now,
                ..Default::default()
            },
            gpa: None,
        }
    }

    /// Switches to `state` at `now`; writes the guest's copy when registered.
    pub fn enter(&mut self, state: u32, now: u64, mem: &GuestMemory) -> Result<(), OutOfBounds> {
        let old = self.info.state as usize;
        self.info.time[old] += now.saturating_sub(self.info.state_entry_time);
        self.info.state = state;
        self.info.state_entry_time = now;
        self.publish(mem)
    }

    /// Writes the guest's copy, if registered.
    pub fn publish(&self, mem: &GuestMemory) -> Result<(), OutOfBounds> {
        let Some(gpa) = self.gpa else { return Ok(()) };
        // SAFETY: RunstateInfo is repr(C) plain data without padding (size asserted in abi).
        let bytes = unsafe {
            core::slice::from_raw_parts(
                (&raw const self.info).cast::<u8>(),
                size_of::<RunstateInfo>(),
            )
        };
        mem.write(gpa, bytes)
    }

    /// The current state.
    pub fn state(&self) -> u32 {
        self.info.state
    }

    /// What the guest's copy should hold.
    #[cfg(test)]
    pub fn info(&self) -> RunstateInfo {
        self.info
    }
}

/// One vCPU's hypervisor-side state.
#[derive(Debug)]
pub struct VcpuState {
    /// How it waits, if it does.
    pub wait: Wait,
    /// PV timers.
    pub timers: PvTimers,
    /// Upcall vector (0: none).
    pub upcall_vector: u8,
    /// What it must do before it next enters the guest; shared with the CPU running it.
    pub requests: Arc<Requests>,
    /// An interrupt-window exit is requested from the hardware.
    pub window_requested: bool,
    /// The VcpuInfo was moved by `register_vcpu_info`.
    pub vcpu_info_moved: bool,
    /// Woken from a wait and not run since: runs before vCPUs that used up their slice, so
    /// timers and events reach a sleeping vCPU with the latency of one switch (as Xen's
    /// credit scheduler boosts woken vCPUs).
    pub boosted: bool,
    /// Named by a sibling's `sched_op` yield_to while ready and not running: runs next,
    /// before every other ready vCPU (docs/abi.md 3.3).
    pub yielded_to: bool,
    /// Gave up the CPU with `sched_op` yield: the others go first (docs/abi.md 3.3).
    pub yielded: bool,
    /// Up (runs when ready); a vCPU other than 0 is down until `vcpu_op` up, and again after
    /// down (run state offline).
    pub up: bool,
    /// Where it starts, once `vcpu_op` initialise or a STARTUP IPI gave that (vCPU 0: from
    /// the ELF entry).
    pub start: Option<StartState>,
    /// An INIT IPI reached it before it ever ran: a STARTUP IPI starts it (docs/abi.md 14.2).
    pub waiting_for_sipi: bool,
    /// Virtual run time: CPU time scaled by `DEFAULT_WEIGHT / weight` of its domain; the
    /// scheduler runs the ready vCPU with the least.
    pub vruntime: u64,
    /// CPU time it has had, in ns, up to the start of the slice it runs in, if it runs.
    pub cpu_ns: u64,
    /// When the slice it runs in started (system time), while a CPU has it out of the table.
    pub running_since: Option<u64>,
    /// Run-state accounting.
    pub runstate: Runstate,
    /// The emulated x2APIC (for kernels that were not ported).
    pub vlapic: VirtualLapic,
    /// Its exit counters (docs/abi.md 15).
    pub stats: ExitStats,
    /// The physical CPUs it has run on, a bit per CPU index (the summary).
    pub ran_on: u64,
    /// The domain a `domctl_op` pause or destroy of this vCPU's waits for (it returned
    /// "made again"): by the time it is made again, the scheduler may have torn that domain
    /// down itself, which must not turn the call's 0 into `-EINVAL` (docs/abi.md 17).
    pub domctl_waits_for: Option<u64>,
    /// What its TLB_FLUSH request is to drop (docs/abi.md 11).
    pub pending_tlb_flush: PendingTlbFlush,
    /// The TSC at which the slice it runs in ends (another domain's deadline or the slice's
    /// length, whichever comes first), set when it is scheduled in: a `multicall` stops
    /// between entries once it has passed (`u64::MAX`: never).
    pub slice_end_tsc: u64,
    /// Its slice was preempted with bytes in the domain's console ring: printed when it is
    /// next scheduled in, before it runs guest code again (docs/abi.md 13).
    pub console_ring_deferred: bool,
    /// A `multicall` that stopped between entries at the end of its slice, with RIP still on
    /// the call: the scheduler finishes it before the vCPU next runs guest code
    /// (docs/abi.md 12). Allocated only while there is one.
    pub preempted_batch: Option<Box<UnfinishedBatch>>,
    /// The storage of a preempted batch once it was finished, kept for the next (a vCPU that
    /// was never preempted in a batch has none).
    pub spare_batch: Option<Box<UnfinishedBatch>>,
    /// [`Self::preempted_batch`] is being finished: a new preemption keeps its storage and
    /// notes only [`Self::resume_next`].
    pub resuming_batch: bool,
    /// Where a batch being finished stopped again.
    pub resume_next: u64,
}

/// The most addresses a vCPU's pending flush keeps; beyond them it flushes everything.
pub const PENDING_TLB_FLUSH_MAX: usize = 16;

/// The guest-virtual pages siblings' `flush_tlb` calls asked a vCPU to drop before it next
/// runs guest code (docs/abi.md 11): a short list, or everything. Calls made while the vCPU
/// does not run add up; once the list would overflow (or a call names more than it holds,
/// or none) the vCPU's whole guest TLB is flushed instead: more than asked, never less.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingTlbFlush {
    /// Page addresses (bits 11:0 clear), the first `count` valid, no duplicates.
    pages: [u64; PENDING_TLB_FLUSH_MAX],
    count: u8,
    everything: bool,
}

impl PendingTlbFlush {
    /// Adds the pages of `addresses` (canonical guest-virtual addresses); an empty list is a
    /// whole flush.
    pub fn add(&mut self, addresses: &[u64]) {
        if addresses.is_empty() {
            self.everything = true;
        }
        if self.everything {
            self.count = 0;
            return;
        }
        for &address in addresses {
            let page = address & !0xfff;
            let count = usize::from(self.count);
            if self.pages[..count].contains(&page) {
                continue;
            }
            if count == PENDING_TLB_FLUSH_MAX {
                self.everything = true;
                self.count = 0;
                return;
            }
            self.pages[count] = page;
            self.count += 1;
        }
    }

    /// Takes what is pending, leaving nothing: `None` for a whole flush (also when nothing was
    /// listed, which a TLB_FLUSH request never comes with), else the pages.
    pub fn take(&mut self) -> Option<([u64; PENDING_TLB_FLUSH_MAX], usize)> {
        let pending = core::mem::take(self);
        (!pending.everything && pending.count > 0)
            .then_some((pending.pages, usize::from(pending.count)))
    }
}

/// The emulated APIC timer's input clock: one tick per nanosecond before the divider.
pub const APIC_TIMER_HZ: u64 = 1_000_000_000;

impl VcpuState {
    /// A fresh runnable vCPU number `index`, on a machine whose TSC runs at `tsc_hz`.
    pub fn new(index: u32, now: u64, tsc_hz: u64) -> Self {
        VcpuState {
            vlapic: VirtualLapic::new(index, APIC_TIMER_HZ, tsc_hz),
            wait: Wait::None,
            timers: PvTimers::default(),
            upcall_vector: 0,
            requests: Arc::new(Requests::default()),
            vcpu_info_moved: false,
            window_requested: false,
            boosted: false,
            yielded_to: false,
            yielded: false,
            up: index == 0,
            start: None,
            waiting_for_sipi: false,
            vruntime: 0,
            cpu_ns: 0,
            stats: ExitStats::default(),
            ran_on: 0,
            running_since: None,
            domctl_waits_for: None,
            pending_tlb_flush: PendingTlbFlush::default(),
            slice_end_tsc: u64::MAX,
            console_ring_deferred: false,
            preempted_batch: None,
            spare_batch: None,
            resuming_batch: false,
            resume_next: 0,
            runstate: Runstate::new(
                now,
                if index == 0 {
                    runstate::RUNNABLE
                } else {
                    runstate::OFFLINE
                },
            ),
        }
    }

    /// Whether the vCPU can run: up, and not waiting.
    pub fn is_runnable(&self) -> bool {
        self.up && self.wait == Wait::None
    }

    /// Gives the vCPU the state it starts in, loaded when it is next scheduled in
    /// (`vcpu_op` initialise, a STARTUP IPI).
    pub fn set_start(&mut self, start: StartState) {
        // A batch it was stopped in is abandoned with the rest of where it was (the entries
        // that ran stay done): it starts afresh.
        self.preempted_batch = None;
        self.start = Some(start);
        self.requests.make(request::START);
    }

    /// Brings the vCPU up (`vcpu_op` up, a STARTUP IPI): ready at once, ahead of vCPUs that
    /// used their slice; nothing if it is up already.
    pub fn bring_up(&mut self, now: u64, mem: &GuestMemory) {
        if self.up {
            return;
        }
        self.up = true;
        self.boosted = true;
        self.requests.make(request::EVENT);
        let to = if self.wait == Wait::None {
            runstate::RUNNABLE
        } else {
            runstate::BLOCKED
        };
        let _ = self.runstate.enter(to, now, mem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_flushes_keep_pages_until_they_overflow_then_flush_everything() {
        let mut pending = PendingTlbFlush::default();
        pending.add(&[0x2000_0123, 0x2000_0fff, 0x3000_0000]);
        let (pages, count) = pending.take().expect("a short list stays a list");
        assert_eq!(
            &pages[..count],
            &[0x2000_0000, 0x3000_0000],
            "pages, once each"
        );
        assert_eq!(pending.take(), None, "taken: nothing left to list");

        let many: Vec<u64> = (0..PENDING_TLB_FLUSH_MAX as u64).map(|i| i << 12).collect();
        pending.add(&many[..10]);
        pending.add(&many[5..]);
        let (_, count) = pending.take().expect("16 different pages fit");
        assert_eq!(count, PENDING_TLB_FLUSH_MAX);

        pending.add(&many);
        pending.add(&[0xdead_0000]);
        assert_eq!(pending.take(), None, "the 17th page: everything");

        pending.add(&[0x1000]);
        pending.add(&[]);
        pending.add(&[0x2000]);
        assert_eq!(
            pending.take(),
            None,
            "an empty list is everything, and stays so"
        );
    }

    #[test]
    fn a_singleshot_fires_once_at_its_deadline_never_before() {
        let mut t = PvTimers {
            singleshot: Some(1000),
            periodic: None,
        };
        assert!(!t.expire(999));
        assert!(t.expire(1000));
        assert!(!t.expire(5000));
        assert!(!t.armed());
    }

    #[test]
    fn a_periodic_timer_keeps_its_grid_when_serviced_late() {
        let mut t = PvTimers {
            singleshot: None,
            periodic: Some((100, 100)),
        };
        assert!(t.expire(100));
        assert_eq!(t.periodic, Some((200, 100)));
        assert!(t.expire(450), "late: one tick for the missed ones");
        assert_eq!(t.periodic, Some((500, 100)), "still on the grid");
        assert_eq!(t.next_deadline(), Some(500));
    }
}

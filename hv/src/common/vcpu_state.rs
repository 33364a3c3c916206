//! What the hypervisor keeps about one vCPU beyond its hardware state: how it waits, its
//! timers, its upcall vector and its run-state accounting (docs/abi.md 9).

use crate::common::guest_memory::{GuestMemory, OutOfBounds};
use crate::common::vlapic::VirtualLapic;
use alloc::vec::Vec;
use lamina_abi::vcpu::{RunstateInfo, runstate};

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
        ports: Vec<u32>,
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
    pub fn new(now: u64) -> Self {
        Runstate {
            info: RunstateInfo {
                state: runstate::RUNNABLE,
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
    /// Something may need injecting before the next entry (events raised, timers fired,
    /// APIC state changed). Keeps the hot path free of checks when nothing happens.
    pub attention: bool,
    /// An interrupt-window exit is requested from the hardware.
    pub window_requested: bool,
    /// The host timer must be re-armed before the next entry (a timer of this vCPU changed).
    pub timers_changed: bool,
    /// The hypervisor marked an upcall pending and has not yet seen it taken: while set, any
    /// hypercall looks for a deliverable upcall (the guest may have unmasked in memory).
    pub upcall_maybe_pending: bool,
    /// The VcpuInfo was moved by `register_vcpu_info`.
    pub vcpu_info_moved: bool,
    /// Woken from a wait and not run since: runs before vCPUs that used up their slice, so
    /// timers and events reach a sleeping vCPU with the latency of one switch (as Xen's
    /// credit scheduler boosts woken vCPUs).
    pub boosted: bool,
    /// Another domain was torn down: what could wake this vCPU may be gone, so its wait is
    /// checked again (a vCPU that can never wake is stopped, docs/abi.md 3.3).
    pub wake_sources_changed: bool,
    /// Run-state accounting.
    pub runstate: Runstate,
    /// The emulated x2APIC (for kernels that were not ported).
    pub vlapic: VirtualLapic,
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
            attention: false,
            vcpu_info_moved: false,
            timers_changed: false,
            window_requested: false,
            upcall_maybe_pending: false,
            boosted: false,
            wake_sources_changed: false,
            runstate: Runstate::new(now),
        }
    }

    /// Whether the vCPU can run.
    pub fn is_runnable(&self) -> bool {
        self.wait == Wait::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! A run queue per physical CPU: each vCPU has a home CPU, and while it is ready it waits in
//! that CPU's [`ReadySet`]; a CPU picks from its own set. The virtual run time is one clock
//! for the whole machine, so the sets can be compared: a CPU takes a vCPU from another's set
//! (a migration, the vCPU's home moves) when it has nothing of its own to run, when all it
//! has is the vCPU that just yielded, or when the other set's next vCPU is more than
//! [`MIGRATE_LAG`] behind its own: the weights hold across CPUs to within that lag, as they
//! do on one CPU, with a migration only when a CPU's vCPUs fell that far behind (Linux's CFS
//! balances the same quantity, per-CPU load, by moving tasks; Xen's credit2 shares one queue
//! per socket instead, which moves a vCPU at almost every pick).
//!
//! Homes are dealt at boot ([`CpuRunQueues::set_cpus`]): each vCPU to the allowed CPU with
//! the least weight so far. The sets sit behind the run queue's lock
//! (`sched::locking`), so a migration needs no lock of its own.

use super::TIME_SLICE_NS;
use super::ready::{Picked, Ready, ReadySet};
use alloc::vec;
use alloc::vec::Vec;

/// How far (in virtual run time) the next vCPU of another CPU's set must be behind this
/// CPU's before this CPU takes it: a quarter slice of a vCPU of the default weight. The
/// weights hold across CPUs to within that (fairness-2cpus measures it: with a whole slice,
/// weights 1:2:4:4 dealt {1,4} and {2,4} gave the lightest 9% over its share, as that
/// partition alone would), and a vCPU does not move for less.
pub const MIGRATE_LAG: u64 = TIME_SLICE_NS / 4;

/// The ready sets of every CPU and the home of each vCPU (by unit number).
pub struct CpuRunQueues {
    sets: Vec<ReadySet>,
    home: Vec<u8>,
    /// How many vCPUs moved to another CPU's set.
    migrations: u64,
}

impl CpuRunQueues {
    /// One CPU's set, for units `0..units`, every vCPU at home there.
    pub fn new(units: usize) -> Self {
        CpuRunQueues {
            sets: vec![ReadySet::new(units)],
            home: vec![0; units],
            migrations: 0,
        }
    }

    /// Deals the units to `cpus` CPUs (at most 64), before any is in a set: each to the CPU
    /// it may run on (`affinity_and_weight`) with the least weight dealt so far, so that the
    /// weights start balanced. Returns each unit's home.
    pub fn set_cpus(
        &mut self,
        cpus: usize,
        affinity_and_weight: impl Fn(usize) -> (u64, u32),
    ) -> &[u8] {
        let cpus = cpus.clamp(1, 64);
        let units = self.home.len();
        self.sets = (0..cpus).map(|_| ReadySet::new(units)).collect();
        let mut dealt = vec![0u64; cpus];
        for unit in 0..units {
            let (affinity, weight) = affinity_and_weight(unit);
            let home = (0..cpus)
                .filter(|&cpu| affinity & (1 << cpu) != 0)
                .min_by_key(|&cpu| dealt[cpu])
                .unwrap_or(0);
            dealt[home] += u64::from(weight);
            self.home[unit] = home as u8;
        }
        &self.home
    }

    /// How many CPUs have a set.
    #[cfg(test)]
    pub fn cpus(&self) -> usize {
        self.sets.len()
    }

    /// The home CPU of `unit`.
    pub fn home(&self, unit: usize) -> usize {
        self.home.get(unit).map_or(0, |&h| usize::from(h))
    }

    /// How many vCPUs moved to another CPU so far.
    #[cfg(test)]
    pub fn migrations(&self) -> u64 {
        self.migrations
    }

    fn set_of(&self, unit: usize) -> Option<&ReadySet> {
        self.sets.get(self.home(unit))
    }

    /// What its home's set holds of `unit`.
    #[cfg(all(test, debug_assertions))]
    pub fn get(&self, unit: usize) -> Option<Ready> {
        self.set_of(unit)?.get(unit)
    }

    /// Puts `unit` in its home's set, or updates it there. A home it may no longer run on
    /// (never, today: affinity is fixed at boot) moves to the first CPU it may.
    #[inline(always)]
    pub fn insert(&mut self, unit: usize, ready: Ready) {
        let home = self.home(unit);
        if self.sets.len() > 1 && ready.affinity & (1 << home) == 0 {
            let allowed = (0..self.sets.len()).find(|&cpu| ready.affinity & (1 << cpu) != 0);
            if let Some(cpu) = allowed {
                self.move_to(unit, cpu);
            }
        }
        let home = self.home(unit);
        if let Some(set) = self.sets.get_mut(home) {
            set.insert(unit, ready);
        }
    }

    /// Takes `unit` out of its home's set.
    #[inline(always)]
    pub fn remove(&mut self, unit: usize) {
        let home = self.home(unit);
        if let Some(set) = self.sets.get_mut(home) {
            set.remove(unit);
        }
    }

    /// Whether no vCPU is ready on any CPU.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.sets.iter().all(ReadySet::is_empty)
    }

    /// The one ready vCPU of a machine with one CPU, if exactly one is ready and it may run
    /// on CPU `cpu` ([`ReadySet::only`]).
    #[inline(always)]
    pub fn only(&self, cpu: usize) -> Option<usize> {
        match self.sets.as_slice() {
            [set] => set.only(1 << cpu),
            _ => None,
        }
    }

    /// Whether `unit` is ready (in its home's set).
    #[inline(always)]
    pub fn contains(&self, unit: usize) -> bool {
        self.set_of(unit).is_some_and(|set| set.contains(unit))
    }

    /// Whether `unit` is ready and may run on CPU `cpu`.
    #[inline(always)]
    pub fn may_run(&self, unit: usize, cpu: usize) -> bool {
        self.set_of(unit)
            .is_some_and(|set| set.may_run(unit, 1 << cpu))
    }

    /// The CPUs (a bit each) that may run some vCPU of `cpu`'s set.
    pub fn wanted_cpus(&self, cpu: usize) -> u64 {
        self.sets.get(cpu).map_or(0, ReadySet::wanted_cpus)
    }

    /// Moves `unit` (ready or not) home to `cpu`: out of its old home's set and into `cpu`'s
    /// with what it had. Returns whether it moved.
    pub fn move_to(&mut self, unit: usize, cpu: usize) -> bool {
        let from = self.home(unit);
        if from == cpu || cpu >= self.sets.len() || unit >= self.home.len() {
            return false;
        }
        let ready = self.sets[from].get(unit);
        self.sets[from].remove(unit);
        self.home[unit] = cpu as u8;
        if let Some(ready) = ready {
            self.sets[cpu].insert(unit, ready);
        }
        self.migrations += 1;
        crate::common::cpus::count_migration();
        true
    }

    /// The ready vCPU CPU `cpu` runs next: its own set's by [`ReadySet::pick`]'s rules, or
    /// another CPU's next one, moved here, when this CPU has nothing else (or only
    /// `yielder`) or that one is more than [`MIGRATE_LAG`] behind. O(number of CPUs).
    #[inline(always)]
    pub fn pick(&mut self, cpu: usize, yielder: Option<usize>) -> Option<Picked> {
        let cpu_bit = 1u64 << cpu;
        let own = self.sets.get(cpu)?.pick(cpu_bit, yielder);
        if self.sets.len() == 1 {
            return own;
        }
        self.balance(cpu, own, yielder)
    }

    /// [`Self::pick`] on a machine with several CPUs: whether another CPU's next vCPU should
    /// run here instead of `own`.
    fn balance(
        &mut self,
        cpu: usize,
        own: Option<Picked>,
        yielder: Option<usize>,
    ) -> Option<Picked> {
        let cpu_bit = 1u64 << cpu;
        // The virtual run time the other CPUs' vCPUs are held against: none when this CPU
        // has only the yielder or nothing (any ready vCPU elsewhere is better).
        let own_vruntime = own
            .filter(|p| Some(p.unit) != yielder)
            .and_then(|p| self.sets[cpu].get(p.unit))
            .map(|r| r.vruntime);
        let mut best: Option<(Picked, u64)> = None;
        for (other, set) in self.sets.iter().enumerate() {
            if other == cpu {
                continue;
            }
            let Some(theirs) = set.pick(cpu_bit, None) else {
                continue;
            };
            let Some(vruntime) = set.get(theirs.unit).map(|r| r.vruntime) else {
                continue;
            };
            let behind = own_vruntime.is_none_or(|own| vruntime.saturating_add(MIGRATE_LAG) < own);
            if behind && best.is_none_or(|(_, least)| vruntime < least) {
                best = Some((theirs, vruntime));
            }
        }
        match best {
            Some((theirs, _)) => {
                self.move_to(theirs.unit, cpu);
                Some(theirs)
            }
            None => own,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::domain::config::DEFAULT_WEIGHT;

    fn ready(vruntime: u64) -> Ready {
        Ready {
            vruntime,
            boosted: false,
            affinity: u64::MAX,
            weight: DEFAULT_WEIGHT,
        }
    }

    #[test]
    fn homes_are_dealt_by_weight_within_affinity() {
        let mut queues = CpuRunQueues::new(5);
        // Weights 1:2:4:4 (fairness-2cpus): the two heaviest on different CPUs.
        let weights = [100, 200, 400, 400, 50];
        let homes = queues
            .set_cpus(2, |unit| {
                let affinity = if unit == 4 { 0b01 } else { u64::MAX };
                (affinity, weights[unit])
            })
            .to_vec();
        assert_eq!(homes, [0, 1, 0, 1, 0]);
        assert_eq!(queues.cpus(), 2);
    }

    #[test]
    fn a_cpu_picks_its_own_and_takes_another_cpus_only_when_idle_or_far_behind() {
        let mut queues = CpuRunQueues::new(4);
        queues.set_cpus(2, |_| (u64::MAX, DEFAULT_WEIGHT));
        // Units 0 and 2 at home on CPU 0, 1 and 3 on CPU 1.
        queues.insert(0, ready(5 * MIGRATE_LAG));
        queues.insert(1, ready(4 * MIGRATE_LAG + 1));
        assert_eq!(
            queues.pick(0, None).map(|p| p.unit),
            Some(0),
            "within the lag"
        );
        assert_eq!(queues.migrations(), 0);
        queues.insert(3, ready(3 * MIGRATE_LAG));
        assert_eq!(
            queues.pick(0, None).map(|p| p.unit),
            Some(3),
            "far behind: taken"
        );
        assert_eq!((queues.home(3), queues.migrations()), (0, 1));
        assert!(queues.may_run(3, 0));
        queues.remove(3);
        queues.remove(0);
        assert_eq!(queues.pick(0, None).map(|p| p.unit), Some(1), "idle: taken");
        assert_eq!(queues.home(1), 0);
        queues.remove(1);
        assert_eq!(queues.pick(1, None), None, "nothing left for CPU 1");
    }

    #[test]
    fn a_yielder_alone_gives_way_to_another_cpus_vcpu() {
        let mut queues = CpuRunQueues::new(2);
        queues.set_cpus(2, |_| (u64::MAX, DEFAULT_WEIGHT));
        queues.insert(0, ready(0));
        queues.insert(1, ready(10 * MIGRATE_LAG));
        assert_eq!(queues.pick(0, Some(0)).map(|p| p.unit), Some(1));
        queues.remove(1);
        assert_eq!(
            queues.pick(0, Some(0)).map(|p| p.unit),
            Some(0),
            "alone, it runs"
        );
    }

    #[test]
    fn a_vcpu_is_never_taken_to_a_cpu_it_may_not_run_on() {
        let mut queues = CpuRunQueues::new(2);
        queues.set_cpus(2, |unit| (if unit == 1 { 0b10 } else { u64::MAX }, 256));
        assert_eq!(queues.home(1), 1);
        queues.insert(
            1,
            Ready {
                affinity: 0b10,
                ..ready(0)
            },
        );
        assert_eq!(queues.pick(0, None), None);
        assert_eq!(queues.home(1), 1);
        assert_eq!(queues.pick(1, None).map(|p| p.unit), Some(1));
    }
}

#[cfg(test)]
mod simulation {
    use super::*;

    /// Shares of CPU time of spinning vCPUs of `weights` on `cpus` CPUs, each CPU passing at
    /// the end of each slice, for `ms` of time.
    pub fn shares(weights: &[u32], cpus: usize, ms: u64, jitter_ns: u64) -> (Vec<f64>, u64) {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let units = weights.len();
        let mut queues = CpuRunQueues::new(units);
        queues.set_cpus(cpus, |unit| (u64::MAX, weights[unit]));
        let mut vruntime = vec![0u64; units];
        let mut ran = vec![0u64; units];
        let ready = |vr: u64, unit: usize| Ready {
            vruntime: vr,
            boosted: false,
            affinity: u64::MAX,
            weight: weights[unit],
        };
        for unit in 0..units {
            queues.insert(unit, ready(0, unit));
        }
        // (running unit, slice end) per CPU; CPUs start a little apart.
        let mut running: Vec<Option<(usize, u64)>> = vec![None; cpus];
        let end = ms * 1_000_000;
        let mut now_of = vec![0u64; cpus];
        for (cpu, now) in now_of.iter_mut().enumerate() {
            *now = cpu as u64 * 3_000_000;
        }
        loop {
            let cpu = (0..cpus).min_by_key(|&c| now_of[c]).unwrap();
            let now = now_of[cpu];
            if now >= end {
                break;
            }
            if let Some((unit, started)) = running[cpu].take() {
                let time = now - started;
                ran[unit] += time;
                vruntime[unit] += time * 256 / u64::from(weights[unit]);
                queues.insert(unit, ready(vruntime[unit], unit));
            }
            match queues.pick(cpu, None) {
                Some(p) => {
                    queues.remove(p.unit);
                    running[cpu] = Some((p.unit, now));
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    now_of[cpu] = now + TIME_SLICE_NS + x % (jitter_ns + 1);
                }
                None => now_of[cpu] = now + 1_000_000,
            }
        }
        let total: u64 = ran.iter().sum();
        let shares = ran.iter().map(|&r| r as f64 / total as f64).collect();
        (shares, queues.migrations())
    }

    #[test]
    fn weights_hold_across_two_cpus() {
        let weights = [100, 200, 400, 400];
        for jitter in [0, 5_000_000, 20_000_000] {
            let (shares, migrations) = shares(&weights, 2, 1500, jitter);
            std::println!("{shares:?} {migrations}");
            let total: u32 = weights.iter().sum();
            for (share, &w) in shares.iter().zip(&weights) {
                let ideal = f64::from(w) / f64::from(total);
                assert!(
                    (share / ideal - 1.0).abs() < 0.05,
                    "{shares:?} ({migrations} migrations)"
                );
            }
        }
    }
}

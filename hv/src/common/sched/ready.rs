//! The run queue's ordered sets, so that a pass costs O(log n) in the number of vCPUs rather
//! than a look at every one: the ready vCPUs by (boost class, virtual run time), and the
//! vCPUs by their next timer deadline. Both are indexed binary heaps on arrays sized once
//! for every vCPU of the machine (a unit number each): no allocation after boot.

use super::WAKE_CREDIT_NS;
use crate::common::domain::config::DEFAULT_WEIGHT;
use alloc::vec;
use alloc::vec::Vec;

const ABSENT: u32 = u32::MAX;

/// A min-heap of units keyed by `K`, which finds, re-keys and removes a unit in O(log n)
/// (each unit knows its place in the heap).
pub struct UnitHeap<K> {
    /// (key, unit), the least first.
    heap: Vec<(K, u32)>,
    /// Where each unit is in `heap` (`ABSENT`: not in it).
    place: Vec<u32>,
}

impl<K: Ord + Copy> UnitHeap<K> {
    /// An empty heap for units `0..units`.
    pub fn new(units: usize) -> Self {
        UnitHeap {
            heap: Vec::with_capacity(units),
            place: vec![ABSENT; units],
        }
    }

    /// Whether `unit` is in the heap.
    #[inline(always)]
    pub fn contains(&self, unit: usize) -> bool {
        self.place.get(unit).is_some_and(|&p| p != ABSENT)
    }

    /// The key of `unit`, if it is in the heap.
    pub fn key(&self, unit: usize) -> Option<K> {
        let at = *self.place.get(unit)?;
        self.heap.get(at as usize).map(|&(key, _)| key)
    }

    /// How many units are in the heap.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no unit is in the heap.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// The unit with the least key.
    #[inline(always)]
    pub fn peek(&self) -> Option<(usize, K)> {
        self.heap.first().map(|&(key, unit)| (unit as usize, key))
    }

    /// The unit at place `at` of the heap (the root's children, 1 and 2, hold the second
    /// least).
    #[inline(always)]
    fn at(&self, at: usize) -> Option<(usize, K)> {
        self.heap.get(at).map(|&(key, unit)| (unit as usize, key))
    }

    /// Every unit in the heap with its key, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, K)> + '_ {
        self.heap.iter().map(|&(key, unit)| (unit as usize, key))
    }

    /// Puts `unit` in with `key`, or gives it `key` if it is in already; `None` takes it out.
    #[inline(always)]
    pub fn set(&mut self, unit: usize, key: Option<K>) {
        let Some(&at) = self.place.get(unit) else {
            return;
        };
        match key {
            None if at == ABSENT => {}
            None => self.remove_at(at as usize),
            Some(key) if at == ABSENT => {
                let at = self.heap.len();
                self.heap.push((key, unit as u32));
                self.place[unit] = at as u32;
                self.up(at);
            }
            Some(key) => {
                let at = at as usize;
                let old = core::mem::replace(&mut self.heap[at].0, key);
                if key < old {
                    self.up(at);
                } else if key > old {
                    self.down(at);
                }
            }
        }
    }

    /// Takes `unit` out; returns its key if it was in.
    #[inline(always)]
    pub fn remove(&mut self, unit: usize) -> Option<K> {
        let at = *self.place.get(unit)?;
        let &(key, _) = self.heap.get(at as usize)?;
        self.remove_at(at as usize);
        Some(key)
    }

    #[inline(always)]
    fn remove_at(&mut self, at: usize) {
        let Some(last) = self.heap.pop() else {
            return;
        };
        if at == self.heap.len() {
            self.place[last.1 as usize] = ABSENT;
            return;
        }
        // The last one fills the hole and takes its right place from there.
        let (_, gone) = core::mem::replace(&mut self.heap[at], last);
        self.place[gone as usize] = ABSENT;
        self.place[last.1 as usize] = at as u32;
        self.down(at);
        self.up(at);
    }

    #[inline(always)]
    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.place[self.heap[a].1 as usize] = a as u32;
        self.place[self.heap[b].1 as usize] = b as u32;
    }

    #[inline(always)]
    fn up(&mut self, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.heap[at].0 >= self.heap[parent].0 {
                break;
            }
            self.swap(at, parent);
            at = parent;
        }
    }

    #[inline(always)]
    fn down(&mut self, mut at: usize) {
        let len = self.heap.len();
        loop {
            let left = 2 * at + 1;
            if left >= len {
                break;
            }
            let right = left + 1;
            let child = if right < len && self.heap[right].0 < self.heap[left].0 {
                right
            } else {
                left
            };
            if self.heap[child].0 >= self.heap[at].0 {
                break;
            }
            self.swap(at, child);
            at = child;
        }
    }
}

/// What the ready set knows of a ready vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    /// Its virtual run time.
    pub vruntime: u64,
    /// Woken since it last ran.
    pub boosted: bool,
    /// The CPUs that may run it.
    pub affinity: u64,
    /// Its domain's weight.
    pub weight: u32,
}

/// The vCPU a pick chose, and the virtual run time it starts from at least (a woken vCPU
/// banks at most one slice of the time it slept: [`WAKE_CREDIT_NS`] of the least-served
/// vCPU's CPU time, in virtual run time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Picked {
    pub unit: usize,
    pub floor: Option<u64>,
}

/// Where a unit is in the [`ReadySet`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Out,
    Boosted,
    Unboosted,
}

/// The ready vCPUs in two heaps by boost class, each by (virtual run time, arrival): ties go
/// to the one that waited longest, as round robin would.
pub struct ReadySet {
    boosted: UnitHeap<(u64, u64)>,
    unboosted: UnitHeap<(u64, u64)>,
    class: Vec<Class>,
    affinity: Vec<u64>,
    weight: Vec<u32>,
    arrivals: u64,
}

impl ReadySet {
    /// An empty set for units `0..units`.
    pub fn new(units: usize) -> Self {
        ReadySet {
            boosted: UnitHeap::new(units),
            unboosted: UnitHeap::new(units),
            class: vec![Class::Out; units],
            affinity: vec![0; units],
            weight: vec![DEFAULT_WEIGHT; units],
            arrivals: 0,
        }
    }

    /// Whether `unit` is in the set.
    #[inline(always)]
    pub fn contains(&self, unit: usize) -> bool {
        self.class.get(unit).is_some_and(|&c| c != Class::Out)
    }

    /// What the set holds of `unit`, if it is in.
    pub fn get(&self, unit: usize) -> Option<Ready> {
        let (boosted, heap) = match self.class.get(unit)? {
            Class::Out => return None,
            Class::Boosted => (true, &self.boosted),
            Class::Unboosted => (false, &self.unboosted),
        };
        Some(Ready {
            vruntime: heap.key(unit)?.0,
            boosted,
            affinity: self.affinity[unit],
            weight: self.weight[unit],
        })
    }

    /// Puts `unit` in (behind those level with it), or updates it where it is.
    #[inline(always)]
    pub fn insert(&mut self, unit: usize, ready: Ready) {
        let Some(&class) = self.class.get(unit) else {
            return;
        };
        let arrival = match class {
            Class::Out => {
                self.arrivals += 1;
                self.arrivals
            }
            _ => {
                if self.get(unit) == Some(ready) {
                    return;
                }
                match self.remove(unit) {
                    Some(arrival) => arrival,
                    None => return,
                }
            }
        };
        self.affinity[unit] = ready.affinity;
        self.weight[unit] = ready.weight;
        let key = Some((ready.vruntime, arrival));
        if ready.boosted {
            self.class[unit] = Class::Boosted;
            self.boosted.set(unit, key);
        } else {
            self.class[unit] = Class::Unboosted;
            self.unboosted.set(unit, key);
        }
    }

    /// Takes `unit` out; returns its arrival if it was in.
    #[inline(always)]
    pub fn remove(&mut self, unit: usize) -> Option<u64> {
        let key = match *self.class.get(unit)? {
            Class::Out => return None,
            Class::Boosted => self.boosted.remove(unit),
            Class::Unboosted => self.unboosted.remove(unit),
        };
        self.class[unit] = Class::Out;
        key.map(|(_, arrival)| arrival)
    }

    /// Whether no vCPU is ready.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.boosted.is_empty() && self.unboosted.is_empty()
    }

    /// The one vCPU in the set, if it holds exactly one and it may run on the CPU
    /// `cpu_bit`: what [`Self::pick`] would take then, with no floor.
    #[inline(always)]
    pub fn only(&self, cpu_bit: u64) -> Option<usize> {
        let (unit, _) = match (self.boosted.len(), self.unboosted.len()) {
            (1, 0) => self.boosted.peek()?,
            (0, 1) => self.unboosted.peek()?,
            _ => return None,
        };
        (self.affinity[unit] & cpu_bit != 0).then_some(unit)
    }

    /// The CPUs (a bit each) that may run some ready vCPU.
    pub fn wanted_cpus(&self) -> u64 {
        self.boosted
            .iter()
            .chain(self.unboosted.iter())
            .fold(0, |cpus, (unit, _)| cpus | self.affinity[unit])
    }

    /// The ready vCPU to run next on the CPU `cpu_bit`, by `sched::pick`'s rules; `yielder`,
    /// the vCPU that just yielded, only if no other may run there. O(1) unless the first of a
    /// heap may not run on this CPU (affinity), where that heap is looked through.
    #[inline(always)]
    pub fn pick(&self, cpu_bit: u64, yielder: Option<usize>) -> Option<Picked> {
        let skip = yielder.unwrap_or(usize::MAX);
        let picked = match (
            self.least(&self.boosted, cpu_bit, skip),
            self.least(&self.unboosted, cpu_bit, skip),
        ) {
            // The woken vCPU with the least run time first, while it had no more than the
            // least of the others; it banks at most one slice of the time it slept.
            // One slice of the least-served vCPU's, in virtual run time: how far ahead a
            // slice of its puts it (a plain slice in ns let a napper beside a spinner of
            // weight 100 keep 10 of the spinner's 25.6 ms and get 29% of the CPU, not half).
            (Some((unit, vruntime)), Some((least_unit, least))) if vruntime <= least => {
                Some(Picked {
                    unit,
                    floor: Some(self.wake_floor(skip, least_unit, least)),
                })
            }
            (_, Some((unit, _))) | (Some((unit, _)), None) => Some(Picked { unit, floor: None }),
            (None, None) => None,
        };
        picked.or_else(|| {
            let unit = yielder?;
            self.may_run(unit, cpu_bit)
                .then_some(Picked { unit, floor: None })
        })
    }

    /// The virtual run time a woken vCPU starts from at least: one slice of CPU time of the
    /// least-served ready vCPU behind it, `least` (`least_unit`) or the yielder `skip` if it
    /// had less. The yielder is passed over, not out of the set: without it the floor came
    /// from a vCPU further ahead and lifted the woken one past the yielder. Out of line: the
    /// pick is inlined into the scheduler's pass, whose code this keeps as it was.
    #[inline(never)]
    fn wake_floor(&self, skip: usize, least_unit: usize, least: u64) -> u64 {
        let (least_unit, least) = match self.unboosted.key(skip) {
            Some((own, _)) if own < least => (skip, own),
            _ => (least_unit, least),
        };
        let weight = u64::from(self.weight[least_unit].max(1));
        let credit = WAKE_CREDIT_NS * u64::from(DEFAULT_WEIGHT) / weight;
        least.saturating_sub(credit)
    }

    /// Whether `unit` is ready and may run on the CPU `cpu_bit`.
    #[inline(always)]
    pub fn may_run(&self, unit: usize, cpu_bit: u64) -> bool {
        self.contains(unit) && self.affinity[unit] & cpu_bit != 0
    }

    /// The least of `heap` that may run on `cpu_bit`, other than `skip`: its root, or one of
    /// the root's children when the root is `skip`; the whole heap looked through otherwise.
    #[inline(always)]
    fn least(
        &self,
        heap: &UnitHeap<(u64, u64)>,
        cpu_bit: u64,
        skip: usize,
    ) -> Option<(usize, u64)> {
        let (unit, (vruntime, _)) = heap.peek()?;
        let allowed = |unit: usize| self.affinity[unit] & cpu_bit != 0;
        if unit != skip && allowed(unit) {
            return Some((unit, vruntime));
        }
        if unit == skip {
            let second = match (heap.at(1), heap.at(2)) {
                (Some(a), Some(b)) => Some(if b.1 < a.1 { b } else { a }),
                (a, b) => a.or(b),
            };
            match second {
                Some((unit, (vruntime, _))) if allowed(unit) => return Some((unit, vruntime)),
                None => return None,
                Some(_) => {}
            }
        }
        self.least_slowly(heap, cpu_bit, skip)
    }

    #[cold]
    fn least_slowly(
        &self,
        heap: &UnitHeap<(u64, u64)>,
        cpu_bit: u64,
        skip: usize,
    ) -> Option<(usize, u64)> {
        heap.iter()
            .filter(|&(unit, _)| unit != skip && self.affinity[unit] & cpu_bit != 0)
            .min_by_key(|&(_, key)| key)
            .map(|(unit, (vruntime, _))| (unit, vruntime))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heap_keeps_its_least_through_inserts_updates_and_removals() {
        let mut heap = UnitHeap::<u64>::new(64);
        // A fixed pseudo-random walk, checked against a plain array after every step.
        let mut model: Vec<Option<u64>> = vec![None; 64];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let unit = (x % 64) as usize;
            let key = (x >> 8) % 1000;
            if x & 0x80 == 0 {
                heap.set(unit, Some(key));
                model[unit] = Some(key);
            } else {
                assert_eq!(heap.remove(unit), model[unit].take());
            }
            let least = model.iter().filter_map(|k| *k).min();
            assert_eq!(heap.peek().map(|(_, k)| k), least);
            if let Some((unit, key)) = heap.peek() {
                assert_eq!(model[unit], Some(key));
            }
            assert_eq!(heap.iter().count(), model.iter().flatten().count());
        }
    }

    #[test]
    fn a_request_marks_a_vcpu_only_while_it_is_off_the_cpu() {
        use crate::common::vcpu::state::{Attention, Requests, request};
        use alloc::sync::Arc;
        let set = Arc::new(Attention::new(130));
        let requests = Requests::default();
        requests.make(request::EVENT);
        let mut seen = Vec::new();
        assert!(!set.drain(|u| seen.push(u)), "not watched yet");
        requests.watch(&set, 129);
        assert!(set.drain(|u| seen.push(u)), "marked as it is watched");
        assert_eq!(seen, [129]);
        requests.make(request::EVENT);
        requests.make(request::TIMERS);
        seen.clear();
        set.drain(|u| seen.push(u));
        assert_eq!(seen, [129], "once however many requests");
        requests.set_off_cpu(false);
        requests.make(request::EVENT);
        assert!(!set.drain(|_| {}), "running: looked at when it comes back");
        requests.set_off_cpu(true);
        requests.make(request::EVENT);
        assert!(set.drain(|_| {}), "back: marked");
    }

    fn ready(vruntime: u64, boosted: bool) -> Ready {
        Ready {
            vruntime,
            boosted,
            affinity: u64::MAX,
            weight: DEFAULT_WEIGHT,
        }
    }

    #[test]
    fn ties_go_to_the_one_that_waited_longest_and_the_yielder_goes_last() {
        let mut set = ReadySet::new(4);
        for unit in [2, 0, 3] {
            set.insert(unit, ready(5, false));
        }
        assert_eq!(set.pick(1, None).map(|p| p.unit), Some(2));
        assert_eq!(set.pick(1, Some(2)).map(|p| p.unit), Some(0));
        set.remove(0);
        set.remove(3);
        assert_eq!(
            set.pick(1, Some(2)).map(|p| p.unit),
            Some(2),
            "alone, it runs"
        );
        assert!(set.contains(2), "the yielder stays in the set");
    }

    #[test]
    fn a_yielder_that_is_least_served_sets_the_woken_vcpus_floor() {
        let mut set = ReadySet::new(3);
        set.insert(0, ready(100 * WAKE_CREDIT_NS, false));
        set.insert(1, ready(0, true));
        set.insert(2, ready(50 * WAKE_CREDIT_NS, false));
        // Unit 2 yielded: passed over, but the least served, so the floor is from it.
        assert_eq!(
            set.pick(1, Some(2)),
            Some(Picked {
                unit: 1,
                floor: Some(49 * WAKE_CREDIT_NS)
            })
        );
        assert_eq!(
            set.pick(1, Some(0)).map(|p| p.floor),
            Some(Some(49 * WAKE_CREDIT_NS)),
            "a yielder further ahead changes nothing"
        );
    }

    #[test]
    fn a_woken_vcpu_goes_first_while_level_and_keeps_one_slice_of_credit() {
        let mut set = ReadySet::new(3);
        set.insert(0, ready(100 * WAKE_CREDIT_NS, false));
        set.insert(1, ready(0, true));
        assert_eq!(
            set.pick(1, None),
            Some(Picked {
                unit: 1,
                floor: Some(99 * WAKE_CREDIT_NS)
            })
        );
        set.insert(1, ready(100 * WAKE_CREDIT_NS + 1, true));
        assert_eq!(set.pick(1, None).map(|p| p.unit), Some(0));
    }

    #[test]
    fn only_the_one_ready_vcpu_that_may_run_here_is_the_only_one() {
        let mut set = ReadySet::new(3);
        assert_eq!(set.only(1), None, "empty");
        set.insert(2, ready(7, true));
        assert_eq!(set.only(1), Some(2));
        assert_eq!(
            set.pick(1, None),
            Some(Picked {
                unit: 2,
                floor: None
            })
        );
        set.insert(0, ready(9, false));
        assert_eq!(set.only(1), None, "two");
        set.remove(2);
        assert_eq!(set.only(1), Some(0));
        set.insert(
            0,
            Ready {
                affinity: 0b10,
                ..ready(9, false)
            },
        );
        assert_eq!(set.only(0b01), None, "not here");
        assert_eq!(set.only(0b10), Some(0));
    }

    #[test]
    fn affinity_is_honoured() {
        let mut set = ReadySet::new(3);
        set.insert(0, ready(1, false));
        set.insert(
            1,
            Ready {
                affinity: 0b10,
                ..ready(0, false)
            },
        );
        assert_eq!(set.pick(0b01, None).map(|p| p.unit), Some(0));
        assert_eq!(set.pick(0b10, None).map(|p| p.unit), Some(1));
        assert_eq!(set.wanted_cpus(), u64::MAX);
        assert!(set.may_run(1, 0b10) && !set.may_run(1, 0b01));
    }
}

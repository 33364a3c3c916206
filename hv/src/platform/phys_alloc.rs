//! Physical memory bookkeeping: a sorted list of free ranges with first-fit allocation.
//!
//! Domain RAM is allocated as one contiguous, 2 MiB-aligned range (so nested paging can use
//! large pages and guest-physical translation is one bounds check and an add); page-table and
//! VMCS/VMCB pages come from the same pool. Freed ranges merge with their neighbours, so a
//! destroyed domain's memory is whole again. Pure code: unit-tested on the host.

/// Free ranges the allocator can hold before it must refuse to split further.
const MAX_RANGES: usize = 128;

/// A half-open physical range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// Free physical memory.
#[derive(Debug)]
pub struct PhysAllocator {
    free: [Range; MAX_RANGES],
    len: usize,
    total_bytes: u64,
}

impl Default for PhysAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl PhysAllocator {
    /// An allocator with nothing to give.
    pub const fn new() -> Self {
        PhysAllocator {
            free: [Range { start: 0, end: 0 }; MAX_RANGES],
            len: 0,
            total_bytes: 0,
        }
    }

    /// Bytes currently free.
    pub fn free_bytes(&self) -> u64 {
        self.ranges().iter().map(|r| r.end - r.start).sum()
    }

    /// Bytes ever added (free now or allocated).
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    fn ranges(&self) -> &[Range] {
        &self.free[..self.len]
    }

    /// Adds `[start, end)` as free memory (page-trimmed). Overlaps with what is already free are
    /// ignored rather than double-counted.
    pub fn add(&mut self, start: u64, end: u64) {
        let start = start.saturating_add(0xfff) & !0xfff;
        let end = end & !0xfff;
        if start >= end {
            return;
        }
        self.remove(start, end);
        if self.insert(Range { start, end }) {
            self.total_bytes += end - start;
        }
    }

    /// Takes `[start, end)` out of the free memory (e.g. the hypervisor image, boot modules).
    pub fn remove(&mut self, start: u64, end: u64) {
        let mut i = 0;
        while i < self.len {
            let r = self.free[i];
            if r.end <= start || r.start >= end {
                i += 1;
                continue;
            }
            self.delete(i);
            if r.start < start {
                self.insert(Range {
                    start: r.start,
                    end: start,
                });
            }
            if r.end > end {
                self.insert(Range {
                    start: end,
                    end: r.end,
                });
            }
            i = 0;
        }
    }

    /// Allocates `size` bytes aligned to `align` (a power of two, at least 4 KiB), first fit.
    pub fn allocate(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() || align < 0x1000 {
            return None;
        }
        let size = size.checked_add(0xfff)? & !0xfff;
        let (start, end) = self.ranges().iter().find_map(|r| {
            let start = r.start.checked_add(align - 1)? & !(align - 1);
            let end = start.checked_add(size)?;
            (end <= r.end).then_some((start, end))
        })?;
        self.remove(start, end);
        Some(start)
    }

    /// Returns `[start, start + size)`, which must have come from [`Self::allocate`].
    pub fn release(&mut self, start: u64, size: u64) {
        let end = start + ((size + 0xfff) & !0xfff);
        self.insert(Range { start, end });
    }

    /// Inserts keeping the list sorted and merged; false when the table is full.
    fn insert(&mut self, mut range: Range) -> bool {
        let mut i = 0;
        while i < self.len {
            let r = self.free[i];
            if r.end == range.start || range.end == r.start {
                range = Range {
                    start: r.start.min(range.start),
                    end: r.end.max(range.end),
                };
                self.delete(i);
                continue;
            }
            i += 1;
        }
        if self.len == MAX_RANGES {
            return false;
        }
        let at = self
            .ranges()
            .iter()
            .position(|r| r.start > range.start)
            .unwrap_or(self.len);
        self.free.copy_within(at..self.len, at + 1);
        self.free[at] = range;
        self.len += 1;
        true
    }

    fn delete(&mut self, i: usize) {
        self.free.copy_within(i + 1..self.len, i);
        self.len -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn allocations_are_aligned_disjoint_and_inside_free_memory() {
        let mut a = PhysAllocator::new();
        a.add(MIB, 64 * MIB);
        a.remove(MIB, 3 * MIB + 0x1000);
        let big = a.allocate(16 * MIB, 2 * MIB).unwrap();
        assert_eq!(big % (2 * MIB), 0);
        assert!(big >= 3 * MIB + 0x1000);
        let page = a.allocate(0x1000, 0x1000).unwrap();
        assert!(page + 0x1000 <= big || page >= big + 16 * MIB);
        assert_eq!(
            a.free_bytes(),
            64 * MIB - (3 * MIB + 0x1000) + MIB - 16 * MIB - 0x1000 - MIB
        );
    }

    #[test]
    fn released_memory_merges_back_so_nothing_leaks() {
        let mut a = PhysAllocator::new();
        a.add(0, 32 * MIB);
        let before = a.free_bytes();
        let blocks: Vec<u64> = (0..8)
            .map(|_| a.allocate(2 * MIB, 2 * MIB).unwrap())
            .collect();
        for b in blocks.iter().rev() {
            a.release(*b, 2 * MIB);
        }
        assert_eq!(a.free_bytes(), before);
        assert_eq!(a.ranges().len(), 1, "fully merged");
        assert_eq!(a.allocate(32 * MIB, 0x1000), Some(0));
    }

    #[test]
    fn impossible_requests_fail_cleanly() {
        let mut a = PhysAllocator::new();
        a.add(0, 4 * MIB);
        assert_eq!(a.allocate(8 * MIB, 0x1000), None);
        assert_eq!(a.allocate(0, 0x1000), None);
        assert_eq!(a.allocate(0x1000, 3), None);
        assert_eq!(a.allocate(u64::MAX, 0x1000), None);
    }
}

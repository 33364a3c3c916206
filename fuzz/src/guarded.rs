//! Guest RAM with guard regions on both sides: the hypervisor may write anywhere inside the
//! RAM it hands a guest, and nowhere else; a changed guard byte is a write outside it.
//!
//! Buffers are kept for the next input (zeroing is a memset; allocating and faulting in
//! megabytes per input would dominate the run time).

use crate::common::memory::guest_memory::GuestMemory;
use std::cell::RefCell;

/// Bytes of guard on each side.
pub const GUARD_BYTES: usize = 64 << 10;
const GUARD_BYTE: u8 = 0xa5;

std::thread_local! {
    static POOL: RefCell<Vec<Vec<u64>>> = const { RefCell::new(Vec::new()) };
    static GUARD: Vec<u8> = vec![GUARD_BYTE; GUARD_BYTES];
}

/// A RAM of `size` bytes between two guards.
pub struct GuardedRam {
    backing: Vec<u64>,
    size: u64,
}

impl GuardedRam {
    /// `size` must be a multiple of 8.
    pub fn new(size: u64) -> Self {
        let words = (GUARD_BYTES * 2 + size as usize) / 8;
        let mut backing = POOL
            .with(|p| {
                let mut pool = p.borrow_mut();
                let at = pool.iter().position(|b| b.len() == words)?;
                Some(pool.swap_remove(at))
            })
            .unwrap_or_else(|| vec![0; words]);
        let bytes = backing.as_mut_ptr().cast::<u8>();
        // SAFETY: the backing holds GUARD_BYTES * 2 + size bytes.
        unsafe {
            core::ptr::write_bytes(bytes, GUARD_BYTE, GUARD_BYTES);
            core::ptr::write_bytes(bytes.add(GUARD_BYTES), 0, size as usize);
            core::ptr::write_bytes(
                bytes.add(GUARD_BYTES + size as usize),
                GUARD_BYTE,
                GUARD_BYTES,
            );
        }
        GuardedRam { backing, size }
    }

    /// Host address of guest-physical 0.
    pub fn host_base(&self) -> *mut u8 {
        // The backing vector is never reallocated.
        self.backing[GUARD_BYTES / 8..].as_ptr() as *mut u8
    }

    /// A view of the RAM for a domain (or for the code under test).
    pub fn memory(&self) -> GuestMemory {
        // SAFETY: the range lies inside `backing`, which outlives every use the harness makes
        // of the view (the domains holding views are dropped before the RAM).
        unsafe { GuestMemory::new(self.host_base(), self.size) }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The host range of the RAM (without the guards).
    pub fn host_range(&self) -> core::ops::Range<u64> {
        let base = self.host_base() as u64;
        base..base + self.size
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: plain bytes of the backing vector, borrowed with it.
        unsafe {
            core::slice::from_raw_parts(self.backing.as_ptr().cast::<u8>(), self.backing.len() * 8)
        }
    }

    /// Panics, naming the first changed guard byte, if anything wrote outside the RAM.
    pub fn check_guards(&self, who: &str) {
        let bytes = self.bytes();
        let before = &bytes[..GUARD_BYTES];
        let after = &bytes[GUARD_BYTES + self.size as usize..];
        GUARD.with(|guard| {
            if before != &guard[..] {
                let i = before.iter().position(|&b| b != GUARD_BYTE).unwrap_or(0);
                panic!("{who}: written {} bytes BEFORE its RAM", GUARD_BYTES - i);
            }
            if after != &guard[..] {
                let i = after.iter().position(|&b| b != GUARD_BYTE).unwrap_or(0);
                panic!("{who}: written {i} bytes past the END of its RAM");
            }
        });
    }

    /// Whether the RAM outside `keep` is all zeros.
    pub fn zero_outside(&self, keep: core::ops::Range<u64>) -> bool {
        let ram = &self.bytes()[GUARD_BYTES..GUARD_BYTES + self.size as usize];
        let (start, end) = (
            keep.start.min(self.size) as usize,
            keep.end.min(self.size) as usize,
        );
        let zeros = |part: &[u8]| part.iter().all(|&b| b == 0);
        zeros(&ram[..start]) && zeros(&ram[end.max(start)..])
    }
}

impl Drop for GuardedRam {
    fn drop(&mut self) {
        let backing = core::mem::take(&mut self.backing);
        POOL.with(|p| p.borrow_mut().push(backing));
    }
}

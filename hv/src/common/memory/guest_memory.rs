//! A domain's RAM as the hypervisor sees it: guest-physical `[0, size)` backed by one
//! contiguous host range.
//!
//! Every access from the hypervisor goes through here: the guest-physical range is checked
//! (with overflow checks) before any host pointer is formed, and data is copied in or out once,
//! so a guest can never point the hypervisor at memory that is not its own.

use core::mem::MaybeUninit;
use lamina_abi::Errno;

/// A domain's RAM.
#[derive(Debug)]
pub struct GuestMemory {
    host_base: *mut u8,
    size: u64,
}

// SAFETY: the backing memory belongs to the domain, which is used by one CPU at a time.
unsafe impl Send for GuestMemory {}

/// An access outside the domain's RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfBounds {
    /// The first guest-physical address asked for.
    pub gpa: u64,
    /// The length asked for.
    pub len: u64,
}

impl From<OutOfBounds> for Errno {
    fn from(_: OutOfBounds) -> Errno {
        Errno::EFAULT
    }
}

impl GuestMemory {
    /// Wraps `size` bytes at `host_base`.
    ///
    /// # Safety
    /// `[host_base, host_base + size)` must be valid, writable memory owned by this domain for
    /// the lifetime of the value.
    pub unsafe fn new(host_base: *mut u8, size: u64) -> Self {
        GuestMemory { host_base, size }
    }

    /// No RAM at all: every access but an empty one is out of bounds. What a domain is left
    /// with once its RAM went back to the hypervisor, so nothing can reach freed memory.
    pub fn empty() -> Self {
        GuestMemory {
            // Never dereferenced for a non-empty range; non-null so that an empty copy is valid.
            host_base: core::ptr::NonNull::dangling().as_ptr(),
            size: 0,
        }
    }

    /// Size of RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of guest-physical 0 (for building nested page tables).
    pub fn host_base(&self) -> u64 {
        self.host_base as u64
    }

    /// Checks that `[gpa, gpa + len)` is inside RAM; returns the offset of `gpa`.
    pub fn check(&self, gpa: u64, len: u64) -> Result<usize, OutOfBounds> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size => Ok(gpa as usize),
            _ => Err(OutOfBounds { gpa, len }),
        }
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        let offset = self.check(gpa, buf.len() as u64)?;
        // SAFETY: the range was checked to lie inside this domain's RAM.
        unsafe {
            core::ptr::copy_nonoverlapping(self.host_base.add(offset), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `[gpa, gpa + buf.len())` into `buf`, which need not be initialised (a large
    /// stack buffer then costs no zeroing); returns it, every byte initialised.
    pub fn read_uninit<'b>(
        &self,
        gpa: u64,
        buf: &'b mut [MaybeUninit<u8>],
    ) -> Result<&'b mut [u8], OutOfBounds> {
        let offset = self.check(gpa, buf.len() as u64)?;
        // SAFETY: the range was checked to lie inside this domain's RAM; after the copy every
        // byte of `buf` is initialised, so viewing it as `[u8]` is sound.
        unsafe {
            core::ptr::copy_nonoverlapping(
                self.host_base.add(offset),
                buf.as_mut_ptr().cast::<u8>(),
                buf.len(),
            );
            Ok(&mut *(core::ptr::from_mut(buf) as *mut [u8]))
        }
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), OutOfBounds> {
        let offset = self.check(gpa, data.len() as u64)?;
        // SAFETY: the range was checked to lie inside this domain's RAM.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), self.host_base.add(offset), data.len())
        };
        Ok(())
    }

    /// Reads a little-endian `u64` at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, OutOfBounds> {
        let mut bytes = [0u8; 8];
        self.read(gpa, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Writes a little-endian `u64` at `gpa`.
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), OutOfBounds> {
        self.write(gpa, &value.to_le_bytes())
    }

    /// Fills `[gpa, gpa + len)` with zeros.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), OutOfBounds> {
        let offset = self.check(gpa, len)?;
        // SAFETY: the range was checked to lie inside this domain's RAM.
        unsafe { core::ptr::write_bytes(self.host_base.add(offset), 0, len as usize) };
        Ok(())
    }
}

/// The host memory behind a domain's RAM, which the domain owns: released (scrubbed and given
/// back to the allocator) when dropped.
#[derive(Debug)]
pub struct OwnedRam {
    start: u64,
    bytes: u64,
    release: fn(u64, u64),
}

impl OwnedRam {
    /// Takes ownership of `[start, start + bytes)`, which `release` gives back.
    pub fn new(start: u64, bytes: u64, release: fn(u64, u64)) -> Self {
        OwnedRam {
            start,
            bytes,
            release,
        }
    }

    /// Bytes still owned.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives back (scrubbed, by `release`) up to `max` bytes from the start; returns how many.
    pub fn release_front(&mut self, max: u64) -> u64 {
        let count = self.bytes.min(max);
        if count > 0 {
            (self.release)(self.start, count);
            self.start += count;
            self.bytes -= count;
        }
        count
    }
}

impl Drop for OwnedRam {
    fn drop(&mut self) {
        self.release_front(self.bytes);
    }
}

/// Test support: guest memory backed by a host vector.
#[cfg(any(test, fuzzing))]
pub(crate) mod testing {
    use super::GuestMemory;

    /// Owns the backing store of a test domain.
    pub(crate) struct TestMemory {
        _backing: Vec<u64>,
        pub(crate) mem: GuestMemory,
    }

    pub(crate) fn test_memory(size: u64) -> TestMemory {
        let mut backing = vec![0u64; (size / 8) as usize];
        // SAFETY: the vector outlives `mem` (both live in the returned struct) and is never
        // reallocated.
        let mem = unsafe { GuestMemory::new(backing.as_mut_ptr().cast(), size) };
        TestMemory {
            _backing: backing,
            mem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::test_memory;
    use super::*;

    #[test]
    fn accesses_inside_ram_work_and_outside_are_refused() {
        let t = test_memory(0x4000);
        t.mem.write(0x3ff8, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert_eq!(t.mem.read_u64(0x3ff8).unwrap(), 0x0807060504030201);
        assert!(t.mem.write(0x3ff9, &[0; 8]).is_err(), "straddles the end");
        assert!(
            t.mem.read(0x4000, &mut [0; 1]).is_err(),
            "just past the end"
        );
        assert!(t.mem.check(u64::MAX - 3, 8).is_err(), "wraps around");
        assert!(
            t.mem.check(0x4000, 0).is_ok(),
            "an empty range at the end is inside"
        );
        assert_eq!(
            Errno::from(t.mem.check(0x5000, 1).unwrap_err()),
            Errno::EFAULT
        );
    }
}

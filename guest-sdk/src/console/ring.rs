//! The console ring (docs/abi.md 13): console output with no exit per line.
//!
//! The guest copies bytes into the ring's output buffer and advances `out_prod` after a
//! release fence; the hypervisor prints them as `(dN) ` lines when the guest sends on the
//! console port ([`flush`]), and at the latest at the domain's next block, yield, poll, HLT,
//! timer interrupt or shutdown. When the buffer is full the writer sends on the port, which
//! has the hypervisor drain the ring at once, and then yields until there is space. The
//! hypervisor drains only as much as the domain's console budget allows (docs/abi.md 13.1):
//! with the budget spent the writer gives up with `EAGAIN` after
//! [`KICKS_WITHOUT_PROGRESS_MAX`] sends.
//!
//! Input goes the other way: the hypervisor fills `input` and raises VIRQ_CONSOLE; [`read`]
//! consumes it.

use core::sync::atomic::{AtomicU32, Ordering};

use lamina_abi::console::{CONSOLE_RING_INPUT_BYTES, CONSOLE_RING_OUTPUT_BYTES, ConsoleRing};

use crate::events::{self, Port};
use crate::hypercall::HypercallError;

/// How often the writer asks for a drain without seeing space before it gives up.
pub const KICKS_WITHOUT_PROGRESS_MAX: u32 = 4;

/// A handle on a console ring page.
#[derive(Clone, Copy, Debug)]
pub struct RingHandle {
    ring: *mut ConsoleRing,
}

// SAFETY: all accesses to the ring's indices are atomic; the data bytes are written before
// and read after the release/acquire pair on the indices.
unsafe impl Send for RingHandle {}
// SAFETY: as above. There must be one producer per direction (the SDK's console lock).
unsafe impl Sync for RingHandle {}

/// The writer stopped before writing everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingStalled {
    /// Bytes that went into the ring.
    pub written: usize,
}

impl RingHandle {
    /// A handle on the ring at `ring`.
    ///
    /// # Safety
    /// `ring` must point to a [`ConsoleRing`] that stays mapped and whose output side only
    /// this handle (and copies of it, used by one writer at a time) produces.
    pub const unsafe fn from_ptr(ring: *mut ConsoleRing) -> Self {
        RingHandle { ring }
    }

    fn index(&self, field: *mut u32) -> &AtomicU32 {
        // SAFETY: `field` points into the ring, valid by `from_ptr`'s contract, and u32
        // fields of a `repr(C)` struct are aligned.
        unsafe { AtomicU32::from_ptr(field) }
    }

    fn out_prod(&self) -> &AtomicU32 {
        // SAFETY: projecting a field of the valid ring.
        self.index(unsafe { &raw mut (*self.ring).out_prod })
    }

    fn out_cons(&self) -> &AtomicU32 {
        // SAFETY: as above.
        self.index(unsafe { &raw mut (*self.ring).out_cons })
    }

    fn in_prod(&self) -> &AtomicU32 {
        // SAFETY: as above.
        self.index(unsafe { &raw mut (*self.ring).in_prod })
    }

    fn in_cons(&self) -> &AtomicU32 {
        // SAFETY: as above.
        self.index(unsafe { &raw mut (*self.ring).in_cons })
    }

    /// Output bytes the hypervisor has not consumed yet.
    pub fn output_waiting(&self) -> u32 {
        self.out_prod()
            .load(Ordering::Relaxed)
            .wrapping_sub(self.out_cons().load(Ordering::Acquire))
    }

    /// Copies all of `bytes` into the output buffer. When it is full, calls `drain` (which
    /// should have the consumer make room) and tries again; gives up after
    /// [`KICKS_WITHOUT_PROGRESS_MAX`] calls without room, or when `drain` returns `false`.
    pub fn write(&self, bytes: &[u8], mut drain: impl FnMut() -> bool) -> Result<(), RingStalled> {
        const SIZE: u32 = CONSOLE_RING_OUTPUT_BYTES as u32;
        let mut written = 0;
        let mut fruitless_drains = 0;
        while written < bytes.len() {
            let prod = self.out_prod().load(Ordering::Relaxed);
            let cons = self.out_cons().load(Ordering::Acquire);
            let used = prod.wrapping_sub(cons);
            // `used > SIZE` is a corrupt ring; the consumer resets it when asked to drain.
            if used >= SIZE {
                if fruitless_drains == KICKS_WITHOUT_PROGRESS_MAX || !drain() {
                    return Err(RingStalled { written });
                }
                fruitless_drains += 1;
                continue;
            }
            fruitless_drains = 0;
            let chunk = ((SIZE - used) as usize).min(bytes.len() - written);
            // At most two copies (the buffer wraps), not a store per byte.
            let start = (prod % SIZE) as usize;
            let first = chunk.min(SIZE as usize - start);
            let source = bytes[written..written + chunk].as_ptr();
            // SAFETY: `start + first <= SIZE` and `chunk - first <= start`: both runs are
            // inside the output buffer, in the part the consumer does not read (from
            // `out_prod` on, not yet advanced over them), and `bytes` is not in the ring.
            unsafe {
                let output = (&raw mut (*self.ring).output).cast::<u8>();
                core::ptr::copy_nonoverlapping(source, output.add(start), first);
                core::ptr::copy_nonoverlapping(source.add(first), output, chunk - first);
            }
            // Release: the bytes are visible before the index that publishes them.
            self.out_prod()
                .store(prod.wrapping_add(chunk as u32), Ordering::Release);
            written += chunk;
        }
        Ok(())
    }

    /// Takes up to `buffer.len()` bytes of input; returns how many.
    pub fn read(&self, buffer: &mut [u8]) -> usize {
        const SIZE: u32 = CONSOLE_RING_INPUT_BYTES as u32;
        let cons = self.in_cons().load(Ordering::Relaxed);
        let prod = self.in_prod().load(Ordering::Acquire);
        // A corrupt producer index yields nothing rather than stale bytes.
        let waiting = prod.wrapping_sub(cons).min(SIZE) as usize;
        let count = waiting.min(buffer.len());
        for (offset, byte) in buffer[..count].iter_mut().enumerate() {
            let slot = (cons.wrapping_add(offset as u32) % SIZE) as usize;
            // SAFETY: `slot < SIZE`, inside the input buffer, below `in_prod`.
            *byte = unsafe { (&raw const (*self.ring).input[slot]).read_volatile() };
        }
        self.in_cons()
            .store(cons.wrapping_add(count as u32), Ordering::Release);
        count
    }
}

/// This domain's console ring (`StartInfo::console_ring_gpa`).
pub fn ring() -> RingHandle {
    let gpa = crate::start_info().console_ring_gpa;
    // SAFETY: the hypervisor keeps the ring at this address for the domain's life
    // (docs/abi.md 4.5), identity-mapped; the SDK's console lock makes one writer at a time.
    unsafe { RingHandle::from_ptr(gpa as *mut ConsoleRing) }
}

/// The console port (`StartInfo::console_port`).
pub fn console_port() -> Port {
    Port::new(crate::start_info().console_port)
}

/// Has the hypervisor print what the ring holds now (a send on the console port).
pub fn flush() -> Result<(), HypercallError> {
    events::send(console_port())
}

/// A [`write()`] that stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingWriteError {
    /// Bytes that went into the ring before it stopped.
    pub written: usize,
    /// The failed send on the console port, or `EAGAIN` when the hypervisor accepted the
    /// sends but never made room.
    pub error: HypercallError,
}

/// Writes `bytes` to the ring, sending on the console port (and yielding) when it is full.
/// The ring takes one producer at a time: callers serialize (the console backend of
/// [`crate::pvops`] writes with interrupts off).
pub fn write(bytes: &[u8]) -> Result<(), RingWriteError> {
    let mut failure = None;
    let result = ring().write(bytes, || match flush() {
        Ok(()) => {
            if ring().output_waiting() >= CONSOLE_RING_OUTPUT_BYTES as u32 {
                let _ = crate::sched::yield_now();
            }
            true
        }
        Err(error) => {
            failure = Some(error);
            false
        }
    });
    result.map_err(|stalled| RingWriteError {
        written: stalled.written,
        error: failure.unwrap_or(HypercallError::Errno(lamina_abi::Errno::EAGAIN)),
    })
}

/// Takes up to `buffer.len()` bytes of console input from the ring.
pub fn read(buffer: &mut [u8]) -> usize {
    ring().read(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_ring() -> RingHandle {
        // SAFETY: ConsoleRing is plain bytes and integers; zero is valid.
        let ring: Box<ConsoleRing> = Box::new(unsafe { core::mem::zeroed() });
        // SAFETY: leaked, so valid forever; the test is the only producer.
        unsafe { RingHandle::from_ptr(Box::leak(ring)) }
    }

    /// What a hypervisor drain prints: everything between `out_cons` and `out_prod`.
    fn drain(ring: &RingHandle, printed: &mut Vec<u8>) {
        let mut cons = ring.out_cons().load(Ordering::Acquire);
        let prod = ring.out_prod().load(Ordering::Acquire);
        while cons != prod {
            // SAFETY: test-owned ring.
            printed.push(unsafe { (*ring.ring).output[(cons % 2048) as usize] });
            cons = cons.wrapping_add(1);
        }
        ring.out_cons().store(cons, Ordering::Release);
    }

    #[test]
    fn bytes_go_in_order_and_prod_advances() {
        let ring = fake_ring();
        ring.write(b"hello\n", || unreachable!("room enough"))
            .unwrap();
        assert_eq!(ring.output_waiting(), 6);
        let mut printed = Vec::new();
        drain(&ring, &mut printed);
        assert_eq!(printed, b"hello\n");
        assert_eq!(ring.output_waiting(), 0);
    }

    #[test]
    fn a_full_ring_is_drained_and_the_rest_follows() {
        let ring = fake_ring();
        let text: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut printed = Vec::new();
        let mut drains = 0;
        ring.write(&text, || {
            drains += 1;
            drain(&ring, &mut printed);
            true
        })
        .unwrap();
        drain(&ring, &mut printed);
        assert_eq!(drains, 2, "5000 bytes through 2048: two full rings");
        assert_eq!(printed, text);
    }

    #[test]
    fn indices_wrap_around_u32() {
        let ring = fake_ring();
        ring.out_prod().store(u32::MAX - 2, Ordering::Relaxed);
        ring.out_cons().store(u32::MAX - 2, Ordering::Relaxed);
        ring.write(b"wrap!", || unreachable!()).unwrap();
        assert_eq!(ring.out_prod().load(Ordering::Relaxed), 2);
        let mut printed = Vec::new();
        drain(&ring, &mut printed);
        assert_eq!(printed, b"wrap!");
    }

    #[test]
    fn a_consumer_that_never_drains_stalls_the_writer() {
        let ring = fake_ring();
        let text = [b'x'; 3000];
        let mut drains = 0;
        let result = ring.write(&text, || {
            drains += 1;
            true
        });
        assert_eq!(result, Err(RingStalled { written: 2048 }));
        assert_eq!(drains, KICKS_WITHOUT_PROGRESS_MAX);
        let result = fake_ring().write(&text, || false);
        assert_eq!(result, Err(RingStalled { written: 2048 }));
    }

    #[test]
    fn input_is_consumed_up_to_the_producer() {
        let ring = fake_ring();
        // SAFETY: test-owned ring.
        unsafe { (&mut (*ring.ring).input)[..3].copy_from_slice(b"abc") };
        ring.in_prod().store(3, Ordering::Release);
        let mut buffer = [0; 2];
        assert_eq!(ring.read(&mut buffer), 2);
        assert_eq!(&buffer, b"ab");
        assert_eq!(ring.read(&mut buffer), 1);
        assert_eq!(buffer[0], b'c');
        assert_eq!(ring.read(&mut buffer), 0);
    }
}

//! The two shared-state primitives the SDK needs, small enough to check by eye.
//!
//! A domain's kernel may take exceptions at any point (an exception handler that prints), so
//! shared state is guarded by atomics rather than assumed single-threaded. The SDK itself
//! runs on the boot vCPU only.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, Ordering};

/// A value written once at start of day and read-only afterwards.
#[cfg_attr(not(any(target_os = "none", test)), allow(dead_code))] // `claimed`: see `set`
pub(crate) struct WriteOnce<T> {
    written: AtomicBool,
    claimed: AtomicBool,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written by the one caller that wins `claimed`, before `written` is
// released; readers only read after acquiring `written == true`, and nobody writes afterwards.
unsafe impl<T: Sync> Sync for WriteOnce<T> {}

impl<T> WriteOnce<T> {
    /// An empty cell.
    pub(crate) const fn new() -> Self {
        WriteOnce {
            written: AtomicBool::new(false),
            claimed: AtomicBool::new(false),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Stores `value` and returns a reference to it; `None` (dropping `value`) if the cell is
    /// taken.
    #[cfg_attr(not(any(target_os = "none", test)), allow(dead_code))] // the guest's start code
    pub(crate) fn set(&'static self, value: T) -> Option<&'static T> {
        if self.claimed.swap(true, Ordering::AcqRel) {
            return None;
        }
        // SAFETY: only the caller that flipped `claimed` gets here, and no reader looks at the
        // value before `written` is set below.
        let stored = unsafe { (*self.value.get()).write(value) };
        self.written.store(true, Ordering::Release);
        Some(stored)
    }

    /// The value, once [`set`](Self::set) has finished.
    pub(crate) fn get(&'static self) -> Option<&'static T> {
        if !self.written.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: `written` is only set after the value was initialised, and it is never
        // written again.
        Some(unsafe { (*self.value.get()).assume_init_ref() })
    }
}

/// A lock that is tried, never waited for: a caller that finds it taken (an exception handler
/// that interrupted the holder) takes a fallback path instead of deadlocking.
pub(crate) struct TryLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is only reached through `try_with`, which holds `locked` for the duration.
unsafe impl<T: Send> Sync for TryLock<T> {}

impl<T> TryLock<T> {
    /// An unlocked lock around `value`.
    pub(crate) const fn new(value: T) -> Self {
        TryLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Runs `f` on the value if the lock is free; `None` if somebody holds it.
    pub(crate) fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        if self
            .locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        // SAFETY: we hold `locked`, so this is the only reference to the value until the
        // store below.
        let result = f(unsafe { &mut *self.value.get() });
        self.locked.store(false, Ordering::Release);
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_once_keeps_the_first_value() {
        static CELL: WriteOnce<u32> = WriteOnce::new();
        assert_eq!(CELL.get(), None);
        assert_eq!(CELL.set(7).copied(), Some(7));
        assert_eq!(CELL.set(8), None);
        assert_eq!(CELL.get(), Some(&7));
    }

    #[test]
    fn try_lock_refuses_reentry() {
        let lock = TryLock::new(1);
        let inner = lock.try_with(|v| {
            *v += 1;
            lock.try_with(|_| ())
        });
        assert_eq!(inner, Some(None));
        assert_eq!(lock.try_with(|v| *v), Some(2));
    }
}

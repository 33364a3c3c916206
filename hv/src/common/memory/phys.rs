//! The hypervisor's physical memory figures as vendor-neutral code sees them: on the machine,
//! the physical allocator; in host unit tests, a per-thread fake that test RAM is released to.

/// Bytes the physical allocator manages (free or in use), and bytes free now.
pub fn figures() -> (u64, u64) {
    #[cfg(target_os = "none")]
    return crate::platform::memory::figures();
    #[cfg(any(test, fuzzing))]
    return testing::FIGURES.with(|f| f.get());
    #[cfg(not(any(test, fuzzing, target_os = "none")))]
    (0, 0)
}

/// Test support: a fake allocator whose free figure grows as test RAM is released.
#[cfg(any(test, fuzzing))]
pub(crate) mod testing {
    use core::cell::Cell;

    std::thread_local! {
        pub(crate) static FIGURES: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }

    /// Sets the fake figures: `managed` bytes, of which `free` are free.
    pub(crate) fn set(managed: u64, free: u64) {
        FIGURES.with(|f| f.set((managed, free)));
    }

    /// An [`crate::common::memory::guest_memory::OwnedRam`] release function: counts the bytes as free.
    pub(crate) fn release(_start: u64, bytes: u64) {
        FIGURES.with(|f| {
            let (managed, free) = f.get();
            f.set((managed, free + bytes));
        });
    }
}

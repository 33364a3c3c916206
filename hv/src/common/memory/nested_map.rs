//! A domain's nested page table (EPT or NPT) as vendor-neutral code changes it: 4 KiB pages of
//! the grant window (docs/abi.md 16) mapped and unmapped at run time.
//!
//! The backend builds the table with the domain's RAM already mapped and hands it over as a
//! `Box<dyn NestedMap>` owned by the [`Domain`](crate::common::domain::Domain), so that a
//! hypercall of one domain can change another's (revocation). Dropping it frees every table
//! page. After a change that removes or narrows a mapping, the caller marks the domain
//! (`Domain::mark_nested_stale`): the run loop invalidates the vCPU's cached guest-physical
//! translations before it next enters the guest.

/// Why a page could not be mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedMapError {
    /// The address is not a page of the range the backend prepared for 4 KiB leaves (the
    /// grant window); RAM's large pages are never split.
    NotSmallPageRange,
}

/// The operations on a domain's nested page table that common code needs.
pub trait NestedMap {
    /// Maps the 4 KiB guest-physical page `gpa` to host-physical page `hpa`, readable and
    /// executable, writable when `writable`, replacing what was there.
    fn map_page(&mut self, gpa: u64, hpa: u64, writable: bool) -> Result<(), NestedMapError>;
    /// Unmaps the 4 KiB page at `gpa`; returns whether something was mapped there.
    fn unmap_page(&mut self, gpa: u64) -> bool;
}

/// Test support: a nested map that records its pages where the test can still see them.
#[cfg(any(test, fuzzing))]
pub(crate) mod testing {
    use super::{NestedMap, NestedMapError};
    use lamina_abi::layout::{GRANT_WINDOW_BYTES, GRANT_WINDOW_GPA};
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::rc::Rc;

    /// The pages mapped: guest-physical page -> (host page, writable).
    pub(crate) type Pages = Rc<RefCell<BTreeMap<u64, (u64, bool)>>>;

    /// A nested map over the grant window only, as the real one prepares it.
    pub(crate) struct FakeNestedMap {
        pub(crate) pages: Pages,
    }

    /// A fake map and a handle on its pages.
    pub(crate) fn fake_nested_map() -> (Box<dyn NestedMap>, Pages) {
        let pages = Pages::default();
        (
            Box::new(FakeNestedMap {
                pages: pages.clone(),
            }),
            pages,
        )
    }

    impl NestedMap for FakeNestedMap {
        fn map_page(&mut self, gpa: u64, hpa: u64, writable: bool) -> Result<(), NestedMapError> {
            let window = GRANT_WINDOW_GPA..GRANT_WINDOW_GPA + GRANT_WINDOW_BYTES;
            if !window.contains(&gpa) || !gpa.is_multiple_of(4096) {
                return Err(NestedMapError::NotSmallPageRange);
            }
            self.pages.borrow_mut().insert(gpa, (hpa, writable));
            Ok(())
        }

        fn unmap_page(&mut self, gpa: u64) -> bool {
            self.pages.borrow_mut().remove(&gpa).is_some()
        }
    }
}

//! The pages a domain shares with the hypervisor: the shared-info page and the per-vCPU
//! [`VcpuInfo`] (docs/abi.md 4.5, 8 and 10).
//!
//! Both sides write these pages at any time, so every field that changes is read and written
//! through atomics ([`AtomicU64::from_ptr`] and friends), never through plain references:
//! the hypervisor sets pending bits while the guest clears them, and the compiler must neither
//! cache nor tear those accesses. [`SharedPage`] and [`VcpuShared`] are thin handles over raw
//! pointers; the functions at the bottom find this domain's pages through [`StartInfo`]
//! (`shared_info_gpa`) and remember where `VcpuOp::RegisterVcpuInfo` moved a vCPU's info.
//!
//! [`current_vcpu`] is 0 unless the kernel uses [`crate::percpu`].
//!
//! [`StartInfo`]: lamina_abi::StartInfo

use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicU32, AtomicU64, Ordering};

use lamina_abi::event_channel::NR_PORT_WORDS;
use lamina_abi::shared_info::{MAX_VCPUS, SharedInfo, VcpuInfo, VcpuTimeInfo};

/// A handle on a shared-info page.
#[derive(Clone, Copy, Debug)]
pub struct SharedPage {
    page: *mut SharedInfo,
}

// SAFETY: the page is shared memory by design; every access through the handle is atomic (or
// a volatile copy under the seqlock), so handles may be used from any context.
unsafe impl Send for SharedPage {}
// SAFETY: as above.
unsafe impl Sync for SharedPage {}

impl SharedPage {
    /// A handle on the page at `page`.
    ///
    /// # Safety
    /// `page` must point to a [`SharedInfo`] that stays mapped for the rest of the program and
    /// that nobody accesses other than atomically (or by a seqlock-checked copy).
    pub const unsafe fn from_ptr(page: *mut SharedInfo) -> Self {
        SharedPage { page }
    }

    /// The page's address.
    pub const fn as_ptr(self) -> *mut SharedInfo {
        self.page
    }

    /// Word `word` of the pending bitmap (ports `64 * word ..`). Panics if `word >=
    /// NR_PORT_WORDS`.
    pub fn pending_word(&self, word: usize) -> &AtomicU64 {
        assert!(word < NR_PORT_WORDS, "pending word {word} out of range");
        // SAFETY: `from_ptr`'s contract: the page is valid and only accessed atomically; the
        // index is in bounds and a u64 in a `repr(C)` struct is 8-byte aligned.
        unsafe { AtomicU64::from_ptr(&raw mut (*self.page).evtchn_pending[word]) }
    }

    /// Word `word` of the mask bitmap. Panics if `word >= NR_PORT_WORDS`.
    pub fn mask_word(&self, word: usize) -> &AtomicU64 {
        assert!(word < NR_PORT_WORDS, "mask word {word} out of range");
        // SAFETY: as in `pending_word`.
        unsafe { AtomicU64::from_ptr(&raw mut (*self.page).evtchn_mask[word]) }
    }

    /// The `VcpuInfo` slot of vCPU `vcpu` inside this page (where it stays unless
    /// `RegisterVcpuInfo` moved it). Panics if `vcpu >= MAX_VCPUS`.
    pub fn vcpu_slot(&self, vcpu: usize) -> VcpuShared {
        assert!(vcpu < MAX_VCPUS, "vCPU {vcpu} out of range");
        // SAFETY: the slot is inside the page, which `from_ptr`'s contract keeps valid.
        unsafe { VcpuShared::from_ptr(&raw mut (*self.page).vcpu_info[vcpu]) }
    }

    /// The TSC frequency in kHz the hypervisor published.
    pub fn tsc_khz(&self) -> u64 {
        // SAFETY: as in `pending_word`.
        unsafe { AtomicU64::from_ptr(&raw mut (*self.page).tsc_khz) }.load(Ordering::Relaxed)
    }

    /// The wall clock at system time 0, `(seconds since 1970, nanoseconds)`, read under its
    /// `wc_version` seqlock.
    pub fn wall_clock_base(&self) -> (u64, u32) {
        // SAFETY: as in `pending_word`; the three fields are naturally aligned.
        let (version, sec, nsec) = unsafe {
            (
                AtomicU32::from_ptr(&raw mut (*self.page).wc_version),
                AtomicU64::from_ptr(&raw mut (*self.page).wc_sec),
                AtomicU32::from_ptr(&raw mut (*self.page).wc_nsec),
            )
        };
        loop {
            let before = version.load(Ordering::Acquire);
            let value = (sec.load(Ordering::Relaxed), nsec.load(Ordering::Relaxed));
            core::sync::atomic::fence(Ordering::Acquire);
            if before & 1 == 0 && version.load(Ordering::Relaxed) == before {
                return value;
            }
            core::hint::spin_loop();
        }
    }
}

/// A handle on one vCPU's [`VcpuInfo`], wherever it lives.
#[derive(Clone, Copy, Debug)]
pub struct VcpuShared {
    info: *mut VcpuInfo,
}

// SAFETY: as for `SharedPage`: all accesses are atomic or seqlock-checked copies.
unsafe impl Send for VcpuShared {}
// SAFETY: as above.
unsafe impl Sync for VcpuShared {}

impl VcpuShared {
    /// A handle on the `VcpuInfo` at `info`.
    ///
    /// # Safety
    /// As for [`SharedPage::from_ptr`], for a 64-byte-aligned [`VcpuInfo`].
    pub const unsafe fn from_ptr(info: *mut VcpuInfo) -> Self {
        VcpuShared { info }
    }

    /// Its address.
    pub const fn as_ptr(self) -> *mut VcpuInfo {
        self.info
    }

    /// `evtchn_upcall_pending`: set by the hypervisor, cleared by the guest's upcall handler.
    pub fn upcall_pending(&self) -> &AtomicU8 {
        // SAFETY: `from_ptr`'s contract; a byte is always aligned.
        unsafe { AtomicU8::from_ptr(&raw mut (*self.info).evtchn_upcall_pending) }
    }

    /// `evtchn_upcall_mask`: non-zero holds upcalls back (it starts set).
    pub fn upcall_mask(&self) -> &AtomicU8 {
        // SAFETY: as above.
        unsafe { AtomicU8::from_ptr(&raw mut (*self.info).evtchn_upcall_mask) }
    }

    /// `evtchn_pending_sel`: bit `i` set means word `i` of the pending bitmap may hold a port
    /// for this vCPU.
    pub fn pending_sel(&self) -> &AtomicU64 {
        // SAFETY: as above; the field is at offset 8 of a 64-byte-aligned struct.
        unsafe { AtomicU64::from_ptr(&raw mut (*self.info).evtchn_pending_sel) }
    }

    /// A consistent copy of the pvclock parameters and a TSC value `read_tsc` took while they
    /// were current (the version seqlock of docs/abi.md 10.1: retry while the version is odd
    /// or changed).
    pub fn time_snapshot(&self, mut read_tsc: impl FnMut() -> u64) -> (VcpuTimeInfo, u64) {
        let time = self.time_ptr();
        // SAFETY: `from_ptr`'s contract; `version` is the first u32 of an aligned struct.
        let version = unsafe { AtomicU32::from_ptr(&raw mut (*time).version) };
        loop {
            let before = version.load(Ordering::Acquire);
            if before & 1 == 0 {
                // SAFETY: the struct is valid memory; a torn copy is detected below and
                // thrown away (every bit pattern is a valid VcpuTimeInfo).
                let copy = unsafe { core::ptr::read_volatile(time) };
                let tsc = read_tsc();
                core::sync::atomic::fence(Ordering::Acquire);
                if version.load(Ordering::Relaxed) == before {
                    return (copy, tsc);
                }
            }
            core::hint::spin_loop();
        }
    }

    fn time_ptr(&self) -> *mut VcpuTimeInfo {
        // SAFETY: projecting a field of a valid struct pointer.
        unsafe { &raw mut (*self.info).time }
    }
}

/// Where each vCPU's `VcpuInfo` was moved to (0: still in the shared-info page).
static MOVED_VCPU_INFO: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];

/// The vCPU the caller runs on: 0 unless the kernel records its vCPUs with
/// [`crate::percpu::init_this_vcpu`].
#[inline(always)]
pub fn current_vcpu() -> u32 {
    crate::percpu::current()
}

/// This domain's shared-info page (`StartInfo::shared_info_gpa`, identity-mapped).
pub fn shared_page() -> SharedPage {
    let gpa = crate::start_info().shared_info_gpa;
    // SAFETY: the hypervisor keeps the page at this guest-physical address for the domain's
    // life (docs/abi.md 4.5); the boot identity map makes it the virtual address; the SDK
    // accesses it only through atomics.
    unsafe { SharedPage::from_ptr(gpa as *mut SharedInfo) }
}

/// vCPU `vcpu`'s `VcpuInfo`, in the shared-info page or where it was registered.
pub fn vcpu_shared(vcpu: u32) -> VcpuShared {
    let vcpu = vcpu as usize;
    assert!(vcpu < MAX_VCPUS, "vCPU {vcpu} out of range");
    match MOVED_VCPU_INFO[vcpu].load(Ordering::Acquire) {
        0 => shared_page().vcpu_slot(vcpu),
        // SAFETY: `record_moved_vcpu_info` only stores addresses of `'static`, aligned areas
        // the hypervisor accepted.
        moved => unsafe { VcpuShared::from_ptr(moved as *mut VcpuInfo) },
    }
}

/// vCPU 0's `VcpuInfo` while the kernel does not record its vCPUs ([`crate::percpu`]): what
/// [`this_vcpu`] answers then, found once. Null until then, after `percpu` came into use
/// (every vCPU looks its own up) and after vCPU 0's info moved (found again).
static ONLY_VCPU_INFO: AtomicPtr<VcpuInfo> = AtomicPtr::new(core::ptr::null_mut());

/// The current vCPU's `VcpuInfo`. A kernel that never records its vCPUs
/// ([`crate::percpu`]) pays one load and a branch: the pvclock read and the upcall mask come
/// through here.
#[inline]
pub fn this_vcpu() -> VcpuShared {
    let only = ONLY_VCPU_INFO.load(Ordering::Acquire);
    if !only.is_null() {
        // SAFETY: `find_this_vcpu` stored the address of vCPU 0's `VcpuInfo` (the shared
        // page's slot or a registered area, both valid for the program's life).
        return unsafe { VcpuShared::from_ptr(only) };
    }
    find_this_vcpu()
}

/// [`this_vcpu`] the first time, and always in a kernel with several vCPUs.
#[cold]
#[inline(never)]
fn find_this_vcpu() -> VcpuShared {
    if crate::percpu::in_use() {
        return vcpu_shared(crate::percpu::current());
    }
    let moved = MOVED_VCPU_INFO[0].load(Ordering::SeqCst);
    let info = vcpu_shared(0);
    ONLY_VCPU_INFO.store(info.as_ptr(), Ordering::SeqCst);
    // Who moved vCPU 0's info or started `percpu` meanwhile cleared the pointer before this
    // store, or changed what is read here after it: then it is taken back.
    if MOVED_VCPU_INFO[0].load(Ordering::SeqCst) != moved || crate::percpu::in_use() {
        let _ = ONLY_VCPU_INFO.compare_exchange(
            info.as_ptr(),
            core::ptr::null_mut(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
    info
}

/// [`this_vcpu`] must look again: `percpu` came into use, or vCPU 0's info moved.
pub(crate) fn forget_this_vcpu() {
    ONLY_VCPU_INFO.store(core::ptr::null_mut(), Ordering::SeqCst);
}

/// Remembers that vCPU `vcpu`'s info now lives at `gpa`.
pub(crate) fn record_moved_vcpu_info(vcpu: u32, gpa: u64) {
    MOVED_VCPU_INFO[vcpu as usize].store(gpa, Ordering::Release);
    forget_this_vcpu();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A zeroed shared-info page on the heap, leaked, for tests.
    pub(crate) fn fake_page() -> SharedPage {
        // SAFETY: SharedInfo is plain integers, for which all zeroes is valid.
        let page: Box<SharedInfo> = Box::new(unsafe { core::mem::zeroed() });
        // SAFETY: leaked, so valid forever; tests access it through the handle only.
        unsafe { SharedPage::from_ptr(Box::leak(page)) }
    }

    // The only test that touches the SDK's own statics (vCPU 0's info and its cache).
    #[test]
    fn this_vcpu_follows_vcpu_0s_info_when_it_moves() {
        let (first, second) = (fake_page().vcpu_slot(0), fake_page().vcpu_slot(0));
        record_moved_vcpu_info(0, first.as_ptr() as u64);
        assert_eq!(this_vcpu().as_ptr(), first.as_ptr());
        assert_eq!(
            this_vcpu().as_ptr(),
            first.as_ptr(),
            "found again in the cache"
        );
        record_moved_vcpu_info(0, second.as_ptr() as u64);
        assert_eq!(
            this_vcpu().as_ptr(),
            second.as_ptr(),
            "the cache forgot the old place"
        );
    }

    #[test]
    fn time_snapshot_retries_when_the_hypervisor_wrote_meanwhile() {
        let page = fake_page();
        let vcpu = page.vcpu_slot(0);
        let time = vcpu.time_ptr();
        // SAFETY: test-owned page.
        unsafe {
            (*time).version = 2;
            (*time).system_time = 42;
        }
        let mut reads = 0;
        let (copy, tsc) = vcpu.time_snapshot(|| {
            reads += 1;
            if reads == 1 {
                // A "hypervisor update" between the two version reads.
                // SAFETY: test-owned page, no other thread.
                unsafe {
                    (*time).system_time = 43;
                    (*time).version = 4;
                }
            }
            100 + reads
        });
        assert_eq!(reads, 2, "the first copy must be thrown away");
        assert_eq!(copy.system_time, 43);
        assert_eq!(tsc, 102);
    }

    #[test]
    fn bitmaps_and_flags_are_where_the_abi_says() {
        let page = fake_page();
        page.pending_word(3).store(1 << 5, Ordering::Relaxed);
        page.mask_word(15).store(9, Ordering::Relaxed);
        page.vcpu_slot(1).upcall_mask().store(1, Ordering::Relaxed);
        // SAFETY: test-owned page, read after the atomic stores on the same thread.
        let raw = unsafe { &*page.as_ptr() };
        assert_eq!(raw.evtchn_pending[3], 1 << 5);
        assert_eq!(raw.evtchn_mask[15], 9);
        assert_eq!(raw.vcpu_info[1].evtchn_upcall_mask, 1);
    }
}

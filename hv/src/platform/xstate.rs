//! The per-vCPU extended-state switch (docs/abi.md 18.1): x87, SSE and AVX registers, saved in
//! an XSAVE area per vCPU (FXSAVE where the CPU has no XSAVE), and XCR0 (18.2).
//!
//! The hypervisor is built for `x86_64-unknown-none`, which is soft-float: the compiler emits
//! no x87, SSE or AVX instruction anywhere in it, and nothing here may add one. So the FPU,
//! SSE and AVX registers and XCR0 hold the state of the vCPU that ran last on this CPU, also
//! while the hypervisor handles its exits, and the switch is lazy: a vCPU that enters again on
//! the CPU it left finds its state still there at no cost; only when another vCPU is scheduled
//! in ([`ExtendedState::schedule_in`], called from the backends' `activate`) is the owner's
//! state saved to its area and the newcomer's restored. XRSTOR of every component the
//! hypervisor saves overwrites all the state a guest can reach, so nothing of one domain is
//! ever seen by another (also when the owner's vCPU was dropped and nothing was saved).
//!
//! XCR0: the guest's value is in the register whenever its vCPU owns the registers, because a
//! guest reads it with XGETBV, which cannot be intercepted, and, where XSETBV is not
//! intercepted either (QEMU 7.2's TCG ignores the SVM intercept bit; the emulated CPU then
//! checks the value against its own features), writes it there itself. So the register is
//! the truth for the owner: it is read back (XGETBV) when the owner is switched out and kept
//! in its area, in bytes XSAVE never writes. The only instructions that depend on XCR0 in the
//! hypervisor are the XSAVE and XRSTOR here, which run with the host's XCR0 (every component
//! in [`Layout::mask`]); it is loaded for them and the guest's value again after, each only when
//! the value in the register differs. A hypercall or any other exit costs nothing for extended
//! state.
//!
//! The owner is per CPU (`PerCpu::xstate_owner`): each CPU's registers hold their own vCPU's.
//!
//! Intel SDM Vol. 1 13 (XSAVE), Vol. 2 (XSAVE, XRSTOR, XSETBV, FXSAVE); AMD APM Vol. 2 11.5.

use crate::platform::memory;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::registers::control::{Cr0, Cr0Flags, Cr4, Cr4Flags};

/// The area whose vCPU's state is in this CPU's registers (0: none, or its vCPU is gone).
fn owner() -> &'static AtomicU64 {
    &crate::platform::percpu::this_cpu().xstate_owner
}
/// FXSAVE's area, where the CPU has no XSAVE.
pub const FXSAVE_BYTES: u32 = 512;

/// What the switch saves, decided once at boot by the vCPU policy
/// (`common::vcpu::xstate`) and handed to [`init`].
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// The XCR0 components saved per vCPU, which guests may enable (0: FXSAVE only).
    pub mask: u64,
    /// Bytes of a vCPU's area: XSAVE's for `mask`, or [`FXSAVE_BYTES`].
    pub area_bytes: u32,
    /// The XCR0 a new vCPU starts with.
    pub reset_xcr0: u64,
}

/// [`Layout::mask`], set once at boot.
static MASK: AtomicU64 = AtomicU64::new(0);
/// [`Layout::area_bytes`].
static AREA_BYTES: AtomicU64 = AtomicU64::new(FXSAVE_BYTES as u64);
/// [`Layout::reset_xcr0`].
static RESET_XCR0: AtomicU64 = AtomicU64::new(0);

/// The components saved ([`Layout::mask`]).
#[inline]
fn saved_mask() -> u64 {
    MASK.load(Ordering::Relaxed)
}

/// Offsets in the legacy region (SDM Vol. 1 Table 10-2): FCW, MXCSR.
const FCW_OFFSET: usize = 0;
const MXCSR_OFFSET: usize = 24;
/// Where a switched-out vCPU's XCR0 is kept: bytes 464-511 of the legacy region are for
/// software, neither XSAVE nor FXSAVE writes them (SDM Vol. 1 10.5.1, 13.4.1).
const XCR0_OFFSET: usize = 464;
/// FNINIT's control word and MXCSR's reset value (SDM Vol. 1 8.1.5, 10.2.3.1).
const FCW_RESET: u16 = 0x037f;
const MXCSR_RESET: u32 = 0x1f80;

/// Sets XCR0.
///
/// # Safety
/// CR4.OSXSAVE must be set and `value` valid for this CPU (x87 set, supported bits only).
unsafe fn xsetbv(value: u64) {
    // SAFETY: per the function contract; XSETBV changes no memory.
    unsafe {
        asm!("xsetbv", in("ecx") 0u32, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nomem, nostack, preserves_flags));
    }
}

/// XCR0 now. CR4.OSXSAVE must be set (it is whenever [`Layout::mask`] is not 0).
fn xgetbv() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: XGETBV only reads XCR0 into EDX:EAX.
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") low, out("edx") high,
             options(nomem, nostack, preserves_flags));
    }
    u64::from(high) << 32 | u64::from(low)
}

/// Turns on what the switch needs on this CPU (CR0.EM and TS clear, CR4.OSFXSR and, with
/// XSAVE, CR4.OSXSAVE and XCR0 = every component in `layout.mask`), and records `layout`.
/// Called once at boot, before any vCPU exists.
pub fn init(layout: Layout) {
    MASK.store(layout.mask, Ordering::Relaxed);
    AREA_BYTES.store(layout.area_bytes.into(), Ordering::Relaxed);
    RESET_XCR0.store(layout.reset_xcr0, Ordering::Relaxed);
    enable_on_this_cpu(layout.mask);
    log::info!(
        "extended state: {} of {} bytes per vCPU, guest XCR0 up to {:#x}",
        if layout.mask != 0 { "XSAVE" } else { "FXSAVE" },
        layout.area_bytes,
        layout.mask
    );
}

/// What [`init`] did to the boot CPU's CR0, CR4 and XCR0, on another CPU (after `init`).
pub fn init_this_cpu() {
    enable_on_this_cpu(saved_mask());
}

fn enable_on_this_cpu(mask: u64) {
    // SAFETY: the hypervisor is soft-float: these bits change only what FXSAVE/XSAVE and guest
    // instructions can do, nothing the hypervisor's own code depends on.
    // `update` keeps the bits the crate does not name as they are.
    unsafe {
        Cr0::update(|cr0| {
            cr0.insert(Cr0Flags::MONITOR_COPROCESSOR);
            cr0.remove(Cr0Flags::EMULATE_COPROCESSOR | Cr0Flags::TASK_SWITCHED);
        });
        Cr4::update(|cr4| {
            cr4.insert(Cr4Flags::OSFXSR | Cr4Flags::OSXMMEXCPT_ENABLE);
            if mask != 0 {
                cr4.insert(Cr4Flags::OSXSAVE);
            }
        });
        if mask != 0 {
            xsetbv(mask);
        }
    }
}

/// One vCPU's x87/SSE/AVX registers and XCR0 while it is not on the CPU.
#[derive(Debug)]
pub struct ExtendedState {
    /// Page-aligned (XSAVE needs 64 bytes, FXSAVE 16), owned by this vCPU.
    area: u64,
}

/// The XCR0 kept in `area`.
///
/// # Safety
/// `area` is a live area.
unsafe fn saved_xcr0(area: u64) -> *mut u64 {
    (area as usize + XCR0_OFFSET) as *mut u64
}

impl ExtendedState {
    /// A vCPU's state at reset: x87 as after FNINIT, XMM and YMM zero, MXCSR 0x1f80, XCR0
    /// x87 and SSE. `None` when there is no memory for the area.
    pub fn new() -> Option<Self> {
        let bytes = AREA_BYTES.load(Ordering::Relaxed);
        let area = memory::allocate_zeroed(bytes, 0x1000)?;
        // SAFETY: a fresh zeroed area of at least 512 bytes, owned by us. An XSAVE header of
        // zeros (XSTATE_BV 0) makes XRSTOR put every component in its initial configuration;
        // FCW and MXCSR are what FXRSTOR loads, and MXCSR what XRSTOR loads (SDM Vol. 1 13.8.1).
        unsafe {
            ((area as usize + FCW_OFFSET) as *mut u16).write(FCW_RESET);
            ((area as usize + MXCSR_OFFSET) as *mut u32).write(MXCSR_RESET);
            saved_xcr0(area).write(RESET_XCR0.load(Ordering::Relaxed));
        }
        Some(ExtendedState { area })
    }

    fn is_owner(&self) -> bool {
        owner().load(Ordering::Relaxed) == self.area
    }

    /// Makes this vCPU's extended state the one in the registers: saves the previous owner's
    /// to its area and restores this one's, unless this vCPU is the owner already.
    #[inline]
    pub fn schedule_in(&mut self) {
        let owner_area = owner().load(Ordering::Relaxed);
        if owner_area == self.area {
            return;
        }
        let mask = saved_mask();
        let (low, high) = (mask as u32, (mask >> 32) as u32);
        // SAFETY: `owner_area` is the live area of the vCPU that ran last on this CPU (an area's
        // Drop clears it as owner on every CPU), this one is ours; both are page-aligned and as
        // large as the components in `mask` need (or 512 bytes for FXSAVE). XRSTOR reads only
        // what XSAVE wrote or `new` initialised. XCR0 takes valid values only: `mask` and a validated guest value.
        unsafe {
            if mask != 0 {
                let loaded = xgetbv();
                if owner_area != 0 {
                    saved_xcr0(owner_area).write(loaded);
                }
                if loaded != mask {
                    xsetbv(mask);
                }
                if owner_area != 0 {
                    asm!("xsave64 [{}]", in(reg) owner_area, in("eax") low, in("edx") high,
                         options(nostack, preserves_flags));
                }
                asm!("xrstor64 [{}]", in(reg) self.area, in("eax") low, in("edx") high,
                     options(nostack, preserves_flags));
                let xcr0 = saved_xcr0(self.area).read();
                if xcr0 != mask {
                    xsetbv(xcr0);
                }
            } else {
                if owner_area != 0 {
                    asm!("fxsave64 [{}]", in(reg) owner_area, options(nostack, preserves_flags));
                }
                asm!("fxrstor64 [{}]", in(reg) self.area, options(nostack, preserves_flags));
            }
        }
        owner().store(self.area, Ordering::Relaxed);
    }

    /// Saves this vCPU's extended state to its area if this CPU's registers hold it, and gives
    /// them up: the vCPU may next run on another CPU, which restores it from the area.
    pub fn release(&mut self) {
        if !self.is_owner() {
            return;
        }
        let mask = saved_mask();
        let (low, high) = (mask as u32, (mask >> 32) as u32);
        // SAFETY: this CPU's registers hold this vCPU's state (it is the owner); the area is
        // ours, page-aligned and large enough for `mask`. XCR0 is set to `mask`, a value this
        // CPU supports, for the XSAVE, as in `schedule_in`.
        unsafe {
            if mask != 0 {
                let loaded = xgetbv();
                saved_xcr0(self.area).write(loaded);
                if loaded != mask {
                    xsetbv(mask);
                }
                asm!("xsave64 [{}]", in(reg) self.area, in("eax") low, in("edx") high,
                     options(nostack, preserves_flags));
            } else {
                asm!("fxsave64 [{}]", in(reg) self.area, options(nostack, preserves_flags));
            }
        }
        owner().store(0, Ordering::Relaxed);
    }

    /// The guest's XCR0: in the register while this vCPU owns it (as it does while its exits
    /// are handled), in its area otherwise. 0 where the CPU has no XSAVE.
    pub fn xcr0(&self) -> u64 {
        if saved_mask() == 0 {
            return 0;
        }
        if self.is_owner() {
            return xgetbv();
        }
        // SAFETY: our own live area.
        unsafe { saved_xcr0(self.area).read() }
    }

    /// Sets the guest's XCR0 to a validated value (`common::vcpu::xstate::xsetbv_fault`).
    pub fn set_xcr0(&mut self, value: u64) {
        if saved_mask() == 0 {
            return;
        }
        if self.is_owner() {
            // SAFETY: validated against what this CPU supports; CR4.OSXSAVE is set whenever
            // a guest may enable anything (`init`).
            unsafe { xsetbv(value) };
        } else {
            // SAFETY: our own live area.
            unsafe { saved_xcr0(self.area).write(value) };
        }
    }
}

impl Drop for ExtendedState {
    fn drop(&mut self) {
        // Its registers' contents need no saving any more; the next vCPU's XRSTOR overwrites
        // them. The area is scrubbed on release.
        // It may be the owner on any CPU it ran on.
        for cpu in crate::platform::percpu::cpus() {
            let _ = cpu.xstate_owner.compare_exchange(
                self.area,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        memory::release(self.area, AREA_BYTES.load(Ordering::Relaxed));
    }
}

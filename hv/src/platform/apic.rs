//! The local APIC of this CPU in xAPIC mode (memory-mapped at 0xfee00000): the hypervisor's
//! timer (Intel SDM Vol. 3A 12.5.4) and end-of-interrupt. QEMU's TCG offers no x2APIC, so
//! the MMIO interface is the one both emulators and all hardware share.

use core::sync::atomic::{AtomicBool, Ordering};

const APIC_BASE: usize = 0xfee0_0000;
const EOI: usize = 0x0b0;
const SPURIOUS: usize = 0x0f0;
const LVT_TIMER: usize = 0x320;
const TIMER_INITIAL: usize = 0x380;
const TIMER_CURRENT: usize = 0x390;
const TIMER_DIVIDE: usize = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;

/// Vector of the hypervisor's timer interrupt.
pub const TIMER_VECTOR: u8 = 0x20;
/// Spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Set by the timer interrupt handler.
pub static TIMER_FIRED: AtomicBool = AtomicBool::new(false);

fn register(offset: usize) -> *mut u32 {
    (APIC_BASE + offset) as *mut u32
}

fn read(offset: usize) -> u32 {
    // SAFETY: the APIC page is identity-mapped uncached (see `init`) and owned by the hypervisor.
    unsafe { register(offset).read_volatile() }
}

fn write(offset: usize, value: u32) {
    // SAFETY: as in `read`.
    unsafe { register(offset).write_volatile(value) }
}

/// Maps the APIC page uncached, software-enables the APIC and starts its timer counting
/// down from the maximum (masked), ready for calibration.
pub fn init() {
    // The BIOS leaves the 8259 PICs delivering IRQ 0 (the PIT) at vector 8, where it would
    // look like a double fault: mask them all, the local APIC is the only interrupt source.
    // SAFETY: the PIC data ports belong to the hypervisor; masking has no other effect.
    unsafe {
        x86_64::instructions::port::Port::<u8>::new(0x21).write(0xff);
        x86_64::instructions::port::Port::<u8>::new(0xa1).write(0xff);
    }
    crate::platform::boot::make_uncached(APIC_BASE as u64);
    write(SPURIOUS, 0x100 | u32::from(SPURIOUS_VECTOR));
    write(TIMER_DIVIDE, 0b1011); // divide by 1
    write(LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(TIMER_INITIAL, u32::MAX);
}

/// The timer's current count.
pub fn timer_count() -> u32 {
    read(TIMER_CURRENT)
}

/// Fires the timer interrupt once after `ticks` APIC timer ticks (0: stop it).
pub fn arm_one_shot(ticks: u32) {
    write(LVT_TIMER, u32::from(TIMER_VECTOR));
    write(TIMER_INITIAL, ticks);
}

/// Signals end of interrupt.
pub fn end_of_interrupt() {
    write(EOI, 0);
}

/// Called by the interrupt stub of [`TIMER_VECTOR`].
#[unsafe(no_mangle)]
extern "C" fn hv_timer_interrupt() {
    TIMER_FIRED.store(true, Ordering::Relaxed);
    end_of_interrupt();
}

/// Returns whether the timer fired since the last call.
pub fn take_timer_fired() -> bool {
    TIMER_FIRED.swap(false, Ordering::Relaxed)
}

//! The local APIC of this CPU in xAPIC mode (memory-mapped at 0xfee00000): the hypervisor's
//! timer (Intel SDM Vol. 3A 12.5.4), end-of-interrupt and inter-processor interrupts (12.6).
//! QEMU's TCG offers no x2APIC, so the MMIO interface is the one both emulators and all
//! hardware share. Every CPU sees its own APIC at the same address.
//!
//! Vectors: 0x20 the timer, 0xf0 the kick (an IPI whose only effect is the interrupt: a CPU
//! running a guest takes a VM exit), 0xf1 stop (the CPU halts for good), 0xff spurious.

use core::sync::atomic::Ordering;

const APIC_BASE: usize = 0xfee0_0000;
const EOI: usize = 0x0b0;
/// Where the EOI register is, for the interrupt stubs.
pub const EOI_ADDRESS: usize = APIC_BASE + EOI;
const ICR_LOW: usize = 0x300;
const ICR_HIGH: usize = 0x310;
/// ICR: delivery status, "send pending" (SDM Vol. 3A Figure 12-12).
const ICR_SEND_PENDING: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_DELIVERY_INIT: u32 = 0b101 << 8;
const ICR_DELIVERY_STARTUP: u32 = 0b110 << 8;
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
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
/// The kick IPI: its handler only signals EOI.
pub const KICK_VECTOR: u8 = 0xf0;
/// The stop IPI: its handler halts the CPU with interrupts off.
pub const STOP_VECTOR: u8 = 0xf1;

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
    init_this_cpu();
    write(TIMER_INITIAL, u32::MAX);
}

/// Software-enables this CPU's APIC with the hypervisor's spurious vector, and sets its timer
/// up (divide by 1, masked, stopped). The boot CPU's [`init`] mapped the page uncached.
pub fn init_this_cpu() {
    write(SPURIOUS, 0x100 | u32::from(SPURIOUS_VECTOR));
    write(TIMER_DIVIDE, 0b1011); // divide by 1
    write(LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(TIMER_INITIAL, 0);
}

/// Writes the ICR: destination (xAPIC: 8-bit physical APIC id), then the command, which sends.
fn send(destination: u8, command: u32) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        while read(ICR_LOW) & ICR_SEND_PENDING != 0 {
            core::hint::spin_loop();
        }
        write(ICR_HIGH, u32::from(destination) << 24);
        write(ICR_LOW, command);
    });
}

/// Sends fixed interrupt `vector` to the CPU whose APIC id is `apic_id`.
pub fn send_ipi(apic_id: u8, vector: u8) {
    send(apic_id, u32::from(vector));
}

/// Sends fixed interrupt `vector` to every CPU but this one.
pub fn send_ipi_all_but_self(vector: u8) {
    send(0, ICR_ALL_BUT_SELF | u32::from(vector));
}

/// Sends INIT (assert) to `apic_id`: the CPU resets and waits for a STARTUP IPI.
pub fn send_init(apic_id: u8) {
    send(apic_id, ICR_DELIVERY_INIT | ICR_LEVEL_ASSERT);
}

/// Sends a STARTUP IPI: the CPU starts in real mode at `page` << 12 (SDM Vol. 3A 9.4.4).
pub fn send_startup(apic_id: u8, page: u8) {
    send(
        apic_id,
        ICR_DELIVERY_STARTUP | ICR_LEVEL_ASSERT | u32::from(page),
    );
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
    super::percpu::this_cpu()
        .timer_fired
        .store(true, Ordering::Relaxed);
    end_of_interrupt();
}

/// Returns whether this CPU's timer fired since the last call.
pub fn take_timer_fired() -> bool {
    super::percpu::this_cpu()
        .timer_fired
        .swap(false, Ordering::Relaxed)
}

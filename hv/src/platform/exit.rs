//! Ending the run: tells the emulator the outcome and stops the machine.
//!
//! QEMU's `isa-debug-exit` device (port 0xf4) exits with `(value << 1) | 1`; Bochs exits on
//! "Shutdown" written to port 0x8900. On real hardware neither port exists and the CPU halts.

use x86_64::instructions::port::Port;

/// Ends the machine; `success` picks the QEMU status (1 for success, 3 for failure).
pub fn end_machine(success: bool) -> ! {
    // The other CPUs stop where they are (halted, interrupts off), on hardware too.
    super::smp::stop_other_cpus();
    // Emulators stop at once: let the last line reach the log first.
    // SAFETY: nothing else runs any more; the lock may be held by an interrupted printer.
    unsafe { super::serial::SERIAL.force_unlock() };
    super::serial::SERIAL.lock().drain();
    // SAFETY: these ports belong to emulator debug devices; writing them has no other effect.
    unsafe {
        Port::<u32>::new(0xf4).write(if success { 0 } else { 1 });
        let mut bochs = Port::<u8>::new(0x8900);
        for byte in b"Shutdown" {
            bochs.write(*byte);
        }
    }
    halt_forever()
}

/// Halts this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

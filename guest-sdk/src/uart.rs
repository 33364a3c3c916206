//! The trapping console path: bytes to the emulated 16550 UART at COM1 (docs/abi.md 7.1).
//!
//! This is how an unported kernel prints: every byte written to the transmit holding register
//! costs one exit, where the console hypercall carries a whole line for one. The writer polls
//! the line status register (LSR) bit 5, "transmit holding register empty", before each byte,
//! as a driver for a real 16550 must; Lamina's UART is always ready to send (bit 5 always
//! set). Bytes go out as given (no `\n` to `\r\n` translation): the hypervisor splits the
//! console into lines at `\n`, apart from the lines of the console hypercall and ring.

use core::fmt;

use crate::port::{inb, outb};

/// COM1's base port: the transmit holding register (THR) on write.
pub const COM1: u16 = 0x3f8;
/// Line status register offset.
pub const LSR_OFFSET: u16 = 5;
/// LSR bit 5: the transmit holding register is empty, a byte may be written.
pub const LSR_THR_EMPTY: u8 = 1 << 5;
/// LSR bit 6: the transmitter is idle (holding and shift registers empty).
pub const LSR_TRANSMITTER_IDLE: u8 = 1 << 6;

/// How often to read LSR before writing anyway (a UART that never drains must not hang us).
const POLL_LIMIT: u32 = 100_000;

/// Reads COM1's line status register.
pub fn line_status() -> u8 {
    // SAFETY: COM1 is the domain's emulated UART (or a real 16550); reading LSR has no side
    // effect beyond clearing error bits we do not use. The SDK runs at CPL 0.
    unsafe { inb(COM1 + LSR_OFFSET) }
}

/// Writes one byte to COM1 once the transmit holding register is empty.
pub fn write_byte(byte: u8) {
    for _ in 0..POLL_LIMIT {
        if line_status() & LSR_THR_EMPTY != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    // SAFETY: writing THR transmits one byte; the SDK runs at CPL 0.
    unsafe { outb(COM1, byte) };
}

/// Writes `bytes` to COM1, one byte (one exit) at a time.
pub fn write_bytes(bytes: &[u8]) {
    bytes.iter().copied().for_each(write_byte);
}

/// Writes `text` to COM1.
pub fn write_str(text: &str) {
    write_bytes(text.as_bytes());
}

/// A [`fmt::Write`] sink for COM1, for `write!(Uart, ...)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Uart;

impl fmt::Write for Uart {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        write_str(text);
        Ok(())
    }
}

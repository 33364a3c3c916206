//! The 16550 UART a guest sees at COM1 (I/O ports 0x3f8-0x3ff): enough for a polling driver
//! to print (every byte written to THR costs one exit: the trapping path that the console
//! hypercall replaces). No receive path, no interrupts.

/// First I/O port of the emulated UART.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports it decodes.
pub const COM1_PORTS: u16 = 8;

const LSR_THR_EMPTY: u8 = 1 << 5;
const LSR_TRANSMITTER_EMPTY: u8 = 1 << 6;
const LCR_DLAB: u8 = 1 << 7;

/// Register state of one emulated 16550.
#[derive(Debug, Default)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scratch: u8,
    divisor: u16,
}

impl Uart16550 {
    /// A guest reads register `offset` (0-7).
    pub fn read(&self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.divisor as u8,
            1 if dlab => (self.divisor >> 8) as u8,
            0 => 0, // receive buffer: nothing ever arrives
            1 => self.ier,
            2 => 0xc1, // IIR: FIFOs enabled, no interrupt pending
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY,
            6 => 0xb0, // MSR: CTS, DSR, DCD
            _ => self.scratch,
        }
    }

    /// A guest writes register `offset`; returns the byte transmitted, if any.
    pub fn write(&mut self, offset: u16, value: u8) -> Option<u8> {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(value),
            1 if dlab => self.divisor = (self.divisor & 0x00ff) | (u16::from(value) << 8),
            0 => return Some(value),
            1 => self.ier = value & 0x0f,
            3 => self.lcr = value,
            4 => self.mcr = value & 0x1f,
            7 => self.scratch = value,
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_polling_driver_sees_an_idle_transmitter_and_its_bytes_go_out() {
        let mut uart = Uart16550::default();
        assert_eq!(uart.read(5) & LSR_THR_EMPTY, LSR_THR_EMPTY);
        assert_eq!(uart.write(0, b'x'), Some(b'x'));
    }

    #[test]
    fn divisor_latch_writes_do_not_transmit() {
        let mut uart = Uart16550::default();
        uart.write(3, 0x80);
        assert_eq!(uart.write(0, 0x01), None);
        assert_eq!(uart.read(0), 0x01);
        uart.write(3, 0x03);
        assert_eq!(uart.read(3), 0x03);
        assert_eq!(uart.write(7, 0x5a), None);
        assert_eq!(uart.read(7), 0x5a);
    }
}

//! The 16550A UART a guest sees at COM1 (I/O ports 0x3f8-0x3ff), after the National
//! Semiconductor PC16550D data sheet: enough for a polling driver to print (every byte written
//! to THR costs one exit: the trapping path that the console hypercall replaces) and for the
//! probes drivers run first to pass. It always has room to send, never receives from outside
//! and raises no interrupts; loopback (MCR bit 4) works as on the chip: a byte written to THR
//! comes back in RBR instead of going out, and MSR's lines follow MCR's outputs (docs/abi.md
//! 7.1).

/// First I/O port of the emulated UART.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports it decodes.
pub const COM1_PORTS: u16 = 8;

const LSR_DATA_READY: u8 = 1 << 0;
const LSR_OVERRUN: u8 = 1 << 1;
const LSR_THR_EMPTY: u8 = 1 << 5;
const LSR_TRANSMITTER_EMPTY: u8 = 1 << 6;
const LCR_DLAB: u8 = 1 << 7;
const MCR_DTR: u8 = 1 << 0;
const MCR_RTS: u8 = 1 << 1;
const MCR_OUT1: u8 = 1 << 2;
const MCR_OUT2: u8 = 1 << 3;
const MCR_LOOP: u8 = 1 << 4;
const MSR_DCTS: u8 = 1 << 0;
const MSR_DDSR: u8 = 1 << 1;
const MSR_TERI: u8 = 1 << 2;
const MSR_DDCD: u8 = 1 << 3;
const MSR_CTS: u8 = 1 << 4;
const MSR_DSR: u8 = 1 << 5;
const MSR_RI: u8 = 1 << 6;
const MSR_DCD: u8 = 1 << 7;
/// The modem lines outside loopback: a terminal is attached and ready (CTS, DSR, DCD).
const MSR_LINES_ATTACHED: u8 = MSR_CTS | MSR_DSR | MSR_DCD;
const FCR_ENABLE: u8 = 1 << 0;
const FCR_CLEAR_RX: u8 = 1 << 1;
/// IIR: no interrupt pending.
const IIR_NONE_PENDING: u8 = 0x01;
/// IIR bits 7:6 when the FIFOs are enabled (16550A).
const IIR_FIFOS_ENABLED: u8 = 0xc0;
/// Depth of the receive FIFO (16 bytes on a 16550A; 1 with FIFOs off, as on a 16450).
const RX_FIFO_BYTES: usize = 16;

/// Register state of one emulated 16550A.
#[derive(Debug)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scratch: u8,
    divisor: u16,
    fifos_enabled: bool,
    /// Delta bits of MSR (3:0), set when a modem line changes and cleared when MSR is read.
    msr_deltas: u8,
    /// Overrun: a looped-back byte found the receive buffer full. Cleared when LSR is read.
    overrun: bool,
    /// Bytes looped back and not yet read from RBR, oldest first.
    rx: [u8; RX_FIFO_BYTES],
    rx_len: usize,
}

impl Default for Uart16550 {
    /// The state after a master reset (PC16550D table IV), as a BIOS leaves it apart from
    /// the divisor.
    fn default() -> Self {
        Uart16550 {
            ier: 0,
            lcr: 0,
            mcr: 0,
            scratch: 0,
            divisor: 0,
            fifos_enabled: false,
            msr_deltas: 0,
            overrun: false,
            rx: [0; RX_FIFO_BYTES],
            rx_len: 0,
        }
    }
}

impl Uart16550 {
    /// A guest reads register `offset` (0-7). Reads of RBR, LSR and MSR have the side effects
    /// they have on the chip (pop the byte, clear overrun, clear the deltas).
    pub fn read(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.divisor as u8,
            1 if dlab => (self.divisor >> 8) as u8,
            0 => self.pop_received(),
            1 => self.ier,
            2 if self.fifos_enabled => IIR_FIFOS_ENABLED | IIR_NONE_PENDING,
            2 => IIR_NONE_PENDING,
            3 => self.lcr,
            4 => self.mcr,
            5 => {
                let mut lsr = LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY;
                if self.rx_len != 0 {
                    lsr |= LSR_DATA_READY;
                }
                if core::mem::take(&mut self.overrun) {
                    lsr |= LSR_OVERRUN;
                }
                lsr
            }
            6 => self.modem_lines() | core::mem::take(&mut self.msr_deltas),
            _ => self.scratch,
        }
    }

    /// A guest writes register `offset`; returns the byte transmitted, if any (none in
    /// loopback, where the byte is received instead).
    pub fn write(&mut self, offset: u16, value: u8) -> Option<u8> {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(value),
            1 if dlab => self.divisor = (self.divisor & 0x00ff) | (u16::from(value) << 8),
            0 if self.mcr & MCR_LOOP != 0 => self.receive(value),
            0 => return Some(value),
            1 => self.ier = value & 0x0f,
            2 => self.write_fcr(value),
            3 => self.lcr = value,
            4 => self.write_mcr(value & 0x1f),
            7 => self.scratch = value,
            _ => {} // LSR and MSR are read-only (writing them is for factory tests)
        }
        None
    }

    /// The modem status lines (MSR 7:4): in loopback, DTR->DSR, RTS->CTS, OUT1->RI and
    /// OUT2->DCD (PC16550D, MCR bit 4); otherwise an attached, ready terminal.
    fn modem_lines(&self) -> u8 {
        if self.mcr & MCR_LOOP == 0 {
            return MSR_LINES_ATTACHED;
        }
        let mut lines = 0;
        for (output, line) in [
            (MCR_DTR, MSR_DSR),
            (MCR_RTS, MSR_CTS),
            (MCR_OUT1, MSR_RI),
            (MCR_OUT2, MSR_DCD),
        ] {
            if self.mcr & output != 0 {
                lines |= line;
            }
        }
        lines
    }

    fn write_mcr(&mut self, mcr: u8) {
        let before = self.modem_lines();
        self.mcr = mcr;
        let after = self.modem_lines();
        let changed = before ^ after;
        for (line, delta) in [
            (MSR_CTS, MSR_DCTS),
            (MSR_DSR, MSR_DDSR),
            (MSR_DCD, MSR_DDCD),
        ] {
            if changed & line != 0 {
                self.msr_deltas |= delta;
            }
        }
        // TERI: the trailing edge of RI only.
        if before & MSR_RI != 0 && after & MSR_RI == 0 {
            self.msr_deltas |= MSR_TERI;
        }
    }

    fn write_fcr(&mut self, fcr: u8) {
        let enable = fcr & FCR_ENABLE != 0;
        // Changing the FIFO enable clears the FIFOs (PC16550D, FCR bit 0).
        if enable != self.fifos_enabled || fcr & FCR_CLEAR_RX != 0 {
            self.rx_len = 0;
        }
        self.fifos_enabled = enable;
        // Clearing the transmit FIFO (bit 2) has nothing to do: bytes leave at once.
    }

    fn receive(&mut self, byte: u8) {
        let depth = if self.fifos_enabled { RX_FIFO_BYTES } else { 1 };
        if self.rx_len < depth {
            self.rx[self.rx_len] = byte;
            self.rx_len += 1;
        } else if self.fifos_enabled {
            // A full FIFO keeps its bytes; the new one is lost.
            self.overrun = true;
        } else {
            // Without FIFOs the receive buffer is overwritten.
            self.rx[0] = byte;
            self.overrun = true;
        }
    }

    fn pop_received(&mut self) -> u8 {
        if self.rx_len == 0 {
            return 0;
        }
        let byte = self.rx[0];
        self.rx.copy_within(1..self.rx_len, 0);
        self.rx_len -= 1;
        byte
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THR: u16 = 0;
    const IER: u16 = 1;
    const FCR_IIR: u16 = 2;
    const LCR: u16 = 3;
    const MCR: u16 = 4;
    const LSR: u16 = 5;
    const MSR: u16 = 6;
    const SCR: u16 = 7;

    #[test]
    fn a_polling_driver_sees_an_idle_transmitter_and_its_bytes_go_out() {
        let mut uart = Uart16550::default();
        assert_eq!(uart.read(LSR), 0x60);
        assert_eq!(uart.write(THR, b'x'), Some(b'x'));
        assert_eq!(uart.read(LSR), 0x60, "nothing is received outside loopback");
        assert_eq!(uart.read(THR), 0);
        assert_eq!(uart.read(MSR), 0xb0, "CTS, DSR, DCD, no deltas");
    }

    #[test]
    fn divisor_latch_writes_do_not_transmit() {
        let mut uart = Uart16550::default();
        uart.write(LCR, 0x80);
        assert_eq!(uart.write(THR, 0x01), None);
        assert_eq!(uart.read(0), 0x01);
        uart.write(LCR, 0x03);
        assert_eq!(uart.read(LCR), 0x03);
        assert_eq!(uart.write(SCR, 0x5a), None);
        assert_eq!(uart.read(SCR), 0x5a);
    }

    #[test]
    fn in_loopback_a_written_byte_comes_back_and_is_not_transmitted() {
        let mut uart = Uart16550::default();
        uart.write(MCR, MCR_LOOP);
        assert_eq!(uart.write(THR, 0xae), None, "not printed");
        assert_eq!(uart.read(LSR), 0x61, "data ready, transmitter empty");
        assert_eq!(uart.read(THR), 0xae);
        assert_eq!(uart.read(LSR), 0x60, "read, so no data ready");
        uart.write(MCR, 0x0f);
        assert_eq!(
            uart.write(THR, b'x'),
            Some(b'x'),
            "out of loopback it prints"
        );
        assert_eq!(uart.read(LSR), 0x60);
    }

    #[test]
    fn in_loopback_msr_follows_the_modem_outputs() {
        let mut uart = Uart16550::default();
        uart.read(MSR);
        // Linux 8250 autoconfig: MCR = LOOP | OUT2 | RTS, expects MSR & 0xf0 == DCD | CTS.
        uart.write(MCR, 0x1a);
        assert_eq!(uart.read(MSR) & 0xf0, 0x90);
        uart.write(MCR, MCR_LOOP | MCR_DTR | MCR_OUT1);
        assert_eq!(uart.read(MSR) & 0xf0, MSR_DSR | MSR_RI);
        uart.write(MCR, MCR_LOOP);
        assert_eq!(
            uart.read(MSR),
            MSR_DDSR | MSR_TERI,
            "DSR fell, RI's trailing edge"
        );
        assert_eq!(uart.read(MSR), 0, "deltas clear on read");
        uart.write(MCR, 0x0b);
        assert_eq!(uart.read(MSR), 0xb0 | MSR_DCTS | MSR_DDSR | MSR_DDCD);
        assert_eq!(uart.read(MSR), 0xb0, "back to an attached terminal");
    }

    #[test]
    fn the_receive_fifo_holds_sixteen_bytes_and_reports_overrun() {
        let mut uart = Uart16550::default();
        uart.write(FCR_IIR, 0xc7);
        assert_eq!(
            uart.read(FCR_IIR),
            0xc1,
            "16550A with FIFOs, nothing pending"
        );
        uart.write(MCR, MCR_LOOP);
        for byte in b"hello world!1337" {
            uart.write(THR, *byte);
        }
        uart.write(THR, b'X');
        assert_eq!(uart.read(LSR), 0x63, "data ready and overrun");
        assert_eq!(uart.read(LSR), 0x61, "overrun clears on read");
        let mut back = Vec::new();
        while uart.read(LSR) & LSR_DATA_READY != 0 {
            back.push(uart.read(THR));
        }
        assert_eq!(back, b"hello world!1337");
    }

    #[test]
    fn without_fifos_the_receive_buffer_holds_one_byte_and_fcr_clears_it() {
        let mut uart = Uart16550::default();
        assert_eq!(uart.read(FCR_IIR), 0x01, "FIFOs off at reset");
        uart.write(MCR, MCR_LOOP);
        uart.write(THR, 1);
        uart.write(THR, 2);
        assert_eq!(uart.read(LSR), 0x63);
        assert_eq!(uart.read(THR), 2, "the newer byte overwrote the older");
        uart.write(FCR_IIR, 0x01);
        uart.write(THR, 3);
        uart.write(FCR_IIR, 0x03);
        assert_eq!(uart.read(LSR), 0x60, "FCR bit 1 cleared the receive FIFO");
    }

    #[test]
    fn linux_8250_autoconfig_finds_a_16550a() {
        // drivers/tty/serial/8250/8250_port.c, autoconfig(): the IER test, the loopback
        // test, then the FIFO probe.
        let mut uart = Uart16550::default();
        let saved_ier = uart.read(IER);
        uart.write(IER, 0);
        let scratch2 = uart.read(IER) & 0x0f;
        uart.write(IER, 0x0f);
        let scratch3 = uart.read(IER) & 0x0f;
        uart.write(IER, saved_ier);
        assert_eq!((scratch2, scratch3), (0, 0x0f));
        let save_mcr = uart.read(MCR);
        uart.write(MCR, MCR_LOOP | 0x0a);
        let status1 = uart.read(MSR) & 0xf0;
        uart.write(MCR, save_mcr);
        assert_eq!(status1, 0x90);
        uart.write(LCR, 0xbf);
        uart.write(FCR_IIR, 0); // EFR on a 16650, FCR here
        uart.write(LCR, 0);
        uart.write(FCR_IIR, FCR_ENABLE);
        assert_eq!(uart.read(FCR_IIR) >> 6, 3, "16550A");
    }
}

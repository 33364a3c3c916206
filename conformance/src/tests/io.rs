//! Tests of the trapping I/O path (docs/abi.md 7.1 and 7.4): the emulated UART and ports
//! nothing emulates.

use lamina_guest_sdk::port::{inb, inl, inw, outb, outl, outw};
use lamina_guest_sdk::uart;

use crate::framework::{Hex, Status, check, check_eq};

conformance_test! {
    title: "the emulated UART reports an empty transmitter and takes a line",
    section: "7.1 Emulated UART",
    expect: Success,
}
pub(super) fn uart_output_reaches_console() {
    let expected = uart::LSR_THR_EMPTY | uart::LSR_TRANSMITTER_IDLE;
    check_eq!(
        "COM1 LSR before writing",
        Hex(expected),
        Hex(uart::line_status())
    );
    uart::write_str("uart_output_reaches_console: this line went through the trapped UART\n");
    check_eq!(
        "COM1 LSR after writing",
        Hex(expected),
        Hex(uart::line_status())
    );
}

/// A port in a range the PC leaves unassigned (0x2f0-0x2f7, below COM2).
const UNUSED_PORT: u16 = 0x2f0;

conformance_test! {
    title: "reads from a port nothing emulates return all ones, writes are dropped",
    section: "7.4 I/O ports",
    expect: Success,
}
pub(super) fn unemulated_port_reads_all_ones() {
    // SAFETY: nothing is at this port, on a PC or in a Lamina domain.
    let (byte, word, dword) = unsafe { (inb(UNUSED_PORT), inw(UNUSED_PORT), inl(UNUSED_PORT)) };
    check_eq!(
        format_args!("8-bit read of port {UNUSED_PORT:#x}"),
        Hex(0xff),
        Hex(byte)
    );
    check_eq!(
        format_args!("16-bit read of port {UNUSED_PORT:#x}"),
        Hex(0xffff),
        Hex(word)
    );
    check_eq!(
        format_args!("32-bit read of port {UNUSED_PORT:#x}"),
        Hex(0xffff_ffff),
        Hex(dword)
    );

    // Writes are dropped: nothing reads back.
    // SAFETY: as above.
    let after_writes = unsafe {
        outb(UNUSED_PORT, 0x12);
        outw(UNUSED_PORT, 0x3456);
        outl(UNUSED_PORT, 0x789a_bcde);
        inl(UNUSED_PORT)
    };
    check_eq!(
        format_args!("32-bit read of port {UNUSED_PORT:#x} after writes"),
        Hex(0xffff_ffff),
        Hex(after_writes)
    );

    // Ports where the machine under the hypervisor has devices, which a domain must not reach.
    // SAFETY: reading these has no side effect on QEMU or Bochs devices, should the
    // hypervisor (wrongly) let the reads through: the PCI address latch and fw_cfg data.
    let (pci_address, fw_cfg_data) = unsafe { (inl(0xcf8), inb(0x511)) };
    check_eq!(
        "32-bit read of port 0xcf8 (PCI configuration address)",
        Hex(0xffff_ffff),
        Hex(pci_address)
    );
    check_eq!(
        "8-bit read of port 0x511 (QEMU fw_cfg data)",
        Hex(0xff),
        Hex(fw_cfg_data)
    );
}

/// COM1's registers, by offset from its base (PC16550D).
mod com1 {
    pub(super) const DATA: u16 = 0; // RBR on read, THR on write, DLL with DLAB
    pub(super) const IER: u16 = 1; // DLM with DLAB
    pub(super) const FCR_IIR: u16 = 2;
    pub(super) const LCR: u16 = 3;
    pub(super) const MCR: u16 = 4;
    pub(super) const LSR: u16 = 5;
    pub(super) const MSR: u16 = 6;
    pub(super) const SCR: u16 = 7;

    pub(super) const LSR_DATA_READY: u8 = 1 << 0;
    pub(super) const LSR_THR_EMPTY: u8 = 1 << 5;
    pub(super) const LSR_TRANSMITTER_EMPTY: u8 = 1 << 6;
    pub(super) const MCR_LOOP: u8 = 1 << 4;
    pub(super) const MSR_CTS: u8 = 1 << 4;
    pub(super) const MSR_DSR: u8 = 1 << 5;

    pub(super) fn read(offset: u16) -> u8 {
        // SAFETY: COM1 is the domain's emulated UART; the test runs at CPL 0.
        unsafe { super::inb(super::uart::COM1 + offset) }
    }

    pub(super) fn write(offset: u16, value: u8) {
        // SAFETY: as above.
        unsafe { super::outb(super::uart::COM1 + offset, value) }
    }
}

/// Where the crate spins forever, the test gives up after this many reads.
const SPIN_LIMIT: u32 = 10_000;

/// Reads LSR until `bits` are all set; false if they never are.
fn wait_for_lsr(bits: u8) -> bool {
    (0..SPIN_LIMIT).any(|_| com1::read(com1::LSR) & bits == bits)
}

conformance_test! {
    title: "the uart_16550 crate's init (0.3) and init, loopback self-test and connection check (0.5) pass, and only their lines are printed",
    section: "7.1 Emulated UART",
    expect: Success,
    output: &["uart_16550 0.3: init() done, this line went out through THR", "uart_16550 0.5: init, test_loopback and check_connected passed"],
    only_output: true,
}
/// `uart_16550` 0.2 and 0.3 (`SerialPort::init`, the version the "Writing an OS in Rust"
/// tutorial uses), then 0.5 (`Uart16550::init(Config::default())`, `test_loopback`,
/// `check_connected`, as `Uart16550Tty::new_port` runs them), register access for register
/// access; each then prints a line the way the crate sends. The catalog has xtask check that
/// these lines, and no stray looped-back byte, reach the console.
pub(super) fn uart_16550_crate_sequences() {
    use com1::*;

    // 0.2.x/0.3.x SerialPort::init(): 38400 8N1, FIFOs, DTR|RTS|OUT2, receive interrupt.
    write(IER, 0x00);
    write(LCR, 0x80);
    write(DATA, 0x03);
    write(IER, 0x00);
    write(LCR, 0x03);
    write(FCR_IIR, 0xc7);
    write(MCR, 0x0b);
    write(IER, 0x01);
    check_eq!("IIR after FCR 0xc7", Hex(0xc1), Hex(read(FCR_IIR)));
    check_eq!("MSR after init", Hex(0xb0), Hex(read(MSR) & 0xf0));
    // send(): wait for LSR OUTPUT_EMPTY, write THR.
    for &byte in b"uart_16550 0.3: init() done, this line went out through THR\n" {
        if !check!(wait_for_lsr(LSR_THR_EMPTY), "LSR never reported THR empty") {
            return;
        }
        write(DATA, byte);
    }

    // 0.5 init(Config::default()): scratch-pad probe, 9600 8N1, FIFOs at 14, DTR|RTS|OUT2,
    // IER = data ready, then wait for the transmitter to be empty.
    for probe in [0x42, 0x73] {
        write(SCR, probe);
        check_eq!("scratch register read back", Hex(probe), Hex(read(SCR)));
    }
    write(IER, 0);
    write(LCR, 0x80);
    write(DATA, 12); // DLL: 115200 / 9600
    write(IER, 0); // DLM
    write(LCR, 0);
    write(LCR, 0x03);
    write(FCR_IIR, 0xc7);
    write(MCR, 0x0b);
    write(IER, 0x01);
    check!(
        wait_for_lsr(LSR_TRANSMITTER_EMPTY),
        "LSR never reported the transmitter empty"
    );

    // test_loopback(): loopback alone, FIFOs reset, drain, one byte, then a whole FIFO.
    let old_mcr = read(MCR);
    check_eq!("MCR read back", Hex(0x0b), Hex(old_mcr));
    write(MCR, MCR_LOOP);
    write(FCR_IIR, 0xc7);
    let mut drained = 0;
    while read(LSR) & LSR_DATA_READY != 0 && drained < SPIN_LIMIT {
        read(DATA);
        drained += 1;
    }
    check_eq!("bytes waiting after the FIFO reset", 0, drained);
    check!(
        read(LSR) & LSR_THR_EMPTY != 0,
        "LSR: THR not empty in loopback"
    );
    write(DATA, 0x42);
    if !check!(
        wait_for_lsr(LSR_DATA_READY),
        "the byte written in loopback never came back (LSR data ready stays clear)"
    ) {
        return;
    }
    check_eq!("byte looped back", Hex(0x42), Hex(read(DATA)));
    const MESSAGE: &[u8; 16] = b"hello world!1337";
    for &byte in MESSAGE {
        write(DATA, byte);
    }
    let mut back = [0u8; 16];
    for slot in back.iter_mut() {
        if !check!(
            wait_for_lsr(LSR_DATA_READY),
            "a byte of the 16 written in loopback never came back"
        ) {
            return;
        }
        *slot = read(DATA);
    }
    check_eq!(
        "the 16-byte message looped back",
        core::str::from_utf8(MESSAGE).ok(),
        core::str::from_utf8(&back).ok()
    );
    check_eq!(
        "LSR once everything was read",
        Hex(LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY),
        Hex(read(LSR))
    );
    write(MCR, old_mcr);

    // check_connected(): DSR and CTS from the other end.
    let msr = read(MSR);
    check_eq!(
        "MSR DSR and CTS after loopback",
        Hex(MSR_DSR | MSR_CTS),
        Hex(msr & (MSR_DSR | MSR_CTS))
    );
    // send_bytes(): THR empty and (out of loopback) CTS, then up to 16 bytes at once.
    for chunk in b"uart_16550 0.5: init, test_loopback and check_connected passed\n".chunks(16) {
        let ready = wait_for_lsr(LSR_THR_EMPTY) && read(MSR) & MSR_CTS != 0;
        if !check!(
            ready,
            "not ready to send: LSR {:#x} MSR {:#x}",
            read(LSR),
            read(MSR)
        ) {
            return;
        }
        for &byte in chunk {
            write(DATA, byte);
        }
    }
}

conformance_test! {
    title: "Linux's 8250 probe finds a 16550A: IER test, loopback MSR 0x90, FIFOs in IIR",
    section: "7.1 Emulated UART",
    expect: Success,
    output: &["uart_linux_8250_probe: probed as a 16550A, printing works"],
    only_output: true,
}
/// The probe of Linux's 8250 driver (drivers/tty/serial/8250/8250_port.c, `autoconfig`):
/// the IER test, the loopback test that wants MSR & 0xf0 == 0x90 with MCR = LOOP|OUT2|RTS,
/// and the FIFO probe through IIR, which must find a 16550A.
pub(super) fn uart_linux_8250_probe() {
    use com1::*;

    let saved_ier = read(IER);
    write(IER, 0);
    let scratch2 = read(IER) & 0x0f;
    write(IER, 0x0f);
    let scratch3 = read(IER) & 0x0f;
    write(IER, saved_ier);
    check_eq!(
        "IER test (after 0, after 0x0f)",
        (0, 0x0f),
        (scratch2, scratch3)
    );

    let save_mcr = read(MCR);
    let save_lcr = read(LCR);
    write(MCR, MCR_LOOP | 0x0a);
    let status1 = read(MSR) & 0xf0;
    write(MCR, save_mcr);
    check_eq!(
        "MSR & 0xf0 in loopback with OUT2 and RTS",
        Hex(0x90),
        Hex(status1)
    );

    write(LCR, 0xbf);
    write(FCR_IIR, 0); // EFR on a 16650; FCR on a 16550A
    write(LCR, 0);
    write(FCR_IIR, 0x01);
    check_eq!(
        "IIR >> 6 with FIFOs enabled (3: 16550A)",
        3,
        read(FCR_IIR) >> 6
    );
    write(LCR, save_lcr);
    write(MCR, save_mcr);
    // serial8250_clear_fifos, then the driver prints through THR as any other.
    write(FCR_IIR, 0x01);
    write(FCR_IIR, 0x07);
    write(FCR_IIR, 0);
    uart::write_str("uart_linux_8250_probe: probed as a 16550A, printing works\n");
}

conformance_test! {
    title: "half a UART line, a console_io line, the UART line's end: two whole lines",
    section: "7.1 Emulated UART",
    expect: Success,
    output: &["console_sources_own_lines: the UART's line, begun and ended after it", "console_sources_own_lines: a whole line through console_io"],
    only_output: true,
}
/// Half a line through the UART, a whole line through `console_io`, the rest of the first
/// line through the UART: the console prints two whole lines (xtask checks them).
pub(super) fn console_sources_own_lines() {
    uart::write_str("console_sources_own_lines: the UART's line, begun ");
    let line = b"console_sources_own_lines: a whole line through console_io\n";
    check_eq!(
        "console_io write",
        Status(line.len() as u64),
        crate::hv::console_write(line)
    );
    uart::write_str("and ended after it\n");
}

conformance_test! {
    title: "a 300-byte console_io line comes out as two lines broken between words",
    section: "7.1 Emulated UART",
    expect: Success,
    output: &["word00 word01 word02 word03 word04 word05 word06 word07 word08 word09 word10 word11 word12 word13 word14 word15 word16 word17 word18 word19 word20 word21 word22 word23 word24 word25 word26 word27 word28 word29 word30 word31 word32 word33 word34 word35", "word36 word37 word38 word39 word40 word41 word42"],
    only_output: true,
}
/// One `console_io` line of 300 bytes, 43 six-letter words: the console wraps it after the
/// last space before 256 bytes (xtask checks the two lines, word36 starting the second).
pub(super) fn console_long_line_wraps() {
    let mut line = [0u8; 301];
    for (i, word) in line[..300].chunks_mut(7).enumerate() {
        let text = [
            b'w',
            b'o',
            b'r',
            b'd',
            b'0' + (i / 10) as u8,
            b'0' + (i % 10) as u8,
            b' ',
        ];
        word.copy_from_slice(&text[..word.len()]);
    }
    line[300] = b'\n';
    check_eq!(
        "console_io write of 301 bytes",
        Status(301),
        crate::hv::console_write(&line)
    );
}

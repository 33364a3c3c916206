//! Tests of the trapping I/O path (docs/abi.md 7.1 and 7.4): the emulated UART and ports
//! nothing emulates.

use lamina_guest_sdk::port::{inb, inl, inw, outb, outl, outw};
use lamina_guest_sdk::uart;

use crate::framework::{Hex, check_eq};

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

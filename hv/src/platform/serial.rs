//! The hypervisor's own console: COM1 (I/O port 0x3f8), polled, 115200 8N1, and the `log`
//! backend that writes `[hv] LEVEL message` lines to it.
//!
//! The emulated UART that guests see is a different thing (`common::uart`); this is the real
//! (emulator's) UART, used only by the hypervisor.

use core::fmt::{self, Write};
use spin::Mutex;
use x86_64::instructions::port::Port;

const COM1: u16 = 0x3f8;
const LINE_STATUS_THR_EMPTY: u8 = 1 << 5;
const LINE_STATUS_TRANSMITTER_EMPTY: u8 = 1 << 6;

/// The hypervisor's serial port. Lock it to write; `log` and the guest consoles share it.
pub static SERIAL: Mutex<SerialPort> = Mutex::new(SerialPort { base: COM1 });

/// A polled 16550 transmitter.
pub struct SerialPort {
    base: u16,
}

impl SerialPort {
    /// Programs 115200 baud, 8N1, FIFOs on, interrupts off.
    pub fn init(&mut self) {
        let writes: [(u16, u8); 6] = [
            (1, 0x00), // IER: no interrupts
            (3, 0x80), // LCR: DLAB on
            (0, 0x01), // divisor low: 115200
            (1, 0x00), // divisor high
            (3, 0x03), // LCR: 8N1, DLAB off
            (2, 0xc7), // FCR: enable and clear FIFOs
        ];
        for (offset, value) in writes {
            // SAFETY: programming COM1, which only the hypervisor owns (guests get an emulated one).
            unsafe { Port::new(self.base + offset).write(value) };
        }
    }

    /// Waits until every byte has left the transmitter (before the machine is switched off).
    pub fn drain(&mut self) {
        let mut status: Port<u8> = Port::new(self.base + 5);
        // SAFETY: reading the line status register of COM1 has no side effects.
        while unsafe { status.read() } & LINE_STATUS_TRANSMITTER_EMPTY == 0 {
            core::hint::spin_loop();
        }
    }

    /// A received byte, if one is waiting (LSR bit 0: data ready).
    pub fn try_receive(&mut self) -> Option<u8> {
        let mut status: Port<u8> = Port::new(self.base + 5);
        // SAFETY: reading LSR and, when data is ready, RBR of COM1, which only the hypervisor owns.
        unsafe { (status.read() & 1 != 0).then(|| Port::<u8>::new(self.base).read()) }
    }

    fn send(&mut self, byte: u8) {
        let mut status: Port<u8> = Port::new(self.base + 5);
        // SAFETY: reading the line status register and writing the transmit register of COM1.
        unsafe {
            while status.read() & LINE_STATUS_THR_EMPTY == 0 {
                core::hint::spin_loop();
            }
            Port::new(self.base).write(byte);
        }
    }
}

impl Write for SerialPort {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            self.send(byte);
        }
        Ok(())
    }
}

/// Prints to the hypervisor console without a prefix (machine-readable `lamina:` lines).
#[macro_export]
macro_rules! hv_println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::platform::serial::SERIAL.lock(), $($arg)*);
    }};
}

struct SerialLogger;

static LOGGER: SerialLogger = SerialLogger;

impl log::Log for SerialLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let _ = writeln!(SERIAL.lock(), "[hv] {:5} {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Brings up COM1 and installs the logger at `level`.
pub fn init(level: log::LevelFilter) {
    SERIAL.lock().init();
    // A second call would fail harmlessly; there is only one.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

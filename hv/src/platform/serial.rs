//! The hypervisor's own console: COM1 (I/O port 0x3f8), 115200 8N1, and the `log` backend
//! that writes `[hv] LEVEL message` lines to it.
//!
//! Output goes into a ring and is pumped into the UART's FIFO whenever the scheduler comes
//! by, without waiting: at 115200 baud a byte takes 87 us, and a hypervisor that waited for
//! its console would delay every domain's timers by the length of other domains' output.
//! Only a full ring, the end of the run and a panic wait for the wire.
//!
//! The emulated UART that guests see is a different thing (`common::devices::uart`); this is the real
//! (emulator's) UART, used only by the hypervisor.

use core::fmt::{self, Write};
use spin::Mutex;
use x86_64::instructions::port::Port;

const COM1: u16 = 0x3f8;
const LINE_STATUS_THR_EMPTY: u8 = 1 << 5;
/// Bytes the 16550's transmit FIFO takes once it reports empty.
const FIFO_BYTES: usize = 16;
/// Output waiting for the wire.
const RING_BYTES: usize = 64 * 1024;
const LINE_STATUS_TRANSMITTER_EMPTY: u8 = 1 << 6;

/// The hypervisor's serial port. Lock it to write; `log` and the guest consoles share it.
pub static SERIAL: Mutex<SerialPort> = Mutex::new(SerialPort {
    base: COM1,
    ring: [0; RING_BYTES],
    head: 0,
    len: 0,
});

/// A 16550 transmitter with an output ring.
pub struct SerialPort {
    base: u16,
    ring: [u8; RING_BYTES],
    /// Index of the oldest byte waiting.
    head: usize,
    /// Bytes waiting.
    len: usize,
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

    fn transmitter_empty(&self) -> bool {
        let mut status: Port<u8> = Port::new(self.base + 5);
        // SAFETY: reading the line status register of COM1 has no side effects.
        unsafe { status.read() & LINE_STATUS_THR_EMPTY != 0 }
    }

    /// Moves waiting output into the UART's FIFO as far as it takes it now; never waits.
    pub fn pump(&mut self) {
        if self.len == 0 || !self.transmitter_empty() {
            return;
        }
        // What the FIFO takes, in at most two runs of the ring, each one `rep outsb`.
        let mut left = FIFO_BYTES.min(self.len);
        while left != 0 {
            let run = left.min(RING_BYTES - self.head);
            let bytes = &self.ring[self.head..self.head + run];
            // SAFETY: writing `run` bytes of the ring to the transmit register of COM1, whose
            // FIFO reported empty and takes FIFO_BYTES; RSI and RCX are the asm's own.
            unsafe {
                core::arch::asm!(
                    "rep outsb",
                    in("dx") self.base,
                    inout("rsi") bytes.as_ptr() => _,
                    inout("rcx") run => _,
                    options(nostack, preserves_flags, readonly)
                )
            };
            self.head = (self.head + run) % RING_BYTES;
            self.len -= run;
            left -= run;
        }
    }

    /// Whether output is waiting for the wire.
    pub fn has_pending_output(&self) -> bool {
        self.len != 0
    }

    /// Waits until every byte has left the transmitter (before the machine is switched off).
    pub fn drain(&mut self) {
        while self.len != 0 {
            self.pump();
            core::hint::spin_loop();
        }
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

    /// Queues `bytes`, in at most two copies per ring's worth.
    fn queue(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            while self.len == RING_BYTES {
                // Full: the wire sets the pace.
                self.pump();
                core::hint::spin_loop();
            }
            let tail = (self.head + self.len) % RING_BYTES;
            let run = bytes
                .len()
                .min(RING_BYTES - self.len)
                .min(RING_BYTES - tail);
            let (now, later) = bytes.split_at(run);
            self.ring[tail..tail + run].copy_from_slice(now);
            self.len += run;
            bytes = later;
        }
    }

    /// Queues each of `runs` in turn, then moves what the UART takes now (a guest's console
    /// line: prefix, text, newline).
    pub fn write_runs(&mut self, runs: &[&[u8]]) {
        for run in runs {
            self.queue(run);
        }
        self.pump();
    }
}

impl Write for SerialPort {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.queue(s.as_bytes());
        self.pump();
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
            // Lines of the other CPUs say which (the boot CPU's stay as they always were).
            let cpu = super::percpu::try_index().filter(|&index| index != 0);
            let mut serial = SERIAL.lock();
            let _ = match cpu {
                Some(index) => writeln!(
                    serial,
                    "[hv] {:5} cpu{index}: {}",
                    record.level(),
                    record.args()
                ),
                None => writeln!(serial, "[hv] {:5} {}", record.level(), record.args()),
            };
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

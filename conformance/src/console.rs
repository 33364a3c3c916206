//! The conformance kernel's own [`println!`]: one `console_io` write per line (docs/abi.md
//! 3.2), formatted on the stack.
//!
//! The suite does not print through the SDK, so that what the SDK does with the console (the
//! console ring, buffering) cannot mix with what the tests do to it. Formatting on the stack
//! makes printing safe from interrupt and exception handlers.

use core::fmt::{self, Write};

use crate::hv;

/// Bytes formatted before they go out without waiting for the end of the line.
const LINE_BYTES: usize = 256;

/// A line being formatted.
struct Line {
    bytes: [u8; LINE_BYTES],
    len: usize,
}

impl Line {
    fn flush(&mut self) {
        if self.len > 0 {
            // A failing write has nowhere to be reported; the missing line shows.
            let _ = hv::console_write(&self.bytes[..self.len]);
            self.len = 0;
        }
    }
}

impl Write for Line {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for &byte in text.as_bytes() {
            if self.len == LINE_BYTES {
                self.flush();
            }
            self.bytes[self.len] = byte;
            self.len += 1;
        }
        Ok(())
    }
}

/// Prints `args` and a newline on the domain's console.
pub(crate) fn print_line(args: fmt::Arguments<'_>) {
    let mut line = Line {
        bytes: [0; LINE_BYTES],
        len: 0,
    };
    // `Line` never fails.
    let _ = writeln!(line, "{args}");
    line.flush();
}

/// Prints a formatted line on the domain's console, like `std::println!`.
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print_line(format_args!($($arg)*))
    };
}
pub(crate) use println;

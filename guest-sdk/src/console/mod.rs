//! The console: [`print!`](crate::print) and [`println!`](crate::println), line-buffered, through
//! the console backend of [`crate::pvops`] (docs/abi.md 3.2, 7.1 and 13).
//!
//! Output is gathered in a line buffer and handed to the backend one line at a time. Until a
//! kernel selects its backends, that is the console hypercall (one exit per line instead of one
//! per byte on the UART); the paravirtual backend is the console ring (no exit per line,
//! [`ring`]), the native one the trapped [`uart`](crate::uart). A line longer than
//! [`LINE_MAX`] bytes goes out in pieces.
//!
//! The buffer is guarded by a lock that is tried, never waited for: an exception handler that
//! prints while the interrupted code holds it writes straight through, unbuffered.
//!
//! # The machinery behind `print!`, for a kernel's own macros
//!
//! A kernel that has its own `print!`/`println!` (or a logger, or anything that takes a
//! [`core::fmt::Write`]) keeps them and points them here:
//!
//! - [`Console`]: a [`Write`] sink into the same line buffer as [`print!`](crate::print);
//! - [`print`] and [`print_line`]: what the SDK's macros expand to;
//! - [`write_bytes`]: raw bytes into the line buffer;
//! - the backends themselves, unbuffered, each a [`Write`] sink too:
//!   [`HypercallConsole`](crate::pvops::HypercallConsole) (one `console_io` exit per write),
//!   [`RingConsole`](crate::pvops::RingConsole) (the console ring, no exit) and
//!   [`UartConsole`](crate::pvops::UartConsole) (COM1, an exit per byte); or whichever the
//!   console group selected, [`crate::pvops::console`].
//!
//! ```ignore
//! macro_rules! kprintln {
//!     ($($arg:tt)*) => {
//!         lamina_guest_sdk::console::print_line(format_args!($($arg)*))
//!     };
//! }
//!
//! use core::fmt::Write;
//! let _ = writeln!(lamina_guest_sdk::console::Console, "{} ticks", 42);
//! ```

pub mod ring;

use core::fmt::{self, Write};

use crate::sync::TryLock;

/// Bytes buffered before a partial line is sent anyway.
pub const LINE_MAX: usize = 512;

/// Gathers bytes into lines: every complete line (ending in `\n`), and every `N` bytes without
/// one, goes to an `emit` callback in one piece.
#[derive(Debug)]
pub struct LineBuffer<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> LineBuffer<N> {
    /// An empty buffer.
    pub const fn new() -> Self {
        const { assert!(N > 0, "a line buffer needs room for a byte") };
        LineBuffer {
            bytes: [0; N],
            len: 0,
        }
    }

    /// Appends `input`, calling `emit` with each line it completes (newline included) and with
    /// each `N` bytes that contain no newline.
    pub fn push(&mut self, mut input: &[u8], mut emit: impl FnMut(&[u8])) {
        while !input.is_empty() {
            let room = N - self.len;
            let take = match input.iter().position(|&byte| byte == b'\n') {
                Some(newline) if newline < room => newline + 1,
                _ => room.min(input.len()),
            };
            self.bytes[self.len..self.len + take].copy_from_slice(&input[..take]);
            self.len += take;
            input = &input[take..];
            if self.len == N || self.bytes[self.len - 1] == b'\n' {
                self.flush(&mut emit);
            }
        }
    }

    /// Sends what is buffered (a partial line), if anything.
    pub fn flush(&mut self, mut emit: impl FnMut(&[u8])) {
        if self.len > 0 {
            emit(&self.bytes[..self.len]);
            self.len = 0;
        }
    }

    /// The bytes of the unfinished line.
    pub fn pending(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl<const N: usize> Default for LineBuffer<N> {
    fn default() -> Self {
        Self::new()
    }
}

static CONSOLE: TryLock<LineBuffer<LINE_MAX>> = TryLock::new(LineBuffer::new());

/// Sends one piece of output through the selected console backend.
fn emit(bytes: &[u8]) {
    crate::pvops::console().write(bytes);
}

/// A `fmt::Write` adapter that fills the line buffer.
struct Buffered<'a>(&'a mut LineBuffer<LINE_MAX>);

impl Write for Buffered<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        self.0.push(text.as_bytes(), emit);
        Ok(())
    }
}

/// A `fmt::Write` adapter that sends every piece at once (the buffer is busy).
struct Unbuffered;

impl Write for Unbuffered {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        emit(text.as_bytes());
        Ok(())
    }
}

/// Formats `args` (and a newline if `newline`) into the console.
fn write(args: fmt::Arguments<'_>, newline: bool) {
    let suffix = if newline { "\n" } else { "" };
    // Formatting into our own sinks cannot fail: they always return `Ok`.
    let buffered = CONSOLE.try_with(|buffer| {
        let _ = Buffered(buffer).write_fmt(format_args!("{args}{suffix}"));
    });
    if buffered.is_none() {
        let _ = Unbuffered.write_fmt(format_args!("{args}{suffix}"));
    }
}

/// Formats `args` into the console's line buffer: what [`print!`](crate::print) expands to.
pub fn print(args: fmt::Arguments<'_>) {
    write(args, false);
}

/// Formats `args` and a newline into the console's line buffer, so the line reaches the
/// backend in one piece: what [`println!`](crate::println) expands to.
pub fn print_line(args: fmt::Arguments<'_>) {
    write(args, true);
}

/// Appends raw bytes to the console's line buffer (each complete line goes to the backend).
pub fn write_bytes(bytes: &[u8]) {
    if CONSOLE
        .try_with(|buffer| buffer.push(bytes, emit))
        .is_none()
    {
        emit(bytes);
    }
}

/// The console as a [`Write`] sink: the same line buffer and backend as
/// [`print!`](crate::print). Writing never fails.
///
/// ```ignore
/// use core::fmt::Write;
/// writeln!(lamina_guest_sdk::console::Console, "x = {x}").ok();
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        write_bytes(text.as_bytes());
        Ok(())
    }

    fn write_fmt(&mut self, args: fmt::Arguments<'_>) -> fmt::Result {
        print(args);
        Ok(())
    }
}

/// Sends a partial line now, without waiting for its newline, and has the backend print
/// everything it holds (for the ring: a send on the console port).
pub fn flush() {
    flush_line_buffer();
    crate::pvops::console().flush();
}

/// Hands a partial line to the backend without asking it to print at once (the ring is
/// drained at the domain's next exit anyway, at the latest at shutdown).
pub fn flush_line_buffer() {
    CONSOLE.try_with(|buffer| buffer.flush(emit));
}

/// Reads up to `buffer.len()` bytes of console input through the console hypercall
/// (`console_io` read, docs/abi.md 3.2): returns how many, 0 when none is waiting.
pub fn read_input(buffer: &mut [u8]) -> Result<usize, crate::hypercall::HypercallError> {
    let len = buffer
        .len()
        .min(lamina_abi::console::CONSOLE_WRITE_MAX as usize);
    // SAFETY: the hypervisor writes at most `len` bytes into the buffer we borrow mutably.
    let read = unsafe {
        crate::hypercall::call(
            lamina_abi::Hypercall::ConsoleIo,
            [
                lamina_abi::console::ConsoleOp::Read as u64,
                buffer.as_mut_ptr() as u64,
                len as u64,
                0,
                0,
            ],
        )
    }?;
    Ok(read as usize)
}

/// Ends a partial line with a newline, so that what follows starts a line of its own (used
/// before a panic message).
pub fn finish_line() {
    CONSOLE.try_with(|buffer| {
        if !buffer.pending().is_empty() {
            buffer.push(b"\n", emit);
        }
    });
}

/// Prints to the domain's console through the selected backend, buffered up to a newline.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::console::print(::core::format_args!($($arg)*))
    };
}

/// Prints a line to the domain's console: one piece for the backend per line.
#[macro_export]
macro_rules! println {
    () => {
        $crate::console::print_line(::core::format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::console::print_line(::core::format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_all<const N: usize>(buffer: &mut LineBuffer<N>, input: &[u8]) -> Vec<Vec<u8>> {
        let mut emitted = Vec::new();
        buffer.push(input, |piece| emitted.push(piece.to_vec()));
        emitted
    }

    #[test]
    fn complete_lines_go_out_one_piece_each() {
        let mut buffer = LineBuffer::<16>::new();
        assert_eq!(
            push_all(&mut buffer, b"ab\ncd\nef"),
            [b"ab\n".to_vec(), b"cd\n".to_vec()]
        );
        assert_eq!(buffer.pending(), b"ef");
        assert_eq!(push_all(&mut buffer, b"g\n"), [b"efg\n".to_vec()]);
        assert!(buffer.pending().is_empty());
    }

    #[test]
    fn a_line_built_from_pieces_goes_out_once() {
        let mut buffer = LineBuffer::<16>::new();
        assert!(push_all(&mut buffer, b"Test: ").is_empty());
        assert!(push_all(&mut buffer, b"name").is_empty());
        assert_eq!(push_all(&mut buffer, b"\n"), [b"Test: name\n".to_vec()]);
    }

    #[test]
    fn long_lines_go_out_in_buffer_sized_pieces() {
        let mut buffer = LineBuffer::<4>::new();
        assert_eq!(
            push_all(&mut buffer, b"abcdefghij\n"),
            [b"abcd".to_vec(), b"efgh".to_vec(), b"ij\n".to_vec()]
        );
    }

    #[test]
    fn a_newline_that_fills_the_buffer_ends_the_piece() {
        let mut buffer = LineBuffer::<4>::new();
        assert_eq!(push_all(&mut buffer, b"abc\nd"), [b"abc\n".to_vec()]);
        assert_eq!(push_all(&mut buffer, b"efgh"), [b"defg".to_vec()]);
        assert_eq!(buffer.pending(), b"h");
    }

    #[test]
    fn flush_sends_the_partial_line_once() {
        let mut buffer = LineBuffer::<8>::new();
        push_all(&mut buffer, b"abc");
        let mut emitted = Vec::new();
        buffer.flush(|piece| emitted.push(piece.to_vec()));
        buffer.flush(|piece| emitted.push(piece.to_vec()));
        assert_eq!(emitted, [b"abc".to_vec()]);
    }
}

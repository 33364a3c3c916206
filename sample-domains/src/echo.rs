//! `role=echo`: a line-oriented console. It binds VIRQ_CONSOLE, sleeps in `poll` until input
//! arrives (docs/abi.md 13: serial input goes to domain 1), and answers each line: `echo:
//! <line>`, or for `sum <numbers>` their sum; `quit` powers it off. It is what
//! `cargo xtask run --input` types into (the `console-input` scenario).

use lamina_abi::event_channel::Virq;
use lamina_abi::sched::ShutdownReason;
use lamina_guest_sdk::console;
use lamina_guest_sdk::events;
use lamina_guest_sdk::{println, sched, time};

use crate::fail;

/// How long it waits for input in all before it gives up (a run without input must end).
const INPUT_LIMIT_NS: u64 = 20_000_000_000;
/// The longest line it keeps; the rest of a longer line is dropped.
const LINE_MAX: usize = 120;

pub(crate) fn run() -> ! {
    let port = events::bind_virq(Virq::Console, 0)
        .unwrap_or_else(|error| fail("echo", format_args!("bind_virq(console): {error}")));
    events::mask(port);
    println!("echo: ready, type lines; `sum 1 2 3` adds, `quit` powers off");
    let mut line = [0u8; LINE_MAX];
    let mut len = 0;
    let mut lines = 0u32;
    loop {
        let mut chunk = [0u8; 64];
        let read = console::read_input(&mut chunk)
            .unwrap_or_else(|error| fail("echo", format_args!("console_io read: {error}")));
        if read == 0 {
            if time::now_ns() > INPUT_LIMIT_NS {
                fail("echo", format_args!("no `quit` after {lines} lines"));
            }
            if let Err(error) = sched::poll(&[port], Some(INPUT_LIMIT_NS)) {
                fail("echo", format_args!("poll: {error}"));
            }
            events::clear_pending(port);
            continue;
        }
        for &byte in &chunk[..read] {
            match byte {
                b'\r' | b'\n' => {
                    let text = core::str::from_utf8(&line[..len]).unwrap_or("(not UTF-8)");
                    if !text.is_empty() {
                        lines += 1;
                        answer(text, lines);
                    }
                    len = 0;
                }
                _ if len < LINE_MAX => {
                    line[len] = byte;
                    len += 1;
                }
                _ => {}
            }
        }
    }
}

/// Acts on one line of input.
fn answer(text: &str, number: u32) {
    let text = text.trim();
    if text == "quit" {
        println!("echo: quit after {number} lines; powering off");
        sched::shutdown(ShutdownReason::Poweroff);
    }
    if let Some(numbers) = text.strip_prefix("sum ") {
        let mut sum: i64 = 0;
        for word in numbers.split_whitespace() {
            match word.parse::<i64>() {
                Ok(value) => sum = sum.wrapping_add(value),
                Err(_) => {
                    println!("echo: line {number}: {word:?} is not a number");
                    return;
                }
            }
        }
        println!("echo: line {number}: sum = {sum}");
        return;
    }
    println!("echo: line {number}: {text}");
}

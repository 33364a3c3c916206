//! `console-input`: xtask types lines into COM1 (as `cargo xtask run --input` does) and the
//! `echo` role of sample-domains, domain 1, answers each (docs/abi.md 13: serial input goes to
//! domain 1, through the console ring and VIRQ_CONSOLE).

use crate::emulator::{ConsoleInput, RunExtras, RunRecord, Vendor};
use crate::error::Result;
use crate::serial_log::{HvResult, LinePattern};
use crate::workspace::Artifact;

use super::driven::{Context, Driven};
use super::{ModuleSource, ModuleSpec, NO_PANIC, Scenario};

/// What is typed: a line to echo, a line to act on, and the one that ends the domain.
const TYPED: &[u8] = b"hello lamina\r\nsum 19 23 -7\nquit\n";

pub const CONSOLE_INPUT: Driven = Driven {
    scenario: Scenario {
        name: "console-input",
        modules: &[ModuleSpec {
            source: ModuleSource::Built(Artifact::SampleDomains),
            cmdline: "echo role=echo mem=4M",
        }],
        expect: HvResult::Success,
        required_lines: &[
            LinePattern::Contains("(d1) echo: line 1: hello lamina"),
            LinePattern::Contains("(d1) echo: line 2: sum = 35"),
            LinePattern::Contains("(d1) echo: quit after 3 lines; powering off"),
            LinePattern::Contains("lamina: domain 1 echo end=poweroff"),
        ],
        forbidden_lines: &[NO_PANIC, LinePattern::Contains("echo: error:")],
        check: None,
    },
    vendors: &Vendor::ALL,
    drive,
};

fn drive(driven: &Driven, context: &Context<'_>) -> Result<(RunRecord, Vec<String>)> {
    let extras = RunExtras {
        input: Some(ConsoleInput::Bytes(TYPED.to_vec())),
        ..RunExtras::default()
    };
    // Not `-icount`: with it an idle guest's time runs ahead of the input.
    Ok((driven.boot(context, "", false, extras)?, Vec::new()))
}

//! A domain: one isolated guest with its RAM, devices, console, counters and lifecycle.

use crate::common::guest_memory::GuestMemory;
use crate::common::output;
use crate::common::stats::ExitStats;
use crate::common::uart::Uart16550;
use alloc::string::String;
use core::fmt;

/// Longest console line kept before it is flushed without a newline.
const CONSOLE_LINE_MAX: usize = 256;

/// How a domain ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The guest powered off.
    Poweroff,
    /// The guest asked for a reboot.
    Reboot,
    /// The guest reported a crash.
    Crash,
    /// The hypervisor stopped it; the text says why.
    Fault(String),
}

impl Ending {
    /// The word the summary uses (`end=...`).
    pub fn word(&self) -> &'static str {
        match self {
            Ending::Poweroff => "poweroff",
            Ending::Reboot => "reboot",
            Ending::Crash => "crash",
            Ending::Fault(_) => "fault",
        }
    }
}

/// Where a domain is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainState {
    /// Has work to do.
    Runnable,
    /// Ended and will not run again.
    Ended(Ending),
}

/// Console bytes waiting for their newline.
pub struct ConsoleLine {
    bytes: [u8; CONSOLE_LINE_MAX],
    len: usize,
}

impl Default for ConsoleLine {
    fn default() -> Self {
        ConsoleLine {
            bytes: [0; CONSOLE_LINE_MAX],
            len: 0,
        }
    }
}

impl ConsoleLine {
    /// Adds bytes, emitting each completed line as `(d<ID>) ...`.
    pub fn write(&mut self, domain_id: u32, data: &[u8]) {
        for &byte in data {
            match byte {
                b'\n' => self.flush(domain_id),
                b'\r' => {}
                _ => {
                    self.bytes[self.len] = byte;
                    self.len += 1;
                    if self.len == CONSOLE_LINE_MAX {
                        self.flush(domain_id);
                    }
                }
            }
        }
    }

    /// Emits what is buffered, if anything.
    pub fn flush(&mut self, domain_id: u32) {
        output::guest_line(domain_id, &self.bytes[..self.len]);
        self.len = 0;
    }

    /// True when bytes wait for a newline.
    pub fn is_pending(&self) -> bool {
        self.len != 0
    }
}

/// One guest.
pub struct Domain {
    /// Identifier, from 1 in boot-module order.
    pub id: u32,
    /// Name from the module command line.
    pub name: String,
    /// RAM.
    pub memory: GuestMemory,
    /// Lifecycle.
    pub state: DomainState,
    /// Console output in progress.
    pub console: ConsoleLine,
    /// The emulated COM1.
    pub uart: Uart16550,
    /// Exit counters.
    pub stats: ExitStats,
}

impl Domain {
    /// A runnable domain with fresh devices.
    pub fn new(id: u32, name: String, memory: GuestMemory) -> Self {
        Domain {
            id,
            name,
            memory,
            state: DomainState::Runnable,
            console: ConsoleLine::default(),
            uart: Uart16550::default(),
            stats: ExitStats::default(),
        }
    }

    /// Ends the domain (once: a second ending is ignored).
    pub fn end(&mut self, ending: Ending) {
        if self.state != DomainState::Runnable {
            return;
        }
        if self.console.is_pending() {
            self.console.flush(self.id);
        }
        if let Ending::Fault(why) = &ending {
            report_stop(self.id, &self.name, why);
        }
        self.state = DomainState::Ended(ending);
    }

    /// True until the domain ended.
    pub fn is_runnable(&self) -> bool {
        self.state == DomainState::Runnable
    }
}

fn report_stop(id: u32, name: &str, why: &str) {
    #[cfg(target_os = "none")]
    crate::hv_println!("lamina: domain {id} {name} stopped: {why}");
    #[cfg(not(target_os = "none"))]
    let _ = (id, name, why);
}

impl fmt::Debug for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "d{} {} {:?}", self.id, self.name, self.state)
    }
}

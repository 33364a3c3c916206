//! A domain: one isolated guest with its RAM, devices, console, counters and lifecycle; how
//! it is configured ([`config`]) and built ([`builder`]), controlled by a privileged domain
//! ([`domctl`]), accounted ([`stats`]) and torn down ([`teardown`]).

pub mod builder;
pub mod config;
pub mod domctl;
pub mod stats;
pub mod teardown;

use crate::common::devices::uart::Uart16550;
use crate::common::domain::builder::{KernelImage, MemoryMap};
use crate::common::domain::stats::ExitStats;
use crate::common::events::EventChannels;
use crate::common::grants::GrantTable;
use crate::common::memory::guest_memory::{GuestMemory, OwnedRam};
use crate::common::memory::nested_map::NestedMap;
use crate::common::output;
use crate::common::time::{TimeBase, read_tsc};
use crate::common::vcpu::state::{VcpuState, Wait, request};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use lamina_abi::console::{
    CONSOLE_BUDGET_BYTES, CONSOLE_BUDGET_BYTES_PER_S, CONSOLE_RING_INPUT_BYTES,
    CONSOLE_RING_OUTPUT_BYTES, ConsoleRing,
};
use lamina_abi::domctl::CONSOLE_HISTORY_BYTES;
use lamina_abi::event_channel::Virq;
use lamina_abi::layout::{CONSOLE_RING_GPA, KERNEL_MIN_GPA, SHARED_INFO_GPA};

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
    /// A privileged domain destroyed it (`domctl_op` destroy).
    Destroyed,
    /// It was paused and no privileged domain was left to unpause it.
    Paused,
}

/// How a paused domain that no one can unpause any more is reported when it is stopped.
pub const PAUSED_FOR_GOOD: &str = "paused, and no privileged domain is left to unpause it";

impl Ending {
    /// The word the summary uses (`end=...`).
    pub fn word(&self) -> &'static str {
        match self {
            Ending::Poweroff => "poweroff",
            Ending::Reboot => "reboot",
            Ending::Crash => "crash",
            Ending::Fault(_) => "fault",
            Ending::Destroyed => "destroyed",
            Ending::Paused => "paused",
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

/// The end of a domain's console output as printed (`domctl_op` read_console, docs/abi.md
/// 17): the text after `(d<ID>) ` and one `\n` per line, counted from offset 0, of which the
/// last [`CONSOLE_HISTORY_BYTES`] are kept.
pub struct ConsoleHistory {
    kept: Box<[u8; CONSOLE_HISTORY_BYTES as usize]>,
    end: u64,
}

impl Default for ConsoleHistory {
    fn default() -> Self {
        ConsoleHistory {
            kept: Box::new([0; CONSOLE_HISTORY_BYTES as usize]),
            end: 0,
        }
    }
}

impl ConsoleHistory {
    /// The stream offset after the last byte: how many bytes were ever printed.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The offset of the oldest byte kept.
    pub fn start(&self) -> u64 {
        self.end.saturating_sub(CONSOLE_HISTORY_BYTES)
    }

    fn append(&mut self, bytes: &[u8]) {
        const KEPT: usize = CONSOLE_HISTORY_BYTES as usize;
        // Only the last KEPT bytes can stay; they go in at most two copies (on the console's
        // path, so not byte by byte).
        let skipped = bytes.len().saturating_sub(KEPT);
        let mut at = ((self.end + skipped as u64) % CONSOLE_HISTORY_BYTES) as usize;
        let mut rest = &bytes[skipped..];
        while !rest.is_empty() {
            let run = rest.len().min(KEPT - at);
            self.kept[at..at + run].copy_from_slice(&rest[..run]);
            rest = &rest[run..];
            at = 0;
        }
        self.end += bytes.len() as u64;
    }

    /// Copies bytes from stream offset `offset` into `out`; returns how many. Nothing is
    /// copied from outside `[start, end)`.
    pub fn copy_from(&self, offset: u64, out: &mut [u8]) -> usize {
        if offset < self.start() || offset > self.end {
            return 0;
        }
        let count = out.len().min((self.end - offset) as usize);
        for (i, byte) in out[..count].iter_mut().enumerate() {
            *byte = self.kept[((offset + i as u64) % CONSOLE_HISTORY_BYTES) as usize];
        }
        count
    }
}

/// Where guest console bytes come from. Each source is assembled into lines of its own, so
/// a line half written through one is never cut by a line of the other (docs/abi.md 7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleSource {
    /// The emulated UART's transmit register (7.1).
    Uart,
    /// `console_io` write (3.2) and the console ring (13).
    Paravirtual,
}

/// Bytes of one source waiting for their newline.
struct LineBuffer {
    bytes: [u8; CONSOLE_LINE_MAX],
    len: usize,
}

impl Default for LineBuffer {
    fn default() -> Self {
        LineBuffer {
            bytes: [0; CONSOLE_LINE_MAX],
            len: 0,
        }
    }
}

impl LineBuffer {
    /// Where to break a full buffer: after the last space (the space itself is dropped), so
    /// a long line is wrapped between words; a single word longer than the buffer is broken
    /// at the last UTF-8 character boundary. Returns (end of this line, start of the rest).
    fn break_point(&self) -> (usize, usize) {
        let full = &self.bytes[..self.len];
        if let Some(space) = full.iter().rposition(|&b| b == b' ')
            && space > 0
        {
            return (space, space + 1);
        }
        // Back off over UTF-8 continuation bytes (10xxxxxx) to the start of a character.
        let start = (1..self.len)
            .rev()
            .find(|&i| full[i] & 0xc0 != 0x80)
            .unwrap_or(self.len);
        (start, start)
    }
}

/// How much console output a domain may still print (docs/abi.md 13.1): a token bucket of
/// [`CONSOLE_BUDGET_BYTES`] that refills at [`CONSOLE_BUDGET_BYTES_PER_S`] of system time.
/// Without it a domain that prints as fast as it can fills the serial line's queue, and the
/// hypervisor then waits for the wire inside that domain's exits while every other domain
/// waits too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleBudget {
    /// Bytes that may be printed now.
    bytes: u64,
    /// System time up to which refills were counted.
    refilled_ns: u64,
    /// The earliest system time the budget can be full again (from the last refill; takes
    /// since only make it later): before it a take needs no refill, since no earning can have
    /// been lost to the cap.
    full_at_ns: u64,
}

impl Default for ConsoleBudget {
    fn default() -> Self {
        ConsoleBudget {
            bytes: CONSOLE_BUDGET_BYTES,
            refilled_ns: 0,
            full_at_ns: 0,
        }
    }
}

impl ConsoleBudget {
    /// Adds what the time since the last refill earned, up to the burst.
    fn refill(&mut self, now_ns: u64) {
        const NS_PER_S: u64 = 1_000_000_000;
        let elapsed = now_ns.saturating_sub(self.refilled_ns);
        // Not a byte earned yet: nothing changes (a ring waiting on an empty budget is looked
        // at again at the end of every slice of its domain, at the next domain's expense).
        if elapsed < NS_PER_S / CONSOLE_BUDGET_BYTES_PER_S {
            return;
        }
        // In 64 bits below 2^51 ns (26 days), where a division by a constant is a
        // multiplication: a 128-bit one is a library call, and a domain whose ring waits on
        // an empty budget pays one at the end of every slice (the next domain's latency).
        let earned = match elapsed.checked_mul(CONSOLE_BUDGET_BYTES_PER_S) {
            Some(product) => product / NS_PER_S,
            None => {
                (u128::from(elapsed) * u128::from(CONSOLE_BUDGET_BYTES_PER_S)
                    / u128::from(NS_PER_S)) as u64
            }
        };
        if self.bytes.saturating_add(earned) >= CONSOLE_BUDGET_BYTES {
            self.bytes = CONSOLE_BUDGET_BYTES;
            self.refilled_ns = now_ns;
        } else {
            self.bytes += earned;
            // Only the time the whole bytes took: fractions carry over to the next refill.
            self.refilled_ns += earned * NS_PER_S / CONSOLE_BUDGET_BYTES_PER_S;
        }
        self.full_at_ns = self.refilled_ns.saturating_add(
            (CONSOLE_BUDGET_BYTES - self.bytes) * NS_PER_S / CONSOLE_BUDGET_BYTES_PER_S,
        );
    }

    /// An empty budget that never refills (host tests of what happens beyond it).
    #[cfg(test)]
    pub fn spent() -> Self {
        ConsoleBudget {
            bytes: 0,
            refilled_ns: u64::MAX,
            full_at_ns: u64::MAX,
        }
    }

    /// Brings the budget up to date before taking `want` bytes. A full budget earns nothing,
    /// so its earning starts now. Otherwise the refill (a 128-bit division) is made when the
    /// budget is too short for `want`, or when it may have been full since the last refill:
    /// a refill made later would credit what that time earned beyond the cap (a take without
    /// one let 32,806 bytes through where the burst and 36 earned bytes may go).
    fn settle(&mut self, want: u64, now_ns: impl FnOnce() -> u64) {
        let now = now_ns();
        if self.bytes == CONSOLE_BUDGET_BYTES {
            self.refilled_ns = now;
            self.full_at_ns = now;
        } else if self.bytes < want || now >= self.full_at_ns {
            self.refill(now);
        }
    }

    /// Takes `want` bytes if the budget holds them all (`false`: it took none).
    pub fn take(&mut self, want: u64, now_ns: impl FnOnce() -> u64) -> bool {
        self.settle(want, now_ns);
        let enough = self.bytes >= want;
        if enough {
            self.bytes -= want;
        }
        enough
    }

    /// Takes as many of `want` bytes as the budget holds; returns how many.
    pub fn take_up_to(&mut self, want: u64, now_ns: impl FnOnce() -> u64) -> u64 {
        self.settle(want, now_ns);
        let taken = want.min(self.bytes);
        self.bytes -= taken;
        taken
    }
}

/// Where the first LF or CR of `data` is, looked for eight bytes at a time: a byte of `word`
/// equal to `b` is a zero byte of `word ^ (b * 0x0101..01)`, and `(x - 0x0101..01) & !x &
/// 0x8080..80` is non-zero exactly when `x` has a zero byte (the hypervisor's target has no
/// SSE; the `memchr` crate's portable code for two bytes costs twice this, and another
/// dependency of the fuzz workspace).
fn line_control_at(data: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const LF: u64 = ONES * b'\n' as u64;
    const CR: u64 = ONES * b'\r' as u64;
    let mut at = 0;
    for chunk in data.chunks_exact(8) {
        let Ok(bytes) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let word = u64::from_le_bytes(bytes);
        let (lf, cr) = (word ^ LF, word ^ CR);
        if (lf.wrapping_sub(ONES) & !lf | cr.wrapping_sub(ONES) & !cr) & HIGHS != 0 {
            break;
        }
        at += 8;
    }
    data[at..]
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .map(|i| at + i)
}

/// A domain's console: a line buffer per source, the history of the lines printed, and the
/// budget its output draws on.
#[derive(Default)]
pub struct ConsoleLine {
    uart: LineBuffer,
    paravirtual: LineBuffer,
    /// What was printed so far.
    pub history: ConsoleHistory,
    /// What it may still print.
    pub budget: ConsoleBudget,
    /// Bytes refused or dropped for want of budget (console writes refused with `EAGAIN`,
    /// UART bytes dropped); bytes left in the ring are not counted.
    pub refused_bytes: u64,
}

impl ConsoleLine {
    /// A byte the guest's UART transmits: printed within the budget, dropped (as on an
    /// overrun line) beyond it.
    #[inline]
    pub fn uart_byte(&mut self, domain_id: u32, byte: u8, now_ns: impl FnOnce() -> u64) {
        if !self.budget.take(1, now_ns) {
            self.refused_bytes += 1;
            return;
        }
        match byte {
            b'\n' => self.flush(ConsoleSource::Uart, domain_id),
            b'\r' => {}
            _ => {
                let buffer = &mut self.uart;
                if let Some(slot) = buffer.bytes.get_mut(buffer.len) {
                    *slot = byte;
                    buffer.len += 1;
                }
                if buffer.len == CONSOLE_LINE_MAX {
                    self.wrap(ConsoleSource::Uart, domain_id);
                }
            }
        }
    }

    /// Adds bytes from `source`, emitting each completed line as `(d<ID>) ...`. A line
    /// longer than [`CONSOLE_LINE_MAX`] bytes is wrapped at a word boundary. The text
    /// between line ends is copied in runs, not byte by byte; CR is dropped.
    pub fn write(&mut self, source: ConsoleSource, domain_id: u32, mut data: &[u8]) {
        while !data.is_empty() {
            let end = line_control_at(data).unwrap_or(data.len());
            let (text, rest) = data.split_at(end);
            data = match rest.split_first() {
                Some((b'\n', rest)) => {
                    let (buffer, history) = self.parts(source);
                    if buffer.len == 0 && text.len() < CONSOLE_LINE_MAX {
                        // A whole line that needs no wrapping: printed from where it is.
                        Self::emit(history, domain_id, text);
                    } else {
                        self.append(source, domain_id, text);
                        self.flush(source, domain_id);
                    }
                    rest
                }
                Some((_, rest)) => {
                    self.append(source, domain_id, text);
                    rest
                }
                None => {
                    self.append(source, domain_id, text);
                    rest
                }
            };
        }
    }

    /// Adds `text` (no line end in it) to the buffer of `source`, wrapping each time it fills.
    fn append(&mut self, source: ConsoleSource, domain_id: u32, mut text: &[u8]) {
        while !text.is_empty() {
            let buffer = self.buffer(source);
            let run = (CONSOLE_LINE_MAX - buffer.len).min(text.len());
            let (now, later) = text.split_at(run);
            buffer.bytes[buffer.len..buffer.len + run].copy_from_slice(now);
            buffer.len += run;
            text = later;
            if buffer.len == CONSOLE_LINE_MAX {
                self.wrap(source, domain_id);
            }
        }
    }

    fn buffer(&mut self, source: ConsoleSource) -> &mut LineBuffer {
        self.parts(source).0
    }

    /// The line buffer of `source` and the history, borrowed together.
    fn parts(&mut self, source: ConsoleSource) -> (&mut LineBuffer, &mut ConsoleHistory) {
        match source {
            ConsoleSource::Uart => (&mut self.uart, &mut self.history),
            ConsoleSource::Paravirtual => (&mut self.paravirtual, &mut self.history),
        }
    }

    /// Emits the full buffer of `source` up to its break point and keeps the rest.
    fn wrap(&mut self, source: ConsoleSource, domain_id: u32) {
        let (buffer, history) = self.parts(source);
        let (end, rest) = buffer.break_point();
        Self::emit(history, domain_id, &buffer.bytes[..end]);
        let len = buffer.len;
        buffer.bytes.copy_within(rest..len, 0);
        buffer.len = len - rest;
    }

    /// Emits what `source` has buffered (an empty line if nothing).
    pub fn flush(&mut self, source: ConsoleSource, domain_id: u32) {
        let (buffer, history) = self.parts(source);
        let len = core::mem::take(&mut buffer.len);
        Self::emit(history, domain_id, &buffer.bytes[..len]);
    }

    /// Emits what either source has buffered, UART first (at the domain's end).
    pub fn flush_pending(&mut self, domain_id: u32) {
        for source in [ConsoleSource::Uart, ConsoleSource::Paravirtual] {
            if self.buffer(source).len != 0 {
                self.flush(source, domain_id);
            }
        }
    }

    fn emit(history: &mut ConsoleHistory, domain_id: u32, line: &[u8]) {
        let text = output::printed_text(line);
        output::guest_line(domain_id, text);
        history.append(text.as_bytes());
        history.append(b"\n");
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
    /// Its memory map (docs/abi.md 11), fixed when it is built.
    pub memory_map: MemoryMap,
    /// Lifecycle.
    pub state: DomainState,
    /// Console output in progress.
    pub console: ConsoleLine,
    /// The emulated COM1.
    pub uart: Uart16550,
    /// Event channels.
    pub events: EventChannels,
    /// Per-vCPU hypervisor state, indexed by vCPU number (`vcpus=`, docs/abi.md 19).
    pub vcpus: Vec<VcpuState>,
    /// The clock.
    pub time: TimeBase,
    /// May read other domains' state (`privileged=1`).
    pub privileged: bool,
    /// Scheduling weight (`weight=`).
    pub weight: u32,
    /// The CPUs its vCPUs may run on, a bit per CPU index (`affinity=`, limited to the CPUs
    /// in use; set through [`Domain::set_affinity`]).
    pub affinity: u64,
    /// The nested page table (EPT/NPT) its vCPU runs on, built by the backend; `None` in host
    /// tests without one, and once the domain was released (it never runs again).
    pub nested: Option<Box<dyn NestedMap>>,
    /// Grants it made and the grants mapped in its grant window (docs/abi.md 16).
    pub grants: GrantTable,
    /// Not scheduled until unpaused (`domctl_op` pause); its timers and events go on.
    pub paused: bool,
    /// The host memory behind [`Self::memory`] (`None` in host tests, and once returned).
    pub ram: Option<OwnedRam>,
    /// Ended and its resources returned (docs/abi.md 17, Teardown).
    pub torn_down: bool,
    /// Once torn down: the bytes of its RAM not yet scrubbed and returned, counted down by
    /// the scrub that owns the RAM (`DomainInfo::memory_bytes`).
    pub ram_unreturned: Arc<AtomicU64>,
}

impl Domain {
    /// A runnable domain with fresh devices and one vCPU.
    pub fn new(id: u32, name: String, memory: GuestMemory, time: TimeBase) -> Self {
        Self::with_vcpus(id, name, memory, time, 1)
    }

    /// A runnable domain with fresh devices and `nr_vcpus` vCPUs (1 to
    /// [`lamina_abi::shared_info::MAX_VCPUS`]), of which vCPU 0 is up.
    pub fn with_vcpus(
        id: u32,
        name: String,
        memory: GuestMemory,
        time: TimeBase,
        nr_vcpus: usize,
    ) -> Self {
        let now = time.ns_at(read_tsc());
        let no_image = KernelImage {
            entry: KERNEL_MIN_GPA,
            start: KERNEL_MIN_GPA,
            end: KERNEL_MIN_GPA,
        };
        Domain {
            id,
            name,
            memory_map: MemoryMap::new(memory.size(), &no_image),
            memory,
            state: DomainState::Runnable,
            console: ConsoleLine::default(),
            uart: Uart16550::default(),
            events: EventChannels::new(id as u16, SHARED_INFO_GPA, nr_vcpus),
            vcpus: (0..nr_vcpus as u32)
                .map(|index| VcpuState::new(index, now, time.tsc_hz))
                .collect(),
            time,
            privileged: false,
            weight: crate::common::domain::config::DEFAULT_WEIGHT,
            affinity: crate::common::domain::config::ANY_CPU,
            nested: None,
            grants: GrantTable::default(),
            paused: false,
            ram: None,
            torn_down: false,
            ram_unreturned: Arc::new(AtomicU64::new(0)),
        }
    }

    /// RAM it holds (docs/abi.md 17, `memory_bytes`): all of it while it lives, then what
    /// teardown has still to scrub and return; 0 once all of it is back.
    pub fn memory_bytes(&self) -> u64 {
        if self.torn_down {
            self.ram_unreturned.load(Ordering::Relaxed)
        } else {
            self.memory.size()
        }
    }

    /// Consumes vCPU `vcpu`'s PV timers due by `now`, raising VIRQ_TIMER on it where that is
    /// bound (docs/abi.md 9.3); true if one fired. Every pass of the scheduler does this for
    /// every vCPU; a poll does it for its own vCPU first, so that one that times out has seen
    /// every expiry due before it (on a machine with several CPUs no pass may have come by
    /// since).
    pub fn expire_timers(&mut self, vcpu: usize, now: u64) -> bool {
        if !self.vcpus[vcpu].timers.expire(now) {
            return false;
        }
        crate::common::trace::timer(self.id);
        if let Some(port) = self
            .events
            .virq_port(vcpu, lamina_abi::event_channel::Virq::Timer)
        {
            self.raise_port(port);
        }
        self.vcpus[vcpu].requests.make(request::EVENT);
        true
    }

    /// Raises `port` and wakes or flags the vCPU it concerns (docs/abi.md 8).
    pub fn raise_port(&mut self, port: u32) {
        crate::common::trace::event(self.id, port);
        match self.events.raise(&self.memory, port) {
            Ok(Some(vcpu)) => {
                // Flagged before it is requested: the vCPU that drains the request sees it.
                let requests = &self.vcpus[vcpu].requests;
                requests.set_upcall_maybe_pending(true);
                requests.make(request::EVENT);
            }
            Ok(None) => {}
            Err(_) => return,
        }
        // A poller waits on pending bits, masked or not.
        for state in self.vcpus.iter() {
            if matches!(&state.wait, Wait::Poll { ports, .. } if ports.contains(&port)) {
                state.requests.make(request::EVENT);
            }
        }
    }

    /// A nested mapping went away or lost permissions: every vCPU drops its cached
    /// translations before it next enters the guest; one running on another CPU is out of
    /// the guest when this returns, so no CPU uses the old mapping after it (docs/abi.md 16).
    pub fn mark_nested_stale(&self) {
        for state in &self.vcpus {
            state.requests.make_and_wait(request::NESTED_FLUSH);
        }
    }

    /// Whether a nested flush is still asked of some vCPU (host tests).
    #[cfg(test)]
    pub fn nested_flush_pending(&self) -> bool {
        self.vcpus
            .iter()
            .any(|state| state.requests.peek(request::NESTED_FLUSH))
    }

    /// Lets its vCPUs run only on the CPUs in `cpus` (a bit each; docs/abi.md 4.4).
    pub fn set_affinity(&mut self, cpus: u64) {
        self.affinity = cpus;
        for state in &self.vcpus {
            state.requests.set_allowed_cpus(cpus);
        }
    }

    /// The exit counters of all its vCPUs together (the summary).
    pub fn exit_stats(&self) -> ExitStats {
        let mut sum = ExitStats::default();
        for state in &self.vcpus {
            sum.add(&state.stats);
        }
        sum
    }

    /// CPU time its vCPUs have had, in ns, up to the start of the slices they run in.
    pub fn cpu_ns(&self) -> u64 {
        self.vcpus.iter().map(|state| state.cpu_ns).sum()
    }

    /// CPU time its vCPUs have had up to `now` (system time), the slices they run in on
    /// other CPUs included: what another domain sees (docs/abi.md 17, `cpu_ns`).
    pub fn cpu_ns_at(&self, now: u64) -> u64 {
        self.vcpus
            .iter()
            .map(|state| {
                state.cpu_ns
                    + state
                        .running_since
                        .map_or(0, |since| now.saturating_sub(since))
            })
            .sum()
    }

    /// System time now.
    pub fn now(&self) -> u64 {
        self.time.ns_at(read_tsc())
    }

    /// The guest writes `value` to register `offset` of its emulated UART; a byte it
    /// transmits goes to the console as UART output (docs/abi.md 7.1).
    pub fn uart_write(&mut self, offset: u16, value: u8) {
        if let Some(byte) = self.uart.write(offset, value) {
            let time = &self.time;
            self.console
                .uart_byte(self.id, byte, || time.ns_at(read_tsc()));
        }
    }

    /// Puts a byte of serial input into the console ring's input buffer (dropped when full)
    /// and raises VIRQ_CONSOLE (docs/abi.md 13).
    pub fn receive_console_input(&mut self, byte: u8) {
        const CONS: u64 = core::mem::offset_of!(ConsoleRing, in_cons) as u64;
        const PROD: u64 = core::mem::offset_of!(ConsoleRing, in_prod) as u64;
        let Ok(indices) = self.memory.read_u64(CONSOLE_RING_GPA + CONS) else {
            return;
        };
        let (cons, prod) = (indices as u32, (indices >> 32) as u32);
        if prod.wrapping_sub(cons) as usize >= CONSOLE_RING_INPUT_BYTES {
            return;
        }
        let at = CONSOLE_RING_GPA + (prod as usize % CONSOLE_RING_INPUT_BYTES) as u64;
        if self.memory.write(at, &[byte]).is_err() {
            return;
        }
        let _ = self
            .memory
            .write(CONSOLE_RING_GPA + PROD, &prod.wrapping_add(1).to_le_bytes());
        if let Some(port) = self.events.virq_port(0, Virq::Console) {
            self.raise_port(port);
        }
    }

    /// Whether console input could wake this domain (VIRQ_CONSOLE is bound).
    pub fn console_input_can_wake(&self) -> bool {
        self.events.virq_port(0, Virq::Console).is_some()
    }

    /// Prints what the guest put in its console ring, as far as its console budget goes: the
    /// rest stays in the ring for later (docs/abi.md 13.1). A ring whose indices make no sense
    /// is treated as empty (the guest only garbles its own output).
    #[inline(always)]
    pub fn drain_console_ring(&mut self) {
        // Mostly empty (a vCPU that goes to wait): one load, without the frame of the drain
        // and its 2 KiB buffer (64 instructions of an event ping-pong's round trip).
        if self.console_ring_waiting() {
            self.drain_console_ring_within(true);
        }
    }

    /// Whether the guest put bytes in its console ring that are not printed yet (or garbled
    /// its indices, which a drain sets right).
    #[inline(always)]
    pub fn console_ring_waiting(&self) -> bool {
        const CONS: u64 = core::mem::offset_of!(ConsoleRing, out_cons) as u64;
        self.memory
            .read_u64(CONSOLE_RING_GPA + CONS)
            .is_ok_and(|indices| indices as u32 != (indices >> 32) as u32)
    }

    #[inline(never)]
    fn drain_console_ring_within(&mut self, budgeted: bool) {
        const CONS: u64 = core::mem::offset_of!(ConsoleRing, out_cons) as u64;
        const _: () = assert!(core::mem::offset_of!(ConsoleRing, out_prod) as u64 == CONS + 4);
        const OUTPUT: u64 = core::mem::offset_of!(ConsoleRing, output) as u64;
        // Both indices in one little-endian load: out_cons, then out_prod.
        let Ok(indices) = self.memory.read_u64(CONSOLE_RING_GPA + CONS) else {
            return;
        };
        let (cons, prod) = (indices as u32, (indices >> 32) as u32);
        let mut waiting = prod.wrapping_sub(cons) as usize;
        if waiting == 0 {
            return;
        }
        let mut consumed = prod;
        if waiting <= CONSOLE_RING_OUTPUT_BYTES {
            if budgeted {
                let time = &self.time;
                waiting = self
                    .console
                    .budget
                    .take_up_to(waiting as u64, || time.ns_at(read_tsc()))
                    as usize;
                consumed = cons.wrapping_add(waiting as u32);
                if waiting == 0 {
                    return;
                }
            }
            // Copied out of guest memory once, in at most two runs, into a buffer that is
            // never zeroed first; both or neither (the whole output area is in RAM or not).
            if self
                .memory
                .check(CONSOLE_RING_GPA + OUTPUT, CONSOLE_RING_OUTPUT_BYTES as u64)
                .is_err()
            {
                return;
            }
            let mut buffer = [core::mem::MaybeUninit::<u8>::uninit(); CONSOLE_RING_OUTPUT_BYTES];
            let mut copied = 0;
            while copied < waiting {
                let at = (cons as usize + copied) % CONSOLE_RING_OUTPUT_BYTES;
                let run = (CONSOLE_RING_OUTPUT_BYTES - at).min(waiting - copied);
                let Ok(bytes) = self.memory.read_uninit(
                    CONSOLE_RING_GPA + OUTPUT + at as u64,
                    &mut buffer[copied..copied + run],
                ) else {
                    return;
                };
                self.console
                    .write(ConsoleSource::Paravirtual, self.id, bytes);
                copied += run;
            }
        }
        let _ = self
            .memory
            .write(CONSOLE_RING_GPA + CONS, &consumed.to_le_bytes());
    }

    /// Ends the domain (once: a second ending is ignored).
    pub fn end(&mut self, ending: Ending) {
        if self.state != DomainState::Runnable {
            return;
        }
        // The last words are printed whatever the budget: the ring holds at most 2 KiB.
        self.drain_console_ring_within(false);
        self.console.flush_pending(self.id);
        match &ending {
            Ending::Fault(why) => report_stop(self.id, &self.name, why),
            Ending::Paused => report_stop(self.id, &self.name, PAUSED_FOR_GOOD),
            _ => {}
        }
        self.paused = false;
        self.state = DomainState::Ended(ending);
        // Its vCPUs running on other CPUs stop at once.
        for state in &self.vcpus {
            state.requests.make(request::RESCHEDULE);
        }
    }

    /// True until the domain ended.
    pub fn is_runnable(&self) -> bool {
        self.state == DomainState::Runnable
    }

    /// Why the domain can never run again: every vCPU that is up waits, and nothing can wake
    /// any of them (docs/abi.md 3.3, 7.2); `None` if one runs or could be woken.
    pub fn never_wakes(&self) -> Option<&'static str> {
        let mut why = None;
        for index in (0..self.vcpus.len()).filter(|&i| self.vcpus[i].up) {
            why = Some(self.vcpu_never_wakes(index)?);
        }
        why
    }

    /// Whether a vCPU other than `index` is up: it could wake `index` (an IPI port, a
    /// `vcpu_op`), so `index` blocking with nothing else to wake it is not yet a dead end.
    pub fn has_other_vcpu_up(&self, index: usize) -> bool {
        self.vcpus
            .iter()
            .enumerate()
            .any(|(i, state)| i != index && state.up)
    }

    /// Why vCPU `index`, which waits, can never be woken by anything but its siblings, or
    /// `None` if something could (or it does not wait).
    fn vcpu_never_wakes(&self, index: usize) -> Option<&'static str> {
        let state = &self.vcpus[index];
        let events_can_wake = self.events.can_wake(index, state.timers.armed());
        let stuck = match &state.wait {
            Wait::None
            | Wait::Poll {
                deadline: Some(_), ..
            } => false,
            Wait::Block | Wait::Poll { deadline: None, .. } => !events_can_wake,
            Wait::Halt => {
                // An interrupt already pending (a sibling's IPI, say) wakes it at the next look.
                let can_wake = state.vlapic.timer_armed()
                    || state.vlapic.deliverable_vector().is_some()
                    || (state.upcall_vector != 0 && events_can_wake);
                return (!can_wake).then_some(HALT_NEVER_WAKES);
            }
        };
        stuck.then_some(NEVER_WAKES)
    }
}

/// How a domain whose only vCPU waits for nothing is reported.
pub const NEVER_WAKES: &str = "blocked with nothing that can ever wake the vCPU";

/// How a domain whose only vCPU halted with nothing that can wake it is reported.
pub const HALT_NEVER_WAKES: &str = "HLT with nothing that can ever wake the vCPU";

/// The other domains, as a hypercall of the running one may reach them (inter-domain event
/// channels, domain control). The running domain itself is not in the table: it is passed
/// separately.
pub trait DomainTable {
    /// The domain with this id, if it exists and is not the running one.
    fn get_mut(&mut self, id: u32) -> Option<&mut Domain>;

    /// Tears down domain `id` of the table, which has ended, with the rest of the table and
    /// `caller` (the running domain) as its peers (docs/abi.md 17, Teardown). False when this
    /// table cannot: `id` is not in it, or it holds no vCPUs.
    fn tear_down(&mut self, id: u32, caller: &mut Domain) -> bool {
        let _ = (id, caller);
        false
    }

    /// Whether no CPU runs a vCPU of domain `id`: each is back in the table, the CPU time of
    /// its last slice counted. True for a table that holds no vCPUs.
    fn is_parked(&mut self, id: u32) -> bool {
        let _ = id;
        true
    }

    /// Before multicall entry `nr` with `args` of the running domain `own`: takes what the
    /// entry needs (`sched::reach`). False: not without waiting against the lock order, or it
    /// needs the whole table; the batch stops before the entry, [`Self::busy`] is true, and the
    /// scheduler finishes it once it holds what was wanted. Always true for a table that holds
    /// every domain at once.
    fn admit(&mut self, own: &Domain, nr: u64, args: &[u64; 5]) -> bool {
        let _ = (own, nr, args);
        true
    }

    /// Whether a domain asked for could not be handed out (see [`Self::admit`]): `get_mut`
    /// answered `None` for a domain that exists. Only a table that keeps batches
    /// ([`Self::kept`]) may ever say so. A call that sees it stops before it has done
    /// anything (grant copy, `list_domains`), or a batch before the entry that saw it; the
    /// scheduler makes it again once it holds that domain.
    fn busy(&self) -> bool {
        false
    }

    /// Where an unfinished `multicall` keeps its copy of the batch until it is finished: a
    /// table that can refuse an entry ([`Self::admit`]) has one, and a table that hands a
    /// kept copy back has it while it holds the copy. `None` from every other table, so a
    /// batch run with it asks nothing else of it per entry.
    fn kept(&mut self) -> Option<&mut Option<Box<crate::common::hypercall::UnfinishedBatch>>> {
        None
    }
}

/// A domain and its vCPUs.
pub struct Slot<V> {
    /// The domain.
    pub domain: Domain,
    /// Its vCPUs' hardware state, by vCPU number (`domain.vcpus` has the rest): `None` while
    /// a CPU runs that vCPU; empty once the domain is torn down. Boxed, so that taking one
    /// out for a slice moves a pointer, not the state.
    pub vcpus: Vec<Option<Box<V>>>,
}

impl<V> Slot<V> {
    /// Whether no CPU runs any of its vCPUs: it may be torn down.
    pub fn is_parked(&self) -> bool {
        self.vcpus.iter().all(Option::is_some)
    }
}

/// A table with no other domains (host tests, and a machine with one domain).
pub struct NoPeers;

impl DomainTable for NoPeers {
    fn get_mut(&mut self, _id: u32) -> Option<&mut Domain> {
        None
    }
}

/// Number of domains built at boot: identifiers `1..=DOMAIN_COUNT` exist.
pub static DOMAIN_COUNT: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// Whether domain `id` exists (was built at boot).
pub fn domain_exists(id: u64) -> bool {
    id >= 1 && id <= u64::from(DOMAIN_COUNT.load(core::sync::atomic::Ordering::Relaxed))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_appends_wrap_and_keep_the_last_bytes_of_long_runs() {
        let mut history = ConsoleHistory::default();
        let long: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        history.append(&long);
        history.append(b"tail");
        assert_eq!((history.start(), history.end()), (5004 - 4096, 5004));
        let mut all = [0u8; 4096];
        assert_eq!(history.copy_from(history.start(), &mut all), 4096);
        assert_eq!(&all[..4092], &long[5000 - 4092..]);
        assert_eq!(&all[4092..], b"tail");
        let mut one = [0u8; 1];
        assert_eq!(history.copy_from(history.start() - 1, &mut one), 0);
    }

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn console_budget_holds_a_burst_then_refills_with_time() {
        let mut budget = ConsoleBudget::default();
        // Full for the first ten seconds: that time earns nothing.
        assert!(budget.take(CONSOLE_BUDGET_BYTES - 100, || 10 * SECOND));
        assert!(budget.take(50, || 10 * SECOND));
        assert!(
            !budget.take(51, || 10 * SECOND),
            "one byte more than the burst"
        );
        assert_eq!(budget.take_up_to(500, || 10 * SECOND), 50, "what is left");
        assert!(!budget.take(1, || 10 * SECOND));
        // Half a second earns half a second's rate, and fractions are not lost.
        assert_eq!(
            budget.take_up_to(u64::MAX, || 10 * SECOND + SECOND / 2),
            CONSOLE_BUDGET_BYTES_PER_S / 2
        );
        for step in 1..=1000 {
            let now = 10 * SECOND + SECOND / 2 + step * SECOND / 1000;
            assert!(budget.take_up_to(u64::MAX, || now) <= 9);
        }
        assert!(!budget.take(1, || 11 * SECOND + SECOND / 10_000));
        // Idle time refills up to the burst, never beyond.
        assert_eq!(
            budget.take_up_to(u64::MAX, || 1000 * SECOND),
            CONSOLE_BUDGET_BYTES
        );
    }

    /// A take the budget covers, made once the budget would have been full again: what the
    /// time before it earned beyond the cap is not credited by a later refill.
    #[test]
    fn console_budget_never_credits_time_it_spent_full() {
        let mut budget = ConsoleBudget::default();
        assert!(budget.take(CONSOLE_BUDGET_BYTES - 100, || 0));
        // Ten seconds later the budget is full again (it was 100 short, 12 ms of earning).
        assert!(budget.take(50, || 10 * SECOND));
        assert_eq!(
            budget.take_up_to(u64::MAX, || 10 * SECOND),
            CONSOLE_BUDGET_BYTES - 50,
            "the burst, less the 50 bytes just taken, not the ten seconds' earning on top"
        );
        // Before it can be full, a take needs no refill and loses nothing.
        assert!(
            budget.take_up_to(u64::MAX, || 10 * SECOND + SECOND / 2)
                <= CONSOLE_BUDGET_BYTES_PER_S / 2
        );
    }

    #[test]
    fn console_budget_refills_exactly_over_many_small_steps() {
        let mut budget = ConsoleBudget::default();
        assert!(budget.take(CONSOLE_BUDGET_BYTES, || 0));
        let mut earned = 0;
        for ms in 1..=1000 {
            earned += budget.take_up_to(u64::MAX, || ms * SECOND / 1000);
        }
        assert_eq!(
            earned, CONSOLE_BUDGET_BYTES_PER_S,
            "a second of refills, in 1000 steps"
        );
    }

    #[test]
    fn uart_bytes_beyond_the_budget_are_dropped_and_counted() {
        use crate::common::output::testing::take_lines;
        let mut console = ConsoleLine::default();
        for &byte in b"seen\n" {
            console.uart_byte(5, byte, || 0);
        }
        console.budget = ConsoleBudget::spent();
        for &byte in b"lost\n" {
            console.uart_byte(5, byte, || 0);
        }
        assert_eq!(take_lines(), ["(d5) seen"]);
        assert_eq!(console.refused_bytes, 5);
    }

    #[test]
    fn line_ends_are_found_where_a_byte_by_byte_search_finds_them() {
        let naive = |d: &[u8]| d.iter().position(|&b| b == b'\n' || b == b'\r');
        // Every position in and around a word, near-misses (0x0a/0x0d with high bits, 0x0b,
        // 0x8a) and bytes with the top bit set around them.
        for len in 0..40 {
            for hit in 0..=len {
                for (filler, mark) in [(b'a', b'\n'), (0x8a, b'\r'), (0xff, b'\n'), (0x0b, b'\r')] {
                    let mut data = alloc::vec![filler; len];
                    if hit < len {
                        data[hit] = mark;
                    }
                    assert_eq!(line_control_at(&data), naive(&data), "{data:x?}");
                }
            }
        }
        let text = b"\x0a\x0d\x8a\x8d\x0c\x0e\x09\x0b".repeat(5);
        for start in 0..text.len() {
            assert_eq!(line_control_at(&text[start..]), naive(&text[start..]));
        }
    }

    #[test]
    fn a_write_in_one_call_prints_what_the_same_bytes_one_by_one_print() {
        use crate::common::output::testing::take_lines;
        // Lines whole, split across calls, with CRs, empty, and longer than a line (wrapped
        // at a space and, without one, inside a word).
        let mut text = b"first\r\nsecond half".to_vec();
        text.extend_from_slice(b" done\n\n");
        text.extend((0..300).map(|i| {
            if i % 7 == 6 {
                b' '
            } else {
                b'a' + (i % 26) as u8
            }
        }));
        text.push(b'\n');
        text.extend(core::iter::repeat_n(b'x', 600));
        text.extend_from_slice(b"\rtail\n");
        let mut whole = ConsoleLine::default();
        whole.write(ConsoleSource::Paravirtual, 3, &text);
        let at_once = take_lines();
        let mut bytewise = ConsoleLine::default();
        for byte in &text {
            bytewise.write(ConsoleSource::Paravirtual, 3, core::slice::from_ref(byte));
        }
        assert_eq!(at_once, take_lines());
        assert_eq!(
            at_once[..3],
            ["(d3) first", "(d3) second half done", "(d3) "]
        );
        assert!(
            at_once
                .iter()
                .all(|line| line.len() <= "(d3) ".len() + CONSOLE_LINE_MAX)
        );
        assert_eq!(whole.history.end(), bytewise.history.end());
        let mut uart = ConsoleLine::default();
        for &byte in &text {
            uart.uart_byte(3, byte, || 0);
        }
        assert_eq!(at_once, take_lines());
    }

    #[test]
    fn uart_and_paravirtual_lines_never_interleave() {
        use crate::common::output::testing::take_lines;
        let mut console = ConsoleLine::default();
        console.write(ConsoleSource::Uart, 4, b"half of a UART ");
        console.write(ConsoleSource::Paravirtual, 4, b"a whole hypercall line\n");
        console.write(ConsoleSource::Uart, 4, b"line, finished\n");
        console.write(ConsoleSource::Paravirtual, 4, b"left open");
        console.flush_pending(4);
        assert_eq!(
            take_lines(),
            [
                "(d4) a whole hypercall line",
                "(d4) half of a UART line, finished",
                "(d4) left open"
            ]
        );
    }

    #[test]
    fn long_lines_are_wrapped_between_words() {
        use crate::common::output::testing::take_lines;
        let mut console = ConsoleLine::default();
        let words: Vec<String> = (0..60).map(|i| format!("word{i:02}")).collect();
        let text = words.join(" ");
        console.write(ConsoleSource::Paravirtual, 1, text.as_bytes());
        console.write(ConsoleSource::Paravirtual, 1, b"\n");
        let lines = take_lines();
        assert!(lines.len() > 1);
        let mut rejoined = Vec::new();
        for line in &lines {
            let text = line.strip_prefix("(d1) ").unwrap();
            assert!(text.len() <= CONSOLE_LINE_MAX);
            assert!(
                text.split(' ').all(|w| w.len() == 6),
                "cut in a word: {text}"
            );
            rejoined.push(text.to_string());
        }
        assert_eq!(rejoined.join(" "), text);
    }

    #[test]
    fn a_word_longer_than_a_line_is_broken_at_a_character_boundary() {
        use crate::common::output::testing::take_lines;
        let mut console = ConsoleLine::default();
        let word = "\u{e9}".repeat(200); // 400 bytes, two each
        console.write(ConsoleSource::Uart, 1, word.as_bytes());
        console.flush_pending(1);
        let lines = take_lines();
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| !l.contains("invalid")), "{lines:?}");
        assert_eq!(lines[0].len() - 5 + lines[1].len() - 5, 400);
    }
}

//! A timeline of the run (`trace=1` on the hypervisor's command line): which domain's vCPU
//! each physical CPU ran, every exit by kind and hypercall number, event-channel raises,
//! injected interrupts and upcalls, timer expiries, blocks, wake-ups and idle periods.
//!
//! Each physical CPU records into its own fixed ring of compact [`Record`]s (the oldest are
//! overwritten when it is full); [`dump`] prints them over COM1 before the result line, in
//! the form docs/hv-output-protocol.md describes, and `cargo xtask run --trace` turns that
//! into a Chrome trace-event file. When tracing is off every hook costs one load of a
//! read-mostly flag and one never-taken branch; the recording itself is out of line.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use alloc::vec::Vec;
use spin::Mutex;

use crate::common::time::read_tsc;

/// What a record says happened.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The CPU enters `domain`'s vCPU for a slice.
    VcpuIn = 1,
    /// The slice ended.
    VcpuOut = 2,
    /// An exit of the running vCPU other than a hypercall; detail: its
    /// [`crate::common::domain::stats::ExitKind`] number.
    Exit = 3,
    /// A hypercall exit; detail: the hypercall number (RAX).
    Hypercall = 4,
    /// An event-channel port of `domain` was raised; detail: the port.
    Event = 5,
    /// An interrupt (the upcall vector or an emulated APIC's) was injected; detail: vector.
    Inject = 6,
    /// A timer of `domain`'s vCPU expired.
    Timer = 7,
    /// The vCPU blocked (block, poll, HLT).
    Block = 8,
    /// The blocked vCPU was woken.
    Wake = 9,
    /// Nothing was ready: the CPU halted until the next interrupt.
    Idle = 10,
}

/// One entry of the timeline: 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Record {
    pub tsc: u64,
    pub kind: u8,
    pub vcpu: u8,
    pub domain: u16,
    pub detail: u32,
}
const _: () = assert!(core::mem::size_of::<Record>() == 16);

/// Records per CPU: 512 KiB of the hypervisor's heap, only when tracing is on.
const RING_RECORDS: usize = 32 * 1024;
/// CPUs with a ring of their own; the others share the last one (its lock keeps records
/// whole). One: the trace's readers (`cargo xtask trace`) read one ring.
const TRACED_CPUS: usize = 1;

/// One CPU's ring, and what it runs now (so exit hooks need not be told).
struct Ring {
    records: Vec<Record>,
    /// Where the next record goes.
    next: usize,
    /// Records written in all (more than the ring holds: the oldest were overwritten).
    written: u64,
    domain: u16,
    vcpu: u8,
}

impl Ring {
    fn push(&mut self, kind: Kind, domain: u16, vcpu: u8, detail: u32) {
        let record = Record {
            tsc: read_tsc(),
            kind: kind as u8,
            vcpu,
            domain,
            detail,
        };
        if let Some(slot) = self.records.get_mut(self.next) {
            *slot = record;
        } else {
            self.records.push(record);
        }
        self.next = (self.next + 1) % RING_RECORDS;
        self.written += 1;
    }

    /// The records, oldest first.
    fn in_order(&self) -> impl Iterator<Item = &Record> {
        let (newer, older) = self.records.split_at(self.next.min(self.records.len()));
        older.iter().chain(newer.iter())
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// The TSC rate, for the reader of the dump.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static RINGS: [Mutex<Option<Ring>>; TRACED_CPUS] = [const { Mutex::new(None) }; TRACED_CPUS];

/// Turns tracing on when the command line says `trace=1`, with an empty ring per CPU.
pub fn init(cmdline: &str, tsc_khz: u64) {
    TSC_KHZ.store(tsc_khz, Ordering::Relaxed);
    if !cmdline.split_whitespace().any(|word| word == "trace=1") {
        return;
    }
    for ring in &RINGS {
        let mut records = Vec::new();
        // Without the memory there is no trace, and the run goes on.
        if records.try_reserve_exact(RING_RECORDS).is_err() {
            return;
        }
        *ring.lock() = Some(Ring {
            records,
            next: 0,
            written: 0,
            domain: 0,
            vcpu: 0,
        });
    }
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether tracing is on: the one branch every hook costs.
#[inline(always)]
fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The ring of the CPU we run on (CPUs past the traced ones share the last ring).
fn this_cpu() -> &'static Mutex<Option<Ring>> {
    #[cfg(target_os = "none")]
    let index = crate::platform::percpu::this_cpu().index;
    #[cfg(not(target_os = "none"))]
    let index = 0;
    RINGS.get(index).unwrap_or(&RINGS[TRACED_CPUS - 1])
}

#[cold]
#[inline(never)]
fn record(kind: Kind, domain: Option<u32>, detail: u32) {
    if let Some(ring) = this_cpu().lock().as_mut() {
        let domain = domain.map_or(ring.domain, |id| id as u16);
        let vcpu = ring.vcpu;
        match kind {
            Kind::VcpuIn => ring.domain = domain,
            Kind::VcpuOut => ring.domain = 0,
            _ => {}
        }
        ring.push(kind, domain, vcpu, detail);
    }
}

/// The CPU enters vCPU 0 of `domain`.
#[inline(always)]
pub fn vcpu_in(domain: u32) {
    if enabled() {
        record(Kind::VcpuIn, Some(domain), 0);
    }
}

/// The slice of `domain`'s vCPU ended.
#[inline(always)]
pub fn vcpu_out(domain: u32) {
    if enabled() {
        record(Kind::VcpuOut, Some(domain), 0);
    }
}

/// An exit of the running vCPU, by [`crate::common::domain::stats::ExitKind`] number.
#[inline(always)]
pub fn exit(kind: u32) {
    if enabled() {
        record(Kind::Exit, None, kind);
    }
}

/// A hypercall exit of the running vCPU, hypercall `nr` (numbers past `u32` are recorded
/// as `u32::MAX`).
#[inline(always)]
pub fn hypercall(nr: u64) {
    if enabled() {
        record(Kind::Hypercall, None, u32::try_from(nr).unwrap_or(u32::MAX));
    }
}

/// `port` of `domain` was raised.
#[inline(always)]
pub fn event(domain: u32, port: u32) {
    if enabled() {
        record(Kind::Event, Some(domain), port);
    }
}

/// `vector` was injected into `domain`'s vCPU.
#[inline(always)]
pub fn inject(domain: u32, vector: u8) {
    if enabled() {
        record(Kind::Inject, Some(domain), u32::from(vector));
    }
}

/// A timer of `domain`'s vCPU expired.
#[inline(always)]
pub fn timer(domain: u32) {
    if enabled() {
        record(Kind::Timer, Some(domain), 0);
    }
}

/// `domain`'s vCPU blocked.
#[inline(always)]
pub fn block(domain: u32) {
    if enabled() {
        record(Kind::Block, Some(domain), 0);
    }
}

/// `domain`'s vCPU was woken.
#[inline(always)]
pub fn wake(domain: u32) {
    if enabled() {
        record(Kind::Wake, Some(domain), 0);
    }
}

/// The CPU halts: nothing is ready.
#[inline(always)]
pub fn idle() {
    if enabled() {
        record(Kind::Idle, Some(0), 0);
    }
}

/// Records per dump line.
const WORDS_PER_LINE: usize = 16;

/// One record as a dump word: `kind.domain.vcpu.detail.delta` in hex, `delta` the TSC ticks
/// since the previous record of the CPU (the first record's: since TSC 0).
fn word(record: &Record, previous_tsc: u64, out: &mut dyn core::fmt::Write) -> core::fmt::Result {
    write!(
        out,
        "{:x}.{:x}.{:x}.{:x}.{:x}",
        record.kind,
        record.domain,
        record.vcpu,
        record.detail,
        record.tsc.wrapping_sub(previous_tsc)
    )
}

/// Prints every CPU's ring (docs/hv-output-protocol.md, "Trace"): a header line per CPU,
/// lines of records, an end line. Does nothing when tracing is off.
pub fn dump(line: &mut dyn FnMut(core::fmt::Arguments<'_>)) {
    if !enabled() {
        return;
    }
    let tsc_khz = TSC_KHZ.load(Ordering::Relaxed);
    ENABLED.store(false, Ordering::Relaxed);
    for (cpu, ring) in RINGS.iter().enumerate() {
        let guard = ring.lock();
        let Some(ring) = guard.as_ref() else {
            continue;
        };
        let kept = ring.records.len() as u64;
        line(format_args!(
            "lamina: trace: cpu={cpu} tsc_khz={tsc_khz} records={kept} lost={}",
            ring.written - kept
        ));
        let mut previous = 0;
        let mut text = alloc::string::String::new();
        let records: Vec<&Record> = ring.in_order().collect();
        for chunk in records.chunks(WORDS_PER_LINE) {
            text.clear();
            for record in chunk {
                if !text.is_empty() {
                    text.push(' ');
                }
                let _ = word(record, previous, &mut text);
                previous = record.tsc;
            }
            line(format_args!("lamina: trace: {text}"));
        }
        line(format_args!("lamina: trace: end cpu={cpu}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    #[test]
    fn words_carry_every_field_and_the_tsc_delta() {
        let record = Record {
            tsc: 0x1234,
            kind: Kind::Hypercall as u8,
            vcpu: 0,
            domain: 2,
            detail: 5,
        };
        let mut text = String::new();
        word(&record, 0x1200, &mut text).unwrap();
        assert_eq!(text, "4.2.0.5.34");
    }

    #[test]
    fn without_trace_1_nothing_is_recorded_or_dumped() {
        init("loglevel=debug tracing=1", 1_000_000);
        vcpu_in(1);
        exit(1);
        hypercall(3);
        vcpu_out(1);
        let mut lines = 0;
        dump(&mut |_| lines += 1);
        assert_eq!(lines, 0);
        assert!(RINGS[0].lock().is_none(), "no ring allocated");
    }

    #[test]
    fn a_full_ring_keeps_the_newest_records_in_order() {
        let mut ring = Ring {
            records: Vec::new(),
            next: 0,
            written: 0,
            domain: 0,
            vcpu: 0,
        };
        for i in 0..RING_RECORDS + 3 {
            ring.push(Kind::Event, 1, 0, i as u32);
        }
        assert_eq!(ring.records.len(), RING_RECORDS);
        assert_eq!(ring.written, RING_RECORDS as u64 + 3);
        let details: Vec<u32> = ring.in_order().map(|r| r.detail).collect();
        assert_eq!(details[0], 3);
        assert_eq!(details[RING_RECORDS - 1], RING_RECORDS as u32 + 2);
        assert!(details.windows(2).all(|w| w[0] + 1 == w[1]));
    }
}

//! The hypervisor's timeline (`trace=1`): decoding its dump from the serial log
//! (docs/hv-output-protocol.md, "Trace") and writing it in the Chrome trace-event JSON
//! format, which Perfetto UI (https://ui.perfetto.dev) and chrome://tracing open.
//!
//! In the file, process 0 is the machine, one track per physical CPU, holding a slice per
//! vCPU run (`d<id> <name> v<vcpu>`) and instant events for exits (by kind and hypercall),
//! injected interrupts, timer expiries and idle halts; each domain is a process of its own
//! whose vCPU tracks hold its blocked periods and the events raised on its ports.

use std::collections::BTreeMap;

use lamina_abi::Hypercall;
use lamina_abi::stats::exit_kind;
use serde_json::{Value, json};

use crate::serial_log::SerialLog;

/// Where the dump's lines start.
pub const LINE_PREFIX: &str = "lamina: trace: ";

/// Record kinds, as `hv/src/common/trace.rs` numbers them.
mod kind {
    pub const VCPU_IN: u8 = 1;
    pub const VCPU_OUT: u8 = 2;
    pub const EXIT: u8 = 3;
    pub const HYPERCALL: u8 = 4;
    pub const EVENT: u8 = 5;
    pub const INJECT: u8 = 6;
    pub const TIMER: u8 = 7;
    pub const BLOCK: u8 = 8;
    pub const WAKE: u8 = 9;
    pub const IDLE: u8 = 10;
}

/// Exit kind names by the ABI's numbering (docs/abi.md 15), as the summary prints them.
const EXIT_NAMES: [&str; exit_kind::COUNT] = [
    "hypercall",
    "cpuid",
    "hlt",
    "io_uart",
    "io_other",
    "rdmsr",
    "wrmsr",
    "invalid_opcode",
    "npf",
    "triple_fault",
    "interrupt",
    "irq_window",
    "other",
];

/// One decoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub tsc: u64,
    pub kind: u8,
    pub domain: u16,
    pub vcpu: u8,
    pub detail: u32,
}

/// One physical CPU's records, oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTrace {
    pub cpu: u32,
    pub tsc_khz: u64,
    /// Records the ring had overwritten before the dump.
    pub lost: u64,
    pub records: Vec<Record>,
}

/// `key=value` of a header word.
fn header_value(line: &str, key: &str) -> Result<u64, String> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| format!("trace header without {key}=: {line}"))
}

/// Decodes `kind.domain.vcpu.detail.delta` (hex); `previous` is the last record's TSC.
fn decode_word(word: &str, previous: u64) -> Result<Record, String> {
    let fields: Vec<u64> = word
        .split('.')
        .map(|field| u64::from_str_radix(field, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad trace record {word:?}"))?;
    let [kind, domain, vcpu, detail, delta] = fields[..] else {
        return Err(format!("bad trace record {word:?}"));
    };
    let narrow = |value: u64| format!("trace record {word:?}: {value:#x} out of range");
    Ok(Record {
        tsc: previous.wrapping_add(delta),
        kind: u8::try_from(kind).map_err(|_| narrow(kind))?,
        domain: u16::try_from(domain).map_err(|_| narrow(domain))?,
        vcpu: u8::try_from(vcpu).map_err(|_| narrow(vcpu))?,
        detail: u32::try_from(detail).map_err(|_| narrow(detail))?,
    })
}

/// Every CPU's trace in the log; an empty list when the run did not trace.
pub fn parse(log: &SerialLog) -> Result<Vec<CpuTrace>, String> {
    let mut traces: Vec<CpuTrace> = Vec::new();
    let mut open = false;
    for line in &log.lines {
        let Some(rest) = line.strip_prefix(LINE_PREFIX) else {
            continue;
        };
        if rest.starts_with("cpu=") {
            traces.push(CpuTrace {
                cpu: u32::try_from(header_value(rest, "cpu")?).map_err(|e| e.to_string())?,
                tsc_khz: header_value(rest, "tsc_khz")?,
                lost: header_value(rest, "lost")?,
                records: Vec::new(),
            });
            open = true;
        } else if rest.starts_with("end") {
            open = false;
        } else {
            let trace = match traces.last_mut() {
                Some(trace) if open => trace,
                _ => return Err(format!("trace records outside a CPU's dump: {line}")),
            };
            for word in rest.split_whitespace() {
                let previous = trace.records.last().map_or(0, |r| r.tsc);
                trace.records.push(decode_word(word, previous)?);
            }
        }
    }
    if open {
        return Err("the trace dump has no end line (cut off?)".to_string());
    }
    Ok(traces)
}

/// Domain names by id, from `lamina: domain <id> <name> started ...`.
pub fn domain_names(log: &SerialLog) -> BTreeMap<u16, String> {
    log.lines
        .iter()
        .filter_map(|line| {
            let rest = line.strip_prefix("lamina: domain ")?;
            let mut words = rest.split_whitespace();
            let id = words.next()?.parse().ok()?;
            let name = words.next()?;
            (words.next() == Some("started")).then(|| (id, name.to_string()))
        })
        .collect()
}

fn hypercall_name(nr: u32) -> String {
    Hypercall::ALL
        .iter()
        .find(|call| **call as u32 == nr)
        .map_or_else(|| format!("hypercall {nr}"), |call| call.name().to_string())
}

/// The trace-event JSON: `{"traceEvents": [...], "displayTimeUnit": "ns"}`.
pub fn chrome_json(traces: &[CpuTrace], names: &BTreeMap<u16, String>) -> Value {
    let mut events = vec![json!({
        "name": "process_name", "ph": "M", "pid": 0, "args": {"name": "Lamina: physical CPUs"}
    })];
    for (id, name) in names {
        events.push(json!({
            "name": "process_name", "ph": "M", "pid": id, "args": {"name": format!("d{id} {name}")}
        }));
    }
    let label = |domain: u16| match names.get(&domain) {
        Some(name) => format!("d{domain} {name}"),
        None => format!("d{domain}"),
    };
    for trace in traces {
        let khz = trace.tsc_khz.max(1) as f64;
        let micros = |tsc: u64| tsc as f64 * 1000.0 / khz;
        let cpu = trace.cpu;
        events.push(json!({
            "name": "thread_name", "ph": "M", "pid": 0, "tid": cpu,
            "args": {"name": format!("CPU {cpu}")}
        }));
        let instant = |name: String, cat: &str, pid: u32, tid: u32, record: &Record| {
            json!({
                "name": name, "cat": cat, "ph": "i", "s": "t", "pid": pid, "tid": tid,
                "ts": micros(record.tsc), "args": {"domain": record.domain, "detail": record.detail}
            })
        };
        let mut running: Option<&Record> = None;
        let mut blocked: BTreeMap<(u16, u8), &Record> = BTreeMap::new();
        let records = &trace.records;
        for record in records {
            match record.kind {
                kind::VCPU_IN => running = Some(record),
                kind::VCPU_OUT => {
                    if let Some(start) = running.take() {
                        events.push(json!({
                            "name": format!("{} v{}", label(start.domain), start.vcpu),
                            "cat": "vcpu", "ph": "X", "pid": 0, "tid": cpu,
                            "ts": micros(start.tsc),
                            "dur": micros(record.tsc) - micros(start.tsc),
                            "args": {"domain": start.domain, "vcpu": start.vcpu}
                        }));
                    }
                }
                kind::EXIT => {
                    let name = EXIT_NAMES.get(record.detail as usize).unwrap_or(&"unknown");
                    events.push(instant(format!("exit {name}"), "exit", 0, cpu, record));
                }
                kind::HYPERCALL => events.push(instant(
                    format!("hypercall {}", hypercall_name(record.detail)),
                    "exit",
                    0,
                    cpu,
                    record,
                )),
                kind::EVENT => events.push(instant(
                    format!("event port {}", record.detail),
                    "event",
                    u32::from(record.domain),
                    u32::from(record.vcpu),
                    record,
                )),
                kind::INJECT => events.push(instant(
                    format!(
                        "inject vector {:#x} into {}",
                        record.detail,
                        label(record.domain)
                    ),
                    "interrupt",
                    0,
                    cpu,
                    record,
                )),
                kind::TIMER => events.push(instant(
                    format!("timer of {}", label(record.domain)),
                    "timer",
                    0,
                    cpu,
                    record,
                )),
                kind::BLOCK => {
                    blocked.insert((record.domain, record.vcpu), record);
                }
                kind::WAKE => {
                    if let Some(start) = blocked.remove(&(record.domain, record.vcpu)) {
                        events.push(json!({
                            "name": "blocked", "cat": "block", "ph": "X",
                            "pid": record.domain, "tid": record.vcpu,
                            "ts": micros(start.tsc),
                            "dur": micros(record.tsc) - micros(start.tsc)
                        }));
                    }
                    events.push(instant(
                        format!("wake {}", label(record.domain)),
                        "block",
                        0,
                        cpu,
                        record,
                    ));
                }
                kind::IDLE => events.push(instant("idle".to_string(), "idle", 0, cpu, record)),
                _ => {}
            }
        }
    }
    json!({"traceEvents": events, "displayTimeUnit": "ns"})
}

/// The vCPU slices of CPU track `cpu` in a trace-event file: (start, duration, domain),
/// sorted by start.
pub fn cpu_slices(file: &Value, cpu: u64) -> Result<Vec<(f64, f64, u64)>, String> {
    let events = file
        .get("traceEvents")
        .and_then(Value::as_array)
        .ok_or("no traceEvents array")?;
    let mut slices = Vec::new();
    for event in events {
        let is_slice = event.get("ph") == Some(&json!("X"))
            && event.get("pid") == Some(&json!(0))
            && event.get("tid") == Some(&json!(cpu));
        if !is_slice {
            continue;
        }
        let number = |key: &str| event.get(key).and_then(Value::as_f64);
        let domain = event
            .get("args")
            .and_then(|args| args.get("domain"))
            .and_then(Value::as_u64);
        match (number("ts"), number("dur"), domain) {
            (Some(ts), Some(dur), Some(domain)) => slices.push((ts, dur, domain)),
            _ => return Err(format!("a vCPU slice without ts, dur or domain: {event}")),
        }
    }
    slices.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(slices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_names_follow_the_abi_numbering() {
        assert_eq!(EXIT_NAMES[exit_kind::HYPERCALL], "hypercall");
        assert_eq!(EXIT_NAMES[exit_kind::NESTED_PAGE_FAULT], "npf");
        assert_eq!(EXIT_NAMES[exit_kind::INTERRUPT_WINDOW], "irq_window");
        assert_eq!(EXIT_NAMES[exit_kind::OTHER], "other");
    }

    const DUMP: &str = "\
lamina: domain 1 ping started mem=4M
lamina: domain 2 pong started mem=4M
lamina: trace: cpu=0 tsc_khz=1000000 records=9 lost=0
lamina: trace: 1.1.0.0.3e8 3.1.0.1.3e8 4.1.0.3.0 5.2.0.2.a 8.1.0.0.a
lamina: trace: 2.1.0.0.a 9.2.0.0.a 1.2.0.0.a 2.2.0.0.7d0
lamina: trace: end cpu=0
lamina: result: success
";

    #[test]
    fn a_dump_decodes_into_records_and_trace_events() {
        let log = SerialLog::from_bytes(DUMP.as_bytes());
        let traces = parse(&log).unwrap();
        assert_eq!(traces.len(), 1);
        let records = &traces[0].records;
        assert_eq!(records.len(), 9);
        assert_eq!(records[0].tsc, 1000);
        assert_eq!(records[1].tsc, 2000);
        assert_eq!(records[2].kind, kind::HYPERCALL);
        assert_eq!(records[2].detail, 3);
        assert_eq!(records[8].tsc, 2000 + 50 + 2000);

        let file = chrome_json(&traces, &domain_names(&log));
        let slices = cpu_slices(&file, 0).unwrap();
        assert_eq!(slices.len(), 2);
        assert_eq!(slices[0].2, 1);
        assert_eq!(slices[1].2, 2);
        assert!(
            (slices[1].1 - 2.0).abs() < 1e-9,
            "2000 ticks at 1 GHz: 2 us"
        );
        let text = file.to_string();
        assert!(text.contains("\"hypercall event_channel_op\""), "{text}");
        assert!(text.contains("\"exit cpuid\""), "{text}");
        assert!(text.contains("\"d1 ping v0\""));
        assert!(
            !text.contains("\"blocked\""),
            "ping blocked but was never woken here"
        );
    }

    #[test]
    fn a_cut_dump_is_an_error() {
        let cut = DUMP.replace("lamina: trace: end cpu=0\n", "");
        assert!(parse(&SerialLog::from_bytes(cut.as_bytes())).is_err());
        let garbled = DUMP.replace("4.1.0.3.0", "4.1.zz.3.0");
        assert!(parse(&SerialLog::from_bytes(garbled.as_bytes())).is_err());
    }
}

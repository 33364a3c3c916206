//! `trace-ping-pong`: ping and pong with the hypervisor's timeline on (`trace=1`, as
//! `cargo xtask run --trace` boots it); the dump is decoded into `trace.json` (Chrome
//! trace-event format), which is read back and must show the two domains taking turns on the
//! CPU, each woken by events the other raised.

use std::fs;

use serde_json::Value;

use crate::emulator::{RunExtras, RunRecord, Vendor};
use crate::error::{Context as _, Result};
use crate::serial_log::{HvResult, LinePattern};
use crate::trace;

use super::driven::{Context, Driven};
use super::{NO_PANIC, PING_ERROR, PONG_ERROR, Scenario, ping_pong_pair};

/// Ping and pong as domains 1 and 2, few enough messages that the dump stays small on Bochs'
/// paced UART.
const MODULES: [super::ModuleSpec; 2] =
    ping_pong_pair("ping role=ping peer=2 messages=2000 mem=4M");
/// The fewest vCPU slices each domain must have (a turn per batch of 16 messages is ~125).
const MIN_SLICES: usize = 50;
/// The least share of consecutive slices that switch domain.
const MIN_ALTERNATION: f64 = 0.9;

pub const TRACE_PING_PONG: Driven = Driven {
    scenario: Scenario {
        name: "trace-ping-pong",
        modules: &MODULES,
        expect: HvResult::Success,
        required_lines: &[
            LinePattern::Contains("lamina: domain 1 ping end=poweroff"),
            LinePattern::Contains("lamina: domain 2 pong end=poweroff"),
            LinePattern::Contains("lamina: trace: cpu=0 "),
        ],
        forbidden_lines: &[NO_PANIC, PING_ERROR, PONG_ERROR],
        check: None,
    },
    vendors: &Vendor::ALL,
    drive,
};

fn drive(driven: &Driven, context: &Context<'_>) -> Result<(RunRecord, Vec<String>)> {
    let record = driven.boot(context, "trace=1", true, RunExtras::default())?;
    let traces = match trace::parse(&record.log) {
        Ok(traces) => traces,
        Err(problem) => return Ok((record, vec![problem])),
    };
    let path = context.dir.path.join("trace.json");
    let file = trace::chrome_json(&traces, &trace::domain_names(&record.log));
    fs::write(&path, file.to_string()).context(|| format!("writing {}", path.display()))?;
    // Judged from the file, as a viewer reads it.
    let text = fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
    let problems = match serde_json::from_str::<Value>(&text) {
        Ok(file) => check(&file),
        Err(err) => vec![format!("{}: not JSON: {err}", path.display())],
    };
    Ok((record, problems))
}

/// The two domains take turns on CPU 0, and events reach both.
fn check(file: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let slices = match trace::cpu_slices(file, 0) {
        Ok(slices) => slices,
        Err(problem) => return vec![problem],
    };
    for domain in [1, 2] {
        let count = slices.iter().filter(|s| s.2 == domain).count();
        if count < MIN_SLICES {
            problems.push(format!(
                "domain {domain} ran {count} slices, fewer than {MIN_SLICES}"
            ));
        }
    }
    if let Some(pair) = slices.windows(2).find(|w| w[0].0 + w[0].1 > w[1].0 + 1e-6) {
        problems.push(format!("vCPU slices overlap on CPU 0: {pair:?}"));
    }
    let pairs = slices.len().saturating_sub(1).max(1);
    let switches = slices.windows(2).filter(|w| w[0].2 != w[1].2).count();
    let alternation = switches as f64 / pairs as f64;
    if alternation < MIN_ALTERNATION {
        problems.push(format!(
            "the domains do not alternate: {switches} of {pairs} consecutive slices switch domain"
        ));
    }
    let events = file["traceEvents"].as_array().cloned().unwrap_or_default();
    let named = |prefix: &str, pid: u64| {
        events
            .iter()
            .any(|e| e["name"].as_str().is_some_and(|n| n.starts_with(prefix)) && e["pid"] == pid)
    };
    for domain in [1, 2] {
        if !named("event port ", domain) {
            problems.push(format!("no event raised on a port of domain {domain}"));
        }
    }
    if !named("hypercall event_channel_op", 0) {
        problems.push("no event_channel_op hypercall exit".to_string());
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(domains: &[u64]) -> Value {
        let mut events: Vec<Value> = domains
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                json!({"ph": "X", "pid": 0, "tid": 0, "ts": i as f64 * 10.0, "dur": 5.0,
                       "args": {"domain": d}})
            })
            .collect();
        for pid in [1, 2] {
            events.push(json!({"ph": "i", "pid": pid, "name": "event port 2"}));
        }
        events.push(json!({"ph": "i", "pid": 0, "name": "hypercall event_channel_op"}));
        json!({ "traceEvents": events })
    }

    #[test]
    fn alternating_domains_pass_and_runs_of_one_fail() {
        let alternating: Vec<u64> = (0..200).map(|i| 1 + i % 2).collect();
        assert_eq!(check(&file(&alternating)), Vec::<String>::new());
        let runs: Vec<u64> = (0..200).map(|i| 1 + (i / 10) % 2).collect();
        assert_eq!(check(&file(&runs)).len(), 1, "{:?}", check(&file(&runs)));
        let too_few: Vec<u64> = (0..20).map(|i| 1 + i % 2).collect();
        assert_eq!(check(&file(&too_few)).len(), 2);
    }
}

//! `resource-hog`: a hostile domain takes every port and grant it may and storms the
//! hypervisor with its dearest calls, beside a neighbour that counts the work it gets done in
//! a fixed time (`sample-domains`' `hog`, `neighbour` and `quiet` roles). In one run the
//! neighbour works for two phases of the same length: first beside `quiet`, a domain of the
//! same weight that only computes, then beside the hog. The second count must be within
//! [`TOLERANCE`] of the first: the hog may take its fair share of the CPU and nothing of the
//! neighbour's. The hog's own line must show every limit it ran into with the documented error
//! (docs/abi.md 6.1, "Per-domain limits").

use super::domains::memory_balanced;
use crate::serial_log::SerialLog;

/// How far the neighbour's work beside the hog may fall short of its work beside the quiet
/// domain (relative).
pub const TOLERANCE: f64 = 0.10;

/// The hog's limits as its result line reports them (docs/abi.md 6.1): every port but port 0,
/// the console port and the one it sleeps on; every grant reference; every domain-control
/// operation refused.
const HOG_LIMITS: [&str; 7] = [
    "ports=1021",
    "ports_error=ENOSPC",
    "grants=256",
    "grants_error=ENOSPC",
    "domctl_eperm=6",
    "periodic_below_min=EINVAL",
    "multicall_over_max=E2BIG",
];

/// Field `key=` of the first line of domain `id` starting with `prefix`, as a number.
fn field(log: &SerialLog, id: u32, prefix: &str, key: &str) -> Result<f64, String> {
    let line = log
        .guest_lines(id)
        .find_map(|line| line.strip_prefix(prefix))
        .ok_or_else(|| format!("no line `(d{id}) {prefix}...`"))?;
    line.split_whitespace()
        .filter_map(|word| word.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, value)| value.parse().ok())
        .ok_or_else(|| format!("(d{id}) {prefix}... has no number {key}="))
}

/// The neighbour (domain 1) did as much beside the hog (3) as beside the quiet domain (2);
/// the hog hit each limit with its error and the console budget refused it.
pub fn check_resource_hog(log: &SerialLog) -> Result<String, String> {
    let quiet = field(log, 1, "neighbour: result: ", "beside_quiet")?;
    let hog = field(log, 1, "neighbour: result: ", "beside_hog")?;
    if quiet <= 0.0 {
        return Err(format!(
            "the neighbour did no work beside the quiet domain ({quiet})"
        ));
    }
    let ratio = hog / quiet;
    let hog_line = log
        .guest_lines(3)
        .find_map(|line| line.strip_prefix("hog: result: "))
        .ok_or("no `(d3) hog: result:` line")?;
    let mut problems: Vec<String> = HOG_LIMITS
        .iter()
        .filter(|limit| !hog_line.split_whitespace().any(|word| word == **limit))
        .map(|limit| format!("the hog's line lacks {limit}"))
        .collect();
    let eagain = field(log, 3, "hog: storm: ", "console_eagain")?;
    if eagain < 1.0 {
        problems.push("the console budget never refused the hog (console_eagain=0)".into());
    }
    let multicalls = field(log, 3, "hog: storm: ", "multicalls")?;
    let report = format!(
        "neighbour's work beside the hog {hog:.0} rounds, beside a quiet domain {quiet:.0}: {:.1}% ({:+.1}%); the hog ran {multicalls:.0} multicalls of 64, was refused {eagain:.0} console writes, {}",
        ratio * 100.0,
        (ratio - 1.0) * 100.0,
        HOG_LIMITS.join(" "),
    );
    if ratio < 1.0 - TOLERANCE {
        problems.push(format!(
            "the neighbour lost more than {:.0}% of its work to the hog",
            TOLERANCE * 100.0
        ));
    }
    let memory = memory_balanced(log)?;
    if problems.is_empty() {
        Ok(format!("{report}; {memory}"))
    } else {
        Err(format!("{}; {report}", problems.join("; ")))
    }
}

//! What the benchmark measures, as data: figures with the guest's two decimals, one
//! measurement per operation and vendor, and their report order. The benchmark run
//! (`bench.rs`) produces them; the chart (`chart.rs`) and the CSV read them.

use std::fmt;

/// A figure with two decimals, as the guest prints it: `Figure(12345)` is 123.45.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Figure(pub u64);

impl Figure {
    /// Parses `123.45`, `123.4` or `123`.
    pub fn parse(text: &str) -> Option<Figure> {
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        if whole.is_empty()
            || fraction.len() > 2
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || !fraction.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let whole: u64 = whole.parse().ok()?;
        let fraction: u64 = match fraction.len() {
            0 => 0,
            1 => fraction.parse::<u64>().ok()? * 10,
            _ => fraction.parse().ok()?,
        };
        whole.checked_mul(100)?.checked_add(fraction).map(Figure)
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / 100.0
    }
}

impl fmt::Display for Figure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

/// One operation measured on one vendor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measurement {
    pub op: String,
    pub group: String,
    /// `pv` or `trap`.
    pub path: String,
    pub vendor: String,
    pub iterations: u64,
    /// TSC ticks per operation: instructions, guest and hypervisor, under -icount and Bochs.
    /// `None` when skipped.
    pub instructions: Option<Figure>,
    /// `None` when skipped or when the hypervisor has no `stats_op`.
    pub exits: Option<Figure>,
    /// Ticks per operation the vCPU spent blocked (not in `instructions`).
    pub blocked: Option<Figure>,
    /// Why the operation was not measured.
    pub skipped: Option<String>,
}

impl Measurement {
    pub fn key(&self) -> (&str, &str) {
        (&self.op, &self.vendor)
    }
}

/// Measurements in report order: by operation as the guest printed them, then by vendor.
pub fn sorted(measurements: &[Measurement]) -> Vec<&Measurement> {
    let mut order: Vec<&str> = Vec::new();
    for m in measurements {
        if !order.contains(&m.op.as_str()) {
            order.push(&m.op);
        }
    }
    let mut sorted: Vec<&Measurement> = measurements.iter().collect();
    sorted.sort_by_key(|m| {
        (
            order
                .iter()
                .position(|op| *op == m.op)
                .unwrap_or(usize::MAX),
            m.vendor.clone(),
        )
    });
    sorted
}

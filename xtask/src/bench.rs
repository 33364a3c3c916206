//! `cargo xtask bench`: boots the benchmark guest (`bench/`, `lamina-bench`) under QEMU with
//! `-icount shift=0` (AMD-V) and under Bochs (VT-x), where the TSC counts emulated
//! instructions, reads its `BENCH` lines, and
//! - prints a table (operation, group, path, instructions per operation, exits per operation,
//!   vendor),
//! - writes `target/lamina/bench.csv` and the chart `target/lamina/bench.svg` ([`crate::chart`]),
//! - with `--check`, compares with the committed baseline `bench/baseline.csv` and fails when
//!   a figure got more than [`TOLERANCE_PERCENT`] worse (higher).
//!
//! Figures keep the guest's two decimals as integers ([`Figure`]), so two runs, the CSV and
//! the baseline compare exactly. `cargo xtask test` runs a small instance of the same
//! benchmark on each vendor ([`fast_check`]) and holds it against the same baseline.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use crate::emulator::{self, RunDir, RunOutcome, RunRecord, Streaming, Vendor};
use crate::error::{Context, Result, failed};
use crate::iso::BootModule;
use crate::measurement::{Figure, Measurement, sorted};
use crate::report::{Judgement, Status, Table};
use crate::serial_log::SerialLog;
use crate::workspace::{self, Artifact};
use crate::{build_images, chart, tools};

/// The guest's domain name (its module command line starts with it).
pub const DOMAIN_NAME: &str = "lamina-bench";
/// The second module: the same guest in `pong` mode, `event_pingpong`'s partner.
pub const PONG_NAME: &str = "pong";
/// Domain ids count from 1 in boot-module order: the benchmark first, then pong.
pub const BENCH_DOMAIN_ID: u32 = 1;
pub const PONG_DOMAIN_ID: u32 = 2;
/// Iterations of a full run (the guest's default too).
pub const DEFAULT_ITERATIONS: u64 = 2000;
/// Iterations of the subset `cargo xtask test` runs.
pub const FAST_ITERATIONS: u64 = 200;
/// Name of the subset in the `cargo xtask test` table (and for `--filter`).
pub const FAST_NAME: &str = "bench-fast";
/// How much worse (higher) than the baseline a figure may get.
pub const TOLERANCE_PERCENT: u64 = 10;

/// The committed baseline.
pub fn baseline_path() -> PathBuf {
    workspace::root().join("bench").join("baseline.csv")
}

/// What `cargo xtask bench` was asked to do.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub vendors: Vec<Vendor>,
    pub iterations: u64,
    /// Compare with the baseline; fail on a regression.
    pub check: bool,
    /// Overrides the wall-clock limit per run.
    pub timeout: Option<Duration>,
    /// Stream the serial consoles.
    pub verbose: bool,
    /// The hypervisor's command line, e.g. `spec-ctrl=none` to measure without the defences.
    pub hv_cmdline: String,
    /// Only these groups (`--filter`); None: all.
    pub groups: Option<Vec<String>>,
}

/// The groups the main run measures (`groups=` of the guest; `cpuid` comes with `hypercall`,
/// `idle` with `events`).
pub const MAIN_GROUPS: [&str; 9] = [
    "hypercall",
    "cpuid",
    "multicall",
    "time",
    "events",
    "idle",
    "timer",
    "console",
    "pingpong",
];

/// The groups measured by runs of their own: `smp`, `smp2`, `smp4`, and `scale` (the runs
/// with idle domains).
const RUN_GROUPS: [&str; 4] = ["smp", "smp2", "smp4", "scale"];

/// Every group `--filter` accepts: the main run's and the runs' own.
pub fn groups() -> impl Iterator<Item = &'static str> {
    MAIN_GROUPS.into_iter().chain(RUN_GROUPS)
}

impl Run {
    /// Whether `groups` (`--filter`; None: all) asks for anything of this run, and the
    /// guest's `groups=` for the main run when only some of its groups are asked for.
    fn selected(self, groups: Option<&[String]>) -> Option<Option<String>> {
        let Some(groups) = groups else {
            return Some(None);
        };
        let has = |name: &str| groups.iter().any(|g| g == name);
        match self {
            Run::Main => {
                let main: Vec<&str> = MAIN_GROUPS.into_iter().filter(|g| has(g)).collect();
                (!main.is_empty()).then(|| Some(main.join(",")))
            }
            Run::Smp => has("smp").then_some(None),
            Run::Smp2 => has("smp2").then_some(None),
            Run::Smp4 => has("smp4").then_some(None),
            Run::Idle(_) => has("scale").then_some(None),
        }
    }
}

/// `-` for a figure that is not there.
fn show(figure: Option<Figure>) -> String {
    figure.map_or_else(|| "-".to_string(), |f| f.to_string())
}

/// Reads one guest line; `Ok(None)` when it is not a `BENCH` line.
pub fn parse_line(line: &str, vendor: &str) -> std::result::Result<Option<Measurement>, String> {
    let Some(rest) = line.strip_prefix("BENCH ") else {
        return Ok(None);
    };
    let mut fields = Vec::new();
    for word in rest.split_whitespace() {
        let (key, value) = word
            .split_once('=')
            .ok_or_else(|| format!("`{word}` is not key=value in {line:?}"))?;
        fields.push((key, value));
    }
    let get = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let need = |key: &str| get(key).ok_or_else(|| format!("no {key}= in {line:?}"));
    let figure = |key: &str| -> std::result::Result<Option<Figure>, String> {
        match get(key) {
            None | Some("-") => Ok(None),
            Some(text) => Figure::parse(text)
                .map(Some)
                .ok_or_else(|| format!("{key}={text} is not a number in {line:?}")),
        }
    };
    let path = need("path")?;
    if path != "pv" && path != "trap" {
        return Err(format!("path={path} is neither pv nor trap in {line:?}"));
    }
    let iterations = need("iterations")?;
    let iterations = iterations
        .parse()
        .map_err(|_| format!("iterations={iterations} is not a count in {line:?}"))?;
    let skipped = get("skipped").map(str::to_string);
    let instructions = figure("tsc_per_op")?;
    if instructions.is_none() && skipped.is_none() {
        return Err(format!("no tsc_per_op= in {line:?}"));
    }
    Ok(Some(Measurement {
        op: need("op")?.to_string(),
        group: need("group")?.to_string(),
        path: path.to_string(),
        vendor: vendor.to_string(),
        iterations,
        instructions,
        exits: figure("exits_per_op")?,
        blocked: figure("blocked_tsc_per_op")?,
        skipped,
    }))
}

/// The measurements of a finished run, or why there are none: the hypervisor must report
/// success and the guest must not have printed an error. When `event_pingpong` was measured,
/// its partner (the pong domain) must have powered off without printing an error too.
pub fn parse_log(log: &SerialLog, vendor: Vendor) -> std::result::Result<Vec<Measurement>, String> {
    let id = log
        .domain_id(DOMAIN_NAME)
        .ok_or_else(|| format!("no `lamina: domain <ID> {DOMAIN_NAME} started` line"))?;
    let mut measurements: Vec<Measurement> = Vec::new();
    let mut errors = Vec::new();
    for line in log.guest_lines(id) {
        if let Some(error) = line.strip_prefix("bench: error: ") {
            errors.push(error.to_string());
        }
        if let Some(measurement) = parse_line(line, vendor.name())? {
            if measurements.iter().any(|m| m.op == measurement.op) {
                return Err(format!("{} reported twice", measurement.op));
            }
            measurements.push(measurement);
        }
    }
    let pong = log.domain_id(PONG_NAME);
    if let Some(pong) = pong {
        for line in log.guest_lines(pong) {
            if let Some(error) = line.strip_prefix("pong: error: ") {
                errors.push(format!("{PONG_NAME}: {error}"));
            }
        }
    }
    if !errors.is_empty() {
        return Err(format!("the guest reported: {}", errors.join("; ")));
    }
    match log.end_of(id) {
        Some("poweroff") => {}
        Some(end) => return Err(format!("the guest ended with {end}, not poweroff")),
        None => return Err("the guest did not end (no summary line)".to_string()),
    }
    let pingpong_measured = measurements
        .iter()
        .any(|m| m.group == "pingpong" && m.skipped.is_none());
    if pingpong_measured {
        let pong = pong.ok_or_else(|| {
            format!(
                "event_pingpong was measured, but no `lamina: domain <ID> {PONG_NAME} started` line"
            )
        })?;
        match log.end_of(pong) {
            Some("poweroff") => {}
            Some(end) => return Err(format!("{PONG_NAME} ended with {end}, not poweroff")),
            None => return Err(format!("{PONG_NAME} did not end (no summary line)")),
        }
    }
    if measurements.is_empty() {
        return Err("no BENCH lines".to_string());
    }
    measurements.extend(hypervisor_rows(log, id, vendor));
    Ok(measurements)
}

/// The value of `key=` in `text` (words separated by spaces or commas).
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split([' ', ','])
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

/// The rows the hypervisor measures itself (path `hv`): building the benchmark domain
/// (`domain_build_<M>M`, its `started` line's `build_tsc=`: ELF, RAM, nested page table,
/// vCPUs) and scrubbing its RAM at teardown (`scrub_1MiB`, per MiB, from the `torn down` line's
/// `scrub_tsc=`). A TSC tick is an instruction under -icount and Bochs, as for the guest rows.
/// A hypervisor that does not print them gives none (listed as missing, not failed).
fn hypervisor_rows(log: &SerialLog, id: u32, vendor: Vendor) -> Vec<Measurement> {
    let prefix = format!("lamina: domain {id} {DOMAIN_NAME} ");
    let line_with = |what: &str| {
        log.lines
            .iter()
            .find_map(|l| l.strip_prefix(&prefix)?.strip_prefix(what))
    };
    let row = |op: String, instructions: u64| Measurement {
        op,
        group: "domain".to_string(),
        path: "hv".to_string(),
        vendor: vendor.name().to_string(),
        iterations: 1,
        instructions: Some(Figure(instructions * 100)),
        exits: None,
        blocked: None,
        skipped: None,
    };
    let number = |text: Option<&str>| text.and_then(|t| t.parse::<u64>().ok());
    let mut rows = Vec::new();
    if let Some(started) = line_with("started ")
        && let Some(mem) = number(field(started, "mem").and_then(|m| m.strip_suffix('M')))
        && let Some(tsc) = number(field(started, "build_tsc"))
    {
        rows.push(row(format!("domain_build_{mem}M"), tsc));
    }
    if let Some(torn) = line_with("torn down: ")
        && let Some(kib) = number(torn.split_whitespace().next())
        && let Some(tsc) = number(field(torn, "scrub_tsc"))
        && let Some(per_mib) = (tsc * 1024).checked_div(kib)
    {
        rows.push(row("scrub_1MiB".to_string(), per_mib));
    }
    rows
}

/// The boot modules of a run: the benchmark domain, told its `event_pingpong` partner, and
/// the partner (the same guest in `pong` mode, told the benchmark domain's id and the same
/// iteration count, so that it knows how many round trips to answer).
pub fn boot_modules(iterations: u64) -> [BootModule; 2] {
    [
        BootModule {
            path: Artifact::Bench.path(),
            cmdline: format!(
                "{DOMAIN_NAME} iterations={iterations} pingpong_peer={PONG_DOMAIN_ID}"
            ),
        },
        BootModule {
            path: Artifact::Bench.path(),
            cmdline: format!("{PONG_NAME} pong={BENCH_DOMAIN_ID} iterations={iterations} mem=4M"),
        },
    ]
}

/// One boot of the benchmark guest: the main one (every single-vCPU row), one with idle
/// domains booted beside it (`<op>_idle<N>` rows), or one with two vCPUs (the `smp` rows), so
/// that the main rows measure a one-vCPU domain, as they always did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    Main,
    Idle(usize),
    Smp,
    /// The `smp2` rows: two vCPUs on a machine with two CPUs.
    Smp2,
    /// The `smp4` rows: four vCPUs on one CPU, so that every ready sibling is preempted.
    Smp4,
}

impl Run {
    /// Every run of `cargo xtask bench`, in order.
    pub const ALL: [Run; 6] = [
        Run::Main,
        Run::Smp,
        Run::Smp2,
        Run::Smp4,
        Run::Idle(16),
        Run::Idle(64),
    ];

    /// The name of its directory under target/lamina/bench.
    fn dir_name(self, vendor: Vendor) -> String {
        match self {
            Run::Main => vendor.name().to_string(),
            Run::Idle(n) => format!("{}-idle{n}", vendor.name()),
            Run::Smp => format!("{}-smp", vendor.name()),
            Run::Smp2 => format!("{}-smp2", vendor.name()),
            Run::Smp4 => format!("{}-smp4", vendor.name()),
        }
    }

    /// The machine's CPUs: two for [`Run::Smp2`], one otherwise.
    fn cpus(self) -> Option<u16> {
        (self == Run::Smp2).then_some(2)
    }
}

/// The operations measured again with idle domains booted: the ones whose cost could grow
/// with the number of domains (a wake-up, a switch, an exit).
const SCALE_OPS: [&str; 3] = ["null_hypercall", "timer_pv", "event_pingpong"];

/// The boot modules of `run`: for [`Run::Idle`], `n` idle domains (3 to `n + 2`) beside the
/// pair, which measures only [`SCALE_OPS`]' groups; for [`Run::Smp`], the benchmark domain
/// alone with two vCPUs, measuring only the `smp` group.
pub fn boot_modules_for(iterations: u64, run: Run, groups: Option<&str>) -> Vec<BootModule> {
    let [mut bench, pong] = boot_modules(iterations);
    match run {
        Run::Main => {
            if let Some(groups) = groups {
                bench.cmdline.push_str(&format!(" groups={groups}"));
            }
            vec![bench, pong]
        }
        Run::Smp => {
            bench.cmdline = format!("{DOMAIN_NAME} iterations={iterations} vcpus=2 groups=smp");
            vec![bench]
        }
        Run::Smp2 => {
            bench.cmdline = format!("{DOMAIN_NAME} iterations={iterations} vcpus=2 groups=smp2");
            vec![bench]
        }
        Run::Smp4 => {
            bench.cmdline = format!("{DOMAIN_NAME} iterations={iterations} vcpus=4 groups=smp4");
            vec![bench]
        }
        Run::Idle(idle) => {
            let first = PONG_DOMAIN_ID + 1;
            let last = PONG_DOMAIN_ID + idle as u32;
            bench.cmdline.push_str(&format!(
                " groups=hypercall,timer,pingpong idle_domains={first}-{last}"
            ));
            let mut modules = vec![bench, pong];
            modules.extend((first..=last).map(|id| BootModule {
                path: Artifact::Bench.path(),
                cmdline: format!("idle{id} idle={BENCH_DOMAIN_ID} mem=4M"),
            }));
            modules
        }
    }
}

/// The rows `run` contributes: the main run all but the `smp` group (skipped there, one
/// vCPU), the two-vCPU run only those, an idle run its [`SCALE_OPS`] rows, renamed
/// `<op>_idle<N>` in group `scale`.
fn rows_of(run: Run, measurements: Vec<Measurement>) -> Vec<Measurement> {
    match run {
        Run::Main => measurements
            .into_iter()
            .filter(|m| !["smp", "smp2", "smp4"].contains(&m.group.as_str()))
            .collect(),
        Run::Smp => measurements
            .into_iter()
            .filter(|m| m.group == "smp")
            .collect(),
        Run::Smp2 => measurements
            .into_iter()
            .filter(|m| m.group == "smp2")
            .collect(),
        Run::Smp4 => measurements
            .into_iter()
            .filter(|m| m.group == "smp4")
            .collect(),
        Run::Idle(idle) => measurements
            .into_iter()
            .filter(|m| SCALE_OPS.contains(&m.op.as_str()))
            .map(|m| Measurement {
                op: format!("{}_idle{idle}", m.op),
                group: "scale".to_string(),
                ..m
            })
            .collect(),
    }
}

/// The CSV columns, in order.
const CSV_COLUMNS: [&str; 9] = [
    "op",
    "group",
    "path",
    "vendor",
    "iterations",
    "instructions_per_op",
    "exits_per_op",
    "blocked_ticks_per_op",
    "skipped",
];

/// The measurements as CSV (the csv crate writes it), one line per operation and vendor;
/// missing figures are empty.
pub fn to_csv(measurements: &[Measurement]) -> String {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let cell = |figure: Option<Figure>| figure.map(|f| f.to_string()).unwrap_or_default();
    let mut rows = vec![CSV_COLUMNS.map(String::from)];
    for m in measurements {
        rows.push([
            m.op.clone(),
            m.group.clone(),
            m.path.clone(),
            m.vendor.clone(),
            m.iterations.to_string(),
            cell(m.instructions),
            cell(m.exits),
            cell(m.blocked),
            m.skipped.clone().unwrap_or_default(),
        ]);
    }
    for row in rows {
        // Writing into a Vec cannot fail.
        let _ = writer.write_record(row);
    }
    let bytes = writer.into_inner().unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads what [`to_csv`] wrote (blank lines and `#` comments allowed).
pub fn from_csv(text: &str) -> std::result::Result<Vec<Measurement>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|err| err.to_string())?
        .iter()
        .collect::<Vec<_>>()
        .join(",");
    if header.is_empty() {
        return Err("empty file".to_string());
    }
    if header != CSV_COLUMNS.join(",") {
        return Err(format!(
            "expected the header `{}`, found `{header}`",
            CSV_COLUMNS.join(",")
        ));
    }
    let mut measurements = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|err| err.to_string())?;
        let line = record.position().map_or(0, |p| p.line());
        let at = |what: String| format!("line {line}: {what}");
        let fields: Vec<&str> = record.iter().collect();
        let [
            op,
            group,
            path,
            vendor,
            iterations,
            instructions,
            exits,
            blocked,
            skipped,
        ] = fields[..]
        else {
            return Err(at(format!("{} fields, expected 9", fields.len())));
        };
        let figure = |text: &str| -> std::result::Result<Option<Figure>, String> {
            if text.is_empty() {
                return Ok(None);
            }
            Figure::parse(text)
                .map(Some)
                .ok_or_else(|| at(format!("`{text}` is not a number")))
        };
        measurements.push(Measurement {
            op: op.to_string(),
            group: group.to_string(),
            path: path.to_string(),
            vendor: vendor.to_string(),
            iterations: iterations
                .parse()
                .map_err(|_| at(format!("`{iterations}` is not a count")))?,
            instructions: figure(instructions)?,
            exits: figure(exits)?,
            blocked: figure(blocked)?,
            skipped: (!skipped.is_empty()).then(|| skipped.to_string()),
        });
    }
    Ok(measurements)
}

/// How a run compares with the baseline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Figures more than the tolerance worse: these fail a check.
    pub regressions: Vec<String>,
    /// Figures more than the tolerance better: time to update the baseline.
    pub improvements: Vec<String>,
    /// Operations the baseline does not have.
    pub new: Vec<String>,
    /// Baseline operations the run did not measure (or skipped, or measured without exits).
    pub missing: Vec<String>,
    /// Figures compared.
    pub compared: usize,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.regressions.is_empty()
    }

    /// A human-readable account, one item per line.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let mut section = |title: &str, items: &[String]| {
            if !items.is_empty() {
                out.push_str(&format!("{title}:\n"));
                for item in items {
                    out.push_str(&format!("  {item}\n"));
                }
            }
        };
        section(
            &format!("worse than the baseline by more than {TOLERANCE_PERCENT}%"),
            &self.regressions,
        );
        section(
            &format!(
                "better than the baseline by more than {TOLERANCE_PERCENT}% (update bench/baseline.csv)"
            ),
            &self.improvements,
        );
        section("not in the baseline", &self.new);
        section("in the baseline but not measured", &self.missing);
        out.push_str(&format!(
            "{} figures compared, {} regressions\n",
            self.compared,
            self.regressions.len()
        ));
        out
    }
}

/// Whether `current` is more than the tolerance above `baseline` (a baseline of 0 allows
/// nothing above it).
fn worse(baseline: Figure, current: Figure) -> bool {
    u128::from(current.0) * 100 > u128::from(baseline.0) * u128::from(100 + TOLERANCE_PERCENT)
}

/// Compares the figures of every (operation, vendor) that both have. Only vendors present in
/// `current` are looked at, so a one-vendor run is not missing the other's operations.
pub fn compare(baseline: &[Measurement], current: &[Measurement]) -> Comparison {
    let mut comparison = Comparison::default();
    let vendors: BTreeSet<&str> = current.iter().map(|m| m.vendor.as_str()).collect();
    for old in baseline
        .iter()
        .filter(|m| vendors.contains(m.vendor.as_str()))
    {
        let name = format!("{} ({})", old.op, old.vendor);
        let Some(new) = current.iter().find(|m| m.key() == old.key()) else {
            comparison.missing.push(name);
            continue;
        };
        for (what, old_figure, new_figure) in [
            ("instructions/op", old.instructions, new.instructions),
            ("exits/op", old.exits, new.exits),
        ] {
            match (old_figure, new_figure) {
                (Some(before), Some(now)) => {
                    comparison.compared += 1;
                    let change = format!("{name} {what}: {before} -> {now}");
                    if worse(before, now) {
                        comparison.regressions.push(change);
                    } else if worse(now, before) {
                        comparison.improvements.push(change);
                    }
                }
                (Some(before), None) => comparison
                    .missing
                    .push(format!("{name} {what}: {before} -> not measured")),
                (None, _) => {}
            }
        }
    }
    for new in current {
        if !baseline.iter().any(|m| m.key() == new.key()) {
            comparison.new.push(format!("{} ({})", new.op, new.vendor));
        }
    }
    comparison
}

/// The console table: one row per operation and vendor.
pub fn table(measurements: &[Measurement]) -> String {
    let mut table = Table::new(
        [
            "operation",
            "group",
            "path",
            "instructions/op",
            "exits/op",
            "vendor",
        ]
        .map(String::from)
        .to_vec(),
    );
    for m in sorted(measurements) {
        let (instructions, exits) = match &m.skipped {
            Some(_) => ("n/a".to_string(), "n/a".to_string()),
            None => (show(m.instructions), show(m.exits)),
        };
        table.add_row(vec![
            m.op.clone(),
            m.group.clone(),
            m.path.clone(),
            instructions,
            exits,
            m.vendor.clone(),
        ]);
    }
    let mut out = table.render();
    let notes: BTreeSet<String> = measurements
        .iter()
        .filter_map(|m| {
            m.skipped
                .as_ref()
                .map(|why| format!("{}: n/a ({why})", m.op))
        })
        .collect();
    for note in notes {
        out.push_str(&note);
        out.push('\n');
    }
    out
}

/// Wall-clock limit of one run: the emulators manage about 1e5 exits per second, and the
/// full benchmark makes about 60 exits per iteration.
fn timeout(vendor: Vendor, iterations: u64, overridden: Option<Duration>) -> Duration {
    overridden.unwrap_or_else(|| {
        let per_iteration_ms = match vendor {
            Vendor::Amd => 2,
            Vendor::Intel => 4,
        };
        vendor.default_timeout() + Duration::from_millis(per_iteration_ms * iterations)
    })
}

/// Boots the benchmark with `iterations` on `vendor` in `dir`.
#[allow(clippy::too_many_arguments)]
fn boot(
    vendor: Vendor,
    iterations: u64,
    run: Run,
    dir: &RunDir,
    timeout: Duration,
    streaming: &Streaming,
    hv_cmdline: &str,
    groups: Option<&str>,
) -> Result<RunRecord> {
    emulator::boot(&emulator::Boot {
        vendor,
        dir,
        hv_cmdline,
        modules: &boot_modules_for(iterations, run, groups),
        timeout,
        streaming,
        // QEMU: the TSC counts instructions (with -smp 2 too). Bochs counts them anyway.
        icount: true,
        extras: emulator::RunExtras {
            cpus: run.cpus(),
            ..emulator::RunExtras::default()
        },
    })
}

/// Why a run gave no measurements, with the end of its serial log.
fn run_failure(record: &RunRecord, why: &str) -> String {
    let mut message = format!(
        "{} run: {why} ({}; serial log {})",
        record.vendor.name(),
        match record.outcome() {
            RunOutcome::Timeout => "timed out".to_string(),
            _ => record.ending(),
        },
        emulator::show_path(&record.dir.serial_log())
    );
    for line in record.log.tail(10) {
        message.push_str(&format!("\n    | {line}"));
    }
    message
}

/// One vendor's figures and run, or why there are none.
type VendorRun = std::result::Result<(Vec<Measurement>, RunRecord), String>;

/// Boots `run` of the benchmark on one vendor and reads the rows it contributes.
#[allow(clippy::too_many_arguments)]
fn measure(
    vendor: Vendor,
    iterations: u64,
    run: Run,
    dir: &RunDir,
    timeout: Duration,
    streaming: &Streaming,
    hv_cmdline: &str,
    groups: Option<&str>,
) -> VendorRun {
    let record = boot(
        vendor, iterations, run, dir, timeout, streaming, hv_cmdline, groups,
    )
    .map_err(|err| err.to_string())?;
    match parse_log(&record.log, vendor) {
        Ok(measurements) => Ok((rows_of(run, measurements), record)),
        Err(why) => Err(run_failure(&record, &why)),
    }
}

/// `cargo xtask bench`; returns whether every run worked and, with `--check`, nothing got
/// worse than the baseline.
pub fn bench(options: &BenchOptions) -> Result<bool> {
    tools::ensure(&options.vendors)?;
    eprintln!("xtask: building the images");
    build_images::build_images()?;
    let iterations = options.iterations;
    eprintln!(
        "xtask: benchmarking with {iterations} iterations on {}",
        options
            .vendors
            .iter()
            .map(|v| v.name())
            .collect::<Vec<_>>()
            .join(" and ")
    );
    let results: Vec<(Vendor, VendorRun)> = thread::scope(|scope| {
        let handles: Vec<_> = options
            .vendors
            .iter()
            .map(|&vendor| {
                scope.spawn(move || {
                    let streaming = if options.verbose {
                        Streaming::Prefixed(format!("[bench {}] ", vendor.name()))
                    } else {
                        Streaming::Off
                    };
                    let timeout = timeout(vendor, iterations, options.timeout);
                    let mut result: VendorRun = Err(String::new());
                    for run in Run::ALL {
                        let Some(guest_groups) = run.selected(options.groups.as_deref()) else {
                            continue;
                        };
                        let dir = RunDir::new(
                            workspace::lamina_dir()
                                .join("bench")
                                .join(run.dir_name(vendor)),
                        );
                        // A run with 64 more domains boots for longer; the `smp4` rows'
                        // trapping operations wait out about 1.5 G instructions of slices.
                        let timeout = match run {
                            Run::Main => timeout,
                            Run::Smp4 => timeout * 2 + Duration::from_secs(600),
                            _ => timeout * 2,
                        };
                        let measured = measure(
                            vendor,
                            iterations,
                            run,
                            &dir,
                            timeout,
                            &streaming,
                            &options.hv_cmdline,
                            guest_groups.as_deref(),
                        );
                        match (measured, &mut result) {
                            (Ok((rows, record)), Ok((found, _))) => {
                                eprintln!(
                                    "xtask: {} {run:?} done in {:.1} s",
                                    vendor.name(),
                                    record.elapsed.as_secs_f64()
                                );
                                found.extend(rows);
                            }
                            (Ok((rows, record)), result @ Err(_)) => {
                                eprintln!(
                                    "xtask: {} done in {:.1} s",
                                    vendor.name(),
                                    record.elapsed.as_secs_f64()
                                );
                                *result = Ok((rows, record));
                            }
                            (Err(why), result) => {
                                *result = Err(why);
                                break;
                            }
                        }
                    }
                    (vendor, result)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a benchmark thread panicked"))
            .collect()
    });

    let mut measurements = Vec::new();
    let mut all_ran = true;
    for (vendor, result) in results {
        match result {
            Ok((found, _)) => measurements.extend(found),
            Err(why) => {
                all_ran = false;
                eprintln!("xtask: {} benchmark failed: {why}", vendor.name());
            }
        }
    }
    if measurements.is_empty() {
        return Ok(false);
    }
    println!();
    print!("{}", table(&measurements));

    let dir = workspace::lamina_dir();
    fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
    let csv_path = dir.join("bench.csv");
    fs::write(&csv_path, to_csv(&measurements))
        .context(|| format!("writing {}", csv_path.display()))?;
    let svg_path = dir.join("bench.svg");
    fs::write(&svg_path, chart::svg(&measurements))
        .context(|| format!("writing {}", svg_path.display()))?;
    println!(
        "\nwritten: {}, {}",
        emulator::show_path(&csv_path),
        emulator::show_path(&svg_path)
    );

    if !options.check {
        return Ok(all_ran);
    }
    let baseline = read_baseline()?;
    let comparison = compare(&baseline, &measurements);
    println!(
        "\ncompared with {}:\n{}",
        emulator::show_path(&baseline_path()),
        comparison.describe()
    );
    Ok(all_ran && comparison.passed())
}

/// The committed baseline.
pub fn read_baseline() -> Result<Vec<Measurement>> {
    let path = baseline_path();
    let text = fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
    from_csv(&text).map_err(|why| failed(format!("{}: {why}", path.display())))
}

/// The subset `cargo xtask test` runs: the benchmark with [`FAST_ITERATIONS`] on `vendor`,
/// held against the baseline. Returns the verdict and the run, if it got that far.
pub fn fast_check(
    vendor: Vendor,
    dir: &RunDir,
    timeout_override: Option<Duration>,
    streaming: &Streaming,
) -> (Judgement, Option<RunRecord>) {
    let baseline = match read_baseline() {
        Ok(baseline) => baseline,
        Err(err) => return (Judgement::new(Status::Error, err.to_string()), None),
    };
    let timeout = timeout(vendor, FAST_ITERATIONS, timeout_override);
    // The main run, then the two-vCPU one (the `smp` rows); the main run's record is shown.
    let mut measurements = Vec::new();
    let mut main_record = None;
    // Not the `smp4` rows: their trapping rows wait out whole slices (minutes under the
    // emulators), so only `cargo xtask bench` runs them.
    for run in [Run::Main, Run::Smp, Run::Smp2] {
        let run_dir = match run {
            Run::Main => RunDir::new(dir.path.clone()),
            Run::Smp2 => RunDir::new(dir.path.join("smp2")),
            _ => RunDir::new(dir.path.join("smp")),
        };
        let record = match boot(
            vendor,
            FAST_ITERATIONS,
            run,
            &run_dir,
            timeout,
            streaming,
            "",
            None,
        ) {
            Ok(record) => record,
            Err(err) => return (Judgement::new(Status::Error, err.to_string()), main_record),
        };
        match parse_log(&record.log, vendor) {
            Ok(found) => measurements.extend(rows_of(run, found)),
            Err(why) => {
                let status = match record.outcome() {
                    RunOutcome::Timeout => Status::Timeout,
                    RunOutcome::Crash => Status::Crash,
                    RunOutcome::Success | RunOutcome::Failure => Status::Fail,
                };
                return (Judgement::new(status, why), Some(record));
            }
        }
        if run == Run::Main {
            main_record = Some(record);
        }
    }
    let record = main_record;
    let comparison = compare(&baseline, &measurements);
    let judgement = if comparison.passed() {
        Judgement::pass()
    } else {
        Judgement {
            status: Status::Fail,
            problems: comparison
                .regressions
                .iter()
                .map(|r| {
                    format!("more than {TOLERANCE_PERCENT}% worse than bench/baseline.csv: {r}")
                })
                .collect(),
        }
    };
    (judgement, record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(op: &str, vendor: &str, instructions: u64, exits: Option<u64>) -> Measurement {
        Measurement {
            op: op.to_string(),
            group: "hypercall".to_string(),
            path: "pv".to_string(),
            vendor: vendor.to_string(),
            iterations: 2000,
            instructions: Some(Figure(instructions)),
            exits: exits.map(Figure),
            blocked: None,
            skipped: None,
        }
    }

    #[test]
    fn figures_keep_two_decimals_exactly() {
        assert_eq!(Figure::parse("123.45"), Some(Figure(12345)));
        assert_eq!(Figure::parse("0.04"), Some(Figure(4)));
        assert_eq!(Figure::parse("7.5"), Some(Figure(750)));
        assert_eq!(Figure::parse("80"), Some(Figure(8000)));
        for bad in ["", "-", ".5", "1.234", "1,5", "x", "-1.00", "1e3"] {
            assert_eq!(Figure::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Figure(12345).to_string(), "123.45");
        assert_eq!(Figure(4).to_string(), "0.04");
        assert_eq!(Figure(100).to_string(), "1.00");
    }

    #[test]
    fn bench_lines_are_parsed() {
        let line = "BENCH op=null_hypercall group=hypercall path=pv iterations=2000 tsc_per_op=161.03 exits_per_op=1.00";
        let m = parse_line(line, "amd").unwrap().unwrap();
        assert_eq!(m.op, "null_hypercall");
        assert_eq!(m.group, "hypercall");
        assert_eq!(m.path, "pv");
        assert_eq!(m.vendor, "amd");
        assert_eq!(m.iterations, 2000);
        assert_eq!(m.instructions, Some(Figure(16103)));
        assert_eq!(m.exits, Some(Figure(100)));
        assert_eq!(m.blocked, None);
        assert_eq!(m.skipped, None);

        let timer = "BENCH op=timer_pv group=timer path=pv iterations=5 tsc_per_op=900.00 exits_per_op=- blocked_tsc_per_op=9100.20 kinds=hypercall:2.00,interrupt:0.01";
        let m = parse_line(timer, "intel").unwrap().unwrap();
        assert_eq!(m.exits, None, "no stats_op: exits are -");
        assert_eq!(m.blocked, Some(Figure(910020)));

        let skipped = "BENCH op=event_pingpong group=pingpong path=pv iterations=0 tsc_per_op=- exits_per_op=- skipped=needs-interdomain-events";
        let m = parse_line(skipped, "amd").unwrap().unwrap();
        assert_eq!(m.instructions, None);
        assert_eq!(m.skipped.as_deref(), Some("needs-interdomain-events"));

        assert_eq!(parse_line("bench: done", "amd"), Ok(None));
        assert_eq!(parse_line("BENCHMARK op=x", "amd"), Ok(None));
    }

    #[test]
    fn malformed_bench_lines_are_errors() {
        for bad in [
            "BENCH op=x group=g path=pv iterations=1",
            "BENCH op=x group=g path=pv iterations=1 tsc_per_op=abc exits_per_op=1.00",
            "BENCH op=x group=g path=sideways iterations=1 tsc_per_op=1.00",
            "BENCH op=x group=g path=pv iterations=many tsc_per_op=1.00",
            "BENCH group=g path=pv iterations=1 tsc_per_op=1.00",
            "BENCH op=x group=g path=pv iterations=1 tsc_per_op=1.00 stray",
        ] {
            assert!(parse_line(bad, "amd").is_err(), "{bad}");
        }
    }

    const LOG: &str = "\
lamina: domain 1 lamina-bench started mem=16M
(d1) bench: domain 1, 10 iterations
(d1) BENCH op=null_hypercall group=hypercall path=pv iterations=10 tsc_per_op=161.03 exits_per_op=1.00
(d1) BENCH op=pvclock_read group=time path=pv iterations=10 tsc_per_op=52.10 exits_per_op=0.00
(d1) bench: done
lamina: summary
lamina: domain 1 lamina-bench end=poweroff exits=99
lamina: result: success
";

    #[test]
    fn a_log_yields_its_measurements() {
        let log = SerialLog::from_bytes(LOG.as_bytes());
        let found = parse_log(&log, Vendor::Intel).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].op, "pvclock_read");
        assert_eq!(found[1].vendor, "intel");
        assert_eq!(found[1].exits, Some(Figure(0)));
    }

    #[test]
    fn the_hypervisor_rows_come_from_its_own_lines() {
        let with_rows = LOG
            .replace(
                "lamina: summary",
                "lamina: domain 1 lamina-bench torn down: 16384 KiB RAM and 20 KiB of hypervisor structures scrubbed and returned, 500000 KiB free, scrub_tsc=2115680\nlamina: summary",
            )
            .replace(
                "lamina-bench started mem=16M",
                "lamina-bench started mem=16M build_tsc=2132768",
            );
        let found = parse_log(&SerialLog::from_bytes(with_rows.as_bytes()), Vendor::Amd).unwrap();
        let build = found.iter().find(|m| m.op == "domain_build_16M").unwrap();
        assert_eq!(
            (build.path.as_str(), build.instructions),
            ("hv", Some(Figure(213_276_800)))
        );
        let scrub = found.iter().find(|m| m.op == "scrub_1MiB").unwrap();
        assert_eq!(
            scrub.instructions,
            Some(Figure(13_223_000)),
            "2115680 ticks for 16 MiB"
        );
    }

    #[test]
    fn a_log_with_errors_or_a_crash_yields_none() {
        let errors = LOG.replace("(d1) bench: done", "(d1) bench: error: timer_pv: no fire");
        let why = parse_log(&SerialLog::from_bytes(errors.as_bytes()), Vendor::Amd).unwrap_err();
        assert!(why.contains("timer_pv: no fire"), "{why}");
        let crashed = LOG.replace("end=poweroff", "end=crash");
        assert!(parse_log(&SerialLog::from_bytes(crashed.as_bytes()), Vendor::Amd).is_err());
        let twice = LOG.replace("(d1) bench: done", LOG.lines().nth(2).unwrap());
        let why = parse_log(&SerialLog::from_bytes(twice.as_bytes()), Vendor::Amd).unwrap_err();
        assert!(why.contains("twice"), "{why}");
        let none = "lamina: result: failure\n";
        assert!(parse_log(&SerialLog::from_bytes(none.as_bytes()), Vendor::Amd).is_err());
    }

    const PINGPONG_LOG: &str = "\
lamina: domain 1 lamina-bench started mem=16M
lamina: domain 2 pong started mem=4M
(d2) pong: port 2 for domain 1, 42 round trips
(d1) BENCH op=event_pingpong group=pingpong path=pv iterations=10 tsc_per_op=5000.00 exits_per_op=2.00
(d2) pong: 42 round trips answered, ping closed
(d1) bench: done
lamina: summary
lamina: domain 1 lamina-bench end=poweroff exits=99
lamina: domain 2 pong end=poweroff exits=99
lamina: result: success
";

    #[test]
    fn the_second_module_is_pong_for_domain_one() {
        let [bench, pong] = boot_modules(200);
        assert_eq!(bench.path, pong.path, "one guest, two modes");
        assert_eq!(bench.cmdline, "lamina-bench iterations=200 pingpong_peer=2");
        assert_eq!(pong.cmdline, "pong pong=1 iterations=200 mem=4M");
    }

    #[test]
    fn pingpong_needs_pong_to_power_off_cleanly() {
        let log = SerialLog::from_bytes(PINGPONG_LOG.as_bytes());
        let found = parse_log(&log, Vendor::Amd).unwrap();
        assert_eq!(found[0].instructions, Some(Figure(500_000)));

        let crashed = PINGPONG_LOG.replace("pong end=poweroff", "pong end=crash");
        let why = parse_log(&SerialLog::from_bytes(crashed.as_bytes()), Vendor::Amd).unwrap_err();
        assert!(why.contains("pong ended with crash"), "{why}");
        let errors = PINGPONG_LOG.replace(
            "(d2) pong: 42 round trips answered",
            "(d2) pong: error: 42 round trips expected, received 41",
        );
        let why = parse_log(&SerialLog::from_bytes(errors.as_bytes()), Vendor::Amd).unwrap_err();
        assert!(why.contains("received 41"), "{why}");
        let no_pong: String = PINGPONG_LOG
            .lines()
            .filter(|line| !line.starts_with("(d2)") && !line.starts_with("lamina: domain 2"))
            .map(|line| format!("{line}\n"))
            .collect();
        let why = parse_log(&SerialLog::from_bytes(no_pong.as_bytes()), Vendor::Amd).unwrap_err();
        assert!(
            why.contains("no `lamina: domain <ID> pong started`"),
            "{why}"
        );
    }

    #[test]
    fn csv_round_trips() {
        let mut skipped = measurement("event_pingpong", "amd", 0, None);
        skipped.instructions = None;
        skipped.iterations = 0;
        skipped.skipped = Some("needs-interdomain-events".to_string());
        let mut timer = measurement("timer_pv", "intel", 90_000, Some(200));
        timer.blocked = Some(Figure(910_020));
        let all = vec![
            measurement("null_hypercall", "amd", 16_103, Some(100)),
            measurement("null_hypercall", "intel", 20_000, None),
            timer,
            skipped,
        ];
        let csv = to_csv(&all);
        assert!(csv.starts_with(&format!("{}\n", CSV_COLUMNS.join(","))));
        assert!(csv.contains("\nnull_hypercall,hypercall,pv,amd,2000,161.03,1.00,,\n"));
        assert!(csv.contains("\nevent_pingpong,hypercall,pv,amd,0,,,,needs-interdomain-events\n"));
        assert_eq!(from_csv(&csv).unwrap(), all);
        let commented = format!("# a note\n\n{csv}");
        assert_eq!(from_csv(&commented).unwrap(), all);
    }

    #[test]
    fn the_committed_baseline_still_reads() {
        let baseline = from_csv(include_str!("../../bench/baseline.csv")).unwrap();
        assert!(
            baseline
                .iter()
                .any(|m| m.op == "null_hypercall" && m.vendor == "amd")
        );
        assert!(baseline.iter().any(|m| m.vendor == "intel"));
    }

    #[test]
    fn bad_csv_is_refused() {
        assert!(from_csv("").is_err());
        assert!(from_csv("op,vendor\n").is_err());
        let header = CSV_COLUMNS.join(",");
        let short = format!("{header}\nnull_hypercall,hypercall,pv\n");
        assert!(from_csv(&short).unwrap_err().starts_with("line 2:"));
        let bad = format!("{header}\nx,g,pv,amd,10,fast,1.00,,\n");
        assert!(from_csv(&bad).is_err());
    }

    #[test]
    fn the_check_fails_only_on_more_than_ten_percent_worse() {
        let baseline = vec![
            measurement("a", "amd", 10_000, Some(100)),
            measurement("b", "amd", 10_000, Some(100)),
            measurement("c", "amd", 10_000, Some(0)),
            measurement("d", "amd", 10_000, Some(4)),
            measurement("gone", "amd", 10_000, Some(100)),
            measurement("a", "intel", 10_000, Some(100)),
        ];
        let current = vec![
            // Exactly 10% worse passes; better is fine.
            measurement("a", "amd", 11_000, Some(100)),
            // Just over 10% worse in instructions.
            measurement("b", "amd", 11_001, Some(100)),
            // An exit where there was none.
            measurement("c", "amd", 5_000, Some(1)),
            // 0.04 -> 0.05 exits is 25% worse.
            measurement("d", "amd", 10_000, Some(5)),
            measurement("new", "amd", 10_000, Some(100)),
        ];
        let comparison = compare(&baseline, &current);
        assert_eq!(
            comparison.regressions,
            [
                "b (amd) instructions/op: 100.00 -> 110.01",
                "c (amd) exits/op: 0.00 -> 0.01",
                "d (amd) exits/op: 0.04 -> 0.05",
            ]
        );
        assert_eq!(
            comparison.improvements,
            ["c (amd) instructions/op: 100.00 -> 50.00"]
        );
        assert_eq!(comparison.new, ["new (amd)"]);
        // Intel did not run: its baseline rows are not missing.
        assert_eq!(comparison.missing, ["gone (amd)"]);
        assert_eq!(comparison.compared, 8);
        assert!(!comparison.passed());
        assert!(comparison.describe().contains("3 regressions"));

        let same = compare(&baseline, &baseline);
        assert!(same.passed());
        assert!(same.improvements.is_empty() && same.new.is_empty() && same.missing.is_empty());
    }

    #[test]
    fn unmeasured_exits_and_skipped_operations_are_reported_not_failed() {
        let baseline = vec![measurement("a", "amd", 10_000, Some(100))];
        let mut skipped = measurement("a", "amd", 0, None);
        skipped.instructions = None;
        skipped.skipped = Some("why".to_string());
        let comparison = compare(&baseline, &[skipped]);
        assert!(comparison.passed());
        assert_eq!(comparison.missing.len(), 2, "{:?}", comparison.missing);
        let no_stats = compare(&baseline, &[measurement("a", "amd", 10_000, None)]);
        assert!(no_stats.passed());
        assert_eq!(no_stats.missing, ["a (amd) exits/op: 1.00 -> not measured"]);
    }

    #[test]
    fn the_table_shows_every_vendor_and_skips_as_na() {
        let mut skipped = measurement("event_pingpong", "amd", 0, None);
        skipped.instructions = None;
        skipped.skipped = Some("needs-interdomain-events".to_string());
        let rows = vec![
            measurement("null_hypercall", "intel", 20_000, None),
            measurement("null_hypercall", "amd", 16_103, Some(100)),
            skipped,
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("operation"));
        assert!(lines[2].contains("161.03") && lines[2].ends_with("amd"));
        assert!(
            lines[3].contains("200.00") && lines[3].contains(" - ") && lines[3].ends_with("intel")
        );
        assert!(lines[4].contains("n/a"));
        assert_eq!(lines[5], "event_pingpong: n/a (needs-interdomain-events)");
    }
}

//! `cargo xtask test` and `cargo xtask conformance`: the emulated runs as jobs, up to
//! `--jobs` emulators at a time, then the tables and reports.

use std::fs;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use crate::conformance::{self, TestInfo};
use crate::emulator::{
    self, RunDir, RunExtras, RunOutcome, RunRecord, Streaming, Vendor, show_path,
};
use crate::error::{Context, Result};
use crate::iso::BootModule;
use crate::report::{self, Judgement, Status, Suite, Table};
use crate::scenarios::driven::{self, Driven};
use crate::scenarios::{self, Scenario, out_of_tree};
use crate::workspace;
use crate::{bench, build_images, fuzz, rustdoc, tools};

/// Name of the host unit test step, for `--filter`.
const HOST_UNIT_TESTS: &str = "host-unit-tests";
/// How many serial lines a failure report shows.
const TAIL_LINES: usize = 25;

/// What `test` and `conformance` were asked to do.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    pub vendors: Vec<Vendor>,
    pub filter: Option<String>,
    /// Overrides each vendor's base timeout.
    pub timeout: Option<Duration>,
    /// Emulators running at the same time.
    pub jobs: usize,
    /// Stream every run's serial output, each line prefixed with the run's name.
    pub verbose: bool,
    /// The emulated machines' CPUs (`--smp`; scenarios that set their own keep it); None: one.
    pub smp: Option<u16>,
}

/// The CPUs of a conformance job's machines.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cpus {
    /// As `--smp` says (one without it).
    Options,
    /// Two: `cargo xtask test` runs the suite again on 2-CPU machines, where the vCPUs of a
    /// batch's domains move between CPUs.
    Two,
}

/// The name of the conformance suite run on 2-CPU machines.
const CONFORMANCE_TWO_CPUS: &str = "conformance-2cpus";

/// One emulator run to do.
enum Job {
    Scenario(&'static Scenario, Vendor),
    /// A scenario that drives the run (gdb, console input, trace).
    Driven(&'static Driven, Vendor),
    /// The conformance suite; the `Cpus` of its machines (`Cpus::Options`: `--smp`).
    Conformance(Vec<&'static TestInfo>, Vendor, Cpus),
    /// The benchmark with few iterations, held against its baseline.
    Bench(Vendor),
    /// A guest crate outside the workspace, built and booted with `cargo run`/`cargo test`.
    OutOfTree(Vendor),
}

impl Job {
    fn name(&self) -> &'static str {
        match self {
            Job::Scenario(scenario, _) => scenario.name,
            Job::Driven(driven, _) => driven.scenario.name,
            Job::Conformance(_, _, Cpus::Options) => conformance::SUITE_NAME,
            Job::Conformance(_, _, Cpus::Two) => CONFORMANCE_TWO_CPUS,
            Job::Bench(_) => bench::FAST_NAME,
            Job::OutOfTree(_) => out_of_tree::NAME,
        }
    }

    fn vendor(&self) -> Vendor {
        match self {
            Job::Scenario(_, vendor)
            | Job::Driven(_, vendor)
            | Job::Conformance(_, vendor, _)
            | Job::Bench(vendor)
            | Job::OutOfTree(vendor) => *vendor,
        }
    }

    fn dir(&self) -> RunDir {
        RunDir::new(
            workspace::lamina_dir()
                .join(self.name())
                .join(self.vendor().name()),
        )
    }
}

/// What one job came to.
struct JobOutcome {
    name: &'static str,
    vendor: Vendor,
    /// The run's overall verdict (for conformance: all its tests together).
    judgement: Judgement,
    seconds: f64,
    record: Option<RunRecord>,
    /// Conformance runs only: the per-test results.
    suite: Option<Suite>,
}

impl JobOutcome {
    /// The outcome of a job that is one run (not the conformance suite), judged.
    fn of_run(
        name: &'static str,
        vendor: Vendor,
        judgement: Judgement,
        record: Option<RunRecord>,
    ) -> Self {
        JobOutcome {
            name,
            vendor,
            judgement,
            seconds: record.as_ref().map_or(0.0, |r| r.elapsed.as_secs_f64()),
            record,
            suite: None,
        }
    }
}

/// `cargo xtask test`: host unit tests, then every scenario, the conformance suite and the
/// benchmark subset (`bench-fast`, held against bench/baseline.csv). Returns whether
/// everything passed.
pub fn test(options: &SuiteOptions) -> Result<bool> {
    tools::ensure(&options.vendors)?;
    let filter = options.filter.as_deref();
    let unit_tests = if filter.is_none_or(|f| HOST_UNIT_TESTS.contains(f)) {
        eprintln!("xtask: host unit tests");
        Some(build_images::run_host_unit_tests()?)
    } else {
        None
    };
    let rustdoc = if filter.is_none_or(|f| rustdoc::NAME.contains(f)) {
        eprintln!("xtask: rustdoc of lamina-abi and lamina-guest-sdk, warnings denied");
        Some(rustdoc::run_rustdoc()?)
    } else {
        None
    };
    let mut lints = Vec::new();
    for step in build_images::LINT_STEPS {
        if filter.is_none_or(|f| step.contains(f)) {
            eprintln!("xtask: {step}");
            lints.push((step, build_images::run_lint_step(step)?));
        }
    }
    let fuzz_host = if filter.is_none_or(|f| fuzz::HOST_STEP.contains(f)) {
        eprintln!(
            "xtask: {} ({} s per target)",
            fuzz::HOST_STEP,
            fuzz::SUITE_SECONDS
        );
        let started = std::time::Instant::now();
        let (passed, _) = fuzz::host(None, fuzz::SUITE_SECONDS, false)?;
        Some((passed, started.elapsed()))
    } else {
        None
    };
    let mut jobs = conformance_jobs(options);
    // The whole suite again on 2-CPU machines, unless the run already has several CPUs or
    // is filtered to something else.
    if options.smp.is_none() && filter.is_none_or(|f| CONFORMANCE_TWO_CPUS.contains(f)) {
        let tests = conformance::select(None);
        jobs.extend(
            options
                .vendors
                .iter()
                .map(|&vendor| Job::Conformance(tests.clone(), vendor, Cpus::Two)),
        );
    }
    for scenario in scenarios::select(filter) {
        jobs.extend(
            options
                .vendors
                .iter()
                .map(|&vendor| Job::Scenario(scenario, vendor)),
        );
    }
    for driven in driven::select(filter) {
        jobs.extend(
            options
                .vendors
                .iter()
                .filter(|vendor| driven.vendors.contains(vendor))
                .map(|&vendor| Job::Driven(driven, vendor)),
        );
    }
    if filter.is_none_or(|f| bench::FAST_NAME.contains(f)) {
        jobs.extend(options.vendors.iter().map(|&vendor| Job::Bench(vendor)));
    }
    if filter.is_none_or(|f| out_of_tree::NAME.contains(f)) {
        jobs.extend(options.vendors.iter().map(|&vendor| Job::OutOfTree(vendor)));
    }
    let outcomes = if jobs.is_empty() {
        Vec::new()
    } else {
        eprintln!("xtask: building the images");
        build_images::build_images()?;
        run_jobs(jobs, options)
    };

    println!();
    if let Some((passed, took)) = unit_tests {
        let status = if passed { Status::Pass } else { Status::Fail };
        println!(
            "{HOST_UNIT_TESTS}: {} ({:.1} s)\n",
            status.label(),
            took.as_secs_f64()
        );
    }
    let fuzz_guest = if filter.is_none_or(|f| fuzz::GUEST_STEP.contains(f)) {
        eprintln!(
            "xtask: {} (seeds {}-{}, {} operations each, beside the canary)",
            fuzz::GUEST_STEP,
            fuzz::SUITE_SEEDS.start(),
            fuzz::SUITE_SEEDS.end(),
            fuzz::SUITE_OPS
        );
        let started = std::time::Instant::now();
        let (passed, _) = fuzz::guest(&fuzz::GuestCampaign {
            vendors: &options.vendors,
            seeds: fuzz::SUITE_SEEDS,
            ops: fuzz::SUITE_OPS,
            trace_from: None,
            privileged: false,
            vcpus: fuzz::SUITE_VCPUS,
            cpus: None,
            timeout: None,
        })?;
        Some((passed, started.elapsed()))
    } else {
        None
    };
    if let Some((passed, took)) = fuzz_guest {
        let status = if passed { Status::Pass } else { Status::Fail };
        println!(
            "{}: {} ({:.1} s)\n",
            fuzz::GUEST_STEP,
            status.label(),
            took.as_secs_f64()
        );
    }
    if let Some((passed, took)) = rustdoc {
        let status = if passed { Status::Pass } else { Status::Fail };
        println!(
            "{}: {} ({:.1} s)\n",
            rustdoc::NAME,
            status.label(),
            took.as_secs_f64()
        );
    }
    for (step, (passed, took)) in &lints {
        let status = if *passed { Status::Pass } else { Status::Fail };
        println!("{step}: {} ({:.1} s)", status.label(), took.as_secs_f64());
    }
    if !lints.is_empty() {
        println!();
    }
    if let Some((passed, took)) = fuzz_host {
        let status = if passed { Status::Pass } else { Status::Fail };
        println!(
            "{}: {} ({:.1} s)\n",
            fuzz::HOST_STEP,
            status.label(),
            took.as_secs_f64()
        );
    }
    let all_passed = report(&outcomes, options)?
        && unit_tests.is_none_or(|(passed, _)| passed)
        && rustdoc.is_none_or(|(passed, _)| passed)
        && lints.iter().all(|(_, (passed, _))| *passed)
        && fuzz_host.is_none_or(|(passed, _)| passed)
        && fuzz_guest.is_none_or(|(passed, _)| passed);
    if unit_tests.is_none()
        && rustdoc.is_none()
        && lints.is_empty()
        && fuzz_host.is_none()
        && fuzz_guest.is_none()
        && outcomes.is_empty()
    {
        eprintln!("xtask: nothing matches --filter {}", filter.unwrap_or(""));
        return Ok(false);
    }
    Ok(all_passed)
}

/// `cargo xtask conformance`: only the conformance suite. Returns whether every test passed.
pub fn conformance(options: &SuiteOptions) -> Result<bool> {
    tools::ensure(&options.vendors)?;
    let jobs = conformance_jobs(options);
    if jobs.is_empty() {
        eprintln!(
            "xtask: no conformance test matches --filter {}",
            options.filter.as_deref().unwrap_or("")
        );
        return Ok(false);
    }
    eprintln!("xtask: building the images");
    build_images::build_images()?;
    let outcomes = run_jobs(jobs, options);
    println!();
    report(&outcomes, options)
}

fn conformance_jobs(options: &SuiteOptions) -> Vec<Job> {
    let tests = conformance::select(options.filter.as_deref());
    if tests.is_empty() {
        return Vec::new();
    }
    options
        .vendors
        .iter()
        .map(|&vendor| Job::Conformance(tests.clone(), vendor, Cpus::Options))
        .collect()
}

/// Runs the jobs on `options.jobs` threads, in order of submission, and returns the outcomes
/// in the same order. Each finished job is announced right away.
fn run_jobs(jobs: Vec<Job>, options: &SuiteOptions) -> Vec<JobOutcome> {
    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<Option<JobOutcome>>> = Mutex::new(jobs.iter().map(|_| None).collect());
    let workers = options.jobs.clamp(1, jobs.len().max(1));
    thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = jobs.get(index) else { break };
                    let outcome = run_job(job, options);
                    let done = finished.fetch_add(1, Ordering::SeqCst) + 1;
                    eprintln!(
                        "xtask: [{done}/{}] {:<7} {} on {} ({:.1} s)",
                        jobs.len(),
                        outcome.judgement.status.label(),
                        outcome.name,
                        outcome.vendor.name(),
                        outcome.seconds
                    );
                    if let Ok(mut slots) = outcomes.lock() {
                        slots[index] = Some(outcome);
                    }
                }
            });
        }
    });
    outcomes
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect()
}

fn run_job(job: &Job, options: &SuiteOptions) -> JobOutcome {
    let name = job.name();
    let vendor = job.vendor();
    if let Job::Conformance(tests, _, cpus) = job {
        return run_conformance(name, vendor, tests, &job.dir(), options, *cpus);
    }
    if let Job::Bench(_) = job {
        let (judgement, record) = bench::fast_check(
            vendor,
            &job.dir(),
            options.timeout,
            &streaming(name, vendor, options),
        );
        let memory = record.as_ref().and_then(|r| r.log.memory_problem());
        let judgement = with_problems(judgement, memory.into_iter().collect());
        return JobOutcome::of_run(name, vendor, judgement, record);
    }
    if let Job::OutOfTree(_) = job {
        let (judgement, record) = out_of_tree::run(vendor, &job.dir(), options.timeout);
        return JobOutcome::of_run(name, vendor, judgement, record);
    }
    if let Job::Driven(driven, _) = job {
        let dir = job.dir();
        let (record, judgement) = driven.run(&driven::Context {
            vendor,
            dir: &dir,
            timeout: options.timeout.unwrap_or_else(|| vendor.default_timeout()),
            streaming: &streaming(name, vendor, options),
            cpus: options.smp,
        });
        return JobOutcome::of_run(name, vendor, judgement, record);
    }
    let prepared = prepare(job, options);
    let (record, judgement, suite) = match prepared {
        Err(err) => {
            let why = err.to_string();
            let suite = match job {
                Job::Conformance(tests, ..) => {
                    Some(conformance::errored_suite(vendor, tests, &why))
                }
                Job::Scenario(..) | Job::Driven(..) | Job::Bench(_) | Job::OutOfTree(_) => None,
            };
            (None, Judgement::new(Status::Error, why), suite)
        }
        Ok(record) => match job {
            Job::Scenario(scenario, _) => {
                let judgement = scenarios::judge(scenario, &record);
                (Some(record), judgement, None)
            }
            Job::Conformance(..) | Job::Driven(..) | Job::Bench(_) | Job::OutOfTree(_) => {
                unreachable!("conformance, driven, bench and out-of-tree jobs are run on their own")
            }
        },
    };
    let seconds = record.as_ref().map_or(0.0, |r| r.elapsed.as_secs_f64());
    JobOutcome {
        name,
        vendor,
        judgement,
        seconds,
        record,
        suite,
    }
}

/// Tests per hypervisor boot: bounds each boot's memory (4 MiB per test) and time, and
/// keeps one crashing hypervisor from taking the whole suite with it.
const CONFORMANCE_BATCH: usize = 36;

/// One boot's share of the conformance tests.
type Batch<'a> = &'a [&'static TestInfo];

/// Splits `tests` into boots of at most `max` tests each (`max` >= 2), as evenly sized as the
/// fewest boots allow (147 tests: 30+30+30+30+27 rather than 36+36+36+36+3), never inside a
/// group of partners (`<x>_a` right before `<x>_b`, and `<x>_c` right after those): partners
/// talk across domains and find each other by domain id, so all must be in the same boot,
/// next to each other.
fn conformance_batches<'a>(tests: &'a [&'static TestInfo], max: usize) -> Vec<Batch<'a>> {
    // Whether test `i` and test `i + 1` are partners.
    let joined = |i: usize| {
        i + 1 < tests.len()
            && [("_a", "_b"), ("_b", "_c")].iter().any(|(this, next)| {
                tests[i]
                    .name
                    .strip_suffix(this)
                    .is_some_and(|stem| tests[i + 1].name.strip_suffix(next) == Some(stem))
            })
    };
    let boots = tests.len().div_ceil(max).max(1);
    let size = tests.len().div_ceil(boots);
    let mut batches = Vec::new();
    let mut rest = tests;
    let mut start = 0;
    while !rest.is_empty() {
        let mut len = size.min(rest.len());
        // A cut inside a group moves before the group (or, when the group is the whole
        // batch, after it).
        let mut cut = len;
        while cut > 0 && cut < rest.len() && joined(start + cut - 1) {
            cut -= 1;
        }
        if cut == 0 {
            cut = len;
            while cut < rest.len() && joined(start + cut - 1) {
                cut += 1;
            }
        }
        len = cut;
        let (batch, tail) = rest.split_at(len);
        batches.push(batch);
        rest = tail;
        start += len;
    }
    batches
}

/// Runs the conformance tests in batches, one boot each, and merges them into one suite.
fn run_conformance(
    name: &'static str,
    vendor: Vendor,
    tests: &[&'static TestInfo],
    dir: &RunDir,
    options: &SuiteOptions,
    cpus: Cpus,
) -> JobOutcome {
    let machine_cpus = match cpus {
        Cpus::Options => options.smp,
        Cpus::Two => Some(2),
    };
    let mut cases = Vec::new();
    let mut seconds = 0.0;
    // The record shown with the verdict: the first failing batch's, else the first one's.
    let mut shown: Option<RunRecord> = None;
    let mut shown_failed = false;
    // Memory a batch's hypervisor did not get back fails the run, whatever its tests say.
    let mut memory_problems = Vec::new();
    for (batch, tests) in conformance_batches(tests, CONFORMANCE_BATCH)
        .into_iter()
        .enumerate()
    {
        let dir = RunDir::new(dir.path.join(format!("batch-{batch}")));
        let modules = conformance::boot_modules(tests);
        let timeout = conformance::timeout(vendor, options.timeout, tests.len());
        let suite = match boot(&dir, vendor, &modules, timeout, name, options, machine_cpus) {
            Ok(record) => {
                let suite = conformance::suite(vendor, tests, &record);
                if let Some(problem) = record.log.memory_problem() {
                    memory_problems.push(format!("batch {batch}: {problem}"));
                }
                seconds += record.elapsed.as_secs_f64();
                let failed = suite.cases.iter().any(|c| !c.judgement.status.is_ok());
                if shown.is_none() || (failed && !shown_failed) {
                    shown = Some(record);
                    shown_failed = failed;
                }
                suite
            }
            Err(err) => conformance::errored_suite(vendor, tests, &err.to_string()),
        };
        cases.extend(suite.cases);
    }
    let suite = Suite {
        name: match cpus {
            Cpus::Options => vendor.name().to_string(),
            Cpus::Two => format!("{} 2cpus", vendor.name()),
        },
        seconds,
        cases,
    };
    let judgement = match &shown {
        Some(record) => summarize(&suite, record),
        None => Judgement::new(Status::Error, "no batch could be booted".to_string()),
    };
    let judgement = with_problems(judgement, memory_problems);
    JobOutcome {
        name,
        vendor,
        judgement,
        seconds,
        record: shown,
        suite: Some(suite),
    }
}

/// Builds the job's ISO and boots it.
fn prepare(job: &Job, options: &SuiteOptions) -> Result<RunRecord> {
    let dir = job.dir();
    // Scenarios write generated modules into the directory before the boot.
    fs::create_dir_all(&dir.path).context(|| format!("creating {}", dir.path.display()))?;
    let vendor = job.vendor();
    let (modules, timeout): (Vec<BootModule>, Duration) = match job {
        Job::Scenario(scenario, _) => (
            scenarios::boot_modules(scenario, &dir)?,
            options.timeout.unwrap_or_else(|| vendor.default_timeout()),
        ),
        Job::Conformance(tests, ..) => (
            conformance::boot_modules(tests),
            conformance::timeout(vendor, options.timeout, tests.len()),
        ),
        Job::Driven(..) | Job::Bench(_) => {
            unreachable!("driven and bench jobs boot on their own")
        }
        Job::OutOfTree(_) => unreachable!("out-of-tree jobs boot through cargo run"),
    };
    boot(
        &dir,
        vendor,
        &modules,
        timeout,
        job.name(),
        options,
        options.smp,
    )
}

/// Boots the hypervisor with `modules` in `dir`.
fn boot(
    dir: &RunDir,
    vendor: Vendor,
    modules: &[BootModule],
    timeout: Duration,
    name: &str,
    options: &SuiteOptions,
    cpus: Option<u16>,
) -> Result<RunRecord> {
    emulator::boot(&emulator::Boot {
        vendor,
        dir,
        hv_cmdline: "",
        modules,
        timeout,
        streaming: &streaming(name, vendor, options),
        icount: true,
        extras: RunExtras {
            cpus,
            ..RunExtras::default()
        },
    })
}

/// Where a run's serial lines go: nowhere, or with `--verbose` to stdout after its name.
fn streaming(name: &str, vendor: Vendor, options: &SuiteOptions) -> Streaming {
    if options.verbose {
        Streaming::Prefixed(format!("[{} {}] ", name, vendor.name()))
    } else {
        Streaming::Off
    }
}

/// `judgement` with `problems` added: a run that passed fails with them.
fn with_problems(mut judgement: Judgement, problems: Vec<String>) -> Judgement {
    if problems.is_empty() {
        return judgement;
    }
    if judgement.status.is_ok() {
        judgement.status = Status::Fail;
    }
    judgement.problems.extend(problems);
    judgement
}

/// One verdict for a whole conformance run, for the scenario table.
fn summarize(suite: &Suite, record: &RunRecord) -> Judgement {
    let failed: Vec<&str> = suite
        .cases
        .iter()
        .filter(|c| !c.judgement.status.is_ok())
        .map(|c| c.name.as_str())
        .collect();
    if failed.is_empty() {
        return Judgement::pass();
    }
    let status = match record.outcome() {
        RunOutcome::Timeout => Status::Timeout,
        RunOutcome::Crash => Status::Crash,
        RunOutcome::Success | RunOutcome::Failure => Status::Fail,
    };
    Judgement::new(
        status,
        format!("{} of {} tests failed", failed.len(), suite.cases.len()),
    )
}

/// Prints the tables and the failure details, writes the conformance reports; returns whether
/// every job passed.
fn report(outcomes: &[JobOutcome], options: &SuiteOptions) -> Result<bool> {
    let vendors = &options.vendors;
    let cell = |judgement: &Judgement, seconds: f64| {
        format!("{} {:.1}s", judgement.status.label(), seconds)
    };

    // Scenario x vendor.
    let mut names: Vec<&str> = Vec::new();
    for outcome in outcomes {
        if !names.contains(&outcome.name) {
            names.push(outcome.name);
        }
    }
    if !names.is_empty() {
        let mut header = vec!["scenario".to_string()];
        header.extend(vendors.iter().map(|v| v.name().to_string()));
        let mut table = Table::new(header);
        for name in &names {
            let mut row = vec![name.to_string()];
            for vendor in vendors {
                let found = outcomes
                    .iter()
                    .find(|o| o.name == *name && o.vendor == *vendor);
                row.push(found.map_or_else(|| "-".to_string(), |o| cell(&o.judgement, o.seconds)));
            }
            table.add_row(row);
        }
        println!("{}", table.render());
    }

    // Conformance test x vendor, and the machine-readable reports.
    let suites: Vec<Suite> = outcomes.iter().filter_map(|o| o.suite.clone()).collect();
    if let Some(first) = suites.first() {
        let mut header = vec!["conformance test".to_string()];
        header.extend(suites.iter().map(|s| s.name.clone()));
        let mut table = Table::new(header);
        for (index, case) in first.cases.iter().enumerate() {
            let mut row = vec![case.name.clone()];
            row.extend(
                suites
                    .iter()
                    .map(|s| s.cases[index].judgement.status.label().to_string()),
            );
            table.add_row(row);
        }
        println!("{}", table.render());
        let dir = workspace::lamina_dir();
        fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        let tap_path = dir.join("conformance.tap");
        fs::write(&tap_path, report::tap(&suites))
            .context(|| format!("writing {}", tap_path.display()))?;
        let junit_path = dir.join("conformance.junit.xml");
        fs::write(&junit_path, report::junit("lamina-conformance", &suites))
            .context(|| format!("writing {}", junit_path.display()))?;
        println!(
            "reports: {}, {}\n",
            show_path(&tap_path),
            show_path(&junit_path)
        );
    }

    for outcome in outcomes.iter().filter(|o| !o.judgement.status.is_ok()) {
        print_failure(outcome);
    }
    Ok(outcomes.iter().all(|o| o.judgement.status.is_ok()))
}

fn print_failure(outcome: &JobOutcome) {
    println!(
        "{} {} on {} ({:.1} s)",
        outcome.judgement.status.label(),
        outcome.name,
        outcome.vendor.name(),
        outcome.seconds
    );
    for problem in &outcome.judgement.problems {
        println!("  - {problem}");
    }
    if let Some(suite) = &outcome.suite {
        for case in suite.cases.iter().filter(|c| !c.judgement.status.is_ok()) {
            println!(
                "  {} {}: {}",
                case.judgement.status.label(),
                case.name,
                case.judgement.problems.join("; ")
            );
            for line in case.output.iter().rev().take(5).rev() {
                println!("      | {line}");
            }
        }
    }
    if let Some(record) = &outcome.record {
        // A conformance run that got to its result line is explained by its tests.
        let whole_run_failed = outcome.suite.is_none()
            || matches!(record.outcome(), RunOutcome::Crash | RunOutcome::Timeout);
        if whole_run_failed {
            println!("  {}; last lines of the serial log:", record.ending());
            for line in record.log.tail(TAIL_LINES) {
                println!("    | {line}");
            }
            if record.log.lines.is_empty() {
                println!(
                    "    (empty: nothing reached COM1; GRUB and firmware errors appear only on the emulated screen)"
                );
            }
        }
        println!("  serial log: {}", show_path(&record.dir.serial_log()));
        println!(
            "  emulator output: {}",
            show_path(&record.dir.emulator_output())
        );
        if record.vendor == Vendor::Intel {
            println!(
                "  Bochs log: {}",
                show_path(&record.dir.path.join(crate::bochs::BOCHS_LOG))
            );
        }
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::Expect;

    fn infos(names: &[&'static str]) -> Vec<&'static TestInfo> {
        names
            .iter()
            .map(|&name| {
                &*Box::leak(Box::new(TestInfo {
                    name,
                    title: "t",
                    section: "1 s",
                    expect: Expect::Success,
                    cmdline_extra: "",
                }))
            })
            .collect()
    }

    fn sizes(batches: &[&[&TestInfo]]) -> Vec<usize> {
        batches.iter().map(|b| b.len()).collect()
    }

    #[test]
    fn batches_are_even_and_at_most_max() {
        let names: Vec<&'static str> = (0..147)
            .map(|i| &*Box::leak(format!("t{i}").into_boxed_str()))
            .collect();
        let tests = infos(&names);
        let batches = conformance_batches(&tests, 36);
        assert_eq!(sizes(&batches), [30, 30, 30, 30, 27]);
        assert_eq!(batches.concat(), tests);
        assert_eq!(sizes(&conformance_batches(&tests[..36], 36)), [36]);
        assert_eq!(sizes(&conformance_batches(&tests[..37], 36)), [19, 18]);
        assert!(conformance_batches(&[], 36).is_empty());
    }

    #[test]
    fn a_pair_is_never_split() {
        let tests = infos(&["x", "p_a", "p_b", "y", "q_a", "q_b"]);
        let batches = conformance_batches(&tests, 2);
        assert_eq!(sizes(&batches), [1, 2, 1, 2]);
        assert_eq!(batches[1][0].name, "p_a");
        // Not a pair: different stems, or the wrong order.
        let tests = infos(&["x", "p_a", "r_b", "q_b", "q_a"]);
        assert_eq!(sizes(&conformance_batches(&tests, 2)), [2, 2, 1]);
        // A batch of one keeps the pair whole.
        let tests = infos(&["p_a", "p_b", "x"]);
        assert_eq!(sizes(&conformance_batches(&tests, 1)), [2, 1]);
    }

    #[test]
    fn a_group_of_three_is_never_split() {
        let tests = infos(&["x", "y", "t_a", "t_b", "t_c", "z"]);
        // A cut after t_a moves before it.
        assert_eq!(sizes(&conformance_batches(&tests, 3)), [2, 3, 1]);
        // A cut after t_b too.
        let tests = infos(&["x", "y", "t_a", "t_b", "t_c", "w", "v", "u"]);
        assert_eq!(sizes(&conformance_batches(&tests, 5)), [2, 4, 2]);
        // A cut after t_c is fine.
        let tests = infos(&["t_a", "t_b", "t_c", "x", "y", "z"]);
        assert_eq!(sizes(&conformance_batches(&tests, 3)), [3, 3]);
        // A group larger than a batch stays whole.
        let tests = infos(&["t_a", "t_b", "t_c", "x"]);
        assert_eq!(sizes(&conformance_batches(&tests, 2)), [3, 1]);
        // `_c` alone, or after another stem's `_b`, is no partner.
        let tests = infos(&["p_a", "p_b", "q_c", "x"]);
        assert_eq!(sizes(&conformance_batches(&tests, 2)), [2, 2]);
    }
}

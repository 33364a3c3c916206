//! `cargo xtask`: builds Lamina, boots it under emulators, and runs its tests.
//!
//! AMD-V runs use QEMU's TCG (SVM + NPT), Intel VT-x runs use Bochs (VMX + EPT): KVM on the
//! development and CI machines cannot nest. Everything xtask writes goes to `target/lamina/`.
// A binary crate: `pub` marks what a module offers the rest of xtask.
#![allow(unreachable_pub)]

mod bench;
mod bochs;
mod build_images;
mod chart;
mod conformance;
mod emulator;
mod error;
mod fuzz;
mod gdb;
mod guest;
mod iso;
mod measurement;
mod qemu;
mod report;
mod rustdoc;
mod scenarios;
mod serial_log;
mod suite;
mod toolchain;
mod tools;
mod trace;
mod workspace;

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::emulator::{
    ConsoleInput, RunDir, RunExtras, RunOutcome, RunRequest, Streaming, Vendor, show_path,
};
use crate::error::{Context, Error, Result};
use crate::iso::BootModule;
use crate::suite::SuiteOptions;
use crate::workspace::Artifact;

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, boot and test the Lamina hypervisor"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Build the hypervisor and the guests (release, x86_64-unknown-none).
    Build,
    /// Boot the hypervisor and guests (by default the sample guest and the ping/pong pair)
    /// under an emulator, with the serial console on stdout.
    /// Exits 0 only if the hypervisor reports `lamina: result: success`.
    Run(RunArgs),
    /// Run the host unit tests, every emulated scenario and the conformance suite.
    Test(SuiteArgs),
    /// Run only the conformance suite; writes target/lamina/conformance.{tap,junit.xml}.
    Conformance(SuiteArgs),
    /// Benchmark paravirtual against trapping operations (instructions and exits per
    /// operation); writes target/lamina/bench.{csv,svg}.
    Bench(BenchArgs),
    /// The cargo runner of guest crates: boots ELF as domain 1 and exits 0 when it powered
    /// off. A guest's .cargo/config.toml names it (see `new-guest`), so that `cargo run` and
    /// `cargo test` boot the kernel on Lamina.
    Runner(RunnerArgs),
    /// Write a minimal guest crate into PATH (a new directory): the SDK as a path
    /// dependency, the bare-metal target and the runner in .cargo/config.toml, a main.rs that
    /// prints and powers off.
    NewGuest(NewGuestArgs),
    /// Fuzz: `--host` runs the libFuzzer targets of fuzz/ (the hypervisor's vendor-neutral
    /// code on the host, through cargo-fuzz and a nightly toolchain, installed when missing).
    Fuzz(FuzzArgs),
}

#[derive(Args, Debug)]
struct RunnerArgs {
    /// amd (QEMU TCG) or intel (Bochs) [default: $LAMINA_VENDOR, else amd].
    #[arg(long, value_enum)]
    vendor: Option<Vendor>,
    /// Wall-clock limit in seconds [default: $LAMINA_TIMEOUT, else 60 for amd, 120 for intel].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// The hypervisor's command line, e.g. `loglevel=debug`.
    #[arg(long, value_name = "STR", default_value = "")]
    hv_cmdline: String,
    /// The directory a relative ELF path is relative to (the guest's runner line passes it).
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
    /// The kernel ELF cargo built.
    elf: PathBuf,
    /// Words for the kernel's command line, after its name (what follows `cargo run --`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Args, Debug)]
struct NewGuestArgs {
    /// The directory to create; its name becomes the crate's.
    path: PathBuf,
}

#[derive(Args, Debug)]
struct FuzzArgs {
    /// The host targets (libFuzzer) instead of the guest campaign under the emulators.
    #[arg(long)]
    host: bool,
    /// Guest campaign: which virtualization extensions.
    #[arg(long, value_enum, default_value_t = VendorChoice::All)]
    vendor: VendorChoice,
    /// Guest campaign: the seeds, `A-B` or `A` (kept failing seeds are always rerun).
    #[arg(long, value_name = "A-B", default_value = "1-10", value_parser = parse_seeds)]
    seeds: (u64, u64),
    /// Guest campaign: hypercalls per boot.
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    ops: u32,
    /// Guest campaign: the fuzzer prints every operation from the N-th on (to find the one a
    /// HANG stops at).
    #[arg(long, value_name = "N")]
    trace_from: Option<u32>,
    /// Guest campaign: the fuzzer is privileged and throws domain control at a second canary
    /// (domain 3) and at itself, never at the canary that decides the class (domain 1).
    #[arg(long)]
    privileged: bool,
    /// Guest campaign: the fuzzer domain's vCPUs (`vcpus=`, 1 to 8).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=8))]
    vcpus: u32,
    /// Guest campaign: the machine's CPUs (QEMU -smp N, Bochs cpu: count=N).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=8))]
    smp: Option<u16>,
    /// Guest campaign: seconds each boot may take (default: 60 on AMD-V, 120 on VT-x).
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// Only this target (default: all of them).
    #[arg(long, value_name = "T")]
    target: Option<String>,
    /// Seconds of fuzzing per target.
    #[arg(long, value_name = "S", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Which virtualization extensions to measure.
    #[arg(long, value_enum, default_value_t = VendorChoice::All)]
    vendor: VendorChoice,
    /// Compare with bench/baseline.csv; fail if a figure got more than 10% worse.
    #[arg(long)]
    check: bool,
    /// Measured iterations of each operation.
    #[arg(long, value_name = "N", default_value_t = bench::DEFAULT_ITERATIONS,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    iterations: u64,
    /// Wall-clock limit per run in seconds [default: grows with the iterations].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// Stream the serial consoles, lines prefixed with the vendor.
    #[arg(long, short)]
    verbose: bool,
    /// The hypervisor's command line, e.g. `spec-ctrl=none` or `spec-ctrl=all` to measure the
    /// speculative-execution defences.
    #[arg(long, value_name = "STR", default_value = "")]
    hv_cmdline: String,
    /// Only these groups, separated by commas: hypercall, cpuid, multicall, time, events,
    /// idle, timer, console, pingpong (the main run; `event_pingpong` and `domain_switch`
    /// always come with it), smp, smp2, smp4, scale (the runs with idle domains).
    #[arg(long, value_name = "GROUPS", value_delimiter = ',',
          value_parser = clap::builder::PossibleValuesParser::new(bench::groups()))]
    filter: Vec<String>,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Which virtualization extension to run on: amd (QEMU TCG) or intel (Bochs).
    #[arg(long, value_enum, default_value_t = Vendor::Amd)]
    vendor: Vendor,
    /// A guest ELF to boot, with its module command line (default: the file name as the domain
    /// name). Repeatable; without it, the sample guest runs, with the ping/pong pair of
    /// sample-domains next to it.
    #[arg(long = "guest", value_name = "PATH[:CMDLINE]", value_parser = parse_guest)]
    guests: Vec<BootModule>,
    /// Wall-clock limit in seconds [default: 60 for amd, 120 for intel].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// The hypervisor's command line, e.g. `loglevel=debug`.
    #[arg(long, value_name = "STR", default_value = "")]
    hv_cmdline: String,
    /// Boot this hypervisor ELF instead of the one built from hv/.
    #[arg(long, value_name = "PATH")]
    hv: Option<PathBuf>,
    /// QEMU only: `-icount shift=0`, so the TSC counts emulated instructions (for benchmarks).
    #[arg(long)]
    icount: bool,
    /// QEMU only: start QEMU's gdb stub (port 1234, or a free one), stopped before the first
    /// instruction, and print the gdb command that loads the symbols of the hypervisor and the
    /// guests. No timeout unless --timeout is given.
    #[arg(long)]
    gdb: bool,
    /// Type this file (`-` for standard input) into COM1, which the hypervisor hands to
    /// domain 1 (docs/abi.md 13); typing starts once domain 1 has started.
    #[arg(long, value_name = "FILE|-")]
    input: Option<PathBuf>,
    /// Record a timeline in the hypervisor (`trace=1`) and write it as Chrome trace-event
    /// JSON to target/lamina/run/<vendor>/trace.json (open it in https://ui.perfetto.dev).
    #[arg(long)]
    trace: bool,
    /// CPUs of the emulated machine (QEMU `-smp`, Bochs `cpu: count=`) [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    smp: Option<u16>,
}

/// `--vendor` for suites, which may cover both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum VendorChoice {
    Amd,
    Intel,
    All,
}

#[derive(Args, Debug)]
struct SuiteArgs {
    /// Which virtualization extensions to test.
    #[arg(long, value_enum, default_value_t = VendorChoice::All)]
    vendor: VendorChoice,
    /// Only what contains this text: scenario names, `conformance/<test>`, `host-unit-tests`,
    /// `fmt`, `clippy-host`, `clippy-bare-metal`.
    #[arg(long, value_name = "PAT")]
    filter: Option<String>,
    /// Base wall-clock limit per run in seconds [default: 60 for amd, 120 for intel; the
    /// conformance run adds 3 s (amd) or 5 s (intel) per test].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// How many emulators run at the same time.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    jobs: u16,
    /// Stream every run's serial console, lines prefixed with the run's name.
    #[arg(long, short)]
    verbose: bool,
    /// CPUs of the emulated machines (QEMU `-smp`, Bochs `cpu: count=`) [default: 1; the
    /// smp-boot scenario always has 2].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    smp: Option<u16>,
}

impl VendorChoice {
    fn vendors(self) -> Vec<Vendor> {
        match self {
            VendorChoice::Amd => vec![Vendor::Amd],
            VendorChoice::Intel => vec![Vendor::Intel],
            VendorChoice::All => Vendor::ALL.to_vec(),
        }
    }
}

impl SuiteArgs {
    fn options(&self) -> SuiteOptions {
        SuiteOptions {
            vendors: self.vendor.vendors(),
            filter: self.filter.clone(),
            timeout: self.timeout.map(Duration::from_secs),
            jobs: usize::from(self.jobs),
            verbose: self.verbose,
            smp: self.smp,
        }
    }
}

/// `A-B` or `A` of `--seeds`.
fn parse_seeds(text: &str) -> std::result::Result<(u64, u64), String> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let number = |t: &str| t.trim().parse::<u64>().map_err(|e| format!("{t}: {e}"));
    let (first, last) = (number(first)?, number(last)?);
    if first > last {
        return Err(format!("{first} is after {last}"));
    }
    Ok((first, last))
}

/// `PATH[:CMDLINE]` of `--guest`: the file must exist; the command line defaults to the file's
/// stem, which the hypervisor takes as the domain name.
fn parse_guest(spec: &str) -> std::result::Result<BootModule, String> {
    let (path, cmdline) = match spec.split_once(':') {
        Some((path, cmdline)) => (path, cmdline.trim().to_string()),
        None => (spec, String::new()),
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    let cmdline = if cmdline.is_empty() {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        cmdline
    };
    iso::check_cmdline(&cmdline).map_err(|err| err.to_string())?;
    let path = path
        .canonicalize()
        .map_err(|err| format!("{}: {err}", path.display()))?;
    Ok(BootModule { path, cmdline })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli.task) {
        Ok(code) => code,
        Err(Error::MissingTools(message)) => {
            eprintln!("xtask: {message}");
            ExitCode::from(2)
        }
        Err(Error::Failed(message)) => {
            eprintln!("xtask: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn execute(task: Task) -> Result<ExitCode> {
    let passed = match task {
        Task::Runner(args) => {
            return guest::runner(guest::RunnerOptions {
                vendor: args.vendor,
                timeout: args.timeout.map(Duration::from_secs),
                hv_cmdline: args.hv_cmdline,
                from: args.from,
                elf: args.elf,
                args: args.args,
            });
        }
        Task::NewGuest(args) => {
            let name = guest::new_guest(&args.path)?;
            eprintln!(
                "xtask: wrote the guest crate {name} in {}; `cargo run` there boots it on Lamina",
                show_path(&args.path)
            );
            true
        }
        Task::Build => build_images::build_images().map(|()| true)?,
        Task::Run(args) => run(args)?,
        Task::Test(args) => suite::test(&args.options())?,
        Task::Conformance(args) => suite::conformance(&args.options())?,
        Task::Fuzz(args) => fuzz_task(&args)?,
        Task::Bench(args) => bench::bench(&bench::BenchOptions {
            vendors: args.vendor.vendors(),
            iterations: args.iterations,
            check: args.check,
            timeout: args.timeout.map(Duration::from_secs),
            verbose: args.verbose,
            hv_cmdline: args.hv_cmdline,
            groups: (!args.filter.is_empty()).then_some(args.filter),
        })?,
    };
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `cargo xtask fuzz`; returns whether every target passed.
fn fuzz_task(args: &FuzzArgs) -> Result<bool> {
    if !args.host {
        let (first, last) = args.seeds;
        let vendors = args.vendor.vendors();
        let (passed, per_vendor) = fuzz::guest(&fuzz::GuestCampaign {
            vendors: &vendors,
            seeds: first..=last,
            ops: args.ops,
            trace_from: args.trace_from,
            privileged: args.privileged,
            vcpus: args.vcpus,
            cpus: args.smp,
            timeout: args.timeout.map(std::time::Duration::from_secs),
        })?;
        println!();
        for (vendor, operations) in per_vendor {
            println!("{}: {operations} operations", vendor.name());
        }
        return Ok(passed);
    }
    let (passed, outcomes) = fuzz::host(args.target.as_deref(), args.seconds, true)?;
    println!();
    for o in &outcomes {
        println!(
            "{:<14} {:<4} {:>10} runs {:>3} reproducers {:>5.0} s",
            o.target,
            if o.passed { "pass" } else { "FAIL" },
            o.runs,
            o.regressions,
            o.seconds
        );
    }
    Ok(passed)
}

/// What `cargo xtask run` boots without `--guest`: the sample guest (domain 1, with as many
/// vCPUs as `--smp` gives CPUs), then the ping/pong pair of `sample-domains` (domains 2 and 3), which exchange messages over a ring in
/// a page ping grants to pong, with inter-domain event notifications.
fn default_modules(cpus: Option<u16>) -> Vec<BootModule> {
    // With several CPUs the sample guest gets as many vCPUs (at most the 8 a domain may have).
    let sample = match cpus {
        Some(n) if n > 1 => format!("sample-guest vcpus={}", n.min(8)),
        _ => "sample-guest".to_string(),
    };
    [
        (Artifact::SampleGuest, sample.as_str()),
        (
            Artifact::SampleDomains,
            "ping role=ping peer=3 messages=10000 mem=4M",
        ),
        (Artifact::SampleDomains, "pong role=pong peer=2 mem=4M"),
    ]
    .into_iter()
    .map(|(artifact, cmdline)| BootModule {
        path: artifact.path(),
        cmdline: cmdline.to_string(),
    })
    .collect()
}

/// `cargo xtask run`; returns whether the hypervisor reported success.
fn run(args: RunArgs) -> Result<bool> {
    let vendor = args.vendor;
    if args.gdb && vendor == Vendor::Intel {
        return Err(error::failed(gdb::NO_BOCHS_STUB.to_string()));
    }
    let input = match args.input.as_deref() {
        None => None,
        Some(path) if path.as_os_str() == "-" => Some(ConsoleInput::Stdin),
        Some(path) if path.is_file() => Some(ConsoleInput::File(path.to_path_buf())),
        Some(path) => {
            return Err(error::failed(format!(
                "--input {}: no such file",
                path.display()
            )));
        }
    };
    tools::ensure(&[vendor])?;
    // With both a hypervisor and guests given there is nothing of ours to build.
    if args.hv.is_none() || args.guests.is_empty() {
        build_images::build_images()?;
    }
    let hv = args.hv.unwrap_or_else(|| Artifact::Hypervisor.path());
    let modules = if args.guests.is_empty() {
        default_modules(args.smp)
    } else {
        args.guests
    };
    let dir = RunDir::new(workspace::lamina_dir().join("run").join(vendor.name()));
    fs::create_dir_all(&dir.path).context(|| format!("creating {}", dir.path.display()))?;
    let hv_cmdline = if args.trace {
        format!("{} trace=1", args.hv_cmdline).trim().to_string()
    } else {
        args.hv_cmdline.clone()
    };
    iso::build_iso(&hv, &hv_cmdline, &modules, &dir.staging(), &dir.iso())?;

    // Under gdb the run waits for a person: it has no timeout unless asked.
    let timeout = match (args.timeout, args.gdb) {
        (Some(seconds), _) => Duration::from_secs(seconds),
        (None, true) => gdb::NO_TIMEOUT,
        (None, false) => vendor.default_timeout(),
    };
    let gdb_port = if args.gdb {
        let port = gdb::free_port(gdb::DEFAULT_PORT)?;
        let script = gdb::write_script(&dir, &hv, &modules, port)?;
        eprintln!(
            "xtask: QEMU waits for gdb on 127.0.0.1:{port}, stopped before the first instruction. In another terminal:\n\n  gdb -x {}\n\n{}",
            show_path(&script),
            gdb::NOTES
        );
        Some(port)
    } else {
        None
    };
    let emulator = match vendor {
        Vendor::Amd => "QEMU (AMD-V)",
        Vendor::Intel => "Bochs (Intel VT-x)",
    };
    eprintln!(
        "xtask: booting {} under {emulator}, timeout {} s; serial log: {}",
        show_path(&dir.iso()),
        timeout.as_secs(),
        show_path(&dir.serial_log())
    );
    let record = emulator::run_with(
        &RunRequest {
            vendor,
            dir: &dir,
            timeout,
            streaming: &Streaming::Plain,
            icount: args.icount,
        },
        &RunExtras {
            gdb_port,
            input,
            cpus: args.smp,
        },
    )?;
    let seconds = record.elapsed.as_secs_f64();
    let result_at = record.time_to_result.map_or(0.0, |at| at.as_secs_f64());
    match record.outcome() {
        RunOutcome::Success => {
            eprintln!(
                "xtask: SUCCESS (result line after {result_at:.2} s, {})",
                record.ending()
            )
        }
        RunOutcome::Failure => {
            eprintln!(
                "xtask: FAILURE (result line after {result_at:.2} s, {})",
                record.ending()
            )
        }
        RunOutcome::Crash => eprintln!(
            "xtask: CRASH: no result line; {} after {seconds:.1} s (see {})",
            record.ending(),
            show_path(&dir.emulator_output())
        ),
        RunOutcome::Timeout => eprintln!(
            "xtask: TIMEOUT: no result line within {} s; emulator killed",
            timeout.as_secs()
        ),
    }
    if args.trace {
        let path = dir.path.join("trace.json");
        let traces = trace::parse(&record.log).map_err(error::failed)?;
        if traces.is_empty() {
            return Err(error::failed("the hypervisor printed no trace"));
        }
        let file = trace::chrome_json(&traces, &trace::domain_names(&record.log));
        fs::write(&path, file.to_string()).context(|| format!("writing {}", path.display()))?;
        let records: usize = traces.iter().map(|t| t.records.len()).sum();
        let lost: u64 = traces.iter().map(|t| t.lost).sum();
        eprintln!(
            "xtask: trace: {records} records ({lost} overwritten) in {}; open it in https://ui.perfetto.dev",
            show_path(&path)
        );
    }
    if let Some(problem) = record.log.memory_problem() {
        eprintln!("xtask: FAILURE: {problem}");
        return Ok(false);
    }
    Ok(record.outcome() == RunOutcome::Success)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn guest_specs() {
        let path = std::env::current_exe().unwrap();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let plain = parse_guest(path.to_str().unwrap()).unwrap();
        assert_eq!(plain.cmdline, stem);
        let named = parse_guest(&format!("{}:dom mem=8M", path.display())).unwrap();
        assert_eq!(named.cmdline, "dom mem=8M");
        assert!(parse_guest("/no/such/guest.elf").is_err());
        assert!(parse_guest(&format!("{}:a;b", path.display())).is_err());
    }
}

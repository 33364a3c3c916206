//! A small kernel ported to Lamina, one operation group at a time.
//!
//! It prints a banner through the console hypercall, one line through the trapped UART, checks
//! the ABI version from CPUID against the version hypercall, and reads its memory map. Then it
//! selects its operation groups from the command line (`ops=pv`, the default, or
//! `ops=native`, with `pv.<group>=native|pv` overrides; see `lamina_guest_sdk::pvops`) and
//! runs [`kernel`]: its own IDT, a 1 ms timer tick driving a round-robin of four tasks for
//! 20 ticks, printing through the console and idling in the idle group (block or HLT).
//!
//! With `vcpus=` above 1 it then runs [`smp`] on every vCPU, through the smp group.
//!
//! Whatever the groups, it prints the same `sample-guest: results: ...` line, so two runs can
//! be compared; the lines that differ between modes (`mode=`, timing) say so. The hypervisor's
//! exit summary then shows what each mode cost. Any disagreement is printed and ends the
//! domain with `ShutdownReason::Crash`.
#![no_std]
#![no_main]

// On the host this kernel is only checked (clippy of the whole workspace), never linked: a
// stand-in for the SDK's panic handler, which exists on bare metal only.
#[cfg(not(any(test, target_os = "none")))]
#[panic_handler]
fn host_check_only(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

mod kernel;
mod smp;
mod tasks;

use core::fmt::Display;
use core::sync::atomic::Ordering;

use lamina_abi::memory::{MEMORY_MAP_MAX_REGIONS, MemoryRegion};
use lamina_abi::sched::ShutdownReason;
use lamina_guest_sdk::multicall::{Batch, Call};
use lamina_guest_sdk::pvops::{self, Backend, Selection};
use lamina_guest_sdk::{StartInfo, cpuid, hypercall, memory, print, println, uart};

lamina_guest_sdk::entry!(kernel_main);

fn kernel_main(start: &'static StartInfo) -> ! {
    println!(
        "sample-guest: hello from a Lamina domain (domain {}, {} MiB)",
        start.domain_id,
        start.mem_bytes >> 20
    );
    println!(
        "sample-guest: name {:?}, command line {:?}",
        start.name(),
        lamina_guest_sdk::cmdline()
    );
    uart::write_str("hello from the trapped UART\n");

    check_version();
    describe_memory();

    let selection = match Selection::from_cmdline(lamina_guest_sdk::cmdline()) {
        Ok(selection) => selection,
        Err(error) => fail(format_args!(
            "bad operation groups on the command line: {error}"
        )),
    };
    if let Err(error) = pvops::select(selection) {
        fail(format_args!("cannot select {selection}: {error}"));
    }
    let mode = match selection.uniform() {
        Some(Backend::Paravirt) => "pv",
        Some(Backend::Native) => "native",
        None => "mixed",
    };
    println!("sample-guest: mode={mode} ({selection})");
    println!(
        "sample-guest: backends: console {}, idle {}, timer {}, time {}, cpu {}",
        pvops::console().name(),
        pvops::idle().name(),
        pvops::timer().name(),
        pvops::clock().name(),
        pvops::cpu().name()
    );

    let report = match kernel::run() {
        Ok(report) => report,
        Err(error) => fail(format_args!(
            "cannot start the {} timer: {error}",
            pvops::timer().name()
        )),
    };
    println!(
        "sample-guest: {} ticks of {} us in {}.{:03} ms ({} clock), {} task switches, {} late ticks (differs by mode)",
        report.ticks,
        kernel::TICK_NS / 1000,
        report.elapsed_ns / 1_000_000,
        report.elapsed_ns / 1000 % 1000,
        pvops::clock().name(),
        report.switches,
        report.late_ticks
    );
    check_results(&report);
    if start.nr_vcpus > 1
        && let Err(why) = smp::run(start.nr_vcpus)
    {
        fail(why);
    }
    println!("sample-guest: powering off");
    hypercall::shutdown(ShutdownReason::Poweroff)
}

/// CPUID's ABI version must match the version hypercall's.
fn check_version() {
    let Some(leaves) = cpuid::lamina_leaves() else {
        fail("the Lamina CPUID leaves are missing (not running on Lamina?)")
    };
    println!(
        "sample-guest: ABI version {}.{} (CPUID {:#x}), features {:#x}: {}",
        leaves.version >> 16,
        leaves.version & 0xffff,
        lamina_abi::cpuid::LEAF_VERSION,
        leaves.features.0,
        leaves.features
    );
    match hypercall::version() {
        Ok(version) if version == u64::from(leaves.version) => {
            println!("sample-guest: the version hypercall agrees ({version:#x})");
        }
        Ok(version) => fail(format_args!(
            "the version hypercall returned {version:#x}, CPUID says {:#x}",
            leaves.version
        )),
        Err(error) => fail(format_args!("the version hypercall failed: {error}")),
    }
}

/// Prints the memory map, and the version and RAM size fetched with one multicall.
fn describe_memory() {
    let mut regions = [MemoryRegion::default(); MEMORY_MAP_MAX_REGIONS];
    let count = match memory::memory_map(&mut regions) {
        Ok(count) => count,
        Err(error) => fail(format_args!("memory_op get_memory_map failed: {error}")),
    };
    for region in &regions[..count.min(regions.len())] {
        println!(
            "sample-guest: memory {:#010x}-{:#010x} {}",
            region.base,
            region.base + region.length,
            memory::kind_name(region.kind)
        );
    }

    let mut batch = Batch::<2>::new();
    let (Ok(version), Ok(reservation)) = (
        batch.push(Call::version()),
        batch.push(Call::current_reservation()),
    ) else {
        unreachable!("a batch of two holds two calls")
    };
    if let Err(error) = batch.submit() {
        fail(format_args!("multicall failed: {error}"));
    }
    match (batch.result(version), batch.result(reservation)) {
        (Some(Ok(version)), Some(Ok(bytes))) => println!(
            "sample-guest: multicall: version {}.{}, {} MiB of RAM",
            version >> 16,
            version & 0xffff,
            bytes >> 20
        ),
        other => fail(format_args!("multicall results: {other:?}")),
    }
}

/// Prints the line that must be the same in every mode, and checks it against what the task
/// periods predict.
fn check_results(report: &kernel::Report) {
    let counter = tasks::COUNTER.load(Ordering::Relaxed);
    let fibonacci = tasks::fibonacci_value();
    let probes = tasks::PROBES_OK.load(Ordering::Relaxed);
    let reports = tasks::REPORTS.load(Ordering::Relaxed);
    let [counter_runs, fibonacci_runs, probe_runs, report_runs] = report.runs;
    println!(
        "sample-guest: results: ticks={} counter={counter} fibonacci={fibonacci_runs}:{fibonacci} cpu-probes={probes}/{probe_runs} reports={reports}",
        report.ticks
    );
    print!("sample-guest: runs:");
    for (task, runs) in tasks::TASKS.iter().zip(report.runs) {
        print!(" {}={runs}", task.name);
    }
    println!();
    let expected: [u64; kernel::TASK_COUNT] = tasks::TASKS
        .each_ref()
        .map(|task| kernel::expected_runs(task.period_ticks));
    if report.ticks != kernel::TICKS || report.runs != expected {
        fail(format_args!(
            "expected {} ticks and runs {expected:?}, got {} ticks and runs {:?}",
            kernel::TICKS,
            report.ticks,
            report.runs
        ));
    }
    if counter != counter_runs || probes != probe_runs || reports != report_runs {
        fail("a task's own count disagrees with the scheduler's");
    }
}

/// Reports what went wrong and ends the domain as crashed.
fn fail(why: impl Display) -> ! {
    println!("sample-guest: error: {why}");
    hypercall::shutdown(ShutdownReason::Crash)
}

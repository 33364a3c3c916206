//! The kernel's tasks: small, deterministic steps whose results do not depend on timing, so
//! the native and the paravirtual runs can be compared line for line.

use core::sync::atomic::{AtomicU64, Ordering};

use lamina_abi::cpuid::{LEAF_SIGNATURE, signature_regs};
use lamina_guest_sdk::println;
use lamina_guest_sdk::pvops;
use lamina_guest_sdk::x2apic;

use crate::kernel::TaskSpec;

/// The tasks, in round-robin order.
pub(crate) static TASKS: [TaskSpec; 4] = [
    TaskSpec {
        name: "counter",
        period_ticks: 1,
        step: count,
    },
    TaskSpec {
        name: "fibonacci",
        period_ticks: 2,
        step: fibonacci,
    },
    TaskSpec {
        name: "cpu-probe",
        period_ticks: 4,
        step: probe_cpu,
    },
    TaskSpec {
        name: "reporter",
        period_ticks: 5,
        step: report,
    },
];

/// What the counter counted.
pub(crate) static COUNTER: AtomicU64 = AtomicU64::new(0);

fn count(_run: u64) {
    COUNTER.fetch_add(1, Ordering::Relaxed);
}

/// The Fibonacci pair `(F(n), F(n + 1))`, packed as low and high u32 halves; starts at
/// `(F(0), F(1)) = (0, 1)`.
static FIBONACCI: AtomicU64 = AtomicU64::new(1 << 32);

/// F(n) after n steps.
pub(crate) fn fibonacci_value() -> u64 {
    FIBONACCI.load(Ordering::Relaxed) & 0xffff_ffff
}

fn fibonacci(_run: u64) {
    let pair = FIBONACCI.load(Ordering::Relaxed);
    let (current, next) = (pair & 0xffff_ffff, pair >> 32);
    let (current, next) = (next, (current + next) & 0xffff_ffff);
    FIBONACCI.store(current | next << 32, Ordering::Relaxed);
}

/// Probes that found what they expected.
pub(crate) static PROBES_OK: AtomicU64 = AtomicU64::new(0);

/// Asks the CPU group who we are, as a kernel does on its hot paths (which hypervisor, which
/// vCPU): natively a trapping CPUID and RDMSR each time, paravirtually the cached values.
fn probe_cpu(_run: u64) {
    let cpu = pvops::cpu();
    let signature = cpu.cpuid(LEAF_SIGNATURE, 0);
    let on_lamina = [signature.ebx, signature.ecx, signature.edx] == signature_regs();
    // SAFETY: the x2APIC ID MSR exists on Lamina (docs/abi.md 14) and is read-only.
    let apic_id = unsafe { cpu.read_msr(x2apic::ID) };
    if on_lamina && apic_id == 0 {
        PROBES_OK.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lines the reporter printed.
pub(crate) static REPORTS: AtomicU64 = AtomicU64::new(0);

fn report(run: u64) {
    let reports = REPORTS.fetch_add(1, Ordering::Relaxed) + 1;
    println!(
        "sample-guest: report {reports} at tick {}",
        run * TASKS[3].period_ticks
    );
}

//! `role=neighbour` and `role=quiet`: the two well-behaved domains of the `resource-hog`
//! scenario. The run has two phases of `phase_ms=` of system time, the first starting at
//! `start_ms=` and the second `gap_ms=` after the first ends. The neighbour computes through
//! both and counts the rounds of work it finished in each; beside it, the quiet domain (of the
//! same weight) spins through the first phase and sleeps through the second, while the hog
//! ([`crate::hog`]) sleeps through the first and attacks through the second. So the neighbour's
//! two counts are the same work beside a fair competitor and beside a hostile one, in one run
//! on the same machine: it prints
//!
//! ```text
//! neighbour: result: beside_quiet=<rounds> beside_hog=<rounds> hog_over_quiet=<ratio>
//! ```
//!
//! and the scenario holds the second count against the first.

use lamina_guest_sdk::{println, time};

/// The times of the two phases, in ns of system time, from the command line.
#[derive(Clone, Copy)]
pub(crate) struct Phases {
    /// Start of the phase beside the quiet domain.
    pub(crate) quiet_from: u64,
    /// Start of the phase beside the hog.
    pub(crate) hog_from: u64,
    /// Length of each phase.
    pub(crate) length: u64,
}

impl Phases {
    pub(crate) fn new(start_ms: u32, phase_ms: u32, gap_ms: u32) -> Self {
        const MS: u64 = 1_000_000;
        let quiet_from = u64::from(start_ms) * MS;
        Phases {
            quiet_from,
            hog_from: quiet_from + u64::from(phase_ms + gap_ms) * MS,
            length: u64::from(phase_ms) * MS,
        }
    }
}

/// Work the compiler cannot skip: `rounds` of 256 xorshift steps until system time `end`.
fn work_until(end: u64) -> u64 {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rounds = 0u64;
    while time::now_ns() < end {
        for _ in 0..256 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
        }
        rounds += 1;
    }
    core::hint::black_box(state);
    rounds
}

/// Sleeps (without a timer or an upcall) until system time `at`.
pub(crate) fn sleep_until(role: &str, at: u64) {
    let now = time::now_ns();
    if now < at {
        crate::sleep_ns(role, at - now);
    }
}

pub(crate) fn run_neighbour(phases: Phases) -> ! {
    if time::now_ns() >= phases.quiet_from {
        crate::fail(
            "neighbour",
            format_args!("started after its first phase began: start_ms= is too early"),
        );
    }
    sleep_until("neighbour", phases.quiet_from);
    let beside_quiet = work_until(phases.quiet_from + phases.length);
    sleep_until("neighbour", phases.hog_from);
    let beside_hog = work_until(phases.hog_from + phases.length);
    println!(
        "neighbour: result: beside_quiet={beside_quiet} beside_hog={beside_hog} hog_over_quiet={}",
        crate::Decimal3 {
            numerator: beside_hog,
            denominator: beside_quiet,
        }
    );
    crate::finish(0)
}

pub(crate) fn run_quiet(phases: Phases) -> ! {
    sleep_until("quiet", phases.quiet_from);
    let rounds = work_until(phases.quiet_from + phases.length);
    // Asleep while the hog runs: the neighbour's only competitor is then the hog.
    sleep_until("quiet", phases.hog_from + phases.length);
    println!("quiet: result: rounds={rounds}");
    crate::finish(0)
}

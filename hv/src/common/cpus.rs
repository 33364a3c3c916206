//! Which physical CPUs run vCPUs and which of them are idle, and kicking one: what the run
//! loop ([`crate::common::sched`]) and a vCPU's requests ([`crate::common::vcpu::state`])
//! share, kept apart from both so that neither imports the other for it.

/// Several CPUs run vCPUs (`sched::Machine::set_cpus_online`): requests kick and wake CPUs.
static SEVERAL_CPUS: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Whether several CPUs run vCPUs.
#[inline]
pub fn several_cpus() -> bool {
    SEVERAL_CPUS.load(core::sync::atomic::Ordering::Relaxed)
}

/// The CPUs halted in `sched::Machine::run_cpu` with nothing to run, a bit per CPU index.
static IDLE_CPUS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Slices each CPU ran and the time they took, by CPU index (the summary's `cpu` lines, on a
/// machine with several CPUs).
static CPU_SLICES: [core::sync::atomic::AtomicU64; 64] =
    [const { core::sync::atomic::AtomicU64::new(0) }; 64];
static CPU_BUSY_NS: [core::sync::atomic::AtomicU64; 64] =
    [const { core::sync::atomic::AtomicU64::new(0) }; 64];

/// (slices run, ns spent running vCPUs) of CPU `cpu`.
pub fn cpu_figures(cpu: usize) -> (u64, u64) {
    let at = cpu.min(63);
    (
        CPU_SLICES[at].load(core::sync::atomic::Ordering::Relaxed),
        CPU_BUSY_NS[at].load(core::sync::atomic::Ordering::Relaxed),
    )
}

/// Makes CPU `cpu` take an interrupt: a guest running there exits (a request waits for it).
pub fn kick_cpu(cpu: usize) {
    #[cfg(target_os = "none")]
    crate::platform::smp::kick(cpu);
    #[cfg(not(target_os = "none"))]
    let _ = cpu;
}

/// Wakes one idle CPU among `allowed` (a bit per CPU), if there is one, to look at the vCPUs
/// again (one that may run there was made ready).
pub fn wake_an_idle_cpu(allowed: u64) {
    // Counted before the idle CPUs are looked at: a CPU about to halt marks itself idle,
    // then looks at the count (`sched`'s pass), so one of the two sees the other.
    WAKES.fetch_add(1, core::sync::atomic::Ordering::SeqCst);
    let idle = IDLE_CPUS.load(core::sync::atomic::Ordering::SeqCst) & allowed;
    if idle != 0 {
        kick_cpu(idle.trailing_zeros() as usize);
    }
}

/// As [`wake_an_idle_cpu`], with CPU `home` first if it is idle and allowed: the vCPU made
/// ready waits in its run queue (`sched::run_queues`); another idle CPU takes it from there.
pub fn wake_an_idle_cpu_preferring(home: usize, allowed: u64) {
    WAKES.fetch_add(1, core::sync::atomic::Ordering::SeqCst);
    let idle = IDLE_CPUS.load(core::sync::atomic::Ordering::SeqCst) & allowed;
    let home_bit = 1u64 << home.min(63);
    if idle & home_bit != 0 {
        kick_cpu(home.min(63));
    } else if idle != 0 {
        kick_cpu(idle.trailing_zeros() as usize);
    }
}

/// vCPUs moved from one CPU's run queue to another's.
static MIGRATIONS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Counts a vCPU moved to another CPU's run queue.
pub fn count_migration() {
    MIGRATIONS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
}

/// Slices a vCPU ran on another CPU than its last one.
static CPU_CHANGES: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Counts a slice a vCPU runs on another CPU than its last one (its hardware state loaded
/// there afresh: a VMPTRLD and host state, or a new ASID's flush).
pub fn count_cpu_change() {
    CPU_CHANGES.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
}

/// How many slices ran on another CPU than their vCPU's last one so far.
pub fn cpu_changes() -> u64 {
    CPU_CHANGES.load(core::sync::atomic::Ordering::Relaxed)
}

/// How many vCPUs moved to another CPU's run queue so far.
pub fn migrations() -> u64 {
    MIGRATIONS.load(core::sync::atomic::Ordering::Relaxed)
}

/// How many times something asked for an idle CPU to be woken ([`wake_an_idle_cpu`]).
static WAKES: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// The count of [`wake_an_idle_cpu`] calls so far: a CPU that passes over the domains without
/// their common lock compares it before and after, so as not to halt past a wake-up it
/// could not see.
pub fn wake_count() -> u64 {
    WAKES.load(core::sync::atomic::Ordering::SeqCst)
}

/// Wakes every idle CPU (the domains all ended: each leaves its loop).
pub fn wake_all_idle_cpus() {
    let mut idle = IDLE_CPUS.load(core::sync::atomic::Ordering::Relaxed);
    while idle != 0 {
        kick_cpu(idle.trailing_zeros() as usize);
        idle &= idle - 1;
    }
}

/// Declares whether several CPUs run vCPUs.
pub fn set_several(several: bool) {
    SEVERAL_CPUS.store(several, core::sync::atomic::Ordering::Relaxed);
}

/// Marks the CPU `cpu_bit` (its bit) idle, or busy again. Idle is set before the CPU lets the
/// domain table go, so whoever makes a vCPU ready after that sees it and kicks the CPU.
pub fn set_idle(cpu_bit: u64, idle: bool) {
    if idle {
        IDLE_CPUS.fetch_or(cpu_bit, core::sync::atomic::Ordering::SeqCst);
    } else {
        IDLE_CPUS.fetch_and(!cpu_bit, core::sync::atomic::Ordering::SeqCst);
    }
}

/// Counts a slice of `ns` that CPU `cpu` ran.
pub fn count_slice(cpu: usize, ns: u64) {
    CPU_SLICES[cpu.min(63)].fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    CPU_BUSY_NS[cpu.min(63)].fetch_add(ns, core::sync::atomic::Ordering::Relaxed);
}

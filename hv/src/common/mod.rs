//! Vendor-neutral hypervisor logic; nothing here knows whether VT-x or AMD-V is underneath.
//!
//! At the top, what every exit goes through: [`exits`] (the vendor-neutral exit handling) and
//! [`hypercall`] (the one hypercall dispatcher). Below it, one wing per subsystem:
//!
//! - [`sched`]: the domain table every CPU shares, the run loop and the locks (`locking`);
//! - [`domain`]: a domain, its configuration, building, control, counters and teardown;
//! - [`vcpu`]: the backend interface and the per-vCPU state, registers and emulation;
//! - [`events`], [`grants`]: event channels and grant tables;
//! - [`memory`]: guest memory, guest page tables, nested page tables, physical pages;
//! - [`devices`]: the emulated UART and x2APIC;
//! - [`cpus`]: which physical CPUs run vCPUs, which are idle, kicking them;
//! - [`time`], [`output`], [`trace`]: system time, console output, the timeline.

pub mod cpus;
pub mod devices;
pub mod domain;
pub mod events;
pub mod exits;
pub mod grants;
pub mod hypercall;
pub mod memory;
pub mod output;
pub mod sched;
pub mod time;
pub mod trace;
pub mod vcpu;

// Host test support, also for the fuzz targets (fuzz/, built with `--cfg fuzzing`).
#[cfg(any(test, fuzzing))]
pub(crate) mod testing;

//! Vendor-neutral hypervisor logic: domains, the domain builder, exit and hypercall handling,
//! device emulation, scheduling. Nothing here knows whether VT-x or AMD-V is underneath.

pub mod apic_bus;
pub mod builder;
pub mod config;
pub mod control_regs;
pub mod cpuid;
pub mod domain;
pub mod domctl;
pub mod events;
pub mod exits;
pub mod grant_table;
pub mod guest_memory;
pub mod guest_paging;
pub mod hypercall;
pub mod locking;
pub mod nested_map;
pub mod output;
pub mod phys;
pub mod scheduler;
pub mod stats;
pub mod string_io;
pub mod teardown;
pub mod time;
pub mod trace;
pub mod uart;
pub mod vcpu;
pub mod vcpu_state;
pub mod vlapic;
pub mod xstate;

// Host test support, also for the fuzz targets (fuzz/, built with `--cfg fuzzing`).
#[cfg(any(test, fuzzing))]
pub(crate) mod testing;

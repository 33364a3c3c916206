//! Platform code: everything about the machine the hypervisor itself runs on (boot, console,
//! descriptor tables, memory), nothing about virtualization.

#[cfg(target_os = "none")]
pub mod apic;
#[cfg(target_os = "none")]
pub mod boot;
#[cfg(target_os = "none")]
pub mod clock;
#[cfg(target_os = "none")]
pub mod cpu;
#[cfg(target_os = "none")]
pub mod debug_regs;
#[cfg(target_os = "none")]
pub mod exit;
#[cfg(target_os = "none")]
pub mod memory;
pub mod multiboot;
#[cfg(target_os = "none")]
pub mod percpu;
pub mod phys_alloc;
#[cfg(target_os = "none")]
pub mod serial;
pub mod smp;
pub mod spec_ctrl;
#[cfg(target_os = "none")]
pub mod xstate;

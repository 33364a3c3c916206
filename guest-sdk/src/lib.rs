//! What a Rust kernel links to run as a Lamina domain.
//!
//! The SDK owns the guest side of the ABI in `lamina-abi` and `docs/abi.md`:
//!
//! - `entry!` and the `_start` symbol (feature `entry`, on by default): the kernel writes no
//!   assembly. `_start` aligns the stack, validates and copies [`StartInfo`], picks the
//!   hypercall instruction native to the CPU, and calls the kernel's main function. A kernel
//!   with its own `_start` calls [`start::init`] instead.
//! - [`hypercall`]: raw hypercalls with either instruction, and typed wrappers.
//! - [`console`]: [`print!`]/[`println!`], line-buffered, through the console backend
//!   ([`console::ring`] for the console ring), and the same machinery for a kernel's own
//!   macros ([`console::Console`], [`console::print`]); [`uart`]: the trapped COM1.
//! - [`time`]: system time from the pvclock, a monotonic clock, the wall clock; no exits.
//! - [`timer`]: the paravirtual periodic and one-shot timers (VIRQ_TIMER).
//! - [`events`]: event channels (bind, send, close, mask) and the dispatcher that runs a
//!   kernel's handlers from the upcall with Xen's two-level scan.
//! - [`sched`]: yield, block, poll, shutdown.
//! - [`multicall`]: a typed batch of hypercalls made with one exit.
//! - [`memory`], [`vcpu`]: the memory map and size; per-vCPU registrations and timers.
//! - [`stats`]: exit accounting, the exits a vCPU caused by kind and hypercall (ABI 1.1).
//! - [`grant`]: grant tables, pages shared with other domains (ABI 1.3); [`domctl`]: domain
//!   control for privileged domains: list, console, pause, unpause, destroy (ABI 1.3).
//! - [`interrupts`]: a static IDT with exception reports, handlers by vector, and a hook where
//!   a scheduler switches tasks on the way out of an interrupt; or, for a kernel that keeps its
//!   own IDT, entry points and handler functions to route from it ([`interrupts::Routing`]).
//! - [`pvops`]: operation groups (console, idle, timer, time, cpu, smp) with a native and a
//!   paravirtual backend each, selected per group at boot.
//! - [`shared`]: atomic access to the shared-info page; [`msr`], [`x2apic`], [`port`]: the
//!   trapping instructions and the emulated x2APIC.
//! - [`percpu`]: which vCPU the code runs on, for kernels with several vCPUs.
//! - [`cpuid`]: Lamina discovery through CPUID leaves `0x4000_0000`, `0x4000_0001` and
//!   `0x4000_0010`.
//! - [`start_info()`], [`cmdline()`], [`cmdline_value()`]: what the hypervisor said at boot.
//! - [`panic`](mod@panic): a panic handler (feature `panic-handler`, on by default) that prints
//!   `panic: <message> at <location>` and shuts down with
//!   [`ShutdownReason::Crash`](lamina_abi::sched::ShutdownReason::Crash); its report
//!   ([`panic::report`]) for a kernel's own handler.
//!
//! # Cargo features
//!
//! | feature | default | what |
//! |---|---|---|
//! | `entry` | on | the SDK's `_start` and the `entry!` macro; off: the kernel's own `_start` calls [`start::init`] |
//! | `panic-handler` | on | the SDK's `#[panic_handler]`; off: the kernel's own handler may call [`panic::report`] |
//!
//! A kernel that defines its own of either turns the defaults off:
//! `lamina-guest-sdk = { path = "...", default-features = false }` (duplicate lang item
//! `panic_impl`, or a duplicate symbol `_start`, otherwise). docs/porting.md walks through
//! porting an existing kernel.
//!
//! The SDK runs on the boot vCPU (vCPU 0), and on every vCPU of a kernel that records
//! which vCPU it runs on with [`percpu::init_this_vcpu`] (its events, idle and smp groups then
//! act on the calling vCPU).
//!
//! The SDK keeps the boot identity map: it passes the address of a buffer as its guest-physical
//! address. A kernel that builds its own page tables must keep RAM identity-mapped or call the
//! raw [`hypercall`] functions with translated addresses.
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use lamina_guest_sdk::{println, StartInfo};
//!
//! lamina_guest_sdk::entry!(kernel_main);
//!
//! fn kernel_main(start: &'static StartInfo) {
//!     println!("hello from domain {}", start.domain_id);
//! } // returning powers the domain off
//! ```
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

pub mod cmdline;
pub mod console;
pub mod cpuid;
pub mod domctl;
pub mod events;
pub mod grant;
pub mod hypercall;
pub mod interrupts;
pub mod memory;
pub mod msr;
pub mod multicall;
pub mod panic;
pub mod percpu;
pub mod port;
pub mod pvops;
pub mod sched;
pub mod shared;
pub mod start;
pub mod stats;
pub mod time;
pub mod timer;
pub mod uart;
pub mod vcpu;
pub mod x2apic;
pub mod xstate;

mod sync;

pub use lamina_abi as abi;
pub use lamina_abi::{Errno, StartInfo};
pub use start::{cmdline, cmdline_value, start_info, start_info_gpa};

/// Declares the kernel's main function, which `_start` calls once the SDK is set up.
///
/// The function takes the domain's [`StartInfo`] (the SDK's validated copy) and either never
/// returns (`-> !`, for example by calling [`hypercall::shutdown`]) or returns `()`, which
/// powers the domain off with [`ShutdownReason::Poweroff`](lamina_abi::sched::ShutdownReason).
///
/// ```ignore
/// lamina_guest_sdk::entry!(kernel_main);
/// fn kernel_main(start: &'static lamina_guest_sdk::StartInfo) -> ! { ... }
/// ```
///
/// Use it exactly once, in the kernel's binary crate. Needs the feature `entry` (on by
/// default), which also defines `_start`.
#[cfg(feature = "entry")]
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// The kernel's main function as the SDK's start code calls it (see [`entry!`]).
        #[unsafe(no_mangle)]
        // When the kernel's main returns `!`, the shutdown below is unreachable.
        #[allow(unreachable_code, clippy::diverging_sub_expression)]
        fn __lamina_kernel_main(start: &'static $crate::StartInfo) -> ! {
            // `()` or `!`: any other return type is a compile error here.
            let () = $main(start);
            $crate::hypercall::shutdown($crate::abi::sched::ShutdownReason::Poweroff)
        }
    };
}

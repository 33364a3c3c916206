//! Panics: the report the SDK prints, and the `#[panic_handler]` that uses it.
//!
//! With the default feature `panic-handler` the SDK defines the kernel's panic handler: it
//! prints `panic: <message> at <location>` on the console and shuts the domain down with
//! [`ShutdownReason::Crash`]. It prints no test verdict: a test runner that expects one (the
//! conformance suite's `Test result:` line) treats its absence as a crash.
//!
//! A kernel that wants its own handler (a `should_panic` test, where a panic is success; a
//! kernel that dumps its own state first) turns the feature off and calls [`report`] or
//! [`report_and_crash`] from it:
//!
//! ```toml
//! lamina-guest-sdk = { path = "../lamina/guest-sdk", default-features = false, features = ["entry"] }
//! ```
//!
//! ```ignore
//! #[panic_handler]
//! fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
//!     lamina_guest_sdk::panic::report(info); // "panic: ... at src/main.rs:12:5"
//!     lamina_guest_sdk::println!("[ok] the test panicked as it should");
//!     lamina_guest_sdk::hypercall::shutdown(lamina_guest_sdk::abi::sched::ShutdownReason::Poweroff)
//! }
//! ```

use core::panic::PanicInfo;

use lamina_abi::sched::ShutdownReason;

/// Prints `panic: <message> at <location>` on its own line of the console (ending a partial
/// line first), through whichever console backend is selected. The console ring is printed
/// at the domain's next exit (a shutdown is one); call [`crate::console::flush`] to have it
/// printed now.
pub fn report(info: &PanicInfo<'_>) {
    crate::console::finish_line();
    match info.location() {
        Some(location) => crate::println!("panic: {} at {location}", info.message()),
        None => crate::println!("panic: {} at an unknown location", info.message()),
    }
}

/// [`report`], then `sched_op` shutdown with [`ShutdownReason::Crash`]: what the SDK's own
/// panic handler does.
pub fn report_and_crash(info: &PanicInfo<'_>) -> ! {
    report(info);
    crate::hypercall::shutdown(ShutdownReason::Crash)
}

#[cfg(all(target_os = "none", not(test), feature = "panic-handler"))]
#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    report_and_crash(info)
}

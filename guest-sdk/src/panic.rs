//! The panic handler: `panic: <message> at <location>` on the console, then
//! [`ShutdownReason::Crash`]. It prints no test verdict: a test runner that expects one (the
//! conformance suite's `Test result:` line) treats its absence as a crash.

#[cfg(all(target_os = "none", not(test)))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use lamina_abi::sched::ShutdownReason;

    crate::console::finish_line();
    match info.location() {
        Some(location) => crate::println!("panic: {} at {location}", info.message()),
        None => crate::println!("panic: {} at an unknown location", info.message()),
    }
    crate::hypercall::shutdown(ShutdownReason::Crash)
}

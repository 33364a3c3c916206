//! The Lamina conformance suite, XTF-style: one test per domain.
//!
//! The hypervisor boots one domain per test; the test to run is `test=<name>` on the domain's
//! command line, or else the domain's name. The kernel prints `Test: <name>: <title>`, runs the
//! test's body, and ends with exactly one `Test result: SUCCESS|SKIP|ERROR|FAILURE` line (the
//! most severe outcome recorded) before powering off. An unknown name gives `ERROR`.
//!
//! - [`catalog`]: names, titles, docs/abi.md sections, expected endings (shared with xtask,
//!   generated from the `conformance_test!` block above each body),
//! - [`tests`]: the bodies, by ABI family, and the registry,
//! - [`framework`]: outcomes and assertion helpers,
//! - [`hv`]: the hypercalls, raw, and [`console`]: `println!` through them,
//! - [`shared`]: the shared-info page, the pvclock and the console ring,
//! - [`irq`]: the tests' interrupt handler and what it saw,
//! - [`timing`]: "never early, not absurdly late", corrected for steal time,
//! - [`x86`]: the CPU machinery the tests need (GDT, IDT, CPL 3, a register probe, MSRs, the
//!   local APIC).
//!
//! Every test runs in a domain of 4 MiB (the smallest, `mem=4M`) as well as in a larger one.
#![no_std]
#![no_main]

// On the host this kernel is only checked (clippy of the whole workspace), never linked: a
// stand-in for the SDK's panic handler, which exists on bare metal only.
#[cfg(not(any(test, target_os = "none")))]
#[panic_handler]
fn host_check_only(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

// `pub` items because xtask includes the same file with `#[path]` and reads them.
#[allow(unreachable_pub)]
mod catalog;
mod console;
mod framework;
mod hv;
mod irq;
mod shared;
mod tests;
mod timing;
mod x86;

use lamina_guest_sdk::{StartInfo, cmdline_value};

use crate::catalog::{CATALOG, Expect};
use crate::console::println;
use crate::framework::Outcome;

lamina_guest_sdk::entry!(conformance_main);

fn conformance_main(start: &'static StartInfo) -> ! {
    let name = cmdline_value("test").unwrap_or(start.name());
    let Some(test) = CATALOG.iter().find(|test| test.name == name) else {
        println!("Test: {name}: no such test");
        framework::error(format_args!(
            "no test named {name:?} in this build ({} tests)",
            CATALOG.len()
        ));
        framework::finish()
    };
    let Some(body) = tests::body(test.name) else {
        // The registry is checked against the catalog at compile time; this cannot happen.
        framework::error(format_args!("test {name:?} has no body"));
        framework::finish()
    };

    println!("Test: {}: {}", test.name, test.title);
    println!("Checks: docs/abi.md {}", test.section);
    body();

    if let Expect::StoppedByHv(detail) = test.expect {
        framework::fail(format_args!(
            "the hypervisor should have stopped the domain ({detail}), but the test went on"
        ));
    }
    if framework::outcome() == Outcome::Success {
        println!("{}: all checks passed", test.name);
    }
    framework::finish()
}

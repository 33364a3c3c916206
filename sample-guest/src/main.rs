//! A small kernel ported to Lamina: what a guest looks like with the SDK.
//!
//! It prints a banner through the console hypercall (one exit per line), one line through the
//! trapped UART (one exit per byte) for comparison, reads the ABI version and features from
//! CPUID, checks that the version hypercall agrees, and powers off. Any disagreement is printed
//! and ends the domain with `ShutdownReason::Crash`.
#![no_std]
#![no_main]

use lamina_abi::sched::ShutdownReason;
use lamina_guest_sdk::{StartInfo, cpuid, hypercall, println, uart};

lamina_guest_sdk::entry!(kernel_main);

fn kernel_main(start: &'static StartInfo) -> ! {
    println!(
        "sample-guest: hello from a Lamina domain (domain {}, {} MiB)",
        start.domain_id,
        start.mem_bytes >> 20
    );
    println!(
        "sample-guest: name {:?}, command line {:?}",
        start.name(),
        lamina_guest_sdk::cmdline()
    );
    uart::write_str("hello from the trapped UART\n");

    let Some(leaves) = cpuid::lamina_leaves() else {
        fail("the Lamina CPUID leaves are missing (not running on Lamina?)")
    };
    println!(
        "sample-guest: ABI version {}.{} (CPUID {:#x}), features {:#x}: {}",
        leaves.version >> 16,
        leaves.version & 0xffff,
        lamina_abi::cpuid::LEAF_VERSION,
        leaves.features.0,
        leaves.features
    );

    match hypercall::version() {
        Ok(version) if version == u64::from(leaves.version) => {
            println!("sample-guest: the version hypercall agrees ({version:#x})");
        }
        Ok(version) => fail(format_args!(
            "the version hypercall returned {version:#x}, CPUID says {:#x}",
            leaves.version
        )),
        Err(error) => fail(format_args!("the version hypercall failed: {error}")),
    }

    println!("sample-guest: powering off");
    hypercall::shutdown(ShutdownReason::Poweroff)
}

/// Reports what went wrong and ends the domain as crashed.
fn fail(why: impl core::fmt::Display) -> ! {
    println!("sample-guest: error: {why}");
    hypercall::shutdown(ShutdownReason::Crash)
}

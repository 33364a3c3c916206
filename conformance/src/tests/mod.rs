//! The test bodies, one module per ABI family, and the registry that maps catalog names to
//! them.
//!
//! A body is a plain `fn()` that checks and records (see [`crate::framework`]); it returns
//! to let `main` print the verdict, or never returns when the domain is meant to be stopped.
//! Each body is declared by the `conformance_test!` block right above it (title, section,
//! expectation, and optionally extra command-line words and the console lines xtask checks);
//! the build script generates [`CATALOG`], [`EXPECTED_OUTPUT`] and [`REGISTRY`] from those
//! blocks, and compile-time checks keep them in step.

/// Declares the test whose body follows: its title, docs/abi.md section, expected ending and
/// optional `cmdline`, `output` and `only_output`. The build script reads these blocks
/// (`conformance/catalog_gen.rs`); here they only have to be well-formed.
macro_rules! conformance_test {
    ($($field:ident : $value:expr),* $(,)?) => {};
}

mod apic;
mod apic_smp;
mod budget;
mod common;
mod console;
mod cpu_state;
mod cpuid;
mod debug_regs;
mod domctl;
mod event_channel;
mod grant;
mod hypercall;
mod interdomain;
mod io;
mod memory;
mod multicall;
mod pv_smp;
mod ring;
mod sched;
mod smp;
mod start;
mod stats;
mod time;
mod timer;
mod traps;
mod upcall;
mod vcpu;
mod xstate;

use crate::catalog::{CATALOG, EXPECTED_OUTPUT};

/// A test body.
pub(crate) type TestFn = fn();

/// Every test body under its catalog name, in catalog order.
pub(crate) const REGISTRY: &[(&str, TestFn)] = include!(concat!(env!("OUT_DIR"), "/registry.rs"));

/// The body registered for test `name`.
pub(crate) fn body(name: &str) -> Option<TestFn> {
    REGISTRY
        .iter()
        .find(|(registered, _)| *registered == name)
        .map(|&(_, body)| body)
}

const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const fn registry_matches_catalog() -> bool {
    if REGISTRY.len() != CATALOG.len() {
        return false;
    }
    let mut i = 0;
    while i < CATALOG.len() {
        if !same_str(REGISTRY[i].0, CATALOG[i].name) {
            return false;
        }
        i += 1;
    }
    true
}

const fn names_are_unique() -> bool {
    let mut i = 0;
    while i < CATALOG.len() {
        let mut j = i + 1;
        while j < CATALOG.len() {
            if same_str(CATALOG[i].name, CATALOG[j].name) {
                return false;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

const _: () = assert!(
    registry_matches_catalog(),
    "tests::REGISTRY must name the tests of catalog::CATALOG, in the same order"
);
const _: () = assert!(names_are_unique(), "catalog::CATALOG names a test twice");

/// The hypervisor keeps at most 31 bytes of a domain name, and a test finds its body by the
/// name of its domain.
const fn names_fit_a_domain_name() -> bool {
    let mut i = 0;
    while i < CATALOG.len() {
        if CATALOG[i].name.len() > 31 {
            return false;
        }
        i += 1;
    }
    true
}
const _: () = assert!(
    names_fit_a_domain_name(),
    "a catalog::CATALOG name is longer than 31 bytes"
);

/// Every test whose console output xtask checks is in the catalog.
const fn expected_output_names_tests() -> bool {
    let mut i = 0;
    while i < EXPECTED_OUTPUT.len() {
        let mut found = false;
        let mut j = 0;
        while j < CATALOG.len() {
            found |= same_str(EXPECTED_OUTPUT[i].test, CATALOG[j].name);
            j += 1;
        }
        if !found {
            return false;
        }
        i += 1;
    }
    true
}
const _: () = assert!(
    expected_output_names_tests(),
    "catalog::EXPECTED_OUTPUT names a test that is not in catalog::CATALOG"
);

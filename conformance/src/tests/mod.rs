//! The test bodies, one module per ABI family, and the registry that maps catalog names to
//! them.
//!
//! A body is a plain `fn()` that checks and records (see [`crate::framework`]); it returns
//! to let `main` print the verdict, or never returns when the domain is meant to be stopped.
//! [`REGISTRY`] lists the bodies in [`CATALOG`] order; a compile-time check keeps the two in
//! step, so a test cannot be listed without a body or written without being listed.

mod console;
mod cpuid;
mod hypercall;
mod io;
mod sched;
mod start;
mod traps;

use crate::catalog::CATALOG;

/// A test body.
pub(crate) type TestFn = fn();

/// Every test body under its catalog name, in catalog order.
pub(crate) const REGISTRY: &[(&str, TestFn)] = &[
    ("version_via_vmcall", hypercall::version_via_vmcall),
    ("version_via_vmmcall", hypercall::version_via_vmmcall),
    (
        "hypercall_preserves_registers",
        hypercall::hypercall_preserves_registers,
    ),
    (
        "hypercall_from_cpl3_eperm",
        hypercall::hypercall_from_cpl3_eperm,
    ),
    (
        "unknown_hypercall_enosys",
        hypercall::unknown_hypercall_enosys,
    ),
    (
        "console_write_oob_efault",
        console::console_write_oob_efault,
    ),
    ("console_write_ok", console::console_write_ok),
    (
        "console_write_max_length_ok",
        console::console_write_max_length_ok,
    ),
    (
        "console_write_too_long_einval",
        console::console_write_too_long_einval,
    ),
    (
        "console_unknown_op_enosys",
        console::console_unknown_op_enosys,
    ),
    ("sched_yield_returns_zero", sched::sched_yield_returns_zero),
    ("sched_unknown_op_enosys", sched::sched_unknown_op_enosys),
    (
        "shutdown_unknown_reason_einval",
        sched::shutdown_unknown_reason_einval,
    ),
    ("entry_state_matches_spec", start::entry_state_matches_spec),
    (
        "boot_tables_identity_map_ram",
        start::boot_tables_identity_map_ram,
    ),
    ("start_info_fields_valid", start::start_info_fields_valid),
    (
        "cpuid_signature_and_version",
        cpuid::cpuid_signature_and_version,
    ),
    (
        "uart_output_reaches_console",
        io::uart_output_reaches_console,
    ),
    ("unknown_msr_injects_gp", traps::unknown_msr_injects_gp),
    (
        "unemulated_port_reads_all_ones",
        io::unemulated_port_reads_all_ones,
    ),
    ("triple_fault", traps::triple_fault),
    (
        "hlt_without_wake_source_stopped",
        traps::hlt_without_wake_source_stopped,
    ),
    (
        "access_outside_ram_stopped",
        traps::access_outside_ram_stopped,
    ),
];

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

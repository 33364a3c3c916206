//! The test bodies, one module per ABI family, and the registry that maps catalog names to
//! them.
//!
//! A body is a plain `fn()` that checks and records (see [`crate::framework`]); it returns
//! to let `main` print the verdict, or never returns when the domain is meant to be stopped.
//! [`REGISTRY`] lists the bodies in [`CATALOG`] order; a compile-time check keeps the two in
//! step, so a test cannot be listed without a body or written without being listed.

mod apic;
mod common;
mod console;
mod cpu_state;
mod cpuid;
mod domctl;
mod event_channel;
mod grant;
mod hypercall;
mod interdomain;
mod io;
mod memory;
mod multicall;
mod ring;
mod sched;
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
pub(crate) const REGISTRY: &[(&str, TestFn)] = &[
    ("version_via_vmcall", hypercall::version_via_vmcall),
    ("version_via_vmmcall", hypercall::version_via_vmmcall),
    (
        "hypercall_preserves_registers",
        hypercall::hypercall_preserves_registers,
    ),
    (
        "v1_calls_preserve_registers",
        hypercall::v1_calls_preserve_registers,
    ),
    (
        "hypercall_from_cpl3_eperm",
        hypercall::hypercall_from_cpl3_eperm,
    ),
    (
        "all_hypercalls_cpl3_eperm",
        hypercall::all_hypercalls_cpl3_eperm,
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
    (
        "console_read_no_input_zero",
        console::console_read_no_input_zero,
    ),
    (
        "console_read_too_long_einval",
        console::console_read_too_long_einval,
    ),
    ("console_read_oob_efault", console::console_read_oob_efault),
    ("sched_yield_returns_zero", sched::sched_yield_returns_zero),
    ("sched_unknown_op_enosys", sched::sched_unknown_op_enosys),
    (
        "shutdown_unknown_reason_einval",
        sched::shutdown_unknown_reason_einval,
    ),
    ("shutdown_reboot_reported", sched::shutdown_reboot_reported),
    ("shutdown_crash_reported", sched::shutdown_crash_reported),
    (
        "block_returns_if_event_pending",
        sched::block_returns_if_event_pending,
    ),
    ("block_wakes_on_timer", sched::block_wakes_on_timer),
    (
        "block_without_wake_stopped",
        sched::block_without_wake_stopped,
    ),
    (
        "poll_pending_returns_at_once",
        sched::poll_pending_returns_at_once,
    ),
    ("poll_deadline_etimedout", sched::poll_deadline_etimedout),
    ("poll_bad_args_einval", sched::poll_bad_args_einval),
    ("poll_array_oob_efault", sched::poll_array_oob_efault),
    (
        "poll_wakes_on_masked_timer",
        sched::poll_wakes_on_masked_timer,
    ),
    (
        "poll_without_wake_stopped",
        sched::poll_without_wake_stopped,
    ),
    ("entry_state_matches_spec", start::entry_state_matches_spec),
    (
        "boot_tables_identity_map_ram",
        start::boot_tables_identity_map_ram,
    ),
    ("stack_guard_page_faults", start::stack_guard_page_faults),
    (
        "stack_overflow_double_faults",
        start::stack_overflow_double_faults,
    ),
    (
        "access_outside_ram_stopped",
        traps::access_outside_ram_stopped,
    ),
    ("start_info_fields_valid", start::start_info_fields_valid),
    (
        "cpuid_signature_and_version",
        cpuid::cpuid_signature_and_version,
    ),
    ("cpuid_timing_leaf", cpuid::cpuid_timing_leaf),
    (
        "cpuid_unused_hv_leaves_zero",
        cpuid::cpuid_unused_hv_leaves_zero,
    ),
    ("cpuid_hides_vmx_and_svm", cpuid::cpuid_hides_vmx_and_svm),
    (
        "speculation_msrs_not_offered",
        cpuid::speculation_msrs_not_offered,
    ),
    (
        "uart_output_reaches_console",
        io::uart_output_reaches_console,
    ),
    ("uart_16550_crate_sequences", io::uart_16550_crate_sequences),
    ("uart_linux_8250_probe", io::uart_linux_8250_probe),
    ("console_sources_own_lines", io::console_sources_own_lines),
    ("console_long_line_wraps", io::console_long_line_wraps),
    (
        "hlt_without_wake_source_stopped",
        traps::hlt_without_wake_source_stopped,
    ),
    ("hlt_wakes_on_apic_timer", apic::hlt_wakes_on_apic_timer),
    (
        "hlt_wakes_on_pv_timer_upcall",
        upcall::hlt_wakes_on_pv_timer_upcall,
    ),
    (
        "hlt_sti_without_source_stopped",
        apic::hlt_sti_without_source_stopped,
    ),
    ("unknown_msr_injects_gp", traps::unknown_msr_injects_gp),
    (
        "unemulated_port_reads_all_ones",
        io::unemulated_port_reads_all_ones,
    ),
    ("triple_fault", traps::triple_fault),
    (
        "cr_writes_hardware_refuses_gp",
        cpu_state::cr_writes_hardware_refuses_gp,
    ),
    ("cr8_is_the_tpr", cpu_state::cr8_is_the_tpr),
    (
        "rep_outsb_prints_like_outs",
        cpu_state::rep_outsb_prints_like_outs,
    ),
    (
        "ins_unemulated_port_all_ones",
        cpu_state::ins_unemulated_port_all_ones,
    ),
    (
        "rep_insb_outside_ram_faults",
        cpu_state::rep_insb_outside_ram_faults,
    ),
    (
        "stack_overflow_reported",
        cpu_state::stack_overflow_reported,
    ),
    (
        "evtchn_unknown_op_enosys",
        event_channel::evtchn_unknown_op_enosys,
    ),
    ("evtchn_boot_state", event_channel::evtchn_boot_state),
    (
        "alloc_unbound_lowest_free",
        event_channel::alloc_unbound_lowest_free,
    ),
    (
        "alloc_unbound_own_id_loopback",
        event_channel::alloc_unbound_own_id_loopback,
    ),
    (
        "alloc_unbound_no_domain_enoent",
        event_channel::alloc_unbound_no_domain_enoent,
    ),
    (
        "alloc_unbound_other_domain",
        interdomain::alloc_unbound_other_domain,
    ),
    (
        "alloc_unbound_full_enospc",
        event_channel::alloc_unbound_full_enospc,
    ),
    (
        "bind_virq_timer_and_console",
        event_channel::bind_virq_timer_and_console,
    ),
    (
        "bind_virq_twice_eexist",
        event_channel::bind_virq_twice_eexist,
    ),
    (
        "bind_virq_bad_virq_einval",
        event_channel::bind_virq_bad_virq_einval,
    ),
    (
        "bind_virq_bad_vcpu_enoent",
        event_channel::bind_virq_bad_vcpu_enoent,
    ),
    (
        "bind_ipi_send_raises_event",
        event_channel::bind_ipi_send_raises_event,
    ),
    (
        "bind_ipi_bad_vcpu_enoent",
        event_channel::bind_ipi_bad_vcpu_enoent,
    ),
    (
        "send_sets_pending_and_selector",
        event_channel::send_sets_pending_and_selector,
    ),
    ("send_bad_port_einval", event_channel::send_bad_port_einval),
    (
        "send_masked_sets_pending_only",
        event_channel::send_masked_sets_pending_only,
    ),
    (
        "send_already_pending_no_upcall",
        event_channel::send_already_pending_no_upcall,
    ),
    (
        "close_clears_pending_frees_port",
        event_channel::close_clears_pending_frees_port,
    ),
    (
        "close_bad_port_einval",
        event_channel::close_bad_port_einval,
    ),
    ("close_twice_einval", event_channel::close_twice_einval),
    (
        "masked_event_held_until_unmask",
        upcall::masked_event_held_until_unmask,
    ),
    (
        "unmask_bad_port_einval",
        event_channel::unmask_bad_port_einval,
    ),
    (
        "unmask_clears_mask_bit",
        event_channel::unmask_clears_mask_bit,
    ),
    (
        "status_reports_each_state",
        event_channel::status_reports_each_state,
    ),
    (
        "status_bad_port_einval",
        event_channel::status_bad_port_einval,
    ),
    ("upcall_injected_on_send", upcall::upcall_injected_on_send),
    (
        "upcall_held_while_if_clear",
        upcall::upcall_held_while_if_clear,
    ),
    (
        "upcall_mask_defers_delivery",
        upcall::upcall_mask_defers_delivery,
    ),
    (
        "upcall_on_unmask_either_insn",
        upcall::upcall_on_unmask_either_insn,
    ),
    ("no_upcall_without_vector", upcall::no_upcall_without_vector),
    (
        "block_idle_loop_gets_upcall",
        upcall::block_idle_loop_gets_upcall,
    ),
    ("interdomain_pair_a", interdomain::interdomain_pair_a),
    ("interdomain_pair_b", interdomain::interdomain_pair_b),
    ("interdomain_upcall_a", interdomain::interdomain_upcall_a),
    ("interdomain_upcall_b", interdomain::interdomain_upcall_b),
    (
        "bind_interdomain_loopback",
        interdomain::bind_interdomain_loopback,
    ),
    (
        "bind_interdomain_einval",
        interdomain::bind_interdomain_einval,
    ),
    (
        "bind_interdomain_no_dom_enoent",
        interdomain::bind_interdomain_no_dom_enoent,
    ),
    ("vcpu_unknown_op_enosys", vcpu::vcpu_unknown_op_enosys),
    ("vcpu_bad_vcpu_enoent", vcpu::vcpu_bad_vcpu_enoent),
    (
        "vcpu_info_moves_upcall_state",
        vcpu::vcpu_info_moves_upcall_state,
    ),
    (
        "vcpu_info_misaligned_einval",
        vcpu::vcpu_info_misaligned_einval,
    ),
    ("vcpu_info_oob_efault", vcpu::vcpu_info_oob_efault),
    ("vcpu_info_twice_eexist", vcpu::vcpu_info_twice_eexist),
    ("runstate_tracks_states", vcpu::runstate_tracks_states),
    (
        "runstate_misaligned_einval",
        vcpu::runstate_misaligned_einval,
    ),
    ("runstate_oob_efault", vcpu::runstate_oob_efault),
    ("runstate_zero_unregisters", vcpu::runstate_zero_unregisters),
    (
        "singleshot_timer_never_early",
        timer::singleshot_timer_never_early,
    ),
    (
        "singleshot_past_fires_at_once",
        timer::singleshot_past_fires_at_once,
    ),
    ("singleshot_zero_cancels", timer::singleshot_zero_cancels),
    (
        "periodic_timer_keeps_period",
        timer::periodic_timer_keeps_period,
    ),
    (
        "periodic_bad_period_einval",
        timer::periodic_bad_period_einval,
    ),
    ("periodic_zero_stops", timer::periodic_zero_stops),
    (
        "timer_without_virq_dropped",
        timer::timer_without_virq_dropped,
    ),
    (
        "singleshot_rearm_replaces",
        timer::singleshot_rearm_replaces,
    ),
    ("upcall_vector_bad_einval", upcall::upcall_vector_bad_einval),
    ("upcall_vector_0_disables", upcall::upcall_vector_0_disables),
    ("tsc_khz_agrees_everywhere", time::tsc_khz_agrees_everywhere),
    ("pvclock_published_at_boot", time::pvclock_published_at_boot),
    ("pvclock_monotonic", time::pvclock_monotonic),
    (
        "pvclock_rate_matches_tsc_khz",
        time::pvclock_rate_matches_tsc_khz,
    ),
    (
        "pvclock_rewritten_on_schedule",
        time::pvclock_rewritten_on_schedule,
    ),
    ("wall_clock_published", time::wall_clock_published),
    ("memory_op_unknown_enosys", memory::memory_op_unknown_enosys),
    ("memory_map_lists_regions", memory::memory_map_lists_regions),
    ("memory_map_short_buffer", memory::memory_map_short_buffer),
    ("memory_map_oob_efault", memory::memory_map_oob_efault),
    ("memory_map_huge_capacity", memory::memory_map_huge_capacity),
    ("reservation_is_mem_bytes", memory::reservation_is_mem_bytes),
    (
        "multicall_runs_in_order",
        multicall::multicall_runs_in_order,
    ),
    (
        "multicall_failure_does_not_stop",
        multicall::multicall_failure_does_not_stop,
    ),
    ("multicall_count_limits", multicall::multicall_count_limits),
    (
        "multicall_oob_efault_runs_none",
        multicall::multicall_oob_efault_runs_none,
    ),
    (
        "multicall_array_copied_first",
        multicall::multicall_array_copied_first,
    ),
    (
        "multicall_nested_block_einval",
        multicall::multicall_nested_block_einval,
    ),
    (
        "multicall_shutdown_ends_batch",
        multicall::multicall_shutdown_ends_batch,
    ),
    (
        "console_ring_drained_on_send",
        ring::console_ring_drained_on_send,
    ),
    ("console_ring_wraps_around", ring::console_ring_wraps_around),
    (
        "console_ring_bogus_prod_reset",
        ring::console_ring_bogus_prod_reset,
    ),
    (
        "console_ring_drained_on_yield",
        ring::console_ring_drained_on_yield,
    ),
    (
        "console_port_close_keeps_ring",
        ring::console_port_close_keeps_ring,
    ),
    ("x2apic_cpuid_bits_set", apic::x2apic_cpuid_bits_set),
    (
        "apic_base_reads_x2apic_mode",
        apic::apic_base_reads_x2apic_mode,
    ),
    ("x2apic_id_and_version", apic::x2apic_id_and_version),
    ("x2apic_reserved_msr_gp", apic::x2apic_reserved_msr_gp),
    ("x2apic_readonly_msrs_gp", apic::x2apic_readonly_msrs_gp),
    ("apic_oneshot_never_early", apic::apic_oneshot_never_early),
    (
        "apic_tsc_deadline_never_early",
        apic::apic_tsc_deadline_never_early,
    ),
    ("apic_periodic_timer_ticks", apic::apic_periodic_timer_ticks),
    (
        "apic_current_count_counts_down",
        apic::apic_current_count_counts_down,
    ),
    ("apic_masked_timer_no_irq", apic::apic_masked_timer_no_irq),
    ("apic_eoi_clears_isr", apic::apic_eoi_clears_isr),
    (
        "apic_tpr_blocks_low_priority",
        apic::apic_tpr_blocks_low_priority,
    ),
    ("apic_isr_priority_nesting", apic::apic_isr_priority_nesting),
    ("apic_self_ipi_delivered", apic::apic_self_ipi_delivered),
    ("x2apic_reserved_bits_gp", apic::x2apic_reserved_bits_gp),
    (
        "apic_disabled_delivers_nothing",
        apic::apic_disabled_delivers_nothing,
    ),
    (
        "apic_tsc_deadline_past_zero",
        apic::apic_tsc_deadline_past_zero,
    ),
    ("stats_other_domain_eperm", stats::stats_other_domain_eperm),
    (
        "stats_privileged_reads_other",
        stats::stats_privileged_reads_other,
    ),
    (
        "stats_own_counters_readable",
        stats::stats_own_counters_readable,
    ),
    ("stats_read_counts_itself", stats::stats_read_counts_itself),
    (
        "stats_cpuid_counted_exactly",
        stats::stats_cpuid_counted_exactly,
    ),
    (
        "stats_hypercalls_by_number",
        stats::stats_hypercalls_by_number,
    ),
    (
        "stats_trapped_exits_by_kind",
        stats::stats_trapped_exits_by_kind,
    ),
    (
        "stats_total_is_sum_of_kinds",
        stats::stats_total_is_sum_of_kinds,
    ),
    ("stats_handling_tsc_grows", stats::stats_handling_tsc_grows),
    ("stats_unknown_op_enosys", stats::stats_unknown_op_enosys),
    ("stats_misaligned_einval", stats::stats_misaligned_einval),
    ("stats_buffer_oob_efault", stats::stats_buffer_oob_efault),
    ("stats_bad_vcpu_enoent", stats::stats_bad_vcpu_enoent),
    ("stats_no_domain_enoent", stats::stats_no_domain_enoent),
    (
        "grant_cpuid_bit_and_version",
        grant::grant_cpuid_bit_and_version,
    ),
    (
        "grant_window_in_boot_tables",
        grant::grant_window_in_boot_tables,
    ),
    ("grant_unknown_op_enosys", grant::grant_unknown_op_enosys),
    ("grant_access_errors", grant::grant_access_errors),
    ("grant_end_access_enoent", grant::grant_end_access_enoent),
    ("grant_map_local_errors", grant::grant_map_local_errors),
    ("grant_unmap_errors", grant::grant_unmap_errors),
    ("grant_copy_local_errors", grant::grant_copy_local_errors),
    ("grant_in_multicall", grant::grant_in_multicall),
    (
        "grant_window_unmapped_stopped",
        grant::grant_window_unmapped_stopped,
    ),
    ("grant_map_rw_a", grant::grant_map_rw_a),
    ("grant_map_rw_b", grant::grant_map_rw_b),
    ("grant_readonly_a", grant::grant_readonly_a),
    ("grant_readonly_b", grant::grant_readonly_b),
    ("grant_ro_write_a", grant::grant_ro_write_a),
    ("grant_ro_write_b", grant::grant_ro_write_b),
    ("grant_revoke_a", grant::grant_revoke_a),
    ("grant_revoke_b", grant::grant_revoke_b),
    ("grant_errors_a", grant::grant_errors_a),
    ("grant_errors_b", grant::grant_errors_b),
    ("grant_errors_c", grant::grant_errors_c),
    ("grant_unmap_access_a", grant::grant_unmap_access_a),
    ("grant_unmap_access_b", grant::grant_unmap_access_b),
    (
        "domctl_unprivileged_eperm",
        domctl::domctl_unprivileged_eperm,
    ),
    (
        "domctl_self_and_unknown_ids",
        domctl::domctl_self_and_unknown_ids,
    ),
    ("domctl_list_a", domctl::domctl_list_a),
    ("domctl_list_b", domctl::domctl_list_b),
    ("domctl_console_a", domctl::domctl_console_a),
    ("domctl_console_b", domctl::domctl_console_b),
    ("domctl_pause_a", domctl::domctl_pause_a),
    ("domctl_pause_b", domctl::domctl_pause_b),
    ("domctl_destroy_a", domctl::domctl_destroy_a),
    ("domctl_destroy_b", domctl::domctl_destroy_b),
    ("domctl_scrub_a", domctl::domctl_scrub_a),
    ("domctl_scrub_b", domctl::domctl_scrub_b),
    ("xstate_at_reset", xstate::xstate_at_reset),
    ("xstate_kept_yield_a", xstate::xstate_kept_yield_a),
    ("xstate_kept_yield_b", xstate::xstate_kept_yield_b),
    ("xstate_kept_block_a", xstate::xstate_kept_block_a),
    ("xstate_kept_block_b", xstate::xstate_kept_block_b),
    ("xstate_kept_block_c", xstate::xstate_kept_block_c),
    (
        "osxsave_mirrored_in_cpuid",
        xstate::osxsave_mirrored_in_cpuid,
    ),
    ("xsetbv_valid_values", xstate::xsetbv_valid_values),
    ("xsetbv_invalid_values_gp", xstate::xsetbv_invalid_values_gp),
    ("xsetbv_at_cpl3_gp", xstate::xsetbv_at_cpl3_gp),
    (
        "xsetbv_without_osxsave_ud",
        xstate::xsetbv_without_osxsave_ud,
    ),
    ("avx_after_xsetbv", xstate::avx_after_xsetbv),
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

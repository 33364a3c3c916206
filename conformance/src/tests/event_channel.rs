//! Tests of `event_channel_op` (docs/abi.md 8.1-8.7): allocating, binding, sending, closing,
//! unmasking and inspecting ports, and the bitmaps the hypervisor keeps in the shared-info
//! page.

use core::sync::atomic::Ordering;

use lamina_abi::Errno;
use lamina_abi::event_channel::{DOMID_SELF, NR_PORT_WORDS, NR_PORTS, PortState, Virq};
use lamina_guest_sdk::start_info;

use super::common::{bad_ports, bad_vcpus, loopback_port, port_status, timer_port};
use crate::framework::{Hex, Status, check, check_eq, expect_ok};
use crate::hv;
use crate::shared;

/// The first port the hypervisor hands out: 0 is never allocated, 1 is the console's.
const FIRST_FREE_PORT: u64 = 2;

/// Checks the state, vCPU and (if given) detail of `port`.
fn check_port(port: u64, state: PortState, detail: Option<u16>) {
    let Some(status) = port_status(port) else {
        return;
    };
    check_eq!(
        format_args!("Status({port}).state"),
        state as u8,
        status.state
    );
    check_eq!(format_args!("Status({port}).vcpu"), 0, status.vcpu);
    if let Some(detail) = detail {
        check_eq!(
            format_args!("Status({port}).detail"),
            Hex(detail),
            Hex(status.detail)
        );
    }
}

/// Checks that `port` is free (so that a refused call did not allocate it).
fn check_free(what: &str, port: u64) {
    if let Some(status) = port_status(port) {
        check_eq!(
            format_args!("{what}: state of port {port}"),
            PortState::Free as u8,
            status.state
        );
    }
}

conformance_test! {
    title: "unknown event_channel_op operations return -ENOSYS, checked before the arguments",
    section: "8 Event channels",
    expect: Success,
}
pub(super) fn evtchn_unknown_op_enosys() {
    // 10 is the first unassigned operation (ABI 1.6); 1 << 32 would be AllocUnbound to a
    // hypervisor that looks at EDI only.
    for op in [10, 11, 99, 1 << 32, u64::MAX] {
        check_eq!(
            format_args!("event_channel_op operation {op:#x}"),
            Status::err(Errno::ENOSYS),
            hv::event_channel_op(op, DOMID_SELF, 0)
        );
    }
    // The operation is checked before its arguments (docs/abi.md 2.4).
    check_eq!(
        "event_channel_op operation 10 with port 5000",
        Status::err(Errno::ENOSYS),
        hv::event_channel_op(10, 5000, 5000)
    );
    check_free("after the unknown operations", FIRST_FREE_PORT);
}

conformance_test! {
    title: "at boot: port 1 is the console's, no port pending or masked, upcalls masked",
    section: "8 Event channels",
    expect: Success,
}
pub(super) fn evtchn_boot_state() {
    let info = start_info();
    check_eq!("StartInfo.console_port", 1, info.console_port);
    check_port(0, PortState::Free, Some(0));
    // The console port: inter-domain, to domain 0 (the hypervisor).
    check_port(1, PortState::Interdomain, Some(0));
    for port in FIRST_FREE_PORT..16 {
        check_port(port, PortState::Free, None);
    }
    for word in 0..NR_PORT_WORDS {
        check_eq!(
            format_args!("evtchn_mask[{word}] at boot"),
            Hex(0),
            Hex(shared::mask_word(word))
        );
        check_eq!(
            format_args!("evtchn_pending[{word}] at boot"),
            Hex(0),
            Hex(shared::pending_word(word))
        );
    }
    check_eq!(
        "vcpu_info[0].evtchn_upcall_mask at boot",
        1,
        shared::upcall_mask().load(Ordering::SeqCst)
    );
    check_eq!(
        "vcpu_info[0].evtchn_upcall_pending at boot",
        0,
        shared::upcall_pending().load(Ordering::SeqCst)
    );
    check_eq!(
        "vcpu_info[0].evtchn_pending_sel at boot",
        Hex(0),
        Hex(shared::pending_sel().load(Ordering::SeqCst))
    );
}

conformance_test! {
    title: "alloc_unbound returns the lowest free port from 2, reuses closed ones, reports the port unbound",
    section: "8.1 alloc_unbound",
    expect: Success,
}
pub(super) fn alloc_unbound_lowest_free() {
    for expected in [2, 3, 4] {
        check_eq!(
            "AllocUnbound(DOMID_SELF)",
            Status(expected),
            hv::alloc_unbound(DOMID_SELF)
        );
    }
    expect_ok("Close(3)", hv::close(3));
    check_eq!(
        "AllocUnbound after closing port 3 (the lowest free port)",
        Status(3),
        hv::alloc_unbound(DOMID_SELF)
    );
    check_eq!(
        "AllocUnbound with ports 2-4 in use",
        Status(5),
        hv::alloc_unbound(DOMID_SELF)
    );
    // A loopback port is unbound, delivered to vCPU 0; its remote is the caller's own id,
    // DOMID_SELF resolved.
    check_port(2, PortState::Unbound, Some(start_info().domain_id as u16));
}

conformance_test! {
    title: "alloc_unbound for the caller's own id makes a loopback port that send raises",
    section: "8.1 alloc_unbound",
    expect: Success,
}
pub(super) fn alloc_unbound_own_id_loopback() {
    let own = u64::from(start_info().domain_id);
    let Some(port) = expect_ok(
        format_args!("AllocUnbound({own}), this domain's id"),
        hv::alloc_unbound(own),
    ) else {
        return;
    };
    check_eq!("the port allocated", FIRST_FREE_PORT, port);
    check_port(port, PortState::Unbound, Some(own as u16));
    expect_ok(format_args!("Send({port})"), hv::send(port));
    check!(
        shared::is_pending(port),
        "Send({port}) on a loopback port left its pending bit clear"
    );
}

conformance_test! {
    title: "alloc_unbound for a domain that does not exist returns -ENOENT and allocates nothing",
    section: "8.1 alloc_unbound",
    expect: Success,
}
pub(super) fn alloc_unbound_no_domain_enoent() {
    let own = u64::from(start_info().domain_id);
    // No such domains; the last two are DOMID_SELF and this domain to a hypervisor that
    // truncates the argument to 32 or 16 bits.
    for remote in [0x1234, 0x7fef, 1 << 32 | DOMID_SELF, 1 << 16 | own] {
        check_eq!(
            format_args!("AllocUnbound({remote:#x})"),
            Status::err(Errno::ENOENT),
            hv::alloc_unbound(remote)
        );
    }
    check_free("after the refused allocations", FIRST_FREE_PORT);
}

conformance_test! {
    title: "all 1023 usable ports in use: allocations return -ENOSPC until a port is closed",
    section: "8.1 alloc_unbound",
    expect: Success,
}
pub(super) fn alloc_unbound_full_enospc() {
    // Ports 2..1024 are free: 1022 allocations succeed, in order.
    for expected in FIRST_FREE_PORT..u64::from(NR_PORTS) {
        let status = hv::alloc_unbound(DOMID_SELF);
        if !check_eq!(
            format_args!("allocation of port {expected}"),
            Status(expected),
            status
        ) {
            return;
        }
    }
    check_eq!(
        "AllocUnbound with all 1023 usable ports in use",
        Status::err(Errno::ENOSPC),
        hv::alloc_unbound(DOMID_SELF)
    );
    check_eq!(
        "BindVirq(VIRQ_TIMER) with all ports in use",
        Status::err(Errno::ENOSPC),
        hv::bind_virq(Virq::Timer as u64, 0)
    );
    check_eq!(
        "BindIpi(0) with all ports in use",
        Status::err(Errno::ENOSPC),
        hv::bind_ipi(0)
    );
    expect_ok("Close(700)", hv::close(700));
    check_eq!(
        "AllocUnbound after closing port 700",
        Status(700),
        hv::alloc_unbound(DOMID_SELF)
    );
    check_eq!(
        "AllocUnbound, full again",
        Status::err(Errno::ENOSPC),
        hv::alloc_unbound(DOMID_SELF)
    );
}

conformance_test! {
    title: "bind_virq of VIRQ_TIMER and VIRQ_CONSOLE returns ports whose status names the VIRQ",
    section: "8.2 bind_virq",
    expect: Success,
}
pub(super) fn bind_virq_timer_and_console() {
    let Some(timer) = timer_port() else { return };
    check_eq!("the VIRQ_TIMER port", FIRST_FREE_PORT, timer);
    check_port(timer, PortState::Virq, Some(Virq::Timer as u16));
    let Some(console) = expect_ok(
        "BindVirq(VIRQ_CONSOLE, vCPU 0)",
        hv::bind_virq(Virq::Console as u64, 0),
    ) else {
        return;
    };
    check_eq!("the VIRQ_CONSOLE port", FIRST_FREE_PORT + 1, console);
    check_port(console, PortState::Virq, Some(Virq::Console as u16));
}

conformance_test! {
    title: "binding a VIRQ twice on a vCPU returns -EEXIST; closing its port frees it",
    section: "8.2 bind_virq",
    expect: Success,
}
pub(super) fn bind_virq_twice_eexist() {
    let Some(timer) = timer_port() else { return };
    check_eq!(
        "BindVirq(VIRQ_TIMER) again on vCPU 0",
        Status::err(Errno::EEXIST),
        hv::bind_virq(Virq::Timer as u64, 0)
    );
    expect_ok(
        "BindVirq(VIRQ_CONSOLE, vCPU 0)",
        hv::bind_virq(Virq::Console as u64, 0),
    );
    check_eq!(
        "BindVirq(VIRQ_CONSOLE) again on vCPU 0",
        Status::err(Errno::EEXIST),
        hv::bind_virq(Virq::Console as u64, 0)
    );
    // Closing the port unbinds the VIRQ.
    expect_ok(format_args!("Close({timer})"), hv::close(timer));
    check_eq!(
        "BindVirq(VIRQ_TIMER) after closing its port",
        Status(timer),
        hv::bind_virq(Virq::Timer as u64, 0)
    );
}

conformance_test! {
    title: "bind_virq of an unassigned VIRQ returns -EINVAL",
    section: "8.2 bind_virq",
    expect: Success,
}
pub(super) fn bind_virq_bad_virq_einval() {
    // Unassigned VIRQs, and VIRQ_TIMER to a hypervisor that looks at 32 bits only.
    for virq in [2, 3, 7, 8, 1 << 32, u64::MAX] {
        check_eq!(
            format_args!("BindVirq({virq:#x}, vCPU 0)"),
            Status::err(Errno::EINVAL),
            hv::bind_virq(virq, 0)
        );
    }
    // The VIRQ is checked before the vCPU (docs/abi.md 8.2).
    check_eq!(
        "BindVirq(2, vCPU 99)",
        Status::err(Errno::EINVAL),
        hv::bind_virq(2, 99)
    );
    check_free("after the refused bindings", FIRST_FREE_PORT);
}

conformance_test! {
    title: "bind_virq on a vCPU that does not exist returns -ENOENT",
    section: "8.2 bind_virq",
    expect: Success,
}
pub(super) fn bind_virq_bad_vcpu_enoent() {
    for vcpu in bad_vcpus() {
        check_eq!(
            format_args!("BindVirq(VIRQ_TIMER, vCPU {vcpu:#x})"),
            Status::err(Errno::ENOENT),
            hv::bind_virq(Virq::Timer as u64, vcpu)
        );
    }
    check_free("after the refused bindings", FIRST_FREE_PORT);
    // Nothing was bound: VIRQ_TIMER is still free on vCPU 0.
    check_eq!(
        "BindVirq(VIRQ_TIMER, vCPU 0) afterwards",
        Status(FIRST_FREE_PORT),
        hv::bind_virq(Virq::Timer as u64, 0)
    );
}

conformance_test! {
    title: "bind_ipi returns an IPI port; send raises it on its vCPU",
    section: "8.3 bind_ipi",
    expect: Success,
}
pub(super) fn bind_ipi_send_raises_event() {
    shared::clear_all_events();
    let Some(port) = expect_ok("BindIpi(vCPU 0)", hv::bind_ipi(0)) else {
        return;
    };
    check_eq!("the IPI port", FIRST_FREE_PORT, port);
    check_port(port, PortState::Ipi, None);
    check_eq!(format_args!("Send({port})"), Status(0), hv::send(port));
    check_raised_on_vcpu0(port);
}

/// Checks that `port` was raised on vCPU 0 while unmasked: pending bit, selector bit, upcall
/// pending.
fn check_raised_on_vcpu0(port: u64) {
    check!(
        shared::is_pending(port),
        "port {port}: pending bit clear after Send"
    );
    check_eq!(
        format_args!("evtchn_pending_sel after Send({port})"),
        Hex(1u64 << (port / 64)),
        Hex(shared::pending_sel().load(Ordering::SeqCst))
    );
    check_eq!(
        format_args!("evtchn_upcall_pending after Send({port})"),
        1,
        shared::upcall_pending().load(Ordering::SeqCst)
    );
}

conformance_test! {
    title: "bind_ipi on a vCPU that does not exist returns -ENOENT",
    section: "8.3 bind_ipi",
    expect: Success,
}
pub(super) fn bind_ipi_bad_vcpu_enoent() {
    for vcpu in bad_vcpus() {
        check_eq!(
            format_args!("BindIpi(vCPU {vcpu:#x})"),
            Status::err(Errno::ENOENT),
            hv::bind_ipi(vcpu)
        );
    }
    check_free("after the refused bindings", FIRST_FREE_PORT);
}

conformance_test! {
    title: "send sets the pending bit, the selector bit of its word and evtchn_upcall_pending",
    section: "8.4 send",
    expect: Success,
}
pub(super) fn send_sets_pending_and_selector() {
    // A port in word 0 and one in word 1 of the bitmaps.
    let Some(low) = loopback_port() else { return };
    let mut high = low;
    while high < 64 + 6 {
        let Some(port) = loopback_port() else { return };
        high = port;
    }
    shared::clear_all_events();
    check_eq!(format_args!("Send({high})"), Status(0), hv::send(high));
    check_raised_on_vcpu0(high);
    check_eq!(format_args!("Send({low})"), Status(0), hv::send(low));
    check!(
        shared::is_pending(low),
        "port {low}: pending bit clear after Send"
    );
    check_eq!(
        "evtchn_pending_sel after sends on words 0 and 1",
        Hex(0b11u64),
        Hex(shared::pending_sel().load(Ordering::SeqCst))
    );
    // Nothing else became pending.
    check_eq!(
        "evtchn_pending[0]",
        Hex(1u64 << low),
        Hex(shared::pending_word(0))
    );
    check_eq!(
        "evtchn_pending[1]",
        Hex(1u64 << (high - 64)),
        Hex(shared::pending_word(1))
    );
}

conformance_test! {
    title: "send on a free, closed, VIRQ or out-of-range port returns -EINVAL and raises nothing",
    section: "8.4 send",
    expect: Success,
}
pub(super) fn send_bad_port_einval() {
    let (Some(port), Some(timer), Some(closed)) = (loopback_port(), timer_port(), loopback_port())
    else {
        return;
    };
    expect_ok(format_args!("Close({closed})"), hv::close(closed));
    shared::clear_all_events();
    // Port 0 and 1000 are free, so is the closed one; a VIRQ port takes no sends.
    for bad in [0, 1000, closed, timer].into_iter().chain(bad_ports(port)) {
        check_eq!(
            format_args!("Send({bad:#x})"),
            Status::err(Errno::EINVAL),
            hv::send(bad)
        );
    }
    for word in 0..NR_PORT_WORDS {
        check_eq!(
            format_args!("evtchn_pending[{word}] after the refused sends"),
            Hex(0),
            Hex(shared::pending_word(word))
        );
    }
    check_eq!(
        "evtchn_upcall_pending after the refused sends",
        0,
        shared::upcall_pending().load(Ordering::SeqCst)
    );
}

conformance_test! {
    title: "send on a masked port sets only its pending bit; unmask then raises the vCPU",
    section: "8.4 send",
    expect: Success,
}
pub(super) fn send_masked_sets_pending_only() {
    let Some(port) = loopback_port() else { return };
    shared::clear_all_events();
    shared::set_masked(port, true);
    check_eq!(
        format_args!("Send({port}) while masked"),
        Status(0),
        hv::send(port)
    );
    check!(
        shared::is_pending(port),
        "masked port {port}: pending bit clear after Send"
    );
    check_eq!(
        "evtchn_pending_sel after a send on a masked port",
        Hex(0),
        Hex(shared::pending_sel().load(Ordering::SeqCst))
    );
    check_eq!(
        "evtchn_upcall_pending after a send on a masked port",
        0,
        shared::upcall_pending().load(Ordering::SeqCst)
    );
    // Unmask delivers it (docs/abi.md 8.6).
    check_eq!(format_args!("Unmask({port})"), Status(0), hv::unmask(port));
    check!(
        !shared::is_masked(port),
        "Unmask({port}) left the mask bit set"
    );
    check_raised_on_vcpu0(port);
}

conformance_test! {
    title: "send on a port already pending does not raise the vCPU again",
    section: "8.4 send",
    expect: Success,
}
pub(super) fn send_already_pending_no_upcall() {
    let Some(port) = loopback_port() else { return };
    shared::clear_all_events();
    expect_ok(format_args!("Send({port})"), hv::send(port));
    check_raised_on_vcpu0(port);
    // The guest takes the upcall state but leaves the port pending: a second send finds the
    // bit set already (no 0 -> 1 change) and must not raise the vCPU again.
    shared::upcall_pending().store(0, Ordering::SeqCst);
    shared::pending_sel().store(0, Ordering::SeqCst);
    check_eq!(
        format_args!("Send({port}) again"),
        Status(0),
        hv::send(port)
    );
    check_eq!(
        "evtchn_upcall_pending after a send on a pending port",
        0,
        shared::upcall_pending().load(Ordering::SeqCst)
    );
    check_eq!(
        "evtchn_pending_sel after a send on a pending port",
        Hex(0),
        Hex(shared::pending_sel().load(Ordering::SeqCst))
    );
}

conformance_test! {
    title: "close clears the pending bit and frees the port for reuse, for every kind of port",
    section: "8.5 close",
    expect: Success,
}
pub(super) fn close_clears_pending_frees_port() {
    let Some(port) = loopback_port() else { return };
    expect_ok(format_args!("Send({port})"), hv::send(port));
    shared::set_masked(port, true);
    check_eq!(format_args!("Close({port})"), Status(0), hv::close(port));
    check!(
        !shared::is_pending(port),
        "Close({port}) left its pending bit set"
    );
    // The mask bit is the guest's: close leaves it as it is.
    check!(
        shared::is_masked(port),
        "Close({port}) cleared its mask bit"
    );
    shared::set_masked(port, false);
    check_free("after Close", port);
    check_eq!(
        "AllocUnbound after Close (the number is reused)",
        Status(port),
        hv::alloc_unbound(DOMID_SELF)
    );
    // VIRQ and IPI ports close the same way.
    for (what, status) in [
        ("a VIRQ_TIMER port", hv::bind_virq(Virq::Timer as u64, 0)),
        ("an IPI port", hv::bind_ipi(0)),
    ] {
        if let Some(other) = expect_ok(what, status) {
            check_eq!(
                format_args!("Close({other}), {what}"),
                Status(0),
                hv::close(other)
            );
            check_free("after Close", other);
        }
    }
}

conformance_test! {
    title: "close of port 0, a free port or one out of range returns -EINVAL",
    section: "8.5 close",
    expect: Success,
}
pub(super) fn close_bad_port_einval() {
    let Some(port) = loopback_port() else { return };
    for bad in [0, 1000].into_iter().chain(bad_ports(port)) {
        check_eq!(
            format_args!("Close({bad:#x})"),
            Status::err(Errno::EINVAL),
            hv::close(bad)
        );
    }
    check_port(port, PortState::Unbound, None);
}

conformance_test! {
    title: "closing a port twice returns -EINVAL the second time",
    section: "8.5 close",
    expect: Success,
}
pub(super) fn close_twice_einval() {
    let Some(port) = loopback_port() else { return };
    check_eq!(format_args!("Close({port})"), Status(0), hv::close(port));
    check_eq!(
        format_args!("Close({port}) again"),
        Status::err(Errno::EINVAL),
        hv::close(port)
    );
    check_free("after the second Close", port);
}

conformance_test! {
    title: "unmask of a port out of range returns -EINVAL and leaves the mask alone",
    section: "8.6 unmask",
    expect: Success,
}
pub(super) fn unmask_bad_port_einval() {
    let Some(port) = loopback_port() else { return };
    shared::set_masked(port, true);
    for bad in bad_ports(port) {
        check_eq!(
            format_args!("Unmask({bad:#x})"),
            Status::err(Errno::EINVAL),
            hv::unmask(bad)
        );
    }
    check!(
        shared::is_masked(port),
        "a refused Unmask cleared the mask bit of port {port}"
    );
}

conformance_test! {
    title: "unmask clears the mask bit and raises nothing when the port is not pending",
    section: "8.6 unmask",
    expect: Success,
}
pub(super) fn unmask_clears_mask_bit() {
    let Some(port) = loopback_port() else { return };
    shared::clear_all_events();
    shared::set_masked(port, true);
    if let Some(status) = port_status(port) {
        check!(status.masked, "Status({port}) does not show the mask bit");
    }
    check_eq!(format_args!("Unmask({port})"), Status(0), hv::unmask(port));
    check!(
        !shared::is_masked(port),
        "Unmask({port}) left the mask bit set"
    );
    // Any port below 1024 is accepted, free ones included.
    shared::set_masked(1000, true);
    check_eq!("Unmask(1000), a free port", Status(0), hv::unmask(1000));
    check!(
        !shared::is_masked(1000),
        "Unmask(1000) left the mask bit set"
    );
    // Nothing was pending: nothing is raised.
    check_eq!(
        "evtchn_upcall_pending after unmasking an idle port",
        0,
        shared::upcall_pending().load(Ordering::SeqCst)
    );
    check_eq!(
        "evtchn_pending_sel after unmasking an idle port",
        Hex(0),
        Hex(shared::pending_sel().load(Ordering::SeqCst))
    );
}

conformance_test! {
    title: "status reports free, unbound, inter-domain, VIRQ and IPI ports, pending and masked bits",
    section: "8.7 status",
    expect: Success,
}
pub(super) fn status_reports_each_state() {
    let own = start_info().domain_id as u16;
    let (Some(unbound), Some(timer), Some(ipi)) =
        (loopback_port(), timer_port(), hv::bind_ipi(0).value())
    else {
        crate::framework::fail(format_args!("could not allocate the ports to inspect"));
        return;
    };
    let Some(own_loopback) = expect_ok(
        "AllocUnbound(this domain)",
        hv::alloc_unbound(u64::from(own)),
    ) else {
        return;
    };
    check_port(unbound, PortState::Unbound, None);
    check_port(own_loopback, PortState::Unbound, Some(own));
    check_port(timer, PortState::Virq, Some(Virq::Timer as u16));
    check_port(ipi, PortState::Ipi, None);
    check_port(1, PortState::Interdomain, Some(0));
    check_port(own_loopback + 1, PortState::Free, None);

    // Pending and masked bits.
    shared::clear_all_events();
    if let Some(status) = port_status(unbound) {
        check!(
            !status.pending && !status.masked,
            "Status({unbound}) of an idle port: pending {}, masked {}",
            status.pending,
            status.masked
        );
    }
    expect_ok(format_args!("Send({unbound})"), hv::send(unbound));
    shared::set_masked(unbound, true);
    if let Some(status) = port_status(unbound) {
        check!(
            status.pending && status.masked,
            "Status({unbound}) of a pending, masked port: pending {}, masked {}",
            status.pending,
            status.masked
        );
    }
}

conformance_test! {
    title: "status of a port out of range returns -EINVAL",
    section: "8.7 status",
    expect: Success,
}
pub(super) fn status_bad_port_einval() {
    for bad in bad_ports(1) {
        check_eq!(
            format_args!("Status({bad:#x})"),
            Status::err(Errno::EINVAL),
            hv::port_status(bad)
        );
    }
}

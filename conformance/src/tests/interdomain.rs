//! Tests of inter-domain event channels (docs/abi.md 8.1, 8.4, 8.5, 8.9; ABI 1.2).
//!
//! Tests that need a partner come in pairs, `<x>_a` and `<x>_b`, next to each other in the
//! catalog: xtask boots a pair in the same boot, and domains get consecutive ids in catalog
//! order, so `_a` finds its partner at its own id + 1 and `_b` at its own id - 1. A partner
//! that does not exist (`-ENOENT`: the pair was split by a filter) makes the test SKIP; a
//! partner that exists but never does its part is a failure, reported with what was awaited.
//!
//! The pairs' convention for port numbers (lowest free port from 2, 8): a domain that has
//! allocated nothing else gets port 2 from its first allocation, and so on.

use core::sync::atomic::Ordering;

use lamina_abi::Errno;
use lamina_abi::event_channel::{DOMID_SELF, PortState, Virq};
use lamina_guest_sdk::start_info;

use super::common::{
    bad_ports, port_status, register_upcall_vector, timer_port, unmask_upcalls, wait_for,
    wait_until_pending, with_interrupts,
};
use crate::framework::{Hex, Status, check, check_eq, expect_ok, fail, skip};
use crate::hv;
use crate::irq::{self, UPCALL_VECTOR};
use crate::shared;
use crate::timing::{GIVE_UP_NS, MS};

/// The first port the hypervisor hands out: 0 is never allocated, 1 is the console's.
const FIRST_FREE_PORT: u64 = 2;

/// This domain's id.
fn own_id() -> u64 {
    u64::from(start_info().domain_id)
}

/// Checks the state, vCPU 0 and detail of `port`; returns its pending bit as Status says.
fn check_port(what: &str, port: u64, state: PortState, detail: u64) -> Option<bool> {
    let status = port_status(port)?;
    let state_ok = check_eq!(
        format_args!("{what}: Status({port}).state"),
        state as u8,
        status.state
    );
    check_eq!(format_args!("{what}: Status({port}).vcpu"), 0, status.vcpu);
    if state != PortState::Free {
        check_eq!(
            format_args!("{what}: Status({port}).detail (remote domain)"),
            Hex(detail),
            Hex(u64::from(status.detail))
        );
    }
    state_ok.then_some(status.pending)
}

/// The state of `port` (or `None` if Status failed).
fn state_of(port: u64) -> Option<u8> {
    hv::port_status(port)
        .value()
        .map(|v| lamina_abi::event_channel::PortStatus::unpack(v).state)
}

/// Offers a port to domain `partner` (AllocUnbound); `None` after a SKIP (no such domain) or
/// a failure.
fn offer(partner: u64, test: &str) -> Option<u64> {
    match hv::alloc_unbound(partner) {
        status if status == Status::err(Errno::ENOENT) => {
            skip(format_args!(
                "AllocUnbound({partner}): -ENOENT, no domain {partner}: {test} is not running next to this test"
            ));
            None
        }
        status => expect_ok(format_args!("AllocUnbound({partner}), the partner"), status),
    }
}

/// Binds to `port` of domain `partner`, retrying while the partner has not offered it yet;
/// `None` after a SKIP (no such domain) or a failure.
fn bind_partner(partner: u64, port: u64, test: &str) -> Option<u64> {
    let mut last = Status::err(Errno::EINVAL);
    let bound = wait_for(|| {
        last = hv::bind_interdomain(partner, port);
        last != Status::err(Errno::EINVAL)
    });
    if last == Status::err(Errno::ENOENT) {
        skip(format_args!(
            "BindInterdomain({partner}, {port}): -ENOENT, no domain {partner}: {test} is not running next to this test"
        ));
        return None;
    }
    if !bound {
        fail(format_args!(
            "BindInterdomain({partner}, {port}) still {last:?} after {} ms: domain {partner} ({test}) never offered port {port}, or the hypervisor refuses a valid bind",
            GIVE_UP_NS / MS
        ));
        return None;
    }
    expect_ok(format_args!("BindInterdomain({partner}, {port})"), last)
}

/// Waits until `port` becomes `state` (the partner acts on it); records a failure if not.
fn wait_for_state(port: u64, state: PortState, awaited: &str) -> bool {
    let reached = wait_for(|| state_of(port) == Some(state as u8));
    check!(
        reached,
        "port {port} did not become {state:?} within {} ms ({awaited}); it is {:?}",
        GIVE_UP_NS / MS,
        state_of(port)
    )
}

/// Polls for `port`, checks that it is pending, clears it; returns whether it was.
fn receive(what: &str, port: u64) -> bool {
    wait_until_pending(what, port);
    let pending = check!(
        shared::is_pending(port),
        "{what}: port {port} not pending (Poll returned without it)"
    );
    shared::clear_pending(port);
    pending
}

// ----- interdomain_pair_a / interdomain_pair_b -----
//
// a (id A): port 2 loopback (unbound for A), port 3 VIRQ_TIMER, port 4 offered to B.
// b (id B = A + 1): binds (A, 4) as its port 2, tries the refused binds against a's ports,
// then: a sends, b receives; b replies, a receives; a acknowledges, b closes; a sees its end
// turn Unbound (remote B) and pending, and closes it.

/// a's port offered to b.
const PAIR_OFFERED: u64 = 4;

conformance_test! {
    title: "with interdomain_pair_b (id + 1): offers it a port, which turns Interdomain (detail = b) when b binds; a send reaches b, b's reply wakes a's poll; b's close turns a's end Unbound for b and raises it",
    section: "8.9 bind_interdomain",
    expect: Success,
}
pub(super) fn interdomain_pair_a() {
    let partner = own_id() + 1;
    check_eq!(
        "AllocUnbound(DOMID_SELF)",
        Status(FIRST_FREE_PORT),
        hv::alloc_unbound(DOMID_SELF)
    );
    check_eq!(
        "BindVirq(VIRQ_TIMER, vCPU 0)",
        Status(FIRST_FREE_PORT + 1),
        hv::bind_virq(Virq::Timer as u64, 0)
    );
    let Some(port) = offer(partner, "interdomain_pair_b") else {
        return;
    };
    if !check_eq!("the port offered", PAIR_OFFERED, port) {
        return;
    }
    check_port("offered", port, PortState::Unbound, partner);
    if !wait_for_state(port, PortState::Interdomain, "domain B binding it") {
        return;
    }
    check_port(
        "bound by the partner",
        port,
        PortState::Interdomain,
        partner,
    );
    check_eq!(
        format_args!("Send({port}) to the partner"),
        Status(0),
        hv::send(port)
    );
    if !receive("the partner's reply", port) {
        return;
    }
    check_eq!(
        format_args!("Send({port}), the acknowledgement"),
        Status(0),
        hv::send(port)
    );
    // The partner closes its end once it has the acknowledgement: ours turns Unbound for it,
    // raised.
    if !wait_for_state(port, PortState::Unbound, "domain B closing its end") {
        return;
    }
    if let Some(pending) = check_port(
        "after the partner closed",
        port,
        PortState::Unbound,
        partner,
    ) {
        check!(
            pending,
            "Status({port}).pending clear after the partner closed its end"
        );
    }
    check!(
        shared::is_pending(port),
        "the partner's Close left port {port}'s pending bit clear"
    );
    check_eq!(format_args!("Close({port})"), Status(0), hv::close(port));
    check_port("after Close", port, PortState::Free, 0);
}

conformance_test! {
    title: "with interdomain_pair_a (id - 1): binds a's offered port as its lowest free port; binding a's loopback, VIRQ, bound, free, console and >= 1024 ports is -EINVAL; sends both ways; its closed end is Free",
    section: "8.9 bind_interdomain",
    expect: Success,
}
pub(super) fn interdomain_pair_b() {
    let own = own_id();
    let Some(partner) = own.checked_sub(1) else {
        skip(format_args!("domain id 0: no partner below"));
        return;
    };
    let Some(port) = bind_partner(partner, PAIR_OFFERED, "interdomain_pair_a") else {
        return;
    };
    check_eq!("the port BindInterdomain returned", FIRST_FREE_PORT, port);
    check_port("bound", port, PortState::Interdomain, partner);
    // The partner's other ports: none is unbound for this domain.
    for (bad, what) in [
        (FIRST_FREE_PORT, "unbound for the partner itself"),
        (FIRST_FREE_PORT + 1, "a VIRQ port"),
        (PAIR_OFFERED, "already bound by this domain"),
        (PAIR_OFFERED + 1, "free"),
        (1, "the console port"),
        (0, "port 0"),
    ]
    .into_iter()
    .chain(bad_ports(PAIR_OFFERED).map(|p| (p, ">= 1024")))
    {
        check_eq!(
            format_args!("BindInterdomain({partner}, {bad:#x}), {what}"),
            Status::err(Errno::EINVAL),
            hv::bind_interdomain(partner, bad)
        );
    }
    check_port(
        "no port made by the refused binds",
        FIRST_FREE_PORT + 1,
        PortState::Free,
        0,
    );
    if !receive("the partner's send", port) {
        return;
    }
    check_eq!(
        format_args!("Send({port}), the reply"),
        Status(0),
        hv::send(port)
    );
    if !receive("the partner's acknowledgement", port) {
        return;
    }
    check_eq!(format_args!("Close({port})"), Status(0), hv::close(port));
    check_port("after Close", port, PortState::Free, 0);
    check!(!shared::is_pending(port), "port {port} pending after Close");
}

// ----- interdomain_upcall_a / interdomain_upcall_b -----
//
// b binds (A, 2), arms a backstop timer, sends "ready" and blocks with upcalls on; a, once it
// has "ready", waits a little (so that b is asleep) and sends; b must wake from Block and take
// the upcall for its port, then sends "done" for a to finish on.

conformance_test! {
    title: "with interdomain_upcall_b (id + 1): offers a port and sends on it once b is blocked",
    section: "8.9 bind_interdomain",
    expect: Success,
}
pub(super) fn interdomain_upcall_a() {
    let partner = own_id() + 1;
    let Some(port) = offer(partner, "interdomain_upcall_b") else {
        return;
    };
    check_eq!("the port offered", FIRST_FREE_PORT, port);
    if !receive("the partner's ready", port) {
        return;
    }
    // Give the partner time to block.
    let until = shared::now() + 5 * MS;
    while shared::now() < until {
        hv::sched_yield();
    }
    check_eq!(format_args!("Send({port})"), Status(0), hv::send(port));
    receive("the partner's done", port);
}

conformance_test! {
    title: "with interdomain_upcall_a (id - 1): the partner's send wakes block and arrives as the upcall for this domain's end",
    section: "8.9 bind_interdomain",
    expect: Success,
}
pub(super) fn interdomain_upcall_b() {
    let own = own_id();
    let Some(partner) = own.checked_sub(1) else {
        skip(format_args!("domain id 0: no partner below"));
        return;
    };
    let Some(port) = bind_partner(partner, FIRST_FREE_PORT, "interdomain_upcall_a") else {
        return;
    };
    let Some(timer) = timer_port() else { return };
    if !register_upcall_vector() {
        return;
    }
    let deadline = shared::now() + GIVE_UP_NS;
    expect_ok(
        "SetSingleshotTimer(now + give-up time), a backstop",
        hv::set_singleshot_timer(0, deadline),
    );
    unmask_upcalls();
    with_interrupts(|| {
        check_eq!(
            format_args!("Send({port}), ready"),
            Status(0),
            hv::send(port)
        );
        // The idle loop of 3.3: mask, look, Block (which unmasks and returns at once if an
        // event came meanwhile).
        loop {
            shared::upcall_mask().store(1, Ordering::SeqCst);
            if irq::count(UPCALL_VECTOR) != 0 || shared::now() >= deadline {
                break;
            }
            check_eq!("Block", Status(0), hv::block());
        }
        unmask_upcalls();
    });
    check!(
        irq::delivered(port),
        "no upcall delivered port {port} (the partner's send) before the backstop timer"
    );
    check!(
        !irq::delivered(timer),
        "the backstop timer fired first: the partner's send did not wake Block"
    );
    check!(
        !shared::is_pending(port),
        "port {port} still pending after its upcall"
    );
    let _ = hv::set_singleshot_timer(0, 0);
    check_eq!(
        format_args!("Send({port}), done"),
        Status(0),
        hv::send(port)
    );
}

// ----- one domain -----

conformance_test! {
    title: "alloc_unbound for another domain (a neighbour in the boot) makes a port Unbound with detail = that domain, which the caller itself cannot bind",
    section: "8.1 alloc_unbound",
    expect: Success,
}
pub(super) fn alloc_unbound_other_domain() {
    let own = own_id();
    // A neighbour in the same boot: the next domain, or the previous one.
    let mut result = None;
    for other in [own + 1, own.wrapping_sub(1)] {
        if other == 0 || other >= DOMID_SELF {
            continue;
        }
        match hv::alloc_unbound(other) {
            status if status == Status::err(Errno::ENOENT) => continue,
            status => {
                result = Some((other, status));
                break;
            }
        }
    }
    let Some((other, status)) = result else {
        skip(format_args!(
            "no domain {} or {}: this test runs alone",
            own + 1,
            own.wrapping_sub(1)
        ));
        return;
    };
    let Some(port) = expect_ok(
        format_args!("AllocUnbound({other}), another domain"),
        status,
    ) else {
        return;
    };
    check_eq!("the port allocated", FIRST_FREE_PORT, port);
    check_port("offered to another domain", port, PortState::Unbound, other);
    // It is not unbound for this domain: binding to it ourselves is refused.
    check_eq!(
        format_args!("BindInterdomain(DOMID_SELF, {port}), offered to domain {other}"),
        Status::err(Errno::EINVAL),
        hv::bind_interdomain(DOMID_SELF, port)
    );
    check_eq!(
        format_args!("BindInterdomain({own}, {port}), offered to domain {other}"),
        Status::err(Errno::EINVAL),
        hv::bind_interdomain(own, port)
    );
    check_eq!(format_args!("Close({port})"), Status(0), hv::close(port));
    check_port("after Close", port, PortState::Free, 0);
}

conformance_test! {
    title: "binding one's own loopback port (DOMID_SELF or own id) makes a pair in one domain: sends raise the other end; closing one turns the other Unbound, raised",
    section: "8.9 bind_interdomain",
    expect: Success,
}
pub(super) fn bind_interdomain_loopback() {
    let own = own_id();
    for remote in [DOMID_SELF, own] {
        let Some(offered) = expect_ok("AllocUnbound(DOMID_SELF)", hv::alloc_unbound(DOMID_SELF))
        else {
            return;
        };
        let Some(bound) = expect_ok(
            format_args!("BindInterdomain({remote:#x}, {offered})"),
            hv::bind_interdomain(remote, offered),
        ) else {
            return;
        };
        check_eq!(
            format_args!("the port BindInterdomain({remote:#x}, {offered}) returned"),
            offered + 1,
            bound
        );
        check_port("offered end", offered, PortState::Interdomain, own);
        check_port("bound end", bound, PortState::Interdomain, own);
        for (from, to) in [(offered, bound), (bound, offered)] {
            check_eq!(format_args!("Send({from})"), Status(0), hv::send(from));
            check!(
                shared::is_pending(to),
                "Send({from}) left its peer port {to} clear"
            );
            check!(
                !shared::is_pending(from),
                "Send({from}) raised the sender's own end"
            );
            shared::clear_pending(to);
        }
        // Closing one end: the other turns Unbound for this domain and is raised.
        check_eq!(format_args!("Close({bound})"), Status(0), hv::close(bound));
        check_port("after its peer closed", bound, PortState::Free, 0);
        if let Some(pending) = check_port("the other end", offered, PortState::Unbound, own) {
            check!(pending, "Close({bound}) did not raise its peer {offered}");
        }
        check_eq!(
            format_args!("Close({offered})"),
            Status(0),
            hv::close(offered)
        );
    }
}

conformance_test! {
    title: "bind_interdomain to an IPI, VIRQ, bound, free, console, 0 or >= 1024 port returns -EINVAL and allocates nothing",
    section: "8.9 bind_interdomain",
    expect: Success,
}
pub(super) fn bind_interdomain_einval() {
    let own = own_id();
    // Ports 2 (IPI), 3 (VIRQ), 4 + 5 (a loopback pair, both Interdomain); 6 is free.
    let ipi = expect_ok("BindIpi(0)", hv::bind_ipi(0));
    let virq = timer_port();
    let offered = expect_ok("AllocUnbound(DOMID_SELF)", hv::alloc_unbound(DOMID_SELF));
    let pair = offered.and_then(|p| {
        expect_ok(
            format_args!("BindInterdomain(DOMID_SELF, {p})"),
            hv::bind_interdomain(DOMID_SELF, p),
        )
    });
    let (Some(ipi), Some(virq), Some(offered), Some(pair)) = (ipi, virq, offered, pair) else {
        return;
    };
    let free = pair + 1;
    for remote in [DOMID_SELF, own] {
        for (port, what) in [
            (ipi, "an IPI port"),
            (virq, "a VIRQ port"),
            (offered, "already bound"),
            (pair, "a bound end"),
            (free, "free"),
            (1, "the console port"),
            (0, "port 0"),
        ]
        .into_iter()
        .chain(bad_ports(offered).map(|p| (p, ">= 1024")))
        {
            check_eq!(
                format_args!("BindInterdomain({remote:#x}, {port:#x}), {what}"),
                Status::err(Errno::EINVAL),
                hv::bind_interdomain(remote, port)
            );
        }
    }
    check_port(
        "no port made by the refused binds",
        free,
        PortState::Free,
        0,
    );
}

conformance_test! {
    title: "bind_interdomain to a domain that does not exist returns -ENOENT and allocates nothing",
    section: "8.9 bind_interdomain",
    expect: Success,
}
pub(super) fn bind_interdomain_no_dom_enoent() {
    let own = own_id();
    // Port 2 is unbound for this domain, so the refusals are about the domain: the last two
    // remotes are DOMID_SELF and this domain to a hypervisor that truncates the argument.
    let Some(port) = expect_ok("AllocUnbound(DOMID_SELF)", hv::alloc_unbound(DOMID_SELF)) else {
        return;
    };
    for remote in [0x1234, 0x7fef, 1 << 32 | DOMID_SELF, 1 << 16 | own] {
        check_eq!(
            format_args!("BindInterdomain({remote:#x}, {port})"),
            Status::err(Errno::ENOENT),
            hv::bind_interdomain(remote, port)
        );
    }
    check_port("still offered", port, PortState::Unbound, own);
    check_port(
        "no port made by the refused binds",
        port + 1,
        PortState::Free,
        0,
    );
}

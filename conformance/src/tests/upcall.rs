//! Tests of event delivery as an interrupt (docs/abi.md 8.6, 8.8, 9.4): when the hypervisor
//! injects the upcall vector, and when it must hold it back (port masked, upcall mask set,
//! RFLAGS.IF clear, no vector registered).
//!
//! The handler is `crate::irq`'s: it clears `evtchn_upcall_pending`, then delivers (clears and
//! records) every pending, unmasked port of the selector.

use core::sync::atomic::Ordering;

use lamina_abi::Hypercall;
use lamina_guest_sdk::hypercall::{HypercallInsn, hypercall0_with};

use super::common::{loopback_port, register_upcall_vector, unmask_upcalls, with_interrupts};
use crate::framework::{Status, check, check_eq, expect_ok};
use crate::irq::{self, UPCALL_VECTOR};
use crate::shared;
use crate::timing::{MS, Stopwatch};
use crate::{hv, x86};

/// Checks that exactly `expected` upcalls arrived so far, and no other interrupt.
fn check_upcalls(what: &str, expected: u32) -> bool {
    let upcalls = check_eq!(
        format_args!("upcalls {what}"),
        expected,
        irq::count(UPCALL_VECTOR)
    );
    let others = check_eq!(
        format_args!("interrupts on other vectors {what}"),
        0,
        irq::total() - irq::count(UPCALL_VECTOR)
    );
    upcalls && others
}

/// Checks that the upcall delivered `port` (and the handler cleared its pending bit).
fn check_delivered(port: u64) {
    check!(
        irq::delivered(port),
        "the upcall did not find port {port} pending and unmasked"
    );
    check!(
        !shared::is_pending(port),
        "port {port} still pending after its upcall"
    );
}

conformance_test! {
    title: "send injects the upcall vector at once, and only once after the handler clears upcall_pending",
    section: "8.8 Upcalls",
    expect: Success,
}
pub(super) fn upcall_injected_on_send() {
    let Some(port) = loopback_port() else { return };
    if !register_upcall_vector() {
        return;
    }
    unmask_upcalls();
    with_interrupts(|| {
        hv::send(port);
        // Injected at the VM entry that ends the send: before the next instruction.
        check_upcalls("right after Send", 1);
        // The handler cleared evtchn_upcall_pending: the upcall is not injected again.
        hv::version();
        hv::version();
        check_upcalls("after two more hypercalls", 1);
    });
    check_delivered(port);
    check_eq!(
        "evtchn_upcall_pending after the upcall",
        0,
        shared::upcall_pending().load(Ordering::SeqCst)
    );
}

conformance_test! {
    title: "with RFLAGS.IF clear the upcall waits, and arrives as soon as IF is set",
    section: "8.8 Upcalls",
    expect: Success,
}
pub(super) fn upcall_held_while_if_clear() {
    let Some(port) = loopback_port() else { return };
    if !register_upcall_vector() {
        return;
    }
    unmask_upcalls();
    // RFLAGS.IF is clear (as at entry): the hypervisor must wait for it.
    check_eq!(format_args!("Send({port})"), Status(0), hv::send(port));
    hv::version();
    check_upcalls("with RFLAGS.IF clear", 0);
    check_eq!(
        "evtchn_upcall_pending while held back",
        1,
        shared::upcall_pending().load(Ordering::SeqCst)
    );
    // The first instructions with IF set take it (interrupt window).
    x86::interrupt_window();
    check_upcalls("once RFLAGS.IF was set", 1);
    check_delivered(port);
}

conformance_test! {
    title: "with evtchn_upcall_mask set no upcall comes; clearing it and a hypercall deliver it",
    section: "8.8 Upcalls",
    expect: Success,
}
pub(super) fn upcall_mask_defers_delivery() {
    let Some(port) = loopback_port() else { return };
    if !register_upcall_vector() {
        return;
    }
    // The upcall mask is still set, as at boot.
    with_interrupts(|| {
        check_eq!(format_args!("Send({port})"), Status(0), hv::send(port));
        hv::version();
        check_upcalls("with evtchn_upcall_mask set", 0);
        // Clearing the mask is the guest's write; the next exit delivers.
        unmask_upcalls();
        hv::version();
        check_upcalls("after clearing the mask and a hypercall", 1);
    });
    check_delivered(port);
}

conformance_test! {
    title: "an event on a masked port is not delivered but stays pending, and unmask delivers it",
    section: "8.6 unmask",
    expect: Success,
}
pub(super) fn masked_event_held_until_unmask() {
    let Some(port) = loopback_port() else { return };
    if !register_upcall_vector() {
        return;
    }
    shared::set_masked(port, true);
    unmask_upcalls();
    with_interrupts(|| {
        check_eq!(format_args!("Send({port})"), Status(0), hv::send(port));
        hv::version();
        check_upcalls("after a send on a masked port", 0);
        check!(
            shared::is_pending(port),
            "masked port {port} not pending after Send"
        );
        check_eq!(format_args!("Unmask({port})"), Status(0), hv::unmask(port));
        check_upcalls("right after Unmask", 1);
    });
    check_delivered(port);
}

conformance_test! {
    title: "without an upcall vector no interrupt comes; the event still ends block",
    section: "8.8 Upcalls",
    expect: Success,
}
pub(super) fn no_upcall_without_vector() {
    let Some(port) = loopback_port() else { return };
    irq::install();
    unmask_upcalls();
    with_interrupts(|| {
        check_eq!(format_args!("Send({port})"), Status(0), hv::send(port));
        hv::version();
        hv::sched_yield();
    });
    check_eq!("interrupts without an upcall vector", 0, irq::total());
    check_eq!(
        "evtchn_upcall_pending",
        1,
        shared::upcall_pending().load(Ordering::SeqCst)
    );
    // The event still ends a block at once (docs/abi.md 9.4: events then only end block and
    // poll).
    check_eq!("Block with the event pending", Status(0), hv::block());
}

conformance_test! {
    title: "STI; block: the timer's upcall arrives as block returns, never before the deadline",
    section: "8.8 Upcalls",
    expect: Success,
}
pub(super) fn block_idle_loop_gets_upcall() {
    let Some(timer) = super::common::timer_port() else {
        return;
    };
    if !register_upcall_vector() {
        return;
    }
    // The idle loop of a paravirtual kernel: interrupts on, Block (which clears the upcall
    // mask), and the upcall arrives as Block returns.
    with_interrupts(|| {
        let watch = Stopwatch::start();
        let deadline = shared::now() + 2 * MS;
        expect_ok(
            "SetSingleshotTimer(now + 2 ms)",
            hv::set_singleshot_timer(0, deadline),
        );
        check_eq!("Block", Status(0), hv::block());
        if check_upcalls("right after Block returned", 1) {
            watch.check_on_time(
                format_args!("VIRQ_TIMER upcall"),
                deadline,
                irq::last_ns(UPCALL_VECTOR),
            );
        }
    });
    check_delivered(timer);
    check_eq!(
        "evtchn_upcall_mask after Block",
        0,
        shared::upcall_mask().load(Ordering::SeqCst)
    );
}

conformance_test! {
    title: "set_upcall_vector outside 0 and 32-255 returns -EINVAL",
    section: "9.4 set_upcall_vector",
    expect: Success,
}
pub(super) fn upcall_vector_bad_einval() {
    for vector in [1, 16, 31, 256, 1 << 32 | u64::from(UPCALL_VECTOR), u64::MAX] {
        check_eq!(
            format_args!("SetUpcallVector(vCPU 0, {vector:#x})"),
            Status::err(lamina_abi::Errno::EINVAL),
            hv::set_upcall_vector(0, vector)
        );
    }
    // The valid range, and 0 for none; the upcall mask is set, so nothing is injected.
    for vector in [32, 255, u64::from(UPCALL_VECTOR), 0] {
        check_eq!(
            format_args!("SetUpcallVector(vCPU 0, {vector:#x})"),
            Status(0),
            hv::set_upcall_vector(0, vector)
        );
    }
}

conformance_test! {
    title: "upcall vector 0 injects nothing; registering a vector again delivers the pending event",
    section: "9.4 set_upcall_vector",
    expect: Success,
}
pub(super) fn upcall_vector_0_disables() {
    let Some(port) = loopback_port() else { return };
    if !register_upcall_vector() {
        return;
    }
    expect_ok("SetUpcallVector(vCPU 0, 0)", hv::set_upcall_vector(0, 0));
    unmask_upcalls();
    with_interrupts(|| {
        check_eq!(format_args!("Send({port})"), Status(0), hv::send(port));
        hv::version();
        check_upcalls("with the vector unregistered", 0);
        // Registering it again with the event pending delivers it (level-like: checked at
        // every VM entry).
        expect_ok(
            format_args!("SetUpcallVector(vCPU 0, {UPCALL_VECTOR:#x}) again"),
            hv::set_upcall_vector(0, u64::from(UPCALL_VECTOR)),
        );
        check_upcalls("right after registering the vector again", 1);
    });
    check_delivered(port);
}

conformance_test! {
    title: "STI; HLT with a timer bound to VIRQ_TIMER sleeps until the upcall, never before the deadline",
    section: "7.2 HLT",
    expect: Success,
}
pub(super) fn hlt_wakes_on_pv_timer_upcall() {
    let Some(timer) = super::common::timer_port() else {
        return;
    };
    if !register_upcall_vector() {
        return;
    }
    unmask_upcalls();
    let watch = Stopwatch::start();
    let deadline = shared::now() + 2 * MS;
    expect_ok(
        "SetSingleshotTimer(now + 2 ms)",
        hv::set_singleshot_timer(0, deadline),
    );
    // An unported idle loop: STI; HLT. The timer bound to VIRQ_TIMER is a wake source; the
    // vCPU sleeps until the upcall can be injected.
    x86::halt_with_interrupts();
    if !check_upcalls("when HLT returned", 1) {
        return;
    }
    watch.check_on_time(
        format_args!("VIRQ_TIMER upcall that ended HLT"),
        deadline,
        irq::last_ns(UPCALL_VECTOR),
    );
    check_delivered(timer);
}

conformance_test! {
    title: "after the guest clears the upcall mask, a hypercall by either instruction (the other vendor's one arrives as #UD) delivers the pending upcall",
    section: "8.8 Upcalls",
    expect: Success,
}
pub(super) fn upcall_on_unmask_either_insn() {
    // 8.8: any hypercall delivers an upcall the guest unmasked meanwhile, with either
    // instruction (2.1): the other vendor's one arrives as #UD and must take the same path.
    // Many rounds: each upcall is delivered exactly once, never again later, even with the
    // mask set (QEMU TCG delivered an injected interrupt twice about once in 3,000 rounds).
    let Some(port) = loopback_port() else { return };
    if !register_upcall_vector() {
        return;
    }
    with_interrupts(|| {
        let mut delivered = 0u32;
        for _round in 0..UNMASK_ROUNDS {
            for insn in HypercallInsn::ALL {
                shared::upcall_mask().store(1, Ordering::SeqCst);
                check_eq!(format_args!("Send({port})"), Status(0), hv::send(port));
                hv::version();
                if !check_upcalls("with evtchn_upcall_mask set", delivered) {
                    return;
                }
                unmask_upcalls();
                // SAFETY: version writes no guest memory.
                let version = unsafe { hypercall0_with(insn, Hypercall::Version as u64) };
                check_eq!(
                    format_args!("version via {insn:?}"),
                    Status(u64::from(lamina_abi::abi_version())),
                    Status(version)
                );
                let what = match insn {
                    HypercallInsn::Vmcall => "after clearing the mask and a version via vmcall",
                    HypercallInsn::Vmmcall => "after clearing the mask and a version via vmmcall",
                };
                delivered += 1;
                if !check_upcalls(what, delivered) {
                    return;
                }
                check_delivered(port);
            }
        }
    });
}

/// Rounds of [`upcall_on_unmask_either_insn`] (two upcalls each).
const UNMASK_ROUNDS: u32 = 2_500;

//! Set-up steps that tests of several families share: ports, upcalls, waiting for events,
//! and the argument values a hypervisor must refuse.

use core::sync::atomic::Ordering;

use lamina_abi::event_channel::{DOMID_SELF, PortStatus, Virq};
use lamina_guest_sdk::start_info;

use crate::framework::{Status, check_eq, expect_ok};
use crate::irq::{self, UPCALL_VECTOR};
use crate::shared;
use crate::timing::GIVE_UP_NS;
use crate::x86::RacyCell;
use crate::{hv, x86};

/// A loopback port (AllocUnbound for DOMID_SELF), or `None` after recording why not.
pub(super) fn loopback_port() -> Option<u64> {
    expect_ok("AllocUnbound(DOMID_SELF)", hv::alloc_unbound(DOMID_SELF))
}

/// A port bound to VIRQ_TIMER of vCPU 0, or `None` after recording why not.
pub(super) fn timer_port() -> Option<u64> {
    expect_ok(
        "BindVirq(VIRQ_TIMER, vCPU 0)",
        hv::bind_virq(Virq::Timer as u64, 0),
    )
}

/// The decoded status of `port`, or `None` after recording why not.
pub(super) fn port_status(port: u64) -> Option<PortStatus> {
    expect_ok(format_args!("Status({port})"), hv::port_status(port)).map(PortStatus::unpack)
}

/// Installs the interrupt recorder and registers [`UPCALL_VECTOR`] for vCPU 0; the upcall
/// mask and RFLAGS.IF are left as they are. Returns whether the vector was accepted.
pub(super) fn register_upcall_vector() -> bool {
    irq::install();
    expect_ok(
        format_args!("SetUpcallVector(vCPU 0, {UPCALL_VECTOR:#x})"),
        hv::set_upcall_vector(0, u64::from(UPCALL_VECTOR)),
    )
    .is_some()
}

/// Clears vCPU 0's upcall mask (the guest's side: a byte of `VcpuInfo`).
pub(super) fn unmask_upcalls() {
    shared::upcall_mask().store(0, Ordering::SeqCst);
}

/// Waits (Poll) until `port` is pending, for at most [`GIVE_UP_NS`]; records a failure if
/// Poll returns anything but 0. Returns system time right after.
pub(super) fn wait_until_pending(what: &str, port: u64) -> u64 {
    let ports = [port as u32];
    let status = hv::poll(&ports, shared::now() + GIVE_UP_NS);
    let now = shared::now();
    expect_ok(
        format_args!("{what}: Poll([{port}]) for up to {GIVE_UP_NS} ns"),
        status,
    );
    now
}

/// vCPU numbers that do not exist in this domain, including ones a hypervisor that truncates
/// the argument to 32 or 8 bits would take for vCPU 0.
pub(super) fn bad_vcpus() -> [u64; 6] {
    let nr = u64::from(start_info().nr_vcpus);
    [
        nr,
        nr + 1,
        lamina_abi::shared_info::MAX_VCPUS as u64,
        0x100,
        1 << 32,
        u64::MAX,
    ]
}

/// Port numbers that no domain has: at or past 1024, including ones a hypervisor that
/// truncates the argument would take for `valid`.
pub(super) fn bad_ports(valid: u64) -> [u64; 4] {
    [1024, 1024 + valid, 1 << 32 | valid, u64::MAX]
}

/// Enables interrupts, runs `body`, disables them again.
pub(super) fn with_interrupts<R>(body: impl FnOnce() -> R) -> R {
    x86::enable_interrupts();
    let result = body();
    x86::disable_interrupts();
    result
}

/// Yields until `done` holds or [`GIVE_UP_NS`] passes; returns whether it held.
pub(super) fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    let deadline = shared::now() + GIVE_UP_NS;
    loop {
        if done() {
            return true;
        }
        if shared::now() > deadline {
            return false;
        }
        hv::sched_yield();
    }
}

/// Checks that `record` is the `#GP(0)` the test expected of `what`.
pub(super) fn check_gp0(what: impl core::fmt::Display, record: &crate::x86::idt::TrapRecord) {
    use crate::framework::{Hex, check_eq};
    use crate::x86::idt::{self, GENERAL_PROTECTION};
    check_eq!(
        format_args!("{what}: exception"),
        idt::exception_name(GENERAL_PROTECTION.into()),
        idt::exception_name(record.vector.into())
    );
    check_eq!(
        format_args!("{what}: error code"),
        Hex(0),
        Hex(record.error_code)
    );
}

/// Room for a vCPU's run-state area (docs/abi.md 9.2), 8-byte aligned as the call wants.
#[repr(C, align(8))]
pub(super) struct RunstateArea(pub(super) lamina_abi::vcpu::RunstateInfo);

impl RunstateArea {
    /// Not written yet: a state no vCPU has.
    pub(super) const UNSET: RunstateArea = RunstateArea(lamina_abi::vcpu::RunstateInfo {
        state: u32::MAX,
        reserved: 0,
        state_entry_time: 0,
        time: [0; 4],
    });
}

/// Registers `area` as vCPU `vcpu`'s run-state area (docs/abi.md 9.2); records a failure if
/// the call does not return 0. Returns whether it did.
pub(super) fn register_runstate_area(vcpu: u64, area: &'static RacyCell<RunstateArea>) -> bool {
    // SAFETY: a static, ours for good: the hypervisor may write it whenever it likes.
    let status = unsafe { hv::register_runstate(vcpu, area.get() as u64) };
    check_eq!(
        format_args!("register_runstate of vCPU {vcpu}"),
        Status(0),
        status
    )
}

//! Tests of `vcpu_op` (docs/abi.md 9, 9.1, 9.2): operation and vCPU numbers, moving
//! `VcpuInfo` out of the shared-info page, and the runstate area.

use core::sync::atomic::Ordering;

use lamina_abi::Errno;
use lamina_abi::shared_info::VcpuInfo;
use lamina_abi::vcpu::{RunstateInfo, VcpuOp, runstate};
use lamina_guest_sdk::start::TOP_OF_RAM_SCRATCH;
use lamina_guest_sdk::start_info;

use super::common::{bad_vcpus, loopback_port};
use crate::framework::{Hex, Status, check, check_eq, expect_ok};
use crate::hv;
use crate::shared;
use crate::timing::MS;
use crate::x86::RacyCell;

/// Room for a `VcpuInfo` on a 64-byte boundary, and for misaligned attempts after it.
#[repr(C, align(64))]
struct VcpuInfoArea([u8; 192]);

static VCPU_INFO_AREA: RacyCell<VcpuInfoArea> = RacyCell::new(VcpuInfoArea([0; 192]));

/// The 64-byte aligned address of [`VCPU_INFO_AREA`].
fn vcpu_info_area() -> u64 {
    VCPU_INFO_AREA.get() as u64
}

/// Room for a `RunstateInfo` on an 8-byte boundary, and for misaligned attempts after it.
#[repr(C, align(8))]
struct RunstateArea([u8; 64]);

static RUNSTATE_AREA: RacyCell<RunstateArea> = RacyCell::new(RunstateArea([0; 64]));

/// The 8-byte aligned address of [`RUNSTATE_AREA`].
fn runstate_area() -> u64 {
    RUNSTATE_AREA.get() as u64
}

/// A byte pattern no hypervisor writes.
const SENTINEL: u8 = 0xa5;

/// Fills the runstate area with [`SENTINEL`].
fn fill_runstate_area() {
    // SAFETY: the area is ours; the hypervisor writes it only at exits, not while we do.
    unsafe { core::ptr::write_volatile(RUNSTATE_AREA.get(), RunstateArea([SENTINEL; 64])) };
}

/// The runstate area as the hypervisor last wrote it.
fn read_runstate() -> RunstateInfo {
    // SAFETY: the area is aligned and large enough; every bit pattern is a valid
    // `RunstateInfo`; the hypervisor writes it only while we are out of the guest.
    unsafe { core::ptr::read_volatile(RUNSTATE_AREA.get().cast::<RunstateInfo>()) }
}

/// RegisterVcpuInfo of vCPU 0 at `gpa`: the area is ours for good, or `gpa` is one the
/// hypervisor must refuse (and should it accept, the test fails on the result).
fn register_vcpu_info(gpa: u64) -> Status {
    // SAFETY: `gpa` is our static area (ours for good) or must be refused.
    unsafe { hv::register_vcpu_info(0, gpa) }
}

/// RegisterRunstate of vCPU 0 at `gpa`, as for [`register_vcpu_info`].
fn register_runstate(gpa: u64) -> Status {
    // SAFETY: `gpa` is our static area, 0, or must be refused.
    unsafe { hv::register_runstate(0, gpa) }
}

conformance_test! {
    title: "unknown vcpu_op operations return -ENOSYS, checked before the vCPU",
    section: "9 vCPU operations",
    expect: Success,
}
pub(super) fn vcpu_unknown_op_enosys() {
    // 9 is the first unassigned operation. 1 << 32 would be RegisterVcpuInfo at 0 to a
    // hypervisor that looks at EDI only: page 0 is unused, so that mistake harms nothing.
    for op in [9, 10, 99, 1 << 32, u64::MAX] {
        // SAFETY: unknown operations do nothing; see above for 1 << 32.
        let status = unsafe { hv::vcpu_op(op, 0, 0) };
        check_eq!(
            format_args!("vcpu_op operation {op:#x}"),
            Status::err(Errno::ENOSYS),
            status
        );
    }
    // The operation is checked before the vCPU (docs/abi.md 2.4).
    // SAFETY: an unknown operation does nothing.
    let status = unsafe { hv::vcpu_op(9, 99, 0) };
    check_eq!(
        "vcpu_op operation 9 on vCPU 99",
        Status::err(Errno::ENOSYS),
        status
    );
}

conformance_test! {
    title: "every vcpu_op on a vCPU that does not exist returns -ENOENT and has no effect",
    section: "9 vCPU operations",
    expect: Success,
}
pub(super) fn vcpu_bad_vcpu_enoent() {
    // Valid arguments, so that only the vCPU is wrong.
    let operations = [
        (VcpuOp::RegisterVcpuInfo, vcpu_info_area()),
        (VcpuOp::RegisterRunstate, runstate_area()),
        (VcpuOp::SetPeriodicTimer, MS),
        (VcpuOp::SetSingleshotTimer, 0),
        (VcpuOp::SetUpcallVector, 0xf0),
    ];
    for vcpu in bad_vcpus() {
        for (op, arg) in operations {
            // SAFETY: both areas are our statics, ours for good, should the hypervisor take
            // them for vCPU 0's by mistake.
            let status = unsafe { hv::vcpu_op(op as u64, vcpu, arg) };
            check_eq!(
                format_args!("{op:?} on vCPU {vcpu:#x}"),
                Status::err(Errno::ENOENT),
                status
            );
        }
    }
    // The vCPU is checked before the operation's own arguments (docs/abi.md 9).
    let mem = start_info().mem_bytes;
    for (op, bad_arg) in [
        (VcpuOp::RegisterVcpuInfo, vcpu_info_area() + 8),
        (VcpuOp::RegisterRunstate, mem),
        (VcpuOp::SetPeriodicTimer, 1),
        (VcpuOp::SetUpcallVector, 16),
    ] {
        // SAFETY: refused twice over: no vCPU 1, and an argument that is refused too.
        let status = unsafe { hv::vcpu_op(op as u64, 1, bad_arg) };
        check_eq!(
            format_args!("{op:?}({bad_arg:#x}), invalid, on vCPU 1"),
            Status::err(Errno::ENOENT),
            status
        );
    }
    // None of them registered anything for vCPU 0.
    check_eq!(
        "RegisterVcpuInfo of vCPU 0 afterwards",
        Status(0),
        register_vcpu_info(vcpu_info_area())
    );
}

conformance_test! {
    title: "register_vcpu_info copies VcpuInfo to the new area, where events and block act from then on",
    section: "9.1 register_vcpu_info",
    expect: Success,
}
pub(super) fn vcpu_info_moves_upcall_state() {
    let Some(port) = loopback_port() else { return };
    shared::clear_all_events();
    let old = shared::boot_vcpu_info();
    let new = vcpu_info_area() as *mut VcpuInfo;
    // SAFETY: the area is ours and aligned for a `VcpuInfo` (any bit pattern is valid).
    unsafe { core::ptr::write_bytes(new.cast::<u8>(), SENTINEL, size_of::<VcpuInfo>()) };
    let old_time = shared::read_time_of(old).0;
    if expect_ok(
        "RegisterVcpuInfo(vCPU 0, our area)",
        register_vcpu_info(new as u64),
    )
    .is_none()
    {
        return;
    }
    shared::vcpu_info_moved_to(new);

    // The current contents were copied.
    check_eq!(
        "evtchn_upcall_mask in the new area (set at boot)",
        1,
        shared::upcall_mask_of(new).load(Ordering::SeqCst)
    );
    check_eq!(
        "evtchn_upcall_pending in the new area",
        0,
        shared::upcall_pending_of(new).load(Ordering::SeqCst)
    );
    check_eq!(
        "evtchn_pending_sel in the new area",
        Hex(0),
        Hex(shared::pending_sel_of(new).load(Ordering::SeqCst))
    );
    let new_time = shared::read_time_of(new).0;
    check_eq!(
        "time.tsc_to_system_mul in the new area",
        Hex(old_time.tsc_to_system_mul),
        Hex(new_time.tsc_to_system_mul)
    );
    check_eq!(
        "time.tsc_shift in the new area",
        old_time.tsc_shift,
        new_time.tsc_shift
    );

    // Events now raise the vCPU in the new area only.
    check_eq!(format_args!("Send({port})"), Status(0), hv::send(port));
    check_eq!(
        "evtchn_upcall_pending in the new area after Send",
        1,
        shared::upcall_pending_of(new).load(Ordering::SeqCst)
    );
    check_eq!(
        "evtchn_pending_sel in the new area after Send",
        Hex(1u64),
        Hex(shared::pending_sel_of(new).load(Ordering::SeqCst))
    );
    check_eq!(
        "evtchn_upcall_pending in the shared-info page after Send",
        0,
        shared::upcall_pending_of(old).load(Ordering::SeqCst)
    );
    // Block reads and clears the new area's fields.
    check_eq!("Block with the event pending", Status(0), hv::block());
    check_eq!(
        "evtchn_upcall_mask in the new area after Block",
        0,
        shared::upcall_mask_of(new).load(Ordering::SeqCst)
    );
    check_eq!(
        "evtchn_upcall_mask in the shared-info page after Block",
        1,
        shared::upcall_mask_of(old).load(Ordering::SeqCst)
    );
    // The pvclock in the new area runs.
    let before = shared::now();
    hv::sched_yield();
    let after = shared::now();
    check!(
        after >= before && before > 0,
        "pvclock in the new area: {before} ns, then {after} ns"
    );
}

conformance_test! {
    title: "register_vcpu_info at an address not 64-byte aligned returns -EINVAL",
    section: "9.1 register_vcpu_info",
    expect: Success,
}
pub(super) fn vcpu_info_misaligned_einval() {
    let area = vcpu_info_area();
    let mem = start_info().mem_bytes;
    // Alignment is checked before the address (docs/abi.md 2.4: values before buffers).
    for gpa in [area + 1, area + 8, area + 32, area + 63, mem + 8] {
        check_eq!(
            format_args!("RegisterVcpuInfo(vCPU 0, {gpa:#x})"),
            Status::err(Errno::EINVAL),
            register_vcpu_info(gpa)
        );
    }
    // Refused attempts do not count as the one registration.
    check_eq!(
        "RegisterVcpuInfo(vCPU 0, aligned) afterwards",
        Status(0),
        register_vcpu_info(area)
    );
}

conformance_test! {
    title: "register_vcpu_info at an address not inside RAM returns -EFAULT",
    section: "9.1 register_vcpu_info",
    expect: Success,
}
pub(super) fn vcpu_info_oob_efault() {
    let mem = start_info().mem_bytes;
    for gpa in [mem, mem + 64 * 100, 1 << 40, !63, 1 << 63] {
        check_eq!(
            format_args!("RegisterVcpuInfo(vCPU 0, {gpa:#x})"),
            Status::err(Errno::EFAULT),
            register_vcpu_info(gpa)
        );
    }
    check_eq!(
        "RegisterVcpuInfo(vCPU 0, inside RAM) afterwards",
        Status(0),
        register_vcpu_info(vcpu_info_area())
    );
}

conformance_test! {
    title: "a second register_vcpu_info returns -EEXIST",
    section: "9.1 register_vcpu_info",
    expect: Success,
}
pub(super) fn vcpu_info_twice_eexist() {
    let area = vcpu_info_area();
    check_eq!(
        "RegisterVcpuInfo(vCPU 0)",
        Status(0),
        register_vcpu_info(area)
    );
    shared::vcpu_info_moved_to(area as *mut VcpuInfo);
    check_eq!(
        "RegisterVcpuInfo(vCPU 0) again, same area",
        Status::err(Errno::EEXIST),
        register_vcpu_info(area)
    );
    check_eq!(
        "RegisterVcpuInfo(vCPU 0) again, another area",
        Status::err(Errno::EEXIST),
        register_vcpu_info(area + 64)
    );
}

conformance_test! {
    title: "the runstate area shows RUNNING while running and accounts a poll as BLOCKED time",
    section: "9.2 register_runstate",
    expect: Success,
}
pub(super) fn runstate_tracks_states() {
    let Some(idle) = loopback_port() else { return };
    fill_runstate_area();
    if expect_ok(
        "RegisterRunstate(vCPU 0, our area)",
        register_runstate(runstate_area()),
    )
    .is_none()
    {
        return;
    }
    // Written at once.
    check_eq!(
        "runstate state right after registering",
        runstate::RUNNING,
        read_runstate().state
    );
    hv::sched_yield();
    let first = read_runstate();
    let now = shared::now();
    check_eq!(
        "runstate state while running",
        runstate::RUNNING,
        first.state
    );
    check!(
        first.state_entry_time <= now,
        "state_entry_time {} ns is in the future (now {now} ns)",
        first.state_entry_time
    );

    // A poll that times out after 3 ms: the vCPU is BLOCKED in between.
    let start = shared::now();
    let deadline = start + 3 * MS;
    check_eq!(
        "Poll on an idle port, 3 ms",
        Status::err(Errno::ETIMEDOUT),
        hv::poll(&[idle as u32], deadline)
    );
    let end = shared::now();
    let second = read_runstate();
    check_eq!(
        "runstate state after the poll",
        runstate::RUNNING,
        second.state
    );
    let grew = |state: u32| second.time[state as usize].wrapping_sub(first.time[state as usize]);
    let blocked = grew(runstate::BLOCKED);
    // Blocked from the call until the deadline woke it: 3 ms, less what the vCPU spent
    // getting to the call (running, or preempted: every test domain shares one CPU).
    let before_the_call = grew(runstate::RUNNING) + grew(runstate::RUNNABLE);
    check!(
        blocked > 0 && blocked + before_the_call >= 3 * MS - MS / 10 && blocked <= end - start,
        "time BLOCKED grew by {blocked} ns (RUNNING and RUNNABLE by {before_the_call} ns) over a 3 ms poll that took {} ns",
        end - start
    );
    check!(
        second.time[runstate::RUNNING as usize] > first.time[runstate::RUNNING as usize],
        "time RUNNING did not grow: {} ns, then {} ns",
        first.time[runstate::RUNNING as usize],
        second.time[runstate::RUNNING as usize]
    );
    check!(
        second.state_entry_time > first.state_entry_time && second.state_entry_time <= end,
        "state_entry_time {} ns after the poll (before it: {} ns, poll ended by {end} ns)",
        second.state_entry_time,
        first.state_entry_time
    );
    check_eq!("runstate reserved", 0, second.reserved);
}

conformance_test! {
    title: "register_runstate at an address not 8-byte aligned returns -EINVAL",
    section: "9.2 register_runstate",
    expect: Success,
}
pub(super) fn runstate_misaligned_einval() {
    let area = runstate_area();
    let mem = start_info().mem_bytes;
    for gpa in [area + 1, area + 4, area + 7, mem + 4] {
        check_eq!(
            format_args!("RegisterRunstate(vCPU 0, {gpa:#x})"),
            Status::err(Errno::EINVAL),
            register_runstate(gpa)
        );
    }
}

conformance_test! {
    title: "register_runstate of an area not inside RAM (straddling its end included) returns -EFAULT",
    section: "9.2 register_runstate",
    expect: Success,
}
pub(super) fn runstate_oob_efault() {
    let mem = start_info().mem_bytes;
    // `mem - 16` and `mem - 8` straddle the end of RAM (the area is 48 bytes); their part
    // inside RAM is the SDK's unused top of RAM.
    const _: () = assert!(TOP_OF_RAM_SCRATCH >= 16);
    for gpa in [mem - 16, mem - 8, mem, 1 << 40, !7, 1 << 63] {
        check_eq!(
            format_args!("RegisterRunstate(vCPU 0, {gpa:#x})"),
            Status::err(Errno::EFAULT),
            register_runstate(gpa)
        );
    }
}

conformance_test! {
    title: "register_runstate of 0 stops the updates",
    section: "9.2 register_runstate",
    expect: Success,
}
pub(super) fn runstate_zero_unregisters() {
    fill_runstate_area();
    if expect_ok(
        "RegisterRunstate(vCPU 0, our area)",
        register_runstate(runstate_area()),
    )
    .is_none()
    {
        return;
    }
    hv::sched_yield();
    check_eq!(
        "runstate state after a yield",
        runstate::RUNNING,
        read_runstate().state
    );
    check_eq!(
        "RegisterRunstate(vCPU 0, 0)",
        Status(0),
        register_runstate(0)
    );
    fill_runstate_area();
    hv::sched_yield();
    let _ = hv::poll(&[0], shared::now() + MS);
    // SAFETY: the area is ours; the hypervisor no longer writes it.
    let bytes = unsafe { core::ptr::read_volatile(RUNSTATE_AREA.get()) }.0;
    check!(
        bytes.iter().all(|&byte| byte == SENTINEL),
        "the runstate area changed after RegisterRunstate(0): {:02x?}",
        &bytes[..size_of::<RunstateInfo>()]
    );
}

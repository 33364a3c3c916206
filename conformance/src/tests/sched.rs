//! Tests of `sched_op` (docs/abi.md 3.3).

use lamina_abi::sched::SchedOp;
use lamina_abi::{Errno, Hypercall};
use lamina_guest_sdk::hypercall::{self, HypercallInsn, hypercall1_with, hypercall2};

use crate::framework::{Status, check_eq};

const SCHED_OP: u64 = Hypercall::SchedOp as u64;

pub(super) fn sched_yield_returns_zero() {
    for insn in HypercallInsn::ALL {
        for attempt in 1..=10 {
            // SAFETY: yield takes no buffer.
            let rax = unsafe { hypercall1_with(insn, SCHED_OP, SchedOp::Yield as u64) };
            check_eq!(
                format_args!("yield via {} (call {attempt})", insn.name()),
                Status(0),
                Status(rax)
            );
        }
    }
    check_eq!("sched_yield() of the SDK", Ok(()), hypercall::sched_yield());
}

pub(super) fn sched_unknown_op_enosys() {
    // 1 and 3 are Xen's block and poll; 1 << 32 would be yield to a hypervisor that looks at
    // EDI only.
    for op in [1, 3, 99, 1 << 32, u64::MAX] {
        // SAFETY: an unknown operation does nothing.
        let rax = unsafe { hypercall2(SCHED_OP, op, 0) };
        check_eq!(
            format_args!("sched_op operation {op:#x}"),
            Status::err(Errno::ENOSYS),
            Status(rax)
        );
    }
}

pub(super) fn shutdown_unknown_reason_einval() {
    // 3 is Xen's crash (ours is 2). 1 << 32 would be poweroff to a hypervisor that looks at
    // ESI only: that ends the domain without a result line, which also fails the test.
    for reason in [3, 99, u64::MAX, 1 << 32] {
        // SAFETY: shutdown with an invalid reason must return; if it does not, the domain ends
        // without a `Test result:` line and the test fails, which is what we want.
        let rax = unsafe { hypercall2(SCHED_OP, SchedOp::Shutdown as u64, reason) };
        check_eq!(
            format_args!("shutdown with reason {reason:#x}"),
            Status::err(Errno::EINVAL),
            Status(rax)
        );
    }
    check_eq!(
        "version after the refused shutdowns",
        Ok(u64::from(lamina_abi::abi_version())),
        hypercall::version()
    );
}

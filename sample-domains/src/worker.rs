//! `role=worker`: an unprivileged domain. It checks that every domain-control operation is
//! refused to it (`EPERM`, docs/abi.md 17), prints [`READY_LINE`], then computes until the
//! control domain destroys it. If nobody does within [`WORK_LIMIT_NS`], it reports that and
//! crashes, so a control domain that failed to destroy it cannot go unnoticed.

use lamina_abi::Errno;
use lamina_guest_sdk::domctl::{self, DomainInfo};
use lamina_guest_sdk::hypercall::HypercallError;
use lamina_guest_sdk::{println, time};

use crate::fail;

/// The line the control domain looks for in the worker's console (`domctl` read_console).
pub(crate) const READY_LINE: &str = "worker: ready, computing until destroyed";
/// System time after which a worker nobody destroyed gives up.
const WORK_LIMIT_NS: u64 = 5_000_000_000;

pub(crate) fn run(control: u32) -> ! {
    let mut infos = [DomainInfo::default(); 4];
    let mut console = [0u8; 64];
    let attempts: [(&str, Result<(), HypercallError>); 6] = [
        ("list_domains", domctl::list_domains(&mut infos).map(drop)),
        (
            "read_console",
            domctl::read_console(control, 0, &mut console).map(drop),
        ),
        ("pause", domctl::pause(control)),
        ("unpause", domctl::unpause(control)),
        ("destroy", domctl::destroy(control)),
        ("phys_info", domctl::phys_info().map(drop)),
    ];
    let mut refused = 0;
    for (operation, result) in attempts {
        match result {
            Err(error) if error == Errno::EPERM => refused += 1,
            other => println!("worker: error: domctl {operation}: {other:?}, expected EPERM"),
        }
    }
    println!(
        "worker: domctl refused with EPERM: {refused} of {} operations (list_domains read_console pause unpause destroy phys_info)",
        attempts.len()
    );
    println!("{READY_LINE}");

    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rounds: u64 = 0;
    loop {
        // xorshift: work the compiler cannot skip.
        for _ in 0..4096 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
        }
        rounds += 1;
        if time::now_ns() > WORK_LIMIT_NS {
            fail(
                "worker",
                format_args!(
                    "still running after {} ms ({rounds} rounds, state {state:#x}): nobody destroyed it",
                    WORK_LIMIT_NS / 1_000_000
                ),
            );
        }
    }
}

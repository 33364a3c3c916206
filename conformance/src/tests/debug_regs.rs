//! Tests of the debug registers (docs/abi.md 18.8): DR0-DR3, DR6 and DR7 are each vCPU's own,
//! at reset and across switches to other domains.

use core::arch::asm;

use lamina_guest_sdk::start_info;

use crate::framework::{Hex, Status, check, check_eq};
use crate::hv;

/// DR6 and DR7 after reset (Intel SDM Vol. 3B 18.2.3, 18.2.4; AMD APM Vol. 2 13.1.1).
const DR6_RESET: u64 = 0xffff_0ff0;
const DR7_RESET: u64 = 0x400;

/// DR0-DR3, DR6 and DR7 as the vCPU reads them.
fn read_all() -> [u64; 6] {
    let (dr0, dr1, dr2, dr3, dr6, dr7): (u64, u64, u64, u64, u64, u64);
    // SAFETY: reading a debug register at CPL 0 has no effect (CR4.DE is irrelevant to
    // DR0-DR3, DR6 and DR7, and DR7.GD is never set here).
    unsafe {
        asm!("mov {}, dr0", out(reg) dr0, options(nomem, nostack, preserves_flags));
        asm!("mov {}, dr1", out(reg) dr1, options(nomem, nostack, preserves_flags));
        asm!("mov {}, dr2", out(reg) dr2, options(nomem, nostack, preserves_flags));
        asm!("mov {}, dr3", out(reg) dr3, options(nomem, nostack, preserves_flags));
        asm!("mov {}, dr6", out(reg) dr6, options(nomem, nostack, preserves_flags));
        asm!("mov {}, dr7", out(reg) dr7, options(nomem, nostack, preserves_flags));
    }
    [dr0, dr1, dr2, dr3, dr6, dr7]
}

/// Loads DR0-DR3, DR6 and DR7 with `values`, which [`pattern`] makes safe: DR7 enables no
/// breakpoint, so nothing traps.
fn write_all(values: &[u64; 6]) {
    // SAFETY: CPL 0; bits 63:32 of DR6 and DR7 are 0 (no #GP), DR7 enables no breakpoint and
    // leaves GD clear, so no #DB can follow; DR0-DR3 hold canonical addresses.
    unsafe {
        asm!("mov dr0, {}", in(reg) values[0], options(nomem, nostack, preserves_flags));
        asm!("mov dr1, {}", in(reg) values[1], options(nomem, nostack, preserves_flags));
        asm!("mov dr2, {}", in(reg) values[2], options(nomem, nostack, preserves_flags));
        asm!("mov dr3, {}", in(reg) values[3], options(nomem, nostack, preserves_flags));
        asm!("mov dr6, {}", in(reg) values[4], options(nomem, nostack, preserves_flags));
        asm!("mov dr7, {}", in(reg) values[5], options(nomem, nostack, preserves_flags));
    }
}

/// What domain `id` keeps in its debug registers in round `round`, different in every domain
/// and round, and read back as written:
/// - DR0-DR3: canonical addresses made of the domain, the round and the register;
/// - DR6: the bits a write sets (B0-B3 and BS) on top of the ones that read as 1;
/// - DR7: LE, GE and the R/W and LEN fields (R/W never 10b, I/O), with no breakpoint
///   enabled and GD clear.
fn pattern(id: u64, round: u64) -> [u64; 6] {
    let address = |register: u64| (id & 0x7f) << 40 | (round & 0xfff_ffff) << 8 | register << 4;
    let mix = id.wrapping_mul(0x9e37_79b9).wrapping_add(round);
    let dr6 = DR6_RESET | (mix & 0xf) | ((mix >> 4) & 1) << 14;
    let field = |i: u64| {
        let rw = [0u64, 1, 3][((mix >> (2 * i)) % 3) as usize];
        let len = (mix >> (8 + 2 * i)) & 3;
        (len << 2 | rw) << (16 + 4 * i)
    };
    let dr7 = DR7_RESET | ((mix >> 16) & 3) << 8 | field(0) | field(1) | field(2) | field(3);
    [address(0), address(1), address(2), address(3), dr6, dr7]
}

const NAMES: [&str; 6] = ["DR0", "DR1", "DR2", "DR3", "DR6", "DR7"];

/// Checks the reset values, then keeps [`pattern`] in the registers for `rounds` yields to
/// the other domain of the pair and checks every register after every return.
fn keep_debug_registers(rounds: u64) {
    let id = u64::from(start_info().domain_id);
    let at_start = read_all();
    for (i, name) in NAMES.iter().enumerate() {
        let reset = match i {
            4 => DR6_RESET,
            5 => DR7_RESET,
            _ => 0,
        };
        check_eq!(
            format_args!("{name} of a new vCPU (the other domain of the pair may have run)"),
            Hex(reset),
            Hex(at_start[i])
        );
    }
    let mut mismatches = 0u64;
    let mut refused = 0u64;
    for round in 0..rounds {
        let wanted = pattern(id, round);
        write_all(&wanted);
        if read_all() != wanted {
            check!(
                false,
                "round {round}: the registers do not read back as written before the yield"
            );
            return;
        }
        if hv::sched_yield() != Status(0) {
            refused += 1;
        }
        let found = read_all();
        if let Some(i) = (0..6).find(|&i| found[i] != wanted[i]) {
            mismatches += 1;
            if mismatches <= 3 {
                check!(
                    false,
                    "round {round}: {} is {:#x}, not this domain's {:#x}",
                    NAMES[i],
                    found[i],
                    wanted[i]
                );
            }
        }
    }
    check_eq!(
        format_args!("rounds of {rounds} whose debug registers were not this domain's"),
        0,
        mismatches
    );
    check_eq!("refused yields", 0, refused);
    // Left as at reset: a later test in this boot starts from there either way.
    write_all(&[0, 0, 0, 0, DR6_RESET, DR7_RESET]);
}

const ROUNDS: u64 = 1000;

conformance_test! {
    title: "with debug_regs_kept_b: DR0-DR3, DR6 and DR7 read their reset values first, then hold this domain's own values across 1000 yields to the other domain on its CPU",
    section: "18.8 Debug registers",
    expect: Success,
    cmdline: "affinity=0",
}
pub(super) fn debug_regs_kept_a() {
    keep_debug_registers(ROUNDS);
}

conformance_test! {
    title: "with debug_regs_kept_a: the same, its own values",
    section: "18.8 Debug registers",
    expect: Success,
    cmdline: "affinity=0",
}
pub(super) fn debug_regs_kept_b() {
    keep_debug_registers(ROUNDS);
}

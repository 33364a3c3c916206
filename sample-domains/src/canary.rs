//! `role=canary`: the domain beside the hostile one in `cargo xtask fuzz`. It fills 1 MiB of
//! its RAM with a pattern and, for `ms=` milliseconds of system time, checks the pattern (a
//! 16 KiB slice per pass), that its debug registers DR0-DR3 keep its values (the fuzzer writes
//! its own: docs/abi.md 18.8) and that time advances between its yields. It ends with
//! `canary: ok, <n> checks` or `canary: error: ...` and powers off (crash on an error).

use core::arch::asm;

use lamina_guest_sdk::{println, sched, time};

use crate::fail;

const WORDS: usize = 1 << 17; // 1 MiB
static mut AREA: [u64; WORDS] = [0; WORDS];

fn pattern(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xc0ff_ee00_dead_beef
}

/// What the canary keeps in DR0-DR3: canonical addresses no other domain writes. DR7 stays
/// 0x400, so they enable nothing.
const DEBUG_ADDRESSES: [u64; 4] = [
    0x7fca_0000_0000,
    0x7fca_0000_1008,
    0x7fca_0000_2010,
    0x7fca_0000_3018,
];

fn write_debug_addresses() {
    let [dr0, dr1, dr2, dr3] = DEBUG_ADDRESSES;
    // SAFETY: CPL 0; canonical addresses; DR7 enables no breakpoint, so nothing traps.
    unsafe {
        asm!("mov dr0, {}", in(reg) dr0, options(nomem, nostack, preserves_flags));
        asm!("mov dr1, {}", in(reg) dr1, options(nomem, nostack, preserves_flags));
        asm!("mov dr2, {}", in(reg) dr2, options(nomem, nostack, preserves_flags));
        asm!("mov dr3, {}", in(reg) dr3, options(nomem, nostack, preserves_flags));
    }
}

fn read_debug_addresses() -> [u64; 4] {
    let (dr0, dr1, dr2, dr3);
    // SAFETY: reading a debug register at CPL 0 has no effect.
    unsafe {
        asm!("mov {}, dr0", out(reg) dr0, options(nomem, nostack, preserves_flags));
        asm!("mov {}, dr1", out(reg) dr1, options(nomem, nostack, preserves_flags));
        asm!("mov {}, dr2", out(reg) dr2, options(nomem, nostack, preserves_flags));
        asm!("mov {}, dr3", out(reg) dr3, options(nomem, nostack, preserves_flags));
    }
    [dr0, dr1, dr2, dr3]
}

pub(crate) fn run(ms: u64) -> ! {
    write_debug_addresses();
    let area = core::ptr::addr_of_mut!(AREA).cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: inside AREA; only this vCPU touches it.
        unsafe { area.add(i).write_volatile(pattern(i)) };
    }
    let end = time::now_ns() + ms * 1_000_000;
    let mut checks = 0u64;
    let mut last = time::now_ns();
    while last < end {
        // A 16 KiB slice per pass (all of it every 64 passes): emulators are slow.
        let slice = WORDS / 64;
        let first = (checks as usize % 64) * slice;
        for i in first..first + slice {
            // SAFETY: as above.
            let word = unsafe { area.add(i).read_volatile() };
            if word != pattern(i) {
                fail("canary", format_args!("word {i} changed: {word:#x}"));
            }
        }
        checks += 1;
        let _ = sched::yield_now();
        let debug = read_debug_addresses();
        if debug != DEBUG_ADDRESSES {
            fail(
                "canary",
                format_args!("debug registers DR0-DR3 changed: {debug:#x?}"),
            );
        }
        let now = time::now_ns();
        if now <= last {
            fail(
                "canary",
                format_args!("time stood still: {now} after {last}"),
            );
        }
        last = now;
    }
    println!("canary: ok, {checks} checks");
    crate::finish(0)
}

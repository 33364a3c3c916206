//! `role=canary`: the domain beside the hostile one in `cargo xtask fuzz`. It fills 1 MiB of
//! its RAM with a pattern and, for `ms=` milliseconds of system time, checks the pattern (a
//! 16 KiB slice per pass) and that time advances between its yields. It ends with `canary: ok, <n> checks` or
//! `canary: error: ...` and powers off (crash on an error).

use lamina_guest_sdk::{println, sched, time};

use crate::fail;

const WORDS: usize = 1 << 17; // 1 MiB
static mut AREA: [u64; WORDS] = [0; WORDS];

fn pattern(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xc0ff_ee00_dead_beef
}

pub(crate) fn run(ms: u64) -> ! {
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

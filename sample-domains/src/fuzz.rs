//! `role=fuzz`: a hostile guest for `cargo xtask fuzz`. Deterministic from `seed=`, it throws
//! `ops=` operations: half random hypercalls (documented numbers weighted, unknown ones too,
//! sub-operations and flags, arguments drawn from values where bounds checks go wrong: 0, -1,
//! the last bytes of RAM, just past it, the grant window, hypervisor-looking addresses, huge
//! lengths, other domains' ids, ports and grant references; multicall batches whose entries
//! point into the batch), half instructions at CPL 0 or 3 ([`crate::fuzz_cpu`]). It prints
//! `fuzz: <n> operations` every 1,000 and `fuzz: done` at the end. Calls that would end or park
//! it for good (shutdown, block) are left out; a call that scribbles over its own code or
//! stack may crash it, which is its own business.

use lamina_abi::event_channel::DOMID_SELF;
use lamina_abi::layout::GRANT_WINDOW_GPA;
use lamina_abi::shared_info::pvclock_ns;
use lamina_guest_sdk::hypercall::{gpa_of, hypercall5};
use lamina_guest_sdk::{StartInfo, println, sched};

use crate::fuzz_cpu;

/// Where calls read and write: a page-aligned scratch area in the image.
#[repr(C, align(4096))]
struct Scratch([u8; 16384]);
static mut SCRATCH: Scratch = Scratch([0; 16384]);

pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub(crate) struct Context {
    pub(crate) ram: u64,
    scratch: u64,
    domains: u64,
}

pub(crate) fn interesting(rng: &mut Rng, cx: &Context) -> u64 {
    match rng.below(20) {
        0 => 0,
        1 => u64::MAX,
        2 => rng.below(8),
        3 => cx.ram - 1 - rng.below(16),
        4 => cx.ram + rng.below(16),
        5 => GRANT_WINDOW_GPA + rng.below(520) * 4096,
        6 => 0xffff_8000_0000_0000 | (rng.next() & 0xffff_ffff_f000),
        7 => [1 << 63, u64::from(u32::MAX), 1 << 32, u64::MAX - 0xfff][rng.below(4) as usize],
        8 => rng.below(cx.domains + 2),
        9 => DOMID_SELF,
        10 => cx.scratch + rng.below(16384),
        11 => cx.scratch + rng.below(4) * 4096,
        12 => rng.below(1030),
        13 => rng.below(260),
        14 => 1_000_000 * rng.below(100),
        15 => rng.next() as u16 as u64,
        _ => rng.next(),
    }
}

/// A hypercall number: documented ones mostly, unknown ones too.
fn number(rng: &mut Rng) -> u64 {
    match rng.below(16) {
        0 => 10 + rng.below(8),
        1 => rng.next(),
        _ => rng.below(10),
    }
}

/// Sub-operation: small numbers mostly; never one that ends or parks the vCPU for good.
fn sub_op(rng: &mut Rng, nr: u64, cx: &Context) -> u64 {
    let op = if rng.below(8) == 0 {
        interesting(rng, cx)
    } else {
        rng.below(9)
    };
    match (nr, op) {
        (2, 1 | 2) => 0, // block, shutdown: yield instead
        _ => op,
    }
}

/// System time by vCPU 0's pvclock in the shared-info page, read once without the version
/// protocol and without StartInfo (the fuzzer's calls may have written garbage into both: the
/// SDK's reader would then spin on an odd version, or follow a wild pointer).
fn shared_clock() -> u64 {
    let at = lamina_abi::layout::SHARED_INFO_GPA
        + core::mem::offset_of!(lamina_abi::shared_info::SharedInfo, vcpu_info) as u64
        + core::mem::offset_of!(lamina_abi::shared_info::VcpuInfo, time) as u64;
    // SAFETY: the shared-info page is in RAM and identity-mapped (docs/abi.md 4.2); any bytes
    // are a valid VcpuTimeInfo (plain integers).
    let time =
        unsafe { core::ptr::read_volatile(at as *const lamina_abi::shared_info::VcpuTimeInfo) };
    pvclock_ns(&time, lamina_guest_sdk::time::rdtsc())
}

/// Domain control as the privileged fuzzer throws it: `protect` is a domain it must leave
/// alone (the canary whose verdict classifies the boot), `target` the one it hits instead.
#[derive(Clone, Copy)]
pub(crate) struct Spare {
    pub(crate) protect: u64,
    pub(crate) target: u64,
}

const DOMCTL: u64 = 9;
const DOMCTL_PAUSE: u64 = 2;
const DOMCTL_UNPAUSE: u64 = 3;

/// A domctl (`op`, domain `id`) as the fuzzer may make it: never on the protected domain, and
/// never a pause of itself (nothing would unpause it: a HANG of its own making).
fn spare(op: u64, id: u64, me: u64, spare: Option<Spare>) -> (u64, u64) {
    let Some(spare) = spare else {
        return (op, id);
    };
    let id = if id == spare.protect {
        spare.target
    } else {
        id
    };
    let op = if op == DOMCTL_PAUSE && (id == me || id == DOMID_SELF) {
        DOMCTL_UNPAUSE
    } else {
        op
    };
    (op, id)
}

/// `trace`: print every operation from this one on (`fuzz: #<n> ...`), to find the one a
/// HANG stops at. `spared`: privileged (`privileged=1 protect=<id> target=<id>`).
pub(crate) fn run(
    start: &'static StartInfo,
    seed: u64,
    ops: u32,
    trace: u32,
    spared: Option<Spare>,
) -> ! {
    let me = u64::from(start.domain_id);
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    // SAFETY: only this vCPU touches the scratch area, through raw pointers.
    let scratch = gpa_of(unsafe { &*core::ptr::addr_of!(SCRATCH.0) });
    let cx = Context {
        ram: start.mem_bytes,
        scratch,
        domains: if spared.is_some() { 3 } else { 2 },
    };
    // Its calls may write anywhere in its RAM, its shared-info page too (where the pvclock
    // lives): poll deadlines come from the pvclock as it was before the first call.
    let (clock, _) = lamina_guest_sdk::time::pvclock_snapshot();
    let own_now = || pvclock_ns(&clock, lamina_guest_sdk::time::rdtsc());
    let mut clock_trusted = true;
    // Before the first call: the IDT, GDT and page tables of its own.
    fuzz_cpu::install();
    let mut tally = fuzz_cpu::Tally::new();
    println!("fuzz: seed {seed}, {ops} operations");
    for done in 0..ops {
        if done % 1000 == 0 {
            println!("fuzz: {done} operations");
        }
        if rng.below(2) == 0 {
            if done >= trace {
                println!("fuzz: #{done}");
            }
            fuzz_cpu::operation(&mut rng, &cx, &mut tally, done >= trace);
            continue;
        }
        let nr = number(&mut rng);
        let mut args = [0u64; 5];
        args[0] = sub_op(&mut rng, nr, &cx);
        for arg in &mut args[1..] {
            *arg = interesting(&mut rng, &cx);
        }
        if nr == DOMCTL {
            (args[0], args[1]) = spare(args[0], args[1], me, spared);
        }
        if nr == 2 && args[0] == 3 {
            // Poll: a deadline 1 ms away, so that it cannot park the vCPU for good.
            args[3] = own_now() + 1_000_000;
        }
        if done >= trace {
            println!("fuzz: #{done} nr {nr:#x} args {args:x?}");
        }
        if nr == 6 {
            // A multicall batch in the scratch area, entries pointing into the batch.
            let count = rng.below(8);
            for i in 0..count {
                let mut entry = [0u64; 7];
                entry[0] = number(&mut rng);
                entry[1] = sub_op(&mut rng, entry[0], &cx);
                for word in &mut entry[2..6] {
                    *word = if rng.below(3) == 0 {
                        scratch + rng.below(count.max(1) * 56)
                    } else {
                        interesting(&mut rng, &cx)
                    };
                }
                if entry[0] == DOMCTL {
                    (entry[1], entry[2]) = spare(entry[1], entry[2], me, spared);
                }
                if done >= trace {
                    println!("fuzz: #{done} entry {i}: {entry:x?}");
                }
                for (w, word) in entry.iter().enumerate() {
                    // SAFETY: inside the scratch area (8 entries of 56 bytes).
                    unsafe {
                        let at = core::ptr::addr_of_mut!(SCRATCH.0).cast::<u8>();
                        at.add(i as usize * 56 + w * 8)
                            .cast::<u64>()
                            .write_unaligned(*word);
                    }
                }
            }
            args[0] = if rng.below(4) == 0 {
                interesting(&mut rng, &cx)
            } else {
                scratch
            };
            args[1] = if rng.below(4) == 0 {
                interesting(&mut rng, &cx)
            } else {
                count
            };
        }
        // SAFETY: a hostile call on purpose; what it may write lands in this domain's RAM,
        // which this kernel does not rely on beyond its stack and image.
        unsafe { hypercall5(nr, args[0], args[1], args[2], args[3], args[4]) };
        if clock_trusted {
            let (shared, own) = (shared_clock(), own_now());
            if shared.abs_diff(own) > 1_000_000_000 {
                // Not a finding: the fuzzer scribbled on its own clock (shown to explain what
                // it does next).
                println!(
                    "fuzz: #{done} nr {nr:#x} args {args:x?}: its pvclock now reads {shared} ns, {own} ns by the first one"
                );
                clock_trusted = false;
            }
        }
    }
    fuzz_cpu::summary(&tally);
    println!("fuzz: done, {ops} operations");
    sched::shutdown(lamina_abi::sched::ShutdownReason::Poweroff)
}

//! `role=fuzz`: a hostile guest for `cargo xtask fuzz`. Deterministic from `seed=`, it throws
//! `ops=` operations: half random hypercalls (documented numbers weighted, unknown ones too,
//! sub-operations and flags, arguments drawn from values where bounds checks go wrong: 0, -1,
//! the last bytes of RAM, just past it, the grant window, hypervisor-looking addresses, huge
//! lengths, other domains' ids, ports and grant references; multicall batches whose entries
//! point into the batch), half instructions at CPL 0 or 3 ([`crate::fuzz_cpu`]). It prints
//! `fuzz: <n> operations` every 1,000 and `fuzz: done` at the end. Calls that would end or park
//! it for good (shutdown, block, taking vCPU 0 down) are left out; a call that scribbles over
//! its own code or stack may crash it, which is its own business.
//!
//! With `vcpus=` above 1, vCPU 0 first brings the others up, and each throws random hypercalls
//! of its own (no instructions: only vCPU 0 has the recovering IDT) at the same time, on the
//! same scratch area, until vCPU 0 is done: calls of two vCPUs of one domain race in the
//! hypervisor, on several CPUs when the machine has them.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lamina_abi::event_channel::DOMID_SELF;
use lamina_abi::layout::GRANT_WINDOW_GPA;
use lamina_abi::shared_info::MAX_VCPUS;
use lamina_abi::shared_info::pvclock_ns;
use lamina_abi::vcpu::VcpuStartState;
use lamina_guest_sdk::hypercall::{gpa_of, hypercall5};
use lamina_guest_sdk::{StartInfo, println, sched, vcpu};

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

const SCHED_OP: u64 = 2;
const VCPU_OP: u64 = 4;
const VCPU_OP_DOWN: u64 = 7;
const VCPU_OP_IS_UP: u64 = 8;

/// Sub-operation: small numbers mostly; never one that ends or parks the vCPU for good.
fn sub_op(rng: &mut Rng, nr: u64, cx: &Context) -> u64 {
    let op = if rng.below(8) == 0 {
        interesting(rng, cx)
    } else {
        rng.below(9)
    };
    match (nr, op) {
        (SCHED_OP, 1 | 2) => 0, // block, shutdown: yield instead
        _ => op,
    }
}

/// A vcpu_op down that would take vCPU 0 (which ends the boot) down becomes is_up: nothing
/// would bring it up again. Downs of the other vCPUs stay (vCPU 0 may bring them up again).
fn spare_vcpu0(nr: u64, args: &mut [u64]) {
    if nr == VCPU_OP && args[0] == VCPU_OP_DOWN && args[1] as u32 == 0 {
        args[0] = VCPU_OP_IS_UP;
    }
}

const STACK_BYTES: usize = 16 * 1024;

/// The other vCPUs' stacks, each its own vCPU's once it was brought up.
#[repr(C, align(16))]
struct Stacks([[u8; STACK_BYTES]; MAX_VCPUS]);
static mut STACKS: Stacks = Stacks([[0; STACK_BYTES]; MAX_VCPUS]);

/// What the other vCPUs need: the seed, RAM size and scratch area (vCPU 0 writes them before
/// any of them is up), and when to stop.
static SEED: AtomicU64 = AtomicU64::new(0);
static RAM: AtomicU64 = AtomicU64::new(0);
static SCRATCH_GPA: AtomicU64 = AtomicU64::new(0);
static DOMAINS: AtomicU64 = AtomicU64::new(2);
static STOP: AtomicBool = AtomicBool::new(false);
/// Calls each other vCPU made.
static CALLS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];

/// A random hypercall (multicall batches left to vCPU 0): `args` drawn as for vCPU 0's.
fn random_call(rng: &mut Rng, cx: &Context) -> (u64, [u64; 5]) {
    let nr = number(rng);
    let mut args = [0u64; 5];
    args[0] = sub_op(rng, nr, cx);
    for arg in &mut args[1..] {
        *arg = interesting(rng, cx);
    }
    spare_vcpu0(nr, &mut args);
    (nr, args)
}

/// Where the other vCPUs start (RDI: the vCPU's number): random hypercalls until vCPU 0 is
/// done, then down. Its polls wait at most 1 ms by the TSC it reads (not the pvclock, which
/// the calls may scribble on).
extern "C" fn other_vcpu(index: u64) -> ! {
    let slot = (index as usize).min(MAX_VCPUS - 1);
    let mut rng =
        Rng((SEED.load(Ordering::SeqCst) ^ (index << 48)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let cx = Context {
        ram: RAM.load(Ordering::SeqCst),
        scratch: SCRATCH_GPA.load(Ordering::SeqCst),
        domains: DOMAINS.load(Ordering::SeqCst),
    };
    while !STOP.load(Ordering::SeqCst) {
        let (nr, mut args) = random_call(&mut rng, &cx);
        if nr == DOMCTL {
            // Unprivileged or not, the other vCPUs leave domain control to vCPU 0.
            continue;
        }
        if nr == SCHED_OP && args[0] == 3 {
            // Poll with no deadline the hypervisor could honour late: 0 is "no deadline", so
            // a tiny one that is already past.
            args[3] = 1;
        }
        // SAFETY: a hostile call on purpose, as vCPU 0's.
        unsafe { hypercall5(nr, args[0], args[1], args[2], args[3], args[4]) };
        CALLS[slot].fetch_add(1, Ordering::Relaxed);
    }
    loop {
        let _ = vcpu::down(index as u32);
    }
}

/// Brings vCPUs 1 to `nr_vcpus - 1` up running [`other_vcpu`]; returns how many came up.
fn start_other_vcpus(nr_vcpus: u32) -> u32 {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    let mut started = 0;
    for index in 1..nr_vcpus.min(MAX_VCPUS as u32) {
        // SAFETY: only the address is taken; the stack is that vCPU's alone from now on.
        let stack = unsafe { core::ptr::addr_of_mut!(STACKS.0[index as usize]) } as u64;
        let start = VcpuStartState {
            rip: other_vcpu as *const () as usize as u64,
            rsp: stack + STACK_BYTES as u64 - 8,
            cr3: cr3 & !0xfff,
            argument: u64::from(index),
        };
        // SAFETY: the code and stack are the new vCPU's; what else it touches, it touches on
        // purpose.
        if vcpu::initialise(index, &start).is_ok() && unsafe { vcpu::up(index) }.is_ok() {
            started += 1;
        }
    }
    started
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
    // The other vCPUs, on the page tables it now runs on.
    SEED.store(seed, Ordering::SeqCst);
    RAM.store(cx.ram, Ordering::SeqCst);
    SCRATCH_GPA.store(scratch, Ordering::SeqCst);
    DOMAINS.store(cx.domains, Ordering::SeqCst);
    let others = start_other_vcpus(start.nr_vcpus);
    if others > 0 {
        println!("fuzz: {others} other vCPU(s) throw calls too");
    }
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
        spare_vcpu0(nr, &mut args);
        if nr == SCHED_OP && args[0] == 3 {
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
                spare_vcpu0(entry[0], &mut entry[1..]);
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
    STOP.store(true, Ordering::SeqCst);
    if others > 0 {
        let calls: u64 = CALLS.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        println!("fuzz: the other vCPU(s) made {calls} calls");
    }
    println!("fuzz: done, {ops} operations");
    sched::shutdown(lamina_abi::sched::ShutdownReason::Poweroff)
}

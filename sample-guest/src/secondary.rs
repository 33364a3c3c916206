//! The sample guest's other vCPUs (`vcpus=` above 1, docs/abi.md 19): each is given a start
//! state and brought up with `vcpu_op`, counts the primes in its own range, publishes the
//! count, and takes itself down. vCPU 0 waits for every count and checks it against its own.

use core::sync::atomic::{AtomicU64, Ordering};

use lamina_abi::shared_info::MAX_VCPUS;
use lamina_abi::vcpu::VcpuStartState;
use lamina_guest_sdk::{hypercall, println, vcpu};

/// Numbers each vCPU looks at.
const RANGE: u64 = 20_000;
const STACK_BYTES: usize = 16 * 1024;

/// Each secondary vCPU's stack.
#[repr(C, align(16))]
struct Stacks([[u8; STACK_BYTES]; MAX_VCPUS]);

/// Written only by the vCPU that owns each stack, after vCPU 0 gave it out.
static mut STACKS: Stacks = Stacks([[0; STACK_BYTES]; MAX_VCPUS]);

/// Each vCPU's prime count plus 1 (0: not yet), and the APIC id it saw.
static COUNTS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
static APIC_IDS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(u64::MAX) }; MAX_VCPUS];

fn primes_in(start: u64, end: u64) -> u64 {
    (start.max(2)..end)
        .filter(|&n| (2..).take_while(|d| d * d <= n).all(|d| n % d != 0))
        .count() as u64
}

/// Where a secondary vCPU starts: RDI is its number.
extern "C" fn secondary_main(index: u64) -> ! {
    let index = index as usize;
    APIC_IDS[index].store(u64::from(vcpu::this_vcpu()), Ordering::SeqCst);
    let start = index as u64 * RANGE;
    COUNTS[index].store(primes_in(start, start + RANGE) + 1, Ordering::SeqCst);
    // Done: down until someone brings it up again, which no one does.
    loop {
        let _ = vcpu::down(index as u32);
    }
}

/// Brings vCPUs 1.. up, waits for their counts and checks them; returns how many ran.
pub(crate) fn run(nr_vcpus: u32) -> Result<u32, &'static str> {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    let others = 1..nr_vcpus.min(MAX_VCPUS as u32);
    for index in others.clone() {
        // SAFETY: only the address is taken; the stack is this vCPU's alone from now on.
        let stack = unsafe { core::ptr::addr_of_mut!(STACKS.0[index as usize]) } as u64;
        let start = VcpuStartState {
            rip: secondary_main as *const () as usize as u64,
            // As after a call: the return address slot below a 16-byte boundary.
            rsp: stack + STACK_BYTES as u64 - 8,
            cr3: cr3 & !0xfff,
            argument: u64::from(index),
        };
        vcpu::initialise(index, &start).map_err(|_| "initialise refused")?;
        // SAFETY: the code and stack above are the new vCPU's, and it shares nothing else but
        // the atomics.
        unsafe { vcpu::up(index) }.map_err(|_| "up refused")?;
    }
    let mut all_done = false;
    for _ in 0..1_000_000 {
        all_done = others
            .clone()
            .all(|i| COUNTS[i as usize].load(Ordering::SeqCst) != 0);
        if all_done {
            break;
        }
        let _ = hypercall::sched_yield();
    }
    if !all_done {
        return Err("a secondary vCPU did not report");
    }
    for index in others.clone() {
        let start = u64::from(index) * RANGE;
        let reported = COUNTS[index as usize].load(Ordering::SeqCst) - 1;
        let apic_id = APIC_IDS[index as usize].load(Ordering::SeqCst);
        println!(
            "sample-guest: vCPU {index} (APIC id {apic_id}) counted {reported} primes in [{start}, {})",
            start + RANGE
        );
        if reported != primes_in(start, start + RANGE) || apic_id != u64::from(index) {
            return Err("a secondary vCPU's count or APIC id is wrong");
        }
    }
    Ok(nr_vcpus.saturating_sub(1))
}

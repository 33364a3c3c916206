//! A page remapped, then unmapped, and shot down on every vCPU while every vCPU keeps reading
//! it: after each shootdown no vCPU may use the translation it cached before (docs/abi.md 11:
//! "no vCPU of the mask uses a translation of those addresses that it had cached before the
//! call").
//!
//! The page is [`PAGE_VA`], mapped by a page table of the kernel's own ([`TABLE_GPA`]) in an
//! unused entry of the boot page directory. Generation 0 maps it to a frame holding
//! [`MAGIC_A`]; vCPU 0 waits until every vCPU read `MAGIC_A` (so each has the translation
//! cached, or could have), remaps it to a frame holding [`MAGIC_B`], shoots down the address
//! on every vCPU and publishes generation 1; then unmaps it, shoots down, generation 2. A
//! vCPU that reads the generation and then the page must find that generation's contents (or
//! a later one's, if vCPU 0 moved on meanwhile): `MAGIC_A` after generation 1, or any read
//! that does not fault after generation 2, is a stale translation used.

use core::sync::atomic::{AtomicU64, Ordering};

use lamina_guest_sdk::interrupts::{self, TrapFrame};
use lamina_guest_sdk::{percpu, println, pvops};

/// The virtual address of the page: PD entry 256 of the first GiB, past any RAM the boot
/// tables map (`mem=` up to 512 MiB).
const PAGE_VA: u64 = 0x2000_0000;
/// Free low RAM (docs/abi.md 4.2): the page table and the two frames.
const TABLE_GPA: u64 = 0xc000;
const FRAME_A_GPA: u64 = 0xd000;
const FRAME_B_GPA: u64 = 0xe000;
pub(crate) const LAST_GPA: u64 = FRAME_B_GPA + 0x1000;
const MAGIC_A: u64 = 0xa11c_e000_0000_00aa;
const MAGIC_B: u64 = 0xb0b0_0000_0000_00bb;
const PRESENT_WRITABLE: u64 = 0b11;
const PD_INDEX: usize = (PAGE_VA >> 21) as usize & 511;

/// The generation vCPU 0 published; [`GENERATIONS`] ends the phase.
static GENERATION: AtomicU64 = AtomicU64::new(0);
const GENERATIONS: u64 = 3;
/// Per generation, the vCPUs that read that generation's contents.
static SEEN: [AtomicU64; GENERATIONS as usize] = [const { AtomicU64::new(0) }; 3];
/// Reads that found an older generation's contents: stale translations used.
pub(crate) static STALE: AtomicU64 = AtomicU64::new(0);
/// Reads of the page that faulted, and that did not.
pub(crate) static FAULTS: AtomicU64 = AtomicU64::new(0);
pub(crate) static READS: AtomicU64 = AtomicU64::new(0);

// The read that may fault, as a function of its own so that the `#PF` handler knows the
// instruction and where to resume: `rdi` the address; returns the value in RAX and 1 in RDX if
// the read faulted (RAX:RDX is how SysV returns a 16-byte struct of two integers).
#[cfg(target_os = "none")]
core::arch::global_asm!(
    ".pushsection .text.sample_guest_probe, \"ax\"",
    ".global sample_guest_probe",
    "sample_guest_probe:",
    "xor eax, eax",
    "xor edx, edx",
    ".global sample_guest_probe_load",
    "sample_guest_probe_load:",
    "mov rax, qword ptr [rdi]",
    ".global sample_guest_probe_resume",
    "sample_guest_probe_resume:",
    "ret",
    ".popsection",
);

#[repr(C)]
struct ProbeResult {
    value: u64,
    faulted: u64,
}

#[cfg(target_os = "none")]
unsafe extern "C" {
    fn sample_guest_probe(address: u64) -> ProbeResult;
    static sample_guest_probe_load: u8;
    static sample_guest_probe_resume: u8;
}

/// Reads the u64 at `address`; `None` if the read faulted (the `#PF` handler resumes after
/// it).
#[cfg(target_os = "none")]
fn probe(address: u64) -> Option<u64> {
    // SAFETY: a read; a fault is recovered by `on_page_fault`, which resumes at the label
    // after the load with RDX = 1.
    let result = unsafe { sample_guest_probe(address) };
    (result.faulted == 0).then_some(result.value)
}

/// Where the `#PF` handler recognises the probe's load, and where it resumes.
#[cfg(target_os = "none")]
fn probe_addresses() -> (u64, u64) {
    (
        &raw const sample_guest_probe_load as u64,
        &raw const sample_guest_probe_resume as u64,
    )
}

// On the host the kernel is only checked, never run.
#[cfg(not(target_os = "none"))]
fn probe(_address: u64) -> Option<u64> {
    Some(
        ProbeResult {
            value: 0,
            faulted: 0,
        }
        .value,
    )
}

#[cfg(not(target_os = "none"))]
fn probe_addresses() -> (u64, u64) {
    (0, 0)
}

fn on_page_fault(frame: &mut TrapFrame) {
    let (load, resume) = probe_addresses();
    if frame.rip != load {
        let cr2: u64;
        // SAFETY: reading CR2 has no side effect.
        unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
        super::fail_here(format_args!(
            "#PF at {:#x} (address {cr2:#x}, error {:#x}) on vCPU {}",
            frame.rip,
            frame.error_code,
            percpu::current()
        ));
    }
    frame.rip = resume;
    frame.rdx = 1;
}

/// The generation whose contents a read found: 0 `MAGIC_A`, 1 `MAGIC_B`, 2 a fault.
fn generation_of(read: Option<u64>) -> Result<u64, u64> {
    match read {
        Some(MAGIC_A) => Ok(0),
        Some(MAGIC_B) => Ok(1),
        None => Ok(2),
        Some(other) => Err(other),
    }
}

/// One read against the generation published before it.
fn check_once(me: u32) -> u64 {
    let generation = GENERATION.load(Ordering::SeqCst);
    if generation >= GENERATIONS {
        return generation;
    }
    let read = probe(PAGE_VA);
    READS.fetch_add(1, Ordering::Relaxed);
    if read.is_none() {
        FAULTS.fetch_add(1, Ordering::Relaxed);
    }
    match generation_of(read) {
        Ok(found) if found == generation => {
            SEEN[generation as usize].fetch_or(1 << me, Ordering::SeqCst);
        }
        Ok(found) if found < generation => {
            STALE.fetch_add(1, Ordering::SeqCst);
        }
        Ok(_) => {} // vCPU 0 moved on since the generation was read
        Err(value) => {
            super::fail_here(format_args!("vCPU {me} read {value:#x} from the test page"))
        }
    }
    generation
}

fn table_entry(table: u64, index: usize) -> *mut u64 {
    ((table & 0x000f_ffff_ffff_f000) as *mut u64).wrapping_add(index.min(511))
}

/// Maps the page to frame A in a table of its own: hooks the table into the boot page
/// directory. Runs on vCPU 0 before the phase.
pub(crate) fn prepare() -> Result<(), &'static str> {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    // SAFETY: the boot page tables are identity-mapped RAM (docs/abi.md 4.2), the kernel's;
    // the pages below are free RAM (checked by the caller against the memory map).
    unsafe {
        let pml4e = table_entry(cr3, 0).read_volatile();
        let pdpte = table_entry(pml4e, 0).read_volatile();
        if pml4e & 1 == 0 || pdpte & 1 == 0 || pdpte & 0x80 != 0 {
            return Err("the boot page tables are not as docs/abi.md 4.2 says");
        }
        let pde = table_entry(pdpte, PD_INDEX);
        if pde.read_volatile() != 0 {
            return Err("the test page's PD entry is in use (mem= above 512 MiB?)");
        }
        core::ptr::write_bytes(TABLE_GPA as *mut u8, 0, 4096);
        (FRAME_A_GPA as *mut u64).write_volatile(MAGIC_A);
        (FRAME_B_GPA as *mut u64).write_volatile(MAGIC_B);
        table_entry(TABLE_GPA, 0).write_volatile(FRAME_A_GPA | PRESENT_WRITABLE);
        pde.write_volatile(TABLE_GPA | PRESENT_WRITABLE);
    }
    interrupts::set_handler(14, on_page_fault);
    Ok(())
}

/// What each vCPU but 0 does in the phase: reads the page until vCPU 0 ends it.
pub(crate) fn target(me: u32) {
    while check_once(me) < GENERATIONS {
        core::hint::spin_loop();
    }
}

/// vCPU 0's part: the two shootdowns, each while every vCPU reads. `all` is the mask of
/// every vCPU (vCPU 0 included).
pub(crate) fn drive(all: u64) -> Result<(), &'static str> {
    let table_slot = table_entry(TABLE_GPA, 0);
    for (next, entry) in [(1, FRAME_B_GPA | PRESENT_WRITABLE), (2, 0)] {
        let previous = next - 1;
        super::wait_until("every vCPU reading the test page", || {
            check_once(0);
            SEEN[previous as usize].load(Ordering::SeqCst) == all
        })?;
        // SAFETY: the kernel's own page table (prepare); the shootdown below follows.
        unsafe { table_slot.write_volatile(entry) };
        pvops::smp()
            .flush_tlb(all, &[PAGE_VA])
            .map_err(|_| "flush_tlb refused")?;
        GENERATION.store(next, Ordering::SeqCst);
    }
    super::wait_until("every vCPU finding the page unmapped", || {
        check_once(0);
        SEEN[2].load(Ordering::SeqCst) == all
    })?;
    // The #PF handler stays: a sibling may still be between its last read and the end.
    GENERATION.store(GENERATIONS, Ordering::SeqCst);
    if STALE.load(Ordering::SeqCst) != 0 {
        println!(
            "sample-guest: error: {} reads used a stale translation",
            STALE.load(Ordering::SeqCst)
        );
        return Err("a stale translation was used after a shootdown");
    }
    Ok(())
}

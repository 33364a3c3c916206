//! Tests of IPIs between the vCPUs of one domain through the emulated x2APIC (docs/abi.md
//! 14.1, 14.2), the way a kernel that was never ported starts and signals its processors:
//! INIT-SIPI-SIPI starts vCPU 1 in the documented state, fixed IPIs go both ways and are
//! handled and EOIed, and IPIs that name no vCPU, or a SIPI page that is not RAM, change
//! nothing.
//!
//! vCPU 1 enters through a trampoline the test writes at the SIPI page: it saves the entry
//! RSP, loads its stack and jumps to [`secondary_entry`], which records what it found and runs
//! the test's [`SECONDARY_JOB`]. It reports through atomics only; every check and all output
//! stay on vCPU 0.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use lamina_abi::vcpu::VcpuOp;
use lamina_guest_sdk::start_info;

use crate::console::println;
use crate::framework::{Hex, Status, check, check_eq};
use crate::hv;
use crate::irq;
use crate::x86::apic::{self, write};
use crate::x86::{self, RacyCell, Stack, msr};

/// The SIPI vector the tests use: page `0x20000`, free RAM below 1 MiB (docs/abi.md 4.2).
const SIPI_VECTOR: u8 = 0x20;
/// The SIPI page's address, which is also vCPU 1's first RIP (docs/abi.md 14.2).
const SIPI_PAGE: u64 = (SIPI_VECTOR as u64) << 12;

// ICR fields (SDM Vol. 3A 12.6.1, 12.12.9).
const DELIVERY_INIT: u64 = 5 << 8;
const DELIVERY_STARTUP: u64 = 6 << 8;
const LEVEL_ASSERT: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const LOGICAL: u64 = 1 << 11;
const ALL_EXCLUDING_SELF: u64 = 3 << 18;

/// The vector vCPU 0 sends to vCPU 1, and the one vCPU 1 answers with.
const PING: u8 = 0x51;
const PONG: u8 = 0x52;

static SECONDARY_STACK: RacyCell<Stack<16384>> = RacyCell::new(Stack::new());

/// What vCPU 1 found at its first instruction after the trampoline.
static ENTRIES: AtomicU32 = AtomicU32::new(0);
static ENTRY_RDI: AtomicU64 = AtomicU64::new(u64::MAX);
static ENTRY_RSP: AtomicU64 = AtomicU64::new(u64::MAX);
static ENTRY_CR3: AtomicU64 = AtomicU64::new(0);
static ENTRY_RFLAGS: AtomicU64 = AtomicU64::new(0);
static ENTRY_CR0: AtomicU64 = AtomicU64::new(0);
static ENTRY_CR4: AtomicU64 = AtomicU64::new(0);
static ENTRY_EFER: AtomicU64 = AtomicU64::new(0);
static ENTRY_CS: AtomicU64 = AtomicU64::new(0);
static ENTRY_APIC_ID: AtomicU64 = AtomicU64::new(u64::MAX);
static ENTRY_APIC_BASE: AtomicU64 = AtomicU64::new(0);
static ENTRY_SVR: AtomicU64 = AtomicU64::new(0);
static ENTRY_IRR: AtomicU64 = AtomicU64::new(u64::MAX);
/// Rounds of vCPU 1's idle loop.
static ROUNDS: AtomicU64 = AtomicU64::new(0);

/// What vCPU 1 does after recording its entry state.
static SECONDARY_JOB: AtomicU8 = AtomicU8::new(JOB_IDLE);
const JOB_IDLE: u8 = 0;
const JOB_PONG: u8 = 1;
const JOB_HALT: u8 = 2;

/// Ping-pong: how many PINGs vCPU 1 answered, whether PING was in service in its handler
/// every time, and whether its ISR was clear after each (the EOI reached its own APIC).
static PONGS_SENT: AtomicU32 = AtomicU32::new(0);
static PING_IN_SERVICE_EVERY_TIME: AtomicBool = AtomicBool::new(true);
static ISR_CLEAR_AFTER_EOI: AtomicBool = AtomicBool::new(true);
/// vCPU 0's IDT, which vCPU 1 loads too.
static IDTR: RacyCell<x86::DescriptorTablePointer> =
    RacyCell::new(x86::DescriptorTablePointer { limit: 0, base: 0 });

/// The trampoline: `mov rsi, rsp; mov rsp, [rip + 14]; mov rax, [rip + 15]; jmp rax`, then
/// at offset 24 the stack pointer and at 32 the entry (position-independent: it runs at
/// whatever page it is copied to).
const TRAMPOLINE_CODE: [u8; 24] = [
    0x48, 0x89, 0xe6, // mov rsi, rsp
    0x48, 0x8b, 0x25, 14, 0, 0, 0, // mov rsp, [rip + 14] (24)
    0x48, 0x8b, 0x05, 15, 0, 0, 0, // mov rax, [rip + 15] (32)
    0xff, 0xe0, // jmp rax
    0x90, 0x90, 0x90, 0x90, 0x90, // padding up to the data
];

/// Writes the trampoline at `page`: vCPU 1 enters [`secondary_entry`] on its own stack.
fn write_trampoline(page: u64) {
    let stack = SECONDARY_STACK.top() - 8; // as after a call
    let entry = secondary_entry as *const () as usize as u64;
    // SAFETY: `page` is free RAM below 1 MiB, identity-mapped and writable by the boot page
    // tables (docs/abi.md 4.2); nothing else of the domain uses it.
    unsafe {
        let code = page as *mut u8;
        core::ptr::copy_nonoverlapping(TRAMPOLINE_CODE.as_ptr(), code, TRAMPOLINE_CODE.len());
        core::ptr::write_volatile((page + 24) as *mut u64, stack);
        core::ptr::write_volatile((page + 32) as *mut u64, entry);
    }
}

/// vCPU 1's code after the trampoline: RDI as the SIPI left it, RSI the entry RSP.
extern "C" fn secondary_entry(rdi: u64, entry_rsp: u64) -> ! {
    ENTRY_RFLAGS.store(x86::read_rflags(), Ordering::SeqCst);
    ENTRY_RDI.store(rdi, Ordering::SeqCst);
    ENTRY_RSP.store(entry_rsp, Ordering::SeqCst);
    ENTRY_CR3.store(x86::read_cr3(), Ordering::SeqCst);
    ENTRY_CR0.store(x86::read_cr0(), Ordering::SeqCst);
    ENTRY_CR4.store(x86::read_cr4(), Ordering::SeqCst);
    ENTRY_EFER.store(msr::read(0xc000_0080), Ordering::SeqCst);
    let cs: u16;
    // SAFETY: reads CS.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    ENTRY_CS.store(u64::from(cs), Ordering::SeqCst);
    ENTRY_APIC_ID.store(msr::read(apic::ID), Ordering::SeqCst);
    ENTRY_APIC_BASE.store(msr::read(apic::APIC_BASE), Ordering::SeqCst);
    ENTRY_SVR.store(msr::read(apic::SVR), Ordering::SeqCst);
    ENTRY_IRR.store(
        msr::read(apic::IRR0 + u32::from(PING >> 5)),
        Ordering::SeqCst,
    );
    ENTRIES.fetch_add(1, Ordering::SeqCst);
    match SECONDARY_JOB.load(Ordering::SeqCst) {
        JOB_PONG => answer_pings(),
        JOB_HALT => halt_for_good(),
        _ => {}
    }
    loop {
        ROUNDS.fetch_add(1, Ordering::SeqCst);
        hv::sched_yield();
    }
}

/// vCPU 1's part of the ping-pong: loads vCPU 0's IDT, enables its APIC, and answers every
/// PING with a PONG to APIC ID 0, waiting in `STI; HLT` in between.
fn answer_pings() -> ! {
    // SAFETY: vCPU 0 stored its IDTR before starting us; the IDT's gates use selector 0x08,
    // the 64-bit code segment of the boot GDT this vCPU runs with (docs/abi.md 4.1).
    unsafe { asm!("lidt [{}]", in(reg) IDTR.get(), options(nostack, preserves_flags)) };
    apic::enable();
    loop {
        let answered = PONGS_SENT.load(Ordering::SeqCst);
        while irq::count(PING) <= answered {
            x86::halt_with_interrupts();
        }
        if !irq::was_in_service(PING) {
            PING_IN_SERVICE_EVERY_TIME.store(false, Ordering::SeqCst);
        }
        if apic::in_service(PING) {
            ISR_CLEAR_AFTER_EOI.store(false, Ordering::SeqCst);
        }
        PONGS_SENT.fetch_add(1, Ordering::SeqCst);
        // SAFETY: vCPU 0 expects PONG; its handler is installed.
        unsafe { write(apic::ICR, u64::from(PONG)) }; // physical, APIC ID 0
    }
}

/// vCPU 1 enables its APIC and waits in `STI; HLT` for an IPI that never comes.
fn halt_for_good() -> ! {
    apic::enable();
    loop {
        ROUNDS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: nothing sends this vCPU an interrupt, so no IDT is needed.
        unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
    }
}

/// Writes the ICR.
fn icr(value: u64) {
    // SAFETY: the IPIs these tests send go to vCPUs whose handlers are installed, or to none.
    unsafe { write(apic::ICR, value) };
}

fn init(apic_id: u64) -> u64 {
    apic_id << 32 | TRIGGER_LEVEL | LEVEL_ASSERT | DELIVERY_INIT
}

fn init_deassert(apic_id: u64) -> u64 {
    apic_id << 32 | TRIGGER_LEVEL | DELIVERY_INIT
}

fn startup(apic_id: u64, vector: u8) -> u64 {
    apic_id << 32 | DELIVERY_STARTUP | u64::from(vector)
}

fn is_up(vcpu: u64) -> Status {
    // SAFETY: is_up touches no memory.
    unsafe { hv::vcpu_op(VcpuOp::IsUp as u64, vcpu, 0) }
}

/// Yields until `done` holds, at most `rounds` times; whether it held.
fn yield_until(rounds: u32, done: impl Fn() -> bool) -> bool {
    for _ in 0..rounds {
        if done() {
            return true;
        }
        hv::sched_yield();
    }
    done()
}

/// Gives vCPU 1 time to run, should it have been started.
fn let_others_run() {
    yield_until(50, || false);
}

/// INIT, INIT de-assert and two SIPIs to vCPU 1, as Linux and the MP specification send them;
/// whether vCPU 1 reached its entry.
fn init_sipi_sipi(vector: u8) -> bool {
    icr(init(1));
    icr(init_deassert(1));
    icr(startup(1, vector));
    icr(startup(1, vector));
    yield_until(10_000, || ENTRIES.load(Ordering::SeqCst) != 0)
}

conformance_test! {
    title: "INIT then STARTUP through the ICR starts vCPU 1 at the SIPI page, in the documented state; a second SIPI and an INIT to it later are ignored",
    section: "14.2 INIT and STARTUP",
    expect: Success,
    cmdline: "vcpus=2",
}
pub(super) fn x2apic_init_sipi_starts_vcpu() {
    write_trampoline(SIPI_PAGE);
    check_eq!("is_up(1) at start", Status(0), is_up(1));
    // A fixed IPI to a vCPU that never ran: its APIC is software-disabled and drops it.
    icr(1 << 32 | u64::from(PING));
    // A STARTUP without INIT first, and an INIT alone, start nothing.
    icr(startup(1, SIPI_VECTOR));
    let_others_run();
    check_eq!("is_up(1) after a SIPI without INIT", Status(0), is_up(1));
    icr(init(1));
    let_others_run();
    check_eq!("is_up(1) after INIT alone", Status(0), is_up(1));
    check_eq!(
        "vCPU 1's entries before the SIPI",
        0,
        ENTRIES.load(Ordering::SeqCst)
    );

    let started = init_sipi_sipi(SIPI_VECTOR);
    check!(
        started,
        "vCPU 1 never reached its entry after INIT-SIPI-SIPI"
    );
    if !started {
        return;
    }
    check_eq!("is_up(1) after INIT-SIPI", Status(1), is_up(1));
    check_eq!("RDI: the x2APIC ID", 1, ENTRY_RDI.load(Ordering::SeqCst));
    check_eq!(
        "RSP at entry",
        Hex(0),
        Hex(ENTRY_RSP.load(Ordering::SeqCst))
    );
    check_eq!(
        "CR3: the sender's",
        Hex(x86::read_cr3() & !0xfff),
        Hex(ENTRY_CR3.load(Ordering::SeqCst))
    );
    check_eq!(
        "RFLAGS.IF at entry",
        0,
        ENTRY_RFLAGS.load(Ordering::SeqCst) >> 9 & 1
    );
    let cr0 = ENTRY_CR0.load(Ordering::SeqCst);
    check_eq!("CR0.PE and PG", Hex(0x8000_0001), Hex(cr0 & 0x8000_0001));
    check_eq!("CR4.PAE", 1, ENTRY_CR4.load(Ordering::SeqCst) >> 5 & 1);
    check_eq!("EFER.LMA", 1, ENTRY_EFER.load(Ordering::SeqCst) >> 10 & 1);
    check_eq!("CS", Hex(0x08), Hex(ENTRY_CS.load(Ordering::SeqCst)));
    check_eq!("x2APIC ID", 1, ENTRY_APIC_ID.load(Ordering::SeqCst));
    check_eq!(
        "IA32_APIC_BASE (not the BSP)",
        Hex(apic::APIC_BASE_ADDRESS | apic::APIC_BASE_EXTD | apic::APIC_BASE_EN),
        Hex(ENTRY_APIC_BASE.load(Ordering::SeqCst))
    );
    check_eq!(
        "SVR at entry (reset: software-disabled)",
        Hex(0xff),
        Hex(ENTRY_SVR.load(Ordering::SeqCst))
    );
    check_eq!(
        "IRR word of the vector sent before the start",
        Hex(0),
        Hex(ENTRY_IRR.load(Ordering::SeqCst))
    );

    // Running: a SIPI, an INIT and INIT-SIPI again change nothing.
    for value in [startup(1, SIPI_VECTOR), init(1), startup(1, SIPI_VECTOR)] {
        icr(value);
    }
    let rounds = ROUNDS.load(Ordering::SeqCst);
    check!(
        yield_until(10_000, || ROUNDS.load(Ordering::SeqCst) > rounds + 2),
        "vCPU 1 stopped running after INIT and SIPI to it"
    );
    check_eq!("vCPU 1's entries", 1, ENTRIES.load(Ordering::SeqCst));
    check_eq!("is_up(1) at the end", Status(1), is_up(1));
}

conformance_test! {
    title: "fixed IPIs go from vCPU 0 to vCPU 1 and back (physical, logical, all-excluding-self), each handled and EOIed, vCPUs waiting in HLT",
    section: "14.1 IPIs to other vCPUs",
    expect: Success,
    cmdline: "vcpus=2",
}
pub(super) fn x2apic_ipi_ping_pong() {
    irq::install();
    irq::use_apic(true);
    apic::enable();
    // SAFETY: SIDT stores 10 bytes into our static, which vCPU 1 reads only after it starts.
    unsafe { asm!("sidt [{}]", in(reg) IDTR.get(), options(nostack, preserves_flags)) };
    SECONDARY_JOB.store(JOB_PONG, Ordering::SeqCst);
    write_trampoline(SIPI_PAGE);
    if !init_sipi_sipi(SIPI_VECTOR) {
        crate::framework::fail(format_args!("vCPU 1 never started"));
        return;
    }
    // Physical ID 1; logical cluster 0, bit 1; all excluding self.
    let forms = [1 << 32, 0x2 << 32 | LOGICAL, ALL_EXCLUDING_SELF];
    const ROUNDS_EACH: u32 = 5;
    let mut sent = 0;
    for form in forms {
        for _ in 0..ROUNDS_EACH {
            icr(form | u64::from(PING));
            sent += 1;
            let give_up = crate::shared::now() + crate::timing::GIVE_UP_NS;
            while irq::count(PONG) < sent && crate::shared::now() < give_up {
                x86::halt_with_interrupts();
            }
            if irq::count(PONG) < sent {
                crate::framework::fail(format_args!(
                    "no PONG for PING {sent} (ICR form {form:#x}): {} PINGs arrived",
                    irq::count(PING)
                ));
                return;
            }
        }
    }
    check_eq!("PINGs handled (on vCPU 1 only)", sent, irq::count(PING));
    check_eq!("PONGs handled", sent, irq::count(PONG));
    check_eq!("PONGs vCPU 1 sent", sent, PONGS_SENT.load(Ordering::SeqCst));
    check!(
        PING_IN_SERVICE_EVERY_TIME.load(Ordering::SeqCst),
        "PING was not in service on vCPU 1 while its handler ran"
    );
    check!(
        ISR_CLEAR_AFTER_EOI.load(Ordering::SeqCst),
        "PING stayed in service on vCPU 1 after its EOI"
    );
    check!(
        irq::was_in_service(PONG),
        "PONG was not in service on vCPU 0"
    );
    check!(
        !apic::in_service(PONG),
        "PONG in service on vCPU 0 after EOI"
    );
    check_eq!("vCPU 0's ESR", Hex(0), Hex(esr()));
}

/// Latches and reads the ESR.
fn esr() -> u64 {
    // SAFETY: an ESR write of 0 only latches the errors.
    unsafe { write(apic::ESR, 0) };
    msr::read(apic::ESR)
}

conformance_test! {
    title: "IPIs, INIT and SIPI to APIC IDs no vCPU has are dropped without an error or a fault",
    section: "14.1 IPIs to other vCPUs",
    expect: Success,
    cmdline: "vcpus=2",
}
pub(super) fn x2apic_ipi_bad_dest_dropped() {
    irq::install();
    irq::use_apic(true);
    apic::enable();
    write_trampoline(SIPI_PAGE);
    let vector = 0x61u8;
    let nobody = [
        2u64 << 32,                  // one past the last vCPU
        0xffff_fffe << 32,           // far out
        0x0001_0001 << 32 | LOGICAL, // logical cluster 1: IDs 16-31
        0x0000_0004 << 32 | LOGICAL, // logical cluster 0, bit 2: ID 2
    ];
    x86::disable_interrupts();
    for destination in nobody {
        icr(destination | u64::from(vector));
        icr((destination & !LOGICAL) | TRIGGER_LEVEL | LEVEL_ASSERT | DELIVERY_INIT);
        icr((destination & !LOGICAL) | DELIVERY_STARTUP | u64::from(SIPI_VECTOR));
    }
    let_others_run();
    x86::interrupt_window();
    check_eq!("the vector arrived", 0, irq::count(vector));
    check!(!apic::requested(vector), "the vector is pending on vCPU 0");
    check_eq!("ESR", Hex(0), Hex(esr()));
    check_eq!("is_up(1)", Status(0), is_up(1));
    check_eq!("vCPU 1's entries", 0, ENTRIES.load(Ordering::SeqCst));
    // The APIC works on: a self-IPI arrives.
    apic::self_ipi(vector);
    x86::interrupt_window();
    check_eq!("a self-IPI afterwards", 1, irq::count(vector));
}

/// A page table for the first 2 MiB, in place of the boot tables' 2 MiB page.
#[repr(C, align(4096))]
struct PageTable([u64; 512]);

static LOW_TABLE: RacyCell<PageTable> = RacyCell::new(PageTable([0; 512]));

/// Reloads CR3: drops every translation of the boot tables.
fn flush_tlb() {
    let cr3 = x86::read_cr3();
    // SAFETY: the same page tables; the entries changed map what the kernel uses as before.
    unsafe { asm!("mov cr3, {}", in(reg) cr3, options(nostack, preserves_flags)) };
}

conformance_test! {
    title: "a SIPI whose page the sender's page tables do not map to RAM is ignored; the vCPU waits on and a good SIPI starts it",
    section: "14.2 INIT and STARTUP",
    expect: Success,
    cmdline: "vcpus=2",
}
pub(super) fn x2apic_sipi_page_not_ram() {
    let mem = start_info().mem_bytes;
    let not_mapped = SIPI_VECTOR + 1;
    write_trampoline(SIPI_PAGE);
    write_trampoline(u64::from(not_mapped) << 12);
    // The first 2 MiB by 4 KiB pages: identity, but the SIPI page maps the page above RAM and
    // the next one is not present.
    let table = LOW_TABLE.get();
    for page in 0..512 {
        // SAFETY: our static, not yet in use by the CPU.
        unsafe { (*table).0[page] = (page as u64) << 12 | 0x3 };
    }
    // SAFETY: as above.
    unsafe {
        (*table).0[usize::from(SIPI_VECTOR)] = mem | 0x3;
        (*table).0[usize::from(not_mapped)] = 0;
    }
    // The boot PD is two pages above the PML4 (docs/abi.md 4.2); RAM is identity-mapped.
    let pd = (lamina_abi::layout::BOOT_PML4_GPA + 0x2000) as *mut u64;
    // SAFETY: PD entry 0 maps the first 2 MiB; the table maps them the same except for two
    // free pages, and nothing of the kernel's lives in those.
    let boot_entry = unsafe { pd.read_volatile() };
    // SAFETY: as above.
    unsafe { pd.write_volatile(table as u64 | 0x3) };
    flush_tlb();

    icr(init(1));
    icr(startup(1, SIPI_VECTOR));
    icr(startup(1, not_mapped));
    let_others_run();
    check_eq!("is_up(1) after SIPIs to pages not RAM", Status(0), is_up(1));
    check_eq!("vCPU 1's entries", 0, ENTRIES.load(Ordering::SeqCst));

    // SAFETY: the boot tables' entry as it was.
    unsafe { pd.write_volatile(boot_entry) };
    flush_tlb();
    // No new INIT: the ignored SIPIs left vCPU 1 waiting for one.
    icr(startup(1, not_mapped));
    let started = yield_until(10_000, || ENTRIES.load(Ordering::SeqCst) != 0);
    check!(
        started,
        "a good SIPI after the ignored ones did not start vCPU 1"
    );
    check_eq!("is_up(1)", Status(1), is_up(1));
}

conformance_test! {
    title: "vCPUs that all wait in HLT for each other's IPIs, with nothing else to wake them, stop the domain",
    section: "14.1 IPIs to other vCPUs",
    expect: StoppedByHv("HLT with nothing that can ever wake the vCPU"),
    cmdline: "vcpus=2",
}
pub(super) fn x2apic_hlt_both_stopped() {
    SECONDARY_JOB.store(JOB_HALT, Ordering::SeqCst);
    write_trampoline(SIPI_PAGE);
    if !init_sipi_sipi(SIPI_VECTOR) {
        crate::framework::fail(format_args!("vCPU 1 never started"));
        return;
    }
    yield_until(10_000, || ROUNDS.load(Ordering::SeqCst) != 0);
    irq::install();
    irq::use_apic(true);
    apic::enable();
    println!("x2apic_hlt_both_stopped: vCPU 0 halts too");
    // Each could IPI the other, but neither will: the hypervisor stops the domain here.
    x86::halt_with_interrupts();
    crate::framework::fail(format_args!("HLT returned with nothing sent to vCPU 0"));
}

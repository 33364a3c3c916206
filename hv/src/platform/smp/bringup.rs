//! The hardware side of [`super`]: the trampoline, INIT-SIPI-SIPI, each AP's set-up, parking,
//! IPIs.

use super::{
    MadtProcessor, TRAMPOLINE_MAX_BYTES, TRAMPOLINE_PHYS, TrampolineData, cpus_from_cmdline,
    select_application_processors, trampoline_page_is_free, write_trampoline_data,
};
use crate::hv_println;
use crate::platform::apic::{self, KICK_VECTOR, STOP_VECTOR};
use crate::platform::multiboot::BootInfo;
use crate::platform::percpu::{self, MAX_CPUS, PerCpu};
use crate::platform::{cpu, memory, xstate};
use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::global_asm;
use core::mem::{offset_of, size_of};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use spin::Once;

/// Each AP's hypervisor stack (as large as the boot CPU's).
const AP_STACK_BYTES: u64 = crate::platform::boot::BOOT_STACK_BYTES as u64;
/// SDM Vol. 3A 9.4.4.1: 10 ms after INIT, 200 µs after each STARTUP IPI.
const INIT_DELAY_US: u64 = 10_000;
const STARTUP_DELAY_US: u64 = 200;
/// How long an AP may take from its STARTUP IPI to `ap_entry` (an emulator can be slow).
const ALIVE_TIMEOUT_US: u64 = 1_000_000;

/// Set by an AP once it runs on its own stack and no longer needs the trampoline's data.
static AP_ALIVE: AtomicBool = AtomicBool::new(false);
/// What each AP calls once it is set up (given to [`start_other_cpus`]).
static AP_FIRST: Once<fn(usize) -> !> = Once::new();
/// APs that finished their own set-up ([`ap_ready`]).
static APS_READY: AtomicUsize = AtomicUsize::new(0);
/// How long the boot CPU waits for the started APs to be ready.
const READY_TIMEOUT_US: u64 = 2_000_000;
/// What parked APs run once published ([`run_on_other_cpus`]).
static AP_MAIN: Once<fn(usize) -> !> = Once::new();

// The trampoline, assembled into the image and copied to TRAMPOLINE_PHYS before use. A
// STARTUP IPI starts the AP in real mode at CS:IP = (TRAMPOLINE_PHYS >> 4):0. With CR4.PAE and
// EFER.LME set, one MOV to CR0 that sets PE and PG enters IA-32e mode (SDM Vol. 3A 10.8.5);
// the far jump then loads a 64-bit code segment. Label differences are offsets in the page.
global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .balign 16
    .global ap_trampoline_start
ap_trampoline_start:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdt_pointer - ap_trampoline_start)
    movl %cr4, %eax
    orl $0x20, %eax                     /* PAE */
    movl %eax, %cr4
    movl (ap_data_cr3 - ap_trampoline_start), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx              /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                    /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0x9fffffff, %eax              /* caches on: CD and NW clear (INIT sets them) */
    orl $0x80010021, %eax               /* PG | WP | NE | PE */
    movl %eax, %cr0
    ljmpl $0x08, ${base} + (ap_long_mode - ap_trampoline_start)

    .code64
ap_long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq ap_data_stack_top(%rip), %rsp
    movq ap_data_percpu(%rip), %rdi
    movq ap_data_entry(%rip), %rax
    xorl %ebp, %ebp
    callq *%rax
1:
    cli
    hlt
    jmp 1b

    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF            /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF            /* 0x10: data */
ap_gdt_pointer:
    .short ap_gdt_pointer - ap_gdt - 1
    .long {base} + (ap_gdt - ap_trampoline_start)

    /* TrampolineData, in its field order. */
    .balign 8
    .global ap_trampoline_data
ap_trampoline_data:
    .global ap_data_cr3
ap_data_cr3:
    .quad 0
    .global ap_data_stack_top
ap_data_stack_top:
    .quad 0
    .global ap_data_percpu
ap_data_percpu:
    .quad 0
    .global ap_data_entry
ap_data_entry:
    .quad 0
    .global ap_trampoline_end
ap_trampoline_end:
"#,
    base = const TRAMPOLINE_PHYS,
    options(att_syntax),
);

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_data: u8;
    static ap_data_cr3: u8;
    static ap_data_stack_top: u8;
    static ap_data_percpu: u8;
    static ap_data_entry: u8;
    static ap_trampoline_end: u8;
}

/// Whether the assembly's data block has [`TrampolineData`]'s layout (the linker places the
/// labels, so this is checked once at run time; `black_box` keeps the compiler from deciding
/// that two distinct symbols never share an address).
fn data_block_matches() -> bool {
    let address = |symbol: *const u8| core::hint::black_box(symbol as usize);
    let data = address(&raw const ap_trampoline_data);
    let fields = [
        (&raw const ap_data_cr3, offset_of!(TrampolineData, cr3)),
        (
            &raw const ap_data_stack_top,
            offset_of!(TrampolineData, stack_top),
        ),
        (
            &raw const ap_data_percpu,
            offset_of!(TrampolineData, percpu),
        ),
        (&raw const ap_data_entry, offset_of!(TrampolineData, entry)),
    ];
    fields
        .iter()
        .all(|&(label, offset)| address(label) == data + offset)
        && address(&raw const ap_trampoline_end) == data + size_of::<TrampolineData>()
}

/// ACPI tables are in RAM below 4 GiB, which the boot page tables identity-map.
#[derive(Clone, Copy)]
struct IdentityMapped;

impl AcpiHandler for IdentityMapped {
    unsafe fn map_physical_region<T>(
        &self,
        address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        let pointer = NonNull::new(address as *mut T).unwrap_or(NonNull::dangling());
        // SAFETY: the region is identity-mapped (the boot tables map the first 4 GiB, where
        // firmware puts its tables); the caller vouches for its contents.
        unsafe { PhysicalMapping::new(address, pointer, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// The processors the MADT lists.
fn madt_processors(info: &BootInfo<'_>) -> Result<Vec<MadtProcessor>, String> {
    // SAFETY: GRUB's RSDP copy is in the boot information, intact and identity-mapped; the
    // BIOS area searched otherwise is too.
    let tables = unsafe {
        match info.acpi_rsdp {
            Some(rsdp) => AcpiTables::from_rsdp(IdentityMapped, rsdp.as_ptr() as usize),
            None => AcpiTables::search_for_rsdp_bios(IdentityMapped),
        }
    }
    .map_err(|error| format!("no ACPI tables ({error:?})"))?;
    let madt = tables
        .find_table::<Madt>()
        .map_err(|error| format!("no MADT ({error:?})"))?;
    let processors = madt
        .get()
        .entries()
        .filter_map(|entry| match entry {
            MadtEntry::LocalApic(apic) => Some(MadtProcessor {
                apic_id: apic.apic_id.into(),
                flags: { apic.flags },
            }),
            MadtEntry::LocalX2Apic(apic) => Some(MadtProcessor {
                apic_id: { apic.x2apic_id },
                flags: { apic.flags },
            }),
            _ => None,
        })
        .collect();
    Ok(processors)
}

fn tsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn delay_us(microseconds: u64, tsc_hz: u64) {
    let start = tsc();
    let ticks = microseconds.saturating_mul(tsc_hz) / 1_000_000;
    while tsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}

/// Copies the trampoline to [`TRAMPOLINE_PHYS`]: its bytes there and its data block's
/// offset, or None when it would not fit the page or its data block does not match.
///
/// # Safety
/// The trampoline page is free RAM, identity-mapped, and no AP is reading it.
unsafe fn copy_trampoline() -> Option<(&'static mut [u8], usize)> {
    let start = &raw const ap_trampoline_start as usize;
    let len = &raw const ap_trampoline_end as usize - start;
    let data_offset = &raw const ap_trampoline_data as usize - start;
    if len > TRAMPOLINE_MAX_BYTES || !data_block_matches() {
        return None;
    }
    // SAFETY: per the contract for the destination, which is one page; the source is the
    // image's own bytes.
    unsafe {
        let page = core::slice::from_raw_parts_mut(TRAMPOLINE_PHYS as *mut u8, len);
        page.copy_from_slice(core::slice::from_raw_parts(start as *const u8, len));
        Some((page, data_offset))
    }
}

/// Starts the machine's other CPUs (as many as `cpus=` allows), one at a time, and logs a line
/// for each CPU, the boot CPU's first. Each AP sets itself up (`ap_entry`) and calls `first`
/// with its index. `boot_info` is the Multiboot2 information's `[start, end)`, which must stay
/// intact; `tsc_hz` times the start-up sequence. A CPU that does not start is reported and
/// left out; nothing here ends the machine.
pub fn start_other_cpus(
    info: &BootInfo<'_>,
    boot_info: (u64, u64),
    tsc_hz: u64,
    first: fn(usize) -> !,
) {
    let boot = percpu::this_cpu();
    hv_println!("lamina: cpu 0 (APIC id {}) online", boot.apic_id);
    let limit = match cpus_from_cmdline(info.cmdline) {
        Ok(limit) => limit.unwrap_or(MAX_CPUS).min(MAX_CPUS),
        Err(why) => {
            log::warn!("{why}; all CPUs are used");
            MAX_CPUS
        }
    };
    if limit <= 1 {
        return;
    }
    let listed = match madt_processors(info) {
        Ok(listed) => listed,
        Err(why) => {
            log::warn!("{why}: running on the boot CPU only");
            return;
        }
    };
    let apic_ids = select_application_processors(listed, boot.apic_id, limit);
    if apic_ids.is_empty() {
        return;
    }
    let ram: Vec<(u64, u64)> = info.ram.iter().map(|r| (r.start, r.len)).collect();
    let mut in_use: Vec<(u64, u64)> = info.modules.iter().map(|m| (m.start, m.end)).collect();
    in_use.push(boot_info);
    if !trampoline_page_is_free(&ram, &in_use) {
        log::warn!(
            "the AP trampoline page {TRAMPOLINE_PHYS:#x} is not free RAM: running on the boot CPU only"
        );
        return;
    }
    // SAFETY: the page is free RAM (checked above), below 1 MiB so outside the allocator, and
    // no AP runs yet.
    let Some((trampoline, data_offset)) = (unsafe { copy_trampoline() }) else {
        log::warn!("the AP trampoline does not fit a page or match TrampolineData: boot CPU only");
        return;
    };
    AP_FIRST.call_once(|| first);
    for apic_id in apic_ids {
        let index = percpu::cpu_count();
        if let Err(why) = start_one(index, apic_id, trampoline, data_offset, tsc_hz) {
            log::warn!("cpu with APIC id {apic_id} not started: {why}");
        }
    }
    // What the APs allocate for themselves (stacks aside) is taken before this returns, so
    // the boot CPU's memory figures that follow are stable.
    let started = percpu::cpu_count() - 1;
    if !wait_until(READY_TIMEOUT_US, tsc_hz, || {
        APS_READY.load(Ordering::Acquire) >= started
    }) {
        log::warn!(
            "only {} of {started} other CPUs got ready",
            APS_READY.load(Ordering::Acquire)
        );
        return;
    }
    // Each parked AP must wake for posted work: the kick IPI, the mailbox and the way back
    // to its halt loop, as a scheduler will use them.
    for index in 1..percpu::cpu_count() {
        let answered = run_on(index, |_| {}).is_ok()
            && wait_until(READY_TIMEOUT_US, tsc_hz, || work_done(index));
        if !answered {
            log::warn!("cpu {index} did not run work posted to it");
        }
    }
}

/// Whether the AP being started reached `ap_entry`.
fn ap_alive() -> bool {
    AP_ALIVE.load(Ordering::Acquire)
}

/// Spins until `done` holds or `microseconds` passed; returns `done()`.
fn wait_until(microseconds: u64, tsc_hz: u64, done: impl Fn() -> bool) -> bool {
    let deadline = microseconds.saturating_mul(tsc_hz) / 1_000_000;
    let start = tsc();
    while !done() {
        if tsc().wrapping_sub(start) > deadline {
            return done();
        }
        core::hint::spin_loop();
    }
    true
}

/// Tells the boot CPU that this AP's own set-up (what `first` of [`start_other_cpus`] does
/// before it waits for work) is done; [`park`] does it too. Counts once per CPU.
pub fn ap_ready() {
    if !percpu::this_cpu().ready.swap(true, Ordering::AcqRel) {
        APS_READY.fetch_add(1, Ordering::AcqRel);
    }
}

/// Starts the AP `apic_id` as CPU `index` and waits until it runs on its own stack.
fn start_one(
    index: usize,
    apic_id: u8,
    trampoline: &mut [u8],
    data_offset: usize,
    tsc_hz: u64,
) -> Result<(), String> {
    let stack = memory::allocate_zeroed(AP_STACK_BYTES, 4096).ok_or("no memory for its stack")?;
    let fault_stacks = memory::allocate_zeroed(cpu::FAULT_STACKS_BYTES as u64, 4096)
        .ok_or("no memory for its fault stacks")?;
    let state: &'static PerCpu = Box::leak(Box::new(PerCpu::new(
        index,
        apic_id.into(),
        stack + AP_STACK_BYTES,
        fault_stacks + cpu::FAULT_STACKS_BYTES as u64,
    )));
    let data = TrampolineData {
        cr3: x86_64::registers::control::Cr3::read_raw()
            .0
            .start_address()
            .as_u64(),
        stack_top: state.stack_top,
        percpu: state as *const PerCpu as u64,
        entry: ap_entry as *const () as u64,
    };
    write_trampoline_data(trampoline, data_offset, &data)?;
    AP_ALIVE.store(false, Ordering::Release);
    let page = (TRAMPOLINE_PHYS >> 12) as u8;
    apic::send_init(apic_id);
    delay_us(INIT_DELAY_US, tsc_hz);
    // A second STARTUP IPI only if the first was lost (SDM 9.4.4.1 sends two).
    apic::send_startup(apic_id, page);
    if !wait_until(STARTUP_DELAY_US, tsc_hz, ap_alive) {
        apic::send_startup(apic_id, page);
        if !wait_until(ALIVE_TIMEOUT_US, tsc_hz, ap_alive) {
            // Back to waiting for a STARTUP IPI: it must not run into a reused trampoline.
            apic::send_init(apic_id);
            return Err(String::from("no answer to INIT-SIPI-SIPI"));
        }
    }
    Ok(())
}

/// Where the trampoline lands, on the AP's own stack, interrupts off.
extern "C" fn ap_entry(state: &'static PerCpu) -> ! {
    // SAFETY: first code on this CPU to touch GS; the boot CPU gave this AP the next index and
    // waits for AP_ALIVE before it starts another.
    unsafe { percpu::install(state) };
    cpu::load_tables(state);
    // What the boot CPU did to CR0/CR4/XCR0 in `xstate::init`; the backends' `enable` does the
    // rest per CPU. The speculation defences (`spec_ctrl::put_in_force`) are machine-wide
    // settings, in force on every CPU already.
    xstate::init_this_cpu();
    apic::init_this_cpu();
    AP_ALIVE.store(true, Ordering::Release);
    hv_println!(
        "lamina: cpu {} (APIC id {}) online",
        state.index,
        state.apic_id
    );
    match AP_FIRST.get() {
        Some(first) => first(state.index),
        None => park(),
    }
}

/// Parks this AP: halts with interrupts on; runs what [`run_on`] posts to it (then parks
/// again), and once [`run_on_other_cpus`] published a function, that one.
pub fn park() -> ! {
    ap_ready();
    let cpu = percpu::this_cpu();
    loop {
        let posted = cpu.mailbox.load(Ordering::Acquire);
        if posted != 0 {
            // SAFETY: `run_on` stores only addresses of `fn(usize)`.
            let work = unsafe { core::mem::transmute::<usize, fn(usize)>(posted) };
            work(cpu.index);
            cpu.mailbox.store(0, Ordering::Release);
            continue;
        }
        if let Some(main) = AP_MAIN.get() {
            main(cpu.index);
        }
        // SAFETY: STI's shadow makes `sti; hlt` wait without missing a wake-up; the IDT
        // handles every vector this CPU can receive.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}

/// Publishes `main` for every parked AP (once: later calls keep the first function) and kicks
/// them so they run it.
pub fn run_on_other_cpus(main: fn(usize) -> !) {
    AP_MAIN.call_once(|| main);
    if percpu::cpu_count() > 1 {
        apic::send_ipi_all_but_self(KICK_VECTOR);
    }
}

/// Why [`run_on`] posted nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOnError {
    /// No such CPU is online, or it is the calling CPU.
    NoSuchCpu,
    /// Its previous work has not returned yet.
    Busy,
}

/// Posts `work` to parked CPU `cpu_index` and kicks it: it runs `work(cpu_index)` there, then
/// parks again ([`work_done`] tells when). A `work` that never returns makes that CPU its own.
pub fn run_on(cpu_index: usize, work: fn(usize)) -> Result<(), RunOnError> {
    let target = percpu::cpu(cpu_index)
        .filter(|cpu| cpu.index != percpu::this_cpu().index)
        .ok_or(RunOnError::NoSuchCpu)?;
    target
        .mailbox
        .compare_exchange(0, work as usize, Ordering::AcqRel, Ordering::Acquire)
        .map_err(|_| RunOnError::Busy)?;
    kick(cpu_index);
    Ok(())
}

/// Whether CPU `cpu_index` has no posted work pending or running (true for no such CPU).
pub fn work_done(cpu_index: usize) -> bool {
    percpu::cpu(cpu_index).is_none_or(|cpu| cpu.mailbox.load(Ordering::Acquire) == 0)
}

/// Sends `vector` to CPU `cpu_index`; false when no such CPU is online.
pub fn send_ipi(cpu_index: usize, vector: u8) -> bool {
    let Some(target) = percpu::cpu(cpu_index) else {
        return false;
    };
    match u8::try_from(target.apic_id) {
        Ok(apic_id) => {
            apic::send_ipi(apic_id, vector);
            true
        }
        Err(_) => false,
    }
}

/// Makes CPU `cpu_index` take an interrupt (a guest running there exits); false when no such
/// CPU is online.
pub fn kick(cpu_index: usize) -> bool {
    send_ipi(cpu_index, KICK_VECTOR)
}

/// Sends `vector` to every other CPU.
pub fn send_ipi_all_but_self(vector: u8) {
    apic::send_ipi_all_but_self(vector);
}

/// Halts every other CPU for good (at the end of the run).
pub fn stop_other_cpus() {
    if percpu::cpu_count() > 1 {
        apic::send_ipi_all_but_self(STOP_VECTOR);
    }
}

const _: () = assert!(MAX_CPUS <= 255, "xAPIC ids address at most 255 CPUs");

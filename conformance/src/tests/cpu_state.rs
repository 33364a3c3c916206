//! Tests of the vCPU's architectural state (docs/abi.md 18.3-18.7): control-register writes
//! hardware refuses, CR8 as the TPR, string I/O, and what the report of a stopped domain says.

use core::arch::asm;

use lamina_guest_sdk::cpuid::cpuid;
use lamina_guest_sdk::start_info;

use super::common::check_gp0;
use crate::console::println;
use crate::framework::{Hex, check, check_eq};
use crate::irq::{self, Arrivals};
use crate::x86::apic::{self, write};
use crate::x86::idt::{self, GENERAL_PROTECTION, TrapRecord};
use crate::x86::{self, msr};

const PAGE_FAULT: u8 = 14;
/// `mov crN, rax` (0F 22 /r) is 3 bytes; `mov cr8, rax` needs REX.R: 4.
const MOV_CR_LEN: u8 = 3;
const MOV_CR8_LEN: u8 = 4;

fn read_cr0() -> u64 {
    let value;
    // SAFETY: reading a control register has no effect.
    unsafe { asm!("mov {}, cr0", out(reg) value, options(nomem, nostack)) };
    value
}

fn read_cr3() -> u64 {
    let value;
    // SAFETY: as above.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack)) };
    value
}

fn read_cr4() -> u64 {
    let value;
    // SAFETY: as above.
    unsafe { asm!("mov {}, cr4", out(reg) value, options(nomem, nostack)) };
    value
}

fn read_cr8() -> u64 {
    let value;
    // SAFETY: as above.
    unsafe { asm!("mov {}, cr8", out(reg) value, options(nomem, nostack)) };
    value
}

/// Writes control register `cr` (0, 3, 4 or 8) with `value` while a #GP is expected; returns
/// what was taken and the RIP of the MOV.
fn write_cr_expecting_gp(cr: u8, value: u64) -> (Option<TrapRecord>, u64) {
    let mut rip = 0;
    let len = if cr == 8 { MOV_CR8_LEN } else { MOV_CR_LEN };
    let taken = idt::expect_trap(GENERAL_PROTECTION, len, || {
        // SAFETY: every value written here is one the CPU refuses with #GP, after which the
        // armed handler resumes past the MOV; should one be accepted, the test reports it (and
        // the values differ from the current ones only in ways that keep this code running).
        unsafe {
            match cr {
                0 => asm!("lea {rip}, [rip + 2f]", "2:", "mov cr0, rax",
                          rip = out(reg) rip, in("rax") value, options(nostack)),
                3 => asm!("lea {rip}, [rip + 2f]", "2:", "mov cr3, rax",
                          rip = out(reg) rip, in("rax") value, options(nostack)),
                4 => asm!("lea {rip}, [rip + 2f]", "2:", "mov cr4, rax",
                          rip = out(reg) rip, in("rax") value, options(nostack)),
                _ => asm!("lea {rip}, [rip + 2f]", "2:", "mov cr8, rax",
                          rip = out(reg) rip, in("rax") value, options(nostack)),
            }
        }
    });
    (taken, rip)
}

fn check_refused(what: &str, cr: u8, value: u64, read: fn() -> u64) {
    let before = read();
    let (taken, rip) = write_cr_expecting_gp(cr, value);
    match taken {
        Some(record) => {
            check_gp0(what, &record);
            check_eq!(
                format_args!("{what}: RIP of the #GP"),
                Hex(rip),
                Hex(record.rip)
            );
        }
        None => crate::framework::fail(format_args!(
            "{what}: CR{cr} = {value:#x} was accepted, expected #GP(0)"
        )),
    }
    check_eq!(
        format_args!("{what}: CR{cr} keeps its value"),
        Hex(before),
        Hex(read())
    );
}

conformance_test! {
    title: "CR0, CR3, CR4 and CR8 writes a CPU refuses raise #GP(0), the register keeps its value and the domain runs on",
    section: "18.3 Control registers",
    expect: Success,
}
pub(super) fn cr_writes_hardware_refuses_gp() {
    let cr0 = read_cr0();
    let cr3 = read_cr3();
    let cr4 = read_cr4();
    check_refused("CR0 with PG=1 and PE=0", 0, cr0 & !1, read_cr0);
    check_refused(
        "CR0 with NW=1 and CD=0",
        0,
        (cr0 | 1 << 29) & !(1 << 30),
        read_cr0,
    );
    check_refused("CR0 with bit 32 set", 0, cr0 | 1 << 32, read_cr0);
    check_refused(
        "CR0 with PG=0 in 64-bit mode",
        0,
        cr0 & !(1 << 31),
        read_cr0,
    );
    check_refused(
        "CR4 with PAE clear in long mode",
        4,
        cr4 & !(1 << 5),
        read_cr4,
    );
    check_refused("CR4 with bit 32 set", 4, cr4 | 1 << 32, read_cr4);
    check_refused("CR4 with reserved bit 15 set", 4, cr4 | 1 << 15, read_cr4);
    check_refused(
        "CR4 with VMXE (VMX is not offered)",
        4,
        cr4 | 1 << 13,
        read_cr4,
    );
    let leaf7_ecx = if cpuid(0, 0).eax >= 7 {
        cpuid(7, 0).ecx
    } else {
        0
    };
    if leaf7_ecx & (1 << 16) == 0 {
        check_refused("CR4 with LA57 (not offered)", 4, cr4 | 1 << 12, read_cr4);
    }
    // CR3 with PWT set, then PCIDE: refused whether or not PCID is offered, since CR3[11:0]
    // is not 0 (SDM Vol. 3A 4.10.1).
    // SAFETY: PWT only changes the caching type of the top-level table walk.
    unsafe { asm!("mov cr3, {}", in(reg) cr3 | 1 << 3, options(nostack)) };
    check_refused("CR4.PCIDE with CR3[11:0] not 0", 4, cr4 | 1 << 17, read_cr4);
    // SAFETY: back to the boot value.
    unsafe { asm!("mov cr3, {}", in(reg) cr3, options(nostack)) };
    if cpuid(1, 0).ecx & (1 << 17) == 0 {
        check_refused("CR4.PCIDE (PCID not offered)", 4, cr4 | 1 << 17, read_cr4);
    }
    let max_phys_bits = if cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        cpuid(0x8000_0008, 0).eax & 0xff
    } else {
        36
    };
    if max_phys_bits < 52 {
        check_refused(
            "CR3 with a bit above MAXPHYADDR",
            3,
            cr3 | 1 << max_phys_bits,
            read_cr3,
        );
    }
    check_refused("CR8 = 0x10", 8, 0x10, read_cr8);
    // A write hardware accepts still takes effect: TS set and cleared again.
    // SAFETY: TS only makes the next FPU instruction fault; it is cleared before any runs.
    unsafe { asm!("mov cr0, {}", in(reg) cr0 | 1 << 3, options(nostack)) };
    check_eq!("CR0 with TS set", Hex(cr0 | 1 << 3), Hex(read_cr0()));
    // SAFETY: back to the boot value.
    unsafe { asm!("mov cr0, {}", in(reg) cr0, options(nostack)) };
    check_eq!("CR0 after clearing TS", Hex(cr0), Hex(read_cr0()));
    if cpuid(1, 0).edx & (1 << 13) != 0 {
        // SAFETY: PGE only keeps global translations across CR3 loads.
        unsafe { asm!("mov cr4, {}", in(reg) cr4 ^ 1 << 7, options(nostack)) };
        check_eq!("CR4 with PGE toggled", Hex(cr4 ^ 1 << 7), Hex(read_cr4()));
        // SAFETY: back to the boot value.
        unsafe { asm!("mov cr4, {}", in(reg) cr4, options(nostack)) };
    }
    check_eq!("CR4 at the end", Hex(cr4), Hex(read_cr4()));
}

fn write_cr8(value: u8) {
    // SAFETY: CPL 0, a class of at most 15; CR8 only holds interrupts back.
    unsafe { lamina_guest_sdk::x2apic::set_priority_class(value) };
}

conformance_test! {
    title: "CR8 reads and writes the x2APIC TPR (bits 7:4) and holds back vectors of its class and below until it drops",
    section: "18.4 CR8 and the TPR",
    expect: Success,
}
pub(super) fn cr8_is_the_tpr() {
    irq::install();
    irq::use_apic(true);
    apic::enable();
    write_cr8(5);
    check_eq!("TPR after CR8 = 5", Hex(0x50), Hex(msr::read(apic::TPR)));
    check_eq!("CR8 read back", Hex(5), Hex(read_cr8()));
    // SAFETY: CPL 0; reading CR8 has no effect.
    let class = unsafe { lamina_guest_sdk::x2apic::priority_class() };
    check_eq!("CR8 through the SDK", 5, class);
    // SAFETY: TPR only holds interrupts back.
    unsafe { write(apic::TPR, 0x7c) };
    check_eq!("CR8 after TPR = 0x7c", Hex(7), Hex(read_cr8()));

    write_cr8(6);
    apic::self_ipi(0x55);
    apic::self_ipi(0x65);
    apic::self_ipi(0x75);
    x86::interrupt_window();
    check_eq!(
        "vectors delivered with CR8 = 6",
        Arrivals::of(&[0x75]),
        irq::arrivals()
    );
    write_cr8(5);
    x86::interrupt_window();
    check_eq!(
        "vectors delivered with CR8 = 5",
        Arrivals::of(&[0x75, 0x65]),
        irq::arrivals()
    );
    check!(
        apic::requested(0x55),
        "vector 0x55 left the IRR with CR8 = 5"
    );
    write_cr8(0);
    x86::interrupt_window();
    check_eq!(
        "vectors delivered with CR8 = 0",
        Arrivals::of(&[0x75, 0x65, 0x55]),
        irq::arrivals()
    );
    check_eq!("TPR after CR8 = 0", Hex(0), Hex(msr::read(apic::TPR)));
}

const COM1: u16 = 0x3f8;

/// `rep outsb` of `bytes` to `port`; returns RCX and RSI afterwards.
fn rep_outsb(port: u16, bytes: &[u8]) -> (u64, u64) {
    let (rcx, rsi): (u64, u64);
    // SAFETY: reads `bytes` only; the port is the emulated UART.
    unsafe {
        asm!("cld", "rep outsb", in("dx") port,
             inout("rcx") bytes.len() as u64 => rcx, inout("rsi") bytes.as_ptr() => rsi,
             options(nostack, readonly))
    };
    (rcx, rsi)
}

conformance_test! {
    title: "rep outsb to COM1 prints what single outs print, also from a buffer across a page boundary",
    section: "18.5 String I/O",
    expect: Success,
    cmdline: "privileged=1",
}
pub(super) fn rep_outsb_prints_like_outs() {
    let line = b"rep_outsb_prints_like_outs: one line, through rep outsb\n";
    let (rcx, rsi) = rep_outsb(COM1, line);
    check_eq!("RCX after rep outsb", 0, rcx);
    check_eq!(
        "RSI after rep outsb",
        Hex(line.as_ptr() as u64 + line.len() as u64),
        Hex(rsi)
    );
    // The same bytes, one `out` each.
    lamina_guest_sdk::uart::write_bytes(line);
    // A page-crossing buffer: the line straddles a page boundary.
    #[repr(align(4096))]
    struct TwoPages([u8; 8192]);
    static mut BUFFER: TwoPages = TwoPages([0; 8192]);
    let crossing = b"rep_outsb_prints_like_outs: across a page boundary\n";
    let start = 4096 - 20;
    let pages = &raw mut BUFFER;
    // SAFETY: one vCPU, nothing else uses the buffer.
    let buffer = unsafe { &mut (*pages).0 };
    buffer[start..start + crossing.len()].copy_from_slice(crossing);
    rep_outsb(COM1, &buffer[start..start + crossing.len()]);
    // A GS override: the buffer is GS base + RSI.
    let through_gs = b"rep_outsb_prints_like_outs: through a GS override\n";
    const GS_BASE: u32 = 0xc000_0101;
    let offset = 0x1000u64;
    let rsi_after: u64;
    // SAFETY: GS base is not used by this kernel; OUTS reads `through_gs` only; GS base is
    // set back to 0 right after.
    unsafe {
        msr::write(GS_BASE, through_gs.as_ptr() as u64 - offset);
        asm!("cld", "rep outs dx, byte ptr gs:[rsi]", in("dx") COM1,
             inout("rcx") through_gs.len() as u64 => _, inout("rsi") offset => rsi_after,
             options(nostack, readonly));
        msr::write(GS_BASE, 0);
    }
    check_eq!(
        "RSI after rep outsb through GS",
        Hex(offset + through_gs.len() as u64),
        Hex(rsi_after)
    );

    // Read back this domain's console: both forms print the same line, then the crossing one.
    let id = start_info().domain_id;
    let mut history = [0u8; 4096];
    let mut total = 0;
    let mut offset = 0;
    while let Ok(n) = lamina_guest_sdk::domctl::read_console(id, offset, &mut history[total..]) {
        if n == 0 || total + n >= history.len() {
            total += n;
            break;
        }
        total += n;
        offset += n as u64;
    }
    let text = core::str::from_utf8(&history[..total]).unwrap_or("");
    let expected = "rep_outsb_prints_like_outs: one line, through rep outsb\n\
                    rep_outsb_prints_like_outs: one line, through rep outsb\n\
                    rep_outsb_prints_like_outs: across a page boundary\n\
                    rep_outsb_prints_like_outs: through a GS override\n";
    check!(
        text.contains(expected),
        "the console shows the rep outsb line, the same line from single outs and the page-crossing line; it holds {text:?}"
    );
}

/// A port nothing emulates (as in the I/O tests).
const UNUSED_PORT: u16 = 0x2f0;

conformance_test! {
    title: "insb, insw, insd and rep insw from a port nothing emulates store all ones and advance RDI as DF says",
    section: "18.5 String I/O",
    expect: Success,
}
pub(super) fn ins_unemulated_port_all_ones() {
    let mut buffer = [0u8; 16];
    let base = buffer.as_mut_ptr();
    let (mut rdi, mut rcx): (u64, u64);
    // SAFETY: INS writes into `buffer` only: 1 + 2 + 4 bytes, then 3 words with rep.
    unsafe {
        asm!("cld", "insb", "insw", "insd", in("dx") UNUSED_PORT,
             inout("rdi") base => rdi, options(nostack));
    }
    check_eq!("RDI after insb, insw, insd", Hex(base as u64 + 7), Hex(rdi));
    check_eq!(
        "bytes read by insb, insw, insd",
        &[0xffu8; 7][..],
        &buffer[..7]
    );
    check_eq!("the byte after them", 0, buffer[7]);
    // SAFETY: as above: 3 words at buffer + 8.
    unsafe {
        asm!("cld", "rep insw", in("dx") UNUSED_PORT, inout("rcx") 3u64 => rcx,
             inout("rdi") base.add(8) => rdi, options(nostack));
    }
    check_eq!("RCX after rep insw", 0, rcx);
    check_eq!("RDI after rep insw", Hex(base as u64 + 14), Hex(rdi));
    check_eq!("words read by rep insw", &[0xffu8; 6][..], &buffer[8..14]);
    // Backwards (DF=1): one dword ending at the last byte.
    buffer = [0; 16];
    // SAFETY: 4 bytes at buffer + 12; DF is cleared again before anything else runs.
    unsafe {
        asm!("std", "insd", "cld", in("dx") UNUSED_PORT, inout("rdi") base.add(12) => rdi,
             options(nostack));
    }
    check_eq!("RDI after insd with DF=1", Hex(base as u64 + 8), Hex(rdi));
    check_eq!("dword read with DF=1", &[0xffu8; 4][..], &buffer[12..]);
    check_eq!("bytes before it", &[0u8; 12][..], &buffer[..12]);
    // 32-bit addressing (0x67): ECX counts, EDI addresses, both written zero-extended.
    buffer = [0; 16];
    // SAFETY: 3 bytes at buffer (below 4 GiB: RAM is at most 1 GiB), whatever the upper
    // halves of RCX and RDI say.
    unsafe {
        asm!("cld", ".byte 0x67, 0xf3, 0x6c", in("dx") UNUSED_PORT,
             inout("rcx") 0xffff_ffff_0000_0003u64 => rcx,
             inout("rdi") (base as u64) | 1 << 32 => rdi, options(nostack));
    }
    check_eq!("RCX after addr32 rep insb", Hex(0), Hex(rcx));
    check_eq!("RDI after addr32 rep insb", Hex(base as u64 + 3), Hex(rdi));
    check_eq!(
        "bytes read by addr32 rep insb",
        &[0xffu8, 0xff, 0xff, 0][..],
        &buffer[..4]
    );
}

conformance_test! {
    title: "rep insb into a buffer that ends outside RAM raises #PF in the guest with CR2, RCX and RDI as hardware leaves them",
    section: "18.5 String I/O",
    expect: Success,
}
pub(super) fn rep_insb_outside_ram_faults() {
    let top = start_info().mem_bytes;
    let first = top - 4;
    // The 4 bytes below the top of RAM are the oldest of the boot stack: kept and restored.
    // SAFETY: RAM is identity-mapped; the bytes are read and written back below.
    let saved = unsafe { (first as *const u32).read_volatile() };
    let (mut rcx, mut rdi): (u64, u64) = (8, first);
    let mut rip = 0;
    let taken = idt::expect_trap(PAGE_FAULT, 2, || {
        // SAFETY: writes the 4 bytes below the top of RAM, then faults on the unmapped page
        // above; the handler resumes after the 2-byte `rep insb`.
        unsafe {
            asm!("cld", "lea {rip}, [rip + 2f]", "2:", "rep insb", rip = out(reg) rip,
                 in("dx") UNUSED_PORT, inout("rcx") rcx, inout("rdi") rdi, options(nostack));
        }
    });
    // SAFETY: as above.
    let written = unsafe { (first as *const u32).read_volatile() };
    // SAFETY: as above.
    unsafe { (first as *mut u32).write_volatile(saved) };
    let cr2: u64;
    // SAFETY: reading CR2 has no effect.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    match taken {
        Some(record) => {
            check_eq!(
                "exception",
                "#PF",
                idt::exception_name(record.vector.into())
            );
            check_eq!(
                "error code (write, not present, CPL 0)",
                Hex(2),
                Hex(record.error_code)
            );
            check_eq!("RIP of the #PF (the rep insb)", Hex(rip), Hex(record.rip));
        }
        None => {
            crate::framework::fail(format_args!("rep insb across the top of RAM did not fault"))
        }
    }
    check_eq!("CR2: the first byte outside RAM", Hex(top), Hex(cr2));
    check_eq!("RCX: the elements not done", 4, rcx);
    check_eq!("RDI: the first byte not written", Hex(top), Hex(rdi));
    check_eq!(
        "bytes written below the top of RAM",
        Hex(u32::MAX),
        Hex(written)
    );
}

/// Where the overflowing stack starts: 0x8020_1000, in a 2 MiB page mapped (at physical 0,
/// the unused first page, docs/abi.md 4.2) right above an unmapped one.
pub(crate) const OVERFLOW_STACK_TOP: u64 = 0x8020_1000;

conformance_test! {
    title: "a guest whose stack runs off its page triple-faults and is reported with RSP and CR2",
    section: "18.7 When a domain is stopped",
    expect: StoppedByHv("triple fault (rsp=0x80200000 cr2=0x801ffff8"),
}
pub(super) fn stack_overflow_reported() {
    #[repr(align(4096))]
    struct Table([u64; 512]);
    static mut PD: Table = Table([0; 512]);
    println!(
        "stack_overflow_reported: pushing from RSP {OVERFLOW_STACK_TOP:#x} until the stack runs off its page"
    );
    let pdpt = (lamina_abi::layout::BOOT_PML4_GPA + 0x1000) as *mut u64;
    // SAFETY: the boot tables are identity-mapped RAM; PDPT entry 2 (1 GiB at 0x8000_0000) is
    // unused. Its PD maps 0x8020_0000 to guest-physical 0 (2 MiB, present, writable) and
    // leaves 0x8000_0000 unmapped, so the pushes write only the unused low page before they
    // fault. With no IDT, the #PF triple-faults and the hypervisor stops the domain.
    unsafe {
        let pd = &raw mut PD;
        (*pd).0[1] = 0x83;
        pdpt.add(2).write_volatile(pd as u64 | 3);
        asm!("mov cr3, {}", in(reg) read_cr3(), options(nostack));
        idt::load_empty();
        asm!("mov rsp, {}", "2:", "push rax", "jmp 2b", in(reg) OVERFLOW_STACK_TOP,
             options(noreturn));
    }
}

/// CR0.CD (cache disable), bit 30.
const CR0_CD: u64 = 1 << 30;
/// Yields over which the pair below watches each other's CR0.
const CACHE_ROUNDS: u32 = 200;

conformance_test! {
    title: "with cr0_cache_disable_b: this domain sets CR0.CD; it reads its own value back after every yield while the other runs",
    section: "18.3 Control registers",
    expect: Success,
}
pub(super) fn cr0_cache_disable_a() {
    let cr0 = read_cr0();
    // SAFETY: CD only slows memory accesses down (if the CPU honours it); cleared at the end.
    unsafe { asm!("mov cr0, {}", in(reg) cr0 | CR0_CD, options(nostack)) };
    for round in 0..CACHE_ROUNDS {
        let seen = read_cr0();
        if !check_eq!(
            format_args!("CR0 after yield {round}"),
            Hex(cr0 | CR0_CD),
            Hex(seen)
        ) {
            break;
        }
        crate::hv::sched_yield();
    }
    // SAFETY: back to the boot value.
    unsafe { asm!("mov cr0, {}", in(reg) cr0, options(nostack)) };
    check_eq!("CR0 after clearing CD", Hex(cr0), Hex(read_cr0()));
}

conformance_test! {
    title: "with cr0_cache_disable_a: while the other domain has CR0.CD set, this one's CR0 never shows it (a vCPU's control registers are its own)",
    section: "18.3 Control registers",
    expect: Success,
}
pub(super) fn cr0_cache_disable_b() {
    let cr0 = read_cr0();
    check_eq!("CR0.CD at start", 0, cr0 & CR0_CD);
    for round in 0..CACHE_ROUNDS {
        crate::hv::sched_yield();
        let seen = read_cr0();
        if !check_eq!(format_args!("CR0 after yield {round}"), Hex(cr0), Hex(seen)) {
            break;
        }
    }
}

//! A GDT of our own, with CPL 3 segments and a 64-bit TSS, replacing the boot GDT
//! (SDM 3.4.5 segment descriptors, 5.2.1 64-bit code segments, 8.7 64-bit TSS).
//!
//! The TSS exists for RSP0: the stack the CPU switches to when an interrupt or exception
//! takes it from CPL 3 back to CPL 0.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

use super::{DescriptorTablePointer, RacyCell, Stack};

/// 64-bit kernel code, as in the boot GDT.
pub(crate) const KERNEL_CODE: u16 = 0x08;
/// Kernel data, as in the boot GDT.
pub(crate) const KERNEL_DATA: u16 = 0x10;
/// User data (DPL 3), with RPL 3.
pub(crate) const USER_DATA: u16 = 0x18 | 3;
/// 64-bit user code (DPL 3), with RPL 3.
pub(crate) const USER_CODE: u16 = 0x20 | 3;
/// The TSS descriptor (16 bytes: two slots).
pub(crate) const TSS: u16 = 0x28;

/// Flat segment descriptors (SDM 3.4.5): base 0, limit 4 GiB, present.
const KERNEL_CODE_DESCRIPTOR: u64 = 0x00af_9a00_0000_ffff; // L=1, DPL 0, execute/read
const KERNEL_DATA_DESCRIPTOR: u64 = 0x00cf_9200_0000_ffff; // DPL 0, read/write
const USER_DATA_DESCRIPTOR: u64 = 0x00cf_f200_0000_ffff; // DPL 3, read/write
const USER_CODE_DESCRIPTOR: u64 = 0x00af_fa00_0000_ffff; // L=1, DPL 3, execute/read

/// The 64-bit TSS (SDM 8.7, figure 8-11).
#[repr(C, packed(4))]
struct Tss64 {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    io_map_base: u16,
}

const TSS_BYTES: u16 = 104;
const _: () = assert!(size_of::<Tss64>() == TSS_BYTES as usize);

static TSS_TABLE: RacyCell<Tss64> = RacyCell::new(Tss64 {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    // No I/O permission bitmap: port I/O at CPL 3 raises #GP.
    io_map_base: TSS_BYTES,
});

const GDT_ENTRIES: usize = 7;
static GDT: RacyCell<[u64; GDT_ENTRIES]> = RacyCell::new([0; GDT_ENTRIES]);

/// The stack for interrupts and exceptions taken from CPL 3.
static RSP0_STACK: RacyCell<Stack<16384>> = RacyCell::new(Stack::new());
/// IST slot 1: a known-good stack for exceptions that cannot use the current one (#DF).
pub(crate) const DOUBLE_FAULT_IST: u8 = 1;
static IST1_STACK: RacyCell<Stack<16384>> = RacyCell::new(Stack::new());

static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The two slots of an available 64-bit TSS descriptor for `base` (SDM 8.2.3, type 9).
fn tss_descriptor(base: u64) -> [u64; 2] {
    let limit = u64::from(TSS_BYTES - 1);
    let low = limit
        | (base & 0xff_ffff) << 16
        | 0x89 << 40 // present, DPL 0, type 9
        | (base >> 24 & 0xff) << 56;
    [low, base >> 32]
}

/// Loads our GDT and TSS (once per domain): CS, DS, ES, SS keep their boot selector values.
pub(crate) fn install() {
    if INSTALLED.swap(true, Ordering::Relaxed) {
        return;
    }
    let tss = TSS_TABLE.get();
    // SAFETY: nothing else touches the TSS before `ltr` below; interrupts are off.
    unsafe {
        (*tss).rsp[0] = RSP0_STACK.top();
        (*tss).ist[usize::from(DOUBLE_FAULT_IST) - 1] = IST1_STACK.top();
    }
    let [tss_low, tss_high] = tss_descriptor(tss as u64);
    let gdt = GDT.get();
    // SAFETY: the GDT is not loaded yet, so the CPU does not read it while we fill it.
    unsafe {
        *gdt = [
            0,
            KERNEL_CODE_DESCRIPTOR,
            KERNEL_DATA_DESCRIPTOR,
            USER_DATA_DESCRIPTOR,
            USER_CODE_DESCRIPTOR,
            tss_low,
            tss_high,
        ]
    };
    let gdtr = DescriptorTablePointer {
        limit: (size_of::<[u64; GDT_ENTRIES]>() - 1) as u16,
        base: gdt as u64,
    };
    // SAFETY: the new GDT has the same kernel selectors as the boot GDT, so reloading CS (by a
    // far return to the next instruction) and the data segments changes no base or limit;
    // the TSS is valid and not busy. All of it lives in static memory for good.
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "push {code}",
            "lea {scratch}, [rip + 2f]",
            "push {scratch}",
            "retfq",
            "2:",
            "mov {scratch:e}, {data}",
            "mov ds, {scratch:x}",
            "mov es, {scratch:x}",
            "mov ss, {scratch:x}",
            "mov {scratch:e}, {tss}",
            "ltr {scratch:x}",
            gdtr = in(reg) &raw const gdtr,
            code = const KERNEL_CODE,
            data = const KERNEL_DATA,
            tss = const TSS,
            scratch = out(reg) _,
            options(preserves_flags),
        )
    };
}

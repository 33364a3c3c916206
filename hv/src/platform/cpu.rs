//! The hypervisor's own descriptor tables and exception handling.
//!
//! Each CPU has its own GDT (code, data, TSS) and TSS with separate stacks for double faults
//! and NMIs, kept in its [`PerCpu`]; all share one IDT, whose 32 exception vectors print a
//! diagnostic (vector, error code, RIP, CPU, registers) and end the machine with a failure
//! status: a fault in the hypervisor is never a silent hang.

use super::percpu::{self, PerCpu};
use core::arch::global_asm;
use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::{lidt, load_tss};
use x86_64::structures::DescriptorTablePointer;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;

/// IST slot (1-based in the IDT entry) used for double faults.
const DOUBLE_FAULT_IST: u16 = 1;
/// IST slot for NMIs: an NMI can arrive anywhere in the hypervisor, on any stack.
const NMI_IST: u16 = 2;
/// Bytes of each IST stack.
const IST_STACK_BYTES: usize = 16 * 1024;
/// Bytes of a CPU's IST stacks: the double-fault stack on top, the NMI stack below it.
pub const FAULT_STACKS_BYTES: usize = 2 * IST_STACK_BYTES;

#[repr(C, align(16))]
struct FaultStacks([u8; FAULT_STACKS_BYTES]);
/// The boot CPU's IST stacks (the other CPUs' are allocated when they start).
static mut BOOT_FAULT_STACKS: FaultStacks = FaultStacks([0; FAULT_STACKS_BYTES]);

// The TSS the CPU reads (Intel SDM Vol. 3A 9.7, "64-Bit Mode TSS"): 104 bytes, IST at 0x24.
const _: () = assert!(core::mem::size_of::<TaskStateSegment>() == 104);
const _: () = assert!(core::mem::offset_of!(TaskStateSegment, interrupt_stack_table) == 0x24);

/// A CPU's GDT and the selectors in it (the same on every CPU).
pub struct Tables {
    gdt: GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

static BOOT_CPU: Once<PerCpu> = Once::new();
static IDT: Once<[IdtEntry; 256]> = Once::new();

/// NMIs the hypervisor took (docs/abi.md 18.6): with NMI exiting, an NMI that arrives while a
/// guest runs exits the guest and lands here (SVM: once GIF is set again; VMX: through `INT 2`
/// after the exit, whose IRET also ends the NMI blocking the exit left). Counted, nothing else:
/// no device of the machine sends NMIs the hypervisor must act on.
#[unsafe(no_mangle)]
pub static HOST_NMIS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// An interrupt gate descriptor (Intel SDM Vol. 3A 6.14.1, "64-Bit Mode IDT").
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u16,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}
const _: () = assert!(core::mem::size_of::<IdtEntry>() == 16);

impl IdtEntry {
    fn interrupt_gate(handler: u64, selector: u16, ist: u16) -> Self {
        IdtEntry {
            offset_low: handler as u16,
            selector,
            // Type 0xE (64-bit interrupt gate), present, DPL 0.
            ist: ist | 0x8e00,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

unsafe extern "C" {
    /// Addresses of the 32 exception entry stubs, defined in the assembly below.
    static exception_stub_table: [u64; 32];
    /// Entry of the hypervisor's timer interrupt.
    fn timer_interrupt_stub();
    /// Entry of the APIC's spurious interrupt (nothing to do, no EOI).
    fn spurious_interrupt_stub();
    /// Entry of NMIs: counts them.
    fn nmi_stub();
    /// Entry of the kick IPI: only EOI.
    fn kick_interrupt_stub();
    /// Entry of the stop IPI: halts this CPU for good.
    fn stop_interrupt_stub();
    static boot_stack_top: u8;
}

/// Sets up the bootstrap CPU: its per-CPU state (CPU 0), GDT, TSS and the IDT. First thing at
/// boot: nothing may use [`percpu::this_cpu`] before.
pub fn init() {
    let initial_apic_id = core::arch::x86_64::__cpuid(1).ebx >> 24;
    let boot = BOOT_CPU.call_once(|| {
        PerCpu::new(
            0,
            initial_apic_id,
            &raw const boot_stack_top as u64,
            &raw const BOOT_FAULT_STACKS as u64 + FAULT_STACKS_BYTES as u64,
        )
    });
    // SAFETY: first code on the boot CPU to touch GS; index 0 is the boot CPU's.
    unsafe { percpu::install(boot) };
    load_tables(boot);
}

/// Loads `cpu`'s GDT and TSS (building them on first use) and the shared IDT on this CPU.
pub fn load_tables(cpu: &'static PerCpu) {
    let tss = cpu.tss.call_once(|| {
        let mut tss = TaskStateSegment::new();
        let top = VirtAddr::new(cpu.fault_stacks_top);
        tss.interrupt_stack_table[usize::from(DOUBLE_FAULT_IST - 1)] = top;
        tss.interrupt_stack_table[usize::from(NMI_IST - 1)] = top - IST_STACK_BYTES as u64;
        tss
    });
    let tables = cpu.tables.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        Tables {
            gdt,
            code,
            data,
            tss,
        }
    });
    tables.gdt.load();
    // SAFETY: the selectors index the GDT just loaded, which lives for the rest of the run;
    // the TSS descriptor is this CPU's own, so not busy yet.
    unsafe {
        CS::set_reg(tables.code);
        DS::set_reg(tables.data);
        ES::set_reg(tables.data);
        SS::set_reg(tables.data);
        load_tss(tables.tss);
    }
    let idt = IDT.call_once(|| {
        let mut idt = [IdtEntry::default(); 256];
        // SAFETY: the table is defined in the assembly below and never written.
        let stubs = unsafe { &exception_stub_table };
        for (vector, stub) in stubs.iter().enumerate() {
            let ist = if vector == 8 { DOUBLE_FAULT_IST } else { 0 };
            idt[vector] = IdtEntry::interrupt_gate(*stub, tables.code.0, ist);
        }
        idt[2] = IdtEntry::interrupt_gate(nmi_stub as *const () as u64, tables.code.0, NMI_IST);
        let timer = usize::from(super::apic::TIMER_VECTOR);
        idt[timer] =
            IdtEntry::interrupt_gate(timer_interrupt_stub as *const () as u64, tables.code.0, 0);
        let spurious = usize::from(super::apic::SPURIOUS_VECTOR);
        idt[spurious] = IdtEntry::interrupt_gate(
            spurious_interrupt_stub as *const () as u64,
            tables.code.0,
            0,
        );
        let kick = usize::from(super::apic::KICK_VECTOR);
        idt[kick] =
            IdtEntry::interrupt_gate(kick_interrupt_stub as *const () as u64, tables.code.0, 0);
        let stop = usize::from(super::apic::STOP_VECTOR);
        idt[stop] =
            IdtEntry::interrupt_gate(stop_interrupt_stub as *const () as u64, tables.code.0, 0);
        idt
    });
    let pointer = DescriptorTablePointer {
        limit: (core::mem::size_of_val(idt) - 1) as u16,
        base: VirtAddr::from_ptr(idt.as_ptr()),
    };
    // SAFETY: the IDT is static and its gates point at the stubs below.
    unsafe { lidt(&pointer) };
}

/// This CPU's task register: selector and TSS base (for the VMCS host state).
pub fn task_register() -> (u16, u64) {
    let cpu = percpu::this_cpu();
    let selector = cpu.tables.get().map_or(0, |t| t.tss.0);
    let base = cpu
        .tss
        .get()
        .map_or(0, |tss| tss as *const TaskStateSegment as u64);
    (selector, base)
}

/// What the exception stubs push, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rdi: u64,
    rsi: u64,
    rbp: u64,
    rbx: u64,
    rdx: u64,
    rcx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Called by the stubs; reports the fault and ends the machine.
#[unsafe(no_mangle)]
extern "C" fn hv_exception(frame: &ExceptionFrame) -> ! {
    // The lock may be held by the faulting code: take the port over rather than deadlock.
    // SAFETY: nothing else runs after this point; the machine is about to stop.
    unsafe { super::serial::SERIAL.force_unlock() };
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let cpu = percpu::try_index().map_or(-1, |index| index as i64);
    crate::hv_println!(
        "lamina: PANIC exception vector {} error code {:#x} at RIP {:#x} on cpu{} (cr2 {:#x}, rsp {:#x})",
        frame.vector,
        frame.error_code,
        frame.rip,
        cpu,
        cr2,
        frame.rsp
    );
    crate::hv_println!("lamina: PANIC registers {:x?}", frame);
    crate::hv_println!("lamina: result: failure");
    super::exit::end_machine(false)
}

global_asm!(
    r#"
    .macro EXCEPTION_STUB vector, has_error_code
    .balign 16
exception_stub_\vector:
    .if \has_error_code == 0
    push 0
    .endif
    push \vector
    jmp exception_common
    .endm

    .section .text
exception_common:
    push rax
    push rcx
    push rdx
    push rbx
    push rbp
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    and rsp, -16
    call hv_exception
    ud2

    EXCEPTION_STUB 0, 0
    EXCEPTION_STUB 1, 0
    EXCEPTION_STUB 2, 0
    EXCEPTION_STUB 3, 0
    EXCEPTION_STUB 4, 0
    EXCEPTION_STUB 5, 0
    EXCEPTION_STUB 6, 0
    EXCEPTION_STUB 7, 0
    EXCEPTION_STUB 8, 1
    EXCEPTION_STUB 9, 0
    EXCEPTION_STUB 10, 1
    EXCEPTION_STUB 11, 1
    EXCEPTION_STUB 12, 1
    EXCEPTION_STUB 13, 1
    EXCEPTION_STUB 14, 1
    EXCEPTION_STUB 15, 0
    EXCEPTION_STUB 16, 0
    EXCEPTION_STUB 17, 1
    EXCEPTION_STUB 18, 0
    EXCEPTION_STUB 19, 0
    EXCEPTION_STUB 20, 0
    EXCEPTION_STUB 21, 1
    EXCEPTION_STUB 22, 0
    EXCEPTION_STUB 23, 0
    EXCEPTION_STUB 24, 0
    EXCEPTION_STUB 25, 0
    EXCEPTION_STUB 26, 0
    EXCEPTION_STUB 27, 0
    EXCEPTION_STUB 28, 0
    EXCEPTION_STUB 29, 1
    EXCEPTION_STUB 30, 1
    EXCEPTION_STUB 31, 0

    /* Host interrupts: save the registers a C call may clobber. The CPU aligned RSP to 16
       before pushing its 5-word frame; 9 pushes restore 16-byte alignment for the call. */
    .balign 16
    .global timer_interrupt_stub
timer_interrupt_stub:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    call hv_timer_interrupt
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    iretq

    .balign 16
    .global nmi_stub
nmi_stub:
    lock inc qword ptr [rip + HOST_NMIS]
    iretq

    .balign 16
    .global spurious_interrupt_stub
spurious_interrupt_stub:
    iretq

    /* The kick's only effect is the interrupt itself (a guest that was running exited). */
    .balign 16
    .global kick_interrupt_stub
kick_interrupt_stub:
    push rax
    mov eax, {apic_eoi}
    mov dword ptr [rax], 0
    pop rax
    iretq

    .balign 16
    .global stop_interrupt_stub
stop_interrupt_stub:
    cli
    hlt
    jmp stop_interrupt_stub

    .section .rodata
    .balign 8
    .global exception_stub_table
exception_stub_table:
    .irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exception_stub_\vector
    .endr
"#,
    apic_eoi = const super::apic::EOI_ADDRESS,
);

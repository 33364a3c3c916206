//! Running a few instructions at CPL 3 and coming back (SDM 6.12.1 privilege changes on
//! interrupts, 6.14.2 IRETQ frame).
//!
//! [`hypercall_at_cpl3`] saves the callee-saved registers and RSP, loads the hypercall's
//! registers, then IRETQs to user code on a user stack with interrupts off. The user code
//! executes the hypercall instruction and `int USER_RETURN_VECTOR`, whose DPL 3 gate lands on
//! the RSP0 stack of our TSS in a stub that reloads the saved RSP and returns with the user's
//! RAX and CS. The boot page tables set U=1 in every entry (docs/abi.md 4.2), so user code may
//! run from the kernel image as it is.

use core::arch::global_asm;

use lamina_abi::Hypercall;
use lamina_guest_sdk::hypercall::HypercallInsn;

use super::gdt::{self, KERNEL_DATA, USER_CODE, USER_DATA};
use super::{RacyCell, Stack, idt};

/// The vector user code raises to come back to CPL 0.
pub(crate) const USER_RETURN_VECTOR: u8 = 0x80;

/// What the user code left in RAX and CS when it came back.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct UserReturn {
    /// RAX after the hypercall.
    pub(crate) rax: u64,
    /// CS while running the hypercall (its low two bits are the CPL).
    pub(crate) cs: u64,
}

static USER_STACK: RacyCell<Stack<4096>> = RacyCell::new(Stack::new());

global_asm!(
    ".section .text.lamina_conf_user,\"ax\",@progbits",
    // extern "sysv64" fn(rip: u64 /* RDI */, rsp: u64 /* RSI */, registers: &UserRegisters
    // /* RDX */) -> UserReturn (RAX:RDX)
    ".global lamina_conf_enter_user",
    "lamina_conf_enter_user:",
    "    push rbx",
    "    push rbp",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov [rip + lamina_conf_kernel_rsp], rsp",
    "    push {user_ss}",
    "    push rsi",
    "    push 0x2", // RFLAGS: interrupts off, IOPL 0
    "    push {user_cs}",
    "    push rdi",
    // The hypercall's registers, RDX last: it holds their address.
    "    mov rax, [rdx + 0]",
    "    mov rdi, [rdx + 8]",
    "    mov rsi, [rdx + 16]",
    "    mov r10, [rdx + 32]",
    "    mov r8, [rdx + 40]",
    "    mov rdx, [rdx + 24]",
    "    iretq",
    // The DPL 3 gate of USER_RETURN_VECTOR: RAX and RDX hold the user's results.
    ".global lamina_conf_user_return",
    "lamina_conf_user_return:",
    "    mov rsp, [rip + lamina_conf_kernel_rsp]",
    // Back at CPL 0 SS is null and IRETQ to CPL 3 nulled DS and ES: reload them.
    "    mov ecx, {kernel_ds}",
    "    mov ss, cx",
    "    mov ds, cx",
    "    mov es, cx",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbp",
    "    pop rbx",
    "    ret",
    // The user code: the hypercall with each instruction, then back.
    ".global lamina_conf_user_vmcall",
    "lamina_conf_user_vmcall:",
    "    vmcall",
    "    mov rdx, cs",
    "    int {user_return}",
    "    ud2",
    ".global lamina_conf_user_vmmcall",
    "lamina_conf_user_vmmcall:",
    "    vmmcall",
    "    mov rdx, cs",
    "    int {user_return}",
    "    ud2",
    // XSETBV of EDX:EAX to XCR0 (a #GP is expected and resumes after it), then back.
    ".global lamina_conf_user_xsetbv",
    "lamina_conf_user_xsetbv:",
    "    xor ecx, ecx",
    "    xsetbv",
    "    mov rdx, cs",
    "    int {user_return}",
    "    ud2",
    ".section .bss.lamina_conf_kernel_rsp,\"aw\",@nobits",
    ".balign 8",
    "lamina_conf_kernel_rsp:",
    "    .zero 8",
    user_ss = const USER_DATA,
    user_cs = const USER_CODE,
    kernel_ds = const KERNEL_DATA,
    user_return = const USER_RETURN_VECTOR,
);

/// The registers a hypercall at CPL 3 starts with: RAX, then the arguments RDI, RSI, RDX, R10,
/// R8 (the offsets the assembly above reads).
#[repr(C)]
struct UserRegisters([u64; 6]);

unsafe extern "sysv64" {
    fn lamina_conf_enter_user(rip: u64, rsp: u64, registers: &UserRegisters) -> UserReturn;
    fn lamina_conf_user_return();
    fn lamina_conf_user_vmcall();
    fn lamina_conf_user_vmmcall();
    fn lamina_conf_user_xsetbv();
}

/// Executes hypercall `number` with `arguments` (RDI, RSI, RDX, R10, R8) through `insn` at
/// CPL 3 and returns RAX and CS from there. The hypervisor must refuse it (docs/abi.md 2.3);
/// should it not, the arguments must describe a call that cannot break the kernel.
pub(crate) fn hypercall_at_cpl3(
    insn: HypercallInsn,
    number: u64,
    arguments: [u64; 5],
) -> UserReturn {
    gdt::install();
    idt::set_gate(
        USER_RETURN_VECTOR,
        lamina_conf_user_return as *const () as u64,
        3,
    );
    let code = match insn {
        HypercallInsn::Vmcall => lamina_conf_user_vmcall as *const () as u64,
        HypercallInsn::Vmmcall => lamina_conf_user_vmmcall as *const () as u64,
    };
    let [a1, a2, a3, a4, a5] = arguments;
    let registers = UserRegisters([number, a1, a2, a3, a4, a5]);
    // SAFETY: our GDT, TSS (RSP0) and the return gate are installed; the user code only runs
    // the hypercall and comes back through the gate, which restores every register the
    // SysV ABI asks a callee to preserve, and RSP. The user stack is ours alone.
    unsafe { lamina_conf_enter_user(code, USER_STACK.top(), &registers) }
}

/// Executes the version hypercall with `insn` at CPL 3 and returns RAX and CS from there.
pub(crate) fn version_hypercall_at_cpl3(insn: HypercallInsn) -> UserReturn {
    hypercall_at_cpl3(insn, Hypercall::Version as u64, [0; 5])
}

/// Executes XSETBV of `value` to XCR0 at CPL 3 and returns CS from there (RDX). The hypervisor
/// and CPU must refuse it with #GP(0), which the caller expects
/// ([`idt::expect_trap_from_user`]) so the user code goes on after it.
pub(crate) fn xsetbv_at_cpl3(value: u64) -> UserReturn {
    gdt::install();
    idt::set_gate(
        USER_RETURN_VECTOR,
        lamina_conf_user_return as *const () as u64,
        3,
    );
    let registers = UserRegisters([value & 0xffff_ffff, 0, 0, value >> 32, 0, 0]);
    // SAFETY: as for `hypercall_at_cpl3`; the user code changes only RCX, RDX, RAX and XCR0,
    // which a refused XSETBV leaves as it was.
    unsafe {
        lamina_conf_enter_user(
            lamina_conf_user_xsetbv as *const () as u64,
            USER_STACK.top(),
            &registers,
        )
    }
}

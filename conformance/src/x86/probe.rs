//! A hypercall with every general register under control, to check what the hypervisor
//! changes (docs/abi.md 2.2: everything but RAX is preserved).
//!
//! [`hypercall_with_registers`] loads all general registers but RSP from an array in encoding
//! order (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15), executes the hypercall instruction
//! and stores them back into the array. The RSP slot comes back as RSP after the instruction
//! minus RSP before it: 0 when preserved.

use core::arch::global_asm;

use lamina_guest_sdk::hypercall::HypercallInsn;

/// Register names in encoding order, the indices of [`Registers`].
pub(crate) const NAMES: [&str; 16] = [
    "RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI", "R8", "R9", "R10", "R11", "R12", "R13",
    "R14", "R15",
];

/// Index of RAX (the hypercall number in, the result out).
pub(crate) const RAX: usize = 0;
/// Index of RDX (third argument).
pub(crate) const RDX: usize = 2;
/// Index of RSP (the change of RSP out).
pub(crate) const RSP: usize = 4;
/// Index of RSI (second argument).
pub(crate) const RSI: usize = 6;
/// Index of RDI (first argument).
pub(crate) const RDI: usize = 7;
/// Index of R10 (fourth argument).
pub(crate) const R10: usize = 10;

/// General registers in encoding order.
pub(crate) type Registers = [u64; 16];

global_asm!(
    ".macro LAMINA_PROBE name, insn",
    ".global \\name",
    "\\name:",
    "    push rbx",
    "    push rbp",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    push rdi",
    "    mov [rdi + 32], rsp",
    "    mov rax, [rdi + 0]",
    "    mov rcx, [rdi + 8]",
    "    mov rdx, [rdi + 16]",
    "    mov rbx, [rdi + 24]",
    "    mov rbp, [rdi + 40]",
    "    mov rsi, [rdi + 48]",
    "    mov r8, [rdi + 64]",
    "    mov r9, [rdi + 72]",
    "    mov r10, [rdi + 80]",
    "    mov r11, [rdi + 88]",
    "    mov r12, [rdi + 96]",
    "    mov r13, [rdi + 104]",
    "    mov r14, [rdi + 112]",
    "    mov r15, [rdi + 120]",
    "    mov rdi, [rdi + 56]",
    "    \\insn",
    // RDI <- the array; the stack slot keeps RDI as the hypercall left it.
    "    xchg rdi, [rsp]",
    "    mov [rdi + 0], rax",
    "    mov [rdi + 8], rcx",
    "    mov [rdi + 16], rdx",
    "    mov [rdi + 24], rbx",
    "    mov [rdi + 40], rbp",
    "    mov [rdi + 48], rsi",
    "    mov [rdi + 64], r8",
    "    mov [rdi + 72], r9",
    "    mov [rdi + 80], r10",
    "    mov [rdi + 88], r11",
    "    mov [rdi + 96], r12",
    "    mov [rdi + 104], r13",
    "    mov [rdi + 112], r14",
    "    mov [rdi + 120], r15",
    "    mov rax, rsp",
    "    sub rax, [rdi + 32]",
    "    mov [rdi + 32], rax",
    "    pop rax",
    "    mov [rdi + 56], rax",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbp",
    "    pop rbx",
    "    ret",
    ".endm",
    ".section .text.lamina_conf_probe,\"ax\",@progbits",
    "LAMINA_PROBE lamina_conf_probe_vmcall, vmcall",
    "LAMINA_PROBE lamina_conf_probe_vmmcall, vmmcall",
);

unsafe extern "sysv64" {
    fn lamina_conf_probe_vmcall(registers: *mut Registers);
    fn lamina_conf_probe_vmmcall(registers: *mut Registers);
}

/// Executes `insn` with the registers in `registers` (RSP excepted) and stores them back
/// (RSP: its change). The hypercall must not write guest memory or fail to return.
pub(crate) fn hypercall_with_registers(insn: HypercallInsn, registers: &mut Registers) {
    // SAFETY: the probe saves and restores every callee-saved register and RSP around the
    // hypercall, writes only the array it is given, and the calls the tests make through it
    // read guest memory at most.
    unsafe {
        match insn {
            HypercallInsn::Vmcall => lamina_conf_probe_vmcall(registers),
            HypercallInsn::Vmmcall => lamina_conf_probe_vmmcall(registers),
        }
    }
}

/// Distinct values for every register, so a swap or a clobber shows.
pub(crate) fn patterned() -> Registers {
    core::array::from_fn(|index| {
        0x5a5a_0000_0000_0000 | (index as u64) << 32 | (0x1111 * index as u64)
    })
}

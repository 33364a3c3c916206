//! Discovery through CPUID.
//!
//! CPUID.1:ECX bit 31 ("hypervisor present") is set. Leaf [`LEAF_SIGNATURE`] returns the
//! highest Lamina leaf in EAX and the signature "LaminaLamina" in EBX, ECX, EDX; leaf
//! [`LEAF_VERSION`] returns the ABI version in EAX and [`Features`] bits in EBX.

/// Signature leaf.
pub const LEAF_SIGNATURE: u32 = 0x4000_0000;
/// Version and features leaf.
pub const LEAF_VERSION: u32 = 0x4000_0001;
/// Highest Lamina leaf.
pub const LEAF_MAX: u32 = LEAF_VERSION;

/// The signature, as EBX, ECX, EDX of [`LEAF_SIGNATURE`] spell it.
pub const SIGNATURE: [u8; 12] = *b"LaminaLamina";

/// The signature as the three registers, `[ebx, ecx, edx]`.
pub const fn signature_regs() -> [u32; 3] {
    let s = SIGNATURE;
    [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    ]
}

/// Feature bits in EBX of [`LEAF_VERSION`].
pub mod features {
    /// `VMCALL` and `VMMCALL` are both accepted as the hypercall instruction.
    pub const ANY_HYPERCALL_INSN: u32 = 1 << 0;
    /// `Hypercall::ConsoleIo` is available.
    pub const CONSOLE_IO: u32 = 1 << 1;
    /// `Hypercall::SchedOp` is available.
    pub const SCHED_OP: u32 = 1 << 2;
    /// A 16550 UART is emulated at I/O port 0x3f8 (COM1) for unported kernels.
    pub const EMULATED_UART: u32 = 1 << 3;
    /// Everything this build offers.
    pub const ALL: u32 = ANY_HYPERCALL_INSN | CONSOLE_IO | SCHED_OP | EMULATED_UART;
}

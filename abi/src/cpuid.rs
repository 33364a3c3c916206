//! Discovery through CPUID.
//!
//! CPUID.1:ECX bit 31 ("hypervisor present") is set. Leaf [`LEAF_SIGNATURE`] returns the
//! highest Lamina leaf in EAX and the signature "LaminaLamina" in EBX, ECX, EDX; leaf
//! [`LEAF_VERSION`] returns the ABI version in EAX and [`features`] bits in EBX;
//! [`LEAF_TIMING`] returns the TSC frequency in kHz in EAX and the frequency of the emulated
//! local APIC timer in kHz in EBX (the VMware convention), so a native kernel needs no
//! calibration loop.

/// Signature leaf.
pub const LEAF_SIGNATURE: u32 = 0x4000_0000;
/// Version and features leaf.
pub const LEAF_VERSION: u32 = 0x4000_0001;
/// Timing leaf: EAX = TSC kHz, EBX = APIC timer kHz.
pub const LEAF_TIMING: u32 = 0x4000_0010;
/// Highest Lamina leaf.
pub const LEAF_MAX: u32 = LEAF_TIMING;

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
    /// Event channels, the shared-info page and the upcall vector.
    pub const EVENT_CHANNELS: u32 = 1 << 4;
    /// The pvclock in the shared-info page and the timing leaf.
    pub const PVCLOCK: u32 = 1 << 5;
    /// One-shot and periodic timers (`vcpu_op`).
    pub const PV_TIMERS: u32 = 1 << 6;
    /// `multicall`.
    pub const MULTICALL: u32 = 1 << 7;
    /// `memory_op`.
    pub const MEMORY_OP: u32 = 1 << 8;
    /// The console ring page.
    pub const CONSOLE_RING: u32 = 1 << 9;
    /// An x2APIC (timer, EOI, TPR, self-IPI) is emulated through MSRs for unported kernels.
    pub const EMULATED_X2APIC: u32 = 1 << 10;
    /// `stats_op`: exit accounting.
    pub const EXIT_STATS: u32 = 1 << 11;
    /// Inter-domain event channels (`alloc_unbound` for another domain, `bind_interdomain`).
    pub const INTERDOMAIN_EVENTS: u32 = 1 << 12;
    /// Grant tables (`grant_table_op`) and the grant window.
    pub const GRANT_TABLES: u32 = 1 << 13;
    /// Domain control (`domctl_op`) for privileged domains.
    pub const DOMAIN_CONTROL: u32 = 1 << 14;
    /// Paravirtual SMP (ABI 1.6): IPI slots and `send_ipi` (`event_channel_op`), `flush_tlb`
    /// (`memory_op`), `yield_to` (`sched_op`).
    pub const PV_SMP: u32 = 1 << 15;
    /// Everything this build offers.
    pub const ALL: u32 = GRANT_TABLES
        | PV_SMP
        | DOMAIN_CONTROL
        | INTERDOMAIN_EVENTS
        | EXIT_STATS
        | ANY_HYPERCALL_INSN
        | CONSOLE_IO
        | SCHED_OP
        | EMULATED_UART
        | EVENT_CHANNELS
        | PVCLOCK
        | PV_TIMERS
        | MULTICALL
        | MEMORY_OP
        | CONSOLE_RING
        | EMULATED_X2APIC;
}

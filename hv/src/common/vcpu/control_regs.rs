//! Control-register writes as a CPU checks them, written once for both backends.
//!
//! [`check_cr_write`] decides whether a MOV to CR0, CR3, CR4 or CR8 (or LMSW, CLTS) that
//! reached the hypervisor would raise #GP(0) on hardware (Intel SDM Vol. 2B "MOV-Move to/from
//! Control Registers", Vol. 3A 2.5; AMD APM Vol. 2 3.1), and which value the register takes
//! otherwise. QEMU's nested SVM performs none of these checks itself (a bad CR4 or CR3 ends in
//! VMEXIT_INVALID at the next VMRUN), and VT-x checks CR4 only against its fixed bits, so the
//! hypervisor does it for both. [`decode_mov_cr`] finds the operand of an intercepted CR
//! access from the instruction bytes, for SVM without decode assists (QEMU TCG).

use crate::common::vcpu::cpuid::CpuidResult;
use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::model_specific::EferFlags;

/// Why a control-register write is refused: the CPU raises #GP(0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault;

/// MOV to CR3 with CR4.PCIDE = 1: bit 63 asks not to flush, and is not stored (SDM 4.10.4.1).
const CR3_NO_FLUSH: u64 = 1 << 63;

/// What a control-register write is checked against: the vCPU's current registers and what
/// its CPU offers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrContext {
    /// Current CR0, CR3, CR4 and EFER, as the guest sees them.
    pub cr0: u64,
    /// Current CR3.
    pub cr3: u64,
    /// Current CR4.
    pub cr4: u64,
    /// Current EFER.
    pub efer: u64,
    /// CR4 bits the guest may set: what its CPUID offers and the hardware can run.
    pub cr4_allowed: u64,
    /// The guest's MAXPHYADDR (CPUID 0x8000_0008 EAX[7:0]).
    pub max_phys_bits: u8,
}

/// The CR4 bits a guest may set given its CPUID leaves 1, 7 (subleaf 0; zeros where the leaf
/// does not exist) and 0x8000_0001: a bit whose feature CPUID does not offer is reserved for
/// it. VMXE and SMXE are never offered (CPUID hides VMX; SMX is not virtualized).
pub fn cr4_allowed_by_cpuid(leaf1: CpuidResult, leaf7: CpuidResult) -> u64 {
    let [_, _, ecx1, edx1] = leaf1;
    let [_, ebx7, ecx7, _] = leaf7;
    let bit = |reg: u32, n: u32, cr4: Cr4Flags| {
        if reg & (1 << n) != 0 {
            cr4
        } else {
            Cr4Flags::empty()
        }
    };
    // Always present on a 64-bit CPU: TSD and PCE (time stamp and performance counters).
    (Cr4Flags::TIMESTAMP_DISABLE
        | Cr4Flags::PERFORMANCE_MONITOR_COUNTER
        | bit(
            edx1,
            1,
            Cr4Flags::VIRTUAL_8086_MODE_EXTENSIONS | Cr4Flags::PROTECTED_MODE_VIRTUAL_INTERRUPTS,
        )
        | bit(edx1, 2, Cr4Flags::DEBUGGING_EXTENSIONS)
        | bit(edx1, 3, Cr4Flags::PAGE_SIZE_EXTENSION)
        | bit(edx1, 6, Cr4Flags::PHYSICAL_ADDRESS_EXTENSION)
        | bit(edx1, 7, Cr4Flags::MACHINE_CHECK_EXCEPTION)
        | bit(edx1, 13, Cr4Flags::PAGE_GLOBAL)
        | bit(edx1, 24, Cr4Flags::OSFXSR)
        | bit(edx1, 25, Cr4Flags::OSXMMEXCPT_ENABLE)
        | bit(ecx1, 17, Cr4Flags::PCID)
        | bit(ecx1, 26, Cr4Flags::OSXSAVE)
        | bit(ebx7, 0, Cr4Flags::FSGSBASE)
        | bit(ebx7, 7, Cr4Flags::SUPERVISOR_MODE_EXECUTION_PROTECTION)
        | bit(ebx7, 20, Cr4Flags::SUPERVISOR_MODE_ACCESS_PREVENTION)
        | bit(ecx7, 2, Cr4Flags::USER_MODE_INSTRUCTION_PREVENTION)
        | bit(ecx7, 3, Cr4Flags::PROTECTION_KEY_USER)
        | bit(ecx7, 7, Cr4Flags::CONTROL_FLOW_ENFORCEMENT)
        | bit(ecx7, 16, Cr4Flags::L5_PAGING))
    .bits()
}

/// Checks a write of `value` to control register `cr` (0, 3, 4 or 8) as the CPU would;
/// returns the value the register takes, or [`Fault`] for #GP(0) (the register keeps its
/// value). The guest runs in IA-32e mode (EFER.LMA), the only mode Lamina offers.
pub fn check_cr_write(cr: u8, value: u64, ctx: &CrContext) -> Result<u64, Fault> {
    let long_mode = EferFlags::from_bits_retain(ctx.efer).contains(EferFlags::LONG_MODE_ACTIVE);
    let (cr0, cr4) = (
        Cr0Flags::from_bits_retain(ctx.cr0),
        Cr4Flags::from_bits_retain(ctx.cr4),
    );
    match cr {
        0 => {
            let new = Cr0Flags::from_bits_retain(value);
            if value >> 32 != 0
                || (new.contains(Cr0Flags::PAGING)
                    && !new.contains(Cr0Flags::PROTECTED_MODE_ENABLE))
                || (new.contains(Cr0Flags::NOT_WRITE_THROUGH)
                    && !new.contains(Cr0Flags::CACHE_DISABLE))
                // Paging cannot be turned off in IA-32e mode (SDM 9.8.5.4: only from
                // compatibility mode, which Lamina does not offer).
                || (long_mode && !new.contains(Cr0Flags::PAGING))
                // CET needs WP (SDM 2.5).
                || (cr4.contains(Cr4Flags::CONTROL_FLOW_ENFORCEMENT)
                    && !new.contains(Cr0Flags::WRITE_PROTECT))
            {
                return Err(Fault);
            }
            // Reserved bits of 31:0 are ignored (the crate's flags are exactly the bits a MOV
            // can set); ET is fixed to 1 on every 64-bit CPU.
            Ok((Cr0Flags::from_bits_truncate(value) | Cr0Flags::EXTENSION_TYPE).bits())
        }
        3 => {
            // The hint is honoured conservatively: the backends flush anyway.
            let value = if cr4.contains(Cr4Flags::PCID) {
                value & !CR3_NO_FLUSH
            } else {
                value
            };
            let bits = u32::from(ctx.max_phys_bits.clamp(32, 52));
            if value >> bits != 0 {
                return Err(Fault);
            }
            Ok(value)
        }
        4 => {
            let new = Cr4Flags::from_bits_retain(value);
            let changed = new ^ cr4;
            if value & !ctx.cr4_allowed != 0
                || (long_mode && !new.contains(Cr4Flags::PHYSICAL_ADDRESS_EXTENSION))
                // LA57 cannot change in IA-32e mode (SDM 2.5).
                || (long_mode && changed.contains(Cr4Flags::L5_PAGING))
                // PCIDE: only in IA-32e mode, and only set while CR3[11:0] = 0 (SDM 4.10.1).
                || (new.contains(Cr4Flags::PCID) && !long_mode)
                || ((changed & new).contains(Cr4Flags::PCID) && ctx.cr3 & 0xfff != 0)
                || (new.contains(Cr4Flags::CONTROL_FLOW_ENFORCEMENT)
                    && !cr0.contains(Cr0Flags::WRITE_PROTECT))
            {
                return Err(Fault);
            }
            Ok(value)
        }
        8 => check_cr8_write(value),
        _ => Err(Fault),
    }
}

/// A write to CR8: TPR bits 7:4; bits 63:4 are reserved (SDM Vol. 3A 10.8.6.1).
pub fn check_cr8_write(value: u64) -> Result<u64, Fault> {
    if value <= 0xf { Ok(value) } else { Err(Fault) }
}

/// An intercepted control-register instruction, decoded (SDM Vol. 2: MOV CRn 0F 20/0F 22,
/// CLTS 0F 06, LMSW 0F 01 /6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrInstruction {
    /// MOV to CR`cr` from general register `gpr`.
    Write {
        /// Control register number.
        cr: u8,
        /// Source register (x86 encoding).
        gpr: u8,
        /// Instruction length.
        len: u8,
    },
    /// MOV from CR`cr` to general register `gpr`.
    Read {
        /// Control register number.
        cr: u8,
        /// Destination register.
        gpr: u8,
        /// Instruction length.
        len: u8,
    },
    /// CLTS.
    Clts {
        /// Instruction length.
        len: u8,
    },
    /// LMSW from the low 16 bits of general register `gpr`.
    Lmsw {
        /// Source register.
        gpr: u8,
        /// Instruction length.
        len: u8,
    },
}

/// Decodes the CR access at the start of `bytes` (up to 15 instruction bytes). `None` for
/// anything else, including LMSW with a memory operand (not emulated). On AMD, LOCK MOV CR0
/// is MOV CR8 (APM Vol. 3, "MOV CRn").
pub fn decode_mov_cr(bytes: &[u8]) -> Option<CrInstruction> {
    // An instruction is at most 15 bytes (longer: #GP, SDM Vol. 2A 2.3.11).
    let bytes = &bytes[..bytes.len().min(15)];
    // Legacy prefixes (LOCK matters: on AMD it selects CR8) and REX in any order; a REX counts
    // only right before the opcode, any other is ignored (SDM Vol. 2A 2.2.1).
    let mut i = 0;
    let mut lock = false;
    let mut rex = 0u8;
    while let Some(&byte) = bytes.get(i) {
        match byte {
            0xf0 => {
                lock = true;
                rex = 0;
            }
            0x66 | 0x67 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 => rex = 0,
            0x40..=0x4f => rex = byte,
            _ => break,
        }
        i += 1;
    }
    if *bytes.get(i)? != 0x0f {
        return None;
    }
    let opcode = *bytes.get(i + 1)?;
    let len = |extra: usize| (i + 2 + extra) as u8;
    match opcode {
        0x06 => Some(CrInstruction::Clts { len: len(0) }),
        0x20 | 0x22 => {
            // The mod field is ignored: always a register operand (SDM Vol. 2B, MOV CRn).
            let modrm = *bytes.get(i + 2)?;
            let mut cr = ((modrm >> 3) & 7) | if rex & 0x4 != 0 { 8 } else { 0 };
            if lock && cr == 0 {
                cr = 8;
            }
            let gpr = (modrm & 7) | if rex & 0x1 != 0 { 8 } else { 0 };
            Some(if opcode == 0x22 {
                CrInstruction::Write {
                    cr,
                    gpr,
                    len: len(1),
                }
            } else {
                CrInstruction::Read {
                    cr,
                    gpr,
                    len: len(1),
                }
            })
        }
        0x01 => {
            let modrm = *bytes.get(i + 2)?;
            if (modrm >> 3) & 7 != 6 || modrm >> 6 != 3 {
                return None;
            }
            let gpr = (modrm & 7) | if rex & 0x1 != 0 { 8 } else { 0 };
            Some(CrInstruction::Lmsw { gpr, len: len(1) })
        }
        _ => None,
    }
}

/// The CR0 value LMSW writes: bits 3:0 from the source, except that PE can be set but not
/// cleared (SDM Vol. 2A, LMSW).
pub fn lmsw_value(cr0: u64, source: u64) -> u64 {
    let loaded =
        (Cr0Flags::MONITOR_COPROCESSOR | Cr0Flags::EMULATE_COPROCESSOR | Cr0Flags::TASK_SWITCHED)
            .bits();
    let pe = Cr0Flags::PROTECTED_MODE_ENABLE.bits();
    (cr0 & !loaded) | (source & (loaded | pe))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NW: u64 = Cr0Flags::NOT_WRITE_THROUGH.bits();
    const CD: u64 = Cr0Flags::CACHE_DISABLE.bits();
    const PCIDE: u64 = Cr4Flags::PCID.bits();

    const LONG: CrContext = CrContext {
        cr0: 0x8001_0033,
        cr3: 0x4000,
        cr4: 0x620,
        efer: 0x500,
        cr4_allowed: Cr4Flags::PHYSICAL_ADDRESS_EXTENSION
            .union(Cr4Flags::PAGE_GLOBAL)
            .union(Cr4Flags::OSFXSR)
            .union(Cr4Flags::OSXMMEXCPT_ENABLE)
            .union(Cr4Flags::PCID)
            .union(Cr4Flags::FSGSBASE)
            .union(Cr4Flags::TIMESTAMP_DISABLE)
            .union(Cr4Flags::PERFORMANCE_MONITOR_COUNTER)
            .bits(),
        max_phys_bits: 40,
    };

    #[test]
    fn cr0_refuses_pg_without_pe_nw_without_cd_upper_bits_and_leaving_paging() {
        assert_eq!(check_cr_write(0, 0x8000_0000, &LONG), Err(Fault));
        assert_eq!(check_cr_write(0, 0x8001_0033 | NW, &LONG), Err(Fault));
        assert_eq!(
            check_cr_write(0, 0x8001_0033 | (1 << 32), &LONG),
            Err(Fault)
        );
        assert_eq!(check_cr_write(0, 0x0001_0033, &LONG), Err(Fault));
        assert_eq!(
            check_cr_write(0, 0x8001_0033 | NW | CD, &LONG),
            Ok(0xe001_0033)
        );
        assert_eq!(check_cr_write(0, 0x8001_0033 | CD, &LONG), Ok(0xc001_0033));
    }

    #[test]
    fn cr0_ignores_reserved_low_bits_and_keeps_et_set() {
        assert_eq!(
            check_cr_write(0, 0x8001_0023 | (1 << 7), &LONG),
            Ok(0x8001_0033)
        );
    }

    #[test]
    fn cr4_refuses_bits_cpuid_does_not_offer_and_clearing_pae_in_long_mode() {
        for bit in [
            Cr4Flags::L5_PAGING.bits(),
            Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS.bits(),
            Cr4Flags::SUPERVISOR_MODE_EXECUTION_PROTECTION.bits(),
            Cr4Flags::PROTECTION_KEY_USER.bits(),
            1 << 15,
            1 << 32,
        ] {
            assert_eq!(
                check_cr_write(4, 0x620 | bit, &LONG),
                Err(Fault),
                "{bit:#x}"
            );
        }
        assert_eq!(check_cr_write(4, 0x600, &LONG), Err(Fault), "PAE clear");
        assert_eq!(check_cr_write(4, 0x6a0, &LONG), Ok(0x6a0), "PGE offered");
    }

    #[test]
    fn pcide_needs_long_mode_and_cr3_low_bits_clear() {
        assert_eq!(check_cr_write(4, 0x620 | PCIDE, &LONG), Ok(0x2_0620));
        let pcid_in_cr3 = CrContext {
            cr3: 0x4005,
            ..LONG
        };
        assert_eq!(check_cr_write(4, 0x620 | PCIDE, &pcid_in_cr3), Err(Fault));
        let legacy = CrContext {
            efer: 0,
            cr0: 0x11,
            ..LONG
        };
        assert_eq!(check_cr_write(4, 0x20 | PCIDE, &legacy), Err(Fault));
        let without_pcid = CrContext {
            cr4_allowed: LONG.cr4_allowed & !PCIDE,
            ..LONG
        };
        assert_eq!(check_cr_write(4, 0x620 | PCIDE, &without_pcid), Err(Fault));
    }

    #[test]
    fn cr3_refuses_bits_above_maxphyaddr_and_drops_the_pcid_no_flush_bit() {
        assert_eq!(check_cr_write(3, 0x8000, &LONG), Ok(0x8000));
        assert_eq!(check_cr_write(3, 1 << 40, &LONG), Err(Fault));
        assert_eq!(check_cr_write(3, 1 << 63, &LONG), Err(Fault), "no PCIDE");
        let pcide = CrContext {
            cr4: 0x2_0620,
            ..LONG
        };
        assert_eq!(check_cr_write(3, (1 << 63) | 0x8001, &pcide), Ok(0x8001));
        assert_eq!(check_cr_write(3, (1 << 62) | 0x8001, &pcide), Err(Fault));
    }

    #[test]
    fn cr8_takes_four_bits() {
        assert_eq!(check_cr_write(8, 0xf, &LONG), Ok(0xf));
        assert_eq!(check_cr_write(8, 0x10, &LONG), Err(Fault));
    }

    #[test]
    fn cpuid_features_become_cr4_bits() {
        let leaf1 = [
            0,
            0,
            (1 << 17) | (1 << 26),
            (1 << 6) | (1 << 13) | (1 << 24) | (1 << 25),
        ];
        let leaf7 = [0, 1 | (1 << 7), 1 << 16, 0];
        let allowed = cr4_allowed_by_cpuid(leaf1, leaf7);
        let allowed = Cr4Flags::from_bits_retain(allowed);
        for bit in [
            Cr4Flags::PHYSICAL_ADDRESS_EXTENSION,
            Cr4Flags::PAGE_GLOBAL,
            Cr4Flags::OSFXSR,
            Cr4Flags::OSXMMEXCPT_ENABLE,
            Cr4Flags::PCID,
            Cr4Flags::OSXSAVE,
            Cr4Flags::FSGSBASE,
            Cr4Flags::SUPERVISOR_MODE_EXECUTION_PROTECTION,
            Cr4Flags::L5_PAGING,
        ] {
            assert!(allowed.contains(bit), "{bit:?}");
        }
        for bit in [
            Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS,
            Cr4Flags::SAFER_MODE_EXTENSIONS,
            Cr4Flags::SUPERVISOR_MODE_ACCESS_PREVENTION,
            Cr4Flags::PROTECTION_KEY_USER,
            Cr4Flags::USER_MODE_INSTRUCTION_PREVENTION,
        ] {
            assert!(!allowed.intersects(bit), "{bit:?}");
        }
    }

    #[test]
    fn decodes_mov_cr_clts_and_lmsw() {
        // mov cr4, rax; mov cr3, r9; mov rax, cr8 (REX.R); lock mov cr0, rcx = mov cr8, rcx.
        assert_eq!(
            decode_mov_cr(&[0x0f, 0x22, 0xe0]),
            Some(CrInstruction::Write {
                cr: 4,
                gpr: 0,
                len: 3
            })
        );
        assert_eq!(
            decode_mov_cr(&[0x41, 0x0f, 0x22, 0xd9]),
            Some(CrInstruction::Write {
                cr: 3,
                gpr: 9,
                len: 4
            })
        );
        assert_eq!(
            decode_mov_cr(&[0x44, 0x0f, 0x20, 0xc0]),
            Some(CrInstruction::Read {
                cr: 8,
                gpr: 0,
                len: 4
            })
        );
        assert_eq!(
            decode_mov_cr(&[0xf0, 0x0f, 0x22, 0xc1]),
            Some(CrInstruction::Write {
                cr: 8,
                gpr: 1,
                len: 4
            })
        );
        assert_eq!(
            decode_mov_cr(&[0x0f, 0x06]),
            Some(CrInstruction::Clts { len: 2 })
        );
        assert_eq!(
            decode_mov_cr(&[0x0f, 0x01, 0xf0]),
            Some(CrInstruction::Lmsw { gpr: 0, len: 3 })
        );
        assert_eq!(decode_mov_cr(&[0x0f, 0x01, 0x30]), None, "LMSW [rax]");
        assert_eq!(decode_mov_cr(&[0x90, 0x0f, 0x22, 0xe0]), None);
        assert_eq!(decode_mov_cr(&[0x0f]), None);
    }

    /// Found by fuzz/control_regs: a REX that a later prefix (another REX or a legacy one)
    /// follows is ignored, as on hardware, instead of the access being undecodable.
    #[test]
    fn only_the_rex_right_before_the_opcode_counts() {
        assert_eq!(
            decode_mov_cr(&[0x41, 0x44, 0x0f, 0x06]),
            Some(CrInstruction::Clts { len: 4 })
        );
        assert_eq!(
            decode_mov_cr(&[0x44, 0x66, 0x0f, 0x22, 0xc0]),
            Some(CrInstruction::Write {
                cr: 0,
                gpr: 0,
                len: 5
            })
        );
        assert_eq!(
            decode_mov_cr(&[0x66, 0x41, 0x44, 0x0f, 0x20, 0xc1]),
            Some(CrInstruction::Read {
                cr: 8,
                gpr: 1,
                len: 6
            })
        );
        // Longer than 15 bytes: #GP on hardware, not an access to emulate.
        let mut long = [0x66u8; 17];
        long[14..].copy_from_slice(&[0x0f, 0x22, 0xc0]);
        assert_eq!(decode_mov_cr(&long), None);
        assert!(decode_mov_cr(&long[2..]).is_some());
    }

    #[test]
    fn lmsw_sets_but_never_clears_pe() {
        assert_eq!(lmsw_value(0x8000_0033, 0x0), 0x8000_0031);
        assert_eq!(lmsw_value(0x8000_0030, 0xf), 0x8000_003f);
    }
}

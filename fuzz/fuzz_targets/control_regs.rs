//! Control-register writes and their decoder: `check_cr_write` against a reference written
//! from the SDM's MOV CRn #GP list (Vol. 2B; Vol. 3A 2.5, 4.10.1), from states the hypervisor
//! reaches (IA-32e mode, CR4 allowed as `cr_context` computes it); `decode_mov_cr` against a
//! reference decoder (prefixes in any order, a REX counts only right before the opcode, at most
//! 15 bytes). Checked after each input: the same verdict and value as the reference; an
//! accepted value written again is accepted unchanged; a state built from accepted writes
//! passes VMRUN's consistency checks (`hw/svm/vmrun_checks`: the hypervisor never lets a guest
//! make its own state unrunnable); a decoded length is at most 15 and at most the bytes given,
//! and the same bytes cut at that length decode the same.
#![no_main]

use lamina_fuzz::common::vcpu::control_regs::{
    CrContext, CrInstruction, Fault, check_cr_write, cr4_allowed_by_cpuid, decode_mov_cr,
    lmsw_value,
};

/// The reference's names for the CR0 and CR4 bits (SDM Vol. 3A 2.5), from the x86_64 crate's
/// flag types, which the hypervisor uses too.
mod cr0 {
    use x86_64::registers::control::Cr0Flags as F;
    pub const PE: u64 = F::PROTECTED_MODE_ENABLE.bits();
    pub const MP: u64 = F::MONITOR_COPROCESSOR.bits();
    pub const ET: u64 = F::EXTENSION_TYPE.bits();
    pub const NE: u64 = F::NUMERIC_ERROR.bits();
    pub const WP: u64 = F::WRITE_PROTECT.bits();
    pub const NW: u64 = F::NOT_WRITE_THROUGH.bits();
    pub const CD: u64 = F::CACHE_DISABLE.bits();
    pub const PG: u64 = F::PAGING.bits();
}
mod cr4 {
    use x86_64::registers::control::Cr4Flags as F;
    pub const PAE: u64 = F::PHYSICAL_ADDRESS_EXTENSION.bits();
    pub const OSFXSR: u64 = F::OSFXSR.bits();
    pub const OSXMMEXCPT: u64 = F::OSXMMEXCPT_ENABLE.bits();
    pub const LA57: u64 = F::L5_PAGING.bits();
    pub const PCIDE: u64 = F::PCID.bits();
    pub const CET: u64 = F::CONTROL_FLOW_ENFORCEMENT.bits();
}
use lamina_fuzz::input::Input;
use lamina_fuzz::svm::{VmrunState, invalid_state_reason};

const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const EFER_SVME: u64 = 1 << 12;

/// SDM Vol. 2B "MOV-Move to/from Control Registers", protected/64-bit mode exceptions.
fn reference(cr: u8, value: u64, ctx: &CrContext) -> Result<u64, Fault> {
    let lma = ctx.efer & EFER_LMA != 0;
    let bit = |v: u64, b: u64| v & b != 0;
    match cr {
        0 => {
            // "If an attempt is made to write a 1 to any reserved bit in CR0[63:32]",
            // "PG = 1 and PE = 0", "NW = 1 and CD = 0", "clear CR0.PG in IA-32e mode" (only
            // compatibility mode may), "clear CR0.WP while CR4.CET = 1".
            let refused = value >> 32 != 0
                || (bit(value, cr0::PG) && !bit(value, cr0::PE))
                || (bit(value, cr0::NW) && !bit(value, cr0::CD))
                || (lma && !bit(value, cr0::PG))
                || (bit(ctx.cr4, cr4::CET) && !bit(value, cr0::WP));
            if refused {
                return Err(Fault);
            }
            // Writes to reserved bits 31:0 are ignored; ET reads as 1.
            let defined = (0..32)
                .map(|b| 1u64 << b)
                .filter(|b| {
                    [0, 1, 2, 3, 4, 5, 16, 18, 29, 30, 31]
                        .iter()
                        .any(|n| 1 << n == *b)
                })
                .fold(0, |a, b| a | b);
            Ok(value & defined | cr0::ET)
        }
        3 => {
            // With PCIDE, bit 63 is a no-flush hint and not stored; any other bit at or above
            // MAXPHYADDR is reserved.
            let stored = if bit(ctx.cr4, cr4::PCIDE) {
                value & !(1 << 63)
            } else {
                value
            };
            let width = u32::from(ctx.max_phys_bits);
            if width < 64 && stored >> width != 0 {
                return Err(Fault);
            }
            Ok(stored)
        }
        4 => {
            let changed = value ^ ctx.cr4;
            let refused = value & !ctx.cr4_allowed != 0
                || (lma && !bit(value, cr4::PAE))
                || (lma && bit(changed, cr4::LA57))
                || (bit(changed, cr4::PCIDE) && bit(value, cr4::PCIDE) && ctx.cr3 & 0xfff != 0)
                || (bit(changed, cr4::PCIDE) && bit(value, cr4::PCIDE) && !lma)
                || (bit(value, cr4::CET) && !bit(ctx.cr0, cr0::WP));
            if refused { Err(Fault) } else { Ok(value) }
        }
        // CR8: TPR in bits 3:0, the rest reserved.
        8 => {
            if value < 16 {
                Ok(value)
            } else {
                Err(Fault)
            }
        }
        _ => Err(Fault),
    }
}

/// A reference decoder (SDM Vol. 2A 2.1-2.2.1): legacy prefixes and REX in any order, REX
/// effective only as the last prefix, the whole instruction at most 15 bytes.
fn reference_decode(bytes: &[u8]) -> Option<CrInstruction> {
    let mut lock = false;
    let mut rex = 0u8;
    let mut i = 0;
    loop {
        let byte = *bytes.get(i)?;
        match byte {
            0xf0 => {
                lock = true;
                rex = 0;
            }
            0x66 | 0x67 | 0xf2 | 0xf3 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => rex = 0,
            0x40..=0x4f => rex = byte,
            _ => break,
        }
        i += 1;
    }
    let opcode = (*bytes.get(i)?, *bytes.get(i + 1)?);
    let r = if rex & 4 != 0 { 8 } else { 0 };
    let b = if rex & 1 != 0 { 8 } else { 0 };
    let (decoded, len) = match opcode {
        (0x0f, 0x06) => (CrInstruction::Clts { len: 0 }, i + 2),
        (0x0f, op @ (0x20 | 0x22)) => {
            let modrm = *bytes.get(i + 2)?;
            let mut cr = (modrm >> 3 & 7) | r;
            if lock && cr == 0 {
                cr = 8;
            }
            let gpr = modrm & 7 | b;
            let len = i + 3;
            if op == 0x22 {
                (CrInstruction::Write { cr, gpr, len: 0 }, len)
            } else {
                (CrInstruction::Read { cr, gpr, len: 0 }, len)
            }
        }
        (0x0f, 0x01) => {
            let modrm = *bytes.get(i + 2)?;
            if modrm >> 6 != 3 || modrm >> 3 & 7 != 6 {
                return None;
            }
            (
                CrInstruction::Lmsw {
                    gpr: modrm & 7 | b,
                    len: 0,
                },
                i + 3,
            )
        }
        _ => return None,
    };
    if len > 15 {
        return None;
    }
    let len = len as u8;
    Some(match decoded {
        CrInstruction::Clts { .. } => CrInstruction::Clts { len },
        CrInstruction::Write { cr, gpr, .. } => CrInstruction::Write { cr, gpr, len },
        CrInstruction::Read { cr, gpr, .. } => CrInstruction::Read { cr, gpr, len },
        CrInstruction::Lmsw { gpr, .. } => CrInstruction::Lmsw { gpr, len },
    })
}

fn length(decoded: CrInstruction) -> u8 {
    match decoded {
        CrInstruction::Write { len, .. }
        | CrInstruction::Read { len, .. }
        | CrInstruction::Clts { len }
        | CrInstruction::Lmsw { len, .. } => len,
    }
}

/// A VMCB holding `ctx`'s registers, otherwise as the hypervisor sets it up.
fn vmcb(ctx: &CrContext) -> VmrunState {
    VmrunState {
        efer: ctx.efer | EFER_SVME,
        cr0: ctx.cr0,
        cr3: ctx.cr3,
        cr4: ctx.cr4,
        dr6: 0xffff_0ff0,
        dr7: 0x400,
        cs_attributes: 0x0a9b,
        asid: 1,
        intercepts_vmrun: true,
        event_injection: 0,
    }
}

const FINE: &str = "a check the VMCB does not show";

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // The decoder on any bytes, mostly prefixes and the CR opcodes.
    let n = input.below(20) as usize;
    let mut bytes = Vec::with_capacity(n);
    for _ in 0..n {
        bytes.push(match input.u8() % 4 {
            0 => [0xf0, 0x66, 0x67, 0xf3, 0x2e, 0x65, 0x41, 0x44, 0x48, 0x4d]
                [input.below(10) as usize],
            1 => [0x0f, 0x20, 0x22, 0x06, 0x01][input.below(5) as usize],
            _ => input.u8(),
        });
    }
    let decoded = decode_mov_cr(&bytes);
    assert_eq!(decoded, reference_decode(&bytes), "decoding {bytes:x?}");
    if let Some(found) = decoded {
        let len = usize::from(length(found));
        assert!(
            len <= 15 && len <= bytes.len(),
            "length {len} of {bytes:x?}"
        );
        assert_eq!(
            decode_mov_cr(&bytes[..len]),
            decoded,
            "reads past its length"
        );
    }

    // A state the hypervisor reaches: IA-32e mode, CR4 allowed from CPUID.
    let leaf1 = [0, 0, input.u32(), input.u32()];
    let leaf7 = [0, input.u32(), input.u32(), 0];
    let hardware = if input.bool() { u64::MAX } else { input.u64() };
    let cr4_allowed = cr4_allowed_by_cpuid(leaf1, leaf7) & hardware | cr4::PAE;
    let mut ctx = CrContext {
        cr0: cr0::PG | cr0::PE | cr0::ET | cr0::NE | cr0::WP | cr0::MP,
        cr3: 0x4000,
        cr4: cr4::PAE | cr4_allowed & (cr4::OSFXSR | cr4::OSXMMEXCPT),
        efer: EFER_LME | EFER_LMA | if input.bool() { EFER_NXE } else { 0 },
        cr4_allowed,
        max_phys_bits: 36 + input.below(17) as u8,
    };
    assert!(
        invalid_state_reason(&vmcb(&ctx)).starts_with(FINE),
        "the start state"
    );
    for _ in 0..32 {
        if input.is_empty() {
            break;
        }
        let cr = [0u8, 3, 4, 8, 0, 4, 2, 5][input.below(8) as usize];
        let current = match cr {
            0 => ctx.cr0,
            3 => ctx.cr3,
            4 => ctx.cr4,
            _ => 0,
        };
        let value = match input.u8() % 6 {
            0 => input.u64(),
            1 => current ^ (1 << input.below(64)),
            2 => current ^ u64::from(input.u32()),
            3 => lmsw_value(ctx.cr0, u64::from(input.u16())),
            4 => u64::from(input.below(4096)) << 12 | u64::from(input.below(4096)),
            _ => u64::from(input.u8()),
        };
        let verdict = check_cr_write(cr, value, &ctx);
        assert_eq!(
            verdict,
            reference(cr, value, &ctx),
            "CR{cr} <- {value:#x} in {ctx:x?}"
        );
        let Ok(stored) = verdict else { continue };
        match cr {
            0 => ctx.cr0 = stored,
            3 => ctx.cr3 = stored,
            4 => ctx.cr4 = stored,
            _ => {}
        }
        if cr != 8 {
            assert_eq!(
                check_cr_write(cr, stored, &ctx),
                Ok(stored),
                "CR{cr}: the stored {stored:#x} is refused when written again"
            );
        }
        let reason = invalid_state_reason(&vmcb(&ctx));
        assert!(
            reason.starts_with(FINE),
            "CR{cr} <- {value:#x} accepted, and VMRUN refuses the state: {reason} ({ctx:x?})"
        );
    }
});

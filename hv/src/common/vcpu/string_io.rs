//! String I/O (`ins`, `outs`, with or without `rep`) emulated as the CPU performs it
//! (Intel SDM Vol. 2B INS/OUTS/REP; AMD APM Vol. 3), on top of the port model of docs/abi.md
//! 7.1 and 7.4.
//!
//! The exit information of both vendors is decoded by pure functions ([`decode_vmx`],
//! [`decode_svm`]); [`emulate`] moves the elements between the port and the guest buffer
//! through the guest's own page tables, one element at a time, and delivers a fault on the
//! buffer to the guest (the registers then say how far the instruction got, as on hardware).

use crate::common::memory::guest_paging::{self, Access, Translation};
use crate::common::vcpu::{ArchMsr, VirtualCpu, is_canonical, reg, vector};
use x86_64::registers::rflags::RFlags;

/// The segment register of a string instruction's memory operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// ES (always the destination of `ins`).
    Es,
    /// CS.
    Cs,
    /// SS.
    Ss,
    /// DS (the default source of `outs`).
    Ds,
    /// FS.
    Fs,
    /// GS.
    Gs,
}

impl Segment {
    /// From the 3-bit encoding both vendors use (0 ES, 1 CS, 2 SS, 3 DS, 4 FS, 5 GS).
    pub fn from_encoding(n: u64) -> Option<Self> {
        Some(match n {
            0 => Segment::Es,
            1 => Segment::Cs,
            2 => Segment::Ss,
            3 => Segment::Ds,
            4 => Segment::Fs,
            5 => Segment::Gs,
            _ => return None,
        })
    }
}

/// A decoded string I/O exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StringIo {
    /// The port (DX).
    pub port: u16,
    /// Element size in bytes: 1, 2 or 4.
    pub size: u8,
    /// `ins` (port to memory); `outs` otherwise.
    pub input: bool,
    /// A `rep` prefix: RCX (in the address size) elements.
    pub rep: bool,
    /// Address size in bits: 16, 32 or 64; 0 when the exit does not say (QEMU's SVM sets no
    /// A16/A32/A64 bit): the instruction's prefixes are decoded (64-bit mode: 0x67 means 32).
    pub address_bits: u8,
    /// The source segment of `outs` (ignored for `ins`, which always writes ES:rDI); `None`
    /// when the exit does not say (SVM without decode assists): the instruction's prefixes
    /// are decoded.
    pub segment: Option<Segment>,
}

/// Decodes a VMX I/O exit whose qualification has the string bit (SDM Vol. 3C Table 28-5) with
/// the VM-exit instruction information (Table 28-8: address size in bits 9:7, segment in bits
/// 17:15); `info` is `None` where the CPU does not report it (IA32_VMX_BASIC bit 54 clear).
pub fn decode_vmx(qualification: u64, info: Option<u64>) -> Option<StringIo> {
    if qualification & (1 << 4) == 0 {
        return None;
    }
    let size = match qualification & 7 {
        0 => 1,
        1 => 2,
        3 => 4,
        _ => return None,
    };
    let (address_bits, segment) = match info {
        Some(info) => (
            match (info >> 7) & 7 {
                0 => 16,
                1 => 32,
                2 => 64,
                _ => return None,
            },
            Segment::from_encoding((info >> 15) & 7),
        ),
        None => (64, None),
    };
    Some(StringIo {
        port: (qualification >> 16) as u16,
        size,
        input: qualification & (1 << 3) != 0,
        rep: qualification & (1 << 5) != 0,
        address_bits,
        segment,
    })
}

/// Decodes an SVM IOIO EXITINFO1 with the STR bit (APM Vol. 2 15.10.2, Figure 15-2: TYPE bit 0,
/// STR 2, REP 3, SZ8/16/32 bits 4-6, A16/32/64 bits 7-9, SEG bits 12:10, port 31:16). SEG is
/// valid only with decode assists (`segment_valid`).
pub fn decode_svm(info1: u64, segment_valid: bool) -> Option<StringIo> {
    if info1 & (1 << 2) == 0 {
        return None;
    }
    let size = match (info1 >> 4) & 7 {
        1 => 1,
        2 => 2,
        4 => 4,
        _ => return None,
    };
    let address_bits = match (info1 >> 7) & 7 {
        0 => 0,
        1 => 16,
        2 => 32,
        4 => 64,
        _ => return None,
    };
    Some(StringIo {
        port: (info1 >> 16) as u16,
        size,
        input: info1 & 1 != 0,
        rep: info1 & (1 << 3) != 0,
        address_bits,
        segment: if segment_valid {
            Segment::from_encoding((info1 >> 10) & 7)
        } else {
            None
        },
    })
}

/// The segment override among the legacy prefixes at the start of `bytes`, DS if none (the
/// last override wins, as on hardware).
pub fn segment_from_prefixes(bytes: &[u8]) -> Segment {
    let mut segment = Segment::Ds;
    for &byte in bytes {
        segment = match byte {
            0x26 => Segment::Es,
            0x2e => Segment::Cs,
            0x36 => Segment::Ss,
            0x3e => Segment::Ds,
            0x64 => Segment::Fs,
            0x65 => Segment::Gs,
            0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 | 0x40..=0x4f => segment,
            _ => break,
        };
    }
    segment
}

/// The address size of a string instruction in 64-bit mode from its prefixes: 32 with an
/// address-size override (0x67), else 64.
pub fn address_bits_from_prefixes(bytes: &[u8]) -> u8 {
    for &byte in bytes {
        match byte {
            0x67 => return 32,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0xf0 | 0xf2 | 0xf3 | 0x40..=0x4f => {}
            _ => break,
        }
    }
    64
}

/// How many elements one exit moves at most; a longer `rep` continues at the next entry (the
/// guest re-executes the instruction with RCX, RSI, RDI advanced, as after an interrupt).
pub const MAX_ELEMENTS_PER_EXIT: u64 = 4096;

/// The fault a string instruction raised on its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferFault {
    /// Exception vector (#PF, #GP or #SS).
    pub vector: u8,
    /// Its error code.
    pub error_code: u32,
    /// CR2 for a #PF.
    pub cr2: Option<u64>,
}

/// What one string I/O exit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every element moved: RIP goes past the instruction.
    Done,
    /// Some elements moved and more remain: the guest re-executes the instruction.
    Partial,
    /// A fault on the buffer: delivered at the instruction.
    Fault(BufferFault),
}

/// A value written to a register of `bits` address size, as the CPU writes it in 64-bit
/// mode: 64 replaces, 32 zero-extends, 16 keeps bits 63:16.
fn merge(old: u64, new: u64, bits: u8) -> u64 {
    match bits {
        64 => new,
        32 => new & 0xffff_ffff,
        _ => (old & !0xffff) | (new & 0xffff),
    }
}

fn mask(bits: u8) -> u64 {
    match bits {
        64 => u64::MAX,
        32 => 0xffff_ffff,
        _ => 0xffff,
    }
}

/// The port side of string I/O: the same model as single `in`/`out` (docs/abi.md 7.1, 7.4).
pub trait Ports {
    /// `in` of `size` bytes.
    fn port_in(&mut self, port: u16, size: u8) -> u32;
    /// `out` of `size` bytes.
    fn port_out(&mut self, port: u16, size: u8, value: u32);
}

/// Emulates `io` for `vcpu`, whose memory is `memory`: moves up to
/// [`MAX_ELEMENTS_PER_EXIT`] elements, updates RCX, RSI or RDI for every element moved, and
/// says how the instruction ends. RIP is not touched.
pub fn emulate<V: VirtualCpu>(
    io: StringIo,
    vcpu: &mut V,
    memory: &crate::common::memory::guest_memory::GuestMemory,
    ports: &mut dyn Ports,
    code_bytes: impl FnOnce(&V) -> [u8; 15],
) -> Outcome {
    let state = vcpu.arch_state();
    let backwards = state.rflags & RFlags::DIRECTION_FLAG.bits() != 0;
    // What the exit information leaves out comes from the instruction's prefixes.
    let needs_code = io.address_bits == 0 || (!io.input && io.segment.is_none());
    let code = if needs_code {
        code_bytes(vcpu)
    } else {
        [0; 15]
    };
    let bits = match io.address_bits {
        0 => address_bits_from_prefixes(&code),
        bits => bits,
    };
    let segment = if io.input {
        Segment::Es
    } else {
        io.segment.unwrap_or_else(|| segment_from_prefixes(&code))
    };
    // In 64-bit mode only FS and GS have a base (SDM Vol. 3A 3.4.4).
    let base = match segment {
        Segment::Fs => vcpu.read_msr(ArchMsr::FsBase),
        Segment::Gs => vcpu.read_msr(ArchMsr::GsBase),
        _ => 0,
    };
    let index_reg = if io.input { reg::RDI } else { reg::RSI };
    let mut remaining = if io.rep {
        vcpu.regs().gpr[reg::RCX] & mask(bits)
    } else {
        1
    };
    let mode = vcpu.paging_mode();
    let user = vcpu.cpl() == 3;
    let step = u64::from(io.size);
    let mut moved = 0;
    while remaining > 0 {
        if moved == MAX_ELEMENTS_PER_EXIT {
            return Outcome::Partial;
        }
        let index = vcpu.regs().gpr[index_reg];
        let linear = base.wrapping_add(index & mask(bits));
        let mut gpas = [0u64; 4];
        for (i, gpa) in gpas.iter_mut().enumerate().take(io.size.into()) {
            let address = linear.wrapping_add(i as u64);
            if !is_canonical(address) {
                let vector = if segment == Segment::Ss {
                    vector::STACK_FAULT
                } else {
                    vector::GENERAL_PROTECTION
                };
                return Outcome::Fault(BufferFault {
                    vector,
                    error_code: 0,
                    cr2: None,
                });
            }
            let access = Access {
                write: io.input,
                user,
            };
            match guest_paging::translate_checked(memory, mode, address, access) {
                Translation::Mapped(found) if memory.check(found, 1).is_ok() => *gpa = found,
                // A page of the guest's tables that points outside its RAM: nothing answers
                // there, and the hypervisor does not stop the domain for a string operand.
                Translation::Mapped(_) => {
                    return Outcome::Fault(BufferFault {
                        vector: vector::GENERAL_PROTECTION,
                        error_code: 0,
                        cr2: None,
                    });
                }
                Translation::PageFault { error_code } => {
                    return Outcome::Fault(BufferFault {
                        vector: vector::PAGE_FAULT,
                        error_code,
                        cr2: Some(address),
                    });
                }
            }
        }
        let bytes = &gpas[..io.size.into()];
        if io.input {
            let value = ports.port_in(io.port, io.size).to_le_bytes();
            for (gpa, byte) in bytes.iter().zip(value) {
                // Checked above to lie inside RAM.
                let _ = memory.write(*gpa, &[byte]);
            }
        } else {
            let mut value = [0u8; 4];
            for (gpa, byte) in bytes.iter().zip(value.iter_mut()) {
                let mut one = [0u8];
                let _ = memory.read(*gpa, &mut one);
                *byte = one[0];
            }
            ports.port_out(io.port, io.size, u32::from_le_bytes(value));
        }
        let next = if backwards {
            index.wrapping_sub(step)
        } else {
            index.wrapping_add(step)
        };
        let regs = vcpu.regs();
        regs.gpr[index_reg] = merge(index, next, bits);
        remaining -= 1;
        if io.rep {
            regs.gpr[reg::RCX] = merge(regs.gpr[reg::RCX], remaining, bits);
        }
        moved += 1;
    }
    Outcome::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmx_exit_information_decodes() {
        // rep outsw to 0x3f8 (size 2: encoding 1; OUT; string; rep), 32-bit address, FS.
        let q = (0x3f8 << 16) | (1 << 5) | (1 << 4) | 1;
        let info = (1 << 7) | (4 << 15);
        assert_eq!(
            decode_vmx(q, Some(info)),
            Some(StringIo {
                port: 0x3f8,
                size: 2,
                input: false,
                rep: true,
                address_bits: 32,
                segment: Some(Segment::Fs),
            })
        );
        // insd from 0x2f0, 64-bit address, no rep.
        let q = (0x2f0 << 16) | (1 << 4) | (1 << 3) | 3;
        let io = decode_vmx(q, Some(2 << 7)).unwrap();
        assert_eq!(
            (io.port, io.size, io.input, io.rep, io.address_bits),
            (0x2f0, 4, true, false, 64)
        );
        assert_eq!(decode_vmx(q, None).unwrap().segment, None);
        assert_eq!(decode_vmx(q & !(1 << 4), Some(0)), None, "not a string");
        assert_eq!(decode_vmx(q & !7 | 2, Some(2 << 7)), None, "size 3");
    }

    #[test]
    fn svm_exitinfo1_decodes() {
        // rep insb from 0x2f0: IN, STR, REP, SZ8, A64, SEG=ES.
        let info1 = (0x2f0 << 16) | (1 << 9) | (1 << 4) | (1 << 3) | (1 << 2) | 1;
        assert_eq!(
            decode_svm(info1, false),
            Some(StringIo {
                port: 0x2f0,
                size: 1,
                input: true,
                rep: true,
                address_bits: 64,
                segment: None,
            })
        );
        // outsd, A32, SEG=GS with decode assists.
        let info1 = (0x80 << 16) | (5 << 10) | (1 << 8) | (1 << 6) | (1 << 2);
        let io = decode_svm(info1, true).unwrap();
        assert_eq!(
            (
                io.port,
                io.size,
                io.input,
                io.rep,
                io.address_bits,
                io.segment
            ),
            (0x80, 4, false, false, 32, Some(Segment::Gs))
        );
        assert_eq!(decode_svm(info1 & !(1 << 2), true), None);
        assert_eq!(decode_svm(1 << 2, true), None, "no size");
        // QEMU: STR, REP, SZ8 and no address-size bit.
        assert_eq!(decode_svm(0x3f8_001c, false).unwrap().address_bits, 0);
    }

    #[test]
    fn segment_overrides_come_from_the_prefixes() {
        assert_eq!(segment_from_prefixes(&[0xf3, 0x6e]), Segment::Ds);
        assert_eq!(segment_from_prefixes(&[0x65, 0xf3, 0x6e]), Segment::Gs);
        assert_eq!(
            segment_from_prefixes(&[0x64, 0x67, 0x66, 0x6f]),
            Segment::Fs
        );
        assert_eq!(segment_from_prefixes(&[0x6e, 0x65]), Segment::Ds);
    }

    #[test]
    fn address_size_comes_from_the_prefixes_when_the_exit_omits_it() {
        assert_eq!(address_bits_from_prefixes(&[0xf3, 0x6c]), 64);
        assert_eq!(address_bits_from_prefixes(&[0x67, 0xf3, 0x6c]), 32);
        assert_eq!(address_bits_from_prefixes(&[0x6c, 0x67]), 64);
    }

    #[test]
    fn index_registers_update_in_the_address_size() {
        assert_eq!(
            merge(0xffff_ffff_0000_fffe, 0x1_0000, 16),
            0xffff_ffff_0000_0000
        );
        assert_eq!(merge(0xffff_ffff_ffff_fffe, 0x1_0000_0000, 32), 0);
        assert_eq!(merge(5, 6, 64), 6);
    }
}

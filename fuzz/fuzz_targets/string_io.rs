//! String I/O (`ins`/`outs`, with or without `rep`): both vendors' exit decoders against
//! reference decoders written from the SDM (Vol. 3C Tables 28-5, 28-8) and the APM (Vol. 2
//! 15.10.2), the prefix decoders against a reference, then the emulation itself. Checked after
//! each input: no more elements than one exit may move; RCX counts exactly the elements moved
//! (its bits above the address size as the CPU leaves them); RSI/RDI advanced by the elements
//! moved in the direction of RFLAGS.DF; every port access on the decoded port and size; with
//! paging off, `ins` wrote exactly the values read, where the index pointed, `outs` sent the
//! bytes there and wrote nothing; a fault only for the first element that cannot be reached
//! (non-canonical or outside RAM), with the vector the CPU raises; nothing written outside RAM.
#![no_main]

use lamina_fuzz::common::vcpu::string_io::{
    MAX_ELEMENTS_PER_EXIT, Outcome, Segment, StringIo, address_bits_from_prefixes, decode_svm,
    decode_vmx, segment_from_prefixes,
};
use lamina_fuzz::guarded::GuardedRam;
use lamina_fuzz::input::Input;
use lamina_fuzz::string_io::{Setup, emulate, in_value};

const RAM: u64 = 64 << 10;

fn segment_of(n: u64) -> Option<Segment> {
    [
        Segment::Es,
        Segment::Cs,
        Segment::Ss,
        Segment::Ds,
        Segment::Fs,
        Segment::Gs,
    ]
    .get(n as usize)
    .copied()
}

/// SDM Vol. 3C Table 28-5 (qualification: size-1 in bits 2:0, IN bit 3, string 4, REP 5, port
/// 31:16) and Table 28-8 (instruction information: address size 9:7, segment 17:15).
fn reference_vmx(q: u64, info: Option<u64>) -> Option<StringIo> {
    let string = q & 0x10 != 0;
    let size = [Some(1), Some(2), None, Some(4), None, None, None, None][(q & 7) as usize];
    let (address_bits, segment) = match info {
        None => (Some(64), None),
        Some(info) => (
            [Some(16), Some(32), Some(64)]
                .get(((info >> 7) & 7) as usize)
                .copied()
                .flatten(),
            segment_of((info >> 15) & 7),
        ),
    };
    if !string {
        return None;
    }
    Some(StringIo {
        port: ((q >> 16) & 0xffff) as u16,
        size: size?,
        input: (q >> 3) & 1 == 1,
        rep: (q >> 5) & 1 == 1,
        address_bits: address_bits?,
        segment,
    })
}

/// APM Vol. 2 Figure 15-2 (EXITINFO1 of IOIO): one-hot size SZ8/16/32 in bits 6:4, one-hot
/// address size A16/32/64 in bits 9:7 (none: QEMU's SVM), SEG 12:10.
fn reference_svm(info1: u64, segment_valid: bool) -> Option<StringIo> {
    let size = match (info1 >> 4) & 7 {
        0b001 => 1,
        0b010 => 2,
        0b100 => 4,
        _ => return None,
    };
    let address_bits = match (info1 >> 7) & 7 {
        0b000 => 0,
        0b001 => 16,
        0b010 => 32,
        0b100 => 64,
        _ => return None,
    };
    if (info1 >> 2) & 1 == 0 {
        return None;
    }
    Some(StringIo {
        port: ((info1 >> 16) & 0xffff) as u16,
        size,
        input: info1 & 1 == 1,
        rep: (info1 >> 3) & 1 == 1,
        address_bits,
        segment: if segment_valid {
            segment_of((info1 >> 10) & 7)
        } else {
            None
        },
    })
}

fn is_prefix(byte: u8) -> bool {
    matches!(
        byte,
        0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 | 0x40..=0x4f
    )
}

/// The prefix run's last segment override (DS without one) and whether it has 0x67.
fn reference_prefixes(bytes: &[u8]) -> (Segment, u8) {
    let run = bytes.iter().take_while(|b| is_prefix(**b));
    let segment = run
        .clone()
        .filter_map(|b| match b {
            0x26 => Some(Segment::Es),
            0x2e => Some(Segment::Cs),
            0x36 => Some(Segment::Ss),
            0x3e => Some(Segment::Ds),
            0x64 => Some(Segment::Fs),
            0x65 => Some(Segment::Gs),
            _ => None,
        })
        .last()
        .unwrap_or(Segment::Ds);
    let bits = if run.clone().any(|b| *b == 0x67) {
        32
    } else {
        64
    };
    (segment, bits)
}

fn mask(bits: u8) -> u64 {
    match bits {
        64 => u64::MAX,
        32 => 0xffff_ffff,
        _ => 0xffff,
    }
}

/// A register written in `bits` address size, as in 64-bit mode.
fn merged(old: u64, new: u64, bits: u8) -> u64 {
    match bits {
        64 => new,
        32 => new & 0xffff_ffff,
        _ => (old & !0xffff) | (new & 0xffff),
    }
}

fn interesting(input: &mut Input) -> u64 {
    match input.u8() % 8 {
        0 => input.u64(),
        1 => u64::from(input.u16()),
        2 => RAM - u64::from(input.u8()),
        3 => 0x0000_7fff_ffff_ff00 | u64::from(input.u8()),
        4 => u64::MAX - u64::from(input.u8()),
        5 => 0xffff_ffff_0000_0000 | u64::from(input.u16()),
        6 => u64::from(input.below(5000)),
        _ => u64::from(input.u32()),
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // The exit decoders.
    let q = input.u64();
    let info = if input.bool() {
        Some(input.u64())
    } else {
        None
    };
    assert_eq!(
        decode_vmx(q, info),
        reference_vmx(q, info),
        "VMX {q:#x} {info:x?}"
    );
    let info1 = input.u64();
    let segment_valid = input.bool();
    assert_eq!(
        decode_svm(info1, segment_valid),
        reference_svm(info1, segment_valid),
        "SVM {info1:#x}"
    );
    let mut code = [0u8; 15];
    for byte in &mut code {
        *byte = match input.u8() % 4 {
            0 => [0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65, 0x66, 0x67, 0xf3, 0x48]
                [input.below(10) as usize],
            1 => 0x6c + input.below(4) as u8,
            _ => input.u8(),
        };
    }
    let (segment, bits) = reference_prefixes(&code);
    assert_eq!(
        segment_from_prefixes(&code),
        segment,
        "segment of {code:x?}"
    );
    assert_eq!(
        address_bits_from_prefixes(&code),
        bits,
        "address size of {code:x?}"
    );

    // The emulation of a decoded exit.
    let io = StringIo {
        port: input.u16(),
        size: [1, 2, 4][input.below(3) as usize],
        input: input.bool(),
        rep: input.u8() % 4 != 0,
        address_bits: [0, 16, 32, 64][input.below(4) as usize],
        segment: if input.bool() {
            segment_of(u64::from(input.below(6)))
        } else {
            None
        },
    };
    let setup = Setup {
        rcx: match input.u8() % 4 {
            0 => interesting(&mut input),
            1 => u64::from(MAX_ELEMENTS_PER_EXIT as u32 + input.below(3)) - 1,
            _ => u64::from(input.below(40)),
        },
        rsi: interesting(&mut input),
        rdi: interesting(&mut input),
        rflags: 2 | if input.bool() { 1 << 10 } else { 0 },
        cpl: if input.u8() % 4 == 0 { 3 } else { 0 },
        paging_cr3: if input.u8() % 8 == 0 {
            Some(u64::from(input.below(16)) * 4096)
        } else {
            None
        },
        code,
    };
    let ram = GuardedRam::new(RAM);
    let memory = ram.memory();
    // Something to send, and page tables if paging is on.
    while !input.is_empty() {
        let at = u64::from(input.below((RAM / 8) as u32)) * 8;
        let _ = memory.write_u64(at, input.u64());
    }
    let mut before = vec![0u8; RAM as usize];
    let _ = memory.read(0, &mut before);
    let report = emulate(io, &setup, &memory);

    let bits = if io.address_bits == 0 {
        bits
    } else {
        io.address_bits
    };
    let count = if io.rep { setup.rcx & mask(bits) } else { 1 };
    let moved = report.accesses.len() as u64;
    assert!(
        moved <= MAX_ELEMENTS_PER_EXIT,
        "{moved} elements in one exit"
    );
    assert!(moved <= count, "{moved} elements moved of {count}");
    for access in &report.accesses {
        assert_eq!(
            (access.port, access.size),
            (io.port, io.size),
            "port access"
        );
        assert_eq!(access.out.is_none(), io.input, "direction");
    }
    match report.outcome {
        Outcome::Done => assert_eq!(moved, count, "done after {moved} of {count}"),
        Outcome::Partial => assert!(
            moved == MAX_ELEMENTS_PER_EXIT && count > moved,
            "partial after {moved} of {count}"
        ),
        Outcome::Fault(_) => assert!(moved < count, "fault after all {count}"),
    }
    // RCX: the elements left, in the address size; bits above it as the CPU leaves them.
    let expected_rcx = if io.rep && moved > 0 {
        merged(setup.rcx, count - moved, bits)
    } else {
        setup.rcx
    };
    assert_eq!(report.rcx, expected_rcx, "RCX after {moved} of {count}");
    let backwards = setup.rflags & (1 << 10) != 0;
    let advance = |start: u64, n: u64| {
        if n == 0 {
            return start;
        }
        let delta = n * u64::from(io.size);
        let next = if backwards {
            start.wrapping_sub(delta)
        } else {
            start.wrapping_add(delta)
        };
        merged(start, next, bits)
    };
    let (index_start, index_now, other_start, other_now) = if io.input {
        (setup.rdi, report.rdi, setup.rsi, report.rsi)
    } else {
        (setup.rsi, report.rsi, setup.rdi, report.rdi)
    };
    assert_eq!(index_now, advance(index_start, moved), "index register");
    assert_eq!(other_now, other_start, "the other index register");
    ram.check_guards("string I/O");

    if setup.paging_cr3.is_some() {
        return;
    }
    // Paging off: the linear address is the physical one.
    let seg = if io.input {
        Segment::Es
    } else {
        io.segment.unwrap_or(segment)
    };
    let base = match seg {
        Segment::Fs | Segment::Gs => report.segment_base,
        _ => 0,
    };
    let address_of = |n: u64| {
        let index = advance(index_start, n);
        base.wrapping_add(index & mask(bits))
    };
    let reachable = |n: u64| {
        (0..u64::from(io.size)).all(|i| {
            let a = address_of(n).wrapping_add(i);
            ((a as i64) << 16 >> 16) as u64 == a && a < RAM
        })
    };
    let mut after = vec![0u8; RAM as usize];
    let _ = memory.read(0, &mut after);
    for n in 0..moved {
        assert!(reachable(n), "element {n} moved at {:#x}", address_of(n));
    }
    if let Outcome::Fault(fault) = report.outcome {
        assert!(
            !reachable(moved),
            "fault on element {moved}, which is reachable"
        );
        let first_bad = (0..u64::from(io.size))
            .map(|i| address_of(moved).wrapping_add(i))
            .find(|a| ((*a as i64) << 16 >> 16) as u64 != *a || *a >= RAM);
        let non_canonical = first_bad.is_some_and(|a| ((a as i64) << 16 >> 16) as u64 != a);
        let vector = if non_canonical && seg == Segment::Ss {
            12
        } else {
            13
        };
        assert_eq!(
            (fault.vector, fault.error_code),
            (vector, 0),
            "fault {fault:?}"
        );
    }
    if io.input {
        // Later elements overwrite earlier ones only where addresses repeat: compare the
        // last write of each byte.
        let mut expected = before.clone();
        for n in 0..moved {
            let value = in_value(n as usize).to_le_bytes();
            for i in 0..usize::from(io.size) {
                expected[(address_of(n) + i as u64) as usize] = value[i];
            }
        }
        assert!(
            expected == after,
            "ins wrote other bytes than the elements read"
        );
    } else {
        assert!(before == after, "outs wrote to memory");
        for (n, access) in report.accesses.iter().enumerate() {
            let mut value = [0u8; 4];
            for i in 0..usize::from(io.size) {
                value[i] = before[(address_of(n as u64) + i as u64) as usize];
            }
            assert_eq!(
                access.out,
                Some(u32::from_le_bytes(value)),
                "outs element {n}"
            );
        }
    }
});

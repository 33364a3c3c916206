//! Tests of the vCPU's extended state (docs/abi.md 18.1) and of XCR0 and XSETBV (18.2).
//!
//! This guest is built soft-float: the compiler never touches the x87, SSE or AVX registers,
//! so what a test puts there with inline assembly stays there unless the hypervisor (or another
//! domain, through it) changes it. The isolation tests run as two and three domains at once;
//! each keeps its own pattern in every XMM register (YMM where AVX is offered), the x87
//! control word and MXCSR, yields or blocks, and checks all of them after every return.

use core::arch::{asm, global_asm};

use lamina_guest_sdk::cpuid::cpuid;
use lamina_guest_sdk::start_info;
use lamina_guest_sdk::xstate::{
    self, CR4_OSXSAVE, XCR0_AVX, XCR0_SSE, XCR0_X87, avx_offered, offered_xcr0, xgetbv,
};

use super::common::loopback_port;
use crate::framework::{Hex, Status, check, check_eq, skip};
use crate::x86::{idt, user};
use crate::{hv, shared};
use lamina_abi::Errno;

const UD: u8 = 6;
const GP: u8 = 13;
/// XSETBV and XGETBV are `0F 01 D1` and `0F 01 D0`.
const XSETBV_LEN: u8 = 3;
/// `vaddps ymm2, ymm0, ymm1` is `C5 FC 58 D1`.
const VADDPS_LEN: u8 = 4;
const CPUID1_ECX_OSXSAVE: u32 = 1 << 27;
const FCW_RESET: u16 = 0x037f;
const MXCSR_RESET: u32 = 0x1f80;

// Loads and stores of all 16 XMM (16 bytes each) or YMM (32 bytes each) registers, from and
// to the buffer at RDI.
global_asm!(
    ".section .text.lamina_conf_xstate,\"ax\",@progbits",
    ".global lamina_conf_xmm_load",
    "lamina_conf_xmm_load:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "    movdqu xmm\\n, [rdi + 16 * \\n]",
    ".endr",
    "    ret",
    ".global lamina_conf_xmm_store",
    "lamina_conf_xmm_store:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "    movdqu [rdi + 16 * \\n], xmm\\n",
    ".endr",
    "    ret",
    ".global lamina_conf_ymm_load",
    "lamina_conf_ymm_load:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "    vmovdqu ymm\\n, [rdi + 32 * \\n]",
    ".endr",
    "    ret",
    ".global lamina_conf_ymm_store",
    "lamina_conf_ymm_store:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
    "    vmovdqu [rdi + 32 * \\n], ymm\\n",
    ".endr",
    "    ret",
);

unsafe extern "sysv64" {
    fn lamina_conf_xmm_load(from: *const [u64; 32]);
    fn lamina_conf_xmm_store(to: *mut [u64; 32]);
    fn lamina_conf_ymm_load(from: *const [u64; 64]);
    fn lamina_conf_ymm_store(to: *mut [u64; 64]);
}

fn xmm_load(from: &[u64; 32]) {
    // SAFETY: reads 256 bytes of `from`; changes only XMM registers, which this soft-float
    // program never uses otherwise.
    unsafe { lamina_conf_xmm_load(from) }
}

fn xmm_store() -> [u64; 32] {
    let mut to = [0; 32];
    // SAFETY: writes 256 bytes to `to`.
    unsafe { lamina_conf_xmm_store(&mut to) };
    to
}

/// AVX must be enabled (CR4.OSXSAVE, XCR0 bit 2).
fn ymm_load(from: &[u64; 64]) {
    // SAFETY: reads 512 bytes of `from`; changes only YMM registers, as for `xmm_load`.
    unsafe { lamina_conf_ymm_load(from) }
}

/// AVX must be enabled (CR4.OSXSAVE, XCR0 bit 2).
fn ymm_store() -> [u64; 64] {
    let mut to = [0; 64];
    // SAFETY: writes 512 bytes to `to`.
    unsafe { lamina_conf_ymm_store(&mut to) };
    to
}

fn fcw_load(value: u16) {
    // SAFETY: FLDCW changes only the x87 control word.
    unsafe { asm!("fldcw [{}]", in(reg) &value, options(nostack, readonly, preserves_flags)) };
}

fn fcw_store() -> u16 {
    let mut value = 0u16;
    // SAFETY: FNSTCW writes 2 bytes to `value`.
    unsafe { asm!("fnstcw [{}]", in(reg) &mut value, options(nostack, preserves_flags)) };
    value
}

fn mxcsr_load(value: u32) {
    // SAFETY: LDMXCSR changes only MXCSR; the values used have no reserved bit set.
    unsafe { asm!("ldmxcsr [{}]", in(reg) &value, options(nostack, readonly, preserves_flags)) };
}

fn mxcsr_store() -> u32 {
    let mut value = 0u32;
    // SAFETY: STMXCSR writes 4 bytes to `value`.
    unsafe { asm!("stmxcsr [{}]", in(reg) &mut value, options(nostack, preserves_flags)) };
    value
}

fn osxsave(enabled: bool) {
    // SAFETY: this test's code does not depend on CR4.OSXSAVE.
    unsafe { xstate::set_osxsave(enabled) };
}

/// XSETBV to XCR0 (ECX = `xcr`), expecting no fault; returns what was taken, if anything.
fn try_xsetbv(xcr: u32, value: u64, expected_vector: u8) -> Option<idt::TrapRecord> {
    // SAFETY: the values tried keep x87 and SSE, all this program could rely on; a refused
    // value faults into `expect_trap`, which resumes after the instruction.
    idt::expect_trap(expected_vector, XSETBV_LEN, || unsafe {
        xstate::xsetbv(xcr, value)
    })
}

/// Sets XCR0 to `value`, recording a failure when that faults; returns whether it worked.
fn set_xcr0(value: u64) -> bool {
    let taken = try_xsetbv(0, value, GP);
    check!(
        taken.is_none(),
        "XSETBV(XCR0, {value:#x}) raised {taken:?}, a value the hypervisor offers"
    ) && check_eq!(
        format_args!("XGETBV(0) after XSETBV({value:#x})"),
        Hex(value),
        Hex(xgetbv(0))
    )
}

/// CPUID.(0xD,0):EBX, the XSAVE area for XCR0 as it is, must be what the components give.
fn check_area_size(xcr0: u64) {
    let expected = if xcr0 & XCR0_AVX != 0 {
        let avx = cpuid(0xd, 2);
        (avx.ebx + avx.eax).max(576)
    } else {
        576
    };
    check_eq!(
        format_args!("CPUID.(0xD,0):EBX (XSAVE area bytes) with XCR0 {xcr0:#x}"),
        expected,
        cpuid(0xd, 0).ebx
    );
}

/// The XSAVE features offered, or `None` after recording a skip.
fn xsave_offered() -> Option<u64> {
    let offered = offered_xcr0();
    if offered == 0 {
        skip(format_args!("XSAVE is not offered on this CPU"));
        return None;
    }
    Some(offered)
}

conformance_test! {
    title: "a new vCPU's x87 control word is 0x37f, MXCSR 0x1f80, XMM (and YMM upper halves) 0, CR4.OSFXSR set and OSXSAVE clear, XCR0 x87|SSE; leaf 0xD offers x87, SSE and at most AVX, with the area for XCR0",
    section: "18.1 Extended state (x87, SSE, AVX)",
    expect: Success,
}
pub(super) fn xstate_at_reset() {
    check_eq!(
        "x87 control word at entry",
        Hex(FCW_RESET),
        Hex(fcw_store())
    );
    check_eq!("MXCSR at entry", Hex(MXCSR_RESET), Hex(mxcsr_store()));
    let xmm = xmm_store();
    let dirty = (0..16).find(|&i| xmm[2 * i] != 0 || xmm[2 * i + 1] != 0);
    check!(
        dirty.is_none(),
        "XMM{} is {:#x}:{:#x} at entry, not 0",
        dirty.unwrap_or(0),
        xmm[2 * dirty.unwrap_or(0) + 1],
        xmm[2 * dirty.unwrap_or(0)]
    );
    let cr4 = xstate::read_cr4();
    check_eq!("CR4.OSFXSR at entry", Hex(1u64 << 9), Hex(cr4 & (1 << 9)));
    check_eq!("CR4.OSXSAVE at entry", Hex(0), Hex(cr4 & CR4_OSXSAVE));
    let Some(offered) = xsave_offered() else {
        return;
    };
    check_eq!(
        "CPUID.(0xD,0):EAX bits 0 and 1 (x87, SSE offered)",
        Hex(XCR0_X87 | XCR0_SSE),
        Hex(offered & (XCR0_X87 | XCR0_SSE))
    );
    check_eq!(
        "CPUID.(0xD,0):EAX bits beyond AVX (the hypervisor saves x87, SSE and AVX only)",
        Hex(0),
        Hex(offered & !(XCR0_X87 | XCR0_SSE | XCR0_AVX))
    );
    osxsave(true);
    check_eq!("XCR0 at entry", Hex(XCR0_X87 | XCR0_SSE), Hex(xgetbv(0)));
    check_area_size(XCR0_X87 | XCR0_SSE);
    if avx_offered() && set_xcr0(XCR0_X87 | XCR0_SSE | XCR0_AVX) {
        let ymm = ymm_store();
        let dirty = (0..16).find(|&i| ymm[4 * i + 2] != 0 || ymm[4 * i + 3] != 0);
        check!(
            dirty.is_none(),
            "the upper half of YMM{} is not 0 at entry",
            dirty.unwrap_or(0)
        );
        set_xcr0(XCR0_X87 | XCR0_SSE);
    }
    osxsave(false);
}

conformance_test! {
    title: "CPUID.1:ECX.OSXSAVE is 0 at entry, 1 once CR4.OSXSAVE is set and 0 again when it is cleared; XSAVE is offered where leaf 0xD is",
    section: "18.2 XCR0 and XSETBV",
    expect: Success,
}
pub(super) fn osxsave_mirrored_in_cpuid() {
    check_eq!(
        "CPUID.1:ECX.OSXSAVE with CR4.OSXSAVE clear",
        0,
        cpuid(1, 0).ecx & CPUID1_ECX_OSXSAVE
    );
    if xsave_offered().is_none() {
        return;
    }
    check_eq!(
        "CPUID.1:ECX.XSAVE where leaf 0xD offers features",
        1 << 26,
        cpuid(1, 0).ecx & (1 << 26)
    );
    osxsave(true);
    check_eq!(
        "CPUID.1:ECX.OSXSAVE after setting CR4.OSXSAVE",
        CPUID1_ECX_OSXSAVE,
        cpuid(1, 0).ecx & CPUID1_ECX_OSXSAVE
    );
    osxsave(false);
    check_eq!(
        "CPUID.1:ECX.OSXSAVE after clearing CR4.OSXSAVE again",
        0,
        cpuid(1, 0).ecx & CPUID1_ECX_OSXSAVE
    );
}

conformance_test! {
    title: "XSETBV of x87, x87|SSE and x87|SSE|AVX (where offered) takes effect (XGETBV reads it back) and leaf 0xD EBX follows XCR0",
    section: "18.2 XCR0 and XSETBV",
    expect: Success,
}
pub(super) fn xsetbv_valid_values() {
    let Some(offered) = xsave_offered() else {
        return;
    };
    osxsave(true);
    let mut values = [XCR0_X87, XCR0_X87 | XCR0_SSE, 0, XCR0_X87 | XCR0_SSE];
    if offered & XCR0_AVX != 0 {
        values[2] = XCR0_X87 | XCR0_SSE | XCR0_AVX;
    }
    for value in values.into_iter().filter(|&v| v != 0) {
        if set_xcr0(value) {
            check_area_size(value);
        }
    }
    osxsave(false);
}

conformance_test! {
    title: "XSETBV without x87, AVX without SSE, reserved bit 63, a component not offered, AVX-512, or ECX = 1 raises #GP(0) and XCR0 keeps its value",
    section: "18.2 XCR0 and XSETBV",
    expect: Success,
}
pub(super) fn xsetbv_invalid_values_gp() {
    let Some(offered) = xsave_offered() else {
        return;
    };
    osxsave(true);
    let before = XCR0_X87 | XCR0_SSE;
    let first_unoffered = (3..63).find(|bit| offered & (1 << bit) == 0).unwrap_or(63);
    let cases: [(&str, u32, u64); 7] = [
        ("x87 clear", 0, XCR0_SSE),
        ("x87 clear, with AVX", 0, XCR0_SSE | XCR0_AVX),
        ("AVX without SSE", 0, XCR0_X87 | XCR0_AVX),
        ("reserved bit 63", 0, 1 << 63 | before),
        ("a component not offered", 0, 1 << first_unoffered | before),
        ("AVX-512 (opmask, ZMM)", 0, 0xe0 | XCR0_AVX | before),
        ("ECX = 1 (no such XCR to write)", 1, before),
    ];
    for (what, xcr, value) in cases {
        match try_xsetbv(xcr, value, GP) {
            Some(trap) => {
                check_eq!(
                    format_args!("#GP error code for XSETBV({xcr}, {value:#x}): {what}"),
                    0,
                    trap.error_code
                );
            }
            None => {
                check!(false, "XSETBV({xcr}, {value:#x}) ({what}) raised no #GP");
            }
        }
        check_eq!(
            format_args!("XCR0 after the refused XSETBV({xcr}, {value:#x}): {what}"),
            Hex(before),
            Hex(xgetbv(0))
        );
    }
    osxsave(false);
}

conformance_test! {
    title: "XSETBV at CPL 3 raises #GP(0) and XCR0 keeps its value",
    section: "18.2 XCR0 and XSETBV",
    expect: Success,
}
pub(super) fn xsetbv_at_cpl3_gp() {
    if xsave_offered().is_none() {
        return;
    }
    osxsave(true);
    let mut from_user = None;
    let taken = idt::expect_trap_from_user(GP, XSETBV_LEN, || {
        from_user = Some(user::xsetbv_at_cpl3(XCR0_X87));
    });
    match taken {
        Some(trap) => {
            check_eq!("#GP error code for XSETBV at CPL 3", 0, trap.error_code);
        }
        None => {
            check!(false, "XSETBV at CPL 3 raised no #GP");
        }
    }
    if let Some(back) = from_user {
        check_eq!("CPL of the XSETBV (CS & 3)", 3, back.cs & 3);
    }
    check_eq!(
        "XCR0 after XSETBV at CPL 3",
        Hex(XCR0_X87 | XCR0_SSE),
        Hex(xgetbv(0))
    );
    osxsave(false);
}

conformance_test! {
    title: "XSETBV and XGETBV with CR4.OSXSAVE clear raise #UD; XCR0 keeps its value",
    section: "18.2 XCR0 and XSETBV",
    expect: Success,
}
pub(super) fn xsetbv_without_osxsave_ud() {
    osxsave(false);
    let taken = try_xsetbv(0, XCR0_X87 | XCR0_SSE, UD);
    check!(
        taken.is_some_and(|t| t.vector == UD),
        "XSETBV with CR4.OSXSAVE clear raised {taken:?}, not #UD"
    );
    let taken = idt::expect_trap(UD, XSETBV_LEN, || {
        let _ = xgetbv(0);
    });
    check!(
        taken.is_some(),
        "XGETBV with CR4.OSXSAVE clear raised no #UD"
    );
    if xsave_offered().is_some() {
        osxsave(true);
        check_eq!(
            "XCR0 after the refused XSETBV",
            Hex(XCR0_X87 | XCR0_SSE),
            Hex(xgetbv(0))
        );
        osxsave(false);
    }
}

/// `vaddps ymm2, ymm0, ymm1` on the YMM registers.
fn vaddps() {
    // SAFETY: changes only YMM2 (the loads before and stores after are explicit).
    unsafe {
        asm!(
            "vaddps ymm2, ymm0, ymm1",
            options(nomem, nostack, preserves_flags)
        )
    };
}

conformance_test! {
    title: "VADDPS on YMM raises #UD until XSETBV enables AVX, then adds all eight lanes",
    section: "18.2 XCR0 and XSETBV",
    expect: Success,
}
pub(super) fn avx_after_xsetbv() {
    if !avx_offered() {
        skip(format_args!("AVX is not offered on this CPU"));
        return;
    }
    osxsave(true);
    let taken = idt::expect_trap(UD, VADDPS_LEN, vaddps);
    check!(
        taken.is_some(),
        "VADDPS on YMM with XCR0.AVX clear raised no #UD"
    );
    if !set_xcr0(XCR0_X87 | XCR0_SSE | XCR0_AVX) {
        return;
    }
    // YMM0 = 1.0 .. 8.0, YMM1 = 0.5 .. 7.5 (f32 lanes), as bit patterns.
    let mut input = [0u64; 64];
    let lanes = |f: fn(u32) -> f32| {
        let mut words = [0u64; 4];
        for (i, word) in words.iter_mut().enumerate() {
            let low = f(2 * i as u32).to_bits();
            let high = f(2 * i as u32 + 1).to_bits();
            *word = u64::from(high) << 32 | u64::from(low);
        }
        words
    };
    input[0..4].copy_from_slice(&lanes(|i| (i + 1) as f32));
    input[4..8].copy_from_slice(&lanes(|i| i as f32 + 0.5));
    ymm_load(&input);
    vaddps();
    let out = ymm_store();
    let expected = lanes(|i| (2 * i + 1) as f32 + 0.5);
    for (i, (want, got)) in expected.iter().zip(&out[8..12]).enumerate() {
        check_eq!(
            format_args!("YMM2 lanes {} and {} after VADDPS", 2 * i, 2 * i + 1),
            Hex(*want),
            Hex(*got)
        );
    }
    set_xcr0(XCR0_X87 | XCR0_SSE);
    osxsave(false);
}

// ----- the isolation tests -----

/// How a domain gives up the CPU between two checks.
#[derive(Clone, Copy)]
enum Wait {
    Yield,
    /// Poll on a port nothing raises, until a deadline this far ahead (ns).
    Block(u64),
}

/// What a domain keeps in its registers in round `round`: different in every domain and round.
struct Pattern {
    ymm: [u64; 64],
    fcw: u16,
    mxcsr: u32,
}

impl Pattern {
    fn new(id: u64, round: u64) -> Pattern {
        let mut ymm = [0; 64];
        for (i, word) in ymm.iter_mut().enumerate() {
            *word = id << 56 | round << 16 | (i as u64) << 8 | 0xa5 ^ id;
        }
        // Exceptions masked (bits 0-6), rounding and precision control from id and round
        // (precision 1 is reserved).
        let rc = (id + round) & 3;
        let pc = [0u16, 2, 3][(round % 3) as usize];
        let fcw = 0x007f | (rc as u16) << 10 | pc << 8;
        let mxcsr = MXCSR_RESET | ((id + round) as u32 & 3) << 13 | (round as u32 & 1) << 15;
        Pattern { ymm, fcw, mxcsr }
    }

    /// XMM halves of the YMM words: the low 16 bytes of each register.
    fn xmm(&self) -> [u64; 32] {
        let mut xmm = [0; 32];
        for i in 0..16 {
            xmm[2 * i] = self.ymm[4 * i];
            xmm[2 * i + 1] = self.ymm[4 * i + 1];
        }
        xmm
    }

    fn load(&self, avx: bool) {
        if avx {
            ymm_load(&self.ymm);
        } else {
            xmm_load(&self.xmm());
        }
        fcw_load(self.fcw);
        mxcsr_load(self.mxcsr);
    }

    /// The first register that differs, as "name: expected x, found y".
    fn first_difference(&self, avx: bool) -> Option<([u8; 8], u64, u64)> {
        let fcw = fcw_store();
        if fcw != self.fcw {
            return Some((*b"FCW     ", self.fcw.into(), fcw.into()));
        }
        let mxcsr = mxcsr_store();
        if mxcsr != self.mxcsr {
            return Some((*b"MXCSR   ", self.mxcsr.into(), mxcsr.into()));
        }
        let (found, wanted, per_register): ([u64; 64], [u64; 64], usize) = if avx {
            (ymm_store(), self.ymm, 4)
        } else {
            let mut found = [0; 64];
            let mut wanted = [0; 64];
            found[..32].copy_from_slice(&xmm_store());
            wanted[..32].copy_from_slice(&self.xmm());
            (found, wanted, 2)
        };
        let index = (0..16 * per_register).find(|&i| found[i] != wanted[i])?;
        let register = index / per_register;
        let mut name = *b"XMM00 w0";
        if avx {
            name[0] = b'Y';
        }
        name[3] = b'0' + (register / 10) as u8;
        name[4] = b'0' + (register % 10) as u8;
        name[7] = b'0' + (index % per_register) as u8;
        Some((name, wanted[index], found[index]))
    }
}

/// Keeps a pattern in the registers for `rounds` rounds of giving up the CPU, first with
/// XMM (SSE), then, where AVX is offered, with YMM; checks every register after every return.
fn keep_registers(rounds: u64, wait: Wait) {
    let id = u64::from(start_info().domain_id);
    let port = match wait {
        Wait::Block(_) => match loopback_port() {
            Some(port) => port,
            None => return,
        },
        Wait::Yield => 0,
    };
    let avx_phase = avx_offered();
    if !avx_phase {
        skip(format_args!(
            "AVX is not offered: only XMM, the x87 control word and MXCSR are checked"
        ));
    }
    let mut mismatches = 0u64;
    let mut wait_errors = 0u64;
    for round in 0..rounds {
        let avx = avx_phase && round >= rounds / 2;
        if avx && round == rounds / 2 {
            // SAFETY: this program relies on nothing CR4.OSXSAVE or XCR0 changes.
            if unsafe { xstate::enable_all() } != Some(XCR0_X87 | XCR0_SSE | XCR0_AVX) {
                check!(false, "enabling AVX (CR4.OSXSAVE, XSETBV 7) failed");
                return;
            }
        }
        let pattern = Pattern::new(id, round);
        pattern.load(avx);
        let status = match wait {
            Wait::Yield => hv::sched_yield(),
            Wait::Block(ns) => hv::poll(&[port as u32], shared::now() + ns),
        };
        let timed_out = Status::err(Errno::ETIMEDOUT);
        if status != Status(0) && !(matches!(wait, Wait::Block(_)) && status == timed_out) {
            wait_errors += 1;
        }
        if let Some((name, wanted, found)) = pattern.first_difference(avx) {
            mismatches += 1;
            if mismatches <= 3 {
                check!(
                    false,
                    "round {round}: {} is {found:#x}, not this domain's {wanted:#x}",
                    core::str::from_utf8(&name).unwrap_or("register")
                );
            }
        }
    }
    check_eq!(
        format_args!("rounds of {rounds} whose registers were not this domain's"),
        0,
        mismatches
    );
    check_eq!("refused yields or polls", 0, wait_errors);
}

const YIELD_ROUNDS: u64 = 3000;
const BLOCK_ROUNDS: u64 = 2000;
const BLOCK_NS: u64 = 20_000;

conformance_test! {
    title: "with xstate_kept_yield_b: 3000 yields, each domain's own pattern in XMM0-15 (YMM0-15 in the second half where AVX is offered), the x87 control word and MXCSR, checked after every return: no register is ever another domain's",
    section: "18.1 Extended state (x87, SSE, AVX)",
    expect: Success,
}
pub(super) fn xstate_kept_yield_a() {
    keep_registers(YIELD_ROUNDS, Wait::Yield);
}

conformance_test! {
    title: "with xstate_kept_yield_a: the same, its own pattern",
    section: "18.1 Extended state (x87, SSE, AVX)",
    expect: Success,
}
pub(super) fn xstate_kept_yield_b() {
    keep_registers(YIELD_ROUNDS, Wait::Yield);
}

conformance_test! {
    title: "with xstate_kept_block_b and _c: 2000 polls of 20 us each (blocked, so the others run), its own pattern in XMM/YMM, the x87 control word and MXCSR checked after every return",
    section: "18.1 Extended state (x87, SSE, AVX)",
    expect: Success,
}
pub(super) fn xstate_kept_block_a() {
    keep_registers(BLOCK_ROUNDS, Wait::Block(BLOCK_NS));
}

conformance_test! {
    title: "with xstate_kept_block_a and _c: the same, its own pattern",
    section: "18.1 Extended state (x87, SSE, AVX)",
    expect: Success,
}
pub(super) fn xstate_kept_block_b() {
    keep_registers(BLOCK_ROUNDS, Wait::Block(BLOCK_NS));
}

conformance_test! {
    title: "with xstate_kept_block_a and _b: the same, its own pattern",
    section: "18.1 Extended state (x87, SSE, AVX)",
    expect: Success,
}
pub(super) fn xstate_kept_block_c() {
    keep_registers(BLOCK_ROUNDS, Wait::Block(BLOCK_NS));
}

//! XSETBV and the extended-state policy: `guest_xcr0_mask` on any host CPUID, `xsetbv_fault`
//! against a reference written from the SDM's XSETBV entry (Vol. 2C: #UD without XSAVE or
//! with CR4.OSXSAVE clear; #GP(0) at CPL > 0, for an ECX other than 0, with XCR0[0] clear,
//! with AVX but not SSE, or with a bit the processor does not support: here, one the
//! hypervisor does not offer), `xsave_bytes` on the values accepted. Checked after each input:
//! the mask is 0 or holds x87 and SSE and nothing the hypervisor does not save or the host does
//! not support; an accepted XCR0 is inside the mask; its save area fits the one sized for the
//! mask, and is at least the legacy region and header.
#![no_main]

use lamina_fuzz::common::vcpu::cpuid::CpuidResult;
use lamina_fuzz::common::vcpu::xstate::{
    LEGACY_AND_HEADER_BYTES, XCR0_SAVED, guest_xcr0_mask, xsave_bytes, xsetbv_fault,
};
use lamina_fuzz::input::Input;

const UD: u8 = 6;
const GP: u8 = 13;

fn reference(
    osxsave: bool,
    cpl: u8,
    ecx: u32,
    value: u64,
    offered: u64,
) -> Option<(u8, Option<u32>)> {
    if offered == 0 || !osxsave {
        return Some((UD, None));
    }
    let x87 = value & 1 != 0;
    let sse = value & 2 != 0;
    let avx = value & 4 != 0;
    if cpl > 0 || ecx != 0 || !x87 || (avx && !sse) || value & !offered != 0 {
        return Some((GP, Some(0)));
    }
    None
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // A host CPUID: leaf 0, 1 and 0xd's sub-leaves from the input.
    let max_leaf = if input.bool() {
        0xd + input.below(8)
    } else {
        input.below(0x10)
    };
    let leaf1_ecx = if input.bool() { 1 << 26 } else { input.u32() };
    let supported = if input.bool() {
        [0b11, 0b111, 0xe7, 0x2e7][input.below(4) as usize]
    } else {
        input.u64()
    };
    let mut components = [[0u32; 4]; 64];
    for component in components.iter_mut().skip(2) {
        if input.bool() {
            *component = [u32::from(input.u16()), u32::from(input.u16()), 0, 0];
        }
    }
    let host = |leaf: u32, subleaf: u32| -> CpuidResult {
        match leaf {
            0 => [max_leaf, 0, 0, 0],
            1 => [0, 0, leaf1_ecx, 0],
            0xd if subleaf == 0 => [supported as u32, 0, 0, (supported >> 32) as u32],
            0xd => components.get(subleaf as usize).copied().unwrap_or([0; 4]),
            _ => [0; 4],
        }
    };
    let mask = guest_xcr0_mask(host);
    let offers_xsave = max_leaf >= 0xd && leaf1_ecx & (1 << 26) != 0;
    if mask != 0 {
        assert!(offers_xsave, "a mask without XSAVE");
        assert_eq!(mask & 0b11, 0b11, "mask {mask:#x} without x87 or SSE");
        assert_eq!(mask & !(XCR0_SAVED & supported), 0, "mask {mask:#x}");
    } else {
        assert!(
            !offers_xsave || supported & 0b11 != 0b11,
            "no mask although the host offers x87 and SSE"
        );
    }
    let area = xsave_bytes(mask, host);
    assert!(area >= LEGACY_AND_HEADER_BYTES);
    for _ in 0..16 {
        if input.is_empty() {
            break;
        }
        let osxsave = input.u8() % 8 != 0;
        let cpl = [0, 0, 0, 3, 1][input.below(5) as usize];
        let ecx = if input.u8() % 8 == 0 { input.u32() } else { 0 };
        let value = match input.u8() % 3 {
            0 => input.u64(),
            _ => {
                u64::from(input.u8() & 0x7)
                    | if input.u8() % 8 == 0 {
                        1 << input.below(64)
                    } else {
                        0
                    }
            }
        };
        let fault = xsetbv_fault(osxsave, cpl, ecx, value, mask);
        assert_eq!(
            fault,
            reference(osxsave, cpl, ecx, value, mask),
            "XSETBV {value:#x} ECX {ecx} CPL {cpl} OSXSAVE {osxsave} offered {mask:#x}"
        );
        if fault.is_none() {
            assert_eq!(value & !mask, 0);
            let bytes = xsave_bytes(value, host);
            assert!(
                (LEGACY_AND_HEADER_BYTES..=area).contains(&bytes),
                "XCR0 {value:#x} needs {bytes} bytes, the area for {mask:#x} has {area}"
            );
        }
    }
});

//! The guest page-table walk (reading the instruction at a guest RIP), against a reference
//! walk written from the SDM (Vol. 3A 4.5): same answer, never a read outside the guest's RAM.
#![no_main]

use lamina_fuzz::common::memory::guest_memory::GuestMemory;
use lamina_fuzz::common::memory::guest_paging::{PagingMode, read_code, translate};
use lamina_fuzz::guarded::GuardedRam;
use lamina_fuzz::input::Input;

const RAM: u64 = 1 << 20;

/// The reference: 4-level paging, 1 GiB and 2 MiB pages, every table inside RAM.
fn reference(mem: &GuestMemory, mode: PagingMode, va: u64) -> Option<u64> {
    if !mode.paging {
        return Some(va);
    }
    if !mode.long_mode {
        return None;
    }
    let address = |entry: u64| entry & 0x000f_ffff_ffff_f000;
    let mut table = address(mode.cr3);
    for (level, shift) in [(4u32, 39u32), (3, 30), (2, 21), (1, 12)] {
        let entry = mem.read_u64(table + ((va >> shift) & 0x1ff) * 8).ok()?;
        if entry & 1 == 0 {
            return None;
        }
        let large = entry & 0x80 != 0 && (level == 3 || level == 2);
        if level == 1 || large {
            let offset = va & ((1u64 << shift) - 1);
            return Some((address(entry) & !((1u64 << shift) - 1)) | offset);
        }
        table = address(entry);
    }
    None
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let ram = GuardedRam::new(RAM);
    let mem = ram.memory();
    let mode = PagingMode {
        paging: input.u8() % 8 != 0,
        long_mode: input.u8() % 8 != 0,
        cr3: match input.u8() % 4 {
            0 => input.u64(),
            _ => {
                u64::from(input.below((RAM / 4096) as u32 + 2)) * 4096
                    | u64::from(input.u8() & 0x18)
            }
        },
        write_protect: input.u8() % 2 == 0,
    };
    let va = match input.u8() % 4 {
        0 => input.u64(),
        1 => u64::MAX - u64::from(input.u8()),
        _ => u64::from(input.u32()),
    };
    // Page-table entries planted where the walk may look: (address, entry) pairs.
    while !input.is_empty() {
        let at = u64::from(input.below((RAM / 8) as u32)) * 8;
        let entry = match input.u8() % 4 {
            0 => input.u64(),
            1 => input.u64() & 0x000f_ffff_ffff_f000 % RAM | 0x81,
            _ => u64::from(input.below((RAM / 4096) as u32 + 4)) * 4096 | u64::from(input.u8()),
        };
        let _ = mem.write_u64(at, entry);
    }
    assert_eq!(
        translate(&mem, mode, va),
        reference(&mem, mode, va),
        "va {va:#x} mode {mode:?}"
    );
    let mut code = [0u8; 15];
    let read = read_code(&mem, mode, va, &mut code);
    let expected =
        (0..15u64).all(|i| reference(&mem, mode, va.wrapping_add(i)).is_some_and(|gpa| gpa < RAM));
    assert_eq!(read.is_some(), expected, "read_code at {va:#x}");
    ram.check_guards("the page walk");
});

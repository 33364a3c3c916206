//! The ELF domain builder on any file: a kernel is accepted only inside its RAM's rules, and
//! nothing is ever written outside the RAM (nor, by the loader, outside the image).
#![no_main]

use lamina_abi::layout::{BOOT_AREA_END, KERNEL_MIN_GPA, STACK_BYTES};
use lamina_fuzz::common::domain::builder::{BootParams, load_kernel, write_boot_structures};
use lamina_fuzz::common::time::TimeBase;
use lamina_fuzz::guarded::GuardedRam;

const RAM: u64 = 4 << 20;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let ram = GuardedRam::new(RAM);
    let mem = ram.memory();
    let loaded = load_kernel(data, &mem);
    ram.check_guards("load_kernel");
    let Ok(image) = loaded else {
        return;
    };
    assert!(
        KERNEL_MIN_GPA <= image.start
            && image.start < image.end
            && image.end <= RAM - STACK_BYTES + 0xfff,
        "image {:#x}..{:#x} outside the rules",
        image.start,
        image.end
    );
    assert!(
        (image.start..image.end).contains(&image.entry),
        "entry outside the image"
    );
    // The loader wrote inside the image only.
    assert!(
        ram.zero_outside(image.start & !0xfff..image.end),
        "the loader wrote outside the image"
    );
    let cmdline = String::from_utf8_lossy(&data[..data.len().min(1500)]);
    let params = BootParams {
        domain_id: 1,
        name: &cmdline
            .chars()
            .take(40)
            .filter(char::is_ascii)
            .collect::<String>(),
        cmdline: &cmdline,
        privileged: data.len() % 2 == 0,
        nr_vcpus: 1 + data.len() % 8,
        time: TimeBase::new(1_000_000_000, 0, 0, 0),
    };
    let _ = write_boot_structures(&mem, &image, &params);
    ram.check_guards("write_boot_structures");
    let _ = BOOT_AREA_END;
});

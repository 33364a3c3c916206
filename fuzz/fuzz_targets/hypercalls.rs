//! Every hypercall family, the trapping exits and teardown, on one to three domains (see `world`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lamina_fuzz::world::run(data, None);
});

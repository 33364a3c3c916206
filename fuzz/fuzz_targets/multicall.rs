//! Multicall batches (entries that point into the batch) among every other call.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lamina_fuzz::world::run(data, Some(lamina_abi::Hypercall::Multicall));
});

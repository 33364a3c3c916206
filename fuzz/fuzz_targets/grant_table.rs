//! Grant-table operations across domains: grant, map, unmap, copy, end, teardown with mappings in place.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lamina_fuzz::world::run(data, Some(lamina_abi::Hypercall::GrantTableOp));
});

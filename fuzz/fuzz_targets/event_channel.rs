//! Event-channel operations within and across domains, closes and teardown.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lamina_fuzz::world::run(data, Some(lamina_abi::Hypercall::EventChannelOp));
});

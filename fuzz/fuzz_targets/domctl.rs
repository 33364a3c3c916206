//! Domain control (privileged and not) against live domains: list, console, pause, destroy.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lamina_fuzz::world::run(data, Some(lamina_abi::Hypercall::DomctlOp));
});

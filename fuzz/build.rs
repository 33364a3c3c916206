//! The hypervisor's test support (`#[cfg(any(test, fuzzing))]`) is compiled into this crate,
//! also when it is built without cargo-fuzz (which sets `--cfg fuzzing` itself).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
    println!("cargo::rustc-cfg=fuzzing");
}

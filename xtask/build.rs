//! Generates the conformance catalog xtask boots and judges, from the same
//! `conformance_test!` blocks the conformance kernel is built from (`../conformance`).

#[path = "../conformance/catalog_gen.rs"]
mod catalog_gen;

fn main() {
    let manifest_dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    catalog_gen::generate(&manifest_dir, &out_dir, false);
}

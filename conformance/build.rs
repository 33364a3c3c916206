//! Generates the catalog and the registry of test bodies from the `conformance_test!` blocks
//! in `src/tests/*.rs` (see `catalog_gen.rs`).

#[path = "catalog_gen.rs"]
mod catalog_gen;

fn main() {
    let manifest_dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    catalog_gen::generate(&manifest_dir, &out_dir, true);
}

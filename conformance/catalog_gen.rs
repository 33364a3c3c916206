//! Builds the conformance catalog from the test bodies: a test is declared where it is
//! written, by a `conformance_test!` block right above its function, XTF style:
//!
//! ```text
//! conformance_test! {
//!     title: "VMCALL reaches the hypervisor: version returns the ABI version",
//!     section: "2.1 Hypercall instructions",
//!     expect: Success,
//!     cmdline: "privileged=1", // optional: words after `<name> mem=4M`
//!     output: &["a line it must print whole"], // optional, checked by xtask
//!     only_output: true,       // optional: and no other line than those
//! }
//! pub(super) fn version_via_vmcall() { ... }
//! ```
//!
//! Two build scripts use this file: the conformance kernel's (the catalog and the registry of
//! bodies) and xtask's (the catalog alone, to know which domains to boot and how to judge
//! them). Both read `conformance/src/tests/*.rs`, so the two can never disagree. Tests are
//! ordered by their docs/abi.md section, then by file and position, which keeps the halves of
//! a multi-domain test (`_a`, `_b`) next to each other.
// Shared by two build scripts through `#[path]`; each uses what it needs.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// One declared test, its fields as Rust source text.
#[derive(Debug)]
pub(crate) struct Declared {
    pub(crate) name: String,
    pub(crate) module: String,
    pub(crate) title: String,
    pub(crate) section: String,
    pub(crate) expect: String,
    pub(crate) cmdline: String,
    /// `output:` (lines the test must print whole) and `only_output:` (nothing else), as
    /// source text; `None` when the block has no `output:`.
    pub(crate) output: Option<(String, String)>,
    section_key: Vec<u32>,
    file_order: usize,
}

/// The test files' folder, from a crate directory next to `conformance/`.
pub(crate) fn tests_dir(manifest_dir: &Path) -> PathBuf {
    manifest_dir
        .parent()
        .unwrap_or(manifest_dir)
        .join("conformance/src/tests")
}

/// Every test declared under `dir`, in catalog order; panics with the file and the reason
/// on a malformed declaration (a build script's way to report it).
pub(crate) fn collect(dir: &Path) -> Vec<Declared> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
        .collect();
    files.sort();
    let mut tests = Vec::new();
    for path in &files {
        let module = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if module == "mod" {
            continue;
        }
        let text = fs::read_to_string(path)
            .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
        parse_file(&text, &module, path, &mut tests);
    }
    tests.sort_by(|a, b| {
        a.section_key
            .cmp(&b.section_key)
            .then(a.file_order.cmp(&b.file_order))
    });
    let mut names: Vec<&str> = tests.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
        panic!("conformance test {} is declared twice", pair[0]);
    }
    tests
}

const MARKER: &str = "conformance_test! {";

fn parse_file(text: &str, module: &str, path: &Path, tests: &mut Vec<Declared>) {
    let mut rest = text;
    let mut offset = 0;
    while let Some(at) = rest.find(MARKER) {
        let where_ = || format!("{}:{}", path.display(), line_of(text, offset + at));
        let body_start = at + MARKER.len();
        let Some(close) = rest[body_start..].find("\n}") else {
            panic!("{}: conformance_test! without its closing brace", where_());
        };
        let body = &rest[body_start..body_start + close];
        let after = &rest[body_start + close + 2..];
        // The first item after the block (doc comments and attributes may come between).
        let name = after
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty() && !line.starts_with("//") && !line.starts_with("#["))
            .and_then(|line| line.split_once("fn "))
            .map(|(_, tail)| {
                tail.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| panic!("{}: conformance_test! not followed by a fn", where_()));
        let field = |key: &str| field_value(body, key);
        let required = |key: &str| {
            field(key).unwrap_or_else(|| {
                panic!("{}: conformance_test! of {name} has no `{key}:`", where_())
            })
        };
        let (title, section, expect) = (required("title"), required("section"), required("expect"));
        for (key, value) in [("title", &title), ("section", &section)] {
            if !(value.starts_with('"') && value.ends_with('"') && value.len() >= 2) {
                panic!(
                    "{}: {key} of {name} must be one string literal on its line",
                    where_()
                );
            }
        }
        if !(expect == "Success"
            || expect.starts_with("StoppedByHv(\"")
            || expect.starts_with("Ends(\""))
        {
            panic!(
                "{}: expect of {name} must be Success, StoppedByHv(\"..\") or Ends(\"..\")",
                where_()
            );
        }
        let cmdline = field("cmdline").unwrap_or_else(|| "\"\"".to_string());
        let output = field("output").map(|lines| {
            let only = field("only_output").unwrap_or_else(|| "false".to_string());
            (lines, only)
        });
        let section_key = section
            .trim_matches('"')
            .split_whitespace()
            .next()
            .unwrap_or("")
            .split('.')
            .map(|n| n.parse::<u32>().unwrap_or(u32::MAX))
            .collect();
        tests.push(Declared {
            name,
            module: module.to_string(),
            title,
            section,
            expect,
            cmdline,
            output,
            section_key,
            file_order: tests.len(),
        });
        offset += body_start + close;
        rest = &rest[body_start + close..];
    }
}

/// The value of `key:` in a block: from after the colon to the first comma outside strings and
/// brackets, whitespace and line breaks collapsed (values may span lines).
fn field_value(body: &str, key: &str) -> Option<String> {
    let start = body.lines().find_map(|line| {
        let trimmed = line.trim_start();
        let rest = trimmed.strip_prefix(key)?.trim_start().strip_prefix(':')?;
        // Byte offset of the value within `body`.
        Some(rest.as_ptr() as usize - body.as_ptr() as usize)
    })?;
    let (mut depth, mut in_string, mut escaped) = (0i32, false, false);
    let mut end = body.len();
    for (i, c) in body[start..].char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                end = start + i;
                break;
            }
            _ => {}
        }
    }
    let value: Vec<&str> = body[start..end].lines().map(str::trim).collect();
    Some(
        value
            .join(" ")
            .trim()
            .trim_end_matches(',')
            .trim()
            .to_string(),
    )
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// `CATALOG`'s initializer: a slice expression of `TestInfo` values.
pub(crate) fn catalog_source(tests: &[Declared]) -> String {
    let mut out = String::from("&[\n");
    for t in tests {
        let _ = writeln!(
            out,
            "    TestInfo {{ name: {:?}, title: {}, section: {}, expect: Expect::{}, cmdline_extra: {} }},",
            t.name, t.title, t.section, t.expect, t.cmdline
        );
    }
    out.push(']');
    out
}

/// `EXPECTED_OUTPUT`'s initializer: the tests with an `output:` field.
pub(crate) fn expected_output_source(tests: &[Declared]) -> String {
    let mut out = String::from("&[\n");
    for t in tests {
        if let Some((lines, only)) = &t.output {
            let _ = writeln!(
                out,
                "    ExpectedOutput {{ test: {:?}, lines: {lines}, only: {only} }},",
                t.name
            );
        }
    }
    out.push(']');
    out
}

/// `REGISTRY`'s initializer, in catalog order: `(name, module::function)` pairs.
pub(crate) fn registry_source(tests: &[Declared]) -> String {
    let mut out = String::from("&[\n");
    for t in tests {
        let _ = writeln!(out, "    ({:?}, {}::{}),", t.name, t.module, t.name);
    }
    out.push(']');
    out
}

/// Writes `catalog.rs` (and with `registry`, `registry.rs`) into `out_dir`, and tells cargo
/// to run the build script again when a test file changes.
pub(crate) fn generate(manifest_dir: &Path, out_dir: &Path, registry: bool) {
    let dir = tests_dir(manifest_dir);
    println!("cargo:rerun-if-changed={}", dir.display());
    for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
    let tests = collect(&dir);
    write_if_changed(&out_dir.join("catalog.rs"), &catalog_source(&tests));
    write_if_changed(
        &out_dir.join("expected_output.rs"),
        &expected_output_source(&tests),
    );
    if registry {
        write_if_changed(&out_dir.join("registry.rs"), &registry_source(&tests));
    }
}

fn write_if_changed(path: &Path, contents: &str) {
    if fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return;
    }
    fs::write(path, contents).unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
}

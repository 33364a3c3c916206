//! The module command-line parser: any line gives a configuration inside the documented
//! ranges (README, docs/abi.md 4.4) or an error, and the name is the one `name_of` reports.
#![no_main]

use lamina_abi::layout::{MEM_GRANULE_BYTES, MEM_MAX_BYTES, MEM_MIN_BYTES};
use lamina_fuzz::common::domain::config::{self, NAME_MAX, NAME_SHOWN_MAX};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let index = data.len() % 5;
    let name = config::name_of(&line, index);
    // Messages show a name up to NAME_SHOWN_MAX; a domain's name is at most NAME_MAX, longer
    // ones reject the module (docs/abi.md 4.4).
    assert!(
        !name.is_empty() && name.len() <= NAME_SHOWN_MAX.max(config::default_name(index).len())
    );
    assert!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
        "name {name:?}"
    );
    let Ok(parsed) = config::parse(&line, index) else {
        return;
    };
    assert_eq!(parsed.name, name);
    assert!(parsed.name.len() <= NAME_MAX, "{parsed:?}");
    assert!(
        (MEM_MIN_BYTES..=MEM_MAX_BYTES).contains(&parsed.mem_bytes),
        "{parsed:?}"
    );
    assert_eq!(parsed.mem_bytes % MEM_GRANULE_BYTES, 0, "{parsed:?}");
    assert!((1..=65535).contains(&parsed.weight), "{parsed:?}");
});

//! Parsing a domain's command line (docs/abi.md 4.4).
//!
//! The command line is the boot module's: words separated by ASCII whitespace, no quoting.
//! A word `key=value` sets `key` (the first `=` splits; a later word with the same key wins, as
//! on Linux); a word without `=` is a bare word, such as the domain's name. These functions are
//! pure; [`crate::cmdline()`] and [`crate::cmdline_value()`] apply them to this domain's line.

/// The words of `line`.
pub fn words(line: &str) -> impl Iterator<Item = &str> {
    line.split_ascii_whitespace()
}

/// The value of the last `key=value` word in `line`, if any. `key=` yields `Some("")`.
pub fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    words(line)
        .filter_map(|word| word.split_once('='))
        .filter(|(word_key, _)| *word_key == key)
        .map(|(_, value)| value)
        .last()
}

/// The first word without `=` (by the boot protocol, the domain's name), if any.
pub fn first_bare_word(line: &str) -> Option<&str> {
    words(line).find(|word| !word.contains('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_finds_key_value_words() {
        let line = "console_write_ok mem=16M test=console_write_ok";
        assert_eq!(value(line, "test"), Some("console_write_ok"));
        assert_eq!(value(line, "mem"), Some("16M"));
        assert_eq!(value(line, "missing"), None);
    }

    #[test]
    fn value_ignores_bare_words_and_prefixes() {
        assert_eq!(value("test", "test"), None);
        assert_eq!(value("testing=1 atest=2", "test"), None);
        assert_eq!(value("", "test"), None);
    }

    #[test]
    fn value_takes_the_last_word_and_the_first_equals_sign() {
        assert_eq!(value("a=1 a=2", "a"), Some("2"));
        assert_eq!(value("a=b=c", "a"), Some("b=c"));
        assert_eq!(value("a=", "a"), Some(""));
    }

    #[test]
    fn words_split_on_any_ascii_whitespace() {
        let all: Vec<&str> = words("  dom0\tmem=4M\n  x=y ").collect();
        assert_eq!(all, ["dom0", "mem=4M", "x=y"]);
    }

    #[test]
    fn first_bare_word_is_the_name() {
        assert_eq!(first_bare_word("mem=4M sample extra"), Some("sample"));
        assert_eq!(first_bare_word("mem=4M"), None);
    }
}

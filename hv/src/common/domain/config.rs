//! Boot-module command lines: `<name> key=value ...` (docs/hv-output-protocol.md).
//!
//! The hypervisor reads the domain name, `mem=`, `weight=`, `privileged=`, `vcpus=` and
//! `affinity=`; the whole line also goes to the guest.

use alloc::string::String;
use core::fmt;
use lamina_abi::layout::{MEM_DEFAULT_BYTES, MEM_GRANULE_BYTES, MEM_MAX_BYTES, MEM_MIN_BYTES};

/// Longest domain name (the StartInfo field holds 32 bytes with a NUL); a longer one rejects
/// the module rather than being cut (docs/abi.md 4.4).
pub const NAME_MAX: usize = 31;
/// Longest name shown in a message about a module (names are never longer in a domain).
pub const NAME_SHOWN_MAX: usize = 64;

/// What the hypervisor takes from a module's command line.
#[derive(Debug, PartialEq, Eq)]
pub struct DomainConfig {
    /// The domain's name.
    pub name: String,
    /// RAM size in bytes, rounded up to the large-page granule.
    pub mem_bytes: u64,
    /// May read and (later) control other domains: `privileged=1`.
    pub privileged: bool,
    /// Scheduling weight: CPU time is shared in proportion (`weight=`, 1..=65535).
    pub weight: u32,
    /// Number of vCPUs (`vcpus=`, 1..=[`MAX_VCPUS`]); vCPU 0 starts, the others are brought
    /// up by the guest (docs/abi.md 19).
    pub vcpus: usize,
    /// The physical CPUs its vCPUs may run on, a bit per CPU index (`affinity=`; every CPU
    /// unless told).
    pub affinity: u64,
}

/// Every CPU: the affinity of a domain whose command line names none.
pub const ANY_CPU: u64 = u64::MAX;

/// Highest CPU index `affinity=` can name.
pub const CPU_INDEX_MAX: u32 = 63;

/// Most vCPUs a domain can have: the slots of the shared-info page.
pub const MAX_VCPUS: usize = lamina_abi::shared_info::MAX_VCPUS;

/// Weight of a domain whose command line names none.
pub const DEFAULT_WEIGHT: u32 = 256;

/// Why a command line was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `mem=` is not a number with an optional K/M/G suffix.
    BadMemSize,
    /// `mem=` is outside the supported range.
    MemOutOfRange(u64),
    /// `privileged=` is not 0 or 1.
    BadPrivileged,
    /// `weight=` is not a number in 1..=65535.
    BadWeight,
    /// `vcpus=` is not a number from 1 to [`MAX_VCPUS`].
    BadVcpus,
    /// `affinity=` is not a list of CPU indices and ranges (`0`, `1-3`, `0,2-3`).
    BadAffinity,
    /// The name is longer than [`NAME_MAX`] bytes (its length).
    NameTooLong(usize),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::BadMemSize => write!(f, "mem= is not a size like 16M"),
            ConfigError::BadPrivileged => write!(f, "privileged= is not 0 or 1"),
            ConfigError::BadWeight => write!(f, "weight= is not a number from 1 to 65535"),
            ConfigError::BadVcpus => write!(f, "vcpus= is not a number from 1 to {MAX_VCPUS}"),
            ConfigError::BadAffinity => write!(
                f,
                "affinity= is not a list of CPUs from 0 to {CPU_INDEX_MAX} like 0,2-3"
            ),
            ConfigError::NameTooLong(len) => write!(
                f,
                "the domain name is {len} bytes long, more than {NAME_MAX} (StartInfo.name holds {NAME_MAX})"
            ),
            ConfigError::MemOutOfRange(bytes) => write!(
                f,
                "mem={}K is outside {}M..{}M",
                bytes >> 10,
                MEM_MIN_BYTES >> 20,
                MEM_MAX_BYTES >> 20
            ),
        }
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value: u64 = digits.parse().ok()?;
    value.checked_mul(1 << shift)
}

/// Plain decimal: digits, no sign, no leading zero.
fn parse_plain(text: &str) -> Option<u32> {
    let valid = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if valid { text.parse().ok() } else { None }
}

/// A CPU list as `affinity=` takes it: indices and inclusive ranges, comma-separated
/// (`0`, `1-3`, `0,2-3`), each from 0 to [`CPU_INDEX_MAX`]; a bit per CPU.
pub fn parse_cpu_list(text: &str) -> Option<u64> {
    let mut mask = 0u64;
    for part in text.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (parse_plain(first)?, parse_plain(last)?),
            None => (parse_plain(part)?, parse_plain(part)?),
        };
        if first > last || last > CPU_INDEX_MAX {
            return None;
        }
        for cpu in first..=last {
            mask |= 1 << cpu;
        }
    }
    Some(mask)
}

/// A set of CPUs, shown as `affinity=` takes it (`0-1,3`; `none` when empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuList(pub u64);

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return write!(f, "none");
        }
        let mut rest = self.0;
        let mut first_range = true;
        while rest != 0 {
            let start = rest.trailing_zeros();
            // The run of ones from `start`.
            let run = (!(rest >> start)).trailing_zeros();
            let end = start + run - 1;
            if !first_range {
                write!(f, ",")?;
            }
            first_range = false;
            if run == 1 {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            rest = if end >= 63 {
                0
            } else {
                rest & !((2u64 << end) - 1)
            };
        }
        Ok(())
    }
}

/// The name a module gets when its command line names none.
pub fn default_name(index: usize) -> String {
    alloc::format!("module{index}")
}

/// Keeps the characters a name may have (letters, digits, `-`, `_`, `.`), at most `limit`.
fn sanitize_name(raw: &str, limit: usize) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(limit)
        .collect()
}

fn raw_name(cmdline: &str) -> Option<&str> {
    let explicit = cmdline
        .split_whitespace()
        .find_map(|t| t.strip_prefix("name="));
    explicit.or_else(|| cmdline.split_whitespace().find(|t| !t.contains('=')))
}

/// The name alone, as messages show it even when the line is bad (a name too long for a
/// domain is shown whole, up to 64 characters).
pub fn name_of(cmdline: &str, index: usize) -> String {
    let name = raw_name(cmdline)
        .map(|raw| sanitize_name(raw, NAME_SHOWN_MAX))
        .unwrap_or_default();
    if name.is_empty() {
        default_name(index)
    } else {
        name
    }
}

/// Parses a module command line; `index` numbers the module for the default name.
pub fn parse(cmdline: &str, index: usize) -> Result<DomainConfig, ConfigError> {
    let mut mem_bytes = MEM_DEFAULT_BYTES;
    let mut privileged = false;
    let mut weight = DEFAULT_WEIGHT;
    let mut vcpus = 1;
    let mut affinity = ANY_CPU;
    if let Some(raw) = raw_name(cmdline) {
        let len = sanitize_name(raw, usize::MAX).len();
        if len > NAME_MAX {
            return Err(ConfigError::NameTooLong(len));
        }
    }
    for token in cmdline.split_whitespace() {
        if let Some(count) = token.strip_prefix("vcpus=") {
            // Plain decimal: no sign, no leading zero.
            vcpus = match count.parse::<usize>() {
                Ok(n @ 1..=MAX_VCPUS) if !count.starts_with(['0', '+']) => n,
                _ => return Err(ConfigError::BadVcpus),
            };
        }
        if let Some(list) = token.strip_prefix("affinity=") {
            affinity = parse_cpu_list(list).ok_or(ConfigError::BadAffinity)?;
        }
        if let Some(value) = token.strip_prefix("weight=") {
            weight = match value.parse::<u32>() {
                Ok(w @ 1..=65535) => w,
                _ => return Err(ConfigError::BadWeight),
            };
        }
        if let Some(flag) = token.strip_prefix("privileged=") {
            privileged = match flag {
                "0" => false,
                "1" => true,
                _ => return Err(ConfigError::BadPrivileged),
            };
        }
        if let Some(size) = token.strip_prefix("mem=") {
            let bytes = parse_size(size).ok_or(ConfigError::BadMemSize)?;
            if !(MEM_MIN_BYTES..=MEM_MAX_BYTES).contains(&bytes) {
                return Err(ConfigError::MemOutOfRange(bytes));
            }
            mem_bytes = bytes.div_ceil(MEM_GRANULE_BYTES) * MEM_GRANULE_BYTES;
        }
    }
    Ok(DomainConfig {
        name: name_of(cmdline, index),
        mem_bytes,
        privileged,
        weight,
        vcpus,
        affinity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_and_memory_come_from_the_command_line() {
        let c = parse("ping mem=8M test=x", 1).unwrap();
        assert_eq!((c.name.as_str(), c.mem_bytes), ("ping", 8 << 20));
        let c = parse("name=pong mem=5M", 2).unwrap();
        assert_eq!(
            (c.name.as_str(), c.mem_bytes),
            ("pong", 6 << 20),
            "rounded up to 2 MiB"
        );
        let c = parse("ctl privileged=1", 4).unwrap();
        assert!(c.privileged);
        assert_eq!(
            parse("x privileged=yes", 1),
            Err(ConfigError::BadPrivileged)
        );
        let c = parse("", 3).unwrap();
        assert!(!c.privileged);
        assert_eq!(
            (c.name.as_str(), c.mem_bytes),
            ("module3", MEM_DEFAULT_BYTES)
        );
    }

    #[test]
    fn affinity_takes_cpu_lists_and_refuses_the_rest() {
        assert_eq!(parse("d", 1).unwrap().affinity, ANY_CPU);
        assert_eq!(parse("d affinity=1", 1).unwrap().affinity, 0b10);
        assert_eq!(parse("d affinity=0,2-3", 1).unwrap().affinity, 0b1101);
        assert_eq!(parse("d affinity=63", 1).unwrap().affinity, 1 << 63);
        for bad in [
            "", "64", "-1", "1-", "3-1", "01", "+1", "1,,2", "a", "0-64", "0x1", "1,",
        ] {
            assert_eq!(
                parse(&format!("d affinity={bad}"), 1),
                Err(ConfigError::BadAffinity),
                "affinity={bad}"
            );
        }
    }

    #[test]
    fn cpu_lists_show_as_ranges() {
        for (mask, shown) in [
            (0u64, "none"),
            (0b1, "0"),
            (0b11, "0-1"),
            (0b1101, "0,2-3"),
            (1 << 63, "63"),
            (u64::MAX, "0-63"),
            ((1 << 63) | 0b101, "0,2,63"),
        ] {
            assert_eq!(CpuList(mask).to_string(), shown);
            if mask != 0 {
                assert_eq!(parse_cpu_list(shown), Some(mask), "{shown} round trip");
            }
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert_eq!(parse("x mem=lots", 1), Err(ConfigError::BadMemSize));
        assert_eq!(
            parse("x mem=1M", 1),
            Err(ConfigError::MemOutOfRange(1 << 20))
        );
        assert_eq!(
            parse("x mem=2G", 1),
            Err(ConfigError::MemOutOfRange(2 << 30))
        );
        assert_eq!(
            parse("x mem=99999999999999999999G", 1),
            Err(ConfigError::BadMemSize)
        );
    }

    #[test]
    fn vcpus_accepts_one_to_eight() {
        assert_eq!(parse("x", 1).map(|c| c.vcpus), Ok(1));
        for n in 1..=8 {
            assert_eq!(parse(&format!("x vcpus={n}"), 1).map(|c| c.vcpus), Ok(n));
        }
        for bad in [
            "vcpus=9",
            "vcpus=0",
            "vcpus=",
            "vcpus=01",
            "vcpus=+2",
            "vcpus=one",
        ] {
            assert_eq!(
                parse(&format!("x {bad}"), 1),
                Err(ConfigError::BadVcpus),
                "{bad}"
            );
        }
        assert_eq!(
            ConfigError::BadVcpus.to_string(),
            "vcpus= is not a number from 1 to 8"
        );
    }

    #[test]
    fn names_are_sanitized_and_bounded() {
        assert_eq!(name_of("we;ird/name mem=4M", 1), "weirdname");
        assert_eq!(
            name_of(&"a".repeat(100), 1).len(),
            64,
            "shown whole, up to 64"
        );
        assert_eq!(parse(&"a".repeat(31), 1).unwrap().name, "a".repeat(31));
        assert_eq!(
            parse(&format!("{} mem=4M", "b".repeat(32)), 1),
            Err(ConfigError::NameTooLong(32))
        );
        assert_eq!(
            parse(&format!("name={}", "c".repeat(40)), 1),
            Err(ConfigError::NameTooLong(40))
        );
        assert_eq!(
            ConfigError::NameTooLong(40).to_string(),
            "the domain name is 40 bytes long, more than 31 (StartInfo.name holds 31)"
        );
    }
}

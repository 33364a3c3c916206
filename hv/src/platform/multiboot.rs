//! Reading the Multiboot2 boot information GRUB leaves in memory.
//!
//! Only the tags the hypervisor needs are decoded: the command line (type 1), boot modules
//! (type 3), the memory map (type 6) and the copies of the ACPI RSDP (types 14 and 15)
//! (Multiboot2 specification 3.6). The parser
//! works on a byte slice with every offset bounds-checked, so it is unit-tested on the host.

/// The magic value GRUB passes in EAX.
pub const BOOTLOADER_MAGIC: u32 = 0x36d7_6289;

const TAG_END: u32 = 0;
const TAG_CMDLINE: u32 = 1;
const TAG_MODULE: u32 = 3;
const TAG_MEMORY_MAP: u32 = 6;
const TAG_ACPI_OLD_RSDP: u32 = 14;
const TAG_ACPI_NEW_RSDP: u32 = 15;
const MEMORY_AVAILABLE: u32 = 1;
/// An ACPI 1.0 RSDP is 20 bytes (ACPI 6.5 5.2.5.3).
const RSDP_V1_BYTES: usize = 20;

/// A boot module: a physical byte range and its command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module<'a> {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The text after the file name on the `module2` line.
    pub cmdline: &'a str,
}

/// A RAM range the firmware reports as available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The decoded boot information (borrowing its text from the original bytes).
#[derive(Debug, Default)]
pub struct BootInfo<'a> {
    /// The hypervisor's own command line.
    pub cmdline: &'a str,
    /// Boot modules in GRUB order.
    pub modules: heapless_vec::Vec<Module<'a>, 256>,
    /// Available RAM.
    pub ram: heapless_vec::Vec<RamRange, 64>,
    /// GRUB's copy of the ACPI RSDP, the ACPI 2.0+ one (tag 15) when there is one, else the
    /// 1.0 one (tag 14). Its address is where the ACPI tables parser starts.
    pub acpi_rsdp: Option<&'a [u8]>,
}

/// What is wrong with the boot information.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than its header or its own total size.
    Truncated,
    /// A tag runs past the end.
    BadTag(u32),
    /// More modules or RAM ranges than the tables hold.
    TooMany,
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn c_string(bytes: &[u8]) -> &str {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..len]).unwrap_or("")
}

/// Decodes the boot information in `bytes` (which starts at its `total_size` field).
pub fn parse(bytes: &[u8]) -> Result<BootInfo<'_>, ParseError> {
    let total = read_u32(bytes, 0).ok_or(ParseError::Truncated)? as usize;
    let bytes = bytes.get(..total).ok_or(ParseError::Truncated)?;
    let mut info = BootInfo::default();
    let mut at = 8;
    while at + 8 <= bytes.len() {
        let tag = read_u32(bytes, at).ok_or(ParseError::Truncated)?;
        let size = read_u32(bytes, at + 4).ok_or(ParseError::Truncated)? as usize;
        if tag == TAG_END {
            break;
        }
        let body = bytes
            .get(at + 8..at + size.max(8))
            .ok_or(ParseError::BadTag(tag))?;
        match tag {
            TAG_CMDLINE => info.cmdline = c_string(body),
            TAG_MODULE => {
                let start = read_u32(body, 0).ok_or(ParseError::BadTag(tag))?;
                let end = read_u32(body, 4).ok_or(ParseError::BadTag(tag))?;
                let module = Module {
                    start: start.into(),
                    end: end.max(start).into(),
                    cmdline: c_string(body.get(8..).unwrap_or(&[])),
                };
                info.modules.push(module).map_err(|_| ParseError::TooMany)?;
            }
            TAG_MEMORY_MAP => {
                let entry_size = read_u32(body, 0).ok_or(ParseError::BadTag(tag))? as usize;
                if entry_size < 24 {
                    return Err(ParseError::BadTag(tag));
                }
                let mut entry = 8;
                while entry + entry_size <= body.len() {
                    let start = read_u64(body, entry).ok_or(ParseError::BadTag(tag))?;
                    let len = read_u64(body, entry + 8).ok_or(ParseError::BadTag(tag))?;
                    let kind = read_u32(body, entry + 16).ok_or(ParseError::BadTag(tag))?;
                    if kind == MEMORY_AVAILABLE {
                        info.ram
                            .push(RamRange { start, len })
                            .map_err(|_| ParseError::TooMany)?;
                    }
                    entry += entry_size;
                }
            }
            TAG_ACPI_NEW_RSDP if body.len() >= RSDP_V1_BYTES => info.acpi_rsdp = Some(body),
            TAG_ACPI_OLD_RSDP if body.len() >= RSDP_V1_BYTES && info.acpi_rsdp.is_none() => {
                info.acpi_rsdp = Some(body);
            }
            _ => {}
        }
        at += (size + 7) & !7;
    }
    Ok(info)
}

/// A fixed-capacity vector, so the boot information can be read before the heap exists.
pub mod heapless_vec {
    /// Up to `N` items of `T`, stored inline.
    #[derive(Debug)]
    pub struct Vec<T, const N: usize> {
        items: [Option<T>; N],
        len: usize,
    }

    impl<T, const N: usize> Default for Vec<T, N> {
        fn default() -> Self {
            Vec {
                items: [const { None }; N],
                len: 0,
            }
        }
    }

    impl<T, const N: usize> Vec<T, N> {
        /// Appends, or gives the item back when full.
        pub fn push(&mut self, item: T) -> Result<(), T> {
            match self.items.get_mut(self.len) {
                Some(slot) => {
                    *slot = Some(item);
                    self.len += 1;
                    Ok(())
                }
                None => Err(item),
            }
        }

        /// The items in order.
        pub fn iter(&self) -> impl Iterator<Item = &T> {
            self.items[..self.len].iter().filter_map(Option::as_ref)
        }

        /// Number of items.
        pub fn len(&self) -> usize {
            self.len
        }

        /// True when empty.
        pub fn is_empty(&self) -> bool {
            self.len == 0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(out: &mut std::vec::Vec<u8>, kind: u32, body: &[u8]) {
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
    }

    fn boot_info() -> std::vec::Vec<u8> {
        let mut out = vec![0u8; 8];
        tag(&mut out, TAG_CMDLINE, b"loglevel=debug\0");
        let mut module = std::vec::Vec::new();
        module.extend_from_slice(&0x40_0000u32.to_le_bytes());
        module.extend_from_slice(&0x40_1000u32.to_le_bytes());
        module.extend_from_slice(b"ping mem=8M\0");
        tag(&mut out, TAG_MODULE, &module);
        let mut map = std::vec::Vec::new();
        map.extend_from_slice(&24u32.to_le_bytes());
        map.extend_from_slice(&0u32.to_le_bytes());
        for (start, len, kind) in [
            (0u64, 0x9fc00u64, 1u32),
            (0x10_0000, 0x7ef_0000, 1),
            (0xfffc_0000, 0x4_0000, 2),
        ] {
            map.extend_from_slice(&start.to_le_bytes());
            map.extend_from_slice(&len.to_le_bytes());
            map.extend_from_slice(&kind.to_le_bytes());
            map.extend_from_slice(&0u32.to_le_bytes());
        }
        tag(&mut out, TAG_MEMORY_MAP, &map);
        tag(&mut out, TAG_END, &[]);
        let total = out.len() as u32;
        out[..4].copy_from_slice(&total.to_le_bytes());
        out
    }

    #[test]
    fn decodes_cmdline_modules_and_available_ram() {
        let bytes = boot_info();
        let info = parse(&bytes).unwrap();
        assert_eq!(info.cmdline, "loglevel=debug");
        let modules: std::vec::Vec<_> = info.modules.iter().copied().collect();
        assert_eq!(
            modules,
            [Module {
                start: 0x40_0000,
                end: 0x40_1000,
                cmdline: "ping mem=8M"
            }]
        );
        assert_eq!(info.ram.len(), 2, "reserved ranges are left out");
        assert_eq!(info.acpi_rsdp, None);
    }

    fn with_rsdp_tags(tags: &[(u32, &[u8])]) -> std::vec::Vec<u8> {
        let mut out = vec![0u8; 8];
        for (kind, body) in tags {
            tag(&mut out, *kind, body);
        }
        tag(&mut out, TAG_END, &[]);
        let total = out.len() as u32;
        out[..4].copy_from_slice(&total.to_le_bytes());
        out
    }

    #[test]
    fn the_acpi_2_rsdp_is_preferred_whatever_the_order() {
        let old = [1u8; 20];
        let new = [2u8; 36];
        for tags in [
            [(TAG_ACPI_OLD_RSDP, &old[..]), (TAG_ACPI_NEW_RSDP, &new[..])],
            [(TAG_ACPI_NEW_RSDP, &new[..]), (TAG_ACPI_OLD_RSDP, &old[..])],
        ] {
            let bytes = with_rsdp_tags(&tags);
            assert_eq!(parse(&bytes).unwrap().acpi_rsdp, Some(&new[..]));
        }
        let bytes = with_rsdp_tags(&[(TAG_ACPI_OLD_RSDP, &old[..])]);
        assert_eq!(parse(&bytes).unwrap().acpi_rsdp, Some(&old[..]));
        // Shorter than any RSDP: ignored.
        let bytes = with_rsdp_tags(&[(TAG_ACPI_OLD_RSDP, &old[..19])]);
        assert_eq!(parse(&bytes).unwrap().acpi_rsdp, None);
    }

    #[test]
    fn truncated_information_is_an_error_not_a_panic() {
        let bytes = boot_info();
        for cut in 0..bytes.len() {
            let mut copy = bytes[..cut].to_vec();
            if copy.len() >= 4 {
                copy[..4].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            }
            let _ = parse(&copy);
        }
        let mut bad = bytes.clone();
        bad[8 + 4..8 + 8].copy_from_slice(&0xffffu32.to_le_bytes());
        assert_eq!(parse(&bad).unwrap_err(), ParseError::BadTag(TAG_CMDLINE));
    }
}

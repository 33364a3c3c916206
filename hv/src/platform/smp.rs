//! Finding and starting the machine's other CPUs (the application processors, APs).
//!
//! The boot CPU reads the CPUs from the ACPI MADT, then starts each AP in turn with
//! INIT-SIPI-SIPI (Intel SDM Vol. 3A 9.4.4.1) into a real-mode trampoline copied to
//! [`TRAMPOLINE_PHYS`]. The trampoline turns on long mode on the hypervisor's own page tables
//! and calls `ap_entry` on the AP's own stack with its [`PerCpu`](super::percpu::PerCpu), as
//! the data block at the trampoline's end ([`TrampolineData`]) says. `cpus=N` on the
//! hypervisor's command line limits how many CPUs are used (the boot CPU included).
//!
//! This file holds what can be tested on the host; `smp/bringup.rs` talks to the hardware.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

#[cfg(target_os = "none")]
mod bringup;
#[cfg(target_os = "none")]
pub use bringup::*;

/// Where the trampoline runs: the STARTUP IPI's vector is its page number (SDM Vol. 3A 9.4.4).
pub const TRAMPOLINE_PHYS: u64 = 0x8000;
/// The trampoline fits one page.
pub const TRAMPOLINE_MAX_BYTES: usize = 4096;

/// MADT Local APIC / x2APIC flags (ACPI 6.5 5.2.12.2): usable now.
const MADT_ENABLED: u32 = 1 << 0;
/// An xAPIC id addresses at most 255 CPUs; 0xff is the broadcast id.
const XAPIC_MAX_ID: u32 = 0xfe;

/// A processor as the MADT lists it (Processor Local APIC or Local x2APIC structure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MadtProcessor {
    /// Its local APIC id.
    pub apic_id: u32,
    /// The structure's flags: bit 0 enabled, bit 1 online capable.
    pub flags: u32,
}

/// `cpus=N` from the hypervisor's command line: `Ok(None)` when absent (use them all), an
/// error for anything but a positive number.
pub fn cpus_from_cmdline(cmdline: &str) -> Result<Option<usize>, String> {
    let Some(value) = cmdline
        .split_whitespace()
        .find_map(|token| token.strip_prefix("cpus="))
    else {
        return Ok(None);
    };
    match value.parse::<usize>() {
        Ok(count) if count > 0 => Ok(Some(count)),
        _ => Err(alloc::format!(
            "cpus={value}: expected a number of CPUs, at least 1"
        )),
    }
}

/// The APIC ids of the APs to start, in MADT order: enabled processors other than the boot
/// CPU, each once, that an xAPIC can address, until `limit` CPUs (the boot CPU included).
/// Processors that are only "online capable" would need hot-plug: they are left alone.
pub fn select_application_processors(
    listed: impl IntoIterator<Item = MadtProcessor>,
    boot_apic_id: u32,
    limit: usize,
) -> Vec<u8> {
    let mut chosen: Vec<u8> = Vec::new();
    for processor in listed {
        if chosen.len() + 1 >= limit {
            break;
        }
        let usable = processor.flags & MADT_ENABLED != 0
            && processor.apic_id != boot_apic_id
            && processor.apic_id <= XAPIC_MAX_ID;
        if let Ok(id) = u8::try_from(processor.apic_id)
            && usable
            && !chosen.contains(&id)
        {
            chosen.push(id);
        }
    }
    chosen
}

/// The trampoline's data block, written by the boot CPU before each STARTUP IPI. Its layout
/// is the `.quad`s at `ap_trampoline_data` in `smp/bringup.rs`, in this order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct TrampolineData {
    /// The page tables to turn paging on with (the boot CPU's CR3; below 4 GiB).
    pub cr3: u64,
    /// The AP's stack top.
    pub stack_top: u64,
    /// The AP's `PerCpu`, passed as the first argument of `entry`.
    pub percpu: u64,
    /// `extern "C" fn(&'static PerCpu) -> !` to call in long mode.
    pub entry: u64,
}
const _: () = {
    assert!(core::mem::size_of::<TrampolineData>() == 32);
    assert!(core::mem::offset_of!(TrampolineData, cr3) == 0);
    assert!(core::mem::offset_of!(TrampolineData, stack_top) == 8);
    assert!(core::mem::offset_of!(TrampolineData, percpu) == 16);
    assert!(core::mem::offset_of!(TrampolineData, entry) == 24);
};

/// Writes `data` into the copied trampoline `image`, whose data block starts at
/// `data_offset` and ends the image. Errors describe a trampoline that does not match
/// [`TrampolineData`].
pub fn write_trampoline_data(
    image: &mut [u8],
    data_offset: usize,
    data: &TrampolineData,
) -> Result<(), String> {
    let size = core::mem::size_of::<TrampolineData>();
    if image.len() > TRAMPOLINE_MAX_BYTES
        || !data_offset.is_multiple_of(8)
        || data_offset.checked_add(size) != Some(image.len())
    {
        return Err(alloc::format!(
            "trampoline of {} bytes with its data block at {data_offset}",
            image.len()
        ));
    }
    let words = [data.cr3, data.stack_top, data.percpu, data.entry];
    for (i, word) in words.iter().enumerate() {
        let at = data_offset + i * 8;
        image[at..at + 8].copy_from_slice(&word.to_le_bytes());
    }
    Ok(())
}

/// Whether the trampoline's page is RAM (`ram`: start and length of available ranges) and
/// clear of everything in `in_use` (`[start, end)` ranges the hypervisor still needs).
pub fn trampoline_page_is_free(ram: &[(u64, u64)], in_use: &[(u64, u64)]) -> bool {
    let (start, end) = (
        TRAMPOLINE_PHYS,
        TRAMPOLINE_PHYS + TRAMPOLINE_MAX_BYTES as u64,
    );
    let in_ram = ram
        .iter()
        .any(|&(ram_start, len)| ram_start <= start && end <= ram_start.saturating_add(len));
    let clear = in_use
        .iter()
        .all(|&(used_start, used_end)| used_end <= start || end <= used_start);
    in_ram && clear
}

/// The short name of a backend (`"AMD-V (SVM + NPT)"` -> `"AMD-V"`), for the per-CPU lines.
pub fn short_name(name: &str) -> String {
    name.split(" (").next().unwrap_or(name).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(apic_id: u32) -> MadtProcessor {
        MadtProcessor {
            apic_id,
            flags: MADT_ENABLED,
        }
    }

    #[test]
    fn cpus_on_the_command_line() {
        assert_eq!(cpus_from_cmdline(""), Ok(None));
        assert_eq!(cpus_from_cmdline("loglevel=debug"), Ok(None));
        assert_eq!(cpus_from_cmdline("trace=1 cpus=2"), Ok(Some(2)));
        assert_eq!(cpus_from_cmdline("cpus=1"), Ok(Some(1)));
        assert_eq!(
            cpus_from_cmdline("cpus=3 cpus=1"),
            Ok(Some(3)),
            "the first one counts"
        );
        for bad in ["cpus=0", "cpus=", "cpus=two", "cpus=-1", "cpus=2x"] {
            assert!(cpus_from_cmdline(bad).is_err(), "{bad}");
        }
        // Another option whose name ends in "cpus" is not this one.
        assert_eq!(cpus_from_cmdline("maxcpus=4"), Ok(None));
    }

    #[test]
    fn the_boot_cpu_disabled_and_duplicate_entries_are_left_out() {
        let listed = [
            enabled(0),
            enabled(2),
            MadtProcessor {
                apic_id: 4,
                flags: 0b10, // online capable only: hot-plug
            },
            MadtProcessor {
                apic_id: 5,
                flags: 0,
            },
            enabled(2),
            enabled(1),
        ];
        assert_eq!(select_application_processors(listed, 0, 64), [2, 1]);
        // The boot CPU need not be the first listed.
        assert_eq!(select_application_processors(listed, 2, 64), [0, 1]);
    }

    #[test]
    fn the_limit_counts_the_boot_cpu() {
        let listed = [enabled(0), enabled(1), enabled(2), enabled(3)];
        assert!(select_application_processors(listed, 0, 1).is_empty());
        assert_eq!(select_application_processors(listed, 0, 2), [1]);
        assert_eq!(select_application_processors(listed, 0, 3), [1, 2]);
        assert_eq!(select_application_processors(listed, 0, 100), [1, 2, 3]);
    }

    #[test]
    fn ids_an_xapic_cannot_address_are_skipped() {
        let listed = [enabled(0), enabled(0xff), enabled(0x100), enabled(0xfe)];
        assert_eq!(select_application_processors(listed, 0, 64), [0xfe]);
    }

    #[test]
    fn the_data_block_is_written_little_endian_at_its_offset() {
        let mut image = vec![0xccu8; 64 + 32];
        let data = TrampolineData {
            cr3: 0x1000,
            stack_top: 0x2000_0000,
            percpu: 0x0102_0304_0506_0708,
            entry: 0x10_0040,
        };
        write_trampoline_data(&mut image, 64, &data).unwrap();
        assert!(
            image[..64].iter().all(|&b| b == 0xcc),
            "the code is untouched"
        );
        assert_eq!(image[64..72], 0x1000u64.to_le_bytes());
        assert_eq!(image[72..80], 0x2000_0000u64.to_le_bytes());
        assert_eq!(image[80..88], [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(image[88..96], 0x10_0040u64.to_le_bytes());
    }

    #[test]
    fn a_trampoline_that_does_not_match_the_block_is_refused() {
        let data = TrampolineData::default();
        let mut image = vec![0u8; 96];
        assert!(
            write_trampoline_data(&mut image, 60, &data).is_err(),
            "misaligned"
        );
        assert!(
            write_trampoline_data(&mut image, 56, &data).is_err(),
            "not at the end"
        );
        assert!(
            write_trampoline_data(&mut image, 72, &data).is_err(),
            "past the end"
        );
        let mut big = vec![0u8; TRAMPOLINE_MAX_BYTES + 8];
        let offset = big.len() - 32;
        assert!(
            write_trampoline_data(&mut big, offset, &data).is_err(),
            "over a page"
        );
    }

    #[test]
    fn the_trampoline_page_must_be_ram_and_unused() {
        let low_ram = [(0, 0x9_fc00), (0x10_0000, 0x7ef_0000)];
        assert!(trampoline_page_is_free(&low_ram, &[(0x10_0000, 0x20_0000)]));
        assert!(!trampoline_page_is_free(&[(0x10_0000, 0x7ef_0000)], &[]));
        assert!(
            !trampoline_page_is_free(&[(0, 0x8800)], &[]),
            "page only half RAM"
        );
        assert!(!trampoline_page_is_free(&low_ram, &[(0x8ff0, 0x9100)]));
        assert!(trampoline_page_is_free(
            &low_ram,
            &[(0x7000, 0x8000), (0x9000, 0xa000)]
        ));
    }

    #[test]
    fn short_names() {
        assert_eq!(short_name("AMD-V (SVM + NPT)"), "AMD-V");
        assert_eq!(short_name("Intel VT-x (VMX + EPT + VPID)"), "Intel VT-x");
        assert_eq!(short_name("plain"), "plain");
    }
}

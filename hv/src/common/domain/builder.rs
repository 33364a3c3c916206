//! The domain builder: turns a guest kernel ELF into a bootable guest-physical image.
//!
//! The ELF is validated before a byte is copied: 64-bit x86-64 executable, no interpreter or
//! dynamic section, loadable segments inside `[KERNEL_MIN_GPA, stack_guard_gpa(mem))`, file
//! ranges inside the module, no overlaps, entry in an executable segment. Then the boot
//! structures of `lamina_abi::layout` are written: start info, command line, boot GDT and page
//! tables (with the stack's guard page left unmapped). The memory map (docs/abi.md 11) is
//! derived from the same layout here.

use crate::common::events::{CONSOLE_PORT, default_vcpu_info_gpa};
use crate::common::memory::guest_memory::{GuestMemory, OutOfBounds};
use crate::common::time::{TimeBase, publish_vcpu_time, publish_wall_clock};
use core::fmt;
use lamina_abi::layout::{
    BOOT_GDT_GPA, BOOT_GRANT_PD_GPA, BOOT_PD_GPA, BOOT_PDPT_GPA, BOOT_PML4_GPA, BOOT_STACK_PT_GPA,
    CMDLINE_GPA, CMDLINE_MAX, CONSOLE_RING_GPA, GRANT_WINDOW_BYTES, GRANT_WINDOW_GPA,
    KERNEL_MIN_GPA, SHARED_INFO_GPA, STACK_GUARD_BYTES, START_INFO_GPA, stack_guard_gpa,
};
use lamina_abi::memory::{MEMORY_MAP_MAX_REGIONS, MemoryRegion, region_kind};
use lamina_abi::shared_info::VcpuInfo;
use lamina_abi::start_info::{START_FLAG_PRIVILEGED, START_INFO_MAGIC, StartInfo};
use xmas_elf::ElfFile;
use xmas_elf::header::{Class, Machine, Type};
use xmas_elf::program::{ProgramHeader, Type as SegmentType};

/// Most loadable segments a kernel may have.
const MAX_SEGMENTS: usize = 16;

/// Why a kernel image was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum BuildError {
    /// Not an ELF file at all, or its headers are cut short.
    NotElf(&'static str),
    /// An ELF, but not a 64-bit x86-64 executable.
    WrongKind(&'static str),
    /// Needs a dynamic loader or relocation.
    Dynamic,
    /// No loadable segment, or too many.
    SegmentCount(usize),
    /// A segment's file bytes are not inside the module.
    SegmentOutsideFile { vaddr: u64 },
    /// A segment does not fit in the kernel area of the domain's RAM.
    SegmentOutsideRam { vaddr: u64, memsz: u64, limit: u64 },
    /// Two segments overlap.
    Overlap { first: u64, second: u64 },
    /// The entry point is not inside an executable segment.
    BadEntry(u64),
    /// The boot structures did not fit (cannot happen with the layout's minimum RAM).
    NoRoom,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::NotElf(why) => write!(f, "not an ELF file ({why})"),
            BuildError::WrongKind(why) => write!(f, "not a 64-bit x86-64 executable ({why})"),
            BuildError::Dynamic => {
                write!(f, "dynamic or relocatable ELF (link it static, non-PIE)")
            }
            BuildError::SegmentCount(n) => write!(f, "{n} loadable segments (1..={MAX_SEGMENTS})"),
            BuildError::SegmentOutsideFile { vaddr } => {
                write!(f, "segment at {vaddr:#x} has file bytes outside the module")
            }
            BuildError::SegmentOutsideRam {
                vaddr,
                memsz,
                limit,
            } => write!(
                f,
                "segment {vaddr:#x}+{memsz:#x} is outside the kernel area {KERNEL_MIN_GPA:#x}..{limit:#x}"
            ),
            BuildError::Overlap { first, second } => {
                write!(f, "segments at {first:#x} and {second:#x} overlap")
            }
            BuildError::BadEntry(entry) => {
                write!(f, "entry {entry:#x} is not in an executable segment")
            }
            BuildError::NoRoom => write!(f, "boot structures do not fit"),
        }
    }
}

impl From<OutOfBounds> for BuildError {
    fn from(_: OutOfBounds) -> Self {
        BuildError::NoRoom
    }
}

/// Where the kernel landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelImage {
    /// Entry point (RIP at start).
    pub entry: u64,
    /// Lowest loaded address.
    pub start: u64,
    /// First page-aligned address above the image.
    pub end: u64,
}

#[derive(Clone, Copy)]
struct Segment {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    filesz: u64,
    executable: bool,
}

/// Checks `elf` against a domain of `mem_bytes` RAM without writing anything.
fn validate(
    elf: &ElfFile<'_>,
    file_len: u64,
    mem_bytes: u64,
) -> Result<([Option<Segment>; MAX_SEGMENTS], KernelImage), BuildError> {
    let header = &elf.header;
    if header.pt1.class() != Class::SixtyFour {
        return Err(BuildError::WrongKind("not ELF64"));
    }
    match header.pt2.machine().as_machine() {
        Machine::X86_64 => {}
        _ => return Err(BuildError::WrongKind("machine is not x86-64")),
    }
    match header.pt2.type_().as_type() {
        Type::Executable => {}
        Type::SharedObject => return Err(BuildError::Dynamic),
        _ => return Err(BuildError::WrongKind("not an executable")),
    }
    // xmas-elf slices the program header table out of the file without a bounds check and
    // reads each entry in place, asserting its alignment (found by fuzz/elf_builder): the
    // table must lie inside the file, 8-byte aligned, in 64-bit entries.
    const PH64_BYTES: u64 = 56;
    let table_end = u64::from(header.pt2.ph_count())
        .checked_mul(u64::from(header.pt2.ph_entry_size()))
        .and_then(|bytes| bytes.checked_add(header.pt2.ph_offset()));
    if u64::from(header.pt2.ph_entry_size()) != PH64_BYTES
        || !header.pt2.ph_offset().is_multiple_of(8)
        || table_end.is_none_or(|end| end > file_len)
    {
        return Err(BuildError::WrongKind(
            "program header table outside the file or not 64-bit",
        ));
    }
    let limit = stack_guard_gpa(mem_bytes);
    let mut segments = [None; MAX_SEGMENTS];
    let mut count = 0;
    for ph in elf.program_iter() {
        let ProgramHeader::Ph64(ph) = ph else {
            return Err(BuildError::WrongKind("32-bit program header"));
        };
        match ph.get_type() {
            Ok(SegmentType::Load) => {}
            Ok(SegmentType::Interp) | Ok(SegmentType::Dynamic) => return Err(BuildError::Dynamic),
            _ => continue,
        }
        if ph.mem_size == 0 {
            continue;
        }
        let segment = Segment {
            vaddr: ph.virtual_addr,
            memsz: ph.mem_size,
            offset: ph.offset,
            filesz: ph.file_size,
            executable: ph.flags.is_execute(),
        };
        let file_end = segment.offset.checked_add(segment.filesz);
        if segment.filesz > segment.memsz || file_end.is_none_or(|end| end > file_len) {
            return Err(BuildError::SegmentOutsideFile {
                vaddr: segment.vaddr,
            });
        }
        let ram_end = segment.vaddr.checked_add(segment.memsz);
        if segment.vaddr < KERNEL_MIN_GPA || ram_end.is_none_or(|end| end > limit) {
            return Err(BuildError::SegmentOutsideRam {
                vaddr: segment.vaddr,
                memsz: segment.memsz,
                limit,
            });
        }
        if count == MAX_SEGMENTS {
            return Err(BuildError::SegmentCount(count + 1));
        }
        for other in segments[..count].iter().flatten() {
            let other: &Segment = other;
            if segment.vaddr < other.vaddr + other.memsz
                && other.vaddr < segment.vaddr + segment.memsz
            {
                return Err(BuildError::Overlap {
                    first: other.vaddr,
                    second: segment.vaddr,
                });
            }
        }
        segments[count] = Some(segment);
        count += 1;
    }
    if count == 0 {
        return Err(BuildError::SegmentCount(0));
    }
    let entry = header.pt2.entry_point();
    let loaded = segments.iter().flatten();
    if !loaded
        .clone()
        .any(|s| s.executable && (s.vaddr..s.vaddr + s.memsz).contains(&entry))
    {
        return Err(BuildError::BadEntry(entry));
    }
    let start = loaded
        .clone()
        .map(|s| s.vaddr)
        .min()
        .unwrap_or(KERNEL_MIN_GPA);
    let end = loaded
        .map(|s| s.vaddr + s.memsz)
        .max()
        .unwrap_or(KERNEL_MIN_GPA);
    Ok((
        segments,
        KernelImage {
            entry,
            start,
            end: (end + 0xfff) & !0xfff,
        },
    ))
}

/// Validates `elf_bytes` and copies its segments into `mem` (which must be zeroed).
pub fn load_kernel(elf_bytes: &[u8], mem: &GuestMemory) -> Result<KernelImage, BuildError> {
    // xmas-elf reads its structures in place and asserts their alignment.
    if !elf_bytes.is_empty() && !elf_bytes.as_ptr().cast::<u64>().is_aligned() {
        return Err(BuildError::WrongKind("module not 8-byte aligned in memory"));
    }
    let elf = ElfFile::new(elf_bytes).map_err(BuildError::NotElf)?;
    let (segments, image) = validate(&elf, elf_bytes.len() as u64, mem.size())?;
    for segment in segments.iter().flatten() {
        // Both ranges were checked by `validate`; the file range cannot be out of bounds.
        let bytes = &elf_bytes[segment.offset as usize..(segment.offset + segment.filesz) as usize];
        mem.write(segment.vaddr, bytes)?;
    }
    Ok(image)
}

/// What the builder tells the guest about itself.
pub struct BootParams<'a> {
    /// Domain identifier.
    pub domain_id: u32,
    /// Domain name (at most 31 bytes are passed).
    pub name: &'a str,
    /// Full module command line.
    pub cmdline: &'a str,
    /// Privileged domain.
    pub privileged: bool,
    /// Number of vCPUs.
    pub nr_vcpus: usize,
    /// The clock published in the shared-info page.
    pub time: TimeBase,
}

/// Writes start info, command line, boot GDT and identity-mapping page tables into `mem`.
pub fn write_boot_structures(
    mem: &GuestMemory,
    image: &KernelImage,
    params: &BootParams<'_>,
) -> Result<(), BuildError> {
    let cmdline = &params.cmdline.as_bytes()[..params.cmdline.len().min(CMDLINE_MAX)];
    mem.write(CMDLINE_GPA, cmdline)?;
    mem.write(CMDLINE_GPA + cmdline.len() as u64, &[0])?;

    let mut name = [0u8; 32];
    let name_len = params.name.len().min(31);
    name[..name_len].copy_from_slice(&params.name.as_bytes()[..name_len]);
    let info = StartInfo {
        magic: START_INFO_MAGIC,
        abi_version: lamina_abi::abi_version(),
        domain_id: params.domain_id,
        flags: if params.privileged {
            START_FLAG_PRIVILEGED
        } else {
            0
        },
        mem_bytes: mem.size(),
        image_start: image.start,
        image_end: image.end,
        stack_top: mem.size(),
        cmdline_gpa: CMDLINE_GPA,
        cmdline_len: cmdline.len() as u64,
        nr_vcpus: params.nr_vcpus as u32,
        console_port: CONSOLE_PORT,
        name,
        shared_info_gpa: SHARED_INFO_GPA,
        console_ring_gpa: CONSOLE_RING_GPA,
        tsc_khz: params.time.tsc_khz(),
    };
    // SAFETY: StartInfo is repr(C) plain data with no padding (its size is asserted in abi).
    let bytes = unsafe {
        core::slice::from_raw_parts(
            (&raw const info).cast::<u8>(),
            core::mem::size_of::<StartInfo>(),
        )
    };
    mem.write(START_INFO_GPA, bytes)?;

    // Shared info: upcalls start masked (like interrupts at reset), the clocks published.
    let vcpu_info = default_vcpu_info_gpa(SHARED_INFO_GPA, 0);
    mem.write(
        vcpu_info + core::mem::offset_of!(VcpuInfo, evtchn_upcall_mask) as u64,
        &[1],
    )?;
    publish_vcpu_time(mem, vcpu_info, &params.time, params.time.tsc_at_zero)?;
    publish_wall_clock(mem, SHARED_INFO_GPA, &params.time)?;

    // Null, 64-bit code (selector 0x08), data (0x10): the values the vCPU's hidden segment
    // state is set to at entry, so reloading a selector changes nothing.
    for (i, descriptor) in [0u64, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff]
        .iter()
        .enumerate()
    {
        mem.write_u64(BOOT_GDT_GPA + 8 * i as u64, *descriptor)?;
    }

    // PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> 2 MiB page i. Present, writable, user (so a
    // kernel can run CPL 3 code without building its own tables first).
    const PRESENT_WRITABLE_USER: u64 = 0b111;
    const LARGE_PAGE: u64 = 1 << 7;
    let pdpt = BOOT_PDPT_GPA;
    let pd = BOOT_PD_GPA;
    mem.write_u64(BOOT_PML4_GPA, pdpt | PRESENT_WRITABLE_USER)?;
    mem.write_u64(pdpt, pd | PRESENT_WRITABLE_USER)?;
    let top = (mem.size() >> 21)
        .checked_sub(1)
        .ok_or(BuildError::NoRoom)?;
    for page in 0..top {
        mem.write_u64(
            pd + 8 * page,
            (page << 21) | PRESENT_WRITABLE_USER | LARGE_PAGE,
        )?;
    }
    // The top 2 MiB, which holds the stack, by 4 KiB pages, all but the guard page below the
    // stack: an overflow raises #PF in the guest (docs/abi.md 4.2).
    mem.write_u64(pd + 8 * top, BOOT_STACK_PT_GPA | PRESENT_WRITABLE_USER)?;
    let guard = stack_guard_gpa(mem.size());
    for index in 0..512 {
        let page = (top << 21) + (index << 12);
        let entry = if (guard..guard + STACK_GUARD_BYTES).contains(&page) {
            0
        } else {
            page | PRESENT_WRITABLE_USER
        };
        mem.write_u64(BOOT_STACK_PT_GPA + 8 * index, entry)?;
    }
    // PDPT[1] -> the grant window's PD, whose entry 0 maps the window with one 2 MiB page
    // (docs/abi.md 4.2, 16): a kernel reaches a mapped grant at its guest-physical address.
    const _: () = assert!(GRANT_WINDOW_GPA == 1 << 30, "PDPT entry 1, PD entry 0");
    mem.write_u64(pdpt + 8, BOOT_GRANT_PD_GPA | PRESENT_WRITABLE_USER)?;
    mem.write_u64(
        BOOT_GRANT_PD_GPA,
        GRANT_WINDOW_GPA | PRESENT_WRITABLE_USER | LARGE_PAGE,
    )?;
    Ok(())
}

/// A domain's memory map (docs/abi.md 11): its regions in address order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMap {
    regions: [MemoryRegion; MEMORY_MAP_MAX_REGIONS],
    len: usize,
}

impl MemoryMap {
    /// The map of a domain of `mem_bytes` RAM whose kernel image is `image` (as loaded; an
    /// empty image has no region).
    pub fn new(mem_bytes: u64, image: &KernelImage) -> Self {
        let mut map = MemoryMap {
            regions: [MemoryRegion::default(); MEMORY_MAP_MAX_REGIONS],
            len: 0,
        };
        let image_start = image.start & !0xfff;
        let guard = stack_guard_gpa(mem_bytes);
        let boot_tables_end = BOOT_PML4_GPA + 0x3000;
        const _: () = assert!(SHARED_INFO_GPA == BOOT_PML4_GPA + 0x3000);
        const _: () = assert!(CONSOLE_RING_GPA == SHARED_INFO_GPA + 0x1000);
        const _: () = assert!(BOOT_GRANT_PD_GPA == CONSOLE_RING_GPA + 0x1000);
        const _: () = assert!(BOOT_STACK_PT_GPA == BOOT_GRANT_PD_GPA + 0x1000);
        for (start, end, kind) in [
            (0, BOOT_PML4_GPA, region_kind::BOOT),
            (
                BOOT_PML4_GPA,
                boot_tables_end,
                region_kind::BOOT_PAGE_TABLES,
            ),
            (SHARED_INFO_GPA, BOOT_GRANT_PD_GPA, region_kind::SHARED),
            (
                BOOT_GRANT_PD_GPA,
                BOOT_STACK_PT_GPA + 0x1000,
                region_kind::BOOT_PAGE_TABLES,
            ),
            (BOOT_STACK_PT_GPA + 0x1000, image_start, region_kind::RAM),
            (image_start, image.end, region_kind::KERNEL_IMAGE),
            (image.end, guard, region_kind::RAM),
            (guard, mem_bytes, region_kind::BOOT_STACK),
            (
                GRANT_WINDOW_GPA,
                GRANT_WINDOW_GPA + GRANT_WINDOW_BYTES,
                region_kind::GRANT_WINDOW,
            ),
        ] {
            if start < end && map.len < MEMORY_MAP_MAX_REGIONS {
                map.regions[map.len] = MemoryRegion {
                    base: start,
                    length: end - start,
                    kind,
                    reserved: 0,
                };
                map.len += 1;
            }
        }
        map
    }

    /// The regions, in address order.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions[..self.len]
    }
}

/// The boot GDT's limit, for GDTR.
pub const BOOT_GDT_LIMIT: u16 = 3 * 8 - 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::memory::guest_memory::testing::test_memory;

    /// Builds a minimal ELF64 executable with the given (vaddr, memsz, filesz, flags) segments.
    fn elf(entry: u64, segments: &[(u64, u64, u64, u32)]) -> Vec<u8> {
        let phoff = 64u64;
        let data_start = phoff + 56 * segments.len() as u64;
        let mut out = Vec::new();
        out.extend_from_slice(b"\x7fELF");
        out.extend_from_slice(&[2, 1, 1, 0]);
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&entry.to_le_bytes());
        out.extend_from_slice(&phoff.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // shoff
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&64u16.to_le_bytes());
        out.extend_from_slice(&56u16.to_le_bytes());
        out.extend_from_slice(&(segments.len() as u16).to_le_bytes());
        out.extend_from_slice(&64u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        let mut offset = data_start;
        for &(vaddr, memsz, filesz, flags) in segments {
            out.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&vaddr.to_le_bytes());
            out.extend_from_slice(&vaddr.to_le_bytes());
            out.extend_from_slice(&filesz.to_le_bytes());
            out.extend_from_slice(&memsz.to_le_bytes());
            out.extend_from_slice(&0x1000u64.to_le_bytes());
            offset += filesz;
        }
        for (i, &(_, _, filesz, _)) in segments.iter().enumerate() {
            out.extend(std::iter::repeat_n(0xc0 + i as u8, filesz as usize));
        }
        out
    }

    const RX: u32 = 5;
    const RW: u32 = 6;
    const MEM: u64 = 4 << 20;

    #[test]
    fn a_good_kernel_is_loaded_where_it_asks() {
        let t = test_memory(MEM);
        let image = load_kernel(
            &elf(
                0x200010,
                &[(0x200000, 0x100, 0x20, RX), (0x201000, 0x2000, 0x10, RW)],
            ),
            &t.mem,
        )
        .unwrap();
        assert_eq!(
            image,
            KernelImage {
                entry: 0x200010,
                start: 0x200000,
                end: 0x203000
            }
        );
        let mut byte = [0u8; 1];
        t.mem.read(0x20001f, &mut byte).unwrap();
        assert_eq!(byte[0], 0xc0);
        t.mem.read(0x201000, &mut byte).unwrap();
        assert_eq!(byte[0], 0xc1);
        t.mem.read(0x201010, &mut byte).unwrap();
        assert_eq!(byte[0], 0, "bss stays zero");
    }

    #[test]
    fn bad_kernels_are_refused_with_the_reason() {
        let t = test_memory(MEM);
        let load = |bytes: Vec<u8>| load_kernel(&bytes, &t.mem);
        assert!(matches!(load(vec![0xab; 4096]), Err(BuildError::NotElf(_))));
        assert!(matches!(load(vec![]), Err(BuildError::NotElf(_))));
        assert_eq!(load(elf(0x200000, &[])), Err(BuildError::SegmentCount(0)));
        assert!(
            matches!(
                load(elf(0x1000, &[(0x1000, 0x100, 0x10, RX)])),
                Err(BuildError::SegmentOutsideRam { .. })
            ),
            "below the kernel area"
        );
        assert!(
            matches!(
                load(elf(0x200000, &[(0x200000, MEM, 0x10, RX)])),
                Err(BuildError::SegmentOutsideRam { .. })
            ),
            "over the stack"
        );
        assert!(
            matches!(
                load(elf(0x200000, &[(u64::MAX - 0x10, 0x100, 0x10, RX)])),
                Err(BuildError::SegmentOutsideRam { .. })
            ),
            "wraps"
        );
        assert!(matches!(
            load(elf(
                0x200000,
                &[(0x200000, 0x2000, 0x10, RX), (0x201000, 0x1000, 0x10, RW)]
            )),
            Err(BuildError::Overlap { .. })
        ));
        assert_eq!(
            load(elf(
                0x201000,
                &[(0x200000, 0x100, 0x10, RX), (0x201000, 0x100, 0x10, RW)]
            )),
            Err(BuildError::BadEntry(0x201000)),
            "entry in a data segment"
        );
        let mut truncated = elf(0x200000, &[(0x200000, 0x100, 0x80, RX)]);
        truncated.truncate(truncated.len() - 1);
        assert!(matches!(
            load(truncated),
            Err(BuildError::SegmentOutsideFile { .. })
        ));
        let mut dynamic = elf(0x200000, &[(0x200000, 0x100, 0x10, RX)]);
        dynamic[16] = 3; // ET_DYN
        assert_eq!(load(dynamic), Err(BuildError::Dynamic));
    }

    #[test]
    fn a_program_header_table_outside_the_file_is_refused() {
        // fuzz/artifacts/elf_builder/crash-db82c4...: a program header offset far past the
        // end of the module made the ELF parser index out of bounds (a hypervisor panic).
        let t = test_memory(MEM);
        let good = elf(0x200000, &[(0x200000, 0x100, 0x10, RX)]);
        assert!(load_kernel(&good, &t.mem).is_ok());
        let with = |at: usize, bytes: &[u8]| {
            let mut bad = good.clone();
            bad[at..at + bytes.len()].copy_from_slice(bytes);
            bad
        };
        let refused = |bytes: Vec<u8>| {
            matches!(
                load_kernel(&bytes, &t.mem),
                Err(BuildError::WrongKind(why)) if why.contains("program header table")
            )
        };
        assert!(
            refused(with(0x20, &0x7b_0000_0040u64.to_le_bytes())),
            "offset past the end"
        );
        assert!(
            refused(with(0x20, &u64::MAX.to_le_bytes())),
            "offset that wraps"
        );
        assert!(
            refused(with(0x38, &200u16.to_le_bytes())),
            "more entries than the file holds"
        );
        assert!(
            refused(with(0x36, &32u16.to_le_bytes())),
            "entries too small for ELF64"
        );
        assert!(
            refused(with(0x20, &0x41u64.to_le_bytes())),
            "entries not aligned"
        );
        let reproducer = include_bytes!(
            "../../../../fuzz/artifacts/elf_builder/crash-db82c4aa28ac3db67d496685936d7425a7a45888"
        );
        // In an 8-byte aligned buffer, as the hypervisor's modules are (page-aligned).
        let mut words = vec![0u64; reproducer.len() / 8 + 2];
        let aligned = &mut as_bytes(&mut words)[..reproducer.len()];
        aligned.copy_from_slice(reproducer);
        assert!(refused(aligned.to_vec()));
        // Not aligned at all: refused, not a panic in the parser.
        let mut words = vec![0u64; good.len() / 8 + 2];
        let shifted = &mut as_bytes(&mut words)[1..=good.len()];
        shifted.copy_from_slice(&good);
        assert_eq!(
            load_kernel(shifted, &t.mem),
            Err(BuildError::WrongKind("module not 8-byte aligned in memory"))
        );
    }

    fn as_bytes(words: &mut [u64]) -> &mut [u8] {
        // SAFETY: u64s are plain bytes; the slice borrows `words` mutably for its lifetime.
        unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 8) }
    }

    #[test]
    fn boot_structures_describe_the_domain() {
        let t = test_memory(MEM);
        let image = KernelImage {
            entry: 0x200000,
            start: 0x200000,
            end: 0x210000,
        };
        let params = BootParams {
            domain_id: 3,
            name: "ping",
            cmdline: "ping mem=4M",
            privileged: false,
            nr_vcpus: 1,
            time: TimeBase::new(1_000_000_000, 0, 0, 0),
        };
        write_boot_structures(&t.mem, &image, &params).unwrap();
        let mut raw = [0u8; 128];
        t.mem.read(START_INFO_GPA, &mut raw).unwrap();
        // SAFETY: StartInfo is plain data of exactly 128 bytes.
        let info: StartInfo = unsafe { core::ptr::read_unaligned(raw.as_ptr().cast()) };
        assert_eq!(
            (info.magic, info.domain_id, info.mem_bytes, info.stack_top),
            (START_INFO_MAGIC, 3, MEM, MEM)
        );
        assert_eq!(info.name(), "ping");
        assert_eq!(info.cmdline_len, 11);
        assert_eq!(
            t.mem.read_u64(BOOT_PML4_GPA + 0x2000).unwrap(),
            0x87,
            "PD maps 2 MiB pages"
        );
        assert_eq!(
            t.mem.read_u64(BOOT_PML4_GPA + 0x2000 + 8).unwrap(),
            BOOT_STACK_PT_GPA | 0x7,
            "the top 2 MiB by 4 KiB pages"
        );
        let guard = MEM - 0x11000;
        let pte = |gpa: u64| {
            t.mem
                .read_u64(BOOT_STACK_PT_GPA + 8 * ((gpa >> 12) & 511))
                .unwrap()
        };
        assert_eq!(pte(guard), 0, "the guard page is not mapped");
        assert_eq!(pte(guard - 0x1000), (guard - 0x1000) | 0x7);
        assert_eq!(pte(guard + 0x1000), (guard + 0x1000) | 0x7, "the stack");
        assert_eq!(pte(MEM - 0x1000), (MEM - 0x1000) | 0x7);
        assert_eq!(pte(MEM - (2 << 20)), (MEM - (2 << 20)) | 0x7);
        assert_eq!(
            t.mem.read_u64(BOOT_PML4_GPA + 0x1000 + 8).unwrap(),
            BOOT_GRANT_PD_GPA | 0x7,
            "PDPT[1] points to the grant window's PD"
        );
        assert_eq!(
            t.mem.read_u64(BOOT_GRANT_PD_GPA).unwrap(),
            GRANT_WINDOW_GPA | 0x87,
            "the grant window is one 2 MiB page"
        );
        assert_eq!(t.mem.read_u64(BOOT_GRANT_PD_GPA + 8).unwrap(), 0);
    }

    #[test]
    fn the_memory_map_gives_every_boot_structure_a_kind_and_leaves_ram_free() {
        use region_kind::*;
        let image = KernelImage {
            entry: 0x200000,
            start: 0x200010,
            end: 0x213000,
        };
        let map = MemoryMap::new(MEM, &image);
        let got: Vec<(u64, u64, u32)> = map
            .regions()
            .iter()
            .map(|r| (r.base, r.base + r.length, r.kind))
            .collect();
        assert_eq!(
            got,
            [
                (0, 0x4000, BOOT),
                (0x4000, 0x7000, BOOT_PAGE_TABLES),
                (0x7000, 0x9000, SHARED),
                (0x9000, 0xb000, BOOT_PAGE_TABLES),
                (0xb000, 0x200000, RAM),
                (0x200000, 0x213000, KERNEL_IMAGE),
                (0x213000, MEM - 0x11000, RAM),
                (MEM - 0x11000, MEM, BOOT_STACK),
                (GRANT_WINDOW_GPA, GRANT_WINDOW_GPA + (2 << 20), GRANT_WINDOW),
            ]
        );
        // An image that reaches the guard page leaves no free RAM above it.
        let full = KernelImage {
            end: MEM - 0x11000,
            ..image
        };
        let map = MemoryMap::new(MEM, &full);
        assert_eq!(map.regions().len(), 8);
        assert!(map.regions().iter().all(|r| r.length > 0));
    }

    #[test]
    fn a_kernel_may_not_reach_the_guard_page() {
        let t = test_memory(MEM);
        let guard = MEM - 0x11000;
        assert!(matches!(
            load_kernel(
                &elf(0x200000, &[(0x200000, guard + 1 - 0x200000, 0x10, RX)]),
                &t.mem
            ),
            Err(BuildError::SegmentOutsideRam { .. })
        ));
        assert!(
            load_kernel(
                &elf(0x200000, &[(0x200000, guard - 0x200000, 0x10, RX)]),
                &t.mem
            )
            .is_ok()
        );
    }
}

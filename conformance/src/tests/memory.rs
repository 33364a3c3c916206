//! Tests of `memory_op` (docs/abi.md 11): the memory map and the reservation.

use lamina_abi::Errno;
use lamina_abi::layout::{CONSOLE_RING_GPA, GRANT_WINDOW_BYTES, GRANT_WINDOW_GPA, START_INFO_GPA};
use lamina_abi::memory::{MemoryOp, MemoryRegion, region_kind};
use lamina_guest_sdk::start::TOP_OF_RAM_SCRATCH;
use lamina_guest_sdk::start_info;

use crate::framework::{Hex, Status, check, check_eq};
use crate::hv;

/// A region no hypervisor writes: the sentinel left in unwritten slots.
const UNTOUCHED: MemoryRegion = MemoryRegion {
    base: 0x5a5a_5a5a_5a5a_5a5a,
    length: 0xa5a5_a5a5_a5a5_a5a5,
    kind: 0x5a5a_5a5a,
    reserved: 0xa5a5_a5a5,
};

/// Regions in the map since ABI 1.4 (all of them for this conformance kernel, whose image
/// never reaches the guard page).
const REGIONS: usize = 9;

/// The map docs/abi.md 11 describes (the grant window since ABI 1.3, the kinds of their own
/// for the boot structures, the image and the stack since 1.4), spelled out from the document.
fn expected_map() -> [MemoryRegion; REGIONS] {
    let info = start_info();
    let mem = info.mem_bytes;
    let image_start = info.image_start & !0xfff;
    let guard = mem - 64 * 1024 - 4096;
    let region = |base: u64, end: u64, kind: u32| MemoryRegion {
        base,
        length: end - base,
        kind,
        reserved: 0,
    };
    [
        region(0, 0x4000, region_kind::BOOT),
        region(0x4000, 0x7000, region_kind::BOOT_PAGE_TABLES),
        region(0x7000, 0x9000, region_kind::SHARED),
        region(0x9000, 0xb000, region_kind::BOOT_PAGE_TABLES),
        region(0xb000, image_start, region_kind::RAM),
        region(image_start, info.image_end, region_kind::KERNEL_IMAGE),
        region(info.image_end, guard, region_kind::RAM),
        region(guard, mem, region_kind::BOOT_STACK),
        region(
            GRANT_WINDOW_GPA,
            GRANT_WINDOW_GPA + GRANT_WINDOW_BYTES,
            region_kind::GRANT_WINDOW,
        ),
    ]
}

/// GetMemoryMap at `gpa` for `capacity` entries: an address the hypervisor must refuse, or
/// our own.
fn memory_map_at(gpa: u64, capacity: u64) -> Status {
    // SAFETY: the hypervisor must refuse every address these tests pass outside RAM; their
    // part inside RAM is the SDK's unused top of RAM or unused page 0.
    unsafe { hv::memory_op(MemoryOp::GetMemoryMap as u64, gpa, capacity) }
}

conformance_test! {
    title: "unknown memory_op operations return -ENOSYS",
    section: "11 memory_op",
    expect: Success,
}
pub(super) fn memory_op_unknown_enosys() {
    // 3 is the first unassigned operation (flush_tlb is 2 since ABI 1.6); 1 << 32 would be
    // GetMemoryMap to a hypervisor that looks at EDI only (with capacity 0 it writes nothing).
    for op in [3, 4, 99, 1 << 32, u64::MAX] {
        // SAFETY: unknown operations do nothing; see above for 1 << 32.
        let status = unsafe { hv::memory_op(op, 0, 0) };
        check_eq!(
            format_args!("memory_op operation {op:#x}"),
            Status::err(Errno::ENOSYS),
            status
        );
    }
}

conformance_test! {
    title: "get_memory_map gives boot information, page tables, shared pages, image and stack kinds of their own, free RAM the rest, and the grant window (1.4)",
    section: "11 memory_op",
    expect: Success,
}
pub(super) fn memory_map_lists_regions() {
    let mut map = [UNTOUCHED; REGIONS + 2];
    check_eq!(
        "GetMemoryMap with room for 11 regions",
        Status(REGIONS as u64),
        hv::memory_map(&mut map)
    );
    let names = [
        "page 0, StartInfo, command line, boot GDT",
        "boot page tables (PML4, PDPT, PD)",
        "shared info and console ring",
        "boot page tables (grant window PD, stack PT)",
        "free RAM below the image",
        "the kernel image",
        "free RAM above the image",
        "guard page and initial stack",
        "the grant window",
    ];
    for ((name, expected), got) in names.iter().zip(expected_map()).zip(map) {
        check_eq!(format_args!("memory map region: {name}"), expected, got);
    }
    check_eq!(
        "memory map slots past the map (unused)",
        [UNTOUCHED; 2],
        [map[REGIONS], map[REGIONS + 1]]
    );
    // The RAM regions tile [0, mem_bytes) with no gap or overlap; the window lies above it.
    let mut end = 0;
    for region in &map[..REGIONS - 1] {
        check_eq!(
            "a region starts where the one before ends",
            Hex(end),
            Hex(region.base)
        );
        end = region.base + region.length;
    }
    check_eq!("end of RAM", Hex(start_info().mem_bytes), Hex(end));
    // What we are made of and run on is never in a free region.
    let probes = [
        ("our code", memory_map_lists_regions as *const () as u64),
        ("our stack", crate::x86::read_rsp()),
        ("StartInfo", START_INFO_GPA),
        ("the boot page tables", crate::x86::read_cr3() & !0xfff),
        ("the console ring", CONSOLE_RING_GPA),
    ];
    for (what, address) in probes {
        let free = map[..REGIONS]
            .iter()
            .any(|r| r.kind == region_kind::RAM && (r.base..r.base + r.length).contains(&address));
        check!(!free, "{what} at {address:#x} lies in a free RAM region");
    }
}

conformance_test! {
    title: "get_memory_map with room for fewer regions writes that many and returns 9; capacity 0 writes none",
    section: "11 memory_op",
    expect: Success,
}
pub(super) fn memory_map_short_buffer() {
    let mut map = [UNTOUCHED; 3];
    check_eq!(
        "GetMemoryMap with room for 1 region (returns the full count)",
        Status(REGIONS as u64),
        hv::memory_map(&mut map[..1])
    );
    check_eq!("the one region written", expected_map()[0], map[0]);
    check_eq!("the slot past the capacity", UNTOUCHED, map[1]);
    check_eq!(
        "GetMemoryMap with room for 2 regions (returns the full count)",
        Status(REGIONS as u64),
        hv::memory_map(&mut map[..2])
    );
    let expected = expected_map();
    check_eq!(
        "the two regions written",
        [expected[0], expected[1]],
        [map[0], map[1]]
    );
    check_eq!("the slot past the capacity", UNTOUCHED, map[2]);
    // Capacity 0 writes nothing, wherever the array is.
    let mem = start_info().mem_bytes;
    for gpa in [map.as_ptr() as u64, mem, u64::MAX] {
        check_eq!(
            format_args!("GetMemoryMap with capacity 0 at {gpa:#x}"),
            Status(REGIONS as u64),
            memory_map_at(gpa, 0)
        );
    }
}

conformance_test! {
    title: "get_memory_map into an array not inside RAM returns -EFAULT and writes nothing",
    section: "11 memory_op",
    expect: Success,
}
pub(super) fn memory_map_oob_efault() {
    let mem = start_info().mem_bytes;
    let top = mem - TOP_OF_RAM_SCRATCH;
    let scratch_before = read_top_of_ram();
    let cases: [(&str, u64, u64); 5] = [
        ("at the end of RAM", mem, 1),
        ("straddling the end of RAM", top, 1),
        ("1 GiB above RAM", mem + (1 << 30), 2),
        ("wrapping around to low RAM", u64::MAX - 7, 2),
        ("at a non-canonical address", 1 << 63, 1),
    ];
    for (what, gpa, capacity) in cases {
        check_eq!(
            format_args!("GetMemoryMap, array {what} (gpa {gpa:#x}, {capacity} regions)"),
            Status::err(Errno::EFAULT),
            memory_map_at(gpa, capacity)
        );
    }
    check!(
        read_top_of_ram() == scratch_before,
        "a refused GetMemoryMap wrote the top of RAM"
    );
}

/// The SDK's unused top of RAM.
fn read_top_of_ram() -> [u8; TOP_OF_RAM_SCRATCH as usize] {
    let top = start_info().mem_bytes - TOP_OF_RAM_SCRATCH;
    // SAFETY: `_start` leaves these bytes unused; RAM is identity-mapped.
    unsafe { core::ptr::read_volatile(top as *const [u8; TOP_OF_RAM_SCRATCH as usize]) }
}

conformance_test! {
    title: "current_reservation returns the domain's RAM size",
    section: "11 memory_op",
    expect: Success,
}
pub(super) fn reservation_is_mem_bytes() {
    check_eq!(
        "CurrentReservation",
        Status(start_info().mem_bytes),
        hv::current_reservation()
    );
}

conformance_test! {
    title: "get_memory_map with a capacity far beyond RAM (its size in bytes overflowing) writes the regions there are",
    section: "11 memory_op",
    expect: Success,
}
pub(super) fn memory_map_huge_capacity() {
    // Only the written part is a buffer (2.5, 11): a capacity far beyond RAM, even one whose
    // size in bytes overflows 64 bits, writes the regions there are and nothing more.
    let mut reference = [UNTOUCHED; 16];
    let Some(count) = hv::memory_map(&mut reference).value() else {
        check!(false, "GetMemoryMap with room for 16 regions failed");
        return;
    };
    let count = count as usize;
    check!(
        (1..16).contains(&count),
        "the map has {count} regions; this test has room for 15"
    );
    for capacity in [u64::MAX, u64::MAX / 24 + 1, 1 << 40] {
        let mut map = [UNTOUCHED; 16];
        check_eq!(
            format_args!("GetMemoryMap with capacity {capacity:#x}"),
            Status(count as u64),
            memory_map_at(map.as_mut_ptr() as u64, capacity)
        );
        check_eq!(
            format_args!("the regions written with capacity {capacity:#x}"),
            &reference[..count],
            &map[..count]
        );
        check_eq!(
            format_args!("the slot after the last region (capacity {capacity:#x})"),
            UNTOUCHED,
            map[count]
        );
    }
}

//! Tests of grant tables (docs/abi.md 16, ABI 1.3), the grant window in the boot page tables
//! (4.2) and the feature bit (5).
//!
//! Tests that need partners come in groups, `<x>_a`, `<x>_b` and sometimes `<x>_c`, next to
//! each other in the catalog: xtask boots a group in one boot, and domains get consecutive
//! ids in catalog order, so `_a` (the granter) finds its partners at its own id + 1 and + 2.
//! A partner that does not exist (the group was split by a filter) makes the test SKIP; one
//! that exists but never does its part is a failure, reported with what was awaited.
//!
//! Partners talk through the granted page itself: the granter fills it (a pattern word at
//! offset 0, then bytes), the grantee answers in word 1 and the granter in word 2. The pages
//! granted are free RAM above the image (RAM is identity-mapped); the grant window is mapped
//! by the boot page tables, so a mapped grant is read and written at its slot's address.

use lamina_abi::cpuid::{LEAF_VERSION, features};
use lamina_abi::event_channel::DOMID_SELF;
use lamina_abi::grant_table::{
    GRANT_PAGE_BYTES, GRANT_TABLE_ENTRIES, GrantCopy, GrantTableOp, copy_direction,
};
use lamina_abi::layout::{BOOT_GRANT_PD_GPA, GRANT_WINDOW_BYTES, GRANT_WINDOW_GPA};
use lamina_abi::multicall::MulticallEntry;
use lamina_abi::{Errno, Hypercall};
use lamina_guest_sdk::start_info;

use super::common::wait_for;
use crate::console::println;
use crate::framework::{Hex, Status, check, check_eq, expect_ok, fail, skip};
use crate::timing::{GIVE_UP_NS, MS};
use crate::{hv, x86};

const WINDOW: u64 = GRANT_WINDOW_GPA;
const PAGE: u64 = GRANT_PAGE_BYTES;
/// Grant and map flags.
const RW: u64 = 0;
const RO: u64 = 1;
/// Domain ids no boot has (DOMID_SELF is not accepted by grant_table_op either).
const NO_DOMAINS: [u64; 5] = [0, 9999, DOMID_SELF, 1 << 32, u64::MAX];

/// Words of the shared page.
const WORD_PATTERN: u64 = 0;
const WORD_GRANTEE: u64 = 8;
const WORD_GRANTER: u64 = 16;
const WORD_COPIED: u64 = 24;
/// The bytes after these words carry the body pattern.
const BODY: u64 = 64;

/// What the words hold.
const PATTERN: u64 = 0x4c41_4d49_4e41_4731; // "1GANIMAL"
const MAPPED: u64 = 0x6d61_7070_6564_2121;
const DONE: u64 = 0x646f_6e65_2121_2121;
const ACK: u64 = 0x6163_6b21_2121_2121;
const UNMAP_NOW: u64 = 0x756e_6d61_7021_2121;
const FINISHED: u64 = 0x6669_6e69_7368_6564;
const COPIED: u64 = 0x636f_7069_6564_2121;

// ----- grant_table_op as the tests call it -----

/// A grant_table_op that writes no guest memory (every operation but copy).
fn grant_op(op: GrantTableOp, args: [u64; 4]) -> Status {
    let [a, b, c, d] = args;
    // SAFETY: grant_access, end_access, map and unmap write no guest RAM; map and unmap only
    // change what the grant window shows, which these tests use with that in mind.
    unsafe { hv::hypercall(Hypercall::GrantTableOp as u64, [op as u64, a, b, c, d]) }
}

fn grant_access(grantee: u64, page_gpa: u64, flags: u64) -> Status {
    grant_op(GrantTableOp::GrantAccess, [grantee, page_gpa, flags, 0])
}

fn end_access(reference: u64) -> Status {
    grant_op(GrantTableOp::EndAccess, [reference, 0, 0, 0])
}

fn map(granter: u64, reference: u64, slot_gpa: u64, flags: u64) -> Status {
    grant_op(GrantTableOp::Map, [granter, reference, slot_gpa, flags])
}

fn unmap(slot_gpa: u64) -> Status {
    grant_op(GrantTableOp::Unmap, [slot_gpa, 0, 0, 0])
}

/// Copy with the request at `gpa`.
///
/// # Safety
/// A FROM_GRANT request makes the hypervisor write its local range: it must be ours.
unsafe fn copy_at(gpa: u64) -> Status {
    // SAFETY: forwarded.
    unsafe {
        hv::hypercall(
            Hypercall::GrantTableOp as u64,
            [GrantTableOp::Copy as u64, gpa, 0, 0, 0],
        )
    }
}

/// Copy with `request`, whose local range must be ours to overwrite.
///
/// # Safety
/// As for [`copy_at`].
unsafe fn copy_raw(request: &GrantCopy) -> Status {
    // SAFETY: forwarded.
    unsafe { copy_at(core::ptr::from_ref(request) as u64) }
}

fn request(granter: u64, reference: u64, direction: u8, offset: u32, local: &[u8]) -> GrantCopy {
    GrantCopy {
        domain: granter as u16,
        direction,
        reserved: 0,
        grant_ref: reference as u32,
        offset,
        len: local.len() as u32,
        local_gpa: local.as_ptr() as u64,
    }
}

/// Copies from offset `offset` of grant `reference` of `granter` into `buffer`.
fn copy_from(granter: u64, reference: u64, offset: u32, buffer: &mut [u8]) -> Status {
    let r = request(
        granter,
        reference,
        copy_direction::FROM_GRANT,
        offset,
        buffer,
    );
    // SAFETY: the local range is `buffer`, borrowed mutably for the call.
    unsafe { copy_raw(&r) }
}

/// Copies `data` to offset `offset` of grant `reference` of `granter`.
fn copy_to(granter: u64, reference: u64, offset: u32, data: &[u8]) -> Status {
    let r = request(granter, reference, copy_direction::TO_GRANT, offset, data);
    // SAFETY: a TO_GRANT copy only reads our RAM.
    unsafe { copy_raw(&r) }
}

// ----- memory the tests share -----

fn own_id() -> u64 {
    u64::from(start_info().domain_id)
}

/// Page `n` of free RAM above the kernel image.
fn page(n: u64) -> u64 {
    start_info().image_end + n * PAGE
}

/// Page `n` of the grant window.
fn slot(n: u64) -> u64 {
    WINDOW + n * PAGE
}

fn read_word(gpa: u64) -> u64 {
    // SAFETY: `gpa` is free RAM of ours or a grant window page the test mapped; both are
    // identity-mapped by the boot page tables.
    unsafe { core::ptr::read_volatile(gpa as *const u64) }
}

fn write_word(gpa: u64, value: u64) {
    // SAFETY: as in `read_word`, for pages mapped read-write.
    unsafe { core::ptr::write_volatile(gpa as *mut u64, value) }
}

fn body_byte(offset: u64) -> u8 {
    (offset * 7 + 3) as u8
}

/// Fills the page at `gpa`: the pattern word, zeros for the other words, the body bytes.
fn fill_page(gpa: u64) {
    write_word(gpa + WORD_PATTERN, PATTERN);
    for word in (8..BODY).step_by(8) {
        write_word(gpa + word, 0);
    }
    for offset in BODY..PAGE {
        // SAFETY: free RAM of ours, identity-mapped.
        unsafe { core::ptr::write_volatile((gpa + offset) as *mut u8, body_byte(offset)) };
    }
}

/// Checks that the page at `gpa` (RAM or a window slot) holds what [`fill_page`] wrote.
fn check_filled(what: &str, gpa: u64) -> bool {
    if !check_eq!(
        format_args!("{what}: the pattern word"),
        Hex(PATTERN),
        Hex(read_word(gpa + WORD_PATTERN))
    ) {
        return false;
    }
    let wrong = (BODY..PAGE).find(|&offset| {
        // SAFETY: as in `read_word`.
        unsafe { core::ptr::read_volatile((gpa + offset) as *const u8) != body_byte(offset) }
    });
    check!(
        wrong.is_none(),
        "{what}: byte {:#x} differs from what the granter wrote",
        wrong.unwrap_or(0)
    )
}

// ----- waiting for partners -----

/// Waits until the word at `gpa` holds `value`; records a failure naming `awaited` if not.
fn wait_word(gpa: u64, value: u64, awaited: &str) -> bool {
    let seen = wait_for(|| read_word(gpa) == value);
    check!(
        seen,
        "{awaited}: the word at {gpa:#x} is {:#x}, not {value:#x}, after {} ms",
        read_word(gpa),
        GIVE_UP_NS / MS
    )
}

/// Whether domain `partner` exists and runs: a grant to it is accepted (and ended at once);
/// SKIP when there is no such domain.
fn partner_running(partner: u64, test: &str) -> bool {
    match grant_access(partner, page(15), RO) {
        status if status == Status::err(Errno::ENOENT) => {
            skip(format_args!(
                "GrantAccess({partner}): -ENOENT, no domain {partner}: {test} is not running next to this test"
            ));
            false
        }
        status => match expect_ok(format_args!("GrantAccess({partner}), a probe"), status) {
            Some(reference) => {
                check_eq!(
                    format_args!("EndAccess({reference}) of the probe"),
                    Status(0),
                    end_access(reference)
                );
                true
            }
            None => false,
        },
    }
}

/// Grants `page_gpa` to `partner`; `None` after a SKIP (no such domain) or a failure.
fn offer(partner: u64, page_gpa: u64, flags: u64, test: &str) -> Option<u64> {
    match grant_access(partner, page_gpa, flags) {
        status if status == Status::err(Errno::ENOENT) => {
            skip(format_args!(
                "GrantAccess({partner}): -ENOENT, no domain {partner}: {test} is not running next to this test"
            ));
            None
        }
        status => expect_ok(
            format_args!("GrantAccess({partner}, {page_gpa:#x}, flags {flags})"),
            status,
        ),
    }
}

/// Maps grant `reference` of `granter` at `slot_gpa` once the granter has made it (map is
/// `-ENOENT` until then); records a failure if it never works.
fn map_when_granted(granter: u64, reference: u64, slot_gpa: u64, flags: u64) -> bool {
    let mut last = Status::err(Errno::ENOENT);
    wait_for(|| {
        last = map(granter, reference, slot_gpa, flags);
        last != Status::err(Errno::ENOENT)
    });
    check_eq!(
        format_args!(
            "Map({granter}, {reference}, {slot_gpa:#x}, flags {flags}) once domain {granter} granted it"
        ),
        Status(0),
        last
    )
}

/// Retries `call` while it returns `while_status`; returns the last status.
fn retry_while(while_status: Status, mut call: impl FnMut() -> Status) -> Status {
    let mut last = while_status;
    wait_for(|| {
        last = call();
        last != while_status
    });
    last
}

// ----- single-domain tests -----

conformance_test! {
    title: "CPUID 0x40000001 EBX bit 13 (GRANT_TABLES) is set and the ABI is 1.3 or a later 1.x, as the version hypercall says",
    section: "5 CPUID discovery",
    expect: Success,
}
pub(super) fn grant_cpuid_bit_and_version() {
    let leaf = lamina_guest_sdk::cpuid::cpuid(LEAF_VERSION, 0);
    check_eq!(
        format_args!("CPUID {LEAF_VERSION:#x} EBX bit 13 (GRANT_TABLES)"),
        Hex(features::GRANT_TABLES),
        Hex(leaf.ebx & features::GRANT_TABLES)
    );
    check!(
        leaf.eax >> 16 == 1 && leaf.eax & 0xffff >= 3,
        "CPUID {LEAF_VERSION:#x} EAX {:#x}: expected ABI 1.3 or a later 1.x",
        leaf.eax
    );
    check_eq!("version hypercall", Status(leaf.eax.into()), hv::version());
}

conformance_test! {
    title: "the boot page tables map the grant window: PDPT[1] points to the PD at 0x9000, whose entry 0 is a writable user 2 MiB page at 0x40000000",
    section: "4.2 Guest-physical layout",
    expect: Success,
}
pub(super) fn grant_window_in_boot_tables() {
    const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
    const P_RW_U: u64 = 0b111;
    const LARGE: u64 = 1 << 7;
    let entry = |table: u64, index: u64| {
        // SAFETY: the boot tables lie in the boot area, identity-mapped RAM; reading an entry
        // has no side effect.
        unsafe { core::ptr::read_volatile((table + index * 8) as *const u64) }
    };
    let pml4 = x86::read_cr3() & ADDRESS;
    let pdpt = entry(pml4, 0) & ADDRESS;
    if !check!(
        pdpt < lamina_abi::layout::BOOT_AREA_END,
        "PML4[0] points to {pdpt:#x}, outside the boot area"
    ) {
        return;
    }
    let pdpte = entry(pdpt, 1);
    check_eq!(
        "PDPT[1] P, RW, U, no 1 GiB page",
        Hex(P_RW_U),
        Hex(pdpte & (P_RW_U | LARGE))
    );
    check_eq!(
        "PDPT[1] address: the grant window's PD",
        Hex(BOOT_GRANT_PD_GPA),
        Hex(pdpte & ADDRESS)
    );
    let pde = entry(BOOT_GRANT_PD_GPA, 0);
    check_eq!(
        "grant PD[0] P, RW, U, PS",
        Hex(P_RW_U | LARGE),
        Hex(pde & (P_RW_U | LARGE))
    );
    check_eq!(
        "grant PD[0] address",
        Hex(WINDOW),
        Hex(pde & 0x000f_ffff_ffe0_0000)
    );
}

conformance_test! {
    title: "unknown grant_table_op operations (5, 6, 99, 1 << 32, all ones) return -ENOSYS",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_unknown_op_enosys() {
    for op in [5, 6, 99, 1 << 32, u64::MAX] {
        // SAFETY: unknown operations do nothing (1 << 32 would be grant_access to a
        // hypervisor that reads EDI only, which writes no memory).
        let status = unsafe {
            hv::hypercall(
                Hypercall::GrantTableOp as u64,
                [op, own_id() + 1, page(0), 0, 0],
            )
        };
        check_eq!(
            format_args!("grant_table_op operation {op:#x}"),
            Status::err(Errno::ENOSYS),
            status
        );
    }
}

conformance_test! {
    title: "grant_access: reserved flags, then a misaligned page (-EINVAL), a page not inside RAM (-EFAULT), oneself (-EINVAL), no such domain (-ENOENT), in that order",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_access_errors() {
    let own = own_id();
    let mem = start_info().mem_bytes;
    let einval = Status::err(Errno::EINVAL);
    // Flags first: the page and the grantee are wrong too.
    for flags in [2, 1 << 63, u64::MAX] {
        check_eq!(
            format_args!("GrantAccess(self, {mem:#x} + 1, flags {flags:#x})"),
            einval,
            grant_access(own, mem + 1, flags)
        );
    }
    // Alignment, before the page's bounds and the grantee.
    for gpa in [page(0) + 1, page(0) + 0x800, mem + 1] {
        check_eq!(
            format_args!("GrantAccess(9999, {gpa:#x}), not page-aligned"),
            einval,
            grant_access(9999, gpa, RO)
        );
    }
    // The page inside RAM: -EFAULT, before the grantee.
    for gpa in [mem, mem + PAGE, WINDOW, 1 << 52, !(PAGE - 1)] {
        for grantee in [own, 9999] {
            check_eq!(
                format_args!("GrantAccess({grantee}, {gpa:#x}), not inside RAM"),
                Status::err(Errno::EFAULT),
                grant_access(grantee, gpa, RW)
            );
        }
    }
    check_eq!(
        "GrantAccess(self), own id",
        einval,
        grant_access(own, page(0), RW)
    );
    for grantee in NO_DOMAINS.into_iter().chain([(1 << 32) | own]) {
        check_eq!(
            format_args!("GrantAccess({grantee:#x}), no such domain"),
            Status::err(Errno::ENOENT),
            grant_access(grantee, page(0), RW)
        );
    }
}

conformance_test! {
    title: "end_access of a reference never granted or >= 256 returns -ENOENT",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_end_access_enoent() {
    for reference in [0, 1, 255, 256, 1 << 32, u64::MAX] {
        check_eq!(
            format_args!("EndAccess({reference:#x}), never granted"),
            Status::err(Errno::ENOENT),
            end_access(reference)
        );
    }
}

conformance_test! {
    title: "map: reserved flags, then a slot that is no page of the grant window (-EINVAL), before a granter that is oneself or no domain (-ENOENT)",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_map_local_errors() {
    let own = own_id();
    let einval = Status::err(Errno::EINVAL);
    // Flags first, then the slot: no granter 9999 exists either.
    for flags in [2, 1 << 63, u64::MAX] {
        check_eq!(
            format_args!("Map(9999, 0, {:#x}, flags {flags:#x})", WINDOW + 1),
            einval,
            map(9999, 0, WINDOW + 1, flags)
        );
    }
    for gpa in [
        WINDOW - PAGE,
        WINDOW + 1,
        WINDOW + 0x800,
        WINDOW + GRANT_WINDOW_BYTES,
        0,
        page(0),
        !(PAGE - 1),
    ] {
        check_eq!(
            format_args!("Map(9999, 0, {gpa:#x}), not a page of the grant window"),
            einval,
            map(9999, 0, gpa, RW)
        );
    }
    for granter in NO_DOMAINS.into_iter().chain([own, (1 << 32) | own]) {
        check_eq!(
            format_args!("Map({granter:#x}, 0, {:#x}), no other domain", slot(0)),
            Status::err(Errno::ENOENT),
            map(granter, 0, slot(0), RO)
        );
    }
    check_eq!(
        "Unmap of the slot the refused maps named",
        Status::err(Errno::ENOENT),
        unmap(slot(0))
    );
}

conformance_test! {
    title: "unmap: an address that is no page of the grant window is -EINVAL, a page with nothing mapped -ENOENT",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_unmap_errors() {
    for gpa in [
        WINDOW + 1,
        WINDOW + 0xfff,
        WINDOW - PAGE,
        WINDOW + GRANT_WINDOW_BYTES,
        0,
        page(0),
        u64::MAX,
    ] {
        check_eq!(
            format_args!("Unmap({gpa:#x}), not a page of the grant window"),
            Status::err(Errno::EINVAL),
            unmap(gpa)
        );
    }
    for gpa in [slot(0), slot(1), slot(511)] {
        check_eq!(
            format_args!("Unmap({gpa:#x}), nothing mapped"),
            Status::err(Errno::ENOENT),
            unmap(gpa)
        );
    }
}

conformance_test! {
    title: "copy: a request not inside RAM (-EFAULT), then reserved, direction and offset + len (-EINVAL), the local range (-EFAULT; 0 bytes never), the granter (-ENOENT), in that order",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_copy_local_errors() {
    let mem = start_info().mem_bytes;
    let scratch = [0x5au8; 16];
    let good = request(9999, 0, copy_direction::FROM_GRANT, 0, &scratch);
    // The request itself inside RAM.
    for gpa in [mem - 23, mem, u64::MAX - 7, 1 << 63] {
        // SAFETY: the hypervisor must refuse the request; nothing of ours is named.
        let status = unsafe { copy_at(gpa) };
        check_eq!(
            format_args!("Copy with the request at {gpa:#x}, not inside RAM"),
            Status::err(Errno::EFAULT),
            status
        );
    }
    let with = |f: &dyn Fn(&mut GrantCopy)| {
        let mut r = good;
        f(&mut r);
        r
    };
    // The fields (-EINVAL), before the local range and the granter (both bad here).
    let fields: [(&str, GrantCopy); 7] = [
        (
            "reserved 1",
            with(&|r| (r.reserved, r.local_gpa) = (1, mem)),
        ),
        (
            "direction 2",
            with(&|r| (r.direction, r.local_gpa) = (2, mem)),
        ),
        ("direction 0xff", with(&|r| r.direction = 0xff)),
        (
            "offset 4096 + 1 byte",
            with(&|r| (r.offset, r.len) = (4096, 1)),
        ),
        (
            "4097 bytes",
            with(&|r| (r.len, r.local_gpa) = (4097, 0x1000)),
        ),
        (
            "offset 0xffffffff + 2",
            with(&|r| (r.offset, r.len) = (u32::MAX, 2)),
        ),
        (
            "offset 1 + 0xffffffff",
            with(&|r| (r.offset, r.len) = (1, u32::MAX)),
        ),
    ];
    for (what, r) in fields {
        // SAFETY: refused; the local range, if written, would be `scratch` or nothing.
        let status = unsafe { copy_raw(&r) };
        check_eq!(
            format_args!("Copy, {what}"),
            Status::err(Errno::EINVAL),
            status
        );
    }
    // The local range (-EFAULT), before the granter.
    for (gpa, len) in [(mem - 4, 8), (mem, 1), (u64::MAX - 3, 8)] {
        let r = with(&|r| (r.local_gpa, r.len) = (gpa, len));
        // SAFETY: refused, and the range is not RAM of ours.
        let status = unsafe { copy_raw(&r) };
        check_eq!(
            format_args!("Copy, local range {gpa:#x} + {len}"),
            Status::err(Errno::EFAULT),
            status
        );
    }
    // An empty local range is never out of bounds: the granter is checked next.
    let empty = with(&|r| (r.local_gpa, r.len) = (mem, 0));
    // SAFETY: nothing to write.
    let status = unsafe { copy_raw(&empty) };
    check_eq!(
        "Copy of 0 bytes at the end of RAM, granter 9999",
        Status::err(Errno::ENOENT),
        status
    );
    for granter in [own_id(), 0, 9999, DOMID_SELF, 0xffff] {
        let r = with(&|r| r.domain = granter as u16);
        // SAFETY: the local range is `scratch`.
        let status = unsafe { copy_raw(&r) };
        check_eq!(
            format_args!("Copy from domain {granter:#x}, no other domain"),
            Status::err(Errno::ENOENT),
            status
        );
    }
    check_eq!("the local buffer", [0x5au8; 16], scratch);
}

conformance_test! {
    title: "grant_table_op entries of a multicall run as the hypercall, each with its own result",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_in_multicall() {
    let op = |args: [u64; 5]| hv::entry(Hypercall::GrantTableOp, args, 0xdead);
    let mut entries: [MulticallEntry; 4] = [
        op([GrantTableOp::EndAccess as u64, 5, 0, 0, 0]),
        op([77, 0, 0, 0, 0]),
        op([GrantTableOp::Unmap as u64, slot(0), 0, 0, 0]),
        op([GrantTableOp::GrantAccess as u64, 9999, page(0), 0, 0]),
    ];
    // SAFETY: none of the entries writes guest memory.
    let status = unsafe { hv::multicall(&mut entries) };
    check_eq!("Multicall of 4 grant_table_op entries", Status(4), status);
    let expected = [Errno::ENOENT, Errno::ENOSYS, Errno::ENOENT, Errno::ENOENT];
    for (i, (entry, errno)) in entries.iter().zip(expected).enumerate() {
        check_eq!(
            format_args!("entry {i} result"),
            Status::err(errno),
            Status(entry.result)
        );
    }
}

conformance_test! {
    title: "a read of a grant window page with nothing mapped stops the domain",
    section: "16 Grant tables",
    expect: StoppedByHv("outside its memory: read or fetch at guest-physical 0x40005000"),
}
pub(super) fn grant_window_unmapped_stopped() {
    let gpa = slot(5);
    println!("grant_window_unmapped_stopped: reading guest-physical {gpa:#x}, nothing mapped");
    let value = read_word(gpa);
    fail(format_args!("the read returned {value:#x}"));
}

// ----- grant_map_rw_a / grant_map_rw_b -----
//
// a grants page 0 read-write (reference 0) and waits for b's MAPPED; ending it is -EBUSY
// while b has it mapped (twice). b maps it at slots 0 (read-write) and 7 (read-only), reads
// a's bytes, copies both ways, writes MAPPED. a says UNMAP_NOW; b unmaps both and a's
// EndAccess then succeeds; b sees the grant gone (copy and map -ENOENT).

conformance_test! {
    title: "with grant_map_rw_b (id + 1): grants a page read-write as reference 0; end_access is -EBUSY while b has it mapped, 0 once b unmapped it, then -ENOENT",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_map_rw_a() {
    let partner = own_id() + 1;
    let shared = page(0);
    fill_page(shared);
    let Some(reference) = offer(partner, shared, RW, "grant_map_rw_b") else {
        return;
    };
    check_eq!("the first grant's reference", 0, reference);
    if !wait_word(shared + WORD_GRANTEE, MAPPED, "domain B mapping the grant") {
        return;
    }
    check_eq!(
        "word 3, written by the partner's copy",
        Hex(COPIED),
        Hex(read_word(shared + WORD_COPIED))
    );
    check_eq!(
        "EndAccess(0) while the partner has it mapped",
        Status::err(Errno::EBUSY),
        end_access(0)
    );
    write_word(shared + WORD_GRANTER, UNMAP_NOW);
    let last = retry_while(Status::err(Errno::EBUSY), || end_access(0));
    check_eq!("EndAccess(0) once the partner unmapped it", Status(0), last);
    check_eq!(
        "EndAccess(0) of the ended grant",
        Status::err(Errno::ENOENT),
        end_access(0)
    );
}

conformance_test! {
    title: "with grant_map_rw_a (id - 1): maps a's grant read-write and again read-only, reads a's bytes, writes through one slot and reads through the other, copies both ways, unmaps; afterwards copy and map are -ENOENT",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_map_rw_b() {
    let partner = own_id() - 1;
    if !partner_running(partner, "grant_map_rw_a") || !map_when_granted(partner, 0, slot(0), RW) {
        return;
    }
    if !check_filled("the page mapped at slot 0", slot(0)) {
        return;
    }
    check_eq!(
        "Map of the same grant again at slot 7, read-only",
        Status(0),
        map(partner, 0, slot(7), RO)
    );
    check_filled("the page mapped at slot 7", slot(7));
    let mut bytes = [0u8; 100];
    check_eq!(
        "Copy of 100 bytes from offset 64",
        Status(100),
        copy_from(partner, 0, 64, &mut bytes)
    );
    let wrong = (0..100).find(|&i| bytes[i] != body_byte(64 + i as u64));
    check!(wrong.is_none(), "copied byte {wrong:?} differs");
    check_eq!(
        "Copy of 8 bytes to offset 24",
        Status(8),
        copy_to(partner, 0, WORD_COPIED as u32, &COPIED.to_le_bytes())
    );
    check_eq!(
        "word 3 through the mapping after the copy",
        Hex(COPIED),
        Hex(read_word(slot(0) + WORD_COPIED))
    );
    write_word(slot(0) + WORD_GRANTEE, MAPPED);
    check_eq!(
        "word 1 through slot 7 after a write through slot 0",
        Hex(MAPPED),
        Hex(read_word(slot(7) + WORD_GRANTEE))
    );
    if !wait_word(slot(0) + WORD_GRANTER, UNMAP_NOW, "domain A's go-ahead") {
        return;
    }
    check_eq!("Unmap(slot 0)", Status(0), unmap(slot(0)));
    check_eq!("Unmap(slot 7)", Status(0), unmap(slot(7)));
    check_eq!(
        "Unmap(slot 0) again",
        Status::err(Errno::ENOENT),
        unmap(slot(0))
    );
    let mut byte = [0u8; 1];
    let last = retry_while(Status(1), || copy_from(partner, 0, 0, &mut byte));
    check_eq!(
        "Copy from the grant after domain A ended it",
        Status::err(Errno::ENOENT),
        last
    );
    check_eq!(
        "Map of the ended grant",
        Status::err(Errno::ENOENT),
        map(partner, 0, slot(0), RW)
    );
}

// ----- grant_readonly_a / grant_readonly_b -----
//
// a grants page 0 read-only (reference 0) and page 1 read-write as a mailbox (reference 1).
// b may map reference 0 read-only only, reads it, copies from it but not to it, unmaps it
// and copies DONE into the mailbox; a then finds page 0 unchanged and ends both grants.

conformance_test! {
    title: "with grant_readonly_b (id + 1): grants a page read-only and a mailbox; the read-only page is unchanged after b's tries",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_readonly_a() {
    let partner = own_id() + 1;
    let (data, mailbox) = (page(0), page(1));
    fill_page(data);
    fill_page(mailbox);
    let Some(reference) = offer(partner, data, RO, "grant_readonly_b") else {
        return;
    };
    check_eq!("the read-only grant's reference", 0, reference);
    check_eq!(
        "GrantAccess of the mailbox",
        Status(1),
        grant_access(partner, mailbox, RW)
    );
    if !wait_word(
        mailbox + WORD_GRANTEE,
        DONE,
        "domain B's copy into the mailbox",
    ) {
        return;
    }
    check_filled("the read-only page after the partner's tries", data);
    check_eq!("EndAccess(0)", Status(0), end_access(0));
    check_eq!("EndAccess(1), only ever copied", Status(0), end_access(1));
}

conformance_test! {
    title: "with grant_readonly_a (id - 1): a read-only grant maps read-only only (-EPERM before -EEXIST), reads and copies from it work, a copy to it is -EPERM",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_readonly_b() {
    let partner = own_id() - 1;
    if !partner_running(partner, "grant_readonly_a") || !map_when_granted(partner, 0, slot(0), RO) {
        return;
    }
    let eperm = Status::err(Errno::EPERM);
    check_eq!(
        "Map of the read-only grant read-write",
        eperm,
        map(partner, 0, slot(1), RW)
    );
    check_eq!(
        "Map read-write at the used slot (-EPERM before -EEXIST)",
        eperm,
        map(partner, 0, slot(0), RW)
    );
    check_eq!(
        "Map read-only at the used slot",
        Status::err(Errno::EEXIST),
        map(partner, 0, slot(0), RO)
    );
    check_eq!(
        "Unmap(slot 1), the refused map left nothing",
        Status::err(Errno::ENOENT),
        unmap(slot(1))
    );
    check_filled("the read-only page", slot(0));
    let mut word = [0u8; 8];
    check_eq!(
        "Copy from the read-only grant",
        Status(8),
        copy_from(partner, 0, 0, &mut word)
    );
    check_eq!(
        "the word copied",
        Hex(PATTERN),
        Hex(u64::from_le_bytes(word))
    );
    check_eq!(
        "Copy to the read-only grant",
        eperm,
        copy_to(partner, 0, 0, &0u64.to_le_bytes())
    );
    check_eq!(
        "the pattern word after the refused copy",
        Hex(PATTERN),
        Hex(read_word(slot(0)))
    );
    check_eq!("Unmap(slot 0)", Status(0), unmap(slot(0)));
    let last = retry_while(Status::err(Errno::ENOENT), || {
        copy_to(partner, 1, WORD_GRANTEE as u32, &DONE.to_le_bytes())
    });
    check_eq!("Copy of DONE into the mailbox", Status(8), last);
}

// ----- grant_ro_write_a / grant_ro_write_b -----
//
// a grants page 0 read-only and page 1 as a mailbox. b maps page 0 at slot 3, tells a, and
// once a saw -EBUSY and acknowledged, writes through the read-only mapping: the hypervisor
// stops b, which drops its mapping, so a's EndAccess succeeds and page 0 is unchanged.

/// The slot b writes through.
const RO_WRITE_SLOT: u64 = GRANT_WINDOW_GPA + 3 * GRANT_PAGE_BYTES;

conformance_test! {
    title: "with grant_ro_write_b (id + 1): end_access is -EBUSY while b has the read-only grant mapped and 0 once the hypervisor stopped b; the page is unchanged",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_ro_write_a() {
    let partner = own_id() + 1;
    let (data, mailbox) = (page(0), page(1));
    fill_page(data);
    fill_page(mailbox);
    if offer(partner, data, RO, "grant_ro_write_b").is_none() {
        return;
    }
    check_eq!(
        "GrantAccess of the mailbox",
        Status(1),
        grant_access(partner, mailbox, RW)
    );
    if !wait_word(mailbox + WORD_GRANTEE, MAPPED, "domain B mapping the grant") {
        return;
    }
    check_eq!(
        "EndAccess(0) while mapped",
        Status::err(Errno::EBUSY),
        end_access(0)
    );
    write_word(mailbox + WORD_GRANTER, ACK);
    let last = retry_while(Status::err(Errno::EBUSY), || end_access(0));
    check_eq!(
        "EndAccess(0) once the hypervisor stopped domain B",
        Status(0),
        last
    );
    check_filled("the read-only page after domain B's write", data);
    check_eq!("EndAccess(1)", Status(0), end_access(1));
}

conformance_test! {
    title: "with grant_ro_write_a (id - 1): a write through a read-only grant mapping stops the domain",
    section: "16 Grant tables",
    expect: StoppedByHv("write to a read-only grant at 0x40003000"),
}
pub(super) fn grant_ro_write_b() {
    let partner = own_id() - 1;
    if !partner_running(partner, "grant_ro_write_a")
        || !map_when_granted(partner, 0, RO_WRITE_SLOT, RO)
    {
        return;
    }
    check_filled("the read-only page", RO_WRITE_SLOT);
    let last = retry_while(Status::err(Errno::ENOENT), || {
        copy_to(partner, 1, WORD_GRANTEE as u32, &MAPPED.to_le_bytes())
    });
    check_eq!("Copy of MAPPED into the mailbox", Status(8), last);
    let mut word = [0u8; 8];
    let acknowledged = wait_for(|| {
        copy_from(partner, 1, WORD_GRANTER as u32, &mut word) == Status(8)
            && u64::from_le_bytes(word) == ACK
    });
    if !check!(acknowledged, "domain A never acknowledged") {
        return;
    }
    println!("grant_ro_write_b: writing through the read-only mapping at {RO_WRITE_SLOT:#x}");
    write_word(RO_WRITE_SLOT, 0xbad);
}

// ----- grant_revoke_a / grant_revoke_b -----
//
// a grants page 0 read-write, waits until b has it mapped, and powers off. b's slot then
// shows a page of zeros of its own, which it may write; the grant is gone (copy and map
// -ENOENT) and the slot unmaps normally.

conformance_test! {
    title: "with grant_revoke_b (id + 1): grants a page read-write and powers off while b has it mapped",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_revoke_a() {
    let partner = own_id() + 1;
    let shared = page(0);
    fill_page(shared);
    if offer(partner, shared, RW, "grant_revoke_b").is_none() {
        return;
    }
    wait_word(shared + WORD_GRANTEE, MAPPED, "domain B mapping the grant");
    println!("grant_revoke_a: powering off with the grant mapped by domain {partner}");
}

conformance_test! {
    title: "with grant_revoke_a (id - 1): once a ended, the slot shows a writable page of zeros; copy and map are -ENOENT; the slot unmaps",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_revoke_b() {
    let partner = own_id() - 1;
    let at = slot(2);
    if !partner_running(partner, "grant_revoke_a") || !map_when_granted(partner, 0, at, RW) {
        return;
    }
    check_filled("the page mapped", at);
    write_word(at + WORD_GRANTEE, MAPPED);
    let revoked = wait_for(|| read_word(at) == 0);
    if !check!(
        revoked,
        "the slot still shows {:#x} {} ms after domain A was told to power off",
        read_word(at),
        GIVE_UP_NS / MS
    ) {
        return;
    }
    let nonzero = (0..PAGE)
        .step_by(8)
        .find(|&offset| read_word(at + offset) != 0);
    check!(
        nonzero.is_none(),
        "the revoked slot is not all zeros: offset {nonzero:?}"
    );
    write_word(at + 8, 0x1234_5678);
    check_eq!(
        "a word written to the page of zeros",
        Hex(0x1234_5678),
        Hex(read_word(at + 8))
    );
    let mut byte = [0u8; 1];
    check_eq!(
        "Copy from the revoked grant",
        Status::err(Errno::ENOENT),
        copy_from(partner, 0, 0, &mut byte)
    );
    check_eq!(
        "Map of the revoked grant",
        Status::err(Errno::ENOENT),
        map(partner, 0, slot(3), RW)
    );
    check_eq!(
        "Map at the revoked slot",
        Status::err(Errno::ENOENT),
        map(partner, 0, at, RW)
    );
    check_eq!("Unmap of the revoked slot", Status(0), unmap(at));
    check_eq!("Unmap again", Status::err(Errno::ENOENT), unmap(at));
}

// ----- grant_errors_a / grant_errors_b / grant_errors_c -----
//
// a grants page 0 read-write and page 1 read-only to b (references 0, 1) and page 2 to c
// (reference 2). b checks map and copy against them: another's grant, read-only, used slots,
// the order of the checks; c maps its own grant and is refused b's. When both said DONE, a
// fills its table (-ENOSPC after 256), then says FINISHED, and b unmaps.

conformance_test! {
    title: "with grant_errors_b and _c (id + 1, + 2): grants two pages to b and one to c; then fills its table: -ENOSPC after 256 references (after the other checks), the lowest free reference is reused",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_errors_a() {
    let (b, c) = (own_id() + 1, own_id() + 2);
    for n in 0..3 {
        fill_page(page(n));
    }
    if offer(b, page(0), RW, "grant_errors_b").is_none() {
        return;
    }
    check_eq!(
        "GrantAccess(b, page 1, read-only)",
        Status(1),
        grant_access(b, page(1), RO)
    );
    if offer(c, page(2), RW, "grant_errors_c").is_none() {
        return;
    }
    let b_done = wait_word(page(0) + WORD_GRANTEE, DONE, "domain B's checks");
    let c_done = wait_word(page(2) + WORD_GRANTEE, DONE, "domain C's checks");
    if !(b_done && c_done) {
        return;
    }
    // Fill the table: references 3..=255, then -ENOSPC.
    for reference in 3..u64::from(GRANT_TABLE_ENTRIES) {
        if !check_eq!(
            "GrantAccess: the lowest free reference",
            Status(reference),
            grant_access(b, page(1), RO)
        ) {
            return;
        }
    }
    check_eq!(
        "GrantAccess with all 256 references in use",
        Status::err(Errno::ENOSPC),
        grant_access(b, page(1), RO)
    );
    // -ENOSPC comes last.
    check_eq!(
        "GrantAccess, full table, bad flags",
        Status::err(Errno::EINVAL),
        grant_access(b, page(1), 2)
    );
    check_eq!(
        "GrantAccess, full table, no such domain",
        Status::err(Errno::ENOENT),
        grant_access(9999, page(1), RO)
    );
    check_eq!("EndAccess(100)", Status(0), end_access(100));
    check_eq!(
        "GrantAccess reuses the freed reference",
        Status(100),
        grant_access(b, page(1), RO)
    );
    for reference in 3..u64::from(GRANT_TABLE_ENTRIES) {
        if !check_eq!(
            format_args!("EndAccess({reference})"),
            Status(0),
            end_access(reference)
        ) {
            return;
        }
    }
    write_word(page(0) + WORD_GRANTER, FINISHED);
    let last = retry_while(Status::err(Errno::EBUSY), || end_access(0));
    check_eq!("EndAccess(0) once domain B unmapped it", Status(0), last);
    check_eq!("EndAccess(1)", Status(0), end_access(1));
    check_eq!(
        "EndAccess(2), unmapped by domain C",
        Status(0),
        end_access(2)
    );
}

conformance_test! {
    title: "with grant_errors_a (id - 1): map and copy of a grant to another domain or read-only read-write are -EPERM, before -EEXIST for a used slot; unknown references -ENOENT; copy range, fields and local buffer errors against a real grant",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_errors_b() {
    let a = own_id() - 1;
    if !partner_running(a, "grant_errors_a") || !map_when_granted(a, 0, slot(0), RW) {
        return;
    }
    let (eperm, enoent, einval) = (
        Status::err(Errno::EPERM),
        Status::err(Errno::ENOENT),
        Status::err(Errno::EINVAL),
    );
    // Reference 2 is domain C's.
    let last = retry_while(enoent, || map(a, 2, slot(1), RW));
    check_eq!("Map of a grant to another domain", eperm, last);
    check_eq!("... read-only", eperm, map(a, 2, slot(1), RO));
    let mut bytes = [0u8; 8];
    check_eq!(
        "Copy from a grant to another domain",
        eperm,
        copy_from(a, 2, 0, &mut bytes)
    );
    check_eq!(
        "Copy to a grant to another domain",
        eperm,
        copy_to(a, 2, 0, &bytes)
    );
    // Reference 1 is read-only.
    check_eq!(
        "Map of a read-only grant read-write",
        eperm,
        map(a, 1, slot(1), RW)
    );
    check_eq!("Copy to a read-only grant", eperm, copy_to(a, 1, 0, &bytes));
    check_eq!("Map(a, 1) read-only", Status(0), map(a, 1, slot(1), RO));
    // A used slot is -EEXIST, after every other check.
    let eexist = Status::err(Errno::EEXIST);
    check_eq!("Map(a, 0) at slot 1, used", eexist, map(a, 0, slot(1), RO));
    check_eq!("Map(a, 1) at slot 0, used", eexist, map(a, 1, slot(0), RO));
    check_eq!(
        "Map(a, 2) at slot 0: EPERM first",
        eperm,
        map(a, 2, slot(0), RW)
    );
    check_eq!(
        "Map(a, 1) read-write at slot 0: EPERM first",
        eperm,
        map(a, 1, slot(0), RW)
    );
    for reference in [3, 200, 255, 256, 1 << 32, u64::MAX] {
        check_eq!(
            format_args!("Map(a, {reference:#x}) at slot 0: no such grant, ENOENT first"),
            enoent,
            map(a, reference, slot(0), RW)
        );
    }
    let c = own_id() + 1;
    check_eq!(
        "Map(c, 5): c granted nothing",
        enoent,
        map(c, 5, slot(2), RW)
    );
    check_eq!("Map(a, 0) with bad flags", einval, map(a, 0, slot(2), 2));
    check_eq!("Map(a, 0) at a bad slot", einval, map(a, 0, WINDOW + 8, RW));
    // Copy checks against a real grant.
    let mut page_bytes = [0u8; 6];
    check_eq!(
        "Copy of the last 6 bytes of the page",
        Status(6),
        copy_from(a, 0, 4090, &mut page_bytes)
    );
    let wrong = (0..6).find(|&i| page_bytes[i] != body_byte(4090 + i as u64));
    check!(wrong.is_none(), "copied byte {wrong:?} differs");
    check_eq!(
        "Copy of 0 bytes at offset 4096",
        Status(0),
        copy_from(a, 0, 4096, &mut [])
    );
    let r = request(a, 0, copy_direction::FROM_GRANT, 4090, &page_bytes);
    let refused: [(&str, GrantCopy, Errno); 6] = [
        (
            "7 bytes at offset 4090",
            GrantCopy { len: 7, ..r },
            Errno::EINVAL,
        ),
        ("reserved 1", GrantCopy { reserved: 1, ..r }, Errno::EINVAL),
        (
            "direction 2",
            GrantCopy { direction: 2, ..r },
            Errno::EINVAL,
        ),
        (
            "local range at the end of RAM",
            GrantCopy {
                local_gpa: start_info().mem_bytes - 2,
                ..r
            },
            Errno::EFAULT,
        ),
        (
            "reference 200",
            GrantCopy {
                grant_ref: 200,
                ..r
            },
            Errno::ENOENT,
        ),
        (
            "reference 2, domain C's",
            GrantCopy { grant_ref: 2, ..r },
            Errno::EPERM,
        ),
    ];
    for (what, request, errno) in refused {
        // SAFETY: the local range is `page_bytes` (or not RAM of ours).
        let status = unsafe { copy_raw(&request) };
        check_eq!(format_args!("Copy, {what}"), Status::err(errno), status);
    }
    check_eq!(
        "Copy of 8 bytes to the end of the page",
        Status(8),
        copy_to(a, 0, 4088, &DONE.to_le_bytes())
    );
    check_eq!(
        "the copied word through the mapping",
        Hex(DONE),
        Hex(read_word(slot(0) + 4088))
    );
    check_eq!("Unmap(slot 1)", Status(0), unmap(slot(1)));
    write_word(slot(0) + WORD_GRANTEE, DONE);
    if wait_word(
        slot(0) + WORD_GRANTER,
        FINISHED,
        "domain A filling its table",
    ) {
        check_eq!("Unmap(slot 0)", Status(0), unmap(slot(0)));
    }
}

conformance_test! {
    title: "with grant_errors_a (id - 2): maps the grant made to it; domain B's grant is -EPERM to map or copy",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_errors_c() {
    let a = own_id() - 2;
    if !partner_running(a, "grant_errors_a") || !map_when_granted(a, 2, slot(0), RW) {
        return;
    }
    check_filled("the page granted to this domain", slot(0));
    let eperm = Status::err(Errno::EPERM);
    check_eq!("Map of domain B's grant", eperm, map(a, 0, slot(1), RO));
    let mut bytes = [0u8; 8];
    check_eq!(
        "Copy from domain B's grant",
        eperm,
        copy_from(a, 0, 0, &mut bytes)
    );
    write_word(slot(0) + WORD_GRANTEE, DONE);
    check_eq!("Unmap(slot 0)", Status(0), unmap(slot(0)));
}

// ----- grant_unmap_access_a / grant_unmap_access_b -----
//
// b maps a's page, reads and writes it (so the TLB holds the translation), unmaps it and
// reads the slot again: no stale translation may survive the unmap, so the hypervisor stops
// b. a's EndAccess succeeds once b unmapped.

/// The slot b unmaps and then reads.
const UNMAPPED_SLOT: u64 = GRANT_WINDOW_GPA + 4 * GRANT_PAGE_BYTES;

conformance_test! {
    title: "with grant_unmap_access_b (id + 1): grants a page read-write; end_access succeeds once b unmapped it",
    section: "16 Grant tables",
    expect: Success,
}
pub(super) fn grant_unmap_access_a() {
    let partner = own_id() + 1;
    let shared = page(0);
    fill_page(shared);
    if offer(partner, shared, RW, "grant_unmap_access_b").is_none() {
        return;
    }
    if !wait_word(shared + WORD_GRANTEE, MAPPED, "domain B mapping the grant") {
        return;
    }
    let last = retry_while(Status::err(Errno::EBUSY), || end_access(0));
    check_eq!("EndAccess(0) once domain B unmapped it", Status(0), last);
}

conformance_test! {
    title: "with grant_unmap_access_a (id - 1): after using a mapped grant and unmapping it, a read of the slot stops the domain: no stale translation survives unmap",
    section: "16 Grant tables",
    expect: StoppedByHv("outside its memory: read or fetch at guest-physical 0x40004000"),
}
pub(super) fn grant_unmap_access_b() {
    let partner = own_id() - 1;
    if !partner_running(partner, "grant_unmap_access_a")
        || !map_when_granted(partner, 0, UNMAPPED_SLOT, RW)
    {
        return;
    }
    check_filled("the page mapped", UNMAPPED_SLOT);
    write_word(UNMAPPED_SLOT + WORD_GRANTEE, MAPPED);
    if !check_eq!("Unmap", Status(0), unmap(UNMAPPED_SLOT)) {
        return;
    }
    println!("grant_unmap_access_b: reading {UNMAPPED_SLOT:#x} after unmapping it");
    let value = read_word(UNMAPPED_SLOT);
    fail(format_args!(
        "a read of the unmapped slot returned {value:#x}: a stale translation survived Unmap"
    ));
}

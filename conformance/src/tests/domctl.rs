//! Tests of domain control (docs/abi.md 17; ABI 1.3): `domctl_op` list_domains, read_console,
//! pause, unpause, destroy and phys_info, privilege, the order of the checks, and the
//! teardown of a destroyed domain.
//!
//! Most need a partner and come in pairs, `<x>_a` (booted with `privileged=1`) and `<x>_b`,
//! next to each other in the catalog, so that b is domain A + 1. b offers a its first port
//! (port 2, AllocUnbound for A) and waits on it: a binds it once b is ready (b does all it
//! has to before it offers), and sends on it when it is done; a's end closing (a ending) wakes
//! b as well. A partner that does not exist (`-ENOENT`) makes a test SKIP.

use lamina_abi::Errno;
use lamina_abi::cpuid::{LEAF_VERSION, features};
use lamina_abi::domctl::{
    DOMAIN_FLAG_PRIVILEGED, DomainInfo, DomctlOp, PhysInfo, domain_state, ending,
};
use lamina_abi::event_channel::{DOMID_SELF, PortState};
use lamina_abi::start_info::START_FLAG_PRIVILEGED;
use lamina_guest_sdk::cpuid::cpuid;
use lamina_guest_sdk::start_info;

use super::common::port_status;
use crate::console::println;
use crate::framework::{Hex, Status, check, check_eq, error, expect_ok, fail, skip};
use crate::hv;
use crate::shared;
use crate::timing::{GIVE_UP_NS, MS};

const LIST: u64 = DomctlOp::ListDomains as u64;
const READ_CONSOLE: u64 = DomctlOp::ReadConsole as u64;
const PAUSE: u64 = DomctlOp::Pause as u64;
const UNPAUSE: u64 = DomctlOp::Unpause as u64;
const DESTROY: u64 = DomctlOp::Destroy as u64;
const PHYS_INFO: u64 = DomctlOp::PhysInfo as u64;

/// The operations that name a domain and write nothing.
const CONTROLS: [(u64, &str); 3] = [(PAUSE, "Pause"), (UNPAUSE, "Unpause"), (DESTROY, "Destroy")];

/// The port a partner offers (its first allocation).
const PARTNER_PORT: u64 = 2;

/// Entries the tests list at most: more than the domains of a conformance boot.
const MAX_LISTED: usize = 40;

/// What the hypervisor must not have written.
const SENTINEL_INFO: DomainInfo = DomainInfo {
    domain_id: 0xeeee_eeee,
    state: 0xeeee_eeee,
    ending: 0xeeee_eeee,
    flags: 0xeeee_eeee,
    weight: 0xeeee_eeee,
    reserved: 0xeeee_eeee,
    memory_bytes: u64::MAX,
    cpu_ns: u64::MAX,
    console_bytes: u64::MAX,
    name: [0xee; 32],
};

const SENTINEL_PHYS: PhysInfo = PhysInfo {
    total_bytes: u64::MAX,
    free_bytes: u64::MAX,
    domain_bytes: u64::MAX,
    reserved: u64::MAX,
};

fn own_id() -> u64 {
    u64::from(start_info().domain_id)
}

fn mem_bytes() -> u64 {
    start_info().mem_bytes
}

/// Whether this domain was booted with `privileged=1`; an ERROR when it was not (the catalog
/// entry says it must be).
fn privileged() -> bool {
    let flags = start_info().flags;
    if flags & START_FLAG_PRIVILEGED == 0 {
        error(format_args!(
            "StartInfo.flags {flags:#x} lacks START_FLAG_PRIVILEGED: the test needs privileged=1"
        ));
        return false;
    }
    true
}

/// The `domctl_op` result of `op` on `domain` (pause, unpause, destroy).
fn control(op: u64, domain: u64) -> Status {
    hv::domctl(op, domain)
}

/// Every domain's entry, up to [`MAX_LISTED`], and the count ListDomains returned.
fn list() -> Option<(u64, [DomainInfo; MAX_LISTED])> {
    let mut infos = [SENTINEL_INFO; MAX_LISTED];
    let count = expect_ok(
        format_args!("ListDomains({MAX_LISTED} entries)"),
        hv::list_domains(&mut infos),
    )?;
    Some((count, infos))
}

/// Domain `id`'s entry.
fn info_of(id: u64) -> Option<DomainInfo> {
    let (count, infos) = list()?;
    let found = infos[..(count as usize).min(MAX_LISTED)]
        .iter()
        .find(|info| u64::from(info.domain_id) == id)
        .copied();
    if found.is_none() {
        fail(format_args!(
            "ListDomains (count {count}) has no entry for domain {id}"
        ));
    }
    found
}

/// The NUL-terminated name of an entry, as bytes.
fn name_of(info: &DomainInfo) -> &[u8] {
    let len = info.name.iter().position(|&b| b == 0).unwrap_or(32);
    &info.name[..len]
}

/// Yields for `ns` of system time: other domains run meanwhile.
fn yield_for(ns: u64) {
    let until = shared::now() + ns;
    while shared::now() < until {
        let _ = hv::sched_yield();
    }
}

// ----- the partner protocol -----

/// a's side: binds the port domain `partner` (`test` there) offers, retrying while it has not
/// yet; `None` after a SKIP (no such domain) or a failure.
fn connect(partner: u64, test: &str) -> Option<u64> {
    let deadline = shared::now() + GIVE_UP_NS;
    loop {
        let status = hv::bind_interdomain(partner, PARTNER_PORT);
        if status == Status::err(Errno::ENOENT) {
            skip(format_args!(
                "BindInterdomain({partner}, {PARTNER_PORT}): -ENOENT, no domain {partner}: {test} is not running next to this test"
            ));
            return None;
        }
        if status != Status::err(Errno::EINVAL) {
            return expect_ok(
                format_args!("BindInterdomain({partner}, {PARTNER_PORT})"),
                status,
            );
        }
        if shared::now() > deadline {
            fail(format_args!(
                "domain {partner} ({test}) never offered port {PARTNER_PORT} within {} ms",
                GIVE_UP_NS / MS
            ));
            return None;
        }
        let _ = hv::sched_yield();
    }
}

/// b's side: offers port 2 to the partner below; `None` after a SKIP or a failure.
fn offer() -> Option<u64> {
    let Some(partner) = own_id().checked_sub(1).filter(|&p| p > 0) else {
        skip(format_args!("domain 1: no partner below"));
        return None;
    };
    let port = expect_ok(
        format_args!("AllocUnbound({partner}), the partner"),
        hv::alloc_unbound(partner),
    )?;
    check_eq!("the port offered", PARTNER_PORT, port).then_some(port)
}

/// Waits until `port` is pending, for at most `ns`; returns whether it came (and clears it).
fn wait_on(port: u64, ns: u64) -> bool {
    let deadline = shared::now() + ns;
    while !shared::is_pending(port) {
        let now = shared::now();
        if now >= deadline {
            return false;
        }
        // At most 50 ms at a time, so that a lost event costs no more than the deadline.
        let _ = hv::poll(&[port as u32], deadline.min(now + 50 * MS));
    }
    shared::clear_pending(port);
    true
}

/// b's whole part in a pair where a only looks at it: offer, then wait for a's "done".
fn partner_waits(test_a: &str) {
    let Some(port) = offer() else { return };
    println!("{}: ready, waiting for {test_a}", start_info().name());
    check!(
        wait_on(port, 3 * GIVE_UP_NS),
        "{test_a} never said it was done (port {port}) within {} ms",
        3 * GIVE_UP_NS / MS
    );
}

/// a tells b it is done.
fn done(port: u64) {
    check_eq!(
        format_args!("Send({port}), done"),
        Status(0),
        hv::send(port)
    );
}

// ----- domctl_unprivileged_eperm -----

conformance_test! {
    title: "DOMAIN_CONTROL is set; without privileged=1 every domctl_op operation returns -EPERM whatever its arguments and writes nothing; undefined operations return -ENOSYS first",
    section: "17 Domain control",
    expect: Success,
}
pub(super) fn domctl_unprivileged_eperm() {
    if start_info().flags & START_FLAG_PRIVILEGED != 0 {
        error(format_args!("this test must run without privileged=1"));
        return;
    }
    let leaf = cpuid(LEAF_VERSION, 0);
    check!(
        leaf.ebx & features::DOMAIN_CONTROL != 0,
        "CPUID 0x40000001 EBX {:#x} lacks DOMAIN_CONTROL (bit 14)",
        leaf.ebx
    );
    let own = own_id();
    let eperm = Status::err(Errno::EPERM);
    let mut infos = [SENTINEL_INFO; 2];
    check_eq!(
        "ListDomains(2 entries)",
        eperm,
        hv::list_domains(&mut infos)
    );
    check!(
        infos == [SENTINEL_INFO; 2],
        "a refused ListDomains wrote its buffer"
    );
    let mut buffer = [0xeeu8; 16];
    check_eq!(
        "ReadConsole(own id, 0, 16 bytes)",
        eperm,
        hv::read_console(own, 0, &mut buffer)
    );
    check!(
        buffer == [0xee; 16],
        "a refused ReadConsole wrote its buffer"
    );
    for (op, name) in CONTROLS {
        for target in [own + 1, own - 1, own, 9999] {
            check_eq!(format_args!("{name}({target})"), eperm, control(op, target));
        }
    }
    let mut phys = SENTINEL_PHYS;
    check_eq!("PhysInfo", eperm, hv::phys_info(&mut phys));
    check!(phys == SENTINEL_PHYS, "a refused PhysInfo wrote its buffer");
    // Privilege comes before every argument: with each of them invalid, still -EPERM.
    let bad = [u64::MAX, u64::MAX, mem_bytes(), 5000];
    for op in [LIST, READ_CONSOLE, PAUSE, UNPAUSE, DESTROY, PHYS_INFO] {
        // SAFETY: every address is outside RAM: the hypervisor can write nothing of ours.
        let status = unsafe { hv::domctl_op(op, bad) };
        check_eq!(
            format_args!("domctl_op {op} with invalid arguments"),
            eperm,
            status
        );
    }
    // The operation comes before privilege.
    for op in [6, 7, 99, 1 << 32, u64::MAX] {
        check_eq!(
            format_args!("domctl_op {op:#x} (undefined)"),
            Status::err(Errno::ENOSYS),
            control(op, own)
        );
    }
}

// ----- domctl_list_a / domctl_list_b -----

conformance_test! {
    title: "with domctl_list_b: list_domains returns the count, writes min(capacity, count) entries in id order with the right id, state, flags, weight, memory, name and console bytes; -EFAULT writes nothing",
    section: "17 Domain control",
    expect: Success,
    cmdline: "privileged=1",
}
pub(super) fn domctl_list_a() {
    if !privileged() {
        return;
    }
    let own = own_id();
    let partner = own + 1;
    let Some(port) = connect(partner, "domctl_list_b") else {
        return;
    };
    // A slice of ours ends: our own CPU time is counted.
    let _ = hv::sched_yield();
    let Some((count, infos)) = list() else { return };
    if !check!(
        count >= partner,
        "ListDomains returned {count}: domains {own} and {partner} exist"
    ) {
        return;
    }
    let listed = (count as usize).min(MAX_LISTED);
    for (i, info) in infos[..listed].iter().enumerate() {
        check_eq!(
            format_args!("entry {i}: domain_id (id order from 1)"),
            i as u32 + 1,
            info.domain_id
        );
        check_eq!(format_args!("entry {i}: reserved"), 0, info.reserved);
        check!(info.name.contains(&0), "entry {i}: name not NUL-terminated");
    }
    let me = &infos[own as usize - 1];
    check_eq!("own entry: state", domain_state::RUNNING, me.state);
    check_eq!("own entry: ending", ending::NONE, me.ending);
    check_eq!(
        "own entry: flags",
        Hex(DOMAIN_FLAG_PRIVILEGED),
        Hex(me.flags)
    );
    check_eq!("own entry: weight", 256, me.weight);
    check_eq!("own entry: memory_bytes", mem_bytes(), me.memory_bytes);
    check_eq!(
        "own entry: name",
        start_info().name().as_bytes(),
        name_of(me)
    );
    check!(me.cpu_ns > 0, "own entry: cpu_ns 0 after a slice of ours");
    check!(
        me.console_bytes > 0,
        "own entry: console_bytes 0 after our `Test:` line"
    );
    let b = &infos[partner as usize - 1];
    check!(
        b.state == domain_state::RUNNING || b.state == domain_state::BLOCKED,
        "partner: state {}, expected RUNNING (0) or BLOCKED (1)",
        b.state
    );
    check_eq!("partner: ending", ending::NONE, b.ending);
    check_eq!("partner: flags (not privileged)", Hex(0), Hex(b.flags));
    check_eq!("partner: weight (weight=100)", 100, b.weight);
    check_eq!("partner: memory_bytes (mem=4M)", 4 << 20, b.memory_bytes);
    check_eq!("partner: name", b"domctl_list_b".as_slice(), name_of(b));
    check!(
        b.console_bytes > 0,
        "partner: console_bytes 0, but it printed its `Test:` line"
    );

    // Fewer entries than domains: only those are written, the count is all of them.
    let mut two = [SENTINEL_INFO; 2];
    check_eq!(
        "ListDomains(1 entry)",
        Status(count),
        hv::list_domains(&mut two[..1])
    );
    check_eq!("ListDomains(1 entry): its domain_id", 1, two[0].domain_id);
    check!(
        two[1] == SENTINEL_INFO,
        "ListDomains(1 entry) wrote past its entry"
    );
    for gpa in [0, u64::MAX] {
        // SAFETY: 0 entries: nothing is written.
        let status = unsafe { hv::domctl_op(LIST, [gpa, 0, 0, 0]) };
        check_eq!(
            format_args!("ListDomains({gpa:#x}, 0 entries): never out of bounds"),
            Status(count),
            status
        );
    }
    // The part written must be inside RAM.
    let mem = mem_bytes();
    for (gpa, entries) in [(mem - 80, 2), (mem, 1), (1 << 40, 1), (u64::MAX - 79, 1)] {
        // SAFETY: the entries asked for are not inside RAM: nothing of ours is written.
        let status = unsafe { hv::domctl_op(LIST, [gpa, entries, 0, 0]) };
        check_eq!(
            format_args!("ListDomains({gpa:#x}, {entries} entries)"),
            Status::err(Errno::EFAULT),
            status
        );
    }
    done(port);
}

conformance_test! {
    title: "the listed partner of domctl_list_a (weight=100), waits until it is done",
    section: "17 Domain control",
    expect: Success,
    cmdline: "weight=100",
}
pub(super) fn domctl_list_b() {
    partner_waits("domctl_list_a");
}

// ----- domctl_console_a / domctl_console_b -----

/// Lines the partner prints, 100 bytes each with the newline: more than the 4096 kept.
const CONSOLE_LINES: usize = 50;
/// The partner's last line (that of [`partner_waits`]).
const CONSOLE_MARKER: &[u8] = b"domctl_console_b: ready, waiting for domctl_console_a\n";

/// Line `i` of the partner, as the hypervisor prints it (without the newline).
fn console_line(i: usize) -> [u8; 99] {
    let mut line = [b'x'; 99];
    let prefix = b"domctl_console_b line 00: ";
    line[..prefix.len()].copy_from_slice(prefix);
    line[22] = b'0' + (i / 10) as u8;
    line[23] = b'0' + (i % 10) as u8;
    line
}

conformance_test! {
    title: "with domctl_console_b: read_console copies the partner's last 4096 bytes at their stream offsets; 0 at the end; -EINVAL past it and above 4096 bytes; -ENOENT before the bytes kept; -EFAULT; checks in order",
    section: "17 Domain control",
    expect: Success,
    cmdline: "privileged=1",
}
pub(super) fn domctl_console_a() {
    if !privileged() {
        return;
    }
    let own = own_id();
    let partner = own + 1;
    // The partner offers its port once it has printed everything.
    let Some(port) = connect(partner, "domctl_console_b") else {
        return;
    };
    let Some(info) = info_of(partner) else { return };
    let end = info.console_bytes;
    if !check!(
        end >= (CONSOLE_LINES * 100 + CONSOLE_MARKER.len()) as u64,
        "partner: console_bytes {end}, but it printed more than {} bytes",
        CONSOLE_LINES * 100
    ) {
        return;
    }
    let mut kept = [0u8; 4096];
    check_eq!(
        "ReadConsole(partner, end - 4096, 4096 bytes)",
        Status(4096),
        hv::read_console(partner, end - 4096, &mut kept)
    );
    check!(
        kept.ends_with(CONSOLE_MARKER),
        "the last bytes of the partner's console are not its last line {:?}",
        core::str::from_utf8(CONSOLE_MARKER).unwrap_or("")
    );
    let last = 4096 - CONSOLE_MARKER.len() - 100;
    check!(
        kept[last..last + 99] == console_line(CONSOLE_LINES - 1) && kept[last + 99] == b'\n',
        "the partner's line {} is not 100 bytes before its last line",
        CONSOLE_LINES - 1
    );
    // From inside a line, a part of it.
    let line_start = end - CONSOLE_MARKER.len() as u64 - 100;
    let mut part = [0u8; 4];
    check_eq!(
        "ReadConsole(partner, inside its line 49, 4 bytes)",
        Status(4),
        hv::read_console(partner, line_start + 22, &mut part)
    );
    check_eq!("the bytes read", *b"49: ", part);
    let mut buffer = [0u8; 16];
    check_eq!(
        "ReadConsole(partner, end): the end of the stream",
        Status(0),
        hv::read_console(partner, end, &mut buffer)
    );
    check_eq!(
        "ReadConsole(partner, end - 3, 16 bytes): what is there",
        Status(3),
        hv::read_console(partner, end - 3, &mut buffer)
    );
    check_eq!(
        "ReadConsole(partner, end + 1): past the end",
        Status::err(Errno::EINVAL),
        hv::read_console(partner, end + 1, &mut buffer)
    );
    for old in [end - 4097, 0] {
        check_eq!(
            format_args!("ReadConsole(partner, {old}): older than the bytes kept"),
            Status::err(Errno::ENOENT),
            hv::read_console(partner, old, &mut buffer)
        );
    }
    // The order of the checks: the domain, the length, the buffer, the offset.
    let mem = mem_bytes();
    let ours = buffer.as_mut_ptr() as u64;
    let cases: [([u64; 4], Errno, &str); 8] = [
        ([9999, u64::MAX, mem, 5000], Errno::ENOENT, "no such domain"),
        ([0, 0, 0, 16], Errno::ENOENT, "domain 0"),
        ([DOMID_SELF, 0, 0, 16], Errno::ENOENT, "DOMID_SELF"),
        ([partner, u64::MAX, mem, 4097], Errno::EINVAL, "4097 bytes"),
        (
            [partner, u64::MAX, mem, 16],
            Errno::EFAULT,
            "buffer above RAM",
        ),
        (
            [partner, end, mem - 8, 16],
            Errno::EFAULT,
            "buffer straddles the end",
        ),
        (
            [partner, end, u64::MAX - 7, 16],
            Errno::EFAULT,
            "buffer wraps",
        ),
        (
            [partner, u64::MAX, ours, 16],
            Errno::EINVAL,
            "offset far past the end",
        ),
    ];
    for (args, errno, what) in cases {
        // SAFETY: the buffers are outside RAM, or `buffer`, which is ours to overwrite.
        let status = unsafe { hv::domctl_op(READ_CONSOLE, args) };
        check_eq!(
            format_args!("ReadConsole{args:x?} ({what})"),
            Status::err(errno),
            status
        );
    }
    // SAFETY: an empty buffer: nothing is written.
    let empty = unsafe { hv::domctl_op(READ_CONSOLE, [partner, end, u64::MAX, 0]) };
    check_eq!(
        "ReadConsole(partner, end, buffer u64::MAX, 0 bytes)",
        Status(0),
        empty
    );
    // Its own console too: it starts with the kernel's `Test:` line.
    let mut own_start = [0u8; 24];
    check_eq!(
        "ReadConsole(own id, 0, 24 bytes)",
        Status(24),
        hv::read_console(own, 0, &mut own_start)
    );
    check_eq!(
        "the own console's first bytes",
        b"Test: domctl_console_a: ".as_slice(),
        own_start.as_slice()
    );
    done(port);
}

conformance_test! {
    title: "prints 50 lines of 100 bytes and a last one for domctl_console_a to read",
    section: "17 Domain control",
    expect: Success,
}
pub(super) fn domctl_console_b() {
    for i in 0..CONSOLE_LINES {
        let mut line = [0u8; 100];
        line[..99].copy_from_slice(&console_line(i));
        line[99] = b'\n';
        expect_ok("console write of a line", hv::console_write(&line));
    }
    partner_waits("domctl_console_a");
}

// ----- domctl_pause_a / domctl_pause_b -----

/// How long a looks at its partner in each state.
const WATCH_NS: u64 = 20 * MS;

conformance_test! {
    title: "with domctl_pause_b: a paused partner is PAUSED and gets no CPU (cpu_ns still), an event sent meanwhile stays pending and reaches it after unpause; pause and unpause twice return 0",
    section: "17 Domain control",
    expect: Success,
    cmdline: "privileged=1",
}
pub(super) fn domctl_pause_a() {
    if !privileged() {
        return;
    }
    let partner = own_id() + 1;
    let Some(port) = connect(partner, "domctl_pause_b") else {
        return;
    };
    let Some(before) = info_of(partner) else {
        return;
    };
    // With every test of a batch sharing the CPU, the partner's next slice may be a while
    // off: look again every WATCH_NS, up to GIVE_UP_NS.
    let deadline = shared::now() + GIVE_UP_NS;
    let running = loop {
        yield_for(WATCH_NS);
        let Some(running) = info_of(partner) else {
            return;
        };
        if running.cpu_ns > before.cpu_ns || shared::now() > deadline {
            break running;
        }
    };
    check!(
        running.cpu_ns > before.cpu_ns,
        "the partner's cpu_ns stayed {} while it spun and we yielded for up to {} ms",
        before.cpu_ns,
        GIVE_UP_NS / MS
    );
    check_eq!("Pause(partner)", Status(0), control(PAUSE, partner));
    let Some(paused) = info_of(partner) else {
        return;
    };
    check_eq!(
        "partner after Pause: state",
        domain_state::PAUSED,
        paused.state
    );
    check_eq!("partner after Pause: ending", ending::NONE, paused.ending);
    yield_for(WATCH_NS);
    check_eq!(
        "Pause(partner) again: paused already",
        Status(0),
        control(PAUSE, partner)
    );
    // An event for it stays pending while it is paused.
    check_eq!(format_args!("Send({port})"), Status(0), hv::send(port));
    yield_for(WATCH_NS);
    let Some(still) = info_of(partner) else {
        return;
    };
    check_eq!("partner, paused: state", domain_state::PAUSED, still.state);
    check_eq!(
        format_args!(
            "partner, paused for {} ms: cpu_ns (no CPU)",
            2 * WATCH_NS / MS
        ),
        paused.cpu_ns,
        still.cpu_ns
    );
    check!(
        !shared::is_pending(port),
        "the paused partner replied to our send"
    );
    check_eq!("Unpause(partner)", Status(0), control(UNPAUSE, partner));
    let again = control(UNPAUSE, partner);
    let Some(unpaused) = info_of(partner) else {
        return;
    };
    // A host interrupt after Unpause may let the partner run to its end first: it then took
    // the event, replied and powered off (the reply is checked below), and an unpause of a
    // domain that ended is -EINVAL (docs/abi.md 17).
    let finished = unpaused.state == domain_state::SHUTDOWN && unpaused.ending == ending::POWEROFF;
    check!(
        again == Status(0) || (finished && again == Status::err(Errno::EINVAL)),
        "Unpause(partner) again: {again:?}, expected 0 (not paused), or -EINVAL once it had ended (state {} ending {})",
        unpaused.state,
        unpaused.ending
    );
    check!(
        unpaused.state == domain_state::RUNNING
            || unpaused.state == domain_state::BLOCKED
            || finished,
        "partner after Unpause: state {} ending {}, expected RUNNING (0), BLOCKED (1), or SHUTDOWN (3) by POWEROFF (1) once it replied",
        unpaused.state,
        unpaused.ending
    );
    // The event sent while it was paused reaches it now: it replies.
    if !check!(
        wait_on(port, GIVE_UP_NS),
        "no reply from the partner within {} ms of Unpause: the event sent while it was paused was lost, or it does not run",
        GIVE_UP_NS / MS
    ) {
        return;
    }
    // Its CPU time is counted when its slice ends: on a machine with several CPUs the reply
    // can wake us while the partner's slice goes on elsewhere, so look again for a while.
    let deadline = shared::now() + GIVE_UP_NS;
    let after = loop {
        let Some(after) = info_of(partner) else {
            return;
        };
        if after.cpu_ns > still.cpu_ns || shared::now() > deadline {
            break after;
        }
        yield_for(WATCH_NS);
    };
    check!(
        after.cpu_ns > still.cpu_ns,
        "the partner's cpu_ns did not grow after Unpause (still {} after {} ms)",
        after.cpu_ns,
        GIVE_UP_NS / MS
    );
}

conformance_test! {
    title: "spins for domctl_pause_a until its event comes, then replies",
    section: "17 Domain control",
    expect: Success,
}
pub(super) fn domctl_pause_b() {
    let Some(port) = offer() else { return };
    println!("domctl_pause_b: spinning until the partner's event");
    // Busy: the partner sees CPU time go to us whenever we are not paused.
    let deadline = shared::now() + 3 * GIVE_UP_NS;
    while !shared::is_pending(port) {
        if shared::now() > deadline {
            fail(format_args!(
                "no event from domctl_pause_a within {} ms",
                3 * GIVE_UP_NS / MS
            ));
            return;
        }
        let _ = hv::sched_yield();
    }
    shared::clear_pending(port);
    check_eq!(
        format_args!("Send({port}), the reply"),
        Status(0),
        hv::send(port)
    );
}

/// A privileged test's partner (the next domain), connected, with the machine's memory and
/// the partner's entry taken while it is alive.
struct Partner {
    id: u64,
    port: u64,
    before: PhysInfo,
    alive: DomainInfo,
}

/// Checks privilege, connects to the partner (`test`, the next domain) and reads PhysInfo and
/// the partner's entry; `None` (the reason recorded) when any of it fails.
fn partner_alive(test: &str) -> Option<Partner> {
    if !privileged() {
        return None;
    }
    let id = own_id() + 1;
    let port = connect(id, test)?;
    let mut before = SENTINEL_PHYS;
    expect_ok("PhysInfo", hv::phys_info(&mut before))?;
    let alive = info_of(id)?;
    Some(Partner {
        id,
        port,
        before,
        alive,
    })
}

// ----- domctl_destroy_a / domctl_destroy_b -----

const DESTROY_MARKER: &[u8] = b"domctl_destroy_b: waiting to be destroyed\n";

conformance_test! {
    title: "with domctl_destroy_b: destroy tears the partner down before returning: SHUTDOWN, DESTROYED, memory_bytes 0, free_bytes grown by its RAM, its channel end closed and ours raised; then -EINVAL; its console stays readable",
    section: "17 Domain control",
    expect: Success,
    cmdline: "privileged=1",
}
pub(super) fn domctl_destroy_a() {
    let Some(Partner {
        id: partner,
        port,
        before,
        alive,
    }) = partner_alive("domctl_destroy_b")
    else {
        return;
    };
    check_eq!(
        "partner: memory_bytes before Destroy",
        4 << 20,
        alive.memory_bytes
    );
    if !check_eq!("Destroy(partner)", Status(0), control(DESTROY, partner)) {
        return;
    }
    // Torn down before Destroy returned.
    let Some(gone) = info_of(partner) else { return };
    check_eq!(
        "partner after Destroy: state",
        domain_state::SHUTDOWN,
        gone.state
    );
    check_eq!(
        "partner after Destroy: ending",
        ending::DESTROYED,
        gone.ending
    );
    check_eq!("partner after Destroy: memory_bytes", 0, gone.memory_bytes);
    check_eq!(
        "partner after Destroy: console_bytes (kept)",
        alive.console_bytes,
        gone.console_bytes
    );
    let mut after = SENTINEL_PHYS;
    if expect_ok("PhysInfo after Destroy", hv::phys_info(&mut after)).is_some() {
        check!(
            after.free_bytes >= before.free_bytes + alive.memory_bytes,
            "free_bytes grew from {:#x} to {:#x}: less than the partner's {:#x} bytes of RAM",
            before.free_bytes,
            after.free_bytes,
            alive.memory_bytes
        );
        // Other domains may have ended meanwhile (we may be preempted): at least its RAM.
        check!(
            after.domain_bytes + alive.memory_bytes <= before.domain_bytes,
            "domain_bytes went from {:#x} to {:#x}: down by less than the partner's {:#x} bytes",
            before.domain_bytes,
            after.domain_bytes,
            alive.memory_bytes
        );
        check_eq!("total_bytes", before.total_bytes, after.total_bytes);
        check_eq!("reserved", 0, after.reserved);
    }
    // Its channel was closed as a guest close does: our end is unbound for it, and raised.
    if let Some(status) = port_status(port) {
        check_eq!(
            "our end after Destroy: state",
            PortState::Unbound as u8,
            status.state
        );
        check_eq!(
            "our end after Destroy: detail (the destroyed domain)",
            partner,
            u64::from(status.detail)
        );
        check!(status.pending, "our end was not raised by the teardown");
    }
    check_eq!(format_args!("Close({port})"), Status(0), hv::close(port));
    // An ended domain cannot be paused, unpaused or destroyed.
    for (op, name) in CONTROLS {
        check_eq!(
            format_args!("{name}(the destroyed partner)"),
            Status::err(Errno::EINVAL),
            control(op, partner)
        );
    }
    // Its console output stays readable.
    let mut last = [0u8; DESTROY_MARKER.len()];
    check_eq!(
        "ReadConsole(the destroyed partner, its last line)",
        Status(last.len() as u64),
        hv::read_console(partner, gone.console_bytes - last.len() as u64, &mut last)
    );
    check_eq!("its last line", DESTROY_MARKER, last.as_slice());
}

conformance_test! {
    title: "offers domctl_destroy_a a port and waits to be destroyed (end=destroyed, no result line)",
    section: "17 Domain control",
    expect: Ends("destroyed"),
}
pub(super) fn domctl_destroy_b() {
    let Some(port) = offer() else { return };
    expect_ok("console write", hv::console_write(DESTROY_MARKER));
    // Never returns if all goes well: the partner destroys this domain.
    let deadline = shared::now() + 3 * GIVE_UP_NS;
    while shared::now() < deadline {
        wait_on(port, 50 * MS);
    }
    fail(format_args!(
        "not destroyed by domctl_destroy_a within {} ms",
        3 * GIVE_UP_NS / MS
    ));
}

// ----- domctl_self_and_unknown_ids -----

conformance_test! {
    title: "pause, unpause and destroy of the caller return -EINVAL; ids that name no domain (0, DOMID_SELF, count + 1, truncations) -ENOENT, for read_console too; phys_info figures and -EFAULT",
    section: "17 Domain control",
    expect: Success,
    cmdline: "privileged=1",
}
pub(super) fn domctl_self_and_unknown_ids() {
    if !privileged() {
        return;
    }
    let own = own_id();
    let Some((count, _)) = list() else { return };
    for (op, name) in CONTROLS {
        check_eq!(
            format_args!("{name}(own id {own})"),
            Status::err(Errno::EINVAL),
            control(op, own)
        );
        for nobody in [0, DOMID_SELF, count + 1, 9999, 1 << 32 | own, u64::MAX] {
            check_eq!(
                format_args!("{name}({nobody:#x}): no such domain"),
                Status::err(Errno::ENOENT),
                control(op, nobody)
            );
        }
    }
    let mut buffer = [0u8; 16];
    for nobody in [0, DOMID_SELF, count + 1, 1 << 32 | own] {
        check_eq!(
            format_args!("ReadConsole({nobody:#x}): no such domain"),
            Status::err(Errno::ENOENT),
            hv::read_console(nobody, 0, &mut buffer)
        );
    }
    check_eq!(
        "domctl_op 6 (undefined), privileged",
        Status::err(Errno::ENOSYS),
        control(6, own)
    );
    let mut phys = SENTINEL_PHYS;
    if expect_ok("PhysInfo", hv::phys_info(&mut phys)).is_some() {
        check!(
            phys.total_bytes > 0 && phys.free_bytes <= phys.total_bytes,
            "PhysInfo: free_bytes {:#x} of total_bytes {:#x}",
            phys.free_bytes,
            phys.total_bytes
        );
        check!(
            phys.domain_bytes >= mem_bytes() && phys.domain_bytes <= phys.total_bytes,
            "PhysInfo: domain_bytes {:#x} (this domain alone has {:#x}, total {:#x})",
            phys.domain_bytes,
            mem_bytes(),
            phys.total_bytes
        );
        check_eq!("PhysInfo: reserved", 0, phys.reserved);
    }
    let mem = mem_bytes();
    for gpa in [mem, mem - 8, 1 << 40, u64::MAX - 7] {
        // SAFETY: 32 bytes at `gpa` are not inside RAM: nothing of ours is written.
        let status = unsafe { hv::domctl_op(PHYS_INFO, [gpa, 0, 0, 0]) };
        check_eq!(
            format_args!("PhysInfo({gpa:#x})"),
            Status::err(Errno::EFAULT),
            status
        );
    }
}

/// RAM of `domctl_scrub_b`: large enough that teardown scrubs it over many scheduling passes.
const SCRUB_PARTNER_BYTES: u64 = 32 << 20;

conformance_test! {
    title: "with domctl_scrub_b: after the partner powers off, its memory_bytes only counts down, and once it is 0 free_bytes has grown by all of its RAM",
    section: "17 Domain control",
    expect: Success,
    cmdline: "privileged=1",
}
pub(super) fn domctl_scrub_a() {
    let Some(Partner {
        id: partner,
        port,
        before,
        alive,
    }) = partner_alive("domctl_scrub_b")
    else {
        return;
    };
    check_eq!(
        "partner: memory_bytes while it runs",
        SCRUB_PARTNER_BYTES,
        alive.memory_bytes
    );
    // Tell it to power off, then watch its RAM come back: memory_bytes never grows, and once
    // it reads 0, free_bytes has grown by all of it (17, Teardown).
    check_eq!(format_args!("Send({port})"), Status(0), hv::send(port));
    let deadline = shared::now() + 3 * GIVE_UP_NS;
    let mut last = alive.memory_bytes;
    let mut seen_ended = 0u32;
    loop {
        let Some(info) = info_of(partner) else { return };
        check!(
            info.memory_bytes <= last,
            "memory_bytes grew from {last:#x} to {:#x}",
            info.memory_bytes
        );
        last = info.memory_bytes;
        if info.ending != ending::NONE {
            seen_ended += 1;
        }
        if info.memory_bytes == 0 {
            check_eq!("partner's ending", ending::POWEROFF, info.ending);
            let mut after = SENTINEL_PHYS;
            if expect_ok("PhysInfo once memory_bytes is 0", hv::phys_info(&mut after)).is_some() {
                check!(
                    after.free_bytes >= before.free_bytes + SCRUB_PARTNER_BYTES,
                    "memory_bytes is 0 but free_bytes grew only from {:#x} to {:#x}, less than the partner's {:#x} bytes of RAM",
                    before.free_bytes,
                    after.free_bytes,
                    SCRUB_PARTNER_BYTES
                );
            }
            println!("domctl_scrub_a: RAM back after {seen_ended} list(s) of the ended partner");
            break;
        }
        if shared::now() > deadline {
            fail(format_args!(
                "partner's memory_bytes still {last:#x} after {} ms",
                3 * GIVE_UP_NS / MS
            ));
            return;
        }
        let _ = hv::sched_yield();
    }
    let _ = hv::close(port);
}

conformance_test! {
    title: "offers domctl_scrub_a a port, waits for its event and powers off (32 MiB of RAM to scrub)",
    section: "17 Domain control",
    expect: Success,
    cmdline: "mem=32M",
}
pub(super) fn domctl_scrub_b() {
    let Some(port) = offer() else { return };
    if !wait_on(port, 3 * GIVE_UP_NS) {
        fail(format_args!(
            "no event from domctl_scrub_a within {} ms",
            3 * GIVE_UP_NS / MS
        ));
    }
    // Returning powers the domain off (the result line first).
}

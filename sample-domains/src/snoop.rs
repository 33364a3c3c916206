//! `role=snoop`: a domain that tries to reach another domain's memory without a grant of its
//! own, and must fail every way (docs/abi.md 16): mapping or copying a grant made to someone
//! else is `EPERM`, a reference never granted is `ENOENT`, and touching a grant-window page
//! with nothing mapped stops the domain, as any access outside its memory does (4.2).

use lamina_abi::Errno;
use lamina_guest_sdk::grant::{self, Access, GrantRef};
use lamina_guest_sdk::hypercall::HypercallError;
use lamina_guest_sdk::{println, sched};

use crate::{MAX_ATTEMPTS, RING_GRANT, fail};

/// A reference the victim never grants (ping grants only reference 0).
const NEVER_GRANTED: GrantRef = GrantRef::new(17);
/// Past the end of every grant table.
const OUT_OF_RANGE: GrantRef = GrantRef::new(grant::GRANT_TABLE_ENTRIES);
/// Where the snoop maps (if anything let it) and which page it finally touches.
const MAP_PAGE: u64 = 0;
const UNMAPPED_PAGE: u64 = 5;

pub(crate) fn run(victim: u32) -> ! {
    let slot = grant::window_slot(MAP_PAGE).unwrap_or(0);
    println!("snoop: trying to reach domain {victim}'s memory without a grant of its own");
    // The victim's grant 0 exists once `map` stops saying ENOENT; it is for another domain.
    let first = wait_for_grant(victim, slot);

    let mut checks = Checks::default();
    checks.expect(
        "map of grant 0 (granted to another domain), read-only",
        first,
        Errno::EPERM,
    );
    checks.expect(
        "map of grant 0, read-write",
        grant::map(victim, RING_GRANT, slot, Access::ReadWrite),
        Errno::EPERM,
    );
    checks.expect(
        "map of grant 17 (never granted)",
        grant::map(victim, NEVER_GRANTED, slot, Access::ReadOnly),
        Errno::ENOENT,
    );
    checks.expect(
        "map of grant 256 (past the table)",
        grant::map(victim, OUT_OF_RANGE, slot, Access::ReadOnly),
        Errno::ENOENT,
    );
    let mut buffer = [0u8; 64];
    checks.expect(
        "copy from grant 0",
        grant::copy_from(victim, RING_GRANT, 0, &mut buffer).map(drop),
        Errno::EPERM,
    );
    checks.expect(
        "copy to grant 0",
        grant::copy_to(victim, RING_GRANT, 0, &buffer).map(drop),
        Errno::EPERM,
    );
    checks.expect(
        "copy from grant 17 (never granted)",
        grant::copy_from(victim, NEVER_GRANTED, 0, &mut buffer).map(drop),
        Errno::ENOENT,
    );
    if buffer.iter().any(|&byte| byte != 0) {
        println!("snoop: error: a refused copy wrote into the buffer");
        checks.failed += 1;
    }
    println!(
        "snoop: {} of {} attempts refused as docs/abi.md 16 says",
        checks.passed,
        checks.passed + checks.failed
    );

    let unmapped = grant::window_slot(UNMAPPED_PAGE).unwrap_or(0);
    println!(
        "snoop: reading grant-window page {unmapped:#x}, where nothing is mapped: the hypervisor must stop this domain"
    );
    // SAFETY: a deliberate read of a guest-physical page that is not RAM (the boot page
    // tables map the window, nothing is mapped behind this page). The hypervisor stops the
    // domain at the access, so the read never completes; were it to, it reads a u64 and
    // changes nothing.
    let value = unsafe { core::ptr::read_volatile(unmapped as *const u64) };
    fail(
        "snoop",
        format_args!("read {value:#x} from an unmapped grant-window page and ran on"),
    )
}

/// Tries to map the victim's grant 0 read-only until it exists; returns the first answer that
/// is not `ENOENT`. Unmaps it again should the map wrongly succeed.
fn wait_for_grant(victim: u32, slot: u64) -> Result<(), HypercallError> {
    for _ in 0..MAX_ATTEMPTS {
        match grant::map(victim, RING_GRANT, slot, Access::ReadOnly) {
            Err(error) if error == Errno::ENOENT => {
                let _ = sched::yield_now();
            }
            Ok(()) => {
                let _ = grant::unmap(slot);
                return Ok(());
            }
            Err(error) => return Err(error),
        }
    }
    fail(
        "snoop",
        format_args!("domain {victim} never made grant 0 ({MAX_ATTEMPTS} attempts)"),
    )
}

#[derive(Default)]
struct Checks {
    passed: u32,
    failed: u32,
}

impl Checks {
    fn expect(&mut self, what: &str, result: Result<(), HypercallError>, expected: Errno) {
        match result {
            Err(error) if error == expected => {
                println!("snoop: {what}: {error}, refused");
                self.passed += 1;
            }
            other => {
                println!("snoop: error: {what}: {other:?}, expected {expected}");
                self.failed += 1;
                // A map that went through must not leave the page mapped.
                if other.is_ok() {
                    let _ = grant::unmap(grant::window_slot(MAP_PAGE).unwrap_or(0));
                }
            }
        }
    }
}

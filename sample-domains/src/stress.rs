//! `role=stress` (booted with `vcpus=2` or more, beside a peer with as many): every vCPU of
//! both domains hammers the same inter-domain event channels, grants and multicall batches at
//! once, and every message is checked on both sides.
//!
//! Lane `j` is vCPU `j` of each domain. On its lane, each domain is at the same time a
//! **client** (it sends requests to the peer's vCPU `j`) and a **server** (it answers the
//! peer's vCPU `j`). One round of a client, request `seq` (from 1):
//!
//! 1. write the request (a [`sample_domains::stress_message`]: sequence number, lane, source,
//!    length, checksum, data) into the lane's payload page;
//! 2. one `multicall`: end_access of the previous round's grant (the server unmapped it before
//!    it answered, so `EBUSY` is an error) and grant_access of the payload page to the peer;
//! 3. publish the grant reference and `seq` in the lane of its **mailbox** (a page granted to
//!    the peer as grant 0 at start, which the peer keeps mapped) and send on the lane's port;
//! 4. wait for the answer: the server's `seq` in the mailbox, the response in the payload
//!    page, the checksum the server computed of what it received.
//!
//! The server, seeing `seq` in the peer's mailbox (its mapping): maps the grant, checks the
//! request through the mapping, writes the response (odd rounds through the mapping, even ones
//! by grant copy), then one `multicall` of six entries: copy the request out of the grant
//! (checked against what the mapping showed), copy the response in (even rounds), unmap, copy
//! the checksum and then `seq` into the peer's mailbox, send on the lane's port.
//!
//! Each vCPU waits with `sched_op` poll on its lane's two ports (masked, no upcall), deadline
//! [`SILENCE_NS`]: a deadline that passes while the peer lives is a lost event and an error.
//! When the client's time is up (`ms=` of system time, 3000 unless told) or it sent
//! `rounds=` requests (when given: bounds the work where guest time runs slow) it posts
//! [`DONE`] with the number of rounds; the server checks it against what it served. Then both
//! sides unmap each other's mailbox, end their grant (retrying while the peer still maps it),
//! and vCPU 0 prints
//!
//! ```text
//! stress: result: lanes=2 rounds=<sent and answered> served=<answered for the peer> errors=0 ...
//! ```
//!
//! Two more modes for the teardown scenario: `destroyed=1` runs until a control domain
//! destroys the domain (it prints [`UNDER_WAY_LINE`] once every lane is under way, spins
//! instead of polling so that its vCPUs are on the CPUs whenever they may be, and fails after
//! `ms=`); `peer_dies=1` runs until the peer is gone (its ports turn unbound), then
//! checks what the ABI promises the survivor (docs/abi.md 16, 17: the dead peer's mailbox
//! reads zeros, every grant of its own can be ended at once, the peer's grant is `ENOENT`)
//! and powers off.

use core::cell::UnsafeCell;
use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use lamina_abi::Errno;
use lamina_abi::Hypercall;
use lamina_abi::event_channel::PortState;
use lamina_abi::grant_table::{GrantCopy, GrantTableOp, copy_direction};
use lamina_abi::vcpu::VcpuStartState;
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::grant::{self, Access, GrantRef};
use lamina_guest_sdk::hypercall::HypercallError;
use lamina_guest_sdk::multicall::{Batch, Call};
use lamina_guest_sdk::{StartInfo, println, sched, time, vcpu};
use sample_domains::stress_message::{
    self as message, HALF_BYTES, Half, MessageId, PAGE_BYTES, RESPONSE_OFFSET,
};

use crate::{Decimal3, MAX_ATTEMPTS, fail, finish};

/// Lanes (vCPUs) a stress domain can have.
const MAX_LANES: usize = 4;
/// The mailbox is each domain's first grant.
const MAILBOX_GRANT: GrantRef = GrantRef::new(0);
/// What a mailbox holds before anything else, so the peer knows it mapped the right page.
const MAILBOX_MAGIC: u32 = 0x5354_5253;
/// A client's last `req_seq`: no more requests; `req_ref` then holds how many it sent.
const DONE: u32 = u32::MAX;
/// How long a vCPU waits for its lane's events before it calls one lost.
const SILENCE_NS: u64 = 2_000_000_000;
/// `ms=` when the command line does not say.
const DEFAULT_MS: u32 = 3_000;
/// Printed (`destroyed=1`) once every lane answered and was answered: the control domain
/// looks for it in the console before it destroys the domain.
pub(crate) const UNDER_WAY_LINE: &str =
    "stress: under way on every lane, hammering until destroyed";
/// Rounds every lane completes before [`UNDER_WAY_LINE`].
const UNDER_WAY_ROUNDS: u64 = 20;
/// How many problems are described one by one (per lane) before the rest are only counted.
const REPORTED_ERRORS: u64 = 3;
/// A secondary vCPU's stack.
const STACK_BYTES: usize = 16 * 1024;

/// One lane of a mailbox: the client writes `req_*` in its own page, the server `resp_*`
/// by grant copy.
#[repr(C)]
struct Lane {
    req_seq: AtomicU32,
    req_ref: AtomicU32,
    resp_sum: AtomicU32,
    resp_seq: AtomicU32,
    _pad: [u32; 12],
}

#[repr(C, align(4096))]
struct Mailbox {
    magic: AtomicU32,
    lanes: AtomicU32,
    _pad: [u32; 14],
    lane: [Lane; MAX_LANES],
}

const _: () = assert!(size_of::<Lane>() == 64);
const _: () = assert!(size_of::<Mailbox>() == PAGE_BYTES);

impl Mailbox {
    const fn new() -> Self {
        Mailbox {
            magic: AtomicU32::new(0),
            lanes: AtomicU32::new(0),
            _pad: [0; 14],
            lane: [const {
                Lane {
                    req_seq: AtomicU32::new(0),
                    req_ref: AtomicU32::new(0),
                    resp_sum: AtomicU32::new(0),
                    resp_seq: AtomicU32::new(0),
                    _pad: [0; 12],
                }
            }; MAX_LANES],
        }
    }
}

/// Where lane `j`'s field at `field` (an offset in [`Lane`]) lies in a mailbox page.
const fn lane_offset(j: usize, field: usize) -> u32 {
    (offset_of!(Mailbox, lane) + j * size_of::<Lane>() + field) as u32
}

static MAILBOX: Mailbox = Mailbox::new();

/// A lane's payload page, granted to the peer one round at a time.
#[repr(C, align(4096))]
struct PayloadPage(UnsafeCell<[u8; PAGE_BYTES]>);

// SAFETY: lane `j`'s page is touched by vCPU `j` alone, and by the peer (through the
// hypervisor) only while it is granted, which the protocol keeps apart from vCPU `j`'s writes.
unsafe impl Sync for PayloadPage {}

static PAYLOADS: [PayloadPage; MAX_LANES] =
    [const { PayloadPage(UnsafeCell::new([0; PAGE_BYTES])) }; MAX_LANES];

#[repr(C, align(16))]
struct Stacks([[u8; STACK_BYTES]; MAX_LANES]);

/// Written only by the vCPU that owns each stack, after vCPU 0 gave it out.
static mut STACKS: Stacks = Stacks([[0; STACK_BYTES]; MAX_LANES]);

/// What the run is: fixed by vCPU 0 before the others start.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Clients stop at `until_ns`.
    Timed,
    /// Runs until destroyed; `until_ns` is a limit.
    Destroyed,
    /// Runs until the peer is gone; `until_ns` is a limit.
    PeerDies,
}

#[derive(Clone, Copy)]
struct Setup {
    peer: u32,
    me: u32,
    lanes: usize,
    mode: Mode,
    until_ns: u64,
    /// Timed: the requests each client sends at most (`rounds=`; `u32::MAX` unless told).
    rounds: u32,
}

/// What each lane came to, for vCPU 0 to sum up.
struct LaneTally {
    rounds: AtomicU64,
    served: AtomicU64,
    errors: AtomicU64,
    bytes_checked: AtomicU64,
    multicalls: AtomicU64,
    polls: AtomicU64,
    peer_gone: AtomicBool,
    finished: AtomicBool,
}

static TALLIES: [LaneTally; MAX_LANES] = [const {
    LaneTally {
        rounds: AtomicU64::new(0),
        served: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        bytes_checked: AtomicU64::new(0),
        multicalls: AtomicU64::new(0),
        polls: AtomicU64::new(0),
        peer_gone: AtomicBool::new(false),
        finished: AtomicBool::new(false),
    }
}; MAX_LANES];

/// Handed to the secondary vCPUs.
static SETUP: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

fn client_port(j: usize) -> Port {
    Port::new(2 + j as u32)
}

fn server_port(setup: &Setup, j: usize) -> Port {
    Port::new(2 + (setup.lanes + j) as u32)
}

/// The grant-window page where the peer's mailbox is mapped.
fn mailbox_slot() -> u64 {
    grant::window_slot(0).unwrap_or(0)
}

/// Where lane `j`'s server maps the peer's payload page.
fn payload_slot(j: usize) -> u64 {
    grant::window_slot(1 + j as u64).unwrap_or(0)
}

fn peer_mailbox() -> &'static Mailbox {
    // SAFETY: the peer's mailbox page is mapped there (grant 0, read-write) from the setup
    // until vCPU 0 unmaps it after every lane finished; it is a page of atomics (the hypervisor
    // puts zeros there if the peer dies), so any bytes are a valid value.
    unsafe { &*(mailbox_slot() as *const Mailbox) }
}

pub(crate) fn run(
    start: &StartInfo,
    peer: u32,
    ms: Option<u32>,
    rounds: Option<u32>,
    destroyed: bool,
    peer_dies: bool,
) -> ! {
    let lanes = start.nr_vcpus as usize;
    if !(1..=MAX_LANES).contains(&lanes) {
        fail(
            "stress",
            format_args!("{lanes} vCPUs: boot with vcpus=1 to {MAX_LANES}"),
        );
    }
    let mode = match (destroyed, peer_dies) {
        (false, false) => Mode::Timed,
        (true, false) => Mode::Destroyed,
        (false, true) => Mode::PeerDies,
        (true, true) => fail(
            "stress",
            format_args!("destroyed=1 and peer_dies=1 exclude each other"),
        ),
    };
    let mut setup = Setup {
        peer,
        me: start.domain_id,
        lanes,
        mode,
        until_ns: 0,
        rounds: rounds.unwrap_or(u32::MAX),
    };
    connect(&setup);
    println!(
        "stress: connected to domain {peer}: {lanes} lanes, mailbox granted as grant 0 and the peer's mapped at {:#x}",
        mailbox_slot()
    );
    let started_ns = time::now_ns();
    setup.until_ns = started_ns + u64::from(ms.unwrap_or(DEFAULT_MS)) * 1_000_000;
    start_secondaries(&setup);
    lane(&setup, 0);
    wait_for_lanes(&setup);
    let elapsed_ns = time::now_ns().saturating_sub(started_ns).max(1);

    let gone = (0..lanes).any(|j| TALLIES[j].peer_gone.load(Ordering::SeqCst));
    let mut errors = sum(|t| &t.errors);
    if gone {
        errors += survive(&setup);
    } else {
        errors += release(&setup);
    }
    for (j, tally) in TALLIES.iter().enumerate().take(lanes) {
        println!(
            "stress: lane {j}: rounds={} served={} errors={} multicalls={} polls={}{}",
            tally.rounds.load(Ordering::SeqCst),
            tally.served.load(Ordering::SeqCst),
            tally.errors.load(Ordering::SeqCst),
            tally.multicalls.load(Ordering::SeqCst),
            tally.polls.load(Ordering::SeqCst),
            if tally.peer_gone.load(Ordering::SeqCst) {
                " peer_gone"
            } else {
                ""
            }
        );
    }
    let rounds = sum(|t| &t.rounds);
    println!(
        "stress: result: lanes={lanes} rounds={rounds} served={} errors={errors} bytes_checked={} multicalls={} peer_gone={} elapsed_ms={} rounds_per_s={}",
        sum(|t| &t.served),
        sum(|t| &t.bytes_checked),
        sum(|t| &t.multicalls),
        u8::from(gone),
        Decimal3 {
            numerator: elapsed_ns,
            denominator: 1_000_000
        },
        u128::from(rounds) * 1_000_000_000 / u128::from(elapsed_ns),
    );
    finish(errors)
}

fn sum(field: impl Fn(&LaneTally) -> &AtomicU64) -> u64 {
    TALLIES
        .iter()
        .map(|t| field(t).load(Ordering::SeqCst))
        .sum()
}

/// Grants the mailbox, offers a port per lane, binds the peer's, maps the peer's mailbox and
/// waits until the peer bound ours. Port numbers are the lowest free ones (docs/abi.md 8), so
/// both sides know them without telling.
fn connect(setup: &Setup) {
    let peer = setup.peer;
    MAILBOX.magic.store(MAILBOX_MAGIC, Ordering::SeqCst);
    MAILBOX.lanes.store(setup.lanes as u32, Ordering::SeqCst);
    match grant::grant_access(peer, &raw const MAILBOX as u64, Access::ReadWrite) {
        Ok(grant) if grant == MAILBOX_GRANT => {}
        other => fail(
            "stress",
            format_args!("grant of the mailbox: {other:?}, expected grant 0"),
        ),
    }
    for j in 0..setup.lanes {
        match events::alloc_unbound_for(peer) {
            Ok(port) if port == client_port(j) => events::mask(port),
            other => fail(
                "stress",
                format_args!(
                    "alloc_unbound for lane {j}: {other:?}, expected {}",
                    client_port(j)
                ),
            ),
        }
    }
    for j in 0..setup.lanes {
        let port = retry("bind_interdomain", Errno::EINVAL, || {
            events::bind_interdomain(peer, client_port(j))
        });
        if port != server_port(setup, j) {
            fail(
                "stress",
                format_args!(
                    "the peer's {} bound as {port}, expected {}",
                    client_port(j),
                    server_port(setup, j)
                ),
            );
        }
        events::mask(port);
    }
    retry("map of the peer's mailbox", Errno::ENOENT, || {
        grant::map(peer, MAILBOX_GRANT, mailbox_slot(), Access::ReadWrite)
    });
    let theirs = peer_mailbox();
    let (magic, lanes) = (
        theirs.magic.load(Ordering::SeqCst),
        theirs.lanes.load(Ordering::SeqCst),
    );
    if magic != MAILBOX_MAGIC || lanes as usize != setup.lanes {
        fail(
            "stress",
            format_args!(
                "the peer's mailbox has magic {magic:#x} and {lanes} lanes; this domain has {}",
                setup.lanes
            ),
        );
    }
    for j in 0..setup.lanes {
        retry(
            "the peer's bind of our port",
            Errno::EAGAIN,
            || match events::port_info(client_port(j))?.state {
                Some(PortState::Interdomain) => Ok(()),
                _ => Err(HypercallError::Errno(Errno::EAGAIN)),
            },
        );
    }
}

/// `attempt` until it gives something other than `waiting_for`, yielding in between.
fn retry<T>(
    what: &str,
    waiting_for: Errno,
    mut attempt: impl FnMut() -> Result<T, HypercallError>,
) -> T {
    for _ in 0..MAX_ATTEMPTS {
        match attempt() {
            Ok(value) => return value,
            Err(error) if error == waiting_for => {
                let _ = sched::yield_now();
            }
            Err(error) => fail("stress", format_args!("{what} failed: {error}")),
        }
    }
    fail(
        "stress",
        format_args!("{what}: still {waiting_for} after {MAX_ATTEMPTS} attempts"),
    )
}

fn start_secondaries(setup: &Setup) {
    let mode = match setup.mode {
        Mode::Timed => 0,
        Mode::Destroyed => 1,
        Mode::PeerDies => 2,
    };
    for (slot, value) in SETUP.iter().zip([
        u64::from(setup.peer),
        u64::from(setup.me),
        setup.lanes as u64,
        mode,
        setup.until_ns,
        u64::from(setup.rounds),
    ]) {
        slot.store(value, Ordering::SeqCst);
    }
    let cr3: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    for j in 1..setup.lanes {
        // SAFETY: only the address is taken; the stack is that vCPU's alone from now on.
        let stack = unsafe { core::ptr::addr_of_mut!(STACKS.0[j]) } as u64;
        let state = VcpuStartState {
            rip: secondary_main as *const () as usize as u64,
            // As after a call: the return address slot below a 16-byte boundary.
            rsp: stack + STACK_BYTES as u64 - 8,
            cr3: cr3 & !0xfff,
            argument: j as u64,
        };
        if let Err(error) = vcpu::initialise(j as u32, &state) {
            fail("stress", format_args!("initialise of vCPU {j}: {error}"));
        }
        // SAFETY: the code and stack are the new vCPU's; it shares only atomics, its own
        // lane's page and the (read-only after this) setup with the others.
        if let Err(error) = unsafe { vcpu::up(j as u32) } {
            fail("stress", format_args!("up of vCPU {j}: {error}"));
        }
    }
}

extern "C" fn secondary_main(j: u64) -> ! {
    let value = |i: usize| SETUP[i].load(Ordering::SeqCst);
    let setup = Setup {
        peer: value(0) as u32,
        me: value(1) as u32,
        lanes: value(2) as usize,
        mode: match value(3) {
            1 => Mode::Destroyed,
            2 => Mode::PeerDies,
            _ => Mode::Timed,
        },
        until_ns: value(4),
        rounds: value(5) as u32,
    };
    lane(&setup, j as usize);
    loop {
        let _ = vcpu::down(j as u32);
    }
}

/// vCPU 0 waits for the other lanes to finish.
fn wait_for_lanes(setup: &Setup) {
    let limit = setup.until_ns + 4 * SILENCE_NS;
    while !(1..setup.lanes).all(|j| TALLIES[j].finished.load(Ordering::SeqCst)) {
        if time::now_ns() > limit {
            fail("stress", format_args!("a lane did not finish"));
        }
        crate::sleep_ns("stress", 1_000_000);
    }
}

/// A lane's client: where its current round is.
#[derive(Default)]
struct Client {
    /// The last request sent (0: none yet).
    seq: u32,
    /// Its checksum.
    sum: u32,
    waiting: bool,
    /// The grant of the payload page, once made.
    grant: Option<GrantRef>,
    done_posted: bool,
}

/// A lane's server.
#[derive(Default)]
struct Server {
    served: u32,
    finished: bool,
}

/// What stops a lane early.
enum Stop {
    PeerGone,
    Failed,
}

struct LaneRun<'s> {
    setup: &'s Setup,
    j: usize,
    tally: &'static LaneTally,
    errors: u64,
}

impl LaneRun<'_> {
    fn error(&mut self, what: core::fmt::Arguments<'_>) {
        self.errors += 1;
        self.tally.errors.fetch_add(1, Ordering::SeqCst);
        if self.errors <= REPORTED_ERRORS {
            println!("stress: error: lane {}: {what}", self.j);
        }
    }

    fn peer_gone(&self) -> bool {
        [client_port(self.j), server_port(self.setup, self.j)]
            .iter()
            .any(|&port| !matches!(events::port_info(port), Ok(info) if info.state == Some(PortState::Interdomain)))
    }

    /// Whether the peer is gone, or goes within [`SILENCE_NS`]: between a domain's end and its
    /// teardown (while a vCPU of it is still leaving another CPU) its grants are already
    /// `ENOENT` but its channels still connected (docs/abi.md 17); the teardown closes them
    /// and raises our ends.
    fn peer_gone_soon(&self) -> bool {
        let ports = [client_port(self.j), server_port(self.setup, self.j)];
        let deadline = time::now_ns() + SILENCE_NS;
        loop {
            if self.peer_gone() {
                return true;
            }
            for port in ports {
                events::clear_pending(port);
            }
            if self.peer_gone() {
                return true;
            }
            match sched::poll(&ports, Some(deadline)) {
                Ok(sched::PollOutcome::Pending) => {}
                _ => return self.peer_gone(),
            }
        }
    }

    /// Something failed that the peer's end would explain: a stop either way, an error
    /// only if the peer is alive or was not to die.
    fn failed(&mut self, what: core::fmt::Arguments<'_>) -> Stop {
        if self.peer_gone_soon() {
            if self.setup.mode != Mode::PeerDies {
                self.error(format_args!("the peer is gone: {what}"));
            }
            return Stop::PeerGone;
        }
        self.error(what);
        Stop::Failed
    }
}

/// Runs lane `j` on this vCPU until both its client and its server are done.
fn lane(setup: &Setup, j: usize) {
    let tally = &TALLIES[j];
    let mut run = LaneRun {
        setup,
        j,
        tally,
        errors: 0,
    };
    let mut client = Client::default();
    let mut server = Server::default();
    match exchange(&mut run, &mut client, &mut server) {
        Ok(()) if setup.mode == Mode::PeerDies => {
            run.error(format_args!("the peer was to die but finished"))
        }
        Ok(()) | Err(Stop::Failed) => {}
        Err(Stop::PeerGone) => tally.peer_gone.store(true, Ordering::SeqCst),
    }
    // The last round's grant: the server unmapped it before it answered, or died and its
    // mappings were removed (docs/abi.md 16), so it ends at once.
    if let Some(grant) = client.grant.take()
        && let Err(error) = grant::end_access(grant)
    {
        run.error(format_args!(
            "end_access of the last grant ({}): {error}",
            grant.number()
        ));
    }
    tally.finished.store(true, Ordering::SeqCst);
}

fn exchange(run: &mut LaneRun<'_>, client: &mut Client, server: &mut Server) -> Result<(), Stop> {
    let setup = *run.setup;
    let j = run.j;
    let ports = [client_port(j), server_port(&setup, j)];
    let mine = &MAILBOX.lane[j];
    let theirs = &peer_mailbox().lane[j];
    let mut woken = false;
    let mut announced = false;
    let mut last_progress_ns = time::now_ns();
    loop {
        for port in ports {
            events::clear_pending(port);
        }
        let mut progress = false;
        if client.waiting && mine.resp_seq.load(Ordering::Acquire) == client.seq {
            check_response(run, client, mine.resp_sum.load(Ordering::Acquire));
            client.waiting = false;
            progress = true;
        }
        if !client.waiting && !client.done_posted {
            let more = setup.mode != Mode::Timed || client.seq < setup.rounds;
            if more && time::now_ns() < setup.until_ns {
                send_request(run, client, mine)?;
            } else if setup.mode == Mode::Timed {
                mine.req_ref.store(client.seq, Ordering::Release);
                mine.req_seq.store(DONE, Ordering::Release);
                send(run, ports[0])?;
                client.done_posted = true;
            } else {
                return Err(run.failed(format_args!(
                    "still running after ms=: nobody ended the peer or this domain"
                )));
            }
            progress = true;
        }
        if !server.finished {
            let seq = theirs.req_seq.load(Ordering::Acquire);
            if seq == server.served.wrapping_add(1) {
                let grant = GrantRef::new(theirs.req_ref.load(Ordering::Acquire));
                serve(run, server, seq, grant)?;
                progress = true;
            } else if seq == DONE {
                let sent = theirs.req_ref.load(Ordering::Acquire);
                if sent != server.served {
                    run.error(format_args!(
                        "the peer says it sent {sent} requests, {} were served",
                        server.served
                    ));
                }
                server.finished = true;
                progress = true;
            } else if seq != server.served {
                return Err(run.failed(format_args!(
                    "request number {seq} after {} served",
                    server.served
                )));
            }
        }
        if client.done_posted && server.finished {
            return Ok(());
        }
        if setup.mode == Mode::Destroyed
            && j == 0
            && !announced
            && (0..setup.lanes).all(|l| {
                TALLIES[l].rounds.load(Ordering::SeqCst) >= UNDER_WAY_ROUNDS
                    && TALLIES[l].served.load(Ordering::SeqCst) >= UNDER_WAY_ROUNDS
            })
        {
            println!("{UNDER_WAY_LINE}");
            announced = true;
        }
        if progress {
            woken = false;
            last_progress_ns = time::now_ns();
            continue;
        }
        if setup.mode == Mode::Destroyed {
            // A victim never waits in the hypervisor: its vCPUs are on the CPUs whenever the
            // scheduler lets them, so that the destroy finds them running there.
            if time::now_ns() > last_progress_ns + SILENCE_NS {
                return Err(run.failed(format_args!("no progress for 2 s")));
            }
            core::hint::spin_loop();
            continue;
        }
        if woken && run.peer_gone() {
            return Err(run.failed(format_args!("woken with nothing to do")));
        }
        run.tally.polls.fetch_add(1, Ordering::Relaxed);
        match sched::poll(&ports, Some(time::now_ns() + SILENCE_NS)) {
            Ok(sched::PollOutcome::Pending) => woken = true,
            Ok(sched::PollOutcome::TimedOut) => {
                return Err(run.failed(format_args!(
                    "no event for 2 s: client waits for answer {} (mailbox says {}), server served {} (peer's mailbox says {})",
                    client.seq,
                    mine.resp_seq.load(Ordering::SeqCst),
                    server.served,
                    theirs.req_seq.load(Ordering::SeqCst)
                )));
            }
            Err(error) => {
                run.error(format_args!("poll failed: {error}"));
                return Err(Stop::Failed);
            }
        }
    }
}

fn send(run: &mut LaneRun<'_>, port: Port) -> Result<(), Stop> {
    events::send(port).map_err(|error| run.failed(format_args!("send on {port}: {error}")))
}

fn payload(j: usize) -> *mut u8 {
    PAYLOADS[j].0.get().cast()
}

/// Client steps 1 to 3.
fn send_request(run: &mut LaneRun<'_>, client: &mut Client, mine: &Lane) -> Result<(), Stop> {
    let setup = *run.setup;
    let j = run.j;
    let id = MessageId {
        source: setup.me,
        lane: j as u32,
        seq: client.seq + 1,
    };
    let mut request = [0u8; HALF_BYTES];
    let sum = message::write_request(id, &mut request);
    // SAFETY: the first half of lane j's page; the peer unmapped it before it answered the
    // last round, and reads it again only once granted below.
    unsafe { core::ptr::write_volatile(payload(j).cast::<Half>(), request) };

    let mut batch = Batch::<2>::new();
    let ended = client.grant.map(|grant| {
        // SAFETY: end_access touches no memory.
        let call = unsafe {
            Call::raw(
                Hypercall::GrantTableOp as u64,
                [
                    GrantTableOp::EndAccess as u64,
                    u64::from(grant.number()),
                    0,
                    0,
                    0,
                ],
            )
        };
        batch.push(call).unwrap_or(0)
    });
    // SAFETY: grant_access touches no memory; the page stays ours.
    let granted = batch
        .push(unsafe {
            Call::raw(
                Hypercall::GrantTableOp as u64,
                [
                    GrantTableOp::GrantAccess as u64,
                    u64::from(setup.peer),
                    payload(j) as u64,
                    0,
                    0,
                ],
            )
        })
        .unwrap_or(0);
    if let Err(error) = batch.submit() {
        run.error(format_args!(
            "multicall of end_access and grant_access: {error}"
        ));
        return Err(Stop::Failed);
    }
    run.tally.multicalls.fetch_add(1, Ordering::Relaxed);
    if let Some(ended) = ended {
        match batch.result(ended) {
            Some(Ok(0)) => client.grant = None,
            other => {
                return Err(run.failed(format_args!(
                    "end_access of the last round's grant: {other:?}"
                )));
            }
        }
    }
    let grant = match batch.result(granted) {
        Some(Ok(number)) if number > 0 && number < u64::from(grant::GRANT_TABLE_ENTRIES) => {
            GrantRef::new(number as u32)
        }
        other => {
            return Err(run.failed(format_args!("grant_access of the payload page: {other:?}")));
        }
    };
    client.grant = Some(grant);
    client.seq = id.seq;
    client.sum = sum;
    client.waiting = true;
    mine.req_ref.store(grant.number(), Ordering::Release);
    mine.req_seq.store(id.seq, Ordering::Release);
    send(run, client_port(j))
}

/// Client step 4: the answer to `client.seq` is in.
fn check_response(run: &mut LaneRun<'_>, client: &Client, server_sum: u32) {
    let id = MessageId {
        source: run.setup.me,
        lane: run.j as u32,
        seq: client.seq,
    };
    // SAFETY: the second half of lane j's page, which the server wrote before it published
    // the answer; it writes nothing more this round.
    let response: Half =
        unsafe { core::ptr::read_volatile(payload(run.j).add(RESPONSE_OFFSET).cast::<Half>()) };
    match message::check_response(id, &response) {
        Ok(_) => {
            run.tally.rounds.fetch_add(1, Ordering::SeqCst);
            run.tally
                .bytes_checked
                .fetch_add(message::request_len(id) as u64, Ordering::Relaxed);
        }
        Err(problem) => run.error(format_args!("response {}: {problem}", id.seq)),
    }
    if server_sum != client.sum {
        run.error(format_args!(
            "request {}: the server summed {server_sum:#010x}, it was {:#010x}",
            id.seq, client.sum
        ));
    }
}

/// A `GrantCopy` as a multicall entry.
///
/// # Safety
/// `request` and the local memory it names must stay valid until the batch is submitted.
unsafe fn copy_call<'a>(request: &'a GrantCopy) -> Call<'a> {
    // SAFETY: forwarded to the caller.
    unsafe {
        Call::raw(
            Hypercall::GrantTableOp as u64,
            [
                GrantTableOp::Copy as u64,
                request as *const GrantCopy as u64,
                0,
                0,
                0,
            ],
        )
    }
}

/// The server's side of request `seq` of the peer's lane, whose page is `grant`.
fn serve(
    run: &mut LaneRun<'_>,
    server: &mut Server,
    seq: u32,
    grant: GrantRef,
) -> Result<(), Stop> {
    let setup = *run.setup;
    let j = run.j;
    let slot = payload_slot(j);
    let id = MessageId {
        source: setup.peer,
        lane: j as u32,
        seq,
    };
    if let Err(error) = grant::map(setup.peer, grant, slot, Access::ReadWrite) {
        return Err(run.failed(format_args!(
            "map of request {seq}'s grant {}: {error}",
            grant.number()
        )));
    }
    // SAFETY: the grant is mapped read-write at `slot` until the multicall below unmaps it.
    let mapped: Half = unsafe { core::ptr::read_volatile(slot as *const Half) };
    let sum = match message::check_request(id, &mapped) {
        Ok(sum) => sum,
        Err(problem) => {
            // A grant revoked after the map reads as a page of zeros (docs/abi.md 16): the
            // peer's end when it was to die (the batch below then finds its grant gone), an
            // error otherwise.
            let revoked = mapped.iter().all(|&byte| byte == 0)
                && setup.mode == Mode::PeerDies
                && run.peer_gone_soon();
            if !revoked {
                run.error(format_args!("request {seq} through the mapping: {problem}"));
            }
            message::checksum(id, 0, &[])
        }
    };
    let mut response = [0u8; HALF_BYTES];
    message::write_response(id, &mut response);
    let by_copy = seq.is_multiple_of(2);
    if !by_copy {
        // SAFETY: as above; the response half is ours to write until we answer.
        unsafe {
            core::ptr::write_volatile(
                (slot as *mut u8).add(RESPONSE_OFFSET).cast::<Half>(),
                response,
            )
        };
    }

    let mut copied = [0u8; HALF_BYTES];
    let peer = setup.peer as u16;
    let copy_in = GrantCopy {
        domain: peer,
        direction: copy_direction::FROM_GRANT,
        reserved: 0,
        grant_ref: grant.number(),
        offset: 0,
        len: HALF_BYTES as u32,
        local_gpa: copied.as_mut_ptr() as u64,
    };
    let copy_out = GrantCopy {
        direction: copy_direction::TO_GRANT,
        offset: RESPONSE_OFFSET as u32,
        local_gpa: response.as_ptr() as u64,
        ..copy_in
    };
    let sum_bytes = sum.to_le_bytes();
    let seq_bytes = seq.to_le_bytes();
    let sum_out = GrantCopy {
        direction: copy_direction::TO_GRANT,
        grant_ref: MAILBOX_GRANT.number(),
        offset: lane_offset(j, offset_of!(Lane, resp_sum)),
        len: 4,
        local_gpa: sum_bytes.as_ptr() as u64,
        ..copy_in
    };
    let seq_out = GrantCopy {
        offset: lane_offset(j, offset_of!(Lane, resp_seq)),
        local_gpa: seq_bytes.as_ptr() as u64,
        ..sum_out
    };
    let mut batch = Batch::<6>::new();
    let mut expected = [0u64; 6];
    // SAFETY: every request and buffer lives on this stack until after `submit`; unmap and
    // send touch no memory.
    let calls = unsafe {
        [
            Some((copy_call(&copy_in), HALF_BYTES as u64)),
            by_copy.then(|| (copy_call(&copy_out), HALF_BYTES as u64)),
            Some((
                Call::raw(
                    Hypercall::GrantTableOp as u64,
                    [GrantTableOp::Unmap as u64, slot, 0, 0, 0],
                ),
                0,
            )),
            // The checksum before the number: the client reads the number first.
            Some((copy_call(&sum_out), 4)),
            Some((copy_call(&seq_out), 4)),
            Some((Call::evtchn_send(server_port(&setup, j)), 0)),
        ]
    };
    for (call, result) in calls.into_iter().flatten() {
        if let Ok(index) = batch.push(call) {
            expected[index] = result;
        }
    }
    if let Err(error) = batch.submit() {
        run.error(format_args!("multicall of the answer to {seq}: {error}"));
        return Err(Stop::Failed);
    }
    run.tally.multicalls.fetch_add(1, Ordering::Relaxed);
    for (index, &want) in expected.iter().enumerate().take(batch.len()) {
        match batch.result(index) {
            Some(Ok(got)) if got == want => {}
            other => {
                return Err(run.failed(format_args!(
                    "answer to {seq}: multicall entry {index} gave {other:?}, expected {want}"
                )));
            }
        }
    }
    if copied != mapped {
        run.error(format_args!(
            "request {seq}: the grant copy differs from what the mapping showed"
        ));
    }
    server.served = seq;
    run.tally.served.fetch_add(1, Ordering::SeqCst);
    run.tally
        .bytes_checked
        .fetch_add(message::request_len(id) as u64, Ordering::Relaxed);
    Ok(())
}

/// Normal end (vCPU 0, every lane finished): unmap the peer's mailbox, tell the peer, end our
/// own mailbox grant once the peer unmapped it. Returns the errors.
fn release(setup: &Setup) -> u64 {
    let ports = [client_port(0), server_port(setup, 0)];
    if let Err(error) = grant::unmap(mailbox_slot()) {
        println!("stress: error: unmap of the peer's mailbox: {error}");
        return 1;
    }
    let _ = events::send(ports[1]);
    for _ in 0..MAX_ATTEMPTS {
        for port in ports {
            events::clear_pending(port);
        }
        match grant::end_access(MAILBOX_GRANT) {
            Ok(()) => return 0,
            Err(error) if error == Errno::EBUSY => {
                match sched::poll(&ports, Some(time::now_ns() + SILENCE_NS)) {
                    Ok(sched::PollOutcome::Pending) => {}
                    other => {
                        println!("stress: error: the peer kept our mailbox mapped: {other:?}");
                        return 1;
                    }
                }
            }
            Err(error) => {
                println!("stress: error: end_access of the mailbox: {error}");
                return 1;
            }
        }
    }
    println!("stress: error: the mailbox grant stayed busy");
    1
}

/// The peer died (vCPU 0, every lane stopped): what docs/abi.md 16 and 17 promise the
/// survivor. Returns the errors.
fn survive(setup: &Setup) -> u64 {
    let mut errors = 0;
    let mut check = |ok: bool, what: core::fmt::Arguments<'_>| {
        if !ok {
            println!("stress: error: after the peer died: {what}");
            errors += 1;
        }
    };
    let theirs = peer_mailbox();
    let magic = theirs.magic.load(Ordering::SeqCst);
    check(
        magic == 0,
        format_args!("its mailbox still reads magic {magic:#x}, not zeros"),
    );
    let info = events::port_info(client_port(0));
    check(
        matches!(info, Ok(info) if info.state == Some(PortState::Unbound) && info.peer == Some(setup.peer as u16)),
        format_args!(
            "lane 0's port is {info:?}, not unbound for domain {}",
            setup.peer
        ),
    );
    let unmapped = grant::unmap(mailbox_slot());
    check(
        unmapped.is_ok(),
        format_args!("unmap of its mailbox: {unmapped:?}"),
    );
    let ended = grant::end_access(MAILBOX_GRANT);
    check(
        ended.is_ok(),
        format_args!("end_access of our mailbox: {ended:?}"),
    );
    let again = grant::map(setup.peer, MAILBOX_GRANT, mailbox_slot(), Access::ReadOnly);
    check(
        matches!(again, Err(error) if error == Errno::ENOENT),
        format_args!("mapping its grant again gave {again:?}, not ENOENT"),
    );
    println!(
        "stress: domain {} is gone: its mailbox read zeros, our grants ended at once, its grant is ENOENT; {errors} errors",
        setup.peer
    );
    errors
}

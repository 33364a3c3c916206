//! A request/response ring in one 4 KiB page shared between two domains, after Xen's
//! `io/ring.h`.
//!
//! The **front end** (ping, which owns the page and grants it) produces requests and consumes
//! responses; the **back end** (pong, which maps the grant) consumes requests and produces
//! responses. Each direction is a single-producer single-consumer ring of [`RING_SLOTS`]
//! fixed-size slots with free-running `u32` indices (reduced modulo the ring size, which is a
//! power of two, so they wrap correctly):
//!
//! - the producer writes a slot, then publishes `prod` with a release store;
//! - the consumer reads `prod` with an acquire load, reads the slots below it, then publishes
//!   `cons` with a release store, which hands the slots back.
//!
//! **Notifications** follow Xen's event indices, so a producer sends an event only when the
//! consumer may be waiting: a consumer that found nothing sets `event = cons + 1` before it
//! sleeps ([`Consumer::prepare_to_wait`]) and looks once more; a producer that moved `prod`
//! from `old` to `new` notifies when `event` lies in `(old, new]` ([`Producer::publish`]). A
//! full fence on each side between its store and its load (Dekker's pattern) guarantees that
//! at least one of them sees the other's store, so no wake-up is lost.
//!
//! Everything in the page is an atomic, because the other domain writes it while we read:
//! the page is memory another kernel controls, and a kernel must never trust it. Every read
//! is checked: a consumer that finds `prod` more than [`RING_SLOTS`] ahead of its own `cons`
//! gets [`RingError::Corrupt`] (this is also what a page of zeros looks like once the peer
//! is gone and the hypervisor replaced its grant, docs/abi.md 16).

use core::sync::atomic::{AtomicU8, AtomicU32, Ordering, fence};

/// The page: what one grant shares.
pub const PAGE_BYTES: usize = 4096;
/// Slots in each direction (a power of two: the free-running indices wrap at 2^32).
pub const RING_SLOTS: u32 = 16;
/// The largest message body.
pub const PAYLOAD_BYTES: usize = 112;
/// Written last by the front end when the page is ready: ASCII `LMRG`.
pub const RING_MAGIC: u32 = u32::from_le_bytes(*b"LMRG");

const SLOTS: usize = RING_SLOTS as usize;
const _: () = assert!(RING_SLOTS.is_power_of_two());

/// One message in the ring: its number, its length and its bytes.
#[repr(C)]
pub struct Slot {
    id: AtomicU32,
    len: AtomicU32,
    payload: [AtomicU8; PAYLOAD_BYTES],
}

/// What [`Consumer::pop`] found in a slot. `len` is as the producer wrote it: it may exceed
/// [`PAYLOAD_BYTES`] (a broken or hostile producer), in which case only `PAYLOAD_BYTES` bytes
/// were copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The message number the producer wrote.
    pub id: u32,
    /// The length the producer wrote.
    pub len: u32,
}

impl Slot {
    const fn new() -> Self {
        Slot {
            id: AtomicU32::new(0),
            len: AtomicU32::new(0),
            payload: [const { AtomicU8::new(0) }; PAYLOAD_BYTES],
        }
    }

    fn write(&self, id: u32, bytes: &[u8]) {
        self.id.store(id, Ordering::Relaxed);
        self.len.store(bytes.len() as u32, Ordering::Relaxed);
        for (cell, &byte) in self.payload.iter().zip(bytes) {
            cell.store(byte, Ordering::Relaxed);
        }
    }

    fn read(&self, buffer: &mut [u8; PAYLOAD_BYTES]) -> Received {
        let received = Received {
            id: self.id.load(Ordering::Relaxed),
            len: self.len.load(Ordering::Relaxed),
        };
        let copied = (received.len as usize).min(PAYLOAD_BYTES);
        for (byte, cell) in buffer[..copied].iter_mut().zip(&self.payload) {
            *byte = cell.load(Ordering::Relaxed);
        }
        received
    }

    fn nonzero_bytes(&self) -> usize {
        nonzero_in_word(&self.id)
            + nonzero_in_word(&self.len)
            + self
                .payload
                .iter()
                .filter(|cell| cell.load(Ordering::Relaxed) != 0)
                .count()
    }
}

/// The shared indices of one direction.
#[repr(C)]
struct Indices {
    /// Written by the producer: slots below it are filled.
    prod: AtomicU32,
    /// Written by the consumer: slots below it are free again.
    cons: AtomicU32,
    /// Written by the consumer before it waits: notify when `prod` passes it.
    event: AtomicU32,
    reserved: AtomicU32,
}

impl Indices {
    const fn new() -> Self {
        Indices {
            prod: AtomicU32::new(0),
            cons: AtomicU32::new(0),
            event: AtomicU32::new(0),
            reserved: AtomicU32::new(0),
        }
    }

    fn nonzero_bytes(&self) -> usize {
        [&self.prod, &self.cons, &self.event, &self.reserved]
            .into_iter()
            .map(nonzero_in_word)
            .sum()
    }
}

fn nonzero_in_word(word: &AtomicU32) -> usize {
    word.load(Ordering::Relaxed)
        .to_le_bytes()
        .iter()
        .filter(|&&byte| byte != 0)
        .count()
}

const HEADER_WORDS: usize = 8;
const TAIL_BYTES: usize =
    PAGE_BYTES - HEADER_WORDS * 4 - 2 * size_of::<Indices>() - 2 * SLOTS * size_of::<Slot>();

/// The shared page. `#[repr(C)]`, exactly [`PAGE_BYTES`] long with no padding, page-aligned
/// (so a `static` of it can be granted).
#[repr(C, align(4096))]
pub struct RingPage {
    magic: AtomicU32,
    /// How many requests the front end will send in all.
    total: AtomicU32,
    reserved: [AtomicU32; HEADER_WORDS - 2],
    requests: Indices,
    responses: Indices,
    request_slots: [Slot; SLOTS],
    response_slots: [Slot; SLOTS],
    tail: [AtomicU8; TAIL_BYTES],
}

const _: () = assert!(size_of::<RingPage>() == PAGE_BYTES);

/// A ring index that makes no sense: `prod` more than [`RING_SLOTS`] ahead of `cons`, or
/// behind it. Either the peer broke the protocol or the page is no longer the peer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The indices of one direction, as read.
    Corrupt {
        /// The producer index.
        prod: u32,
        /// The consumer index.
        cons: u32,
    },
    /// [`Producer::push`] with no free slot.
    Full,
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RingError::Corrupt { prod, cons } => {
                write!(f, "ring indices make no sense (prod {prod}, cons {cons})")
            }
            RingError::Full => f.write_str("no free slot in the ring"),
        }
    }
}

impl RingPage {
    /// A page of zeros (not ready: [`RingPage::init`] it).
    pub const fn new() -> Self {
        RingPage {
            magic: AtomicU32::new(0),
            total: AtomicU32::new(0),
            reserved: [const { AtomicU32::new(0) }; HEADER_WORDS - 2],
            requests: Indices::new(),
            responses: Indices::new(),
            request_slots: [const { Slot::new() }; SLOTS],
            response_slots: [const { Slot::new() }; SLOTS],
            tail: [const { AtomicU8::new(0) }; TAIL_BYTES],
        }
    }

    /// Front end, before granting: empty rings, both consumers asking for the first message
    /// (`event = 1`, as Xen's `SHARED_RING_INIT`), `total` requests announced, then the magic.
    pub fn init(&self, total: u32) {
        for indices in [&self.requests, &self.responses] {
            indices.prod.store(0, Ordering::Relaxed);
            indices.cons.store(0, Ordering::Relaxed);
            indices.event.store(1, Ordering::Relaxed);
        }
        self.total.store(total, Ordering::Relaxed);
        self.magic.store(RING_MAGIC, Ordering::Release);
    }

    /// [`RING_MAGIC`] once the front end initialised the page.
    pub fn magic(&self) -> u32 {
        self.magic.load(Ordering::Acquire)
    }

    /// How many requests the front end announced.
    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Relaxed)
    }

    /// The front end's halves: it produces requests and consumes responses.
    pub fn front(&self) -> (Producer<'_>, Consumer<'_>) {
        (
            Producer::attach(&self.requests, &self.request_slots),
            Consumer::attach(&self.responses, &self.response_slots),
        )
    }

    /// The back end's halves: it consumes requests and produces responses.
    pub fn back(&self) -> (Consumer<'_>, Producer<'_>) {
        (
            Consumer::attach(&self.requests, &self.request_slots),
            Producer::attach(&self.responses, &self.response_slots),
        )
    }

    /// How many of the page's [`PAGE_BYTES`] bytes are not zero.
    pub fn nonzero_bytes(&self) -> usize {
        nonzero_in_word(&self.magic)
            + nonzero_in_word(&self.total)
            + self.reserved.iter().map(nonzero_in_word).sum::<usize>()
            + self.requests.nonzero_bytes()
            + self.responses.nonzero_bytes()
            + self
                .request_slots
                .iter()
                .chain(&self.response_slots)
                .map(Slot::nonzero_bytes)
                .sum::<usize>()
            + self
                .tail
                .iter()
                .filter(|cell| cell.load(Ordering::Relaxed) != 0)
                .count()
    }
}

impl Default for RingPage {
    fn default() -> Self {
        Self::new()
    }
}

/// The producing end of one direction.
pub struct Producer<'a> {
    indices: &'a Indices,
    slots: &'a [Slot; SLOTS],
    /// Slots below this are written (published or not).
    prod: u32,
    /// What was last published.
    published: u32,
}

impl<'a> Producer<'a> {
    fn attach(indices: &'a Indices, slots: &'a [Slot; SLOTS]) -> Self {
        let prod = indices.prod.load(Ordering::Relaxed);
        Producer {
            indices,
            slots,
            prod,
            published: prod,
        }
    }

    /// Free slots: those the consumer has handed back.
    pub fn free(&self) -> Result<u32, RingError> {
        let cons = self.indices.cons.load(Ordering::Acquire);
        let used = self.prod.wrapping_sub(cons);
        if used > RING_SLOTS {
            return Err(RingError::Corrupt {
                prod: self.prod,
                cons,
            });
        }
        Ok(RING_SLOTS - used)
    }

    /// Writes message `id` into the next free slot; the consumer sees it after
    /// [`Producer::publish`]. At most [`PAYLOAD_BYTES`] bytes of `bytes` are sent.
    pub fn push(&mut self, id: u32, bytes: &[u8]) -> Result<(), RingError> {
        if self.free()? == 0 {
            return Err(RingError::Full);
        }
        let bytes = &bytes[..bytes.len().min(PAYLOAD_BYTES)];
        self.slots[(self.prod % RING_SLOTS) as usize].write(id, bytes);
        self.prod = self.prod.wrapping_add(1);
        Ok(())
    }

    /// Makes the pushed messages visible and says whether the consumer asked to be notified
    /// of one of them (then send the event; otherwise it is not waiting and will look itself).
    pub fn publish(&mut self) -> bool {
        let (old, new) = (self.published, self.prod);
        if old == new {
            return false;
        }
        self.indices.prod.store(new, Ordering::Release);
        self.published = new;
        // The consumer's event store and our prod store must not both be missed.
        fence(Ordering::SeqCst);
        let event = self.indices.event.load(Ordering::Relaxed);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }
}

/// The consuming end of one direction.
pub struct Consumer<'a> {
    indices: &'a Indices,
    slots: &'a [Slot; SLOTS],
    cons: u32,
}

impl<'a> Consumer<'a> {
    fn attach(indices: &'a Indices, slots: &'a [Slot; SLOTS]) -> Self {
        Consumer {
            indices,
            slots,
            cons: indices.cons.load(Ordering::Relaxed),
        }
    }

    /// Messages waiting.
    pub fn available(&self) -> Result<u32, RingError> {
        let prod = self.indices.prod.load(Ordering::Acquire);
        let waiting = prod.wrapping_sub(self.cons);
        if waiting > RING_SLOTS {
            return Err(RingError::Corrupt {
                prod,
                cons: self.cons,
            });
        }
        Ok(waiting)
    }

    /// Copies the oldest message into `buffer` and hands its slot back; `None` when there is
    /// none.
    pub fn pop(&mut self, buffer: &mut [u8; PAYLOAD_BYTES]) -> Result<Option<Received>, RingError> {
        if self.available()? == 0 {
            return Ok(None);
        }
        let received = self.slots[(self.cons % RING_SLOTS) as usize].read(buffer);
        self.cons = self.cons.wrapping_add(1);
        // Release: our reads of the slot come before the producer may overwrite it.
        self.indices.cons.store(self.cons, Ordering::Release);
        Ok(Some(received))
    }

    /// Before waiting for the producer: asks to be notified of the next message, then looks
    /// again. `Ok(true)`: still nothing, wait for the event; `Ok(false)`: a message came
    /// meanwhile, consume it instead (Xen's `RING_FINAL_CHECK_FOR_*`).
    pub fn prepare_to_wait(&self) -> Result<bool, RingError> {
        self.indices
            .event
            .store(self.cons.wrapping_add(1), Ordering::Relaxed);
        // Pairs with the fence in `publish`.
        fence(Ordering::SeqCst);
        Ok(self.available()? == 0)
    }

    /// Messages consumed so far (the private index).
    pub fn consumed(&self) -> u32 {
        self.cons
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    #[test]
    fn the_page_is_one_page_without_padding() {
        assert_eq!(size_of::<RingPage>(), PAGE_BYTES);
        assert_eq!(align_of::<RingPage>(), PAGE_BYTES);
        assert_eq!(size_of::<Slot>(), 8 + PAYLOAD_BYTES);
        assert_eq!(core::mem::offset_of!(RingPage, requests), 32);
        assert_eq!(core::mem::offset_of!(RingPage, request_slots), 64);
        // Every byte is counted by `nonzero_bytes`: a page of 0xff bytes has 4096.
        let mut page = RingPage::new();
        assert_eq!(page.nonzero_bytes(), 0);
        // SAFETY: RingPage is made of atomics only, so any bit pattern is valid, and the
        // local is borrowed by nothing else while the bytes are written.
        unsafe { core::ptr::write_bytes(&raw mut page, 0xff, 1) };
        assert_eq!(page.nonzero_bytes(), PAGE_BYTES);
    }

    #[test]
    fn messages_arrive_in_order_and_the_ring_fills() {
        let page = Box::new(RingPage::new());
        page.init(100);
        assert_eq!((page.magic(), page.total()), (RING_MAGIC, 100));
        let (mut requests, _) = page.front();
        let (mut incoming, _) = page.back();
        for id in 0..RING_SLOTS {
            requests.push(id, &[id as u8; 3]).unwrap();
        }
        assert_eq!(requests.push(99, b"x"), Err(RingError::Full));
        assert_eq!(incoming.available(), Ok(0), "not published yet");
        assert!(
            requests.publish(),
            "the consumer asked for the first message"
        );
        assert_eq!(incoming.available(), Ok(RING_SLOTS));
        let mut buffer = [0; PAYLOAD_BYTES];
        for id in 0..RING_SLOTS {
            let received = incoming.pop(&mut buffer).unwrap().unwrap();
            assert_eq!(received, Received { id, len: 3 });
            assert_eq!(&buffer[..3], &[id as u8; 3]);
        }
        assert_eq!(incoming.pop(&mut buffer), Ok(None));
        assert_eq!(requests.free(), Ok(RING_SLOTS));
    }

    #[test]
    fn the_producer_notifies_only_a_consumer_that_asked() {
        let page = Box::new(RingPage::new());
        page.init(10);
        let (mut requests, _) = page.front();
        let (mut incoming, _) = page.back();
        let mut buffer = [0; PAYLOAD_BYTES];
        requests.push(0, b"a").unwrap();
        assert!(requests.publish());
        // The consumer has not looked again: no second event.
        requests.push(1, b"b").unwrap();
        assert!(!requests.publish());
        assert!(!requests.publish(), "nothing new: nothing to say");
        while incoming.pop(&mut buffer).unwrap().is_some() {}
        assert_eq!(incoming.prepare_to_wait(), Ok(true));
        requests.push(2, b"c").unwrap();
        assert!(requests.publish(), "the consumer waits for message 2");
        // A message published before the consumer asks again is found by its second look.
        incoming.pop(&mut buffer).unwrap();
        requests.push(3, b"d").unwrap();
        assert!(!requests.publish(), "the consumer has not asked again");
        assert_eq!(
            incoming.prepare_to_wait(),
            Ok(false),
            "message 3 is there: no wait"
        );
    }

    #[test]
    fn indices_that_make_no_sense_are_reported() {
        let page = Box::new(RingPage::new());
        page.init(10);
        let (incoming, _) = page.back();
        page.requests.prod.store(RING_SLOTS + 1, Ordering::Relaxed);
        assert_eq!(
            incoming.available(),
            Err(RingError::Corrupt {
                prod: RING_SLOTS + 1,
                cons: 0
            })
        );
        // What a page replaced by zeros looks like to a consumer that had taken 500 messages.
        let zeros = Box::new(RingPage::new());
        let (mut late, _) = zeros.back();
        late.cons = 500;
        assert!(matches!(late.available(), Err(RingError::Corrupt { .. })));
        assert!(matches!(
            late.prepare_to_wait(),
            Err(RingError::Corrupt { .. })
        ));
    }

    #[test]
    fn indices_wrap_at_two_to_the_32() {
        let page = Box::new(RingPage::new());
        page.init(10);
        let start = u32::MAX - 5;
        for indices in [&page.requests, &page.responses] {
            indices.prod.store(start, Ordering::Relaxed);
            indices.cons.store(start, Ordering::Relaxed);
        }
        let (mut requests, _) = page.front();
        let (mut incoming, _) = page.back();
        let mut buffer = [0; PAYLOAD_BYTES];
        for id in 0..40 {
            requests.push(id, &id.to_le_bytes()).unwrap();
            requests.publish();
            let received = incoming.pop(&mut buffer).unwrap().unwrap();
            assert_eq!((received.id, &buffer[..4]), (id, &id.to_le_bytes()[..]));
        }
    }

    /// An event channel stand-in: a pending flag the receiver clears before looking.
    struct Event(AtomicBool);

    impl Event {
        fn send(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
        /// Waits for a send; false after a second without one (a lost wake-up).
        fn wait(&self) -> bool {
            let deadline = Instant::now() + Duration::from_secs(1);
            while !self.0.swap(false, Ordering::SeqCst) {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::yield_now();
            }
            true
        }
        fn clear(&self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }

    /// The protocol ping and pong run, on two host threads: every message answered, in order,
    /// with no lost wake-up (a waiter that is never notified fails after a second).
    #[test]
    fn two_threads_exchange_without_losing_a_wake_up() {
        const TOTAL: u32 = 20_000;
        let page = Arc::new(RingPage::new());
        page.init(TOTAL);
        let to_back = Arc::new(Event(AtomicBool::new(false)));
        let to_front = Arc::new(Event(AtomicBool::new(false)));

        let back = {
            let (page, to_back, to_front) = (page.clone(), to_back.clone(), to_front.clone());
            std::thread::spawn(move || {
                let (mut incoming, mut outgoing) = page.back();
                let mut buffer = [0; PAYLOAD_BYTES];
                let mut answered = 0;
                while answered < page.total() {
                    to_back.clear();
                    let mut got = 0;
                    while let Some(received) = incoming.pop(&mut buffer).unwrap() {
                        let len = received.len as usize;
                        buffer[..len].reverse();
                        outgoing.push(received.id, &buffer[..len]).unwrap();
                        got += 1;
                    }
                    answered += got;
                    if outgoing.publish() {
                        to_front.send();
                    }
                    if got == 0 && incoming.prepare_to_wait().unwrap() {
                        assert!(to_back.wait(), "back end never woken at {answered}");
                    }
                }
                answered
            })
        };

        let (mut requests, mut responses) = page.front();
        let mut buffer = [0; PAYLOAD_BYTES];
        let (mut sent, mut answered) = (0u32, 0u32);
        while answered < TOTAL {
            to_front.clear();
            let mut progress = false;
            while let Some(received) = responses.pop(&mut buffer).unwrap() {
                assert_eq!(received.id, answered);
                let len = 1 + answered as usize % PAYLOAD_BYTES;
                let mut expected: Vec<u8> =
                    (0..len).map(|i| (answered as usize + i) as u8).collect();
                expected.reverse();
                assert_eq!(&buffer[..len], &expected[..]);
                answered += 1;
                progress = true;
            }
            while sent < TOTAL && sent - answered < RING_SLOTS {
                let len = 1 + sent as usize % PAYLOAD_BYTES;
                let bytes: Vec<u8> = (0..len).map(|i| (sent as usize + i) as u8).collect();
                requests.push(sent, &bytes).unwrap();
                sent += 1;
                progress = true;
            }
            if requests.publish() {
                to_back.send();
            }
            if !progress && responses.prepare_to_wait().unwrap() {
                assert!(to_front.wait(), "front end never woken at {answered}");
            }
        }
        assert_eq!(back.join().unwrap(), TOTAL);
    }
}

//! The test framework, after XTF: outcomes, assertion helpers, the final verdict.
//!
//! A test body records problems as it goes and returns; `main` then prints exactly one
//! `Test result: <OUTCOME>` line and powers off. The outcome is the most severe one recorded
//! (SUCCESS < SKIP < ERROR < FAILURE): FAILURE means the hypervisor broke the ABI, ERROR that
//! the test could not do its job. The state is a static so that trap handlers can record too.

use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

use lamina_abi::Errno;
use lamina_abi::sched::ShutdownReason;

use crate::console::println;
use crate::hv;

/// A test's verdict, in increasing severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Outcome {
    Success = 0,
    Skip = 1,
    Error = 2,
    Failure = 3,
}

impl Outcome {
    /// The word on the `Test result:` line.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Outcome::Success => "SUCCESS",
            Outcome::Skip => "SKIP",
            Outcome::Error => "ERROR",
            Outcome::Failure => "FAILURE",
        }
    }
}

static OUTCOME: AtomicU8 = AtomicU8::new(Outcome::Success as u8);

/// Raises the verdict to `outcome` if that is more severe.
pub(crate) fn record(outcome: Outcome) {
    OUTCOME.fetch_max(outcome as u8, Ordering::Relaxed);
}

/// The verdict so far.
pub(crate) fn outcome() -> Outcome {
    match OUTCOME.load(Ordering::Relaxed) {
        0 => Outcome::Success,
        1 => Outcome::Skip,
        2 => Outcome::Error,
        _ => Outcome::Failure,
    }
}

/// The hypervisor did something the ABI forbids: prints `FAIL: <why>`.
pub(crate) fn fail(why: fmt::Arguments<'_>) {
    println!("FAIL: {why}");
    record(Outcome::Failure);
}

/// The test could not check what it should (its own set-up failed): prints `ERROR: <why>`.
pub(crate) fn error(why: fmt::Arguments<'_>) {
    println!("ERROR: {why}");
    record(Outcome::Error);
}

/// The test cannot check something in this run (what it needs is not there): prints
/// `SKIP: <why>`. A run whose worst outcome is a skip is reported as skipped, not passed.
pub(crate) fn skip(why: fmt::Arguments<'_>) {
    println!("SKIP: {why}");
    record(Outcome::Skip);
}

/// Prints the verdict line and powers off.
pub(crate) fn finish() -> ! {
    println!("Test result: {}", outcome().name());
    hv::shutdown(ShutdownReason::Poweroff)
}

/// Prints `FAIL: <what>: expected <x>, got <y>` and records a failure.
pub(crate) fn mismatch(
    what: &dyn fmt::Display,
    expected: &dyn fmt::Debug,
    actual: &dyn fmt::Debug,
) {
    println!("FAIL: {what}: expected {expected:?}, got {actual:?}");
    record(Outcome::Failure);
}

/// Checks `actual == expected`; on a mismatch prints both and records a failure. `what` is
/// anything `Display` (a string or `format_args!`). Evaluates to whether they matched.
macro_rules! check_eq {
    ($what:expr, $expected:expr, $actual:expr $(,)?) => {{
        let expected = $expected;
        let actual = $actual;
        let matched = expected == actual;
        if !matched {
            $crate::framework::mismatch(&$what, &expected, &actual);
        }
        matched
    }};
}
pub(crate) use check_eq;

/// Checks a condition; if false prints `FAIL: <message>` and records a failure.
macro_rules! check {
    ($condition:expr, $($message:tt)+) => {{
        let holds: bool = $condition;
        if !holds {
            $crate::framework::fail(format_args!($($message)+));
        }
        holds
    }};
}
pub(crate) use check;

/// Shows an integer in hex in `check_eq!` messages.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hex<T>(pub(crate) T);

impl<T: fmt::LowerHex> fmt::Debug for Hex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A hypercall's RAX, shown as `-EFAULT` or `0x10` in `check_eq!` messages.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Status(pub(crate) u64);

impl Status {
    /// The RAX of a call failing with `errno`.
    pub(crate) const fn err(errno: Errno) -> Status {
        Status(errno.to_return_value())
    }

    /// The value of a successful call (RAX >= 0).
    pub(crate) const fn value(self) -> Option<u64> {
        if (self.0 as i64) < 0 {
            None
        } else {
            Some(self.0)
        }
    }
}

/// Checks that a call the test relies on succeeded: evaluates to its value, or records a
/// failure (the hypervisor refused a documented valid call) and evaluates to `None`.
pub(crate) fn expect_ok(what: impl fmt::Display, status: Status) -> Option<u64> {
    let value = status.value();
    if value.is_none() {
        println!("FAIL: {what}: expected success, got {status:?}");
        record(Outcome::Failure);
    }
    value
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Errno::decode(self.0) {
            Ok(value) => write!(f, "{value:#x}"),
            Err(Ok(errno)) => write!(f, "-{errno}"),
            Err(Err(raw)) => write!(f, "{raw} (undefined status)"),
        }
    }
}

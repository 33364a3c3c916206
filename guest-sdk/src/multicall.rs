//! Multicall (docs/abi.md 12): several hypercalls for one exit, built with types.
//!
//! A [`Batch`] holds up to `N` [`Call`]s (at most `MULTICALL_MAX`). Each `Call` is made by a
//! typed constructor that knows its hypercall's registers; one that names a buffer borrows it
//! for the batch's lifetime, so the buffer outlives the submission. [`Batch::submit`] makes
//! one `multicall` hypercall; then [`Batch::result`] decodes each entry's result as the
//! single call would have returned it. A batch may be preempted between calls (ABI 1.8):
//! other vCPUs may run, never the caller, before it is finished.
//!
//! ```ignore
//! let mut batch = Batch::<4>::new();
//! let version = batch.push(Call::version())?;
//! let size = batch.push(Call::current_reservation())?;
//! batch.submit()?;
//! let ram = batch.result(size).unwrap()?;
//! ```

use core::fmt;
use core::marker::PhantomData;

use lamina_abi::Hypercall;
use lamina_abi::console::{CONSOLE_WRITE_MAX, ConsoleOp};
use lamina_abi::event_channel::{EventChannelOp, Virq};
use lamina_abi::memory::MemoryOp;
use lamina_abi::multicall::{MULTICALL_MAX, MulticallEntry};
use lamina_abi::sched::{SchedOp, ShutdownReason};
use lamina_abi::stats::{ExitCounters, StatsOp};
use lamina_abi::vcpu::VcpuOp;

use crate::events::Port;
use crate::hypercall::{self, HypercallError};

/// One call of a batch; `'a` is the lifetime of the buffers it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call<'a> {
    entry: MulticallEntry,
    buffers: PhantomData<&'a [u8]>,
}

impl Call<'static> {
    const fn new(op: Hypercall, args: [u64; 5]) -> Call<'static> {
        Call {
            entry: MulticallEntry {
                op: op as u64,
                args,
                result: 0,
            },
            buffers: PhantomData,
        }
    }

    /// `version`.
    pub const fn version() -> Self {
        Self::new(Hypercall::Version, [0; 5])
    }

    /// `sched_op` yield.
    pub const fn sched_yield() -> Self {
        Self::new(Hypercall::SchedOp, [SchedOp::Yield as u64, 0, 0, 0, 0])
    }

    /// `sched_op` shutdown: ends the domain, later entries do not run.
    pub const fn shutdown(reason: ShutdownReason) -> Self {
        Self::new(
            Hypercall::SchedOp,
            [SchedOp::Shutdown as u64, reason as u64, 0, 0, 0],
        )
    }

    const fn evtchn(op: EventChannelOp, a2: u64, a3: u64) -> Self {
        Self::new(Hypercall::EventChannelOp, [op as u64, a2, a3, 0, 0])
    }

    /// `event_channel_op` send.
    pub const fn evtchn_send(port: Port) -> Self {
        Self::evtchn(EventChannelOp::Send, port.number() as u64, 0)
    }

    /// `event_channel_op` unmask.
    pub const fn evtchn_unmask(port: Port) -> Self {
        Self::evtchn(EventChannelOp::Unmask, port.number() as u64, 0)
    }

    /// `event_channel_op` close (the SDK's handler for the port stays registered: call
    /// [`crate::events::remove_handler`]).
    pub const fn evtchn_close(port: Port) -> Self {
        Self::evtchn(EventChannelOp::Close, port.number() as u64, 0)
    }

    /// `event_channel_op` bind_virq; the result is the port.
    pub const fn bind_virq(virq: Virq, vcpu: u32) -> Self {
        Self::evtchn(EventChannelOp::BindVirq, virq as u64, vcpu as u64)
    }

    /// `event_channel_op` bind_ipi; the result is the port.
    pub const fn bind_ipi(vcpu: u32) -> Self {
        Self::evtchn(EventChannelOp::BindIpi, vcpu as u64, 0)
    }

    /// `event_channel_op` alloc_unbound; the result is the port.
    pub const fn alloc_unbound(remote: u64) -> Self {
        Self::evtchn(EventChannelOp::AllocUnbound, remote, 0)
    }

    const fn vcpu(op: VcpuOp, vcpu: u32, argument: u64) -> Self {
        Self::new(Hypercall::VcpuOp, [op as u64, vcpu as u64, argument, 0, 0])
    }

    /// `vcpu_op` set_periodic_timer (0 stops).
    pub const fn set_periodic_timer(vcpu: u32, period_ns: u64) -> Self {
        Self::vcpu(VcpuOp::SetPeriodicTimer, vcpu, period_ns)
    }

    /// `vcpu_op` set_singleshot_timer (0 cancels).
    pub const fn set_singleshot_timer(vcpu: u32, deadline_ns: u64) -> Self {
        Self::vcpu(VcpuOp::SetSingleshotTimer, vcpu, deadline_ns)
    }

    /// `vcpu_op` set_upcall_vector. Installs no handler: see
    /// [`crate::events::install_upcall`].
    pub const fn set_upcall_vector(vcpu: u32, vector: u8) -> Self {
        Self::vcpu(VcpuOp::SetUpcallVector, vcpu, vector as u64)
    }

    /// `memory_op` current_reservation.
    pub const fn current_reservation() -> Self {
        Self::new(
            Hypercall::MemoryOp,
            [MemoryOp::CurrentReservation as u64, 0, 0, 0, 0],
        )
    }
}

impl<'a> Call<'a> {
    /// `console_io` write of `bytes` (at most `CONSOLE_WRITE_MAX`; longer writes are cut
    /// there).
    pub fn console_write(bytes: &'a [u8]) -> Call<'a> {
        let len = bytes.len().min(CONSOLE_WRITE_MAX as usize);
        Call {
            entry: MulticallEntry {
                op: Hypercall::ConsoleIo as u64,
                args: [
                    ConsoleOp::Write as u64,
                    hypercall::gpa_of(bytes),
                    len as u64,
                    0,
                    0,
                ],
                result: 0,
            },
            buffers: PhantomData,
        }
    }

    /// `stats_op` exit_counters of vCPU `vcpu` of `domain` (`DOMID_SELF` or an id) into `out`,
    /// which the batch borrows until it is dropped; the result is 0 (docs/abi.md 15).
    ///
    /// A read of the caller's own counters in a batch counts the `multicall` exit (one exit,
    /// one hypercall: number 6), not a `stats_op` one: entries are not exits.
    pub fn exit_counters(domain: u64, vcpu: u32, out: &'a mut ExitCounters) -> Call<'a> {
        Call {
            entry: MulticallEntry {
                op: Hypercall::StatsOp as u64,
                args: [
                    StatsOp::ExitCounters as u64,
                    domain,
                    u64::from(vcpu),
                    core::ptr::from_mut(out) as u64,
                    0,
                ],
                result: 0,
            },
            buffers: PhantomData,
        }
    }

    /// Any call, by number and registers.
    ///
    /// # Safety
    /// A buffer the call names must stay valid for `'a`, and one the hypervisor writes must be
    /// the caller's to have written.
    pub const unsafe fn raw(op: u64, args: [u64; 5]) -> Call<'a> {
        Call {
            entry: MulticallEntry {
                op,
                args,
                result: 0,
            },
            buffers: PhantomData,
        }
    }

    /// The entry as the hypervisor will read it.
    pub const fn entry(&self) -> &MulticallEntry {
        &self.entry
    }
}

/// A batch has no room for another call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchFull;

impl fmt::Display for BatchFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the multicall batch is full")
    }
}

/// Up to `N` calls made with one `multicall` hypercall.
#[derive(Debug)]
pub struct Batch<'a, const N: usize> {
    entries: [MulticallEntry; N],
    len: usize,
    ran: usize,
    buffers: PhantomData<&'a [u8]>,
}

impl<'a, const N: usize> Batch<'a, N> {
    /// An empty batch.
    pub const fn new() -> Self {
        const {
            assert!(
                N as u64 <= MULTICALL_MAX,
                "more entries than one multicall takes"
            )
        };
        Batch {
            entries: [MulticallEntry {
                op: 0,
                args: [0; 5],
                result: 0,
            }; N],
            len: 0,
            ran: 0,
            buffers: PhantomData,
        }
    }

    /// Appends `call`; returns its index for [`result`](Self::result).
    pub fn push(&mut self, call: Call<'a>) -> Result<usize, BatchFull> {
        if self.len == N {
            return Err(BatchFull);
        }
        self.entries[self.len] = call.entry;
        self.len += 1;
        Ok(self.len - 1)
    }

    /// Number of calls in the batch.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch is empty.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries as the hypervisor reads them.
    pub fn entries(&self) -> &[MulticallEntry] {
        &self.entries[..self.len]
    }

    /// Makes the calls with one hypercall. Returns how many ran (all of them unless one shut
    /// the domain down, in which case this never returns); an error means none ran.
    ///
    /// Since ABI 1.8 the hypervisor may let other vCPUs run between two calls of the batch
    /// (the end of this vCPU's slice); this vCPU runs no code of its own until the batch is
    /// done, so only another vCPU can see it half made.
    pub fn submit(&mut self) -> Result<usize, HypercallError> {
        self.ran = 0;
        // SAFETY: every entry came from a `Call` whose buffers live for `'a`, which outlives
        // the batch; the hypervisor writes only the `result` fields of our array.
        let ran = unsafe {
            hypercall::call(
                Hypercall::Multicall,
                [self.entries.as_mut_ptr() as u64, self.len as u64, 0, 0, 0],
            )
        }?;
        self.ran = (ran as usize).min(self.len);
        Ok(self.ran)
    }

    /// The decoded result of call `index` of the last submission; `None` if it did not run.
    pub fn result(&self, index: usize) -> Option<Result<u64, HypercallError>> {
        if index >= self.ran {
            return None;
        }
        // SAFETY: a field of our own array, which the hypervisor wrote during `submit`.
        let raw = unsafe { core::ptr::read_volatile(&raw const self.entries[index].result) };
        Some(hypercall::decode(raw))
    }

    /// Empties the batch for reuse.
    pub fn clear(&mut self) {
        self.len = 0;
        self.ran = 0;
    }
}

impl<const N: usize> Default for Batch<'_, N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_put_their_arguments_in_the_abi_registers() {
        let call = Call::set_periodic_timer(0, 1_000_000);
        assert_eq!(call.entry().op, Hypercall::VcpuOp as u64);
        assert_eq!(
            call.entry().args,
            [VcpuOp::SetPeriodicTimer as u64, 0, 1_000_000, 0, 0]
        );
        let call = Call::evtchn_send(Port::new(5));
        assert_eq!(call.entry().op, Hypercall::EventChannelOp as u64);
        assert_eq!(call.entry().args[..2], [EventChannelOp::Send as u64, 5]);
        let text = b"hello\n";
        let call = Call::console_write(text);
        assert_eq!(call.entry().args[1], text.as_ptr() as u64);
        assert_eq!(call.entry().args[2], 6);
        let mut counters = ExitCounters::default();
        let address = &raw const counters as u64;
        let call = Call::exit_counters(0x7ff0, 0, &mut counters);
        assert_eq!(call.entry().op, Hypercall::StatsOp as u64);
        assert_eq!(
            call.entry().args,
            [StatsOp::ExitCounters as u64, 0x7ff0, 0, address, 0]
        );
    }

    #[test]
    fn a_batch_holds_at_most_n_calls() {
        let mut batch = Batch::<2>::new();
        assert_eq!(batch.push(Call::version()), Ok(0));
        assert_eq!(batch.push(Call::sched_yield()), Ok(1));
        assert_eq!(batch.push(Call::version()), Err(BatchFull));
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.entries()[1].args[0], SchedOp::Yield as u64);
        assert_eq!(batch.result(0), None, "nothing ran yet");
        batch.clear();
        assert!(batch.is_empty());
    }

    #[test]
    fn entries_are_laid_out_for_the_hypervisor() {
        assert_eq!(size_of::<MulticallEntry>(), 56);
        let batch = Batch::<3>::new();
        assert_eq!(size_of_val(&batch.entries), 3 * 56);
    }
}

//! Multicall (`Hypercall::Multicall`): several hypercalls for the price of one exit.
//!
//! `RDI` = guest-physical address of an array of [`MulticallEntry`], `RSI` = their number
//! (0..=[`MULTICALL_MAX`]; more is `-E2BIG`). The whole array is copied first (so an entry
//! that writes over a later one does not change what it does); the entries run in order; each one's result
//! (as it would have been returned in RAX) is written to its `result`. A failing entry does
//! not stop the batch. Entries may not be `Multicall` nor a sched_op that waits
//! (`Block`, `Poll`): those get `-EINVAL`. An entry that shuts the domain down ends the
//! batch (later entries do not run). The call returns the number of entries run, or
//! `-EFAULT` (nothing run) when the array is not inside RAM.

/// Most entries per batch.
pub const MULTICALL_MAX: u64 = 64;

/// One call of a batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MulticallEntry {
    /// Hypercall number (as RAX).
    pub op: u64,
    /// Arguments (as RDI, RSI, RDX, R10, R8).
    pub args: [u64; 5],
    /// Written by the hypervisor: the call's result.
    pub result: u64,
}

const _: () = assert!(core::mem::size_of::<MulticallEntry>() == 56);
const _: () = assert!(core::mem::offset_of!(MulticallEntry, result) == 48);

//! Exit accounting: how many exits of each kind a domain caused, and which hypercalls.

use lamina_abi::Hypercall;
use lamina_abi::stats::{ExitCounters, HYPERCALL_SLOTS, exit_kind};

// The report order is the ABI's numbering of exit kinds (docs/abi.md 15).
const _: () = assert!(ExitKind::Hypercall as usize == exit_kind::HYPERCALL);
const _: () = assert!(ExitKind::NestedPageFault as usize == exit_kind::NESTED_PAGE_FAULT);
const _: () = assert!(ExitKind::InterruptWindow as usize == exit_kind::INTERRUPT_WINDOW);
const _: () = assert!(ExitKind::Other as usize == exit_kind::OTHER);
const _: () = assert!(ExitKind::ALL.len() == exit_kind::COUNT);

/// Exit kinds as counted and reported in the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ExitKind {
    Hypercall,
    Cpuid,
    Hlt,
    IoUart,
    IoOther,
    MsrRead,
    MsrWrite,
    InvalidOpcode,
    NestedPageFault,
    TripleFault,
    ExternalInterrupt,
    InterruptWindow,
    Other,
}

impl ExitKind {
    /// All kinds, in report order.
    pub const ALL: [ExitKind; 13] = [
        ExitKind::Hypercall,
        ExitKind::Cpuid,
        ExitKind::Hlt,
        ExitKind::IoUart,
        ExitKind::IoOther,
        ExitKind::MsrRead,
        ExitKind::MsrWrite,
        ExitKind::InvalidOpcode,
        ExitKind::NestedPageFault,
        ExitKind::TripleFault,
        ExitKind::ExternalInterrupt,
        ExitKind::InterruptWindow,
        ExitKind::Other,
    ];

    /// Name used in the summary (`hypercall=3`).
    pub const fn name(self) -> &'static str {
        match self {
            ExitKind::Hypercall => "hypercall",
            ExitKind::Cpuid => "cpuid",
            ExitKind::Hlt => "hlt",
            ExitKind::IoUart => "io_uart",
            ExitKind::IoOther => "io_other",
            ExitKind::MsrRead => "rdmsr",
            ExitKind::MsrWrite => "wrmsr",
            ExitKind::InvalidOpcode => "invalid_opcode",
            ExitKind::NestedPageFault => "npf",
            ExitKind::TripleFault => "triple_fault",
            ExitKind::ExternalInterrupt => "interrupt",
            ExitKind::InterruptWindow => "irq_window",
            ExitKind::Other => "other",
        }
    }
}

/// A vCPU's exit counters.
///
/// Hypercall exits are counted once, by number: their kind's count is the sum of
/// `by_hypercall`, made when read (one increment fewer on the hot path).
#[derive(Clone, Debug, Default)]
pub struct ExitStats {
    /// Every kind but [`ExitKind::Hypercall`], whose slot stays 0.
    by_kind: [u64; ExitKind::ALL.len()],
    /// Hypercalls by number; the last slot counts numbers the ABI does not define.
    by_hypercall: [u64; HYPERCALL_SLOTS],
    /// TSC ticks spent in the hypervisor between exits and the following entries.
    pub handling_tsc: u64,
}

/// The slot counting undefined hypercall numbers.
const UNDEFINED_SLOT: usize = HYPERCALL_SLOTS - 1;

impl ExitStats {
    /// Counts one exit; a hypercall exit is counted (and traced) by [`Self::count_hypercall`]
    /// alone, so this does nothing for it.
    #[inline]
    pub fn count(&mut self, kind: ExitKind) {
        // The test folds away where the kind is a constant.
        if kind != ExitKind::Hypercall {
            crate::common::trace::exit(kind as u32);
            self.by_kind[kind as usize] += 1;
        }
    }

    /// Counts one hypercall exit, by number (its kind's count follows from these).
    #[inline]
    pub fn count_hypercall(&mut self, nr: u64) {
        crate::common::trace::hypercall(nr);
        let slot = if nr < Hypercall::COUNT as u64 {
            nr as usize
        } else {
            UNDEFINED_SLOT
        };
        self.by_hypercall[slot] += 1;
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &ExitStats) {
        for (mine, theirs) in self.by_kind.iter_mut().zip(&other.by_kind) {
            *mine += theirs;
        }
        for (mine, theirs) in self.by_hypercall.iter_mut().zip(&other.by_hypercall) {
            *mine += theirs;
        }
        self.handling_tsc += other.handling_tsc;
    }

    /// Adds `other`'s counts to these and zeroes `other`.
    pub fn absorb(&mut self, other: &mut ExitStats) {
        self.add(other);
        *other = ExitStats::default();
    }

    /// The counters as the ABI publishes them.
    pub fn to_counters(&self) -> ExitCounters {
        let mut counters = ExitCounters {
            total: self.total(),
            handling_tsc: self.handling_tsc,
            ..Default::default()
        };
        counters.by_kind[..self.by_kind.len()].copy_from_slice(&self.by_kind);
        counters.by_kind[ExitKind::Hypercall as usize] = self.hypercalls();
        counters.by_hypercall = self.by_hypercall;
        counters
    }

    /// Exits of one kind.
    pub fn of(&self, kind: ExitKind) -> u64 {
        match kind {
            ExitKind::Hypercall => self.hypercalls(),
            kind => self.by_kind[kind as usize],
        }
    }

    fn hypercalls(&self) -> u64 {
        self.by_hypercall.iter().sum()
    }

    /// All exits.
    pub fn total(&self) -> u64 {
        self.by_kind.iter().sum::<u64>() + self.hypercalls()
    }

    /// Writes ` kind=n` for every non-zero kind, then ` hc.<name>=n` per hypercall.
    pub fn write_summary(&self, out: &mut dyn core::fmt::Write) -> core::fmt::Result {
        for kind in ExitKind::ALL {
            if self.of(kind) != 0 {
                write!(out, " {}={}", kind.name(), self.of(kind))?;
            }
        }
        for call in Hypercall::ALL {
            let n = self.by_hypercall[call as usize];
            if n != 0 {
                write!(out, " hc.{}={}", call.name(), n)?;
            }
        }
        let unknown = self.by_hypercall[UNDEFINED_SLOT];
        if unknown != 0 {
            write!(out, " hc.unknown={unknown}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypercall_exits_are_counted_by_number_and_published_as_a_kind_too() {
        let mut stats = ExitStats::default();
        stats.count(ExitKind::Hypercall);
        stats.count_hypercall(0);
        stats.count_hypercall(0x7fff);
        stats.count(ExitKind::Cpuid);
        assert_eq!(stats.of(ExitKind::Hypercall), 2);
        assert_eq!(stats.total(), 3);
        let counters = stats.to_counters();
        assert_eq!(counters.by_kind[exit_kind::HYPERCALL], 2);
        assert_eq!(counters.by_kind[ExitKind::Cpuid as usize], 1);
        assert_eq!(counters.by_hypercall[0], 1);
        assert_eq!(counters.by_hypercall[UNDEFINED_SLOT], 1);
        assert_eq!(counters.total, counters.by_kind.iter().sum::<u64>());
        let mut merged = ExitStats::default();
        merged.absorb(&mut stats);
        assert_eq!(merged.of(ExitKind::Hypercall), 2);
        assert_eq!(stats.total(), 0);
    }
}

//! Exit accounting (`stats_op`, docs/abi.md 15): how many exits a vCPU caused, of which kinds,
//! for which hypercalls, and how long the hypervisor spent handling them.
//!
//! [`own_exit_counters`] reads the calling vCPU's counters; [`exit_counters`] reads any vCPU
//! of this domain, or of another domain if this one is privileged
//! ([`START_FLAG_PRIVILEGED`](lamina_abi::start_info::START_FLAG_PRIVILEGED)). The counters
//! run from the start of the domain and include the call's own exit, so the usual way to
//! measure a piece of code is two reads and a [`delta`]:
//!
//! ```ignore
//! use lamina_guest_sdk::stats::{self, exit_kind};
//!
//! let before = stats::own_exit_counters()?;
//! do_work();
//! let after = stats::own_exit_counters()?;
//! let spent = stats::delta(&after, &before);
//! // `spent` includes the second read's own exit: one hypercall, stats_op.
//! println!("{} exits, {} CPUID", spent.total, spent.by_kind[exit_kind::CPUID]);
//! ```
//!
//! Check feature bit [`EXIT_STATS`](lamina_abi::cpuid::features::EXIT_STATS) (or the ABI
//! version, 1.1 and later) first: an older hypervisor returns `-ENOSYS`.

use lamina_abi::Hypercall;
use lamina_abi::event_channel::DOMID_SELF;
use lamina_abi::stats::StatsOp;

pub use lamina_abi::stats::{ExitCounters, HYPERCALL_SLOTS, exit_kind};

use crate::hypercall::{self, HypercallError};

/// The slot of [`ExitCounters::by_hypercall`] that counts every number the ABI does not
/// define, and every number above 14.
pub const UNDEFINED_HYPERCALL_SLOT: usize = HYPERCALL_SLOTS - 1;

/// Copies the counters of vCPU `vcpu` of domain `domain` ([`DOMID_SELF`] or a domain id).
///
/// Errors, in the order the hypervisor checks them (docs/abi.md 15):
/// - `ENOENT`: no domain has the id `domain`;
/// - `EPERM`: `domain` is another domain and this one is not privileged;
/// - `ENOENT`: `vcpu` is not below that domain's number of vCPUs;
/// - `ENOSYS`: the hypervisor predates ABI 1.1 (no `stats_op`).
///
/// The SDK's buffer is always aligned and inside RAM, so `EINVAL` and `EFAULT` do not occur.
pub fn exit_counters(domain: u64, vcpu: u32) -> Result<ExitCounters, HypercallError> {
    let mut counters = ExitCounters::default();
    // SAFETY: the hypervisor writes exactly one `ExitCounters` (272 bytes, 8-byte aligned) to
    // the address of our local, which we borrow mutably for the call and whose address is its
    // guest-physical address under the identity map; every bit pattern is a valid value.
    unsafe {
        hypercall::call(
            Hypercall::StatsOp,
            [
                StatsOp::ExitCounters as u64,
                domain,
                u64::from(vcpu),
                &raw mut counters as u64,
                0,
            ],
        )
    }?;
    Ok(counters)
}

/// The counters of the calling vCPU (vCPU 0 of this domain: the SDK runs there only),
/// including the exit of this very call.
pub fn own_exit_counters() -> Result<ExitCounters, HypercallError> {
    exit_counters(DOMID_SELF, 0)
}

/// What happened between two reads of the same vCPU's counters: `later - earlier`, field by
/// field (wrapping, so that a pair read in the wrong order shows up as huge values rather
/// than a panic).
pub fn delta(later: &ExitCounters, earlier: &ExitCounters) -> ExitCounters {
    let mut d = ExitCounters {
        total: later.total.wrapping_sub(earlier.total),
        handling_tsc: later.handling_tsc.wrapping_sub(earlier.handling_tsc),
        ..ExitCounters::default()
    };
    for (slot, (l, e)) in d
        .by_kind
        .iter_mut()
        .zip(later.by_kind.iter().zip(&earlier.by_kind))
    {
        *slot = l.wrapping_sub(*e);
    }
    for (slot, (l, e)) in d
        .by_hypercall
        .iter_mut()
        .zip(later.by_hypercall.iter().zip(&earlier.by_hypercall))
    {
        *slot = l.wrapping_sub(*e);
    }
    d
}

/// The sum of [`ExitCounters::by_kind`]: every exit has exactly one kind, so this equals
/// [`ExitCounters::total`] in any copy the hypervisor wrote.
pub fn sum_of_kinds(counters: &ExitCounters) -> u64 {
    counters
        .by_kind
        .iter()
        .fold(0, |sum, &n| sum.wrapping_add(n))
}

/// The slot of [`ExitCounters::by_hypercall`] that counts hypercall number `number`: the
/// number itself for the calls this ABI version defines, [`UNDEFINED_HYPERCALL_SLOT`] for
/// every other number.
pub fn hypercall_slot(number: u64) -> usize {
    match Hypercall::try_from(number) {
        Ok(call) if (call as usize) < UNDEFINED_HYPERCALL_SLOT => call as usize,
        _ => UNDEFINED_HYPERCALL_SLOT,
    }
}

/// A short name for index `kind` of [`ExitCounters::by_kind`], the word the hypervisor's
/// end-of-domain summary uses for it (`cpuid=3`), or `"unused"` for the slots no kind has.
pub const fn kind_name(kind: usize) -> &'static str {
    match kind {
        exit_kind::HYPERCALL => "hypercall",
        exit_kind::CPUID => "cpuid",
        exit_kind::HLT => "hlt",
        exit_kind::IO_UART => "io_uart",
        exit_kind::IO_OTHER => "io_other",
        exit_kind::MSR_READ => "rdmsr",
        exit_kind::MSR_WRITE => "wrmsr",
        exit_kind::INVALID_OPCODE => "invalid_opcode",
        exit_kind::NESTED_PAGE_FAULT => "npf",
        exit_kind::TRIPLE_FAULT => "triple_fault",
        exit_kind::INTERRUPT => "interrupt",
        exit_kind::INTERRUPT_WINDOW => "irq_window",
        exit_kind::OTHER => "other",
        _ => "unused",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defined_hypercalls_have_their_own_slot_and_the_rest_share_the_last() {
        for call in Hypercall::ALL {
            assert_eq!(
                hypercall_slot(call as u64),
                call as usize,
                "{}",
                call.name()
            );
        }
        assert_eq!(hypercall_slot(Hypercall::StatsOp as u64), 7);
        let first_undefined = Hypercall::ALL.len() as u64;
        for number in [first_undefined, 14, 15, 16, 0x1000, 1 << 32, u64::MAX] {
            assert_eq!(
                hypercall_slot(number),
                UNDEFINED_HYPERCALL_SLOT,
                "{number:#x}"
            );
        }
        assert_eq!(UNDEFINED_HYPERCALL_SLOT, 15);
    }

    #[test]
    fn delta_subtracts_every_field() {
        let mut earlier = ExitCounters {
            total: 10,
            handling_tsc: 1000,
            ..ExitCounters::default()
        };
        earlier.by_kind[exit_kind::HYPERCALL] = 7;
        earlier.by_kind[exit_kind::CPUID] = 3;
        earlier.by_hypercall[0] = 5;
        earlier.by_hypercall[7] = 2;
        let mut later = earlier;
        later.total += 4;
        later.handling_tsc += 250;
        later.by_kind[exit_kind::HYPERCALL] += 3;
        later.by_kind[exit_kind::CPUID] += 1;
        later.by_hypercall[0] += 2;
        later.by_hypercall[7] += 1;

        let d = delta(&later, &earlier);
        assert_eq!(d.total, 4);
        assert_eq!(d.handling_tsc, 250);
        assert_eq!(d.by_kind[exit_kind::HYPERCALL], 3);
        assert_eq!(d.by_kind[exit_kind::CPUID], 1);
        assert_eq!(sum_of_kinds(&d), d.total);
        assert_eq!(d.by_hypercall[0], 2);
        assert_eq!(d.by_hypercall[7], 1);
        assert_eq!(d.by_hypercall[15], 0);
        assert_eq!(delta(&later, &later), ExitCounters::default());
        // Reads in the wrong order wrap instead of panicking.
        assert_eq!(delta(&earlier, &later).total, 4u64.wrapping_neg());
    }

    #[test]
    fn kinds_have_names_and_only_used_slots_do() {
        let names: Vec<&str> = (0..exit_kind::COUNT).map(kind_name).collect();
        assert!(names.iter().all(|name| *name != "unused"));
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "two kinds share a name");
        for kind in exit_kind::COUNT..16 {
            assert_eq!(kind_name(kind), "unused");
        }
    }

    #[test]
    fn the_structure_is_the_abis() {
        assert_eq!(size_of::<ExitCounters>(), 272);
        assert_eq!(align_of::<ExitCounters>(), 8);
        assert_eq!(core::mem::offset_of!(ExitCounters, by_kind), 8);
        assert_eq!(core::mem::offset_of!(ExitCounters, by_hypercall), 136);
        assert_eq!(core::mem::offset_of!(ExitCounters, handling_tsc), 264);
    }
}

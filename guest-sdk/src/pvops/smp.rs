//! The SMP group: what a kernel's vCPUs do to each other (docs/abi.md 20). IPIs, TLB
//! shootdowns, and waiting for a sibling (a lock holder) until it kicks.
//!
//! IPIs have kinds, numbered `0..IPI_SLOTS` (a reschedule, a function call, a shootdown...).
//! The paravirtual backend sends a kind as the event of IPI slot `kind` (docs/abi.md 8.10,
//! 8.11), which the kernel binds on each vCPU with [`bind_ipi_kind`] and handles as any
//! event; the native backend sends it as interrupt vector [`ipi_vector`]`(kind)` through the
//! x2APIC ICR, one write per target (docs/abi.md 14), which the receiver acknowledges with
//! an EOI.

use lamina_abi::event_channel::IPI_SLOTS;

use crate::events::Port;
use crate::hypercall::HypercallError;
use crate::vcpu::RunstateArea;
use lamina_abi::vcpu::runstate;

/// What can go wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmpError {
    /// The hypervisor refused the call.
    Hypercall(HypercallError),
    /// An IPI kind at or above `IPI_SLOTS`, or a vCPU above the 64 a mask can name.
    BadArgument,
    /// The native backend needs an x2APIC, and CPUID offers none.
    NoX2apic,
}

impl From<HypercallError> for SmpError {
    fn from(error: HypercallError) -> Self {
        SmpError::Hypercall(error)
    }
}

impl core::fmt::Display for SmpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SmpError::Hypercall(error) => write!(f, "{error}"),
            SmpError::BadArgument => f.write_str("IPI kind or vCPU out of range"),
            SmpError::NoX2apic => f.write_str("no x2APIC for native IPIs"),
        }
    }
}

/// Operations between vCPUs.
pub trait SmpOps: Sync {
    /// The backend's name, for logs.
    fn name(&self) -> &'static str;
    /// Sends IPI `kind` to every vCPU of `mask` (bit `v`: vCPU `v`).
    fn send_ipi(&self, mask: u64, kind: u8) -> Result<(), SmpError>;
    /// Makes every vCPU of `mask` drop its translations of `addresses` (all of them when
    /// empty): when this returns, none uses a translation it cached before the call. The
    /// kernel changed its page tables first.
    fn flush_tlb(&self, mask: u64, addresses: &[u64]) -> Result<(), SmpError>;
    /// Waits a little for a sibling's kick: until `kick_port` (this vCPU's IPI port of the
    /// kind the kicker sends) is pending, or briefly. The caller checks its condition again
    /// after each return and consumes the port's pending bit.
    fn wait_for_kick(&self, kick_port: Port);
}

/// The vector the native backend sends IPI `kind` on: from 0xe0 up (below the timer's 0xec
/// and the upcall's 0xf3).
pub const fn ipi_vector(kind: u8) -> u8 {
    0xe0 + kind
}

/// The ICR value of a fixed IPI of `vector` to the x2APIC id `destination` (Intel SDM Vol.
/// 3A 11.12.9: destination in bits 63:32, physical mode, no shorthand, edge).
pub const fn icr_fixed(destination: u32, vector: u8) -> u64 {
    (destination as u64) << 32 | vector as u64
}

/// Binds IPI `kind` on vCPU `vcpu` for the paravirtual backend (once per vCPU and kind, at
/// boot, before any sibling sends it); the port is delivered like any event.
pub fn bind_ipi_kind(vcpu: u32, kind: u8) -> Result<Port, SmpError> {
    if u64::from(kind) >= IPI_SLOTS {
        return Err(SmpError::BadArgument);
    }
    Ok(crate::events::bind_ipi_slot(vcpu, kind)?)
}

/// Whether the vCPU whose run-state area this is was preempted: ready but not running
/// (docs/abi.md 9.2), so waiting for it to act is waiting for the hypervisor to run it.
pub fn is_preempted(area: &RunstateArea) -> bool {
    area.read().state == runstate::RUNNABLE
}

/// Paravirtual: one hypercall per operation, whatever the number of targets; events for IPIs
/// (no EOI), a flush that does not interrupt preempted vCPUs, poll for waiting.
#[derive(Clone, Copy, Debug, Default)]
pub struct PvSmp;

impl SmpOps for PvSmp {
    fn name(&self) -> &'static str {
        "send_ipi + flush_tlb"
    }

    fn send_ipi(&self, mask: u64, kind: u8) -> Result<(), SmpError> {
        if u64::from(kind) >= IPI_SLOTS {
            return Err(SmpError::BadArgument);
        }
        Ok(crate::events::send_ipi(mask, kind)?)
    }

    fn flush_tlb(&self, mask: u64, addresses: &[u64]) -> Result<(), SmpError> {
        const MAX: usize = lamina_abi::memory::FLUSH_ADDRESSES_MAX as usize;
        // A list longer than one call takes is cheaper flushed whole.
        let addresses = if addresses.len() > MAX {
            &[]
        } else {
            addresses
        };
        Ok(crate::memory::flush_tlb(mask, addresses)?)
    }

    fn wait_for_kick(&self, kick_port: Port) {
        // Returns at once if the kick came already: none is lost (docs/abi.md 3.3).
        let _ = crate::sched::poll(&[kick_port], None);
    }
}

/// Native: the x2APIC ICR, one write (one exit) per target, and the receivers' EOIs; a TLB
/// shootdown flushes locally and interrupts every other target with IPI
/// [`SHOOTDOWN_KIND`], whose handler ([`handle_shootdown_ipi`]) flushes and acknowledges,
/// and waits for all of them, preempted or not. Needs a hypervisor whose x2APIC delivers
/// IPIs to other vCPUs.
#[derive(Clone, Copy, Debug, Default)]
pub struct NativeSmp;

/// The IPI kind the native shootdown uses.
pub const SHOOTDOWN_KIND: u8 = (IPI_SLOTS - 1) as u8;

/// vCPUs that have not yet acknowledged the native shootdown in progress (a bit each).
static SHOOTDOWN_WAITING: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Flushes this vCPU's whole TLB but global entries (a reload of CR3).
fn flush_local_tlb() {
    // SAFETY: writing CR3 back with its own value changes no mapping; it only drops the
    // non-global TLB entries, which the kernel asked for.
    unsafe {
        core::arch::asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack));
    }
}

/// The native shootdown's receiving side: the kernel's handler of vector
/// [`ipi_vector`]`(SHOOTDOWN_KIND)` calls it. Flushes this vCPU's TLB, acknowledges to the
/// sender and signals EOI.
///
/// # Safety
/// The caller is the handler of that APIC interrupt (an x2APIC is present and the vector
/// is in service).
pub unsafe fn handle_shootdown_ipi(this_vcpu: u32) {
    flush_local_tlb();
    if this_vcpu < 64 {
        SHOOTDOWN_WAITING.fetch_and(!(1 << this_vcpu), core::sync::atomic::Ordering::SeqCst);
    }
    // SAFETY: the caller is the handler of an APIC interrupt.
    unsafe { crate::x2apic::eoi() };
}

impl SmpOps for NativeSmp {
    fn name(&self) -> &'static str {
        "x2apic icr + ipi shootdown"
    }

    fn send_ipi(&self, mask: u64, kind: u8) -> Result<(), SmpError> {
        if u64::from(kind) >= IPI_SLOTS {
            return Err(SmpError::BadArgument);
        }
        if !crate::x2apic::available() {
            return Err(SmpError::NoX2apic);
        }
        let mut targets = mask;
        while targets != 0 {
            let vcpu = targets.trailing_zeros();
            targets &= targets - 1;
            // The vCPU number is its x2APIC id (docs/abi.md 19).
            // SAFETY: an x2APIC is present; the kernel handles its IPI vectors (module docs).
            unsafe { crate::x2apic::write_icr(icr_fixed(vcpu, ipi_vector(kind))) };
        }
        Ok(())
    }

    fn flush_tlb(&self, mask: u64, addresses: &[u64]) -> Result<(), SmpError> {
        use core::sync::atomic::Ordering;
        // Per-vCPU data when the kernel keeps it (no exit), CPUID otherwise.
        let own = if crate::percpu::in_use() {
            crate::percpu::current()
        } else {
            crate::vcpu::this_vcpu()
        };
        let own_bit = if own < 64 { 1u64 << own } else { 0 };
        if mask & own_bit != 0 {
            if addresses.is_empty() {
                flush_local_tlb();
            } else {
                for &address in addresses {
                    // SAFETY: INVLPG only drops a translation.
                    unsafe { core::arch::asm!("invlpg [{}]", in(reg) address, options(nostack)) };
                }
            }
        }
        let others = mask & !own_bit;
        if others == 0 {
            return Ok(());
        }
        // One shootdown at a time: wait for the one in progress, then claim the targets.
        while SHOOTDOWN_WAITING
            .compare_exchange(0, others, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            core::hint::spin_loop();
        }
        self.send_ipi(others, SHOOTDOWN_KIND)?;
        while SHOOTDOWN_WAITING.load(Ordering::SeqCst) != 0 {
            core::hint::spin_loop();
        }
        Ok(())
    }

    fn wait_for_kick(&self, _kick_port: Port) {
        core::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_ipis_are_fixed_physical_icr_writes_on_their_own_vectors() {
        assert_eq!(icr_fixed(3, ipi_vector(1)), 3 << 32 | 0xe1);
        assert!(ipi_vector((IPI_SLOTS - 1) as u8) < super::super::vectors::TIMER);
    }
}

//! Domain control (`domctl_op`, docs/abi.md 17, ABI 1.3): list, watch, pause, unpause and
//! destroy other domains. Privileged domains only (`privileged=1`); every other caller gets
//! `EPERM`.

use lamina_abi::Hypercall;
use lamina_abi::domctl::DomctlOp;

pub use lamina_abi::domctl::{
    CONSOLE_HISTORY_BYTES, DOMAIN_FLAG_PRIVILEGED, DomainInfo, PhysInfo, domain_state, ending,
};

use crate::hypercall::{self, HypercallError};

/// Fills `infos` with the first domains, in id order, and returns how many domains there are
/// (which may be more than `infos` holds).
pub fn list_domains(infos: &mut [DomainInfo]) -> Result<usize, HypercallError> {
    // SAFETY: the hypervisor writes at most `infos.len()` entries into the slice, borrowed
    // mutably for the call; every bit pattern is a valid DomainInfo.
    let count = unsafe {
        hypercall::call(
            Hypercall::DomctlOp,
            [
                DomctlOp::ListDomains as u64,
                infos.as_mut_ptr() as u64,
                infos.len() as u64,
                0,
                0,
            ],
        )
    }?;
    Ok(count as usize)
}

/// The [`DomainInfo`] of domain `domain`, if it exists.
pub fn domain_info(domain: u32) -> Result<Option<DomainInfo>, HypercallError> {
    let mut infos = [DomainInfo::default(); 64];
    let count = list_domains(&mut infos)?;
    Ok(infos[..count.min(infos.len())]
        .iter()
        .find(|info| info.domain_id == domain)
        .copied())
}

/// Copies domain `domain`'s console output from stream offset `offset` into `buffer` (at
/// most [`CONSOLE_HISTORY_BYTES`]); returns the bytes copied, 0 at the end of the stream.
/// Errors: `ENOENT` no such domain, or `offset` is older than the kept history (which starts
/// at `console_bytes - CONSOLE_HISTORY_BYTES`); `EINVAL` `offset` is past the end of the
/// stream or `buffer` is longer than the history.
pub fn read_console(domain: u32, offset: u64, buffer: &mut [u8]) -> Result<usize, HypercallError> {
    // SAFETY: the hypervisor writes at most `buffer.len()` bytes into the buffer, borrowed
    // mutably for the call.
    let copied = unsafe {
        hypercall::call(
            Hypercall::DomctlOp,
            [
                DomctlOp::ReadConsole as u64,
                u64::from(domain),
                offset,
                buffer.as_mut_ptr() as u64,
                buffer.len() as u64,
            ],
        )
    }?;
    Ok(copied as usize)
}

fn simple(op: DomctlOp, domain: u32) -> Result<(), HypercallError> {
    // SAFETY: touches no guest memory of ours.
    unsafe { hypercall::call(Hypercall::DomctlOp, [op as u64, u64::from(domain), 0, 0, 0]) }
        .map(drop)
}

/// Stops scheduling domain `domain`. Errors: `ENOENT` no such domain, `EINVAL` it is this
/// domain or has ended.
pub fn pause(domain: u32) -> Result<(), HypercallError> {
    simple(DomctlOp::Pause, domain)
}

/// Lets a paused domain run again. Errors as for [`pause`].
pub fn unpause(domain: u32) -> Result<(), HypercallError> {
    simple(DomctlOp::Unpause, domain)
}

/// Ends domain `domain` and tears it down (memory scrubbed and returned, grants revoked,
/// channels closed). Errors as for [`pause`].
pub fn destroy(domain: u32) -> Result<(), HypercallError> {
    simple(DomctlOp::Destroy, domain)
}

/// The hypervisor's memory figures.
pub fn phys_info() -> Result<PhysInfo, HypercallError> {
    let mut info = PhysInfo::default();
    // SAFETY: the hypervisor writes one PhysInfo into our local, borrowed mutably.
    unsafe {
        hypercall::call(
            Hypercall::DomctlOp,
            [DomctlOp::PhysInfo as u64, &raw mut info as u64, 0, 0, 0],
        )
    }?;
    Ok(info)
}

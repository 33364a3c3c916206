//! Status codes returned by hypercalls in RAX.
//!
//! A hypercall returns a non-negative value on success and `-errno` on failure. The numbers are
//! Linux's (as Xen uses), so a kernel author reads them at a glance.

/// Why a hypercall failed. A hypercall returns `-(errno as i64)` in RAX.
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Errno {
    /// The caller may not do this (for example a hypercall from CPL 3).
    EPERM = 1,
    /// No such object (domain, port, grant).
    ENOENT = 2,
    /// Argument list or batch too long.
    E2BIG = 7,
    /// Try again later.
    EAGAIN = 11,
    /// The hypervisor is out of memory.
    ENOMEM = 12,
    /// A guest-physical buffer is not entirely inside the caller's memory.
    EFAULT = 14,
    /// The object is in use.
    EBUSY = 16,
    /// The object exists already.
    EEXIST = 17,
    /// An argument is invalid: an unknown sub-operation value, a reserved bit or field set, a
    /// length out of range.
    EINVAL = 22,
    /// No space left (table or ring full).
    ENOSPC = 28,
    /// Unknown hypercall number or sub-operation.
    ENOSYS = 38,
    /// A wait ended because its timeout passed.
    ETIMEDOUT = 110,
}

impl Errno {
    /// Every defined code, for tables and tests.
    pub const ALL: [Errno; 12] = [
        Errno::EPERM,
        Errno::ENOENT,
        Errno::E2BIG,
        Errno::EAGAIN,
        Errno::ENOMEM,
        Errno::EFAULT,
        Errno::EBUSY,
        Errno::EEXIST,
        Errno::EINVAL,
        Errno::ENOSPC,
        Errno::ENOSYS,
        Errno::ETIMEDOUT,
    ];

    /// The value a hypercall puts in RAX for this error.
    pub const fn to_return_value(self) -> u64 {
        (-(self as i64)) as u64
    }

    /// Decodes a hypercall's RAX: `Ok(value)` when non-negative, `Err(errno)` otherwise.
    /// A negative value that is not a defined code decodes as `Err(Err(raw))`.
    pub fn decode(rax: u64) -> Result<u64, Result<Errno, i64>> {
        let signed = rax as i64;
        if signed >= 0 {
            return Ok(rax);
        }
        Err(Self::ALL
            .iter()
            .copied()
            .find(|e| *e as i64 == -signed)
            .ok_or(signed))
    }

    /// The conventional name, e.g. `"EFAULT"`.
    pub const fn name(self) -> &'static str {
        match self {
            Errno::EPERM => "EPERM",
            Errno::ENOENT => "ENOENT",
            Errno::E2BIG => "E2BIG",
            Errno::EAGAIN => "EAGAIN",
            Errno::ENOMEM => "ENOMEM",
            Errno::EFAULT => "EFAULT",
            Errno::EBUSY => "EBUSY",
            Errno::EEXIST => "EEXIST",
            Errno::EINVAL => "EINVAL",
            Errno::ENOSPC => "ENOSPC",
            Errno::ENOSYS => "ENOSYS",
            Errno::ETIMEDOUT => "ETIMEDOUT",
        }
    }
}

impl core::fmt::Display for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_trip_through_rax() {
        for e in Errno::ALL {
            assert_eq!(Errno::decode(e.to_return_value()), Err(Ok(e)));
        }
        assert_eq!(Errno::decode(5), Ok(5));
        assert_eq!(Errno::decode((-999i64) as u64), Err(Err(-999)));
    }
}

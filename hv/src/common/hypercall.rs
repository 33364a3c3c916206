//! Hypercall dispatch and the handlers of ABI v0.1 (docs/abi.md section 3).
//!
//! Every argument is validated here before use: unknown numbers and sub-operations are
//! `-ENOSYS`, bad values `-EINVAL`, buffers outside the caller's RAM `-EFAULT`, callers above
//! CPL 0 `-EPERM`. Guest buffers are copied in once through [`GuestMemory`].

use crate::common::domain::{Domain, Ending};
use crate::common::vcpu::{VirtualCpu, reg};
use lamina_abi::console::{CONSOLE_WRITE_MAX, ConsoleOp};
use lamina_abi::sched::{SchedOp, ShutdownReason};
use lamina_abi::{Errno, Hypercall};

/// What the vCPU does after a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Re-enter the same vCPU.
    Resume,
    /// Let other vCPUs run first.
    Yield,
    /// The domain ended.
    Stop,
}

enum Done {
    Return(u64),
    Yield,
    Ended,
}

/// Handles the hypercall in the vCPU's registers. RIP is left alone.
pub fn handle<V: VirtualCpu>(domain: &mut Domain, vcpu: &mut V) -> Next {
    let cpl = vcpu.cpl();
    let regs = vcpu.regs();
    let nr = regs.gpr[reg::RAX];
    let args = [
        regs.gpr[reg::RDI],
        regs.gpr[reg::RSI],
        regs.gpr[reg::RDX],
        regs.gpr[reg::R10],
        regs.gpr[reg::R8],
    ];
    domain.stats.count_hypercall(nr);
    let result = if cpl != 0 {
        Err(Errno::EPERM)
    } else {
        dispatch(domain, nr, args)
    };
    let (rax, next) = match result {
        Ok(Done::Return(value)) => (value, Next::Resume),
        Ok(Done::Yield) => (0, Next::Yield),
        Ok(Done::Ended) => return Next::Stop,
        Err(errno) => (errno.to_return_value(), Next::Resume),
    };
    vcpu.regs().gpr[reg::RAX] = rax;
    next
}

fn dispatch(domain: &mut Domain, nr: u64, args: [u64; 5]) -> Result<Done, Errno> {
    match Hypercall::try_from(nr)? {
        Hypercall::Version => Ok(Done::Return(lamina_abi::abi_version().into())),
        Hypercall::ConsoleIo => console_io(domain, args),
        Hypercall::SchedOp => sched_op(domain, args),
        _ => Err(Errno::ENOSYS),
    }
}

fn console_io(domain: &mut Domain, [op, gpa, len, ..]: [u64; 5]) -> Result<Done, Errno> {
    match ConsoleOp::try_from(op)? {
        ConsoleOp::Write => {
            if len > CONSOLE_WRITE_MAX {
                return Err(Errno::EINVAL);
            }
            if len == 0 {
                // An empty buffer is never out of bounds, wherever it points (docs/abi.md 2.5).
                return Ok(Done::Return(0));
            }
            let mut buffer = [0u8; CONSOLE_WRITE_MAX as usize];
            let bytes = &mut buffer[..len as usize];
            domain.memory.read(gpa, bytes)?;
            domain.console.write(domain.id, bytes);
            Ok(Done::Return(len))
        }
        _ => Err(Errno::ENOSYS),
    }
}

fn sched_op(domain: &mut Domain, [op, arg, ..]: [u64; 5]) -> Result<Done, Errno> {
    match SchedOp::try_from(op)? {
        SchedOp::Yield => Ok(Done::Yield),
        SchedOp::Shutdown => {
            let ending = match ShutdownReason::try_from(arg)? {
                ShutdownReason::Poweroff => Ending::Poweroff,
                ShutdownReason::Reboot => Ending::Reboot,
                ShutdownReason::Crash => Ending::Crash,
                _ => return Err(Errno::EINVAL),
            };
            domain.end(ending);
            Ok(Done::Ended)
        }
        _ => Err(Errno::ENOSYS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::domain::DomainState;
    use crate::common::guest_memory::testing::{TestMemory, test_memory};
    use crate::common::output::testing::take_lines;
    use crate::common::testing::MockVcpu;

    fn domain() -> (TestMemory, Domain) {
        let t = test_memory(4 << 20);
        // SAFETY: the domain's view aliases the test memory, which outlives it in the tuple.
        let mem = unsafe {
            crate::common::guest_memory::GuestMemory::new(
                t.mem.host_base() as *mut u8,
                t.mem.size(),
            )
        };
        (t, Domain::new(1, "t".into(), mem))
    }

    fn call(domain: &mut Domain, vcpu: &mut MockVcpu, nr: u64, args: [u64; 3]) -> (i64, Next) {
        vcpu.regs.gpr[reg::RAX] = nr;
        vcpu.regs.gpr[reg::RDI] = args[0];
        vcpu.regs.gpr[reg::RSI] = args[1];
        vcpu.regs.gpr[reg::RDX] = args[2];
        let next = handle(domain, vcpu);
        (vcpu.regs.gpr[reg::RAX] as i64, next)
    }

    const EFAULT: i64 = -(Errno::EFAULT as i64);

    #[test]
    fn console_write_copies_the_buffer_to_the_console() {
        let (t, mut d) = domain();
        let mut v = MockVcpu::default();
        t.mem.write(0x1000, b"hi there\n").unwrap();
        assert_eq!(call(&mut d, &mut v, 1, [0, 0x1000, 9]), (9, Next::Resume));
        assert_eq!(take_lines(), ["(d1) hi there"]);
        assert_eq!(call(&mut d, &mut v, 1, [0, 0x1000, 0]).0, 0, "empty write");
        assert_eq!(
            call(&mut d, &mut v, 1, [0, u64::MAX, 0]).0,
            0,
            "empty write anywhere"
        );
    }

    #[test]
    fn console_write_refuses_buffers_outside_ram() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        let end = 4u64 << 20;
        assert_eq!(
            call(&mut d, &mut v, 1, [0, end, 1]).0,
            EFAULT,
            "just past the end"
        );
        assert_eq!(
            call(&mut d, &mut v, 1, [0, end - 1, 2]).0,
            EFAULT,
            "straddles the end"
        );
        assert_eq!(
            call(&mut d, &mut v, 1, [0, u64::MAX - 1, 16]).0,
            EFAULT,
            "wraps around"
        );
        assert_eq!(
            call(&mut d, &mut v, 1, [0, 0, CONSOLE_WRITE_MAX + 1]).0,
            -(Errno::EINVAL as i64)
        );
        assert_eq!(
            call(&mut d, &mut v, 1, [7, 0, 1]).0,
            -(Errno::ENOSYS as i64),
            "unknown op"
        );
        assert!(d.is_runnable());
    }

    #[test]
    fn unknown_numbers_and_user_mode_callers_are_refused() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        for nr in [3, 0x1000, u64::MAX] {
            assert_eq!(call(&mut d, &mut v, nr, [0; 3]).0, -(Errno::ENOSYS as i64));
        }
        v.cpl = 3;
        assert_eq!(call(&mut d, &mut v, 0, [0; 3]).0, -(Errno::EPERM as i64));
    }

    #[test]
    fn shutdown_ends_the_domain_with_its_reason_and_bad_reasons_are_einval() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        assert_eq!(
            call(&mut d, &mut v, 2, [2, 99, 0]).0,
            -(Errno::EINVAL as i64)
        );
        assert!(d.is_runnable());
        assert_eq!(call(&mut d, &mut v, 2, [2, 2, 0]).1, Next::Stop);
        assert_eq!(d.state, DomainState::Ended(Ending::Crash));
    }

    #[test]
    fn version_returns_the_abi_version() {
        let (_t, mut d) = domain();
        let mut v = MockVcpu::default();
        assert_eq!(
            call(&mut d, &mut v, 0, [0; 3]).0,
            lamina_abi::abi_version() as i64
        );
        assert_eq!(call(&mut d, &mut v, 2, [0, 0, 0]), (0, Next::Yield));
    }
}

//! Each vCPU's debug registers (docs/abi.md 18.8): DR0-DR3 on both vendors, and DR6 where the
//! backend's guest state does not hold it.
//!
//! A VM entry and exit switch DR7 only (VT-x: the debug controls in the VMCS, Intel SDM Vol.
//! 3C 25.8/27.3.1; AMD-V: DR6 and DR7 in the VMCB, AMD APM Vol. 2 15.5). DR0-DR3, and on VT-x
//! DR6, are left as the guest wrote them. MOV DR is not intercepted, so that a kernel that
//! reads DR6 in its `#DB` handler or reloads breakpoints at every context switch pays no exit:
//! while a vCPU runs, and while the hypervisor handles its exits, the registers hold its
//! values. They are saved when its slice ends (the backends' `deactivate`) and restored when a
//! vCPU is scheduled in (`activate`), each register written only where it differs from what the
//! register holds: a MOV to a debug register is serializing (SDM Vol. 3A 9.3), and vCPUs that
//! never touch them, most of them, then cost eight or ten reads a switch. Comparing with the
//! register itself, not with a copy of what was last loaded, keeps one vCPU's values from
//! reaching the next whatever path its slice took.
//!
//! The hypervisor sets no breakpoint of its own, and a VM exit disables the guest's: DR7 reads
//! 0x400 after it (SDM Vol. 3C 28.5.1; on AMD-V #VMEXIT likewise, which KVM's
//! `vcpu_enter_guest` relies on too: "at least dr7 will be disabled"). So a guest's DR0-DR3 left
//! in the registers while its exits are handled cannot trap the hypervisor, and a guest's DR7.GD
//! cannot make the reads here fault.

use core::arch::asm;

/// DR6 after reset: bits 4-11 and 16-31 read as 1 (SDM Vol. 3B 18.2.3).
pub const DR6_RESET: u64 = 0xffff_0ff0;

/// One vCPU's DR0-DR3 and DR6 while it is not on a CPU.
#[derive(Debug)]
pub struct DebugRegisters {
    /// DR0, DR1, DR2, DR3, DR6.
    values: [u64; 5],
    /// Whether DR6 is switched here: VT-x keeps no guest DR6, AMD-V has it in the VMCB.
    with_dr6: bool,
}

impl DebugRegisters {
    /// A vCPU's registers at reset: DR0-DR3 zero, DR6 [`DR6_RESET`].
    pub const fn new(with_dr6: bool) -> Self {
        DebugRegisters {
            values: [0, 0, 0, 0, DR6_RESET],
            with_dr6,
        }
    }

    /// Keeps what the registers hold: the vCPU's values, its slice on this CPU ending.
    #[inline]
    pub fn save(&mut self) {
        self.values[..4].copy_from_slice(&[read_dr0(), read_dr1(), read_dr2(), read_dr3()]);
        if self.with_dr6 {
            self.values[4] = read_dr6();
        }
    }

    /// Puts this vCPU's values in the registers, writing only those that differ.
    #[inline]
    pub fn restore(&self) {
        let [dr0, dr1, dr2, dr3, dr6] = self.values;
        // SAFETY: CPL 0. The values are what the registers held when `save` read them (or the
        // reset values), so a write cannot fault: DR6's bits 63:32 are 0 as read. DR7, the only
        // register that enables a breakpoint, is not touched, and is 0x400 in the hypervisor's
        // context (module docs): nothing loaded here can trap it.
        unsafe {
            if read_dr0() != dr0 {
                asm!("mov dr0, {}", in(reg) dr0, options(nomem, nostack, preserves_flags));
            }
            if read_dr1() != dr1 {
                asm!("mov dr1, {}", in(reg) dr1, options(nomem, nostack, preserves_flags));
            }
            if read_dr2() != dr2 {
                asm!("mov dr2, {}", in(reg) dr2, options(nomem, nostack, preserves_flags));
            }
            if read_dr3() != dr3 {
                asm!("mov dr3, {}", in(reg) dr3, options(nomem, nostack, preserves_flags));
            }
            if self.with_dr6 && read_dr6() != dr6 {
                asm!("mov dr6, {}", in(reg) dr6, options(nomem, nostack, preserves_flags));
            }
        }
    }
}

macro_rules! read_dr {
    ($name:ident, $register:literal) => {
        #[inline(always)]
        fn $name() -> u64 {
            let value;
            // SAFETY: reading a debug register at CPL 0 has no side effect.
            unsafe {
                asm!(concat!("mov {}, ", $register), out(reg) value,
                     options(nomem, nostack, preserves_flags));
            }
            value
        }
    };
}
read_dr!(read_dr0, "dr0");
read_dr!(read_dr1, "dr1");
read_dr!(read_dr2, "dr2");
read_dr!(read_dr3, "dr3");
read_dr!(read_dr6, "dr6");

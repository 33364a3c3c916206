//! `common::vcpu::string_io::emulate` on the scripted vCPU (`common::testing::MockVcpu`, visible
//! to this crate only): the registers before, what happened to them and to the port after.

use crate::common::memory::guest_memory::GuestMemory;
use crate::common::testing::MockVcpu;
use crate::common::vcpu::reg;
use crate::common::vcpu::string_io::{self, Outcome, Ports, StringIo};

/// The vCPU as the exit finds it.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub rcx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rflags: u64,
    pub cpl: u8,
    /// `None`: paging off (linear = physical).
    pub paging_cr3: Option<u64>,
    /// The instruction's bytes (read when the exit leaves out the address size or segment).
    pub code: [u8; 15],
}

/// One access of the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortAccess {
    pub port: u16,
    pub size: u8,
    /// `Some(value)` for an `out`; `None` for an `in`.
    pub out: Option<u32>,
}

/// What one exit did.
#[derive(Debug)]
pub struct Report {
    pub outcome: Outcome,
    pub rcx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub accesses: Vec<PortAccess>,
    /// The MSR reads `FsBase`/`GsBase` of the scripted vCPU return this.
    pub segment_base: u64,
}

/// The value the port gives for the `n`-th `in`.
pub fn in_value(n: usize) -> u32 {
    (n as u32).wrapping_mul(0x9e37_79b1) ^ 0x5a5a_5a5a
}

struct Recorder(Vec<PortAccess>);

impl Ports for Recorder {
    fn port_in(&mut self, port: u16, size: u8) -> u32 {
        let value = in_value(self.0.len());
        self.0.push(PortAccess {
            port,
            size,
            out: None,
        });
        value
    }
    fn port_out(&mut self, port: u16, size: u8, value: u32) {
        self.0.push(PortAccess {
            port,
            size,
            out: Some(value),
        });
    }
}

/// Emulates `io` on a vCPU set up as `setup`, over `memory`.
pub fn emulate(io: StringIo, setup: &Setup, memory: &GuestMemory) -> Report {
    let mut vcpu = MockVcpu {
        cpl: setup.cpl,
        paging_cr3: setup.paging_cr3,
        ..MockVcpu::default()
    };
    vcpu.state.rflags = setup.rflags;
    vcpu.regs.gpr[reg::RCX] = setup.rcx;
    vcpu.regs.gpr[reg::RSI] = setup.rsi;
    vcpu.regs.gpr[reg::RDI] = setup.rdi;
    let mut ports = Recorder(Vec::new());
    let code = setup.code;
    let outcome = string_io::emulate(io, &mut vcpu, memory, &mut ports, |_| code);
    let segment_base = {
        use crate::common::vcpu::{ArchMsr, VirtualCpu};
        vcpu.read_msr(ArchMsr::FsBase)
    };
    Report {
        outcome,
        rcx: vcpu.regs.gpr[reg::RCX],
        rsi: vcpu.regs.gpr[reg::RSI],
        rdi: vcpu.regs.gpr[reg::RDI],
        accesses: ports.0,
        segment_base,
    }
}

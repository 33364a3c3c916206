//! A scripted vCPU for host unit tests of the common exit handling.

use crate::common::guest_paging::PagingMode;
use crate::common::vcpu::{ArchMsr, GuestRegisters, VirtualCpu, VmExit};
use core::fmt;

/// Records what common code asked of it.
#[derive(Default)]
pub(crate) struct MockVcpu {
    pub(crate) regs: GuestRegisters,
    pub(crate) rip: u64,
    pub(crate) cpl: u8,
    pub(crate) skipped: u32,
    pub(crate) injected: Option<(u8, Option<u32>)>,
    pub(crate) msr_writes: Vec<(ArchMsr, u64)>,
}

impl VirtualCpu for MockVcpu {
    fn run(&mut self) -> VmExit {
        VmExit::Hlt
    }
    fn regs(&mut self) -> &mut GuestRegisters {
        &mut self.regs
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
    }
    fn skip_instruction(&mut self) {
        self.skipped += 1;
    }
    fn cpl(&self) -> u8 {
        self.cpl
    }
    fn paging_mode(&self) -> PagingMode {
        PagingMode {
            paging: false,
            long_mode: true,
            cr3: 0,
        }
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.injected = Some((vector, error_code));
    }
    fn read_msr(&self, _msr: ArchMsr) -> u64 {
        0x500 // EFER: LME | LMA
    }
    fn write_msr(&mut self, msr: ArchMsr, value: u64) {
        self.msr_writes.push((msr, value));
    }
    fn dump(&self, out: &mut dyn fmt::Write) -> fmt::Result {
        write!(out, "mock")
    }
}

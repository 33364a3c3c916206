//! A scripted vCPU for host unit tests of the common exit handling.

use crate::common::memory::guest_paging::PagingMode;
use crate::common::vcpu::{ArchMsr, ArchState, GuestRegisters, VirtualCpu, VmExit};
use core::fmt;

std::thread_local! {
    /// When set, `time::read_tsc` returns this instead of the real TSC.
    pub(crate) static FAKE_TSC: core::cell::Cell<Option<u64>> = const { core::cell::Cell::new(None) };
    /// How far each read of the fake TSC moves it on (0: it stands still): time the
    /// hypervisor's own work takes, for tests of what happens when a deadline passes inside
    /// an exit.
    pub(crate) static FAKE_TSC_STEP: core::cell::Cell<u64> = const { core::cell::Cell::new(0) };
    /// What the mock vCPUs of this thread did, in order, by their `tag`: it outlives them
    /// (a domain's teardown drops its vCPU).
    static TRACE: core::cell::RefCell<Vec<Traced>> = const { core::cell::RefCell::new(Vec::new()) };
}

/// One thing a mock vCPU did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Traced {
    /// The vCPU tagged so ran (one script entry), with RAX as the hypervisor left it: the
    /// result of the hypercall before.
    Ran(u32, u64),
    /// The vCPU tagged so had this interrupt vector injected.
    Injected(u32, u8),
    /// The vCPU tagged so had its nested translations invalidated.
    NestedInvalidated(u32),
    /// The vCPU tagged so had its guest TLB flushed.
    GuestTlbFlushed(u32),
    /// `flush_guest_tlb_pages` of (tag, one page).
    GuestPageFlushed(u32, u64),
}

/// The results of the hypercalls of the vCPU tagged `tag` in `trace`, in order: RAX as each
/// run began (the first one is before any call, so it is left out).
pub(crate) fn results_of(trace: &[Traced], tag: u32) -> Vec<i64> {
    trace
        .iter()
        .filter_map(|t| match *t {
            Traced::Ran(who, rax) if who == tag => Some(rax as i64),
            _ => None,
        })
        .skip(1)
        .collect()
}

/// Takes what the mock vCPUs of this thread did so far.
pub(crate) fn take_trace() -> Vec<Traced> {
    TRACE.with(|t| core::mem::take(&mut *t.borrow_mut()))
}

fn trace(what: Traced) {
    TRACE.with(|t| t.borrow_mut().push(what));
}

/// Records what common code asked of it; `run` plays back `script` (then halts with IF=0).
#[derive(Default)]
pub(crate) struct MockVcpu {
    pub(crate) script: std::collections::VecDeque<(VmExit, GuestRegisters)>,
    pub(crate) regs: GuestRegisters,
    pub(crate) rip: u64,
    pub(crate) cpl: u8,
    pub(crate) skipped: u32,
    pub(crate) injected: Option<(u8, Option<u32>)>,
    pub(crate) msr_writes: Vec<(ArchMsr, u64)>,
    pub(crate) interrupt_flag: bool,
    pub(crate) injected_interrupts: Vec<u8>,
    pub(crate) window_exiting: bool,
    /// Times the nested translations were invalidated.
    pub(crate) nested_invalidations: u32,
    /// Names the vCPU in the trace ([`take_trace`]).
    pub(crate) tag: u32,
    /// CR4.OSXSAVE as the guest set it.
    pub(crate) osxsave: bool,
    /// XCR0 (0 stands for the reset value).
    pub(crate) xcr0: u64,
    /// What `arch_state` returns; control-register writes land here.
    pub(crate) state: ArchState,
    /// Paging as `paging_mode` reports it (`None`: paging off).
    pub(crate) paging_cr3: Option<u64>,
    /// Times the preemption deadline was loaded again.
    pub(crate) preemption_reloads: u32,
}

impl VirtualCpu for MockVcpu {
    fn activate(&mut self) {}
    fn run(&mut self) -> VmExit {
        trace(Traced::Ran(
            self.tag,
            self.regs.gpr[crate::common::vcpu::reg::RAX],
        ));
        match self.script.pop_front() {
            Some((exit, regs)) => {
                self.regs = regs;
                exit
            }
            None => {
                self.interrupt_flag = false;
                VmExit::Hlt
            }
        }
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
            paging: self.paging_cr3.is_some(),
            long_mode: true,
            cr3: self.paging_cr3.unwrap_or(0),
            write_protect: true,
        }
    }
    fn arch_state(&self) -> ArchState {
        self.state
    }
    fn set_rsp(&mut self, rsp: u64) {
        self.state.rsp = rsp;
    }
    fn set_control_register(&mut self, cr: u8, value: u64) {
        match cr {
            0 => self.state.cr0 = value,
            3 => self.state.cr3 = value,
            _ => self.state.cr4 = value,
        }
    }
    fn set_cr2(&mut self, cr2: u64) {
        self.state.cr2 = cr2;
    }
    fn cr4_hardware_allowed(&self) -> u64 {
        u64::MAX
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.injected = Some((vector, error_code));
    }
    fn interrupt_flag(&self) -> bool {
        self.interrupt_flag
    }
    fn interrupt_window_open(&self) -> bool {
        self.interrupt_flag
    }
    fn inject_interrupt(&mut self, vector: u8) {
        self.injected_interrupts.push(vector);
        trace(Traced::Injected(self.tag, vector));
    }
    fn set_interrupt_window_exiting(&mut self, enabled: bool) {
        self.window_exiting = enabled;
    }
    fn invalidate_nested_translations(&mut self) {
        self.nested_invalidations += 1;
        trace(Traced::NestedInvalidated(self.tag));
    }
    fn flush_guest_tlb(&mut self) {
        trace(Traced::GuestTlbFlushed(self.tag));
    }
    fn flush_guest_tlb_pages(&mut self, pages: &[u64]) {
        for &page in pages {
            trace(Traced::GuestPageFlushed(self.tag, page));
        }
    }
    fn read_msr(&self, _msr: ArchMsr) -> u64 {
        0x500 // EFER: LME | LMA
    }
    fn write_msr(&mut self, msr: ArchMsr, value: u64) {
        self.msr_writes.push((msr, value));
    }
    fn osxsave_enabled(&self) -> bool {
        self.osxsave
    }
    fn xcr0(&self) -> u64 {
        if self.xcr0 == 0 {
            crate::common::vcpu::xstate::XCR0_RESET
        } else {
            self.xcr0
        }
    }
    fn set_xcr0(&mut self, value: u64) {
        self.xcr0 = value;
    }
    fn reload_preemption_deadline(&mut self) {
        self.preemption_reloads += 1;
    }
    fn dump(&self, out: &mut dyn fmt::Write) -> fmt::Result {
        write!(out, "mock")
    }
}

/// A hypercall exit with these registers (RAX = number, then RDI, RSI, RDX).
pub(crate) fn hypercall(nr: u64, args: [u64; 3]) -> (VmExit, GuestRegisters) {
    let mut regs = GuestRegisters::default();
    regs.gpr[crate::common::vcpu::reg::RAX] = nr;
    regs.gpr[crate::common::vcpu::reg::RDI] = args[0];
    regs.gpr[crate::common::vcpu::reg::RSI] = args[1];
    regs.gpr[crate::common::vcpu::reg::RDX] = args[2];
    (VmExit::Hypercall, regs)
}

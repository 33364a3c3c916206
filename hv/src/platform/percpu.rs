//! Per-CPU state: one [`PerCpu`] for each physical CPU the hypervisor runs on.
//!
//! Each CPU's IA32_GS_BASE holds the address of its own `PerCpu`, whose first word is that same
//! address, so [`this_cpu`] is one `mov reg, gs:[0]`. The hypervisor never loads GS otherwise
//! and never runs SWAPGS. The world switches keep the GS base: VMX loads HOST_GS_BASE on every
//! exit (see `gs_base`), SVM's VMLOAD of the host-state page restores what VMSAVE took on this
//! CPU when SVM was enabled.
//!
//! Adding a field: put it in [`PerCpu`] below with a line on what it owns, initialise it in
//! [`PerCpu::new`]. Other CPUs may read a `PerCpu` (through [`cpus`]), so a field that changes
//! after start-up is an atomic, a `Once` or a lock.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use spin::Once;
use x86_64::structures::tss::TaskStateSegment;

/// The most CPUs the hypervisor starts.
pub const MAX_CPUS: usize = 64;

const MSR_GS_BASE: u32 = 0xc000_0101;

/// One physical CPU's own state.
#[repr(C)]
pub struct PerCpu {
    /// This structure's address: `gs:[0]`, what [`this_cpu`] reads. Must stay first.
    self_address: AtomicU64,
    /// 0 for the boot CPU, then 1, 2, ... in the order the CPUs came online.
    pub index: usize,
    /// Local APIC id (the MADT's, which is CPUID.1:EBX[31:24] on the CPU itself).
    pub apic_id: u32,
    /// Top of the stack the CPU runs the hypervisor on (the boot stack for CPU 0).
    pub stack_top: u64,
    /// Top of this CPU's IST stacks (`cpu::FAULT_STACKS_BYTES`): double faults (IST 1) from
    /// here, NMIs (IST 2) from half-way down.
    pub fault_stacks_top: u64,
    /// This CPU's TSS: its IST stacks, and the TR a VMCS's host state names.
    pub(super) tss: Once<TaskStateSegment>,
    /// This CPU's GDT and selectors (the TSS descriptor's busy bit is per CPU).
    pub(super) tables: Once<super::cpu::Tables>,
    /// Set by this CPU's APIC timer interrupt, taken by `apic::take_timer_fired`.
    pub(super) timer_fired: AtomicBool,
    /// The extended-state area whose contents are in this CPU's registers (`xstate`; 0: none).
    pub(super) xstate_owner: AtomicU64,
    /// An AP's own set-up is done (`smp::ap_ready`).
    pub(super) ready: AtomicBool,
    /// Work posted to this CPU by `smp::run_on`: a `fn(usize)` as an address, 0 when none.
    /// The CPU clears it once the function returned.
    pub(super) mailbox: AtomicUsize,
    /// The guest control structure the virtualization extension last used on this CPU: the
    /// current VMCS (VMX), or the VMCB that ran last (SVM); 0 for none.
    pub guest_control: AtomicU64,
    /// SVM: this CPU's host-state page, which VMSAVE filled when SVM was enabled here and every
    /// world switch on this CPU VMLOADs after the exit; 0 under VMX.
    pub svm_host_state: AtomicU64,
    /// The domain whose vCPU ran last on this CPU (`spec_ctrl`'s IBPB on a switch); 0: none.
    pub last_domain: AtomicU32,
}

impl PerCpu {
    /// The state of CPU `index`, before it runs.
    pub fn new(index: usize, apic_id: u32, stack_top: u64, fault_stacks_top: u64) -> Self {
        PerCpu {
            self_address: AtomicU64::new(0),
            index,
            apic_id,
            stack_top,
            fault_stacks_top,
            tss: Once::new(),
            tables: Once::new(),
            timer_fired: AtomicBool::new(false),
            xstate_owner: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            mailbox: AtomicUsize::new(0),
            guest_control: AtomicU64::new(0),
            svm_host_state: AtomicU64::new(0),
            last_domain: AtomicU32::new(0),
        }
    }
}

/// The CPUs that came online, by index; [`ONLINE`] of them are set.
static CPUS: [AtomicPtr<PerCpu>; MAX_CPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];
static ONLINE: AtomicUsize = AtomicUsize::new(0);

/// Makes `cpu` this CPU's own (IA32_GS_BASE) and lists it among the online CPUs.
///
/// # Safety
/// Called once per CPU, by that CPU, before anything calls [`this_cpu`] on it; `cpu.index`
/// is the next unused index.
pub unsafe fn install(cpu: &'static PerCpu) {
    let address = cpu as *const PerCpu as u64;
    cpu.self_address.store(address, Ordering::Relaxed);
    // SAFETY: IA32_GS_BASE exists in long mode; nothing on this CPU uses GS but this module.
    unsafe { x86_64::registers::model_specific::Msr::new(MSR_GS_BASE).write(address) };
    if let Some(slot) = CPUS.get(cpu.index) {
        slot.store(cpu as *const PerCpu as *mut PerCpu, Ordering::Release);
        ONLINE.fetch_max(cpu.index + 1, Ordering::AcqRel);
    }
}

/// The running CPU's state.
#[inline]
pub fn this_cpu() -> &'static PerCpu {
    let address: u64;
    // SAFETY: every CPU installs its `PerCpu` (`install`) before any other hypervisor code
    // runs on it, and the world switches keep IA32_GS_BASE (module comment).
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) address,
                         options(nostack, readonly, preserves_flags, pure));
        &*(address as *const PerCpu)
    }
}

/// The index of the running CPU, or None before it installed its state (for fault reports,
/// which may come that early: reads the MSR instead of trusting GS).
pub fn try_index() -> Option<usize> {
    // SAFETY: reading IA32_GS_BASE has no side effect.
    let base = unsafe { x86_64::registers::model_specific::Msr::new(MSR_GS_BASE).read() };
    cpus()
        .find(|cpu| core::ptr::from_ref(*cpu) as u64 == base)
        .map(|cpu| cpu.index)
}

/// IA32_GS_BASE of this CPU, for the host state of a VMCS created here.
pub fn gs_base() -> u64 {
    this_cpu() as *const PerCpu as u64
}

/// How many CPUs are online (1 until the others are started).
pub fn cpu_count() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// The online CPUs, by index.
pub fn cpus() -> impl Iterator<Item = &'static PerCpu> {
    CPUS.iter().take(cpu_count()).filter_map(|slot| {
        // SAFETY: a set slot points at a `PerCpu` that lives for the rest of the run.
        unsafe { slot.load(Ordering::Acquire).as_ref() }
    })
}

/// CPU `index`, if it is online.
pub fn cpu(index: usize) -> Option<&'static PerCpu> {
    cpus().nth(index).filter(|cpu| cpu.index == index)
}

//! Paravirtual operation groups, in the style of Linux's `pv_ops`: each group of operations a
//! kernel needs from the machine has one trait and two backends, a *native* one that does
//! what a kernel does on hardware (and traps to the hypervisor on Lamina) and a
//! *paravirtual* one that uses the ABI instead. A kernel selects a backend per group at boot
//! ([`select`]), so porting a kernel can go one group at a time.
//!
//! | group | trait | native backend | paravirtual backend |
//! |---|---|---|---|
//! | `console` | [`ConsoleOps`] | COM1 UART, one `out` (exit) per byte | the console ring: no exit per line |
//! | `idle` | [`IdleOps`] | `sti; hlt` | `sched_op` block, then `sti` |
//! | `timer` | [`TimerOps`] | x2APIC timer (MSRs) + EOI | `vcpu_op` periodic timer + VIRQ_TIMER upcall, no EOI |
//! | `time` | [`ClockOps`] | TSC scaled by CPUID 0x40000010 | pvclock in the shared-info page |
//! | `cpu` | [`CpuOps`] | `cpuid`/`rdmsr` every time | values the ABI fixes, cached at boot |
//! | `smp` | [`SmpOps`] | x2APIC ICR per target + EOI, shootdown by IPI and acknowledgements, pause loops | `send_ipi` to a mask, `flush_tlb` without interrupting preempted vCPUs, poll for a kick |
//!
//! Before [`select`] runs, the console is the console hypercall (one exit per line: no state
//! to set up, so the SDK prints from its first instruction), the CPU group is native (nothing
//! cached yet), and the other groups are paravirtual.
//!
//! The command line picks a selection with [`Selection::from_cmdline`]: `ops=native` or
//! `ops=pv` (the default) for every group, then `pv.<group>=native|pv` per group, e.g.
//! `ops=pv pv.console=native`.
//!
//! The timer group takes interrupts: [`TimerOps::start_periodic`] routes them through the
//! SDK's IDT (loading it), [`TimerOps::start_periodic_routed`] with
//! [`Routing::KernelIdt`](crate::interrupts::Routing::KernelIdt) through the kernel's own,
//! which routes [`TimerOps::vectors`] to the SDK ([`crate::interrupts`], "Bring your own IDT").
//!
//! One combination is refused: `idle=pv` with `timer=native`. Block waits for an *event*, and
//! the x2APIC timer raises an *interrupt*, which does not end a block: the hypervisor would
//! stop the vCPU as one that can never wake (docs/abi.md 3.3). Port the timer first.

mod clock;
mod console;
mod cpu;
mod idle;
mod smp;
mod timer;

use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

pub use clock::{ClockOps, PvClock, TscClockOps};
pub use console::{ConsoleOps, HypercallConsole, RingConsole, UartConsole};
pub use cpu::{CACHED_LEAVES, CACHED_MSRS, CachedCpu, CpuOps, CpuidResult, TrappingCpu};
pub use idle::{BlockIdle, HltIdle, IdleOps};
pub use smp::{
    NativeSmp, PvSmp, SHOOTDOWN_KIND, SmpError, SmpOps, bind_ipi_kind, handle_shootdown_ipi,
    icr_fixed, ipi_vector, is_preempted,
};
pub use timer::{ApicTimer, PvTimer, TimerError, TimerOps, handle_timer_interrupt};

/// Interrupt vectors the backends use (Linux's numbers for the same purposes).
pub mod vectors {
    /// The native backend's x2APIC timer (Linux's `LOCAL_TIMER_VECTOR`).
    pub const TIMER: u8 = 0xec;
    /// The event-channel upcall (Linux's `HYPERVISOR_CALLBACK_VECTOR`).
    pub const UPCALL: u8 = 0xf3;
    /// The x2APIC's spurious interrupts.
    pub const SPURIOUS: u8 = 0xff;
}

/// Which implementation a group uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// What the kernel would do on hardware: trapping instructions and emulated devices.
    Native,
    /// The paravirtual ABI.
    Paravirt,
}

impl Backend {
    /// `"native"` or `"pv"`, as on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Native => "native",
            Backend::Paravirt => "pv",
        }
    }

    /// Parses `"native"` or `"pv"`.
    pub fn parse(text: &str) -> Option<Backend> {
        match text {
            "native" => Some(Backend::Native),
            "pv" => Some(Backend::Paravirt),
            _ => None,
        }
    }

    const fn from_u8(value: u8) -> Backend {
        if value == Backend::Native as u8 {
            Backend::Native
        } else {
            Backend::Paravirt
        }
    }
}

/// The operation groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// Console output.
    Console,
    /// Waiting for the next interrupt or event.
    Idle,
    /// The periodic tick and its acknowledgement.
    Timer,
    /// The clock.
    Time,
    /// CPUID and MSR reads.
    Cpu,
    /// IPIs, TLB shootdowns and waiting for a sibling.
    Smp,
}

impl Group {
    /// Every group, in display order.
    pub const ALL: [Group; 6] = [
        Group::Console,
        Group::Idle,
        Group::Timer,
        Group::Time,
        Group::Cpu,
        Group::Smp,
    ];

    /// The group's name, as in `pv.<name>=` on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Group::Console => "console",
            Group::Idle => "idle",
            Group::Timer => "timer",
            Group::Time => "time",
            Group::Cpu => "cpu",
            Group::Smp => "smp",
        }
    }

    /// Parses a group name.
    pub fn parse(text: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|group| group.name() == text)
    }
}

/// A backend for every group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Console output.
    pub console: Backend,
    /// Idle.
    pub idle: Backend,
    /// Timer and interrupt acknowledge.
    pub timer: Backend,
    /// Time source.
    pub time: Backend,
    /// CPUID and MSR access.
    pub cpu: Backend,
    /// IPIs and TLB shootdowns between vCPUs.
    pub smp: Backend,
}

/// Why a selection cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectionError<'a> {
    /// `ops=` or `pv.<group>=` with a value other than `native` or `pv`.
    BadValue {
        /// The key.
        key: &'a str,
        /// Its value.
        value: &'a str,
    },
    /// `pv.<name>=` for a group that does not exist.
    UnknownGroup(&'a str),
    /// `idle=pv` with `timer=native` (see the module documentation).
    BlockNeedsPvTimer,
}

impl fmt::Display for SelectionError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SelectionError::BadValue { key, value } => {
                write!(f, "{key}={value}: the value must be native or pv")
            }
            SelectionError::UnknownGroup(group) => write!(
                f,
                "pv.{group}=: no such group (console, idle, timer, time, cpu, smp)"
            ),
            SelectionError::BlockNeedsPvTimer => f.write_str(
                "idle=pv needs timer=pv: block waits for events, and the native timer raises APIC interrupts",
            ),
        }
    }
}

impl Selection {
    /// The same backend for every group.
    pub const fn all(backend: Backend) -> Selection {
        Selection {
            console: backend,
            idle: backend,
            timer: backend,
            time: backend,
            cpu: backend,
            smp: backend,
        }
    }

    /// Every group paravirtual.
    pub const PARAVIRT: Selection = Selection::all(Backend::Paravirt);
    /// Every group native.
    pub const NATIVE: Selection = Selection::all(Backend::Native);

    /// The backend of `group`.
    pub const fn get(&self, group: Group) -> Backend {
        match group {
            Group::Console => self.console,
            Group::Idle => self.idle,
            Group::Timer => self.timer,
            Group::Time => self.time,
            Group::Cpu => self.cpu,
            Group::Smp => self.smp,
        }
    }

    /// Sets the backend of `group`.
    pub fn set(&mut self, group: Group, backend: Backend) {
        match group {
            Group::Console => self.console = backend,
            Group::Idle => self.idle = backend,
            Group::Timer => self.timer = backend,
            Group::Time => self.time = backend,
            Group::Cpu => self.cpu = backend,
            Group::Smp => self.smp = backend,
        }
    }

    /// The backend all groups share, if they do.
    pub fn uniform(&self) -> Option<Backend> {
        let first = self.console;
        Group::ALL
            .into_iter()
            .all(|group| self.get(group) == first)
            .then_some(first)
    }

    /// Refuses the combinations that cannot work.
    pub fn check(&self) -> Result<(), SelectionError<'static>> {
        if self.idle == Backend::Paravirt && self.timer == Backend::Native {
            return Err(SelectionError::BlockNeedsPvTimer);
        }
        Ok(())
    }

    /// The selection a command line asks for: `ops=native|pv` (default `pv`) for all groups,
    /// then `pv.<group>=native|pv` overrides, wherever they stand on the line (a later word
    /// for the same key wins).
    pub fn from_cmdline(line: &str) -> Result<Selection, SelectionError<'_>> {
        let mut selection = Selection::PARAVIRT;
        if let Some(value) = crate::cmdline::value(line, "ops") {
            let backend =
                Backend::parse(value).ok_or(SelectionError::BadValue { key: "ops", value })?;
            selection = Selection::all(backend);
        }
        for (key, value) in crate::cmdline::words(line).filter_map(|word| word.split_once('=')) {
            let Some(group) = key.strip_prefix("pv.") else {
                continue;
            };
            let group = Group::parse(group).ok_or(SelectionError::UnknownGroup(group))?;
            let backend = Backend::parse(value).ok_or(SelectionError::BadValue { key, value })?;
            selection.set(group, backend);
        }
        selection.check()?;
        Ok(selection)
    }
}

impl fmt::Display for Selection {
    /// `console=pv idle=pv timer=pv time=pv cpu=pv smp=pv`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, group) in Group::ALL.into_iter().enumerate() {
            let separator = if index == 0 { "" } else { " " };
            write!(f, "{separator}{}={}", group.name(), self.get(group).name())?;
        }
        Ok(())
    }
}

/// Why [`select`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectError {
    /// The selection is one that cannot work.
    Selection(SelectionError<'static>),
    /// The native time backend needs the TSC frequency, and CPUID leaf 0x40000010 EAX is 0.
    NoTscFrequency,
}

impl fmt::Display for SelectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SelectError::Selection(error) => write!(f, "{error}"),
            SelectError::NoTscFrequency => f.write_str(
                "CPUID 0x40000010 EAX (TSC kHz) is 0: the native clock cannot be calibrated",
            ),
        }
    }
}

/// Console backends: the boot default, and the two a selection chooses from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum ConsoleChoice {
    Hypercall = 0,
    Uart = 1,
    Ring = 2,
}

static CONSOLE: AtomicU8 = AtomicU8::new(ConsoleChoice::Hypercall as u8);
static IDLE: AtomicU8 = AtomicU8::new(Backend::Paravirt as u8);
static TIMER: AtomicU8 = AtomicU8::new(Backend::Paravirt as u8);
static TIME: AtomicU8 = AtomicU8::new(Backend::Paravirt as u8);
static CPU: AtomicU8 = AtomicU8::new(Backend::Native as u8);
static SMP: AtomicU8 = AtomicU8::new(Backend::Paravirt as u8);

/// Switches every group to `selection`'s backend, preparing what the backends need: the
/// native clock's calibration from CPUID, the CPU group's cache. Select at boot, before
/// starting the timer; switching the timer group while it runs is not supported.
pub fn select(selection: Selection) -> Result<(), SelectError> {
    selection.check().map_err(SelectError::Selection)?;
    if selection.time == Backend::Native {
        clock::calibrate_tsc_clock().ok_or(SelectError::NoTscFrequency)?;
    }
    if selection.cpu == Backend::Paravirt {
        cpu::fill_cache();
    }
    let console = match selection.console {
        Backend::Native => ConsoleChoice::Uart,
        Backend::Paravirt => ConsoleChoice::Ring,
    };
    if console as u8 != CONSOLE.load(Ordering::Acquire) {
        // What the old backend holds goes out before anything of the new one.
        crate::console::flush();
        CONSOLE.store(console as u8, Ordering::Release);
    }
    IDLE.store(selection.idle as u8, Ordering::Release);
    TIMER.store(selection.timer as u8, Ordering::Release);
    TIME.store(selection.time as u8, Ordering::Release);
    CPU.store(selection.cpu as u8, Ordering::Release);
    SMP.store(selection.smp as u8, Ordering::Release);
    Ok(())
}

/// The backends in use (the boot console, the console hypercall, counts as paravirtual).
pub fn selection() -> Selection {
    let console = match CONSOLE.load(Ordering::Acquire) {
        x if x == ConsoleChoice::Uart as u8 => Backend::Native,
        _ => Backend::Paravirt,
    };
    Selection {
        console,
        idle: Backend::from_u8(IDLE.load(Ordering::Acquire)),
        timer: Backend::from_u8(TIMER.load(Ordering::Acquire)),
        time: Backend::from_u8(TIME.load(Ordering::Acquire)),
        cpu: Backend::from_u8(CPU.load(Ordering::Acquire)),
        smp: Backend::from_u8(SMP.load(Ordering::Acquire)),
    }
}

/// The console backend.
pub fn console() -> &'static dyn ConsoleOps {
    match CONSOLE.load(Ordering::Acquire) {
        x if x == ConsoleChoice::Uart as u8 => &UartConsole,
        x if x == ConsoleChoice::Ring as u8 => &RingConsole,
        _ => &HypercallConsole,
    }
}

/// The idle backend.
pub fn idle() -> &'static dyn IdleOps {
    match Backend::from_u8(IDLE.load(Ordering::Acquire)) {
        Backend::Native => &HltIdle,
        Backend::Paravirt => &BlockIdle,
    }
}

/// The timer backend.
pub fn timer() -> &'static dyn TimerOps {
    match Backend::from_u8(TIMER.load(Ordering::Acquire)) {
        Backend::Native => &ApicTimer,
        Backend::Paravirt => &PvTimer,
    }
}

/// The time-source backend.
pub fn clock() -> &'static dyn ClockOps {
    match Backend::from_u8(TIME.load(Ordering::Acquire)) {
        Backend::Native => &TscClockOps,
        Backend::Paravirt => &PvClock,
    }
}

/// The CPUID/MSR backend.
pub fn cpu() -> &'static dyn CpuOps {
    match Backend::from_u8(CPU.load(Ordering::Acquire)) {
        Backend::Native => &TrappingCpu,
        Backend::Paravirt => &CachedCpu,
    }
}

/// The SMP backend.
pub fn smp() -> &'static dyn SmpOps {
    match Backend::from_u8(SMP.load(Ordering::Acquire)) {
        Backend::Native => &NativeSmp,
        Backend::Paravirt => &PvSmp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_every_group_paravirtual() {
        assert_eq!(
            Selection::from_cmdline("sample-guest"),
            Ok(Selection::PARAVIRT)
        );
        assert_eq!(Selection::from_cmdline("x ops=pv"), Ok(Selection::PARAVIRT));
    }

    #[test]
    fn ops_native_makes_every_group_native() {
        let selection = Selection::from_cmdline("sample-guest ops=native").unwrap();
        assert_eq!(selection, Selection::NATIVE);
        assert_eq!(selection.uniform(), Some(Backend::Native));
        assert_eq!(
            selection.to_string(),
            "console=native idle=native timer=native time=native cpu=native smp=native"
        );
    }

    #[test]
    fn groups_are_overridden_one_by_one_wherever_they_stand() {
        let selection =
            Selection::from_cmdline("pv.console=native g ops=pv pv.time=native").unwrap();
        assert_eq!(selection.console, Backend::Native);
        assert_eq!(selection.time, Backend::Native);
        assert_eq!(selection.idle, Backend::Paravirt);
        assert_eq!(selection.uniform(), None);
        let selection = Selection::from_cmdline("ops=native pv.timer=pv pv.idle=pv").unwrap();
        assert_eq!(selection.timer, Backend::Paravirt);
        assert_eq!(selection.console, Backend::Native);
    }

    #[test]
    fn mistakes_on_the_command_line_are_named() {
        assert_eq!(
            Selection::from_cmdline("ops=fast"),
            Err(SelectionError::BadValue {
                key: "ops",
                value: "fast"
            })
        );
        assert_eq!(
            Selection::from_cmdline("pv.consol=pv"),
            Err(SelectionError::UnknownGroup("consol"))
        );
        assert_eq!(
            Selection::from_cmdline("pv.idle=yes"),
            Err(SelectionError::BadValue {
                key: "pv.idle",
                value: "yes"
            })
        );
    }

    #[test]
    fn blocking_idle_needs_the_paravirtual_timer() {
        assert_eq!(
            Selection::from_cmdline("pv.timer=native"),
            Err(SelectionError::BlockNeedsPvTimer)
        );
        // The other way round works: HLT wakes on the upcall interrupt.
        assert!(Selection::from_cmdline("pv.idle=native").is_ok());
    }

    #[test]
    fn group_names_round_trip() {
        for group in Group::ALL {
            assert_eq!(Group::parse(group.name()), Some(group));
        }
        for backend in [Backend::Native, Backend::Paravirt] {
            assert_eq!(Backend::parse(backend.name()), Some(backend));
        }
    }
}

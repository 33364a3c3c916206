//! The local APIC an unported guest kernel sees, in x2APIC mode only (Intel SDM Vol. 3A
//! chapter 12; docs/abi.md section 14 "Emulated x2APIC"): the registers behind RDMSR/WRMSR of
//! IA32_APIC_BASE, IA32_TSC_DEADLINE and 0x800-0x8ff, the timer (one-shot, periodic,
//! TSC-deadline), task and processor priority, IRR/ISR and EOI, and the ICR: self-IPIs are
//! taken here, and what an ICR write asks of other APICs comes back as an [`Ipi`] for the
//! caller to deliver ([`Ipi::reaches`] decides which APICs it names).
//!
//! A pure model: no hardware, no globals, no allocation. Time comes in as arguments (system time
//! in ns and the TSC at the same instant); every register access first brings the model up to
//! that instant ([`VirtualLapic::advance`]), so what happened before an access is decided by the
//! configuration in force before it. The caller injects #GP(0) on [`ApicFault`], programs its own
//! timer for [`VirtualLapic::next_timer_deadline_ns`], and injects
//! [`VirtualLapic::deliverable_vector`] when the guest can take an interrupt.
//!
//! Not modelled (yet): the NMI and SMI delivery modes of the ICR, level-triggered interrupts
//! (TMR reads 0), the thermal, performance-counter, LINT0/1 and error LVT entries beyond
//! storing them (the error entry does signal APIC errors), and leaving x2APIC mode through
//! IA32_APIC_BASE.

use core::fmt;

/// IA32_APIC_BASE (SDM 12.4.4).
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE (SDM 12.5.4.1).
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;

// x2APIC register MSRs (SDM 12.12.1.2, Table 12-6). Addresses in the range that are not
// listed (0x801, 0x804-0x807, 0x809 APR, 0x80c RRD, 0x80e DFR, 0x82f CMCI, 0x831 ICR high,
// ...) are reserved: RDMSR and WRMSR of them #GP.
const REG_ID: u32 = 0x802;
const REG_VERSION: u32 = 0x803;
const REG_TPR: u32 = 0x808;
const REG_PPR: u32 = 0x80a;
const REG_EOI: u32 = 0x80b;
const REG_LDR: u32 = 0x80d;
const REG_SVR: u32 = 0x80f;
const REG_ISR0: u32 = 0x810;
const REG_ISR7: u32 = 0x817;
const REG_TMR0: u32 = 0x818;
const REG_TMR7: u32 = 0x81f;
const REG_IRR0: u32 = 0x820;
const REG_IRR7: u32 = 0x827;
const REG_ESR: u32 = 0x828;
const REG_ICR: u32 = 0x830;
const REG_LVT_TIMER: u32 = 0x832;
const REG_LVT_ERROR: u32 = 0x837;
const REG_TIMER_INITIAL: u32 = 0x838;
const REG_TIMER_CURRENT: u32 = 0x839;
const REG_TIMER_DIVIDE: u32 = 0x83e;
const REG_SELF_IPI: u32 = 0x83f;

/// Version register: version 0x14 (integrated APIC), max LVT entry 5 (six entries: timer,
/// thermal, performance counters, LINT0, LINT1, error), no EOI-broadcast suppression (bit 24).
const VERSION: u32 = 0x0005_0014;

const APIC_BASE_ADDRESS: u64 = 0xfee0_0000;
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_EXTD: u64 = 1 << 10;
const APIC_BASE_EN: u64 = 1 << 11;

/// SVR: spurious vector, software enable (bit 8), focus processor checking (bit 9, accepted
/// and stored: FreeBSD sets it). EOI-broadcast suppression (bit 12) is reserved since the
/// version register does not offer it (SDM 12.9, Figure 12-23).
const SVR_ENABLE: u32 = 1 << 8;
const SVR_WRITABLE: u32 = 0x3ff;
const SVR_RESET: u32 = 0xff;

// LVT layout (SDM 12.5.1, Figure 12-8).
const LVT_VECTOR: u32 = 0xff;
const LVT_DELIVERY_MODE: u32 = 0x7 << 8;
const LVT_DELIVERY_STATUS: u32 = 1 << 12;
const LVT_PIN_POLARITY: u32 = 1 << 13;
const LVT_REMOTE_IRR: u32 = 1 << 14;
const LVT_TRIGGER_MODE: u32 = 1 << 15;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_MODE_SHIFT: u32 = 17;
const LVT_TIMER_MODE: u32 = 0x3 << LVT_TIMER_MODE_SHIFT;
const LVT_TIMER: usize = 0;
const LVT_ERROR: usize = 5;

/// Bits software may write in each LVT entry (timer, thermal, performance counters, LINT0,
/// LINT1, error), and the read-only status bits that a write may carry but does not change.
/// Any other bit set is a reserved-bit violation (SDM 12.12.1.3).
const LVT_WRITABLE: [u32; 6] = [
    LVT_VECTOR | LVT_MASKED | LVT_TIMER_MODE,
    LVT_VECTOR | LVT_DELIVERY_MODE | LVT_MASKED,
    LVT_VECTOR | LVT_DELIVERY_MODE | LVT_MASKED,
    LVT_VECTOR | LVT_DELIVERY_MODE | LVT_PIN_POLARITY | LVT_TRIGGER_MODE | LVT_MASKED,
    LVT_VECTOR | LVT_DELIVERY_MODE | LVT_PIN_POLARITY | LVT_TRIGGER_MODE | LVT_MASKED,
    LVT_VECTOR | LVT_MASKED,
];
const LVT_READ_ONLY: [u32; 6] = [
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
    LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
    LVT_DELIVERY_STATUS,
];

// ESR bits (SDM 12.5.3, Figure 12-9). Illegal register addresses #GP in x2APIC mode instead.
const ESR_REDIRECTIBLE_IPI: u32 = 1 << 4;
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

// ICR in x2APIC mode (SDM 12.12.9, Figure 12-28): bit 12 (delivery status) is ignored on
// writes; 13, 16-17 and 20-31 are reserved.
const ICR_DELIVERY_MODE_SHIFT: u32 = 8;
const ICR_LOGICAL: u64 = 1 << 11;
/// Level (bit 14) and trigger mode (bit 15): INIT with level 0 and trigger 1 is the INIT
/// level de-assert (SDM 12.6.1), which does nothing.
const ICR_LEVEL_ASSERT: u64 = 1 << 14;
const ICR_TRIGGER_LEVEL: u64 = 1 << 15;
const ICR_DELIVERY_STATUS: u64 = 1 << 12;
const ICR_RESERVED: u64 = (1 << 13) | (0x3 << 16) | (0xfff << 20);
const ICR_SHORTHAND_SHIFT: u32 = 18;
const DELIVERY_FIXED: u64 = 0;
const DELIVERY_LOWEST_PRIORITY: u64 = 1;
const DELIVERY_INIT: u64 = 5;
const DELIVERY_STARTUP: u64 = 6;
const SHORTHAND_NONE: u64 = 0;
const SHORTHAND_SELF: u64 = 1;
const SHORTHAND_ALL_INCLUDING_SELF: u64 = 2;
/// x2APIC broadcast destination, in physical and logical mode (SDM 12.12.10).
const BROADCAST: u32 = 0xffff_ffff;

/// Divide configuration bits that exist: 0, 1 and 3 (SDM 12.5.4, Figure 12-10).
const DIVIDE_WRITABLE: u32 = 0b1011;

/// Vectors 0-15 are illegal for fixed interrupts (SDM 12.5.2).
const FIRST_LEGAL_VECTOR: u8 = 16;

const NS_PER_SEC: u128 = 1_000_000_000;

/// Why an access faults (the caller injects #GP(0)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicFault;

impl fmt::Display for ApicFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "APIC register access raises #GP(0)")
    }
}

/// What an IPI does at an APIC it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpiKind {
    /// A fixed interrupt of this vector (below 16: the receiver logs an illegal vector).
    Fixed(u8),
    /// INIT: a processor that never ran waits for a STARTUP IPI.
    Init,
    /// STARTUP (SIPI) with this vector: a processor waiting for one starts at page `vector`.
    Startup(u8),
}

/// Whom an IPI names (SDM 12.12.10; the sender is never among them: its part is done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination {
    /// Physical x2APIC ID, or broadcast.
    Physical(u32),
    /// Logical: cluster in bits 31:16, bitmap in bits 15:0; or broadcast.
    Logical(u32),
    /// The shorthands "all including self" and "all excluding self".
    AllButSender,
}

/// An IPI written to the ICR of APIC `sender`, for the other APICs of the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipi {
    /// What it does.
    pub kind: IpiKind,
    destination: Destination,
    sender: u32,
}

impl Ipi {
    /// Whether the APIC `target` receives it: named by the destination (physical ID, logical
    /// cluster and bit, broadcast or shorthand) and not the sender's own.
    pub fn reaches(&self, target: &VirtualLapic) -> bool {
        if target.apic_id == self.sender {
            return false;
        }
        match self.destination {
            Destination::AllButSender => true,
            Destination::Physical(id) => target.is_destination(id, false),
            Destination::Logical(id) => target.is_destination(id, true),
        }
    }
}

/// The timer mode in LVT timer bits 18:17 (SDM 12.5.4, Table 12-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// A 256-bit vector register (IRR, ISR), readable as eight 32-bit MSRs. `nonzero` has bit
/// `i` set exactly when word `i` is not 0, so that the highest vector is found without
/// scanning the eight words: every interrupt check (each entry, HLT, wake-up) asks for it,
/// mostly of an empty register.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct VectorSet {
    words: [u32; 8],
    nonzero: u8,
}

impl VectorSet {
    #[inline]
    fn set(&mut self, vector: u8) {
        let index = vector >> 5;
        self.words[usize::from(index)] |= 1 << (vector & 31);
        self.nonzero |= 1 << index;
    }

    #[inline]
    fn clear(&mut self, vector: u8) {
        let index = vector >> 5;
        let word = &mut self.words[usize::from(index)];
        *word &= !(1 << (vector & 31));
        if *word == 0 {
            self.nonzero &= !(1 << index);
        }
    }

    #[inline]
    fn contains(&self, vector: u8) -> bool {
        self.words[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
    }

    #[inline]
    fn highest(&self) -> Option<u8> {
        if self.nonzero == 0 {
            return None;
        }
        // nonzero != 0, so its highest bit is 0..=7; that word is not 0.
        let index = 7 - self.nonzero.leading_zeros() as u8;
        let word = self.words[usize::from(index & 7)];
        Some((index << 5) | (31 - word.leading_zeros()) as u8)
    }

    fn word(&self, index: u32) -> u32 {
        self.words.get(index as usize).copied().unwrap_or(0)
    }
}

/// The emulated local x2APIC of one vCPU.
#[derive(Debug, Clone)]
pub struct VirtualLapic {
    apic_id: u32,
    /// Timer input clock before the divider, in Hz (never 0).
    timer_hz: u64,
    /// TSC frequency in Hz (never 0).
    tsc_hz: u64,
    tpr: u8,
    svr: u32,
    irr: VectorSet,
    isr: VectorSet,
    /// What RDMSR of the ESR returns: the errors latched by the last ESR write.
    esr: u32,
    /// Errors detected since the last ESR write (SDM 12.5.3).
    esr_pending: u32,
    icr: u64,
    /// Timer, thermal, performance counters, LINT0, LINT1, error (MSRs 0x832-0x837).
    lvt: [u32; 6],
    divide_config: u32,
    initial_count: u32,
    /// One-shot and periodic mode: the system time at which the countdown (re)started from
    /// the initial count (before 0 after a divider change early on, hence signed); `None`
    /// when the timer does not count (initial count 0, or a one-shot that expired).
    counting_since_ns: Option<i128>,
    /// Periods since `counting_since_ns` already accounted for (interrupt raised or masked).
    expiries: u64,
    /// TSC-deadline mode: the armed deadline, 0 when disarmed.
    tsc_deadline: u64,
    /// `tsc_deadline` in system time, converted at the last update (rounded up).
    tsc_deadline_ns: u64,
}

impl VirtualLapic {
    /// `apic_id`: the vCPU number; `timer_hz`: the APIC timer input clock before the divider
    /// (1_000_000_000: one tick per ns); `tsc_hz`: the TSC frequency (for TSC-deadline mode).
    /// A frequency of 0 is taken as 1 Hz (the model never divides by zero).
    pub fn new(apic_id: u32, timer_hz: u64, tsc_hz: u64) -> Self {
        Self {
            apic_id,
            timer_hz: timer_hz.max(1),
            tsc_hz: tsc_hz.max(1),
            tpr: 0,
            svr: SVR_RESET,
            irr: VectorSet::default(),
            isr: VectorSet::default(),
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [LVT_MASKED; 6],
            divide_config: 0,
            initial_count: 0,
            counting_since_ns: None,
            expiries: 0,
            tsc_deadline: 0,
            tsc_deadline_ns: 0,
        }
    }

    /// True for the MSRs this model owns: 0x1b (IA32_APIC_BASE), 0x6e0 (IA32_TSC_DEADLINE),
    /// 0x800..=0x8ff.
    pub fn owns_msr(msr: u32) -> bool {
        matches!(msr, MSR_APIC_BASE | MSR_TSC_DEADLINE | 0x800..=0x8ff)
    }

    /// Whether a write of `msr` may have moved the timer's next expiry
    /// ([`Self::next_timer_deadline_ns`]), so that the host timer must be armed again: a timer
    /// register (SVR too: a software disable masks the LVT), or any register while the timer
    /// counts (an EOI or an injection may have let its vector out of IRR, which hid the
    /// expiry). An ICR, self-IPI or EOI write with no timer counting changes no deadline.
    #[inline]
    pub fn write_moves_timer(&self, msr: u32) -> bool {
        matches!(
            msr,
            MSR_TSC_DEADLINE | REG_SVR | REG_LVT_TIMER | REG_TIMER_INITIAL | REG_TIMER_DIVIDE
        ) || self.timer_counting()
    }

    /// The x2APIC ID (the vCPU number).
    pub fn apic_id(&self) -> u32 {
        self.apic_id
    }

    /// IA32_APIC_BASE: the default base, x2APIC mode and globally enabled; BSP on vCPU 0.
    pub fn apic_base(&self) -> u64 {
        let bsp = if self.apic_id == 0 { APIC_BASE_BSP } else { 0 };
        APIC_BASE_ADDRESS | bsp | APIC_BASE_EXTD | APIC_BASE_EN
    }

    /// Whether SVR bit 8 (APIC software enable) is set.
    #[inline]
    pub fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// The logical x2APIC ID (SDM 12.12.10.2): cluster (ID bits 31:4) in bits 31:16, one bit
    /// for the position in the cluster (ID bits 3:0) in bits 15:0.
    pub fn ldr(&self) -> u32 {
        ((self.apic_id >> 4) << 16) | (1 << (self.apic_id & 0xf))
    }

    /// The task priority register (bits 7:0).
    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// The processor priority (SDM 12.8.3.1): the TPR if its class is at least that of the
    /// highest in-service vector, else that vector's class with sub-class 0.
    #[inline]
    pub fn ppr(&self) -> u8 {
        let isrv = self.isr.highest().unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// CR8 as a guest in 64-bit mode reads it: TPR bits 7:4 (SDM 12.8.6).
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }

    /// MOV to CR8: TPR bits 7:4 from CR8 bits 3:0, TPR bits 3:0 cleared; reserved bits 63:4
    /// set #GP (SDM 12.8.6).
    pub fn write_cr8(&mut self, value: u64) -> Result<(), ApicFault> {
        if value > 0xf {
            return Err(ApicFault);
        }
        self.tpr = (value as u8) << 4;
        Ok(())
    }

    /// RDMSR. `now_ns` is system time (ns), `now_tsc` the TSC at the same instant.
    pub fn read_msr(&mut self, msr: u32, now_ns: u64, now_tsc: u64) -> Result<u64, ApicFault> {
        self.advance(now_ns, now_tsc);
        let value = match msr {
            MSR_APIC_BASE => return Ok(self.apic_base()),
            // Reads 0 outside TSC-deadline mode (SDM 12.5.4.1).
            MSR_TSC_DEADLINE if self.timer_mode() == TimerMode::TscDeadline => {
                return Ok(self.tsc_deadline);
            }
            MSR_TSC_DEADLINE => return Ok(0),
            REG_ICR => return Ok(self.icr),
            REG_ID => self.apic_id,
            REG_VERSION => VERSION,
            REG_TPR => u32::from(self.tpr),
            REG_PPR => u32::from(self.ppr()),
            REG_LDR => self.ldr(),
            REG_SVR => self.svr,
            REG_ISR0..=REG_ISR7 => self.isr.word(msr - REG_ISR0),
            REG_TMR0..=REG_TMR7 => 0,
            REG_IRR0..=REG_IRR7 => self.irr.word(msr - REG_IRR0),
            REG_ESR => self.esr,
            REG_LVT_TIMER..=REG_LVT_ERROR => self.lvt[(msr - REG_LVT_TIMER) as usize],
            REG_TIMER_INITIAL => self.initial_count,
            REG_TIMER_CURRENT => self.current_count(now_ns),
            REG_TIMER_DIVIDE => self.divide_config,
            // EOI and SELF IPI are write-only; everything else is reserved or not ours.
            _ => return Err(ApicFault),
        };
        Ok(u64::from(value))
    }

    /// WRMSR. An ICR write that names other APICs returns the [`Ipi`] for the caller to
    /// deliver to them; this APIC has already taken its own part.
    pub fn write_msr(
        &mut self,
        msr: u32,
        value: u64,
        now_ns: u64,
        now_tsc: u64,
    ) -> Result<Option<Ipi>, ApicFault> {
        self.advance(now_ns, now_tsc);
        let ipi = self.write_register(msr, value, now_ns, now_tsc)?;
        // A deadline already passed, or an error interrupt, takes effect at once.
        self.advance(now_ns, now_tsc);
        Ok(ipi)
    }

    fn write_register(
        &mut self,
        msr: u32,
        value: u64,
        now_ns: u64,
        now_tsc: u64,
    ) -> Result<Option<Ipi>, ApicFault> {
        match msr {
            // Only x2APIC mode exists here: leaving it, moving the base or disabling #GP.
            MSR_APIC_BASE if value == self.apic_base() => return Ok(None),
            MSR_APIC_BASE => return Err(ApicFault),
            // Writes are ignored outside TSC-deadline mode (SDM 12.5.4.1); writing 0 disarms.
            MSR_TSC_DEADLINE => {
                if self.timer_mode() == TimerMode::TscDeadline {
                    self.tsc_deadline = value;
                    // The system time it falls at, found once: TSC and system time advance
                    // together (one already passed expires in the caller's `advance`).
                    if value > now_tsc {
                        self.find_tsc_deadline_ns(now_ns, now_tsc);
                    }
                }
                return Ok(None);
            }
            REG_ICR => {
                if value & ICR_RESERVED != 0 {
                    return Err(ApicFault);
                }
                self.icr = value & !ICR_DELIVERY_STATUS;
                return Ok(self.send_ipi(value));
            }
            _ => {}
        }
        // All other x2APIC registers are 32 bits wide; bits 63:32 are reserved (SDM 12.12.1.2).
        let value = u32::try_from(value).map_err(|_| ApicFault)?;
        match msr {
            REG_TPR if value <= 0xff => self.tpr = value as u8,
            // EOI: only 0 may be written (SDM 12.12.1.2, Table 12-6).
            REG_EOI if value == 0 => self.eoi(),
            REG_SVR if value & !SVR_WRITABLE == 0 => {
                self.svr = value;
                if !self.software_enabled() {
                    // SDM 12.4.7.2: software disable sets every LVT mask bit.
                    for entry in &mut self.lvt {
                        *entry |= LVT_MASKED;
                    }
                }
            }
            // ESR: only 0 may be written; the write latches the errors seen since the last
            // write (SDM 12.5.3).
            REG_ESR if value == 0 => {
                self.esr = self.esr_pending;
                self.esr_pending = 0;
            }
            REG_LVT_TIMER..=REG_LVT_ERROR => {
                self.write_lvt((msr - REG_LVT_TIMER) as usize, value)?;
            }
            // Ignored in TSC-deadline mode (SDM 12.5.4.1); 0 stops the timer (SDM 12.5.4).
            REG_TIMER_INITIAL => {
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.initial_count = value;
                    self.counting_since_ns = (value != 0).then_some(i128::from(now_ns));
                    self.expiries = 0;
                }
            }
            REG_TIMER_DIVIDE if value & !DIVIDE_WRITABLE == 0 => {
                self.set_divide_config(value, now_ns);
            }
            // SELF IPI (SDM 12.12.11): a fixed, edge-triggered IPI to this APIC.
            REG_SELF_IPI if value <= 0xff => {
                self.send_ipi(u64::from(value) | (SHORTHAND_SELF << ICR_SHORTHAND_SHIFT));
            }
            // Read-only registers, reserved bits in the writable ones, reserved addresses.
            _ => return Err(ApicFault),
        }
        Ok(None)
    }

    fn write_lvt(&mut self, index: usize, value: u32) -> Result<(), ApicFault> {
        let writable = LVT_WRITABLE[index];
        if value & !(writable | LVT_READ_ONLY[index]) != 0 {
            return Err(ApicFault);
        }
        let mut entry = value & writable;
        if !self.software_enabled() {
            // SDM 12.4.7.2: while software-disabled, attempts to clear mask bits are ignored.
            entry |= LVT_MASKED;
        }
        if index == LVT_TIMER {
            // Timer mode 11b is reserved (SDM 12.5.4, Table 12-2).
            let new_mode = timer_mode_of(entry).ok_or(ApicFault)?;
            let old_mode = self.timer_mode();
            // Entering or leaving TSC-deadline mode disarms the timer (SDM 12.5.4.1). Between
            // one-shot and periodic the countdown continues; only what happens at 0 changes.
            if (old_mode == TimerMode::TscDeadline) != (new_mode == TimerMode::TscDeadline) {
                self.initial_count = 0;
                self.counting_since_ns = None;
                self.expiries = 0;
                self.tsc_deadline = 0;
            }
        }
        self.lvt[index] = entry;
        Ok(())
    }

    /// Changing the divider while counting keeps the current count and counts on at the new
    /// rate (the grid of a periodic timer restarts from here).
    fn set_divide_config(&mut self, value: u32, now_ns: u64) {
        let counting =
            self.counting_since_ns.is_some() && self.timer_mode() != TimerMode::TscDeadline;
        let current = self.current_count(now_ns);
        self.divide_config = value;
        if counting && current != 0 {
            // Place the start of the countdown in the past so that `current` counts remain;
            // rounding down keeps the next expiry at or after the exact time.
            let done = u128::from(self.initial_count - current);
            let back = mul_div_floor(
                done * u128::from(self.divider()),
                NS_PER_SEC,
                u128::from(self.timer_hz),
            );
            let back = i128::try_from(back).unwrap_or(i128::MAX);
            self.counting_since_ns = Some(i128::from(now_ns).saturating_sub(back));
            self.expiries = 0;
        }
    }

    /// The system time at which the timer next fires (None: not armed or masked). The
    /// hypervisor programs its own timer for it. None too while the timer's vector waits in
    /// IRR: expiries coalesce, so the next one would change nothing that is not brought up to
    /// date at the next access ([`Self::advance`]). Without this, a vCPU that halts with a
    /// periodic timer of count 1 and its vector held back by the TPR would have the
    /// hypervisor look at it every nanosecond, cutting every other vCPU's slice to nothing.
    ///
    /// Inlined up to the countdown's arithmetic: the scheduler asks it of every vCPU at each
    /// pass and slice, mostly of timers that are off.
    #[inline]
    pub fn next_timer_deadline_ns(&self) -> Option<u64> {
        if !self.timer_armed() || self.irr.contains((self.lvt[LVT_TIMER] & LVT_VECTOR) as u8) {
            return None;
        }
        match self.timer_mode() {
            TimerMode::TscDeadline => Some(self.tsc_deadline_ns),
            TimerMode::OneShot | TimerMode::Periodic => Some(self.next_expiry_ns()),
        }
    }

    /// The next expiry of a one-shot or periodic countdown.
    #[inline(never)]
    fn next_expiry_ns(&self) -> u64 {
        self.expiry_ns(self.expiries.saturating_add(1))
    }

    /// Brings the model up to `now`: an expired timer sets its vector in IRR (one-shot: once;
    /// periodic: re-armed on a fixed grid from the programming time, never drifting; several
    /// missed periods coalesce into one interrupt); TSC-deadline: once, then the deadline
    /// reads 0. A masked timer expires the same way without setting IRR.
    ///
    /// Inlined up to whether the timer counts (every access and every pass brings the model up
    /// to date, mostly with the timer off).
    #[inline]
    pub fn advance(&mut self, now_ns: u64, now_tsc: u64) {
        match self.timer_mode() {
            TimerMode::TscDeadline => {
                // Fires when the TSC equals or exceeds the deadline, then disarms and clears
                // the MSR (SDM 12.5.4.1). Its system time was found when it was written; found
                // again only when system time reached it before the TSC did (the two clocks'
                // roundings), so that a pending deadline is always after `now_ns`.
                if self.tsc_deadline == 0 {
                    return;
                }
                if now_tsc >= self.tsc_deadline {
                    self.tsc_deadline = 0;
                    self.timer_expired();
                } else if self.tsc_deadline_ns <= now_ns {
                    self.find_tsc_deadline_ns(now_ns, now_tsc);
                }
            }
            TimerMode::OneShot | TimerMode::Periodic => {
                if self.counting_since_ns.is_some() {
                    self.advance_countdown(now_ns);
                }
            }
        }
    }

    /// The system time of the TSC deadline (after `now_tsc`), rounded up so that the timer
    /// never fires early.
    #[inline(never)]
    fn find_tsc_deadline_ns(&mut self, now_ns: u64, now_tsc: u64) {
        let ticks = u128::from(self.tsc_deadline.saturating_sub(now_tsc));
        let ns = mul_div_ceil(ticks, NS_PER_SEC, u128::from(self.tsc_hz));
        self.tsc_deadline_ns = now_ns.saturating_add(saturate_u64(ns));
    }

    /// [`Self::advance`] of a one-shot or periodic timer that counts.
    #[inline(never)]
    fn advance_countdown(&mut self, now_ns: u64) {
        let due = self.expiries_by(now_ns);
        if due > self.expiries {
            self.timer_expired();
            if self.timer_mode() == TimerMode::OneShot {
                self.counting_since_ns = None;
                self.expiries = 0;
            } else {
                self.expiries = due;
            }
        }
    }

    /// The vector to deliver now: the highest IRR vector whose priority class (vector >> 4)
    /// is above the PPR's class (SDM 12.8.4); None when the APIC is software-disabled (SVR
    /// bit 8 clear) or nothing qualifies.
    #[inline]
    pub fn deliverable_vector(&self) -> Option<u8> {
        if !self.software_enabled() {
            return None;
        }
        let vector = self.irr.highest()?;
        (vector >> 4 > self.ppr() >> 4).then_some(vector)
    }

    /// The hypervisor injected `vector`: IRR -> ISR. Vectors 0-15 never enter IRR or ISR and
    /// are ignored.
    #[inline]
    pub fn acknowledge(&mut self, vector: u8) {
        if vector < FIRST_LEGAL_VECTOR {
            return;
        }
        self.irr.clear(vector);
        self.isr.set(vector);
    }

    /// Whether an expiry of the timer now would change nothing but the count of expiries:
    /// a periodic timer (it counts on whatever an expiry does) that is masked (an expiry
    /// raises nothing) or whose vector already waits in IRR (expiries coalesce). Until that
    /// changes, [`Self::advance`] may wait: every register access brings the model up to
    /// date first, and so does an injection of its vector, the only other way it leaves IRR
    /// ([`Self::acknowledge_needs_advance`]). A vCPU that halts with a periodic timer of count 1 held back by its TPR would
    /// otherwise cost every pass of the scheduler two 128-bit divisions.
    #[inline]
    pub fn timer_expiry_moot(&self) -> bool {
        let entry = self.lvt[LVT_TIMER];
        self.timer_mode() == TimerMode::Periodic
            && (entry & LVT_MASKED != 0 || self.irr.contains((entry & LVT_VECTOR) as u8))
    }

    /// Whether injecting `vector` takes the timer's vector out of IRR while the timer counts:
    /// the caller brings the model up to date ([`Self::advance`]) before
    /// [`Self::acknowledge`], so that only an expiry after that raises it again (those while
    /// it waited coalesced into this one) even when [`Self::timer_expiry_moot`] let passes
    /// skip the advance.
    #[inline]
    pub fn acknowledge_needs_advance(&self, vector: u8) -> bool {
        u32::from(vector) == self.lvt[LVT_TIMER] & LVT_VECTOR && self.timer_counting()
    }

    /// Whether the timer counts towards an expiry, masked or not: [`Self::advance`] has
    /// work to do.
    #[inline]
    pub fn timer_counting(&self) -> bool {
        match self.timer_mode() {
            TimerMode::TscDeadline => self.tsc_deadline != 0,
            TimerMode::OneShot | TimerMode::Periodic => self.counting_since_ns.is_some(),
        }
    }

    /// Whether the timer is armed (unmasked, counting or deadline set): a HLT with IF=1 can
    /// be woken.
    #[inline]
    pub fn timer_armed(&self) -> bool {
        self.lvt[LVT_TIMER] & LVT_MASKED == 0 && self.timer_counting()
    }

    /// Raises `vector` in IRR (for self-IPIs and future device interrupts); vectors 0-15 are
    /// illegal (set ESR "receive illegal vector", ignore; SDM 12.5.3). A software-disabled
    /// APIC accepts no fixed interrupts (SDM 12.4.7.1); IRR and ISR keep what they hold.
    pub fn raise(&mut self, vector: u8) {
        if vector < FIRST_LEGAL_VECTOR {
            self.log_error(ESR_RECEIVE_ILLEGAL_VECTOR);
        } else if self.software_enabled() {
            self.irr.set(vector);
        }
    }

    /// Whether `vector` is pending in IRR.
    pub fn is_pending(&self, vector: u8) -> bool {
        self.irr.contains(vector)
    }

    /// Whether `vector` is in service (delivered and not yet EOIed).
    pub fn is_in_service(&self, vector: u8) -> bool {
        self.isr.contains(vector)
    }

    /// EOI: clears the highest-priority ISR bit (SDM 12.8.5); nothing when ISR is empty.
    fn eoi(&mut self) {
        if let Some(vector) = self.isr.highest() {
            self.isr.clear(vector);
        }
    }

    /// An IPI written to the ICR (or the SELF IPI register): a fixed interrupt that names
    /// this APIC is raised here; the part for other APICs is returned. INIT and STARTUP never
    /// act on the sender (it runs already), NMI and SMI are not modelled.
    fn send_ipi(&mut self, icr: u64) -> Option<Ipi> {
        let vector = icr as u8;
        let delivery_mode = (icr >> ICR_DELIVERY_MODE_SHIFT) & 0x7;
        let shorthand = (icr >> ICR_SHORTHAND_SHIFT) & 0x3;
        let destination = (icr >> 32) as u32;
        let logical = icr & ICR_LOGICAL != 0;
        let kind = match delivery_mode {
            DELIVERY_FIXED => IpiKind::Fixed(vector),
            // Lowest priority does not exist in x2APIC mode: logged, not sent (SDM 12.5.3).
            DELIVERY_LOWEST_PRIORITY => {
                self.log_error(ESR_REDIRECTIBLE_IPI);
                return None;
            }
            // INIT level de-assert: no effect (SDM 12.6.1).
            DELIVERY_INIT if icr & (ICR_LEVEL_ASSERT | ICR_TRIGGER_LEVEL) == ICR_TRIGGER_LEVEL => {
                return None;
            }
            DELIVERY_INIT => IpiKind::Init,
            DELIVERY_STARTUP => IpiKind::Startup(vector),
            // NMI, SMI and the reserved modes: not modelled.
            _ => return None,
        };
        if let IpiKind::Fixed(vector) = kind {
            if vector < FIRST_LEGAL_VECTOR {
                self.log_error(ESR_SEND_ILLEGAL_VECTOR);
            }
            let to_self = match shorthand {
                SHORTHAND_NONE => self.is_destination(destination, logical),
                SHORTHAND_SELF | SHORTHAND_ALL_INCLUDING_SELF => true,
                _ => false, // all excluding self
            };
            if to_self {
                self.raise(vector);
            }
        }
        let destination = match shorthand {
            SHORTHAND_NONE if logical => Destination::Logical(destination),
            SHORTHAND_NONE => Destination::Physical(destination),
            SHORTHAND_SELF => return None,
            _ => Destination::AllButSender,
        };
        Some(Ipi {
            kind,
            destination,
            sender: self.apic_id,
        })
    }

    /// Whether an x2APIC destination names this APIC (SDM 12.12.10).
    fn is_destination(&self, destination: u32, logical: bool) -> bool {
        if destination == BROADCAST {
            return true;
        }
        if !logical {
            return destination == self.apic_id;
        }
        let ldr = self.ldr();
        destination >> 16 == ldr >> 16 && destination & ldr & 0xffff != 0
    }

    /// Records an APIC error and, if the error LVT entry is unmasked, raises its vector (SDM
    /// 12.5.3). An illegal error vector only records "receive illegal vector" (no recursion).
    fn log_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let entry = self.lvt[LVT_ERROR];
        if entry & LVT_MASKED != 0 {
            return;
        }
        let vector = (entry & LVT_VECTOR) as u8;
        if vector < FIRST_LEGAL_VECTOR {
            self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
        } else if self.software_enabled() {
            self.irr.set(vector);
        }
    }

    /// The timer reached 0 (or its deadline): the interrupt goes out unless masked.
    fn timer_expired(&mut self) {
        let entry = self.lvt[LVT_TIMER];
        if entry & LVT_MASKED == 0 {
            self.raise((entry & LVT_VECTOR) as u8);
        }
    }

    #[inline]
    fn timer_mode(&self) -> TimerMode {
        // Mode 11b is refused on write, so the stored entry always has a valid mode.
        timer_mode_of(self.lvt[LVT_TIMER]).unwrap_or(TimerMode::OneShot)
    }

    /// The divide configuration as a divisor: bits 3,1,0 = 000 -> 2, 001 -> 4, ..., 110 -> 128,
    /// 111 -> 1 (SDM 12.5.4, Figure 12-10).
    fn divider(&self) -> u64 {
        let code = ((self.divide_config >> 1) & 0b100) | (self.divide_config & 0b11);
        if code == 0b111 { 1 } else { 2 << code }
    }

    /// Input-clock ticks per timer period times 10^9, the numerator of the period in ns.
    fn period_scaled(&self) -> u128 {
        u128::from(self.initial_count) * u128::from(self.divider()) * NS_PER_SEC
    }

    /// How many whole periods have passed between the start of the countdown and `now_ns`.
    fn expiries_by(&self, now_ns: u64) -> u64 {
        let elapsed = self.elapsed_ns(now_ns);
        saturate_u64(mul_div_floor(
            elapsed,
            u128::from(self.timer_hz),
            self.period_scaled(),
        ))
    }

    /// The system time of the `k`-th expiry since the start of the countdown, rounded up so
    /// that the timer never fires early.
    fn expiry_ns(&self, k: u64) -> u64 {
        let start = self.counting_since_ns.unwrap_or(0);
        let offset = mul_div_ceil(
            u128::from(k),
            self.period_scaled(),
            u128::from(self.timer_hz),
        );
        let time = start.saturating_add(i128::try_from(offset).unwrap_or(i128::MAX));
        u64::try_from(time.max(0)).unwrap_or(u64::MAX)
    }

    /// Time since the start of the countdown (0 when not counting).
    fn elapsed_ns(&self, now_ns: u64) -> u128 {
        let start = self.counting_since_ns.unwrap_or(i128::MAX);
        u128::try_from(i128::from(now_ns).saturating_sub(start)).unwrap_or(0)
    }

    /// The current count (SDM 12.5.4): counts down from the initial count at
    /// timer_hz / divider, reloads in periodic mode, reads 0 when the timer does not count
    /// and always in TSC-deadline mode.
    fn current_count(&self, now_ns: u64) -> u32 {
        if self.counting_since_ns.is_none()
            || self.timer_mode() == TimerMode::TscDeadline
            || self.initial_count == 0
        {
            return 0;
        }
        let elapsed = self.elapsed_ns(now_ns);
        let counted = mul_div_floor(
            elapsed,
            u128::from(self.timer_hz),
            u128::from(self.divider()) * NS_PER_SEC,
        );
        let initial = u128::from(self.initial_count);
        let next_expiry = (u128::from(self.expiries) + 1) * initial;
        if self.timer_mode() == TimerMode::OneShot && counted >= next_expiry {
            return 0;
        }
        // The remainder is below the initial count, so the result fits in a u32.
        (initial - counted % initial) as u32
    }
}

fn timer_mode_of(entry: u32) -> Option<TimerMode> {
    match (entry & LVT_TIMER_MODE) >> LVT_TIMER_MODE_SHIFT {
        0 => Some(TimerMode::OneShot),
        1 => Some(TimerMode::Periodic),
        2 => Some(TimerMode::TscDeadline),
        _ => None,
    }
}

/// `a * b / c` rounded down; saturates instead of overflowing; `c` = 0 counts as 1.
fn mul_div_floor(a: u128, b: u128, c: u128) -> u128 {
    a.saturating_mul(b) / c.max(1)
}

/// `a * b / c` rounded up; saturates instead of overflowing; `c` = 0 counts as 1.
fn mul_div_ceil(a: u128, b: u128, c: u128) -> u128 {
    a.saturating_mul(b).div_ceil(c.max(1))
}

fn saturate_u64(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GHZ: u64 = 1_000_000_000;
    const TIMER_VECTOR: u8 = 0xec;
    const LVT_PERIODIC: u64 = 1 << 17;
    const LVT_TSC_DEADLINE: u64 = 2 << 17;

    /// An APIC the way a kernel leaves it after bring-up: software-enabled, TPR 0.
    fn enabled_apic(id: u32, tsc_hz: u64) -> VirtualLapic {
        let mut apic = VirtualLapic::new(id, GHZ, tsc_hz);
        apic.write_msr(REG_SVR, 0x1ff, 0, 0).unwrap();
        apic
    }

    /// Programs the LVT timer (unmasked, `mode`) and the divider; does not start counting.
    fn timer(mode: u64, divide_config: u64) -> VirtualLapic {
        let mut apic = enabled_apic(0, GHZ);
        apic.write_msr(REG_LVT_TIMER, mode | u64::from(TIMER_VECTOR), 0, 0)
            .unwrap();
        apic.write_msr(REG_TIMER_DIVIDE, divide_config, 0, 0)
            .unwrap();
        apic
    }

    /// Delivers and EOIs everything deliverable; returns how many timer interrupts there were.
    fn take_timer_interrupts(apic: &mut VirtualLapic) -> u32 {
        let mut taken = 0;
        while let Some(vector) = apic.deliverable_vector() {
            assert_eq!(vector, TIMER_VECTOR);
            apic.acknowledge(vector);
            apic.write_msr(REG_EOI, 0, 0, 0).unwrap();
            taken += 1;
        }
        taken
    }

    /// Divide configurations and their divisors (SDM Figure 12-10).
    const DIVIDERS: [(u64, u64); 8] = [
        (0b0000, 2),
        (0b0001, 4),
        (0b0010, 8),
        (0b0011, 16),
        (0b1000, 32),
        (0b1001, 64),
        (0b1010, 128),
        (0b1011, 1),
    ];

    #[test]
    fn registers_after_reset_read_as_the_notes_say() {
        for id in [0, 1, 17, 0x1234] {
            let mut apic = VirtualLapic::new(id, GHZ, GHZ);
            let mut read = |msr| apic.read_msr(msr, 0, 0).unwrap();
            assert_eq!(read(REG_ID), u64::from(id));
            assert_eq!(read(REG_VERSION), 0x50014);
            let bsp = if id == 0 { 1 << 8 } else { 0 };
            assert_eq!(
                read(MSR_APIC_BASE),
                0xfee0_0000 | bsp | (1 << 10) | (1 << 11)
            );
            assert_eq!(read(REG_SVR), 0xff);
            assert_eq!(read(REG_TPR), 0);
            assert_eq!(read(REG_PPR), 0);
            assert_eq!(read(REG_ESR), 0);
            assert_eq!(read(REG_ICR), 0);
            for msr in REG_LVT_TIMER..=REG_LVT_ERROR {
                assert_eq!(read(msr), 1 << 16, "LVT {msr:#x} masked");
            }
            for msr in REG_ISR0..=REG_IRR7 {
                assert_eq!(read(msr), 0);
            }
            assert_eq!(read(REG_TIMER_INITIAL), 0);
            assert_eq!(read(REG_TIMER_CURRENT), 0);
            assert_eq!(read(REG_TIMER_DIVIDE), 0);
            assert_eq!(read(MSR_TSC_DEADLINE), 0);
        }
    }

    #[test]
    fn ldr_is_the_x2apic_logical_id_derived_from_the_id() {
        for id in 0..300u32 {
            let mut apic = VirtualLapic::new(id, GHZ, GHZ);
            let ldr = apic.read_msr(REG_LDR, 0, 0).unwrap() as u32;
            assert_eq!(ldr >> 16, id >> 4, "cluster of {id}");
            assert_eq!(ldr & 0xffff, 1 << (id % 16), "position of {id}");
        }
    }

    #[test]
    fn the_model_owns_apic_base_tsc_deadline_and_the_x2apic_range() {
        for msr in [0x1b, 0x6e0, 0x800, 0x830, 0x8ff] {
            assert!(VirtualLapic::owns_msr(msr), "{msr:#x}");
        }
        for msr in [0x1a, 0x1c, 0x6df, 0x6e1, 0x7ff, 0x900, 0xc000_0080] {
            assert!(!VirtualLapic::owns_msr(msr), "{msr:#x}");
        }
    }

    #[test]
    fn reserved_msrs_fault_on_read_and_write() {
        let mut apic = enabled_apic(0, GHZ);
        let reserved = [
            0x800, 0x801, 0x804, 0x805, 0x806, 0x807, 0x809, 0x80c, 0x80e, 0x829, 0x82e, 0x82f,
            0x831, 0x83a, 0x83d, 0x840, 0x8ff,
        ];
        for msr in reserved {
            assert_eq!(apic.read_msr(msr, 0, 0), Err(ApicFault), "read {msr:#x}");
            assert_eq!(
                apic.write_msr(msr, 0, 0, 0),
                Err(ApicFault),
                "write {msr:#x}"
            );
        }
        assert_eq!(apic.read_msr(0x10, 0, 0), Err(ApicFault), "not an APIC MSR");
    }

    #[test]
    fn writes_to_read_only_registers_fault_and_change_nothing() {
        let mut apic = enabled_apic(5, GHZ);
        apic.raise(0x40);
        let read_only =
            (REG_ISR0..=REG_IRR7).chain([REG_ID, REG_VERSION, REG_PPR, REG_LDR, REG_TIMER_CURRENT]);
        for msr in read_only {
            let before = apic.read_msr(msr, 0, 0).unwrap();
            assert_eq!(apic.write_msr(msr, 0, 0, 0), Err(ApicFault), "{msr:#x}");
            assert_eq!(
                apic.write_msr(msr, before, 0, 0),
                Err(ApicFault),
                "{msr:#x}"
            );
            assert_eq!(apic.read_msr(msr, 0, 0).unwrap(), before, "{msr:#x}");
        }
    }

    #[test]
    fn write_only_registers_fault_on_read() {
        let mut apic = enabled_apic(0, GHZ);
        assert_eq!(apic.read_msr(REG_EOI, 0, 0), Err(ApicFault));
        assert_eq!(apic.read_msr(REG_SELF_IPI, 0, 0), Err(ApicFault));
    }

    #[test]
    fn eoi_and_esr_accept_only_zero() {
        let mut apic = enabled_apic(0, GHZ);
        apic.raise(0x50);
        apic.acknowledge(0x50);
        for value in [1, 0x50, 1 << 31, 1 << 32] {
            assert_eq!(apic.write_msr(REG_EOI, value, 0, 0), Err(ApicFault));
            assert_eq!(apic.write_msr(REG_ESR, value, 0, 0), Err(ApicFault));
        }
        assert!(apic.is_in_service(0x50), "a faulting EOI does nothing");
        apic.write_msr(REG_EOI, 0, 0, 0).unwrap();
        assert!(!apic.is_in_service(0x50));
        apic.write_msr(REG_ESR, 0, 0, 0).unwrap();
    }

    #[test]
    fn reserved_bits_fault() {
        let mut apic = enabled_apic(0, GHZ);
        let cases: &[(u32, u64)] = &[
            (REG_TPR, 0x100),
            (REG_TPR, 1 << 32),
            (REG_SVR, 1 << 10),
            (REG_SVR, 1 << 12), // EOI-broadcast suppression: not offered
            (REG_LVT_TIMER, 1 << 8),
            (REG_LVT_TIMER, 3 << 17), // reserved timer mode
            (REG_LVT_TIMER, 1 << 19),
            (REG_LVT_ERROR, 1 << 8),
            (REG_TIMER_DIVIDE, 0b0100),
            (REG_TIMER_DIVIDE, 0x10),
            (REG_TIMER_INITIAL, 1 << 32),
            (REG_SELF_IPI, 0x100),
            (REG_ICR, 1 << 13),
            (REG_ICR, 1 << 16),
            (REG_ICR, 1 << 20),
        ];
        for &(msr, value) in cases {
            let before = apic.read_msr(msr, 0, 0);
            assert_eq!(
                apic.write_msr(msr, value, 0, 0),
                Err(ApicFault),
                "{msr:#x} <- {value:#x}"
            );
            assert_eq!(apic.read_msr(msr, 0, 0), before, "{msr:#x} unchanged");
        }
        // Read-only bits of an LVT entry may be written back as read; they do not stick.
        apic.write_msr(REG_LVT_TIMER + 3, (1 << 12) | (1 << 14) | 0x20, 0, 0)
            .unwrap();
        assert_eq!(apic.read_msr(REG_LVT_TIMER + 3, 0, 0), Ok(0x20));
        // ICR bit 12 (delivery status) is ignored on write.
        apic.write_msr(REG_ICR, (7 << 32) | (1 << 12) | 0x30, 0, 0)
            .unwrap();
        assert_eq!(apic.read_msr(REG_ICR, 0, 0), Ok((7 << 32) | 0x30));
    }

    #[test]
    fn apic_base_accepts_only_its_own_value() {
        for id in [0, 3] {
            let mut apic = VirtualLapic::new(id, GHZ, GHZ);
            let base = apic.read_msr(MSR_APIC_BASE, 0, 0).unwrap();
            assert_eq!(apic.write_msr(MSR_APIC_BASE, base, 0, 0), Ok(None));
            for other in [
                0,
                base ^ (1 << 10),
                base ^ (1 << 11),
                base ^ (1 << 8),
                0xfec0_0d00,
            ] {
                assert_eq!(apic.write_msr(MSR_APIC_BASE, other, 0, 0), Err(ApicFault));
            }
            assert_eq!(apic.read_msr(MSR_APIC_BASE, 0, 0), Ok(base));
        }
    }

    #[test]
    fn the_divide_configuration_encodes_the_sdm_divisors() {
        for (config, divisor) in DIVIDERS {
            let mut apic = timer(0, config);
            assert_eq!(apic.read_msr(REG_TIMER_DIVIDE, 0, 0), Ok(config));
            apic.write_msr(REG_TIMER_INITIAL, 1000, 0, 0).unwrap();
            assert_eq!(
                apic.next_timer_deadline_ns(),
                Some(1000 * divisor),
                "config {config:#b}"
            );
        }
    }

    #[test]
    fn one_shot_fires_at_exactly_initial_count_times_divider_ns_and_never_earlier() {
        for (config, divisor) in DIVIDERS {
            for count in [1u64, 2, 3, 7, 1000, 123_457, u64::from(u32::MAX)] {
                let start = 5_000 + count;
                let mut apic = timer(0, config);
                apic.write_msr(REG_TIMER_INITIAL, count, start, 0).unwrap();
                let fire = start + count * divisor;
                assert_eq!(apic.next_timer_deadline_ns(), Some(fire));
                assert!(apic.timer_armed());
                apic.advance(fire - 1, 0);
                assert_eq!(
                    apic.deliverable_vector(),
                    None,
                    "count {count} div {divisor}"
                );
                apic.advance(fire, 0);
                assert_eq!(apic.deliverable_vector(), Some(TIMER_VECTOR));
                assert_eq!(apic.next_timer_deadline_ns(), None, "one-shot fires once");
                assert!(!apic.timer_armed());
                assert_eq!(take_timer_interrupts(&mut apic), 1);
                apic.advance(fire + 10 * count * divisor, 0);
                assert_eq!(take_timer_interrupts(&mut apic), 0);
                assert_eq!(apic.read_msr(REG_TIMER_CURRENT, fire + 1, 0), Ok(0));
            }
        }
    }

    #[test]
    fn one_shot_fires_on_time_with_a_timer_clock_that_is_not_one_ghz() {
        // 1.2 GHz: 1000 counts at divide-by-2 (the reset divider) take 1666.67 ns.
        let mut apic = VirtualLapic::new(0, 1_200_000_000, GHZ);
        apic.write_msr(REG_SVR, 0x1ff, 0, 0).unwrap();
        apic.write_msr(REG_LVT_TIMER, u64::from(TIMER_VECTOR), 0, 0)
            .unwrap();
        apic.write_msr(REG_TIMER_INITIAL, 1000, 0, 0).unwrap();
        assert_eq!(apic.next_timer_deadline_ns(), Some(1667));
        apic.advance(1666, 0);
        assert_eq!(apic.deliverable_vector(), None);
        apic.advance(1667, 0);
        assert_eq!(apic.deliverable_vector(), Some(TIMER_VECTOR));
    }

    #[test]
    fn a_timer_whose_vector_waits_in_irr_asks_for_no_host_timer() {
        // Periodic, count 1: due every nanosecond; the TPR holds its vector back.
        let mut apic = timer(LVT_PERIODIC, 0b1011);
        apic.write_msr(REG_TPR, 0xf0, 0, 0).unwrap();
        apic.write_msr(REG_TIMER_INITIAL, 1, 100, 0).unwrap();
        assert_eq!(apic.next_timer_deadline_ns(), Some(101));
        apic.advance(101, 0);
        assert_eq!(apic.deliverable_vector(), None, "held back by the TPR");
        assert_eq!(
            apic.next_timer_deadline_ns(),
            None,
            "another expiry changes nothing"
        );
        // Once it is taken and acknowledged, the grid goes on from where time is.
        apic.write_msr(REG_TPR, 0, 500, 0).unwrap();
        assert_eq!(take_timer_interrupts(&mut apic), 1);
        apic.advance(500, 0);
        let _ = take_timer_interrupts(&mut apic);
        let next = apic
            .next_timer_deadline_ns()
            .expect("armed, nothing pending");
        assert!(next > 500, "the next expiry {next} is ahead");
    }

    #[test]
    fn only_timer_writes_or_a_counting_timer_move_the_host_timer() {
        let mut apic = timer(LVT_PERIODIC, 0b1011);
        for msr in [REG_EOI, REG_ICR, REG_SELF_IPI, REG_TPR, REG_ESR] {
            assert!(
                !apic.write_moves_timer(msr),
                "{msr:#x} with the timer stopped"
            );
        }
        for msr in [
            MSR_TSC_DEADLINE,
            REG_SVR,
            REG_LVT_TIMER,
            REG_TIMER_INITIAL,
            REG_TIMER_DIVIDE,
        ] {
            assert!(apic.write_moves_timer(msr), "{msr:#x}");
        }
        // Counting: an EOI may let its vector out of IRR, where it hid the next expiry.
        apic.write_msr(REG_TIMER_INITIAL, 1000, 0, 0).unwrap();
        assert!(apic.write_moves_timer(REG_EOI));
    }

    #[test]
    fn a_masked_periodic_timer_of_count_one_asks_for_no_host_timer() {
        // Due every nanosecond, but masked: it raises nothing, so nothing need run for it
        // (the resource-hog scenario's hog programs exactly this).
        let mut apic = timer(LVT_PERIODIC | (1 << 16), 0b1011);
        apic.write_msr(REG_TIMER_INITIAL, 1, 100, 0).unwrap();
        assert_eq!(apic.next_timer_deadline_ns(), None);
        apic.write_msr(
            REG_LVT_TIMER,
            LVT_PERIODIC | u64::from(TIMER_VECTOR),
            100,
            0,
        )
        .unwrap();
        assert_eq!(
            apic.next_timer_deadline_ns(),
            Some(101),
            "unmasked, it does"
        );
    }

    #[test]
    fn periodic_keeps_its_grid_when_advanced_late() {
        let period = 1_000 * 16; // count 1000, divide by 16
        let start = 777;
        let mut apic = timer(LVT_PERIODIC, 0b0011);
        apic.write_msr(REG_TIMER_INITIAL, 1000, start, 0).unwrap();
        let mut now = start;
        // Late by varying amounts, sometimes by several periods.
        for (step, late) in [
            (1u64, 0u64),
            (1, 1),
            (1, period - 1),
            (3, 5),
            (1, 0),
            (7, 1234),
        ] {
            now = start + (now - start) / period * period + step * period + late;
            apic.advance(now, 0);
            assert_eq!(
                take_timer_interrupts(&mut apic),
                1,
                "missed periods coalesce"
            );
            let next = apic.next_timer_deadline_ns().unwrap();
            assert_eq!((next - start) % period, 0, "on the grid");
            assert!(next > now && next - now <= period, "the next grid point");
        }
    }

    /// What the scheduler does with a periodic timer whose vector waits in IRR: no advance
    /// while [`VirtualLapic::timer_expiry_moot`], one before the injection that takes the
    /// vector out: the expiries while it waited coalesce into that interrupt, and the next
    /// comes at the next grid point after the injection, as when every pass advanced it.
    #[test]
    fn a_held_back_periodic_timer_skipped_by_passes_fires_once_then_on_its_grid() {
        let period = 100 * 2; // count 100, divide by 2
        let mut apic = timer(LVT_PERIODIC, 0b0000);
        apic.write_msr(REG_TIMER_INITIAL, 100, 0, 0).unwrap();
        apic.write_msr(REG_TPR, 0xf0, 0, 0).unwrap();
        assert!(
            !apic.timer_expiry_moot(),
            "counting towards its first expiry"
        );
        apic.advance(period, 0);
        assert!(apic.is_pending(TIMER_VECTOR));
        assert!(apic.timer_expiry_moot(), "its vector waits in IRR");
        assert_eq!(apic.next_timer_deadline_ns(), None);
        assert_eq!(apic.deliverable_vector(), None, "the TPR holds it back");
        // Passes skip the advance for 50 periods; then the TPR drops and it is injected.
        let now = 50 * period + 7;
        apic.write_cr8(0).unwrap();
        let vector = apic.deliverable_vector().unwrap();
        assert!(apic.acknowledge_needs_advance(vector));
        apic.advance(now, 0);
        apic.acknowledge(vector);
        apic.write_msr(REG_EOI, 0, now, 0).unwrap();
        assert!(!apic.timer_expiry_moot());
        assert_eq!(
            apic.deliverable_vector(),
            None,
            "the waiting expiries coalesced"
        );
        assert_eq!(apic.next_timer_deadline_ns(), Some(51 * period));
        apic.advance(51 * period - 1, 0);
        assert_eq!(apic.deliverable_vector(), None);
        apic.advance(51 * period, 0);
        assert_eq!(apic.deliverable_vector(), Some(TIMER_VECTOR));
    }

    #[test]
    fn a_masked_periodic_timer_is_moot_and_catches_up_at_an_access() {
        let mut apic = timer(LVT_PERIODIC, 0b1011); // divide by 1
        apic.write_msr(REG_TIMER_INITIAL, 1, 0, 0).unwrap();
        apic.write_msr(
            REG_LVT_TIMER,
            LVT_PERIODIC | u64::from(TIMER_VECTOR) | 1 << 16,
            0,
            0,
        )
        .unwrap();
        assert!(apic.timer_expiry_moot());
        assert_eq!(apic.next_timer_deadline_ns(), None);
        // Unmasked a million periods later (no advance between): nothing old is raised, the
        // next expiry is the next nanosecond.
        apic.write_msr(
            REG_LVT_TIMER,
            LVT_PERIODIC | u64::from(TIMER_VECTOR),
            1_000_000,
            0,
        )
        .unwrap();
        assert!(!apic.timer_expiry_moot());
        assert_eq!(apic.deliverable_vector(), None);
        assert_eq!(apic.next_timer_deadline_ns(), Some(1_000_001));
        let mut oneshot = timer(0, 0b1011);
        oneshot
            .write_msr(REG_LVT_TIMER, u64::from(TIMER_VECTOR) | 1 << 16, 0, 0)
            .unwrap();
        oneshot.write_msr(REG_TIMER_INITIAL, 1, 0, 0).unwrap();
        assert!(
            !oneshot.timer_expiry_moot(),
            "a one-shot stops at its expiry"
        );
    }

    #[test]
    fn periodic_grid_does_not_drift_over_many_periods() {
        // 1.2 GHz, count 7, divide by 1: a period of 5.833... ns, not a whole number.
        let mut apic = VirtualLapic::new(0, 1_200_000_000, GHZ);
        apic.write_msr(REG_SVR, 0x1ff, 0, 0).unwrap();
        apic.write_msr(REG_LVT_TIMER, LVT_PERIODIC | u64::from(TIMER_VECTOR), 0, 0)
            .unwrap();
        apic.write_msr(REG_TIMER_DIVIDE, 0b1011, 0, 0).unwrap();
        apic.write_msr(REG_TIMER_INITIAL, 7, 0, 0).unwrap();
        for k in 1..=10_000u64 {
            let fire = apic.next_timer_deadline_ns().unwrap();
            assert_eq!(fire, (k * 7 * GHZ).div_ceil(1_200_000_000), "expiry {k}");
            apic.advance(fire - 1, 0);
            assert_eq!(take_timer_interrupts(&mut apic), 0);
            apic.advance(fire, 0);
            assert_eq!(take_timer_interrupts(&mut apic), 1);
        }
    }

    #[test]
    fn current_count_decreases_and_periodic_reloads() {
        for mode in [0, LVT_PERIODIC] {
            let mut apic = timer(mode, 0b0000); // divide by 2
            apic.write_msr(REG_TIMER_INITIAL, 500, 100, 0).unwrap();
            let mut last = apic.read_msr(REG_TIMER_CURRENT, 100, 0).unwrap();
            assert_eq!(last, 500);
            for now in (101..100 + 999).step_by(3) {
                let current = apic.read_msr(REG_TIMER_CURRENT, now, 0).unwrap();
                assert!(
                    current <= last && current >= 1,
                    "at {now}: {current} after {last}"
                );
                assert_eq!(current, 500 - (now - 100) / 2);
                last = current;
            }
            let after = apic.read_msr(REG_TIMER_CURRENT, 100 + 1000, 0).unwrap();
            if mode == LVT_PERIODIC {
                assert_eq!(after, 500, "reloaded");
                assert_eq!(
                    apic.read_msr(REG_TIMER_CURRENT, 100 + 1000 + 20, 0),
                    Ok(490)
                );
            } else {
                assert_eq!(after, 0, "expired");
            }
        }
    }

    #[test]
    fn writing_initial_count_zero_stops_the_timer() {
        for mode in [0, LVT_PERIODIC] {
            let mut apic = timer(mode, 0b1011);
            apic.write_msr(REG_TIMER_INITIAL, 100, 0, 0).unwrap();
            apic.write_msr(REG_TIMER_INITIAL, 0, 50, 0).unwrap();
            assert!(!apic.timer_armed());
            assert_eq!(apic.next_timer_deadline_ns(), None);
            apic.advance(10_000, 0);
            assert_eq!(apic.deliverable_vector(), None);
            assert_eq!(apic.read_msr(REG_TIMER_CURRENT, 10_000, 0), Ok(0));
        }
    }

    #[test]
    fn rewriting_initial_count_restarts_the_countdown() {
        let mut apic = timer(0, 0b1011);
        apic.write_msr(REG_TIMER_INITIAL, 100, 0, 0).unwrap();
        apic.write_msr(REG_TIMER_INITIAL, 100, 90, 0).unwrap();
        apic.advance(100, 0);
        assert_eq!(apic.deliverable_vector(), None);
        assert_eq!(apic.next_timer_deadline_ns(), Some(190));
    }

    #[test]
    fn changing_the_divider_keeps_the_current_count() {
        // Also early in system time, where the countdown's origin moves before time 0.
        for start in [0, 10_000] {
            let mut apic = timer(0, 0b1011); // divide by 1
            apic.write_msr(REG_TIMER_INITIAL, 1000, start, 0).unwrap();
            apic.write_msr(REG_TIMER_DIVIDE, 0b0000, start + 400, 0)
                .unwrap(); // divide by 2
            assert_eq!(apic.read_msr(REG_TIMER_CURRENT, start + 400, 0), Ok(600));
            assert_eq!(apic.read_msr(REG_TIMER_CURRENT, start + 600, 0), Ok(500));
            let fire = start + 400 + 600 * 2;
            assert_eq!(apic.next_timer_deadline_ns(), Some(fire));
            apic.advance(fire - 1, 0);
            assert_eq!(apic.deliverable_vector(), None);
            apic.advance(fire, 0);
            assert_eq!(apic.deliverable_vector(), Some(TIMER_VECTOR));
        }
    }

    #[test]
    fn masked_lvt_timer_does_not_set_irr() {
        for mode in [0, LVT_PERIODIC] {
            let mut apic = enabled_apic(0, GHZ);
            let masked = mode | (1 << 16) | u64::from(TIMER_VECTOR);
            apic.write_msr(REG_LVT_TIMER, masked, 0, 0).unwrap();
            apic.write_msr(REG_TIMER_DIVIDE, 0b1011, 0, 0).unwrap();
            apic.write_msr(REG_TIMER_INITIAL, 100, 0, 0).unwrap();
            assert!(!apic.timer_armed());
            assert_eq!(apic.next_timer_deadline_ns(), None);
            apic.advance(250, 0);
            assert!(!apic.is_pending(TIMER_VECTOR));
            // Unmasking later does not deliver the expiries that happened while masked.
            apic.write_msr(REG_LVT_TIMER, masked & !(1 << 16), 260, 0)
                .unwrap();
            assert_eq!(apic.deliverable_vector(), None);
            if mode == LVT_PERIODIC {
                assert_eq!(apic.next_timer_deadline_ns(), Some(300));
            } else {
                assert!(!apic.timer_armed(), "the one-shot expired while masked");
            }
        }
    }

    #[test]
    fn tsc_deadline_converts_with_tsc_hz() {
        let tsc_hz = 2_500_000_000; // 2.5 ticks per ns
        let mut apic = enabled_apic(0, tsc_hz);
        apic.write_msr(
            REG_LVT_TIMER,
            LVT_TSC_DEADLINE | u64::from(TIMER_VECTOR),
            0,
            0,
        )
        .unwrap();
        let (now_ns, now_tsc) = (1_000, 40_000);
        let deadline = now_tsc + 25_000; // 10 us later
        apic.write_msr(MSR_TSC_DEADLINE, deadline, now_ns, now_tsc)
            .unwrap();
        assert_eq!(
            apic.read_msr(MSR_TSC_DEADLINE, now_ns, now_tsc),
            Ok(deadline)
        );
        assert_eq!(apic.next_timer_deadline_ns(), Some(now_ns + 10_000));
        apic.advance(now_ns + 9_999, deadline - 1);
        assert_eq!(
            apic.deliverable_vector(),
            None,
            "not before the TSC reaches the deadline"
        );
        assert_eq!(
            apic.next_timer_deadline_ns(),
            Some(now_ns + 10_000),
            "the system time found at the write stands"
        );
        apic.advance(now_ns + 10_000, deadline);
        assert_eq!(apic.deliverable_vector(), Some(TIMER_VECTOR));
        assert_eq!(
            apic.read_msr(MSR_TSC_DEADLINE, now_ns + 10_000, deadline),
            Ok(0)
        );
        assert_eq!(apic.next_timer_deadline_ns(), None);
        assert_eq!(take_timer_interrupts(&mut apic), 1);
        apic.advance(u64::MAX, u64::MAX);
        assert_eq!(take_timer_interrupts(&mut apic), 0, "fires once");
    }

    #[test]
    fn tsc_deadline_rounds_up_to_whole_ns() {
        let tsc_hz = 3_000_000_000;
        for ticks in 1..100u64 {
            let mut apic = enabled_apic(0, tsc_hz);
            apic.write_msr(
                REG_LVT_TIMER,
                LVT_TSC_DEADLINE | u64::from(TIMER_VECTOR),
                0,
                0,
            )
            .unwrap();
            apic.write_msr(MSR_TSC_DEADLINE, ticks, 0, 0).unwrap();
            let ns = apic.next_timer_deadline_ns().unwrap();
            assert_eq!(ns, ticks.div_ceil(3), "{ticks} ticks");
            // The TSC at that system time, in a clock where ns = tsc / 3 rounded down.
            apic.advance(ns, ns * 3);
            assert_eq!(apic.deliverable_vector(), Some(TIMER_VECTOR));
        }
    }

    #[test]
    fn a_tsc_deadline_in_the_past_fires_at_once_and_zero_disarms() {
        let mut apic = enabled_apic(0, GHZ);
        apic.write_msr(
            REG_LVT_TIMER,
            LVT_TSC_DEADLINE | u64::from(TIMER_VECTOR),
            0,
            0,
        )
        .unwrap();
        apic.write_msr(MSR_TSC_DEADLINE, 5, 100, 100).unwrap();
        assert_eq!(apic.deliverable_vector(), Some(TIMER_VECTOR));
        assert_eq!(take_timer_interrupts(&mut apic), 1);
        apic.write_msr(MSR_TSC_DEADLINE, 500, 100, 100).unwrap();
        assert!(apic.timer_armed());
        apic.write_msr(MSR_TSC_DEADLINE, 0, 200, 200).unwrap();
        assert!(!apic.timer_armed());
        apic.advance(1_000, 1_000);
        assert_eq!(apic.deliverable_vector(), None);
    }

    #[test]
    fn tsc_deadline_msr_reads_zero_and_ignores_writes_outside_deadline_mode() {
        for mode in [0, LVT_PERIODIC] {
            let mut apic = timer(mode, 0b1011);
            apic.write_msr(MSR_TSC_DEADLINE, 1_000, 0, 0).unwrap();
            assert_eq!(apic.read_msr(MSR_TSC_DEADLINE, 0, 0), Ok(0));
            assert!(!apic.timer_armed());
            apic.write_msr(
                REG_LVT_TIMER,
                LVT_TSC_DEADLINE | u64::from(TIMER_VECTOR),
                0,
                0,
            )
            .unwrap();
            assert_eq!(
                apic.read_msr(MSR_TSC_DEADLINE, 0, 0),
                Ok(0),
                "the write was dropped"
            );
            // And in TSC-deadline mode the initial count is ignored, the current count reads 0.
            apic.write_msr(REG_TIMER_INITIAL, 100, 0, 0).unwrap();
            assert_eq!(apic.read_msr(REG_TIMER_INITIAL, 0, 0), Ok(0));
            assert_eq!(apic.read_msr(REG_TIMER_CURRENT, 0, 0), Ok(0));
            assert!(!apic.timer_armed());
        }
    }

    #[test]
    fn switching_to_or_from_tsc_deadline_mode_disarms_the_timer() {
        let vector = u64::from(TIMER_VECTOR);
        let mut apic = timer(0, 0b1011);
        apic.write_msr(REG_TIMER_INITIAL, 100, 0, 0).unwrap();
        apic.write_msr(REG_LVT_TIMER, LVT_TSC_DEADLINE | vector, 10, 10)
            .unwrap();
        assert!(!apic.timer_armed());
        apic.write_msr(MSR_TSC_DEADLINE, 1_000, 10, 10).unwrap();
        assert!(apic.timer_armed());
        apic.write_msr(REG_LVT_TIMER, LVT_PERIODIC | vector, 20, 20)
            .unwrap();
        assert!(!apic.timer_armed());
        apic.advance(5_000, 5_000);
        assert_eq!(apic.deliverable_vector(), None);
        // Back in TSC-deadline mode the old deadline is gone.
        apic.write_msr(REG_LVT_TIMER, LVT_TSC_DEADLINE | vector, 20, 20)
            .unwrap();
        assert_eq!(apic.read_msr(MSR_TSC_DEADLINE, 20, 20), Ok(0));
    }

    #[test]
    fn switching_between_one_shot_and_periodic_keeps_counting() {
        let vector = u64::from(TIMER_VECTOR);
        let mut apic = timer(0, 0b1011);
        apic.write_msr(REG_TIMER_INITIAL, 100, 0, 0).unwrap();
        apic.write_msr(REG_LVT_TIMER, LVT_PERIODIC | vector, 30, 0)
            .unwrap();
        assert_eq!(apic.next_timer_deadline_ns(), Some(100));
        apic.advance(100, 0);
        assert_eq!(take_timer_interrupts(&mut apic), 1);
        assert_eq!(apic.next_timer_deadline_ns(), Some(200));
        apic.write_msr(REG_LVT_TIMER, vector, 150, 0).unwrap();
        apic.advance(200, 0);
        assert_eq!(take_timer_interrupts(&mut apic), 1);
        assert!(
            !apic.timer_armed(),
            "one-shot again: done after this expiry"
        );
    }

    #[test]
    fn eoi_clears_the_highest_isr_bit() {
        let mut apic = enabled_apic(0, GHZ);
        for vector in [0x31, 0x80, 0x45] {
            apic.raise(vector);
            apic.acknowledge(vector);
        }
        let steps: [(u8, &[u8]); 3] = [(0x80, &[0x31, 0x45]), (0x45, &[0x31]), (0x31, &[])];
        for (highest, rest) in steps {
            assert!(apic.is_in_service(highest));
            apic.write_msr(REG_EOI, 0, 0, 0).unwrap();
            assert!(!apic.is_in_service(highest));
            for &vector in rest {
                assert!(apic.is_in_service(vector), "{vector:#x} stays in service");
            }
        }
        apic.write_msr(REG_EOI, 0, 0, 0).unwrap(); // empty ISR: nothing happens
    }

    #[test]
    fn the_highest_vector_follows_every_set_and_clear() {
        // The summary of non-empty words must agree with a scan of all 256 bits.
        let scan = |set: &VectorSet| (0..=255u8).rev().find(|&v| set.contains(v));
        let mut set = VectorSet::default();
        let mut state = 0x2545_f491u32;
        for _ in 0..4000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let vector = (state >> 8) as u8;
            if state & 1 == 0 {
                set.set(vector);
            } else {
                set.clear(vector);
            }
            assert_eq!(set.highest(), scan(&set), "after vector {vector:#x}");
        }
        for vector in 0..=255u8 {
            set.clear(vector);
        }
        assert_eq!((set.highest(), set), (None, VectorSet::default()));
    }

    #[test]
    fn isr_and_irr_read_as_eight_32_bit_words() {
        let mut apic = enabled_apic(0, GHZ);
        for vector in 16..=255u8 {
            apic.raise(vector);
            let word = u32::from(vector >> 5);
            let bit = 1u64 << (vector & 31);
            assert_ne!(apic.read_msr(REG_IRR0 + word, 0, 0).unwrap() & bit, 0);
            apic.acknowledge(vector);
            assert_eq!(apic.read_msr(REG_IRR0 + word, 0, 0).unwrap() & bit, 0);
            assert_ne!(apic.read_msr(REG_ISR0 + word, 0, 0).unwrap() & bit, 0);
        }
        assert_eq!(apic.read_msr(REG_ISR0, 0, 0), Ok(0xffff_0000));
        assert_eq!(apic.read_msr(REG_ISR7, 0, 0), Ok(0xffff_ffff));
        for msr in REG_TMR0..=REG_TMR7 {
            assert_eq!(apic.read_msr(msr, 0, 0), Ok(0));
        }
    }

    #[test]
    fn ppr_is_the_tpr_or_the_in_service_class_whichever_is_higher() {
        for tpr in 0..=255u8 {
            for isrv in [None, Some(0x20u8), Some(0x5f), Some(0xa3), Some(0xff)] {
                let mut apic = enabled_apic(0, GHZ);
                apic.write_msr(REG_TPR, u64::from(tpr), 0, 0).unwrap();
                if let Some(vector) = isrv {
                    apic.raise(vector);
                    apic.acknowledge(vector);
                }
                let isrv = isrv.unwrap_or(0);
                let expected = if tpr >> 4 >= isrv >> 4 {
                    tpr
                } else {
                    isrv & 0xf0
                };
                assert_eq!(apic.read_msr(REG_PPR, 0, 0), Ok(u64::from(expected)));
            }
        }
    }

    #[test]
    fn tpr_masks_vectors_of_its_class_and_below() {
        for tpr in 0..=255u8 {
            for vector in 16..=255u8 {
                let mut apic = enabled_apic(0, GHZ);
                apic.write_msr(REG_TPR, u64::from(tpr), 0, 0).unwrap();
                apic.raise(vector);
                let expected = (vector >> 4 > tpr >> 4).then_some(vector);
                assert_eq!(
                    apic.deliverable_vector(),
                    expected,
                    "TPR {tpr:#x} vector {vector:#x}"
                );
            }
        }
    }

    #[test]
    fn an_in_service_vector_masks_its_class_until_eoi() {
        let mut apic = enabled_apic(0, GHZ);
        apic.raise(0x65);
        apic.acknowledge(0x65);
        apic.raise(0x61);
        apic.raise(0x6f);
        assert_eq!(
            apic.deliverable_vector(),
            None,
            "same class as the one in service"
        );
        apic.raise(0x70);
        assert_eq!(
            apic.deliverable_vector(),
            Some(0x70),
            "a higher class nests"
        );
        apic.write_msr(REG_EOI, 0, 0, 0).unwrap();
        assert_eq!(apic.deliverable_vector(), Some(0x70));
        apic.acknowledge(0x70);
        apic.write_msr(REG_EOI, 0, 0, 0).unwrap();
        assert_eq!(apic.deliverable_vector(), Some(0x6f));
    }

    #[test]
    fn cr8_is_the_tpr_class() {
        let mut apic = enabled_apic(0, GHZ);
        apic.write_msr(REG_TPR, 0x5a, 0, 0).unwrap();
        assert_eq!(apic.cr8(), 5);
        apic.write_cr8(0xc).unwrap();
        assert_eq!(apic.read_msr(REG_TPR, 0, 0), Ok(0xc0));
        assert_eq!(apic.write_cr8(0x10), Err(ApicFault));
    }

    #[test]
    fn a_software_disabled_apic_delivers_nothing() {
        let mut apic = VirtualLapic::new(0, GHZ, GHZ);
        apic.raise(0x40);
        apic.write_msr(REG_SELF_IPI, 0x41, 0, 0).unwrap();
        assert_eq!(apic.deliverable_vector(), None);
        // Unmasking an LVT entry is ignored while disabled; the timer cannot fire.
        apic.write_msr(REG_LVT_TIMER, u64::from(TIMER_VECTOR), 0, 0)
            .unwrap();
        assert_eq!(
            apic.read_msr(REG_LVT_TIMER, 0, 0),
            Ok((1 << 16) | u64::from(TIMER_VECTOR))
        );
        apic.write_msr(REG_TIMER_INITIAL, 10, 0, 0).unwrap();
        assert!(!apic.timer_armed());
        apic.advance(1_000, 0);
        assert_eq!(apic.deliverable_vector(), None);

        // Enabled: interrupts flow; disabled again: pending ones are held, none delivered, and
        // every LVT entry is masked.
        apic.write_msr(REG_SVR, 0x1ff, 1_000, 0).unwrap();
        apic.write_msr(REG_LVT_TIMER, u64::from(TIMER_VECTOR), 1_000, 0)
            .unwrap();
        apic.raise(0x40);
        assert_eq!(apic.deliverable_vector(), Some(0x40));
        apic.write_msr(REG_SVR, 0xff, 1_000, 0).unwrap();
        assert_eq!(apic.deliverable_vector(), None);
        assert!(apic.is_pending(0x40));
        for msr in REG_LVT_TIMER..=REG_LVT_ERROR {
            assert_ne!(apic.read_msr(msr, 1_000, 0).unwrap() & (1 << 16), 0);
        }
    }

    #[test]
    fn self_ipis_raise_their_vector() {
        let mut apic = enabled_apic(0x23, GHZ);
        apic.write_msr(REG_SELF_IPI, 0x51, 0, 0).unwrap();
        assert!(apic.is_pending(0x51));
        let sends_to_self = [
            (1 << 18) | 0x52,                       // shorthand self
            (2 << 18) | 0x53,                       // all including self
            (0x23 << 32) | 0x54,                    // physical, own ID
            (0xffff_ffff << 32) | 0x55,             // physical broadcast
            (0x0002_0008 << 32) | (1 << 11) | 0x56, // logical: cluster 2, bit 3
        ];
        for icr in sends_to_self {
            apic.write_msr(REG_ICR, icr, 0, 0).unwrap();
            assert!(apic.is_pending(icr as u8), "ICR {icr:#x}");
        }
        let elsewhere = [
            (3 << 18) | 0x60,                       // all excluding self
            (0x24 << 32) | 0x61,                    // another vCPU
            (0x0002_0004 << 32) | (1 << 11) | 0x62, // logical, other bit in the cluster
            (0x0001_0008 << 32) | (1 << 11) | 0x63, // logical, other cluster
            (1 << 18) | (4 << 8) | 0x64,            // NMI to self: not modelled
            (1 << 18) | (5 << 8) | 0x65,            // INIT
        ];
        for icr in elsewhere {
            apic.write_msr(REG_ICR, icr, 0, 0).unwrap();
            assert!(!apic.is_pending(icr as u8), "ICR {icr:#x}");
        }
    }

    /// The IPI an ICR write of `icr` on APIC `sender` sends to other APICs.
    fn sent(sender: u32, icr: u64) -> Option<Ipi> {
        let mut apic = enabled_apic(sender, GHZ);
        apic.write_msr(REG_ICR, icr, 0, 0).unwrap()
    }

    /// The IDs among 0..40 that an IPI reaches.
    fn reached(ipi: Ipi) -> Vec<u32> {
        (0..40)
            .filter(|&id| ipi.reaches(&VirtualLapic::new(id, GHZ, GHZ)))
            .collect()
    }

    #[test]
    fn fixed_ipis_reach_other_apics_by_id_cluster_broadcast_and_shorthand() {
        let vector = 0x40u64;
        let cases: [(u64, &[u32]); 8] = [
            ((3 << 32) | vector, &[3]),                            // physical ID 3
            ((39 << 32) | vector, &[39]),                          // physical ID 39
            ((0xffff_ffff << 32) | vector, &[0, 2, 3]),            // broadcast (first few)
            ((2 << 18) | vector, &[0, 2, 3]),                      // all including self
            ((3 << 18) | vector, &[0, 2, 3]),                      // all excluding self
            ((0x0000_0009 << 32) | ICR_LOGICAL | vector, &[0, 3]), // cluster 0, bits 0 and 3
            ((0x0002_0001 << 32) | ICR_LOGICAL | vector, &[32]),   // cluster 2, bit 0
            ((0x0001_0000 << 32) | ICR_LOGICAL | vector, &[]),     // an empty bitmap
        ];
        for (icr, expected) in cases {
            let ipi = sent(1, icr).unwrap_or_else(|| panic!("ICR {icr:#x} sent nothing"));
            assert_eq!(ipi.kind, IpiKind::Fixed(0x40), "ICR {icr:#x}");
            let reached = reached(ipi);
            let prefix = &reached[..expected.len().min(reached.len())];
            assert_eq!(prefix, expected, "ICR {icr:#x}");
            assert!(!reached.contains(&1), "never the sender: ICR {icr:#x}");
            if icr >> 32 != 0xffff_ffff && icr >> 18 & 3 == 0 {
                assert_eq!(reached, expected, "exactly: ICR {icr:#x}");
            }
        }
        // Broadcast and the all shorthands reach every other APIC.
        for icr in [
            (0xffff_ffff << 32) | vector,
            (2 << 18) | vector,
            (3 << 18) | vector,
        ] {
            assert_eq!(reached(sent(1, icr).unwrap()).len(), 39, "ICR {icr:#x}");
        }
    }

    #[test]
    fn a_fixed_ipi_to_another_apic_leaves_the_senders_irr_alone() {
        let mut apic = enabled_apic(1, GHZ);
        apic.write_msr(REG_ICR, (2 << 32) | 0x41, 0, 0).unwrap();
        apic.write_msr(REG_ICR, (3 << 18) | 0x42, 0, 0).unwrap();
        assert_eq!(apic.deliverable_vector(), None);
        // All including self: the sender takes its part and the rest goes out.
        let ipi = apic.write_msr(REG_ICR, (2 << 18) | 0x43, 0, 0).unwrap();
        assert!(apic.is_pending(0x43));
        assert!(ipi.is_some_and(|ipi| ipi.reaches(&VirtualLapic::new(0, GHZ, GHZ))));
    }

    #[test]
    fn self_only_ipis_send_nothing_to_others() {
        for icr in [
            (1 << 18) | 0x50,
            (1 << 18) | (5 << 8),
            (1 << 18) | (6 << 8) | 0x10,
        ] {
            assert_eq!(sent(4, icr), None, "ICR {icr:#x}");
        }
        let mut apic = enabled_apic(4, GHZ);
        assert_eq!(apic.write_msr(REG_SELF_IPI, 0x51, 0, 0), Ok(None));
        // Its own ID only: an IPI that reaches no other APIC.
        let ipi = apic
            .write_msr(REG_ICR, (4 << 32) | 0x52, 0, 0)
            .unwrap()
            .unwrap();
        assert!(apic.is_pending(0x52));
        assert_eq!(reached(ipi), Vec::<u32>::new());
    }

    #[test]
    fn init_and_startup_are_decoded_and_never_act_on_the_sender() {
        let mut apic = enabled_apic(0, GHZ);
        // INIT assert, level-triggered as Linux sends it, and edge-triggered.
        for icr in [
            (1 << 32) | (1 << 15) | (1 << 14) | (5 << 8),
            (1 << 32) | (5 << 8),
        ] {
            let ipi = apic.write_msr(REG_ICR, icr, 0, 0).unwrap().unwrap();
            assert_eq!(ipi.kind, IpiKind::Init, "ICR {icr:#x}");
            assert_eq!(reached(ipi), [1]);
        }
        for vector in [0u8, 0x0b, 0x9f, 0xff] {
            let icr = (2 << 32) | (6 << 8) | u64::from(vector);
            let ipi = apic.write_msr(REG_ICR, icr, 0, 0).unwrap().unwrap();
            assert_eq!(ipi.kind, IpiKind::Startup(vector));
            assert_eq!(reached(ipi), [2]);
        }
        let all_but_self = apic
            .write_msr(REG_ICR, (3 << 18) | (6 << 8) | 0x0c, 0, 0)
            .unwrap()
            .unwrap();
        assert_eq!(all_but_self.kind, IpiKind::Startup(0x0c));
        assert_eq!(reached(all_but_self).len(), 39);
        // Neither is a fixed interrupt: nothing pending, no APIC error, even with vectors
        // below 16 (a SIPI vector is a page number).
        assert_eq!(apic.deliverable_vector(), None);
        apic.write_msr(REG_ESR, 0, 0, 0).unwrap();
        assert_eq!(apic.read_msr(REG_ESR, 0, 0), Ok(0));
    }

    #[test]
    fn init_deassert_nmi_smi_and_reserved_modes_send_nothing() {
        let cases = [
            (1 << 32) | (1 << 15) | (5 << 8), // INIT level de-assert
            (1 << 32) | (4 << 8) | 0x20,      // NMI
            (1 << 32) | (2 << 8),             // SMI
            (1 << 32) | (3 << 8) | 0x20,      // reserved
            (1 << 32) | (7 << 8) | 0x20,      // reserved (ExtINT)
            (1 << 32) | (1 << 8) | 0x20,      // lowest priority: an APIC error
        ];
        for icr in cases {
            assert_eq!(sent(0, icr), None, "ICR {icr:#x}");
        }
    }

    #[test]
    fn a_fixed_ipi_with_an_illegal_vector_is_an_error_at_both_ends() {
        let mut sender = enabled_apic(0, GHZ);
        let ipi = sender
            .write_msr(REG_ICR, (1 << 32) | 0x0e, 0, 0)
            .unwrap()
            .unwrap();
        sender.write_msr(REG_ESR, 0, 0, 0).unwrap();
        assert_eq!(
            sender.read_msr(REG_ESR, 0, 0),
            Ok(0x20),
            "send illegal vector"
        );
        let IpiKind::Fixed(vector) = ipi.kind else {
            panic!("{ipi:?}");
        };
        let mut target = enabled_apic(1, GHZ);
        target.raise(vector);
        assert_eq!(target.read_msr(REG_IRR0, 0, 0), Ok(0));
        target.write_msr(REG_ESR, 0, 0, 0).unwrap();
        assert_eq!(
            target.read_msr(REG_ESR, 0, 0),
            Ok(0x40),
            "receive illegal vector"
        );
    }

    #[test]
    fn illegal_vectors_are_logged_in_esr_and_dropped() {
        let mut apic = enabled_apic(0, GHZ);
        apic.raise(15);
        apic.write_msr(REG_SELF_IPI, 3, 0, 0).unwrap();
        assert_eq!(apic.read_msr(REG_IRR0, 0, 0), Ok(0));
        assert_eq!(
            apic.read_msr(REG_ESR, 0, 0),
            Ok(0),
            "latched only by an ESR write"
        );
        apic.write_msr(REG_ESR, 0, 0, 0).unwrap();
        assert_eq!(
            apic.read_msr(REG_ESR, 0, 0),
            Ok(0x60),
            "send and receive illegal vector"
        );
        apic.write_msr(REG_ESR, 0, 0, 0).unwrap();
        assert_eq!(apic.read_msr(REG_ESR, 0, 0), Ok(0));
        // Lowest-priority delivery does not exist in x2APIC mode: redirectible IPI error.
        apic.write_msr(REG_ICR, (1 << 18) | (1 << 8) | 0x40, 0, 0)
            .unwrap();
        assert!(!apic.is_pending(0x40));
        apic.write_msr(REG_ESR, 0, 0, 0).unwrap();
        assert_eq!(apic.read_msr(REG_ESR, 0, 0), Ok(0x10));
    }

    #[test]
    fn an_unmasked_error_lvt_signals_apic_errors() {
        let mut apic = enabled_apic(0, GHZ);
        apic.write_msr(REG_LVT_ERROR, 0xfe, 0, 0).unwrap();
        apic.raise(7);
        assert_eq!(apic.deliverable_vector(), Some(0xfe));
    }

    #[test]
    fn hostile_register_traffic_never_panics() {
        // A cheap xorshift generator: every MSR of the range with arbitrary values and times.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let interesting = [
            0,
            1,
            0xff,
            0x100,
            1 << 16,
            1 << 17,
            2 << 17,
            3 << 17,
            u64::MAX,
        ];
        for round in 0..20_000 {
            let mut apic = VirtualLapic::new(round % 3, next() % 4_000_000_000, next());
            let mut now_ns = next() % 1000;
            for _ in 0..8 {
                let msr = match next() % 4 {
                    0 => MSR_TSC_DEADLINE,
                    1 => REG_LVT_TIMER + (next() % 8) as u32,
                    _ => 0x800 + (next() % 0x100) as u32,
                };
                let value = if next() % 2 == 0 {
                    interesting[(next() % interesting.len() as u64) as usize]
                } else {
                    next() >> (next() % 64)
                };
                now_ns = now_ns.wrapping_add(next() >> (next() % 64));
                let now_tsc = next();
                let _ = apic.write_msr(msr, value, now_ns, now_tsc);
                let _ = apic.read_msr(msr, now_ns, now_tsc);
                apic.advance(now_ns, now_tsc);
                if let Some(deadline) = apic.next_timer_deadline_ns() {
                    apic.advance(deadline, u64::MAX);
                }
                if let Some(vector) = apic.deliverable_vector() {
                    apic.acknowledge(vector);
                }
            }
        }
    }
}

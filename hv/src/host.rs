//! The scheduler's view of this machine ([`Host`]): system time from the TSC, the local APIC
//! timer as the one host timer, and halting until an interrupt. The glue between `platform`
//! (which knows nothing of virtualization) and `common` (which knows nothing of the machine).

use crate::common::sched::Host;
use crate::common::time::TimeBase;
use crate::common::time::read_tsc;
use crate::platform::apic;

/// How often waiting console output is moved into the UART.
const OUTPUT_PUMP_NS: u64 = 1_000_000;

/// This machine, as the scheduler uses it.
pub struct MachineHost {
    time: TimeBase,
    apic_timer_hz: u64,
    /// The deadline the APIC timer is armed for (None: not armed or already fired).
    armed: Option<u64>,
    /// This CPU serves the serial console (the boot CPU).
    console: bool,
    /// When [`Host::housekeeping`] last wanted to be called again.
    work_due: Option<u64>,
}

impl MachineHost {
    /// A host whose clock is `time` and whose APIC timer ticks at `apic_timer_hz`.
    pub fn new(time: TimeBase, apic_timer_hz: u64) -> Self {
        MachineHost {
            time,
            apic_timer_hz,
            armed: None,
            console: true,
            work_due: None,
        }
    }

    /// The host of a CPU other than the boot CPU: its own APIC timer, no serial console.
    pub fn for_other_cpu(time: TimeBase, apic_timer_hz: u64) -> Self {
        MachineHost {
            console: false,
            ..Self::new(time, apic_timer_hz)
        }
    }

    /// The APIC timer's rate.
    pub fn apic_timer_hz(&self) -> u64 {
        self.apic_timer_hz
    }

    /// Whether the armed timer has yet to fire: a one-shot APIC timer's count stays at 0 once
    /// it fired (Intel SDM Vol. 3A 12.5.4), whether or not its interrupt was taken yet (one
    /// that fired while interrupts were off is still pending, and `armed` still set).
    fn still_counting(&self) -> bool {
        apic::timer_count() != 0
    }

    /// Programs the APIC timer for `deadline` (`None`: stops it).
    fn program(&mut self, deadline: Option<u64>) {
        self.armed = deadline;
        let Some(deadline) = deadline else {
            apic::arm_one_shot(0);
            return;
        };
        let delay = u128::from(deadline.saturating_sub(self.now_ns()));
        let ticks = (delay * u128::from(self.apic_timer_hz)).div_ceil(1_000_000_000);
        // A due deadline fires at once; a far one fires early and the scheduler re-arms.
        apic::arm_one_shot(ticks.clamp(1, u128::from(u32::MAX)) as u32);
    }

    fn after_interrupts(&mut self) {
        if apic::take_timer_fired() {
            self.armed = None;
        }
    }
}

impl Host for MachineHost {
    fn now_ns(&self) -> u64 {
        self.time.ns_at(read_tsc())
    }

    fn arm_timer(&mut self, deadline: Option<u64>) {
        if deadline == self.armed && (deadline.is_none() || self.still_counting()) {
            return;
        }
        self.program(deadline);
    }

    fn arm_timer_within(&mut self, earliest: u64, deadline: u64) {
        if self
            .armed
            .is_some_and(|armed| (earliest..=deadline).contains(&armed))
            && self.still_counting()
        {
            return;
        }
        self.program(Some(deadline));
    }

    fn wait_for_interrupt(&mut self) {
        // STI's one-instruction shadow makes `sti; hlt` wait without missing a wake-up.
        // SAFETY: the IDT handles every vector the APIC can deliver; interrupts go off again
        // before anything else runs.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
        self.after_interrupts();
    }

    fn console_input(&mut self) -> Option<u8> {
        if !self.console {
            return None;
        }
        crate::platform::serial::SERIAL.lock().try_receive()
    }

    fn housekeeping(&mut self) -> Option<u64> {
        if !self.console {
            return None;
        }
        let mut serial = crate::platform::serial::SERIAL.lock();
        serial.pump();
        // 16 bytes leave the FIFO in 1.4 ms at 115200 baud: come back in 1 ms to refill it.
        self.work_due = serial
            .has_pending_output()
            .then(|| self.now_ns() + OUTPUT_PUMP_NS);
        self.work_due
    }

    fn work_due(&self) -> Option<u64> {
        self.work_due
    }

    fn work_in_slice(&mut self) {
        let _ = self.housekeeping();
    }

    fn service_interrupts(&mut self) {
        // SAFETY: as above; the NOP gives a pending interrupt its chance after STI's shadow.
        unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
        self.after_interrupts();
    }
}

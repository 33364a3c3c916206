//! A small preemptive kernel: a few tasks with their own stacks, run round-robin, woken by a
//! timer tick on a fixed grid, and an idle loop that waits through the idle group.
//!
//! Every task switch happens on the way out of an interrupt, in the SDK's switch hook
//! ([`lamina_guest_sdk::interrupts::set_switch_hook`]): the timer's (through the x2APIC or
//! the event upcall, whichever the timer group uses) and a software interrupt, `int 0x81`,
//! that a task or the idle loop raises to give up the CPU. So there is one way to save and
//! restore a task, the `TrapFrame` the interrupt stub builds, and a new task starts from a
//! frame made by [`interrupts::new_thread_frame`].
//!
//! Scheduling: a task runs one step, then sleeps until its next grid tick (`k * period`).
//! The tick handler counts ticks, wakes the tasks whose grid tick has come and asks for a
//! reschedule; the hook then resumes the next runnable task after the one that ran last, or
//! the idle loop when none is runnable. What each task computes depends only on how many
//! grid ticks it saw, not on how fast the machine is, so the results are the same in every
//! mode, even if a slow exit makes two ticks arrive as one.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use lamina_guest_sdk::interrupts::{self, TrapFrame};
use lamina_guest_sdk::pvops::{self, TimerError};

/// Tick period.
pub(crate) const TICK_NS: u64 = 1_000_000;
/// Ticks the kernel runs for; the timer stops at the last one.
pub(crate) const TICKS: u64 = 20;
/// The software interrupt that gives up the CPU.
const YIELD_VECTOR: u8 = 0x81;
/// Stack of each task.
const STACK_BYTES: usize = 16 * 1024;

/// What a task is: its name, how often it runs, and one step of its work.
pub(crate) struct TaskSpec {
    /// For reports.
    pub(crate) name: &'static str,
    /// It runs at ticks `0, period, 2 * period, ...`.
    pub(crate) period_ticks: u64,
    /// One step; `run` counts from 0.
    pub(crate) step: fn(run: u64),
}

/// Number of tasks.
pub(crate) const TASK_COUNT: usize = crate::tasks::TASKS.len();

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Runnable,
    Sleeping,
}

#[derive(Clone, Copy, Debug)]
struct Task {
    state: State,
    /// The grid tick of its next run.
    next_wake: u64,
    /// Steps it has finished.
    runs: u64,
    /// Where it was interrupted (or starts).
    frame: *mut TrapFrame,
}

/// The scheduler's state.
struct Kernel {
    tasks: [Task; TASK_COUNT],
    /// The running task; `None` is the idle loop.
    current: Option<usize>,
    /// Where the idle loop was interrupted.
    idle_frame: *mut TrapFrame,
    /// The task that ran last, where round-robin continues.
    last_run: usize,
    /// Ticks counted, at most [`TICKS`].
    ticks: u64,
    /// Set by the tick: pick again even if the current task could go on.
    need_resched: bool,
    /// Whether the switch hook schedules (only between start and end of `run`).
    scheduling: bool,
    /// Task switches made.
    switches: u64,
    /// Ticks that arrived after the last one (the stop takes effect after one more at most).
    late_ticks: u64,
}

impl Kernel {
    const fn new() -> Kernel {
        Kernel {
            tasks: [Task {
                state: State::Runnable,
                next_wake: 0,
                runs: 0,
                frame: core::ptr::null_mut(),
            }; TASK_COUNT],
            current: None,
            idle_frame: core::ptr::null_mut(),
            last_run: TASK_COUNT - 1,
            ticks: 0,
            need_resched: false,
            scheduling: false,
            switches: 0,
            late_ticks: 0,
        }
    }

    /// Counts a tick and wakes the tasks whose grid tick has come. Returns whether it was the
    /// last one.
    fn tick(&mut self) -> bool {
        if self.ticks == TICKS {
            self.late_ticks += 1;
            return false;
        }
        self.ticks += 1;
        for task in &mut self.tasks {
            if task.state == State::Sleeping && task.next_wake <= self.ticks {
                task.state = State::Runnable;
            }
        }
        self.need_resched = true;
        self.ticks == TICKS
    }

    /// The running task finished a step: it sleeps until its next grid tick (or runs again at
    /// once if that tick has already come).
    fn finish_step(&mut self, index: usize) {
        let period = crate::tasks::TASKS[index].period_ticks;
        let task = &mut self.tasks[index];
        task.runs += 1;
        task.next_wake += period;
        if task.next_wake > self.ticks {
            task.state = State::Sleeping;
        }
    }

    fn any_runnable(&self) -> bool {
        self.tasks.iter().any(|task| task.state == State::Runnable)
    }

    /// Every tick came and every task sleeps: nothing will ever run again.
    fn done(&self) -> bool {
        self.ticks == TICKS && !self.any_runnable()
    }

    /// The switch hook's work: saves `frame` as the current context's, picks what runs next,
    /// returns its frame.
    fn switch(&mut self, frame: *mut TrapFrame) -> *mut TrapFrame {
        if !self.scheduling {
            return frame;
        }
        match self.current {
            Some(index) => self.tasks[index].frame = frame,
            None => self.idle_frame = frame,
        }
        let current_can_go_on = self
            .current
            .is_some_and(|index| self.tasks[index].state == State::Runnable);
        if current_can_go_on && !self.need_resched {
            return frame;
        }
        self.need_resched = false;
        let next = (1..=TASK_COUNT)
            .map(|offset| (self.last_run + offset) % TASK_COUNT)
            .find(|&index| self.tasks[index].state == State::Runnable);
        let (next, resumed) = match next {
            Some(index) => {
                self.last_run = index;
                (Some(index), self.tasks[index].frame)
            }
            None => (None, self.idle_frame),
        };
        if next != self.current {
            self.switches += 1;
        }
        self.current = next;
        resumed
    }
}

/// Kernel state shared by tasks and interrupt handlers: used with interrupts off, and
/// re-entry (an exception inside) is caught rather than aliased.
struct KernelCell {
    busy: AtomicBool,
    kernel: UnsafeCell<Kernel>,
}

// SAFETY: one vCPU; `with` runs with interrupts off and refuses re-entry, so at most one
// `&mut Kernel` exists at a time.
unsafe impl Sync for KernelCell {}

impl KernelCell {
    fn with<R>(&self, f: impl FnOnce(&mut Kernel) -> R) -> R {
        interrupts::without(|| {
            assert!(
                !self.busy.swap(true, Ordering::Acquire),
                "kernel state re-entered"
            );
            // SAFETY: interrupts are off and `busy` was clear: nobody else holds a reference.
            let result = f(unsafe { &mut *self.kernel.get() });
            self.busy.store(false, Ordering::Release);
            result
        })
    }
}

static KERNEL: KernelCell = KernelCell {
    busy: AtomicBool::new(false),
    kernel: UnsafeCell::new(Kernel::new()),
};

/// The tasks' stacks.
#[repr(C, align(16))]
struct Stacks(UnsafeCell<[[u8; STACK_BYTES]; TASK_COUNT]>);

// SAFETY: each stack is used by its task only, and only through the frames built on it.
unsafe impl Sync for Stacks {}

static STACKS: Stacks = Stacks(UnsafeCell::new([[0; STACK_BYTES]; TASK_COUNT]));

fn stack_top(index: usize) -> u64 {
    STACKS.0.get() as u64 + ((index + 1) * STACK_BYTES) as u64
}

/// Gives up the CPU: the switch hook runs on the way out of the software interrupt.
fn yield_cpu() {
    // SAFETY: the SDK's IDT handles YIELD_VECTOR (`run` installed it); the stub saves and
    // restores every register.
    unsafe { core::arch::asm!("int {}", const YIELD_VECTOR) };
}

/// The yield interrupt has nothing to do itself: the switch hook does the work.
fn on_yield(_frame: &mut TrapFrame) {}

fn switch_hook(frame: *mut TrapFrame) -> *mut TrapFrame {
    KERNEL.with(|kernel| kernel.switch(frame))
}

/// The timer group's tick (interrupt context).
fn on_tick() {
    if KERNEL.with(Kernel::tick)
        && let Err(error) = pvops::timer().stop()
    {
        panic!("cannot stop the timer: {error}");
    }
}

/// Where every task starts: steps, sleeps, forever.
extern "sysv64" fn task_main(index: u64) -> ! {
    let index = index as usize;
    let spec = &crate::tasks::TASKS[index];
    loop {
        let run = KERNEL.with(|kernel| kernel.tasks[index].runs);
        (spec.step)(run);
        KERNEL.with(|kernel| kernel.finish_step(index));
        yield_cpu();
    }
}

/// What a run of the kernel measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Report {
    /// Ticks counted.
    pub(crate) ticks: u64,
    /// Steps each task ran.
    pub(crate) runs: [u64; TASK_COUNT],
    /// Task switches.
    pub(crate) switches: u64,
    /// Ticks after the last.
    pub(crate) late_ticks: u64,
    /// Time from starting the timer to the end, by the time group's clock.
    pub(crate) elapsed_ns: u64,
}

/// Runs the tasks for [`TICKS`] ticks with the selected backends, then returns with
/// interrupts off.
pub(crate) fn run() -> Result<Report, TimerError> {
    interrupts::init();
    interrupts::set_handler(YIELD_VECTOR, on_yield);
    KERNEL.with(|kernel| {
        for (index, task) in kernel.tasks.iter_mut().enumerate() {
            // SAFETY: each task's stack is its own and not in use yet.
            task.frame =
                unsafe { interrupts::new_thread_frame(stack_top(index), task_main, index as u64) };
        }
        kernel.scheduling = true;
    });
    // SAFETY: the hook returns the interrupted frame or one saved by the stubs or built above,
    // each on its own task's stack, and never one that is running.
    unsafe { interrupts::set_switch_hook(Some(switch_hook)) };

    let start_ns = pvops::clock().now_ns();
    pvops::timer().start_periodic(TICK_NS, on_tick)?;
    // The idle loop: run tasks while any can; otherwise wait for the next tick.
    loop {
        interrupts::disable();
        let (done, runnable) = KERNEL.with(|kernel| (kernel.done(), kernel.any_runnable()));
        if done {
            break;
        }
        if runnable {
            yield_cpu();
        } else {
            // Returns with interrupts on once the tick (or another event) was handled.
            pvops::idle().idle();
        }
    }
    let elapsed_ns = pvops::clock().now_ns() - start_ns;

    // SAFETY: removing the hook leaves every frame where it is; nothing resumes them.
    unsafe { interrupts::set_switch_hook(None) };
    Ok(KERNEL.with(|kernel| {
        kernel.scheduling = false;
        Report {
            ticks: kernel.ticks,
            runs: kernel.tasks.map(|task| task.runs),
            switches: kernel.switches,
            late_ticks: kernel.late_ticks,
            elapsed_ns,
        }
    }))
}

/// Steps a task with `period_ticks` runs in [`TICKS`] ticks: one per grid tick `0..=TICKS`.
pub(crate) const fn expected_runs(period_ticks: u64) -> u64 {
    TICKS / period_ticks + 1
}

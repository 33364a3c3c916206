//! Running an ISO under an emulator and watching its serial console.
//!
//! Both emulators write COM1 to `serial.log` in the run directory; we follow that file while the
//! emulator runs (streaming complete lines to stdout if asked), and stop as soon as the
//! hypervisor's result line has appeared and the emulator has exited. An emulator that lingers
//! after the result line is killed after [`LINGER_AFTER_RESULT`]; one that produces no result line
//! within the timeout is killed and the run reported as a timeout.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Context, Result};
use crate::iso::{self, BootModule};
use crate::serial_log::{self, SerialLog};
use crate::workspace::Artifact;
use crate::{bochs, qemu};

/// How long an emulator may keep running after the result line before we kill it (the
/// hypervisor ends the emulator itself right after printing it).
const LINGER_AFTER_RESULT: Duration = Duration::from_secs(3);
/// How often we look at the serial log and the emulator.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Which hardware virtualization extension a run exercises, and thus which emulator runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Vendor {
    /// AMD-V (SVM + NPT) under QEMU TCG.
    Amd,
    /// Intel VT-x (VMX + EPT) under Bochs.
    Intel,
}

impl Vendor {
    pub const ALL: [Vendor; 2] = [Vendor::Amd, Vendor::Intel];

    pub fn name(self) -> &'static str {
        match self {
            Vendor::Amd => "amd",
            Vendor::Intel => "intel",
        }
    }

    /// The default wall-clock limit for one run: BIOS + GRUB take under 1 s on QEMU and about
    /// 2 s on Bochs; the rest is for the hypervisor and its guests.
    pub fn default_timeout(self) -> Duration {
        match self {
            Vendor::Amd => Duration::from_secs(60),
            Vendor::Intel => Duration::from_secs(120),
        }
    }
}

/// Where serial output goes besides the log file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Streaming {
    Off,
    /// Each line as it arrives, unchanged.
    Plain,
    /// Each line as it arrives, after this prefix (for runs in parallel).
    Prefixed(String),
}

/// The files of one emulator run, all in one directory.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn new(path: PathBuf) -> Self {
        RunDir { path }
    }
    pub fn iso(&self) -> PathBuf {
        self.path.join(Self::ISO)
    }
    pub fn staging(&self) -> PathBuf {
        self.path.join("iso-root")
    }
    pub fn serial_log(&self) -> PathBuf {
        self.path.join(Self::SERIAL_LOG)
    }
    /// The emulator's own stdout and stderr.
    pub fn emulator_output(&self) -> PathBuf {
        self.path.join("emulator.out")
    }
    /// The emulator's command line, for running it again by hand.
    pub fn command_file(&self) -> PathBuf {
        self.path.join("emulator.cmd")
    }

    /// File names the emulators get relative to the run directory (their working directory),
    /// so that no path ends up inside QEMU's comma-separated option syntax.
    pub const ISO: &str = "image.iso";
    pub const SERIAL_LOG: &str = "serial.log";
}

/// How one run ended, as far as the emulator is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// `lamina: result: success`.
    Success,
    /// `lamina: result: failure`.
    Failure,
    /// The emulator exited without a result line.
    Crash,
    /// No result line before the timeout; the emulator was killed.
    Timeout,
}

/// Everything a finished run left behind.
#[derive(Debug)]
pub struct RunRecord {
    pub vendor: Vendor,
    pub dir: RunDir,
    pub log: SerialLog,
    pub timed_out: bool,
    /// From start to the emulator's end (or our kill).
    pub elapsed: Duration,
    /// From start to the result line, if there was one.
    pub time_to_result: Option<Duration>,
    /// `None` when we killed the emulator.
    pub exit_status: Option<ExitStatus>,
}

impl RunRecord {
    pub fn outcome(&self) -> RunOutcome {
        match self.log.result() {
            Some(serial_log::HvResult::Success) => RunOutcome::Success,
            Some(serial_log::HvResult::Failure) => RunOutcome::Failure,
            None if self.timed_out => RunOutcome::Timeout,
            None => RunOutcome::Crash,
        }
    }

    /// A one-line account of how the emulator ended.
    pub fn ending(&self) -> String {
        match (self.exit_status, self.timed_out) {
            (_, true) => format!(
                "killed after the {:.0} s timeout",
                self.elapsed.as_secs_f64()
            ),
            (Some(status), false) => format!("emulator exited ({status})"),
            (None, false) => "emulator killed after the result line".to_string(),
        }
    }
}

/// One emulator run.
pub struct RunRequest<'a> {
    pub vendor: Vendor,
    /// Holds `image.iso`; the logs are written next to it.
    pub dir: &'a RunDir,
    pub timeout: Duration,
    pub streaming: &'a Streaming,
    /// QEMU only: `-icount shift=0`, one TSC tick per instruction (for benchmarks).
    pub icount: bool,
}

/// Where the emulator's COM1 goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SerialPort {
    /// Output only, straight into `serial.log`.
    File,
    /// Both ways, through a TCP connection the emulator opens to xtask on this port: xtask
    /// writes the log and types the input.
    Socket(u16),
}

/// Console input typed into COM1, and so into domain 1 (docs/abi.md 13).
#[derive(Clone, Debug)]
pub enum ConsoleInput {
    File(PathBuf),
    /// xtask's own standard input, as it comes.
    Stdin,
    Bytes(Vec<u8>),
}

/// What a run may add to a plain boot.
#[derive(Clone, Debug, Default)]
pub struct RunExtras {
    /// QEMU only: the gdb stub on this port, the CPU stopped until gdb continues it.
    pub gdb_port: Option<u16>,
    /// Typed once the hypervisor has started domain 1 (earlier, GRUB's serial terminal or the
    /// hypervisor's UART set-up could take or drop it).
    pub input: Option<ConsoleInput>,
    /// The machine's CPUs (QEMU `-smp`, Bochs `cpu: count=`); None: one.
    pub cpus: Option<u16>,
}

/// One boot of the hypervisor built from hv/ with `modules`: the ISO is built in `dir`.
pub struct Boot<'a> {
    pub vendor: Vendor,
    pub dir: &'a RunDir,
    /// The hypervisor's command line (e.g. `trace=1`).
    pub hv_cmdline: &'a str,
    pub modules: &'a [BootModule],
    pub timeout: Duration,
    pub streaming: &'a Streaming,
    /// QEMU: `-icount shift=0` (Bochs counts instructions anyway).
    pub icount: bool,
    pub extras: RunExtras,
}

/// Builds the ISO of a [`Boot`] and runs it: what every scenario, the conformance suite and
/// the benchmark do.
pub fn boot(boot: &Boot<'_>) -> Result<RunRecord> {
    let dir = boot.dir;
    fs::create_dir_all(&dir.path).context(|| format!("creating {}", dir.path.display()))?;
    iso::build_iso(
        &Artifact::Hypervisor.path(),
        boot.hv_cmdline,
        boot.modules,
        &dir.staging(),
        &dir.iso(),
    )?;
    run_with(
        &RunRequest {
            vendor: boot.vendor,
            dir,
            timeout: boot.timeout,
            streaming: boot.streaming,
            icount: boot.icount,
        },
        &boot.extras,
    )
}

/// Boots `request.dir`'s ISO, with a gdb stub or console input if asked, and waits for the
/// result (or the timeout).
pub fn run_with(request: &RunRequest<'_>, extras: &RunExtras) -> Result<RunRecord> {
    let dir = request.dir;
    let serial_path = dir.serial_log();
    // A stale log would be read as this run's output.
    if serial_path.exists() {
        fs::remove_file(&serial_path).context(|| format!("removing {}", serial_path.display()))?;
    }
    let listener = match extras.input {
        Some(_) => Some(
            TcpListener::bind("127.0.0.1:0")
                .context(|| "opening a socket for the serial port".to_string())?,
        ),
        None => None,
    };
    let serial = match &listener {
        Some(listener) => SerialPort::Socket(
            listener
                .local_addr()
                .context(|| "reading the serial socket's port".to_string())?
                .port(),
        ),
        None => SerialPort::File,
    };
    let cpus = extras.cpus.unwrap_or(1);
    let mut command = match request.vendor {
        Vendor::Amd => qemu::command(request.icount, serial, extras.gdb_port, cpus),
        Vendor::Intel => bochs::command(dir, serial, cpus)?,
    };
    let output_path = dir.emulator_output();
    let output =
        File::create(&output_path).context(|| format!("creating {}", output_path.display()))?;
    let output_for_stderr = output
        .try_clone()
        .context(|| format!("opening {}", output_path.display()))?;
    command
        .current_dir(&dir.path)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(output_for_stderr);
    let command_file = dir.command_file();
    fs::write(
        &command_file,
        format!("cd {} && {}\n", dir.path.display(), describe(&command)),
    )
    .context(|| format!("writing {}", command_file.display()))?;
    kill_with_parent(&mut command);

    let started = Instant::now();
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command.spawn().context(|| format!("starting {program}"))?;
    if let (Some(listener), Some(input)) = (listener, &extras.input)
        && let Err(err) = connect_serial(listener, &serial_path, input.clone(), &mut child)
    {
        kill(&mut child);
        return Err(err);
    }
    let watched = watch(&mut child, request, started);
    // Whatever happened while watching, the emulator must not outlive this function.
    let exit_status = match watched {
        Ok(watched) => watched,
        Err(err) => {
            kill(&mut child);
            return Err(err);
        }
    };

    let bytes = fs::read(&serial_path).unwrap_or_default();
    Ok(RunRecord {
        vendor: request.vendor,
        dir: dir.clone(),
        log: SerialLog::from_bytes(&bytes),
        timed_out: exit_status.timed_out,
        elapsed: started.elapsed(),
        time_to_result: exit_status.time_to_result,
        exit_status: exit_status.status,
    })
}

/// What the hypervisor prints when domain 1 exists: from then on input reaches it.
const INPUT_READY: &[u8] = b"lamina: domain 1 ";
/// How long the emulator may take to connect its serial port.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Takes the emulator's serial connection: one thread copies its output into the serial log
/// (which [`watch`] follows as usual), another types `input` once domain 1 has started.
fn connect_serial(
    listener: TcpListener,
    log_path: &Path,
    input: ConsoleInput,
    child: &mut Child,
) -> Result<()> {
    listener
        .set_nonblocking(true)
        .context(|| "configuring the serial socket".to_string())?;
    let started = Instant::now();
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                let exited = child.try_wait().ok().flatten();
                if exited.is_some() || started.elapsed() > CONNECT_TIMEOUT {
                    return Err(crate::error::failed(format!(
                        "the emulator did not connect its serial port ({})",
                        exited.map_or("timeout".to_string(), |status| status.to_string())
                    )));
                }
                thread::sleep(POLL_INTERVAL);
            }
            Err(err) => return Err(crate::error::failed(format!("serial socket: {err}"))),
        }
    };
    stream
        .set_nonblocking(false)
        .context(|| "configuring the serial connection".to_string())?;
    let mut log = File::create(log_path).context(|| format!("creating {}", log_path.display()))?;
    let mut reader = stream
        .try_clone()
        .context(|| "cloning the serial connection".to_string())?;
    let ready = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicBool::new(false));
    let (ready_for_reader, closed_for_reader) = (Arc::clone(&ready), Arc::clone(&closed));
    // Both threads end when the emulator closes the connection (or, for standard input, when
    // xtask exits).
    thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        let mut seen: Vec<u8> = Vec::new();
        while let Ok(count @ 1..) = reader.read(&mut buffer) {
            if log.write_all(&buffer[..count]).is_err() {
                break;
            }
            if !ready_for_reader.load(Ordering::Relaxed) {
                seen.extend_from_slice(&buffer[..count]);
                if seen.windows(INPUT_READY.len()).any(|w| w == INPUT_READY) {
                    ready_for_reader.store(true, Ordering::Release);
                }
                // Only the tail can still start a match.
                let keep = seen.len().saturating_sub(INPUT_READY.len());
                seen.drain(..keep);
            }
        }
        closed_for_reader.store(true, Ordering::Release);
    });
    thread::spawn(move || type_input(stream, input, &ready, &closed));
    Ok(())
}

/// Writes `input` into the serial connection once `ready`; the emulator takes the bytes as
/// fast as the guest UART's receive buffer empties.
fn type_input(mut stream: TcpStream, input: ConsoleInput, ready: &AtomicBool, closed: &AtomicBool) {
    while !ready.load(Ordering::Acquire) {
        if closed.load(Ordering::Acquire) {
            return;
        }
        thread::sleep(POLL_INTERVAL);
    }
    let _ = match input {
        ConsoleInput::Bytes(bytes) => stream.write_all(&bytes),
        ConsoleInput::File(path) => fs::read(&path).and_then(|bytes| stream.write_all(&bytes)),
        ConsoleInput::Stdin => io::copy(&mut io::stdin().lock(), &mut stream).map(|_| ()),
    };
}

struct Watched {
    status: Option<ExitStatus>,
    timed_out: bool,
    time_to_result: Option<Duration>,
}

fn watch(child: &mut Child, request: &RunRequest<'_>, started: Instant) -> Result<Watched> {
    let mut follower = LogFollower::new(request.dir.serial_log());
    let mut time_to_result = None;
    // Streams new lines and notes when the result line came.
    let take = |lines: Vec<String>, time_to_result: &mut Option<Duration>| {
        for line in &lines {
            stream_line(request.streaming, line);
            if time_to_result.is_none() && serial_log::result_of_line(line).is_some() {
                *time_to_result = Some(started.elapsed());
            }
        }
    };
    loop {
        take(follower.poll()?, &mut time_to_result);
        let finished = child
            .try_wait()
            .context(|| "waiting for the emulator".to_string())?;
        let overtime = match time_to_result {
            Some(at) => started.elapsed() > at + LINGER_AFTER_RESULT,
            None => started.elapsed() > request.timeout,
        };
        if finished.is_some() || overtime {
            if finished.is_none() {
                kill(child);
            }
            // What the emulator wrote last, including a line it never finished.
            take(follower.poll()?, &mut time_to_result);
            take(follower.finish(), &mut time_to_result);
            let timed_out = finished.is_none() && time_to_result.is_none();
            return Ok(Watched {
                status: finished,
                timed_out,
                time_to_result,
            });
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Kills the emulator and reaps it.
fn kill(child: &mut Child) {
    // Both fail only if it already exited and was reaped, which is what we want anyway.
    let _ = child.kill();
    let _ = child.wait();
}

fn stream_line(streaming: &Streaming, line: &str) {
    // The trace's records are for the decoder, not for reading (its header and end lines are
    // shown).
    if line
        .strip_prefix(crate::trace::LINE_PREFIX)
        .is_some_and(|rest| !rest.starts_with("cpu=") && !rest.starts_with("end"))
    {
        return;
    }
    let mut stdout = io::stdout().lock();
    // A closed stdout (e.g. `| head`) must not stop the run; the log file has everything.
    let _ = match streaming {
        Streaming::Off => return,
        Streaming::Plain => writeln!(stdout, "{line}"),
        Streaming::Prefixed(prefix) => writeln!(stdout, "{prefix}{line}"),
    };
    let _ = stdout.flush();
}

/// The command as a shell line (arguments with blanks quoted), for `emulator.cmd`.
fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| {
            let word = word.to_string_lossy();
            if word.chars().any(|c| c.is_whitespace() || c == '"') {
                format!("'{word}'")
            } else {
                word.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Follows a growing file and hands out complete lines.
struct LogFollower {
    path: PathBuf,
    file: Option<File>,
    partial: Vec<u8>,
}

impl LogFollower {
    fn new(path: PathBuf) -> Self {
        LogFollower {
            path,
            file: None,
            partial: Vec::new(),
        }
    }

    /// The lines completed since the last call.
    fn poll(&mut self) -> Result<Vec<String>> {
        if self.file.is_none() {
            // The emulator creates the file when it starts (Bochs only at the first byte).
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(err) => {
                    return Err(crate::error::failed(format!(
                        "{}: {err}",
                        self.path.display()
                    )));
                }
            }
        }
        if let Some(file) = &mut self.file {
            file.read_to_end(&mut self.partial)
                .context(|| format!("reading {}", self.path.display()))?;
        }
        let Some(last_newline) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let rest = self.partial.split_off(last_newline + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        Ok(serial_log::split_lines(&complete))
    }

    /// The unterminated last line, if any.
    fn finish(&mut self) -> Vec<String> {
        serial_log::split_lines(&std::mem::take(&mut self.partial))
    }
}

/// Makes the kernel kill the emulator when we die, whatever kills us (Ctrl-C reaches the
/// emulator anyway, being in our process group, but SIGTERM or SIGKILL to xtask alone would
/// leave an orphan that runs until its guest stops, possibly never).
///
/// The signal fires when the *thread* that started the child exits; every caller waits for its
/// emulator on the thread that started it.
#[cfg(target_os = "linux")]
fn kill_with_parent(command: &mut Command) {
    use std::ffi::{c_int, c_ulong};
    use std::os::unix::process::CommandExt;

    unsafe extern "C" {
        fn prctl(option: c_int, ...) -> c_int;
        fn getppid() -> c_int;
    }
    const PR_SET_PDEATHSIG: c_int = 1;
    const SIGKILL: c_ulong = 9;

    let our_pid = std::process::id() as c_int;
    // SAFETY: the hook runs in the forked child before exec; prctl and getppid are
    // async-signal-safe system calls that read and write none of our memory.
    unsafe {
        command.pre_exec(move || {
            if prctl(PR_SET_PDEATHSIG, SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            // We may have died between fork and prctl: then nobody would kill the child.
            if getppid() != our_pid {
                return Err(io::Error::other("xtask exited while starting the emulator"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn kill_with_parent(_command: &mut Command) {}

/// For messages: a path relative to the workspace root when it is inside it.
pub fn show_path(path: &Path) -> String {
    let root = crate::workspace::root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

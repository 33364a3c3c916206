//! Intel VT-x runs: Bochs emulates VMX with EPT, VPID and unrestricted guest.
//!
//! Bochs has no command-line machine description: we write a `bochsrc` per run, and a debugger
//! script (`c`, `quit`) because the Debian build starts in its debugger.

use std::fs;
use std::process::Command;

use crate::emulator::{RunDir, SerialPort};
use crate::error::{Context, Result};

pub const BIOS_IMAGE: &str = "/usr/share/bochs/BIOS-bochs-latest";
pub const VGA_BIOS_IMAGE: &str = "/usr/share/vgabios/vgabios.bin";

const CONFIG_FILE: &str = "bochsrc";
const DEBUGGER_SCRIPT: &str = "bochs.cmds";
/// Bochs' own log (its diagnostics, not the guest's serial output).
pub const BOCHS_LOG: &str = "bochs.log";

/// The machine: `cpus` Skylake-X CPUs (VMX with EPT, VPID, unrestricted guest), 512 MiB, the ISO
/// as CD-ROM, COM1 into the serial log (or, for console input, to a socket xtask listens on:
/// Bochs' `file` mode only writes).
///
/// - `reset_on_triple_fault=0`: a triple fault of the hypervisor stops Bochs instead of rebooting.
/// - `rfb` with `timeout=0`: the Debian build has no `nogui`; this one does not wait for a
///   viewer and picks the next free port, so parallel runs work.
/// - `sound: driver=dummy`: the ALSA plugin aborts Bochs without it.
/// - `clock: sync=none` with a fixed `ips`: emulated time follows instructions, as repeatable
///   as it gets.
/// - `count=2` makes BIOS and GRUB slower (~6.4 s instead of ~1.6 s before the hypervisor).
pub fn config(serial: SerialPort, cpus: u16) -> String {
    let com1 = match serial {
        SerialPort::File => format!("mode=file, dev={}", RunDir::SERIAL_LOG),
        SerialPort::Socket(port) => format!("mode=socket-client, dev=127.0.0.1:{port}"),
    };
    format!(
        "\
megs: 512
cpu: model=corei7_skylake_x, count={cpus}, ips=100000000, reset_on_triple_fault=0
romimage: file={BIOS_IMAGE}
vgaromimage: file={VGA_BIOS_IMAGE}
ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14
ata0-master: type=cdrom, path={iso}, status=inserted
boot: cdrom
display_library: rfb, options=\"timeout=0\"
sound: driver=dummy
com1: enabled=1, {com1}
log: {BOCHS_LOG}
panic: action=fatal
error: action=report
info: action=report
clock: sync=none, time0=local
",
        iso = RunDir::ISO,
    )
}

/// Writes the configuration and the debugger script into `dir` and returns the command, which
/// runs inside `dir`. Bochs exits with status 1 even on a clean shutdown: only the serial log
/// tells how the run went.
pub fn command(dir: &RunDir, serial: SerialPort, cpus: u16) -> Result<Command> {
    let config_path = dir.path.join(CONFIG_FILE);
    fs::write(&config_path, config(serial, cpus))
        .context(|| format!("writing {}", config_path.display()))?;
    let script_path = dir.path.join(DEBUGGER_SCRIPT);
    // `c` runs the machine; `quit` ends Bochs should the debugger ever get control back
    // (Ctrl-C, or a breakpoint-like stop).
    fs::write(&script_path, "c\nquit\n")
        .context(|| format!("writing {}", script_path.display()))?;
    let mut command = Command::new("bochs");
    command.args(["-q", "-f", CONFIG_FILE, "-rc", DEBUGGER_SCRIPT]);
    Ok(command)
}

//! AMD-V runs: QEMU's TCG emulates SVM with nested paging (KVM on these machines cannot nest).

use std::process::Command;

use crate::emulator::{RunDir, SerialPort};

/// The QEMU command line; it runs inside the run directory, so files are named relatively.
///
/// - `qemu64,+svm,+npt`: plain `qemu64` has SVM but not nested paging; `+xsave,+avx,+avx2`
///   give guests extended state to keep (docs/abi.md 18), as Bochs' Skylake-X does. QEMU 7.2
///   takes CR4.OSXSAVE for a reserved bit unless CPUID.(0xD,1):EAX is non-zero, and a write
///   of it then hangs the emulated CPU: `+xsaveopt` makes it so.
/// - `-net none`: otherwise iPXE's option ROM writes to the serial console.
/// - `isa-debug-exit` at 0xf4: the hypervisor ends QEMU by writing its result there.
/// - `-no-reboot`: a triple fault of the hypervisor ends the run instead of rebooting into it.
/// - `-gdb tcp:127.0.0.1:<port> -S`: the gdb stub, with the CPU stopped until gdb continues.
/// - `-smp <cpus>`: TCG runs the CPUs one after the other (no speed-up, but real SMP).
pub fn command(icount: bool, serial: SerialPort, gdb_port: Option<u16>, cpus: u16) -> Command {
    let mut command = Command::new("qemu-system-x86_64");
    command.args([
        "-cpu",
        "qemu64,+svm,+npt,+xsave,+xsaveopt,+avx,+avx2",
        "-m",
        "512M",
        "-smp",
        &cpus.to_string(),
    ]);
    command.args(["-cdrom", RunDir::ISO, "-boot", "d"]);
    command.args(["-net", "none", "-display", "none", "-monitor", "none"]);
    let serial = match serial {
        SerialPort::File => format!("file:{}", RunDir::SERIAL_LOG),
        // QEMU connects to xtask, which types the input and writes the log.
        SerialPort::Socket(port) => format!("tcp:127.0.0.1:{port}"),
    };
    command.args(["-serial", &serial]);
    command.args([
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-no-reboot",
    ]);
    if icount {
        // One TSC tick per emulated instruction: repeatable instruction counts for benchmarks.
        command.args(["-icount", "shift=0,sleep=off"]);
    }
    if let Some(port) = gdb_port {
        command.args(["-gdb", &format!("tcp:127.0.0.1:{port}"), "-S"]);
    }
    command
}

//! gdb against QEMU's gdb stub: the script that loads the symbols of the hypervisor and the
//! guests, and running gdb in batch mode (for the `gdb-breakpoints` scenario).
//!
//! What QEMU 7.2's stub shows while an SVM guest runs under TCG (measured, see README):
//! the CPU state gdb reads is whichever level runs, the hypervisor's or the guest's (QEMU
//! swaps the whole state on VMRUN and #VMEXIT); breakpoints match the program counter of
//! translated code whoever runs it, so breakpoints at guest functions hit; but debug memory
//! accesses walk the current page tables as host-physical memory, ignoring nested paging, so
//! in a guest stop memory (backtraces, variables, `x`) is wrong or unreadable.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::emulator::RunDir;
use crate::error::{Context, Result, failed};
use crate::iso::BootModule;

/// gdb's usual remote port, taken when free.
pub const DEFAULT_PORT: u16 = 1234;
/// "No timeout" for a run that waits for a person at gdb.
pub const NO_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why `--gdb` is QEMU only.
pub const NO_BOCHS_STUB: &str = "--gdb needs QEMU's gdb stub (--vendor amd): Debian's Bochs is \
    built with its own debugger, and Bochs' gdb stub (--enable-gdb-stub) cannot be built \
    together with it";

/// What to expect, printed with the command.
pub const NOTES: &str = "\
What works (QEMU 7.2, TCG, nested SVM):
  - breakpoints (`break`, `hbreak`) in the hypervisor and at guest functions; guests are all
    linked at the same addresses, so a guest breakpoint stops in every domain running that code;
  - registers at every stop: in a guest stop they are the guest's (cr3 = 0x4000, its boot tables);
  - memory, backtraces and variables in the hypervisor.
What does not: memory in a guest stop (x, bt, locals): QEMU reads it through the guest's page
  tables as if they were host-physical, ignoring nested paging.";

/// `port` when it is free, else a free port the system picks.
pub fn free_port(port: u16) -> Result<u16> {
    if TcpListener::bind(("127.0.0.1", port)).is_ok() {
        return Ok(port);
    }
    any_free_port()
}

/// A port nobody listens on now (the system picks it).
pub fn any_free_port() -> Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").context(|| "looking for a free port".to_string())?;
    Ok(listener
        .local_addr()
        .context(|| "looking for a free port".to_string())?
        .port())
}

/// The distinct guest images of `modules`, in boot order.
fn guest_images(modules: &[BootModule]) -> Vec<&Path> {
    let mut images: Vec<&Path> = Vec::new();
    for module in modules {
        if !images.contains(&module.path.as_path()) {
            images.push(&module.path);
        }
    }
    images
}

/// gdb commands that load the hypervisor's symbols, then every guest image's (at the
/// addresses they are linked at, docs/abi.md 4.2), and connect to the stub on `port`.
pub fn script(hv: &Path, modules: &[BootModule], port: u16) -> String {
    let mut script = String::from("set pagination off\nset confirm off\n");
    script.push_str(&format!("file {}\n", hv.display()));
    for image in guest_images(modules) {
        script.push_str(&format!("add-symbol-file {}\n", image.display()));
    }
    // QEMU opens the port a moment after it starts: gdb retries that long.
    script.push_str("set tcp connect-timeout 30\n");
    script.push_str(&format!("target remote 127.0.0.1:{port}\nset confirm on\n"));
    script
}

/// Writes [`script`] to `gdbinit` in the run directory.
pub fn write_script(dir: &RunDir, hv: &Path, modules: &[BootModule], port: u16) -> Result<PathBuf> {
    let path = dir.path.join("gdbinit");
    fs::write(&path, script(hv, modules, port))
        .context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Runs gdb in batch mode on `commands` (written next to the run) and returns what it
/// printed; kills it after `timeout`.
pub fn batch(dir: &RunDir, commands: &str, timeout: Duration) -> Result<String> {
    let script = dir.path.join("gdb-batch.cmds");
    fs::write(&script, commands).context(|| format!("writing {}", script.display()))?;
    let output_path = dir.path.join("gdb.out");
    let output =
        fs::File::create(&output_path).context(|| format!("creating {}", output_path.display()))?;
    let errors = output
        .try_clone()
        .context(|| format!("opening {}", output_path.display()))?;
    let mut child = Command::new("gdb")
        .args(["-batch", "-nx", "-x"])
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(errors)
        .spawn()
        .context(|| "starting gdb".to_string())?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().context(|| "waiting for gdb".to_string())? {
            break Some(status);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let text = fs::read_to_string(&output_path).unwrap_or_default();
    match status {
        Some(_) => Ok(text),
        None => Err(failed(format!(
            "gdb did not finish within {} s; it printed:\n{text}",
            timeout.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_loads_each_image_once_and_connects() {
        let module = |path: &str| BootModule {
            path: PathBuf::from(path),
            cmdline: "x".to_string(),
        };
        let modules = [module("/g/a"), module("/g/b"), module("/g/a")];
        let script = script(Path::new("/hv"), &modules, 4321);
        assert!(script.contains("file /hv\n"));
        assert_eq!(script.matches("add-symbol-file /g/a\n").count(), 1);
        assert_eq!(script.matches("add-symbol-file /g/b\n").count(), 1);
        assert!(script.contains("target remote 127.0.0.1:4321\n"));
    }
}

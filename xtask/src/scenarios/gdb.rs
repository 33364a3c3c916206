//! `gdb-breakpoints`: gdb in batch mode at QEMU's gdb stub (what `cargo xtask run --gdb`
//! offers) stops at a function of the sample guest, then in the hypervisor's hypercall
//! dispatcher, and reads registers and variables there; then it detaches and the run must end
//! as the plain sample-guest run does. QEMU only: Bochs has no gdb stub in Debian's build.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

use lamina_abi::Hypercall;
use lamina_abi::layout::{BOOT_PML4_GPA, START_INFO_GPA};

use crate::emulator::{RunExtras, RunRecord, Vendor};
use crate::error::{Context as _, Result, failed};
use crate::gdb;
use crate::serial_log::{HvResult, LinePattern};
use crate::workspace::Artifact;

use super::driven::{Context, Driven};
use super::{ModuleSource, ModuleSpec, NO_PANIC, SAMPLE_GUEST_RESULTS, Scenario};

/// How long gdb may take for both stops (QEMU boots GRUB and the hypervisor first).
const GDB_TIMEOUT: Duration = Duration::from_secs(90);
/// The guest function gdb stops in: the sample guest's `kernel_main(start: &StartInfo)`.
const GUEST_FUNCTION: &str = "sample_guest::kernel_main";
/// The hypervisor's hypercall dispatcher (`dispatch(domain, vcpu, nr, args, peers)`); its
/// first statement is the inlined `Hypercall::try_from(nr)`, where gdb stops and reads `nr`.
const HV_FUNCTION: &str = "lamina_hv::common::hypercall::dispatch";
/// What the dispatcher's backtrace must reach (read from the hypervisor's stack).
const HV_EXIT_HANDLER: &str = "lamina_hv::common::exits::hypercall_exit";

pub const GDB_BREAKPOINTS: Driven = Driven {
    scenario: Scenario {
        name: "gdb-breakpoints",
        modules: &[ModuleSpec {
            source: ModuleSource::Built(Artifact::SampleGuest),
            cmdline: "sample-guest",
        }],
        expect: HvResult::Success,
        required_lines: &[
            LinePattern::Contains("lamina: domain 1 sample-guest end=poweroff"),
            LinePattern::Contains(SAMPLE_GUEST_RESULTS),
        ],
        forbidden_lines: &[NO_PANIC],
        check: None,
    },
    vendors: &[Vendor::Amd],
    drive,
};

/// The gdb commands: each stop prints one `lamina-gdb:` line of `key=value` words and what
/// symbol the PC is in.
fn commands(port: u16, entry: u64) -> String {
    let hv = Artifact::Hypervisor.path();
    let guest = Artifact::SampleGuest.path();
    format!(
        "\
set pagination off
set confirm off
file {hv}
add-symbol-file {guest}
set tcp connect-timeout 30
target remote 127.0.0.1:{port}
break *{entry:#x}
continue
printf \"lamina-gdb: entry rip=%#lx rdi=%#lx rsp=%#lx cr3=%#lx\\n\", $rip, $rdi, $rsp, $cr3
delete
break {GUEST_FUNCTION}
continue
printf \"lamina-gdb: guest rip=%#lx function=%#lx cr3=%#lx\\n\", $rip, {GUEST_FUNCTION}, $cr3
info symbol $pc
delete
break {HV_FUNCTION}
continue
printf \"lamina-gdb: hv rip=%#lx nr=%lu cr3=%#lx\\n\", $rip, nr, $cr3
info symbol $pc
backtrace 8
up
printf \"lamina-gdb: dispatch domain=%u\\n\", (*domain).id
delete
detach
",
        hv = hv.display(),
        guest = guest.display(),
    )
}

/// The `key=value` words of the `lamina-gdb: <stop> ...` line, as numbers.
fn stop_fields(output: &str, stop: &str) -> std::result::Result<Vec<(String, u64)>, String> {
    let prefix = format!("lamina-gdb: {stop} ");
    let line = output
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .ok_or_else(|| format!("gdb never stopped at the {stop} breakpoint"))?;
    line.split_whitespace()
        .map(|word| {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| format!("gdb printed {word:?}"))?;
            let number = match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => value.parse(),
            };
            number
                .map(|n| (key.to_string(), n))
                .map_err(|_| format!("gdb printed {word:?}"))
        })
        .collect()
}

fn field(fields: &[(String, u64)], key: &str) -> Option<u64> {
    fields.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// A guest's RAM without `mem=` (docs/abi.md 4.2): its boot stack starts at the top.
const DEFAULT_GUEST_RAM: u64 = 16 << 20;

/// What gdb must have read at the three stops: the guest's entry (its registers as
/// docs/abi.md 4.1 specifies them), its `kernel_main`, and the hypervisor's dispatcher.
fn check(output: &str, entry: u64) -> Vec<String> {
    let mut problems = Vec::new();
    match stop_fields(output, "entry") {
        Err(problem) => problems.push(problem),
        Ok(fields) => {
            let expected = [
                ("rip", entry),
                ("rdi", START_INFO_GPA),
                ("rsp", DEFAULT_GUEST_RAM),
                ("cr3", BOOT_PML4_GPA),
            ];
            for (key, value) in expected {
                if field(&fields, key) != Some(value) {
                    problems.push(format!(
                        "guest entry: {key} is not {value:#x} (docs/abi.md 4.1): {fields:?}"
                    ));
                }
            }
        }
    }
    match stop_fields(output, "guest") {
        Err(problem) => problems.push(problem),
        Ok(fields) => {
            let rip = field(&fields, "rip");
            if rip.is_none() || rip != field(&fields, "function") {
                problems.push(format!("guest stop not at {GUEST_FUNCTION}: {fields:?}"));
            }
            if field(&fields, "cr3") != Some(BOOT_PML4_GPA) {
                problems.push(format!("guest stop: cr3 is not the guest's: {fields:?}"));
            }
        }
    }
    match stop_fields(output, "hv") {
        Err(problem) => problems.push(problem),
        Ok(fields) => {
            // kernel_main's first act is a line through the console hypercall.
            if field(&fields, "nr") != Some(Hypercall::ConsoleIo as u64) {
                problems.push(format!("hv stop: nr is not console_io: {fields:?}"));
            }
            if field(&fields, "cr3") == Some(BOOT_PML4_GPA) {
                problems.push(format!("hv stop: cr3 is the guest's: {fields:?}"));
            }
        }
    }
    // The hypervisor's memory is readable: the domain behind the dispatcher's argument.
    match stop_fields(output, "dispatch") {
        Err(problem) => problems.push(problem),
        Ok(fields) => {
            if field(&fields, "domain") != Some(1) {
                problems.push(format!("hv stop: not domain 1's hypercall: {fields:?}"));
            }
        }
    }
    // The hypervisor's stack is readable: the backtrace reaches the exit handler.
    if !output.contains(HV_EXIT_HANDLER) {
        problems.push(format!(
            "the hypervisor's backtrace does not reach {HV_EXIT_HANDLER}"
        ));
    }
    // `info symbol $pc`: `<symbol>::h<hash> [+ offset] in section .text of <file>`.
    for symbol in [GUEST_FUNCTION, HV_FUNCTION] {
        let named = output
            .lines()
            .any(|line| line.starts_with(symbol) && line.contains(" in section .text"));
        if !named {
            problems.push(format!("gdb's `info symbol $pc` never named {symbol}"));
        }
    }
    problems
}

/// The entry point of an ELF64 file (`e_entry`).
fn elf_entry(path: &Path) -> Result<u64> {
    let bytes = fs::read(path).context(|| format!("reading {}", path.display()))?;
    match bytes.get(24..32) {
        Some(field) if bytes.starts_with(b"\x7fELF") => {
            let mut entry = [0u8; 8];
            entry.copy_from_slice(field);
            Ok(u64::from_le_bytes(entry))
        }
        _ => Err(failed(format!("{} is not an ELF file", path.display()))),
    }
}

fn drive(driven: &Driven, context: &Context<'_>) -> Result<(RunRecord, Vec<String>)> {
    fs::create_dir_all(&context.dir.path)
        .context(|| format!("creating {}", context.dir.path.display()))?;
    let port = gdb::any_free_port()?;
    let entry = elf_entry(&Artifact::SampleGuest.path())?;
    let extras = RunExtras {
        gdb_port: Some(port),
        ..RunExtras::default()
    };
    // The emulator is waited for on its own thread (it must outlive gdb's detach).
    let (record, gdb_output) = thread::scope(|scope| {
        let emulator = scope.spawn(|| driven.boot(context, "", true, extras));
        let gdb_output = gdb::batch(context.dir, &commands(port, entry), GDB_TIMEOUT);
        let record = emulator
            .join()
            .unwrap_or_else(|_| Err(failed("the emulator thread panicked")));
        (record, gdb_output)
    });
    let record = record?;
    let problems = match gdb_output {
        Ok(output) => check(&output, entry),
        Err(err) => vec![err.to_string()],
    };
    Ok((record, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stops_are_checked_against_what_they_must_read() {
        let good = format!(
            "lamina-gdb: entry rip=0x208e20 rdi={START_INFO_GPA:#x} rsp=0x1000000 cr3={BOOT_PML4_GPA:#x}\n\
             lamina-gdb: guest rip=0x2050e0 function=0x2050e0 cr3={BOOT_PML4_GPA:#x}\n\
             {GUEST_FUNCTION}::h1 in section .text of /sample-guest\n\
             lamina-gdb: hv rip=0x1034 nr=1 cr3=0x943000\n\
             {HV_FUNCTION}::h2 + 4 in section .text of /lamina-hv\n\
             #3 {HV_EXIT_HANDLER}<x> (domain=0x1) at hv/src/common/exits.rs:54\n\
             lamina-gdb: dispatch domain=1\n"
        );
        assert_eq!(check(&good, 0x208e20), Vec::<String>::new());
        assert_eq!(check(&good, 0x208e24).len(), 1, "another entry point");
        let wrong_nr = good.replace("nr=1 ", "nr=2 ");
        assert_eq!(check(&wrong_nr, 0x208e20).len(), 1);
        let no_guest_stop = good.replace("lamina-gdb: guest", "x");
        assert_eq!(check(&no_guest_stop, 0x208e20).len(), 1);
        let no_hv_symbol = good.replace(HV_FUNCTION, "x");
        assert_eq!(check(&no_hv_symbol, 0x208e20).len(), 1);
    }

    #[test]
    fn the_entry_point_is_read_from_the_elf_header() {
        let elf = crate::scenarios::elf_below_kernel_area();
        let path = std::env::temp_dir().join(format!("lamina-entry-{}", std::process::id()));
        fs::write(&path, &elf).unwrap();
        let entry = elf_entry(&path).unwrap();
        fs::remove_file(&path).unwrap();
        assert_eq!(entry, 0x8000 + 64 + 56);
    }
}

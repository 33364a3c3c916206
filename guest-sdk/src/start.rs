//! Start of day: `_start`, the checks on [`StartInfo`], and what the SDK keeps of it
//! (docs/abi.md section 4).
//!
//! The hypervisor enters `_start` in 64-bit mode with RSP = top of RAM and RDI = the address
//! of [`StartInfo`]. With the default feature `entry`, the SDK defines `_start`: it clears RBP
//! (the end of frame-pointer chains), aligns the stack, leaves the top [`TOP_OF_RAM_SCRATCH`]
//! bytes of RAM unused and calls the SDK's start code, which runs [`init`] and then the
//! kernel's main function declared with [`entry!`](crate::entry).
//!
//! [`init`]
//! 1. makes the hypercall instruction native to the CPU the default,
//! 2. checks StartInfo (magic, ABI major version, command line inside RAM, UTF-8),
//! 3. copies StartInfo and the command line into the SDK's own memory, so that the kernel may
//!    reuse the low pages.
//!
//! A StartInfo that fails a check is reported on the console and ends the domain with
//! [`ShutdownReason::Crash`](lamina_abi::sched::ShutdownReason::Crash).
//!
//! # Keeping your own `_start`
//!
//! A kernel with an entry of its own (its own stack, its own assembly) turns the `entry`
//! feature off (`default-features = false, features = ["panic-handler"]`) and calls [`init`]
//! with the RDI it was entered with, before anything else of the SDK (the accessors
//! [`start_info()`], [`cmdline()`] and everything that reads them need it):
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//!
//! /// The hypervisor jumps here with RDI = the StartInfo address (docs/abi.md 4.1). RSP is
//! /// the top of RAM, 16-byte aligned; a kernel that cares about the ABI's alignment at
//! /// function entry switches to its own stack first.
//! #[unsafe(no_mangle)]
//! pub extern "sysv64" fn _start(start_info_gpa: u64) -> ! {
//!     // SAFETY: called once, first, with the address the hypervisor passed in RDI.
//!     let start = match unsafe { lamina_guest_sdk::start::init(start_info_gpa) } {
//!         Ok(start) => start,
//!         Err(error) => lamina_guest_sdk::start::refuse(error),
//!     };
//!     lamina_guest_sdk::println!("hello from domain {}", start.domain_id);
//!     lamina_guest_sdk::hypercall::shutdown(lamina_guest_sdk::abi::sched::ShutdownReason::Poweroff)
//! }
//! ```

use core::fmt;

use lamina_abi::layout::CMDLINE_MAX;
use lamina_abi::start_info::START_INFO_MAGIC;
use lamina_abi::{ABI_VERSION_MAJOR, StartInfo};

use crate::sync::WriteOnce;

/// What the SDK keeps from start of day.
struct Boot {
    /// Address of the hypervisor's StartInfo (RDI at entry).
    start_info_gpa: u64,
    /// Our copy of it.
    info: StartInfo,
    /// Our copy of the command line, checked to be UTF-8.
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
}

static BOOT: WriteOnce<Boot> = WriteOnce::new();

/// Bytes at the very top of RAM, `[mem_bytes - 16, mem_bytes)`, that `_start` leaves out of the
/// stack and nothing in the SDK uses: the kernel may use them, for example to test a buffer
/// that ends exactly at the end of RAM.
pub const TOP_OF_RAM_SCRATCH: u64 = 16;

/// Why the SDK refused to start the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartError {
    /// RDI at entry was null or not 8-byte aligned.
    BadStartInfoAddress(u64),
    /// `StartInfo::magic` was not `START_INFO_MAGIC`.
    BadMagic(u32),
    /// The hypervisor speaks another ABI major version.
    IncompatibleVersion {
        /// `StartInfo::abi_version`.
        hypervisor: u32,
        /// The major version this SDK was built for.
        sdk_major: u16,
    },
    /// `StartInfo::cmdline_len` exceeds `CMDLINE_MAX`.
    CmdlineTooLong(u64),
    /// The command line and its NUL do not lie inside RAM.
    CmdlineOutsideRam {
        /// `StartInfo::cmdline_gpa`.
        gpa: u64,
        /// `StartInfo::cmdline_len`.
        len: u64,
        /// `StartInfo::mem_bytes`.
        mem_bytes: u64,
    },
    /// The command line is not UTF-8.
    CmdlineNotUtf8,
    /// [`init`] already ran (the SDK's own `_start` runs it too).
    AlreadyStarted,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            StartError::BadStartInfoAddress(gpa) => write!(f, "StartInfo address {gpa:#x}"),
            StartError::BadMagic(magic) => {
                write!(
                    f,
                    "StartInfo magic {magic:#010x}, expected {START_INFO_MAGIC:#010x}"
                )
            }
            StartError::IncompatibleVersion {
                hypervisor,
                sdk_major,
            } => write!(
                f,
                "hypervisor ABI {}.{}, SDK built for major version {sdk_major}",
                hypervisor >> 16,
                hypervisor & 0xffff
            ),
            StartError::CmdlineTooLong(len) => {
                write!(f, "command line of {len} bytes (at most {CMDLINE_MAX})")
            }
            StartError::CmdlineOutsideRam {
                gpa,
                len,
                mem_bytes,
            } => write!(
                f,
                "command line at {gpa:#x} ({len} bytes and a NUL) outside RAM of {mem_bytes:#x} bytes"
            ),
            StartError::CmdlineNotUtf8 => f.write_str("command line is not UTF-8"),
            StartError::AlreadyStarted => f.write_str("the SDK's start code ran twice"),
        }
    }
}

/// Checks the fields of `info` the SDK relies on.
pub fn check(info: &StartInfo) -> Result<(), StartError> {
    if info.magic != START_INFO_MAGIC {
        return Err(StartError::BadMagic(info.magic));
    }
    if info.abi_version >> 16 != u32::from(ABI_VERSION_MAJOR) {
        return Err(StartError::IncompatibleVersion {
            hypervisor: info.abi_version,
            sdk_major: ABI_VERSION_MAJOR,
        });
    }
    if info.cmdline_len > CMDLINE_MAX as u64 {
        return Err(StartError::CmdlineTooLong(info.cmdline_len));
    }
    // The NUL after the line must be inside RAM too.
    let inside_ram = info
        .cmdline_gpa
        .checked_add(info.cmdline_len)
        .is_some_and(|nul| nul < info.mem_bytes);
    if !inside_ram {
        return Err(StartError::CmdlineOutsideRam {
            gpa: info.cmdline_gpa,
            len: info.cmdline_len,
            mem_bytes: info.mem_bytes,
        });
    }
    Ok(())
}

/// Reads and checks the hypervisor's StartInfo at `gpa` and copies what we keep.
fn read_boot(gpa: u64) -> Result<Boot, StartError> {
    if gpa == 0 || !gpa.is_multiple_of(align_of::<StartInfo>() as u64) {
        return Err(StartError::BadStartInfoAddress(gpa));
    }
    // SAFETY: the address is non-null and aligned, RAM is identity-mapped at entry, and every
    // bit pattern is a valid StartInfo (integers and a byte array).
    let info = unsafe { core::ptr::read_volatile(gpa as *const StartInfo) };
    check(&info)?;
    let len = info.cmdline_len as usize;
    let mut cmdline = [0; CMDLINE_MAX];
    // SAFETY: `check` proved `[cmdline_gpa, cmdline_gpa + len]` lies inside identity-mapped
    // RAM, and nothing else runs while we copy it.
    let source = unsafe { core::slice::from_raw_parts(info.cmdline_gpa as *const u8, len) };
    cmdline[..len].copy_from_slice(source);
    core::str::from_utf8(&cmdline[..len]).map_err(|_| StartError::CmdlineNotUtf8)?;
    Ok(Boot {
        start_info_gpa: gpa,
        info,
        cmdline,
        cmdline_len: len,
    })
}

fn boot() -> &'static Boot {
    match BOOT.get() {
        Some(boot) => boot,
        None => panic!("lamina-guest-sdk: start info read before the start code ran"),
    }
}

/// This domain's [`StartInfo`] (the SDK's checked copy).
pub fn start_info() -> &'static StartInfo {
    &boot().info
}

/// The address the hypervisor passed in RDI (the ABI puts StartInfo at `START_INFO_GPA`).
pub fn start_info_gpa() -> u64 {
    boot().start_info_gpa
}

/// This domain's command line, e.g. `"console_write_ok mem=16M test=console_write_ok"`.
pub fn cmdline() -> &'static str {
    let boot = boot();
    // `read_boot` checked that these bytes are UTF-8.
    core::str::from_utf8(&boot.cmdline[..boot.cmdline_len]).unwrap_or("")
}

/// The value of `key=value` on this domain's command line (see [`crate::cmdline::value`]).
pub fn cmdline_value(key: &str) -> Option<&'static str> {
    crate::cmdline::value(cmdline(), key)
}

/// Sets the SDK up from the StartInfo the hypervisor passed (RDI at entry): picks the
/// hypercall instruction native to the CPU, checks StartInfo and keeps a copy of it and of the
/// command line. Returns the SDK's copy, the one [`start_info()`] returns from now on.
///
/// The SDK's own `_start` (feature `entry`) calls it; a kernel with its own `_start` calls it
/// first thing (see the module documentation). A second call returns
/// [`StartError::AlreadyStarted`].
///
/// # Safety
/// `start_info_gpa` must be the address the hypervisor passed in RDI, with RAM still
/// identity-mapped as at entry (the SDK reads StartInfo and the command line through it).
pub unsafe fn init(start_info_gpa: u64) -> Result<&'static StartInfo, StartError> {
    crate::hypercall::set_default_insn(crate::hypercall::native_insn());
    let boot = read_boot(start_info_gpa)?;
    match BOOT.set(boot) {
        Some(boot) => Ok(&boot.info),
        None => Err(StartError::AlreadyStarted),
    }
}

/// Reports why [`init`] refused to start the kernel and ends the domain with
/// [`ShutdownReason::Crash`](lamina_abi::sched::ShutdownReason::Crash), as the SDK's own
/// `_start` does.
pub fn refuse(error: StartError) -> ! {
    crate::println!("lamina-guest-sdk: cannot start the kernel: {error}");
    crate::hypercall::shutdown(lamina_abi::sched::ShutdownReason::Crash)
}

#[cfg(all(target_os = "none", feature = "entry"))]
core::arch::global_asm!(
    ".section .text._start,\"ax\",@progbits",
    ".global _start",
    ".type _start,@function",
    "_start:",
    "    xor ebp, ebp",
    "    and rsp, -16",
    "    sub rsp, {scratch}",
    // RDI (the StartInfo address) is the first argument as it stands.
    "    call {start}",
    "    ud2",
    ".size _start, . - _start",
    start = sym lamina_sdk_start,
    scratch = const TOP_OF_RAM_SCRATCH,
);

#[cfg(all(target_os = "none", feature = "entry"))]
unsafe extern "Rust" {
    /// Defined by [`entry!`](crate::entry) in the kernel's crate.
    fn __lamina_kernel_main(start: &'static StartInfo) -> !;
}

/// The Rust side of `_start` (see the module documentation).
#[cfg(all(target_os = "none", feature = "entry"))]
extern "sysv64" fn lamina_sdk_start(start_info_gpa: u64) -> ! {
    // SAFETY: `_start` passes RDI as the hypervisor set it, and runs once.
    let info = match unsafe { init(start_info_gpa) } {
        Ok(info) => info,
        Err(error) => refuse(error),
    };
    // SAFETY: `entry!` defines `__lamina_kernel_main` with exactly this signature; it is
    // called once, here.
    unsafe { __lamina_kernel_main(info) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lamina_abi::layout::CMDLINE_GPA;

    fn good_info() -> StartInfo {
        StartInfo {
            magic: START_INFO_MAGIC,
            abi_version: lamina_abi::abi_version(),
            domain_id: 1,
            flags: 0,
            mem_bytes: 16 << 20,
            image_start: 0x20_0000,
            image_end: 0x21_0000,
            stack_top: 16 << 20,
            cmdline_gpa: CMDLINE_GPA,
            cmdline_len: 10,
            nr_vcpus: 1,
            console_port: 1,
            name: [0; 32],
            shared_info_gpa: lamina_abi::layout::SHARED_INFO_GPA,
            console_ring_gpa: lamina_abi::layout::CONSOLE_RING_GPA,
            tsc_khz: 1_000_000,
        }
    }

    #[test]
    fn a_good_start_info_passes() {
        assert_eq!(check(&good_info()), Ok(()));
        let newer_minor = StartInfo {
            abi_version: lamina_abi::abi_version() + 1,
            ..good_info()
        };
        assert_eq!(check(&newer_minor), Ok(()));
    }

    #[test]
    fn bad_magic_and_major_version_are_refused() {
        let info = StartInfo {
            magic: 0,
            ..good_info()
        };
        assert_eq!(check(&info), Err(StartError::BadMagic(0)));
        let next_major = (u32::from(ABI_VERSION_MAJOR) + 1) << 16;
        let info = StartInfo {
            abi_version: next_major,
            ..good_info()
        };
        assert!(matches!(
            check(&info),
            Err(StartError::IncompatibleVersion { .. })
        ));
    }

    #[test]
    fn the_command_line_must_fit_in_ram_with_its_nul() {
        let too_long = StartInfo {
            cmdline_len: CMDLINE_MAX as u64 + 1,
            ..good_info()
        };
        assert_eq!(
            check(&too_long),
            Err(StartError::CmdlineTooLong(CMDLINE_MAX as u64 + 1))
        );
        let at_the_end = StartInfo {
            cmdline_gpa: (16 << 20) - 10,
            ..good_info()
        };
        assert!(matches!(
            check(&at_the_end),
            Err(StartError::CmdlineOutsideRam { .. })
        ));
        let one_below = StartInfo {
            cmdline_gpa: (16 << 20) - 11,
            ..good_info()
        };
        assert_eq!(check(&one_below), Ok(()));
        let wrapping = StartInfo {
            cmdline_gpa: u64::MAX - 3,
            ..good_info()
        };
        assert!(matches!(
            check(&wrapping),
            Err(StartError::CmdlineOutsideRam { .. })
        ));
    }

    #[test]
    fn read_boot_copies_start_info_and_command_line() {
        let line = b"sample mem=16M\0";
        let info = StartInfo {
            cmdline_gpa: line.as_ptr() as u64,
            cmdline_len: line.len() as u64 - 1,
            mem_bytes: u64::MAX,
            ..good_info()
        };
        let boot = read_boot(&info as *const StartInfo as u64).unwrap();
        assert_eq!(boot.info.domain_id, 1);
        assert_eq!(&boot.cmdline[..boot.cmdline_len], b"sample mem=16M");

        let not_utf8 = b"\xff\0";
        let info = StartInfo {
            cmdline_gpa: not_utf8.as_ptr() as u64,
            cmdline_len: 1,
            ..info
        };
        let result = read_boot(&info as *const StartInfo as u64);
        assert!(matches!(result, Err(StartError::CmdlineNotUtf8)));
        assert!(matches!(
            read_boot(0),
            Err(StartError::BadStartInfoAddress(0))
        ));
        assert!(matches!(
            read_boot(0x1004),
            Err(StartError::BadStartInfoAddress(0x1004))
        ));
    }

    #[test]
    fn init_keeps_the_start_info_once_and_refuses_a_second_start() {
        let line = b"own-entry mem=16M\0";
        let info = StartInfo {
            cmdline_gpa: line.as_ptr() as u64,
            cmdline_len: line.len() as u64 - 1,
            mem_bytes: u64::MAX,
            domain_id: 7,
            ..good_info()
        };
        let gpa = &info as *const StartInfo as u64;
        // SAFETY: `gpa` points at a StartInfo whose command line is ours, as at entry.
        let kept = unsafe { init(gpa) }.unwrap();
        assert_eq!(kept.domain_id, 7);
        assert_eq!(start_info().domain_id, 7);
        assert_eq!(start_info_gpa(), gpa);
        assert_eq!(cmdline(), "own-entry mem=16M");
        assert_eq!(cmdline_value("mem"), Some("16M"));
        // SAFETY: as above.
        let again = unsafe { init(gpa) };
        assert!(matches!(again, Err(StartError::AlreadyStarted)));
    }

    #[test]
    fn errors_explain_themselves() {
        let text = StartError::BadMagic(0x1234).to_string();
        assert_eq!(text, "StartInfo magic 0x00001234, expected 0x414e4d4c");
    }
}

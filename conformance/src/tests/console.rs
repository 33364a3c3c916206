//! Tests of `console_io` write and read (docs/abi.md 3.2) and of guest-physical buffers (2.5).

use lamina_abi::console::{CONSOLE_WRITE_MAX, ConsoleOp};
use lamina_abi::{Errno, Hypercall};
use lamina_guest_sdk::hypercall::{HypercallInsn, gpa_of, hypercall3, hypercall3_with};
use lamina_guest_sdk::start::TOP_OF_RAM_SCRATCH;
use lamina_guest_sdk::start_info;

use crate::framework::{Status, check, check_eq};

/// `console_io(op, gpa, len)` through `insn`; returns RAX.
fn console_io_with(insn: HypercallInsn, op: u64, gpa: u64, len: u64) -> Status {
    // SAFETY: console operations only read guest memory; an address outside RAM is the point
    // of some tests and must be refused by the hypervisor, not dereferenced by us.
    Status(unsafe { hypercall3_with(insn, Hypercall::ConsoleIo as u64, op, gpa, len) })
}

/// `console_io(op, gpa, len)` through the default instruction.
fn console_io(op: u64, gpa: u64, len: u64) -> Status {
    // SAFETY: as in `console_io_with`.
    Status(unsafe { hypercall3(Hypercall::ConsoleIo as u64, op, gpa, len) })
}

const WRITE: u64 = ConsoleOp::Write as u64;

conformance_test! {
    title: "console write returns the length written; an empty write returns 0",
    section: "3.2 console_io",
    expect: Success,
}
pub(super) fn console_write_ok() {
    for insn in HypercallInsn::ALL {
        let line: &[u8] = match insn {
            HypercallInsn::Vmcall => b"console_write_ok: a line from the image, via vmcall\n",
            HypercallInsn::Vmmcall => b"console_write_ok: a line from the image, via vmmcall\n",
        };
        let written = console_io_with(insn, WRITE, gpa_of(line), line.len() as u64);
        check_eq!(
            format_args!("write of {} bytes via {}", line.len(), insn.name()),
            Status(line.len() as u64),
            written
        );
    }

    // A buffer on the stack, near the top of RAM.
    let on_stack = core::hint::black_box(*b"console_write_ok: a line from the stack\n");
    let written = console_io(WRITE, gpa_of(&on_stack), on_stack.len() as u64);
    check_eq!(
        "write from the stack",
        Status(on_stack.len() as u64),
        written
    );

    let line = b"never printed";
    check_eq!(
        "write of 0 bytes",
        Status(0),
        console_io(WRITE, gpa_of(line), 0)
    );
}

conformance_test! {
    title: "a console write of exactly CONSOLE_WRITE_MAX bytes succeeds",
    section: "3.2 console_io",
    expect: Success,
}
pub(super) fn console_write_max_length_ok() {
    const LINES: usize = 32;
    const LINE_BYTES: usize = CONSOLE_WRITE_MAX as usize / LINES;
    let mut text = [b'.'; CONSOLE_WRITE_MAX as usize];
    for (number, line) in text.chunks_exact_mut(LINE_BYTES).enumerate() {
        let prefix = b"console_write_max_length_ok: line ";
        line[..prefix.len()].copy_from_slice(prefix);
        line[prefix.len()] = b'0' + (number / 10) as u8;
        line[prefix.len() + 1] = b'0' + (number % 10) as u8;
        line[prefix.len() + 2] = b' ';
        line[LINE_BYTES - 1] = b'\n';
    }
    check_eq!(
        "write of CONSOLE_WRITE_MAX bytes",
        Status(CONSOLE_WRITE_MAX),
        console_io(WRITE, gpa_of(&text), CONSOLE_WRITE_MAX)
    );
}

conformance_test! {
    title: "console writes from buffers not inside RAM return -EFAULT, and the domain runs on",
    section: "2.5 Guest-physical buffers",
    expect: Success,
}
pub(super) fn console_write_oob_efault() {
    let mem = start_info().mem_bytes;
    let cases: [(&str, u64, u64); 7] = [
        ("buffer starting at the end of RAM", mem, 16),
        ("buffer 1 GiB above the end of RAM", mem + (1 << 30), 1),
        ("buffer straddling the end of RAM by one byte", mem - 15, 16),
        ("buffer at the highest address", u64::MAX, 1),
        ("buffer wrapping past the highest address", u64::MAX - 7, 16),
        ("buffer wrapping around to low RAM", u64::MAX - 0xf, 0x100),
        ("buffer at a non-canonical address", 1 << 63, 16),
    ];
    for (what, gpa, len) in cases {
        check_eq!(
            format_args!("console write, {what} (gpa {gpa:#x}, len {len:#x})"),
            Status::err(Errno::EFAULT),
            console_io(WRITE, gpa, len)
        );
    }
    // The last bytes of RAM are inside it: the SDK leaves them out of the stack.
    let line: &[u8; TOP_OF_RAM_SCRATCH as usize] = b"top of RAM: ok!\n";
    let last = mem - TOP_OF_RAM_SCRATCH;
    // SAFETY: `_start` leaves `[mem - TOP_OF_RAM_SCRATCH, mem)` unused, and RAM is
    // identity-mapped.
    unsafe { core::ptr::copy_nonoverlapping(line.as_ptr(), last as *mut u8, line.len()) };
    check_eq!(
        "console write of the last bytes of RAM",
        Status(line.len() as u64),
        console_io(WRITE, last, line.len() as u64)
    );

    // An empty buffer is never out of bounds (docs/abi.md 2.5, 3.2).
    check_eq!(
        "console write of 0 bytes at the end of RAM",
        Status(0),
        console_io(WRITE, mem, 0)
    );
    check_eq!(
        "console write of 0 bytes at the highest address",
        Status(0),
        console_io(WRITE, u64::MAX, 0)
    );

    // The domain carries on.
    let line = b"console_write_oob_efault: still running\n";
    check_eq!(
        "console write after the faults",
        Status(line.len() as u64),
        console_io(WRITE, gpa_of(line), line.len() as u64)
    );
}

conformance_test! {
    title: "a console write longer than CONSOLE_WRITE_MAX returns -EINVAL",
    section: "3.2 console_io",
    expect: Success,
}
pub(super) fn console_write_too_long_einval() {
    static TOO_LONG: [u8; CONSOLE_WRITE_MAX as usize + 1] = [b'x'; CONSOLE_WRITE_MAX as usize + 1];
    let gpa = gpa_of(&TOO_LONG);
    check_eq!(
        "console write of CONSOLE_WRITE_MAX + 1 bytes",
        Status::err(Errno::EINVAL),
        console_io(WRITE, gpa, CONSOLE_WRITE_MAX + 1)
    );
    check_eq!(
        "console write of u64::MAX bytes",
        Status::err(Errno::EINVAL),
        console_io(WRITE, gpa, u64::MAX)
    );
    // The length is checked before the buffer.
    check_eq!(
        "console write of CONSOLE_WRITE_MAX + 1 bytes beyond RAM",
        Status::err(Errno::EINVAL),
        console_io(WRITE, start_info().mem_bytes, CONSOLE_WRITE_MAX + 1)
    );
}

conformance_test! {
    title: "unknown console_io operations return -ENOSYS",
    section: "3.2 console_io",
    expect: Success,
}
pub(super) fn console_unknown_op_enosys() {
    let line = b"console_unknown_op_enosys: must not be printed\n";
    // 2 is the first unassigned operation (ABI 1.0: write 0, read 1); 1 << 32 would be write
    // to a hypervisor that looks at EDI only.
    for op in [2, 3, 0xffff, 1 << 32, u64::MAX] {
        check_eq!(
            format_args!("console_io operation {op:#x}"),
            Status::err(Errno::ENOSYS),
            console_io(op, gpa_of(line), line.len() as u64)
        );
    }
    // The operation is checked before the buffer.
    check_eq!(
        "console_io operation 2 with a buffer beyond RAM",
        Status::err(Errno::ENOSYS),
        console_io(2, start_info().mem_bytes, 16)
    );
}

/// A console read into `[gpa, gpa + len)`, an address the hypervisor must refuse or the
/// SDK's unused top of RAM.
fn console_read_refused_or_scratch(gpa: u64, len: u64) -> Status {
    // SAFETY: the hypervisor must refuse every address outside RAM; the only RAM these
    // buffers reach is the top `TOP_OF_RAM_SCRATCH` bytes, which `_start` leaves unused.
    unsafe { crate::hv::console_read_at(gpa, len) }
}

conformance_test! {
    title: "a console read with no input waiting returns 0 and writes nothing; an empty read returns 0 anywhere",
    section: "3.2 console_io",
    expect: Success,
}
pub(super) fn console_read_no_input_zero() {
    // Nobody types on a conformance run's serial line.
    let mut buffer = [0xa5u8; 64];
    check_eq!(
        "console read of 64 bytes with no input waiting",
        Status(0),
        crate::hv::console_read(&mut buffer)
    );
    check!(
        buffer.iter().all(|&byte| byte == 0xa5),
        "a console read that returned 0 wrote the buffer: {:02x?}",
        &buffer[..16]
    );
    // An empty read looks at nothing else.
    let mem = start_info().mem_bytes;
    for gpa in [gpa_of(&buffer), mem, u64::MAX] {
        check_eq!(
            format_args!("console read of 0 bytes at {gpa:#x}"),
            Status(0),
            console_read_refused_or_scratch(gpa, 0)
        );
    }
}

conformance_test! {
    title: "a console read longer than CONSOLE_WRITE_MAX returns -EINVAL, checked before the buffer",
    section: "3.2 console_io",
    expect: Success,
}
pub(super) fn console_read_too_long_einval() {
    let mem = start_info().mem_bytes;
    // The length is checked before the buffer.
    for (gpa, len) in [
        (0x10_0000, CONSOLE_WRITE_MAX + 1),
        (0x10_0000, u64::MAX),
        (mem, CONSOLE_WRITE_MAX + 1),
        (0x10_0000, 1 << 32 | 16),
    ] {
        check_eq!(
            format_args!("console read of {len:#x} bytes at {gpa:#x}"),
            Status::err(Errno::EINVAL),
            console_read_refused_or_scratch(gpa, len)
        );
    }
}

conformance_test! {
    title: "console reads into buffers not inside RAM (beyond, straddling, wrapping) return -EFAULT",
    section: "3.2 console_io",
    expect: Success,
}
pub(super) fn console_read_oob_efault() {
    let mem = start_info().mem_bytes;
    let cases: [(&str, u64, u64); 6] = [
        ("buffer starting at the end of RAM", mem, 16),
        ("buffer 1 GiB above the end of RAM", mem + (1 << 30), 1),
        ("buffer straddling the end of RAM by one byte", mem - 15, 16),
        ("buffer at the highest address", u64::MAX, 1),
        ("buffer wrapping around to low RAM", u64::MAX - 0xf, 0x100),
        ("buffer at a non-canonical address", 1 << 63, 16),
    ];
    for (what, gpa, len) in cases {
        check_eq!(
            format_args!("console read, {what} (gpa {gpa:#x}, len {len:#x})"),
            Status::err(Errno::EFAULT),
            console_read_refused_or_scratch(gpa, len)
        );
    }
    check_eq!(
        "console read into the last bytes of RAM",
        Status(0),
        console_read_refused_or_scratch(mem - TOP_OF_RAM_SCRATCH, TOP_OF_RAM_SCRATCH)
    );
}

//! The conformance tests: names, titles, the docs/abi.md section each one checks, and how a
//! run ends when the test passes.
//!
//! Pure data without `use` or dependencies: the host tool (xtask) includes this very file with
//! `#[path]` to know which domains to boot and how to judge them, and the guest runs the body
//! registered under the same name (`tests::REGISTRY`, checked against this list at compile
//! time). Sections are docs/abi.md headings, number and title.

/// One conformance test: one domain, booted with the test's name as its domain name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestInfo {
    /// The test's name, also the domain name (and `test=<name>` on its command line).
    pub name: &'static str,
    /// One line saying what the test checks.
    pub title: &'static str,
    /// The docs/abi.md section the test checks, e.g. `"3.2 console_io"`.
    pub section: &'static str,
    /// What a passing run looks like.
    pub expect: Expect,
}

/// How a passing run ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The guest prints `Test result: SUCCESS` and powers off.
    Success,
    /// The hypervisor stops the domain: it prints `lamina: domain <ID> <name> stopped: <detail>`
    /// with this detail, and the guest prints no result line.
    StoppedByHv(&'static str),
}

/// Every test, grouped by docs/abi.md section.
pub const CATALOG: &[TestInfo] = &[
    TestInfo {
        name: "version_via_vmcall",
        title: "VMCALL reaches the hypervisor: version returns the ABI version, as CPUID does",
        section: "2.1 Hypercall instructions",
        expect: Expect::Success,
    },
    TestInfo {
        name: "version_via_vmmcall",
        title: "VMMCALL reaches the hypervisor: version returns the ABI version, as CPUID does",
        section: "2.1 Hypercall instructions",
        expect: Expect::Success,
    },
    TestInfo {
        name: "hypercall_preserves_registers",
        title: "version, console_io and sched_op change RAX only, with either instruction",
        section: "2.2 Registers",
        expect: Expect::Success,
    },
    TestInfo {
        name: "hypercall_from_cpl3_eperm",
        title: "a hypercall from CPL 3 returns -EPERM, with either instruction",
        section: "2.3 Privilege",
        expect: Expect::Success,
    },
    TestInfo {
        name: "unknown_hypercall_enosys",
        title: "unknown hypercall numbers return -ENOSYS and preserve every other register",
        section: "2.4 Errors",
        expect: Expect::Success,
    },
    TestInfo {
        name: "console_write_oob_efault",
        title: "console writes from buffers not inside RAM return -EFAULT, and the domain runs on",
        section: "2.5 Guest-physical buffers",
        expect: Expect::Success,
    },
    TestInfo {
        name: "console_write_ok",
        title: "console write returns the length written; an empty write returns 0",
        section: "3.2 console_io",
        expect: Expect::Success,
    },
    TestInfo {
        name: "console_write_max_length_ok",
        title: "a console write of exactly CONSOLE_WRITE_MAX bytes succeeds",
        section: "3.2 console_io",
        expect: Expect::Success,
    },
    TestInfo {
        name: "console_write_too_long_einval",
        title: "a console write longer than CONSOLE_WRITE_MAX returns -EINVAL",
        section: "3.2 console_io",
        expect: Expect::Success,
    },
    TestInfo {
        name: "console_unknown_op_enosys",
        title: "unknown console_io operations return -ENOSYS",
        section: "3.2 console_io",
        expect: Expect::Success,
    },
    TestInfo {
        name: "sched_yield_returns_zero",
        title: "sched_op yield returns 0, with either instruction",
        section: "3.3 sched_op",
        expect: Expect::Success,
    },
    TestInfo {
        name: "sched_unknown_op_enosys",
        title: "unknown sched_op operations return -ENOSYS",
        section: "3.3 sched_op",
        expect: Expect::Success,
    },
    TestInfo {
        name: "shutdown_unknown_reason_einval",
        title: "shutdown with an unknown reason returns -EINVAL and the domain runs on",
        section: "3.3 sched_op",
        expect: Expect::Success,
    },
    TestInfo {
        name: "entry_state_matches_spec",
        title: "segments, flags, control registers and descriptor tables at entry are as specified",
        section: "4.1 Entry state",
        expect: Expect::Success,
    },
    TestInfo {
        name: "boot_tables_identity_map_ram",
        title: "the boot page tables map all RAM 1:1 with writable user 2 MiB pages",
        section: "4.2 Guest-physical layout",
        expect: Expect::Success,
    },
    TestInfo {
        name: "start_info_fields_valid",
        title: "every StartInfo field is consistent with the layout and the command line",
        section: "4.3 StartInfo",
        expect: Expect::Success,
    },
    TestInfo {
        name: "cpuid_signature_and_version",
        title: "CPUID reports the hypervisor bit, the Lamina signature, version and features",
        section: "5 CPUID discovery",
        expect: Expect::Success,
    },
    TestInfo {
        name: "uart_output_reaches_console",
        title: "the emulated UART reports an empty transmitter and takes a line",
        section: "7.1 Emulated UART",
        expect: Expect::Success,
    },
    TestInfo {
        name: "unknown_msr_injects_gp",
        title: "RDMSR and WRMSR of an unimplemented MSR raise #GP(0) in the guest",
        section: "7.3 MSRs",
        expect: Expect::Success,
    },
    TestInfo {
        name: "unemulated_port_reads_all_ones",
        title: "reads from a port nothing emulates return all ones, writes are dropped",
        section: "7.4 I/O ports",
        expect: Expect::Success,
    },
    TestInfo {
        name: "triple_fault",
        title: "an exception without an IDT triple-faults and the hypervisor stops the domain",
        section: "7.5 Triple faults",
        expect: Expect::StoppedByHv("triple fault"),
    },
    TestInfo {
        name: "hlt_without_wake_source_stopped",
        title: "HLT with nothing that could ever wake the vCPU stops the domain instead of spinning",
        section: "7.2 HLT",
        expect: Expect::StoppedByHv("HLT with nothing that can ever wake the vCPU"),
    },
    TestInfo {
        name: "access_outside_ram_stopped",
        title: "a write to a guest-physical address outside RAM stops the domain",
        section: "4.2 Guest-physical layout",
        expect: Expect::StoppedByHv("outside its memory"),
    },
];

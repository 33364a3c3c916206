//! Speculative-execution defences at the domain boundary (what Xen's `spec-ctrl=` and KVM's
//! mitigations do): one domain must not steer or read another through the branch predictors
//! and the CPU's buffers.
//!
//! | defence | when | against | needs |
//! |---|---|---|---|
//! | `rsb-fill` | every VM exit, before the first `ret` | guest return-stack entries steering the hypervisor (SDM "Return Stack Buffer", AMD "Software Techniques for Managing Speculation") | nothing: calls and returns |
//! | `ibpb` | the CPU switches from one domain's vCPU to another's | branch-target injection across domains (Spectre v2) | IBPB: CPUID.7.0:EDX[26] (Intel), CPUID.80000008:EBX[12] (AMD) |
//! | `verw` | every VM entry | MDS: stale data in CPU buffers (Intel) | MD_CLEAR: CPUID.7.0:EDX[10]; not needed with ARCH_CAPABILITIES.MDS_NO |
//! | `l1d-flush` | every VM entry | L1TF: the L1 data cache (Intel) | IA32_FLUSH_CMD: CPUID.7.0:EDX[28]; not needed with RDCL_NO or SKIP_L1DFL_VMENTRY |
//!
//! Everything is enumerated from CPUID (and IA32_ARCH_CAPABILITIES where CPUID offers it),
//! never assumed. Each defence is on by default where the CPU has what it needs and is
//! affected; `spec-ctrl=` on the hypervisor's command line turns defences off or on by name
//! (`spec-ctrl=no-ibpb,no-verw`, `spec-ctrl=none`, `spec-ctrl=all`). A defence the CPU cannot
//! do stays off whatever the command line says, and the boot log says why; VERW, an
//! instruction every CPU has, can be forced (`spec-ctrl=verw`) where it is not needed, to
//! measure it. The emulators this project is tested on (QEMU TCG, Bochs) offer none of the
//! MSRs, so there `rsb-fill` runs by default and `verw` when forced.
//!
//! Guests get none of IA32_SPEC_CTRL, IA32_PRED_CMD, IA32_ARCH_CAPABILITIES and
//! IA32_FLUSH_CMD in ABI 1.4: CPUID hides them (`common::vcpu::cpuid`) and the MSRs raise #GP
//! (docs/abi.md 7.3). The defences above do not depend on the guest.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU32, Ordering};

/// IA32_SPEC_CTRL (0x48) bits.
pub mod spec_ctrl_bits {
    /// Indirect Branch Restricted Speculation.
    pub const IBRS: u64 = 1 << 0;
    /// Single Thread Indirect Branch Predictors.
    pub const STIBP: u64 = 1 << 1;
    /// Speculative Store Bypass Disable.
    pub const SSBD: u64 = 1 << 2;
}

/// IA32_SPEC_CTRL.
pub const MSR_SPEC_CTRL: u32 = 0x48;
/// IA32_PRED_CMD: bit 0 is IBPB.
pub const MSR_PRED_CMD: u32 = 0x49;
/// IA32_ARCH_CAPABILITIES.
pub const MSR_ARCH_CAPABILITIES: u32 = 0x10a;
/// IA32_FLUSH_CMD: bit 0 flushes the L1 data cache.
pub const MSR_FLUSH_CMD: u32 = 0x10b;

// IA32_ARCH_CAPABILITIES bits (SDM Vol. 4, Table 2-2).
const ARCH_CAP_RDCL_NO: u64 = 1 << 0;
const ARCH_CAP_SKIP_L1DFL_VMENTRY: u64 = 1 << 3;
const ARCH_CAP_MDS_NO: u64 = 1 << 5;

/// What the CPU offers and what it is affected by, from CPUID and ARCH_CAPABILITIES.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSpeculation {
    /// IA32_PRED_CMD.IBPB exists.
    pub ibpb: bool,
    /// IA32_SPEC_CTRL bits the CPU implements (0: no such MSR).
    pub spec_ctrl_bits: u64,
    /// VERW clears the CPU buffers (MD_CLEAR).
    pub md_clear: bool,
    /// The CPU is affected by MDS (an Intel CPU without MDS_NO).
    pub mds_affected: bool,
    /// IA32_FLUSH_CMD exists.
    pub l1d_flush_cmd: bool,
    /// A VM entry must flush L1D against L1TF (an Intel CPU without RDCL_NO or
    /// SKIP_L1DFL_VMENTRY).
    pub l1tf_affected: bool,
}

impl CpuSpeculation {
    /// Reads the features from `cpuid(leaf, subleaf)` (`[eax, ebx, ecx, edx]`); `arch_caps`
    /// reads IA32_ARCH_CAPABILITIES, called only when CPUID says the MSR exists.
    pub fn enumerate(
        cpuid: impl Fn(u32, u32) -> [u32; 4],
        arch_caps: impl FnOnce() -> u64,
    ) -> Self {
        let max_leaf = cpuid(0, 0)[0];
        let vendor = cpuid(0, 0);
        let intel = (vendor[1], vendor[3], vendor[2]) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e);
        let leaf7_edx = if max_leaf >= 7 { cpuid(7, 0)[3] } else { 0 };
        let bit = |word: u32, n: u32| word & (1 << n) != 0;
        let max_ext = cpuid(0x8000_0000, 0)[0];
        let ext8_ebx = if max_ext >= 0x8000_0008 {
            cpuid(0x8000_0008, 0)[1]
        } else {
            0
        };
        let mut spec_ctrl_bits = 0;
        if bit(leaf7_edx, 26) || bit(ext8_ebx, 14) {
            spec_ctrl_bits |= spec_ctrl_bits::IBRS;
        }
        if bit(leaf7_edx, 27) || bit(ext8_ebx, 15) {
            spec_ctrl_bits |= spec_ctrl_bits::STIBP;
        }
        if bit(leaf7_edx, 31) || bit(ext8_ebx, 24) {
            spec_ctrl_bits |= spec_ctrl_bits::SSBD;
        }
        let caps = if bit(leaf7_edx, 29) { arch_caps() } else { 0 };
        CpuSpeculation {
            ibpb: bit(leaf7_edx, 26) || bit(ext8_ebx, 12),
            spec_ctrl_bits,
            md_clear: bit(leaf7_edx, 10),
            mds_affected: intel && caps & ARCH_CAP_MDS_NO == 0,
            l1d_flush_cmd: bit(leaf7_edx, 28),
            l1tf_affected: intel && caps & (ARCH_CAP_RDCL_NO | ARCH_CAP_SKIP_L1DFL_VMENTRY) == 0,
        }
    }
}

/// The defences, by name as `spec-ctrl=` spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Defence {
    /// Overwrite the return stack buffer after every VM exit.
    RsbFill,
    /// IBPB when the CPU switches domains.
    Ibpb,
    /// VERW before every VM entry.
    Verw,
    /// L1D flush before every VM entry.
    L1dFlush,
}

impl Defence {
    /// Every defence, in the order the boot log lists them.
    pub const ALL: [Defence; 4] = [
        Defence::RsbFill,
        Defence::Ibpb,
        Defence::Verw,
        Defence::L1dFlush,
    ];

    /// Its name on the command line and in the log.
    pub fn name(self) -> &'static str {
        match self {
            Defence::RsbFill => "rsb-fill",
            Defence::Ibpb => "ibpb",
            Defence::Verw => "verw",
            Defence::L1dFlush => "l1d-flush",
        }
    }

    /// Whether the CPU can do it (`Err`: why not) and, if it can, whether it is on by default
    /// (`Ok(None)`) or why not (`Ok(Some(why))`; `spec-ctrl=<name>` still turns it on).
    fn availability(self, cpu: &CpuSpeculation) -> Result<Option<&'static str>, &'static str> {
        match self {
            Defence::RsbFill => Ok(None),
            Defence::Ibpb if cpu.ibpb => Ok(None),
            Defence::Ibpb => Err("CPUID offers no IBPB"),
            // VERW exists on every CPU; without MD_CLEAR it clears nothing, so it is only worth
            // forcing to measure what it would cost.
            Defence::Verw if !cpu.md_clear => Ok(Some("no MD_CLEAR")),
            Defence::Verw if !cpu.mds_affected => Ok(Some("not affected")),
            Defence::Verw => Ok(None),
            Defence::L1dFlush if !cpu.l1d_flush_cmd => Err("CPUID offers no L1D_FLUSH"),
            Defence::L1dFlush if !cpu.l1tf_affected => Ok(Some("not affected")),
            Defence::L1dFlush => Ok(None),
        }
    }
}

/// What the command line asked for each defence (`None`: the default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Choices([Option<bool>; 4]);

impl Choices {
    /// Parses the value of `spec-ctrl=`: a comma-separated list of `all`, `none` (or `no`),
    /// a defence's name (on) or `no-<name>` (off); later items win.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut choices = Choices::default();
        for item in value.split(',').filter(|item| !item.is_empty()) {
            match item {
                "all" => choices.0 = [Some(true); 4],
                "none" | "no" => choices.0 = [Some(false); 4],
                _ => {
                    let (name, on) = match item.strip_prefix("no-") {
                        Some(name) => (name, false),
                        None => (item, true),
                    };
                    let index = Defence::ALL
                        .iter()
                        .position(|d| d.name() == name)
                        .ok_or_else(|| format!("spec-ctrl: unknown defence `{name}`"))?;
                    choices.0[index] = Some(on);
                }
            }
        }
        Ok(choices)
    }

    /// The choices of the hypervisor's command line (`spec-ctrl=`; the last one counts).
    pub fn from_cmdline(cmdline: &str) -> Result<Self, String> {
        match cmdline
            .split_whitespace()
            .filter_map(|word| word.strip_prefix("spec-ctrl="))
            .next_back()
        {
            Some(value) => Choices::parse(value),
            None => Ok(Choices::default()),
        }
    }
}

/// The defences in force.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Defences {
    /// Fill the return stack buffer after every VM exit.
    pub rsb_fill: bool,
    /// IBPB when the CPU switches from one domain's vCPU to another domain's.
    pub ibpb_on_domain_switch: bool,
    /// VERW before every VM entry.
    pub verw_on_entry: bool,
    /// L1D flush before every VM entry.
    pub l1d_flush_on_entry: bool,
}

/// Decides the defences for `cpu` under `choices`; also returns one boot-log word per defence
/// (`rsb-fill=on`, `ibpb=off(spec-ctrl)`, `verw=unavailable(CPUID offers no MD_CLEAR)`, ...).
pub fn decide(cpu: &CpuSpeculation, choices: &Choices) -> (Defences, Vec<String>) {
    let mut defences = Defences::default();
    let mut log = Vec::new();
    for (defence, choice) in Defence::ALL.into_iter().zip(choices.0) {
        let (on, state) = match (defence.availability(cpu), choice) {
            (Err(why), _) => (false, format!("unavailable({why})")),
            (Ok(_), Some(false)) => (false, String::from("off(spec-ctrl)")),
            (Ok(_), Some(true)) | (Ok(None), None) => (true, String::from("on")),
            (Ok(Some(why)), None) => (false, format!("off({why})")),
        };
        log.push(format!("{}={state}", defence.name()));
        match defence {
            Defence::RsbFill => defences.rsb_fill = on,
            Defence::Ibpb => defences.ibpb_on_domain_switch = on,
            Defence::Verw => defences.verw_on_entry = on,
            Defence::L1dFlush => defences.l1d_flush_on_entry = on,
        }
    }
    (defences, log)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: [u32; 4] = [0x20, 0x756e_6547, 0x6c65_746e, 0x4965_6e69];
    const AMD: [u32; 4] = [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65];

    fn cpu(vendor: [u32; 4], leaf7_edx: u32, ext8_ebx: u32, caps: u64) -> CpuSpeculation {
        CpuSpeculation::enumerate(
            |leaf, _| match leaf {
                0 => vendor,
                7 => [0, 0, 0, leaf7_edx],
                0x8000_0000 => [0x8000_0008, 0, 0, 0],
                0x8000_0008 => [0, ext8_ebx, 0, 0],
                _ => [0; 4],
            },
            || caps,
        )
    }

    #[test]
    fn an_emulator_without_the_msrs_gets_only_the_rsb_fill() {
        let qemu = cpu(AMD, 0, 0, 0);
        let (defences, log) = decide(&qemu, &Choices::default());
        assert_eq!(
            defences,
            Defences {
                rsb_fill: true,
                ..Defences::default()
            }
        );
        assert_eq!(log[0], "rsb-fill=on");
        assert_eq!(log[1], "ibpb=unavailable(CPUID offers no IBPB)");
        assert_eq!(log[2], "verw=off(no MD_CLEAR)");
        // Asking for an MSR the CPU lacks changes nothing; VERW can be forced, to measure it.
        let (forced, log) = decide(&qemu, &Choices::parse("all").unwrap());
        assert_eq!(
            forced,
            Defences {
                rsb_fill: true,
                verw_on_entry: true,
                ..Defences::default()
            }
        );
        assert_eq!(log[3], "l1d-flush=unavailable(CPUID offers no L1D_FLUSH)");
    }

    #[test]
    fn an_affected_intel_cpu_gets_every_defence_and_the_command_line_turns_them_off() {
        // IBRS/IBPB, STIBP, L1D_FLUSH, ARCH_CAPABILITIES, SSBD, MD_CLEAR; no *_NO bits.
        let edx = (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 31) | (1 << 10);
        let skylake = cpu(INTEL, edx, 0, 0);
        assert!(skylake.mds_affected && skylake.l1tf_affected);
        let (defences, _) = decide(&skylake, &Choices::default());
        assert_eq!(
            defences,
            Defences {
                rsb_fill: true,
                ibpb_on_domain_switch: true,
                verw_on_entry: true,
                l1d_flush_on_entry: true,
            }
        );
        let (off, log) = decide(&skylake, &Choices::parse("no-verw,no-l1d-flush").unwrap());
        assert!(!off.verw_on_entry && !off.l1d_flush_on_entry && off.ibpb_on_domain_switch);
        assert_eq!(log[2], "verw=off(spec-ctrl)");
        let (none, _) = decide(&skylake, &Choices::parse("none").unwrap());
        assert_eq!(none, Defences::default());
        // A CPU that says it is not affected needs no VERW or L1D flush unless asked.
        let fixed = cpu(INTEL, edx, 0, ARCH_CAP_MDS_NO | ARCH_CAP_RDCL_NO);
        let (defences, log) = decide(&fixed, &Choices::default());
        assert!(!defences.verw_on_entry && !defences.l1d_flush_on_entry);
        assert_eq!(log[2], "verw=off(not affected)");
        let (asked, _) = decide(&fixed, &Choices::parse("verw").unwrap());
        assert!(asked.verw_on_entry);
    }

    #[test]
    fn amd_features_come_from_the_extended_leaf() {
        let zen = cpu(AMD, 0, (1 << 12) | (1 << 14) | (1 << 24), 0);
        assert!(zen.ibpb && !zen.mds_affected && !zen.l1tf_affected);
        assert_eq!(
            zen.spec_ctrl_bits,
            spec_ctrl_bits::IBRS | spec_ctrl_bits::SSBD
        );
    }

    #[test]
    fn the_command_line_is_parsed_and_bad_names_refused() {
        assert_eq!(
            Choices::from_cmdline("loglevel=debug"),
            Ok(Choices::default())
        );
        let choices = Choices::from_cmdline("spec-ctrl=none,rsb-fill").unwrap();
        assert_eq!(choices.0[0], Some(true));
        assert_eq!(choices.0[1], Some(false));
        assert!(Choices::from_cmdline("spec-ctrl=no-retpoline").is_err());
    }
}

// ----- The defences at run time -----

/// Non-zero: the world switches fill the return stack buffer after every VM exit. Read by
/// their assembly (`hw::{svm,vmx}`), written once at boot.
pub static RSB_FILL: AtomicU8 = AtomicU8::new(0);
/// Non-zero: the world switches execute VERW just before every VM entry.
pub static VERW_ON_ENTRY: AtomicU8 = AtomicU8::new(0);
/// The selector VERW names: any valid, writable data segment makes it clear the buffers (Intel
/// "Deep Dive: MDS"); the hypervisor's own.
pub static VERW_SELECTOR: AtomicU16 = AtomicU16::new(0);
static IBPB_ON_DOMAIN_SWITCH: AtomicBool = AtomicBool::new(false);
static L1D_FLUSH_ON_ENTRY: AtomicBool = AtomicBool::new(false);
/// The domain whose vCPU ran last on this CPU (0: none yet).
fn last_domain() -> &'static AtomicU32 {
    #[cfg(target_os = "none")]
    return &crate::platform::percpu::this_cpu().last_domain;
    // Host builds (tests, fuzzing) run on one CPU.
    #[cfg(not(target_os = "none"))]
    {
        static HOST_LAST_DOMAIN: AtomicU32 = AtomicU32::new(0);
        &HOST_LAST_DOMAIN
    }
}

/// Puts `defences` in force; `data_selector` is the hypervisor's data segment, for VERW.
pub fn put_in_force(defences: &Defences, data_selector: u16) {
    VERW_SELECTOR.store(data_selector, Ordering::Relaxed);
    RSB_FILL.store(defences.rsb_fill.into(), Ordering::Relaxed);
    VERW_ON_ENTRY.store(defences.verw_on_entry.into(), Ordering::Relaxed);
    IBPB_ON_DOMAIN_SWITCH.store(defences.ibpb_on_domain_switch, Ordering::Relaxed);
    L1D_FLUSH_ON_ENTRY.store(defences.l1d_flush_on_entry, Ordering::Relaxed);
}

/// A vCPU of `domain_id` is about to run on this CPU: an IBPB if the last one that ran here
/// belonged to another domain, so that no domain's branch targets steer the next one.
#[inline]
pub fn on_schedule_in(domain_id: u32) {
    if switches_domain(last_domain(), domain_id) && IBPB_ON_DOMAIN_SWITCH.load(Ordering::Relaxed) {
        #[cfg(target_os = "none")]
        // SAFETY: enabled only where CPUID offers IBPB (`decide`); writing bit 0 of
        // IA32_PRED_CMD has no other effect.
        unsafe {
            crate::hw::wrmsr(MSR_PRED_CMD, 1)
        };
    }
}

/// Records that `domain_id` runs next on the CPU whose last domain is `last`; true when that
/// is another domain than the one before.
fn switches_domain(last: &AtomicU32, domain_id: u32) -> bool {
    last.swap(domain_id, Ordering::Relaxed) != domain_id
}

/// Just before a VM entry on a VT-x CPU affected by L1TF: flush the L1 data cache.
#[inline]
pub fn before_vmx_entry() {
    if L1D_FLUSH_ON_ENTRY.load(Ordering::Relaxed) {
        #[cfg(target_os = "none")]
        // SAFETY: enabled only where CPUID offers IA32_FLUSH_CMD (`decide`).
        unsafe {
            crate::hw::wrmsr(MSR_FLUSH_CMD, 1)
        };
    }
}

// The return stack buffer fill (Intel "Retpoline: A Branch Target Injection Mitigation",
// RSB stuffing; AMD "Software Techniques for Managing Speculation"): 32 calls whose return
// addresses are speculation traps, then the stack pointer put back; unrolled, so that it
// costs 35 instructions rather than a loop's 70. Called by the world switches right after a
// VM exit, before their own `ret`: afterwards no return the hypervisor executes can be
// predicted from an entry the guest left behind. Clobbers RFLAGS.
#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .text
    .global lamina_rsb_fill
lamina_rsb_fill:
    .rept 32
    call 1f
    pause                   /* a return predicted here spins harmlessly */
    lfence
1:
    .endr
    add rsp, 256            /* the 32 return addresses */
    lfence
    ret
"#
);

#[cfg(test)]
mod runtime_tests {
    use super::*;

    #[test]
    fn a_barrier_only_when_the_domain_changes() {
        // A CPU of its own: the scheduler's tests run on_schedule_in on the shared one.
        let last = AtomicU32::new(0);
        let switches: Vec<bool> = [1, 1, 2, 2, 1]
            .into_iter()
            .map(|domain| switches_domain(&last, domain))
            .collect();
        // 0 -> 1 (another domain may have run before), 1 -> 2, 2 -> 1.
        assert_eq!(switches, [true, false, true, false, true]);
    }
}

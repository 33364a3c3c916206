//! Host-side fuzzing of the hypervisor's vendor-neutral code (`hv/src/common`).
//!
//! `lamina-hv` is a binary crate, so its `common` module is compiled here from its own sources
//! (`#[path]`), as the hypervisor's host unit tests compile it: the crate root offers what
//! `hv/src/main.rs` offers (`crate::common`), and `--cfg fuzzing` (set by `build.rs`) turns
//! on the same test support the unit tests use (the scripted vCPU, guest memory backed by a
//! host vector, fake physical-memory figures). Nothing here changes how the hypervisor is
//! built. The targets are in `fuzz_targets/`; each checks invariants after every input, not
//! only that nothing panicked.
#![allow(unreachable_pub, dead_code, unused_imports, missing_docs)]
#![allow(clippy::all)]

extern crate alloc;

#[path = "../../hv/src/common/mod.rs"]
pub mod common;

#[path = "../../hv/src/platform/spec_ctrl.rs"]
pub mod spec_ctrl;

/// The platform code `common` calls that runs on the host (the rest is bare metal only).
pub mod platform {
    pub use crate::spec_ctrl;
}

// The backends' pure entry-failure decoders, as `hv/src/main.rs` compiles them for its host
// tests; their items are visible from this crate only (`pub(super)`), so [`svm`] and [`vmx`]
// wrap them for the targets.
#[path = "../../hv/src/hw/svm/vmrun_checks.rs"]
mod svm_vmrun_checks;
#[path = "../../hv/src/hw/vmx/entry_checks.rs"]
mod vmx_entry_checks;

/// `hw/svm/vmrun_checks.rs` for the targets.
pub mod svm {
    use crate::svm_vmrun_checks as vmrun_checks;

    /// The VMCB fields VMRUN checks (`vmrun_checks::VmrunState`).
    #[derive(Clone, Copy, Debug)]
    pub struct VmrunState {
        pub efer: u64,
        pub cr0: u64,
        pub cr3: u64,
        pub cr4: u64,
        pub dr6: u64,
        pub dr7: u64,
        pub cs_attributes: u16,
        pub asid: u32,
        pub intercepts_vmrun: bool,
        pub event_injection: u64,
    }

    /// `vmrun_checks::invalid_state_reason`.
    pub fn invalid_state_reason(s: &VmrunState) -> &'static str {
        vmrun_checks::invalid_state_reason(&vmrun_checks::VmrunState {
            efer: s.efer,
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            dr6: s.dr6,
            dr7: s.dr7,
            cs_attributes: s.cs_attributes,
            asid: s.asid,
            intercepts_vmrun: s.intercepts_vmrun,
            event_injection: s.event_injection,
        })
    }
}

/// `hw/vmx/entry_checks.rs` for the targets.
pub mod vmx {
    use crate::vmx_entry_checks as entry_checks;

    /// What VM entry checks of the guest state (`entry_checks::GuestStateCheck`).
    #[derive(Clone, Copy, Debug)]
    pub struct GuestStateCheck {
        pub cr0: u64,
        pub cr3: u64,
        pub cr4: u64,
        pub efer: u64,
        pub rflags: u64,
        pub cr0_fixed: (u64, u64),
        pub cr4_fixed: (u64, u64),
        pub max_phys_bits: u8,
        pub qualification: u64,
    }

    /// `entry_checks::invalid_guest_state_reason`.
    pub fn invalid_guest_state_reason(s: &GuestStateCheck) -> &'static str {
        entry_checks::invalid_guest_state_reason(&entry_checks::GuestStateCheck {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            rflags: s.rflags,
            cr0_fixed: s.cr0_fixed,
            cr4_fixed: s.cr4_fixed,
            max_phys_bits: s.max_phys_bits,
            qualification: s.qualification,
        })
    }

    /// `entry_checks::vm_instruction_error`.
    pub fn vm_instruction_error(error: u64) -> &'static str {
        entry_checks::vm_instruction_error(error)
    }
}

pub mod guarded;
pub mod input;
pub mod string_io;
pub mod world;

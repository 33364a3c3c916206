//! Lamina: a thin type-1 hypervisor with a paravirtual guest ABI.
//!
//! Layout: `platform` is the machine the hypervisor runs on (boot, console, memory);
//! `common` is vendor-neutral virtualization logic; `hw` holds the two hardware backends,
//! `hw::vmx` (Intel VT-x) and `hw::svm` (AMD-V), chosen at run time from CPUID.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]

extern crate alloc;

pub mod common;
pub mod platform;

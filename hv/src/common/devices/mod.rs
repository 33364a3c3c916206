//! The devices emulated for kernels that were not ported: COM1 ([`uart`]) and the x2APIC
//! ([`vlapic`]). Both vendors trap to the same models.

pub mod uart;
pub mod vlapic;

//! The devices emulated for kernels that were not ported: COM1 ([`uart`]), the x2APIC
//! ([`vlapic`]) and the bus between the x2APICs of a domain's vCPUs ([`apic_bus`]: IPIs, INIT
//! and STARTUP). Both vendors trap to the same models.

pub mod apic_bus;
pub mod uart;
pub mod vlapic;

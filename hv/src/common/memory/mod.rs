//! A domain's memory as the hypervisor reaches it: guest-physical RAM, translated and
//! bounds-checked ([`guest_memory`]), the guest's own page tables walked for emulation
//! ([`guest_paging`]), the nested page table a backend builds and common code changes
//! ([`nested_map`]), and the accounting of physical pages ([`phys`]).

pub mod guest_memory;
pub mod guest_paging;
pub mod nested_map;
pub mod phys;

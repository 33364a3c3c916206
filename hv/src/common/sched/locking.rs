//! The hypervisor's locks and the one order in which they are taken. Nothing else in the
//! code takes a lock that is not listed here.
//!
//! A CPU takes a lock only after every lock above it in this list that it will need, and
//! never the other way round:
//!
//! 1. **The domain table** ([`crate::common::sched::Machine`]): every domain, its vCPUs'
//!    hypervisor-side state, event channels, grants and console. Held while a CPU picks a
//!    vCPU and while it handles an exit; dropped across every VM entry, so a guest never
//!    runs with it held. Every hypercall does bounded work under it (the largest: a
//!    `multicall` of `MULTICALL_MAX` entries, a scrub slice), so a guest cannot make another
//!    CPU spin on it without bound.
//! 2. **The trace ring of a CPU** (`common::trace`), each CPU its own.
//! 3. **The physical-page allocator** (`platform::memory::PHYS`): taken when nested page
//!    tables and teardown give pages back.
//! 4. **The serial port** (`platform::serial::SERIAL`): a whole line is written under it, so
//!    lines from several CPUs never interleave.
//!
//! A vCPU's hardware state (its VMCS or VMCB, in [`crate::common::domain::Slot`]) is not
//! behind a lock: the CPU that runs a vCPU takes it out of its slot under the table lock and
//! puts it back at the end of the slice; no other CPU picks that vCPU meanwhile, and its
//! domain is not torn down until every vCPU is back. What other CPUs ask of a running vCPU
//! goes through its request bits ([`crate::common::vcpu::state::Requests`]), which are atomic.
//! Its hypervisor-side state, the emulated x2APIC included, stays in its domain under the
//! table lock: a sibling's IPI (`common::devices::apic_bus`) sets the target's IRR there from the
//! sender's exit, then makes a request.

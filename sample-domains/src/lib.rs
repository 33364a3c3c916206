//! The parts of `sample-domains` that are plain code, not guest kernel: the shared ring that
//! ping and pong exchange messages over ([`ring`]), what the messages hold ([`message`]), and
//! what the `stress` domains put in the pages they grant each other ([`stress_message`]).
//! All are `no_std` and touch no hypervisor interface, so their unit tests run on the host
//! (`cargo test -p sample-domains`), the ring's with two threads. The kernel that uses them is
//! the `sample-domains` binary (`src/main.rs`, which documents the domains and their
//! conventions).
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

pub mod message;
pub mod ring;
pub mod stress_message;

//! Idle domains beside the benchmark (`cargo xtask bench`'s `idle16` and `idle64` runs): what
//! the scheduler's pass and its wake-up rules cost as domains are added that do nothing
//! (docs: the hot-path issue's "costs that stay flat as domains grow").
//!
//! An idle domain is this guest booted with `idle=<benchmark domain's id>`: it allocates a
//! port for the benchmark domain (its first: [`IDLE_PORT`]), masks it and polls it with no
//! deadline, blocked for the whole run. The benchmark domain, told `idle_domains=<A>-<B>`,
//! binds to each before it measures anything and sends on each when it is done; each idle
//! domain then powers off. A blocked domain whose only waker is a domain that ended would be
//! stopped (docs/abi.md 3.3): the send comes first.

use lamina_abi::Errno;
use lamina_abi::sched::ShutdownReason;
use lamina_guest_sdk::events::{self, Port};
use lamina_guest_sdk::{println, sched};

/// The port an idle domain allocates: its first (port 1 is the console).
const IDLE_PORT: Port = Port::new(2);

/// Most idle domains the benchmark binds to.
pub(crate) const MAX_IDLE: usize = 64;

/// How many times the benchmark yields, waiting for an idle domain to allocate its port.
const MAX_BIND_ATTEMPTS: u64 = 10_000;

/// The idle domain's whole life: blocked until `peer` sends, then off.
pub(crate) fn idle(peer: u32) -> ! {
    let port = match events::alloc_unbound_for(peer) {
        Ok(port) if port == IDLE_PORT => port,
        Ok(port) => {
            println!("idle: error: got {port}, the benchmark expects {IDLE_PORT}");
            sched::shutdown(ShutdownReason::Crash)
        }
        Err(error) => {
            println!("idle: error: alloc_unbound for domain {peer} failed: {error}");
            sched::shutdown(ShutdownReason::Crash)
        }
    };
    events::mask(port);
    loop {
        match sched::poll(&[port], None) {
            Ok(sched::PollOutcome::Pending) => break,
            Ok(sched::PollOutcome::TimedOut) => {}
            Err(error) => {
                println!("idle: error: poll failed: {error}");
                sched::shutdown(ShutdownReason::Crash)
            }
        }
    }
    sched::shutdown(ShutdownReason::Poweroff)
}

/// The benchmark's ends of the idle domains' ports.
pub(crate) struct IdleDomains {
    ports: [Option<Port>; MAX_IDLE],
    count: usize,
}

impl IdleDomains {
    /// Binds to each idle domain in `first..=last` (at most [`MAX_IDLE`]); `None` and a line
    /// saying why if one cannot be reached.
    pub(crate) fn connect(first: u32, last: u32) -> Option<Self> {
        let mut domains = IdleDomains {
            ports: [None; MAX_IDLE],
            count: 0,
        };
        for id in first..=last {
            if domains.count == MAX_IDLE {
                println!("bench: error: more than {MAX_IDLE} idle domains");
                return None;
            }
            let mut bound = None;
            for _ in 0..MAX_BIND_ATTEMPTS {
                match events::bind_interdomain(id, IDLE_PORT) {
                    Ok(port) => {
                        bound = Some(port);
                        break;
                    }
                    Err(error) if error == Errno::EINVAL => {
                        let _ = sched::yield_now();
                    }
                    Err(error) => {
                        println!("bench: error: idle domain {id}: bind failed: {error}");
                        return None;
                    }
                }
            }
            let Some(port) = bound else {
                println!("bench: error: idle domain {id} never allocated {IDLE_PORT}");
                return None;
            };
            events::mask(port);
            domains.ports[domains.count] = Some(port);
            domains.count += 1;
        }
        println!("bench: {} idle domains waiting", domains.count);
        Some(domains)
    }

    /// Lets every idle domain go.
    pub(crate) fn release(&self) {
        for port in self.ports[..self.count].iter().flatten() {
            if let Err(error) = events::send(*port) {
                println!("bench: error: releasing an idle domain through {port}: {error}");
            }
        }
    }
}

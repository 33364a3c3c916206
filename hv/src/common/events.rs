//! Event channels: the port table of one domain and the two-level pending/mask protocol
//! (docs/abi.md section 8; Xen's `event_channel.h` is the model).
//!
//! The pending and mask bitmaps and the per-vCPU selector and upcall flags live in guest RAM
//! (the shared-info page and the vCPU-info areas), so the guest reads them with no exit; the
//! port table (what each port is bound to) lives here, out of the guest's reach. Every access
//! to guest RAM goes through [`GuestMemory`] bounds checks: a guest that scribbles over its
//! shared page only confuses itself.

use crate::common::memory::guest_memory::{GuestMemory, OutOfBounds};
use alloc::boxed::Box;
use lamina_abi::Errno;
use lamina_abi::event_channel::{IPI_SLOTS, NR_PORTS, NR_VIRQS, PortState, PortStatus, Virq};
use lamina_abi::shared_info::{SharedInfo, VcpuInfo};

/// What a port is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// Not allocated.
    Free,
    /// A loopback port: sends raise it on its own vCPU.
    Unbound {
        /// The domain that may bind it (the owner itself in ABI 1.0).
        remote: u16,
    },
    /// One end of a channel to another domain (or to another port of the same domain).
    Interdomain {
        /// The peer's domain.
        remote: u16,
        /// The peer's port.
        remote_port: u32,
    },
    /// The console ring's doorbell: sends are handled by the hypervisor.
    Console,
    /// A virtual IRQ delivered to a vCPU.
    Virq {
        /// Which VIRQ.
        virq: u8,
    },
    /// An IPI port; `slot` is its IPI slot (docs/abi.md 8.10), if bound to one.
    Ipi {
        /// The slot, `0..IPI_SLOTS`, or `None` for a port of `bind_ipi`.
        slot: Option<u8>,
    },
}

#[derive(Clone, Copy, Debug)]
struct Port {
    binding: Binding,
    vcpu: u8,
}

const FREE: Port = Port {
    binding: Binding::Free,
    vcpu: 0,
};

/// Where a vCPU's `VcpuInfo` lives in guest RAM.
pub fn default_vcpu_info_gpa(shared_info: u64, vcpu: usize) -> u64 {
    shared_info + (vcpu * core::mem::size_of::<VcpuInfo>()) as u64
}

const PENDING_OFFSET: u64 = core::mem::offset_of!(SharedInfo, evtchn_pending) as u64;
const MASK_OFFSET: u64 = core::mem::offset_of!(SharedInfo, evtchn_mask) as u64;
const SELECTOR_OFFSET: u64 = core::mem::offset_of!(VcpuInfo, evtchn_pending_sel) as u64;
const UPCALL_PENDING_OFFSET: u64 = core::mem::offset_of!(VcpuInfo, evtchn_upcall_pending) as u64;
const UPCALL_MASK_OFFSET: u64 = core::mem::offset_of!(VcpuInfo, evtchn_upcall_mask) as u64;

/// A domain's event channels.
pub struct EventChannels {
    ports: Box<[Port; NR_PORTS as usize]>,
    /// Port bound to each VIRQ, per vCPU (0: none).
    virq_ports: alloc::vec::Vec<[u16; NR_VIRQS as usize]>,
    /// Port bound to each IPI slot, per vCPU (0: none).
    ipi_ports: alloc::vec::Vec<[u16; IPI_SLOTS as usize]>,
    shared_info: u64,
    /// Guest-physical address of each vCPU's VcpuInfo.
    vcpu_info: alloc::vec::Vec<u64>,
    /// The domain these channels belong to.
    owner: u16,
    /// Ports another domain can raise (inter-domain ends, ports offered to another domain),
    /// counted as they change so that a wake-up check never scans the table. A domain that
    /// ended raises nothing, so ports naming it do not count.
    foreign_ports: u32,
    /// Domains that ended (torn down): they will never bind or send again.
    ended_remotes: alloc::vec::Vec<u16>,
    /// Bit `p` set: port `p` (from [`FIRST_ALLOCATED_PORT`]) is free. Allocation finds the
    /// lowest in a few word reads, so a full table answers `ENOSPC` without a scan of 1024
    /// ports (a multicall of such calls was a millisecond-long exit on a slow CPU).
    free_ports: [u64; NR_PORTS as usize / 64],
}

/// Ports are handed out from this one up (0 is never used, 1 is the console port).
const FIRST_ALLOCATED_PORT: u32 = 2;

/// The free map of a fresh table: every port from [`FIRST_ALLOCATED_PORT`] up.
const fn all_allocatable_ports() -> [u64; NR_PORTS as usize / 64] {
    let mut map = [u64::MAX; NR_PORTS as usize / 64];
    map[0] &= !((1u64 << FIRST_ALLOCATED_PORT) - 1);
    map
}

/// The ports one `send_ipi` raises (at most one per vCPU).
#[derive(Clone, Copy, Debug, Default)]
pub struct IpiTargets {
    ports: [u16; lamina_abi::shared_info::MAX_VCPUS],
    count: usize,
}

impl IpiTargets {
    /// The ports, in vCPU order.
    pub fn ports(&self) -> impl Iterator<Item = u32> + '_ {
        self.ports[..self.count].iter().map(|&p| u32::from(p))
    }
}

/// The console port every domain starts with.
pub const CONSOLE_PORT: u32 = 1;

impl EventChannels {
    /// The channels of a domain with `nr_vcpus` vCPUs whose shared-info page is at
    /// `shared_info`; port 1 is the console doorbell.
    pub fn new(owner: u16, shared_info: u64, nr_vcpus: usize) -> Self {
        let mut ports = Box::new([FREE; NR_PORTS as usize]);
        ports[CONSOLE_PORT as usize] = Port {
            binding: Binding::Console,
            vcpu: 0,
        };
        EventChannels {
            ports,
            virq_ports: alloc::vec![[0; NR_VIRQS as usize]; nr_vcpus],
            ipi_ports: alloc::vec![[0; IPI_SLOTS as usize]; nr_vcpus],
            shared_info,
            vcpu_info: (0..nr_vcpus)
                .map(|v| default_vcpu_info_gpa(shared_info, v))
                .collect(),
            owner,
            foreign_ports: 0,
            ended_remotes: alloc::vec::Vec::new(),
            free_ports: all_allocatable_ports(),
        }
    }

    /// Test support: every port in use and its binding.
    #[cfg(fuzzing)]
    pub(crate) fn bindings(&self) -> impl Iterator<Item = (u32, Binding)> + '_ {
        (0..NR_PORTS)
            .map(|p| (p, self.ports[p as usize].binding))
            .filter(|(_, b)| *b != Binding::Free)
    }

    /// Test support: checks what is kept beside the port table (the count of foreign ports,
    /// the VIRQ index) against the table itself.
    #[cfg(fuzzing)]
    pub(crate) fn check_consistency(&self) -> Result<(), alloc::string::String> {
        for port in FIRST_ALLOCATED_PORT..NR_PORTS {
            let marked_free = self.free_ports[port as usize / 64] & (1 << (port % 64)) != 0;
            if marked_free != (self.ports[port as usize].binding == Binding::Free) {
                return Err(alloc::format!(
                    "port {port} is {:?} but the free map says free={marked_free}",
                    self.ports[port as usize].binding
                ));
            }
        }
        let foreign = self
            .ports
            .iter()
            .filter(|p| self.is_foreign(p.binding))
            .count() as u32;
        if foreign != self.foreign_ports {
            return Err(alloc::format!(
                "foreign_ports {} but {foreign} foreign ports in the table",
                self.foreign_ports
            ));
        }
        for (vcpu, virqs) in self.virq_ports.iter().enumerate() {
            for (virq, &port) in virqs.iter().enumerate() {
                let entry = self.ports[usize::from(port)];
                if port != 0
                    && (entry.binding != (Binding::Virq { virq: virq as u8 })
                        || usize::from(entry.vcpu) != vcpu)
                {
                    return Err(alloc::format!(
                        "VIRQ {virq} of vCPU {vcpu} names port {port}, bound to {entry:?}"
                    ));
                }
            }
        }
        for (port, entry) in self.ports.iter().enumerate() {
            if let Binding::Virq { virq } = entry.binding
                && self.virq_ports[usize::from(entry.vcpu)][usize::from(virq)] as usize != port
            {
                return Err(alloc::format!(
                    "port {port} is VIRQ {virq} but not in the VIRQ index"
                ));
            }
            if let Binding::Ipi { slot: Some(slot) } = entry.binding
                && self.ipi_ports[usize::from(entry.vcpu)][usize::from(slot)] as usize != port
            {
                return Err(alloc::format!(
                    "port {port} is IPI slot {slot} but not in the slot index"
                ));
            }
        }
        for (vcpu, slots) in self.ipi_ports.iter().enumerate() {
            for (slot, &port) in slots.iter().enumerate() {
                let entry = self.ports[usize::from(port)];
                if port != 0
                    && (entry.binding
                        != (Binding::Ipi {
                            slot: Some(slot as u8),
                        })
                        || usize::from(entry.vcpu) != vcpu)
                {
                    return Err(alloc::format!(
                        "IPI slot {slot} of vCPU {vcpu} names port {port}, bound to {entry:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether another domain, still alive, can raise a port bound this way.
    fn is_foreign(&self, binding: Binding) -> bool {
        match binding {
            Binding::Unbound { remote } | Binding::Interdomain { remote, .. } => {
                remote != self.owner && !self.ended_remotes.contains(&remote)
            }
            _ => false,
        }
    }

    /// Domain `remote` ended: ports naming it no longer count as something that can wake
    /// this domain (docs/abi.md 3.3). Its ends were closed by its teardown, which turned ours
    /// Unbound for it; ports we offered it stay, for us to close.
    pub fn remote_ended(&mut self, remote: u16) {
        if remote == self.owner || self.ended_remotes.contains(&remote) {
            return;
        }
        self.ended_remotes.push(remote);
        // No port counted as foreign: none names `remote` as a live domain, and none becomes
        // foreign. Most domains: a teardown tells every domain, and a scan of all their
        // ports each held the table exclusive for 3.7 ms under Bochs with 35 domains.
        if self.foreign_ports == 0 {
            return;
        }
        let foreign = self
            .ports
            .iter()
            .filter(|port| self.is_foreign(port.binding))
            .count();
        self.foreign_ports = foreign as u32;
    }

    /// Replaces a port's binding, keeping [`Self::foreign_ports`] and the free map right.
    fn rebind(&mut self, port: u32, binding: Binding) {
        let old = self.ports[port as usize].binding;
        if self.is_foreign(old) {
            self.foreign_ports -= 1;
        }
        if self.is_foreign(binding) {
            self.foreign_ports += 1;
        }
        if port >= FIRST_ALLOCATED_PORT {
            let (word, bit) = (port as usize / 64, port % 64);
            if binding == Binding::Free {
                self.free_ports[word] |= 1 << bit;
            } else {
                self.free_ports[word] &= !(1 << bit);
            }
        }
        self.ports[port as usize].binding = binding;
    }

    /// Number of vCPUs.
    pub fn nr_vcpus(&self) -> usize {
        self.vcpu_info.len()
    }

    /// Guest-physical address of `vcpu`'s VcpuInfo.
    pub fn vcpu_info_gpa(&self, vcpu: usize) -> u64 {
        self.vcpu_info[vcpu]
    }

    /// Moves `vcpu`'s VcpuInfo to `gpa` (already validated), copying its contents.
    pub fn move_vcpu_info(
        &mut self,
        mem: &GuestMemory,
        vcpu: usize,
        gpa: u64,
    ) -> Result<(), OutOfBounds> {
        let mut bytes = [0u8; core::mem::size_of::<VcpuInfo>()];
        mem.read(self.vcpu_info[vcpu], &mut bytes)?;
        mem.write(gpa, &bytes)?;
        self.vcpu_info[vcpu] = gpa;
        Ok(())
    }

    fn port(&self, port: u64) -> Result<(u32, Port), Errno> {
        if port >= u64::from(NR_PORTS) {
            return Err(Errno::EINVAL);
        }
        Ok((port as u32, self.ports[port as usize]))
    }

    fn allocate(&mut self, binding: Binding, vcpu: u8) -> Result<u32, Errno> {
        let free = self
            .free_ports
            .iter()
            .enumerate()
            .find(|(_, word)| **word != 0)
            .map(|(index, word)| index as u32 * 64 + word.trailing_zeros());
        let port = free.ok_or(Errno::ENOSPC)?;
        self.ports[port as usize].vcpu = vcpu;
        self.rebind(port, binding);
        Ok(port)
    }

    /// `alloc_unbound`: a port `remote` (validated by the caller) may bind.
    pub fn alloc_unbound(&mut self, remote: u16) -> Result<u32, Errno> {
        self.allocate(Binding::Unbound { remote }, 0)
    }

    /// Whether `port` is an unbound port that domain `binder` may bind.
    pub fn is_unbound_for(&self, port: u64, binder: u16) -> bool {
        matches!(self.port(port), Ok((_, p)) if p.binding == Binding::Unbound { remote: binder })
    }

    /// A new port at this end of a channel to (`remote`, `remote_port`).
    pub fn bind_end(&mut self, remote: u16, remote_port: u32) -> Result<u32, Errno> {
        self.allocate(
            Binding::Interdomain {
                remote,
                remote_port,
            },
            0,
        )
    }

    /// Turns `port` into this end of a channel to (`remote`, `remote_port`).
    pub fn connect(&mut self, port: u32, remote: u16, remote_port: u32) {
        if port < NR_PORTS && self.ports[port as usize].binding != Binding::Free {
            self.rebind(
                port,
                Binding::Interdomain {
                    remote,
                    remote_port,
                },
            );
        }
    }

    /// The peer closed its end: `port` is again an unbound port for `remote`.
    pub fn disconnect(&mut self, port: u32, remote: u16) {
        if port < NR_PORTS
            && matches!(
                self.ports[port as usize].binding,
                Binding::Interdomain { .. }
            )
        {
            self.rebind(port, Binding::Unbound { remote });
        }
    }

    /// `bind_virq`.
    pub fn bind_virq(&mut self, virq: u64, vcpu: u64) -> Result<u32, Errno> {
        let virq = Virq::try_from(virq)? as u64 as usize;
        let vcpu = self.check_vcpu(vcpu)?;
        if self.virq_ports[vcpu][virq] != 0 {
            return Err(Errno::EEXIST);
        }
        let port = self.allocate(Binding::Virq { virq: virq as u8 }, vcpu as u8)?;
        self.virq_ports[vcpu][virq] = port as u16;
        Ok(port)
    }

    /// `bind_ipi`.
    pub fn bind_ipi(&mut self, vcpu: u64) -> Result<u32, Errno> {
        let vcpu = self.check_vcpu(vcpu)?;
        self.allocate(Binding::Ipi { slot: None }, vcpu as u8)
    }

    /// `bind_ipi_slot` (docs/abi.md 8.10).
    pub fn bind_ipi_slot(&mut self, vcpu: u64, slot: u64) -> Result<u32, Errno> {
        let vcpu = self.check_vcpu(vcpu)?;
        if slot >= IPI_SLOTS {
            return Err(Errno::EINVAL);
        }
        if self.ipi_ports[vcpu][slot as usize] != 0 {
            return Err(Errno::EEXIST);
        }
        let port = self.allocate(
            Binding::Ipi {
                slot: Some(slot as u8),
            },
            vcpu as u8,
        )?;
        self.ipi_ports[vcpu][slot as usize] = port as u16;
        Ok(port)
    }

    /// The ports `send_ipi` raises for IPI slot `slot` on the vCPUs of `mask`, in vCPU order,
    /// after validating all of them (docs/abi.md 8.11): nothing is raised unless every one
    /// is there.
    pub fn ipi_targets(&self, mask: u64, slot: u64) -> Result<IpiTargets, Errno> {
        if slot >= IPI_SLOTS {
            return Err(Errno::EINVAL);
        }
        let mask = self.check_vcpu_mask(mask)?;
        let mut targets = IpiTargets::default();
        for vcpu in (0..self.nr_vcpus()).filter(|v| mask & 1 << v != 0) {
            let port = self.ipi_ports[vcpu][slot as usize];
            if port == 0 {
                return Err(Errno::EINVAL);
            }
            let Some(entry) = targets.ports.get_mut(targets.count) else {
                return Err(Errno::EINVAL);
            };
            *entry = port;
            targets.count += 1;
        }
        Ok(targets)
    }

    /// Validates a mask of vCPUs (bit `v`: vCPU `v`): empty is `-EINVAL`, a bit at or above
    /// `nr_vcpus` is `-ENOENT` (docs/abi.md 20).
    pub fn check_vcpu_mask(&self, mask: u64) -> Result<u64, Errno> {
        if mask == 0 {
            return Err(Errno::EINVAL);
        }
        if self.nr_vcpus() < 64 && mask >> self.nr_vcpus() != 0 {
            return Err(Errno::ENOENT);
        }
        Ok(mask)
    }

    /// Validates a vCPU number.
    pub fn check_vcpu(&self, vcpu: u64) -> Result<usize, Errno> {
        if vcpu < self.nr_vcpus() as u64 {
            Ok(vcpu as usize)
        } else {
            Err(Errno::ENOENT)
        }
    }

    /// What a `send` on `port` does: the binding, after validation.
    pub fn send_target(&self, port: u64) -> Result<(u32, Binding), Errno> {
        let (port, entry) = self.port(port)?;
        match entry.binding {
            Binding::Free | Binding::Virq { .. } => Err(Errno::EINVAL),
            binding => Ok((port, binding)),
        }
    }

    /// `close`; returns what the port was bound to (so an inter-domain peer can be told).
    pub fn close(&mut self, mem: &GuestMemory, port: u64) -> Result<Binding, Errno> {
        let (port, entry) = self.port(port)?;
        if port == 0 || entry.binding == Binding::Free {
            return Err(Errno::EINVAL);
        }
        if let Binding::Virq { virq } = entry.binding {
            self.virq_ports[usize::from(entry.vcpu)][usize::from(virq)] = 0;
        }
        if let Binding::Ipi { slot: Some(slot) } = entry.binding {
            self.ipi_ports[usize::from(entry.vcpu)][usize::from(slot)] = 0;
        }
        self.rebind(port, Binding::Free);
        self.ports[port as usize] = FREE;
        self.update_bit(mem, PENDING_OFFSET, port, false)?;
        Ok(entry.binding)
    }

    /// `status`.
    pub fn status(&self, mem: &GuestMemory, port: u64) -> Result<u64, Errno> {
        let (port, entry) = self.port(port)?;
        let (state, detail) = match entry.binding {
            Binding::Free => (PortState::Free, 0),
            Binding::Unbound { remote } => (PortState::Unbound, remote),
            Binding::Interdomain { remote, .. } => (PortState::Interdomain, remote),
            Binding::Console => (PortState::Interdomain, 0),
            Binding::Virq { virq } => (PortState::Virq, u16::from(virq)),
            Binding::Ipi { .. } => (PortState::Ipi, 0),
        };
        Ok(PortStatus {
            state: state as u8,
            vcpu: entry.vcpu,
            detail,
            pending: self.bit(mem, PENDING_OFFSET, port)?,
            masked: self.bit(mem, MASK_OFFSET, port)?,
        }
        .pack())
    }

    /// The port bound to `virq` on `vcpu`, if any.
    pub fn virq_port(&self, vcpu: usize, virq: Virq) -> Option<u32> {
        let port = self.virq_ports.get(vcpu)?[virq as u64 as usize];
        (port != 0).then_some(u32::from(port))
    }

    /// Whether anything is bound that could raise an event on `vcpu` while it sleeps
    /// (given whether its timer is armed): its timer VIRQ, or console input. Every other
    /// port of ABI 1.0 is raised by the domain itself.
    pub fn can_wake(&self, vcpu: usize, timer_armed: bool) -> bool {
        (timer_armed && self.virq_port(vcpu, Virq::Timer).is_some())
            || (vcpu == 0 && self.virq_port(vcpu, Virq::Console).is_some())
            || self.has_other_domain_port(vcpu)
    }

    /// Whether another domain can raise a port of `vcpu`: an inter-domain end, or a port
    /// allocated for another domain to bind.
    /// (Such ports are delivered to vCPU 0, the only vCPU in ABI 1.x.)
    fn has_other_domain_port(&self, vcpu: usize) -> bool {
        vcpu == 0 && self.foreign_ports != 0
    }

    /// Raises `port`: sets its pending bit; if that is new and the port is not masked, marks
    /// the upcall pending on its vCPU. Returns the vCPU to wake, if any.
    pub fn raise(&self, mem: &GuestMemory, port: u32) -> Result<Option<usize>, OutOfBounds> {
        let was_pending = self.bit(mem, PENDING_OFFSET, port)?;
        self.update_bit(mem, PENDING_OFFSET, port, true)?;
        if was_pending || self.bit(mem, MASK_OFFSET, port)? {
            return Ok(None);
        }
        self.notify_vcpu(mem, port).map(Some)
    }

    /// `unmask`: clears the mask bit and delivers the port if it is pending.
    pub fn unmask(&self, mem: &GuestMemory, port: u64) -> Result<Option<usize>, Errno> {
        let (port, _) = self.port(port)?;
        self.update_bit(mem, MASK_OFFSET, port, false)?;
        if self.bit(mem, PENDING_OFFSET, port)? {
            return Ok(Some(self.notify_vcpu(mem, port)?));
        }
        Ok(None)
    }

    fn notify_vcpu(&self, mem: &GuestMemory, port: u32) -> Result<usize, OutOfBounds> {
        let vcpu = usize::from(self.ports[port as usize].vcpu);
        let info = self.vcpu_info[vcpu];
        let selector = mem.read_u64(info + SELECTOR_OFFSET)?;
        mem.write_u64(info + SELECTOR_OFFSET, selector | 1 << (port / 64))?;
        mem.write(info + UPCALL_PENDING_OFFSET, &[1])?;
        Ok(vcpu)
    }

    /// Whether port `port` is pending.
    pub fn is_pending(&self, mem: &GuestMemory, port: u32) -> Result<bool, OutOfBounds> {
        self.bit(mem, PENDING_OFFSET, port)
    }

    /// `(evtchn_upcall_pending, evtchn_upcall_mask)` of `vcpu`.
    pub fn upcall_flags(
        &self,
        mem: &GuestMemory,
        vcpu: usize,
    ) -> Result<(bool, bool), OutOfBounds> {
        let mut flags = [0u8; 2];
        mem.read(self.vcpu_info[vcpu] + UPCALL_PENDING_OFFSET, &mut flags)?;
        Ok((flags[0] != 0, flags[1] != 0))
    }

    /// Sets `vcpu`'s upcall mask.
    pub fn set_upcall_mask(
        &self,
        mem: &GuestMemory,
        vcpu: usize,
        masked: bool,
    ) -> Result<(), OutOfBounds> {
        mem.write(
            self.vcpu_info[vcpu] + UPCALL_MASK_OFFSET,
            &[u8::from(masked)],
        )
    }

    fn bit(&self, mem: &GuestMemory, bitmap: u64, port: u32) -> Result<bool, OutOfBounds> {
        let word = mem.read_u64(self.shared_info + bitmap + u64::from(port / 64) * 8)?;
        Ok(word & (1 << (port % 64)) != 0)
    }

    fn update_bit(
        &self,
        mem: &GuestMemory,
        bitmap: u64,
        port: u32,
        set: bool,
    ) -> Result<(), OutOfBounds> {
        let at = self.shared_info + bitmap + u64::from(port / 64) * 8;
        let word = mem.read_u64(at)?;
        let bit = 1u64 << (port % 64);
        mem.write_u64(at, if set { word | bit } else { word & !bit })
    }

    /// Sets or clears a mask bit (tests and boot).
    pub fn set_masked(
        &self,
        mem: &GuestMemory,
        port: u32,
        masked: bool,
    ) -> Result<(), OutOfBounds> {
        self.update_bit(mem, MASK_OFFSET, port, masked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::memory::guest_memory::testing::test_memory;

    const SHARED: u64 = 0x7000;

    #[test]
    fn a_send_on_an_unmasked_port_marks_the_upcall_once() {
        let t = test_memory(1 << 20);
        let ev = EventChannels::new(1, SHARED, 1);
        let mut ev = ev;
        let port = ev.alloc_unbound(1).unwrap();
        assert_eq!(port, 2, "port 0 is never used, port 1 is the console");
        assert_eq!(ev.raise(&t.mem, port).unwrap(), Some(0));
        assert_eq!(ev.upcall_flags(&t.mem, 0).unwrap(), (true, false));
        let selector = t.mem.read_u64(SHARED + SELECTOR_OFFSET).unwrap();
        assert_eq!(selector, 1);
        assert_eq!(
            ev.raise(&t.mem, port).unwrap(),
            None,
            "already pending: no new edge"
        );
    }

    #[test]
    fn a_masked_port_stays_pending_and_unmask_delivers_it() {
        let t = test_memory(1 << 20);
        let mut ev = EventChannels::new(1, SHARED, 1);
        let port = ev.bind_ipi(0).unwrap();
        ev.set_masked(&t.mem, port, true).unwrap();
        assert_eq!(ev.raise(&t.mem, port).unwrap(), None);
        assert!(!ev.upcall_flags(&t.mem, 0).unwrap().0, "masked: no upcall");
        assert!(ev.is_pending(&t.mem, port).unwrap());
        assert_eq!(ev.unmask(&t.mem, u64::from(port)).unwrap(), Some(0));
        assert!(
            ev.upcall_flags(&t.mem, 0).unwrap().0,
            "the edge is not lost"
        );
    }

    #[test]
    fn bad_ports_and_double_binds_are_refused() {
        let t = test_memory(1 << 20);
        let mut ev = EventChannels::new(1, SHARED, 1);
        assert_eq!(ev.close(&t.mem, 1024), Err(Errno::EINVAL));
        assert_eq!(ev.close(&t.mem, 0), Err(Errno::EINVAL));
        assert_eq!(ev.close(&t.mem, 77), Err(Errno::EINVAL), "free port");
        let virq = ev.bind_virq(0, 0).unwrap();
        assert_eq!(ev.bind_virq(0, 0), Err(Errno::EEXIST));
        assert_eq!(ev.bind_virq(5, 0), Err(Errno::EINVAL));
        assert_eq!(ev.bind_virq(0, 1), Err(Errno::ENOENT));
        assert_eq!(
            ev.send_target(u64::from(virq)),
            Err(Errno::EINVAL),
            "VIRQ ports are not sent on"
        );
        ev.close(&t.mem, u64::from(virq)).unwrap();
        assert_eq!(
            ev.close(&t.mem, u64::from(virq)),
            Err(Errno::EINVAL),
            "double close"
        );
        assert!(ev.bind_virq(0, 0).is_ok(), "closing unbinds the VIRQ");
        let status = PortStatus::unpack(ev.status(&t.mem, u64::from(CONSOLE_PORT)).unwrap());
        assert_eq!(status.state, PortState::Interdomain as u8);
    }

    #[test]
    fn the_table_fills_up_with_enospc() {
        let t = test_memory(1 << 20);
        let _ = &t;
        let mut ev = EventChannels::new(1, SHARED, 1);
        for _ in 2..NR_PORTS {
            ev.alloc_unbound(1).unwrap();
        }
        assert_eq!(ev.alloc_unbound(1), Err(Errno::ENOSPC));
    }

    #[test]
    fn ports_another_domain_can_raise_are_counted_as_they_change() {
        let t = test_memory(1 << 20);
        let mut ev = EventChannels::new(1, SHARED, 1);
        assert!(!ev.can_wake(0, false));
        let offered = ev.alloc_unbound(2).unwrap();
        assert!(ev.can_wake(0, false), "domain 2 may bind and send");
        ev.connect(offered, 2, 5);
        assert!(ev.can_wake(0, false));
        ev.disconnect(offered, 2);
        assert!(ev.can_wake(0, false), "unbound for domain 2 again");
        ev.close(&t.mem, u64::from(offered)).unwrap();
        assert!(!ev.can_wake(0, false));
        let own = ev.alloc_unbound(1).unwrap();
        assert!(
            !ev.can_wake(0, false),
            "a loopback port is raised by the domain itself"
        );
        ev.close(&t.mem, u64::from(own)).unwrap();
        assert_eq!(ev.foreign_ports, 0);
    }

    #[test]
    fn ports_naming_a_domain_that_ended_cannot_wake() {
        let t = test_memory(1 << 20);
        let mut ev = EventChannels::new(1, SHARED, 1);
        let offered = ev.alloc_unbound(2).unwrap();
        let bound = ev.bind_end(3, 7).unwrap();
        ev.remote_ended(2);
        assert!(ev.can_wake(0, false), "domain 3 can still send");
        ev.disconnect(bound, 3);
        ev.remote_ended(3);
        assert!(!ev.can_wake(0, false), "domains 2 and 3 are gone");
        assert_eq!(ev.foreign_ports, 0);
        ev.close(&t.mem, u64::from(offered)).unwrap();
        ev.close(&t.mem, u64::from(bound)).unwrap();
        assert_eq!(ev.foreign_ports, 0, "closing them keeps the count right");
        ev.alloc_unbound(4).unwrap();
        assert!(ev.can_wake(0, false));
    }
}

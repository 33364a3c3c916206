//! Lamina: a thin type-1 hypervisor with a paravirtual guest ABI.
//!
//! Layout: `platform` is the machine the hypervisor runs on (boot, console, memory, CPUs),
//! which imports nothing of the rest; `common` is vendor-neutral virtualization logic; `hw`
//! holds the two hardware backends, `hw::vmx` (Intel VT-x) and `hw::svm` (AMD-V), chosen at
//! run time from CPUID; `host` presents the machine to the scheduler.
// Bare metal only: on the host the crate builds as a std program (unit tests, and clippy of the
// whole workspace) that says where it runs.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]
// A binary crate: `pub` marks what a module offers the rest of the hypervisor.
#![allow(unreachable_pub)]

extern crate alloc;

pub mod common;
#[cfg(target_os = "none")]
pub mod host;
#[cfg(target_os = "none")]
pub mod hw;
pub mod platform;

/// On the host: the hypervisor runs only on bare metal.
#[cfg(not(any(test, target_os = "none")))]
fn main() {
    eprintln!(
        "lamina-hv runs on bare metal: `cargo xtask build` builds it, `cargo xtask run` boots it"
    );
    std::process::exit(2);
}
// The backends are built for the bare-metal target only; their pure decoders are also
// compiled on the host so that their unit tests run.
#[cfg(all(test, not(target_os = "none")))]
#[path = "hw/svm/vmrun_checks.rs"]
mod svm_vmrun_checks;
#[cfg(all(test, not(target_os = "none")))]
#[path = "hw/vmx/entry_checks.rs"]
mod vmx_entry_checks;

#[cfg(target_os = "none")]
mod start {
    use crate::common::domain::Slot;
    use crate::common::domain::builder::{self, BOOT_GDT_LIMIT, BootParams};
    use crate::common::domain::config;
    use crate::common::domain::{Domain, DomainState, Ending};
    use crate::common::memory::guest_memory::{GuestMemory, OwnedRam};
    use crate::common::sched::{Machine as SharedMachine, run_all};
    use crate::common::time::TimeBase;
    use crate::common::vcpu::VirtualCpu;
    use crate::host::MachineHost;
    use crate::hv_println;
    use crate::hw::{self, EntryState, Vendor, Virtualization};
    use crate::platform::multiboot::{self, BootInfo, Module};
    use crate::platform::{apic, clock, cpu, exit, memory, percpu, serial, smp, spec_ctrl, xstate};
    use alloc::format;
    use alloc::string::String;
    use alloc::vec::Vec;
    use lamina_abi::layout::{BOOT_GDT_GPA, BOOT_PML4_GPA, START_INFO_GPA};

    /// Called by the boot trampoline with GRUB's magic and boot-information address.
    #[unsafe(no_mangle)]
    extern "C" fn hv_entry(magic: u32, info_address: u64) -> ! {
        serial::init(log::LevelFilter::Info);
        cpu::init();
        if magic != multiboot::BOOTLOADER_MAGIC {
            fail(format_args!(
                "not started by a Multiboot2 loader (magic {magic:#x})"
            ));
        }
        // SAFETY: GRUB put the boot information at `info_address`, identity-mapped; its
        // first word is its total size, and nothing else uses that memory.
        let bytes = unsafe {
            let total = (info_address as *const u32).read();
            core::slice::from_raw_parts(info_address as *const u8, total as usize)
        };
        let info = match multiboot::parse(bytes) {
            Ok(info) => info,
            Err(error) => fail(format_args!("bad Multiboot2 information: {error:?}")),
        };
        log::set_max_level(log_level(info.cmdline));
        memory::init(&info, (info_address, info_address + bytes.len() as u64));
        log::info!(
            "Lamina {} (ABI {}.{}): {} MiB free, {} boot module(s)",
            env!("CARGO_PKG_VERSION"),
            lamina_abi::ABI_VERSION_MAJOR,
            lamina_abi::ABI_VERSION_MINOR,
            memory::PHYS.lock().free_bytes() >> 20,
            info.modules.len()
        );
        // Before any vCPU: the VMX host state takes CR4 as it is now.
        xstate::init(extended_state_layout());
        apic::init();
        let rates = clock::calibrate(apic::timer_count);
        let time = TimeBase::new(
            rates.tsc_hz,
            crate::common::time::read_tsc(),
            clock::wall_clock_seconds(),
            0,
        );
        crate::common::trace::init(info.cmdline, time.tsc_khz());
        log::info!(
            "clocks: TSC {} kHz, APIC timer {} kHz, wall clock {} s",
            rates.tsc_hz / 1000,
            rates.apic_timer_hz / 1000,
            time.wall_sec
        );
        let host = MachineHost::new(time, rates.apic_timer_hz);
        let machine = Machine {
            boot_info: (info_address, info_address + bytes.len() as u64),
            tsc_hz: rates.tsc_hz,
        };
        match hw::detect_vendor() {
            Some(Vendor::Intel) => run::<hw::vmx::Vmx>(&info, time, host, machine),
            Some(Vendor::Amd) => run::<hw::svm::Svm>(&info, time, host, machine),
            None => fail(format_args!("no Intel VT-x or AMD-V on this CPU")),
        }
    }

    /// Decides the speculative-execution defences from CPUID and `spec-ctrl=`, logs each, and
    /// puts them in force before any domain runs.
    /// What the extended-state switch saves on this machine: the vCPU policy
    /// (`common::vcpu::xstate`, which keeps the mask for CPUID and XSETBV) applied to this
    /// CPU's CPUID.
    fn extended_state_layout() -> xstate::Layout {
        use crate::common::vcpu::xstate as policy;
        const _: () = assert!(policy::FXSAVE_BYTES == xstate::FXSAVE_BYTES);
        let cpuid = |leaf, subleaf| {
            let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
            [r.eax, r.ebx, r.ecx, r.edx]
        };
        let mask = policy::guest_xcr0_mask(cpuid);
        policy::set_guest_mask(mask);
        xstate::Layout {
            mask,
            area_bytes: if mask != 0 {
                policy::xsave_bytes(mask, cpuid)
            } else {
                policy::FXSAVE_BYTES
            },
            reset_xcr0: policy::XCR0_RESET & mask,
        }
    }

    fn set_up_speculation_defences(cmdline: &str) {
        use x86_64::instructions::segmentation::{DS, Segment};
        let choices = spec_ctrl::Choices::from_cmdline(cmdline).unwrap_or_else(|why| {
            log::warn!("{why}; spec-ctrl= ignored, the defaults apply");
            spec_ctrl::Choices::default()
        });
        let cpu = spec_ctrl::CpuSpeculation::enumerate(
            |leaf, subleaf| {
                let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
                [r.eax, r.ebx, r.ecx, r.edx]
            },
            // SAFETY: called only when CPUID.7.0:EDX[29] says the MSR exists.
            || unsafe { hw::rdmsr(spec_ctrl::MSR_ARCH_CAPABILITIES) },
        );
        let (defences, states) = spec_ctrl::decide(&cpu, &choices);
        log::info!("spec-ctrl: {}", states.join(" "));
        spec_ctrl::put_in_force(&defences, DS::get_reg().0);
    }

    fn log_level(cmdline: &str) -> log::LevelFilter {
        let level = cmdline
            .split_whitespace()
            .find_map(|t| t.strip_prefix("loglevel="));
        level
            .and_then(|l| l.parse().ok())
            .unwrap_or(log::LevelFilter::Info)
    }

    fn fail(why: core::fmt::Arguments<'_>) -> ! {
        hv_println!("lamina: PANIC {why}");
        hv_println!("lamina: result: failure");
        exit::end_machine(false)
    }

    struct Rejected {
        index: usize,
        name: String,
        why: String,
    }

    /// What starting the other CPUs needs to know of the boot.
    struct Machine {
        /// `[start, end)` of the Multiboot2 information, which must stay intact.
        boot_info: (u64, u64),
        tsc_hz: u64,
    }

    /// The first thing each other CPU runs once set up: its own virtualization extension, then
    /// waiting for work (`smp::park`).
    fn ap_main<B: Virtualization>(index: usize) -> ! {
        match B::enable() {
            Ok(hw) => {
                hv_println!("lamina: cpu {index}: {} on", smp::short_name(B::NAME));
                // Kept for the CPU's lifetime: `park` never returns.
                let _hw = hw;
                smp::park()
            }
            Err(error) => {
                hv_println!("lamina: cpu {index}: cannot enable {}: {error}", B::NAME);
                smp::park()
            }
        }
    }

    fn run<B: Virtualization>(
        info: &BootInfo<'_>,
        time: TimeBase,
        mut host: MachineHost,
        machine: Machine,
    ) -> ! {
        let mut hw = match B::enable() {
            Ok(hw) => hw,
            Err(error) => fail(format_args!("cannot enable {}: {error}", B::NAME)),
        };
        log::info!("virtualization: {}", B::NAME);
        set_up_speculation_defences(info.cmdline);
        smp::start_other_cpus(info, machine.boot_info, machine.tsc_hz, ap_main::<B>);
        // What the domains are measured against: everything they take must come back.
        let free_before_domains = memory::figures().1;
        let mut slots: Vec<Slot<B::Vcpu>> = Vec::new();
        let mut rejected = Vec::new();
        // VPIDs or ASIDs, one per vCPU of the machine, from 1.
        let mut tlb_tags = 1..;
        for (i, module) in info.modules.iter().enumerate() {
            let index = i + 1;
            let id = slots.len() as u32 + 1;
            let building = crate::common::time::read_tsc();
            let built = build_domain(&mut hw, module, index, id, time, &mut tlb_tags);
            // Under -icount and Bochs a TSC tick is an instruction (the benchmark's rows).
            let build_tsc = crate::common::time::read_tsc().wrapping_sub(building);
            match built {
                Ok(mut slot) => {
                    let vcpus = slot.vcpus.len();
                    let asked = slot.domain.affinity;
                    let in_use = percpu::cpu_count();
                    let cpus_in_use = u64::MAX >> (64 - in_use.clamp(1, 64));
                    // CPUs that are not in use are dropped; with none left, any CPU will do
                    // (docs/abi.md 4.4).
                    let affinity = match asked & cpus_in_use {
                        0 => cpus_in_use,
                        cpus => cpus,
                    };
                    slot.domain.set_affinity(affinity);
                    hv_println!(
                        "lamina: domain {id} {} started mem={}M{}{} build_tsc={build_tsc}",
                        slot.domain.name,
                        slot.domain.memory.size() >> 20,
                        if vcpus > 1 {
                            format!(" vcpus={vcpus}")
                        } else {
                            String::new()
                        },
                        if asked == config::ANY_CPU {
                            String::new()
                        } else {
                            format!(" affinity={}", config::CpuList(affinity))
                        }
                    );
                    if asked & cpus_in_use == 0 {
                        hv_println!(
                            "lamina: domain {id} {}: affinity={} names no CPU in use ({in_use}); it runs on any",
                            slot.domain.name,
                            config::CpuList(asked)
                        );
                    }
                    slots.push(slot);
                }
                Err(why) => {
                    let name = config::name_of(module.cmdline, index);
                    hv_println!("lamina: module {index} {name} rejected: {why}");
                    rejected.push(Rejected { index, name, why });
                }
            }
        }
        crate::common::domain::DOMAIN_COUNT
            .store(slots.len() as u32, core::sync::atomic::Ordering::Relaxed);
        let cpus = percpu::cpu_count();
        if cpus == 1 {
            run_all(&mut slots, &mut host);
            summarize(&slots, &rejected, free_before_domains)
        }
        // Several CPUs: every vCPU is written back here so that any CPU can take it up, and
        // the table lives for the rest of the run, shared with the other CPUs.
        for vcpu in slots.iter_mut().flat_map(|s| s.vcpus.iter_mut().flatten()) {
            vcpu.release();
        }
        let slots: &'static mut [Slot<B::Vcpu>] = alloc::boxed::Box::leak(slots.into_boxed_slice());
        let machine: &'static SharedMachine<'static, B::Vcpu> =
            alloc::boxed::Box::leak(alloc::boxed::Box::new(SharedMachine::new(slots)));
        machine.set_cpus_online(cpus);
        AP_RUN.call_once(|| ApRun {
            machine: machine as *const SharedMachine<'static, B::Vcpu> as usize,
            time,
            apic_timer_hz: host.apic_timer_hz(),
        });
        for cpu in 1..cpus {
            if smp::run_on(cpu, ap_run::<B>).is_err() {
                hv_println!("lamina: cpu {cpu} takes no vCPUs (busy)");
            }
        }
        machine.run_cpu(0, &mut host);
        // Every domain ended: the other CPUs leave their loops too (they were kicked).
        while !(1..cpus).all(smp::work_done) {
            core::hint::spin_loop();
        }
        machine.inspect(|slots| summarize(slots, &rejected, free_before_domains))
    }

    /// What an AP needs to run its share of the vCPUs (`ap_run`).
    struct ApRun {
        /// The `SharedMachine` of the vendor chosen at boot, as an address (its type is the
        /// generic parameter of `ap_run`, which the boot CPU picked).
        machine: usize,
        time: TimeBase,
        apic_timer_hz: u64,
    }

    static AP_RUN: spin::Once<ApRun> = spin::Once::new();

    /// An AP runs the domains' vCPUs with the others until every domain ended.
    fn ap_run<B: Virtualization>(cpu: usize) {
        let Some(run) = AP_RUN.get() else { return };
        // SAFETY: `run` (the boot CPU) stored the address of a leaked
        // `SharedMachine<'static, B::Vcpu>` for this same `B` before posting `ap_run::<B>`.
        let machine = unsafe { &*(run.machine as *const SharedMachine<'static, B::Vcpu>) };
        let mut host = MachineHost::for_other_cpu(run.time, run.apic_timer_hz);
        machine.run_cpu(cpu, &mut host);
    }

    fn build_domain<B: Virtualization>(
        hw: &mut B,
        module: &Module<'_>,
        index: usize,
        id: u32,
        time: TimeBase,
        tlb_tags: &mut core::ops::RangeFrom<u32>,
    ) -> Result<Slot<B::Vcpu>, String> {
        let config = config::parse(module.cmdline, index).map_err(|e| format!("{e}"))?;
        // SAFETY: the module's bytes were taken out of the physical allocator and stay intact.
        let elf = unsafe {
            core::slice::from_raw_parts(
                module.start as *const u8,
                (module.end - module.start) as usize,
            )
        };
        let ram = memory::allocate_zeroed(config.mem_bytes, lamina_abi::layout::MEM_GRANULE_BYTES)
            .ok_or_else(|| format!("not enough memory for mem={}M", config.mem_bytes >> 20))?;
        let owned_ram = OwnedRam::new(ram, config.mem_bytes, memory::release);
        // SAFETY: `ram` is a fresh allocation of `mem_bytes`, owned by this domain from now on
        // (`owned_ram` returns it once the domain no longer uses this view).
        let memory = unsafe { GuestMemory::new(ram as *mut u8, config.mem_bytes) };
        let built = builder::load_kernel(elf, &memory).and_then(|image| {
            let params = BootParams {
                domain_id: id,
                name: &config.name,
                cmdline: module.cmdline,
                privileged: config.privileged,
                nr_vcpus: config.vcpus,
                time,
            };
            builder::write_boot_structures(&memory, &image, &params).map(|()| image)
        });
        // On an error `owned_ram` is dropped: the RAM goes back.
        let image = built.map_err(|error| format!("{error}"))?;
        // Every vCPU is built in the start-of-day state; those other than 0 get their RIP,
        // RSP, CR3 and RDI from `vcpu_op` initialise (docs/abi.md 19).
        let entries: Vec<EntryState> = (0..config.vcpus)
            .map(|_| EntryState {
                rip: image.entry,
                rsp: memory.size(),
                rdi: START_INFO_GPA,
                cr3: BOOT_PML4_GPA,
                gdt: (BOOT_GDT_GPA, BOOT_GDT_LIMIT),
                tlb_tag: (1 + (tlb_tags.next().unwrap_or(1) - 1) % 0xffff) as u16,
            })
            .collect();
        let (vcpus, nested) = hw
            .create_vcpus(&memory, &entries)
            .map_err(|error| format!("{error}"))?;
        Ok(Slot {
            domain: Domain {
                privileged: config.privileged,
                weight: config.weight,
                affinity: config.affinity,
                nested: Some(nested),
                ram: Some(owned_ram),
                memory_map: builder::MemoryMap::new(memory.size(), &image),
                ..Domain::with_vcpus(id, config.name, memory, time, config.vcpus)
            },
            vcpus: vcpus
                .into_iter()
                .map(|v| Some(alloc::boxed::Box::new(v)))
                .collect(),
        })
    }

    fn summarize<V>(slots: &[Slot<V>], rejected: &[Rejected], free_before_domains: u64) -> ! {
        hv_println!("lamina: summary");
        let mut success = !slots.is_empty() && rejected.is_empty();
        for slot in slots {
            let d = &slot.domain;
            let ending = match &d.state {
                DomainState::Ended(ending) => ending,
                DomainState::Runnable => &Ending::Fault(String::from("still running")),
            };
            success &= *ending == Ending::Poweroff;
            let stats = d.exit_stats();
            let mut counts = String::new();
            let _ = stats.write_summary(&mut counts);
            hv_println!(
                "lamina: domain {} {} end={} cpu_ms={} exits={}{}",
                d.id,
                d.name,
                ending.word(),
                d.cpu_ns() / 1_000_000,
                stats.total(),
                counts
            );
            if d.vcpus.len() > 1 || percpu::cpu_count() > 1 {
                for (index, state) in d.vcpus.iter().enumerate() {
                    let mut counts = String::new();
                    let _ = state.stats.write_summary(&mut counts);
                    hv_println!(
                        "lamina: domain {} vcpu {index}: cpus={} cpu_ms={} exits={}{}",
                        d.id,
                        config::CpuList(state.ran_on),
                        state.cpu_ns / 1_000_000,
                        state.stats.total(),
                        counts
                    );
                }
            }
        }
        for r in rejected {
            hv_println!("lamina: module {} {} rejected: {}", r.index, r.name, r.why);
        }
        if percpu::cpu_count() > 1 {
            for cpu in 0..percpu::cpu_count() {
                let (slices, busy_ns) = crate::common::cpus::cpu_figures(cpu);
                hv_println!(
                    "lamina: cpu {cpu}: {slices} slices, {} ms running vCPUs",
                    busy_ns / 1_000_000
                );
            }
            hv_println!(
                "lamina: run queues: one per CPU, {} vCPU migrations between them; {} slices on \
                 another CPU than the vCPU's last",
                crate::common::cpus::migrations(),
                crate::common::cpus::cpu_changes()
            );
            hv_println!("{}", crate::common::sched::locking::summary_line());
        } else {
            log::info!(
                "directed switches: {}",
                crate::common::sched::locking::DIRECT_SWITCHES
                    .load(core::sync::atomic::Ordering::Relaxed)
            );
        }
        hv_println!(
            "lamina: nmi: {} host NMIs taken by the hypervisor, none given to a guest",
            crate::platform::cpu::HOST_NMIS.load(core::sync::atomic::Ordering::Relaxed)
        );
        // Every domain was torn down: all it took must be back.
        let free_at_end = memory::figures().1;
        hv_println!(
            "lamina: memory: {} KiB free before domains, {} KiB at the end, {} KiB leaked",
            free_before_domains >> 10,
            free_at_end >> 10,
            free_before_domains.saturating_sub(free_at_end) >> 10
        );
        crate::common::trace::dump(&mut |line| hv_println!("{line}"));
        hv_println!(
            "lamina: result: {}",
            if success { "success" } else { "failure" }
        );
        exit::end_machine(success)
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        // SAFETY: the machine stops after this; taking the port over avoids a deadlock when
        // the panic happened while printing.
        unsafe { serial::SERIAL.force_unlock() };
        hv_println!("lamina: PANIC {info}");
        hv_println!("lamina: result: failure");
        exit::end_machine(false)
    }
}

//! vCPU threads: run KVM_RUN, dispatch trapped I/O to the buses, report why the guest stopped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::Bus;
use crate::coalesced::CoalescedRing;
use crate::exit::{ExitHandle, VmExit};
use crate::watchdog::{Probes, Sample};

use backends::sandbox::{allow, allow_if, Rule, ThreadKind};
use kvm_bindings::{
    kvm_device_attr, kvm_ioeventfd, kvm_irq_level, kvm_irq_routing, kvm_irqfd, kvm_mp_state,
    kvm_msi, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events,
};

use crate::sandbox::{io, ior, iow, KVMIO, VFIO_BASE, VFIO_TYPE};

/// The ioctls a vCPU thread makes: KVM_RUN and the state read for a crash report or a
/// watchdog sample on its own vCPU fd; on the VM fd, what the devices emulated on a vCPU
/// exit ask when the guest programs them (MSI-X vectors routed to irqfds, doorbells moved
/// with a BAR, an assigned device's BAR mapping moved or dropped); an assigned device's
/// config space writes (MSI/MSI-X enable, FLR); the tap queues a NIC's reset detaches.
const VCPU_IOCTLS: &[Rule] = &[
    allow_if(libc::SYS_ioctl, &[(1, io(KVMIO, 0x80))]), // KVM_RUN
    allow_if(libc::SYS_ioctl, &[(1, ior::<kvm_regs>(KVMIO, 0x81))]), // KVM_GET_REGS
    allow_if(libc::SYS_ioctl, &[(1, ior::<kvm_sregs>(KVMIO, 0x83))]), // KVM_GET_SREGS
    allow_if(libc::SYS_ioctl, &[(1, ior::<kvm_mp_state>(KVMIO, 0x98))]), // KVM_GET_MP_STATE
    allow_if(libc::SYS_ioctl, &[(1, ior::<kvm_vcpu_events>(KVMIO, 0x9f))]), // KVM_GET_VCPU_EVENTS
    allow_if(libc::SYS_ioctl, &[(1, iow::<kvm_irqfd>(KVMIO, 0x76))]), // KVM_IRQFD
    allow_if(libc::SYS_ioctl, &[(1, iow::<kvm_ioeventfd>(KVMIO, 0x79))]), // KVM_IOEVENTFD
    allow_if(libc::SYS_ioctl, &[(1, iow::<kvm_irq_routing>(KVMIO, 0x6a))]), // KVM_SET_GSI_ROUTING
    allow_if(libc::SYS_ioctl, &[(1, iow::<kvm_msi>(KVMIO, 0xa5))]), // KVM_SIGNAL_MSI
    allow_if(libc::SYS_ioctl, &[(1, iow::<kvm_irq_level>(KVMIO, 0x61))]), // KVM_IRQ_LINE
    allow_if(
        libc::SYS_ioctl,
        &[(1, iow::<kvm_userspace_memory_region>(KVMIO, 0x46))],
    ), // KVM_SET_USER_MEMORY_REGION
    allow_if(libc::SYS_ioctl, &[(1, iow::<kvm_device_attr>(KVMIO, 0xe1))]), // KVM_SET_DEVICE_ATTR
    allow_if(libc::SYS_ioctl, &[(1, io(VFIO_TYPE, VFIO_BASE + 7))]), // VFIO_DEVICE_GET_INFO
    allow_if(libc::SYS_ioctl, &[(1, io(VFIO_TYPE, VFIO_BASE + 8))]), // VFIO_DEVICE_GET_REGION_INFO
    allow_if(libc::SYS_ioctl, &[(1, io(VFIO_TYPE, VFIO_BASE + 9))]), // VFIO_DEVICE_GET_IRQ_INFO
    allow_if(libc::SYS_ioctl, &[(1, io(VFIO_TYPE, VFIO_BASE + 10))]), // VFIO_DEVICE_SET_IRQS
    allow_if(libc::SYS_ioctl, &[(1, io(VFIO_TYPE, VFIO_BASE + 11))]), // VFIO_DEVICE_RESET
    allow_if(libc::SYS_ioctl, &[(1, io(VFIO_TYPE, VFIO_BASE + 12))]), // VFIO_DEVICE_GET_PCI_HOT_RESET_INFO
    allow_if(libc::SYS_ioctl, &[(1, io(VFIO_TYPE, VFIO_BASE + 13))]), // VFIO_DEVICE_PCI_HOT_RESET
    allow_if(libc::SYS_ioctl, &[(1, libc::TUNSETOFFLOAD)]),
    allow_if(libc::SYS_ioctl, &[(1, libc::TUNSETVNETHDRSZ)]),
    allow_if(libc::SYS_ioctl, &[(1, libc::TUNSETQUEUE)]),
    allow_if(libc::SYS_ioctl, &[(1, libc::TUNGETIFF)]),
];

/// What a vCPU thread calls besides its ioctls: the devices' work on an exit (serial
/// output, eventfds signalled and drained, an assigned device's trapped BAR and config
/// accesses through its region fd, a moved BAR remapped), a driver's DRIVER_OK (the
/// device's eventfds duplicated, its queue threads started: see [`crate::sandbox`]), a
/// reset (queue threads stopped and joined), the exit requests to the control thread, and
/// the parking of `vm.pause`.
const VCPU_SYSCALLS: &[Rule] = &[
    allow(libc::SYS_read),
    allow(libc::SYS_write),
    allow(libc::SYS_pread64),
    allow(libc::SYS_pwrite64),
    allow(libc::SYS_eventfd2),
    allow(libc::SYS_fcntl),
    allow(libc::SYS_close),
    allow(libc::SYS_epoll_create1),
    allow(libc::SYS_epoll_ctl),
    allow(libc::SYS_io_uring_setup),
    allow(libc::SYS_io_uring_register),
];

/// The vCPU threads' kind (joined with the queue threads' kinds it starts, in
/// [`crate::vm::Vm::run`]).
pub const VCPU: ThreadKind = ThreadKind {
    name: "vcpu",
    syscalls: &[
        VCPU_SYSCALLS,
        VCPU_IOCTLS,
        crate::sandbox::COMMON_SYSCALLS,
        crate::sandbox::SPAWN_SYSCALLS,
    ],
};

/// Exits to userspace that did not go to a bus device.
#[derive(Default)]
pub struct VcpuCounters {
    /// KVM_RUN interrupted by a signal (the VMM kicking the vCPU).
    pub interrupted: AtomicU64,
    /// Any other exit reason, by name.
    pub other: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl VcpuCounters {
    fn other(&self, what: &'static str) {
        *self
            .other
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(what)
            .or_insert(0) += 1;
    }
}

/// Called when KVM_RUN fails with EFAULT, with the guest physical address when KVM says
/// it: returns true if an assigned device's mapping caused it and was dropped (retry).
pub type MappingFault = Arc<dyn Fn(Option<u64>) -> bool + Send + Sync>;

/// What a vCPU thread needs.
pub struct VcpuContext {
    pub id: u8,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: ExitHandle,
    pub stop: Arc<AtomicBool>,
    pub counters: Arc<VcpuCounters>,
    /// Writes KVM buffered instead of exiting: applied before every exit is handled.
    pub coalesced: Option<Arc<CoalescedRing>>,
    /// With `--watchdog`: where this thread counts its exits and answers samples.
    pub probes: Option<Arc<Probes>>,
    /// Assigned devices' answer to a faulting BAR mapping (none without `--vfio`).
    pub mapping_fault: Option<MappingFault>,
    /// Where the thread parks while the VM is paused (the control API).
    pub pause: Arc<crate::pause::PauseGate>,
}

/// A guest access faulted in KVM_RUN (EFAULT). An assigned device whose BAR mapping
/// vfio-pci revoked (the guest stopped its decoding behind the vmm's back) is the guest's
/// doing: that device drops the mapping and logs it, and the vCPU retries the access,
/// which is then trapped. Anything else is the vmm's failure.
fn memory_fault(ctx: &VcpuContext, gpa: Option<u64>) -> bool {
    let handled = ctx.mapping_fault.as_ref().is_some_and(|f| f(gpa));
    if handled {
        ctx.counters.other("passthrough_mapping_fault");
    }
    handled
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal used to kick a vCPU out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the (empty) handler for the kick signal, so that it interrupts KVM_RUN with EINTR
/// instead of killing the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

fn crash(ctx: &VcpuContext, vcpu: &VcpuFd, reason: String) {
    ctx.exit.request(VmExit::Crash {
        vcpu: ctx.id,
        reason,
        state: cpu_state(vcpu),
    });
}

/// The vCPU's registers and pending events where the guest crashed, on one line: what a
/// kernel developer needs to tell a guest bug (RIP, the fault address in CR2, the IDT) from
/// a VMM one (an event injected at the wrong time).
fn cpu_state(vcpu: &VcpuFd) -> String {
    let sregs = match vcpu.get_sregs() {
        // AMD's KVM INITs a vCPU at a shutdown (its VMCB is undefined after one): what is
        // left is the reset state, not the faulting one.
        Ok(r) if r.cs.selector == 0xf000 && r.cs.base == 0xffff_0000 && r.cr0 & 1 == 0 => {
            return "the reset state (KVM on AMD re-initializes a vCPU that shut down, so the \
                    faulting state is lost)"
                .into();
        }
        Ok(r) => format!(
            "cs={:#x} cpl={} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} \
             idt={:#x}+{:#x} gdt={:#x}+{:#x} tr={:#x}@{:#x}",
            r.cs.selector,
            r.cs.dpl,
            r.cr0,
            r.cr2,
            r.cr3,
            r.cr4,
            r.efer,
            r.idt.base,
            r.idt.limit,
            r.gdt.base,
            r.gdt.limit,
            r.tr.selector,
            r.tr.base
        ),
        Err(e) => format!("system registers unreadable ({e})"),
    };
    let regs = match vcpu.get_regs() {
        Ok(r) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} \
             rsi={:#x} rdi={:#x} rbp={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        ),
        Err(e) => format!("registers unreadable ({e})"),
    };
    let events = match vcpu.get_vcpu_events() {
        Ok(ev) => {
            let mut v = Vec::new();
            let ex = ev.exception;
            if ex.injected != 0 || ex.pending != 0 {
                let how = if ex.injected != 0 {
                    "injected"
                } else {
                    "pending"
                };
                let mut e = format!("exception {} {how}", ex.nr);
                if ex.has_error_code != 0 {
                    e.push_str(&format!(" error {:#x}", ex.error_code));
                }
                v.push(e);
            }
            if ev.interrupt.injected != 0 {
                v.push(format!("interrupt {} injected", ev.interrupt.nr));
            }
            if ev.nmi.injected != 0 {
                v.push("nmi injected".into());
            }
            if v.is_empty() {
                "none".into()
            } else {
                v.join(", ")
            }
        }
        Err(e) => format!("unreadable ({e})"),
    };
    format!("{regs} {sregs} events: {events}")
}

/// What the watchdog asks of a vCPU: its sample and its full state line.
fn sample(vcpu: &VcpuFd) -> (Sample, String) {
    let regs = vcpu.get_regs().ok();
    let mp = vcpu.get_mp_state().ok().map(|m| m.mp_state);
    let sample = Sample {
        rip: regs.map_or(0, |r| r.rip),
        rflags: regs.map_or(0, |r| r.rflags),
        halted: mp == Some(kvm_bindings::KVM_MP_STATE_HALTED),
        exits: 0,
    };
    let mp = mp.map_or("unreadable".to_string(), |m| m.to_string());
    (sample, format!("{} mp_state={mp}", cpu_state(vcpu)))
}

/// Runs the vCPU until the VM stops or the guest does something that ends it.
pub fn run(mut vcpu: VcpuFd, ctx: VcpuContext) {
    let id = usize::from(ctx.id);
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            return;
        }
        ctx.pause.checkpoint(&ctx.stop);
        if ctx.stop.load(Ordering::Acquire) {
            return;
        }
        if let Some(p) = ctx.probes.as_ref().filter(|p| p.asked(id)) {
            p.answer(id, || sample(&vcpu));
        }
        let exit = vcpu.run();
        if let (Some(p), Ok(e)) = (&ctx.probes, &exit) {
            if !matches!(e, VcpuExit::Intr) {
                p.exited(id);
            }
        }
        if let Some(ring) = &ctx.coalesced {
            // A buffered write (the PCI config address) comes before the access that exited.
            ring.drain(&ctx.pio, &ctx.mmio);
        }
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.pio.read(u64::from(port), data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
            }
            Ok(VcpuExit::Shutdown) => {
                crash(&ctx, &vcpu, "triple fault (KVM_EXIT_SHUTDOWN)".into());
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ctx.exit.request(VmExit::PowerOff),
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => ctx.exit.request(VmExit::Reboot),
                    other => crash(&ctx, &vcpu, format!("KVM system event {other}")),
                }
                return;
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: reading the kvm_run union member KVM filled for this exit reason.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                crash(
                    &ctx,
                    &vcpu,
                    format!("KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {suberror})"),
                );
                return;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                crash(
                    &ctx,
                    &vcpu,
                    format!("VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, host cpu {cpu})"),
                );
                return;
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel LAPIC, HLT never reaches userspace; a guest that gets
                // here halted with interrupts the VMM cannot deliver.
                crash(
                    &ctx,
                    &vcpu,
                    "halted (KVM_EXIT_HLT) with no way to wake up".into(),
                );
                return;
            }
            Ok(VcpuExit::Intr) => {
                ctx.counters.interrupted.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VcpuExit::IrqWindowOpen) => ctx.counters.other("irq_window"),
            Ok(VcpuExit::MemoryFault { gpa, size, .. }) => {
                if !memory_fault(&ctx, Some(gpa)) {
                    ctx.exit.request(VmExit::VmmError(format!(
                        "vcpu {}: KVM_RUN: memory fault at guest address {gpa:#x}+{size:#x} \
                         that no device explains",
                        ctx.id
                    )));
                    return;
                }
            }
            Ok(other) => {
                let name = exit_name(&other);
                ctx.counters.other(name);
                log::warn!("vcpu {}: unexpected exit {name}; resuming", ctx.id);
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ctx.counters.interrupted.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.errno() == libc::EFAULT && memory_fault(&ctx, None) => {}
            Err(e) => {
                ctx.exit.request(VmExit::VmmError(format!(
                    "vcpu {}: KVM_RUN failed: {e}",
                    ctx.id
                )));
                return;
            }
        }
    }
}

fn exit_name(e: &VcpuExit) -> &'static str {
    match e {
        VcpuExit::Exception => "exception",
        VcpuExit::Hypercall(_) => "hypercall",
        VcpuExit::Debug(_) => "debug",
        VcpuExit::SetTpr => "set_tpr",
        VcpuExit::TprAccess => "tpr_access",
        VcpuExit::Nmi => "nmi",
        VcpuExit::IoapicEoi(_) => "ioapic_eoi",
        VcpuExit::X86Rdmsr(_) => "rdmsr",
        VcpuExit::X86Wrmsr(_) => "wrmsr",
        VcpuExit::MemoryFault { .. } => "memory_fault",
        _ => "other",
    }
}

/// Kicks all vCPU threads out of KVM_RUN until they have returned.
pub fn stop_all(stop: &AtomicBool, threads: Vec<thread::JoinHandle<()>>) {
    use vmm_sys_util::signal::Killable;
    stop.store(true, Ordering::Release);
    // A kick that lands just before a thread enters KVM_RUN is lost, so repeat until every
    // thread has seen `stop`.
    while threads.iter().any(|t| !t.is_finished()) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(kick_signal());
        }
        thread::sleep(std::time::Duration::from_millis(1));
    }
    for t in threads {
        if t.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(mapping_fault: Option<MappingFault>) -> VcpuContext {
        let (exit, _rx) = ExitHandle::new();
        VcpuContext {
            id: 0,
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            exit,
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::new(VcpuCounters::default()),
            coalesced: None,
            probes: None,
            pause: Arc::default(),
            mapping_fault,
        }
    }

    fn faults(c: &VcpuContext) -> u64 {
        let other = c.counters.other.lock().unwrap();
        other.get("passthrough_mapping_fault").copied().unwrap_or(0)
    }

    #[test]
    fn an_efault_is_retried_only_when_an_assigned_device_explains_it() {
        // No assigned device: the vmm's failure.
        let c = ctx(None);
        assert!(!memory_fault(&c, None));
        // The device whose mapping it was drops it once; the next fault is not its.
        let left = Arc::new(std::sync::Mutex::new(1u32));
        let l = left.clone();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let c = ctx(Some(Arc::new(move |gpa| {
            s.lock().unwrap().push(gpa);
            let mut n = l.lock().unwrap();
            let ours = *n > 0;
            *n = n.saturating_sub(1);
            ours
        })));
        assert!(memory_fault(&c, Some(0xc000_0000)));
        assert_eq!(faults(&c), 1);
        assert!(!memory_fault(&c, None));
        assert_eq!(faults(&c), 1);
        assert_eq!(*seen.lock().unwrap(), vec![Some(0xc000_0000), None]);
    }
}

//! Interrupt routing: KVM GSI routes for MSI/MSI-X vectors and irqfds.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so the router keeps every route (the
//! in-kernel IOAPIC and PIC pins as well as the MSI routes) and commits them all at once.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

#[cfg(any(test, feature = "fuzzing"))]
pub use passthrough::interrupt::fake;
pub use passthrough::interrupt::{InterruptRouter, MsiMessage};

use crate::layout::IOAPIC_PINS;

/// Most routes KVM accepts.
const MAX_ROUTES: usize = kvm_bindings::KVM_MAX_IRQ_ROUTES;

struct Routes {
    next_gsi: u32,
    msi: BTreeMap<u32, MsiMessage>,
    /// GSIs given back by devices that went away, handed out again first.
    released: Vec<u32>,
}

/// The KVM implementation of [`InterruptRouter`].
pub struct KvmRouter {
    vm: Arc<VmFd>,
    routes: Mutex<Routes>,
}

fn kvm_io(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl KvmRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmRouter {
            vm,
            routes: Mutex::new(Routes {
                next_gsi: IOAPIC_PINS,
                msi: BTreeMap::new(),
                released: Vec::new(),
            }),
        }
    }

    fn commit(&self, routes: &Routes) -> io::Result<()> {
        let mut entries = Vec::new();
        let irqchip = |gsi: u32, chip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = pin;
            e
        };
        // The default routing of the in-kernel irqchip: ISA IRQs to both PICs and the
        // IOAPIC, GSIs 16..24 to the IOAPIC only.
        for gsi in 0..IOAPIC_PINS {
            if gsi < 8 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, msg) in &routes.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = msg.addr_lo;
            e.u.msi.address_hi = msg.addr_hi;
            e.u.msi.data = msg.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("GSI routing table: {e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(kvm_io)
    }
}

impl InterruptRouter for KvmRouter {
    fn allocate_gsi(&self) -> io::Result<u32> {
        let mut r = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gsi) = r.released.pop() {
            return Ok(gsi);
        }
        if r.next_gsi as usize >= MAX_ROUTES {
            return Err(io::Error::other("no GSI left for an MSI route"));
        }
        let gsi = r.next_gsi;
        r.next_gsi += 1;
        Ok(gsi)
    }

    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> io::Result<()> {
        let mut r = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if r.msi.get(&gsi) == Some(&msg) {
            return Ok(());
        }
        r.msi.insert(gsi, msg);
        self.commit(&r)
    }

    fn remove_route(&self, gsi: u32) -> io::Result<()> {
        let mut r = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if r.msi.remove(&gsi).is_some() {
            self.commit(&r)?;
        }
        Ok(())
    }

    fn release_gsi(&self, gsi: u32) -> io::Result<()> {
        let mut r = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if gsi < IOAPIC_PINS || gsi >= r.next_gsi || r.released.contains(&gsi) {
            return Ok(());
        }
        r.released.push(gsi);
        if r.msi.remove(&gsi).is_some() {
            self.commit(&r)?;
        }
        Ok(())
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm.register_irqfd(fd, gsi).map_err(kvm_io)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm.unregister_irqfd(fd, gsi).map_err(kvm_io)
    }

    fn register_resample_irqfd(
        &self,
        fd: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> io::Result<()> {
        self.vm
            .register_irqfd_with_resample(fd, resample, gsi)
            .map_err(kvm_io)
    }
}

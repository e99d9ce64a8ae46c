//! The KVM side of VFIO passthrough: the KVM VFIO pseudo device, the container with all
//! guest RAM mapped for DMA, KVM memory slots for the devices' BARs, and each assigned
//! device on the PCI bus (its PCI logic lives in the `passthrough` crate).

use std::io;
use std::sync::{Arc, Mutex, Weak};

use kvm_bindings::{
    kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use passthrough::device::{DmaGate, GuestMapper, PassthroughPci, Placement};
use passthrough::host::Host;
use passthrough::vfio::{Container, Vfio};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VfioConfig;
use crate::exit::{ExitHandle, VmExit};
use crate::interrupt::InterruptRouter;
use crate::layout;
use crate::memory::Ram;
use crate::pci::{PciDevice, PciRoot};
use crate::vm::BarAllocator;
use crate::Error;

/// KVM memory slots for BAR mappings, above the RAM slots.
pub struct KvmMapper {
    vm: Arc<VmFd>,
    first: u32,
    used: Mutex<Vec<bool>>,
}

impl KvmMapper {
    pub fn new(vm: Arc<VmFd>, first: u32) -> Self {
        KvmMapper {
            vm,
            first,
            used: Mutex::new(Vec::new()),
        }
    }
}

impl GuestMapper for KvmMapper {
    fn map(&self, gpa: u64, size: u64, host: *mut u8) -> io::Result<u32> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let i = match used.iter().position(|u| !u) {
            Some(i) => i,
            None => {
                used.push(false);
                used.len() - 1
            }
        };
        let slot = self.first + i as u32;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is a live mapping of `size` bytes of a device region, kept by the
        // caller until `unmap`; KVM only maps it into the guest.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        used[i] = true;
        Ok(slot)
    }

    fn unmap(&self, slot: u32) -> io::Result<()> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let i = slot
            .checked_sub(self.first)
            .map(|i| i as usize)
            .filter(|&i| used.get(i) == Some(&true))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero size deletes the slot; no memory is mapped.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        used[i] = false;
        Ok(())
    }
}

/// A PCI INTx line for the DSDT's _PRT: device `slot`, pin (0 = INTA), GSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntxRoute {
    pub slot: u8,
    pub pin: u8,
    pub gsi: u32,
}

/// What assignment keeps alive for the VM's lifetime. Drop it after the PCI bus: the
/// devices are then quiesced and reset, guest RAM is unmapped from the IOMMU, and only
/// then are the device and group fds closed (the group leaves the container).
pub struct Assigned {
    container: Arc<Container>,
    /// The thread mapping guest RAM for DMA while the VM boots (see [`DmaGate`]).
    mapping: Option<std::thread::JoinHandle<()>>,
    devices: Vec<Arc<dyn Vfio>>,
    /// The devices on the PCI bus (owned by it), for [`Assigned::fault_handler`].
    pci: Vec<Weak<Mutex<PassthroughPci>>>,
    pub routes: Vec<IntxRoute>,
}

impl Assigned {
    /// What a vCPU calls when KVM_RUN fails with EFAULT (at guest physical `gpa` when KVM
    /// says where): an assigned device stopped decoding memory in a way the vmm did not
    /// follow, so vfio-pci revoked the BAR mmap behind a KVM slot. The device that owns
    /// the fault drops its slots (and logs it, rate-limited) and `true` is returned: the
    /// vCPU retries, and the access is trapped. `false`: no assigned device explains it.
    pub fn fault_handler(&self) -> crate::vcpu::MappingFault {
        let pci = self.pci.clone();
        Arc::new(move |gpa| {
            let mut handled = false;
            for dev in pci.iter().filter_map(Weak::upgrade) {
                let mut dev = dev.lock().unwrap_or_else(|p| p.into_inner());
                handled |= dev.mapping_fault(gpa);
            }
            handled
        })
    }
}

impl Drop for Assigned {
    fn drop(&mut self) {
        // A mapping still in progress ends first: nothing may map guest RAM for DMA after
        // it is unmapped (and guest RAM itself goes after this).
        if let Some(t) = self.mapping.take() {
            let _ = t.join();
        }
        self.container.unmap_all();
        self.devices.clear();
    }
}

/// Maps guest RAM (`(guest address, size, host address)`) into the container for DMA on a
/// thread of its own, and opens `gate` when done. A failure stops the VM: the devices cannot
/// DMA, so the guest's drivers would time out one by one.
fn map_guest_ram(
    container: Arc<Container>,
    regions: Vec<(u64, u64, usize)>,
    gate: Arc<DmaGate>,
    exit: ExitHandle,
) -> io::Result<std::thread::JoinHandle<()>> {
    let total: u64 = regions.iter().map(|r| r.1).sum();
    std::thread::Builder::new()
        .name("vfio-dma-map".into())
        .spawn(move || {
            let t0 = std::time::Instant::now();
            for (iova, size, host) in regions {
                // SAFETY: `host` is guest RAM, which stays mapped until the VM is dropped,
                // after `Assigned`, whose drop joins this thread and unmaps the range first.
                if let Err(e) = unsafe { container.map_dma(iova, size, host as *mut u8) } {
                    let why = format!(
                        "cannot map guest RAM for device DMA: {}",
                        crate::error_line(&e)
                    );
                    gate.finish(Err(why.clone()));
                    exit.request(VmExit::VmmError(why));
                    return;
                }
            }
            // Pinning (and first touching) every page of guest RAM: with a lot of RAM this
            // is where a passthrough VM's start-up time goes; the guest boots meanwhile.
            log::info!(
                "guest RAM ({} MiB) mapped for device DMA in {} ms, while the guest booted",
                total >> 20,
                t0.elapsed().as_millis()
            );
            gate.finish(Ok(()));
        })
}

/// Opens the VFIO container, maps guest RAM for DMA (in the background: see [`DmaGate`])
/// and puts every `--vfio` device on the PCI bus.
#[allow(clippy::too_many_arguments)]
pub fn assign(
    devices: &[VfioConfig],
    vm: &Arc<VmFd>,
    ram: &Ram,
    root: &Arc<Mutex<PciRoot>>,
    bars: &mut BarAllocator,
    router: &Arc<dyn InterruptRouter>,
    ram_size: u64,
    exit: &ExitHandle,
) -> Result<Option<Assigned>, Error> {
    if devices.is_empty() {
        return Ok(None);
    }
    let first = &devices[0];
    let fail = |id: &str, why: String| Error::Vfio {
        id: id.to_string(),
        why,
    };
    // What blocks an assignment, said in one line before VFIO is touched: no such device,
    // no IOMMU, not on vfio-pci, group not viable, no /dev/vfio node, memlock too low.
    let host = Host::new();
    let mut sysfs = Vec::new();
    for d in devices {
        let ok = host
            .preflight(d.bdf, ram_size)
            .map_err(|p| fail(&d.id, p.to_string()))?;
        sysfs.push(ok.sysfs_path);
    }
    let mut kvm_dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    let kvm_vfio = vm.create_device(&mut kvm_dev).map_err(|e| {
        fail(
            &first.id,
            format!(
                "KVM cannot create its VFIO device ({e}); load the kvm module with VFIO support"
            ),
        )
    })?;
    let handle = Arc::new(vfio_ioctls::VfioDeviceFd::new_from_kvm(kvm_vfio));
    let container =
        Arc::new(Container::new(Some(handle)).map_err(|e| fail(&first.id, crate::error_line(&e)))?);
    let mut assigned = Assigned {
        container,
        mapping: None,
        devices: Vec::new(),
        pci: Vec::new(),
        routes: Vec::new(),
    };
    let gate = DmaGate::new();
    let mapper: Arc<dyn GuestMapper> =
        Arc::new(KvmMapper::new(vm.clone(), ram.memory.num_regions() as u32));
    let mut root = root.lock().unwrap_or_else(|p| p.into_inner());
    // Every group joins the container first: the kernel holds the container's lock while
    // it maps (pins) guest RAM, so a group joining later would wait for the whole mapping.
    let mut opened = Vec::new();
    for (d, path) in devices.iter().zip(&sysfs) {
        let dev = assigned
            .container
            .open(path)
            .map_err(|e| fail(&d.id, crate::error_line(&e)))?;
        opened.push(dev);
    }
    // Now guest RAM is mapped, once for all devices, while they are set up and the guest
    // boots; their Bus Master Enable waits for it.
    let mut regions = Vec::new();
    for region in ram.memory.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Internal(format!("guest RAM has no host mapping: {e}")))?;
        regions.push((region.start_addr().0, region.len(), host as usize));
    }
    assigned.mapping = Some(
        map_guest_ram(
            assigned.container.clone(),
            regions,
            gate.clone(),
            exit.clone(),
        )
        .map_err(Error::Thread)?,
    );
    for (n, ((d, dev), path)) in devices.iter().zip(opened).zip(&sysfs).enumerate() {
        let dev: Arc<dyn Vfio> = Arc::new(dev);
        assigned.devices.push(dev.clone());
        let gsi = layout::PCI_INTX_GSI_FIRST + (n as u32 % layout::PCI_INTX_GSIS);
        let mut alloc = |kind, size| bars.alloc_kind(kind, size);
        let pci = PassthroughPci::new(
            &d.id,
            dev,
            router.clone(),
            mapper.clone(),
            Placement {
                alloc: &mut alloc,
                intx_gsi: gsi,
                rom: d.rom,
                dma: Some(gate.clone()),
            },
        )
        .map_err(|e| fail(&d.id, crate::error_line(&e)))?;
        let pin = pci.intx_pin();
        let bar_list = pci.bars();
        let pci = Arc::new(Mutex::new(pci));
        assigned.pci.push(Arc::downgrade(&pci));
        let slot = root.add(&d.id, pci.clone())?;
        let mapped: u64 = pci
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mapped_ranges()
            .iter()
            .map(|r| r.1)
            .sum();
        if let Some(pin) = pin {
            assigned.routes.push(IntxRoute {
                slot,
                pin: pin - 1,
                gsi,
            });
        }
        log::info!(
            "{}: {} assigned at 00:{slot:02x}.0, {} BAR(s), {} KiB mapped directly, INTx {}",
            d.id,
            path.display(),
            bar_list.len(),
            mapped >> 10,
            pin.map_or("none".to_string(), |_| format!("on GSI {gsi}"))
        );
    }
    Ok(Some(assigned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusDevice};
    use crate::pci::{PciConfigMmio, PciWindows, COMMAND_IO, COMMAND_MEMORY};
    use passthrough::fuzzing::{rig, Rig, PM_CAP};

    /// An assigned device (the fake e1000e of `passthrough::fuzzing`) on the real root: its
    /// KVM slots follow where the root routes its BARs, and exist only while the device
    /// decodes memory, whichever of the two changes.
    #[test]
    fn an_assigned_device_maps_only_where_the_root_routes_and_while_it_decodes() {
        let (mmio, pio) = (Arc::new(Bus::new()), Arc::new(Bus::new()));
        // A 512 MiB guest: RAM below 0x2000_0000, the 32-bit window at 0xc000_0000.
        let root = Arc::new(Mutex::new(PciRoot::new(
            mmio.clone(),
            pio.clone(),
            PciWindows::for_guest(512 << 20),
        )));
        let Rig {
            dev, mapper, pci, ..
        } = rig(true, true, None);
        let pci = Arc::new(Mutex::new(pci));
        let slot = root.lock().unwrap().add("nic0", pci.clone()).unwrap();
        let mut ecam = PciConfigMmio::new(root.clone());
        let mut cfg = |off: usize, v: &[u8]| ecam.write((u64::from(slot) << 15) | off as u64, v);
        let slots = || {
            let mut v: Vec<(u64, u64)> = mapper.maps.lock().unwrap().values().copied().collect();
            v.sort_unstable();
            v
        };
        let bar0 = |base: u64| {
            vec![
                (base, 0x10000),
                (base + 0x11000, 0x7000),
                (base + 0x19000, 0x7000),
            ]
        };
        let with_bar4 = |mut v: Vec<(u64, u64)>| {
            v.push((0xc010_0000, 1 << 20));
            v.sort_unstable();
            v
        };
        // Added: decoding on as firmware leaves it, the BARs routed and mapped.
        assert_eq!(slots(), with_bar4(bar0(0xc000_0000)));
        // Memory Space Enable off: the slots go (before the device stops decoding); a
        // trapped access finds nothing routed there.
        cfg(0x04, &COMMAND_IO.to_le_bytes());
        assert!(slots().is_empty());
        let mut d = [0u8; 4];
        assert!(!mmio.read(0xc000_0100, &mut d));
        // Moved while off (sizing, then the new address): nothing mapped anywhere.
        cfg(0x10, &[0xff; 4]);
        cfg(0x10, &0xd000_0000u32.to_le_bytes());
        assert!(slots().is_empty());
        // On again: mapped at the new address only; the MSI-X page there is trapped and
        // reaches the device's table.
        cfg(0x04, &(COMMAND_IO | COMMAND_MEMORY).to_le_bytes());
        assert_eq!(slots(), with_bar4(bar0(0xd000_0000)));
        assert!(mmio.write(0xd001_0000, &0xfee0_0000u32.to_le_bytes()));
        assert!(mmio.read(0xd001_0000, &mut d));
        assert_eq!(u32::from_le_bytes(d), 0xfee0_0000);
        // D3hot: the root still routes the BARs (it knows no power states), the device
        // unmaps them; back in D0 they come back where the root routes them.
        cfg(PM_CAP + 4, &3u16.to_le_bytes());
        assert!(slots().is_empty());
        assert!(mmio.read(0xd000_0100, &mut d), "still routed (trapped)");
        assert_eq!(d, [0xff; 4]);
        cfg(PM_CAP + 4, &0u16.to_le_bytes());
        assert_eq!(slots(), with_bar4(bar0(0xd000_0000)));
        // The guest moves BAR0 onto its RAM with decoding on: the root refuses to route it,
        // so no KVM slot of the device may cover RAM.
        cfg(0x10, &0x1000_0000u32.to_le_bytes());
        assert_eq!(slots(), with_bar4(Vec::new()));
        // Moved again in D3hot to a valid place: routed, mapped only once in D0.
        cfg(PM_CAP + 4, &3u16.to_le_bytes());
        cfg(0x10, &0xd800_0000u32.to_le_bytes());
        assert!(slots().is_empty());
        cfg(PM_CAP + 4, &0u16.to_le_bytes());
        assert_eq!(slots(), with_bar4(bar0(0xd800_0000)));
        // Never a slot while the device decoded no memory, never an access vfio-pci fails.
        assert!(mapper.late.lock().unwrap().is_empty(), "{:?}", mapper.late);
        assert!(
            dev.bad_accesses.lock().unwrap().is_empty(),
            "{:?}",
            dev.bad_accesses
        );
        // Taken off the root and dropped: no slot left.
        let devices = root.lock().unwrap().take_devices();
        drop(devices);
        drop(pci);
        assert!(slots().is_empty());
    }
}

//! The KVM side of VFIO passthrough: the KVM VFIO pseudo device, the container with all
//! guest RAM mapped for DMA, KVM memory slots for the devices' BARs, and each assigned
//! device on the PCI bus (its PCI logic lives in the `passthrough` crate).

use backends::sandbox::{allow_if, Rule, ThreadKind};
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
use crate::memory::GuestMemory;
use crate::pci::{PciDevice, PciRoot};
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

/// The assigned devices of the VM, for the vCPUs' mapping-fault handler (see
/// [`fault_handler`]); empty while none is assigned.
pub type AssignedList = Arc<Mutex<Vec<Weak<Mutex<PassthroughPci>>>>>;

/// What a vCPU calls when KVM_RUN fails with EFAULT (at guest physical `gpa` when KVM says
/// where): an assigned device stopped decoding memory in a way the vmm did not follow, so
/// vfio-pci revoked the BAR mmap behind a KVM slot. The device that owns the fault drops
/// its slots (and logs it, rate-limited) and `true` is returned: the vCPU retries, and the
/// access is trapped. `false`: no assigned device explains it.
pub fn fault_handler(list: AssignedList) -> crate::vcpu::MappingFault {
    Arc::new(move |gpa| {
        let devices: Vec<_> = list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut handled = false;
        for dev in devices {
            let mut dev = dev.lock().unwrap_or_else(|p| p.into_inner());
            handled |= dev.mapping_fault(gpa);
        }
        handled
    })
}

/// What assignment keeps alive while devices are assigned: the KVM VFIO device, the
/// container with guest RAM mapped for DMA, the devices' fds. Dropped after the devices
/// left the PCI bus (they are then quiesced and reset): guest RAM is unmapped from the
/// IOMMU, then the device and group fds close (the groups leave the container), so that
/// the host devices can be assigned again. Dropped when the last device goes, made anew
/// for the next one.
pub struct VfioHost {
    container: Arc<Container>,
    /// The thread mapping guest RAM for DMA (see [`DmaGate`]).
    mapping: Option<std::thread::JoinHandle<()>>,
    gate: Arc<DmaGate>,
    mapper: Arc<dyn GuestMapper>,
    /// Each assigned device's VFIO fd, by id.
    devices: std::collections::BTreeMap<String, Arc<dyn Vfio>>,
    assigned: AssignedList,
}

impl Drop for VfioHost {
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

/// What the DMA-mapping thread may call: VFIO_IOMMU_MAP_DMA on the container (the kernel
/// pins each page), the log line, and the failure handed to the control thread.
const VFIO_DMA_MAP_SYSCALLS: &[Rule] = &[allow_if(
    libc::SYS_ioctl,
    &[(
        1,
        crate::sandbox::io(crate::sandbox::VFIO_TYPE, crate::sandbox::VFIO_BASE + 13),
    )],
)];

/// The thread that maps guest RAM for an assigned device's DMA.
pub const VFIO_DMA_MAP: ThreadKind = ThreadKind {
    name: "vfio-dma-map",
    syscalls: &[VFIO_DMA_MAP_SYSCALLS, crate::sandbox::COMMON_SYSCALLS],
};

/// Maps guest RAM (`(guest address, size, host address)`) into the container for DMA on a
/// thread of its own, and opens `gate` when done. A failure stops the VM: the devices cannot
/// DMA, so the guest's drivers would time out one by one.
/// `exit`: at boot the VM stops on a failure; for a device hot-added later (None) only the
/// device is unusable (its Bus Master Enable is refused, the failure logged) and the VM runs on.
fn map_guest_ram(
    container: Arc<Container>,
    regions: Vec<(u64, u64, usize)>,
    gate: Arc<DmaGate>,
    exit: Option<ExitHandle>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let total: u64 = regions.iter().map(|r| r.1).sum();
    crate::sandbox::spawn(
        std::thread::Builder::new().name("vfio-dma-map".into()),
        VFIO_DMA_MAP,
        move || {
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
                    match &exit {
                        Some(exit) => exit.request(VmExit::VmmError(why)),
                        None => log::error!(
                            "{why}; the hot-added device cannot do DMA: remove it (vm.remove-device)"
                        ),
                    }
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
        },
    )
}

/// One device to assign: its configuration and what the host checks said of it.
pub struct Candidate<'a> {
    pub cfg: &'a VfioConfig,
    pub sysfs: std::path::PathBuf,
}

/// What blocks an assignment, said in one line before VFIO is touched: no such device, no
/// IOMMU, not on vfio-pci, group not viable, no /dev/vfio node, memlock too low.
pub fn preflight(cfg: &VfioConfig, ram_size: u64) -> Result<Candidate<'_>, Error> {
    let ok = Host::new()
        .preflight(cfg.bdf, ram_size)
        .map_err(|p| Error::Vfio {
            id: cfg.id.clone(),
            why: p.to_string(),
        })?;
    Ok(Candidate {
        cfg,
        sysfs: ok.sysfs_path,
    })
}

/// An assigned device, placed: on the bus at `slot`, its BAR ranges.
pub struct Placed {
    pub slot: u8,
    pub bars: Vec<(passthrough::pci::BarKind, u64, u64)>,
}

impl VfioHost {
    /// KVM's VFIO pseudo device (one per VM, kept for the VM's life: the kernel may allow
    /// no second one): every group is added to it, which tells KVM that a device may do
    /// non-coherent DMA and lets it use posted interrupts.
    pub fn kvm_device(vm: &VmFd, id: &str) -> Result<Arc<vfio_ioctls::VfioDeviceFd>, Error> {
        let mut kvm_dev = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let kvm_vfio = vm.create_device(&mut kvm_dev).map_err(|e| Error::Vfio {
            id: id.to_string(),
            why: format!(
                "KVM cannot create its VFIO device ({e}); load the kvm module with VFIO support"
            ),
        })?;
        Ok(Arc::new(vfio_ioctls::VfioDeviceFd::new_from_kvm(kvm_vfio)))
    }

    /// An empty container whose groups join `kvm_device`.
    pub fn new(
        vm: &Arc<VmFd>,
        memory: &GuestMemory,
        id: &str,
        assigned: AssignedList,
        kvm_device: Arc<vfio_ioctls::VfioDeviceFd>,
    ) -> Result<Self, Error> {
        let container = Arc::new(Container::new(Some(kvm_device)).map_err(|e| Error::Vfio {
            id: id.to_string(),
            why: crate::error_line(&e),
        })?);
        Ok(VfioHost {
            container,
            mapping: None,
            gate: DmaGate::new(),
            mapper: Arc::new(KvmMapper::new(vm.clone(), memory.num_regions() as u32)),
            devices: std::collections::BTreeMap::new(),
            assigned,
        })
    }

    /// Opens the devices (their groups join the container), then maps guest RAM for DMA in
    /// the background if it is not yet: every group joins first, because the kernel holds
    /// the container's lock while it maps (pins) guest RAM, so a group joining later would
    /// wait for the whole mapping.
    pub fn open(
        &mut self,
        candidates: &[Candidate<'_>],
        memory: &GuestMemory,
        exit: Option<&ExitHandle>,
    ) -> Result<Vec<passthrough::vfio::HostDevice>, Error> {
        let mut opened = Vec::new();
        for c in candidates {
            let dev = self.container.open(&c.sysfs).map_err(|e| Error::Vfio {
                id: c.cfg.id.clone(),
                why: crate::error_line(&e),
            })?;
            opened.push(dev);
        }
        if self.mapping.is_none() {
            let mut regions = Vec::new();
            for region in memory.iter() {
                let host = region
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .map_err(|e| Error::Internal(format!("guest RAM has no host mapping: {e}")))?;
                regions.push((region.start_addr().0, region.len(), host as usize));
            }
            self.mapping = Some(
                map_guest_ram(
                    self.container.clone(),
                    regions,
                    self.gate.clone(),
                    exit.cloned(),
                )
                .map_err(Error::Thread)?,
            );
        }
        Ok(opened)
    }

    /// Puts an opened device on the bus: its BARs placed by `alloc`, its INTx line on
    /// the GSI of `slot`'s swizzle (the DSDT's _PRT lists every slot), which must be the
    /// slot the root gives it next.
    #[allow(clippy::too_many_arguments)]
    pub fn place(
        &mut self,
        c: &Candidate<'_>,
        dev: passthrough::vfio::HostDevice,
        root: &Arc<Mutex<PciRoot>>,
        alloc: &mut dyn FnMut(passthrough::pci::BarKind, u64) -> io::Result<u64>,
        router: &Arc<dyn InterruptRouter>,
    ) -> Result<Placed, Error> {
        let d = c.cfg;
        let fail = |why: String| Error::Vfio {
            id: d.id.clone(),
            why,
        };
        let slot = root
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_free_slot()
            .ok_or(crate::pci::PciError::NoSlot)?;
        let dev: Arc<dyn Vfio> = Arc::new(dev);
        let mut bars = Vec::new();
        let mut record = |kind, size| {
            let addr = alloc(kind, size)?;
            bars.push((kind, addr, size));
            Ok(addr)
        };
        // The guest sees INTA whatever the device's own pin: its line is the slot's INTA in
        // the DSDT's _PRT.
        let gsi = intx_gsi(slot, 0);
        let pci = PassthroughPci::new(
            &d.id,
            dev.clone(),
            router.clone(),
            self.mapper.clone(),
            Placement {
                alloc: &mut record,
                intx_gsi: gsi,
                rom: d.rom,
                dma: Some(self.gate.clone()),
            },
        )
        .map_err(|e| fail(crate::error_line(&e)))?;
        let pin = pci.intx_pin();
        let bar_list = pci.bars();
        let pci = Arc::new(Mutex::new(pci));
        let placed = root
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(&d.id, pci.clone())?;
        debug_assert_eq!(placed, slot);
        self.assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&pci));
        self.devices.insert(d.id.clone(), dev);
        let mapped: u64 = pci
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mapped_ranges()
            .iter()
            .map(|r| r.1)
            .sum();
        log::info!(
            "{}: {} assigned at 00:{slot:02x}.0, {} BAR(s), {} KiB mapped directly, INTx {}",
            d.id,
            c.sysfs.display(),
            bar_list.len(),
            mapped >> 10,
            pin.map_or("none".to_string(), |_| format!("on GSI {gsi}"))
        );
        if let Some(w) = weak_reset(&c.sysfs) {
            log::warn!("{}: {w}", d.id);
        }
        Ok(Placed { slot, bars })
    }

    /// No device is assigned.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Forgets device `id` (it left the bus and was dropped). True when none is left: the
    /// caller then drops this host, which releases the container.
    pub fn forget(&mut self, id: &str) -> bool {
        // The last device's fd stays open until this host is dropped: guest RAM must leave
        // the IOMMU before the last group leaves the container (see `Drop`).
        let last = self.devices.len() == 1 && self.devices.contains_key(id);
        if !last {
            self.devices.remove(id);
        }
        self.assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|w| w.strong_count() > 0);
        last || self.devices.is_empty()
    }
}

/// The IOAPIC pin of INTx line `pin` (0 = INTA) of the device in `slot`: the usual PCI
/// swizzle over the 8 GSIs from [`layout::PCI_INTX_GSI_FIRST`], as the DSDT's _PRT
/// declares for every slot (a device hot-added later finds its line there).
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    layout::PCI_INTX_GSI_FIRST + (u32::from(slot) + u32::from(pin)) % layout::PCI_INTX_GSIS
}

/// Resets that put a function back in its power-on state (`reset_method` names, Linux 5.15+).
const FULL_RESETS: &[&str] = &["flr", "af_flr", "bus", "cxl_bus", "device_specific", "acpi"];

/// A warning when the kernel's only reset for the device at `sysfs` is a power-state cycle
/// (`pm`), which a device with No_Soft_Reset, or one that does not implement it (the lab's
/// emulated e1000e), ignores: DMA its previous user left running survives into this VM.
/// None when the file is missing (an older kernel) or a full reset is there.
fn weak_reset(sysfs: &std::path::Path) -> Option<String> {
    let methods = std::fs::read_to_string(sysfs.join("reset_method")).ok()?;
    weak_reset_methods(methods.trim(), sysfs)
}

fn weak_reset_methods(methods: &str, sysfs: &std::path::Path) -> Option<String> {
    if methods.split_whitespace().any(|m| FULL_RESETS.contains(&m)) {
        return None;
    }
    let bdf = sysfs.file_name().map_or_else(
        || sysfs.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Some(format!(
        "the kernel's only reset for {bdf} is '{}', which some devices ignore: DMA its last user \
         left running (a NIC's receive ring) can write into this guest's memory once its driver \
         enables bus mastering; give the device to its host driver between VMs \
         (`passthrough unbind {bdf} && passthrough bind {bdf}`)",
        if methods.is_empty() { "none" } else { methods }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_with_only_a_power_state_reset_is_warned_about() {
        let p = std::path::Path::new("/sys/bus/pci/devices/0000:00:02.0");
        let w = weak_reset_methods("pm", p).unwrap();
        assert!(w.contains("0000:00:02.0 is 'pm'"), "{w}");
        assert!(w.contains("passthrough unbind 0000:00:02.0 && passthrough bind 0000:00:02.0"));
        assert!(weak_reset_methods("", p).unwrap().contains("is 'none'"));
        for full in ["flr pm", "pm bus", "af_flr", "device_specific"] {
            assert_eq!(weak_reset_methods(full, p), None, "{full}");
        }
        // No reset_method file (kernels before 5.15): nothing said.
        assert_eq!(
            weak_reset(std::path::Path::new("/nonexistent/device")),
            None
        );
    }
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

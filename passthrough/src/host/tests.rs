//! Unit tests on a fake sysfs tree (plus fake /dev and /proc) in a temporary directory.

use super::*;
use std::collections::HashMap;
use std::os::unix::fs::symlink;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn bdf(s: &str) -> Bdf {
    Bdf::parse(s).unwrap()
}

/// A fake host: `sys/`, `dev/`, `proc/` under a temporary directory, removed on drop.
struct Tree {
    root: PathBuf,
}

impl Tree {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "passthrough-host-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        for d in [
            "sys/bus/pci/devices",
            "sys/bus/pci/drivers",
            "sys/kernel/iommu_groups",
            "sys/class/iommu",
            "dev",
            "proc/self",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("sys/bus/pci/drivers_probe"), "").unwrap();
        fs::write(
            root.join("proc/cpuinfo"),
            "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 svm\n",
        )
        .unwrap();
        Tree { root }
    }

    fn sys(&self) -> PathBuf {
        self.root.join("sys")
    }

    fn dev_dir(&self, bdf: &str) -> PathBuf {
        self.sys().join("bus/pci/devices").join(bdf)
    }

    /// The IOMMU is on: an entry in /sys/class/iommu.
    fn iommu_on(&self) -> &Self {
        fs::create_dir_all(self.sys().join("class/iommu/dmar0")).unwrap();
        self
    }

    /// A loaded driver: /sys/bus/pci/drivers/NAME with bind/unbind.
    fn driver(&self, name: &str) -> &Self {
        let d = self.sys().join("bus/pci/drivers").join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("bind"), "").unwrap();
        fs::write(d.join("unbind"), "").unwrap();
        self
    }

    /// A PCI device with ids, class, an optional driver (loaded as needed) and IOMMU group.
    fn device(&self, bdf: &str, class: u32, driver: Option<&str>, group: Option<u32>) -> &Self {
        let d = self.dev_dir(bdf);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("vendor"), "0x8086\n").unwrap();
        fs::write(d.join("device"), "0x10d3\n").unwrap();
        fs::write(d.join("class"), format!("0x{class:06x}\n")).unwrap();
        fs::write(d.join("driver_override"), "(null)\n").unwrap();
        if let Some(drv) = driver {
            self.driver(drv);
            symlink(format!("../../drivers/{drv}"), d.join("driver")).unwrap();
        }
        if let Some(g) = group {
            let gdir = self.sys().join(format!("kernel/iommu_groups/{g}/devices"));
            fs::create_dir_all(&gdir).unwrap();
            symlink(format!("../../../../bus/pci/devices/{bdf}"), gdir.join(bdf)).unwrap();
            symlink(
                format!("../../../../kernel/iommu_groups/{g}"),
                d.join("iommu_group"),
            )
            .unwrap();
        }
        self
    }

    fn file(&self, rel: &str, contents: &str) -> &Self {
        fs::write(self.root.join(rel), contents).unwrap();
        self
    }

    /// /dev/vfio/N.
    fn vfio_node(&self, group: u32) -> &Self {
        fs::create_dir_all(self.root.join("dev/vfio")).unwrap();
        fs::write(self.root.join(format!("dev/vfio/{group}")), "").unwrap();
        self
    }

    fn host(&self) -> Host {
        Host::with_sysfs_root(self.sys())
            .dev_root(self.root.join("dev"))
            .proc_root(self.root.join("proc"))
            .memlock(MemlockLimit::UNLIMITED)
    }

    /// The usual good case: 0000:00:02.0 on vfio-pci alone in group 5 with /dev/vfio/5.
    fn ready() -> Self {
        let t = Tree::new();
        t.iommu_on()
            .device("0000:00:02.0", 0x020000, Some(VFIO_PCI), Some(5))
            .vfio_node(5);
        t
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Records every write (relative to sysfs) and plays the kernel's part: driver_override is
/// stored, `drivers/X/unbind` removes the driver link, `drivers_probe` binds the override
/// (or the device's host driver) when that driver is loaded.
struct FakeKernel {
    sys: PathBuf,
    log: Mutex<Vec<(String, String)>>,
    host_drivers: HashMap<String, String>,
    deny: bool,
    vfio_refuses: bool,
}

impl FakeKernel {
    fn new(t: &Tree) -> Self {
        FakeKernel {
            sys: t.sys(),
            log: Mutex::new(Vec::new()),
            host_drivers: HashMap::new(),
            deny: false,
            vfio_refuses: false,
        }
    }

    fn host_driver(mut self, bdf: &str, driver: &str) -> Self {
        self.host_drivers.insert(bdf.into(), driver.into());
        self
    }

    fn log(&self) -> Vec<(String, String)> {
        self.log.lock().unwrap().clone()
    }
}

impl SysfsWriter for FakeKernel {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let rel = path.strip_prefix(&self.sys).unwrap().to_str().unwrap();
        self.log.lock().unwrap().push((rel.into(), value.into()));
        if self.deny {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        if !path.is_file() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let devices = self.sys.join("bus/pci/devices");
        if rel.ends_with("/driver_override") {
            let v = value.trim();
            fs::write(path, if v.is_empty() { "(null)\n" } else { v })?;
        } else if let Some(drv) = rel
            .strip_prefix("bus/pci/drivers/")
            .and_then(|r| r.strip_suffix("/unbind"))
        {
            let link = devices.join(value).join("driver");
            if link_name(&link).as_deref() != Some(drv) {
                return Err(io::Error::from_raw_os_error(libc::ENODEV));
            }
            fs::remove_file(link)?;
        } else if rel == "bus/pci/drivers_probe" {
            let dev = devices.join(value);
            if !dev.is_dir() {
                return Err(io::Error::from_raw_os_error(libc::ENODEV));
            }
            if dev.join("driver").symlink_metadata().is_ok() {
                return Ok(());
            }
            let ov = fs::read_to_string(dev.join("driver_override"))?;
            let target = match ov.trim() {
                "(null)" => match self.host_drivers.get(value) {
                    Some(d) => d.clone(),
                    None => return Ok(()),
                },
                o => o.to_string(),
            };
            let loaded = self.sys.join("bus/pci/drivers").join(&target).is_dir();
            if loaded && !(target == VFIO_PCI && self.vfio_refuses) {
                symlink(format!("../../drivers/{target}"), dev.join("driver"))?;
            }
        }
        Ok(())
    }
}

fn one_line(p: &impl fmt::Display) -> String {
    let s = p.to_string();
    assert!(!s.contains('\n'), "not one line: {s}");
    s
}

#[test]
fn ready_device_passes() {
    let t = Tree::ready();
    let a = t.host().preflight(bdf("00:02.0"), 512 * MIB).unwrap();
    assert_eq!(
        a,
        Assignable {
            bdf: bdf("0000:00:02.0"),
            group: 5,
            sysfs_path: t.dev_dir("0000:00:02.0"),
        }
    );
    let text = t.host().inspect(a.bdf).render(512 * MIB);
    assert!(text.contains("IOMMU:           on"), "{text}");
    assert!(text.contains("IOMMU group:     5 (1 device)"), "{text}");
    assert!(
        text.contains("unlimited, need 576 MiB for 512 MiB of guest RAM: OK"),
        "{text}"
    );
    assert!(text.contains("/dev/vfio/5 present"), "{text}");
}

#[test]
fn no_such_device() {
    let t = Tree::ready();
    let p = t.host().preflight(bdf("00:09.0"), GIB).unwrap_err();
    let path = t.dev_dir("0000:00:09.0");
    assert_eq!(
        p,
        Problem::NoSuchDevice {
            bdf: bdf("00:09.0"),
            path: path.clone()
        }
    );
    let s = one_line(&p);
    assert!(s.starts_with("0000:00:09.0: no such PCI device"), "{s}");
    assert!(s.contains(&path.display().to_string()), "{s}");
    assert!(t
        .host()
        .inspect(bdf("00:09.0"))
        .render(GIB)
        .contains("present:         no"));
}

#[test]
fn no_iommu_names_the_kernel_parameters() {
    let t = Tree::new();
    t.device("0000:00:01.0", 0x020000, Some("virtio-pci"), None);
    let p = t.host().preflight(bdf("00:01.0"), GIB).unwrap_err();
    assert!(matches!(p, Problem::NoIommu { .. }), "{p:?}");
    let s = one_line(&p);
    assert!(s.starts_with("0000:00:01.0: no IOMMU is enabled"), "{s}");
    assert!(
        s.contains("amd_iommu=on iommu=pt") && s.contains("AMD-Vi"),
        "{s}"
    );
    assert!(!s.contains("virtual machine"), "{s}");

    t.file(
        "proc/cpuinfo",
        "vendor_id\t: GenuineIntel\nflags\t\t: fpu vmx hypervisor\n",
    );
    let s = one_line(&t.host().preflight(bdf("00:01.0"), GIB).unwrap_err());
    assert!(s.contains("intel_iommu=on") && s.contains("VT-d"), "{s}");
    assert!(s.contains("virtual IOMMU"), "{s}");

    t.file("proc/cpuinfo", "");
    let s = one_line(&t.host().preflight(bdf("00:01.0"), GIB).unwrap_err());
    assert!(
        s.contains("intel_iommu=on") && s.contains("amd_iommu=on"),
        "{s}"
    );
}

#[test]
fn iommu_groups_alone_mean_iommu_on() {
    let t = Tree::new();
    t.device("0000:00:02.0", 0x020000, Some(VFIO_PCI), Some(3))
        .vfio_node(3);
    assert!(t.host().preflight(bdf("00:02.0"), GIB).is_ok());
}

#[test]
fn no_iommu_group() {
    let t = Tree::new();
    t.iommu_on()
        .device("0000:00:02.0", 0x020000, Some(VFIO_PCI), None);
    let p = t.host().preflight(bdf("00:02.0"), GIB).unwrap_err();
    assert_eq!(
        p,
        Problem::NoIommuGroup {
            bdf: bdf("00:02.0")
        }
    );
    one_line(&p);
}

#[test]
fn not_bound_to_vfio_gives_the_bind_command() {
    let t = Tree::new();
    t.iommu_on()
        .device("0000:00:02.0", 0x020000, Some("e1000e"), Some(5))
        .device("0000:00:03.0", 0x010802, None, Some(6));
    let p = t.host().preflight(bdf("00:02.0"), GIB).unwrap_err();
    assert_eq!(
        p,
        Problem::NotBoundToVfio {
            bdf: bdf("00:02.0"),
            driver: Some("e1000e".into())
        }
    );
    let s = one_line(&p);
    assert!(s.contains("host driver e1000e"), "{s}");
    assert!(s.contains("`passthrough bind 0000:00:02.0`"), "{s}");

    let p = t.host().preflight(bdf("00:03.0"), GIB).unwrap_err();
    assert_eq!(
        p,
        Problem::NotBoundToVfio {
            bdf: bdf("00:03.0"),
            driver: None
        }
    );
    assert!(one_line(&p).contains("bound to no driver"));
}

#[test]
fn group_not_viable_names_the_other_device() {
    let t = Tree::ready();
    t.device("0000:00:02.1", 0x020000, Some("e1000e"), Some(5));
    let p = t.host().preflight(bdf("00:02.0"), GIB).unwrap_err();
    assert_eq!(
        p,
        Problem::GroupNotViable {
            bdf: bdf("00:02.0"),
            group: 5,
            other: bdf("00:02.1"),
            other_driver: "e1000e".into()
        }
    );
    let s = one_line(&p);
    assert!(
        s.contains("0000:00:02.1 in the same group is bound to e1000e"),
        "{s}"
    );
    assert!(s.contains("`passthrough bind 0000:00:02.1`"), "{s}");
    assert!(s.contains("/sys/bus/pci/drivers/e1000e/unbind"), "{s}");
    let text = t.host().inspect(bdf("00:02.0")).render(GIB);
    assert!(text.contains("0000:00:02.1  e1000e       NOT OK"), "{text}");
    assert!(
        text.contains("0000:00:02.0  vfio-pci     OK (vfio-pci)  <- this device"),
        "{text}"
    );
}

#[test]
fn bridges_no_driver_and_stub_members_are_viable() {
    let t = Tree::ready();
    t.device("0000:00:1c.0", 0x060400, Some("pcieport"), Some(5))
        .device("0000:00:1c.1", 0x060401, None, Some(5))
        .device("0000:00:02.1", 0x020000, None, Some(5))
        .device("0000:00:02.2", 0x020000, Some("pci-stub"), Some(5));
    let host = t.host();
    assert!(host.preflight(bdf("00:02.0"), GIB).is_ok());
    let r = host.inspect(bdf("00:02.0"));
    let status: Vec<_> = r
        .group_members
        .iter()
        .map(|m| (m.bdf.to_string(), m.status.clone()))
        .collect();
    assert_eq!(
        status,
        vec![
            ("0000:00:02.0".into(), MemberStatus::VfioPci),
            ("0000:00:02.1".into(), MemberStatus::NoDriver),
            ("0000:00:02.2".into(), MemberStatus::Stub),
            (
                "0000:00:1c.0".into(),
                MemberStatus::Bridge("pcieport".into())
            ),
            ("0000:00:1c.1".into(), MemberStatus::NoDriver),
        ]
    );
    assert!(r
        .render(GIB)
        .contains("0000:00:1c.0  pcieport     OK (PCI bridge)"));
}

#[test]
fn pcieport_on_a_non_bridge_is_not_viable() {
    let t = Tree::ready();
    t.device("0000:00:1d.0", 0x088000, Some("pcieport"), Some(5));
    let p = t.host().preflight(bdf("00:02.0"), GIB).unwrap_err();
    assert!(
        matches!(&p, Problem::GroupNotViable { other, other_driver, .. } if *other == bdf("00:1d.0") && other_driver == "pcieport"),
        "{p:?}"
    );
}

#[test]
fn no_vfio_dev_node() {
    let t = Tree::new();
    t.iommu_on()
        .device("0000:00:02.0", 0x020000, Some(VFIO_PCI), Some(7));
    let p = t.host().preflight(bdf("00:02.0"), GIB).unwrap_err();
    let path = t.root.join("dev/vfio/7");
    assert_eq!(
        p,
        Problem::NoVfioDevNode {
            bdf: bdf("00:02.0"),
            group: 7,
            path: path.clone()
        }
    );
    let s = one_line(&p);
    assert!(
        s.contains(&path.display().to_string()) && s.contains("modprobe vfio-pci"),
        "{s}"
    );
}

#[test]
fn memlock_too_low_says_how_much() {
    let t = Tree::ready();
    let limited = MemlockLimit {
        bytes: Some(8 * MIB),
        cap_ipc_lock: false,
    };
    let p = t
        .host()
        .memlock(limited)
        .preflight(bdf("00:02.0"), GIB)
        .unwrap_err();
    assert_eq!(
        p,
        Problem::MemlockTooLow {
            bdf: bdf("00:02.0"),
            have: 8 * MIB,
            need: GIB + MEMLOCK_HEADROOM,
            guest_ram: GIB
        }
    );
    let s = one_line(&p);
    assert!(
        s.contains("memlock limit 8 MiB is below the 1088 MiB VFIO must pin (1 GiB of guest RAM + 64 MiB headroom)"),
        "{s}"
    );
    assert!(
        s.contains("ulimit -l unlimited") && s.contains("LimitMEMLOCK="),
        "{s}"
    );
    let text = t
        .host()
        .memlock(limited)
        .inspect(bdf("00:02.0"))
        .render(GIB);
    assert!(
        text.contains("8 MiB, need 1088 MiB for 1 GiB of guest RAM: too low"),
        "{text}"
    );

    // Exactly enough, unlimited, and CAP_IPC_LOCK all pass.
    let exact = MemlockLimit {
        bytes: Some(GIB + MEMLOCK_HEADROOM),
        cap_ipc_lock: false,
    };
    assert!(t
        .host()
        .memlock(exact)
        .preflight(bdf("00:02.0"), GIB)
        .is_ok());
    assert!(t.host().preflight(bdf("00:02.0"), 64 * GIB).is_ok());
    let cap = MemlockLimit {
        bytes: Some(8 * MIB),
        cap_ipc_lock: true,
    };
    assert!(t.host().memlock(cap).preflight(bdf("00:02.0"), GIB).is_ok());
    assert!(t
        .host()
        .memlock(cap)
        .inspect(bdf("00:02.0"))
        .render(GIB)
        .contains(
        "8 MiB, need 1088 MiB for 1 GiB of guest RAM: OK (CAP_IPC_LOCK: the limit does not apply)"
    ));
}

#[test]
fn first_failure_wins() {
    // No IOMMU, a host driver, no node, low memlock: the IOMMU is what is reported.
    let t = Tree::new();
    t.device("0000:00:02.0", 0x020000, Some("e1000e"), None);
    let low = MemlockLimit {
        bytes: Some(0),
        cap_ipc_lock: false,
    };
    let p = t
        .host()
        .memlock(low)
        .preflight(bdf("00:02.0"), GIB)
        .unwrap_err();
    assert!(matches!(p, Problem::NoIommu { .. }), "{p:?}");
    // Not bound beats group not viable, no node and memlock.
    let t = Tree::new();
    t.iommu_on()
        .device("0000:00:02.0", 0x020000, Some("e1000e"), Some(1))
        .device("0000:00:02.1", 0x020000, Some("e1000e"), Some(1));
    let p = t
        .host()
        .memlock(low)
        .preflight(bdf("00:02.0"), GIB)
        .unwrap_err();
    assert!(matches!(p, Problem::NotBoundToVfio { .. }), "{p:?}");
    // Group beats the node.
    let t = Tree::new();
    t.iommu_on()
        .device("0000:00:02.0", 0x020000, Some(VFIO_PCI), Some(1))
        .device("0000:00:02.1", 0x020000, Some("e1000e"), Some(1));
    let p = t
        .host()
        .memlock(low)
        .preflight(bdf("00:02.0"), GIB)
        .unwrap_err();
    assert!(matches!(p, Problem::GroupNotViable { .. }), "{p:?}");
    // The node beats memlock.
    let t = Tree::new();
    t.iommu_on()
        .device("0000:00:02.0", 0x020000, Some(VFIO_PCI), Some(1));
    let p = t
        .host()
        .memlock(low)
        .preflight(bdf("00:02.0"), GIB)
        .unwrap_err();
    assert!(matches!(p, Problem::NoVfioDevNode { .. }), "{p:?}");
    assert_eq!(p.bdf(), bdf("00:02.0"));
}

#[test]
fn inspect_reads_ids_override_and_resets() {
    let t = Tree::ready();
    let d = t.dev_dir("0000:00:02.0");
    fs::write(d.join("reset_method"), "flr bus\n").unwrap();
    fs::write(d.join("driver_override"), "vfio-pci\n").unwrap();
    let r = t.host().inspect(bdf("00:02.0"));
    assert!(r.exists);
    assert_eq!(
        r.ids,
        Some(PciIds {
            vendor: 0x8086,
            device: 0x10d3,
            class: 0x020000
        })
    );
    assert_eq!(r.driver.as_deref(), Some(VFIO_PCI));
    assert_eq!(r.driver_override.as_deref(), Some(VFIO_PCI));
    assert_eq!(
        r.reset,
        ResetSupport::Methods(vec!["flr".into(), "bus".into()])
    );
    assert!(r.vfio_pci_loaded);
    assert!(r.render(GIB).contains("reset:           flr, bus"));

    fs::remove_file(d.join("reset_method")).unwrap();
    fs::write(d.join("reset"), "").unwrap();
    assert_eq!(
        t.host().inspect(bdf("00:02.0")).reset,
        ResetSupport::Unlisted
    );
    fs::remove_file(d.join("reset")).unwrap();
    fs::write(d.join("driver_override"), "(null)\n").unwrap();
    let r = t.host().inspect(bdf("00:02.0"));
    assert_eq!(r.reset, ResetSupport::None);
    assert_eq!(r.driver_override, None);
}

#[test]
fn bind_writes_override_then_unbind_then_probe() {
    let t = Tree::ready();
    t.device("0000:00:03.0", 0x020000, Some("e1000e"), Some(6))
        .vfio_node(6);
    let k = Arc::new(FakeKernel::new(&t));
    let host = t.host().writer(k.clone());
    let o = host.bind(bdf("00:03.0")).unwrap();
    assert_eq!(
        o,
        BindOutcome {
            bdf: bdf("00:03.0"),
            previous: Some("e1000e".into()),
            already_bound: false
        }
    );
    assert_eq!(
        k.log(),
        vec![
            (
                "bus/pci/devices/0000:00:03.0/driver_override".into(),
                "vfio-pci".into()
            ),
            (
                "bus/pci/drivers/e1000e/unbind".into(),
                "0000:00:03.0".into()
            ),
            ("bus/pci/drivers_probe".into(), "0000:00:03.0".into()),
        ]
    );
    assert!(host.preflight(bdf("00:03.0"), GIB).is_ok());
}

#[test]
fn bind_of_a_driverless_device_skips_the_unbind() {
    let t = Tree::ready();
    t.device("0000:00:03.0", 0x020000, None, Some(6));
    let k = Arc::new(FakeKernel::new(&t));
    let o = t.host().writer(k.clone()).bind(bdf("00:03.0")).unwrap();
    assert_eq!(o.previous, None);
    let files: Vec<String> = k.log().into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        files,
        [
            "bus/pci/devices/0000:00:03.0/driver_override",
            "bus/pci/drivers_probe"
        ]
    );
}

#[test]
fn bind_when_already_bound_writes_nothing() {
    let t = Tree::ready();
    let k = Arc::new(FakeKernel::new(&t));
    let o = t.host().writer(k.clone()).bind(bdf("00:02.0")).unwrap();
    assert!(o.already_bound);
    assert!(k.log().is_empty());
}

#[test]
fn bind_refuses_before_writing_when_vfio_could_not_take_it() {
    // No IOMMU: vfio-pci would refuse the device and leave it driverless.
    let t = Tree::new();
    t.driver(VFIO_PCI)
        .device("0000:00:01.0", 0x020000, Some("virtio-pci"), None);
    let k = Arc::new(FakeKernel::new(&t));
    let e = t.host().writer(k.clone()).bind(bdf("00:01.0")).unwrap_err();
    assert!(
        matches!(e, BindError::Blocked(Problem::NoIommu { .. })),
        "{e:?}"
    );
    // No such device.
    let e = t.host().writer(k.clone()).bind(bdf("00:07.0")).unwrap_err();
    assert!(
        matches!(e, BindError::Blocked(Problem::NoSuchDevice { .. })),
        "{e:?}"
    );
    assert!(one_line(&e).contains("no such PCI device"));
    // vfio-pci not loaded.
    let t2 = Tree::new();
    t2.iommu_on()
        .device("0000:00:03.0", 0x020000, Some("e1000e"), Some(6));
    let k2 = Arc::new(FakeKernel::new(&t2));
    let e = t2
        .host()
        .writer(k2.clone())
        .bind(bdf("00:03.0"))
        .unwrap_err();
    assert!(matches!(e, BindError::VfioPciNotLoaded { .. }), "{e:?}");
    assert!(one_line(&e).contains("`modprobe vfio-pci`"));
    assert!(k.log().is_empty() && k2.log().is_empty());
}

#[test]
fn bind_reports_when_vfio_pci_does_not_take_the_device() {
    let t = Tree::ready();
    t.device("0000:00:03.0", 0x020000, Some("e1000e"), Some(6));
    let mut k = FakeKernel::new(&t);
    k.vfio_refuses = true;
    let k = Arc::new(k);
    let e = t.host().writer(k.clone()).bind(bdf("00:03.0")).unwrap_err();
    assert!(
        matches!(
            &e,
            BindError::NotTaken {
                driver: None,
                probe: None,
                ..
            }
        ),
        "{e:?}"
    );
    let s = one_line(&e);
    assert!(s.contains("has no driver") && s.contains("dmesg"), "{s}");
    assert!(s.contains("`passthrough unbind 0000:00:03.0`"), "{s}");
    assert_eq!(k.log().len(), 3);
}

#[test]
fn permission_denied_says_run_as_root() {
    let t = Tree::ready();
    t.device("0000:00:03.0", 0x020000, Some("e1000e"), Some(6));
    let mut k = FakeKernel::new(&t);
    k.deny = true;
    let k = Arc::new(k);
    let e = t.host().writer(k.clone()).bind(bdf("00:03.0")).unwrap_err();
    assert!(matches!(e, BindError::PermissionDenied { .. }), "{e:?}");
    let s = one_line(&e);
    assert!(
        s.contains("driver_override") && s.ends_with("run as root"),
        "{s}"
    );
    // Stopped at the first write.
    assert_eq!(k.log().len(), 1);
    let e = t.host().writer(k).unbind(bdf("00:02.0")).unwrap_err();
    assert!(matches!(e, BindError::PermissionDenied { .. }), "{e:?}");
}

#[test]
fn unbind_gives_the_device_back_to_its_host_driver() {
    let t = Tree::ready();
    t.driver("e1000e");
    fs::write(
        t.dev_dir("0000:00:02.0").join("driver_override"),
        "vfio-pci\n",
    )
    .unwrap();
    let k = Arc::new(FakeKernel::new(&t).host_driver("0000:00:02.0", "e1000e"));
    let o = t.host().writer(k.clone()).unbind(bdf("00:02.0")).unwrap();
    assert_eq!(
        o,
        UnbindOutcome {
            bdf: bdf("00:02.0"),
            previous: Some(VFIO_PCI.into()),
            now: Some("e1000e".into())
        }
    );
    assert_eq!(
        k.log(),
        vec![
            (
                "bus/pci/drivers/vfio-pci/unbind".into(),
                "0000:00:02.0".into()
            ),
            (
                "bus/pci/devices/0000:00:02.0/driver_override".into(),
                "\n".into()
            ),
            ("bus/pci/drivers_probe".into(), "0000:00:02.0".into()),
        ]
    );
    assert_eq!(t.host().inspect(bdf("00:02.0")).driver_override, None);
}

#[test]
fn unbind_reports_no_host_driver() {
    let t = Tree::ready();
    fs::write(
        t.dev_dir("0000:00:02.0").join("driver_override"),
        "vfio-pci\n",
    )
    .unwrap();
    let k = Arc::new(FakeKernel::new(&t));
    let o = t.host().writer(k).unbind(bdf("00:02.0")).unwrap();
    assert_eq!(o.now, None);
}

#[test]
fn unbind_leaves_a_host_driver_alone() {
    let t = Tree::ready();
    t.device("0000:00:03.0", 0x020000, Some("e1000e"), Some(6));
    let k = Arc::new(FakeKernel::new(&t));
    let o = t.host().writer(k.clone()).unbind(bdf("00:03.0")).unwrap();
    assert_eq!(o.previous.as_deref(), Some("e1000e"));
    assert_eq!(o.now.as_deref(), Some("e1000e"));
    assert!(k.log().is_empty());
}

#[test]
fn real_writer_writes_existing_attributes_only() {
    let t = Tree::new();
    let f = t.root.join("attr");
    fs::write(&f, "old").unwrap();
    RealWriter.write(&f, "vfio-pci").unwrap();
    assert_eq!(fs::read_to_string(&f).unwrap(), "vfio-pci");
    let missing = t.root.join("missing");
    assert_eq!(
        RealWriter.write(&missing, "x").unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
    assert!(!missing.exists());
}

#[test]
fn cap_eff_and_cpuinfo_parsing() {
    assert_eq!(
        cap_eff("Name:\tx\nCapEff:\t000001fffeffffff\n"),
        Some(0x1fffeffffff)
    );
    assert_eq!(cap_eff("Name:\tx\n"), None);
    let t = Tree::new();
    t.file("proc/self/status", "CapEff:\t0000000000004000\n");
    assert!(MemlockLimit::of_this_process(&t.root.join("proc")).cap_ipc_lock);
    t.file("proc/self/status", "CapEff:\t0000000000000000\n");
    assert!(!MemlockLimit::of_this_process(&t.root.join("proc")).cap_ipc_lock);
    assert_eq!(
        CpuInfo::parse("vendor_id\t: AuthenticAMD\nflags\t\t: fpu hypervisor\n"),
        CpuInfo {
            vendor: CpuVendor::Amd,
            virtualized: true
        }
    );
    assert_eq!(
        CpuInfo::parse("vendor_id\t: GenuineIntel\nflags\t\t: fpu\n"),
        CpuInfo {
            vendor: CpuVendor::Intel,
            virtualized: false
        }
    );
}

#[test]
fn memlock_limit_display() {
    assert_eq!(MemlockLimit::UNLIMITED.to_string(), "unlimited");
    assert_eq!(
        MemlockLimit {
            bytes: Some(8 * MIB),
            cap_ipc_lock: false
        }
        .to_string(),
        "8 MiB"
    );
}

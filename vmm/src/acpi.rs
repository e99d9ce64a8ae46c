//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced, with sleep and reset registers), MADT,
//! MCFG and a DSDT that describes the PCI root bridge and its hotplug slots, COM1, the RTC,
//! the Generic Event Device with the power button, and the S5 (power-off) state.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::{hotplug, layout};

/// AML already serialized, to nest in a builder.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// PCI0's hotplug objects (see [`crate::hotplug`]): the slot registers, `PCEJ` (write a
/// slot's eject bit), `PSCN` (read the added and to-eject slots and notify each), `DVNT`
/// and one device per slot with `_ADR`, `_SUN` and `_EJ0`, so that Linux's acpiphp makes
/// every slot a hotplug slot.
fn pci_hotplug_aml() -> Vec<u8> {
    let mut out = Vec::new();
    let base = u32::from(layout::HOTPLUG_PORT) + hotplug::REG_PCIU as u32;
    let len = (hotplug::LEN - hotplug::REG_PCIU) as u32;
    aml::OpRegion::new("PCST".into(), aml::OpRegionSpace::SystemIO, &base, &len)
        .to_aml_bytes(&mut out);
    aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
        ],
    )
    .to_aml_bytes(&mut out);
    aml::Mutex::new("HPLK".into(), 0).to_aml_bytes(&mut out);
    // PCEJ(slot): the slot's bit to B0EJ.
    aml::Method::new(
        "PCEJ".into(),
        1,
        true,
        vec![
            &aml::Acquire::new("HPLK".into(), 0xffff),
            &aml::ShiftLeft::new(&aml::Path::new("B0EJ"), &aml::ONE, &aml::Arg(0)),
            &aml::Release::new("HPLK".into()),
            &aml::Return::new(&aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut out);
    // DVNT(slots, event): Notify(Sxx, event) for each slot whose bit is set.
    let names: Vec<String> = hotplug::SLOTS.map(|s| format!("S{s:02X}_")).collect();
    let paths: Vec<aml::Path> = names.iter().map(|n| aml::Path::new(n)).collect();
    let masks: Vec<u32> = hotplug::SLOTS.map(|s| 1u32 << s).collect();
    let ands: Vec<aml::And> = masks
        .iter()
        .map(|m| aml::And::new(&aml::ZERO, &aml::Arg(0), m))
        .collect();
    let notifies: Vec<aml::Notify> = paths
        .iter()
        .map(|p| aml::Notify::new(p, &aml::Arg(1)))
        .collect();
    let ifs: Vec<aml::If> = ands
        .iter()
        .zip(&notifies)
        .map(|(a, n)| aml::If::new(a, vec![n]))
        .collect();
    aml::Method::new(
        "DVNT".into(),
        2,
        false,
        ifs.iter().map(|i| i as &dyn Aml).collect(),
    )
    .to_aml_bytes(&mut out);
    // PSCN: the slots added (device check) and the slots to eject (eject request).
    aml::Method::new(
        "PSCN".into(),
        0,
        true,
        vec![
            &aml::Acquire::new("HPLK".into(), 0xffff),
            &aml::Store::new(&aml::Local(0), &aml::Path::new("PCIU")),
            &aml::Store::new(&aml::Local(1), &aml::Path::new("PCID")),
            &aml::Release::new("HPLK".into()),
            &aml::MethodCall::new("DVNT".into(), vec![&aml::Local(0), &aml::ONE]),
            &aml::MethodCall::new("DVNT".into(), vec![&aml::Local(1), &3u8]),
        ],
    )
    .to_aml_bytes(&mut out);
    for (slot, name) in hotplug::SLOTS.zip(&names) {
        let adr = u32::from(slot) << 16;
        let sun = u32::from(slot);
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_ADR".into(), &adr),
                &aml::Name::new("_SUN".into(), &sun),
                &aml::Method::new(
                    "_EJ0".into(),
                    1,
                    false,
                    vec![&aml::MethodCall::new(
                        "PCEJ".into(),
                        vec![&aml::Path::new("_SUN")],
                    )],
                ),
            ],
        )
        .to_aml_bytes(&mut out);
    }
    out
}

/// The Generic Event Device (ACPI0013) on [`layout::GED_IRQ`]: `_EVT` reads the pending
/// events and runs PCI0's slot scan or notifies the power button; and the power button
/// (PNP0C0C).
fn ged_aml(out: &mut Vec<u8>) {
    let base = u32::from(layout::HOTPLUG_PORT) + hotplug::REG_GEVT as u32;
    let len = 4u32;
    let pci = hotplug::EVENT_PCI;
    let button = hotplug::EVENT_POWER_BUTTON;
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true,
                    true,
                    false,
                    false,
                    layout::GED_IRQ,
                )]),
            ),
            &aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &base, &len),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::DWord,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![aml::FieldEntry::Named(*b"GEVT", 32)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &aml::Path::new("GEVT")),
                    &aml::If::new(
                        &aml::And::new(&aml::ZERO, &aml::Local(0), &pci),
                        vec![&aml::MethodCall::new("\\_SB_.PCI0.PSCN".into(), vec![])],
                    ),
                    &aml::If::new(
                        &aml::And::new(&aml::ZERO, &aml::Local(0), &button),
                        vec![&aml::Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8)],
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(out);
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(out);
}

const OEM_ID: [u8; 6] = *b"IOVMM ";
const OEM_REVISION: u32 = 1;

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct AcpiConfig {
    pub cpus: u8,
    pub memory: u64,
}

/// Builds the DSDT body: PCI root bridge PCI0 with its hotplug slots, a motherboard
/// resource reserving ECAM and the hotplug registers, the GED and the power button, COM1,
/// the RTC and \_S5.
pub fn dsdt(cfg: &AcpiConfig) -> Sdt {
    let (mmio64_start, mmio64_size) = layout::mmio64_window(cfg.memory);
    let mut body = Vec::new();
    // _PRT: the INTx lines of every slot (an assigned device may be hot-added to any) to
    // IOAPIC pins (level, active low), by the swizzle of `vfio::intx_gsi`.
    let prt_values: Vec<(u32, u8, u32)> = hotplug::SLOTS
        .flat_map(|slot| {
            (0..4u8).map(move |pin| {
                (
                    (u32::from(slot) << 16) | 0xffff,
                    pin,
                    crate::vfio::intx_gsi(slot, pin),
                )
            })
        })
        .collect();
    let prt_entries: Vec<aml::Package> = prt_values
        .iter()
        .map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &aml::ZERO, gsi]))
        .collect();
    let prt = aml::Package::new(prt_entries.iter().map(|e| e as &dyn Aml).collect());
    let prt_name = aml::Name::new("_PRT".into(), &prt);
    let hotplug = Raw(pci_hotplug_aml());
    // Each object is built and serialized in one statement: the AML builders borrow their
    // children, which must outlive the serialization.
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &prt_name,
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::AddressSpace::new_bus_number(0x0u16, 0x0u16),
                    &aml::IO::new(
                        layout::PCI_CONFIG_ADDRESS_PORT,
                        layout::PCI_CONFIG_ADDRESS_PORT,
                        1,
                        8,
                    ),
                    &aml::AddressSpace::new_io(0x0000u16, 0x0cf7u16, None),
                    &aml::AddressSpace::new_io(
                        layout::PCI_IO_WINDOW_START as u16,
                        (layout::PCI_IO_END - 1) as u16,
                        None,
                    ),
                    &aml::AddressSpace::new_memory(
                        aml::AddressSpaceCacheable::NotCacheable,
                        true,
                        layout::MMIO32_START as u32,
                        (layout::MMIO32_START + layout::MMIO32_SIZE - 1) as u32,
                        None,
                    ),
                    &aml::AddressSpace::new_memory(
                        aml::AddressSpaceCacheable::NotCacheable,
                        true,
                        mmio64_start,
                        mmio64_start + mmio64_size - 1,
                        None,
                    ),
                ]),
            ),
            &hotplug,
        ],
    )
    .to_aml_bytes(&mut body);
    // Motherboard resources: reserve ECAM (bus 0 only, 1 MiB) so Linux trusts the MCFG.
    aml::Device::new(
        "_SB_.MBRD".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(false, layout::PCI_ECAM_START as u32, 1 << 20),
                    &aml::IO::new(
                        layout::HOTPLUG_PORT,
                        layout::HOTPLUG_PORT,
                        1,
                        hotplug::LEN as u8,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    ged_aml(&mut body);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    // The CMOS RTC, so that Linux's rtc_cmos sets the clock from it.
    aml::Device::new(
        "_SB_.RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(layout::CMOS_PORT, layout::CMOS_PORT, 1, 2),
                    &aml::Interrupt::new(true, true, false, false, layout::RTC_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&5u8])).to_aml_bytes(&mut body);

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"IOVMDSDT", OEM_REVISION);
    sdt.append_slice(&body);
    sdt
}

/// Hardware-reduced FADT: power off and reset through our ACPI ports.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"IOVMFADT", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    let port = |p: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            p.into(),
        )
    };
    b.reset_reg = port(layout::ACPI_RESET_PORT);
    b.reset_value = layout::ACPI_RESET_VALUE;
    b.sleep_control_reg = port(layout::ACPI_SLEEP_CONTROL_PORT);
    b.sleep_status_reg = port(layout::ACPI_SLEEP_CONTROL_PORT);
    // IA-PC boot architecture: no VGA, no CMOS RTC probing needed, ASPM not controllable.
    b.iapc_boot_arch = ((1u16 << 2) | (1 << 4)).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"IOVMMKVM").into();
    let mut v = Vec::new();
    b.finalize().to_aml_bytes(&mut v);
    v
}

/// MADT: one local APIC per vCPU, the IOAPIC, LINT1 as NMI; PCAT_COMPAT (a PIC exists).
pub fn madt(cpus: u8) -> Sdt {
    let mut sdt = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"IOVMMADT", OEM_REVISION);
    sdt.write_u32(36, layout::APIC_START as u32);
    sdt.write_u32(40, 1); // PCAT_COMPAT
    let mut body = Vec::new();
    for id in 0..cpus {
        // Processor local APIC: type 0, length 8, UID, APIC ID, flags = enabled.
        body.extend_from_slice(&[0, 8, id, id]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    body.extend_from_slice(&[1, 12, cpus, 0]);
    body.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Local APIC NMI: type 4, length 6, all processors, flags 0, LINT1.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt.append_slice(&body);
    sdt
}

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

/// Writes all tables at [RSDP_START, ACPI_END) and returns the RSDP address.
pub fn write_tables<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, vm_memory::GuestMemoryError> {
    let mut next = layout::RSDP_START.0 + 64;
    let mut place = |bytes: &[u8]| -> Result<u64, vm_memory::GuestMemoryError> {
        let addr = next;
        if addr + bytes.len() as u64 > layout::ACPI_END {
            return Err(vm_memory::GuestMemoryError::InvalidBackendAddress);
        }
        mem.write_slice(bytes, GuestAddress(addr))?;
        next = (addr + bytes.len() as u64).next_multiple_of(16);
        Ok(addr)
    };
    let dsdt_addr = place(dsdt(cfg).as_slice())?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(madt(cfg.cpus).as_slice())?;
    let mut mcfg = MCFG::new(OEM_ID, *b"IOVMMCFG", OEM_REVISION);
    mcfg.add_ecam(layout::PCI_ECAM_START, 0, 0, 0);
    let mut mcfg_bytes = Vec::new();
    mcfg.to_aml_bytes(&mut mcfg_bytes);
    let mcfg_addr = place(&mcfg_bytes)?;

    let mut xsdt = XSDT::new(OEM_ID, *b"IOVMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(&xsdt_bytes)?;

    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    debug_assert!(checksum_ok(&rsdp[..20]));
    mem.write_slice(&rsdp, layout::RSDP_START)?;
    Ok(layout::RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn read_table(m: &GuestMemoryMmap<()>, addr: u64) -> Vec<u8> {
        let mut hdr = [0u8; 8];
        m.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = u32_at(&hdr, 4) as usize;
        let mut t = vec![0u8; len];
        m.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
    }

    #[test]
    fn tables_link_and_checksum() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cfg = AcpiConfig {
            cpus: 2,
            memory: 512 << 20,
        };
        let rsdp_addr = write_tables(&m, &cfg).unwrap();
        let mut rsdp = [0u8; 36];
        m.read_slice(&mut rsdp, rsdp_addr).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]));
        assert!(checksum_ok(&rsdp));
        let xsdt = read_table(&m, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let mut sigs = Vec::new();
        for i in 0..(xsdt.len() - 36) / 8 {
            let t = read_table(&m, u64_at(&xsdt, 36 + i * 8));
            assert!(checksum_ok(&t), "checksum of {:?}", &t[..4]);
            sigs.push(t[..4].to_vec());
            if &t[..4] == b"FACP" {
                // X_DSDT at offset 140 points at a valid DSDT.
                let dsdt = read_table(&m, u64_at(&t, 140));
                assert_eq!(&dsdt[..4], b"DSDT");
                assert!(checksum_ok(&dsdt));
                // Flags: hardware-reduced.
                assert_ne!(u32_at(&t, 112) & (1 << 20), 0);
            }
        }
        assert_eq!(
            sigs,
            vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
        );
    }

    #[test]
    fn madt_lists_every_cpu() {
        let t = madt(3);
        let b = t.as_slice();
        assert_eq!(u32_at(b, 4) as usize, b.len());
        assert_eq!(u32_at(b, 36), layout::APIC_START as u32);
        let mut off = 44;
        let mut lapics = Vec::new();
        let mut ioapic = None;
        while off < b.len() {
            match b[off] {
                0 => lapics.push(b[off + 3]),
                1 => ioapic = Some(u32_at(b, off + 4)),
                _ => {}
            }
            off += b[off + 1] as usize;
        }
        assert_eq!(off, b.len());
        assert_eq!(lapics, vec![0, 1, 2]);
        assert_eq!(ioapic, Some(layout::IOAPIC_START as u32));
    }

    #[test]
    fn dsdt_names_the_devices() {
        let d = dsdt(&AcpiConfig {
            cpus: 1,
            memory: 1 << 30,
        });
        let b = d.as_slice();
        // _PRT entry for device 3, INTA -> GSI 19 (16 + 3): Package { 0x0003ffff, 0, 0, 19 }.
        let prt_entry = [
            0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x03, 0x00, 0x00, 0x00, 0x0a, 0x13,
        ];
        let at = b.windows(4).position(|w| w == b"_PRT").unwrap();
        assert!(
            b.windows(prt_entry.len()).any(|w| w == prt_entry),
            "no _PRT entry in the DSDT: {:02x?}",
            &b[at..at + 24]
        );
        let has = |n: &[u8]| b.windows(n.len()).any(|w| w == n);
        assert!(has(b"PCI0"));
        assert!(has(b"_S5_"));
        assert!(has(b"COM1"));
        assert!(has(b"MBRD"));
        assert!(has(b"RTC_"));
    }

    /// ACPICA's disassembler reads the whole DSDT back (a malformed AML object, a wrong
    /// package length or a name that resolves nowhere stops it) and finds the GED, the power
    /// button and every hotplug slot with its eject method.
    #[test]
    fn dsdt_disassembles_with_iasl() {
        let d = dsdt(&AcpiConfig {
            cpus: 2,
            memory: 1 << 30,
        });
        let dir = std::env::temp_dir().join(format!("vmm-dsdt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aml = dir.join("dsdt.aml");
        std::fs::write(&aml, d.as_slice()).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .current_dir(&dir)
            .output()
            .expect("iasl (package acpica-tools; scripts/test installs it) must be installed");
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        let log = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "iasl -d failed: {log}");
        assert!(
            !log.contains("Error") && !dsl.contains("Unknown"),
            "{log}\n{dsl}"
        );
        for want in [
            "Device (_SB.GED)",
            "\"ACPI0013\"",
            "Method (_EVT, 1, Serialized)",
            "Device (_SB.PWRB)",
            "EisaId (\"PNP0C0C\")",
            "Notify (\\_SB.PWRB, 0x80)",
            "\\_SB.PCI0.PSCN ()",
            "Method (PCEJ, 1, Serialized)",
            "Method (PSCN, 0, Serialized)",
            "OperationRegion (PCST, SystemIO, 0x0614, 0x0C)",
            "OperationRegion (GDST, SystemIO, 0x0610, 0x04)",
            "Device (S01)",
            "Device (S1F)",
            "Notify (S1F, Arg1)",
            "PCEJ (_SUN)",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
        ] {
            assert!(dsl.contains(want), "the DSDT lacks {want}:\n{dsl}");
        }
        assert_eq!(dsl.matches("Method (_EJ0, 1").count(), 31, "{dsl}");
    }
}

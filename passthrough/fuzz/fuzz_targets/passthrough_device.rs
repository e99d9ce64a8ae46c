//! `cargo fuzz` target: an assigned PCI function (`passthrough::device::PassthroughPci`)
//! driven by an arbitrary sequence of guest accesses, against the fake VFIO device, router
//! and mapper of `passthrough::fuzzing` (an e1000e-like function with MSI, MSI-X, INTx, a
//! ROM, an I/O BAR and a 64-bit BAR).
//!
//! Input: a sequence of operations, each `[op, a, b]` followed by the data bytes it writes.
//! `op & 7` picks the kind, `len = [1, 2, 4, 8][op >> 3 & 3]`:
//! - 0: config write of `len` bytes at byte `op >> 5 & 3` of register `a` (any of 0..256;
//!   oversized and extended-space writes included), then the root's reconciliation
//!   (`Rig::write_config`: BARs routed where they decode, unrouted where they stop)
//! - 1: config write of `len` bytes at one of the interesting offsets (`HOT[a]`) + `b & 3`:
//!   command, BARs, ROM, the PM control, MSI and MSI-X capabilities, hidden VPD, line
//! - 2: config read of register `a`
//! - 3: BAR write of `len` bytes: BAR `b % 7` (6: the ROM) at offset `b >> 3 : a : data0`
//!   (plus the far end of the address space when `op >> 5 & 1`)
//! - 4: BAR read, offsets as for 3
//! - 5: MSI-X table write of `len` bytes at entry `b % 6`, field byte `a & 15`
//! - 6: VFIO refuses (or accepts again) the interrupt kind `a % 3`
//! - 7: a fault: `a & 1` the device stops decoding memory behind the vmm's back and the
//!   vCPU's EFAULT reaches `mapping_fault(None)`; else `mapping_fault(Some(gpa))` at a
//!   mapped address (`b` picks which) or a random one
//!
//! After every operation the target checks that the vmm, VFIO (the fake) and KVM (the
//! fakes) agree: at most one interrupt kind enabled in VFIO and it is the one the device
//! records; the MSI and MSI-X enable bits the guest reads say the same; exactly the
//! vectors of that kind that are unmasked have their irqfd attached (INTx's line for
//! INTx); no region access reached the fake that vfio-pci would fail (no decode, out of
//! bounds, read-only); BARs are mapped (KVM slots) only while the device decodes memory,
//! and the slots are exactly the ranges the device reports, each inside a BAR where the
//! root routes it; no slot is mapped before the device decodes memory or unmapped after it
//! stopped (a window in which a guest access would fault in KVM_RUN); the device never
//! reports a failed map or unmap to the root (the fake KVM refuses nothing, so a failure
//! is a slot mapped twice or unmapped twice).
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use passthrough::device::IrqMode;
use passthrough::fuzzing::{rig, Rig, MSIX_CAP, MSI_CAP, PM_CAP, VPD_CAP};
use passthrough::pci::PciDevice;
use passthrough::vfio::{INTX_IRQ, MSIX_IRQ, MSI_IRQ};

/// Offsets a guest driver writes (and a hostile one aims at).
const HOT: [usize; 16] = [
    0x04,
    0x10,
    0x14,
    0x18,
    0x20,
    0x24,
    0x30,
    0x3c,
    PM_CAP + 4,
    VPD_CAP,
    MSI_CAP,
    MSI_CAP + 4,
    MSI_CAP + 12,
    MSI_CAP + 16,
    MSIX_CAP,
    MSIX_CAP + 2,
];

fn check(r: &mut Rig) {
    // One interrupt kind in VFIO, the one the device records.
    let enabled = r.dev.enabled.lock().unwrap().clone();
    let mode = r.pci.irq_mode();
    let expect: Vec<(u32, usize)> = match mode {
        IrqMode::Off => vec![],
        IrqMode::Intx => vec![(INTX_IRQ, 1)],
        IrqMode::Msi(n) => vec![(MSI_IRQ, n as usize)],
        IrqMode::Msix => vec![(MSIX_IRQ, 5)],
    };
    assert_eq!(
        enabled.into_iter().collect::<Vec<_>>(),
        expect,
        "VFIO and the device disagree"
    );
    // The guest reads back what is enabled.
    let msi_bit = r.pci.read_config(MSI_CAP / 4) & (1 << 16) != 0;
    let msix_bit = r.pci.read_config(MSIX_CAP / 4) & (1 << 31) != 0;
    assert_eq!(
        msi_bit,
        matches!(mode, IrqMode::Msi(_)),
        "MSI enable bit vs {mode:?}"
    );
    assert_eq!(
        msix_bit,
        mode == IrqMode::Msix,
        "MSI-X enable bit vs {mode:?}"
    );
    // Exactly the deliverable vectors are attached.
    let attached: BTreeSet<u32> = r
        .router
        .irqfds
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, &on)| on)
        .map(|(&g, _)| g)
        .collect();
    let live: BTreeSet<u32> = r.pci.live_gsis().into_iter().collect();
    assert_eq!(attached, live, "attached irqfds in {mode:?}");
    // Nothing reached VFIO that it would fail (and vfio-ioctls log).
    let bad = r.dev.bad_accesses.lock().unwrap();
    assert!(
        bad.is_empty(),
        "forwarded to a device that fails it: {bad:?}"
    );
    drop(bad);
    // KVM slots: exactly what the device says, and only while it decodes memory.
    let mut maps: Vec<(u64, u64)> = r.mapper.maps.lock().unwrap().values().copied().collect();
    maps.sort_unstable();
    let mut ranges = r.pci.mapped_ranges();
    ranges.sort_unstable();
    assert_eq!(maps, ranges, "KVM slots vs the device's mapped ranges");
    let late = r.mapper.late.lock().unwrap();
    assert!(
        late.is_empty(),
        "a slot outlived or preceded decoding: {late:?}"
    );
    drop(late);
    let decoding = r.dev.command() & 2 != 0 && !r.dev.d3();
    assert!(
        maps.is_empty() || decoding,
        "BARs mapped while the device decodes no memory"
    );
    // Only where the root routes a BAR.
    let bars = r.pci.bars();
    for &(gpa, len) in &maps {
        let inside = r.routed.iter().any(|(&index, &at)| {
            bars.iter()
                .find(|b| b.index == index)
                .is_some_and(|b| {
                    // In u128: a hostile BAR can end at the top of the address space.
                    gpa >= at && u128::from(gpa) + u128::from(len) <= u128::from(at) + u128::from(b.size)
                })
        });
        assert!(inside, "slot {gpa:#x}+{len:#x} outside the routed BARs {:x?}", r.routed);
    }
    assert!(r.map_errors.is_empty(), "{:?}", r.map_errors);
}

fuzz_target!(|input: &[u8]| {
    let mut r = rig(true, true, None);
    let mut i = 0;
    let mut ops = 0;
    while i + 3 <= input.len() && ops < 512 {
        let (op, a, b) = (input[i], input[i + 1], input[i + 2]);
        i += 3;
        ops += 1;
        let len = [1usize, 2, 4, 8][usize::from(op >> 3 & 3)];
        let take = len.min(input.len() - i);
        let data = input[i..i + take].to_vec();
        let mut consumed = 0;
        match op & 7 {
            0 => {
                r.write_config(usize::from(a), u64::from(op >> 5 & 3), &data);
                consumed = take;
            }
            1 => {
                let at = HOT[usize::from(a) % HOT.len()] + usize::from(b & 3);
                r.write_config(at / 4, (at % 4) as u64, &data);
                consumed = take;
            }
            2 => {
                r.pci.read_config(usize::from(a));
            }
            3 | 4 => {
                let index = usize::from(b % 7);
                let low = input.get(i).copied().unwrap_or(0);
                let mut offset = (u64::from(b >> 3) << 16) | (u64::from(a) << 8) | u64::from(low);
                if op >> 5 & 1 != 0 {
                    offset = offset.wrapping_neg();
                }
                if op & 7 == 3 {
                    let data: Vec<u8> = input.get(i + 1..i + 1 + len).unwrap_or(&[]).to_vec();
                    if !data.is_empty() {
                        r.pci.write_bar(index, offset, &data);
                    }
                    consumed = 1 + data.len();
                } else {
                    let mut buf = vec![0u8; len];
                    r.pci.read_bar(index, offset, &mut buf);
                    consumed = 1;
                }
            }
            5 => {
                let at = 0x10000 + u64::from(b % 6) * 16 + u64::from(a & 15);
                if !data.is_empty() {
                    r.pci.write_bar(0, at, &data);
                }
                consumed = take;
            }
            6 => {
                let kind = u32::from(a % 3);
                let mut refuse = r.dev.refuse.lock().unwrap();
                if !refuse.remove(&kind) {
                    refuse.insert(kind);
                }
            }
            _ => {
                let mapped = r.pci.mapped_ranges();
                if a & 1 != 0 {
                    if !mapped.is_empty() {
                        // A reset behind the vmm's back; the next direct access faults.
                        r.dev.config.lock().unwrap()[4] &= !2;
                        assert!(r.pci.mapping_fault(None), "a revoked mapping not claimed");
                        // Those slots went late by construction.
                        r.mapper.late.lock().unwrap().clear();
                    }
                } else {
                    let gpa = match mapped.get(usize::from(b) % (mapped.len() + 1)) {
                        Some(&(start, size)) => start + u64::from(a) * 16 % size,
                        None => u64::from(b) << 24,
                    };
                    let ours = mapped.iter().any(|&(s, l)| gpa >= s && gpa - s < l);
                    assert_eq!(r.pci.mapping_fault(Some(gpa)), ours, "fault at {gpa:#x}");
                }
            }
        }
        i += consumed;
        check(&mut r);
    }
});

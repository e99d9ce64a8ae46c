//! CPUID: KVM's supported set, adjusted per vCPU (APIC ID, topology, hypervisor bit).

use kvm_bindings::kvm_cpuid_entry2;

/// CPU vendor, from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    match entries.iter().find(|e| e.function == 0) {
        Some(e) => {
            let mut v = [0u8; 12];
            v[..4].copy_from_slice(&e.ebx.to_le_bytes());
            v[4..8].copy_from_slice(&e.edx.to_le_bytes());
            v[8..].copy_from_slice(&e.ecx.to_le_bytes());
            match &v {
                b"GenuineIntel" => Vendor::Intel,
                b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
                _ => Vendor::Other,
            }
        }
        None => Vendor::Other,
    }
}

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
const EXT1_ECX_TOPOEXT: u32 = 1 << 22;

/// Number of bits needed to hold `n` distinct IDs (ceil(log2 n)).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// What the host's KVM emulates beyond its supported CPUID table.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostCaps {
    /// KVM_CAP_TSC_DEADLINE_TIMER: the in-kernel LAPIC timer has TSC-deadline mode.
    pub tsc_deadline: bool,
}

/// Adjusts KVM's supported CPUID for vCPU `cpu_id` of `nr_cpus`: one socket, one thread per
/// core, APIC ID = vCPU index.
pub fn patch(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, nr_cpus: u8, caps: HostCaps) {
    let vendor = vendor(entries);
    let cpus = u32::from(nr_cpus);
    let apic_id = u32::from(cpu_id);
    let core_bits = id_bits(cpus);
    let topoext = entries
        .iter()
        .any(|e| e.function == 0x8000_0001 && e.ecx & EXT1_ECX_TOPOEXT != 0);

    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if caps.tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                // APIC ID, logical processors per package, CLFLUSH size (8 x 8 bytes).
                e.ebx = (apic_id << 24) | (cpus.max(1) << 16) | (8 << 8);
                if cpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 if vendor == Vendor::Intel => {
                // Cores per package - 1 in EAX[31:26]; threads sharing the cache in EAX[25:14].
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((cpus - 1) << 26) | (sharing << 14);
            }
            0xb | 0x1f => {
                // x2APIC topology: level 0 SMT (1 thread), level 1 core (all vCPUs).
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = cpus;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i & 0xff;
                    }
                }
                e.edx = apic_id;
            }
            0x8000_0001 if vendor == Vendor::Amd => {
                // One socket whose cores are not hyper-threads.
                if cpus > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                // ApicIdCoreIdSize and NC (number of cores - 1).
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (cpus - 1);
            }
            0x8000_001e if vendor == Vendor::Amd && topoext => {
                e.eax = apic_id;
                // Compute unit (core) id, one thread per core.
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn leaf0(name: &[u8; 12]) -> kvm_cpuid_entry2 {
        let w = |i: usize| u32::from_le_bytes([name[i], name[i + 1], name[i + 2], name[i + 3]]);
        kvm_cpuid_entry2 {
            function: 0,
            eax: 0x1f,
            ebx: w(0),
            edx: w(4),
            ecx: w(8),
            ..Default::default()
        }
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn vendors() {
        assert_eq!(vendor(&[leaf0(b"GenuineIntel")]), Vendor::Intel);
        assert_eq!(vendor(&[leaf0(b"AuthenticAMD")]), Vendor::Amd);
        assert_eq!(vendor(&[leaf0(b"SomethingNew")]), Vendor::Other);
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }

    #[test]
    fn leaf1_apic_id_and_hypervisor_bit() {
        let mut v = vec![leaf0(b"AuthenticAMD"), entry(1, 0)];
        v[1].ebx = 0xff00_0000;
        patch(&mut v, 1, 2, HostCaps { tsc_deadline: true });
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 1, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 2, "logical count");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);

        let mut v = vec![leaf0(b"AuthenticAMD"), entry(1, 0)];
        v[1].edx = LEAF1_EDX_HTT;
        patch(&mut v, 0, 1, HostCaps::default());
        assert_eq!(find(&v, 1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&v, 1, 0).ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn x2apic_topology() {
        let mut v = vec![
            leaf0(b"GenuineIntel"),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
        ];
        patch(&mut v, 2, 3, HostCaps::default());
        let smt = find(&v, 0xb, 0);
        let core = find(&v, 0xb, 1);
        assert_eq!((smt.ebx, smt.ecx >> 8, smt.edx), (1, 1, 2));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 3, 2, 2));
        assert_eq!(find(&v, 0xb, 2).ebx, 0);
    }

    #[test]
    fn intel_leaf4_core_count() {
        let mut v = vec![leaf0(b"GenuineIntel"), entry(4, 0), entry(4, 3)];
        v[1].eax = (1 << 5) | 0x1; // L1 data cache
        v[2].eax = (3 << 5) | 0x3; // L3 unified
        patch(&mut v, 0, 4, HostCaps::default());
        assert_eq!(find(&v, 4, 0).eax >> 26, 3);
        assert_eq!((find(&v, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&v, 4, 3).eax >> 14) & 0xfff, 3);
        assert_eq!(find(&v, 4, 3).eax & 0x1f, 0x3);
    }

    #[test]
    fn amd_core_count() {
        let mut v = vec![
            leaf0(b"AuthenticAMD"),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ];
        v[1].ecx = EXT1_ECX_TOPOEXT;
        v[2].ecx = 0xffff_ffff;
        patch(&mut v, 1, 2, HostCaps::default());
        let e8 = find(&v, 0x8000_0008, 0);
        assert_eq!(e8.ecx & 0xff, 1);
        assert_eq!((e8.ecx >> 12) & 0xf, 1);
        assert_eq!(e8.ecx >> 16, 0xffff, "other bits kept");
        assert_eq!(find(&v, 0x8000_001e, 0).eax, 1);
        assert_ne!(find(&v, 0x8000_0001, 0).ecx & EXT1_ECX_CMP_LEGACY, 0);
    }
}

//! The CPUID table each vCPU sees: what KVM supports, with the topology and
//! hypervisor bits a guest needs to find its siblings, kvm-clock and the
//! paravirt features.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: the local APIC has the TSC-deadline timer mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: the package has more than one logical processor.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0xb ECX level types.
const LEVEL_TYPE_THREAD: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `n` things (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

/// Adjusts `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu_index` of
/// `cpu_count`, all of them cores of one socket with one thread each.
///
/// KVM's supported table already carries the KVM paravirt leaves
/// (0x4000_0000: "KVMKVMKVM", 0x4000_0001: kvm-clock and friends), which is
/// what lets the guest use kvm-clock instead of calibrating against the PIT.
///
/// `tsc_deadline`: KVM emulates the local APIC's TSC-deadline timer
/// (`KVM_CAP_TSC_DEADLINE_TIMER`) but leaves its CPUID bit to the VMM
/// (Firecracker and QEMU set it too). Without it the guest kernel first
/// measures its APIC timer against jiffies (a tenth of a second of ticks,
/// far longer where the host is itself emulated).
pub fn patch(cpuid: &mut CpuId, cpu_index: u8, cpu_count: u8, tsc_deadline: bool) {
    let apic_id = u32::from(cpu_index);
    let count = u32::from(cpu_count);
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, apic_id, count);
        if entry.function == 0x1 {
            if tsc_deadline {
                entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
            } else {
                entry.ecx &= !LEAF1_ECX_TSC_DEADLINE;
            }
        }
    }
}

fn patch_entry(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32) {
    match entry.function {
        0x1 => {
            // EBX: initial APIC id (31:24), logical processors (23:16),
            // CLFLUSH line size in 8-byte units (15:8).
            entry.ebx = (apic_id << 24) | ((count & 0xff) << 16) | (8 << 8);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
        }
        0x4 => {
            // Deterministic cache parameters (Intel): cores per package - 1
            // in EAX 31:26; one thread shares each cache level below L3.
            entry.eax &= 0x03ff_ffff;
            entry.eax |= (count.saturating_sub(1) & 0x3f) << 26;
            let level = (entry.eax >> 5) & 0x7;
            entry.eax &= !(0xfff << 14);
            if level == 3 {
                entry.eax |= (count.saturating_sub(1) & 0xfff) << 14;
            }
        }
        0xb => {
            // Extended topology: level 0 = threads (1 per core), level 1 =
            // cores; EDX is the x2APIC id on every level.
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_TYPE_THREAD << 8) | entry.index;
                }
                1 => {
                    entry.eax = bits_for(count);
                    entry.ebx = count;
                    entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        0x8000_0008 => {
            // AMD: number of cores - 1 (ECX 7:0) and APIC id size (15:12).
            entry.ecx = (bits_for(count) << 12) | (count.saturating_sub(1) & 0xff);
        }
        _ => {}
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

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = entry(1, 0);
        patch_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & LEAF1_EDX_HTT, 0);
        let mut single = entry(1, 0);
        single.edx = LEAF1_EDX_HTT;
        patch_entry(&mut single, 0, 1);
        assert_eq!(single.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn the_tsc_deadline_timer_is_offered_only_when_kvm_has_it() {
        for have in [true, false] {
            let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(7, 0)]).unwrap();
            cpuid.as_mut_slice()[1].ecx = LEAF1_ECX_TSC_DEADLINE;
            patch(&mut cpuid, 0, 1, have);
            let [leaf1, leaf7] = cpuid.as_slice() else {
                panic!("two entries")
            };
            assert_eq!(leaf1.ecx & LEAF1_ECX_TSC_DEADLINE != 0, have);
            assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
            assert_eq!(leaf7.ecx, LEAF1_ECX_TSC_DEADLINE, "other leaves untouched");
        }
    }

    #[test]
    fn topology_leaf_counts_cores() {
        let mut l0 = entry(0xb, 0);
        let mut l1 = entry(0xb, 1);
        patch_entry(&mut l0, 2, 3);
        patch_entry(&mut l1, 2, 3);
        assert_eq!((l0.ebx, l0.edx, l0.ecx >> 8), (1, 2, LEVEL_TYPE_THREAD));
        assert_eq!(
            (l1.eax, l1.ebx, l1.edx, l1.ecx >> 8),
            (2, 3, 2, LEVEL_TYPE_CORE)
        );
    }

    #[test]
    fn bits_for_rounds_up() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(32), 5);
    }
}

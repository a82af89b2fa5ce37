//! The Intel MultiProcessor table: how a guest without ACPI learns its CPUs,
//! its IOAPIC and how legacy IRQs are wired.
//!
//! Written by hand: the format is a handful of fixed little-endian records
//! (MP spec 1.4) and no maintained crate publishes it; Firecracker and Cloud
//! Hypervisor each carry their own inside their VMM.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START};

/// Where the table goes: the first KiB of the EBDA, one of the places Linux
/// scans for the floating pointer.
pub const MPTABLE_START: u64 = EBDA_START;
/// The EBDA KiB the table must fit in.
const MPTABLE_MAX_SIZE: usize = 1024;
/// Most vCPUs whose entries fit next to the bus and IRQ entries in that KiB.
pub const MAX_CPUS: u8 = 32;
/// IOAPIC input pins, all wired 1:1 to ISA IRQs.
const IOAPIC_PINS: u8 = 24;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = 0x201; // FPU, APIC
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    /// Zero or too many vCPUs.
    #[error("{0} vCPUs requested: hull supports 1 to {MAX_CPUS}")]
    CpuCount(u8),
    /// Guest memory does not reach the EBDA.
    #[error("guest memory is too small for the MP table at {MPTABLE_START:#x}")]
    Write,
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// The table's bytes for `cpus` vCPUs, to be placed at `base`.
///
/// # Errors
/// `cpus` is 0 or above [`MAX_CPUS`].
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(cpus));
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&u32::try_from(IOAPIC_START).unwrap_or(0).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // type, irq type, flags (bus default polarity/trigger), bus, bus irq, IOAPIC, pin
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 of every local APIC takes the PIC's ExtINT; LINT1 is NMI.
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(16 + table_len);
    // Floating pointer.
    let table_addr = u32::try_from(base + 16).map_err(|_| MpTableError::Write)?;
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&table_addr.to_le_bytes());
    table.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum(&table[..16]);
    // Configuration table header.
    let header_start = table.len();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&u16::try_from(table_len).unwrap_or(u16::MAX).to_le_bytes());
    table.extend_from_slice(&[4, 0]);
    table.extend_from_slice(b"HULL    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&[0; 6]); // OEM table pointer and size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&u32::try_from(APIC_START).unwrap_or(0).to_le_bytes());
    table.extend_from_slice(&[0; 4]);
    table.extend_from_slice(&entries);
    table[header_start + 7] = checksum(&table[header_start..]);
    debug_assert!(table.len() <= MPTABLE_MAX_SIZE);
    Ok(table)
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
///
/// # Errors
/// Invalid CPU count, or memory too small.
pub fn write<M: GuestMemory>(mem: &M, cpus: u8) -> Result<(), MpTableError> {
    let table = build(cpus, MPTABLE_START)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(|_| MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        for cpus in [1, 2, 7, MAX_CPUS] {
            let t = build(cpus, MPTABLE_START).unwrap();
            assert!(
                t.len() <= MPTABLE_MAX_SIZE,
                "{cpus} cpus: {} bytes",
                t.len()
            );
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(u64::from(ptr), MPTABLE_START + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            assert_eq!(usize::from(u16::from_le_bytes([cfg[4], cfg[5]])), cfg.len());
            assert_eq!(sum(cfg), 0);
            let entries = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(entries, u16::from(cpus) + 2 + 24 + 2);
            // Exactly one bootstrap processor, the first.
            let procs: Vec<_> = (0..usize::from(cpus))
                .map(|i| &cfg[44 + 20 * i..])
                .collect();
            assert!(procs.iter().all(|p| p[0] == 0));
            assert_eq!(procs[0][3], 3);
            assert!(procs[1..].iter().all(|p| p[3] == 1));
        }
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert_eq!(build(0, 0), Err(MpTableError::CpuCount(0)));
        assert_eq!(
            build(MAX_CPUS + 1, 0),
            Err(MpTableError::CpuCount(MAX_CPUS + 1))
        );
    }
}

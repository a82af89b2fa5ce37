//! The flat GDT used to enter the kernel in 64-bit mode.
//!
//! Written by hand: encoding an x86 segment descriptor is a few shifts, and no
//! maintained rust-vmm crate publishes it (Firecracker and Cloud Hypervisor
//! each keep their own copy inside their VMM).

use kvm_bindings::kvm_segment;

/// Builds a segment descriptor from its access/flags word (bits 8-15: access
/// byte, bits 12-15 of the high word: G, D/B, L, AVL), base and 20-bit limit.
#[must_use]
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Null, 64-bit code, data, TSS: selectors 0x00, 0x08, 0x10, 0x18.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff), // code: present, ring 0, execute/read, L=1, G=1
    gdt_entry(0xc093, 0, 0xfffff), // data: present, ring 0, read/write, D/B=1, G=1
    gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS, G=1
];

fn bits(entry: u64, shift: u32, mask: u64) -> u8 {
    // Every caller masks to at most 4 bits.
    #[allow(clippy::cast_possible_truncation)]
    let v = ((entry >> shift) & mask) as u8;
    v
}

/// The `kvm_segment` a descriptor loads into a segment register.
#[must_use]
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16);
    let raw_limit = ((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff);
    let g = bits(entry, 55, 1);
    // With G set the limit counts 4 KiB pages.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bits(entry, 47, 1);
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: u16::from(table_index) * 8,
        type_: bits(entry, 40, 0xf),
        present,
        dpl: bits(entry, 45, 0x3),
        db: bits(entry, 54, 1),
        s: bits(entry, 44, 1),
        l: bits(entry, 53, 1),
        g,
        avl: bits(entry, 52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64bit_ring0() {
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(cs.selector, 0x08);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.present, cs.dpl, cs.s),
            (1, 0, 1, 1, 0, 1)
        );
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
    }

    #[test]
    fn descriptor_round_trips_base_and_limit() {
        let e = gdt_entry(0x808b, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 3);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, (0xabcde << 12) | 0xfff);
        assert_eq!(s.selector, 0x18);
        assert_eq!(s.type_, 0xb);
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }
}

//! Identity-mapped page tables for the 64-bit entry.
//!
//! The kernel's `startup_64` only needs its own image, the zero page and the
//! command line mapped; it builds its real page tables right away. The first
//! GiB is mapped with 2 MiB pages, which covers all of those.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout::PML4_START;

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M_FLAG: u64 = 0x80;

/// Address of the page-directory-pointer table.
pub const PDPTE_START: u64 = PML4_START + 0x1000;
/// Address of the page directory.
pub const PDE_START: u64 = PML4_START + 0x2000;

/// The 512 page-directory entries that identity-map the first GiB.
#[must_use]
pub fn identity_pde_entries() -> [u64; 512] {
    let mut pde = [0u64; 512];
    for (i, e) in (0u64..).zip(pde.iter_mut()) {
        *e = (i << 21) | PAGE_SIZE_2M_FLAG | PRESENT_WRITABLE;
    }
    pde
}

/// Writes the PML4, PDPT and PD into guest memory; returns the CR3 value.
///
/// # Errors
/// Guest memory is too small to hold the tables.
pub fn write_identity_tables<M: GuestMemory>(mem: &M) -> Result<u64, GuestMemoryError> {
    mem.write_obj(PDPTE_START | PRESENT_WRITABLE, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | PRESENT_WRITABLE, GuestAddress(PDPTE_START))?;
    for (i, entry) in (0u64..).zip(identity_pde_entries()) {
        mem.write_obj(entry, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn first_gib_is_identity_mapped_with_2m_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(write_identity_tables(&mem).unwrap(), PML4_START);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | 3);
        let first: u64 = mem.read_obj(GuestAddress(PDE_START)).unwrap();
        assert_eq!(first, 0x83);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn too_small_memory_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        assert!(write_identity_tables(&mem).is_err());
    }
}

//! Guest RAM: allocation around the 32-bit MMIO hole and registration with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not map the memory.
    #[error("cannot allocate {mib} MiB of guest memory")]
    Allocate {
        /// Requested size.
        mib: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The host could not map aligned memory.
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        /// Requested size.
        mib: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {slot}")]
    Register {
        /// The slot.
        slot: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The shared memory file could not be made.
    #[error("cannot create the guest memory file (memfd)")]
    Memfd(#[source] std::io::Error),
    /// The size is zero or would overflow.
    #[error("invalid guest memory size: {mib} MiB")]
    Size {
        /// Requested size.
        mib: u64,
    },
}

/// The RAM ranges for `size` bytes: one below the MMIO hole, and the rest
/// above 4 GiB.
#[must_use]
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Allocates `mib` MiB of anonymous guest memory.
///
/// # Errors
/// The size is invalid or the host is out of memory.
pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let size = mib
        .checked_mul(1 << 20)
        .filter(|s| *s > 0)
        .ok_or(MemoryError::Size { mib })?;
    let ranges = ram_ranges(size)
        .into_iter()
        .map(|(a, len)| usize::try_from(len).map(|len| (a, len)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| MemoryError::Size { mib })?;
    let regions = ranges
        .into_iter()
        .map(|(addr, len)| huge_aligned_region(addr, len))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| MemoryError::Map { mib, source })?;
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Size { mib })
}

/// Transparent huge pages' size on x86.
const HUGE_PAGE: usize = 2 << 20;

/// `len` bytes of anonymous RAM for guest address `addr` (2 MiB-aligned),
/// at a host address that is 2 MiB-aligned too: KVM maps a host huge page
/// as one guest huge page only where the two addresses agree modulo 2 MiB,
/// and a plain mmap is only page-aligned (with it, `hull run --rm busybox
/// true` took 5.09 s instead of 4.08 in the emulated host, 7 of 7 runs
/// slower). vm-memory maps only at addresses of its own choosing, so the
/// mapping is made here and handed over raw: it is never unmapped, which a
/// VMM's guest RAM never is before its process ends anyway.
///
/// The address range is reserved 2 MiB larger, inaccessible, and only its
/// aligned part made read-write: the pieces around it stay reserved (no
/// memory, no access). Unmapped, they left an aligned hole just below the
/// guest's RAM, where the next thread stack (2 MiB and a guard page) went
/// and, with transparent huge pages always on, took a whole huge page at
/// its first touch: 2 MiB more of the VMM's own resident memory.
fn huge_aligned_region(
    addr: GuestAddress,
    len: usize,
) -> Result<vm_memory::GuestRegionMmap, std::io::Error> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let padded = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
    // SAFETY: a new anonymous reservation at an address the kernel picks.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), padded, libc::PROT_NONE, flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // The kernel's address is page-aligned and `len` whole pages (MiB), so
    // `[start, start + len)` lies within the reservation, page-aligned.
    let start = (base as usize).next_multiple_of(HUGE_PAGE);
    // SAFETY: that range is part of the reservation just made, which
    // nothing else knows of.
    if unsafe { libc::mprotect(start as *mut libc::c_void, len, prot) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Huge pages asked for, as QEMU and Cloud Hypervisor do: on a host whose
    // transparent huge pages are `madvise` (Ubuntu's default, and this
    // project's CI machines') the guest would otherwise get none. A kernel
    // without them refuses, and the guest then runs on small pages.
    // SAFETY: advice on our own mapping; it changes no contents.
    let _ = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    // SAFETY: `[start, start + len)` is an anonymous read-write mapping of
    // ours, page-aligned, used by nothing else, and never unmapped.
    let region = unsafe { vm_memory::MmapRegion::build_raw(start as *mut u8, len, prot, flags) }
        .map_err(std::io::Error::other)?;
    vm_memory::GuestRegionMmap::new(region, addr)
        .ok_or_else(|| std::io::Error::other("guest region past the end of the address space"))
}

/// Allocates `mib` MiB of guest memory in one memfd, mapped shared: a
/// vhost-user backend (virtiofsd) maps the same pages from the fd.
///
/// # Errors
/// The size is invalid, or the memfd cannot be made or mapped.
pub fn create_shared(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let size = mib
        .checked_mul(1 << 20)
        .filter(|s| *s > 0)
        .ok_or(MemoryError::Size { mib })?;
    // SAFETY: a valid C string and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hull-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let ulen = usize::try_from(len).map_err(|_| MemoryError::Size { mib })?;
        let f = file.try_clone().map_err(MemoryError::Memfd)?;
        ranges.push((addr, ulen, Some(vm_memory::FileOffset::new(f, offset))));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(&ranges)
        .map_err(|source| MemoryError::Allocate { mib, source })
}

/// Hands every region of `mem` to KVM as a memory slot.
///
/// # Errors
/// KVM refused a slot.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Size {
                mib: region.len() >> 20,
            })?;
        let region_desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region stays mapped while any clone of `mem` lives (the
        // regions are reference-counted), and no KVM descriptor outlives it:
        // `vmm::Vmm` declares its vCPU and VM descriptors before its memory,
        // so they close first, and `Vmm::run` joins every vCPU thread before
        // the memory is dropped (or, if one will not stop, keeps it mapped
        // for the life of the process).
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn shared_memory_is_one_memfd_across_the_hole() {
        let mem = create_shared(16).unwrap();
        let r = mem.iter().next().unwrap();
        assert_eq!(r.len(), 16 << 20);
        assert_eq!(r.file_offset().unwrap().start(), 0);
        vm_memory::Bytes::write_obj(&mem, 0xabu8, GuestAddress(0x1000)).unwrap();
        assert!(matches!(
            create_shared(0),
            Err(MemoryError::Size { mib: 0 })
        ));
    }

    /// The `VmFlags` of this process's mapping that starts at `addr`.
    fn vm_flags(addr: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut ours = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((from, _)) = range.split_once('-') {
                    if let Ok(from) = usize::from_str_radix(from, 16) {
                        ours = from == addr;
                        continue;
                    }
                }
            }
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                if ours {
                    return flags.split_whitespace().map(str::to_string).collect();
                }
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    #[test]
    fn guest_ram_sits_at_huge_page_aligned_host_addresses() {
        for mib in [3, 16, 64] {
            let mem = create(mib).unwrap();
            let r = mem.iter().next().unwrap();
            assert_eq!(r.len(), mib << 20);
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap();
            assert_eq!(host as usize % HUGE_PAGE, 0, "{mib} MiB at {host:p}");
            if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
                assert!(
                    vm_flags(host as usize).contains(&"hg".to_string()),
                    "huge pages not advised for {mib} MiB at {host:p}"
                );
            }
            // Usable end to end.
            vm_memory::Bytes::write_obj(&mem, 0xabu8, GuestAddress(0)).unwrap();
            vm_memory::Bytes::write_obj(&mem, 0xcdu8, GuestAddress((mib << 20) - 1)).unwrap();
        }
    }

    #[test]
    fn zero_size_is_refused() {
        assert!(matches!(create(0), Err(MemoryError::Size { mib: 0 })));
    }
}

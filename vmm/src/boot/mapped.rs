//! Loading a file into guest memory by mapping it instead of copying it.
//!
//! linux-loader reads each ELF segment (and hull the initramfs) into guest
//! memory through [`ReadVolatile`]. [`MappedFile`] is such a reader: where the
//! file offset and the destination are aligned alike, it maps the file's
//! pages over the destination (`MAP_PRIVATE | MAP_FIXED`: copy-on-write,
//! faulted in as the guest touches them) and reads only the partial pages at
//! either end. No crate does this; it saves copying the kernel into fresh
//! memory at each boot, which is most of what building a VM costs where
//! memory is slow to fault in (about 200 of hull's 250 ms in the emulated
//! test host), and leaves the kernel's clean pages shared with the page
//! cache across VMs.
//!
//! As with Firecracker's snapshot memory files, a mapped file must not be
//! rewritten in place while a VM runs (a file replaced by rename, as
//! `hull kernel build` does, is fine): the guest would see the new bytes in
//! pages it has not touched yet. So only files that no one but their owner
//! (this user or root) may write are mapped, only over private anonymous
//! guest memory (a shared memfd must hold every guest page, for vhost-user
//! back-ends), and a mapping that fails is read instead.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};

use std::os::unix::fs::MetadataExt;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress, ReadVolatile,
    VolatileMemoryError, VolatileSlice,
};

const PAGE: usize = 4096;

/// A file read into guest memory by mapping where it can (see the module).
#[derive(Debug)]
pub(crate) struct MappedFile {
    file: File,
    pos: u64,
    /// Host address ranges `[start, end)` it may map over: `mem`'s private
    /// anonymous regions; empty when the file may not be mapped.
    targets: Vec<(usize, usize)>,
    mapped: u64,
    read: u64,
}

impl MappedFile {
    /// Reads `file` into `mem`, mapping its pages over `mem`'s private
    /// anonymous regions when the file is a regular one that only its
    /// owner, this user or root, may write. Anything else is read.
    #[must_use]
    pub(crate) fn new(file: File, mem: &GuestMemoryMmap) -> Self {
        // SAFETY: plain call.
        let me = unsafe { libc::geteuid() };
        let trusted = file.metadata().is_ok_and(|m| {
            m.is_file() && m.permissions().mode() & 0o022 == 0 && (m.uid() == me || m.uid() == 0)
        });
        let targets = if trusted {
            mem.iter()
                .filter(|r| r.file_offset().is_none())
                .filter_map(|r| {
                    let start = r.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
                    Some((start, start.checked_add(usize::try_from(r.len()).ok()?)?))
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            file,
            pos: 0,
            targets,
            mapped: 0,
            read: 0,
        }
    }

    /// Whether `[start, start + len)` lies in one region it may map over.
    fn may_map(&self, start: usize, len: usize) -> bool {
        start
            .checked_add(len)
            .is_some_and(|end| self.targets.iter().any(|&(s, e)| s <= start && end <= e))
    }

    /// Bytes mapped and bytes read so far.
    #[must_use]
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.mapped, self.read)
    }

    /// Reads `buf.len()` bytes (fewer at the end of the file) at file
    /// offset `at`.
    fn read_into<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
        at: u64,
    ) -> Result<usize, VolatileMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            self.file
                .seek(SeekFrom::Start(at + done as u64))
                .map_err(VolatileMemoryError::IOError)?;
            let mut rest = buf.offset(done)?;
            let n = (&self.file).read_volatile(&mut rest)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        self.read += done as u64;
        Ok(done)
    }
}

impl Read for MappedFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for MappedFile {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
        self.pos = match to {
            SeekFrom::Start(n) => n,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or_else(invalid)?,
            SeekFrom::End(d) => self
                .file
                .metadata()?
                .len()
                .checked_add_signed(d)
                .ok_or_else(invalid)?,
        };
        Ok(self.pos)
    }
}

impl ReadVolatile for MappedFile {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let size = self
            .file
            .metadata()
            .map_err(VolatileMemoryError::IOError)?
            .len();
        let want = usize::try_from(size.saturating_sub(self.pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let addr = buf.ptr_guard_mut().as_ptr() as usize;
        let head = addr.wrapping_neg() % PAGE;
        let pages = want.saturating_sub(head) / PAGE * PAGE;
        let aligned_alike = self.pos % PAGE as u64 == addr as u64 % PAGE as u64;
        let at = self.pos;
        let n = if aligned_alike && pages > 0 && self.may_map(addr + head, pages) {
            self.map_then_read(buf, at, head, pages, want)?
        } else {
            self.read_into(&buf.subslice(0, want)?, at)?
        };
        self.pos = at + n as u64;
        Ok(n)
    }
}

impl MappedFile {
    /// Fills `buf[..want]` from file offset `at`: `buf[head..head + pages]`
    /// mapped (read instead if the mapping fails), the rest read.
    fn map_then_read<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
        at: u64,
        head: usize,
        pages: usize,
        want: usize,
    ) -> Result<usize, VolatileMemoryError> {
        let n = self.read_into(&buf.subslice(0, head)?, at)?;
        if n < head {
            return Ok(n);
        }
        let target = buf.subslice(head, pages)?;
        let mapped = libc::off_t::try_from(at + head as u64)
            .ok()
            .and_then(|offset| {
                // SAFETY: `target` is `pages` bytes at a page-aligned address
                // (`head`) inside one of guest memory's private anonymous
                // regions (`may_map`), which this process mapped and which stay
                // mapped while the guest memory lives; `pages` is whole pages, so
                // MAP_FIXED replaces exactly those pages. They keep their
                // protection (read-write) and now hold the file's bytes, which is
                // what a read would have written there; nothing holds a
                // reference into them across this call (guest memory is only
                // ever accessed through volatile slices, and the VM does not run
                // yet).
                let p = unsafe {
                    libc::mmap(
                        target.ptr_guard_mut().as_ptr().cast(),
                        pages,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                        self.file.as_raw_fd(),
                        offset,
                    )
                };
                (p != libc::MAP_FAILED).then_some(())
            });
        if mapped.is_some() {
            buf.bitmap().mark_dirty(head, pages);
            self.mapped += pages as u64;
        } else {
            // A file system that cannot map, or a limit on mappings: read.
            let n = self.read_into(&target, at + head as u64)?;
            if n < pages {
                return Ok(head + n);
            }
        }
        let tail = buf.subslice(head + pages, want - head - pages)?;
        let tail = self.read_into(&tail, at + (head + pages) as u64)?;
        Ok(head + pages + tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn file_of(len: usize, mode: u32) -> (tempfile::TempDir, File, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..len)
            .map(|i| (i * 7 + i / 4096).to_le_bytes()[0])
            .collect();
        File::create(&path).unwrap().write_all(&data).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, File::open(&path).unwrap(), data)
    }

    /// Every combination of alignment and length reads what a copy reads,
    /// maps only where it may, and leaves the pages around it untouched.
    #[test]
    fn reads_what_a_copy_reads() {
        for (file_at, guest_at, len, mode, may_map, maps) in [
            (0, 0x10_0000, 5 * PAGE + 100, 0o644, true, true),
            (PAGE, 0x20_0000, 3 * PAGE, 0o644, true, true),
            (100, 0x30_0064, 4 * PAGE, 0o644, true, true),
            (100, 0x40_0000, 4 * PAGE, 0o644, true, false),
            (0, 0x50_0000, PAGE - 1, 0o644, true, false),
            (0, 0x60_0000, 4 * PAGE, 0o666, true, false),
            (0, 0x70_0000, 4 * PAGE, 0o644, false, false),
        ] {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
            let shared = crate::memory::create_shared(16).unwrap();
            let (_dir, file, data) = file_of(file_at + len + 3 * PAGE, mode);
            mem.write_slice(&[0xee; 64], GuestAddress(guest_at as u64 - 64))
                .unwrap();
            let mut f = MappedFile::new(file, if may_map { &mem } else { &shared });
            f.seek(SeekFrom::Start(file_at as u64)).unwrap();
            mem.read_exact_volatile_from(GuestAddress(guest_at as u64), &mut f, len)
                .unwrap();
            let mut got = vec![0; len];
            mem.read_slice(&mut got, GuestAddress(guest_at as u64))
                .unwrap();
            assert!(
                got == data[file_at..file_at + len],
                "{file_at} {guest_at:#x} {len}"
            );
            let (mapped, read) = f.counts();
            assert_eq!(mapped > 0, maps, "{file_at} {guest_at:#x} {len}");
            assert_eq!(mapped + read, len as u64);
            let mut around = [0u8; 64];
            mem.read_slice(&mut around, GuestAddress(guest_at as u64 - 64))
                .unwrap();
            assert_eq!(around, [0xee; 64]);
            mem.read_slice(&mut around, GuestAddress((guest_at + len) as u64))
                .unwrap();
            assert_eq!(around, [0; 64], "past the end stays zero");
            // The guest may write its pages; the file does not change.
            mem.write_slice(&[1; 8], GuestAddress(guest_at as u64 + PAGE as u64))
                .unwrap();
        }
    }

    /// A read past the end of the file stops there, as a read does.
    #[test]
    fn stops_at_the_end_of_the_file() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (_dir, file, _) = file_of(2 * PAGE + 10, 0o600);
        let mut f = MappedFile::new(file, &mem);
        let err = mem.read_exact_volatile_from(GuestAddress(0), &mut f, 4 * PAGE);
        assert!(err.is_err());
    }
}

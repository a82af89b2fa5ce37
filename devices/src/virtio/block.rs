//! virtio-blk backed by a host file.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::chain::{for_each_piece, in_memory, total_len, Buf};
use super::{
    read_config_bytes, ActivateError, Active, DeviceError, DeviceQueue, Interrupt, QueueEvents,
    VirtioDevice, FEATURE_VERSION_1,
};

/// The unit of virtio-blk addresses and capacity.
pub const SECTOR_SIZE: u64 = 512;

const NAME: &str = "blk";
const QUEUE_SIZE: u16 = 256;
/// Data segments per request (`seg_max`); a request also has a header and a status.
const SEG_MAX: u32 = 128;
/// Bytes per data segment (`size_max`).
const SIZE_MAX: u32 = 1 << 20;
const MAX_DESCS: usize = SEG_MAX as usize + 2;
/// `struct virtio_blk_outhdr`: type (u32), ioprio (u32), sector (u64).
const HEADER_LEN: u64 = 16;
/// Configuration space up to `seg_max`: capacity (u64), size_max, seg_max.
const CONFIG_LEN: usize = 16;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Request bytes one wake-up serves at most (besides at most a queue's worth
/// of requests); at least one request is always served.
const BYTES_PER_WAKE: u64 = 32 << 20;
/// Zeros for reads past the end of the file.
const ZEROS: [u8; 4096] = [0; 4096];

/// Errors building a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The size of the backing file could not be found.
    #[error("cannot find the size of the disk image")]
    Size(#[source] io::Error),
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
}

/// The backing file and what the guest sees of it.
#[derive(Debug)]
struct Disk {
    file: File,
    read_only: bool,
    /// Current length of the file (writes to the last, partial sector grow it).
    file_len: u64,
    /// Capacity in bytes: the file length rounded up to a sector.
    capacity: u64,
    serial: [u8; ID_LEN],
    /// Further read-only files that follow `file` on the disk, each starting
    /// on a sector boundary: (disk offset, length, file).
    more: Vec<(u64, u64, File)>,
}

/// Where files of `lengths` bytes start when concatenated on a disk, each on
/// a sector boundary, and the disk's size; `None` on overflow.
#[must_use]
pub fn concat_layout(lengths: &[u64]) -> Option<(Vec<u64>, u64)> {
    let mut offsets = Vec::with_capacity(lengths.len());
    let mut end = 0u64;
    for len in lengths {
        offsets.push(end);
        end = end.checked_add(len.div_ceil(SECTOR_SIZE).checked_mul(SECTOR_SIZE)?)?;
    }
    Some((offsets, end))
}

/// A virtio-blk device (one request queue) serving a host file.
///
/// Offers `VIRTIO_BLK_F_FLUSH`, `SEG_MAX`, `SIZE_MAX`, indirect descriptors
/// and, for a read-only disk, `VIRTIO_BLK_F_RO`. A file whose length is not a
/// multiple of 512 shows a capacity rounded up, reading zeros past its end.
#[derive(Debug)]
pub struct Block {
    disk: Disk,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    events: QueueEvents,
    active: Option<Active>,
}

impl Block {
    /// A disk backed by `file` (opened read-write unless `read_only`), whose
    /// serial number (`GET_ID`) is the first 20 bytes of `serial`.
    ///
    /// # Errors
    /// The file's size cannot be read, or an eventfd cannot be created.
    pub fn new(mut file: File, read_only: bool, serial: &str) -> Result<Self, BlockError> {
        let file_len = file.seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
        let sectors = file_len.div_ceil(SECTOR_SIZE);
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);

        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());

        let mut avail_features = FEATURE_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        Ok(Self {
            disk: Disk {
                file,
                read_only,
                file_len,
                capacity: sectors * SECTOR_SIZE,
                serial: id,
                more: Vec::new(),
            },
            avail_features,
            acked_features: 0,
            config,
            events: QueueEvents::new().map_err(BlockError::EventFd)?,
            active: None,
        })
    }

    /// A read-only disk showing `files` one after the other, each starting
    /// on a sector boundary (zeros in between); returns the device and the
    /// byte offset of each file on the disk.
    ///
    /// This is how a VM gets any number of image layers through one device
    /// without copying them into a single file.
    ///
    /// # Errors
    /// No file, a size cannot be read, or an eventfd cannot be created.
    pub fn new_concat(files: Vec<File>, serial: &str) -> Result<(Self, Vec<u64>), BlockError> {
        let mut files = files.into_iter();
        let first = files
            .next()
            .ok_or_else(|| BlockError::Size(io::Error::other("no file to concatenate")))?;
        let mut dev = Self::new(first, true, serial)?;
        let mut lengths = vec![dev.disk.file_len];
        for mut file in files {
            let len = file.seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
            lengths.push(len);
            dev.disk.more.push((0, len, file));
        }
        let too_large = || BlockError::Size(io::Error::other("disk too large"));
        let (offsets, end) = concat_layout(&lengths).ok_or_else(too_large)?;
        for (entry, start) in dev.disk.more.iter_mut().zip(&offsets[1..]) {
            entry.0 = *start;
        }
        dev.disk.capacity = end;
        dev.config[0..8].copy_from_slice(&(end / SECTOR_SIZE).to_le_bytes());
        Ok((dev, offsets))
    }

    /// Capacity in 512-byte sectors.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.disk.capacity / SECTOR_SIZE
    }

    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.failed {
            return;
        }
        let mut used = false;
        let mut left = active.budget(0);
        let mut bytes = 0u64;
        let result = loop {
            if left == 0 || bytes >= BYTES_PER_WAKE {
                left = 0;
                break Ok(());
            }
            left -= 1;
            let (head, bufs) = match active.pop(0, MAX_DESCS) {
                Ok(Some(chain)) => chain,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            bytes = bytes.saturating_add(total_len(&bufs));
            let len = match self.disk.handle(&active.mem, &bufs) {
                Ok(len) => len,
                Err(why) => {
                    break Err(DeviceError::Request {
                        queue: 0,
                        head,
                        why,
                    })
                }
            };
            if let Err(e) = active.add_used(0, head, len) {
                break Err(e);
            }
            used = true;
        };
        if used {
            active.notify_used(0);
        }
        if let Err(e) = result {
            active.fail(NAME, &e);
        } else if left == 0 {
            self.events.yield_queue(active, 0, NAME);
        }
    }
}

impl Disk {
    /// Serves one request; returns the bytes written into the chain, status
    /// included. `Err`: the chain has no usable status byte.
    fn handle(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> Result<u32, &'static str> {
        let split = bufs.iter().position(|b| b.writable).unwrap_or(bufs.len());
        let (readable, writable) = bufs.split_at(split);
        let wlen = total_len(writable);
        let Some(data_len) = wlen.checked_sub(1) else {
            return Err("no status byte");
        };
        let mut status_addr = None;
        let _ = for_each_piece::<()>(writable, data_len, 1, |addr, _| {
            status_addr = Some(addr);
            Ok(())
        });
        let Some(status_addr) = status_addr.filter(|&a| mem.check_range(a, 1)) else {
            return Err("status byte outside guest memory");
        };
        let (status, written) = if in_memory(mem, bufs) {
            self.execute(mem, readable, writable, data_len)
        } else {
            (VIRTIO_BLK_S_IOERR, 0)
        };
        let status = u8::try_from(status).unwrap_or(u8::MAX);
        mem.write_obj(status, status_addr)
            .map_err(|_| "cannot write the status byte")?;
        // The chain holds at most 4 GiB in all, so this does not saturate.
        Ok(u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX))
    }

    /// Runs the request; returns its status and the data bytes written.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        readable: &[Buf],
        writable: &[Buf],
        data_len: u64,
    ) -> (u32, u64) {
        let rlen = total_len(readable);
        if rlen < HEADER_LEN {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let mut header = [0u8; 16];
        let mut at = 0;
        let read = for_each_piece(readable, 0, HEADER_LEN, |addr, n| {
            mem.read_slice(&mut header[at..at + n], addr)?;
            at += n;
            Ok::<(), vm_memory::GuestMemoryError>(())
        });
        if read.is_err() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = header;
        let kind = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes(s);

        // Data goes one way: a device-writable buffer in a write request, or
        // a device-readable one in a read request, is a malformed request.
        let only_header = rlen == HEADER_LEN;
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID if !only_header => (VIRTIO_BLK_S_IOERR, 0),
            VIRTIO_BLK_T_OUT if data_len != 0 => (VIRTIO_BLK_S_IOERR, 0),
            VIRTIO_BLK_T_IN => match self.range(sector, data_len) {
                Some(offset) => match self.read(mem, writable, offset, data_len) {
                    Ok(()) => (VIRTIO_BLK_S_OK, data_len),
                    Err(e) => {
                        crate::rate_limited!(
                            warn,
                            "virtio-blk: read at sector {sector} failed: {e}"
                        );
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                },
                None => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_OUT => {
                let len = rlen - HEADER_LEN;
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let Some(offset) = self.range(sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match self.write(mem, readable, offset, len) {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        crate::rate_limited!(
                            warn,
                            "virtio-blk: write at sector {sector} failed: {e}"
                        );
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.read_only {
                    return (VIRTIO_BLK_S_OK, 0);
                }
                match self.file.sync_data() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        crate::rate_limited!(warn, "virtio-blk: flush failed: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = usize::try_from(data_len).map_or(ID_LEN, |l| l.min(ID_LEN));
                let mut at = 0;
                let id = &self.serial[..n];
                let wrote = for_each_piece(writable, 0, n as u64, |addr, k| {
                    mem.write_slice(&id[at..at + k], addr)?;
                    at += k;
                    Ok::<(), vm_memory::GuestMemoryError>(())
                });
                match wrote {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u64),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors
    /// inside the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if len & (SECTOR_SIZE - 1) != 0 {
            return None;
        }
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (end <= self.capacity).then_some(offset)
    }

    /// Where disk bytes `[pos, pos + want)` come from: how many bytes (at
    /// least 1) can be taken in one go, and from which file at which file
    /// offset (index 0 is `file`, then `more`), or `None` for zeros.
    fn locate(&self, pos: u64, want: u64) -> (u64, Option<(usize, u64)>) {
        if pos < self.file_len {
            return (want.min(self.file_len - pos), Some((0, pos)));
        }
        let mut next_start = u64::MAX;
        for (i, (start, len, _)) in self.more.iter().enumerate() {
            if pos >= *start && pos - start < *len {
                return (want.min(len - (pos - start)), Some((i + 1, pos - start)));
            }
            if *start > pos {
                next_start = next_start.min(*start);
            }
        }
        (want.min(next_start - pos), None)
    }

    /// Disk bytes `[offset, offset + len)` into the buffers.
    fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &[Buf],
        mut offset: u64,
        len: u64,
    ) -> io::Result<()> {
        for_each_piece(bufs, 0, len, |addr, n| {
            let mut done = 0usize;
            while done < n {
                let (k, from) = self.locate(offset, (n - done) as u64);
                // `k` is at most `n - done`, a usize.
                let k = usize::try_from(k).unwrap_or(n - done);
                match from {
                    Some((i, at)) => {
                        let file = if i == 0 {
                            &mut self.file
                        } else {
                            &mut self.more[i - 1].2
                        };
                        file.seek(SeekFrom::Start(at))?;
                        let dst = addr
                            .checked_add(done as u64)
                            .ok_or_else(|| io::Error::other("guest address overflow"))?;
                        mem.read_exact_volatile_from(dst, file, k)
                            .map_err(io::Error::other)?;
                    }
                    None => zero(mem, addr, done, done + k)?,
                }
                done += k;
                offset += k as u64;
            }
            Ok(())
        })
    }

    /// Buffer bytes (after the header) onto disk bytes `[offset, offset + len)`.
    fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &[Buf],
        mut offset: u64,
        len: u64,
    ) -> io::Result<()> {
        for_each_piece(bufs, HEADER_LEN, len, |addr, n| {
            self.file.seek(SeekFrom::Start(offset))?;
            mem.write_all_volatile_to(addr, &mut self.file, n)
                .map_err(io::Error::other)?;
            offset += n as u64;
            self.file_len = self.file_len.max(offset);
            Ok(())
        })
    }
}

/// Zeroes bytes `[from, to)` of the guest buffer at `addr`.
fn zero(mem: &GuestMemoryMmap, addr: GuestAddress, mut from: usize, to: usize) -> io::Result<()> {
    while from < to {
        let n = (to - from).min(ZEROS.len());
        let at = addr
            .checked_add(from as u64)
            .ok_or_else(|| io::Error::other("address overflow"))?;
        mem.write_slice(&ZEROS[..n], at).map_err(io::Error::other)?;
        from += n;
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::rate_limited!(debug, "virtio-blk: ignored config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError> {
        let (active, notify) = Active::new(mem, interrupt, queues, 1)?;
        self.active = Some(active);
        self.events.activated(notify)
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.events.reset();
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.events.is_activate(&events) {
            if self.events.sync(ops, NAME) {
                self.process_queue();
            }
        } else if self.events.queue_event(&events).is_some() {
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops, NAME);
    }
}

#[cfg(test)]
mod concat_tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn concatenated_files_start_on_sector_boundaries() {
        let (dev, offsets) = Block::new_concat(
            vec![
                file_with(&[1u8; 700]),
                file_with(&[2u8; 10]),
                file_with(&[3u8; 512]),
            ],
            "layers",
        )
        .unwrap();
        assert_eq!(offsets, vec![0, 1024, 1536]);
        assert_eq!(dev.capacity(), 4);
        assert!(dev.avail_features & (1 << VIRTIO_BLK_F_RO) != 0);
        assert_eq!(dev.disk.locate(0, 2048), (700, Some((0, 0))));
        assert_eq!(dev.disk.locate(700, 2048), (324, None));
        assert_eq!(dev.disk.locate(1024, 2048), (10, Some((1, 0))));
        assert_eq!(dev.disk.locate(1030, 2), (2, Some((1, 6))));
        assert_eq!(dev.disk.locate(1034, 2048), (502, None));
        assert_eq!(dev.disk.locate(1536, 2048), (512, Some((2, 0))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{Harness, DATA, INDIRECT, NEXT, WRITE as W};
    use std::io::{Read, Write};
    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x100;

    fn disk(content: &[u8], read_only: bool) -> (Block, File) {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(content).unwrap();
        let copy = f.try_clone().unwrap();
        (Block::new(f, read_only, "hull-serial").unwrap(), copy)
    }

    fn header(h: &Harness<Block>, kind: u32, sector: u64) {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&kind.to_le_bytes());
        b[8..].copy_from_slice(&sector.to_le_bytes());
        h.mem.write_slice(&b, GuestAddress(HDR)).unwrap();
        h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(h: &Harness<Block>) -> u32 {
        h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap().into()
    }

    /// header / data / status chain; `data_flags` gives the data direction.
    fn request(h: &mut Harness<Block>, kind: u32, sector: u64, data_len: u32, data_flags: u16) {
        header(h, kind, sector);
        h.add_chain(
            0,
            &[(HDR, 16, 0), (BUF, data_len, data_flags), (STATUS, 1, W)],
        );
    }

    #[test]
    fn config_and_features() {
        let (dev, _) = disk(&[0u8; 1000], true);
        assert_eq!(dev.capacity(), 2);
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2);
        let mut seg = [0u8; 4];
        dev.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        assert_ne!(dev.avail_features() & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(dev.avail_features() & FEATURE_VERSION_1, 0);
        let (dev, _) = disk(&[0u8; 1024], false);
        assert_eq!(dev.avail_features() & 1 << VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn read_write_flush_and_id() {
        let mut content = vec![0u8; 4096];
        content[512..1024].fill(0xab);
        let (dev, mut file) = disk(&content, false);
        let mut h = Harness::new(dev, &[QUEUE_SIZE.min(16)]);

        request(&mut h, VIRTIO_BLK_T_IN, 1, 512, W);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_OK);
        assert_eq!(h.used(0), vec![(0, 513)]);
        let mut got = [0u8; 512];
        h.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert!(got.iter().all(|&b| b == 0xab));
        assert!(h.take_irq());

        h.mem.write_slice(&[0x5a; 1024], GuestAddress(BUF)).unwrap();
        request(&mut h, VIRTIO_BLK_T_OUT, 4, 1024, 0);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_OK);
        assert_eq!(h.used(0)[1], (3, 1));
        let mut on_disk = vec![0u8; 4096];
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_exact(&mut on_disk).unwrap();
        assert!(on_disk[2048..3072].iter().all(|&b| b == 0x5a));
        assert!(on_disk[3072..].iter().all(|&b| b == 0));

        header(&h, VIRTIO_BLK_T_FLUSH, 0);
        h.add_chain(0, &[(HDR, 16, 0), (STATUS, 1, W)]);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_OK);

        request(&mut h, VIRTIO_BLK_T_GET_ID, 0, 20, W);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_OK);
        let mut id = [0u8; 20];
        h.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id, b"hull-serial\0\0\0\0\0\0\0\0\0");
        assert_eq!(h.used(0).last(), Some(&(8, 21)));

        request(&mut h, 99, 0, 512, W);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_UNSUPP);
        assert!(!h.needs_reset());
    }

    #[test]
    fn header_and_data_split_across_descriptors() {
        let (dev, _) = disk(&[7u8; 2048], false);
        let mut h = Harness::new(dev, &[16]);
        header(&h, VIRTIO_BLK_T_IN, 2);
        h.add_chain(
            0,
            &[
                (HDR, 5, 0),
                (HDR + 5, 11, 0),
                (BUF, 100, W),
                (BUF + 0x800, 412, W),
                (STATUS, 1, W),
            ],
        );
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_OK);
        let mut got = [0u8; 412];
        h.mem
            .read_slice(&mut got, GuestAddress(BUF + 0x800))
            .unwrap();
        assert!(got.iter().all(|&b| b == 7));
    }

    #[test]
    fn indirect_descriptors() {
        let (dev, _) = disk(&[5u8; 1024], false);
        let mut h = Harness::new(dev, &[16]);
        header(&h, VIRTIO_BLK_T_IN, 1);
        let table = DATA + 0x10_000;
        let descs: [(u64, u32, u16, u16); 3] = [
            (HDR, 16, NEXT, 1),
            (BUF, 512, W | NEXT, 2),
            (STATUS, 1, W, 0),
        ];
        for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            h.mem
                .write_slice(&raw, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        h.raw_chain(0, &[(table, 48, INDIRECT, 0)], 0);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_OK);
        assert_eq!(h.used(0), vec![(0, 513)]);
        let mut got = [0u8; 512];
        h.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert!(got.iter().all(|&b| b == 5));
    }

    #[test]
    fn a_ring_kept_full_gets_a_queue_worth_per_wake_up() {
        let (dev, _) = disk(&[0u8; 4096], false);
        let mut h = Harness::new(dev, &[QUEUE_SIZE]);
        // Every chain is one indirect descriptor: a flush (header, status).
        header(&h, VIRTIO_BLK_T_FLUSH, 0);
        let table = DATA + 0x10_000;
        for (i, (addr, len, flags, next)) in [(HDR, 16u32, NEXT, 1u16), (STATUS, 1, W, 0)]
            .into_iter()
            .enumerate()
        {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            h.mem
                .write_slice(&raw, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let guest = h.full_ring_guest(0, |_| (table, 32, INDIRECT), 50_000);
        h.assert_bounded_while_kept_full(0, guest);
        assert!(!h.needs_reset());
    }

    #[test]
    fn partial_last_sector_reads_zeros() {
        let (dev, _) = disk(&[9u8; 700], false);
        assert_eq!(dev.capacity(), 2);
        let mut h = Harness::new(dev, &[16]);
        h.mem.write_slice(&[0xee; 512], GuestAddress(BUF)).unwrap();
        request(&mut h, VIRTIO_BLK_T_IN, 1, 512, W);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_OK);
        let mut got = [0u8; 512];
        h.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert!(got[..188].iter().all(|&b| b == 9));
        assert!(got[188..].iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_requests_get_ioerr() {
        let (dev, _) = disk(&[0u8; 4096], false);
        let mut h = Harness::new(dev, &[16]);
        // Past the end, at the end, and a sector number that overflows.
        for sector in [8, 7, u64::MAX / 256] {
            request(&mut h, VIRTIO_BLK_T_IN, sector, 1024, W);
            h.notify(0);
            assert_eq!(status(&h), VIRTIO_BLK_S_IOERR, "sector {sector}");
        }
        // Not a whole number of sectors.
        request(&mut h, VIRTIO_BLK_T_IN, 0, 100, W);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_IOERR);
        // Data buffer outside guest memory.
        header(&h, VIRTIO_BLK_T_IN, 0);
        h.add_chain(0, &[(HDR, 16, 0), (1 << 40, 512, W), (STATUS, 1, W)]);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_IOERR);
        // Header too short.
        header(&h, VIRTIO_BLK_T_IN, 0);
        h.add_chain(0, &[(HDR, 8, 0), (STATUS, 1, W)]);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_IOERR);
        // Data buffers in the wrong direction.
        request(&mut h, VIRTIO_BLK_T_IN, 0, 512, 0);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_IOERR);
        request(&mut h, VIRTIO_BLK_T_OUT, 0, 512, W);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_IOERR);
        // Every request came back, and the device still works.
        assert_eq!(h.used(0).len(), 8);
        assert!(h.used(0).iter().all(|&(_, len)| len == 1));
        assert!(!h.needs_reset());
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let (dev, mut file) = disk(&[1u8; 1024], true);
        let mut h = Harness::new(dev, &[16]);
        request(&mut h, VIRTIO_BLK_T_OUT, 0, 512, 0);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_IOERR);
        let mut on_disk = vec![0u8; 1024];
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_exact(&mut on_disk).unwrap();
        assert!(on_disk.iter().all(|&b| b == 1));
        header(&h, VIRTIO_BLK_T_FLUSH, 0);
        h.add_chain(0, &[(HDR, 16, 0), (STATUS, 1, W)]);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn chain_without_status_fails_the_device() {
        let (dev, _) = disk(&[0u8; 1024], false);
        let mut h = Harness::new(dev, &[16]);
        header(&h, VIRTIO_BLK_T_IN, 0);
        h.add_chain(0, &[(HDR, 16, 0)]);
        h.notify(0);
        assert!(h.needs_reset());
        assert!(h.used(0).is_empty());
        // Stopped: later requests are left alone.
        request(&mut h, VIRTIO_BLK_T_IN, 0, 512, W);
        h.notify(0);
        assert!(h.used(0).is_empty());
    }

    #[test]
    fn status_outside_memory_fails_the_device() {
        let (dev, _) = disk(&[0u8; 1024], false);
        let mut h = Harness::new(dev, &[16]);
        header(&h, VIRTIO_BLK_T_IN, 0);
        h.add_chain(0, &[(HDR, 16, 0), (BUF, 512, W), (1 << 40, 1, W)]);
        h.notify(0);
        assert!(h.needs_reset());
    }

    #[test]
    fn looping_chain_fails_the_device() {
        let (dev, _) = disk(&[0u8; 1024], false);
        let mut h = Harness::new(dev, &[16]);
        header(&h, VIRTIO_BLK_T_IN, 0);
        let next = NEXT;
        // 0 -> 1 -> 0 -> ...
        h.raw_chain(0, &[(HDR, 16, next, 1), (BUF, 512, W | next, 0)], 0);
        h.notify(0);
        assert!(h.needs_reset());
    }

    #[test]
    fn too_many_descriptors_fail_the_device() {
        let (dev, _) = disk(&[0u8; 1 << 20], false);
        let mut h = Harness::new(dev, &[256]);
        header(&h, VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![(HDR, 16, 0)];
        descs.extend((0..=u64::from(SEG_MAX)).map(|i| (BUF + i * 512, 512, W)));
        descs.push((STATUS, 1, W));
        h.add_chain(0, &descs);
        h.notify(0);
        assert!(h.needs_reset());
    }

    #[test]
    fn head_index_past_the_queue_fails_the_device() {
        let (dev, _) = disk(&[0u8; 1024], false);
        let mut h = Harness::new(dev, &[16]);
        h.push_avail(0, 200);
        h.notify(0);
        assert!(h.needs_reset());
    }

    #[test]
    fn reset_and_reactivate() {
        let (dev, _) = disk(&[3u8; 1024], false);
        let mut h = Harness::new(dev, &[16]);
        h.reset();
        h.activate_again(&[16]);
        request(&mut h, VIRTIO_BLK_T_IN, 0, 512, W);
        h.notify(0);
        assert_eq!(status(&h), VIRTIO_BLK_S_OK);
        assert_eq!(h.used(0).len(), 1);
    }
}

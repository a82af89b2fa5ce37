//! virtio-net with one receive/transmit queue pair, over a host
//! [`NetBackend`]: Ethernet frames to and from a user-mode stack (passt,
//! [`StreamBackend`]) or a TAP device ([`TapBackend`]).
//!
//! Offloads: the device offers `VIRTIO_NET_F_CSUM` (the guest may leave a
//! TCP/UDP checksum partial: the device completes it before the frame
//! leaves, since neither backend takes a virtio-net header), `GUEST_CSUM`
//! (frames to the guest are marked `DATA_VALID`: the backends checked or
//! built them) and `MTU` (a large MTU, passt's 65520, instead of TSO: one
//! frame per 64 KiB segment with no segmentation anywhere). Receive buffers
//! are mergeable (`MRG_RXBUF`: a frame spans as many of the driver's small
//! buffers as it needs, so a 66-byte ACK costs the guest one small buffer,
//! not a 17-page "big packets" chain); without it, big-packets chains, kept
//! to one ring slot each by indirect descriptors.
//!
//! Every chain is checked (direction, bounds, size); a bad one is returned
//! unused (or dropped, for transmit) without stopping the device. A backend
//! that ends (EOF or error) marks the link down (`VIRTIO_NET_S_LINK_UP`
//! cleared, a configuration interrupt), leaves epoll, and from then on guest
//! frames are consumed and dropped: nothing panics, nothing spins.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::chain::{for_each_piece, in_memory, total_len, Buf};
use super::{
    read_config_bytes, watch_fd, ActivateError, Active, DeviceError, DeviceQueue, Interrupt,
    QueueEvents, VirtioDevice, FEATURE_VERSION_1,
};

const NAME: &str = "net";
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// A big-packets receive chain is a header and up to MAX_SKB_FRAGS (17) pages.
const MAX_DESCS: usize = 64;
/// `struct virtio_net_hdr_v1` (with `num_buffers`): what precedes every frame
/// in guest buffers.
pub const NET_HDR_LEN: usize = 12;
/// The largest Ethernet frame either way: a 65535-byte IP packet (what the
/// guest may send at the largest MTU) plus an Ethernet header with a VLAN tag.
pub const MAX_FRAME: usize = 65535 + 18;
/// Ethernet header.
const ETH_HLEN: usize = 14;
/// passt's MTU for guests (and the most the device announces).
pub const DEFAULT_MTU: u16 = 65520;

/// A host end for guest Ethernet frames.
///
/// Calls never block: the device watches [`fd`](Self::fd) for readability,
/// and for writability while [`wants_write`](Self::wants_write). An `Err`
/// means the backend is gone for good (the device then marks its link down).
pub trait NetBackend: Send + fmt::Debug {
    /// The descriptor to watch.
    fn fd(&self) -> RawFd;
    /// Moves the next whole frame into `buf` (which holds [`MAX_FRAME`]
    /// bytes); `Ok(None)`: none ready now.
    ///
    /// # Errors
    /// The backend ended.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Takes `frame` for sending; `Ok(false)`: not now (try again once the
    /// descriptor is writable).
    ///
    /// # Errors
    /// The backend ended.
    fn send(&mut self, frame: &[u8]) -> io::Result<bool>;
    /// Whether output waits for the descriptor to be writable.
    fn wants_write(&self) -> bool {
        false
    }
    /// Writes what waits; called when the descriptor is writable.
    ///
    /// # Errors
    /// The backend ended.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn gone(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
}

/// Frames on a stream socket, each preceded by its length as 4 big-endian
/// bytes: QEMU's `-netdev stream` format, which passt speaks on its UNIX
/// socket or on a socket it is handed (`passt --fd`).
#[derive(Debug)]
pub struct StreamBackend {
    stream: UnixStream,
    /// Bytes read and not yet taken, from `rx_start`.
    rx: Vec<u8>,
    rx_start: usize,
    /// The rest of a frame the socket took in part.
    tx: Vec<u8>,
    tx_start: usize,
}

/// Read-ahead of a [`StreamBackend`]: a few frames.
const STREAM_RX_BUF: usize = 4 * (MAX_FRAME + 4);

impl StreamBackend {
    /// A backend on `stream` (made non-blocking here).
    ///
    /// # Errors
    /// The socket cannot be made non-blocking.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            rx: Vec::with_capacity(STREAM_RX_BUF),
            rx_start: 0,
            tx: Vec::with_capacity(MAX_FRAME + 4),
            tx_start: 0,
        })
    }

    /// A whole frame at the front of the read-ahead: its length.
    fn next_len(&self) -> io::Result<Option<usize>> {
        let have = &self.rx[self.rx_start..];
        let Some(prefix) = have.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > MAX_FRAME {
            // No frame is that large: the peer does not speak the protocol.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the backend sent a frame length past the largest frame",
            ));
        }
        Ok((have.len() >= 4 + len).then_some(len))
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.rx_start > 0 {
            self.rx.drain(..self.rx_start);
            self.rx_start = 0;
        }
        let old = self.rx.len();
        if old >= STREAM_RX_BUF {
            return Ok(());
        }
        self.rx.resize(STREAM_RX_BUF, 0);
        let result = loop {
            match self.stream.read(&mut self.rx[old..]) {
                Ok(0) => break Err(gone("the backend closed its socket")),
                Ok(n) => break Ok(old + n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(old),
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(len) => {
                self.rx.truncate(len);
                Ok(())
            }
            Err(e) => {
                self.rx.truncate(old);
                Err(e)
            }
        }
    }
}

impl NetBackend for StreamBackend {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if self.next_len()?.is_none() {
            self.fill()?;
        }
        let Some(len) = self.next_len()? else {
            return Ok(None);
        };
        let start = self.rx_start + 4;
        let dst = buf
            .get_mut(..len)
            .ok_or_else(|| io::Error::other("receive buffer too small"))?;
        dst.copy_from_slice(&self.rx[start..start + len]);
        self.rx_start = start + len;
        Ok(Some(len))
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        self.flush()?;
        if self.wants_write() {
            return Ok(false);
        }
        let len = u32::try_from(frame.len()).map_err(io::Error::other)?;
        self.tx.clear();
        self.tx_start = 0;
        self.tx.extend_from_slice(&len.to_be_bytes());
        self.tx.extend_from_slice(frame);
        self.flush()?;
        Ok(true)
    }

    fn wants_write(&self) -> bool {
        self.tx_start < self.tx.len()
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.wants_write() {
            let data = &self.tx[self.tx_start..];
            // SAFETY: `data` is valid for reads of `data.len()` bytes; the
            // socket is open. MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            match usize::try_from(n) {
                Ok(0) => return Err(gone("the backend stopped taking frames")),
                Ok(n) => self.tx_start += n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::Interrupted => {}
                        io::ErrorKind::WouldBlock => return Ok(()),
                        _ => return Err(e),
                    }
                }
            }
        }
        self.tx.clear();
        self.tx_start = 0;
        Ok(())
    }
}

/// A TAP device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`): one frame per
/// read or write. The host side (bridge, addresses) is the user's.
#[derive(Debug)]
pub struct TapBackend {
    file: File,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

impl TapBackend {
    /// Opens (or creates, with the rights for it) the TAP interface `name`.
    ///
    /// # Errors
    /// `/dev/net/tun` cannot be opened, or the kernel refused the interface.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a TAP interface name has 1 to 15 bytes",
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // SAFETY: `ifreq` is plain data; all-zero is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, b) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = libc::c_char::from_ne_bytes([*b]);
        }
        req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
        // SAFETY: a valid tun descriptor and ifreq for TUNSETIFF, which only
        // reads and writes the ifreq. The request type differs between libcs.
        #[allow(clippy::cast_possible_truncation, clippy::useless_conversion)]
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { file })
    }
}

impl NetBackend for TapBackend {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.file.read(buf) {
                Ok(0) => return Err(gone("the TAP device closed")),
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        loop {
            match self.file.write(frame) {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                // The interface is down: the frame is lost, as on a wire.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(true),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Completes a checksum the guest left partial: the ones' complement sum of
/// `frame[start..]` (whose checksum field holds the pseudo-header sum)
/// stored at `start + offset`. Returns false when those offsets do not fit.
pub fn complete_checksum(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let Some(field) = start.checked_add(offset) else {
        return false;
    };
    if field.checked_add(2).is_none_or(|end| end > frame.len()) || start < ETH_HLEN {
        return false;
    }
    let mut sum: u64 = 0;
    let mut words = frame[start..].chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // `sum` is folded to 16 bits above.
    #[allow(clippy::cast_possible_truncation)]
    let mut csum = !(sum as u16);
    if csum == 0 {
        // 0 means "no checksum" for UDP; 0xffff is the same value for TCP.
        csum = 0xffff;
    }
    frame[field..field + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

/// What one wake-up did and may still do.
#[derive(Debug)]
struct Batch {
    used: [bool; 2],
    left: [usize; 2],
}

/// A guest frame the backend could not take yet.
#[derive(Debug)]
struct PendingTx {
    head: u16,
    len: usize,
}

/// The virtio-net device.
pub struct Net {
    backend: Box<dyn NetBackend>,
    config: [u8; 12],
    avail_features: u64,
    acked_features: u64,
    events: QueueEvents,
    active: Option<Active>,
    /// The backend ended: the link is down for good.
    link_down: bool,
    /// A frame from the backend waiting for a receive buffer (its length in `rx_buf`).
    rx_frame: Option<usize>,
    rx_buf: Vec<u8>,
    /// A guest frame waiting for the backend (in `tx_buf`).
    tx_pending: Option<PendingTx>,
    tx_buf: Vec<u8>,
    watching: EventSet,
    /// Frames dropped (bad chains, frames too large), for the debug log.
    dropped: u64,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("backend", &self.backend)
            .field("link_down", &self.link_down)
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A device with MAC address `mac` and MTU `mtu` (announced to the
    /// guest; at most [`DEFAULT_MTU`]), on `backend`.
    ///
    /// # Errors
    /// An eventfd could not be created.
    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6], mtu: u16) -> io::Result<Self> {
        let mtu = mtu.clamp(68, DEFAULT_MTU);
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac);
        // The u32 binding fits a u16 register.
        #[allow(clippy::cast_possible_truncation)]
        let up = VIRTIO_NET_S_LINK_UP as u16;
        config[6..8].copy_from_slice(&up.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&mtu.to_le_bytes());
        let avail_features = FEATURE_VERSION_1
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_MTU
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        Ok(Self {
            backend,
            config,
            avail_features,
            acked_features: 0,
            events: QueueEvents::new()?,
            active: None,
            link_down: false,
            rx_frame: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_pending: None,
            tx_buf: vec![0; NET_HDR_LEN + MAX_FRAME],
            watching: EventSet::empty(),
            dropped: 0,
        })
    }

    /// Whether the link is up (the backend has not ended).
    #[must_use]
    pub fn link_up(&self) -> bool {
        !self.link_down
    }

    fn usable(&self) -> bool {
        self.active.as_ref().is_some_and(|a| !a.failed)
    }

    fn has(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// The backend ended: link down, tell the driver.
    fn backend_gone(&mut self, e: &io::Error) {
        if self.link_down {
            return;
        }
        crate::rate_limited!(
            warn,
            "virtio-net: the network backend ended ({e}); link down"
        );
        self.link_down = true;
        self.rx_frame = None;
        self.config[6..8].copy_from_slice(&0u16.to_le_bytes());
        if let Some(active) = &self.active {
            if self.acked_features & (1 << VIRTIO_NET_F_STATUS) != 0 {
                active.interrupt.signal_config_change();
            }
        }
    }

    fn run(&mut self, ops: &mut EventOps) {
        if self.usable() {
            let mut batch = match self.active.as_ref() {
                Some(a) => Batch {
                    used: [false; 2],
                    left: [a.budget(RX), a.budget(TX)],
                },
                None => return,
            };
            let result = self
                .receive(&mut batch)
                .and_then(|()| self.transmit(&mut batch));
            if let Some(active) = self.active.as_mut() {
                for (q, _) in batch.used.iter().enumerate().filter(|(_, &u)| u) {
                    active.notify_used(q);
                }
                match result {
                    Err(e) => active.fail(NAME, &e),
                    Ok(()) => {
                        for q in [RX, TX] {
                            if batch.left[q] == 0 {
                                self.events.yield_queue(active, q, NAME);
                            }
                        }
                    }
                }
            }
        }
        self.update_interest(ops);
    }

    /// Backend frames into the guest's receive buffers.
    fn receive(&mut self, batch: &mut Batch) -> Result<(), DeviceError> {
        while !self.link_down {
            let len = match self.rx_frame.take() {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(Some(len)) => len,
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        self.backend_gone(&e);
                        return Ok(());
                    }
                },
            };
            if batch.left[RX] == 0 {
                self.rx_frame = Some(len);
                return Ok(());
            }
            let data_valid = self.has(VIRTIO_NET_F_GUEST_CSUM);
            let mergeable = self.has(VIRTIO_NET_F_MRG_RXBUF);
            let Some(active) = self.active.as_mut() else {
                return Ok(());
            };
            if mergeable {
                if !receive_merged(
                    active,
                    batch,
                    &self.rx_buf[..len],
                    data_valid,
                    &mut self.dropped,
                )? {
                    // Not enough buffers yet: the frame waits.
                    self.rx_frame = Some(len);
                    return Ok(());
                }
                continue;
            }
            let Some((head, bufs)) = active.pop(RX, MAX_DESCS)? else {
                // No buffer: the frame waits (the backend is not read meanwhile).
                self.rx_frame = Some(len);
                return Ok(());
            };
            batch.left[RX] -= 1;
            batch.used[RX] = true;
            let frame = &self.rx_buf[..len];
            let written = write_rx(&active.mem, &bufs, frame, data_valid);
            if written == 0 {
                self.dropped += 1;
                crate::rate_limited!(debug, "virtio-net: unusable receive buffer; frame dropped");
            }
            active.add_used(RX, head, written)?;
        }
        Ok(())
    }

    /// Guest frames to the backend.
    fn transmit(&mut self, batch: &mut Batch) -> Result<(), DeviceError> {
        if let Some(p) = self.tx_pending.take() {
            let sent = if self.link_down {
                true
            } else {
                match self
                    .backend
                    .send(&self.tx_buf[NET_HDR_LEN..NET_HDR_LEN + p.len])
                {
                    Ok(sent) => sent,
                    Err(e) => {
                        self.backend_gone(&e);
                        true
                    }
                }
            };
            if !sent {
                self.tx_pending = Some(p);
                return Ok(());
            }
            if let Some(active) = self.active.as_mut() {
                active.add_used(TX, p.head, 0)?;
                batch.used[TX] = true;
            }
        }
        let csum_ok = self.has(VIRTIO_NET_F_CSUM);
        while batch.left[TX] > 0 {
            let Some(active) = self.active.as_mut() else {
                return Ok(());
            };
            let Some((head, bufs)) = active.pop(TX, MAX_DESCS)? else {
                return Ok(());
            };
            batch.left[TX] -= 1;
            batch.used[TX] = true;
            let frame_len = match read_tx(&active.mem, &bufs, &mut self.tx_buf, csum_ok) {
                Ok(len) => len,
                Err(why) => {
                    self.dropped += 1;
                    crate::rate_limited!(debug, "virtio-net: transmit frame dropped: {why}");
                    active.add_used(TX, head, 0)?;
                    continue;
                }
            };
            if self.link_down {
                active.add_used(TX, head, 0)?;
                continue;
            }
            match self
                .backend
                .send(&self.tx_buf[NET_HDR_LEN..NET_HDR_LEN + frame_len])
            {
                Ok(true) => active.add_used(TX, head, 0)?,
                Ok(false) => {
                    self.tx_pending = Some(PendingTx {
                        head,
                        len: frame_len,
                    });
                    return Ok(());
                }
                Err(e) => {
                    active.add_used(TX, head, 0)?;
                    self.backend_gone(&e);
                }
            }
        }
        Ok(())
    }

    fn update_interest(&mut self, ops: &mut EventOps) {
        let mut want = EventSet::empty();
        if self.usable() && !self.link_down {
            if self.rx_frame.is_none() {
                want |= EventSet::IN;
            }
            if self.tx_pending.is_some() || self.backend.wants_write() {
                want |= EventSet::OUT;
            }
        }
        watch_fd(ops, self.backend.fd(), &mut self.watching, want, NAME);
    }
}

/// Puts `frame` into as many mergeable receive buffers as it needs (the
/// first one's header says how many); false when the driver has not offered
/// enough yet (none is taken then). A frame with an unusable buffer among
/// its buffers is dropped: each is returned empty, which the driver skips.
fn receive_merged(
    active: &mut Active,
    batch: &mut Batch,
    frame: &[u8],
    data_valid: bool,
    dropped: &mut u64,
) -> Result<bool, DeviceError> {
    let need = (NET_HDR_LEN + frame.len()) as u64;
    let Some(start) = active.queues.get(RX).map(QueueT::next_avail) else {
        return Ok(false);
    };
    let mut chains: Vec<(u16, Vec<Buf>)> = Vec::new();
    let mut have = 0u64;
    let mut usable = true;
    while have < need {
        // At most a queue's worth per wake-up: the rest of this frame's
        // buffers wait for the next one (a used-up budget re-signals it).
        if chains.len() >= batch.left[RX] {
            if batch.left[RX] >= active.budget(RX) {
                // Buffers so small that the whole ring cannot hold the
                // frame: dropped, or the device would wait for ever.
                usable = false;
                break;
            }
            if let Some(q) = active.queues.get_mut(RX) {
                q.set_next_avail(start);
            }
            batch.left[RX] = 0;
            return Ok(false);
        }
        let Some((head, bufs)) = active.pop(RX, MAX_DESCS)? else {
            if let Some(q) = active.queues.get_mut(RX) {
                q.set_next_avail(start);
            }
            return Ok(false);
        };
        let ok = total_len(&bufs) > 0
            && bufs.iter().all(|b| b.writable)
            && in_memory(&active.mem, &bufs);
        usable &= ok;
        have += total_len(&bufs);
        chains.push((head, bufs));
        if !usable {
            break;
        }
    }
    batch.left[RX] -= chains.len();
    batch.used[RX] = true;
    let mut lens = vec![0u32; chains.len()];
    if usable
        && chains
            .first()
            .is_some_and(|(_, b)| total_len(b) >= NET_HDR_LEN as u64)
    {
        let mut hdr = [0u8; NET_HDR_LEN];
        if data_valid {
            // The u32 binding is a one-byte flag.
            #[allow(clippy::cast_possible_truncation)]
            let flag = VIRTIO_NET_HDR_F_DATA_VALID as u8;
            hdr[0] = flag;
        }
        // At most a queue's worth (256) of buffers: fits.
        let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        hdr[10..12].copy_from_slice(&count.to_le_bytes());
        let mut at = 0u64;
        for ((_, bufs), len) in chains.iter().zip(lens.iter_mut()) {
            let n = total_len(bufs).min(need - at);
            if write_span(&active.mem, bufs, &hdr, frame, at, n).is_err() {
                lens.iter_mut().for_each(|l| *l = 0);
                break;
            }
            // `n` is at most one chain's length, which fits a u32 (MAX_DESCS
            // buffers of at most u32::MAX bytes are checked against memory).
            *len = u32::try_from(n).unwrap_or(0);
            at += n;
        }
    }
    if lens.first().is_none_or(|&l| l == 0) {
        *dropped += 1;
        crate::rate_limited!(debug, "virtio-net: unusable receive buffer; frame dropped");
        lens.iter_mut().for_each(|l| *l = 0);
    }
    for ((head, _), len) in chains.iter().zip(lens) {
        active.add_used(RX, *head, len)?;
    }
    Ok(true)
}

/// Writes bytes `[from, from + n)` of the header `hdr` followed by `frame`
/// into `bufs`, from their start.
fn write_span(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    hdr: &[u8; NET_HDR_LEN],
    frame: &[u8],
    from: u64,
    n: u64,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut at = usize::try_from(from).unwrap_or(usize::MAX);
    for_each_piece(bufs, 0, n, |addr, k| {
        let mut done = 0usize;
        while done < k {
            let pos = at + done;
            let dst = vm_memory::GuestAddress(addr.0 + done as u64);
            let src = if pos < NET_HDR_LEN {
                &hdr[pos..NET_HDR_LEN.min(pos + k - done)]
            } else {
                let f = pos - NET_HDR_LEN;
                frame
                    .get(f..(f + k - done).min(frame.len()))
                    .ok_or(vm_memory::GuestMemoryError::InvalidBackendAddress)?
            };
            if src.is_empty() {
                return Err(vm_memory::GuestMemoryError::InvalidBackendAddress);
            }
            mem.write_slice(src, dst)?;
            done += src.len();
        }
        at += k;
        Ok(())
    })
}

/// Writes a virtio-net header and `frame` into the receive chain `bufs`;
/// returns the bytes written (0: the chain is unusable, nothing written).
fn write_rx(mem: &GuestMemoryMmap, bufs: &[Buf], frame: &[u8], data_valid: bool) -> u32 {
    let total = NET_HDR_LEN + frame.len();
    if !bufs.iter().all(|b| b.writable) || !in_memory(mem, bufs) || total_len(bufs) < total as u64 {
        return 0;
    }
    let mut hdr = [0u8; NET_HDR_LEN];
    if data_valid {
        // The u32 binding is a one-byte flag.
        #[allow(clippy::cast_possible_truncation)]
        let flag = VIRTIO_NET_HDR_F_DATA_VALID as u8;
        hdr[0] = flag;
    }
    // num_buffers: one chain per frame.
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
    let mut at = 0usize;
    let wrote = for_each_piece(bufs, 0, total as u64, |addr, k| {
        let end = at + k;
        if at < NET_HDR_LEN {
            let h = end.min(NET_HDR_LEN);
            mem.write_slice(&hdr[at..h], addr)?;
            if end > NET_HDR_LEN {
                let rest = vm_memory::GuestAddress(addr.0 + (h - at) as u64);
                mem.write_slice(&frame[..end - NET_HDR_LEN], rest)?;
            }
        } else {
            mem.write_slice(&frame[at - NET_HDR_LEN..end - NET_HDR_LEN], addr)?;
        }
        at = end;
        Ok::<(), vm_memory::GuestMemoryError>(())
    });
    if wrote.is_err() {
        return 0;
    }
    u32::try_from(total).unwrap_or(0)
}

/// Reads a transmit chain (header and frame) into `buf` and completes a
/// partial checksum; returns the frame's length (after the header).
fn read_tx(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    buf: &mut [u8],
    csum_negotiated: bool,
) -> Result<usize, &'static str> {
    if bufs.iter().any(|b| b.writable) {
        return Err("device-writable buffer in a transmit chain");
    }
    if !in_memory(mem, bufs) {
        return Err("buffer outside guest memory");
    }
    let total = total_len(bufs);
    if total < (NET_HDR_LEN + ETH_HLEN) as u64 {
        return Err("shorter than a header and an Ethernet header");
    }
    if total > buf.len() as u64 {
        return Err("larger than the largest frame");
    }
    let total = usize::try_from(total).map_err(|_| "too large")?;
    let mut at = 0usize;
    for_each_piece(bufs, 0, total as u64, |addr, k| {
        mem.read_slice(&mut buf[at..at + k], addr)?;
        at += k;
        Ok::<(), vm_memory::GuestMemoryError>(())
    })
    .map_err(|_| "unreadable buffer")?;
    let flags = u32::from(buf[0]);
    let gso_type = u32::from(buf[1]);
    if gso_type != VIRTIO_NET_HDR_GSO_NONE {
        return Err("segmentation offload was not negotiated");
    }
    let (hdr, frame) = buf[..total].split_at_mut(NET_HDR_LEN);
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        if !csum_negotiated {
            return Err("partial checksum without VIRTIO_NET_F_CSUM");
        }
        let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
        let offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
        if !complete_checksum(frame, start, offset) {
            return Err("partial checksum offsets outside the frame");
        }
    }
    Ok(total - NET_HDR_LEN)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
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
        crate::rate_limited!(debug, "virtio-net: ignored config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError> {
        let (active, notify) = Active::new(mem, interrupt, queues, 2)?;
        self.active = Some(active);
        self.events.activated(notify)
    }

    fn reset(&mut self) {
        self.active = None;
        self.tx_pending = None;
        self.acked_features = 0;
        self.events.reset();
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.events.is_activate(&events) {
            self.events.sync(ops, NAME);
        } else if events.fd() == self.backend.fd() {
            if events.event_set().contains(EventSet::OUT) {
                if let Err(e) = self.backend.flush() {
                    self.backend_gone(&e);
                }
            }
            // ERROR/HANG_UP: the next read tells EOF (or an error) apart from
            // data still to be read.
        } else if self.events.queue_event(&events).is_none() {
            return;
        }
        self.run(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops, NAME);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{Harness, DATA, WRITE as W};
    use vm_memory::GuestAddress;

    const MAC: [u8; 6] = [0x02, 0x68, 0x75, 0x6c, 0x6c, 0x01];
    const ALL: u64 = FEATURE_VERSION_1
        | 1 << VIRTIO_NET_F_CSUM
        | 1 << VIRTIO_NET_F_GUEST_CSUM
        | 1 << VIRTIO_NET_F_MTU
        | 1 << VIRTIO_NET_F_MAC
        | 1 << VIRTIO_NET_F_STATUS;

    fn net() -> (Harness<Net>, UnixStream) {
        net_with(&[16, 16])
    }

    fn net_with(sizes: &[u16]) -> (Harness<Net>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let backend = StreamBackend::new(ours).unwrap();
        let mut dev = Net::new(Box::new(backend), MAC, DEFAULT_MTU).unwrap();
        dev.ack_features(ALL);
        (Harness::new(dev, sizes), theirs)
    }

    fn drain(peer: &mut UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match peer.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        out
    }

    /// Splits the stream format back into frames.
    fn frames(mut data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while data.len() >= 4 {
            let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
            out.push(data[4..4 + len].to_vec());
            data = &data[4 + len..];
        }
        assert!(data.is_empty(), "a partial frame left over");
        out
    }

    fn eth(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(payload);
        f
    }

    /// An IPv4/UDP frame 10.0.2.15:1234 -> 10.0.2.2:5678 carrying `data`,
    /// its UDP checksum holding only the pseudo-header sum (as a guest
    /// leaves it with CHECKSUM_PARTIAL).
    fn udp_partial(data: &[u8]) -> Vec<u8> {
        let udp_len = 8 + data.len();
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2,
        ];
        let total = u16::try_from(20 + udp_len).unwrap();
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let mut udp = vec![0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 0];
        udp[4..6].copy_from_slice(&u16::try_from(udp_len).unwrap().to_be_bytes());
        let pseudo: u32 = [0x0a00u32, 0x020f, 0x0a00, 0x0202, 17, udp_len as u32]
            .iter()
            .sum();
        let folded = (pseudo & 0xffff) + (pseudo >> 16);
        udp[6..8].copy_from_slice(&u16::try_from(folded).unwrap().to_be_bytes());
        udp.extend_from_slice(data);
        ip.extend_from_slice(&udp);
        eth(&ip)
    }

    /// Whether the UDP checksum of an IPv4 frame verifies.
    fn udp_checksum_ok(frame: &[u8]) -> bool {
        let ip = &frame[ETH_HLEN..];
        let udp = &ip[20..];
        let mut sum: u32 = 0;
        for w in [&ip[12..16], &ip[16..20]] {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            sum += u32::from(u16::from_be_bytes([w[2], w[3]]));
        }
        sum += 17 + udp.len() as u32;
        for c in udp.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    fn put_tx(h: &mut Harness<Net>, addr: u64, hdr: [u8; NET_HDR_LEN], frame: &[u8]) {
        h.mem.write_slice(&hdr, GuestAddress(addr)).unwrap();
        h.mem
            .write_slice(frame, GuestAddress(addr + 0x100))
            .unwrap();
        h.add_chain(
            TX,
            &[
                (addr, NET_HDR_LEN as u32, 0),
                (addr + 0x100, u32::try_from(frame.len()).unwrap(), 0),
            ],
        );
    }

    #[test]
    fn guest_frames_reach_the_backend_with_a_length_prefix() {
        let (mut h, mut peer) = net();
        let frame = eth(b"hello, passt");
        put_tx(&mut h, DATA, [0; NET_HDR_LEN], &frame);
        put_tx(&mut h, DATA + 0x1000, [0; NET_HDR_LEN], &eth(b"second"));
        h.notify(TX);
        assert_eq!(frames(&drain(&mut peer)), vec![frame, eth(b"second")]);
        assert_eq!(h.used(TX), vec![(0, 0), (2, 0)]);
        assert!(h.take_irq());
    }

    #[test]
    fn partial_checksums_are_completed_before_the_frame_leaves() {
        let (mut h, mut peer) = net();
        let frame = udp_partial(b"odd-length payload!");
        assert!(!udp_checksum_ok(&frame));
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[0] = 1; // NEEDS_CSUM
        hdr[6..8].copy_from_slice(&34u16.to_le_bytes()); // UDP header
        hdr[8..10].copy_from_slice(&6u16.to_le_bytes()); // its checksum field
        put_tx(&mut h, DATA, hdr, &frame);
        // Offsets past the frame: dropped, not sent, the device goes on.
        hdr[6..8].copy_from_slice(&4000u16.to_le_bytes());
        put_tx(&mut h, DATA + 0x1000, hdr, &frame);
        h.notify(TX);
        let sent = frames(&drain(&mut peer));
        assert_eq!(sent.len(), 1);
        assert!(udp_checksum_ok(&sent[0]), "checksum not completed");
        assert_eq!(sent[0][..40], frame[..40]);
        assert_eq!(h.used(TX).len(), 2);
        assert!(!h.needs_reset());
    }

    #[test]
    fn backend_frames_reach_the_guest_marked_data_valid() {
        let (mut h, mut peer) = net();
        // A big-packets style chain: header, then pages.
        h.add_chain(
            RX,
            &[
                (DATA, 12, W),
                (DATA + 0x1000, 0x1000, W),
                (DATA + 0x2000, 0x1000, W),
            ],
        );
        h.notify(RX);
        let frame: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = u32::try_from(frame.len()).unwrap().to_be_bytes().to_vec();
        wire.extend_from_slice(&frame);
        // In two pieces: the device waits for the whole frame.
        peer.write_all(&wire[..3000]).unwrap();
        h.pump();
        assert!(h.used(RX).is_empty());
        peer.write_all(&wire[3000..]).unwrap();
        h.pump();
        assert_eq!(h.used(RX), vec![(0, 12 + 5000)]);
        let mut hdr = [0u8; 12];
        h.mem.read_slice(&mut hdr, GuestAddress(DATA)).unwrap();
        assert_eq!(hdr[0], 2, "DATA_VALID");
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
        let mut got = vec![0u8; 5000];
        h.mem
            .read_slice(&mut got[..4096], GuestAddress(DATA + 0x1000))
            .unwrap();
        h.mem
            .read_slice(&mut got[4096..], GuestAddress(DATA + 0x2000))
            .unwrap();
        assert_eq!(got, frame);
    }

    #[test]
    fn mergeable_buffers_take_a_frame_across_several_chains() {
        let (mut h, mut peer) = net();
        h.dev
            .lock()
            .unwrap()
            .ack_features(ALL | 1 << VIRTIO_NET_F_MRG_RXBUF);
        let frame: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        let mut wire = u32::try_from(frame.len()).unwrap().to_be_bytes().to_vec();
        wire.extend_from_slice(&frame);
        peer.write_all(&wire).unwrap();
        // Two 1000-byte buffers are not enough: none is taken yet.
        h.add_chain(RX, &[(DATA, 1000, W)]);
        h.add_chain(RX, &[(DATA + 0x1000, 1000, W)]);
        h.notify(RX);
        assert!(h.used(RX).is_empty());
        h.add_chain(RX, &[(DATA + 0x2000, 1000, W)]);
        h.add_chain(RX, &[(DATA + 0x3000, 1000, W)]);
        h.notify(RX);
        assert_eq!(h.used(RX), vec![(0, 1000), (1, 1000), (2, 512)]);
        let mut hdr = [0u8; 12];
        h.mem.read_slice(&mut hdr, GuestAddress(DATA)).unwrap();
        assert_eq!(hdr[0], 2, "DATA_VALID");
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 3, "num_buffers");
        let mut got = vec![0u8; 2500];
        h.mem
            .read_slice(&mut got[..988], GuestAddress(DATA + 12))
            .unwrap();
        h.mem
            .read_slice(&mut got[988..1988], GuestAddress(DATA + 0x1000))
            .unwrap();
        h.mem
            .read_slice(&mut got[1988..], GuestAddress(DATA + 0x2000))
            .unwrap();
        assert_eq!(got, frame);
        // The next frame starts in the fourth buffer; an unusable one among
        // a frame's buffers drops that frame (returned empty), not the device.
        let small = eth(b"ack");
        let mut wire = u32::try_from(small.len()).unwrap().to_be_bytes().to_vec();
        wire.extend_from_slice(&small);
        peer.write_all(&wire).unwrap();
        peer.write_all(&wire).unwrap();
        h.pump();
        assert_eq!(h.used(RX).len(), 4);
        assert_eq!(h.used(RX)[3], (3, 12 + small.len() as u32));
        h.add_chain(RX, &[(1 << 40, 1000, W)]);
        h.add_chain(RX, &[(DATA + 0x4000, 1000, W)]);
        h.notify(RX);
        let used = h.used(RX);
        assert_eq!(used.len(), 5);
        assert_eq!(used[4].1, 0);
        assert!(!h.needs_reset());
    }

    #[test]
    fn frames_wait_for_receive_buffers_without_spinning() {
        let (mut h, mut peer) = net();
        for i in 0..20u8 {
            let f = eth(&[i; 100]);
            let mut wire = u32::try_from(f.len()).unwrap().to_be_bytes().to_vec();
            wire.extend_from_slice(&f);
            peer.write_all(&wire).unwrap();
        }
        // No buffers: one frame is held, the socket leaves epoll (pump()
        // panics if the loop spins).
        h.pump();
        assert_eq!(h.dev.lock().unwrap().watching, EventSet::empty());
        for i in 0..20u64 {
            h.add_chain(RX, &[(DATA + i * 0x1000, 0x1000, W)]);
            if i % 10 == 9 {
                h.notify(RX);
            }
        }
        let used = h.used(RX);
        assert_eq!(used.len(), 20);
        for (i, (_, len)) in used.iter().enumerate() {
            assert_eq!(*len, 12 + 114);
            let mut b = [0u8; 1];
            h.mem
                .read_slice(&mut b, GuestAddress(DATA + i as u64 * 0x1000 + 12 + 14))
                .unwrap();
            assert_eq!(b[0], u8::try_from(i).unwrap(), "frames in order");
        }
    }

    #[test]
    fn bad_descriptors_are_refused_without_stopping_the_device() {
        let (mut h, mut peer) = net();
        let frame = eth(b"ok");
        // Transmit: device-writable, outside memory, shorter than a header,
        // larger than any frame, GSO never negotiated.
        h.add_chain(TX, &[(DATA, 64, W)]);
        h.add_chain(TX, &[(1 << 40, 64, 0)]);
        h.add_chain(TX, &[(DATA, 8, 0)]);
        h.add_chain(TX, &[(DATA, 0x2_0000, 0)]);
        let mut gso = [0u8; NET_HDR_LEN];
        gso[1] = 1;
        put_tx(&mut h, DATA + 0x4_0000, gso, &frame);
        put_tx(&mut h, DATA + 0x5_0000, [0; NET_HDR_LEN], &frame);
        h.notify(TX);
        assert_eq!(frames(&drain(&mut peer)), vec![frame.clone()]);
        assert_eq!(h.used(TX).len(), 6);
        // Receive: device-readable, too small, outside memory: returned empty.
        let mut wire = u32::try_from(frame.len()).unwrap().to_be_bytes().to_vec();
        wire.extend_from_slice(&frame);
        for _ in 0..4 {
            peer.write_all(&wire).unwrap();
        }
        h.add_chain(RX, &[(DATA, 0x1000, 0)]);
        h.add_chain(RX, &[(DATA, 20, W)]);
        h.add_chain(RX, &[(1 << 40, 0x1000, W)]);
        h.add_chain(RX, &[(DATA, 0x1000, W)]);
        h.notify(RX);
        let lens: Vec<u32> = h.used(RX).iter().map(|u| u.1).collect();
        assert_eq!(
            lens,
            vec![0, 0, 0, 12 + u32::try_from(frame.len()).unwrap()]
        );
        assert!(!h.needs_reset());
        assert!(h.dev.lock().unwrap().link_up());
    }

    #[test]
    fn a_backend_that_goes_away_marks_the_link_down() {
        let (mut h, peer) = net();
        h.add_chain(RX, &[(DATA + 0x8000, 0x1000, W)]);
        h.notify(RX);
        let _ = h.take_irq();
        let mut status = [0u8; 2];
        h.dev.lock().unwrap().read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), 1, "link up");
        drop(peer);
        h.pump();
        h.dev.lock().unwrap().read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), 0, "link down");
        assert!(h.take_irq(), "configuration change interrupt");
        assert!(h.interrupt.status() & crate::virtio::INT_CONFIG_CHANGE != 0);
        assert_eq!(h.dev.lock().unwrap().watching, EventSet::empty());
        // Guest frames are consumed and dropped: the guest never stalls.
        put_tx(&mut h, DATA, [0; NET_HDR_LEN], &eth(b"anyone?"));
        h.notify(TX);
        assert_eq!(h.used(TX), vec![(0, 0)]);
        assert!(!h.needs_reset());
    }

    #[test]
    fn a_backend_sending_garbage_is_cut_off() {
        let (mut h, mut peer) = net();
        peer.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).unwrap();
        h.pump();
        assert!(!h.dev.lock().unwrap().link_up());
        assert_eq!(h.dev.lock().unwrap().watching, EventSet::empty());
    }

    #[test]
    fn output_waits_for_a_backend_that_does_not_read() {
        let (mut h, mut peer) = net();
        let frame = vec![0x5a; 60_000];
        for i in 0..8u64 {
            put_tx(&mut h, DATA + i * 0x2_0000, [0; NET_HDR_LEN], &frame);
        }
        h.notify(TX);
        // The socket buffer takes a few: the rest wait, watched for OUT.
        assert!(h.used(TX).len() < 8);
        assert!(h.dev.lock().unwrap().watching.contains(EventSet::OUT));
        let mut got = Vec::new();
        for _ in 0..1000 {
            got.extend(drain(&mut peer));
            h.pump();
            if h.used(TX).len() == 8 && !h.dev.lock().unwrap().backend.wants_write() {
                break;
            }
        }
        got.extend(drain(&mut peer));
        assert_eq!(frames(&got).len(), 8);
        assert!(frames(&got).iter().all(|f| *f == frame));
    }

    #[test]
    fn a_ring_kept_full_gets_a_queue_worth_per_wake_up() {
        let (mut h, peer) = net_with(&[QUEUE_SIZE, QUEUE_SIZE]);
        drop(peer);
        h.pump();
        let guest = h.full_ring_guest(TX, |i| (DATA + u64::from(i) * 0x100, 64, 0), 50_000);
        h.assert_bounded_while_kept_full(TX, guest);
    }

    #[test]
    fn checksum_completion_matches_the_internet_checksum() {
        let mut f = udp_partial(&[1, 2, 3]);
        assert!(complete_checksum(&mut f, 34, 6));
        assert!(udp_checksum_ok(&f));
        let len = f.len();
        assert!(!complete_checksum(&mut f, 34, len));
        assert!(!complete_checksum(&mut f, usize::MAX, 6));
        assert!(
            !complete_checksum(&mut f, 2, 6),
            "inside the Ethernet header"
        );
    }

    #[test]
    fn config_space_holds_mac_status_and_mtu() {
        let (h, _peer) = net();
        let mut cfg = [0u8; 12];
        h.dev.lock().unwrap().read_config(0, &mut cfg);
        assert_eq!(cfg[..6], MAC);
        assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1);
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), DEFAULT_MTU);
    }
}

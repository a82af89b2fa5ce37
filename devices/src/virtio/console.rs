//! virtio-console with a single port, backed by a host Unix stream socket.
//!
//! With `VIRTIO_CONSOLE_F_MULTIPORT` (which Linux always takes) port 0 is a
//! *generic* port named [`PORT_NAME`]: the guest's `/dev/vport0p0`, not a
//! console (`/dev/hvc0`). That is the fast path: the hvc console driver
//! sends one buffer at a time and spins until the host has used it (a full
//! round trip per ~4 KiB), while a generic port's writes queue up to 32 KiB
//! each without waiting, many in flight. Without the feature the port is
//! the guest's `/dev/hvc0`, as before.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::chain::{for_each_piece, in_memory, total_len, Buf};
use super::{
    read_config_bytes, watch_fd, ActivateError, Active, DeviceError, DeviceQueue, Interrupt,
    QueueEvents, VirtioDevice, FEATURE_VERSION_1,
};

const NAME: &str = "console";
/// receiveq (host to guest) and transmitq (guest to host) of port 0.
const RX: usize = 0;
const TX: usize = 1;
/// The control receiveq (device to driver) and transmitq (driver to device)
/// of a multiport device.
const CTRL_RX: usize = 2;
const CTRL_TX: usize = 3;
/// `VIRTIO_CONSOLE_F_MULTIPORT`.
const F_MULTIPORT: u64 = 1 << 1;
/// The name the guest sees for port 0 (`/sys/class/virtio-ports/vport0p0/name`).
pub const PORT_NAME: &str = "hull.control";
/// Control events (`struct virtio_console_control`'s `event`).
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME_EVENT: u16 = 7;
/// `struct virtio_console_control`: id (le32), event (le16), value (le16).
const CTRL_HEADER: usize = 8;
/// Control messages waiting for the driver's buffers, at most (a driver
/// that keeps asking gets its answers dropped, not queued without end).
const CTRL_PENDING_MAX: usize = 8;
const QUEUE_SIZE: u16 = 256;
/// Port 0's transmitq is short: a generic port's writes do not wait for the
/// host, so the ring is how far the guest can run ahead of it (16 writes of
/// at most 32 KiB), which is what is left to send when the guest ends.
const TX_QUEUE_SIZE: u16 = 16;
/// Guest output kept from the ring at a reset, at most (16 writes of the
/// guest driver's largest, 32 KiB; longer chains are cut).
const TX_BACKLOG_MAX: usize = 16 * 32 * 1024;
const MAX_DESCS: usize = 64;
/// Host bytes read but not yet delivered to the guest, at most.
const RX_PENDING_MAX: usize = 4096;
/// Bytes handed from guest memory to the socket per `sendmsg`, at most
/// (a guest write is at most 32 KiB; a hostile chain may be far longer).
const TX_SEND_MAX: u64 = 256 * 1024;
/// Pieces of guest memory per `sendmsg`, at most (within `UIO_MAXIOV`).
const TX_IOVECS_MAX: usize = 256;
/// The guest's writes sent together, at most (a full ring).
const TX_CHAINS_MAX: usize = TX_QUEUE_SIZE as usize;
/// Read/deliver rounds per wake-up; the level-triggered loop comes back for more.
const RX_ROUNDS: usize = 16;
/// `struct virtio_console_config`: cols, rows (unused: no size feature),
/// max_nr_ports (1, read with multiport), emerg_wr (unused).
const CONFIG: [u8; 12] = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];

/// Guest output bytes sent per wake-up at most.
const TX_BYTES_PER_WAKE: u64 = 1 << 20;

/// What one wake-up did and may still do.
#[derive(Debug)]
struct Batch {
    /// Queues whose used ring got entries.
    used: [bool; 4],
    /// Chains each queue may still give.
    left: [usize; 4],
    /// Guest output sent so far.
    tx_bytes: u64,
}

/// A guest transmit chain partly sent.
#[derive(Debug)]
struct TxChain {
    head: u16,
    bufs: Vec<Buf>,
    sent: u64,
    total: u64,
}

/// A virtio-console device: what the guest writes to its port goes to
/// the socket; what arrives on the socket goes to the guest.
///
/// Backpressure: at most 4 KiB are read ahead of the
/// guest's receive buffers (the socket is not watched while that is full); a
/// guest transmit buffer the socket cannot take stays unused until the socket
/// is writable. When the host closes its end, input ends and guest output is
/// discarded (so the guest never blocks on it); the socket then leaves epoll,
/// so a closed peer cannot make the event loop spin.
#[derive(Debug)]
pub struct Console {
    stream: UnixStream,
    acked_features: u64,
    events: QueueEvents,
    active: Option<Active>,
    rx_pending: Vec<u8>,
    /// No more input: the host closed its end (or reading failed).
    rx_eof: bool,
    /// The host cannot take output any more: guest output is discarded.
    tx_closed: bool,
    /// The guest's writes being sent, in order; the first may be partly sent.
    tx_inflight: VecDeque<TxChain>,
    /// What the socket is registered for in epoll (empty: not registered).
    watching: EventSet,
    /// The driver took `VIRTIO_CONSOLE_F_MULTIPORT`: control queues in use.
    multiport: bool,
    /// Control messages for the driver, waiting for its buffers.
    ctrl_out: VecDeque<Vec<u8>>,
    /// Guest output taken out of the ring at a reset, still to be sent.
    tx_backlog: Vec<u8>,
}

impl Console {
    /// A console connected to `stream` (made non-blocking here).
    ///
    /// # Errors
    /// Making the socket non-blocking or creating an eventfd failed.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            acked_features: 0,
            events: QueueEvents::new()?,
            active: None,
            rx_pending: Vec::with_capacity(RX_PENDING_MAX),
            rx_eof: false,
            tx_closed: false,
            tx_inflight: VecDeque::new(),
            watching: EventSet::empty(),
            multiport: false,
            ctrl_out: VecDeque::new(),
            tx_backlog: Vec::new(),
        })
    }

    fn usable(&self) -> bool {
        self.active.as_ref().is_some_and(|a| !a.failed)
    }

    /// Moves what it can: socket to guest, guest to socket; then updates
    /// what the socket is watched for.
    fn run(&mut self, ops: &mut EventOps) {
        self.send_backlog();
        if self.usable() {
            let mut batch = match self.active.as_ref() {
                Some(active) => Batch {
                    used: [false; 4],
                    left: [
                        active.budget(RX),
                        active.budget(TX),
                        active.budget(CTRL_RX),
                        active.budget(CTRL_TX),
                    ],
                    tx_bytes: 0,
                },
                None => return,
            };
            let result = self.transfer(&mut batch);
            if let Some(active) = self.active.as_mut() {
                for (q, _) in batch.used.iter().enumerate().filter(|(_, &u)| u) {
                    active.notify_used(q);
                }
                match result {
                    Err(e) => active.fail(NAME, &e),
                    Ok(()) => {
                        let queues = if self.multiport { 4 } else { 2 };
                        for q in 0..queues {
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

    fn transfer(&mut self, batch: &mut Batch) -> Result<(), DeviceError> {
        if self.multiport {
            self.control(batch)?;
        }
        for _ in 0..RX_ROUNDS {
            let read = self.read_socket();
            let delivered = self.deliver_rx(batch)?;
            if !read && !delivered {
                break;
            }
        }
        self.transmit(batch)
    }

    /// Takes the driver's control messages and answers them, then hands
    /// pending answers to the driver's control receive buffers.
    ///
    /// The handshake: the driver says DEVICE_READY, the device adds port 0;
    /// the driver says PORT_READY, the device names the port and says the
    /// host end is open (until then the guest's writes would block).
    fn control(&mut self, batch: &mut Batch) -> Result<(), DeviceError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        while batch.left[CTRL_TX] > 0 {
            batch.left[CTRL_TX] -= 1;
            let Some((head, bufs)) = active.pop(CTRL_TX, MAX_DESCS)? else {
                break;
            };
            let mut msg = [0u8; CTRL_HEADER];
            let readable = !bufs.iter().any(|b| b.writable) && in_memory(&active.mem, &bufs);
            let n = total_len(&bufs).min(CTRL_HEADER as u64);
            let mut at = 0;
            let read = readable
                && n == CTRL_HEADER as u64
                && for_each_piece(&bufs, 0, n, |addr, k| {
                    active.mem.read_slice(&mut msg[at..at + k], addr)?;
                    at += k;
                    Ok::<(), vm_memory::GuestMemoryError>(())
                })
                .is_ok();
            active.add_used(CTRL_TX, head, 0)?;
            batch.used[CTRL_TX] = true;
            if !read {
                crate::rate_limited!(debug, "virtio-console: unusable control buffer");
                continue;
            }
            let id = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
            let event = u16::from_le_bytes([msg[4], msg[5]]);
            let value = u16::from_le_bytes([msg[6], msg[7]]);
            match (event, id) {
                (DEVICE_READY, _) if value == 1 => {
                    push_ctrl(&mut self.ctrl_out, control_message(0, DEVICE_ADD, 1, b""));
                }
                (PORT_READY, 0) if value == 1 => {
                    push_ctrl(
                        &mut self.ctrl_out,
                        control_message(0, PORT_NAME_EVENT, 1, PORT_NAME.as_bytes()),
                    );
                    push_ctrl(&mut self.ctrl_out, control_message(0, PORT_OPEN, 1, b""));
                }
                // The guest opened or closed the port: nothing to do.
                (PORT_OPEN, 0) => {}
                _ => crate::rate_limited!(
                    debug,
                    "virtio-console: ignored control event {event} for port {id} ({value})"
                ),
            }
        }
        while !self.ctrl_out.is_empty() && batch.left[CTRL_RX] > 0 {
            batch.left[CTRL_RX] -= 1;
            let Some((head, bufs)) = active.pop(CTRL_RX, MAX_DESCS)? else {
                break;
            };
            let Some(msg) = self.ctrl_out.pop_front() else {
                break;
            };
            let mut len = 0;
            let usable = bufs.iter().all(|b| b.writable)
                && in_memory(&active.mem, &bufs)
                && total_len(&bufs) >= msg.len() as u64;
            if usable {
                let mut at = 0;
                let wrote = for_each_piece(&bufs, 0, msg.len() as u64, |addr, k| {
                    active.mem.write_slice(&msg[at..at + k], addr)?;
                    at += k;
                    Ok::<(), vm_memory::GuestMemoryError>(())
                });
                if wrote.is_ok() {
                    len = u32::try_from(at).unwrap_or(0);
                }
            } else {
                crate::rate_limited!(debug, "virtio-console: unusable control receive buffer");
            }
            active.add_used(CTRL_RX, head, len)?;
            batch.used[CTRL_RX] = true;
        }
        Ok(())
    }

    /// Reads from the socket into the pending buffer, while there is room.
    /// Returns whether anything was read.
    fn read_socket(&mut self) -> bool {
        let room = RX_PENDING_MAX.saturating_sub(self.rx_pending.len());
        if self.rx_eof || room == 0 {
            return false;
        }
        let mut buf = [0u8; RX_PENDING_MAX];
        loop {
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    self.rx_eof = true;
                    return false;
                }
                Ok(n) => {
                    self.rx_pending.extend_from_slice(&buf[..n]);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    crate::rate_limited!(warn, "virtio-console: reading the host socket: {e}");
                    self.rx_eof = true;
                    return false;
                }
            }
        }
    }

    /// Delivers pending host bytes into the guest's receive buffers. Returns
    /// whether anything was delivered.
    fn deliver_rx(&mut self, batch: &mut Batch) -> Result<bool, DeviceError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(false);
        };
        let mut delivered = false;
        while !self.rx_pending.is_empty() && batch.left[RX] > 0 {
            batch.left[RX] -= 1;
            let Some((head, bufs)) = active.pop(RX, MAX_DESCS)? else {
                break;
            };
            let mut len = 0;
            if bufs.iter().all(|b| b.writable) && in_memory(&active.mem, &bufs) {
                let n = total_len(&bufs).min(self.rx_pending.len() as u64);
                let mut at = 0;
                let pending = &self.rx_pending;
                let wrote = for_each_piece(&bufs, 0, n, |addr, k| {
                    active.mem.write_slice(&pending[at..at + k], addr)?;
                    at += k;
                    Ok::<(), vm_memory::GuestMemoryError>(())
                });
                if wrote.is_ok() {
                    self.rx_pending.drain(..at);
                    len = u32::try_from(at).unwrap_or(0);
                    delivered = true;
                }
            } else {
                crate::rate_limited!(debug, "virtio-console: unusable receive buffer");
            }
            active.add_used(RX, head, len)?;
            batch.used[RX] = true;
        }
        Ok(delivered)
    }

    /// Sends the guest's transmit buffers to the socket until it would block
    /// or the batch is used up.
    fn transmit(&mut self, batch: &mut Batch) -> Result<(), DeviceError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        if self.tx_closed {
            // Nobody will read what a reset left.
            self.tx_backlog.clear();
        }
        if !self.tx_backlog.is_empty() {
            // What a reset left goes first (it wakes the loop when sent).
            return Ok(());
        }
        // Every way out with notifications off comes back by itself: the
        // socket's OUT event while a chain is in flight. The others turn
        // them on first (an empty ring; a used-up budget, after which the
        // yielded queue event comes back for what is left).
        active.suppress_notifications(TX);
        loop {
            // More of the guest's writes join the ones in flight while one
            // `sendmsg` could still take them.
            let mut queued: u64 = self.tx_inflight.iter().map(|c| c.total - c.sent).sum();
            while queued < TX_SEND_MAX
                && self.tx_inflight.len() < TX_CHAINS_MAX
                && batch.left[TX] > 0
            {
                let Some((head, bufs)) = active.pop(TX, MAX_DESCS)? else {
                    break;
                };
                batch.left[TX] -= 1;
                if bufs.iter().any(|b| b.writable) || !in_memory(&active.mem, &bufs) {
                    crate::rate_limited!(debug, "virtio-console: unusable transmit buffer");
                    active.add_used(TX, head, 0)?;
                    batch.used[TX] = true;
                    continue;
                }
                let total = total_len(&bufs);
                queued += total;
                self.tx_inflight.push_back(TxChain {
                    head,
                    bufs,
                    sent: 0,
                    total,
                });
            }
            // Sent in order, so the finished ones are at the front (an empty
            // chain is finished at once).
            while let Some(chain) = self.tx_inflight.front() {
                if chain.sent < chain.total {
                    break;
                }
                active.add_used(TX, chain.head, 0)?;
                batch.used[TX] = true;
                self.tx_inflight.pop_front();
            }
            if self.tx_inflight.is_empty() {
                // The ring is empty or the budget used up (the yielded queue
                // event then comes back for the rest).
                if active.resume_notifications(TX) && batch.left[TX] > 0 {
                    continue;
                }
                return Ok(());
            }
            if self.tx_closed {
                // Nobody reads any more: the chains go back unsent.
                for chain in &mut self.tx_inflight {
                    chain.sent = chain.total;
                }
                continue;
            }
            if batch.tx_bytes >= TX_BYTES_PER_WAKE {
                // The socket still takes more: it wakes the loop again
                // (watched for OUT while chains are in flight).
                return Ok(());
            }
            match send_chains(&self.stream, &active.mem, &self.tx_inflight) {
                Ok(n) => {
                    batch.tx_bytes += n as u64;
                    let mut left = n as u64;
                    for chain in &mut self.tx_inflight {
                        let k = left.min(chain.total - chain.sent);
                        chain.sent += k;
                        left -= k;
                        if left == 0 {
                            break;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // The first chain's buffer, not the socket: that chain is
                // given back as it is, the port stays open.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    crate::rate_limited!(debug, "virtio-console: unusable transmit buffer: {e}");
                    if let Some(chain) = self.tx_inflight.front_mut() {
                        chain.sent = chain.total;
                    }
                }
                Err(e) => {
                    crate::rate_limited!(debug, "virtio-console: host end closed: {e}");
                    self.tx_closed = true;
                }
            }
        }
    }

    /// Takes what the guest queued and the device has not sent out of the
    /// ring, into [`tx_backlog`](Self::tx_backlog) (bounded), before a reset
    /// forgets the ring. A generic port's writes do not wait for the host, and
    /// Linux resets its devices on its way down: without this a container's
    /// last output and its exit status could be lost. Never blocks (a reset
    /// comes from a vCPU).
    fn stash_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.failed {
            return;
        }
        let mut chains: Vec<(Vec<Buf>, u64, u64)> = Vec::new();
        for chain in self.tx_inflight.drain(..) {
            chains.push((chain.bufs, chain.sent, chain.total));
        }
        for _ in 0..active.budget(TX) {
            match active.pop(TX, MAX_DESCS) {
                Ok(Some((_, bufs))) => {
                    if !bufs.iter().any(|b| b.writable) && in_memory(&active.mem, &bufs) {
                        let total = total_len(&bufs);
                        chains.push((bufs, 0, total));
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        for (bufs, from, total) in chains {
            let room = TX_BACKLOG_MAX.saturating_sub(self.tx_backlog.len()) as u64;
            let n = (total - from).min(room);
            let start = self.tx_backlog.len();
            self.tx_backlog
                .resize(start + usize::try_from(n).unwrap_or(0), 0);
            let mut at = start;
            let backlog = &mut self.tx_backlog;
            let copied = for_each_piece(&bufs, from, n, |addr, k| {
                active.mem.read_slice(&mut backlog[at..at + k], addr)?;
                at += k;
                Ok::<(), vm_memory::GuestMemoryError>(())
            });
            if copied.is_err() {
                backlog.truncate(start);
            }
        }
    }

    /// Sends what it can of the backlog without blocking.
    fn send_backlog(&mut self) {
        while !self.tx_backlog.is_empty() && !self.tx_closed {
            // SAFETY: the buffer is valid for reads of its length and the
            // socket is open for the duration of the call; MSG_NOSIGNAL: a
            // closed peer gives EPIPE, not SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    self.tx_backlog.as_ptr().cast(),
                    self.tx_backlog.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            match usize::try_from(n) {
                Ok(0) => self.tx_closed = true,
                Ok(n) => {
                    self.tx_backlog.drain(..n);
                }
                Err(_) => match io::Error::last_os_error().kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => return,
                    _ => self.tx_closed = true,
                },
            }
        }
    }

    /// At the end (the VM is gone): sends the backlog and what is left in the
    /// ring, waiting for a slow reader, bounded: five seconds in all, half a
    /// second per write.
    fn flush_at_end(&mut self) {
        self.stash_tx();
        if self.tx_backlog.is_empty() || self.tx_closed {
            return;
        }
        let _ = self.stream.set_nonblocking(false);
        let _ = self
            .stream
            .set_write_timeout(Some(std::time::Duration::from_millis(500)));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !self.tx_backlog.is_empty() && !self.tx_closed && std::time::Instant::now() < deadline
        {
            let before = self.tx_backlog.len();
            self.send_backlog();
            if self.tx_backlog.len() == before {
                break;
            }
        }
    }

    fn update_interest(&mut self, ops: &mut EventOps) {
        let mut want = EventSet::empty();
        if self.usable() {
            if !self.rx_eof && self.rx_pending.len() < RX_PENDING_MAX {
                want |= EventSet::IN;
            }
            if !self.tx_inflight.is_empty() && !self.tx_closed {
                want |= EventSet::OUT;
            }
        }
        if !self.tx_backlog.is_empty() && !self.tx_closed {
            want |= EventSet::OUT;
        }
        watch_fd(ops, self.stream.as_raw_fd(), &mut self.watching, want, NAME);
    }
}

/// A `struct virtio_console_control` followed by `extra` (a port's name).
fn control_message(id: u32, event: u16, value: u16, extra: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CTRL_HEADER + extra.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(extra);
    m
}

/// Queues a control message for the driver, unless too many wait already.
fn push_ctrl(out: &mut VecDeque<Vec<u8>>, msg: Vec<u8>) {
    if out.len() < CTRL_PENDING_MAX {
        out.push_back(msg);
    } else {
        crate::rate_limited!(
            debug,
            "virtio-console: control answers dropped (driver not reading)"
        );
    }
}

/// Sends what the socket takes of the rest of `chains` (at most
/// [`TX_SEND_MAX`] bytes, in order) with one `sendmsg` straight from guest
/// memory: their pieces are the message's iovecs, so no copy is made in the
/// VMM and the guest's queued writes (32 KiB each, at most, from Linux)
/// leave in one system call and one wake-up of the reader (it was eight
/// calls of 4 KiB through a bounce buffer per write).
fn send_chains(
    stream: &UnixStream,
    mem: &GuestMemoryMmap,
    chains: &VecDeque<TxChain>,
) -> io::Result<usize> {
    // `mem` is borrowed for the call, so its regions stay mapped; the guards
    // are its plain addresses (they map on demand only under vm-memory's
    // xen feature, which hull does not use). A piece outside guest RAM (the
    // chains were checked, so never) is the guest's fault: InvalidData for
    // the first chain; a later one is left out, to be the first next time.
    let mut guards = Vec::new();
    let mut want = TX_SEND_MAX;
    for (i, chain) in chains.iter().enumerate() {
        if want == 0 || guards.len() == TX_IOVECS_MAX {
            break;
        }
        let before = guards.len();
        let n = (chain.total - chain.sent).min(want);
        let pieces = for_each_piece(&chain.bufs, chain.sent, n, |addr, k| {
            for slice in GuestMemoryBackend::get_slices(mem, addr, k) {
                if guards.len() == TX_IOVECS_MAX {
                    break;
                }
                let slice = slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                guards.push(slice.ptr_guard());
            }
            Ok::<(), io::Error>(())
        });
        if let Err(e) = pieces {
            if i == 0 {
                return Err(e);
            }
            guards.truncate(before);
            break;
        }
        want -= n;
    }
    let mut iov: Vec<libc::iovec> = guards
        .iter()
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast_mut().cast(),
            iov_len: g.len(),
        })
        .collect();
    // SAFETY: all-zero is a valid `msghdr` (no name, no control data; musl's
    // padding fields zeroed too).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    // At most TX_IOVECS_MAX entries: fits the field's type, which differs
    // between libcs (an int on musl, a size_t on glibc).
    #[allow(clippy::useless_conversion)]
    let iovlen = iov.len().try_into();
    msg.msg_iovlen = iovlen.map_err(|_| io::Error::other("too many pieces for one sendmsg"))?;
    // SAFETY: each iovec points into guest RAM that `mem` keeps mapped (it
    // is borrowed for this whole call), valid for reads of its length; the
    // kernel only reads them (the guest may change the bytes meanwhile,
    // which only changes what it sends). The socket is open for the call.
    // MSG_NOSIGNAL: a closed peer gives EPIPE, not SIGPIPE.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    match usize::try_from(n) {
        // Nothing sent of a non-empty rest (a chain's rest is never empty).
        Ok(0) => Err(io::ErrorKind::WriteZero.into()),
        Ok(n) => Ok(n),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // Port 0's pair and, used with multiport only, the control pair.
        &[QUEUE_SIZE, TX_QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1 | F_MULTIPORT
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & (FEATURE_VERSION_1 | F_MULTIPORT);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&CONFIG, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::rate_limited!(debug, "virtio-console: ignored config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError> {
        // Without multiport only port 0's pair is used (a transport may
        // still hand over the unused control queues).
        self.multiport = self.acked_features & F_MULTIPORT != 0;
        let mut queues = queues;
        let expected = if self.multiport { 4 } else { 2 };
        if !self.multiport && queues.len() > expected {
            queues.truncate(expected);
        }
        let (active, notify) = Active::new(mem, interrupt, queues, expected)?;
        self.active = Some(active);
        self.events.activated(notify)
    }

    fn reset(&mut self) {
        self.stash_tx();
        self.send_backlog();
        self.active = None;
        self.tx_inflight.clear();
        self.multiport = false;
        self.ctrl_out.clear();
        self.acked_features = 0;
        self.events.reset();
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush_at_end();
    }
}

impl MutEventSubscriber for Console {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.events.is_activate(&events) {
            self.events.sync(ops, NAME);
        } else if events.fd() == self.stream.as_raw_fd() {
            let set = events.event_set();
            if set.contains(EventSet::ERROR) {
                crate::rate_limited!(warn, "virtio-console: the host socket failed");
                self.rx_eof = true;
                self.tx_closed = true;
            } else if set.contains(EventSet::HANG_UP) {
                // The peer is gone: nothing it would read, so stop sending;
                // what it wrote before can still be read (up to EOF).
                self.tx_closed = true;
            }
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
mod tests {
    use super::*;
    use crate::virtio::test_utils::{Harness, DATA, WRITE as W};
    use std::io::Write;
    use vm_memory::GuestAddress;

    fn console() -> (Harness<Console>, UnixStream) {
        console_with(&[16, 16])
    }

    fn console_with(sizes: &[u16]) -> (Harness<Console>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let h = Harness::new(Console::new(ours).unwrap(), sizes);
        (h, theirs)
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

    #[test]
    fn guest_output_reaches_the_host() {
        let (mut h, mut peer) = console();
        h.mem.write_slice(b"hello ", GuestAddress(DATA)).unwrap();
        h.mem
            .write_slice(b"world", GuestAddress(DATA + 0x100))
            .unwrap();
        h.add_chain(TX, &[(DATA, 6, 0), (DATA + 0x100, 5, 0)]);
        h.notify(TX);
        assert_eq!(drain(&mut peer), b"hello world");
        assert_eq!(h.used(TX), vec![(0, 0)]);
        assert!(h.take_irq());
    }

    #[test]
    fn a_write_across_buffers_and_memory_regions_arrives_whole_and_in_order() {
        // Two regions meeting at `edge`: one buffer straddles them (sent
        // from both mappings), and the chain has more pieces after it.
        let edge = crate::virtio::test_utils::MEM_SIZE as u64 / 2;
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), edge as usize),
            (GuestAddress(edge), edge as usize),
        ])
        .unwrap();
        let (ours, mut peer) = UnixStream::pair().unwrap();
        peer.set_nonblocking(true).unwrap();
        let mut h = Harness::with_memory(Console::new(ours).unwrap(), &[16, 16], mem);
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
        let (a, b, c) = (&data[..10_000], &data[10_000..30_000], &data[30_000..]);
        let b_at = edge - 5000;
        h.mem.write_slice(a, GuestAddress(DATA)).unwrap();
        h.mem.write_slice(b, GuestAddress(b_at)).unwrap();
        h.mem.write_slice(c, GuestAddress(DATA + 0x4000)).unwrap();
        h.add_chain(
            TX,
            &[
                (DATA, 10_000, 0),
                (b_at, 20_000, 0),
                (DATA + 0x4000, 10_000, 0),
            ],
        );
        h.notify(TX);
        assert_eq!(drain(&mut peer), data);
        assert_eq!(h.used(TX), vec![(0, 0)]);
    }

    #[test]
    fn host_input_reaches_the_guest() {
        let (mut h, mut peer) = console();
        h.add_chain(RX, &[(DATA, 4, W)]);
        h.add_chain(RX, &[(DATA + 0x100, 64, W)]);
        h.notify(RX);
        assert!(h.used(RX).is_empty());
        peer.write_all(b"abcdefg").unwrap();
        h.pump();
        assert_eq!(h.used(RX), vec![(0, 4), (1, 3)]);
        let mut got = [0u8; 4];
        h.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(&got, b"abcd");
        h.mem
            .read_slice(&mut got[..3], GuestAddress(DATA + 0x100))
            .unwrap();
        assert_eq!(&got[..3], b"efg");
    }

    #[test]
    fn input_waits_for_receive_buffers_without_unbounded_buffering() {
        let (mut h, mut peer) = console();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&data).unwrap();
        // No receive buffers: the device reads a bounded amount and goes idle
        // (pump() panics if the loop spins).
        h.pump();
        assert!(h.dev.lock().unwrap().rx_pending.len() <= RX_PENDING_MAX);
        assert_eq!(h.dev.lock().unwrap().watching, EventSet::empty());

        let mut got = Vec::new();
        for i in 0..8u64 {
            h.add_chain(RX, &[(DATA + i * 0x2000, 0x2000, W)]);
            h.notify(RX);
        }
        for (head, len) in h.used(RX) {
            let addr = DATA + u64::from(head) * 0x2000;
            let mut buf = vec![0u8; len as usize];
            h.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            got.extend_from_slice(&buf);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn output_waits_for_the_host_to_read() {
        let (mut h, mut peer) = console();
        let chunk = 0x4_0000u32;
        for i in 0..4u8 {
            let addr = DATA + u64::from(i) * u64::from(chunk);
            h.mem
                .write_slice(&vec![i + 1; chunk as usize], GuestAddress(addr))
                .unwrap();
            h.add_chain(TX, &[(addr, chunk, 0)]);
        }
        h.notify(TX);
        // The socket buffer is far smaller than 1 MiB: some chains wait.
        assert!(h.used(TX).len() < 4);
        assert!(!h.dev.lock().unwrap().tx_inflight.is_empty());
        let mut got = Vec::new();
        for _ in 0..1000 {
            got.extend(drain(&mut peer));
            h.pump();
            if h.used(TX).len() == 4 {
                break;
            }
        }
        got.extend(drain(&mut peer));
        assert_eq!(h.used(TX).len(), 4);
        assert_eq!(got.len(), 4 * chunk as usize);
        assert!(got[..chunk as usize].iter().all(|&b| b == 1));
        assert!(got[3 * chunk as usize..].iter().all(|&b| b == 4));
    }

    #[test]
    fn host_end_closed() {
        let (mut h, peer) = console();
        h.add_chain(RX, &[(DATA + 0x8000, 64, W)]);
        h.notify(RX);
        drop(peer);
        // Hang-up: the socket leaves epoll instead of waking the loop forever.
        h.pump();
        assert_eq!(h.dev.lock().unwrap().watching, EventSet::empty());
        // Guest output is consumed (and dropped) so the guest never blocks.
        h.mem.write_slice(b"anyone?", GuestAddress(DATA)).unwrap();
        h.add_chain(TX, &[(DATA, 7, 0)]);
        h.notify(TX);
        assert_eq!(h.used(TX), vec![(0, 0)]);
        assert!(h.used(RX).is_empty());
        assert!(!h.needs_reset());
    }

    #[test]
    fn a_ring_kept_full_gets_a_queue_worth_per_wake_up() {
        let (mut h, peer) = console_with(&[QUEUE_SIZE, TX_QUEUE_SIZE]);
        // The host end is gone: output is discarded as fast as it comes.
        drop(peer);
        h.pump();
        let guest = h.full_ring_guest(TX, |i| (DATA + u64::from(i) * 0x100, 64, 0), 50_000);
        h.assert_bounded_while_kept_full(TX, guest);
    }

    #[test]
    fn receive_buffers_kept_full_get_a_queue_worth_per_wake_up() {
        let (mut h, mut peer) = console_with(&[QUEUE_SIZE, TX_QUEUE_SIZE]);
        peer.write_all(b"pending input").unwrap();
        // Read now, so the guest's notifications are the only events.
        h.pump();
        assert!(!h.dev.lock().unwrap().rx_pending.is_empty());
        // Device-readable receive buffers: each is returned empty and the
        // input keeps waiting for a good one.
        let guest = h.full_ring_guest(RX, |i| (DATA + u64::from(i) * 0x100, 64, 0), 50_000);
        h.assert_bounded_while_kept_full(RX, guest);
    }

    #[test]
    fn host_closes_while_output_is_blocked() {
        let (mut h, peer) = console();
        let len = 0x10_0000u32;
        h.add_chain(TX, &[(DATA, len, 0)]);
        h.notify(TX);
        assert!(h.used(TX).is_empty());
        drop(peer);
        h.pump();
        assert_eq!(h.used(TX), vec![(0, 0)]);
        assert_eq!(h.dev.lock().unwrap().watching, EventSet::empty());
    }

    #[test]
    fn a_host_gone_while_a_reset_left_output_unsent_does_not_stall_the_guest() {
        let (mut h, peer) = console();
        h.add_chain(TX, &[(DATA, 0x10_0000, 0)]);
        h.notify(TX);
        // The socket is full: the reset keeps the rest, unsent.
        h.reset();
        assert!(!h.dev.lock().unwrap().tx_backlog.is_empty());
        drop(peer);
        h.activate_again(&[16, 16]);
        h.pump();
        h.add_chain(TX, &[(DATA, 8, 0)]);
        h.notify(TX);
        // Given back unsent, not left in the ring for good.
        assert_eq!(h.used(TX), vec![(0, 0)]);
    }

    #[test]
    fn queued_writes_leave_together_in_order_around_bad_and_empty_ones() {
        let (mut h, mut peer) = console();
        h.mem.write_slice(b"one ", GuestAddress(DATA)).unwrap();
        h.mem
            .write_slice(b"two", GuestAddress(DATA + 0x100))
            .unwrap();
        h.add_chain(TX, &[(DATA, 4, 0)]);
        h.add_chain(TX, &[(1 << 40, 8, 0)]);
        h.add_chain(TX, &[(DATA + 0x200, 0, 0)]);
        h.add_chain(TX, &[(DATA + 0x100, 3, 0)]);
        h.notify(TX);
        assert_eq!(drain(&mut peer), b"one two");
        let mut used = h.used(TX);
        used.sort_unstable();
        assert_eq!(used, vec![(0, 0), (1, 0), (2, 0), (3, 0)]);
        assert!(h.dev.lock().unwrap().tx_inflight.is_empty());
        assert!(!h.needs_reset());
    }

    #[test]
    fn bad_buffers_are_returned_empty() {
        let (mut h, mut peer) = console();
        // A device-writable transmit buffer and one outside guest memory.
        h.add_chain(TX, &[(DATA, 8, W)]);
        h.add_chain(TX, &[(1 << 40, 8, 0)]);
        h.notify(TX);
        assert_eq!(h.used(TX), vec![(0, 0), (1, 0)]);
        assert!(drain(&mut peer).is_empty());
        // A device-readable receive buffer gets nothing; the bytes wait for a
        // good one.
        peer.write_all(b"xy").unwrap();
        h.add_chain(RX, &[(DATA, 8, 0)]);
        h.add_chain(RX, &[(DATA + 0x100, 8, W)]);
        h.notify(RX);
        assert_eq!(h.used(RX), vec![(0, 0), (1, 2)]);
        assert!(!h.needs_reset());
    }

    #[test]
    fn reset_stops_watching_the_socket() {
        let (mut h, mut peer) = console();
        assert_eq!(h.dev.lock().unwrap().watching, EventSet::IN);
        h.reset();
        assert_eq!(h.dev.lock().unwrap().watching, EventSet::empty());
        peer.write_all(b"later").unwrap();
        h.pump();
        h.activate_again(&[16, 16]);
        h.add_chain(RX, &[(DATA, 16, W)]);
        h.notify(RX);
        assert_eq!(h.used(RX), vec![(0, 5)]);
    }

    fn multiport_console() -> (Harness<Console>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let mut dev = Console::new(ours).unwrap();
        assert_ne!(dev.avail_features() & F_MULTIPORT, 0);
        dev.ack_features(FEATURE_VERSION_1 | F_MULTIPORT);
        (Harness::new(dev, &[16, 16, 16, 16]), theirs)
    }

    /// The driver's control message at `at`, on the control transmitq.
    fn send_control(h: &mut Harness<Console>, at: u64, event: u16, value: u16) {
        h.mem
            .write_slice(&control_message(0, event, value, b""), GuestAddress(at))
            .unwrap();
        h.add_chain(CTRL_TX, &[(at, 8, 0)]);
        h.notify(CTRL_TX);
    }

    fn control_answer(h: &Harness<Console>, n: usize) -> (u32, u16, u16, Vec<u8>) {
        let (head, len) = h.used(CTRL_RX)[n];
        let mut buf = vec![0u8; len as usize];
        h.mem
            .read_slice(&mut buf, GuestAddress(DATA + 0x1000 * u64::from(head)))
            .unwrap();
        (
            u32::from_le_bytes(buf[0..4].try_into().unwrap()),
            u16::from_le_bytes(buf[4..6].try_into().unwrap()),
            u16::from_le_bytes(buf[6..8].try_into().unwrap()),
            buf[8..].to_vec(),
        )
    }

    #[test]
    fn multiport_handshake_names_port_zero_and_opens_it() {
        let (mut h, mut peer) = multiport_console();
        for i in 0..4u64 {
            h.add_chain(CTRL_RX, &[(DATA + 0x1000 * i, 64, W)]);
        }
        h.notify(CTRL_RX);
        send_control(&mut h, DATA + 0x8000, DEVICE_READY, 1);
        assert_eq!(control_answer(&h, 0), (0, DEVICE_ADD, 1, Vec::new()));
        send_control(&mut h, DATA + 0x8100, PORT_READY, 1);
        assert_eq!(
            control_answer(&h, 1),
            (0, PORT_NAME_EVENT, 1, PORT_NAME.as_bytes().to_vec())
        );
        assert_eq!(control_answer(&h, 2), (0, PORT_OPEN, 1, Vec::new()));
        assert_eq!(h.used(CTRL_TX).len(), 2);
        // The guest opening the port needs no answer; port 0 carries data.
        send_control(&mut h, DATA + 0x8200, PORT_OPEN, 1);
        assert_eq!(h.used(CTRL_RX).len(), 3);
        h.mem
            .write_slice(b"frame", GuestAddress(DATA + 0x9000))
            .unwrap();
        h.add_chain(TX, &[(DATA + 0x9000, 5, 0)]);
        h.notify(TX);
        assert_eq!(drain(&mut peer), b"frame");
    }

    #[test]
    fn a_driver_flooding_the_control_queue_gets_bounded_answers() {
        let (mut h, _peer) = multiport_console();
        // No control receive buffers: answers wait, at most CTRL_PENDING_MAX.
        for i in 0..12u64 {
            send_control(&mut h, DATA + 0x100 * i, DEVICE_READY, 1);
        }
        assert_eq!(h.used(CTRL_TX).len(), 12);
        assert_eq!(h.dev.lock().unwrap().ctrl_out.len(), CTRL_PENDING_MAX);
        // A short message or a writable one is consumed and ignored.
        h.add_chain(CTRL_TX, &[(DATA, 4, 0)]);
        h.add_chain(CTRL_TX, &[(DATA, 8, W)]);
        h.notify(CTRL_TX);
        assert_eq!(h.used(CTRL_TX).len(), 14);
        assert!(!h.needs_reset());
    }

    #[test]
    fn a_driver_honouring_no_notify_is_never_left_waiting() {
        let (mut h, mut peer) = multiport_console();
        h.mem.write_slice(b"x", GuestAddress(DATA)).unwrap();
        // A full ring served in one wake-up (its whole budget), then more
        // chains: the device must have turned notifications back on.
        for _ in 0..TX_QUEUE_SIZE {
            h.add_chain(TX, &[(DATA, 1, 0)]);
        }
        h.notify(TX);
        assert_eq!(drain(&mut peer).len(), usize::from(TX_QUEUE_SIZE));
        for _ in 0..4 {
            h.add_chain(TX, &[(DATA, 1, 0)]);
            h.notify_if_wanted(TX);
        }
        assert_eq!(drain(&mut peer).len(), 4);
    }

    #[test]
    fn output_queued_before_a_device_reset_still_reaches_the_host() {
        let (mut h, mut peer) = multiport_console();
        h.mem.write_slice(b"exited 0", GuestAddress(DATA)).unwrap();
        // Linux resets its virtio devices on the way down, maybe before the
        // event loop served the last write.
        h.add_chain(TX, &[(DATA, 8, 0)]);
        h.reset();
        assert_eq!(drain(&mut peer), b"exited 0");
    }

    #[test]
    fn output_queued_just_before_the_end_still_reaches_the_host() {
        let (mut h, mut peer) = multiport_console();
        h.mem
            .write_slice(b"last frame", GuestAddress(DATA))
            .unwrap();
        // Queued, but the VM ended before the event loop served it.
        h.add_chain(TX, &[(DATA, 10, 0)]);
        drop(h);
        assert_eq!(drain(&mut peer), b"last frame");
    }
}

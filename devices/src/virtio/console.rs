//! virtio-console with a single port (the guest's `/dev/hvc0`), backed by a
//! host Unix stream socket.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::chain::{for_each_piece, in_memory, total_len, Buf};
use super::{
    read_config_bytes, ActivateError, Active, DeviceError, DeviceQueue, Interrupt, QueueEvents,
    VirtioDevice, FEATURE_VERSION_1,
};

const NAME: &str = "console";
/// receiveq (host to guest) and transmitq (guest to host) of port 0.
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
const MAX_DESCS: usize = 64;
/// Host bytes read but not yet delivered to the guest, at most.
const RX_PENDING_MAX: usize = 4096;
/// Bytes moved from guest memory to the socket per `send`.
const TX_CHUNK: usize = 4096;
/// Read/deliver rounds per wake-up; the level-triggered loop comes back for more.
const RX_ROUNDS: usize = 16;
/// `struct virtio_console_config`: cols, rows, max_nr_ports, emerg_wr (unused:
/// no feature is offered that makes the guest read it).
const CONFIG: [u8; 12] = [0; 12];

/// Guest output bytes sent per wake-up at most.
const TX_BYTES_PER_WAKE: u64 = 1 << 20;

/// What one wake-up did and may still do.
#[derive(Debug)]
struct Batch {
    /// Queues whose used ring got entries.
    used: [bool; 2],
    /// Chains each queue may still give.
    left: [usize; 2],
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

/// A virtio-console device: what the guest writes to its `/dev/hvc0` goes to
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
    tx_inflight: Option<TxChain>,
    /// What the socket is registered for in epoll (empty: not registered).
    watching: EventSet,
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
            tx_inflight: None,
            watching: EventSet::empty(),
        })
    }

    fn usable(&self) -> bool {
        self.active.as_ref().is_some_and(|a| !a.failed)
    }

    /// Moves what it can: socket to guest, guest to socket; then updates
    /// what the socket is watched for.
    fn run(&mut self, ops: &mut EventOps) {
        if self.usable() {
            let mut batch = match self.active.as_ref() {
                Some(active) => Batch {
                    used: [false; 2],
                    left: [active.budget(RX), active.budget(TX)],
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

    fn transfer(&mut self, batch: &mut Batch) -> Result<(), DeviceError> {
        for _ in 0..RX_ROUNDS {
            let read = self.read_socket();
            let delivered = self.deliver_rx(batch)?;
            if !read && !delivered {
                break;
            }
        }
        self.transmit(batch)
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
        loop {
            let mut chain = match self.tx_inflight.take() {
                Some(chain) => chain,
                None => {
                    if batch.left[TX] == 0 {
                        return Ok(());
                    }
                    batch.left[TX] -= 1;
                    let Some((head, bufs)) = active.pop(TX, MAX_DESCS)? else {
                        return Ok(());
                    };
                    if bufs.iter().any(|b| b.writable) || !in_memory(&active.mem, &bufs) {
                        crate::rate_limited!(debug, "virtio-console: unusable transmit buffer");
                        active.add_used(TX, head, 0)?;
                        batch.used[TX] = true;
                        continue;
                    }
                    let total = total_len(&bufs);
                    TxChain {
                        head,
                        bufs,
                        sent: 0,
                        total,
                    }
                }
            };
            while !self.tx_closed && chain.sent < chain.total {
                if batch.tx_bytes >= TX_BYTES_PER_WAKE {
                    // The socket still takes more: it wakes the loop again
                    // (watched for OUT while a chain is in flight).
                    self.tx_inflight = Some(chain);
                    return Ok(());
                }
                match send_chunk(&self.stream, &active.mem, &chain) {
                    Ok(n) => {
                        chain.sent += n as u64;
                        batch.tx_bytes += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.tx_inflight = Some(chain);
                        return Ok(());
                    }
                    Err(e) => {
                        crate::rate_limited!(debug, "virtio-console: host end closed: {e}");
                        self.tx_closed = true;
                    }
                }
            }
            active.add_used(TX, chain.head, 0)?;
            batch.used[TX] = true;
        }
    }

    fn update_interest(&mut self, ops: &mut EventOps) {
        let mut want = EventSet::empty();
        if self.usable() {
            if !self.rx_eof && self.rx_pending.len() < RX_PENDING_MAX {
                want |= EventSet::IN;
            }
            if self.tx_inflight.is_some() && !self.tx_closed {
                want |= EventSet::OUT;
            }
        }
        if want == self.watching {
            return;
        }
        let fd = self.stream.as_raw_fd();
        let result = if want.is_empty() {
            ops.remove(Events::empty_raw(fd))
        } else if self.watching.is_empty() {
            ops.add(Events::new_raw(fd, want))
        } else {
            ops.modify(Events::new_raw(fd, want))
        };
        match result {
            Ok(()) => self.watching = want,
            Err(e) => {
                crate::rate_limited!(warn, "virtio-console: cannot watch the host socket: {e:?}");
            }
        }
    }
}

/// Sends the next piece (at most [`TX_CHUNK`] bytes) of `chain`.
fn send_chunk(stream: &UnixStream, mem: &GuestMemoryMmap, chain: &TxChain) -> io::Result<usize> {
    let mut chunk = [0u8; TX_CHUNK];
    let want = (chain.total - chain.sent).min(TX_CHUNK as u64);
    let mut at = 0;
    for_each_piece(&chain.bufs, chain.sent, want, |addr, k| {
        mem.read_slice(&mut chunk[at..at + k], addr)
            .map_err(io::Error::other)?;
        at += k;
        Ok::<(), io::Error>(())
    })?;
    let data = &chunk[..at];
    // SAFETY: `data` is valid for reads of `data.len()` bytes and the socket
    // is open for the duration of the call. MSG_NOSIGNAL: a closed peer gives
    // EPIPE, not SIGPIPE.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    match usize::try_from(n) {
        Ok(0) if !data.is_empty() => Err(io::ErrorKind::WriteZero.into()),
        Ok(n) => Ok(n),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & FEATURE_VERSION_1;
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
        let (active, notify) = Active::new(mem, interrupt, queues, 2)?;
        self.active = Some(active);
        self.events.activated(notify)
    }

    fn reset(&mut self) {
        self.active = None;
        self.tx_inflight = None;
        self.acked_features = 0;
        self.events.reset();
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
        assert!(h.dev.lock().unwrap().tx_inflight.is_some());
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
        let (mut h, peer) = console_with(&[QUEUE_SIZE, QUEUE_SIZE]);
        // The host end is gone: output is discarded as fast as it comes.
        drop(peer);
        h.pump();
        let guest = h.full_ring_guest(TX, |i| (DATA + u64::from(i) * 0x100, 64, 0), 50_000);
        h.assert_bounded_while_kept_full(TX, guest);
    }

    #[test]
    fn receive_buffers_kept_full_get_a_queue_worth_per_wake_up() {
        let (mut h, mut peer) = console_with(&[QUEUE_SIZE, QUEUE_SIZE]);
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
}

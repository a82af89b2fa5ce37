//! A hostile guest driving one virtio device through its virtio-mmio
//! registers ([`MmioTransport`], as the vCPU threads reach it) and guest
//! memory, with the device's event loop ([`EventManager`]) run in between,
//! as the VMM runs it.
//!
//! The input is a program of [operations](op): the usual driver set-up
//! (feature negotiation, queue set-up, `DRIVER_OK`) with fuzzed choices, raw
//! register reads and writes (configuration space included), descriptor
//! chains offered through [`Rings`] (the unit tests' driver), raw descriptor,
//! available ring and memory writes, notifications, a reset, and the host end
//! of the device (socket) sending, reading or closing.
//!
//! Oracle, besides "no panic, no unbounded allocation":
//! - every run of the event loop gets idle within [`MAX_WAKEUPS`] wake-ups
//!   once the guest and the host stop doing anything (no spinning; that a
//!   wake-up serves at most a queue's worth of chains needs a driver that
//!   refills the ring meanwhile: the unit tests' `full_ring_guest`);
//! - the device writes guest memory only inside the used rings and the
//!   device-writable buffers of descriptors the driver wrote (no write out
//!   of bounds), unless one of those buffers overlaps descriptors (then the
//!   device may rightly follow descriptors it wrote itself).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use devices::virtio::net::{Net, StreamBackend};
use devices::virtio::test_utils::{
    avail_ring, desc_table, used_ring, Rings, DATA, INDIRECT, NEXT, WRITE,
};
use devices::virtio::{Block, Console, MmioTransport, Rng, VirtioDevice};
use devices::BusDevice;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Encoder, Input};

/// Guest RAM: the rings of [`Rings`] at the bottom, a hole, then two
/// adjacent regions where buffers go (a buffer may straddle them), then a
/// hole again.
const REGIONS: [(u64, usize); 3] = [(0, 0x4_4000), (DATA, 0x8000), (DATA + 0x8000, 0x8000)];

/// Wake-ups of the event loop after which a device with nothing new to do
/// must be idle.
pub const MAX_WAKEUPS: usize = 1000;

/// Bytes of a used ring: flags, idx, the elements and `avail_event`.
fn used_ring_len(size: u16) -> u64 {
    6 + 8 * u64::from(size)
}

/// The device under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blk,
    Net,
    Console,
    Rng,
}

/// The operations of a program (the first byte of each, modulo [`op::COUNT`]).
pub mod op {
    /// The driver's set-up: flags (u8: 1 no VERSION_1, 2 accept unoffered
    /// features, 4 << q leave queue q unready), a mask of offered features
    /// to refuse (u64), then per queue a size choice (u8: 0 the maximum,
    /// below 0x80 the maximum >> n % 9, else that raw size).
    pub const SETUP: u8 = 0;
    /// A chain offered on a queue: queue (u8), count-1 (u8 % 8), then per
    /// buffer an address, a length, flags (u8) and up to 63 bytes written
    /// at the address (u8 count, then the bytes).
    pub const CHAIN: u8 = 1;
    /// An indirect chain: queue (u8), the table's address, count-1 (u8 %
    /// 8), then per buffer an address, a length and flags (u8); the table
    /// is written at its address and offered as one `INDIRECT` descriptor.
    pub const INDIRECT_CHAIN: u8 = 2;
    /// A raw descriptor: queue (u8), index (u16), address, length (u32),
    /// flags (u16), next (u16).
    pub const RAW_DESC: u8 = 3;
    /// A head put on the available ring: queue (u8), head (u16).
    pub const PUSH_AVAIL: u8 = 4;
    /// The available ring's index: queue (u8), index (u16).
    pub const AVAIL_IDX: u8 = 5;
    /// Guest memory: an address, a count (u8), the bytes.
    pub const MEMORY: u8 = 6;
    /// A register or configuration write: offset (u8), width (u8), value (u64).
    pub const MMIO_WRITE: u8 = 7;
    /// A register or configuration read: offset (u8), width (u8).
    pub const MMIO_READ: u8 = 8;
    /// `QueueNotify` (u8: the queue; past the last is a bad one), then the
    /// event loop runs.
    pub const NOTIFY: u8 = 9;
    /// The event loop runs.
    pub const RUN: u8 = 10;
    /// The host end sends: flags (u8: 1 prefix a frame length, for net),
    /// count (u16 % 4096), the bytes.
    pub const HOST_SEND: u8 = 11;
    /// The host end reads all it can.
    pub const HOST_RECV: u8 = 12;
    /// The host end shuts down (u8: 0 read, 1 write, else both).
    pub const HOST_SHUTDOWN: u8 = 13;
    /// `Status` = 0: the driver resets the device.
    pub const RESET: u8 = 14;
    /// The driver reads `InterruptStatus` and acknowledges it.
    pub const ACK: u8 = 15;
    pub const COUNT: u8 = 16;
}

/// Runs one fuzz input against a device of `kind`.
///
/// # Panics
/// When the device breaks the oracle (see the [module documentation](self)),
/// or the harness cannot set itself up.
pub fn run(kind: Kind, data: &[u8]) {
    let mut input = Input::new(data);
    match kind {
        Kind::Blk => {
            let how = input.u8();
            let len = 0x1_0000 + u64::from(how >> 2);
            let dev = if how & 2 == 0 {
                Block::new(memfd(len), how & 1 != 0, "hull-fuzz").unwrap()
            } else {
                // A concatenation of files of odd sizes (read-only).
                let files = vec![memfd(len), memfd(3), memfd(1000)];
                Block::new_concat(files, "hull-fuzz").unwrap().0
            };
            Driver::new(dev, None).run(&mut input);
        }
        Kind::Net => {
            let mtu = input.u16();
            let (ours, theirs) = UnixStream::pair().unwrap();
            let backend = StreamBackend::new(ours).unwrap();
            let dev = Net::new(Box::new(backend), [2, 0, 0, 0, 0, 1], mtu).unwrap();
            Driver::new(dev, Some(theirs)).run(&mut input);
        }
        Kind::Console => {
            let (ours, theirs) = UnixStream::pair().unwrap();
            Driver::new(Console::new(ours).unwrap(), Some(theirs)).run(&mut input);
        }
        Kind::Rng => Driver::new(Rng::new().unwrap(), None).run(&mut input),
    }
}

/// An anonymous file of `len` zero bytes (a disk).
fn memfd(len: u64) -> File {
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hull-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

/// An address: mostly in the data regions, sometimes anywhere.
fn addr(input: &mut Input) -> u64 {
    match input.u8() >> 5 {
        0..=5 => DATA + u64::from(input.u16()),
        6 => u64::from(input.u32()),
        _ => input.u64(),
    }
}

/// A buffer length: mostly small.
fn len(input: &mut Input) -> u32 {
    match input.u16() {
        u16::MAX => input.u32(),
        l => u32::from(l),
    }
}

/// What the driver wrote to a queue's address registers, as the transport
/// took it (writes outside queue set-up are ignored there, and here).
#[derive(Debug, Default, Clone, Copy)]
struct QueueRegs {
    /// desc, avail, used; low then high halves.
    halves: [u32; 6],
}

impl QueueRegs {
    fn get(&self, which: usize) -> u64 {
        u64::from(self.halves[2 * which]) | u64::from(self.halves[2 * which + 1]) << 32
    }
}

/// Guest memory and snapshot buffers of the last input, for the next one
/// (mapping and faulting them in each time costs more than the device's work).
type Pooled = (GuestMemoryMmap, Vec<Vec<u8>>, Vec<Vec<u8>>);

thread_local! {
    static POOL: std::cell::RefCell<Option<Pooled>> = const { std::cell::RefCell::new(None) };
}

struct Driver<D: VirtioDevice + MutEventSubscriber + 'static> {
    mem: GuestMemoryMmap,
    transport: MmioTransport,
    manager: EventManager<Arc<Mutex<D>>>,
    peer: Option<UnixStream>,
    max_sizes: Vec<u16>,
    rings: Option<Rings>,
    queue_sel: u32,
    regs: Vec<QueueRegs>,
    /// Every descriptor table and used ring address a queue ever had.
    tables: BTreeSet<u64>,
    used_rings: BTreeSet<u64>,
    /// Guest memory the device may write: `(start, end)`, used rings and
    /// device-writable buffers of every descriptor seen in a table.
    writable: BTreeSet<(u64, u64)>,
    /// Guest memory holding descriptors (tables, indirect tables): `(start, end)`.
    descriptor_memory: BTreeSet<(u64, u64)>,
    /// Guest memory before and after a run of the event loop.
    before: Vec<Vec<u8>>,
    after: Vec<Vec<u8>>,
}

impl<D: VirtioDevice + MutEventSubscriber + 'static> Driver<D> {
    fn new(dev: D, peer: Option<UnixStream>) -> Self {
        let max_sizes = dev.queue_max_sizes().to_vec();
        let (mem, before, after) =
            POOL.with(|pool| pool.borrow_mut().take())
                .unwrap_or_else(|| {
                    let mem = GuestMemoryMmap::from_ranges(
                        &REGIONS.map(|(start, len)| (GuestAddress(start), len)),
                    )
                    .unwrap();
                    let buffers = || REGIONS.iter().map(|&(_, len)| vec![0; len]).collect();
                    (mem, buffers(), buffers())
                });
        let dev = Arc::new(Mutex::new(dev));
        let mut manager = EventManager::<Arc<Mutex<D>>>::new().unwrap();
        manager.add_subscriber(dev.clone());
        let transport = MmioTransport::new(mem.clone(), dev).unwrap();
        if let Some(peer) = &peer {
            peer.set_nonblocking(true).unwrap();
        }
        let queues = max_sizes.len();
        Self {
            mem,
            transport,
            manager,
            peer,
            max_sizes,
            rings: None,
            queue_sel: 0,
            regs: vec![QueueRegs::default(); queues],
            tables: BTreeSet::new(),
            used_rings: BTreeSet::new(),
            writable: BTreeSet::new(),
            descriptor_memory: BTreeSet::new(),
            before,
            after,
        }
    }

    fn run(&mut self, input: &mut Input) {
        self.pump();
        while !input.is_empty() {
            match input.u8() % op::COUNT {
                op::SETUP => self.setup(input),
                op::CHAIN => self.chain(input),
                op::INDIRECT_CHAIN => self.indirect_chain(input),
                op::RAW_DESC => {
                    let q = self.queue(input);
                    let index = input.u16();
                    let (a, l) = (addr(input), input.u32());
                    let (flags, next) = (input.u16(), input.u16());
                    let at = desc_table(q) + 16 * u64::from(index % 256);
                    let mut d = [0u8; 16];
                    d[..8].copy_from_slice(&a.to_le_bytes());
                    d[8..12].copy_from_slice(&l.to_le_bytes());
                    d[12..14].copy_from_slice(&flags.to_le_bytes());
                    d[14..].copy_from_slice(&next.to_le_bytes());
                    self.mem.write_slice(&d, GuestAddress(at)).unwrap();
                }
                op::PUSH_AVAIL => {
                    let q = self.queue(input);
                    let head = input.u16();
                    if let Some(rings) = &mut self.rings {
                        if q < rings.sizes().len() {
                            rings.push_avail(&self.mem, q, head);
                        }
                    }
                }
                op::AVAIL_IDX => {
                    let q = self.queue(input);
                    Rings::set_avail_idx(&self.mem, q, input.u16());
                }
                op::MEMORY => {
                    let at = addr(input);
                    let n = usize::from(input.u8());
                    let _ = self.mem.write_slice(input.bytes(n), GuestAddress(at));
                }
                op::MMIO_WRITE => {
                    let (offset, width) = (mmio_offset(input), width(input));
                    let value = input.u64().to_le_bytes();
                    self.mmio_write(offset, &value[..width]);
                }
                op::MMIO_READ => {
                    let (offset, width) = (mmio_offset(input), width(input));
                    let mut out = [0u8; 8];
                    self.transport.read(offset, &mut out[..width]);
                }
                op::NOTIFY => {
                    let queues = u32::try_from(self.max_sizes.len()).unwrap_or(0);
                    let q = u32::from(input.u8()) % (queues + 1);
                    self.write_reg(VIRTIO_MMIO_QUEUE_NOTIFY, q);
                    self.pump();
                }
                op::RUN => self.pump(),
                op::HOST_SEND => self.host_send(input),
                op::HOST_RECV => self.host_recv(),
                op::HOST_SHUTDOWN => {
                    let how = match input.u8() {
                        0 => Shutdown::Read,
                        1 => Shutdown::Write,
                        _ => Shutdown::Both,
                    };
                    if let Some(peer) = &self.peer {
                        let _ = peer.shutdown(how);
                    }
                }
                op::RESET => self.write_reg(VIRTIO_MMIO_STATUS, 0),
                _ => {
                    let status = self.read_reg(VIRTIO_MMIO_INTERRUPT_STATUS);
                    self.write_reg(VIRTIO_MMIO_INTERRUPT_ACK, status);
                }
            }
        }
        self.pump();
    }

    fn queue(&self, input: &mut Input) -> usize {
        usize::from(input.u8()) % self.max_sizes.len()
    }

    fn read_reg(&mut self, reg: u32) -> u32 {
        let mut out = [0u8; 4];
        self.transport.read(u64::from(reg), &mut out);
        u32::from_le_bytes(out)
    }

    fn write_reg(&mut self, reg: u32, value: u32) {
        self.mmio_write(u64::from(reg), &value.to_le_bytes());
    }

    /// A write to the register window; keeps track of where the queues are.
    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(reg), Ok(bytes)) = (u32::try_from(offset), <[u8; 4]>::try_from(data)) {
            self.observe(reg, u32::from_le_bytes(bytes));
        }
        self.transport.write(offset, data);
    }

    /// Mirrors what the transport does with queue addresses.
    fn observe(&mut self, reg: u32, value: u32) {
        let status = self.transport.status();
        let setup = status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == 0;
        let half = match reg {
            VIRTIO_MMIO_QUEUE_SEL => {
                self.queue_sel = value;
                return;
            }
            VIRTIO_MMIO_STATUS if value == 0 => {
                self.regs.fill(QueueRegs::default());
                self.queue_sel = 0;
                return;
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => 0,
            VIRTIO_MMIO_QUEUE_DESC_HIGH => 1,
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => 2,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => 3,
            VIRTIO_MMIO_QUEUE_USED_LOW => 4,
            VIRTIO_MMIO_QUEUE_USED_HIGH => 5,
            _ => return,
        };
        let Some(regs) = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|q| self.regs.get_mut(q))
        else {
            return;
        };
        if !setup {
            return;
        }
        // virtio-queue keeps the old address when the new one is misaligned.
        let mut next = *regs;
        next.halves[half] = value;
        let align = [16, 2, 4][half / 2];
        if next.get(half / 2) % align != 0 {
            return;
        }
        *regs = next;
        self.tables.insert(regs.get(0));
        self.used_rings.insert(regs.get(2));
    }

    /// The driver's usual set-up, with fuzzed choices (see [`op::SETUP`]).
    fn setup(&mut self, input: &mut Input) {
        let flags = input.u8();
        let refuse = input.u64();
        let choices: Vec<u8> = self.max_sizes.iter().map(|_| input.u8()).collect();
        let ack = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        let driver = ack | VIRTIO_CONFIG_S_DRIVER;
        let features_ok = driver | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write_reg(VIRTIO_MMIO_STATUS, 0);
        self.write_reg(VIRTIO_MMIO_STATUS, ack);
        self.write_reg(VIRTIO_MMIO_STATUS, driver);
        let mut offered = 0u64;
        for page in 0..2 {
            self.write_reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, page);
            offered |= u64::from(self.read_reg(VIRTIO_MMIO_DEVICE_FEATURES)) << (32 * page);
        }
        let mut accept = offered & !refuse;
        if flags & 1 != 0 {
            accept &= !(1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1);
        }
        if flags & 2 != 0 {
            accept |= refuse & !offered;
        }
        for page in 0..2 {
            self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, page);
            let half = u32::try_from((accept >> (32 * page)) & 0xffff_ffff).unwrap();
            self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, half);
        }
        self.write_reg(VIRTIO_MMIO_STATUS, features_ok);
        if self.read_reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return;
        }
        let mut sizes = Vec::new();
        for (q, &choice) in choices.iter().enumerate() {
            let max = self.max_sizes[q];
            sizes.push(match choice {
                0 => max,
                1..=0x7f => (max >> (choice % 9)).max(1),
                raw => u16::from(raw),
            });
        }
        self.rings = Some(Rings::new(&self.mem, &sizes));
        for (q, &size) in sizes.iter().enumerate() {
            let q32 = u32::try_from(q).unwrap();
            self.write_reg(VIRTIO_MMIO_QUEUE_SEL, q32);
            let _ = self.read_reg(VIRTIO_MMIO_QUEUE_NUM_MAX);
            if flags & (4 << q) != 0 {
                continue;
            }
            self.write_reg(VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
            for (low, high, at) in [
                (
                    VIRTIO_MMIO_QUEUE_DESC_LOW,
                    VIRTIO_MMIO_QUEUE_DESC_HIGH,
                    desc_table(q),
                ),
                (
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                    avail_ring(q),
                ),
                (
                    VIRTIO_MMIO_QUEUE_USED_LOW,
                    VIRTIO_MMIO_QUEUE_USED_HIGH,
                    used_ring(q),
                ),
            ] {
                self.write_reg(low, u32::try_from(at & 0xffff_ffff).unwrap());
                self.write_reg(high, u32::try_from(at >> 32).unwrap());
            }
            self.write_reg(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        self.write_reg(VIRTIO_MMIO_STATUS, features_ok | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    /// See [`op::CHAIN`].
    fn chain(&mut self, input: &mut Input) {
        let q = self.queue(input);
        let n = 1 + usize::from(input.u8() % 8);
        let mut bufs = Vec::with_capacity(n);
        for _ in 0..n {
            let (a, l) = (addr(input), len(input));
            let flags = u16::from(input.u8()) & (NEXT | WRITE | INDIRECT);
            let fill = usize::from(input.u8() % 64);
            let _ = self.mem.write_slice(input.bytes(fill), GuestAddress(a));
            bufs.push((a, l, flags));
        }
        if let Some(rings) = &mut self.rings {
            if q < rings.sizes().len() {
                rings.add_chain(&self.mem, q, &bufs);
            }
        }
    }

    /// See [`op::INDIRECT_CHAIN`].
    fn indirect_chain(&mut self, input: &mut Input) {
        let q = self.queue(input);
        let table = addr(input);
        let n = 1 + input.u8() % 8;
        for i in 0..n {
            let (a, l) = (addr(input), len(input));
            let flags = u16::from(input.u8()) & (NEXT | WRITE | INDIRECT);
            let flags = if i + 1 < n { flags | NEXT } else { flags };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&a.to_le_bytes());
            d[8..12].copy_from_slice(&l.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&u16::from(i + 1).to_le_bytes());
            let _ = self
                .mem
                .write_slice(&d, GuestAddress(table.wrapping_add(16 * u64::from(i))));
        }
        if let Some(rings) = &mut self.rings {
            if q < rings.sizes().len() {
                rings.add_chain(&self.mem, q, &[(table, 16 * u32::from(n), INDIRECT)]);
            }
        }
    }

    /// See [`op::HOST_SEND`].
    fn host_send(&mut self, input: &mut Input) {
        let flags = input.u8();
        let n = usize::from(input.u16() % 4096);
        let bytes = input.bytes(n);
        let Some(peer) = &mut self.peer else { return };
        let mut out = Vec::with_capacity(4 + bytes.len());
        if flags & 1 != 0 {
            out.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
        }
        out.extend_from_slice(bytes);
        let _ = peer.write(&out);
    }

    fn host_recv(&mut self) {
        let Some(peer) = &mut self.peer else { return };
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..64 {
            match peer.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Adds what the descriptor tables now let the device write.
    fn scan_tables(&mut self) {
        let most = self.max_sizes.iter().copied().max().unwrap_or(0);
        for &used in &self.used_rings {
            self.writable
                .insert((used, used.saturating_add(used_ring_len(most))));
        }
        let tables: Vec<u64> = self.tables.iter().copied().collect();
        for table in tables {
            self.descriptor_memory
                .insert((table, table.saturating_add(16 * u64::from(most))));
            for (a, l, flags) in self.descriptors(table, usize::from(most)) {
                if flags & INDIRECT != 0 {
                    let n = usize::try_from(l / 16)
                        .unwrap_or(0)
                        .min(usize::from(u16::MAX));
                    self.descriptor_memory
                        .insert((a, a.saturating_add(16 * n as u64)));
                    for (a, l, flags) in self.descriptors(a, n) {
                        if flags & WRITE != 0 {
                            self.writable.insert((a, a.saturating_add(u64::from(l))));
                        }
                    }
                } else if flags & WRITE != 0 {
                    self.writable.insert((a, a.saturating_add(u64::from(l))));
                }
            }
        }
    }

    /// The first `n` descriptors of the table at `table`, as far as it is
    /// in guest memory: `(addr, len, flags)`.
    fn descriptors(&self, table: u64, n: usize) -> Vec<(u64, u32, u16)> {
        let mut raw = vec![0u8; 16 * n];
        if self.mem.read_slice(&mut raw, GuestAddress(table)).is_err() {
            // Partly outside memory: as far as it goes.
            let mut out = Vec::new();
            for i in 0..n as u64 {
                let mut d = [0u8; 16];
                let Some(at) = table.checked_add(16 * i) else {
                    break;
                };
                if self.mem.read_slice(&mut d, GuestAddress(at)).is_err() {
                    break;
                }
                out.push(parse_descriptor(&d));
            }
            return out;
        }
        raw.chunks_exact(16).map(parse_descriptor).collect()
    }

    fn snapshot(mem: &GuestMemoryMmap, into: &mut [Vec<u8>]) {
        for (&(start, _), v) in REGIONS.iter().zip(into) {
            mem.read_slice(v, GuestAddress(start)).unwrap();
        }
    }

    /// Runs the event loop until the device is idle, checking the oracle.
    fn pump(&mut self) {
        self.scan_tables();
        Self::snapshot(&self.mem, &mut self.before);
        let mut idle = false;
        for _ in 0..MAX_WAKEUPS {
            if self.manager.run_with_timeout(0).unwrap() == 0 {
                idle = true;
                break;
            }
        }
        assert!(
            idle,
            "the event loop is still busy after {MAX_WAKEUPS} wake-ups with nothing new to do"
        );
        Self::snapshot(&self.mem, &mut self.after);
        self.check_writes();
    }

    /// Every byte the device changed is in a used ring or a device-writable buffer.
    ///
    /// Not checked when a device-writable buffer overlaps descriptors: the
    /// device may then have written descriptors (random bytes, disk data) and
    /// followed them to buffers no scan before the run could know of, as the
    /// guest allowed.
    fn check_writes(&self) {
        let allowed = merge(&self.writable);
        if overlaps(&allowed, &merge(&self.descriptor_memory)) {
            return;
        }
        for ((start, _), (old, new)) in REGIONS.iter().zip(self.before.iter().zip(&self.after)) {
            const CHUNK: usize = 256;
            for (c, (old, new)) in old.chunks(CHUNK).zip(new.chunks(CHUNK)).enumerate() {
                if old == new {
                    continue;
                }
                // Most changed chunks lie inside one buffer.
                let from = start + (c * CHUNK) as u64;
                let k = allowed.partition_point(|&(s, _)| s <= from);
                if k > 0 && from + old.len() as u64 <= allowed[k - 1].1 {
                    continue;
                }
                for (i, (a, b)) in old.iter().zip(new).enumerate() {
                    if a == b {
                        continue;
                    }
                    let at = start + (c * CHUNK + i) as u64;
                    let k = allowed.partition_point(|&(s, _)| s <= at);
                    let inside = k > 0 && at < allowed[k - 1].1;
                    assert!(
                        inside,
                        "the device wrote guest memory at {at:#x}, outside the used rings and \
                         device-writable buffers"
                    );
                }
            }
        }
    }
}

fn parse_descriptor(d: &[u8]) -> (u64, u32, u16) {
    let mut a = [0u8; 8];
    a.copy_from_slice(&d[..8]);
    let mut l = [0u8; 4];
    l.copy_from_slice(&d[8..12]);
    let flags = u16::from_le_bytes([d[12], d[13]]);
    (u64::from_le_bytes(a), u32::from_le_bytes(l), flags)
}

impl<D: VirtioDevice + MutEventSubscriber + 'static> Drop for Driver<D> {
    fn drop(&mut self) {
        // The host end goes first: a console flushing its output at the end
        // (Console's Drop, bounded at 5 s) then sees a closed peer at once.
        drop(self.peer.take());
        // Zeroed for the next input (which gets fresh memory, as a new VM).
        for (&(start, _), zeros) in REGIONS.iter().zip(&mut self.before) {
            zeros.fill(0);
            let _ = self.mem.write_slice(zeros, GuestAddress(start));
        }
        let pooled = (
            self.mem.clone(),
            std::mem::take(&mut self.before),
            std::mem::take(&mut self.after),
        );
        POOL.with(|pool| *pool.borrow_mut() = Some(pooled));
    }
}

/// Whether any range of sorted, disjoint `a` overlaps any of sorted, disjoint `b`.
fn overlaps(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].0 < b[j].1 && b[j].0 < a[i].1 {
            return true;
        }
        if a[i].1 <= b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    false
}

/// Sorted, disjoint `(start, end)` ranges covering `ranges`.
fn merge(ranges: &BTreeSet<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// An offset in the register window: aligned registers and configuration
/// space, or any byte of the configuration space.
fn mmio_offset(input: &mut Input) -> u64 {
    match input.u8() {
        o @ 0..=0x7f => u64::from(o) * 4,
        o => 0x100 + u64::from(o & 0x7f),
    }
}

fn width(input: &mut Input) -> usize {
    match input.u8() % 4 {
        0 => 4,
        1 => 1,
        2 => 2,
        _ => 8,
    }
}

/// Programs for the seed corpora, built op by op.
#[derive(Debug, Default, Clone)]
pub struct Program {
    pub enc: Encoder,
}

impl Program {
    /// Starts with the device-specific first bytes (blk: how; net: MTU).
    #[must_use]
    pub fn new(kind: Kind) -> Self {
        let mut p = Self::default();
        match kind {
            Kind::Blk => {
                p.enc.u8(0);
            }
            Kind::Net => {
                p.enc.u16(1500);
            }
            Kind::Console | Kind::Rng => {}
        }
        p
    }

    /// [`op::SETUP`] taking every offered feature but `refuse`, full-size queues.
    pub fn setup(&mut self, refuse: u64, queues: usize) -> &mut Self {
        self.enc.u8(op::SETUP).u8(0).u64(refuse);
        for _ in 0..queues {
            self.enc.u8(0);
        }
        self
    }

    /// [`op::CHAIN`] of `(offset in the data region, len, flags, contents)`.
    pub fn chain(&mut self, q: u8, bufs: &[(u16, u16, u16, &[u8])]) -> &mut Self {
        self.enc
            .u8(op::CHAIN)
            .u8(q)
            .u8(u8::try_from(bufs.len() - 1).unwrap());
        for &(at, l, flags, fill) in bufs {
            self.enc
                .u8(0)
                .u16(at)
                .u16(l)
                .u8(u8::try_from(flags).unwrap())
                .u8(u8::try_from(fill.len()).unwrap())
                .raw(fill);
        }
        self
    }

    /// [`op::INDIRECT_CHAIN`] with its table at `table` in the data region.
    pub fn indirect(&mut self, q: u8, table: u16, bufs: &[(u16, u16, u16)]) -> &mut Self {
        self.enc
            .u8(op::INDIRECT_CHAIN)
            .u8(q)
            .u8(0)
            .u16(table)
            .u8(u8::try_from(bufs.len() - 1).unwrap());
        for &(at, l, flags) in bufs {
            self.enc
                .u8(0)
                .u16(at)
                .u16(l)
                .u8(u8::try_from(flags).unwrap());
        }
        self
    }

    /// [`op::MEMORY`] at an offset in the data region.
    pub fn memory(&mut self, at: u16, bytes: &[u8]) -> &mut Self {
        self.enc
            .u8(op::MEMORY)
            .u8(0)
            .u16(at)
            .u8(u8::try_from(bytes.len()).unwrap())
            .raw(bytes);
        self
    }

    pub fn notify(&mut self, q: u8) -> &mut Self {
        self.enc.u8(op::NOTIFY).u8(q);
        self
    }

    pub fn host_send(&mut self, framed: bool, bytes: &[u8]) -> &mut Self {
        self.enc
            .u8(op::HOST_SEND)
            .u8(u8::from(framed))
            .u16(u16::try_from(bytes.len()).unwrap())
            .raw(bytes);
        self
    }

    /// One raw byte (an operation's argument).
    pub fn u8_raw(&mut self, v: u8) -> &mut Self {
        self.enc.u8(v);
        self
    }

    pub fn op(&mut self, op: u8) -> &mut Self {
        self.enc.u8(op);
        self
    }

    /// [`op::MMIO_READ`] of a 4-byte register or configuration word.
    pub fn read(&mut self, offset: u16) -> &mut Self {
        let word = u8::try_from(offset / 4).unwrap_or(0) & 0x7f;
        self.enc.u8(op::MMIO_READ).u8(word).u8(0);
        self
    }

    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        self.enc.bytes.clone()
    }
}

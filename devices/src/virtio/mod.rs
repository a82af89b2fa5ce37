//! Virtio devices over the virtio-mmio (version 2) transport.
//!
//! # Pieces
//!
//! - [`VirtioDevice`]: what a device model offers its transport (type, queues,
//!   features, configuration space, activation, reset).
//! - [`MmioTransport`]: the virtio-mmio register window. It sits on the MMIO
//!   [`Bus`](crate::Bus) and owns, for the life of the VM, the device's
//!   [`Interrupt`] (one irqfd) and one notification [`EventFd`] per queue (one
//!   ioeventfd each).
//! - [`Block`], [`Rng`], [`Console`]: the device models. Each is also an
//!   [`event_manager::MutEventSubscriber`].
//!
//! # Wiring a device (VMM side)
//!
//! ```text
//! let blk = Arc::new(Mutex::new(Block::new(file, read_only, "serial")?));
//! let transport = MmioTransport::new(guest_mem.clone(), blk.clone())?;
//! vm_fd.register_irqfd(transport.interrupt_evt(), irq)?;
//! for (i, evt) in transport.queue_events().iter().enumerate() {
//!     vm_fd.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), i as u32)?;
//! }
//! mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_LEN)?;
//! event_manager.add_subscriber(Box::new(blk)); // Arc<Mutex<Block>> is a MutEventSubscriber
//! cmdline.push(mmio_cmdline_fragment(base, irq)); // virtio_mmio.device=4K@0x<base>:<irq>
//! ```
//!
//! The transport must stay alive as long as the VM (KVM holds its eventfds).
//!
//! # Threading
//!
//! Two kinds of threads touch a device:
//!
//! - **vCPU threads** reach the transport through the MMIO bus (the bus locks
//!   the transport's mutex), and the transport locks the device's mutex for
//!   configuration-space accesses, for [`VirtioDevice::activate`] and for
//!   [`VirtioDevice::reset`]. These calls only record state and write to the
//!   device's *activate* event; they never do device I/O.
//! - **The VMM's event-loop thread** (an [`event_manager::EventManager`]) runs
//!   every device's I/O. A device registers its activate event when it is added
//!   to the event manager. When the activate event fires, the device puts the
//!   queue notification events it was given at activation into epoll (or, after
//!   a reset, takes the old ones out) and processes its queues once. From then
//!   on, a guest notification (an ioeventfd on `QueueNotify`, which KVM
//!   completes without leaving the kernel) wakes the event loop, which locks the
//!   device and processes that queue; completions are signalled through the
//!   [`Interrupt`]'s irqfd.
//!
//! Lock order is transport, then device; the event loop only ever takes the
//! device lock, so the two never deadlock.
//!
//! # Hostile guests
//!
//! Every descriptor chain is walked with a bound on its length and checked
//! (direction, order, addresses inside guest RAM) before use; data moves
//! between the host and guest memory in bounded pieces, so nothing the guest
//! writes in a descriptor sizes a host allocation. A request whose content is
//! wrong gets an error status (or an empty reply); a broken ring or chain (a
//! loop, an index past the queue, a bad available index, a used ring that
//! cannot be written) makes the device set `DEVICE_NEEDS_RESET` and stop
//! processing until the driver resets it.
//!
//! Each event a device handles serves at most a queue's worth of chains (the
//! queue size) from each queue, and block and console output also stop after
//! a number of bytes. A device that stops with chains still on the ring
//! signals its own queue event again and returns: the event loop serves
//! whatever else is ready (the VMM's stop request among it) before it comes
//! back, so a driver that keeps a ring full cannot hold the event loop.
//!
//! Whatever a guest can make a device log goes through
//! [`rate_limited!`](crate::rate_limited) and names registers, indices and
//! error kinds, never guest data.

mod block;
mod chain;
mod console;
mod fs;
mod mmio;
pub mod net;
mod rng;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use block::{concat_layout, Block, BlockError, SECTOR_SIZE};
pub use console::{Console, PORT_NAME as CONSOLE_PORT_NAME};
pub use fs::{FsError, VhostUserFs, MAX_TAG_LEN};
pub use mmio::{mmio_cmdline_fragment, MmioTransport, MMIO_LEN, QUEUE_NOTIFY_OFFSET};
pub use rng::Rng;

use chain::{Buf, ChainError};

/// The `VIRTIO_F_VERSION_1` feature bit, which every device offers: hull
/// speaks only virtio 1.x.
pub const FEATURE_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

/// `InterruptStatus` bit: the device used a buffer.
pub const INT_USED_BUFFER: u32 = 1;
/// `InterruptStatus` bit: the device configuration changed (or the device
/// needs a reset).
pub const INT_CONFIG_CHANGE: u32 = 2;

/// A queue handed to a device at activation, with the event the guest's
/// notifications for it arrive on.
#[derive(Debug)]
pub struct DeviceQueue {
    /// The queue as the driver configured it.
    pub queue: Queue,
    /// Readable when the guest notified the queue (a duplicate of the
    /// transport's ioeventfd).
    pub notify: EventFd,
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport handed over a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// Waking the event loop failed.
    #[error("cannot signal the device's activation")]
    Signal(#[source] io::Error),
}

/// A virtio device model, as its transport sees it.
///
/// Implementations are also [`event_manager::MutEventSubscriber`]s: the
/// methods here run in vCPU threads and only record state; I/O happens in the
/// event loop (see the [module documentation](self)).
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue (powers of two); their number is the
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits offered, [`FEATURE_VERSION_1`] included.
    fn avail_features(&self) -> u64;
    /// The driver accepted `features` (a subset of the offered ones).
    fn ack_features(&mut self, features: u64);
    /// Reads the device configuration space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver is ready (`DRIVER_OK`): start serving `queues`, reading and
    /// writing guest memory through `mem` and signalling through `interrupt`.
    ///
    /// # Errors
    /// The queues do not match the device, or the event loop could not be woken.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: drop the queues and the guest memory, go
    /// back to the state before activation.
    fn reset(&mut self);
}

/// A device's interrupt: the irqfd the VMM registers with KVM, and the
/// `InterruptStatus` bits the transport shows the guest.
///
/// Also carries the device's "needs reset" flag, which the device sets from
/// the event loop and the transport shows in the `Status` register.
#[derive(Debug)]
pub struct Interrupt {
    irq: EventFd,
    status: AtomicU32,
    needs_reset: AtomicBool,
    /// `INT_USED_BUFFER` stays set through acks ([`Interrupt::set_sticky_used`]).
    sticky_used: AtomicBool,
}

impl Interrupt {
    /// A new interrupt with a fresh (non-blocking) irq event.
    ///
    /// # Errors
    /// Creating the eventfd failed.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            irq: EventFd::new(EFD_NONBLOCK)?,
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            sticky_used: AtomicBool::new(false),
        })
    }

    /// The event to register as the device's irqfd.
    #[must_use]
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }

    /// The `InterruptStatus` register.
    #[must_use]
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged the `bits` of `InterruptStatus`.
    pub fn ack(&self, bits: u32) {
        let bits = if self.sticky_used.load(Ordering::SeqCst) {
            bits & !INT_USED_BUFFER
        } else {
            bits
        };
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            crate::rate_limited!(warn, "virtio: cannot raise the interrupt: {e}");
        }
    }

    /// For a device whose backend writes the irqfd itself (vhost-user):
    /// `InterruptStatus` always shows used buffers, so the driver looks at
    /// its rings on every interrupt (a look that finds nothing is harmless).
    /// Until the next reset.
    pub fn set_sticky_used(&self) {
        self.sticky_used.store(true, Ordering::SeqCst);
        self.status.fetch_or(INT_USED_BUFFER, Ordering::SeqCst);
    }

    /// Tells the driver the device used buffers.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_BUFFER);
    }

    /// Tells the driver the device configuration changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }

    /// The device hit an error it cannot recover from: it shows
    /// `DEVICE_NEEDS_RESET` and tells the driver through a configuration
    /// change interrupt.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.signal_config_change();
        }
    }

    /// Whether the device asked to be reset.
    #[must_use]
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Clears the status bits and the needs-reset flag (device reset).
    fn clear(&self) {
        self.sticky_used.store(false, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// Why a device stopped processing (it then needs a reset).
#[derive(Debug, thiserror::Error)]
enum DeviceError {
    #[error("the available ring of queue {queue} is broken")]
    AvailRing {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("broken descriptor chain (head {head}) on queue {queue}")]
    Chain {
        queue: usize,
        head: u16,
        #[source]
        source: ChainError,
    },
    #[error("cannot return a buffer (head {head}) to the used ring of queue {queue}")]
    UsedRing {
        queue: usize,
        head: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("unusable request (head {head}) on queue {queue}: {why}")]
    Request {
        queue: usize,
        head: u16,
        why: &'static str,
    },
}

/// What an activated device works with.
#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    failed: bool,
}

impl Active {
    /// The state of a device activated with `queues`, which must be exactly
    /// `expected` of them; also returns their notification events.
    fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
        expected: usize,
    ) -> Result<(Self, Vec<EventFd>), ActivateError> {
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        let (queues, notify) = queues.into_iter().map(|q| (q.queue, q.notify)).unzip();
        Ok((
            Self {
                mem,
                interrupt,
                queues,
                failed: false,
            },
            notify,
        ))
    }

    /// How many chains one wake-up may take from queue `q`: a queue's worth.
    /// A device that used it up ends the wake-up with
    /// [`QueueEvents::yield_queue`], so a driver that keeps its ring full
    /// cannot hold the event loop.
    fn budget(&self, q: usize) -> usize {
        self.queues
            .get(q)
            .map_or(0, |queue| usize::from(queue.size()))
    }

    /// Whether the driver offers chains on queue `q` not taken yet (false
    /// once the device failed).
    fn has_more(&self, q: usize) -> bool {
        let Some(queue) = self.queues.get(q) else {
            return false;
        };
        if self.failed || !queue.ready() {
            return false;
        }
        // An unreadable index counts as more: the next wake-up takes the
        // error path and fails the device.
        queue
            .avail_idx(&self.mem, Ordering::Acquire)
            .map_or(true, |idx| idx.0 != queue.next_avail())
    }

    /// Takes the next available chain of queue `q`, walked into at most
    /// `max_descs` buffers. `Ok(None)`: nothing available (or the queue is
    /// unused).
    fn pop(&mut self, q: usize, max_descs: usize) -> Result<Option<(u16, Vec<Buf>)>, DeviceError> {
        let Some(queue) = self.queues.get_mut(q) else {
            return Ok(None);
        };
        if !queue.ready() {
            return Ok(None);
        }
        let mut avail = queue
            .iter(&self.mem)
            .map_err(|source| DeviceError::AvailRing { queue: q, source })?;
        let Some(chain) = avail.next() else {
            return Ok(None);
        };
        let head = chain.head_index();
        let bufs = chain::walk(chain, max_descs).map_err(|source| DeviceError::Chain {
            queue: q,
            head,
            source,
        })?;
        Ok(Some((head, bufs)))
    }

    /// Asks the driver not to notify queue `q` while the device is draining
    /// it anyway (`VRING_USED_F_NO_NOTIFY`): a guest writing fast then costs
    /// one VM exit per batch instead of one per buffer.
    fn suppress_notifications(&mut self, q: usize) {
        if let Some(queue) = self.queues.get_mut(q).filter(|queue| queue.ready()) {
            let _ = queue.disable_notification(&self.mem);
        }
    }

    /// Asks for notifications of queue `q` again, before the device goes
    /// idle on it; true when the driver added chains in the meantime (take
    /// them now: no notification will come for them).
    fn resume_notifications(&mut self, q: usize) -> bool {
        match self.queues.get_mut(q).filter(|queue| queue.ready()) {
            Some(queue) => queue.enable_notification(&self.mem).unwrap_or(true),
            None => false,
        }
    }

    /// Puts `head` back on the used ring of queue `q`, `len` bytes written.
    fn add_used(&mut self, q: usize, head: u16, len: u32) -> Result<(), DeviceError> {
        let Some(queue) = self.queues.get_mut(q) else {
            return Ok(());
        };
        queue
            .add_used(&self.mem, head, len)
            .map_err(|source| DeviceError::UsedRing {
                queue: q,
                head,
                source,
            })
    }

    /// Interrupts the guest for used buffers of queue `q`, if it wants one.
    fn notify_used(&mut self, q: usize) {
        let Some(queue) = self.queues.get_mut(q) else {
            return;
        };
        // Without VIRTIO_RING_F_EVENT_IDX this is always true; an error reading
        // the ring's event index errs on the side of interrupting.
        if queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
    }

    /// Stops the device for good (until reset) and tells the driver.
    fn fail(&mut self, name: &str, error: &DeviceError) {
        crate::rate_limited!(warn, "virtio-{name}: {error}; the device needs a reset");
        self.failed = true;
        self.interrupt.set_needs_reset();
    }
}

/// The event-loop side of activation: the activate event, and the queue
/// notification events in (or on their way into or out of) epoll.
#[derive(Debug)]
struct QueueEvents {
    activate: EventFd,
    /// Handed over by the last activation, not yet in epoll.
    pending: Vec<EventFd>,
    /// In epoll; the event data is the queue index.
    watched: Vec<EventFd>,
    /// A reset happened: `watched` must leave epoll.
    stale: bool,
}

impl QueueEvents {
    fn new() -> io::Result<Self> {
        Ok(Self {
            activate: EventFd::new(EFD_NONBLOCK)?,
            pending: Vec::new(),
            watched: Vec::new(),
            stale: false,
        })
    }

    /// vCPU thread: the device was activated with these notification events.
    fn activated(&mut self, notify: Vec<EventFd>) -> Result<(), ActivateError> {
        self.stale |= !self.watched.is_empty();
        self.pending = notify;
        self.activate.write(1).map_err(ActivateError::Signal)
    }

    /// vCPU thread: the device was reset.
    fn reset(&mut self) {
        self.pending.clear();
        self.stale = true;
        if let Err(e) = self.activate.write(1) {
            crate::rate_limited!(
                warn,
                "virtio: cannot wake the event loop after a reset: {e}"
            );
        }
    }

    /// Event loop: watch the activate event.
    fn init(&self, ops: &mut EventOps, name: &str) {
        if let Err(e) = ops.add(Events::new(&self.activate, EventSet::IN)) {
            crate::rate_limited!(
                error,
                "virtio-{name}: cannot watch the activate event: {e:?}"
            );
        }
    }

    fn is_activate(&self, events: &Events) -> bool {
        events.fd() == self.activate.as_raw_fd()
    }

    /// Event loop, on the activate event: brings epoll up to date. Returns
    /// true when queue events were just added (the device should then look at
    /// its queues).
    fn sync(&mut self, ops: &mut EventOps, name: &str) -> bool {
        let _ = self.activate.read();
        if self.stale {
            for evt in self.watched.drain(..) {
                if let Err(e) = ops.remove(Events::empty(&evt)) {
                    crate::rate_limited!(
                        warn,
                        "virtio-{name}: cannot unwatch a queue event: {e:?}"
                    );
                }
            }
            self.stale = false;
        }
        if self.pending.is_empty() {
            return false;
        }
        for (i, evt) in self.pending.drain(..).enumerate() {
            let Ok(data) = u32::try_from(i) else { break };
            if let Err(e) = ops.add(Events::with_data(&evt, data, EventSet::IN)) {
                crate::rate_limited!(error, "virtio-{name}: cannot watch queue {i}: {e:?}");
            }
            self.watched.push(evt);
        }
        true
    }

    /// Event loop: a wake-up used up its budget on queue `q`. If the driver
    /// offers more, the queue's event is signalled again: the event loop
    /// serves everything else that is ready (the VMM's stop request among
    /// it) before it comes back to this queue.
    fn yield_queue(&self, active: &Active, q: usize, name: &str) {
        if !active.has_more(q) {
            return;
        }
        if let Some(evt) = self.watched.get(q) {
            if let Err(e) = evt.write(1) {
                crate::rate_limited!(warn, "virtio-{name}: cannot requeue queue {q}: {e}");
            }
        }
    }

    /// Event loop: if `events` is a queue notification, consumes it and
    /// returns the queue index.
    fn queue_event(&self, events: &Events) -> Option<usize> {
        let i = usize::try_from(events.data()).ok()?;
        let evt = self.watched.get(i)?;
        if evt.as_raw_fd() != events.fd() {
            return None;
        }
        let _ = evt.read();
        Some(i)
    }
}

/// Brings what the event loop watches a device's host-side descriptor `fd`
/// for (`watching`: empty when it is not in epoll) to `want`.
fn watch_fd(
    ops: &mut EventOps,
    fd: std::os::fd::RawFd,
    watching: &mut EventSet,
    want: EventSet,
    name: &str,
) {
    if want == *watching {
        return;
    }
    let result = if want.is_empty() {
        ops.remove(Events::empty_raw(fd))
    } else if watching.is_empty() {
        ops.add(Events::new_raw(fd, want))
    } else {
        ops.modify(Events::new_raw(fd, want))
    };
    match result {
        Ok(()) => *watching = want,
        Err(e) => crate::rate_limited!(warn, "virtio-{name}: cannot watch its host end: {e:?}"),
    }
}

/// Copies `data` (at `offset`) out of a configuration space.
fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod test_utils;

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::MutEventSubscriber;
    use std::sync::Mutex;

    #[test]
    fn devices_fit_the_vmm_event_loop_and_bus() {
        fn subscriber<T: MutEventSubscriber + Send + 'static>(_: &T) {}
        fn bus_device<T: crate::BusDevice + 'static>(_: &T) {}
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        subscriber(&rng);
        let _: Box<dyn MutEventSubscriber + Send> = Box::new(rng.clone());
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)]).unwrap();
        let transport = MmioTransport::new(mem, rng).unwrap();
        bus_device(&transport);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        subscriber(&Arc::new(Mutex::new(Console::new(a).unwrap())));
    }

    #[test]
    fn interrupt_bits() {
        let i = Interrupt::new().unwrap();
        i.signal_used_queue();
        i.signal_config_change();
        assert_eq!(i.status(), INT_USED_BUFFER | INT_CONFIG_CHANGE);
        assert_eq!(i.irq().read().unwrap(), 2);
        i.ack(INT_USED_BUFFER);
        assert_eq!(i.status(), INT_CONFIG_CHANGE);
        i.set_needs_reset();
        i.set_needs_reset();
        assert!(i.needs_reset());
        assert_eq!(i.irq().read().unwrap(), 1);
        i.clear();
        assert_eq!(i.status(), 0);
        assert!(!i.needs_reset());
    }

    #[test]
    fn a_sticky_used_bit_survives_acks_until_a_reset() {
        let i = Interrupt::new().unwrap();
        i.set_sticky_used();
        i.ack(INT_USED_BUFFER);
        assert_eq!(i.status(), INT_USED_BUFFER);
        i.signal_config_change();
        i.ack(INT_USED_BUFFER | INT_CONFIG_CHANGE);
        assert_eq!(i.status(), INT_USED_BUFFER);
        i.clear();
        i.signal_used_queue();
        i.ack(INT_USED_BUFFER);
        assert_eq!(i.status(), 0);
    }
}

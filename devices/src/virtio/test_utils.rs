//! A driver-side harness for device tests: guest memory, split queues laid out
//! in it, the device activated and driven through a real event manager.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::DescriptorTable;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceQueue, Interrupt, VirtioDevice};

/// `VRING_DESC_F_NEXT` and `VRING_DESC_F_WRITE` as descriptor flags.
pub(crate) const NEXT: u16 = 1;
pub(crate) const WRITE: u16 = 2;
pub(crate) const INDIRECT: u16 = 4;

/// Where tests put their data buffers (queues live below).
pub(crate) const DATA: u64 = 0x10_0000;
pub(crate) const MEM_SIZE: usize = 0x40_0000;

fn desc_table(q: usize) -> u64 {
    0x1_0000 * (q as u64 + 1)
}
fn avail_ring(q: usize) -> u64 {
    desc_table(q) + 0x1000
}
fn used_ring(q: usize) -> u64 {
    desc_table(q) + 0x2000
}

pub(crate) struct Harness<D: VirtioDevice + MutEventSubscriber + 'static> {
    pub mem: GuestMemoryMmap,
    pub dev: Arc<Mutex<D>>,
    pub interrupt: Arc<Interrupt>,
    manager: EventManager<Arc<Mutex<D>>>,
    notify: Vec<EventFd>,
    sizes: Vec<u16>,
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
}

impl<D: VirtioDevice + MutEventSubscriber + 'static> Harness<D> {
    /// `dev` activated with queues of `sizes`, all ready.
    pub fn new(dev: D, sizes: &[u16]) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Self::with_memory(dev, sizes, mem)
    }

    /// As [`new`](Self::new), in `mem` (at least [`MEM_SIZE`] from 0).
    pub fn with_memory(dev: D, sizes: &[u16], mem: GuestMemoryMmap) -> Self {
        let dev = Arc::new(Mutex::new(dev));
        let mut manager = EventManager::<Arc<Mutex<D>>>::new().unwrap();
        manager.add_subscriber(dev.clone());
        let mut h = Self {
            mem,
            dev,
            interrupt: Arc::new(Interrupt::new().unwrap()),
            manager,
            notify: Vec::new(),
            sizes: Vec::new(),
            next_desc: Vec::new(),
            avail_idx: Vec::new(),
        };
        h.activate_again(sizes);
        h
    }

    /// Activates the device again (after [`reset`](Self::reset)), with fresh rings.
    pub fn activate_again(&mut self, sizes: &[u16]) {
        let max: Vec<u16> = self.dev.lock().unwrap().queue_max_sizes().to_vec();
        self.sizes = sizes.to_vec();
        self.next_desc = vec![0; sizes.len()];
        self.avail_idx = vec![0; sizes.len()];
        self.notify = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let mut queues = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            self.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(desc_table(i)))
                .unwrap();
            let mut q = Queue::new(max[i]).unwrap();
            q.try_set_size(size).unwrap();
            q.try_set_desc_table_address(GuestAddress(desc_table(i)))
                .unwrap();
            q.try_set_avail_ring_address(GuestAddress(avail_ring(i)))
                .unwrap();
            q.try_set_used_ring_address(GuestAddress(used_ring(i)))
                .unwrap();
            q.set_ready(true);
            assert!(q.is_valid(&self.mem));
            queues.push(DeviceQueue {
                queue: q,
                notify: self.notify[i].try_clone().unwrap(),
            });
        }
        self.dev
            .lock()
            .unwrap()
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
            .unwrap();
        self.pump();
    }

    /// Runs the event loop until it is idle; panics if it never gets idle.
    pub fn pump(&mut self) {
        for _ in 0..1000 {
            if self.manager.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop keeps spinning");
    }

    /// Writes descriptors `(addr, len, flags, next)` from index `at` on, and
    /// offers `at` as a chain head.
    pub fn raw_chain(&mut self, q: usize, descs: &[(u64, u32, u16, u16)], at: u16) {
        let table = DescriptorTable::new(&self.mem, GuestAddress(desc_table(q)), self.sizes[q]);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = SplitDescriptor::new(addr, len, flags, next);
            table
                .store(at + u16::try_from(i).unwrap(), RawDescriptor::from(d))
                .unwrap();
        }
        self.push_avail(q, at);
    }

    /// Offers a chain of `(addr, len, flags)` buffers (NEXT is added).
    pub fn add_chain(&mut self, q: usize, bufs: &[(u64, u32, u16)]) {
        let size = self.sizes[q];
        let head = self.next_desc[q];
        let table = DescriptorTable::new(&self.mem, GuestAddress(desc_table(q)), size);
        let mut index = head;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let next = (index + 1) % size;
            let flags = if i + 1 < bufs.len() {
                flags | NEXT
            } else {
                flags
            };
            table
                .store(
                    index,
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
                )
                .unwrap();
            index = next;
        }
        self.next_desc[q] = index;
        self.push_avail(q, head);
    }

    /// Puts `head` on the available ring (without checking it).
    pub fn push_avail(&mut self, q: usize, head: u16) {
        let idx = self.avail_idx[q];
        let slot = u64::from(idx % self.sizes[q]);
        self.mem
            .write_obj(head, GuestAddress(avail_ring(q) + 4 + 2 * slot))
            .unwrap();
        self.avail_idx[q] = idx.wrapping_add(1);
        self.set_avail_idx(q, self.avail_idx[q]);
    }

    /// Writes the available ring's index as a (possibly lying) driver would.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(avail_ring(q) + 2))
            .unwrap();
    }

    /// Notifies queue `q` and runs the event loop.
    pub fn notify(&mut self, q: usize) {
        self.notify[q].write(1).unwrap();
        self.pump();
    }

    /// Notifies queue `q` only if the device has not asked the driver not to
    /// (`VRING_USED_F_NO_NOTIFY` in the used ring's flags), as Linux does,
    /// then runs the event loop.
    pub fn notify_if_wanted(&mut self, q: usize) {
        let flags: u16 = self.mem.read_obj(GuestAddress(used_ring(q))).unwrap();
        if flags & 1 == 0 {
            self.notify[q].write(1).unwrap();
        }
        self.pump();
    }

    /// The used ring of queue `q`: (head, len) for each used chain.
    pub fn used(&self, q: usize) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(used_ring(q) + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let slot = u64::from(i % self.sizes[q]);
                let e: VirtqUsedElem = self
                    .mem
                    .read_obj(GuestAddress(used_ring(q) + 4 + 8 * slot))
                    .unwrap();
                (e.id(), e.len())
            })
            .collect()
    }

    /// One wake-up of the event loop (what the VMM's loop does between two
    /// looks at whether the VM must stop); returns the events it served.
    pub fn run_once(&mut self) -> usize {
        self.manager.run_with_timeout(0).unwrap()
    }

    /// The used ring's index of queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(used_ring(q) + 2)).unwrap()
    }

    /// Starts a driver, in another thread, that keeps queue `q` full: slot
    /// `i` of the descriptor table holds the one-descriptor chain `desc(i)`,
    /// and each head goes back on the available ring (with a notification)
    /// as soon as the device used it. It stops when told to, or once `limit`
    /// chains were used.
    pub fn full_ring_guest(
        &mut self,
        q: usize,
        desc: impl Fn(u16) -> (u64, u32, u16),
        limit: u64,
    ) -> FullRingGuest {
        // One such test at a time: the driver needs a CPU to keep up.
        let serial = FULL_RING_TESTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let size = self.sizes[q];
        let table = DescriptorTable::new(&self.mem, GuestAddress(desc_table(q)), size);
        for i in 0..size {
            let (addr, len, flags) = desc(i);
            table
                .store(
                    i,
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0)),
                )
                .unwrap();
        }
        let mem = self.mem.clone();
        let notify = self.notify[q].try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_guest = stop.clone();
        let mut avail = self.avail_idx[q];
        let thread = std::thread::spawn(move || {
            let used_at = GuestAddress(used_ring(q) + 2);
            let mut last: u16 = mem.read_obj(used_at).unwrap();
            let mut total = 0u64;
            while !stop_guest.load(Ordering::SeqCst) && total < limit {
                fence(Ordering::SeqCst);
                let used: u16 = mem.read_obj(used_at).unwrap();
                total += u64::from(used.wrapping_sub(last));
                last = used;
                let mut added = false;
                while avail.wrapping_sub(used) < size {
                    let slot = avail % size;
                    mem.write_obj(slot, GuestAddress(avail_ring(q) + 4 + 2 * u64::from(slot)))
                        .unwrap();
                    fence(Ordering::Release);
                    avail = avail.wrapping_add(1);
                    mem.write_obj(avail, GuestAddress(avail_ring(q) + 2))
                        .unwrap();
                    added = true;
                }
                if added {
                    fence(Ordering::SeqCst);
                    notify.write(1).unwrap();
                }
                std::hint::spin_loop();
            }
            total
        });
        FullRingGuest {
            stop,
            thread: Some(thread),
            _serial: serial,
        }
    }

    /// Runs the event loop as the VMM does (one wake-up, then a look at
    /// whether the VM must stop) while `guest` keeps queue `q` full, until
    /// the VM is asked to stop, 500 ms in. Checks that no wake-up served more
    /// than a queue's worth of chains and that the loop then stops at once.
    pub fn assert_bounded_while_kept_full(&mut self, q: usize, guest: FullRingGuest) {
        let size = self.sizes[q];
        let stopping = Arc::new(AtomicBool::new(false));
        let stopper = {
            let stopping = stopping.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(500));
                stopping.store(true, Ordering::SeqCst);
                Instant::now()
            })
        };
        let mut before = self.used_idx(q);
        let mut most = 0u16;
        let mut wakes = 0u32;
        while !stopping.load(Ordering::SeqCst) {
            self.run_once();
            let after = self.used_idx(q);
            most = most.max(after.wrapping_sub(before));
            before = after;
            wakes += 1;
        }
        let stopped = Instant::now();
        let asked = stopper.join().unwrap();
        let used = guest.stop();
        assert!(
            most <= size,
            "one wake-up served {most} chains of a {size}-entry queue"
        );
        assert!(used > 0, "the device served nothing in {wakes} wake-ups");
        assert!(
            stopped.saturating_duration_since(asked) < Duration::from_secs(1),
            "the loop noticed the stop after {:?}",
            stopped.saturating_duration_since(asked)
        );
    }

    /// Whether the irq fired since the last call.
    pub fn take_irq(&self) -> bool {
        self.interrupt.irq().read().is_ok()
    }

    pub fn needs_reset(&self) -> bool {
        self.interrupt.needs_reset()
    }

    /// Resets the device (as the transport would) and runs the event loop.
    pub fn reset(&mut self) {
        self.dev.lock().unwrap().reset();
        self.interrupt.clear();
        self.pump();
    }
}

/// A driver thread started by [`Harness::full_ring_guest`].
pub(crate) struct FullRingGuest {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
    _serial: std::sync::MutexGuard<'static, ()>,
}

static FULL_RING_TESTS: Mutex<()> = Mutex::new(());

impl FullRingGuest {
    /// Stops the driver; returns how many chains the device used meanwhile.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for FullRingGuest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn descriptor_flags_match_the_bindings() {
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    assert_eq!(u32::from(NEXT), VRING_DESC_F_NEXT);
    assert_eq!(u32::from(WRITE), VRING_DESC_F_WRITE);
    assert_eq!(u32::from(INDIRECT), VRING_DESC_F_INDIRECT);
}

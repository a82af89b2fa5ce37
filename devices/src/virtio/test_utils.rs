//! A driver-side harness for device tests: guest memory, split queues laid out
//! in it, the device activated and driven through a real event manager.
//!
//! [`Rings`], the part that lays out descriptor chains and reads the used
//! rings, is also what the fuzz targets in `fuzz/` drive devices with (the
//! `fuzzing` feature), behind the real virtio-mmio transport.

// A harness that cannot set itself up panics: that is a broken test.
#![allow(clippy::unwrap_used)]

#[cfg(test)]
use std::sync::atomic::{fence, AtomicBool, Ordering};
#[cfg(test)]
use std::sync::{Arc, Mutex};
#[cfg(test)]
use std::thread::JoinHandle;
#[cfg(test)]
use std::time::{Duration, Instant};

#[cfg(test)]
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::DescriptorTable;
#[cfg(test)]
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
#[cfg(test)]
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[cfg(test)]
use super::{DeviceQueue, Interrupt, VirtioDevice};

/// `VRING_DESC_F_NEXT` and `VRING_DESC_F_WRITE` as descriptor flags.
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

/// Where tests put their data buffers (queues live below).
pub const DATA: u64 = 0x10_0000;
pub const MEM_SIZE: usize = 0x40_0000;

/// Where the descriptor table of queue `q` lives.
#[must_use]
pub fn desc_table(q: usize) -> u64 {
    0x1_0000 * (q as u64 + 1)
}
/// Where the available ring of queue `q` lives.
#[must_use]
pub fn avail_ring(q: usize) -> u64 {
    desc_table(q) + 0x1000
}
/// Where the used ring of queue `q` lives.
#[must_use]
pub fn used_ring(q: usize) -> u64 {
    desc_table(q) + 0x2000
}

/// The driver's side of split queues laid out at [`desc_table`],
/// [`avail_ring`] and [`used_ring`]: it offers chains and reads what the
/// device used. Queue indices must be below the number of `sizes`.
#[derive(Debug, Default)]
pub struct Rings {
    sizes: Vec<u16>,
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
}

impl Rings {
    /// Fresh, zeroed rings of `sizes` in `mem`.
    pub fn new(mem: &GuestMemoryMmap, sizes: &[u16]) -> Self {
        for i in 0..sizes.len() {
            mem.write_slice(&[0u8; 0x3000], GuestAddress(desc_table(i)))
                .unwrap();
        }
        Self {
            sizes: sizes.to_vec(),
            next_desc: vec![0; sizes.len()],
            avail_idx: vec![0; sizes.len()],
        }
    }

    /// The size of each queue.
    #[must_use]
    pub fn sizes(&self) -> &[u16] {
        &self.sizes
    }

    /// Writes descriptors `(addr, len, flags, next)` from index `at` on
    /// (wrapping), and offers `at` as a chain head.
    pub fn raw_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        q: usize,
        descs: &[(u64, u32, u16, u16)],
        at: u16,
    ) {
        let size = self.sizes[q];
        let table = DescriptorTable::new(mem, GuestAddress(desc_table(q)), size);
        let mut index = at % size;
        for &(addr, len, flags, next) in descs {
            let d = SplitDescriptor::new(addr, len, flags, next);
            table.store(index, RawDescriptor::from(d)).unwrap();
            index = (index + 1) % size;
        }
        self.push_avail(mem, q, at);
    }

    /// Offers a chain of `(addr, len, flags)` buffers (NEXT is added).
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, q: usize, bufs: &[(u64, u32, u16)]) {
        let size = self.sizes[q];
        let head = self.next_desc[q];
        let table = DescriptorTable::new(mem, GuestAddress(desc_table(q)), size);
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
        self.push_avail(mem, q, head);
    }

    /// Puts `head` on the available ring (without checking it).
    pub fn push_avail(&mut self, mem: &GuestMemoryMmap, q: usize, head: u16) {
        let idx = self.avail_idx[q];
        let slot = u64::from(idx % self.sizes[q]);
        mem.write_obj(head, GuestAddress(avail_ring(q) + 4 + 2 * slot))
            .unwrap();
        self.avail_idx[q] = idx.wrapping_add(1);
        Self::set_avail_idx(mem, q, self.avail_idx[q]);
    }

    /// Writes the available ring's index as a (possibly lying) driver would.
    pub fn set_avail_idx(mem: &GuestMemoryMmap, q: usize, idx: u16) {
        mem.write_obj(idx, GuestAddress(avail_ring(q) + 2)).unwrap();
    }

    /// The used ring of queue `q`: (head, len) for each used chain.
    #[must_use]
    pub fn used(&self, mem: &GuestMemoryMmap, q: usize) -> Vec<(u32, u32)> {
        let idx = Self::used_idx(mem, q);
        (0..idx)
            .map(|i| {
                let slot = u64::from(i % self.sizes[q]);
                let e: VirtqUsedElem = mem
                    .read_obj(GuestAddress(used_ring(q) + 4 + 8 * slot))
                    .unwrap();
                (e.id(), e.len())
            })
            .collect()
    }

    /// The used ring's index of queue `q`.
    #[must_use]
    pub fn used_idx(mem: &GuestMemoryMmap, q: usize) -> u16 {
        mem.read_obj(GuestAddress(used_ring(q) + 2)).unwrap()
    }

    /// Whether the device asked the driver not to notify queue `q`
    /// (`VRING_USED_F_NO_NOTIFY` in the used ring's flags).
    #[must_use]
    pub fn no_notify(mem: &GuestMemoryMmap, q: usize) -> bool {
        let flags: u16 = mem.read_obj(GuestAddress(used_ring(q))).unwrap();
        flags & 1 != 0
    }
}

#[cfg(test)]
pub(crate) struct Harness<D: VirtioDevice + MutEventSubscriber + 'static> {
    pub mem: GuestMemoryMmap,
    pub dev: Arc<Mutex<D>>,
    pub interrupt: Arc<Interrupt>,
    manager: EventManager<Arc<Mutex<D>>>,
    notify: Vec<EventFd>,
    rings: Rings,
}

#[cfg(test)]
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
            rings: Rings::default(),
        };
        h.activate_again(sizes);
        h
    }

    /// Activates the device again (after [`reset`](Self::reset)), with fresh rings.
    pub fn activate_again(&mut self, sizes: &[u16]) {
        let max: Vec<u16> = self.dev.lock().unwrap().queue_max_sizes().to_vec();
        self.rings = Rings::new(&self.mem, sizes);
        self.notify = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let mut queues = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
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
        self.rings.raw_chain(&self.mem, q, descs, at);
    }

    /// Offers a chain of `(addr, len, flags)` buffers (NEXT is added).
    pub fn add_chain(&mut self, q: usize, bufs: &[(u64, u32, u16)]) {
        self.rings.add_chain(&self.mem, q, bufs);
    }

    /// Puts `head` on the available ring (without checking it).
    pub fn push_avail(&mut self, q: usize, head: u16) {
        self.rings.push_avail(&self.mem, q, head);
    }

    /// Writes the available ring's index as a (possibly lying) driver would.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        Rings::set_avail_idx(&self.mem, q, idx);
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
        if !Rings::no_notify(&self.mem, q) {
            self.notify[q].write(1).unwrap();
        }
        self.pump();
    }

    /// The used ring of queue `q`: (head, len) for each used chain.
    pub fn used(&self, q: usize) -> Vec<(u32, u32)> {
        self.rings.used(&self.mem, q)
    }

    /// One wake-up of the event loop (what the VMM's loop does between two
    /// looks at whether the VM must stop); returns the events it served.
    pub fn run_once(&mut self) -> usize {
        self.manager.run_with_timeout(0).unwrap()
    }

    /// The used ring's index of queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        Rings::used_idx(&self.mem, q)
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
        let size = self.rings.sizes[q];
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
        let mut avail = self.rings.avail_idx[q];
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
        let size = self.rings.sizes[q];
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
#[cfg(test)]
pub(crate) struct FullRingGuest {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
    _serial: std::sync::MutexGuard<'static, ()>,
}

#[cfg(test)]
static FULL_RING_TESTS: Mutex<()> = Mutex::new(());

#[cfg(test)]
impl FullRingGuest {
    /// Stops the driver; returns how many chains the device used meanwhile.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[cfg(test)]
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

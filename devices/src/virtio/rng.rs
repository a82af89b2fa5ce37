//! virtio-rng: entropy from the host's `getrandom`.

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::chain::{for_each_piece, in_memory, total_len, Buf};
use super::{
    ActivateError, Active, DeviceQueue, Interrupt, QueueEvents, VirtioDevice, FEATURE_VERSION_1,
};

const NAME: &str = "rng";
const QUEUE_SIZE: u16 = 64;
const MAX_DESCS: usize = 16;
/// Bytes served per request at most; the guest asks again for more.
const MAX_PER_REQUEST: u64 = 64 * 1024;
const CHUNK: usize = 4096;

/// A virtio entropy device (one request queue).
#[derive(Debug)]
pub struct Rng {
    acked_features: u64,
    events: QueueEvents,
    active: Option<Active>,
}

impl Rng {
    /// A new entropy device.
    ///
    /// # Errors
    /// Creating an eventfd failed.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            acked_features: 0,
            events: QueueEvents::new()?,
            active: None,
        })
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
        let result = loop {
            if left == 0 {
                break Ok(());
            }
            left -= 1;
            let (head, bufs) = match active.pop(0, MAX_DESCS) {
                Ok(Some(chain)) => chain,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let len = fill(&active.mem, &bufs);
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

/// Fills the writable buffers with random bytes (up to [`MAX_PER_REQUEST`]);
/// returns how many were written. A request with device-readable or
/// out-of-memory buffers gets nothing.
fn fill(mem: &GuestMemoryMmap, bufs: &[Buf]) -> u32 {
    if bufs.iter().any(|b| !b.writable) || !in_memory(mem, bufs) {
        crate::rate_limited!(debug, "virtio-rng: unusable request");
        return 0;
    }
    let want = total_len(bufs).min(MAX_PER_REQUEST);
    let mut chunk = [0u8; CHUNK];
    let mut written: u64 = 0;
    let result = for_each_piece(bufs, 0, want, |addr, n| {
        let mut done = 0;
        while done < n {
            let k = (n - done).min(CHUNK);
            getrandom(&mut chunk[..k])?;
            let at = vm_memory::Address::checked_add(&addr, done as u64)
                .ok_or_else(|| io::Error::other("address overflow"))?;
            mem.write_slice(&chunk[..k], at).map_err(io::Error::other)?;
            done += k;
            written += k as u64;
        }
        Ok::<(), io::Error>(())
    });
    if let Err(e) = result {
        crate::rate_limited!(warn, "virtio-rng: {e}");
    }
    u32::try_from(written).unwrap_or(0)
}

/// Fills `buf` from the kernel's CSPRNG.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes for the
        // duration of the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => done += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & FEATURE_VERSION_1;
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

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

impl MutEventSubscriber for Rng {
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
mod tests {
    use super::*;
    use crate::virtio::test_utils::{Harness, DATA, NEXT, WRITE as W};
    use vm_memory::GuestAddress;

    #[test]
    fn fills_buffers_with_entropy() {
        let mut h = Harness::new(Rng::new().unwrap(), &[16]);
        h.add_chain(0, &[(DATA, 64, W), (DATA + 0x1000, 64, W)]);
        h.notify(0);
        assert_eq!(h.used(0), vec![(0, 128)]);
        assert!(h.take_irq());
        let mut got = [0u8; 64];
        h.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got.iter().any(|&b| b != 0));
    }

    #[test]
    fn large_requests_are_capped() {
        let mut h = Harness::new(Rng::new().unwrap(), &[16]);
        h.add_chain(0, &[(DATA, 0x10_0000, W)]);
        h.notify(0);
        assert_eq!(h.used(0), vec![(0, 64 * 1024)]);
    }

    #[test]
    fn bad_requests_get_nothing() {
        let mut h = Harness::new(Rng::new().unwrap(), &[16]);
        // Device-readable, then outside guest memory.
        h.add_chain(0, &[(DATA, 64, 0)]);
        h.add_chain(0, &[(1 << 40, 64, W)]);
        h.notify(0);
        assert_eq!(h.used(0), vec![(0, 0), (1, 0)]);
        assert!(!h.needs_reset());
    }

    #[test]
    fn a_ring_kept_full_gets_a_queue_worth_per_wake_up() {
        let mut h = Harness::new(Rng::new().unwrap(), &[QUEUE_SIZE]);
        // Without the bound, the first wake-up would serve all 50000.
        let guest = h.full_ring_guest(0, |i| (DATA + u64::from(i) * 0x100, 64, W), 50_000);
        h.assert_bounded_while_kept_full(0, guest);
    }

    #[test]
    fn broken_rings_fail_the_device() {
        let mut h = Harness::new(Rng::new().unwrap(), &[16]);
        let next = NEXT;
        // A descriptor whose next index is past the queue.
        h.raw_chain(0, &[(DATA, 64, W | next, 99)], 0);
        h.notify(0);
        assert!(h.needs_reset());
        assert!(h.used(0).is_empty());

        // After a reset: an available index that runs ahead of the queue.
        h.reset();
        h.activate_again(&[16]);
        assert!(!h.needs_reset());
        h.set_avail_idx(0, 40);
        h.notify(0);
        assert!(h.needs_reset());
    }
}

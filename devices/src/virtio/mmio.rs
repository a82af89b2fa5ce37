//! The virtio-mmio transport, version 2 (virtio 1.1, section 4.2.2).

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_SHM_BASE_HIGH, VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_LEN_HIGH,
    VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceQueue, Interrupt, VirtioDevice, FEATURE_VERSION_1};
use crate::BusDevice;

/// Size of a virtio-mmio window on the MMIO bus (and in the kernel command line).
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of `QueueNotify` in the window: where the VMM registers one
/// ioeventfd per queue, with the queue index as datamatch (32-bit writes).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// "virt", little endian.
const MAGIC: u32 = 0x7472_6976;
/// The non-legacy virtio-mmio interface.
const VERSION: u32 = 2;
/// Vendor ID shown to the guest: "hull", little endian.
const VENDOR_ID: u32 = 0x6c6c_7568;

/// Status bits the driver may set.
const DRIVER_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED;

/// The kernel command-line fragment that declares a virtio-mmio device at
/// `base` raising `irq`: `virtio_mmio.device=4K@0x<base>:<irq>`.
#[must_use]
pub fn mmio_cmdline_fragment(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@0x{base:x}:{irq}")
}

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A queue size the device announced is not a power of two in 1..=32768.
    #[error("invalid maximum size {size} for queue {index}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// The announced size.
        size: u16,
    },
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
}

/// A virtio device behind its virtio-mmio register window.
///
/// Insert it on the MMIO bus at a `base` with length [`MMIO_LEN`]; register
/// [`interrupt_evt`](Self::interrupt_evt) as an irqfd and each of
/// [`queue_events`](Self::queue_events) as an ioeventfd at
/// `base + QUEUE_NOTIFY_OFFSET` with datamatch = its index.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    device_type: u32,
    device_features: u64,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver accepted a feature on a page past the second.
    driver_features_beyond: bool,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// The transport of `device`, whose queues live in `mem`.
    ///
    /// # Errors
    /// The device announced an invalid queue size, or an eventfd could not be created.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, TransportError> {
        let (device_type, device_features, sizes) = {
            let dev = device.lock().unwrap_or_else(PoisonError::into_inner);
            (
                dev.device_type(),
                dev.avail_features() | FEATURE_VERSION_1,
                dev.queue_max_sizes().to_vec(),
            )
        };
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| TransportError::QueueSize { index, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(TransportError::EventFd)?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new().map_err(TransportError::EventFd)?),
            device_type,
            device_features,
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_beyond: false,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// One notification event per queue, in queue order: register each as an
    /// ioeventfd on `base + QUEUE_NOTIFY_OFFSET` with datamatch = its index.
    #[must_use]
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt event: register it as an irqfd on the device's IRQ.
    #[must_use]
    pub fn interrupt_evt(&self) -> &EventFd {
        self.interrupt.irq()
    }

    /// The interrupt shared with the device.
    #[must_use]
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The `Status` register as the guest reads it.
    #[must_use]
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn lock_device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn has(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    /// Status has all of `set` and none of `clear`.
    fn status_is(&self, set: u32, clear: u32) -> bool {
        self.has(set) && self.status & clear == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    fn reset(&mut self) {
        self.lock_device().reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_beyond = false;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.clear();
    }

    fn features_ok(&self) -> bool {
        let unknown = self.driver_features & !self.device_features;
        if unknown != 0 || self.driver_features_beyond {
            crate::rate_limited!(
                warn,
                "virtio-mmio: the driver accepted unoffered features {unknown:#x}"
            );
            return false;
        }
        if self.driver_features & FEATURE_VERSION_1 == 0 {
            crate::rate_limited!(
                warn,
                "virtio-mmio: the driver did not accept VIRTIO_F_VERSION_1"
            );
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (q, evt)) in self.queues.iter().zip(&self.queue_evts).enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                crate::rate_limited!(warn, "virtio-mmio: queue {i} lies outside guest memory");
                self.interrupt.set_needs_reset();
                return;
            }
            let queue = match Queue::try_from(q.state()) {
                Ok(queue) => queue,
                Err(e) => {
                    crate::rate_limited!(warn, "virtio-mmio: queue {i} is invalid: {e}");
                    self.interrupt.set_needs_reset();
                    return;
                }
            };
            let notify = match evt.try_clone() {
                Ok(notify) => notify,
                Err(e) => {
                    crate::rate_limited!(error, "virtio-mmio: cannot duplicate a queue event: {e}");
                    self.interrupt.set_needs_reset();
                    return;
                }
            };
            queues.push(DeviceQueue { queue, notify });
        }
        let mem = self.mem.clone();
        let interrupt = Arc::clone(&self.interrupt);
        if let Err(e) = self.lock_device().activate(mem, interrupt, queues) {
            crate::rate_limited!(error, "virtio-mmio: cannot activate the device: {e}");
            self.interrupt.set_needs_reset();
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The device owns NEEDS_RESET; other unknown bits are ignored.
        let mut value = value & DRIVER_BITS;
        let old = self.status;
        if value & old != old {
            crate::rate_limited!(
                warn,
                "virtio-mmio: the driver cleared status bits ({old:#x} -> {value:#x})"
            );
            return;
        }
        let added = value & !old;
        let needs = |bit: u32, before: u32| added & bit == 0 || value & before == before;
        if !needs(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE)
            || !needs(VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER)
            || !needs(VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK)
        {
            crate::rate_limited!(
                warn,
                "virtio-mmio: status {value:#x} out of order (was {old:#x})"
            );
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            if self.features_ok() {
                self.lock_device().ack_features(self.driver_features);
            } else {
                // The driver reads the status back and sees the refusal.
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        // DRIVER_OK only counts once FEATURES_OK was accepted by an earlier
        // write (which the driver could read back, and after which it set up
        // its queues): one write of every bit activates nothing.
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && old & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            crate::rate_limited!(
                warn,
                "virtio-mmio: DRIVER_OK before FEATURES_OK was accepted (status {old:#x})"
            );
            value &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        self.status = value;
        if value & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && added & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && value & VIRTIO_CONFIG_S_FAILED == 0
        {
            self.activate();
        }
    }

    fn read_reg(&mut self, reg: u32) -> u32 {
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => low(self.device_features),
                1 => high(self.device_features),
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            // No shared memory regions: their length reads as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u32, v: u32) {
        // Queue registers are only writable between FEATURES_OK and DRIVER_OK,
        // driver features only between DRIVER and FEATURES_OK.
        let queue_setup = self.status_is(
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED,
        );
        let feature_setup = self.status_is(
            VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED,
        );
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if feature_setup => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32);
                }
                // Nothing is offered past the second page: accepting anything
                // there is refused at FEATURES_OK.
                _ => self.driver_features_beyond |= v != 0,
            },
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if queue_setup => {
                if let (Some(q), Ok(size)) = (self.selected_queue(), u16::try_from(v)) {
                    if q.try_set_size(size).is_err() {
                        crate::rate_limited!(warn, "virtio-mmio: invalid queue size {v}");
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_READY if queue_setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if queue_setup => {
                self.with_queue(|q| q.set_desc_table_address(Some(v), None));
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if queue_setup => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(v)));
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if queue_setup => {
                self.with_queue(|q| q.set_avail_ring_address(Some(v), None));
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if queue_setup => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(v)));
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if queue_setup => {
                self.with_queue(|q| q.set_used_ring_address(Some(v), None));
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if queue_setup => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(v)));
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally absorbed by the ioeventfd; this is the slow path.
                let evt = usize::try_from(v).ok().and_then(|i| self.queue_evts.get(i));
                if let Some(evt) = evt {
                    if let Err(e) = evt.write(1) {
                        crate::rate_limited!(warn, "virtio-mmio: cannot signal queue {v}: {e}");
                    }
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.write_status(v),
            _ => crate::rate_limited!(
                debug,
                "virtio-mmio: ignored write {v:#x} to register {reg:#x}"
            ),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

fn low(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

fn high(v: u64) -> u32 {
    u32::try_from(v >> 32).unwrap_or(0)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let offset = offset - u64::from(VIRTIO_MMIO_CONFIG);
            self.lock_device().read_config(offset, data);
            return;
        }
        data.fill(0);
        // Registers are 32 bits wide and accessed as such.
        let (Ok(reg), Ok(out)) = (u32::try_from(offset), <&mut [u8; 4]>::try_from(data)) else {
            return;
        };
        if reg % 4 != 0 {
            return;
        }
        *out = self.read_reg(reg).to_le_bytes();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let offset = offset - u64::from(VIRTIO_MMIO_CONFIG);
            // Configuration writes only make sense once the driver is there.
            if self.has(VIRTIO_CONFIG_S_DRIVER) {
                self.lock_device().write_config(offset, data);
            }
            return;
        }
        let (Ok(reg), Ok(bytes)) = (u32::try_from(offset), <[u8; 4]>::try_from(data)) else {
            return;
        };
        if reg % 4 != 0 {
            return;
        }
        self.write_reg(reg, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActivateError, INT_CONFIG_CHANGE, INT_USED_BUFFER};
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Dummy {
        acked: u64,
        config: [u8; 8],
        activations: Vec<Vec<DeviceQueue>>,
        resets: usize,
        fail_activation: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            FEATURE_VERSION_1 | 1 << 5
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let o = usize::try_from(offset).unwrap();
            self.config[o..o + data.len()].copy_from_slice(data);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            _interrupt: Arc<Interrupt>,
            queues: Vec<DeviceQueue>,
        ) -> Result<(), ActivateError> {
            if self.fail_activation {
                return Err(ActivateError::QueueCount {
                    expected: 0,
                    got: queues.len(),
                });
            }
            self.activations.push(queues);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let t = MmioTransport::new(mem, dev.clone()).unwrap();
        (t, dev)
    }

    fn rd(t: &mut MmioTransport, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, reg: u32, v: u32) {
        t.write(u64::from(reg), &v.to_le_bytes());
    }

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

    fn negotiate(t: &mut MmioTransport) {
        wr(t, VIRTIO_MMIO_STATUS, ACK);
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5);
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
    }

    fn negotiate_version_1(t: &mut MmioTransport) {
        wr(t, VIRTIO_MMIO_STATUS, ACK);
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
        assert_eq!(rd(t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK);
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u32) {
        wr(t, VIRTIO_MMIO_QUEUE_SEL, sel);
        wr(t, VIRTIO_MMIO_QUEUE_NUM, size);
        wr(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base);
        wr(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        wr(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000);
        wr(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        wr(t, VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000);
        wr(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = setup();
        assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
        // Registers want 32-bit accesses.
        let mut b = [0xffu8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(
            mmio_cmdline_fragment(0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(t.queue_events().len(), 2);
        assert_eq!(QUEUE_NOTIFY_OFFSET, u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
    }

    #[test]
    fn feature_negotiation() {
        let (mut t, dev) = setup();
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1 << 5);
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);

        // Driver features before DRIVER are ignored.
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5);
        assert_eq!(t.driver_features, 0);

        negotiate(&mut t);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK);
        assert_eq!(dev.lock().unwrap().acked, FEATURE_VERSION_1 | 1 << 5);
        // Too late to change features now.
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(t.driver_features, FEATURE_VERSION_1 | 1 << 5);
    }

    #[test]
    fn unoffered_features_or_no_version_1_are_refused() {
        let (mut t, dev) = setup();
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5 | 1 << 6);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV);
        assert_eq!(dev.lock().unwrap().acked, 0);

        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV);
    }

    #[test]
    fn one_write_of_every_status_bit_activates_nothing() {
        let (mut t, dev) = setup();
        // No negotiation at all.
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV);
        assert!(dev.lock().unwrap().activations.is_empty());
        assert_eq!(dev.lock().unwrap().acked, 0);

        // Bad features (unoffered bit 6), FEATURES_OK and DRIVER_OK together.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 6);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV);
        assert!(dev.lock().unwrap().activations.is_empty());

        // No VIRTIO_F_VERSION_1.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV);
        assert!(dev.lock().unwrap().activations.is_empty());

        // Good features, but FEATURES_OK and DRIVER_OK in one write: the
        // features are accepted, DRIVER_OK waits for a write of its own.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK);
        assert!(dev.lock().unwrap().activations.is_empty());
        setup_queue(&mut t, 0, 8, 0x1_0000);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK);
        assert_eq!(dev.lock().unwrap().activations.len(), 1);
    }

    #[test]
    fn bad_features_leave_features_ok_unset() {
        let (mut t, dev) = setup();
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV);
        // A feature on a page past the second: nothing is offered there.
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS) & FOK, 0);
        // Still refused when asked again, with DRIVER_OK.
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV);
        assert!(dev.lock().unwrap().activations.is_empty());
        assert_eq!(dev.lock().unwrap().acked, 0);
    }

    #[test]
    fn guest_triggered_warnings_are_rate_limited() {
        let (mut t, _) = setup();
        let count = crate::ratelimit::count_events(|| {
            for _ in 0..10_000 {
                wr(&mut t, VIRTIO_MMIO_STATUS, DRV);
            }
        });
        // One burst, perhaps a "suppressed" line if another test used the
        // same call site moments ago.
        assert!(count <= crate::ratelimit::BURST as usize + 1, "{count}");
        assert!(count > 0);
    }

    #[test]
    fn status_sequence_is_enforced() {
        let (mut t, _) = setup();
        wr(&mut t, VIRTIO_MMIO_STATUS, DRV);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | DOK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV);
        // Clearing a bit without a reset is refused.
        wr(&mut t, VIRTIO_MMIO_STATUS, DRV);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV);
        // NEEDS_RESET belongs to the device.
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACK | DRV | VIRTIO_CONFIG_S_NEEDS_RESET,
        );
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV);
    }

    #[test]
    fn queue_setup_and_activation() {
        let (mut t, dev) = setup();
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);

        // Queue writes before FEATURES_OK are ignored.
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);

        negotiate(&mut t);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        // Not a power of two: refused, the size stays.
        wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 6);
        assert_eq!(t.queues[0].size(), 8);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        // Queue 1 left unused.
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK);
        {
            let d = dev.lock().unwrap();
            assert_eq!(d.activations.len(), 1);
            let qs = &d.activations[0];
            assert_eq!(qs.len(), 2);
            assert!(qs[0].queue.ready());
            assert_eq!(qs[0].queue.size(), 8);
            assert_eq!(qs[0].queue.desc_table(), 0x1_0000);
            assert_eq!(qs[0].queue.avail_ring(), 0x1_1000);
            assert_eq!(qs[0].queue.used_ring(), 0x1_2000);
            assert!(!qs[1].queue.ready());
        }
        // Queue registers are frozen after DRIVER_OK.
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5_0000);
        assert_eq!(t.queues[0].desc_table(), 0x1_0000);

        // A notification that reaches the transport signals the queue's event,
        // which the device holds a duplicate of.
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(
            dev.lock().unwrap().activations[0][1].notify.read().unwrap(),
            1
        );
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
        assert!(t.queue_events()[0].read().is_err());
    }

    #[test]
    fn queue_outside_memory_needs_reset() {
        let (mut t, dev) = setup();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x20_0000); // past the 1 MiB of RAM
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert!(dev.lock().unwrap().activations.is_empty());
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS),
            ACK | DRV | FOK | DOK | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
        // Reset clears everything.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
    }

    #[test]
    fn failed_activation_needs_reset() {
        let (mut t, dev) = setup();
        dev.lock().unwrap().fail_activation = true;
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_ne!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
    }

    #[test]
    fn reset_restores_queues_and_interrupts() {
        let (mut t, dev) = setup();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        t.interrupt().signal_used_queue();
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), INT_USED_BUFFER);
        wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, INT_USED_BUFFER);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(t.queues[0].size(), 16);
        assert_eq!(t.driver_features, 0);

        // And the device can be brought up again.
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        assert_eq!(dev.lock().unwrap().activations.len(), 2);
    }

    /// Transport, device and event loop together, as the VMM wires them.
    #[test]
    fn end_to_end_with_the_event_loop() {
        use crate::virtio::Rng;
        use event_manager::{EventManager, SubscriberOps};
        use vm_memory::Bytes;

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut t = MmioTransport::new(mem.clone(), rng.clone()).unwrap();
        let mut events = EventManager::<Arc<Mutex<Rng>>>::new().unwrap();
        events.add_subscriber(rng);
        assert_eq!(events.run_with_timeout(0).unwrap(), 0);

        negotiate_version_1(&mut t);
        // Descriptor table at 0x1_0000, available ring at 0x1_1000, used at 0x1_2000.
        setup_queue(&mut t, 0, 16, 0x1_0000);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
        // The activate event: the device starts watching its queue.
        assert_eq!(events.run_with_timeout(0).unwrap(), 1);

        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&0x8_0000u64.to_le_bytes());
        desc[8..12].copy_from_slice(&32u32.to_le_bytes());
        desc[12..14].copy_from_slice(&2u16.to_le_bytes()); // device-writable
        mem.write_slice(&desc, GuestAddress(0x1_0000)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x1_1004)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x1_1002)).unwrap();
        // A notification that missed the ioeventfd (the slow path).
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(events.run_with_timeout(0).unwrap(), 1);

        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x1_2002)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1_2008)).unwrap(), 32);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), INT_USED_BUFFER);
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);

        // A reset takes the queue event out of epoll again.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(events.run_with_timeout(0).unwrap(), 1);
        t.queue_events()[0].write(1).unwrap();
        assert_eq!(events.run_with_timeout(0).unwrap(), 0);
    }

    #[test]
    fn config_space_goes_to_the_device() {
        let (mut t, dev) = setup();
        dev.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut b = [0u8; 2];
        t.read(0x102, &mut b);
        assert_eq!(b, [3, 4]);
        let mut b = [0xffu8; 4];
        t.read(0x106, &mut b);
        assert_eq!(b, [7, 8, 0, 0]);
        // Writes before DRIVER are dropped.
        t.write(0x100, &[9]);
        assert_eq!(dev.lock().unwrap().config[0], 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK);
        wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV);
        t.write(0x100, &[9]);
        assert_eq!(dev.lock().unwrap().config[0], 9);
    }
}

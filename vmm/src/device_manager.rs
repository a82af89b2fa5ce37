//! The virtio-mmio devices of a VM: where each one lives (MMIO window, IRQ),
//! the kernel command-line entries that announce them, and their wiring to
//! KVM (irqfd, ioeventfds) and to the event loop.

use std::fs::{File, OpenOptions};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::virtio::net::{Net, StreamBackend, TapBackend};
use devices::virtio::{
    mmio_cmdline_fragment, Block, Console, MmioTransport, Rng, VhostUserFs, VirtioDevice, MMIO_LEN,
    QUEUE_NOTIFY_OFFSET,
};
use devices::Bus;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::layout::MMIO_GAP_START;

/// First IRQ for virtio devices (4 is the serial console).
const FIRST_IRQ: u32 = 5;
/// Last IOAPIC pin.
const LAST_IRQ: u32 = 23;
/// Most virtio devices one VM can have: one IOAPIC pin each.
pub const MAX_DEVICES: usize = (LAST_IRQ - FIRST_IRQ + 1) as usize;

/// A disk to attach as virtio-blk.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    /// The host file backing it.
    pub path: PathBuf,
    /// Attach it read-only (the guest cannot write, and the file is opened read-only).
    pub read_only: bool,
    /// The serial the guest sees (`/sys/block/vdX/serial`), at most 20 bytes.
    pub serial: String,
    /// More files that follow `path` on the same (read-only) disk, each from
    /// a sector boundary: see [`devices::virtio::concat_layout`].
    pub then: Vec<PathBuf>,
}

/// A virtio-fs share: a vhost-user backend (virtiofsd) listening on
/// `socket`, seen by the guest under `tag`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FsShare {
    /// The backend's UNIX socket.
    pub socket: PathBuf,
    /// The virtio-fs tag (`mount -t virtiofs TAG DIR` in the guest).
    pub tag: String,
}

/// The guest's network interface (virtio-net).
#[derive(Debug)]
pub struct NetConfig {
    /// Where its frames go.
    pub backend: NetBackendConfig,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// The MTU announced to the guest.
    pub mtu: u16,
}

/// The host end of the guest's network interface.
#[derive(Debug)]
pub enum NetBackendConfig {
    /// A connected stream socket carrying length-prefixed frames (passt).
    Stream(UnixStream),
    /// A TAP interface of this name (opened, or created, by the VMM).
    Tap(String),
}

/// Errors attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A disk file cannot be opened.
    #[error("cannot open disk {path}")]
    OpenDisk {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A virtio-fs backend could not be reached.
    #[error("cannot connect virtio-fs share {tag} to {socket}")]
    Share {
        /// The tag.
        tag: String,
        /// The backend's socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: devices::virtio::FsError,
    },
    /// Too many devices for the IRQs there are.
    #[error("{0} virtio devices requested: a VM can have at most {MAX_DEVICES}")]
    TooMany(usize),
    /// A serial longer than virtio-blk allows.
    #[error("disk serial {0:?} is longer than 20 bytes")]
    Serial(String),
    /// Creating a device failed.
    #[error("cannot create the {what} device: {detail}")]
    Create {
        /// Which device.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// KVM refused an irqfd or ioeventfd.
    #[error("cannot wire the {what} device into KVM")]
    Kvm {
        /// Which device.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Devices whose host resources are open, ready to be placed in a VM.
#[derive(Debug)]
pub struct PendingDevices {
    disks: Vec<(Vec<File>, bool, String)>,
    net: Option<Net>,
    control: Option<UnixStream>,
    entropy: bool,
    shares: Vec<VhostUserFs>,
}

fn slot(index: usize) -> (u64, u32) {
    let i = u32::try_from(index).unwrap_or(u32::MAX);
    (MMIO_GAP_START + u64::from(i) * MMIO_LEN, FIRST_IRQ + i)
}

impl PendingDevices {
    /// Opens every disk (so a missing file is reported before anything else
    /// happens) and checks that everything fits.
    ///
    /// # Errors
    /// A disk cannot be opened, a serial is too long, or there are too many devices.
    pub fn open(
        disks: &[DiskConfig],
        control: Option<UnixStream>,
        entropy: bool,
    ) -> Result<Self, DeviceError> {
        let count = disks.len() + usize::from(control.is_some()) + usize::from(entropy);
        if count > MAX_DEVICES {
            return Err(DeviceError::TooMany(count));
        }
        let disks = disks
            .iter()
            .map(|d| {
                if d.serial.len() > 20 {
                    return Err(DeviceError::Serial(d.serial.clone()));
                }
                if !d.then.is_empty() && !d.read_only {
                    return Err(DeviceError::Create {
                        what: "virtio-blk",
                        detail: format!(
                            "disk {} concatenates files but is not read-only",
                            d.serial
                        ),
                    });
                }
                let files = std::iter::once(&d.path)
                    .chain(&d.then)
                    .map(|path| {
                        OpenOptions::new()
                            .read(true)
                            .write(!d.read_only)
                            .open(path)
                            .map_err(|source| DeviceError::OpenDisk {
                                path: path.clone(),
                                source,
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((files, d.read_only, d.serial.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            disks,
            control,
            entropy,
            net: None,
            shares: Vec::new(),
        })
    }

    /// Connects to every share's backend (so a missing one is reported
    /// before the VM starts).
    ///
    /// # Errors
    /// A backend cannot be reached, or there are too many devices.
    pub fn with_shares(mut self, shares: &[FsShare]) -> Result<Self, DeviceError> {
        let count = self.count() + shares.len();
        if count > MAX_DEVICES {
            return Err(DeviceError::TooMany(count));
        }
        for s in shares {
            let fs =
                VhostUserFs::connect(&s.socket, &s.tag).map_err(|source| DeviceError::Share {
                    tag: s.tag.clone(),
                    socket: s.socket.clone(),
                    source,
                })?;
            self.shares.push(fs);
        }
        Ok(self)
    }

    fn count(&self) -> usize {
        self.disks.len()
            + usize::from(self.control.is_some())
            + usize::from(self.entropy)
            + self.shares.len()
    }

    /// Opens the network interface's backend (so a bad TAP is reported
    /// before the VM starts).
    ///
    /// # Errors
    /// The backend cannot be opened, or there are too many devices.
    pub fn with_net(mut self, net: Option<NetConfig>) -> Result<Self, DeviceError> {
        let Some(net) = net else {
            return Ok(self);
        };
        if self.slots() + 1 > MAX_DEVICES {
            return Err(DeviceError::TooMany(self.slots() + 1));
        }
        let create = |detail: String| DeviceError::Create {
            what: "virtio-net",
            detail,
        };
        let backend: Box<dyn devices::virtio::net::NetBackend> = match net.backend {
            NetBackendConfig::Stream(stream) => {
                Box::new(StreamBackend::new(stream).map_err(|e| create(e.to_string()))?)
            }
            NetBackendConfig::Tap(name) => Box::new(
                TapBackend::open(&name)
                    .map_err(|e| create(format!("cannot open TAP interface {name}: {e}")))?,
            ),
        };
        self.net = Some(Net::new(backend, net.mac, net.mtu).map_err(|e| create(e.to_string()))?);
        Ok(self)
    }

    /// Every device's slot, the network interface's included.
    fn slots(&self) -> usize {
        self.count() + usize::from(self.net.is_some())
    }

    /// The kernel command-line entries announcing the devices, in slot order.
    #[must_use]
    pub fn cmdline(&self) -> String {
        (0..self.slots())
            .map(|i| {
                let (base, irq) = slot(i);
                mmio_cmdline_fragment(base, irq)
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Creates the devices, puts them on `mmio`, wires them into KVM and the
    /// event loop; returns the transports, which must live as long as the VM.
    ///
    /// # Errors
    /// A device could not be created or KVM refused its wiring.
    pub fn attach(
        self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        mmio: &mut Bus,
        events: &mut EventManager<Box<dyn MutEventSubscriber + Send>>,
    ) -> Result<Vec<Arc<Mutex<MmioTransport>>>, DeviceError> {
        let mut transports = Vec::new();
        let mut index = 0;
        let mut add = |what: &'static str,
                       device: Arc<Mutex<dyn VirtioDevice>>,
                       subscriber: Box<dyn MutEventSubscriber + Send>|
         -> Result<(), DeviceError> {
            let (base, irq) = slot(index);
            index += 1;
            let transport =
                MmioTransport::new(mem.clone(), device).map_err(|e| DeviceError::Create {
                    what,
                    detail: e.to_string(),
                })?;
            vm.register_irqfd(transport.interrupt_evt(), irq)
                .map_err(|source| DeviceError::Kvm { what, source })?;
            for (queue, evt) in (0u32..).zip(transport.queue_events()) {
                let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
                vm.register_ioevent(evt, &addr, queue)
                    .map_err(|source| DeviceError::Kvm { what, source })?;
            }
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(transport.clone(), base, MMIO_LEN)
                .map_err(|e| DeviceError::Create {
                    what,
                    detail: e.to_string(),
                })?;
            events.add_subscriber(subscriber);
            transports.push(transport);
            Ok(())
        };
        for (mut files, read_only, serial) in self.disks {
            let created = if files.len() == 1 {
                Block::new(files.remove(0), read_only, &serial)
            } else {
                Block::new_concat(files, &serial).map(|(blk, _)| blk)
            };
            let blk = created.map_err(|e| DeviceError::Create {
                what: "virtio-blk",
                detail: e.to_string(),
            })?;
            let blk = Arc::new(Mutex::new(blk));
            add("virtio-blk", blk.clone(), Box::new(blk))?;
        }
        if let Some(stream) = self.control {
            let console = Console::new(stream).map_err(|e| DeviceError::Create {
                what: "virtio-console",
                detail: e.to_string(),
            })?;
            let console = Arc::new(Mutex::new(console));
            add("virtio-console", console.clone(), Box::new(console))?;
        }
        if let Some(net) = self.net {
            let net = Arc::new(Mutex::new(net));
            add("virtio-net", net.clone(), Box::new(net))?;
        }
        for fs in self.shares {
            let fs = Arc::new(Mutex::new(fs));
            add("virtio-fs", fs.clone(), Box::new(fs))?;
        }
        if self.entropy {
            let rng = Rng::new().map_err(|e| DeviceError::Create {
                what: "virtio-rng",
                detail: e.to_string(),
            })?;
            let rng = Arc::new(Mutex::new(rng));
            add("virtio-rng", rng.clone(), Box::new(rng))?;
        }
        Ok(transports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_each_other_from_the_mmio_hole() {
        assert_eq!(slot(0), (0xd000_0000, 5));
        assert_eq!(slot(2), (0xd000_2000, 7));
        assert_eq!(slot(MAX_DEVICES - 1).1, LAST_IRQ);
    }

    #[test]
    fn cmdline_names_every_device() {
        let p = PendingDevices::open(&[], None, true).unwrap();
        assert_eq!(p.cmdline(), "virtio_mmio.device=4K@0xd0000000:5");
    }

    #[test]
    fn bad_disks_are_reported_before_anything_starts() {
        let missing = DiskConfig {
            path: "/nonexistent/disk".into(),
            read_only: true,
            serial: "x".into(),
            then: Vec::new(),
        };
        let err = PendingDevices::open(&[missing], None, false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk"), "{err}");
        let long = DiskConfig {
            path: "/dev/null".into(),
            read_only: true,
            serial: "x".repeat(21),
            then: Vec::new(),
        };
        assert!(matches!(
            PendingDevices::open(&[long], None, false),
            Err(DeviceError::Serial(_))
        ));
        let many = vec![
            DiskConfig {
                path: "/dev/null".into(),
                read_only: true,
                serial: "d".into(),
                then: Vec::new(),
            };
            MAX_DEVICES
        ];
        assert!(matches!(
            PendingDevices::open(&many, None, true),
            Err(DeviceError::TooMany(_))
        ));
        let writable_concat = DiskConfig {
            path: "/dev/null".into(),
            read_only: false,
            serial: "c".into(),
            then: vec!["/dev/null".into()],
        };
        assert!(PendingDevices::open(&[writable_concat], None, false).is_err());
    }
}

//! virtio-fs, served by a vhost-user backend (`virtiofsd`) over a UNIX socket.
//!
//! Why vhost-user and not a FUSE server inside the VMM (`fuse-backend-rs`,
//! as Kata's Dragonball does): the server that touches the host's file
//! system runs as a separate process in its own sandbox (mount, pid and net
//! namespaces, `pivot_root` into the shared directory, seccomp), so a guest
//! that breaks the FUSE server gets a process that sees only the shared
//! tree, not the VMM with every other resource of the VM. It is also the
//! way Cloud Hypervisor and QEMU do it, with Debian's own `virtiofsd`.
//!
//! The VMM only does the control plane: it forwards the virtio feature
//! negotiation, hands the backend the guest memory (which must then be
//! shared memory: a memfd, see `vmm::memory`), the rings' addresses, the
//! queues' notification eventfds (KVM ioeventfds, so guest kicks go straight
//! to the backend) and, as every queue's "call" eventfd, the device's KVM
//! irqfd: completions go from the backend to the guest without the VMM
//! (about a third less time per request than relaying each call through
//! the event loop, measured in the emulated host). The guest's virtio-mmio
//! handler reads `InterruptStatus` first, so for this device its
//! used-buffer bit stays set ([`Interrupt::set_sticky_used`]).
//!
//! Every vhost-user message is sent from the event loop (activation and
//! reset only record what to do and wake it), never from a vCPU thread.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, DeviceQueue, Interrupt, VirtioDevice, FEATURE_VERSION_1};

/// `VIRTIO_ID_FS`.
const VIRTIO_ID_FS: u32 = 26;
/// The longest tag virtio-fs allows.
pub const MAX_TAG_LEN: usize = 36;
/// One high-priority queue and one request queue.
const QUEUE_SIZES: [u16; 2] = [128, 1024];
/// Ring features the guest may get, if the backend has them: indirect
/// descriptors, event index. (No packed rings, no IOMMU: the transport
/// speaks split rings on guest-physical addresses only.)
const PASSTHROUGH_FEATURES: u64 = (1 << 28) | (1 << 29) | FEATURE_VERSION_1;
/// Event data of the activate event.
const ACTIVATE_DATA: u32 = u32::MAX;

/// Errors connecting to the backend.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty or too long.
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes")]
    Tag(String),
    /// The vhost-user conversation failed.
    #[error("vhost-user backend {what}")]
    Backend {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks a feature virtio-fs needs.
    #[error("the vhost-user backend does not offer VIRTIO_F_VERSION_1")]
    Features,
    /// An eventfd could not be made.
    #[error("cannot create an eventfd")]
    Event(#[source] io::Error),
}

fn backend(what: &'static str) -> impl Fn(vhost::Error) -> FsError {
    move |source| FsError::Backend { what, source }
}

/// What the event loop must do next.
#[derive(Debug)]
enum Pending {
    Nothing,
    Start {
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
    },
    Stop,
}

/// A running device: the rings the backend serves.
#[derive(Debug)]
struct Running {
    /// Queues handed to the backend.
    queues: usize,
    /// The guest's kicks (KVM ioeventfds) and the irqfd copies the backend
    /// signals, held for as long as it may use them.
    _fds: Vec<EventFd>,
}

/// A virtio-fs device whose requests a vhost-user backend serves.
pub struct VhostUserFs {
    frontend: Frontend,
    tag: String,
    backend_features: u64,
    acked_features: u64,
    activate: EventFd,
    pending: Pending,
    running: Option<Running>,
    failed: bool,
}

impl std::fmt::Debug for VhostUserFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFs")
            .field("tag", &self.tag)
            .field("backend_features", &self.backend_features)
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

impl VhostUserFs {
    /// Connects to the backend listening on `socket` and learns its
    /// features; the guest sees the file system under `tag`.
    ///
    /// # Errors
    /// A bad tag, no backend, or one without virtio 1.
    pub fn connect(socket: &Path, tag: &str) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > MAX_TAG_LEN {
            return Err(FsError::Tag(tag.to_string()));
        }
        let queues = u64::try_from(QUEUE_SIZES.len()).unwrap_or(2);
        let frontend = Frontend::connect(socket, queues).map_err(backend("connect"))?;
        frontend.set_owner().map_err(backend("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(backend("GET_FEATURES"))?;
        if backend_features & FEATURE_VERSION_1 == 0 {
            return Err(FsError::Features);
        }
        Ok(Self {
            frontend,
            tag: tag.to_string(),
            backend_features,
            acked_features: 0,
            activate: EventFd::new(EFD_NONBLOCK).map_err(FsError::Event)?,
            pending: Pending::Nothing,
            running: None,
            failed: false,
        })
    }

    fn wake(&self) -> Result<(), ActivateError> {
        self.activate.write(1).map_err(ActivateError::Signal)
    }

    /// Event loop: sets the backend up for `queues` and watches the call events.
    fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
        queues: Vec<DeviceQueue>,
    ) -> Result<(), FsError> {
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let with_protocol = self.backend_features & protocol != 0;
        self.frontend
            .set_features(self.acked_features | (self.backend_features & protocol))
            .map_err(backend("SET_FEATURES"))?;
        if with_protocol {
            let offered = self
                .frontend
                .get_protocol_features()
                .map_err(backend("GET_PROTOCOL_FEATURES"))?;
            self.frontend
                .set_protocol_features(offered & VhostUserProtocolFeatures::MQ)
                .map_err(backend("SET_PROTOCOL_FEATURES"))?;
        }
        let regions = memory_regions(mem)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(backend("SET_MEM_TABLE"))?;
        interrupt.set_sticky_used();
        let count = queues.len();
        let mut fds = Vec::with_capacity(2 * count);
        for (i, dq) in queues.into_iter().enumerate() {
            let call = interrupt.irq().try_clone().map_err(FsError::Event)?;
            let q = &dq.queue;
            self.frontend
                .set_vring_num(i, q.size())
                .map_err(backend("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &vring_addresses(mem, q)?)
                .map_err(backend("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, 0)
                .map_err(backend("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &call)
                .map_err(backend("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &dq.notify)
                .map_err(backend("SET_VRING_KICK"))?;
            if with_protocol {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(backend("SET_VRING_ENABLE"))?;
            }
            fds.push(call);
            fds.push(dq.notify);
        }
        self.running = Some(Running {
            queues: count,
            _fds: fds,
        });
        Ok(())
    }

    /// Event loop: stops the backend's rings.
    fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        for i in 0..running.queues {
            // GET_VRING_BASE stops the ring in the backend.
            if let Err(e) = self.frontend.get_vring_base(i) {
                crate::rate_limited!(warn, "virtio-fs: cannot stop ring {i}: {e}");
            }
        }
    }
}

/// The guest memory as the backend must map it: each region's memfd and
/// offset. Fails for anonymous (unshared) memory.
fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, FsError> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r).map_err(backend("memory: not shared"))
        })
        .collect()
}

/// The rings' addresses in this process (vhost-user speaks the frontend's
/// virtual addresses).
fn vring_addresses(mem: &GuestMemoryMmap, q: &Queue) -> Result<VringConfigData, FsError> {
    let hva = |gpa: GuestAddress| -> Result<u64, FsError> {
        mem.get_host_address(gpa)
            .map(|p| p as u64)
            .map_err(|_| FsError::Backend {
                what: "ring outside guest memory",
                source: vhost::Error::InvalidGuestMemory,
            })
    };
    Ok(VringConfigData {
        queue_max_size: q.max_size(),
        queue_size: q.size(),
        flags: 0,
        desc_table_addr: hva(GuestAddress(q.desc_table()))?,
        used_ring_addr: hva(GuestAddress(q.used_ring()))?,
        avail_ring_addr: hva(GuestAddress(q.avail_ring()))?,
        log_addr: None,
    })
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.backend_features & PASSTHROUGH_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut config = [0u8; MAX_TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[MAX_TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        crate::rate_limited!(
            warn,
            "virtio-fs: the driver wrote the read-only config space"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<DeviceQueue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        self.pending = Pending::Start {
            mem,
            interrupt,
            queues,
        };
        self.wake()
    }

    fn reset(&mut self) {
        self.pending = Pending::Stop;
        self.failed = false;
        if let Err(e) = self.wake() {
            crate::rate_limited!(
                warn,
                "virtio-fs: cannot wake the event loop after a reset: {e}"
            );
        }
    }
}

impl MutEventSubscriber for VhostUserFs {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() != ACTIVATE_DATA || events.fd() != self.activate.as_raw_fd() {
            return;
        }
        let _ = self.activate.read();
        match std::mem::replace(&mut self.pending, Pending::Nothing) {
            Pending::Nothing => {}
            Pending::Stop => self.stop(),
            Pending::Start {
                mem,
                interrupt,
                queues,
            } => {
                self.stop();
                if let Err(e) = self.start(&mem, &interrupt, queues) {
                    crate::rate_limited!(
                        error,
                        "virtio-fs {}: cannot start the backend: {e}; the device needs a reset",
                        self.tag
                    );
                    self.failed = true;
                    interrupt.set_needs_reset();
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate,
            ACTIVATE_DATA,
            EventSet::IN,
        )) {
            crate::rate_limited!(error, "virtio-fs: cannot watch the activate event: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_tags_and_missing_backends_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("none.sock");
        assert!(matches!(
            VhostUserFs::connect(&sock, &"t".repeat(37)),
            Err(FsError::Tag(_))
        ));
        assert!(matches!(
            VhostUserFs::connect(&sock, ""),
            Err(FsError::Tag(_))
        ));
        let err = VhostUserFs::connect(&sock, "share").unwrap_err();
        assert!(err.to_string().contains("connect"), "{err}");
    }

    /// A real virtiofsd (Debian's, from qemu-system-common) on a temporary
    /// directory: the handshake, the features and the config space.
    #[test]
    fn talks_vhost_user_with_debians_virtiofsd() {
        let (_dir, mut child, sock) = start_virtiofsd();
        let fs = VhostUserFs::connect(&sock, "myshare");
        let _ = child.kill();
        let _ = child.wait();
        let mut fs = fs.unwrap();
        assert_eq!(fs.device_type(), VIRTIO_ID_FS);
        assert_ne!(fs.avail_features() & FEATURE_VERSION_1, 0);
        assert_eq!(
            fs.avail_features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0,
            "the vhost-user-only bit is not offered to the guest"
        );
        let mut tag = [0u8; MAX_TAG_LEN + 4];
        fs.read_config(0, &mut tag);
        assert_eq!(&tag[..7], b"myshare");
        assert_eq!(tag[7], 0);
        assert_eq!(&tag[MAX_TAG_LEN..], &1u32.to_le_bytes());
        fs.ack_features(u64::MAX);
        assert_eq!(fs.acked_features, fs.avail_features());
    }

    /// The whole data path: FUSE_INIT on the request queue goes to
    /// virtiofsd through the guest memory it mapped and the kick eventfd,
    /// and its answer comes back as a used buffer and an interrupt.
    #[test]
    fn a_fuse_request_goes_through_virtiofsd_and_back() {
        use super::super::test_utils::{Harness, DATA, MEM_SIZE, WRITE};
        use vm_memory::Bytes;
        let (dir, mut child, sock) = start_virtiofsd();
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"test-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nobody else owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(MEM_SIZE as u64).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(vm_memory::FileOffset::new(file, 0)),
        )])
        .unwrap();
        let fs = VhostUserFs::connect(&sock, "t").unwrap();
        let features = fs.avail_features();
        let mut fs = fs;
        fs.ack_features(features);
        let mut h = Harness::with_memory(fs, &QUEUE_SIZES, mem);
        assert!(!h.needs_reset());
        // fuse_in_header (40 bytes) + fuse_init_in (7.31: 16 bytes).
        let mut req = Vec::new();
        for v in [56u32, 26] {
            req.extend_from_slice(&v.to_le_bytes());
        }
        req.extend_from_slice(&77u64.to_le_bytes()); // unique
        req.extend_from_slice(&0u64.to_le_bytes()); // nodeid
        req.extend_from_slice(&[0u8; 16]); // uid gid pid extlen pad
        for v in [7u32, 31, 0, 0] {
            req.extend_from_slice(&v.to_le_bytes());
        }
        h.mem.write_slice(&req, GuestAddress(DATA)).unwrap();
        h.add_chain(1, &[(DATA, 56, 0), (DATA + 0x1000, 256, WRITE)]);
        h.notify(1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while h.used_idx(1) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            h.pump();
        }
        let used = h.used(1);
        let _ = child.kill();
        let _ = child.wait();
        drop(dir);
        assert_eq!(used.len(), 1, "virtiofsd answered FUSE_INIT");
        let error: i32 = h.mem.read_obj(GuestAddress(DATA + 0x1004)).unwrap();
        let unique: u64 = h.mem.read_obj(GuestAddress(DATA + 0x1008)).unwrap();
        let major: u32 = h.mem.read_obj(GuestAddress(DATA + 0x1010)).unwrap();
        assert_eq!((error, unique, major), (0, 77, 7));
        assert!(h.take_irq(), "the backend signalled the irqfd itself");
        h.interrupt.ack(super::super::INT_USED_BUFFER);
        assert_ne!(
            h.interrupt.status() & super::super::INT_USED_BUFFER,
            0,
            "the driver always finds the used-buffer bit"
        );
    }

    fn start_virtiofsd() -> (tempfile::TempDir, std::process::Child, std::path::PathBuf) {
        let bin = std::path::Path::new("/usr/lib/qemu/virtiofsd");
        assert!(
            bin.is_file(),
            "install qemu-system-common (./dev setup does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let sock = dir.path().join("fs.sock");
        let child = std::process::Command::new(bin)
            .arg(format!("--socket-path={}", sock.display()))
            .arg("-o")
            .arg(format!("source={}", share.display()))
            .args(["-o", "sandbox=chroot", "-o", "log_level=err"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !sock.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        (dir, child, sock)
    }

    #[test]
    fn anonymous_memory_cannot_be_handed_to_a_backend() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        assert!(memory_regions(&mem).is_err());
    }
}

//! The image disk: an image's root file system, unpacked once into an ext4
//! disk and then shared, read-only, by every container of the image.
//!
//! The disk is keyed by what it holds: the hash of the image's layer chain
//! (the layers' diff IDs, which the store verified against the config's
//! `rootfs.diff_ids`) and the unpack recipe's version, as [`image_marker`]
//! writes it.
//! The guest writes the same marker into the disk last, and refuses a disk
//! whose marker is not exactly the one its container expects.
//!
//! It is built in a VM of its own that runs hull's init in *build-only*
//! mode: that VM unpacks the layers and ends, and nothing of the image ever
//! runs while the disk is writable. The disk is kept only if that VM ended
//! cleanly after the init reported success; any other ending (an error, a
//! crash, a signal to hull) throws it away. The build happens under a lock,
//! so that concurrent first runs of one image build it once.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hull_protocol::frame::{Frame, FrameDecoder};
use hull_protocol::spec::{
    image_marker, Compression as GuestCompression, LayerSpec, RootfsSpec, RunSpec,
    IMAGE_DISK_SERIAL, LAYERS_DISK_SERIAL, SCRATCH_DISK_SERIAL,
};
use images::{Compression, Image, Store};
use sha2::{Digest, Sha256};

use crate::container::Lock;
use crate::{disks, guest};

/// Guest memory of the build VM: room for the unpacker and the page cache.
const BUILD_MEMORY_MIB: u64 = 512;
/// The longest a build may take (a huge image under emulation takes
/// minutes; a build that runs longer is stuck and is stopped).
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Most guest notes logged for one build (the rest are counted).
const MAX_NOTES: usize = 64;
/// Longest guest message kept (the init's, but about hostile layers).
const MAX_MESSAGE: usize = 1024;

/// Errors building or finding an image disk.
#[derive(Debug, thiserror::Error)]
pub enum ImageDiskError {
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What hull was doing.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The build lock could not be taken.
    #[error(transparent)]
    Lock(#[from] crate::container::ContainerError),
    /// Formatting the empty disk failed.
    #[error(transparent)]
    Disk(#[from] disks::DiskError),
    /// The kernel or init could not be found.
    #[error(transparent)]
    Guest(#[from] guest::GuestError),
    /// The image's layers cannot be put on one disk.
    #[error("the image's layers are too large for one disk")]
    TooLarge,
    /// The build VM could not start or failed.
    #[error("building the root file system of image {image} failed: {reason}")]
    Build {
        /// The image's short id.
        image: String,
        /// What went wrong.
        reason: String,
    },
    /// hull was asked to stop while building.
    #[error("building the root file system of image {0} was interrupted")]
    Interrupted(String),
}

fn io_err(what: &'static str, path: &Path) -> impl Fn(std::io::Error) -> ImageDiskError {
    let path = path.to_path_buf();
    move |source| ImageDiskError::Io {
        what,
        path: path.clone(),
        source,
    }
}

/// The image's layer chain: the uncompressed layers' digests, bottom first,
/// as the store verified them against the image's config.
#[must_use]
pub fn chain(image: &Image) -> Vec<String> {
    image.diff_ids().into_iter().map(str::to_string).collect()
}

/// Where the finished disk of `image` lives: in the image's directory (so it
/// goes with the image), named by the hash of its marker.
#[must_use]
pub fn disk_path(store: &Store, image: &Image) -> PathBuf {
    let key = hex::encode(Sha256::digest(image_marker(&chain(image)).as_bytes()));
    store
        .image_dir(&image.id)
        .join(format!("rootfs-{}.ext4", &key[..32]))
}

/// The finished image disk of `image`, built first (in a build-only VM
/// booting `kernel`) when there is none yet.
///
/// # Errors
/// The build failed or was interrupted; nothing of it is left behind.
pub fn ensure(
    store: &Store,
    image: &Image,
    kernel: &Path,
    debug: bool,
) -> Result<PathBuf, ImageDiskError> {
    let path = disk_path(store, image);
    if path.is_file() {
        return Ok(path);
    }
    let dir = store.image_dir(&image.id);
    std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    let lock_path = dir.join("rootfs.lock");
    let _lock = Lock::exclusive(&lock_path)?;
    if path.is_file() {
        // Another hull built it while this one waited for the lock.
        return Ok(path);
    }
    remove_leftovers(&dir);
    let tmp = Building(dir.join(format!("rootfs.building-{}", std::process::id())));
    let layer_bytes: u64 = image.layers.iter().map(|l| l.size).sum();
    disks::make_ext4(&tmp.0, disks::image_disk_size(layer_bytes), "hull-image")?;
    let started = Instant::now();
    build(store, image, kernel, &tmp.0, debug)?;
    let file = std::fs::File::open(&tmp.0).map_err(io_err("cannot open", &tmp.0))?;
    file.sync_all().map_err(io_err("cannot sync", &tmp.0))?;
    // Nobody writes a finished disk again: read-only on the host too.
    file.set_permissions(std::fs::Permissions::from_mode(0o444))
        .map_err(io_err("cannot make read-only", &tmp.0))?;
    std::fs::rename(&tmp.0, &path).map_err(io_err("cannot keep the image disk", &path))?;
    std::mem::forget(tmp);
    tracing::debug!(
        "image {}: root file system built in {} ms",
        image.short_id(),
        started.elapsed().as_millis()
    );
    Ok(path)
}

/// A disk being built: removed unless it was kept.
struct Building(PathBuf);

impl Drop for Building {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Removes what an interrupted build (a killed hull) left in `dir`, and
/// disks of earlier recipes or of the old, id-keyed layout. Called with the
/// build lock held, so no build is under way.
fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("rootfs.building-")
            || name == "rootfs.ext4"
            || (name.starts_with("rootfs-") && name.ends_with(".ext4"))
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn guest_compression(c: Compression) -> GuestCompression {
    match c {
        Compression::None => GuestCompression::None,
        Compression::Gzip => GuestCompression::Gzip,
        Compression::Zstd => GuestCompression::Zstd,
    }
}

/// The build-only spec, and the disk holding every layer blob, as stored,
/// one after the other (read-only: no copy, any number of layers).
fn build_spec(
    store: &Store,
    image: &Image,
) -> Result<(RunSpec, Option<vmm::DiskConfig>), ImageDiskError> {
    let chain = chain(image);
    let sizes: Vec<u64> = image.layers.iter().map(|l| l.size).collect();
    let (offsets, _) = devices::virtio::concat_layout(&sizes).ok_or(ImageDiskError::TooLarge)?;
    let layers: Vec<LayerSpec> = image
        .layers
        .iter()
        .zip(offsets)
        .map(|(layer, offset)| LayerSpec {
            disk: LAYERS_DISK_SERIAL.into(),
            offset,
            size: layer.size,
            compression: guest_compression(layer.compression),
            digest: layer.digest.clone(),
        })
        .collect();
    let paths: Vec<PathBuf> = image
        .layers
        .iter()
        .map(|l| store.blob_path(&l.digest))
        .collect();
    let disk = paths.split_first().map(|(first, rest)| vmm::DiskConfig {
        path: first.clone(),
        read_only: true,
        serial: LAYERS_DISK_SERIAL.into(),
        then: rest.to_vec(),
    });
    let spec = RunSpec {
        args: Vec::new(),
        env: Vec::new(),
        cwd: "/".into(),
        user: String::new(),
        hostname: "hull-build".into(),
        stdin: false,
        rootfs: RootfsSpec {
            image_disk: IMAGE_DISK_SERIAL.into(),
            scratch_disk: SCRATCH_DISK_SERIAL.into(),
            chain,
            build: Some(layers),
        },
        ..RunSpec::default()
    };
    Ok((spec, disk))
}

/// Boots the build-only VM on the empty disk `target` and waits for it.
fn build(
    store: &Store,
    image: &Image,
    kernel: &Path,
    target: &Path,
    debug: bool,
) -> Result<(), ImageDiskError> {
    let failed = |reason: String| ImageDiskError::Build {
        image: image.short_id().to_string(),
        reason,
    };
    let (spec, layers_disk) = build_spec(store, image)?;
    let spec_json = serde_json::to_vec(&spec).map_err(|e| failed(e.to_string()))?;
    let initrd = guest::initramfs(&guest::init_binary()?, &store.root().join("cache"))?;
    let mut disks_cfg = vec![vmm::DiskConfig {
        path: target.to_path_buf(),
        read_only: false,
        serial: IMAGE_DISK_SERIAL.into(),
        then: Vec::new(),
    }];
    disks_cfg.extend(layers_disk);
    let (host_end, guest_end) =
        UnixStream::pair().map_err(|e| failed(format!("control stream: {e}")))?;
    // The console is not kept (the init reports over the control stream).
    let console = if debug {
        None
    } else {
        Some(std::fs::File::create("/dev/null").map_err(|e| failed(format!("/dev/null: {e}")))?)
    };
    // The guest unpacks the image's (hostile) layers: its VMM is jailed as a
    // container's is, under a directory of the store's run directory.
    let jail_dir = store
        .root()
        .join("run")
        .join(format!("build-{}", image.short_id()));
    let jail = if crate::jail::enabled() {
        let dir = &jail_dir;
        Some(
            crate::jail::plan(dir, image.short_id(), BUILD_MEMORY_MIB, 1000)
                .map_err(|e| failed(format!("cannot prepare the VMM's jail: {e}")))?,
        )
    } else {
        None
    };
    let launch = crate::vmmproc::Launch {
        boot: vmm::BootSource {
            kernel: kernel.to_path_buf(),
            initrd: Some(initrd),
            cmdline: crate::guest::CONTAINER_CMDLINE.into(),
        },
        memory_mib: BUILD_MEMORY_MIB,
        cpus: 1,
        disks: disks_cfg,
        shares: Vec::new(),
        control: guest_end,
        console,
        net: None,
        jail,
    };
    let signals = Signals::block().map_err(|e| failed(format!("signals: {e}")))?;
    let vm = crate::vmmproc::spawn(launch, debug).map_err(|e| failed(crate::error_chain(&e)))?;
    let exit_signal = vm.control();
    let talked = converse(&host_end, &spec_json, &signals, image.short_id());
    if talked.is_err() {
        exit_signal.exit(vmm::VmExit::Error("the image build was abandoned".into()));
    }
    drop(host_end);
    let (vm_exit, _) = vm.wait();
    let _ = std::fs::remove_dir(jail_dir.join("jail"));
    let _ = std::fs::remove_dir(&jail_dir);
    drop(signals);
    let outcome = talked?;
    match (outcome, vm_exit) {
        (Ok(()), Ok(exit)) if exit.is_clean() => Ok(()),
        (Ok(()), Ok(exit)) => Err(failed(format!("the build VM did not end cleanly: {exit}"))),
        (Ok(()), Err(e)) => Err(failed(crate::error_chain(&e))),
        (Err(reason), _) => Err(failed(reason)),
    }
}

/// Plays the host's side of the build: the spec after the first `Ready`, then waits
/// for the init's outcome and for the VM to close the stream. `Ok(Err(..))`:
/// the guest said the build failed (or never said it succeeded).
fn converse(
    stream: &UnixStream,
    spec_json: &[u8],
    signals: &Signals,
    image: &str,
) -> Result<Result<(), String>, ImageDiskError> {
    let deadline = Instant::now() + BUILD_TIMEOUT;
    let mut decoder = FrameDecoder::new();
    let mut reader = stream;
    let mut writer = stream;
    let mut outcome: Option<Result<(), String>> = None;
    let mut notes = 0usize;
    let mut spec_sent = false;
    // The spec is a few hundred bytes; a guest that does not read must not
    // hold this loop (and its deadline and signals) in a write.
    if let Err(e) = stream.set_write_timeout(Some(Duration::from_secs(10))) {
        return Ok(Err(format!("control stream: {e}")));
    }
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Err(format!(
                "it did not finish within {} minutes",
                BUILD_TIMEOUT.as_secs() / 60
            )));
        }
        let mut fds = [
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = i32::try_from(left.as_millis().min(1000)).unwrap_or(1000);
        // SAFETY: `fds` is a valid array of two pollfd records.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Ok(Err(format!("poll: {e}")));
        }
        if fds[1].revents & libc::POLLIN != 0 {
            signals.consume();
            return Err(ImageDiskError::Interrupted(image.to_string()));
        }
        if fds[0].revents == 0 {
            continue;
        }
        let want = decoder.room().clamp(1, buf.len());
        let n = match reader.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Ok(Err(format!("control stream: {e}"))),
        };
        if n == 0 {
            // The VM ended.
            return Ok(outcome.unwrap_or_else(|| Err("the build VM ended early".into())));
        }
        decoder.feed(&buf[..n]);
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Ok(Err(format!("the guest broke the protocol: {e}"))),
            };
            match frame {
                Frame::Ready if !spec_sent => {
                    spec_sent = true;
                    let bytes = Frame::Spec(spec_json.to_vec()).encode().map_err(|e| {
                        ImageDiskError::Build {
                            image: image.to_string(),
                            reason: e.to_string(),
                        }
                    })?;
                    if let Err(e) = writer.write_all(&bytes) {
                        return Ok(Err(format!("control stream: {e}")));
                    }
                }
                Frame::Note(_, text) => {
                    notes += 1;
                    if notes <= MAX_NOTES {
                        tracing::debug!("image {image}: guest: {}", truncate(&text));
                    }
                }
                Frame::Exited(0) => {
                    outcome.get_or_insert(Ok(()));
                }
                Frame::Exited(code) => {
                    outcome.get_or_insert(Err(format!("the guest init exited {code}")));
                }
                Frame::Failed { message, .. } => {
                    outcome.get_or_insert(Err(truncate(&message)));
                }
                _ => {}
            }
        }
    }
}

fn truncate(text: &str) -> String {
    if text.len() <= MAX_MESSAGE {
        return text.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// hull's terminating signals, held while a build runs (so that Ctrl-C
/// stops the build VM and removes its disk instead of leaving it), with the
/// thread's signal mask restored when dropped.
struct Signals {
    fd: OwnedFd,
    old: libc::sigset_t,
}

impl Signals {
    fn block() -> std::io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
        let mut set = unsafe { std::mem::zeroed::<libc::sigset_t>() };
        // SAFETY: as above.
        let mut old = unsafe { std::mem::zeroed::<libc::sigset_t>() };
        // SAFETY: `set` is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            // SAFETY: `set` is a valid sigset_t and `sig` a valid signal number.
            unsafe { libc::sigaddset(&mut set, sig) };
        }
        // SAFETY: both sets are valid; `old` receives the current mask.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        // SAFETY: `set` is initialised; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: `old` is the mask saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
            return Err(e);
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, old })
    }

    /// Reads the pending signals, so that they are not delivered (and kill
    /// hull before it cleaned up) once the mask is restored.
    fn consume(&self) {
        let mut info = [0u8; 128];
        // SAFETY: reading into a buffer of signalfd_siginfo's size (128
        // bytes) from our own non-blocking descriptor.
        while unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) } > 0 {
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        // SAFETY: `old` is the mask saved when the signals were blocked.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_guest_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_MESSAGE + 3);
        assert!(cut.ends_with("..."));
        assert_eq!(truncate("short"), "short");
    }
}

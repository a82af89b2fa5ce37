//! Finding the disks and building the container's root: the image disk
//! (unpacked from the layer disks on an image's first run), the scratch disk,
//! and the overlay of the two.
//!
//! Layout of the image disk: `rootfs/` (the image's root) and
//! [`COMPLETE_MARKER`] (written last: [`image_marker`] of the layer chain).

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::command::StartError;
use crate::init::channel::Channel;
use crate::spec::{image_marker, Compression, LayerSpec, RootfsSpec};
use crate::sys;
use crate::unpack::Unpacker;

/// Where the image disk is mounted.
pub const IMAGE_MNT: &str = "/hull/image";
/// Where the scratch disk is mounted.
pub const SCRATCH_MNT: &str = "/hull/scratch";
/// Where the container's root (the overlay) is mounted.
pub const NEW_ROOT: &str = "/hull/root";
/// The image's root inside the image disk.
pub const IMAGE_ROOT: &str = "/hull/image/rootfs";
/// Marker of a completely built image disk, at its top.
pub const COMPLETE_MARKER: &str = "hull-image-complete";

/// How long to wait for a disk to show up.
const DISK_WAIT: Duration = Duration::from_secs(3);

fn runtime(what: &str, e: &io::Error) -> StartError {
    StartError::new(125, format!("{what}: {e}"))
}

/// Open descriptors on the mounted disks, to sync and remount them at the end.
#[derive(Debug, Default)]
pub struct Mounted {
    /// The image disk's mount (read-only once built).
    pub image: Option<OwnedFd>,
    /// The scratch disk's mount.
    pub scratch: Option<OwnedFd>,
}

/// `/dev/vdX` for each virtio-blk serial.
fn scan_disks() -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(dir) = fs::read_dir("/sys/block") else {
        return out;
    };
    for ent in dir.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        if let Ok(serial) = fs::read(ent.path().join("serial")) {
            let serial = String::from_utf8_lossy(&serial)
                .trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .to_string();
            out.insert(serial, format!("/dev/{name}"));
        }
    }
    out
}

/// The device of each wanted serial, waiting a little for late ones.
pub(crate) fn find_disks(wanted: &[&str]) -> Result<HashMap<String, String>, StartError> {
    let deadline = Instant::now() + DISK_WAIT;
    loop {
        let found = scan_disks();
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|w| !found.contains_key(*w))
            .collect();
        if missing.is_empty() {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            return Err(StartError::new(
                125,
                format!("disk(s) not found: {}", missing.join(", ")),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn open_dir(path: &str) -> Result<OwnedFd, StartError> {
    let c = sys::cstr(path.as_bytes()).map_err(|e| runtime(path, &e))?;
    sys::open(&c, libc::O_RDONLY | libc::O_DIRECTORY, 0)
        .map_err(|e| runtime(&format!("open {path}"), &e))
}

fn mkdirs(path: &str) -> Result<(), StartError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|e| runtime(&format!("mkdir {path}"), &e))
}

fn mount_ext4(dev: &str, at: &str, flags: libc::c_ulong) -> Result<(), StartError> {
    sys::mount(dev, at, "ext4", flags, None)
        .map_err(|e| runtime(&format!("mount {dev} (ext4) on {at}"), &e))
}

/// Builds the container's root at [`NEW_ROOT`]: the image disk, read-only
/// (refused unless its marker names exactly `spec.chain`), the scratch disk,
/// the overlay.
///
/// # Errors
/// A disk is missing or is not this image's, a mount failed.
pub fn build(spec: &RootfsSpec, mounted: &mut Mounted) -> Result<(), StartError> {
    if spec.build.is_some() {
        return Err(StartError::new(
            125,
            "a container's image disk is never built in its own VM",
        ));
    }
    let disks = find_disks(&[spec.image_disk.as_str(), spec.scratch_disk.as_str()])?;
    let dev = |serial: &str| disks.get(serial).cloned().unwrap_or_default();
    for d in [IMAGE_MNT, SCRATCH_MNT, NEW_ROOT] {
        mkdirs(d)?;
    }
    mount_ext4(
        &dev(&spec.image_disk),
        IMAGE_MNT,
        libc::MS_RDONLY | libc::MS_NOATIME | libc::MS_NODEV | libc::MS_NOSUID,
    )?;
    mounted.image = Some(open_dir(IMAGE_MNT)?);
    check_marker(&spec.chain)?;

    mount_ext4(&dev(&spec.scratch_disk), SCRATCH_MNT, libc::MS_NOATIME)?;
    mounted.scratch = Some(open_dir(SCRATCH_MNT)?);
    mount_overlay(IMAGE_ROOT, SCRATCH_MNT, NEW_ROOT)
}

/// Refuses an image disk whose marker is not exactly the one `chain` gives:
/// an unfinished disk, or one built from other layers or by another recipe.
fn check_marker(chain: &[String]) -> Result<(), StartError> {
    let expected = image_marker(chain);
    let path = Path::new(IMAGE_MNT).join(COMPLETE_MARKER);
    let mut found = Vec::new();
    let read = fs::File::open(&path).and_then(|f| {
        // One byte more than expected is enough to tell a longer marker.
        f.take(expected.len() as u64 + 1).read_to_end(&mut found)
    });
    match read {
        Ok(_) if found == expected.as_bytes() => Ok(()),
        Ok(_) => Err(StartError::new(
            125,
            "the image disk was built from other layers than this image's: remove the image and load it again",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StartError::new(
            125,
            "the image disk holds no complete root file system (an earlier build was interrupted?)",
        )),
        Err(e) => Err(runtime("read the image disk's marker", &e)),
    }
}

/// Build-only mode: unpacks `spec.build`'s layers into the empty, writable
/// image disk, writes its marker last, syncs and unmounts it.
///
/// # Errors
/// A disk is missing, a layer is bad, a mount or a write failed.
pub fn build_image_disk(spec: &RootfsSpec, chan: &Channel) -> Result<(), StartError> {
    let layers = spec.build.as_deref().unwrap_or_default();
    if layers.len() != spec.chain.len() {
        return Err(StartError::new(
            125,
            format!(
                "the build names {} layers but the image's chain has {}",
                layers.len(),
                spec.chain.len()
            ),
        ));
    }
    let mut wanted = vec![spec.image_disk.as_str()];
    wanted.extend(layers.iter().map(|l| l.disk.as_str()));
    let disks = find_disks(&wanted)?;
    let dev = |serial: &str| disks.get(serial).cloned().unwrap_or_default();
    mkdirs(IMAGE_MNT)?;
    mount_ext4(
        &dev(&spec.image_disk),
        IMAGE_MNT,
        libc::MS_NOATIME | libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC,
    )?;
    build_image(layers, &spec.chain, &dev, chan)?;
    let top = open_dir(IMAGE_MNT)?;
    sys::syncfs(top.as_fd()).map_err(|e| runtime("syncfs of the image disk", &e))?;
    drop(top);
    sys::umount(IMAGE_MNT, 0).map_err(|e| runtime("unmount the image disk", &e))
}

/// Mounts the overlay of `lower` under `scratch`'s `upper/` (with `work/`)
/// at `target`, creating `upper/` and `work/` when missing.
///
/// # Errors
/// A directory or the mount could not be made.
pub fn mount_overlay(lower: &str, scratch: &str, target: &str) -> Result<(), StartError> {
    for d in ["upper", "work"] {
        mkdirs(&format!("{scratch}/{d}"))?;
    }
    let opts = format!("lowerdir={lower},upperdir={scratch}/upper,workdir={scratch}/work");
    // The image disk and the scratch disk are two file systems: without
    // `xino` a directory's inode number from readdir (the real one) and from
    // stat (overlay's own) disagree, and an inode number changes at copy-up.
    // `xino=on` maps both layers into one inode space (ext4's numbers fit in
    // 32 bits), so `stat` and `readdir` agree across layers, as on one file
    // system; `index=on` keeps hard links linked when one is copied up.
    // Older kernels without them get the plain overlay.
    let mut last = None;
    for extra in [",xino=on,index=on", ",xino=on", ""] {
        match sys::mount(
            "overlay",
            target,
            "overlay",
            0,
            Some(&format!("{opts}{extra}")),
        ) {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(runtime(
        "mount the overlay root",
        &last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)),
    ))
}

/// Unpacks every layer into [`IMAGE_ROOT`] (cleared first: a disk left by an
/// interrupted build starts over), then writes the marker.
fn build_image(
    layers: &[LayerSpec],
    chain: &[String],
    dev_of: &dyn Fn(&str) -> String,
    chan: &Channel,
) -> Result<(), StartError> {
    let started = Instant::now();
    let root = Path::new(IMAGE_ROOT);
    let _ = fs::remove_file(Path::new(IMAGE_MNT).join(COMPLETE_MARKER));
    if root.exists() {
        fs::remove_dir_all(root).map_err(|e| runtime("clear the image disk", &e))?;
    }
    mkdirs(IMAGE_ROOT)?;
    let totals = unpack_layers(root, layers, dev_of, &|n| chan.note(n))?;
    fs::write(
        Path::new(IMAGE_MNT).join(COMPLETE_MARKER),
        image_marker(chain),
    )
    .map_err(|e| runtime("write the image marker", &e))?;
    chan.note(format!(
        "unpacked {} layers ({} compressed, {} of files, {} entries) in {} ms",
        layers.len(),
        mb(totals.compressed),
        mb(totals.written),
        totals.entries,
        started.elapsed().as_millis()
    ));
    Ok(())
}

/// The decompressed tar stream of a layer whose blob is at the start of
/// `dev` (a disk, padded to whole sectors; or any file).
///
/// # Errors
/// `dev` cannot be opened, or the zstd decoder cannot start.
pub fn open_layer(dev: &str, layer: &LayerSpec) -> io::Result<Box<dyn Read>> {
    let mut disk = fs::File::open(dev)?;
    std::io::Seek::seek(&mut disk, std::io::SeekFrom::Start(layer.offset))?;
    let raw = BufReader::with_capacity(1 << 20, disk.take(layer.size));
    Ok(match layer.compression {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(raw)?),
    })
}

/// Totals of [`unpack_layers`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Compressed bytes read.
    pub compressed: u64,
    /// Bytes of file contents written.
    pub written: u64,
    /// Entries applied.
    pub entries: u64,
}

/// Applies `layers`, in order, onto `root`; `dev_of` maps a layer's disk
/// serial to its device; `note` gets per-layer notes.
///
/// # Errors
/// A layer cannot be read or is refused (125; the message names the layer).
pub fn unpack_layers(
    root: &Path,
    layers: &[LayerSpec],
    dev_of: &dyn Fn(&str) -> String,
    note: &dyn Fn(String),
) -> Result<Totals, StartError> {
    let mut unpacker = Unpacker::new(root).map_err(|e| runtime("open the image root", &e))?;
    let mut totals = Totals::default();
    for (i, layer) in layers.iter().enumerate() {
        let t = Instant::now();
        let label = format!("layer {i} ({})", layer.digest);
        let dev = dev_of(&layer.disk);
        let input =
            open_layer(&dev, layer).map_err(|e| runtime(&format!("{label}: open {dev}"), &e))?;
        let mut layer_note = |n: String| note(format!("{label}: {n}"));
        let stats = unpacker
            .apply(input, &label, &mut layer_note)
            .map_err(|e| StartError::new(125, e.0))?;
        totals.compressed += layer.size;
        totals.written += stats.bytes;
        totals.entries += stats.entries;
        note(format!(
            "{label}: {} entries, {} in {} ms",
            stats.entries,
            mb(stats.bytes),
            t.elapsed().as_millis()
        ));
    }
    Ok(totals)
}

fn mb(bytes: u64) -> String {
    format!("{}.{} MB", bytes / 1_000_000, bytes % 1_000_000 / 100_000)
}

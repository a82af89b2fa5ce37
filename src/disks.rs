//! The disks of a container VM: the image's root file system (ext4, built
//! once by the guest init and then shared read-only by every container of
//! that image) and each container's writable scratch disk.
//!
//! hull formats empty ext4 file systems with e2fsprogs' `mkfs.ext4` on the
//! host; everything that comes from the image is unpacked inside the guest,
//! so hostile layer content never touches the host's file system.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors preparing disks.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
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
    /// mkfs.ext4 is missing or failed.
    #[error("cannot format {path}: {detail} (hull needs e2fsprogs: apt-get install e2fsprogs)")]
    Mkfs {
        /// The disk file.
        path: PathBuf,
        /// What mkfs said.
        detail: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl Fn(std::io::Error) -> DiskError {
    let path = path.to_path_buf();
    move |source| DiskError::Io {
        what,
        path: path.clone(),
        source,
    }
}

/// Creates a sparse file of `size` bytes holding an empty ext4 file system.
///
/// No journal (the image disk is written once; a scratch disk dies with its
/// container) and lazy inode-table initialisation keep mkfs fast and the file
/// sparse.
///
/// # Errors
/// The file cannot be created or mkfs.ext4 failed.
pub fn make_ext4(path: &Path, size: u64, label: &str) -> Result<(), DiskError> {
    let file = File::create(path).map_err(io_err("cannot create disk", path))?;
    file.set_len(size)
        .map_err(io_err("cannot size disk", path))?;
    drop(file);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-L", label])
        .args(["-E", "lazy_itable_init=1,nodiscard"])
        .arg(path)
        .output()
        .map_err(|e| DiskError::Mkfs {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(path);
        return Err(DiskError::Mkfs {
            path: path.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Copies bytes `[from, to)` of `src` to the same place in `dst` by reads
/// and writes.
fn copy_range(src: &File, dst: &File, from: libc::off_t, to: libc::off_t) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let (mut at, end) = (
        u64::try_from(from).unwrap_or(0),
        u64::try_from(to).unwrap_or(0),
    );
    let mut buf = vec![0u8; 1 << 20];
    while at < end {
        let want = usize::try_from(end - at)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = src.read_at(&mut buf[..want], at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        dst.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// How big an image's root disk is made: room for the layers unpacked plus
/// slack. Text-heavy layers (sources, node_modules) compress five- to
/// eightfold and small files cost a 4 KiB block each, so the room is eight
/// times the compressed size and a GiB. The file is sparse and the inode
/// tables are initialised lazily, so unused room costs nothing.
#[must_use]
pub fn image_disk_size(layers_bytes: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    (layers_bytes.saturating_mul(8).saturating_add(1024 * MIB)).div_ceil(MIB) * MIB
}

/// Size of a container's scratch disk (sparse).
pub const SCRATCH_DISK_SIZE: u64 = 4 << 30;

/// Makes `path` a fresh, empty scratch disk: a sparse copy of a template
/// formatted once into `cache_dir` (running mkfs.ext4 for every container
/// cost a process start and 90 ms in the emulated test host; copying the
/// template's 4 MiB of metadata costs a few). Every scratch disk has the
/// template's UUID, which only ever meets its own VM.
///
/// # Errors
/// The template cannot be made or copied.
pub fn make_scratch(path: &Path, cache_dir: &Path) -> Result<(), DiskError> {
    // The name changes with the size and with how make_ext4 formats (v1).
    let template = cache_dir.join(format!("scratch-v1-{SCRATCH_DISK_SIZE}.ext4"));
    if !template.is_file() {
        std::fs::create_dir_all(cache_dir).map_err(io_err("cannot create", cache_dir))?;
        // Made aside and renamed in: a concurrent start never copies half.
        let tmp = cache_dir.join(format!(".scratch.{}", std::process::id()));
        let made = make_ext4(&tmp, SCRATCH_DISK_SIZE, "hull-scratch").and_then(|()| {
            std::fs::rename(&tmp, &template).map_err(io_err("cannot create", &template))
        });
        if made.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        made?;
    }
    copy_sparse(&template, path).map_err(|e| {
        let _ = std::fs::remove_file(path);
        io_err("cannot copy the scratch disk template to", path)(e)
    })
}

/// Copies `from` to a new file `to`, holes and all: only the data extents
/// (SEEK_DATA/SEEK_HOLE) are copied, with copy_file_range. std::fs::copy
/// would write every hole out as zeros (4 GiB for a scratch disk), and no
/// well-kept crate copies sparsely.
fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    let dst = File::create(to)?;
    dst.set_len(len)?;
    let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut at: libc::off_t = 0;
    let end =
        libc::off_t::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    while at < end {
        // SAFETY: lseek on a descriptor this function owns.
        let data = unsafe { libc::lseek(s, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data past `at`, only a hole to the end.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(s, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = usize::try_from(hole - off_in).unwrap_or(usize::MAX);
            // SAFETY: both descriptors are open and owned here; the offsets
            // are locals the call updates.
            let n = unsafe { libc::copy_file_range(s, &mut off_in, d, &mut off_out, want, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                let unsupported = [libc::ENOSYS, libc::EXDEV, libc::EOPNOTSUPP, libc::EINVAL];
                if !e.raw_os_error().is_some_and(|c| unsupported.contains(&c)) {
                    return Err(e);
                }
                // A file system (or pair) copy_file_range does not serve.
                copy_range(&src, &dst, off_in, hole)?;
                break;
            }
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        at = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_disk_has_room_and_whole_mebibytes() {
        assert_eq!(image_disk_size(0), 1 << 30);
        let s = image_disk_size(10_000_001);
        assert!(s >= 80_000_008 + (1 << 30));
        assert_eq!(s % (1 << 20), 0);
    }

    #[test]
    fn mkfs_makes_a_sparse_ext4() {
        let dir = std::env::temp_dir().join(format!("hull-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("scratch.ext4");
        make_ext4(&disk, 1 << 30, "test").expect("mkfs.ext4 (e2fsprogs) must be installed");
        let meta = std::fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        assert!(allocated < 64 << 20, "{allocated} bytes allocated");
        // The ext4 superblock magic 0xef53 at byte 1024 + 0x38.
        let mut bytes = [0u8; 2048];
        std::io::Read::read_exact(&mut File::open(&disk).unwrap(), &mut bytes).unwrap();
        assert_eq!(&bytes[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn scratch_disks_are_sparse_copies_of_one_template() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let (a, b) = (dir.path().join("a.ext4"), dir.path().join("b.ext4"));
        make_scratch(&a, &cache).unwrap();
        make_scratch(&b, &cache).unwrap();
        let template = std::fs::read_dir(&cache).unwrap().count();
        assert_eq!(template, 1, "one template, no leftovers");
        for disk in [&a, &b] {
            let meta = std::fs::metadata(disk).unwrap();
            assert_eq!(meta.len(), SCRATCH_DISK_SIZE);
            let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
            assert!(allocated < 64 << 20, "{allocated} bytes allocated");
        }
        // The same bytes as the template, checked where ext4 keeps them:
        // the superblock and the first block groups' metadata.
        let head = |p: &Path| {
            let mut bytes = vec![0u8; 8 << 20];
            std::io::Read::read_exact(&mut File::open(p).unwrap(), &mut bytes).unwrap();
            bytes
        };
        assert_eq!(head(&a), head(&b));
        assert_eq!(&head(&a)[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef]);
        // A copy starts from the template, not from what a container wrote.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&a)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        make_scratch(&a, &cache).unwrap();
        assert_eq!(std::fs::metadata(&a).unwrap().len(), SCRATCH_DISK_SIZE);
        assert_eq!(head(&a), head(&b));
    }

    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        let mut f = File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        for at in [0u64, 5 << 20, (64 << 20) - 3] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(b"abc").unwrap();
        }
        drop(f);
        copy_sparse(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&to).unwrap());
        assert!(blocks * 512 < 1 << 20, "{blocks} blocks");
    }
}

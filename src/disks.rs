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
}

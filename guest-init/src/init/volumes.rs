//! The container's volumes, bind mounts (virtio-fs shares) and tmpfs
//! mounts, made in its root before it starts, and `--read-only`.
//!
//! Every target is resolved inside the container's root (`openat2` with
//! `RESOLVE_IN_ROOT`: an image's symlinks cannot lead a mount out of it),
//! missing directories are created, and the mount goes onto the resolved
//! directory through its `/proc/self/fd` link, as runc does.
//!
//! A volume disk is mounted under `/hull/vol/<serial>` and its `_data/` is
//! bind-mounted at the target. A volume without `_data/` is new: it gets
//! a copy of what the image has at the target (owners, modes, times,
//! symlinks, device nodes), as docker fills an empty volume.

use std::ffi::{CStr, CString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::command::StartError;
use crate::spec::{MountSource, MountSpec, VOLUME_DATA_DIR};
use crate::sys;

/// The volume file systems' mounts, to sync and remount read-only at the end.
static MOUNTED: std::sync::Mutex<Vec<OwnedFd>> = std::sync::Mutex::new(Vec::new());

/// At the end: syncs every volume and remounts it read-only, so its journal
/// is clean for the next container (best effort).
pub fn finish() {
    let fds = std::mem::take(
        &mut *MOUNTED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for fd in &fds {
        let _ = sys::syncfs(fd.as_fd());
        crate::init::mounts::remount_ro(fd.as_fd());
    }
}

/// Where volume disks are mounted.
const VOLUMES_MNT: &str = "/hull/vol";
/// Deepest directory tree copied into a new volume.
const MAX_COPY_DEPTH: usize = 128;
/// `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`.
const RESOLVE: u64 = 0x10 | 0x02;

fn err(what: &str, e: &io::Error) -> StartError {
    StartError::new(125, format!("{what}: {e}"))
}

fn c(s: &str) -> io::Result<CString> {
    sys::cstr(s.as_bytes())
}

fn fd_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Opens directory `path` (absolute, in the container's terms) inside
/// `root`, creating missing directories (0755, root's) on the way.
///
/// # Errors
/// A component is not a directory, or cannot be made.
pub fn open_in_root(root: BorrowedFd<'_>, path: &str) -> io::Result<OwnedFd> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut dir = sys::openat(root, c".", libc::O_PATH | libc::O_DIRECTORY, 0)?;
    for i in 0..parts.len() {
        let sub = c(&parts[..=i].join("/"))?;
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        dir = match sys::openat2(root, &sub, flags, RESOLVE) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // `dir` is the parent, resolved in the root; O_PATH descriptors
                // cannot be written through, so reopen it as a directory.
                let parent = sys::openat(dir.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
                match sys::mkdirat(parent.as_fd(), &c(parts[i])?, 0o755) {
                    Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
                    _ => {}
                }
                sys::openat2(root, &sub, flags, RESOLVE)?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(dir)
}

/// Mounts everything in `mounts` into the root at `root` (before the switch
/// into it), in order.
///
/// # Errors
/// A disk is missing, a target cannot be made, a mount failed.
pub fn mount_all(root: &str, mounts: &[MountSpec]) -> Result<(), StartError> {
    if mounts.is_empty() {
        return Ok(());
    }
    let serials: Vec<&str> = mounts
        .iter()
        .filter_map(|m| match &m.source {
            MountSource::Volume { serial } => Some(serial.as_str()),
            _ => None,
        })
        .collect();
    let disks = crate::init::rootfs::find_disks(&serials)?;
    let root_fd = sys::open(
        &c(root).map_err(|e| err(root, &e))?,
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| err(&format!("open {root}"), &e))?;
    for m in mounts {
        let target = open_in_root(root_fd.as_fd(), &m.target)
            .map_err(|e| err(&format!("mount point {}", m.target), &e))?;
        let ro = if m.read_only { libc::MS_RDONLY } else { 0 };
        match &m.source {
            MountSource::Virtiofs { tag } => {
                sys::mount(tag, &fd_path(target.as_fd()), "virtiofs", ro, None)
                    .map_err(|e| err(&format!("mount share {tag} on {}", m.target), &e))?;
            }
            MountSource::Tmpfs { size, mode, exec } => {
                let mut flags = libc::MS_NOSUID | libc::MS_NODEV | ro;
                if !exec {
                    flags |= libc::MS_NOEXEC;
                }
                let mut opts = format!("mode={mode:o}");
                if let Some(s) = size {
                    opts.push_str(&format!(",size={s}"));
                }
                sys::mount(
                    "tmpfs",
                    &fd_path(target.as_fd()),
                    "tmpfs",
                    flags,
                    Some(&opts),
                )
                .map_err(|e| err(&format!("mount tmpfs on {}", m.target), &e))?;
            }
            MountSource::Volume { serial } => {
                let dev = disks.get(serial.as_str()).cloned().unwrap_or_default();
                mount_volume(&dev, serial, target.as_fd(), m.read_only)
                    .map_err(|e| err(&format!("volume on {}", m.target), &e))?;
                if m.read_only {
                    // A bind mount takes MS_RDONLY only in a remount, of the
                    // new mount: reopened, the target is its root.
                    let top = open_in_root(root_fd.as_fd(), &m.target)
                        .map_err(|e| err(&format!("mount point {}", m.target), &e))?;
                    sys::mount(
                        "",
                        &fd_path(top.as_fd()),
                        "",
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        None,
                    )
                    .map_err(|e| err(&format!("make {} read-only", m.target), &e))?;
                }
            }
        }
    }
    Ok(())
}

fn mount_volume(dev: &str, serial: &str, target: BorrowedFd<'_>, ro: bool) -> io::Result<()> {
    let at = format!("{VOLUMES_MNT}/{serial}");
    fs::create_dir_all(&at)?;
    if ro {
        // A read-only disk cannot replay a journal: a volume whose last
        // container was killed is then mounted without loading it.
        sys::mount(dev, &at, "ext4", libc::MS_RDONLY | libc::MS_NOATIME, None).or_else(|e| {
            if e.raw_os_error() == Some(libc::EROFS) {
                sys::mount(
                    dev,
                    &at,
                    "ext4",
                    libc::MS_RDONLY | libc::MS_NOATIME,
                    Some("noload"),
                )
            } else {
                Err(e)
            }
        })?;
    } else {
        sys::mount(dev, &at, "ext4", libc::MS_NOATIME, None)?;
    }
    if let Ok(fd) = sys::open(&c(&at)?, libc::O_RDONLY | libc::O_DIRECTORY, 0) {
        MOUNTED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(fd);
    }
    let data = format!("{at}/{VOLUME_DATA_DIR}");
    if fs::symlink_metadata(&data).is_err() {
        if ro {
            // A new volume mounted read-only: nothing to fill it with.
            return sys::mount(&at, &fd_path(target), "", libc::MS_BIND, None);
        }
        let work = format!("{at}/.{VOLUME_DATA_DIR}.new");
        if fs::symlink_metadata(&work).is_ok() {
            fs::remove_dir_all(&work)?;
        }
        fs::create_dir(&work)?;
        let src = sys::openat(target, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let dst = sys::open(&c(&work)?, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        copy_tree(src.as_fd(), dst.as_fd(), 0)?;
        copy_attrs(&sys::fstat(src.as_fd())?, dst.as_fd())?;
        sys::syncfs(dst.as_fd())?;
        // Renamed into place last: an interrupted fill starts over next time.
        fs::rename(&work, &data)?;
    }
    sys::mount(&data, &fd_path(target), "", libc::MS_BIND, None)
}

fn copy_attrs(st: &libc::stat, fd: BorrowedFd<'_>) -> io::Result<()> {
    sys::fchown(fd, st.st_uid, st.st_gid)?;
    sys::fchmod(fd, st.st_mode & 0o7777)?;
    let nsec = u32::try_from(st.st_mtime_nsec).unwrap_or(0);
    sys::futimens(fd, st.st_mtime, nsec)
}

/// Copies the contents of `src` into `dst` (both directories), never
/// following a symlink.
fn copy_tree(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, depth: usize) -> io::Result<()> {
    if depth > MAX_COPY_DEPTH {
        return Err(io::Error::other("directory tree too deep to copy"));
    }
    for name in sys::list_dir(src)? {
        copy_entry(src, dst, &name, depth)?;
    }
    Ok(())
}

fn copy_entry(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    name: &CStr,
    depth: usize,
) -> io::Result<()> {
    let st = sys::fstatat(src, name, true)?;
    match sys::file_type(st.st_mode) {
        libc::S_IFDIR => {
            sys::mkdirat(dst, name, 0o700)?;
            let s = sys::openat(
                src,
                name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
            let d = sys::openat(
                dst,
                name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
            copy_tree(s.as_fd(), d.as_fd(), depth + 1)?;
            copy_attrs(&st, d.as_fd())
        }
        libc::S_IFREG => {
            let s = sys::openat(src, name, libc::O_RDONLY | libc::O_NOFOLLOW, 0)?;
            let d = sys::openat(
                dst,
                name,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o600,
            )?;
            // SAFETY: both descriptors are ours; the Files take them over.
            let (mut sf, mut df) = unsafe {
                (
                    fs::File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(s)),
                    fs::File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(d)),
                )
            };
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = sf.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                df.write_all(&buf[..n])?;
            }
            copy_attrs(&st, df.as_fd())
        }
        libc::S_IFLNK => {
            let target = sys::readlinkat(src, name)?;
            sys::symlinkat(&sys::cstr(&target)?, dst, name)?;
            sys::lchownat(dst, name, st.st_uid, st.st_gid)?;
            let nsec = u32::try_from(st.st_mtime_nsec).unwrap_or(0);
            sys::lutimensat(dst, name, st.st_mtime, nsec)
        }
        libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO => {
            sys::mknodat(dst, name, st.st_mode, st.st_rdev)?;
            sys::lchownat(dst, name, st.st_uid, st.st_gid)?;
            sys::fchmodat(dst, name, st.st_mode & 0o7777)
        }
        // Sockets mean nothing without their process.
        _ => Ok(()),
    }
}

/// `--read-only`: the container's root becomes read-only (its mounts keep
/// their own flags). The working directory is made first, as it would be
/// when missing.
///
/// # Errors
/// The remount failed.
pub fn make_root_read_only(cwd: &str) -> Result<(), StartError> {
    if cwd.starts_with('/') {
        let _ = fs::create_dir_all(cwd);
    }
    sys::mount(
        "",
        "/",
        "",
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
        None,
    )
    .map_err(|e| err("make the root read-only", &e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn targets_resolve_inside_the_root_and_missing_dirs_are_made() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(tmp.path().join("outside")).unwrap();
        // An absolute symlink and a `..` escape both stay in the root.
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../outside", root.join("up")).unwrap();
        let rootfd = sys::open(
            &c(root.to_str().unwrap()).unwrap(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .unwrap();
        open_in_root(rootfd.as_fd(), "/etc/plain").unwrap();
        open_in_root(rootfd.as_fd(), "/abs/new/deep").unwrap();
        assert!(root.join("etc/new/deep").is_dir());
        // A symlink whose target (clamped to the root) does not exist is an
        // error, and nothing is made outside.
        assert!(open_in_root(rootfd.as_fd(), "/up/x").is_err());
        assert!(!tmp.path().join("outside/x").exists());
        std::os::unix::fs::symlink("../../etc", root.join("up2")).unwrap();
        open_in_root(rootfd.as_fd(), "/up2/y").unwrap();
        assert!(
            root.join("etc/y").is_dir(),
            "`..` past the root stays at the root"
        );
        fs::write(root.join("file"), "").unwrap();
        assert!(open_in_root(rootfd.as_fd(), "/file/x").is_err());
    }

    #[test]
    fn copy_keeps_modes_links_and_content() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("s"), tmp.path().join("d"));
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::create_dir(&dst).unwrap();
        fs::write(src.join("sub/f"), "data").unwrap();
        fs::set_permissions(src.join("sub/f"), fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("l")).unwrap();
        let open = |p: &std::path::Path| {
            sys::open(
                &c(p.to_str().unwrap()).unwrap(),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )
            .unwrap()
        };
        copy_tree(open(&src).as_fd(), open(&dst).as_fd(), 0).unwrap();
        assert_eq!(fs::read_to_string(dst.join("sub/f")).unwrap(), "data");
        assert_eq!(
            fs::metadata(dst.join("sub/f")).unwrap().mode() & 0o777,
            0o640
        );
        assert_eq!(
            fs::read_link(dst.join("l")).unwrap().to_str(),
            Some("/etc/passwd")
        );
    }
}

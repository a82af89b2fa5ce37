//! The init's own mounts, the container's mounts inside its new root, the
//! switch into that root, and the files docker writes there.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::command::StartError;
use crate::sys;

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

fn runtime(what: &str, e: &io::Error) -> StartError {
    StartError::new(125, format!("{what}: {e}"))
}

/// Makes `path` a directory: created (0755) when missing; anything else in
/// the way (a file, a symlink that could lead a mount elsewhere) is replaced.
///
/// # Errors
/// The directory cannot be made.
pub fn ensure_dir(path: &str) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => fs::remove_file(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    match fs::DirBuilder::new().mode(0o755).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn mount_at(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), StartError> {
    ensure_dir(target).map_err(|e| runtime(&format!("mkdir {target}"), &e))?;
    sys::mount(src, target, fstype, flags, data)
        .map_err(|e| runtime(&format!("mount {fstype} on {target}"), &e))
}

/// The init's own mounts in the initramfs: `/proc`, `/sys`, `/dev`.
/// (`/dev/pts`, `/dev/shm`, `/tmp` and `/run` of the initramfs would be
/// hidden by the switch to the container's root before anything used them;
/// the container gets its own.)
///
/// # Errors
/// A mount failed.
pub fn early() -> Result<(), StartError> {
    mount_at("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC, None)?;
    mount_at("sysfs", "/sys", "sysfs", NOSUID | NODEV | NOEXEC, None)?;
    mount_at("devtmpfs", "/dev", "devtmpfs", NOSUID, Some("mode=0755"))?;
    Ok(())
}

/// Makes sure descriptors 0, 1 and 2 are open (on the console, else
/// `/dev/null`), so that no later descriptor takes their numbers.
pub fn fix_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD on any number is harmless.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        let opened = sys::open(c"/dev/console", libc::O_RDWR | libc::O_NOCTTY, 0)
            .or_else(|_| sys::open(c"/dev/null", libc::O_RDWR, 0));
        if let Ok(f) = opened {
            // SAFETY: both descriptors are valid; dup2 onto a closed number.
            unsafe { libc::dup2(f.as_raw_fd(), fd) };
        }
    }
}

/// Standard device nodes of a container's `/dev`: name, type, major, minor.
const DEVICES: &[(&str, libc::mode_t, u32, u32)] = &[
    ("null", libc::S_IFCHR, 1, 3),
    ("zero", libc::S_IFCHR, 1, 5),
    ("full", libc::S_IFCHR, 1, 7),
    ("random", libc::S_IFCHR, 1, 8),
    ("urandom", libc::S_IFCHR, 1, 9),
    ("tty", libc::S_IFCHR, 5, 0),
    ("console", libc::S_IFCHR, 5, 1),
];

const DEV_LINKS: &[(&str, &str)] = &[
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("core", "/proc/kcore"),
];

/// More nodes for `--privileged` (docker gives the host's whole `/dev`; the
/// VM's disks stay out: they are hull's, never the container's).
const PRIVILEGED_DEVICES: &[(&str, libc::mode_t, u32, u32)] = &[
    ("kmsg", libc::S_IFCHR, 1, 11),
    ("fuse", libc::S_IFCHR, 10, 229),
    ("net/tun", libc::S_IFCHR, 10, 200),
    ("loop-control", libc::S_IFCHR, 10, 237),
    ("loop0", libc::S_IFBLK, 7, 0),
    ("loop1", libc::S_IFBLK, 7, 1),
    ("loop2", libc::S_IFBLK, 7, 2),
    ("loop3", libc::S_IFBLK, 7, 3),
];

fn mknod_666(p: &str, kind: libc::mode_t, major: u32, minor: u32) -> Result<(), StartError> {
    let c = sys::cstr(p.as_bytes()).map_err(|e| runtime("mknod", &e))?;
    // SAFETY: valid C string.
    sys::check(unsafe { libc::mknod(c.as_ptr(), kind | 0o666, sys::makedev(major, minor)) })
        .and_then(|_| {
            // SAFETY: valid C string; the node was just made (umask cleared 0o022).
            sys::check(unsafe { libc::chmod(c.as_ptr(), 0o666) })
        })
        .map(|_| ())
        .map_err(|e| runtime(&format!("mknod {p}"), &e))
}

/// Mounts the container's `/proc`, `/sys` (read-only), `/dev` (a tmpfs with
/// docker's nodes and links), `/dev/pts`, `/dev/shm` (`--shm-size`) and
/// `/dev/mqueue` under `root`. (The main process mounts its own `/proc` and
/// `/sys/fs/cgroup` over these in its namespaces: `security::enter`.)
///
/// # Errors
/// A mount or node could not be made.
pub fn container(root: &str, security: &crate::spec::SecuritySpec) -> Result<(), StartError> {
    mount_at(
        "proc",
        &format!("{root}/proc"),
        "proc",
        NOSUID | NODEV | NOEXEC,
        None,
    )?;
    mount_at(
        "sysfs",
        &format!("{root}/sys"),
        "sysfs",
        libc::MS_RDONLY | NOSUID | NODEV | NOEXEC,
        None,
    )?;
    let dev = format!("{root}/dev");
    mount_at(
        "tmpfs",
        &dev,
        "tmpfs",
        NOSUID | libc::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )?;
    for &(name, kind, major, minor) in DEVICES {
        mknod_666(&format!("{dev}/{name}"), kind, major, minor)?;
    }
    if security.privileged {
        ensure_dir(&format!("{dev}/net")).map_err(|e| runtime("mkdir /dev/net", &e))?;
        for &(name, kind, major, minor) in PRIVILEGED_DEVICES {
            mknod_666(&format!("{dev}/{name}"), kind, major, minor)?;
        }
    }
    for &(name, target) in DEV_LINKS {
        let p = format!("{dev}/{name}");
        std::os::unix::fs::symlink(target, &p).map_err(|e| runtime(&format!("symlink {p}"), &e))?;
    }
    mount_at(
        "devpts",
        &format!("{dev}/pts"),
        "devpts",
        NOSUID | NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mount_at(
        "shm",
        &format!("{dev}/shm"),
        "tmpfs",
        NOSUID | NODEV | NOEXEC,
        Some(&format!(
            "mode=1777,size={}k",
            security.shm_size.div_ceil(1024)
        )),
    )?;
    mount_at(
        "mqueue",
        &format!("{dev}/mqueue"),
        "mqueue",
        NOSUID | NODEV | NOEXEC,
        None,
    )?;
    Ok(())
}

/// Makes `root` the root of the init and of everything it starts: moves the
/// mount onto `/` and chroots into it (`pivot_root` cannot leave the
/// initramfs).
///
/// # Errors
/// A step failed.
pub fn switch_root(root: &str) -> Result<(), StartError> {
    std::env::set_current_dir(root).map_err(|e| runtime("chdir to the new root", &e))?;
    sys::mount(".", "/", "", libc::MS_MOVE, None).map_err(|e| runtime("move the new root", &e))?;
    // SAFETY: valid C string.
    sys::check(unsafe { libc::chroot(c".".as_ptr()) }).map_err(|e| runtime("chroot", &e))?;
    std::env::set_current_dir("/").map_err(|e| runtime("chdir /", &e))?;
    Ok(())
}

/// Replaces a file of the container's `/etc` (whatever was there: a symlink
/// is not followed). Failures are returned for a note, not fatal.
pub(crate) fn replace_file(path: &str, content: &str) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => return Err(io::Error::other("is a directory")),
        Ok(_) => fs::remove_file(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    io::Write::write_all(&mut f, content.as_bytes())
}

/// The content of `/etc/hosts`.
#[must_use]
pub fn hosts(hostname: &str) -> String {
    let name = if hostname.is_empty() {
        String::new()
    } else {
        format!(" {hostname}")
    };
    format!("127.0.0.1\tlocalhost{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
}

/// Writes `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf` (after the
/// switch: paths are the container's). Returns notes for what failed.
#[must_use]
pub fn etc_files(hostname: &str) -> Vec<String> {
    let mut notes = Vec::new();
    if let Err(e) = ensure_etc() {
        notes.push(format!("/etc: {e}"));
        return notes;
    }
    let files = [
        ("/etc/hostname", format!("{hostname}\n")),
        ("/etc/hosts", hosts(hostname)),
        (
            "/etc/resolv.conf",
            "# hull: the container has no network\n".to_string(),
        ),
    ];
    for (path, content) in files {
        if let Err(e) = replace_file(path, &content) {
            notes.push(format!("{path} not written: {e}"));
        }
    }
    notes
}

fn ensure_etc() -> io::Result<()> {
    match fs::metadata("/etc") {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::other("not a directory")),
        Err(_) => fs::DirBuilder::new().mode(0o755).create("/etc"),
    }
}

/// Sets the kernel's host name.
///
/// # Errors
/// The call failed.
pub fn set_hostname(name: &str) -> io::Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    // SAFETY: pointer and length of a valid buffer.
    sys::check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

// The libc crate types these `c_ulong` while musl's `ioctl` takes an `int`.
const SIOCGIFFLAGS: libc::Ioctl = 0x8913;
const SIOCSIFFLAGS: libc::Ioctl = 0x8914;

/// Brings the loopback interface up (best effort: a kernel without IPv4 has none).
pub fn loopback_up() {
    // SAFETY: plain socket call.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let Ok(s) = sys::check(s) else { return };
    // SAFETY: `ifreq` is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in req.ifr_name.iter_mut().zip(b"lo") {
        *d = libc::c_char::from_ne_bytes([*b]);
    }
    // SAFETY: valid socket and ifreq for SIOCGIFFLAGS / SIOCSIFFLAGS; the
    // flags member is the one these calls use.
    unsafe {
        if libc::ioctl(s, SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |=
                libc::c_short::try_from(libc::IFF_UP | libc::IFF_RUNNING).unwrap_or(1);
            libc::ioctl(s, SIOCSIFFLAGS, &req);
        }
        libc::close(s);
    }
}

/// Bind-mounts the pty slave at `/dev/console` (as runc does with a terminal).
pub fn bind_console(slave: &Path) {
    let Some(slave) = slave.to_str() else { return };
    if fs::symlink_metadata("/dev/console").is_ok_and(|m| m.file_type().is_char_device()) {
        let _ = sys::mount(slave, "/dev/console", "", libc::MS_BIND, None);
    }
}

/// Remounts the mount holding `fd` read-only (through its `/proc/self/fd`
/// link, so hidden mounts work too). Best effort.
pub fn remount_ro(fd: BorrowedFd<'_>) {
    let p = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let _ = sys::mount("", &p, "", libc::MS_REMOUNT | libc::MS_RDONLY, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_names_the_host() {
        assert_eq!(
            hosts("abc"),
            "127.0.0.1\tlocalhost abc\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        );
        assert!(hosts("").starts_with("127.0.0.1\tlocalhost\n"));
    }

    #[test]
    fn ensure_dir_replaces_what_is_in_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("proc");
        std::os::unix::fs::symlink("/etc", &p).unwrap();
        ensure_dir(p.to_str().unwrap()).unwrap();
        assert!(fs::symlink_metadata(&p).unwrap().is_dir());
        ensure_dir(p.to_str().unwrap()).unwrap();
    }
}

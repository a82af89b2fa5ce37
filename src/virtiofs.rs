//! The virtio-fs servers of a container: one `virtiofsd` per bind mount,
//! started by the monitor before the VM and stopped with it.
//!
//! hull uses the C `virtiofsd` Debian 12 ships in `qemu-system-common`
//! (`/usr/lib/qemu/virtiofsd`; `HULL_VIRTIOFSD` names another): nothing to
//! build, and its default sandbox is what a share needs. It runs in new
//! mount, pid and network namespaces, `pivot_root`s into the shared
//! directory and drops capabilities under a seccomp filter: `..`, absolute
//! symlinks and hard links are resolved inside the shared tree (symlinks are
//! resolved by the guest kernel, in the container), and it offers no file
//! handle requests (`open_by_handle_at`). It runs as root, so the guest's
//! uids and gids are the host's: a file the container's user 1000 writes is
//! owned by 1000 on the host, and the other way round.
//!
//! That virtiofsd has no read-only mode, so a `:ro` share is made
//! read-only below it: it is started in a mount namespace of its own where
//! the shared directory is a read-only bind mount, which its sandbox's own
//! bind mount of the directory inherits. Writes are then refused by the
//! host kernel (EROFS), whatever the guest does. The bind is recursive, and
//! so is its read-only flag: every mount under the directory is read-only
//! too (`mount_setattr(AT_RECURSIVE)`, else each one from the mount table),
//! and the server is not started if one could not be made so.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Where Debian's `virtiofsd` is.
pub const DEFAULT_VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
/// How long a server may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a server's messages is kept.
const LOG_CAP: u64 = 1 << 20;

/// The `virtiofsd` to run.
#[must_use]
pub fn binary() -> PathBuf {
    std::env::var_os("HULL_VIRTIOFSD")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_VIRTIOFSD), PathBuf::from)
}

/// virtiofsd's sandbox: `namespace` (its default: new mount, pid and net
/// namespaces, `pivot_root` into the shared directory), except on a host
/// whose root is the initial ramfs (the emulated test host), where
/// `pivot_root` is impossible and it `chroot`s into the directory instead
/// (it keeps no `CAP_SYS_CHROOT`, so the chroot holds).
fn sandbox() -> &'static str {
    let root_is_rootfs = std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split(" - ");
            let (head, tail) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
            head.split(' ').nth(4) == Some("/") && tail.starts_with("rootfs ")
        })
    });
    if root_is_rootfs {
        "chroot"
    } else {
        "namespace"
    }
}

/// A running server; stopped (and its socket and mount point removed) when
/// dropped.
#[derive(Debug)]
pub struct Server {
    child: Child,
    socket: PathBuf,
    root: Option<PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // It ends by itself once the VMM hangs up; make sure.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        if let Some(root) = &self.root {
            let _ = std::fs::remove_dir(root);
        }
    }
}

fn cstring(p: &Path) -> Result<CString> {
    Ok(CString::new(p.as_os_str().as_bytes())?)
}

/// Starts a server for `share` listening on `socket`; its messages go to
/// `log` (capped). It serves the directory `share` holds open, bind-mounted
/// (in a mount namespace of its own) on `root`, an empty directory of
/// hull's: no path the container can change is resolved after the check of
/// [`crate::volume::open_bind_source`]. Returns once it listens.
///
/// # Errors
/// `virtiofsd` is missing, or it ended or did not listen in time.
pub fn start(
    share: &crate::volume::Share,
    root: &Path,
    socket: &Path,
    log: &Path,
) -> Result<Server> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(root)?;
    let mut server = start_with(
        &binary(),
        &share.source,
        Some((share.dir.as_raw_fd(), root)),
        share.read_only,
        socket,
        log,
    );
    match &mut server {
        Ok(s) => s.root = Some(root.to_path_buf()),
        Err(_) => {
            let _ = std::fs::remove_dir(root);
        }
    }
    server
}

/// `from`: the directory to serve (a descriptor) and where to mount it;
/// without it `source` is served by path.
fn start_with(
    bin: &Path,
    source: &Path,
    from: Option<(std::os::fd::RawFd, &Path)>,
    read_only: bool,
    socket: &Path,
    log: &Path,
) -> Result<Server> {
    if !bin.is_file() {
        return Err(format!(
            "bind mounts need virtiofsd, which is not at {} (apt-get install qemu-system-common, \
             or set HULL_VIRTIOFSD)",
            bin.display()
        )
        .into());
    }
    let _ = std::fs::remove_file(socket);
    let served = from.map_or(source, |(_, root)| root);
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--socket-path={}", socket.display()))
        .arg("-o")
        .arg(format!("source={}", served.display()))
        .args(["-o", "cache=auto", "-o", "log_level=warn"])
        .arg("-o")
        .arg(format!("sandbox={}", sandbox()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if read_only || from.is_some() {
        let src = cstring(served)?;
        let dir = from.map(|(fd, _)| fd);
        let mut table = ReadOnlyTable::new();
        // SAFETY: between fork and exec the closure only makes system calls
        // on memory prepared before the fork (`src`, `table`); the
        // descriptor is the caller's, open across the fork.
        unsafe {
            cmd.pre_exec(move || {
                let tree = dir.map(clone_tree).transpose()?;
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                if let Some(tree) = tree {
                    attach_tree(tree, &src)?;
                }
                if read_only {
                    read_only_tree(&src, &mut table, false)?;
                }
                Ok(())
            });
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    if let Some(mut stderr) = child.stderr.take() {
        let file = std::fs::File::create(log)?;
        std::thread::Builder::new()
            .name("virtiofsd-log".into())
            .spawn(move || {
                let mut out = crate::logfile::CappedWriter::new(file, LOG_CAP);
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let _ = std::io::Write::write_all(&mut out, &buf[..n]);
                }
            })?;
    }
    let server = Server {
        child,
        socket: socket.to_path_buf(),
        root: None,
    };
    wait_listening(server, source, log)
}

fn wait_listening(mut server: Server, source: &Path, log: &Path) -> Result<Server> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if server.socket.exists() {
            return Ok(server);
        }
        if let Some(status) = server.child.try_wait()? {
            std::thread::sleep(Duration::from_millis(50));
            let said = std::fs::read_to_string(log).unwrap_or_default();
            let said = said.lines().last().unwrap_or("").trim().to_string();
            return Err(format!(
                "virtiofsd for {} ended ({status}){}",
                source.display(),
                if said.is_empty() {
                    String::new()
                } else {
                    format!(": {said}")
                }
            )
            .into());
        }
        if Instant::now() >= deadline {
            return Err(format!("virtiofsd for {} did not start in time", source.display()).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `OPEN_TREE_CLONE` (linux/mount.h).
const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `MOVE_MOUNT_F_EMPTY_PATH` (linux/mount.h).
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// In the caller's mount namespace: a detached copy of the directory behind
/// descriptor `dir` and everything mounted under it (`open_tree`), to be
/// attached by [`attach_tree`] in a new mount namespace (a plain bind from
/// a mount of another namespace is refused). Between fork and exec.
fn clone_tree(dir: std::os::fd::RawFd) -> std::io::Result<std::os::fd::RawFd> {
    // SAFETY: an open descriptor and an empty C string; checked.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir,
            c"".as_ptr(),
            OPEN_TREE_CLONE
                | libc::O_CLOEXEC.cast_unsigned()
                | (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE).cast_unsigned(),
        )
    };
    let fd = libc::c_int::try_from(r).unwrap_or(-1);
    check(fd)?;
    Ok(fd)
}

/// Attaches the tree of [`clone_tree`] on `root`. Between fork and exec.
fn attach_tree(tree: std::os::fd::RawFd, root: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: an open descriptor and valid C strings; checked.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree,
            c"".as_ptr(),
            libc::AT_FDCWD,
            root.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    check(libc::c_int::try_from(r).unwrap_or(-1))
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ST_RELATIME` (sys/statvfs.h; not in libc for every target).
const ST_RELATIME: libc::c_ulong = 1 << 12;

/// `MOUNT_ATTR_RDONLY` (linux/mount.h).
const MOUNT_ATTR_RDONLY: u64 = 1;

/// `struct mount_attr` (linux/mount.h), by hand: libc has the system call's
/// number but not, for every target, its argument.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Memory for [`read_only_tree`]'s fallback, allocated before the fork:
/// the mount table and one unescaped mount point.
struct ReadOnlyTable {
    buf: Vec<u8>,
    path: Vec<u8>,
}

impl ReadOnlyTable {
    /// A mount table larger than this makes the fallback fail (closed).
    const MAX: usize = 4 << 20;

    fn new() -> Self {
        Self {
            buf: vec![0; Self::MAX],
            path: vec![0; libc::PATH_MAX as usize + 1],
        }
    }
}

/// Bind-mounts `src` (canonical) onto itself, recursively, and makes it and
/// every mount under it read-only, in the calling process's mount namespace
/// (private: nothing propagates). `mount_setattr(AT_RECURSIVE)` does it at
/// once; where the kernel lacks it (before 5.12), or with `fallback`, each
/// mount at or under `src` in `/proc/self/mountinfo` is remounted read-only.
/// Any failure is an error: the caller must not serve the tree.
///
/// Runs between fork and exec: no allocation, system calls only.
fn read_only_tree(
    src: &std::ffi::CStr,
    table: &mut ReadOnlyTable,
    fallback: bool,
) -> std::io::Result<()> {
    // SAFETY: valid C strings; the results are checked.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            src.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })?;
    if !fallback {
        // SAFETY: a valid C string; the descriptor is closed below.
        let fd = unsafe {
            libc::open(
                src.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        check(fd)?;
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: an open descriptor, an empty C string and a `mount_attr`
        // of the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                fd,
                c"".as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
                std::ptr::addr_of!(attr),
                std::mem::size_of::<MountAttr>(),
            )
        };
        let err = std::io::Error::last_os_error();
        // SAFETY: the descriptor opened above.
        unsafe { libc::close(fd) };
        if r == 0 {
            return Ok(());
        }
        if err.raw_os_error() != Some(libc::ENOSYS) {
            return Err(err);
        }
    }
    remount_each(src.to_bytes(), table)
}

/// The fallback of [`read_only_tree`]: remounts every mount at or under
/// `src` read-only, keeping its nosuid/nodev/noexec/atime flags.
fn remount_each(src: &[u8], table: &mut ReadOnlyTable) -> std::io::Result<()> {
    let too_big = || std::io::Error::from_raw_os_error(libc::E2BIG);
    // SAFETY: a valid C string; the result is checked and closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/self/mountinfo".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    let mut len = 0;
    let read = loop {
        if len == table.buf.len() {
            break Err(too_big());
        }
        // SAFETY: the room left in `buf`.
        let n = unsafe {
            libc::read(
                fd,
                table.buf[len..].as_mut_ptr().cast(),
                table.buf.len() - len,
            )
        };
        match usize::try_from(n) {
            Ok(0) => break Ok(()),
            Ok(n) => len += n,
            Err(_) => break Err(std::io::Error::last_os_error()),
        }
    };
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(fd) };
    read?;
    let (buf, path) = (&table.buf[..len], &mut table.path);
    let mut found = false;
    for line in buf.split(|b| *b == b'\n') {
        // Field 5 is the mount point, with space, tab, newline and
        // backslash written as octal escapes.
        let Some(point) = line.split(|b| *b == b' ').nth(4) else {
            continue;
        };
        let mut n = 0;
        let mut i = 0;
        while i < point.len() {
            let mut b = point[i];
            if b == b'\\'
                && i + 3 < point.len()
                && point[i + 1..i + 4].iter().all(u8::is_ascii_digit)
            {
                b = (point[i + 1] - b'0') * 64 + (point[i + 2] - b'0') * 8 + (point[i + 3] - b'0');
                i += 3;
            }
            if n + 1 >= path.len() {
                return Err(too_big());
            }
            path[n] = b;
            n += 1;
            i += 1;
        }
        let p = &path[..n];
        let under =
            p == src || (p.starts_with(src) && p.get(src.len()) == Some(&b'/')) || src == b"/";
        if !under {
            continue;
        }
        path[n] = 0;
        // SAFETY: `statvfs` is plain data; all-zero is valid.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated; `st` is writable.
        check(unsafe { libc::statvfs(path.as_ptr().cast(), &mut st) })?;
        let keep = libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC
            | libc::MS_NOATIME
            | libc::MS_NODIRATIME;
        let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | (st.f_flag & keep);
        if st.f_flag & ST_RELATIME != 0 {
            flags |= libc::MS_RELATIME;
        }
        // SAFETY: `path` is NUL-terminated.
        check(unsafe {
            libc::mount(
                std::ptr::null(),
                path.as_ptr().cast(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        })?;
        found = true;
    }
    if found {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(libc::ENOENT))
    }
}

/// Starts one server per share, sockets and logs named after the
/// container's short id.
///
/// # Errors
/// A server did not start (those started are stopped).
pub fn start_all(
    run_dir: &Path,
    container_dir: &Path,
    short_id: &str,
    shares: &[crate::volume::Share],
) -> Result<(Vec<Server>, Vec<vmm::FsShare>)> {
    std::fs::create_dir_all(run_dir)?;
    let mut servers = Vec::new();
    let mut config = Vec::new();
    for (i, share) in shares.iter().enumerate() {
        let socket = run_dir.join(format!("{short_id}-fs{i}.sock"));
        let root = run_dir.join(format!("{short_id}-fs{i}.root"));
        let log = container_dir.join(format!("virtiofsd-{i}.log"));
        servers.push(start(share, &root, &socket, &log)?);
        config.push(vmm::FsShare {
            socket,
            tag: hull_protocol::spec::share_tag(i),
        });
    }
    Ok((servers, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `:ro` share is read-only all the way down: a mount under the
    /// shared directory is read-only too, through `mount_setattr` and
    /// through the fallback.
    #[test]
    fn read_only_shares_are_read_only_below_their_sub_mounts() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (mount namespaces)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().canonicalize().unwrap();
        std::fs::create_dir(share.join("sub")).unwrap();
        let script = format!(
            "touch {d}/y 2>/dev/null && exit 10; touch {d}/sub/x 2>/dev/null && exit 11; \
             grep -q ' {d}/sub ' /proc/self/mountinfo || exit 12; exit 0",
            d = share.display()
        );
        for fallback in [false, true] {
            let src = cstring(&share).unwrap();
            let sub = cstring(&share.join("sub")).unwrap();
            let mut table = ReadOnlyTable::new();
            let mut cmd = Command::new("sh");
            cmd.args(["-c", &script]);
            // SAFETY: system calls only, on memory prepared before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    check(libc::unshare(libc::CLONE_NEWNS))?;
                    check(libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ))?;
                    check(libc::mount(
                        c"tmpfs".as_ptr(),
                        sub.as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        std::ptr::null(),
                    ))?;
                    read_only_tree(&src, &mut table, fallback)
                });
            }
            let status = cmd.status().unwrap();
            assert_eq!(status.code(), Some(0), "fallback {fallback}: {status}");
        }
    }

    /// What is served is the directory checked at start, held open: a
    /// source path turned into a symlink afterwards (by another container
    /// sharing its parent) changes nothing.
    #[test]
    fn the_served_directory_is_the_one_held_open() {
        use std::os::fd::AsRawFd;
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (mount namespaces)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let (data, other, root) = (base.join("data"), base.join("other"), base.join("root"));
        for d in [&data, &other, &root] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(data.join("marker"), "checked").unwrap();
        std::fs::write(other.join("marker"), "swapped").unwrap();
        let held = crate::volume::open_bind_source(&data, None).unwrap();
        std::fs::rename(&data, base.join("moved")).unwrap();
        std::os::unix::fs::symlink(&other, &data).unwrap();
        let held = held.as_raw_fd();
        let to = cstring(&root).unwrap();
        let mut cmd = Command::new("cat");
        cmd.arg(root.join("marker"));
        // SAFETY: system calls only, on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let tree = clone_tree(held)?;
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                attach_tree(tree, &to)
            });
        }
        let out = cmd.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "checked", "{out:?}");
    }

    #[test]
    fn a_missing_server_binary_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = start_with(
            &dir.path().join("nope"),
            dir.path(),
            None,
            false,
            &dir.path().join("s"),
            &dir.path().join("l"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("need virtiofsd"), "{err}");
    }
}

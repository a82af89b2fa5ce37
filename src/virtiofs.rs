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
//! host kernel (EROFS), whatever the guest does.

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

/// A running server; stopped (and its socket removed) when dropped.
#[derive(Debug)]
pub struct Server {
    child: Child,
    socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        // It ends by itself once the VMM hangs up; make sure.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn cstring(p: &Path) -> Result<CString> {
    Ok(CString::new(p.as_os_str().as_bytes())?)
}

/// Starts a server for `source` listening on `socket`; its messages go to
/// `log` (capped). Returns once it listens.
///
/// # Errors
/// `virtiofsd` is missing, or it ended or did not listen in time.
pub fn start(source: &Path, read_only: bool, socket: &Path, log: &Path) -> Result<Server> {
    start_with(&binary(), source, read_only, socket, log)
}

fn start_with(
    bin: &Path,
    source: &Path,
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
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--socket-path={}", socket.display()))
        .arg("-o")
        .arg(format!("source={}", source.display()))
        .args(["-o", "cache=auto", "-o", "log_level=warn"])
        .arg("-o")
        .arg(format!("sandbox={}", sandbox()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if read_only {
        let src = cstring(source)?;
        // SAFETY: between fork and exec the closure only makes system calls
        // on memory prepared before the fork (`src`).
        unsafe {
            cmd.pre_exec(move || {
                let check = |r: libc::c_int| {
                    if r < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                };
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    src.as_ptr(),
                    src.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    std::ptr::null(),
                    src.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                ))
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

/// Starts one server per share, sockets and logs named after the
/// container's short id.
///
/// # Errors
/// A server did not start (those started are stopped).
pub fn start_all(
    run_dir: &Path,
    container_dir: &Path,
    short_id: &str,
    shares: &[(PathBuf, bool)],
) -> Result<(Vec<Server>, Vec<vmm::FsShare>)> {
    std::fs::create_dir_all(run_dir)?;
    let mut servers = Vec::new();
    let mut config = Vec::new();
    for (i, (source, read_only)) in shares.iter().enumerate() {
        let socket = run_dir.join(format!("{short_id}-fs{i}.sock"));
        let log = container_dir.join(format!("virtiofsd-{i}.log"));
        servers.push(start(source, *read_only, &socket, &log)?);
        config.push(vmm::FsShare {
            socket,
            tag: guest_init::spec::share_tag(i),
        });
    }
    Ok((servers, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_server_binary_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = start_with(
            &dir.path().join("nope"),
            dir.path(),
            false,
            &dir.path().join("s"),
            &dir.path().join("l"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("need virtiofsd"), "{err}");
    }
}

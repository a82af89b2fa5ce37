//! The VMM in a process of its own: a container's monitor starts
//! `hull __vmm` (this same binary, `/proc/self/exe`) for its VM.
//!
//! The child gets exactly these descriptors, every other one is closed:
//! - 0: a pipe from the monitor: the first line is the [`LaunchDesc`] (JSON),
//!   each later line a [`Command`]; its end of file (the monitor died) stops
//!   the VM;
//! - 1: a pipe to the monitor: one line, the [`Report`] (JSON), when the VM
//!   ended;
//! - 2: a pipe to the monitor for the VMM's messages (relayed, capped, into
//!   the monitor's own log; its last line names why a VMM died);
//! - 3 and up: the guest's control stream, the console log, the network
//!   backend's socket, numbered in the [`LaunchDesc`].
//!
//! The child builds the VM (every host file it needs is opened and every
//! socket connected then), enters its jail ([`crate::jail`]), and only then
//! starts the vCPUs and the device loop. The monitor maps the report (or, with
//! none, how the process died) to the container's exit as it did when the VMM
//! was a thread.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::jail::{self, JailPlan};

/// The longest launch line or report accepted.
const LINE_MAX: u64 = 1 << 20;
/// The VMM's own messages kept in the monitor's log.
const VMM_LOG_CAP: u64 = 1 << 20;
/// How long [`VmmProcess::wait`] waits for a VMM to end (it is asked once
/// its guest's control stream closed, or after a stop): then it is killed.
const END_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Exit status of `hull __vmm` when it could not even read its launch.
const EXIT_BAD_LAUNCH: i32 = 120;
/// Exit status of the child when it could not set itself up before `execve`.
const EXIT_PRE_EXEC: i32 = 121;
/// `hull __vmm`'s fixed descriptors, from 3.
const FIRST_FD: RawFd = 3;

/// Everything a VM process needs, as the monitor prepares it.
#[derive(Debug)]
pub struct Launch {
    /// Kernel, initramfs and command line.
    pub boot: vmm::BootSource,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// virtio-blk disks, in order.
    pub disks: Vec<vmm::DiskConfig>,
    /// virtio-fs shares (their servers' sockets).
    pub shares: Vec<vmm::FsShare>,
    /// The guest end of the control stream.
    pub control: UnixStream,
    /// Where the guest's console goes: a file (capped by the VMM), or with
    /// `None` the monitor's own stderr (`--debug`).
    pub console: Option<File>,
    /// The guest's network interface.
    pub net: Option<vmm::NetConfig>,
    /// How the process is confined (`None`: not at all, `HULL_JAIL=off`).
    pub jail: Option<JailPlan>,
}

/// The network interface as it crosses the process boundary.
#[derive(Debug, Serialize, Deserialize)]
pub enum NetBackendDesc {
    /// A connected stream socket (passt), at this descriptor.
    Stream(RawFd),
    /// A TAP interface of this name.
    Tap(String),
}

/// The network interface's description.
#[derive(Debug, Serialize, Deserialize)]
pub struct NetDesc {
    /// Its backend.
    pub backend: NetBackendDesc,
    /// MAC address.
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u16,
}

/// What `hull __vmm` reads first: paths, sizes and descriptor numbers.
#[derive(Debug, Serialize, Deserialize)]
pub struct LaunchDesc {
    /// Kernel, initramfs and command line.
    pub boot: vmm::BootSource,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub cpus: u8,
    /// The KVM device.
    pub kvm_path: PathBuf,
    /// Disks.
    pub disks: Vec<vmm::DiskConfig>,
    /// virtio-fs shares.
    pub shares: Vec<vmm::FsShare>,
    /// The control stream's descriptor.
    pub control_fd: RawFd,
    /// The console's descriptor.
    pub console_fd: RawFd,
    /// At most this much console output is written (`None`: no cap, for
    /// `--debug`'s terminal).
    pub console_cap: Option<u64>,
    /// The network interface.
    pub net: Option<NetDesc>,
    /// The jail.
    pub jail: Option<JailPlan>,
    /// Descriptors the child holds from the start: 0 to `fds - 1`.
    pub fds: RawFd,
}

/// What the monitor asks of a running VMM (a JSON line on its stdin).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// Stop the VM, recording this reason.
    Stop(vmm::VmExit),
}

/// How the VM ended, as the VMM reports it (a JSON line on its stdout).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Report {
    /// The VM's boot timeline (a line before the `Exit` one).
    Boot(Vec<crate::container::BootTime>),
    /// The VM ran and ended so.
    Exit(vmm::VmExit),
    /// The VM could not be set up (the error's whole chain).
    Failed(String),
}

/// Why no VM ending could be had from the VMM process.
#[derive(Debug, thiserror::Error)]
pub enum VmmProcessError {
    /// The VM could not be set up.
    #[error("{0}")]
    Build(String),
    /// The process ended without a report.
    #[error("{0}")]
    Died(String),
    /// It could not be started.
    #[error("cannot start the VMM process: {what}")]
    Spawn {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn spawn_err(what: &'static str) -> impl Fn(std::io::Error) -> VmmProcessError {
    move |source| VmmProcessError::Spawn { what, source }
}

/// Stops the VM from the monitor (the process's stdin). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Control {
    pipe: Arc<Mutex<Option<File>>>,
}

impl Control {
    /// A control writing its commands to `pipe` (a test's stand-in for a
    /// VMM's command pipe).
    #[cfg(test)]
    pub(crate) fn to(pipe: File) -> Self {
        Self {
            pipe: Arc::new(Mutex::new(Some(pipe))),
        }
    }

    /// Asks the VMM to stop with `reason` (the first reason recorded wins,
    /// in the VMM as before). Never blocks.
    pub fn exit(&self, reason: vmm::VmExit) {
        let Ok(mut line) = serde_json::to_vec(&Command::Stop(reason)) else {
            return;
        };
        line.push(b'\n');
        let mut pipe = self.pipe.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = pipe.as_mut() {
            if f.write_all(&line).is_err() {
                // The VMM is gone (or not reading): nothing left to stop.
                *pipe = None;
            }
        }
    }
}

/// A running VMM process.
#[derive(Debug)]
pub struct VmmProcess {
    pid: libc::pid_t,
    control: Control,
    report: Option<File>,
    messages: Option<JoinHandle<String>>,
    cgroup: Option<jail::Cgroup>,
    reaped: bool,
}

/// Reads the report pipe until its end of file, at most [`LINE_MAX`] bytes
/// kept; false when `timeout` passed first.
fn read_report(from: &File, into: &mut Vec<u8>, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return true;
        }
        if n == 0 {
            return false;
        }
        match (&*from).read(&mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(k) => {
                if into.len() < usize::try_from(LINE_MAX).unwrap_or(usize::MAX) {
                    into.extend_from_slice(&buf[..k]);
                }
            }
        }
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two descriptors, owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A close-on-exec copy of `fd` at 64 or above, clear of the child's fixed
/// numbers (0 to a few): the child then `dup2`s each to its place without
/// one overwriting another.
fn high_copy(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd`; a new descriptor is returned.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fcntl just returned this descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

fn cstring(bytes: Vec<u8>) -> Result<CString, VmmProcessError> {
    CString::new(bytes).map_err(|e| VmmProcessError::Spawn {
        what: "its arguments",
        source: std::io::Error::other(e),
    })
}

/// What the child does between `clone` and `execve`, prepared before the
/// clone: it may only make system calls on this memory.
struct PreExec {
    /// (copy, target) pairs.
    moves: Vec<(RawFd, RawFd)>,
    /// For a new user namespace: setgroups, uid_map and gid_map contents.
    id_maps: Option<[(CString, CString); 3]>,
    exe: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

impl PreExec {
    /// Runs in the child of `clone`: never returns.
    ///
    /// # Safety
    /// Only in the child of a fork-like clone of a process that may have had
    /// other threads: only async-signal-safe system calls on memory made
    /// before the clone.
    unsafe fn run(&self, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> ! {
        // SAFETY: plain system calls on memory prepared before the clone.
        unsafe {
            if let Some(maps) = &self.id_maps {
                for (path, text) in maps {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    let len = text.as_bytes().len();
                    if fd < 0 || libc::write(fd, text.as_ptr().cast(), len) != len as libc::ssize_t
                    {
                        libc::_exit(EXIT_PRE_EXEC);
                    }
                    libc::close(fd);
                }
            }
            // The VMM must not outlive its monitor (also: stdin's end of file).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            for &(from, to) in &self.moves {
                // dup2 leaves the new descriptor open across exec.
                if libc::dup2(from, to) < 0 {
                    libc::_exit(EXIT_PRE_EXEC);
                }
            }
            libc::execve(self.exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(EXIT_PRE_EXEC);
        }
    }
}

/// Starts `hull __vmm` for `launch`, in a new PID namespace (and a new user
/// namespace when hull is not root) when it is to be jailed, places it in
/// its cgroup and hands it its launch.
///
/// The PID namespace is made by the `clone` itself, so that the VMM is PID 1
/// of its own namespace: it cannot see or signal any other process, and no
/// helper process is left outside the jail. It cannot be made later by the
/// VMM: `unshare(CLONE_NEWPID)` only moves the caller's future children, and
/// a VM cannot be handed to a child (KVM binds a VM to the address space that
/// created it).
///
/// # Errors
/// Pipes, descriptors or the process could not be made.
pub fn spawn(launch: Launch, debug: bool) -> Result<VmmProcess, VmmProcessError> {
    let (cmd_r, cmd_w) = pipe().map_err(spawn_err("a pipe"))?;
    let (report_r, report_w) = pipe().map_err(spawn_err("a pipe"))?;
    let (log_r, log_w) = pipe().map_err(spawn_err("a pipe"))?;
    // The child's descriptors, in order from 0.
    let mut passed: Vec<OwnedFd> = vec![cmd_r, report_w, log_w];
    let control_fd = fd_number(passed.len());
    passed.push(OwnedFd::from(launch.control));
    let console_fd = fd_number(passed.len());
    let console_cap = match launch.console {
        Some(f) => {
            passed.push(OwnedFd::from(f));
            Some(crate::logfile::CONSOLE_CAP)
        }
        None => {
            passed.push(high_copy(libc::STDERR_FILENO).map_err(spawn_err("stderr"))?);
            None
        }
    };
    let net = launch
        .net
        .map(|vmm::NetConfig { backend, mac, mtu }| NetDesc {
            backend: match backend {
                vmm::NetBackendConfig::Stream(s) => {
                    let n = fd_number(passed.len());
                    passed.push(OwnedFd::from(s));
                    NetBackendDesc::Stream(n)
                }
                vmm::NetBackendConfig::Tap(name) => NetBackendDesc::Tap(name),
            },
            mac,
            mtu,
        });
    let desc = LaunchDesc {
        boot: launch.boot,
        memory_mib: launch.memory_mib,
        cpus: launch.cpus,
        kvm_path: "/dev/kvm".into(),
        disks: launch.disks,
        shares: launch.shares,
        control_fd,
        console_fd,
        console_cap,
        net,
        jail: launch.jail.clone(),
        fds: fd_number(passed.len()),
    };
    let mut line = serde_json::to_vec(&desc).map_err(|e| VmmProcessError::Spawn {
        what: "its launch",
        source: std::io::Error::other(e),
    })?;
    line.push(b'\n');

    let copies: Vec<OwnedFd> = passed
        .iter()
        .map(|fd| high_copy(fd.as_raw_fd()))
        .collect::<Result<_, _>>()
        .map_err(spawn_err("descriptors"))?;
    let mut argv = vec![cstring(b"hull".to_vec())?];
    if debug {
        argv.push(cstring(b"--debug".to_vec())?);
    }
    argv.push(cstring(b"__vmm".to_vec())?);
    // Only hull's own settings and what a process needs to run: nothing
    // else the user exported (proxy or registry credentials, tokens) is
    // within reach of a guest that broke into the VMM.
    let envp = std::env::vars_os()
        .filter(|(k, _)| passes_to_vmm(k))
        .map(|(k, v)| {
            let mut kv: OsString = k;
            kv.push("=");
            kv.push(v);
            cstring(kv.into_vec())
        })
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut flags: libc::c_ulong = 0;
    let mut id_maps = None;
    if launch.jail.is_some() {
        flags |= libc::CLONE_NEWPID as libc::c_ulong;
        if uid != 0 {
            // Rootless: a user namespace where the user is root (without
            // capabilities outside it), so the jail can be built at all.
            flags |= libc::CLONE_NEWUSER as libc::c_ulong;
            id_maps = Some([
                (
                    cstring(b"/proc/self/setgroups".to_vec())?,
                    cstring(b"deny".to_vec())?,
                ),
                (
                    cstring(b"/proc/self/uid_map".to_vec())?,
                    cstring(format!("0 {uid} 1\n").into_bytes())?,
                ),
                (
                    cstring(b"/proc/self/gid_map".to_vec())?,
                    cstring(format!("0 {gid} 1\n").into_bytes())?,
                ),
            ]);
        }
    }
    let pre = PreExec {
        moves: copies
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_raw_fd(), fd_number(i)))
            .collect(),
        id_maps,
        exe: cstring(b"/proc/self/exe".to_vec())?,
        argv,
        envp,
    };
    let argv_ptrs: Vec<*const libc::c_char> = pre
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_ptrs: Vec<*const libc::c_char> = pre
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // SAFETY: a fork-like clone (no new stack, no shared memory): the child
    // gets a copy of this process and runs only `PreExec::run`, which makes
    // async-signal-safe system calls on memory prepared above.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags | libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        // SAFETY: this is the child of the fork-like clone above.
        unsafe { pre.run(&argv_ptrs, &envp_ptrs) };
    }
    if pid < 0 {
        return Err(spawn_err("clone")(std::io::Error::last_os_error()));
    }
    let pid = libc::pid_t::try_from(pid).map_err(|_| VmmProcessError::Spawn {
        what: "clone",
        source: std::io::Error::other("a pid out of range"),
    })?;
    drop(copies);
    let mut passed = passed.into_iter();
    let cmd_r = passed.next();
    drop(cmd_r);
    drop(passed);
    let mut process = VmmProcess {
        pid,
        control: Control {
            pipe: Arc::new(Mutex::new(None)),
        },
        report: Some(File::from(report_r)),
        messages: Some(relay_messages(File::from(log_r))),
        cgroup: None,
        reaped: false,
    };
    if let Some(plan) = &launch.jail {
        process.cgroup = jail::Cgroup::place(plan, pid);
    }
    let mut cmd = File::from(cmd_w);
    cmd.write_all(&line).map_err(spawn_err("its launch"))?;
    *process
        .control
        .pipe
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(cmd);
    tracing::debug!(
        "vmm: process {pid} started{}",
        if launch.jail.is_some() {
            " (jailed)"
        } else {
            " (HULL_JAIL=off: not jailed)"
        }
    );
    Ok(process)
}

fn fd_number(index: usize) -> RawFd {
    RawFd::try_from(index).unwrap_or(RawFd::MAX)
}

/// Copies the VMM's messages into the monitor's stderr (capped); returns its
/// last line.
fn relay_messages(from: File) -> JoinHandle<String> {
    std::thread::Builder::new()
        .name("vmm-log".into())
        .spawn(move || {
            let mut out = crate::logfile::CappedWriter::new(std::io::stderr(), VMM_LOG_CAP);
            let mut last = String::new();
            let mut reader = BufReader::new(from.take(u64::MAX));
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.by_ref().take(64 << 10).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let _ = out.write_all(&line);
                        let text = String::from_utf8_lossy(&line);
                        let text = text.trim();
                        if !text.is_empty() {
                            last = text.chars().take(512).collect();
                        }
                    }
                }
            }
            last
        })
        .unwrap_or_else(|_| std::thread::spawn(String::new))
}

impl VmmProcess {
    /// Stops the VM from the monitor.
    #[must_use]
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Waits for the VM to end; how it ended (or why the VMM ended without
    /// saying: the VM could not be built, or the process died without a
    /// report), with the VM's boot timeline (empty if the VMM gave none).
    pub fn wait(
        mut self,
    ) -> (
        Result<vmm::VmExit, VmmProcessError>,
        Vec<crate::container::BootTime>,
    ) {
        let mut text = Vec::new();
        let mut overdue = false;
        if let Some(r) = self.report.take() {
            overdue = !read_report(&r, &mut text, END_TIMEOUT);
            if overdue {
                // SAFETY: our own unreaped child: the pid cannot have been reused.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
            }
        }
        let status = self.reap();
        let last = self
            .messages
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.remove();
        }
        let mut boot = Vec::new();
        let mut ended = None;
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Report>(line) {
                Ok(Report::Boot(times)) => boot = times,
                Ok(Report::Exit(exit)) => ended = Some(Ok(exit)),
                Ok(Report::Failed(e)) => ended = Some(Err(VmmProcessError::Build(e))),
                Err(_) => {}
            }
            if ended.is_some() {
                break;
            }
        }
        let ended = ended.unwrap_or_else(|| {
            Err(VmmProcessError::Died(if overdue {
                format!("the VMM did not end within {END_TIMEOUT:?} of being waited for: killed")
            } else {
                died(status, &last)
            }))
        });
        (ended, boot)
    }

    fn reap(&mut self) -> Option<libc::c_int> {
        if self.reaped {
            return None;
        }
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child; `status` is a valid pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                self.reaped = true;
                return Some(status);
            }
            if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                self.reaped = true;
                return None;
            }
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: our own unreaped child: the pid cannot have been reused.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.reap();
        }
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.remove();
        }
    }
}

/// Why a VMM that sent no report ended, in words.
fn died(status: Option<libc::c_int>, last: &str) -> String {
    let said = if last.is_empty() {
        String::new()
    } else {
        format!(" (its last words: {last})")
    };
    let Some(status) = status else {
        return format!("the VMM process vanished{said}");
    };
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        if sig == libc::SIGSYS {
            return format!(
                "the VMM was killed for a system call its seccomp filter forbids{said}"
            );
        }
        return format!("the VMM process was killed by signal {sig}{said}");
    }
    let code = libc::WEXITSTATUS(status);
    if code == jail::EXIT_SECCOMP {
        return format!("the VMM was killed for a system call its seccomp filter forbids{said}");
    }
    format!("the VMM process exited with status {code} without a report{said}")
}

/// `hull __vmm`: reads its launch from stdin, builds the VM, enters its
/// jail, runs the VM and reports how it ended on stdout.
#[must_use]
pub fn child_main() -> i32 {
    // SAFETY: fd 0 is the monitor's pipe, ours alone.
    let stdin = unsafe { File::from_raw_fd(0) };
    let mut reader = BufReader::new(stdin);
    let mut line = Vec::new();
    let read = reader.by_ref().take(LINE_MAX).read_until(b'\n', &mut line);
    let desc: LaunchDesc = match read
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_slice(&line).map_err(|e| e.to_string()))
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("hull __vmm: bad launch from the monitor: {e}");
            return EXIT_BAD_LAUNCH;
        }
    };
    // Nothing but what the monitor passed stays open.
    close_from(desc.fds);
    let times = vmm::BootTimes::new();
    let report = match run_vm(desc, reader, &times) {
        Ok(exit) => Report::Exit(exit),
        Err(e) => Report::Failed(e),
    };
    let mut out = Vec::new();
    for r in [
        Report::Boot(crate::container::BootTime::all(&times)),
        report,
    ] {
        out.extend(serde_json::to_vec(&r).unwrap_or_default());
        out.push(b'\n');
    }
    // SAFETY: fd 1 is the monitor's report pipe, ours alone.
    let mut stdout = unsafe { File::from_raw_fd(1) };
    let _ = stdout.write_all(&out);
    0
}

fn close_from(first: RawFd) {
    let Ok(first) = u32::try_from(first) else {
        return;
    };
    // SAFETY: closes descriptors nobody in this process uses (nothing was
    // opened before the launch was read but its pipes, below `first`).
    unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) };
}

fn take_fd(fd: RawFd) -> Result<OwnedFd, String> {
    if fd < FIRST_FD {
        return Err(format!("bad descriptor {fd} in the launch"));
    }
    // SAFETY: the monitor passed this descriptor for this one use; it is
    // taken once (each number appears once in the launch).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn run_vm(
    desc: LaunchDesc,
    commands: BufReader<File>,
    times: &vmm::BootTimes,
) -> Result<vmm::VmExit, String> {
    let console = File::from(take_fd(desc.console_fd)?);
    let console_out: Box<dyn Write + Send> = match desc.console_cap {
        Some(cap) => Box::new(crate::logfile::CappedWriter::new(console, cap)),
        None => Box::new(console),
    };
    let control = UnixStream::from(take_fd(desc.control_fd)?);
    let net = match desc.net {
        None => None,
        Some(n) => Some(vmm::NetConfig {
            backend: match n.backend {
                NetBackendDesc::Stream(fd) => {
                    vmm::NetBackendConfig::Stream(UnixStream::from(take_fd(fd)?))
                }
                NetBackendDesc::Tap(name) => vmm::NetBackendConfig::Tap(name),
            },
            mac: n.mac,
            mtu: n.mtu,
        }),
    };
    let exit = vmm::ExitSignal::new().map_err(|e| format!("cannot make the exit event: {e}"))?;
    let plan = desc.jail;
    let limits = jail::Limits::for_vm(&desc.disks, desc.cpus);
    let config = vmm::VmConfig {
        boot: desc.boot,
        memory_mib: desc.memory_mib,
        cpus: desc.cpus,
        kvm_path: desc.kvm_path,
        guest_needs: vmm::GuestNeeds::LinuxKernel,
        console_out,
        console_in: None,
        disks: desc.disks,
        shares: desc.shares,
        control: Some(control),
        entropy: true,
        net,
        exit_signal: Some(exit.clone()),
        boot_times: Some(times.clone()),
        seccomp: seccomp_mode(vmm::SeccompMode::Enforce),
    };
    // Build (every host file opened, every socket connected), confine, run.
    let vm = vmm::Vmm::build(config).map_err(|e| crate::error_chain(&e))?;
    if let Some(plan) = &plan {
        jail::enter(plan, &limits)
            .map_err(|e| format!("cannot confine the VMM: {}", crate::error_chain(&e)))?;
    }
    // The monitor's commands, read by a thread of the jailed process (under
    // its own seccomp filter).
    let filters = vm.filters();
    std::thread::Builder::new()
        .name("vmm-commands".into())
        .spawn(move || {
            if let Err(e) = filters.install(vmm::seccomp::ThreadKind::Control) {
                exit.exit(vmm::VmExit::Error(crate::error_chain(&e)));
                return;
            }
            read_commands(commands, &exit);
        })
        .map_err(|e| format!("cannot start the VMM's command thread: {e}"))?;
    vm.run().map_err(|e| crate::error_chain(&e))
}

/// Test-only hook, honoured by `hull __vmm` alone: set to `1`, the VMM's
/// command thread makes a system call outside its seccomp filter
/// (`socket(2)`) as soon as it starts (the VM built and jailed, the guest
/// starting), so that tests can see a VMM killed by its filter and the
/// container's record saying why. Never set it otherwise.
pub const TEST_SECCOMP_VIOLATION: &str = "HULL_TEST_VMM_SECCOMP_VIOLATION";

/// The monitor's commands on stdin, until its end of file. Blocking reads
/// only (the command thread's seccomp filter allows little more).
fn read_commands(mut from: BufReader<File>, exit: &vmm::ExitSignal) {
    if std::env::var(TEST_SECCOMP_VIOLATION).is_ok_and(|v| v == "1") {
        // SAFETY: a plain system call (one the filter forbids).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        tracing::warn!("vmm: the test hook's socket(2) was allowed ({fd})");
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        match from.by_ref().take(LINE_MAX).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => {
                exit.exit(vmm::VmExit::Error(
                    "the container's monitor went away".into(),
                ));
                return;
            }
            Ok(_) => match serde_json::from_slice::<Command>(&line) {
                Ok(Command::Stop(reason)) => exit.exit(reason),
                Err(e) => tracing::warn!("vmm: bad command from the monitor: {e}"),
            },
        }
    }
}

/// The VMM's seccomp mode: `default`, unless a developer sets
/// `HULL_SECCOMP` to `log` (the kernel logs each call a filter would deny:
/// `dmesg` or the audit log), `enforce` or `off`. The default is off for a
/// VM run inside a bigger process (the filter of the thread that runs the
/// VM stays on it), enforced in the VMM's own process.
#[must_use]
pub fn seccomp_mode(default: vmm::SeccompMode) -> vmm::SeccompMode {
    match std::env::var("HULL_SECCOMP").as_deref() {
        Ok("log") => vmm::SeccompMode::Log,
        Ok("enforce") => vmm::SeccompMode::Enforce,
        Ok("off") => vmm::SeccompMode::Off,
        _ => default,
    }
}

/// Whether the environment variable `key` is passed to the VMM's process:
/// hull's own (`HULL_*`: settings, never secrets) and the basics.
fn passes_to_vmm(key: &std::ffi::OsStr) -> bool {
    let key = key.to_string_lossy();
    key.starts_with("HULL_")
        || matches!(
            key.as_ref(),
            "PATH" | "RUST_BACKTRACE" | "RUST_LIB_BACKTRACE" | "LANG" | "LC_ALL" | "TZ"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hulls_settings_and_the_basics_reach_the_vmm() {
        for key in ["HULL_SECCOMP", "HULL_LOG", "PATH", "RUST_BACKTRACE"] {
            assert!(passes_to_vmm(std::ffi::OsStr::new(key)), "{key}");
        }
        for key in [
            "HTTPS_PROXY",
            "AWS_SECRET_ACCESS_KEY",
            "DOCKER_AUTH_CONFIG",
            "HOME",
            "XHULL_X",
        ] {
            assert!(!passes_to_vmm(std::ffi::OsStr::new(key)), "{key}");
        }
    }

    #[test]
    fn a_dead_vmm_is_described() {
        // Killed by SIGSYS (seccomp's kill), by SIGKILL, or exited.
        assert!(died(Some(libc::SIGSYS), "").contains("seccomp"));
        assert!(died(Some(libc::SIGKILL), "").contains("signal 9"));
        assert!(died(Some(3 << 8), "boom").contains("status 3"));
        assert!(died(Some(3 << 8), "boom").contains("boom"));
        assert!(died(Some(jail::EXIT_SECCOMP << 8), "").contains("seccomp"));
    }

    #[test]
    fn launch_and_report_cross_as_json() {
        let r: Report = serde_json::from_slice(
            &serde_json::to_vec(&Report::Exit(vmm::VmExit::PowerOff)).unwrap(),
        )
        .unwrap();
        assert!(matches!(r, Report::Exit(vmm::VmExit::PowerOff)));
        let c: Command = serde_json::from_str(
            &serde_json::to_string(&Command::Stop(vmm::VmExit::Error("x".into()))).unwrap(),
        )
        .unwrap();
        assert!(matches!(c, Command::Stop(vmm::VmExit::Error(_))));
    }
}

//! Starting the container's process: fork, then in the child a new session,
//! the stdio (pipes or a pty), the user, the working directory and `execve`.
//! Failures after the fork come back through a close-on-exec pipe, so the
//! parent reports docker's exit codes exactly.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::command::{os_message, StartError};
use crate::init::security;
use crate::sys;

/// The buffer of a process's stdout and stderr pipes: 1 MiB, the default
/// `pipe-max-size`, which the init's read chunk is sized against.
pub const OUTPUT_PIPE_SIZE: libc::c_int = 1 << 20;

/// Everything the child needs, prepared before the fork.
#[derive(Debug)]
pub struct Prepared {
    /// The executable (resolved through `PATH`).
    pub path: CString,
    /// `argv` (`argv[0]` as the user gave it).
    pub argv: Vec<CString>,
    /// `KEY=VALUE` environment.
    pub envp: Vec<CString>,
    /// Working directory.
    pub cwd: CString,
    /// The command's name, for messages.
    pub name: String,
    /// User and groups.
    pub uid: libc::uid_t,
    /// Primary group.
    pub gid: libc::gid_t,
    /// Supplementary groups.
    pub groups: Vec<libc::gid_t>,
    /// Give the process a pty.
    pub tty: bool,
    /// Feed stdin from the host (else `/dev/null`, or the pty with nothing sent).
    pub stdin: bool,
    /// Initial terminal size (rows, columns).
    pub winsize: Option<(u16, u16)>,
    /// With a tty: make it `/dev/console` too (the main process's).
    pub console: bool,
    /// How it enters the container and what it may do there.
    pub confine: crate::init::security::Confinement,
}

/// The running process, seen from the init.
#[derive(Debug)]
pub struct Child {
    /// Its pid.
    pub pid: libc::pid_t,
    /// Write end of its stdin pipe (not with a tty: writes go to `pty`).
    pub stdin: Option<OwnedFd>,
    /// Read end of its stdout pipe.
    pub stdout: Option<OwnedFd>,
    /// Read end of its stderr pipe.
    pub stderr: Option<OwnedFd>,
    /// The pty master (non-blocking): output from it, input to it.
    pub pty: Option<OwnedFd>,
}

fn runtime(what: &str, e: &io::Error) -> StartError {
    StartError::new(125, format!("{what}: {e}"))
}

/// Sets a terminal's size.
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: valid descriptor and winsize for TIOCSWINSZ; failure is harmless.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// A new pty: (master, slave path).
fn open_pty() -> io::Result<(OwnedFd, CString)> {
    // SAFETY: plain call; the result is checked.
    let m =
        sys::check(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: posix_openpt returned a fresh descriptor we own.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: valid pty master descriptor.
    sys::check(unsafe { libc::grantpt(master.as_raw_fd()) })?;
    // SAFETY: valid pty master descriptor.
    sys::check(unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    let mut buf = [0 as libc::c_char; 64];
    // SAFETY: buffer of the given length.
    let r = unsafe { libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_owned();
    Ok((master, name))
}

/// Descriptors the child puts on 0, 1, 2 (or the pty slave's path).
enum ChildIo {
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    Pty {
        slave: CString,
    },
}

/// Starts the process.
///
/// # Errors
/// The set-up failed (125) or the child could not `execve` (126/127).
pub fn spawn(p: &Prepared) -> Result<Child, StartError> {
    let mut child = Child {
        pid: 0,
        stdin: None,
        stdout: None,
        stderr: None,
        pty: None,
    };
    let io = if p.tty {
        let (master, slave) = open_pty().map_err(|e| runtime("allocate a pty", &e))?;
        if let Some((rows, cols)) = p.winsize {
            set_winsize(master.as_raw_fd(), rows, cols);
        }
        if p.console {
            crate::init::mounts::bind_console(std::path::Path::new(&*slave.to_string_lossy()));
        }
        child.pty = Some(master);
        ChildIo::Pty { slave }
    } else {
        let stdin = if p.stdin {
            let (r, w) = sys::pipe().map_err(|e| runtime("pipe", &e))?;
            child.stdin = Some(w);
            r
        } else {
            sys::open(c"/dev/null", libc::O_RDONLY, 0).map_err(|e| runtime("open /dev/null", &e))?
        };
        let (out_r, out_w) = sys::pipe().map_err(|e| runtime("pipe", &e))?;
        let (err_r, err_w) = sys::pipe().map_err(|e| runtime("pipe", &e))?;
        // Wide output pipes: a process that writes fast fills more before
        // the init runs, so each read (and frame, and host-side wake-up)
        // carries more. A kernel that refuses keeps its default (64 KiB).
        for r in [&out_r, &err_r] {
            let _ = sys::set_pipe_size(r.as_fd(), OUTPUT_PIPE_SIZE);
        }
        child.stdout = Some(out_r);
        child.stderr = Some(err_r);
        ChildIo::Pipes {
            stdin,
            stdout: out_w,
            stderr: err_w,
        }
    };
    let (status_r, status_w) = sys::pipe().map_err(|e| runtime("pipe", &e))?;
    let creates = matches!(p.confine.entry, security::Entry::Create { .. });
    if creates {
        security::new_pid_namespace()?;
    }
    let argv: Vec<*const libc::c_char> = p
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = p
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    // SAFETY: the init is single-threaded, so the child may do anything the
    // parent could; it only runs `child_main`, which never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(runtime("fork", &io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(status_r);
        child_main(p, &io, &argv, &envp, status_w.as_raw_fd());
    }
    child.pid = pid;
    drop(status_w);
    drop(io);

    // Wait for the exec (the status pipe closes) or a failure report.
    let mut report = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match sys::read(status_r.as_fd(), &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => report.extend_from_slice(&buf[..n]),
        }
    }
    if report.len() >= 4 {
        let mut status = 0;
        // SAFETY: reaping our own child, which has exited or is exiting.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let code = i32::from_le_bytes([report[0], report[1], report[2], report[3]]);
        return Err(StartError::new(
            code,
            String::from_utf8_lossy(&report[4..]).into_owned(),
        ));
    }
    if creates {
        security::record_main(pid)?;
    }
    for fd in [&child.pty, &child.stdin, &child.stdout, &child.stderr]
        .into_iter()
        .flatten()
    {
        sys::set_nonblocking(fd.as_fd(), true).map_err(|e| runtime("set O_NONBLOCK", &e))?;
    }
    Ok(child)
}

/// Reports a failure to the parent and exits with its code.
fn fail(status: RawFd, code: i32, message: &str) -> ! {
    let mut report = code.to_le_bytes().to_vec();
    report.extend_from_slice(message.as_bytes());
    // SAFETY: `status` is the open write end of the status pipe.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(status) };
    let _ = sys::write_all(fd, &report);
    // SAFETY: ending the child without running the parent's atexit handlers.
    unsafe { libc::_exit(code) }
}

fn fail_os(status: RawFd, code: i32, what: &str) -> ! {
    let e = io::Error::last_os_error();
    fail(status, code, &format!("{what}: {}", os_message(&e)))
}

/// Limits, user, groups and capabilities, in the child.
fn become_user(p: &Prepared) -> Result<(), String> {
    security::limit(&p.confine)?;
    let os = |what: &str| format!("{what}: {}", os_message(&io::Error::last_os_error()));
    // SAFETY: plain calls with a valid groups buffer.
    unsafe {
        if libc::setgroups(p.groups.len(), p.groups.as_ptr()) < 0 {
            return Err(os("setgroups"));
        }
        if libc::setgid(p.gid) < 0 {
            return Err(os("setgid"));
        }
        if libc::setuid(p.uid) < 0 {
            return Err(os("setuid"));
        }
    }
    security::drop_privileges(&p.confine)
}

/// The child after the fork: never returns.
fn child_main(
    p: &Prepared,
    io: &ChildIo,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    status: RawFd,
) -> ! {
    // SAFETY: all calls below take valid pointers/descriptors prepared by the
    // parent; the child is a copy of a single-threaded process.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in [libc::SIGPIPE, libc::SIGCHLD] {
            libc::signal(sig, libc::SIG_DFL);
        }
        if let Err(m) = security::enter(&p.confine) {
            fail(status, 125, &m);
        }
        if p.confine.reaper {
            let mut theirs = vec![status];
            match io {
                ChildIo::Pipes {
                    stdin,
                    stdout,
                    stderr,
                } => theirs.extend([stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()]),
                ChildIo::Pty { .. } => {}
            }
            security::become_reaper(&theirs, || become_user(p).is_ok());
        }
        if libc::setsid() < 0 {
            fail_os(status, 125, "setsid");
        }
        match io {
            ChildIo::Pty { slave } => {
                let fd = libc::open(slave.as_ptr(), libc::O_RDWR);
                if fd < 0 {
                    fail_os(status, 125, "open the pty");
                }
                if libc::ioctl(fd, libc::TIOCSCTTY, 0) < 0 {
                    fail_os(status, 125, "set the controlling terminal");
                }
                for target in 0..3 {
                    if libc::dup2(fd, target) < 0 {
                        fail_os(status, 125, "dup2");
                    }
                }
                if fd > 2 {
                    libc::close(fd);
                }
            }
            ChildIo::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                for (fd, target) in [(stdin, 0), (stdout, 1), (stderr, 2)] {
                    if libc::dup2(fd.as_raw_fd(), target) < 0 {
                        fail_os(status, 125, "dup2");
                    }
                }
            }
        }
        if let Err(m) = become_user(p) {
            fail(status, 125, &m);
        }
        if libc::chdir(p.cwd.as_ptr()) < 0 {
            let e = io::Error::last_os_error();
            let code = if e.raw_os_error() == Some(libc::ENOENT) {
                127
            } else {
                126
            };
            fail(
                status,
                code,
                &format!(
                    "chdir to cwd ({:?}): {}",
                    p.cwd.to_string_lossy(),
                    os_message(&e)
                ),
            );
        }
        libc::execve(p.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        let e = StartError::exec(&p.name, &io::Error::last_os_error());
        fail(status, e.code, &e.message)
    }
}

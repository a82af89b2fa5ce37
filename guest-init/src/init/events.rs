//! The init's event loop while the container runs: output to the host,
//! host frames to the process, and reaping every child (PID 1 adopts orphans).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::init::channel::{console, Channel};
use crate::init::process::{set_winsize, Child};
use crate::protocol::Frame;
use crate::sys;

/// Largest output chunk per frame.
const CHUNK: usize = 64 * 1024;
/// Stdin bytes held for a process that does not read them before the init
/// stops reading the channel (back-pressure to the host).
const STDIN_BACKLOG: usize = 1 << 20;
/// After the main process ends (and the rest are killed): how long output may
/// pause before the init stops waiting for the pipes to close.
const DRAIN_IDLE: Duration = Duration::from_millis(200);

/// How the run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The main process ended: its exit code, or 128 + signal.
    Exited(i32),
    /// The host sent something invalid: the container was killed.
    Protocol(String),
    /// The channel is gone (why): nobody to report to.
    HostGone(String),
}

/// Blocks `SIGCHLD` (for the signalfd); done first thing, before any fork.
pub fn block_sigchld() {
    // SAFETY: plain signal mask manipulation on a valid set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn signalfd() -> io::Result<OwnedFd> {
    // SAFETY: valid set; signalfd returns a new descriptor or -1.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        let fd = sys::check(libc::signalfd(
            -1,
            &set,
            libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
        ))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// The exit code docker reports for a wait status.
#[must_use]
pub fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        255
    }
}

/// Reaps every exited child; returns the main one's status if it was among them.
pub fn reap(main: libc::pid_t) -> Option<libc::c_int> {
    let mut main_status = None;
    loop {
        let mut status = 0;
        // SAFETY: valid out pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return main_status;
        }
        if pid == main {
            main_status = Some(status);
        }
    }
}

/// Kills every process but the init (what the end of a pid namespace does).
pub fn kill_all() {
    // SAFETY: kill(-1) from PID 1 signals every other process.
    unsafe { libc::kill(-1, libc::SIGKILL) };
}

struct Loop<'a> {
    chan: &'a mut Channel,
    child: Child,
    sigfd: OwnedFd,
    stdin_buf: Vec<u8>,
    stdin_eof: bool,
    /// The host may send stdin (spec.stdin).
    stdin_wanted: bool,
    exit: Option<i32>,
    last_data: Instant,
    buf: Vec<u8>,
}

/// Runs until the main process has ended and its output is forwarded.
/// `early` holds frames that arrived before the process started.
#[must_use]
pub fn run(chan: &mut Channel, child: Child, stdin_wanted: bool, early: Vec<Frame>) -> Outcome {
    let sigfd = match signalfd() {
        Ok(fd) => fd,
        Err(e) => {
            console(&format!("signalfd: {e}"));
            kill_all();
            return Outcome::Protocol(format!("signalfd: {e}"));
        }
    };
    let mut l = Loop {
        chan,
        child,
        sigfd,
        stdin_buf: Vec::new(),
        stdin_eof: false,
        stdin_wanted,
        exit: None,
        last_data: Instant::now(),
        buf: vec![0; CHUNK],
    };
    for f in early {
        l.frame(f);
    }
    let outcome = l.run();
    if !matches!(outcome, Outcome::Exited(_)) {
        kill_all();
    }
    outcome
}

impl Loop<'_> {
    fn run(&mut self) -> Outcome {
        loop {
            if let Some(code) = self.exit {
                let outputs_open = self.child.stdout.is_some()
                    || self.child.stderr.is_some()
                    || self.child.pty.is_some();
                if !outputs_open || self.last_data.elapsed() >= DRAIN_IDLE {
                    return Outcome::Exited(code);
                }
            }
            self.flush_stdin();
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(6);
            let mut add = |fd: RawFd, events: libc::c_short| {
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
            };
            let backlog_full = self.stdin_buf.len() >= STDIN_BACKLOG;
            add(
                if backlog_full {
                    -1
                } else {
                    self.chan.fd().as_raw_fd()
                },
                libc::POLLIN,
            );
            add(self.sigfd.as_raw_fd(), libc::POLLIN);
            add(raw(self.child.stdout.as_ref()), libc::POLLIN);
            add(raw(self.child.stderr.as_ref()), libc::POLLIN);
            let pty_events = if self.stdin_buf.is_empty() {
                libc::POLLIN
            } else {
                libc::POLLIN | libc::POLLOUT
            };
            add(raw(self.child.pty.as_ref()), pty_events);
            add(
                if self.stdin_buf.is_empty() {
                    -1
                } else {
                    raw(self.child.stdin.as_ref())
                },
                libc::POLLOUT,
            );
            let timeout = match self.exit {
                Some(_) => {
                    let left = DRAIN_IDLE.saturating_sub(self.last_data.elapsed());
                    i32::try_from(left.as_millis()).unwrap_or(0).max(1)
                }
                None => -1,
            };
            // SAFETY: `fds` is a valid array of pollfds of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Outcome::Protocol(format!("poll: {e}"));
            }
            let ready = |i: usize| fds[i].revents != 0;
            if ready(1) {
                self.on_sigchld();
            }
            if ready(2) {
                if let Err(o) = self.forward(Stream::Stdout) {
                    return o;
                }
            }
            if ready(3) {
                if let Err(o) = self.forward(Stream::Stderr) {
                    return o;
                }
            }
            if ready(4) {
                if let Err(o) = self.forward(Stream::Pty) {
                    return o;
                }
            }
            if ready(0) {
                match self.chan.fill() {
                    Ok(()) => {}
                    Err(e) => return Outcome::HostGone(format!("reading: {e}")),
                }
                loop {
                    match self.chan.next_buffered() {
                        Ok(Some(f)) => self.frame(f),
                        Ok(None) => break,
                        Err(e) => return Outcome::Protocol(e.to_string()),
                    }
                }
            }
        }
    }

    fn on_sigchld(&mut self) {
        // SAFETY: `signalfd_siginfo` is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: a buffer of exactly one siginfo for the non-blocking signalfd.
            let n = unsafe {
                libc::read(
                    self.sigfd.as_raw_fd(),
                    std::ptr::addr_of_mut!(info).cast(),
                    size,
                )
            };
            if n <= 0 {
                break;
            }
        }
        if let Some(status) = reap(self.child.pid) {
            self.exit = Some(exit_code(status));
            self.last_data = Instant::now();
            // Like the end of a container's pid namespace: the rest go too,
            // and the pipes they held close. Output already written stays
            // readable.
            kill_all();
        }
    }

    fn forward(&mut self, which: Stream) -> Result<(), Outcome> {
        let slot = match which {
            Stream::Stdout => &mut self.child.stdout,
            Stream::Stderr => &mut self.child.stderr,
            Stream::Pty => &mut self.child.pty,
        };
        let Some(fd) = slot.as_ref() else {
            return Ok(());
        };
        match sys::read(fd.as_fd(), &mut self.buf) {
            Ok(0) => *slot = None,
            Ok(n) => {
                let data = self.buf[..n].to_vec();
                let frame = if matches!(which, Stream::Stderr) {
                    Frame::Stderr(data)
                } else {
                    Frame::Stdout(data)
                };
                self.last_data = Instant::now();
                if let Err(e) = self.chan.send(&frame) {
                    return Err(Outcome::HostGone(format!("writing: {e}")));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // EIO: a pty whose slave side is all closed.
            Err(_) => *slot = None,
        }
        Ok(())
    }

    fn frame(&mut self, f: Frame) {
        match f {
            Frame::Stdin(data) if self.stdin_wanted && !self.stdin_eof => {
                self.stdin_buf.extend_from_slice(&data);
            }
            Frame::StdinEof => {
                self.stdin_eof = true;
            }
            Frame::Signal(sig) if self.exit.is_none() && (1..=64).contains(&sig) => {
                // SAFETY: signalling our own, not yet reaped, child.
                unsafe { libc::kill(self.child.pid, sig) };
            }
            Frame::Resize(rows, cols) => {
                if let Some(pty) = &self.child.pty {
                    set_winsize(pty.as_raw_fd(), rows, cols);
                }
            }
            // Not for the guest, too late (Spec) or unwanted: ignored.
            _ => {}
        }
    }

    /// Writes what stdin bytes the process takes now; closes its stdin at EOF.
    fn flush_stdin(&mut self) {
        let target = match (&self.child.stdin, &self.child.pty) {
            (Some(w), _) => Some(w.as_fd()),
            (None, Some(p)) => Some(p.as_fd()),
            (None, None) => None,
        };
        let mut broken = false;
        if let Some(fd) = target {
            while !self.stdin_buf.is_empty() {
                match write_some(fd, &self.stdin_buf) {
                    Ok(n) => {
                        self.stdin_buf.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
        } else {
            self.stdin_buf.clear();
        }
        if broken {
            // The process closed its stdin: nothing more to deliver.
            self.stdin_buf.clear();
            self.stdin_buf.shrink_to_fit();
            self.child.stdin = None;
            self.stdin_wanted = false;
        }
        if self.stdin_eof && self.stdin_buf.is_empty() {
            // A pty has no end of input; a pipe closes.
            self.child.stdin = None;
        }
    }
}

fn write_some(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    let n = sys::write(fd, data)?;
    if n == 0 {
        return Err(io::Error::from(io::ErrorKind::WriteZero));
    }
    Ok(n)
}

fn raw(fd: Option<&OwnedFd>) -> RawFd {
    fd.map_or(-1, AsRawFd::as_raw_fd)
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
    Pty,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_docker() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(libc::SIGKILL), 137);
        assert_eq!(exit_code(libc::SIGTERM), 143);
    }
}

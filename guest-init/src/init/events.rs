//! The init's event loop while the container runs: output to the host,
//! host frames to the processes, and reaping every child (PID 1 adopts
//! orphans).
//!
//! Besides the main process there may be any number (up to [`MAX_EXECS`])
//! of exec'd ones (`hull exec`), each with its own stdio; their frames are
//! wrapped in [`Frame::Proc`] with the host's id, the main process's are not.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::command::StartError;
use crate::init::channel::{console, Channel};
use crate::init::process::{self, set_winsize, Child};
use crate::protocol::{Frame, OUTPUT_HEADER_MAX};
use crate::spec::{ExecSpec, RunSpec};
use crate::sys;

/// Largest output chunk per frame (read at once): a quarter of an output
/// pipe, so a fast writer still has room while the init forwards.
const CHUNK: usize = 256 * 1024;
/// Stdin bytes held (for all processes together) for processes that do not
/// read them before the init stops reading the channel (back-pressure to the
/// host).
const STDIN_BACKLOG: usize = 1 << 20;
/// After a process ends: how long its output may pause before the init stops
/// waiting for its pipes to close (a background process may hold them).
const DRAIN_IDLE: Duration = Duration::from_millis(200);
/// After an exec'd process ends while the container runs: the longest its
/// output is waited for (a background process may keep writing to it).
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// After the main process ends (and everything is killed): how long the init
/// waits for exec'd processes to be reaped before reporting them killed.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// The most exec'd processes at once (started and not yet reported ended).
pub const MAX_EXECS: usize = 64;
/// The message for an exec when the main process is not running.
pub const NOT_RUNNING: &str = "container is not running";

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

/// Reaps every exited child, calling `f` with each pid and wait status.
pub fn reap_each(mut f: impl FnMut(libc::pid_t, libc::c_int)) {
    loop {
        let mut status = 0;
        // SAFETY: valid out pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        f(pid, status);
    }
}

/// Reaps every exited child; returns the main one's status if it was among them.
pub fn reap(main: libc::pid_t) -> Option<libc::c_int> {
    let mut main_status = None;
    reap_each(|pid, status| {
        if pid == main {
            main_status = Some(status);
        }
    });
    main_status
}

/// Kills every process but the init (what the end of a pid namespace does).
pub fn kill_all() {
    // SAFETY: kill(-1) from PID 1 signals every other process.
    unsafe { libc::kill(-1, libc::SIGKILL) };
}

/// A process the loop serves: the main one (id 0) or an exec'd one.
#[derive(Debug)]
struct Proc {
    /// 0 for the main process, else the host's exec id.
    id: u32,
    child: Child,
    stdin_buf: Vec<u8>,
    stdin_eof: bool,
    /// The host may send stdin.
    stdin_wanted: bool,
    /// Its exit code, once reaped.
    exit: Option<i32>,
    /// When it was reaped (meaningful once `exit` is set).
    exited_at: Instant,
    /// When output last came (or when it was reaped, if later).
    last_data: Instant,
}

impl Proc {
    fn new(id: u32, child: Child, stdin_wanted: bool) -> Self {
        let now = Instant::now();
        Self {
            id,
            child,
            stdin_buf: Vec::new(),
            stdin_eof: false,
            stdin_wanted,
            exit: None,
            exited_at: now,
            last_data: now,
        }
    }

    /// The frame as the host expects it for this process.
    fn wrap(&self, f: Frame) -> Frame {
        if self.id == 0 {
            f
        } else {
            Frame::Proc(self.id, Box::new(f))
        }
    }

    fn outputs_open(&self) -> bool {
        self.child.stdout.is_some() || self.child.stderr.is_some() || self.child.pty.is_some()
    }

    fn reaped(&mut self, status: libc::c_int, now: Instant) {
        self.exit = Some(exit_code(status));
        self.exited_at = now;
        self.last_data = now;
    }

    /// When waiting for its output ends at the latest (it has exited and
    /// some output is still open).
    fn deadline(&self) -> Option<Instant> {
        if self.exit.is_none() || !self.outputs_open() {
            return None;
        }
        let idle = self.last_data + DRAIN_IDLE;
        Some(if self.id == 0 {
            idle
        } else {
            idle.min(self.exited_at + DRAIN_MAX)
        })
    }

    /// It has exited and its output is forwarded (or waited for long enough).
    fn drained(&self, now: Instant) -> bool {
        self.exit.is_some() && self.deadline().is_none_or(|d| now >= d)
    }

    /// A host frame for this process.
    fn input(&mut self, f: &Frame) {
        match f {
            Frame::Stdin(data) if self.stdin_wanted && !self.stdin_eof && self.exit.is_none() => {
                self.stdin_buf.extend_from_slice(data);
            }
            Frame::StdinEof => {
                self.stdin_eof = true;
            }
            Frame::Signal(sig) if self.exit.is_none() && (1..=64).contains(sig) => {
                // SAFETY: signalling our own, not yet reaped, child.
                unsafe { libc::kill(self.child.pid, *sig) };
            }
            Frame::Resize(rows, cols) => {
                if let Some(pty) = &self.child.pty {
                    set_winsize(pty.as_raw_fd(), *rows, *cols);
                }
            }
            // Not for a process, or unwanted: ignored.
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

/// Which descriptor of a process a poll entry is.
#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
    Pty,
    /// Its stdin pipe (only polled to wake up when it takes more).
    Stdin,
}

struct Loop<'a> {
    chan: &'a mut Channel,
    spec: &'a RunSpec,
    main: Proc,
    execs: Vec<Proc>,
    sigfd: OwnedFd,
    buf: Vec<u8>,
}

/// Runs until the main process (and every exec'd one) has ended and its
/// output is forwarded. `early` holds frames that arrived before the process
/// started; `spec` is the container's, for exec'd processes.
#[must_use]
pub fn run(chan: &mut Channel, child: Child, spec: &RunSpec, early: &[Frame]) -> Outcome {
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
        spec,
        main: Proc::new(0, child, spec.stdin),
        execs: Vec::new(),
        sigfd,
        buf: vec![0; OUTPUT_HEADER_MAX + CHUNK],
    };
    let outcome = match l.frames(early) {
        Ok(()) => l.run(),
        Err(o) => o,
    };
    if !matches!(outcome, Outcome::Exited(_)) {
        kill_all();
    }
    outcome
}

impl Loop<'_> {
    fn run(&mut self) -> Outcome {
        loop {
            let now = Instant::now();
            if let Err(o) = self.report_execs(now) {
                return o;
            }
            if self.main.drained(now) && self.execs.is_empty() {
                if let Some(code) = self.main.exit {
                    return Outcome::Exited(code);
                }
            }
            self.main.flush_stdin();
            for p in &mut self.execs {
                p.flush_stdin();
            }

            let backlog: usize = self.main.stdin_buf.len()
                + self.execs.iter().map(|p| p.stdin_buf.len()).sum::<usize>();
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(2 + 4 * (1 + self.execs.len()));
            // What each entry after the first two is: (process, stream);
            // process 0 is the main one, k > 0 is `execs[k - 1]`.
            let mut what: Vec<(usize, Stream)> = Vec::with_capacity(fds.capacity());
            let mut add = |fd: RawFd, events: libc::c_short| {
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
            };
            add(
                if backlog >= STDIN_BACKLOG {
                    -1
                } else {
                    self.chan.fd().as_raw_fd()
                },
                libc::POLLIN,
            );
            add(self.sigfd.as_raw_fd(), libc::POLLIN);
            for (k, p) in std::iter::once(&self.main).chain(&self.execs).enumerate() {
                let pending = !p.stdin_buf.is_empty();
                let entries = [
                    (p.child.stdout.as_ref(), Stream::Stdout, libc::POLLIN),
                    (p.child.stderr.as_ref(), Stream::Stderr, libc::POLLIN),
                    (
                        p.child.pty.as_ref(),
                        Stream::Pty,
                        if pending {
                            libc::POLLIN | libc::POLLOUT
                        } else {
                            libc::POLLIN
                        },
                    ),
                    (
                        p.child.stdin.as_ref().filter(|_| pending),
                        Stream::Stdin,
                        libc::POLLOUT,
                    ),
                ];
                for (fd, stream, events) in entries {
                    if let Some(fd) = fd {
                        add(fd.as_raw_fd(), events);
                        what.push((k, stream));
                    }
                }
            }
            let timeout = self.timeout(now);
            // SAFETY: `fds` is a valid array of pollfds of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Outcome::Protocol(format!("poll: {e}"));
            }
            if fds[1].revents != 0 {
                self.on_sigchld();
            }
            for (pfd, &(k, stream)) in fds[2..].iter().zip(&what) {
                if pfd.revents == 0 || matches!(stream, Stream::Stdin) {
                    continue;
                }
                let p = if k == 0 {
                    &mut self.main
                } else {
                    &mut self.execs[k - 1]
                };
                if let Err(o) = forward(self.chan, &mut self.buf, p, stream) {
                    return o;
                }
            }
            if fds[0].revents != 0 {
                if let Err(e) = self.chan.fill() {
                    return Outcome::HostGone(format!("reading: {e}"));
                }
                let mut batch = Vec::new();
                let mut invalid = None;
                loop {
                    match self.chan.next_buffered() {
                        Ok(Some(f)) => batch.push(f),
                        Ok(None) => break,
                        Err(e) => {
                            invalid = Some(e);
                            break;
                        }
                    }
                }
                if let Err(o) = self.frames(&batch) {
                    return o;
                }
                if let Some(e) = invalid {
                    return Outcome::Protocol(e.to_string());
                }
            }
        }
    }

    /// The poll timeout (ms) until the next drain deadline; -1 for none.
    fn timeout(&self, now: Instant) -> libc::c_int {
        let mut deadlines: Vec<Instant> = std::iter::once(&self.main)
            .chain(&self.execs)
            .filter_map(Proc::deadline)
            .collect();
        if self.main.exit.is_some() && !self.execs.is_empty() {
            deadlines.push(self.main.exited_at + KILL_WAIT);
        }
        match deadlines.into_iter().min() {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(now);
                i32::try_from(left.as_millis())
                    .unwrap_or(i32::MAX)
                    .saturating_add(1)
            }
        }
    }

    /// Sends `Exited` for every exec'd process that is done, and forgets it.
    /// Once the main process is done, the ones not reaped within
    /// [`KILL_WAIT`] (they were SIGKILLed) are reported as killed.
    fn report_execs(&mut self, now: Instant) -> Result<(), Outcome> {
        let force = self.main.drained(now) && now >= self.main.exited_at + KILL_WAIT;
        let mut i = 0;
        while i < self.execs.len() {
            if !(force || self.execs[i].drained(now)) {
                i += 1;
                continue;
            }
            let p = self.execs.remove(i);
            let code = p.exit.unwrap_or(128 + libc::SIGKILL);
            self.chan.note(format!("exec {} exited {code}", p.id));
            self.send(&p.wrap(Frame::Exited(code)))?;
        }
        Ok(())
    }

    fn send(&self, f: &Frame) -> Result<(), Outcome> {
        self.chan
            .send(f)
            .map_err(|e| Outcome::HostGone(format!("writing: {e}")))
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
        let now = Instant::now();
        let main_pid = (self.main.exit.is_none()).then_some(self.main.child.pid);
        let mut main_status = None;
        let execs = &mut self.execs;
        reap_each(|pid, status| {
            if Some(pid) == main_pid {
                main_status = Some(status);
            } else if let Some(p) = execs
                .iter_mut()
                .find(|p| p.exit.is_none() && p.child.pid == pid)
            {
                p.reaped(status, now);
            }
        });
        if let Some(status) = main_status {
            self.main.reaped(status, now);
            // Like the end of a container's pid namespace: the rest go too
            // (exec'd processes included), and the pipes they held close.
            // Output already written stays readable.
            kill_all();
        }
    }

    /// Handles frames from the host, in order (`Err`: the loop must end).
    fn frames(&mut self, batch: &[Frame]) -> Result<(), Outcome> {
        for (i, f) in batch.iter().enumerate() {
            match f {
                // Id 0 would read as the main process's: not answered.
                Frame::Exec(0, _) => console("exec request with id 0 ignored"),
                Frame::Exec(id, json) => {
                    if let Err(e) = self.exec(*id, json, &batch[i + 1..]) {
                        self.send(&Frame::Proc(
                            *id,
                            Box::new(Frame::Failed {
                                code: e.code,
                                message: e.message,
                            }),
                        ))?;
                    }
                }
                Frame::CopyOut(id, path) | Frame::CopyIn(id, path) => {
                    let direction = if matches!(f, Frame::CopyIn(..)) {
                        super::copy::Direction::In
                    } else {
                        super::copy::Direction::Out
                    };
                    if let Err(e) = self.copy(*id, direction, path) {
                        self.send(&Frame::Proc(
                            *id,
                            Box::new(Frame::Failed {
                                code: e.code,
                                message: e.message,
                            }),
                        ))?;
                    }
                }
                Frame::Proc(id, inner) => {
                    if let Some(p) = self.execs.iter_mut().find(|p| p.id == *id) {
                        p.input(inner);
                    }
                }
                // Spec (too late) and guest -> host kinds are ignored there.
                f => self.main.input(f),
            }
        }
        Ok(())
    }

    /// Starts `hull cp`'s copy `id` (see [`super::copy`]) as an exec'd process.
    fn copy(
        &mut self,
        id: u32,
        direction: super::copy::Direction,
        path: &[u8],
    ) -> Result<(), StartError> {
        let busy = |m: String| StartError::new(125, m);
        if self.main.exit.is_some() {
            return Err(busy(NOT_RUNNING.into()));
        }
        if id == 0 || self.execs.iter().any(|p| p.id == id) {
            return Err(busy(format!("copy id {id} is already in use")));
        }
        if self.execs.len() >= MAX_EXECS {
            return Err(busy(format!(
                "too many exec'd processes (at most {MAX_EXECS} at once)"
            )));
        }
        // In the container as an exec'd process is: its namespaces (and
        // root), cgroup, limits and capabilities.
        let confine = super::security::for_exec(&self.spec.security)?;
        let child = super::copy::spawn(direction, path, &confine)?;
        self.execs.push(Proc::new(
            id,
            child,
            direction == super::copy::Direction::In,
        ));
        Ok(())
    }

    /// Starts exec'd process `id`. `after` are the frames that came with the
    /// request: the last `Resize` for it among them sizes its pty from the start.
    fn exec(&mut self, id: u32, json: &[u8], after: &[Frame]) -> Result<(), StartError> {
        let busy = |m: String| StartError::new(125, m);
        if self.main.exit.is_some() {
            return Err(busy(NOT_RUNNING.into()));
        }
        if self.execs.iter().any(|p| p.id == id) {
            return Err(busy(format!("exec id {id} is already in use")));
        }
        if self.execs.len() >= MAX_EXECS {
            return Err(busy(format!(
                "too many exec'd processes (at most {MAX_EXECS} at once)"
            )));
        }
        let spec: ExecSpec =
            serde_json::from_slice(json).map_err(|e| busy(format!("invalid exec spec: {e}")))?;
        if spec.args.is_empty() {
            return Err(busy("no command given".into()));
        }
        let winsize = if spec.tty {
            after.iter().rev().find_map(|f| match f {
                Frame::Proc(i, inner) if *i == id => match **inner {
                    Frame::Resize(r, c) => Some((r, c)),
                    _ => None,
                },
                _ => None,
            })
        } else {
            None
        };
        let prepared = super::prepare_exec(self.spec, &spec, winsize)?;
        let child = process::spawn(&prepared)?;
        self.chan
            .note(format!("exec {id}: {}", prepared.path.to_string_lossy()));
        self.execs.push(Proc::new(id, child, spec.stdin));
        Ok(())
    }
}

/// Forwards one read of `p`'s `which` output to the host, sent in place:
/// the bytes are read into `buf` after room for the frame's header, which
/// goes in front of them (no copy of the data in the init; `buf` must be
/// longer than [`OUTPUT_HEADER_MAX`]).
fn forward(chan: &Channel, buf: &mut [u8], p: &mut Proc, which: Stream) -> Result<(), Outcome> {
    let slot = match which {
        Stream::Stdout => &mut p.child.stdout,
        Stream::Stderr => &mut p.child.stderr,
        Stream::Pty => &mut p.child.pty,
        Stream::Stdin => return Ok(()),
    };
    let Some(fd) = slot.as_ref() else {
        return Ok(());
    };
    let (head, data) = buf.split_at_mut(OUTPUT_HEADER_MAX);
    match sys::read(fd.as_fd(), data) {
        Ok(0) => *slot = None,
        Ok(n) => {
            p.last_data = Instant::now();
            let stderr = matches!(which, Stream::Stderr);
            let header = Frame::output_header(p.id, stderr, n)
                .map_err(|e| Outcome::Protocol(e.to_string()))?;
            let at = OUTPUT_HEADER_MAX - header.len();
            head[at..].copy_from_slice(&header);
            if let Err(e) = chan.send_raw(&buf[at..OUTPUT_HEADER_MAX + n]) {
                return Err(Outcome::HostGone(format!("writing: {e}")));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        // EIO: a pty whose slave side is all closed.
        Err(_) => *slot = None,
    }
    Ok(())
}

fn write_some(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    let n = sys::write(fd, data)?;
    if n == 0 {
        return Err(io::Error::from(io::ErrorKind::WriteZero));
    }
    Ok(n)
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

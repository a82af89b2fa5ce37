//! The CLI end of a container session (attach or exec, through the
//! container's monitor): sends the request, then relays stdin, signals and
//! terminal size one way and stdout and stderr the other, until the monitor
//! reports how the process ended.
//!
//! One thread, one poll(2) loop. The guest side is hostile: frames are
//! bounded by the protocol decoder, and everything queued towards the guest
//! is bounded here (stdin is only read while the queue is short), so a guest
//! that stops reading cannot make hull buffer without limit.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use hull_protocol::frame::{Frame, FrameDecoder, ProtocolError};

/// Stop reading stdin while this much is queued for the guest.
const MAX_QUEUED: usize = 256 * 1024;
/// Chunk size for stdin frames.
const STDIN_CHUNK: usize = 64 * 1024;
/// Most of the init's notes kept in [`Marks`] (a guest sends as many as it likes).
const MAX_NOTES: usize = 256;
/// Bytes read from the stream at a time, at most (straight into the frame
/// decoder).
const READ_MAX: usize = 256 * 1024;

/// How the container ended, as the guest reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The container's main process exited with this status.
    Exited(i32),
    /// The init could not run the container.
    Failed {
        /// Exit status to use.
        code: i32,
        /// Why.
        message: String,
    },
    /// The stream ended before the guest said anything conclusive.
    Vanished,
}

/// Errors on the host side of the session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Local I/O failed.
    #[error("{what}")]
    Io {
        /// What hull was doing.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The guest broke the protocol.
    #[error("the guest init broke the control protocol")]
    Protocol(#[source] ProtocolError),
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> SessionError {
    move |source| SessionError::Io { what, source }
}

/// What the session relays besides the control stream.
#[derive(Debug)]
pub struct Relay {
    /// The host's stdin, when the container's stdin is open (`-i`).
    pub stdin: Option<RawFd>,
    /// A signalfd delivering the signals to forward to the container.
    pub signals: Option<RawFd>,
    /// Print the init's timing notes on stderr.
    pub debug: bool,
    /// When the VM was started (for timing notes).
    pub started: Instant,
}

/// Timing marks seen during the session, for `--debug`.
#[derive(Debug, Default, Clone)]
pub struct Marks {
    /// VM start to the init's `Ready`.
    pub ready_ms: Option<u128>,
    /// The init's own notes: (ms since the init started, text), the first
    /// [`MAX_NOTES`].
    pub notes: Vec<(u64, String)>,
}

struct Session<'a> {
    stream: &'a mut UnixStream,
    relay: &'a Relay,
    queue: Vec<u8>,
    decoder: FrameDecoder,
    outcome: Option<Outcome>,
    stdin_open: bool,
    marks: Marks,
}

impl Session<'_> {
    fn queue(&mut self, frame: &Frame) -> Result<(), SessionError> {
        frame
            .encode_into(&mut self.queue)
            .map_err(SessionError::Protocol)
    }

    fn flush_some(&mut self) -> Result<(), SessionError> {
        while !self.queue.is_empty() {
            match self.stream.write(&self.queue) {
                Ok(0) => break,
                Ok(n) => {
                    self.queue.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The guest is gone: nothing more can reach it.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    self.queue.clear();
                    break;
                }
                Err(e) => return Err(io_err("writing to the guest")(e)),
            }
        }
        Ok(())
    }

    fn handle(&mut self, frame: Frame) -> Result<(), SessionError> {
        match frame {
            Frame::Ready => {}
            Frame::Stdout(data) => write_all_fd(libc::STDOUT_FILENO, &data),
            Frame::Stderr(data) => write_all_fd(libc::STDERR_FILENO, &data),
            Frame::Note(ms, text) => {
                if self.marks.ready_ms.is_none() {
                    // The init's first note comes as it starts.
                    self.marks.ready_ms = Some(self.relay.started.elapsed().as_millis());
                }
                if self.relay.debug {
                    eprintln!("hull: guest +{ms} ms: {text}");
                }
                if self.marks.notes.len() < MAX_NOTES {
                    self.marks.notes.push((ms, text));
                }
            }
            Frame::Exited(code) => {
                self.outcome.get_or_insert(Outcome::Exited(code));
            }
            Frame::Failed { code, message } => {
                self.outcome
                    .get_or_insert(Outcome::Failed { code, message });
            }
            // Host-to-guest frames coming back are a broken guest.
            other => {
                return Err(SessionError::Protocol(ProtocolError::Invalid(format!(
                    "unexpected frame from the guest: {other:?}"
                ))))
            }
        }
        Ok(())
    }

    fn read_stream(&mut self) -> Result<bool, SessionError> {
        let stream = &mut self.stream;
        match self.decoder.fill_with(READ_MAX, |b| stream.read(b)) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(false),
            Err(e) => return Err(io_err("reading from the guest")(e)),
        }
        while let Some(frame) = self.decoder.next_frame().map_err(SessionError::Protocol)? {
            self.handle(frame)?;
        }
        Ok(true)
    }

    fn read_stdin(&mut self, fd: RawFd) -> Result<(), SessionError> {
        let mut buf = vec![0u8; STDIN_CHUNK];
        // SAFETY: `buf` is valid for its length; `fd` is the caller's open stdin.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(0) => {
                self.stdin_open = false;
                self.queue(&Frame::StdinEof)
            }
            Ok(n) => self.queue(&Frame::Stdin(buf[..n].to_vec())),
            Err(_) => {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    return Ok(());
                }
                // A broken stdin is the container's EOF.
                self.stdin_open = false;
                self.queue(&Frame::StdinEof)
            }
        }
    }

    fn read_signal(&mut self, fd: RawFd) -> Result<(), SessionError> {
        let mut info = std::mem::MaybeUninit::<libc::signalfd_siginfo>::zeroed();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is a writable buffer of exactly one siginfo record.
        let n = unsafe { libc::read(fd, info.as_mut_ptr().cast(), size) };
        if usize::try_from(n).ok() == Some(size) {
            // SAFETY: the kernel filled the whole record.
            let signo = unsafe { info.assume_init() }.ssi_signo;
            let signo = i32::try_from(signo).unwrap_or(libc::SIGTERM);
            if signo == libc::SIGWINCH {
                if let Some((rows, cols)) = crate::tty::window_size(libc::STDIN_FILENO) {
                    self.queue(&Frame::Resize(rows, cols))?;
                }
                return Ok(());
            }
            tracing::debug!("forwarding signal {signo} to the container");
            self.queue(&Frame::Signal(signo))?;
        }
        Ok(())
    }
}

fn write_all_fd(fd: RawFd, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: `data` is valid for its length; fd 1 and 2 are hull's own.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        match usize::try_from(n) {
            Ok(0) => return,
            Ok(n) => data = &data[n..],
            Err(_) if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            // A closed stdout (e.g. `| head`) must not stop the container.
            Err(_) => return,
        }
    }
}

/// Runs the session over `stream` until the monitor closes it; `initial`
/// frames (the request first) are sent before anything else.
///
/// # Errors
/// Local I/O failures and protocol violations by the guest.
pub fn run(
    stream: &mut UnixStream,
    initial: &[Frame],
    relay: &Relay,
) -> Result<(Outcome, Marks), SessionError> {
    stream
        .set_nonblocking(true)
        .map_err(io_err("setting up the control stream"))?;
    let mut s = Session {
        stream,
        relay,
        queue: Vec::new(),
        decoder: FrameDecoder::new(),
        outcome: None,
        stdin_open: relay.stdin.is_some(),
        marks: Marks::default(),
    };
    for frame in initial {
        s.queue(frame)?;
    }
    loop {
        let sock = s.stream.as_raw_fd();
        let mut fds = vec![libc::pollfd {
            fd: sock,
            events: libc::POLLIN | if s.queue.is_empty() { 0 } else { libc::POLLOUT },
            revents: 0,
        }];
        let stdin_slot = match relay.stdin {
            Some(fd) if s.stdin_open && s.queue.len() < MAX_QUEUED && s.outcome.is_none() => {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                Some(fds.len() - 1)
            }
            _ => None,
        };
        let signal_slot = relay.signals.map(|fd| {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            fds.len() - 1
        });
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(1);
        // SAFETY: `fds` is a valid array of `nfds` pollfd records.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io_err("waiting for the guest")(e));
        }
        if fds[0].revents & libc::POLLOUT != 0 {
            s.flush_some()?;
        }
        if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
            && !s.read_stream()?
        {
            break;
        }
        // The init sends a process's whole output before its end: done.
        if s.outcome.is_some() {
            break;
        }
        if let Some(i) = stdin_slot {
            if fds[i].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                s.read_stdin(fds[i].fd)?;
            }
        }
        if let Some(i) = signal_slot {
            if fds[i].revents & libc::POLLIN != 0 {
                s.read_signal(fds[i].fd)?;
            }
        }
        s.flush_some()?;
    }
    Ok((s.outcome.unwrap_or(Outcome::Vanished), s.marks))
}

/// Signals forwarded to the container while it runs.
const FORWARDED_SIGNALS: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Blocks the forwarded signals in this thread (and the threads it starts
/// later) and returns a signalfd that delivers them.
pub fn forwarded_signals_fd(extra: &[libc::c_int]) -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set = unsafe { std::mem::zeroed::<libc::sigset_t>() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &sig in FORWARDED_SIGNALS.iter().chain(extra) {
        // SAFETY: `set` is a valid sigset_t and `sig` a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    // SAFETY: `set` is initialised; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay() -> Relay {
        Relay {
            stdin: None,
            signals: None,
            debug: false,
            started: Instant::now(),
        }
    }

    #[test]
    fn spec_is_sent_after_ready_and_the_exit_code_comes_back() {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        let guest_side = std::thread::spawn(move || {
            let spec = Frame::read_from(&mut guest).unwrap();
            assert_eq!(spec, Frame::Spec(b"{\"x\":1}".to_vec()));
            Frame::Note(5, "exec".into()).write_to(&mut guest).unwrap();
            Frame::Exited(3).write_to(&mut guest).unwrap();
        });
        let request = Frame::Spec(b"{\"x\":1}".to_vec());
        let (outcome, marks) = run(&mut host, &[request], &relay()).unwrap();
        guest_side.join().unwrap();
        assert_eq!(outcome, Outcome::Exited(3));
        assert_eq!(marks.notes, vec![(5, "exec".to_string())]);
        assert!(marks.ready_ms.is_some());
    }

    #[test]
    fn a_guest_sending_endless_notes_does_not_grow_the_note_list() {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        let guest_side = std::thread::spawn(move || {
            let _spec = Frame::read_from(&mut guest).unwrap();
            for i in 0..5000 {
                Frame::Note(i, format!("note {i}"))
                    .write_to(&mut guest)
                    .unwrap();
            }
            Frame::Exited(0).write_to(&mut guest).unwrap();
        });
        let (outcome, marks) = run(&mut host, &[Frame::Spec(Vec::new())], &relay()).unwrap();
        guest_side.join().unwrap();
        assert_eq!(outcome, Outcome::Exited(0));
        assert_eq!(marks.notes.len(), MAX_NOTES);
        assert_eq!(marks.notes[0], (0, "note 0".to_string()));
    }

    #[test]
    fn a_guest_that_vanishes_is_reported() {
        let (mut host, guest) = UnixStream::pair().unwrap();
        drop(guest);
        let (outcome, _) = run(&mut host, &[Frame::Spec(Vec::new())], &relay()).unwrap();
        assert_eq!(outcome, Outcome::Vanished);
    }

    #[test]
    fn a_guest_sending_garbage_is_a_protocol_error() {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        guest.write_all(&[0xee, 0, 0, 0, 0]).unwrap();
        drop(guest);
        assert!(matches!(
            run(&mut host, &[Frame::Spec(Vec::new())], &relay()),
            Err(SessionError::Protocol(_))
        ));
    }

    #[test]
    fn a_failure_is_reported_with_its_code() {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        Frame::Failed {
            code: 127,
            message: "nope".into(),
        }
        .write_to(&mut guest)
        .unwrap();
        drop(guest);
        let (outcome, _) = run(&mut host, &[Frame::Spec(Vec::new())], &relay()).unwrap();
        assert_eq!(
            outcome,
            Outcome::Failed {
                code: 127,
                message: "nope".into()
            }
        );
    }
}

//! A container's monitor: the process that runs its VM (hull's podman-style
//! answer to "no daemon": one small process per container, like conmon).
//!
//! It holds the container's monitor lock for its whole life (so a dead
//! monitor is detectable), relays between the guest's control stream and
//! the CLI clients connected to its socket, keeps the container's log and
//! state, and ends when the VM does.
//!
//! Clients speak the guest protocol's frames. Their first frame is a
//! [`Frame::Spec`] holding a JSON [`Request`]: attach to the main process,
//! exec a new one, signal, or stop. After that an attached client sends
//! `Stdin`/`StdinEof`/`Signal`/`Resize` and receives `Stdout`/`Stderr`/
//! `Note`/`Exited`/`Failed`; an exec client the same, for its own process.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use hull_protocol::frame::{Frame, FrameDecoder};
use hull_protocol::spec::ExecSpec;
use serde::{Deserialize, Serialize};

use crate::container::{files, now, socket_path, Container, Containers, Lock, Status};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// What a client asks of the monitor (its first frame, as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Request {
    /// Relay the main process's output (and stdin, if asked).
    Attach {
        /// Forward the client's stdin.
        stdin: bool,
    },
    /// Start a process in the container and relay it.
    Exec(ExecSpec),
    /// Send a signal to the main process.
    Signal(i32),
    /// SIGTERM, then SIGKILL after `timeout_secs`; the client stays
    /// connected until the container has ended.
    Stop {
        /// Grace period.
        timeout_secs: u64,
    },
    /// `hull cp` out: a tar archive of `path` comes as the process's stdout.
    CopyOut {
        /// The container path.
        path: String,
    },
    /// `hull cp` in: the client's stdin (a tar archive) is unpacked at `path`.
    CopyIn {
        /// The container path.
        path: String,
    },
    /// Only the main process's end: the client gets its `Exited` or
    /// `Failed` frame (the Engine API's `wait`), and does not count as
    /// attached.
    Wait,
}

/// While a client has this much queued, the guest is not read: a slow
/// reader slows the container down (as docker's attach does) instead of
/// losing output.
const CLIENT_HIGH_WATER: usize = 1 << 20;
/// Beyond this much queued for a client (which back-pressure keeps from
/// happening), the client is dropped.
const CLIENT_QUEUE_MAX: usize = 8 << 20;
/// Stop reading clients' input while this much is queued for the guest.
const GUEST_QUEUE_MAX: usize = 256 << 10;
/// Most clients at once.
const MAX_CLIENTS: usize = 64;
/// Bytes read from the guest or a client at a time, at most (straight into
/// its frame decoder).
const READ_MAX: usize = 256 << 10;
/// How long a foreground run's monitor holds the command for its client.
const ATTACH_WAIT: Duration = Duration::from_secs(30);
/// After the SIGKILL of a stop, how long before the VM itself is stopped.
const KILL_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, PartialEq, Eq)]
enum Role {
    New,
    Attached {
        stdin: bool,
    },
    Exec(u32),
    Waiting,
    /// Gets only the main process's end.
    Watching,
}

struct Client {
    stream: UnixStream,
    decoder: FrameDecoder,
    out: Vec<u8>,
    /// Bytes at the front of `out` already written.
    sent: usize,
    role: Role,
    gone: bool,
}

impl Client {
    fn send(&mut self, frame: &Frame) {
        if frame.encode_into(&mut self.out).is_ok() && self.out.len() > CLIENT_QUEUE_MAX {
            tracing::warn!("monitor: dropping a client that does not read");
            self.gone = true;
        }
    }

    fn flush(&mut self) {
        while !self.out.is_empty() && !self.gone {
            match self.stream.write(&self.out[self.sent..]) {
                Ok(0) => self.gone = true,
                Ok(n) => {
                    // What was written is dropped at once only when all is:
                    // dropping the front of a long queue after every
                    // partial write would move the rest each time.
                    self.sent += n;
                    if self.sent >= self.out.len() {
                        self.out.clear();
                        self.sent = 0;
                    } else if self.sent >= self.out.len() / 2 {
                        self.out.drain(..self.sent);
                        self.sent = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.gone = true,
            }
        }
    }
}

/// The main process's outcome as the guest reported it.
#[derive(Debug, Clone)]
enum MainOutcome {
    Exited(i32),
    Failed(i32, String),
}

struct Monitor {
    /// The log record being made, reused for every chunk of output.
    log_buf: Vec<u8>,
    guest: UnixStream,
    guest_decoder: FrameDecoder,
    guest_out: Vec<u8>,
    guest_open: bool,
    clients: Vec<Client>,
    spec: Option<Vec<u8>>,
    ready: bool,
    wait_attach_until: Option<Instant>,
    /// The container's log; none with `--log-driver none`.
    log: Option<crate::logfile::RotatingLog>,
    outcome: Option<MainOutcome>,
    next_exec: u32,
    exec_owner: HashMap<u32, usize>,
    stop_deadline: Option<Instant>,
    force_deadline: Option<Instant>,
    exit_signal: crate::vmmproc::Control,
    /// The main process runs (the init reported its exec).
    main_running: bool,
    /// Frames for processes that do not run yet (exec requests and every
    /// process's input that came before the main process ran), in order.
    held: Vec<Frame>,
    /// Bytes of `held`, counted against the guest queue's bound.
    held_bytes: usize,
    /// What `hull stop` sends first (`--stop-signal`, the image's, SIGTERM).
    stop_signal: i32,
}

/// `{"log":…,"stream":…,"time":…}` and a newline, in `out` (cleared first),
/// with invalid UTF-8 replaced as docker does. This runs for every chunk of
/// output, so it is written by hand rather than through serde_json: JSON
/// escapes each control byte in six (`\u0000`), and serde_json writes them
/// one at a time, which made the monitor's CPU time under `head -c 64M
/// /dev/zero` as large as the guest's. Here a clean run is one copy, and a run of one
/// escaped byte is written once and then doubled in place.
fn log_line(out: &mut Vec<u8>, stream: &str, data: &[u8]) {
    out.clear();
    out.extend_from_slice(b"{\"log\":\"");
    for chunk in data.utf8_chunks() {
        push_json_escaped(out, chunk.valid().as_bytes());
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
    out.extend_from_slice(b"\",\"stream\":\"");
    push_json_escaped(out, stream.as_bytes());
    // Writing to a Vec cannot fail.
    let _ = writeln!(out, "\",\"time\":{}}}", now());
}

/// Appends the valid UTF-8 `text` to `out` as the inside of a JSON string,
/// escaped as serde_json escapes it.
fn push_json_escaped(out: &mut Vec<u8>, text: &[u8]) {
    out.reserve(text.len() + 2);
    let (mut clean_from, mut at) = (0, 0);
    loop {
        let rest = text.get(at..).unwrap_or_default();
        let Some(skip) = rest.iter().position(|&b| ESCAPE[usize::from(b)] != 0) else {
            break;
        };
        at += skip;
        let byte = rest.get(skip).copied().unwrap_or_default();
        let short = ESCAPE[usize::from(byte)];
        out.extend_from_slice(text.get(clean_from..at).unwrap_or_default());
        let same = 1 + text
            .get(at + 1..)
            .unwrap_or_default()
            .iter()
            .take_while(|&&b| b == byte)
            .count();
        if short != b'u' && same == 1 {
            out.extend_from_slice(&[b'\\', short]);
        } else if short == b'u' {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let [high, low] = [HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]];
            push_repeated(out, &[b'\\', b'u', b'0', b'0', high, low], same);
        } else {
            push_repeated(out, &[b'\\', short], same);
        }
        at += same;
        clean_from = at;
    }
    out.extend_from_slice(text.get(clean_from..).unwrap_or_default());
}

/// How JSON escapes each byte inside a string: 0 where it needs no escape,
/// `u` for `\u00XX`, else the letter of its short form (`\n`).
static ESCAPE: [u8; 256] = {
    let mut table = [0; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Appends `unit` `count` times: once, then by doubling what is there.
fn push_repeated(out: &mut Vec<u8>, unit: &[u8], count: usize) {
    if count == 0 {
        return;
    }
    let start = out.len();
    let total = unit.len() * count;
    out.reserve(total);
    out.extend_from_slice(unit);
    while out.len() - start < total {
        let have = out.len() - start;
        out.extend_from_within(start..start + have.min(total - have));
    }
}

impl Monitor {
    /// A monitor of the VM at the other end of `guest`, to be sent `spec`
    /// once its init is ready and a client attached (or `wait_attach_until`
    /// passed), logging to `log` and stopping the VM through `exit_signal`.
    fn new(
        guest: UnixStream,
        log: Option<crate::logfile::RotatingLog>,
        spec: Vec<u8>,
        wait_attach_until: Option<Instant>,
        exit_signal: crate::vmmproc::Control,
        stop_signal: i32,
    ) -> Self {
        Self {
            log_buf: Vec::new(),
            guest,
            guest_decoder: FrameDecoder::new(),
            guest_out: Vec::new(),
            guest_open: true,
            clients: Vec::new(),
            spec: Some(spec),
            ready: false,
            wait_attach_until,
            log,
            outcome: None,
            next_exec: 0,
            exec_owner: HashMap::new(),
            stop_deadline: None,
            force_deadline: None,
            exit_signal,
            main_running: false,
            held: Vec::new(),
            held_bytes: 0,
            stop_signal,
        }
    }

    /// Takes a connected client (its first frame says what it wants).
    fn add_client(&mut self, stream: UnixStream) {
        self.clients.push(Client {
            stream,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            sent: 0,
            role: Role::New,
            gone: false,
        });
    }

    /// Appends `data` to the container's log as one record of `stream`
    /// (a log that cannot be written loses the record, not the output).
    fn log_output(&mut self, stream: &str, data: &[u8]) {
        if let Some(log) = self.log.as_mut() {
            log_line(&mut self.log_buf, stream, data);
            let _ = log.write_record(&self.log_buf);
        }
    }

    fn queue_for_guest(&mut self, frame: &Frame) {
        // Nothing is queued for a frame that cannot be encoded.
        let _ = frame.encode_into(&mut self.guest_out);
    }

    /// Sends a frame for a process now, or holds it until the main process
    /// runs: before that the init takes no input for any process, and input
    /// (and its EOF) sent early would be lost.
    fn send_to_process(&mut self, frame: Frame) {
        if self.main_running {
            self.queue_for_guest(&frame);
        } else {
            self.held_bytes += frame.encode().map_or(0, |b| b.len());
            self.held.push(frame);
        }
    }

    /// A signal for the main process: now, or once it runs (the init takes
    /// nothing but the spec before that; a signal sent early would be lost).
    fn signal_main(&mut self, signal: i32) {
        self.send_to_process(Frame::Signal(signal));
    }

    fn maybe_send_spec(&mut self) {
        if !self.ready || self.spec.is_none() {
            return;
        }
        let attached = self
            .clients
            .iter()
            .any(|c| matches!(c.role, Role::Attached { .. }));
        let waited_out = self.wait_attach_until.is_none_or(|t| Instant::now() >= t);
        if attached || waited_out {
            if let Some(spec) = self.spec.take() {
                self.queue_for_guest(&Frame::Spec(spec));
            }
        }
    }

    fn broadcast_main(&mut self, frame: &Frame) {
        let end = matches!(frame, Frame::Exited(_) | Frame::Failed { .. });
        for c in &mut self.clients {
            if matches!(c.role, Role::Attached { .. }) || (end && c.role == Role::Watching) {
                c.send(frame);
            }
        }
    }

    fn on_guest_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Ready => {
                self.ready = true;
                self.maybe_send_spec();
            }
            Frame::Stdout(ref data) | Frame::Stderr(ref data) => {
                let stream = if matches!(frame, Frame::Stdout(_)) {
                    "stdout"
                } else {
                    "stderr"
                };
                self.log_output(stream, data);
                self.broadcast_main(&frame);
            }
            Frame::Note(_, ref text) => {
                if text.starts_with("exec /") && !self.main_running {
                    // The init's note for the main process: execs can go now.
                    self.main_running = true;
                    self.held_bytes = 0;
                    for held in std::mem::take(&mut self.held) {
                        self.queue_for_guest(&held);
                    }
                }
                self.broadcast_main(&frame);
            }
            Frame::Exited(code) => {
                self.outcome.get_or_insert(MainOutcome::Exited(code));
                self.broadcast_main(&frame);
            }
            Frame::Failed { code, ref message } => {
                self.log_output("stderr", format!("{message}\n").as_bytes());
                self.outcome
                    .get_or_insert(MainOutcome::Failed(code, message.clone()));
                self.broadcast_main(&frame);
            }
            Frame::Proc(id, inner) => {
                if let Some(&idx) = self.exec_owner.get(&id) {
                    let done = matches!(*inner, Frame::Exited(_) | Frame::Failed { .. });
                    if let Some(c) = self.clients.get_mut(idx) {
                        c.send(&inner);
                    }
                    if done {
                        self.exec_owner.remove(&id);
                    }
                }
            }
            other => tracing::warn!("monitor: unexpected frame from the guest: {other:?}"),
        }
    }

    fn on_client_frame(&mut self, idx: usize, frame: Frame) {
        let role = match self.clients.get(idx) {
            Some(c) => match c.role {
                Role::New => None,
                Role::Attached { stdin } => Some((true, stdin, 0)),
                Role::Exec(id) => Some((false, true, id)),
                Role::Waiting | Role::Watching => return,
            },
            None => return,
        };
        let Some((main, stdin_ok, id)) = role else {
            self.first_frame(idx, frame);
            return;
        };
        let forward = match frame {
            Frame::Stdin(_) | Frame::StdinEof if stdin_ok => frame,
            Frame::Signal(_) | Frame::Resize(..) => frame,
            _ => return,
        };
        if main {
            match forward {
                Frame::Signal(n) => self.signal_main(n),
                // The init reads the size the terminal starts with next to the spec.
                Frame::Resize(..) if self.spec.is_none() => self.queue_for_guest(&forward),
                other => self.send_to_process(other),
            }
        } else {
            self.send_to_process(Frame::Proc(id, Box::new(forward)));
        }
    }

    fn first_frame(&mut self, idx: usize, frame: Frame) {
        let request = match frame {
            Frame::Spec(json) => serde_json::from_slice::<Request>(&json).ok(),
            _ => None,
        };
        let Some(client) = self.clients.get_mut(idx) else {
            return;
        };
        let Some(request) = request else {
            client.send(&Frame::Failed {
                code: 125,
                message: "bad request to the monitor".into(),
            });
            client.role = Role::Waiting;
            return;
        };
        match request {
            Request::Attach { .. } | Request::Wait => {
                client.role = match request {
                    Request::Attach { stdin } => Role::Attached { stdin },
                    _ => Role::Watching,
                };
                if let Some(outcome) = self.outcome.clone() {
                    // Attached after the end: say how it ended.
                    client.send(&match outcome {
                        MainOutcome::Exited(code) => Frame::Exited(code),
                        MainOutcome::Failed(code, message) => Frame::Failed { code, message },
                    });
                }
                self.maybe_send_spec();
            }
            Request::Exec(_) | Request::CopyOut { .. } | Request::CopyIn { .. } => {
                if self.outcome.is_some() {
                    client.send(&Frame::Failed {
                        code: 125,
                        message: "the container is not running".into(),
                    });
                    client.role = Role::Waiting;
                    return;
                }
                self.next_exec = self.next_exec.wrapping_add(1).max(1);
                let id = self.next_exec;
                client.role = Role::Exec(id);
                self.exec_owner.insert(id, idx);
                self.send_to_process(match request {
                    Request::CopyOut { path } => Frame::CopyOut(id, path.into_bytes()),
                    Request::CopyIn { path } => Frame::CopyIn(id, path.into_bytes()),
                    Request::Exec(spec) => {
                        Frame::Exec(id, serde_json::to_vec(&spec).unwrap_or_default())
                    }
                    _ => return,
                });
            }
            Request::Signal(sig) => {
                client.role = Role::Waiting;
                client.gone = true;
                self.signal_main(sig);
            }
            Request::Stop { timeout_secs } => {
                client.role = Role::Waiting;
                self.signal_main(self.stop_signal);
                let deadline = Instant::now()
                    .checked_add(Duration::from_secs(timeout_secs))
                    .unwrap_or_else(Instant::now);
                self.stop_deadline = Some(self.stop_deadline.map_or(deadline, |d| d.min(deadline)));
            }
        }
    }

    fn deadlines(&mut self) {
        let now = Instant::now();
        if self.stop_deadline.is_some_and(|d| now >= d) {
            self.stop_deadline = None;
            self.signal_main(libc::SIGKILL);
            self.force_deadline = Some(now + KILL_GRACE);
        }
        if self.force_deadline.is_some_and(|d| now >= d) {
            self.force_deadline = None;
            self.exit_signal.exit(vmm::VmExit::Error(
                "stopped by hull: the guest did not end".into(),
            ));
        }
        self.maybe_send_spec();
    }

    fn next_timeout_ms(&self) -> i32 {
        [
            self.stop_deadline,
            self.force_deadline,
            self.wait_attach_until
                .filter(|_| self.ready && self.spec.is_some()),
        ]
        .into_iter()
        .flatten()
        .min()
        .map_or(-1, |d| {
            i32::try_from(d.saturating_duration_since(Instant::now()).as_millis() + 1)
                .unwrap_or(i32::MAX)
        })
    }

    fn read_guest(&mut self) {
        let guest = &mut self.guest;
        match self.guest_decoder.fill_with(READ_MAX, |b| guest.read(b)) {
            Ok(0) => self.guest_open = false,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => self.guest_open = false,
        }
        loop {
            match self.guest_decoder.next_frame() {
                Ok(Some(frame)) => self.on_guest_frame(frame),
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("monitor: the guest broke the protocol: {e}");
                    self.exit_signal.exit(vmm::VmExit::Error(format!(
                        "the guest init broke the control protocol: {e}"
                    )));
                    self.guest_open = false;
                    break;
                }
            }
        }
    }

    fn flush_guest(&mut self) {
        while !self.guest_out.is_empty() {
            match self.guest.write(&self.guest_out) {
                Ok(0) => break,
                Ok(n) => {
                    self.guest_out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.guest_out.clear();
                    break;
                }
            }
        }
    }

    fn read_client(&mut self, idx: usize) {
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        let stream = &mut c.stream;
        match c.decoder.fill_with(READ_MAX, |b| stream.read(b)) {
            Ok(0) => c.gone = true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => c.gone = true,
        }
        loop {
            let next = match self.clients.get_mut(idx) {
                Some(c) => c.decoder.next_frame(),
                None => return,
            };
            match next {
                Ok(Some(frame)) => self.on_client_frame(idx, frame),
                Ok(None) => break,
                Err(_) => {
                    if let Some(c) = self.clients.get_mut(idx) {
                        c.gone = true;
                    }
                    break;
                }
            }
        }
    }

    /// Forgets clients that left; an exec client leaving kills its process.
    fn reap_clients(&mut self) {
        let mut kept = Vec::with_capacity(self.clients.len());
        let mut remap = HashMap::new();
        for (old, c) in std::mem::take(&mut self.clients).into_iter().enumerate() {
            if c.gone {
                if let Role::Exec(id) = c.role {
                    if self.exec_owner.remove(&id).is_some() {
                        self.queue_for_guest(&Frame::Proc(
                            id,
                            Box::new(Frame::Signal(libc::SIGKILL)),
                        ));
                    }
                }
            } else {
                remap.insert(old, kept.len());
                kept.push(c);
            }
        }
        self.clients = kept;
        for idx in self.exec_owner.values_mut() {
            if let Some(new) = remap.get(idx) {
                *idx = *new;
            }
        }
    }

    fn run(&mut self, listener: &UnixListener) -> Result<()> {
        while self.guest_open {
            let clients_behind = self.clients.iter().any(|c| {
                !c.gone
                    && matches!(c.role, Role::Attached { .. } | Role::Exec(_))
                    && c.out.len() > CLIENT_HIGH_WATER
            });
            let mut fds = vec![
                libc::pollfd {
                    fd: self.guest.as_raw_fd(),
                    events: if clients_behind { 0 } else { libc::POLLIN }
                        | if self.guest_out.is_empty() {
                            0
                        } else {
                            libc::POLLOUT
                        },
                    revents: 0,
                },
                libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let accept_input = self.guest_out.len() + self.held_bytes < GUEST_QUEUE_MAX;
            for c in &self.clients {
                let mut events = if c.out.is_empty() { 0 } else { libc::POLLOUT };
                // Input for processes waits while the guest is behind; requests
                // (stop, kill, a new attach) are always read.
                if accept_input || matches!(c.role, Role::New | Role::Waiting) {
                    events |= libc::POLLIN;
                }
                fds.push(libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
            let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(2);
            // SAFETY: `fds` is a valid array of `nfds` pollfd records.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), nfds, self.next_timeout_ms()) };
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return Err(io::Error::last_os_error().into());
            }
            let revents: Vec<i16> = fds.iter().map(|f| f.revents).collect();
            if revents[0] & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.read_guest();
            }
            if revents[1] & libc::POLLIN != 0 {
                if let Ok((stream, _)) = listener.accept() {
                    if self.clients.len() < MAX_CLIENTS && stream.set_nonblocking(true).is_ok() {
                        self.add_client(stream);
                    }
                }
            }
            for (i, ev) in revents.iter().enumerate().skip(2) {
                let idx = i - 2;
                if ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.read_client(idx);
                }
            }
            self.deadlines();
            self.flush_guest();
            for c in &mut self.clients {
                c.flush();
            }
            self.reap_clients();
        }
        Ok(())
    }
}

/// Runs the monitor of container `key` (the hidden `hull __monitor`).
///
/// # Errors
/// The container cannot be set up; its VM's own ending is recorded in its state.
pub fn run(key: &str, wait_attach: bool, debug: bool) -> Result<()> {
    let store = images::Store::open(None)?;
    let containers = Containers::new(store.root());
    let container = containers.find(key)?;
    let Some(_alive) = Lock::try_exclusive(&container.path(files::MONITOR_LOCK))? else {
        return Err("this container already has a monitor".into());
    };
    let result = run_locked(&store, &container, wait_attach, debug);
    if let Err(e) = &result {
        let message = crate::error_chain(e.as_ref());
        let _ = container.update_state(|s| {
            s.status = Status::Exited;
            s.finished = Some(now());
            s.exit_code = Some(crate::flags::EXIT_RUNTIME_ERROR);
            s.error = Some(message.clone());
            s.pid = None;
        });
    }
    if container.config.auto_remove && containers.remove(&container).is_ok() {
        crate::volume::remove_anonymous(store.root(), &container.config.mounts);
    }
    result
}

fn run_locked(
    store: &images::Store,
    container: &Container,
    wait_attach: bool,
    debug: bool,
) -> Result<()> {
    let image = store.find(&container.config.image_id)?.ok_or_else(|| {
        format!(
            "image {} of the container was removed",
            container.config.image
        )
    })?;
    let prepared = crate::vmprep::prepare_vm(store, &image, container, debug)?;
    let socket = socket_path(store.root(), &container.config.id);
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    listener.set_nonblocking(true)?;
    let log = match container.config.log.driver {
        crate::logfile::LogDriver::JsonFile => Some(crate::logfile::RotatingLog::open(
            &container.path(files::LOG),
            container.config.log,
        )?),
        crate::logfile::LogDriver::None => None,
    };

    container.update_state(|s| {
        s.status = Status::Running;
        s.pid = Some(std::process::id());
        s.started = Some(now());
    })?;
    let crate::vmprep::PreparedVm {
        vm,
        spec_json,
        host_end,
        passt,
        volumes: _volumes,
        shares: _shares,
    } = prepared;
    let vm = crate::vmmproc::spawn(vm, debug)?;
    let exit_signal = vm.control();
    host_end.set_nonblocking(true)?;
    let mut monitor = Monitor::new(
        host_end,
        log,
        spec_json,
        wait_attach.then(|| Instant::now() + ATTACH_WAIT),
        exit_signal.clone(),
        container.config.spec.security.stop_signal,
    );
    let looped = monitor.run(&listener);
    if looped.is_err() {
        exit_signal.exit(vmm::VmExit::Error("the container's monitor failed".into()));
    }
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    let (vm_exit, boot_times) = vm.wait();
    if debug && !boot_times.is_empty() {
        eprintln!(
            "hull: boot timer: {}",
            crate::container::BootTime::line(&boot_times)
        );
    }
    // The container's ports are freed with it, before it is recorded as exited.
    if let Some(mut passt) = passt {
        if let Some(why) = passt.exited() {
            tracing::warn!("monitor: the container's network ended early: {why}");
        }
        drop(passt);
    }

    let (code, error) = match (&monitor.outcome, &vm_exit) {
        (Some(MainOutcome::Exited(code)), _) => (*code, None),
        (Some(MainOutcome::Failed(code, message)), _) => (*code, Some(message.clone())),
        (None, Ok(exit)) => (
            crate::flags::EXIT_RUNTIME_ERROR,
            Some(format!(
                "the container's VM ended before the container did: {exit}"
            )),
        ),
        (None, Err(e)) => (
            crate::flags::EXIT_RUNTIME_ERROR,
            Some(crate::error_chain(e)),
        ),
    };
    if monitor.outcome.is_none() {
        let message = error.clone().unwrap_or_default();
        monitor.broadcast_main(&Frame::Failed { code, message });
    }
    // Execs the guest never answered (it ended first).
    for idx in std::mem::take(&mut monitor.exec_owner).into_values() {
        if let Some(c) = monitor.clients.get_mut(idx) {
            c.send(&Frame::Failed {
                code: 125,
                message: "the container is not running".into(),
            });
        }
    }
    container.update_state(|s| {
        s.status = Status::Exited;
        s.finished = Some(now());
        s.exit_code = Some(code);
        s.error.clone_from(&error);
        s.pid = None;
        s.boot_times.clone_from(&boot_times);
    })?;
    // Give clients their last frames, briefly (they may have gone).
    let deadline = Instant::now() + Duration::from_secs(2);
    while monitor.clients.iter().any(|c| !c.out.is_empty() && !c.gone) && Instant::now() < deadline
    {
        for c in &mut monitor.clients {
            let _ = c.stream.set_nonblocking(false);
            let _ = c.stream.set_write_timeout(Some(Duration::from_millis(500)));
            c.flush();
        }
    }
    looped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_docker_json_file_records() {
        let mut line = b"left over".to_vec();
        log_line(&mut line, "stdout", b"a \"quoted\"\n\0\xff line\n");
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["log"], "a \"quoted\"\n\0\u{fffd} line\n");
        assert_eq!(v["stream"], "stdout");
        assert!(v["time"].as_u64().is_some_and(|t| t > 0));
        assert!(line.starts_with(b"{\"log\":"));
    }

    /// The hand-written escaping says what serde_json says, byte for byte,
    /// on output full of what JSON escapes, runs of it, multi-byte UTF-8
    /// and invalid sequences.
    #[test]
    fn log_lines_escape_as_serde_json_does() {
        #[derive(serde::Serialize)]
        struct Record<'a> {
            log: &'a str,
            stream: &'a str,
        }
        let pieces: [&[u8]; 12] = [
            b"\0",
            b"\0\0\0\0\0",
            b"\"",
            b"\\",
            b"\n",
            b"\r\n",
            b"\x1f\x7f",
            b"plain text ",
            "é€😀".as_bytes(),
            b"\xff",
            b"\xe2\x82",
            b"\t\x08\x0c",
        ];
        let mut seed = 0x2545_f491_u32;
        for len in 0..400 {
            let mut data = Vec::new();
            for _ in 0..len % 40 {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                data.extend_from_slice(pieces[seed as usize % pieces.len()]);
            }
            let mut line = Vec::new();
            log_line(&mut line, "stderr", &data);
            let lossy = String::from_utf8_lossy(&data);
            let want = serde_json::to_string(&Record {
                log: &lossy,
                stream: "stderr",
            })
            .unwrap();
            let want = want.strip_suffix('}').unwrap();
            assert!(
                line.starts_with(want.as_bytes()),
                "{data:?}: {}",
                String::from_utf8_lossy(&line)
            );
            let rest = &line[want.len()..];
            assert!(rest.starts_with(b",\"time\":") && rest.ends_with(b"}\n"));
        }
    }

    #[test]
    fn repeated_units_are_exact() {
        for count in 0..70 {
            let mut out = b"x".to_vec();
            push_repeated(&mut out, b"abc", count);
            assert_eq!(out.len(), 1 + 3 * count);
            assert!(out[1..].chunks(3).all(|c| c == b"abc"));
        }
    }

    /// A monitor with a fake VM: the guest's end of the control stream,
    /// the read end of the VMM's command pipe, the log's directory.
    struct Fixture {
        monitor: Monitor,
        _guest: UnixStream,
        commands: std::fs::File,
        _dir: tempfile::TempDir,
    }

    fn exec_spec() -> ExecSpec {
        ExecSpec {
            args: vec!["true".into()],
            env: Vec::new(),
            cwd: None,
            user: None,
            tty: false,
            stdin: false,
        }
    }

    fn fixture(wait_attach_until: Option<Instant>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (host, guest) = UnixStream::pair().unwrap();
        let (r, w) = std::io::pipe().unwrap();
        let log = crate::logfile::RotatingLog::open(
            &dir.path().join("container.log"),
            crate::logfile::LogOptions::default(),
        )
        .unwrap();
        let control =
            crate::vmmproc::Control::to(std::fs::File::from(std::os::fd::OwnedFd::from(w)));
        let monitor = Monitor::new(
            host,
            Some(log),
            b"{}".to_vec(),
            wait_attach_until,
            control,
            libc::SIGTERM,
        );
        Fixture {
            monitor,
            _guest: guest,
            commands: std::fs::File::from(std::os::fd::OwnedFd::from(r)),
            _dir: dir,
        }
    }

    fn frames(mut bytes: &[u8]) -> Vec<Frame> {
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let n = decoder.room().min(bytes.len());
            decoder.feed(&bytes[..n]);
            bytes = &bytes[n..];
            while let Some(f) = decoder.next_frame().unwrap() {
                out.push(f);
            }
        }
        out
    }

    /// A client that said what it wants; returns its index and far end.
    fn client(m: &mut Monitor, request: &Request) -> (usize, UnixStream) {
        let (near, far) = UnixStream::pair().unwrap();
        m.add_client(near);
        let idx = m.clients.len() - 1;
        m.on_client_frame(idx, Frame::Spec(serde_json::to_vec(request).unwrap()));
        (idx, far)
    }

    #[test]
    fn the_spec_waits_for_the_init_and_an_attached_client() {
        let mut f = fixture(Some(Instant::now() + Duration::from_secs(600)));
        let m = &mut f.monitor;
        m.on_guest_frame(Frame::Ready);
        assert!(m.guest_out.is_empty(), "no client attached yet");
        client(m, &Request::Wait);
        assert!(m.guest_out.is_empty(), "a waiter is not attached");
        client(m, &Request::Attach { stdin: false });
        assert!(matches!(frames(&m.guest_out)[..], [Frame::Spec(_)]));

        // Detached (no wait): the spec goes as soon as the init is ready.
        let mut f = fixture(None);
        assert!(f.monitor.guest_out.is_empty());
        f.monitor.on_guest_frame(Frame::Ready);
        assert!(matches!(frames(&f.monitor.guest_out)[..], [Frame::Spec(_)]));
    }

    #[test]
    fn input_before_the_main_process_runs_is_held_and_then_sent_in_order() {
        let mut f = fixture(None);
        let m = &mut f.monitor;
        m.on_guest_frame(Frame::Ready);
        let (idx, _far) = client(m, &Request::Attach { stdin: true });
        m.on_client_frame(idx, Frame::Stdin(b"a".to_vec()));
        m.on_client_frame(idx, Frame::Signal(libc::SIGUSR1));
        m.on_client_frame(idx, Frame::StdinEof);
        assert_eq!(
            frames(&m.guest_out).len(),
            1,
            "only the spec before the exec"
        );
        assert!(m.held_bytes > 0);
        m.on_guest_frame(Frame::Note(0, "exec /bin/cat".into()));
        let sent = frames(&m.guest_out);
        assert!(
            matches!(
                &sent[..],
                [Frame::Spec(_), Frame::Stdin(a), Frame::Signal(s), Frame::StdinEof]
                    if a == b"a" && *s == libc::SIGUSR1
            ),
            "{sent:?}"
        );
        assert_eq!(m.held_bytes, 0);
        // Once it runs, input goes straight through.
        m.on_client_frame(idx, Frame::Stdin(b"b".to_vec()));
        assert_eq!(frames(&m.guest_out).len(), 5);
    }

    #[test]
    fn output_is_logged_and_relayed_and_a_client_that_does_not_read_is_dropped() {
        let mut f = fixture(None);
        let m = &mut f.monitor;
        let (reader, _far) = client(m, &Request::Attach { stdin: false });
        let (waiter, _far2) = client(m, &Request::Wait);
        let chunk = vec![b'x'; 1 << 20];
        m.on_guest_frame(Frame::Stdout(chunk.clone()));
        assert!(!m.clients[reader].gone);
        assert!(
            m.clients[waiter].out.is_empty(),
            "a waiter gets only the end"
        );
        for _ in 0..(CLIENT_QUEUE_MAX >> 20) {
            m.on_guest_frame(Frame::Stdout(chunk.clone()));
        }
        assert!(
            m.clients[reader].gone,
            "a queue past its bound drops the client"
        );
        m.on_guest_frame(Frame::Exited(3));
        assert!(matches!(
            frames(&m.clients[waiter].out)[..],
            [Frame::Exited(3)]
        ));
        // Every chunk was logged, whoever read it (rotation at 10 MiB kept
        // the newest in container.log, the rest in container.log.1).
        let mut records = 0;
        for name in ["container.log", "container.log.1"] {
            if let Ok(text) = std::fs::read_to_string(f._dir.path().join(name)) {
                records += text.lines().count();
            }
        }
        assert_eq!(records, 1 + (CLIENT_QUEUE_MAX >> 20));
    }

    #[test]
    fn a_client_queue_survives_partial_writes_in_order() {
        let mut f = fixture(None);
        let m = &mut f.monitor;
        let (idx, mut far) = client(m, &Request::Attach { stdin: false });
        m.clients[idx].stream.set_nonblocking(true).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(100_000) {
            m.on_guest_frame(Frame::Stdout(piece.to_vec()));
        }
        let mut got = Vec::new();
        let mut buf = vec![0; 50_000];
        while !m.clients[idx].out.is_empty() {
            m.clients[idx].flush();
            let n = far.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        far.set_nonblocking(true).unwrap();
        while let Ok(n) = far.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let out: Vec<u8> = frames(&got)
            .into_iter()
            .flat_map(|f| match f {
                Frame::Stdout(d) => d,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(
            out == data,
            "{} of {} bytes, in order",
            out.len(),
            data.len()
        );
    }

    #[test]
    fn stop_signals_then_kills_then_stops_the_vm() {
        let mut f = fixture(None);
        let m = &mut f.monitor;
        m.on_guest_frame(Frame::Note(0, "exec /bin/sleep".into()));
        client(m, &Request::Stop { timeout_secs: 0 });
        assert!(matches!(
            frames(&m.guest_out)[..],
            [Frame::Signal(libc::SIGTERM)]
        ));
        m.deadlines();
        assert!(matches!(
            frames(&m.guest_out)[..],
            [Frame::Signal(libc::SIGTERM), Frame::Signal(libc::SIGKILL)]
        ));
        assert!(m.force_deadline.is_some());
        m.force_deadline = Some(Instant::now());
        m.deadlines();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&f.commands), &mut line).unwrap();
        assert!(line.contains("the guest did not end"), "{line}");
    }

    #[test]
    fn an_exec_client_that_leaves_has_its_process_killed_and_others_keep_theirs() {
        let mut f = fixture(None);
        let m = &mut f.monitor;
        m.on_guest_frame(Frame::Note(0, "exec /bin/sleep".into()));
        let spec = exec_spec();
        let (first, _a) = client(m, &Request::Exec(spec.clone()));
        let (second, _b) = client(m, &Request::Exec(spec));
        assert_eq!((first, second), (0, 1));
        let execs = frames(&m.guest_out);
        assert!(
            matches!(execs[..], [Frame::Exec(1, _), Frame::Exec(2, _)]),
            "{execs:?}"
        );
        m.guest_out.clear();
        m.clients[first].gone = true;
        m.reap_clients();
        let killed = frames(&m.guest_out);
        assert!(
            matches!(&killed[..], [Frame::Proc(1, s)] if **s == Frame::Signal(libc::SIGKILL)),
            "{killed:?}"
        );
        // Exec 2's client is now at index 0 and still gets its output.
        m.on_guest_frame(Frame::Proc(2, Box::new(Frame::Stdout(b"hi".to_vec()))));
        assert!(matches!(&frames(&m.clients[0].out)[..], [Frame::Stdout(d)] if d == b"hi"));
        m.on_guest_frame(Frame::Proc(1, Box::new(Frame::Stdout(b"lost".to_vec()))));
        assert_eq!(
            frames(&m.clients[0].out).len(),
            1,
            "a gone exec's output goes nowhere"
        );
    }

    #[test]
    fn a_bad_first_frame_or_an_exec_after_the_end_gets_125() {
        let mut f = fixture(None);
        let m = &mut f.monitor;
        let (near, _far) = UnixStream::pair().unwrap();
        m.add_client(near);
        m.on_client_frame(0, Frame::Spec(b"not json".to_vec()));
        assert!(matches!(
            &frames(&m.clients[0].out)[..],
            [Frame::Failed { code: 125, .. }]
        ));
        m.on_guest_frame(Frame::Exited(0));
        let (idx, _b) = client(m, &Request::Exec(exec_spec()));
        assert!(matches!(
            &frames(&m.clients[idx].out)[..],
            [Frame::Failed { code: 125, message }] if message.contains("not running")
        ));
        // A client attaching after the end is told how it ended.
        let (late, _c) = client(m, &Request::Attach { stdin: false });
        assert!(matches!(
            frames(&m.clients[late].out)[..],
            [Frame::Exited(0)]
        ));
    }
}

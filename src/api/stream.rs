//! Hijacked streams: `attach` and `exec start` take over the HTTP
//! connection (`Upgrade: tcp`, 101) and relay it to a session with the
//! container's monitor, in docker's framing: without a terminal each chunk
//! of output carries an 8-byte header (stream, 0, 0, 0, length big-endian);
//! with one the bytes go raw.
//!
//! The client is hostile too: what it sends is read in bounded chunks and
//! only while the monitor takes it; a client that stops reading slows the
//! session (the monitor then stops reading the guest) rather than growing a
//! buffer; a client that goes away ends the session and nothing else (an
//! attached container runs on).

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use guest_init::protocol::{Frame, FrameDecoder};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{full, lock, Api, ApiError, ApiResult, Query};
use crate::container::{Container, Status};
use crate::monitor::Request as MonitorRequest;

/// docker's media type of a stream without a terminal.
pub const MULTIPLEXED_STREAM: &str = "application/vnd.docker.multiplexed-stream";
/// docker's media type of a terminal's stream.
pub const RAW_STREAM: &str = "application/vnd.docker.raw-stream";
/// Chunk size for what the client sends.
const CLIENT_CHUNK: usize = 32 << 10;

/// One chunk of output in docker's multiplexed framing (1: stdout, 2: stderr).
#[must_use]
pub fn mux_frame(stream: u8, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + data.len());
    b.put_slice(&[stream, 0, 0, 0]);
    // Frames from the monitor are far below 4 GiB.
    b.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    b.put_slice(data);
    b.freeze()
}

/// How a relayed session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The process ended with this status.
    Exited(i32),
    /// The monitor closed the session without saying (the container is gone).
    Vanished,
    /// The client went away.
    ClientGone,
}

/// What a session relays.
#[derive(Debug)]
pub struct Session {
    /// Forward the client's bytes as the process's stdin.
    pub stdin: bool,
    /// Relay stdout / stderr.
    pub stdout: bool,
    /// Relay stderr.
    pub stderr: bool,
    /// Raw bytes (a terminal) instead of multiplexed frames.
    pub tty: bool,
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    let bytes = frame
        .encode()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    w.write_all(&bytes).await
}

/// Relays `client` and a monitor session until the process ends or the
/// client goes; `on_exit` hears the exit status before the client sees the
/// stream end (so that its next request, an exec inspect, finds it).
pub async fn relay<C: AsyncRead + AsyncWrite + Unpin>(
    client: C,
    monitor: tokio::net::UnixStream,
    request: &MonitorRequest,
    session: &Session,
    mut resize: mpsc::UnboundedReceiver<(u16, u16)>,
    on_exit: impl FnOnce(i32),
) -> Ended {
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut mr, mut mw) = monitor.into_split();
    let Ok(json) = serde_json::to_vec(request) else {
        return Ended::Vanished;
    };
    if write_frame(&mut mw, &Frame::Spec(json)).await.is_err() {
        return Ended::Vanished;
    }
    let mut decoder = FrameDecoder::new();
    let mut mbuf = vec![0u8; 64 << 10];
    let mut cbuf = vec![0u8; CLIENT_CHUNK];
    let mut client_open = session.stdin;
    let mut resize_open = true;
    loop {
        let want = decoder.room().clamp(1, mbuf.len());
        tokio::select! {
            r = mr.read(&mut mbuf[..want]) => {
                let n = match r {
                    Ok(0) | Err(_) => return Ended::Vanished,
                    Ok(n) => n,
                };
                decoder.feed(&mbuf[..n]);
                loop {
                    let frame = match decoder.next_frame() {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(_) => return Ended::Vanished,
                    };
                    let (stream, data, end) = match frame {
                        Frame::Stdout(d) => (1, d, None),
                        Frame::Stderr(d) => (2, d, None),
                        Frame::Exited(code) => (0, Vec::new(), Some(code)),
                        Frame::Failed { code, message } => (2, format!("{message}\n").into_bytes(), Some(code)),
                        _ => continue,
                    };
                    let wanted = (stream == 1 && session.stdout) || (stream == 2 && session.stderr);
                    if wanted && !data.is_empty() {
                        let bytes = if session.tty { Bytes::from(data) } else { mux_frame(stream, &data) };
                        if cw.write_all(&bytes).await.is_err() || cw.flush().await.is_err() {
                            return Ended::ClientGone;
                        }
                    }
                    if let Some(code) = end {
                        on_exit(code);
                        let _ = cw.shutdown().await;
                        return Ended::Exited(code);
                    }
                }
            }
            r = cr.read(&mut cbuf), if client_open => {
                match r {
                    Ok(n) if n > 0 => {
                        if write_frame(&mut mw, &Frame::Stdin(cbuf[..n].to_vec())).await.is_err() {
                            return Ended::Vanished;
                        }
                    }
                    // The client closed its side (or broke it): the process's EOF.
                    _ => {
                        client_open = false;
                        if write_frame(&mut mw, &Frame::StdinEof).await.is_err() {
                            return Ended::Vanished;
                        }
                    }
                }
            }
            size = resize.recv(), if resize_open => match size {
                Some((h, w)) => {
                    if write_frame(&mut mw, &Frame::Resize(h, w)).await.is_err() {
                        return Ended::Vanished;
                    }
                }
                None => resize_open = false,
            },
        }
    }
}

/// The 101 response of a hijack.
pub fn upgraded_response(tty: bool) -> Response<super::ApiBody> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("tcp"));
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(if tty { RAW_STREAM } else { MULTIPLEXED_STREAM }),
    );
    r
}

/// Connects to the monitor of `c` (asynchronously usable).
fn connect(api: &Api, c: &Container) -> Option<tokio::net::UnixStream> {
    let s = crate::client::connect(&api.store, c).ok()?;
    s.set_nonblocking(true).ok()?;
    tokio::net::UnixStream::from_std(s).ok()
}

/// Counts an attach session waiting for its container's start, until dropped.
struct Pending {
    api: Arc<Api>,
    id: String,
}

impl Pending {
    fn new(api: &Arc<Api>, id: &str) -> Self {
        *lock(&api.pending_attach).entry(id.to_string()).or_insert(0) += 1;
        Self {
            api: api.clone(),
            id: id.to_string(),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut map = lock(&self.api.pending_attach);
        if let Some(n) = map.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.id);
            }
        }
    }
}

/// `POST /containers/{id}/attach`: before the start (as `docker run`
/// does) the session waits for it, and the start holds the command until
/// the session is connected.
pub async fn attach(
    api: Arc<Api>,
    key: &str,
    query: &Query,
    mut req: Request<Incoming>,
) -> ApiResult {
    let c = {
        let api = api.clone();
        let key = key.to_string();
        super::blocking(move || api.find(&key)).await?
    };
    let status = c.state().map_err(ApiError::container)?.status;
    if status == Status::Exited {
        return Err(ApiError::conflict(format!(
            "You cannot attach to a stopped container {}, start it first",
            c.config.id
        )));
    }
    if !query.flag("stream") {
        return Err(ApiError::not_implemented(
            "attach without stream=1 (use logs)",
        ));
    }
    let session = Session {
        stdin: query.flag("stdin") && c.config.spec.stdin,
        stdout: query.flag("stdout"),
        stderr: query.flag("stderr"),
        tty: c.config.spec.tty,
    };
    let pending = (status == Status::Created).then(|| Pending::new(&api, &c.config.id));
    let upgrade = hyper::upgrade::on(&mut req);
    let tty = session.tty;
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        // Until it starts (or is removed, or the client goes: then the
        // pending count goes with this task).
        let monitor = loop {
            match c.state().map(|s| s.status) {
                Ok(Status::Running) => {
                    if let Some(m) = connect(&api, &c) {
                        break m;
                    }
                }
                Ok(Status::Created) => {}
                _ => return,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        {
            // Under the pending lock: a resize finds this session, or a
            // pending one and stashes its size (see resize_main).
            let _pending = lock(&api.pending_attach);
            lock(&api.resizers)
                .entry(c.config.id.clone())
                .or_default()
                .push(tx.clone());
        }
        // Started: nothing waits on this session any more.
        drop(pending);
        // The size a client set while this session waited, first.
        if let Some(size) = lock(&api.pending_sizes).remove(&c.config.id) {
            let _ = tx.send(size);
        }
        drop(tx);
        let request = MonitorRequest::Attach {
            stdin: session.stdin,
        };
        let ended = relay(io, monitor, &request, &session, rx, |_| {}).await;
        tracing::debug!("api: attach to {} ended: {ended:?}", c.short_id());
        let mut map = lock(&api.resizers);
        if let Some(list) = map.get_mut(&c.config.id) {
            list.retain(|t| !t.is_closed());
            if list.is_empty() {
                map.remove(&c.config.id);
            }
        }
    });
    Ok(upgraded_response(tty))
}

/// A terminal size for the main process: through a live attach session of
/// this server; kept for one about to connect (a short session of its own
/// would count as the attach the start waits for, and output could go
/// before the real one is there); else through a short session of its own.
pub fn resize_main(api: &Api, c: &Container, h: u16, w: u16) {
    if h == 0 || w == 0 {
        return;
    }
    {
        let pending = lock(&api.pending_attach);
        let sent = lock(&api.resizers)
            .get(&c.config.id)
            .is_some_and(|list| list.iter().any(|t| t.send((h, w)).is_ok()));
        if sent {
            return;
        }
        if pending.get(&c.config.id).is_some_and(|&n| n > 0) {
            lock(&api.pending_sizes).insert(c.config.id.clone(), (h, w));
            return;
        }
    }
    let Ok(mut s) = crate::client::connect(&api.store, c) else {
        return;
    };
    let Ok(json) = serde_json::to_vec(&MonitorRequest::Attach { stdin: false }) else {
        return;
    };
    let _ = Frame::Spec(json).write_to(&mut s);
    let _ = Frame::Resize(h, w).write_to(&mut s);
    let _ = s.flush();
}

/// The main process's exit code from its monitor (blocking); `None` if the
/// monitor is gone or closed the session without one.
pub fn wait_on_monitor(store: &::images::Store, c: &Container) -> Option<i32> {
    let mut s = crate::client::connect(store, c).ok()?;
    let json = serde_json::to_vec(&MonitorRequest::Wait).ok()?;
    Frame::Spec(json).write_to(&mut s).ok()?;
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let want = decoder.room().clamp(1, buf.len());
        let n = s.read(&mut buf[..want]).ok()?;
        if n == 0 {
            return None;
        }
        decoder.feed(&buf[..n]);
        while let Some(frame) = decoder.next_frame().ok()? {
            match frame {
                Frame::Exited(code) | Frame::Failed { code, .. } => return Some(code),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_dockers_header() {
        let f = mux_frame(2, b"hello");
        assert_eq!(&f[..8], &[2, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(&f[8..], b"hello");
        assert_eq!(mux_frame(1, &[0u8; 300])[..8], [1, 0, 0, 0, 0, 0, 1, 44]);
    }

    /// A monitor stand-in on a socket pair: the relay sends the request,
    /// stdin and its EOF; output comes back framed; the exit code ends it.
    #[test]
    fn a_session_is_relayed_in_dockers_framing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mon_host, mut mon_guest) = std::os::unix::net::UnixStream::pair().unwrap();
            mon_host.set_nonblocking(true).unwrap();
            let monitor = tokio::net::UnixStream::from_std(mon_host).unwrap();
            let guest = std::thread::spawn(move || {
                let first = Frame::read_from(&mut mon_guest).unwrap();
                let Frame::Spec(json) = first else {
                    panic!("{first:?}")
                };
                assert!(String::from_utf8_lossy(&json).contains("attach"));
                assert_eq!(
                    Frame::read_from(&mut mon_guest).unwrap(),
                    Frame::Stdin(b"in".to_vec())
                );
                assert_eq!(Frame::read_from(&mut mon_guest).unwrap(), Frame::StdinEof);
                Frame::Stdout(b"out".to_vec())
                    .write_to(&mut mon_guest)
                    .unwrap();
                Frame::Stderr(b"err".to_vec())
                    .write_to(&mut mon_guest)
                    .unwrap();
                Frame::Exited(3).write_to(&mut mon_guest).unwrap();
            });
            let (client, mut far) = tokio::io::duplex(1 << 16);
            let session = Session {
                stdin: true,
                stdout: true,
                stderr: true,
                tty: false,
            };
            let (_tx, rx) = mpsc::unbounded_channel();
            let relayed = tokio::spawn(async move {
                relay(
                    client,
                    monitor,
                    &MonitorRequest::Attach { stdin: true },
                    &session,
                    rx,
                    |_| {},
                )
                .await
            });
            far.write_all(b"in").await.unwrap();
            far.shutdown().await.unwrap();
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            assert_eq!(relayed.await.unwrap(), Ended::Exited(3));
            let mut want = mux_frame(1, b"out").to_vec();
            want.extend_from_slice(&mux_frame(2, b"err"));
            assert_eq!(got, want);
            guest.join().unwrap();
        });
    }

    #[test]
    fn a_client_that_goes_away_ends_only_the_session() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mon_host, mut mon_guest) = std::os::unix::net::UnixStream::pair().unwrap();
            mon_host.set_nonblocking(true).unwrap();
            let monitor = tokio::net::UnixStream::from_std(mon_host).unwrap();
            let (client, far) = tokio::io::duplex(64);
            drop(far);
            let writer = std::thread::spawn(move || {
                let _ = Frame::read_from(&mut mon_guest);
                for _ in 0..100 {
                    if Frame::Stdout(vec![b'x'; 1000])
                        .write_to(&mut mon_guest)
                        .is_err()
                    {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                false
            });
            let session = Session {
                stdin: false,
                stdout: true,
                stderr: true,
                tty: true,
            };
            let (_tx, rx) = mpsc::unbounded_channel();
            let ended = relay(
                client,
                monitor,
                &MonitorRequest::Attach { stdin: false },
                &session,
                rx,
                |_| {},
            )
            .await;
            assert_eq!(ended, Ended::ClientGone);
            // The monitor's side of the session is closed with it.
            assert!(writer.join().unwrap());
        });
    }
}

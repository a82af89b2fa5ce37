//! Framing of the host<->guest control stream.
//!
//! A frame is a kind byte, a little-endian `u32` payload length, then the
//! payload. The first frame of each side carries [`PROTOCOL_VERSION`] (a
//! little-endian `u32` at the start of its payload): [`Frame::Ready`] from the
//! guest, [`Frame::Spec`] from the host; the decoder refuses any other version
//! with [`ProtocolError::Version`]. Both sides treat the other as hostile: a frame longer than
//! [`MAX_PAYLOAD`] or of an unknown kind is a protocol error, never an
//! allocation.

use std::io::{self, Read, Write};

use crate::PROTOCOL_VERSION;

/// The largest payload either side accepts (and sends: data is chunked).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Size of a frame header.
pub const HEADER_LEN: usize = 5;
/// The longest [`Frame::output_header`]: a process frame's and its inner one's.
pub const OUTPUT_HEADER_MAX: usize = 2 * HEADER_LEN;

/// A message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    // Host -> guest.
    /// The run spec, JSON ([`crate::spec::RunSpec`]); the first frame the host
    /// sends. On the wire, [`PROTOCOL_VERSION`] comes before the JSON.
    Spec(Vec<u8>),
    /// Bytes for the container's stdin.
    Stdin(Vec<u8>),
    /// The container's stdin is closed.
    StdinEof,
    /// Deliver this signal to the container's main process.
    Signal(i32),
    /// The terminal size changed (rows, columns).
    Resize(u16, u16),

    // Guest -> host.
    /// The init is up and waiting for the spec; the first frame the guest
    /// sends. Its payload on the wire is [`PROTOCOL_VERSION`].
    Ready,
    /// Bytes the container wrote to stdout.
    Stdout(Vec<u8>),
    /// Bytes the container wrote to stderr.
    Stderr(Vec<u8>),
    /// The container's main process ended: its exit code, or 128 + signal.
    Exited(i32),
    /// The init could not run the container; `code` follows docker: 125 for
    /// a runtime error, 126 command not executable, 127 command not found.
    Failed {
        /// Exit status hull should end with.
        code: i32,
        /// What went wrong, for the user.
        message: String,
    },
    /// A timing or progress note for `hull --debug` (milliseconds since the
    /// init started, and what happened then).
    Note(u64, String),

    // Exec'd processes (both ways).
    /// Host -> guest: start process `id` (chosen by the host, never 0, unique
    /// while it runs) in the running container; the payload is an
    /// [`ExecSpec`](crate::spec::ExecSpec) as JSON.
    Exec(u32, Vec<u8>),
    /// A frame about exec'd process `id`: host -> guest `Stdin`, `StdinEof`,
    /// `Signal`, `Resize`; guest -> host `Stdout`, `Stderr`, `Exited`,
    /// `Failed`. Never nested.
    Proc(u32, Box<Frame>),

    // `hull cp` (host -> guest); answered like an exec'd process `id`.
    /// Send a tar archive of this path (in the container) as process `id`'s
    /// stdout; it exits 0 once the archive is whole.
    CopyOut(u32, Vec<u8>),
    /// Unpack the tar archive that comes as process `id`'s stdin into this
    /// directory (in the container); it exits 0 once it is unpacked.
    CopyIn(u32, Vec<u8>),
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed.
    #[error("control stream: {0}")]
    Io(#[from] io::Error),
    /// The stream ended (cleanly, between frames).
    #[error("control stream closed")]
    Closed,
    /// The peer sent something that is not a valid frame.
    #[error("control stream: invalid frame: {0}")]
    Invalid(String),
    /// The peer speaks another version of the protocol (1: from before
    /// versions were sent).
    #[error(
        "the peer speaks control protocol version {peer}, this side {}: hull and its guest init must come from the same build",
        PROTOCOL_VERSION
    )]
    Version {
        /// The peer's version.
        peer: u32,
    },
}

mod kind {
    pub const SPEC: u8 = 1;
    pub const STDIN: u8 = 2;
    pub const STDIN_EOF: u8 = 3;
    pub const SIGNAL: u8 = 4;
    pub const RESIZE: u8 = 5;
    pub const READY: u8 = 64;
    pub const STDOUT: u8 = 65;
    pub const STDERR: u8 = 66;
    pub const EXITED: u8 = 67;
    pub const FAILED: u8 = 68;
    pub const NOTE: u8 = 69;
    pub const EXEC: u8 = 96;
    pub const PROC: u8 = 97;
    pub const COPY_OUT: u8 = 98;
    pub const COPY_IN: u8 = 99;
}

impl Frame {
    /// The frame's bytes: header and payload.
    ///
    /// # Errors
    /// The payload exceeds [`MAX_PAYLOAD`] (callers chunk data first).
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the frame's bytes to `out` (nothing on error): the payload is
    /// copied once, straight from the frame, so a sender that keeps one
    /// queue allocates nothing per frame of output.
    ///
    /// # Errors
    /// The payload exceeds [`MAX_PAYLOAD`] (callers chunk data first).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let (k, head, body) = self.parts()?;
        out.reserve(HEADER_LEN + head.len() + body.len());
        put_header(out, k, &head, body.len())?;
        out.extend_from_slice(body);
        Ok(())
    }

    /// The frame's kind and payload, as a short owned head (numbers, the
    /// version) followed by the borrowed bytes it carries.
    fn parts(&self) -> Result<(u8, Vec<u8>, &[u8]), ProtocolError> {
        let version = PROTOCOL_VERSION.to_le_bytes();
        Ok(match self {
            Self::Spec(b) => (kind::SPEC, version.to_vec(), b),
            Self::Stdin(b) => (kind::STDIN, Vec::new(), b),
            Self::StdinEof => (kind::STDIN_EOF, Vec::new(), &[]),
            Self::Signal(s) => (kind::SIGNAL, s.to_le_bytes().to_vec(), &[]),
            Self::Resize(r, c) => (
                kind::RESIZE,
                [r.to_le_bytes(), c.to_le_bytes()].concat(),
                &[],
            ),
            Self::Ready => (kind::READY, version.to_vec(), &[]),
            Self::Stdout(b) => (kind::STDOUT, Vec::new(), b),
            Self::Stderr(b) => (kind::STDERR, Vec::new(), b),
            Self::Exited(c) => (kind::EXITED, c.to_le_bytes().to_vec(), &[]),
            Self::Failed { code, message } => (
                kind::FAILED,
                code.to_le_bytes().to_vec(),
                message.as_bytes(),
            ),
            Self::Note(ms, text) => (kind::NOTE, ms.to_le_bytes().to_vec(), text.as_bytes()),
            Self::Exec(id, spec) => (kind::EXEC, id.to_le_bytes().to_vec(), spec),
            Self::CopyOut(id, path) => (kind::COPY_OUT, id.to_le_bytes().to_vec(), path),
            Self::CopyIn(id, path) => (kind::COPY_IN, id.to_le_bytes().to_vec(), path),
            Self::Proc(id, inner) => {
                if matches!(
                    **inner,
                    Self::Proc(..) | Self::Exec(..) | Self::CopyOut(..) | Self::CopyIn(..)
                ) {
                    return Err(ProtocolError::Invalid("nested process frame".into()));
                }
                // The inner frame without its length: id, kind, payload.
                let (k, head, body) = inner.parts()?;
                let head = [&id.to_le_bytes()[..], &[k], &head].concat();
                (kind::PROC, head, body)
            }
        })
    }

    /// The bytes that come before `len` bytes of output in a
    /// [`Frame::Stdout`] (or, `stderr`, [`Frame::Stderr`]) of process `proc`
    /// (0: the main one, else wrapped in [`Frame::Proc`]): for a sender that
    /// puts the payload there itself (the guest reads output in place behind
    /// the header), so that header and payload together are that frame's
    /// [`encode`](Self::encode).
    ///
    /// # Errors
    /// `len` exceeds [`MAX_PAYLOAD`] (or, wrapped, leaves no room for the
    /// process header).
    pub fn output_header(proc: u32, stderr: bool, len: usize) -> Result<Vec<u8>, ProtocolError> {
        let output = if stderr {
            Self::Stderr(Vec::new())
        } else {
            Self::Stdout(Vec::new())
        };
        let frame = if proc == 0 {
            output
        } else {
            Self::Proc(proc, Box::new(output))
        };
        let (k, head, _) = frame.parts()?;
        let mut out = Vec::with_capacity(HEADER_LEN + head.len());
        put_header(&mut out, k, &head, len)?;
        Ok(out)
    }

    /// Writes the frame (one `write_all`, so frames from one writer never interleave).
    ///
    /// # Errors
    /// The stream failed or the payload is too large.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), ProtocolError> {
        w.write_all(&self.encode()?)?;
        Ok(())
    }

    /// Decodes one frame from its header kind and payload.
    ///
    /// # Errors
    /// Unknown kind or malformed payload.
    pub fn decode(k: u8, payload: Vec<u8>) -> Result<Self, ProtocolError> {
        let fixed = |n: usize| -> Result<&[u8], ProtocolError> {
            if payload.len() == n {
                Ok(&payload[..n])
            } else {
                Err(ProtocolError::Invalid(format!(
                    "kind {k}: {} bytes, expected {n}",
                    payload.len()
                )))
            }
        };
        let at_least = |n: usize| -> Result<(), ProtocolError> {
            if payload.len() >= n {
                Ok(())
            } else {
                Err(ProtocolError::Invalid(format!(
                    "kind {k}: {} bytes, too short",
                    payload.len()
                )))
            }
        };
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Ok(match k {
            kind::SPEC => {
                // A host from before versions sent its JSON right away.
                if payload.first() == Some(&b'{') {
                    return Err(ProtocolError::Version { peer: 1 });
                }
                at_least(4)?;
                check_version(&payload[..4])?;
                Self::Spec(payload[4..].to_vec())
            }
            kind::STDIN => Self::Stdin(payload),
            kind::STDIN_EOF => {
                fixed(0)?;
                Self::StdinEof
            }
            kind::SIGNAL => Self::Signal(i32::from_le_bytes(le4(fixed(4)?))),
            kind::RESIZE => {
                let b = fixed(4)?;
                Self::Resize(
                    u16::from_le_bytes([b[0], b[1]]),
                    u16::from_le_bytes([b[2], b[3]]),
                )
            }
            kind::READY => {
                // A guest from before versions sent an empty Ready.
                if payload.is_empty() {
                    return Err(ProtocolError::Version { peer: 1 });
                }
                check_version(fixed(4)?)?;
                Self::Ready
            }
            kind::STDOUT => Self::Stdout(payload),
            kind::STDERR => Self::Stderr(payload),
            kind::EXITED => Self::Exited(i32::from_le_bytes(le4(fixed(4)?))),
            kind::FAILED => {
                at_least(4)?;
                Self::Failed {
                    code: i32::from_le_bytes(le4(&payload[..4])),
                    message: text(&payload[4..]),
                }
            }
            kind::NOTE => {
                at_least(8)?;
                let mut ms = [0u8; 8];
                ms.copy_from_slice(&payload[..8]);
                Self::Note(u64::from_le_bytes(ms), text(&payload[8..]))
            }
            kind::EXEC => {
                at_least(4)?;
                Self::Exec(
                    u32::from_le_bytes(le4(&payload[..4])),
                    payload[4..].to_vec(),
                )
            }
            kind::PROC => {
                at_least(5)?;
                let id = u32::from_le_bytes(le4(&payload[..4]));
                let inner_kind = payload[4];
                if matches!(
                    inner_kind,
                    kind::PROC | kind::EXEC | kind::COPY_OUT | kind::COPY_IN
                ) {
                    return Err(ProtocolError::Invalid("nested process frame".into()));
                }
                Self::Proc(
                    id,
                    Box::new(Self::decode(inner_kind, payload[5..].to_vec())?),
                )
            }
            kind::COPY_OUT | kind::COPY_IN => {
                at_least(4)?;
                let id = u32::from_le_bytes(le4(&payload[..4]));
                let path = payload[4..].to_vec();
                if k == kind::COPY_OUT {
                    Self::CopyOut(id, path)
                } else {
                    Self::CopyIn(id, path)
                }
            }
            other => return Err(ProtocolError::Invalid(format!("unknown kind {other}"))),
        })
    }

    /// Reads one frame (blocking).
    ///
    /// # Errors
    /// [`ProtocolError::Closed`] at a clean end of stream; otherwise I/O or
    /// framing errors.
    pub fn read_from(r: &mut impl Read) -> Result<Self, ProtocolError> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Err(ProtocolError::Closed),
                Ok(0) => {
                    return Err(ProtocolError::Invalid(
                        "stream ended inside a header".into(),
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = usize::try_from(u32::from_le_bytes(le4(&header[1..])))
            .map_err(|_| ProtocolError::Invalid("length".into()))?;
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::Invalid(format!("payload of {len} bytes")));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                ProtocolError::Invalid("stream ended inside a frame".into())
            }
            _ => ProtocolError::Io(e),
        })?;
        Self::decode(header[0], payload)
    }
}

fn check_version(b: &[u8]) -> Result<(), ProtocolError> {
    match u32::from_le_bytes(le4(b)) {
        PROTOCOL_VERSION => Ok(()),
        peer => Err(ProtocolError::Version { peer }),
    }
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut out = [0u8; 4];
    out.copy_from_slice(&b[..4]);
    out
}

/// Appends a frame's header and the start of its payload, `head`, for a
/// payload of `head` and `rest` more bytes (nothing on error).
fn put_header(out: &mut Vec<u8>, k: u8, head: &[u8], rest: usize) -> Result<(), ProtocolError> {
    let len = head.len().saturating_add(rest);
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::Invalid(format!("payload of {len} bytes")));
    }
    let len32 = u32::try_from(len).map_err(|_| ProtocolError::Invalid("length".into()))?;
    out.push(k);
    out.extend_from_slice(&len32.to_le_bytes());
    out.extend_from_slice(head);
    Ok(())
}

/// Incremental decoder for a non-blocking reader: feed it bytes as they come
/// (or let it read them in place, [`fill_with`](Self::fill_with)), take
/// whole frames out. Holds at most one frame's worth of bytes.
///
/// Frames taken out only move a read position: what is left is moved to the
/// front once per fill, not once per frame (a read holding many small
/// frames would otherwise move its tail once for each).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Bytes `start..end` are received and not yet decoded; the rest is
    /// room, kept allocated (and initialized) between reads.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How many more bytes the decoder can take before it must yield a frame
    /// (callers read at most this much, so the buffer stays bounded).
    #[must_use]
    pub fn room(&self) -> usize {
        (HEADER_LEN + MAX_PAYLOAD).saturating_sub(self.end - self.start)
    }

    /// Room for `n` more bytes at `end`, the pending bytes moved to the front.
    fn make_room(&mut self, n: usize) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < self.end + n {
            self.buf.resize(self.end + n, 0);
        }
        &mut self.buf[self.end..self.end + n]
    }

    /// Appends received bytes (callers bound them by [`room`](Self::room)).
    pub fn feed(&mut self, bytes: &[u8]) {
        self.make_room(bytes.len()).copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Lets `read` put up to `max` bytes (and at most [`room`](Self::room),
    /// but at least one) straight into the decoder's buffer (no copy on the
    /// way in) and returns what it returned: the count it read, 0 at end of
    /// stream, or its error.
    ///
    /// # Errors
    /// `read`'s.
    pub fn fill_with(
        &mut self,
        max: usize,
        read: impl FnOnce(&mut [u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<usize> {
        let want = max.min(self.room()).max(1);
        let n = read(self.make_room(want))?.min(want);
        self.end += n;
        Ok(n)
    }

    /// The next complete frame, if one is buffered.
    ///
    /// # Errors
    /// The buffered bytes are not a valid frame.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let pending = &self.buf[self.start..self.end];
        if pending.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = usize::try_from(u32::from_le_bytes(le4(&pending[1..])))
            .map_err(|_| ProtocolError::Invalid("length".into()))?;
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::Invalid(format!("payload of {len} bytes")));
        }
        if pending.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let k = pending[0];
        let payload = pending[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.start += HEADER_LEN + len;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Frame::decode(k, payload).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Spec(b"{}".to_vec()),
            Frame::Stdin(b"abc".to_vec()),
            Frame::StdinEof,
            Frame::Signal(15),
            Frame::Resize(24, 80),
            Frame::Ready,
            Frame::Stdout(vec![0, 1, 2]),
            Frame::Stderr(Vec::new()),
            Frame::Exited(137),
            Frame::Failed {
                code: 127,
                message: "not found".into(),
            },
            Frame::Note(42, "unpacked".into()),
            Frame::Exec(7, b"{}".to_vec()),
            Frame::Proc(7, Box::new(Frame::Stdout(b"out".to_vec()))),
            Frame::Proc(7, Box::new(Frame::Exited(0))),
            Frame::Proc(9, Box::new(Frame::Resize(1, 2))),
            Frame::CopyOut(3, b"/etc".to_vec()),
            Frame::CopyIn(4, b"/tmp/x".to_vec()),
        ]
    }

    #[test]
    fn an_output_header_and_its_payload_are_the_frame() {
        for (proc, stderr) in [(0, false), (0, true), (7, false), (u32::MAX, true)] {
            for data in [Vec::new(), b"out".to_vec(), vec![9; 70_000]] {
                let inner = if stderr {
                    Frame::Stderr(data.clone())
                } else {
                    Frame::Stdout(data.clone())
                };
                let frame = if proc == 0 {
                    inner
                } else {
                    Frame::Proc(proc, Box::new(inner))
                };
                let mut wire = Frame::output_header(proc, stderr, data.len()).unwrap();
                wire.extend_from_slice(&data);
                assert_eq!(
                    wire,
                    frame.encode().unwrap(),
                    "process {proc}, stderr {stderr}"
                );
            }
        }
        assert!(Frame::output_header(0, false, MAX_PAYLOAD).is_ok());
        assert!(Frame::output_header(0, false, MAX_PAYLOAD + 1).is_err());
        assert!(Frame::output_header(3, false, MAX_PAYLOAD - 4).is_err());
        assert_eq!(
            Frame::output_header(3, true, 1).unwrap().len(),
            OUTPUT_HEADER_MAX
        );
    }

    #[test]
    fn frames_round_trip_through_a_stream_and_the_decoder() {
        let mut stream = Vec::new();
        for f in all_frames() {
            f.write_to(&mut stream).unwrap();
        }
        let mut queue = Vec::new();
        for f in all_frames() {
            f.encode_into(&mut queue).unwrap();
        }
        assert_eq!(queue, stream, "encode_into appends what write_to writes");
        let mut r = stream.as_slice();
        for f in all_frames() {
            assert_eq!(Frame::read_from(&mut r).unwrap(), f);
        }
        assert!(matches!(
            Frame::read_from(&mut r),
            Err(ProtocolError::Closed)
        ));

        let mut d = FrameDecoder::new();
        let mut out = Vec::new();
        for chunk in stream.chunks(3) {
            d.feed(chunk);
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, all_frames());
    }

    #[test]
    fn one_feed_of_many_frames_yields_each_and_room_counts_only_the_rest() {
        let frames: Vec<Frame> = (0..50u8).map(|i| Frame::Stdout(vec![i; 100])).collect();
        let mut stream = Vec::new();
        for f in &frames {
            f.encode_into(&mut stream).unwrap();
        }
        let full = HEADER_LEN + MAX_PAYLOAD;
        let mut d = FrameDecoder::new();
        // All but half of the last frame in one feed, the rest in another.
        let cut = stream.len() - 50;
        d.feed(&stream[..cut]);
        assert_eq!(d.room(), full - cut);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            out.push(f);
        }
        assert_eq!(out.len(), 49);
        let left = cut - 49 * (HEADER_LEN + 100);
        assert_eq!(d.room(), full - left, "decoded frames are not counted");
        let mut rest = &stream[cut..];
        let n = d
            .fill_with(usize::MAX, |b| std::io::Read::read(&mut rest, b))
            .unwrap();
        assert_eq!(n, 50);
        assert_eq!(d.next_frame().unwrap(), frames.last().cloned());
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.room(), full);
        out.push(frames[49].clone());
        assert_eq!(out, frames);
    }

    #[test]
    fn a_peer_of_another_version_is_named_not_misparsed() {
        let ready = Frame::Ready.encode().unwrap();
        assert_eq!(&ready[HEADER_LEN..], &PROTOCOL_VERSION.to_le_bytes());
        let spec = Frame::Spec(b"{}".to_vec()).encode().unwrap();
        assert_eq!(
            &spec[HEADER_LEN..HEADER_LEN + 4],
            &PROTOCOL_VERSION.to_le_bytes()
        );

        // Version 1 (before versions): an empty Ready, a bare JSON spec.
        let old_ready = [kind::READY, 0, 0, 0, 0];
        let old_spec = [kind::SPEC, 2, 0, 0, 0, b'{', b'}'];
        for old in [&old_ready[..], &old_spec[..]] {
            let mut d = FrameDecoder::new();
            d.feed(old);
            assert!(matches!(
                d.next_frame(),
                Err(ProtocolError::Version { peer: 1 })
            ));
        }
        let next = PROTOCOL_VERSION + 1;
        let newer = Frame::decode(kind::READY, next.to_le_bytes().to_vec()).unwrap_err();
        assert!(matches!(newer, ProtocolError::Version { peer } if peer == next));
        assert!(newer.to_string().contains("same build"), "{newer}");
        let mut newer_spec = next.to_le_bytes().to_vec();
        newer_spec.extend_from_slice(b"{}");
        assert!(matches!(
            Frame::decode(kind::SPEC, newer_spec),
            Err(ProtocolError::Version { .. })
        ));
        assert!(Frame::decode(kind::SPEC, vec![2, 0]).is_err());
    }

    #[test]
    fn hostile_frames_are_errors_not_allocations() {
        let mut huge = vec![kind::STDOUT];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Frame::read_from(&mut huge.as_slice()),
            Err(ProtocolError::Invalid(_))
        ));
        let mut d = FrameDecoder::new();
        d.feed(&huge);
        assert!(d.next_frame().is_err());
        assert!(Frame::decode(200, Vec::new()).is_err());
        assert!(Frame::decode(kind::EXITED, vec![1, 2]).is_err());
        assert!(Frame::decode(kind::FAILED, vec![1]).is_err());
        let nested = [kind::PROC, 5, 0, 0, 0, 1, 0, 0, 0, kind::PROC];
        assert!(Frame::read_from(&mut &nested[..]).is_err());
        assert!(
            Frame::Proc(1, Box::new(Frame::Proc(2, Box::new(Frame::Ready))))
                .encode()
                .is_err()
        );
        let truncated = [kind::STDOUT, 10, 0, 0, 0, 1, 2];
        assert!(matches!(
            Frame::read_from(&mut &truncated[..]),
            Err(ProtocolError::Invalid(_))
        ));
    }
}

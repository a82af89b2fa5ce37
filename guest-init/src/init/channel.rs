//! The control channel to the host: virtio-console's port 0, a generic port
//! (`/dev/vport0p0`) when the device offers multiport (hull's does), else the
//! console `/dev/hvc0` (a tty, put in raw mode).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::protocol::{Frame, FrameDecoder, ProtocolError};
use crate::sys;

/// What the channel is, for messages.
pub const DEVICE: &str = "the control port (virtio-console)";
/// The name the host's device gives the port: the same as
/// `devices::virtio::CONSOLE_PORT_NAME` (hull's tests check they agree).
pub const PORT_NAME: &str = "hull.control";
/// The same port when the device is not multiport: a console.
const CONSOLE_DEVICE: &str = "/dev/hvc0";

/// `/dev/vportNpM` of the generic port named [`PORT_NAME`], if the driver
/// has added it (N is the virtio device's index, so it is looked up).
fn named_port() -> Option<String> {
    for ent in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let mut name = Vec::new();
        let read = std::fs::File::open(ent.path().join("name"))
            .and_then(|f| io::Read::read_to_end(&mut io::Read::take(f, 64), &mut name));
        if read.is_ok() && name.trim_ascii_end() == PORT_NAME.as_bytes() {
            return Some(format!("/dev/{}", ent.file_name().to_string_lossy()));
        }
    }
    None
}

/// How long to wait for the device to appear.
const OPEN_WAIT: Duration = Duration::from_secs(5);

/// The control channel: blocking writes of whole frames, reads fed through a
/// [`FrameDecoder`].
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    dec: FrameDecoder,
    buf: Vec<u8>,
    start: Instant,
}

impl Channel {
    /// Opens the device and puts it in raw mode (no echo, no line editing,
    /// no output processing, no flow control: a clean byte pipe).
    ///
    /// # Errors
    /// The device cannot be opened or configured.
    pub fn open(start: Instant) -> io::Result<Self> {
        // virtio-console may add its port (and devtmpfs the node) after the
        // init has started: wait for it a little.
        let deadline = start + OPEN_WAIT;
        let fd = loop {
            let path = named_port().unwrap_or_else(|| CONSOLE_DEVICE.to_string());
            match sys::open(
                &sys::cstr(path.as_bytes())?,
                libc::O_RDWR | libc::O_NOCTTY,
                0,
            ) {
                // Not there yet (the port's node comes after the device's
                // handshake, or the hvc console after its driver).
                Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                other => break other?,
            }
        };
        // SAFETY: valid descriptor.
        if unsafe { libc::isatty(fd.as_raw_fd()) } == 0 {
            // A generic port: already a clean byte pipe.
            return Ok(Self::from_fd(fd, start));
        }
        // SAFETY: `termios` is plain data; all-zero is a valid value to fill.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and out pointer.
        sys::check(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) })?;
        // SAFETY: `t` is a valid termios.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: valid descriptor and termios.
        sys::check(unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t) })?;
        Ok(Self {
            fd,
            dec: FrameDecoder::new(),
            buf: vec![0; 64 * 1024],
            start,
        })
    }

    /// A channel over an already open stream (a socket in tests); no tty set-up.
    #[must_use]
    pub fn from_fd(fd: OwnedFd, start: Instant) -> Self {
        Self {
            fd,
            dec: FrameDecoder::new(),
            buf: vec![0; 64 * 1024],
            start,
        }
    }

    /// The descriptor, for polling.
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Sends one frame (blocking until the port took it).
    ///
    /// # Errors
    /// The write failed or the frame is too large.
    pub fn send(&self, f: &Frame) -> Result<(), ProtocolError> {
        sys::write_all(self.fd.as_fd(), &f.encode()?)?;
        Ok(())
    }

    /// Sends bytes that are already whole frames (blocking until the port
    /// took them).
    ///
    /// # Errors
    /// The write failed.
    pub fn send_raw(&self, frames: &[u8]) -> Result<(), ProtocolError> {
        sys::write_all(self.fd.as_fd(), frames)?;
        Ok(())
    }

    /// Sends a timing note; failures are ignored (notes are optional).
    pub fn note(&self, text: impl Into<String>) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let _ = self.send(&Frame::Note(ms, text.into()));
    }

    /// Reads what is available once (blocking if nothing is) into the decoder.
    ///
    /// # Errors
    /// [`ProtocolError::Closed`] at end of stream; I/O errors.
    pub fn fill(&mut self) -> Result<(), ProtocolError> {
        let want = self.dec.room().min(self.buf.len());
        if want == 0 {
            return Ok(());
        }
        let n = sys::read(self.fd.as_fd(), &mut self.buf[..want])?;
        if n == 0 {
            return Err(ProtocolError::Closed);
        }
        self.dec.feed(&self.buf[..n]);
        Ok(())
    }

    /// The next buffered frame, if a whole one is there.
    ///
    /// # Errors
    /// The buffered bytes are not a valid frame.
    pub fn next_buffered(&mut self) -> Result<Option<Frame>, ProtocolError> {
        self.dec.next_frame()
    }

    /// Blocks until a whole frame arrives.
    ///
    /// # Errors
    /// End of stream, I/O or framing errors.
    pub fn recv(&mut self) -> Result<Frame, ProtocolError> {
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return Ok(f);
            }
            self.fill()?;
        }
    }

    /// Whether bytes are waiting to be read (without blocking).
    #[must_use]
    pub fn readable_now(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & libc::POLLIN != 0
    }

    /// Waits until everything written has left (best effort).
    pub fn drain(&self) {
        // SAFETY: valid descriptor.
        unsafe { libc::tcdrain(self.fd.as_raw_fd()) };
    }
}

/// Writes a line to the kernel console (the init's stderr), best effort.
pub fn console(msg: &str) {
    let line = format!("hull-init: {msg}\n");
    // SAFETY: fd 2 is always open in the init (made so at start); a failed
    // write is ignored.
    let fd = unsafe { BorrowedFd::borrow_raw(2) };
    let _ = sys::write_all(fd, line.as_bytes());
}

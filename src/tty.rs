//! The host terminal of an attached or exec'd session: raw mode and its
//! size. A leaf module: the client and the session relay both use it.

/// The host terminal in raw mode while it lives; restored on every exit path
/// that unwinds or returns (and hull aborts on no path that skips it).
pub struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts `fd` in raw mode if it is a terminal.
    #[must_use]
    pub fn enter(fd: i32) -> Option<Self> {
        // SAFETY: termios is plain data, filled by tcgetattr.
        let mut saved = unsafe { std::mem::zeroed::<libc::termios>() };
        // SAFETY: `saved` is a valid termios; fd is ours.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios; fd is ours.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The size of the terminal on `fd`, if it is one.
#[must_use]
pub fn window_size(fd: i32) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data, filled by the ioctl.
    let mut ws = unsafe { std::mem::zeroed::<libc::winsize>() };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

//! Talking to a container's monitor from the CLI: attach to the main
//! process, exec a new one, send a signal, stop it.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use hull_protocol::frame::Frame;
use hull_protocol::spec::ExecSpec;
use images::Store;

use crate::container::socket_path;
use crate::container::{Container, Status};
use crate::monitor::Request;
use crate::session::{self, Outcome, Relay};
use crate::tty::{window_size, RawTerminal};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Connects to the monitor of `container`.
///
/// # Errors
/// The container is not running (no monitor answers).
pub fn connect(store: &Store, container: &Container) -> Result<UnixStream> {
    UnixStream::connect(socket_path(store.root(), &container.config.id))
        .map_err(|e| format!("container {} is not running ({e})", container.config.name).into())
}

fn request_frame(request: &Request) -> Result<Frame> {
    Ok(Frame::Spec(serde_json::to_vec(request)?))
}

/// Relays a session to the end; returns the exit status hull should end with.
fn relay(
    mut stream: UnixStream,
    request: &Request,
    stdin: bool,
    tty: bool,
    debug: bool,
) -> Result<i32> {
    let signals = crate::session::forwarded_signals_fd(if tty { &[libc::SIGWINCH] } else { &[] })?;
    let mut initial = vec![request_frame(request)?];
    if tty {
        if let Some((rows, cols)) = window_size(libc::STDIN_FILENO) {
            initial.push(Frame::Resize(rows, cols));
        }
    }
    // Restored when this returns, whichever way.
    let _raw = if tty {
        RawTerminal::enter(libc::STDIN_FILENO)
    } else {
        None
    };
    let relay = Relay {
        stdin: stdin.then_some(libc::STDIN_FILENO),
        signals: Some(signals.as_raw_fd()),
        debug,
        started: Instant::now(),
    };
    finish(session::run(&mut stream, &initial, &relay)?.0)
}

/// What [`attach`] and [`exec`] return when the monitor closed the session
/// without a final status (the caller may find it in the container's state).
pub const VANISHED: i32 = -1;

fn finish(outcome: Outcome) -> Result<i32> {
    Ok(match outcome {
        Outcome::Exited(code) => code,
        Outcome::Failed { code, message } => {
            eprintln!("hull: {message}");
            code
        }
        Outcome::Vanished => VANISHED,
    })
}

/// Attaches to `container`'s main process until it ends.
///
/// # Errors
/// The monitor cannot be reached.
pub fn attach(
    store: &Store,
    container: &Container,
    stdin: bool,
    tty: bool,
    debug: bool,
) -> Result<i32> {
    let stream = connect(store, container)?;
    let code = relay(stream, &Request::Attach { stdin }, stdin, tty, debug)?;
    Ok(code)
}

/// Runs `spec` in the running `container`.
///
/// # Errors
/// The container is not running.
pub fn exec(store: &Store, container: &Container, spec: ExecSpec, debug: bool) -> Result<i32> {
    let (stdin, tty) = (spec.stdin, spec.tty);
    let stream = connect(store, container)?;
    relay(stream, &Request::Exec(spec), stdin, tty, debug)
}

/// Sends `signal` to the container's main process.
///
/// # Errors
/// The container is not running.
pub fn signal(store: &Store, container: &Container, signal: i32) -> Result<()> {
    let mut stream = connect(store, container)?;
    request_frame(&Request::Signal(signal))?.write_to(&mut stream)?;
    Ok(())
}

/// Stops the container (SIGTERM, SIGKILL after `timeout_secs`) and waits
/// until it has ended.
///
/// # Errors
/// The monitor cannot be reached.
pub fn stop(store: &Store, container: &Container, timeout_secs: u64) -> Result<()> {
    if container.state()?.status != Status::Running {
        return Ok(());
    }
    let Ok(mut stream) = connect(store, container) else {
        // Its monitor is just finishing: the end is about to be recorded.
        wait_exited(container);
        return Ok(());
    };
    request_frame(&Request::Stop { timeout_secs })?.write_to(&mut stream)?;
    // The monitor closes the connection when the container has ended.
    let mut sink = [0u8; 256];
    while std::io::Read::read(&mut stream, &mut sink).is_ok_and(|n| n > 0) {}
    wait_exited(container);
    Ok(())
}

/// Blocks until the container's state says exited (the monitor records it
/// just before it ends).
pub fn wait_exited(container: &Container) -> Option<i32> {
    loop {
        match container.state() {
            Ok(s) if s.status == Status::Exited => return s.exit_code,
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(_) => return None,
        }
    }
}

//! hull's init: PID 1 of the guest. It mounts what it needs, says `Ready`,
//! takes the run spec, builds the container's root, runs the command with
//! its stdio on the control channel (and any process the host execs in the
//! meantime), reports how it ended and powers off.
//!
//! It never returns and never panics on purpose: every failure becomes a
//! `Failed` frame (and a console line), then the VM ends.

pub mod channel;
pub mod copy;
pub mod events;
pub mod mounts;
pub mod net;
pub mod process;
pub mod rootfs;
pub mod security;
pub mod volumes;

use std::ffi::CString;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Instant;

use crate::command::{self, StartError};
use crate::protocol::{Frame, ProtocolError};
use crate::spec::{ExecSpec, RunSpec};
use crate::sys;
use crate::user;
use channel::{console, Channel};
use events::Outcome;

/// The first frame from the host that is neither an exec request (refused:
/// nothing runs yet) nor a frame for an exec'd process (ignored).
fn recv_spec(chan: &mut Channel) -> Result<Frame, ProtocolError> {
    loop {
        match chan.recv()? {
            Frame::Exec(0, _) | Frame::Proc(..) => {}
            Frame::Exec(id, _) => {
                if refuse_exec(chan, id).is_err() {
                    return Err(ProtocolError::Closed);
                }
            }
            f => return Ok(f),
        }
    }
}

/// The init's state that outlives the run, for the shutdown.
#[derive(Debug)]
struct Init {
    start: Instant,
    chan: Option<Channel>,
    mounted: rootfs::Mounted,
    switched: bool,
}

/// The init's entry point.
pub fn main() -> ! {
    let start = Instant::now();
    crate::ports::mark(crate::ports::BootMark::InitStarted);
    // SAFETY: ignoring SIGPIPE in the init (a write to a closed pipe returns
    // EPIPE instead); the child restores the default before exec.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    events::block_sigchld();
    let mut init = Init {
        start,
        chan: None,
        mounted: rootfs::Mounted::default(),
        switched: false,
    };
    let last = match init.run() {
        Ok(Some(code)) => Some(Frame::Exited(code)),
        Ok(None) => None,
        Err(e) => Some(Frame::Failed {
            code: e.code,
            message: e.message,
        }),
    };
    init.finish(last.as_ref())
}

fn runtime(what: &str, e: &impl std::fmt::Display) -> StartError {
    StartError::new(125, format!("{what}: {e}"))
}

fn c(s: &str, what: &str) -> Result<CString, StartError> {
    CString::new(s).map_err(|_| StartError::new(125, format!("{what} contains a NUL byte")))
}

fn read_small(path: &str) -> Option<String> {
    let data = std::fs::read(path).ok()?;
    Some(String::from_utf8_lossy(&data).into_owned())
}

impl Init {
    fn note(&self, text: impl Into<String>) {
        if let Some(chan) = &self.chan {
            chan.note(text);
        }
    }

    /// Everything up to the end of the process: `Ok(None)` when there is no
    /// host left to tell.
    fn run(&mut self) -> Result<Option<i32>, StartError> {
        mounts::early()?;
        mounts::fix_stdio();
        let mut chan = Channel::open(self.start).map_err(|e| runtime(channel::DEVICE, &e))?;
        chan.send(&Frame::Ready)
            .map_err(|e| runtime("send Ready", &e))?;
        let spec = match recv_spec(&mut chan) {
            Ok(Frame::Spec(json)) => json,
            Ok(other) => {
                self.chan = Some(chan);
                return Err(StartError::new(
                    125,
                    format!("expected the run spec, got {other:?}"),
                ));
            }
            Err(ProtocolError::Closed) => return Ok(None),
            Err(e) => {
                self.chan = Some(chan);
                return Err(runtime("reading the run spec", &e));
            }
        };
        self.chan = Some(chan);
        let spec: RunSpec =
            serde_json::from_slice(&spec).map_err(|e| runtime("invalid run spec", &e))?;
        self.note("spec received");
        if spec.rootfs.build.is_some() {
            // Build-only mode: this VM fills the image disk and runs nothing
            // of the image's.
            let Some(chan) = self.chan.as_ref() else {
                return Ok(None);
            };
            rootfs::build_image_disk(&spec.rootfs, chan)?;
            self.note("image disk built");
            return Ok(Some(0));
        }
        if spec.args.is_empty() {
            return Err(StartError::new(125, "no command given"));
        }
        rootfs::build(&spec.rootfs, &mut self.mounted)?;
        self.note("root file system mounted");
        volumes::mount_all(rootfs::NEW_ROOT, &spec.mounts)?;
        mounts::container(rootfs::NEW_ROOT, &spec.security)?;
        mounts::switch_root(rootfs::NEW_ROOT)?;
        self.switched = true;
        self.note("volumes and container mounts in place, root switched");
        for n in mounts::etc_files(&spec.hostname) {
            self.note(n);
        }
        mounts::set_hostname(&spec.hostname).map_err(|e| runtime("sethostname", &e))?;
        mounts::loopback_up();
        for n in net::setup(&spec.network, &spec.hostname)? {
            self.note(n);
        }
        self.note("network set up");
        for n in security::prepare(&spec.security)? {
            self.note(n);
        }
        if spec.read_only {
            volumes::make_root_read_only(&spec.cwd)?;
        }
        self.note("root ready");
        crate::ports::mark(crate::ports::BootMark::RootReady);
        let Some(chan) = self.chan.as_mut() else {
            return Ok(None);
        };
        let result = run_container(chan, &spec);
        if matches!(result, Ok(None)) {
            // The host is gone: nobody to send the last frame to.
            self.chan = None;
        }
        result
    }

    /// Sends the last frame, ends every process, syncs, remounts read-only
    /// what it can and rings the VMM's power-off doorbell (rebooting if that
    /// returns).
    fn finish(&mut self, last: Option<&Frame>) -> ! {
        if let Some(Frame::Failed { code, message }) = last {
            console(&format!("error ({code}): {message}"));
        }
        if let (Some(chan), Some(f)) = (&self.chan, last) {
            if let Err(e) = chan.send(f) {
                console(&format!("could not send the final frame: {e}"));
            }
            chan.drain();
        }
        events::kill_all();
        // Give the killed processes a moment to go (they may hold files open).
        for _ in 0..100 {
            events::reap(0);
            // SAFETY: plain call; ECHILD means nothing is left.
            let left = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
            if left < 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // SAFETY: plain call.
        unsafe { libc::sync() };
        if self.switched {
            let _ = sys::mount("", "/", "", libc::MS_REMOUNT | libc::MS_RDONLY, None);
        }
        volumes::finish();
        for fd in [&self.mounted.scratch, &self.mounted.image]
            .into_iter()
            .flatten()
        {
            mounts::remount_ro(fd.as_fd());
        }
        // SAFETY: plain call.
        unsafe { libc::sync() };
        // The VM ends here on hull's VMM, known to be a clean end; the
        // reboot below is for a VMM without the doorbell.
        if let Err(e) = crate::ports::write(crate::ports::POWER_PORT, crate::ports::POWER_OFF) {
            console(&format!("cannot ring the power-off doorbell: {e}"));
        }
        loop {
            // SAFETY: rebooting is the init's way out; on failure, try again later.
            unsafe { libc::reboot(libc::RB_AUTOBOOT) };
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// Runs the container's process in the current root and forwards its stdio
/// (and that of processes exec'd meanwhile) until it ends: `Ok(Some(code))`
/// when it exited, `Ok(None)` when the host went away (everything is killed
/// then).
///
/// # Errors
/// The process could not start (125/126/127), or the host broke the protocol.
pub fn run_container(chan: &mut Channel, spec: &RunSpec) -> Result<Option<i32>, StartError> {
    let mut early = Vec::new();
    let mut winsize = None;
    take_early_frames(chan, &mut early, &mut winsize)?;
    let prepared = prepare_main(spec, winsize)?;
    let child = process::spawn(&prepared)?;
    crate::ports::mark(crate::ports::BootMark::WorkloadStarted);
    chan.note(format!("exec {}", prepared.path.to_string_lossy()));
    match events::run(chan, child, spec, &early) {
        Outcome::Exited(code) => {
            chan.note(format!("exited {code}"));
            Ok(Some(code))
        }
        Outcome::Protocol(e) => Err(StartError::new(125, format!("control channel: {e}"))),
        Outcome::HostGone(why) => {
            console(&format!(
                "control channel lost ({why}): the container was killed"
            ));
            Ok(None)
        }
    }
}

/// Answers an exec request that came before the container runs.
fn refuse_exec(chan: &Channel, id: u32) -> Result<(), StartError> {
    chan.send(&Frame::Proc(
        id,
        Box::new(Frame::Failed {
            code: 125,
            message: events::NOT_RUNNING.into(),
        }),
    ))
    .map_err(|e| runtime("control channel", &e))
}

/// Frames the host sent while the root was being built: the last `Resize`
/// sizes the pty; exec requests are refused (the container is not running
/// yet); the rest wait for the process.
fn take_early_frames(
    chan: &mut Channel,
    early: &mut Vec<Frame>,
    winsize: &mut Option<(u16, u16)>,
) -> Result<(), StartError> {
    loop {
        while let Some(f) = chan
            .next_buffered()
            .map_err(|e| runtime("control channel", &e))?
        {
            match f {
                Frame::Resize(r, c) => *winsize = Some((r, c)),
                Frame::Exec(id, _) if id != 0 => refuse_exec(chan, id)?,
                // Id 0 (would read as the main process's: not answered), or
                // for an exec'd process that cannot exist yet.
                Frame::Exec(..) | Frame::Proc(..) => {}
                f => early.push(f),
            }
        }
        if !chan.readable_now() {
            return Ok(());
        }
        chan.fill().map_err(|e| runtime("control channel", &e))?;
    }
}

/// A process to start in the container, in the container's terms.
struct Launch<'a> {
    args: &'a [String],
    /// `KEY=VALUE` pairs before the init's additions.
    env: Vec<String>,
    hostname: &'a str,
    cwd: &'a str,
    user: &'a str,
    tty: bool,
    stdin: bool,
    winsize: Option<(u16, u16)>,
    /// The main process: its working directory is created when missing and
    /// its pty is also `/dev/console`.
    main: bool,
    /// Its namespaces, capabilities and limits.
    confine: security::Confinement,
}

fn prepare_main(
    spec: &RunSpec,
    winsize: Option<(u16, u16)>,
) -> Result<process::Prepared, StartError> {
    prepare(&Launch {
        args: &spec.args,
        env: spec.env.clone(),
        hostname: &spec.hostname,
        cwd: &spec.cwd,
        user: &spec.user,
        tty: spec.tty,
        stdin: spec.stdin,
        winsize,
        main: true,
        confine: security::for_main(&spec.security),
    })
}

/// Prepares an exec'd process in the running container (`spec` is the
/// container's): its environment is the container's, with `exec.env` on
/// top, and the init's additions as docker makes them for `docker exec`
/// (`PATH`, `HOSTNAME`, `TERM` with the exec's tty, `HOME` of the exec's
/// user); working directory and user default to the container's.
///
/// # Errors
/// The user cannot be resolved, the command not found (125/126/127).
pub(crate) fn prepare_exec(
    spec: &RunSpec,
    exec: &ExecSpec,
    winsize: Option<(u16, u16)>,
) -> Result<process::Prepared, StartError> {
    prepare(&Launch {
        args: &exec.args,
        env: spec.env.iter().chain(&exec.env).cloned().collect(),
        hostname: &spec.hostname,
        cwd: exec.cwd.as_deref().unwrap_or(&spec.cwd),
        user: exec.user.as_deref().unwrap_or(&spec.user),
        tty: exec.tty,
        stdin: exec.stdin,
        winsize,
        main: false,
        confine: security::for_exec(&spec.security)?,
    })
}

/// Resolves the user, environment, working directory and executable (in the
/// container's root, which is `/` by now).
fn prepare(l: &Launch<'_>) -> Result<process::Prepared, StartError> {
    let passwd = read_small("/etc/passwd");
    let group = read_small("/etc/group");
    let u = user::resolve(l.user, passwd.as_deref(), group.as_deref())
        .map_err(|m| StartError::new(125, m))?;
    let env = command::environment(&l.env, &u.home, l.hostname, l.tty);
    let cwd = if l.cwd.is_empty() { "/" } else { l.cwd };
    if !cwd.starts_with('/') {
        return Err(StartError::new(
            125,
            format!("the working directory {cwd:?} is not absolute"),
        ));
    }
    if l.main {
        // Created as root when missing, as docker does (not for `exec`).
        if let Err(e) = std::fs::create_dir_all(cwd) {
            return Err(StartError::new(125, format!("mkdir {cwd}: {e}")));
        }
    }
    let name = l.args.first().cloned().unwrap_or_default();
    let path_env = command::getenv(&env, "PATH").unwrap_or(command::DEFAULT_PATH);
    let path = command::find_executable(&name, path_env, cwd, Path::new("/"))?;
    let path = c(&path.to_string_lossy(), "the command")?;
    let argv = l
        .args
        .iter()
        .map(|a| c(a, "an argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env
        .iter()
        .map(|e| c(e, "the environment"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(process::Prepared {
        path,
        argv,
        envp,
        cwd: c(cwd, "the working directory")?,
        name,
        uid: u.uid,
        gid: u.gid,
        groups: u.groups,
        tty: l.tty,
        stdin: l.stdin,
        winsize: l.winsize,
        console: l.main,
        confine: l.confine.clone(),
    })
}

#[cfg(test)]
mod tests;

//! The process half of the init (user, `PATH`, spawn, the event loop, exit
//! codes), run for real on the host: in a forked child that is PID 1 of new
//! pid and mount namespaces (so that its `kill(-1)` and bind mounts stay
//! there), talking to the test, which plays the host, over a socket.
//! Needs root (CI has it); skipped otherwise.

use super::*;
use crate::spec::{Compression, ExecSpec, LayerSpec, RootfsSpec};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

fn spec(args: &[&str]) -> RunSpec {
    RunSpec {
        args: args.iter().map(ToString::to_string).collect(),
        env: Vec::new(),
        cwd: "/".into(),
        user: String::new(),
        hostname: "box".into(),
        stdin: false,
        rootfs: RootfsSpec {
            image_disk: String::new(),
            scratch_disk: String::new(),
            chain: Vec::new(),
            build: None,
        },
        ..RunSpec::default()
    }
}

struct Guest {
    host: UnixStream,
    pid: libc::pid_t,
}

#[derive(Debug, Default)]
struct Run {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    last: Option<Frame>,
    notes: Vec<String>,
    /// Exec'd processes by id.
    procs: std::collections::BTreeMap<u32, Run>,
    /// Every `Exited`/`Failed` in the order they came: (id, frame), 0 the main one.
    ends: Vec<(u32, Frame)>,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Starts the "guest" running `spec`, or `None` when not root.
fn start(spec: &RunSpec) -> Option<Guest> {
    start_with(spec, libc::CLONE_NEWPID | libc::CLONE_NEWNS, |_| Ok(()))
}

/// Starts the "guest" in new namespaces (`flags`): `setup` runs first in it,
/// as PID 1, then the process of `spec`.
fn start_with(
    spec: &RunSpec,
    flags: libc::c_int,
    setup: impl FnOnce(&Channel) -> Result<(), StartError>,
) -> Option<Guest> {
    if !sys::is_root() {
        eprintln!("not root: skipped");
        return None;
    }
    if !namespaces_work(flags) {
        eprintln!("cannot create namespaces here: skipped");
        return None;
    }
    let (host, guest) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // SAFETY: the child only runs `in_namespaces` and exits with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        drop(host);
        let code = in_namespaces(flags, || guest_main(guest, spec, setup));
        // SAFETY: leaving the forked test process without its harness.
        unsafe { libc::_exit(code) };
    }
    drop(guest);
    Some(Guest { host, pid })
}

/// Whether this process may create the namespaces (root in a container
/// without `CAP_SYS_ADMIN` may not).
fn namespaces_work(flags: libc::c_int) -> bool {
    // SAFETY: the child only calls unshare and _exit.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::_exit(i32::from(libc::unshare(flags) != 0));
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}

/// Runs `f` as PID 1 of new pid and mount namespaces; its exit status.
fn in_namespaces(flags: libc::c_int, f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: namespace set-up in a single-threaded forked child.
    unsafe {
        if libc::unshare(flags) != 0 {
            return 90;
        }
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        let pid = libc::fork();
        if pid == 0 {
            libc::_exit(f());
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            91
        }
    }
}

/// What `main` does once the root is ready.
fn guest_main(
    sock: UnixStream,
    spec: &RunSpec,
    setup: impl FnOnce(&Channel) -> Result<(), StartError>,
) -> i32 {
    events::block_sigchld();
    let mut chan = Channel::from_fd(OwnedFd::from(sock), Instant::now());
    if let Err(e) = setup(&chan) {
        let _ = chan.send(&Frame::Failed {
            code: e.code,
            message: e.message,
        });
        return 0;
    }
    if spec.tty {
        // Let the test's Resize arrive first, as the host's does during the
        // root's set-up.
        let t = Instant::now();
        while !chan.readable_now() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let last = match run_container(&mut chan, spec) {
        Ok(Some(code)) => Frame::Exited(code),
        Ok(None) => return 0,
        Err(e) => Frame::Failed {
            code: e.code,
            message: e.message,
        },
    };
    i32::from(chan.send(&last).is_err())
}

impl Guest {
    fn send(&mut self, f: &Frame) {
        f.write_to(&mut self.host).unwrap();
    }

    /// Reads one frame from the guest into `run`.
    fn read_one(&mut self, run: &mut Run) {
        let f = Frame::read_from(&mut self.host).unwrap();
        let (id, f) = match f {
            Frame::Proc(id, inner) => (id, *inner),
            f => (0, f),
        };
        let r = if id == 0 {
            &mut *run
        } else {
            run.procs.entry(id).or_default()
        };
        match f {
            Frame::Stdout(b) => r.stdout.extend(b),
            Frame::Stderr(b) => r.stderr.extend(b),
            Frame::Note(_, n) if id == 0 => r.notes.push(n),
            f @ (Frame::Exited(_) | Frame::Failed { .. }) => {
                r.last = Some(f.clone());
                run.ends.push((id, f));
            }
            other => panic!("unexpected frame {other:?} for {id}"),
        }
    }

    /// Reads frames into `run` until `done` holds.
    fn read_until(&mut self, run: &mut Run, done: impl Fn(&Run) -> bool) {
        while !done(run) {
            self.read_one(run);
        }
    }

    /// Reads frames into `run` until exec'd process `id` has ended; its record.
    fn wait_proc<'r>(&mut self, run: &'r mut Run, id: u32) -> &'r Run {
        self.read_until(run, |r| r.procs.get(&id).is_some_and(|p| p.last.is_some()));
        &run.procs[&id]
    }

    /// Reads frames until the main process has started (its "exec" note).
    fn started(&mut self) -> Run {
        let mut run = Run::default();
        self.read_until(&mut run, |r| {
            r.notes.iter().any(|n| n.starts_with("exec /"))
        });
        run
    }

    /// Sends an exec request (and, in the same write, `then`).
    fn exec(&mut self, id: u32, spec: &ExecSpec, then: &[Frame]) {
        let mut bytes = Frame::Exec(id, serde_json::to_vec(spec).unwrap())
            .encode()
            .unwrap();
        for f in then {
            bytes.extend(f.encode().unwrap());
        }
        std::io::Write::write_all(&mut self.host, &bytes).unwrap();
    }

    fn proc(&mut self, id: u32, f: Frame) {
        self.send(&Frame::Proc(id, Box::new(f)));
    }

    /// Reads frames until the last one, then waits for the guest.
    fn finish(self) -> Run {
        self.finish_with(Run::default())
    }

    /// [`Self::finish`], adding to what was read already.
    fn finish_with(mut self, mut run: Run) -> Run {
        self.read_until(&mut run, |r| r.last.is_some());
        let mut status = 0;
        // SAFETY: waiting for our own forked child.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "guest status {status:#x}"
        );
        run
    }
}

fn run(spec: &RunSpec) -> Option<Run> {
    start(spec).map(Guest::finish)
}

#[test]
fn output_streams_and_exit_code() {
    let Some(r) = run(&spec(&[
        "sh",
        "-c",
        "echo out; echo err >&2; echo \"$HOME $HOSTNAME\"; exit 3",
    ])) else {
        return;
    };
    assert_eq!(r.out(), "out\n/root box\n");
    assert_eq!(r.stderr, b"err\n");
    assert_eq!(r.last, Some(Frame::Exited(3)));
    assert!(
        r.notes.iter().any(|n| n.starts_with("exec /")),
        "{:?}",
        r.notes
    );
}

#[test]
fn large_output_arrives_whole_and_in_order() {
    // Megabytes through the pipe, a read at a time, each frame's header put
    // in front of its bytes in place (an exec'd process's carries its id).
    let Some(mut g) = start(&spec(&[
        "sh",
        "-c",
        "seq 1 200000; seq 1 50000 >&2; sleep 30",
    ])) else {
        return;
    };
    let mut run = g.started();
    let want_out: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    let want_err: String = (1..=50_000).map(|i| format!("{i}\n")).collect();
    g.exec(7, &exec(&["seq", "1", "100000"]), &[]);
    let want_exec: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
    g.read_until(&mut run, |r| {
        r.stdout.len() >= want_out.len()
            && r.stderr.len() >= want_err.len()
            && r.procs.get(&7).is_some_and(|p| p.last.is_some())
    });
    assert!(run.stdout == want_out.as_bytes(), "stdout differs");
    assert!(run.stderr == want_err.as_bytes(), "stderr differs");
    assert!(
        run.procs[&7].stdout == want_exec.as_bytes(),
        "exec's stdout differs"
    );
    let _ = stop(g, run);
}

#[test]
fn stdin_frames_feed_the_process() {
    let mut s = spec(&["cat"]);
    s.stdin = true;
    let Some(mut g) = start(&s) else { return };
    g.send(&Frame::Stdin(b"hello ".to_vec()));
    g.send(&Frame::Stdin(b"world".to_vec()));
    g.send(&Frame::StdinEof);
    let r = g.finish();
    assert_eq!(r.out(), "hello world");
    assert_eq!(r.last, Some(Frame::Exited(0)));
}

#[test]
fn without_stdin_the_process_reads_dev_null() {
    let Some(mut g) = start(&spec(&["sh", "-c", "cat; echo done"])) else {
        return;
    };
    g.send(&Frame::Stdin(b"ignored".to_vec()));
    let r = g.finish();
    assert_eq!(r.out(), "done\n");
}

#[test]
fn signals_reach_the_process() {
    // With --init the reaper is PID 1 and forwards SIGTERM to the command.
    let mut with_init = spec(&["sleep", "30"]);
    with_init.security.init = true;
    let Some(mut g) = start(&with_init) else {
        return;
    };
    let run = g.started();
    g.send(&Frame::Signal(libc::SIGTERM));
    let r = g.finish_with(run);
    assert_eq!(r.last, Some(Frame::Exited(143)));

    // Without it, the command is PID 1: SIGTERM without a handler is
    // ignored (docker's `docker stop` then waits for its SIGKILL); a handler
    // gets it.
    let Some(mut g) = start(&spec(&[
        "sh",
        "-c",
        "trap 'exit 7' TERM; echo up; sleep 30 & wait",
    ])) else {
        return;
    };
    let mut run = g.started();
    g.read_until(&mut run, |r| r.out().contains("up"));
    g.send(&Frame::Signal(libc::SIGTERM));
    assert_eq!(g.finish_with(run).last, exited(7));
    let Some(mut g) = start(&spec(&["sleep", "30"])) else {
        return;
    };
    let run = g.started();
    g.send(&Frame::Signal(libc::SIGTERM));
    std::thread::sleep(Duration::from_millis(300));
    stop(g, run);
}

#[test]
fn background_processes_do_not_keep_the_run_alive() {
    let t = Instant::now();
    let Some(r) = run(&spec(&[
        "sh",
        "-c",
        "sleep 30 & sleep 31 >&2 & echo started",
    ])) else {
        return;
    };
    assert_eq!(r.out(), "started\n");
    assert_eq!(r.last, Some(Frame::Exited(0)));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn start_failures_have_docker_codes() {
    let failed = |args: &[&str]| run(&spec(args)).and_then(|r| r.last);
    let Some(f) = failed(&["no-such-command-hull"]) else {
        return;
    };
    assert_eq!(
        f,
        Frame::Failed {
            code: 127,
            message: "exec: \"no-such-command-hull\": executable file not found in $PATH".into()
        }
    );
    assert!(matches!(
        failed(&["/etc/passwd"]),
        Some(Frame::Failed { code: 126, .. })
    ));
    assert_eq!(
        failed(&["/etc"]),
        Some(Frame::Failed {
            code: 126,
            message: "exec: \"/etc\": is a directory".into()
        })
    );
    assert!(matches!(
        failed(&["/no/such/file"]),
        Some(Frame::Failed { code: 127, .. })
    ));
    let mut s = spec(&["true"]);
    s.user = "ghost-user-hull".into();
    assert_eq!(
        run(&s).and_then(|r| r.last),
        Some(Frame::Failed {
            code: 125,
            message: "unable to find user ghost-user-hull: no matching entries in passwd file"
                .into()
        })
    );
}

#[test]
fn user_and_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("made/by/init");
    let mut s = spec(&["sh", "-c", "id -u; id -g; pwd; echo $HOME"]);
    s.user = "65534:4242".into();
    s.cwd = cwd.to_str().unwrap().into();
    let Some(r) = run(&s) else { return };
    assert_eq!(
        r.out(),
        format!("65534\n4242\n{}\n{}\n", cwd.display(), home_of_65534())
    );
    assert_eq!(r.last, Some(Frame::Exited(0)));
}

fn home_of_65534() -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    user::resolve("65534", Some(&passwd), None).unwrap().home
}

#[test]
fn tty_mode_sizes_and_merges_output() {
    let mut s = spec(&[
        "sh",
        "-c",
        "stty size; test -t 0 && test -t 1 && test -t 2 && echo tty; echo err >&2; echo $TERM",
    ]);
    s.tty = true;
    s.stdin = true;
    let Some(mut g) = start(&s) else { return };
    g.send(&Frame::Resize(33, 99));
    let r = g.finish();
    assert_eq!(r.out(), "33 99\r\ntty\r\nerr\r\nxterm\r\n");
    assert!(r.stderr.is_empty());
    assert_eq!(r.last, Some(Frame::Exited(0)));
}

fn exec(args: &[&str]) -> ExecSpec {
    ExecSpec {
        args: args.iter().map(ToString::to_string).collect(),
        env: Vec::new(),
        cwd: None,
        user: None,
        tty: false,
        stdin: false,
    }
}

fn exited(code: i32) -> Option<Frame> {
    Some(Frame::Exited(code))
}

/// Ends the main `sleep` with SIGKILL (it is PID 1 of the container's pid
/// namespace: as under docker, signals it has no handler for, SIGTERM
/// included, do not reach it); the run, checked to end with 137.
fn stop(mut g: Guest, run: Run) -> Run {
    g.send(&Frame::Signal(libc::SIGKILL));
    let r = g.finish_with(run);
    assert_eq!(r.last, exited(137), "{r:?}");
    r
}

#[test]
fn exec_runs_beside_the_main_process() {
    let Some(mut g) = start(&spec(&["sleep", "30"])) else {
        return;
    };
    let mut run = g.started();
    g.exec(
        1,
        &exec(&["sh", "-c", "echo out; echo err >&2; exit 5"]),
        &[],
    );
    let p = g.wait_proc(&mut run, 1);
    assert_eq!(p.out(), "out\n");
    assert_eq!(p.stderr, b"err\n");
    assert_eq!(p.last, exited(5));

    // A background process holding its pipes, or even writing on, does not
    // keep the exec's end from being reported.
    let t = Instant::now();
    g.exec(2, &exec(&["sh", "-c", "sleep 30 & echo bg; exit 4"]), &[]);
    g.exec(
        3,
        &exec(&[
            "sh",
            "-c",
            "(while :; do echo x; sleep 0.05; done) & exit 3",
        ]),
        &[],
    );
    assert_eq!(g.wait_proc(&mut run, 2).last, exited(4));
    assert_eq!(run.procs[&2].out(), "bg\n");
    assert_eq!(g.wait_proc(&mut run, 3).last, exited(3));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );

    // The main process is untouched.
    let r = stop(g, run);
    assert!(r.stdout.is_empty() && r.stderr.is_empty());
    assert!(
        r.notes.iter().any(|n| n.starts_with("exec 1: /")),
        "{:?}",
        r.notes
    );
}

#[test]
fn exec_environment_working_directory_and_user() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("made/by/init");
    let mut s = spec(&["sleep", "30"]);
    s.env = vec!["FOO=main".into(), "BAR=keep".into()];
    s.user = "65534:4242".into();
    s.cwd = cwd.to_str().unwrap().into();
    let Some(mut g) = start(&s) else { return };
    let mut run = g.started();
    let script = "echo \"$FOO $BAR $NEW $HOSTNAME $PATH\"; id -u; id -g; pwd; echo $HOME";
    // The container's by default...
    g.exec(1, &exec(&["sh", "-c", script]), &[]);
    let p = g.wait_proc(&mut run, 1);
    assert_eq!(
        p.out(),
        format!(
            "main keep  box {}\n65534\n4242\n{}\n{}\n",
            command::DEFAULT_PATH,
            cwd.display(),
            home_of_65534()
        )
    );
    assert_eq!(p.last, exited(0));
    // ...or the exec's.
    let mut e = exec(&["sh", "-c", script]);
    e.env = vec![
        "FOO=exec".into(),
        "NEW=1".into(),
        "PATH=/usr/bin:/bin".into(),
    ];
    e.cwd = Some("/".into());
    e.user = Some("0:4343".into());
    g.exec(2, &e, &[]);
    let p = g.wait_proc(&mut run, 2);
    let root_home = {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        user::resolve("0", Some(&passwd), None).unwrap().home
    };
    assert_eq!(
        p.out(),
        format!("exec keep 1 box /usr/bin:/bin\n0\n4343\n/\n{root_home}\n")
    );
    assert_eq!(p.last, exited(0));
    stop(g, run);
}

#[test]
fn exec_stdin_and_concurrent_processes() {
    let Some(mut g) = start(&spec(&["sleep", "30"])) else {
        return;
    };
    let mut run = g.started();
    let mut cat = exec(&["cat"]);
    cat.stdin = true;
    g.exec(1, &cat, &[]);
    g.exec(2, &cat, &[]);
    g.exec(3, &exec(&["sh", "-c", "cat; echo done"]), &[]);
    g.exec(4, &exec(&["sleep", "30"]), &[]);
    g.proc(2, Frame::Stdin(b"two ".to_vec()));
    g.proc(1, Frame::Stdin(b"one ".to_vec()));
    g.proc(3, Frame::Stdin(b"ignored".to_vec()));
    g.proc(2, Frame::Stdin(b"again".to_vec()));
    g.proc(2, Frame::StdinEof);
    g.proc(3, Frame::StdinEof);
    g.proc(4, Frame::Signal(libc::SIGTERM));
    // Frames for no process are ignored.
    g.proc(99, Frame::Stdin(b"nobody".to_vec()));
    g.proc(99, Frame::Signal(libc::SIGKILL));
    g.proc(99, Frame::Exited(1));
    assert_eq!(g.wait_proc(&mut run, 2).out(), "two again");
    assert_eq!(g.wait_proc(&mut run, 3).out(), "done\n");
    assert_eq!(g.wait_proc(&mut run, 4).last, exited(143));
    // Process 1 still runs and reads.
    assert!(run.procs.get(&1).is_none_or(|p| p.last.is_none()));
    g.proc(1, Frame::Stdin(b"more".to_vec()));
    g.proc(1, Frame::StdinEof);
    let p = g.wait_proc(&mut run, 1);
    assert_eq!(p.out(), "one more");
    assert_eq!(p.last, exited(0));
    for id in [2, 3] {
        assert_eq!(run.procs[&id].last, exited(0));
    }
    stop(g, run);
}

#[test]
fn exec_with_a_tty() {
    let Some(mut g) = start(&spec(&["sleep", "30"])) else {
        return;
    };
    let mut run = g.started();
    let mut e = exec(&[
        "sh",
        "-c",
        "tty; : </dev/tty && echo ctty; stty size; read x; stty size; echo err >&2; echo $TERM",
    ]);
    e.tty = true;
    e.stdin = true;
    // The size sent with the request is there from the start.
    g.exec(7, &e, &[Frame::Proc(7, Box::new(Frame::Resize(10, 40)))]);
    g.read_until(&mut run, |r| {
        r.procs
            .get(&7)
            .is_some_and(|p| p.out().contains("10 40\r\n"))
    });
    g.proc(7, Frame::Resize(33, 99));
    g.proc(7, Frame::Stdin(b"\n".to_vec()));
    let p = g.wait_proc(&mut run, 7);
    let out = p.out();
    let lines: Vec<&str> = out.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 6, "{out:?}");
    let n = lines[0].strip_prefix("/dev/pts/").unwrap_or("x");
    assert!(n.parse::<u32>().is_ok(), "{out:?}");
    assert_eq!(
        &lines[1..],
        ["ctty", "10 40", "33 99", "err", "xterm"],
        "{out:?}"
    );
    assert!(p.stderr.is_empty());
    assert_eq!(p.last, exited(0));
    stop(g, run);
}

#[test]
fn exec_failures_and_bad_requests() {
    let mut s = spec(&["sleep", "30"]);
    s.stdin = true;
    // The first exec request comes before the main process starts.
    let setup = |chan: &Channel| -> Result<(), StartError> {
        let t = Instant::now();
        while !chan.readable_now() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    };
    let Some(mut g) = start_with(&s, libc::CLONE_NEWPID | libc::CLONE_NEWNS, setup) else {
        return;
    };
    let mut run = Run::default();
    let failed = |code: i32, message: &str| {
        Some(Frame::Failed {
            code,
            message: message.into(),
        })
    };
    g.exec(
        1,
        &exec(&["true"]),
        &[Frame::Proc(1, Box::new(Frame::StdinEof))],
    );
    assert_eq!(
        g.wait_proc(&mut run, 1).last,
        failed(125, "container is not running")
    );
    g.read_until(&mut run, |r| {
        r.notes.iter().any(|n| n.starts_with("exec /"))
    });

    g.exec(2, &exec(&["no-such-command-hull"]), &[]);
    assert_eq!(
        g.wait_proc(&mut run, 2).last,
        failed(
            127,
            "exec: \"no-such-command-hull\": executable file not found in $PATH"
        )
    );
    g.exec(3, &exec(&["/etc"]), &[]);
    assert_eq!(
        g.wait_proc(&mut run, 3).last,
        failed(126, "exec: \"/etc\": is a directory")
    );
    let mut e = exec(&["true"]);
    e.user = Some("ghost-user-hull".into());
    g.exec(4, &e, &[]);
    assert_eq!(
        g.wait_proc(&mut run, 4).last,
        failed(
            125,
            "unable to find user ghost-user-hull: no matching entries in passwd file"
        )
    );
    let mut e = exec(&["true"]);
    e.cwd = Some("relative".into());
    g.exec(5, &e, &[]);
    assert_eq!(
        g.wait_proc(&mut run, 5).last.as_ref().map(code_of),
        Some(125)
    );
    g.exec(6, &exec(&[]), &[]);
    assert_eq!(
        g.wait_proc(&mut run, 6).last,
        failed(125, "no command given")
    );
    g.send(&Frame::Exec(8, b"not json".to_vec()));
    assert_eq!(
        g.wait_proc(&mut run, 8).last.as_ref().map(code_of),
        Some(125)
    );
    // Id 0 would be the main process's: not answered at all.
    g.exec(0, &exec(&["true"]), &[]);

    // A live id cannot be taken again; the process keeps it.
    let mut cat = exec(&["cat"]);
    cat.stdin = true;
    g.exec(9, &cat, &[]);
    g.exec(9, &exec(&["true"]), &[]);
    assert_eq!(
        g.wait_proc(&mut run, 9).last,
        failed(125, "exec id 9 is already in use")
    );
    g.proc(9, Frame::Stdin(b"still here".to_vec()));
    g.proc(9, Frame::StdinEof);
    g.read_until(&mut run, |r| r.procs[&9].last == exited(0));
    assert_eq!(run.procs[&9].out(), "still here");

    // Frames the guest does not take are ignored.
    g.send(&Frame::Ready);
    g.send(&Frame::Spec(b"{}".to_vec()));
    g.send(&Frame::Proc(9, Box::new(Frame::Stdout(b"x".to_vec()))));
    g.send(&Frame::Signal(0));
    g.send(&Frame::Signal(1000));
    // ...and the main process still runs and takes its own frames.
    g.send(&Frame::StdinEof);
    stop(g, run);
}

fn code_of(f: &Frame) -> i32 {
    match f {
        Frame::Failed { code, .. } => *code,
        other => panic!("not a failure: {other:?}"),
    }
}

#[test]
fn exec_processes_are_killed_when_the_main_one_ends() {
    let mut s = spec(&["sh", "-c", "read x; echo main-done; exit 7"]);
    s.stdin = true;
    let Some(mut g) = start(&s) else { return };
    let mut run = g.started();
    g.exec(1, &exec(&["sh", "-c", "echo started; exec sleep 60"]), &[]);
    let mut e = exec(&["sleep", "60"]);
    e.tty = true;
    g.exec(2, &e, &[]);
    let mut e = exec(&["sh", "-c", "trap '' TERM HUP; sleep 60 & wait"]);
    e.stdin = true;
    g.exec(3, &e, &[]);
    g.read_until(&mut run, |r| {
        r.procs.get(&1).is_some_and(|p| p.out() == "started\n")
    });
    let t = Instant::now();
    g.send(&Frame::Stdin(b"\n".to_vec()));
    let r = g.finish_with(run);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(r.out(), "main-done\n");
    assert_eq!(r.last, exited(7));
    // Every exec'd process is reported killed, before the main one's end.
    assert_eq!(r.ends.len(), 4, "{:?}", r.ends);
    assert_eq!(r.ends[3], (0, Frame::Exited(7)));
    let mut killed: Vec<u32> = r.ends[..3]
        .iter()
        .map(|(id, f)| {
            assert_eq!(*f, Frame::Exited(137), "{id}");
            *id
        })
        .collect();
    killed.sort_unstable();
    assert_eq!(killed, [1, 2, 3]);
}

#[test]
fn exec_processes_are_bounded() {
    let Some(mut g) = start(&spec(&["sleep", "30"])) else {
        return;
    };
    let mut run = g.started();
    let max = u32::try_from(events::MAX_EXECS).unwrap();
    for id in 1..=max + 1 {
        g.exec(id, &exec(&["sleep", "60"]), &[]);
    }
    assert_eq!(
        g.wait_proc(&mut run, max + 1).last,
        Some(Frame::Failed {
            code: 125,
            message: format!("too many exec'd processes (at most {max} at once)")
        })
    );
    // One ends: there is room for another.
    g.proc(1, Frame::Signal(libc::SIGKILL));
    assert_eq!(g.wait_proc(&mut run, 1).last, exited(137));
    g.exec(max + 2, &exec(&["echo", "room"]), &[]);
    assert_eq!(g.wait_proc(&mut run, max + 2).out(), "room\n");
    let r = stop(g, run);
    assert_eq!(r.procs.len(), events::MAX_EXECS + 2);
    for id in 2..=max {
        assert_eq!(r.procs[&id].last, exited(137), "{id}");
    }
    let main_end = r.ends.iter().position(|(id, _)| *id == 0);
    assert_eq!(main_end, Some(r.ends.len() - 1));
}

/// A layer blob file, padded like a disk with bytes that are not tar.
fn layer_file(dir: &Path, serial: &str, tar: &[u8], compression: Compression) -> LayerSpec {
    let blob = match compression {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, tar).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(tar, 1).unwrap(),
    };
    // The blob sits one sector into its disk, as a later layer does on the
    // shared layers disk, with garbage around it.
    let mut disk = vec![0xcd; 512];
    disk.extend_from_slice(&blob);
    disk.resize(disk.len().div_ceil(512) * 512 + 512, 0xab);
    std::fs::write(dir.join(serial), disk).unwrap();
    LayerSpec {
        disk: serial.into(),
        offset: 512,
        size: blob.len() as u64,
        compression,
        digest: format!("sha256:{serial}"),
    }
}

struct TarB(tar::Builder<Vec<u8>>);

impl TarB {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }
    fn header(kind: tar::EntryType, mode: u32, uid: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h
    }
    fn dir(mut self, path: &str, mode: u32, uid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, uid);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }
    fn file(mut self, path: &str, mode: u32, uid: u64, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    fn done(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

#[test]
fn a_whole_container_from_layers_in_namespaces() {
    let Ok(busybox) = std::fs::read("/bin/busybox") else {
        eprintln!("no /bin/busybox (busybox-static): skipped");
        return;
    };
    if !sys::is_root() {
        eprintln!("not root: skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_path_buf();
    let mut l0 = TarB::new()
        .dir("bin", 0o755, 0)
        .dir("etc", 0o755, 0)
        .dir("root", 0o700, 0)
        .dir("tmp", 0o1777, 0)
        .dir("home/app", 0o755, 1000)
        .file("bin/busybox", 0o755, 0, &busybox)
        .file(
            "etc/passwd",
            0o644,
            0,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n",
        )
        .file(
            "etc/group",
            0o644,
            0,
            b"root:x:0:\napp:x:1000:\nextra:x:2000:app\n",
        )
        .file("etc/gone", 0o644, 0, b"x")
        .symlink("etc/hosts", "/nonexistent/hosts");
    for applet in [
        "sh", "cat", "echo", "id", "hostname", "pwd", "test", "stat", "readlink", "head", "sleep",
    ] {
        l0 = l0.symlink(&format!("bin/{applet}"), "busybox");
    }
    let l1 = TarB::new().file("etc/.wh.gone", 0o644, 0, b"").file(
        "home/app/hello",
        0o644,
        1000,
        b"from gzip\n",
    );
    let l2 = TarB::new().file("bin/greet", 0o755, 0, b"#!/bin/sh\necho greet $1\n");
    let layers = vec![
        layer_file(&base, "hull-layer-0", &l0.done(), Compression::None),
        layer_file(&base, "hull-layer-1", &l1.done(), Compression::Gzip),
        layer_file(&base, "hull-layer-2", &l2.done(), Compression::Zstd),
    ];
    let script = r#"
echo "host=$(hostname) etc=$(cat /etc/hostname)"
head -n 1 /etc/hosts
id -u; id -g; id -G
pwd
test -e /etc/gone && echo gone-present || echo gone-removed
cat /home/app/hello
greet world
echo "$FOO $HOME"
stat -c %a /tmp
test -c /dev/null && test -c /dev/urandom && echo devices
readlink /dev/ptmx
cat /sys/class/net/lo/flags
echo hi > /tmp/x && cat /tmp/x
test -w / || echo root-not-writable-for-app
"#;
    let mut s = spec(&["sh", "-c", script]);
    s.user = "app".into();
    s.cwd = "/home/app/work".into();
    s.env = vec!["FOO=bar".into(), "FOO=baz".into()];
    s.hostname = "hulltest".into();
    let flags = libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC;
    let dir = base.clone();
    let setup = move |chan: &Channel| -> Result<(), StartError> {
        let p = |s: &str| dir.join(s).to_str().unwrap().to_string();
        for d in ["image", "scratch", "root"] {
            std::fs::create_dir(dir.join(d)).unwrap();
        }
        let dev_of = |serial: &str| p(serial);
        rootfs::unpack_layers(&dir.join("image"), &layers, &dev_of, &|n| chan.note(n))?;
        rootfs::mount_overlay(&p("image"), &p("scratch"), &p("root"))?;
        mounts::container(&p("root"), &crate::spec::SecuritySpec::default())?;
        mounts::switch_root(&p("root"))?;
        for n in mounts::etc_files("hulltest") {
            chan.note(n);
        }
        mounts::set_hostname("hulltest").map_err(|e| runtime("sethostname", &e))?;
        mounts::loopback_up();
        Ok(())
    };
    let Some(g) = start_with(&s, flags, setup) else {
        return;
    };
    let r = g.finish();
    assert_eq!(r.last, Some(Frame::Exited(0)), "{r:?}");
    assert_eq!(
        r.out(),
        "host=hulltest etc=hulltest\n127.0.0.1\tlocalhost hulltest\n1000\n1000\n1000 2000\n/home/app/work\n\
         gone-removed\nfrom gzip\ngreet world\nbaz /home/app\n1777\ndevices\npts/ptmx\n0x9\nhi\n\
         root-not-writable-for-app\n"
    );
    assert!(
        r.notes
            .iter()
            .any(|n| n.starts_with("layer 1 (sha256:hull-layer-1): 2 entries")),
        "{:?}",
        r.notes
    );
    // The image's lower layer is untouched; the writes went to the upper one.
    assert!(base
        .join("image/etc/hosts")
        .symlink_metadata()
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(base.join("scratch/upper/etc/hostname").exists());
    assert!(base.join("scratch/upper/tmp/x").exists());
}

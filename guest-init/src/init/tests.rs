//! The process half of the init (user, `PATH`, spawn, the event loop, exit
//! codes), run for real on the host: in a forked child that is PID 1 of new
//! pid and mount namespaces (so that its `kill(-1)` and bind mounts stay
//! there), talking to the test, which plays the host, over a socket.
//! Needs root (CI has it); skipped otherwise.

use super::*;
use crate::spec::{Compression, LayerSpec, RootfsSpec};
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
        tty: false,
        stdin: false,
        rootfs: RootfsSpec {
            image_disk: String::new(),
            scratch_disk: String::new(),
            build: None,
        },
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

    /// Reads frames until the last one, then waits for the guest.
    fn finish(mut self) -> Run {
        let mut run = Run::default();
        loop {
            match Frame::read_from(&mut self.host).unwrap() {
                Frame::Stdout(b) => run.stdout.extend(b),
                Frame::Stderr(b) => run.stderr.extend(b),
                Frame::Note(_, n) => run.notes.push(n),
                f @ (Frame::Exited(_) | Frame::Failed { .. }) => {
                    run.last = Some(f);
                    break;
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
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
    let Some(mut g) = start(&spec(&["sleep", "30"])) else {
        return;
    };
    g.send(&Frame::Signal(libc::SIGTERM));
    let r = g.finish();
    assert_eq!(r.last, Some(Frame::Exited(143)));
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
        mounts::container(&p("root"))?;
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

//! Boots the real `hull-init` as PID 1 of the guest kernel under QEMU
//! (`microvm`, TCG: no KVM needed) with virtio-blk disks named by serial and
//! a virtio console as `/dev/hvc0`, and plays the host's side of the
//! protocol: the init is tested in its real environment, independently of
//! hull's VMM.
//!
//! Needs `HULL_TEST_KERNEL` (set by `./dev test`; the `bzImage` beside the
//! `vmlinux` is booted), `qemu-system-x86_64`, `mke2fs` and `/bin/busybox`
//! (all installed by `./dev setup`); skipped when one is missing.
//!
//! Keep outputs small: QEMU's console ports drop guest output that the
//! socket cannot take at once (hull's own device does not).

// A test crate: its helpers fail the test by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hull_protocol::frame::Frame;
use hull_protocol::spec::{
    layer_disk_serial, Compression, LayerSpec, RootfsSpec, RunSpec, IMAGE_DISK_SERIAL,
    SCRATCH_DISK_SERIAL,
};

fn kernel() -> Option<PathBuf> {
    let k = PathBuf::from(std::env::var_os("HULL_TEST_KERNEL")?);
    let bz = k.with_file_name("bzImage");
    if bz.is_file() {
        Some(bz)
    } else if k.file_name().is_some_and(|n| n == "bzImage") && k.is_file() {
        Some(k)
    } else {
        None
    }
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// What the test needs, or why it is skipped.
fn prerequisites() -> Result<(PathBuf, Vec<u8>), String> {
    let kernel = kernel().ok_or("HULL_TEST_KERNEL unset or no bzImage beside it")?;
    for cmd in ["qemu-system-x86_64", "mke2fs"] {
        if !have(cmd) {
            return Err(format!("{cmd} not installed"));
        }
    }
    let busybox = std::fs::read("/bin/busybox").map_err(|e| format!("/bin/busybox: {e}"))?;
    Ok((kernel, busybox))
}

/// A newc cpio archive holding the init as `/init`.
fn initramfs(init: &[u8]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() & 3 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() & 3 != 0 {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    entry(&mut out, 1, "init", 0o100_755, init);
    entry(&mut out, 2, "TRAILER!!!", 0, &[]);
    out
}

/// A gzipped layer: busybox and a few applets, users, /tmp.
fn layer(busybox: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: usize| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size as u64);
        h
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, mode, data.len());
        b.append_data(&mut h, path, data).unwrap();
    };
    for d in ["bin", "etc", "root"] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, d, std::io::empty()).unwrap();
    }
    let mut h = header(tar::EntryType::Directory, 0o1777, 0);
    b.append_data(&mut h, "tmp", std::io::empty()).unwrap();
    file(&mut b, "bin/busybox", 0o755, busybox);
    file(
        &mut b,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    );
    file(&mut b, "etc/group", 0o644, b"root:x:0:\nuser:x:1000:\n");
    for applet in ["sh", "cat", "echo", "id", "hostname", "test"] {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

fn ext4(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let ok = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mke2fs {}", path.display());
}

struct Vm {
    qemu: Child,
    sock: UnixStream,
    serial: PathBuf,
}

/// Boots the guest with `disks` (serial, file, read-only).
fn boot(dir: &Path, kernel: &Path, disks: &[(&str, &Path, bool)]) -> Vm {
    let sock_path = dir.join("channel.sock");
    let _ = std::fs::remove_file(&sock_path);
    let listener = UnixListener::bind(&sock_path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let serial = dir.join("serial.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,acpi=off",
        "-m",
        "512",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
    ])
    .args(["-nographic", "-no-reboot", "-kernel"])
    .arg(kernel)
    .arg("-initrd")
    .arg(dir.join("initrd.cpio"))
    .args(["-append", "console=ttyS0 reboot=t panic=-1 rdinit=/init"])
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .args(["-device", "virtio-serial-device", "-chardev"])
    .arg(format!("socket,id=ch0,path={}", sock_path.display()))
    .args(["-device", "virtconsole,chardev=ch0"]);
    for (i, (name, path, ro)) in disks.iter().enumerate() {
        let ro = if *ro { ",readonly=on" } else { "" };
        cmd.arg("-drive")
            .arg(format!(
                "id=d{i},file={},format=raw,if=none{ro}",
                path.display()
            ))
            .arg("-device")
            .arg(format!("virtio-blk-device,drive=d{i},serial={name}"));
    }
    let mut qemu = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let sock = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = qemu.try_wait().unwrap() {
                    panic!("qemu exited before connecting: {status}");
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "qemu did not connect"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(180)))
        .unwrap();
    Vm { qemu, sock, serial }
}

#[derive(Debug, Default)]
struct Outcome {
    stdout: String,
    stderr: String,
    last: Option<Frame>,
    notes: Vec<String>,
}

impl Vm {
    fn serial_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.serial).unwrap_or_default();
        log.lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Ready, spec, `send`, then frames until the last; waits for QEMU to end.
    fn run(mut self, spec: &RunSpec, send: &[Frame]) -> Outcome {
        let mut out = Outcome::default();
        match Frame::read_from(&mut self.sock) {
            Ok(Frame::Ready) => {}
            other => panic!(
                "expected Ready, got {other:?}\nserial:\n{}",
                self.serial_tail()
            ),
        }
        Frame::Spec(serde_json::to_vec(spec).unwrap())
            .write_to(&mut self.sock)
            .unwrap();
        for f in send {
            f.write_to(&mut self.sock).unwrap();
        }
        loop {
            match Frame::read_from(&mut self.sock) {
                Ok(Frame::Stdout(b)) => out.stdout.push_str(&String::from_utf8_lossy(&b)),
                Ok(Frame::Stderr(b)) => out.stderr.push_str(&String::from_utf8_lossy(&b)),
                Ok(Frame::Note(_, n)) => out.notes.push(n),
                Ok(f @ (Frame::Exited(_) | Frame::Failed { .. })) => {
                    out.last = Some(f);
                    break;
                }
                other => panic!("unexpected {other:?}\nserial:\n{}", self.serial_tail()),
            }
        }
        let start = Instant::now();
        loop {
            if let Some(status) = self.qemu.try_wait().unwrap() {
                assert!(status.success(), "qemu: {status}");
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = self.qemu.kill();
                panic!(
                    "the guest did not power off\nserial:\n{}",
                    self.serial_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        out
    }
}

/// The layer chain the tests' image claims.
fn chain() -> Vec<String> {
    vec!["sha256:test-diff-id".into()]
}

fn spec(args: &[&str], build: Option<Vec<LayerSpec>>) -> RunSpec {
    RunSpec {
        args: args.iter().map(ToString::to_string).collect(),
        env: vec!["GREETING=hi".into()],
        cwd: "/work".into(),
        user: String::new(),
        hostname: "qemu".into(),
        stdin: false,
        rootfs: RootfsSpec {
            image_disk: IMAGE_DISK_SERIAL.into(),
            scratch_disk: SCRATCH_DISK_SERIAL.into(),
            chain: chain(),
            build,
        },
        ..RunSpec::default()
    }
}

#[test]
fn the_init_builds_the_image_then_runs_containers_in_a_real_guest() {
    let (kernel, busybox) = match prerequisites() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("initrd.cpio"),
        initramfs(&std::fs::read(env!("CARGO_BIN_EXE_hull-init")).unwrap()),
    )
    .unwrap();
    let blob = layer(&busybox);
    let mut disk = blob.clone();
    disk.resize(blob.len().div_ceil(512) * 512, 0);
    std::fs::write(dir.join("layer0"), &disk).unwrap();
    let (image, scratch, layer0) = (
        dir.join("image.ext4"),
        dir.join("scratch.ext4"),
        dir.join("layer0"),
    );
    ext4(&image);
    ext4(&scratch);

    // The build-only VM: the image disk is built from the layer disk, and
    // nothing of the image runs (no command, no scratch disk).
    let layers = vec![LayerSpec {
        disk: layer_disk_serial(0),
        offset: 0,
        size: blob.len() as u64,
        compression: Compression::Gzip,
        digest: "sha256:test".into(),
    }];
    let vm = boot(
        dir,
        &kernel,
        &[
            (IMAGE_DISK_SERIAL, &image, false),
            ("hull-layer-0", &layer0, true),
        ],
    );
    let r = vm.run(&spec(&[], Some(layers)), &[]);
    assert_eq!(r.last, Some(Frame::Exited(0)), "{r:?}");
    assert!(
        r.notes.iter().any(|n| n.starts_with("unpacked 1 layers")),
        "{:?}",
        r.notes
    );

    // Later runs: the image disk read-only, a fresh scratch disk.
    let later = |spec: &RunSpec, send: &[Frame]| {
        ext4(&scratch);
        boot(
            dir,
            &kernel,
            &[
                (IMAGE_DISK_SERIAL, &image, true),
                (SCRATCH_DISK_SERIAL, &scratch, false),
            ],
        )
        .run(spec, send)
    };
    let script =
        "echo $GREETING $(hostname) $(cat /etc/hostname) $(id -u) $PWD; echo oops >&2; exit 5";
    let r = later(&spec(&["sh", "-c", script], None), &[]);
    assert_eq!(r.last, Some(Frame::Exited(5)), "{r:?}");
    assert_eq!(r.stdout, "hi qemu qemu 0 /work\n");
    assert_eq!(r.stderr, "oops\n");

    // A disk whose marker names other layers is refused.
    let mut other = spec(&["true"], None);
    other.rootfs.chain = vec!["sha256:other".into()];
    let r = later(&other, &[]);
    assert!(
        matches!(&r.last, Some(Frame::Failed { code: 125, message }) if message.contains("other layers")),
        "{r:?}"
    );

    let mut s = spec(&["cat"], None);
    s.stdin = true;
    s.user = "user".into();
    let r = later(&s, &[Frame::Stdin(b"ping".to_vec()), Frame::StdinEof]);
    assert_eq!(
        (r.stdout.as_str(), r.last),
        ("ping", Some(Frame::Exited(0)))
    );

    let r = later(&spec(&["no-such-command"], None), &[]);
    assert_eq!(
        r.last,
        Some(Frame::Failed {
            code: 127,
            message: "exec: \"no-such-command\": executable file not found in $PATH".into()
        })
    );
}

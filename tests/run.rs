//! `hull run` end to end. Images are built here with umoci (busybox-static
//! inside), served by a real `docker-registry` on loopback and pulled by
//! `hull pull` on this host into a fresh store (pulling needs no KVM); the
//! store is then copied into the emulated KVM host, where `hull run` boots
//! each container in its own microVM.
//!
//! Each emulated-host script runs several containers through the `r NAME CMD`
//! shell function, which keeps a command's stdout and stderr apart and prints
//! them as `[NAME] exit=N`, `[NAME] out: ...`, `[NAME] err: ...` lines;
//! [`Step`] parses them back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{EmulatedHost, HostRun, OciImage, Registry};

/// Where the store pulled on this host goes in the emulated host.
const STORE_IN_HOST: &str = "/var/lib/hull";

/// The start of every emulated-host script. `r NAME CMD` runs the shell
/// command CMD (in its own session, killed with all its processes after
/// [`STEP_TIMEOUT_SECS`]) and reports its exit status, stdout and stderr.
const PRELUDE: &str = r#"export PATH=/usr/local/bin:/sbin:/usr/sbin:/bin:/usr/bin
export HULL_KERNEL=/opt/hull/vmlinux HULL_ROOT=/var/lib/hull
r() {
	rm -f /tmp/r.timedout
	setsid sh -c "$2" >/tmp/r.out 2>/tmp/r.err &
	pid=$!
	setsid sh -c "sleep $STEP_TIMEOUT; echo >/tmp/r.timedout; kill -9 -$pid" >/dev/null 2>&1 &
	dog=$!
	wait $pid
	code=$?
	kill -9 -$dog 2>/dev/null
	[ -e /tmp/r.timedout ] && echo "[$1] timed-out after $STEP_TIMEOUT s"
	echo "[$1] exit=$code"
	sed "s/^/[$1] out: /" /tmp/r.out
	sed "s/^/[$1] err: /" /tmp/r.err
}
"#;

/// How long one step may take (a container that hangs fails its step only).
const STEP_TIMEOUT_SECS: u32 = 60;

/// One `r NAME CMD` line of a script (CMD quoted for the shell).
fn r(name: &str, cmd: &str) -> String {
    format!("r {name} '{}'\n", cmd.replace('\'', r"'\''"))
}

/// What one `r NAME CMD` reported.
#[derive(Debug)]
struct Step {
    code: i32,
    timed_out: bool,
    out: Vec<String>,
    err: Vec<String>,
}

impl Step {
    /// Parses step `name` from the output of `run`; fails the test (with the
    /// whole output) when the step did not report.
    #[track_caller]
    fn of(run: &HostRun, name: &str) -> Step {
        let prefix = format!("[{name}] ");
        let mut code = None;
        let mut timed_out = false;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for line in run.stdout.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let text = |s: &str| s.strip_prefix(' ').unwrap_or(s).to_owned();
            if rest.starts_with("timed-out") {
                timed_out = true;
            } else if let Some(c) = rest.strip_prefix("exit=") {
                code = c.trim().parse().ok();
            } else if let Some(o) = rest.strip_prefix("out:") {
                out.push(text(o));
            } else if let Some(e) = rest.strip_prefix("err:") {
                err.push(text(e));
            }
        }
        let Some(code) = code else {
            run.fail(&format!("step [{name}] did not report its exit status"))
        };
        Step {
            code,
            timed_out,
            out,
            err,
        }
    }

    fn has_out(&self, line: &str) -> bool {
        self.out.iter().any(|l| l == line)
    }

    fn err_text(&self) -> String {
        self.err.join("\n")
    }

    /// The value of the first `KEY=value` line of stdout.
    fn out_value(&self, key: &str) -> Option<&str> {
        self.out
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// Fails the test with the whole emulated-host report unless `ok`.
#[track_caller]
fn check(run: &HostRun, ok: bool, what: &str, step: &Step) {
    if !ok {
        let hang = if step.timed_out {
            format!(" (the step hung: killed after {STEP_TIMEOUT_SECS} s)")
        } else {
            String::new()
        };
        run.fail(&format!("{what}{hang}\nthe step: {step:#?}"));
    }
}

/// A registry, a place to build images, and a hull store on this host.
struct Lab {
    dir: tempfile::TempDir,
    registry: Registry,
    store: PathBuf,
}

/// An image pulled into the lab's store.
struct Pulled {
    /// `127.0.0.1:PORT/NAME:latest`.
    reference: String,
    /// `sha256:<hex>`, as `hull pull` printed it.
    id: String,
}

impl Pulled {
    fn hex(&self) -> &str {
        self.id.strip_prefix("sha256:").unwrap_or(&self.id)
    }
}

impl Lab {
    fn new() -> Self {
        common::require_image_tools();
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::start(dir.path());
        let store = dir.path().join("store");
        Self {
            dir,
            registry,
            store,
        }
    }

    /// A fresh, empty umoci image named `name`.
    fn image(&self, name: &str) -> OciImage {
        let dir = self.dir.path().join("images").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        OciImage::new(&dir)
    }

    /// hull on this host, with the lab's store.
    fn hull(&self, args: &[&str]) -> Output {
        Command::new(common::hull_bin())
            .args(args)
            .env("HULL_ROOT", &self.store)
            .output()
            .unwrap()
    }

    /// Pushes `image` to the registry as `name` and pulls it with `hull pull`.
    fn publish(&self, image: &OciImage, name: &str) -> Pulled {
        let reference = image.push(&self.registry, name);
        let out = self.hull(&["pull", &reference]);
        assert!(
            out.status.success(),
            "hull pull {reference} failed ({}):\n{}\nregistry log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.registry.log()
        );
        let id = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();
        assert!(
            id.starts_with("sha256:"),
            "hull pull printed no image id: {out:?}"
        );
        Pulled { reference, id }
    }

    /// Runs `body` (after [`PRELUDE`]) in the emulated host with the store.
    fn boot(&self, body: &str) -> HostRun {
        let run = EmulatedHost::new()
            .with_hull_runtime()
            .dir(&self.store, STORE_IN_HOST)
            .timeout(300)
            .run(&format!(
                "{PRELUDE}STEP_TIMEOUT={STEP_TIMEOUT_SECS}\n{body}"
            ));
        run.assert_success();
        run
    }

    /// Writes the tar file `name` with python3's tarfile; `body` is Python
    /// calling `add(name, kind='file'|'dir'|'symlink'|'hardlink', data=b'', link='')`.
    fn tar(&self, name: &str, body: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        let script = format!(
            "import io, sys, tarfile\n\
             t = tarfile.open(sys.argv[1], 'w', format=tarfile.GNU_FORMAT)\n\
             def add(name, kind='file', data=b'', link=''):\n    \
                 ti = tarfile.TarInfo(name)\n    \
                 ti.mode = 0o755 if kind == 'dir' else 0o644\n    \
                 if kind == 'file':\n        \
                     ti.size = len(data)\n        \
                     t.addfile(ti, io.BytesIO(data))\n        \
                     return\n    \
                 ti.type = {{'dir': tarfile.DIRTYPE, 'symlink': tarfile.SYMTYPE, \
                             'hardlink': tarfile.LNKTYPE}}[kind]\n    \
                 ti.linkname = link\n    \
                 t.addfile(ti)\n\
             {body}\n\
             t.close()\n"
        );
        common::run_checked(Command::new("python3").arg("-c").arg(script).arg(&path));
        path
    }
}

/// busybox with its applets in /bin, PATH=/bin, and an /etc/passwd with
/// `root`, `app` (1000) and `svc` (1001).
fn base_layer(rootfs: &Path) {
    common::install_busybox(rootfs);
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\n\
         app:x:1000:1000:app:/home/app:/bin/sh\n\
         svc:x:1001:1001:svc:/home/svc:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(etc.join("group"), "root:x:0:\napp:x:1000:\nsvc:x:1001:\n").unwrap();
}

/// A one-layer busybox image with Cmd /bin/sh and PATH=/bin.
fn busybox_image(lab: &Lab, name: &str) -> OciImage {
    let image = lab.image(name);
    image
        .layer(base_layer)
        .config(&["--config.cmd", "/bin/sh", "--config.env", "PATH=/bin"]);
    image
}

#[test]
fn stdout_and_stderr_stay_apart_and_exit_codes_pass_through() {
    let lab = Lab::new();
    let img = lab
        .publish(&busybox_image(&lab, "plain"), "plain")
        .reference;
    let mut script = String::new();
    script += &r(
        "ok",
        &format!("hull run --rm {img} sh -c 'echo to-stdout; echo to-stderr >&2'"),
    );
    script += &r(
        "three",
        &format!("hull run --rm {img} sh -c 'echo out3; echo err3 >&2; exit 3'"),
    );
    // With --init the shell is not PID 1 of its pid namespace (PID 1 cannot
    // be killed from inside, as under docker), so it dies of its SIGKILL.
    script += &r(
        "killed",
        &format!("hull run --rm --init {img} sh -c 'kill -9 $$'"),
    );
    let run = lab.boot(&script);

    let ok = Step::of(&run, "ok");
    check(&run, ok.code == 0, "[ok] should exit 0", &ok);
    check(
        &run,
        ok.out == ["to-stdout"] && ok.err == ["to-stderr"],
        "[ok] stdout and stderr should each hold their own line only",
        &ok,
    );
    let three = Step::of(&run, "three");
    check(&run, three.code == 3, "[three] should exit 3", &three);
    check(
        &run,
        three.out == ["out3"] && three.err == ["err3"],
        "[three] stdout and stderr should each hold their own line only",
        &three,
    );
    let killed = Step::of(&run, "killed");
    check(
        &run,
        killed.code == 137,
        "[killed] a container killed by SIGKILL should exit 128+9",
        &killed,
    );
}

#[test]
fn image_config_is_honoured_and_run_flags_override_it() {
    let lab = Lab::new();
    let image = busybox_image(&lab, "config");
    image.config(&[
        "--config.env",
        "FOO=from-image",
        "--config.workingdir",
        "/work",
        "--config.user",
        "app",
        "--config.entrypoint=/bin/sh",
        "--config.entrypoint=-c",
        "--config.cmd=echo default-cmd; echo uid=$(id -u); echo pwd=$(pwd); env",
    ]);
    let img = lab.publish(&image, "config").reference;
    // Given as the cmd to the image's entrypoint `sh -c`.
    let probe = "echo uid=$(id -u); echo user=$(id -un); echo pwd=$(pwd); \
                 echo host=$(hostname); env";
    let mut script =
        String::from("printf 'FROMFILE=yes\\n# a comment\\nBAR=from-file\\n' > /tmp/env.list\n");
    script += &r("defaults", &format!("hull run --rm {img}"));
    script += &r(
        "flags",
        &format!(
            "hull run --rm -e FOO=override -e BAR=x --env-file /tmp/env.list -w /tmp -u 0 \
             --hostname h1 {img} '{probe}'"
        ),
    );
    script += &r("byname", &format!("hull run --rm -u svc {img} '{probe}'"));
    script += &r("app", &format!("hull run --rm -u app {img} '{probe}'"));
    script += &r(
        "entrypoint",
        &format!("hull run --rm --entrypoint /bin/echo {img} replaced entrypoint"),
    );
    let run = lab.boot(&script);

    let d = Step::of(&run, "defaults");
    check(&run, d.code == 0, "[defaults] should exit 0", &d);
    check(&run, d.has_out("default-cmd"), "the image's cmd runs", &d);
    check(&run, d.out_value("uid") == Some("1000"), "User app", &d);
    check(&run, d.out_value("pwd") == Some("/work"), "WorkingDir", &d);
    check(&run, d.out_value("FOO") == Some("from-image"), "Env", &d);
    check(&run, d.out_value("PATH") == Some("/bin"), "Env PATH", &d);
    check(
        &run,
        d.out_value("HOME") == Some("/home/app"),
        "HOME of app",
        &d,
    );
    let default_host = d.out_value("HOSTNAME").unwrap_or_default();
    check(
        &run,
        default_host.len() == 12 && default_host.bytes().all(|b| b.is_ascii_hexdigit()),
        "the default hostname is the short container id",
        &d,
    );

    let f = Step::of(&run, "flags");
    check(&run, f.code == 0, "[flags] should exit 0", &f);
    check(&run, f.out_value("uid") == Some("0"), "-u 0", &f);
    check(&run, f.out_value("pwd") == Some("/tmp"), "-w /tmp", &f);
    check(&run, f.out_value("host") == Some("h1"), "--hostname", &f);
    check(
        &run,
        f.out_value("HOSTNAME") == Some("h1"),
        "HOSTNAME env",
        &f,
    );
    check(
        &run,
        f.out_value("FOO") == Some("override"),
        "-e wins over Env",
        &f,
    );
    check(
        &run,
        f.out_value("BAR") == Some("x"),
        "-e wins over --env-file",
        &f,
    );
    check(
        &run,
        f.out_value("FROMFILE") == Some("yes"),
        "--env-file",
        &f,
    );
    check(
        &run,
        f.out_value("PATH") == Some("/bin"),
        "Env PATH kept",
        &f,
    );
    check(&run, !f.has_out("default-cmd"), "args replace the cmd", &f);

    let s = Step::of(&run, "byname");
    check(&run, s.code == 0, "[byname] should exit 0", &s);
    check(&run, s.out_value("uid") == Some("1001"), "-u svc", &s);
    check(&run, s.out_value("user") == Some("svc"), "-u svc name", &s);
    check(
        &run,
        s.out_value("HOME") == Some("/home/svc"),
        "HOME of svc",
        &s,
    );
    check(
        &run,
        s.out_value("pwd") == Some("/work"),
        "WorkingDir kept",
        &s,
    );

    let a = Step::of(&run, "app");
    check(&run, a.code == 0, "[app] should exit 0", &a);
    check(&run, a.out_value("uid") == Some("1000"), "-u app", &a);
    check(&run, a.out_value("user") == Some("app"), "-u app name", &a);

    let e = Step::of(&run, "entrypoint");
    check(&run, e.code == 0, "[entrypoint] should exit 0", &e);
    check(
        &run,
        e.out == ["replaced entrypoint"],
        "--entrypoint replaces the entrypoint and drops the image's cmd",
        &e,
    );
}

#[test]
fn layer_whiteouts_delete_files_of_lower_layers() {
    let lab = Lab::new();
    let image = lab.image("whiteout");
    image.layer(|root| {
        base_layer(root);
        std::fs::write(root.join("etc/keep"), "kept\n").unwrap();
        std::fs::write(root.join("etc/gone"), "deleted by layer 2\n").unwrap();
        std::fs::create_dir_all(root.join("data/sub")).unwrap();
        std::fs::write(root.join("data/sub/file"), "deleted with its dir\n").unwrap();
        std::fs::write(root.join("data/other"), "kept\n").unwrap();
        std::fs::create_dir_all(root.join("opq")).unwrap();
        std::fs::write(root.join("opq/a"), "hidden by the opaque dir\n").unwrap();
        std::fs::write(root.join("opq/b"), "hidden by the opaque dir\n").unwrap();
    });
    // Layer 2 (umoci's diff): `etc/.wh.gone` and `data/.wh.sub`.
    image.layer(|root| {
        std::fs::remove_file(root.join("etc/gone")).unwrap();
        std::fs::remove_dir_all(root.join("data/sub")).unwrap();
    });
    // Layer 3: an opaque directory that keeps only what it adds itself.
    let opaque = lab.tar(
        "opaque.tar",
        "add('opq', 'dir')\nadd('opq/.wh..wh..opq')\nadd('opq/c', data=b'new\\n')",
    );
    image
        .raw_layer(&opaque)
        .config(&["--config.cmd", "/bin/sh", "--config.env", "PATH=/bin"]);
    let layer2 = image.manifest()["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let listing = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zcat '{}' | tar -t",
            image.blob_file(&layer2).display()
        ))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("etc/.wh.gone"),
        "umoci wrote no whiteout in layer 2: {listing}"
    );
    let img = lab.publish(&image, "whiteout").reference;
    let probe = "for f in /etc/gone /data/sub /data/sub/file /opq/a /opq/b \
                 /etc/keep /data/other /opq/c /bin/busybox; do \
                 if [ -e $f ]; then echo present:$f; else echo absent:$f; fi; done; \
                 echo opq=$(ls -A /opq | tr \"\\n\" \" \")";
    let run = lab.boot(&r("ls", &format!("hull run --rm {img} sh -c '{probe}'")));

    let s = Step::of(&run, "ls");
    check(&run, s.code == 0, "[ls] should exit 0", &s);
    for f in [
        "/etc/gone",
        "/data/sub",
        "/data/sub/file",
        "/opq/a",
        "/opq/b",
    ] {
        check(
            &run,
            s.has_out(&format!("absent:{f}")),
            &format!("{f} is whited out"),
            &s,
        );
    }
    for f in ["/etc/keep", "/data/other", "/opq/c", "/bin/busybox"] {
        check(
            &run,
            s.has_out(&format!("present:{f}")),
            &format!("{f} is kept"),
            &s,
        );
    }
    check(
        &run,
        s.out_value("opq").map(str::trim) == Some("c"),
        "the opaque dir holds only layer 3's file",
        &s,
    );
}

#[test]
fn stdin_is_forwarded_with_i_and_closed_without() {
    let lab = Lab::new();
    let img = lab
        .publish(&busybox_image(&lab, "stdin"), "stdin")
        .reference;
    let mut script = String::from("head -c 300000 /dev/urandom > /tmp/blob\n");
    // Input that arrives once the container runs, then input that is all
    // there (EOF included) before the VM has even booted.
    script += &r(
        "late",
        &format!("(sleep 10; echo late) | hull run --rm -i {img} cat"),
    );
    script += &r("piped", &format!("echo piped | hull run --rm -i {img} cat"));
    script += &r(
        "closed",
        &format!("echo piped | hull run --rm {img} sh -c 'cat; echo eof-seen'"),
    );
    script += &r(
        "bulk",
        &format!(
            "echo want=$(md5sum < /tmp/blob); \
             echo got=$(hull run --rm -i {img} md5sum < /tmp/blob)"
        ),
    );
    let run = lab.boot(&script);

    let l = Step::of(&run, "late");
    check(&run, l.code == 0, "[late] should exit 0", &l);
    check(&run, l.out == ["late"], "-i forwards stdin", &l);
    let p = Step::of(&run, "piped");
    check(
        &run,
        p.code == 0 && p.out == ["piped"],
        "-i forwards stdin written before the container started, and its EOF",
        &p,
    );
    let c = Step::of(&run, "closed");
    check(&run, c.code == 0, "[closed] should exit 0", &c);
    check(
        &run,
        c.out == ["eof-seen"],
        "without -i the container reads EOF at once",
        &c,
    );
    let b = Step::of(&run, "bulk");
    check(&run, b.code == 0, "[bulk] should exit 0", &b);
    let want = b.out_value("want").unwrap_or("want");
    check(
        &run,
        b.out_value("got") == Some(want),
        "300 kB of binary stdin arrive intact",
        &b,
    );
}

/// `hull: timing: ..., total N ms` of a `--debug` run.
fn total_ms(step: &Step) -> Option<u64> {
    step.err.iter().find_map(|l| {
        let rest = l.strip_prefix("hull: timing: ")?;
        let total = rest.split("total ").nth(1)?;
        total.split_whitespace().next()?.parse().ok()
    })
}

#[test]
fn the_image_disk_is_built_once_in_its_own_vm_and_reused() {
    let lab = Lab::new();
    let pulled = lab.publish(&busybox_image(&lab, "reuse"), "reuse");
    let img = &pulled.reference;
    let dir = format!("{STORE_IN_HOST}/images/{}", pulled.hex());
    // Two first runs at once: one builds, the other waits for it.
    let mut script = r(
        "first",
        &format!(
            "hull --debug run --rm {img} true 2>/tmp/a.err & a=$!; \
             hull --debug run --rm {img} true 2>/tmp/b.err; b=$?; wait $a; \
             echo codes=$?,$b; echo builds=$(cat /tmp/a.err /tmp/b.err | grep -c \"unpacked 1 layers\"); \
             cat /tmp/a.err >&2"
        ),
    );
    script += &r(
        "disk",
        &format!("ls {dir}/ | grep rootfs-; stat -c %a {dir}/rootfs-*.ext4"),
    );
    script += &r("second", &format!("hull --debug run --rm {img} true"));
    script += &r(
        "inspect",
        &format!("hull run --name timed {img} true && hull inspect timed"),
    );
    let run = lab.boot(&script);

    let first = Step::of(&run, "first");
    check(
        &run,
        first.out_value("codes") == Some("0,0"),
        "both first runs exit 0",
        &first,
    );
    check(
        &run,
        first.out_value("builds") == Some("1"),
        "exactly one of the two first runs unpacks the image",
        &first,
    );
    let disk_step = Step::of(&run, "disk");
    check(
        &run,
        disk_step.code == 0
            && disk_step.out.len() == 2
            && disk_step.out[0].starts_with("rootfs-")
            && disk_step.out[0].ends_with(".ext4")
            && disk_step.out[1] == "444",
        "the build leaves one read-only image disk, named by its content, in the store",
        &disk_step,
    );
    let second = Step::of(&run, "second");
    check(&run, second.code == 0, "[second] should exit 0", &second);
    check(
        &run,
        !second.err_text().contains("unpacked"),
        "the second run does not unpack again",
        &second,
    );
    // The VMM's boot timer: its own steps and the init's marks, in order.
    let timer = second
        .err
        .iter()
        .find_map(|l| l.strip_prefix("hull: boot timer: "))
        .unwrap_or_default();
    let points: Vec<&str> = timer
        .split(", ")
        .filter_map(|p| p.rsplit_once(' ')?.0.rsplit_once(' ').map(|(name, _)| name))
        .collect();
    check(
        &run,
        points
            == [
                "vm created",
                "vcpus started",
                "init started",
                "root ready",
                "workload started",
                "vm stopped",
            ],
        "--debug run prints the boot timeline, every point in order",
        &second,
    );
    let inspect = Step::of(&run, "inspect");
    let record: serde_json::Value =
        serde_json::from_str(&inspect.out.join("\n")).unwrap_or_default();
    let times = &record[0]["State"]["BootTimes"];
    let ms = |point: &str| {
        times
            .as_array()
            .and_then(|a| a.iter().find(|t| t["point"] == point))
            .and_then(|t| t["ms"].as_f64())
    };
    check(
        &run,
        matches!(
            (ms("vcpus started"), ms("init started"), ms("workload started")),
            (Some(a), Some(b), Some(c)) if 0.0 < a && a < b && b < c
        ),
        "inspect shows the boot timeline of the container's VM",
        &inspect,
    );
    println!(
        "timing: hull run IMG true in the emulated host: first (two at once) {:?} ms, later {:?} ms; boot timer: {timer}",
        total_ms(&first),
        total_ms(&second)
    );
}

/// The first container of an image, as root, makes a node for every block
/// device it sees and tries to mount it read-write, remount it read-write
/// and write to it raw, then rewrites the image's /etc/passwd wherever it
/// could mount it; the next container must still see the original.
#[test]
fn no_container_can_rewrite_the_shared_image_disk() {
    let lab = Lab::new();
    let pulled = lab.publish(&busybox_image(&lab, "tamper"), "tamper");
    let img = &pulled.reference;
    let attack = r#"mkdir -p /tmp /mnt
for d in /sys/block/*; do
  n=${d##*/}; mm=$(cat $d/dev); s=$(cat $d/serial 2>/dev/null)
  [ "$s" = hull-image ] && echo image-disk=$n
  mknod /tmp/$n b ${mm%%:*} ${mm##*:} || continue
  blockdev --setrw /tmp/$n
  mkdir -p /mnt/$n
  mount -t ext4 -o rw /tmp/$n /mnt/$n || mount -t ext4 -o ro /tmp/$n /mnt/$n || continue
  mount -o remount,rw /mnt/$n
  touch /mnt/$n/hull-probe && echo writable-mount=$n
  [ -f /mnt/$n/rootfs/etc/passwd ] && echo pwned > /mnt/$n/rootfs/etc/passwd && echo rewrote=$n
  umount /mnt/$n
  if [ "$s" = hull-image ]; then
    dd if=/dev/zero of=/tmp/$n bs=4096 count=1 seek=1 conv=notrunc && echo raw-write=$n
  fi
done; echo attack-done"#;
    // --privileged: docker's worst case (every capability, so mknod, mount
    // and blockdev are all allowed); the image disk must still hold.
    let mut script = r(
        "attack",
        &format!("hull run --rm --privileged {img} sh -c '{attack}'"),
    );
    script += &r("after", &format!("hull run --rm {img} head -1 /etc/passwd"));
    let run = lab.boot(&script);

    let a = Step::of(&run, "attack");
    check(
        &run,
        a.has_out("attack-done"),
        "the attack ran to its end",
        &a,
    );
    check(
        &run,
        a.out.iter().any(|l| l.starts_with("writable-mount=")),
        "the attack mounts what it may write (its own scratch disk)",
        &a,
    );
    let dev = a.out_value("image-disk").unwrap_or("?").to_string();
    check(&run, dev != "?", "the container saw the image disk", &a);
    for bad in ["writable-mount", "rewrote", "raw-write"] {
        check(
            &run,
            !a.has_out(&format!("{bad}={dev}")),
            &format!("the image disk must refuse: {bad}"),
            &a,
        );
    }
    check(
        &run,
        !a.out.iter().any(|l| l.starts_with("rewrote=")),
        "no image file rewritten",
        &a,
    );
    let after = Step::of(&run, "after");
    check(
        &run,
        after.code == 0 && after.out == ["root:x:0:0:root:/root:/bin/sh"],
        "the next container sees the image's own /etc/passwd",
        &after,
    );
}

#[test]
fn hostile_layers_are_refused_or_contained() {
    let lab = Lab::new();
    let hostile = |name: &str, tar_body: &str| {
        let image = busybox_image(&lab, name);
        image.raw_layer(&lab.tar(&format!("{name}.tar"), tar_body));
        lab.publish(&image, name)
    };
    let dotdot = hostile("dotdot", "add('../../etc/x', data=b'escaped\\n')");
    let hardlink = hostile(
        "hardlink",
        "add('etc/ok', data=b'fine\\n')\nadd('evil', 'hardlink', link='../../../etc/passwd')",
    );
    let symlink = hostile(
        "symlink",
        "add('evil', 'symlink', link='/etc')\nadd('evil/pwned', data=b'pwned\\n')",
    );
    let mut script = String::from("ls -la /etc > /tmp/etc.before\n");
    script += &r(
        "dotdot",
        &format!("hull run --rm {} echo must-not-run", dotdot.reference),
    );
    script += &r(
        "hardlink",
        &format!("hull run --rm {} echo must-not-run", hardlink.reference),
    );
    script += &r(
        "symlink",
        &format!(
            "hull run --rm {} sh -c 'echo link=$(readlink /evil); echo pwned=$(cat /etc/pwned)'",
            symlink.reference
        ),
    );
    let _ = write!(
        script,
        "ls -la /etc > /tmp/etc.after\n{}",
        r(
            "host",
            "cmp /tmp/etc.before /tmp/etc.after && echo etc-unchanged; \
             ls /etc/x /etc/pwned /x /pwned 2>&1; \
             ls /var/lib/hull/images/*/"
        )
    );
    let run = lab.boot(&script);

    let d = Step::of(&run, "dotdot");
    check(
        &run,
        d.code == 125,
        "[dotdot] should be refused with 125",
        &d,
    );
    check(&run, !d.has_out("must-not-run"), "nothing ran", &d);
    check(
        &run,
        d.err_text()
            .contains("entry '../../etc/x': path escapes the root"),
        "the error names the entry and why",
        &d,
    );
    let h = Step::of(&run, "hardlink");
    check(
        &run,
        h.code == 125,
        "[hardlink] should be refused with 125",
        &h,
    );
    check(
        &run,
        h.err_text()
            .contains("hardlink target '../../../etc/passwd' escapes the root"),
        "the error names the link target and why",
        &h,
    );
    let s = Step::of(&run, "symlink");
    let contained =
        s.code == 0 && s.out_value("link") == Some("/etc") && s.out_value("pwned") == Some("pwned");
    let refused = s.code == 125 && s.err_text().contains("evil");
    check(
        &run,
        contained || refused,
        "evil/pwned through `evil -> /etc` must land in the image's own /etc (or be refused)",
        &s,
    );
    let host = Step::of(&run, "host");
    check(
        &run,
        host.has_out("etc-unchanged"),
        "the emulated host's /etc is untouched",
        &host,
    );
    // The failed builds left no image disk behind (a later run must not
    // start from half an image).
    for (pulled, what) in [(&dotdot, "dotdot"), (&hardlink, "hardlink")] {
        let disk_line = format!("{STORE_IN_HOST}/images/{}/:", pulled.hex());
        let listing: Vec<&String> = host
            .out
            .iter()
            .skip_while(|l| **l != disk_line)
            .skip(1)
            .take_while(|l| !l.ends_with(':'))
            .collect();
        check(
            &run,
            !listing
                .iter()
                .any(|l| l.starts_with("rootfs-") || l.starts_with("rootfs.building")),
            &format!("no image disk is kept for the refused {what} image"),
            &host,
        );
    }
}

#[test]
fn an_archive_whose_manifest_does_not_match_its_digest_is_refused() {
    let lab = Lab::new();
    let image = busybox_image(&lab, "badmanifest");
    run_umoci_gc(&image);
    let digest = image.manifest_digest();
    let blob = image.blob_file(&digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes.extend_from_slice(b"\n\n");
    std::fs::write(&blob, bytes).unwrap();
    let archive = lab.dir.path().join("bad.oci.tar");
    common::run_checked(
        Command::new("tar")
            .arg("-C")
            .arg(&image.layout)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
    );
    let out = lab.hull(&["load", "-i", archive.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("hull load: {}\n{stderr}", out.status);
    assert!(!out.status.success(), "hull load accepted it: {stderr}");
    assert!(
        stderr.contains(&digest) && stderr.contains("does not match"),
        "the error should name the digest {digest}: {stderr}"
    );
    let images = lab.hull(&["images", "-q"]);
    assert!(
        images.stdout.is_empty(),
        "an image was stored anyway: {images:?}"
    );
}

fn run_umoci_gc(image: &OciImage) {
    common::run_checked(
        Command::new("umoci")
            .args(["gc", "--layout"])
            .arg(&image.layout),
    );
}

#[test]
fn a_blob_tampered_with_in_the_registry_is_refused_by_pull() {
    let lab = Lab::new();
    let image = busybox_image(&lab, "tampered");
    let reference = image.push(&lab.registry, "tampered");
    let layer = image.manifest()["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    // Same size, different content: only the digest can tell.
    let file = lab.registry.blob_file(&layer);
    let mut bytes = std::fs::read(&file)
        .unwrap_or_else(|e| panic!("the registry has no {}: {e}", file.display()));
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    let out = lab.hull(&["pull", &reference]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("hull pull: {}\n{stderr}", out.status);
    assert!(!out.status.success(), "hull pull accepted it: {stderr}");
    assert!(
        stderr.contains(&layer),
        "the error should name the layer digest {layer}: {stderr}"
    );
    let blob = lab
        .store
        .join("blobs/sha256")
        .join(&layer["sha256:".len()..]);
    assert!(!blob.exists(), "the tampered blob was stored");
    let images = lab.hull(&["images", "-q"]);
    assert!(
        images.stdout.is_empty(),
        "an image was stored anyway: {images:?}"
    );
}

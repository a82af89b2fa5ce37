//! Real images behave as they do under docker: the guest kernel's interfaces
//! (dnotify, inotify, fanotify, io_uring, netfilter, bridges, namespaces,
//! loop devices, SysV IPC, `/proc/config.gz`), overlay inode numbers, and the
//! container's view (docker's `/dev`, `/proc` masks, read-only `/sys`, the
//! capability set, rlimits, cgroup limits, `--init`, `--stop-signal`,
//! `--user` with supplementary groups, `TZ`).
//!
//! A Debian 12 image is built here with debootstrap (minbase plus a few
//! packages, ~45 s) and cached as an oci-archive under
//! `${HULL_CACHE_DIR:-~/.cache/hull}/images/`, keyed by its recipe (package
//! list, user setup) and the debootstrap version. The mirror is the one apt
//! uses on this machine (`/etc/apt/sources.list.d/debian.sources`).
//!
//! Each test is one emulated-host boot running many containers; every check
//! prints `@NAME VALUE` lines that the test then asserts on.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use common::{run_checked, EmulatedHost, HostRun};

/// Packages on top of debootstrap's minbase.
const DEBIAN_PACKAGES: &[&str] = &["python3", "procps", "iproute2", "iptables", "tzdata"];
/// Run in the image's root after debootstrap (part of the cache key).
const DEBIAN_SETUP: &str = "useradd -m -u 1000 -G audio,video app && \
    apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin";

const PRELUDE: &str = "export PATH=/usr/local/bin:/sbin:/usr/sbin:/bin:/usr/bin \
HULL_KERNEL=/opt/hull/vmlinux\n";

fn cache_dir() -> PathBuf {
    std::env::var_os("HULL_CACHE_DIR").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/hull")
        },
        PathBuf::from,
    )
}

/// The Debian mirror apt uses here (deb822 `URIs:` of the bookworm stanza,
/// else a one-line `deb` entry).
fn debian_mirror() -> String {
    let sources =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    for stanza in sources.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        if field("Suites:").is_some_and(|s| s.split_whitespace().any(|s| s == "bookworm")) {
            if let Some(uri) = field("URIs:").and_then(|u| u.split_whitespace().next()) {
                return uri.to_string();
            }
        }
    }
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    list.lines()
        .filter_map(|l| l.strip_prefix("deb "))
        .filter(|l| l.contains(" bookworm"))
        .find_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("http") || w.starts_with("file:"))
        })
        .map(str::to_string)
        .expect(
            "no bookworm mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list",
        )
}

fn debootstrap_version() -> String {
    let out = run_checked(Command::new("dpkg-query").args(["-W", "-f=${Version}", "debootstrap"]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The Debian 12 image as an oci-archive (`debian:bookworm` inside), built
/// once per recipe and debootstrap version.
fn debian_image() -> PathBuf {
    common::require_tools(&[
        ("debootstrap", "--version", "debootstrap"),
        ("umoci", "--version", "umoci"),
        ("skopeo", "--version", "skopeo"),
    ]);
    let recipe = format!(
        "bookworm minbase {} | {} | debootstrap {}",
        DEBIAN_PACKAGES.join(","),
        DEBIAN_SETUP,
        debootstrap_version()
    );
    let key = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(recipe.as_bytes()))[..16].to_string()
    };
    let dir = cache_dir().join("images");
    let archive = dir.join(format!("debian-bookworm-{key}.tar"));
    if archive.is_file() {
        return archive;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let work = tempfile::Builder::new()
        .prefix("debian-image-")
        .tempdir_in(&dir)
        .unwrap();
    let root = work.path().join("rootfs");
    let t = std::time::Instant::now();
    run_checked(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", DEBIAN_PACKAGES.join(",")))
            .arg("bookworm")
            .arg(&root)
            .arg(debian_mirror()),
    );
    run_checked(
        Command::new("chroot")
            .arg(&root)
            .args(["sh", "-c", DEBIAN_SETUP]),
    );
    let layout = work.path().join("oci");
    let l = layout.to_str().unwrap();
    let tagged = format!("{l}:bookworm");
    run_checked(Command::new("umoci").args(["init", "--layout", l]));
    run_checked(Command::new("umoci").args(["new", "--image", &tagged]));
    run_checked(
        Command::new("umoci")
            .args(["insert", "--image", &tagged])
            .arg(&root)
            .arg("/"),
    );
    run_checked(Command::new("umoci").args([
        "config",
        "--image",
        &tagged,
        "--config.cmd",
        "/bin/bash",
        "--config.env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]));
    run_checked(Command::new("umoci").args(["gc", "--layout", l]));
    let partial = dir.join(format!(".debian-bookworm-{key}.tar.partial"));
    let _ = std::fs::remove_file(&partial);
    run_checked(Command::new("skopeo").args([
        "copy",
        &format!("oci:{tagged}"),
        &format!("oci-archive:{}:debian:bookworm", partial.display()),
    ]));
    std::fs::rename(&partial, &archive).unwrap();
    eprintln!(
        "built {} in {:.1} s",
        archive.display(),
        t.elapsed().as_secs_f64()
    );
    archive
}

/// `@NAME VALUE` lines of the script's output: NAME -> the values, in order.
fn checks(out: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in out.lines() {
        if let Some(rest) = line.trim_end().strip_prefix('@') {
            let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
            map.entry(k.to_string())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    map
}

struct Checks {
    map: BTreeMap<String, Vec<String>>,
    failures: Vec<String>,
}

impl Checks {
    fn new(out: &str) -> Self {
        Self {
            map: checks(out),
            failures: Vec::new(),
        }
    }

    fn get(&self, name: &str) -> String {
        self.map
            .get(name)
            .map_or_else(|| "<missing>".into(), |v| v.join(" | "))
    }

    /// `@name` is exactly `want`.
    fn eq(&mut self, name: &str, want: &str) {
        let got = self.get(name);
        if got != want {
            self.failures
                .push(format!("@{name}: want {want:?}, got {got:?}"));
        }
    }

    /// `@name` holds `want`.
    fn has(&mut self, name: &str, want: &str) {
        let got = self.get(name);
        if !got.contains(want) {
            self.failures.push(format!(
                "@{name}: want something with {want:?}, got {got:?}"
            ));
        }
    }

    /// `@name` does not hold `bad`.
    fn lacks(&mut self, name: &str, bad: &str) {
        let got = self.get(name);
        if got.contains(bad) || got == "<missing>" {
            self.failures
                .push(format!("@{name}: want no {bad:?}, got {got:?}"));
        }
    }
}

/// Checks each part of the output (after its `@@ NAME` marker) with its
/// function; fails with every failed check and the whole output.
/// The checks of one part of the output.
type Part<'a> = (&'a str, &'a dyn Fn(&mut Checks));

fn verify(run: &HostRun, parts: &[Part<'_>]) {
    let out = &run.stdout;
    let mut all = Vec::new();
    for (name, f) in parts {
        let start = out.find(&format!("@@ {name}\n")).unwrap_or(out.len());
        let rest = &out[start..];
        let end = rest
            .get(3..)
            .and_then(|r| r.find("@@ "))
            .map_or(rest.len(), |i| i + 3);
        let mut c = Checks::new(&rest[..end]);
        f(&mut c);
        all.extend(c.failures.into_iter().map(|m| format!("[{name}] {m}")));
    }
    assert!(
        all.is_empty(),
        "{} check(s) failed:\n  {}\n--- emulated host stdout ---\n{}\n--- stderr ---\n{}",
        all.len(),
        all.join("\n  "),
        run.stdout,
        run.stderr
    );
}

/// docker's default capability set, as `/proc/self/status` prints it.
const DOCKER_CAPS: &str = "00000000a80425fb";
/// Every capability of Linux 6.1.
const ALL_CAPS: &str = "000001ffffffffff";
/// docker's /dev (no TTY): `ls -A /dev`.
const DOCKER_DEV: &str =
    "console core fd full mqueue null ptmx pts random shm stderr stdin stdout tty urandom zero";

/// The view every container gets, checked with busybox alone.
const VIEW: &str = r#"
echo "@caps $(grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status | tr -s '\t ' ' ' | tr '\n' ' ')"
echo "@dev $(ls -A /dev | tr '\n' ' ')"
echo "@nofile $(ulimit -n) $(ulimit -Hn)"
echo "@nproc $(nproc)"
echo "@cgroup $(cat /proc/self/cgroup)"
echo "@cpumax $(cat /sys/fs/cgroup/cpu.max)"
echo "@memmax $(cat /sys/fs/cgroup/memory.max)"
echo "@controllers $(cat /sys/fs/cgroup/cgroup.controllers)"
echo "@pid1 $(cat /proc/1/comm)"
echo "@keys $(wc -c < /proc/keys)"
(echo 1 > /proc/sys/net/ipv4/ip_forward) 2>/dev/null && echo "@procsys writable" || echo "@procsys read-only"
mkdir /sys/fs/cgroup/x 2>/dev/null && rmdir /sys/fs/cgroup/x && echo "@cgroupfs writable" || echo "@cgroupfs read-only"
echo "@sys $(awk '$2 == "/sys" {print substr($4, 1, 2)}' /proc/mounts)"
echo "@shm $(df -k /dev/shm | tail -1 | tr -s ' ' | cut -d' ' -f2)"
echo "@mounts $(cut -d' ' -f2,3 /proc/mounts | tr '\n' ',')"
unshare -m true 2>/dev/null && echo "@unshare allowed" || echo "@unshare denied"
"#;

/// Runs `script` (in `sh -c`) in a container with `flags`, printing its lines.
fn container(image: &str, flags: &str, script: &str) -> String {
    format!(
        "hull run --rm --network none {flags} {image} sh -c '{}'\necho \"@rc $?\"\n",
        script.replace('\'', r"'\''")
    )
}

#[test]
fn busybox_containers_see_what_docker_gives() {
    let mut script = String::from(PRELUDE);
    script += "echo '@@ default'\n";
    script += &container("busybox", "", VIEW);
    script += "echo '@@ tuned'\n";
    script += &container(
        "busybox",
        "--cpus 1.5 -m 768m --ulimit nofile=4096:8192 --shm-size 128m --cap-add NET_ADMIN --cap-drop MKNOD --sysctl net.ipv4.ip_forward=1",
        &format!("{VIEW}\necho \"@forward $(cat /proc/sys/net/ipv4/ip_forward)\""),
    );
    script += "echo '@@ privileged'\n";
    script += &container("busybox", "--privileged", VIEW);
    script += "echo '@@ user'\n";
    script += &container("busybox", "--user 1000:1000 --init", VIEW);
    script += "echo '@@ bad flags'\n";
    for bad in [
        "--cap-add NOPE",
        "--ulimit nofile=10:5",
        "--ulimit bogus=1",
        "--sysctl nokey",
        "--shm-size 12x",
        "--stop-signal SIGNOPE",
    ] {
        script += &format!(
            "hull run --rm {bad} busybox true 2>/tmp/err; echo \"@bad $? $(wc -l < /tmp/err) $(ls /var/lib/hull/containers 2>/dev/null | wc -l)\"\n"
        );
    }
    let run = EmulatedHost::new()
        .with_hull_runtime()
        .mem(2048)
        .timeout(500)
        .run(&script);
    run.assert_success();
    verify(
        &run,
        &[
            ("default", &check_default),
            ("tuned", &check_tuned),
            ("privileged", &check_privileged),
            ("user", &check_user),
            ("bad flags", &check_bad_flags),
        ],
    );
}

fn check_default(c: &mut Checks) {
    c.eq("rc", "0");
    c.eq(
        "caps",
        &format!("CapInh: 0000000000000000 CapPrm: {DOCKER_CAPS} CapEff: {DOCKER_CAPS} CapBnd: {DOCKER_CAPS} CapAmb: 0000000000000000"),
    );
    c.eq("dev", DOCKER_DEV);
    c.eq("nofile", "1048576 1048576");
    c.eq("nproc", "1");
    c.eq("cgroup", "0::/");
    c.eq("cpumax", "100000 100000");
    c.eq("memmax", "536870912");
    for ctl in ["cpu", "memory", "pids", "io"] {
        c.has("controllers", ctl);
    }
    c.eq("pid1", "sh");
    c.eq("keys", "0");
    c.eq("procsys", "read-only");
    c.eq("cgroupfs", "read-only");
    c.eq("sys", "ro");
    c.eq("shm", "65536");
    for m in [
        "/ overlay",
        "/proc proc",
        "/dev tmpfs",
        "/dev/pts devpts",
        "/dev/shm tmpfs",
        "/dev/mqueue mqueue",
        "/sys sysfs",
        "/sys/fs/cgroup cgroup2",
        "/proc/keys tmpfs",
        "/proc/timer_list tmpfs",
        "/sys/firmware tmpfs",
        "/proc/sys proc",
    ] {
        c.has("mounts", m);
    }
    c.eq("unshare", "denied");
}

fn check_tuned(c: &mut Checks) {
    c.eq("rc", "0");
    // a80425fb + NET_ADMIN (bit 12) - MKNOD (bit 27).
    c.has("caps", "CapEff: 00000000a00435fb");
    c.has("caps", "CapBnd: 00000000a00435fb");
    c.eq("nofile", "4096 8192");
    c.eq("nproc", "2");
    c.eq("cpumax", "150000 100000");
    c.eq("memmax", "805306368");
    c.eq("shm", "131072");
    c.eq("forward", "1");
}

fn check_privileged(c: &mut Checks) {
    c.eq("rc", "0");
    c.has("caps", &format!("CapEff: {ALL_CAPS}"));
    c.has("caps", &format!("CapBnd: {ALL_CAPS}"));
    c.has("dev", "fuse");
    c.has("dev", "loop-control");
    c.lacks("dev", "vd");
    c.eq("procsys", "writable");
    c.eq("cgroupfs", "writable");
    c.eq("sys", "rw");
    c.eq("unshare", "allowed");
    c.lacks("mounts", "/proc/keys");
}

fn check_user(c: &mut Checks) {
    c.eq("rc", "0");
    c.eq(
        "caps",
        &format!("CapInh: 0000000000000000 CapPrm: 0000000000000000 CapEff: 0000000000000000 CapBnd: {DOCKER_CAPS} CapAmb: 0000000000000000"),
    );
    // --init: hull's reaper is PID 1, the command PID 2.
    c.eq("pid1", "init");
    c.eq("unshare", "denied");
}

fn check_bad_flags(c: &mut Checks) {
    // Exit 125, one line, no container recorded.
    c.eq(
        "bad",
        "125 1 0 | 125 1 0 | 125 1 0 | 125 1 0 | 125 1 0 | 125 1 0",
    );
}

/// Writes `/tmp/t.py`: kernel interfaces, inode numbers, Python's modules.
const DEBIAN_PY: &str = r#"
cat > /tmp/t.py <<'PY'
import ctypes, ctypes.util, errno, fcntl, mmap, os, pty, select, signal, subprocess, threading, time
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
def say(k, v): print("@" + k, v, flush=True)

# stat and readdir agree on inode numbers, in lower, upper and copied-up dirs.
os.makedirs("/etc/hull-new/sub", exist_ok=True)
open("/usr/share/hull-copyup", "w").close()
bad = 0; seen = 0
mounts = {l.split()[1] for l in open("/proc/self/mounts")}
for d in ["/", "/etc", "/usr", "/usr/bin", "/usr/share", "/usr/lib", "/var", "/etc/hull-new", "/tmp"]:
    for e in os.scandir(d):
        st = os.stat(e.path, follow_symlinks=False)
        if e.path in mounts:
            continue  # a mount point: stat sees the mounted root, as anywhere
        seen += 1
        if e.inode() != st.st_ino:
            bad += 1
            if bad < 5: say("inode-mismatch", "%s %d %d" % (e.path, e.inode(), st.st_ino))
    if os.stat(d).st_ino != os.stat(d + "/.").st_ino: bad += 1
say("inodes", "%d-mismatched %s" % (bad, "many" if seen > 200 else "few"))
os.link("/etc/hull-new/a", "/etc/hull-new/b") if os.path.exists("/etc/hull-new/a") else None

# dnotify (F_NOTIFY), inotify, io_uring.
got = []
signal.signal(signal.SIGIO, lambda s, f: got.append(s))
fd = os.open("/tmp", os.O_RDONLY)
try:
    fcntl.fcntl(fd, fcntl.F_NOTIFY, fcntl.DN_CREATE | fcntl.DN_MULTISHOT)
    open("/tmp/dn-file", "w").close(); time.sleep(0.2)
    say("dnotify", "ok" if got else "no-signal")
except OSError as e:
    say("dnotify", "error " + errno.errorcode[e.errno])
ifd = libc.inotify_init1(0)
wd = libc.inotify_add_watch(ifd, b"/tmp", 0x100)
open("/tmp/in-file", "w").close()
say("inotify", "ok" if ifd >= 0 and wd >= 0 and len(os.read(ifd, 4096)) >= 16 else "error")
params = (ctypes.c_ubyte * 120)()
r = libc.syscall(425, 4, params)
say("io_uring", "ok" if r >= 0 else "error " + errno.errorcode[ctypes.get_errno()])
FAN_CLASS_NOTIF, FAN_OPEN = 0, 0x20
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
fa = libc.fanotify_init(FAN_CLASS_NOTIF, os.O_RDONLY)
if fa < 0:
    say("fanotify", "error " + errno.errorcode[ctypes.get_errno()])
else:
    libc.fanotify_mark(fa, 1, FAN_OPEN, -100, b"/etc/hostname")
    open("/etc/hostname").close()
    say("fanotify", "ok" if len(os.read(fa, 4096)) >= 24 else "error")

# Python's system modules.
pid = os.fork()
if pid == 0: os._exit(7)
say("py-os", "ok" if os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 7 and os.listdir("/") else "bad")
say("py-subprocess", subprocess.run(["echo", "hi"], capture_output=True, text=True).stdout.strip())
fired = []
signal.signal(signal.SIGALRM, lambda s, f: fired.append(s)); signal.setitimer(signal.ITIMER_REAL, 0.05); time.sleep(0.3)
say("py-signal", "ok" if fired else "bad")
r_, w_ = os.pipe(); os.write(w_, b"x")
say("py-select", "ok" if select.select([r_], [], [], 1)[0] == [r_] and select.epoll() else "bad")
m = mmap.mmap(-1, 1 << 20); m[0:5] = b"hello"
with open("/tmp/mm", "wb") as f: f.write(b"\0" * 4096)
with open("/tmp/mm", "r+b") as f:
    fm = mmap.mmap(f.fileno(), 4096); fm[0:2] = b"ok"; fm.flush()
say("py-mmap", "ok" if m[0:5] == b"hello" and open("/tmp/mm", "rb").read(2) == b"ok" else "bad")
with open("/tmp/lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); fcntl.lockf(f, fcntl.LOCK_UN)
    say("py-fcntl", "ok" if fcntl.fcntl(f, fcntl.F_GETFL) >= 0 else "bad")
pid, master = pty.fork()
if pid == 0:
    os.write(1, b"from-pty\n"); os._exit(0)
data = b""
while True:
    try:
        chunk = os.read(master, 1024)
    except OSError:
        break
    if not chunk: break
    data += chunk
os.waitpid(pid, 0)
say("py-pty", "ok" if b"from-pty" in data else "bad %r" % data)
results = []
lock = threading.Lock()
def work(i):
    with lock: results.append(i)
ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
say("py-threading", "ok" if sorted(results) == list(range(8)) else "bad")
os.system("ipcmk -M 4096 >/dev/null && ipcs -m | grep -c 4096 | sed 's/^/@sysv /'")
mq = ctypes.CDLL(ctypes.util.find_library("rt") or ctypes.util.find_library("c"), use_errno=True)
q = mq.mq_open(b"/hullq", os.O_CREAT | os.O_RDWR, 0o600, None)
say("mqueue", "ok" if q >= 0 else "error " + errno.errorcode[ctypes.get_errno()])
PY
"#;

/// The Debian image: tools, time zones, the user.
const DEBIAN_VIEW: &str = r#"
python3 /tmp/t.py
echo "@ps $(ps -e -o pid=,comm= | tr -s ' ' | tr '\n' ',')"
echo "@top $(top -bn1 | head -3 | grep -c -E '^(top|Tasks|%Cpu)')"
echo "@ip $(ip -o addr show lo | grep -c 'inet 127.0.0.1')"
echo "@df $(df -h / | tail -1 | cut -d' ' -f1)"
echo "@mount $(mount | grep ' on / ' | cut -d' ' -f1-5)"
echo "@config $(zcat /proc/config.gz | grep -c -E '^CONFIG_(DNOTIFY|FANOTIFY|IO_URING|OVERLAY_FS|NF_TABLES|BRIDGE|VETH|FUSE_FS|BLK_DEV_LOOP|HUGETLBFS|USER_NS|CGROUP_BPF|SECCOMP_FILTER)=y')"
echo "@fs $(grep -o -w -E 'hugetlbfs|fuse|overlay|mqueue|cgroup2' /proc/filesystems | sort | tr '\n' ' ')"
echo "@tz $(TZ=Asia/Tokyo date +%Z) $(date +%Z)"
ln -sf /usr/share/zoneinfo/Europe/Paris /etc/localtime
echo "@localtime $(date -d 2024-01-15T12:00:00Z +%Z)"
echo "@id $(id)"
"#;

/// What needs privileges: nested namespaces, bridges, netfilter, loop.
const DEBIAN_PRIVILEGED: &str = r#"
echo "@caps $(grep CapEff /proc/self/status | tr -s '\t ' ' ')"
unshare -n sh -c 'ip -o link | wc -l' | sed 's/^/@unshare-n /'
unshare -m sh -c 'mkdir -p /mnt/n && mount -t tmpfs n /mnt/n && unshare -m sh -c "mount -t tmpfs m /mnt/n && echo nested"' | sed 's/^/@unshare-m /'
unshare -U -r id -u | sed 's/^/@userns /'
ip link add br0 type bridge && ip link add v0 type veth peer name v1 && ip link set v0 master br0 && echo "@bridge ok"
iptables -A INPUT -p tcp --dport 9 -j DROP && iptables -t nat -A POSTROUTING -o br0 -j MASQUERADE && iptables -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT && echo "@iptables $(iptables-save | grep -c -E 'DROP|MASQUERADE|ctstate')"
truncate -s 8M /tmp/img && losetup -f --show /tmp/img | sed 's/^/@loop /'
python3 /tmp/t.py 2>&1 | grep fanotify
"#;

#[test]
fn a_debian_image_behaves_as_under_docker() {
    let archive = debian_image();
    let img = "debian:bookworm";
    let mut script = String::from(PRELUDE);
    script += "hull load -i /opt/debian.tar >/dev/null && echo '@loaded'\n";
    script += "echo '@@ default'\n";
    script += &container(img, "", &format!("{DEBIAN_PY}{DEBIAN_VIEW}"));
    script += "echo '@@ privileged'\n";
    // The privileged run needs the python script of the default one.
    script += &container(
        img,
        "--privileged",
        &format!("{DEBIAN_PY}{DEBIAN_PRIVILEGED}"),
    );
    script += "echo '@@ user'\n";
    script += &container(
        img,
        "--user app",
        r#"echo "@id $(id)"; echo "@caps $(grep CapEff /proc/self/status | tr -s '\t ' ' ')""#,
    );
    script += "echo '@@ exec'\n";
    script += "hull run -d --network none --name svc --stop-signal USR1 debian:bookworm bash -c 'trap \"echo got-usr1; exit 0\" USR1; while :; do sleep 0.2; done' >/dev/null\n";
    script += "hull exec svc sh -c 'echo \"@exec-caps $(grep CapEff /proc/self/status | tr -s \"\\t \" \" \")\"; echo \"@exec-cgroup $(cat /proc/self/cgroup)\"; echo \"@exec-ps $(ps -e -o pid=,comm= | tr -s \" \" | tr \"\\n\" \",\")\"; echo \"@exec-nofile $(ulimit -n)\"'\n";
    script += "t0=$(date +%s); hull stop -t 30 svc >/dev/null; echo \"@stop $? $(( $(date +%s) - t0 ))\"\n";
    script += "echo \"@stop-log $(hull logs svc 2>&1)\"\n";
    script += "echo \"@stop-code $(hull wait svc)\"\n";
    let run = EmulatedHost::new()
        .with_hull_runtime()
        .file(&archive, "/opt/debian.tar")
        .mem(3072)
        .timeout(900)
        .run(&script);
    run.assert_success();
    verify(
        &run,
        &[
            ("default", &|c: &mut Checks| {
                c.eq("rc", "0");
                c.eq("inodes", "0-mismatched many");
                c.eq("dnotify", "ok");
                c.eq("inotify", "ok");
                c.eq("io_uring", "ok");
                // Without CAP_SYS_ADMIN, as under docker.
                c.eq("fanotify", "error EPERM");
                for m in [
                    "py-os",
                    "py-signal",
                    "py-select",
                    "py-mmap",
                    "py-fcntl",
                    "py-pty",
                    "py-threading",
                    "mqueue",
                ] {
                    c.eq(m, "ok");
                }
                c.eq("py-subprocess", "hi");
                c.eq("sysv", "1");
                c.has("ps", "1 sh,");
                c.lacks("ps", "init");
                c.eq("top", "3");
                c.eq("ip", "1");
                c.eq("df", "overlay");
                c.has("mount", "overlay on / type overlay");
                c.eq("config", "13");
                c.eq("fs", "cgroup2 fuse hugetlbfs mqueue overlay");
                c.eq("tz", "JST UTC");
                c.eq("localtime", "CET");
                c.eq("id", "uid=0(root) gid=0(root) groups=0(root)");
            }),
            ("privileged", &|c: &mut Checks| {
                c.eq("rc", "0");
                c.eq("caps", &format!("CapEff: {ALL_CAPS}"));
                c.eq("unshare-n", "1");
                c.eq("unshare-m", "nested");
                c.eq("userns", "0");
                c.eq("bridge", "ok");
                c.eq("iptables", "3");
                c.has("loop", "/dev/loop");
                c.eq("fanotify", "ok");
            }),
            ("user", &|c: &mut Checks| {
                c.eq("rc", "0");
                c.eq(
                    "id",
                    "uid=1000(app) gid=1000(app) groups=1000(app),29(audio),44(video)",
                );
                c.eq("caps", "CapEff: 0000000000000000");
            }),
            ("exec", &|c: &mut Checks| {
                c.eq("exec-caps", &format!("CapEff: {DOCKER_CAPS}"));
                c.eq("exec-cgroup", "0::/");
                c.has("exec-ps", "1 bash,");
                c.eq("exec-nofile", "1048576");
                c.has("stop", "0 ");
                c.eq("stop-log", "got-usr1");
                c.eq("stop-code", "0");
            }),
        ],
    );
}

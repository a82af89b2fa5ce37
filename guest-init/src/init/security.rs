//! The container's confinement, applied in the guest: docker's view of the
//! system for the container's processes (their own mount, pid and cgroup
//! namespaces, a fresh `/proc` with docker's masked and read-only paths, the
//! container's cgroup at `/sys/fs/cgroup`), their capabilities and rlimits,
//! the kernel parameters, and `--init`'s reaper. The hull init itself stays
//! outside (the VM's namespaces, every capability).
//!
//! The init's side runs before the main process ([`prepare`]); the child's
//! side runs after the fork, before `execve` ([`enter`], [`drop_privileges`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use crate::command::StartError;
use crate::security::{cap_mask, sysctl_path, Ulimit, CAPABILITIES, RLIMITS};
use crate::spec::SecuritySpec;
use crate::sys;

/// The container's cgroup, below the VM's root cgroup.
pub const CGROUP: &str = "/sys/fs/cgroup/container";

/// docker's masked paths (moby `oci/defaults.go`): a file gets `/dev/null`
/// over it, a directory an empty read-only tmpfs.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// docker's read-only paths.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// What the init keeps to put later processes into the container.
#[derive(Debug, Default)]
struct Container {
    /// The container cgroup's `cgroup.procs`, open for writing.
    procs: Option<OwnedFd>,
    /// The main process's mount namespace.
    mnt: Option<OwnedFd>,
    /// The main process's cgroup namespace.
    cgroup_ns: Option<OwnedFd>,
}

static CONTAINER: Mutex<Option<Container>> = Mutex::new(None);

fn with_container<T>(f: impl FnOnce(&mut Container) -> T) -> T {
    let mut guard = CONTAINER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(guard.get_or_insert_with(Container::default))
}

fn runtime(what: &str, e: &io::Error) -> StartError {
    StartError::new(125, format!("{what}: {e}"))
}

fn write_file(path: &str, value: &str) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| io::Write::write_all(&mut f, value.as_bytes()))
}

/// The init's preparation, after the switch to the container's root: the
/// kernel parameters, the container's cgroup (controllers enabled, the
/// memory and CPU limits the VM has), and the init's own protection from
/// the OOM killer. Returns notes for what was skipped.
///
/// # Errors
/// A `--sysctl` could not be set, or the cgroup could not be made.
pub fn prepare(spec: &SecuritySpec) -> Result<Vec<String>, StartError> {
    let mut notes = Vec::new();
    for (key, value) in &spec.sysctls {
        write_file(&sysctl_path(key), value)
            .map_err(|e| StartError::new(125, format!("sysctl {key}={value}: {e}")))?;
    }
    // The init must outlive whatever the container does with memory; its
    // children start from 0 again (raising the score needs no privilege).
    if let Err(e) = write_file("/proc/self/oom_score_adj", "-1000") {
        notes.push(format!("oom_score_adj: {e}"));
    }
    sys::mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(|e| runtime("mount cgroup2 on /sys/fs/cgroup", &e))?;
    let controllers = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .map_err(|e| runtime("read cgroup.controllers", &e))?;
    for c in controllers.split_whitespace() {
        if let Err(e) = write_file("/sys/fs/cgroup/cgroup.subtree_control", &format!("+{c}")) {
            notes.push(format!("cgroup controller {c}: {e}"));
        }
    }
    match std::fs::create_dir(CGROUP) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(runtime(&format!("mkdir {CGROUP}"), &e));
        }
        _ => {}
    }
    if spec.memory_bytes > 0 {
        write_file(
            &format!("{CGROUP}/memory.max"),
            &spec.memory_bytes.to_string(),
        )
        .map_err(|e| runtime("set memory.max", &e))?;
    }
    if spec.cpu_millis > 0 {
        let quota = spec.cpu_millis.saturating_mul(100);
        write_file(&format!("{CGROUP}/cpu.max"), &format!("{quota} 100000"))
            .map_err(|e| runtime("set cpu.max", &e))?;
    }
    let procs = sys::open(
        c"/sys/fs/cgroup/container/cgroup.procs",
        libc::O_WRONLY | libc::O_CLOEXEC,
        0,
    )
    .map_err(|e| runtime("open the container's cgroup.procs", &e))?;
    with_container(|c| c.procs = Some(procs));
    Ok(notes)
}

/// How a process enters the container, decided before the fork.
#[derive(Debug, Clone)]
pub enum Entry {
    /// The main process: new mount and cgroup namespaces (the init made a
    /// new pid namespace for it), with the container's own `/proc` and
    /// `/sys/fs/cgroup`.
    Create {
        /// `--privileged`: no masks, `/sys` and the cgroup tree writable.
        privileged: bool,
    },
    /// An exec'd process: the main process's namespaces.
    Join {
        /// Its mount namespace.
        mnt: RawFd,
        /// Its cgroup namespace.
        cgroup_ns: RawFd,
    },
}

/// What the child applies to itself (descriptors stay owned by the init).
#[derive(Debug, Clone)]
pub struct Confinement {
    /// How it enters the container.
    pub entry: Entry,
    /// The container cgroup's `cgroup.procs`.
    pub cgroup_procs: Option<RawFd>,
    /// Capability mask (effective, permitted and bounding set).
    pub caps: u64,
    /// `(RLIMIT_*, soft, hard)`.
    pub rlimits: Vec<(u32, u64, u64)>,
    /// `--init`: the child becomes a reaper and the command its child.
    pub reaper: bool,
}

fn rlimits(ulimits: &[Ulimit]) -> Vec<(u32, u64, u64)> {
    ulimits
        .iter()
        .filter_map(|u| {
            RLIMITS
                .iter()
                .find(|(n, _)| *n == u.name)
                .map(|(_, r)| (*r, u.soft, u.hard))
        })
        .collect()
}

/// The confinement of the main process.
#[must_use]
pub fn for_main(spec: &SecuritySpec) -> Confinement {
    Confinement {
        entry: Entry::Create {
            privileged: spec.privileged,
        },
        cgroup_procs: with_container(|c| c.procs.as_ref().map(AsRawFd::as_raw_fd)),
        caps: cap_mask(&spec.capabilities),
        rlimits: rlimits(&spec.ulimits),
        reaper: spec.init,
    }
}

/// The confinement of an exec'd process: the main process's namespaces,
/// the container's capabilities and limits.
///
/// # Errors
/// The main process's namespaces are not known (it never started).
pub fn for_exec(spec: &SecuritySpec) -> Result<Confinement, StartError> {
    let (mnt, cgroup_ns, procs) = with_container(|c| {
        (
            c.mnt.as_ref().map(AsRawFd::as_raw_fd),
            c.cgroup_ns.as_ref().map(AsRawFd::as_raw_fd),
            c.procs.as_ref().map(AsRawFd::as_raw_fd),
        )
    });
    let (Some(mnt), Some(cgroup_ns)) = (mnt, cgroup_ns) else {
        return Err(StartError::new(125, crate::init::events::NOT_RUNNING));
    };
    Ok(Confinement {
        entry: Entry::Join { mnt, cgroup_ns },
        cgroup_procs: procs,
        caps: cap_mask(&spec.capabilities),
        rlimits: rlimits(&spec.ulimits),
        reaper: false,
    })
}

/// In the init, before forking the main process: later children go into a
/// new pid namespace, whose PID 1 the main process will be.
///
/// # Errors
/// The namespace could not be made.
pub fn new_pid_namespace() -> Result<(), StartError> {
    // SAFETY: plain call.
    sys::check(unsafe { libc::unshare(libc::CLONE_NEWPID) })
        .map(|_| ())
        .map_err(|e| runtime("unshare the pid namespace", &e))
}

/// In the init, once the main process runs: keeps its namespaces for the
/// processes exec'd later.
///
/// # Errors
/// They could not be opened.
pub fn record_main(pid: libc::pid_t) -> Result<(), StartError> {
    let open = |ns: &str| {
        let p = format!("/proc/{pid}/ns/{ns}");
        let c = sys::cstr(p.as_bytes()).map_err(|e| runtime(&p, &e))?;
        sys::open(&c, libc::O_RDONLY | libc::O_CLOEXEC, 0).map_err(|e| runtime(&p, &e))
    };
    let mnt = open("mnt")?;
    let cgroup_ns = open("cgroup")?;
    with_container(|c| {
        c.mnt = Some(mnt);
        c.cgroup_ns = Some(cgroup_ns);
    });
    Ok(())
}

fn os(what: &str) -> String {
    format!(
        "{what}: {}",
        crate::command::os_message(&io::Error::last_os_error())
    )
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    sys::mount(src, target, fstype, flags, data)
        .map_err(|e| format!("mount {target}: {}", crate::command::os_message(&e)))
}

/// docker's masks and read-only paths on the container's fresh `/proc` and `/sys`.
fn mask_paths() -> Result<(), String> {
    for path in MASKED_PATHS {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            continue;
        };
        if meta.is_dir() {
            mount("tmpfs", path, "tmpfs", libc::MS_RDONLY, Some("size=0"))?;
        } else {
            mount("/dev/null", path, "", libc::MS_BIND, None)?;
        }
    }
    for path in READONLY_PATHS {
        if std::fs::symlink_metadata(path).is_err() {
            continue;
        }
        mount(path, path, "", libc::MS_BIND | libc::MS_REC, None)?;
        mount(
            path,
            path,
            "",
            libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
            None,
        )?;
    }
    Ok(())
}

/// In the child, first: into the container's cgroup and namespaces (and,
/// for the main process, its `/proc` and `/sys/fs/cgroup`).
///
/// # Errors
/// A step failed (the message says which).
pub fn enter(c: &Confinement) -> Result<(), String> {
    if let Some(fd) = c.cgroup_procs {
        // SAFETY: the init's open descriptor, inherited by this child.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        sys::write_all(fd, b"0").map_err(|e| format!("join the container's cgroup: {e}"))?;
    }
    match c.entry {
        Entry::Create { privileged } => {
            // SAFETY: plain call.
            if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP) } < 0 {
                return Err(os("unshare the mount and cgroup namespaces"));
            }
            mount("", "/", "", libc::MS_REC | libc::MS_PRIVATE, None)?;
            let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            mount("proc", "/proc", "proc", nosuid, None)?;
            if privileged {
                mount(
                    "",
                    "/sys",
                    "",
                    libc::MS_REMOUNT | libc::MS_BIND | nosuid,
                    None,
                )?;
            } else {
                mask_paths()?;
            }
            if c.cgroup_procs.is_some() {
                let ro = if privileged { 0 } else { libc::MS_RDONLY };
                // The init's own mount of the whole tree comes first (the
                // same file system on the same place would be EBUSY); then
                // the container's, rooted at its cgroup.
                sys::umount("/sys/fs/cgroup", libc::MNT_DETACH)
                    .map_err(|e| format!("umount /sys/fs/cgroup: {e}"))?;
                mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid | ro, None)?;
            }
        }
        Entry::Join { mnt, cgroup_ns } => {
            // SAFETY: namespace descriptors the init keeps open.
            unsafe {
                if libc::setns(cgroup_ns, libc::CLONE_NEWCGROUP) < 0 {
                    return Err(os("join the container's cgroup namespace"));
                }
                if libc::setns(mnt, libc::CLONE_NEWNS) < 0 {
                    return Err(os("join the container's mount namespace"));
                }
            }
        }
    }
    let _ = write_file("/proc/self/oom_score_adj", "0");
    Ok(())
}

/// In the child, before the user changes: the resource limits, and the
/// bounding set cut to the container's capabilities.
///
/// # Errors
/// A limit or the bounding set could not be set.
pub fn limit(c: &Confinement) -> Result<(), String> {
    for &(resource, soft, hard) in &c.rlimits {
        let lim = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        let name = RLIMITS
            .iter()
            .find(|(_, r)| *r == resource)
            .map_or("?", |(n, _)| n);
        // SAFETY: valid rlimit; the resource number comes from RLIMITS.
        if unsafe { libc::setrlimit(resource as _, &lim) } == 0 {
            continue;
        }
        let err = os(&format!("setrlimit {name}"));
        // docker's defaults are best effort where the init itself is
        // limited (never in the guest: there it has every privilege; in the
        // init's tests on a host, maybe): at most what it has. A --ulimit
        // given by the user must hold.
        let is_default = crate::security::default_ulimits()
            .iter()
            .any(|d| d.name == name && d.soft == soft && d.hard == hard);
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out pointer.
        if !is_default || unsafe { libc::getrlimit(resource as _, &mut cur) } < 0 {
            return Err(err);
        }
        let clamped = libc::rlimit {
            rlim_cur: soft.min(cur.rlim_max),
            rlim_max: cur.rlim_max,
        };
        // SAFETY: valid rlimit.
        if unsafe { libc::setrlimit(resource as _, &clamped) } < 0 {
            return Err(err);
        }
    }
    for (n, _) in CAPABILITIES.iter().enumerate() {
        if c.caps & (1 << n) == 0 {
            // SAFETY: plain prctl.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, n, 0, 0, 0) } < 0 {
                return Err(os("drop from the capability bounding set"));
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// In the child, after the user changed: root keeps exactly the container's
/// capabilities (effective and permitted; none inheritable or ambient); any
/// other user has none (the kernel cleared them at `setuid`), as under docker.
///
/// # Errors
/// `capset` failed.
pub fn drop_privileges(c: &Confinement) -> Result<(), String> {
    // SAFETY: plain prctl.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // SAFETY: plain call.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    #[allow(clippy::cast_possible_truncation)]
    let data = [
        CapData {
            effective: c.caps as u32,
            permitted: c.caps as u32,
            inheritable: 0,
        },
        CapData {
            effective: (c.caps >> 32) as u32,
            permitted: (c.caps >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset with a v3 header and two data words, as the kernel takes them.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if r < 0 {
        return Err(os("capset"));
    }
    Ok(())
}

/// `--init`: forks; the child returns (and goes on to run the command), this
/// process becomes the container's reaper and never returns: it forwards
/// every signal to the command, reaps every process, and exits as the
/// command did (128+N when signal N ended it, as tini does).
/// `close` are descriptors of the command's (its stdio, the status pipe)
/// that the reaper must not hold open; `drop` gives the reaper the
/// command's user and capabilities (it exits 125 when that fails).
pub fn become_reaper(close: &[RawFd], drop: impl FnOnce() -> bool) {
    // SAFETY: plain signal calls on valid sets; fork in a single-threaded
    // child of the init; closing our copies of the command's descriptors.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_BLOCK, &all, &mut old);
        let pid = libc::fork();
        if pid == 0 {
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            return;
        }
        for &fd in close {
            libc::close(fd);
        }
        if pid < 0 {
            libc::_exit(125);
        }
        if !drop() {
            libc::kill(pid, libc::SIGKILL);
            libc::_exit(125);
        }
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigwaitinfo(&all, &mut info);
            if sig < 0 {
                continue;
            }
            if sig != libc::SIGCHLD {
                libc::kill(pid, sig);
                continue;
            }
            loop {
                let mut status = 0;
                let r = libc::waitpid(-1, &mut status, libc::WNOHANG);
                if r <= 0 {
                    break;
                }
                if r == pid {
                    libc::_exit(crate::init::events::exit_code(status));
                }
            }
        }
    }
}

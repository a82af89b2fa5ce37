//! The VMM's jail, as Firecracker's jailer builds one: what `hull __vmm`
//! becomes once its VM is built (every host file it needs is open, every
//! socket connected) and before the guest runs.
//!
//! - PID namespace (made by the monitor's `clone`: the VMM is its PID 1, see
//!   [`crate::vmmproc::spawn`]); new mount, IPC, UTS and network namespaces
//!   (the network backend is a socket it already holds);
//! - its root is an empty, read-only tmpfs mounted on `<container>/jail`
//!   (`pivot_root`, the old root detached; on a host whose root is the
//!   initial ramfs, where `pivot_root` is impossible, the tmpfs is moved onto
//!   `/` and `chroot`ed into, which holds without `CAP_SYS_CHROOT`);
//! - as root: the container's own uid and gid ([`jail_id`]: `JAIL_ID_BASE`
//!   plus the id's first 6 hex digits), no supplementary groups; rootless:
//!   root of a user namespace of its own that maps only the user (no
//!   capability outside it);
//! - no capabilities at all (bounding, ambient, effective, permitted,
//!   inheritable), `no_new_privs`, not dumpable;
//! - rlimits: `RLIMIT_NOFILE` just above what it holds, `RLIMIT_FSIZE` the
//!   largest file it writes (its writable disks, the console log),
//!   `RLIMIT_NPROC` its threads (as root: its uid is its own), no core dumps;
//! - cgroup v2 `cpu.max` and `memory.max` from `--cpus`/`--memory` plus the
//!   VMM's overhead, where the host has a cgroup2 hierarchy with those
//!   controllers and hull is root (skipped otherwise: see the debug log).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The first uid/gid of jailed VMMs started by root: each container's VMM
/// gets `JAIL_ID_BASE + (first 6 hex digits of its id)`, so that no two
/// VMMs (and no other process) share a uid: none can signal or trace
/// another. 0x7000_0000 is far above any distribution's or subuid range.
pub const JAIL_ID_BASE: u32 = 0x7000_0000;
/// The exit status of a VMM killed by its seccomp filter.
pub const EXIT_SECCOMP: i32 = vmm::seccomp::EXIT_SECCOMP;
/// Memory the VMM itself needs beyond guest RAM (its own heap, queues,
/// page tables, device buffers) in the cgroup's `memory.max`.
const VMM_OVERHEAD_MIB: u64 = 128;
/// The cgroup under the cgroup2 root that holds hull's VMMs.
const CGROUP_PARENT: &str = "hull";
/// `cpu.max`'s period (µs).
const CPU_PERIOD_US: u64 = 100_000;
/// Descriptors the VMM may still open once jailed (one per vCPU, epoll and
/// eventfds made when it starts running).
const SPARE_FDS: u64 = 32;
/// Threads beyond one per vCPU (event loop, vCPU stopper, commands).
const SPARE_THREADS: u64 = 8;

/// How a VMM is confined, decided by the monitor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JailPlan {
    /// The empty directory the jail's root is mounted on.
    pub root: PathBuf,
    /// The uid and gid to become (hull runs as root); `None`: rootless.
    pub ids: Option<(u32, u32)>,
    /// The cgroup to create, if any.
    pub cgroup: Option<CgroupPlan>,
}

/// A cgroup for one VMM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CgroupPlan {
    /// The cgroup2 mount.
    pub mount: PathBuf,
    /// Its name under [`CGROUP_PARENT`].
    pub name: String,
    /// `memory.max` in bytes.
    pub memory_max: u64,
    /// `cpu.max` quota in µs per [`CPU_PERIOD_US`].
    pub cpu_quota_us: u64,
}

/// Whether the jail is on (`HULL_JAIL=off` turns it off; for developers,
/// e.g. to measure it).
#[must_use]
pub fn enabled() -> bool {
    !std::env::var("HULL_JAIL").is_ok_and(|v| v == "off" || v == "0")
}

/// The uid and gid of container `id`'s VMM when hull runs as root.
#[must_use]
pub fn jail_id(id: &str) -> u32 {
    let digits: String = id.chars().take(6).collect();
    JAIL_ID_BASE + u32::from_str_radix(&digits, 16).unwrap_or(0)
}

/// The plan for a container's VMM: its jail root (`dir`/jail, created empty
/// here), its ids and its cgroup.
///
/// # Errors
/// The directory could not be made.
pub fn plan(dir: &Path, id: &str, memory_mib: u64, cpu_millis: u64) -> std::io::Result<JailPlan> {
    let root = dir.join("jail");
    std::fs::create_dir_all(&root)?;
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let ids = root_user.then(|| (jail_id(id), jail_id(id)));
    let cgroup = if root_user {
        cgroup2_mount().map(|mount| CgroupPlan {
            mount,
            name: id.chars().take(12).collect(),
            memory_max: (memory_mib + VMM_OVERHEAD_MIB) << 20,
            // The vCPUs' share, plus half a CPU for the device loop.
            cpu_quota_us: cpu_millis.max(1) * CPU_PERIOD_US / 1000 + CPU_PERIOD_US / 2,
        })
    } else {
        tracing::debug!("jail: rootless, no cgroup limits (no delegated cgroup is used)");
        None
    };
    Ok(JailPlan { root, ids, cgroup })
}

/// Where the cgroup2 hierarchy is mounted, if anywhere.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let found = info.lines().find_map(|l| {
        let (head, tail) = l.split_once(" - ")?;
        tail.starts_with("cgroup2 ")
            .then(|| head.split(' ').nth(4).map(PathBuf::from))
            .flatten()
    });
    if found.is_none() {
        tracing::debug!("jail: no cgroup2 hierarchy mounted: no cgroup limits");
    }
    found
}

/// A VMM's cgroup, removed when the VMM is gone.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Makes `plan`'s cgroup with the limits the host's controllers allow
    /// and moves `pid` into it; `None` (and a debug line) where the host has
    /// no such controllers or it could not be made.
    #[must_use]
    pub fn place(plan: &JailPlan, pid: libc::pid_t) -> Option<Self> {
        let c = plan.cgroup.as_ref()?;
        match Self::try_place(c, pid) {
            Ok(Some(cgroup)) => Some(cgroup),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!("jail: no cgroup limits: {e}");
                None
            }
        }
    }

    fn try_place(c: &CgroupPlan, pid: libc::pid_t) -> std::io::Result<Option<Self>> {
        let available = std::fs::read_to_string(c.mount.join("cgroup.controllers"))?;
        let has = |name: &str| available.split_whitespace().any(|w| w == name);
        let wanted: Vec<&str> = ["cpu", "memory"].into_iter().filter(|n| has(n)).collect();
        if wanted.is_empty() {
            tracing::debug!(
                "jail: the cgroup2 hierarchy has no cpu or memory controller: no cgroup limits"
            );
            return Ok(None);
        }
        let parent = c.mount.join(CGROUP_PARENT);
        std::fs::create_dir_all(&parent)?;
        let enable: String = wanted.iter().map(|n| format!("+{n} ")).collect();
        std::fs::write(c.mount.join("cgroup.subtree_control"), enable.trim())?;
        std::fs::write(parent.join("cgroup.subtree_control"), enable.trim())?;
        let path = parent.join(&c.name);
        // A cgroup left by a VMM that died with its monitor.
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path)?;
        let cgroup = Self { path };
        if wanted.contains(&"memory") {
            std::fs::write(cgroup.path.join("memory.max"), c.memory_max.to_string())?;
            // No swap: guest RAM that does not fit is an OOM kill, not a crawl.
            let _ = std::fs::write(cgroup.path.join("memory.swap.max"), "0");
        }
        if wanted.contains(&"cpu") {
            std::fs::write(
                cgroup.path.join("cpu.max"),
                format!("{} {CPU_PERIOD_US}", c.cpu_quota_us),
            )?;
        }
        std::fs::write(cgroup.path.join("cgroup.procs"), pid.to_string())?;
        tracing::debug!(
            "jail: cgroup {} ({}): memory.max {} cpu.max {} {CPU_PERIOD_US}",
            cgroup.path.display(),
            wanted.join(" "),
            c.memory_max,
            c.cpu_quota_us
        );
        Ok(Some(cgroup))
    }

    /// Removes the cgroup (its process is gone).
    pub fn remove(self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Limits computed before the jail (files are still reachable then).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `RLIMIT_FSIZE`.
    fsize: u64,
    /// `RLIMIT_NPROC`.
    nproc: u64,
}

impl Limits {
    /// For a VM with these disks and vCPUs.
    #[must_use]
    pub fn for_vm(disks: &[vmm::DiskConfig], cpus: u8) -> Self {
        let largest = disks
            .iter()
            .filter(|d| !d.read_only)
            .filter_map(|d| std::fs::metadata(&d.path).ok())
            .map(|m| m.len())
            .max()
            .unwrap_or(0);
        Self {
            fsize: largest.max(crate::logfile::CONSOLE_CAP + (64 << 10)),
            nproc: u64::from(cpus) + SPARE_THREADS,
        }
    }
}

fn os(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn check(r: libc::c_int, what: &str) -> std::io::Result<()> {
    if r < 0 {
        Err(os(what))
    } else {
        Ok(())
    }
}

fn cpath(p: &Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Enters the jail `plan` describes. The process must have one thread (the
/// namespaces, credentials and limits set here are per thread; every thread
/// started later inherits them).
///
/// # Errors
/// A step failed: the VM must not run half-confined.
pub fn enter(plan: &JailPlan, limits: &Limits) -> std::io::Result<()> {
    let started = std::time::Instant::now();
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(64, std::iter::Iterator::count);
    // SAFETY: plain system calls on valid, NUL-terminated paths and on
    // structures that live across each call.
    unsafe {
        check(
            libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET,
            ),
            "unshare",
        )?;
        let name = b"hull-vmm";
        check(
            libc::sethostname(name.as_ptr().cast(), name.len()),
            "sethostname",
        )?;
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "make the mounts private",
        )?;
        let root = cpath(&plan.root)?;
        check(
            libc::mount(
                c"hull-jail".as_ptr(),
                root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"size=4k,nr_inodes=2,mode=0555".as_ptr().cast(),
            ),
            "mount the jail's root",
        )?;
        check(libc::chdir(root.as_ptr()), "enter the jail's root")?;
        let pivoted = libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0;
        if pivoted {
            // The old root sits under the new one: detach it whole.
            check(
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
                "detach the old root",
            )?;
        } else {
            // The host's root is the initial ramfs: move the jail's root over
            // it and chroot (switch_root's way); without CAP_SYS_CHROOT and
            // with no directory descriptor outside, it cannot be left.
            tracing::debug!(
                "jail: pivot_root refused ({}): chroot into the jail",
                std::io::Error::last_os_error()
            );
            check(
                libc::mount(
                    c".".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_MOVE,
                    std::ptr::null(),
                ),
                "move the jail's root",
            )?;
            check(libc::chroot(c".".as_ptr()), "chroot")?;
        }
        check(libc::chdir(c"/".as_ptr()), "chdir /")?;
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
            "make the jail's root read-only",
        )?;

        let nofile = u64::try_from(open_fds).unwrap_or(64) + SPARE_FDS;
        set_limit(libc::RLIMIT_NOFILE, nofile)?;
        set_limit(libc::RLIMIT_FSIZE, limits.fsize)?;
        set_limit(libc::RLIMIT_CORE, 0)?;
        set_limit(libc::RLIMIT_MEMLOCK, 0)?;
        if plan.ids.is_some() {
            // Counted per uid: this uid is the VMM's alone.
            set_limit(libc::RLIMIT_NPROC, limits.nproc)?;
        } else {
            tracing::debug!("jail: rootless: RLIMIT_NPROC left as is (the user's own count)");
        }

        // The bounding set needs CAP_SETPCAP: before the uid changes.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(os("drop the capability bounding set"));
            }
        }
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ),
            "clear the ambient capabilities",
        )?;
        if let Some((uid, gid)) = plan.ids {
            check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
            check(libc::setresgid(gid, gid, gid), "setresgid")?;
            check(libc::setresuid(uid, uid, uid), "setresuid")?;
        }
        let mut hdr = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) < 0 {
            return Err(os("capset"));
        }
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "no_new_privs",
        )?;
        check(
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0),
            "not dumpable",
        )?;
        // A change of credentials cleared it.
        check(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            "the parent-death signal",
        )?;
    }
    tracing::debug!(
        "jail: entered in {:?} ({}; ids {:?}; nofile {}, fsize {}, nproc {})",
        started.elapsed(),
        plan.root.display(),
        plan.ids,
        open_fds + usize::try_from(SPARE_FDS).unwrap_or(0),
        limits.fsize,
        limits.nproc
    );
    Ok(())
}

fn set_limit(resource: libc::c_int, value: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: a valid rlimit structure.
    check(unsafe { libc::setrlimit(resource, &limit) }, "setrlimit")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// What a jailed process sees of itself, from system calls alone (it
    /// has no /proc).
    fn inside() -> String {
        let mut out = String::new();
        // SAFETY: plain queries on valid out pointers.
        unsafe {
            out += &format!("uid={} gid={} ", libc::getuid(), libc::getgid());
            out += &format!("groups={} ", libc::getgroups(0, std::ptr::null_mut()));
            out += &format!(
                "nnp={} ",
                libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
            );
            let bounding = (0..41)
                .filter(|&c| libc::prctl(libc::PR_CAPBSET_READ, c, 0, 0, 0) == 1)
                .count();
            out += &format!("bounding={bounding} ");
            let mut hdr = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let mut data = [CapData::default(); 2];
            libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr());
            let caps = data
                .iter()
                .map(|d| d.effective | d.permitted | d.inheritable)
                .fold(0, |a, b| a | b);
            out += &format!("caps={caps} ");
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_FSIZE, &mut l);
            out += &format!("fsize={} ", l.rlim_max);
        }
        let root: Vec<_> = std::fs::read_dir("/")
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        out += &format!("root={root:?} ");
        out += &format!("etc={} ", std::path::Path::new("/etc/passwd").exists());
        let made = std::fs::create_dir("/x").map_err(|e| e.raw_os_error());
        out += &format!("mkdir={made:?} ");
        out
    }

    #[test]
    fn a_jailed_process_has_an_empty_root_no_privileges_and_its_own_ids() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: entering the jail as root needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let plan = JailPlan {
            root: dir.path().join("jail"),
            ids: Some((jail_id("abcdef"), jail_id("abcdef"))),
            cgroup: None,
        };
        std::fs::create_dir(&plan.root).unwrap();
        let limits = Limits {
            fsize: 1 << 20,
            nproc: 4,
        };
        let mut fds = [0; 2];
        // SAFETY: room for two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only enters the jail, reports and _exits (musl's
        // fork leaves its allocator usable in the child).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let report = match enter(&plan, &limits) {
                Ok(()) => inside(),
                Err(e) => format!("enter failed: {e}"),
            };
            // SAFETY: writes the report to the pipe, then ends the child.
            unsafe {
                libc::write(fds[1], report.as_ptr().cast(), report.len());
                libc::_exit(0);
            }
        }
        // SAFETY: our end of the pipe, closed once.
        unsafe { libc::close(fds[1]) };
        // SAFETY: the read end, owned here from now on.
        let mut from = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        let mut report = String::new();
        std::io::Read::read_to_string(&mut from, &mut report).unwrap();
        let mut status = 0;
        // SAFETY: our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let id = jail_id("abcdef");
        for want in [
            format!("uid={id} gid={id} "),
            "groups=0 ".into(),
            "nnp=1 ".into(),
            "bounding=0 ".into(),
            "caps=0 ".into(),
            "fsize=1048576 ".into(),
            "root=[] ".into(),
            "etc=false ".into(),
            format!("mkdir=Err(Some({})) ", libc::EROFS),
        ] {
            assert!(report.contains(&want), "{want:?} not in {report:?}");
        }
    }

    #[test]
    fn each_container_has_its_own_ids() {
        assert_eq!(jail_id("000001ff"), JAIL_ID_BASE + 1);
        assert_eq!(jail_id("ffffff00"), JAIL_ID_BASE + 0xff_ffff);
        assert_ne!(jail_id("abcdef12"), jail_id("abcdee12"));
    }
}

//! Container records: what each container is (its config), where it stands
//! (its state), and finding containers by id, id prefix or name.
//!
//! A container lives in `$HULL_ROOT/containers/<id>/`. Its monitor process
//! (which runs the VM) holds an exclusive `flock` on `monitor.lock` for as
//! long as it lives, so a dead monitor (SIGKILL, host reboot) is told apart
//! from a running one without trusting pids. State changes take `state.lock`.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hull_protocol::spec::RunSpec;
use serde::{Deserialize, Serialize};

/// Errors handling container records.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// No container matches.
    #[error("no such container: {0}")]
    NotFound(String),
    /// An id prefix matches several containers.
    #[error("container id prefix {0} is ambiguous: give more digits or the name")]
    Ambiguous(String),
    /// The name is taken.
    #[error("the container name {name:?} is already in use by container {id}: remove it or choose another name")]
    NameInUse {
        /// The name.
        name: String,
        /// The container holding it.
        id: String,
    },
    /// A record file is unreadable.
    #[error("{what} {path}")]
    Io {
        /// What hull was doing.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A record file is corrupt.
    #[error("corrupt container record {path}: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl Fn(std::io::Error) -> ContainerError {
    let path = path.to_path_buf();
    move |source| ContainerError::Io {
        what,
        path: path.clone(),
        source,
    }
}

/// Seconds since the epoch, now.
#[must_use]
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a container is; written once at creation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerConfig {
    /// 64 hex digits.
    pub id: String,
    /// Its name (docker-style: given, or generated).
    pub name: String,
    /// The image as the user named it.
    pub image: String,
    /// The image id (`sha256:...`).
    pub image_id: String,
    /// When it was created (seconds since the epoch).
    pub created: u64,
    /// What the init runs.
    pub spec: RunSpec,
    /// VM memory in MiB.
    pub memory_mib: u64,
    /// VM vCPUs.
    pub cpus: u8,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// Remove the container when it exits.
    pub auto_remove: bool,
    /// How its log rotates (`--log-opt`); records from before it have the defaults.
    #[serde(default)]
    pub log: crate::logfile::LogOptions,
    /// Its network (`--network`, `-p`...); records from before it have none.
    #[serde(default)]
    pub network: Option<crate::network::NetworkConfig>,
    /// Its volumes, bind mounts and tmpfs mounts (in mounting order).
    #[serde(default)]
    pub mounts: Vec<HostMount>,
    /// Its labels (`--label`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Where a container stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Recorded, its VM not started yet.
    Created,
    /// Its VM runs.
    Running,
    /// It ended (see the exit code and error).
    Exited,
}

/// The mutable part of a container's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Where it stands.
    pub status: Status,
    /// The monitor process, while it runs.
    pub pid: Option<u32>,
    /// When the VM started.
    pub started: Option<u64>,
    /// When it ended.
    pub finished: Option<u64>,
    /// The container's exit status.
    pub exit_code: Option<i32>,
    /// Why it ended abnormally, if it did.
    pub error: Option<String>,
    /// When each point of its VM's last start happened, from the VMM's
    /// boot timer (milliseconds since KVM_CREATE_VM).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boot_times: Vec<BootTime>,
}

/// One point of a VM's start (see `vmm::BootTimes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootTime {
    /// What happened: `vm created`, `vcpus started`, `init started`...
    pub point: String,
    /// When, in milliseconds since KVM_CREATE_VM.
    pub ms: f64,
}

impl BootTime {
    /// The points of `times`.
    #[must_use]
    pub fn all(times: &vmm::BootTimes) -> Vec<Self> {
        times
            .points()
            .into_iter()
            .map(|(point, at)| Self {
                point: point.to_string(),
                ms: (at.as_secs_f64() * 1e4).round() / 10.0,
            })
            .collect()
    }

    /// `name N ms, ...`: the points on one line.
    #[must_use]
    pub fn line(times: &[Self]) -> String {
        times
            .iter()
            .map(|t| format!("{} {} ms", t.point, t.ms))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl State {
    /// A fresh, created state.
    #[must_use]
    pub fn created() -> Self {
        Self {
            status: Status::Created,
            pid: None,
            started: None,
            finished: None,
            exit_code: None,
            error: None,
            boot_times: Vec::new(),
        }
    }
}

/// A container on disk.
#[derive(Debug, Clone)]
pub struct Container {
    /// Its directory.
    pub dir: PathBuf,
    /// Its config.
    pub config: ContainerConfig,
}

/// Files of a container directory.
pub mod files {
    /// The config.
    pub const CONFIG: &str = "container.json";
    /// The state.
    pub const STATE: &str = "state.json";
    /// Held by the monitor while it lives.
    pub const MONITOR_LOCK: &str = "monitor.lock";
    /// Taken to change the state.
    pub const STATE_LOCK: &str = "state.lock";
    /// The container's output (rotated to `container.log.1`, `.2`...).
    pub const LOG: &str = "container.log";
    /// The guest kernel's console.
    pub const CONSOLE: &str = "console.log";
    /// The writable layer.
    pub const SCRATCH: &str = "scratch.ext4";
    /// The monitor's own messages.
    pub const MONITOR_LOG: &str = "monitor.log";
}

/// An advisory file lock, released on drop.
#[derive(Debug)]
pub struct Lock(#[allow(dead_code)] File); // held for its flock

impl Lock {
    fn take(path: &Path, blocking: bool) -> Result<Option<Self>, ContainerError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err("cannot open lock", path))?;
        let flags = libc::LOCK_EX | if blocking { 0 } else { libc::LOCK_NB };
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), flags) } == 0 {
                return Ok(Some(Self(file)));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EWOULDBLOCK) if !blocking => return Ok(None),
                _ => return Err(io_err("cannot lock", path)(e)),
            }
        }
    }

    /// Blocks until `path` is locked.
    ///
    /// # Errors
    /// The lock file cannot be opened or locked.
    pub fn exclusive(path: &Path) -> Result<Self, ContainerError> {
        Self::take(path, true)?
            .ok_or_else(|| io_err("cannot lock", path)(std::io::Error::other("busy")))
    }

    /// Locks `path` if nobody holds it.
    ///
    /// # Errors
    /// The lock file cannot be opened.
    pub fn try_exclusive(path: &Path) -> Result<Option<Self>, ContainerError> {
        Self::take(path, false)
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ContainerError> {
    let bytes = fs::read(path).map_err(io_err("cannot read", path))?;
    serde_json::from_slice(&bytes).map_err(|e| ContainerError::Corrupt {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ContainerError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| ContainerError::Corrupt {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    fs::write(&tmp, bytes).map_err(io_err("cannot write", &tmp))?;
    // Renamed into place: a reader sees the old record or the new, never half.
    fs::rename(&tmp, path).map_err(io_err("cannot write", path))
}

impl Container {
    /// A path in the container's directory.
    #[must_use]
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The short id (12 hex digits).
    #[must_use]
    pub fn short_id(&self) -> &str {
        &self.config.id[..12.min(self.config.id.len())]
    }

    /// The recorded state, corrected for a monitor that died without
    /// recording the end: such a container shows as exited with an error.
    ///
    /// # Errors
    /// The state file is unreadable.
    pub fn state(&self) -> Result<State, ContainerError> {
        let mut state: State = read_json(&self.path(files::STATE))?;
        if state.status == Status::Running && !self.monitor_alive()? {
            state.status = Status::Exited;
            state.exit_code.get_or_insert(137);
            state.error.get_or_insert_with(|| {
                "the container's VM monitor died (killed, or the host rebooted)".into()
            });
            state.pid = None;
        }
        Ok(state)
    }

    /// True while the monitor process holds its lock.
    ///
    /// # Errors
    /// The lock file cannot be opened.
    pub fn monitor_alive(&self) -> Result<bool, ContainerError> {
        Ok(Lock::try_exclusive(&self.path(files::MONITOR_LOCK))?.is_none())
    }

    /// Changes the state under the state lock.
    ///
    /// # Errors
    /// The state cannot be read or written.
    pub fn update_state(&self, change: impl FnOnce(&mut State)) -> Result<State, ContainerError> {
        let _lock = Lock::exclusive(&self.path(files::STATE_LOCK))?;
        let mut state: State = read_json(&self.path(files::STATE))?;
        change(&mut state);
        write_json(&self.path(files::STATE), &state)?;
        Ok(state)
    }
}

/// All containers under a store root.
#[derive(Debug, Clone)]
pub struct Containers {
    root: PathBuf,
}

impl Containers {
    /// The containers of the store at `store_root`.
    #[must_use]
    pub fn new(store_root: &Path) -> Self {
        Self {
            root: store_root.join("containers"),
        }
    }

    /// Every container, newest first.
    ///
    /// # Errors
    /// The containers directory is unreadable.
    pub fn list(&self) -> Result<Vec<Container>, ContainerError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("cannot read", &self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            // A directory without a config is one being created or removed.
            if let Ok(config) = read_json::<ContainerConfig>(&dir.join(files::CONFIG)) {
                out.push(Container { dir, config });
            }
        }
        out.sort_by(|a, b| {
            b.config
                .created
                .cmp(&a.config.created)
                .then(a.config.id.cmp(&b.config.id))
        });
        Ok(out)
    }

    /// The container named by `key`: a name, a full id or an unambiguous id prefix.
    ///
    /// # Errors
    /// None or several match.
    pub fn find(&self, key: &str) -> Result<Container, ContainerError> {
        let all = self.list()?;
        if let Some(c) = all
            .iter()
            .find(|c| c.config.name == key || c.config.id == key)
        {
            return Ok(c.clone());
        }
        let matches: Vec<_> = if key.len() >= 3 && key.chars().all(|c| c.is_ascii_hexdigit()) {
            all.into_iter()
                .filter(|c| c.config.id.starts_with(key))
                .collect()
        } else {
            Vec::new()
        };
        match matches.len() {
            0 => Err(ContainerError::NotFound(key.to_string())),
            1 => Ok(matches.into_iter().next().unwrap_or_else(|| unreachable!())),
            _ => Err(ContainerError::Ambiguous(key.to_string())),
        }
    }

    /// Records a new container (config and a `created` state), refusing a
    /// name in use; name checks and creation happen under one lock.
    ///
    /// # Errors
    /// The name is taken or the files cannot be written.
    pub fn create(&self, config: ContainerConfig) -> Result<Container, ContainerError> {
        fs::create_dir_all(&self.root).map_err(io_err("cannot create", &self.root))?;
        let _lock = Lock::exclusive(&self.root.join(".names.lock"))?;
        if let Some(other) = self
            .list()?
            .into_iter()
            .find(|c| c.config.name == config.name)
        {
            return Err(ContainerError::NameInUse {
                name: config.name,
                id: other.config.id,
            });
        }
        let dir = self.root.join(&config.id);
        fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        write_json(&dir.join(files::STATE), &State::created())?;
        write_json(&dir.join(files::CONFIG), &config)?;
        Ok(Container { dir, config })
    }

    /// Removes a container's directory (which must not be running).
    ///
    /// # Errors
    /// The directory cannot be removed.
    pub fn remove(&self, container: &Container) -> Result<u64, ContainerError> {
        // A monitor that was killed leaves its socket behind.
        if let Some(store_root) = self.root.parent() {
            let _ = fs::remove_file(crate::container::socket_path(
                store_root,
                &container.config.id,
            ));
        }
        let size = dir_size(&container.dir);
        match fs::remove_dir_all(&container.dir) {
            // Removed meanwhile (its monitor auto-removes a --rm container).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err("cannot remove", &container.dir)(e)),
            Ok(()) => Ok(size),
        }
    }
}

/// Bytes a directory's files take on disk (sparse files count what they use).
#[must_use]
pub fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// A docker-style random name: adjective_noun.
#[must_use]
pub fn generated_name(id: &str) -> String {
    const ADJ: [&str; 16] = [
        "brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucid", "merry",
        "nifty", "proud", "quirky", "sharp", "tender", "vivid",
    ];
    const NOUN: [&str; 16] = [
        "turing", "hopper", "lovelace", "ritchie", "thompson", "knuth", "dijkstra", "hamilton",
        "liskov", "torvalds", "wozniak", "babbage", "curie", "noether", "shannon", "kay",
    ];
    let byte = |i: usize| usize::from_str_radix(id.get(i..i + 2).unwrap_or("00"), 16).unwrap_or(0);
    format!(
        "{}_{}_{}",
        ADJ[byte(0) % 16],
        NOUN[byte(2) % 16],
        &id[4..8.min(id.len())]
    )
}

/// A fresh random container id (64 hex digits, as docker's).
pub fn new_id() -> Result<String, Box<dyn std::error::Error>> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The socket of a container: short, so it fits `sun_path` under any root.
#[must_use]
pub fn socket_path(store_root: &Path, id: &str) -> PathBuf {
    store_root
        .join("run")
        .join(format!("{}.sock", &id[..12.min(id.len())]))
}

/// One mount as the host records it (in the container's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum HostMount {
    /// A host directory (absolute, symlinks resolved when the container was created).
    Bind {
        /// The host directory.
        source: PathBuf,
        /// Where in the container.
        target: String,
        /// Read-only.
        read_only: bool,
        /// The directory's identity when the container was created (absent
        /// in records from before it was kept).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identity: Option<BindIdentity>,
    },
    /// A named (or anonymous) volume.
    Volume {
        /// The volume's name.
        name: String,
        /// Where in the container.
        target: String,
        /// Read-only.
        read_only: bool,
        /// Made for this container (`-v /path`, or the image's `Volumes`).
        anonymous: bool,
    },
    /// A tmpfs.
    Tmpfs {
        /// Where in the container.
        target: String,
        /// Size limit in bytes.
        size: Option<u64>,
        /// Mode of its root.
        mode: u32,
        /// Executables allowed.
        exec: bool,
        /// Read-only.
        read_only: bool,
    },
}

/// Which host directory a bind source was: device and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindIdentity {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

/// How long since `secs`, docker style ("5 seconds", "3 minutes").
pub fn since(secs: u64) -> String {
    let d = now().saturating_sub(secs);
    match d {
        0..=59 => format!("{d} seconds"),
        60..=3599 => format!("{} minutes", d / 60),
        3600..=86_399 => format!("{} hours", d / 3600),
        _ => format!("{} days", d / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hull_protocol::spec::RootfsSpec;

    fn config(id: &str, name: &str) -> ContainerConfig {
        ContainerConfig {
            id: id.into(),
            name: name.into(),
            image: "busybox".into(),
            image_id: "sha256:00".into(),
            created: now(),
            spec: RunSpec {
                args: vec!["true".into()],
                env: Vec::new(),
                cwd: "/".into(),
                user: String::new(),
                hostname: "h".into(),
                stdin: false,
                rootfs: RootfsSpec {
                    image_disk: "a".into(),
                    chain: Vec::new(),
                    scratch_disk: "b".into(),
                    build: None,
                },
                ..RunSpec::default()
            },
            memory_mib: 512,
            cpus: 1,
            kernel: "/k".into(),
            auto_remove: false,
            log: crate::logfile::LogOptions::default(),
            network: None,
            mounts: Vec::new(),
            labels: std::collections::BTreeMap::new(),
        }
    }

    #[test]
    fn containers_are_found_by_name_id_and_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let cs = Containers::new(dir.path());
        cs.create(config("abcdef0123", "web")).unwrap();
        cs.create(config("abc9990000", "db")).unwrap();
        assert_eq!(cs.find("web").unwrap().config.id, "abcdef0123");
        assert_eq!(cs.find("abc999").unwrap().config.name, "db");
        assert!(matches!(cs.find("abc"), Err(ContainerError::Ambiguous(_))));
        assert!(matches!(cs.find("nope"), Err(ContainerError::NotFound(_))));
        let err = cs.create(config("ffff000000", "web")).unwrap_err();
        assert!(
            err.to_string()
                .contains("already in use by container abcdef0123"),
            "{err}"
        );
    }

    #[test]
    fn a_dead_monitor_shows_as_exited() {
        let dir = tempfile::tempdir().unwrap();
        let c = Containers::new(dir.path())
            .create(config("0123456789", "x"))
            .unwrap();
        c.update_state(|s| {
            s.status = Status::Running;
            s.pid = Some(1);
        })
        .unwrap();
        // Nobody holds the monitor lock: the monitor is gone.
        let st = c.state().unwrap();
        assert_eq!(st.status, Status::Exited);
        assert!(st.error.unwrap().contains("monitor died"));
        // While the lock is held (by this process here), it runs.
        let _held = Lock::exclusive(&c.path(files::MONITOR_LOCK)).unwrap();
        // flock locks are per open file description: a second open in this
        // process conflicts like another process would.
        assert_eq!(c.state().unwrap().status, Status::Running);
    }

    #[test]
    fn a_record_from_before_log_options_loads_with_the_defaults() {
        let mut record = serde_json::to_value(config("0123456789", "old")).unwrap();
        record.as_object_mut().unwrap().remove("log").unwrap();
        let old: ContainerConfig = serde_json::from_value(record).unwrap();
        assert_eq!(old.log, crate::logfile::LogOptions::default());
    }

    #[test]
    fn generated_names_are_stable() {
        let n = generated_name("0a1b2c3d4e5f");
        assert_eq!(n, generated_name("0a1b2c3d4e5f"));
        assert!(n.contains('_'));
    }
}

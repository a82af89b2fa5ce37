//! Volumes: the `-v`, `--mount`, `--tmpfs` and `--read-only` flags of
//! `hull run`, and the named volume store (`hull volume ...`).
//!
//! A named volume is an ext4 file system in a sparse disk image under
//! `$HULL_ROOT/volumes/<name>/`, attached to the container's VM as one more
//! virtio-blk disk; its data lives in the file system's `_data/` (the root
//! also holds `lost+found`). A bind mount is a host directory served to the
//! guest over virtio-fs (see [`crate::virtiofs`]). A tmpfs lives in the
//! guest's RAM. Everything here is checked before any image lookup or VM.
//!
//! An ext4 disk can be mounted by one kernel at a time, so a named volume is
//! used by one running container at a time: the container's monitor holds
//! the volume's `use.lock` for as long as it runs ([`InUse`]).

use std::fs;
use std::path::{Component, Path, PathBuf};

use hull_protocol::spec::{share_tag, volume_disk_serial, MountSource, MountSpec};
use serde::{Deserialize, Serialize};

pub use crate::container::{BindIdentity, HostMount};
use crate::container::{Containers, Lock};
use crate::flags::{parse_size, UsageError};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn usage(msg: impl Into<String>) -> Box<dyn std::error::Error> {
    Box::new(UsageError(msg.into()))
}

/// Default size of a named volume's disk (sparse: unused room costs nothing).
pub const DEFAULT_VOLUME_SIZE: u64 = 10 << 30;
/// The smallest volume (ext4 needs some room for itself).
const MIN_VOLUME_SIZE: u64 = 16 << 20;
/// Most disk and share mounts of one container (each is a virtio device, and
/// a VM has one interrupt line per device).
pub const MAX_DEVICE_MOUNTS: usize = 12;

impl BindIdentity {
    fn of(m: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// Opens a recorded bind source as the directory it was at create time:
/// walked from `/` with no symlink followed (a container that shares a
/// parent of the source could have swapped a component for a symlink to
/// anywhere on the host), and, where recorded, the same (device, inode).
///
/// # Errors
/// The source is gone, reached through a symlink, or another directory.
pub fn open_bind_source(
    source: &Path,
    identity: Option<&BindIdentity>,
) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let rel = source.strip_prefix("/").map_err(|_| {
        usage(format!(
            "bind source {} is not absolute: remove the container",
            source.display()
        ))
    })?;
    let rel = if rel.as_os_str().is_empty() {
        std::ffi::CString::from(c".")
    } else {
        std::ffi::CString::new(rel.as_os_str().as_bytes())?
    };
    let root = fs::File::open("/")?;
    // SAFETY: `open_how` is plain data; all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = u64::from((libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC).cast_unsigned());
    // RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS.
    how.resolve = 0x04 | 0x02;
    // SAFETY: a valid C string and an `open_how` of the size passed; an
    // open descriptor.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            rel.as_ptr(),
            std::ptr::addr_of!(how),
            std::mem::size_of::<libc::open_how>(),
        )
    };
    let Ok(fd) = libc::c_int::try_from(r) else {
        return Err("openat2 returned a bad descriptor".into());
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(usage(match e.raw_os_error() {
            Some(libc::ELOOP) => format!(
                "bind source {} is now reached through a symlink, refused: restore the directory \
                 or remove the container",
                source.display()
            ),
            Some(libc::ENOENT | libc::ENOTDIR) => format!(
                "bind source {} is gone: recreate it or remove the container",
                source.display()
            ),
            _ => format!("cannot open bind source {}: {e}", source.display()),
        }));
    }
    // SAFETY: openat2 returned a new descriptor nobody else owns.
    let dir = unsafe { OwnedFd::from_raw_fd(fd) };
    let now = BindIdentity::of(&fs::File::from(dir.try_clone()?).metadata()?);
    if identity.is_some_and(|was| *was != now) {
        return Err(usage(format!(
            "bind source {} is no longer the directory the container was created with, refused: \
             remove the container and create it again",
            source.display()
        )));
    }
    Ok(dir)
}

impl HostMount {
    /// Where the mount goes in the container.
    #[must_use]
    pub fn target(&self) -> &str {
        match self {
            Self::Bind { target, .. }
            | Self::Volume { target, .. }
            | Self::Tmpfs { target, .. } => target,
        }
    }
}

/// Checks a container path and returns it normalised (no `.`, `..` or
/// doubled slashes): absolute, not `/`, and not over `/proc`, `/sys` or
/// `/dev`, which the init mounts itself.
///
/// # Errors
/// Relative, `/`, or a path the container's kernel interfaces live under.
pub fn check_target(target: &str, flag: &str) -> Result<String> {
    if !target.starts_with('/') {
        return Err(usage(format!(
            "invalid {flag} target {target:?}: the container path must be absolute"
        )));
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(target).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().unwrap_or_default()),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    if parts.is_empty() {
        return Err(usage(format!(
            "invalid {flag} target {target:?}: cannot mount over the container's root"
        )));
    }
    if matches!(parts[0], "proc" | "sys" | "dev") {
        return Err(usage(format!(
            "invalid {flag} target {target:?}: /{} belongs to the container's kernel and init",
            parts[0]
        )));
    }
    if target.contains('\0') || target.contains(',') || target.contains(':') {
        return Err(usage(format!(
            "invalid {flag} target {target:?}: NUL, ',' and ':' are not allowed"
        )));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Whether `name` is a valid volume name (docker's rule:
/// `[a-zA-Z0-9][a-zA-Z0-9_.-]+`), at most 128 bytes.
#[must_use]
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn bind_source(src: &str, flag: &str) -> Result<(PathBuf, BindIdentity)> {
    let path = if src.starts_with('/') {
        PathBuf::from(src)
    } else {
        std::env::current_dir()?.join(src)
    };
    let real = fs::canonicalize(&path).map_err(|e| {
        usage(format!(
            "invalid {flag}: bind source path {} does not exist ({e}): create it first",
            path.display()
        ))
    })?;
    let meta = fs::metadata(&real)?;
    if !meta.is_dir() {
        return Err(usage(format!(
            "invalid {flag}: bind source {} is not a directory (hull shares directories only)",
            path.display()
        )));
    }
    Ok((real, BindIdentity::of(&meta)))
}

/// Parses one `-v` flag: `HOSTDIR:CTRDIR[:ro|rw]`, `NAME:CTRDIR[:ro|rw]`
/// or `CTRDIR` (an anonymous volume). Host paths start with `/` or `.`.
///
/// # Errors
/// Bad syntax, a host directory that does not exist, a bad target.
pub fn parse_volume_flag(text: &str) -> Result<HostMount> {
    let parts: Vec<&str> = text.split(':').collect();
    let (src, target, mode) = match parts.as_slice() {
        [t] => (None, *t, None),
        [s, t] => (Some(*s), *t, None),
        [s, t, m] => (Some(*s), *t, Some(*m)),
        _ => {
            return Err(usage(format!(
                "invalid -v {text:?}: use HOSTDIR:CTRDIR[:ro], NAME:CTRDIR[:ro] or CTRDIR"
            )))
        }
    };
    let mut read_only = false;
    for opt in mode
        .unwrap_or_default()
        .split(',')
        .filter(|o| !o.is_empty())
    {
        match opt {
            "ro" | "readonly" => read_only = true,
            "rw" => read_only = false,
            // Docker's SELinux and propagation flags mean nothing here.
            "z" | "Z" | "rprivate" | "private" | "rslave" | "slave" => {}
            other => {
                return Err(usage(format!(
                    "invalid -v {text:?}: unknown option {other:?} (use ro or rw)"
                )))
            }
        }
    }
    let target = check_target(target, "-v")?;
    Ok(match src {
        None => HostMount::Volume {
            name: String::new(),
            target,
            read_only,
            anonymous: true,
        },
        Some(s) if s.starts_with('/') || s.starts_with('.') => {
            let (source, identity) = bind_source(s, "-v")?;
            HostMount::Bind {
                source,
                target,
                read_only,
                identity: Some(identity),
            }
        }
        Some(s) if valid_name(s) => HostMount::Volume {
            name: s.to_string(),
            target,
            read_only,
            anonymous: false,
        },
        Some(s) => {
            return Err(usage(format!(
                "invalid -v {text:?}: {s:?} is neither an absolute host path nor a volume name \
                 ([a-zA-Z0-9][a-zA-Z0-9_.-]+)"
            )))
        }
    })
}

fn parse_bool(value: Option<&str>, what: &str) -> Result<bool> {
    match value {
        None | Some("true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(v) => Err(usage(format!(
            "invalid --mount: {what}={v:?} (use true or false)"
        ))),
    }
}

fn parse_mode(v: &str, flag: &str) -> Result<u32> {
    u32::from_str_radix(v, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| usage(format!("invalid {flag} mode {v:?}: use octal, e.g. 1777")))
}

fn parse_tmpfs_size(v: &str, flag: &str) -> Result<u64> {
    parse_size(v)
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| usage(format!("invalid {flag} size {v:?}: use e.g. 64m")))
}

/// Parses one `--mount` flag: comma-separated `key=value`s, docker's keys:
/// `type=bind|volume|tmpfs`, `source|src`, `target|destination|dst`,
/// `readonly|ro[=true|false]`, `tmpfs-size`, `tmpfs-mode`.
///
/// # Errors
/// An unknown key or type, a missing target, a bad source.
pub fn parse_mount_flag<'a>(text: &'a str) -> Result<HostMount> {
    let mut kind = "volume";
    let (mut source, mut target, mut read_only) = (None, None, false);
    let (mut size, mut mode) = (None, None);
    for field in text.split(',').filter(|f| !f.is_empty()) {
        let (k, v) = match field.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (field, None),
        };
        let need = |v: Option<&'a str>| -> Result<&'a str> {
            v.filter(|v| !v.is_empty())
                .ok_or_else(|| usage(format!("invalid --mount {text:?}: {k} needs a value")))
        };
        match k {
            "type" => kind = need(v)?,
            "source" | "src" => source = Some(need(v)?),
            "target" | "destination" | "dst" => target = Some(need(v)?),
            "readonly" | "ro" => read_only = parse_bool(v, k)?,
            "tmpfs-size" => size = Some(parse_tmpfs_size(need(v)?, "--mount tmpfs-size")?),
            "tmpfs-mode" => mode = Some(parse_mode(need(v)?, "--mount tmpfs-mode")?),
            "bind-propagation" | "consistency" => {}
            other => {
                return Err(usage(format!(
                    "invalid --mount {text:?}: unknown option {other:?}"
                )))
            }
        }
    }
    let target = check_target(
        target.ok_or_else(|| usage(format!("invalid --mount {text:?}: no target=")))?,
        "--mount",
    )?;
    let tmpfs_only = size.is_some() || mode.is_some();
    Ok(match kind {
        "bind" if !tmpfs_only => {
            let (source, identity) = bind_source(
                source.ok_or_else(|| {
                    usage(format!("invalid --mount {text:?}: a bind needs source="))
                })?,
                "--mount",
            )?;
            HostMount::Bind {
                source,
                target,
                read_only,
                identity: Some(identity),
            }
        }
        "volume" if !tmpfs_only => match source {
            None => HostMount::Volume {
                name: String::new(),
                target,
                read_only,
                anonymous: true,
            },
            Some(s) if valid_name(s) => HostMount::Volume {
                name: s.to_string(),
                target,
                read_only,
                anonymous: false,
            },
            Some(s) => {
                return Err(usage(format!(
                "invalid --mount {text:?}: {s:?} is not a volume name ([a-zA-Z0-9][a-zA-Z0-9_.-]+)"
            )))
            }
        },
        "tmpfs" if source.is_none() => HostMount::Tmpfs {
            target,
            size,
            mode: mode.unwrap_or(0o1777),
            exec: false,
            read_only,
        },
        "bind" | "volume" | "tmpfs" => {
            return Err(usage(format!(
                "invalid --mount {text:?}: tmpfs-* options are for type=tmpfs, source= is not"
            )))
        }
        other => {
            return Err(usage(format!(
                "invalid --mount {text:?}: unknown type {other:?} (use bind, volume or tmpfs)"
            )))
        }
    })
}

/// Parses one `--tmpfs CTRDIR[:OPTIONS]` flag; options as mount(8)'s tmpfs
/// ones docker takes: `size=`, `mode=`, `exec`/`noexec`, `ro`/`rw`, and the
/// defaults `nosuid`, `nodev`.
///
/// # Errors
/// A bad target or an unknown option.
pub fn parse_tmpfs_flag(text: &str) -> Result<HostMount> {
    let (target, opts) = text.split_once(':').unwrap_or((text, ""));
    let target = check_target(target, "--tmpfs")?;
    let (mut size, mut mode, mut exec, mut read_only) = (None, 0o1777, false, false);
    for opt in opts.split(',').filter(|o| !o.is_empty()) {
        match opt.split_once('=') {
            Some(("size", v)) => size = Some(parse_tmpfs_size(v, "--tmpfs")?),
            Some(("mode", v)) => mode = parse_mode(v, "--tmpfs")?,
            None if opt == "exec" => exec = true,
            None if opt == "noexec" => exec = false,
            None if opt == "ro" => read_only = true,
            None if opt == "rw" => read_only = false,
            None if matches!(opt, "nosuid" | "nodev") => {}
            _ => {
                return Err(usage(format!(
                    "invalid --tmpfs {text:?}: unknown option {opt:?} (size=, mode=, exec, noexec, ro, rw)"
                )))
            }
        }
    }
    Ok(HostMount::Tmpfs {
        target,
        size,
        mode,
        exec,
        read_only,
    })
}

/// Parses every mount flag of `hull run`; refuses two mounts on one target
/// and more device mounts than a VM takes.
///
/// # Errors
/// Any flag is bad.
pub fn parse_all(
    volumes: &[String],
    mounts: &[String],
    tmpfs: &[String],
) -> Result<Vec<HostMount>> {
    let mut out = Vec::new();
    for v in volumes {
        out.push(parse_volume_flag(v)?);
    }
    for m in mounts {
        out.push(parse_mount_flag(m)?);
    }
    for t in tmpfs {
        out.push(parse_tmpfs_flag(t)?);
    }
    for (i, m) in out.iter().enumerate() {
        if out[..i].iter().any(|o| o.target() == m.target()) {
            return Err(usage(format!(
                "duplicate mount point {}: give each container path one mount",
                m.target()
            )));
        }
    }
    let devices = out
        .iter()
        .filter(|m| !matches!(m, HostMount::Tmpfs { .. }))
        .count();
    if devices > MAX_DEVICE_MOUNTS {
        return Err(usage(format!(
            "{devices} volumes and bind mounts: a container can have at most {MAX_DEVICE_MOUNTS}"
        )));
    }
    Ok(out)
}

/// Adds an anonymous volume for each of the image's `Volumes` not covered by
/// a user mount (docker does the same).
pub fn add_image_volumes(mounts: &mut Vec<HostMount>, image_volumes: &[String]) {
    for v in image_volumes {
        let Ok(target) = check_target(v, "image volume") else {
            // An image cannot ask for /proc or a relative path: ignored, as docker would fail later.
            tracing::warn!("ignoring the image's volume {v:?}");
            continue;
        };
        if mounts.iter().any(|m| m.target() == target) {
            continue;
        }
        let devices = mounts
            .iter()
            .filter(|m| !matches!(m, HostMount::Tmpfs { .. }))
            .count();
        if devices >= MAX_DEVICE_MOUNTS {
            tracing::warn!("ignoring the image's volume {v:?}: too many mounts");
            continue;
        }
        mounts.push(HostMount::Volume {
            name: String::new(),
            target,
            read_only: false,
            anonymous: true,
        });
    }
}

/// The mounts in the order they are made: parents before what is inside
/// them (by the number of path components; stable otherwise).
pub fn sort_for_mounting(mounts: &mut [HostMount]) {
    mounts.sort_by_key(|m| m.target().matches('/').count());
}

/// The init's view of `mounts` (in that order): disks and shares numbered as
/// [`prepare`] attaches them.
#[must_use]
pub fn guest_mounts(mounts: &[HostMount]) -> Vec<MountSpec> {
    let (mut disks, mut shares) = (0, 0);
    mounts
        .iter()
        .map(|m| match m {
            HostMount::Bind {
                target, read_only, ..
            } => {
                shares += 1;
                MountSpec {
                    source: MountSource::Virtiofs {
                        tag: share_tag(shares - 1),
                    },
                    target: target.clone(),
                    read_only: *read_only,
                }
            }
            HostMount::Volume {
                target, read_only, ..
            } => {
                disks += 1;
                MountSpec {
                    source: MountSource::Volume {
                        serial: volume_disk_serial(disks - 1),
                    },
                    target: target.clone(),
                    read_only: *read_only,
                }
            }
            HostMount::Tmpfs {
                target,
                size,
                mode,
                exec,
                read_only,
            } => MountSpec {
                source: MountSource::Tmpfs {
                    size: *size,
                    mode: *mode,
                    exec: *exec,
                },
                target: target.clone(),
                read_only: *read_only,
            },
        })
        .collect()
}

/// A mount as `hull inspect` shows it (docker's `Mounts` entries).
#[must_use]
pub fn inspect_mount(m: &HostMount) -> serde_json::Value {
    match m {
        HostMount::Bind {
            source,
            target,
            read_only,
            ..
        } => serde_json::json!({
            "Type": "bind", "Source": source, "Destination": target, "RW": !read_only,
        }),
        HostMount::Volume {
            name,
            target,
            read_only,
            ..
        } => serde_json::json!({
            "Type": "volume", "Name": name, "Destination": target, "RW": !read_only, "Driver": "local",
        }),
        HostMount::Tmpfs {
            target, read_only, ..
        } => serde_json::json!({
            "Type": "tmpfs", "Destination": target, "RW": !read_only,
        }),
    }
}

/// Parses `--opt KEY=VALUE`s of `hull volume create`: only `size`.
///
/// # Errors
/// Unknown option or bad size.
pub fn parse_volume_opts(opts: &[String]) -> Result<u64> {
    let mut size = DEFAULT_VOLUME_SIZE;
    for o in opts {
        match o.split_once('=') {
            Some(("size", v)) => {
                size = parse_size(v)
                    .ok()
                    .filter(|s| *s >= MIN_VOLUME_SIZE)
                    .ok_or_else(|| {
                        usage(format!(
                            "invalid volume option size={v:?}: use e.g. 1g (at least 16m)"
                        ))
                    })?;
            }
            _ => {
                return Err(usage(format!(
                    "unknown volume option {o:?} (hull's volumes take size=SIZE)"
                )))
            }
        }
    }
    Ok(size.div_ceil(1 << 20) << 20)
}

/// Makes a volume's disk: a sparse file with an empty ext4 file system.
/// Unlike a container's scratch disk it has a journal: a volume outlives
/// its containers, and a VM that is killed must not cost it its data.
fn make_disk(path: &Path, size: u64) -> Result<()> {
    fs::File::create(path)?.set_len(size)?;
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-L", "hull-volume"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run mkfs.ext4 (hull needs e2fsprogs): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot format volume disk {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// What a volume is (its `volume.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Its name.
    pub name: String,
    /// When it was made (seconds since the epoch).
    pub created: u64,
    /// The disk's size in bytes.
    pub size: u64,
    /// Made for one container (removed with it when it is `--rm`, and by `volume prune`).
    #[serde(default)]
    pub anonymous: bool,
}

/// A volume on disk.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Its directory.
    pub dir: PathBuf,
    /// What it is.
    pub info: VolumeInfo,
}

impl Volume {
    /// The ext4 disk image.
    #[must_use]
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.ext4")
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("use.lock")
    }

    /// Whether a running container holds it.
    ///
    /// # Errors
    /// The lock file cannot be opened.
    pub fn in_use(&self) -> Result<bool> {
        Ok(Lock::try_exclusive(&self.lock_path())?.is_none())
    }
}

/// Held by a container's monitor while the container uses the volume.
#[derive(Debug)]
pub struct InUse {
    _lock: Lock,
}

/// The volume store under a store root.
#[derive(Debug, Clone)]
pub struct Volumes {
    root: PathBuf,
}

impl Volumes {
    /// The volumes of the store at `store_root`.
    #[must_use]
    pub fn new(store_root: &Path) -> Self {
        Self {
            root: store_root.join("volumes"),
        }
    }

    /// The volume `name`, if it exists.
    ///
    /// # Errors
    /// Its record is unreadable.
    pub fn get(&self, name: &str) -> Result<Option<Volume>> {
        if !valid_name(name) {
            return Ok(None);
        }
        let dir = self.root.join(name);
        match fs::read(dir.join("volume.json")) {
            Ok(bytes) => Ok(Some(Volume {
                dir,
                info: serde_json::from_slice(&bytes)
                    .map_err(|e| format!("corrupt volume record of {name}: {e}"))?,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read volume {name}: {e}").into()),
        }
    }

    /// The volume `name`, or a one-line error.
    ///
    /// # Errors
    /// No such volume.
    pub fn find(&self, name: &str) -> Result<Volume> {
        self.get(name)?
            .ok_or_else(|| usage(format!("no such volume: {name}")))
    }

    /// Creates volume `name` of `size` bytes, or returns it if it exists
    /// (as docker does). Safe against a concurrent create of the same name.
    ///
    /// # Errors
    /// A bad name, or the disk cannot be made.
    pub fn create(&self, name: &str, size: u64, anonymous: bool) -> Result<Volume> {
        if !valid_name(name) {
            return Err(usage(format!(
                "invalid volume name {name:?}: use [a-zA-Z0-9][a-zA-Z0-9_.-]+"
            )));
        }
        if let Some(v) = self.get(name)? {
            return Ok(v);
        }
        fs::create_dir_all(&self.root)?;
        let tmp = self
            .root
            .join(format!(".new-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp)?;
        let made = (|| -> Result<()> {
            make_disk(&tmp.join("disk.ext4"), size)?;
            let info = VolumeInfo {
                name: name.to_string(),
                created: crate::container::now(),
                size,
                anonymous,
            };
            fs::write(tmp.join("volume.json"), serde_json::to_vec_pretty(&info)?)?;
            Ok(())
        })();
        if let Err(e) = made {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        // Renamed into place: another create of the same name that won the
        // race leaves its volume (a non-empty directory) and this one goes.
        if fs::rename(&tmp, self.root.join(name)).is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        self.find(name)
    }

    /// Every volume, by name.
    ///
    /// # Errors
    /// The volumes directory is unreadable.
    pub fn list(&self) -> Result<Vec<Volume>> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(Some(v)) = self.get(&name) {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        Ok(out)
    }

    /// Removes `name`: refused while a container (running or not) uses it.
    /// Returns the bytes freed.
    ///
    /// # Errors
    /// No such volume, or it is in use.
    pub fn remove(&self, name: &str, containers: &Containers) -> Result<u64> {
        let v = self.find(name)?;
        let Some(_lock) = Lock::try_exclusive(&v.lock_path())? else {
            return Err(usage(format!(
                "volume {name} is in use by a running container: stop the container first"
            )));
        };
        let users: Vec<String> = containers
            .list()?
            .into_iter()
            .filter(|c| {
                c.config
                    .mounts
                    .iter()
                    .any(|m| matches!(m, HostMount::Volume { name: n, .. } if n == name))
            })
            .map(|c| c.config.name)
            .collect();
        if !users.is_empty() {
            return Err(usage(format!(
                "volume {name} is in use by container(s) {}: remove them first",
                users.join(", ")
            )));
        }
        let freed = crate::container::dir_size(&v.dir);
        // Renamed away first, so nobody finds a half-removed volume.
        let gone = self.root.join(format!(".rm-{name}-{}", std::process::id()));
        fs::rename(&v.dir, &gone)?;
        fs::remove_dir_all(&gone)?;
        Ok(freed)
    }

    /// Takes volume `name` for a running container.
    ///
    /// # Errors
    /// No such volume, or another running container has it.
    pub fn take(&self, name: &str) -> Result<(Volume, InUse)> {
        let v = self.find(name)?;
        let lock = Lock::try_exclusive(&v.lock_path())?.ok_or_else(|| {
            usage(format!(
                "volume {name} is in use by another running container (a volume is one ext4 \
                 disk: one container at a time)"
            ))
        })?;
        Ok((v, InUse { _lock: lock }))
    }
}

/// Gives every anonymous volume a fresh name and creates every volume the
/// mounts name (`-v NAME:...` creates a missing volume, as docker does).
///
/// # Errors
/// A volume cannot be made.
pub fn create_volumes(store_root: &Path, mounts: &mut [HostMount]) -> Result<()> {
    let volumes = Volumes::new(store_root);
    for m in mounts.iter_mut() {
        if let HostMount::Volume {
            name, anonymous, ..
        } = m
        {
            if name.is_empty() {
                *name = crate::container::new_id()?;
            }
            let v = volumes.create(name, DEFAULT_VOLUME_SIZE, *anonymous)?;
            // Told now, before a VM is started (the monitor takes the
            // volume for real, and refuses then if it lost a race).
            if v.in_use()? {
                return Err(usage(format!(
                    "volume {name} is in use by another running container (a volume is one ext4 \
                     disk: one container at a time)"
                )));
            }
        }
    }
    Ok(())
}

/// Removes the anonymous volumes of a removed container (best effort; one
/// still in use stays).
pub fn remove_anonymous(store_root: &Path, mounts: &[HostMount]) {
    let volumes = Volumes::new(store_root);
    let containers = Containers::new(store_root);
    for m in mounts {
        if let HostMount::Volume {
            name,
            anonymous: true,
            ..
        } = m
        {
            let _ = volumes.remove(name, &containers);
        }
    }
}

/// A bind source opened for one start: the directory it was at create,
/// held by descriptor so that what is served cannot change after the check.
#[derive(Debug)]
pub struct Share {
    /// The recorded path (for messages).
    pub source: PathBuf,
    /// The directory (`O_PATH`).
    pub dir: std::os::fd::OwnedFd,
    /// Read-only.
    pub read_only: bool,
}

/// What a container's VM gets for its mounts: the volume disks (in
/// [`guest_mounts`] order) with the volumes held, and the host directories
/// to share (in order).
#[derive(Debug, Default)]
pub struct Prepared {
    /// virtio-blk disks of the volumes.
    pub disks: Vec<vmm::DiskConfig>,
    /// Host directories to serve, opened.
    pub shares: Vec<Share>,
    /// The volumes held while the container runs.
    pub held: Vec<InUse>,
}

/// Takes the container's volumes and lists its disks and shares.
///
/// # Errors
/// A volume is missing or in use elsewhere.
pub fn prepare(store_root: &Path, mounts: &[HostMount]) -> Result<Prepared> {
    let volumes = Volumes::new(store_root);
    let mut out = Prepared::default();
    for m in mounts {
        match m {
            HostMount::Bind {
                source,
                read_only,
                identity,
                ..
            } => {
                out.shares.push(Share {
                    source: source.clone(),
                    dir: open_bind_source(source, identity.as_ref())?,
                    read_only: *read_only,
                });
            }
            HostMount::Volume {
                name, read_only, ..
            } => {
                let (v, held) = volumes.take(name)?;
                out.disks.push(vmm::DiskConfig {
                    path: v.disk(),
                    read_only: *read_only,
                    serial: volume_disk_serial(out.held.len()),
                    then: Vec::new(),
                });
                out.held.push(held);
            }
            HostMount::Tmpfs { .. } => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(r: Result<HostMount>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn targets_are_absolute_normalised_and_off_limits_under_proc_sys_dev() {
        assert_eq!(
            check_target("/data//x/./y/../z", "-v").unwrap(),
            "/data/x/z"
        );
        assert!(check_target("data", "-v")
            .unwrap_err()
            .to_string()
            .contains("absolute"));
        assert!(check_target("/", "-v").is_err());
        assert!(check_target("/a/..", "-v").is_err());
        for bad in ["/proc", "/proc/sys", "/dev/shm", "/sys/x", "/x/../dev"] {
            assert!(check_target(bad, "-v").is_err(), "{bad}");
        }
        assert!(check_target("/devices", "-v").is_ok());
    }

    #[test]
    fn dash_v_tells_binds_volumes_and_anonymous_volumes_apart() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let real = fs::canonicalize(d).unwrap();
        assert_eq!(
            parse_volume_flag(&format!("{d}:/src:ro")).unwrap(),
            HostMount::Bind {
                identity: Some(BindIdentity::of(&fs::metadata(&real).unwrap())),
                source: real,
                target: "/src".into(),
                read_only: true,
            }
        );
        assert_eq!(
            parse_volume_flag("db:/var/lib/db").unwrap(),
            HostMount::Volume {
                name: "db".into(),
                target: "/var/lib/db".into(),
                read_only: false,
                anonymous: false
            }
        );
        assert!(matches!(
            parse_volume_flag("/cache").unwrap(),
            HostMount::Volume {
                anonymous: true,
                ..
            }
        ));
        assert!(msg(parse_volume_flag("/nonexistent-hull-dir:/x")).contains("does not exist"));
        assert!(msg(parse_volume_flag(&format!("{d}:rel"))).contains("absolute"));
        assert!(msg(parse_volume_flag(&format!("{d}:/proc"))).contains("/proc"));
        assert!(msg(parse_volume_flag("db:/x:bogus")).contains("unknown option"));
        assert!(msg(parse_volume_flag("a:b:c:d")).contains("use HOSTDIR"));
        assert!(msg(parse_volume_flag("x$:/y")).contains("neither"));
        let file = dir.path().join("f");
        fs::write(&file, "").unwrap();
        assert!(msg(parse_volume_flag(&format!("{}:/f", file.display()))).contains("directory"));
    }

    /// `-v /srv/app:/app -v /srv/app/data:/data`, and the container makes
    /// /app/data a symlink to `/`: the next start refuses the share instead
    /// of serving the host's root; so it does for another directory put in
    /// its place.
    #[test]
    fn a_bind_source_swapped_since_create_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let app = fs::canonicalize(dir.path()).unwrap().join("app");
        fs::create_dir_all(app.join("data")).unwrap();
        let m = parse_volume_flag(&format!("{}/data:/data", app.display())).unwrap();
        let HostMount::Bind {
            source, identity, ..
        } = &m
        else {
            panic!("{m:?}");
        };
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        assert_eq!(
            prepare(&root, std::slice::from_ref(&m))
                .unwrap()
                .shares
                .len(),
            1
        );
        fs::remove_dir(source).unwrap();
        std::os::unix::fs::symlink("/", source).unwrap();
        let err = err_of(prepare(&root, std::slice::from_ref(&m)).map(|_| ()));
        assert!(err.contains("through a symlink"), "{err}");
        // A symlink higher up is refused the same way.
        let moved = app.with_file_name("elsewhere");
        fs::rename(&app, &moved).unwrap();
        std::os::unix::fs::symlink(&moved, &app).unwrap();
        assert!(err_of(open_bind_source(source, None)).contains("through a symlink"));
        fs::remove_file(&app).unwrap();
        fs::create_dir_all(source).unwrap();
        let err = err_of(open_bind_source(source, identity.as_ref()));
        assert!(err.contains("no longer the directory"), "{err}");
        fs::remove_dir(source).unwrap();
        assert!(err_of(open_bind_source(source, identity.as_ref())).contains("is gone"));
    }

    fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn dash_mount_takes_dockers_keys() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        assert!(matches!(
            parse_mount_flag(&format!("type=bind,src={d},dst=/w,readonly")).unwrap(),
            HostMount::Bind {
                read_only: true,
                ..
            }
        ));
        assert!(matches!(
            parse_mount_flag("type=volume,source=v1,target=/v,ro=false").unwrap(),
            HostMount::Volume {
                read_only: false,
                anonymous: false,
                ..
            }
        ));
        assert_eq!(
            parse_mount_flag("type=tmpfs,dst=/t,tmpfs-size=1m,tmpfs-mode=700").unwrap(),
            HostMount::Tmpfs {
                target: "/t".into(),
                size: Some(1 << 20),
                mode: 0o700,
                exec: false,
                read_only: false
            }
        );
        assert!(msg(parse_mount_flag("type=bind,dst=/w")).contains("source"));
        assert!(msg(parse_mount_flag("type=nfs,dst=/w")).contains("unknown type"));
        assert!(msg(parse_mount_flag("type=volume,src=v,dst=/w,foo=1")).contains("unknown option"));
        assert!(msg(parse_mount_flag("type=volume,src=v")).contains("target"));
        assert!(parse_mount_flag("type=volume,src=v,dst=/w,tmpfs-size=1m").is_err());
    }

    #[test]
    fn dash_tmpfs_takes_size_and_mode() {
        assert_eq!(
            parse_tmpfs_flag("/run:size=64m,mode=755,exec").unwrap(),
            HostMount::Tmpfs {
                target: "/run".into(),
                size: Some(64 << 20),
                mode: 0o755,
                exec: true,
                read_only: false
            }
        );
        assert!(matches!(
            parse_tmpfs_flag("/t").unwrap(),
            HostMount::Tmpfs {
                size: None,
                mode: 0o1777,
                exec: false,
                ..
            }
        ));
        assert!(msg(parse_tmpfs_flag("/t:size=lots")).contains("size"));
        assert!(msg(parse_tmpfs_flag("/t:huge")).contains("unknown option"));
        assert!(parse_tmpfs_flag("t").is_err());
    }

    #[test]
    fn duplicates_and_too_many_devices_are_refused_and_order_is_parents_first() {
        assert!(parse_all(&["a1:/x".into()], &[], &["/x".into()])
            .unwrap_err()
            .to_string()
            .contains("duplicate"));
        let many: Vec<String> = (0..=MAX_DEVICE_MOUNTS)
            .map(|i| format!("v{i}:/m{i}"))
            .collect();
        assert!(parse_all(&many, &[], &[]).is_err());
        let mut m =
            parse_all(&["aa:/a/b/c".into(), "bb:/a".into()], &[], &["/a/b".into()]).unwrap();
        sort_for_mounting(&mut m);
        let targets: Vec<&str> = m.iter().map(HostMount::target).collect();
        assert_eq!(targets, ["/a", "/a/b", "/a/b/c"]);
        let g = guest_mounts(&m);
        assert_eq!(
            g[2].source,
            MountSource::Volume {
                serial: volume_disk_serial(1)
            }
        );
        assert!(volume_disk_serial(MAX_DEVICE_MOUNTS).len() <= 20);
        assert!(share_tag(MAX_DEVICE_MOUNTS).len() <= 36);
    }

    #[test]
    fn image_volumes_become_anonymous_unless_covered() {
        let mut m = parse_all(&["data:/data".into()], &[], &[]).unwrap();
        add_image_volumes(&mut m, &["/data".into(), "/cache/".into(), "/proc".into()]);
        assert_eq!(m.len(), 2);
        assert!(
            matches!(&m[1], HostMount::Volume { target, anonymous: true, .. } if target == "/cache")
        );
    }

    #[test]
    fn volume_options_and_names() {
        assert_eq!(parse_volume_opts(&[]).unwrap(), DEFAULT_VOLUME_SIZE);
        assert_eq!(parse_volume_opts(&["size=1g".into()]).unwrap(), 1 << 30);
        assert!(parse_volume_opts(&["size=1k".into()]).is_err());
        assert!(parse_volume_opts(&["type=nfs".into()])
            .unwrap_err()
            .to_string()
            .contains("unknown volume option"));
        assert!(valid_name("db") && valid_name("my_vol.1-x"));
        assert!(!valid_name("a") && !valid_name("-a") && !valid_name("a/b") && !valid_name(""));
    }

    #[test]
    fn store_creates_lists_refuses_removal_in_use_and_removes() {
        let root = tempfile::tempdir().unwrap();
        let vols = Volumes::new(root.path());
        let containers = Containers::new(root.path());
        let v = vols.create("data1", 64 << 20, false).unwrap();
        assert_eq!(fs::metadata(v.disk()).unwrap().len(), 64 << 20);
        // A second create returns the same volume.
        assert_eq!(
            vols.create("data1", 1 << 30, false).unwrap().info.size,
            64 << 20
        );
        assert_eq!(vols.list().unwrap().len(), 1);
        let (_, held) = vols.take("data1").unwrap();
        assert!(vols.take("data1").is_err());
        let err = vols.remove("data1", &containers).unwrap_err().to_string();
        assert!(err.contains("in use"), "{err}");
        drop(held);
        assert!(vols.remove("data1", &containers).unwrap() > 0);
        assert!(vols.list().unwrap().is_empty());
        assert!(vols
            .remove("data1", &containers)
            .unwrap_err()
            .to_string()
            .contains("no such volume"));
    }
}

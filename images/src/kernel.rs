//! The guest kernel: a Kconfig fragment (`images/kernel/microvm.config`) merged
//! on top of `make tinyconfig` from Debian's `linux-source-6.1`, built once and
//! cached under `<cache_root>/kernel/<key>/{vmlinux,bzImage,config}`.
//!
//! The cache key covers everything that decides the result: the build recipe
//! version, the fragment embedded in this binary and the identity of the
//! source tarball. Builds run in a scratch directory next to the cache entry
//! and are moved into place with a single `rename`, under an exclusive
//! `flock` per key, so concurrent builders neither corrupt the cache nor build
//! the same kernel twice.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

/// The Kconfig fragment, embedded so that the binary alone can build its kernel.
pub const FRAGMENT: &str = include_str!("../kernel/microvm.config");

/// Where Debian's `linux-source-6.1` package puts the source tarball.
pub const DEFAULT_SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

/// Bump whenever the build steps below change in a way that changes the output.
pub const RECIPE_VERSION: u32 = 1;

/// File names inside a cache entry.
const VMLINUX: &str = "vmlinux";
const BZIMAGE: &str = "bzImage";
const CONFIG: &str = "config";

/// Options for [`build`].
#[derive(Debug, Clone, Default)]
pub struct KernelBuildOptions {
    /// Linux source tarball; [`DEFAULT_SOURCE_TARBALL`] when `None`.
    pub source_tarball: Option<PathBuf>,
    /// Cache root; [`cache_root`] when `None`. Kernels go under `<root>/kernel/`.
    pub cache_dir: Option<PathBuf>,
    /// Parallel make jobs; the number of available CPUs when `None`.
    pub jobs: Option<usize>,
    /// Rebuild even when a cached kernel exists.
    pub force: bool,
}

/// A built (or cached) guest kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltKernel {
    /// Uncompressed ELF kernel, for direct 64-bit boot by the VMM.
    pub vmlinux: PathBuf,
    /// Compressed `bzImage`, e.g. for QEMU's `-kernel`.
    pub bzimage: PathBuf,
    /// The final `.config` the kernel was built with.
    pub config: PathBuf,
    /// The cache key (directory name under `<cache_root>/kernel/`).
    pub key: String,
    /// `true` when the kernel came from the cache without building.
    pub cached: bool,
}

/// One option of the fragment whose value did not make it into the final config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMismatch {
    /// e.g. `CONFIG_VIRTIO_MMIO`.
    pub option: String,
    /// The fragment's value; `None` for `# CONFIG_X is not set`.
    pub wanted: Option<String>,
    /// The final config's value; `None` when it is unset or absent.
    pub got: Option<String>,
}

impl fmt::Display for ConfigMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wanted = self.wanted.as_deref().unwrap_or("n");
        let got = self.got.as_deref().unwrap_or("not set");
        write!(f, "{} (wanted {wanted}, got {got})", self.option)
    }
}

/// Errors of [`build`].
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "linux source not found at {}: install it with `apt-get install linux-source-6.1`, \
         or pass the path of a Linux 6.1 source tarball",
        path.display()
    )]
    SourceNotFound { path: PathBuf },

    #[error(
        "cannot build the guest kernel: missing {}: install with `apt-get install {}`",
        missing.join(", "),
        packages.join(" ")
    )]
    MissingTools {
        /// Missing programs or headers.
        missing: Vec<String>,
        /// Debian packages that provide them.
        packages: Vec<String>,
    },

    #[error("building the guest kernel is only supported on x86_64 hosts (this host is {arch})")]
    UnsupportedHost { arch: &'static str },

    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },

    #[error("could not run `{program}`: {source}")]
    Spawn { program: String, source: io::Error },

    #[error(
        "`{command}` failed ({status}) in {}; its output is above on stderr; \
         the build tree is kept there for inspection",
        dir.display()
    )]
    CommandFailed {
        command: String,
        dir: PathBuf,
        status: ExitStatus,
    },

    #[error(
        "the guest kernel config lost {} option(s) of images/kernel/microvm.config after \
         `make olddefconfig` (unmet dependency or misspelled name): {}; see {} and fix the fragment",
        dropped.len(),
        dropped.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        config.display()
    )]
    ConfigDropped {
        dropped: Vec<ConfigMismatch>,
        config: PathBuf,
    },

    #[error("the kernel build finished but {} is missing", path.display())]
    MissingOutput { path: PathBuf },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KernelError {
    let path = path.to_path_buf();
    move |source| KernelError::Io {
        action,
        path,
        source,
    }
}

/// The cache root: `$HULL_CACHE_DIR`, else `$XDG_CACHE_HOME/hull`, else
/// `$HOME/.cache/hull` (else `<tmp>/hull-cache` when even `$HOME` is unset).
pub fn cache_root() -> PathBuf {
    cache_root_from(|name| std::env::var_os(name))
}

fn cache_root_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    let nonempty = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = nonempty("HULL_CACHE_DIR") {
        return dir;
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(dir) = nonempty("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return dir.join("hull");
    }
    match nonempty("HOME") {
        Some(home) => home.join(".cache").join("hull"),
        None => std::env::temp_dir().join("hull-cache"),
    }
}

/// What identifies a source tarball in the cache key.
///
/// The file name, size and modification time (to the nanosecond) rather than
/// a hash of its ~130 MiB: a stat is free, and a Debian package update (or any
/// other replacement of the file) changes the size and/or the mtime. A copy
/// made with `cp -p` keeps the key. The directory is left out on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIdentity {
    pub file_name: String,
    pub size: u64,
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
}

impl SourceIdentity {
    /// Stats `tarball`; a missing file gives [`KernelError::SourceNotFound`].
    pub fn of(tarball: &Path) -> Result<Self, KernelError> {
        let meta = match fs::metadata(tarball) {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => {
                return Err(KernelError::SourceNotFound {
                    path: tarball.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(KernelError::SourceNotFound {
                    path: tarball.to_path_buf(),
                })
            }
            Err(e) => return Err(io_err("cannot stat", tarball)(e)),
        };
        let (mtime_secs, mtime_nanos) = match meta.modified() {
            Ok(t) => match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (
                    i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    d.subsec_nanos(),
                ),
                Err(before) => (
                    -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
                    before.duration().subsec_nanos(),
                ),
            },
            Err(_) => (0, 0),
        };
        Ok(Self {
            file_name: tarball
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            size: meta.len(),
            mtime_secs,
            mtime_nanos,
        })
    }
}

/// The cache key: the first 16 hex digits of a SHA-256 over the recipe
/// version, the fragment and the source's identity.
pub fn cache_key(fragment: &str, source: &SourceIdentity) -> String {
    let mut h = Sha256::new();
    h.update(format!("hull-kernel-recipe-v{RECIPE_VERSION}\n").as_bytes());
    h.update(format!("fragment {}\n", fragment.len()).as_bytes());
    h.update(fragment.as_bytes());
    h.update(
        format!(
            "\nsource {} {} {}.{:09}\n",
            source.file_name, source.size, source.mtime_secs, source.mtime_nanos
        )
        .as_bytes(),
    );
    let digest = h.finalize();
    let mut key = hex::encode(digest);
    key.truncate(16);
    key
}

/// Parses a Kconfig `.config` (or fragment) into option -> value, where
/// `# CONFIG_X is not set` maps to `None`. Other lines are ignored; a later
/// line for the same option wins, as in Kconfig.
pub fn parse_config(text: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if name.starts_with("CONFIG_") && !name.contains(char::is_whitespace) {
                    out.insert(name.to_string(), None);
                }
            }
        } else if line.starts_with("CONFIG_") {
            if let Some((name, value)) = line.split_once('=') {
                let value = value.trim();
                // `CONFIG_X=n` means the same as "is not set".
                let value = (value != "n").then(|| value.to_string());
                out.insert(name.trim().to_string(), value);
            }
        }
    }
    out
}

/// The options of `fragment` whose value is not what the final `config` has.
/// A `# CONFIG_X is not set` line is satisfied by the option being unset or
/// absent from `config`.
pub fn dropped_options(fragment: &str, config: &str) -> Vec<ConfigMismatch> {
    let have = parse_config(config);
    parse_config(fragment)
        .into_iter()
        .filter_map(|(option, wanted)| {
            let got = have.get(&option).cloned().flatten();
            (got != wanted).then_some(ConfigMismatch {
                option,
                wanted,
                got,
            })
        })
        .collect()
}

/// Returns the cached kernel for `opts`, building it first when needed.
///
/// Make's output goes to this process's stderr. Nothing is written to stdout.
pub fn build(opts: &KernelBuildOptions) -> Result<BuiltKernel, KernelError> {
    let tarball = opts
        .source_tarball
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOURCE_TARBALL));
    let identity = SourceIdentity::of(&tarball)?;
    let key = cache_key(FRAGMENT, &identity);
    let kernel_dir = opts
        .cache_dir
        .clone()
        .unwrap_or_else(cache_root)
        .join("kernel");
    let entry = kernel_dir.join(&key);

    if !opts.force {
        if let Some(built) = cached(&entry, &key) {
            return Ok(built);
        }
    }

    fs::create_dir_all(&kernel_dir)
        .map_err(io_err("cannot create cache directory", &kernel_dir))?;
    let lock_path = kernel_dir.join(format!("{key}.lock"));
    let _lock = FileLock::exclusive(&lock_path)?;
    // Another builder may have finished while we waited for the lock.
    if !opts.force {
        if let Some(built) = cached(&entry, &key) {
            return Ok(built);
        }
    }

    if !cfg!(target_arch = "x86_64") {
        return Err(KernelError::UnsupportedHost {
            arch: std::env::consts::ARCH,
        });
    }
    check_tools()?;
    remove_stale_build_dirs(&kernel_dir, &key);

    let work = kernel_dir.join(format!(".build-{key}-{}", std::process::id()));
    fs::create_dir_all(&work).map_err(io_err("cannot create build directory", &work))?;
    let src = work.join("linux");
    fs::create_dir_all(&src).map_err(io_err("cannot create build directory", &src))?;
    let jobs = opts
        .jobs
        .filter(|&j| j > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1);

    progress(&format!(
        "building guest kernel {key} from {} in {} ({jobs} jobs)",
        tarball.display(),
        work.display()
    ));
    run(
        Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(&src)
            .arg("--strip-components=1"),
        &work,
    )?;

    let fragment_path = work.join("microvm.config");
    fs::write(&fragment_path, FRAGMENT).map_err(io_err("cannot write", &fragment_path))?;
    run(make(&src).arg("tinyconfig"), &src)?;
    run(
        Command::new("sh")
            .arg("scripts/kconfig/merge_config.sh")
            .arg("-m")
            .arg(".config")
            .arg(&fragment_path)
            .current_dir(&src),
        &src,
    )?;
    run(make(&src).arg("olddefconfig"), &src)?;

    let config_path = src.join(".config");
    let config = fs::read_to_string(&config_path).map_err(io_err("cannot read", &config_path))?;
    let dropped = dropped_options(FRAGMENT, &config);
    if !dropped.is_empty() {
        return Err(KernelError::ConfigDropped {
            dropped,
            config: config_path,
        });
    }

    progress("kernel config verified; compiling (a few minutes)");
    run(
        make(&src)
            .arg(format!("-j{jobs}"))
            .arg("vmlinux")
            .arg("bzImage"),
        &src,
    )?;

    // Assemble the entry next to its final place, then rename it in.
    let staged = work.join("out");
    fs::create_dir_all(&staged).map_err(io_err("cannot create", &staged))?;
    for (from, to) in [
        (src.join("vmlinux"), VMLINUX),
        (src.join("arch/x86/boot/bzImage"), BZIMAGE),
        (config_path, CONFIG),
    ] {
        if !from.is_file() {
            return Err(KernelError::MissingOutput { path: from });
        }
        let dest = staged.join(to);
        fs::rename(&from, &dest).map_err(io_err("cannot move build output to", &dest))?;
        File::open(&dest)
            .and_then(|f| f.sync_all())
            .map_err(io_err("cannot sync", &dest))?;
    }
    if entry.exists() {
        // Only with `force`: move the old entry aside first, since rename()
        // cannot replace a non-empty directory.
        let old = work.join("old");
        fs::rename(&entry, &old).map_err(io_err("cannot move aside old cache entry", &entry))?;
    }
    fs::rename(&staged, &entry).map_err(io_err("cannot move build into cache at", &entry))?;
    if let Ok(dir) = File::open(&kernel_dir) {
        // Best effort: make the rename durable.
        let _ = dir.sync_all();
    }
    if let Err(e) = fs::remove_dir_all(&work) {
        tracing::warn!("could not remove build directory {}: {e}", work.display());
    }

    let mut built = cached(&entry, &key).ok_or_else(|| KernelError::MissingOutput {
        path: entry.join(VMLINUX),
    })?;
    built.cached = false;
    progress(&format!("guest kernel ready: {}", built.vmlinux.display()));
    Ok(built)
}

/// The cached kernel for `opts`, if it is built (never builds).
pub fn find_cached(opts: &KernelBuildOptions) -> Option<BuiltKernel> {
    let tarball = opts
        .source_tarball
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOURCE_TARBALL));
    let key = cache_key(FRAGMENT, &SourceIdentity::of(&tarball).ok()?);
    let entry = opts
        .cache_dir
        .clone()
        .unwrap_or_else(cache_root)
        .join("kernel")
        .join(&key);
    cached(&entry, &key)
}

/// The complete cache entry at `entry`, if there is one.
fn cached(entry: &Path, key: &str) -> Option<BuiltKernel> {
    let built = BuiltKernel {
        vmlinux: entry.join(VMLINUX),
        bzimage: entry.join(BZIMAGE),
        config: entry.join(CONFIG),
        key: key.to_string(),
        cached: true,
    };
    (built.vmlinux.is_file() && built.bzimage.is_file() && built.config.is_file()).then_some(built)
}

/// Removes build directories of `key` left by builders that died. Only called
/// with the key's lock held, so none of them is in use.
fn remove_stale_build_dirs(kernel_dir: &Path, key: &str) {
    let prefix = format!(".build-{key}-");
    let Ok(entries) = fs::read_dir(kernel_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let path = entry.path();
            progress(&format!(
                "removing stale build directory {}",
                path.display()
            ));
            if let Err(e) = fs::remove_dir_all(&path) {
                tracing::warn!("could not remove {}: {e}", path.display());
            }
        }
    }
}

fn progress(msg: &str) {
    eprintln!("hull: kernel: {msg}");
}

/// A `make` in the kernel tree, isolated from the caller's make/kbuild
/// environment and with a reproducible build banner.
fn make(src: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.current_dir(src);
    for var in [
        "ARCH",
        "CROSS_COMPILE",
        "KCONFIG_CONFIG",
        "KBUILD_OUTPUT",
        "O",
        "MAKEFLAGS",
        "MFLAGS",
        "MAKELEVEL",
        "CC",
        "LD",
        "LLVM",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("KBUILD_BUILD_USER", "hull")
        .env("KBUILD_BUILD_HOST", "hull")
        .env("LC_ALL", "C");
    cmd
}

/// Runs `cmd` with its stdout and stderr on our stderr.
fn run(cmd: &mut Command, dir: &Path) -> Result<(), KernelError> {
    let command = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(io::stderr()))
        .stderr(Stdio::inherit());
    let status = cmd.status().map_err(|source| KernelError::Spawn {
        program: command.clone(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(KernelError::CommandFailed {
            command,
            dir: dir.to_path_buf(),
            status,
        })
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Programs and headers the kernel build needs, with their Debian packages.
const TOOLS: &[(&str, &str)] = &[
    ("make", "make"),
    ("gcc", "gcc"),
    ("ld", "binutils"),
    ("objcopy", "binutils"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("perl", "perl"),
    ("tar", "tar"),
    ("xz", "xz-utils"),
    ("gzip", "gzip"),
];

/// Headers objtool (the ORC unwinder) needs.
const LIBELF_HEADERS: &[&str] = &["/usr/include/gelf.h", "/usr/local/include/gelf.h"];

fn check_tools() -> Result<(), KernelError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut missing = Vec::new();
    let mut packages: Vec<String> = Vec::new();
    let mut want = |what: String, package: &str| {
        missing.push(what);
        if !packages.iter().any(|p| p == package) {
            packages.push(package.to_string());
        }
    };
    for &(program, package) in TOOLS {
        if !in_path(&path, program) {
            want(program.to_string(), package);
        }
    }
    if !LIBELF_HEADERS.iter().any(|h| Path::new(h).is_file()) {
        want("libelf headers (gelf.h)".to_string(), "libelf-dev");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelError::MissingTools { missing, packages })
    }
}

fn in_path(path: &OsStr, program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path).any(|dir| {
        fs::metadata(dir.join(program))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// An exclusive `flock` on a file, released when dropped (with the file).
#[derive(Debug)]
struct FileLock {
    _file: File,
}

impl FileLock {
    fn exclusive(path: &Path) -> Result<Self, KernelError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err("cannot open lock file", path))?;
        if flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            progress(&format!(
                "waiting for another build of this kernel (lock {})",
                path.display()
            ));
            loop {
                match flock(&file, libc::LOCK_EX) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_err("cannot lock", path)(e)),
                }
            }
        }
        Ok(Self { _file: file })
    }
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock() only operates on the descriptor, which `file` keeps open
    // for the duration of the call; it touches no memory of ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn ident() -> SourceIdentity {
        SourceIdentity {
            file_name: "linux-source-6.1.tar.xz".into(),
            size: 138_009_412,
            mtime_secs: 1_763_288_220,
            mtime_nanos: 5,
        }
    }

    #[test]
    fn key_is_16_hex_and_stable() {
        let k = cache_key("CONFIG_A=y\n", &ident());
        assert_eq!(k.len(), 16);
        assert!(k.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(k, cache_key("CONFIG_A=y\n", &ident()));
    }

    #[test]
    fn key_changes_with_inputs() {
        let base = cache_key("CONFIG_A=y\n", &ident());
        assert_ne!(base, cache_key("CONFIG_A=n\n", &ident()));
        let mut other = ident();
        other.size += 1;
        assert_ne!(base, cache_key("CONFIG_A=y\n", &other));
        let mut other = ident();
        other.mtime_nanos += 1;
        assert_ne!(base, cache_key("CONFIG_A=y\n", &other));
        let mut other = ident();
        other.file_name = "linux-source-6.2.tar.xz".into();
        assert_ne!(base, cache_key("CONFIG_A=y\n", &other));
    }

    #[test]
    fn embedded_fragment_parses() {
        let f = parse_config(FRAGMENT);
        assert_eq!(f.get("CONFIG_VIRTIO_MMIO"), Some(&Some("y".to_string())));
        assert_eq!(f.get("CONFIG_KVM_GUEST"), Some(&Some("y".to_string())));
        assert_eq!(f.get("CONFIG_NR_CPUS"), Some(&Some("64".to_string())));
        assert_eq!(f.get("CONFIG_MODULES"), Some(&None));
        // Comments are not options.
        assert!(f
            .keys()
            .all(|k| k.starts_with("CONFIG_") && !k.contains(' ')));
    }

    #[test]
    fn parse_handles_values_and_unset() {
        let c = parse_config(
            "#\n# Automatically generated\n#\nCONFIG_A=y\nCONFIG_S=\"x y\"\n\
             # CONFIG_B is not set\nCONFIG_N=64\nCONFIG_OFF=n\n# a comment\n",
        );
        assert_eq!(c.get("CONFIG_A"), Some(&Some("y".into())));
        assert_eq!(c.get("CONFIG_S"), Some(&Some("\"x y\"".into())));
        assert_eq!(c.get("CONFIG_B"), Some(&None));
        assert_eq!(c.get("CONFIG_N"), Some(&Some("64".into())));
        assert_eq!(c.get("CONFIG_OFF"), Some(&None));
        assert_eq!(c.len(), 5);
    }

    #[test]
    fn finds_dropped_options() {
        let fragment = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=64\n# CONFIG_M is not set\n\
                        # CONFIG_GONE is not set\nCONFIG_TYPO=y\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=8\nCONFIG_M=y\nCONFIG_OTHER=y\n";
        let dropped = dropped_options(fragment, config);
        let names: Vec<_> = dropped.iter().map(|d| d.option.as_str()).collect();
        assert_eq!(names, ["CONFIG_B", "CONFIG_M", "CONFIG_N", "CONFIG_TYPO"]);
        let n = dropped.iter().find(|d| d.option == "CONFIG_N");
        assert_eq!(
            n.map(ToString::to_string).as_deref(),
            Some("CONFIG_N (wanted 64, got 8)")
        );
        let typo = dropped.iter().find(|d| d.option == "CONFIG_TYPO");
        assert_eq!(
            typo.map(ToString::to_string).as_deref(),
            Some("CONFIG_TYPO (wanted y, got not set)")
        );
    }

    #[test]
    fn nothing_dropped_when_config_matches() {
        let config = format!("CONFIG_EXTRA=y\n{FRAGMENT}");
        assert!(dropped_options(FRAGMENT, &config).is_empty());
    }

    #[test]
    fn dropped_error_names_options() {
        let err = KernelError::ConfigDropped {
            dropped: dropped_options("CONFIG_X=y\n", ""),
            config: PathBuf::from("/b/.config"),
        };
        let msg = err.to_string();
        assert!(msg.contains("CONFIG_X (wanted y, got not set)"), "{msg}");
        assert!(msg.contains("/b/.config"), "{msg}");
    }

    #[test]
    fn cache_root_precedence() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all = &[
            ("HULL_CACHE_DIR", "/h"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(cache_root_from(env(all)), PathBuf::from("/h"));
        assert_eq!(
            cache_root_from(env(&[("HULL_CACHE_DIR", ""), ("XDG_CACHE_HOME", "/x")])),
            PathBuf::from("/x/hull")
        );
        assert_eq!(
            cache_root_from(env(&[("XDG_CACHE_HOME", "rel"), ("HOME", "/home/u")])),
            PathBuf::from("/home/u/.cache/hull")
        );
    }

    #[test]
    fn missing_source_is_a_clear_error() {
        let opts = KernelBuildOptions {
            source_tarball: Some(PathBuf::from("/nonexistent/linux-source-6.1.tar.xz")),
            cache_dir: Some(PathBuf::from("/nonexistent-cache")),
            ..Default::default()
        };
        let err = build(&opts)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("/nonexistent/linux-source-6.1.tar.xz"),
            "{err}"
        );
        assert!(err.contains("apt-get install linux-source-6.1"), "{err}");
    }

    #[test]
    fn cached_entry_is_reused_without_building() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tarball = dir.path().join("linux-source-6.1.tar.xz");
        fs::write(&tarball, b"not really a tarball")?;
        let key = cache_key(FRAGMENT, &SourceIdentity::of(&tarball)?);
        let entry = dir.path().join("cache/kernel").join(&key);
        fs::create_dir_all(&entry)?;
        for f in [VMLINUX, BZIMAGE, CONFIG] {
            fs::write(entry.join(f), b"x")?;
        }
        let built = build(&KernelBuildOptions {
            source_tarball: Some(tarball),
            cache_dir: Some(dir.path().join("cache")),
            ..Default::default()
        })?;
        assert!(built.cached);
        assert_eq!(built.key, key);
        assert_eq!(built.vmlinux, entry.join("vmlinux"));
        assert_eq!(built.bzimage, entry.join("bzImage"));
        Ok(())
    }

    #[test]
    fn lock_is_exclusive_between_descriptors() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("k.lock");
        let held = FileLock::exclusive(&path)?;
        let other = OpenOptions::new().write(true).open(&path)?;
        assert!(flock(&other, libc::LOCK_EX | libc::LOCK_NB).is_err());
        drop(held);
        assert!(flock(&other, libc::LOCK_EX | libc::LOCK_NB).is_ok());
        Ok(())
    }
}

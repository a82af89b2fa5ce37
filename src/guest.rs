//! What every container VM boots: the guest kernel and an initramfs holding
//! hull's init.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::initramfs;

/// The file name of hull's guest init binary.
const INIT_NAME: &str = "hull-init";

/// Errors finding or preparing the guest's boot files.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The init binary is nowhere to be found.
    #[error(
        "hull's guest init ({INIT_NAME}) is not next to hull ({0}) and HULL_INIT is not set: \
         build it with `cargo build` (it is part of the workspace)"
    )]
    NoInit(PathBuf),
    /// A file could not be read or written.
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
    /// The guest kernel could not be built or found.
    #[error(transparent)]
    Kernel(#[from] images::KernelError),
    /// No guest kernel is installed, cached or given.
    #[error(
        "no guest kernel: looked in {0}; run `hull kernel build` (a few minutes), or set HULL_KERNEL to a vmlinux"
    )]
    NoKernel(String),
}

/// The guest init binary: `$HULL_INIT`, else `hull-init` next to the hull executable.
///
/// # Errors
/// Neither exists.
pub fn init_binary() -> Result<PathBuf, GuestError> {
    if let Some(path) = std::env::var_os("HULL_INIT").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("hull"));
    let candidate = exe.with_file_name(INIT_NAME);
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(GuestError::NoInit(exe))
    }
}

/// Where an installed guest kernel is looked for, after `$HULL_KERNEL`
/// (a package or `make install` puts the project's `vmlinux` there).
pub const SYSTEM_KERNELS: [&str; 2] = ["/usr/local/lib/hull/vmlinux", "/usr/lib/hull/vmlinux"];

/// The guest kernel: `explicit` (`--kernel` or `$HULL_KERNEL`) if given, else
/// an installed one ([`SYSTEM_KERNELS`]), else the cached `hull kernel build`.
/// With none of them, a build is offered when hull talks to a terminal (it
/// takes minutes), otherwise the error says what was looked for and how to
/// get one.
///
/// # Errors
/// No kernel was found and none was built, or the build failed.
pub fn kernel(explicit: Option<&Path>) -> Result<PathBuf, GuestError> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if let Some(installed) = SYSTEM_KERNELS.iter().map(Path::new).find(|p| p.is_file()) {
        return Ok(installed.to_path_buf());
    }
    let opts = images::KernelBuildOptions::default();
    if let Some(built) = images::kernel::find_cached(&opts) {
        return Ok(built.vmlinux);
    }
    let looked = format!(
        "$HULL_KERNEL (unset), {}, and hull's build cache",
        SYSTEM_KERNELS.join(", ")
    );
    use std::io::IsTerminal;
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        return Err(GuestError::NoKernel(looked));
    }
    eprint!("hull: no guest kernel (looked in {looked}); build one now (a few minutes)? [Y/n] ");
    let mut answer = String::new();
    let _ = std::io::stdin().read_line(&mut answer);
    if !matches!(answer.trim(), "" | "y" | "Y" | "yes") {
        return Err(GuestError::NoKernel(looked));
    }
    Ok(images::build_kernel(&opts)?.vmlinux)
}

/// An initramfs holding `init`, cached under `cache_dir` by the init file's
/// identity (inode, size, mtime: cheap, where hashing megabytes on every run
/// is not), so concurrent containers share one file and nothing is rebuilt
/// per run.
///
/// # Errors
/// The init cannot be read or the cache written.
pub fn initramfs(init: &Path, cache_dir: &Path) -> Result<PathBuf, GuestError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| GuestError::Io { what, path, source }
    };
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(init).map_err(io("cannot read the guest init", init))?;
    let identity = format!(
        "{}|{}|{}|{}.{}",
        init.display(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    let hash = hex::encode(&Sha256::digest(identity.as_bytes())[..8]);
    let path = cache_dir.join(format!("initramfs-{hash}.cpio"));
    if path.is_file() {
        return Ok(path);
    }
    let bytes = std::fs::read(init).map_err(io("cannot read the guest init", init))?;
    std::fs::create_dir_all(cache_dir).map_err(io("cannot create", cache_dir))?;
    let archive = initramfs::build(&bytes).map_err(io("cannot build the initramfs for", init))?;
    // Written aside and renamed: a concurrent reader never sees half a file.
    let tmp = cache_dir.join(format!(".initramfs-{hash}.{}", std::process::id()));
    std::fs::write(&tmp, archive).map_err(io("cannot write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("cannot write", &path))?;
    Ok(path)
}

/// Guest command line for containers: the console goes to a log, not the
/// user's terminal, so the kernel stays quiet. `dummy.numdummies=0`: the
/// built-in dummy driver makes no `dummy0` at boot (a container sees only
/// `lo` and `eth0`, as in docker; `ip link add type dummy` still works).
pub const CONTAINER_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 quiet loglevel=3 no_timer_check dummy.numdummies=0";

//! `hull run`: an OCI image's command in a fresh microVM.
//!
//! The flow is one-way: resolve the image in the store (pulling it if need
//! be), turn its config and the user's flags into a run spec (docker's
//! rules), prepare disks, boot the VM, and relay the container's stdio until
//! the guest init reports how it ended.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use guest_init::spec::{
    Compression as GuestCompression, LayerSpec, RootfsSpec, RunSpec, IMAGE_DISK_SERIAL,
    LAYERS_DISK_SERIAL, SCRATCH_DISK_SERIAL,
};
use images::{Compression, Image, PullOptions, Store};

use crate::cli::RunArgs;
use crate::container::{self, files, generated_name, Container, ContainerConfig, Containers};
use crate::disks;
use crate::guest;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Exit status for hull's own failures (docker's).
pub const EXIT_RUNTIME_ERROR: i32 = 125;

/// Guest command line for containers: the console goes to a log, not the
/// user's terminal, so the kernel stays quiet.
const CONTAINER_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet loglevel=3 no_timer_check";

/// A user error in the flags, reported as one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> Box<dyn std::error::Error> {
    Box::new(UsageError(msg.into()))
}

/// Parses docker's memory notation: a number with an optional b/k/m/g suffix
/// (bytes when bare); returns MiB, rounded up.
///
/// # Errors
/// Not a size, or below 64 MiB.
pub fn parse_memory(text: &str) -> Result<u64> {
    let t = text.trim().to_ascii_lowercase();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t.as_str(), ""),
    };
    let shift = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" if unit.is_empty() || unit == "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        _ => {
            return Err(usage(format!(
                "invalid --memory {text:?}: use e.g. 512m or 2g"
            )))
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| usage(format!("invalid --memory {text:?}: use e.g. 512m or 2g")))?;
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| usage(format!("--memory {text:?} is too large")))?;
    let mib = bytes.div_ceil(1 << 20);
    if mib < 64 {
        return Err(usage(format!(
            "--memory {text:?} is below the 64 MiB a container VM needs"
        )));
    }
    Ok(mib)
}

/// Parses `--cpus` (docker allows fractions; a VM has whole vCPUs: rounded up).
///
/// # Errors
/// Not a number in (0, 32].
pub fn parse_cpus(text: &str) -> Result<u8> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| usage(format!("invalid --cpus {text:?}")))?;
    if !(v > 0.0 && v <= 32.0) {
        return Err(usage(format!(
            "--cpus {text:?} must be more than 0 and at most 32"
        )));
    }
    // In (0, 32]: the cast cannot truncate.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = v.ceil() as u8;
    Ok(n)
}

/// Reads an env file as docker does: `KEY=VALUE` or `KEY` lines, `#` comments.
fn read_env_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("cannot read env file {}: {e}", path.display())))?;
    Ok(text
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// `KEY` alone takes hull's own value (and is dropped when unset), as docker does.
fn resolve_env_entry(entry: &str) -> Option<String> {
    if entry.contains('=') {
        Some(entry.to_string())
    } else {
        std::env::var(entry).ok().map(|v| format!("{entry}={v}"))
    }
}

/// Merges environment lists; later entries replace earlier ones with the same key.
fn merge_env(lists: &[Vec<String>]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for entry in lists.iter().flatten() {
        let key = entry.split('=').next().unwrap_or(entry);
        out.retain(|e| e.split('=').next() != Some(key));
        out.push(entry.clone());
    }
    out
}

/// The container's command by docker's rules: `--entrypoint` replaces the
/// image's entrypoint and drops its cmd; user arguments replace the cmd.
fn command_line(image: &Image, entrypoint: Option<&str>, args: &[String]) -> Result<Vec<String>> {
    let config = image.config.config().clone().unwrap_or_default();
    let (entry, default_cmd) = match entrypoint {
        Some("") => (Vec::new(), Vec::new()),
        Some(e) => (vec![e.to_string()], Vec::new()),
        None => (
            config.entrypoint().clone().unwrap_or_default(),
            config.cmd().clone().unwrap_or_default(),
        ),
    };
    let cmd = if args.is_empty() {
        default_cmd
    } else {
        args.to_vec()
    };
    let all: Vec<String> = entry.into_iter().chain(cmd).collect();
    if all.is_empty() {
        return Err(usage(format!(
            "no command specified: image {} has no entrypoint or cmd; give one after the image name",
            image.names.first().map_or(image.short_id(), String::as_str)
        )));
    }
    Ok(all)
}

/// A fresh random container id (64 hex digits, as docker's).
fn new_id() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(hex::encode(bytes))
}

/// Finds `reference` locally, or pulls it (docker run does).
fn resolve_image(store: &Store, reference: &str, insecure: bool) -> Result<Image> {
    if let Some(image) = store.find(reference)? {
        return Ok(image);
    }
    // The built-in default image: `busybox` works with no registry at all.
    if matches!(
        reference,
        "busybox" | "busybox:latest" | "localhost/busybox" | "localhost/busybox:latest"
    ) && Path::new("/bin/busybox").is_file()
    {
        return Ok(store.create_default_image()?);
    }
    eprintln!("Unable to find image '{reference}' locally");
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    Ok(store.pull(reference, &PullOptions { insecure, progress })?)
}

fn guest_compression(c: Compression) -> GuestCompression {
    match c {
        Compression::None => GuestCompression::None,
        Compression::Gzip => GuestCompression::Gzip,
        Compression::Zstd => GuestCompression::Zstd,
    }
}

/// Signals forwarded to the container while it runs.
const FORWARDED_SIGNALS: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Blocks the forwarded signals in this thread (and the threads it starts
/// later) and returns a signalfd that delivers them.
pub fn forwarded_signals_fd(extra: &[libc::c_int]) -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set = unsafe { std::mem::zeroed::<libc::sigset_t>() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &sig in FORWARDED_SIGNALS.iter().chain(extra) {
        // SAFETY: `set` is a valid sigset_t and `sig` a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    // SAFETY: `set` is initialised; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What a run of the image disk build needs to finish or undo.
pub struct ImageDisk {
    path: PathBuf,
    building: Option<(PathBuf, container::Lock)>,
}

/// The image's root disk: the finished one if it exists; otherwise a fresh,
/// empty one to be filled by the guest (under a lock, so that concurrent
/// first runs of one image build it once).
fn image_disk(store: &Store, image: &Image) -> Result<ImageDisk> {
    let dir = store.image_dir(&image.id);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("rootfs.ext4");
    if path.is_file() {
        return Ok(ImageDisk {
            path,
            building: None,
        });
    }
    let lock = container::Lock::exclusive(&dir.join("rootfs.lock"))?;
    if path.is_file() {
        return Ok(ImageDisk {
            path,
            building: None,
        });
    }
    let tmp = dir.join(format!("rootfs.ext4.building-{}", std::process::id()));
    let layers: u64 = image.layers.iter().map(|l| l.size).sum();
    disks::make_ext4(&tmp, disks::image_disk_size(layers), "hull-image")?;
    Ok(ImageDisk {
        path,
        building: Some((tmp, lock)),
    })
}

/// Records a new container for `args`: image resolved (pulled if need be),
/// command, environment, user and working directory by docker's rules.
///
/// # Errors
/// Bad flags, no such image, a name in use.
pub fn create(args: &RunArgs, store: &Store) -> Result<Container> {
    let memory_mib = parse_memory(&args.memory)?;
    let cpus = parse_cpus(&args.cpus)?;
    let mut env_files = Vec::new();
    for f in &args.env_file {
        env_files.extend(read_env_file(f)?);
    }
    let image = resolve_image(store, &args.image, args.insecure)?;
    let config = image.config.config().clone().unwrap_or_default();
    let argv = command_line(&image, args.entrypoint.as_deref(), &args.command)?;
    let kernel = guest::kernel(args.kernel.as_deref())?;

    let id = new_id()?;
    let hostname = args
        .hostname
        .clone()
        .unwrap_or_else(|| id[..12].to_string());
    let user_env: Vec<String> = env_files
        .iter()
        .chain(&args.env)
        .filter_map(|e| resolve_env_entry(e))
        .collect();
    let env = merge_env(&[
        config.env().clone().unwrap_or_default(),
        vec![format!("HOSTNAME={hostname}")],
        user_env,
    ]);
    let spec = RunSpec {
        args: argv,
        env,
        cwd: args
            .workdir
            .clone()
            .or_else(|| config.working_dir().clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into()),
        user: args
            .user
            .clone()
            .or_else(|| config.user().clone())
            .unwrap_or_default(),
        hostname,
        tty: args.tty,
        stdin: args.interactive,
        rootfs: RootfsSpec {
            image_disk: IMAGE_DISK_SERIAL.into(),
            scratch_disk: SCRATCH_DISK_SERIAL.into(),
            build: None,
        },
    };
    Ok(Containers::new(store.root()).create(ContainerConfig {
        name: args.name.clone().unwrap_or_else(|| generated_name(&id)),
        id,
        image: args.image.clone(),
        image_id: image.id.clone(),
        created: container::now(),
        spec,
        memory_mib,
        cpus,
        kernel,
        auto_remove: args.rm,
    })?)
}

/// Starts the monitor process of `container`, detached from this terminal
/// (its own session, stdio away from ours), and waits until its socket
/// answers, or until it ends.
///
/// # Errors
/// The monitor could not be started or died before it was ready.
pub fn start_monitor(
    store: &Store,
    container: &Container,
    wait_attach: bool,
    debug: bool,
) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    if debug {
        cmd.arg("--debug");
    }
    cmd.arg("__monitor");
    if wait_attach {
        cmd.arg("--wait-attach");
    }
    cmd.arg(&container.config.id);
    let monitor_log = std::fs::File::create(container.path(files::MONITOR_LOG))?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    if debug {
        cmd.stderr(std::process::Stdio::inherit());
    } else {
        cmd.stderr(monitor_log);
    }
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let socket = crate::monitor::socket_path(store.root(), &container.config.id);
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        // Ready once it answers and has recorded the container as running, so
        // a `hull stop` or `kill` right after `run -d` finds it.
        if UnixStream::connect(&socket).is_ok()
            && container
                .state()
                .is_ok_and(|st| st.status == container::Status::Running)
        {
            // Reaped by init once we exit; nothing to wait for here.
            std::mem::forget(child);
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let state = container.state()?;
            return Err(usage(state.error.unwrap_or_else(|| {
                format!("the container's monitor exited ({status}) before it was ready")
            })));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(usage("the container's monitor did not start in time"));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Runs the container; returns hull's exit status.
///
/// # Errors
/// hull itself failed (the container's own failures are exit statuses).
pub fn run(args: &RunArgs, debug: bool) -> Result<i32> {
    let started = Instant::now();
    let store = Store::open(None)?;
    let container = create(args, &store)?;
    let result = start_monitor(&store, &container, !args.detach, debug);
    if let Err(e) = result {
        let _ = Containers::new(store.root()).remove(&container);
        return Err(e);
    }
    if args.detach {
        println!("{}", container.config.id);
        return Ok(0);
    }
    let prep_ms = started.elapsed().as_millis();
    tracing::debug!("host prep done in {prep_ms} ms (image, container, monitor)");
    let mut code = crate::client::attach(&store, &container, args.interactive, args.tty, debug)?;
    if code == crate::client::VANISHED {
        // The session broke off: the monitor records the end in the state.
        code = crate::client::wait_exited(&container).unwrap_or(EXIT_RUNTIME_ERROR);
        let error = container.state().ok().and_then(|s| s.error);
        eprintln!(
            "hull: lost the container's output stream{}",
            error.map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    // Return once the monitor has recorded the end (and, with --rm, removed
    // the container), so the next hull command sees it; bounded, in case the
    // guest hangs on its way down (the monitor then stops it).
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while Instant::now() < deadline {
        let done = if args.rm {
            !container.dir.exists()
        } else {
            container
                .state()
                .is_ok_and(|s| s.status == container::Status::Exited)
        };
        if done {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if debug {
        eprintln!("hull: timing: total {} ms", started.elapsed().as_millis());
    }
    Ok(code)
}

/// A VM ready to start, and what the monitor needs around it.
pub struct PreparedVm {
    /// The VM.
    pub vm_config: vmm::VmConfig,
    /// The run spec for the init.
    pub spec_json: Vec<u8>,
    /// The image disk (to finish once the guest built it).
    pub image_disk: ImageDisk,
    /// The host end of the control stream.
    pub host_end: UnixStream,
    /// Stops the VM from the host.
    pub exit_signal: vmm::ExitSignal,
}

impl Drop for ImageDisk {
    /// A disk still being built when it is dropped was not finished (an
    /// error path): it must not be left behind half-built.
    fn drop(&mut self) {
        if let Some((tmp, _lock)) = &self.building {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Keeps a freshly built image disk (when the guest reported its root
/// ready) or throws the partial one away.
pub fn finish_image_disk(disk: &ImageDisk, built: bool) {
    if let Some((tmp, _lock)) = &disk.building {
        if built {
            if let Err(e) = std::fs::rename(tmp, &disk.path) {
                tracing::warn!("cannot keep the image disk {}: {e}", disk.path.display());
            }
        } else {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Prepares `container`'s VM: kernel, initramfs, image disk (built by the
/// guest on the image's first run), scratch disk, console log.
///
/// # Errors
/// A file could not be prepared.
pub fn prepare_vm(
    store: &Store,
    image: &Image,
    container: &Container,
    debug: bool,
) -> Result<PreparedVm> {
    let mut spec = container.config.spec.clone();
    let initrd = guest::initramfs(&guest::init_binary()?, &store.root().join("cache"))?;
    let image_disk = image_disk(store, image)?;
    let mut disks_cfg = vec![vmm::DiskConfig {
        path: image_disk
            .building
            .as_ref()
            .map_or(image_disk.path.clone(), |(tmp, _)| tmp.clone()),
        read_only: image_disk.building.is_none(),
        serial: IMAGE_DISK_SERIAL.into(),
        then: Vec::new(),
    }];
    let scratch = container.path(files::SCRATCH);
    disks::make_ext4(&scratch, disks::SCRATCH_DISK_SIZE, "hull-scratch")?;
    disks_cfg.push(vmm::DiskConfig {
        path: scratch,
        read_only: false,
        serial: SCRATCH_DISK_SERIAL.into(),
        then: Vec::new(),
    });
    if image_disk.building.is_some() && !image.layers.is_empty() {
        // Every layer blob, as stored, one after the other on one read-only
        // disk: no copy, and any number of layers.
        let paths: Vec<PathBuf> = image
            .layers
            .iter()
            .map(|l| store.blob_path(&l.digest))
            .collect();
        let sizes: Vec<u64> = image.layers.iter().map(|l| l.size).collect();
        let (offsets, _) = devices::virtio::concat_layout(&sizes)
            .ok_or_else(|| usage("the image's layers are too large"))?;
        spec.rootfs.build = Some(
            image
                .layers
                .iter()
                .zip(offsets)
                .map(|(layer, offset)| LayerSpec {
                    disk: LAYERS_DISK_SERIAL.into(),
                    offset,
                    size: layer.size,
                    compression: guest_compression(layer.compression),
                    digest: layer.digest.clone(),
                })
                .collect(),
        );
        disks_cfg.push(vmm::DiskConfig {
            path: paths[0].clone(),
            read_only: true,
            serial: LAYERS_DISK_SERIAL.into(),
            then: paths[1..].to_vec(),
        });
    } else if image_disk.building.is_some() {
        spec.rootfs.build = Some(Vec::new());
    }
    let console_out: Box<dyn Write + Send> = if debug {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::fs::File::create(container.path(files::CONSOLE))?)
    };
    let (host_end, guest_end) = UnixStream::pair()?;
    let exit_signal = vmm::ExitSignal::new()?;
    let vm_config = vmm::VmConfig {
        boot: vmm::BootSource {
            kernel: container.config.kernel.clone(),
            initrd: Some(initrd),
            cmdline: CONTAINER_CMDLINE.into(),
        },
        memory_mib: container.config.memory_mib,
        cpus: container.config.cpus,
        kvm_path: "/dev/kvm".into(),
        guest_needs: vmm::GuestNeeds::LinuxKernel,
        console_out,
        console_in: None,
        disks: disks_cfg,
        control: Some(guest_end),
        entropy: true,
        exit_signal: Some(exit_signal.clone()),
    };
    Ok(PreparedVm {
        vm_config,
        spec_json: serde_json::to_vec(&spec)?,
        image_disk,
        host_end,
        exit_signal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_follows_docker_notation() {
        assert_eq!(parse_memory("512m").unwrap(), 512);
        assert_eq!(parse_memory("1g").unwrap(), 1024);
        assert_eq!(parse_memory("1G").unwrap(), 1024);
        assert_eq!(parse_memory("268435456").unwrap(), 256);
        assert_eq!(parse_memory("100000k").unwrap(), 98);
        assert!(parse_memory("12m").is_err());
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("5x").is_err());
    }

    #[test]
    fn cpus_round_up() {
        assert_eq!(parse_cpus("1").unwrap(), 1);
        assert_eq!(parse_cpus("1.5").unwrap(), 2);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("33").is_err());
        assert!(parse_cpus("x").is_err());
    }

    #[test]
    fn later_env_entries_win() {
        let merged = merge_env(&[
            vec!["PATH=/bin".into(), "A=1".into()],
            vec!["A=2".into(), "B=3".into()],
        ]);
        assert_eq!(merged, vec!["PATH=/bin", "A=2", "B=3"]);
    }
}

//! `hull run`: an OCI image's command in a fresh microVM.
//!
//! The CLI's side of a start, one way: resolve the image in the store
//! (pulling it if need be), turn its config and the user's flags into a run
//! spec (docker's rules), record the container, start its monitor process,
//! and relay the container's stdio until the guest init reports how it
//! ended. The monitor's side (the VM's disks, servers and backends) is
//! [`crate::vmprep`].

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use hull_protocol::spec::{
    RootfsSpec, RunSpec, SecuritySpec, IMAGE_DISK_SERIAL, SCRATCH_DISK_SERIAL,
};
use images::{Image, PullOptions, Store};

use crate::cli::RunArgs;
use crate::container::{self, files, generated_name, Container, ContainerConfig, Containers};
use crate::flags::{parse_cpus, parse_memory, usage};
use crate::{guest, imagedisk};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The container's confinement from the flags (docker's rules): validated
/// here, before any image or VM.
///
/// # Errors
/// A bad capability, limit, parameter, size or signal (one line each).
fn security_spec(args: &RunArgs) -> Result<SecuritySpec> {
    use hull_protocol::security as sec;
    let mut spec = SecuritySpec {
        capabilities: sec::capabilities(&args.cap_add, &args.cap_drop, args.privileged)
            .map_err(usage)?,
        privileged: args.privileged,
        init: args.init,
        ..SecuritySpec::default()
    };
    let ulimits = args
        .ulimit
        .iter()
        .map(|u| sec::parse_ulimit(u))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(usage)?;
    spec.ulimits = sec::merge_ulimits(ulimits);
    for s in &args.sysctl {
        let (k, v) = sec::parse_sysctl(s).map_err(usage)?;
        spec.sysctls.retain(|(old, _)| *old != k);
        spec.sysctls.push((k, v));
    }
    if let Some(size) = &args.shm_size {
        spec.shm_size = match crate::flags::parse_size(size) {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(usage(format!(
                    "invalid --shm-size {size:?}: use e.g. 64m or 1g"
                )))
            }
        };
    }
    if let Some(sig) = &args.stop_signal {
        spec.stop_signal =
            sec::parse_signal(sig).map_err(|e| usage(format!("--stop-signal: {e}")))?;
    }
    spec.memory_bytes = crate::flags::parse_size(&args.memory).unwrap_or(0);
    // The quota docker sets for --cpus (validated by parse_cpus).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let millis = args
        .cpus
        .trim()
        .parse::<f64>()
        .map_or(0, |c| (c * 1000.0).round().max(0.0) as u64);
    spec.cpu_millis = millis;
    Ok(spec)
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
/// Whether `reference` is the built-in default image: `busybox` works with
/// no registry at all (made from the host's /bin/busybox).
pub(crate) fn is_builtin_image(reference: &str) -> bool {
    matches!(
        reference,
        "busybox" | "busybox:latest" | "localhost/busybox" | "localhost/busybox:latest"
    ) && Path::new("/bin/busybox").is_file()
}

/// Finds `reference` locally, or pulls it (docker run does).
fn resolve_image(store: &Store, reference: &str, insecure: bool) -> Result<Image> {
    if let Some(image) = store.find(reference)? {
        return Ok(image);
    }
    if is_builtin_image(reference) {
        return Ok(store.create_default_image()?);
    }
    eprintln!("Unable to find image '{reference}' locally");
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    Ok(store.pull(reference, &PullOptions { insecure, progress })?)
}

/// Records a new container for `args`: image resolved (pulled if need be)
/// and its root file system built (once per image, in a VM of its own),
/// command, environment, user and working directory by docker's rules.
///
/// # Errors
/// Bad flags, no such image, a failed image build, a name in use.
pub fn create(args: &RunArgs, store: &Store, debug: bool) -> Result<Container> {
    let memory_mib = parse_memory(&args.memory)?;
    let cpus = parse_cpus(&args.cpus)?;
    let log = crate::logfile::LogOptions::parse(args.log_driver.as_deref(), &args.log_opt)?;
    let net_flags = crate::network::flags(args);
    crate::network::check_flags(&net_flags)?;
    let mut security = security_spec(args)?;
    let mut env_files = Vec::new();
    for f in &args.env_file {
        env_files.extend(read_env_file(f)?);
    }
    let mut mounts = crate::volume::parse_all(&args.volume, &args.mount, &args.tmpfs)?;
    let image = resolve_image(store, &args.image, args.insecure)?;
    let config = image.config.config().clone().unwrap_or_default();
    crate::volume::add_image_volumes(&mut mounts, &config.volumes().clone().unwrap_or_default());
    crate::volume::sort_for_mounting(&mut mounts);
    if args.stop_signal.is_none() {
        if let Some(sig) = config.stop_signal().as_deref().filter(|s| !s.is_empty()) {
            security.stop_signal = hull_protocol::security::parse_signal(sig)
                .map_err(|e| usage(format!("the image's StopSignal: {e}")))?;
        }
    }
    let argv = command_line(&image, args.entrypoint.as_deref(), &args.command)?;
    // Host ports are chosen and checked free before the image disk is built.
    let exposed = config.exposed_ports().clone().unwrap_or_default();
    let mut net = crate::network::plan(&net_flags, &exposed)?;
    let kernel = guest::kernel(args.kernel.as_deref())?;
    imagedisk::ensure(store, &image, &kernel, debug)?;

    crate::volume::create_volumes(store.root(), &mut mounts)?;
    let id = crate::container::new_id()?;
    net.config.mac = crate::network::mac_for(&id);
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
            chain: imagedisk::chain(&image),
            build: None,
        },
        network: net.spec,
        security,
        mounts: crate::volume::guest_mounts(&mounts),
        read_only: args.read_only,
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
        log,
        network: Some(net.config),
        mounts,
        labels: args
            .label
            .iter()
            .map(|l| match l.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (l.clone(), String::new()),
            })
            .collect(),
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
    let child = spawn_monitor(store, container, wait_attach, debug)?;
    // Reaped by init once we exit; nothing to wait for here.
    std::mem::forget(child);
    Ok(())
}

/// [`start_monitor`], returning the monitor process for a long-lived
/// caller (`hull system service`) to reap.
///
/// # Errors
/// The monitor could not be started or died before it was ready.
pub fn spawn_monitor(
    store: &Store,
    container: &Container,
    wait_attach: bool,
    debug: bool,
) -> Result<std::process::Child> {
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
    let socket = crate::container::socket_path(store.root(), &container.config.id);
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        // Ready once it answers and has recorded the container as running, so
        // a `hull stop` or `kill` right after `run -d` finds it.
        if UnixStream::connect(&socket).is_ok()
            && container
                .state()
                .is_ok_and(|st| st.status == container::Status::Running)
        {
            return Ok(child);
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
    let container = create(args, &store, debug)?;
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
        code = crate::client::wait_exited(&container).unwrap_or(crate::flags::EXIT_RUNTIME_ERROR);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        use clap::Parser;
        let cli =
            crate::cli::Cli::try_parse_from(["hull", "run"].iter().chain(args).chain(&["img"]))
                .unwrap();
        match cli.command {
            crate::cli::Command::Run(a) => a,
            other => panic!("not a run: {other:?}"),
        }
    }

    #[test]
    fn security_flags_follow_docker() {
        let d = security_spec(&run_args(&[])).unwrap();
        assert_eq!(
            hull_protocol::security::cap_mask(&d.capabilities),
            0xa804_25fb
        );
        assert_eq!(d.shm_size, 64 << 20);
        assert_eq!(d.stop_signal, 15);
        assert_eq!((d.memory_bytes, d.cpu_millis), (512 << 20, 1000));
        assert!(!d.privileged && !d.init);

        let s = security_spec(&run_args(&[
            "--cap-add",
            "net_admin",
            "--cap-drop",
            "MKNOD",
            "--ulimit",
            "nofile=10:20",
            "--sysctl",
            "net.ipv4.ip_unprivileged_port_start=1024",
            "--shm-size",
            "1m",
            "--stop-signal",
            "SIGUSR1",
            "--cpus",
            "1.5",
            "-m",
            "1g",
            "--init",
        ]))
        .unwrap();
        assert_eq!(
            hull_protocol::security::cap_mask(&s.capabilities),
            0xa004_35fb
        );
        let nofile = s.ulimits.iter().find(|u| u.name == "nofile").unwrap();
        assert_eq!((nofile.soft, nofile.hard), (10, 20));
        // --sysctl replaces docker's default of the same key.
        assert!(s
            .sysctls
            .contains(&("net.ipv4.ip_unprivileged_port_start".into(), "1024".into())));
        assert_eq!(s.sysctls.len(), 2);
        assert_eq!(s.shm_size, 1 << 20);
        assert_eq!(s.stop_signal, libc::SIGUSR1);
        assert_eq!((s.memory_bytes, s.cpu_millis), (1 << 30, 1500));
        assert!(s.init);

        let p = security_spec(&run_args(&["--privileged"])).unwrap();
        assert_eq!(p.capabilities.len(), 41);

        for bad in [
            &["--cap-add", "NOPE"][..],
            &["--ulimit", "nofile=5:1"],
            &["--sysctl", "novalue"],
            &["--shm-size", "0"],
            &["--stop-signal", "SIGNOPE"],
        ] {
            let e = security_spec(&run_args(bad)).unwrap_err();
            assert!(
                e.downcast_ref::<crate::flags::UsageError>().is_some(),
                "{bad:?}: {e}"
            );
        }
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

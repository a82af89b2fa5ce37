//! What each verb does.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use crate::cli::PortArgs;
use crate::cli::{
    BootArgs, Command, ContainerCommand, ContainersArg, ExecArgs, ImageCommand, ImagesArgs,
    ImportArgs, KernelBuildArgs, KernelCommand, KillArgs, LoadArgs, LoginArgs, LogsArgs, PsArgs,
    PullArgs, RmArgs, RmiArgs, StopArgs,
};
use crate::container::{Container, Containers, Status};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Runs one verb; its exit status on success.
pub fn dispatch(command: Command, debug: bool) -> Result<ExitCode> {
    match command {
        Command::Run(args) => {
            let code = crate::run::run(&args, debug)?;
            Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
        }
        Command::Exec(args) => exec(&args, debug),
        Command::Ps(args) | Command::Container(ContainerCommand::Ls(args)) => ps(&args),
        Command::Logs(args) => logs(&args),
        Command::Stop(args) => stop(&args),
        Command::Kill(args) => kill(&args),
        Command::Wait(args) => wait(&args),
        Command::Rm(args) => rm(&args),
        Command::Inspect(args) => inspect(&args),
        Command::Port(args) => port(&args),
        Command::Container(ContainerCommand::Prune) => container_prune(),
        Command::Vmm => Ok(ExitCode::from(
            u8::try_from(crate::vmmproc::child_main()).unwrap_or(125),
        )),
        Command::Monitor(args) => {
            crate::monitor::run(&args.id, args.wait_attach, debug)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pull(args) => pull(&args),
        Command::Login(args) => login(&args),
        Command::Images(args) | Command::Image(ImageCommand::Ls(args)) => images(&args),
        Command::Rmi(args) | Command::Image(ImageCommand::Rm(args)) => rmi(&args),
        Command::Image(ImageCommand::Prune) => prune(),
        Command::Load(args) => load(&args),
        Command::Import(args) => import(&args),
        Command::Boot(args) => boot(args),
        Command::Kernel(KernelCommand::Build(args)) => kernel_build(&args),
        Command::Volume(cmd) => volume(cmd),
        Command::System(crate::cli::SystemCommand::Service(args)) => {
            crate::api::serve(&args, debug)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cp(args) => {
            crate::cp::cp(&args.source, &args.destination, args.archive)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `hull volume ...`.
fn volume(cmd: crate::cli::VolumeCommand) -> Result<ExitCode> {
    use crate::cli::VolumeCommand;
    use crate::volume::{parse_volume_opts, Volumes};
    let store = store()?;
    let volumes = Volumes::new(store.root());
    let containers = Containers::new(store.root());
    match cmd {
        VolumeCommand::Create(args) => {
            let size = parse_volume_opts(&args.opt)?;
            let name = match args.name {
                Some(n) => n,
                None => crate::container::new_id()?,
            };
            println!("{}", volumes.create(&name, size, false)?.info.name);
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Ls(args) => {
            let list = volumes.list()?;
            if !args.quiet {
                println!("DRIVER    VOLUME NAME");
            }
            for v in list {
                if args.quiet {
                    println!("{}", v.info.name);
                } else {
                    println!("local     {}", v.info.name);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Inspect(args) => {
            let mut out = Vec::new();
            let mut failed = false;
            for name in &args.volumes {
                match volumes.find(name) {
                    Ok(v) => out.push(serde_json::json!({
                        "Name": v.info.name,
                        "Driver": "local",
                        "Mountpoint": v.disk(),
                        "CreatedAt": v.info.created,
                        "Options": { "size": v.info.size.to_string() },
                        "Labels": {},
                        "Scope": "local",
                        "Anonymous": v.info.anonymous,
                        "InUse": v.in_use()?,
                    })),
                    Err(e) => {
                        eprintln!("hull: {e}");
                        failed = true;
                    }
                }
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        VolumeCommand::Rm(args) => {
            let mut failed = false;
            for name in &args.volumes {
                match volumes.remove(name, &containers) {
                    Ok(_) => println!("{name}"),
                    Err(e) => {
                        eprintln!("hull: {e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        VolumeCommand::Prune(args) => {
            let mut freed = 0;
            for v in volumes.list()? {
                if !(args.all || v.info.anonymous) {
                    continue;
                }
                if let Ok(n) = volumes.remove(&v.info.name, &containers) {
                    freed += n;
                    println!("Deleted: {}", v.info.name);
                }
            }
            println!("Total reclaimed space: {}", human_size(freed));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn boot(args: BootArgs) -> Result<ExitCode> {
    // A console that is a terminal or a pipe can be forwarded to the guest;
    // /dev/null and regular files are refused by epoll, and `SerialInput`
    // copes with that, but there is no point trying when stdin is closed.
    let stdin = std::io::stdin();
    let console_in = (stdin.is_terminal() || is_fifo(&stdin)).then(|| stdin.as_raw_fd());
    let config = vmm::VmConfig {
        boot: vmm::BootSource {
            kernel: args.kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
        },
        memory_mib: args.memory,
        cpus: args.cpus,
        kvm_path: args.kvm,
        guest_needs: vmm::GuestNeeds::LinuxKernel,
        console_out: Box::new(std::io::stdout()),
        console_in,
        disks: Vec::new(),
        shares: Vec::new(),
        control: None,
        entropy: false,
        net: None,
        exit_signal: None,
        boot_times: None,
        seccomp: crate::vmmproc::seccomp_mode(vmm::SeccompMode::Off),
    };
    let exit = vmm::run(config)?;
    if exit.is_clean() {
        tracing::debug!("{exit}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("hull: {exit}");
        Ok(ExitCode::FAILURE)
    }
}

fn is_fifo(_stdin: &std::io::Stdin) -> bool {
    use std::os::unix::fs::FileTypeExt;
    // /dev/stdin resolves to whatever fd 0 is.
    std::fs::metadata("/dev/stdin")
        .is_ok_and(|m| m.file_type().is_fifo() || m.file_type().is_socket())
}

fn kernel_build(args: &KernelBuildArgs) -> Result<ExitCode> {
    let built = images::kernel::build(&images::kernel::KernelBuildOptions {
        source_tarball: args.source.clone(),
        cache_dir: None,
        jobs: args.jobs,
        force: args.force,
    })?;
    if built.cached {
        eprintln!("hull: using the cached kernel build");
    }
    eprintln!("bzImage: {}", built.bzimage.display());
    println!("{}", built.vmlinux.display());
    Ok(ExitCode::SUCCESS)
}

fn store() -> Result<images::Store> {
    Ok(images::Store::open(None)?)
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
}

/// Runs `each` on every named container; reports failures per container
/// (as docker does) and fails at the end if any did.
fn for_each_container(
    keys: &[String],
    mut each: impl FnMut(&images::Store, &Container) -> Result<()>,
) -> Result<ExitCode> {
    let store = store()?;
    let containers = Containers::new(store.root());
    let mut failed = false;
    for key in keys {
        let result = containers
            .find(key)
            .map_err(Into::into)
            .and_then(|c| each(&store, &c));
        if let Err(e) = result {
            eprintln!("hull: {}", crate::error_chain(e.as_ref()));
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn exec(args: &ExecArgs, debug: bool) -> Result<ExitCode> {
    let store = store()?;
    let container = Containers::new(store.root()).find(&args.container)?;
    let spec = hull_protocol::spec::ExecSpec {
        args: args.command.clone(),
        env: args.env.clone(),
        cwd: args.workdir.clone(),
        user: args.user.clone(),
        tty: args.tty,
        stdin: args.interactive,
    };
    match crate::client::exec(&store, &container, spec, debug)? {
        crate::client::VANISHED => {
            eprintln!("hull: the container's monitor went away");
            Ok(exit_code(crate::flags::EXIT_RUNTIME_ERROR))
        }
        code => Ok(exit_code(code)),
    }
}

fn ago(secs: u64) -> String {
    format!("{} ago", crate::container::since(secs))
}

fn ps(args: &PsArgs) -> Result<ExitCode> {
    let store = store()?;
    let list = Containers::new(store.root()).list()?;
    if !args.quiet {
        println!(
            "{:<14} {:<24} {:<24} {:<16} {:<24} {:<24} NAMES",
            "CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS"
        );
    }
    for c in list {
        let state = c.state()?;
        if !args.all && state.status != Status::Running {
            continue;
        }
        if args.quiet {
            println!("{}", c.short_id());
            continue;
        }
        let status = match state.status {
            Status::Created => "Created".to_string(),
            Status::Running => format!(
                "Up {}",
                crate::container::since(state.started.unwrap_or(c.config.created))
            ),
            Status::Exited => format!(
                "Exited ({}) {}",
                state.exit_code.unwrap_or(-1),
                ago(state.finished.unwrap_or(c.config.created))
            ),
        };
        let mut command = format!("\"{}\"", c.config.spec.args.join(" "));
        if command.len() > 22 {
            command.truncate(20);
            command.push_str("…\"");
        }
        println!(
            "{:<14} {:<24} {:<24} {:<16} {:<24} {:<24} {}",
            c.short_id(),
            c.config.image,
            command,
            ago(c.config.created),
            status,
            ps_ports(&c, state.status),
            c.config.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints log records (docker json-file lines) to stdout or stderr by stream.
#[derive(Debug)]
struct LogPrinter {
    stdout: std::io::BufWriter<std::io::Stdout>,
}

impl LogPrinter {
    fn new() -> Self {
        Self {
            stdout: std::io::BufWriter::with_capacity(64 << 10, std::io::stdout()),
        }
    }

    fn record(&mut self, line: &[u8]) {
        use std::io::Write;
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            return;
        };
        let log = v.get("log").and_then(|l| l.as_str()).unwrap_or_default();
        if v.get("stream").and_then(|s| s.as_str()) == Some("stderr") {
            // In order with what went to stdout before it.
            let _ = self.stdout.flush();
            let _ = std::io::stderr().write_all(log.as_bytes());
        } else {
            let _ = self.stdout.write_all(log.as_bytes());
        }
    }

    fn flush(&mut self) {
        use std::io::Write;
        let _ = self.stdout.flush();
    }
}

fn logs(args: &LogsArgs) -> Result<ExitCode> {
    let store = store()?;
    let container = Containers::new(store.root()).find(&args.container)?;
    if container.config.log.driver == crate::logfile::LogDriver::None {
        return Err(crate::flags::usage(format!(
            "container {} logs nothing (--log-driver none): its output went only to whoever was attached",
            container.config.name
        )));
    }
    let path = container.path(crate::container::files::LOG);
    // The rotated files, oldest first, then the current one.
    let mut reader = crate::logfile::LogReader::open(&path, container.config.log.max_file)?;
    let mut printer = LogPrinter::new();
    match args.tail {
        None => reader.read_available(&mut |r| printer.record(r))?,
        Some(n) => {
            let mut last = std::collections::VecDeque::with_capacity(n.min(4096));
            reader.read_available(&mut |r| {
                if n > 0 {
                    if last.len() == n {
                        last.pop_front();
                    }
                    last.push_back(r.to_vec());
                }
            })?;
            for r in &last {
                printer.record(r);
            }
        }
    }
    printer.flush();
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        let running = container.state()?.status == Status::Running;
        // Across a rotation too: the file being read is renamed under it.
        reader.read_available(&mut |r| printer.record(r))?;
        printer.flush();
        if !running {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn stop(args: &StopArgs) -> Result<ExitCode> {
    for_each_container(&args.containers, |store, c| {
        crate::client::stop(store, c, args.time)?;
        println!("{}", c.config.name);
        Ok(())
    })
}

/// A signal by name (`TERM`, `SIGTERM`) or number.
fn parse_signal(text: &str) -> Result<i32> {
    if let Ok(n) = text.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let name = text.trim_start_matches("SIG").to_ascii_uppercase();
    let known = [
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("KILL", libc::SIGKILL),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("TERM", libc::SIGTERM),
        ("STOP", libc::SIGSTOP),
        ("CONT", libc::SIGCONT),
        ("WINCH", libc::SIGWINCH),
        ("ALRM", libc::SIGALRM),
        ("PIPE", libc::SIGPIPE),
    ];
    known
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| format!("invalid signal {text:?}: use a name like TERM or a number").into())
}

fn kill(args: &KillArgs) -> Result<ExitCode> {
    let sig = parse_signal(&args.signal)?;
    for_each_container(&args.containers, |store, c| {
        if c.state()?.status != Status::Running {
            return Err(format!("container {} is not running", c.config.name).into());
        }
        crate::client::signal(store, c, sig)?;
        println!("{}", c.config.name);
        Ok(())
    })
}

fn wait(args: &ContainersArg) -> Result<ExitCode> {
    for_each_container(&args.containers, |_, c| {
        let code = crate::client::wait_exited(c).ok_or("cannot read the container's state")?;
        println!("{code}");
        Ok(())
    })
}

fn rm(args: &RmArgs) -> Result<ExitCode> {
    for_each_container(&args.containers, |store, c| {
        if c.state()?.status == Status::Running {
            if !args.force {
                return Err(format!(
                    "container {} is running: stop it first, or use `hull rm -f`",
                    c.config.name
                )
                .into());
            }
            crate::client::stop(store, c, 0)?;
        }
        Containers::new(store.root()).remove(c)?;
        println!("{}", c.config.name);
        Ok(())
    })
}

fn container_prune() -> Result<ExitCode> {
    let store = store()?;
    let containers = Containers::new(store.root());
    let mut freed = 0;
    for c in containers.list()? {
        if c.state()?.status == Status::Exited {
            freed += containers.remove(&c)?;
            println!("Deleted: {}", c.config.id);
        }
    }
    println!("Total reclaimed space: {}", human_size(freed));
    Ok(ExitCode::SUCCESS)
}

/// The PORTS column of `ps`: a running container's published ports.
fn ps_ports(c: &Container, status: Status) -> String {
    match (&c.config.network, status) {
        (Some(n), Status::Running) => n
            .ports
            .iter()
            .map(crate::network::PortMapping::short)
            .collect::<Vec<_>>()
            .join(", "),
        _ => String::new(),
    }
}

/// `inspect`'s `NetworkSettings`, as docker shapes it.
fn network_settings(c: &Container) -> serde_json::Value {
    let Some(n) = &c.config.network else {
        return serde_json::json!({ "Network": "none", "Ports": {} });
    };
    let mut ports = serde_json::Map::new();
    for m in &n.ports {
        let entry = ports
            .entry(m.key())
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let serde_json::Value::Array(list) = entry {
            list.push(serde_json::json!({
                "HostIp": m.host_ip.to_string(),
                "HostPort": m.host_port.to_string(),
            }));
        }
    }
    let spec = &c.config.spec.network;
    serde_json::json!({
        "Network": n.mode.name(),
        "IPAddress": n.ip().map(|a| a.to_string()).unwrap_or_default(),
        "IPPrefixLen": if n.ip().is_some() { crate::network::PREFIX } else { 0 },
        "Gateway": n.gateway().map(|a| a.to_string()).unwrap_or_default(),
        "MacAddress": if n.mode == crate::network::Mode::None { "" } else { n.mac.as_str() },
        "Dns": spec.dns,
        "Ports": ports,
    })
}

/// `hull port`: where the container's ports are published, as docker prints it.
fn port(args: &PortArgs) -> Result<ExitCode> {
    let store = store()?;
    let c = Containers::new(store.root()).find(&args.container)?;
    let ports = c
        .config
        .network
        .as_ref()
        .map(|n| n.ports.clone())
        .unwrap_or_default();
    let filter = args.port.as_deref().map(|p| {
        if p.contains('/') {
            p.to_string()
        } else {
            format!("{p}/tcp")
        }
    });
    let mut found = false;
    for m in &ports {
        match &filter {
            Some(f) if *f == m.key() => println!("{}:{}", m.host_ip, m.host_port),
            Some(_) => continue,
            None => println!("{}", m.describe()),
        }
        found = true;
    }
    match filter {
        Some(f) if !found => Err(format!(
            "no public port {f} published for container {}",
            c.config.name
        )
        .into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn inspect(args: &ContainersArg) -> Result<ExitCode> {
    let mut out = Vec::new();
    let code = for_each_container(&args.containers, |_, c| {
        let state = c.state()?;
        out.push(serde_json::json!({
            "Id": c.config.id,
            "Name": c.config.name,
            "Created": c.config.created,
            "Image": c.config.image,
            "ImageId": c.config.image_id,
            "Config": {
                "Cmd": c.config.spec.args,
                "Env": c.config.spec.env,
                "WorkingDir": c.config.spec.cwd,
                "User": c.config.spec.user,
                "Hostname": c.config.spec.hostname,
                "Tty": c.config.spec.tty,
                "OpenStdin": c.config.spec.stdin,
            },
            "State": {
                "Status": state.status,
                "Running": state.status == Status::Running,
                "Pid": state.pid,
                "ExitCode": state.exit_code,
                "Error": state.error,
                "StartedAt": state.started,
                "FinishedAt": state.finished,
                "BootTimes": state.boot_times,
            },
            "HostConfig": {
                "Memory": c.config.memory_mib << 20,
                "Cpus": c.config.cpus,
                "AutoRemove": c.config.auto_remove,
                "Kernel": c.config.kernel,
                "LogConfig": c.config.log.docker_log_config(),
            },
            "Mounts": std::iter::once(serde_json::json!(
                { "Type": "overlay", "Destination": "/", "Upper": c.path(crate::container::files::SCRATCH), "RW": !c.config.spec.read_only }
            ))
            .chain(c.config.mounts.iter().map(crate::volume::inspect_mount))
            .collect::<Vec<_>>(),
            "NetworkSettings": network_settings(c),
            "LogPath": c.path(crate::container::files::LOG),
        }));
        Ok(())
    })?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(code)
}

fn pull(args: &PullArgs) -> Result<ExitCode> {
    let progress = std::io::stderr().is_terminal();
    let image = store()?.pull(
        &args.reference,
        &images::PullOptions {
            insecure: args.insecure,
            progress,
        },
    )?;
    println!("{}", image.id);
    Ok(ExitCode::SUCCESS)
}

fn login(args: &LoginArgs) -> Result<ExitCode> {
    let password = match (&args.password, args.password_stdin) {
        (Some(p), false) => p.clone(),
        (None, true) => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim_end_matches(['\n', '\r']).to_string()
        }
        _ => {
            return Err(
                "give the password with exactly one of --password-stdin or --password".into(),
            )
        }
    };
    images::login_with(&args.registry, &args.username, &password, args.insecure)?;
    println!("Login Succeeded");
    Ok(ExitCode::SUCCESS)
}

/// Docker's human sizes (decimal units).
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    #[allow(clippy::cast_precision_loss)] // display only
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + UNITS[unit]
    }
}

fn images(args: &ImagesArgs) -> Result<ExitCode> {
    let list = store()?.list()?;
    if args.quiet {
        for image in &list {
            println!("{}", image.short_id());
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<40} {:<16} {:<14} {:>10}",
        "REPOSITORY", "TAG", "IMAGE ID", "SIZE"
    );
    for image in &list {
        let size = human_size(image.size);
        if image.names.is_empty() {
            println!(
                "{:<40} {:<16} {:<14} {:>10}",
                "<none>",
                "<none>",
                image.short_id(),
                size
            );
        }
        for name in &image.names {
            let (repo, tag) = match name.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, t),
                _ => (name.as_str(), "<none>"),
            };
            println!("{repo:<40} {tag:<16} {:<14} {size:>10}", image.short_id());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn rmi(args: &RmiArgs) -> Result<ExitCode> {
    let store = store()?;
    let mut failed = false;
    for reference in &args.images {
        match store.remove(reference) {
            Ok(removed) => {
                for name in &removed.untagged {
                    println!("Untagged: {name}");
                }
                if let Some(id) = &removed.deleted {
                    println!("Deleted: {id}");
                }
            }
            Err(e) => {
                eprintln!("hull: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn prune() -> Result<ExitCode> {
    let report = store()?.prune()?;
    for id in &report.images_removed {
        println!("Deleted: {id}");
    }
    println!("Total reclaimed space: {}", human_size(report.bytes_freed));
    Ok(ExitCode::SUCCESS)
}

fn load(args: &LoadArgs) -> Result<ExitCode> {
    for image in store()?.load_archive(&args.input)? {
        match image.names.first() {
            Some(name) => println!("Loaded image: {name}"),
            None => println!("Loaded image ID: {}", image.id),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn import(args: &ImportArgs) -> Result<ExitCode> {
    let image = store()?.import_rootfs(&args.tarball, &args.name)?;
    println!("{}", image.id);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes_read_like_docker() {
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_234_000), "1.234MB");
        assert_eq!(human_size(5_000_000_000), "5GB");
    }
}

//! The command line: verbs and flags, as a user of docker or podman expects them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run OCI containers, each in its own KVM microVM.
#[derive(Debug, Parser)]
#[command(name = "hull", version, about)]
pub struct Cli {
    /// Print what hull does, with timings, on stderr (or set HULL_LOG=debug).
    #[arg(long, global = true)]
    pub debug: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// hull's verbs.
// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a new container, in its own microVM.
    Run(RunArgs),
    /// Run a command in a running container.
    Exec(ExecArgs),
    /// List containers.
    Ps(PsArgs),
    /// Print a container's output.
    Logs(LogsArgs),
    /// Stop containers (SIGTERM, then SIGKILL after the grace period).
    Stop(StopArgs),
    /// Send a signal to containers.
    Kill(KillArgs),
    /// Wait for containers to end; print their exit codes.
    Wait(ContainersArg),
    /// Remove containers.
    Rm(RmArgs),
    /// Show containers' details as JSON.
    Inspect(ContainersArg),
    /// List a container's published ports (or where one of its ports is published).
    Port(PortArgs),
    /// Manage containers.
    #[command(subcommand)]
    Container(ContainerCommand),
    /// Run a container's monitor (internal: started by `hull run`).
    #[command(name = "__monitor", hide = true)]
    Monitor(MonitorArgs),
    /// Run a container's VMM (internal: started by its monitor, which hands
    /// it its VM on stdin).
    #[command(name = "__vmm", hide = true)]
    Vmm,
    /// Pull an image from a registry.
    Pull(PullArgs),
    /// Log in to a registry (credentials go to docker's config.json).
    Login(LoginArgs),
    /// List images.
    Images(ImagesArgs),
    /// Remove images.
    Rmi(RmiArgs),
    /// Load images from a docker-archive or oci-archive tarball.
    Load(LoadArgs),
    /// Make an image from a plain root file system tarball.
    Import(ImportArgs),
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Boot a kernel directly in a microVM (low level: no image, no container).
    Boot(BootArgs),
    /// Build or locate the guest kernel.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Copy files between a running container and the host (tar archives with `-`).
    Cp(CpArgs),
    /// Serve hull to docker's clients.
    #[command(subcommand)]
    System(SystemCommand),
}

/// `hull system ...`.
#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Serve the Docker Engine API (for the docker CLI, compose and SDKs).
    Service(ServiceArgs),
}

/// `hull system service`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// The UNIX socket (default: docker.sock in hull's store root).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Also listen on TCP, unauthenticated: tcp://IP:PORT (keep it on loopback).
    #[arg(long, value_name = "tcp://IP:PORT")]
    pub listen: Option<String>,
}

/// `hull volume ...`.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume (an ext4 disk image, sparse).
    Create(VolumeCreateArgs),
    /// List volumes.
    Ls(VolumeLsArgs),
    /// Show volumes' details as JSON.
    Inspect(VolumeNamesArg),
    /// Remove volumes (refused while a container uses one).
    Rm(VolumeNamesArg),
    /// Remove unused anonymous volumes (`--all`: every unused volume).
    Prune(VolumePruneArgs),
}

/// `hull volume create`.
#[derive(Debug, Args)]
pub struct VolumeCreateArgs {
    /// A driver option: size=SIZE (default 10g).
    #[arg(short = 'o', long = "opt", value_name = "KEY=VALUE")]
    pub opt: Vec<String>,
    /// The volume's name (default: a random one).
    pub name: Option<String>,
}

/// `hull volume ls`.
#[derive(Debug, Args)]
pub struct VolumeLsArgs {
    /// Only print names.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// Volume names.
#[derive(Debug, Args)]
pub struct VolumeNamesArg {
    /// Volumes.
    #[arg(required = true)]
    pub volumes: Vec<String>,
}

/// `hull volume prune`.
#[derive(Debug, Args)]
pub struct VolumePruneArgs {
    /// Also named volumes no container uses.
    #[arg(short = 'a', long)]
    pub all: bool,
}

/// `hull cp`.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// `CONTAINER:PATH`, a host path, or `-` (a tar archive on stdin).
    pub source: String,
    /// `CONTAINER:PATH`, a host path, or `-` (a tar archive on stdout).
    pub destination: String,
    /// Keep the archive's owners (uid/gid) on what is copied out (as root);
    /// otherwise it belongs to the invoking user and loses setuid/setgid.
    #[arg(short = 'a', long)]
    pub archive: bool,
}

/// The default guest command line: serial console, reboot through the i8042
/// (how hull sees a clean reboot), reboot a second after a panic, no console
/// chatter below warnings (each console byte is a VM exit), and no IOAPIC
/// timer check (the in-kernel IOAPIC is known good; the check costs time).
/// Parameters the kernel does not know are passed to init as arguments, so
/// nothing here is speculative (this kernel has no PCI and no KASLR).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet no_timer_check";

/// `hull boot`.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// The kernel: an uncompressed ELF vmlinux or a bzImage.
    #[arg(long)]
    pub kernel: PathBuf,
    /// An initramfs (cpio archive, optionally compressed).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line (replaces the default).
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1024 * 1024))]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub cpus: u8,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    pub kvm: PathBuf,
}

/// `hull kernel ...`.
#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Build the guest kernel from Debian's linux-source package, or reuse the
    /// cached build; prints the vmlinux path as the last line.
    Build(KernelBuildArgs),
}

/// `hull kernel build`.
#[derive(Debug, Args)]
pub struct KernelBuildArgs {
    /// The kernel source tarball.
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Parallel make jobs (default: the number of CPUs).
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Rebuild even if a cached build exists.
    #[arg(long)]
    pub force: bool,
}

/// `hull run`.
#[derive(Debug, Args)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// Set an environment variable (KEY=VALUE, or KEY to take it from hull's environment).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE lines; # comments).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Working directory inside the container.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// User to run as: name, uid, name:group or uid:gid.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Override the image's entrypoint ("" clears it).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Name the container.
    #[arg(long)]
    pub name: Option<String>,
    /// Set a label on the container (KEY=VALUE, or KEY for an empty value).
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
    pub label: Vec<String>,
    /// The container's hostname (default: the short container id).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Memory of the container's VM (e.g. 512m, 1g; plain numbers are bytes, as in docker).
    #[arg(short = 'm', long, default_value = "512m")]
    pub memory: String,
    /// vCPUs of the container's VM (a fraction is rounded up).
    #[arg(long, default_value = "1")]
    pub cpus: String,
    /// Keep stdin open and forward it to the container.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the container a pseudo-terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Run in the background and print the container id.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Pull without TLS (plain HTTP) if the image must be pulled.
    #[arg(long)]
    pub insecure: bool,
    /// Where output is logged: json-file (the default; local is taken as
    /// json-file) or none (no log: `hull logs` has nothing to read).
    #[arg(long = "log-driver", value_name = "DRIVER")]
    pub log_driver: Option<String>,
    /// A log option, as docker's json-file driver: max-size=SIZE (default 10m),
    /// max-file=N (default 2).
    #[arg(long = "log-opt", value_name = "KEY=VALUE")]
    pub log_opt: Vec<String>,
    /// Bind mount a host directory (HOSTDIR:CTRDIR[:ro]), mount a named
    /// volume (NAME:CTRDIR[:ro], created if missing) or an anonymous one (CTRDIR).
    #[arg(short = 'v', long = "volume", value_name = "SRC:DST[:ro]")]
    pub volume: Vec<String>,
    /// A mount, docker's syntax: type=bind|volume|tmpfs,source=...,target=...[,readonly].
    #[arg(long = "mount", value_name = "type=...,target=...")]
    pub mount: Vec<String>,
    /// Mount a tmpfs (CTRDIR[:size=SIZE,mode=MODE,exec]).
    #[arg(long = "tmpfs", value_name = "CTRDIR[:OPTIONS]")]
    pub tmpfs: Vec<String>,
    /// Make the container's root file system read-only (its mounts stay writable).
    #[arg(long = "read-only")]
    pub read_only: bool,
    /// Add a capability to docker's default set (e.g. NET_ADMIN; ALL for all).
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Drop a capability from docker's default set (ALL for all).
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// Every capability, writable /sys and cgroups, /proc unmasked, more devices.
    #[arg(long)]
    pub privileged: bool,
    /// A resource limit, NAME=SOFT[:HARD] (e.g. nofile=1024:2048; -1 is unlimited).
    #[arg(long = "ulimit", value_name = "NAME=SOFT[:HARD]")]
    pub ulimit: Vec<String>,
    /// A kernel parameter (e.g. net.ipv4.ip_forward=1).
    #[arg(long = "sysctl", value_name = "KEY=VALUE")]
    pub sysctl: Vec<String>,
    /// Size of /dev/shm (docker notation, default 64m).
    #[arg(long = "shm-size", value_name = "SIZE")]
    pub shm_size: Option<String>,
    /// Run a small init as PID 1 that forwards signals and reaps zombies.
    #[arg(long)]
    pub init: bool,
    /// The signal `hull stop` sends first (default: the image's, else SIGTERM).
    #[arg(long = "stop-signal", value_name = "SIGNAL")]
    pub stop_signal: Option<String>,
    /// Publish a container port on the host: [IP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]
    /// (ranges as 8000-8010:80-90; no HOSTPORT: a free one).
    #[arg(short = 'p', long = "publish", value_name = "[IP:]HOST:CTR")]
    pub publish: Vec<String>,
    /// Publish every port the image exposes on free host ports.
    #[arg(short = 'P', long = "publish-all")]
    pub publish_all: bool,
    /// The container's network: passt (default: user-mode, no root needed),
    /// none (loopback only) or tap:NAME (an existing TAP interface); the
    /// default can be set with HULL_NETWORK.
    #[arg(long, alias = "net", value_name = "NETWORK", env = "HULL_NETWORK")]
    pub network: Option<String>,
    /// A DNS server for the container (replaces the default resolver).
    #[arg(long, value_name = "IP")]
    pub dns: Vec<String>,
    /// A DNS search domain for the container.
    #[arg(long = "dns-search", value_name = "DOMAIN")]
    pub dns_search: Vec<String>,
    /// Add a line to the container's /etc/hosts (IP may be host-gateway).
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,
    /// The guest kernel (default: the cached `hull kernel build`).
    #[arg(long, env = "HULL_KERNEL", hide = true)]
    pub kernel: Option<PathBuf>,
    /// The image.
    pub image: String,
    /// The command and its arguments (default: the image's).
    pub command: Vec<String>,
}

/// `hull pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Use plain HTTP (registries on loopback always do).
    #[arg(long)]
    pub insecure: bool,
    /// The image reference (e.g. alpine, registry.example.com/app:1.0).
    pub reference: String,
}

/// `hull login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// User name.
    #[arg(short = 'u', long)]
    pub username: String,
    /// Read the password from stdin.
    #[arg(long)]
    pub password_stdin: bool,
    /// Password (prefer --password-stdin: command lines are visible to other users).
    #[arg(short = 'p', long)]
    pub password: Option<String>,
    /// Use plain HTTP.
    #[arg(long)]
    pub insecure: bool,
    /// The registry (e.g. registry.example.com:5000).
    pub registry: String,
}

/// `hull images`.
#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Only print image ids.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// `hull rmi`.
#[derive(Debug, Args)]
pub struct RmiArgs {
    /// Images (names or ids).
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// `hull load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The archive (docker save or oci-archive format, optionally gzipped).
    #[arg(short = 'i', long)]
    pub input: PathBuf,
}

/// `hull import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A tarball of a root file system.
    pub tarball: PathBuf,
    /// The new image's name.
    pub name: String,
}

/// `hull image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Remove dangling images and unused blobs.
    Prune,
    /// List images (as `hull images`).
    Ls(ImagesArgs),
    /// Remove images (as `hull rmi`).
    Rm(RmiArgs),
}

/// One or more containers (names, ids or id prefixes).
#[derive(Debug, Args)]
pub struct ContainersArg {
    /// Containers.
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `hull port`.
#[derive(Debug, Args)]
pub struct PortArgs {
    /// The container.
    pub container: String,
    /// Only this container port (`80` or `80/tcp`, `53/udp`).
    pub port: Option<String>,
}

/// `hull exec`.
#[derive(Debug, Args)]
#[command(trailing_var_arg = true)]
pub struct ExecArgs {
    /// Keep stdin open and forward it.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the process a pseudo-terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Set an environment variable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// User.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// The container.
    pub container: String,
    /// The command and its arguments.
    #[arg(required = true)]
    pub command: Vec<String>,
}

/// `hull ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Show all containers (default: running ones).
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Only print container ids.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// `hull logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing new output until the container ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only the last N chunks of output.
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    /// The container.
    pub container: String,
}

/// `hull stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    pub time: u64,
    /// Containers.
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `hull kill`.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// The signal (name like TERM or SIGTERM, or number).
    #[arg(short = 's', long, default_value = "KILL")]
    pub signal: String,
    /// Containers.
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `hull rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Kill running containers first.
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Containers.
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `hull container ...`.
#[derive(Debug, Subcommand)]
pub enum ContainerCommand {
    /// Remove every stopped container.
    Prune,
    /// List containers (as `hull ps`).
    Ls(PsArgs),
}

/// `hull __monitor`.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Hold the command until a client attaches (foreground runs).
    #[arg(long)]
    pub wait_attach: bool,
    /// The container id.
    pub id: String,
}

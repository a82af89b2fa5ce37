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
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel directly in a microVM (low level: no image, no container).
    Boot(BootArgs),
    /// Build or locate the guest kernel.
    #[command(subcommand)]
    Kernel(KernelCommand),
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

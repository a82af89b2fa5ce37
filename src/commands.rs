//! What each verb does.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use crate::cli::{BootArgs, Command, KernelBuildArgs, KernelCommand};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Runs one verb; its exit status on success.
pub fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Boot(args) => boot(args),
        Command::Kernel(KernelCommand::Build(args)) => kernel_build(&args),
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
        control: None,
        entropy: false,
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

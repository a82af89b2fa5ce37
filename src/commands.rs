//! What each verb does.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use crate::cli::{
    BootArgs, Command, ImageCommand, ImagesArgs, ImportArgs, KernelBuildArgs, KernelCommand,
    LoadArgs, LoginArgs, PullArgs, RmiArgs,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Runs one verb; its exit status on success.
pub fn dispatch(command: Command, debug: bool) -> Result<ExitCode> {
    match command {
        Command::Run(args) => {
            let code = crate::run::run(&args, debug)?;
            Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
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
        exit_signal: None,
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

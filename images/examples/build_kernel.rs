//! Builds (or finds in the cache) the guest kernel, like `hull kernel build`.
//!
//! `cargo run -p images --example build_kernel -- [--force] [--jobs N] [TARBALL]`
//! Make's output goes to stderr; the last line on stdout is the vmlinux path.

use std::path::PathBuf;
use std::process::ExitCode;

use images::kernel::{build, KernelBuildOptions};

fn main() -> ExitCode {
    let mut opts = KernelBuildOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--force" => opts.force = true,
            "--jobs" => opts.jobs = args.next().and_then(|n| n.parse().ok()),
            _ => opts.source_tarball = Some(PathBuf::from(arg)),
        }
    }
    match build(&opts) {
        Ok(k) => {
            eprintln!(
                "bzImage: {}\nconfig: {}\ncached: {}",
                k.bzimage.display(),
                k.config.display(),
                k.cached
            );
            println!("{}", k.vmlinux.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

//! `hull`: run OCI containers, each in its own KVM microVM.
//!
//! The CLI turns user intent into a VM configuration and hands it to the VMM;
//! it knows nothing of KVM itself.

mod api;
mod cli;
mod client;
mod commands;
mod container;
mod cp;
mod disks;
mod flags;
mod guest;
mod imagedisk;
mod initramfs;
mod jail;
mod logfile;
mod monitor;
mod network;
mod run;
mod session;
mod tty;
mod virtiofs;
mod vmmproc;
mod vmprep;
mod volume;

use std::process::ExitCode;

use clap::Parser;

/// Exit status when hull itself fails (docker's convention for daemon errors).
const EXIT_HULL_ERROR: u8 = 125;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if matches!(cli.command, cli::Command::Vmm) {
        // Its stderr is a pipe the monitor relays (capped) into its log.
        init_logging(cli.debug, false);
        let code = vmmproc::child_main();
        return ExitCode::from(u8::try_from(code).unwrap_or(EXIT_HULL_ERROR));
    }
    let monitor = matches!(cli.command, cli::Command::Monitor(_));
    // With --debug a monitor's stderr is the terminal of `hull run --debug`.
    init_logging(cli.debug, monitor && !cli.debug);
    match commands::dispatch(cli.command, cli.debug) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hull: {}", error_chain(e.as_ref()));
            ExitCode::from(EXIT_HULL_ERROR)
        }
    }
}

/// One line: the error and each of its causes, joined by ": ".
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some errors repeat their source's text in their own message.
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// Sets up hull's messages on stderr. `capped` for a monitor, whose stderr
/// is its container's `monitor.log` and whose guest can provoke warnings at
/// will: what goes past a cap is dropped (a file size limit would kill the
/// monitor with SIGXFSZ instead).
fn init_logging(debug: bool, capped: bool) {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let default = if debug { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HULL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let writer = if capped {
        BoxMakeWriter::new(std::sync::Mutex::new(logfile::CappedWriter::new(
            std::io::stderr(),
            logfile::MONITOR_LOG_CAP,
        )))
    } else {
        BoxMakeWriter::new(std::io::stderr)
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false)
        .init();
}

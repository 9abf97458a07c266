//! `qed`: qemu-img and qemu-io for QED images.
//!
//! Subcommands follow `docs/cli.md` (the command-line contract): option letters,
//! output lines, JSON fields and exit codes are those of `qemu-img` / `qemu-io`. Every error is
//! printed as `qed: <what failed>: <why>` and exits with status 1.

mod check;
mod create;
mod error;
mod format;
mod info;
mod io;
mod json;
mod options;
mod serve;
mod size;
mod text;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::CliError;

/// The `qed` command line.
#[derive(Debug, Parser)]
#[command(
    name = "qed",
    version,
    about = "QED (QEMU Enhanced Disk) image tool: qemu-img and qemu-io for QED images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new image (as `qemu-img create`).
    Create(create::CreateArgs),
    /// Show what an image is (as `qemu-img info`).
    Info(info::InfoArgs),
    /// Check an image for consistency and repair it (as `qemu-img check`).
    Check(check::CheckArgs),
    /// Run I/O commands on an image (as `qemu-io`).
    Io(io::IoArgs),
    /// Serve an image over NBD (as `qemu-nbd`).
    Serve(serve::ServeArgs),
}

fn run(cli: &Cli) -> Result<i32, CliError> {
    match &cli.command {
        Command::Create(args) => create::run(args),
        Command::Info(args) => info::run(args),
        Command::Check(args) => check::run(args),
        Command::Io(args) => io::run(args),
        Command::Serve(args) => serve::run(args),
    }
}

/// Prints a command-line parsing error in the tool's `qed: <what>: <why>` form.
fn report_usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        print!("{e}");
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        eprint!("{e}");
        return ExitCode::FAILURE;
    }
    let rendered = e.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.starts_with("Usage:"))
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("For more information"))
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    eprintln!("qed: {message}");
    eprintln!("Try 'qed --help' for more information.");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return report_usage_error(&e),
    };
    match run(&cli) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            // A write error is ignored: stderr may be a pipe nobody reads (`serve --fork`).
            let _ = writeln!(std::io::stderr(), "qed: {e}");
            ExitCode::FAILURE
        }
    }
}

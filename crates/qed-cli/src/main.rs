//! `qed`: qemu-img and qemu-io for QED images.
//!
//! Subcommands follow `docs/cli.md` (the command-line contract): option letters,
//! output lines, JSON fields and exit codes are those of `qemu-img` / `qemu-io`. Every error is
//! printed as `<program>: <what failed>: <why>` and exits with status 1.
//!
//! One binary, several names: invoked through a link named `qemu-img`, `qemu-io` or
//! `qemu-nbd`, `qed` is that program (`qemu-io ARGS` runs `qed io ARGS`, `qemu-nbd ARGS` runs
//! `qed serve ARGS`), and its error lines start with the name it was invoked as.

mod bench;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod dd;
mod error;
mod format;
mod info;
mod io;
mod json;
mod map;
mod measure;
mod options;
mod progress;
mod rebase;
mod resize;
mod serve;
mod size;
mod snapshot;
mod spec;
mod text;

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::sync::OnceLock;

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
    /// Show where each guest range of an image lives (as `qemu-img map`).
    Map(map::MapArgs),
    /// Compare the contents of two images (as `qemu-img compare`).
    Compare(compare::CompareArgs),
    /// Copy an image into a new or existing one, sparse-aware (as `qemu-img convert`).
    Convert(convert::ConvertArgs),
    /// Change the virtual size of an image (as `qemu-img resize`).
    Resize(resize::ResizeArgs),
    /// Give an image another backing file, keeping what the guest reads (as `qemu-img
    /// rebase`).
    Rebase(rebase::RebaseArgs),
    /// Write an image's data into its backing file (as `qemu-img commit`).
    Commit(commit::CommitArgs),
    /// The file size a new image needs (as `qemu-img measure`).
    Measure(measure::MeasureArgs),
    /// Copy a part of an image into a new one (as `qemu-img dd`).
    Dd(dd::DdArgs),
    /// Time many reads or writes (as `qemu-img bench`).
    Bench(bench::BenchArgs),
    /// Serve an image over NBD (as `qemu-nbd`).
    Serve(serve::ServeArgs),
}

fn run(cli: &Cli) -> Result<i32, CliError> {
    match &cli.command {
        Command::Create(args) => create::run(args),
        Command::Info(args) => info::run(args),
        Command::Check(args) => check::run(args),
        Command::Io(args) => io::run(args),
        Command::Map(args) => map::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Resize(args) => resize::run(args),
        Command::Rebase(args) => rebase::run(args),
        Command::Commit(args) => commit::run(args),
        Command::Measure(args) => measure::run(args),
        Command::Dd(args) => dd::run(args),
        Command::Bench(args) => bench::run(args),
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
    eprintln!("{}: {message}", crate::prog());
    eprintln!("Try '{} --help' for more information.", prog());
    ExitCode::FAILURE
}

/// The name this program was invoked as, for error lines: `qed`, or the QEMU tool it stands
/// in for.
pub(crate) fn prog() -> &'static str {
    PROGRAM.get().map_or("qed", String::as_str)
}

static PROGRAM: OnceLock<String> = OnceLock::new();

/// The arguments as `qed` parses them: under a QEMU tool's name, that tool's subcommand is
/// put in front of them.
fn arguments() -> Vec<OsString> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let invoked = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let subcommand = match invoked.as_str() {
        "qemu-img" => None,
        "qemu-io" => Some("io"),
        "qemu-nbd" => Some("serve"),
        _ => {
            let _ = PROGRAM.set("qed".into());
            return args;
        }
    };
    let _ = PROGRAM.set(invoked.clone());
    if let Some(subcommand) = subcommand {
        args.insert(1, subcommand.into());
    }
    args
}

fn main() -> ExitCode {
    let args = arguments();
    // qemu-io's command line is parsed by qemu-io's rules (a `--` and everything after it
    // included), not by clap.
    if args.get(1).is_some_and(|a| a == "io") {
        return finish(io::run_words(&args[2..]));
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => return report_usage_error(&e),
    };
    finish(run(&cli))
}

/// The exit code of a run, its error printed.
fn finish(result: Result<i32, CliError>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            // A write error is ignored: stderr may be a pipe nobody reads (`serve --fork`).
            let _ = writeln!(std::io::stderr(), "{}: {e}", crate::prog());
            ExitCode::FAILURE
        }
    }
}

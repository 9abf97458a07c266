//! `qed io`: qemu-io for QED (and raw) images. Parses qemu-io's command line, opens the image
//! (if one is named), runs the `-c` commands in order, or reads commands from stdin when
//! there are none (with the `qemu-io> ` prompt, as qemu-io prints it), waits for requests in
//! flight, closes the image, and exits 1 if any command failed.
//!
//! Every line qemu-io 10 prints is printed identically, on the same stream. Invoked as `qed`
//! (not as `qemu-io`), failed operations add the engine's detailed reason on stderr.

mod args;
mod commands;
mod console;
mod disk;
mod events;
mod flags;
mod getopt;
mod session;
mod target;

use std::ffi::OsString;
use std::io::IsTerminal;

use crate::error::CliResult;
use commands::{run_command, Ctx, Outcome};
use console::Console;
use session::{parse_options, OpenRequest};

/// The prompt qemu-io prints before it reads a command from stdin.
const PROMPT: &str = "qemu-io> ";

/// Arguments of `qed io`: qemu-io's command line, parsed by qemu-io's rules (see `docs/cli.md`).
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub struct IoArgs {
    /// qemu-io's options, commands and FILE (`qed io -h` lists them).
    #[arg(
        value_name = "ARGS",
        num_args = 0..,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_parser = clap::value_parser!(OsString)
    )]
    pub args: Vec<OsString>,
}

/// Runs `qed io` as parsed by clap (not reached: `main` hands the words over first).
pub fn run(args: &IoArgs) -> CliResult<i32> {
    run_words(&args.args)
}

/// Runs `qed io` on its arguments (after `io`); returns the exit code.
pub fn run_words(args: &[OsString]) -> CliResult<i32> {
    let words: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
    let (mut out, mut err) = (stdout.lock(), stderr.lock());
    let mut con = Console::new(&mut out, &mut err);
    let options = match args::parse(&words, &mut con) {
        args::Parsed::Run(options) => options,
        args::Parsed::Exit(code) => return Ok(code),
    };
    let mut ctx = Ctx::new(con, options.image_opts);
    if let Some(file) = &options.file {
        let request = if options.image_opts {
            OpenRequest {
                name: None,
                format: None,
                flags: options.flags,
                options: parse_options(file, &mut ctx.con),
            }
        } else {
            OpenRequest {
                name: Some(file.clone()),
                format: options.format.clone(),
                flags: options.flags,
                options: Vec::new(),
            }
        };
        if !ctx.open_session(request) {
            return Ok(1);
        }
    }
    let mut failed = if options.commands.is_empty() {
        run_stdin(&mut ctx)
    } else {
        run_all(&mut ctx, &options.commands)
    };
    // As qemu-io: every request in flight completes before the image is closed.
    if ctx.close() == Outcome::Failed {
        failed = true;
    }
    ctx.con.flush();
    Ok(i32::from(failed))
}

/// Runs the `-c` commands until the end or `quit`; returns whether any failed.
fn run_all(ctx: &mut Ctx<'_>, lines: &[String]) -> bool {
    let mut failed = false;
    for line in lines {
        match run_command(ctx, line) {
            Outcome::Done => {}
            Outcome::Failed => failed = true,
            Outcome::Quit => break,
        }
    }
    failed
}

/// Reads commands from stdin, each after the prompt; returns whether any failed.
fn run_stdin(ctx: &mut Ctx<'_>) -> bool {
    let terminal = std::io::stdin().is_terminal();
    let mut failed = false;
    loop {
        ctx.con.out(PROMPT);
        ctx.con.flush();
        let Some(line) = ctx.events.next_line(&mut ctx.con) else {
            if terminal {
                // The end of input (^D) leaves the cursor after the prompt otherwise.
                ctx.con.out("\n");
            }
            return failed;
        };
        match run_command(ctx, &line) {
            Outcome::Done => {}
            Outcome::Failed => failed = true,
            Outcome::Quit => return failed,
        }
    }
}

#[cfg(test)]
mod tests;

//! `qed io`: qemu-io for QED (and raw) images. Runs the `-c` commands in order on one open
//! image (or reads commands from stdin when there are none) and exits 1 if any failed.
//!
//! Lines qemu-io prints on stdout are printed identically; what it prints on stderr gets the
//! tool's `qed: ` prefix, and failed operations add the engine's detailed reason there.

mod commands;
mod getopt;
mod target;

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use crate::error::{CliError, CliResult};
use crate::format::ImageFormat;
use target::Target;

/// Arguments of `qed io`.
#[derive(Debug, clap::Args)]
pub struct IoArgs {
    /// Format of the image (probed by the QED magic when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<ImageFormat>,
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Open read-only without taking the image lock (for images in use).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// A command to run (repeatable): read, write, discard, flush, map, length, help.
    #[arg(short = 'c', long = "cmd", value_name = "CMD")]
    pub commands: Vec<String>,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// Where command output goes: stdout for what qemu-io prints there, stderr for the rest.
pub struct Console<'a> {
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
}

impl<'a> Console<'a> {
    /// A console writing to the given streams.
    pub fn new(out: &'a mut dyn Write, err: &'a mut dyn Write) -> Self {
        Self { out, err }
    }

    /// Prints to stdout.
    pub fn out(&mut self, text: &str) {
        // A closed stdout is not the image's problem; the exit code still tells.
        let _ = self.out.write_all(text.as_bytes());
    }

    /// Prints to stderr, after what stdout holds so far.
    pub fn err(&mut self, text: &str) {
        let _ = self.out.flush();
        let _ = self.err.write_all(text.as_bytes());
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did what was asked.
    Done,
    /// It failed (the exit code becomes 1).
    Failed,
    /// `quit`: run no further commands.
    Quit,
}

type Handler = fn(&Target, &mut Console<'_>, &[String]) -> Outcome;

/// One command of the table.
struct CommandInfo {
    name: &'static str,
    altname: Option<&'static str>,
    argmin: usize,
    argmax: Option<usize>,
    args: Option<&'static str>,
    oneline: &'static str,
    writes: bool,
    handler: Handler,
}

const COMMANDS: &[CommandInfo] = &[
    CommandInfo {
        name: "discard",
        altname: Some("d"),
        argmin: 2,
        argmax: None,
        args: Some("[-Cq] off len"),
        oneline: "discards a number of bytes at a specified offset",
        writes: true,
        handler: commands::discard,
    },
    CommandInfo {
        name: "flush",
        altname: Some("f"),
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "flush all in-core file state to disk",
        writes: false,
        handler: commands::flush,
    },
    CommandInfo {
        name: "help",
        altname: Some("?"),
        argmin: 0,
        argmax: Some(1),
        args: Some("[command]"),
        oneline: "help for one or all commands",
        writes: false,
        handler: help,
    },
    CommandInfo {
        name: "length",
        altname: Some("l"),
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "gets the length of the current file",
        writes: false,
        handler: commands::length,
    },
    CommandInfo {
        name: "map",
        altname: None,
        argmin: 0,
        argmax: Some(0),
        args: Some(""),
        oneline: "prints the allocated areas of a file",
        writes: false,
        handler: commands::map,
    },
    CommandInfo {
        name: "quit",
        altname: Some("q"),
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "exit the program",
        writes: false,
        handler: quit,
    },
    CommandInfo {
        name: "read",
        altname: Some("r"),
        argmin: 2,
        argmax: None,
        args: Some("[-Cqv] [-P pattern [-s off] [-l len]] off len"),
        oneline: "reads a number of bytes at a specified offset",
        writes: false,
        handler: commands::read,
    },
    CommandInfo {
        name: "write",
        altname: Some("w"),
        argmin: 2,
        argmax: None,
        args: Some("[-cCfnquz] [-P pattern | -s source_file] off len"),
        oneline: "writes a number of bytes at a specified offset",
        writes: true,
        handler: commands::write,
    },
];

fn find_command(name: &str) -> Option<&'static CommandInfo> {
    COMMANDS
        .iter()
        .find(|c| c.name == name || c.altname == Some(name))
}

/// Prints the usage line of `name` (qemu-io prints it on stdout) and fails.
pub fn usage(con: &mut Console<'_>, name: &str) -> Outcome {
    if let Some(cmd) = find_command(name) {
        con.out(&format!(
            "{} {} -- {}\n",
            cmd.name,
            cmd.args.unwrap_or_default(),
            cmd.oneline
        ));
    }
    Outcome::Failed
}

fn help_line(cmd: &CommandInfo) -> String {
    match cmd.args {
        Some(args) => format!("{} {args} -- {}\n", cmd.name, cmd.oneline),
        None => format!("{} -- {}\n", cmd.name, cmd.oneline),
    }
}

fn help(_target: &Target, con: &mut Console<'_>, args: &[String]) -> Outcome {
    match args.first() {
        Some(name) => match find_command(name) {
            Some(cmd) => {
                con.out(&help_line(cmd));
                Outcome::Done
            }
            None => {
                con.out(&format!("command {name} not found\n"));
                Outcome::Failed
            }
        },
        None => {
            for cmd in COMMANDS {
                con.out(&help_line(cmd));
            }
            con.out("\nUse 'help commandname' for extended help.\n");
            Outcome::Done
        }
    }
}

fn quit(_target: &Target, _con: &mut Console<'_>, _args: &[String]) -> Outcome {
    Outcome::Quit
}

/// Runs one command line (words separated by spaces, as qemu-io splits them).
pub fn run_command(target: &Target, con: &mut Console<'_>, line: &str) -> Outcome {
    let words: Vec<String> = line
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    let Some((name, args)) = words.split_first() else {
        return Outcome::Done;
    };
    let Some(cmd) = find_command(name) else {
        con.err(&format!(
            "{}: command \"{name}\" not found\n",
            crate::prog()
        ));
        return Outcome::Failed;
    };
    let argc = args.len();
    if argc < cmd.argmin || cmd.argmax.is_some_and(|max| argc > max) {
        let expected = match cmd.argmax {
            None => format!("at least {} arguments", cmd.argmin),
            Some(max) if max == cmd.argmin => format!("{max} arguments"),
            Some(max) => format!("between {} and {max} arguments", cmd.argmin),
        };
        con.err(&format!(
            "{}: bad argument count {argc} to {name}, expected {expected}\n",
            crate::prog()
        ));
        return Outcome::Failed;
    }
    if cmd.writes && !target.is_writable() {
        con.err(&format!("{}: Block node is read-only\n", crate::prog()));
        return Outcome::Failed;
    }
    (cmd.handler)(target, con, args)
}

/// Runs `qed io`; returns the exit code.
pub fn run(args: &IoArgs) -> CliResult<i32> {
    let name = args.file.display().to_string();
    let writable = !(args.read_only || args.force_share);
    let target = Target::open(&args.file, args.format, writable, args.force_share)
        .map_err(|why| CliError::new(format!("can't open device {name}"), why))?;
    let failed = {
        let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
        let (mut out, mut err) = (stdout.lock(), stderr.lock());
        let mut con = Console::new(&mut out, &mut err);
        let failed = if args.commands.is_empty() {
            run_stdin(&target, &mut con)
        } else {
            run_all(&target, &mut con, args.commands.iter().map(String::as_str))
        };
        let _ = con.out.flush();
        failed
    };
    if let Err(e) = target.close() {
        return Err(CliError::new(format!("closing {name}"), e));
    }
    Ok(i32::from(failed))
}

/// Runs command lines until the end or `quit`; returns whether any failed.
fn run_all<'l>(
    target: &Target,
    con: &mut Console<'_>,
    lines: impl IntoIterator<Item = &'l str>,
) -> bool {
    let mut failed = false;
    for line in lines {
        match run_command(target, con, line) {
            Outcome::Done => {}
            Outcome::Failed => failed = true,
            Outcome::Quit => break,
        }
    }
    failed
}

/// Reads command lines from stdin (with a prompt on a terminal); returns whether any failed.
fn run_stdin(target: &Target, con: &mut Console<'_>) -> bool {
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let mut failed = false;
    loop {
        if interactive {
            con.out("qed io> ");
            let _ = con.out.flush();
        }
        let mut line = String::new();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => return failed,
            Ok(_) => match run_command(target, con, line.trim_end_matches(['\n', '\r'])) {
                Outcome::Done => {}
                Outcome::Failed => failed = true,
                Outcome::Quit => return failed,
            },
            Err(e) => {
                con.err(&format!("{}: reading commands: {e}\n", crate::prog()));
                return true;
            }
        }
    }
}

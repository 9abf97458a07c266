//! The commands of `qed io`: qemu-io 10's table (names, short names, argument counts, usage
//! and help lines), its checks before a command runs, and each command a port of the qemu-io
//! command of the same name: same options, same checks in the same order, same output lines.

mod aio;
mod args;
mod control;
mod help;
mod image;
mod rw;

use std::sync::Arc;

use super::console::Console;
use super::disk::Disk;
use super::events::Events;
use super::session::Session;

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

/// What the commands work on.
pub struct Ctx<'a> {
    /// The output streams.
    pub con: Console<'a>,
    /// The open image, if any.
    pub session: Option<Session>,
    /// Requests in flight, lines of stdin.
    pub events: Events,
    /// `--image-opts`: `open` takes an option string.
    pub image_opts: bool,
    /// The command name as typed (an option error names it as typed: `r: invalid option`).
    typed: String,
}

impl<'a> Ctx<'a> {
    /// A context with no image open.
    pub fn new(con: Console<'a>, image_opts: bool) -> Self {
        Self {
            con,
            session: None,
            events: Events::default(),
            image_opts,
            typed: String::new(),
        }
    }

    /// The open disk (commands that need one run only when one is open).
    fn disk(&self) -> Option<Arc<Disk>> {
        self.session.as_ref().map(|s| Arc::clone(s.disk()))
    }

    /// Waits for the requests in flight, then closes the image; reports a failed close.
    pub fn close(&mut self) -> Outcome {
        self.events.drain(&mut self.con);
        match self.session.take().map(Session::close) {
            Some(Err(e)) => {
                self.con.error(&format!("close: {e}"));
                Outcome::Failed
            }
            _ => Outcome::Done,
        }
    }
}

type Handler = fn(&mut Ctx<'_>, &[String]) -> Outcome;

/// One command of the table.
struct CommandInfo {
    name: &'static str,
    altname: Option<&'static str>,
    /// Fewest arguments (None: no check, as qemu-io's -1).
    argmin: Option<usize>,
    /// Most arguments (None: any number).
    argmax: Option<usize>,
    args: Option<&'static str>,
    oneline: &'static str,
    /// Whether it runs with no image open (qemu-io's `CMD_NOFILE_OK`, `CMD_FLAG_GLOBAL`).
    no_file: bool,
    /// Whether it needs write permission.
    writes: bool,
    help: Option<&'static str>,
    handler: Handler,
}

const fn cmd(name: &'static str, oneline: &'static str, handler: Handler) -> CommandInfo {
    CommandInfo {
        name,
        altname: None,
        argmin: Some(0),
        argmax: Some(0),
        args: None,
        oneline,
        no_file: false,
        writes: false,
        help: None,
        handler,
    }
}

impl CommandInfo {
    const fn alt(mut self, altname: &'static str) -> Self {
        self.altname = Some(altname);
        self
    }
    const fn args(mut self, min: Option<usize>, max: Option<usize>, args: &'static str) -> Self {
        self.argmin = min;
        self.argmax = max;
        self.args = Some(args);
        self
    }
    const fn count(mut self, min: Option<usize>, max: Option<usize>) -> Self {
        self.argmin = min;
        self.argmax = max;
        self
    }
    const fn no_file(mut self) -> Self {
        self.no_file = true;
        self
    }
    const fn writes(mut self) -> Self {
        self.writes = true;
        self
    }
    const fn help(mut self, text: &'static str) -> Self {
        self.help = Some(text);
        self
    }
}

const ANY: Option<usize> = None;
const fn n(count: usize) -> Option<usize> {
    Some(count)
}

/// qemu-io 10's commands, sorted by name as it lists them.
const COMMANDS: &[CommandInfo] = &[
    cmd(
        "abort",
        "simulate a program crash using abort(3)",
        control::abort,
    )
    .no_file(),
    cmd(
        "aio_flush",
        "completes all outstanding aio requests",
        aio::aio_flush,
    ),
    cmd(
        "aio_read",
        "asynchronously reads a number of bytes",
        aio::aio_read,
    )
    .args(n(2), ANY, "[-Ciqrv] [-P pattern] off len [len..]")
    .help(help::AIO_READ),
    cmd(
        "aio_write",
        "asynchronously writes a number of bytes",
        aio::aio_write,
    )
    .args(n(2), ANY, "[-Cfiqruz] [-P pattern] off len [len..]")
    .writes()
    .help(help::AIO_WRITE),
    cmd(
        "alloc",
        "checks if offset is allocated in the file",
        image::alloc,
    )
    .alt("a")
    .args(n(1), n(2), "offset [count]"),
    cmd(
        "break",
        "sets a breakpoint on event and tags the stopped request as tag",
        control::breakpoint,
    )
    .args(n(2), n(2), "event tag"),
    cmd("close", "close the current open file", control::close).alt("c"),
    cmd(
        "discard",
        "discards a number of bytes at a specified offset",
        image::discard,
    )
    .alt("d")
    .args(n(2), ANY, "[-Cq] off len")
    .writes()
    .help(help::DISCARD),
    cmd(
        "flush",
        "flush all in-core file state to disk",
        image::flush,
    )
    .alt("f"),
    cmd("help", "help for one or all commands", help_cmd)
        .alt("?")
        .args(n(0), n(1), "[command]")
        .no_file(),
    cmd(
        "info",
        "prints information about the current file",
        image::info,
    )
    .alt("i"),
    cmd(
        "length",
        "gets the length of the current file",
        image::length,
    )
    .alt("l"),
    cmd("map", "prints the allocated areas of a file", image::map).args(n(0), n(0), ""),
    cmd("open", "open the file specified by path", control::open)
        .alt("o")
        .args(
            n(1),
            ANY,
            "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
        )
        .no_file()
        .help(help::OPEN),
    cmd("quit", "exit the program", control::quit)
        .alt("q")
        .count(None, ANY)
        .no_file(),
    cmd(
        "read",
        "reads a number of bytes at a specified offset",
        rw::read,
    )
    .alt("r")
    .args(
        n(2),
        ANY,
        "[-abCqrv] [-P pattern [-s off] [-l len]] off len",
    )
    .help(help::READ),
    cmd(
        "readv",
        "reads a number of bytes at a specified offset",
        rw::readv,
    )
    .args(n(2), ANY, "[-Cqrv] [-P pattern] off len [len..]")
    .help(help::READV),
    cmd(
        "remove_break",
        "remove a breakpoint by tag",
        control::remove_break,
    )
    .args(n(1), n(1), "tag"),
    cmd(
        "reopen",
        "reopens an image with new options",
        control::reopen,
    )
    .args(n(0), ANY, "[(-r|-w)] [-c cache] [-o options]")
    .help(help::REOPEN),
    cmd(
        "resume",
        "resumes the request tagged as tag",
        control::resume,
    )
    .args(n(1), n(1), "tag"),
    cmd("sigraise", "raises a signal", control::sigraise)
        .args(n(1), n(1), "signal")
        .no_file()
        .help(help::SIGRAISE),
    cmd(
        "sleep",
        "waits for the given value in milliseconds",
        control::sleep,
    )
    .count(n(1), n(1))
    .no_file(),
    cmd(
        "truncate",
        "truncates the current file at the given offset",
        image::truncate,
    )
    .alt("t")
    .args(n(1), n(3), "[-m prealloc_mode] off")
    .writes(),
    cmd(
        "wait_break",
        "waits for the suspension of a request",
        control::wait_break,
    )
    .args(n(1), n(1), "tag"),
    cmd(
        "write",
        "writes a number of bytes at a specified offset",
        rw::write,
    )
    .alt("w")
    .args(
        n(2),
        ANY,
        "[-bcCfnqruz] [-P pattern | -s source_file] off len",
    )
    .writes()
    .help(help::WRITE),
    cmd(
        "writev",
        "writes a number of bytes at a specified offset",
        rw::writev,
    )
    .args(n(2), ANY, "[-Cfqr] [-P pattern] off len [len..]")
    .writes()
    .help(help::WRITEV),
    cmd(
        "zone_append",
        "append write a number of bytes at a specified offset",
        control::zone_append,
    )
    .alt("zap")
    .args(n(3), n(4), "offset len [len..]"),
    cmd(
        "zone_close",
        "close a range of zones in zone block device",
        control::zone_close,
    )
    .alt("zc")
    .args(n(2), n(2), "offset len"),
    cmd(
        "zone_finish",
        "finish a range of zones in zone block device",
        control::zone_finish,
    )
    .alt("zf")
    .args(n(2), n(2), "offset len"),
    cmd(
        "zone_open",
        "explicit open a range of zones in zone block device",
        control::zone_open,
    )
    .alt("zo")
    .args(n(2), n(2), "offset len"),
    cmd(
        "zone_report",
        "report zone information",
        control::zone_report,
    )
    .alt("zrp")
    .args(n(2), n(2), "offset number"),
    cmd(
        "zone_reset",
        "reset a zone write pointer in zone block device",
        control::zone_reset,
    )
    .alt("zrs")
    .args(n(2), n(2), "offset len"),
];

fn find_command(name: &str) -> Option<&'static CommandInfo> {
    COMMANDS
        .iter()
        .find(|c| c.name == name || c.altname == Some(name))
}

/// Prints the usage line of `name` (qemu-io prints it on stdout) and fails.
fn usage(con: &mut Console<'_>, name: &str) -> Outcome {
    if let Some(cmd) = find_command(name) {
        con.out(&format!(
            "{} {} -- {}\n",
            cmd.name,
            cmd.args.unwrap_or("(null)"),
            cmd.oneline
        ));
    }
    Outcome::Failed
}

/// Reports a getopt error of the command being run (glibc's line on stderr, naming it as
/// typed) and prints its usage.
fn bad_option(ctx: &mut Ctx<'_>, error: &super::getopt::GetoptError) -> Outcome {
    let typed = ctx.typed.clone();
    ctx.con.bare(&format!("{typed}: {}", error.message()));
    usage(&mut ctx.con, &typed)
}

fn help_line(name: &str, cmd: &CommandInfo) -> String {
    match cmd.args {
        Some(args) => format!("{name} {args} -- {}\n", cmd.oneline),
        None => format!("{name} -- {}\n", cmd.oneline),
    }
}

fn help_cmd(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    match args.first() {
        Some(name) => match find_command(name) {
            Some(cmd) => {
                ctx.con.out(&help_line(name, cmd));
                if let Some(text) = cmd.help {
                    ctx.con.out(text);
                }
                Outcome::Done
            }
            None => {
                ctx.con.out(&format!("command {name} not found\n"));
                Outcome::Failed
            }
        },
        None => {
            for cmd in COMMANDS {
                ctx.con.out(&help_line(cmd.name, cmd));
            }
            ctx.con.out("\nUse 'help commandname' for extended help.\n");
            Outcome::Done
        }
    }
}

/// Runs one command line (words separated by spaces, as qemu-io splits them).
pub fn run_command(ctx: &mut Ctx<'_>, line: &str) -> Outcome {
    let words: Vec<String> = line
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    let Some((name, args)) = words.split_first() else {
        return Outcome::Done;
    };
    let Some(cmd) = find_command(name) else {
        ctx.con.bare(&format!("command \"{name}\" not found"));
        return Outcome::Failed;
    };
    if !cmd.no_file && ctx.session.is_none() {
        ctx.con.bare("no file open, try 'help open'");
        return Outcome::Failed;
    }
    let argc = args.len();
    let too_few = cmd.argmin.is_some_and(|min| argc < min);
    let too_many = cmd.argmax.is_some_and(|max| argc > max);
    if too_few || too_many {
        let min = cmd.argmin.unwrap_or_default();
        let expected = match cmd.argmax {
            None => format!("at least {min} arguments"),
            Some(max) if max == min => format!("{max} arguments"),
            Some(max) => format!("between {min} and {max} arguments"),
        };
        ctx.con.bare(&format!(
            "bad argument count {argc} to {name}, expected {expected}"
        ));
        return Outcome::Failed;
    }
    ctx.typed.clone_from(name);
    if cmd.writes && ctx.disk().is_some_and(|d| !d.is_writable()) {
        ctx.con.error("Block node is read-only");
        return Outcome::Failed;
    }
    (cmd.handler)(ctx, args)
}

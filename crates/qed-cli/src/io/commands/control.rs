//! Commands about the session rather than the data: `open`, `close`, `reopen`, `quit`,
//! `sleep`, `abort`, `sigraise`, and the debugging commands qemu-io has for drivers this
//! implementation does not have (breakpoints of blkdebug, zoned devices), which fail as they
//! fail in qemu-io on a QED or raw image.

use std::time::Duration;

use super::args::{number, strtol, try_or_fail, vector_len};
use super::{bad_option, usage, Ctx, Outcome};
use crate::io::flags::OpenFlags;
use crate::io::getopt::getopt;
use crate::io::session::{parse_options, OpenRequest, Session};

/// The largest signal number `sigraise` accepts (glibc's `NSIG`).
const NSIG: u64 = 65;

/// Signals qemu-io's main loop takes through a signalfd and survives: SIGBUS, SIGUSR1,
/// SIGALRM, SIGIO (SIGPIPE it ignores, as Rust programs do).
const CAUGHT: [u64; 4] = [7, 10, 14, 29];

impl Ctx<'_> {
    /// Opens an image as qemu-io's `openfile` does; reports a failure and returns false.
    pub fn open_session(&mut self, request: OpenRequest) -> bool {
        if self.session.is_some() {
            self.con.error("file open already, try 'help close'");
            return false;
        }
        let name = request.name.clone();
        match Session::open(request, &mut self.con) {
            Ok(session) => {
                self.session = Some(session);
                true
            }
            Err(why) => {
                match name {
                    Some(name) => self.con.error(&format!("can't open device {name}: {why}")),
                    None => self.con.error(&format!("can't open: {why}")),
                }
                false
            }
        }
    }
}

/// `open [-rsCnkU] [-t cache] [-d discard] [-i aio] [-o options] [path]`.
pub fn open(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let parsed = getopt(args, "snCro:ki:t:d:U");
    let mut flags = OpenFlags::default();
    let mut read_only = false;
    let mut options = Vec::new();
    for (c, arg) in &parsed.options {
        let arg = arg.as_deref().unwrap_or_default();
        let refused = match c {
            's' => {
                flags.snapshot = true;
                None
            }
            'n' => {
                flags.nocache = true;
                flags.writethrough = false;
                None
            }
            'C' => {
                flags.copy_on_read = true;
                None
            }
            'r' => {
                read_only = true;
                None
            }
            'k' => {
                flags.native_aio = true;
                None
            }
            't' => (!flags.set_cache(arg)).then(|| format!("Invalid cache option: {arg}")),
            'd' => (!flags.set_discard(arg)).then(|| format!("Invalid discard option: {arg}")),
            'i' => (!flags.set_aio(arg)).then(|| format!("Invalid aio option: {arg}")),
            'o' => {
                if ctx.image_opts {
                    ctx.con
                        .out("--image-opts and 'open -o' are mutually exclusive\n");
                    return Outcome::Failed;
                }
                options.extend(parse_options(arg, &mut ctx.con));
                None
            }
            'U' => {
                flags.force_share = true;
                None
            }
            _ => None,
        };
        if let Some(why) = refused {
            ctx.con.error(&why);
            return Outcome::Failed;
        }
    }
    if let Some(e) = &parsed.error {
        return bad_option(ctx, e);
    }
    flags.read_only = read_only;
    let mut operands = parsed.operands.as_slice();
    if ctx.image_opts {
        if let [text] = operands {
            options.extend(parse_options(text, &mut ctx.con));
            operands = &[];
        }
    }
    let name = match operands {
        [] => None,
        [name] => Some(name.clone()),
        _ => return usage(&mut ctx.con, "open"),
    };
    let request = OpenRequest {
        name,
        format: None,
        flags,
        options,
    };
    if ctx.open_session(request) {
        Outcome::Done
    } else {
        Outcome::Failed
    }
}

/// `close`.
pub fn close(ctx: &mut Ctx<'_>, _args: &[String]) -> Outcome {
    ctx.close()
}

/// `reopen [(-r|-w)] [-c cache] [-o options]`: opens the image again with other flags.
pub fn reopen(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let Some(session) = ctx.session.as_ref() else {
        return Outcome::Failed;
    };
    let mut flags = *session.flags();
    let parsed = getopt(args, "c:o:rw");
    let (mut rw_given, mut cache_given) = (false, false);
    let mut options = Vec::new();
    for (c, arg) in &parsed.options {
        let arg = arg.as_deref().unwrap_or_default();
        match c {
            'c' => {
                if !flags.set_cache(arg) {
                    ctx.con.error(&format!("Invalid cache option: {arg}"));
                    return Outcome::Failed;
                }
                cache_given = true;
            }
            'o' => options.extend(parse_options(arg, &mut ctx.con)),
            _ => {
                if rw_given {
                    ctx.con.error("Only one -r/-w option may be given");
                    return Outcome::Failed;
                }
                flags.read_only = *c == 'r';
                rw_given = true;
            }
        }
    }
    if let Some(e) = &parsed.error {
        return bad_option(ctx, e);
    }
    if !parsed.operands.is_empty() {
        return usage(&mut ctx.con, "reopen");
    }
    for (key, value) in &options {
        let refusal = match key.as_str() {
            "read-only" if rw_given => Some("Cannot set both -r/-w and 'read-only'".to_string()),
            // QEMU keeps the write permission qemu-io holds unless -r drops it, so a
            // writable image cannot become read-only this way.
            "read-only" if value == "on" && !flags.read_only => {
                Some("Read-only block node '#block0' cannot support read-write users".to_string())
            }
            "read-only" => {
                flags.read_only = value == "on";
                None
            }
            "cache.direct" | "cache.no-flush" if cache_given => {
                Some("Cannot set both -c and the cache options".to_string())
            }
            "cache.direct" => {
                flags.nocache = value == "on";
                None
            }
            "cache.no-flush" => {
                flags.no_flush = value == "on";
                None
            }
            other => Some(format!("Cannot change the option '{other}'")),
        };
        if let Some(why) = refusal {
            ctx.con.error(&why);
            return Outcome::Failed;
        }
    }
    ctx.events.drain(&mut ctx.con);
    let Some(session) = ctx.session.take() else {
        return Outcome::Failed;
    };
    let (session, result) = session.reopen(flags);
    ctx.session = session;
    match result {
        Ok(()) => Outcome::Done,
        Err(why) => {
            ctx.con.error(&why);
            Outcome::Failed
        }
    }
}

/// `quit`.
pub fn quit(_ctx: &mut Ctx<'_>, _args: &[String]) -> Outcome {
    Outcome::Quit
}

/// `sleep MS`: waits, printing what completes meanwhile.
pub fn sleep(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let Some(ms) = strtol(&args[0]).and_then(|ms| u64::try_from(ms).ok()) else {
        ctx.con.out(&format!("{} is not a valid number\n", args[0]));
        return Outcome::Failed;
    };
    ctx.events.sleep(Duration::from_millis(ms), &mut ctx.con);
    Outcome::Done
}

/// `abort`: ends the process with SIGABRT, as a crash would (what stdout holds is written
/// first).
pub fn abort(ctx: &mut Ctx<'_>, _args: &[String]) -> Outcome {
    ctx.con.flush();
    std::process::abort()
}

/// `sigraise SIGNUM`: raises the signal (its default action applies: most end the process).
pub fn sigraise(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let signal = try_or_fail!(number(&mut ctx.con, &args[0]));
    if signal > NSIG {
        ctx.con.out(&format!(
            "signal argument '{}' is too large to be a valid signal\n",
            args[0]
        ));
        return Outcome::Failed;
    }
    ctx.con.flush();
    if !CAUGHT.contains(&signal) {
        // An invalid number (0 is valid and does nothing) is ignored, as raise(3) fails then.
        let _ = signal_hook::low_level::raise(signal as i32);
    }
    Outcome::Done
}

/// `break EVENT TAG` (blkdebug only).
pub fn breakpoint(ctx: &mut Ctx<'_>, _args: &[String]) -> Outcome {
    ctx.con
        .out("Could not set breakpoint: Operation not supported\n");
    Outcome::Failed
}

/// `remove_break TAG` (blkdebug only).
pub fn remove_break(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    ctx.con.out(&format!(
        "Could not remove breakpoint {}: Operation not supported\n",
        args[0]
    ));
    Outcome::Failed
}

/// `resume TAG` (blkdebug only).
pub fn resume(ctx: &mut Ctx<'_>, _args: &[String]) -> Outcome {
    ctx.con
        .out("Could not resume request: Operation not supported\n");
    Outcome::Failed
}

/// `wait_break TAG`: no request is ever suspended without blkdebug, so it waits forever, as
/// qemu-io does.
pub fn wait_break(ctx: &mut Ctx<'_>, _args: &[String]) -> Outcome {
    ctx.events.wait_forever(&mut ctx.con)
}

/// The zone commands after their arguments are parsed: the image is not a zoned device.
fn not_zoned(ctx: &mut Ctx<'_>, what: &str) -> Outcome {
    ctx.con
        .out(&format!("zone {what} failed: Operation not supported\n"));
    Outcome::Failed
}

/// `zone_report OFFSET NUMBER`.
pub fn zone_report(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    try_or_fail!(number(&mut ctx.con, &args[0]));
    let zones = try_or_fail!(number(&mut ctx.con, &args[1]));
    if zones > u64::from(u32::MAX) {
        ctx.con.out("Number of zones must be less than 2^32\n");
        return Outcome::Failed;
    }
    not_zoned(ctx, "report")
}

fn zone_range(ctx: &mut Ctx<'_>, args: &[String], what: &str) -> Outcome {
    try_or_fail!(number(&mut ctx.con, &args[0]));
    try_or_fail!(number(&mut ctx.con, &args[1]));
    not_zoned(ctx, what)
}

/// `zone_open OFFSET LEN`.
pub fn zone_open(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    zone_range(ctx, args, "open")
}

/// `zone_close OFFSET LEN`.
pub fn zone_close(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    zone_range(ctx, args, "close")
}

/// `zone_finish OFFSET LEN`.
pub fn zone_finish(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    zone_range(ctx, args, "finish")
}

/// `zone_reset OFFSET LEN`.
pub fn zone_reset(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    zone_range(ctx, args, "reset")
}

/// `zone_append [-p] OFFSET LEN [LEN..]`.
pub fn zone_append(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let parsed = getopt(args, "p");
    if let Some(e) = &parsed.error {
        let typed = ctx.typed.clone();
        ctx.con.bare(&format!("{typed}: {}", e.message()));
    }
    let Some((offset, lens)) = parsed.operands.split_first() else {
        return Outcome::Failed;
    };
    try_or_fail!(number(&mut ctx.con, offset));
    try_or_fail!(vector_len(&mut ctx.con, lens));
    not_zoned(ctx, "append")
}

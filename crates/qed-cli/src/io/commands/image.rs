//! Commands about the image as a whole: `alloc`, `map`, `info`, `length`, `truncate`,
//! `discard`, `flush`, as qemu-io's `alloc_f`, `map_f`, `info_f`, `length_f`, `truncate_f`,
//! `discard_f` and `flush_f`.

use qed_image::Error;

use super::args::{failed, number, number_error, sync_io, try_or_fail, MAX_REQUEST};
use super::{bad_option, usage, Ctx, Outcome};
use crate::error::errno_text;
use crate::format::ImageFormat;
use crate::io::getopt::getopt;
use crate::text::{cvtstr, io_report};

/// `alloc offset [count]`: how many bytes of the range this image allocates.
pub fn alloc(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let start = try_or_fail!(number(&mut ctx.con, &args[0]));
    let mut count = match args.get(1) {
        Some(arg) => try_or_fail!(number(&mut ctx.con, arg)),
        None => 512,
    };
    let Some(disk) = ctx.disk() else {
        return Outcome::Failed;
    };
    // The block layer answers up to the end of the disk and nothing past it.
    count = count.min(disk.size().saturating_sub(start));
    match disk.target().allocated_bytes(start, count) {
        Ok(allocated) => {
            ctx.con.out(&format!(
                "{allocated}/{count} bytes allocated at offset {}\n",
                cvtstr(start as f64)
            ));
            Outcome::Done
        }
        Err(e) => {
            ctx.con
                .out(&format!("is_allocated failed: {}\n", errno_text(&e)));
            ctx.con.detail(&format!("alloc: {e}"));
            Outcome::Failed
        }
    }
}

/// `map`: the allocated and unallocated stretches of this image (not its backing file).
pub fn map(ctx: &mut Ctx<'_>, _args: &[String]) -> Outcome {
    let Some(disk) = ctx.disk() else {
        return Outcome::Failed;
    };
    let (runs, error) = disk.target().allocation();
    for run in runs {
        ctx.con.out(&format!(
            "{} (0x{:x}) bytes {} at offset {} (0x{:x})\n",
            cvtstr(run.length as f64),
            run.length,
            if run.allocated {
                "    allocated"
            } else {
                "not allocated"
            },
            cvtstr(run.offset as f64),
            run.offset
        ));
    }
    match error {
        None => Outcome::Done,
        Some(e) => {
            ctx.con.error(&format!(
                "Failed to get allocation status: {}",
                errno_text(&e)
            ));
            ctx.con.detail(&format!("map: {e}"));
            Outcome::Failed
        }
    }
}

/// `info`: the format, cluster size and VM state offset, as qemu-io prints them.
pub fn info(ctx: &mut Ctx<'_>, _args: &[String]) -> Outcome {
    let Some(disk) = ctx.disk() else {
        return Outcome::Failed;
    };
    let target = disk.target();
    ctx.con.out(&format!(
        "format name: {}\ncluster size: {}\nvm state offset: {}\n",
        target.format().name(),
        cvtstr(target.cluster_size() as f64),
        cvtstr(0.0)
    ));
    Outcome::Done
}

/// `length`: the virtual disk size.
pub fn length(ctx: &mut Ctx<'_>, _args: &[String]) -> Outcome {
    let Some(disk) = ctx.disk() else {
        return Outcome::Failed;
    };
    ctx.con.out(&format!("{}\n", cvtstr(disk.size() as f64)));
    Outcome::Done
}

/// The preallocation modes QEMU knows.
const PREALLOC_MODES: [&str; 4] = ["off", "metadata", "falloc", "full"];

/// `truncate [-m prealloc_mode] off`: changes the virtual size (QED images may also shrink,
/// which QEMU's QED driver refuses).
pub fn truncate(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let parsed = getopt(args, "m:");
    let mut prealloc = "off".to_string();
    for (_, arg) in &parsed.options {
        let mode = arg.clone().unwrap_or_default();
        if !PREALLOC_MODES.contains(&mode.as_str()) {
            ctx.con
                .error(&format!("Invalid preallocation mode '{mode}'"));
            return Outcome::Failed;
        }
        prealloc = mode;
    }
    if let Some(e) = &parsed.error {
        return bad_option(ctx, e);
    }
    let Some(size_arg) = parsed.operands.first() else {
        return usage(&mut ctx.con, "truncate");
    };
    // qemu-io names the first argument in a parse error, whichever it is.
    let size = match crate::size::parse_size_i64(size_arg) {
        Ok(size) => size,
        Err(e) => {
            number_error(&mut ctx.con, e, &args[0]);
            return Outcome::Failed;
        }
    };
    if prealloc != "off" {
        ctx.con
            .error(&format!("Unsupported preallocation mode '{prealloc}'"));
        return Outcome::Failed;
    }
    ctx.events.drain(&mut ctx.con);
    let Some((result, _)) = sync_io(ctx, |disk| disk.truncate(size)) else {
        return Outcome::Failed;
    };
    match result {
        Ok(()) => Outcome::Done,
        Err(e) => {
            let qed = ctx
                .disk()
                .is_some_and(|d| d.target().format() == ImageFormat::Qed);
            let why = match &e {
                Error::InvalidArgument(_) if qed => "Invalid image size specified".to_string(),
                other => format!("Could not resize image: {}", errno_text(other)),
            };
            ctx.con.error(&why);
            ctx.con.detail(&format!("truncate: {e}"));
            Outcome::Failed
        }
    }
}

/// `discard [-Cq] off len`.
pub fn discard(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let parsed = getopt(args, "Cq");
    let terse = parsed.options.iter().any(|(c, _)| *c == 'C');
    let quiet = parsed.options.iter().any(|(c, _)| *c == 'q');
    if let Some(e) = &parsed.error {
        return bad_option(ctx, e);
    }
    let [offset_arg, count_arg] = parsed.operands.as_slice() else {
        return usage(&mut ctx.con, "discard");
    };
    let offset = try_or_fail!(number(&mut ctx.con, offset_arg));
    let count = try_or_fail!(number(&mut ctx.con, count_arg));
    if count > MAX_REQUEST {
        ctx.con.out(&format!(
            "length cannot exceed {MAX_REQUEST}, given {count_arg}\n"
        ));
        return Outcome::Failed;
    }
    let (result, elapsed) = try_or_fail!(sync_io(ctx, |disk| disk.discard(offset, count)));
    if let Err(e) = result {
        return failed(&mut ctx.con, "discard", &e);
    }
    if !quiet {
        ctx.con.out(&io_report(
            "discard", elapsed, offset, count, count, 1, terse,
        ));
    }
    Outcome::Done
}

/// `flush`.
pub fn flush(ctx: &mut Ctx<'_>, _args: &[String]) -> Outcome {
    let Some((result, _)) = sync_io(ctx, |disk| disk.flush()) else {
        return Outcome::Failed;
    };
    match result {
        Ok(()) => Outcome::Done,
        Err(e) => {
            ctx.con.detail(&format!("flush: {e}"));
            Outcome::Failed
        }
    }
}

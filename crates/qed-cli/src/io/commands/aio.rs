//! `aio_read`, `aio_write`, `aio_flush`: requests that run in the background, on threads
//! against the shared image, as qemu-io's `aio_read_f`, `aio_write_f` and `aio_flush_f`.
//! Submitting succeeds whatever the request then does; its lines (or its failure) print when
//! it completes.

use std::time::Instant;

use super::args::{buffer, number, pattern, try_or_fail, vector_len};
use super::rw::VectorRead;
use super::{bad_option, usage, Ctx, Outcome};
use crate::error::errno_text;
use crate::io::events::Completion;
use crate::io::getopt::getopt;
use crate::text::io_report;

fn failure(op: &str, e: &qed_image::Error) -> Completion {
    Completion {
        out: format!("{op} failed: {}\n", errno_text(e)),
        detail: Some(format!("{op}: {e}")),
    }
}

/// `aio_read [-Ciqrv] [-P pattern] off len [len..]`.
pub fn aio_read(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let mut req = match VectorRead::parse(ctx, args, "aio_read", "CiP:qrv") {
        Ok(req) => req,
        Err(outcome) => return outcome,
    };
    let Some(disk) = ctx.disk() else {
        return Outcome::Failed;
    };
    let start = Instant::now();
    ctx.events.submit(move || {
        let result = disk.read(&mut req.buf, req.offset);
        let elapsed = start.elapsed();
        drop(disk);
        if let Err(e) = result {
            // qemu-io names an aio_read failure after readv.
            return failure("readv", &e);
        }
        let (out, _) = req.report(elapsed);
        Completion { out, detail: None }
    });
    Outcome::Done
}

/// `aio_write [-Cfiqruz] [-P pattern] off len [len..]`.
pub fn aio_write(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let parsed = getopt(args, "CfiP:qruz");
    let (mut terse, mut fua, mut quiet, mut unmap, mut zeroes, mut registered) =
        (false, false, false, false, false, false);
    let mut fill = 0xcd;
    for (c, arg) in &parsed.options {
        match c {
            'C' => terse = true,
            'f' => fua = true,
            'q' => quiet = true,
            'r' => registered = true,
            'u' => unmap = true,
            'P' => {
                let arg = arg.as_deref().unwrap_or_default();
                fill = try_or_fail!(pattern(&mut ctx.con, arg));
            }
            'i' => {
                ctx.con.out("injecting invalid write request\n");
                return Outcome::Done;
            }
            'z' => zeroes = true,
            _ => {}
        }
    }
    if let Some(e) = &parsed.error {
        return bad_option(ctx, e);
    }
    let operands = parsed.operands.as_slice();
    if operands.len() < 2 {
        return usage(&mut ctx.con, "aio_write");
    }
    let refusal = if zeroes && operands.len() != 2 {
        Some("-z supports only a single length parameter")
    } else if unmap && !zeroes {
        Some("-u requires -z to be specified")
    } else if zeroes && registered {
        Some("cannot combine zero write with registered I/O buffer")
    } else {
        None
    };
    if let Some(refusal) = refusal {
        ctx.con.out(&format!("{refusal}\n"));
        return Outcome::Failed;
    }
    let offset = try_or_fail!(number(&mut ctx.con, &operands[0]));
    let (count, data) = if zeroes {
        (try_or_fail!(number(&mut ctx.con, &operands[1])), Vec::new())
    } else {
        let count = try_or_fail!(vector_len(&mut ctx.con, &operands[1..]));
        (
            count,
            try_or_fail!(buffer(&mut ctx.con, "aio_write", count, fill)),
        )
    };
    let Some(disk) = ctx.disk() else {
        return Outcome::Failed;
    };
    let start = Instant::now();
    ctx.events.submit(move || {
        let result = if zeroes {
            disk.write_zeroes(offset, count, unmap, false)
                .and_then(|()| if fua { disk.flush() } else { Ok(()) })
        } else {
            disk.write(&data, offset, fua)
        };
        let elapsed = start.elapsed();
        drop(disk);
        match result {
            Err(e) => failure("aio_write", &e),
            Ok(()) if quiet => Completion::default(),
            Ok(()) => Completion {
                out: io_report("wrote", elapsed, offset, count, count, 1, terse),
                detail: None,
            },
        }
    });
    Outcome::Done
}

/// `aio_flush`: waits for every request in flight (qemu-io drains; the writes of the
/// writethrough mode were flushed as they completed).
pub fn aio_flush(ctx: &mut Ctx<'_>, _args: &[String]) -> Outcome {
    ctx.events.drain(&mut ctx.con);
    Outcome::Done
}

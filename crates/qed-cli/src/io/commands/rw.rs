//! `read`, `readv`, `write`, `writev`: synchronous requests, as qemu-io's `read_f`,
//! `readv_f`, `write_f` and `writev_f`.

use std::fs::File;
use std::io::Read;

use qed_image::Error;

use super::args::{buffer, failed, number, pattern, sync_io, try_or_fail, vector_len, MAX_REQUEST};
use super::{bad_option, usage, Ctx, Outcome};
use crate::io::console::Console;
use crate::io::getopt::getopt;
use crate::text::{hexdump, io_report};

/// What the VM-state options (`-b`) get: QED and raw images have no VM state.
fn no_vmstate() -> Error {
    Error::Unsupported("VM state (the image format has none)".into())
}

/// Checks `-b`/`-c` alignment as qemu-io does (offset and count on sector boundaries).
fn sector_aligned(con: &mut Console<'_>, offset: u64, count: u64) -> bool {
    if offset % 512 != 0 {
        con.out(&format!(
            "{offset} is not a sector-aligned value for 'offset'\n"
        ));
        return false;
    }
    if count % 512 != 0 {
        con.out(&format!(
            "{count} is not a sector-aligned value for 'count'\n"
        ));
        return false;
    }
    true
}

/// `read [-bCqrv] [-P pattern [-s off] [-l len]] off len`.
pub fn read(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let parsed = getopt(args, "bCl:pP:qrs:v");
    let (mut vmstate, mut terse, mut quiet, mut verbose, mut registered) =
        (false, false, false, false, false);
    let (mut fill, mut pattern_offset, mut pattern_len) = (None, None, None);
    for (c, arg) in &parsed.options {
        let arg = arg.as_deref().unwrap_or_default();
        match c {
            'b' => vmstate = true,
            'C' => terse = true,
            'l' => pattern_len = Some(try_or_fail!(number(&mut ctx.con, arg))),
            'P' => fill = Some(try_or_fail!(pattern(&mut ctx.con, arg))),
            'q' => quiet = true,
            'r' => registered = true,
            's' => pattern_offset = Some(try_or_fail!(number(&mut ctx.con, arg))),
            'v' => verbose = true,
            _ => {} // -p: ignored, as in qemu-io
        }
    }
    if let Some(e) = &parsed.error {
        return bad_option(ctx, e);
    }
    let [offset_arg, count_arg] = parsed.operands.as_slice() else {
        return usage(&mut ctx.con, "read");
    };
    let offset = try_or_fail!(number(&mut ctx.con, offset_arg));
    let count = try_or_fail!(number(&mut ctx.con, count_arg));
    if count > MAX_REQUEST {
        ctx.con.out(&format!(
            "length cannot exceed {MAX_REQUEST}, given {count_arg}\n"
        ));
        return Outcome::Failed;
    }
    if fill.is_none() && (pattern_len.is_some() || pattern_offset.is_some()) {
        return usage(&mut ctx.con, "read");
    }
    let pattern_offset = pattern_offset.unwrap_or(0);
    let pattern_len =
        pattern_len.map_or(i128::from(count) - i128::from(pattern_offset), i128::from);
    if pattern_len < 0 || pattern_len + i128::from(pattern_offset) > i128::from(count) {
        ctx.con
            .out("pattern verification range exceeds end of read data\n");
        return Outcome::Failed;
    }
    if vmstate {
        if !sector_aligned(&mut ctx.con, offset, count) {
            return Outcome::Failed;
        }
        if registered {
            ctx.con
                .out("I/O buffer registration is not supported when reading from vmstate\n");
            return Outcome::Failed;
        }
    }
    let mut buf = try_or_fail!(buffer(&mut ctx.con, "read", count, 0xab));
    let (result, elapsed) = try_or_fail!(sync_io(ctx, |disk| {
        if vmstate {
            Err(no_vmstate())
        } else {
            disk.read(&mut buf, offset)
        }
    }));
    if let Err(e) = result {
        return failed(&mut ctx.con, "read", &e);
    }
    let mut outcome = Outcome::Done;
    if let Some(fill) = fill {
        // Both bounds are within `count`, checked above.
        let start = pattern_offset as usize;
        let end = start + pattern_len as usize;
        if buf[start..end].iter().any(|&b| b != fill) {
            ctx.con.out(&format!(
                "Pattern verification failed at offset {}, {pattern_len} bytes\n",
                offset + pattern_offset
            ));
            outcome = Outcome::Failed;
        }
    }
    if quiet {
        return outcome;
    }
    if verbose {
        ctx.con.out(&hexdump(&buf, offset));
    }
    ctx.con
        .out(&io_report("read", elapsed, offset, count, count, 1, terse));
    outcome
}

/// `readv [-Cqrv] [-P pattern] off len [len..]`.
pub fn readv(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let mut req = match VectorRead::parse(ctx, args, "readv", "CP:qrv") {
        Ok(req) => req,
        Err(outcome) => return outcome,
    };
    let (offset, buf) = (req.offset, &mut req.buf);
    let (result, elapsed) = try_or_fail!(sync_io(ctx, |disk| disk.read(buf, offset)));
    if let Err(e) = result {
        return failed(&mut ctx.con, "readv", &e);
    }
    let (text, verified) = req.report(elapsed);
    ctx.con.out(&text);
    if verified {
        Outcome::Done
    } else {
        Outcome::Failed
    }
}

/// A vectored read as `readv` and `aio_read` take it: `[-C] [-P pattern] [-q] [-v] off len
/// [len..]` (the lengths add up to one buffer), and its report.
pub struct VectorRead {
    /// Guest offset.
    pub offset: u64,
    /// The buffer, the lengths' sum long.
    pub buf: Vec<u8>,
    terse: bool,
    quiet: bool,
    verbose: bool,
    fill: Option<u8>,
}

impl VectorRead {
    /// Parses `args` for the command `name` with `optstring` (`aio_read` adds `-i`, which
    /// prints qemu-io's line and ends the command). `Err` holds the command's outcome when
    /// there is nothing to read.
    pub fn parse(
        ctx: &mut Ctx<'_>,
        args: &[String],
        name: &str,
        optstring: &str,
    ) -> Result<Self, Outcome> {
        let fail = Err(Outcome::Failed);
        let parsed = getopt(args, optstring);
        let (mut terse, mut quiet, mut verbose, mut fill) = (false, false, false, None);
        for (c, arg) in &parsed.options {
            match c {
                'C' => terse = true,
                'P' => match pattern(&mut ctx.con, arg.as_deref().unwrap_or_default()) {
                    Some(p) => fill = Some(p),
                    None => return fail,
                },
                'i' => {
                    ctx.con.out("injecting invalid read request\n");
                    return Err(Outcome::Done);
                }
                'q' => quiet = true,
                'v' => verbose = true,
                _ => {} // -r: a registered buffer changes nothing here
            }
        }
        if let Some(e) = &parsed.error {
            return Err(bad_option(ctx, e));
        }
        let Some((offset_arg, lens)) = parsed.operands.split_first().filter(|(_, l)| !l.is_empty())
        else {
            return Err(usage(&mut ctx.con, name));
        };
        let Some(offset) = number(&mut ctx.con, offset_arg) else {
            return fail;
        };
        let Some(count) = vector_len(&mut ctx.con, lens) else {
            return fail;
        };
        let Some(buf) = buffer(&mut ctx.con, name, count, 0xab) else {
            return fail;
        };
        Ok(Self {
            offset,
            buf,
            terse,
            quiet,
            verbose,
            fill,
        })
    }

    /// What qemu-io prints once the read is done, and whether `-P` verified.
    pub fn report(&self, elapsed: std::time::Duration) -> (String, bool) {
        let (offset, count) = (self.offset, self.buf.len() as u64);
        let mut out = String::new();
        let verified = self
            .fill
            .is_none_or(|fill| self.buf.iter().all(|&b| b == fill));
        if !verified {
            out.push_str(&format!(
                "Pattern verification failed at offset {offset}, {count} bytes\n"
            ));
        }
        if !self.quiet {
            if self.verbose {
                out.push_str(&hexdump(&self.buf, offset));
            }
            out.push_str(&io_report(
                "read", elapsed, offset, count, count, 1, self.terse,
            ));
        }
        (out, verified)
    }
}

/// The options of `write`.
#[derive(Default)]
struct WriteFlags {
    vmstate: bool,
    compressed: bool,
    terse: bool,
    fua: bool,
    no_fallback: bool,
    quiet: bool,
    registered: bool,
    unmap: bool,
    zeroes: bool,
}

/// `write [-bcCfnqruz] [-P pattern | -s source_file] off len`.
pub fn write(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let parsed = getopt(args, "bcCfnpP:qrs:uz");
    let mut f = WriteFlags::default();
    let (mut fill, mut source) = (None, None);
    for (c, arg) in &parsed.options {
        let arg = arg.as_deref().unwrap_or_default();
        match c {
            'b' => f.vmstate = true,
            'c' => f.compressed = true,
            'C' => f.terse = true,
            'f' => f.fua = true,
            'n' => f.no_fallback = true,
            'P' => fill = Some(try_or_fail!(pattern(&mut ctx.con, arg))),
            'q' => f.quiet = true,
            'r' => f.registered = true,
            's' => source = Some(arg.to_string()),
            'u' => f.unmap = true,
            'z' => f.zeroes = true,
            _ => {} // -p: ignored, as in qemu-io
        }
    }
    if let Some(e) = &parsed.error {
        return bad_option(ctx, e);
    }
    let [offset_arg, count_arg] = parsed.operands.as_slice() else {
        return usage(&mut ctx.con, "write");
    };
    let con = &mut ctx.con;
    let refusal = if f.vmstate && f.zeroes {
        Some("-b and -z cannot be specified at the same time")
    } else if f.fua && (f.vmstate || f.compressed) {
        Some("-f and -b or -c cannot be specified at the same time")
    } else if f.no_fallback && !f.zeroes {
        Some("-n requires -z to be specified")
    } else if f.unmap && !f.zeroes {
        Some("-u requires -z to be specified")
    } else if u8::from(f.zeroes) + u8::from(fill.is_some()) + u8::from(source.is_some()) > 1 {
        Some("Only one of -z, -P, and -s can be specified at the same time")
    } else {
        None
    };
    if let Some(refusal) = refusal {
        con.out(&format!("{refusal}\n"));
        return Outcome::Failed;
    }
    let offset = try_or_fail!(number(con, offset_arg));
    let count = try_or_fail!(number(con, count_arg));
    if count > MAX_REQUEST && !f.no_fallback {
        con.out(&format!(
            "length cannot exceed {MAX_REQUEST} without -n, given {count_arg}\n"
        ));
        return Outcome::Failed;
    }
    if (f.vmstate || f.compressed) && !sector_aligned(con, offset, count) {
        return Outcome::Failed;
    }
    let data = if f.zeroes {
        if f.registered {
            con.out("cannot combine zero write with registered I/O buffer\n");
            return Outcome::Failed;
        }
        Vec::new()
    } else {
        let mut buf = try_or_fail!(buffer(con, "write", count, fill.unwrap_or(0xcd)));
        if let Some(path) = &source {
            try_or_fail!(fill_from_file(con, &mut buf, path));
        }
        buf
    };
    let (result, elapsed) = try_or_fail!(sync_io(ctx, |disk| {
        if f.vmstate {
            Err(no_vmstate())
        } else if f.zeroes {
            disk.write_zeroes(offset, count, f.unmap, f.no_fallback)
        } else if f.compressed {
            Err(Error::Unsupported(
                "compressed writes (the image format has no compressed clusters)".into(),
            ))
        } else {
            disk.write(&data, offset, f.fua)
        }
    }));
    if let Err(e) = result {
        return failed(&mut ctx.con, "write", &e);
    }
    if !f.quiet {
        ctx.con.out(&io_report(
            "wrote", elapsed, offset, count, count, 1, f.terse,
        ));
    }
    Outcome::Done
}

/// `writev [-Cfqr] [-P pattern] off len [len..]`.
pub fn writev(ctx: &mut Ctx<'_>, args: &[String]) -> Outcome {
    let parsed = getopt(args, "CfP:qr");
    let (mut terse, mut fua, mut quiet, mut fill) = (false, false, false, 0xcd);
    for (c, arg) in &parsed.options {
        match c {
            'C' => terse = true,
            'f' => fua = true,
            'q' => quiet = true,
            'P' => {
                let arg = arg.as_deref().unwrap_or_default();
                fill = try_or_fail!(pattern(&mut ctx.con, arg));
            }
            _ => {} // -r: a registered buffer changes nothing here
        }
    }
    if let Some(e) = &parsed.error {
        return bad_option(ctx, e);
    }
    let Some((offset_arg, lens)) = parsed.operands.split_first().filter(|(_, l)| !l.is_empty())
    else {
        return usage(&mut ctx.con, "writev");
    };
    let offset = try_or_fail!(number(&mut ctx.con, offset_arg));
    let count = try_or_fail!(vector_len(&mut ctx.con, lens));
    let buf = try_or_fail!(buffer(&mut ctx.con, "writev", count, fill));
    let (result, elapsed) = try_or_fail!(sync_io(ctx, |disk| disk.write(&buf, offset, fua)));
    if let Err(e) = result {
        return failed(&mut ctx.con, "writev", &e);
    }
    if !quiet {
        ctx.con
            .out(&io_report("wrote", elapsed, offset, count, count, 1, terse));
    }
    Outcome::Done
}

/// Fills `buf` with the bytes of the file at `path`, repeated (qemu-io `write -s`).
fn fill_from_file(con: &mut Console<'_>, buf: &mut [u8], path: &str) -> Option<()> {
    let mut read = || -> std::io::Result<usize> {
        let mut file = File::open(path)?;
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        Ok(filled)
    };
    let filled = match read() {
        Ok(n) => n,
        Err(e) => {
            con.bare(&format!("{path}: {}", crate::error::os_text(&e)));
            return None;
        }
    };
    if filled == 0 && !buf.is_empty() {
        con.bare(&format!("{path}: file is empty"));
        return None;
    }
    let mut at = filled;
    while at < buf.len() {
        let n = filled.min(buf.len() - at);
        buf.copy_within(0..n, at);
        at += n;
    }
    Some(())
}

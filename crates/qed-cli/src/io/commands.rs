//! The commands of `qed io`, each a port of the qemu-io command of the same name: same
//! options, same checks in the same order, same output lines.

use std::fs::File;
use std::io::Read;
use std::time::{Duration, Instant};

use qed_image::Error;

use super::getopt::getopt;
use super::target::Target;
use super::{usage, Console, Outcome};
use crate::error::errno_text;
use crate::size::{parse_size_i64, SizeError};
use crate::text::{cvtstr, hexdump, io_report};

/// Largest request qemu-io accepts (`BDRV_REQUEST_MAX_BYTES`).
pub const MAX_REQUEST: u64 = 2_147_483_136;

/// Parses a number argument (`cvtnum`), printing qemu-io's message when it is not one.
fn number(con: &mut Console<'_>, arg: &str) -> Option<u64> {
    match parse_size_i64(arg) {
        Ok(value) => Some(value),
        Err(SizeError::Invalid) => {
            con.out(&format!(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n"
            ));
            None
        }
        Err(SizeError::TooLarge) => {
            con.out(&format!("Parsing error: argument too large -- {arg}\n"));
            None
        }
    }
}

/// A pattern byte as C's `strtol(arg, &end, 0)` reads it: decimal, `0x` hex or `0` octal,
/// in 0..=255, nothing after it.
pub fn parse_pattern(arg: &str) -> Option<u8> {
    let s = arg.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let bytes = s.as_bytes();
    let (radix, digits) = if bytes.len() > 2
        && bytes[0] == b'0'
        && matches!(bytes[1], b'x' | b'X')
        && bytes[2].is_ascii_hexdigit()
    {
        (16, &s[2..])
    } else if bytes.len() > 1 && bytes[0] == b'0' {
        (8, &s[1..])
    } else {
        (10, s)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let value = u64::from_str_radix(digits, radix).ok()?;
    match (negative, value) {
        (true, 0) => Some(0),
        (true, _) => None,
        (false, v) => u8::try_from(v).ok(),
    }
}

/// Prints the pattern error and gives up.
fn pattern(con: &mut Console<'_>, arg: &str) -> Option<u8> {
    let value = parse_pattern(arg);
    if value.is_none() {
        con.out(&format!("{arg} is not a valid pattern byte\n"));
    }
    value
}

/// A buffer of `len` bytes of `fill`, or `None` (reported) when memory is short.
fn buffer(con: &mut Console<'_>, op: &str, len: u64, fill: u8) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let len = usize::try_from(len).ok()?;
    if let Err(e) = buf.try_reserve_exact(len) {
        con.err(&format!(
            "{}: {op}: cannot allocate {len} bytes: {e}\n",
            crate::prog()
        ));
        return None;
    }
    buf.resize(len, fill);
    Some(buf)
}

/// Reports a failed operation as qemu-io does (`read failed: Input/output error`), with the
/// engine's detail on stderr.
fn failed(con: &mut Console<'_>, op: &str, e: &Error) -> Outcome {
    con.out(&format!("{op} failed: {}\n", errno_text(e)));
    con.err(&format!("{}: {op}: {e}\n", crate::prog()));
    Outcome::Failed
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let result = f();
    (result, start.elapsed())
}

macro_rules! try_or_fail {
    ($e:expr) => {
        match $e {
            Some(value) => value,
            None => return Outcome::Failed,
        }
    };
}

/// `read [-Cqv] [-P pattern [-s off] [-l len]] off len`.
pub fn read(target: &Target, con: &mut Console<'_>, args: &[String]) -> Outcome {
    let parsed = getopt(args, "Cl:pP:qrs:v");
    let (mut terse, mut quiet, mut verbose) = (false, false, false);
    let (mut fill, mut pattern_offset, mut pattern_len) = (None, None, None);
    for (c, arg) in &parsed.options {
        let arg = arg.as_deref().unwrap_or_default();
        match c {
            'C' => terse = true,
            'l' => pattern_len = Some(try_or_fail!(number(con, arg))),
            'P' => fill = Some(try_or_fail!(pattern(con, arg))),
            'q' => quiet = true,
            's' => pattern_offset = Some(try_or_fail!(number(con, arg))),
            'v' => verbose = true,
            _ => {} // -p, -r: accepted and ignored, as in qemu-io
        }
    }
    if let Some(e) = &parsed.error {
        con.err(&format!("{}: read: {}\n", crate::prog(), e.message()));
        return usage(con, "read");
    }
    let [offset_arg, count_arg] = parsed.operands.as_slice() else {
        return usage(con, "read");
    };
    let offset = try_or_fail!(number(con, offset_arg));
    let count = try_or_fail!(number(con, count_arg));
    if count > MAX_REQUEST {
        con.out(&format!(
            "length cannot exceed {MAX_REQUEST}, given {count_arg}\n"
        ));
        return Outcome::Failed;
    }
    if fill.is_none() && (pattern_len.is_some() || pattern_offset.is_some()) {
        return usage(con, "read");
    }
    let pattern_offset = pattern_offset.unwrap_or(0);
    let pattern_len =
        pattern_len.map_or(i128::from(count) - i128::from(pattern_offset), i128::from);
    if pattern_len < 0 || pattern_len + i128::from(pattern_offset) > i128::from(count) {
        con.out("pattern verification range exceeds end of read data\n");
        return Outcome::Failed;
    }
    let mut buf = try_or_fail!(buffer(con, "read", count, 0xab));
    let (result, elapsed) = timed(|| target.read_at(&mut buf, offset));
    if let Err(e) = result {
        return failed(con, "read", &e);
    }
    let mut outcome = Outcome::Done;
    if let Some(fill) = fill {
        // Both bounds are within `count`, checked above.
        let start = pattern_offset as usize;
        let end = start + pattern_len as usize;
        if buf[start..end].iter().any(|&b| b != fill) {
            con.out(&format!(
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
        con.out(&hexdump(&buf, offset));
    }
    con.out(&io_report("read", elapsed, offset, count, count, 1, terse));
    outcome
}

/// `write [-Cfnquz] [-c] [-P pattern | -s source_file] off len`.
pub fn write(target: &Target, con: &mut Console<'_>, args: &[String]) -> Outcome {
    let parsed = getopt(args, "cCfnpP:qrs:uz");
    let (mut terse, mut quiet, mut fua, mut compressed) = (false, false, false, false);
    let (mut no_fallback, mut unmap, mut zeroes) = (false, false, false);
    let (mut fill, mut source) = (None, None);
    for (c, arg) in &parsed.options {
        let arg = arg.as_deref().unwrap_or_default();
        match c {
            'c' => compressed = true,
            'C' => terse = true,
            'f' => fua = true,
            'n' => no_fallback = true,
            'P' => fill = Some(try_or_fail!(pattern(con, arg))),
            'q' => quiet = true,
            's' => source = Some(arg.to_string()),
            'u' => unmap = true,
            'z' => zeroes = true,
            _ => {} // -p, -r: accepted and ignored, as in qemu-io
        }
    }
    if let Some(e) = &parsed.error {
        con.err(&format!("{}: write: {}\n", crate::prog(), e.message()));
        return usage(con, "write");
    }
    let [offset_arg, count_arg] = parsed.operands.as_slice() else {
        return usage(con, "write");
    };
    if fua && compressed {
        con.out("-f and -b or -c cannot be specified at the same time\n");
        return Outcome::Failed;
    }
    if no_fallback && !zeroes {
        con.out("-n requires -z to be specified\n");
        return Outcome::Failed;
    }
    if unmap && !zeroes {
        con.out("-u requires -z to be specified\n");
        return Outcome::Failed;
    }
    if u8::from(zeroes) + u8::from(fill.is_some()) + u8::from(source.is_some()) > 1 {
        con.out("Only one of -z, -P, and -s can be specified at the same time\n");
        return Outcome::Failed;
    }
    let offset = try_or_fail!(number(con, offset_arg));
    let count = try_or_fail!(number(con, count_arg));
    if count > MAX_REQUEST && !no_fallback {
        con.out(&format!(
            "length cannot exceed {MAX_REQUEST} without -n, given {count_arg}\n"
        ));
        return Outcome::Failed;
    }
    if compressed {
        if offset % 512 != 0 {
            con.out(&format!(
                "{offset} is not a sector-aligned value for 'offset'\n"
            ));
            return Outcome::Failed;
        }
        if count % 512 != 0 {
            con.out(&format!(
                "{count} is not a sector-aligned value for 'count'\n"
            ));
            return Outcome::Failed;
        }
    }
    let data = if zeroes {
        Vec::new()
    } else {
        let mut buf = try_or_fail!(buffer(con, "write", count, fill.unwrap_or(0xcd)));
        if let Some(path) = &source {
            try_or_fail!(fill_from_file(con, &mut buf, path));
        }
        buf
    };
    let (result, elapsed) = timed(|| {
        if zeroes {
            target.write_zeroes(offset, count, unmap)
        } else if compressed {
            Err(Error::Unsupported(
                "compressed writes (QED has no compressed clusters)".into(),
            ))
        } else {
            target.write_at(&data, offset)?;
            if fua {
                target.flush()?;
            }
            Ok(())
        }
    });
    if let Err(e) = result {
        return failed(con, "write", &e);
    }
    if !quiet {
        con.out(&io_report("wrote", elapsed, offset, count, count, 1, terse));
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
            con.err(&format!(
                "{}: {path}: {}\n",
                crate::prog(),
                crate::error::os_text(&e)
            ));
            return None;
        }
    };
    if filled == 0 && !buf.is_empty() {
        con.err(&format!("{}: {path}: file is empty\n", crate::prog()));
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

/// `discard [-Cq] off len`.
pub fn discard(target: &Target, con: &mut Console<'_>, args: &[String]) -> Outcome {
    let parsed = getopt(args, "Cq");
    let terse = parsed.options.iter().any(|(c, _)| *c == 'C');
    let quiet = parsed.options.iter().any(|(c, _)| *c == 'q');
    if let Some(e) = &parsed.error {
        con.err(&format!("{}: discard: {}\n", crate::prog(), e.message()));
        return usage(con, "discard");
    }
    let [offset_arg, count_arg] = parsed.operands.as_slice() else {
        return usage(con, "discard");
    };
    let offset = try_or_fail!(number(con, offset_arg));
    let count = try_or_fail!(number(con, count_arg));
    if count > MAX_REQUEST {
        con.out(&format!(
            "length cannot exceed {MAX_REQUEST}, given {count_arg}\n"
        ));
        return Outcome::Failed;
    }
    let (result, elapsed) = timed(|| target.discard(offset, count));
    if let Err(e) = result {
        return failed(con, "discard", &e);
    }
    if !quiet {
        con.out(&io_report(
            "discard", elapsed, offset, count, count, 1, terse,
        ));
    }
    Outcome::Done
}

/// `flush`.
pub fn flush(target: &Target, con: &mut Console<'_>, _args: &[String]) -> Outcome {
    match target.flush() {
        Ok(()) => Outcome::Done,
        Err(e) => {
            con.err(&format!("{}: flush: {e}\n", crate::prog()));
            Outcome::Failed
        }
    }
}

/// `map`: the allocated and unallocated stretches of this image (not its backing file).
pub fn map(target: &Target, con: &mut Console<'_>, _args: &[String]) -> Outcome {
    let (runs, error) = target.allocation();
    for run in runs {
        con.out(&format!(
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
            con.err(&format!(
                "{}: Failed to get allocation status: {} ({e})\n",
                crate::prog(),
                errno_text(&e)
            ));
            Outcome::Failed
        }
    }
}

/// `length`: the virtual disk size.
pub fn length(target: &Target, con: &mut Console<'_>, _args: &[String]) -> Outcome {
    con.out(&format!("{}\n", cvtstr(target.size() as f64)));
    Outcome::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_as_strtol() {
        for (text, value) in [
            ("0", 0),
            ("255", 255),
            ("0xcd", 0xcd),
            ("0XCD", 0xcd),
            ("017", 15),
            ("+5", 5),
            ("-0", 0),
            (" 7", 7),
        ] {
            assert_eq!(parse_pattern(text), Some(value), "{text}");
        }
        for text in ["256", "0x1ff", "-1", "0x", "08", "1a", "", "x"] {
            assert_eq!(parse_pattern(text), None, "{text:?}");
        }
    }
}

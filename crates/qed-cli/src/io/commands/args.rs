//! What several commands share: numbers and patterns as qemu-io parses them (with its
//! messages), the length lists of the vectored commands, buffers, timing and failure lines.

use std::time::{Duration, Instant};

use qed_image::Error;

use super::{Ctx, Outcome};
use crate::error::errno_text;
use crate::io::console::Console;
use crate::size::{parse_size_i64, SizeError};

/// Largest request qemu-io accepts (`BDRV_REQUEST_MAX_BYTES`).
pub const MAX_REQUEST: u64 = 2_147_483_136;

/// `return Outcome::Failed` when an argument helper (which printed why) gave `None`.
macro_rules! try_or_fail {
    ($e:expr) => {
        match $e {
            Some(value) => value,
            None => return Outcome::Failed,
        }
    };
}
pub(crate) use try_or_fail;

/// Parses a number argument (`cvtnum`), printing qemu-io's message when it is not one.
pub fn number(con: &mut Console<'_>, arg: &str) -> Option<u64> {
    parse_size_i64(arg)
        .map_err(|e| number_error(con, e, arg))
        .ok()
}

/// Prints qemu-io's message for a number argument it could not parse, naming `arg`.
pub fn number_error(con: &mut Console<'_>, e: SizeError, arg: &str) {
    match e {
        SizeError::Invalid => con.out(&format!(
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n"
        )),
        SizeError::TooLarge => con.out(&format!("Parsing error: argument too large -- {arg}\n")),
    }
}

/// C's `strtol(arg, &end, 0)` when it consumes the whole argument: decimal, `0x` hex or `0`
/// octal, an optional sign, leading white space; None when characters are left over or the
/// value does not fit.
pub fn strtol(arg: &str) -> Option<i64> {
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
    if digits.is_empty() {
        // Nothing converted: the end pointer stays at the start, so only "" is consumed.
        return arg.is_empty().then_some(0);
    }
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let value = i64::from_str_radix(digits, radix).ok()?;
    Some(if negative { -value } else { value })
}

/// A pattern byte as qemu-io's `parse_pattern` reads it (`strtol`, in 0..=255).
pub fn parse_pattern(arg: &str) -> Option<u8> {
    if arg.is_empty() {
        return Some(0);
    }
    strtol(arg).and_then(|v| u8::try_from(v).ok())
}

/// Parses a pattern, printing qemu-io's message when it is not one.
pub fn pattern(con: &mut Console<'_>, arg: &str) -> Option<u8> {
    let value = parse_pattern(arg);
    if value.is_none() {
        con.out(&format!("{arg} is not a valid pattern byte\n"));
    }
    value
}

/// The total of the lengths of a vectored command (`create_iovec`), with its checks.
pub fn vector_len(con: &mut Console<'_>, lens: &[String]) -> Option<u64> {
    let mut total: u64 = 0;
    for arg in lens {
        let len = number(con, arg)?;
        if len > MAX_REQUEST {
            con.out(&format!(
                "Argument '{arg}' exceeds maximum size {MAX_REQUEST}\n"
            ));
            return None;
        }
        if total > MAX_REQUEST - len {
            con.out(&format!(
                "The total number of bytes exceed the maximum size {MAX_REQUEST}\n"
            ));
            return None;
        }
        total += len;
    }
    Some(total)
}

/// A buffer of `len` bytes of `fill`, or `None` (reported) when memory is short.
pub fn buffer(con: &mut Console<'_>, op: &str, len: u64, fill: u8) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let len = usize::try_from(len).ok()?;
    if let Err(e) = buf.try_reserve_exact(len) {
        con.error(&format!("{op}: cannot allocate {len} bytes: {e}"));
        return None;
    }
    buf.resize(len, fill);
    Some(buf)
}

/// Reports a failed operation as qemu-io does (`read failed: Input/output error` on stdout),
/// with the engine's detail under the name `qed`.
pub fn failed(con: &mut Console<'_>, op: &str, e: &Error) -> Outcome {
    con.out(&format!("{op} failed: {}\n", errno_text(e)));
    con.detail(&format!("{op}: {e}"));
    Outcome::Failed
}

/// Runs `f` and measures it.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let result = f();
    (result, start.elapsed())
}

/// Runs one synchronous request on the open disk, timed; then, as qemu-io's main loop does
/// while it waits, prints what requests in flight completed meanwhile. `None` with no disk.
pub fn sync_io<T>(
    ctx: &mut Ctx<'_>,
    f: impl FnOnce(&crate::io::disk::Disk) -> T,
) -> Option<(T, Duration)> {
    let disk = ctx.disk()?;
    let (result, elapsed) = timed(|| f(&disk));
    drop(disk);
    ctx.events.poll(&mut ctx.con);
    Some((result, elapsed))
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
            ("", 0),
        ] {
            assert_eq!(parse_pattern(text), Some(value), "{text}");
        }
        for text in ["256", "0x1ff", "-1", "0x", "08", "1a", "x", " "] {
            assert_eq!(parse_pattern(text), None, "{text:?}");
        }
        assert_eq!(strtol("0x10"), Some(16));
        assert_eq!(strtol("-3"), Some(-3));
        assert_eq!(strtol("10ms"), None);
    }
}

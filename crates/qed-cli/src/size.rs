//! Size arguments as QEMU parses them (`qemu_strtosz`): bytes, or a number with one of the
//! suffixes b, k, M, G, T, P, E (powers of 1024, case-insensitive); a fraction needs a scaling
//! suffix (`1.5M`), hex needs none (`0x200`).

use std::fmt;

/// Why a size argument was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number, or an unknown suffix or trailing characters.
    Invalid,
    /// Negative, or larger than the limit.
    TooLarge,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Invalid => "not a size (use bytes or a k, M, G, T, P or E suffix)",
            Self::TooLarge => "size is negative or too large",
        })
    }
}

/// The multiplier of a suffix character, if it is one.
fn suffix_multiplier(c: u8) -> Option<u64> {
    let shift = match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// Parses a size the way `qemu_strtosz` does; the result fits in a `u64`.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (negative, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let bytes = body.as_bytes();
    let int_len = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    let int_digits = &body[..int_len];
    let rest = &bytes[int_len..];
    if negative {
        let numeric = int_len > 0 || (rest.first() == Some(&b'.') && rest.len() > 1);
        return Err(if numeric {
            SizeError::TooLarge
        } else {
            SizeError::Invalid
        });
    }
    if int_digits == "0" && matches!(rest.first(), Some(b'x' | b'X')) {
        return parse_hex(&body[2..]);
    }
    let int_value = if int_len == 0 {
        0
    } else {
        int_digits.parse::<u64>().map_err(|_| SizeError::TooLarge)?
    };
    let mut pos = 0;
    let mut fraction_digits = "";
    if rest.first() == Some(&b'.') {
        let frac_len = rest[1..].iter().take_while(|b| b.is_ascii_digit()).count();
        fraction_digits = &body[int_len + 1..int_len + 1 + frac_len];
        pos = 1 + frac_len;
    }
    if int_len == 0 && fraction_digits.is_empty() {
        return Err(SizeError::Invalid);
    }
    let tail = &rest[pos..];
    let (multiplier, tail) = match tail.first().and_then(|&c| suffix_multiplier(c)) {
        Some(m) => (m, &tail[1..]),
        None => (1, tail),
    };
    if !tail.is_empty() {
        return Err(SizeError::Invalid);
    }
    // The fraction as 64.64 fixed point, as QEMU computes it.
    let fraction = if fraction_digits.is_empty() {
        0u128
    } else {
        let value: f64 = format!("0.{fraction_digits}")
            .parse()
            .map_err(|_| SizeError::Invalid)?;
        (value * 18_446_744_073_709_551_616.0) as u128
    };
    if multiplier == 1 {
        return if fraction != 0 {
            Err(SizeError::Invalid)
        } else {
            Ok(int_value)
        };
    }
    let whole = u128::from(int_value) * u128::from(multiplier);
    let scaled = fraction * u128::from(multiplier);
    // Round half up.
    let total = whole + (scaled >> 64) + ((scaled >> 63) & 1);
    u64::try_from(total).map_err(|_| SizeError::TooLarge)
}

fn parse_hex(digits: &str) -> Result<u64, SizeError> {
    let len = digits.bytes().take_while(u8::is_ascii_hexdigit).count();
    if len == 0 || len != digits.len() {
        return Err(SizeError::Invalid);
    }
    u64::from_str_radix(digits, 16).map_err(|_| SizeError::TooLarge)
}

/// Like [`parse_size`], but no larger than `i64::MAX` (QEMU's `int64_t` sizes).
pub fn parse_size_i64(input: &str) -> Result<u64, SizeError> {
    let value = parse_size(input)?;
    if value > i64::MAX as u64 {
        return Err(SizeError::TooLarge);
    }
    Ok(value)
}

/// Parses a size argument as qemu-img's `cvtnum` does, refusing it with qemu-img's messages
/// (`name` says what it is: "start offset", "max length", ...).
pub fn cvtnum(name: &str, text: &str) -> crate::error::CliResult<u64> {
    cvtnum_in(name, text, 0, i64::MAX as u64)
}

/// [`cvtnum`] with bounds.
pub fn cvtnum_in(name: &str, text: &str, min: u64, max: u64) -> crate::error::CliResult<u64> {
    use crate::error::CliError;
    match parse_size(text) {
        Err(SizeError::Invalid) => Err(CliError::plain(format!(
            "Invalid {name} specified: '{text}'."
        ))),
        Ok(value) if (min..=max).contains(&value) => Ok(value),
        _ => Err(CliError::plain(format!(
            "Invalid {name} specified. Must be between {min} and {max}."
        ))),
    }
}

/// Parses an integer as `qemu_strtoul(text, NULL, 0, ...)` does (decimal, `0x` hex, leading-`0`
/// octal, the whole text; no size suffix), refusing it with qemu-img's messages when it is not
/// one or lies outside `min..=max` (a negative number counts as out of range).
pub fn strtoul_in(name: &str, text: &str, min: u64, max: u64) -> crate::error::CliResult<u64> {
    use crate::error::CliError;
    let invalid = || CliError::plain(format!("Invalid {name} specified: '{text}'."));
    let range = || {
        CliError::plain(format!(
            "Invalid {name} specified. Must be between {min} and {max}."
        ))
    };
    let body = text.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (negative, body) = match body.as_bytes().first() {
        Some(b'-') => (true, &body[1..]),
        Some(b'+') => (false, &body[1..]),
        _ => (false, body),
    };
    let (digits, radix) =
        if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
            (hex, 16)
        } else if body.len() > 1 && body.starts_with('0') {
            (&body[1..], 8)
        } else {
            (body, 10)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(invalid());
    }
    let value = u64::from_str_radix(digits, radix).map_err(|_| range())?;
    if (negative && value != 0) || !(min..=max).contains(&value) {
        return Err(range());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_qemu_accepts() {
        for (text, value) in [
            ("0", 0),
            ("512", 512),
            ("1k", 1024),
            ("1K", 1024),
            ("1m", 1 << 20),
            ("16M", 16 << 20),
            ("2G", 2 << 30),
            ("1T", 1 << 40),
            ("1P", 1 << 50),
            ("1E", 1 << 60),
            ("1b", 1),
            ("1B", 1),
            (".5k", 512),
            ("0.5k", 512),
            ("1.5M", 1_572_864),
            ("1.k", 1024),
            ("1.0", 1),
            ("1.0b", 1),
            ("0x10", 16),
            ("0X1F", 31),
            ("010", 10),
            ("+5", 5),
            (" 7", 7),
            ("0.0000001k", 0),
            ("0.3k", 307),
            ("2.675k", 2739),
            ("1.9999999999999999999k", 2048),
            ("9223372036854775807", i64::MAX as u64),
        ] {
            assert_eq!(parse_size(text), Ok(value), "{text}");
        }
    }

    #[test]
    fn integers_as_strtoul_reads_them() {
        let n = |t: &str| strtoul_in("count", t, 1, i32::MAX as u64);
        assert_eq!(n("10").unwrap(), 10);
        assert_eq!(n("0x10").unwrap(), 16);
        assert_eq!(n("010").unwrap(), 8);
        for bad in ["", "x", "1k", "1.5", "08", "0x"] {
            assert_eq!(
                n(bad).unwrap_err().to_string(),
                format!("Invalid count specified: '{bad}'.")
            );
        }
        for far in ["0", "-5", "3000000000"] {
            assert_eq!(
                n(far).unwrap_err().to_string(),
                "Invalid count specified. Must be between 1 and 2147483647."
            );
        }
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        for text in [
            "", "k", "1x", "1X", "1.5", "1e3", "1kB", "0x", "00x1", "0x1.5", "0x1k", ".", ".k",
            "abc", "1 ", "1.5b",
        ] {
            assert_eq!(parse_size(text), Err(SizeError::Invalid), "{text:?}");
        }
        for text in [
            "-5",
            "-0",
            "18446744073709551616",
            "16E",
            "99999999999999999999k",
        ] {
            assert_eq!(parse_size(text), Err(SizeError::TooLarge), "{text:?}");
        }
        assert_eq!(parse_size("-"), Err(SizeError::Invalid));
        assert_eq!(
            parse_size_i64("9223372036854775808"),
            Err(SizeError::TooLarge)
        );
        assert_eq!(parse_size_i64("8E"), Err(SizeError::TooLarge));
        assert_eq!(parse_size_i64("7.9E"), Ok(9_108_079_886_394_091_136));
    }
}

//! Numbers and buffers as QEMU's tools print them: `qemu-img`'s human sizes (`16 MiB`),
//! `qemu-io`'s sizes, rates and times (`64 KiB, 1 ops; 00.00 sec (…)`), and its hexdump.

use std::fmt::Write as _;
use std::time::Duration;

/// C's `%.{precision}g`: `precision` significant digits, trailing zeros removed, exponent
/// notation for very large or small values.
pub fn format_g(value: f64, precision: usize) -> String {
    let p = precision.max(1);
    if value == 0.0 {
        return "0".to_string();
    }
    if value.is_nan() {
        return "nan".to_string();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    let scientific = format!("{:.*e}", p - 1, value);
    let (mantissa, exponent) = scientific
        .split_once('e')
        .unwrap_or((scientific.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if exponent < -4 || exponent >= p as i32 {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!(
            "{}e{sign}{:02}",
            strip_fraction_zeros(mantissa),
            exponent.abs()
        )
    } else {
        let decimals = (p as i32 - 1 - exponent).max(0) as usize;
        strip_fraction_zeros(&format!("{value:.decimals$}"))
    }
}

fn strip_fraction_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// The binary exponent `e` with `x = m · 2^e`, `0.5 ≤ m < 1` (C's `frexp`); 0 for 0.
fn frexp_exponent(x: f64) -> i32 {
    if x == 0.0 || !x.is_finite() {
        return 0;
    }
    let biased = ((x.to_bits() >> 52) & 0x7ff) as i32;
    if biased == 0 {
        // Subnormal: normalize first.
        return frexp_exponent(x * 2f64.powi(64)) - 64;
    }
    biased - 1022
}

/// A size as `qemu-img` prints it (`size_to_str`): three significant digits and a binary
/// unit, switching unit once the number reaches 1000 (`16 MiB`, `1.5 KiB`, `0.977 KiB`).
pub fn size_to_str(value: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let exponent = frexp_exponent(value as f64 / (1000.0 / 1024.0));
    let index = ((exponent - 1) / 10).clamp(0, 6) as usize;
    let divisor = (1u64 << (index * 10)) as f64;
    format!(
        "{} {}B",
        format_g(value as f64 / divisor, 3),
        SUFFIXES[index]
    )
}

/// A size or rate as `qemu-io` prints it (`cvtstr`): three decimals and a binary unit, or
/// bytes; a `.000` fraction is dropped (`64 KiB`, `1.062 MiB`, `512 bytes`).
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(u32, &str); 6] = [
        (60, " EiB"),
        (50, " PiB"),
        (40, " TiB"),
        (30, " GiB"),
        (20, " MiB"),
        (10, " KiB"),
    ];
    let (mut text, suffix) = UNITS
        .iter()
        .find(|(shift, _)| value >= 2f64.powi(*shift as i32))
        .map(|(shift, suffix)| (c_fixed(value / 2f64.powi(*shift as i32), 3), *suffix))
        .unwrap_or_else(|| (c_fixed(value, 6), " bytes"));
    if let Some(pos) = text.find(".000") {
        text.truncate(pos);
    }
    text.push_str(suffix);
    text
}

/// C's `%.{decimals}f` (Rust spells infinities and NaN differently).
fn c_fixed(value: f64, decimals: usize) -> String {
    if value.is_nan() {
        "nan".to_string()
    } else if value.is_infinite() {
        if value > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        format!("{value:.decimals$}")
    }
}

/// An elapsed time as `qemu-io` prints it: `00.12 sec` below a second, else `H:MM:SS.ss`;
/// `fixed` always uses the long form (the `-C` report).
pub fn timestr(elapsed: Duration, fixed: bool) -> String {
    let secs = elapsed.as_secs();
    let frac = f64::from(elapsed.subsec_nanos()) / 1e9;
    if fixed || secs > 0 {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs % 3600) / 60,
            (secs % 60) as f64 + frac
        )
    } else {
        format!("{frac:05.2} sec")
    }
}

/// `value` per second of `elapsed` (infinite for a zero duration, as in C).
fn per_second(value: f64, elapsed: Duration) -> f64 {
    value / elapsed.as_secs_f64()
}

/// The statistics lines `qemu-io` prints after an operation (`print_report`): with `terse`
/// (`-C`) one comma-separated line.
pub fn io_report(
    op: &str,
    elapsed: Duration,
    offset: u64,
    count: u64,
    total: u64,
    ops: u32,
    terse: bool,
) -> String {
    let time = timestr(elapsed, terse);
    if terse {
        format!(
            "{total},{ops},{time},{:.3},{:.3}\n",
            per_second(total as f64, elapsed),
            per_second(f64::from(ops), elapsed)
        )
    } else {
        format!(
            "{op} {total}/{count} bytes at offset {offset}\n{}, {ops} ops; {time} ({}/sec and {:.4} ops/sec)\n",
            cvtstr(total as f64),
            cvtstr(per_second(total as f64, elapsed)),
            per_second(f64::from(ops), elapsed)
        )
    }
}

/// `qemu-io read -v`: 16 bytes a line, offset, hex bytes, then the bytes that are ASCII
/// letters or digits (others as `.`).
pub fn hexdump(buf: &[u8], offset: u64) -> String {
    let mut out = String::with_capacity(buf.len() / 16 * 80 + 80);
    for (i, line) in buf.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}:  ", offset + (i as u64) * 16);
        for byte in line {
            let _ = write!(out, "{byte:02x} ");
        }
        out.push(' ');
        out.extend(line.iter().map(|&b| {
            if b.is_ascii_alphanumeric() {
                char::from(b)
            } else {
                '.'
            }
        }));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g_format() {
        assert_eq!(format_g(16.0, 3), "16");
        assert_eq!(format_g(1.5, 3), "1.5");
        assert_eq!(format_g(0.9765625, 3), "0.977");
        assert_eq!(format_g(272.0, 3), "272");
        assert_eq!(format_g(999.9, 3), "1e+03");
        assert_eq!(format_g(0.0001, 3), "0.0001");
        assert_eq!(format_g(0.00001, 3), "1e-05");
        assert_eq!(format_g(0.0, 3), "0");
    }

    #[test]
    fn qemu_img_sizes() {
        assert_eq!(size_to_str(16 << 20), "16 MiB");
        assert_eq!(size_to_str(278_528), "272 KiB");
        assert_eq!(size_to_str(917_504), "896 KiB");
        assert_eq!(size_to_str(561_152), "548 KiB");
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
    }

    #[test]
    fn qemu_io_sizes() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(40.0), "40 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(1_114_112.0), "1.062 MiB");
        assert_eq!(cvtstr(13_434_880.0), "12.812 MiB");
        assert_eq!(cvtstr(252.517983), "252.517983 bytes");
        assert_eq!(cvtstr(2_097_152_000.0), "1.953 GiB");
        assert_eq!(cvtstr(f64::INFINITY), "inf EiB");
    }

    #[test]
    fn times() {
        assert_eq!(timestr(Duration::from_millis(3), false), "00.00 sec");
        assert_eq!(timestr(Duration::from_millis(210), false), "00.21 sec");
        assert_eq!(timestr(Duration::from_millis(5820), false), "0:00:05.82");
        assert_eq!(timestr(Duration::from_millis(3), true), "0:00:00.00");
        assert_eq!(timestr(Duration::from_secs(3723), false), "1:02:03.00");
    }

    #[test]
    fn report_lines() {
        let r = io_report(
            "wrote",
            Duration::from_millis(500),
            0,
            65536,
            65536,
            1,
            false,
        );
        assert_eq!(
            r,
            "wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops; 00.50 sec (128 KiB/sec and 2.0000 ops/sec)\n"
        );
        let r = io_report("read", Duration::from_millis(500), 0, 512, 512, 1, true);
        assert_eq!(r, "512,1,0:00:00.50,1024.000,2.000\n");
    }

    #[test]
    fn hexdump_layout() {
        let mut buf = vec![0x11u8; 20];
        buf[16..].copy_from_slice(b"Ab .");
        assert_eq!(
            hexdump(&buf, 0x20),
            "00000020:  11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11  ................\n\
             00000030:  41 62 20 2e  Ab..\n"
        );
    }
}

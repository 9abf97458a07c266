//! JSON laid out exactly as QEMU's pretty printer lays it out: four-space indentation,
//! `"key": value`, every container closed on its own line (so an empty one prints as
//! `[` newline `]`), and characters outside printable ASCII escaped as `\uXXXX`.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter, Serializer};

/// A [`Formatter`] that reproduces QEMU's `json-writer.c` pretty output.
#[derive(Debug, Default)]
pub struct QemuFormatter {
    depth: usize,
}

impl QemuFormatter {
    fn newline<W: ?Sized + Write>(&self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b"\n")?;
        for _ in 0..self.depth {
            writer.write_all(b"    ")?;
        }
        Ok(())
    }
}

impl Formatter for QemuFormatter {
    fn begin_array<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.depth += 1;
        writer.write_all(b"[")
    }

    fn end_array<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.depth -= 1;
        self.newline(writer)?;
        writer.write_all(b"]")
    }

    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if !first {
            writer.write_all(b",")?;
        }
        self.newline(writer)
    }

    fn end_array_value<W: ?Sized + Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        Ok(())
    }

    fn begin_object<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.depth += 1;
        writer.write_all(b"{")
    }

    fn end_object<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.depth -= 1;
        self.newline(writer)?;
        writer.write_all(b"}")
    }

    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if !first {
            writer.write_all(b",")?;
        }
        self.newline(writer)
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn end_object_value<W: ?Sized + Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        Ok(())
    }

    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if (c as u32) < 0x7f {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04X}")?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }

    fn write_char_escape<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        match escape {
            CharEscape::Quote => writer.write_all(b"\\\""),
            CharEscape::ReverseSolidus => writer.write_all(b"\\\\"),
            CharEscape::Solidus => writer.write_all(b"/"),
            CharEscape::Backspace => writer.write_all(b"\\b"),
            CharEscape::FormFeed => writer.write_all(b"\\f"),
            CharEscape::LineFeed => writer.write_all(b"\\n"),
            CharEscape::CarriageReturn => writer.write_all(b"\\r"),
            CharEscape::Tab => writer.write_all(b"\\t"),
            CharEscape::AsciiControl(byte) => write!(writer, "\\u{byte:04X}"),
        }
    }
}

/// `value` as QEMU pretty-prints it, followed by a newline (as `qemu-img` ends its output).
pub fn to_qemu_json<T: Serialize>(value: &T) -> Result<String, serde_json::Error> {
    let mut out = Vec::new();
    let mut serializer = Serializer::with_formatter(&mut out, QemuFormatter::default());
    value.serialize(&mut serializer)?;
    out.push(b'\n');
    // The formatter writes only ASCII and the UTF-8 of the input strings.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Empty {}

    #[derive(Serialize)]
    struct Sample {
        children: Vec<u32>,
        name: &'static str,
        data: Empty,
        flag: bool,
    }

    #[test]
    fn layout_matches_qemu() {
        let text = to_qemu_json(&Sample {
            children: vec![],
            name: "é\"x/\u{1}",
            data: Empty {},
            flag: false,
        })
        .unwrap();
        assert_eq!(
            text,
            "{\n    \"children\": [\n    ],\n    \"name\": \"\\u00E9\\\"x/\\u0001\",\n    \"data\": {\n    },\n    \"flag\": false\n}\n"
        );
        let text = to_qemu_json(&vec![1, 2]).unwrap();
        assert_eq!(text, "[\n    1,\n    2\n]\n");
        let text = to_qemu_json(&"\u{1F600}").unwrap();
        assert_eq!(text, "\"\\uD83D\\uDE00\"\n");
    }
}

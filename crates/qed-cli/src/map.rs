//! `qed map`: where each guest range of an image lives, printed as `qemu-img map` prints it
//! (human table or JSON, the same entries merged the same way).

use std::io::Write;
use std::path::PathBuf;

use qed_image::ops::{self, Disk, MapEntry};

use crate::error::{errno_text, CliError, CliResult};
use crate::format::{ImageFormat, OutputFormat};
use crate::size::cvtnum;
use crate::spec::{self, Access};

/// Arguments of `qed map`.
#[derive(Debug, clap::Args)]
pub struct MapArgs {
    /// Format of the image (probed by the QED magic when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<ImageFormat>,
    /// Start at this guest offset.
    #[arg(
        short = 's',
        long = "start-offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    pub start_offset: Option<String>,
    /// Map at most this many bytes.
    #[arg(
        short = 'l',
        long = "max-length",
        value_name = "LENGTH",
        allow_hyphen_values = true
    )]
    pub max_length: Option<String>,
    /// Open without taking the image lock (for images in use).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Output format.
    #[arg(long = "output", value_name = "FMT", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// FILE is an option string (`driver=qed,file.filename=x.qed`), not a file name.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The image: a file name, `file:NAME`, `json:{...}` (see docs/cli.md).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// A number as C's `%#x` prints it (`0` without a prefix).
fn hex(value: u64) -> String {
    if value == 0 {
        "0".to_string()
    } else {
        format!("{value:#x}")
    }
}

/// One entry as `qemu-img map --output=json` prints it.
pub fn json_entry(e: &MapEntry) -> String {
    let mut text = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
         \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(offset) = e.offset {
        text.push_str(&format!(", \"offset\": {offset}"));
    }
    text.push('}');
    text
}

/// One line of the human table, for entries that hold data (others are not listed).
pub fn human_line(e: &MapEntry, file: &str) -> Option<String> {
    (e.data && !e.zero).then(|| {
        format!(
            "{:<16}{:<16}{:<16}{}",
            hex(e.start),
            hex(e.length),
            hex(e.offset.unwrap_or(0)),
            file
        )
    })
}

/// Runs `qed map`; returns the exit code.
pub fn run(args: &MapArgs) -> CliResult<i32> {
    let start = match &args.start_offset {
        Some(text) => cvtnum("start offset", text)?,
        None => 0,
    };
    let max_length = match &args.max_length {
        Some(text) => Some(cvtnum("max length", text)?),
        None => None,
    };
    let access = Access {
        unlocked: args.force_share,
        ..Access::read_only()
    };
    let opened = spec::open_arg(args.file.as_os_str(), args.image_opts, args.format, &access)?;
    let name = opened.name;
    let disk = opened.disk;
    // The file each depth's data lives in, named as QEMU names it.
    // A layer without a file of its own (opened through a json: name) is that name, as the
    // image above records it.
    let mut names_above = Vec::new();
    if let Some(top) = disk.image() {
        names_above.push(top.info().backing_file);
        let mut next = top.backing();
        while let Some(layer) = next {
            next = match &*layer {
                qed_image::BackingLayer::Qed(below) => {
                    names_above.push(below.info().backing_file);
                    below.backing()
                }
                qed_image::BackingLayer::Raw { .. } => None,
            };
        }
    }
    let files: Vec<String> = disk
        .layer_paths()
        .iter()
        .enumerate()
        .map(|(depth, path)| match (depth, path) {
            (0, _) => name.clone(),
            (_, Some(path)) => path.display().to_string(),
            (_, None) => names_above
                .get(depth - 1)
                .cloned()
                .flatten()
                .unwrap_or_else(|| name.clone()),
        })
        .collect();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = print_map(&mut out, &disk, start, max_length, args.output, &files);
    let flushed = out.flush();
    drop(disk);
    result?;
    flushed.map_err(|e| CliError::new("write", e))?;
    Ok(0)
}

fn print_map(
    out: &mut dyn Write,
    disk: &Disk,
    start: u64,
    max_length: Option<u64>,
    output: OutputFormat,
    files: &[String],
) -> CliResult<()> {
    let write_error = |e: std::io::Error| CliError::new("write", e);
    match output {
        OutputFormat::Human => writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        ),
        OutputFormat::Json => write!(out, "["),
    }
    .map_err(write_error)?;
    // As qemu-img: an entry is printed once the next one is known, so a failed lookup
    // leaves out the entry it would have extended.
    let mut pending: Option<MapEntry> = None;
    let print = |out: &mut dyn Write, entry: &MapEntry, last: bool| -> CliResult<()> {
        match output {
            OutputFormat::Human => {
                let file = files.get(entry.depth).map_or("", String::as_str);
                if let Some(line) = human_line(entry, file) {
                    writeln!(out, "{line}").map_err(write_error)?;
                }
            }
            OutputFormat::Json => {
                let tail = if last { "]\n" } else { ",\n" };
                write!(out, "{}{tail}", json_entry(entry)).map_err(write_error)?;
            }
        }
        Ok(())
    };
    for entry in ops::map(disk, start, max_length) {
        let entry = entry.map_err(|e| {
            let _ = out.flush();
            CliError::new("Could not read file metadata", errno_text(&e))
        })?;
        if let Some(previous) = pending.replace(entry) {
            print(out, &previous, false)?;
        }
    }
    if let Some(last) = pending {
        print(out, &last, true)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_print_as_qemu_prints_them() {
        let mut e = MapEntry {
            start: 0,
            length: 65536,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(327_680),
        };
        assert_eq!(
            json_entry(&e),
            "{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \
             \"data\": true, \"compressed\": false, \"offset\": 327680}"
        );
        assert_eq!(
            human_line(&e, "x.qed").unwrap(),
            "0               0x10000         0x50000         x.qed"
        );
        e.zero = true;
        assert_eq!(human_line(&e, "x.qed"), None);
        e.offset = None;
        assert!(json_entry(&e).ends_with("\"compressed\": false}"));
    }
}

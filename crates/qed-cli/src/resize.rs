//! `qed resize`: a new virtual size for an image, with `qemu-img resize`'s options, messages
//! and exit codes.
//!
//! Difference from qemu-img, on purpose: a QED image shrinks with `--shrink` (QEMU refuses:
//! `Shrinking images is currently not supported`); what lay past the new end is dropped and
//! the space given back.

use std::path::PathBuf;

use qed_image::ops::{self, Preallocation, ResizeError, ResizeOptions, SizeChange};

use crate::error::{open_failure, CliError, CliResult};
use crate::format::ImageFormat;
use crate::size::{parse_size, SizeError};
use crate::spec::{self, Access};

/// Arguments of `qed resize`.
#[derive(Debug, clap::Args)]
pub struct ResizeArgs {
    /// Format of the image (probed by the QED magic when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<ImageFormat>,
    /// Allow a smaller size (what lies past it is lost).
    #[arg(long = "shrink")]
    pub shrink: bool,
    /// How the grown part is allocated: off (QED: the only one), falloc or full (raw files).
    #[arg(long = "preallocation", value_name = "MODE")]
    pub preallocation: Option<String>,
    /// QEMU object definitions (accepted; no object is needed for QED or raw files).
    #[arg(long = "object", value_name = "OBJECT")]
    pub object: Vec<String>,
    /// Print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// FILE is an option string (`driver=qed,file.filename=x.qed`), not a file name.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The new size: SIZE, +SIZE (grow by) or -SIZE (shrink by).
    #[arg(value_name = "SIZE", allow_hyphen_values = true)]
    pub size: String,
}

/// The size argument, parsed as qemu-img parses it (a `size` option value).
fn size_change(text: &str) -> CliResult<SizeChange> {
    let (make, digits): (fn(u64) -> SizeChange, &str) = match text.as_bytes().first() {
        Some(b'+') => (SizeChange::Grow, &text[1..]),
        Some(b'-') => (SizeChange::Shrink, &text[1..]),
        _ => (SizeChange::To, text),
    };
    match parse_size(digits) {
        Ok(n) => Ok(make(n)),
        Err(SizeError::TooLarge) => Err(CliError::plain(format!(
            "Value '{digits}' is out of range for parameter 'size'"
        ))),
        Err(SizeError::Invalid) => Err(CliError::plain(
            "Parameter 'size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively.",
        )),
    }
}

/// Runs `qed resize`; returns the exit code.
pub fn run(args: &ResizeArgs) -> CliResult<i32> {
    let preallocation = match &args.preallocation {
        None => Preallocation::Off,
        Some(name) => Preallocation::from_name(name)
            .ok_or_else(|| CliError::plain(format!("Invalid preallocation mode '{name}'")))?,
    };
    let change = size_change(&args.size)?;
    let name = args.file.display().to_string();
    let access = Access {
        writable: true,
        ..Access::read_only()
    };
    let disk = spec::open_arg(args.file.as_os_str(), args.image_opts, args.format, &access)?.disk;
    let result = ops::resize(
        &disk,
        change,
        &ResizeOptions {
            shrink: args.shrink,
            preallocation,
        },
    );
    let closed = disk.close();
    match result {
        Ok(_) => {}
        Err(ResizeError::ShrinkNotAllowed) => {
            eprintln!("{}: {}", crate::prog(), ResizeError::ShrinkNotAllowed);
            eprintln!(
                "{}: warning: Shrinking an image will delete all data beyond the shrunken \
                 image's end. Before performing such an operation, make sure there is no \
                 important data there.",
                crate::prog()
            );
            return Ok(1);
        }
        Err(ResizeError::Failed(e)) => return Err(CliError::plain(open_failure(&e))),
        Err(e) => return Err(CliError::plain(e)),
    }
    closed.map_err(|e| CliError::new(format!("closing {name}"), open_failure(&e)))?;
    if !args.quiet {
        println!("Image resized.");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_arguments() {
        assert_eq!(size_change("2M").unwrap(), SizeChange::To(2 << 20));
        assert_eq!(size_change("+1k").unwrap(), SizeChange::Grow(1024));
        assert_eq!(size_change("-512").unwrap(), SizeChange::Shrink(512));
        assert!(size_change("+1x")
            .unwrap_err()
            .to_string()
            .starts_with("Parameter 'size' expects"));
        assert_eq!(
            size_change("16E").unwrap_err().to_string(),
            "Value '16E' is out of range for parameter 'size'"
        );
    }
}

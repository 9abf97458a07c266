//! `qed dd`: copies a part of an image into a new one, with `qemu-img dd`'s operands
//! (`bs=`, `count=`, `skip=`, `if=`, `of=`), size rules, messages and exit codes.
//!
//! Differences from qemu-img, on purpose: the output is sparse (ranges the input holds as
//! zeros, and blocks of zeros, are not written: the new output reads zeros there; qemu-img
//! writes every block); `-p` shows progress (qemu-img dd has no progress).

use std::path::{Path, PathBuf};

use qed_image::format::{DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE};
use qed_image::ops::{self, DdError, DdOptions, Disk, NewTarget};
use qed_image::CacheMode;

use crate::error::{errno_text, open_failure, CliError, CliResult};
use crate::format::{sector_rounded_len, ImageFormat};
use crate::progress::Progress;
use crate::size::{cvtnum, cvtnum_in};
use crate::spec::{self, Access};

/// Arguments of `qed dd`.
#[derive(Debug, clap::Args)]
pub struct DdArgs {
    /// Format of the input (probed when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<ImageFormat>,
    /// Format of the output (raw unless given).
    #[arg(short = 'O', long = "output-format", value_name = "FMT")]
    pub output_format: Option<String>,
    /// Open the input without taking its lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// QEMU object definitions (accepted; no object is needed for QED or raw files).
    #[arg(long = "object", value_name = "OBJECT")]
    pub object: Vec<String>,
    /// Show progress on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// The input (`if=`) is an option string (`driver=qed,file.filename=x.qed`).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The operands: bs=BYTES, count=BLOCKS, skip=BLOCKS, if=INPUT, of=OUTPUT.
    #[arg(value_name = "OPERAND")]
    pub operands: Vec<String>,
}

/// The operands, parsed.
#[derive(Debug, Default)]
struct Operands {
    options: DdOptions,
    input: Option<PathBuf>,
    output: Option<PathBuf>,
}

fn parse_operands(operands: &[String]) -> CliResult<Operands> {
    let mut parsed = Operands::default();
    for operand in operands {
        let unrecognized = |key: &str| CliError::plain(format!("unrecognized operand {key}"));
        let Some((key, value)) = operand.split_once('=') else {
            return Err(unrecognized(operand));
        };
        match key {
            "bs" => parsed.options.block_size = cvtnum_in("bs", value, 1, i32::MAX as u64)?,
            "count" => parsed.options.count = Some(cvtnum("count", value)?),
            "skip" => parsed.options.skip = cvtnum("skip", value)?,
            "if" => parsed.input = Some(PathBuf::from(value)),
            "of" => parsed.output = Some(PathBuf::from(value)),
            other => return Err(unrecognized(other)),
        }
    }
    Ok(parsed)
}

/// Runs `qed dd`; returns the exit code.
pub fn run(args: &DdArgs) -> CliResult<i32> {
    let operands = parse_operands(&args.operands)?;
    let (Some(input), Some(output)) = (&operands.input, &operands.output) else {
        return Err(CliError::plain("Must specify both input and output files"));
    };
    let in_name = input.display().to_string();
    let access = Access {
        unlocked: args.force_share,
        ..Access::read_only()
    };
    let source = spec::open_arg(input.as_os_str(), args.image_opts, args.format, &access)?.disk;
    let target_format = args.output_format.as_deref().unwrap_or("raw");
    let Some(target_format) = ImageFormat::from_name(target_format) else {
        return Err(CliError::plain("Unknown file format"));
    };
    let plan = ops::dd_plan(source.size(), &operands.options);
    let target = create(output, target_format, plan.output_size())?;
    if plan.skip_past_end {
        // As dd(1): a warning, and an empty output.
        eprintln!(
            "{}: {in_name}: cannot skip to specified offset",
            crate::prog()
        );
    }
    let mut progress = Progress::new(args.progress);
    let result = ops::dd(&source, &target, &plan, &mut |done, total| {
        progress.update(done, total)
    });
    if result.is_ok() {
        progress.finish();
    }
    let closed = target.close();
    result.map_err(|e| dd_failure(&e))?;
    closed.map_err(|e| CliError::new(format!("closing {}", output.display()), open_failure(&e)))?;
    Ok(0)
}

/// Creates the output (its size rounded up to whole sectors, as image creation rounds it) and
/// opens it for writing.
fn create(path: &Path, format: ImageFormat, size: u64) -> CliResult<Disk> {
    let target = match format {
        ImageFormat::Raw => NewTarget::Raw,
        ImageFormat::Qed => NewTarget::Qed {
            cluster_size: DEFAULT_CLUSTER_SIZE,
            table_size: DEFAULT_TABLE_SIZE,
            backing: None,
        },
    };
    ops::create_target(
        path,
        &target,
        sector_rounded_len(size),
        CacheMode::Writeback,
    )
    .map_err(|e| {
        CliError::new(
            format!("{}: error while creating output image", path.display()),
            open_failure(&e),
        )
    })
}

/// The message qemu-img prints for a failed copy.
fn dd_failure(e: &DdError) -> CliError {
    match e {
        DdError::Invalid(e) => CliError::plain(e),
        DdError::Status { source, .. } | DdError::Read { source, .. } => CliError::plain(format!(
            "error while reading from input image file: {}",
            errno_text(source)
        )),
        DdError::Write { source, .. } => CliError::plain(format!(
            "error while writing to output image file: {}",
            errno_text(source)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(list: &[&str]) -> CliResult<Operands> {
        parse_operands(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn operands_as_qemu_img_reads_them() {
        let parsed = ops(&["if=a", "of=b", "bs=64k", "count=3", "skip=1", "bs=512"]).unwrap();
        assert_eq!(parsed.options.block_size, 512);
        assert_eq!(parsed.options.count, Some(3));
        assert_eq!(parsed.options.skip, 1);
        assert_eq!(parsed.input.as_deref(), Some(Path::new("a")));
        for (list, message) in [
            (&["foo=1"][..], "unrecognized operand foo"),
            (&["seek=1"], "unrecognized operand seek"),
            (&["if"], "unrecognized operand if"),
            (
                &["bs=0"],
                "Invalid bs specified. Must be between 1 and 2147483647.",
            ),
            (&["bs=1x"], "Invalid bs specified: '1x'."),
            (
                &["count=-1"],
                "Invalid count specified. Must be between 0 and 9223372036854775807.",
            ),
        ] {
            assert_eq!(ops(list).unwrap_err().to_string(), message, "{list:?}");
        }
    }
}

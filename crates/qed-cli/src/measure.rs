//! `qed measure`: the file size a new image needs, printed as `qemu-img measure` prints it
//! (`required size: N` / `fully allocated size: M`, or JSON with `required` and
//! `fully-allocated`), with its option checks and messages.
//!
//! Difference from qemu-img, on purpose: `-O qed` is measured (QEMU: `Block driver 'qed' does
//! not support size measurement`): header and L1 table, an L2 table per L1 entry that leads
//! to data, a cluster per cluster of the target holding data in the source; fully allocated,
//! every cluster and table of the virtual size (`qed_image::ops::measure`).

use std::path::PathBuf;

use qed_image::format::{DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE};
use qed_image::ops::{self, MeasureFormat, Measurement};
use serde::Serialize;

use crate::error::{open_failure, CliError, CliResult};
use crate::format::{ImageFormat, OutputFormat};
use crate::json::to_qemu_json;
use crate::options::OptionList;
use crate::size::{cvtnum, parse_size};
use crate::spec::{self, Access};

/// Arguments of `qed measure`.
#[derive(Debug, clap::Args)]
pub struct MeasureArgs {
    /// Format of the source (probed when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<ImageFormat>,
    /// Format of the image to measure for (raw unless given).
    #[arg(short = 'O', long = "target-format", value_name = "FMT")]
    pub target_format: Option<String>,
    /// Options of the target format: cluster_size=S, table_size=N (QED).
    #[arg(short = 'o', long = "options", value_name = "OPTS")]
    pub options: Vec<String>,
    /// Measure a new, empty image of this size instead of a source.
    #[arg(long = "size", value_name = "SIZE", allow_hyphen_values = true)]
    pub size: Option<String>,
    /// Open the source without taking its lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// QEMU object definitions (accepted; no object is needed for QED or raw files).
    #[arg(long = "object", value_name = "OBJECT")]
    pub object: Vec<String>,
    /// Output format.
    #[arg(long = "output", value_name = "FMT", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// FILE is an option string (`driver=qed,file.filename=x.qed`), not a file name.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The source image.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// The JSON document, with qemu-img's field names.
#[derive(Debug, Serialize)]
struct MeasureJson {
    required: u64,
    #[serde(rename = "fully-allocated")]
    fully_allocated: u64,
}

/// Runs `qed measure`; returns the exit code.
pub fn run(args: &MeasureArgs) -> CliResult<i32> {
    let options = OptionList::parse(&args.options)?;
    let size = match &args.size {
        Some(text) => Some(cvtnum("image size", text)?),
        None => None,
    };
    let plain = |why: &str| CliError::plain(why);
    if args.files.len() > 1 {
        return Err(plain("At most one filename argument is allowed."));
    }
    let file = args.files.first();
    if file.is_none() && (args.format.is_some() || args.image_opts) {
        return Err(plain(
            "--image-opts, -f, and -l require a filename argument.",
        ));
    }
    if file.is_some() && size.is_some() {
        return Err(plain("--size N cannot be used together with a filename."));
    }
    if file.is_none() && size.is_none() {
        return Err(plain("Either --size N or one filename must be specified."));
    }
    let source = match file {
        None => None,
        Some(path) => {
            let access = Access {
                unlocked: args.force_share,
                ..Access::read_only()
            };
            Some(spec::open_arg(path.as_os_str(), args.image_opts, args.format, &access)?.disk)
        }
    };
    let target = args.target_format.as_deref().unwrap_or("raw");
    let format = match ImageFormat::from_name(target) {
        Some(format) => format,
        None => return Err(CliError::plain(format!("Unknown file format '{target}'"))),
    };
    let format = target_format(format, &options)?;
    let measured = match (&source, size) {
        (Some(disk), _) => ops::measure(disk, &format),
        (None, Some(size)) => ops::measure_size(size, &format),
        (None, None) => unreachable!("checked above"),
    }
    .map_err(|e| CliError::plain(open_failure(&e)))?;
    print(&measured, args.output)?;
    Ok(0)
}

/// The target format with its `-o` options (unknown ones refused as qemu-img refuses them).
fn target_format(format: ImageFormat, options: &OptionList) -> CliResult<MeasureFormat> {
    let known: &[&str] = match format {
        ImageFormat::Raw => &["size", "preallocation"],
        ImageFormat::Qed => &[
            "size",
            "backing_file",
            "backing_fmt",
            "cluster_size",
            "table_size",
        ],
    };
    options.check_known(known).map_err(|e| {
        CliError::plain(format!(
            "{e}\n{}: Invalid options for file format '{}'",
            crate::prog(),
            format.name()
        ))
    })?;
    match format {
        ImageFormat::Raw => Ok(MeasureFormat::Raw),
        ImageFormat::Qed => {
            let number = |key: &str, default: u32| -> CliResult<u32> {
                let Some(text) = options.get(key) else {
                    return Ok(default);
                };
                parse_size(text)
                    .ok()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| {
                        CliError::plain(format!(
                            "Parameter '{key}' expects a non-negative number below 2^64\n\
                             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, \
                             tera-, peta-\nand exabytes, respectively.\n{}: Invalid options \
                             for file format 'qed'",
                            crate::prog()
                        ))
                    })
            };
            Ok(MeasureFormat::Qed {
                cluster_size: number("cluster_size", DEFAULT_CLUSTER_SIZE)?,
                table_size: number("table_size", DEFAULT_TABLE_SIZE)?,
            })
        }
    }
}

fn print(measured: &Measurement, output: OutputFormat) -> CliResult<()> {
    match output {
        OutputFormat::Human => {
            println!("required size: {}", measured.required);
            println!("fully allocated size: {}", measured.fully_allocated);
        }
        OutputFormat::Json => {
            let text = to_qemu_json(&MeasureJson {
                required: measured.required,
                fully_allocated: measured.fully_allocated,
            })
            .map_err(|e| CliError::new("JSON output", e))?;
            print!("{text}");
        }
    }
    Ok(())
}

//! `qed create`: a new, empty image, byte-identical to what `qemu-img create` writes for the
//! same options.

use std::path::{Path, PathBuf};

use qed_image::format::{
    new_image_layout, DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE, QEMU_MAX_BACKING_NAME_LEN,
    SECTOR_SIZE,
};
use qed_image::storage::{CacheMode, FileOptions, FileStorage, LockMode, Storage};
use qed_image::{resolve_backing_path, BackingPolicy, CreateParams, Geometry, Image, OpenOptions};

use crate::error::{open_failure, os_text, CliError, CliResult};
use crate::format::{sector_rounded_len, ImageFormat};
use crate::options::OptionList;
use crate::size::{parse_size, parse_size_i64};

/// Arguments of `qed create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Format of the new image.
    #[arg(short = 'f', value_name = "FMT", default_value = "qed")]
    pub format: ImageFormat,
    /// Backing file; a relative name is relative to the new image's directory.
    #[arg(short = 'b', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the backing file (probed when omitted).
    #[arg(short = 'F', value_name = "FMT")]
    pub backing_format: Option<ImageFormat>,
    /// Format options: cluster_size=S, table_size=N, backing_file=F, backing_fmt=FMT, size=S
    /// (`-o help` lists them).
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image file to create (replaced if it exists).
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Virtual size; may be omitted with a backing file (its size is used).
    #[arg(value_name = "SIZE")]
    pub size: Option<String>,
}

pub(crate) const QED_OPTIONS: &str = "\
Supported qed options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - Cluster size (in bytes)
  size=<size>            - Virtual disk size
  table_size=<size>      - L1/L2 table size (in clusters)
";

pub(crate) const RAW_OPTIONS: &str = "\
Supported raw options:
  size=<size>            - Virtual disk size
";

/// The backing file as inspected at creation.
struct Backing {
    name: String,
    format: ImageFormat,
    size: u64,
}

/// Runs `qed create`; returns the exit code.
pub fn run(args: &CreateArgs) -> CliResult<i32> {
    let options = OptionList::parse(&args.options)?;
    if options.help {
        print!(
            "{}",
            match args.format {
                ImageFormat::Qed => QED_OPTIONS,
                ImageFormat::Raw => RAW_OPTIONS,
            }
        );
        return Ok(0);
    }
    let Some(file) = args.file.as_deref() else {
        return Err(CliError::plain("Expecting image file name"));
    };
    let name = file.display().to_string();
    let fail = |why: &dyn std::fmt::Display| CliError::new(name.clone(), why);
    // `file:NAME` is NAME; other protocols are refused.
    let path = crate::spec::create_path(file.as_os_str()).map_err(|e| fail(&e))?;
    let file = path.as_path();
    let size = match &args.size {
        Some(text) => Some(parse_image_size(text)?),
        None => match options.get("size") {
            Some(text) => Some(parse_option_size(&name, "size", text)?),
            None => None,
        },
    };
    match args.format {
        ImageFormat::Raw => {
            options.check_known(&["size"]).map_err(|e| fail(&e))?;
            if args.backing.is_some() {
                return Err(fail(&"Backing file not supported for file format 'raw'"));
            }
            let size = size.ok_or_else(|| fail(&"Image creation needs a size parameter"))?;
            create_raw(file, &name, size, args.quiet)
        }
        ImageFormat::Qed => {
            options
                .check_known(&[
                    "size",
                    "backing_file",
                    "backing_fmt",
                    "cluster_size",
                    "table_size",
                ])
                .map_err(|e| fail(&e))?;
            create_qed(args, &options, file, &name, size)
        }
    }
}

fn parse_image_size(text: &str) -> CliResult<u64> {
    parse_size_i64(text).map_err(|e| CliError::new(format!("image size '{text}'"), e))
}

fn parse_option_size(file: &str, key: &str, text: &str) -> CliResult<u64> {
    parse_size(text).map_err(|e| CliError::new(file, format!("{key}={text}: {e}")))
}

/// Rounds a size up to whole sectors, as `qemu-img create` does.
fn round_to_sectors(file: &str, size: u64) -> CliResult<u64> {
    size.checked_next_multiple_of(SECTOR_SIZE)
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| CliError::new(file, format!("image size {size} is too large")))
}

fn create_raw(file: &Path, name: &str, size: u64, quiet: bool) -> CliResult<i32> {
    let rounded = round_to_sectors(name, size)?;
    if !quiet {
        println!("Formatting '{name}', fmt=raw size={size}");
    }
    let storage = FileStorage::open(
        file,
        &FileOptions {
            writable: true,
            create: true,
            cache: CacheMode::Writeback,
            lock: LockMode::Write,
        },
    )
    .map_err(|e| CliError::new(name, os_text(&e)))?;
    storage
        .set_len(rounded)
        .and_then(|()| storage.flush())
        .map_err(|e| CliError::new(name, os_text(&e)))?;
    Ok(0)
}

fn create_qed(
    args: &CreateArgs,
    options: &OptionList,
    file: &Path,
    name: &str,
    size: Option<u64>,
) -> CliResult<i32> {
    let fail = |why: &dyn std::fmt::Display| CliError::new(name, why);
    let cluster_size = match options.get("cluster_size") {
        Some(text) => Some(parse_option_size(name, "cluster_size", text)?),
        None => None,
    };
    let table_size = match options.get("table_size") {
        Some(text) => Some(parse_option_size(name, "table_size", text)?),
        None => None,
    };
    let backing_name = args
        .backing
        .clone()
        .or_else(|| options.get("backing_file").map(str::to_string))
        .filter(|b| !b.is_empty());
    let backing_format = match (args.backing_format, options.get("backing_fmt")) {
        (Some(format), _) => Some(format),
        (None, Some(text)) => Some(ImageFormat::from_name(text).ok_or_else(|| {
            fail(&format!(
                "backing_fmt={text}: unknown format (expected qed or raw)"
            ))
        })?),
        (None, None) => None,
    };
    let backing = match &backing_name {
        Some(backing_name) => Some(inspect_backing(file, name, backing_name, backing_format)?),
        None => None,
    };
    let given_size = size
        .or(backing.as_ref().map(|b| b.size))
        .ok_or_else(|| fail(&"Image creation needs a size parameter"))?;
    let image_size = round_to_sectors(name, given_size)?;
    let cs = cluster_size.unwrap_or(u64::from(DEFAULT_CLUSTER_SIZE));
    let ts = table_size.unwrap_or(u64::from(DEFAULT_TABLE_SIZE));
    let params = CreateParams {
        image_size,
        cluster_size: u32::try_from(cs).map_err(|_| {
            fail(&format!(
                "cluster_size {cs} is invalid: must be a power of two in [4096, 67108864]"
            ))
        })?,
        table_size: u32::try_from(ts).map_err(|_| {
            fail(&format!(
                "table_size {ts} is invalid: must be a power of two in [1, 16]"
            ))
        })?,
        backing_file: backing.as_ref().map(|b| b.name.clone()),
        backing_raw: backing
            .as_ref()
            .is_some_and(|b| b.format == ImageFormat::Raw),
    };
    new_image_layout(&params).map_err(|e| fail(&e))?;
    warn_if_qemu_cannot_open(name, &params);
    if !args.quiet {
        let mut line = format!("Formatting '{name}', fmt=qed size={given_size}");
        if let Some(b) = &backing {
            // As QEMU prints option values: commas doubled.
            line.push_str(&format!(" backing_file={}", b.name.replace(',', ",,")));
        }
        if let Some(format) = backing.as_ref().map(|b| b.format).or(backing_format) {
            line.push_str(&format!(" backing_fmt={}", format.name()));
        }
        line.push_str(&format!(" cluster_size={cs}"));
        if table_size.is_some() {
            line.push_str(&format!(" table_size={ts}"));
        }
        println!("{line}");
    }
    Image::create(file, &params).map_err(|e| fail(&open_failure(&e)))?;
    Ok(0)
}

/// Opens the backing file to learn its format and size (as QEMU does, also when a size is
/// given, so that a wrong name is caught now).
fn inspect_backing(
    file: &Path,
    name: &str,
    backing: &str,
    given: Option<ImageFormat>,
) -> CliResult<Backing> {
    if backing.starts_with("json:") {
        return inspect_named_backing(name, backing, given);
    }
    let path = resolve_backing_path(file, backing);
    let fail = |why: String| {
        CliError::new(
            name,
            format!(
                "Could not open '{}': {why}\nCould not open backing image.",
                path.display()
            ),
        )
    };
    let format = ImageFormat::resolve(&path, given).map_err(|e| fail(open_failure(&e)))?;
    if given.is_none() {
        eprintln!(
            "{}: warning: {name}: backing file '{backing}' given without a backing format; \
             detected format {} (recorded in the image)",
            crate::prog(),
            format.name()
        );
    }
    let size = match format {
        ImageFormat::Raw => sector_rounded_len(
            std::fs::metadata(&path)
                .map_err(|e| fail(os_text(&e)))?
                .len(),
        ),
        ImageFormat::Qed => {
            let options = OpenOptions {
                backing: BackingPolicy::Ignore,
                ..OpenOptions::read_only()
            };
            Image::open(&path, &options)
                .map_err(|e| fail(open_failure(&e)))?
                .size()
        }
    };
    Ok(Backing {
        name: backing.to_string(),
        format,
        size,
    })
}

/// [`inspect_backing`] for a backing file named in QEMU's `json:{...}` syntax: opened as
/// such an image name is (its format as given, or the node's own).
fn inspect_named_backing(
    name: &str,
    backing: &str,
    given: Option<ImageFormat>,
) -> CliResult<Backing> {
    // QEMU's words: the open error of the node that failed, as it names itself.
    let fail = |why: String| CliError::new(name, format!("{why}\nCould not open backing image."));
    let spec = crate::spec::parse_arg(std::ffi::OsStr::new(backing), false, given)?;
    let access = crate::spec::Access {
        backing: false,
        ..crate::spec::Access::read_only()
    };
    let opened = crate::spec::open_disk(&spec, &access, &mut |_| {})
        .map_err(|e| fail(e.text(&|e, file| crate::error::open_error(e, file))))?;
    let format = match given {
        Some(format) => format,
        None => {
            let format = ImageFormat::from_name(opened.format).unwrap_or(ImageFormat::Raw);
            eprintln!(
                "{}: warning: {name}: backing file '{backing}' given without a backing \
                 format; detected format {} (recorded in the image)",
                crate::prog(),
                format.name()
            );
            format
        }
    };
    let size = opened.disk.size();
    let _ = opened.disk.close();
    Ok(Backing {
        name: backing.to_string(),
        format,
        size,
    })
}

/// Warns when the image is valid QED but QEMU 10 would refuse to open it.
fn warn_if_qemu_cannot_open(name: &str, params: &CreateParams) {
    let Ok(geometry) = Geometry::new(params.cluster_size, params.table_size) else {
        return;
    };
    if !geometry.qemu_compatible(params.image_size) {
        let why = if params.table_size < 2 {
            "QEMU refuses table_size 1 (its table offset check is off by one)".to_string()
        } else {
            format!(
                "with cluster_size {} and table_size {} QEMU's 64-bit maximum image size wraps \
                 to 0, so it refuses any non-empty image",
                params.cluster_size, params.table_size
            )
        };
        eprintln!(
            "{}: warning: {name}: QEMU cannot open this image: {why}",
            crate::prog()
        );
    }
    if params
        .backing_file
        .as_ref()
        .is_some_and(|b| b.len() > QEMU_MAX_BACKING_NAME_LEN)
    {
        eprintln!(
            "{}: warning: {name}: QEMU cannot open this image: it reads backing file names of \
             at most {QEMU_MAX_BACKING_NAME_LEN} bytes",
            crate::prog()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_to_sectors() {
        assert_eq!(round_to_sectors("x", 0).unwrap(), 0);
        assert_eq!(round_to_sectors("x", 1).unwrap(), 512);
        assert_eq!(round_to_sectors("x", 1025).unwrap(), 1536);
        assert_eq!(round_to_sectors("x", 1024).unwrap(), 1024);
        assert!(round_to_sectors("x", i64::MAX as u64).is_err());
    }
}

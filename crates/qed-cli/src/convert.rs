//! `qed convert`: copies one image (or several, concatenated) into a new or existing image,
//! sparse-aware, with `qemu-img convert`'s options and messages.
//!
//! Differences from qemu-img, on purpose:
//! - `-B` (or `-b`) writes only what differs from the backing file: ranges that read the same
//!   there are left to it (qemu-img copies everything the source's top layer holds), and when
//!   the source's own backing file is that file nothing the source leaves to it is read.
//! - `-F` may be left out with a backing file: its format is probed and recorded, with a
//!   warning (as `qed create` does; qemu-img 10 refuses).
//! - `-m N` reads N chunks at once, each in a thread of its own; writes stay in guest order
//!   (which keeps a new QED target compact) unless `-W` is given. Salvage mode copies in one
//!   thread. `-C` is accepted and changes nothing.
//!
//! Sources may be QED, raw, qcow2 or VMDK (flat extents), the target QED, raw or qcow2: qcow2
//! and VMDK go through the engine's `foreign` disks (imago).

use std::path::{Path, PathBuf};

use qed_image::format::{new_image_layout, DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE, SECTOR_SIZE};
use qed_image::ops::{
    self, probe_disk_format, ConvertError, ConvertOptions, Disk, DiskFormat, NewTarget,
    MAX_PARALLEL, MAX_SPARSE_SIZE,
};
use qed_image::{resolve_backing_path, CreateParams};

use crate::create::{QED_OPTIONS, RAW_OPTIONS};
use crate::error::{errno_text, open_failure, CliError, CliResult};
use crate::format::{AnyFormat, CacheArg};
use crate::options::OptionList;
use crate::progress::Progress;
use crate::size::{cvtnum, parse_size};
use crate::spec::{self, Access};

/// Arguments of `qed convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Format of the source images (probed when omitted).
    #[arg(short = 'f', long = "source-format", value_name = "FMT")]
    pub format: Option<AnyFormat>,
    /// Format of the target (qed, raw or qcow2).
    #[arg(
        short = 'O',
        long = "target-format",
        value_name = "FMT",
        default_value = "raw"
    )]
    pub output_format: AnyFormat,
    /// Target format options: cluster_size=S, table_size=N (qed), backing_file=F,
    /// backing_fmt=FMT (`-o help` lists them).
    #[arg(short = 'o', long = "target-format-options", value_name = "OPTS")]
    pub options: Vec<String>,
    /// Backing file of the new image (relative to its directory); only what differs from it
    /// is written.
    #[arg(
        short = 'B',
        long = "backing",
        short_alias = 'b',
        value_name = "BACKING"
    )]
    pub backing: Option<String>,
    /// Format of the backing file (probed when omitted).
    #[arg(short = 'F', long = "backing-format", value_name = "FMT")]
    pub backing_format: Option<AnyFormat>,
    /// Bytes of zeros that make a gap in the output (a multiple of 512; 0 allocates all).
    #[arg(
        short = 'S',
        long = "sparse-size",
        value_name = "SIZE",
        allow_hyphen_values = true
    )]
    pub sparse_size: Option<String>,
    /// Write into an existing target instead of creating it.
    #[arg(short = 'n', long = "no-create")]
    pub no_create: bool,
    /// The existing target reads as zeros already (with `-n`).
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Compress the output (not supported by QED or raw).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Try copy offloading (accepted; changes nothing).
    #[arg(short = 'C', long = "copy-range-offloading")]
    pub copy_range: bool,
    /// Copy threads, each reading a chunk of its own (1 to 16; default 8; no more than the
    /// CPUs, two at least).
    #[arg(
        short = 'm',
        long = "parallel",
        value_name = "N",
        allow_hyphen_values = true
    )]
    pub parallel: Option<String>,
    /// Allow writes out of guest order (a new QED target then allocates clusters in the
    /// order reads finish).
    #[arg(short = 'W', long = "oob-writes")]
    pub oob_writes: bool,
    /// Cache mode of the target (default unsafe, as qemu-img's: the target is not flushed).
    #[arg(short = 't', long = "target-cache", value_name = "CACHE", value_enum)]
    pub target_cache: Option<CacheArg>,
    /// Cache mode of the sources.
    #[arg(short = 'T', long = "source-cache", value_name = "CACHE", value_enum)]
    pub source_cache: Option<CacheArg>,
    /// Open the sources without taking their locks.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Go on past read errors of the sources: what cannot be read is written as zeros,
    /// with a warning.
    #[arg(long = "salvage")]
    pub salvage: bool,
    /// The sources are option strings (`driver=qed,file.filename=x.qed`), not file names.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The target (with `-n`) is an option string.
    #[arg(long = "target-image-opts")]
    pub target_image_opts: bool,
    /// Show progress on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The source images, then the target.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
}

/// The backing file of a new target.
struct Backing {
    name: String,
    format: AnyFormat,
}

/// What `-O qcow2 -o help` prints.
const QCOW2_OPTIONS: &str = "\
Supported qcow2 options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - qcow2 version (1.1 only: version 3 is written)
  size=<size>            - Virtual disk size
";

/// Why a VMDK target is refused.
const NO_VMDK_TARGET: &str =
    "writing vmdk images is not supported (convert writes qed, raw and qcow2)";

fn plain(why: impl std::fmt::Display) -> CliError {
    CliError::plain(why)
}

/// What the options that need no file say.
struct Checked {
    sparse_size: u64,
    parallel: usize,
    options: OptionList,
}

/// Checks the options that do not need any file, as qemu-img checks them first.
fn check_arguments(args: &ConvertArgs) -> CliResult<Checked> {
    let options = OptionList::parse(&args.options)?;
    if args.no_create && !args.options.is_empty() {
        return Err(plain("-o has no effect when skipping image creation"));
    }
    if args.target_is_zero && !args.no_create {
        return Err(plain("--target-is-zero requires use of -n flag"));
    }
    if args.copy_range && args.salvage {
        return Err(plain("Cannot use copy offloading in salvaging mode"));
    }
    if args.target_image_opts && !args.no_create {
        return Err(plain("--target-image-opts requires use of -n flag"));
    }
    let parallel = match &args.parallel {
        None => ConvertOptions::default().parallel,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_PARALLEL).contains(&n) => n,
            Ok(_) => {
                return Err(plain(format!(
                    "Invalid number of coroutines specified. Must be between 1 and \
                     {MAX_PARALLEL}."
                )))
            }
            Err(_) => {
                return Err(plain(format!(
                    "Invalid number of coroutines specified: '{text}'."
                )))
            }
        },
    };
    let sparse = match &args.sparse_size {
        None => 4096,
        Some(text) => {
            let value = cvtnum("buffer size for sparse output", text)?;
            if value % SECTOR_SIZE != 0 || value > MAX_SPARSE_SIZE {
                return Err(plain(format!(
                    "Invalid buffer size for sparse output specified. Valid sizes are multiples \
                     of {SECTOR_SIZE} up to {MAX_SPARSE_SIZE}. Select 0 to disable sparse \
                     detection (fully allocates output)."
                )));
            }
            value
        }
    };
    Ok(Checked {
        sparse_size: sparse,
        parallel,
        options,
    })
}

/// Runs `qed convert`; returns the exit code.
pub fn run(args: &ConvertArgs) -> CliResult<i32> {
    let Checked {
        sparse_size,
        parallel,
        options,
    } = check_arguments(args)?;
    if options.help {
        print!(
            "{}",
            match args.output_format {
                AnyFormat::Qed => QED_OPTIONS,
                AnyFormat::Raw => RAW_OPTIONS,
                AnyFormat::Qcow2 => QCOW2_OPTIONS,
                AnyFormat::Vmdk => return Err(plain(NO_VMDK_TARGET)),
            }
        );
        return Ok(0);
    }
    let Some((target_path, sources)) = args.files.split_last().filter(|(_, s)| !s.is_empty())
    else {
        return Err(plain("Must specify image file name"));
    };
    if args.compress {
        return Err(plain(if args.output_format == AnyFormat::Qcow2 {
            "Compression not supported for qcow2 targets (imago writes no compressed clusters)"
        } else {
            "Compression not supported for this file format"
        }));
    }
    let source_access = Access {
        unlocked: args.force_share,
        cache: args.source_cache.map_or_else(Default::default, Into::into),
        ..Access::read_only()
    };
    let mut disks = Vec::with_capacity(sources.len());
    for path in sources {
        disks.push(spec::open_any_arg(
            path.as_os_str(),
            args.image_opts,
            args.format,
            &source_access,
        )?);
    }
    let total = disks
        .iter()
        .try_fold(0u64, |sum, d| sum.checked_add(d.size()))
        .ok_or_else(|| plain("the sources are too large together"))?;
    let target_name = target_path.display().to_string();
    let target_file = if args.no_create {
        target_path.clone()
    } else {
        // `file:NAME` is NAME; other protocols are refused.
        spec::create_path(target_path.as_os_str()).map_err(plain)?
    };
    let target_path = &target_file;
    let backing = backing_of(args, &options, target_path, &target_name)?;
    if backing.is_some() && disks.len() > 1 {
        return Err(plain(
            "Having a backing file for the target makes no sense when concatenating multiple \
             input images",
        ));
    }
    if args.target_is_zero && backing.is_some() {
        return Err(plain(
            "Cannot use --target-is-zero when the destination image has a backing file",
        ));
    }
    let target_cache = qed_image::CacheMode::from(args.target_cache.unwrap_or(CacheArg::Unsafe));
    let target = if args.no_create {
        let access = Access {
            writable: true,
            cache: target_cache,
            ..Access::read_only()
        };
        // As qemu-img: the target's format is -O's (raw unless given), never probed.
        let format = (!args.target_image_opts).then_some(args.output_format);
        spec::open_any_arg(
            target_path.as_os_str(),
            args.target_image_opts,
            format,
            &access,
        )?
    } else {
        create(
            args,
            &options,
            target_path,
            &target_name,
            total,
            backing.as_ref(),
        )?
    };
    if target.size() < total {
        return Err(plain("output file is smaller than input file"));
    }
    let convert_options = ConvertOptions {
        sparse_size,
        target_is_zero: args.target_is_zero || (!args.no_create && backing.is_none()),
        // Only a new target's top layer is known empty: into an existing one everything is
        // written.
        diff_backing: backing.is_some() && !args.no_create,
        target_offset: 0,
        parallel,
        out_of_order: args.oob_writes,
    };
    let mut progress = Progress::new(args.progress && !args.quiet);
    let mut shift = 0;
    let mut result = Ok(());
    for disk in &disks {
        let options = ConvertOptions {
            target_offset: shift,
            diff_backing: convert_options.diff_backing && disks.len() == 1,
            ..convert_options
        };
        let mut report = |done, _| progress.update(shift + done, total);
        let done = if args.salvage {
            ops::convert_salvaging(disk, &target, &options, &mut report, &mut |e| {
                if !args.quiet {
                    eprintln!("{}: warning: {}", crate::prog(), salvage_warning(e));
                }
            })
        } else {
            ops::convert(disk, &target, &options, &mut report)
        };
        if let Err(e) = done {
            result = Err(convert_failure(&e));
            break;
        }
        shift += disk.size();
    }
    if result.is_ok() {
        progress.finish();
    }
    let closed = target.close();
    result?;
    closed.map_err(|e| CliError::new(format!("closing {target_name}"), open_failure(&e)))?;
    Ok(0)
}

/// The warning qemu-img prints for an error it salvages.
fn salvage_warning(e: &ConvertError) -> String {
    match e {
        ConvertError::Status { offset, source } => format!(
            "error while reading block status at offset {offset}: {}",
            errno_text(source)
        ),
        ConvertError::Read { offset, source } => {
            format!(
                "error while reading offset {offset}: {}",
                errno_text(source)
            )
        }
        other => convert_failure(other).to_string(),
    }
}

/// The message qemu-img prints for a failed copy.
fn convert_failure(e: &ConvertError) -> CliError {
    match e {
        ConvertError::Invalid(e) => plain(e),
        ConvertError::Status { offset, source } => plain(format!(
            "error while reading block status at offset {offset}: {}",
            errno_text(source)
        )),
        ConvertError::Read { offset, source } => plain(format!(
            "error while reading at byte {offset}: {}",
            errno_text(source)
        )),
        ConvertError::Write { offset, source } => plain(format!(
            "error while writing at byte {offset}: {}",
            errno_text(source)
        )),
    }
}

/// The backing file the target gets (`-B`, or `-o backing_file`), with its format (given, or
/// probed with a warning).
fn backing_of(
    args: &ConvertArgs,
    options: &OptionList,
    target: &Path,
    target_name: &str,
) -> CliResult<Option<Backing>> {
    let name = args
        .backing
        .clone()
        .or_else(|| options.get("backing_file").map(str::to_string))
        .filter(|name| !name.is_empty());
    let Some(name) = name else { return Ok(None) };
    let given = match (args.backing_format, options.get("backing_fmt")) {
        (Some(format), _) => Some(format),
        (None, Some(text)) => Some(AnyFormat::from_name(text).ok_or_else(|| {
            CliError::new(
                target_name,
                format!("backing_fmt={text}: unknown format (expected qed, raw, qcow2 or vmdk)"),
            )
        })?),
        (None, None) => None,
    };
    let format = match given {
        Some(format) => format,
        None => {
            let path = resolve_backing_path(target, &name);
            let format = probe_disk_format(&path).map(AnyFormat::from).map_err(|e| {
                CliError::new(
                    target_name,
                    format!(
                        "Could not open '{}': {}\nCould not open backing image.",
                        path.display(),
                        open_failure(&e)
                    ),
                )
            })?;
            if !args.quiet {
                eprintln!(
                    "{}: warning: {target_name}: backing file '{name}' given without a backing \
                     format; detected format {} (recorded in the image)",
                    crate::prog(),
                    format.name()
                );
            }
            format
        }
    };
    Ok(Some(Backing { name, format }))
}

/// Creates the target and opens it for writing.
fn create(
    args: &ConvertArgs,
    options: &OptionList,
    path: &Path,
    name: &str,
    size: u64,
    backing: Option<&Backing>,
) -> CliResult<Disk> {
    let fail = |why: &dyn std::fmt::Display| {
        CliError::new(
            format!(
                "{name}: error while converting {}",
                args.output_format.name()
            ),
            why,
        )
    };
    let cache = qed_image::CacheMode::from(args.target_cache.unwrap_or(CacheArg::Unsafe));
    let target = match args.output_format {
        AnyFormat::Vmdk => return Err(plain(NO_VMDK_TARGET)),
        AnyFormat::Qcow2 => {
            options.check_known(&[
                "size",
                "backing_file",
                "backing_fmt",
                "cluster_size",
                "compat",
            ])?;
            // Version 3 is what imago writes.
            if let Some(compat) = options
                .get("compat")
                .filter(|c| !matches!(*c, "1.1" | "v3"))
            {
                return Err(fail(&format!(
                    "compat={compat}: only version 3 (compat=1.1) qcow2 images are written"
                )));
            }
            let cluster_size = match options.get("cluster_size") {
                None => 65536,
                Some(text) => parse_size(text)
                    .map_err(|e| CliError::new(name, format!("cluster_size={text}: {e}")))?,
            };
            if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
                return Err(fail(
                    &"Cluster size must be a power of two between 512 and 2048k",
                ));
            }
            NewTarget::Qcow2 {
                cluster_size: cluster_size as u32,
                backing: backing.map(|b| (b.name.as_str(), DiskFormat::from(b.format))),
            }
        }
        AnyFormat::Raw => {
            options.check_known(&["size"])?;
            if backing.is_some() {
                return Err(plain("Backing file not supported for file format 'raw'"));
            }
            NewTarget::Raw
        }
        AnyFormat::Qed => {
            let backing_format = match backing {
                None => None,
                Some(b) => Some(DiskFormat::from(b.format).backing_format().ok_or_else(|| {
                    plain(format!(
                        "a qed target's backing file must be qed or raw, not {}",
                        b.format.name()
                    ))
                })?),
            };
            options.check_known(&[
                "size",
                "backing_file",
                "backing_fmt",
                "cluster_size",
                "table_size",
            ])?;
            let number = |key: &str, default: u32| -> CliResult<u32> {
                let Some(text) = options.get(key) else {
                    return Ok(default);
                };
                let value = parse_size(text)
                    .map_err(|e| CliError::new(name, format!("{key}={text}: {e}")))?;
                u32::try_from(value)
                    .map_err(|_| fail(&format!("{key} {value} is invalid: out of range")))
            };
            let cluster_size = number("cluster_size", DEFAULT_CLUSTER_SIZE)?;
            let table_size = number("table_size", DEFAULT_TABLE_SIZE)?;
            let params = CreateParams {
                image_size: size,
                cluster_size,
                table_size,
                backing_file: backing.map(|b| b.name.clone()),
                backing_raw: backing.is_some_and(|b| b.format == AnyFormat::Raw),
            };
            new_image_layout(&params).map_err(|e| fail(&e))?;
            NewTarget::Qed {
                cluster_size,
                table_size,
                backing: backing
                    .zip(backing_format)
                    .map(|(b, f)| (b.name.as_str(), f)),
            }
        }
    };
    ops::create_target(path, &target, size, cache).map_err(|e| fail(&open_failure(&e)))
}

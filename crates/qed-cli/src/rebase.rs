//! `qed rebase`: another backing file (or none) for an image, with `qemu-img rebase`'s
//! options, messages and exit codes. Without `-u` what the guest reads is kept: the clusters
//! the image leaves to its backing file that read differently in the new one get the old
//! contents first (see `qed_image::ops::rebase`).
//!
//! A relative BACKING names a file relative to the image's directory, as qemu-img resolves it.
//!
//! Difference from qemu-img, on purpose: `-F` may be left out; the backing file's format is
//! then probed and recorded, with a warning (as `qed create` and `qed convert` do). qemu-img 10
//! refuses (`backing format must be specified`), and so do we when the file cannot be opened
//! to probe it.

use std::path::{Path, PathBuf};

use qed_image::ops::{self, RebaseError, RebaseOptions};
use qed_image::{
    probe_format, resolve_backing_path, BackingFormat, BackingLayer, BackingPolicy, Error, Image,
    NewBacking, OpenOptions,
};

use crate::error::{errno_text, open_error, open_failure, CliError, CliResult};
use crate::format::{CacheArg, ImageFormat};
use crate::progress::Progress;
use crate::spec;

/// Arguments of `qed rebase`.
#[derive(Debug, clap::Args)]
pub struct RebaseArgs {
    /// Format of the image (probed by the QED magic when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<ImageFormat>,
    /// The new backing file (relative to the image's directory); "" for none.
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the new backing file (probed, with a warning, when omitted).
    #[arg(short = 'F', long = "backing-format", value_name = "FMT")]
    pub backing_format: Option<String>,
    /// Unsafe: change only the header (the old backing file is not opened).
    #[arg(short = 'u', long = "unsafe")]
    pub unsafe_mode: bool,
    /// Cache mode of the image.
    #[arg(short = 't', long = "cache", value_name = "CACHE", value_enum)]
    pub cache: Option<CacheArg>,
    /// Cache mode of the backing files read.
    #[arg(short = 'T', long = "source-cache", value_name = "CACHE", value_enum)]
    pub source_cache: Option<CacheArg>,
    /// Open the new backing file without taking its lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Compress what is copied (not supported by QED).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// QEMU object definitions (accepted; no object is needed for QED or raw files).
    #[arg(long = "object", value_name = "OBJECT")]
    pub object: Vec<String>,
    /// Show progress on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// FILE is an option string (`driver=qed,file.filename=x.qed`), not a file name.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// The new backing file as named, with its format.
struct Target {
    name: String,
    format: BackingFormat,
}

/// "Could not change the backing file to 'NAME': WHY", as qemu-img says it.
fn change_failed(name: &str, why: impl std::fmt::Display) -> CliError {
    CliError::plain(format!(
        "Could not change the backing file to '{name}': {why}"
    ))
}

/// Runs `qed rebase`; returns the exit code.
pub fn run(args: &RebaseArgs) -> CliResult<i32> {
    let safe = !args.unsafe_mode;
    if safe && args.backing.is_none() {
        return Err(CliError::plain(
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    let given_format = match &args.backing_format {
        None => None,
        Some(name) => Some(
            ImageFormat::from_name(name)
                .ok_or_else(|| CliError::plain(format!("Invalid format name: '{name}'")))?,
        ),
    };
    let name = args.file.display().to_string();
    let (file, given) = spec::plain_arg(args.file.as_os_str(), args.image_opts, args.format)?;
    let format = ImageFormat::resolve(&file, given)
        .map_err(|e| CliError::new(format!("Could not open '{name}'"), open_error(&e, &name)))?;
    let wanted = args.backing.clone().filter(|b| !b.is_empty());
    let shown = wanted.clone().unwrap_or_default();
    if format == ImageFormat::Raw {
        // A raw file has no header to name a backing file in.
        return Err(change_failed(&shown, "Operation not supported"));
    }
    if args.compress {
        return Err(CliError::plain(
            "Compression not supported for this file format",
        ));
    }
    let options = OpenOptions {
        cache: args.cache.map_or_else(Default::default, Into::into),
        // Unsafe: the old backing file may be gone (renamed, moved).
        backing: if safe {
            BackingPolicy::Follow
        } else {
            BackingPolicy::Ignore
        },
        backing_names: Some(crate::spec::backing_names()),
        ..OpenOptions::read_write()
    };
    let image = Image::open(&file, &options)
        .map_err(|e| CliError::new(format!("Could not open '{name}'"), open_error(&e, &name)))?;
    let target = match &wanted {
        None => None,
        Some(backing) => Some(target(args, &image, backing, given_format, safe)?),
    };
    let new = match target {
        None => None,
        Some(t) => {
            let layer = if safe {
                Some(open_new_backing(args, &image, &t)?)
            } else {
                None
            };
            Some(NewBacking {
                name: t.name.into_bytes(),
                format: Some(t.format),
                layer,
            })
        }
    };
    let mut progress = Progress::new(args.progress && !args.quiet);
    let result = ops::rebase(&image, new, &RebaseOptions { safe }, &mut |done, total| {
        progress.update(done, total)
    });
    if result.is_ok() {
        progress.finish();
    }
    let closed = image.close();
    result.map_err(|e| rebase_failure(&e, &shown))?;
    closed.map_err(|e| CliError::new(format!("closing {name}"), open_failure(&e)))?;
    Ok(0)
}

/// The new backing file's format: `-F`, or probed (with a warning).
fn target(
    args: &RebaseArgs,
    image: &Image,
    backing: &str,
    given: Option<ImageFormat>,
    safe: bool,
) -> CliResult<Target> {
    if let Some(format) = given {
        return Ok(Target {
            name: backing.to_string(),
            format: format.into(),
        });
    }
    let path = resolve_backing_path(image.path().unwrap_or(&args.file), backing);
    let probed = if backing.starts_with("json:") {
        // A name in QEMU's json: syntax: its node says the format.
        open_named(args, image, backing, None).map(|layer| match layer {
            BackingLayer::Raw { .. } => BackingFormat::Raw,
            BackingLayer::Qed(_) => BackingFormat::Qed,
        })
    } else {
        probe_format(&path)
    };
    let format = match probed {
        Ok(format) => format,
        Err(e) if safe => {
            return Err(CliError::new(
                format!("Could not open new backing file '{backing}'"),
                open_failure(&e),
            ))
        }
        Err(_) => return Err(change_failed(backing, "backing format must be specified")),
    };
    if !args.quiet {
        eprintln!(
            "{}: warning: {}: backing file '{backing}' given without a backing format; \
             detected format {} (recorded in the image)",
            crate::prog(),
            args.file.display(),
            format.name()
        );
    }
    Ok(Target {
        name: backing.to_string(),
        format,
    })
}

/// The options a new backing file is opened with (read-only, with its own chain).
fn new_backing_options(args: &RebaseArgs) -> OpenOptions {
    OpenOptions {
        cache: args.source_cache.map_or_else(Default::default, Into::into),
        force_share: args.force_share,
        backing: BackingPolicy::Follow,
        backing_names: Some(crate::spec::backing_names()),
        ..OpenOptions::read_only()
    }
}

/// Opens a new backing file named in QEMU's json: syntax, as the image would name it.
fn open_named(
    args: &RebaseArgs,
    image: &Image,
    name: &str,
    format: Option<BackingFormat>,
) -> qed_image::Result<BackingLayer> {
    let above: Vec<PathBuf> = image
        .path()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
        .into_iter()
        .collect();
    let names = crate::spec::backing_names();
    let options = new_backing_options(args);
    (names.0)(name.as_bytes(), format, &options, &above)
        .unwrap_or_else(|| BackingLayer::open(Path::new(name), format, &options))
}

/// Opens the new backing file (read-only, with its own chain) for a safe rebase.
fn open_new_backing(args: &RebaseArgs, image: &Image, target: &Target) -> CliResult<BackingLayer> {
    let path = resolve_backing_path(image.path().unwrap_or(&args.file), &target.name);
    let opened = if target.name.starts_with("json:") {
        open_named(args, image, &target.name, Some(target.format))
    } else {
        BackingLayer::open(&path, Some(target.format), &new_backing_options(args))
    };
    opened.map_err(|e| {
        let why = match e {
            Error::Backing { path: p, cause, .. } if p == path => open_failure(&cause),
            other => open_failure(&other),
        };
        CliError::new(
            format!("Could not open new backing file '{}'", target.name),
            why,
        )
    })
}

/// The message qemu-img prints for a failed rebase.
fn rebase_failure(e: &RebaseError, name: &str) -> CliError {
    match e {
        RebaseError::Invalid(why) => CliError::plain(why),
        RebaseError::Status { source, .. } => CliError::plain(format!(
            "error while reading image metadata: {}",
            errno_text(source)
        )),
        RebaseError::ReadOld { .. } => CliError::plain("error while reading from old backing file"),
        RebaseError::ReadNew { .. } => CliError::plain("error while reading from new backing file"),
        RebaseError::Write { source, .. } => CliError::plain(format!(
            "Error while writing to COW image: {}",
            errno_text(source)
        )),
        RebaseError::Change(source) => {
            let why = match source {
                Error::InvalidArgument(text) if text.starts_with("No space left") => {
                    "No space left in the file header".to_string()
                }
                other => errno_text(other),
            };
            change_failed(name, why)
        }
    }
}

//! `qed commit`: writes what an image holds into its backing file (or, with `-b`, into a file
//! deeper in its chain, with what the layers between hold), with `qemu-img commit`'s options,
//! messages and exit codes.
//!
//! Difference from qemu-img, on purpose: without `-d` the image is emptied afterwards (every
//! cluster reads from the backing file again and the file shrinks to its header and L1
//! table), as qemu-img commit does for formats that can; QEMU's QED driver cannot, so
//! qemu-img leaves a QED image's clusters in place. The guest view is the same either way.
//! `-b` implies `-d`, as in qemu-img (the layers between keep their data and no longer read
//! as they did; the image itself does).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qed_image::ops::{self, CommitError, CommitOptions, Disk};
use qed_image::{
    probe_format, resolve_backing_name, BackingFormat, BackingPolicy, Image, OpenOptions,
};

use crate::error::{errno_text, open_error, open_failure, CliError, CliResult};
use crate::format::{CacheArg, ImageFormat};
use crate::progress::Progress;
use crate::size::cvtnum;
use crate::spec;

/// Arguments of `qed commit`.
#[derive(Debug, clap::Args)]
pub struct CommitArgs {
    /// Format of the image (probed by the QED magic when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<ImageFormat>,
    /// Cache mode of the image and the file written.
    #[arg(short = 't', long = "cache", value_name = "CACHE", value_enum)]
    pub cache: Option<CacheArg>,
    /// Commit into this file of the backing chain (implies -d).
    #[arg(short = 'b', long = "base", value_name = "BASE")]
    pub base: Option<String>,
    /// Keep the image's data (do not empty it).
    #[arg(short = 'd', long = "drop")]
    pub drop: bool,
    /// Bytes per second at most.
    #[arg(
        short = 'r',
        long = "rate-limit",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    pub rate: Option<String>,
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

/// Whether `arg` (as `-b` gave it) names the backing file at `path`, which the image at
/// `above` names `stored`: the same name, or the same file once resolved against the
/// directory of `above` (as qemu-img finds a backing image by name).
fn names(arg: &str, stored: &[u8], above: &Path, path: &Path) -> bool {
    if arg.as_bytes() == stored {
        return true;
    }
    let candidate = resolve_backing_name(above, arg.as_bytes());
    match (
        std::fs::canonicalize(candidate),
        std::fs::canonicalize(path),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Runs `qed commit`; returns the exit code.
pub fn run(args: &CommitArgs) -> CliResult<i32> {
    let rate = match &args.rate {
        Some(text) => Some(cvtnum("rate limit", text)?),
        None => None,
    };
    let drop = args.drop || args.base.is_some();
    let name = args.file.display().to_string();
    let (file, given) = spec::plain_arg(args.file.as_os_str(), args.image_opts, args.format)?;
    let format = ImageFormat::resolve(&file, given)
        .map_err(|e| CliError::new(format!("Could not open '{name}'"), open_error(&e, &name)))?;
    if format == ImageFormat::Raw {
        return Err(CliError::plain("Image does not have a backing file"));
    }
    let cache = args.cache.map_or_else(Default::default, Into::into);
    // Opened for writing even with -d, as qemu-img opens it (a dirty image is repaired first,
    // and nobody else may write it meanwhile); its backing files are opened below, one by one.
    let options = OpenOptions {
        cache,
        backing: BackingPolicy::Ignore,
        backing_names: Some(crate::spec::backing_names()),
        ..OpenOptions::read_write()
    };
    let top = Image::open(&file, &options)
        .map_err(|e| CliError::new(format!("Could not open '{name}'"), open_error(&e, &name)))?;
    let (layers, base) = chain(args, top, cache)?;
    let mut progress = Progress::new(args.progress && !args.quiet);
    let started = Instant::now();
    let refs: Vec<&Image> = layers.iter().collect();
    let result = ops::commit(
        &refs,
        base,
        &CommitOptions {
            empty_overlay: !drop,
        },
        &mut |done, total| {
            progress.update(done, total);
            throttle(rate, started, done);
        },
    );
    if result.is_ok() {
        progress.finish();
    }
    let mut closed = Ok(());
    for layer in layers {
        closed = closed.and(layer.close());
    }
    result.map_err(|e| commit_failure(&e))?;
    closed.map_err(|e| CliError::new(format!("closing {name}"), open_failure(&e)))?;
    if !args.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

/// Sleeps as long as `done` bytes since `started` are ahead of `rate` bytes per second.
fn throttle(rate: Option<u64>, started: Instant, done: u64) {
    let Some(rate) = rate.filter(|&r| r > 0) else {
        return;
    };
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        std::thread::sleep(wait);
    }
}

/// The layers from `top` down to the base (not included), each opened alone, and the base
/// opened for writing with its own chain.
fn chain(
    args: &CommitArgs,
    top: Image,
    cache: qed_image::CacheMode,
) -> CliResult<(Vec<Image>, Disk)> {
    let name = args.file.display().to_string();
    let mut layers = vec![top];
    loop {
        // A chain that loops (through json: names, which name no path to compare) ends here.
        if layers.len() > qed_image::MAX_CHAIN_DEPTH {
            return Err(CliError::plain(format!(
                "Did not find '{}' in the backing chain of '{name}'",
                args.base.as_deref().unwrap_or_default()
            )));
        }
        let current = layers.last().expect("the top at least");
        let info = current.info();
        let (Some(stored), Some(path)) = (info.backing_name, info.backing_path) else {
            return Err(CliError::plain(match &args.base {
                Some(base) => format!("Did not find '{base}' in the backing chain of '{name}'"),
                None => "Image does not have a backing file".to_string(),
            }));
        };
        let above = current.path().unwrap_or(&args.file).to_path_buf();
        let named = stored.starts_with(b"json:");
        let shown = if named {
            String::from_utf8_lossy(&stored).into_owned()
        } else {
            path.display().to_string()
        };
        let cannot_open = |why: String| {
            CliError::new(
                format!("Could not open '{name}'"),
                format!("Could not open backing file: Could not open '{shown}': {why}"),
            )
        };
        if named {
            // A backing file named in QEMU's json: syntax, opened as such a name.
            let is_base = args.base.as_ref().is_none_or(|b| b.as_bytes() == stored);
            let access = spec::Access {
                writable: is_base,
                unlocked: false,
                cache,
                backing: is_base,
            };
            let given = info.backing_format.map(ImageFormat::from);
            let spec = spec::parse_arg(OsStr::from_bytes(&stored), false, given)?;
            let opened = spec::open_disk(&spec, &access, &mut |_| {})
                .map_err(|e| cannot_open(e.text(&|e, _| open_failure(e))))?;
            match opened.disk {
                disk if is_base => return Ok((layers, disk)),
                Disk::Qed(image) => {
                    layers.push(image);
                    continue;
                }
                other => {
                    let _ = other.close();
                    let base = args.base.as_deref().unwrap_or_default();
                    return Err(CliError::plain(format!(
                        "Did not find '{base}' in the backing chain of '{name}'"
                    )));
                }
            }
        }
        let format = match info.backing_format {
            Some(format) => format,
            None => probe_format(&path).map_err(|e| cannot_open(open_failure(&e)))?,
        };
        let is_base = match &args.base {
            None => true,
            Some(base) => names(base, &stored, &above, &path),
        };
        if is_base {
            let options = OpenOptions {
                cache,
                backing: BackingPolicy::Follow,
                backing_names: Some(crate::spec::backing_names()),
                ..OpenOptions::read_write()
            };
            let base = Disk::open(&path, Some(format), &options)
                .map_err(|e| cannot_open(open_failure(&e)))?;
            return Ok((layers, base));
        }
        if format == BackingFormat::Raw {
            // A raw file ends the chain.
            let base = args.base.as_deref().unwrap_or_default();
            return Err(CliError::plain(format!(
                "Did not find '{base}' in the backing chain of '{name}'"
            )));
        }
        let options = OpenOptions {
            cache,
            backing: BackingPolicy::Ignore,
            backing_names: Some(crate::spec::backing_names()),
            ..OpenOptions::read_only()
        };
        let layer = Image::open(&path, &options).map_err(|e| cannot_open(open_failure(&e)))?;
        layers.push(layer);
    }
}

/// The message qemu-img prints for a failed commit.
fn commit_failure(e: &CommitError) -> CliError {
    match e {
        CommitError::Invalid(why) => CliError::plain(why),
        CommitError::Resize(source)
        | CommitError::Status { source, .. }
        | CommitError::Read { source, .. }
        | CommitError::Write { source, .. } => {
            CliError::plain(format!("Block job failed: {}", errno_text(source)))
        }
        CommitError::Close(source) | CommitError::Empty(source) => CliError::plain(format!(
            "Error while closing the image: {}",
            errno_text(source)
        )),
    }
}

//! `qed compare`: whether two images read the same, with `qemu-img compare`'s messages and
//! exit codes: 0 identical, 1 different, 2 an image could not be opened, 3 block status
//! failed, 4 a read failed.

use std::path::PathBuf;

use qed_image::ops::{self, CompareError, CompareOptions, CompareOutcome, Side};

use crate::error::{errno_text, CliResult};
use crate::format::{AnyFormat, CacheArg};
use crate::progress::Progress;
use crate::spec::{self, Access};

/// Arguments of `qed compare`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f', long = "a-format", value_name = "FMT")]
    pub format1: Option<AnyFormat>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F', long = "b-format", value_name = "FMT")]
    pub format2: Option<AnyFormat>,
    /// Strict: the sizes and the block status must match too.
    #[arg(short = 's', long = "strict")]
    pub strict: bool,
    /// Cache mode of both images.
    #[arg(short = 'T', long = "cache", value_name = "CACHE", value_enum)]
    pub cache: Option<CacheArg>,
    /// Open without taking the image locks (for images in use).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Show progress on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Print nothing but errors (the exit code tells the verdict).
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// FILE1 and FILE2 are option strings (`driver=qed,file.filename=x.qed`), not file names.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The first image.
    #[arg(value_name = "FILE1")]
    pub file1: PathBuf,
    /// The second image.
    #[arg(value_name = "FILE2")]
    pub file2: PathBuf,
}

/// Exit code: an image could not be opened.
const EXIT_OPEN: i32 = 2;
/// Exit code: the block status of an image could not be found.
const EXIT_STATUS: i32 = 3;
/// Exit code: a read failed.
const EXIT_READ: i32 = 4;

/// Runs `qed compare`; returns the exit code (errors are printed here, each with its code).
pub fn run(args: &CompareArgs) -> CliResult<i32> {
    let access = Access {
        unlocked: args.force_share,
        cache: args.cache.map_or_else(Default::default, Into::into),
        ..Access::read_only()
    };
    let open = |path: &PathBuf, format: Option<AnyFormat>| {
        spec::open_any_arg(path.as_os_str(), args.image_opts, format, &access)
            .map_err(|e| eprintln!("{}: {e}", crate::prog()))
    };
    let Ok(first) = open(&args.file1, args.format1) else {
        return Ok(EXIT_OPEN);
    };
    let Ok(second) = open(&args.file2, args.format2) else {
        return Ok(EXIT_OPEN);
    };
    let mut progress = Progress::new(args.progress && !args.quiet);
    let outcome = ops::compare(
        &first,
        &second,
        &CompareOptions {
            strict: args.strict,
        },
        &mut |done, total| progress.update(done, total),
    );
    progress.finish();
    let say = |text: &str| {
        if !args.quiet {
            println!("{text}");
        }
    };
    let name = |side: Side| match side {
        Side::First => args.file1.display().to_string(),
        Side::Second => args.file2.display().to_string(),
    };
    Ok(match outcome {
        Ok(CompareOutcome::Identical { size_mismatch }) => {
            if size_mismatch {
                say("Warning: Image size mismatch!");
            }
            say("Images are identical.");
            0
        }
        Ok(CompareOutcome::SizeMismatch) => {
            say("Strict mode: Image size mismatch!");
            1
        }
        Ok(CompareOutcome::StatusMismatch { offset }) => {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            1
        }
        Ok(CompareOutcome::ContentMismatch {
            offset,
            size_mismatch,
        }) => {
            if size_mismatch {
                say("Warning: Image size mismatch!");
            }
            say(&format!("Content mismatch at offset {offset}!"));
            1
        }
        Err(CompareError::Status { side, error }) => {
            eprintln!(
                "{}: Sector allocation test failed for {}: {error}",
                crate::prog(),
                name(side)
            );
            EXIT_STATUS
        }
        Err(CompareError::Read {
            side,
            offset,
            error,
        }) => {
            eprintln!(
                "{}: Error while reading offset {offset} of {}: {}",
                crate::prog(),
                name(side),
                errno_text(&error)
            );
            EXIT_READ
        }
    })
}

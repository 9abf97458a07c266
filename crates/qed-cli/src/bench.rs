//! `qed bench`: many reads or writes of one size, timed, with `qemu-img bench`'s options,
//! output lines, messages and exit codes.
//!
//! The queue depth is a number of worker threads issuing requests at once on the one open
//! image (at most `qed_image::ops::MAX_WORKERS`, and fewer when their buffers would pass
//! `MAX_BUFFER_BYTES`); the line printed still says the depth asked for. `-i` and `-n` (the
//! AIO engine) are checked as qemu-img checks them and change nothing: requests are
//! positional reads and writes from the worker threads.

use std::path::PathBuf;

use qed_image::ops::{self, BenchError, BenchOptions};
use qed_image::CacheMode;

use crate::error::{errno_text, open_failure, CliError, CliResult};
use crate::format::{CacheArg, ImageFormat};
use crate::size::{cvtnum, cvtnum_in, strtoul_in};
use crate::spec::{self, Access};

/// `INT_MAX`, the bound of qemu-img's integer options.
const INT_MAX: u64 = i32::MAX as u64;

/// Arguments of `qed bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Requests in all (default 75000).
    #[arg(short = 'c', value_name = "COUNT", allow_hyphen_values = true)]
    pub count: Option<String>,
    /// Requests in flight at once (default 64).
    #[arg(short = 'd', value_name = "DEPTH", allow_hyphen_values = true)]
    pub depth: Option<String>,
    /// Format of the image (probed when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<ImageFormat>,
    /// A flush after every N requests (write tests only).
    #[arg(long = "flush-interval", value_name = "N", allow_hyphen_values = true)]
    pub flush_interval: Option<String>,
    /// Do not wait for the requests in flight before a flush.
    #[arg(long = "no-drain")]
    pub no_drain: bool,
    /// AIO engine: threads, native or io_uring (accepted; requests are positional I/O).
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    pub aio: Option<String>,
    /// Native AIO (needs `-t none` or `-t directsync`, as in qemu-img).
    #[arg(short = 'n', long = "native")]
    pub native: bool,
    /// Offset of the first request.
    #[arg(
        short = 'o',
        long = "offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    pub offset: Option<String>,
    /// The byte written (0 to 255).
    #[arg(long = "pattern", value_name = "BYTE", allow_hyphen_values = true)]
    pub pattern: Option<String>,
    /// Accepted, as in qemu-img (the two lines are printed all the same).
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Bytes per request (default 4096).
    #[arg(
        short = 's',
        long = "size",
        value_name = "SIZE",
        allow_hyphen_values = true
    )]
    pub buffer_size: Option<String>,
    /// Distance between the offsets of consecutive requests (default: the request size).
    #[arg(
        short = 'S',
        long = "step",
        value_name = "STEP",
        allow_hyphen_values = true
    )]
    pub step: Option<String>,
    /// Cache mode of the image.
    #[arg(short = 't', long = "cache", value_name = "CACHE", value_enum)]
    pub cache: Option<CacheArg>,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    pub write: bool,
    /// Open without taking the image lock (read tests only).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// FILE is an option string (`driver=qed,file.filename=x.qed`), not a file name.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// The options, parsed and checked as qemu-img checks them before opening the image.
fn options(args: &BenchArgs) -> CliResult<BenchOptions> {
    let mut options = BenchOptions::default();
    if let Some(text) = &args.count {
        options.count = strtoul_in("request count", text, 1, INT_MAX)?;
    }
    if let Some(text) = &args.depth {
        options.depth = strtoul_in("queue depth", text, 1, INT_MAX)? as usize;
    }
    if let Some(aio) = &args.aio {
        if !matches!(aio.as_str(), "threads" | "native" | "io_uring") {
            return Err(CliError::plain(format!("Invalid aio option: {aio}")));
        }
    }
    if let Some(text) = &args.offset {
        options.offset = cvtnum("offset", text)?;
    }
    if let Some(text) = &args.buffer_size {
        options.buffer_size = cvtnum_in("buffer size", text, 1, INT_MAX)? as usize;
    }
    if let Some(text) = &args.step {
        options.step = cvtnum_in("step size", text, 0, INT_MAX)?;
    }
    if let Some(text) = &args.pattern {
        options.pattern = strtoul_in("pattern byte", text, 0, 255)? as u8;
    }
    if let Some(text) = &args.flush_interval {
        options.flush_interval = strtoul_in("flush interval", text, 0, INT_MAX)?;
    }
    options.write = args.write;
    options.drain = !args.no_drain;
    if !options.write && options.flush_interval > 0 {
        return Err(CliError::plain(
            "--flush-interval is only available in write tests",
        ));
    }
    if options.flush_interval > 0 && options.flush_interval < options.depth as u64 {
        return Err(CliError::plain(
            "Flush interval can't be smaller than depth",
        ));
    }
    Ok(options)
}

/// Runs `qed bench`; returns the exit code.
pub fn run(args: &BenchArgs) -> CliResult<i32> {
    let options = options(args)?;
    let name = args.file.display().to_string();
    let cannot_open = |why: &str| CliError::new(format!("Could not open '{name}'"), why);
    let cache: CacheMode = args.cache.map_or_else(Default::default, Into::into);
    let native = match args.aio.as_deref() {
        Some(aio) => aio == "native",
        None => args.native,
    };
    if native && cache != CacheMode::None {
        return Err(cannot_open(
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ));
    }
    if args.force_share && args.write {
        return Err(cannot_open(
            "force-share=on can only be used with read-only images",
        ));
    }
    let access = Access {
        writable: args.write,
        unlocked: args.force_share,
        cache,
        backing: true,
    };
    let disk = spec::open_arg(args.file.as_os_str(), args.image_opts, args.format, &access)?.disk;
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size \
         {})",
        options.count,
        if options.write { "write" } else { "read" },
        options.buffer_size,
        options.depth,
        options.offset,
        options.effective_step()
    );
    if options.flush_interval > 0 {
        println!("Sending flush every {} requests", options.flush_interval);
    }
    let result = ops::bench(&disk, &options);
    let closed = disk.close();
    let elapsed = result.map_err(|e| match e {
        BenchError::Request(e) => CliError::plain(format!("Failed request: {}", errno_text(&e))),
        BenchError::Flush(e) => {
            CliError::plain(format!("Failed flush request: {}", errno_text(&e)))
        }
    })?;
    closed.map_err(|e| CliError::new(format!("closing {name}"), open_failure(&e)))?;
    println!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    Ok(0)
}

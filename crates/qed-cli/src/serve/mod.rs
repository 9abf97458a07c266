//! `qed serve`: qemu-nbd for QED images. Parses qemu-nbd's options, opens the image, runs the
//! NBD server until the last client leaves (or SIGINT/SIGTERM), then flushes and closes the
//! image, which marks it clean.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use qed_image::{BackingPolicy, CacheMode, Image, OpenOptions};
use qed_nbd::export::{Export, RawExport, Window};
use qed_nbd::proto::ExportConfig;
use qed_nbd::server::{load_credentials, DetectZeroes, Discard, Endpoint, Server, ServerConfig};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::error::{open_failure, CliError, CliResult};

mod activation;
mod fork;
mod list;
use crate::format::ImageFormat;
use crate::snapshot::Overlay;

/// Address listened on without `-b`.
const DEFAULT_BIND: &str = "127.0.0.1";
/// NBD's registered port, listened on without `-p`.
const DEFAULT_PORT: u16 = 10809;

/// Connections served at once when `-e 0` asks for no limit.
const MAX_SHARED: usize = 256;

/// `--discard`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscardArg {
    /// Trim requests succeed and change nothing.
    Ignore,
    /// Trim requests give whole clusters back.
    Unmap,
}

/// `--detect-zeroes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DetectZeroesArg {
    /// Write zeros as data.
    Off,
    /// Write buffers of zeros as zero writes.
    On,
    /// As `on`, and let them give space back (with `--discard unmap`).
    Unmap,
}

/// Arguments of `qed serve` (qemu-nbd's letters).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Image format: qed or raw (probed when not given).
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<ImageFormat>,
    /// Address to listen on (default 127.0.0.1).
    #[arg(short = 'b', long = "bind")]
    bind: Option<String>,
    /// TCP port to listen on (default 10809).
    #[arg(short = 'p', long = "port")]
    port: Option<u16>,
    /// Listen on this Unix socket instead of TCP.
    #[arg(short = 'k', long = "socket")]
    socket: Option<PathBuf>,
    /// Export name (default empty).
    #[arg(short = 'x', long = "export-name")]
    export_name: Option<String>,
    /// Export description.
    #[arg(short = 'D', long = "description")]
    description: Option<String>,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// How many clients at once (0: up to 256).
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Do not exit when the last client leaves.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Offer the qemu:allocation-depth metadata context.
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Serve a temporary overlay on FILE: writes go there and are dropped at exit.
    #[arg(short = 's', long = "snapshot")]
    snapshot: bool,
    /// Export the image from this offset on (bytes, or with a k/M/G suffix).
    #[arg(short = 'o', long = "offset")]
    offset: Option<String>,
    /// Accepted, as qemu-nbd's: in server mode it prints nothing more (scripts compare
    /// stderr with qemu-nbd's).
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// Run in the background: return once the server listens.
    #[arg(long = "fork")]
    fork: bool,
    /// Print "ready" on stdout once listening (how --fork learns it; not for people).
    #[arg(long = "notify-ready", hide = true)]
    notify_ready: bool,
    /// Write the process id to this file.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Cache mode: writeback (default), writethrough, none, directsync, unsafe.
    #[arg(long = "cache")]
    cache: Option<String>,
    /// No host cache: --cache=none.
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// AIO mode (accepted; the engine uses threads).
    #[arg(long = "aio")]
    aio: Option<String>,
    /// What trim requests do (default ignore).
    #[arg(long = "discard", value_enum)]
    discard: Option<DiscardArg>,
    /// Turn writes of zeros into zero writes.
    #[arg(long = "detect-zeroes", value_enum, default_value = "off")]
    detect_zeroes: DetectZeroesArg,
    /// TLS credentials directory: server-cert.pem, server-key.pem (and ca-cert.pem to verify
    /// clients); every client must then start TLS.
    #[arg(long = "tls-creds")]
    tls_creds: Option<PathBuf>,
    /// TLS host name (a client option; not supported).
    #[arg(long = "tls-hostname")]
    tls_hostname: Option<String>,
    /// Require client certificates that chain to ca-cert.pem.
    #[arg(long = "tls-verify-peer")]
    tls_verify_peer: bool,
    /// List the exports of the server at -k, or -b and -p, instead of serving.
    #[arg(short = 'L', long = "list")]
    list: bool,
    /// The image (none with --list).
    file: Option<PathBuf>,
}

/// The opened image, kept to close it after the server is done with it.
enum Opened {
    Qed(Arc<Image>),
    Raw(Arc<RawExport>),
}

impl Opened {
    fn export(&self) -> Arc<dyn Export> {
        match self {
            Self::Qed(image) => Arc::clone(image) as Arc<dyn Export>,
            Self::Raw(raw) => Arc::clone(raw) as Arc<dyn Export>,
        }
    }

    /// Flushes, and for QED writes back and marks the image clean. Called after the server
    /// returned, so this holds the last reference.
    fn close(self) -> qed_image::Result<()> {
        match self {
            Self::Qed(image) => match Arc::try_unwrap(image) {
                Ok(image) => image.close(),
                Err(image) => image.flush(),
            },
            Self::Raw(raw) => {
                if raw.is_writable() {
                    raw.flush()
                } else {
                    Ok(())
                }
            }
        }
    }
}

fn cache_mode(name: &str) -> CliResult<CacheMode> {
    match name {
        "writeback" | "writethrough" => Ok(CacheMode::Writeback),
        "none" | "directsync" => Ok(CacheMode::None),
        "unsafe" => Ok(CacheMode::Unsafe),
        other => Err(CliError::plain(format!("Invalid cache mode '{other}'"))),
    }
}

/// Prints a warning on stderr; under `--fork` through the parent, which exits as soon as the
/// server listens and would otherwise lose it.
fn warn(args: &ServeArgs, text: &str) {
    if args.notify_ready {
        let lines: String = text
            .lines()
            .map(|line| format!("{}{line}\n", fork::STDERR_LINE))
            .collect();
        let _ = std::io::stdout().write_all(lines.as_bytes());
    } else {
        let _ = std::io::stderr().write_all(text.as_bytes());
    }
}

/// Runs `qed serve`.
pub fn run(args: &ServeArgs) -> CliResult<i32> {
    if args.list {
        return list::run(args);
    }
    let Some(file) = args.file.as_deref() else {
        return Err(CliError::plain("Invalid number of arguments"));
    };
    if args.fork {
        return fork::fork();
    }
    let offset = match &args.offset {
        Some(text) => crate::size::parse_size(text)
            .map_err(|e| CliError::new(format!("Invalid offset '{text}'"), e))?,
        None => 0,
    };
    if args.tls_hostname.is_some() {
        return Err(if args.tls_creds.is_some() {
            CliError::plain("TLS hostname is only supported with export list")
        } else {
            CliError::plain("--tls-hostname is not permitted without --tls-creds")
        });
    }
    let passed = activation::passed_sockets()?;
    if passed > 0 {
        activation::validate(
            args.socket.is_some(),
            args.bind.is_some(),
            args.port.is_some(),
        )?;
        if passed > 1 {
            return Err(CliError::plain(
                "qemu-nbd does not support socket activation with LISTEN_FDS > 1",
            ));
        }
    }
    if args.tls_verify_peer && args.tls_creds.is_none() {
        return Err(CliError::plain("--tls-verify-peer needs --tls-creds"));
    }
    let tls = match &args.tls_creds {
        Some(dir) => Some(
            load_credentials(dir, args.tls_verify_peer)
                .map_err(|e| CliError::new(format!("TLS credentials in {}", dir.display()), e))?,
        ),
        None => None,
    };
    let format = ImageFormat::resolve(file, args.format).map_err(|e| {
        CliError::new(
            format!("Failed to blk_new_open '{}'", file.display()),
            open_failure(&e),
        )
    })?;
    if args.nocache && args.cache.is_some() {
        return Err(CliError::plain("-n and --cache can only be specified once"));
    }
    let cache_name = match (&args.cache, args.nocache) {
        (Some(name), _) => name.as_str(),
        (None, true) => "none",
        (None, false) => "writeback",
    };
    let cache = cache_mode(cache_name)?;
    let probed_raw = args.format.is_none() && format == ImageFormat::Raw;
    if probed_raw {
        warn(args, &crate::format::probed_raw_warning(file));
    }
    // With -s the export is a temporary overlay on FILE, removed when the server stops.
    let overlay = if args.snapshot {
        Some(Overlay::create(file, format).map_err(|e| {
            CliError::new(
                format!("snapshot of '{}'", file.display()),
                open_failure(&e),
            )
        })?)
    } else {
        None
    };
    let (file, format) = match &overlay {
        Some(o) => (o.path().to_path_buf(), ImageFormat::Qed),
        None => (file.to_path_buf(), format),
    };
    let opened = match format {
        ImageFormat::Qed => {
            let options = OpenOptions {
                writable: !args.read_only,
                cache,
                backing: BackingPolicy::Follow,
                backing_names: Some(crate::spec::backing_names()),
                ..OpenOptions::default()
            };
            Image::open(&file, &options).map(|i| Opened::Qed(Arc::new(i)))
        }
        ImageFormat::Raw => RawExport::open(&file, !args.read_only, cache).map(|r| {
            let r = if probed_raw { r.probed() } else { r };
            Opened::Raw(Arc::new(r))
        }),
    };
    let opened = opened.map_err(|e| {
        CliError::new(
            format!("Failed to blk_new_open '{}'", file.display()),
            open_failure(&e),
        )
    })?;
    let image = if offset > 0 {
        let window = Window::new(opened.export(), offset)
            .map_err(|e| CliError::new(format!("Invalid offset {offset}"), e))?;
        Arc::new(window) as Arc<dyn Export>
    } else {
        opened.export()
    };
    let mut export = ExportConfig::new(args.export_name.clone().unwrap_or_default(), image.size());
    export.description = args.description.clone();
    export.writable = !args.read_only;
    export.allocation_depth = args.allocation_depth;
    if probed_raw {
        // Whole sectors, as the probed file is served in them.
        export.block_size.minimum = 512;
    }
    let mut config = ServerConfig::new(export);
    config.max_connections = if args.shared == 0 {
        MAX_SHARED
    } else {
        args.shared.min(MAX_SHARED)
    };
    config.persistent = args.persistent;
    config.tls = tls;
    config.writethrough = matches!(cache_name, "writethrough" | "directsync");
    config.discard = match args.discard.unwrap_or(DiscardArg::Ignore) {
        DiscardArg::Ignore => Discard::Ignore,
        DiscardArg::Unmap => Discard::Unmap,
    };
    config.detect_zeroes = match args.detect_zeroes {
        DetectZeroesArg::Off => DetectZeroes::Off,
        DetectZeroesArg::On => DetectZeroes::On,
        DetectZeroesArg::Unmap => DetectZeroes::Unmap,
    };
    let server = if passed > 0 {
        Server::serve_on(activation::take_listener()?, config)
            .map_err(|e| CliError::new("server", crate::error::os_text(&e)))?
    } else {
        let endpoint = match &args.socket {
            Some(path) => Endpoint::Unix(path.clone()),
            None => Endpoint::Tcp {
                host: args.bind.clone().unwrap_or_else(|| DEFAULT_BIND.into()),
                port: args.port.unwrap_or(DEFAULT_PORT),
            },
        };
        Server::bind(&endpoint, config).map_err(|e| {
            CliError::new(
                format!("Failed to bind {endpoint}"),
                crate::error::os_text(&e),
            )
        })?
    };
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| CliError::new("signal handlers", crate::error::os_text(&e)))?;
    let signal_handle = signals.handle();
    let stop = server.shutdown_handle();
    let waiter = std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stop.shutdown();
        }
    });
    if let Some(pid_file) = &args.pid_file {
        std::fs::write(pid_file, format!("{}\n", std::process::id())).map_err(|e| {
            CliError::new(pid_file.display().to_string(), crate::error::os_text(&e))
        })?;
    }
    if args.notify_ready {
        let mut out = std::io::stdout();
        // The parent of --fork reads this line, then exits; nothing else goes to stdout.
        let _ = writeln!(out, "{}", fork::READY).and_then(|()| out.flush());
    }
    let served = server.run(image);
    signal_handle.close();
    let _ = waiter.join();
    if let Some(pid_file) = &args.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    let closed = opened.close();
    served.map_err(|e| CliError::new("server", crate::error::os_text(&e)))?;
    closed.map_err(|e| CliError::new(file.display().to_string(), e))?;
    Ok(0)
}

//! `qed serve`: qemu-nbd for QED images. Parses qemu-nbd's options, opens the image, runs the
//! NBD server until the last client leaves (or SIGINT/SIGTERM), then flushes and closes the
//! image, which marks it clean.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use qed_image::{BackingPolicy, CacheMode, Image, OpenOptions};
use qed_nbd::export::{Export, RawExport, Window};
use qed_nbd::proto::ExportConfig;
use qed_nbd::server::{
    load_credentials, DetectZeroes, Discard, Endpoint, Event, Server, ServerConfig,
};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::error::{open_failure, CliError, CliResult};

mod fork;
use crate::format::ImageFormat;
use crate::snapshot::Overlay;

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
    /// Address to listen on.
    #[arg(short = 'b', long = "bind", default_value = "127.0.0.1")]
    bind: String,
    /// TCP port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    port: u16,
    /// Listen on this Unix socket instead of TCP.
    #[arg(short = 'k', long = "socket")]
    socket: Option<PathBuf>,
    /// Export name.
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
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
    /// Log connections on stderr.
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
    #[arg(long = "cache", default_value = "writeback")]
    cache: String,
    /// AIO mode (accepted; the engine uses threads).
    #[arg(long = "aio")]
    aio: Option<String>,
    /// What trim requests do.
    #[arg(long = "discard", value_enum, default_value = "ignore")]
    discard: DiscardArg,
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
    /// The image.
    file: PathBuf,
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

fn unsupported(what: &str) -> CliError {
    CliError::plain(format!("{what} is not supported"))
}

fn cache_mode(name: &str) -> CliResult<CacheMode> {
    match name {
        "writeback" | "writethrough" => Ok(CacheMode::Writeback),
        "none" | "directsync" => Ok(CacheMode::None),
        "unsafe" => Ok(CacheMode::Unsafe),
        other => Err(CliError::plain(format!("Invalid cache mode '{other}'"))),
    }
}

/// Runs `qed serve`.
pub fn run(args: &ServeArgs) -> CliResult<i32> {
    if args.fork {
        return fork::fork();
    }
    let offset = match &args.offset {
        Some(text) => crate::size::parse_size(text)
            .map_err(|e| CliError::new(format!("Invalid offset '{text}'"), e))?,
        None => 0,
    };
    if args.tls_hostname.is_some() {
        return Err(unsupported("--tls-hostname (a client option)"));
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
    let format = ImageFormat::resolve(&args.file, args.format).map_err(|e| {
        CliError::new(
            format!("Failed to blk_new_open '{}'", args.file.display()),
            open_failure(&e),
        )
    })?;
    let cache = cache_mode(&args.cache)?;
    // With -s the export is a temporary overlay on FILE, removed when the server stops.
    let overlay = if args.snapshot {
        Some(Overlay::create(&args.file, format).map_err(|e| {
            CliError::new(
                format!("snapshot of '{}'", args.file.display()),
                open_failure(&e),
            )
        })?)
    } else {
        None
    };
    let (file, format) = match &overlay {
        Some(o) => (o.path().to_path_buf(), ImageFormat::Qed),
        None => (args.file.clone(), format),
    };
    let opened = match format {
        ImageFormat::Qed => {
            let options = OpenOptions {
                writable: !args.read_only,
                cache,
                backing: BackingPolicy::Follow,
                ..OpenOptions::default()
            };
            Image::open(&file, &options).map(|i| Opened::Qed(Arc::new(i)))
        }
        ImageFormat::Raw => {
            RawExport::open(&file, !args.read_only, cache).map(|r| Opened::Raw(Arc::new(r)))
        }
    };
    let opened = opened.map_err(|e| {
        CliError::new(
            format!("Failed to blk_new_open '{}'", args.file.display()),
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
    let mut export = ExportConfig::new(args.export_name.clone(), image.size());
    export.description = args.description.clone();
    export.writable = !args.read_only;
    export.allocation_depth = args.allocation_depth;
    let mut config = ServerConfig::new(export);
    config.max_connections = if args.shared == 0 {
        MAX_SHARED
    } else {
        args.shared.min(MAX_SHARED)
    };
    config.persistent = args.persistent;
    config.tls = tls;
    config.writethrough = matches!(args.cache.as_str(), "writethrough" | "directsync");
    config.discard = match args.discard {
        DiscardArg::Ignore => Discard::Ignore,
        DiscardArg::Unmap => Discard::Unmap,
    };
    config.detect_zeroes = match args.detect_zeroes {
        DetectZeroesArg::Off => DetectZeroes::Off,
        DetectZeroesArg::On => DetectZeroes::On,
        DetectZeroesArg::Unmap => DetectZeroes::Unmap,
    };
    let endpoint = match &args.socket {
        Some(path) => Endpoint::Unix(path.clone()),
        None => Endpoint::Tcp {
            host: args.bind.clone(),
            port: args.port,
        },
    };
    let mut server = Server::bind(&endpoint, config).map_err(|e| {
        CliError::new(
            format!("Failed to bind {endpoint}"),
            crate::error::os_text(&e),
        )
    })?;
    if args.verbose {
        // Not eprintln: after --fork nobody may be reading stderr, and a failed write must
        // not panic.
        server.on_event(|event| {
            let line = match event {
                Event::Connected { peer } => {
                    format!("{}: client {peer} connected\n", crate::prog())
                }
                Event::Disconnected { peer, reason } => {
                    format!("{}: client {peer} disconnected: {reason}\n", crate::prog())
                }
            };
            let _ = std::io::stderr().write_all(line.as_bytes());
        });
    }
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
        let _ = writeln!(out, "ready").and_then(|()| out.flush());
    }
    let served = server.run(image);
    signal_handle.close();
    let _ = waiter.join();
    if let Some(pid_file) = &args.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    let closed = opened.close();
    served.map_err(|e| CliError::new("server", crate::error::os_text(&e)))?;
    closed.map_err(|e| CliError::new(args.file.display().to_string(), e))?;
    Ok(0)
}

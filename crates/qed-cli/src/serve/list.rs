//! `qed serve --list` (qemu-nbd `-L`): connects to a server and prints its exports as
//! qemu-nbd prints them.

use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use qed_nbd::client::{list_exports, ClientTls, Listing};

use super::{ServeArgs, DEFAULT_BIND, DEFAULT_PORT};
use crate::error::{CliError, CliResult};

/// Names of the transmission flags, by bit, as qemu-nbd prints them.
const FLAG_NAMES: [(u16, &str); 12] = [
    (1, "readonly"),
    (2, "flush"),
    (3, "fua"),
    (4, "rotational"),
    (5, "trim"),
    (6, "zeroes"),
    (7, "df"),
    (8, "multi"),
    (9, "resize"),
    (10, "cache"),
    (11, "fast-zero"),
    (12, "block-status-payload"),
];

/// Checks the options list mode cannot take, with qemu-nbd's words.
fn validate(args: &ServeArgs) -> CliResult<()> {
    if args.file.is_some() {
        return Err(CliError::plain(
            "List mode is incompatible with a file name",
        ));
    }
    let per_device = args.export_name.is_some()
        || args.description.is_some()
        || args.offset.is_some()
        || args.format.is_some()
        || args.allocation_depth
        || args.aio.is_some()
        || args.discard.is_some()
        || args.cache.is_some()
        || args.nocache;
    if per_device {
        return Err(CliError::plain(
            "List mode is incompatible with per-device settings",
        ));
    }
    if args.fork {
        return Err(CliError::plain("List mode is incompatible with forking"));
    }
    if args.tls_hostname.is_some() && args.tls_creds.is_none() {
        return Err(CliError::plain(
            "--tls-hostname is not permitted without --tls-creds",
        ));
    }
    Ok(())
}

/// Runs list mode.
pub fn run(args: &ServeArgs) -> CliResult<i32> {
    validate(args)?;
    let host = args.bind.clone().unwrap_or_else(|| DEFAULT_BIND.into());
    let tls =
        match &args.tls_creds {
            Some(dir) => {
                let hostname = args.tls_hostname.as_deref().unwrap_or(&host);
                Some(ClientTls::load(dir, hostname).map_err(|e| {
                    CliError::new("Failed to get TLS creds", crate::error::os_text(&e))
                })?)
            }
            None => None,
        };
    let listing = match &args.socket {
        Some(path) => {
            let socket = UnixStream::connect(path).map_err(|e| {
                CliError::new(
                    format!("Failed to connect to '{}'", path.display()),
                    crate::error::os_text(&e),
                )
            })?;
            list_exports(socket, tls.as_ref())
        }
        None => {
            let port = args.port.unwrap_or(DEFAULT_PORT);
            let socket = TcpStream::connect((host.as_str(), port)).map_err(|e| {
                CliError::new(
                    format!("Failed to connect to '{host}:{port}'"),
                    crate::error::os_text(&e),
                )
            })?;
            list_exports(socket, tls.as_ref())
        }
    }
    .map_err(CliError::plain)?;
    print!("{}", render(&listing));
    Ok(0)
}

/// The listing as qemu-nbd prints it.
pub fn render(listing: &Listing) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "exports available: {}", listing.exports.len());
    for export in &listing.exports {
        let _ = writeln!(out, " export: '{}'", export.name);
        if let Some(description) = &export.description {
            let _ = writeln!(out, "  description: {description}");
        }
        if let Some((size, flags)) = export.size_and_flags {
            let _ = writeln!(out, "  size:  {size}");
            let names: String = FLAG_NAMES
                .iter()
                .filter(|(bit, _)| flags & (1 << bit) != 0)
                .map(|(_, name)| format!(" {name}"))
                .collect();
            let _ = writeln!(out, "  flags: 0x{flags:x} ({names} )");
        }
        if let Some((min, preferred, max)) = export.block_sizes {
            let _ = writeln!(out, "  min block: {min}");
            let _ = writeln!(out, "  opt block: {preferred}");
            let _ = writeln!(out, "  max block: {max}");
        }
        let width = if listing.extended_headers { 64 } else { 32 };
        let _ = writeln!(out, "  transaction size: {width}-bit");
        if !export.contexts.is_empty() {
            let _ = writeln!(out, "  available meta contexts: {}", export.contexts.len());
            for context in &export.contexts {
                let _ = writeln!(out, "   {context}");
            }
        }
    }
    out
}

//! The client side of the handshake, as far as listing a server's exports goes (what
//! `qemu-nbd --list` does): fixed newstyle, optionally STARTTLS, extended headers or
//! structured replies, `NBD_OPT_LIST`, then `NBD_OPT_INFO` and `NBD_OPT_LIST_META_CONTEXT`
//! for each export, and `NBD_OPT_ABORT`. It never enters transmission.
//!
//! Everything the server sends is bounded before it is allocated: an option reply carries at
//! most [`MAX_REPLY`] bytes and a listing at most [`MAX_EXPORTS`] exports.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::proto::consts::*;

/// The largest option reply accepted (names and descriptions are at most 4 KiB each).
pub const MAX_REPLY: u32 = 64 * 1024;
/// The most exports a listing holds.
pub const MAX_EXPORTS: usize = 4096;
/// The most metadata contexts listed per export.
pub const MAX_CONTEXTS: usize = 1024;

/// What went wrong while listing.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The socket failed or closed early.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server does not speak fixed newstyle, or sent something the protocol forbids.
    #[error("{0}")]
    Protocol(String),
    /// The server answered an option with an error.
    #[error("{what}: server reported error 0x{code:x}{}", .message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    Refused {
        /// The option, for the message.
        what: &'static str,
        /// The reply type (an `NBD_REP_ERR_*`).
        code: u32,
        /// The text the server sent with it, if any.
        message: Option<String>,
    },
    /// TLS failed.
    #[error("TLS: {0}")]
    Tls(String),
}

/// One export as the server describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportListing {
    /// Its name.
    pub name: String,
    /// Its description (from `NBD_OPT_INFO`, else from the list entry), when not empty.
    pub description: Option<String>,
    /// Size in bytes and transmission flags (`NBD_INFO_EXPORT`).
    pub size_and_flags: Option<(u64, u16)>,
    /// Minimum, preferred and maximum block size (`NBD_INFO_BLOCK_SIZE`).
    pub block_sizes: Option<(u32, u32, u32)>,
    /// Metadata contexts the export offers.
    pub contexts: Vec<String>,
}

/// The server's exports, and how the connection was set up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The exports in the order the server listed them.
    pub exports: Vec<ExportListing>,
    /// Whether extended headers (64-bit lengths) were negotiated.
    pub extended_headers: bool,
}

/// TLS for a listing client: trusted roots and an optional client certificate.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    hostname: ServerName<'static>,
}

impl ClientTls {
    /// Client credentials from `dir` as QEMU names them: `ca-cert.pem` (the roots the
    /// server's certificate must chain to), and `client-cert.pem` with `client-key.pem`
    /// when both are there. `hostname` is what the server's certificate must name.
    pub fn load(dir: &Path, hostname: &str) -> io::Result<Self> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let ca_path = dir.join("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca_path)
            .map_err(|e| invalid(format!("{}: {e}", ca_path.display())))?
        {
            let cert = cert.map_err(|e| invalid(format!("{}: {e}", ca_path.display())))?;
            roots
                .add(cert)
                .map_err(|e| invalid(format!("{}: {e}", ca_path.display())))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(e.to_string()))?
            .with_root_certificates(roots);
        let (cert_path, key_path) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
        let config = if cert_path.exists() && key_path.exists() {
            let certs = CertificateDer::pem_file_iter(&cert_path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| invalid(format!("{}: {e}", cert_path.display())))?;
            let key = PrivateKeyDer::from_pem_file(&key_path)
                .map_err(|e| invalid(format!("{}: {e}", key_path.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| invalid(e.to_string()))?
        } else {
            builder.with_no_client_auth()
        };
        let hostname = ServerName::try_from(hostname.to_string())
            .map_err(|_| invalid(format!("invalid TLS host name '{hostname}'")))?;
        Ok(Self {
            config: Arc::new(config),
            hostname,
        })
    }
}

/// A byte stream the handshake runs on: the socket, or TLS over it.
trait Channel: Read + Write {}
impl<T: Read + Write> Channel for T {}

/// Lists the exports of the server at the other end of `socket`.
pub fn list_exports<S: Read + Write + 'static>(
    mut socket: S,
    tls: Option<&ClientTls>,
) -> Result<Listing, ListError> {
    let mut head = [0u8; 18];
    socket.read_exact(&mut head)?;
    let magic = u64::from_be_bytes(head[0..8].try_into().unwrap_or_default());
    let newstyle = u64::from_be_bytes(head[8..16].try_into().unwrap_or_default());
    let flags = u16::from_be_bytes([head[16], head[17]]);
    if magic != NBDMAGIC || newstyle != IHAVEOPT {
        return Err(ListError::Protocol(
            "the server does not speak newstyle negotiation".into(),
        ));
    }
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ListError::Protocol(
            "the server does not speak fixed newstyle negotiation".into(),
        ));
    }
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    socket.write_all(&client_flags.to_be_bytes())?;
    let mut channel: Box<dyn Channel> = match tls {
        None => Box::new(socket),
        Some(tls) => {
            send_option(&mut socket, OPT_STARTTLS, &[])?;
            expect_ack(&mut socket, OPT_STARTTLS, "Server rejected STARTTLS")?;
            let connection = ClientConnection::new(Arc::clone(&tls.config), tls.hostname.clone())
                .map_err(|e| ListError::Tls(e.to_string()))?;
            let mut stream = StreamOwned::new(connection, socket);
            while stream.conn.is_handshaking() {
                stream
                    .conn
                    .complete_io(&mut stream.sock)
                    .map_err(|e| ListError::Tls(e.to_string()))?;
            }
            Box::new(stream)
        }
    };
    let channel = &mut *channel;
    send_option(channel, OPT_EXTENDED_HEADERS, &[])?;
    let extended_headers = match read_reply(channel, OPT_EXTENDED_HEADERS)? {
        (REP_ACK, _) => true,
        (kind, _) if kind & (1 << 31) != 0 => {
            // Structured replies then; whether the server takes them changes nothing here.
            send_option(channel, OPT_STRUCTURED_REPLY, &[])?;
            let _ = read_reply(channel, OPT_STRUCTURED_REPLY)?;
            false
        }
        (kind, _) => return Err(unexpected(OPT_EXTENDED_HEADERS, kind)),
    };
    let mut exports = list_names(channel)?;
    for export in &mut exports {
        describe(channel, export)?;
        export.contexts = list_contexts(channel, &export.name)?;
    }
    send_option(channel, OPT_ABORT, &[])?;
    // The server may acknowledge the abort or just close; either ends the session.
    let _ = read_reply(channel, OPT_ABORT);
    Ok(Listing {
        exports,
        extended_headers,
    })
}

fn unexpected(option: u32, kind: u32) -> ListError {
    ListError::Protocol(format!("unexpected reply type {kind} to option {option}"))
}

fn send_option(channel: &mut dyn Write, option: u32, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut message = Vec::with_capacity(16 + data.len());
    message.extend_from_slice(&IHAVEOPT.to_be_bytes());
    message.extend_from_slice(&option.to_be_bytes());
    message.extend_from_slice(&len.to_be_bytes());
    message.extend_from_slice(data);
    channel.write_all(&message)?;
    channel.flush()
}

/// Reads one option reply to `option`: its type and data.
fn read_reply(channel: &mut dyn Read, option: u32) -> Result<(u32, Vec<u8>), ListError> {
    let mut head = [0u8; 20];
    channel.read_exact(&mut head)?;
    let magic = u64::from_be_bytes(head[0..8].try_into().unwrap_or_default());
    let replied = u32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
    let kind = u32::from_be_bytes(head[12..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap_or_default());
    if magic != OPTION_REPLY_MAGIC {
        return Err(ListError::Protocol("bad option reply magic".into()));
    }
    if replied != option {
        return Err(ListError::Protocol(format!(
            "reply to option {replied} where {option} was sent"
        )));
    }
    if len > MAX_REPLY {
        return Err(ListError::Protocol(format!(
            "option reply of {len} bytes is too large"
        )));
    }
    let mut data = vec![0u8; len as usize];
    channel.read_exact(&mut data)?;
    Ok((kind, data))
}

fn refused(what: &'static str, code: u32, data: &[u8]) -> ListError {
    let message = (!data.is_empty()).then(|| String::from_utf8_lossy(data).into_owned());
    ListError::Refused {
        what,
        code,
        message,
    }
}

fn expect_ack(channel: &mut dyn Read, option: u32, what: &'static str) -> Result<(), ListError> {
    match read_reply(channel, option)? {
        (REP_ACK, _) => Ok(()),
        (kind, data) if kind & (1 << 31) != 0 => Err(refused(what, kind, &data)),
        (kind, _) => Err(unexpected(option, kind)),
    }
}

/// A length-prefixed (u32) string at the front of `data`, and what follows it.
fn prefixed(data: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + len)?;
    Some((String::from_utf8_lossy(name).into_owned(), &data[4 + len..]))
}

fn list_names(channel: &mut dyn Channel) -> Result<Vec<ExportListing>, ListError> {
    send_option(channel, OPT_LIST, &[])?;
    let mut exports = Vec::new();
    loop {
        match read_reply(channel, OPT_LIST)? {
            (REP_ACK, _) => return Ok(exports),
            (REP_SERVER, data) => {
                let (name, rest) = prefixed(&data)
                    .ok_or_else(|| ListError::Protocol("malformed export list entry".into()))?;
                if exports.len() == MAX_EXPORTS {
                    return Err(ListError::Protocol(format!(
                        "more than {MAX_EXPORTS} exports"
                    )));
                }
                let description =
                    (!rest.is_empty()).then(|| String::from_utf8_lossy(rest).into_owned());
                exports.push(ExportListing {
                    name,
                    description,
                    ..ExportListing::default()
                });
            }
            (kind, data) if kind & (1 << 31) != 0 => {
                return Err(refused("Server does not support export lists", kind, &data))
            }
            (kind, _) => return Err(unexpected(OPT_LIST, kind)),
        }
    }
}

fn name_data(name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len() + 6);
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data
}

/// `NBD_OPT_INFO` for one export: size, flags, description, block sizes. An export the
/// server will not describe keeps what the list said.
fn describe(channel: &mut dyn Channel, export: &mut ExportListing) -> Result<(), ListError> {
    let mut data = name_data(&export.name);
    data.extend_from_slice(&2u16.to_be_bytes());
    data.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(channel, OPT_INFO, &data)?;
    loop {
        let (kind, data) = read_reply(channel, OPT_INFO)?;
        match kind {
            REP_ACK => return Ok(()),
            REP_INFO => {
                let info = data
                    .get(..2)
                    .map(|t| u16::from_be_bytes([t[0], t[1]]))
                    .ok_or_else(|| ListError::Protocol("empty info reply".into()))?;
                let body = &data[2..];
                match info {
                    INFO_EXPORT if body.len() == 10 => {
                        let size = u64::from_be_bytes(body[..8].try_into().unwrap_or_default());
                        let flags = u16::from_be_bytes([body[8], body[9]]);
                        export.size_and_flags = Some((size, flags));
                    }
                    INFO_DESCRIPTION => {
                        let text = String::from_utf8_lossy(body).into_owned();
                        export.description = (!text.is_empty()).then_some(text);
                    }
                    INFO_BLOCK_SIZE if body.len() == 12 => {
                        let word = |i: usize| {
                            u32::from_be_bytes(body[i..i + 4].try_into().unwrap_or_default())
                        };
                        export.block_sizes = Some((word(0), word(4), word(8)));
                    }
                    // Other information (a canonical name) is not listed.
                    _ => {}
                }
            }
            kind if kind & (1 << 31) != 0 => return Ok(()),
            kind => return Err(unexpected(OPT_INFO, kind)),
        }
    }
}

/// `NBD_OPT_LIST_META_CONTEXT` with no queries: every context the export offers.
fn list_contexts(channel: &mut dyn Channel, name: &str) -> Result<Vec<String>, ListError> {
    let mut data = name_data(name);
    data.extend_from_slice(&0u32.to_be_bytes());
    send_option(channel, OPT_LIST_META_CONTEXT, &data)?;
    let mut contexts = Vec::new();
    loop {
        let (kind, data) = read_reply(channel, OPT_LIST_META_CONTEXT)?;
        match kind {
            REP_ACK => return Ok(contexts),
            REP_META_CONTEXT if data.len() >= 4 => {
                if contexts.len() < MAX_CONTEXTS {
                    contexts.push(String::from_utf8_lossy(&data[4..]).into_owned());
                }
            }
            kind if kind & (1 << 31) != 0 => return Ok(contexts),
            kind => return Err(unexpected(OPT_LIST_META_CONTEXT, kind)),
        }
    }
}

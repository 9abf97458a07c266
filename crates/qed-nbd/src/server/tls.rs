//! TLS after `NBD_OPT_STARTTLS`: the credentials (a qemu-style directory of PEM files) and a
//! TLS session shared by a connection's reader and writer threads.
//!
//! One rustls connection object holds both directions, so it sits behind a mutex that is never
//! held while blocking on the socket: the reader reads ciphertext without it, then feeds it in;
//! the writer encrypts under it. Ciphertext reaches the socket in the order it was produced:
//! whoever drains the connection's output takes the socket's write lock before releasing the
//! connection.

use std::io::{self, ErrorKind, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::stream::Stream;

/// Plaintext bytes encrypted per lock of the session (bounds the ciphertext held at once).
const WRITE_PIECE: usize = 64 * 1024;

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, what.to_string())
}

/// Server credentials from `dir`: `server-cert.pem` (the chain), `server-key.pem`, and with
/// `verify_peer` `ca-cert.pem`, whose certificates client certificates must chain to.
pub fn load_credentials(dir: &Path, verify_peer: bool) -> io::Result<Arc<ServerConfig>> {
    let cert_path = dir.join("server-cert.pem");
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(format!("{}: {e}", cert_path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!("{}: no certificate", cert_path.display())));
    }
    let key_path = dir.join("server-key.pem");
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| invalid(format!("{}: {e}", key_path.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(invalid)?;
    let builder = if verify_peer {
        let ca_path = dir.join("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca_path)
            .map_err(|e| invalid(format!("{}: {e}", ca_path.display())))?
        {
            let cert = cert.map_err(|e| invalid(format!("{}: {e}", ca_path.display())))?;
            roots.add(cert).map_err(invalid)?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(invalid)?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(certs, key).map_err(invalid)?;
    Ok(Arc::new(config))
}

/// One connection's TLS session.
pub struct Session {
    conn: Mutex<ServerConnection>,
    socket_write: Mutex<Stream>,
}

impl Session {
    /// Starts the server side of a TLS session on `socket`; `pending` are bytes already read
    /// from it (the start of the client's handshake).
    pub fn start(
        config: Arc<ServerConfig>,
        socket: &Stream,
        pending: Vec<u8>,
    ) -> io::Result<(Arc<Self>, Reader)> {
        let conn = ServerConnection::new(config).map_err(invalid)?;
        let session = Arc::new(Self {
            conn: Mutex::new(conn),
            socket_write: Mutex::new(socket.try_clone()?),
        });
        let reader = Reader {
            session: Arc::clone(&session),
            socket: socket.try_clone()?,
            pending,
        };
        Ok((session, reader))
    }

    fn lock(&self) -> MutexGuard<'_, ServerConnection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends what the connection has to send, keeping the order in which it was produced.
    fn send_output(&self, mut conn: MutexGuard<'_, ServerConnection>) -> io::Result<()> {
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        if out.is_empty() {
            return Ok(());
        }
        let mut socket = self.socket_write.lock().unwrap_or_else(|e| e.into_inner());
        drop(conn);
        socket.write_all(&out)
    }

    /// Ends the session cleanly (a close_notify alert).
    pub fn close(&self) -> io::Result<()> {
        let mut conn = self.lock();
        conn.send_close_notify();
        self.send_output(conn)
    }

    /// A writer of plaintext into this session.
    pub fn writer(self: &Arc<Self>) -> Writer {
        Writer(Arc::clone(self))
    }
}

/// The reading half: plaintext out of the session.
pub struct Reader {
    session: Arc<Session>,
    socket: Stream,
    /// Ciphertext read from the socket and not yet taken by the session.
    pending: Vec<u8>,
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut conn = self.session.lock();
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if !self.pending.is_empty() {
                    let mut slice = &self.pending[..];
                    let taken = conn.read_tls(&mut slice)?;
                    self.pending.drain(..taken);
                    let processed = conn.process_new_packets();
                    // An alert about a failure goes out before the error is reported.
                    self.session.send_output(conn)?;
                    processed.map_err(invalid)?;
                    continue;
                }
            }
            // Block on the socket without holding the session.
            let mut chunk = vec![0u8; 16 * 1024];
            let n = self.socket.read(&mut chunk)?;
            if n == 0 {
                return Ok(0);
            }
            chunk.truncate(n);
            self.pending = chunk;
        }
    }
}

/// The writing half: plaintext into the session, ciphertext to the socket.
pub struct Writer(Arc<Session>);

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let piece = &buf[..buf.len().min(WRITE_PIECE)];
        let mut conn = self.0.lock();
        let n = conn.writer().write(piece)?;
        self.0.send_output(conn)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

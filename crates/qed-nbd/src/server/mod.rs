//! The NBD server on std threads: a listener (TCP or Unix), per connection a reader and a
//! writer thread, and one pool of workers shared by every connection to run the requests on
//! the image. The only module of the workspace that touches sockets.
//!
//! Memory is bounded: each connection holds at most [`ServerConfig::max_in_flight`] requests
//! and [`ServerConfig::max_in_flight_bytes`] of payload and reply buffers (a request is
//! refused before its buffer is allocated when it exceeds the maximum payload), and at most
//! [`ServerConfig::max_connections`] connections are served at once; the rest wait in the
//! listen queue.

mod budget;
mod buffers;
mod conn;
mod exec;
mod pool;
mod status;
mod stream;
mod tls;

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::export::Export;
use crate::proto::ExportConfig;
use pool::Pool;

pub use exec::{DetectZeroes, Discard};
pub use status::MAX_EXTENTS;
pub use stream::{Endpoint, Listener};
pub use tls::load_credentials;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The export (its size is taken from the image at [`Server::run`]).
    pub export: ExportConfig,
    /// Most connections served at once (`-e`).
    pub max_connections: usize,
    /// Keep serving after the last client leaves (`-t`).
    pub persistent: bool,
    /// What trim does (`--discard`).
    pub discard: Discard,
    /// Zero detection on writes (`--detect-zeroes`).
    pub detect_zeroes: DetectZeroes,
    /// Make every write durable before replying (`--cache writethrough`, `directsync`).
    pub writethrough: bool,
    /// Worker threads shared by every connection.
    pub workers: usize,
    /// Most requests in flight on one connection.
    pub max_in_flight: usize,
    /// Most payload and reply bytes in flight on one connection.
    pub max_in_flight_bytes: usize,
    /// How long a client may take over each read of the handshake.
    pub handshake_timeout: Duration,
    /// At a stop, how long connections may take to send their last replies before their
    /// sockets are closed.
    pub shutdown_grace: Duration,
    /// TLS credentials ([`load_credentials`]); with them every client must start TLS first.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ServerConfig {
    /// Defaults for `export`: one connection, not persistent, trim ignored, 8 workers, 16
    /// requests and 64 MiB in flight per connection, 30 s per handshake read, 30 s to finish
    /// at a stop.
    pub fn new(export: ExportConfig) -> Self {
        Self {
            export,
            max_connections: 1,
            persistent: false,
            discard: Discard::Ignore,
            detect_zeroes: DetectZeroes::Off,
            writethrough: false,
            workers: 8,
            max_in_flight: 16,
            max_in_flight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// Something that happened, for the caller to log (`-v`).
#[derive(Debug)]
pub enum Event {
    /// A client connected.
    Connected {
        /// Who.
        peer: String,
    },
    /// A client's connection ended.
    Disconnected {
        /// Who.
        peer: String,
        /// Why.
        reason: String,
    },
}

/// Asks a running server to stop: it stops accepting, lets every connection finish its
/// requests in flight, and returns from [`Server::run`].
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    wake: Arc<Wake>,
}

impl ShutdownHandle {
    /// Requests the stop; returns at once.
    pub fn shutdown(&self) {
        self.wake.stop.store(true, Ordering::Release);
        self.wake.ring();
    }
}

/// The accept loop's wake-up: a flag and one end of a socket pair it polls.
#[derive(Debug)]
struct Wake {
    stop: AtomicBool,
    bell: Mutex<UnixStream>,
    listen: UnixStream,
}

impl Wake {
    fn new() -> io::Result<Self> {
        let (bell, listen) = UnixStream::pair()?;
        bell.set_nonblocking(true)?;
        listen.set_nonblocking(true)?;
        Ok(Self {
            stop: AtomicBool::new(false),
            bell: Mutex::new(bell),
            listen,
        })
    }

    fn ring(&self) {
        let bell = self.bell.lock().unwrap_or_else(|e| e.into_inner());
        // A full pipe already wakes the loop.
        let _ = (&*bell).write(&[1]);
    }

    fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.listen).read(&mut buf), Ok(n) if n > 0) {}
    }
}

type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// A bound server, ready to run.
pub struct Server {
    listener: Listener,
    config: ServerConfig,
    wake: Arc<Wake>,
    events: Option<EventSink>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What is kept about a running connection: a handle on its socket (to stop its reads at
/// shutdown) and its thread.
struct Running {
    socket: Option<stream::Stream>,
    thread: JoinHandle<()>,
}

impl Server {
    /// Binds `endpoint`.
    pub fn bind(endpoint: &Endpoint, config: ServerConfig) -> io::Result<Self> {
        Self::serve_on(Listener::bind(endpoint)?, config)
    }

    /// Serves on a socket that is already listening (see [`Listener::from_tcp`] and
    /// [`Listener::from_unix`]).
    pub fn serve_on(listener: Listener, mut config: ServerConfig) -> io::Result<Self> {
        // Several connections are offered only when several clients may connect: a client
        // that believes the offer opens more and waits for those a server of one refuses.
        config.export.multi_conn &= config.max_connections > 1;
        Ok(Self {
            listener,
            config,
            wake: Arc::new(Wake::new()?),
            events: None,
        })
    }

    /// The address the server listens on (the port chosen, when bound to port 0).
    pub fn local(&self) -> String {
        self.listener.local()
    }

    /// Calls `sink` for every [`Event`] (from the server's threads).
    pub fn on_event(&mut self, sink: impl Fn(&Event) + Send + Sync + 'static) {
        self.events = Some(Arc::new(sink));
    }

    /// A handle that stops [`Server::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            wake: Arc::clone(&self.wake),
        }
    }

    /// Serves `image` (a [`qed_image::Image`] or a [`crate::export::RawExport`]) until
    /// stopped through a [`ShutdownHandle`], or (unless persistent) until the last client has
    /// left. Every connection has finished, and every reference to `image` the server took is
    /// gone, when it returns; flushing and closing the image is the caller's.
    pub fn run(self, image: Arc<dyn Export>) -> io::Result<()> {
        let mut config = self.config.clone();
        config.export.size = image.size();
        config.export.writable = config.export.writable && image.is_writable();
        let config = Arc::new(config);
        let pool = Arc::new(Pool::new(config.workers)?);
        let active = Arc::new(AtomicUsize::new(0));
        let mut running: Vec<Running> = Vec::new();
        let mut served_any = false;
        let result = loop {
            running.retain(|r| !r.thread.is_finished());
            if self.wake.stop.load(Ordering::Acquire) {
                break Ok(());
            }
            if !config.persistent && served_any && active.load(Ordering::Acquire) == 0 {
                break Ok(());
            }
            let room = active.load(Ordering::Acquire) < config.max_connections;
            let mut fds = vec![PollFd::new(self.wake.listen.as_fd(), PollFlags::POLLIN)];
            if room {
                fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => break Err(io::Error::from(e)),
            }
            let listener_ready = fds
                .get(1)
                .and_then(|fd| fd.revents())
                .is_some_and(|r| !r.is_empty());
            drop(fds);
            self.wake.drain();
            if !listener_ready {
                continue;
            }
            let (stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A connection that failed on its way in (reset, out of descriptors)
                    // must not end the server.
                    self.emit(&Event::Disconnected {
                        peer: "?".into(),
                        reason: format!("accept failed: {e}"),
                    });
                    continue;
                }
            };
            served_any = true;
            active.fetch_add(1, Ordering::AcqRel);
            self.emit(&Event::Connected { peer: peer.clone() });
            let socket = stream.try_clone().ok();
            let thread = {
                let (image, pool, config) =
                    (Arc::clone(&image), Arc::clone(&pool), Arc::clone(&config));
                let (active, wake, events) = (
                    Arc::clone(&active),
                    Arc::clone(&self.wake),
                    self.events.clone(),
                );
                std::thread::Builder::new()
                    .name("nbd-conn".into())
                    .spawn(move || {
                        let end = conn::serve(stream, &image, &pool, &config);
                        if let Some(sink) = &events {
                            sink(&Event::Disconnected {
                                peer,
                                reason: end.to_string(),
                            });
                        }
                        active.fetch_sub(1, Ordering::AcqRel);
                        wake.ring();
                    })
            };
            match thread {
                Ok(thread) => running.push(Running { socket, thread }),
                Err(e) => {
                    active.fetch_sub(1, Ordering::AcqRel);
                    self.emit(&Event::Disconnected {
                        peer: "?".into(),
                        reason: format!("cannot start a thread: {e}"),
                    });
                }
            }
        };
        // Stop reading requests; each connection finishes what it has in flight.
        for r in &running {
            if let Some(s) = &r.socket {
                let _ = s.shutdown(Shutdown::Read);
            }
        }
        // A client that stops reading its replies would hold its writer (and so its reader)
        // forever: after the grace period its socket is closed both ways.
        let deadline = std::time::Instant::now() + config.shutdown_grace;
        while running.iter().any(|r| !r.thread.is_finished())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        for r in &running {
            if let (false, Some(s)) = (r.thread.is_finished(), &r.socket) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        for r in running {
            let _ = r.thread.join();
        }
        result
    }

    fn emit(&self, event: &Event) {
        if let Some(sink) = &self.events {
            sink(event);
        }
    }
}

//! One connection: the handshake, then a reader that decodes requests and hands them to the
//! worker pool, and a writer thread that sends the replies in the order they are ready.

use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

use crate::export::Export;
use crate::proto::consts::EIO;
use crate::proto::{
    check, decode_request, failure, header_len, Action, Command, Handshake, Limits, Negotiated,
    ProtoError, ReplyTo, TlsMode,
};

use super::budget::Budget;
use super::buffers::{fit, Buffers};
use super::exec::{execute, reply_cost, Session};
use super::pool::Pool;
use super::stream::Stream;
use super::tls;
use super::ServerConfig;

/// Why a connection ended.
#[derive(Debug)]
pub enum End {
    /// The client disconnected (`NBD_CMD_DISC`, `NBD_OPT_ABORT` or end of stream).
    Client,
    /// The client broke the protocol.
    Protocol(ProtoError),
    /// A socket error.
    Io(io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client => f.write_str("client disconnected"),
            Self::Protocol(e) => write!(f, "protocol violation: {e}"),
            Self::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        if e.kind() == ErrorKind::UnexpectedEof {
            Self::Client
        } else {
            Self::Io(e)
        }
    }
}

impl From<ProtoError> for End {
    fn from(e: ProtoError) -> Self {
        Self::Protocol(e)
    }
}

/// Runs one connection to its end, then closes its socket (other handles on it, such as the
/// accept loop's, must not keep the client waiting).
pub fn serve(stream: Stream, image: &Arc<dyn Export>, pool: &Pool, config: &ServerConfig) -> End {
    let closer = stream.try_clone();
    let end = match run(stream, image, pool, config) {
        Ok(()) => End::Client,
        Err(e) => e,
    };
    if let Ok(socket) = closer {
        let _ = socket.shutdown(Shutdown::Both);
    }
    end
}

/// Reads of the connection: the socket, or the TLS session on it.
type Input = BufReader<Box<dyn Read + Send>>;
/// Writes of the connection.
type Output = Box<dyn Write + Send>;

/// A connection's byte streams, plain or through TLS.
struct Io {
    socket: Stream,
    reader: Input,
    writer: Output,
    tls: Option<Arc<tls::Session>>,
}

fn run(
    stream: Stream,
    image: &Arc<dyn Export>,
    pool: &Pool,
    config: &ServerConfig,
) -> Result<(), End> {
    stream.set_read_timeout(Some(config.handshake_timeout))?;
    let mut io = Io {
        reader: BufReader::with_capacity(64 * 1024, Box::new(stream.try_clone()?)),
        writer: Box::new(stream.try_clone()?),
        socket: stream,
        tls: None,
    };
    let Some(negotiated) = handshake(&mut io, config)? else {
        if let Some(session) = &io.tls {
            let _ = session.close();
        }
        return Ok(());
    };
    io.socket.set_read_timeout(None)?;
    let (socket, tls) = (io.socket.try_clone()?, io.tls.clone());
    let result = transmission(
        io.reader, io.writer, socket, negotiated, image, pool, config,
    );
    if let Some(session) = tls {
        // NBD_CMD_DISC ends the TLS session before the connection.
        let _ = session.close();
    }
    result
}

/// Runs the handshake, upgrading `io` to TLS when the client starts it; `None` if the client
/// aborted.
fn handshake(io: &mut Io, config: &ServerConfig) -> Result<Option<Negotiated>, End> {
    let mut export = config.export.clone();
    export.tls = if config.tls.is_some() {
        TlsMode::Required
    } else {
        TlsMode::Off
    };
    let mut hs = Handshake::new(export);
    io.writer.write_all(&hs.greeting())?;
    let mut buf = vec![0u8; 4096];
    loop {
        let want = hs.wants().min(buf.len());
        let n = io.reader.read(&mut buf[..want])?;
        if n == 0 {
            return Err(End::Client);
        }
        for action in hs.on_bytes(&buf[..n])? {
            match action {
                Action::Send(bytes) => io.writer.write_all(&bytes)?,
                Action::Abort => return Ok(None),
                Action::StartTls { leftover } => {
                    let Some(credentials) = &config.tls else {
                        // Not offered: the handshake never asks for it then.
                        return Err(End::Client);
                    };
                    // What the client sent past the option starts its TLS handshake.
                    let mut pending = leftover;
                    pending.extend_from_slice(io.reader.buffer());
                    let (session, reader) =
                        tls::Session::start(Arc::clone(credentials), &io.socket, pending)?;
                    io.reader = BufReader::with_capacity(64 * 1024, Box::new(reader));
                    io.writer = Box::new(session.writer());
                    io.tls = Some(session);
                }
                Action::Done(n) => return Ok(Some(n)),
            }
        }
    }
}

/// A reply ready to send, and the budget it gives back once sent.
struct Outgoing {
    bytes: Vec<u8>,
    cost: usize,
}

/// Idle reply and payload buffers a connection keeps for reuse, at most.
const IDLE_BUFFER_BYTES: usize = 8 << 20;

/// The reader's side of the replies: the writer's queue, the budget replies give back once
/// sent, the buffers replies are built in, and whether the client can still be answered.
struct Outbox {
    replies: Sender<Outgoing>,
    budget: Arc<Budget>,
    buffers: Arc<Buffers>,
    /// Set by the writer once a reply could not be sent: nothing more reaches the client.
    lost: Arc<AtomicBool>,
}

impl Outbox {
    fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

fn transmission(
    reader: Input,
    writer: Output,
    socket: Stream,
    negotiated: Negotiated,
    image: &Arc<dyn Export>,
    pool: &Pool,
    config: &ServerConfig,
) -> Result<(), End> {
    let budget = Arc::new(Budget::new(
        config.max_in_flight,
        config.max_in_flight_bytes,
    ));
    // Enough idle buffers for a full window of replies at the usual request sizes.
    let buffers = Arc::new(Buffers::new(IDLE_BUFFER_BYTES));
    let (replies, outgoing) = channel::<Outgoing>();
    let writer_budget = Arc::clone(&budget);
    let writer_buffers = Arc::clone(&buffers);
    let writer_socket = socket;
    let lost = Arc::new(AtomicBool::new(false));
    let writer_lost = Arc::clone(&lost);
    let writer_thread = std::thread::Builder::new()
        .name("nbd-writer".into())
        .spawn(move || {
            let mut writer = writer;
            let mut broken = false;
            for reply in outgoing {
                if !broken && writer.write_all(&reply.bytes).is_err() {
                    // The client is gone: stop the reader too (it may hold many requests
                    // already read, which must not run); keep giving the budget back.
                    broken = true;
                    writer_lost.store(true, Ordering::Release);
                    let _ = writer_socket.shutdown(Shutdown::Both);
                }
                writer_buffers.give(reply.bytes);
                writer_budget.give(reply.cost);
            }
        })?;
    let session = Session {
        mode: negotiated.mode,
        contexts: negotiated.contexts.clone(),
        discard: config.discard,
        detect_zeroes: config.detect_zeroes,
        writethrough: config.writethrough,
    };
    let limits = Limits {
        mode: negotiated.mode,
        size: image.size(),
        writable: config.export.writable,
        max_payload: config.export.block_size.maximum,
        contexts: !negotiated.contexts.is_empty(),
    };
    let mut input = io::Cursor::new(negotiated.leftover).chain(reader);
    let outbox = Outbox {
        replies,
        budget: Arc::clone(&budget),
        buffers,
        lost,
    };
    let result = requests(&mut input, &outbox, &session, &limits, image, pool);
    // Finish what is in flight, then let the writer send it and stop.
    budget.drain();
    drop(outbox);
    let _ = writer_thread.join();
    result
}

/// The error that ends a connection whose replies can no longer be sent.
fn replies_lost() -> End {
    End::Io(io::Error::new(
        ErrorKind::BrokenPipe,
        "replies cannot be sent to the client",
    ))
}

fn requests(
    input: &mut impl Read,
    outbox: &Outbox,
    session: &Session,
    limits: &Limits,
    image: &Arc<dyn Export>,
    pool: &Pool,
) -> Result<(), End> {
    let session = Arc::new(session.clone());
    let mut header = vec![0u8; header_len(limits.mode)];
    loop {
        // Requests the reader has buffered but not started are dropped once the client can
        // no longer be answered (it left, or a stop closed its socket after the grace period).
        if outbox.lost() {
            return Err(replies_lost());
        }
        if !read_header(input, &mut header)? {
            return Ok(());
        }
        let request = decode_request(limits.mode, &header, limits.max_payload)?;
        let refused = check(&request, limits).err();
        if request.command == Command::Disc {
            return Ok(());
        }
        let to = ReplyTo {
            mode: limits.mode,
            cookie: request.cookie,
            offset: request.offset,
        };
        if let Some(error) = refused {
            // Skip a payload we will not use, without holding it.
            io::copy(&mut input.take(request.payload), &mut io::sink())?;
            let mut bytes = Vec::new();
            failure(&mut bytes, to, error, "request refused");
            outbox.budget.take(0);
            let _ = outbox.replies.send(Outgoing { bytes, cost: 0 });
            continue;
        }
        let cost = reply_cost(&request, &session);
        // Waits while the connection has its fill of requests in flight.
        outbox.budget.take(cost);
        if outbox.lost() {
            outbox.budget.give(cost);
            return Err(replies_lost());
        }
        // A buffer only for a payload: taking one for a read would cut it to nothing, and
        // the read reply that reuses it next would have all of it zeroed again.
        let mut payload = Vec::new();
        if request.payload > 0 {
            payload = outbox.buffers.take();
            // Checked against the maximum payload: at most 32 MiB. The socket overwrites
            // every stale byte (or the connection ends).
            fit(&mut payload, request.payload as usize);
            if let Err(e) = input.read_exact(&mut payload) {
                outbox.budget.give(cost);
                return Err(e.into());
            }
        }
        if runs_inline(&request, &outbox.budget) {
            // Nothing else is in flight on this connection (a client at queue depth 1): a
            // short request runs here, saving a hand-off to a worker and back.
            let bytes = run_one(&**image, &session, &request, &payload, &outbox.buffers, to);
            outbox.buffers.give(payload);
            let _ = outbox.replies.send(Outgoing { bytes, cost });
            continue;
        }
        let image = Arc::clone(image);
        let session = Arc::clone(&session);
        let replies = outbox.replies.clone();
        let buffers = Arc::clone(&outbox.buffers);
        pool.submit(move || {
            let bytes = run_one(&*image, &session, &request, &payload, &buffers, to);
            buffers.give(payload);
            let _ = replies.send(Outgoing { bytes, cost });
        });
    }
}

/// Runs one request into a buffer of `buffers`. A panic in the engine must still answer the
/// request (and so give its budget back), or the connection would wait for it forever.
fn run_one(
    image: &dyn Export,
    session: &Session,
    request: &crate::proto::Request,
    payload: &[u8],
    buffers: &Buffers,
    to: ReplyTo,
) -> Vec<u8> {
    let out = buffers.take();
    panic::catch_unwind(AssertUnwindSafe(|| {
        execute(image, session, request, payload, out)
    }))
    .unwrap_or_else(|_| {
        let mut bytes = Vec::new();
        failure(&mut bytes, to, EIO, "internal error");
        bytes
    })
}

/// The longest request run on the reader thread when it is the only one in flight.
const INLINE_MAX: u64 = 128 * 1024;

/// Whether `request` (already counted in `budget`) runs on the reader thread: a short read,
/// block status or write without FUA, when no other request of the connection is in flight.
fn runs_inline(request: &crate::proto::Request, budget: &Budget) -> bool {
    use crate::proto::consts::CMD_FLAG_FUA;
    let short = request.length <= INLINE_MAX;
    let quick = match request.command {
        Command::Read | Command::BlockStatus => true,
        Command::Write => !request.has(CMD_FLAG_FUA),
        _ => false,
    };
    short && quick && budget.in_flight().0 == 1
}

/// Reads one header; false at a clean end of stream (before its first byte).
fn read_header(input: &mut impl Read, header: &mut [u8]) -> Result<bool, End> {
    let mut got = 0;
    while got < header.len() {
        match input.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(End::Client),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

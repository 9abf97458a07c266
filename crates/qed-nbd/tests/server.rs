//! The server driven by a small hand-written client over Unix sockets, for what real clients
//! never send: oversized and malformed requests, refused writes, many requests in flight at
//! once, and a stop while requests are running.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use qed_image::storage::MemoryStorage;
use qed_image::{CreateParams, Image, OpenOptions, ZeroFlags};
use qed_nbd::export::{Export, Status};
use qed_nbd::proto::consts::*;
use qed_nbd::proto::{ExportConfig, Mode};
use qed_nbd::server::{Endpoint, Server, ServerConfig, ShutdownHandle};

const SIZE: u64 = 8 << 20;

fn image(writable: bool) -> Arc<Image> {
    let storage = MemoryStorage::new();
    Image::create_on(
        &storage,
        &CreateParams {
            image_size: SIZE,
            cluster_size: 65536,
            table_size: 1,
            backing_file: None,
            backing_raw: false,
        },
    )
    .unwrap();
    let options = if writable {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
    Arc::new(Image::open_storage(Box::new(storage), &options, None).unwrap())
}

struct Running {
    path: PathBuf,
    stop: ShutdownHandle,
    thread: JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

fn serve(image: Arc<Image>, configure: impl FnOnce(&mut ServerConfig)) -> Running {
    serve_export(image, configure)
}

fn serve_export(image: Arc<dyn Export>, configure: impl FnOnce(&mut ServerConfig)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let mut config = ServerConfig::new(ExportConfig::new("", 0));
    config.persistent = true;
    config.max_connections = 4;
    config.export.writable = image.is_writable();
    configure(&mut config);
    let server = Server::bind(&Endpoint::Unix(path.clone()), config).unwrap();
    let stop = server.shutdown_handle();
    let thread = std::thread::spawn(move || server.run(image));
    Running {
        path,
        stop,
        thread,
        _dir: dir,
    }
}

/// An image that counts the reads it serves.
struct Counting {
    image: Arc<Image>,
    reads: AtomicUsize,
}

impl Export for Counting {
    fn size(&self) -> u64 {
        Export::size(&*self.image)
    }
    fn is_writable(&self) -> bool {
        Export::is_writable(&*self.image)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qed_image::Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Export::read_at(&*self.image, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> qed_image::Result<()> {
        Export::write_at(&*self.image, buf, offset, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> qed_image::Result<()> {
        Export::write_zeroes(&*self.image, offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> qed_image::Result<()> {
        Export::discard(&*self.image, offset, len)
    }
    fn flush(&self) -> qed_image::Result<()> {
        Export::flush(&*self.image)
    }
    fn status(
        &self,
        offset: u64,
        len: u64,
        max: usize,
        holes: bool,
    ) -> qed_image::Result<Vec<Status>> {
        Export::status(&*self.image, offset, len, max, holes)
    }
}

/// `n` compact read requests of `len` bytes at 0, as one buffer.
fn reads(n: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..n {
        v.extend(REQUEST_MAGIC.to_be_bytes());
        v.extend(0u16.to_be_bytes());
        v.extend(CMD_READ.to_be_bytes());
        v.extend(i.to_be_bytes());
        v.extend(0u64.to_be_bytes());
        v.extend(len.to_be_bytes());
    }
    v
}

impl Running {
    fn finish(self) {
        self.stop.shutdown();
        self.thread.join().unwrap().unwrap();
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// A minimal NBD client.
struct Client {
    s: UnixStream,
    mode: Mode,
    flags: u16,
}

/// One reply: the error (0 for success) and the chunks (type, payload).
#[derive(Debug)]
struct Reply {
    cookie: u64,
    error: u32,
    chunks: Vec<(u16, Vec<u8>)>,
}

impl Client {
    fn connect(path: &Path, mode: Mode, contexts: &[&str]) -> Self {
        let mut s = UnixStream::connect(path).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        let mut c = Self { s, mode, flags: 0 };
        match mode {
            Mode::Simple => {}
            Mode::Structured => assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[]).0, REP_ACK),
            Mode::Extended => assert_eq!(c.option(OPT_EXTENDED_HEADERS, &[]).0, REP_ACK),
        }
        if !contexts.is_empty() {
            let mut data = vec![0, 0, 0, 0];
            data.extend((contexts.len() as u32).to_be_bytes());
            for q in contexts {
                data.extend((q.len() as u32).to_be_bytes());
                data.extend(q.as_bytes());
            }
            assert_eq!(c.option(OPT_SET_META_CONTEXT, &data).0, REP_ACK);
        }
        let (last, infos) = c.option(OPT_GO, &[0, 0, 0, 0, 0, 0]);
        assert_eq!(last, REP_ACK);
        let export = infos.iter().find(|d| be16(d) == INFO_EXPORT).unwrap();
        assert_eq!(be64(&export[2..]), SIZE);
        c.flags = be16(&export[10..]);
        c
    }

    /// Sends an option; returns the final reply type and the data of the replies before it.
    fn option(&mut self, option: u32, data: &[u8]) -> (u32, Vec<Vec<u8>>) {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend(option.to_be_bytes());
        v.extend((data.len() as u32).to_be_bytes());
        v.extend(data);
        self.s.write_all(&v).unwrap();
        let mut before = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            let kind = be32(&h[12..]);
            let mut d = vec![0u8; be32(&h[16..]) as usize];
            self.s.read_exact(&mut d).unwrap();
            if kind == REP_ACK || kind & (1 << 31) != 0 {
                return (kind, before);
            }
            before.push(d);
        }
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u64, data: &[u8]) {
        let mut v = Vec::new();
        if self.mode == Mode::Extended {
            v.extend(EXTENDED_REQUEST_MAGIC.to_be_bytes());
            v.extend(flags.to_be_bytes());
            v.extend(kind.to_be_bytes());
            v.extend(cookie.to_be_bytes());
            v.extend(offset.to_be_bytes());
            v.extend(len.to_be_bytes());
        } else {
            v.extend(REQUEST_MAGIC.to_be_bytes());
            v.extend(flags.to_be_bytes());
            v.extend(kind.to_be_bytes());
            v.extend(cookie.to_be_bytes());
            v.extend(offset.to_be_bytes());
            v.extend((len as u32).to_be_bytes());
        }
        v.extend(data);
        self.s.write_all(&v).unwrap();
    }

    /// Reads one whole reply; `read_len` is the payload a simple read reply carries.
    fn reply(&mut self, read_len: usize) -> Reply {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).unwrap();
        let magic = be32(&magic);
        if magic == SIMPLE_REPLY_MAGIC {
            let mut h = [0u8; 12];
            self.s.read_exact(&mut h).unwrap();
            let error = be32(&h);
            let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
            self.s.read_exact(&mut data).unwrap();
            return Reply {
                cookie: be64(&h[4..]),
                error,
                chunks: vec![(REPLY_TYPE_OFFSET_DATA, data)],
            };
        }
        let mut reply = Reply {
            cookie: 0,
            error: 0,
            chunks: Vec::new(),
        };
        let mut magic = magic;
        loop {
            let extended = magic == EXTENDED_REPLY_MAGIC;
            assert!(extended || magic == STRUCTURED_REPLY_MAGIC, "{magic:#x}");
            let mut h = vec![0u8; if extended { 28 } else { 16 }];
            self.s.read_exact(&mut h).unwrap();
            let flags = be16(&h);
            let kind = be16(&h[2..]);
            reply.cookie = be64(&h[4..]);
            let len = if extended {
                be64(&h[20..])
            } else {
                u64::from(be32(&h[12..]))
            };
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d).unwrap();
            if kind & (1 << 15) != 0 {
                reply.error = be32(&d);
            }
            reply.chunks.push((kind, d));
            if flags & REPLY_FLAG_DONE != 0 {
                return reply;
            }
            let mut m = [0u8; 4];
            self.s.read_exact(&mut m).unwrap();
            magic = be32(&m);
        }
    }

    /// Reassembles a structured read of `len` bytes at `offset`.
    fn read(&mut self, cookie: u64, offset: u64, len: usize, flags: u16) -> Vec<u8> {
        self.request(flags, CMD_READ, cookie, offset, len as u64, &[]);
        let r = self.reply(len);
        assert_eq!((r.cookie, r.error), (cookie, 0));
        if self.mode == Mode::Simple {
            return r.chunks[0].1.clone();
        }
        let mut out = vec![0xeeu8; len];
        for (kind, d) in r.chunks {
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = (be64(&d) - offset) as usize;
                    out[at..at + d.len() - 8].copy_from_slice(&d[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let at = (be64(&d) - offset) as usize;
                    out[at..at + be32(&d[8..]) as usize].fill(0);
                }
                REPLY_TYPE_NONE => {}
                other => panic!("unexpected chunk {other}"),
            }
        }
        out
    }

    fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0, 0, 0, &[]);
        let mut rest = Vec::new();
        let _ = self.s.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
}

#[test]
fn writes_and_reads_in_every_mode() {
    let served = serve(image(true), |_| {});
    for (i, mode) in [Mode::Simple, Mode::Structured, Mode::Extended]
        .into_iter()
        .enumerate()
    {
        let mut c = Client::connect(&served.path, mode, &[]);
        let offset = i as u64 * 1_000_000 + 123;
        let data: Vec<u8> = (0..100_000u32).map(|x| (x % 251) as u8 + 1).collect();
        c.request(0, CMD_WRITE, 1, offset, data.len() as u64, &data);
        assert_eq!(c.reply(0).error, 0);
        assert_eq!(c.read(2, offset, data.len(), 0), data);
        assert_eq!(c.read(3, offset - 123, 200_000, 0)[123..100_123], data[..]);
        if mode != Mode::Simple {
            assert_eq!(c.read(4, offset, data.len(), CMD_FLAG_DF), data);
        }
        c.request(CMD_FLAG_FUA, CMD_FLUSH, 5, 0, 0, &[]);
        assert_eq!(c.reply(0).error, 0);
        c.disconnect();
    }
    served.finish();
}

#[test]
fn structured_reads_send_holes_for_unallocated_ranges() {
    let served = serve(image(true), |_| {});
    let mut c = Client::connect(&served.path, Mode::Structured, &[]);
    c.request(0, CMD_WRITE, 1, 65536, 65536, &[9; 65536]);
    assert_eq!(c.reply(0).error, 0);
    c.request(0, CMD_READ, 2, 0, 4 * 65536, &[]);
    let r = c.reply(0);
    let kinds: Vec<u16> = r.chunks.iter().map(|c| c.0).collect();
    assert_eq!(
        kinds,
        vec![
            REPLY_TYPE_OFFSET_HOLE,
            REPLY_TYPE_OFFSET_DATA,
            REPLY_TYPE_OFFSET_HOLE,
            REPLY_TYPE_NONE
        ]
    );
    c.disconnect();
    served.finish();
}

#[test]
fn refused_requests_get_their_errors_and_the_connection_goes_on() {
    let served = serve(image(true), |_| {});
    let mut c = Client::connect(&served.path, Mode::Structured, &[]);
    // Past the end: EINVAL for reads, ENOSPC for writes and zero writes.
    c.request(0, CMD_READ, 1, SIZE - 10, 20, &[]);
    assert_eq!(c.reply(0).error, EINVAL);
    c.request(0, CMD_WRITE, 2, SIZE - 10, 20, &[1; 20]);
    assert_eq!(c.reply(0).error, ENOSPC);
    c.request(0, CMD_WRITE_ZEROES, 3, SIZE, 1, &[]);
    assert_eq!(c.reply(0).error, ENOSPC);
    // Unknown command and flag.
    c.request(0, 77, 4, 0, 0, &[]);
    assert_eq!(c.reply(0).error, EINVAL);
    c.request(1 << 12, CMD_READ, 5, 0, 1, &[]);
    assert_eq!(c.reply(0).error, EINVAL);
    // BLOCK_STATUS without contexts.
    c.request(0, CMD_BLOCK_STATUS, 6, 0, 4096, &[]);
    assert_eq!(c.reply(0).error, EINVAL);
    // A read and a write over the 32 MiB maximum: refused, the write's payload skipped.
    c.request(0, CMD_READ, 7, 0, (32 << 20) + 1, &[]);
    assert_eq!(c.reply(0).error, EOVERFLOW);
    let big = vec![0u8; (32 << 20) + 512];
    c.request(0, CMD_WRITE, 8, 0, big.len() as u64, &big);
    assert_eq!(c.reply(0).error, EINVAL);
    // Still in step: a normal request works.
    assert_eq!(c.read(9, 0, 512, 0), vec![0; 512]);
    c.disconnect();
    served.finish();
}

#[test]
fn read_only_exports_refuse_writes_with_eperm() {
    let served = serve(image(false), |c| c.export.writable = false);
    let mut c = Client::connect(&served.path, Mode::Structured, &[]);
    assert_ne!(c.flags & TFLAG_READ_ONLY, 0);
    c.request(0, CMD_WRITE, 1, 0, 512, &[1; 512]);
    assert_eq!(c.reply(0).error, EPERM);
    c.request(0, CMD_TRIM, 2, 0, 65536, &[]);
    assert_eq!(c.reply(0).error, EPERM);
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 65536, &[]);
    assert_eq!(c.reply(0).error, EPERM);
    c.request(0, CMD_FLUSH, 4, 0, 0, &[]);
    assert_eq!(c.reply(0).error, 0);
    c.disconnect();
    served.finish();
}

#[test]
fn a_protocol_violation_closes_only_that_connection() {
    let served = serve(image(true), |_| {});
    let mut good = Client::connect(&served.path, Mode::Structured, &[]);
    let mut bad = Client::connect(&served.path, Mode::Structured, &[]);
    bad.s.write_all(&[0xde; 28]).unwrap();
    let mut rest = Vec::new();
    let _ = bad.s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "closed without a reply");
    // An extended request announcing a payload over the maximum cannot be skipped: closed.
    let mut ext = Client::connect(&served.path, Mode::Extended, &[]);
    ext.request(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, 1 << 40, &[]);
    let _ = ext.s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert_eq!(good.read(1, 0, 4096, 0), vec![0; 4096]);
    good.disconnect();
    served.finish();
}

#[test]
fn many_requests_in_flight_all_get_their_replies() {
    let served = serve(image(true), |c| c.max_in_flight = 4);
    let mut c = Client::connect(&served.path, Mode::Extended, &[]);
    // More requests than the in-flight bound, sent without waiting: the server stops
    // reading while full and every one is answered.
    let n = 64u64;
    let writer = {
        let mut s = c.s.try_clone().unwrap();
        std::thread::spawn(move || {
            for i in 0..n {
                let mut v = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
                v.extend(CMD_FLAG_PAYLOAD_LEN.to_be_bytes());
                v.extend(CMD_WRITE.to_be_bytes());
                v.extend((100 + i).to_be_bytes());
                v.extend((i * 65536).to_be_bytes());
                v.extend(65536u64.to_be_bytes());
                v.extend(vec![i as u8 + 1; 65536]);
                s.write_all(&v).unwrap();
            }
        })
    };
    let mut seen: Vec<u64> = (0..n)
        .map(|_| c.reply(0))
        .map(|r| {
            assert_eq!(r.error, 0);
            r.cookie
        })
        .collect();
    writer.join().unwrap();
    seen.sort_unstable();
    assert_eq!(seen, (100..100 + n).collect::<Vec<_>>());
    for i in 0..n {
        assert_eq!(
            c.read(1000 + i, i * 65536, 65536, 0),
            vec![i as u8 + 1; 65536]
        );
    }
    c.disconnect();
    served.finish();
}

#[test]
fn block_status_reports_both_contexts_and_req_one() {
    let served = serve(image(true), |c| c.export.allocation_depth = true);
    let mut c = Client::connect(
        &served.path,
        Mode::Structured,
        &["base:allocation", "qemu:allocation-depth"],
    );
    c.request(0, CMD_WRITE, 1, 65536, 65536, &[3; 65536]);
    assert_eq!(c.reply(0).error, 0);
    c.request(0, CMD_WRITE_ZEROES, 2, 3 * 65536, 65536, &[]);
    assert_eq!(c.reply(0).error, 0);
    c.request(0, CMD_BLOCK_STATUS, 3, 0, 4 * 65536, &[]);
    let r = c.reply(0);
    assert_eq!(r.error, 0);
    let mut by_id = std::collections::BTreeMap::new();
    for (kind, d) in &r.chunks {
        assert_eq!(*kind, REPLY_TYPE_BLOCK_STATUS);
        let descriptors: Vec<(u32, u32)> =
            d[4..].chunks(8).map(|x| (be32(x), be32(&x[4..]))).collect();
        by_id.insert(be32(d), descriptors);
    }
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        by_id[&0],
        vec![(65536, hz), (65536, 0), (131072, hz)],
        "base:allocation"
    );
    assert_eq!(
        by_id[&1],
        vec![(65536, 0), (65536, 1), (65536, 0), (65536, 1)],
        "qemu:allocation-depth"
    );
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4, 65536, 4096, &[]);
    let r = c.reply(0);
    for (_, d) in &r.chunks {
        assert_eq!(d.len(), 12, "one descriptor");
        assert_eq!(be32(&d[4..]), 4096, "not longer than the request");
    }
    c.disconnect();
    served.finish();
}

#[test]
fn extended_block_status_and_64_bit_zero_writes() {
    let served = serve(image(true), |_| {});
    let mut c = Client::connect(&served.path, Mode::Extended, &["base:allocation"]);
    c.request(0, CMD_WRITE, 1, 0, 65536, &[5; 65536]);
    assert_eq!(c.reply(0).error, 0);
    c.request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 2, 0, SIZE, &[]);
    let r = c.reply(0);
    assert!(r.error == 0 || r.error == ENOTSUP, "{r:?}");
    c.request(0, CMD_WRITE_ZEROES, 3, 0, SIZE, &[]);
    assert_eq!(c.reply(0).error, 0);
    c.request(0, CMD_BLOCK_STATUS, 4, 0, SIZE, &[]);
    let r = c.reply(0);
    let (kind, d) = &r.chunks[0];
    assert_eq!(*kind, REPLY_TYPE_BLOCK_STATUS_EXT);
    assert_eq!(
        be32(&d[4..]),
        ((d.len() - 8) / 16) as u32,
        "descriptor count"
    );
    assert_eq!(c.read(5, 0, 65536, 0), vec![0; 65536]);
    c.disconnect();
    served.finish();
}

#[test]
fn shutdown_does_not_wait_forever_for_a_client_that_reads_nothing() {
    let served = serve(image(true), |c| {
        c.shutdown_grace = std::time::Duration::from_millis(200);
        c.max_in_flight = 2;
    });
    let mut c = Client::connect(&served.path, Mode::Structured, &[]);
    // Large reads whose replies the client never takes: the writer blocks, then the reader.
    let sender = {
        let mut s = c.s.try_clone().unwrap();
        std::thread::spawn(move || {
            for i in 0..64u64 {
                let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
                v.extend(0u16.to_be_bytes());
                v.extend(CMD_READ.to_be_bytes());
                v.extend(i.to_be_bytes());
                v.extend(0u64.to_be_bytes());
                v.extend((4u32 << 20).to_be_bytes());
                if s.write_all(&v).is_err() {
                    return;
                }
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    served.stop.shutdown();
    served.thread.join().unwrap().unwrap();
    sender.join().unwrap();
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
}

#[test]
fn shutdown_lets_requests_in_flight_finish() {
    let served = serve(image(true), |_| {});
    let mut c = Client::connect(&served.path, Mode::Structured, &[]);
    for i in 0..8u64 {
        c.request(0, CMD_WRITE, i, i << 20, 1 << 20, &vec![i as u8; 1 << 20]);
    }
    served.stop.shutdown();
    let mut answered = 0;
    for _ in 0..8 {
        assert_eq!(c.reply(0).error, 0);
        answered += 1;
    }
    assert_eq!(answered, 8);
    served.thread.join().unwrap().unwrap();
}

#[test]
fn writes_on_one_connection_are_seen_and_flushed_from_another() {
    let served = serve(image(true), |_| {});
    let mut a = Client::connect(&served.path, Mode::Structured, &[]);
    let mut b = Client::connect(&served.path, Mode::Extended, &[]);
    assert_ne!(a.flags & TFLAG_CAN_MULTI_CONN, 0);
    a.request(0, CMD_WRITE, 1, 4096, 4096, &[0x3c; 4096]);
    assert_eq!(a.reply(0).error, 0);
    b.request(0, CMD_FLUSH, 2, 0, 0, &[]);
    assert_eq!(b.reply(0).error, 0);
    assert_eq!(b.read(3, 4096, 4096, 0), vec![0x3c; 4096]);
    a.disconnect();
    b.disconnect();
    served.finish();
}

#[test]
fn connections_past_the_limit_wait_for_a_free_slot() {
    let served = serve(image(true), |c| c.max_connections = 1);
    let first = Client::connect(&served.path, Mode::Structured, &[]);
    let mut second = UnixStream::connect(&served.path).unwrap();
    second
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let mut greeting = [0u8; 18];
    let early = second.read(&mut greeting);
    assert!(
        early.is_err(),
        "no greeting while the only slot is taken: {early:?}"
    );
    first.disconnect();
    second
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    second.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    drop(second);
    served.finish();
}

#[test]
fn requests_already_read_are_dropped_once_replies_cannot_be_sent() {
    // Regression: the reader went on running every request left in its 64 KiB buffer after
    // the writer had lost the client, so a client that pipelined thousands of reads and left
    // held its connection (and its -e slot) for thousands of reads nobody would take.
    let counting = Arc::new(Counting {
        image: image(true),
        reads: AtomicUsize::new(0),
    });
    let served = serve_export(counting.clone(), |c| c.max_connections = 1);
    let mut c = Client::connect(&served.path, Mode::Simple, &[]);
    // 2000 requests fit the reader's buffer at once; the replies (1 MiB each) fill the
    // socket after the first one.
    c.s.write_all(&reads(2000, 1 << 20)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(c);
    // The only slot frees once that connection has ended.
    Client::connect(&served.path, Mode::Simple, &[]).disconnect();
    let done = counting.reads.load(Ordering::SeqCst);
    assert!(
        done <= 64,
        "{done} of 2000 reads ran for a client that had left"
    );
    served.finish();
}

#[test]
fn a_stop_past_the_grace_period_drops_the_requests_left_unread() {
    let counting = Arc::new(Counting {
        image: image(true),
        reads: AtomicUsize::new(0),
    });
    let served = serve_export(counting.clone(), |c| {
        c.shutdown_grace = std::time::Duration::from_millis(200);
    });
    let mut c = Client::connect(&served.path, Mode::Simple, &[]);
    c.s.write_all(&reads(2000, 1 << 20)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let start = std::time::Instant::now();
    served.stop.shutdown();
    served.thread.join().unwrap().unwrap();
    let done = counting.reads.load(Ordering::SeqCst);
    assert!(done <= 64, "{done} of 2000 reads ran after the stop");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "the stop took {:?}",
        start.elapsed()
    );
    drop(c);
}

#[test]
fn reads_after_larger_reads_carry_nothing_of_them() {
    // Reply buffers are reused with their old bytes in place: every reply must still be
    // exactly its own, whatever came before it (run inline and on the workers).
    let served = serve(image(true), |_| {});
    let mut c = Client::connect(&served.path, Mode::Simple, &[]);
    let a: Vec<u8> = (0..1_000_000u32).map(|x| (x % 241) as u8 + 1).collect();
    c.request(0, CMD_WRITE, 1, 0, a.len() as u64, &a);
    assert_eq!(c.reply(0).error, 0);
    let b = vec![0x77u8; 5000];
    c.request(0, CMD_WRITE, 2, 2_000_000, b.len() as u64, &b);
    assert_eq!(c.reply(0).error, 0);
    c.disconnect();
    let mut want = vec![0u8; 3 << 20];
    want[..a.len()].copy_from_slice(&a);
    want[2_000_000..2_005_000].copy_from_slice(&b);
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = Client::connect(&served.path, mode, &[]);
        let reads = [
            (0, 1_000_000),
            (1_999_000, 8000),
            (100, 50),
            (0, 3 << 20),
            (1_000_000, 65536),
            (999_000, 200_000),
            (2_004_999, 1),
        ];
        for (i, &(offset, len)) in reads.iter().enumerate() {
            let got = c.read(i as u64 + 10, offset, len, 0);
            assert!(got == want[offset as usize..][..len], "{mode:?}, read {i}");
            if mode != Mode::Simple {
                let got = c.read(i as u64 + 100, offset, len, CMD_FLAG_DF);
                assert!(
                    got == want[offset as usize..][..len],
                    "{mode:?}, DF read {i}"
                );
            }
        }
        c.disconnect();
    }
    served.finish();
}

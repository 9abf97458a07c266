//! Serving one request against the image: the engine call and the reply bytes. Runs on a
//! worker; touches no socket.

use nix::errno::Errno;
use qed_image::{Error, ZeroFlags};

use crate::export::Export;
use crate::proto::consts::*;
use crate::proto::{
    block_status_chunk, chunk_header_len, data_chunk_header, descriptor_len, error_chunk, failure,
    hole_chunk, none_chunk, simple, success, Command, MetaContext, Mode, ReplyTo, Request,
};

use super::buffers::fit;
use super::status::{block_status, read_pieces, MAX_EXTENTS};

/// What `NBD_CMD_TRIM` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discard {
    /// Nothing (the default of qemu-nbd): the request succeeds, the data stays.
    #[default]
    Ignore,
    /// Discard whole clusters (the host range is punched).
    Unmap,
}

/// Whether writes of zeros become zero writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Write them as data.
    #[default]
    Off,
    /// Write them as write-zeroes.
    On,
    /// Write them as write-zeroes that may give space back (with [`Discard::Unmap`]).
    Unmap,
}

/// What one connection negotiated and how its requests are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Request and reply headers.
    pub mode: Mode,
    /// Selected metadata contexts.
    pub contexts: Vec<MetaContext>,
    /// Trim policy.
    pub discard: Discard,
    /// Zero detection on writes.
    pub detect_zeroes: DetectZeroes,
    /// Every write is durable before its reply (as if it carried FUA).
    pub writethrough: bool,
}

/// The NBD error value for an engine error.
pub fn errno(e: &Error) -> u32 {
    match e {
        Error::ReadOnly => EPERM,
        Error::OutOfRange { .. } | Error::InvalidArgument(_) => EINVAL,
        Error::NotFast { .. } => ENOTSUP,
        Error::TooLarge { .. } => ENOMEM,
        Error::Io { source, .. } => {
            let no_space = [Errno::ENOSPC, Errno::EFBIG, Errno::EDQUOT];
            // All three mean "no space" to the client.
            match source.raw_os_error() {
                Some(code) if no_space.iter().any(|&e| e as i32 == code) => ENOSPC,
                _ => EIO,
            }
        }
        Error::Backing { cause, .. } => errno(cause),
        _ => EIO,
    }
}

/// Buffer bytes a request may hold until its reply is written: its payload, or the reply a
/// read or block status builds (data plus chunk headers), or a header.
pub fn reply_cost(request: &Request, session: &Session) -> usize {
    let header = 64;
    let length = usize::try_from(request.length).unwrap_or(usize::MAX);
    match request.command {
        // Chunks describe at least one 4 KiB cluster each (the smallest QED cluster).
        Command::Read => length
            .saturating_add(length / 4096 * (chunk_header_len(session.mode) + 16))
            .saturating_add(2 * header),
        Command::Write => usize::try_from(request.payload)
            .unwrap_or(usize::MAX)
            .saturating_add(header),
        Command::BlockStatus => {
            session.contexts.len() * (MAX_EXTENTS * descriptor_len(session.mode) + header)
        }
        _ => header,
    }
}

/// Serves `request` (already checked) and returns the reply bytes, built in `out` (a buffer
/// from [`super::buffers::Buffers`]: whatever it holds is overwritten or cut off, never sent).
pub fn execute(
    image: &dyn Export,
    session: &Session,
    request: &Request,
    payload: &[u8],
    mut out: Vec<u8>,
) -> Vec<u8> {
    let to = ReplyTo {
        mode: session.mode,
        cookie: request.cookie,
        offset: request.offset,
    };
    if request.command == Command::Read {
        // Builds over the buffer's stale bytes (overwriting them all).
        return read(image, to, request, out);
    }
    out.clear();
    let (offset, length) = (request.offset, request.length);
    let fua = request.has(CMD_FLAG_FUA) || session.writethrough;
    let result = match request.command {
        Command::Read => unreachable!("answered above"),
        Command::BlockStatus => return status(image, session, to, request, out),
        Command::Write => write(image, session, offset, payload, fua),
        Command::WriteZeroes => {
            let flags = ZeroFlags {
                may_unmap: !request.has(CMD_FLAG_NO_HOLE) && session.discard == Discard::Unmap,
                fast_only: request.has(CMD_FLAG_FAST_ZERO),
            };
            image
                .write_zeroes(offset, length, flags)
                .and_then(|()| flush_if(image, fua))
        }
        Command::Trim => match session.discard {
            Discard::Ignore => Ok(()),
            Discard::Unmap => image
                .discard(offset, length)
                .and_then(|()| flush_if(image, fua)),
        },
        Command::Flush => image.flush(),
        Command::Cache => cache(image, offset, length),
        Command::Disc | Command::Unknown(_) => Ok(()),
    };
    match result {
        Ok(()) => success(&mut out, to),
        Err(e) => failure(&mut out, to, errno(&e), &e.to_string()),
    }
    out
}

fn flush_if(image: &dyn Export, fua: bool) -> qed_image::Result<()> {
    if fua {
        image.flush()
    } else {
        Ok(())
    }
}

fn write(
    image: &dyn Export,
    session: &Session,
    offset: u64,
    data: &[u8],
    fua: bool,
) -> qed_image::Result<()> {
    if session.detect_zeroes != DetectZeroes::Off && data.iter().all(|&b| b == 0) {
        let flags = ZeroFlags {
            may_unmap: session.detect_zeroes == DetectZeroes::Unmap
                && session.discard == Discard::Unmap,
            fast_only: false,
        };
        image.write_zeroes(offset, data.len() as u64, flags)?;
        return flush_if(image, fua);
    }
    image.write_at(data, offset, fua)
}

/// A prefetch hint: look up the range's status, which loads a QED image's tables into the
/// cache.
fn cache(image: &dyn Export, offset: u64, length: u64) -> qed_image::Result<()> {
    image.status(offset, length, MAX_EXTENTS, false).map(drop)
}

/// Builds the reply to a read in `out`, a reused buffer whose bytes are stale: its length is
/// set to the reply's first (zeroing only what it lacks), then every byte of the reply is
/// written at its offset: headers, the data the export reads (which fills its whole range),
/// hole chunks. Nothing of an earlier reply is sent again, and the data is not zeroed first.
fn read(image: &dyn Export, to: ReplyTo, request: &Request, mut out: Vec<u8>) -> Vec<u8> {
    // Checked against the maximum payload before it got here.
    let len = request.length as usize;
    let offset = request.offset;
    if to.mode == Mode::Simple {
        fit(&mut out, 16 + len);
        let mut reply = Placer::new(&mut out);
        reply.header(|h| simple(h, to.cookie, 0));
        let result = image.read_at(reply.data(len), offset);
        reply.finish();
        if let Err(e) = result {
            out.clear();
            simple(&mut out, to.cookie, errno(&e));
        }
        return out;
    }
    let fail = |mut out: Vec<u8>, e: Error| {
        out.clear();
        error_chunk(&mut out, to, errno(&e), &e.to_string(), true);
        out
    };
    let pieces = if request.has(CMD_FLAG_DF) || len == 0 {
        // One content chunk: the whole range as data.
        vec![super::status::ReadPiece {
            offset,
            length: len as u64,
            zero: false,
        }]
    } else {
        match read_pieces(image, offset, len as u64) {
            Ok(p) => p,
            Err(e) => return fail(out, e),
        }
    };
    let pieces: Vec<_> = pieces.into_iter().filter(|p| p.length > 0).collect();
    let head = chunk_header_len(to.mode);
    let total = head
        + pieces
            .iter()
            .map(|p| {
                if p.zero {
                    head + 12
                } else {
                    // Pieces lie inside one read, so below the 32-bit maximum payload.
                    head + 8 + p.length as usize
                }
            })
            .sum::<usize>();
    fit(&mut out, total);
    let mut reply = Placer::new(&mut out);
    for p in &pieces {
        if p.zero {
            reply.header(|h| hole_chunk(h, to, p.offset, p.length as u32, false));
        } else {
            reply.header(|h| data_chunk_header(h, to, p.offset, p.length, false));
            if let Err(e) = image.read_at(reply.data(p.length as usize), p.offset) {
                return fail(out, e);
            }
        }
    }
    reply.header(|h| none_chunk(h, to));
    reply.finish();
    out
}

/// Writes a reply front to back over a buffer already at the reply's length.
struct Placer<'a> {
    out: &'a mut [u8],
    at: usize,
    /// Where a header is encoded before it is copied to its place.
    scratch: Vec<u8>,
}

impl<'a> Placer<'a> {
    fn new(out: &'a mut [u8]) -> Self {
        Self {
            out,
            at: 0,
            scratch: Vec::with_capacity(64),
        }
    }

    /// Writes the header `encode` appends at the next offset.
    fn header(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        self.scratch.clear();
        encode(&mut self.scratch);
        let n = self.scratch.len();
        self.out[self.at..self.at + n].copy_from_slice(&self.scratch);
        self.at += n;
    }

    /// The next `n` bytes, for the caller to fill entirely.
    fn data(&mut self, n: usize) -> &mut [u8] {
        let part = &mut self.out[self.at..self.at + n];
        self.at += n;
        part
    }

    /// Checks that the whole buffer was written: a byte left over would be stale. (A
    /// mismatch is a bug; the panic becomes an `EIO` reply.)
    fn finish(self) {
        assert_eq!(self.at, self.out.len(), "a read reply left stale bytes");
    }
}

fn status(
    image: &dyn Export,
    session: &Session,
    to: ReplyTo,
    request: &Request,
    mut out: Vec<u8>,
) -> Vec<u8> {
    let max = if request.has(CMD_FLAG_REQ_ONE) {
        1
    } else {
        MAX_EXTENTS
    };
    let lists = match block_status(
        image,
        request.offset,
        request.length,
        &session.contexts,
        max,
    ) {
        Ok(l) => l,
        Err(e) => {
            failure(&mut out, to, errno(&e), &e.to_string());
            return out;
        }
    };
    if lists.iter().any(|(_, d)| d.is_empty()) {
        // A zero-length query (or one at the very end): nothing to describe.
        failure(&mut out, to, EINVAL, "empty block status range");
        return out;
    }
    let last = lists.len() - 1;
    for (i, (context, descriptors)) in lists.iter().enumerate() {
        block_status_chunk(&mut out, to, context.id(), descriptors, i == last);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::buffers::Buffers;
    use super::*;
    use crate::export::Status;
    use qed_image::storage::MemoryStorage;
    use qed_image::{CreateParams, Image, OpenOptions};

    const K: u64 = 1024;

    /// Data A on [0, 64K), unallocated [64K, 68K), a zero cluster [68K, 72K), data B on
    /// [72K, 192K), unallocated after. No byte of either is 0xEE (the poison).
    fn image() -> Image {
        let storage = MemoryStorage::new();
        Image::create_on(
            &storage,
            &CreateParams {
                image_size: 1 << 20,
                cluster_size: 4096,
                table_size: 1,
                backing_file: None,
                backing_raw: false,
            },
        )
        .unwrap();
        let img = Image::open_storage(Box::new(storage), &OpenOptions::read_write(), None).unwrap();
        let a: Vec<u8> = (0..64 * K).map(|i| (i % 13) as u8 + 1).collect();
        let b: Vec<u8> = (0..120 * K).map(|i| (i % 101) as u8 + 20).collect();
        img.write_at(&a, 0).unwrap();
        img.write_zeroes_at(68 * K, 4 * K).unwrap();
        img.write_at(&b, 72 * K).unwrap();
        img
    }

    /// An export whose reads covering `bad` scribble over half their buffer, then fail.
    struct Failing<'a> {
        image: &'a Image,
        bad: u64,
    }

    impl Export for Failing<'_> {
        fn size(&self) -> u64 {
            Export::size(self.image)
        }
        fn is_writable(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> qed_image::Result<()> {
            if (offset..offset + buf.len() as u64).contains(&self.bad) {
                let half = buf.len() / 2;
                buf[..half].fill(0xab);
                return Err(Error::Io {
                    op: "read",
                    offset,
                    source: std::io::Error::other("injected"),
                });
            }
            Export::read_at(self.image, buf, offset)
        }
        fn write_at(&self, _: &[u8], _: u64, _: bool) -> qed_image::Result<()> {
            Err(Error::ReadOnly)
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> qed_image::Result<()> {
            Err(Error::ReadOnly)
        }
        fn discard(&self, _: u64, _: u64) -> qed_image::Result<()> {
            Err(Error::ReadOnly)
        }
        fn flush(&self) -> qed_image::Result<()> {
            Ok(())
        }
        fn status(
            &self,
            o: u64,
            l: u64,
            max: usize,
            holes: bool,
        ) -> qed_image::Result<Vec<Status>> {
            Export::status(self.image, o, l, max, holes)
        }
    }

    fn session(mode: Mode) -> Session {
        Session {
            mode,
            contexts: Vec::new(),
            discard: Discard::Ignore,
            detect_zeroes: DetectZeroes::Off,
            writethrough: false,
        }
    }

    fn read_request(cookie: u64, offset: u64, length: u64, flags: u16) -> Request {
        Request {
            flags,
            command: Command::Read,
            cookie,
            offset,
            length,
            payload: 0,
        }
    }

    /// No run of 8 poison bytes: a stale byte of the poisoned buffer would show as one.
    fn has_poison(reply: &[u8]) -> bool {
        reply.windows(8).any(|w| w == [0xee; 8])
    }

    #[test]
    fn read_replies_in_reused_buffers_carry_no_stale_byte() {
        let img = image();
        let failing = Failing {
            image: &img,
            bad: 80 * K,
        };
        for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
            let session = session(mode);
            let df = if mode == Mode::Simple { 0 } else { CMD_FLAG_DF };
            // (export, offset, length, flags): larger and smaller in turn, data, holes and a
            // zero cluster, a DF read, an empty one, failures before and after.
            let exports: [&dyn Export; 2] = [&img, &failing];
            let reads = [
                (0, 0, 192 * K, 0),
                (0, 4 * K, 1000, 0),
                (0, 60 * K, 20 * K, 0),
                (0, 64 * K, 8 * K, 0),
                (0, 100 * K, 50 * K, df),
                (0, 0, 0, 0),
                (1, 0, 192 * K, 0),
                (0, 4 * K + 1, 3000, 0),
                (1, 76 * K, 8 * K, df),
                (0, 200 * K, 100 * K, 0),
                (0, 0, 190 * K, df),
                (0, 150 * K, 100 * K, 0),
            ];
            let pool = Buffers::new(8 << 20);
            // The first request reuses a buffer full of poison, larger than any reply.
            pool.give(vec![0xee; 1 << 20]);
            for (i, &(export, offset, length, flags)) in reads.iter().enumerate() {
                let request = read_request(i as u64 + 1, offset, length, flags);
                let export = exports[export];
                let fresh = execute(export, &session, &request, &[], Vec::new());
                let reused = execute(export, &session, &request, &[], pool.take());
                // (Not assert_eq: the replies are up to 192 KiB.)
                assert!(
                    reused == fresh,
                    "{mode:?}, read {i}: differs from a fresh reply"
                );
                assert!(!has_poison(&reused), "{mode:?}, read {i}");
                pool.give(reused);
            }
        }
    }

    #[test]
    fn a_failed_read_sends_only_its_error() {
        let img = image();
        let failing = Failing {
            image: &img,
            bad: 80 * K,
        };
        for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
            let session = session(mode);
            let request = read_request(7, 0, 192 * K, 0);
            let reply = execute(&failing, &session, &request, &[], vec![0xee; 1 << 20]);
            let want = if mode == Mode::Simple {
                16
            } else {
                chunk_header_len(mode) + 6
            };
            // The message follows the error chunk's fixed part.
            assert!(reply.len() >= want && reply.len() < want + 200, "{mode:?}");
            assert!(!has_poison(&reply), "{mode:?}");
            assert!(
                !reply.contains(&0xab),
                "{mode:?}: nothing of the failed read"
            );
        }
    }
}

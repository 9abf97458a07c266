//! Transmission replies: simple replies, structured chunks and extended chunks, appended to a
//! buffer. The mode decides which headers are used; the callers say what to send.

use super::config::Mode;
use super::consts::*;
use super::option::clip;
use super::wire::PutBe;

/// Who a reply answers: the request's cookie and offset (extended chunks echo the offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// Negotiated headers.
    pub mode: Mode,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset.
    pub offset: u64,
}

/// Bytes of a chunk header (before the payload) in `mode`.
pub fn chunk_header_len(mode: Mode) -> usize {
    if mode == Mode::Extended {
        32
    } else {
        20
    }
}

/// A simple reply (no payload follows unless it answers a successful read).
pub fn simple(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// A chunk header announcing `payload` bytes.
pub fn chunk_header(out: &mut Vec<u8>, to: ReplyTo, flags: u16, kind: u16, payload: u64) {
    if to.mode == Mode::Extended {
        out.put_u32(EXTENDED_REPLY_MAGIC);
        out.put_u16(flags);
        out.put_u16(kind);
        out.put_u64(to.cookie);
        out.put_u64(to.offset);
        out.put_u64(payload);
    } else {
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(flags);
        out.put_u16(kind);
        out.put_u64(to.cookie);
        // Payloads are bounded by the maximum payload plus a fixed overhead.
        out.put_u32(u32::try_from(payload).unwrap_or(u32::MAX));
    }
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// A successful reply without payload: simple where allowed, else a final `NONE` chunk.
pub fn success(out: &mut Vec<u8>, to: ReplyTo) {
    if to.mode == Mode::Extended {
        chunk_header(out, to, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
    } else {
        simple(out, to.cookie, 0);
    }
}

/// The final `NONE` chunk of a structured reply.
pub fn none_chunk(out: &mut Vec<u8>, to: ReplyTo) {
    chunk_header(out, to, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
}

/// A failed request: a simple reply with the error, or a final error chunk with a message.
/// `read` says whether it answers a read (which in structured modes must be structured).
pub fn failure(out: &mut Vec<u8>, to: ReplyTo, error: u32, message: &str) {
    if to.mode == Mode::Simple {
        simple(out, to.cookie, error);
    } else {
        error_chunk(out, to, error, message, true);
    }
}

/// An `ERROR` chunk.
pub fn error_chunk(out: &mut Vec<u8>, to: ReplyTo, error: u32, message: &str, done: bool) {
    let message = clip(message.as_bytes());
    chunk_header(
        out,
        to,
        done_flag(done),
        REPLY_TYPE_ERROR,
        6 + message.len() as u64,
    );
    out.put_u32(error);
    out.put_u16(message.len() as u16);
    out.extend_from_slice(message);
}

/// An `OFFSET_HOLE` chunk: `len` zero bytes at `offset`.
pub fn hole_chunk(out: &mut Vec<u8>, to: ReplyTo, offset: u64, len: u32, done: bool) {
    chunk_header(out, to, done_flag(done), REPLY_TYPE_OFFSET_HOLE, 12);
    out.put_u64(offset);
    out.put_u32(len);
}

/// The header of an `OFFSET_DATA` chunk; the caller appends the `len` data bytes.
pub fn data_chunk_header(out: &mut Vec<u8>, to: ReplyTo, offset: u64, len: u64, done: bool) {
    chunk_header(out, to, done_flag(done), REPLY_TYPE_OFFSET_DATA, 8 + len);
    out.put_u64(offset);
}

/// One block status descriptor: a length and its status flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Bytes it covers.
    pub length: u64,
    /// Status flags (meaning per context).
    pub status: u32,
}

/// Bytes one descriptor takes in `mode`.
pub fn descriptor_len(mode: Mode) -> usize {
    if mode == Mode::Extended {
        16
    } else {
        8
    }
}

/// A block status chunk for context `id` (`BLOCK_STATUS`, or `BLOCK_STATUS_EXT` under
/// extended headers). In compact mode lengths must fit 32 bits; the caller clips them.
pub fn block_status_chunk(
    out: &mut Vec<u8>,
    to: ReplyTo,
    id: u32,
    descriptors: &[Descriptor],
    done: bool,
) {
    let n = descriptors.len() as u64;
    if to.mode == Mode::Extended {
        chunk_header(
            out,
            to,
            done_flag(done),
            REPLY_TYPE_BLOCK_STATUS_EXT,
            8 + 16 * n,
        );
        out.put_u32(id);
        out.put_u32(descriptors.len() as u32);
        for d in descriptors {
            out.put_u64(d.length);
            out.put_u64(u64::from(d.status));
        }
    } else {
        chunk_header(out, to, done_flag(done), REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n);
        out.put_u32(id);
        for d in descriptors {
            out.put_u32(u32::try_from(d.length).unwrap_or(u32::MAX));
            out.put_u32(d.status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::Cursor;
    use super::*;

    fn to(mode: Mode) -> ReplyTo {
        ReplyTo {
            mode,
            cookie: 0x1122,
            offset: 4096,
        }
    }

    #[test]
    fn simple_reply_layout() {
        let mut v = Vec::new();
        simple(&mut v, 5, EIO);
        assert_eq!(v.len(), 16);
        let mut c = Cursor::new(&v);
        assert_eq!(c.u32(), Ok(SIMPLE_REPLY_MAGIC));
        assert_eq!(c.u32(), Ok(EIO));
        assert_eq!(c.u64(), Ok(5));
    }

    #[test]
    fn structured_chunk_layout() {
        let mut v = Vec::new();
        hole_chunk(&mut v, to(Mode::Structured), 8192, 512, true);
        let mut c = Cursor::new(&v);
        assert_eq!(c.u32(), Ok(STRUCTURED_REPLY_MAGIC));
        assert_eq!(c.u16(), Ok(REPLY_FLAG_DONE));
        assert_eq!(c.u16(), Ok(REPLY_TYPE_OFFSET_HOLE));
        assert_eq!(c.u64(), Ok(0x1122));
        assert_eq!(c.u32(), Ok(12));
        assert_eq!(c.u64(), Ok(8192));
        assert_eq!(c.u32(), Ok(512));
        assert_eq!(c.remaining(), 0);
    }

    #[test]
    fn extended_chunk_echoes_the_offset_and_has_64_bit_length() {
        let mut v = Vec::new();
        data_chunk_header(&mut v, to(Mode::Extended), 4096, 100, false);
        assert_eq!(v.len(), chunk_header_len(Mode::Extended) + 8);
        let mut c = Cursor::new(&v);
        assert_eq!(c.u32(), Ok(EXTENDED_REPLY_MAGIC));
        assert_eq!(c.u16(), Ok(0));
        assert_eq!(c.u16(), Ok(REPLY_TYPE_OFFSET_DATA));
        assert_eq!(c.u64(), Ok(0x1122));
        assert_eq!(c.u64(), Ok(4096));
        assert_eq!(c.u64(), Ok(108));
    }

    #[test]
    fn success_and_failure_per_mode() {
        let mut v = Vec::new();
        success(&mut v, to(Mode::Structured));
        assert_eq!(v.len(), 16, "simple reply where allowed");
        let mut v = Vec::new();
        success(&mut v, to(Mode::Extended));
        assert_eq!(v.len(), 32, "NONE chunk under extended headers");
        let mut v = Vec::new();
        failure(&mut v, to(Mode::Simple), EPERM, "read-only");
        assert_eq!(v.len(), 16);
        let mut v = Vec::new();
        failure(&mut v, to(Mode::Structured), EPERM, "read-only");
        let mut c = Cursor::new(&v);
        c.take(4).unwrap();
        assert_eq!(c.u16(), Ok(REPLY_FLAG_DONE));
        assert_eq!(c.u16(), Ok(REPLY_TYPE_ERROR));
        c.take(8).unwrap();
        assert_eq!(c.u32(), Ok(6 + 9));
        assert_eq!(c.u32(), Ok(EPERM));
        assert_eq!(c.u16(), Ok(9));
        assert_eq!(c.take(9), Ok(&b"read-only"[..]));
    }

    #[test]
    fn block_status_layouts() {
        let d = [
            Descriptor {
                length: 65536,
                status: STATE_HOLE | STATE_ZERO,
            },
            Descriptor {
                length: 512,
                status: 0,
            },
        ];
        let mut v = Vec::new();
        block_status_chunk(&mut v, to(Mode::Structured), 0, &d, true);
        assert_eq!(v.len(), 20 + 4 + 16);
        let mut v = Vec::new();
        block_status_chunk(&mut v, to(Mode::Extended), 1, &d, false);
        assert_eq!(v.len(), 32 + 8 + 32);
        let mut c = Cursor::new(&v[32..]);
        assert_eq!(c.u32(), Ok(1));
        assert_eq!(c.u32(), Ok(2));
        assert_eq!(c.u64(), Ok(65536));
        assert_eq!(c.u64(), Ok(3));
    }
}

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

/// Serves `request` (already checked) and returns the reply bytes.
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
    out.clear();
    let (offset, length) = (request.offset, request.length);
    let fua = request.has(CMD_FLAG_FUA) || session.writethrough;
    let result = match request.command {
        Command::Read => return read(image, to, request, out),
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

/// Builds the reply to a read in `out` (empty, perhaps with capacity from earlier replies).
fn read(image: &dyn Export, to: ReplyTo, request: &Request, mut out: Vec<u8>) -> Vec<u8> {
    // Checked against the maximum payload before it got here.
    let len = request.length as usize;
    let offset = request.offset;
    if to.mode == Mode::Simple {
        out.reserve_exact(16 + len);
        simple(&mut out, to.cookie, 0);
        out.resize(16 + len, 0);
        if let Err(e) = image.read_at(&mut out[16..], offset) {
            out.clear();
            simple(&mut out, to.cookie, errno(&e));
        }
        return out;
    }
    let fail = |e: Error| {
        let mut out = Vec::new();
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
            Err(e) => return fail(e),
        }
    };
    out.reserve(len + pieces.len() * (chunk_header_len(to.mode) + 16) + 64);
    for p in &pieces {
        if p.length == 0 {
            continue;
        }
        if p.zero {
            // Pieces lie inside one read, so below the 32-bit maximum payload.
            hole_chunk(&mut out, to, p.offset, p.length as u32, false);
        } else {
            data_chunk_header(&mut out, to, p.offset, p.length, false);
            let start = out.len();
            out.resize(start + p.length as usize, 0);
            if let Err(e) = image.read_at(&mut out[start..], p.offset) {
                return fail(e);
            }
        }
    }
    none_chunk(&mut out, to);
    out
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

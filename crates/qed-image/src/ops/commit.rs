//! `commit`: writes what an overlay (and the layers between it and the base) holds into a
//! backing file further down its chain, then empties the overlay.
//!
//! The layers above the base are walked top first by their extents: a range is taken from
//! the first layer that holds it (data, or zeros for a zero cluster or a discarded range), and
//! a range past the end of a layer below the top reads as zeros, as it did for the overlay's
//! guest. Data is read [`IO_BUF_SIZE`] at a time and written into the base; zeros are written
//! only where the base does not read zeros already. Ranges no layer above the base holds are
//! never read. A base smaller than the overlay grows first (what it then reads past its old
//! end, through its own backing file, is zeroed where the overlay read zeros).
//!
//! Order, for crash safety: the base is written, then closed (its data, tables and length
//! flushed, NEED_CHECK cleared), and only then is the overlay emptied
//! ([`Image::make_empty`]). Until the overlay changes, every range it holds reads from it, so
//! its guest view is the same whatever the base holds; once it changes, what it gives up is
//! durable in the base.

use crate::{Error, Image, L2Entry, Result};

use super::disk::Disk;
use super::IO_BUF_SIZE;

/// How to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitOptions {
    /// Empty the overlay once its data is in the base (`qemu-img commit` without `-d`).
    pub empty_overlay: bool,
}

impl Default for CommitOptions {
    fn default() -> Self {
        Self {
            empty_overlay: true,
        }
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Bytes of data written into the base.
    pub copied: u64,
    /// Bytes made zero in the base.
    pub zeroed: u64,
}

/// Why a commit failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The arguments do not fit (no layer to commit, a read-only base).
    #[error("{0}")]
    Invalid(String),
    /// The base could not grow to the overlay's size.
    #[error("could not resize the backing file: {0}")]
    Resize(#[source] Error),
    /// A layer's or the base's block status could not be found.
    #[error("error while reading image metadata at offset {offset}: {source}")]
    Status {
        /// Guest offset.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
    /// A read of a layer failed.
    #[error("error while reading at offset {offset}: {source}")]
    Read {
        /// Guest offset.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
    /// A write into the base failed.
    #[error("error while writing to the backing file at offset {offset}: {source}")]
    Write {
        /// Guest offset.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
    /// Closing the base (making it durable) failed; the overlay was not changed.
    #[error("error while closing the backing file: {0}")]
    Close(#[source] Error),
    /// Emptying the overlay failed (the base holds the data already).
    #[error("error while emptying the image: {0}")]
    Empty(#[source] Error),
}

/// Where a guest range of the overlay's view comes from, above the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Data of the layer at this index.
    Data(usize),
    /// Zeros (a zero cluster, a discarded range, or past the end of a layer).
    Zero,
    /// No layer above the base holds it: the base answers, nothing to do.
    Base,
}

/// Commits `layers` (the overlay first, then each layer down to, not including, the base;
/// only the ranges each holds itself are read, so their own backing layers do not matter)
/// into `base` (open for writing), which is closed here, before the overlay is emptied when
/// `options` say so. `progress(done, total)` follows the overlay's guest bytes (at least once
/// per [`IO_BUF_SIZE`] copied, so a caller can pace the copy from it).
pub fn commit(
    layers: &[&Image],
    base: Disk,
    options: &CommitOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CommitStats, CommitError> {
    let Some(top) = layers.first() else {
        return Err(CommitError::Invalid("nothing to commit".into()));
    };
    if !base.is_writable() {
        return Err(CommitError::Invalid("the backing file is read-only".into()));
    }
    if options.empty_overlay && !top.is_writable() {
        return Err(CommitError::Invalid("the image is read-only".into()));
    }
    let size = top.size();
    let base_size = base.size();
    if base_size < size {
        base.set_size(size).map_err(CommitError::Resize)?;
    }
    let mut stats = CommitStats::default();
    let mut buf = Vec::new();
    progress(0, size);
    let mut pos = 0;
    while pos < size {
        let (end, source) = resolve(layers, base_size, pos, size)?;
        match source {
            Source::Data(k) => {
                let mut at_chunk = |done| progress(done, size);
                copy(
                    layers[k],
                    &base,
                    (pos, end),
                    &mut buf,
                    &mut stats,
                    &mut at_chunk,
                )?;
            }
            Source::Zero => zero(&base, pos, end, &mut stats)?,
            Source::Base => {}
        }
        pos = end;
        progress(pos, size);
    }
    drop(buf);
    // Barrier: the base is durable before the overlay gives anything up.
    base.close().map_err(CommitError::Close)?;
    if options.empty_overlay {
        top.make_empty().map_err(CommitError::Empty)?;
    }
    Ok(stats)
}

/// Where the overlay's view of `[pos, …)` (up to `end`) comes from, and how far that goes.
fn resolve(
    layers: &[&Image],
    base_size: u64,
    pos: u64,
    end: u64,
) -> Result<(u64, Source), CommitError> {
    let mut end = end;
    for (k, layer) in layers.iter().enumerate() {
        if k > 0 {
            if pos >= layer.size() {
                // Past the end of a layer under the overlay: the overlay read zeros.
                return Ok((end, Source::Zero));
            }
            end = end.min(layer.size());
        }
        let extent = layer
            .extents_with_holes(pos, end - pos)
            .next()
            .transpose()
            .map_err(|source| CommitError::Status {
                offset: pos,
                source,
            })?;
        let Some(extent) = extent else {
            return Ok((end, Source::Zero));
        };
        let extent_end = extent.offset + extent.length;
        match extent.kind {
            L2Entry::Data { .. } => return Ok((extent_end, Source::Data(k))),
            L2Entry::Zero => return Ok((extent_end, Source::Zero)),
            L2Entry::Unallocated => end = extent_end,
        }
    }
    if pos >= base_size {
        // Past the base's old end the overlay read zeros.
        return Ok((end, Source::Zero));
    }
    Ok((end.min(base_size), Source::Base))
}

/// Copies the data `layer` holds at `[start, end)` into the base.
fn copy(
    layer: &Image,
    base: &Disk,
    (start, end): (u64, u64),
    buf: &mut Vec<u8>,
    stats: &mut CommitStats,
    progress: &mut dyn FnMut(u64),
) -> Result<(), CommitError> {
    if buf.is_empty() {
        buf.resize(IO_BUF_SIZE, 0);
    }
    let mut at = start;
    while at < end {
        let n = (end - at).min(IO_BUF_SIZE as u64) as usize;
        layer
            .read_at(&mut buf[..n], at)
            .map_err(|source| CommitError::Read { offset: at, source })?;
        base.write_at(&buf[..n], at)
            .map_err(|source| CommitError::Write { offset: at, source })?;
        stats.copied += n as u64;
        at += n as u64;
        progress(at);
    }
    Ok(())
}

/// Makes `[start, end)` of the base read as zeros where it does not already.
fn zero(base: &Disk, start: u64, end: u64, stats: &mut CommitStats) -> Result<(), CommitError> {
    // Each range is zeroed once the walk is past it, so the walk never sees its own writes.
    for status in base.block_status(start, end - start) {
        let status = status.map_err(|source| CommitError::Status {
            offset: start,
            source,
        })?;
        if !status.kind.is_zero() {
            let (offset, len) = (status.offset, status.length);
            base.write_zeroes(offset, len, true)
                .map_err(|source| CommitError::Write { offset, source })?;
            stats.zeroed += len;
        }
    }
    Ok(())
}

//! `rebase`: gives an image another backing file (or none), keeping what the guest reads
//! unless asked not to.
//!
//! A safe rebase walks the clusters the image itself leaves unallocated (the only ones that
//! read from a backing file), and compares what the old backing chain and the new one read
//! there, cluster by cluster, by block status: a range both chains know to read as zeros is
//! never read, and neither is a range that the new backing file holds unchanged in the old
//! chain (rebasing onto a file deeper in the chain). Where the two differ, the old contents
//! are written into the image (zeros as data, as qemu-img writes them), so the guest view stays the same;
//! then the header names the new backing file. An unsafe rebase (`-u`) changes only the
//! header.
//!
//! A crash at any point leaves the old header (the copies are ordinary writes into clusters
//! the image did not use, which read what they read before) or the new one, written only after
//! every copy is durable ([`Image::set_backing`] writes back first).

use std::path::Path;
use std::sync::Arc;

use crate::backing::BackingLayer;
use crate::{Error, Image, L2Entry, NewBacking, Result};

use super::status::BlockStatusIter;
use super::{is_zero, IO_BUF_SIZE};

/// How to rebase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebaseOptions {
    /// Keep the guest view (copy what differs first); `false` is `qemu-img rebase -u`.
    pub safe: bool,
}

impl Default for RebaseOptions {
    fn default() -> Self {
        Self { safe: true }
    }
}

/// What a rebase copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebaseStats {
    /// Bytes of the old backing chain's data written into the image.
    pub copied: u64,
    /// Bytes made zero in the image (the old chain read zeros, the new one does not).
    pub zeroed: u64,
}

/// Why a rebase failed, with the guest offset where it did.
#[derive(Debug, thiserror::Error)]
pub enum RebaseError {
    /// The options do not fit (a safe rebase onto a file that was not opened).
    #[error("{0}")]
    Invalid(String),
    /// The image's or a backing chain's block status could not be found.
    #[error("error while reading image metadata at offset {offset}: {source}")]
    Status {
        /// Guest offset.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
    /// A read of the old backing chain failed.
    #[error("error while reading from old backing file at offset {offset}: {source}")]
    ReadOld {
        /// Guest offset.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
    /// A read of the new backing chain failed.
    #[error("error while reading from new backing file at offset {offset}: {source}")]
    ReadNew {
        /// Guest offset.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
    /// A write into the image failed.
    #[error("error while writing to the image at offset {offset}: {source}")]
    Write {
        /// Guest offset.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
    /// The header could not be changed.
    #[error("could not change the backing file: {0}")]
    Change(#[source] Error),
}

/// Rebases `image` (open for writing, with its current backing chain unless `options` is
/// unsafe) onto `new` (`None`: no backing file). A safe rebase needs `new.layer`, the new
/// backing file opened; `progress(done, total)` follows the guest bytes looked at.
pub fn rebase(
    image: &Image,
    new: Option<NewBacking>,
    options: &RebaseOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RebaseStats, RebaseError> {
    let mut stats = RebaseStats::default();
    let mut new = new;
    if options.safe {
        let layer = match &mut new {
            None => None,
            Some(backing) => match backing.layer.take() {
                Some(layer) => Some(Arc::new(layer)),
                None => {
                    return Err(RebaseError::Invalid(
                        "a safe rebase needs the new backing file opened".into(),
                    ))
                }
            },
        };
        // `run` consumes the copier: its references to the layer are gone after it.
        let result = Copier::new(image, image.backing(), layer.clone()).run(&mut stats, progress);
        if let (Some(backing), Some(layer)) = (&mut new, layer) {
            backing.layer = Arc::try_unwrap(layer).ok();
        }
        result?;
    }
    image.set_backing(new).map_err(RebaseError::Change)?;
    progress(image.size(), image.size());
    Ok(stats)
}

/// What one chain says about a part of a range.
#[derive(Debug, Clone, Copy)]
struct Piece {
    end: u64,
    /// Known to read as zeros.
    zero: bool,
    /// Known to read the same in both chains (held at or below the new backing file's place
    /// in the old chain).
    same: bool,
}

/// What a chain says about `[pos, end)`, piece by piece, lazily: block status up to the
/// chain's end, zeros past it.
struct Pieces {
    statuses: Option<BlockStatusIter<'static>>,
    pos: u64,
    end: u64,
    same_from: Option<usize>,
}

impl Pieces {
    fn new(
        layer: Option<&Arc<BackingLayer>>,
        pos: u64,
        end: u64,
        same_from: Option<usize>,
    ) -> Self {
        Self {
            statuses: layer
                .map(|layer| BlockStatusIter::of_layer(Arc::clone(layer), pos, end - pos, true)),
            pos,
            end,
            same_from,
        }
    }

    fn next(&mut self) -> Result<Piece> {
        if let Some(status) = self.statuses.as_mut().and_then(Iterator::next) {
            let status = status?;
            self.pos = status.offset + status.length;
            return Ok(Piece {
                end: self.pos,
                zero: status.kind.is_zero(),
                same: self.same_from.is_some_and(|d| status.depth >= d),
            });
        }
        // Past the chain's end (or without a chain) it reads zeros.
        self.statuses = None;
        self.pos = self.end;
        Ok(Piece {
            end: self.end,
            zero: true,
            same: false,
        })
    }
}

/// The state of one safe rebase.
struct Copier<'a> {
    image: &'a Image,
    old: Option<Arc<BackingLayer>>,
    new: Option<Arc<BackingLayer>>,
    /// The depth in the old chain (0 = the old backing file) of the new backing file, when it
    /// is part of it: what the old chain reads from there down is the same in both.
    new_in_old: Option<usize>,
    cluster: u64,
    chunk: u64,
    old_buf: Vec<u8>,
    new_buf: Vec<u8>,
}

/// The layers of a chain, top first.
fn chain_layers(top: Option<&Arc<BackingLayer>>) -> Vec<Arc<BackingLayer>> {
    let mut layers = Vec::new();
    let mut next = top.cloned();
    while let Some(layer) = next {
        next = match &*layer {
            BackingLayer::Qed(image) => image.backing(),
            BackingLayer::Raw { .. } => None,
        };
        layers.push(layer);
    }
    layers
}

fn same_file(a: Option<&Path>, b: Option<&Path>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        },
        _ => false,
    }
}

impl<'a> Copier<'a> {
    fn new(
        image: &'a Image,
        old: Option<Arc<BackingLayer>>,
        new: Option<Arc<BackingLayer>>,
    ) -> Self {
        let new_in_old = new.as_ref().and_then(|new| {
            chain_layers(old.as_ref()).iter().position(|layer| {
                layer.format() == new.format() && same_file(layer.path(), new.path())
            })
        });
        let cluster = image.cluster_size();
        let chunk = (IO_BUF_SIZE as u64).max(cluster) / cluster * cluster;
        Self {
            image,
            old,
            new,
            new_in_old,
            cluster,
            chunk,
            old_buf: Vec::new(),
            new_buf: Vec::new(),
        }
    }

    fn run(
        mut self,
        stats: &mut RebaseStats,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), RebaseError> {
        let size = self.image.size();
        progress(0, size);
        if self.new_in_old == Some(0) {
            // The new backing file is the old one: nothing can differ.
            return Ok(());
        }
        let mut pos = 0;
        while pos < size {
            let extent = self
                .image
                .extents(pos, size - pos)
                .next()
                .transpose()
                .map_err(|source| RebaseError::Status {
                    offset: pos,
                    source,
                })?;
            let Some(extent) = extent else { break };
            let end = extent.offset + extent.length;
            if extent.kind == L2Entry::Unallocated {
                self.range(extent.offset, end, stats, &mut |at| progress(at, size))?;
            }
            pos = end;
            progress(pos, size);
        }
        Ok(())
    }

    /// Handles a range the image leaves unallocated: the parts where the chains may differ,
    /// widened to whole clusters and merged, are compared and copied.
    fn range(
        &mut self,
        start: u64,
        end: u64,
        stats: &mut RebaseStats,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), RebaseError> {
        let status = |offset| move |source| RebaseError::Status { offset, source };
        let mut old = Pieces::new(self.old.as_ref(), start, end, self.new_in_old);
        let mut new = Pieces::new(self.new.as_ref(), start, end, None);
        let (mut o, mut n) = (
            old.next().map_err(status(start))?,
            new.next().map_err(status(start))?,
        );
        // The window of whole clusters still to compare.
        let mut window: Option<(u64, u64)> = None;
        let mut pos = start;
        while pos < end {
            let seg_end = o.end.min(n.end).min(end);
            if !(o.same || (o.zero && n.zero)) {
                let a = (pos / self.cluster * self.cluster).max(start);
                let b = seg_end
                    .div_ceil(self.cluster)
                    .saturating_mul(self.cluster)
                    .min(end);
                window = match window {
                    Some((wa, wb)) if a <= wb => Some((wa, wb.max(b))),
                    Some(done) => {
                        self.window(done, stats, progress)?;
                        Some((a, b))
                    }
                    None => Some((a, b)),
                };
            }
            pos = seg_end;
            if pos < end && pos >= o.end {
                o = old.next().map_err(status(pos))?;
            }
            if pos < end && pos >= n.end {
                n = new.next().map_err(status(pos))?;
            }
        }
        if let Some(done) = window {
            self.window(done, stats, progress)?;
        }
        Ok(())
    }

    /// Compares `[a, b)` (whole clusters, or up to the end of the image) in both chains, a
    /// chunk at a time, and copies what differs.
    fn window(
        &mut self,
        (a, b): (u64, u64),
        stats: &mut RebaseStats,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), RebaseError> {
        if self.old_buf.is_empty() {
            self.old_buf = vec![0; self.chunk as usize];
            self.new_buf = vec![0; self.chunk as usize];
        }
        let mut at = a;
        while at < b {
            let to = b.min(at + self.chunk);
            let n = (to - at) as usize;
            read_into(self.old.as_ref(), &mut self.old_buf[..n], at)
                .map_err(|source| RebaseError::ReadOld { offset: at, source })?;
            read_into(self.new.as_ref(), &mut self.new_buf[..n], at)
                .map_err(|source| RebaseError::ReadNew { offset: at, source })?;
            self.write_differences(at, to, stats)?;
            at = to;
            progress(at);
        }
        Ok(())
    }

    /// Writes, cluster by cluster, what the old chain reads where the new one reads something
    /// else (runs of neighbours that need the same action in one request).
    fn write_differences(
        &mut self,
        start: u64,
        end: u64,
        stats: &mut RebaseStats,
    ) -> Result<(), RebaseError> {
        // (start, end, zeros) of the run being gathered.
        let mut run: Option<(u64, u64, bool)> = None;
        let mut x = start;
        while x < end {
            let y = end.min((x / self.cluster + 1) * self.cluster);
            let (a, b) = ((x - start) as usize, (y - start) as usize);
            let action =
                (self.old_buf[a..b] != self.new_buf[a..b]).then(|| is_zero(&self.old_buf[a..b]));
            match (action, &mut run) {
                (Some(zero), Some((_, run_end, run_zero))) if *run_zero == zero => *run_end = y,
                (action, _) => {
                    if let Some(done) = run.take() {
                        self.write_run(start, done, stats)?;
                    }
                    run = action.map(|zero| (x, y, zero));
                }
            }
            x = y;
        }
        if let Some(done) = run {
            self.write_run(start, done, stats)?;
        }
        Ok(())
    }

    fn write_run(
        &self,
        chunk_start: u64,
        (a, b, zero): (u64, u64, bool),
        stats: &mut RebaseStats,
    ) -> Result<(), RebaseError> {
        let write = |source| RebaseError::Write { offset: a, source };
        // Zeros the old chain read are written as data, as qemu-img's rebase writes them: a
        // zero cluster would read the same, but `qemu-img map` of the result (which QEMU's
        // tests compare) would then differ from what qemu-img makes.
        let slice = (a - chunk_start) as usize..(b - chunk_start) as usize;
        self.image
            .write_at(&self.old_buf[slice], a)
            .map_err(write)?;
        if zero {
            stats.zeroed += b - a;
        } else {
            stats.copied += b - a;
        }
        Ok(())
    }
}

/// Fills `buf` with what `layer` reads at `offset` (zeros without a layer, and past its end).
fn read_into(layer: Option<&Arc<BackingLayer>>, buf: &mut [u8], offset: u64) -> Result<()> {
    match layer {
        Some(layer) => layer.read_at(buf, offset),
        None => {
            buf.fill(0);
            Ok(())
        }
    }
}

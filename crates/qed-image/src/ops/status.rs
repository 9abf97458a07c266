//! Block status through a backing chain: for each guest range, which layer answers and what
//! it holds — QEMU's `bdrv_block_status` asked layer by layer, as `qemu-img map` asks it.
//!
//! A QED layer answers from its tables (one table per step, through the extent iterator); a
//! raw layer answers with `SEEK_DATA`/`SEEK_HOLE`, so a hole in a raw file is a zero range. A
//! range a QED layer leaves unallocated is asked of the layer below, unless there is none or
//! the range starts past that layer's end: then it is unallocated (and reads as zeros) at the
//! depth that said so.

use std::path::Path;
use std::sync::Arc;

use qed_format::L2Entry;

use crate::backing::BackingLayer;
use crate::storage::Storage;
use crate::{Error, Image, Result};

use super::disk::{sector_rounded, Disk};
#[cfg(feature = "foreign")]
use super::foreign::ImagoLayer;

/// What a guest range is, as block status says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    /// Data, at `host_offset` in the file of the layer that answered.
    Data {
        /// Host offset of the range's first byte.
        host_offset: u64,
    },
    /// Zeros the layer holds: a zero cluster (no host offset), or a hole in a raw file (with
    /// its host offset). Layers below are hidden.
    Zero {
        /// Host offset, for a hole in a raw file.
        host_offset: Option<u64>,
    },
    /// Data stored compressed (a qcow2 compressed cluster): no host offset.
    Compressed,
    /// No layer holds it: it reads as zeros.
    Unallocated,
}

impl StatusKind {
    /// Whether the range is allocated in the answering layer (qemu-img map's `present`).
    pub fn is_present(self) -> bool {
        !matches!(self, Self::Unallocated)
    }

    /// Whether the range is known to read as zeros (`zero`).
    pub fn is_zero(self) -> bool {
        !self.is_data()
    }

    /// Whether the range holds data (`data`).
    pub fn is_data(self) -> bool {
        matches!(self, Self::Data { .. } | Self::Compressed)
    }

    /// The host offset, where there is one (`offset`).
    pub fn host_offset(self) -> Option<u64> {
        match self {
            Self::Data { host_offset } => Some(host_offset),
            Self::Zero { host_offset } => host_offset,
            Self::Compressed | Self::Unallocated => None,
        }
    }

    /// The same kind `skip` bytes further on.
    fn advanced(self, skip: u64) -> Self {
        match self {
            Self::Data { host_offset } => Self::Data {
                host_offset: host_offset + skip,
            },
            Self::Zero {
                host_offset: Some(h),
            } => Self::Zero {
                host_offset: Some(h + skip),
            },
            other => other,
        }
    }
}

/// A guest range and its block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// The layer that answered: 0 is the disk itself, 1 its backing file, ...
    pub depth: usize,
    /// What the range is.
    pub kind: StatusKind,
}

impl BlockStatus {
    /// Where the range ends.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// Appends `next` if `qemu-img map` would merge the two: same depth and kind, adjacent,
    /// host offsets contiguous where there are some.
    fn absorb(&mut self, next: &BlockStatus) -> bool {
        let joins = self.end() == next.offset
            && self.depth == next.depth
            && match (self.kind.host_offset(), next.kind.host_offset()) {
                (Some(a), Some(b)) => {
                    self.kind.is_data() == next.kind.is_data() && a + self.length == b
                }
                (None, None) => self.kind == next.kind,
                _ => false,
            };
        if joins {
            self.length += next.length;
        }
        joins
    }
}

/// One layer of a chain, as the walk sees it.
pub(crate) enum Layer<'a> {
    /// A QED image.
    Qed(&'a Image),
    /// A raw file and its size (sector-rounded).
    Raw(&'a dyn Storage, u64),
    /// A qcow2 or VMDK layer (without its backing file).
    #[cfg(feature = "foreign")]
    Imago(&'a ImagoLayer),
}

#[derive(Clone)]
enum Node<'a> {
    Disk(&'a Disk),
    Backing(Arc<BackingLayer>),
    #[cfg(feature = "foreign")]
    Imago(&'a ImagoLayer),
}

/// The layers of a disk, top first.
#[derive(Clone)]
pub(crate) struct Chain<'a> {
    nodes: Vec<Node<'a>>,
}

impl<'a> Chain<'a> {
    /// The disk and every backing layer under it.
    pub(crate) fn of_disk(disk: &'a Disk) -> Self {
        #[cfg(feature = "foreign")]
        if let Disk::Foreign(foreign) = disk {
            let nodes = foreign.layers.iter().map(Node::Imago).collect();
            return Self::extend(nodes, foreign.below.clone());
        }
        let below = disk.image().and_then(Image::backing);
        Self::build(Node::Disk(disk), below)
    }

    /// The layers under the top one, if there are any.
    pub(crate) fn without_top(mut self) -> Option<Self> {
        (self.nodes.len() > 1).then(|| {
            self.nodes.remove(0);
            self
        })
    }

    /// A backing layer and every layer under it.
    pub(crate) fn of_layer(layer: Arc<BackingLayer>) -> Self {
        let below = match &*layer {
            BackingLayer::Qed(image) => image.backing(),
            BackingLayer::Raw { .. } => None,
        };
        Self::build(Node::Backing(layer), below)
    }

    fn build(top: Node<'a>, next: Option<Arc<BackingLayer>>) -> Self {
        Self::extend(vec![top], next)
    }

    fn extend(mut nodes: Vec<Node<'a>>, mut next: Option<Arc<BackingLayer>>) -> Self {
        while let Some(layer) = next {
            next = match &*layer {
                BackingLayer::Qed(image) => image.backing(),
                BackingLayer::Raw { .. } => None,
            };
            nodes.push(Node::Backing(layer));
        }
        Self { nodes }
    }

    /// How many layers.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn layer(&self, depth: usize) -> Layer<'_> {
        match &self.nodes[depth] {
            Node::Disk(Disk::Qed(image)) => Layer::Qed(image),
            Node::Disk(disk @ Disk::Raw(raw)) => Layer::Raw(raw.storage(), disk.size()),
            // `of_disk` lists a foreign disk's layers as `Node::Imago`.
            #[cfg(feature = "foreign")]
            Node::Disk(Disk::Foreign(_)) => unreachable!("a foreign disk is never a Node::Disk"),
            Node::Backing(layer) => match &**layer {
                BackingLayer::Qed(image) => Layer::Qed(image),
                BackingLayer::Raw { storage, len, .. } => {
                    Layer::Raw(&**storage, sector_rounded(*len))
                }
            },
            #[cfg(feature = "foreign")]
            Node::Imago(layer) => Layer::Imago(layer),
        }
    }

    /// Reads what the layer at `depth` itself holds at `offset` (a range its block status
    /// calls data).
    pub(crate) fn read_layer(&self, depth: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.nodes[depth] {
            Node::Disk(disk) => disk.read_at(buf, offset),
            // Names its file itself.
            Node::Backing(layer) => layer.read_at(buf, offset),
            #[cfg(feature = "foreign")]
            Node::Imago(layer) => layer
                .read_at(buf, offset)
                .map_err(|e| self.name_error(depth, e)),
        }
    }

    /// The virtual size of the layer at `depth` (raw files rounded up to whole sectors).
    pub(crate) fn size(&self, depth: usize) -> u64 {
        match self.layer(depth) {
            Layer::Qed(image) => image.size(),
            Layer::Raw(_, size) => size,
            #[cfg(feature = "foreign")]
            Layer::Imago(layer) => layer.size(),
        }
    }

    /// The file of the layer at `depth`, if it has one.
    pub(crate) fn path(&self, depth: usize) -> Option<&Path> {
        match &self.nodes[depth] {
            Node::Disk(disk) => disk.path(),
            Node::Backing(layer) => layer.path(),
            #[cfg(feature = "foreign")]
            Node::Imago(layer) => Some(layer.path()),
        }
    }

    /// Says which backing file an error at `depth` comes from.
    fn name_error(&self, depth: usize, error: Error) -> Error {
        match &self.nodes[depth] {
            Node::Disk(_) => error,
            Node::Backing(layer) => layer.name_error(error),
            #[cfg(feature = "foreign")]
            Node::Imago(_) if depth == 0 => error,
            #[cfg(feature = "foreign")]
            Node::Imago(layer) => layer.name_error(depth, error),
        }
    }
}

/// What one layer says about `[pos, …)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    pub(crate) offset: u64,
    pub(crate) length: u64,
    pub(crate) kind: StatusKind,
}

/// Asks layers of a chain, remembering the last answer of each (so a walk looks at each
/// table of each layer about once).
pub(crate) struct Resolver<'a> {
    pub(crate) chain: Chain<'a>,
    memo: Vec<Option<Piece>>,
    /// Data whose host range is a hole in the layer's file is reported as zeros.
    holes: bool,
    /// Answers of QED layers end at L2-table boundaries, as QEMU's driver cuts them.
    cut_at_tables: bool,
}

impl<'a> Resolver<'a> {
    pub(crate) fn new(chain: Chain<'a>, holes: bool, cut_at_tables: bool) -> Self {
        let memo = vec![None; chain.len()];
        Self {
            chain,
            memo,
            holes,
            cut_at_tables,
        }
    }

    /// What the layer at `depth` alone says about the range from `pos` (ending at or before
    /// `end`, which lies inside the layer).
    pub(crate) fn piece(&mut self, depth: usize, pos: u64, end: u64) -> Result<Piece> {
        if let Some(m) = self.memo[depth] {
            if m.offset <= pos && pos < m.offset + m.length {
                return Ok(Piece {
                    offset: pos,
                    length: (m.offset + m.length).min(end) - pos,
                    kind: m.kind.advanced(pos - m.offset),
                });
            }
        }
        let found = self
            .ask(depth, pos, end)
            .map_err(|e| self.chain.name_error(depth, e))?;
        self.memo[depth] = Some(found);
        Ok(found)
    }

    fn ask(&self, depth: usize, pos: u64, end: u64) -> Result<Piece> {
        match self.chain.layer(depth) {
            Layer::Raw(storage, _) => raw_piece(storage, pos, end),
            #[cfg(feature = "foreign")]
            Layer::Imago(layer) => {
                let found = layer.status(pos, end)?;
                Ok(Piece {
                    offset: pos,
                    length: found.length,
                    kind: found.kind,
                })
            }
            Layer::Qed(image) => {
                let end = if self.cut_at_tables {
                    let coverage = image.geometry().l2_coverage();
                    end.min((pos | (coverage - 1)).saturating_add(1))
                } else {
                    end
                };
                let found = if self.holes {
                    image.extents_with_holes(pos, end - pos).next()
                } else {
                    image.extents(pos, end - pos).next()
                };
                let extent = match found {
                    Some(extent) => extent?,
                    // Past the image's end: callers do not ask there; say unallocated.
                    None => {
                        return Ok(Piece {
                            offset: pos,
                            length: end.saturating_sub(pos).max(1),
                            kind: StatusKind::Unallocated,
                        })
                    }
                };
                let kind = match extent.kind {
                    L2Entry::Data { host_offset } => StatusKind::Data { host_offset },
                    L2Entry::Zero => StatusKind::Zero { host_offset: None },
                    L2Entry::Unallocated => StatusKind::Unallocated,
                };
                Ok(Piece {
                    offset: extent.offset,
                    length: extent.length,
                    kind,
                })
            }
        }
    }

    /// Whether a range the layer at `depth` leaves unallocated from `pos` reads as zeros
    /// without asking further: there is no layer below, or it ends at or before `pos`.
    pub(crate) fn zero_below(&self, depth: usize, pos: u64) -> bool {
        depth + 1 >= self.chain.len() || pos >= self.chain.size(depth + 1)
    }

    /// The block status of the range from `pos` (ending at or before `end`, inside the top
    /// layer), walking down the chain as `qemu-img map` does.
    pub(crate) fn resolve(&mut self, pos: u64, end: u64) -> Result<BlockStatus> {
        let mut depth = 0;
        let mut end = end;
        loop {
            let piece = self.piece(depth, pos, end)?;
            if piece.kind != StatusKind::Unallocated || self.zero_below(depth, pos) {
                return Ok(BlockStatus {
                    offset: pos,
                    length: piece.length,
                    depth,
                    kind: piece.kind,
                });
            }
            end = (pos + piece.length).min(self.chain.size(depth + 1));
            depth += 1;
        }
    }
}

/// Reads `buf.len()` guest bytes at `offset` through a chain: each range from the layer that
/// holds it, zeros where none does (or where the holder says zeros).
#[cfg(feature = "foreign")]
pub(crate) fn read_through(chain: Chain<'_>, buf: &mut [u8], offset: u64) -> Result<()> {
    let end = offset + buf.len() as u64;
    let mut resolver = Resolver::new(chain, false, false);
    let mut pos = offset;
    while pos < end {
        let status = resolver.resolve(pos, end)?;
        let a = (pos - offset) as usize;
        let b = a + status.length.min(end - pos) as usize;
        if status.kind.is_data() {
            resolver
                .chain
                .read_layer(status.depth, &mut buf[a..b], pos)?;
        } else {
            buf[a..b].fill(0);
        }
        pos += (b - a) as u64;
    }
    Ok(())
}

/// What a raw file holds from `pos` (ending at or before `end`).
fn raw_piece(storage: &dyn Storage, pos: u64, end: u64) -> Result<Piece> {
    let (data, length) = storage
        .block_status(pos, end - pos)
        .map_err(Error::io("find data", pos))?;
    let length = length.clamp(1, end - pos);
    Ok(Piece {
        offset: pos,
        length,
        kind: if data {
            StatusKind::Data { host_offset: pos }
        } else {
            StatusKind::Zero {
                host_offset: Some(pos),
            }
        },
    })
}

/// Block status of a disk over a guest range, merged as `qemu-img map` merges it; see
/// [`Disk::block_status`].
pub struct BlockStatusIter<'a> {
    resolver: Resolver<'a>,
    pos: u64,
    end: u64,
    pending: Option<BlockStatus>,
    error: Option<Error>,
}

impl Disk {
    /// Block status of `[offset, offset + len)` (clipped to the disk) through the backing
    /// chain, merged as `qemu-img map --output=json` merges it. Lazy: each step looks at one
    /// table per layer (or asks a raw file for its next data or hole).
    pub fn block_status(&self, offset: u64, len: u64) -> BlockStatusIter<'_> {
        self.status_iter(offset, len, false)
    }

    /// Like [`Disk::block_status`], but data whose host range is a hole in its file (a
    /// discarded range) is reported as [`StatusKind::Zero`]: it reads as zeros. QEMU does not
    /// look at the file under a QED data cluster, so `map` does not use this.
    pub fn block_status_with_holes(&self, offset: u64, len: u64) -> BlockStatusIter<'_> {
        self.status_iter(offset, len, true)
    }

    fn status_iter(&self, offset: u64, len: u64, holes: bool) -> BlockStatusIter<'_> {
        let end = offset.saturating_add(len).min(self.size());
        BlockStatusIter {
            resolver: Resolver::new(Chain::of_disk(self), holes, false),
            pos: offset.min(end),
            end,
            pending: None,
            error: None,
        }
    }

    /// The file of each layer, top first (`None` for storage that is not a file).
    pub fn layer_paths(&self) -> Vec<Option<std::path::PathBuf>> {
        let chain = Chain::of_disk(self);
        (0..chain.len())
            .map(|d| chain.path(d).map(Path::to_path_buf))
            .collect()
    }
}

impl<'a> BlockStatusIter<'a> {
    /// A status iterator over a chain.
    pub(crate) fn of_chain(chain: Chain<'a>, offset: u64, len: u64, holes: bool) -> Self {
        let end = offset.saturating_add(len).min(chain.size(0));
        BlockStatusIter {
            resolver: Resolver::new(chain, holes, false),
            pos: offset.min(end),
            end,
            pending: None,
            error: None,
        }
    }

    /// A status iterator over a backing layer and the layers under it.
    pub(crate) fn of_layer(
        layer: Arc<BackingLayer>,
        offset: u64,
        len: u64,
        holes: bool,
    ) -> BlockStatusIter<'static> {
        let chain = Chain::of_layer(layer);
        let end = offset.saturating_add(len).min(chain.size(0));
        BlockStatusIter {
            resolver: Resolver::new(chain, holes, false),
            pos: offset.min(end),
            end,
            pending: None,
            error: None,
        }
    }

    fn step(&mut self) -> Option<Result<BlockStatus>> {
        if self.pos >= self.end {
            return None;
        }
        match self.resolver.resolve(self.pos, self.end) {
            Ok(status) => {
                self.pos = status.end();
                Some(Ok(status))
            }
            Err(e) => {
                self.pos = self.end;
                Some(Err(e))
            }
        }
    }
}

impl Iterator for BlockStatusIter<'_> {
    type Item = Result<BlockStatus>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.error.take() {
            return Some(Err(e));
        }
        let mut current = match self.pending.take() {
            Some(status) => status,
            None => match self.step()? {
                Ok(status) => status,
                Err(e) => return Some(Err(e)),
            },
        };
        loop {
            match self.step() {
                None => return Some(Ok(current)),
                Some(Ok(next)) => {
                    if !current.absorb(&next) {
                        self.pending = Some(next);
                        return Some(Ok(current));
                    }
                }
                Some(Err(e)) => {
                    // What was found first comes first; the error on the next call.
                    self.error = Some(e);
                    return Some(Ok(current));
                }
            }
        }
    }
}

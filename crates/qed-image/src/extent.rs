//! The one answer to "where does guest byte X live?": iterators of extents, for one image and
//! through its backing chain. Both are lazy: each step looks at one table (per layer), so
//! walking a multi-terabyte image holds no list of its extents.
//!
//! Reads, map, convert, compare, commit and NBD block status all walk these iterators.

use qed_format::L2Entry;

use crate::backing::BackingLayer;
use crate::state::Shared;
use crate::{Error, Image, Result, MAX_CHAIN_DEPTH};

/// What backs a guest range in one image: the engine's one validated entry type. For an
/// extent, `Data` names the host offset of the extent's first byte.
pub type ExtentKind = L2Entry;

/// A guest range of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What backs it.
    pub kind: ExtentKind,
}

fn joins(a_offset: u64, a_length: u64, a: L2Entry, b_offset: u64, b: L2Entry) -> bool {
    a_offset + a_length == b_offset
        && match (a, b) {
            (L2Entry::Data { host_offset: x }, L2Entry::Data { host_offset: y }) => {
                x + a_length == y
            }
            (x, y) => x == y,
        }
}

impl Extent {
    /// Appends `next` if it continues this extent (same kind, contiguous host data).
    fn absorb(&mut self, next: &Extent) -> bool {
        let j = joins(self.offset, self.length, self.kind, next.offset, next.kind);
        if j {
            self.length += next.length;
        }
        j
    }
}

/// Extents of one image over a guest range, merged across L2 tables.
pub struct Extents<'a> {
    shared: &'a Shared,
    pos: u64,
    end: u64,
    peeked: Option<Extent>,
    error: Option<Error>,
}

impl Image {
    /// The extents of this image alone over `[offset, offset + len)` (clipped to the disk).
    pub fn extents(&self, offset: u64, len: u64) -> Extents<'_> {
        let end = offset.saturating_add(len).min(self.size());
        Extents {
            shared: &self.shared,
            pos: offset.min(end),
            end,
            peeked: None,
            error: None,
        }
    }

    /// Resolves `[offset, offset + len)` (clipped to the disk) through the whole backing
    /// chain, collected; see [`Image::chain_extents_iter`] for large ranges.
    pub fn chain_extents(&self, offset: u64, len: u64) -> Result<Vec<ChainExtent>> {
        self.chain_extents_iter(offset, len).collect()
    }

    /// Resolves `[offset, offset + len)` (clipped to the disk) through the whole backing
    /// chain, lazily: each step looks at one table per layer, and nothing is collected.
    pub fn chain_extents_iter(&self, offset: u64, len: u64) -> ChainExtents<'_> {
        let end = offset.saturating_add(len).min(self.size());
        ChainExtents {
            image: self,
            pos: offset.min(end),
            end,
            pending: None,
            error: None,
            memo: vec![None; MAX_CHAIN_DEPTH + 2],
        }
    }
}

impl Extents<'_> {
    fn step(&mut self) -> Result<Option<Extent>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let shared = self.shared;
        let _pass = shared.gate.shared();
        let g = shared.geometry;
        let pos = self.pos;
        let coverage = g.l2_coverage();
        let table_end = (pos | (coverage - 1)).saturating_add(1).min(self.end);
        let (run_end, kind) = match shared.l2_table(g.l1_index(pos))? {
            None => (table_end, L2Entry::Unallocated),
            Some(table) => {
                let entry = shared.entry(&table, g.l2_index(pos))?;
                let run_end = shared.run_end(&table, pos, table_end, entry);
                let kind = match entry {
                    L2Entry::Data { host_offset } => L2Entry::Data {
                        host_offset: host_offset + g.offset_in_cluster(pos),
                    },
                    other => other,
                };
                (run_end, kind)
            }
        };
        self.pos = run_end;
        Ok(Some(Extent {
            offset: pos,
            length: run_end - pos,
            kind,
        }))
    }
}

impl Iterator for Extents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.error.take() {
            return Some(Err(e));
        }
        let mut current = match self.peeked.take() {
            Some(e) => e,
            None => match self.step() {
                Ok(Some(e)) => e,
                Ok(None) => return None,
                Err(e) => {
                    self.pos = self.end;
                    return Some(Err(e));
                }
            },
        };
        loop {
            match self.step() {
                Ok(Some(next)) => {
                    if !current.absorb(&next) {
                        self.peeked = Some(next);
                        return Some(Ok(current));
                    }
                }
                Ok(None) => return Some(Ok(current)),
                Err(e) => {
                    // Report what was found first; the error comes on the next call.
                    self.pos = self.end;
                    self.error = Some(e);
                    return Some(Ok(current));
                }
            }
        }
    }
}

/// Extents of one image in which data whose host bytes are a hole in the image file (space
/// given back by a discard) shows as [`ExtentKind::Zero`]; see [`Image::extents_with_holes`].
pub struct HoleAwareExtents<'a> {
    extents: Extents<'a>,
    /// The part of a data extent not yet split.
    rest: Option<Extent>,
}

impl Image {
    /// Like [`Image::extents`], but data ranges whose host bytes are a hole in the image file
    /// come out as [`ExtentKind::Zero`]: they read as zeros and hide the backing layer, as zero
    /// clusters do (the file system is asked with SEEK_DATA/SEEK_HOLE; a storage that cannot
    /// tell reports everything as data).
    pub fn extents_with_holes(&self, offset: u64, len: u64) -> HoleAwareExtents<'_> {
        HoleAwareExtents {
            extents: self.extents(offset, len),
            rest: None,
        }
    }
}

impl HoleAwareExtents<'_> {
    /// Splits the first piece off a data extent: a hole, or data up to the next hole.
    fn split(&mut self, extent: Extent, host: u64) -> Result<Extent> {
        let storage = &*self.extents.shared.storage;
        let host_end = host + extent.length;
        let io = |e| Error::io("find data", host)(e);
        let (length, kind) = match storage.next_data(host).map_err(io)? {
            None => (extent.length, L2Entry::Zero),
            Some(data) if data >= host_end => (extent.length, L2Entry::Zero),
            Some(data) if data > host => (data - host, L2Entry::Zero),
            Some(_) => {
                let hole = storage.next_hole(host).map_err(io)?.min(host_end);
                (hole.max(host + 1) - host, extent.kind)
            }
        };
        let length = length.min(extent.length);
        if length < extent.length {
            self.rest = Some(Extent {
                offset: extent.offset + length,
                length: extent.length - length,
                kind: L2Entry::Data {
                    host_offset: host + length,
                },
            });
        }
        Ok(Extent {
            offset: extent.offset,
            length,
            kind,
        })
    }
}

impl Iterator for HoleAwareExtents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Self::Item> {
        let extent = match self.rest.take() {
            Some(rest) => rest,
            None => match self.extents.next()? {
                Ok(extent) => extent,
                Err(e) => return Some(Err(e)),
            },
        };
        match extent.kind {
            L2Entry::Data { host_offset } => Some(self.split(extent, host_offset)),
            _ => Some(Ok(extent)),
        }
    }
}

/// Where a guest range of a backing chain is resolved: data or zero clusters in the layer at
/// `depth`, or [`L2Entry::Unallocated`] where no layer holds it (zeros).
pub type ChainKind = L2Entry;

/// A guest range resolved through the backing chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainExtent {
    /// Guest byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer that answered: 0 is this image, 1 its backing file, ...; for
    /// [`ChainKind::Unallocated`] the deepest layer looked at.
    pub depth: usize,
    /// What it is; `Data` names the host offset in that layer's file.
    pub kind: ChainKind,
}

/// Extents of a backing chain over a guest range, merged; see [`Image::chain_extents`].
pub struct ChainExtents<'a> {
    image: &'a Image,
    pos: u64,
    end: u64,
    pending: Option<ChainExtent>,
    error: Option<Error>,
    /// The last extent found in each layer, by depth: a later step inside it needs no new
    /// lookup, so every layer is walked once.
    memo: Vec<Option<Extent>>,
}

/// The extent of `image` alone starting at `pos` (ending at or before `end`), from `memo` when
/// the last one found there covers `pos`.
fn layer_extent(
    image: &Image,
    pos: u64,
    end: u64,
    memo: &mut Option<Extent>,
) -> Result<Option<Extent>> {
    if let Some(m) = memo {
        if m.offset <= pos && pos < m.offset + m.length {
            let skip = pos - m.offset;
            let kind = match m.kind {
                L2Entry::Data { host_offset } => L2Entry::Data {
                    host_offset: host_offset + skip,
                },
                other => other,
            };
            return Ok(Some(Extent {
                offset: pos,
                length: (m.offset + m.length).min(end) - pos,
                kind,
            }));
        }
    }
    let found = image.extents(pos, end - pos).next().transpose()?;
    *memo = found;
    Ok(found)
}

/// The chain extent that starts at `pos` in `image` (at `depth`), ending at or before `end`.
fn first_in_image(
    image: &Image,
    pos: u64,
    end: u64,
    depth: usize,
    memo: &mut [Option<Extent>],
) -> Result<ChainExtent> {
    let Some((mine, below)) = memo.split_first_mut() else {
        return Err(Error::Chain(format!(
            "backing chain deeper than {MAX_CHAIN_DEPTH}"
        )));
    };
    let extent = match layer_extent(image, pos, end, mine)? {
        Some(extent) => extent,
        None => {
            // The range lies past the end of this image: nothing holds it.
            return Ok(ChainExtent {
                offset: pos,
                length: end - pos,
                depth,
                kind: L2Entry::Unallocated,
            });
        }
    };
    match extent.kind {
        L2Entry::Unallocated => match image.backing() {
            None => Ok(ChainExtent {
                offset: pos,
                length: extent.length,
                depth,
                kind: L2Entry::Unallocated,
            }),
            Some(layer) => first_in_layer(&layer, pos, pos + extent.length, depth + 1, below),
        },
        kind => Ok(ChainExtent {
            offset: extent.offset,
            length: extent.length,
            depth,
            kind,
        }),
    }
}

fn first_in_layer(
    layer: &BackingLayer,
    pos: u64,
    end: u64,
    depth: usize,
    memo: &mut [Option<Extent>],
) -> Result<ChainExtent> {
    let inside_end = layer.size().clamp(pos, end);
    if inside_end == pos {
        // Past the end of this layer: zeros.
        return Ok(ChainExtent {
            offset: pos,
            length: end - pos,
            depth,
            kind: L2Entry::Unallocated,
        });
    }
    match layer {
        BackingLayer::Raw { .. } => Ok(ChainExtent {
            offset: pos,
            length: inside_end - pos,
            depth,
            kind: L2Entry::Data { host_offset: pos },
        }),
        BackingLayer::Qed(image) => {
            first_in_image(image, pos, inside_end, depth, memo).map_err(|e| layer.name_error(e))
        }
    }
}

impl Iterator for ChainExtents<'_> {
    type Item = Result<ChainExtent>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.error.take() {
            return Some(Err(e));
        }
        let mut current = match self.pending.take() {
            Some(e) => e,
            None if self.pos >= self.end => return None,
            None => match first_in_image(self.image, self.pos, self.end, 0, &mut self.memo) {
                Ok(e) => {
                    self.pos = e.offset + e.length;
                    e
                }
                Err(e) => {
                    self.pos = self.end;
                    return Some(Err(e));
                }
            },
        };
        while self.pos < self.end {
            match first_in_image(self.image, self.pos, self.end, 0, &mut self.memo) {
                Ok(next) => {
                    self.pos = next.offset + next.length;
                    if current.depth == next.depth
                        && joins(
                            current.offset,
                            current.length,
                            current.kind,
                            next.offset,
                            next.kind,
                        )
                    {
                        current.length += next.length;
                    } else {
                        self.pending = Some(next);
                        return Some(Ok(current));
                    }
                }
                Err(e) => {
                    self.pos = self.end;
                    self.error = Some(e);
                    return Some(Ok(current));
                }
            }
        }
        Some(Ok(current))
    }
}

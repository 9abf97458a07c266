//! The one answer to "where does guest byte X live?": an iterator of extents.
//!
//! Reads, map, convert, compare, commit and NBD block status all walk this iterator.

use crate::backing::BackingLayer;
use crate::image::Inner;
use crate::io::Slot;
use crate::{Error, Image, Result};

/// What backs a guest range in one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data clusters, contiguous in the host file from `host_offset`.
    Data {
        /// Host byte offset of the first guest byte of the extent.
        host_offset: u64,
    },
    /// Zero clusters: read as zeros, hide the backing layer.
    Zero,
    /// Not allocated here: read from the backing layer, or zeros without one.
    Unallocated,
}

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

impl Extent {
    fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// Appends `next` if it continues this extent (same kind, contiguous host data).
    fn absorb(&mut self, next: &Extent) -> bool {
        let joins = self.end() == next.offset
            && match (self.kind, next.kind) {
                (ExtentKind::Data { host_offset: a }, ExtentKind::Data { host_offset: b }) => {
                    a + self.length == b
                }
                (a, b) => a == b,
            };
        if joins {
            self.length += next.length;
        }
        joins
    }
}

/// Extents of one image over a guest range, merged across L2 tables.
pub struct Extents<'a> {
    inner: &'a Inner,
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
            inner: &self.inner,
            pos: offset.min(end),
            end,
            peeked: None,
            error: None,
        }
    }
}

impl Extents<'_> {
    fn step(&mut self) -> Result<Option<Extent>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let inner = self.inner;
        let g = inner.geometry;
        let pos = self.pos;
        let coverage = g.l2_coverage();
        let table_end = (pos | (coverage - 1)).saturating_add(1).min(self.end);
        let (run_end, kind) = match inner.l2_table(g.l1_index(pos))? {
            None => (table_end, ExtentKind::Unallocated),
            Some(table) => {
                let slot = inner.slot(&table, g.l2_index(pos))?;
                let run_end = inner.run_end(&table, pos, table_end, slot)?;
                let kind = match slot {
                    Slot::Data(host) => ExtentKind::Data {
                        host_offset: host + g.offset_in_cluster(pos),
                    },
                    Slot::Zero => ExtentKind::Zero,
                    Slot::Unallocated => ExtentKind::Unallocated,
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

/// Where a guest range of a backing chain is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    /// Data in the layer at `depth`; `host_offset` in that layer's file.
    Data {
        /// Host byte offset in the layer's file.
        host_offset: u64,
    },
    /// Zero clusters in the layer at `depth`.
    Zero,
    /// No layer holds it (past the end of every backing layer, or no backing): zeros.
    Unallocated,
}

/// A guest range resolved through the backing chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainExtent {
    /// Guest byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer that answered: 0 is this image, 1 its backing file, ...; for
    /// [`ChainKind::Unallocated`] the number of layers looked through.
    pub depth: usize,
    /// What it is.
    pub kind: ChainKind,
}

impl Image {
    /// Resolves `[offset, offset + len)` through the whole backing chain.
    pub fn chain_extents(&self, offset: u64, len: u64) -> Result<Vec<ChainExtent>> {
        let mut out = Vec::new();
        self.resolve_into(offset, len, 0, &mut out)?;
        Ok(out)
    }

    fn resolve_into(
        &self,
        offset: u64,
        len: u64,
        depth: usize,
        out: &mut Vec<ChainExtent>,
    ) -> Result<()> {
        for extent in self.extents(offset, len) {
            let extent = extent?;
            match extent.kind {
                ExtentKind::Data { host_offset } => push(
                    out,
                    ChainExtent {
                        offset: extent.offset,
                        length: extent.length,
                        depth,
                        kind: ChainKind::Data { host_offset },
                    },
                ),
                ExtentKind::Zero => push(
                    out,
                    ChainExtent {
                        offset: extent.offset,
                        length: extent.length,
                        depth,
                        kind: ChainKind::Zero,
                    },
                ),
                ExtentKind::Unallocated => {
                    resolve_backing(self.backing(), extent.offset, extent.length, depth + 1, out)?
                }
            }
        }
        Ok(())
    }
}

fn resolve_backing(
    backing: Option<&BackingLayer>,
    offset: u64,
    length: u64,
    depth: usize,
    out: &mut Vec<ChainExtent>,
) -> Result<()> {
    let unallocated = |offset, length, depth| ChainExtent {
        offset,
        length,
        depth,
        kind: ChainKind::Unallocated,
    };
    let Some(layer) = backing else {
        push(out, unallocated(offset, length, depth - 1));
        return Ok(());
    };
    let end = offset + length;
    let inside_end = layer.size().clamp(offset, end);
    if inside_end > offset {
        match layer {
            BackingLayer::Raw { .. } => push(
                out,
                ChainExtent {
                    offset,
                    length: inside_end - offset,
                    depth,
                    kind: ChainKind::Data {
                        host_offset: offset,
                    },
                },
            ),
            BackingLayer::Qed(image) => {
                image.resolve_into(offset, inside_end - offset, depth, out)?
            }
        }
    }
    if inside_end < end {
        push(out, unallocated(inside_end, end - inside_end, depth));
    }
    Ok(())
}

fn push(out: &mut Vec<ChainExtent>, next: ChainExtent) {
    if let Some(last) = out.last_mut() {
        let joins = last.offset + last.length == next.offset
            && last.depth == next.depth
            && match (last.kind, next.kind) {
                (ChainKind::Data { host_offset: a }, ChainKind::Data { host_offset: b }) => {
                    a + last.length == b
                }
                (a, b) => a == b,
            };
        if joins {
            last.length += next.length;
            return;
        }
    }
    out.push(next);
}

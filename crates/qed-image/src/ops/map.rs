//! `map`: the entries `qemu-img map --output=json` prints for a guest range.

use crate::Result;

use super::disk::Disk;
use super::status::{BlockStatusIter, StatusKind};

/// One entry of the map, with qemu-img's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// The layer that holds it (0 = the disk itself), or the deepest one asked.
    pub depth: usize,
    /// Allocated in that layer.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Compressed (never, for QED and raw).
    pub compressed: bool,
    /// Host offset in that layer's file, where there is one.
    pub offset: Option<u64>,
}

impl MapEntry {
    fn from_status(offset: u64, length: u64, depth: usize, kind: StatusKind) -> Self {
        Self {
            start: offset,
            length,
            depth,
            present: kind.is_present(),
            zero: kind.is_zero(),
            data: kind.is_data(),
            compressed: false,
            offset: kind.host_offset(),
        }
    }
}

/// The entries of a map; see [`map`].
pub struct MapEntries<'a> {
    statuses: BlockStatusIter<'a>,
    /// The entry printed when the range is empty (qemu-img prints one of length 0).
    empty: Option<MapEntry>,
    started: bool,
}

/// The map of `disk` from `start`, over at most `max_length` bytes (to the end of the disk
/// when `None`), as `qemu-img map --start-offset --max-length --output=json` lists it: entries
/// merged when depth, kind and host contiguity agree. An empty range (a start at or past the
/// end) yields one entry of length 0, as qemu-img prints.
pub fn map(disk: &Disk, start: u64, max_length: Option<u64>) -> MapEntries<'_> {
    let size = disk.size();
    let end = match max_length {
        Some(len) => start.saturating_add(len).min(size),
        None => size,
    };
    MapEntries {
        statuses: disk.block_status(start, end.saturating_sub(start)),
        empty: Some(MapEntry {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        }),
        started: false,
    }
}

impl Iterator for MapEntries<'_> {
    type Item = Result<MapEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.statuses.next() {
            Some(Ok(s)) => {
                self.started = true;
                Some(Ok(MapEntry::from_status(
                    s.offset, s.length, s.depth, s.kind,
                )))
            }
            Some(Err(e)) => {
                self.started = true;
                Some(Err(e))
            }
            None if self.started => None,
            None => {
                self.started = true;
                self.empty.take().map(Ok)
            }
        }
    }
}

//! What an export's status says, in NBD's terms: which parts of a read are holes, and the
//! block status descriptors of `base:allocation` and `qemu:allocation-depth`.

use qed_image::Result;

use crate::export::Export;
use crate::proto::consts::{STATE_HOLE, STATE_ZERO};
use crate::proto::{Descriptor, MetaContext};

/// Most descriptors in one block status chunk (QEMU and the spec's advice stay below 2^20).
pub const MAX_EXTENTS: usize = 65_536;

/// A piece of a read: `zero` pieces read as zeros and are sent as hole chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPiece {
    /// Guest offset.
    pub offset: u64,
    /// Length.
    pub length: u64,
    /// Whether it reads as zeros without reading.
    pub zero: bool,
}

/// The pieces of `[offset, offset + len)`: zeros where the export says so (for QED: no layer
/// holds data, or a zero cluster or punched data on top), data elsewhere, backing data
/// included. Always covers the whole range (a short status leaves data to read).
pub fn read_pieces(export: &dyn Export, offset: u64, len: u64) -> Result<Vec<ReadPiece>> {
    let mut pieces: Vec<ReadPiece> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    for s in export.status(offset, len, MAX_EXTENTS, true)? {
        push_piece(&mut pieces, s.offset, s.length, s.zero);
        pos = s.offset + s.length;
    }
    if pos < end {
        push_piece(&mut pieces, pos, end - pos, false);
    }
    Ok(pieces)
}

fn push_piece(pieces: &mut Vec<ReadPiece>, offset: u64, length: u64, zero: bool) {
    if length == 0 {
        return;
    }
    if let Some(last) = pieces.last_mut() {
        if last.zero == zero && last.offset + last.length == offset {
            last.length += length;
            return;
        }
    }
    pieces.push(ReadPiece {
        offset,
        length,
        zero,
    });
}

fn push(list: &mut Vec<Descriptor>, length: u64, status: u32) {
    if length == 0 {
        return;
    }
    if let Some(last) = list.last_mut() {
        if last.status == status {
            last.length += length;
            return;
        }
    }
    list.push(Descriptor { length, status });
}

/// Descriptors for each of `contexts` over `[offset, offset + len)`, at most `max` per
/// context (fewer covering less of the range when the map is that fragmented).
/// `base:allocation` is `HOLE` and `ZERO` as the export says; `qemu:allocation-depth` is the
/// depth of the layer holding the range (0: none).
pub fn block_status(
    export: &dyn Export,
    offset: u64,
    len: u64,
    contexts: &[MetaContext],
    max: usize,
) -> Result<Vec<(MetaContext, Vec<Descriptor>)>> {
    let want_base = contexts.contains(&MetaContext::BaseAllocation);
    let mut base = Vec::new();
    let mut depth = Vec::new();
    for s in export.status(offset, len, max, want_base)? {
        let flags = if s.hole { STATE_HOLE } else { 0 } | if s.zero { STATE_ZERO } else { 0 };
        push(&mut base, s.length, flags);
        push(&mut depth, s.length, s.depth);
    }
    base.truncate(max);
    depth.truncate(max);
    Ok(contexts
        .iter()
        .map(|&c| match c {
            MetaContext::BaseAllocation => (c, base.clone()),
            MetaContext::AllocationDepth => (c, depth.clone()),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qed_image::storage::MemoryStorage;
    use qed_image::{CreateParams, Image, OpenOptions};

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
        Image::open_storage(Box::new(storage), &OpenOptions::read_write(), None).unwrap()
    }

    #[test]
    fn reads_split_into_data_and_holes() {
        let img = image();
        img.write_at(&[1; 4096], 8192).unwrap();
        img.write_zeroes_at(16384, 4096).unwrap();
        let p = read_pieces(&img, 0, 32768).unwrap();
        assert_eq!(
            p,
            vec![
                ReadPiece {
                    offset: 0,
                    length: 8192,
                    zero: true
                },
                ReadPiece {
                    offset: 8192,
                    length: 4096,
                    zero: false
                },
                ReadPiece {
                    offset: 12288,
                    length: 20480,
                    zero: true
                },
            ]
        );
    }

    #[test]
    fn block_status_of_both_contexts() {
        let img = image();
        img.write_at(&[1; 4096], 4096).unwrap();
        let both = [MetaContext::BaseAllocation, MetaContext::AllocationDepth];
        let s = block_status(&img, 0, 16384, &both, MAX_EXTENTS).unwrap();
        let hz = STATE_HOLE | STATE_ZERO;
        assert_eq!(
            s[0].1,
            vec![
                Descriptor {
                    length: 4096,
                    status: hz
                },
                Descriptor {
                    length: 4096,
                    status: 0
                },
                Descriptor {
                    length: 8192,
                    status: hz
                },
            ]
        );
        assert_eq!(
            s[1].1,
            vec![
                Descriptor {
                    length: 4096,
                    status: 0
                },
                Descriptor {
                    length: 4096,
                    status: 1
                },
                Descriptor {
                    length: 8192,
                    status: 0
                },
            ]
        );
        let one = block_status(&img, 0, 16384, &both[..1], 1).unwrap();
        assert_eq!(one[0].1.len(), 1);
    }
}

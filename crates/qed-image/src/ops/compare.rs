//! `compare`: whether two disks read the same, and the first offset where they do not, by
//! `qemu-img compare`'s rules.
//!
//! Both disks are walked by block status. A range known to read as zeros on both sides is
//! never read; a range known zero on one side is read on the other only, and must be zero
//! there; everything else is read on both sides, [`IO_BUF_SIZE`] at a time, and compared. A
//! mismatch is reported at the start of the first differing 512-byte sector, counted from the
//! start of the range being compared, as qemu-img reports it.
//!
//! Disks of different sizes compare over the common part; then the rest of the larger one
//! must read as zeros ([`CompareOutcome::Identical`] says `size_mismatch`, as qemu-img warns).
//! Strict mode refuses different sizes and also compares the block status itself, flag for
//! flag as QEMU's `bdrv_block_status_above` reports it (so the same offsets are reported).

use std::fmt;

use super::disk::Disk;
use super::status::{Chain, Resolver, StatusKind};
use super::{is_zero, IO_BUF_SIZE, SECTOR};
use crate::Error;

/// How to compare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompareOptions {
    /// Fail on different sizes and on any difference of block status (`qemu-img compare -s`).
    pub strict: bool,
}

/// Which of the two disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first disk given.
    First,
    /// The second disk given.
    Second,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::First => "first",
            Self::Second => "second",
        })
    }
}

/// The verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOutcome {
    /// They read the same. `size_mismatch`: their sizes differ and the larger one reads as
    /// zeros past the smaller one's end.
    Identical {
        /// The sizes differ.
        size_mismatch: bool,
    },
    /// Strict mode: the sizes differ.
    SizeMismatch,
    /// Strict mode: the block status differs at `offset`.
    StatusMismatch {
        /// Guest offset.
        offset: u64,
    },
    /// The contents differ at `offset`. `size_mismatch`: it lies past the end of the smaller
    /// disk (the common part is identical).
    ContentMismatch {
        /// Guest offset (start of the first differing sector).
        offset: u64,
        /// The sizes differ and the common part was identical.
        size_mismatch: bool,
    },
}

/// Why a comparison could not finish.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// The block status of one disk could not be found (qemu-img exits 3).
    #[error("block status of the {side} disk: {error}")]
    Status {
        /// Which disk.
        side: Side,
        /// What failed.
        error: Error,
    },
    /// A read failed (qemu-img exits 4).
    #[error("read of the {side} disk at offset {offset}: {error}")]
    Read {
        /// Which disk.
        side: Side,
        /// Guest offset of the read.
        offset: u64,
        /// What failed.
        error: Error,
    },
}

/// Flags of QEMU's block status, as compared in strict mode.
mod flag {
    pub const DATA: u8 = 1;
    pub const ZERO: u8 = 2;
    pub const OFFSET_VALID: u8 = 4;
    pub const ALLOCATED: u8 = 8;
    pub const EOF: u8 = 16;
}

/// One disk as the comparison walks it.
struct Walker<'a> {
    resolver: Resolver<'a>,
    size: u64,
    strict: bool,
}

impl<'a> Walker<'a> {
    fn new(disk: &'a Disk, strict: bool) -> Self {
        // Strict mode reports what QEMU reports, so it sees what QEMU sees: no holes under
        // data clusters, answers cut at table boundaries (that decides the EOF flag).
        Self {
            resolver: Resolver::new(Chain::of_disk(disk), !strict, strict),
            size: disk.size(),
            strict,
        }
    }

    /// The length of the range from `pos` with one status, and the status.
    fn status(&mut self, pos: u64) -> Result<(u64, u8), Error> {
        if self.strict {
            return self.status_above(pos);
        }
        let status = self.resolver.resolve(pos, self.size)?;
        let flags = if status.kind.is_zero() {
            flag::ZERO
        } else {
            flag::DATA | flag::ALLOCATED
        };
        Ok((status.length, flags))
    }

    /// What one layer's answer means as flags.
    fn layer_flags(&self, kind: StatusKind, depth: usize, pos: u64) -> u8 {
        use flag::*;
        match kind {
            StatusKind::Data { .. } => DATA | OFFSET_VALID | ALLOCATED,
            StatusKind::Compressed => DATA | ALLOCATED,
            StatusKind::Zero {
                host_offset: Some(_),
            } => ZERO | OFFSET_VALID | ALLOCATED,
            StatusKind::Zero { host_offset: None } => ZERO | ALLOCATED,
            StatusKind::Unallocated if self.resolver.zero_below(depth, pos) => ZERO,
            StatusKind::Unallocated => 0,
        }
    }

    /// The status of the whole chain at `pos` as QEMU's `bdrv_block_status_above` gives it:
    /// the first layer that allocates the range answers (without its EOF flag); zeros past the
    /// end of a layer count as allocated there; EOF is set when the range reaches the end of
    /// the top layer (or of the bottom one, when no layer allocates it).
    fn status_above(&mut self, pos: u64) -> Result<(u64, u8), Error> {
        use flag::*;
        let top = self.resolver.piece(0, pos, self.size)?;
        let mut pnum = top.length;
        let mut ret = self.layer_flags(top.kind, 0, pos);
        let eof = (pos + pnum == self.size).then_some(pos + pnum);
        if eof.is_some() {
            ret |= EOF;
        }
        if ret & ALLOCATED != 0 {
            return Ok((pnum, ret));
        }
        let mut bytes = pnum;
        for depth in 1..self.resolver.chain.len() {
            let layer_size = self.resolver.chain.size(depth);
            if pos >= layer_size {
                ret = ZERO | ALLOCATED;
                pnum = bytes;
                break;
            }
            let piece = self
                .resolver
                .piece(depth, pos, (pos + bytes).min(layer_size))?;
            pnum = piece.length;
            let mut flags = self.layer_flags(piece.kind, depth, pos);
            if pos + pnum == layer_size {
                flags |= EOF;
            }
            if flags & ALLOCATED != 0 {
                ret = flags & !EOF;
                break;
            }
            ret = flags;
            bytes = pnum;
        }
        if eof == Some(pos + pnum) {
            ret |= EOF;
        }
        Ok((pnum, ret))
    }
}

/// `chunk_start + i` rounded down to a sector counted from `chunk_start`.
fn sector_of(chunk_start: u64, index: usize) -> u64 {
    chunk_start + (index as u64 / SECTOR) * SECTOR
}

/// The index of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    const BLOCK: usize = 4096;
    a.chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .position(|(x, y)| x != y)
        .and_then(|block| {
            let at = block * BLOCK;
            a[at..]
                .iter()
                .zip(&b[at..])
                .position(|(x, y)| x != y)
                .map(|i| at + i)
        })
}

/// The index of the first byte of `buf` that is not zero.
fn first_nonzero(buf: &[u8]) -> Option<usize> {
    const BLOCK: usize = 4096;
    buf.chunks(BLOCK)
        .position(|block| !is_zero(block))
        .and_then(|block| {
            let at = block * BLOCK;
            buf[at..].iter().position(|&b| b != 0).map(|i| at + i)
        })
}

fn read(disk: &Disk, side: Side, buf: &mut [u8], offset: u64) -> Result<(), CompareError> {
    disk.read_at(buf, offset)
        .map_err(|error| CompareError::Read {
            side,
            offset,
            error,
        })
}

/// Compares `first` and `second`; `progress(done, total)` is called as bytes are covered.
pub fn compare(
    first: &Disk,
    second: &Disk,
    options: &CompareOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CompareOutcome, CompareError> {
    let (size1, size2) = (first.size(), second.size());
    let common = size1.min(size2);
    let total = size1.max(size2);
    progress(0, total);
    if options.strict && size1 != size2 {
        return Ok(CompareOutcome::SizeMismatch);
    }
    let mut walk1 = Walker::new(first, options.strict);
    let mut walk2 = Walker::new(second, options.strict);
    let status_error = |side| move |error| CompareError::Status { side, error };
    let mut buf1 = vec![0u8; IO_BUF_SIZE];
    let mut buf2 = vec![0u8; IO_BUF_SIZE];
    let mut offset = 0;
    while offset < common {
        let (pnum1, status1) = walk1.status(offset).map_err(status_error(Side::First))?;
        let (pnum2, status2) = walk2.status(offset).map_err(status_error(Side::Second))?;
        let mut chunk = pnum1.min(pnum2).min(common - offset);
        if options.strict && status1 != status2 {
            return Ok(CompareOutcome::StatusMismatch { offset });
        }
        let zero1 = status1 & flag::ZERO != 0;
        let zero2 = status2 & flag::ZERO != 0;
        let allocated1 = status1 & flag::ALLOCATED != 0;
        let allocated2 = status2 & flag::ALLOCATED != 0;
        if zero1 && zero2 {
            // Zeros on both sides: nothing to read.
        } else if allocated1 == allocated2 {
            if allocated1 {
                chunk = chunk.min(IO_BUF_SIZE as u64);
                let n = chunk as usize;
                read(first, Side::First, &mut buf1[..n], offset)?;
                read(second, Side::Second, &mut buf2[..n], offset)?;
                if let Some(i) = first_difference(&buf1[..n], &buf2[..n]) {
                    return Ok(CompareOutcome::ContentMismatch {
                        offset: sector_of(offset, i),
                        size_mismatch: false,
                    });
                }
            }
        } else {
            chunk = chunk.min(IO_BUF_SIZE as u64);
            let n = chunk as usize;
            let (disk, side) = if allocated1 {
                (first, Side::First)
            } else {
                (second, Side::Second)
            };
            read(disk, side, &mut buf1[..n], offset)?;
            if let Some(i) = first_nonzero(&buf1[..n]) {
                return Ok(CompareOutcome::ContentMismatch {
                    offset: sector_of(offset, i),
                    size_mismatch: false,
                });
            }
        }
        offset += chunk;
        progress(offset, total);
    }
    if size1 == size2 {
        return Ok(CompareOutcome::Identical {
            size_mismatch: false,
        });
    }
    // The rest of the larger disk must read as zeros.
    let (over, side, mut walk) = if size1 > size2 {
        (first, Side::First, walk1)
    } else {
        (second, Side::Second, walk2)
    };
    while offset < total {
        let (pnum, status) = walk.status(offset).map_err(status_error(side))?;
        let mut chunk = pnum.min(total - offset);
        if status & flag::ALLOCATED != 0 && status & flag::ZERO == 0 {
            chunk = chunk.min(IO_BUF_SIZE as u64);
            let n = chunk as usize;
            read(over, side, &mut buf1[..n], offset)?;
            if let Some(i) = first_nonzero(&buf1[..n]) {
                return Ok(CompareOutcome::ContentMismatch {
                    offset: sector_of(offset, i),
                    size_mismatch: true,
                });
            }
        }
        offset += chunk;
        progress(offset, total);
    }
    Ok(CompareOutcome::Identical {
        size_mismatch: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_found_exactly() {
        let a = vec![0u8; 10_000];
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b), None);
        b[9_999] = 1;
        assert_eq!(first_difference(&a, &b), Some(9_999));
        b[4_096] = 1;
        assert_eq!(first_difference(&a, &b), Some(4_096));
        assert_eq!(first_nonzero(&b), Some(4_096));
        assert_eq!(first_nonzero(&a), None);
        assert_eq!(sector_of(1000, 4_096), 1000 + 4096);
        assert_eq!(sector_of(1024, 1023), 1536);
    }
}

//! A raw file as an export: guest byte N is file byte N. Status comes from the file system's
//! holes (SEEK_DATA/SEEK_HOLE).

use std::path::Path;

use qed_image::storage::{CacheMode, FileOptions, FileStorage, LockMode, Storage};
use qed_image::{Error, Result, ZeroFlags};

use super::{Export, Status};

/// The sector: a probed raw file is served in whole sectors, and its first sector guarded.
const SECTOR: u64 = 512;

/// How images of the formats a prober recognises start: QED, qcow and qcow2, VMDK (sparse
/// extent and descriptor), VDI's signature is at 64 and is not guarded, VHDX, LUKS.
const HEADER_MAGICS: [&[u8]; 6] = [
    b"QED\0",
    b"QFI\xfb",
    b"KDMV",
    b"# Disk DescriptorFile",
    b"vhdxfile",
    b"LUKS\xba\xbe",
];

/// A raw image file. Its size is the file length at open rounded up to whole 512-byte sectors,
/// as QEMU sees it (the partial tail reads as zeros).
///
/// A file whose format was probed rather than named is [`RawExport::probed`]: as QEMU does
/// then, block status is reported in whole sectors, and a write that would make the first
/// sector look like a QED header is refused, so a client cannot turn a raw disk into an image
/// that names host files as its backing file the next time it is probed.
#[derive(Debug)]
pub struct RawExport {
    storage: FileStorage,
    size: u64,
    writable: bool,
    probed: bool,
}

fn io(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { op, offset, source }
}

impl RawExport {
    /// Opens `path` with QEMU-compatible locks.
    pub fn open(path: &Path, writable: bool, cache: CacheMode) -> Result<Self> {
        let storage = FileStorage::open(
            path,
            &FileOptions {
                writable,
                create: false,
                cache,
                lock: LockMode::for_access(writable, false),
            },
        )
        .map_err(io("open", 0))?;
        let len = storage.len().map_err(io("length", 0))?;
        Ok(Self {
            storage,
            size: len.div_ceil(SECTOR).saturating_mul(SECTOR),
            writable,
            probed: false,
        })
    }

    /// Marks the file as raw by probing (see the type's documentation).
    #[must_use]
    pub fn probed(mut self) -> Self {
        self.probed = true;
        self
    }

    /// On a probed file, a write that reaches into the first sector must write all of it,
    /// and what it writes there must not start like an image of another format.
    fn guard_first_sector(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.probed || offset >= SECTOR || buf.is_empty() {
            return Ok(());
        }
        if offset != 0 || (buf.len() as u64) < SECTOR {
            return Err(Error::InvalidArgument(
                "a write into the first sector of a probed raw image must cover it whole".into(),
            ));
        }
        if HEADER_MAGICS.iter().any(|magic| buf.starts_with(magic)) {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        if write && !self.writable {
            return Err(Error::ReadOnly);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }
}

impl Export for RawExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64, false)?;
        self.storage
            .read_at(buf, offset)
            .map_err(io("read", offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check(offset, buf.len() as u64, true)?;
        self.guard_first_sector(buf, offset)?;
        self.storage
            .write_at(buf, offset)
            .map_err(io("write", offset))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check(offset, len, true)?;
        if flags.may_unmap {
            return self
                .storage
                .punch_hole(offset, len)
                .map_err(io("punch hole", offset));
        }
        if flags.fast_only {
            // Whether the file system zeroes without writing cannot be known in advance.
            return Err(Error::NotFast { offset });
        }
        self.storage
            .write_zeroes(offset, len)
            .map_err(io("write zeroes", offset))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, true)?;
        self.storage
            .punch_hole(offset, len)
            .map_err(io("punch hole", offset))
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush().map_err(io("flush", 0))
    }

    fn status(&self, offset: u64, len: u64, max: usize, holes: bool) -> Result<Vec<Status>> {
        let found = self.file_status(offset, len, max, holes)?;
        Ok(if self.probed {
            whole_sectors(found)
        } else {
            found
        })
    }
}

/// Status in whole sectors, as QEMU's block layer reports it for a probed raw file: a sector
/// that holds any data is data. `found` covers a range contiguously, in order.
fn whole_sectors(found: Vec<Status>) -> Vec<Status> {
    let (Some(first), Some(last)) = (found.first(), found.last()) else {
        return found;
    };
    let (mut pos, final_end) = (first.offset, last.offset + last.length);
    let mut out: Vec<Status> = Vec::with_capacity(found.len());
    for s in &found {
        let end = s.offset + s.length;
        let stop = if !s.hole {
            end.next_multiple_of(SECTOR).min(final_end)
        } else if end == final_end {
            end
        } else {
            // The partial sector at the end of a hole goes to the data after it.
            end / SECTOR * SECTOR
        };
        if stop <= pos {
            continue;
        }
        match out.last_mut() {
            Some(prev) if prev.hole == s.hole && prev.zero == s.zero => prev.length += stop - pos,
            _ => out.push(Status {
                offset: pos,
                length: stop - pos,
                ..*s
            }),
        }
        pos = stop;
    }
    out
}

impl RawExport {
    fn file_status(&self, offset: u64, len: u64, max: usize, _holes: bool) -> Result<Vec<Status>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let data = self.storage.next_data(pos).map_err(io("find data", pos))?;
            let (length, hole) = match data {
                None => (end - pos, true),
                Some(d) if d > pos => (d.min(end) - pos, true),
                Some(_) => {
                    let h = self.storage.next_hole(pos).map_err(io("find hole", pos))?;
                    (h.clamp(pos + 1, end) - pos, false)
                }
            };
            out.push(Status {
                offset: pos,
                length,
                zero: hole,
                hole,
                depth: 1,
            });
            pos += length;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(offset: u64, length: u64, hole: bool) -> Status {
        Status {
            offset,
            length,
            zero: hole,
            hole,
            depth: 1,
        }
    }

    #[test]
    fn whole_sectors_give_partial_sectors_to_data() {
        // 1000 bytes of data, then the rounded-up tail: all one data sector pair.
        let out = whole_sectors(vec![st(0, 1000, false), st(1000, 24, true)]);
        assert_eq!(out, vec![st(0, 1024, false)]);
        // A hole between data keeps only its whole sectors.
        let out = whole_sectors(vec![
            st(0, 100, false),
            st(100, 2000, true),
            st(2100, 400, false),
            st(2500, 572, true),
        ]);
        assert_eq!(
            out,
            vec![
                st(0, 512, false),
                st(512, 1536, true),
                st(2048, 512, false),
                st(2560, 512, true),
            ]
        );
        // A hole inside one sector disappears into the data around it.
        let out = whole_sectors(vec![
            st(0, 100, false),
            st(100, 200, true),
            st(300, 724, false),
        ]);
        assert_eq!(out, vec![st(0, 1024, false)]);
        assert!(whole_sectors(Vec::new()).is_empty());
    }
}

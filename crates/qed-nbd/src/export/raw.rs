//! A raw file as an export: guest byte N is file byte N. Status comes from the file system's
//! holes (SEEK_DATA/SEEK_HOLE).

use std::path::Path;

use qed_image::storage::{CacheMode, FileOptions, FileStorage, LockMode, Storage};
use qed_image::{Error, Result, ZeroFlags};

use super::{Export, Status};

/// A raw image file. Its size is the file length at open rounded up to whole 512-byte sectors,
/// as QEMU sees it (the partial tail reads as zeros).
#[derive(Debug)]
pub struct RawExport {
    storage: FileStorage,
    size: u64,
    writable: bool,
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
            size: len.div_ceil(512).saturating_mul(512),
            writable,
        })
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

    fn status(&self, offset: u64, len: u64, max: usize, _holes: bool) -> Result<Vec<Status>> {
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

//! What `qed io` runs commands on: a QED image through the engine, or a raw file directly.

use std::path::Path;

use qed_image::storage::{CacheMode, FileOptions, FileStorage, LockMode, Storage};
use qed_image::{BackingPolicy, Error, ExtentKind, Image, OpenOptions, Result};

use crate::error::{open_failure, os_text};
use crate::format::{sector_rounded_len, ImageFormat};

/// A raw disk image: guest byte N is file byte N; the size is the file length at open rounded
/// up to whole sectors, as QEMU sees it.
#[derive(Debug)]
pub struct RawFile {
    storage: FileStorage,
    size: u64,
    writable: bool,
}

/// An open image.
#[derive(Debug)]
pub enum Target {
    /// A QED image (with its backing chain).
    Qed(Image),
    /// A raw file.
    Raw(RawFile),
}

/// A stretch of the disk and whether this image (not its backing file) allocates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationRun {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Data or zero clusters here (true), or left to the backing file (false).
    pub allocated: bool,
}

impl Target {
    /// Opens `path` as `format` (probed when `None`); the error text says why it failed.
    pub fn open(
        path: &Path,
        format: Option<ImageFormat>,
        writable: bool,
        force_share: bool,
    ) -> std::result::Result<Self, String> {
        let format = ImageFormat::resolve(path, format).map_err(|e| open_failure(&e))?;
        match format {
            ImageFormat::Qed => {
                let options = OpenOptions {
                    writable,
                    force_share,
                    backing: BackingPolicy::Follow,
                    ..OpenOptions::default()
                };
                Image::open(path, &options)
                    .map(Target::Qed)
                    .map_err(|e| open_failure(&e))
            }
            ImageFormat::Raw => {
                let lock = LockMode::for_access(writable, force_share);
                let storage = FileStorage::open(
                    path,
                    &FileOptions {
                        writable,
                        create: false,
                        cache: CacheMode::Writeback,
                        lock,
                    },
                )
                .map_err(|e| os_text(&e))?;
                let size = sector_rounded_len(storage.len().map_err(|e| os_text(&e))?);
                Ok(Target::Raw(RawFile {
                    storage,
                    size,
                    writable,
                }))
            }
        }
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        match self {
            Self::Qed(image) => image.is_writable(),
            Self::Raw(raw) => raw.writable,
        }
    }

    /// Virtual disk size.
    pub fn size(&self) -> u64 {
        match self {
            Self::Qed(image) => image.size(),
            Self::Raw(raw) => raw.size,
        }
    }

    /// Reads guest bytes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            Self::Qed(image) => image.read_at(buf, offset),
            Self::Raw(raw) => {
                raw.check_range(offset, buf.len() as u64)?;
                raw.storage
                    .read_at(buf, offset)
                    .map_err(io_error("read", offset))
            }
        }
    }

    /// Writes guest bytes.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Self::Qed(image) => image.write_at(buf, offset),
            Self::Raw(raw) => {
                raw.check_writable()?;
                raw.check_range(offset, buf.len() as u64)?;
                raw.storage
                    .write_at(buf, offset)
                    .map_err(io_error("write", offset))
            }
        }
    }

    /// Makes a range read as zeros; `unmap` lets a raw file give the space back.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        match self {
            Self::Qed(image) => image.write_zeroes_at(offset, len),
            Self::Raw(raw) => {
                raw.check_writable()?;
                raw.check_range(offset, len)?;
                if unmap {
                    return raw
                        .storage
                        .punch_hole(offset, len)
                        .map_err(io_error("punch hole", offset));
                }
                const CHUNK: u64 = 1 << 20;
                let zeros = vec![0u8; CHUNK.min(len) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    raw.storage
                        .write_at(&zeros[..n as usize], offset + done)
                        .map_err(io_error("write", offset + done))?;
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Discards a range (the engine's rules for QED; a hole punched in a raw file).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Self::Qed(image) => image.discard(offset, len),
            Self::Raw(raw) => {
                raw.check_writable()?;
                raw.check_range(offset, len)?;
                raw.storage
                    .punch_hole(offset, len)
                    .map_err(io_error("punch hole", offset))
            }
        }
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> Result<()> {
        match self {
            Self::Qed(image) => image.flush(),
            Self::Raw(raw) => raw.storage.flush().map_err(io_error("flush", 0)),
        }
    }

    /// Runs of allocated / unallocated guest ranges over the whole disk, adjacent runs of the
    /// same kind merged (as `qemu-io map` reports them). A lookup error ends the list.
    pub fn allocation(&self) -> (Vec<AllocationRun>, Option<Error>) {
        let mut runs: Vec<AllocationRun> = Vec::new();
        let mut push = |offset: u64, length: u64, allocated: bool| {
            if let Some(last) = runs.last_mut() {
                if last.allocated == allocated && last.offset + last.length == offset {
                    last.length += length;
                    return;
                }
            }
            runs.push(AllocationRun {
                offset,
                length,
                allocated,
            });
        };
        match self {
            Self::Raw(raw) => {
                if raw.size > 0 {
                    push(0, raw.size, true);
                }
            }
            Self::Qed(image) => {
                for extent in image.extents(0, image.size()) {
                    match extent {
                        Ok(extent) => push(
                            extent.offset,
                            extent.length,
                            !matches!(extent.kind, ExtentKind::Unallocated),
                        ),
                        Err(e) => return (runs, Some(e)),
                    }
                }
            }
        }
        (runs, None)
    }

    /// Closes the image, writing back metadata (QED) and flushing.
    pub fn close(self) -> Result<()> {
        match self {
            Self::Qed(image) => image.close(),
            Self::Raw(raw) => {
                if raw.writable {
                    raw.storage.flush().map_err(io_error("flush", 0))?;
                }
                Ok(())
            }
        }
    }
}

impl RawFile {
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly)
        }
    }
}

fn io_error(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { op, offset, source }
}

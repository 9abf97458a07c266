//! What `qed io` runs commands on: a QED image through the engine, or a raw file directly.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use qed_image::ops::Disk;
use qed_image::storage::{FileOptions, FileStorage, LockMode, Storage};
use qed_image::{BackingPolicy, Error, ExtentKind, Image, OpenOptions, Result, ZeroFlags};

use super::flags::OpenFlags;
use crate::format::{sector_rounded_len, ImageFormat};

/// A raw disk image: guest byte N is byte N of its storage (a file, or the tree of storages
/// an image name puts together); the size is the storage's length rounded up to whole
/// sectors, as QEMU sees it.
pub struct RawFile {
    storage: Box<dyn Storage>,
    size: AtomicU64,
    writable: bool,
}

impl std::fmt::Debug for RawFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawFile")
            .field("size", &self.size)
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
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
    /// Opens `path` as `format` with `flags` (read-only, cache, locks, backing file).
    pub fn open(path: &Path, format: ImageFormat, flags: &OpenFlags) -> Result<Self> {
        let writable = !flags.read_only;
        match format {
            ImageFormat::Qed => {
                let options = OpenOptions {
                    writable,
                    force_share: flags.unlocked(),
                    cache: flags.cache_mode(),
                    backing: if flags.no_backing {
                        BackingPolicy::Ignore
                    } else {
                        BackingPolicy::Follow
                    },
                    backing_names: Some(crate::spec::backing_names()),
                    ..OpenOptions::default()
                };
                Image::open(path, &options).map(Target::Qed)
            }
            ImageFormat::Raw => {
                let lock = LockMode::for_access(writable, flags.unlocked());
                let storage = FileStorage::open(
                    path,
                    &FileOptions {
                        writable,
                        create: false,
                        cache: flags.cache_mode(),
                        lock,
                    },
                )
                .map_err(io_error("open", 0))?;
                let len = storage.len().map_err(io_error("open", 0))?;
                Ok(Target::Raw(RawFile {
                    storage: Box::new(storage),
                    size: AtomicU64::new(sector_rounded_len(len)),
                    writable,
                }))
            }
        }
    }

    /// The target a disk opened by its image name is: a QED image as it is, anything else as
    /// raw bytes.
    pub fn from_disk(disk: Disk) -> Self {
        let (size, writable) = (disk.size(), disk.is_writable());
        match disk {
            Disk::Qed(image) => Target::Qed(image),
            Disk::Raw(raw) => Target::Raw(RawFile {
                storage: raw.into_storage(),
                size: AtomicU64::new(size),
                writable,
            }),
            // Image names open QED and raw disks only.
            Disk::Foreign(_) => unreachable!("an image name opened a qcow2 or VMDK disk"),
        }
    }

    /// The image format.
    pub fn format(&self) -> ImageFormat {
        match self {
            Self::Qed(_) => ImageFormat::Qed,
            Self::Raw(_) => ImageFormat::Raw,
        }
    }

    /// Bytes per cluster as QEMU's `info` reports it (0 for raw files).
    pub fn cluster_size(&self) -> u64 {
        match self {
            Self::Qed(image) => image.cluster_size(),
            Self::Raw(_) => 0,
        }
    }

    /// The QED image, if this is one.
    pub fn image(&self) -> Option<&Image> {
        match self {
            Self::Qed(image) => Some(image),
            Self::Raw(_) => None,
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
            Self::Raw(raw) => raw.size(),
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

    /// Makes a range read as zeros; `unmap` lets the space be given back.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        match self {
            Self::Qed(image) => image.write_zeroes_with(
                offset,
                len,
                ZeroFlags {
                    may_unmap: unmap,
                    fast_only: false,
                },
            ),
            Self::Raw(raw) => {
                raw.check_writable()?;
                raw.check_range(offset, len)?;
                let file_len = raw.storage.len().map_err(io_error("length", 0))?;
                // The sector tail past the end of the file reads as zeros already.
                let len = len.min(file_len.saturating_sub(offset));
                if unmap {
                    raw.storage
                        .punch_hole(offset, len)
                        .map_err(io_error("punch hole", offset))
                } else {
                    raw.storage
                        .write_zeroes(offset, len)
                        .map_err(io_error("write zeroes", offset))
                }
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
                if raw.size() > 0 {
                    push(0, raw.size(), true);
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

    /// Changes the virtual size (the engine's resize for QED, which can shrink; the file
    /// length for raw files).
    pub fn resize(&self, size: u64) -> Result<()> {
        match self {
            Self::Qed(image) => image.resize(size),
            Self::Raw(raw) => {
                raw.check_writable()?;
                raw.storage
                    .set_len(size)
                    .map_err(io_error("truncate", size))?;
                raw.size.store(sector_rounded_len(size), Ordering::Release);
                Ok(())
            }
        }
    }

    /// How many bytes of `[offset, offset + len)` this image allocates (data or zero clusters;
    /// everything in a raw file), as qemu-io's `alloc` adds up `bdrv_is_allocated`. The range
    /// must lie inside the disk.
    pub fn allocated_bytes(&self, offset: u64, len: u64) -> Result<u64> {
        match self {
            Self::Raw(_) => Ok(len),
            Self::Qed(image) => {
                let mut sum = 0;
                for extent in image.extents(offset, len) {
                    let extent = extent?;
                    if !matches!(extent.kind, ExtentKind::Unallocated) {
                        sum += extent.length;
                    }
                }
                Ok(sum)
            }
        }
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
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
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

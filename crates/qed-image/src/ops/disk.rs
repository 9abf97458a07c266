//! [`Disk`]: what the whole-disk operations read and write — a QED image with its backing
//! chain, a raw file, or (feature `foreign`) a qcow2 or VMDK image with its chain.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backing::BackingFormat;
use crate::image::has_qed_magic;
use crate::storage::{CacheMode, FileOptions, FileStorage, LockMode, Storage};
use crate::zero::ZeroFlags;
use crate::{Error, Image, OpenOptions, Result};

#[cfg(feature = "foreign")]
use super::foreign::ForeignDisk;
use super::SECTOR;

/// The formats a [`Disk`] can be: QED and raw always, qcow2 and VMDK with the `foreign`
/// feature (without it they are recognized, and refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskFormat {
    /// QEMU Enhanced Disk.
    Qed,
    /// Raw: guest byte N is file byte N.
    Raw,
    /// qcow2 (versions 2 and 3).
    Qcow2,
    /// VMDK (read only; descriptor files with flat extents).
    Vmdk,
}

impl DiskFormat {
    /// The name QEMU uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qed => "qed",
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
            Self::Vmdk => "vmdk",
        }
    }

    /// The format QEMU names `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Qed, Self::Raw, Self::Qcow2, Self::Vmdk]
            .into_iter()
            .find(|f| f.name() == name)
    }

    /// The backing format of a QED image, for the formats a QED image can name.
    pub fn backing_format(self) -> Option<BackingFormat> {
        match self {
            Self::Qed => Some(BackingFormat::Qed),
            Self::Raw => Some(BackingFormat::Raw),
            Self::Qcow2 | Self::Vmdk => None,
        }
    }
}

impl From<BackingFormat> for DiskFormat {
    fn from(format: BackingFormat) -> Self {
        match format {
            BackingFormat::Qed => Self::Qed,
            BackingFormat::Raw => Self::Raw,
        }
    }
}

/// The qcow2 magic, `QFI\xfb`.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// The magic of a sparse VMDK extent, `KDMV`.
const VMDK_SPARSE_MAGIC: &[u8; 4] = b"KDMV";
/// How a VMDK descriptor file starts.
const VMDK_DESCRIPTOR: &[u8] = b"# Disk DescriptorFile";

/// The format `head` (a file's first bytes) says: QED, qcow2 or VMDK by their magic, raw
/// otherwise.
pub fn format_of_head(head: &[u8]) -> DiskFormat {
    if has_qed_magic(head) {
        DiskFormat::Qed
    } else if head.starts_with(QCOW2_MAGIC) {
        DiskFormat::Qcow2
    } else if head.starts_with(VMDK_SPARSE_MAGIC) || head.starts_with(VMDK_DESCRIPTOR) {
        DiskFormat::Vmdk
    } else {
        DiskFormat::Raw
    }
}

/// The error of an operation that reads QED and raw disks only, given a qcow2 or VMDK file.
pub fn not_here(format: DiskFormat) -> Error {
    Error::Unsupported(format!(
        "{} images here (convert and compare read them; -f raw takes the file as raw)",
        format.name()
    ))
}

/// Probes a file by its first bytes (see [`format_of_head`]).
pub fn probe_disk_format(path: &Path) -> Result<DiskFormat> {
    let storage = FileStorage::open(
        path,
        &FileOptions {
            writable: false,
            create: false,
            cache: CacheMode::Writeback,
            lock: LockMode::None,
        },
    )
    .map_err(Error::io("open", 0))?;
    let mut head = [0u8; VMDK_DESCRIPTOR.len()];
    let len = storage.len().map_err(Error::io("length", 0))?;
    let n = head.len().min(usize::try_from(len).unwrap_or(usize::MAX));
    storage
        .read_at(&mut head[..n], 0)
        .map_err(Error::io("read", 0))?;
    Ok(format_of_head(&head[..n]))
}

/// A raw disk image: guest byte N is byte N of the storage. Its size is the storage's length
/// at open rounded up to whole sectors, as QEMU sees it (the partial tail reads as zeros).
pub struct RawDisk {
    storage: Box<dyn Storage>,
    /// Changes only through [`Disk::set_size`].
    pub(crate) size: AtomicU64,
    writable: bool,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for RawDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawDisk")
            .field("size", &self.size)
            .field("writable", &self.writable)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RawDisk {
    /// A raw disk on any storage.
    pub fn new(storage: Box<dyn Storage>, writable: bool) -> Result<Self> {
        let len = storage.len().map_err(Error::io("length", 0))?;
        Ok(Self {
            storage,
            size: AtomicU64::new(sector_rounded(len)),
            writable,
            path: None,
        })
    }

    /// The storage underneath.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// The storage underneath, the disk given up.
    pub fn into_storage(self) -> Box<dyn Storage> {
        self.storage
    }
}

/// A disk the operations work on.
#[derive(Debug)]
pub enum Disk {
    /// A QED image, with the backing chain it was opened with.
    Qed(Image),
    /// A raw file.
    Raw(RawDisk),
    /// A qcow2 or VMDK image, with its backing chain.
    #[cfg(feature = "foreign")]
    Foreign(ForeignDisk),
}

/// `len` rounded up to whole sectors.
pub(crate) fn sector_rounded(len: u64) -> u64 {
    len.div_ceil(SECTOR).saturating_mul(SECTOR)
}

impl Disk {
    /// Opens `path` as `format` (probed by the QED magic when `None`; a qcow2 or VMDK file is
    /// then refused, see [`not_here`]). A QED image opens its backing chain as
    /// `options.backing` says; a raw file is opened with `options.writable`, `options.cache`
    /// and the lock `options.force_share` allows.
    pub fn open(path: &Path, format: Option<BackingFormat>, options: &OpenOptions) -> Result<Self> {
        let format = match format {
            Some(format) => format,
            None => match probe_disk_format(path)? {
                DiskFormat::Qed => BackingFormat::Qed,
                DiskFormat::Raw => BackingFormat::Raw,
                other => return Err(not_here(other)),
            },
        };
        match format {
            BackingFormat::Qed => Ok(Self::Qed(Image::open(path, options)?)),
            BackingFormat::Raw => {
                let storage = FileStorage::open(
                    path,
                    &FileOptions {
                        writable: options.writable,
                        create: false,
                        cache: options.cache,
                        lock: LockMode::for_access(options.writable, options.force_share),
                    },
                )
                .map_err(Error::io("open", 0))?;
                let mut raw = RawDisk::new(Box::new(storage), options.writable)?;
                raw.path = Some(path.to_path_buf());
                Ok(Self::Raw(raw))
            }
        }
    }

    /// Opens `path` as `format`, probed by its magic when `None` (QED, qcow2, VMDK, else raw).
    /// QED and raw open as [`Disk::open`] opens them; qcow2 and VMDK need the `foreign`
    /// feature, open read-only unless `options.writable` (qcow2 only), and follow their
    /// backing chain as `options.backing` says.
    pub fn open_any(
        path: &Path,
        format: Option<DiskFormat>,
        options: &OpenOptions,
    ) -> Result<Self> {
        let format = match format {
            Some(format) => format,
            None => probe_disk_format(path)?,
        };
        match format {
            DiskFormat::Qed => Self::open(path, Some(BackingFormat::Qed), options),
            DiskFormat::Raw => Self::open(path, Some(BackingFormat::Raw), options),
            #[cfg(feature = "foreign")]
            DiskFormat::Qcow2 | DiskFormat::Vmdk => {
                Ok(Self::Foreign(ForeignDisk::open(path, format, options)?))
            }
            #[cfg(not(feature = "foreign"))]
            DiskFormat::Qcow2 | DiskFormat::Vmdk => Err(Error::Unsupported(format!(
                "{} images (built without the `foreign` feature)",
                format.name()
            ))),
        }
    }

    /// Creates (or replaces) a qcow2 image at `path`, `size` bytes, with `cluster_size` and
    /// the backing file named (relative to its directory) with its format, and opens it for
    /// writing with its chain.
    #[cfg(feature = "foreign")]
    pub fn create_qcow2(
        path: &Path,
        size: u64,
        cluster_size: u32,
        backing: Option<(&str, DiskFormat)>,
        cache: CacheMode,
    ) -> Result<Self> {
        Ok(Self::Foreign(ForeignDisk::create_qcow2(
            path,
            size,
            cluster_size,
            backing,
            cache,
        )?))
    }

    /// Creates (or truncates) the raw file at `path`, `size` bytes long and all holes, and
    /// opens it for writing.
    pub fn create_raw(path: &Path, size: u64, cache: CacheMode) -> Result<Self> {
        let storage = FileStorage::open(
            path,
            &FileOptions {
                writable: true,
                create: true,
                cache,
                lock: LockMode::Write,
            },
        )
        .map_err(Error::io("create", 0))?;
        storage
            .set_len(size)
            .map_err(Error::io("set length", size))?;
        Ok(Self::Raw(RawDisk {
            storage: Box::new(storage),
            size: AtomicU64::new(sector_rounded(size)),
            writable: true,
            path: Some(path.to_path_buf()),
        }))
    }

    /// The format.
    pub fn format(&self) -> DiskFormat {
        match self {
            Self::Qed(_) => DiskFormat::Qed,
            Self::Raw(_) => DiskFormat::Raw,
            #[cfg(feature = "foreign")]
            Self::Foreign(disk) => disk.format(),
        }
    }

    /// The QED image, if this is one.
    pub fn image(&self) -> Option<&Image> {
        match self {
            Self::Qed(image) => Some(image),
            _ => None,
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Self::Qed(image) => image.size(),
            Self::Raw(raw) => raw.size.load(Ordering::Acquire),
            #[cfg(feature = "foreign")]
            Self::Foreign(disk) => disk.size(),
        }
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        match self {
            Self::Qed(image) => image.is_writable(),
            Self::Raw(raw) => raw.writable,
            #[cfg(feature = "foreign")]
            Self::Foreign(disk) => disk.is_writable(),
        }
    }

    /// The file it was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Qed(image) => image.path(),
            Self::Raw(raw) => raw.path.as_deref(),
            #[cfg(feature = "foreign")]
            Self::Foreign(disk) => Some(disk.path()),
        }
    }

    /// The cluster size of a QED or qcow2 image (writes of whole clusters allocate nothing
    /// twice).
    pub fn cluster_size(&self) -> Option<u64> {
        match self {
            #[cfg(feature = "foreign")]
            Self::Foreign(disk) => disk.cluster_size(),
            _ => self.image().map(Image::cluster_size),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    fn raw_for_write(&self, offset: u64, len: u64) -> Result<&RawDisk> {
        let Self::Raw(raw) = self else {
            unreachable!("only called for raw disks")
        };
        if !raw.writable {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        Ok(raw)
    }

    /// Reads guest bytes (through the backing chain for QED).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            Self::Qed(image) => image.read_at(buf, offset),
            Self::Raw(raw) => {
                self.check_range(offset, buf.len() as u64)?;
                raw.storage
                    .read_at(buf, offset)
                    .map_err(Error::io("read", offset))
            }
            #[cfg(feature = "foreign")]
            Self::Foreign(disk) => {
                disk.check_range(offset, buf.len() as u64)?;
                super::status::read_through(super::status::Chain::of_disk(self), buf, offset)
            }
        }
    }

    /// Writes guest bytes.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Self::Qed(image) => image.write_at(buf, offset),
            Self::Raw(_) => {
                let raw = self.raw_for_write(offset, buf.len() as u64)?;
                raw.storage
                    .write_at(buf, offset)
                    .map_err(Error::io("write", offset))
            }
            #[cfg(feature = "foreign")]
            Self::Foreign(disk) => disk.write_at(buf, offset),
        }
    }

    /// Makes a range read as zeros; `may_unmap` lets the host space go (zero clusters and
    /// punched ranges rather than zeros written in place).
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        match self {
            Self::Qed(image) => image.write_zeroes_with(
                offset,
                len,
                ZeroFlags {
                    may_unmap,
                    fast_only: false,
                },
            ),
            Self::Raw(_) => {
                let raw = self.raw_for_write(offset, len)?;
                // Never past the file's end: a raw file does not grow by zeroing its tail.
                let file_len = raw.storage.len().map_err(Error::io("length", 0))?;
                let len = len.min(file_len.saturating_sub(offset));
                if len == 0 {
                    return Ok(());
                }
                let result = if may_unmap {
                    raw.storage.punch_hole(offset, len)
                } else {
                    raw.storage.write_zeroes(offset, len)
                };
                result.map_err(Error::io("write zeroes", offset))
            }
            #[cfg(feature = "foreign")]
            Self::Foreign(disk) => disk.write_zeroes(offset, len),
        }
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> Result<()> {
        match self {
            Self::Qed(image) => image.flush(),
            Self::Raw(raw) => raw.storage.flush().map_err(Error::io("flush", 0)),
            #[cfg(feature = "foreign")]
            Self::Foreign(disk) => disk.flush(),
        }
    }

    /// Closes the disk: a QED image writes back its metadata and clears NEED_CHECK; a raw
    /// file opened for writing is flushed.
    pub fn close(self) -> Result<()> {
        match self {
            Self::Qed(image) => image.close(),
            Self::Raw(raw) => {
                if raw.writable {
                    raw.storage.flush().map_err(Error::io("flush", 0))?;
                }
                Ok(())
            }
            #[cfg(feature = "foreign")]
            Self::Foreign(disk) => disk.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    #[test]
    fn raw_size_is_rounded_to_sectors() {
        let raw = RawDisk::new(Box::new(MemoryStorage::from_bytes(vec![7; 1000])), false).unwrap();
        let disk = Disk::Raw(raw);
        assert_eq!(disk.size(), 1024);
        let mut buf = [1u8; 24];
        disk.read_at(&mut buf, 1000).unwrap();
        assert_eq!(buf, [0; 24]);
        assert!(matches!(
            disk.read_at(&mut buf, 1001),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(disk.write_at(&buf, 0), Err(Error::ReadOnly)));
    }
}

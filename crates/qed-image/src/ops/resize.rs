//! `resize`: a new virtual size for a disk, by `qemu-img resize`'s rules.
//!
//! The new size is absolute or relative to the current one; it must be positive, and smaller
//! than the current one only when shrinking is allowed (`--shrink`). A QED image changes its
//! header ([`Image::resize`]: growing writes the size, shrinking drops what lies past it and
//! gives the space back, which QEMU cannot do for QED); a raw file gets the new length, and
//! with preallocation its new part is allocated.

use std::sync::atomic::Ordering;

use crate::{Error, Image, Result};

use super::disk::{sector_rounded, Disk};
use super::SECTOR;

/// The size argument of `qemu-img resize`: `SIZE`, `+SIZE` or `-SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeChange {
    /// Exactly this many bytes.
    To(u64),
    /// This many bytes more.
    Grow(u64),
    /// This many bytes fewer.
    Shrink(u64),
}

/// How the new part of a grown disk is allocated (`--preallocation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// Not at all: it reads as zeros.
    #[default]
    Off,
    /// Metadata only (no format here has any to preallocate).
    Metadata,
    /// Space reserved in the file (`fallocate`).
    Falloc,
    /// Space reserved and zeros written.
    Full,
}

impl Preallocation {
    /// QEMU's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Metadata => "metadata",
            Self::Falloc => "falloc",
            Self::Full => "full",
        }
    }

    /// The mode QEMU calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Off, Self::Metadata, Self::Falloc, Self::Full]
            .into_iter()
            .find(|mode| mode.name() == name)
    }
}

/// How to resize.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResizeOptions {
    /// A smaller size is allowed (`--shrink`).
    pub shrink: bool,
    /// How a grown part is allocated.
    pub preallocation: Preallocation,
}

/// Why a resize was refused or failed; the texts are qemu-img's.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// The new size is zero, negative or past `i64::MAX`.
    #[error("New image size must be positive")]
    NotPositive,
    /// Preallocation asked for a size that is not larger.
    #[error("Preallocation can only be used for growing images")]
    PreallocationNeedsGrowth,
    /// A smaller size without [`ResizeOptions::shrink`].
    #[error("Use the --shrink option to perform a shrink operation.")]
    ShrinkNotAllowed,
    /// The format cannot preallocate this way.
    #[error("Unsupported preallocation mode '{0}'")]
    UnsupportedPreallocation(&'static str),
    /// A raw file cannot preallocate metadata.
    #[error("Unsupported preallocation mode: {0}")]
    NoMetadata(&'static str),
    /// The size does not fit the format (QED: a multiple of 512 up to the geometry's maximum).
    #[error("Invalid image size specified")]
    InvalidSize,
    /// The change itself failed.
    #[error("{0}")]
    Failed(#[from] Error),
}

/// The size `change` asks for, from `current`, checked as qemu-img checks it (positive, at
/// most `i64::MAX`).
pub fn new_size(current: u64, change: SizeChange) -> Result<u64, ResizeError> {
    let total = match change {
        SizeChange::To(n) => i128::from(n),
        SizeChange::Grow(n) => i128::from(current) + i128::from(n),
        SizeChange::Shrink(n) => i128::from(current) - i128::from(n),
    };
    if total <= 0 || total > i128::from(i64::MAX) {
        return Err(ResizeError::NotPositive);
    }
    Ok(total as u64)
}

/// Resizes `disk` (opened for writing) as `change` and `options` say; returns the new size.
pub fn resize(
    disk: &Disk,
    change: SizeChange,
    options: &ResizeOptions,
) -> Result<u64, ResizeError> {
    let current = disk.size();
    let size = new_size(current, change)?;
    let prealloc = options.preallocation;
    if size <= current && prealloc != Preallocation::Off {
        return Err(ResizeError::PreallocationNeedsGrowth);
    }
    if size < current && !options.shrink {
        return Err(ResizeError::ShrinkNotAllowed);
    }
    match disk {
        Disk::Qed(image) => resize_qed(image, size, prealloc)?,
        Disk::Raw(_) if prealloc == Preallocation::Metadata => {
            return Err(ResizeError::NoMetadata(prealloc.name()))
        }
        Disk::Raw(_) => {
            disk.set_size(size)?;
            if size > current && prealloc != Preallocation::Off {
                disk.write_zeroes(current, size - current, false)?;
            }
        }
        #[cfg(feature = "foreign")]
        Disk::Foreign(_) => disk.set_size(size)?,
    }
    Ok(size)
}

fn resize_qed(image: &Image, size: u64, prealloc: Preallocation) -> Result<(), ResizeError> {
    if prealloc != Preallocation::Off {
        return Err(ResizeError::UnsupportedPreallocation(prealloc.name()));
    }
    if size % SECTOR != 0 || u128::from(size) > image.geometry().max_image_size() {
        return Err(ResizeError::InvalidSize);
    }
    image.resize(size)?;
    Ok(())
}

impl Disk {
    /// Gives the disk a new virtual size: a QED image through [`Image::resize`], a raw file by
    /// its length (cut or extended with a hole; its size is then that length rounded up to
    /// whole sectors, as QEMU sees it). The disk must be open for writing.
    pub fn set_size(&self, size: u64) -> Result<()> {
        match self {
            Self::Qed(image) => image.resize(size),
            Self::Raw(raw) => {
                if !self.is_writable() {
                    return Err(Error::ReadOnly);
                }
                raw.storage()
                    .set_len(size)
                    .map_err(Error::io("set length", size))?;
                raw.size.store(sector_rounded(size), Ordering::Release);
                Ok(())
            }
            #[cfg(feature = "foreign")]
            Self::Foreign(disk) => Err(Error::Unsupported(format!(
                "resizing {} images",
                disk.format().name()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::RawDisk;
    use crate::storage::MemoryStorage;

    #[test]
    fn sizes_as_qemu_img_computes_them() {
        assert_eq!(new_size(100, SizeChange::To(7)).unwrap(), 7);
        assert_eq!(new_size(100, SizeChange::Grow(7)).unwrap(), 107);
        assert_eq!(new_size(100, SizeChange::Shrink(7)).unwrap(), 93);
        for change in [
            SizeChange::To(0),
            SizeChange::Shrink(100),
            SizeChange::Shrink(200),
            SizeChange::To(u64::MAX),
            SizeChange::Grow(i64::MAX as u64),
        ] {
            assert!(matches!(
                new_size(100, change),
                Err(ResizeError::NotPositive)
            ));
        }
    }

    #[test]
    fn raw_files_shrink_only_when_allowed() {
        let storage = MemoryStorage::from_bytes(vec![5; 4096]);
        let disk = Disk::Raw(RawDisk::new(Box::new(storage), true).unwrap());
        let refused = resize(&disk, SizeChange::To(1000), &ResizeOptions::default());
        assert!(matches!(refused, Err(ResizeError::ShrinkNotAllowed)));
        let options = ResizeOptions {
            shrink: true,
            ..ResizeOptions::default()
        };
        assert_eq!(resize(&disk, SizeChange::To(1000), &options).unwrap(), 1000);
        assert_eq!(disk.size(), 1024);
        let full = ResizeOptions {
            preallocation: Preallocation::Full,
            ..ResizeOptions::default()
        };
        assert_eq!(resize(&disk, SizeChange::Grow(1024), &full).unwrap(), 2048);
        let mut buf = [1u8; 2048];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf[..1000].iter().all(|&b| b == 5) && buf[1000..].iter().all(|&b| b == 0));
    }
}

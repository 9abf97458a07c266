//! Image formats and the facts about image files every command needs.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use qed_image::ops::{not_here, probe_disk_format, DiskFormat};
use qed_image::{BackingFormat, CacheMode};

/// An image format the tool reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageFormat {
    /// QEMU Enhanced Disk.
    Qed,
    /// A raw disk image: guest byte N is file byte N.
    Raw,
}

impl ImageFormat {
    /// The name QEMU uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qed => "qed",
            Self::Raw => "raw",
        }
    }

    /// Parses a format name as given in an option value (`backing_fmt=raw`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "qed" => Some(Self::Qed),
            "raw" => Some(Self::Raw),
            _ => None,
        }
    }

    /// `given`, or what the file's first bytes say: QED if it starts with the QED magic, raw
    /// if it starts with no image magic. A qcow2 or VMDK file is refused: only `convert` and
    /// `compare` read those (see [`AnyFormat`]), and taking one for raw would be wrong.
    pub fn resolve(path: &Path, given: Option<Self>) -> qed_image::Result<Self> {
        if let Some(format) = given {
            return Ok(format);
        }
        match probe_disk_format(path)? {
            DiskFormat::Qed => Ok(Self::Qed),
            DiskFormat::Raw => Ok(Self::Raw),
            other => Err(not_here(other)),
        }
    }
}

/// The formats `convert` and `compare` read (and `convert -O` writes, but VMDK): QED and raw
/// as everywhere, qcow2 and VMDK through the engine's `foreign` disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AnyFormat {
    /// QEMU Enhanced Disk.
    Qed,
    /// A raw disk image.
    Raw,
    /// qcow2 (read and written).
    Qcow2,
    /// VMDK (read only: descriptor files with flat extents).
    Vmdk,
}

impl AnyFormat {
    /// The name QEMU uses.
    pub fn name(self) -> &'static str {
        DiskFormat::from(self).name()
    }

    /// Parses a format name as given in an option value (`backing_fmt=qcow2`).
    pub fn from_name(name: &str) -> Option<Self> {
        DiskFormat::from_name(name).map(Into::into)
    }
}

impl From<AnyFormat> for DiskFormat {
    fn from(format: AnyFormat) -> Self {
        match format {
            AnyFormat::Qed => Self::Qed,
            AnyFormat::Raw => Self::Raw,
            AnyFormat::Qcow2 => Self::Qcow2,
            AnyFormat::Vmdk => Self::Vmdk,
        }
    }
}

impl From<DiskFormat> for AnyFormat {
    fn from(format: DiskFormat) -> Self {
        match format {
            DiskFormat::Qed => Self::Qed,
            DiskFormat::Raw => Self::Raw,
            DiskFormat::Qcow2 => Self::Qcow2,
            DiskFormat::Vmdk => Self::Vmdk,
        }
    }
}

/// What QEMU's tools print when probing takes a file for raw: writes to its first sector are
/// then restricted (see `qed_nbd::export::RawExport::probed`).
pub fn probed_raw_warning(path: &Path) -> String {
    format!(
        "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on \
         block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove \
         the restrictions.\n",
        path.display()
    )
}

impl From<ImageFormat> for BackingFormat {
    fn from(format: ImageFormat) -> Self {
        match format {
            ImageFormat::Qed => Self::Qed,
            ImageFormat::Raw => Self::Raw,
        }
    }
}

/// A cache mode as qemu-img names it (`-t`, `-T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheArg {
    /// Through the page cache, flushed at the end.
    Writeback,
    /// Through the page cache (qemu-img flushes after every write; here as writeback).
    Writethrough,
    /// `O_DIRECT`.
    None,
    /// `O_DIRECT` (qemu-img also flushes after every write; here as none).
    Directsync,
    /// Through the page cache, never flushed.
    Unsafe,
}

impl From<CacheArg> for CacheMode {
    fn from(cache: CacheArg) -> Self {
        match cache {
            CacheArg::Writeback | CacheArg::Writethrough => Self::Writeback,
            CacheArg::None | CacheArg::Directsync => Self::None,
            CacheArg::Unsafe => Self::Unsafe,
        }
    }
}

impl From<BackingFormat> for ImageFormat {
    fn from(format: BackingFormat) -> Self {
        match format {
            BackingFormat::Qed => Self::Qed,
            BackingFormat::Raw => Self::Raw,
        }
    }
}

/// How a command prints its result (`--output`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Text for people, laid out as qemu-img lays it out.
    #[default]
    Human,
    /// One JSON document on stdout, with qemu-img's field names and types.
    Json,
}

/// Bytes the file occupies on disk (allocated blocks), as `qemu-img info` reports them.
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.blocks() * 512)
}

/// The size QEMU gives a file: its length rounded up to whole 512-byte sectors (the block
/// layer counts sectors; the partial tail reads as zeros).
pub fn sector_rounded_len(len: u64) -> u64 {
    len.div_ceil(512).saturating_mul(512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in [ImageFormat::Qed, ImageFormat::Raw] {
            assert_eq!(ImageFormat::from_name(f.name()), Some(f));
        }
        assert_eq!(ImageFormat::from_name("qcow2"), None);
        for f in [
            AnyFormat::Qed,
            AnyFormat::Raw,
            AnyFormat::Qcow2,
            AnyFormat::Vmdk,
        ] {
            assert_eq!(AnyFormat::from_name(f.name()), Some(f));
        }
        assert_eq!(AnyFormat::from_name("vdi"), None);
    }

    #[test]
    fn sector_rounding() {
        assert_eq!(sector_rounded_len(0), 0);
        assert_eq!(sector_rounded_len(1000), 1024);
        assert_eq!(sector_rounded_len(41_960), 41_984);
        assert_eq!(sector_rounded_len(512), 512);
    }
}

//! qcow2 and VMDK disks, through the `imago` crate (feature `foreign`).
//!
//! A [`ForeignDisk`] is a chain of layers opened one by one: each qcow2 or VMDK layer is
//! opened by imago *without* its backing file, and the chain under it is opened here (qcow2,
//! VMDK, and then raw or QED layers through [`BackingLayer`]). So every layer answers block
//! status for itself alone, and `ops::status` walks the chain as it walks a QED chain:
//! depth, zero ranges and unallocated ranges are known layer by layer, and a range no layer
//! holds is never read. A qcow2 image may thus have a QED backing file, which imago alone
//! cannot open.
//!
//! What imago answers, per layer: a data mapping is data (with its host offset), a qcow2 zero
//! cluster is zeros, an unallocated cluster is unallocated (the layer below answers), a
//! compressed cluster is [`StatusKind::Compressed`](super::StatusKind::Compressed). VMDK: only
//! descriptor files with FLAT and ZERO extents are read (imago refuses sparse VMDK files);
//! flat extents are data throughout.
//!
//! Each layer's file is also opened through [`FileStorage`] with the QEMU lock that the
//! access asks for (imago takes none), so qemu-img and qed see each other's locks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::file::File;
use imago::qcow2::Qcow2;
use imago::vmdk::Vmdk;
use imago::{
    FormatAccess, FormatCreateBuilder, FormatDriverBuilder, PermissiveImplicitOpenGate,
    ShallowMapping, Storage as _, StorageCreateOptions, StorageOpenOptions,
};

use crate::backing::{BackingFormat, BackingLayer, BackingPolicy};
use crate::image::{resolve_backing_path, MAX_CHAIN_DEPTH};
use crate::storage::{CacheMode, FileOptions, FileStorage, LockMode};
use crate::{Error, OpenOptions, Result};

use super::disk::{probe_disk_format, DiskFormat};
use super::status::StatusKind;

/// One qcow2 or VMDK layer, opened by imago without its backing file.
#[derive(Debug)]
pub(crate) struct ImagoLayer {
    access: FormatAccess<File>,
    format: DiskFormat,
    path: PathBuf,
    /// Holds the QEMU lock on the file.
    _lock: FileStorage,
}

/// What an imago layer says about one range.
pub(crate) struct ImagoPiece {
    pub(crate) length: u64,
    pub(crate) kind: StatusKind,
}

impl ImagoLayer {
    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Virtual size.
    pub(crate) fn size(&self) -> u64 {
        self.access.size()
    }

    /// What the layer alone holds from `pos` (ending at or before `end`).
    pub(crate) fn status(&self, pos: u64, end: u64) -> Result<ImagoPiece> {
        let (mapping, length) = self
            .access
            .get_shallow_mapping(pos, end - pos)
            .map_err(Error::io("block status", pos))?;
        let length = length.min(end - pos);
        let kind = match mapping {
            ShallowMapping::Raw { offset, .. } => StatusKind::Data {
                host_offset: offset,
            },
            ShallowMapping::Zero { explicit: true, .. } => StatusKind::Zero { host_offset: None },
            ShallowMapping::Special { .. } => StatusKind::Compressed,
            // Unallocated here (no backing file is attached), or past the end.
            _ => StatusKind::Unallocated,
        };
        Ok(ImagoPiece {
            length: length.max(1),
            kind,
        })
    }

    /// Reads what this layer holds (its data; unallocated ranges read as zeros).
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.access
            .read(&mut *buf, offset)
            .map_err(Error::io("read", offset))
    }

    /// The cluster size (qcow2 v3: the zeroing granularity).
    fn cluster_size(&self) -> Option<u64> {
        self.access.inner().zero_granularity()
    }

    /// Names the file in an error of a layer under the top.
    pub(crate) fn name_error(&self, depth: usize, error: Error) -> Error {
        match error {
            e @ (Error::Backing { .. } | Error::Chain(_) | Error::BackingLoop { .. }) => e,
            cause => Error::Backing {
                path: self.path.clone(),
                depth,
                cause: Box::new(cause),
            },
        }
    }
}

/// A qcow2 or VMDK image with its backing chain.
#[derive(Debug)]
pub struct ForeignDisk {
    /// The qcow2 and VMDK layers, top first.
    pub(crate) layers: Vec<ImagoLayer>,
    /// The chain under the last of them (a raw file or a QED image with its own chain).
    pub(crate) below: Option<Arc<BackingLayer>>,
    writable: bool,
    /// Flush to stable storage at close (not with cache mode `unsafe`).
    sync: bool,
}

fn open_error(e: std::io::Error) -> Error {
    Error::io("open", 0)(e)
}

fn storage_options(cache: CacheMode) -> StorageOpenOptions {
    StorageOpenOptions::new().direct(cache == CacheMode::None)
}

fn lock(path: &Path, writable: bool, options: &OpenOptions) -> Result<FileStorage> {
    FileStorage::open(
        path,
        &FileOptions {
            writable,
            create: false,
            cache: CacheMode::Writeback,
            lock: LockMode::for_access(writable, options.force_share),
        },
    )
    .map_err(Error::io("open", 0))
}

/// A qcow2 layer as imago opened it, before it is wrapped: its backing file name and format.
struct Opened {
    access: FormatAccess<File>,
    backing: Option<(String, Option<String>)>,
}

fn open_qcow2(path: &Path, writable: bool, cache: CacheMode) -> Result<Opened> {
    let qcow2 = Qcow2::<File>::builder_path(path)
        .write(writable)
        .backing(None)
        .storage_open_options(storage_options(cache))
        .open(PermissiveImplicitOpenGate::default())
        .map_err(open_error)?;
    let backing = qcow2
        .implicit_backing_file()
        .map(|name| (name.clone(), qcow2.implicit_backing_format().cloned()));
    Ok(Opened {
        access: FormatAccess::new(qcow2),
        backing,
    })
}

/// Whether the file starts with the magic of a sparse VMDK extent.
fn starts_sparse(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == b"KDMV"
}

fn open_vmdk(path: &Path, writable: bool, cache: CacheMode) -> Result<Opened> {
    if writable {
        return Err(Error::Unsupported("writing VMDK images".into()));
    }
    if starts_sparse(path) {
        return Err(Error::Unsupported(
            "sparse VMDK files (monolithicSparse, streamOptimized); VMDK images are read \
             from descriptor files with flat extents only"
                .into(),
        ));
    }
    let vmdk = Vmdk::<File>::builder_path(path)
        .write(false)
        .storage_open_options(storage_options(cache))
        .open(PermissiveImplicitOpenGate::default())
        .map_err(open_error)?;
    Ok(Opened {
        access: FormatAccess::new(vmdk),
        backing: None,
    })
}

impl ForeignDisk {
    /// Opens the qcow2 or VMDK image at `path` with its backing chain (as `options.backing`
    /// says); `options.writable` opens the top for writing (qcow2 only).
    pub(crate) fn open(path: &Path, format: DiskFormat, options: &OpenOptions) -> Result<Self> {
        let mut chain = Vec::new();
        let lock_file = lock(path, options.writable, options)?;
        let opened = match format {
            DiskFormat::Qcow2 => open_qcow2(path, options.writable, options.cache)?,
            DiskFormat::Vmdk => open_vmdk(path, options.writable, options.cache)?,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "{} is not a qcow2 or VMDK format",
                    other.name()
                )))
            }
        };
        Self::with_chain(path, format, opened, lock_file, options, &mut chain)
    }

    /// Creates a qcow2 image of `size` bytes at `path` (replacing any file there) with
    /// `cluster_size` and, if given, a backing file name (relative to the new image's
    /// directory) and format, and opens it for writing with its backing chain.
    pub(crate) fn create_qcow2(
        path: &Path,
        size: u64,
        cluster_size: u32,
        backing: Option<(&str, DiskFormat)>,
        cache: CacheMode,
    ) -> Result<Self> {
        let file = File::create_open(
            StorageCreateOptions::new()
                .filename(path)
                .overwrite(true)
                .modify_open_opts(|o| o.direct(cache == CacheMode::None)),
        )
        .map_err(Error::io("create", 0))?;
        let mut builder = Qcow2::<File>::create_builder(file)
            .size(size)
            .cluster_size(cluster_size as usize);
        if let Some((name, format)) = backing {
            builder = builder.backing(name.to_string(), format.name().to_string());
        }
        let qcow2 = builder
            .create_open(PermissiveImplicitOpenGate::default(), |file| {
                Ok(Qcow2::<File>::builder(file).backing(None))
            })
            .map_err(Error::io("create", 0))?;
        let opened = Opened {
            access: FormatAccess::new(qcow2),
            backing: backing.map(|(name, format)| (name.to_string(), Some(format.name().into()))),
        };
        let options = OpenOptions {
            writable: true,
            cache,
            backing: BackingPolicy::Follow,
            ..OpenOptions::read_write()
        };
        let lock_file = lock(path, true, &options)?;
        Self::with_chain(
            path,
            DiskFormat::Qcow2,
            opened,
            lock_file,
            &options,
            &mut Vec::new(),
        )
    }

    /// Wraps the top layer and opens the chain under it.
    fn with_chain(
        path: &Path,
        format: DiskFormat,
        opened: Opened,
        lock_file: FileStorage,
        options: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Self> {
        let mut disk = Self {
            layers: Vec::new(),
            below: None,
            writable: options.writable,
            sync: options.cache != CacheMode::Unsafe,
        };
        let backing_options = OpenOptions {
            writable: false,
            ..options.clone()
        };
        let mut current = (path.to_path_buf(), format, opened, lock_file);
        loop {
            let (path, format, opened, lock_file) = current;
            chain.push(std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone()));
            let backing = opened.backing;
            disk.layers.push(ImagoLayer {
                access: opened.access,
                format,
                path: path.clone(),
                _lock: lock_file,
            });
            let Some((name, format_name)) = backing else {
                return Ok(disk);
            };
            match options.backing {
                BackingPolicy::Ignore => return Ok(disk),
                BackingPolicy::Deny => {
                    return Err(Error::Unsupported(format!(
                        "image names backing file {name:?} and opening backing files is denied"
                    )))
                }
                BackingPolicy::Follow => {}
            }
            let resolved = resolve_backing_path(&path, &name);
            let depth = disk.layers.len();
            let wrap = |cause: Error| match cause {
                e @ (Error::Chain(_) | Error::BackingLoop { .. } | Error::Backing { .. }) => e,
                e => Error::Backing {
                    path: resolved.clone(),
                    depth,
                    cause: Box::new(e),
                },
            };
            let canonical = std::fs::canonicalize(&resolved).unwrap_or_else(|_| resolved.clone());
            if chain.contains(&canonical) {
                return Err(Error::BackingLoop { path: resolved });
            }
            if chain.len() > MAX_CHAIN_DEPTH {
                return Err(Error::Chain(format!(
                    "backing chain deeper than {MAX_CHAIN_DEPTH}"
                )));
            }
            let format = match format_name.as_deref() {
                None => probe_disk_format(&resolved).map_err(wrap)?,
                Some("file") => DiskFormat::Raw,
                Some(name) => DiskFormat::from_name(name)
                    .ok_or_else(|| wrap(Error::Unsupported(format!("backing format '{name}'"))))?,
            };
            let backing_format = match format {
                DiskFormat::Raw => BackingFormat::Raw,
                DiskFormat::Qed => BackingFormat::Qed,
                DiskFormat::Qcow2 | DiskFormat::Vmdk => {
                    let lock_file = lock(&resolved, false, &backing_options).map_err(wrap)?;
                    let opened = match format {
                        DiskFormat::Qcow2 => open_qcow2(&resolved, false, options.cache),
                        _ => open_vmdk(&resolved, false, options.cache),
                    }
                    .map_err(wrap)?;
                    current = (resolved, format, opened, lock_file);
                    continue;
                }
            };
            let layer = BackingLayer::open_in_chain(
                &resolved,
                Some(backing_format),
                &backing_options,
                chain,
            )?;
            disk.below = Some(Arc::new(layer));
            return Ok(disk);
        }
    }

    fn top(&self) -> &ImagoLayer {
        &self.layers[0]
    }

    /// The format of the top layer.
    pub fn format(&self) -> DiskFormat {
        self.top().format
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.top().size()
    }

    /// The file of the top layer.
    pub fn path(&self) -> &Path {
        self.top().path()
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The cluster size of the top layer, where it has one.
    pub fn cluster_size(&self) -> Option<u64> {
        self.top().cluster_size()
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    /// Writes guest bytes into the top layer.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, buf.len() as u64)?;
        self.top()
            .access
            .write(buf, offset)
            .map_err(Error::io("write", offset))
    }

    /// Makes a range of the top layer read as zeros (qcow2 zero clusters where whole clusters
    /// are covered, zeros written elsewhere).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        self.top()
            .access
            .write_zeroes(offset, len)
            .map_err(Error::io("write zeroes", offset))
    }

    /// Writes back the top layer's metadata and makes it durable.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let access = &self.top().access;
        access.flush().map_err(Error::io("flush", 0))?;
        if self.sync {
            access.sync().map_err(Error::io("flush", 0))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Disk, StatusKind};
    use super::*;

    fn kinds(disk: &Disk) -> Vec<(u64, u64, usize, StatusKind)> {
        disk.block_status(0, disk.size())
            .map(|s| s.map(|s| (s.offset, s.length, s.depth, s.kind)))
            .collect::<Result<_>>()
            .unwrap()
    }

    #[test]
    fn a_new_qcow2_chain_answers_layer_by_layer() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("base.qcow2");
        let base =
            Disk::create_qcow2(&base_path, 1 << 20, 4096, None, CacheMode::Writeback).unwrap();
        base.write_at(&[7; 8192], 0).unwrap();
        base.close().unwrap();
        let top_path = dir.path().join("top.qcow2");
        let top = Disk::create_qcow2(
            &top_path,
            2 << 20,
            4096,
            Some(("base.qcow2", DiskFormat::Qcow2)),
            CacheMode::Writeback,
        )
        .unwrap();
        top.write_zeroes(4096, 4096, true).unwrap();
        top.write_at(&[9; 4096], 1 << 20).unwrap();
        top.close().unwrap();

        let top = Disk::open_any(&top_path, None, &OpenOptions::read_only()).unwrap();
        assert_eq!(top.format(), DiskFormat::Qcow2);
        assert_eq!(top.layer_paths().len(), 2);
        let found = kinds(&top);
        assert!(
            matches!(found[0], (0, 4096, 1, StatusKind::Data { .. })),
            "{found:?}"
        );
        assert_eq!(
            found[1],
            (4096, 4096, 0, StatusKind::Zero { host_offset: None })
        );
        // Past the backing file's end: unallocated at the depth that says so.
        assert!(found
            .iter()
            .any(|s| s.0 == 1 << 20 && s.2 == 0 && s.3.is_data()));
        let mut buf = vec![1u8; 12288];
        top.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..].iter().all(|&b| b == 0));
        top.read_at(&mut buf[..4096], 1 << 20).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 9));
        assert!(matches!(top.write_at(&buf, 0), Err(Error::ReadOnly)));
    }

    #[test]
    fn loops_and_unknown_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.qcow2");
        // Its own backing file: made, then refused as a loop when its chain is opened.
        let err = Disk::create_qcow2(
            &a,
            1 << 20,
            65536,
            Some(("a.qcow2", DiskFormat::Qcow2)),
            CacheMode::Writeback,
        )
        .unwrap_err();
        assert!(matches!(err, Error::BackingLoop { .. }), "{err}");
        let err = Disk::open_any(&a, None, &OpenOptions::read_only()).unwrap_err();
        assert!(matches!(err, Error::BackingLoop { .. }), "{err}");
        let ignored = OpenOptions {
            backing: BackingPolicy::Ignore,
            ..OpenOptions::read_only()
        };
        assert_eq!(
            Disk::open_any(&a, None, &ignored)
                .unwrap()
                .layer_paths()
                .len(),
            1
        );
        let err = Disk::open(&a, None, &OpenOptions::read_only()).unwrap_err();
        assert!(err.to_string().contains("convert and compare"), "{err}");
    }
}

//! Backing layers: where unallocated clusters read from.

use std::path::{Path, PathBuf};

use crate::image::probe_format;
use crate::storage::{FileOptions, FileStorage, LockMode, Storage};
use crate::{Error, Image, OpenOptions, Result};

/// Format of a backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// A raw disk image.
    Raw,
    /// A QED image.
    Qed,
}

impl BackingFormat {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qed => "qed",
        }
    }
}

/// Whether an image may open the backing file its header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackingPolicy {
    /// Open the named file (relative names resolve against the image's directory).
    #[default]
    Follow,
    /// Refuse to open an image that names a backing file.
    Deny,
    /// Do not open it: unallocated clusters read as zeros (for inspecting the image alone).
    Ignore,
}

/// An opened backing image, read-only.
pub enum BackingLayer {
    /// A raw file: guest offset = file offset; zeros past its end.
    Raw {
        /// The file.
        storage: Box<dyn Storage>,
        /// Its length at open.
        len: u64,
        /// Where it was opened from, if a file.
        path: Option<PathBuf>,
    },
    /// A QED image (which may have its own backing layer).
    Qed(Box<Image>),
}

impl std::fmt::Debug for BackingLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Raw { len, path, .. } => f
                .debug_struct("Raw")
                .field("len", len)
                .field("path", path)
                .finish(),
            Self::Qed(image) => f.debug_tuple("Qed").field(image).finish(),
        }
    }
}

impl BackingLayer {
    /// Opens the file at `path` as a backing layer of `format` (probed when `None`), with its
    /// own backing chain as `options.backing` says. `options.writable` opens it for writing
    /// (for commit). Errors name the file.
    pub fn open(path: &Path, format: Option<BackingFormat>, options: &OpenOptions) -> Result<Self> {
        Self::open_in_chain(path, format, options, &mut Vec::new())
    }

    pub(crate) fn open_in_chain(
        path: &Path,
        format: Option<BackingFormat>,
        options: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Self> {
        let depth = chain.len();
        let wrap = |cause: Error| match cause {
            e @ (Error::Chain(_) | Error::BackingLoop { .. }) => e,
            e => Error::Backing {
                path: path.to_path_buf(),
                depth,
                cause: Box::new(e),
            },
        };
        let format = match format {
            Some(format) => format,
            None => probe_format(path).map_err(wrap)?,
        };
        match format {
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
                .map_err(Error::io("open", 0))
                .map_err(wrap)?;
                let len = storage
                    .len()
                    .map_err(Error::io("length", 0))
                    .map_err(wrap)?;
                Ok(Self::Raw {
                    storage: Box::new(storage),
                    len,
                    path: Some(path.to_path_buf()),
                })
            }
            BackingFormat::Qed => Ok(Self::Qed(Box::new(
                Image::open_chain(path, options, chain).map_err(wrap)?,
            ))),
        }
    }

    /// A raw layer on any storage.
    pub fn raw(storage: Box<dyn Storage>) -> Result<Self> {
        let len = storage
            .len()
            .map_err(Error::io("length of backing file", 0))?;
        Ok(Self::Raw {
            storage,
            len,
            path: None,
        })
    }

    /// The format of this layer.
    pub fn format(&self) -> BackingFormat {
        match self {
            Self::Raw { .. } => BackingFormat::Raw,
            Self::Qed(_) => BackingFormat::Qed,
        }
    }

    /// Virtual size of this layer (bytes past it read as zeros).
    pub fn size(&self) -> u64 {
        match self {
            Self::Raw { len, .. } => *len,
            Self::Qed(image) => image.size(),
        }
    }

    /// Where this layer was opened from, if a file.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Raw { path, .. } => path.as_deref(),
            Self::Qed(image) => image.path(),
        }
    }

    /// Reads guest bytes; everything past the layer's end reads as zeros. An error names the
    /// file it comes from (the deepest layer that failed) and its depth below this layer's
    /// user (1 = this layer).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        let result = match self {
            Self::Raw { storage, .. } => storage
                .read_at(inside, offset)
                .map_err(Error::io("read", offset)),
            Self::Qed(image) => image.read_at(inside, offset),
        };
        result.map_err(|e| self.name_error(e))
    }

    /// Says which file an error of this layer comes from.
    pub(crate) fn name_error(&self, error: Error) -> Error {
        match error {
            Error::Backing { path, depth, cause } => Error::Backing {
                path,
                depth: depth + 1,
                cause,
            },
            cause => Error::Backing {
                path: self
                    .path()
                    .map_or_else(|| PathBuf::from("<storage>"), Path::to_path_buf),
                depth: 1,
                cause: Box::new(cause),
            },
        }
    }
}

//! How to open an image, and what its header says.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qed_format::Header;

use crate::backing::{BackingFormat, BackingLayer, BackingPolicy};
use crate::storage::CacheMode;
use crate::Result;

/// The signature of [`BackingNames`]: the name as stored, the format the header fixes, the
/// options the backing file is opened with, and the files of the images above it (canonical
/// paths, top first: a backing file among them is a loop); `None` when the name is a path
/// after all.
pub type OpenBackingByName = dyn Fn(&[u8], Option<BackingFormat>, &OpenOptions, &[PathBuf]) -> Option<Result<BackingLayer>>
    + Send
    + Sync;

/// Opens backing files whose names are not paths: a caller that understands another syntax
/// (QEMU's `json:{...}`, say) opens those itself. Asked first for every backing file down
/// the chain; a name it answers `None` for is resolved as a path.
#[derive(Clone)]
pub struct BackingNames(pub Arc<OpenBackingByName>);

impl std::fmt::Debug for BackingNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackingNames(..)")
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open for writing.
    pub writable: bool,
    /// Host page-cache use.
    pub cache: CacheMode,
    /// Open without taking QEMU-compatible image locks (read-only inspection while another
    /// process uses the image).
    pub force_share: bool,
    /// Whether to open the backing file the header names.
    pub backing: BackingPolicy,
    /// Memory budget of the L2 cache in bytes. Tables with unwritten changes are written back
    /// when they exceed it; beyond it, memory holds only the tables requests are using.
    pub l2_cache_bytes: usize,
    /// Idle time after the last metadata change after which metadata is written back and
    /// NEED_CHECK cleared.
    pub clean_after: Duration,
    /// Largest L1 table (bytes) an image may demand.
    pub max_table_bytes: u64,
    /// Backing files named other than by path, opened by the caller.
    pub backing_names: Option<BackingNames>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            writable: false,
            cache: CacheMode::Writeback,
            force_share: false,
            backing: BackingPolicy::Follow,
            l2_cache_bytes: 32 << 20,
            clean_after: Duration::from_secs(5),
            max_table_bytes: 256 << 20,
            backing_names: None,
        }
    }
}

impl OpenOptions {
    /// Options for a read-only open.
    pub fn read_only() -> Self {
        Self::default()
    }

    /// Options for a read-write open.
    pub fn read_write() -> Self {
        Self {
            writable: true,
            ..Self::default()
        }
    }
}

/// What the header says, for `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The header as currently on disk (NEED_CHECK reported truthfully).
    pub header: Header,
    /// Virtual disk size.
    pub size: u64,
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// Clusters per table.
    pub table_size: u32,
    /// The backing file name for display (bytes that are not UTF-8 shown as U+FFFD).
    pub backing_file: Option<String>,
    /// The backing file name as stored, up to its first NUL.
    pub backing_name: Option<Vec<u8>>,
    /// The backing file resolved against the image's directory.
    pub backing_path: Option<PathBuf>,
    /// The backing format when the header fixes it (raw with NO_PROBE).
    pub backing_format: Option<BackingFormat>,
    /// Whether NEED_CHECK is set.
    pub dirty: bool,
}

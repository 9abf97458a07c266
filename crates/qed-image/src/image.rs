//! Opening, creating and closing an image; the state shared by every I/O path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qed_format::{
    new_image_layout, CreateParams, Geometry, Header, L1Entry, ValidHeader, FEATURE_NEED_CHECK,
    HEADER_LEN, MAGIC,
};

use crate::backing::{BackingFormat, BackingLayer, BackingPolicy};
use crate::cache::{CacheStats, L2Cache};
use crate::check::{CheckReport, Repair};
use crate::need_check::IdleTimer;
use crate::storage::{CacheMode, FileOptions, FileStorage, LockMode, Storage};
use crate::table::Entries;
use crate::{Error, Result};

/// Deepest backing chain opened.
pub const MAX_CHAIN_DEPTH: usize = 32;

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
    /// Memory budget of the L2 cache in bytes (tables with unwritten changes may exceed it
    /// until the next write-back).
    pub l2_cache_bytes: usize,
    /// Allocation idle time after which metadata is written back and NEED_CHECK cleared.
    pub clean_after: Duration,
    /// Largest L1 table (bytes) an image may demand.
    pub max_table_bytes: u64,
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
    /// The backing file name as stored.
    pub backing_file: Option<String>,
    /// The backing file resolved against the image's directory.
    pub backing_path: Option<PathBuf>,
    /// The backing format when the header fixes it (raw with NO_PROBE).
    pub backing_format: Option<BackingFormat>,
    /// Whether NEED_CHECK is set.
    pub dirty: bool,
}

/// State shared by the I/O paths and the idle timer.
pub(crate) struct Inner {
    pub(crate) storage: Box<dyn Storage>,
    pub(crate) valid: ValidHeader,
    pub(crate) geometry: Geometry,
    /// The header as last written (features change with NEED_CHECK).
    pub(crate) header: Mutex<Header>,
    pub(crate) size: AtomicU64,
    pub(crate) writable: bool,
    pub(crate) l1: Entries,
    pub(crate) cache: L2Cache,
    pub(crate) cache_budget: usize,
    /// End of the allocated area: new clusters are handed out here (bump allocation).
    pub(crate) next_free: AtomicU64,
    /// File length at open: clusters at or past it were never written and read as zeros.
    pub(crate) fresh_from: AtomicU64,
    /// Serializes creation of L2 tables (rare: one per L1 entry).
    pub(crate) table_creation: Mutex<()>,
    /// Held for the instant of a bump allocation, and by write-back while it extends the
    /// file to cover every allocated cluster (so the extension never cuts a write short).
    pub(crate) file_growth: Mutex<()>,
    /// Serializes write-back and header changes; the one place write ordering is decided.
    pub(crate) writeback: Mutex<()>,
    /// Whether the header on disk has NEED_CHECK set.
    pub(crate) need_check_on_disk: AtomicBool,
    pub(crate) poisoned: AtomicBool,
    /// Bumped at every metadata change; the idle timer watches it.
    pub(crate) generation: AtomicU64,
    pub(crate) allocations_in_flight: AtomicUsize,
    pub(crate) backing: Option<BackingLayer>,
    pub(crate) backing_name: Option<String>,
    pub(crate) path: Option<PathBuf>,
    pub(crate) label: String,
}

/// An open QED image. `Send + Sync`: every I/O method takes `&self`.
pub struct Image {
    pub(crate) inner: Arc<Inner>,
    timer: Option<IdleTimer>,
    closed: bool,
    open_repair: Option<CheckReport>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("label", &self.inner.label)
            .field("size", &self.size())
            .field("writable", &self.inner.writable)
            .finish_non_exhaustive()
    }
}

/// Returns true if `bytes` start with the QED magic.
pub fn has_qed_magic(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && bytes[..4] == MAGIC.to_le_bytes()
}

/// Probes a file: QED if it starts with the magic, raw otherwise.
pub fn probe_format(path: &Path) -> Result<BackingFormat> {
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
    let mut magic = [0u8; 4];
    storage
        .read_at(&mut magic, 0)
        .map_err(Error::io("read", 0))?;
    Ok(if has_qed_magic(&magic) {
        BackingFormat::Qed
    } else {
        BackingFormat::Raw
    })
}

/// Resolves a backing name stored in `image` against the image's directory.
pub fn resolve_backing_path(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(name),
        None => name.to_path_buf(),
    }
}

impl Image {
    /// Creates a new image file at `path`, byte-identical to `qemu-img create -f qed`.
    pub fn create(path: &Path, params: &CreateParams) -> Result<()> {
        // Refuse invalid parameters before the file is created or truncated.
        new_image_layout(params)?;
        let storage = FileStorage::open(
            path,
            &FileOptions {
                writable: true,
                create: true,
                cache: CacheMode::Writeback,
                lock: LockMode::Write,
            },
        )
        .map_err(Error::io("create", 0))?;
        Self::create_on(&storage, params)
    }

    /// Writes a new, empty image onto `storage` (which is truncated first).
    pub fn create_on(storage: &dyn Storage, params: &CreateParams) -> Result<()> {
        let (_, header_cluster, file_len) = new_image_layout(params)?;
        storage.set_len(0).map_err(Error::io("truncate", 0))?;
        storage
            .write_at(&header_cluster, 0)
            .map_err(Error::io("write header", 0))?;
        storage
            .set_len(file_len)
            .map_err(Error::io("extend", file_len))?;
        storage.flush().map_err(Error::io("flush", 0))
    }

    /// Opens the image file at `path`, with its backing chain as `options.backing` says.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Self> {
        Self::open_chain(path, options, &mut Vec::new())
    }

    fn open_chain(path: &Path, options: &OpenOptions, chain: &mut Vec<PathBuf>) -> Result<Self> {
        // Loops are found before opening, so a loop never trips over our own lock.
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if chain.contains(&canonical) {
            return Err(Error::Chain(format!(
                "backing chain loops back to {}",
                canonical.display()
            )));
        }
        if chain.len() > MAX_CHAIN_DEPTH {
            return Err(Error::Chain(format!(
                "backing chain deeper than {MAX_CHAIN_DEPTH}"
            )));
        }
        let lock = LockMode::for_access(options.writable, options.force_share);
        let storage = FileStorage::open(
            path,
            &FileOptions {
                writable: options.writable,
                create: false,
                cache: options.cache,
                lock,
            },
        )
        .map_err(Error::io("open", 0))?;
        chain.push(canonical);
        let label = path.display().to_string();
        let image_path = path.to_path_buf();
        let backing_options = OpenOptions {
            writable: false,
            ..options.clone()
        };
        let result = Self::open_storage_with(
            Box::new(storage),
            options,
            label,
            Some(image_path),
            |header, name| {
                if options.backing == BackingPolicy::Ignore {
                    return Ok(None);
                }
                if options.backing == BackingPolicy::Deny {
                    return Err(Error::Unsupported(format!(
                        "image names backing file {name:?} and opening backing files is denied"
                    )));
                }
                let resolved = resolve_backing_path(path, name);
                let depth = chain.len();
                let wrap = |cause: Error| Error::Backing {
                    path: resolved.clone(),
                    depth,
                    cause: Box::new(cause),
                };
                let format = if header.backing_is_raw() {
                    BackingFormat::Raw
                } else {
                    probe_format(&resolved).map_err(wrap)?
                };
                let layer = match format {
                    BackingFormat::Raw => {
                        let storage = FileStorage::open(
                            &resolved,
                            &FileOptions {
                                writable: false,
                                create: false,
                                cache: options.cache,
                                lock: LockMode::for_access(false, options.force_share),
                            },
                        )
                        .map_err(Error::io("open", 0))
                        .map_err(wrap)?;
                        let len = storage
                            .len()
                            .map_err(Error::io("length", 0))
                            .map_err(wrap)?;
                        BackingLayer::Raw {
                            storage: Box::new(storage),
                            len,
                            path: Some(resolved.clone()),
                        }
                    }
                    BackingFormat::Qed => BackingLayer::Qed(Box::new(
                        Self::open_chain(&resolved, &backing_options, chain).map_err(
                            |e| match e {
                                e @ Error::Chain(_) => e,
                                e => wrap(e),
                            },
                        )?,
                    )),
                };
                Ok(Some(layer))
            },
        );
        chain.pop();
        result
    }

    /// Opens an image on any storage. `backing` supplies the backing layer (the name in the
    /// header is not followed); `None` means unallocated clusters read as zeros.
    pub fn open_storage(
        storage: Box<dyn Storage>,
        options: &OpenOptions,
        backing: Option<BackingLayer>,
    ) -> Result<Self> {
        let mut backing = backing;
        Self::open_storage_with(storage, options, "<storage>".into(), None, |_, _| {
            Ok(backing.take())
        })
    }

    fn open_storage_with(
        storage: Box<dyn Storage>,
        options: &OpenOptions,
        label: String,
        path: Option<PathBuf>,
        open_backing: impl FnOnce(&Header, &str) -> Result<Option<BackingLayer>>,
    ) -> Result<Self> {
        let file_len = storage.len().map_err(Error::io("length", 0))?;
        let mut raw = [0u8; HEADER_LEN];
        storage
            .read_at(&mut raw, 0)
            .map_err(Error::io("read header", 0))?;
        let mut header = Header::decode(&raw)?;
        let valid = header.validate(file_len)?;
        let geometry = valid.geometry();
        if geometry.table_bytes() > options.max_table_bytes {
            return Err(Error::TooLarge {
                what: "L1 table",
                bytes: geometry.table_bytes(),
                limit: options.max_table_bytes,
            });
        }
        let backing_name = match valid.backing_name_range() {
            Some((offset, len)) => {
                let mut name = vec![0u8; len];
                storage
                    .read_at(&mut name, offset)
                    .map_err(Error::io("read backing file name", offset))?;
                Some(String::from_utf8_lossy(&name).into_owned())
            }
            None => None,
        };
        if options.writable && header.autoclear_features != 0 {
            // Unknown autoclear bits: a writer that does not understand them must clear them.
            header.autoclear_features = 0;
            storage
                .write_at(&header.encode(), 0)
                .map_err(Error::io("write header", 0))?;
            storage.flush().map_err(Error::io("flush", 0))?;
        }
        let l1_offset = header.l1_table_offset;
        let mut l1_bytes = vec![0u8; geometry.table_bytes() as usize];
        storage
            .read_at(&mut l1_bytes, l1_offset)
            .map_err(Error::io("read L1 table", l1_offset))?;
        let l1 = Entries::from_le_bytes(&l1_bytes);
        drop(l1_bytes);
        let backing = match &backing_name {
            Some(name) => open_backing(&header, name)?,
            None => None,
        };
        let cache_budget = options.l2_cache_bytes;
        let inner = Arc::new(Inner {
            storage,
            valid,
            geometry,
            need_check_on_disk: AtomicBool::new(header.needs_check()),
            header: Mutex::new(header),
            size: AtomicU64::new(header.image_size),
            writable: options.writable,
            l1,
            cache: L2Cache::new(cache_budget, geometry.table_bytes()),
            cache_budget,
            next_free: AtomicU64::new(geometry.allocated_end(file_len)),
            fresh_from: AtomicU64::new(file_len),
            table_creation: Mutex::new(()),
            file_growth: Mutex::new(()),
            writeback: Mutex::new(()),
            poisoned: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            allocations_in_flight: AtomicUsize::new(0),
            backing,
            backing_name,
            path,
            label,
        });
        let timer = options
            .writable
            .then(|| IdleTimer::start(Arc::downgrade(&inner), options.clean_after));
        let mut image = Self {
            inner,
            timer,
            closed: false,
            open_repair: None,
        };
        if options.writable && header.needs_check() {
            // Not closed cleanly: check and repair before anything is written.
            match image.inner.check(Repair::All) {
                Ok(report) if report.check_errors > 0 => {
                    // Some table could not be read, so the repair is incomplete; a close
                    // would clear NEED_CHECK over it. Leave the file for a later repair.
                    image.inner.poisoned.store(true, Ordering::Release);
                    return Err(Error::Io {
                        op: "check and repair at open",
                        offset: 0,
                        source: std::io::Error::other(report.findings.join("; ")),
                    });
                }
                Ok(report) => image.open_repair = Some(report),
                Err(e) => {
                    // Leave the file as it is (NEED_CHECK stays set) for a later repair.
                    image.inner.poisoned.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
        Ok(image)
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size.load(Ordering::Acquire)
    }

    /// The validated geometry.
    pub fn geometry(&self) -> Geometry {
        self.inner.geometry
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        self.inner.geometry.cluster_size()
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.inner.writable
    }

    /// The file this image was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The backing layer, if one is open.
    pub fn backing(&self) -> Option<&BackingLayer> {
        self.inner.backing.as_ref()
    }

    /// What the check at open found and repaired, when a writable open met NEED_CHECK.
    pub fn open_repair(&self) -> Option<&CheckReport> {
        self.open_repair.as_ref()
    }

    /// Counters of the L2 cache.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// The header as on disk now, and what it means.
    pub fn info(&self) -> ImageInfo {
        let header = *self.inner.header.lock().unwrap_or_else(|e| e.into_inner());
        let backing_file = self.inner.backing_name.clone();
        let backing_path = match (&backing_file, &self.inner.path) {
            (Some(name), Some(path)) => Some(resolve_backing_path(path, name)),
            _ => None,
        };
        ImageInfo {
            header,
            size: self.size(),
            cluster_size: self.inner.geometry.cluster_size(),
            table_size: self.inner.geometry.table_size(),
            backing_format: header.backing_is_raw().then_some(BackingFormat::Raw),
            backing_file,
            backing_path,
            dirty: header.needs_check(),
        }
    }

    /// Host bytes the image file occupies right now (its length).
    pub fn file_length(&self) -> Result<u64> {
        self.inner.storage.len().map_err(Error::io("length", 0))
    }

    /// Writes back all metadata, flushes, and clears NEED_CHECK; reports errors that a drop
    /// would have to swallow.
    pub fn close(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        if let Some(timer) = self.timer.take() {
            timer.stop();
        }
        if self.inner.writable && !self.inner.poisoned.load(Ordering::Acquire) {
            self.inner.mark_clean()?;
        }
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl Inner {
    /// Writes the 64 header bytes (bytes after them, such as the backing name, are kept).
    pub(crate) fn write_header(&self, header: &Header) -> Result<()> {
        self.storage
            .write_at(&header.encode(), 0)
            .map_err(Error::io("write header", 0))?;
        *self.header.lock().unwrap_or_else(|e| e.into_inner()) = *header;
        Ok(())
    }

    /// Sets or clears NEED_CHECK in the header on disk (no flush).
    pub(crate) fn write_need_check(&self, set: bool) -> Result<()> {
        let mut header = *self.header.lock().unwrap_or_else(|e| e.into_inner());
        if set {
            header.features |= FEATURE_NEED_CHECK;
        } else {
            header.features &= !FEATURE_NEED_CHECK;
        }
        self.write_header(&header)?;
        self.need_check_on_disk.store(set, Ordering::Release);
        Ok(())
    }

    /// The L1 entry at `index`, decoded and checked against the file.
    pub(crate) fn l2_offset(&self, index: usize) -> Result<Option<u64>> {
        let raw = self.l1.get(index);
        let corrupt = |reason| Error::Corrupt {
            table: crate::TableKind::L1,
            table_offset: self.valid.header().l1_table_offset,
            index,
            value: raw,
            reason,
        };
        match L1Entry::decode(raw, &self.geometry) {
            Ok(L1Entry::Unallocated) => Ok(None),
            Ok(L1Entry::Table(off)) => {
                let end = self.next_free.load(Ordering::Acquire);
                self.valid
                    .check_l2_offset(end, off)
                    .map_err(|_| corrupt("points outside the file or into the header"))?;
                Ok(Some(off))
            }
            Err(_) => Err(corrupt("is not aligned to the cluster size")),
        }
    }
}

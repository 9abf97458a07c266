//! The public face of an open image: open, create, close, reopen, and the I/O entry points,
//! each of which passes the I/O gate once and hands over to the module that does the work.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use qed_format::{new_image_layout, CreateParams, Geometry, Header, HEADER_LEN, MAGIC};

use crate::alloc::Allocator;
use crate::backing::{BackingFormat, BackingLayer, BackingPolicy};
use crate::check::{CheckReport, Repair};
use crate::gate::IoGate;
use crate::idle::IdleTimer;
use crate::options::{ImageInfo, OpenOptions};
use crate::state::{Activity, HeaderState, Health, Shared};
use crate::storage::{CacheMode, FileOptions, FileStorage, LockMode, Storage};
use crate::table::Entries;
use crate::tables::{CacheStats, Tables};
use crate::writeback::{clear_autoclear, write_new_image, FlushState};
use crate::zero::ZeroFlags;
use crate::{Error, Result};

/// Deepest backing chain opened.
pub const MAX_CHAIN_DEPTH: usize = 32;

/// An open QED image. `Send + Sync`: every I/O method takes `&self`.
pub struct Image {
    pub(crate) shared: Arc<Shared>,
    timer: Option<IdleTimer>,
    closed: bool,
    open_repair: Option<CheckReport>,
    options: OpenOptions,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("label", &self.shared.label)
            .field("size", &self.size())
            .field("writable", &self.shared.writable)
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
    resolve_backing_name(image, name.as_bytes())
}

/// Resolves a backing name as stored (bytes, not necessarily UTF-8) against the directory of
/// `image`.
pub fn resolve_backing_name(image: &Path, name: &[u8]) -> PathBuf {
    let name = Path::new(OsStr::from_bytes(name));
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
        write_new_image(storage, params)
    }

    /// Opens the image file at `path`, with its backing chain as `options.backing` says.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Self> {
        Self::open_chain(path, options, &mut Vec::new())
    }

    pub(crate) fn open_chain(
        path: &Path,
        options: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Self> {
        // Loops are found before opening, so a loop never trips over our own lock.
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if chain.contains(&canonical) {
            return Err(Error::BackingLoop {
                path: path.to_path_buf(),
            });
        }
        if chain.len() > MAX_CHAIN_DEPTH {
            return Err(Error::Chain(format!(
                "backing chain deeper than {MAX_CHAIN_DEPTH}"
            )));
        }
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
        chain.push(canonical);
        let backing_options = OpenOptions {
            writable: false,
            ..options.clone()
        };
        let result = Self::open_with(
            Box::new(storage),
            options,
            path.display().to_string(),
            Some(path.to_path_buf()),
            |header, name| match options.backing {
                BackingPolicy::Ignore => Ok(None),
                BackingPolicy::Deny => Err(Error::Unsupported(format!(
                    "image names backing file {:?} and opening backing files is denied",
                    OsStr::from_bytes(name)
                ))),
                BackingPolicy::Follow => {
                    let format = header.backing_is_raw().then_some(BackingFormat::Raw);
                    if let Some(names) = &options.backing_names {
                        if let Some(opened) = (names.0)(name, format, &backing_options, chain) {
                            return opened.map(Some).map_err(|cause| match cause {
                                e @ (Error::Chain(_) | Error::BackingLoop { .. }) => e,
                                e => Error::Backing {
                                    path: PathBuf::from(OsStr::from_bytes(name)),
                                    depth: chain.len(),
                                    cause: Box::new(e),
                                },
                            });
                        }
                    }
                    let resolved = resolve_backing_name(path, name);
                    BackingLayer::open_in_chain(&resolved, format, &backing_options, chain)
                        .map(Some)
                }
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
        Self::open_with(storage, options, "<storage>".into(), None, |_, _| {
            Ok(backing.take())
        })
    }

    /// Opens an image on any storage, named `label` in messages, opening its backing file
    /// with `open_backing`: called (only when the header names a backing file, and only if
    /// `options.backing` is [`BackingPolicy::Follow`]) with the name as stored and the format
    /// the header fixes (raw with NO_PROBE, else `None`: probe). Its `None` leaves unallocated
    /// clusters reading as zeros. The image has no path: [`Image::reopen`] refuses it.
    pub fn open_storage_with(
        storage: Box<dyn Storage>,
        options: &OpenOptions,
        label: String,
        open_backing: impl FnOnce(&[u8], Option<BackingFormat>) -> Result<Option<BackingLayer>>,
    ) -> Result<Self> {
        Self::open_with(
            storage,
            options,
            label,
            None,
            |header, name| match options.backing {
                BackingPolicy::Ignore => Ok(None),
                BackingPolicy::Deny => Err(Error::Unsupported(format!(
                    "image names backing file {:?} and opening backing files is denied",
                    OsStr::from_bytes(name)
                ))),
                BackingPolicy::Follow => {
                    open_backing(name, header.backing_is_raw().then_some(BackingFormat::Raw))
                }
            },
        )
    }

    fn open_with(
        storage: Box<dyn Storage>,
        options: &OpenOptions,
        label: String,
        path: Option<PathBuf>,
        open_backing: impl FnOnce(&Header, &[u8]) -> Result<Option<BackingLayer>>,
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
                let mut stored = vec![0u8; len];
                storage
                    .read_at(&mut stored, offset)
                    .map_err(Error::io("read backing file name", offset))?;
                valid.backing_name(&stored).map(<[u8]>::to_vec)
            }
            None => None,
        };
        if options.writable {
            clear_autoclear(&*storage, &mut header)?;
        }
        let l1 = Entries::load(
            &*storage,
            header.l1_table_offset,
            geometry.entries_per_table(),
            "read L1 table",
        )?;
        let backing = match &backing_name {
            Some(name) => open_backing(&header, name)?,
            None => None,
        };
        let shared = Arc::new(Shared {
            valid,
            geometry,
            writable: options.writable,
            size: AtomicU64::new(header.image_size),
            header: HeaderState::new(header, backing_name),
            tables: Tables::new(valid, l1, options.l2_cache_bytes),
            alloc: Allocator::new(
                geometry.cluster_size(),
                geometry.allocated_end(file_len),
                file_len,
            ),
            flush: FlushState::default(),
            health: Health::default(),
            activity: Activity::new(),
            gate: IoGate::default(),
            backing: ArcSwapOption::new(backing.map(Arc::new)),
            storage,
            path,
            label,
        });
        let mut image = Self {
            shared,
            timer: None,
            closed: false,
            open_repair: None,
            options: options.clone(),
        };
        // Two L1 entries sharing a table would each get their own copy in memory, and each
        // write-back would overwrite the other's: a writer repairs such an image first.
        let shares_tables = options.writable && l1_shares_tables(&image.shared.tables.l1)?;
        if options.writable && (header.needs_check() || shares_tables) {
            // Not closed cleanly: check and repair before anything is written.
            match image.shared.check(Repair::All) {
                Ok(report) if report.check_errors > 0 => {
                    // Some table could not be read, so the repair is incomplete; a close
                    // would clear NEED_CHECK over it. Leave the file for a later repair.
                    let e = Error::Io {
                        op: "check and repair at open",
                        offset: 0,
                        source: std::io::Error::other(report.findings.join("; ")),
                    };
                    image.shared.health.poison(&e);
                    image.closed = true;
                    return Err(e);
                }
                Ok(report) => image.open_repair = Some(report),
                Err(e) => {
                    // Leave the file as it is (NEED_CHECK stays set) for a later repair.
                    image.shared.health.poison(&e);
                    image.closed = true;
                    return Err(e);
                }
            }
        }
        // Started only now: no timer may clear NEED_CHECK around a repair that fails.
        if options.writable {
            image.timer = Some(IdleTimer::start(
                Arc::downgrade(&image.shared),
                options.clean_after,
            )?);
        }
        Ok(image)
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }

    /// The validated geometry.
    pub fn geometry(&self) -> Geometry {
        self.shared.geometry
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        self.shared.geometry.cluster_size()
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.shared.writable
    }

    /// Whether an earlier failed metadata write made the image refuse writes; see
    /// [`Image::reopen`].
    pub fn is_poisoned(&self) -> bool {
        self.shared.health.is_poisoned()
    }

    /// What poisoned the image, if anything did.
    pub fn poison_cause(&self) -> Option<String> {
        self.shared.health.cause()
    }

    /// The file this image was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.shared.path.as_deref()
    }

    /// The backing layer, if one is open.
    pub fn backing(&self) -> Option<Arc<BackingLayer>> {
        self.shared.backing()
    }

    /// What the check at open found and repaired, when a writable open met NEED_CHECK.
    pub fn open_repair(&self) -> Option<&CheckReport> {
        self.open_repair.as_ref()
    }

    /// Counters of the L2 cache.
    pub fn cache_stats(&self) -> CacheStats {
        self.shared.tables.stats()
    }

    /// The options the image was opened with.
    pub fn options(&self) -> &OpenOptions {
        &self.options
    }

    /// The header as on disk now, and what it means.
    pub fn info(&self) -> ImageInfo {
        let header = self.shared.header.current();
        let name = self
            .shared
            .header
            .backing_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let backing_path = match (&name, &self.shared.path) {
            (Some(name), Some(path)) => Some(resolve_backing_name(path, name)),
            _ => None,
        };
        ImageInfo {
            header,
            size: self.size(),
            cluster_size: self.shared.geometry.cluster_size(),
            table_size: self.shared.geometry.table_size(),
            backing_format: header.backing_is_raw().then_some(BackingFormat::Raw),
            backing_file: name
                .as_deref()
                .map(|n| String::from_utf8_lossy(n).into_owned()),
            backing_name: name,
            backing_path,
            dirty: header.needs_check(),
        }
    }

    /// Host bytes the image file occupies right now (its length).
    pub fn file_length(&self) -> Result<u64> {
        self.shared.storage.len().map_err(Error::io("length", 0))
    }

    /// Reads `buf.len()` guest bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _pass = self.shared.gate.shared();
        self.shared.read_at(buf, offset)
    }

    /// Writes `buf` at guest `offset`, allocating clusters as needed.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _pass = self.shared.gate.shared();
        self.shared.write_at(buf, offset)
    }

    /// Writes `buf` at guest `offset` and makes it durable before returning, with the
    /// metadata that reaches it (NBD's FUA). Other writes completed before the call become
    /// durable too.
    pub fn write_at_fua(&self, buf: &[u8], offset: u64) -> Result<()> {
        {
            let _pass = self.shared.gate.shared();
            self.shared.write_at(buf, offset)?;
        }
        self.shared.flush()
    }

    /// Makes `[offset, offset + len)` read as zeros: data clusters are zeroed in place (their
    /// entries stay), whole unallocated clusters become zero clusters, zero clusters are left
    /// alone, and parts of unallocated clusters are written as data, as QEMU does. Same as
    /// [`Image::write_zeroes_with`] with default flags.
    pub fn write_zeroes_at(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes_with(offset, len, ZeroFlags::default())
    }

    /// [`Image::write_zeroes_at`] with flags: `may_unmap` punches the host range of whole data
    /// clusters instead of zeroing it; `fast_only` fails with [`Error::NotFast`], changing
    /// nothing, when any part would have to be written as data.
    pub fn write_zeroes_with(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let _pass = self.shared.gate.shared();
        self.shared.write_zeroes_at(offset, len, flags)
    }

    /// Drops the data of every whole cluster in `[offset, offset + len)` (the last cluster of
    /// the disk counts as whole): data clusters keep their entries and their host range is
    /// punched out, unallocated clusters over backing data become zero clusters. The guest
    /// reads zeros there, the host space goes back to the file system, and no cluster leaks.
    /// Partial clusters are left alone.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _pass = self.shared.gate.shared();
        self.shared.discard(offset, len)
    }

    /// Makes every completed write durable, and the metadata that reaches it. Concurrent
    /// flushes coalesce: a flush that another flush, started after this call, already
    /// covered returns as soon as that one finishes.
    pub fn flush(&self) -> Result<()> {
        self.shared.flush()
    }

    /// Writes back all metadata, flushes, and clears NEED_CHECK. A poisoned image (an earlier
    /// metadata write failed) writes nothing and returns [`Error::Poisoned`]: NEED_CHECK stays
    /// set, so the next writable open repairs it.
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
        if self.shared.writable {
            self.shared.mark_clean()?;
        }
        Ok(())
    }

    /// Drops everything held in memory and opens the file again with the same options (after
    /// a poison, say, once the cause is fixed): the header, L1 and tables are read anew, and a
    /// writable open of an image with NEED_CHECK set repairs it. Changes that had not reached
    /// the disk are lost, as in a crash. Only images opened from a path can be reopened.
    pub fn reopen(mut self) -> Result<Image> {
        let Some(path) = self.shared.path.clone() else {
            return Err(Error::Unsupported(
                "reopen of an image not opened from a file".into(),
            ));
        };
        if let Some(timer) = self.timer.take() {
            timer.stop();
        }
        // Nothing more reaches the disk from the old state; its lock goes with it.
        self.closed = true;
        let options = self.options.clone();
        drop(self);
        Self::open(&path, &options)
    }
}

/// Whether two L1 entries point at the same L2 table.
fn l1_shares_tables(l1: &Entries) -> Result<bool> {
    let mut offsets = Vec::new();
    offsets
        .try_reserve_exact(l1.len())
        .map_err(|_| Error::TooLarge {
            what: "list of L1 entries",
            bytes: l1.len() as u64 * 8,
            limit: 0,
        })?;
    offsets.extend((0..l1.len()).map(|i| l1.get(i)).filter(|&raw| raw != 0));
    offsets.sort_unstable();
    Ok(offsets.windows(2).any(|w| w[0] == w[1]))
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

//! The state one open image shares between its I/O paths and its idle timer.
//!
//! Each part is owned by the module that changes it:
//!
//! | part | owner |
//! |---|---|
//! | `tables` (L1, L2 slots, budget) | `tables.rs`; entries change under a claim (`table.rs`) |
//! | `alloc` (bump pointer, in-flight count) | `alloc.rs` |
//! | `header`, `need_check` | `writeback.rs`, the one module that orders writes |
//! | `size` | `resize.rs` |
//! | `backing` | `backing.rs` / `Image::set_backing` |
//! | `health` | set by whoever meets a failed metadata write |
//! | `activity` | bumped by every metadata change, read by the idle timer (`idle.rs`) |

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use std::time::Instant;

use qed_format::{Geometry, Header, ValidHeader};

use crate::alloc::Allocator;
use crate::backing::BackingLayer;
use crate::gate::IoGate;
use crate::storage::Storage;
use crate::tables::Tables;
use crate::writeback::FlushState;
use crate::{Error, Result};

/// NEED_CHECK as the disk has it.
pub(crate) mod flag {
    /// Clear on disk.
    pub(crate) const CLEAR: u8 = 0;
    /// Set and flushed.
    pub(crate) const SET: u8 = 1;
    /// Being cleared: allocations must wait for the outcome.
    pub(crate) const CLEARING: u8 = 2;
}

/// The header as last written, and the NEED_CHECK state.
pub(crate) struct HeaderState {
    /// The 64 header bytes as last written.
    pub(crate) header: Mutex<Header>,
    /// The backing file name as stored (bytes: names need not be UTF-8).
    pub(crate) backing_name: Mutex<Option<Vec<u8>>>,
    /// NEED_CHECK on disk: one of [`flag`].
    pub(crate) need_check: AtomicU8,
    /// Serializes changes of NEED_CHECK (set, clear).
    pub(crate) need_check_change: Mutex<()>,
}

impl HeaderState {
    pub(crate) fn new(header: Header, backing_name: Option<Vec<u8>>) -> Self {
        let state = if header.needs_check() {
            flag::SET
        } else {
            flag::CLEAR
        };
        Self {
            header: Mutex::new(header),
            backing_name: Mutex::new(backing_name),
            need_check: AtomicU8::new(state),
            need_check_change: Mutex::new(()),
        }
    }

    /// The header as last written.
    pub(crate) fn current(&self) -> Header {
        *self.header.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether NEED_CHECK is set on disk (or being cleared).
    pub(crate) fn need_check_on_disk(&self) -> bool {
        self.need_check.load(Ordering::SeqCst) != flag::CLEAR
    }
}

/// Whether the image still accepts writes, and why not.
#[derive(Default)]
pub(crate) struct Health {
    poisoned: AtomicBool,
    cause: Mutex<Option<String>>,
}

impl Health {
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Refuses further writes: the tables on disk are behind memory, or unknown.
    pub(crate) fn poison(&self, cause: &Error) {
        let mut slot = self.cause.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(cause.to_string());
        }
        self.poisoned.store(true, Ordering::Release);
    }

    /// What poisoned the image first.
    pub(crate) fn cause(&self) -> Option<String> {
        self.cause.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.is_poisoned() {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }
}

/// When metadata last changed, for the idle timer.
pub(crate) struct Activity {
    epoch: Instant,
    /// Nanoseconds since `epoch` of the last metadata change (0: none yet).
    last_change: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_change: AtomicU64::new(0),
        }
    }

    /// Records a metadata change now.
    pub(crate) fn touch(&self) {
        let now = self.epoch.elapsed().as_nanos().max(1) as u64;
        self.last_change.fetch_max(now, Ordering::AcqRel);
    }

    /// The instant of the last change, if any.
    pub(crate) fn last_change(&self) -> Option<Instant> {
        match self.last_change.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.epoch + std::time::Duration::from_nanos(n)),
        }
    }
}

/// Everything one open image shares.
pub(crate) struct Shared {
    pub(crate) storage: Box<dyn Storage>,
    pub(crate) valid: ValidHeader,
    pub(crate) geometry: Geometry,
    pub(crate) writable: bool,
    /// Virtual disk size; changes only under the exclusive gate.
    pub(crate) size: AtomicU64,
    pub(crate) header: HeaderState,
    pub(crate) tables: Tables,
    pub(crate) alloc: Allocator,
    pub(crate) flush: FlushState,
    pub(crate) health: Health,
    pub(crate) activity: Activity,
    pub(crate) gate: IoGate,
    /// The backing layer; replaced only under the exclusive gate. Read without a lock or a
    /// reference count on the I/O paths.
    pub(crate) backing: ArcSwapOption<BackingLayer>,
    pub(crate) path: Option<PathBuf>,
    pub(crate) label: String,
}

impl Shared {
    /// The backing layer, if one is open.
    pub(crate) fn backing(&self) -> Option<Arc<BackingLayer>> {
        self.backing.load_full()
    }

    /// Size of the backing layer (0 without one).
    pub(crate) fn backing_size(&self) -> u64 {
        self.backing.load().as_ref().map_or(0, |b| b.size())
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size.load(Ordering::Acquire);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.health.check()
    }

    /// Bytes from `pos` to the end of the L2 table that maps it, capped at `len`.
    pub(crate) fn table_chunk(&self, pos: u64, len: u64) -> u64 {
        let coverage = self.geometry.l2_coverage();
        (coverage - (pos & (coverage - 1))).min(len)
    }
}

//! Allocation: clusters are handed out at the end of the allocated area (a bump pointer).
//!
//! QED has no free list; the allocated area ends at the file length (rounded as
//! [`qed_format::Geometry::allocated_end`] says) when the image opens. Write-back extends the
//! file over every allocated cluster, so the next open sees them (`writeback.rs`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The bump allocator and the count of changes in flight that NEED_CHECK must cover.
#[derive(Debug)]
pub(crate) struct Allocator {
    cluster_size: u64,
    /// End of the allocated area: new clusters are handed out here.
    next_free: AtomicU64,
    /// File length at open (or after a truncation): clusters at or past it were never written
    /// and read as zeros.
    fresh_from: AtomicU64,
    /// Held for the instant of a bump, and by write-back and repair while they change the file
    /// length (so a length change never cuts a write to a cluster handed out meanwhile).
    growth: Mutex<()>,
    /// Allocations (and repairs) between their NEED_CHECK test and the moment their tables
    /// are dirty in memory: NEED_CHECK is not cleared while one is in flight.
    in_flight: AtomicUsize,
}

/// An allocation in flight; see [`Allocator::begin`].
pub(crate) struct InFlight<'a>(&'a Allocator);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Allocator {
    pub(crate) fn new(cluster_size: u64, allocated_end: u64, file_len: u64) -> Self {
        Self {
            cluster_size,
            next_free: AtomicU64::new(allocated_end),
            fresh_from: AtomicU64::new(file_len),
            growth: Mutex::new(()),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// End of the allocated area.
    pub(crate) fn end(&self) -> u64 {
        self.next_free.load(Ordering::Acquire)
    }

    /// Whether host `offset` lies in space never written since the image opened (it reads as
    /// zeros without being written).
    pub(crate) fn is_fresh(&self, offset: u64) -> bool {
        offset >= self.fresh_from.load(Ordering::Acquire)
    }

    /// Marks the start of an allocation; the guard ends it. Taken before NEED_CHECK is tested
    /// and dropped once the new entries are dirty in memory.
    pub(crate) fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }

    /// Whether any allocation is in flight.
    pub(crate) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) != 0
    }

    /// Hands out `clusters` contiguous clusters; the caller has NEED_CHECK on disk.
    pub(crate) fn bump(&self, _in_flight: &InFlight<'_>, clusters: u64) -> u64 {
        let _growing = self.growth();
        self.next_free
            .fetch_add(clusters * self.cluster_size, Ordering::AcqRel)
    }

    /// Locks out bumps while the file length changes.
    pub(crate) fn growth(&self) -> MutexGuard<'_, ()> {
        self.growth.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the end of the allocated area down to `end` after the file was cut there (the
    /// caller holds [`Allocator::growth`]).
    pub(crate) fn truncated(&self, _growing: &MutexGuard<'_, ()>, end: u64) {
        self.next_free.store(end, Ordering::Release);
        self.fresh_from.fetch_min(end, Ordering::AcqRel);
    }
}

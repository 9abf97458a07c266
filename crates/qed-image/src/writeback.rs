//! The one module that decides the order in which things reach the disk: metadata
//! write-back, NEED_CHECK, header rewrites and changes of the file length.
//!
//! New data clusters are written at once; the L2 and L1 entries that point at them live in
//! memory until a write-back, which runs:
//!
//! 1. take the dirty L1 chunks, then the dirty L2 chunks (a table the L1 snapshot points at
//!    was dirty before its L1 entry was set, so the L2 snapshot includes it);
//! 2. make sure NEED_CHECK is on disk (set and flushed); extend the file over every
//!    allocated cluster;
//! 3. **flush** — data and file length are durable before any table points at them;
//! 4. write the L2 chunks (steps 3 and 4 repeat per batch of at most 4 MiB of chunks, each
//!    batch taken just before its flush, so a write-back holds a bounded copy of the tables);
//! 5. **flush** (only if L1 changed) — new L2 tables are durable before the L1 leads to them;
//! 6. write the L1 chunks; **flush**.
//!
//! A crash at any point leaves tables that point only at durable data; what can be lost is
//! unreferenced clusters (leaks), which the check that NEED_CHECK triggers reclaims.
//!
//! NEED_CHECK is set and flushed before the first cluster of a dirty period is handed out and
//! before the first table write; it is cleared (write-back, header write, flush) only when no
//! allocation is in flight and nothing is dirty.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use qed_format::{Header, FEATURE_NEED_CHECK, HEADER_LEN, SECTOR_SIZE};

use crate::state::{flag, Shared};
use crate::storage::Storage;
use crate::table::{ChunkSnapshot, L2Table};
use crate::{Error, Result};

/// Serializes write-backs and coalesces flushes.
#[derive(Debug, Default)]
pub(crate) struct FlushState {
    /// Held by a write-back; the value is the highest flush ticket a finished flush covered.
    ordering: Mutex<u64>,
    /// Flush tickets handed out.
    tickets: AtomicU64,
}

/// Most bytes of encoded L2 chunks one write-back holds at once (a larger table is a batch of
/// its own).
const BATCH_BYTES: usize = 4 << 20;

impl Shared {
    fn ordering(&self) -> MutexGuard<'_, u64> {
        self.flush
            .ordering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every write completed before the call durable, with the metadata that reaches it.
    /// A flush that started after this call and has finished covers it: concurrent flushes
    /// coalesce into one.
    pub(crate) fn flush(&self) -> Result<()> {
        self.health.check()?;
        let ticket = self.flush.tickets.fetch_add(1, Ordering::AcqRel) + 1;
        let mut covered = self.ordering();
        if *covered >= ticket {
            return Ok(());
        }
        // Every ticket up to here was taken after its writes completed; this flush covers them.
        let upto = self.flush.tickets.load(Ordering::Acquire);
        self.write_back_locked()?;
        *covered = upto;
        Ok(())
    }

    /// Writes dirty tables back in the order above and flushes.
    pub(crate) fn write_back(&self) -> Result<()> {
        let _ordering = self.ordering();
        self.write_back_locked()
    }

    /// A write-back when the tables with unwritten changes exceed the cache budget, unless one
    /// is running already.
    /// Past twice the budget a writer waits for the running write-back and writes back
    /// itself, so dirty tables stay bounded however slow the disk is.
    pub(crate) fn relieve_pressure(&self) -> Result<()> {
        if !self.tables.over_budget() {
            return Ok(());
        }
        let _ordering = match self.flush.ordering.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) if self.tables.far_over_budget() => self.ordering(),
            Err(TryLockError::WouldBlock) => return Ok(()),
        };
        if !self.tables.over_budget() {
            return Ok(());
        }
        self.write_back_locked()
    }

    fn write_back_locked(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        // L1 first: every table it leads to was dirty before its L1 entry was set, so it is
        // in the list taken next.
        let l1 = self.tables.l1.take_dirty();
        let tables = self.tables.dirty_tables();
        let result = self.write_tables(l1.as_ref(), &tables);
        if let Err(e) = &result {
            // The tables on disk are behind memory: keep the changes and refuse writes.
            if let Some(l1) = &l1 {
                self.tables.l1.restore_dirty(l1);
            }
            self.health.poison(e);
        }
        // The references to the tables go here, so the trim below can evict what was written.
        drop(tables);
        if result.is_ok() {
            self.tables.trim();
        }
        result
    }

    /// Steps 2–6 above. The L2 tables go in batches of at most [`BATCH_BYTES`] of encoded
    /// chunks, each taken, then made safe by a flush, then written: a batch's entries were
    /// published after the data they point at was written, so its own flush covers that data,
    /// and the bytes held at once stay bounded however many tables are dirty.
    fn write_tables(&self, l1: Option<&ChunkSnapshot>, tables: &[Arc<L2Table>]) -> Result<()> {
        let flush = |why: &'static str| self.storage.flush().map_err(Error::io(why, 0));
        if l1.is_none() && tables.is_empty() {
            return flush("flush");
        }
        // Tables are about to change: a crash from here on needs a check at open.
        self.need_check_before_change()?;
        self.cover_allocated_clusters()?;
        let budget_chunks = BATCH_BYTES / SECTOR_SIZE as usize;
        let mut batch: Vec<(&Arc<L2Table>, ChunkSnapshot)> = Vec::new();
        let mut chunks = 0;
        for table in tables {
            // Bounded passes: a writer dirtying the table meanwhile cannot keep this going.
            let mut passes = table.memory_bytes() / BATCH_BYTES + 1;
            while passes > 0 {
                passes -= 1;
                let Some(taken) = table.take_dirty_upto(budget_chunks - chunks) else {
                    break;
                };
                chunks += taken.runs.iter().map(|r| r.len()).sum::<usize>();
                batch.push((table, taken));
                if chunks >= budget_chunks {
                    self.write_batch(&mut batch)?;
                    chunks = 0;
                }
            }
        }
        // The last batch (perhaps empty: the data barrier is still due before the L1).
        self.write_batch(&mut batch)?;
        if let Some(l1) = l1 {
            // Barrier: new L2 tables before the L1 entries that lead to them.
            flush("flush before L1 write-back")?;
            self.write_chunks(self.valid.header().l1_table_offset, l1)?;
        }
        // Barrier: the tables themselves.
        flush("flush after table write-back")
    }

    /// Flushes, then writes the chunks of `batch` (emptied); on failure their chunks are dirty
    /// again.
    fn write_batch(&self, batch: &mut Vec<(&Arc<L2Table>, ChunkSnapshot)>) -> Result<()> {
        let result = self
            .storage
            .flush()
            .map_err(Error::io("flush before table write-back", 0))
            .and_then(|()| {
                // Barrier (above): data and file length before any table that points at them.
                batch
                    .iter()
                    .try_for_each(|(table, chunks)| self.write_chunks(table.offset, chunks))
            });
        if result.is_err() {
            for (table, chunks) in batch.iter() {
                table.restore_dirty(chunks);
            }
        }
        batch.clear();
        result
    }

    fn write_chunks(&self, table_offset: u64, chunks: &ChunkSnapshot) -> Result<()> {
        for (run, bytes) in chunks.runs.iter().zip(&chunks.bytes) {
            let at = table_offset + run.start as u64 * SECTOR_SIZE;
            self.storage
                .write_at(bytes, at)
                .map_err(Error::io("write table", at))?;
        }
        Ok(())
    }

    /// Extends the file so its length covers every allocated cluster; clusters whose tail was
    /// never written (it reads as zeros) would otherwise be cut by the rounded-down length.
    fn cover_allocated_clusters(&self) -> Result<()> {
        let _growing = self.alloc.growth();
        let end = self.alloc.end();
        let len = self.storage.len().map_err(Error::io("length", 0))?;
        if len < end {
            self.storage
                .set_len(end)
                .map_err(Error::io("extend file", end))?;
        }
        Ok(())
    }

    /// Makes sure NEED_CHECK is set and flushed before a cluster is handed out or a table
    /// changes on disk.
    pub(crate) fn need_check_before_change(&self) -> Result<()> {
        if self.header.need_check.load(Ordering::SeqCst) == flag::SET {
            return Ok(());
        }
        let _change = self
            .header
            .need_check_change
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.header.need_check.load(Ordering::SeqCst) == flag::SET {
            return Ok(());
        }
        self.health.check()?;
        let mut header = self.header.current();
        header.features |= FEATURE_NEED_CHECK;
        let result = self.write_header(&header).and_then(|()| {
            // Barrier: the flag before anything it must cover.
            self.storage
                .flush()
                .map_err(Error::io("flush after setting NEED_CHECK", 0))
        });
        if let Err(e) = &result {
            self.health.poison(e);
            return result;
        }
        self.header.need_check.store(flag::SET, Ordering::SeqCst);
        Ok(())
    }

    /// Writes everything back and clears NEED_CHECK when no allocation is in flight and no
    /// table is dirty.
    pub(crate) fn mark_clean(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.health.check()?;
        let _ordering = self.ordering();
        self.write_back_locked()?;
        let _change = self
            .header
            .need_check_change
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.header.need_check.load(Ordering::SeqCst) != flag::SET {
            return Ok(());
        }
        // A failed open or write since the call began: leave the flag for the next repair.
        self.health.check()?;
        // An allocation that read SET before this store is in flight now (it counted itself
        // first); one that reads CLEARING waits for the change lock and sets the flag again.
        self.header
            .need_check
            .store(flag::CLEARING, Ordering::SeqCst);
        if self.alloc.busy() || self.tables.dirty_bytes() > 0 || self.tables.l1.is_dirty() {
            self.header.need_check.store(flag::SET, Ordering::SeqCst);
            return Ok(());
        }
        let mut header = self.header.current();
        header.features &= !FEATURE_NEED_CHECK;
        // Every table on disk is flushed (write_back_locked ended with a flush).
        let result = self.write_header(&header).and_then(|()| {
            self.storage
                .flush()
                .map_err(Error::io("flush after clearing NEED_CHECK", 0))
        });
        match result {
            Ok(()) => {
                self.header.need_check.store(flag::CLEAR, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                // The flag on disk is unknown: treat it as set, and refuse further writes.
                self.header.need_check.store(flag::SET, Ordering::SeqCst);
                self.health.poison(&e);
                Err(e)
            }
        }
    }

    /// Writes the 64 header bytes (bytes after them, such as the backing name, are kept).
    pub(crate) fn write_header(&self, header: &Header) -> Result<()> {
        self.storage
            .write_at(&header.encode(), 0)
            .map_err(Error::io("write header", 0))?;
        *self.header.header.lock().unwrap_or_else(|e| e.into_inner()) = *header;
        Ok(())
    }

    /// Writes a header that changes the image's shape (size, backing file) and flushes it.
    /// `change` edits the header as last written (so NEED_CHECK, which only this module
    /// changes, is kept as it is on disk); `name` is written right after the 64 header bytes in
    /// the same write, which must then fit the first sector. The caller holds the image
    /// exclusively.
    pub(crate) fn write_shape(
        &self,
        change: impl FnOnce(&mut Header),
        name: Option<&[u8]>,
    ) -> Result<()> {
        let _ordering = self.ordering();
        let _flag = self
            .header
            .need_check_change
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let current = self.header.current();
        let mut header = current;
        change(&mut header);
        header.features =
            (header.features & !FEATURE_NEED_CHECK) | (current.features & FEATURE_NEED_CHECK);
        let mut bytes = header.encode().to_vec();
        if let Some(name) = name {
            bytes.extend_from_slice(name);
        }
        if bytes.len() as u64 > SECTOR_SIZE {
            return Err(Error::InvalidArgument(
                "a header write with its name must fit one sector".into(),
            ));
        }
        // One write within the first sector: it lands whole or not at all.
        let result = self
            .storage
            .write_at(&bytes, 0)
            .map_err(Error::io("write header", 0))
            .and_then(|()| {
                // Barrier: the new shape is durable before anything relies on it.
                self.storage
                    .flush()
                    .map_err(Error::io("flush after header update", 0))
            });
        if let Err(e) = &result {
            self.health.poison(e);
            return result;
        }
        *self.header.header.lock().unwrap_or_else(|e| e.into_inner()) = header;
        Ok(())
    }

    /// Writes a backing file name at `at` (outside the name the header names now) and flushes
    /// it, before a header that points there is written.
    pub(crate) fn write_backing_name_at(&self, at: u64, name: &[u8]) -> Result<()> {
        let _ordering = self.ordering();
        self.storage
            .write_at(name, at)
            .map_err(Error::io("write backing file name", at))?;
        // Barrier: the name before the header that leads to it.
        self.storage
            .flush()
            .map_err(Error::io("flush after writing the backing file name", 0))
    }

    /// Cuts the file at `new_end` after a repair freed everything past it, unless a cluster
    /// was handed out since `expected_end` was read. Returns whether the file was cut.
    pub(crate) fn truncate_free_tail(&self, expected_end: u64, new_end: u64) -> Result<bool> {
        let growing = self.alloc.growth();
        if new_end >= expected_end || self.alloc.end() != expected_end {
            return Ok(false);
        }
        self.storage
            .set_len(new_end)
            .map_err(Error::io("truncate", new_end))?;
        // Barrier: the shorter file before clusters past it are handed out again.
        self.storage.flush().map_err(Error::io("flush", 0))?;
        self.alloc.truncated(&growing, new_end);
        Ok(true)
    }
}

/// Writes a new, empty image onto `storage`: truncate, header cluster, length, flush.
pub(crate) fn write_new_image(
    storage: &dyn Storage,
    params: &qed_format::CreateParams,
) -> Result<()> {
    let (_, header_cluster, file_len) = qed_format::new_image_layout(params)?;
    storage.set_len(0).map_err(Error::io("truncate", 0))?;
    storage
        .write_at(&header_cluster, 0)
        .map_err(Error::io("write header", 0))?;
    storage
        .set_len(file_len)
        .map_err(Error::io("extend", file_len))?;
    // Barrier: the image exists whole before anyone opens it.
    storage.flush().map_err(Error::io("flush", 0))
}

/// Clears unknown autoclear feature bits at a writable open, before anything else is written
/// (a writer that does not understand them must clear them).
pub(crate) fn clear_autoclear(storage: &dyn Storage, header: &mut Header) -> Result<()> {
    if header.autoclear_features == 0 {
        return Ok(());
    }
    header.autoclear_features = 0;
    storage
        .write_at(&header.encode()[..HEADER_LEN], 0)
        .map_err(Error::io("write header", 0))?;
    storage.flush().map_err(Error::io("flush", 0))
}

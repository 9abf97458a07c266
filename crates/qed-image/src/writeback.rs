//! Write-back of metadata and the NEED_CHECK lifecycle: the one module that decides the
//! order in which things reach the disk.
//!
//! New data clusters are written at once; the L2 and L1 entries that point at them live in
//! memory until a write-back, which runs:
//!
//! 1. take the dirty L1 chunks, then the dirty L2 chunks (a table the L1 snapshot points at
//!    was dirty before its L1 entry was set, so the L2 snapshot includes it);
//! 2. set NEED_CHECK in the header if it is clear; extend the file over every allocated
//!    cluster;
//! 3. **flush** — data, header and file length are durable before any table points at them;
//! 4. write the L2 chunks;
//! 5. **flush** (only if L1 changed) — new L2 tables are durable before the L1 leads to them;
//! 6. write the L1 chunks; **flush**.
//!
//! A crash at any point leaves tables that point only at durable data; what can be lost is
//! unreferenced clusters (leaks), which the check that NEED_CHECK triggers reclaims.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::image::Inner;
use crate::table::{ChunkSnapshot, L2Table};
use crate::{Error, Image, Result};

impl Image {
    /// Makes every completed write durable, and the metadata that reaches it.
    pub fn flush(&self) -> Result<()> {
        if self.inner.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        self.inner.write_back()
    }
}

struct Snapshot {
    l1: Option<ChunkSnapshot>,
    l2: Vec<(Arc<L2Table>, ChunkSnapshot)>,
}

impl Inner {
    /// Writes dirty tables back in the order above and flushes.
    pub(crate) fn write_back(&self) -> Result<()> {
        let _ordering = self.writeback.lock().unwrap_or_else(|e| e.into_inner());
        self.write_back_locked()
    }

    fn write_back_locked(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let snapshot = self.take_snapshot();
        let result = self.write_snapshot(&snapshot);
        if result.is_err() {
            // The tables on disk are now behind memory: keep the changes and refuse writes.
            if let Some(l1) = &snapshot.l1 {
                self.l1.restore_dirty(l1);
            }
            for (table, chunks) in &snapshot.l2 {
                table.entries.restore_dirty(chunks);
            }
            self.poisoned.store(true, Ordering::Release);
        } else {
            self.cache.shrink();
        }
        result
    }

    fn take_snapshot(&self) -> Snapshot {
        // L1 first: every table it leads to was dirty before its L1 entry was set.
        let l1 = self.l1.take_dirty();
        let l2 = self
            .cache
            .dirty_tables()
            .into_iter()
            .filter_map(|t| t.entries.take_dirty().map(|c| (t, c)))
            .collect();
        Snapshot { l1, l2 }
    }

    fn write_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let flush = |why: &'static str| self.storage.flush().map_err(Error::io(why, 0));
        if snapshot.l1.is_none() && snapshot.l2.is_empty() {
            return flush("flush");
        }
        if !self.need_check_on_disk.load(Ordering::Acquire) {
            // Tables are about to change: a crash from here on needs a check at open.
            self.write_need_check(true)?;
        }
        self.cover_allocated_clusters()?;
        // Barrier: data, NEED_CHECK and file length before any table that points at them.
        flush("flush before table write-back")?;
        for (table, chunks) in &snapshot.l2 {
            write_chunks(self, table.offset, chunks)?;
        }
        if let Some(l1) = &snapshot.l1 {
            // Barrier: new L2 tables before the L1 entries that lead to them.
            flush("flush before L1 write-back")?;
            write_chunks(self, self.valid.header().l1_table_offset, l1)?;
        }
        // Barrier: the tables themselves.
        flush("flush after table write-back")
    }

    /// Extends the file so its length covers every allocated cluster; clusters whose tail was
    /// never written (it reads as zeros) would otherwise be cut by the rounded-down length.
    fn cover_allocated_clusters(&self) -> Result<()> {
        let _growing = self.file_growth.lock().unwrap_or_else(|e| e.into_inner());
        let end = self.next_free.load(Ordering::Acquire);
        let len = self.storage.len().map_err(Error::io("length", 0))?;
        if len < end {
            self.storage
                .set_len(end)
                .map_err(Error::io("extend file", end))?;
        }
        Ok(())
    }

    /// Writes back everything and clears NEED_CHECK if no allocation is in flight.
    pub(crate) fn mark_clean(&self) -> Result<()> {
        let _ordering = self.writeback.lock().unwrap_or_else(|e| e.into_inner());
        self.write_back_locked()?;
        // Allocation sets the flag under the same lock: an allocation either finished before
        // (and shows up as in flight or dirty here) or sets the flag again after the clear.
        let _growing = self.file_growth.lock().unwrap_or_else(|e| e.into_inner());
        if self.need_check_on_disk.load(Ordering::Acquire)
            && self.allocations_in_flight.load(Ordering::Acquire) == 0
            && !self.l1.is_dirty()
            && self.cache.dirty_bytes() == 0
        {
            // Every table on disk is flushed (write_back_locked ended with a flush).
            self.write_need_check(false)?;
            self.storage
                .flush()
                .map_err(Error::io("flush after clearing NEED_CHECK", 0))?;
        }
        Ok(())
    }
}

fn write_chunks(inner: &Inner, table_offset: u64, chunks: &ChunkSnapshot) -> Result<()> {
    for (run, bytes) in chunks.runs.iter().zip(&chunks.bytes) {
        let at = table_offset + run.start as u64 * qed_format::SECTOR_SIZE;
        inner
            .storage
            .write_at(bytes, at)
            .map_err(Error::io("write table", at))?;
    }
    Ok(())
}

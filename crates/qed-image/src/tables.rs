//! The tables in memory: the L1 table, and L2 tables in one slot per L1 entry, loaded on
//! demand and kept within a byte budget.
//!
//! A request finds its L2 table by L1 index without a lock: the slot is read through
//! `arc_swap`, which takes no reference count on the hit path. Misses, new tables and
//! evictions of one slot are serialized by a striped mutex, so a slot is never loaded twice
//! and never emptied while someone else refills it.
//!
//! Eviction (second-chance clock over the resident tables) takes a table out of its slot and
//! puts it back unless the slot held the last reference and the table is clean: after the
//! swap nobody can reach the table any more, so "clean and unreferenced" cannot change under
//! the evictor. Hence **a table leaves memory only when it is clean and nobody holds it**, and
//! a writer never changes a table that memory has forgotten.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::{ArcSwapOption, Guard};
use qed_format::{L1Entry, ValidHeader};

use crate::storage::Storage;
use crate::stripe::Counter;
use crate::table::{Entries, L2Table};
use crate::{Error, Result, TableKind};

/// Mutexes serializing loads and evictions, by L1 index.
const LOAD_STRIPES: usize = 64;

/// Slots per chunk of the slot array.
const SLOT_CHUNK: usize = 1024;

/// `SLOT_CHUNK` slots of consecutive L1 entries.
type SlotChunk = Box<[ArcSwapOption<L2Table>]>;

/// Counters of the L2 cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from memory.
    pub hits: u64,
    /// Lookups that read a table from disk.
    pub misses: u64,
    /// Tables dropped to stay within the budget.
    pub evictions: u64,
    /// Bytes of L2 tables held now.
    pub bytes: u64,
    /// Bytes of L2 tables with changes not yet written back.
    pub dirty_bytes: u64,
}

/// A table found by a lookup: a guard on the slot (no reference count) or an owned reference.
pub(crate) enum TableRef {
    Slot(Guard<Option<Arc<L2Table>>>),
    Owned(Arc<L2Table>),
}

impl std::ops::Deref for TableRef {
    type Target = L2Table;

    fn deref(&self) -> &L2Table {
        match self {
            // A `Slot` guard is only built from a slot that held a table.
            Self::Slot(guard) => guard.as_deref().unwrap_or_else(|| unreachable!()),
            Self::Owned(table) => table,
        }
    }
}

#[derive(Debug, Default)]
struct Resident {
    /// L1 indexes whose slot holds a table.
    indexes: Vec<usize>,
    /// Position of the eviction clock in `indexes`.
    hand: usize,
}

/// The L1 table and the L2 tables in memory.
pub(crate) struct Tables {
    valid: ValidHeader,
    /// L1 entries; an entry changes only after the slot it leads to holds its table.
    pub(crate) l1: Entries,
    /// Slots by L1 index, in chunks made on first use: an L1 table of millions of entries
    /// whose image uses a few costs a few chunks, not a pointer per entry.
    slots: Box<[OnceLock<SlotChunk>]>,
    loading: Box<[Mutex<()>]>,
    resident: Mutex<Resident>,
    resident_bytes: AtomicUsize,
    dirty_bytes: Arc<AtomicUsize>,
    budget: usize,
    /// Serializes creation of L2 tables (one per L1 entry, rare).
    pub(crate) creation: Mutex<()>,
    hits: Counter,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl Tables {
    pub(crate) fn new(valid: ValidHeader, l1: Entries, budget: usize) -> Self {
        let slots = (0..l1.len().div_ceil(SLOT_CHUNK))
            .map(|_| OnceLock::new())
            .collect();
        Self {
            valid,
            l1,
            slots,
            loading: (0..LOAD_STRIPES).map(|_| Mutex::new(())).collect(),
            resident: Mutex::new(Resident::default()),
            resident_bytes: AtomicUsize::new(0),
            dirty_bytes: Arc::new(AtomicUsize::new(0)),
            budget,
            creation: Mutex::new(()),
            hits: Counter::default(),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The L1 entry at `index`, decoded and checked against the allocated area as `end` tells
    /// it. `end` is asked after the entry is read: a table allocated (and published) after an
    /// earlier look at the end would otherwise seem to lie outside the file.
    pub(crate) fn l2_offset(&self, index: usize, end: impl FnOnce() -> u64) -> Result<Option<u64>> {
        let raw = self.l1.get(index);
        let corrupt = |reason| Error::Corrupt {
            table: TableKind::L1,
            table_offset: self.valid.header().l1_table_offset,
            index,
            value: raw,
            reason,
        };
        match L1Entry::decode(raw, &self.valid.geometry()) {
            Ok(L1Entry::Unallocated) => Ok(None),
            Ok(L1Entry::Table(off)) => {
                self.valid
                    .check_l2_offset(end(), off)
                    .map_err(|_| corrupt("points outside the file or into the header"))?;
                Ok(Some(off))
            }
            Err(_) => Err(corrupt("is not aligned to the cluster size")),
        }
    }

    fn slot(&self, l1_index: usize) -> &ArcSwapOption<L2Table> {
        let chunk = self.slots[l1_index / SLOT_CHUNK]
            .get_or_init(|| (0..SLOT_CHUNK).map(|_| ArcSwapOption::empty()).collect());
        &chunk[l1_index % SLOT_CHUNK]
    }

    fn loading(&self, l1_index: usize) -> std::sync::MutexGuard<'_, ()> {
        self.loading[l1_index % LOAD_STRIPES]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The table for `l1_index`, which lives at `offset`, for reading: no reference count is
    /// taken when it is in memory.
    pub(crate) fn get(
        &self,
        storage: &dyn Storage,
        l1_index: usize,
        offset: u64,
    ) -> Result<TableRef> {
        let guard = self.slot(l1_index).load();
        match guard.as_deref() {
            Some(table) if table.offset == offset => {
                self.hit(table);
                Ok(TableRef::Slot(guard))
            }
            _ => {
                drop(guard);
                self.load(storage, l1_index, offset).map(TableRef::Owned)
            }
        }
    }

    /// The table for `l1_index` at `offset`, for changing it: the reference keeps it in memory.
    pub(crate) fn get_owned(
        &self,
        storage: &dyn Storage,
        l1_index: usize,
        offset: u64,
    ) -> Result<Arc<L2Table>> {
        match self.slot(l1_index).load_full() {
            Some(table) if table.offset == offset => {
                self.hit(&table);
                Ok(table)
            }
            _ => self.load(storage, l1_index, offset),
        }
    }

    fn hit(&self, table: &L2Table) {
        self.hits.add(1);
        if !table.referenced.load(Ordering::Relaxed) {
            table.referenced.store(true, Ordering::Relaxed);
        }
    }

    /// Reads the table at `offset` into the slot of `l1_index` (unless another thread did).
    fn load(&self, storage: &dyn Storage, l1_index: usize, offset: u64) -> Result<Arc<L2Table>> {
        let table = {
            let _slot = self.loading(l1_index);
            if let Some(table) = self.slot(l1_index).load_full() {
                if table.offset == offset {
                    return Ok(table);
                }
            }
            self.misses.fetch_add(1, Ordering::Relaxed);
            let entries = Entries::load(
                storage,
                offset,
                self.valid.geometry().entries_per_table(),
                "read L2 table",
            )?;
            let table = Arc::new(L2Table::new(offset, entries, self.dirty_bytes.clone()));
            self.install(l1_index, table.clone());
            table
        };
        self.trim();
        Ok(table)
    }

    /// Puts `table` into the slot of `l1_index` (the caller holds that slot's loading lock, or
    /// the image exclusively) and accounts for it.
    fn install(&self, l1_index: usize, table: Arc<L2Table>) {
        let bytes = table.memory_bytes();
        let slot = self.slot(l1_index);
        if slot.load().is_none() {
            // Listed before it can be found: a write-back lists every table a writer can
            // reach.
            self.resident
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .indexes
                .push(l1_index);
        }
        if let Some(old) = slot.swap(Some(table)) {
            self.resident_bytes
                .fetch_sub(old.memory_bytes(), Ordering::AcqRel);
        }
        self.resident_bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Makes a new, empty table at host `offset` for `l1_index` and points the L1 entry at it.
    /// The caller holds [`Tables::creation`] and has checked that the L1 entry is empty.
    pub(crate) fn create(&self, l1_index: usize, offset: u64) -> Result<Arc<L2Table>> {
        let entries = Entries::new_unwritten(self.valid.geometry().entries_per_table())?;
        let table = Arc::new(L2Table::new(offset, entries, self.dirty_bytes.clone()));
        {
            let _slot = self.loading(l1_index);
            self.install(l1_index, table.clone());
        }
        // The slot holds the (dirty, so pinned) table before the L1 entry can lead to it.
        self.l1.set(l1_index, offset);
        self.trim();
        Ok(table)
    }

    /// Replaces the table of `l1_index` with a copy at host `offset` and points the L1 entry
    /// there (repair moving a table). The caller holds the image exclusively.
    pub(crate) fn relocate(&self, l1_index: usize, entries: Entries, offset: u64) -> Arc<L2Table> {
        let table = Arc::new(L2Table::new(offset, entries, self.dirty_bytes.clone()));
        {
            let _slot = self.loading(l1_index);
            self.install(l1_index, table.clone());
        }
        self.l1.set(l1_index, offset);
        table
    }

    /// Forgets the table of `l1_index` (its L1 entry is being cleared; the caller holds the
    /// image exclusively). Unwritten changes of it are dropped with it.
    pub(crate) fn forget(&self, l1_index: usize) {
        let _slot = self.loading(l1_index);
        let Some(table) = self.slot(l1_index).swap(None) else {
            return;
        };
        let _ = table.take_dirty();
        self.resident_bytes
            .fetch_sub(table.memory_bytes(), Ordering::AcqRel);
        let mut resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = resident.indexes.iter().position(|&i| i == l1_index) {
            resident.indexes.swap_remove(pos);
        }
    }

    /// Every table with changes not yet written back.
    pub(crate) fn dirty_tables(&self) -> Vec<Arc<L2Table>> {
        if self.dirty_bytes.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let indexes = self
            .resident
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .indexes
            .clone();
        indexes
            .into_iter()
            .filter_map(|i| {
                // Under the slot's lock: an eviction takes a table out of its slot for an
                // instant, and a dirty one goes back; this must not look in between.
                let _slot = self.loading(i);
                self.slot(i).load_full()
            })
            .filter(|t| t.is_dirty())
            .collect()
    }

    /// Bytes held by tables with changes not yet written back.
    pub(crate) fn dirty_bytes(&self) -> usize {
        self.dirty_bytes.load(Ordering::Acquire)
    }

    /// Whether the changes held in memory exceed the budget (time for a write-back).
    pub(crate) fn over_budget(&self) -> bool {
        self.dirty_bytes() > self.budget
    }

    /// Whether the changes held in memory exceed twice the budget (writers must wait).
    pub(crate) fn far_over_budget(&self) -> bool {
        self.dirty_bytes() > self.budget.saturating_mul(2)
    }

    /// Evicts clean tables nobody holds, least recently used first (second chance), until the
    /// resident tables fit the budget or every one left is dirty or in use.
    pub(crate) fn trim(&self) {
        let mut attempts = 0usize;
        while self.resident_bytes.load(Ordering::Acquire) > self.budget {
            let candidate = {
                let mut resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
                let n = resident.indexes.len();
                if n == 0 || attempts > 2 * n {
                    return;
                }
                if resident.hand >= n {
                    resident.hand = 0;
                }
                let index = resident.indexes[resident.hand];
                resident.hand += 1;
                index
            };
            attempts += 1;
            self.try_evict(candidate);
        }
    }

    fn try_evict(&self, l1_index: usize) {
        let _slot = self.loading(l1_index);
        let Some(table) = self.slot(l1_index).swap(None) else {
            return;
        };
        // Nobody can reach the table now: if the slot held the last reference and it is
        // clean, that stays true.
        let second_chance = table.referenced.swap(false, Ordering::Relaxed);
        if second_chance || table.is_dirty() || Arc::strong_count(&table) > 1 {
            self.slot(l1_index).store(Some(table));
            return;
        }
        self.resident_bytes
            .fetch_sub(table.memory_bytes(), Ordering::AcqRel);
        self.evictions.fetch_add(1, Ordering::Relaxed);
        let mut resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = resident.indexes.iter().position(|&i| i == l1_index) {
            resident.indexes.swap_remove(pos);
        }
    }

    /// Counters.
    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.sum(),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes: self.resident_bytes.load(Ordering::Acquire) as u64,
            dirty_bytes: self.dirty_bytes() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;
    use qed_format::{Header, HEADER_LEN};

    const CS: u64 = 4096;

    /// Tables of 4096 * 4 bytes, a file with room for 16 tables after the L1 table.
    fn tables(budget_tables: usize) -> (Tables, MemoryStorage) {
        let header = Header {
            cluster_size: CS as u32,
            table_size: 4,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: CS,
            image_size: 1 << 30,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        };
        let storage = MemoryStorage::new();
        storage.write_at(&header.encode()[..HEADER_LEN], 0).unwrap();
        storage.set_len(CS * (5 + 4 * 16)).unwrap();
        let valid = header.validate(storage.len().unwrap()).unwrap();
        let l1 = Entries::load(&storage, CS, 2048, "read L1").unwrap();
        for i in 0..16 {
            l1.set(i, CS * (5 + 4 * i as u64));
        }
        let _ = l1.take_dirty();
        (
            Tables::new(valid, l1, budget_tables * 4 * CS as usize),
            storage,
        )
    }

    fn offset(i: usize) -> u64 {
        CS * (5 + 4 * i as u64)
    }

    #[test]
    fn counts_hits_and_misses_and_stays_within_budget() {
        let (t, storage) = tables(2);
        for i in 0..5 {
            drop(t.get(&storage, i, offset(i)).unwrap());
        }
        let stats = t.stats();
        assert_eq!(stats.misses, 5);
        assert_eq!(stats.evictions, 3);
        assert_eq!(stats.bytes, 2 * 4 * CS);
        drop(t.get(&storage, 4, offset(4)).unwrap());
        assert_eq!(t.stats().hits, 1);
        assert_eq!(t.stats().misses, 5);
    }

    #[test]
    fn dirty_and_referenced_tables_are_never_evicted() {
        let (t, storage) = tables(1);
        let dirty = t.get_owned(&storage, 0, offset(0)).unwrap();
        dirty.set(0, 1);
        drop(dirty);
        let held = t.get_owned(&storage, 1, offset(1)).unwrap();
        drop(t.get(&storage, 2, offset(2)).unwrap());
        t.trim();
        // Over budget, but the dirty table and the one still held stay.
        assert!(t.slot(0).load().is_some());
        assert!(t.slot(1).load().is_some());
        assert!(t.slot(2).load().is_none());
        assert_eq!(t.dirty_tables().len(), 1);
        assert_eq!(t.stats().dirty_bytes, 4 * CS);
        drop(held);
        for table in t.dirty_tables() {
            assert!(table.take_dirty().is_some());
        }
        t.trim();
        // Back within the budget of one table.
        assert_eq!(t.stats().bytes, 4 * CS, "{:?}", t.stats());
        assert_eq!(t.stats().dirty_bytes, 0);
    }

    #[test]
    fn a_table_held_through_a_slot_guard_is_not_evicted() {
        let (t, storage) = tables(0);
        drop(t.get(&storage, 0, offset(0)).unwrap());
        let (t, storage) = (t, storage);
        // Load it into the slot again; keep a guard while the clock runs.
        let guard = {
            let _ = t.get_owned(&storage, 0, offset(0)).unwrap();
            t.slot(0).load()
        };
        if guard.is_some() {
            t.trim();
            assert!(t.slot(0).load().is_some());
        }
        drop(guard);
        t.trim();
        t.trim();
        assert!(t.slot(0).load().is_none());
    }

    #[test]
    fn a_new_table_is_in_its_slot_before_the_l1_entry_leads_to_it() {
        let (t, storage) = tables(8);
        let table = t.create(20, CS * 100).unwrap();
        assert_eq!(t.l1.get(20), CS * 100);
        assert!(table.is_dirty());
        let found = t.get_owned(&storage, 20, CS * 100).unwrap();
        assert!(Arc::ptr_eq(&found, &table));
        assert_eq!(t.stats().misses, 0);
    }
}

//! A bounded cache of L2 tables: sharded maps, LRU by bytes, hit and miss counters.
//!
//! Tables with unwritten changes are pinned: they leave the cache only after write-back.
//! A table is evicted only when the cache holds the last reference, so a writer never
//! changes a table that the cache has forgotten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::table::L2Table;

const SHARDS: usize = 8;

/// Counters of the L2 cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from memory.
    pub hits: u64,
    /// Lookups that read a table from disk.
    pub misses: u64,
    /// Tables dropped to stay within the budget.
    pub evictions: u64,
    /// Bytes of tables held now.
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Shard {
    tables: HashMap<u64, (Arc<L2Table>, u64)>,
    bytes: usize,
    /// Bumped at every eviction, so a load that raced with one can tell.
    evictions: u64,
}

/// The L2 table cache.
#[derive(Debug)]
pub(crate) struct L2Cache {
    shards: Box<[Mutex<Shard>]>,
    shard_budget: usize,
    table_shift: u32,
    clock: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

/// What a lookup found.
pub(crate) enum Lookup {
    Hit(Arc<L2Table>),
    /// Not cached; the token tells [`L2Cache::insert`] whether an eviction raced with the load.
    Miss(u64),
}

impl L2Cache {
    pub(crate) fn new(budget_bytes: usize, table_bytes: u64) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_budget: budget_bytes / SHARDS,
            table_shift: table_bytes.trailing_zeros(),
            clock: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, offset: u64) -> &Mutex<Shard> {
        &self.shards[((offset >> self.table_shift) as usize) % SHARDS]
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn lookup(&self, offset: u64) -> Lookup {
        let mut shard = self.shard(offset).lock().unwrap_or_else(|e| e.into_inner());
        let now = self.tick();
        if let Some((table, used)) = shard.tables.get_mut(&offset) {
            *used = now;
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Hit(table.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Miss(shard.evictions)
    }

    /// Inserts a table read from disk after a [`Lookup::Miss`]. Returns the cached table
    /// (another thread's copy if it won the race), or `None` if an eviction happened since
    /// the miss, in which case the caller reads the table again.
    pub(crate) fn insert(&self, table: L2Table, token: u64) -> Option<Arc<L2Table>> {
        let mut shard = self
            .shard(table.offset)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((existing, _)) = shard.tables.get(&table.offset) {
            return Some(existing.clone());
        }
        if shard.evictions != token {
            return None;
        }
        Some(self.add(&mut shard, table))
    }

    /// Inserts a table that exists only in memory (all dirty).
    pub(crate) fn insert_new(&self, table: L2Table) -> Arc<L2Table> {
        let mut shard = self
            .shard(table.offset)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.add(&mut shard, table)
    }

    fn add(&self, shard: &mut Shard, table: L2Table) -> Arc<L2Table> {
        let bytes = table.memory_bytes();
        let table = Arc::new(table);
        shard.bytes += bytes;
        shard
            .tables
            .insert(table.offset, (table.clone(), self.tick()));
        self.evict(shard, &table);
        table
    }

    /// Drops least recently used clean tables nobody else holds until the shard fits.
    fn evict(&self, shard: &mut Shard, keep: &Arc<L2Table>) {
        while shard.bytes > self.shard_budget {
            let victim = shard
                .tables
                .iter()
                .filter(|(_, (t, _))| {
                    !Arc::ptr_eq(t, keep) && Arc::strong_count(t) == 1 && !t.entries.is_dirty()
                })
                .min_by_key(|(_, (_, used))| *used)
                .map(|(off, _)| *off);
            let Some(off) = victim else { break };
            if let Some((t, _)) = shard.tables.remove(&off) {
                shard.bytes -= t.memory_bytes();
                shard.evictions += 1;
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Every table with unwritten changes.
    pub(crate) fn dirty_tables(&self) -> Vec<Arc<L2Table>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(
                shard
                    .tables
                    .values()
                    .filter(|(t, _)| t.entries.is_dirty())
                    .map(|(t, _)| t.clone()),
            );
        }
        out
    }

    /// Bytes held by tables with unwritten changes.
    pub(crate) fn dirty_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                s.tables
                    .values()
                    .filter(|(t, _)| t.entries.is_dirty())
                    .map(|(t, _)| t.memory_bytes())
                    .sum::<usize>()
            })
            .sum()
    }

    /// Trims every shard back to its budget (after a write-back made tables clean).
    pub(crate) fn shrink(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let none = Arc::new(L2Table::new(
                u64::MAX,
                crate::table::Entries::new_unwritten(0),
            ));
            self.evict(&mut shard, &none);
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes: self
                .shards
                .iter()
                .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).bytes as u64)
                .sum(),
        }
    }
}

//! A bounded cache of L2 tables: sharded maps, LRU by bytes, hit and miss counters.
//!
//! Tables with unwritten changes are pinned: they leave the cache only after write-back.
//! A table is evicted only when the cache holds the last reference, so a writer never
//! changes a table that the cache has forgotten.

use std::collections::HashMap;
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
    /// LRU clock and counters live under the shard lock: no shared cache line per lookup.
    clock: u64,
    hits: u64,
    misses: u64,
}

impl Shard {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

/// The L2 table cache.
#[derive(Debug)]
pub(crate) struct L2Cache {
    shards: Box<[Mutex<Shard>]>,
    shard_budget: usize,
    table_shift: u32,
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
        }
    }

    fn shard(&self, offset: u64) -> &Mutex<Shard> {
        &self.shards[((offset >> self.table_shift) as usize) % SHARDS]
    }

    pub(crate) fn lookup(&self, offset: u64) -> Lookup {
        let mut shard = self.shard(offset).lock().unwrap_or_else(|e| e.into_inner());
        let now = shard.tick();
        if let Some((table, used)) = shard.tables.get_mut(&offset) {
            *used = now;
            let table = table.clone();
            shard.hits += 1;
            return Lookup::Hit(table);
        }
        shard.misses += 1;
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

    /// Forgets the table at `offset` (it moved: nothing on disk leads there any more).
    pub(crate) fn remove(&self, offset: u64) {
        let mut shard = self.shard(offset).lock().unwrap_or_else(|e| e.into_inner());
        if let Some((table, _)) = shard.tables.remove(&offset) {
            shard.bytes -= table.memory_bytes();
        }
    }

    fn add(&self, shard: &mut Shard, table: L2Table) -> Arc<L2Table> {
        let bytes = table.memory_bytes();
        let table = Arc::new(table);
        shard.bytes += bytes;
        let now = shard.tick();
        shard.tables.insert(table.offset, (table.clone(), now));
        self.evict(shard, Some(&table));
        table
    }

    /// Drops least recently used clean tables nobody else holds until the shard fits.
    fn evict(&self, shard: &mut Shard, keep: Option<&Arc<L2Table>>) {
        while shard.bytes > self.shard_budget {
            let victim = shard
                .tables
                .iter()
                .filter(|(_, (t, _))| {
                    keep.is_none_or(|k| !Arc::ptr_eq(t, k))
                        && Arc::strong_count(t) == 1
                        && !t.entries.is_dirty()
                })
                .min_by_key(|(_, (_, used))| *used)
                .map(|(off, _)| *off);
            let Some(off) = victim else { break };
            if let Some((t, _)) = shard.tables.remove(&off) {
                shard.bytes -= t.memory_bytes();
                shard.evictions += 1;
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
            self.evict(&mut shard, None);
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let mut stats = CacheStats::default();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            stats.hits += shard.hits;
            stats.misses += shard.misses;
            stats.evictions += shard.evictions;
            stats.bytes += shard.bytes as u64;
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Entries;

    const TABLE: u64 = 4096 * 4;

    fn clean(offset: u64) -> L2Table {
        L2Table::new(offset, Entries::from_le_bytes(&vec![0u8; TABLE as usize]))
    }

    #[test]
    fn counts_hits_and_misses_and_stays_within_budget() {
        // Budget of two tables per shard.
        let cache = L2Cache::new(SHARDS * 2 * TABLE as usize, TABLE);
        let stride = TABLE * SHARDS as u64; // same shard every time
        for i in 0..5 {
            let off = i * stride;
            let Lookup::Miss(token) = cache.lookup(off) else {
                panic!("unexpected hit")
            };
            assert!(cache.insert(clean(off), token).is_some());
        }
        let stats = cache.stats();
        assert_eq!(stats.misses, 5);
        assert_eq!(stats.evictions, 3);
        assert_eq!(stats.bytes, 2 * TABLE);
        // The two most recent survive; the oldest were evicted.
        assert!(matches!(cache.lookup(4 * stride), Lookup::Hit(_)));
        assert!(matches!(cache.lookup(0), Lookup::Miss(_)));
        assert_eq!(cache.stats().hits, 1);
    }

    #[test]
    fn dirty_and_referenced_tables_are_never_evicted() {
        let cache = L2Cache::new(SHARDS * TABLE as usize, TABLE);
        let stride = TABLE * SHARDS as u64;
        let dirty = cache.insert_new(L2Table::new(0, Entries::new_unwritten(TABLE as usize / 8)));
        let Lookup::Miss(token) = cache.lookup(stride) else {
            panic!()
        };
        let held = cache.insert(clean(stride), token).unwrap();
        let Lookup::Miss(token) = cache.lookup(2 * stride) else {
            panic!()
        };
        cache.insert(clean(2 * stride), token).unwrap();
        // Over budget, but the dirty table and the one still held stay.
        assert!(matches!(cache.lookup(0), Lookup::Hit(_)));
        assert!(matches!(cache.lookup(stride), Lookup::Hit(_)));
        drop(held);
        assert!(dirty.entries.take_dirty().is_some());
        drop(dirty);
        cache.shrink();
        assert_eq!(cache.stats().bytes, TABLE);
    }

    #[test]
    fn a_load_that_raced_with_an_eviction_is_retried() {
        let cache = L2Cache::new(SHARDS * TABLE as usize, TABLE);
        let stride = TABLE * SHARDS as u64;
        let Lookup::Miss(stale) = cache.lookup(0) else {
            panic!()
        };
        for i in 1..3 {
            let Lookup::Miss(token) = cache.lookup(i * stride) else {
                panic!()
            };
            cache.insert(clean(i * stride), token).unwrap();
        }
        assert!(cache.insert(clean(0), stale).is_none());
    }
}

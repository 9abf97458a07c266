//! Tables in memory: entries as atomics so readers never lock, plus dirty tracking in
//! 512-byte chunks (64 entries), the unit in which tables are written back.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use qed_format::{decode_entries, encode_entries, ENTRY_SIZE, SECTOR_SIZE};

use crate::storage::Storage;
use crate::{Error, Result};

/// Bytes of table read from storage per step when loading a table: the scratch buffer a load
/// needs besides the table itself.
const LOAD_STEP: usize = 1 << 20;

/// Entries per 512-byte chunk of a table.
pub(crate) const ENTRIES_PER_CHUNK: usize = SECTOR_SIZE as usize / ENTRY_SIZE;

/// One bit per chunk; set when the chunk differs from what is on disk.
#[derive(Debug)]
pub(crate) struct DirtyChunks {
    words: Box<[AtomicU64]>,
}

impl DirtyChunks {
    fn new(chunks: usize, all_dirty: bool) -> Self {
        let init = if all_dirty { u64::MAX } else { 0 };
        let words = (0..chunks.div_ceil(64))
            .map(|w| {
                let bits_here = (chunks - w * 64).min(64);
                let mask = if bits_here == 64 {
                    u64::MAX
                } else {
                    (1u64 << bits_here) - 1
                };
                AtomicU64::new(init & mask)
            })
            .collect();
        Self { words }
    }

    fn mark(&self, chunk: usize) {
        self.words[chunk / 64].fetch_or(1 << (chunk % 64), Ordering::AcqRel);
    }

    pub(crate) fn any(&self) -> bool {
        self.words.iter().any(|w| w.load(Ordering::Acquire) != 0)
    }

    /// Clears at most `max` set bits, lowest first, and returns the runs of chunks they were.
    /// (Only write-back clears bits, one at a time, so a selected bit stays set until then.)
    fn take(&self, max: usize) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        let mut taken = 0;
        for (w, word) in self.words.iter().enumerate() {
            if taken >= max {
                break;
            }
            let mut chosen = 0u64;
            let mut rest = word.load(Ordering::Acquire);
            while rest != 0 && taken < max {
                let lowest = rest & rest.wrapping_neg();
                chosen |= lowest;
                rest &= rest - 1;
                taken += 1;
            }
            if chosen == 0 {
                continue;
            }
            let mut bits = word.fetch_and(!chosen, Ordering::AcqRel) & chosen;
            while bits != 0 {
                let chunk = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                match runs.last_mut() {
                    Some(run) if run.end == chunk => run.end += 1,
                    _ => runs.push(chunk..chunk + 1),
                }
            }
        }
        runs
    }

    fn restore(&self, runs: &[Range<usize>]) {
        for run in runs {
            for chunk in run.clone() {
                self.mark(chunk);
            }
        }
    }
}

/// A table's entries in memory with dirty tracking.
#[derive(Debug)]
pub(crate) struct Entries {
    entries: Box<[AtomicU64]>,
    dirty: DirtyChunks,
}

/// Bytes of a table taken for write-back: runs of whole chunks, encoded little-endian.
#[derive(Debug)]
pub(crate) struct ChunkSnapshot {
    pub(crate) runs: Vec<Range<usize>>,
    pub(crate) bytes: Vec<Vec<u8>>,
}

/// `len` zeroed entries, or an error instead of an abort when memory runs out.
fn zeroed(len: usize) -> Result<Box<[AtomicU64]>> {
    let mut entries = Vec::new();
    entries
        .try_reserve_exact(len)
        .map_err(|_| Error::TooLarge {
            what: "table in memory",
            bytes: (len * ENTRY_SIZE) as u64,
            limit: 0,
        })?;
    entries.resize_with(len, || AtomicU64::new(0));
    Ok(entries.into_boxed_slice())
}

impl Entries {
    /// Reads a table of `len` entries at `offset`, decoding it in steps so that the bytes and
    /// the entries of the whole table never live at once.
    pub(crate) fn load(
        storage: &dyn Storage,
        offset: u64,
        len: usize,
        what: &'static str,
    ) -> Result<Self> {
        let mut entries = zeroed(len)?;
        let total = len * ENTRY_SIZE;
        let mut scratch = vec![0u8; total.min(LOAD_STEP)];
        let mut done = 0;
        while done < total {
            let n = (total - done).min(scratch.len());
            let at = offset + done as u64;
            storage
                .read_at(&mut scratch[..n], at)
                .map_err(Error::io(what, at))?;
            decode_entries(&scratch[..n], done / ENTRY_SIZE, |i, raw| {
                *entries[i].get_mut() = raw;
            });
            done += n;
        }
        Ok(Self {
            dirty: DirtyChunks::new(len.div_ceil(ENTRIES_PER_CHUNK), false),
            entries,
        })
    }

    /// A table of zeros that is not on disk yet: every chunk is dirty.
    pub(crate) fn new_unwritten(len: usize) -> Result<Self> {
        Ok(Self {
            entries: zeroed(len)?,
            dirty: DirtyChunks::new(len.div_ceil(ENTRIES_PER_CHUNK), true),
        })
    }

    /// A copy of `other` that is not on disk yet (a table being moved): every chunk is dirty.
    pub(crate) fn unwritten_copy(other: &Entries) -> Result<Self> {
        let copy = Self::new_unwritten(other.len())?;
        for (to, from) in copy.entries.iter().zip(other.entries.iter()) {
            to.store(from.load(Ordering::Acquire), Ordering::Relaxed);
        }
        Ok(copy)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn get(&self, index: usize) -> u64 {
        self.entries[index].load(Ordering::Acquire)
    }

    /// Publishes a new value; the entry's chunk becomes dirty after the value is visible, so
    /// a write-back that clears the bit always sees the value.
    pub(crate) fn set(&self, index: usize, value: u64) {
        self.entries[index].store(value, Ordering::Release);
        self.dirty.mark(index / ENTRIES_PER_CHUNK);
    }

    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.any()
    }

    /// Takes the dirty chunks: clears their bits first, then copies the entries.
    pub(crate) fn take_dirty(&self) -> Option<ChunkSnapshot> {
        self.take_dirty_upto(usize::MAX)
    }

    /// Like [`Entries::take_dirty`], for at most `max_chunks` chunks (the lowest).
    pub(crate) fn take_dirty_upto(&self, max_chunks: usize) -> Option<ChunkSnapshot> {
        let runs = self.dirty.take(max_chunks);
        if runs.is_empty() {
            return None;
        }
        let bytes = runs
            .iter()
            .map(|run| {
                let start = run.start * ENTRIES_PER_CHUNK;
                let end = (run.end * ENTRIES_PER_CHUNK).min(self.entries.len());
                let mut out = vec![0u8; (end - start) * ENTRY_SIZE];
                encode_entries(&mut out, |i| {
                    self.entries[start + i].load(Ordering::Acquire)
                });
                out
            })
            .collect();
        Some(ChunkSnapshot { runs, bytes })
    }

    /// Marks the chunks of a failed write-back dirty again.
    pub(crate) fn restore_dirty(&self, snapshot: &ChunkSnapshot) {
        self.dirty.restore(&snapshot.runs);
    }
}

/// Claimed index ranges of one table, and how many writers wait for one to settle.
#[derive(Debug, Default)]
struct Claims {
    ranges: Vec<Range<usize>>,
    waiters: usize,
}

/// An L2 table in memory, with the guest clusters of it being allocated right now.
#[derive(Debug)]
pub(crate) struct L2Table {
    /// Host offset of the table.
    pub(crate) offset: u64,
    /// The entries; change them only through [`L2Table::set`] or [`L2Table::settle`].
    pub(crate) entries: Entries,
    /// L2 indexes with an allocation in flight; writers to them wait on `settled`.
    inflight: Mutex<Claims>,
    settled: Condvar,
    /// Whether the table counts in `dirty_bytes` (set at its first change after a write-back).
    counted_dirty: AtomicBool,
    /// Bytes of tables with unwritten changes, shared by every table of one image.
    dirty_bytes: Arc<AtomicUsize>,
    /// Used since the eviction clock last passed (second chance).
    pub(crate) referenced: AtomicBool,
}

impl L2Table {
    /// A table in memory; `dirty_bytes` is the image's counter of tables with unwritten
    /// changes (a table made of unwritten entries counts at once).
    pub(crate) fn new(offset: u64, entries: Entries, dirty_bytes: Arc<AtomicUsize>) -> Self {
        let table = Self {
            offset,
            entries,
            inflight: Mutex::new(Claims::default()),
            settled: Condvar::new(),
            counted_dirty: AtomicBool::new(false),
            dirty_bytes,
            referenced: AtomicBool::new(true),
        };
        if table.entries.is_dirty() {
            table.count_dirty();
        }
        table
    }

    /// Bytes of memory this table holds.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.entries.len() * ENTRY_SIZE
    }

    fn count_dirty(&self) {
        if !self.counted_dirty.load(Ordering::Acquire)
            && !self.counted_dirty.swap(true, Ordering::AcqRel)
        {
            self.dirty_bytes
                .fetch_add(self.memory_bytes(), Ordering::AcqRel);
        }
    }

    /// Sets one entry (the caller holds the claim on it, or the image exclusively).
    pub(crate) fn set(&self, index: usize, value: u64) {
        self.entries.set(index, value);
        self.count_dirty();
    }

    /// Whether the table has changes that are not on disk.
    pub(crate) fn is_dirty(&self) -> bool {
        self.counted_dirty.load(Ordering::Acquire) || self.entries.is_dirty()
    }

    /// Takes the dirty chunks for write-back and stops counting the table as dirty (a change
    /// racing with this counts it again).
    pub(crate) fn take_dirty(&self) -> Option<ChunkSnapshot> {
        self.take_dirty_upto(usize::MAX)
    }

    /// Like [`L2Table::take_dirty`], for at most `max_chunks` chunks: write-back takes a large
    /// table in pieces.
    pub(crate) fn take_dirty_upto(&self, max_chunks: usize) -> Option<ChunkSnapshot> {
        if self.counted_dirty.swap(false, Ordering::AcqRel) {
            self.dirty_bytes
                .fetch_sub(self.memory_bytes(), Ordering::AcqRel);
        }
        self.entries.take_dirty_upto(max_chunks)
    }

    /// Marks the chunks of a failed write-back dirty again.
    pub(crate) fn restore_dirty(&self, snapshot: &ChunkSnapshot) {
        self.entries.restore_dirty(snapshot);
        self.count_dirty();
    }

    /// Waits until no allocation overlaps `range`, then lets `decide` look at the entries
    /// and return the sub-range it claims (if any). The claimed range stays reserved until
    /// [`L2Table::settle`].
    pub(crate) fn claim<T>(
        &self,
        range: Range<usize>,
        decide: impl FnOnce(&Entries) -> Option<(Range<usize>, T)>,
    ) -> Option<(Range<usize>, T)> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        while inflight
            .ranges
            .iter()
            .any(|r| r.start < range.end && range.start < r.end)
        {
            inflight.waiters += 1;
            inflight = self
                .settled
                .wait(inflight)
                .unwrap_or_else(|e| e.into_inner());
            inflight.waiters -= 1;
        }
        let claimed = decide(&self.entries);
        if let Some((r, _)) = &claimed {
            inflight.ranges.push(r.clone());
        }
        claimed
    }

    /// Publishes `values` for the claimed `range` (or nothing on failure) and wakes waiters.
    pub(crate) fn settle(&self, range: Range<usize>, values: Option<&dyn Fn(usize) -> u64>) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(value) = values {
            for i in range.clone() {
                self.set(i, value(i));
            }
        }
        if let Some(pos) = inflight.ranges.iter().position(|r| *r == range) {
            inflight.ranges.swap_remove(pos);
        }
        let waiters = inflight.waiters;
        drop(inflight);
        // No system call when nobody waits (the common case).
        if waiters > 0 {
            self.settled.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_runs_coalesce() {
        let e = Entries::new_unwritten(64 * 3 + 10).unwrap();
        let snap = e.take_dirty().unwrap();
        assert_eq!(snap.runs, vec![0..4]);
        assert_eq!(snap.bytes[0].len(), (64 * 3 + 10) * 8);
        assert!(e.take_dirty().is_none());
        e.set(0, 7);
        e.set(130, 9);
        e.set(200, 1);
        let snap = e.take_dirty().unwrap();
        assert_eq!(snap.runs, vec![0..1, 2..4]);
        e.restore_dirty(&snap);
        assert!(e.is_dirty());
    }

    #[test]
    fn dirty_chunks_are_taken_in_pieces() {
        let e = Entries::new_unwritten(64 * 200).unwrap();
        let first = e.take_dirty_upto(70).unwrap();
        assert_eq!(first.runs, vec![0..70]);
        e.set(0, 5);
        let second = e.take_dirty_upto(1000).unwrap();
        assert_eq!(second.runs, vec![0..1, 70..200]);
        assert_eq!(second.bytes[1].len(), 130 * 512);
        assert!(e.take_dirty().is_none());
    }

    #[test]
    fn tables_count_their_bytes_while_dirty() {
        let counter = Arc::new(AtomicUsize::new(0));
        let storage = crate::storage::MemoryStorage::new();
        let clean = L2Table::new(
            0,
            Entries::load(&storage, 0, 512, "read").unwrap(),
            counter.clone(),
        );
        assert_eq!(counter.load(Ordering::Acquire), 0);
        let fresh = L2Table::new(8192, Entries::new_unwritten(512).unwrap(), counter.clone());
        assert_eq!(counter.load(Ordering::Acquire), 4096);
        clean.set(3, 7);
        clean.set(300, 7);
        assert_eq!(counter.load(Ordering::Acquire), 8192);
        let snap = clean.take_dirty().unwrap();
        assert_eq!(snap.runs, vec![0..1, 4..5]);
        assert_eq!(counter.load(Ordering::Acquire), 4096);
        clean.restore_dirty(&snap);
        assert_eq!(counter.load(Ordering::Acquire), 8192);
        assert!(fresh.take_dirty().is_some());
        assert!(clean.take_dirty().is_some());
        assert_eq!(counter.load(Ordering::Acquire), 0);
        assert!(!clean.is_dirty() && !fresh.is_dirty());
    }

    #[test]
    fn loading_decodes_in_steps() {
        let storage = crate::storage::MemoryStorage::new();
        let len = LOAD_STEP / ENTRY_SIZE * 2 + 5;
        let mut bytes = vec![0u8; len * ENTRY_SIZE];
        encode_entries(&mut bytes, |i| i as u64 * 3);
        storage.write_at(&bytes, 4096).unwrap();
        let e = Entries::load(&storage, 4096, len, "read").unwrap();
        assert!((0..len).all(|i| e.get(i) == i as u64 * 3));
        assert!(!e.is_dirty());
    }
}

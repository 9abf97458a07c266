//! Tables in memory: entries as atomics so readers never lock, plus dirty tracking in
//! 512-byte chunks (64 entries), the unit in which tables are written back.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use qed_format::{ENTRY_SIZE, SECTOR_SIZE};

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

    /// Clears every bit and returns the runs of chunks that were set.
    fn take(&self) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for (w, word) in self.words.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
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

impl Entries {
    pub(crate) fn from_le_bytes(bytes: &[u8]) -> Self {
        let entries: Box<[AtomicU64]> = bytes
            .chunks_exact(ENTRY_SIZE)
            .map(|c| {
                let mut b = [0u8; ENTRY_SIZE];
                b.copy_from_slice(c);
                AtomicU64::new(u64::from_le_bytes(b))
            })
            .collect();
        let chunks = entries.len().div_ceil(ENTRIES_PER_CHUNK);
        Self {
            entries,
            dirty: DirtyChunks::new(chunks, false),
        }
    }

    /// A table of zeros that is not on disk yet: every chunk is dirty.
    pub(crate) fn new_unwritten(len: usize) -> Self {
        let entries: Box<[AtomicU64]> = (0..len).map(|_| AtomicU64::new(0)).collect();
        Self {
            entries,
            dirty: DirtyChunks::new(len.div_ceil(ENTRIES_PER_CHUNK), true),
        }
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
        let runs = self.dirty.take();
        if runs.is_empty() {
            return None;
        }
        let bytes = runs
            .iter()
            .map(|run| {
                let start = run.start * ENTRIES_PER_CHUNK;
                let end = (run.end * ENTRIES_PER_CHUNK).min(self.entries.len());
                let mut out = Vec::with_capacity(run.len() * SECTOR_SIZE as usize);
                for e in &self.entries[start..end] {
                    out.extend_from_slice(&e.load(Ordering::Acquire).to_le_bytes());
                }
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
    pub(crate) entries: Entries,
    /// L2 indexes with an allocation in flight; writers to them wait on `settled`.
    inflight: Mutex<Claims>,
    settled: Condvar,
}

impl L2Table {
    pub(crate) fn new(offset: u64, entries: Entries) -> Self {
        Self {
            offset,
            entries,
            inflight: Mutex::new(Claims::default()),
            settled: Condvar::new(),
        }
    }

    /// Bytes of memory this table holds.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.entries.len() * ENTRY_SIZE
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
                self.entries.set(i, value(i));
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
        let e = Entries::new_unwritten(64 * 3 + 10);
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
}

//! A storage that records every change and rebuilds the disk as a power loss would leave it.
//!
//! [`CrashStorage`] keeps a live copy of the disk in memory (reads see every completed write)
//! and a log of every `write_at`, `set_len`, `punch_hole` and `flush`, in call order
//! (`write_zeroes` keeps the default and is logged as the writes of zeros it makes). Each
//! entry carries its flush epoch: the number of flushes completed before it was issued.
//!
//! A crash after the first `cut` operations of the log keeps everything before the last
//! flush among them (a completed flush is a barrier). Of the operations after that flush,
//! any subset may have reached the disk, in any order, and a write may be torn at 512-byte
//! sector boundaries. [`CrashStorage::crash_states`] walks such disks epoch by epoch:
//!
//! - every prefix of the log;
//! - every subset of each epoch's operations when there are at most
//!   [`CrashOptions::exhaustive_limit`] of them, otherwise some random ones (seeded);
//! - random orders of subsets whose operations overlap (order matters only there);
//! - torn writes: a write (or hole punch) of which only some sectors landed.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use super::{MemoryStorage, Storage};

/// The sector size at which writes may tear.
pub const TORN_SECTOR: u64 = 512;

/// One recorded change (or barrier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashOp {
    /// `write_at(data, offset)`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes written.
        data: Arc<[u8]>,
    },
    /// `set_len(len)`.
    SetLen(u64),
    /// `punch_hole(offset, len)`.
    PunchHole {
        /// Byte offset.
        offset: u64,
        /// Bytes punched.
        len: u64,
    },
    /// `flush()`: everything before it is durable once it returns.
    Flush,
}

impl CrashOp {
    /// The byte range the operation changes (`None` for a flush; a length change counts as
    /// touching everything from the new end on).
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            Self::Write { offset, data } => Some((*offset, offset + data.len() as u64)),
            Self::PunchHole { offset, len } => Some((*offset, offset.saturating_add(*len))),
            Self::SetLen(len) => Some((*len, u64::MAX)),
            Self::Flush => None,
        }
    }

    /// Sector-aligned pieces a torn write may be split into.
    fn pieces(&self) -> usize {
        match self {
            Self::Write { .. } | Self::PunchHole { .. } => {
                let (start, end) = self.range().unwrap_or((0, 0));
                if end <= start {
                    return 1;
                }
                ((end - 1) / TORN_SECTOR - start / TORN_SECTOR + 1) as usize
            }
            _ => 1,
        }
    }
}

/// A recorded operation and its flush epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedOp {
    /// What was done.
    pub op: CrashOp,
    /// Flushes completed before this operation was issued.
    pub epoch: u64,
}

#[derive(Debug, Default)]
struct Recorder {
    live: Vec<u8>,
    log: Vec<LoggedOp>,
    epoch: u64,
}

/// An in-memory storage that logs every change so that the disk after a power loss at any
/// point can be rebuilt.
#[derive(Debug)]
pub struct CrashStorage {
    base: Arc<[u8]>,
    state: Mutex<Recorder>,
}

impl CrashStorage {
    /// A storage whose durable contents before any logged operation are `base`.
    pub fn new(base: Vec<u8>) -> Self {
        Self {
            base: base.clone().into(),
            state: Mutex::new(Recorder {
                live: base,
                ..Recorder::default()
            }),
        }
    }

    /// A storage starting from a copy of everything in `storage`.
    pub fn from_storage(storage: &dyn Storage) -> io::Result<Self> {
        let len = usize::try_from(storage.len()?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "storage too large"))?;
        let mut base = vec![0u8; len];
        storage.read_at(&mut base, 0)?;
        Ok(Self::new(base))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorder> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The contents before the first logged operation.
    pub fn base(&self) -> &[u8] {
        &self.base
    }

    /// A copy of the current contents (every logged operation applied in order).
    pub fn contents(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// Operations logged so far: a position in the log, to mark where a caller's own
    /// operations begin and end.
    pub fn op_count(&self) -> usize {
        self.lock().log.len()
    }

    /// Flushes completed so far.
    pub fn flush_count(&self) -> u64 {
        self.lock().epoch
    }

    /// A copy of the log.
    pub fn log(&self) -> Vec<LoggedOp> {
        self.lock().log.clone()
    }

    /// The disk after the first `cut` operations, applied in order and all durable.
    pub fn replay(&self, cut: usize) -> Vec<u8> {
        let log = self.log();
        let mut disk = self.base.to_vec();
        for entry in &log[..cut.min(log.len())] {
            apply(&mut disk, &entry.op, None);
        }
        disk
    }

    /// Every crash state `options` asks for, built lazily in log order.
    pub fn crash_states(&self, options: &CrashOptions) -> CrashStates {
        let log = self.log();
        CrashStates {
            durable: self.base.to_vec(),
            log,
            options: options.clone(),
            rng: SplitMix64(options.seed),
            epoch_start: 0,
            flush_at: None,
            done: false,
            queue: VecDeque::new(),
        }
    }
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.lock();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(state.live.len());
        let avail = (state.live.len() - start).min(buf.len());
        buf[..avail].copy_from_slice(&state.live[start..start + avail]);
        buf[avail..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        end_of(offset, buf.len() as u64)?;
        self.record(CrashOp::Write {
            offset,
            data: buf.into(),
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.record(CrashOp::Flush);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        end_of(0, len)?;
        self.record(CrashOp::SetLen(len));
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        end_of(offset, len)?;
        self.record(CrashOp::PunchHole { offset, len });
        Ok(())
    }
}

impl CrashStorage {
    /// Applies `op` to the live disk and logs it, under one lock so log order is apply order.
    fn record(&self, op: CrashOp) {
        let mut state = self.lock();
        apply(&mut state.live, &op, None);
        let epoch = state.epoch;
        if op == CrashOp::Flush {
            state.epoch += 1;
        }
        state.log.push(LoggedOp { op, epoch });
    }
}

fn end_of(offset: u64, len: u64) -> io::Result<usize> {
    offset
        .checked_add(len)
        .and_then(|end| usize::try_from(end).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))
}

/// Applies `op` to `disk`; with `landed`, only those sector pieces of a write or punch.
fn apply(disk: &mut Vec<u8>, op: &CrashOp, landed: Option<&[bool]>) {
    match op {
        CrashOp::Write { offset, data } => {
            let start = *offset as usize;
            for (from, to) in pieces(start as u64, data.len() as u64, landed) {
                let (from, to) = (from as usize, to as usize);
                if disk.len() < to {
                    disk.resize(to, 0);
                }
                disk[from..to].copy_from_slice(&data[from - start..to - start]);
            }
        }
        CrashOp::PunchHole { offset, len } => {
            for (from, to) in pieces(*offset, *len, landed) {
                let end = (to as usize).min(disk.len());
                let from = (from as usize).min(end);
                disk[from..end].fill(0);
            }
        }
        CrashOp::SetLen(len) => disk.resize(*len as usize, 0),
        CrashOp::Flush => {}
    }
}

/// The sector-aligned pieces of `[offset, offset + len)` that `landed` selects (all of them
/// when `None`), merged where adjacent.
fn pieces(offset: u64, len: u64, landed: Option<&[bool]>) -> Vec<(u64, u64)> {
    let end = offset + len;
    let Some(landed) = landed else {
        return vec![(offset, end)];
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut from = offset;
    for &keep in landed {
        if from >= end {
            break;
        }
        let to = ((from / TORN_SECTOR + 1) * TORN_SECTOR).min(end);
        if keep {
            match out.last_mut() {
                Some(last) if last.1 == from => last.1 = to,
                _ => out.push((from, to)),
            }
        }
        from = to;
    }
    out
}

/// Which crash states [`CrashStorage::crash_states`] produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashOptions {
    /// Seed of every random choice.
    pub seed: u64,
    /// Epochs with at most this many operations get every subset.
    pub exhaustive_limit: usize,
    /// Random subsets per larger epoch.
    pub random_subsets: usize,
    /// Random orders per epoch (only of subsets in which some operations overlap).
    pub reorders: usize,
    /// Torn variants per multi-sector write or punch.
    pub torn_per_write: usize,
}

impl Default for CrashOptions {
    fn default() -> Self {
        Self {
            seed: 0x5eed,
            exhaustive_limit: 10,
            random_subsets: 64,
            reorders: 8,
            torn_per_write: 2,
        }
    }
}

/// How a crash state came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrashKind {
    /// Every operation before the cut landed, in order.
    Prefix,
    /// Some of the operations since the last flush landed, in order.
    Subset,
    /// Some of the operations since the last flush landed, in another order.
    Reordered,
    /// The operations before one write landed, and some sectors of that write.
    Torn,
}

/// One disk as a power loss could leave it.
#[derive(Debug, Clone)]
pub struct CrashState {
    /// Operations issued before the crash (`log[..cut]`).
    pub cut: usize,
    /// Operations certainly durable (`log[..durable]`, up to the last completed flush).
    pub durable: usize,
    /// Indexes of the operations after `durable` that landed, in the order applied.
    pub applied: Vec<usize>,
    /// The operation of which only some sectors landed, if any.
    pub torn: Option<usize>,
    /// How the state came about.
    pub kind: CrashKind,
    /// The disk contents.
    pub bytes: Vec<u8>,
}

impl CrashState {
    /// A memory storage holding this disk.
    pub fn into_storage(self) -> MemoryStorage {
        MemoryStorage::from_bytes(self.bytes)
    }
}

struct Plan {
    cut: usize,
    applied: Vec<usize>,
    torn: Option<(usize, Vec<bool>)>,
    kind: CrashKind,
}

/// Iterator over crash states, see [`CrashStorage::crash_states`].
pub struct CrashStates {
    log: Vec<LoggedOp>,
    options: CrashOptions,
    rng: SplitMix64,
    /// The disk with `log[..epoch_start]` applied.
    durable: Vec<u8>,
    epoch_start: usize,
    /// The flush ending the epoch whose plans are queued, if it is not the last.
    flush_at: Option<usize>,
    done: bool,
    queue: VecDeque<Plan>,
}

impl std::fmt::Debug for CrashStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrashStates")
            .field("ops", &self.log.len())
            .field("epoch_start", &self.epoch_start)
            .field("queued", &self.queue.len())
            .finish()
    }
}

impl Iterator for CrashStates {
    type Item = CrashState;

    fn next(&mut self) -> Option<CrashState> {
        loop {
            if let Some(plan) = self.queue.pop_front() {
                return Some(self.build(plan));
            }
            if self.done {
                return None;
            }
            if let Some(flush) = self.flush_at.take() {
                // The epoch's plans are built: its operations and flush are now durable.
                for entry in &self.log[self.epoch_start..=flush] {
                    apply(&mut self.durable, &entry.op, None);
                }
                self.epoch_start = flush + 1;
            }
            self.plan_epoch();
        }
    }
}

impl CrashStates {
    fn build(&self, plan: Plan) -> CrashState {
        let mut bytes = self.durable.clone();
        for &i in &plan.applied {
            apply(&mut bytes, &self.log[i].op, None);
        }
        if let Some((i, landed)) = &plan.torn {
            apply(&mut bytes, &self.log[*i].op, Some(landed));
        }
        CrashState {
            cut: plan.cut,
            durable: self.epoch_start,
            applied: plan.applied,
            torn: plan.torn.map(|(i, _)| i),
            kind: plan.kind,
            bytes,
        }
    }

    /// Queues the states of the epoch starting at `epoch_start`; moves `durable` past the
    /// flush that ends the previous one.
    fn plan_epoch(&mut self) {
        let start = self.epoch_start;
        let end = self.log[start..]
            .iter()
            .position(|e| e.op == CrashOp::Flush)
            .map_or(self.log.len(), |p| start + p);
        let last = end == self.log.len();
        let m = end - start;
        // Prefixes. A full prefix ending at a flush equals the next epoch's first state,
        // which promises more (the flush completed), so it is left to that epoch.
        let cuts = if last { start..end + 1 } else { start..end };
        for cut in cuts {
            self.queue.push_back(Plan {
                cut,
                applied: (start..cut).collect(),
                torn: None,
                kind: CrashKind::Prefix,
            });
        }
        // Subsets, in log order; prefixes are already covered.
        let is_prefix = |mask: &[bool]| mask.iter().skip_while(|&&b| b).all(|&b| !b);
        let mut subsets: Vec<Vec<bool>> = Vec::new();
        if m <= self.options.exhaustive_limit {
            for bits in 0u64..(1u64 << m) {
                subsets.push((0..m).map(|i| bits >> i & 1 == 1).collect());
            }
        } else {
            for _ in 0..self.options.random_subsets {
                subsets.push((0..m).map(|_| self.rng.next() & 1 == 1).collect());
            }
        }
        for mask in subsets.into_iter().filter(|m| !is_prefix(m)) {
            self.queue.push_back(Plan {
                cut: end,
                applied: (start..end).filter(|&i| mask[i - start]).collect(),
                torn: None,
                kind: CrashKind::Subset,
            });
        }
        // Reorders: only subsets where two operations overlap can come out differently.
        let mut tries = self.options.reorders * 4;
        let mut made = 0;
        while made < self.options.reorders && tries > 0 && m >= 2 {
            tries -= 1;
            let mut chosen: Vec<usize> =
                (start..end).filter(|_| self.rng.next() % 4 != 0).collect();
            if !self.any_overlap(&chosen) {
                continue;
            }
            let sorted = chosen.clone();
            self.rng.shuffle(&mut chosen);
            if chosen == sorted {
                continue;
            }
            made += 1;
            self.queue.push_back(Plan {
                cut: end,
                applied: chosen,
                torn: None,
                kind: CrashKind::Reordered,
            });
        }
        // Torn writes: everything before the write landed, and some of its sectors.
        for i in start..end {
            let n = self.log[i].op.pieces();
            if n < 2 {
                continue;
            }
            for variant in 0..self.options.torn_per_write {
                let landed: Vec<bool> = if variant % 2 == 0 {
                    // A prefix of the sectors: the common way a large write tears.
                    let k = 1 + (self.rng.next() % (n as u64 - 1)) as usize;
                    (0..n).map(|s| s < k).collect()
                } else {
                    let mut mask: Vec<bool> = (0..n).map(|_| self.rng.next() & 1 == 1).collect();
                    if mask.iter().all(|&b| b) {
                        mask[0] = false;
                    }
                    mask
                };
                self.queue.push_back(Plan {
                    cut: i + 1,
                    applied: (start..i).collect(),
                    torn: Some((i, landed)),
                    kind: CrashKind::Torn,
                });
            }
        }
        match last {
            true => self.done = true,
            false => self.flush_at = Some(end),
        }
    }

    fn any_overlap(&self, ops: &[usize]) -> bool {
        let ranges: Vec<(u64, u64)> = ops.iter().filter_map(|&i| self.log[i].op.range()).collect();
        ranges
            .iter()
            .enumerate()
            .any(|(a, ra)| ranges[a + 1..].iter().any(|rb| ra.0 < rb.1 && rb.0 < ra.1))
    }
}

/// A small seeded generator (SplitMix64).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(storage: &CrashStorage, at: u64, byte: u8, len: usize) {
        storage.write_at(&vec![byte; len], at).unwrap();
    }

    #[test]
    fn writes_before_a_completed_flush_are_always_present() {
        let s = CrashStorage::new(vec![0; 1024]);
        op(&s, 0, 1, 512);
        s.flush().unwrap();
        op(&s, 512, 2, 512);
        op(&s, 0, 3, 4);
        assert_eq!(s.flush_count(), 1);
        assert_eq!(s.log()[3].epoch, 1);
        let states: Vec<CrashState> = s.crash_states(&CrashOptions::default()).collect();
        for st in &states {
            if st.cut >= 2 {
                assert_eq!(st.durable, 2);
                // The flushed write may be overwritten only by the later write to byte 0..4.
                assert!(st.bytes[4..512].iter().all(|&b| b == 1), "{st:?}");
            }
        }
        // Prefixes 0, 1 (the full prefix at 1 is left to cut 2), 2, 3, 4; subsets of the
        // last epoch: {3} alone; a reorder of {2, 3} changes nothing (no overlap).
        let kinds: Vec<(CrashKind, usize)> = states.iter().map(|s| (s.kind, s.cut)).collect();
        assert!(kinds.contains(&(CrashKind::Subset, 4)));
        assert_eq!(
            states
                .iter()
                .filter(|s| s.kind == CrashKind::Prefix)
                .count(),
            4
        );
        assert!(states.iter().any(|s| s.bytes[512] == 0 && s.bytes[0] == 3));
        assert_eq!(s.replay(4), s.contents());
    }

    #[test]
    fn torn_writes_land_whole_sectors() {
        let s = CrashStorage::new(Vec::new());
        s.write_at(&[7u8; 1500], 100).unwrap();
        let torn: Vec<CrashState> = s
            .crash_states(&CrashOptions {
                torn_per_write: 6,
                ..CrashOptions::default()
            })
            .filter(|st| st.kind == CrashKind::Torn)
            .collect();
        assert_eq!(torn.len(), 6);
        for st in torn {
            let mut landed = 0;
            for (from, to) in [(100, 512), (512, 1024), (1024, 1536), (1536, 1600)] {
                let piece = st.bytes.get(from..to.min(st.bytes.len())).unwrap_or(&[]);
                if piece.len() == to - from && piece.iter().all(|&b| b == 7) {
                    landed += 1;
                } else {
                    assert!(
                        piece.iter().all(|&b| b == 0),
                        "sector {from} is whole or absent"
                    );
                }
            }
            assert!((1..4).contains(&landed));
        }
    }

    #[test]
    fn write_zeroes_is_logged_as_writes_of_zeros() {
        let s = CrashStorage::new(vec![9; 1024]);
        s.flush().unwrap();
        s.write_zeroes(1000, 100).unwrap();
        let mut want = vec![9; 1000];
        want.resize(1100, 0);
        assert_eq!(s.contents(), want);
        let log = s.log();
        assert_eq!(log.len(), 2);
        assert!(
            matches!(&log[1].op, CrashOp::Write { offset: 1000, data } if data[..] == [0; 100])
        );
        // A crash before it reached the disk leaves the old bytes.
        let states: Vec<CrashState> = s.crash_states(&CrashOptions::default()).collect();
        assert!(states.iter().any(|st| st.bytes == [9; 1024]));
        assert!(states.iter().any(|st| st.bytes == want));
    }

    #[test]
    fn overlapping_writes_are_reordered_and_holes_punched() {
        let s = CrashStorage::new(vec![9; 600]);
        op(&s, 0, 1, 8);
        op(&s, 4, 2, 8);
        s.punch_hole(512, 100).unwrap();
        s.set_len(2048).unwrap();
        let states: Vec<CrashState> = s.crash_states(&CrashOptions::default()).collect();
        assert!(states
            .iter()
            .any(|st| st.kind == CrashKind::Reordered && st.bytes[4..8] == [1; 4]));
        assert!(states.iter().all(|st| st.bytes[511] == 9));
        assert_eq!(s.contents().len(), 2048);
        assert!(s.contents()[512..600].iter().all(|&b| b == 0));
        // 4 operations: 16 subsets, 5 of them prefixes.
        assert_eq!(
            states
                .iter()
                .filter(|s| s.kind == CrashKind::Subset)
                .count(),
            11
        );
    }
}

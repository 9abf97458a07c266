//! A storage that fails chosen calls, for testing error paths.
//!
//! [`FaultStorage`] wraps any [`Storage`], counts every fallible call by kind, and can be
//! armed with a [`Fault`]: the `nth` call (1-based) among the calls of the selected kinds
//! returns an `io::Error` instead of reaching the inner storage (and, if the fault is
//! persistent, every later call of those kinds does too). A test first runs a workload unarmed
//! to count the calls, then reruns it once per `n`.

use std::fmt;
use std::io;
use std::ops::BitOr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::Storage;

/// A kind of storage call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `flush`.
    Flush,
    /// `len`.
    Len,
    /// `set_len`.
    SetLen,
    /// `punch_hole`.
    PunchHole,
    /// `write_zeroes`.
    WriteZeroes,
    /// `next_data` (and `is_hole`, which asks `next_data`).
    NextData,
    /// `next_hole`.
    NextHole,
}

/// Number of kinds.
const KINDS: usize = 9;

impl OpKind {
    /// Every kind.
    pub const ALL: [OpKind; KINDS] = [
        Self::Read,
        Self::Write,
        Self::Flush,
        Self::Len,
        Self::SetLen,
        Self::PunchHole,
        Self::WriteZeroes,
        Self::NextData,
        Self::NextHole,
    ];

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Flush => "flush",
            Self::Len => "len",
            Self::SetLen => "set_len",
            Self::PunchHole => "punch_hole",
            Self::WriteZeroes => "write_zeroes",
            Self::NextData => "next_data",
            Self::NextHole => "next_hole",
        })
    }
}

/// A set of call kinds (`OpKind::Write | OpKind::Flush`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct OpKinds(u16);

impl OpKinds {
    /// No kind.
    pub const NONE: Self = Self(0);
    /// Every kind.
    pub const ALL: Self = Self((1 << KINDS) - 1);

    /// Whether `kind` is in the set.
    pub fn contains(self, kind: OpKind) -> bool {
        self.0 & kind.bit() != 0
    }
}

impl From<OpKind> for OpKinds {
    fn from(kind: OpKind) -> Self {
        Self(kind.bit())
    }
}

impl<T: Into<OpKinds>> BitOr<T> for OpKinds {
    type Output = OpKinds;
    fn bitor(self, rhs: T) -> OpKinds {
        Self(self.0 | rhs.into().0)
    }
}

impl<T: Into<OpKinds>> BitOr<T> for OpKind {
    type Output = OpKinds;
    fn bitor(self, rhs: T) -> OpKinds {
        OpKinds::from(self) | rhs
    }
}

/// Which call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The kinds of call counted (and failed).
    pub kinds: OpKinds,
    /// The call that fails, counting from 1 among calls of `kinds` since the fault was armed.
    pub nth: u64,
    /// Whether every later call of `kinds` fails as well (a dead disk) rather than only the
    /// `nth` (a transient error).
    pub persistent: bool,
}

impl Fault {
    /// Fails only the `nth` call of `kinds`.
    pub fn once(kinds: impl Into<OpKinds>, nth: u64) -> Self {
        Self {
            kinds: kinds.into(),
            nth,
            persistent: false,
        }
    }

    /// Fails the `nth` call of `kinds` and every one after it.
    pub fn from_nth(kinds: impl Into<OpKinds>, nth: u64) -> Self {
        Self {
            kinds: kinds.into(),
            nth,
            persistent: true,
        }
    }
}

/// Calls seen, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounts {
    counts: [u64; KINDS],
}

impl OpCounts {
    /// Calls of `kind`.
    pub fn of(&self, kind: OpKind) -> u64 {
        self.counts[kind as usize]
    }

    /// Calls of every kind in `kinds`.
    pub fn total(&self, kinds: OpKinds) -> u64 {
        OpKind::ALL
            .iter()
            .filter(|k| kinds.contains(**k))
            .map(|k| self.of(*k))
            .sum()
    }
}

#[derive(Debug, Default)]
struct Armed {
    fault: Option<Fault>,
    /// Calls of the fault's kinds since it was armed.
    seen: u64,
}

/// A storage that forwards to `S` and fails the calls a [`Fault`] selects.
#[derive(Debug)]
pub struct FaultStorage<S> {
    inner: S,
    counts: [AtomicU64; KINDS],
    armed: Mutex<Armed>,
    injected: AtomicU64,
}

impl<S: Storage> FaultStorage<S> {
    /// Wraps `inner`, unarmed: it only counts.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            counts: Default::default(),
            armed: Mutex::new(Armed::default()),
            injected: AtomicU64::new(0),
        }
    }

    /// Wraps `inner`, armed with `fault`.
    pub fn failing(inner: S, fault: Fault) -> Self {
        let storage = Self::new(inner);
        storage.arm(fault);
        storage
    }

    /// Arms `fault`; its call count starts now.
    pub fn arm(&self, fault: Fault) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Armed {
            fault: Some(fault),
            seen: 0,
        };
    }

    /// Stops injecting faults (counting goes on).
    pub fn disarm(&self) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Armed::default();
    }

    /// Calls seen so far, by kind (failed ones included).
    pub fn counts(&self) -> OpCounts {
        let mut counts = OpCounts::default();
        for (c, n) in counts.counts.iter_mut().zip(&self.counts) {
            *c = n.load(Ordering::Acquire);
        }
        counts
    }

    /// Calls failed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Acquire)
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Unwraps the storage.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Counts a call of `kind`; fails it if the armed fault says so.
    fn enter(&self, kind: OpKind) -> io::Result<()> {
        let call = self.counts[kind as usize].fetch_add(1, Ordering::AcqRel) + 1;
        let mut armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fault) = armed.fault else {
            return Ok(());
        };
        if !fault.kinds.contains(kind) {
            return Ok(());
        }
        armed.seen += 1;
        let fails = armed.seen == fault.nth || (fault.persistent && armed.seen > fault.nth);
        if !fails {
            return Ok(());
        }
        self.injected.fetch_add(1, Ordering::AcqRel);
        Err(io::Error::other(format!(
            "injected fault: {kind} call {call} (call {} of the armed kinds)",
            armed.seen
        )))
    }
}

impl<S: Storage> Storage for FaultStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.enter(OpKind::Read)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.enter(OpKind::Write)?;
        self.inner.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.enter(OpKind::Flush)?;
        self.inner.flush()
    }

    fn len(&self) -> io::Result<u64> {
        self.enter(OpKind::Len)?;
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.enter(OpKind::SetLen)?;
        self.inner.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.enter(OpKind::PunchHole)?;
        self.inner.punch_hole(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.enter(OpKind::WriteZeroes)?;
        self.inner.write_zeroes(offset, len)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.enter(OpKind::NextData)?;
        self.inner.next_data(offset)
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        self.enter(OpKind::NextHole)?;
        self.inner.next_hole(offset)
    }

    // `is_hole` keeps the default, which asks `next_data` and so counts (and fails) as one.

    /// The inner storage's alignment; not a call that can fail, so not counted.
    fn alignment(&self) -> u64 {
        self.inner.alignment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    #[test]
    fn fails_the_nth_call_of_the_armed_kinds() {
        let s = FaultStorage::failing(
            MemoryStorage::new(),
            Fault::once(OpKind::Write | OpKind::Flush, 3),
        );
        s.write_at(b"a", 0).unwrap();
        s.flush().unwrap();
        s.read_at(&mut [0u8; 1], 0).unwrap();
        assert!(s.write_at(b"b", 1).is_err());
        s.write_at(b"c", 2).unwrap();
        assert_eq!(s.inner().to_bytes(), b"a\0c");
        assert_eq!(s.injected(), 1);
        let counts = s.counts();
        assert_eq!(counts.of(OpKind::Write), 3);
        assert_eq!(counts.total(OpKinds::ALL), 5);
    }

    #[test]
    fn persistent_faults_keep_failing() {
        let s = FaultStorage::failing(MemoryStorage::new(), Fault::from_nth(OpKind::Flush, 2));
        s.flush().unwrap();
        assert!(s.flush().is_err());
        assert!(s.flush().is_err());
        s.write_at(b"x", 0).unwrap();
        s.disarm();
        s.flush().unwrap();
        assert_eq!(s.injected(), 2);
    }

    #[test]
    fn zeroes_and_hole_queries_are_counted_and_can_fail() {
        let s = FaultStorage::failing(
            MemoryStorage::from_bytes(vec![1; 8]),
            Fault::once(OpKind::WriteZeroes, 2),
        );
        s.write_zeroes(0, 2).unwrap();
        assert!(s.write_zeroes(4, 2).is_err());
        assert_eq!(s.inner().to_bytes(), [0, 0, 1, 1, 1, 1, 1, 1]);
        s.arm(Fault::once(OpKind::NextData | OpKind::NextHole, 2));
        assert_eq!(s.next_data(3).unwrap(), Some(3));
        // `is_hole` asks `next_data`: the second call of the armed kinds.
        assert!(s.is_hole(2, 2).is_err());
        assert_eq!(s.next_hole(0).unwrap(), 8);
        assert_eq!(s.alignment(), 1);
        let counts = s.counts();
        assert_eq!(counts.of(OpKind::WriteZeroes), 2);
        assert_eq!(counts.of(OpKind::NextData), 2);
        assert_eq!(counts.of(OpKind::NextHole), 1);
        assert_eq!(counts.total(OpKinds::ALL), 5);
        assert_eq!(s.injected(), 2);
        assert!(OpKind::ALL.iter().all(|&k| OpKinds::ALL.contains(k)));
        assert_eq!(OpKind::NextHole.to_string(), "next_hole");
    }
}

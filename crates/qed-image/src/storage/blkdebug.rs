//! [`BlkdebugStorage`]: QEMU's `blkdebug` filter as a storage — requests widened to a chosen
//! alignment (read-modify-write for unaligned writes, so what is read and written is the
//! same as without it), and errors injected into the requests that rules select.
//!
//! A rule is QEMU's `inject-error`: the kinds of request it applies to, the byte it must
//! cover (or any request), the errno it fails them with, and whether it acts once. Rules are
//! armed by events; the only event this engine fires is `none`, when the storage is set up
//! (QEMU fires it when blkdebug opens): rules of other events (the format drivers' `read_aio`,
//! `l2_update`, ...) are kept but never armed. `set-state` rules of the `none` event change
//! the state the other rules of that event are matched against, as in QEMU.

use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::Storage;

/// A kind of request, as blkdebug's `iotype` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoType {
    /// `read`.
    Read,
    /// `write`.
    Write,
    /// `write-zeroes`.
    WriteZeroes,
    /// `discard` (punched holes).
    Discard,
    /// `flush`.
    Flush,
    /// `block-status`.
    BlockStatus,
}

impl IoType {
    /// Every kind, in QEMU's order.
    pub const ALL: [IoType; 6] = [
        Self::Read,
        Self::Write,
        Self::WriteZeroes,
        Self::Discard,
        Self::Flush,
        Self::BlockStatus,
    ];

    /// The name QEMU gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::WriteZeroes => "write-zeroes",
            Self::Discard => "discard",
            Self::Flush => "flush",
            Self::BlockStatus => "block-status",
        }
    }

    /// The kind QEMU names `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of request kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IoTypes(u8);

impl IoTypes {
    /// What a rule without `iotype` applies to, as in QEMU: reads, writes, write-zeroes,
    /// discards and flushes (not block status).
    pub const DEFAULT: Self = Self(0b01_1111);

    /// Only `kind`.
    pub fn only(kind: IoType) -> Self {
        Self(kind.bit())
    }

    /// Whether `kind` is in the set.
    pub fn contains(self, kind: IoType) -> bool {
        self.0 & kind.bit() != 0
    }
}

/// When a rule is armed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// QEMU's `none`: when the storage is set up.
    Open,
    /// QEMU's `write_aio`: before a write. QEMU's format drivers fire it for the guest data
    /// they write; here every write through the storage fires it, metadata writes too.
    Write,
    /// Any other event, by its name: never fired here.
    Other(String),
}

/// What a rule does once armed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `inject-error`: fail the requests it selects.
    Inject(Injection),
    /// `set-state`: move to another state.
    SetState {
        /// The new state.
        new_state: u64,
    },
}

/// Which requests an `inject-error` rule fails, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injection {
    /// The kinds of request.
    pub iotypes: IoTypes,
    /// The errno they fail with (0: the rule matches but nothing fails, as in QEMU).
    pub errno: i32,
    /// A byte the request must cover (QEMU's `sector` × 512); `None`: every request.
    pub offset: Option<u64>,
    /// Whether the rule goes away after it failed a request.
    pub once: bool,
}

/// One rule: the event that arms it, the state it needs (0: any) and its action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The event.
    pub event: Event,
    /// The state the rule needs to act (0: any).
    pub state: u64,
    /// What it does.
    pub action: Action,
}

/// A storage seen through blkdebug: `align`ed requests and injected errors.
#[derive(Debug)]
pub struct BlkdebugStorage<S> {
    inner: S,
    align: u64,
    /// The armed `inject-error` rules, in QEMU's order (the first that matches acts).
    active: Mutex<Armed>,
    /// The state after the open event.
    state: u64,
    /// Held by every write-type request when requests are widened (read-modify-write).
    writes: Mutex<()>,
}

/// The rules that can act: armed ones, and those a write arms.
#[derive(Debug, Default)]
struct Armed {
    /// Armed injections, each with the number of its rule, the first that matches acting.
    now: Vec<(usize, Injection)>,
    /// The injections of [`Event::Write`] rules (for the state after the open), in the order
    /// a write arms them.
    on_write: Vec<(usize, Injection)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<S: Storage> BlkdebugStorage<S> {
    /// `inner` seen through blkdebug with request alignment `align` (0 or 1: none; else a
    /// power of two; the inner storage's own alignment counts too) and `rules`; the `none`
    /// event fires now.
    pub fn new(inner: S, align: u64, rules: Vec<Rule>) -> io::Result<Self> {
        if align > 1 && !align.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("Cannot meet constraints with align {align}"),
            ));
        }
        let align = align.max(inner.alignment()).max(1);
        // QEMU: the state starts at 1; the rules of the event are processed in the reverse
        // of their order (each was put at the head of its list), and each armed injection
        // goes to the head of the active list.
        let mut state = 1;
        let mut new_state = state;
        let mut active = Armed::default();
        for (id, rule) in rules.iter().enumerate().rev() {
            if rule.event != Event::Open || (rule.state != 0 && rule.state != state) {
                continue;
            }
            match &rule.action {
                Action::Inject(injection) => active.now.insert(0, (id, *injection)),
                Action::SetState { new_state: s } => new_state = *s,
            }
        }
        state = new_state;
        for (id, rule) in rules.iter().enumerate().rev() {
            if let (Event::Write, Action::Inject(injection)) = (&rule.event, &rule.action) {
                if rule.state == 0 || rule.state == state {
                    active.on_write.insert(0, (id, *injection));
                }
            }
        }
        Ok(Self {
            inner,
            align,
            active: Mutex::new(active),
            state,
            writes: Mutex::new(()),
        })
    }

    /// The storage underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The state the rules are in (1 at first).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// QEMU's `rule_check`: the first armed rule of this kind that covers the request fails
    /// it (and goes, if it acts once).
    fn check(&self, offset: u64, len: u64, kind: IoType) -> io::Result<()> {
        let mut armed = lock(&self.active);
        if kind == IoType::Write && !armed.on_write.is_empty() {
            // QEMU: an event with injections arms exactly those.
            let Armed { now, on_write } = &mut *armed;
            now.clone_from(on_write);
        }
        let found = armed.now.iter().position(|(_, rule)| {
            let covers = match rule.offset {
                None => true,
                Some(at) => len > 0 && at >= offset && at - offset < len,
            };
            covers && rule.iotypes.contains(kind)
        });
        let Some(i) = found else { return Ok(()) };
        let (id, rule) = armed.now[i];
        if rule.errno == 0 {
            return Ok(());
        }
        if rule.once {
            // Gone for good, as QEMU removes the rule: no event arms it again.
            armed.now.remove(i);
            armed.on_write.retain(|&(other, _)| other != id);
        }
        Err(io::Error::from_raw_os_error(rule.errno))
    }

    fn widened(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset / self.align * self.align;
        let end = offset.saturating_add(len).next_multiple_of(self.align);
        (start, end)
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        offset % self.align == 0 && len % self.align == 0
    }

    /// The guard writes hold while requests are widened.
    fn write_guard(&self) -> Option<MutexGuard<'_, ()>> {
        (self.align > 1).then(|| lock(&self.writes))
    }

    /// Writes `buf` at `offset`, widened: the partial blocks at either end are read first (as
    /// the block layer reads them, through the rules), then the whole aligned range written.
    fn write_widened(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (start, end) = self.widened(offset, buf.len() as u64);
        let mut block = vec![0u8; (end - start) as usize];
        let head = offset - start;
        let tail_start = offset + buf.len() as u64;
        if head > 0 {
            self.check(start, self.align, IoType::Read)?;
            self.inner
                .read_at(&mut block[..self.align as usize], start)?;
        }
        if tail_start < end {
            let last = end - self.align;
            if last >= start + self.align || head == 0 {
                self.check(last, self.align, IoType::Read)?;
                let at = (last - start) as usize;
                self.inner
                    .read_at(&mut block[at..at + self.align as usize], last)?;
            }
        }
        block[head as usize..head as usize + buf.len()].copy_from_slice(buf);
        self.check(start, end - start, IoType::Write)?;
        self.inner.write_at(&block, start)
    }

    /// Zeroes (or punches) `[offset, offset + len)`: the aligned middle by `whole`, the
    /// partial blocks at either end written as zeros.
    fn zero_widened(
        &self,
        offset: u64,
        len: u64,
        kind: IoType,
        whole: impl Fn(&S, u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset.saturating_add(len);
        let middle_start = offset.next_multiple_of(self.align);
        let middle_end = end / self.align * self.align;
        if middle_start >= middle_end {
            return self.write_zero_bytes(offset, end);
        }
        if offset < middle_start {
            self.write_zero_bytes(offset, middle_start)?;
        }
        self.check(middle_start, middle_end - middle_start, kind)?;
        whole(&self.inner, middle_start, middle_end - middle_start)?;
        if middle_end < end {
            self.write_zero_bytes(middle_end, end)?;
        }
        Ok(())
    }

    fn write_zero_bytes(&self, start: u64, end: u64) -> io::Result<()> {
        let zeros = vec![0u8; (end - start) as usize];
        if self.aligned(start, end - start) {
            self.check(start, end - start, IoType::Write)?;
            self.inner.write_at(&zeros, start)
        } else {
            self.write_widened(&zeros, start)
        }
    }
}

impl<S: Storage> Storage for BlkdebugStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.aligned(offset, buf.len() as u64) {
            self.check(offset, buf.len() as u64, IoType::Read)?;
            return self.inner.read_at(buf, offset);
        }
        let (start, end) = self.widened(offset, buf.len() as u64);
        self.check(start, end - start, IoType::Read)?;
        let mut block = vec![0u8; (end - start) as usize];
        self.inner.read_at(&mut block, start)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&block[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _guard = self.write_guard();
        if self.aligned(offset, buf.len() as u64) {
            self.check(offset, buf.len() as u64, IoType::Write)?;
            return self.inner.write_at(buf, offset);
        }
        self.write_widened(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.check(0, 0, IoType::Flush)?;
        self.inner.flush()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _guard = self.write_guard();
        self.inner.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let _guard = self.write_guard();
        self.zero_widened(offset, len, IoType::Discard, |s, o, l| s.punch_hole(o, l))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let _guard = self.write_guard();
        self.zero_widened(offset, len, IoType::WriteZeroes, |s, o, l| {
            s.write_zeroes(o, l)
        })
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.inner.next_data(offset)
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        self.inner.next_hole(offset)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.check(offset, len, IoType::BlockStatus)?;
        self.inner.block_status(offset, len)
    }

    fn alignment(&self) -> u64 {
        self.align
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn inject(iotypes: IoTypes, offset: Option<u64>, once: bool) -> Rule {
        Rule {
            event: Event::Open,
            state: 0,
            action: Action::Inject(Injection {
                iotypes,
                errno: libc::EIO,
                offset,
                once,
            }),
        }
    }

    #[test]
    fn write_rules_are_armed_by_writes_and_once_rules_act_once() {
        let on_write = |once, errno| Rule {
            event: Event::Write,
            state: 0,
            action: Action::Inject(Injection {
                iotypes: IoTypes::DEFAULT,
                errno,
                offset: None,
                once,
            }),
        };
        let file = || MemoryStorage::from_bytes(vec![0; 8192]);
        let s = BlkdebugStorage::new(file(), 0, vec![on_write(true, libc::ENOSPC)]).unwrap();
        // Not armed before a write: reads and flushes go through.
        let mut buf = [0u8; 512];
        s.read_at(&mut buf, 0).unwrap();
        s.flush().unwrap();
        let err = s.write_at(&[1; 512], 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        // Gone once it acted, for writes and everything else.
        s.write_at(&[2; 512], 512).unwrap();
        s.read_at(&mut buf, 512).unwrap();
        assert_eq!(buf, [2; 512]);
        assert_eq!(&s.inner().to_bytes()[..512], &[0; 512]);
        // Without `once` every write fails, and once armed the rule fails reads too.
        let s = BlkdebugStorage::new(file(), 0, vec![on_write(false, libc::EIO)]).unwrap();
        s.read_at(&mut buf, 0).unwrap();
        for _ in 0..2 {
            assert!(s.write_at(&[1; 512], 0).is_err());
        }
        assert!(s.read_at(&mut buf, 0).is_err());
    }

    #[test]
    fn widened_writes_change_only_their_bytes() {
        let s =
            BlkdebugStorage::new(MemoryStorage::from_bytes(vec![7; 16384]), 4096, vec![]).unwrap();
        assert_eq!(s.alignment(), 4096);
        s.write_at(&[1; 100], 4000).unwrap();
        s.write_zeroes(10, 9000).unwrap();
        s.punch_hole(12000, 100).unwrap();
        let bytes = s.inner().to_bytes();
        assert_eq!(bytes.len(), 16384);
        assert!(bytes[..10].iter().all(|&b| b == 7));
        assert!(bytes[10..9010].iter().all(|&b| b == 0));
        assert!(bytes[9010..12000].iter().all(|&b| b == 7));
        assert!(bytes[12000..12100].iter().all(|&b| b == 0));
        assert!(bytes[12100..].iter().all(|&b| b == 7));
        let mut buf = [9u8; 3];
        s.read_at(&mut buf, 9009).unwrap();
        assert_eq!(buf, [0, 7, 7]);
    }

    #[test]
    fn rules_fail_the_requests_that_cover_their_byte() {
        let rules = vec![
            inject(IoTypes::only(IoType::BlockStatus), Some(4096), false),
            inject(IoTypes::DEFAULT, Some(512), true),
        ];
        let s = BlkdebugStorage::new(MemoryStorage::from_bytes(vec![1; 8192]), 0, rules).unwrap();
        let mut buf = [0u8; 512];
        // Once: the first read that covers byte 512 fails, the next does not.
        assert_eq!(
            s.read_at(&mut buf, 512).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        s.read_at(&mut buf, 0).unwrap();
        s.read_at(&mut buf, 512).unwrap();
        assert!(s.read_at(&mut buf, 4096).is_ok());
        assert!(s.block_status(0, 4096).is_ok());
        assert_eq!(
            s.block_status(0, 8192).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert!(s.block_status(4096, 512).is_err());
        assert!(s.block_status(4608, 512).is_ok());
        s.flush().unwrap();
    }

    #[test]
    fn rules_of_other_events_and_states_stay_unarmed() {
        let mut late = inject(IoTypes::DEFAULT, None, false);
        late.event = Event::Other("read_aio".into());
        let mut other_state = inject(IoTypes::DEFAULT, None, false);
        other_state.state = 2;
        let s = BlkdebugStorage::new(MemoryStorage::new(), 0, vec![late, other_state]).unwrap();
        s.write_at(&[1; 10], 0).unwrap();
        s.flush().unwrap();
        let set = Rule {
            event: Event::Open,
            state: 0,
            action: Action::SetState { new_state: 42 },
        };
        let s = BlkdebugStorage::new(MemoryStorage::new(), 0, vec![set]).unwrap();
        assert_eq!(s.state(), 42);
        assert!(BlkdebugStorage::new(MemoryStorage::new(), 3000, vec![]).is_err());
    }
}

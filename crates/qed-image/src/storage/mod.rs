//! Positional storage underneath an image: a file, memory, or a test double.
//!
//! Every byte the engine reads or writes goes through [`Storage`], so crash-simulating and
//! fault-injecting storages can stand in for a file in tests. Those two (`CrashStorage` and
//! `FaultStorage`, with their helper types) are built only with the `test-utils` feature.
//! QEMU's filter drivers `blkdebug` (alignment, error injection) and `quorum` are storages
//! over other storages, built with the `filters` feature.

#[cfg(feature = "filters")]
mod blkdebug;
#[cfg(feature = "test-utils")]
mod crash;
#[cfg(feature = "test-utils")]
mod fault;
mod file;
mod lock;
mod memory;
#[cfg(feature = "filters")]
mod quorum;

use std::io;

#[cfg(feature = "filters")]
pub use blkdebug::{Action, BlkdebugStorage, Event, Injection, IoType, IoTypes, Rule};
#[cfg(feature = "test-utils")]
pub use crash::{
    CrashKind, CrashOp, CrashOptions, CrashState, CrashStates, CrashStorage, LoggedOp,
};
#[cfg(feature = "test-utils")]
pub use fault::{Fault, FaultStorage, OpCounts, OpKind, OpKinds};
pub use file::{CacheMode, FileOptions, FileStorage};
pub use lock::{LockMode, QemuLock};
pub use memory::MemoryStorage;
#[cfg(feature = "filters")]
pub use quorum::{QuorumStorage, ReadPattern};

/// A byte-addressed store with positional I/O; every method takes `&self` so that many
/// threads can use one storage at once.
pub trait Storage: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`. Bytes past the end of the storage read as
    /// zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends to `len` bytes (new bytes read as zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Gives the space of `[offset, offset + len)` back, leaving zeros there. The length of the
    /// storage does not change. Storages that cannot do this write zeros instead.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zero_bytes(self, offset, len)
    }

    /// Makes `[offset, offset + len)` read as zeros, keeping (or making) the space allocated
    /// where the storage can; unlike [`punch_hole`](Self::punch_hole) it does not give the
    /// space back. Like writing `len` zeros with [`write_at`](Self::write_at), it grows a
    /// shorter storage to `offset + len` (and never further); `len == 0` does nothing.
    ///
    /// The default writes zeros through `write_at`.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zero_bytes(self, offset, len)
    }

    /// The first offset at or after `offset` that holds data, or `None` when nothing from
    /// `offset` to the end of the storage does (in particular when `offset >= len`); this is
    /// `lseek(SEEK_DATA)`. Holes always read as zeros; reporting a hole as data is allowed
    /// (the default knows no holes and answers `offset` for every `offset < len`), reporting
    /// data as a hole is not. The answer is a snapshot: concurrent writes may change it.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok((offset < self.len()?).then_some(offset))
    }

    /// The first offset at or after `offset` that lies in a hole; this is `lseek(SEEK_HOLE)`.
    /// The end of the storage counts as the start of a hole, so the answer is at most
    /// `max(offset, len)`, and `offset` itself when `offset >= len`. The default knows no
    /// holes and answers `max(offset, len)`.
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        Ok(offset.max(self.len()?))
    }

    /// Whether all of `[offset, offset + len)` is known to be a hole (bytes past the end of
    /// the storage count as a hole; an empty range is one). `true` promises the range reads
    /// as zeros; `false` promises nothing (a hole may be reported as data). Answered from
    /// [`next_data`](Self::next_data).
    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        Ok(match self.next_data(offset)? {
            None => true,
            Some(data) => data >= offset.saturating_add(len),
        })
    }

    /// What `[offset, offset + len)` starts with, as a protocol node's block status says it:
    /// `(data, n)`, the first `n` bytes (`0 < n <= len`) all data (`true`) or all a hole
    /// (`false`; bytes past the end of the storage are a hole). `len` must not be 0. The
    /// answer may call a hole data, never the reverse.
    ///
    /// The default asks [`next_data`](Self::next_data) and, when `offset` holds data,
    /// [`next_hole`](Self::next_hole); a storage that checks the range asked about (a
    /// debugging filter) answers itself.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let end = offset.saturating_add(len);
        Ok(match self.next_data(offset)? {
            None => (false, end - offset),
            Some(data) if data >= end => (false, end - offset),
            Some(data) if data > offset => (false, data - offset),
            Some(_) => {
                let hole = self.next_hole(offset)?;
                // A hole right at `offset` after data there is a race with a writer: take it
                // as data to the end.
                let to = if hole > offset { hole.min(end) } else { end };
                (true, to - offset)
            }
        })
    }

    /// The request alignment (of offsets, lengths and buffer addresses) at which I/O is
    /// efficient, a power of two. Any request works; unaligned ones may cost a
    /// read-modify-write. The default is 1.
    fn alignment(&self) -> u64 {
        1
    }
}

/// A block of zeros to write from, so writing zeros allocates nothing.
pub(crate) static ZERO_BLOCK: [u8; 64 * 1024] = [0; 64 * 1024];

/// Writes `len` zero bytes at `offset` through `write_at`, from a static block of zeros (no
/// allocation), as data: the range ends up allocated on the host. A range past `u64::MAX` is
/// refused.
pub fn write_zero_bytes<S: Storage + ?Sized>(storage: &S, offset: u64, len: u64) -> io::Result<()> {
    if offset.checked_add(len).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range past the end of the address space",
        ));
    }
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_BLOCK.len() as u64);
        storage.write_at(&ZERO_BLOCK[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Forwards every method through a pointer to a storage (`Box`, `Arc`).
macro_rules! forward_storage {
    ($ty:ty) => {
        impl<S: Storage + ?Sized> Storage for $ty {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_at(buf, offset)
            }
            fn flush(&self) -> io::Result<()> {
                (**self).flush()
            }
            fn len(&self) -> io::Result<u64> {
                (**self).len()
            }
            fn set_len(&self, len: u64) -> io::Result<()> {
                (**self).set_len(len)
            }
            fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).punch_hole(offset, len)
            }
            fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).write_zeroes(offset, len)
            }
            fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
                (**self).next_data(offset)
            }
            fn next_hole(&self, offset: u64) -> io::Result<u64> {
                (**self).next_hole(offset)
            }
            fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
                (**self).is_hole(offset, len)
            }
            fn block_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
                (**self).block_status(offset, len)
            }
            fn alignment(&self) -> u64 {
                (**self).alignment()
            }
        }
    };
}

forward_storage!(Box<S>);

forward_storage!(std::sync::Arc<S>);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Only the required methods (over a memory storage): everything else is the default.
    struct Plain(MemoryStorage);

    impl Storage for Plain {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.0.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            self.0.flush()
        }
        fn len(&self) -> io::Result<u64> {
            self.0.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.set_len(len)
        }
    }

    #[test]
    fn defaults_know_no_holes_but_the_end() {
        let s = Plain(MemoryStorage::from_bytes(vec![7; 10_000]));
        assert_eq!(s.next_data(0).unwrap(), Some(0));
        assert_eq!(s.next_data(9_999).unwrap(), Some(9_999));
        assert_eq!(s.next_data(10_000).unwrap(), None);
        assert_eq!(s.next_data(u64::MAX).unwrap(), None);
        assert_eq!(s.next_hole(0).unwrap(), 10_000);
        assert_eq!(s.next_hole(9_999).unwrap(), 10_000);
        assert_eq!(s.next_hole(12_345).unwrap(), 12_345);
        assert!(!s.is_hole(0, 1).unwrap());
        assert!(!s.is_hole(9_999, 100).unwrap());
        assert!(s.is_hole(10_000, 5).unwrap());
        assert!(s.is_hole(5, 0).unwrap());
        assert!(s.is_hole(u64::MAX - 1, 10).unwrap());
        assert_eq!(s.alignment(), 1);
    }

    #[test]
    fn default_write_zeroes_zeros_and_grows_like_a_write() {
        const MIB: usize = 1 << 20;
        let s = Plain(MemoryStorage::from_bytes(vec![7; 3 * MIB]));
        // More than one chunk, unaligned.
        s.write_zeroes(1000, 2 * MIB as u64 + 5).unwrap();
        assert_eq!(s.len().unwrap(), 3 * MIB as u64);
        let bytes = s.0.to_bytes();
        assert!(bytes[..1000].iter().all(|&b| b == 7));
        assert!(bytes[1000..2 * MIB + 1005].iter().all(|&b| b == 0));
        assert!(bytes[2 * MIB + 1005..].iter().all(|&b| b == 7));
        // Across the end: grows to exactly offset + len.
        s.write_zeroes(3 * MIB as u64 - 10, 30).unwrap();
        assert_eq!(s.len().unwrap(), 3 * MIB as u64 + 20);
        assert!(s.0.to_bytes()[3 * MIB - 10..].iter().all(|&b| b == 0));
        // Nothing to zero: nothing grows.
        s.write_zeroes(10 * MIB as u64, 0).unwrap();
        assert_eq!(s.len().unwrap(), 3 * MIB as u64 + 20);
        let err = s.write_zeroes(u64::MAX, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    /// Answers that no default gives.
    struct Odd;

    impl Storage for Odd {
        fn read_at(&self, buf: &mut [u8], _: u64) -> io::Result<()> {
            buf.fill(0xaa);
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            Err(io::Error::other("odd write"))
        }
        fn flush(&self) -> io::Result<()> {
            Err(io::Error::other("odd flush"))
        }
        fn len(&self) -> io::Result<u64> {
            Ok(100)
        }
        fn set_len(&self, _: u64) -> io::Result<()> {
            Err(io::Error::other("odd set_len"))
        }
        fn punch_hole(&self, _: u64, _: u64) -> io::Result<()> {
            Err(io::Error::other("odd punch_hole"))
        }
        fn write_zeroes(&self, _: u64, _: u64) -> io::Result<()> {
            Err(io::Error::other("odd write_zeroes"))
        }
        fn next_data(&self, _: u64) -> io::Result<Option<u64>> {
            Ok(Some(42))
        }
        fn next_hole(&self, _: u64) -> io::Result<u64> {
            Ok(7)
        }
        fn is_hole(&self, _: u64, _: u64) -> io::Result<bool> {
            Ok(true)
        }
        fn alignment(&self) -> u64 {
            512
        }
    }

    #[test]
    fn arc_forwards_every_method() {
        let s = Arc::new(Odd);
        let message = |r: io::Result<()>| r.unwrap_err().to_string();
        let mut buf = [0; 3];
        Storage::read_at(&s, &mut buf, 0).unwrap();
        assert_eq!(buf, [0xaa; 3]);
        assert_eq!(message(Storage::write_at(&s, b"x", 0)), "odd write");
        assert_eq!(message(Storage::flush(&s)), "odd flush");
        assert_eq!(Storage::len(&s).unwrap(), 100);
        assert_eq!(message(Storage::set_len(&s, 1)), "odd set_len");
        assert_eq!(message(Storage::punch_hole(&s, 0, 1)), "odd punch_hole");
        assert_eq!(message(Storage::write_zeroes(&s, 0, 1)), "odd write_zeroes");
        assert_eq!(Storage::next_data(&s, 0).unwrap(), Some(42));
        assert_eq!(Storage::next_hole(&s, 0).unwrap(), 7);
        // The default would ask next_data (42, inside [0, 100)) and answer false.
        assert!(Storage::is_hole(&s, 0, 100).unwrap());
        assert_eq!(Storage::alignment(&s), 512);
    }
}

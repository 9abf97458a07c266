//! Positional storage underneath an image: a file, memory, or a test double.
//!
//! Every byte the engine reads or writes goes through [`Storage`], so crash-simulating and
//! fault-injecting storages can stand in for a file in tests. Those two (`CrashStorage` and
//! `FaultStorage`, with their helper types) are built only with the `test-utils` feature.

#[cfg(feature = "test-utils")]
mod crash;
#[cfg(feature = "test-utils")]
mod fault;
mod file;
mod lock;
mod memory;

use std::io;

#[cfg(feature = "test-utils")]
pub use crash::{
    CrashKind, CrashOp, CrashOptions, CrashState, CrashStates, CrashStorage, LoggedOp,
};
#[cfg(feature = "test-utils")]
pub use fault::{Fault, FaultStorage, OpCounts, OpKind, OpKinds};
pub use file::{CacheMode, FileOptions, FileStorage};
pub use lock::{LockMode, QemuLock};
pub use memory::MemoryStorage;

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
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
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
}

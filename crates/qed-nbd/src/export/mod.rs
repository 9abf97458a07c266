//! What the server exports: the operations it needs from a disk, for a QED image (through the
//! engine and its extent iterators) and for a raw file.

mod image;
mod raw;
mod window;

use qed_image::{Result, ZeroFlags};

pub use raw::RawExport;
pub use window::Window;

/// What a guest range is, as block status and reads need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// It reads as zeros.
    pub zero: bool,
    /// No storage backs it (writing may allocate).
    pub hole: bool,
    /// The layer that holds it, counted from 1 (the exported image); 0 where none does.
    pub depth: u32,
}

/// A disk the server can export. `Send + Sync`: every method takes `&self`, and many workers
/// call them at once.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are allowed.
    fn is_writable(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`. On success every byte of `buf` is written (zeros
    /// where the disk reads as zeros): the server reads into reused buffers holding stale
    /// bytes of earlier replies, and sends `buf` as it is.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`; with `fua`, durable before it returns.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()>;
    /// Makes a range read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()>;
    /// Gives a range's space back (what reads return afterwards is the format's rule).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// What `[offset, offset + len)` is, in order from `offset`, in about `max` pieces at most
    /// (a shorter answer covers less of the range). `holes` asks to find data ranges whose
    /// storage is a hole (costs a file-system query per data range).
    fn status(&self, offset: u64, len: u64, max: usize, holes: bool) -> Result<Vec<Status>>;
}

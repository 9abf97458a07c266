//! Whole-disk operations shared by the command line and the NBD server: block status through
//! a backing chain ([`Disk::block_status`]), `map`, `compare`, `convert`, `resize`,
//! `rebase`, `commit`, `measure`, `dd` and `bench`.
//!
//! Each works on a [`Disk`]: a QED image with its backing chain, or a raw file. All of them
//! walk the extent iterators (a raw file answers with `SEEK_DATA`/`SEEK_HOLE`), so a range no
//! layer holds and a zero range are never read, and each holds at most a fixed buffer
//! ([`IO_BUF_SIZE`], or the sparse block of a convert when that is larger) however large the
//! disk.
//!
//! Where a result is something `qemu-img` also prints (the entries of `map`, the verdict and
//! offset of `compare`), it is computed by QEMU's rules, so that the two tools agree on the
//! same files.

mod bench;
mod commit;
mod compare;
mod convert;
mod dd;
mod disk;
#[cfg(feature = "foreign")]
mod foreign;
mod layered;
mod map;
mod measure;
mod rebase;
mod resize;
mod status;

pub use bench::{bench, BenchError, BenchOptions, MAX_BUFFER_BYTES, MAX_WORKERS};
pub use commit::{commit, CommitError, CommitOptions, CommitStats};
pub use compare::{compare, CompareError, CompareOptions, CompareOutcome, Side};
pub use convert::{
    convert, convert_salvaging, create_target, ConvertError, ConvertOptions, ConvertStats,
    NewTarget, MAX_PARALLEL, MAX_SPARSE_SIZE,
};
pub use dd::{dd, plan as dd_plan, DdError, DdOptions, DdPlan, DdStats};
pub use disk::{format_of_head, not_here, probe_disk_format, Disk, DiskFormat, RawDisk};
#[cfg(feature = "foreign")]
pub use foreign::ForeignDisk;
pub use layered::DiskStorage;
pub use map::{map, MapEntries, MapEntry};
pub use measure::{measure, measure_size, MeasureFormat, Measurement};
pub use rebase::{rebase, RebaseError, RebaseOptions, RebaseStats};
pub use resize::{new_size, resize, Preallocation, ResizeError, ResizeOptions, SizeChange};
pub use status::{BlockStatus, BlockStatusIter, StatusKind};

/// Bytes read or compared at a time (qemu-img's buffer size too).
pub const IO_BUF_SIZE: usize = 2 << 20;

/// The block layer's sector: sizes of raw files are rounded up to it, and `compare` reports
/// mismatches at its granularity.
pub const SECTOR: u64 = 512;

/// Whether every byte of `buf` is zero.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    let all_words = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0);
    all_words && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 100]));
        for i in 0..100 {
            let mut buf = [0u8; 100];
            buf[i] = 1;
            assert!(!is_zero(&buf), "{i}");
        }
    }
}

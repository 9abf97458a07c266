//! `O_DIRECT` I/O on a host file.
//!
//! `O_DIRECT` only accepts requests whose buffer address, file offset and length are multiples
//! of the device's logical block size. [`Direct`] accepts any request all the same:
//!
//! * aligned requests (to [`DIRECT_ALIGN`]) with an aligned buffer go straight to the kernel,
//!   without a lock or an allocation;
//! * other reads go through an aligned bounce buffer (one per thread, reused) covering the
//!   aligned blocks around the request;
//! * other writes read, modify and write back the partially covered blocks at either end
//!   (read-modify-write). Each such block is guarded by a lock from a small striped table
//!   keyed by block index, so concurrent writers to *different* bytes of one block never lose
//!   each other's bytes. Writes that overlap are not ordered against each other (as with any
//!   storage); in particular a fully aligned write does not wait for a read-modify-write of
//!   the same block.
//! * a write whose unaligned end lies in a block reaching past the end of the file would
//!   grow the file to the end of that block; its last partial block is written through a
//!   second, buffered descriptor instead, so the file length stays exact. Linux keeps
//!   buffered and direct I/O on one file coherent, and `fdatasync` covers both.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

use super::request_end;

/// Alignment of buffer addresses, offsets and lengths for `O_DIRECT` I/O: 4 KiB, which covers
/// every common logical block size (512 and 4096).
pub(super) const DIRECT_ALIGN: usize = 4096;
pub(super) const ALIGN: u64 = DIRECT_ALIGN as u64;

/// Largest stretch of file one bounce-buffer round trip covers; longer unaligned requests are
/// split, so a thread's bounce buffer never grows past this (plus alignment slack).
pub(super) const BOUNCE_MAX: usize = 1 << 20;

/// Number of locks in the read-modify-write lock table.
const RMW_STRIPES: usize = 64;

/// What `O_DIRECT` I/O needs besides the file itself.
#[derive(Debug)]
pub(super) struct Direct {
    /// The same file opened without `O_DIRECT`, for writes that must not be padded to a
    /// block boundary (present when writable).
    buffered: Option<File>,
    /// Serializes read-modify-write of partially written blocks, by block index.
    stripes: Box<[Mutex<()>]>,
}

impl Direct {
    /// The state for a file opened with `O_DIRECT`; `buffered` is the same file opened
    /// without it (for writable files).
    pub(super) fn new(buffered: Option<File>) -> Self {
        Self {
            buffered,
            stripes: (0..RMW_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Reads `buf.len()` bytes at `offset` of `file` (opened with `O_DIRECT`), whatever their
    /// alignment; bytes past the end of the file read as zeros.
    pub(super) fn read(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf.as_ptr(), offset, buf.len()) {
            return read_aligned(file, buf, offset);
        }
        let end = request_end(offset, buf.len())?;
        let (start, stop) = (align_down(offset), align_up(end));
        with_bounce((stop - start) as usize, |bounce| {
            let mut pos = start;
            while pos < stop {
                let n = (stop - pos).min(bounce.len() as u64) as usize;
                read_aligned(file, &mut bounce[..n], pos)?;
                let (from, to) = (pos.max(offset), (pos + n as u64).min(end));
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&bounce[(from - pos) as usize..(to - pos) as usize]);
                pos += n as u64;
            }
            Ok(())
        })
    }

    /// Writes all of `buf` at `offset` of `file` (opened with `O_DIRECT`), whatever its
    /// alignment, growing the file to exactly `offset + buf.len()` if it is shorter.
    pub(super) fn write(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf.as_ptr(), offset, buf.len()) {
            return self.write_aligned(file, buf, offset);
        }
        let end = request_end(offset, buf.len())?;
        let tail = end % ALIGN != 0;
        let _guards = self.lock_edges(offset, end);

        // Padding the last block past the end of the file would make the file longer than
        // `end`: write that block's part through the page cache. (If the file grows in the
        // meantime this is merely slower; it is only checked under the block's lock.)
        let mut direct_end = end;
        if tail && align_up(end) > file.metadata()?.len() {
            direct_end = align_down(end).max(offset);
            let data = &buf[(direct_end - offset) as usize..];
            self.buffered()?.write_all_at(data, direct_end)?;
        }
        if direct_end == offset {
            return Ok(());
        }
        let buf = &buf[..(direct_end - offset) as usize];
        let (start, stop) = (align_down(offset), align_up(direct_end));
        with_bounce((stop - start) as usize, |bounce| {
            let mut pos = start;
            while pos < stop {
                let n = (stop - pos).min(bounce.len() as u64) as usize;
                let chunk = &mut bounce[..n];
                let (from, to) = (pos.max(offset), (pos + n as u64).min(direct_end));
                // Old contents of the partially written blocks at the edges.
                if from % ALIGN != 0 {
                    read_aligned(file, &mut chunk[..DIRECT_ALIGN], pos)?;
                }
                if to % ALIGN != 0 && (n > DIRECT_ALIGN || from % ALIGN == 0) {
                    read_aligned(
                        file,
                        &mut chunk[n - DIRECT_ALIGN..],
                        pos + (n - DIRECT_ALIGN) as u64,
                    )?;
                }
                chunk[(from - pos) as usize..(to - pos) as usize]
                    .copy_from_slice(&buf[(from - offset) as usize..(to - offset) as usize]);
                self.write_aligned(file, chunk, pos)?;
                pos += n as u64;
            }
            Ok(())
        })
    }

    /// Locks the read-modify-write stripes of the blocks that `[offset, end)` covers only
    /// partly. Anything else that changes part of a block in place (a hole punched or a range
    /// zeroed by the file system) takes them too, so it cannot race a read-modify-write.
    pub(super) fn lock_edges(&self, offset: u64, end: u64) -> [Option<MutexGuard<'_, ()>>; 2] {
        let head = (offset % ALIGN != 0).then_some(offset / ALIGN);
        let tail = (end % ALIGN != 0).then_some(end / ALIGN);
        self.lock_blocks(head, tail)
    }

    /// Writes an aligned buffer whose length is a multiple of [`ALIGN`] at an aligned offset.
    fn write_aligned(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match file.write_at(&buf[done..], offset + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    done += n;
                    if done % DIRECT_ALIGN != 0 && done < buf.len() {
                        // A short write that broke alignment (the disk filled up): finish
                        // through the page cache, which reports the real error.
                        return self
                            .buffered()?
                            .write_all_at(&buf[done..], offset + done as u64);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn buffered(&self) -> io::Result<&File> {
        self.buffered.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "file storage is not open for writing",
            )
        })
    }

    /// Locks the stripes of the partially written blocks `a` and `b` (either may be absent or
    /// both the same), always in ascending stripe order so that two writers cannot deadlock.
    fn lock_blocks(&self, a: Option<u64>, b: Option<u64>) -> [Option<MutexGuard<'_, ()>>; 2] {
        let stripe = |block: u64| (block % self.stripes.len() as u64) as usize;
        let mut ids = [a.map(stripe), b.map(stripe)];
        if ids[0] == ids[1] {
            ids[1] = None;
        }
        ids.sort_unstable_by_key(|id| id.unwrap_or(usize::MAX));
        ids.map(|id| {
            id.map(|i| {
                self.stripes[i]
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
            })
        })
    }
}

/// Reads at an aligned offset into an aligned buffer whose length is a multiple of
/// [`ALIGN`], zero-filling past the end of the file.
fn read_aligned(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => {
                done += n;
                if done % DIRECT_ALIGN != 0 {
                    // A direct read ends inside a block only at the end of the file.
                    buf[done..].fill(0);
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn align_down(x: u64) -> u64 {
    x & !(ALIGN - 1)
}

fn align_up(x: u64) -> u64 {
    align_down(x + ALIGN - 1)
}

fn is_aligned(ptr: *const u8, offset: u64, len: usize) -> bool {
    ptr.align_offset(DIRECT_ALIGN) == 0 && offset % ALIGN == 0 && len % DIRECT_ALIGN == 0
}

thread_local! {
    /// This thread's bounce buffer for unaligned `O_DIRECT` requests.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on an aligned scratch buffer of `min(len, BOUNCE_MAX)` bytes (rounded up to
/// [`ALIGN`]), reusing this thread's buffer.
fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> io::Result<R>) -> io::Result<R> {
    let want = len.min(BOUNCE_MAX).next_multiple_of(DIRECT_ALIGN);
    let run = |vec: &mut Vec<u8>| {
        if vec.len() < want + DIRECT_ALIGN {
            vec.resize(want + DIRECT_ALIGN, 0);
        }
        let start = vec.as_ptr().align_offset(DIRECT_ALIGN);
        if start >= DIRECT_ALIGN {
            return Err(io::Error::other("cannot align the O_DIRECT bounce buffer"));
        }
        f(&mut vec[start..start + want])
    };
    BOUNCE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut vec) => run(&mut vec),
        // Already in use further up this thread's stack: use a fresh buffer.
        Err(_) => run(&mut Vec::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{direct_dir, options};
    use super::super::{CacheMode, FileOptions, FileStorage};
    use super::*;
    use crate::storage::lock::{LockMode, QemuLock};
    use crate::storage::Storage;
    use std::sync::Arc;

    /// xorshift64*: deterministic pseudo-random numbers.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// `len` bytes at an address `misalign` bytes past a 4 KiB boundary.
    fn buffer(storage: &mut Vec<u8>, len: usize, misalign: usize) -> &mut [u8] {
        storage.clear();
        storage.resize(len + misalign + DIRECT_ALIGN, 0);
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN) + misalign;
        &mut storage[start..start + len]
    }

    fn write_ref(reference: &mut Vec<u8>, data: &[u8], offset: usize) {
        if reference.len() < offset + data.len() {
            reference.resize(offset + data.len(), 0);
        }
        reference[offset..offset + data.len()].copy_from_slice(data);
    }

    fn read_ref(reference: &[u8], offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len)
            .map(|i| reference.get(i).copied().unwrap_or(0))
            .collect()
    }

    #[test]
    fn direct_round_trip_unaligned_matches_reference() {
        let dir = direct_dir();
        let path = dir.path().join("img");
        let file = FileStorage::open(&path, &options(CacheMode::None)).unwrap();
        assert!(file.direct.is_some());
        let mut reference = Vec::new();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut scratch = Vec::new();
        for round in 0..600 {
            // Mix aligned and unaligned offsets, lengths and buffers.
            let aligned = rng.below(4) == 0;
            let (offset, len, misalign) = if aligned {
                let offset = rng.below(96) * ALIGN;
                let len = (1 + rng.below(80)) as usize * DIRECT_ALIGN;
                (offset, len, 0)
            } else {
                let offset = rng.below(400_000);
                let len = match rng.below(4) {
                    0 => 1 + rng.below(16),
                    1 => 1 + rng.below(DIRECT_ALIGN as u64 * 2),
                    2 => 1 + rng.below(20_000),
                    _ => 1 + rng.below(3 * BOUNCE_MAX as u64),
                } as usize;
                (offset, len, rng.below(DIRECT_ALIGN as u64) as usize)
            };
            if rng.below(2) == 0 {
                let buf = buffer(&mut scratch, len, misalign);
                for b in buf.iter_mut() {
                    *b = rng.next() as u8;
                }
                file.write_at(buf, offset).unwrap();
                write_ref(&mut reference, buf, offset as usize);
                assert_eq!(file.len().unwrap(), reference.len() as u64, "round {round}");
            } else {
                let buf = buffer(&mut scratch, len, misalign);
                buf.fill(0xee);
                file.read_at(buf, offset).unwrap();
                assert!(
                    buf == read_ref(&reference, offset as usize, len).as_slice(),
                    "round {round}: read {len} at {offset} (misalign {misalign})"
                );
            }
        }
        file.flush().unwrap();
        drop(file);
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk == reference);
    }

    #[test]
    fn direct_write_keeps_exact_length_and_reads_zeros_past_eof() {
        let dir = direct_dir();
        let path = dir.path().join("img");
        let file = FileStorage::open(&path, &options(CacheMode::None)).unwrap();
        file.write_at(b"hello", 3).unwrap();
        assert_eq!(file.len().unwrap(), 8);
        file.write_at(&[7; 100], 5000).unwrap();
        assert_eq!(file.len().unwrap(), 5100);
        file.write_at(&[9; 3], 4094).unwrap();
        assert_eq!(file.len().unwrap(), 5100);
        let mut buf = vec![0xff; 20_000];
        file.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..3], &[0, 0, 0]);
        assert_eq!(&buf[3..8], b"hello");
        assert!(buf[8..4094].iter().all(|&b| b == 0));
        assert_eq!(&buf[4094..4097], &[9, 9, 9]);
        assert!(buf[5000..5100].iter().all(|&b| b == 7));
        assert!(buf[5100..].iter().all(|&b| b == 0));
        let mut past = vec![0xff; 4096];
        file.read_at(&mut past, 1 << 30).unwrap();
        assert!(past.iter().all(|&b| b == 0));
    }

    #[test]
    fn direct_concurrent_unaligned_writers_to_shared_blocks() {
        const THREADS: usize = 8;
        const UNIT: usize = 24; // units straddle block boundaries now and then
        const UNITS: usize = 2048; // 48 KiB: 12 blocks shared by all threads
        const BASE: u64 = 5;
        let dir = direct_dir();
        let path = dir.path().join("img");
        let file = Arc::new(FileStorage::open(&path, &options(CacheMode::None)).unwrap());
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let file = Arc::clone(&file);
                std::thread::spawn(move || {
                    let mut rng = Rng(0x1234_5678 + t as u64);
                    let mut mine: Vec<usize> = (t..UNITS).step_by(THREADS).collect();
                    for round in 0..3u8 {
                        // Shuffle so that threads meet in the same blocks in varying order.
                        for i in (1..mine.len()).rev() {
                            mine.swap(i, rng.below(i as u64 + 1) as usize);
                        }
                        for &unit in &mine {
                            let data = [(t as u8) << 4 | round; UNIT];
                            file.write_at(&data, BASE + (unit * UNIT) as u64).unwrap();
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(file.len().unwrap(), BASE + (UNITS * UNIT) as u64);
        let mut all = vec![0; UNITS * UNIT];
        file.read_at(&mut all, BASE).unwrap();
        for (unit, bytes) in all.chunks(UNIT).enumerate() {
            let want = ((unit % THREADS) as u8) << 4 | 2;
            assert!(bytes.iter().all(|&b| b == want), "unit {unit}: {bytes:?}");
        }
    }

    #[test]
    fn read_only_direct_storage_reads() {
        let dir = direct_dir();
        let path = dir.path().join("img");
        std::fs::write(&path, b"0123456789").unwrap();
        let file = FileStorage::open(
            &path,
            &FileOptions {
                writable: false,
                create: false,
                cache: CacheMode::None,
                lock: LockMode::Read,
            },
        )
        .unwrap();
        let mut buf = [0; 4];
        file.read_at(&mut buf, 3).unwrap();
        assert_eq!(&buf, b"3456");
        assert!(file.write_at(b"x", 0).is_err());
        assert!(file.write_zeroes(0, 1).is_err());
        assert!(file.write_zeroes(7, 100).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
    }

    #[test]
    fn requests_past_off_t_are_refused() {
        let dir = direct_dir();
        let file = FileStorage::open(&dir.path().join("img"), &options(CacheMode::None)).unwrap();
        let mut buf = [0; 3];
        let err = file.read_at(&mut buf, u64::MAX - 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = file.write_at(&buf, u64::MAX - 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = file.punch_hole(u64::MAX - 1, 3).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn direct_buffered_descriptor_keeps_the_lock() {
        // The second (buffered) descriptor of O_DIRECT mode must neither drop nor disturb
        // the lock taken on the first.
        let dir = direct_dir();
        let path = dir.path().join("img");
        let first = FileStorage::open(&path, &options(CacheMode::None)).unwrap();
        assert_eq!(first.lock().map(QemuLock::mode), Some(LockMode::Write));
        let reopen = FileOptions {
            create: false,
            ..options(CacheMode::Writeback)
        };
        assert!(FileStorage::open(&path, &reopen).is_err());
        drop(first);
        assert!(FileStorage::open(&path, &reopen).is_ok());
    }
}

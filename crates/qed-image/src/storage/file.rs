//! Storage on a host file.
//!
//! With [`CacheMode::None`] the file is opened with `O_DIRECT`, which only accepts requests
//! whose buffer address, file offset and length are multiples of the device's logical block
//! size. [`FileStorage`] accepts any request all the same:
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
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

use super::lock::{LockMode, QemuLock};
use super::Storage;

/// Alignment of buffer addresses, offsets and lengths for `O_DIRECT` I/O: 4 KiB, which covers
/// every common logical block size (512 and 4096).
const DIRECT_ALIGN: usize = 4096;
const ALIGN: u64 = DIRECT_ALIGN as u64;

/// Largest stretch of file one bounce-buffer round trip covers; longer unaligned requests are
/// split, so a thread's bounce buffer never grows past this (plus alignment slack).
const BOUNCE_MAX: usize = 1 << 20;

/// Number of locks in the read-modify-write lock table.
const RMW_STRIPES: usize = 64;

/// How the host page cache is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Through the page cache; `flush` is `fdatasync`.
    #[default]
    Writeback,
    /// `O_DIRECT`: bypass the page cache; `flush` is still `fdatasync`. Opening fails on file
    /// systems that refuse `O_DIRECT`.
    None,
    /// Through the page cache; `flush` does nothing (scratch images only).
    Unsafe,
}

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOptions {
    /// Open for writing.
    pub writable: bool,
    /// Create the file (truncating an existing one).
    pub create: bool,
    /// Page-cache use.
    pub cache: CacheMode,
    /// Which QEMU-compatible image lock to take.
    pub lock: LockMode,
}

/// What `O_DIRECT` I/O needs besides the file itself.
#[derive(Debug)]
struct Direct {
    /// The same file opened without `O_DIRECT`, for writes that must not be padded to a
    /// block boundary (present when writable).
    buffered: Option<File>,
    /// Serializes read-modify-write of partially written blocks, by block index.
    stripes: Box<[Mutex<()>]>,
}

/// A host file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    cache: CacheMode,
    direct: Option<Direct>,
    lock: Option<QemuLock>,
}

impl FileStorage {
    /// Opens (or creates) `path` with `options`, taking the image lock `options.lock`.
    ///
    /// Fails with [`io::ErrorKind::WouldBlock`] when another process (or another open of the
    /// file in this one) holds a conflicting QEMU image lock, and with
    /// [`io::ErrorKind::Unsupported`] when [`CacheMode::None`] is asked for on a file system
    /// that refuses `O_DIRECT`.
    pub fn open(path: &Path, options: &FileOptions) -> io::Result<Self> {
        let writable = options.writable || options.create;
        let mut open_options = OpenOptions::new();
        open_options
            .read(true)
            .write(writable)
            .create(options.create)
            // Truncated only once the lock is held: never cut an image another process uses.
            .truncate(false);
        let direct = options.cache == CacheMode::None;
        if direct {
            open_options.custom_flags(libc::O_DIRECT);
        }
        let file = open_options.open(path).map_err(|e| {
            if direct && e.raw_os_error() == Some(libc::EINVAL) {
                direct_unsupported(path)
            } else {
                e
            }
        })?;
        let lock = QemuLock::acquire(&file, options.lock)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        if options.create {
            file.set_len(0)?;
        }
        let direct = if direct {
            let buffered = if writable {
                // Opened after locking: a second open file description holds no lock bytes
                // and does not disturb those of `file`.
                let buffered = OpenOptions::new().read(true).write(true).open(path)?;
                let (a, b) = (file.metadata()?, buffered.metadata()?);
                if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
                    return Err(io::Error::other(format!(
                        "{} was replaced while being opened",
                        path.display()
                    )));
                }
                Some(buffered)
            } else {
                None
            };
            Some(Direct {
                buffered,
                stripes: (0..RMW_STRIPES).map(|_| Mutex::new(())).collect(),
            })
        } else {
            None
        };
        Ok(Self {
            file,
            cache: options.cache,
            direct,
            lock,
        })
    }

    /// The open file (opened with `O_DIRECT` under [`CacheMode::None`]).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The page-cache mode the file was opened with.
    pub fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    /// The image lock held on the file, if any.
    pub fn lock(&self) -> Option<&QemuLock> {
        self.lock.as_ref()
    }

    /// Reads at an aligned offset into an aligned buffer whose length is a multiple of
    /// [`ALIGN`], zero-filling past the end of the file.
    fn read_aligned(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
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

    /// Writes an aligned buffer whose length is a multiple of [`ALIGN`] at an aligned offset.
    fn write_aligned(&self, direct: &Direct, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.write_at(&buf[done..], offset + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    done += n;
                    if done % DIRECT_ALIGN != 0 && done < buf.len() {
                        // A short write that broke alignment (the disk filled up): finish
                        // through the page cache, which reports the real error.
                        return buffered(direct)?.write_all_at(&buf[done..], offset + done as u64);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf.as_ptr(), offset, buf.len()) {
            return self.read_aligned(buf, offset);
        }
        let end = request_end(offset, buf.len())?;
        let (start, stop) = (align_down(offset), align_up(end));
        with_bounce((stop - start) as usize, |bounce| {
            let mut pos = start;
            while pos < stop {
                let n = (stop - pos).min(bounce.len() as u64) as usize;
                self.read_aligned(&mut bounce[..n], pos)?;
                let (from, to) = (pos.max(offset), (pos + n as u64).min(end));
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&bounce[(from - pos) as usize..(to - pos) as usize]);
                pos += n as u64;
            }
            Ok(())
        })
    }

    fn write_direct(&self, direct: &Direct, buf: &[u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf.as_ptr(), offset, buf.len()) {
            return self.write_aligned(direct, buf, offset);
        }
        let end = request_end(offset, buf.len())?;
        let head = (offset % ALIGN != 0).then_some(offset / ALIGN);
        let tail = (end % ALIGN != 0).then_some(end / ALIGN);
        let _guards = lock_blocks(direct, head, tail);

        // Padding the last block past the end of the file would make the file longer than
        // `end`: write that block's part through the page cache. (If the file grows in the
        // meantime this is merely slower; it is only checked under the block's lock.)
        let mut direct_end = end;
        if tail.is_some() && align_up(end) > self.file.metadata()?.len() {
            direct_end = align_down(end).max(offset);
            let data = &buf[(direct_end - offset) as usize..];
            buffered(direct)?.write_all_at(data, direct_end)?;
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
                    self.read_aligned(&mut chunk[..DIRECT_ALIGN], pos)?;
                }
                if to % ALIGN != 0 && (n > DIRECT_ALIGN || from % ALIGN == 0) {
                    self.read_aligned(
                        &mut chunk[n - DIRECT_ALIGN..],
                        pos + (n - DIRECT_ALIGN) as u64,
                    )?;
                }
                chunk[(from - pos) as usize..(to - pos) as usize]
                    .copy_from_slice(&buf[(from - offset) as usize..(to - offset) as usize]);
                self.write_aligned(direct, chunk, pos)?;
                pos += n as u64;
            }
            Ok(())
        })
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.direct.is_some() {
            return self.read_direct(buf, offset);
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        match &self.direct {
            Some(direct) => self.write_direct(direct, buf, offset),
            None => self.file.write_all_at(buf, offset),
        }
    }

    fn flush(&self) -> io::Result<()> {
        match self.cache {
            CacheMode::Unsafe => Ok(()),
            // fdatasync is per inode: it also covers writes made through the buffered
            // descriptor of O_DIRECT mode.
            CacheMode::Writeback | CacheMode::None => self.file.sync_data(),
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "hole too long"))
            .and_then(|len| request_end(offset, len))?;
        // The file system zeroes partial blocks at the edges of a hole in place: keep that
        // from racing with a read-modify-write of the same blocks.
        let guards = self.direct.as_ref().map(|direct| {
            let head = (offset % ALIGN != 0).then_some(offset / ALIGN);
            let tail = (end % ALIGN != 0).then_some(end / ALIGN);
            lock_blocks(direct, head, tail)
        });
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            Err(Errno::EOPNOTSUPP | Errno::ENOSYS) => {
                drop(guards);
                self.write_zeros_within(offset, end)
            }
            Err(errno) => Err(errno.into()),
        }
    }
}

impl FileStorage {
    /// Writes zeros over `[offset, end)` clipped to the current length (a punched hole never
    /// grows the file).
    fn write_zeros_within(&self, offset: u64, end: u64) -> io::Result<()> {
        let end = end.min(self.len()?);
        if offset >= end {
            return Ok(());
        }
        // Aligned zeros, so that aligned parts take the direct fast path. This fallback is
        // rare enough for one allocation per call.
        let size = (end - offset).min(BOUNCE_MAX as u64) as usize;
        let mut zeros = vec![0u8; size + DIRECT_ALIGN];
        let start = zeros.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        let zeros = &mut zeros[start..start + size];
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(size as u64) as usize;
            self.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

fn buffered(direct: &Direct) -> io::Result<&File> {
    direct.buffered.as_ref().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            "file storage is not open for writing",
        )
    })
}

fn direct_unsupported(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "{}: O_DIRECT (cache mode none) is not supported on this file system; \
             use a cached mode",
            path.display()
        ),
    )
}

/// The end of a request, which must stay within what `off_t` can address.
fn request_end(offset: u64, len: usize) -> io::Result<u64> {
    offset
        .checked_add(len as u64)
        .filter(|&end| end <= i64::MAX as u64 - ALIGN)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "request past 2^63"))
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

/// Locks the stripes of the partially written blocks `a` and `b` (either may be absent or
/// both the same), always in ascending stripe order so that two writers cannot deadlock.
fn lock_blocks(direct: &Direct, a: Option<u64>, b: Option<u64>) -> [Option<MutexGuard<'_, ()>>; 2] {
    let stripe = |block: u64| (block % direct.stripes.len() as u64) as usize;
    let mut ids = [a.map(stripe), b.map(stripe)];
    if ids[0] == ids[1] {
        ids[1] = None;
    }
    ids.sort_unstable_by_key(|id| id.unwrap_or(usize::MAX));
    ids.map(|id| {
        id.map(|i| {
            direct.stripes[i]
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        })
    })
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
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    /// A temporary directory on a file system that accepts O_DIRECT (not every tmpfs does).
    fn direct_dir() -> tempfile::TempDir {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let candidates = [
            std::env::temp_dir(),
            PathBuf::from("/var/tmp"),
            manifest.join("../../target"),
            manifest.join("target"),
        ];
        for base in candidates {
            let Ok(dir) = tempfile::tempdir_in(&base) else {
                continue;
            };
            let probe = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(dir.path().join("probe"));
            if probe.is_ok() {
                return dir;
            }
        }
        panic!("no directory on a file system that supports O_DIRECT");
    }

    fn options(cache: CacheMode) -> FileOptions {
        FileOptions {
            writable: true,
            create: true,
            cache,
            lock: LockMode::Write,
        }
    }

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
    fn punch_hole_keeps_length_and_reads_zeros() {
        for cache in [CacheMode::Writeback, CacheMode::None, CacheMode::Unsafe] {
            let dir = direct_dir();
            let path = dir.path().join("img");
            let file = FileStorage::open(&path, &options(cache)).unwrap();
            let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
            file.write_at(&data, 0).unwrap();
            // Unaligned, aligned, and past the end of the file.
            file.punch_hole(1000, 70_000).unwrap();
            file.punch_hole(131_072, 65_536).unwrap();
            file.punch_hole(299_000, 50_000).unwrap();
            file.punch_hole(10, 0).unwrap();
            assert_eq!(file.len().unwrap(), 300_000, "{cache:?}");
            let mut want = data.clone();
            want[1000..71_000].fill(0);
            want[131_072..196_608].fill(0);
            want[299_000..].fill(0);
            let mut got = vec![0xff; 300_000];
            file.read_at(&mut got, 0).unwrap();
            assert!(got == want, "{cache:?}");
            file.flush().unwrap();
            assert!(std::fs::read(&path).unwrap() == want, "{cache:?}");
        }
    }

    #[test]
    fn zero_fallback_never_grows_the_file() {
        let dir = direct_dir();
        let path = dir.path().join("img");
        let file = FileStorage::open(&path, &options(CacheMode::None)).unwrap();
        file.write_at(&[5; 10_000], 0).unwrap();
        file.write_zeros_within(9_000, 20_000).unwrap();
        assert_eq!(file.len().unwrap(), 10_000);
        let mut buf = vec![0xff; 10_000];
        file.read_at(&mut buf, 0).unwrap();
        assert!(buf[..9_000].iter().all(|&b| b == 5));
        assert!(buf[9_000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn cached_modes_round_trip_and_zero_fill() {
        for cache in [CacheMode::Writeback, CacheMode::Unsafe] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("img");
            let file = FileStorage::open(&path, &options(cache)).unwrap();
            assert_eq!(file.cache_mode(), cache);
            file.write_at(b"abc", 10).unwrap();
            file.flush().unwrap();
            let mut buf = [0xff; 20];
            file.read_at(&mut buf, 5).unwrap();
            assert_eq!(&buf[..5], &[0; 5]);
            assert_eq!(&buf[5..8], b"abc");
            assert!(buf[8..].iter().all(|&b| b == 0));
            file.set_len(4).unwrap();
            assert_eq!(file.len().unwrap(), 4);
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
    fn o_direct_refusal_is_explained() {
        let err = direct_unsupported(Path::new("/some/where"));
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert!(err.to_string().contains("O_DIRECT"), "{err}");
        assert!(err.to_string().contains("not supported"), "{err}");
        // And on a file system that really refuses it, if this machine has one.
        let shm = Path::new("/dev/shm");
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            let path = dir.path().join("img");
            if let Err(e) = FileStorage::open(&path, &options(CacheMode::None)) {
                assert!(e.to_string().contains("O_DIRECT"), "{e}");
            }
        }
    }

    #[test]
    fn second_open_conflicts_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let _first = FileStorage::open(&path, &options(CacheMode::Writeback)).unwrap();
        let reopen = FileOptions {
            create: false,
            ..options(CacheMode::Writeback)
        };
        let err = FileStorage::open(&path, &reopen).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(
            err.to_string().contains("locked by another process"),
            "{err}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        let shared = FileOptions {
            lock: LockMode::None,
            ..reopen
        };
        let second = FileStorage::open(&path, &shared).unwrap();
        assert!(second.lock().is_none());
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

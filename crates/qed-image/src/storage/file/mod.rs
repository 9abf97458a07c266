//! Storage on a host file.
//!
//! Through the page cache ([`CacheMode::Writeback`], [`CacheMode::Unsafe`]) requests go to
//! the kernel as they are. With [`CacheMode::None`] the file is opened with `O_DIRECT`, whose
//! alignment rules the `direct` module hides: [`FileStorage`] accepts any request in every
//! mode.

mod direct;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

use self::direct::{Direct, ALIGN, BOUNCE_MAX, DIRECT_ALIGN};
use super::lock::{LockMode, QemuLock};
use super::Storage;

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
        if options.create && file.metadata()?.len() != 0 {
            file.set_len(0)?;
            // ext4 marks a file cut to zero length for a flush of everything written to it
            // when the descriptor is closed (its auto_da_alloc heuristic): a whole converted
            // image written back at close, synchronously. Closing another descriptor now
            // consumes the mark while nothing is written yet. A file created empty is never
            // cut, and never marked.
            drop(OpenOptions::new().read(true).open(path)?);
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
            Some(Direct::new(buffered))
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

    /// The open file (opened with `O_DIRECT` under [`CacheMode::None`]). Its file position
    /// means nothing: the storage does positional I/O and seeks only to find holes.
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
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(direct) = &self.direct {
            return direct.read(&self.file, buf, offset);
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
            Some(direct) => direct.write(&self.file, buf, offset),
            None => self.file.write_all_at(buf, offset),
        }
    }

    fn flush(&self) -> io::Result<()> {
        match self.cache {
            CacheMode::Unsafe => Ok(()),
            // fdatasync is per inode: it also covers writes made through the buffered
            // descriptor of O_DIRECT mode.
            CacheMode::Writeback | CacheMode::None => match self.file.sync_data() {
                // A special file (a character device such as /dev/null) has nothing to sync.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if self.file.metadata()?.file_type().is_file() {
                        Err(e)
                    } else {
                        Ok(())
                    }
                }
                other => other,
            },
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
        let guards = self
            .direct
            .as_ref()
            .map(|direct| direct.lock_edges(offset, end));
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

    /// `fallocate(FALLOC_FL_ZERO_RANGE)`, which leaves the blocks allocated (as unwritten
    /// extents) and grows the file to `offset + len` if it is shorter. Where the file system
    /// refuses it, zeros are written instead; past the end of the file that takes a single
    /// byte, since a file grows with zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range too long"))
            .and_then(|len| request_end(offset, len))?;
        // As for a hole: the file system zeroes partial blocks at the edges in place.
        let guards = self
            .direct
            .as_ref()
            .map(|direct| direct.lock_edges(offset, end));
        let mode = FallocateFlags::FALLOC_FL_ZERO_RANGE;
        match fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) {
            Ok(()) => Ok(()),
            // Some file systems answer EINVAL for byte ranges that are not block aligned,
            // though fallocate(2) does not list that; the arguments were checked above.
            Err(Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL) => {
                drop(guards);
                self.zero_fill(offset, end)
            }
            Err(errno) => Err(errno.into()),
        }
    }

    /// `lseek(SEEK_DATA)`. File systems without hole support answer as if the whole file
    /// were data; so does one that refuses the call with `EINVAL` (an old kernel).
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        // The file cannot be longer than `off_t` reaches.
        let Ok(pos) = libc::off_t::try_from(offset) else {
            return Ok(None);
        };
        match lseek(self.file.as_raw_fd(), pos, Whence::SeekData) {
            Ok(data) => Ok(Some(data as u64)),
            // At or past the end of the file, or only a hole from `offset` on.
            Err(Errno::ENXIO) => Ok(None),
            Err(Errno::EINVAL) => Ok((offset < self.len()?).then_some(offset)),
            Err(errno) => Err(errno.into()),
        }
    }

    /// `lseek(SEEK_HOLE)`; the end of the file is the start of a hole.
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        let Ok(pos) = libc::off_t::try_from(offset) else {
            return Ok(offset);
        };
        match lseek(self.file.as_raw_fd(), pos, Whence::SeekHole) {
            Ok(hole) => Ok(hole as u64),
            // At or past the end of the file: that is a hole.
            Err(Errno::ENXIO) => Ok(offset),
            Err(Errno::EINVAL) => Ok(offset.max(self.len()?)),
            Err(errno) => Err(errno.into()),
        }
    }

    /// 4096 under `O_DIRECT` (smaller or unaligned requests need a bounce buffer or a
    /// read-modify-write), else 1.
    fn alignment(&self) -> u64 {
        match self.direct {
            Some(_) => ALIGN,
            None => 1,
        }
    }
}

impl FileStorage {
    /// Makes `[offset, end)` read as zeros by writing them, growing the file to `end` if it
    /// is shorter (the fallback of `write_zeroes`). Only the part inside the file is written;
    /// beyond it one zero byte at `end - 1` grows the file. (Unlike `set_len`, that cannot
    /// cut off a concurrent write past `end`.)
    fn zero_fill(&self, offset: u64, end: u64) -> io::Result<()> {
        if offset >= end {
            return Ok(());
        }
        let len = self.len()?;
        self.write_zeros(offset, end.min(len))?;
        if end > len {
            self.write_at(&[0], end - 1)?;
        }
        Ok(())
    }

    /// Writes zeros over `[offset, end)` clipped to the current length (a punched hole never
    /// grows the file).
    fn write_zeros_within(&self, offset: u64, end: u64) -> io::Result<()> {
        self.write_zeros(offset, end.min(self.len()?))
    }

    /// Writes zeros over `[offset, end)`.
    fn write_zeros(&self, offset: u64, end: u64) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    /// A temporary directory on a file system that accepts O_DIRECT (not every tmpfs does).
    pub(super) fn direct_dir() -> tempfile::TempDir {
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

    pub(super) fn options(cache: CacheMode) -> FileOptions {
        FileOptions {
            writable: true,
            create: true,
            cache,
            lock: LockMode::Write,
        }
    }

    #[test]
    fn creating_over_a_file_empties_it_and_keeps_the_lock() {
        let dir = direct_dir();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 100_000]).unwrap();
        let file = FileStorage::open(&path, &options(CacheMode::Writeback)).unwrap();
        assert_eq!(file.len().unwrap(), 0);
        // The descriptor opened and closed to clear ext4's flush-at-close mark must not have
        // taken the image lock with it (OFD locks belong to their own descriptor).
        let second = FileStorage::open(&path, &options(CacheMode::Writeback));
        assert_eq!(
            second.map(drop).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        file.write_at(b"new", 0).unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
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

    /// Whether the file system under `dir` reports a punched hole through `SEEK_HOLE` and
    /// `SEEK_DATA` (asked with raw calls, independently of [`FileStorage`]); if not, why.
    fn hole_support(dir: &Path) -> Result<(), String> {
        const K: usize = 65_536;
        let path = dir.join("hole-probe");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("creating a probe file: {e}"))?;
        file.write_all_at(&[1; 3 * K], 0)
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("writing the probe file: {e}"))?;
        let fd = file.as_raw_fd();
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        fallocate(fd, mode, K as i64, K as i64).map_err(|e| format!("punching a hole: {e}"))?;
        let hole = lseek(fd, 0, Whence::SeekHole).map_err(|e| format!("SEEK_HOLE: {e}"))?;
        let data = lseek(fd, K as i64, Whence::SeekData).map_err(|e| format!("SEEK_DATA: {e}"))?;
        if (hole, data) != (K as i64, 2 * K as i64) {
            return Err(format!(
                "around a hole punched at 64..128 KiB, SEEK_HOLE from 0 answers {hole} and \
                 SEEK_DATA from 64 KiB answers {data}"
            ));
        }
        Ok(())
    }

    #[test]
    fn punched_ranges_are_holes_and_written_ranges_data() {
        const K: u64 = 65_536;
        for cache in [CacheMode::Writeback, CacheMode::None, CacheMode::Unsafe] {
            let dir = direct_dir();
            let support = hole_support(dir.path());
            let file = FileStorage::open(&dir.path().join("img"), &options(cache)).unwrap();
            file.write_at(&vec![3; 4 * K as usize], 0).unwrap();
            file.punch_hole(K, 2 * K).unwrap(); // a hole at [64 KiB, 192 KiB)
            file.set_len(8 * K).unwrap(); // and at [256 KiB, 512 KiB), the end
            let c = format!("{cache:?}");

            // On every file system: data is never a hole, past the end is.
            assert!(!file.is_hole(0, 4096).unwrap(), "{c}");
            assert!(!file.is_hole(K - 1, 2).unwrap(), "{c}");
            assert!(!file.is_hole(2 * K, 2 * K).unwrap(), "{c}");
            assert!(!file.is_hole(3 * K, K).unwrap(), "{c}");
            assert_eq!(file.next_data(0).unwrap(), Some(0), "{c}");
            assert_eq!(file.next_data(3 * K + 5).unwrap(), Some(3 * K + 5), "{c}");
            assert_eq!(file.next_data(8 * K).unwrap(), None, "{c}");
            assert_eq!(file.next_data(100 * K).unwrap(), None, "{c}");
            assert_eq!(file.next_hole(8 * K).unwrap(), 8 * K, "{c}");
            assert_eq!(file.next_hole(8 * K + 3).unwrap(), 8 * K + 3, "{c}");
            assert!(file.is_hole(8 * K, 100).unwrap(), "{c}");
            assert!(file.is_hole(0, 0).unwrap(), "{c}");

            match &support {
                Ok(()) => {
                    assert!(file.is_hole(K, 2 * K).unwrap(), "{c}");
                    assert!(file.is_hole(K + 100, 10).unwrap(), "{c}");
                    assert!(!file.is_hole(K, 2 * K + 1).unwrap(), "{c}");
                    assert_eq!(file.next_hole(0).unwrap(), K, "{c}");
                    assert_eq!(file.next_hole(K + 7).unwrap(), K + 7, "{c}");
                    assert_eq!(file.next_data(K).unwrap(), Some(3 * K), "{c}");
                    assert_eq!(file.next_hole(3 * K).unwrap(), 4 * K, "{c}");
                    assert_eq!(file.next_data(4 * K).unwrap(), None, "{c}");
                    assert!(file.is_hole(4 * K, 4 * K).unwrap(), "{c}");
                    assert!(file.is_hole(5 * K, 100 * K).unwrap(), "{c}");
                }
                Err(why) => eprintln!(
                    "{c}: not checking that holes are found, {} does not report them: {why}",
                    dir.path().display()
                ),
            }
        }
    }

    /// Zeroes ranges inside, across and past the end of a file in `dir` and checks the
    /// contents and the length.
    fn check_write_zeroes(dir: &Path, cache: CacheMode) {
        let path = dir.join("img");
        let file = FileStorage::open(&path, &options(cache)).unwrap();
        let c = format!("{cache:?} in {}", dir.display());
        let mut want: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
        file.write_at(&want, 0).unwrap();
        // Unaligned, aligned, inside one block, across a block boundary, empty.
        for (offset, len) in [(1000, 70_000), (131_072, 65_536), (200_001, 3), (4095, 2)] {
            file.write_zeroes(offset as u64, len as u64).unwrap();
            want[offset..offset + len].fill(0);
        }
        file.write_zeroes(10, 0).unwrap();
        assert_eq!(file.len().unwrap(), 300_000, "{c}");
        // A write next to zeroed bytes (a read-modify-write under O_DIRECT) keeps them.
        file.write_at(b"xyz", 1500).unwrap();
        want[1500..1503].copy_from_slice(b"xyz");
        // Across and past the end: the file grows to exactly `offset + len`.
        file.write_zeroes(299_000, 50_001).unwrap();
        want[299_000..].fill(0);
        want.resize(349_001, 0);
        assert_eq!(file.len().unwrap(), 349_001, "{c}");
        file.write_zeroes(400_000, 5_003).unwrap();
        want.resize(405_003, 0);
        assert_eq!(file.len().unwrap(), 405_003, "{c}");
        file.write_zeroes(500_000, 0).unwrap();
        assert_eq!(file.len().unwrap(), 405_003, "{c}");

        let mut got = vec![0xff; want.len()];
        file.read_at(&mut got, 0).unwrap();
        assert!(got == want, "{c}");
        file.flush().unwrap();
        drop(file);
        assert!(std::fs::read(&path).unwrap() == want, "{c}");
    }

    #[test]
    fn write_zeroes_reads_zeros_and_grows_like_a_write() {
        for cache in [CacheMode::Writeback, CacheMode::None, CacheMode::Unsafe] {
            check_write_zeroes(direct_dir().path(), cache);
        }
        // tmpfs has no FALLOC_FL_ZERO_RANGE: the fallback that writes zeros.
        if let Ok(dir) = tempfile::tempdir_in("/dev/shm") {
            check_write_zeroes(dir.path(), CacheMode::Writeback);
        }
    }

    #[test]
    fn zero_fill_fallback_grows_exactly_to_the_end() {
        let dir = direct_dir();
        let path = dir.path().join("img");
        let file = FileStorage::open(&path, &options(CacheMode::None)).unwrap();
        file.write_at(&[5; 10_000], 0).unwrap();
        file.zero_fill(9_000, 9_500).unwrap();
        assert_eq!(file.len().unwrap(), 10_000);
        file.zero_fill(9_800, 12_345).unwrap();
        assert_eq!(file.len().unwrap(), 12_345);
        file.zero_fill(20_001, 20_003).unwrap();
        assert_eq!(file.len().unwrap(), 20_003);
        file.zero_fill(30_000, 30_000).unwrap();
        assert_eq!(file.len().unwrap(), 20_003);
        let mut buf = vec![0xff; 20_003];
        file.read_at(&mut buf, 0).unwrap();
        assert!(buf[..9_000].iter().all(|&b| b == 5));
        assert!(buf[9_000..9_500].iter().all(|&b| b == 0));
        assert!(buf[9_500..9_800].iter().all(|&b| b == 5));
        assert!(buf[9_800..].iter().all(|&b| b == 0));
    }

    #[test]
    fn alignment_is_the_direct_block_only_under_o_direct() {
        for (cache, want) in [
            (CacheMode::Writeback, 1),
            (CacheMode::None, 4096),
            (CacheMode::Unsafe, 1),
        ] {
            let dir = direct_dir();
            let file = FileStorage::open(&dir.path().join("img"), &options(cache)).unwrap();
            assert_eq!(file.alignment(), want, "{cache:?}");
            assert_eq!(Storage::alignment(&Arc::new(file)), want, "{cache:?}");
        }
    }

    #[test]
    fn hole_queries_and_zeroes_near_off_t_max() {
        let dir = tempfile::tempdir().unwrap();
        let file =
            FileStorage::open(&dir.path().join("img"), &options(CacheMode::Writeback)).unwrap();
        file.write_at(b"x", 0).unwrap();
        assert_eq!(file.next_data(i64::MAX as u64).unwrap(), None);
        assert_eq!(file.next_data(u64::MAX).unwrap(), None);
        assert_eq!(file.next_hole(u64::MAX).unwrap(), u64::MAX);
        assert!(file.is_hole(u64::MAX - 1, 10).unwrap());
        for (offset, len) in [(u64::MAX - 1, 3), (i64::MAX as u64 - 10, 5)] {
            let err = file.write_zeroes(offset, len).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
        assert_eq!(file.len().unwrap(), 1);
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
}

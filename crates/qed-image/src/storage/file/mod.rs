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

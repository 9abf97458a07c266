//! Storage on a host file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::lock::{LockMode, QemuLock};
use super::Storage;

/// How the host page cache is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Through the page cache; `flush` is `fdatasync`.
    #[default]
    Writeback,
    /// O_DIRECT: bypass the page cache; `flush` is still `fdatasync`.
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
    _lock: Option<QemuLock>,
}

impl FileStorage {
    /// Opens (or creates) `path`.
    pub fn open(path: &Path, options: &FileOptions) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(options.writable || options.create)
            .create(options.create)
            .truncate(options.create)
            .open(path)?;
        let lock = QemuLock::acquire(&file, options.lock)?;
        Ok(Self {
            file,
            cache: options.cache,
            _lock: lock,
        })
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
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
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        match self.cache {
            CacheMode::Unsafe => Ok(()),
            _ => self.file.sync_data(),
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

//! [`DiskStorage`]: a disk as the storage of another layer — QEMU's format node used as the
//! `file` child of another format node (`driver=qed,file.driver=qed,...`), or under a filter
//! such as blkdebug. Byte N of the storage is guest byte N of the disk.

use std::io;

use crate::zero::ZeroFlags;
use crate::Error;

use super::disk::Disk;

/// A [`Disk`] seen as a [`Storage`](crate::Storage): reads and writes at guest offsets, its
/// length the disk's virtual size, block status from the disk's (through its backing chain:
/// data is data, zero ranges and ranges no layer holds are holes).
///
/// A disk does not grow by being written: a write past the end fails (`EIO`, as QEMU's block
/// layer refuses it), and `set_len` resizes through the engine (QED) or the file (raw).
#[derive(Debug)]
pub struct DiskStorage {
    disk: Disk,
}

impl DiskStorage {
    /// The storage over `disk`.
    pub fn new(disk: Disk) -> Self {
        Self { disk }
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The disk, given back (to be closed).
    pub fn into_disk(self) -> Disk {
        self.disk
    }
}

/// An engine error as the `io::Error` a storage returns: OS errors keep their code.
fn to_io(e: Error) -> io::Error {
    match e {
        Error::Io { source, .. } => source,
        Error::Backing { cause, .. } => to_io(*cause),
        Error::ReadOnly => io::Error::from_raw_os_error(libc::EPERM),
        Error::OutOfRange { .. } => io::Error::from_raw_os_error(libc::EIO),
        Error::Unsupported(_) => io::Error::from_raw_os_error(libc::ENOTSUP),
        other => io::Error::other(other.to_string()),
    }
}

impl crate::Storage for DiskStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Past the end reads as zeros, as the trait says.
        let size = self.disk.size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        self.disk.read_at(head, offset).map_err(to_io)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.disk.write_at(buf, offset).map_err(to_io)
    }

    fn flush(&self) -> io::Result<()> {
        self.disk.flush().map_err(to_io)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.disk.size())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.disk.size() {
            return Ok(());
        }
        self.disk.set_size(len).map_err(to_io)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.disk.write_zeroes(offset, len, true).map_err(to_io)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.disk {
            Disk::Qed(image) => image
                .write_zeroes_with(
                    offset,
                    len,
                    ZeroFlags {
                        may_unmap: false,
                        fast_only: false,
                    },
                )
                .map_err(to_io),
            _ => self.disk.write_zeroes(offset, len, false).map_err(to_io),
        }
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        let size = self.disk.size();
        let mut pos = offset;
        while pos < size {
            let (data, n) = self.block_status(pos, size - pos)?;
            if data {
                return Ok(Some(pos));
            }
            pos += n;
        }
        Ok(None)
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        let size = self.disk.size();
        let mut pos = offset;
        while pos < size {
            let (data, n) = self.block_status(pos, size - pos)?;
            if !data {
                return Ok(pos);
            }
            pos += n;
        }
        Ok(pos.max(offset))
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let size = self.disk.size();
        if offset >= size {
            return Ok((false, len.max(1)));
        }
        match self.disk.block_status_with_holes(offset, len).next() {
            Some(Ok(status)) => Ok((status.kind.is_data(), status.length.max(1))),
            Some(Err(e)) => Err(to_io(e)),
            None => Ok((false, len.max(1))),
        }
    }

    fn alignment(&self) -> u64 {
        match &self.disk {
            Disk::Raw(raw) => raw.storage().alignment(),
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;
    use crate::{CreateParams, Image, OpenOptions, Storage};
    use std::sync::Arc;

    fn params(image_size: u64) -> CreateParams {
        CreateParams {
            image_size,
            cluster_size: 65536,
            table_size: 4,
            backing_file: None,
            backing_raw: false,
        }
    }

    #[test]
    fn an_image_serves_as_the_storage_of_another() {
        // The outer image, made in memory with data in it.
        let outer_file = Arc::new(MemoryStorage::new());
        Image::create_on(&*outer_file, &params(1 << 20)).unwrap();
        let outer = Image::open_storage(
            Box::new(Arc::clone(&outer_file)),
            &OpenOptions::read_write(),
            None,
        )
        .unwrap();
        outer.write_at(&[0x42; 512], 4096).unwrap();
        outer.close().unwrap();
        // The inner image's guest bytes hold the outer image's file.
        let inner_file = MemoryStorage::new();
        Image::create_on(&inner_file, &params(4 << 20)).unwrap();
        let inner =
            Image::open_storage(Box::new(inner_file), &OpenOptions::read_write(), None).unwrap();
        inner.write_at(&outer_file.to_bytes(), 0).unwrap();
        let storage = DiskStorage::new(Disk::Qed(inner));
        assert_eq!(storage.len().unwrap(), 4 << 20);
        let outer =
            Image::open_storage(Box::new(storage), &OpenOptions::read_write(), None).unwrap();
        let mut buf = [0u8; 512];
        outer.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0x42; 512]);
        // In place: the cluster is allocated already.
        outer.write_at(&[0x43; 512], 4608).unwrap();
        outer.read_at(&mut buf, 4608).unwrap();
        assert_eq!(buf, [0x43; 512]);
        outer.close().unwrap();
    }

    #[test]
    fn block_status_and_holes_follow_the_disk() {
        let raw =
            super::super::RawDisk::new(Box::new(MemoryStorage::from_bytes(vec![1; 4096])), true)
                .unwrap();
        let storage = DiskStorage::new(Disk::Raw(raw));
        assert_eq!(storage.block_status(0, 4096).unwrap(), (true, 4096));
        assert_eq!(storage.next_data(0).unwrap(), Some(0));
        assert_eq!(storage.next_hole(0).unwrap(), 4096);
        let mut buf = [7u8; 8];
        storage.read_at(&mut buf, 4092).unwrap();
        assert_eq!(buf, [1, 1, 1, 1, 0, 0, 0, 0]);
        assert!(storage.write_at(&[1], 4096).is_err());
    }
}

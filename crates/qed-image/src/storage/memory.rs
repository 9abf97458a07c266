//! Storage in memory, for tests and scratch images.

use std::io;
use std::sync::RwLock;

use super::Storage;

/// A growable byte vector behind a lock.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the current contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn end_of(offset: u64, len: usize) -> io::Result<usize> {
    offset
        .checked_add(len as u64)
        .and_then(|end| usize::try_from(end).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))
}

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = end_of(offset, buf.len())?;
        let bytes = self.bytes.read().unwrap_or_else(|e| e.into_inner());
        let start = (offset as usize).min(bytes.len());
        let avail = end.min(bytes.len()).saturating_sub(start);
        buf[..avail].copy_from_slice(&bytes[start..start + avail]);
        buf[avail..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = end_of(offset, buf.len())?;
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length out of range"))?;
        self.bytes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len, 0);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        let start = (offset as usize).min(bytes.len());
        let end = (offset.saturating_add(len) as usize).min(bytes.len());
        bytes[start..end].fill(0);
        Ok(())
    }

    /// Zeros the range under one lock, growing the storage to `offset + len` if it is
    /// shorter. (Holes are not tracked: `next_data` and `next_hole` keep the defaults.)
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length out of range"))?;
        let end = end_of(offset, len)?;
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_end_are_zero() {
        let s = MemoryStorage::new();
        s.write_at(b"abc", 2).unwrap();
        assert_eq!(s.len().unwrap(), 5);
        let mut buf = [9u8; 8];
        s.read_at(&mut buf, 1).unwrap();
        assert_eq!(&buf, b"\0abc\0\0\0\0");
        s.punch_hole(3, 100).unwrap();
        s.read_at(&mut buf[..3], 2).unwrap();
        assert_eq!(&buf[..3], b"a\0\0");
    }

    #[test]
    fn write_zeroes_zeros_and_grows_like_a_write() {
        let s = MemoryStorage::from_bytes(vec![7; 10]);
        s.write_zeroes(2, 3).unwrap();
        assert_eq!(s.to_bytes(), [7, 7, 0, 0, 0, 7, 7, 7, 7, 7]);
        s.write_zeroes(8, 4).unwrap();
        assert_eq!(s.to_bytes(), [7, 7, 0, 0, 0, 7, 7, 7, 0, 0, 0, 0]);
        s.write_zeroes(14, 2).unwrap();
        assert_eq!(s.len().unwrap(), 16);
        assert!(s.to_bytes()[8..].iter().all(|&b| b == 0));
        s.write_zeroes(100, 0).unwrap();
        assert_eq!(s.len().unwrap(), 16);
        assert!(s.write_zeroes(u64::MAX, 2).is_err());
        // No hole tracking: punched bytes still count as data.
        s.punch_hole(0, 16).unwrap();
        assert!(!s.is_hole(0, 16).unwrap());
        assert!(s.is_hole(16, 16).unwrap());
    }
}

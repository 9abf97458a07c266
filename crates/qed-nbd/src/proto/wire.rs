//! Big-endian reading and writing: a cursor over bytes the client sent, which fails instead of
//! reading past the end, and an appender for what the server sends.

/// Reads big-endian numbers and byte strings from a slice; every read is bounds-checked.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    bytes: &'a [u8],
}

/// The cursor ran out of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short;

impl<'a> Cursor<'a> {
    /// A cursor at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        if n > self.bytes.len() {
            return Err(Short);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Result<u16, Short> {
        self.array().map(u16::from_be_bytes)
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, Short> {
        self.array().map(u32::from_be_bytes)
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, Short> {
        self.array().map(u64::from_be_bytes)
    }
}

/// Appends big-endian numbers to a buffer.
pub trait PutBe {
    /// Appends a u16.
    fn put_u16(&mut self, v: u16);
    /// Appends a u32.
    fn put_u32(&mut self, v: u32);
    /// Appends a u64.
    fn put_u64(&mut self, v: u64);
}

impl PutBe for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_order_and_stops_at_the_end() {
        let bytes = [0, 1, 0, 0, 0, 2, 9];
        let mut c = Cursor::new(&bytes);
        assert_eq!(c.u16(), Ok(1));
        assert_eq!(c.u32(), Ok(2));
        assert_eq!(c.remaining(), 1);
        assert_eq!(c.u16(), Err(Short));
        assert_eq!(c.take(1), Ok(&[9u8][..]));
        assert_eq!(c.u64(), Err(Short));
    }

    #[test]
    fn writes_big_endian() {
        let mut v = Vec::new();
        v.put_u16(0x0102);
        v.put_u32(0x0304_0506);
        v.put_u64(7);
        assert_eq!(v, [1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 0, 7]);
    }
}

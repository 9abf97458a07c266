//! Deterministic, never-zero data patterns, and a read-only storage full of one (a large raw
//! backing file without the memory).

use std::io;
use std::sync::OnceLock;

use qed_image::storage::Storage;

/// Period of the pattern table: a prime, so patterns never line up with clusters or pages.
const PATTERN_PERIOD: usize = 65_521;

fn pattern_table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        (0..PATTERN_PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Never zero: a zero where pattern data belongs is always a bug.
                (x % 255) as u8 + 1
            })
            .collect()
    })
}

/// Fills `buf` with the (never zero) pattern `seed` as it appears at byte `offset`.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let table = pattern_table();
    let period = PATTERN_PERIOD as u64;
    let mut i = ((offset % period + seed.wrapping_mul(7919) % period) % period) as usize;
    let mut done = 0;
    while done < buf.len() {
        let n = (PATTERN_PERIOD - i).min(buf.len() - done);
        buf[done..done + n].copy_from_slice(&table[i..i + n]);
        done += n;
        i = 0;
    }
}

/// `len` bytes of pattern `seed` as at `offset`.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fill_pattern(seed, offset, &mut buf);
    buf
}

/// A read-only storage of `len` bytes holding pattern `seed` (zeros past its end).
#[derive(Debug)]
pub struct PatternStorage {
    pub seed: u64,
    pub len: u64,
}

impl Storage for PatternStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inside = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        fill_pattern(self.seed, offset, &mut buf[..inside]);
        buf[inside..].fill(0);
        Ok(())
    }

    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"))
    }
}

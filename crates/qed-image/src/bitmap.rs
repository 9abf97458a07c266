//! A growable bitmap of clusters, allocated fallibly and bounded: check and repair use one
//! bit per cluster, up to the highest cluster any table references, never per cluster of
//! the file's length.

use crate::{Error, Result};

/// Largest bitmap a check builds (bytes): 2^31 clusters, 8 TiB of 4 KiB clusters.
pub(crate) const MAX_BITMAP_BYTES: usize = 256 << 20;

#[derive(Debug, Default, Clone)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    /// Grows the bitmap to hold bit `index`.
    fn reserve(&mut self, index: u64) -> Result<()> {
        let words = (index / 64 + 1) as usize;
        if words <= self.words.len() {
            return Ok(());
        }
        let bytes = words.saturating_mul(8);
        if bytes > MAX_BITMAP_BYTES {
            return Err(Error::TooLarge {
                what: "cluster bitmap of the check",
                bytes: bytes as u64,
                limit: MAX_BITMAP_BYTES as u64,
            });
        }
        // Grow geometrically (bounded by the limit) so marking clusters in order is linear.
        let target = words.max(self.words.len() * 2).min(MAX_BITMAP_BYTES / 8);
        self.words
            .try_reserve_exact(target - self.words.len())
            .map_err(|_| Error::TooLarge {
                what: "cluster bitmap of the check",
                bytes: bytes as u64,
                limit: 0,
            })?;
        self.words.resize(target, 0);
        Ok(())
    }

    pub(crate) fn get(&self, index: u64) -> bool {
        self.words
            .get((index / 64) as usize)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    pub(crate) fn set(&mut self, index: u64) -> Result<()> {
        self.reserve(index)?;
        self.words[(index / 64) as usize] |= 1 << (index % 64);
        Ok(())
    }

    pub(crate) fn clear(&mut self, index: u64) {
        if let Some(w) = self.words.get_mut((index / 64) as usize) {
            *w &= !(1 << (index % 64));
        }
    }

    /// One past the highest set bit (0 when empty).
    pub(crate) fn end(&self) -> u64 {
        for (i, w) in self.words.iter().enumerate().rev() {
            if *w != 0 {
                return i as u64 * 64 + 64 - u64::from(w.leading_zeros());
            }
        }
        0
    }

    /// The clear bits in `[from, to)`, lowest first.
    pub(crate) fn clear_bits(&self, from: u64, to: u64) -> impl Iterator<Item = u64> + '_ {
        (from..to).filter(move |&i| !self.get(i))
    }

    /// The set bits in `[from, to)`, highest first.
    pub(crate) fn set_bits_down(&self, from: u64, to: u64) -> impl Iterator<Item = u64> + '_ {
        (from..to.min(self.end()))
            .rev()
            .filter(move |&i| self.get(i))
    }

    /// Number of clear bits in `[from, to)`.
    pub(crate) fn count_clear(&self, from: u64, to: u64) -> u64 {
        if from >= to {
            return 0;
        }
        let inside_end = to.min(self.words.len() as u64 * 64);
        let set = (from..inside_end.max(from))
            .filter(|&i| self.get(i))
            .count() as u64;
        to - from - set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_on_demand_and_counts() {
        let mut b = Bitmap::default();
        assert_eq!(b.end(), 0);
        b.set(3).unwrap();
        b.set(130).unwrap();
        assert!(b.get(3) && b.get(130) && !b.get(4) && !b.get(10_000));
        assert_eq!(b.end(), 131);
        assert_eq!(b.count_clear(0, 200), 198);
        assert_eq!(b.count_clear(3, 131), 126);
        assert_eq!(b.count_clear(4, 130), 126);
        assert_eq!(b.count_clear(0, 1 << 40), (1 << 40) - 2);
        assert_eq!(b.clear_bits(2, 6).collect::<Vec<_>>(), vec![2, 4, 5]);
        assert_eq!(b.set_bits_down(0, 1000).collect::<Vec<_>>(), vec![130, 3]);
        b.clear(130);
        assert_eq!(b.end(), 4);
    }

    #[test]
    fn refuses_a_bitmap_past_its_limit() {
        let mut b = Bitmap::default();
        let too_far = (MAX_BITMAP_BYTES as u64) * 8;
        assert!(matches!(b.set(too_far), Err(Error::TooLarge { .. })));
        assert!(b.words.is_empty());
    }
}

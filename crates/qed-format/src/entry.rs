//! L1 and L2 table entries.

use crate::{FormatError, Geometry};

/// Bytes per table entry.
pub const ENTRY_SIZE: usize = 8;
/// The L2 entry value of a zero cluster.
pub const ZERO_CLUSTER_ENTRY: u64 = 1;

/// A decoded L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L1Entry {
    /// No L2 table: the whole range is unallocated.
    Unallocated,
    /// Host byte offset of an L2 table (aligned; not yet checked against the file).
    Table(u64),
}

impl L1Entry {
    /// Decodes a raw L1 entry. `1` has no meaning in L1 and is refused like any unaligned value.
    pub fn decode(raw: u64, geometry: &Geometry) -> Result<Self, FormatError> {
        match raw {
            0 => Ok(Self::Unallocated),
            off if geometry.is_cluster_aligned(off) => Ok(Self::Table(off)),
            value => Err(FormatError::EntryUnaligned { value }),
        }
    }
}

/// A decoded L2 entry: what backs one guest cluster.
///
/// The engine uses this one type for entries, for the extents of one image and for the
/// extents of a chain; `Data` then names the host offset of the first byte of the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// A data cluster in the image file.
    Data {
        /// Host byte offset (of the cluster when decoded from a table; of the first byte of
        /// the range in an extent).
        host_offset: u64,
    },
    /// A zero cluster: reads zeros and hides the backing file.
    Zero,
    /// Not allocated: reads come from the backing file, or zeros without one.
    Unallocated,
}

impl L2Entry {
    /// Decodes a raw L2 entry.
    pub fn decode(raw: u64, geometry: &Geometry) -> Result<Self, FormatError> {
        match raw {
            0 => Ok(Self::Unallocated),
            ZERO_CLUSTER_ENTRY => Ok(Self::Zero),
            off if geometry.is_cluster_aligned(off) => Ok(Self::Data { host_offset: off }),
            value => Err(FormatError::EntryUnaligned { value }),
        }
    }

    /// The raw value to store on disk.
    pub fn encode(self) -> u64 {
        match self {
            Self::Unallocated => 0,
            Self::Zero => ZERO_CLUSTER_ENTRY,
            Self::Data { host_offset } => host_offset,
        }
    }

    /// Whether the raw value names a data cluster (anything but 0 and 1, valid or not).
    pub fn is_data_value(raw: u64) -> bool {
        raw > ZERO_CLUSTER_ENTRY
    }
}

/// Decodes little-endian table bytes, calling `f(index, raw)` for every entry, where `index`
/// counts from `first`. Trailing bytes that do not make a whole entry are ignored.
pub fn decode_entries(bytes: &[u8], first: usize, mut f: impl FnMut(usize, u64)) {
    for (i, chunk) in bytes.chunks_exact(ENTRY_SIZE).enumerate() {
        let mut raw = [0u8; ENTRY_SIZE];
        raw.copy_from_slice(chunk);
        f(first + i, u64::from_le_bytes(raw));
    }
}

/// Encodes entries into `out` as little-endian bytes; `entry(i)` gives the raw value of the
/// `i`-th entry of `out`. Trailing bytes that do not make a whole entry are left alone.
pub fn encode_entries(out: &mut [u8], mut entry: impl FnMut(usize) -> u64) {
    for (i, chunk) in out.chunks_exact_mut(ENTRY_SIZE).enumerate() {
        chunk.copy_from_slice(&entry(i).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_entries() {
        let g = Geometry::new(4096, 4).unwrap();
        assert_eq!(L2Entry::decode(0, &g), Ok(L2Entry::Unallocated));
        assert_eq!(L2Entry::decode(1, &g), Ok(L2Entry::Zero));
        assert_eq!(
            L2Entry::decode(20480, &g),
            Ok(L2Entry::Data { host_offset: 20480 })
        );
        for bad in [2, 4095, 20481, u64::MAX] {
            assert_eq!(
                L2Entry::decode(bad, &g),
                Err(FormatError::EntryUnaligned { value: bad })
            );
        }
        for e in [
            L2Entry::Unallocated,
            L2Entry::Zero,
            L2Entry::Data { host_offset: 8192 },
        ] {
            assert_eq!(L2Entry::decode(e.encode(), &g), Ok(e));
        }
    }

    #[test]
    fn table_codec_round_trips() {
        let values = [0u64, 1, 4096, u64::MAX, 0x0102_0304_0506_0708];
        let mut bytes = vec![0u8; values.len() * ENTRY_SIZE + 3];
        encode_entries(&mut bytes, |i| values[i]);
        assert_eq!(&bytes[32..40], &0x0102_0304_0506_0708u64.to_le_bytes());
        let mut seen = Vec::new();
        decode_entries(&bytes, 10, |i, raw| seen.push((i, raw)));
        let expected: Vec<_> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| (10 + i, v))
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn l1_entries() {
        let g = Geometry::new(65536, 4).unwrap();
        assert_eq!(L1Entry::decode(0, &g), Ok(L1Entry::Unallocated));
        assert_eq!(L1Entry::decode(65536, &g), Ok(L1Entry::Table(65536)));
        assert_eq!(
            L1Entry::decode(1, &g),
            Err(FormatError::EntryUnaligned { value: 1 })
        );
        assert_eq!(
            L1Entry::decode(4096, &g),
            Err(FormatError::EntryUnaligned { value: 4096 })
        );
    }
}

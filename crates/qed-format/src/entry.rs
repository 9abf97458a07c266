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

/// A decoded L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated: reads come from the backing file, or zeros without one.
    Unallocated,
    /// A zero cluster: reads zeros and hides the backing file.
    Zero,
    /// Host byte offset of a data cluster (aligned; not yet checked against the file).
    Data(u64),
}

impl L2Entry {
    /// Decodes a raw L2 entry.
    pub fn decode(raw: u64, geometry: &Geometry) -> Result<Self, FormatError> {
        match raw {
            0 => Ok(Self::Unallocated),
            ZERO_CLUSTER_ENTRY => Ok(Self::Zero),
            off if geometry.is_cluster_aligned(off) => Ok(Self::Data(off)),
            value => Err(FormatError::EntryUnaligned { value }),
        }
    }

    /// The raw value to store on disk.
    pub fn encode(self) -> u64 {
        match self {
            Self::Unallocated => 0,
            Self::Zero => ZERO_CLUSTER_ENTRY,
            Self::Data(off) => off,
        }
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
        assert_eq!(L2Entry::decode(20480, &g), Ok(L2Entry::Data(20480)));
        for bad in [2, 4095, 20481, u64::MAX] {
            assert_eq!(
                L2Entry::decode(bad, &g),
                Err(FormatError::EntryUnaligned { value: bad })
            );
        }
        for e in [L2Entry::Unallocated, L2Entry::Zero, L2Entry::Data(8192)] {
            assert_eq!(L2Entry::decode(e.encode(), &g), Ok(e));
        }
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

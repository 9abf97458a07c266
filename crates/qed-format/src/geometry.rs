//! Cluster and table geometry: the address arithmetic of an image.

use crate::FormatError;

/// Smallest valid cluster size.
pub const MIN_CLUSTER_SIZE: u32 = 4096;
/// Largest valid cluster size (64 MiB).
pub const MAX_CLUSTER_SIZE: u32 = 64 * 1024 * 1024;
/// Cluster size `qemu-img create` uses by default.
pub const DEFAULT_CLUSTER_SIZE: u32 = 65536;
/// Smallest valid table size (clusters per table).
pub const MIN_TABLE_SIZE: u32 = 1;
/// Largest valid table size (clusters per table).
pub const MAX_TABLE_SIZE: u32 = 16;
/// Table size `qemu-img create` uses by default.
pub const DEFAULT_TABLE_SIZE: u32 = 4;

/// A validated cluster size and table size, with the derived shifts and masks.
///
/// Guest offsets split into an L1 index, an L2 index and an offset inside the cluster.
/// Only valid geometries can be constructed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    cluster_size: u32,
    table_size: u32,
    cluster_bits: u32,
    table_bits: u32,
}

impl Geometry {
    /// Validates `cluster_size` and `table_size`.
    pub fn new(cluster_size: u32, table_size: u32) -> Result<Self, FormatError> {
        if !cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size)
        {
            return Err(FormatError::ClusterSize {
                value: cluster_size,
            });
        }
        if !table_size.is_power_of_two() || !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&table_size)
        {
            return Err(FormatError::TableSize { value: table_size });
        }
        let cluster_bits = cluster_size.trailing_zeros();
        // Entries per table: cluster_size * table_size / 8.
        let table_bits = cluster_bits + table_size.trailing_zeros() - 3;
        Ok(Self {
            cluster_size,
            table_size,
            cluster_bits,
            table_bits,
        })
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        u64::from(self.cluster_size)
    }

    /// Clusters per table.
    pub fn table_size(&self) -> u32 {
        self.table_size
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// Entries in one L1 or L2 table.
    pub fn entries_per_table(&self) -> usize {
        1usize << self.table_bits
    }

    /// Bytes of one L1 or L2 table.
    pub fn table_bytes(&self) -> u64 {
        self.cluster_size() * u64::from(self.table_size)
    }

    /// Guest bytes mapped by one L2 table.
    pub fn l2_coverage(&self) -> u64 {
        1u64 << (self.cluster_bits + self.table_bits)
    }

    /// The largest image size this geometry addresses: `entries² × cluster_size`.
    ///
    /// Computed exactly (QEMU wraps this in 64 bits and then accepts only empty disks).
    pub fn max_image_size(&self) -> u128 {
        1u128 << (2 * self.table_bits + self.cluster_bits)
    }

    /// Whether QEMU 10 can open an image of this geometry and `image_size`: its table-offset
    /// test refuses `table_size == 1`, and its maximum size wraps to 0 in 64-bit arithmetic.
    pub fn qemu_compatible(&self, image_size: u64) -> bool {
        let bits = 2 * self.table_bits + self.cluster_bits;
        let qemu_max: u64 = if bits >= 64 { 0 } else { 1u64 << bits };
        self.table_size >= 2 && image_size <= qemu_max
    }

    /// Index into the L1 table of a guest offset.
    pub fn l1_index(&self, guest_offset: u64) -> usize {
        // Shift is at most 26 + 26 - 3 + 4 = 53 bits; image sizes are bounded by validation.
        (guest_offset >> (self.cluster_bits + self.table_bits)) as usize
    }

    /// Index into an L2 table of a guest offset.
    pub fn l2_index(&self, guest_offset: u64) -> usize {
        ((guest_offset >> self.cluster_bits) as usize) & (self.entries_per_table() - 1)
    }

    /// Byte offset of `offset` inside its cluster.
    pub fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// Whether `offset` is a multiple of the cluster size.
    pub fn is_cluster_aligned(&self, offset: u64) -> bool {
        self.offset_in_cluster(offset) == 0
    }

    /// Cluster index containing byte `offset`.
    pub fn cluster_index(&self, offset: u64) -> u64 {
        offset >> self.cluster_bits
    }

    /// Rounds `offset` down to a cluster boundary.
    pub fn align_down(&self, offset: u64) -> u64 {
        offset & !(self.cluster_size() - 1)
    }

    /// Rounds `offset` up to a cluster boundary (saturating at the largest aligned u64).
    pub fn align_up(&self, offset: u64) -> u64 {
        self.align_down(offset.saturating_add(self.cluster_size() - 1))
    }

    /// Number of clusters needed to hold `bytes` (exact division, rounding up).
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// End of the allocated area of a file `file_len` bytes long: the length rounded up to a
    /// sector (as QEMU's block layer reports a file cut short by a few bytes; the bytes past
    /// the end read as zeros), then down to a whole cluster.
    pub fn allocated_end(&self, file_len: u64) -> u64 {
        let sector = crate::SECTOR_SIZE;
        let rounded = file_len
            .checked_next_multiple_of(sector)
            .unwrap_or(!(sector - 1));
        self.align_down(rounded)
    }

    /// Guest offset of the first byte mapped by L1 entry `l1_index`.
    pub fn l1_guest_offset(&self, l1_index: usize) -> u64 {
        (l1_index as u64) << (self.cluster_bits + self.table_bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocated_end_rounds_up_to_a_sector_then_down_to_a_cluster() {
        let g = Geometry::new(65536, 4).unwrap();
        assert_eq!(g.allocated_end(0), 0);
        assert_eq!(g.allocated_end(5 * 65536), 5 * 65536);
        // Cut by one byte: QEMU sees the sector, so the last cluster is still whole.
        assert_eq!(g.allocated_end(5 * 65536 - 1), 5 * 65536);
        assert_eq!(g.allocated_end(5 * 65536 - 512), 4 * 65536);
        assert_eq!(g.allocated_end(5 * 65536 - 513), 4 * 65536);
        assert_eq!(g.allocated_end(u64::MAX), !65535u64);
    }

    #[test]
    fn cluster_size_rule() {
        assert!(Geometry::new(4096, 4).is_ok());
        assert!(Geometry::new(64 << 20, 4).is_ok());
        for bad in [0, 2048, 12288, 128 << 20, u32::MAX] {
            assert_eq!(
                Geometry::new(bad, 4),
                Err(FormatError::ClusterSize { value: bad })
            );
        }
    }

    #[test]
    fn table_size_rule() {
        for good in [1, 2, 4, 8, 16] {
            assert!(Geometry::new(65536, good).is_ok());
        }
        for bad in [0, 3, 32, u32::MAX] {
            assert_eq!(
                Geometry::new(65536, bad),
                Err(FormatError::TableSize { value: bad })
            );
        }
    }

    #[test]
    fn max_size_is_exact() {
        assert_eq!(Geometry::new(4096, 1).unwrap().max_image_size(), 1 << 30);
        assert_eq!(
            Geometry::new(65536, 4).unwrap().max_image_size(),
            70_368_744_177_664
        );
        // QEMU wraps these to zero; the exact value is 2^64 and beyond.
        assert_eq!(
            Geometry::new(4 << 20, 4).unwrap().max_image_size(),
            1u128 << 64
        );
        assert_eq!(
            Geometry::new(64 << 20, 16).unwrap().max_image_size(),
            1u128 << 80
        );
        assert!(!Geometry::new(4 << 20, 4).unwrap().qemu_compatible(1 << 30));
        assert!(!Geometry::new(4096, 1).unwrap().qemu_compatible(0));
        assert!(Geometry::new(65536, 4).unwrap().qemu_compatible(1 << 30));
    }

    #[test]
    fn address_split() {
        let g = Geometry::new(65536, 4).unwrap();
        assert_eq!(g.entries_per_table(), 32768);
        assert_eq!(g.l2_coverage(), 2 << 30);
        let pos = (3u64 << 31) + 5 * 65536 + 17;
        assert_eq!(g.l1_index(pos), 3);
        assert_eq!(g.l2_index(pos), 5);
        assert_eq!(g.offset_in_cluster(pos), 17);
        let g = Geometry::new(4096, 2).unwrap();
        assert_eq!(g.entries_per_table(), 1024);
        assert_eq!(g.l2_coverage(), 4 << 20);
    }
}

//! The 64-byte QED header: decode, encode and validation.

use crate::{FormatError, Geometry, L2Entry};

/// The magic at offset 0: the bytes `Q E D \0`.
pub const MAGIC: u32 = 0x0044_4551;
/// Length of the header structure in bytes.
pub const HEADER_LEN: usize = 64;
/// The unit of image sizes and of table write-back.
pub const SECTOR_SIZE: u64 = 512;
/// Incompatible feature: a backing file name is stored.
pub const FEATURE_BACKING_FILE: u64 = 0x1;
/// Incompatible feature: the image may be inconsistent and must be checked before use.
pub const FEATURE_NEED_CHECK: u64 = 0x2;
/// Incompatible feature: the backing file is raw; do not probe its format.
pub const FEATURE_BACKING_FORMAT_NO_PROBE: u64 = 0x4;
/// Every incompatible feature bit this implementation understands.
pub const KNOWN_FEATURES: u64 =
    FEATURE_BACKING_FILE | FEATURE_NEED_CHECK | FEATURE_BACKING_FORMAT_NO_PROBE;
/// Longest backing file name accepted when opening (bounds the memory an image can demand).
pub const MAX_BACKING_NAME_LEN: u64 = 64 * 1024;

/// The header fields exactly as stored, not yet validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// Clusters per L1/L2 table.
    pub table_size: u32,
    /// Clusters reserved for the header area.
    pub header_size: u32,
    /// Incompatible feature bits.
    pub features: u64,
    /// Compatible feature bits (unknown ones are ignored).
    pub compat_features: u64,
    /// Feature bits a program that does not know them must clear on a writable open.
    pub autoclear_features: u64,
    /// Byte offset of the L1 table.
    pub l1_table_offset: u64,
    /// Virtual disk size in bytes.
    pub image_size: u64,
    /// Byte offset of the backing file name, from the start of the file.
    pub backing_filename_offset: u32,
    /// Length of the backing file name in bytes (no NUL terminator).
    pub backing_filename_size: u32,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

impl Header {
    /// Decodes the first 64 bytes of `bytes`; checks only the length and the magic.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::HeaderTruncated { len: bytes.len() });
        }
        let magic = u32_at(bytes, 0);
        if magic != MAGIC {
            return Err(FormatError::BadMagic { value: magic });
        }
        Ok(Self {
            cluster_size: u32_at(bytes, 4),
            table_size: u32_at(bytes, 8),
            header_size: u32_at(bytes, 12),
            features: u64_at(bytes, 16),
            compat_features: u64_at(bytes, 24),
            autoclear_features: u64_at(bytes, 32),
            l1_table_offset: u64_at(bytes, 40),
            image_size: u64_at(bytes, 48),
            backing_filename_offset: u32_at(bytes, 56),
            backing_filename_size: u32_at(bytes, 60),
        })
    }

    /// Encodes the 64 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        out[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        out[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        out[16..24].copy_from_slice(&self.features.to_le_bytes());
        out[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        out[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        out[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        out[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        out[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        out[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        out
    }

    /// Whether the NEED_CHECK bit is set.
    pub fn needs_check(&self) -> bool {
        self.features & FEATURE_NEED_CHECK != 0
    }

    /// Whether a backing file is named (BACKING_FILE set and a non-empty name).
    pub fn has_backing_file(&self) -> bool {
        self.features & FEATURE_BACKING_FILE != 0 && self.backing_filename_size != 0
    }

    /// Whether the backing file is declared raw (no format probing).
    pub fn backing_is_raw(&self) -> bool {
        self.has_backing_file() && self.features & FEATURE_BACKING_FORMAT_NO_PROBE != 0
    }

    /// Checks every rule of the format against a file of `file_len` bytes.
    ///
    /// The order follows QEMU's open so that the first error reported is the same kind.
    pub fn validate(&self, file_len: u64) -> Result<ValidHeader, FormatError> {
        let unknown = self.features & !KNOWN_FEATURES;
        if unknown != 0 {
            return Err(FormatError::UnknownFeatures { bits: unknown });
        }
        let geometry = Geometry::new(self.cluster_size, self.table_size)?;
        if self.image_size % SECTOR_SIZE != 0 {
            return Err(FormatError::ImageSizeUnaligned {
                value: self.image_size,
            });
        }
        let max = geometry.max_image_size();
        if u128::from(self.image_size) > max {
            return Err(FormatError::ImageSizeTooLarge {
                value: self.image_size,
                max,
            });
        }
        if self.header_size == 0 {
            return Err(FormatError::HeaderSizeZero);
        }
        let header_bytes = u64::from(self.header_size) * geometry.cluster_size();
        if header_bytes > u64::from(u32::MAX) {
            return Err(FormatError::HeaderSizeTooLarge {
                value: self.header_size,
                cluster_size: self.cluster_size,
            });
        }
        let usable_len = geometry.allocated_end(file_len);
        check_table_offset(
            &geometry,
            header_bytes,
            usable_len,
            "L1",
            self.l1_table_offset,
        )?;
        if self.has_backing_file() {
            let end =
                u64::from(self.backing_filename_offset) + u64::from(self.backing_filename_size);
            if end > header_bytes {
                return Err(FormatError::BackingNameOutsideHeader {
                    offset: self.backing_filename_offset,
                    size: self.backing_filename_size,
                    header_bytes,
                });
            }
            if u64::from(self.backing_filename_size) > MAX_BACKING_NAME_LEN {
                return Err(FormatError::BackingNameTooLong {
                    size: u64::from(self.backing_filename_size),
                    max: MAX_BACKING_NAME_LEN,
                });
            }
        }
        Ok(ValidHeader {
            header: *self,
            geometry,
            header_bytes,
        })
    }
}

/// Checks that a table at `offset` is cluster aligned, outside the header area and wholly
/// inside the first `usable_len` bytes of the file.
pub(crate) fn check_table_offset(
    geometry: &Geometry,
    header_bytes: u64,
    usable_len: u64,
    table: &'static str,
    offset: u64,
) -> Result<(), FormatError> {
    let reason = if !geometry.is_cluster_aligned(offset) {
        "not aligned to the cluster size"
    } else if offset < header_bytes {
        "inside the header area"
    } else if offset
        .checked_add(geometry.table_bytes())
        .is_none_or(|end| end > usable_len)
    {
        "table extends past the end of the file"
    } else {
        return Ok(());
    };
    Err(FormatError::TableOffset {
        table,
        value: offset,
        reason,
    })
}

/// A header that passed [`Header::validate`], with its geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidHeader {
    header: Header,
    geometry: Geometry,
    header_bytes: u64,
}

impl ValidHeader {
    /// The raw fields.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The validated geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Bytes reserved for the header area (`header_size × cluster_size`).
    pub fn header_bytes(&self) -> u64 {
        self.header_bytes
    }

    /// The backing file name from the bytes stored at [`ValidHeader::backing_name_range`]:
    /// they end at the first NUL, as QEMU reads them (a stored size may cover NUL padding).
    /// `None` when nothing is left.
    pub fn backing_name<'a>(&self, stored: &'a [u8]) -> Option<&'a [u8]> {
        let end = stored.iter().position(|&b| b == 0).unwrap_or(stored.len());
        (end > 0).then_some(&stored[..end])
    }

    /// The file range holding the backing file name, if one is named.
    pub fn backing_name_range(&self) -> Option<(u64, usize)> {
        self.header.has_backing_file().then(|| {
            (
                u64::from(self.header.backing_filename_offset),
                self.header.backing_filename_size as usize,
            )
        })
    }

    /// Checks an L2 table offset read from the L1 table against a file of `usable_len` bytes
    /// (already rounded down to whole clusters).
    pub fn check_l2_offset(&self, usable_len: u64, offset: u64) -> Result<(), FormatError> {
        check_table_offset(&self.geometry, self.header_bytes, usable_len, "L2", offset)
    }

    /// Decodes an L2 entry and checks a data offset against a file whose allocated area ends
    /// at `usable_len`: the one place an L2 entry from disk becomes trusted.
    pub fn decode_l2(&self, usable_len: u64, raw: u64) -> Result<L2Entry, FormatError> {
        match L2Entry::decode(raw, &self.geometry)? {
            L2Entry::Data { host_offset }
                if !self.is_valid_data_offset(usable_len, host_offset) =>
            {
                Err(FormatError::EntryOutsideFile { value: raw })
            }
            entry => Ok(entry),
        }
    }

    /// Whether a data cluster at `offset` is aligned, outside the header and wholly inside the
    /// first `usable_len` bytes of the file.
    pub fn is_valid_data_offset(&self, usable_len: u64, offset: u64) -> bool {
        self.geometry.is_cluster_aligned(offset)
            && offset >= self.header_bytes
            && offset
                .checked_add(self.geometry.cluster_size())
                .is_some_and(|end| end <= usable_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_header() -> Header {
        Header {
            cluster_size: 65536,
            table_size: 4,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: 65536,
            image_size: 1 << 30,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }

    const LEN: u64 = 5 * 65536;

    #[test]
    fn qemu_header_bytes_round_trip() {
        // `qemu-img create -f qed t.qed 1G`, first 64 bytes.
        let bytes: [u8; 64] = [
            0x51, 0x45, 0x44, 0x00, 0x00, 0x00, 0x01, 0x00, 0x04, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0, 0, 0, 0,
            0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let h = Header::decode(&bytes).unwrap();
        assert_eq!(h, default_header());
        assert_eq!(h.encode(), bytes);
        assert!(h.validate(LEN).is_ok());
    }

    #[test]
    fn truncated_header() {
        assert_eq!(
            Header::decode(&[0x51, 0x45, 0x44, 0]),
            Err(FormatError::HeaderTruncated { len: 4 })
        );
    }

    #[test]
    fn magic_rule() {
        let mut b = default_header().encode();
        assert!(Header::decode(&b).is_ok());
        b[3] = b'X';
        assert!(matches!(
            Header::decode(&b),
            Err(FormatError::BadMagic { .. })
        ));
    }

    #[test]
    fn unknown_features_are_named() {
        let mut h = default_header();
        h.features = FEATURE_NEED_CHECK | FEATURE_BACKING_FORMAT_NO_PROBE;
        assert!(h.validate(LEN).is_ok());
        h.features = 0x8 | 0x2 | 0x100;
        assert_eq!(
            h.validate(LEN),
            Err(FormatError::UnknownFeatures { bits: 0x108 })
        );
    }

    #[test]
    fn unknown_compat_and_autoclear_bits_are_accepted() {
        let mut h = default_header();
        h.compat_features = 0x1;
        h.autoclear_features = 0x10;
        assert!(h.validate(LEN).is_ok());
    }

    #[test]
    fn cluster_and_table_size_rules() {
        let mut h = default_header();
        h.cluster_size = 2048;
        assert_eq!(
            h.validate(LEN),
            Err(FormatError::ClusterSize { value: 2048 })
        );
        let mut h = default_header();
        h.table_size = 3;
        assert_eq!(h.validate(LEN), Err(FormatError::TableSize { value: 3 }));
    }

    #[test]
    fn image_size_multiple_of_512() {
        let mut h = default_header();
        h.image_size = 1024;
        assert!(h.validate(LEN).is_ok());
        h.image_size = 1000;
        assert_eq!(
            h.validate(LEN),
            Err(FormatError::ImageSizeUnaligned { value: 1000 })
        );
    }

    #[test]
    fn image_size_maximum_is_exact() {
        let mut h = default_header();
        h.image_size = 70_368_744_177_664;
        assert!(h.validate(LEN).is_ok());
        h.image_size += 512;
        assert!(matches!(
            h.validate(LEN),
            Err(FormatError::ImageSizeTooLarge { .. })
        ));
        // A geometry whose maximum QEMU wraps to 0 still accepts real sizes.
        let h = Header {
            cluster_size: 4 << 20,
            l1_table_offset: 4 << 20,
            image_size: 1 << 40,
            ..default_header()
        };
        assert!(h.validate(5 * (4 << 20)).is_ok());
        // A huge size with all bits set cannot wrap either.
        let h = Header {
            image_size: !511u64,
            ..default_header()
        };
        assert!(matches!(
            h.validate(LEN),
            Err(FormatError::ImageSizeTooLarge { .. })
        ));
    }

    #[test]
    fn header_size_rules() {
        let mut h = default_header();
        h.header_size = 0;
        assert_eq!(h.validate(LEN), Err(FormatError::HeaderSizeZero));
        h.header_size = 0x1_0000;
        assert!(matches!(
            h.validate(LEN),
            Err(FormatError::HeaderSizeTooLarge { .. })
        ));
        // header_size 2 with L1 still in cluster 1: the L1 lies inside the header.
        h.header_size = 2;
        assert!(matches!(
            h.validate(LEN),
            Err(FormatError::TableOffset {
                reason: "inside the header area",
                ..
            })
        ));
        h.l1_table_offset = 2 * 65536;
        assert!(h.validate(6 * 65536).is_ok());
    }

    #[test]
    fn l1_offset_rules() {
        for (off, len) in [
            (65536 + 1, LEN),
            (0, LEN),
            (!0xffffu64, LEN),
            (65536, LEN - 512),
            (65536, 512),
        ] {
            let h = Header {
                l1_table_offset: off,
                ..default_header()
            };
            assert!(
                matches!(
                    h.validate(len),
                    Err(FormatError::TableOffset { table: "L1", .. })
                ),
                "offset {off} len {len}"
            );
        }
        // A file cut by less than a sector still holds its last cluster (QEMU rounds up).
        assert!(default_header().validate(LEN - 1).is_ok());
        // table_size 1 is valid (QEMU refuses it by mistake).
        let h = Header {
            cluster_size: 4096,
            table_size: 1,
            l1_table_offset: 4096,
            image_size: 1 << 20,
            ..default_header()
        };
        assert!(h.validate(8192).is_ok());
    }

    #[test]
    fn backing_name_inside_header_area() {
        let mut h = default_header();
        h.features = FEATURE_BACKING_FILE;
        h.backing_filename_offset = 64;
        h.backing_filename_size = 65536 - 64;
        let v = h.validate(LEN).unwrap();
        assert_eq!(v.backing_name_range(), Some((64, 65536 - 64)));
        h.backing_filename_size = 65536 - 63;
        assert!(matches!(
            h.validate(LEN),
            Err(FormatError::BackingNameOutsideHeader { .. })
        ));
        h.backing_filename_offset = u32::MAX;
        h.backing_filename_size = u32::MAX;
        assert!(matches!(
            h.validate(LEN),
            Err(FormatError::BackingNameOutsideHeader { .. })
        ));
        // Size 0 with BACKING_FILE set means no backing file.
        h.backing_filename_size = 0;
        assert_eq!(h.validate(LEN).unwrap().backing_name_range(), None);
    }

    #[test]
    fn backing_name_ends_at_the_first_nul() {
        let h = Header {
            features: FEATURE_BACKING_FILE,
            backing_filename_offset: 64,
            backing_filename_size: 16,
            ..default_header()
        };
        let v = h.validate(LEN).unwrap();
        assert_eq!(
            v.backing_name(b"base.qed\0\0\0\0\0\0\0\0"),
            Some(&b"base.qed"[..])
        );
        assert_eq!(v.backing_name(b"\xffname"), Some(&b"\xffname"[..]));
        assert_eq!(v.backing_name(b"\0rest"), None);
        assert_eq!(v.backing_name(b""), None);
    }

    #[test]
    fn l2_entries_are_checked_against_the_allocated_end() {
        let v = default_header().validate(LEN).unwrap();
        let cs = 65536;
        assert_eq!(v.decode_l2(10 * cs, 0), Ok(L2Entry::Unallocated));
        assert_eq!(v.decode_l2(10 * cs, 1), Ok(L2Entry::Zero));
        assert_eq!(
            v.decode_l2(10 * cs, 9 * cs),
            Ok(L2Entry::Data {
                host_offset: 9 * cs
            })
        );
        for outside in [10 * cs, !(cs - 1)] {
            assert_eq!(
                v.decode_l2(10 * cs, outside),
                Err(FormatError::EntryOutsideFile { value: outside })
            );
        }
        assert_eq!(
            v.decode_l2(10 * cs, cs + 1),
            Err(FormatError::EntryUnaligned { value: cs + 1 })
        );
    }

    #[test]
    fn backing_name_length_is_bounded() {
        let h = Header {
            cluster_size: 1 << 20,
            l1_table_offset: 1 << 20,
            features: FEATURE_BACKING_FILE,
            backing_filename_offset: 64,
            backing_filename_size: (MAX_BACKING_NAME_LEN + 1) as u32,
            ..default_header()
        };
        assert!(matches!(
            h.validate(5 << 20),
            Err(FormatError::BackingNameTooLong { .. })
        ));
    }

    #[test]
    fn data_offset_validity() {
        let v = default_header().validate(LEN).unwrap();
        let usable = 10 * 65536;
        assert!(v.is_valid_data_offset(usable, 5 * 65536));
        assert!(v.is_valid_data_offset(usable, 9 * 65536));
        assert!(!v.is_valid_data_offset(usable, 10 * 65536));
        assert!(!v.is_valid_data_offset(usable, 0));
        assert!(!v.is_valid_data_offset(usable, 5 * 65536 + 512));
        assert!(!v.is_valid_data_offset(usable, !0xffffu64));
        assert!(v.check_l2_offset(usable, 6 * 65536).is_ok());
        assert!(v.check_l2_offset(usable, 7 * 65536).is_err());
    }
}

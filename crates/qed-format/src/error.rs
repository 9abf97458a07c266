//! Errors found while decoding or validating on-disk structures.

/// A violation of the QED format found in untrusted bytes or in requested parameters.
///
/// Every variant names the field and carries the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Fewer than 64 bytes were available for the header.
    #[error("header is truncated: {len} bytes, need 64")]
    HeaderTruncated {
        /// Bytes available.
        len: usize,
    },
    /// The magic is not `QED\0`.
    #[error("image not in QED format (magic {value:#010x})")]
    BadMagic {
        /// The magic found.
        value: u32,
    },
    /// Incompatible feature bits this implementation does not know.
    #[error("unsupported QED features: {bits:#x}")]
    UnknownFeatures {
        /// Only the unknown bits.
        bits: u64,
    },
    /// cluster_size is not a power of two in [4096, 64 MiB].
    #[error("cluster_size {value} is invalid: must be a power of two in [4096, 67108864]")]
    ClusterSize {
        /// The cluster size found.
        value: u32,
    },
    /// table_size is not a power of two in [1, 16].
    #[error("table_size {value} is invalid: must be a power of two in [1, 16]")]
    TableSize {
        /// The table size found.
        value: u32,
    },
    /// image_size is not a multiple of 512.
    #[error("image_size {value} is invalid: not a multiple of 512")]
    ImageSizeUnaligned {
        /// The image size found.
        value: u64,
    },
    /// image_size exceeds what the geometry can address.
    #[error("image_size {value} is invalid: larger than the maximum {max} for this geometry")]
    ImageSizeTooLarge {
        /// The image size found.
        value: u64,
        /// The largest size the geometry addresses.
        max: u128,
    },
    /// header_size is zero.
    #[error("header_size 0 is invalid: the header needs at least one cluster")]
    HeaderSizeZero,
    /// header_size × cluster_size does not fit the 32-bit offsets of the header.
    #[error("header_size {value} is too large for cluster_size {cluster_size}")]
    HeaderSizeTooLarge {
        /// The header size found (clusters).
        value: u32,
        /// The cluster size.
        cluster_size: u32,
    },
    /// A table offset is unaligned, inside the header, or the table does not fit in the file.
    #[error("{table} table offset {value:#x} is invalid: {reason}")]
    TableOffset {
        /// Which table ("L1" or "L2").
        table: &'static str,
        /// The offset found.
        value: u64,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The backing file name does not lie inside the header area.
    #[error(
        "backing file name at offset {offset} with size {size} lies outside the header area of {header_bytes} bytes"
    )]
    BackingNameOutsideHeader {
        /// backing_filename_offset.
        offset: u32,
        /// backing_filename_size.
        size: u32,
        /// header_size × cluster_size.
        header_bytes: u64,
    },
    /// The backing file name is longer than this implementation accepts.
    #[error("backing file name of {size} bytes exceeds the limit of {max} bytes")]
    BackingNameTooLong {
        /// backing_filename_size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A table entry holds a value that is neither 0, 1 nor a cluster-aligned offset.
    #[error("table entry value {value:#x} is neither 0, 1 nor aligned to the cluster size")]
    EntryUnaligned {
        /// The raw entry.
        value: u64,
    },
    /// A data entry points into the header or past the allocated area of the file.
    #[error("table entry value {value:#x} points outside the file or into the header")]
    EntryOutsideFile {
        /// The raw entry.
        value: u64,
    },
}

//! The QED (QEMU Enhanced Disk) on-disk format, with no I/O.
//!
//! Untrusted bytes become validated types here, once: a [`Header`] is decoded from the first
//! 64 bytes of a file and [`Header::validate`] turns it into a [`Geometry`] that cannot
//! represent an invalid cluster size, table size or image size. Table entries decode into
//! [`L2Entry`] / [`L1Entry`] values.
//!
//! The rules follow the QED specification; where QEMU's driver deviates (its table-offset test
//! refuses `table_size == 1`, its maximum image size wraps in 64 bits) the specification wins.

mod entry;
mod error;
mod geometry;
mod header;
mod layout;

pub use entry::{decode_entries, encode_entries, L1Entry, L2Entry, ENTRY_SIZE, ZERO_CLUSTER_ENTRY};
pub use error::FormatError;
pub use geometry::{
    Geometry, DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE, MAX_CLUSTER_SIZE, MAX_TABLE_SIZE,
    MIN_CLUSTER_SIZE, MIN_TABLE_SIZE,
};
pub use header::{
    Header, ValidHeader, FEATURE_BACKING_FILE, FEATURE_BACKING_FORMAT_NO_PROBE, FEATURE_NEED_CHECK,
    HEADER_LEN, KNOWN_FEATURES, MAGIC, MAX_BACKING_NAME_LEN, SECTOR_SIZE,
};
pub use layout::{new_image_layout, CreateParams, QEMU_MAX_BACKING_NAME_LEN};

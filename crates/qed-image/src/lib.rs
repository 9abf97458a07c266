//! The QED (QEMU Enhanced Disk) image engine.
//!
//! [`Image`] is `Send + Sync` and every I/O method takes `&self`, so many threads can share
//! one open image. Allocating writes to different clusters run in parallel; metadata is kept
//! in memory and written back at [`Image::flush`] (and after an idle period, and at close)
//! in an order that never lets a table point at data that is not durable.
//!
//! ```no_run
//! use qed_image::{CreateParams, Image, OpenOptions};
//! # fn main() -> qed_image::Result<()> {
//! let path = std::path::Path::new("disk.qed");
//! Image::create(path, &CreateParams {
//!     image_size: 1 << 30,
//!     cluster_size: 65536,
//!     table_size: 4,
//!     backing_file: None,
//!     backing_raw: false,
//! })?;
//! let image = Image::open(path, &OpenOptions::read_write())?;
//! image.write_at(b"hello", 4096)?;
//! image.flush()?;
//! image.close()?;
//! # Ok(())
//! # }
//! ```
//!
//! # Cargo features
//!
//! * `test-utils` (off by default): the test storages `storage::CrashStorage`, which records
//!   every change and rebuilds the disk as a power loss at any point could leave it, and
//!   `storage::FaultStorage`, which fails chosen storage calls, with their helper types. They
//!   are for tests and are not part of the release API.

mod alloc;
mod backing;
mod bitmap;
mod check;
mod error;
mod extent;
mod gate;
mod idle;
mod image;
mod lookup;
pub mod ops;
mod options;
mod read;
mod shape;
mod state;
pub mod storage;
mod stripe;
mod table;
mod tables;
mod write;
mod writeback;
mod zero;

pub use backing::{BackingFormat, BackingLayer, BackingPolicy};
pub use check::{CheckReport, Repair, MAX_FINDINGS};
pub use error::{Error, Result, TableKind};
pub use extent::{
    ChainExtent, ChainExtents, ChainKind, Extent, ExtentKind, Extents, HoleAwareExtents,
};
pub use image::{
    has_qed_magic, probe_format, resolve_backing_name, resolve_backing_path, Image, MAX_CHAIN_DEPTH,
};
pub use options::{BackingNames, ImageInfo, OpenBackingByName, OpenOptions};
pub use qed_format::{self as format, CreateParams, Geometry, Header, L2Entry};
pub use shape::NewBacking;
pub use storage::{CacheMode, Storage};
pub use tables::CacheStats;
pub use zero::ZeroFlags;

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn image_is_send_and_sync() {
        assert_send_sync::<Image>();
        assert_send_sync::<Error>();
    }
}

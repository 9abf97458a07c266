//! The errors of the engine: a few kinds a caller can branch on.

use std::io;
use std::path::PathBuf;

use qed_format::FormatError;

/// Result of engine operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which table holds a corrupt entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// The L1 table.
    L1,
    /// An L2 table.
    L2,
}

impl std::fmt::Display for TableKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::L1 => "L1",
            Self::L2 => "L2",
        })
    }
}

/// An engine error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on the image or a backing file failed.
    #[error("{op} at offset {offset} failed: {source}")]
    Io {
        /// What was being done ("read", "write", "flush", ...).
        op: &'static str,
        /// Byte offset in the file (0 where it does not apply).
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The header is invalid.
    #[error("invalid QED header: {0}")]
    Format(#[from] FormatError),
    /// A table entry is invalid.
    #[error(
        "corrupt {table} entry {index} in the table at offset {table_offset:#x}: value {value:#x} {reason}"
    )]
    Corrupt {
        /// Which table.
        table: TableKind,
        /// Host offset of the table.
        table_offset: u64,
        /// Index of the entry in the table.
        index: usize,
        /// The raw entry.
        value: u64,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The image demands more memory than allowed.
    #[error("{what} of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Bytes required.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// A write was attempted on an image opened read-only.
    #[error("image is opened read-only")]
    ReadOnly,
    /// An earlier metadata write or flush failed; the image refuses writes until reopened.
    #[error("image is poisoned by an earlier failed metadata write; reopen it")]
    Poisoned,
    /// A request lies (partly) outside the virtual disk.
    #[error("request at offset {offset} of {len} bytes is outside the image of {size} bytes")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// The backing chain could not be opened.
    #[error("backing file {path:?} (depth {depth}): {cause}")]
    Backing {
        /// The backing file as resolved.
        path: PathBuf,
        /// Depth in the chain (1 = the image's own backing file).
        depth: usize,
        /// What went wrong.
        cause: Box<Error>,
    },
    /// The backing chain is too deep, or its extents cannot be walked.
    #[error("backing chain error: {0}")]
    Chain(String),
    /// The backing chain names a file that is already in it.
    #[error("Backing file '{}' creates an infinite loop", .path.display())]
    BackingLoop {
        /// The file named a second time.
        path: PathBuf,
    },
    /// A caller passed an invalid argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Zeroing would have to write data, and the caller asked for fast zeroing only.
    #[error("zeroing at offset {offset} would have to write data")]
    NotFast {
        /// Guest offset of the first byte that would be written as data.
        offset: u64,
    },
    /// The operation or feature is not supported.
    #[error("not supported: {0}")]
    Unsupported(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { op, offset, source }
    }
}

//! What the server exports and how, as the handshake describes it: the export's name, size,
//! block sizes, TLS policy, and the transmission flags that follow from them.

use super::consts::*;
use super::option::MetaContext;

/// Whether the export is offered with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused by policy.
    #[default]
    Off,
    /// TLS before anything else (FORCEDTLS): every option but `STARTTLS` and `ABORT` is
    /// refused until the upgrade.
    Required,
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Smallest addressable unit.
    pub minimum: u32,
    /// Size below which I/O is inefficient.
    pub preferred: u32,
    /// Largest payload of one request.
    pub maximum: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        Self {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        }
    }
}

/// What the server exports, as the handshake describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// The export's name (`-x`); the empty name is the default export.
    pub name: String,
    /// A description for people (`-D`).
    pub description: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Whether writes are allowed.
    pub writable: bool,
    /// Whether `qemu:allocation-depth` is offered (`-A`).
    pub allocation_depth: bool,
    /// TLS policy.
    pub tls: TlsMode,
    /// Advertised block sizes.
    pub block_size: BlockSize,
    /// Whether `NBD_FLAG_CAN_MULTI_CONN` is advertised: a client may open several
    /// connections and a flush on one covers the writes of all (one engine is behind them).
    /// The server offers it only when it takes more than one client at a time
    /// ([`crate::server::ServerConfig::max_connections`]); a client that believed it would
    /// open its extra connections and wait for them.
    pub multi_conn: bool,
}

impl ExportConfig {
    /// A writable export of `size` bytes named `name`, with the default block sizes.
    pub fn new(name: impl Into<String>, size: u64) -> Self {
        Self {
            name: name.into(),
            description: None,
            size,
            writable: true,
            allocation_depth: false,
            tls: TlsMode::Off,
            block_size: BlockSize::default(),
            multi_conn: true,
        }
    }

    /// The metadata contexts offered.
    pub fn contexts(&self) -> Vec<MetaContext> {
        let mut all = vec![MetaContext::BaseAllocation];
        if self.allocation_depth {
            all.push(MetaContext::AllocationDepth);
        }
        all
    }

    /// Transmission flags for a client in `mode`.
    pub fn transmission_flags(&self, mode: Mode) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
        if self.multi_conn {
            // One engine behind every connection: a flush covers every completed write.
            flags |= TFLAG_CAN_MULTI_CONN;
        }
        if self.writable {
            flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        } else {
            flags |= TFLAG_READ_ONLY;
        }
        if mode != Mode::Simple {
            flags |= TFLAG_SEND_DF;
        }
        flags
    }
}

/// Which headers transmission uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Compact requests, simple replies only.
    Simple,
    /// Compact requests, structured replies.
    Structured,
    /// Extended (64-bit) requests and replies.
    Extended,
}

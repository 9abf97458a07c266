//! What the protocol layer refuses: each a reason to close the connection.

/// A protocol violation by the client, or a bound it exceeded. The connection that caused it
/// is closed; nothing else is affected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The client set flags the server did not offer or does not know.
    #[error("client flags {flags:#x} include unknown bits")]
    UnknownClientFlags {
        /// The flags as sent.
        flags: u32,
    },
    /// An option did not start with `IHAVEOPT`.
    #[error("option magic {magic:#x} is not IHAVEOPT")]
    BadOptionMagic {
        /// The magic as sent.
        magic: u64,
    },
    /// The client sent more options than one negotiation may hold.
    #[error("more than {limit} options in one negotiation")]
    TooManyOptions {
        /// The bound.
        limit: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (it cannot be answered with
    /// an error, so the session ends).
    #[error("export {name:?} does not exist")]
    UnknownExport {
        /// The name as sent (lossy UTF-8).
        name: String,
    },
    /// `NBD_OPT_EXPORT_NAME` with a name longer than the protocol allows.
    #[error("export name of {len} bytes is longer than {limit}")]
    NameTooLong {
        /// Bytes sent.
        len: u32,
        /// The bound.
        limit: usize,
    },
    /// An option the client must not send at this point (`NBD_OPT_EXPORT_NAME` after extended
    /// headers, or before TLS when TLS is required).
    #[error("option {option} is not allowed here: {why}")]
    OptionNotAllowed {
        /// The option.
        option: u32,
        /// Why.
        why: &'static str,
    },
    /// A request did not start with the magic the negotiated mode uses.
    #[error("request magic {magic:#x} is not {expected:#x}")]
    BadRequestMagic {
        /// The magic as sent.
        magic: u32,
        /// The magic the negotiated headers use.
        expected: u32,
    },
    /// A request announced a payload larger than the advertised maximum, which cannot be
    /// skipped safely.
    #[error("request payload of {len} bytes exceeds the maximum of {limit}")]
    PayloadTooLarge {
        /// Payload bytes announced.
        len: u64,
        /// The bound.
        limit: u32,
    },
    /// Bytes were fed after the handshake had ended.
    #[error("the handshake is over")]
    HandshakeOver,
}

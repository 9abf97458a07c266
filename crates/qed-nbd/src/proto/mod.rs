//! The NBD protocol without I/O: the handshake as a state machine (bytes in, actions out),
//! request decoding and checking, and reply encoding. Nothing here touches a socket.

mod config;
pub mod consts;
mod error;
mod handshake;
mod option;
mod reply;
mod request;
mod wire;

pub use config::{BlockSize, ExportConfig, Mode, TlsMode};
pub use error::ProtoError;
pub use handshake::{Action, Handshake, Negotiated, MAX_OPTIONS, MAX_OPTION_LEN};
pub use option::MetaContext;
pub use reply::{
    block_status_chunk, chunk_header_len, data_chunk_header, descriptor_len, error_chunk, failure,
    hole_chunk, none_chunk, simple, success, Descriptor, ReplyTo,
};
pub use request::{check, decode_request, header_len, Command, Limits, Request};
pub use wire::{Cursor, PutBe, Short};

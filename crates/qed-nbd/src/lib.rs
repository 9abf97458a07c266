//! NBD (Network Block Device) export of QED images.
//!
//! [`proto`] is the protocol with no I/O: the fixed-newstyle handshake as a state machine,
//! request and reply codecs (compact, structured and extended headers). [`server`] runs it on
//! TCP or Unix sockets with threads: many requests in flight per connection, replies out of
//! order, many connections on one [`qed_image::Image`] (or a raw file: [`export`] is what the
//! server asks of a disk). Only [`server`] and [`client`] touch sockets; [`client`] is the client side of the handshake, for
//! listing another server's exports.

pub mod client;
pub mod export;
pub mod proto;
pub mod server;

//! Fuzz target: see `nbd_handshake` in `fuzz/src/nbd.rs`.
#![no_main]

// The other target's body is unused here.
#[allow(dead_code)]
#[path = "../src/nbd.rs"]
mod nbd;

libfuzzer_sys::fuzz_target!(|data: &[u8]| nbd::nbd_handshake(data));

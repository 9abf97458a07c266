//! Fuzz target: see `qed_fuzz::header_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qed_fuzz::header_decode(data));

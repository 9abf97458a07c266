//! Fuzz target: see `qed_fuzz::open_ops`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qed_fuzz::open_ops(data));

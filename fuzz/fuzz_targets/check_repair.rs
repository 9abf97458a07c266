//! Fuzz target: see `qed_fuzz::check_repair`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qed_fuzz::check_repair(data));

//! Replays the committed NBD fuzz corpus (`fuzz/corpus/nbd_*`) through the fuzz target bodies
//! (`fuzz/src/nbd.rs`), so `cargo test` runs what the fuzzer runs, without libFuzzer.

#[path = "../../../fuzz/src/nbd.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus");

/// A fuzz target body.
type Body = fn(&[u8]);

#[test]
fn committed_nbd_corpus_replays_cleanly() {
    let targets: [(&str, Body); 2] = [
        ("nbd_handshake", harness::nbd_handshake),
        ("nbd_requests", harness::nbd_requests),
    ];
    let mut failures = Vec::new();
    for (target, body) in targets {
        let dir = Path::new(CORPUS).join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no corpus for {target}");
        for path in files {
            let data = std::fs::read(&path).expect("read corpus file");
            // Also every prefix of the small inputs: each cut is another input.
            let cuts: Vec<usize> = if data.len() <= 512 {
                (0..=data.len()).collect()
            } else {
                vec![data.len()]
            };
            for cut in cuts {
                if catch_unwind(AssertUnwindSafe(|| body(&data[..cut]))).is_err() {
                    failures.push(format!("{target}: {} cut at {cut}", path.display()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn arbitrary_bytes_do_not_panic() {
    // A seeded stream of inputs besides the corpus (splitmix64).
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for _ in 0..2000 {
        let len = (next() % 300) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if data.len() > 20 && next() % 2 == 0 {
            // Give some inputs valid magics so they get past the first check.
            data[1..5].copy_from_slice(&0u32.to_be_bytes());
            data[5..13].copy_from_slice(b"IHAVEOPT");
        }
        harness::nbd_handshake(&data);
        harness::nbd_requests(&data);
    }
}

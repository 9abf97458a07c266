//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/*`), the hostile images and the
//! shared fixtures through the fuzz target bodies (`fuzz/src/lib.rs`), so `cargo test` runs
//! exactly what the fuzzer runs, without libFuzzer.

#[path = "../../../fuzz/src/lib.rs"]
mod harness;
mod kit;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use kit::{files_in, files_with_extension, fixture_images, panic_message, HOSTILE_DIR};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// A fuzz target body.
type Body = fn(&[u8]);

/// Every target with its body.
const TARGETS: [(&str, Body); 3] = [
    ("header_decode", harness::header_decode),
    ("open_ops", harness::open_ops),
    ("check_repair", harness::check_repair),
];

/// Runs `body` on the input in `path`; returns a description of the panic, if any.
fn replay(body: Body, path: &Path) -> Option<String> {
    let data = std::fs::read(path).expect("read corpus file");
    let outcome = catch_unwind(AssertUnwindSafe(|| body(&data)));
    outcome
        .err()
        .map(|p| format!("{}: {}", path.display(), panic_message(p)))
}

#[test]
fn committed_corpus_replays_cleanly() {
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut total_bytes = 0;
    for (target, body) in TARGETS {
        let files = files_in(&Path::new(ROOT).join("fuzz/corpus").join(target));
        assert!(!files.is_empty(), "no corpus for {target}");
        for path in files {
            total_bytes += std::fs::metadata(&path).expect("metadata").len();
            failures.extend(replay(body, &path).map(|f| format!("{target}: {f}")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        total_bytes < 2 << 20,
        "the committed corpus is {total_bytes} bytes; keep it under 2 MiB"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn hostile_images_and_fixtures_replay_through_every_target() {
    let mut sources = files_with_extension(Path::new(HOSTILE_DIR), "qed");
    sources.extend(fixture_images());
    let mut failures = Vec::new();
    for (target, body) in TARGETS {
        for path in &sources {
            failures.extend(replay(body, path).map(|f| format!("{target}: {f}")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_ops_separator_splits_image_and_script() {
    let mut input = b"image bytes".to_vec();
    input.extend_from_slice(harness::OPS_SEPARATOR);
    input.extend_from_slice(&[4, 6]);
    assert_eq!(
        harness::split_ops(&input),
        (&b"image bytes"[..], &[4u8, 6][..])
    );
    assert_eq!(
        harness::split_ops(b"just an image"),
        (&b"just an image"[..], harness::DEFAULT_SCRIPT)
    );
}

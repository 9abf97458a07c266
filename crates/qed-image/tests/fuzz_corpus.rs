//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/*`), the hostile images and the
//! shared fixtures through the fuzz target bodies (`fuzz/src/lib.rs`), so `cargo test` runs
//! exactly what the fuzzer runs, without libFuzzer.

#[path = "../../../fuzz/src/lib.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const HOSTILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/hostile");

/// A fuzz target body.
type Body = fn(&[u8]);

/// Every target with its body.
const TARGETS: [(&str, Body); 3] = [
    ("header_decode", harness::header_decode),
    ("open_ops", harness::open_ops),
    ("check_repair", harness::check_repair),
];

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `body` on the input in `path`; returns a description of the panic, if any.
fn replay(body: Body, path: &Path) -> Option<String> {
    let data = std::fs::read(path).expect("read corpus file");
    let outcome = catch_unwind(AssertUnwindSafe(|| body(&data)));
    outcome.err().map(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{}: {msg}", path.display())
    })
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
    let mut sources = files_in(Path::new(HOSTILE));
    sources.retain(|p| p.extension().is_some_and(|e| e == "qed"));
    let fixtures = common_fixtures();
    sources.extend(fixtures);
    let mut failures = Vec::new();
    for (target, body) in TARGETS {
        for path in &sources {
            failures.extend(replay(body, path).map(|f| format!("{target}: {f}")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The shared QEMU-made fixtures, if present (`QED_FIXTURES` overrides the directory).
fn common_fixtures() -> Vec<PathBuf> {
    let dir = std::env::var_os("QED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../testdata/qemu-fixtures"
            ))
        });
    let files: Vec<PathBuf> = files_in(&dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "qed"))
        .collect();
    if files.is_empty() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "fixtures not found at {}",
            dir.display()
        );
        eprintln!(
            "note: fixtures not found at {}; replaying the rest",
            dir.display()
        );
    }
    files
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

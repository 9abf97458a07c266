//! `qed compare` gives `qemu-img compare`'s verdicts, messages and exit codes, plain and
//! strict, on every pair of a set of images: QEMU's fixtures (corrupt ones included) and
//! images made at test time.

mod common;

use std::path::Path;

use common::*;

/// Runs `compare ARGS` through both tools; asserts the same stdout and exit code, and for
/// failures the same first part of the message.
fn assert_same_compare(dir: &Path, args: &[&str]) {
    let mut full = vec!["compare"];
    full.extend_from_slice(args);
    let q = run_in(dir, "qemu-img", &full);
    let m = qed(dir, &full);
    assert_eq!(
        stdout(&m),
        stdout(&q),
        "{full:?}\nqemu-img stderr: {}\nqed stderr: {}",
        stderr(&q),
        stderr(&m)
    );
    assert_eq!(code(&m), code(&q), "{full:?}: {}", stderr(&m));
    if code(&q) > 1 {
        // qed words the reason its own way; what failed reads the same.
        let message = stderr(&q);
        let message = message.trim().trim_start_matches("qemu-img: ");
        let what = message.split(": ").next().unwrap_or(message);
        let words = format!("qed: {what}");
        assert!(
            stderr(&m).starts_with(&words),
            "{full:?}: {} does not start with {words}",
            stderr(&m)
        );
    }
}

#[test]
fn verdicts_equal_qemu_img_on_fixture_pairs() {
    if !have("qemu-img") {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    let names: Vec<String> = images(dir)
        .into_iter()
        .filter(|n| n != "table-size-1.qed" && n != "unknown-feature.qed")
        .collect();
    for a in &names {
        for b in &names {
            for strict in [false, true] {
                let mut args = Vec::new();
                if strict {
                    args.push("-s");
                }
                args.extend([a.as_str(), b.as_str()]);
                assert_same_compare(dir, &args);
            }
        }
    }
}

#[test]
fn verdicts_equal_qemu_img_on_made_image_pairs() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    let mut names = made_images(dir);
    // Flat copies (same contents, other block status) and near copies (one byte changed).
    run_ok(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "top.qed", "top.raw"],
    );
    run_ok(
        dir,
        "qemu-img",
        &["convert", "-O", "qed", "top.qed", "top-flat.qed"],
    );
    run_ok(
        dir,
        "qemu-img",
        &["convert", "-O", "qed", "top.qed", "top-nudged.qed"],
    );
    qemu_io_ok(dir, "qed", "top-nudged.qed", &["write -P 0x42 1000123 1"]);
    run_ok(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "over-raw.qed", "over-raw.raw"],
    );
    // Sizes that differ with contents that agree, and that do not.
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qed", "empty-1m.qed", "1M"],
    );
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qed", "empty-2m.qed", "2M"],
    );
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qed", "tail-2m.qed", "2M"],
    );
    qemu_io_ok(dir, "qed", "tail-2m.qed", &["write -P 1 1500k 4k"]);
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qed", "zeros-2m.qed", "2M"],
    );
    qemu_io_ok(dir, "qed", "zeros-2m.qed", &["write -P 0 1M 64k"]);
    names.extend(
        [
            "top.raw",
            "top-flat.qed",
            "top-nudged.qed",
            "over-raw.raw",
            "empty-1m.qed",
            "empty-2m.qed",
            "tail-2m.qed",
            "zeros-2m.qed",
        ]
        .map(String::from),
    );
    for a in &names {
        for b in &names {
            for strict in [false, true] {
                let mut args = Vec::new();
                if strict {
                    args.push("-s");
                }
                args.extend([a.as_str(), b.as_str()]);
                assert_same_compare(dir, &args);
            }
        }
    }
    // The warning comes before the verdict.
    let out = qed(dir, &["compare", "empty-1m.qed", "empty-2m.qed"]);
    assert_eq!(
        stdout(&out),
        "Warning: Image size mismatch!\nImages are identical.\n"
    );
    let out = qed(dir, &["compare", "top.qed", "top-nudged.qed"]);
    assert_eq!(stdout(&out), "Content mismatch at offset 999936!\n");
    assert_eq!(code(&out), 1);
    let quiet = qed(dir, &["compare", "-q", "top.qed", "top-nudged.qed"]);
    assert_eq!((stdout(&quiet).as_str(), code(&quiet)), ("", 1));
}

#[test]
fn formats_and_failures_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    for args in [
        &["-f", "raw", "-F", "raw", "basic-64k.qed", "basic-64k.qed"][..],
        &["-f", "raw", "basic-64k.qed", "basic-64k.qed"],
        &["-F", "qed", "backing-base.raw", "backing-overlay.qed"],
        &["basic-64k.qed", "missing.qed"],
        &["missing.qed", "basic-64k.qed"],
        // Corrupt tables: block status fails (exit 3).
        &["dirty-invalid-l2.qed", "dirty-invalid-l2.qed"],
        &["-U", "chain-top.qed", "chain-base.qed"],
    ] {
        assert_same_compare(dir, args);
    }
    let out = qed(dir, &["compare", "basic-64k.qed", "missing.qed"]);
    assert_eq!(code(&out), 2);
}

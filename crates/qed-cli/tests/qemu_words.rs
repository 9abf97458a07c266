//! Messages QEMU's own tests read, worded as QEMU words them: the same failure through
//! qemu-img / qemu-io and through `qed` invoked under those names prints the same line.

mod common;

use std::path::Path;

use common::*;

/// Runs `program` (QEMU's, or ours through a link of that name) and returns its stderr.
fn stderr_of(dir: &Path, ours: bool, program: &str, args: &[&str]) -> String {
    let path = if ours {
        let link = dir.join("bin").join(program);
        if !link.exists() {
            std::fs::create_dir_all(dir.join("bin")).unwrap();
            std::os::unix::fs::symlink(qed_path(), &link).unwrap();
        }
        link.display().to_string()
    } else {
        program.to_string()
    };
    let o = run_in(dir, &path, args);
    assert_ne!(code(&o), 0, "{program} {args:?} should fail");
    stderr(&o)
}

fn same_stderr(dir: &Path, program: &str, args: &[&str]) -> String {
    let theirs = stderr_of(dir, false, program, args);
    let ours = stderr_of(dir, true, program, args);
    assert_eq!(ours, theirs, "{program} {args:?}");
    ours
}

#[test]
fn a_backing_loop_is_an_infinite_loop() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("t.qed").display().to_string();
    let base = d.join("t.base").display().to_string();
    run_ok(d, "qemu-img", &["create", "-q", "-f", "qed", &base, "1M"]);
    run_ok(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qed", "-b", &base, "-F", "qed", &img, "1M",
        ],
    );
    run_ok(
        d,
        "qemu-img",
        &["rebase", "-u", "-b", &img, "-F", "qed", &base],
    );
    let line = same_stderr(d, "qemu-img", &["info", "--backing-chain", &img]);
    assert_eq!(
        line,
        format!("qemu-img: Backing file '{img}' creates an infinite loop.\n")
    );
}

#[test]
fn a_missing_backing_file_at_create() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("t.qed").display().to_string();
    let missing = d.join("t.qed.inexistent").display().to_string();
    let text = same_stderr(
        d,
        "qemu-img",
        &["create", "-f", "qed", "-b", &missing, "-F", "qed", &img],
    );
    assert!(text.ends_with("Could not open backing image.\n"), "{text}");
    assert!(!d.join("t.qed").exists());
}

#[test]
fn header_fields_qemu_refuses() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // (byte offset in the header, little-endian u32 written there). header_size 0 is left
    // out: QEMU opens such a file, and qed refuses it (the header must lie in its own area).
    for (offset, value) in [(12usize, u32::MAX), (8, 4096 * 3), (0, 0x1234), (4, 2048)] {
        run_ok(d, "qemu-img", &["create", "-q", "-f", "qed", "t.qed", "1M"]);
        let mut bytes = std::fs::read(d.join("t.qed")).unwrap();
        bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        std::fs::write(d.join("t.qed"), &bytes).unwrap();
        same_stderr(d, "qemu-io", &["-f", "qed", "-c", "read 0 512", "t.qed"]);
    }
}

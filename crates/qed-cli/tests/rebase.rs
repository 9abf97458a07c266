//! `qemu-img rebase` and `qed` invoked as `qemu-img` agree: output, messages and exit codes;
//! the image names the same backing file afterwards and reads the same (a safe rebase keeps
//! what the guest read); everything we wrote is clean, and no larger than what qemu-img wrote.
//! Bad input changes nothing.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// `backing-filename` and `backing-filename-format` of `file`, as qemu-img info reports them.
fn backing_of(dir: &Path, file: &str) -> (Value, Value) {
    let out = run_ok(dir, "qemu-img", &["info", "--output=json", file]);
    let info: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    (
        info["backing-filename"].clone(),
        info["backing-filename-format"].clone(),
    )
}

/// The image every case rebases, and the copy of it left alone (same directory, same chain).
fn image_of(args: &[&str]) -> &'static str {
    if args.iter().any(|a| a.starts_with("sub/")) {
        "sub/deep.qed"
    } else {
        "top.qed"
    }
}

#[test]
fn same_results_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(make_chain);
    let cases: &[(&[&str], bool, Stderr)] = &[
        // (arguments, whether the guest view is kept, stderr check)
        (
            &["-b", "base.raw", "-F", "raw", "top.qed"],
            true,
            Stderr::Same,
        ),
        (&["-b", "", "top.qed"], true, Stderr::Same),
        (
            &["-b", "other.qed", "-F", "qed", "top.qed"],
            true,
            Stderr::Same,
        ),
        (
            &["-b", "mid.qed", "-F", "qed", "top.qed"],
            true,
            Stderr::Same,
        ),
        (
            &["-p", "-q", "-b", "base.raw", "-F", "raw", "top.qed"],
            true,
            Stderr::Same,
        ),
        (
            &[
                "-t",
                "none",
                "-T",
                "none",
                "-b",
                "other.qed",
                "-F",
                "qed",
                "top.qed",
            ],
            true,
            Stderr::Same,
        ),
        (
            &["-U", "-b", "other.qed", "-F", "qed", "top.qed"],
            true,
            Stderr::Same,
        ),
        (
            &[
                "-f",
                "qed",
                "-b",
                "../base.raw",
                "-F",
                "raw",
                "sub/deep.qed",
            ],
            true,
            Stderr::Same,
        ),
        (
            &["-b", "../mid.qed", "-F", "qed", "sub/deep.qed"],
            true,
            Stderr::Same,
        ),
        (
            &["-u", "-b", "other.qed", "-F", "qed", "top.qed"],
            false,
            Stderr::Same,
        ),
        (
            &["-u", "-b", "renamed.raw", "-F", "raw", "top.qed"],
            false,
            Stderr::Same,
        ),
        (&["-u", "-b", "", "top.qed"], false, Stderr::Same),
        (&["-u", "top.qed"], false, Stderr::Same),
        // Bad input: nothing changes.
        (
            &["-b", "missing.raw", "-F", "raw", "top.qed"],
            true,
            Stderr::Either,
        ),
        (&["top.qed"], true, Stderr::FirstLine),
        (
            &["-b", "base.raw", "-F", "bogus", "top.qed"],
            true,
            Stderr::Same,
        ),
        (
            &["-c", "-b", "base.raw", "-F", "raw", "top.qed"],
            true,
            Stderr::Same,
        ),
        (
            &["-b", "base.raw", "-F", "raw", "missing.qed"],
            true,
            Stderr::Either,
        ),
        (
            &["-u", "-b", "x.raw", "-F", "raw", "base.raw"],
            true,
            Stderr::Same,
        ),
    ];
    for (args, keeps_view, stderr_check) in cases {
        twins.reset();
        let image = image_of(args);
        for dir in [&twins.qemu, &twins.ours] {
            copy_file(dir, image, &format!("{image}.before"));
        }
        let mut full = vec!["rebase"];
        full.extend_from_slice(args);
        let (q, o) = twins.run(&full);
        assert_same_run(&full, &q, &o, *stderr_check);
        let (qf, of) = (twins.qemu.join(image), twins.ours.join(image));
        assert_eq!(
            backing_of(&twins.qemu, image),
            backing_of(&twins.ours, image),
            "{full:?}"
        );
        if args.contains(&"renamed.raw") {
            // The new backing file does not exist: nothing can open the chain; the files must
            // be the same.
            assert_eq!(
                std::fs::read(&qf).unwrap(),
                std::fs::read(&of).unwrap(),
                "{full:?}"
            );
            continue;
        }
        assert!(
            same_contents(&qf, &of),
            "{full:?}: the two results read differently"
        );
        if *keeps_view {
            let before = twins.ours.join(format!("{image}.before"));
            assert!(
                same_contents(&before, &of),
                "{full:?}: the guest view changed"
            );
        }
        assert_qemu_check_clean(&twins.ours, image);
        let (ql, ol) = (file_len(&twins.qemu, image), file_len(&twins.ours, image));
        assert!(ol <= ql, "{full:?}: {ol} bytes, qemu-img's {ql}");
        if code(&o) != 0 {
            let before = std::fs::read(twins.ours.join(format!("{image}.before"))).unwrap();
            assert!(
                std::fs::read(&of).unwrap() == before,
                "{full:?} failed but changed {image}"
            );
        }
    }
}

#[test]
fn backing_format_is_probed_when_not_given() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(make_chain);
    copy_file(&twins.ours, "top.qed", "before.qed");
    // qemu-img 10 refuses (after copying); we probe the format, say so, and record it.
    let (q, o) = twins.run(&["rebase", "-b", "base.raw", "top.qed"]);
    assert_eq!(code(&q), 1);
    assert!(stderr(&q).contains("backing format must be specified"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("detected format raw"), "{}", stderr(&o));
    let (name, format) = backing_of(&twins.ours, "top.qed");
    assert_eq!(
        (name.as_str(), format.as_str()),
        (Some("base.raw"), Some("raw"))
    );
    assert!(same_contents(
        &twins.ours.join("before.qed"),
        &twins.ours.join("top.qed")
    ));
    assert_qemu_check_clean(&twins.ours, "top.qed");
    // Unsafe, a file that cannot be probed: refused as qemu-img refuses it.
    let (q, o) = twins.run(&["rebase", "-u", "-b", "gone.qed", "top.qed"]);
    assert_same_run(&["rebase", "-u"], &q, &o, Stderr::Same);
}

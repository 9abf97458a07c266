//! `qed create` writes the same bytes and prints the same line as `qemu-img create`.

mod common;

use common::*;

/// Creates with both tools (same options, FILE then SIZE) and compares output and bytes.
fn compare_create(dir: &std::path::Path, options: &[&str], size: Option<&str>) {
    let mut qemu_args = vec!["create", "-f", "qed"];
    qemu_args.extend_from_slice(options);
    let mut ours = qemu_args.clone();
    qemu_args.push("by-qemu.qed");
    ours.push("by-qed.qed");
    if let Some(size) = size {
        qemu_args.push(size);
        ours.push(size);
    }
    let q = run_in(dir, "qemu-img", &qemu_args);
    let m = qed(dir, &ours);
    assert!(q.status.success(), "qemu-img {qemu_args:?}: {}", stderr(&q));
    assert!(m.status.success(), "qed {ours:?}: {}", stderr(&m));
    assert_eq!(
        stdout(&q).replace("by-qemu", "X"),
        stdout(&m).replace("by-qed", "X"),
        "{options:?} {size:?}"
    );
    let a = std::fs::read(dir.join("by-qemu.qed")).expect("qemu image");
    let b = std::fs::read(dir.join("by-qed.qed")).expect("qed image");
    assert!(a == b, "files differ for {options:?} {size:?}");
}

#[test]
fn byte_identical_to_qemu_img() {
    if !have_qemu() {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    for (options, size) in [
        (&[][..], Some("16M")),
        (&[][..], Some("1025")),
        (&[][..], Some("0")),
        (&["-o", "cluster_size=4096,table_size=2"][..], Some("64M")),
        (
            &["-o", "cluster_size=4k", "-o", "table_size=16"][..],
            Some("1G"),
        ),
        (&["-o", "cluster_size=1M"][..], Some("100G")),
        (&["-o", "table_size=4"][..], Some("1.5M")),
        (&["-o", "size=3M"][..], None),
        (&["-b", "backing-base.raw", "-F", "raw"][..], Some("1M")),
        (&["-b", "backing-base.raw", "-F", "raw"][..], None),
        (&["-b", "chain-base.qed", "-F", "qed"][..], None),
        (
            &[
                "-b",
                "chain-top.qed",
                "-F",
                "qed",
                "-o",
                "cluster_size=8192",
            ][..],
            Some("10M"),
        ),
        (
            &[
                "-o",
                "backing_file=backing-base.raw,backing_fmt=raw,cluster_size=4096",
            ][..],
            None,
        ),
        (&["-q", "-o", "cluster_size=64k"][..], Some("2G")),
    ] {
        compare_create(dir, options, size);
    }
}

#[test]
fn probes_backing_format_when_not_given() {
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    let out = qed(dir, &["create", "-b", "backing-base.raw", "probed.qed"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("warning"), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "Formatting 'probed.qed', fmt=qed size=262144 backing_file=backing-base.raw \
         backing_fmt=raw cluster_size=65536\n"
    );
    // Recorded as raw: BACKING_FILE | BACKING_FORMAT_NO_PROBE.
    let bytes = std::fs::read(dir.join("probed.qed")).expect("image");
    assert_eq!(bytes[16], 0x5);
    let out = qed(
        dir,
        &["create", "-q", "-b", "chain-base.qed", "probed2.qed"],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    let bytes = std::fs::read(dir.join("probed2.qed")).expect("image");
    assert_eq!(bytes[16], 0x1);
}

#[test]
fn rounds_size_and_warns_about_qemu_limits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    let out = qed(
        dir,
        &["create", "-o", "cluster_size=4096", "odd.qed", "1025"],
    );
    assert_eq!(code(&out), 0);
    assert_eq!(
        stdout(&out),
        "Formatting 'odd.qed', fmt=qed size=1025 cluster_size=4096\n"
    );
    let bytes = std::fs::read(dir.join("odd.qed")).expect("image");
    assert_eq!(u64::from_le_bytes(bytes[48..56].try_into().unwrap()), 1536);
    assert_eq!(bytes.len(), 5 * 4096);

    let out = qed(
        dir,
        &[
            "create",
            "-o",
            "cluster_size=4096,table_size=1",
            "t1.qed",
            "1M",
        ],
    );
    assert_eq!(code(&out), 0);
    assert!(stderr(&out).contains("warning"), "{}", stderr(&out));
    assert!(stderr(&out).contains("table_size 1"), "{}", stderr(&out));
    assert_eq!(std::fs::metadata(dir.join("t1.qed")).unwrap().len(), 8192);

    let out = qed(
        dir,
        &[
            "create",
            "-q",
            "-o",
            "cluster_size=64M,table_size=16",
            "big.qed",
            "1T",
        ],
    );
    assert_eq!(code(&out), 0);
    assert!(stderr(&out).contains("wraps"), "{}", stderr(&out));

    let out = qed(dir, &["create", "-f", "raw", "r.raw", "1000"]);
    assert_eq!(code(&out), 0);
    assert_eq!(stdout(&out), "Formatting 'r.raw', fmt=raw size=1000\n");
    assert_eq!(std::fs::metadata(dir.join("r.raw")).unwrap().len(), 1024);
}

#[test]
fn errors_are_reported_not_panicked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    for (args, expect) in [
        (&["create", "x.qed", "1X"][..], "qed: image size '1X': "),
        (&["create", "x.qed", "9E"][..], "qed: image size '9E': "),
        (
            &["create", "x.qed"][..],
            "qed: x.qed: Image creation needs a size parameter",
        ),
        (
            &["create", "-o", "cluster_size=3000", "x.qed", "1M"][..],
            "qed: x.qed: cluster_size 3000 is invalid",
        ),
        (
            &["create", "-o", "cluster_size=8G", "x.qed", "1M"][..],
            "qed: x.qed: cluster_size 8589934592 is invalid",
        ),
        (
            &["create", "-o", "table_size=3", "x.qed", "1M"][..],
            "qed: x.qed: table_size 3 is invalid",
        ),
        (
            &["create", "-o", "foo=1", "x.qed", "1M"][..],
            "qed: x.qed: Invalid parameter 'foo'",
        ),
        (
            &["create", "-o", "cluster_size=4096", "x.qed", "8T"][..],
            "qed: x.qed: image_size 8796093022208 is invalid",
        ),
        (
            &["create", "-b", "missing.raw", "-F", "raw", "x.qed", "1M"][..],
            "qed: x.qed: Could not open 'missing.raw': No such file or directory\nCould not open backing image.",
        ),
        (&["create", "-f", "qcow2", "x.qed", "1M"][..], "qed: "),
    ] {
        let out = qed(dir, args);
        assert_eq!(code(&out), 1, "{args:?}");
        let err = stderr(&out);
        assert!(err.starts_with(expect), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!dir.join("x.qed").exists(), "{args:?} left a file behind");
    }
}

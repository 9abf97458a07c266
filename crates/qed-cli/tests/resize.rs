//! `qemu-img resize` and `qed` invoked as `qemu-img` agree on QED and raw images: output,
//! messages, exit codes and the resulting images (same size, same contents, clean); bad input
//! changes nothing. Where we differ on purpose (QED shrinks), the result is checked instead.

mod common;

use std::path::Path;

use common::*;

fn make(dir: &Path) {
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qed", "a.qed", "1M"],
    );
    qemu_io_ok(
        dir,
        "qed",
        "a.qed",
        &["write -P 1 0 64k", "write -P 2 960k 64k"],
    );
    run_ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-o",
            "cluster_size=4k",
            "-b",
            "a.qed",
            "-F",
            "qed",
            "over.qed",
        ],
    );
    qemu_io_ok(dir, "qed", "over.qed", &["write -P 3 512k 4k"]);
    std::fs::write(dir.join("r.raw"), vec![0x61u8; 1000]).expect("r.raw");
}

/// The virtual size `qemu-img info` reports.
fn virtual_size(path: &Path) -> u64 {
    let out = run_ok(
        path.parent().expect("dir"),
        "qemu-img",
        &["info", "--output=json", &path.display().to_string()],
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    info["virtual-size"].as_u64().expect("virtual-size")
}

#[test]
fn same_results_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(make);
    let cases: &[(&[&str], Stderr)] = &[
        (&["a.qed", "2M"], Stderr::Same),
        (&["a.qed", "+1M"], Stderr::Same),
        (&["a.qed", "1M"], Stderr::Same),
        (&["-q", "a.qed", "5M"], Stderr::Same),
        (&["--preallocation=off", "a.qed", "4M"], Stderr::Same),
        (&["-f", "qed", "over.qed", "+64k"], Stderr::Same),
        (&["a.qed", "64T"], Stderr::Same),
        (&["a.qed", "512k"], Stderr::Same),
        (&["a.qed", "+1000"], Stderr::Same),
        (&["a.qed", "+1x"], Stderr::Same),
        (&["a.qed", "-3M"], Stderr::Same),
        (&["a.qed", "--", "-3M"], Stderr::Same),
        (&["a.qed", "0"], Stderr::Same),
        (&["a.qed", "1E"], Stderr::Same),
        (&["a.qed", "16E"], Stderr::Same),
        (&["a.qed", "18446744073709551615"], Stderr::Same),
        (&["--preallocation=full", "a.qed", "4M"], Stderr::Same),
        (&["--preallocation=falloc", "a.qed", "4M"], Stderr::Same),
        (&["--preallocation=bogus", "a.qed", "4M"], Stderr::Same),
        (&["missing.qed", "4M"], Stderr::Either),
        (&["-f", "raw", "r.raw", "+0"], Stderr::Same),
        (&["-f", "raw", "r.raw", "4k"], Stderr::Same),
        (&["-f", "raw", "r.raw", "1000"], Stderr::Same),
        (&["-f", "raw", "--shrink", "r.raw", "900"], Stderr::Same),
        (
            &["-f", "raw", "--preallocation=full", "r.raw", "8k"],
            Stderr::Same,
        ),
        (
            &["-f", "raw", "--preallocation=falloc", "r.raw", "8k"],
            Stderr::Same,
        ),
        (
            &["-f", "raw", "--preallocation=full", "r.raw", "1000"],
            Stderr::Same,
        ),
        (
            &["-f", "raw", "--preallocation=metadata", "r.raw", "8k"],
            Stderr::Same,
        ),
        (&["-f", "raw", "a.qed", "2M"], Stderr::Same),
    ];
    for (args, stderr_check) in cases {
        twins.reset();
        let mut full = vec!["resize"];
        full.extend_from_slice(args);
        let (q, o) = twins.run(&full);
        assert_same_run(&full, &q, &o, *stderr_check);
        let as_raw = args.contains(&"raw");
        for file in ["a.qed", "over.qed", "r.raw"] {
            let (qf, of) = (twins.qemu.join(file), twins.ours.join(file));
            if as_raw || file == "r.raw" {
                assert_eq!(
                    std::fs::read(&qf).unwrap(),
                    std::fs::read(&of).unwrap(),
                    "{full:?}: {file} differs"
                );
            } else {
                assert_eq!(virtual_size(&qf), virtual_size(&of), "{full:?} {file}");
                assert!(same_contents(&qf, &of), "{full:?}: {file} differs");
                assert_qemu_check_clean(&twins.ours, file);
            }
        }
        if code(&o) != 0 {
            // Nothing changed.
            let fresh = tempfile::tempdir().unwrap();
            make(fresh.path());
            for file in ["a.qed", "over.qed", "r.raw"] {
                assert_eq!(
                    std::fs::read(fresh.path().join(file)).unwrap(),
                    std::fs::read(twins.ours.join(file)).unwrap(),
                    "{full:?} failed but changed {file}"
                );
            }
        }
    }
}

#[test]
fn qed_images_shrink_with_shrink() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(make);
    let (q, o) = twins.run(&["resize", "--shrink", "a.qed", "512k"]);
    // QEMU cannot shrink QED images; we can.
    assert_eq!(code(&q), 1);
    assert!(stderr(&q).contains("Shrinking images is currently not supported"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), "Image resized.\n");
    let a = twins.ours.join("a.qed");
    assert_eq!(virtual_size(&a), 512 << 10);
    assert_qemu_check_clean(&twins.ours, "a.qed");
    qemu_io_ok(
        &twins.ours,
        "qed",
        "a.qed",
        &["read -P 1 0 64k", "read -P 0 64k 448k"],
    );
    // The cluster past the new end is gone, even after growing again.
    let (_, o) = twins.run(&["resize", "a.qed", "1M"]);
    assert_eq!(code(&o), 0);
    qemu_io_ok(&twins.ours, "qed", "a.qed", &["read -P 0 512k 512k"]);
    assert_qemu_check_clean(&twins.ours, "a.qed");
    // Relative shrink of the overlay.
    let (_, o) = twins.run(&["resize", "--shrink", "over.qed", "-512k"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(virtual_size(&twins.ours.join("over.qed")), 512 << 10);
    assert_qemu_check_clean(&twins.ours, "over.qed");
}

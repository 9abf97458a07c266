//! `qemu-img commit` and `qed` invoked as `qemu-img` agree: output, messages and exit codes;
//! the file committed into reads the same afterwards, and so does the image; everything we
//! wrote is clean. Where we differ on purpose (without `-d` the image is emptied: QEMU's QED
//! driver cannot), the emptied image is checked. Bad input changes nothing.

mod common;

use std::path::Path;

use common::*;

const FILES: [&str; 4] = ["top.qed", "mid.qed", "base.raw", "sub/deep.qed"];

/// Whether `file` (QED) holds no cluster of its own.
fn is_empty(dir: &Path, file: &str) -> bool {
    let out = run_ok(dir, "qemu-img", &["map", "--output=json", file]);
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    map.as_array()
        .expect("array")
        .iter()
        .all(|e| e["depth"].as_u64() != Some(0) || e["present"] == false)
}

#[test]
fn same_results_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(make_chain);
    let cases: &[(&[&str], Stderr)] = &[
        (&["top.qed"], Stderr::Same),
        (&["-d", "top.qed"], Stderr::Same),
        (&["-q", "top.qed"], Stderr::Same),
        (&["-t", "writeback", "top.qed"], Stderr::Same),
        (&["-r", "100M", "top.qed"], Stderr::Same),
        (&["-f", "qed", "-b", "base.raw", "top.qed"], Stderr::Same),
        (&["-b", "mid.qed", "top.qed"], Stderr::Same),
        (&["-b", "./mid.qed", "top.qed"], Stderr::Same),
        (&["-d", "mid.qed"], Stderr::Same),
        (&["sub/deep.qed"], Stderr::Same),
        (&["-b", "../mid.qed", "sub/deep.qed"], Stderr::Same),
        // Bad input: nothing changes.
        (&["-b", "nothere", "top.qed"], Stderr::Same),
        (&["-b", "top.qed", "top.qed"], Stderr::Same),
        (&["-r", "1x", "top.qed"], Stderr::Same),
        (&["base.raw"], Stderr::Same),
        (&["-f", "raw", "top.qed"], Stderr::Same),
        (&["missing.qed"], Stderr::Either),
    ];
    for (args, stderr_check) in cases {
        twins.reset();
        let mut full = vec!["commit"];
        full.extend_from_slice(args);
        let image = *args.last().expect("a file");
        for dir in [&twins.qemu, &twins.ours] {
            for file in FILES {
                copy_file(dir, file, &format!("{file}.before"));
            }
        }
        let (q, o) = twins.run(&full);
        assert_same_run(&full, &q, &o, *stderr_check);
        for file in FILES {
            let (qf, of) = (twins.qemu.join(file), twins.ours.join(file));
            assert!(
                same_contents(&qf, &of),
                "{full:?}: {file} reads differently"
            );
            if file.ends_with(".qed") {
                assert_qemu_check_clean(&twins.ours, file);
            }
            if code(&o) != 0 {
                let before = std::fs::read(twins.ours.join(format!("{file}.before"))).unwrap();
                assert!(
                    std::fs::read(&of).unwrap() == before,
                    "{full:?} failed but changed {file}"
                );
            }
        }
        let keeps = args.contains(&"-d") || args.contains(&"-b");
        if code(&o) == 0 && !keeps {
            assert!(
                is_empty(&twins.ours, image),
                "{full:?}: {image} not emptied"
            );
            assert_eq!(file_len(&twins.ours, image), 327_680, "{full:?}: not cut");
        }
        if code(&o) == 0 && keeps {
            let before = std::fs::read(twins.ours.join(format!("{image}.before"))).unwrap();
            assert!(
                std::fs::read(twins.ours.join(image)).unwrap() == before,
                "{full:?}: {image} changed"
            );
        }
    }
}

#[test]
fn the_guest_view_of_the_image_is_kept() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(make_chain);
    for args in [
        &["top.qed"][..],
        &["-d", "top.qed"],
        &["-b", "base.raw", "top.qed"],
    ] {
        twins.reset();
        copy_file(&twins.ours, "top.qed", "before.qed");
        // The copy reads through the chain as it was: flatten it first.
        run_ok(
            &twins.ours,
            "qemu-img",
            &["convert", "-O", "raw", "before.qed", "before.raw"],
        );
        let mut full = vec!["commit"];
        full.extend_from_slice(args);
        let (_, o) = twins.run(&full);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        assert!(
            same_contents(&twins.ours.join("before.raw"), &twins.ours.join("top.qed")),
            "{args:?}: the image reads differently"
        );
    }
}

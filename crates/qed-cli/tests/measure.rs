//! `qemu-img measure` and `qed` invoked as `qemu-img` agree on raw targets (human text, JSON,
//! messages, exit codes). QED targets, which QEMU cannot measure, are measured here: the
//! required size is what `convert -O qed` writes, and the fully allocated size what
//! `qemu-img convert -O qed -S 0` writes.

mod common;

use common::*;

#[test]
fn same_results_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(|dir| {
        make_chain(dir);
        made_images(dir);
    });
    let cases: &[&[&str]] = &[
        &["--size", "1G"],
        &["--size", "1G", "--output=json"],
        &["--size", "1000"],
        &["-O", "raw", "--size", "0"],
        &["top.qed"],
        &["--output", "json", "top.qed"],
        &["-f", "raw", "top.qed"],
        &["-U", "sparse.raw"],
        &["odd.raw"],
        &["sub/deep.qed"],
        &["-O", "raw", "-o", "preallocation=full", "--size", "1M"],
        // Refused.
        &["-O", "raw", "--size", "1x"],
        &["-O", "bogus", "--size", "1M"],
        &["-O", "raw", "-o", "cluster_size=4k", "--size", "1M"],
        &["top.qed", "--size", "1M"],
        &[],
        &["top.qed", "mid.qed"],
        &["-f", "raw", "--size", "1M"],
        &["missing.qed"],
    ];
    for args in cases {
        let mut full = vec!["measure"];
        full.extend_from_slice(args);
        let (q, o) = twins.run(&full);
        let check = if args.contains(&"missing.qed") {
            Stderr::Either
        } else {
            Stderr::Same
        };
        assert_same_run(&full, &q, &o, check);
    }
}

#[test]
fn qed_targets_are_measured() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let tool = qed_as_qemu_img(dir).display().to_string();
    make_chain(dir);
    let mut sources = made_images(dir);
    sources.extend(["top.qed", "mid.qed", "base.raw", "sub/deep.qed"].map(String::from));
    let number = |text: &str, key: &str| -> u64 {
        let value: serde_json::Value = serde_json::from_str(text).expect("JSON");
        value[key].as_u64().expect(key)
    };
    for src in &sources {
        for opts in ["cluster_size=64k", "cluster_size=4k,table_size=2"] {
            let q = run_in(dir, "qemu-img", &["measure", "-O", "qed", "-o", opts, src]);
            assert_eq!(code(&q), 1, "QEMU measures QED now? {}", stdout(&q));
            let o = run_ok(
                dir,
                &tool,
                &["measure", "-O", "qed", "-o", opts, "--output=json", src],
            );
            let required = number(&stdout(&o), "required");
            let full = number(&stdout(&o), "fully-allocated");
            // The human lines say the same. Right away: what the file system reports as holes
            // (ranges zeroed with FALLOC_FL_ZERO_RANGE) turns to data once a reader has pulled
            // them into the page cache, and the measure counts what it reports.
            let human = stdout(&run_ok(
                dir,
                &tool,
                &["measure", "-O", "qed", "-o", opts, src],
            ));
            assert_eq!(
                human,
                format!("required size: {required}\nfully allocated size: {full}\n"),
                "{src} {opts}: human output"
            );
            run_ok(
                dir,
                &tool,
                &["convert", "-O", "qed", "-o", opts, src, "m.qed"],
            );
            // Block status counts data clusters that hold zeros (nothing is read), which the
            // conversion leaves out: the required size is never less than the conversion.
            let converted = file_len(dir, "m.qed");
            assert!(
                required >= converted,
                "{src} {opts}: {required} < {converted}"
            );
            if ["top.qed", "mid.qed", "base.raw", "sub/deep.qed"].contains(&src.as_str()) {
                assert_eq!(required, converted, "{src} {opts}: required");
            }
            run_ok(
                dir,
                "qemu-img",
                &["convert", "-O", "qed", "-o", opts, "-S", "0", src, "f.qed"],
            );
            assert_eq!(
                full,
                file_len(dir, "f.qed"),
                "{src} {opts}: fully allocated"
            );
        }
    }
    // A new image of a size.
    let o = run_ok(dir, &tool, &["measure", "-O", "qed", "--size", "1G"]);
    assert_eq!(
        stdout(&o),
        "required size: 327680\nfully allocated size: 1074331648\n"
    );
}

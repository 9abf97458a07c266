//! `qed check` prints what `qemu-img check` prints, with the same exit codes, on copies of
//! every shared fixture — except where our repair goes further on purpose (leaks reclaimed,
//! duplicates copied) and for the `image-end-offset` we report and QEMU does not for QED.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

/// The images overlays name as backing files; copied next to every scratch image.
const BACKING: &[&str] = &["backing-base.raw", "chain-base.qed"];

/// A scratch directory with a fresh copy of `image` (and of the backing files).
fn scratch(image: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for name in BACKING.iter().copied().chain([image]) {
        let to = dir.path().join(name);
        std::fs::copy(Path::new(FIXTURES).join(name), &to).expect("copy fixture");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    dir
}

/// Fixture names (`*.qed`, `*.raw`), or `None` when the fixtures are missing.
fn fixture_names() -> Option<Vec<String>> {
    let dir = fixtures()?;
    Some(images(dir.path()))
}

/// Output and the `image-end-offset` we print, separated: the `Image end offset: N` line or
/// the `"image-end-offset": N,` JSON line (the first key) removed, and N.
fn split_end_offset(text: &str) -> (String, Option<u64>) {
    let mut end = None;
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            let value = line
                .strip_prefix("Image end offset: ")
                .or_else(|| line.strip_prefix("    \"image-end-offset\": "));
            match value {
                Some(v) => {
                    end = v.trim_end_matches(',').parse().ok();
                    false
                }
                None => true,
            }
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    (out, end)
}

fn check_args<'a>(repair: Option<&'a str>, json: bool, image: &'a str) -> Vec<&'a str> {
    let mut args = vec!["check"];
    if let Some(mode) = repair {
        args.extend(["-r", mode]);
    }
    if json {
        args.extend(["--output", "json"]);
    }
    args.push(image);
    args
}

/// What we print instead of qemu-img's output, where we differ on purpose: stdout without
/// the end offset, and the exit code.
fn expected_difference(image: &str, repair: bool, json: bool) -> Option<(String, i32)> {
    let repaired = |leaks: u64, corruptions: u64, stats: &str| {
        format!(
            "The following inconsistencies were found and repaired:\n\n    {leaks} leaked clusters\n    \
             {corruptions} corruptions\n\nDouble checking the fixed image now...\n\
             No errors were found on the image.\n{stats}\n"
        )
    };
    let json_text = |fields: &[(&str, u64)], fragmented: u64| {
        let mut text = String::from("{\n");
        for (key, value) in fields {
            text.push_str(&format!("    \"{key}\": {value},\n"));
        }
        text.push_str(&format!(
            "    \"filename\": \"{image}\",\n    \"format\": \"qed\""
        ));
        if fragmented > 0 {
            text.push_str(&format!(",\n    \"fragmented-clusters\": {fragmented}"));
        }
        text.push_str("\n}\n");
        text
    };
    match (image, repair, json) {
        // QEMU's table-size-1 bug (§10 of the reference): it computes the L1 offset check
        // wrongly and refuses the image; it is valid and empty.
        ("table-size-1.qed", _, false) => Some(("No errors were found on the image.\n".into(), 0)),
        ("table-size-1.qed", _, true) => Some((
            "{\n    \"total-clusters\": 256,\n    \"check-errors\": 0,\n    \
             \"filename\": \"table-size-1.qed\",\n    \"format\": \"qed\"\n}\n"
                .into(),
            0,
        )),
        // QEMU never repairs a cluster referenced twice; we give each reference its own copy
        // (under -r leaks too: for QED both modes repair everything, as QEMU's do).
        ("dup-ref.qed", true, false) => Some((
            repaired(
                0,
                1,
                "3/256 = 1.17% allocated, 33.33% fragmented, 0.00% compressed clusters",
            ),
            0,
        )),
        ("dup-ref.qed", true, true) => Some((
            json_text(
                &[
                    ("total-clusters", 256),
                    ("corruptions-fixed", 1),
                    ("check-errors", 0),
                    ("allocated-clusters", 3),
                ],
                1,
            ),
            0,
        )),
        // QEMU clears the invalid L1 entry and leaves the orphaned table and data cluster
        // (5 clusters) leaked; we reclaim them.
        ("l1-invalid.qed", true, false) => Some((
            repaired(
                5,
                1,
                "1/4096 = 0.02% allocated, 0.00% fragmented, 0.00% compressed clusters",
            ),
            0,
        )),
        ("l1-invalid.qed", true, true) => Some((
            json_text(
                &[
                    ("total-clusters", 4096),
                    ("corruptions-fixed", 1),
                    ("check-errors", 0),
                    ("leaks-fixed", 5),
                    ("allocated-clusters", 1),
                ],
                0,
            ),
            0,
        )),
        // QEMU only counts leaks; we reclaim them (here by truncating the file).
        ("leak.qed", true, false) => Some((
            repaired(
                1,
                0,
                "2/256 = 0.78% allocated, 0.00% fragmented, 0.00% compressed clusters",
            ),
            0,
        )),
        ("leak.qed", true, true) => Some((
            json_text(
                &[
                    ("total-clusters", 256),
                    ("check-errors", 0),
                    ("leaks-fixed", 1),
                    ("allocated-clusters", 2),
                ],
                0,
            ),
            0,
        )),
        _ => None,
    }
}

#[test]
fn output_and_exit_codes_match_qemu_img_on_fixtures() {
    if !have("qemu-img") {
        return;
    }
    let Some(names) = fixture_names() else { return };
    for image in &names {
        for repair in [None, Some("leaks"), Some("all")] {
            for json in [false, true] {
                let args = check_args(repair, json, image);
                let ours = scratch(image);
                let theirs = scratch(image);
                let m = qed(ours.path(), &args);
                let q = run_in(theirs.path(), "qemu-img", &args);
                let (text, end) = split_end_offset(&stdout(&m));
                let expected = expected_difference(image, repair.is_some(), json)
                    .unwrap_or_else(|| (stdout(&q), code(&q)));
                assert_eq!(text, expected.0, "qed {args:?}; stderr: {}", stderr(&m));
                assert_eq!(code(&m), expected.1, "qed {args:?}: {}", stderr(&m));
                if code(&m) == 1 || code(&m) == 63 {
                    // Could not open / not checkable: nothing on stdout, the reason on stderr.
                    assert!(stdout(&m).is_empty(), "{args:?}");
                    assert!(stderr(&m).starts_with("qed: "), "{args:?}: {}", stderr(&m));
                } else {
                    // The end offset we add is the file length after the check.
                    let len = std::fs::metadata(ours.path().join(image)).unwrap().len();
                    assert_eq!(end, Some(len), "{args:?}: image-end-offset");
                }
            }
        }
    }
}

#[test]
fn checking_without_repair_changes_nothing() {
    let Some(names) = fixture_names() else { return };
    for image in &names {
        let dir = scratch(image);
        let path = dir.path().join(image);
        let before = std::fs::read(&path).unwrap();
        for args in [
            vec!["check", image.as_str()],
            vec!["check", "-U", "--output", "json", image.as_str()],
            vec!["check", "-q", image.as_str()],
        ] {
            qed(dir.path(), &args);
            assert!(
                std::fs::read(&path).unwrap() == before,
                "{args:?} modified {image}"
            );
        }
    }
}

/// NEED_CHECK is bit 1 of the features field (header bytes 16..24).
fn need_check(path: &Path) -> bool {
    std::fs::read(path).unwrap()[16] & 2 != 0
}

#[test]
fn dirty_images_are_reported_not_repaired_without_r() {
    let Some(_) = fixture_names() else { return };
    let dir = scratch("dirty-invalid-l2.qed");
    let path = dir.path().join("dirty-invalid-l2.qed");
    assert!(need_check(&path));
    let m = qed(dir.path(), &["check", "dirty-invalid-l2.qed"]);
    assert_eq!(code(&m), 2, "{}", stderr(&m));
    assert!(need_check(&path), "the flag stays without -r");
    // With -r the writable open repairs it; what that repair fixed is what we report.
    let m = qed(
        dir.path(),
        &[
            "check",
            "-r",
            "leaks",
            "--output",
            "json",
            "dirty-invalid-l2.qed",
        ],
    );
    assert_eq!(code(&m), 0, "{}", stderr(&m));
    assert!(
        stdout(&m).contains("\"corruptions-fixed\": 1,"),
        "{}",
        stdout(&m)
    );
    assert!(!need_check(&path), "-r clears the flag");
    let m = qed(dir.path(), &["check", "dirty-invalid-l2.qed"]);
    assert_eq!(code(&m), 0, "{}", stdout(&m));
}

#[test]
fn repaired_images_pass_qemu_img_check_and_keep_qemus_guest_view() {
    if !have("qemu-img") {
        return;
    }
    let Some(_) = fixture_names() else { return };
    for image in [
        "dirty-invalid-l2.qed",
        "dup-ref.qed",
        "l1-invalid.qed",
        "leak.qed",
        "truncated-cluster.qed",
    ] {
        for mode in ["leaks", "all"] {
            let ours = scratch(image);
            let theirs = scratch(image);
            let m = qed(ours.path(), &["check", "-r", mode, image]);
            assert_eq!(
                code(&m),
                0,
                "{image} -r {mode}: {}{}",
                stdout(&m),
                stderr(&m)
            );
            let q = run_in(ours.path(), "qemu-img", &["check", image]);
            assert_eq!(
                code(&q),
                0,
                "qemu-img check after our -r {mode} on {image}: {}",
                stdout(&q)
            );
            let m = qed(ours.path(), &["check", image]);
            assert_eq!(
                code(&m),
                0,
                "qed check after -r {mode} on {image}: {}",
                stdout(&m)
            );
            // The guest sees what it sees after QEMU's repair (a duplicate keeps its data,
            // reclaimed clusters were unreferenced).
            run_in(theirs.path(), "qemu-img", &["check", "-r", mode, image]);
            let ours_path = ours.path().join(image);
            let theirs_path = theirs.path().join(image);
            let c = run_in(
                ours.path(),
                "qemu-img",
                &[
                    "compare",
                    "-f",
                    "qed",
                    "-F",
                    "qed",
                    ours_path.to_str().unwrap(),
                    theirs_path.to_str().unwrap(),
                ],
            );
            assert_eq!(
                code(&c),
                0,
                "{image} -r {mode}: {}{}",
                stdout(&c),
                stderr(&c)
            );
        }
    }
}

#[test]
fn quiet_prints_nothing_but_keeps_the_exit_code() {
    let Some(_) = fixture_names() else { return };
    for (image, rc) in [
        ("basic-64k.qed", 0),
        ("dup-ref.qed", 2),
        ("leak.qed", 3),
        ("l1-invalid.qed", 2),
    ] {
        let dir = scratch(image);
        for json in [false, true] {
            let mut args = vec!["check", "-q"];
            if json {
                args.extend(["--output", "json"]);
            }
            args.push(image);
            let m = qed(dir.path(), &args);
            assert_eq!(code(&m), rc, "{args:?}");
            assert!(stdout(&m).is_empty(), "{args:?}: {}", stdout(&m));
            assert!(stderr(&m).is_empty(), "{args:?}: {}", stderr(&m));
        }
    }
    let dir = scratch("leak.qed");
    let m = qed(dir.path(), &["check", "-q", "-r", "all", "leak.qed"]);
    assert_eq!(code(&m), 0);
    assert!(stdout(&m).is_empty());
}

#[test]
fn open_failures_exit_1() {
    let Some(_) = fixture_names() else { return };
    let dir = scratch("basic-64k.qed");
    let m = qed(dir.path(), &["check", "-U", "-r", "all", "basic-64k.qed"]);
    assert_eq!(code(&m), 1);
    assert_eq!(
        stderr(&m),
        "qed: Could not open 'basic-64k.qed': force-share=on can only be used with read-only images\n"
    );
    let m = qed(dir.path(), &["check", "missing.qed"]);
    assert_eq!(code(&m), 1);
    assert!(stderr(&m).starts_with("qed: Could not open 'missing.qed': "));
    assert!(stdout(&m).is_empty());
    // As qemu-img: the backing chain is opened too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(FIXTURES).join("backing-overlay.qed"),
        dir.path().join("o.qed"),
    )
    .unwrap();
    let m = qed(dir.path(), &["check", "o.qed"]);
    assert_eq!(code(&m), 1, "{}", stdout(&m));
    if have("qemu-img") {
        assert_eq!(
            code(&run_in(dir.path(), "qemu-img", &["check", "o.qed"])),
            1
        );
    }
}

#[test]
fn raw_images_have_no_check() {
    let Some(_) = fixture_names() else { return };
    let dir = scratch("basic-64k.qed");
    for args in [
        vec!["check", "backing-base.raw"],
        vec!["check", "-f", "raw", "basic-64k.qed"],
        vec!["check", "-f", "raw", "-r", "all", "basic-64k.qed"],
        vec!["check", "--output", "json", "backing-base.raw"],
    ] {
        let m = qed(dir.path(), &args);
        assert_eq!(code(&m), 63, "{args:?}");
        assert!(stdout(&m).is_empty());
        assert_eq!(
            stderr(&m),
            "qed: This image format does not support checks\n"
        );
        if have("qemu-img") {
            let q = run_in(dir.path(), "qemu-img", &args);
            assert_eq!(code(&q), 63, "qemu-img {args:?}");
        }
    }
}

#[test]
fn no_phantom_leaks_in_large_images() {
    if !(have("qemu-img") && have("qemu-io")) {
        return;
    }
    // 24 MiB of data in 4 KiB clusters: 6161 clusters in the file. QEMU's leak count divides
    // by cluster_size − 1 and reports one cluster (index 4095) as leaked; the image is
    // consistent, and our exact count says so.
    let dir = tempfile::tempdir().unwrap();
    let q = run_in(
        dir.path(),
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-o",
            "cluster_size=4096",
            "p.qed",
            "64M",
        ],
    );
    assert_eq!(code(&q), 0, "{}", stderr(&q));
    let commands: Vec<String> = (0..24)
        .map(|i| format!("write -P {} {i}M 1M", i + 1))
        .collect();
    let mut args = vec!["-f", "qed"];
    for c in &commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push("p.qed");
    let q = run_in(dir.path(), "qemu-io", &args);
    assert_eq!(code(&q), 0, "{}", stderr(&q));
    let stats = "6144/16384 = 37.50% allocated, 0.05% fragmented, 0.00% compressed clusters\n";
    let q = run_in(dir.path(), "qemu-img", &["check", "p.qed"]);
    assert_eq!(code(&q), 3);
    assert_eq!(
        stdout(&q),
        format!(
            "\n1 leaked clusters were found on the image.\n\
             This means waste of disk space, but no harm to data.\n{stats}"
        )
    );
    let m = qed(dir.path(), &["check", "p.qed"]);
    assert_eq!(code(&m), 0);
    assert_eq!(
        stdout(&m),
        format!("No errors were found on the image.\n{stats}Image end offset: 25235456\n")
    );
}

//! `qed map` prints what `qemu-img map` prints, byte for byte, in JSON and human form, on
//! QEMU's fixtures and on images made at test time (backing chains, zero clusters, discarded
//! ranges, raw files with holes), whole and in windows.

mod common;

use common::*;

/// Images QEMU cannot open (on purpose or through its bugs).
const QEMU_REFUSES: &[&str] = &["table-size-1.qed", "unknown-feature.qed"];

/// Runs `map ARGS` through both tools and asserts the same stdout and exit code.
fn assert_same_map(dir: &std::path::Path, args: &[&str]) {
    let mut full = vec!["map"];
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
}

#[test]
fn map_equals_qemu_img_on_fixtures() {
    if !have("qemu-img") {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    for image in images(dir) {
        if QEMU_REFUSES.contains(&image.as_str()) {
            continue;
        }
        for output in ["json", "human"] {
            // Corrupt fixtures fail part way: the entries printed before must agree too.
            assert_same_map(dir, &["--output", output, &image]);
        }
    }
}

#[test]
fn map_equals_qemu_img_on_chains_holes_and_windows() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    for image in made_images(dir) {
        for window in [
            &[][..],
            &["--start-offset", "5000"],
            &["-s", "4k", "-l", "100k"],
            &["--max-length", "1"],
            &["-s", "1M", "-l", "3M"],
            &["-s", "2G"],
        ] {
            for output in ["json", "human"] {
                let mut args = vec!["--output", output];
                args.extend_from_slice(window);
                args.push(&image);
                assert_same_map(dir, &args);
            }
        }
        let mut formatted = vec!["-f"];
        formatted.push(if image.ends_with(".raw") {
            "raw"
        } else {
            "qed"
        });
        formatted.extend(["--output=json", &image]);
        assert_same_map(dir, &formatted);
    }
}

#[test]
fn arguments_are_checked_as_qemu_img_checks_them() {
    if !have("qemu-img") {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    for args in [
        &["-s", "-5", "basic-64k.qed"][..],
        &["-l", "12x", "basic-64k.qed"],
        &["missing.qed"],
    ] {
        let mut full = vec!["map"];
        full.extend_from_slice(args);
        let q = run_in(dir, "qemu-img", &full);
        let m = qed(dir, &full);
        assert_eq!(code(&m), code(&q), "{full:?}");
        assert_eq!(code(&m), 1, "{full:?}");
        let message = |text: &str| {
            text.lines()
                .next()
                .unwrap_or("")
                .split_once(": ")
                .map(|(_, rest)| rest.to_string())
                .unwrap_or_default()
        };
        if args[0] != "missing.qed" {
            assert_eq!(message(&stderr(&m)), message(&stderr(&q)), "{full:?}");
        }
    }
}

#[test]
fn map_of_the_basic_fixture_is_as_its_readme_says() {
    let Some(dir) = fixtures() else { return };
    let out = qed(dir.path(), &["map", "--output=json", "basic-64k.qed"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let expected = "\
[{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 327680},
{ \"start\": 65536, \"length\": 983040, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false},
{ \"start\": 1048576, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 655360},
{ \"start\": 1114112, \"length\": 983040, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false},
{ \"start\": 2097152, \"length\": 131072, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false, \"compressed\": false},
{ \"start\": 2228224, \"length\": 917504, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false},
{ \"start\": 3145728, \"length\": 196608, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 720896},
{ \"start\": 3342336, \"length\": 13434880, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false}]
";
    assert_eq!(stdout(&out), expected);
    let human = qed(dir.path(), &["map", "basic-64k.qed"]);
    assert_eq!(
        stdout(&human),
        "Offset          Length          Mapped to       File\n\
         0               0x10000         0x50000         basic-64k.qed\n\
         0x100000        0x10000         0xa0000         basic-64k.qed\n\
         0x300000        0x30000         0xb0000         basic-64k.qed\n"
    );
    // An empty window prints one entry of length 0, as qemu-img does.
    let empty = qed(
        dir.path(),
        &["map", "--output=json", "-s", "20M", "basic-64k.qed"],
    );
    assert_eq!(
        stdout(&empty),
        "[{ \"start\": 20971520, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \
         \"data\": false, \"compressed\": false}]\n"
    );
}

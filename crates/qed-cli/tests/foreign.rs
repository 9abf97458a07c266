//! qcow2 and VMDK through `convert` and `compare`: on sources made by qemu-img and qemu-io,
//! `qed convert` writes what `qemu-img convert` writes (by `qemu-img compare`), every qcow2 and
//! QED file it writes is clean by `qemu-img check`, `qed compare` gives qemu-img's verdicts,
//! and qcow2 → QED → qcow2 comes back identical.

mod common;

use std::path::Path;

use common::*;

/// The qcow2 and VMDK sources, made with qemu-img and qemu-io in `dir`.
fn make_sources(dir: &Path) -> Vec<String> {
    let img = |args: &[&str]| {
        run_ok(dir, "qemu-img", args);
    };
    // 64k clusters: data, a zero cluster never allocated, a zero cluster that keeps its
    // allocation, a partial cluster at an odd offset, unallocated ranges between.
    img(&["create", "-q", "-f", "qcow2", "plain.qcow2", "8M"]);
    qemu_io_ok(
        dir,
        "qcow2",
        "plain.qcow2",
        &[
            "write -P 1 0 100k",
            "write -z 1M 64k",
            "write -P 2 2M 128k",
            "write -z 2M 64k",
            "write -P 3 5243880 3000",
            "write -P 4 8128k 64k",
        ],
    );
    // 4k clusters and L2 tables of 2 MiB coverage.
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "small.qcow2",
        "6M",
    ]);
    qemu_io_ok(
        dir,
        "qcow2",
        "small.qcow2",
        &["write -P 5 2044k 8k", "write -z 3M 1M", "write -P 6 4M 4k"],
    );
    // A chain: the top is larger than its backing file, holds zeros over backing data and
    // data past the backing file's end.
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "base.qcow2",
        "4M",
    ]);
    qemu_io_ok(
        dir,
        "qcow2",
        "base.qcow2",
        &["write -P 7 0 1M", "write -P 8 3M 512k"],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "6M",
    ]);
    qemu_io_ok(
        dir,
        "qcow2",
        "top.qcow2",
        &["write -P 9 512k 64k", "write -z 0 64k", "write -P 10 5M 4k"],
    );
    // qcow2 version 2 (no zero clusters: zeros are written as data).
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "3M",
    ]);
    qemu_io_ok(
        dir,
        "qcow2",
        "v2.qcow2",
        &["write -P 11 0 100k", "write -z 1M 64k"],
    );
    // Compressed clusters.
    img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "top.qcow2",
        "compressed.qcow2",
    ]);
    // A sparse raw backing file and a QED one.
    std::fs::File::create(dir.join("sparse.raw"))
        .and_then(|f| f.set_len(3 << 20))
        .expect("sparse.raw");
    qemu_io_ok(dir, "raw", "sparse.raw", &["write -P 12 1M 256k"]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "sparse.raw",
        "-F",
        "raw",
        "over-raw.qcow2",
        "4M",
    ]);
    qemu_io_ok(
        dir,
        "qcow2",
        "over-raw.qcow2",
        &["write -z 1M 64k", "write -P 13 3M 64k"],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4k",
        "base.qed",
        "2M",
    ]);
    qemu_io_ok(
        dir,
        "qed",
        "base.qed",
        &["write -P 14 0 256k", "write -z 64k 4k"],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qed",
        "-F",
        "qed",
        "over-qed.qcow2",
        "2M",
    ]);
    qemu_io_ok(dir, "qcow2", "over-qed.qcow2", &["write -P 15 128k 64k"]);
    // VMDK descriptor files with flat extents.
    img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        "flat.vmdk",
        "4M",
    ]);
    qemu_io_ok(
        dir,
        "vmdk",
        "flat.vmdk",
        &["write -P 16 100k 200k", "write -P 17 3M 4k"],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentFlat",
        "split.vmdk",
        "2M",
    ]);
    qemu_io_ok(dir, "vmdk", "split.vmdk", &["write -P 18 1M 512"]);
    [
        "plain.qcow2",
        "small.qcow2",
        "top.qcow2",
        "base.qcow2",
        "v2.qcow2",
        "compressed.qcow2",
        "over-raw.qcow2",
        "over-qed.qcow2",
        "flat.vmdk",
        "split.vmdk",
    ]
    .map(String::from)
    .to_vec()
}

/// Runs `convert ARGS SRC OUT` through qed (as `qed-OUT`) and qemu-img (as `qemu-OUT`);
/// asserts that qed's output reads as the source and as qemu-img's, and that `qemu-img check`
/// finds it clean when it is an image.
fn convert_both(dir: &Path, args: &[&str], src: &str, out: &str) {
    let ours = format!("qed-{out}");
    let theirs = format!("qemu-{out}");
    for (program, target) in [(env!("CARGO_BIN_EXE_qed"), &ours), ("qemu-img", &theirs)] {
        let mut full = vec!["convert"];
        full.extend_from_slice(args);
        full.extend([src, target.as_str()]);
        run_ok(dir, program, &full);
    }
    for other in [src, theirs.as_str()] {
        let compared = run_in(dir, "qemu-img", &["compare", other, &ours]);
        assert_eq!(
            code(&compared),
            0,
            "{args:?} {src} vs {other}: {}{}",
            stdout(&compared),
            stderr(&compared)
        );
    }
    if !out.ends_with(".raw") {
        assert_qemu_check_clean(dir, &ours);
    }
}

#[test]
fn conversions_read_as_qemu_img_s_and_are_clean() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    for src in make_sources(dir) {
        for (args, out) in [
            (&["-O", "qed"][..], "out.qed"),
            (
                &["-O", "qed", "-o", "cluster_size=4k,table_size=2"],
                "out.qed",
            ),
            (&["-O", "qcow2"], "out.qcow2"),
            (&["-O", "qcow2", "-o", "cluster_size=4k"], "out.qcow2"),
            (&["-O", "qcow2", "-S", "0"], "out.qcow2"),
            (&["-O", "raw"], "out.raw"),
        ] {
            convert_both(dir, args, &src, out);
        }
    }
    // A QED source into qcow2.
    let qed_bin = env!("CARGO_BIN_EXE_qed");
    run_ok(
        dir,
        qed_bin,
        &["convert", "-O", "qed", "top.qcow2", "top.qed"],
    );
    convert_both(dir, &["-O", "qcow2"], "top.qed", "from-qed.qcow2");
    // The explicit source format is taken, as probing would take it.
    convert_both(dir, &["-f", "qcow2", "-O", "qed"], "top.qcow2", "given.qed");
    convert_both(
        dir,
        &["-f", "vmdk", "-O", "qcow2"],
        "flat.vmdk",
        "given.qcow2",
    );
}

#[test]
fn a_sparse_source_stays_sparse() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    make_sources(dir);
    let qed_bin = env!("CARGO_BIN_EXE_qed");
    // top.qcow2 holds 64k, 4k and a zero cluster; its backing file 1.5 MiB. A QED copy holds
    // what the chain reads as data: no more than qemu-img's.
    for (args, out) in [
        (&["-O", "qed"][..], "sparse.qed"),
        (&["-O", "qcow2"], "sparse.qcow2"),
    ] {
        convert_both(dir, args, "top.qcow2", out);
        let ours = file_len(dir, &format!("qed-{out}"));
        let theirs = file_len(dir, &format!("qemu-{out}"));
        assert!(ours <= theirs + (256 << 10), "{out}: {ours} > {theirs}");
        assert!(ours < 3 << 20, "{out}: {ours} bytes for 1.6 MiB of data");
    }
    // A 1 TiB qcow2 with one data cluster converts at once, both ways.
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "huge.qcow2", "1T"],
    );
    qemu_io_ok(dir, "qcow2", "huge.qcow2", &["write -P 1 512G 64k"]);
    run_ok(
        dir,
        qed_bin,
        &["convert", "-O", "qed", "huge.qcow2", "huge.qed"],
    );
    assert!(file_len(dir, "huge.qed") < 4 << 20);
    run_ok(
        dir,
        qed_bin,
        &["convert", "-O", "qcow2", "huge.qed", "huge-back.qcow2"],
    );
    assert!(file_len(dir, "huge-back.qcow2") < 4 << 20);
    assert_qemu_check_clean(dir, "huge.qed");
    assert_qemu_check_clean(dir, "huge-back.qcow2");
    run_ok(
        dir,
        "qemu-img",
        &["compare", "huge.qcow2", "huge-back.qcow2"],
    );
}

#[test]
fn qcow2_targets_with_a_backing_file() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    make_sources(dir);
    let qed_bin = env!("CARGO_BIN_EXE_qed");
    // The source's own backing file: only the top's clusters are written.
    run_ok(
        dir,
        qed_bin,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "diff.qcow2",
        ],
    );
    assert_qemu_check_clean(dir, "diff.qcow2");
    run_ok(dir, "qemu-img", &["compare", "top.qcow2", "diff.qcow2"]);
    let info = stdout(&run_ok(
        dir,
        "qemu-img",
        &["info", "--output=json", "diff.qcow2"],
    ));
    assert!(
        info.contains("\"backing-filename\": \"base.qcow2\""),
        "{info}"
    );
    assert!(
        info.contains("\"backing-filename-format\": \"qcow2\""),
        "{info}"
    );
    let map = stdout(&run_ok(
        dir,
        "qemu-img",
        &["map", "--output=json", "diff.qcow2"],
    ));
    let own: Vec<&str> = map.lines().filter(|l| l.contains("\"depth\": 0")).collect();
    // The zero cluster over backing data, 64k of data, 4k of data past the base's end.
    assert!(
        own.iter()
            .any(|l| l.contains("\"start\": 0, \"length\": 65536") && l.contains("\"zero\": true")),
        "{map}"
    );
    assert!(
        own.iter()
            .any(|l| l.contains("\"start\": 524288, \"length\": 65536")),
        "{map}"
    );
    let data: Vec<&&str> = own
        .iter()
        .filter(|l| l.contains("\"data\": true"))
        .collect();
    assert!(
        data.len() <= 3,
        "only the top's clusters are written: {map}"
    );
    // A flat source over a backing file it does not name: only what differs is written. The
    // backing file may be QED, and the format probed.
    run_ok(
        dir,
        qed_bin,
        &["convert", "-O", "qed", "over-qed.qcow2", "flat.qed"],
    );
    let out = run_ok(
        dir,
        qed_bin,
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-B",
            "base.qed",
            "flat.qed",
            "rebased.qcow2",
        ],
    );
    assert!(
        stderr(&out).contains("detected format qed"),
        "{}",
        stderr(&out)
    );
    assert_qemu_check_clean(dir, "rebased.qcow2");
    run_ok(
        dir,
        "qemu-img",
        &["compare", "over-qed.qcow2", "rebased.qcow2"],
    );
    let map = stdout(&run_ok(
        dir,
        "qemu-img",
        &["map", "--output=json", "rebased.qcow2"],
    ));
    let own_data: u64 = map
        .lines()
        .filter(|l| l.contains("\"depth\": 0") && l.contains("\"data\": true"))
        .map(|l| {
            let length = l.split("\"length\": ").nth(1).expect("length");
            length[..length.find(',').expect("comma")]
                .parse::<u64>()
                .expect("number")
        })
        .sum();
    assert_eq!(own_data, 64 << 10, "{map}");
}

#[test]
fn into_an_existing_qcow2_image() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    make_sources(dir);
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "full.qcow2", "8M"],
    );
    qemu_io_ok(dir, "qcow2", "full.qcow2", &["write -P 0x77 0 8M"]);
    run_ok(
        dir,
        env!("CARGO_BIN_EXE_qed"),
        &["convert", "-n", "-O", "qcow2", "plain.qcow2", "full.qcow2"],
    );
    run_ok(dir, "qemu-img", &["compare", "plain.qcow2", "full.qcow2"]);
    assert_qemu_check_clean(dir, "full.qcow2");
}

#[test]
fn round_trip_qcow2_qed_qcow2() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    let qed_bin = env!("CARGO_BIN_EXE_qed");
    for src in make_sources(dir) {
        if src.ends_with(".vmdk") {
            continue;
        }
        run_ok(dir, qed_bin, &["convert", "-O", "qed", &src, "trip.qed"]);
        run_ok(
            dir,
            qed_bin,
            &["convert", "-O", "qcow2", "trip.qed", "trip.qcow2"],
        );
        assert_qemu_check_clean(dir, "trip.qed");
        assert_qemu_check_clean(dir, "trip.qcow2");
        for program in ["qemu-img", qed_bin] {
            let out = run_in(dir, program, &["compare", &src, "trip.qcow2"]);
            assert_eq!(
                (code(&out), stdout(&out).as_str()),
                (0, "Images are identical.\n"),
                "{program} {src}: {}",
                stderr(&out)
            );
        }
        // A second trip writes the same layout.
        run_ok(
            dir,
            qed_bin,
            &["convert", "-O", "qed", "trip.qcow2", "trip2.qed"],
        );
        run_ok(dir, "qemu-img", &["compare", "-s", "trip.qed", "trip2.qed"]);
        let map = |f: &str| stdout(&run_ok(dir, "qemu-img", &["map", "--output=json", f]));
        assert_eq!(map("trip.qed"), map("trip2.qed"), "{src}");
    }
}

/// Runs `compare ARGS` through both tools; asserts the same stdout and exit code.
fn assert_same_compare(dir: &Path, args: &[&str]) {
    let mut full = vec!["compare"];
    full.extend_from_slice(args);
    let q = run_in(dir, "qemu-img", &full);
    let m = qed(dir, &full);
    assert_eq!(
        (stdout(&m), code(&m)),
        (stdout(&q), code(&q)),
        "{full:?}\nqemu-img stderr: {}\nqed stderr: {}",
        stderr(&q),
        stderr(&m)
    );
}

#[test]
fn compare_verdicts_equal_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    let mut names = make_sources(dir);
    // QED copies (same contents), near copies (one byte changed) and a shorter one.
    for (src, copy) in [
        ("top.qcow2", "top.qed"),
        ("plain.qcow2", "plain.qed"),
        ("flat.vmdk", "flat.qed"),
        ("top.qcow2", "top-nudged.qed"),
        ("plain.qcow2", "plain-nudged.qed"),
    ] {
        run_ok(dir, "qemu-img", &["convert", "-O", "qed", src, copy]);
        names.push(copy.to_string());
    }
    qemu_io_ok(dir, "qed", "top-nudged.qed", &["write -P 0x42 5000123 1"]);
    qemu_io_ok(dir, "qed", "plain-nudged.qed", &["write -P 0 2200000 1"]);
    run_ok(
        dir,
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            "top-nudged.qed",
            "top-nudged.qcow2",
        ],
    );
    names.push("top-nudged.qcow2".into());
    for a in &names {
        for b in &names {
            assert_same_compare(dir, &[a, b]);
        }
    }
    // Strict mode on pairs whose block status qemu-img and imago report alike.
    for (a, b) in [
        ("top.qcow2", "top.qcow2"),
        ("top.qcow2", "top.qed"),
        ("plain.qcow2", "top.qed"),
        ("over-raw.qcow2", "over-raw.qcow2"),
        ("small.qcow2", "small.qcow2"),
        ("top-nudged.qcow2", "top.qcow2"),
    ] {
        assert_same_compare(dir, &["-s", a, b]);
    }
    // A known difference in strict mode (docs/cli.md): imago gives a qcow2 zero cluster that
    // keeps its allocation no host offset, so it compares equal to one that has none; QEMU
    // sees the offset and reports a block status mismatch.
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "za.qcow2", "4M"],
    );
    qemu_io_ok(dir, "qcow2", "za.qcow2", &["write -z 2M 64k"]);
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "zb.qcow2", "4M"],
    );
    qemu_io_ok(
        dir,
        "qcow2",
        "zb.qcow2",
        &["write -P 1 2M 64k", "write -z 2M 64k"],
    );
    let q = run_in(dir, "qemu-img", &["compare", "-s", "za.qcow2", "zb.qcow2"]);
    assert_eq!(
        stdout(&q),
        "Strict mode: Offset 2097152 block status mismatch!\n"
    );
    let m = qed(dir, &["compare", "-s", "za.qcow2", "zb.qcow2"]);
    assert_eq!(stdout(&m), "Images are identical.\n");
    assert_same_compare(dir, &["za.qcow2", "zb.qcow2"]);
    // The verdicts as qemu-img words them.
    let out = qed(dir, &["compare", "top.qcow2", "top-nudged.qed"]);
    assert_eq!(stdout(&out), "Content mismatch at offset 4999680!\n");
    assert_eq!(code(&out), 1);
    let out = qed(
        dir,
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qed",
            "top.qcow2",
            "top.qed",
        ],
    );
    assert_eq!(stdout(&out), "Images are identical.\n");
}

#[test]
fn refusals_are_clear() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    make_sources(dir);
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "vmdk", "sparse.vmdk", "1M"],
    );
    let fails = |args: &[&str], expect: &str| {
        let out = qed(dir, args);
        assert_eq!(code(&out), 1, "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expect),
            "{args:?}: {} does not say {expect:?}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{args:?}");
    };
    // Commands that read only QED and raw images say so rather than take qcow2 for raw.
    for command in [
        &["info", "top.qcow2"][..],
        &["map", "plain.qcow2"],
        &["check", "flat.vmdk"],
        &["io", "-c", "read 0 512", "plain.qcow2"],
    ] {
        fails(command, "images here (convert and compare read them");
    }
    fails(
        &["map", "-f", "qcow2", "plain.qcow2"],
        "invalid value 'qcow2'",
    );
    // ... and `-f raw` still reads the file as raw.
    run_ok(
        dir,
        env!("CARGO_BIN_EXE_qed"),
        &["map", "-f", "raw", "plain.qcow2"],
    );
    fails(
        &["convert", "-O", "vmdk", "plain.qcow2", "o.vmdk"],
        "writing vmdk images",
    );
    fails(
        &["convert", "-O", "qed", "sparse.vmdk", "o.qed"],
        "sparse VMDK files",
    );
    fails(
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "plain.qcow2",
            "o.qcow2",
        ],
        "Cluster size must be a power of two",
    );
    fails(
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "table_size=2",
            "plain.qcow2",
            "o.qcow2",
        ],
        "table_size",
    );
    fails(
        &[
            "convert",
            "-O",
            "qed",
            "-B",
            "base.qcow2",
            "top.qcow2",
            "o.qed",
        ],
        "a qed target's backing file must be qed or raw",
    );
    fails(
        &["convert", "-n", "-O", "vmdk", "plain.qcow2", "flat.vmdk"],
        "writing VMDK images",
    );
    let out = qed(dir, &["compare", "plain.qcow2", "sparse.vmdk"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

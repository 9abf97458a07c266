//! `qed convert` writes images that read the same as their source (by `qemu-img compare`),
//! that `qemu-img check` finds clean, and that are no larger than what `qemu-img convert`
//! writes from the same source; its options and messages are qemu-img's.

mod common;

use std::path::Path;

use common::*;

/// Converts `src` with `args` through both tools (outputs `qed-OUT` and `qemu-OUT`), checks
/// the contents against the source and each QED output with `qemu-img check`, and returns
/// the two output lengths (ours, QEMU's).
fn convert_both(dir: &Path, args: &[&str], src: &str, out: &str) -> (u64, u64) {
    let ours = format!("qed-{out}");
    let theirs = format!("qemu-{out}");
    for (program, target) in [(env!("CARGO_BIN_EXE_qed"), &ours), ("qemu-img", &theirs)] {
        let mut full = vec!["convert"];
        full.extend_from_slice(args);
        full.extend([src, target.as_str()]);
        run_ok(dir, program, &full);
    }
    let compared = run_in(dir, "qemu-img", &["compare", src, &ours]);
    assert_eq!(
        code(&compared),
        0,
        "{args:?} {src}: {}{}",
        stdout(&compared),
        stderr(&compared)
    );
    if out.ends_with(".qed") {
        assert_qemu_check_clean(dir, &ours);
    }
    (file_len(dir, &ours), file_len(dir, &theirs))
}

/// Bytes of data (not holes) in a raw file, as `qemu-img map` sees them.
fn data_bytes(dir: &Path, file: &str) -> u64 {
    let map = stdout(&run_ok(
        dir,
        "qemu-img",
        &["map", "-f", "raw", "--output=json", file],
    ));
    map.lines()
        .filter(|l| l.contains("\"data\": true"))
        .map(|l| {
            let length = l.split("\"length\": ").nth(1).expect("length");
            length[..length.find(',').expect("comma")]
                .parse::<u64>()
                .expect("number")
        })
        .sum()
}

/// Bytes the file occupies on disk.
fn allocated(dir: &Path, file: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir.join(file))
        .expect("metadata")
        .blocks()
        * 512
}

#[test]
fn conversions_read_the_same_are_clean_and_no_larger() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    let mut sources = made_images(dir);
    if let Some(fixtures) = fixtures() {
        // The backing file of header-size-2.qed.
        std::fs::copy(
            fixtures.path().join("backing-base.raw"),
            dir.join("backing-base.raw"),
        )
        .expect("copy backing-base.raw");
        for name in [
            "basic-64k.qed",
            "small-4k.qed",
            "odd-size.qed",
            "zero-size.qed",
            "trailing-garbage.qed",
            "header-size-2.qed",
            "zero-then-partial.qed",
            "dup-ref.qed",
        ] {
            std::fs::copy(fixtures.path().join(name), dir.join(name)).expect("copy fixture");
            sources.push(name.to_string());
        }
    }
    for src in &sources {
        for args in [
            &["-O", "qed"][..],
            &["-O", "qed", "-o", "cluster_size=4k,table_size=2"],
            &["-O", "qed", "-S", "64k"],
        ] {
            let (ours, theirs) = convert_both(dir, args, src, "out.qed");
            assert!(
                ours <= theirs,
                "{src} {args:?}: {ours} bytes, qemu-img {theirs}"
            );
        }
        convert_both(dir, &["-O", "raw"], src, "out.raw");
        assert!(
            data_bytes(dir, "qed-out.raw") <= data_bytes(dir, "qemu-out.raw"),
            "{src}: raw output holds more data than qemu-img's"
        );
    }
}

#[test]
fn fully_allocated_with_s0() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    made_images(dir);
    let (ours, theirs) = convert_both(dir, &["-O", "qed", "-S", "0"], "top.qed", "full.qed");
    assert_eq!(ours, theirs);
    let map = qed(dir, &["map", "--output=json", "qed-full.qed"]);
    let text = stdout(&map);
    assert_eq!(text.lines().count(), 1, "one data extent: {text}");
    assert!(text.contains("\"data\": true"), "{text}");
}

#[test]
fn backing_file_gets_only_what_differs() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    made_images(dir);
    run_ok(
        dir,
        "qemu-img",
        &["convert", "-O", "qed", "top.qed", "flat.qed"],
    );
    for (src, args) in [
        // The source's own backing file: nothing it leaves there is read.
        ("top.qed", &["-O", "qed", "-B", "mid.qed", "-F", "qed"][..]),
        (
            "top.qed",
            &[
                "-O",
                "qed",
                "-o",
                "cluster_size=4k",
                "-B",
                "mid.qed",
                "-F",
                "qed",
            ],
        ),
        // A flat source over a backing file it does not name: only the differences go in.
        (
            "flat.qed",
            &[
                "-O",
                "qed",
                "-o",
                "cluster_size=4k",
                "-B",
                "mid.qed",
                "-F",
                "qed",
            ],
        ),
        (
            "over-raw.qed",
            &[
                "-O",
                "qed",
                "-o",
                "cluster_size=4k,backing_file=sparse.raw,backing_fmt=raw",
            ],
        ),
    ] {
        let (ours, theirs) = convert_both(dir, args, src, "backed.qed");
        assert!(ours <= theirs, "{src} {args:?}: {ours} > {theirs}");
        let info = run_ok(
            dir,
            "qemu-img",
            &["info", "--output=json", "qed-backed.qed"],
        );
        assert!(stdout(&info).contains("\"backing-filename\""), "{args:?}");
    }
    // The flat source over mid.qed holds exactly top.qed's own clusters: 4k at 4k, the zero
    // cluster at 1000k reads zeros below too, and 4k at 2500k.
    run_ok(
        dir,
        env!("CARGO_BIN_EXE_qed"),
        &[
            "convert",
            "-O",
            "qed",
            "-o",
            "cluster_size=4k",
            "-B",
            "mid.qed",
            "-F",
            "qed",
            "flat.qed",
            "diff.qed",
        ],
    );
    let map = stdout(&run_ok(
        dir,
        "qemu-img",
        &["map", "--output=json", "diff.qed"],
    ));
    let own: Vec<&str> = map.lines().filter(|l| l.contains("\"depth\": 0")).collect();
    assert!(
        own.iter()
            .any(|l| l.contains("\"start\": 4096, \"length\": 4096")),
        "{map}"
    );
    assert!(
        own.iter()
            .any(|l| l.contains("\"start\": 2560000, \"length\": 4096")),
        "{map}"
    );
    assert_eq!(
        own.iter().filter(|l| l.contains("\"data\": true")).count(),
        2,
        "{map}"
    );
}

#[test]
fn into_existing_images() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    made_images(dir);
    // -n into a QED image of the same size full of other data: everything is overwritten.
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
            "full.qed",
            "3M",
        ],
    );
    qemu_io_ok(dir, "qed", "full.qed", &["write -P 0x77 0 3M"]);
    run_ok(
        dir,
        env!("CARGO_BIN_EXE_qed"),
        &["convert", "-n", "-O", "qed", "top.qed", "full.qed"],
    );
    run_ok(dir, "qemu-img", &["compare", "top.qed", "full.qed"]);
    assert_qemu_check_clean(dir, "full.qed");
    // --target-is-zero into a fresh one: zero ranges are skipped, nothing else changes.
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qed", "fresh.qed", "3M"],
    );
    run_ok(
        dir,
        env!("CARGO_BIN_EXE_qed"),
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-O",
            "qed",
            "top.qed",
            "fresh.qed",
        ],
    );
    run_ok(dir, "qemu-img", &["compare", "top.qed", "fresh.qed"]);
    assert_qemu_check_clean(dir, "fresh.qed");
    // -n into a raw file (the default -O).
    std::fs::File::create(dir.join("existing.raw"))
        .and_then(|f| f.set_len(3 << 20))
        .expect("existing.raw");
    run_ok(
        dir,
        env!("CARGO_BIN_EXE_qed"),
        &["convert", "-n", "top.qed", "existing.raw"],
    );
    run_ok(dir, "qemu-img", &["compare", "top.qed", "existing.raw"]);
    // Too small a target is refused by both.
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qed", "small.qed", "1M"],
    );
    for program in [env!("CARGO_BIN_EXE_qed"), "qemu-img"] {
        let out = run_in(
            dir,
            program,
            &["convert", "-n", "-O", "qed", "top.qed", "small.qed"],
        );
        assert_eq!(code(&out), 1, "{program}");
        assert!(
            stderr(&out).contains("output file is smaller than input file"),
            "{program}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn several_sources_are_concatenated() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    made_images(dir);
    for (program, out) in [
        (env!("CARGO_BIN_EXE_qed"), "ours.raw"),
        ("qemu-img", "theirs.raw"),
    ] {
        run_ok(
            dir,
            program,
            &[
                "convert",
                "-O",
                "raw",
                "base.qed",
                "sparse.raw",
                "odd.raw",
                out,
            ],
        );
    }
    let ours = std::fs::read(dir.join("ours.raw")).expect("ours");
    let theirs = std::fs::read(dir.join("theirs.raw")).expect("theirs");
    assert!(ours == theirs, "concatenations differ");
    run_ok(
        dir,
        env!("CARGO_BIN_EXE_qed"),
        &["convert", "-O", "qed", "top.qed", "sparse.raw", "cat.qed"],
    );
    assert_qemu_check_clean(dir, "cat.qed");
    run_ok(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "cat.qed", "cat.raw"],
    );
    run_ok(
        dir,
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            "top.qed",
            "sparse.raw",
            "cat-qemu.raw",
        ],
    );
    let a = std::fs::read(dir.join("cat.raw")).expect("cat.raw");
    let b = std::fs::read(dir.join("cat-qemu.raw")).expect("cat-qemu.raw");
    assert!(a == b, "QED concatenation differs");
}

#[test]
fn argument_errors_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    for args in [
        &["-S", "1000", "basic-64k.qed", "o.qed"][..],
        &["-S", "32M", "basic-64k.qed", "o.qed"],
        &["-S", "x", "basic-64k.qed", "o.qed"],
        &["-m", "17", "basic-64k.qed", "o.qed"],
        &["-m", "x", "basic-64k.qed", "o.qed"],
        &["-n", "-o", "cluster_size=4k", "basic-64k.qed", "o.qed"],
        &["--target-is-zero", "basic-64k.qed", "o.qed"],
        &["-O", "qed", "-o", "foo=1", "basic-64k.qed", "o.qed"],
        &[
            "-O",
            "raw",
            "-o",
            "cluster_size=4k",
            "basic-64k.qed",
            "o.raw",
        ],
        &["-O", "qed", "-c", "basic-64k.qed", "o.qed"],
        &["basic-64k.qed"],
        &[
            "-O",
            "qed",
            "-B",
            "chain-base.qed",
            "-F",
            "qed",
            "basic-64k.qed",
            "small-4k.qed",
            "o.qed",
        ],
    ] {
        let mut full = vec!["convert"];
        full.extend_from_slice(args);
        let q = run_in(dir, "qemu-img", &full);
        let m = qed(dir, &full);
        assert_eq!(code(&m), code(&q), "{full:?}: {}", stderr(&m));
        assert_eq!(code(&m), 1, "{full:?}");
        let first = |text: &str| {
            text.lines()
                .next()
                .unwrap_or("")
                .split_once(": ")
                .map(|(_, rest)| rest.to_string())
                .unwrap_or_default()
        };
        assert_eq!(first(&stderr(&m)), first(&stderr(&q)), "{full:?}");
    }
    // A bad cluster size fails the way qemu-img's create does, naming the target.
    let out = qed(
        dir,
        &[
            "convert",
            "-O",
            "qed",
            "-o",
            "cluster_size=3k",
            "basic-64k.qed",
            "o7.qed",
        ],
    );
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).starts_with("qed: o7.qed: error while converting qed: "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_sparse_terabyte_converts_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    let qed_bin = env!("CARGO_BIN_EXE_qed");
    run_ok(
        dir,
        qed_bin,
        &["create", "-q", "-f", "qed", "big.qed", "3T"],
    );
    run_ok(
        dir,
        qed_bin,
        &[
            "io",
            "-c",
            "write -P 0x5a 1T 1M",
            "-c",
            "write -z 2T 64k",
            "big.qed",
        ],
    );
    run_ok(
        dir,
        qed_bin,
        &["convert", "-O", "qed", "big.qed", "copy.qed"],
    );
    // One data megabyte and a few tables: far less than what a dense copy would take.
    assert!(file_len(dir, "copy.qed") < 4 << 20);
    let same = qed(dir, &["compare", "big.qed", "copy.qed"]);
    assert_eq!(stdout(&same), "Images are identical.\n");
    run_ok(
        dir,
        qed_bin,
        &["convert", "-O", "raw", "big.qed", "copy.raw"],
    );
    assert_eq!(file_len(dir, "copy.raw"), 3 << 40);
    assert!(allocated(dir, "copy.raw") < 4 << 20);
    let check = qed(dir, &["check", "copy.qed"]);
    assert_eq!(code(&check), 0, "{}", stdout(&check));
}

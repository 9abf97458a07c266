//! Golden tests: the `qed` command's human and JSON output, byte for byte, against files in
//! `testdata/golden/` (one `<case>.out` per case, its layout in `testdata/README.md`).
//!
//! Each case runs in a scratch directory holding copies of the QEMU-made fixtures and a few
//! images made here with `qed create` / `qed io`, so no QEMU is needed. What depends on the
//! run (the scratch directory, times, rates, the blocks a file occupies) is replaced by
//! placeholders in [`normalise`]. `QED_BLESS=1` writes the files instead of comparing them;
//! a missing file is a failure otherwise.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use common::*;

/// Where the golden files live.
const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/golden");

/// A command line: the arguments of `qed`, `TEST_DIR` standing for the scratch directory.
type Line = &'static [&'static str];

/// One golden case: commands that must succeed first (their output is not recorded), then
/// the command whose stdout, stderr and exit code are compared with `<name>.out`.
struct Case {
    name: &'static str,
    setup: &'static [Line],
    run: Line,
}

/// A case with no setup.
const fn case(name: &'static str, run: Line) -> Case {
    Case {
        name,
        setup: &[],
        run,
    }
}

/// A case with setup commands.
const fn after(name: &'static str, setup: &'static [Line], run: Line) -> Case {
    Case { name, setup, run }
}

/// Images every case finds beside the fixtures, made with `qed` itself: `made.qed` (4 KiB
/// clusters: data, zero clusters, data further on), `made-top.qed` over it (64 KiB clusters,
/// larger than its backing file, data and a zero cluster), `made.raw` (made.qed's contents),
/// `made-diff.qed` (made.qed with one more sector written at 700 KiB).
const MADE: &[Line] = &[
    &["create", "-q", "-o", "cluster_size=4096", "made.qed", "1M"],
    &[
        "io",
        "-c",
        "write -P 0x11 0 64k",
        "-c",
        "write -z 128k 64k",
        "-c",
        "write -P 0x22 600k 8k",
        "made.qed",
    ],
    &[
        "create",
        "-q",
        "-b",
        "made.qed",
        "-F",
        "qed",
        "made-top.qed",
        "2M",
    ],
    &[
        "io",
        "-c",
        "write -P 0x33 4k 4k",
        "-c",
        "write -z 640k 64k",
        "-c",
        "write -P 0x44 1536k 64k",
        "made-top.qed",
    ],
    &["convert", "-O", "raw", "made.qed", "made.raw"],
    &["convert", "-O", "qed", "made.qed", "made-diff.qed"],
    &["io", "-c", "write -P 0x55 700k 512", "made-diff.qed"],
];

/// Every case. Names say the command, the image and the output form (`-json`).
const CASES: &[Case] = &[
    // info
    case("info-basic", &["info", "TEST_DIR/basic-64k.qed"]),
    case(
        "info-basic-json",
        &["info", "--output=json", "TEST_DIR/basic-64k.qed"],
    ),
    case("info-overlay", &["info", "TEST_DIR/backing-overlay.qed"]),
    case(
        "info-overlay-json",
        &["info", "--output=json", "TEST_DIR/backing-overlay.qed"],
    ),
    case("info-dirty", &["info", "dirty-needcheck.qed"]),
    case(
        "info-dirty-json",
        &["info", "--output=json", "dirty-needcheck.qed"],
    ),
    case("info-raw", &["info", "-f", "raw", "backing-base.raw"]),
    case(
        "info-raw-json",
        &["info", "-f", "raw", "--output=json", "backing-base.raw"],
    ),
    case(
        "info-chain",
        &["info", "--backing-chain", "TEST_DIR/chain-top.qed"],
    ),
    case(
        "info-chain-json",
        &[
            "info",
            "--backing-chain",
            "--output=json",
            "TEST_DIR/chain-top.qed",
        ],
    ),
    case(
        "info-chain-raw",
        &["info", "--backing-chain", "backing-overlay.qed"],
    ),
    case(
        "info-chain-raw-json",
        &[
            "info",
            "--backing-chain",
            "--output=json",
            "backing-overlay.qed",
        ],
    ),
    case(
        "info-made-chain",
        &["info", "--backing-chain", "made-top.qed"],
    ),
    case(
        "info-made-chain-json",
        &["info", "--backing-chain", "--output=json", "made-top.qed"],
    ),
    case("info-missing", &["info", "TEST_DIR/missing.qed"]),
    case("info-unknown-feature", &["info", "unknown-feature.qed"]),
    // check
    case("check-clean", &["check", "basic-64k.qed"]),
    case(
        "check-clean-json",
        &["check", "--output=json", "basic-64k.qed"],
    ),
    case("check-empty", &["check", "empty-default.qed"]),
    case(
        "check-empty-json",
        &["check", "--output=json", "empty-default.qed"],
    ),
    case("check-made", &["check", "made-top.qed"]),
    case(
        "check-made-json",
        &["check", "--output=json", "made-top.qed"],
    ),
    case("check-leak", &["check", "leak.qed"]),
    case("check-leak-json", &["check", "--output=json", "leak.qed"]),
    case("check-corrupt", &["check", "dirty-invalid-l2.qed"]),
    case(
        "check-corrupt-json",
        &["check", "--output=json", "dirty-invalid-l2.qed"],
    ),
    case("check-dup-ref", &["check", "dup-ref.qed"]),
    case(
        "check-dup-ref-json",
        &["check", "--output=json", "dup-ref.qed"],
    ),
    case("check-l1-invalid", &["check", "l1-invalid.qed"]),
    case(
        "check-l1-invalid-json",
        &["check", "--output=json", "l1-invalid.qed"],
    ),
    case("check-quiet", &["check", "-q", "leak.qed"]),
    case("check-raw", &["check", "-f", "raw", "backing-base.raw"]),
    case(
        "check-repair-corrupt",
        &["check", "-r", "all", "dirty-invalid-l2.qed"],
    ),
    case(
        "check-repair-corrupt-json",
        &[
            "check",
            "-r",
            "all",
            "--output=json",
            "dirty-invalid-l2.qed",
        ],
    ),
    case("check-repair-leak", &["check", "-r", "leaks", "leak.qed"]),
    case(
        "check-repair-leak-json",
        &["check", "-r", "leaks", "--output=json", "leak.qed"],
    ),
    case(
        "check-repair-l1-invalid",
        &["check", "-r", "all", "l1-invalid.qed"],
    ),
    case(
        "check-repair-l1-invalid-json",
        &["check", "-r", "all", "--output=json", "l1-invalid.qed"],
    ),
    case(
        "check-repair-dup-ref",
        &["check", "-r", "all", "dup-ref.qed"],
    ),
    after(
        "check-after-repair",
        &[&["check", "-q", "-r", "all", "l1-invalid.qed"]],
        &["check", "l1-invalid.qed"],
    ),
    // map
    case("map-basic", &["map", "basic-64k.qed"]),
    case("map-basic-json", &["map", "--output=json", "basic-64k.qed"]),
    case("map-small-4k", &["map", "small-4k.qed"]),
    case(
        "map-small-4k-json",
        &["map", "--output=json", "small-4k.qed"],
    ),
    case("map-overlay", &["map", "TEST_DIR/backing-overlay.qed"]),
    case(
        "map-overlay-json",
        &["map", "--output=json", "backing-overlay.qed"],
    ),
    case("map-chain", &["map", "chain-top.qed"]),
    case("map-chain-json", &["map", "--output=json", "chain-top.qed"]),
    case("map-made-chain", &["map", "made-top.qed"]),
    case(
        "map-made-chain-json",
        &["map", "--output=json", "made-top.qed"],
    ),
    case(
        "map-window",
        &["map", "-s", "1M", "-l", "2M", "basic-64k.qed"],
    ),
    case(
        "map-window-json",
        &[
            "map",
            "--output=json",
            "--start-offset=1M",
            "--max-length=2M",
            "basic-64k.qed",
        ],
    ),
    case(
        "map-zero-size-json",
        &["map", "--output=json", "zero-size.qed"],
    ),
    case("map-corrupt", &["map", "dirty-invalid-l2.qed"]),
    case(
        "map-corrupt-json",
        &["map", "--output=json", "dirty-invalid-l2.qed"],
    ),
    // measure
    case("measure-size", &["measure", "--size", "1G"]),
    case(
        "measure-size-json",
        &["measure", "--output=json", "--size", "1G"],
    ),
    case("measure-raw", &["measure", "-O", "raw", "basic-64k.qed"]),
    case(
        "measure-raw-json",
        &["measure", "--output=json", "-O", "raw", "basic-64k.qed"],
    ),
    case("measure-qed", &["measure", "-O", "qed", "basic-64k.qed"]),
    case(
        "measure-qed-json",
        &["measure", "--output=json", "-O", "qed", "made-top.qed"],
    ),
    case(
        "measure-qed-size",
        &[
            "measure",
            "-O",
            "qed",
            "-o",
            "cluster_size=4096",
            "--size",
            "100M",
        ],
    ),
    // compare
    case(
        "compare-identical",
        &["compare", "basic-64k.qed", "basic-64k.qed"],
    ),
    case("compare-qed-raw", &["compare", "made.qed", "made.raw"]),
    case("compare-differ", &["compare", "made.qed", "made-diff.qed"]),
    case(
        "compare-differ-quiet",
        &["compare", "-q", "made.qed", "made-diff.qed"],
    ),
    case(
        "compare-size-mismatch",
        &["compare", "empty-default.qed", "zero-size.qed"],
    ),
    case(
        "compare-strict-size",
        &["compare", "-s", "empty-default.qed", "zero-size.qed"],
    ),
    case(
        "compare-strict-status",
        &["compare", "-s", "chain-base.qed", "chain-top.qed"],
    ),
    case(
        "compare-missing",
        &["compare", "made.qed", "TEST_DIR/missing.qed"],
    ),
    // create
    case(
        "create-default",
        &["create", "-f", "qed", "TEST_DIR/new.qed", "1M"],
    ),
    case(
        "create-geometry",
        &[
            "create",
            "-f",
            "qed",
            "-o",
            "cluster_size=4096,table_size=2",
            "new.qed",
            "10M",
        ],
    ),
    case(
        "create-backing",
        &[
            "create",
            "-f",
            "qed",
            "-b",
            "chain-base.qed",
            "-F",
            "qed",
            "new.qed",
        ],
    ),
    case(
        "create-backing-raw",
        &[
            "create",
            "-f",
            "qed",
            "-b",
            "backing-base.raw",
            "-F",
            "raw",
            "new.qed",
            "1M",
        ],
    ),
    case(
        "create-quiet",
        &["create", "-q", "-f", "qed", "new.qed", "1M"],
    ),
    after(
        "create-then-info",
        &[&[
            "create",
            "-q",
            "-o",
            "cluster_size=4096,table_size=2",
            "new.qed",
            "10M",
        ]],
        &["info", "--output=json", "new.qed"],
    ),
    // resize
    case("resize-grow", &["resize", "basic-64k.qed", "+1M"]),
    case("resize-shrink-refused", &["resize", "basic-64k.qed", "1M"]),
    case(
        "resize-shrink",
        &["resize", "--shrink", "basic-64k.qed", "1M"],
    ),
    case(
        "resize-raw",
        &["resize", "-f", "raw", "backing-base.raw", "512k"],
    ),
    after(
        "resize-then-info",
        &[&["resize", "-q", "basic-64k.qed", "32M"]],
        &["info", "basic-64k.qed"],
    ),
    // bench (its time masked)
    case("bench-read", &["bench", "-c", "16", "-d", "4", "made.qed"]),
    case(
        "bench-write",
        &[
            "bench",
            "-w",
            "-c",
            "16",
            "-d",
            "2",
            "-s",
            "4k",
            "--flush-interval=4",
            "-o",
            "1M",
            "made-top.qed",
        ],
    ),
    // qed io (qemu-io)
    case(
        "io-read-v",
        &[
            "io",
            "-f",
            "qed",
            "-c",
            "read -v 0 64",
            "-c",
            "read -v 1052600 200",
            "basic-64k.qed",
        ],
    ),
    case(
        "io-read-pattern",
        &[
            "io",
            "-f",
            "qed",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0xcd 1M 4k",
            "-c",
            "read -q -P 0 2M 128k",
            "-c",
            "read -C 3M 192k",
            "basic-64k.qed",
        ],
    ),
    case(
        "io-read-mismatch",
        &[
            "io",
            "-f",
            "qed",
            "-c",
            "read -P 0x11 0 4k",
            "basic-64k.qed",
        ],
    ),
    case(
        "io-read-past-end",
        &["io", "-f", "qed", "-c", "read 16M 512", "basic-64k.qed"],
    ),
    case(
        "io-write",
        &[
            "io",
            "-f",
            "qed",
            "-c",
            "write -P 0x55 0 4k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "writev -P 0x66 128k 4k 4k",
            "-c",
            "aio_write -P 0x77 256k 8k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x77 256k 8k",
            "-c",
            "flush",
            "small-4k.qed",
        ],
    ),
    case("io-map", &["io", "-f", "qed", "-c", "map", "basic-64k.qed"]),
    case(
        "io-map-overlay",
        &["io", "-f", "qed", "-c", "map", "backing-overlay.qed"],
    ),
    case(
        "io-alloc",
        &[
            "io",
            "-f",
            "qed",
            "-c",
            "alloc 0",
            "-c",
            "alloc 0 1M",
            "-c",
            "alloc 2M 128k",
            "-c",
            "alloc 16M",
            "basic-64k.qed",
        ],
    ),
    case(
        "io-info",
        &[
            "io",
            "-f",
            "qed",
            "-c",
            "info",
            "-c",
            "length",
            "-c",
            "truncate 128M",
            "-c",
            "length",
            "small-4k.qed",
        ],
    ),
    case(
        "io-open-missing",
        &["io", "-f", "qed", "-c", "info", "TEST_DIR/missing.qed"],
    ),
];

/// The run-dependent parts of `text` replaced by placeholders, as QEMU's iotests filter them:
/// the scratch directory by `TEST_DIR`; the blocks a file occupies (`disk size`,
/// `actual-size`: they depend on the file system) by `DISK_SIZE`; qemu-io's timing
/// (`... ops; 00.00 sec (...)`, and the `-C` line's time and rates) and bench's run time by
/// `TIME`.
fn normalise(text: &str, dir: &Path) -> String {
    let mut text = text.to_string();
    for d in [
        dir.canonicalize().expect("canonical dir"),
        dir.to_path_buf(),
    ] {
        text = text.replace(&*d.to_string_lossy(), "TEST_DIR");
    }
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let (body, eol) = match line.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (line, ""),
        };
        let indent = &body[..body.len() - body.trim_start().len()];
        let trimmed = body.trim_start();
        let fields: Vec<&str> = body.split(',').collect();
        let body = if let Some((head, _)) = body.split_once(" ops; ") {
            format!("{head} ops; TIME")
        } else if fields.len() == 5 && fields[2].contains(':') {
            format!("{},{},TIME", fields[0], fields[1])
        } else if body.starts_with("Run completed in ") {
            "Run completed in TIME seconds.".to_string()
        } else if trimmed.starts_with("disk size: ") {
            format!("{indent}disk size: DISK_SIZE")
        } else if let Some(rest) = trimmed.strip_prefix("\"actual-size\": ") {
            let comma = if rest.ends_with(',') { "," } else { "" };
            format!("{indent}\"actual-size\": DISK_SIZE{comma}")
        } else {
            body.to_string()
        };
        out.push_str(&body);
        out.push_str(eol);
    }
    out
}

/// A command line as a shell would take it (arguments with spaces in single quotes).
fn shell_line(args: &[&str]) -> String {
    let mut line = String::from("qed");
    for arg in args {
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || "'\"\\$*?".contains(c)) {
            write!(line, " '{arg}'").expect("write to string");
        } else {
            write!(line, " {arg}").expect("write to string");
        }
    }
    line
}

/// `args` with `TEST_DIR` replaced by `dir`.
fn in_dir(args: &[&str], dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy();
    args.iter().map(|a| a.replace("TEST_DIR", &dir)).collect()
}

/// Runs `args` (a [`Line`]) in `dir`.
fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    let args = in_dir(args, dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qed(dir, &args)
}

/// Runs the setup lines in `dir`; each must succeed.
fn run_setup(dir: &Path, lines: &[Line]) {
    for line in lines {
        let out = run(dir, line);
        assert_eq!(
            code(&out),
            0,
            "setup `{}` failed: {}{}",
            shell_line(line),
            stdout(&out),
            stderr(&out)
        );
    }
}

/// A section of a golden file: its heading, then `text` as it is, then a note when it does
/// not end in a newline (so the next heading starts a line of its own).
fn section(file: &mut String, heading: &str, text: &str) {
    file.push_str(heading);
    file.push('\n');
    file.push_str(text);
    if !text.is_empty() && !text.ends_with('\n') {
        file.push_str("\n(no newline at end)\n");
    }
}

/// Runs `case` in a fresh copy of `template` and renders its golden file.
fn render(case: &Case, template: &Path) -> String {
    let scratch = tempfile::tempdir().expect("temp dir");
    let dir = scratch.path();
    copy_dir(template, dir);
    run_setup(dir, case.setup);
    let out = run(dir, case.run);
    let mut file = String::new();
    for line in case.setup {
        writeln!(file, "# setup: {}", shell_line(line)).expect("write to string");
    }
    writeln!(file, "$ {}", shell_line(case.run)).expect("write to string");
    section(&mut file, "--- stdout", &normalise(&stdout(&out), dir));
    section(&mut file, "--- stderr", &normalise(&stderr(&out), dir));
    writeln!(file, "--- exit {}", code(&out)).expect("write to string");
    file
}

/// Copies the files of `from` into `to`.
fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read template") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
    }
}

/// The fixtures and the images of [`MADE`], in a scratch directory.
fn template() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(FIXTURES).expect("read fixtures (testdata/qemu-fixtures)") {
        let path = entry.expect("entry").path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("qed" | "raw")
        ) {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("name")))
                .expect("copy fixture");
        }
    }
    run_setup(dir.path(), MADE);
    dir
}

/// Where `expected` and `actual` first differ: the line number and both lines.
fn first_difference(expected: &str, actual: &str) -> String {
    let (mut e, mut a) = (expected.split_inclusive('\n'), actual.split_inclusive('\n'));
    let mut number = 1;
    loop {
        match (e.next(), a.next()) {
            (Some(x), Some(y)) if x == y => number += 1,
            (x, y) => return format!("line {number}:\n  expected {x:?}\n  actual   {y:?}"),
        }
    }
}

/// The golden file of the case `name`.
fn golden_path(name: &str) -> PathBuf {
    Path::new(GOLDEN).join(format!("{name}.out"))
}

#[test]
fn output_matches_golden_files() {
    let bless = std::env::var("QED_BLESS").is_ok_and(|v| v == "1");
    let template = template();
    let mut failures = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for case in CASES {
        assert!(names.insert(case.name), "two cases named {}", case.name);
        let actual = render(case, template.path());
        let path = golden_path(case.name);
        if bless {
            std::fs::create_dir_all(GOLDEN).expect("golden dir");
            std::fs::write(&path, &actual).expect("write golden file");
            continue;
        }
        match std::fs::read(&path) {
            Ok(expected) if expected == actual.as_bytes() => {}
            Ok(expected) => failures.push(format!(
                "{}: output differs at {}\n--- actual output:\n{actual}",
                path.display(),
                first_difference(&String::from_utf8_lossy(&expected), &actual)
            )),
            Err(e) => failures.push(format!(
                "{}: {e} (QED_BLESS=1 writes it; review it before committing)",
                path.display()
            )),
        }
    }
    // A golden file no case writes is stale: blessing removes it, comparing fails.
    for entry in std::fs::read_dir(GOLDEN).expect("read golden dir") {
        let path = entry.expect("entry").path();
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if path.extension().is_some_and(|e| e == "out") && !names.contains(stem) {
            if bless {
                std::fs::remove_file(&path).expect("remove stale golden file");
            } else {
                failures.push(format!("{}: no case writes it", path.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden case(s) failed (QED_BLESS=1 rewrites the files):\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn normalise_masks_what_varies() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().display().to_string();
    let text = format!(
        "image: {d}/a.qed\n\
         disk size: 8 KiB\n    disk size: 12 KiB\n\
         \x20   \"actual-size\": 8192,\n\"actual-size\": 4096\n\
         read 4/4 bytes at offset 0\n\
         4 bytes, 1 ops; 00.00 sec (62.578 KiB/sec and 16020.5083 ops/sec)\n\
         4096,1,0:00:00.00,206181415.484,50337.260\n\
         Run completed in 0.011 seconds.\nno newline"
    );
    assert_eq!(
        normalise(&text, dir.path()),
        "image: TEST_DIR/a.qed\n\
         disk size: DISK_SIZE\n    disk size: DISK_SIZE\n\
         \x20   \"actual-size\": DISK_SIZE,\n\"actual-size\": DISK_SIZE\n\
         read 4/4 bytes at offset 0\n\
         4 bytes, 1 ops; TIME\n\
         4096,1,TIME\n\
         Run completed in TIME seconds.\nno newline"
    );
}

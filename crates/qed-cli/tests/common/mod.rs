//! Helpers shared by the integration tests: running `qed` and QEMU's tools, scratch copies of
//! the shared fixtures.

#![allow(dead_code)]

pub mod served;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where the shared fixtures live.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/qemu-fixtures");

/// Whether `program` can be run. When it cannot: panics under CI=true, else prints a note
/// (the caller then returns).
pub fn have(program: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{program} is required when CI=true");
        }
        eprintln!("note: {program} not found; skipping the comparison with QEMU");
    }
    found
}

/// Whether both qemu-img and qemu-io are there (see [`have`]).
pub fn have_qemu() -> bool {
    have("qemu-img") && have("qemu-io")
}

/// A scratch directory holding copies of the shared fixtures, or `None` (with a note, or a
/// panic under CI=true) when they are missing.
pub fn fixtures() -> Option<tempfile::TempDir> {
    let source = Path::new(FIXTURES);
    if !source.is_dir() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{FIXTURES} is required when CI=true");
        }
        eprintln!("note: {FIXTURES} not found; skipping");
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(source).expect("read fixtures") {
        let path = entry.expect("entry").path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("qed" | "raw")
        ) {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("name")))
                .expect("copy fixture");
        }
    }
    Some(dir)
}

/// The fixture image names (`*.qed`, `*.raw`) in `dir`, sorted.
pub fn images(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".qed") || n.ends_with(".raw"))
        .collect();
    names.sort();
    names
}

/// Runs `program args...` in `dir`.
pub fn run_in(dir: &Path, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs the `qed` binary in `dir`.
pub fn qed(dir: &Path, args: &[&str]) -> Output {
    run_in(dir, env!("CARGO_BIN_EXE_qed"), args)
}

/// Path of the `qed` binary.
pub fn qed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qed"))
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The exit code (-1 for a signal).
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// qemu-io output with the timing figures (which differ run to run) replaced by `T`.
pub fn without_timing(text: &str) -> String {
    text.lines()
        .map(|line| {
            if let Some((head, _)) = line.split_once(" ops; ") {
                format!("{head} ops; T")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `program args...` in `dir` and panics unless it exits 0.
pub fn run_ok(dir: &Path, program: &str, args: &[&str]) -> Output {
    let out = run_in(dir, program, args);
    assert_eq!(
        code(&out),
        0,
        "{program} {args:?} failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    out
}

/// Runs qemu-io on `file` (format `fmt`) with `commands`, each a `-c` argument.
pub fn qemu_io_ok(dir: &Path, fmt: &str, file: &str, commands: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(file);
    let out = run_ok(dir, "qemu-io", &args);
    assert!(
        !stdout(&out).contains("failed"),
        "qemu-io {args:?}: {}",
        stdout(&out)
    );
}

/// Asserts that `qemu-img check` finds `file` clean.
pub fn assert_qemu_check_clean(dir: &Path, file: &str) {
    let out = run_in(dir, "qemu-img", &["check", file]);
    assert_eq!(
        code(&out),
        0,
        "qemu-img check {file}: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// The size of `file` in `dir`, in bytes.
pub fn file_len(dir: &Path, file: &str) -> u64 {
    std::fs::metadata(dir.join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .len()
}

/// Makes, with qemu-img and qemu-io (and `qed io` for discards), a set of images that covers
/// what block status can say, and returns their names: a three-level QED chain with different
/// cluster sizes and layers shorter than the ones above them, zero clusters at every level, a
/// sparse raw file as a backing file and as an image of its own, a raw file of an odd length,
/// discarded (punched) ranges, tables of 4 MiB coverage, and a sparse 1 GiB image. Every
/// unallocated run is far below the 4 GiB at which QEMU's block status asserts.
pub fn made_images(dir: &Path) -> Vec<String> {
    let img = |args: &[&str]| {
        run_ok(dir, "qemu-img", args);
    };
    img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096",
        "base.qed",
        "1M",
    ]);
    qemu_io_ok(
        dir,
        "qed",
        "base.qed",
        &[
            "write -P 1 0 64k",
            "write -z 128k 64k",
            "write -P 2 600k 8k",
        ],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=8192",
        "-b",
        "base.qed",
        "-F",
        "qed",
        "mid.qed",
        "2M",
    ]);
    qemu_io_ok(
        dir,
        "qed",
        "mid.qed",
        &[
            "write -P 3 32k 16k",
            "write -z 256k 16k",
            "write -P 4 1536k 8k",
        ],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096",
        "-b",
        "mid.qed",
        "-F",
        "qed",
        "top.qed",
        "3M",
    ]);
    qemu_io_ok(
        dir,
        "qed",
        "top.qed",
        &[
            "write -P 5 4k 4k",
            "write -z 1000k 4k",
            "write -P 6 2500k 4k",
        ],
    );
    std::fs::File::create(dir.join("sparse.raw"))
        .and_then(|f| f.set_len(700 << 10))
        .expect("sparse.raw");
    qemu_io_ok(
        dir,
        "raw",
        "sparse.raw",
        &["write -P 7 100k 20k", "write -P 8 400k 4k"],
    );
    std::fs::write(dir.join("odd.raw"), {
        let mut bytes = vec![0u8; 1000];
        bytes[990..].fill(0x61);
        bytes
    })
    .expect("odd.raw");
    img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096",
        "-b",
        "sparse.raw",
        "-F",
        "raw",
        "over-raw.qed",
        "1M",
    ]);
    qemu_io_ok(
        dir,
        "qed",
        "over-raw.qed",
        &["write -P 9 96k 8k", "write -z 404k 4k"],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096",
        "discarded.qed",
        "4M",
    ]);
    run_ok(
        dir,
        env!("CARGO_BIN_EXE_qed"),
        &[
            "io",
            "-c",
            "write -P 1 0 2M",
            "-c",
            "discard 512k 512k",
            "-c",
            "write -z 1536k 64k",
            "discarded.qed",
        ],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096,table_size=2",
        "tables.qed",
        "12M",
    ]);
    qemu_io_ok(
        dir,
        "qed",
        "tables.qed",
        &[
            "write -P 10 4092k 8k",
            "write -z 8M 4M",
            "write -P 11 5M 4k",
        ],
    );
    img(&["create", "-q", "-f", "qed", "sparse-1g.qed", "1G"]);
    qemu_io_ok(
        dir,
        "qed",
        "sparse-1g.qed",
        &[
            "write -P 12 0 64k",
            "write -P 13 300M 1M",
            "write -z 512M 128k",
            "write -P 14 1023M 4k",
        ],
    );
    [
        "base.qed",
        "mid.qed",
        "top.qed",
        "sparse.raw",
        "odd.raw",
        "over-raw.qed",
        "discarded.qed",
        "tables.qed",
        "sparse-1g.qed",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A link named `qemu-img` to the `qed` binary, in a directory of its own under `dir`: run
/// through it, `qed` is qemu-img (`qemu-img ARGS` = `qed ARGS`).
pub fn qed_as_qemu_img(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let link = bin.join("qemu-img");
    if !link.exists() {
        std::os::unix::fs::symlink(qed_path(), &link).expect("qemu-img link");
    }
    link
}

/// Two scratch directories holding the same files, one for QEMU's qemu-img and one for ours
/// (`qed` invoked as `qemu-img`), so that the same command runs on copies of the same images.
pub struct Twins {
    root: tempfile::TempDir,
    make: fn(&Path),
    /// Where QEMU's qemu-img runs.
    pub qemu: PathBuf,
    /// Where ours runs.
    pub ours: PathBuf,
    /// The `qemu-img` link to `qed`.
    pub tool: PathBuf,
}

impl Twins {
    /// Makes the files with `make` (run in each directory).
    pub fn new(make: fn(&Path)) -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let tool = qed_as_qemu_img(root.path());
        let twins = Self {
            qemu: root.path().join("qemu"),
            ours: root.path().join("ours"),
            root,
            make,
            tool,
        };
        twins.reset();
        twins
    }

    /// The directory both scratch directories live in.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Makes the files again, from scratch, in both directories.
    pub fn reset(&self) {
        for dir in [&self.qemu, &self.ours] {
            if dir.exists() {
                std::fs::remove_dir_all(dir).expect("remove scratch dir");
            }
            std::fs::create_dir_all(dir).expect("scratch dir");
            (self.make)(dir);
        }
    }

    /// Runs `qemu-img ARGS` in QEMU's directory and ours; returns (QEMU's, ours).
    pub fn run(&self, args: &[&str]) -> (Output, Output) {
        let tool = self.tool.display().to_string();
        (
            run_in(&self.qemu, "qemu-img", args),
            run_in(&self.ours, &tool, args),
        )
    }
}

/// How much of stderr two runs must share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stderr {
    /// The same text.
    Same,
    /// The same first line.
    FirstLine,
    /// Both empty or both not.
    Either,
    /// Not compared (qemu-img draws its progress bar even when stderr is not a terminal).
    Ignore,
}

/// Asserts that two runs of `args` (QEMU's, ours) exit alike and print the same on stdout,
/// and on stderr as `stderr` says.
#[track_caller]
pub fn assert_same_run(args: &[&str], qemu: &Output, ours: &Output, stderr_check: Stderr) {
    let show = || {
        format!(
            "{args:?}\nqemu-img: rc {} stdout {:?} stderr {:?}\nours:     rc {} stdout {:?} stderr {:?}",
            code(qemu),
            stdout(qemu),
            stderr(qemu),
            code(ours),
            stdout(ours),
            stderr(ours)
        )
    };
    assert_eq!(code(qemu), code(ours), "exit codes differ: {}", show());
    assert_eq!(stdout(qemu), stdout(ours), "stdout differs: {}", show());
    let (q, o) = (stderr(qemu), stderr(ours));
    // qemu-img warns about probed raw images; that warning is not part of the comparison.
    let q = without_probe_warning(&q);
    match stderr_check {
        Stderr::Same => assert_eq!(q, o, "stderr differs: {}", show()),
        Stderr::FirstLine => assert_eq!(
            q.lines().next(),
            o.lines().next(),
            "stderr differs: {}",
            show()
        ),
        Stderr::Either => assert_eq!(q.is_empty(), o.is_empty(), "stderr: {}", show()),
        Stderr::Ignore => {}
    }
}

/// qemu-img's stderr without its warning about a raw image whose format was probed.
pub fn without_probe_warning(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.starts_with("WARNING: Image format was not specified") {
            // Two more lines belong to it.
            lines.next();
            lines.next();
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Whether `qemu-img compare` finds `a` and `b` (paths) identical.
pub fn same_contents(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .arg("compare")
        .arg("-q")
        .arg(a)
        .arg(b)
        .output()
        .expect("run qemu-img compare");
    code(&out) == 0
}

/// The backing chain the interop tests of rebase and commit work on, made with qemu-img and
/// qemu-io: `base.raw` (2 MiB, data in its first MiB and at 1.5 MiB), `mid.qed` over it
/// (4 KiB clusters, data, zero clusters over base data), `top.qed` over `mid.qed` (3 MiB:
/// larger than the chain under it; data, a partial cluster, a zero cluster, data past the end
/// of the layers below), `other.qed` (no backing file, 4 KiB clusters) and `sub/deep.qed`
/// over `../top.qed`.
pub fn make_chain(dir: &Path) {
    let img = |args: &[&str]| {
        run_ok(dir, "qemu-img", args);
    };
    img(&["create", "-q", "-f", "raw", "base.raw", "2M"]);
    qemu_io_ok(
        dir,
        "raw",
        "base.raw",
        &["write -P 1 0 1M", "write -P 7 1536k 64k"],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "mid.qed",
        "2M",
    ]);
    qemu_io_ok(
        dir,
        "qed",
        "mid.qed",
        &[
            "write -P 2 512k 256k",
            "write -z 1536k 64k",
            "write -z 64k 64k",
        ],
    );
    img(&[
        "create", "-q", "-f", "qed", "-b", "mid.qed", "-F", "qed", "top.qed", "3M",
    ]);
    qemu_io_ok(
        dir,
        "qed",
        "top.qed",
        &[
            "write -P 3 0 64k",
            "write -P 4 2M 64k",
            "write -z 256k 64k",
            "write -P 5 1100k 4k",
        ],
    );
    img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4k",
        "other.qed",
        "2M",
    ]);
    qemu_io_ok(dir, "qed", "other.qed", &["write -P 9 256k 1M"]);
    std::fs::create_dir_all(dir.join("sub")).expect("sub");
    img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        "../top.qed",
        "-F",
        "qed",
        "sub/deep.qed",
    ]);
    qemu_io_ok(dir, "qed", "sub/deep.qed", &["write -P 6 1M 64k"]);
}

/// Copies `file` (in `dir`) to `copy` next to it.
pub fn copy_file(dir: &Path, file: &str, copy: &str) {
    std::fs::copy(dir.join(file), dir.join(copy)).unwrap_or_else(|e| panic!("copy {file}: {e}"));
}

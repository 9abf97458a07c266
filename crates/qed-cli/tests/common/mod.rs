//! Helpers shared by the integration tests: running `qed` and QEMU's tools, scratch copies of
//! the shared fixtures.

#![allow(dead_code)]

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

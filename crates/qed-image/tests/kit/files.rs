//! Files the tests start from: the QEMU-made fixtures, the hostile images, scratch copies of
//! them, and small helpers to list, read and patch files.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::oracle::in_ci;

/// The hostile images and their generator (`tests/data/hostile/`).
pub const HOSTILE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/hostile");

/// Where the QEMU-made fixture images live (override with `QED_FIXTURES`).
pub fn fixtures_source() -> PathBuf {
    std::env::var_os("QED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../testdata/qemu-fixtures"
            ))
        })
}

/// Whether the fixtures are there. When they are not: panics under CI (`CI=true`), otherwise
/// prints a note and returns false so that the caller skips them.
fn fixtures_present(src: &Path) -> bool {
    if src.join("README.md").is_file() {
        return true;
    }
    if in_ci() {
        panic!("fixtures not found at {}", src.display());
    }
    eprintln!(
        "note: fixtures not found at {} (set QED_FIXTURES); skipping them",
        src.display()
    );
    false
}

/// A temporary, writable copy of every fixture image, all in one directory (overlays name
/// their backing files relatively). `None` (after a note) when the fixtures are missing
/// outside CI.
pub fn fixture_dir() -> Option<tempfile::TempDir> {
    let src = fixtures_source();
    fixtures_present(&src).then(|| scratch_copy(&src, &["qed", "raw"]))
}

/// The fixture `.qed` files where they are (for reading only), sorted; empty (after a note)
/// when the fixtures are missing outside CI.
pub fn fixture_images() -> Vec<PathBuf> {
    let src = fixtures_source();
    if !fixtures_present(&src) {
        return Vec::new();
    }
    files_with_extension(&src, "qed")
}

/// A temporary directory holding writable copies of the files of `src` whose extension is
/// one of `extensions`.
pub fn scratch_copy(src: &Path, extensions: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for from in files_in(src) {
        if !from
            .extension()
            .is_some_and(|e| extensions.iter().any(|x| e == *x))
        {
            continue;
        }
        let to = dir.path().join(from.file_name().expect("file name"));
        std::fs::copy(&from, &to).expect("copy");
        // The originals may be read-only; the copies must be writable.
        let mut perm = std::fs::metadata(&to).expect("metadata").permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&to, perm).expect("chmod");
    }
    dir
}

/// The regular files in `dir`, sorted (none if `dir` cannot be read).
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// The files in `dir` ending in `.<extension>`, sorted.
pub fn files_with_extension(dir: &Path, extension: &str) -> Vec<PathBuf> {
    files_in(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect()
}

/// The little-endian u64 at `offset` of `bytes`.
pub fn le_u64(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

/// The little-endian u64 at `offset` of a file.
pub fn file_u64(path: &Path, offset: u64) -> u64 {
    le_u64(&std::fs::read(path).expect("read file"), offset as usize)
}

/// Overwrites the bytes at `offset` of an existing file with `bytes`.
pub fn patch_file(path: &Path, offset: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    file.write_all_at(bytes, offset)
        .unwrap_or_else(|e| panic!("write {} at {offset}: {e}", path.display()));
}

/// Whether the file system holding `dir` reports punched ranges as holes (SEEK_HOLE).
pub fn file_system_reports_holes(dir: &Path) -> bool {
    use qed_image::storage::{CacheMode, FileOptions, FileStorage, LockMode};
    use qed_image::Storage;
    let probe = dir.join(".hole-probe");
    let storage = FileStorage::open(
        &probe,
        &FileOptions {
            writable: true,
            create: true,
            cache: CacheMode::Writeback,
            lock: LockMode::None,
        },
    )
    .expect("create probe file");
    storage.write_at(&[1u8; 1 << 20], 0).expect("write probe");
    storage.flush().expect("flush probe");
    let reports = storage.punch_hole(256 << 10, 512 << 10).is_ok()
        && storage.is_hole(256 << 10, 512 << 10).unwrap_or(false);
    drop(storage);
    let _ = std::fs::remove_file(&probe);
    reports
}

//! Check and repair against the QEMU-made fixtures, and against `qemu-img check`.

use std::path::{Path, PathBuf};
use std::process::Command;

use qed_image::{CheckReport, Image, OpenOptions, Repair};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/qemu-fixtures");

fn fixtures() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(FIXTURES).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".qed") || name.ends_with(".raw") {
            std::fs::copy(entry.path(), dir.path().join(&*name)).unwrap();
        }
    }
    let path = dir.path().to_path_buf();
    (dir, path)
}

fn check(path: &Path, repair: Repair) -> CheckReport {
    let options = if repair == Repair::None {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    let img = Image::open(path, &options).unwrap();
    let report = img.check(repair).unwrap();
    img.close().unwrap();
    report
}

fn counts(r: &CheckReport) -> (u64, u64, u64, u64, u64) {
    (
        r.total_clusters,
        r.allocated_clusters,
        r.fragmented_clusters,
        r.corruptions,
        r.leaks,
    )
}

fn qemu_check_rc(path: &Path) -> Option<i32> {
    match Command::new("qemu-img").arg("check").arg(path).output() {
        Ok(out) => out.status.code(),
        Err(_) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("qemu-img is required under CI")
        }
        Err(_) => None,
    }
}

#[test]
fn clean_fixtures_report_qemu_statistics() {
    let (_d, dir) = fixtures();
    for (name, expected) in [
        ("basic-64k.qed", (256, 5, 1, 0, 0)),
        ("small-4k.qed", (16384, 5, 1, 0, 0)),
        ("backing-overlay.qed", (128, 5, 1, 0, 0)),
        ("chain-base.qed", (128, 128, 0, 0, 0)),
        ("empty-default.qed", (256, 0, 0, 0, 0)),
        ("trailing-garbage.qed", (256, 1, 0, 0, 0)),
        ("header-size-2.qed", (128, 1, 0, 0, 0)),
        ("odd-size.qed", (1, 1, 0, 0, 0)),
        ("zero-size.qed", (0, 0, 0, 0, 0)),
        ("table-size-1.qed", (256, 0, 0, 0, 0)),
    ] {
        let report = check(&dir.join(name), Repair::None);
        assert_eq!(counts(&report), expected, "{name}: {report:?}");
        assert!(report.is_clean());
    }
}

#[test]
fn corrupt_fixtures_are_found() {
    let (_d, dir) = fixtures();
    for (name, expected) in [
        ("dirty-invalid-l2.qed", (256, 3, 1, 1, 0)),
        ("dup-ref.qed", (256, 3, 1, 1, 0)),
        ("l1-invalid.qed", (4096, 1, 0, 1, 5)),
        ("truncated-cluster.qed", (256, 2, 1, 1, 0)),
        ("leak.qed", (256, 2, 0, 0, 1)),
    ] {
        let report = check(&dir.join(name), Repair::None);
        assert_eq!(counts(&report), expected, "{name}: {report:?}");
        assert!(!report.findings.is_empty() || report.leaks > 0, "{name}");
    }
}

#[test]
fn repair_leaves_images_that_both_checkers_call_clean() {
    let (_d, dir) = fixtures();
    for name in [
        "dup-ref.qed",
        "l1-invalid.qed",
        "truncated-cluster.qed",
        "leak.qed",
    ] {
        let path = dir.join(name);
        let before = {
            let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
            let mut buf = vec![0u8; img.size() as usize];
            // Clusters with invalid entries cannot be read; compare only what can.
            let readable = img.read_at(&mut buf, 0).is_ok();
            (buf, readable)
        };
        let repaired = check(&path, Repair::All);
        assert_eq!(repaired.corruptions, 0, "{name}: {repaired:?}");
        assert_eq!(repaired.leaks, 0, "{name}: {repaired:?}");
        let again = check(&path, Repair::None);
        assert!(again.is_clean(), "{name}: second check {again:?}");
        let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
        assert!(!img.info().dirty);
        let mut after = vec![0u8; img.size() as usize];
        img.read_at(&mut after, 0).unwrap();
        if before.1 {
            assert!(after == before.0, "{name}: repair changed the guest view");
        }
        drop(img);
        if let Some(rc) = qemu_check_rc(&path) {
            assert_eq!(rc, 0, "{name}: qemu-img check after our repair");
        }
    }
}

#[test]
fn duplicate_references_get_their_own_copy() {
    let (_d, dir) = fixtures();
    let path = dir.join("dup-ref.qed");
    let report = check(&path, Repair::All);
    assert_eq!(report.corruptions_fixed, 1);
    let img = Image::open(&path, &OpenOptions::read_write()).unwrap();
    // L2[7] shared L2[0]'s cluster: writing one must not change the other.
    img.write_at(&[0x99; 4096], 0).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 7 * 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0x14));
}

#[test]
fn leaked_trailing_clusters_are_truncated() {
    let (_d, dir) = fixtures();
    let path = dir.join("leak.qed");
    let report = check(&path, Repair::Leaks);
    assert_eq!(report.leaks_fixed, 1);
    assert_eq!(report.image_end_offset, 45056);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 45056);
}

#[test]
fn interior_leaks_are_filled_by_moving_data_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("holes.qed");
    Image::create(
        &path,
        &qed_image::CreateParams {
            image_size: 1 << 20,
            cluster_size: 4096,
            table_size: 4,
            backing_file: None,
            backing_raw: false,
        },
    )
    .unwrap();
    let img = Image::open(&path, &OpenOptions::read_write()).unwrap();
    for i in 0..8u8 {
        img.write_at(&[i + 1; 4096], u64::from(i) * 4096).unwrap();
    }
    img.close().unwrap();
    // Drop the entries of clusters 2 and 3 by hand: two clusters inside the file that no
    // table references (discard never leaves such leaks).
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut l1 = [0u8; 8];
        file.read_exact_at(&mut l1, 4096).unwrap();
        let l2 = u64::from_le_bytes(l1);
        file.write_all_at(&[0u8; 16], l2 + 16).unwrap();
    }
    let img = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let found = img.check(Repair::None).unwrap();
    assert_eq!(found.leaks, 2);
    let len_before = img.file_length().unwrap();
    let fixed = img.check(Repair::All).unwrap();
    assert_eq!((fixed.leaks, fixed.leaks_fixed), (0, 2), "{fixed:?}");
    assert_eq!(img.file_length().unwrap(), len_before - 2 * 4096);
    let mut buf = vec![0u8; 8 * 4096];
    img.read_at(&mut buf, 0).unwrap();
    for i in 0..8 {
        let want = if i == 2 || i == 3 { 0 } else { i as u8 + 1 };
        assert!(
            buf[i * 4096..(i + 1) * 4096].iter().all(|&b| b == want),
            "cluster {i}"
        );
    }
    img.close().unwrap();
    if let Some(rc) = qemu_check_rc(&path) {
        assert_eq!(rc, 0);
    }
}

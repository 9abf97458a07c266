//! Regression tests for the engine's second pass: each test reproduces one finding.

use std::path::Path;

use qed_image::{CreateParams, Image, OpenOptions, Repair};

fn create(path: &Path, size: u64, cluster_size: u32) {
    Image::create(
        path,
        &CreateParams {
            image_size: size,
            cluster_size,
            table_size: 4,
            backing_file: None,
            backing_raw: false,
        },
    )
    .unwrap();
}

#[test]
fn a_file_cut_by_one_byte_keeps_its_last_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.qed");
    create(&path, 1 << 20, 65536);
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    image.write_at(&[0x11; 65536], 0).unwrap();
    // The first write put data at 320K and the L2 table after it; this cluster comes last.
    image.write_at(&[0x5a; 65536], 65536).unwrap();
    image.close().unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 1).unwrap();
    drop(file);

    let image = Image::open(&path, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 65536];
    image.read_at(&mut buf, 65536).unwrap();
    let host = match image.extents(65536, 65536).next().unwrap().unwrap().kind {
        qed_image::ExtentKind::Data { host_offset } => host_offset,
        other => panic!("expected data, got {other:?}"),
    };
    assert_eq!(host + 65536, len, "the data cluster is the last one");
    // The cut byte reads as zero, as through QEMU.
    assert!(buf[..65535].iter().all(|&b| b == 0x5a));
    assert_eq!(buf[65535], 0);
    let report = image.check(Repair::None).unwrap();
    assert_eq!(report.corruptions, 0, "{report:?}");
    drop(image);

    // A repair keeps every byte that can be read.
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let report = image.check(Repair::All).unwrap();
    assert_eq!(report.corruptions_fixed, 0, "{report:?}");
    let mut after = vec![0u8; 65536];
    image.read_at(&mut after, 65536).unwrap();
    assert_eq!(after, buf);
    image.close().unwrap();
}

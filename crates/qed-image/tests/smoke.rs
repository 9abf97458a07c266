use qed_image::{CreateParams, Image, OpenOptions};

#[test]
fn write_read_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qed");
    Image::create(
        &path,
        &CreateParams {
            image_size: 16 << 20,
            cluster_size: 65536,
            table_size: 4,
            backing_file: None,
            backing_raw: false,
        },
    )
    .unwrap();
    let img = Image::open(&path, &OpenOptions::read_write()).unwrap();
    img.write_at(&[0xab; 65536], 0).unwrap();
    img.write_at(&[0xcd; 4096], 1052672).unwrap();
    img.write_zeroes_at(2 << 20, 128 << 10).unwrap();
    img.write_at(&[0xef; 192 << 10], 3 << 20).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 1052672).unwrap();
    assert!(buf.iter().all(|&b| b == 0xcd));
    img.close().unwrap();
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    assert!(!img.info().dirty);
    let mut buf = vec![0u8; 192 << 10];
    img.read_at(&mut buf, 3 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0xef));
    let ext: Vec<_> = img.extents(0, 16 << 20).map(|e| e.unwrap()).collect();
    eprintln!("{ext:#?}");
    drop(img);
    let out = std::process::Command::new("qemu-img")
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success());
}

//! Open-time limits, backing-chain resolution and the NEED_CHECK lifecycle.

mod kit;

use std::path::Path;
use std::time::Duration;

use kit::{assert_fill, header_of, params, patch_file, read_range};
use qed_image::format::{Header, FEATURE_NEED_CHECK};
use qed_image::{BackingPolicy, Error, Image, OpenOptions};

#[test]
fn huge_l1_table_is_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.qed");
    let cs: u32 = 64 << 20;
    let header = Header {
        cluster_size: cs,
        table_size: 16,
        header_size: 1,
        features: 0,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: u64::from(cs),
        image_size: 1 << 40,
        backing_filename_offset: 0,
        backing_filename_size: 0,
    };
    let file = std::fs::File::create(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &header.encode(), 0).unwrap();
    // Sparse: 17 clusters of 64 MiB, so the 1 GiB L1 table fits in the file.
    file.set_len(17 * u64::from(cs)).unwrap();
    drop(file);
    match Image::open(&path, &OpenOptions::read_only()) {
        Err(Error::TooLarge { what, bytes, .. }) => {
            assert_eq!(what, "L1 table");
            assert_eq!(bytes, 1 << 30);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn relative_backing_names_resolve_against_the_image_directory() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("base.raw"), vec![0x5a; 8192]).unwrap();
    let top = sub.join("top.qed");
    Image::create(&top, &params(16384, 4096, 4, Some("base.raw"), true)).unwrap();
    // Open from another working directory: the name is relative to sub/, not the CWD.
    let img = Image::open(&top, &OpenOptions::read_only()).unwrap();
    let buf = read_range(&img, 0, 16384);
    assert_fill(&buf[..8192], 0x5a, "backing data");
    assert_fill(&buf[8192..], 0, "past the backing end");
    assert_eq!(img.info().backing_path.unwrap(), sub.join("base.raw"));
}

#[test]
fn backing_policy_deny_and_ignore() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), vec![0x5a; 4096]).unwrap();
    let top = dir.path().join("top.qed");
    Image::create(&top, &params(4096, 4096, 4, Some("base.raw"), true)).unwrap();
    let deny = OpenOptions {
        backing: BackingPolicy::Deny,
        ..OpenOptions::read_only()
    };
    assert!(matches!(
        Image::open(&top, &deny),
        Err(Error::Unsupported(_))
    ));
    let ignore = OpenOptions {
        backing: BackingPolicy::Ignore,
        ..OpenOptions::read_only()
    };
    let img = Image::open(&top, &ignore).unwrap();
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn backing_loops_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qed");
    let b = dir.path().join("b.qed");
    Image::create(&a, &params(65536, 4096, 4, Some("b.qed"), false)).unwrap();
    Image::create(&b, &params(65536, 4096, 4, Some("a.qed"), false)).unwrap();
    let err = Image::open(&a, &OpenOptions::read_only()).unwrap_err();
    assert!(matches!(err, Error::BackingLoop { .. }), "{err}");
    // An image naming itself.
    let c = dir.path().join("c.qed");
    Image::create(&c, &params(65536, 4096, 4, Some("c.qed"), false)).unwrap();
    let err = Image::open(&c, &OpenOptions::read_write()).unwrap_err();
    assert!(matches!(err, Error::BackingLoop { .. }), "{err}");
}

#[test]
fn deep_chains_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let depth = qed_image::MAX_CHAIN_DEPTH + 3;
    Image::create(
        &dir.path().join("l0.qed"),
        &params(65536, 4096, 4, None, false),
    )
    .unwrap();
    for i in 1..depth {
        let name = format!("l{}.qed", i - 1);
        Image::create(
            &dir.path().join(format!("l{i}.qed")),
            &params(65536, 4096, 4, Some(&name), false),
        )
        .unwrap();
    }
    let top = dir.path().join(format!("l{}.qed", depth - 1));
    let err = Image::open(&top, &OpenOptions::read_only()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("deeper than"), "{text}");
}

#[test]
fn need_check_is_set_before_tables_change_and_cleared_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qed");
    Image::create(&path, &params(1 << 20, 4096, 4, None, false)).unwrap();
    let options = OpenOptions {
        clean_after: Duration::from_millis(100),
        ..OpenOptions::read_write()
    };
    let img = Image::open(&path, &options).unwrap();
    img.write_at(&[7; 8192], 0).unwrap();
    img.flush().unwrap();
    // The tables on disk changed, so the header must say so (truthfully, unlike QEMU's info).
    assert_ne!(header_of(&path).features & FEATURE_NEED_CHECK, 0);
    assert!(img.info().dirty);
    // After a quiet period the idle timer writes back and clears the flag (real clock).
    let mut cleared = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(50));
        if header_of(&path).features & FEATURE_NEED_CHECK == 0 {
            cleared = true;
            break;
        }
    }
    assert!(cleared, "idle timer did not clear NEED_CHECK");
    assert!(!img.info().dirty);
    // A new allocation starts a new dirty period; close ends it.
    img.write_at(&[8; 4096], 65536).unwrap();
    img.flush().unwrap();
    assert_ne!(header_of(&path).features & FEATURE_NEED_CHECK, 0);
    img.close().unwrap();
    assert_eq!(header_of(&path).features & FEATURE_NEED_CHECK, 0);
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    assert_fill(&read_range(&img, 65536, 4096), 8, "written before close");
}

#[test]
fn dirty_image_opens_read_only_and_is_repaired_by_a_writable_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty.qed");
    Image::create(&path, &params(1 << 20, 4096, 4, None, false)).unwrap();
    let mut header = header_of(&path);
    header.features |= FEATURE_NEED_CHECK;
    patch_file(&path, 0, &header.encode());
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    assert!(img.info().dirty);
    drop(img);
    // Read-only use must not touch the flag.
    assert_ne!(header_of(&path).features & FEATURE_NEED_CHECK, 0);
    let img = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let report = img.open_repair().expect("a dirty image is checked at open");
    assert!(report.is_clean(), "{report:?}");
    assert!(!img.info().dirty);
    drop(img);
    assert_eq!(header_of(&path).features & FEATURE_NEED_CHECK, 0);
}

#[test]
fn read_only_images_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.qed");
    Image::create(&path, &params(1 << 20, 4096, 4, None, false)).unwrap();
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    assert!(matches!(img.write_at(&[1], 0), Err(Error::ReadOnly)));
    assert!(matches!(img.write_zeroes_at(0, 4096), Err(Error::ReadOnly)));
    assert!(matches!(img.discard(0, 4096), Err(Error::ReadOnly)));
    let mut buf = [0u8; 1];
    assert!(matches!(
        img.read_at(&mut buf, 1 << 20),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn create_does_not_truncate_an_image_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.qed");
    Image::create(&path, &params(1 << 20, 4096, 4, None, false)).unwrap();
    let img = Image::open(&path, &OpenOptions::read_write()).unwrap();
    img.write_at(&[3; 4096], 0).unwrap();
    img.flush().unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let err = Image::create(&path, &params(1 << 20, 4096, 4, None, false)).unwrap_err();
    assert!(err.to_string().contains("lock"), "{err}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    assert_fill(&read_range(&img, 0, 4096), 3, "the image in use");
}

#[test]
fn o_direct_cache_mode_round_trips() {
    // /tmp may be tmpfs (no O_DIRECT); the target directory is on the build file system.
    let base = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = tempfile::tempdir_in(&base).unwrap();
    let path = dir.path().join("direct.qed");
    Image::create(&path, &params(8 << 20, 65536, 4, None, false)).unwrap();
    let options = OpenOptions {
        cache: qed_image::CacheMode::None,
        ..OpenOptions::read_write()
    };
    let img = match Image::open(&path, &options) {
        Ok(img) => img,
        Err(e) if e.to_string().contains("O_DIRECT") => {
            eprintln!("note: O_DIRECT unsupported here: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mut model = vec![0u8; 8 << 20];
    for (i, (off, len)) in [
        (0, 4096),
        (1000, 3000),
        (65536 * 3 + 17, 70000),
        (5 << 20, 512),
    ]
    .into_iter()
    .enumerate()
    {
        let data = vec![i as u8 + 1; len];
        img.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    img.close().unwrap();
    let img = Image::open(&path, &options).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == model, "contents differ after O_DIRECT round trip");
}

#[test]
fn header_rewrites_keep_the_rest_of_the_header_cluster() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.raw"), vec![0x11; 65536]).unwrap();
    let path = dir.path().join("tail.qed");
    Image::create(&path, &params(1 << 20, 4096, 4, Some("base.raw"), true)).unwrap();
    // Unknown extension bytes after the backing name, and an unknown autoclear bit.
    let extension: Vec<u8> = (0..200u8).collect();
    patch_file(&path, 1000, &extension);
    let mut header = header_of(&path);
    header.autoclear_features = 0x10;
    patch_file(&path, 0, &header.encode());
    let tail = |p: &Path| std::fs::read(p).unwrap()[64..4096].to_vec();
    let before = tail(&path);
    // Autoclear reset at open, NEED_CHECK set by allocation and cleared at close: three
    // header writes, none of which may touch bytes 64 onwards.
    let img = Image::open(&path, &OpenOptions::read_write()).unwrap();
    img.write_at(&[0x22; 4096], 8192).unwrap();
    img.flush().unwrap();
    assert_ne!(header_of(&path).features & FEATURE_NEED_CHECK, 0);
    assert_eq!(tail(&path), before);
    img.close().unwrap();
    let after = header_of(&path);
    assert_eq!(after.autoclear_features, 0);
    assert_eq!(after.features & FEATURE_NEED_CHECK, 0);
    assert_eq!(tail(&path), before);
}

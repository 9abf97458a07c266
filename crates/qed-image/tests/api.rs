//! The shape and durability API of an open image: resize, set_backing, reopen, write_at_fua,
//! coalesced flush, write_zeroes_with and chain_extents_iter. Where QEMU can read what we
//! wrote, `qemu-img` is the oracle.

mod kit;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kit::*;
use qed_image::format::{
    FEATURE_BACKING_FILE, FEATURE_BACKING_FORMAT_NO_PROBE, FEATURE_NEED_CHECK,
};
use qed_image::storage::{
    CrashOptions, CrashStorage, FaultStorage, MemoryStorage, OpKind, Storage,
};
use qed_image::{
    BackingFormat, BackingLayer, ChainExtent, ChainKind, Error, ExtentKind, Geometry, Image,
    NewBacking, OpenOptions, Repair, ZeroFlags,
};

// ---------------------------------------------------------------------------------------
// Helpers

/// A new, empty image file `name` in `dir`.
fn new_file(dir: &Path, name: &str, size: u64, cs: u32, ts: u32) -> PathBuf {
    let path = dir.join(name);
    Image::create(&path, &params(size, cs, ts, None, false)).expect("create image");
    path
}

/// Host offset of guest byte `guest`, which must lie in a data cluster.
fn host_of(image: &Image, guest: u64) -> u64 {
    let extent = image
        .extents(guest, 1)
        .next()
        .expect("an extent")
        .expect("extent");
    match extent.kind {
        ExtentKind::Data { host_offset } => host_offset,
        other => panic!("guest {guest:#x} is {other:?}, not data"),
    }
}

/// Panics unless every extent of `image` in `[offset, offset + len)` is unallocated.
#[track_caller]
fn assert_unallocated(image: &Image, offset: u64, len: u64, what: &str) {
    for extent in image.extents(offset, len) {
        let extent = extent.expect("extent");
        assert_eq!(
            extent.kind,
            ExtentKind::Unallocated,
            "{what}: {:#x}+{:#x}",
            extent.offset,
            extent.length
        );
    }
}

/// Panics unless `[offset, offset + len)` reads as zeros.
#[track_caller]
fn assert_zeros(image: &Image, offset: u64, len: u64, what: &str) {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(1 << 20);
        assert_fill(
            &read_range(image, offset + done, n as usize),
            0,
            &format!("{what} at {:#x}", offset + done),
        );
        done += n;
    }
}

/// Panics unless `image.check(Repair::None)` finds nothing wrong.
#[track_caller]
fn assert_check_clean(image: &Image, what: &str) {
    let report = image.check(Repair::None).expect("check");
    assert!(report.is_clean(), "{what}: {report:?}");
}

/// `qemu-img info`'s virtual size, or `None` without qemu-img.
fn qemu_virtual_size(path: &Path) -> Option<u64> {
    if !require_tool("qemu-img") {
        return None;
    }
    let info = qemu_info(path);
    Some(
        json_top_field(&info, "virtual-size")
            .expect("virtual-size")
            .parse()
            .expect("a number"),
    )
}

// ---------------------------------------------------------------------------------------
// resize

#[test]
fn grow_writes_the_new_size_and_the_new_range_reads_zeros() {
    for (cs, ts) in [(4096u32, 4u32), (65536, 4)] {
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry::new(cs, ts).unwrap();
        let c = u64::from(cs);
        let old = 3 * c + 1536;
        let path = new_file(dir.path(), "grow.qed", old, cs, ts);
        let data = pattern(11, 0, old as usize);
        {
            let image = open_rw(&path);
            image.write_at(&data, 0).unwrap();
            image.close().unwrap();
        }
        // The bytes of the last cluster past the end of the disk hold something, as QEMU
        // leaves them when it copies that cluster from a backing file longer than the image.
        let last = g.align_down(old);
        let host = host_of(&open_ro(&path), last);
        patch_file(
            &path,
            host + (old - last),
            &vec![0xEE; (c - (old - last)) as usize],
        );

        let new = old + 2 * g.l2_coverage() + 3 * 512;
        let image = open_rw(&path);
        image.resize(new).unwrap();
        assert_eq!(image.size(), new);
        assert_eq!(header_of(&path).image_size, new, "{cs}: the header on disk");
        assert_same(
            &read_range(&image, 0, old as usize),
            &data,
            0,
            "old contents",
        );
        assert_zeros(
            &image,
            old,
            g.align_up(old) - old,
            "tail of the old last cluster",
        );
        assert_zeros(&image, old, 4 * c, "past the old end");
        assert_zeros(&image, new - 3 * c, 3 * c, "before the new end");
        assert_unallocated(
            &image,
            g.align_up(old),
            new - g.align_up(old),
            "grown range",
        );
        assert_check_clean(&image, "after growing");
        image.close().unwrap();

        let image = open_ro(&path);
        assert_eq!(image.size(), new, "{cs}: size after reopen");
        assert_zeros(&image, old, g.align_up(old) - old, "tail after reopen");
        drop(image);
        if let Some(size) = qemu_virtual_size(&path) {
            assert_eq!(size, new, "{cs}: qemu-img info virtual-size");
            assert_qemu_img_check(&path);
            let window = qemu_read_window(&path, old - 512, 512 + 2 * c);
            assert_same(
                &window[..512],
                &data[(old - 512) as usize..],
                old - 512,
                "qemu",
            );
            assert_fill(&window[512..], 0, "qemu reads the grown range");
        }
    }
}

/// Data in three L2 tables of a `3 × coverage` disk: the first table, across the first
/// table boundary (where the shrunk disk ends) and the last table.
fn shrink_writes(g: &Geometry) -> Vec<(u64, Vec<u8>)> {
    let c = g.cluster_size();
    let cov = g.l2_coverage();
    vec![
        (0, pattern(21, 0, 3 * c as usize)),
        (cov - c + 100, pattern(22, 0, 5 * c as usize)),
        (2 * cov + c, pattern(23, 0, (2 * c + 300) as usize)),
    ]
}

#[test]
fn shrink_drops_what_lies_past_the_end_keeps_the_rest_and_gives_space_back() {
    for (cs, ts) in [(4096u32, 4u32), (65536, 4)] {
        let g = Geometry::new(cs, ts).unwrap();
        let c = g.cluster_size();
        let cov = g.l2_coverage();
        let old = 3 * cov;
        for (what, new) in [
            ("aligned", cov + 2 * c),
            ("unaligned", cov + 2 * c + 2560),
            ("to zero", 0),
        ] {
            let what = format!("{cs}/{ts} {what}");
            let dir = tempfile::tempdir().unwrap();
            let path = new_file(dir.path(), "shrink.qed", old, cs, ts);
            let mut model = SparseDisk::new(old, Base::Zeros);
            let image = open_rw(&path);
            // Left dirty in memory: the resize writes them back first.
            for (offset, data) in shrink_writes(&g) {
                image.write_at(&data, offset).unwrap();
                model.write(offset, &data);
            }
            let before = image.file_length().unwrap();
            image.resize(new).unwrap();
            assert_eq!(image.size(), new, "{what}");

            let bytes = std::fs::read(&path).unwrap();
            let layout = parse_layout(&bytes);
            assert_eq!(layout.header.image_size, new, "{what}: header");
            assert!(!layout.dirty(), "{what}: NEED_CHECK left set");
            assert!(
                layout.data.values().all(|&guest| guest < new),
                "{what}: data entries past the end: {:?}",
                layout.data
            );
            let tables_needed = new.div_ceil(cov) as usize;
            assert!(
                layout.l2_tables.keys().all(|&i| i < tables_needed),
                "{what}: L2 tables past the end: {:?}",
                layout.l2_tables
            );
            // Space given back: the file holds exactly what the smaller disk needs.
            layout.assert_exact_cover(0);
            assert!(bytes.len() as u64 == image.file_length().unwrap());
            assert!(
                (bytes.len() as u64) < before,
                "{what}: file of {} bytes, {before} before",
                bytes.len()
            );
            for (offset, len) in model.written_runs() {
                let end = (offset + len).min(new);
                if offset < end {
                    check_range(&image, &model, offset, end - offset, &what);
                }
            }
            assert_check_clean(&image, &what);
            if require_tool("qemu-img") {
                assert_qemu_img_check(&path);
                assert_eq!(qemu_check(&path).leaks, 0, "{what}: qemu-img leaks");
                assert_eq!(qemu_virtual_size(&path), Some(new), "{what}");
                // QEMU grows by changing the size alone: what the shrink left past the end
                // (the tail of a partial last cluster) shows then.
                let copy = dir.path().join("grown-by-qemu.qed");
                std::fs::copy(&path, &copy).unwrap();
                qemu_img(
                    ["resize", "-q", "-f", "qed"]
                        .map(std::ffi::OsStr::new)
                        .into_iter()
                        .chain([copy.as_os_str(), std::ffi::OsStr::new(&old.to_string())]),
                )
                .expect_status(0, "qemu-img resize");
                let from = new.saturating_sub(512);
                let window = qemu_read_window(&copy, from, 512 + 2 * c);
                let kept = (new - from) as usize;
                assert_same(
                    &window[..kept],
                    &model.read_vec(from, kept as u64),
                    from,
                    &what,
                );
                assert_fill(&window[kept..], 0, &format!("{what}: grown by qemu-img"));
            }

            // Growing again shows zeros where the dropped data was, the tail of a partial
            // last cluster included.
            image.resize(old).unwrap();
            let regrown = (new + 3 * c).min(old) - new;
            assert_zeros(&image, new, regrown, &format!("{what}: regrown"));
            for (offset, data) in shrink_writes(&g) {
                let from = offset.max(new);
                let end = offset + data.len() as u64;
                if from < end {
                    assert_zeros(&image, from, end - from, &format!("{what}: dropped data"));
                }
            }
            let first_free = g.align_up(new);
            assert_unallocated(&image, first_free, old - first_free, &what);
            assert_check_clean(&image, &format!("{what}: after growing again"));
            image.close().unwrap();
            if require_tool("qemu-img") {
                assert_qemu_img_check(&path);
                let from = new.saturating_sub(512);
                let window = qemu_read_window(&path, from, 512 + 2 * c);
                let kept = (new - from) as usize;
                assert_same(
                    &window[..kept],
                    &model.read_vec(from, kept as u64),
                    from,
                    &what,
                );
                assert_fill(
                    &window[kept..],
                    0,
                    &format!("{what}: qemu reads the regrown range"),
                );
            }
        }
    }
}

#[test]
fn resize_refuses_unaligned_oversized_and_read_only() {
    // 4 KiB clusters, one-cluster tables: at most 1 GiB.
    let storage = create_memory(&params(1 << 20, 4096, 1, None, false));
    let image = open_shared(&storage, &rw_options(), None);
    image.write_at(&[7; 5000], 1000).unwrap();
    image.flush().unwrap();
    let before = storage.to_bytes();
    let max = 1u64 << 30;
    for bad in [
        (1 << 20) + 100,
        (1 << 20) + 511,
        1000,
        max + 512,
        u64::MAX - 511,
    ] {
        match image.resize(bad) {
            Err(Error::InvalidArgument(_)) => {}
            other => panic!("resize to {bad}: {other:?}"),
        }
        assert_eq!(image.size(), 1 << 20, "size after refusing {bad}");
        assert_eq!(storage.to_bytes(), before, "file changed by refusing {bad}");
        assert!(!image.is_poisoned());
    }
    // The maximum itself is allowed, and so is going back.
    image.resize(max).unwrap();
    assert_eq!(image.size(), max);
    image.resize(1 << 20).unwrap();
    assert_eq!(read_range(&image, 1000, 5000), vec![7; 5000]);
    image.close().unwrap();

    let before = storage.to_bytes();
    let image = open_shared(&storage, &OpenOptions::read_only(), None);
    for size in [2 << 20, 512] {
        match image.resize(size) {
            Err(Error::ReadOnly) => {}
            other => panic!("read-only resize to {size}: {other:?}"),
        }
    }
    assert_eq!(image.size(), 1 << 20);
    drop(image);
    assert_eq!(storage.to_bytes(), before, "a read-only image was changed");
}

/// An image whose L2 table maps a cluster past the end of the disk (as a crash during a
/// shrink leaves one, once the new size is on disk), closed cleanly.
fn image_with_an_entry_past_the_end() -> (Arc<MemoryStorage>, u64, u64) {
    let c = 4096u64;
    let (old, new) = (64 * c, 32 * c);
    let storage = create_memory(&params(old, 4096, 4, None, false));
    let image = open_shared(&storage, &rw_options(), None);
    image.write_at(&[0x3C; 4096], 40 * c).unwrap();
    image.write_at(&[0x3D; 4096], 2 * c).unwrap();
    image.close().unwrap();
    storage.write_at(&new.to_le_bytes(), 48).unwrap();
    (storage, old, new)
}

#[test]
fn growing_over_an_entry_past_the_end_reads_zeros_there() {
    let (storage, old, new) = image_with_an_entry_past_the_end();
    let image = open_shared(&storage, &rw_options(), None);
    assert_eq!(image.size(), new);
    image.resize(old).unwrap();
    assert_zeros(&image, new, old - new, "grown over the stale entry");
    assert_unallocated(&image, new, old - new, "grown range");
    assert_eq!(read_range(&image, 2 * 4096, 4096), vec![0x3D; 4096]);
    let report = image.check(Repair::None).unwrap();
    assert_eq!(report.corruptions + report.check_errors, 0, "{report:?}");
    image.close().unwrap();
}

#[test]
fn growing_over_an_entry_past_the_end_leaks_nothing_under_a_clear_need_check() {
    let (storage, old, _) = image_with_an_entry_past_the_end();
    let image = open_shared(&storage, &rw_options(), None);
    image.resize(old).unwrap();
    let report = image.check(Repair::None).unwrap();
    let header = qed_image::Header::decode(&storage.to_bytes()).unwrap();
    assert!(
        report.leaks == 0 || header.needs_check(),
        "{} leaked clusters with NEED_CHECK clear on disk: {report:?}",
        report.leaks
    );
}

/// A request range owned by one thread; `upper` ranges lie past the small size.
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: u64,
    len: u64,
    upper: bool,
}

#[test]
fn requests_racing_resizes_never_see_half_a_change() {
    let (cs, ts) = (4096u32, 1u32);
    let g = Geometry::new(cs, ts).unwrap();
    let c = g.cluster_size();
    let cov = g.l2_coverage();
    let big = 3 * cov;
    let small = cov + 5 * c + 1536;
    let storage = create_memory(&params(big, cs, ts, None, false));
    let image = open_shared(&storage, &rw_options(), None);
    let threads = 3u64;
    let slots: Vec<Vec<Slot>> = (0..threads)
        .map(|t| {
            let mut s: Vec<Slot> = (0..3)
                .map(|k| Slot {
                    offset: (t * 3 + k) * (2 * c + 1000) + 300,
                    len: c + 700,
                    upper: false,
                })
                .collect();
            let upper: &[(u64, u64)] = match t {
                // In the tail of the partial last cluster of the small disk, and in the last
                // table, which a shrink drops whole.
                0 => &[(small, 1000), (2 * cov + 9 * c + 5, c + 1)],
                // In the same L2 table as the small end.
                1 => &[(cov + 20 * c + 77, 2 * c)],
                // Across the boundary of the last two tables.
                _ => &[(2 * cov - 900, 1800)],
            };
            s.extend(upper.iter().map(|&(offset, len)| Slot {
                offset,
                len,
                upper: true,
            }));
            if t == 0 {
                // Up to the small end: kept by every shrink.
                s.push(Slot {
                    offset: small - 1636,
                    len: 1636,
                    upper: false,
                });
            }
            s
        })
        .collect();
    for s in slots.iter().flatten() {
        assert!(s.offset + s.len <= big);
        assert_eq!(s.upper, s.offset >= small, "{s:?}");
        assert!(s.upper || s.offset + s.len <= small, "{s:?}");
    }
    let rounds = 1500u64;
    let min_resizes = 20;
    // Workers that have finished.
    let done = AtomicU64::new(0);
    let last_values: Vec<Vec<Option<Vec<u8>>>> = std::thread::scope(|scope| {
        let image = &image;
        let done = &done;
        let workers: Vec<_> = slots
            .iter()
            .enumerate()
            .map(|(t, mine)| {
                scope.spawn(move || {
                    let mut last: Vec<Option<Vec<u8>>> = vec![None; mine.len()];
                    for round in 0..rounds {
                        for (k, slot) in mine.iter().enumerate() {
                            let seed = ((t as u64) << 32) | (round << 8) | k as u64;
                            let value = pattern(seed, slot.offset, slot.len as usize);
                            match image.write_at(&value, slot.offset) {
                                Ok(()) => last[k] = Some(value.clone()),
                                Err(Error::OutOfRange { .. }) if slot.upper => {}
                                Err(e) => panic!("write {slot:?}: {e}"),
                            }
                            let mut got = vec![0u8; slot.len as usize];
                            match image.read_at(&mut got, slot.offset) {
                                Ok(()) => {
                                    let own = last[k].as_deref() == Some(&got[..]);
                                    let zeros = slot.upper && got.iter().all(|&b| b == 0);
                                    assert!(
                                        own || zeros,
                                        "{slot:?} reads neither what was written last nor zeros"
                                    );
                                }
                                Err(Error::OutOfRange { .. }) if slot.upper => {}
                                Err(e) => panic!("read {slot:?}: {e}"),
                            }
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    last
                })
            })
            .collect();
        let resizer = scope.spawn(move || {
            let mut cycles = 0;
            while cycles < min_resizes || done.load(Ordering::SeqCst) < threads {
                image.resize(small).expect("shrink");
                image.resize(big).expect("grow");
                cycles += 1;
            }
            cycles
        });
        let last = workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect();
        let cycles = resizer.join().expect("resizer");
        eprintln!("{cycles} shrink and grow cycles");
        last
    });
    assert_eq!(image.size(), big);
    let verify = |image: &Image, what: &str| {
        for (mine, last) in slots.iter().zip(&last_values) {
            for (slot, value) in mine.iter().zip(last) {
                let got = read_range(image, slot.offset, slot.len as usize);
                let own = value.as_deref() == Some(&got[..]);
                let zeros = slot.upper && got.iter().all(|&b| b == 0);
                assert!(own || zeros, "{what}: {slot:?}");
                if !slot.upper {
                    assert!(own, "{what}: {slot:?} lost its last write");
                }
            }
        }
        assert_check_clean(image, what);
    };
    verify(&image, "after the race");
    image.close().unwrap();
    let image = open_shared(&storage, &rw_options(), None);
    assert!(image.open_repair().is_none(), "closed dirty");
    verify(&image, "after reopening");
}

// ---------------------------------------------------------------------------------------
// set_backing

/// Writes a raw file of `len` bytes of pattern `seed`.
fn raw_file(path: &Path, seed: u64, len: u64) -> Vec<u8> {
    let data = pattern(seed, 0, len as usize);
    std::fs::write(path, &data).unwrap();
    data
}

/// The backing name as the header on disk names it (`None` when it names none).
fn stored_name(path: &Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let header = qed_image::Header::decode(&bytes).unwrap();
    let header_bytes = u64::from(header.header_size) * u64::from(header.cluster_size);
    let start = u64::from(header.backing_filename_offset);
    let end = start + u64::from(header.backing_filename_size);
    assert!(end <= header_bytes, "name outside the header area");
    if header.features & FEATURE_BACKING_FILE == 0 || start == end {
        return None;
    }
    assert!(start >= 64, "name inside the 64 header bytes");
    Some(bytes[start as usize..end as usize].to_vec())
}

#[test]
fn set_backing_raw_then_none_on_a_file_image() {
    let dir = tempfile::tempdir().unwrap();
    let (cs, ts) = (65536u32, 4u32);
    let c = u64::from(cs);
    let size = 4 * c;
    let base = raw_file(&dir.path().join("base.raw"), 7, size);
    let path = new_file(dir.path(), "top.qed", size, cs, ts);
    let mine = vec![0xA1; c as usize];
    let image = open_rw(&path);
    image.write_at(&mine, c).unwrap();
    image.flush().unwrap();
    let features_before = header_of(&path).features;

    image
        .set_backing(Some(NewBacking {
            name: b"base.raw".to_vec(),
            format: Some(BackingFormat::Raw),
            layer: None,
        }))
        .unwrap();
    let header = header_of(&path);
    assert_eq!(
        header.features & (FEATURE_BACKING_FILE | FEATURE_BACKING_FORMAT_NO_PROBE),
        FEATURE_BACKING_FILE | FEATURE_BACKING_FORMAT_NO_PROBE
    );
    assert_eq!(
        header.features & FEATURE_NEED_CHECK,
        features_before & FEATURE_NEED_CHECK
    );
    assert_eq!(header.backing_filename_size, 8);
    assert_eq!(stored_name(&path).as_deref(), Some(&b"base.raw"[..]));
    let info = image.info();
    assert_eq!(info.backing_name.as_deref(), Some(&b"base.raw"[..]));
    assert_eq!(info.backing_format, Some(BackingFormat::Raw));
    assert_eq!(info.backing_path, Some(dir.path().join("base.raw")));
    assert_eq!(
        image.backing().expect("a layer").format(),
        BackingFormat::Raw
    );
    let expect_backed = |image: &Image, what: &str| {
        assert_same(
            &read_range(image, 0, c as usize),
            &base[..c as usize],
            0,
            what,
        );
        assert_same(&read_range(image, c, c as usize), &mine, c, what);
        let rest = &base[2 * c as usize..];
        assert_same(&read_range(image, 2 * c, rest.len()), rest, 2 * c, what);
    };
    expect_backed(&image, "over base.raw");
    image.close().unwrap();
    if require_tool("qemu-img") {
        let info = qemu_info(&path);
        assert_eq!(
            json_top_field(&info, "backing-filename").as_deref(),
            Some("base.raw")
        );
        assert_eq!(
            json_top_field(&info, "backing-filename-format").as_deref(),
            Some("raw")
        );
        let window = qemu_read_window(&path, 0, 2 * c);
        assert_same(
            &window[..c as usize],
            &base[..c as usize],
            0,
            "qemu over base.raw",
        );
        assert_same(&window[c as usize..], &mine, c, "qemu reads our data");
    }
    let image = open_rw(&path);
    expect_backed(&image, "reopened over base.raw");

    image.set_backing(None).unwrap();
    let header = header_of(&path);
    assert_eq!(
        header.features & (FEATURE_BACKING_FILE | FEATURE_BACKING_FORMAT_NO_PROBE),
        0
    );
    assert_eq!(header.backing_filename_size, 0);
    assert_eq!(stored_name(&path), None);
    assert!(image.backing().is_none());
    assert_eq!(image.info().backing_name, None);
    let expect_alone = |image: &Image, what: &str| {
        assert_zeros(image, 0, c, what);
        assert_same(&read_range(image, c, c as usize), &mine, c, what);
        assert_zeros(image, 2 * c, 2 * c, what);
    };
    expect_alone(&image, "standalone");
    image.close().unwrap();
    let image = open_ro(&path);
    expect_alone(&image, "standalone after reopen");
    assert!(image.backing().is_none());
    drop(image);
    if require_tool("qemu-img") {
        let info = qemu_info(&path);
        assert_eq!(json_top_field(&info, "backing-filename"), None, "{info}");
        assert_qemu_img_check(&path);
        assert_fill(&qemu_read_window(&path, 0, c), 0, "qemu reads zeros");
    }
}

#[test]
fn set_backing_to_a_qed_image_leaves_the_format_to_probing() {
    let dir = tempfile::tempdir().unwrap();
    let (cs, ts) = (4096u32, 4u32);
    let c = u64::from(cs);
    let size = 16 * c;
    let base_path = new_file(dir.path(), "base.qed", size, cs, ts);
    let base_data = pattern(8, 0, (4 * c) as usize);
    {
        let base = open_rw(&base_path);
        base.write_at(&base_data, 2 * c).unwrap();
        base.close().unwrap();
    }
    let path = new_file(dir.path(), "top.qed", size, cs, ts);
    let image = open_rw(&path);
    image.write_at(&[0x5A; 100], 3 * c + 10).unwrap();
    image
        .set_backing(Some(NewBacking {
            name: b"base.qed".to_vec(),
            format: Some(BackingFormat::Qed),
            layer: None,
        }))
        .unwrap();
    let header = header_of(&path);
    assert_eq!(
        header.features & (FEATURE_BACKING_FILE | FEATURE_BACKING_FORMAT_NO_PROBE),
        FEATURE_BACKING_FILE
    );
    assert_eq!(stored_name(&path).as_deref(), Some(&b"base.qed"[..]));
    assert_eq!(image.info().backing_format, None);
    // Written before there was a backing file: the rest of that cluster was filled with zeros.
    let mut expected = base_data.clone();
    expected[c as usize..2 * c as usize].fill(0);
    expected[(c + 10) as usize..(c + 110) as usize].fill(0x5A);
    let check = |image: &Image, what: &str| {
        assert_same(
            &read_range(image, 2 * c, (4 * c) as usize),
            &expected,
            2 * c,
            what,
        );
        assert_zeros(image, 0, 2 * c, what);
    };
    check(&image, "over base.qed");
    image.close().unwrap();
    let image = open_ro(&path);
    assert_eq!(
        image.backing().expect("a layer").format(),
        BackingFormat::Qed
    );
    check(&image, "reopened over base.qed");
    drop(image);
    if require_tool("qemu-img") {
        let info = qemu_info(&path);
        assert_eq!(
            json_top_field(&info, "backing-filename").as_deref(),
            Some("base.qed")
        );
        let window = qemu_read_window(&path, 2 * c, 4 * c);
        assert_same(&window, &expected, 2 * c, "qemu over base.qed");
    }
}

#[test]
fn set_backing_refuses_long_names_nul_and_unknown_compat_features() {
    let storage = create_memory(&params(1 << 20, 4096, 4, Some("old.raw"), true));
    let image = open_shared(&storage, &rw_options(), None);
    let before = storage.to_bytes();
    let named = |name: Vec<u8>| NewBacking {
        name,
        format: Some(BackingFormat::Raw),
        layer: None,
    };
    // The header area is one 4 KiB cluster: 4096 - 64 bytes are left for a name.
    match image.set_backing(Some(named(vec![b'n'; 4033]))) {
        Err(Error::InvalidArgument(msg)) => {
            assert!(msg.contains("No space left"), "{msg}")
        }
        other => panic!("a 4033-byte name: {other:?}"),
    }
    for name in [b"ab\0cd".to_vec(), b"\0".to_vec(), Vec::new()] {
        match image.set_backing(Some(named(name.clone()))) {
            Err(Error::InvalidArgument(_)) => {}
            other => panic!("name {name:?}: {other:?}"),
        }
    }
    assert_eq!(
        storage.to_bytes(),
        before,
        "a refused name changed the file"
    );
    assert_eq!(image.info().backing_name.as_deref(), Some(&b"old.raw"[..]));
    assert!(!image.is_poisoned());
    // Beside the old name (at 64), a name goes after the first sector: at most 3584 bytes,
    // so that a crash leaves the old name or the new one whole.
    match image.set_backing(Some(named(vec![b'y'; 3585]))) {
        Err(Error::InvalidArgument(msg)) => assert!(msg.contains("No space left"), "{msg}"),
        other => panic!("a 3585-byte name beside the old one: {other:?}"),
    }
    image.set_backing(Some(named(vec![b'y'; 3584]))).unwrap();
    // With no name stored, the longest name that fits the header area (as in QEMU) works.
    image.set_backing(None).unwrap();
    let longest = vec![b'x'; 4032];
    image.set_backing(Some(named(longest.clone()))).unwrap();
    assert_eq!(image.info().backing_name.as_deref(), Some(&longest[..]));
    image.close().unwrap();
    let image = open_shared(&storage, &rw_options(), None);
    assert_eq!(image.info().backing_name.as_deref(), Some(&longest[..]));
    drop(image);

    // Unknown compatible features may own the bytes after the header: no name may be set,
    // but the backing file may still be removed (as QEMU does).
    let storage = create_memory(&params(1 << 20, 4096, 4, Some("old.raw"), true));
    storage.write_at(&0x100u64.to_le_bytes(), 24).unwrap();
    let image = open_shared(&storage, &rw_options(), None);
    let before = storage.to_bytes();
    match image.set_backing(Some(named(b"new.raw".to_vec()))) {
        Err(Error::Unsupported(_)) => {}
        other => panic!("with compat features 0x100: {other:?}"),
    }
    assert_eq!(storage.to_bytes(), before);
    image.set_backing(None).unwrap();
    let header = qed_image::Header::decode(&storage.to_bytes()).unwrap();
    assert_eq!(header.compat_features, 0x100);
    assert!(!header.has_backing_file());
    image.close().unwrap();

    let image = open_shared(&storage, &OpenOptions::read_only(), None);
    match image.set_backing(None) {
        Err(Error::ReadOnly) => {}
        other => panic!("read-only: {other:?}"),
    }
}

#[test]
fn set_backing_to_a_missing_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_file(dir.path(), "top.qed", 1 << 20, 4096, 4);
    let image = open_rw(&path);
    let before = std::fs::read(&path).unwrap();
    let result = image.set_backing(Some(NewBacking {
        name: b"missing.raw".to_vec(),
        format: Some(BackingFormat::Raw),
        layer: None,
    }));
    assert!(result.is_err(), "{result:?}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert!(image.backing().is_none());
    assert!(!image.is_poisoned());
}

#[test]
fn set_backing_with_names_longer_than_a_sector() {
    let dir = tempfile::tempdir().unwrap();
    let (cs, ts) = (4096u32, 4u32);
    let c = u64::from(cs);
    let size = 8 * c;
    let base = raw_file(&dir.path().join("base.raw"), 9, size);
    let base2 = raw_file(&dir.path().join("base2.raw"), 10, size);
    let path = new_file(dir.path(), "top.qed", size, cs, ts);
    open_rw(&path).write_at(&[0x33; 10], 5 * c).unwrap();
    // Names that resolve to files in the same directory, however long.
    let long = |dots: usize, file: &str| format!("{}{file}", "./".repeat(dots)).into_bytes();
    for (name, data, what) in [
        (long(300, "base.raw"), &base, "608 bytes"),
        (long(350, "base2.raw"), &base2, "709 bytes after a long one"),
        (long(1000, "base.raw"), &base, "2008 bytes"),
        (
            b"base2.raw".to_vec(),
            &base2,
            "a short one after a long one",
        ),
        (long(250, "base.raw"), &base, "508 bytes after a short one"),
    ] {
        // Cluster 5 was written with no backing file: zeros after the 10 bytes.
        let mut expected = data.clone();
        expected[5 * c as usize..6 * c as usize].fill(0);
        expected[5 * c as usize..5 * c as usize + 10].fill(0x33);
        let image = open_rw(&path);
        image
            .set_backing(Some(NewBacking {
                name: name.clone(),
                format: Some(BackingFormat::Raw),
                layer: None,
            }))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(stored_name(&path).as_deref(), Some(&name[..]), "{what}");
        assert_eq!(
            image.info().backing_name.as_deref(),
            Some(&name[..]),
            "{what}"
        );
        assert_same(&read_range(&image, 0, size as usize), &expected, 0, what);
        image.close().unwrap();
        let reopened = open_ro(&path);
        assert_eq!(reopened.info().backing_name.as_deref(), Some(&name[..]));
        assert_same(&read_range(&reopened, 0, size as usize), &expected, 0, what);
        drop(reopened);
        if require_tool("qemu-img") {
            let info = qemu_info(&path);
            let shown = json_top_field(&info, "backing-filename");
            assert_eq!(
                shown.as_deref().map(str::as_bytes),
                Some(&name[..]),
                "{what}"
            );
            let window = qemu_read_window(&path, 4 * c, 2 * c);
            assert_same(
                &window,
                &expected[4 * c as usize..6 * c as usize],
                4 * c,
                what,
            );
            assert_qemu_img_check(&path);
        }
    }
}

// ---------------------------------------------------------------------------------------
// reopen

#[test]
fn reopen_of_a_storage_image_is_unsupported() {
    let storage = create_memory(&params(1 << 20, 4096, 4, None, false));
    let image = open_shared(&storage, &rw_options(), None);
    match image.reopen() {
        Err(Error::Unsupported(_)) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn reopen_reads_the_file_again_and_accepts_writes() {
    let dir = tempfile::tempdir().unwrap();
    let c = 4096u64;
    let path = new_file(dir.path(), "r.qed", 64 * c, 4096, 4);
    let image = open_rw(&path);
    image.write_at(&[1; 4096], 0).unwrap();
    image.flush().unwrap();
    // Not flushed: its entry lives only in memory, so a reopen loses it, as a crash would.
    image.write_at(&[2; 4096], 10 * c).unwrap();
    assert_eq!(read_range(&image, 10 * c, 4), [2; 4]);
    let image = image.reopen().expect("reopen");
    assert_eq!(image.path(), Some(path.as_path()));
    assert!(image.is_writable());
    assert!(
        image.open_repair().is_some(),
        "NEED_CHECK was set: the reopen repairs"
    );
    assert_eq!(read_range(&image, 0, 4096), vec![1; 4096], "flushed data");
    assert_zeros(&image, 10 * c, c, "unflushed allocation");
    image.write_at(&[3; 100], 50).unwrap();
    image.write_at(&[4; 4096], 20 * c).unwrap();
    image.flush().unwrap();
    let image = image.reopen().expect("second reopen");
    let mut expected = vec![1; 4096];
    expected[50..150].fill(3);
    assert_eq!(read_range(&image, 0, 4096), expected);
    assert_eq!(read_range(&image, 20 * c, 4096), vec![4; 4096]);
    assert_check_clean(&image, "after reopen");
    image.close().unwrap();
    if require_tool("qemu-img") {
        assert_qemu_img_check(&path);
    }
}

const POISON_CHILD_ENV: &str = "QED_API_POISON_CHILD_IMAGE";

/// The child half of [`reopen_repairs_a_file_image_poisoned_by_a_failed_write_back`]: runs
/// only in the child process that test starts, under a file size limit.
#[test]
#[ignore = "run by reopen_repairs_a_file_image_poisoned_by_a_failed_write_back in a child"]
fn poison_child() {
    let Some(path) = std::env::var_os(POISON_CHILD_ENV) else {
        return;
    };
    let path = PathBuf::from(path);
    let image = open_rw(&path);
    let c = image.cluster_size();
    // A new cluster: its first 512 bytes fit under the limit, the whole cluster does not.
    image.write_at(&[0xB5; 512], 5 * c).unwrap();
    let err = image
        .flush()
        .expect_err("the write-back cannot extend the file");
    match &err {
        Error::Io { source, .. } => {
            assert_eq!(source.raw_os_error(), Some(libc::EFBIG), "{err}")
        }
        other => panic!("flush: {other:?}"),
    }
    assert!(image.is_poisoned());
    assert!(image.poison_cause().is_some());
    assert!(matches!(image.write_at(&[1], 0), Err(Error::Poisoned)));
    assert!(matches!(image.flush(), Err(Error::Poisoned)));
    let image = image.reopen().expect("reopen after the poison");
    assert!(!image.is_poisoned());
    assert!(image.open_repair().is_some(), "NEED_CHECK was set");
    assert_eq!(
        read_range(&image, 0, 2 * c as usize),
        vec![0xA7; 2 * c as usize]
    );
    assert_zeros(&image, 5 * c, c, "the write that never reached the tables");
    // In place: no new space needed, so the limit does not get in the way.
    image.write_at(&[0xC3; 700], 100).unwrap();
    image.flush().unwrap();
    assert_check_clean(&image, "child after reopen");
    image.close().unwrap();
    println!("poison child: reopened and wrote");
}

#[test]
fn reopen_repairs_a_file_image_poisoned_by_a_failed_write_back() {
    // A failed write-back poisons an image. To make one fail on a real file, a child process
    // runs under RLIMIT_FSIZE (with SIGXFSZ ignored, writes past the limit fail with EFBIG).
    if !require_tool("prlimit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = 4096u64;
    let path = new_file(dir.path(), "poison.qed", 64 * c, 4096, 4);
    {
        let image = open_rw(&path);
        image.write_at(&vec![0xA7; 2 * c as usize], 0).unwrap();
        image.close().unwrap();
    }
    let len = std::fs::metadata(&path).unwrap().len();
    let limit = len + 512;
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new("sh");
    child
        .arg("-c")
        .arg("trap '' XFSZ; exec \"$@\"")
        .arg("sh")
        .arg("prlimit")
        .arg(format!("--fsize={limit}:{limit}"))
        .arg(&exe)
        .args(["poison_child", "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(POISON_CHILD_ENV, &path);
    // Started as every child of the tests is (see kit::spawn).
    let out = spawn(&mut child)
        .and_then(std::process::Child::wait_with_output)
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("poison child: reopened and wrote"),
        "child failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    let image = open_rw(&path);
    assert!(image.open_repair().is_none(), "the child closed it cleanly");
    let mut expected = vec![0xA7; 2 * c as usize];
    expected[100..800].fill(0xC3);
    assert_eq!(read_range(&image, 0, expected.len()), expected);
    assert_zeros(&image, 5 * c, c, "lost write");
    image.write_at(&[0xD4; 4096], 9 * c).unwrap();
    image.close().unwrap();
    if require_tool("qemu-img") {
        assert_qemu_img_check(&path);
    }
}

// ---------------------------------------------------------------------------------------
// write_at_fua and flush

#[test]
fn write_at_fua_is_durable_in_every_crash_state_after_it_returns() {
    let configs = [
        CrashConfig {
            cluster_size: 4096,
            table_size: 4,
            backing: true,
        },
        CrashConfig {
            cluster_size: 65536,
            table_size: 4,
            backing: false,
        },
    ];
    for config in configs {
        let c = u64::from(config.cluster_size);
        let cov = config.geometry().l2_coverage();
        let crash = Arc::new(CrashStorage::new(config.create_image()));
        let image = config
            .open(Box::new(crash.clone()), true, 32 << 20)
            .expect("open");
        let windows = config.windows();
        let mut model = windows.initial(&config);
        let mut rng = Rng::new(u64::from(config.cluster_size));
        // Each request: (log position where it started, its effect on the windows).
        let mut steps: Vec<(usize, (usize, Vec<u8>))> = Vec::new();
        // After each FUA write: (log position when it returned, steps before it, windows).
        let mut marks: Vec<(usize, usize, Vec<u8>)> = Vec::new();
        let requests: [(bool, u64, Vec<u8>); 5] = [
            (false, c + 100, rng.bytes(2000)),
            // Allocating, across two clusters, over the backing layer where there is one.
            (true, 3 * c - 700, rng.bytes(1400)),
            (false, cov - 1000, rng.bytes(3000)),
            // In place, inside the cluster of the first write.
            (true, c + 500, rng.bytes(100)),
            // Never flushed until the close.
            (false, 0, rng.bytes(c as usize)),
        ];
        for (fua, offset, data) in requests {
            let start = crash.op_count();
            if fua {
                image.write_at_fua(&data, offset).unwrap();
            } else {
                image.write_at(&data, offset).unwrap();
            }
            let at = windows.flat(offset);
            model[at..at + data.len()].copy_from_slice(&data);
            steps.push((start, (at, data)));
            if fua {
                marks.push((crash.op_count(), steps.len(), model.clone()));
            }
        }
        let start = crash.op_count();
        image.write_zeroes_at(5 * c, c).unwrap();
        steps.push((start, (windows.flat(5 * c), vec![0; c as usize])));
        image.close().unwrap();

        let mut states = 0;
        let mut checked = 0;
        for state in crash.crash_states(&CrashOptions::default()) {
            states += 1;
            // Every crash state after a FUA write returned reads what was written up to it,
            // or what a later request wrote.
            let Some((_, done, flushed)) = marks.iter().rev().find(|(pos, _, _)| state.cut >= *pos)
            else {
                continue;
            };
            checked += 1;
            let pending: Vec<&(usize, Vec<u8>)> = steps[*done..]
                .iter()
                .filter(|(start, _)| *start < state.cut)
                .map(|(_, effect)| effect)
                .collect();
            let what = format!(
                "{}: cut {} {:?} applied {:?} torn {:?}",
                config.name(),
                state.cut,
                state.kind,
                state.applied,
                state.torn
            );
            let storage = Arc::new(MemoryStorage::from_bytes(state.bytes));
            let (image, _) =
                open_and_repair(&config, storage).unwrap_or_else(|e| panic!("{what}: {e}"));
            let got = windows.read(&image).expect("read");
            check_bytes(&windows, &got, flushed, &pending)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        assert!(checked > 0);
        eprintln!(
            "write_at_fua {}: {states} crash states, {checked} after a FUA write returned",
            config.name()
        );
    }
}

/// A memory storage that counts flushes and can hold the first flush after [`arm`] until
/// [`release`].
#[derive(Default)]
struct HeldFlush {
    inner: MemoryStorage,
    flushes: AtomicU64,
    hold: Mutex<Hold>,
    changed: Condvar,
}

#[derive(Default)]
struct Hold {
    armed: bool,
    holding: bool,
    released: bool,
}

impl HeldFlush {
    fn arm(&self) {
        self.hold.lock().unwrap().armed = true;
    }

    fn wait_holding(&self) {
        let mut hold = self.hold.lock().unwrap();
        while !hold.holding {
            hold = self.changed.wait(hold).unwrap();
        }
    }

    fn release(&self) {
        self.hold.lock().unwrap().released = true;
        self.changed.notify_all();
    }

    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }
}

impl Storage for HeldFlush {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        let mut hold = self.hold.lock().unwrap();
        if hold.armed {
            hold.armed = false;
            hold.holding = true;
            self.changed.notify_all();
            while !hold.released {
                hold = self.changed.wait(hold).unwrap();
            }
        }
        drop(hold);
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

/// An image with some data, written back: nothing is dirty.
fn held_flush_image() -> (Arc<HeldFlush>, Image) {
    let storage = Arc::new(HeldFlush::default());
    Image::create_on(&*storage, &params(1 << 20, 4096, 4, None, false)).unwrap();
    let image = open_shared(&storage, &rw_options(), None);
    image.write_at(&[9; 10_000], 3000).unwrap();
    image.flush().unwrap();
    (storage, image)
}

#[test]
fn concurrent_flushes_all_succeed_and_never_flush_more_than_asked() {
    // Whether flushes overlap depends on scheduling: threads that happen to run one after
    // another each flush the storage. What holds every time: every call succeeds, and a call
    // with nothing to write back flushes the storage at most once.
    let (storage, image) = held_flush_image();
    let start = storage.flushes();
    let (threads, calls) = (8u64, 50u64);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..calls {
                    image.flush().expect("flush");
                }
            });
        }
    });
    let flushes = storage.flushes() - start;
    eprintln!("{} flush calls, {flushes} storage flushes", threads * calls);
    assert!(flushes >= 1 && flushes <= threads * calls, "{flushes}");
    image.close().unwrap();
}

/// The state letter of thread `tid` of this process (`R`, `S`, `D`, ...).
fn thread_state(tid: &str) -> char {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 1..];
    after.trim_start().chars().next().expect("state")
}

#[test]
fn flushes_queued_behind_a_slow_one_share_one_storage_flush() {
    // The first flush is held inside the storage flush, holding the write-back lock. Six more
    // are called meanwhile; each takes its ticket and then sleeps on the lock (seen in
    // /proc). When the first returns, the next one covers all six: two storage flushes in all.
    let (storage, image) = held_flush_image();
    let start = storage.flushes();
    let queued = 6;
    std::thread::scope(|s| {
        storage.arm();
        let first = s.spawn(|| image.flush());
        storage.wait_holding();
        let (tx, rx) = mpsc::channel();
        let waiters: Vec<_> = (0..queued)
            .map(|_| {
                let tx = tx.clone();
                let image = &image;
                s.spawn(move || {
                    let me = std::fs::read_link("/proc/thread-self").expect("thread-self");
                    let tid = me.file_name().unwrap().to_string_lossy().into_owned();
                    tx.send(tid).unwrap();
                    image.flush()
                })
            })
            .collect();
        for _ in 0..queued {
            let tid = rx.recv().unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            while thread_state(&tid) != 'S' {
                assert!(
                    Instant::now() < deadline,
                    "flush thread {tid} never blocked"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(storage.flushes() - start, 1, "only the held flush so far");
        storage.release();
        first.join().unwrap().expect("held flush");
        for w in waiters {
            w.join().unwrap().expect("queued flush");
        }
    });
    assert_eq!(
        storage.flushes() - start,
        2,
        "the queued flushes should share one storage flush"
    );
    image.close().unwrap();
}

#[test]
fn a_coalesced_flush_returns_only_when_the_callers_writes_are_durable() {
    let config = CrashConfig {
        cluster_size: 4096,
        table_size: 4,
        backing: false,
    };
    let c = u64::from(config.cluster_size);
    let crash = Arc::new(CrashStorage::new(config.create_image()));
    let image = config
        .open(Box::new(crash.clone()), true, 32 << 20)
        .expect("open");
    let (threads, rounds) = (4u64, 12u64);
    // (thread, log position when its flush returned, offset, data)
    let records: Vec<(u64, usize, u64, Vec<u8>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let image = &image;
                let crash = &crash;
                s.spawn(move || {
                    let mut out = Vec::new();
                    for round in 0..rounds {
                        // First an allocating write, then in place; every other one straddles
                        // two clusters.
                        let offset = t * 3 * c + (round % 2) * (c - 300);
                        let data = pattern(t * 100 + round, offset, 1200);
                        image.write_at(&data, offset).unwrap();
                        image.flush().unwrap();
                        out.push((t, crash.op_count(), offset, data));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    image.close().unwrap();
    let log = crash.log();
    for (t, pos, offset, data) in records {
        let last_flush = log[..pos]
            .iter()
            .rposition(|e| e.op == qed_image::storage::CrashOp::Flush)
            .expect("a flush");
        let disk = MemoryStorage::from_bytes(crash.replay(last_flush + 1));
        let durable = config.open(Box::new(disk), false, 32 << 20).expect("open");
        let got = read_range(&durable, offset, data.len());
        assert_same(
            &got,
            &data,
            offset,
            &format!("thread {t}: durable at {pos}"),
        );
    }
}

// ---------------------------------------------------------------------------------------
// write_zeroes_with

fn fast() -> ZeroFlags {
    ZeroFlags {
        fast_only: true,
        may_unmap: false,
    }
}

#[test]
fn fast_zeroing_fails_rather_than_write_data_and_changes_nothing() {
    let c = 4096u64;
    let size = 8 * c;
    let storage = create_memory(&params(size, 4096, 4, Some("b.raw"), true));
    let backing =
        || BackingLayer::raw(Box::new(PatternStorage { seed: 3, len: size })).expect("backing");
    let image = open_shared(&storage, &rw_options(), Some(backing()));
    image.write_at(&[0x77; 4096], 4 * c).unwrap();
    image.write_zeroes_at(6 * c, c).unwrap();
    image.flush().unwrap();
    let file_before = storage.to_bytes();
    let guest_before = read_range(&image, 0, size as usize);
    let extents_before: Vec<_> = image.extents(0, size).map(|e| e.unwrap()).collect();
    // Parts of clusters over backing data would have to be written as data.
    for (offset, len) in [
        (c + 100, 1000),
        (2 * c - 10, 20),
        (3 * c, c - 512),
        (c + 1, 2 * c),
    ] {
        match image.write_zeroes_with(offset, len, fast()) {
            Err(Error::NotFast { offset: at }) => assert_eq!(at, offset, "{offset}+{len}"),
            other => panic!("fast zeroing {offset}+{len}: {other:?}"),
        }
        image.flush().unwrap();
        assert_eq!(
            storage.to_bytes(),
            file_before,
            "{offset}+{len} changed the file"
        );
        assert_eq!(read_range(&image, 0, size as usize), guest_before);
        let extents: Vec<_> = image.extents(0, size).map(|e| e.unwrap()).collect();
        assert_eq!(extents, extents_before);
    }
    assert!(!image.is_poisoned());
    // What needs no data: a whole cluster over backing data (a zero cluster), part of a data
    // cluster (zeroed in place) and part of a zero cluster (nothing).
    image.write_zeroes_with(c, c, fast()).unwrap();
    image.write_zeroes_with(4 * c + 100, 200, fast()).unwrap();
    image.write_zeroes_with(6 * c + 5, 10, fast()).unwrap();
    assert_eq!(
        image.extents(c, c).next().unwrap().unwrap().kind,
        ExtentKind::Zero
    );
    assert_zeros(&image, c, c, "zero cluster");
    let mut expected = vec![0x77; 4096];
    expected[100..300].fill(0);
    assert_eq!(read_range(&image, 4 * c, 4096), expected);
    assert_eq!(
        read_range(&image, 2 * c, c as usize),
        pattern(3, 2 * c, c as usize)
    );
    assert_check_clean(&image, "after fast zeroing");
    image.close().unwrap();
    let image = open_shared(&storage, &rw_options(), Some(backing()));
    assert_zeros(&image, c, c, "zero cluster after reopen");
    assert_eq!(read_range(&image, 4 * c, 4096), expected);
}

#[test]
fn fast_zeroing_that_fails_leaves_whole_clusters_before_the_partial_one_alone() {
    // NBD's FAST_ZERO: a server that cannot zero fast fails without modifying the disk.
    let c = 4096u64;
    let size = 8 * c;
    let storage = create_memory(&params(size, 4096, 4, Some("b.raw"), true));
    let backing =
        BackingLayer::raw(Box::new(PatternStorage { seed: 3, len: size })).expect("backing");
    let image = open_shared(&storage, &rw_options(), Some(backing));
    let before = read_range(&image, 0, size as usize);
    // A whole cluster over backing data, then part of the next one.
    match image.write_zeroes_with(c, c + 100, fast()) {
        Err(Error::NotFast { offset }) => assert_eq!(offset, 2 * c),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        image.extents(c, c).next().unwrap().unwrap().kind,
        ExtentKind::Unallocated,
        "the whole cluster was changed by a request that failed"
    );
    assert_same(
        &read_range(&image, 0, size as usize),
        &before,
        0,
        "guest after NotFast",
    );
}

#[test]
fn zeroing_with_may_unmap_punches_whole_data_clusters_and_keeps_their_entries() {
    let c = 4096u64;
    let size = 16 * c;
    let memory = create_memory(&params(size, 4096, 4, None, false));
    let counted = Arc::new(FaultStorage::new(memory.clone()));
    let image = open_shared(&counted, &rw_options(), None);
    image.write_at(&pattern(5, 0, (8 * c) as usize), c).unwrap();
    image.flush().unwrap();
    let hosts: Vec<u64> = (1..9).map(|i| host_of(&image, i * c)).collect();
    let len_before = memory.len().unwrap();
    let counts = || {
        let n = counted.counts();
        (n.of(OpKind::PunchHole), n.of(OpKind::WriteZeroes))
    };

    let unmap = ZeroFlags {
        may_unmap: true,
        fast_only: false,
    };
    let (p0, z0) = counts();
    image.write_zeroes_with(c, 3 * c, unmap).unwrap();
    let (p1, z1) = counts();
    assert_eq!((p1 - p0, z1 - z0), (3, 0), "three whole clusters punched");
    // Without may_unmap, whole clusters are zeroed in place; with it, parts of clusters are.
    image
        .write_zeroes_with(4 * c, 2 * c, ZeroFlags::default())
        .unwrap();
    let (p2, z2) = counts();
    assert_eq!((p2 - p1, z2 - z1), (0, 2));
    image.write_zeroes_with(6 * c + 100, c, unmap).unwrap();
    let (p3, z3) = counts();
    assert_eq!(
        (p3 - p2, z3 - z2),
        (0, 2),
        "partial clusters are not punched"
    );

    for (i, &host) in hosts.iter().enumerate() {
        let guest = (i as u64 + 1) * c;
        assert_eq!(
            host_of(&image, guest),
            host,
            "cluster {guest:#x} keeps its entry"
        );
    }
    assert_zeros(&image, c, 5 * c, "zeroed whole clusters");
    assert_eq!(read_range(&image, 6 * c, 100), pattern(5, 5 * c, 100));
    assert_zeros(&image, 6 * c + 100, c, "zeroed across two clusters");
    assert_eq!(
        read_range(&image, 7 * c + 100, (2 * c - 100) as usize),
        pattern(5, 6 * c + 100, (2 * c - 100) as usize)
    );
    image.flush().unwrap();
    assert_eq!(
        memory.len().unwrap(),
        len_before,
        "nothing allocated, nothing cut"
    );
    let report = image.check(Repair::None).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.allocated_clusters, 8, "{report:?}");
    image.close().unwrap();
    parse_layout(&memory.to_bytes()).assert_exact_cover(0);
}

#[test]
fn zeroing_with_may_unmap_leaves_a_file_image_qemu_img_check_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let c = 65536u64;
    let path = new_file(dir.path(), "z.qed", 32 * c, 65536, 4);
    let image = open_rw(&path);
    let data = pattern(6, 0, (10 * c) as usize);
    image.write_at(&data, 2 * c).unwrap();
    image.flush().unwrap();
    let unmap = ZeroFlags {
        may_unmap: true,
        fast_only: false,
    };
    image.write_zeroes_with(3 * c, 4 * c, unmap).unwrap();
    image.write_zeroes_with(8 * c + 1000, 1000, unmap).unwrap();
    image.flush().unwrap();
    assert_check_clean(&image, "after unmapping");
    if require_tool("qemu-img") {
        assert_qemu_img_check(&path);
    }
    image.close().unwrap();
    let image = open_ro(&path);
    let mut expected = data.clone();
    expected[c as usize..5 * c as usize].fill(0);
    expected[(6 * c + 1000) as usize..(6 * c + 2000) as usize].fill(0);
    assert_same(
        &read_range(&image, 2 * c, expected.len()),
        &expected,
        2 * c,
        "after reopen",
    );
    for i in 3..7 {
        host_of(&image, i * c);
    }
    drop(image);
    if require_tool("qemu-img") {
        assert_qemu_img_check(&path);
        assert_same(
            &qemu_read_window(&path, 2 * c, 10 * c),
            &expected,
            2 * c,
            "qemu",
        );
    }
}

// ---------------------------------------------------------------------------------------
// chain_extents_iter

/// The extents of `full` (covering the whole disk) clipped to `[offset, offset + len)`.
fn clipped(full: &[ChainExtent], offset: u64, len: u64) -> Vec<ChainExtent> {
    let end = offset + len;
    if len == 0 {
        return Vec::new();
    }
    full.iter()
        .filter(|e| e.offset < end && e.offset + e.length > offset)
        .map(|e| {
            let from = e.offset.max(offset);
            let to = (e.offset + e.length).min(end);
            let kind = match e.kind {
                ChainKind::Data { host_offset } => ChainKind::Data {
                    host_offset: host_offset + (from - e.offset),
                },
                other => other,
            };
            ChainExtent {
                offset: from,
                length: to - from,
                depth: e.depth,
                kind,
            }
        })
        .collect()
}

/// Checks `chain_extents_iter` over the whole disk and over `ranges`: it equals
/// `chain_extents`, tiles the range, merges what can be merged, and a sub-range gives the
/// whole-disk extents clipped to it. `layers[d]` is the storage of layer `d` (when known),
/// whose bytes at a data extent's host offset the guest must read.
fn check_chain_iter(
    image: &Image,
    layers: &[Option<&dyn Storage>],
    ranges: &[(u64, u64)],
    what: &str,
) {
    let size = image.size();
    let full: Vec<ChainExtent> = image
        .chain_extents_iter(0, size)
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(full, image.chain_extents(0, size).unwrap(), "{what}");
    let mut pos = 0;
    for pair in full.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let joinable = a.depth == b.depth
            && match (a.kind, b.kind) {
                (ChainKind::Data { host_offset: x }, ChainKind::Data { host_offset: y }) => {
                    x + a.length == y
                }
                (x, y) => x == y,
            };
        assert!(!joinable, "{what}: unmerged {a:?} {b:?}");
    }
    for e in &full {
        assert_eq!(e.offset, pos, "{what}: gap or overlap at {e:?}");
        assert!(e.length > 0);
        pos += e.length;
        let n = e.length.min(4096) as usize;
        let got = read_range(image, e.offset, n);
        match e.kind {
            ChainKind::Data { host_offset } => {
                if let Some(Some(layer)) = layers.get(e.depth) {
                    let mut want = vec![0u8; n];
                    layer.read_at(&mut want, host_offset).unwrap();
                    assert_same(&got, &want, e.offset, what);
                }
            }
            _ => assert_fill(&got, 0, &format!("{what}: {e:?}")),
        }
    }
    assert_eq!(pos, size, "{what}");
    for &(offset, len) in ranges {
        let len = len.min(size.saturating_sub(offset));
        let sub: Vec<ChainExtent> = image
            .chain_extents_iter(offset, len)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            sub,
            clipped(&full, offset, len),
            "{what}: {offset:#x}+{len:#x}"
        );
        assert_eq!(sub, image.chain_extents(offset, len).unwrap());
    }
}

#[test]
fn chain_extents_iter_over_fixtures() {
    let Some(dir) = fixture_dir() else { return };
    let mut seen = 0;
    for path in files_with_extension(dir.path(), "qed") {
        let Ok(image) = Image::open(&path, &OpenOptions::read_only()) else {
            continue;
        };
        // Corrupt fixtures stop the iterator with an error; those are tested elsewhere.
        if image.chain_extents(0, image.size()).is_err() {
            continue;
        }
        let size = image.size();
        let cs = image.cluster_size();
        let own = MemoryStorage::from_bytes(std::fs::read(&path).unwrap());
        let mut rng = Rng::new(size);
        let mut ranges = vec![
            (0, size),
            (cs / 2 + 7, size / 2),
            (size.saturating_sub(1000), 5000),
        ];
        for _ in 0..20 {
            let offset = rng.below(size + 1);
            ranges.push((offset, rng.below(size - offset + 1)));
        }
        let what = path.file_name().unwrap().to_string_lossy().into_owned();
        check_chain_iter(&image, &[Some(&own as &dyn Storage)], &ranges, &what);
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} fixtures looked at");
}

#[test]
fn chain_extents_iter_through_a_three_layer_chain() {
    let c = 4096u64;
    let size = 3 * (c * 4096 / 8 * 4) / 2;
    let raw_len = size / 2 + 3 * c + 512;
    let mid_storage = create_memory(&params(size - 2 * c, 4096, 4, Some("raw"), true));
    {
        let mid = open_shared(&mid_storage, &rw_options(), None);
        mid.write_at(&pattern(31, 0, (5 * c) as usize), 2 * c)
            .unwrap();
        mid.write_at(&pattern(32, 0, 100), size / 2 - 50).unwrap();
        mid.write_zeroes_at(20 * c, 4 * c).unwrap();
        mid.write_at(&pattern(33, 0, (3 * c) as usize), size - 6 * c)
            .unwrap();
        mid.close().unwrap();
    }
    let top_storage = create_memory(&params(size, 4096, 4, Some("mid"), false));
    let raw = PatternStorage {
        seed: 30,
        len: raw_len,
    };
    let chain = |writable: bool| {
        let raw_layer = BackingLayer::raw(Box::new(PatternStorage {
            seed: 30,
            len: raw_len,
        }))
        .unwrap();
        let mid = open_shared(&mid_storage, &OpenOptions::read_only(), Some(raw_layer));
        let options = OpenOptions {
            writable,
            ..rw_options()
        };
        open_shared(
            &top_storage,
            &options,
            Some(BackingLayer::Qed(Box::new(mid))),
        )
    };
    {
        let top = chain(true);
        top.write_at(&pattern(34, 0, (2 * c) as usize), 3 * c)
            .unwrap();
        top.write_zeroes_at(21 * c, c).unwrap();
        top.write_at(&pattern(35, 0, 10), size - c).unwrap();
        top.discard(30 * c, 2 * c).unwrap();
        top.close().unwrap();
    }
    let top = chain(false);
    let mut rng = Rng::new(3);
    let mut ranges = vec![
        (0, size),
        (2 * c + 1, 3 * c),
        (size / 2 - 60, 200),
        (size - 7 * c, 7 * c),
    ];
    for _ in 0..40 {
        let offset = rng.below(size + 1);
        ranges.push((offset, rng.below(size - offset + 1)));
    }
    check_chain_iter(
        &top,
        &[
            Some(&*top_storage as &dyn Storage),
            Some(&*mid_storage as &dyn Storage),
            Some(&raw as &dyn Storage),
        ],
        &ranges,
        "three layers",
    );
    let depths: std::collections::BTreeSet<usize> = top
        .chain_extents(0, size)
        .unwrap()
        .iter()
        .filter(|e| e.kind != ChainKind::Unallocated)
        .map(|e| e.depth)
        .collect();
    assert_eq!(depths.into_iter().collect::<Vec<_>>(), [0, 1, 2]);
}

#[test]
fn chain_extents_iter_looks_at_tables_only_as_it_goes() {
    // 4 KiB clusters, one-cluster tables: each L2 table maps 2 MiB. One data cluster in each
    // of 200 tables, so every extent boundary needs another table.
    let g = Geometry::new(4096, 1).unwrap();
    let tables = 200u64;
    let size = tables * g.l2_coverage();
    let memory = create_memory(&params(size, 4096, 1, None, false));
    {
        let image = open_shared(&memory, &rw_options(), None);
        for t in 0..tables {
            image
                .write_at(&[t as u8 + 1; 4096], t * g.l2_coverage())
                .unwrap();
        }
        image.close().unwrap();
    }
    let counted = Arc::new(FaultStorage::new(memory.clone()));
    let options = OpenOptions {
        l2_cache_bytes: 1 << 20,
        ..OpenOptions::read_only()
    };
    let image = open_shared(&counted, &options, None);
    let reads = || counted.counts().of(OpKind::Read);
    let at_open = reads();
    let first: Vec<ChainExtent> = image
        .chain_extents_iter(0, size)
        .take(3)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(first.len(), 3);
    let for_three = reads() - at_open;
    assert!(for_three <= 4, "three extents read {for_three} times");
    let all: Vec<ChainExtent> = image
        .chain_extents_iter(0, size)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(all.len() as u64, 2 * tables);
    assert_eq!(&all[..3], &first[..]);
    // The cache holds every table, so each is read once.
    assert_eq!(
        reads() - at_open,
        tables,
        "the whole walk reads every table once"
    );
}

#[test]
fn chain_extents_iter_walks_a_sparse_4_tib_image() {
    let size = 4u64 << 40;
    let c = 65536u64;
    let memory = create_memory(&params(size, 65536, 4, None, false));
    let image = open_shared(&memory, &rw_options(), None);
    let spots = [0, (1 << 40) + 12345, size - 100];
    for &at in &spots {
        let len = (size - at).min(200) as usize;
        image.write_at(&vec![0x42; len], at).unwrap();
    }
    let started = Instant::now();
    let mut iter = image.chain_extents_iter(0, size);
    let first: Vec<ChainExtent> = iter.by_ref().take(3).map(|e| e.unwrap()).collect();
    assert_eq!(first.len(), 3);
    assert!(matches!(first[0].kind, ChainKind::Data { .. }), "{first:?}");
    assert_eq!((first[0].offset, first[0].length), (0, c));
    assert_eq!(first[1].kind, ChainKind::Unallocated);
    assert_eq!(first[2].offset, ((1u64 << 40) + 12345) / c * c);
    let rest: Vec<ChainExtent> = iter.map(|e| e.unwrap()).collect();
    let all: Vec<ChainExtent> = first.iter().chain(&rest).copied().collect();
    assert_eq!(all.len(), 5, "{all:?}");
    assert_eq!(all.iter().map(|e| e.length).sum::<u64>(), size);
    assert_eq!(all, image.chain_extents(0, size).unwrap());
    eprintln!("4 TiB walk: {:?}", started.elapsed());
    image.close().unwrap();
}

//! The whole-disk operations on random images in memory, with raw and QED backing layers:
//! block status tells the truth about what reads as zeros, convert copies exactly (to raw
//! and to QED, over a backing file too), compare finds the first differing sector.

mod kit;

use std::sync::Arc;

use kit::*;
use qed_image::ops::{
    self, CompareOptions, CompareOutcome, ConvertOptions, Disk, RawDisk, StatusKind,
};
use qed_image::storage::{MemoryStorage, Storage};
use qed_image::Image;

const SIZE: u64 = 6 << 20;

/// A backing layer: none, a raw pattern file shorter than the image, or a QED image with
/// random contents (itself over nothing).
fn backing(rng: &mut Rng, kind: u64) -> BackingSpec {
    match kind {
        0 => BackingSpec::None,
        1 => BackingSpec::Raw(Arc::new(PatternStorage {
            seed: rng.next_u64(),
            len: SIZE / 2 + 1000,
        })),
        _ => {
            let storage = create_memory(&params(SIZE - (1 << 20), 8192, 2, None, false));
            let image = open_shared(&storage, &rw_options(), None);
            scribble(rng, &image, 10);
            image.close().expect("close base");
            BackingSpec::Qed(storage)
        }
    }
}

/// Random writes, zero writes and discards.
fn scribble(rng: &mut Rng, image: &Image, count: usize) {
    let size = image.size();
    for _ in 0..count {
        let offset = rng.below(size);
        let len = rng.range(1..=(256 << 10)).min(size - offset);
        match rng.below(5) {
            0 => image.write_zeroes_at(offset, len).expect("zero"),
            1 => image.discard(offset, len).expect("discard"),
            2 => image
                .write_at(&vec![0; len as usize], offset)
                .expect("zeros"),
            _ => image
                .write_at(&pattern(rng.next_u64(), offset, len as usize), offset)
                .expect("write"),
        }
    }
}

fn read_all(disk: &Disk) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).expect("read disk");
    buf
}

fn new_qed(size: u64, cluster_size: u32, spec: &BackingSpec) -> Disk {
    let storage = create_memory(&params(size, cluster_size, 4, None, false));
    Disk::Qed(open_shared(&storage, &rw_options(), spec.layer()))
}

fn new_raw(size: u64) -> Disk {
    let storage = MemoryStorage::new();
    storage.set_len(size).expect("set_len");
    Disk::Raw(RawDisk::new(Box::new(storage), true).expect("raw disk"))
}

#[test]
fn block_status_convert_and_compare_agree_with_the_bytes() {
    for seed in 0..9 {
        let mut rng = Rng::new(seed);
        let spec = backing(&mut rng, seed % 3);
        let cluster = [4096, 65536][(seed % 2) as usize];
        let storage = create_memory(&params(SIZE, cluster, 2, None, false));
        let image = open_shared(&storage, &rw_options(), spec.layer());
        scribble(&mut rng, &image, 30);
        let source = Disk::Qed(image);
        let bytes = read_all(&source);

        // Block status covers the disk once, and what it calls zero reads as zeros.
        let mut pos = 0;
        for status in source.block_status(0, SIZE) {
            let status = status.expect("status");
            assert_eq!(status.offset, pos, "seed {seed}");
            let range = &bytes[pos as usize..(pos + status.length) as usize];
            if status.kind.is_zero() {
                assert!(range.iter().all(|&b| b == 0), "seed {seed}: {status:?}");
            }
            if status.kind == StatusKind::Unallocated {
                assert!(!status.kind.is_present());
            }
            pos += status.length;
        }
        assert_eq!(pos, SIZE);
        let entries: Vec<_> = ops::map(&source, 0, None).map(|e| e.unwrap()).collect();
        assert_eq!(entries.iter().map(|e| e.length).sum::<u64>(), SIZE);

        // To raw: the same bytes, with progress reaching the end.
        let raw = new_raw(SIZE);
        let mut seen = Vec::new();
        let options = ConvertOptions {
            target_is_zero: true,
            ..ConvertOptions::default()
        };
        ops::convert(&source, &raw, &options, &mut |done, total| {
            seen.push((done, total));
        })
        .expect("convert to raw");
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "seed {seed}");
        assert_eq!(seen.last(), Some(&(SIZE, SIZE)));
        assert!(read_all(&raw) == bytes, "seed {seed}: raw copy differs");

        // To QED with another cluster size, and with a different sparse block.
        let copy = new_qed(SIZE, 16384, &BackingSpec::None);
        let options = ConvertOptions {
            target_is_zero: true,
            sparse_size: 64 << 10,
            ..ConvertOptions::default()
        };
        ops::convert(&source, &copy, &options, &mut |_, _| {}).expect("convert to qed");
        assert!(read_all(&copy) == bytes, "seed {seed}: QED copy differs");
        let same = ops::compare(&source, &copy, &CompareOptions::default(), &mut |_, _| {});
        assert_eq!(
            same.expect("compare"),
            CompareOutcome::Identical {
                size_mismatch: false
            }
        );

        // One byte changed: found at the start of its sector.
        let at = rng.below(SIZE);
        let flipped = [bytes[at as usize] ^ 0x80];
        copy.write_at(&flipped, at).expect("flip");
        for strict in [false, true] {
            let outcome = ops::compare(&source, &copy, &CompareOptions { strict }, &mut |_, _| {})
                .expect("compare");
            match outcome {
                CompareOutcome::ContentMismatch { offset, .. } => {
                    assert_eq!(offset, at & !511, "seed {seed}")
                }
                CompareOutcome::StatusMismatch { offset } if strict => {
                    assert!(offset <= at, "seed {seed}")
                }
                other => panic!("seed {seed}: {other:?}"),
            }
        }

        // Over the same backing layer, writing only what differs from it.
        if !matches!(spec, BackingSpec::None) {
            let backed = new_qed(SIZE, 4096, &spec);
            let options = ConvertOptions {
                diff_backing: true,
                ..ConvertOptions::default()
            };
            let stats = ops::convert(&source, &backed, &options, &mut |_, _| {})
                .expect("convert over backing");
            assert!(
                read_all(&backed) == bytes,
                "seed {seed}: backed copy differs"
            );
            let own: u64 = source
                .image()
                .unwrap()
                .extents(0, SIZE)
                .map(|e| e.unwrap())
                .filter(|e| e.kind != qed_image::ExtentKind::Unallocated)
                .map(|e| e.length)
                .sum();
            assert!(
                stats.written <= own + SIZE / 8,
                "seed {seed}: {stats:?}, source holds {own}"
            );
        }
    }
}

#[test]
fn a_full_copy_without_sparse_detection_allocates_everything() {
    let mut rng = Rng::new(42);
    let storage = create_memory(&params(SIZE, 65536, 4, None, false));
    let image = open_shared(&storage, &rw_options(), None);
    scribble(&mut rng, &image, 5);
    let source = Disk::Qed(image);
    let copy = new_qed(SIZE, 65536, &BackingSpec::None);
    let options = ConvertOptions {
        sparse_size: 0,
        target_is_zero: true,
        ..ConvertOptions::default()
    };
    let stats = ops::convert(&source, &copy, &options, &mut |_, _| {}).expect("convert");
    assert_eq!(stats.written, SIZE);
    let statuses: Vec<_> = copy.block_status(0, SIZE).map(|s| s.unwrap()).collect();
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert!(statuses[0].kind.is_data());
    assert!(read_all(&copy) == read_all(&source));
}

#[test]
fn bad_arguments_change_nothing() {
    let source = new_qed(SIZE, 65536, &BackingSpec::None);
    let small = new_qed(SIZE / 2, 65536, &BackingSpec::None);
    let err = ops::convert(&source, &small, &ConvertOptions::default(), &mut |_, _| {})
        .expect_err("target too small");
    assert!(err.to_string().contains("smaller"), "{err}");
    let target = new_qed(SIZE, 65536, &BackingSpec::None);
    let odd = ConvertOptions {
        sparse_size: 1000,
        ..ConvertOptions::default()
    };
    assert!(ops::convert(&source, &target, &odd, &mut |_, _| {}).is_err());
}

/// A QED target in memory, its storage kept to compare layouts.
fn new_qed_on(size: u64, cluster_size: u32, spec: &BackingSpec) -> (Arc<MemoryStorage>, Disk) {
    let storage = create_memory(&params(size, cluster_size, 4, None, false));
    let disk = Disk::Qed(open_shared(&storage, &rw_options(), spec.layer()));
    (storage, disk)
}

#[test]
fn parallel_copies_write_what_one_thread_writes() {
    for seed in 0..6 {
        let mut rng = Rng::new(100 + seed);
        let spec = backing(&mut rng, seed % 3);
        let storage = create_memory(&params(
            SIZE,
            [4096, 65536][(seed % 2) as usize],
            2,
            None,
            false,
        ));
        let image = open_shared(&storage, &rw_options(), spec.layer());
        scribble(&mut rng, &image, 40);
        let source = Disk::Qed(image);
        let bytes = read_all(&source);
        let diff_backing = seed % 3 != 0 && seed >= 3;
        let target_spec = if diff_backing {
            spec.clone()
        } else {
            BackingSpec::None
        };
        let copy = |parallel, out_of_order| {
            let (storage, target) = new_qed_on(SIZE, 4096, &target_spec);
            let options = ConvertOptions {
                target_is_zero: !diff_backing,
                diff_backing,
                parallel,
                out_of_order,
                ..ConvertOptions::default()
            };
            let mut seen = Vec::new();
            let stats = ops::convert(&source, &target, &options, &mut |done, total| {
                seen.push((done, total))
            })
            .unwrap_or_else(|e| panic!("seed {seed}, {parallel} in flight: {e}"));
            assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "seed {seed}");
            assert_eq!(seen.last(), Some(&(SIZE, SIZE)), "seed {seed}");
            assert!(
                read_all(&target) == bytes,
                "seed {seed}, {parallel}: contents differ"
            );
            let report = target
                .image()
                .unwrap()
                .check(qed_image::Repair::None)
                .unwrap();
            assert!(report.is_clean(), "seed {seed}, {parallel}: {report:?}");
            target.close().expect("close");
            (storage.to_bytes(), stats)
        };
        let (one, one_stats) = copy(1, false);
        // Up to 4 in flight, chunks are as large as in one thread: the same writes in the same
        // order make the same file.
        for parallel in [2, 4] {
            let (file, stats) = copy(parallel, false);
            assert!(
                file == one,
                "seed {seed}: {parallel} in flight laid out another file"
            );
            assert_eq!(stats, one_stats, "seed {seed}, {parallel}");
        }
        for (parallel, out_of_order) in [(8, false), (16, false), (8, true), (3, true)] {
            let (file, _) = copy(parallel, out_of_order);
            assert!(
                file.len() <= one.len() + (1 << 20),
                "seed {seed}: {} vs {}",
                file.len(),
                one.len()
            );
        }
    }
}

#[test]
fn parallel_copies_refuse_a_count_out_of_range() {
    let source = new_qed(SIZE, 65536, &BackingSpec::None);
    let target = new_qed(SIZE, 65536, &BackingSpec::None);
    for parallel in [0, 17] {
        let options = ConvertOptions {
            parallel,
            ..ConvertOptions::default()
        };
        let err = ops::convert(&source, &target, &options, &mut |_, _| {}).expect_err("refused");
        assert!(err.to_string().contains("in flight"), "{err}");
    }
}

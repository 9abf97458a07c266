//! Random operation sequences on an in-memory image, checked against a reference disk after
//! every step, over four geometries and three kinds of backing layer; and a light
//! crash-ordering check of what a flush makes durable.

mod kit;

use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use qed_image::storage::{MemoryStorage, Storage};
use qed_image::{Image, OpenOptions};

use kit::Rng;
use kit::*;

/// Where an operation lands: near one of the interesting points of the disk (start, the L2
/// table boundaries, the end), a few clusters either side, at any byte, sector or cluster
/// alignment.
#[derive(Debug, Clone, Copy)]
struct Spot {
    anchor: u8,
    clusters: i8,
    bytes: u32,
    align: u8,
}

/// How long an operation is: a few bytes, whole clusters, or anything up to several clusters.
#[derive(Debug, Clone, Copy)]
struct Len {
    kind: u8,
    value: u32,
}

#[derive(Debug, Clone)]
enum Op {
    Write { at: Spot, len: Len },
    WriteZeroes { at: Spot, len: Len },
    Discard { at: Spot, len: Len },
    Read { at: Spot, len: Len },
    Flush,
    Reopen,
}

#[derive(Debug, Clone)]
struct Case {
    /// The disk ends on a cluster boundary (else 1.5 KiB into a cluster).
    aligned_size: bool,
    /// The backing layer is shorter than the disk.
    short_backing: bool,
    /// An L2 cache so small that tables are written back and evicted all the time.
    tiny_cache: bool,
    seed: u64,
    ops: Vec<Op>,
}

fn spot() -> impl Strategy<Value = Spot> {
    (0u8..5, -3i8..=3, any::<u32>(), 0u8..3).prop_map(|(anchor, clusters, bytes, align)| Spot {
        anchor,
        clusters,
        bytes,
        align,
    })
}

fn len() -> impl Strategy<Value = Len> {
    (0u8..4, any::<u32>()).prop_map(|(kind, value)| Len { kind, value })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (spot(), len()).prop_map(|(at, len)| Op::Write { at, len }),
        2 => (spot(), len()).prop_map(|(at, len)| Op::WriteZeroes { at, len }),
        2 => (spot(), len()).prop_map(|(at, len)| Op::Discard { at, len }),
        1 => (spot(), len()).prop_map(|(at, len)| Op::Read { at, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
        prop::collection::vec(op(), 1..=40),
    )
        .prop_map(
            |(aligned_size, short_backing, tiny_cache, seed, ops)| Case {
                aligned_size,
                short_backing,
                tiny_cache,
                seed,
                ops,
            },
        )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    None,
    Raw,
    Qed,
}

/// The disk under test: its geometry and the points operations cluster around.
struct Disk {
    cs: u64,
    size: u64,
    anchors: [u64; 5],
}

impl Disk {
    fn new(cluster_size: u32, table_size: u32, aligned_size: bool) -> Self {
        let cs = u64::from(cluster_size);
        let coverage = cs * cs / 8 * u64::from(table_size);
        // Four L2 tables: three full ones and part of a fourth.
        let size = 3 * coverage + if aligned_size { 6 * cs } else { 5 * cs + 1536 };
        Self {
            cs,
            size,
            anchors: [0, coverage, 2 * coverage, 3 * coverage, size],
        }
    }

    fn offset(&self, at: Spot) -> u64 {
        let anchor = self.anchors[usize::from(at.anchor) % 5] as i64;
        let within = match at.align {
            0 => u64::from(at.bytes) % self.cs,
            1 => u64::from(at.bytes) % self.cs / 512 * 512,
            _ => 0,
        };
        let off = anchor + i64::from(at.clusters) * self.cs as i64 + within as i64;
        off.clamp(0, self.size as i64 - 1) as u64
    }

    fn len(&self, offset: u64, len: Len) -> u64 {
        let v = u64::from(len.value);
        let want = match len.kind {
            0 => 1 + v % 600,
            1 => (1 + v % 4) * self.cs,
            2 => 1 + v % (4 * self.cs),
            _ => 1 + v % (10 * self.cs),
        };
        want.min(self.size - offset)
    }

    fn align_down(&self, x: u64) -> u64 {
        x - x % self.cs
    }
}

/// The backing layer of a case and the model of what it reads.
fn make_backing(kind: Backing, disk: &Disk, case: &Case, cs: u32, ts: u32) -> (BackingSpec, Base) {
    let seed = case.seed % 1000;
    let len = if case.short_backing {
        // Ends a cluster and a half past the third table boundary: COW straddles it.
        disk.anchors[2] + disk.cs + disk.cs / 2 + 512
    } else {
        disk.size
    };
    match kind {
        Backing::None => (BackingSpec::None, Base::Zeros),
        Backing::Raw => {
            let storage: Arc<dyn Storage> = if len <= 64 << 20 {
                Arc::new(MemoryStorage::from_bytes(pattern(seed, 0, len as usize)))
            } else {
                Arc::new(PatternStorage { seed, len })
            };
            (BackingSpec::Raw(storage), Base::Pattern { seed, len })
        }
        Backing::Qed => {
            let size = len - len % 512;
            let storage = create_memory(&params(size, cs, ts, None, false));
            let image = open_shared(&storage, &rw_options(), None);
            let mut model = SparseDisk::new(size, Base::Zeros);
            let mut rng = Rng::new(case.seed);
            for i in 0..12 {
                let anchor = disk.anchors[(i % 5) as usize];
                let hi = (anchor + 3 * disk.cs).min(size);
                let lo = anchor.saturating_sub(3 * disk.cs).min(hi - 1);
                let off = rng.range(lo..hi);
                let n = rng.range(1..3 * disk.cs).min(size - off);
                let data = pattern(seed + 500 + i, off, n as usize);
                image.write_at(&data, off).unwrap();
                model.write(off, &data);
            }
            // A zero cluster in the backing layer.
            let z = disk.align_down(disk.anchors[1]);
            if z + disk.cs <= size {
                image.write_zeroes_at(z, disk.cs).unwrap();
                model.zero(z, disk.cs);
            }
            image.close().unwrap();
            (BackingSpec::Qed(storage), Base::Disk(Box::new(model)))
        }
    }
}

fn options(case: &Case, table_bytes: u64) -> OpenOptions {
    let mut options = rw_options();
    if case.tiny_cache {
        options.l2_cache_bytes = table_bytes as usize;
    }
    options
}

fn run(cluster_size: u32, table_size: u32, kind: Backing, case: &Case) {
    let disk = Disk::new(cluster_size, table_size, case.aligned_size);
    let cs = disk.cs;
    let table_bytes = cs * u64::from(table_size);
    let (backing, base) = make_backing(kind, &disk, case, cluster_size, table_size);
    let name = match kind {
        Backing::None => None,
        Backing::Raw => Some("backing.raw"),
        Backing::Qed => Some("backing.qed"),
    };
    let storage = create_memory(&params(
        disk.size,
        cluster_size,
        table_size,
        name,
        kind == Backing::Raw,
    ));
    let options = options(case, table_bytes);
    let mut image = open_shared(&storage, &options, backing.layer());
    let mut model = SparseDisk::new(disk.size, base);
    // Discarded data clusters stay in the file (leaks, until a repair).
    let windows: Vec<(u64, u64)> = disk
        .anchors
        .iter()
        .map(|&a| {
            let lo = a.saturating_sub(4 * cs);
            (lo, (a + 4 * cs).min(disk.size) - lo)
        })
        .collect();
    for (step, op) in case.ops.iter().enumerate() {
        let what = format!("step {step}: {op:?}");
        let touched = match *op {
            Op::Write { at, len } => {
                let off = disk.offset(at);
                let n = disk.len(off, len);
                let data = pattern(case.seed.wrapping_add(1 + step as u64), off, n as usize);
                image.write_at(&data, off).unwrap();
                model.write(off, &data);
                Some((off, n))
            }
            Op::WriteZeroes { at, len } => {
                let off = disk.offset(at);
                let n = disk.len(off, len);
                image.write_zeroes_at(off, n).unwrap();
                model.zero(off, n);
                Some((off, n))
            }
            Op::Discard { at, len } => {
                let off = disk.offset(at);
                let n = disk.len(off, len);
                let zeroed = discarded(disk.size, cs, off, n);
                image.discard(off, n).unwrap();
                model.zero(zeroed.start, zeroed.end - zeroed.start);
                Some((off, n))
            }
            Op::Read { at, len } => {
                let off = disk.offset(at);
                Some((off, disk.len(off, len)))
            }
            Op::Flush => {
                image.flush().unwrap();
                None
            }
            Op::Reopen => {
                image.close().unwrap();
                let layout = parse_layout(&storage.to_bytes());
                assert!(!layout.dirty(), "{what}: NEED_CHECK set after close");
                // Discard keeps data clusters' entries: no sequence leaves a leak.
                layout.assert_exact_cover(0);
                image = open_shared(&storage, &options, backing.layer());
                assert!(!image.info().dirty, "{what}: dirty after reopen");
                check_written(&image, &model, &[], &what);
                None
            }
        };
        if let Some((off, n)) = touched {
            let lo = off.saturating_sub(cs);
            let hi = (off + n + cs).min(disk.size);
            check_range(&image, &model, lo, hi - lo, &what);
        }
    }
    check_written(&image, &model, &windows, "before close");
    check_extents(&image, &*storage, &model);
    image.close().unwrap();
    let layout = parse_layout(&storage.to_bytes());
    assert!(!layout.dirty(), "NEED_CHECK set after close");
    layout.assert_exact_cover(0);
    let image = open_shared(&storage, &OpenOptions::read_only(), backing.layer());
    assert!(!image.info().dirty, "dirty after the final reopen");
    check_written(&image, &model, &windows, "after close");
    let summary = check_extents(&image, &*storage, &model);
    assert_eq!(
        summary.data.len(),
        layout.data.len(),
        "extents and L2 tables disagree on the number of data clusters"
    );
}

fn config() -> Config {
    Config {
        cases: 64,
        rng_seed: RngSeed::Fixed(0x9ed),
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    }
}

macro_rules! model_tests {
    ($($name:ident: $cs:expr, $ts:expr, $backing:expr;)*) => {
        proptest! {
            #![proptest_config(config())]
            $(
                #[test]
                fn $name(case in case()) {
                    run($cs, $ts, $backing, &case);
                }
            )*
        }
    };
}

model_tests! {
    model_4k_ts1_no_backing: 4096, 1, Backing::None;
    model_4k_ts1_raw_backing: 4096, 1, Backing::Raw;
    model_4k_ts1_qed_backing: 4096, 1, Backing::Qed;
    model_4k_ts4_no_backing: 4096, 4, Backing::None;
    model_4k_ts4_raw_backing: 4096, 4, Backing::Raw;
    model_4k_ts4_qed_backing: 4096, 4, Backing::Qed;
    model_64k_ts1_no_backing: 65536, 1, Backing::None;
    model_64k_ts1_raw_backing: 65536, 1, Backing::Raw;
    model_64k_ts1_qed_backing: 65536, 1, Backing::Qed;
    model_64k_ts4_no_backing: 65536, 4, Backing::None;
    model_64k_ts4_raw_backing: 65536, 4, Backing::Raw;
    model_64k_ts4_qed_backing: 65536, 4, Backing::Qed;
}

/// One operation of the crash workload, with what it may leave behind at a crash.
#[derive(Debug, Clone)]
enum CrashOp {
    Write(u64, Vec<u8>),
    WriteZeroes(u64, u64),
    Discard(u64, u64),
}

/// Whether byte `p` of a crash image is acceptable: the value at the last completed flush,
/// or anything an operation after it (all of `pending`) may have put there.
fn acceptable(p: u64, byte: u8, durable: &[u8], start: u64, pending: &[CrashOp]) -> bool {
    if byte == durable[(p - start) as usize] {
        return true;
    }
    pending.iter().any(|op| match op {
        CrashOp::Write(off, data) => {
            p >= *off && p < off + data.len() as u64 && data[(p - off) as usize] == byte
        }
        CrashOp::WriteZeroes(off, len) | CrashOp::Discard(off, len) => {
            p >= *off && p < off + len && byte == 0
        }
    })
}

/// Cuts the I/O of a workload at every storage flush (dropping everything after it), and checks
/// that the image opens read-only, its tables are sound, every range reads what it held at
/// the last completed `Image::flush` (ranges changed since may hold old or new bytes), and a
/// writable open repairs it to an exactly covered file with the same contents.
fn crash_at_every_flush(cluster_size: u32, table_size: u32, kind: Backing, seed: u64) {
    let case = Case {
        aligned_size: true,
        short_backing: seed % 2 == 0,
        tiny_cache: seed % 3 == 0,
        seed,
        ops: Vec::new(),
    };
    let disk = Disk::new(cluster_size, table_size, true);
    let cs = disk.cs;
    let (backing, base) = make_backing(kind, &disk, &case, cluster_size, table_size);
    let name = (kind != Backing::None).then_some("backing");
    let created = MemoryStorage::new();
    Image::create_on(
        &created,
        &params(
            disk.size,
            cluster_size,
            table_size,
            name,
            kind == Backing::Raw,
        ),
    )
    .unwrap();
    let recorder = Arc::new(RecordingStorage::new(created.to_bytes()));
    let image = open_shared(
        &recorder,
        &options(&case, cs * u64::from(table_size)),
        backing.layer(),
    );

    // Phases of operations, each ended by a flush; models[k] holds the disk after phase k.
    let mut rng = Rng::new(seed);
    let mut model = SparseDisk::new(disk.size, base);
    let mut models = vec![model.clone()];
    let mut phases: Vec<Vec<CrashOp>> = Vec::new();
    let mut flushed_at = vec![0usize];
    for phase in 0..6 {
        let mut ops = Vec::new();
        for i in 0..6 {
            let at = Spot {
                anchor: rng.range(0..5) as u8,
                clusters: rng.range(0..7) as i8 - 3,
                bytes: rng.next_u64() as u32,
                align: rng.range(0..3) as u8,
            };
            let off = disk.offset(at);
            let n = disk.len(
                off,
                Len {
                    kind: rng.range(0..3) as u8,
                    value: rng.next_u64() as u32,
                },
            );
            let op = match rng.range(0..8) {
                0 => CrashOp::WriteZeroes(off, n),
                1 => CrashOp::Discard(off, n),
                _ => CrashOp::Write(off, pattern(seed * 100 + phase * 10 + i, off, n as usize)),
            };
            match &op {
                CrashOp::Write(off, data) => {
                    image.write_at(data, *off).unwrap();
                    model.write(*off, data);
                }
                CrashOp::WriteZeroes(off, n) => {
                    image.write_zeroes_at(*off, *n).unwrap();
                    model.zero(*off, *n);
                }
                CrashOp::Discard(off, n) => {
                    image.discard(*off, *n).unwrap();
                    let zeroed = discarded(disk.size, cs, *off, *n);
                    model.zero(zeroed.start, zeroed.end - zeroed.start);
                }
            }
            ops.push(op);
        }
        image.flush().unwrap();
        flushed_at.push(recorder.position());
        models.push(model.clone());
        phases.push(ops);
    }
    // Nothing after the last flush: a crash during close loses nothing.
    image.close().unwrap();
    phases.push(Vec::new());

    let events = recorder.events();
    // Cut at every flush (everything unflushed lost) and at about 24 points in between (a
    // killed process: everything written so far reached the file, in order).
    let flushes = events.iter().filter(|e| matches!(e, Event::Flush)).count();
    assert!(flushes > phases.len(), "too few flushes to cut at");
    let step = (events.len() / 24).max(1);
    let is_cut =
        |i: usize| i == events.len() || i % step == 0 || matches!(events[i - 1], Event::Flush);
    let mut ranges = model.written_runs();
    ranges.extend(disk.anchors.iter().map(|&a| {
        let lo = a.saturating_sub(4 * cs);
        (lo, (a + 4 * cs).min(disk.size) - lo)
    }));
    let replayed = MemoryStorage::from_bytes(recorder.initial().to_vec());
    for cut in 0..=events.len() {
        if cut > 0 {
            events[cut - 1].apply(&replayed);
        }
        if !is_cut(cut) {
            continue;
        }
        // The last Image::flush that must be durable here. A killed process: the last one
        // that returned before the cut. Power loss right after a storage flush, losing every
        // later write: the last one that returned before the next storage flush (a crash may
        // come just before it).
        let horizon = if cut > 0 && matches!(events[cut - 1], Event::Flush) {
            (cut..events.len())
                .find(|&i| matches!(events[i], Event::Flush))
                .unwrap_or(events.len())
        } else {
            cut
        };
        let k = flushed_at.iter().rposition(|&at| at <= horizon).unwrap();
        let bytes = replayed.to_bytes();
        let what = format!("seed {seed}, crash after event {cut} (durable phase {k})");
        let layout = parse_layout(&bytes);
        let crashed = Arc::new(MemoryStorage::from_bytes(bytes));
        let image = Image::open_storage(
            Box::new(crashed.clone()),
            &OpenOptions::read_only(),
            backing.layer(),
        )
        .unwrap_or_else(|e| panic!("{what}: read-only open: {e}"));
        let mut seen = Vec::new();
        for &(start, len) in &ranges {
            let mut got = vec![0u8; len as usize];
            image.read_at(&mut got, start).unwrap();
            let durable = models[k].read_vec(start, len);
            // Byte by byte only where a 4 KiB piece differs from the flushed contents.
            for (piece, (g, d)) in got.chunks(4096).zip(durable.chunks(4096)).enumerate() {
                if g == d {
                    continue;
                }
                for (j, &byte) in g.iter().enumerate() {
                    let i = piece * 4096 + j;
                    let p = start + i as u64;
                    assert!(
                        acceptable(p, byte, &durable, start, &phases[k]),
                        "{what}: guest byte {p} reads {byte:#x}, flushed value {:#x} (dirty: {})",
                        durable[i],
                        layout.dirty()
                    );
                }
            }
            seen.push(got);
        }
        drop(image);
        // A writable open repairs what the crash left (leaks only); the contents stay.
        let image = open_shared(&crashed, &rw_options(), backing.layer());
        assert_eq!(image.open_repair().is_some(), layout.dirty(), "{what}");
        let remaining = image.open_repair().map(|r| r.leaks);
        if let Some(report) = image.open_repair() {
            assert_eq!(
                (
                    report.corruptions,
                    report.corruptions_fixed,
                    report.check_errors
                ),
                (0, 0, 0),
                "{what}: a crash must leave no corruption: {report:?}"
            );
        }
        for (&(start, len), before) in ranges.iter().zip(&seen) {
            let mut got = vec![0u8; len as usize];
            image.read_at(&mut got, start).unwrap();
            assert_same(&got, before, start, &format!("{what}: after repair"));
        }
        image.close().unwrap();
        let reopened = parse_layout(&crashed.to_bytes());
        assert!(!reopened.dirty(), "{what}: dirty after close");
        if let Some(leaks) = remaining {
            // The repair reclaims leaks except behind a table at the end of the file; what it
            // leaves, it reports exactly. (A killed process can leave a partial cluster at the
            // end; the next allocation overwrites it.)
            reopened.assert_whole_clusters_covered(leaks);
        }
    }
}

#[test]
fn crash_at_every_flush_keeps_flushed_data() {
    for seed in 1..=3 {
        crash_at_every_flush(4096, 1, Backing::None, seed);
        crash_at_every_flush(4096, 2, Backing::Raw, seed);
        crash_at_every_flush(65536, 4, Backing::Qed, seed);
    }
}

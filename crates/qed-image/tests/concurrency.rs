//! Many threads on one shared image: allocating and in-place writes, racing for the same
//! clusters, interleaved with flushes and the idle timer, and reads racing with allocation
//! over a backing file. The results are checked against a reference disk, the extents, the
//! on-disk layout and `qemu-img check`.

mod kit;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use qed_image::storage::{CacheMode, FileOptions, FileStorage, LockMode, MemoryStorage, Storage};
use qed_image::{Image, OpenOptions};
use std::io;

use kit::*;

const THREADS: usize = 8;

/// One write of one thread.
#[derive(Debug, Clone)]
struct Write {
    offset: u64,
    data: Vec<u8>,
}

impl Write {
    fn new(offset: u64, len: u64, seed: u64) -> Self {
        Self {
            offset,
            data: pattern(seed, offset, len as usize),
        }
    }
}

/// The writes of one round, per thread.
type Round = Vec<Vec<Write>>;

/// Cuts `[start, end)` into `pieces` contiguous, non-empty pieces at random points.
fn cut(rng: &mut Rng, start: u64, end: u64, pieces: usize) -> Vec<(u64, u64)> {
    let mut points = BTreeSet::new();
    while points.len() < pieces - 1 {
        points.insert(rng.range(start + 1..end));
    }
    let bounds: Vec<u64> = std::iter::once(start)
        .chain(points)
        .chain(std::iter::once(end))
        .collect();
    bounds.windows(2).map(|w| (w[0], w[1])).collect()
}

/// The rounds of the racing workload. Cluster numbers are relative to `base`, which sits 40
/// clusters before the first L2 table boundary, so several rounds straddle it.
fn plan(cs: u64, coverage: u64, seed: u64) -> Vec<Round> {
    let mut rng = Rng::new(seed);
    let base = coverage - 40 * cs;
    let at = |cluster: u64| base + cluster * cs;
    let mut next_seed = seed * 1000;
    let mut seed = move || {
        next_seed += 1;
        next_seed
    };
    let mut rounds = Vec::new();

    // Own clusters: thread t writes inside clusters [6t, 6t + 6), three unaligned writes,
    // some spanning clusters.
    rounds.push(
        (0..THREADS as u64)
            .map(|t| {
                (0..3)
                    .map(|_| {
                        let lo = at(6 * t);
                        let off = rng.range(lo..lo + 6 * cs - 1);
                        let len = rng.range(1..=(lo + 6 * cs - off).min(3 * cs));
                        Write::new(off, len, seed())
                    })
                    .collect()
            })
            .collect(),
    );

    // Everybody into the same fresh clusters: each of clusters 60..68 is cut into one slice
    // per thread; all threads walk the clusters in the same order.
    let mut round: Round = vec![Vec::new(); THREADS];
    for c in 60..68 {
        for (t, (a, b)) in cut(&mut rng, at(c), at(c + 1), THREADS)
            .into_iter()
            .enumerate()
        {
            round[t].push(Write::new(a, b - a, seed()));
        }
    }
    rounds.push(round);

    // Multi-cluster slices racing for a fresh region across the second L2 boundary (whose
    // table does not exist yet).
    let lo = 2 * coverage - 2 * cs - 700;
    let mut round: Round = vec![Vec::new(); THREADS];
    for (t, (a, b)) in cut(&mut rng, lo, lo + 5 * cs, THREADS)
        .into_iter()
        .enumerate()
    {
        round[t].push(Write::new(a, b - a, seed()));
    }
    rounds.push(round);

    // Disjoint bytes of shared clusters, partly allocated in the first round (in-place and
    // allocating writes mixed): 32 pieces of clusters 0..48, dealt round-robin.
    let mut round: Round = vec![Vec::new(); THREADS];
    for (i, (a, b)) in cut(&mut rng, at(0), at(48), 4 * THREADS)
        .into_iter()
        .enumerate()
    {
        round[i % THREADS].push(Write::new(a, b - a, seed()));
    }
    rounds.push(round);
    rounds
}

/// A range every thread writes at once, each with its own byte value: allocated clusters
/// (from cluster 46 on) and fresh ones (up to cluster 51).
fn same_bytes_range(cs: u64, coverage: u64) -> (u64, u64) {
    let base = coverage - 40 * cs;
    (base + 46 * cs + cs / 2 + 3, 4 * cs + 100)
}

fn run_round(image: &Image, round: &Round) {
    let barrier = Barrier::new(round.len());
    std::thread::scope(|s| {
        for writes in round {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                for w in writes {
                    image.write_at(&w.data, w.offset).unwrap();
                }
            });
        }
    });
}

fn host_storage(path: &Path) -> FileStorage {
    FileStorage::open(
        path,
        &FileOptions {
            writable: false,
            create: false,
            cache: CacheMode::Writeback,
            lock: LockMode::None,
        },
    )
    .unwrap()
}

/// Guest clusters touched by `[offset, offset + len)`.
fn clusters_of(offset: u64, len: u64, cs: u64) -> std::ops::Range<u64> {
    offset / cs..(offset + len).div_ceil(cs)
}

/// A memory storage that yields the processor around every write, so that racing writers
/// interleave at every step of an allocation even on few cores.
#[derive(Debug, Default)]
struct YieldingStorage(MemoryStorage);

impl Storage for YieldingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::thread::yield_now();
        self.0.write_at(buf, offset)?;
        std::thread::yield_now();
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.punch_hole(offset, len)
    }
}

/// Where the racing workload's image lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// A temporary file (`Image::create` + `Image::open`).
    File,
    /// A [`YieldingStorage`]; its bytes are copied to a file for `qemu-img check`.
    Yielding,
}

fn racing_writers(cluster_size: u32, table_size: u32, backend: Backend, seed: u64) {
    let cs = u64::from(cluster_size);
    let coverage = cs * cs / 8 * u64::from(table_size);
    let size = 3 * coverage;
    let create = params(size, cluster_size, table_size, None, false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.qed");
    let memory = Arc::new(YieldingStorage::default());
    let (image, host): (Image, Box<dyn Storage>) = match backend {
        Backend::File => {
            Image::create(&path, &create).unwrap();
            (
                open_file(&path, &rw_options()),
                Box::new(host_storage(&path)),
            )
        }
        Backend::Yielding => {
            Image::create_on(&*memory, &create).unwrap();
            (
                open_shared(&memory, &rw_options(), None),
                Box::new(memory.clone()),
            )
        }
    };
    let initial_len = (1 + u64::from(table_size)) * cs;
    let mut model = SparseDisk::new(size, Base::Zeros);
    let mut touched = BTreeSet::new();

    for (r, round) in plan(cs, coverage, seed).iter().enumerate() {
        run_round(&image, round);
        // Bytes of different threads never overlap within a round; a thread's own writes
        // apply in its order.
        for w in round.iter().flatten() {
            model.write(w.offset, &w.data);
            touched.extend(clusters_of(w.offset, w.data.len() as u64, cs));
        }
        for w in round.iter().flatten() {
            check_range(
                &image,
                &model,
                w.offset,
                w.data.len() as u64,
                &format!("round {r}"),
            );
        }
    }

    // Every thread writes the same bytes: each byte ends up with one thread's value.
    let (offset, len) = same_bytes_range(cs, coverage);
    let round: Round = (0..THREADS)
        .map(|t| {
            vec![Write {
                offset,
                data: vec![t as u8 + 1; len as usize],
            }]
        })
        .collect();
    run_round(&image, &round);
    let mut got = vec![0u8; len as usize];
    image.read_at(&mut got, offset).unwrap();
    if let Some(i) = got.iter().position(|&b| b == 0 || b > THREADS as u8) {
        panic!(
            "byte {} of racing writes is {:#x}",
            offset + i as u64,
            got[i]
        );
    }
    model.write(offset, &got);
    touched.extend(clusters_of(offset, len, cs));

    check_written(&image, &model, &[], "after all rounds");
    let summary = check_extents(&image, &*host, &model);
    // One allocation per guest cluster written, none for any other.
    let allocated: BTreeSet<u64> = summary.data.keys().copied().collect();
    assert_eq!(allocated, touched, "allocated guest clusters");
    image.close().unwrap();

    if backend == Backend::Yielding {
        std::fs::write(&path, memory.0.to_bytes()).unwrap();
    }
    let layout = parse_layout(&std::fs::read(&path).unwrap());
    assert!(!layout.dirty());
    layout.assert_exact_cover(0);
    let tables: BTreeSet<u64> = touched.iter().map(|c| c * cs / coverage).collect();
    assert_eq!(
        layout.l2_tables.len(),
        tables.len(),
        "one L2 table per L1 entry used"
    );
    assert_eq!(
        layout.file_len - initial_len,
        (touched.len() as u64 + tables.len() as u64 * u64::from(table_size)) * cs,
        "file growth is the data clusters plus the L2 tables"
    );
    assert_qemu_img_check(&path);
    let image = open_file(&path, &OpenOptions::read_only());
    assert!(!image.info().dirty);
    check_written(&image, &model, &[], "after reopen");
}

#[test]
fn racing_writers_4k_clusters() {
    for seed in 1..=2 {
        racing_writers(4096, 2, Backend::File, seed);
    }
    for seed in 3..=16 {
        racing_writers(4096, 2, Backend::Yielding, seed);
    }
}

#[test]
fn racing_writers_64k_clusters() {
    racing_writers(65536, 4, Backend::File, 1);
    for seed in 2..=6 {
        racing_writers(65536, 4, Backend::Yielding, seed);
    }
}

/// Writers allocate all over the disk (tables written back and evicted under a one-table
/// cache budget) while other threads flush and the idle timer cleans up every millisecond.
#[test]
fn flushes_and_idle_timer_race_with_writes() {
    const WRITERS: usize = 6;
    const FLUSHERS: usize = 2;
    let (cluster_size, table_size) = (4096u32, 2u32);
    let cs = u64::from(cluster_size);
    let coverage = cs * cs / 8 * u64::from(table_size);
    let size = 10 * coverage;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flush.qed");
    Image::create(&path, &params(size, cluster_size, table_size, None, false)).unwrap();
    let options = OpenOptions {
        clean_after: Duration::from_millis(1),
        l2_cache_bytes: (cs * u64::from(table_size)) as usize,
        ..OpenOptions::read_write()
    };
    let image = open_file(&path, &options);

    // Writer w owns the byte stripes [k * 8 * cs + w * cs + 100, ... + cs) for all k: each of
    // its writes shares its first and last cluster with a neighbour.
    let plan: Vec<Vec<Write>> = (0..WRITERS as u64)
        .map(|w| {
            let mut rng = Rng::new(100 + w);
            (0..40)
                .map(|i| {
                    let k = rng.range(0..size / (8 * cs) - 1);
                    let off = k * 8 * cs + w * cs + 100;
                    Write::new(off, cs, 7000 + w * 100 + i)
                })
                .collect()
        })
        .collect();
    let done = AtomicBool::new(false);
    let flushes = std::thread::scope(|s| {
        let flushers: Vec<_> = (0..FLUSHERS)
            .map(|_| {
                s.spawn(|| {
                    let mut n = 0u64;
                    while !done.load(Ordering::Acquire) {
                        image.flush().unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let writers: Vec<_> = plan
            .iter()
            .map(|writes| {
                let image = &image;
                s.spawn(move || {
                    for (i, w) in writes.iter().enumerate() {
                        image.write_at(&w.data, w.offset).unwrap();
                        if i % 10 == 9 {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Release);
        flushers.into_iter().map(|f| f.join().unwrap()).sum::<u64>()
    });
    assert!(flushes > 0);

    let mut model = SparseDisk::new(size, Base::Zeros);
    for w in plan.iter().flatten() {
        model.write(w.offset, &w.data);
    }
    check_written(&image, &model, &[], "after the writes");
    check_extents(&image, &host_storage(&path), &model);
    image.close().unwrap();
    let layout = parse_layout(&std::fs::read(&path).unwrap());
    assert!(!layout.dirty());
    layout.assert_exact_cover(0);
    assert_qemu_img_check(&path);
    let image = open_file(&path, &OpenOptions::read_only());
    assert!(!image.info().dirty);
    check_written(&image, &model, &[], "after reopen");
}

/// Readers of clusters being allocated over a raw backing file see, byte by byte, the backing
/// data or the new data, never anything else (zeros in particular): the untouched parts of
/// each new cluster are copied from the backing file before the entry is published.
fn readers_race_allocation(cluster_size: u32, table_size: u32) {
    const WRITERS: usize = 4;
    const READERS: usize = 4;
    const CLUSTERS: u64 = 24;
    let cs = u64::from(cluster_size);
    let coverage = cs * cs / 8 * u64::from(table_size);
    let size = 2 * coverage;
    // The target clusters straddle the first L2 table boundary; the backing file covers them.
    let first = coverage / cs - CLUSTERS / 2;
    let backing_len = coverage + CLUSTERS * cs;
    let backing_seed = 77;
    let backing = BackingSpec::Raw(if backing_len <= 64 << 20 {
        Arc::new(MemoryStorage::from_bytes(pattern(
            backing_seed,
            0,
            backing_len as usize,
        )))
    } else {
        Arc::new(PatternStorage {
            seed: backing_seed,
            len: backing_len,
        })
    });
    // Yielding around every write widens the windows in which readers can meet allocation.
    let storage = Arc::new(YieldingStorage::default());
    Image::create_on(
        &*storage,
        &params(size, cluster_size, table_size, Some("b.raw"), true),
    )
    .unwrap();
    let image = open_shared(&storage, &rw_options(), backing.layer());

    // Each target cluster: one slice per writer with gaps between them that nobody writes.
    let mut rng = Rng::new(5);
    let mut plan: Vec<Vec<Write>> = vec![Vec::new(); WRITERS];
    for c in first..first + CLUSTERS {
        let pieces = cut(&mut rng, c * cs, (c + 1) * cs, 2 * WRITERS);
        for (w, pair) in pieces.chunks(2).enumerate() {
            let (a, b) = pair[0];
            plan[w].push(Write::new(a, b - a, 300 + c * 10 + w as u64));
        }
    }
    let mut model = SparseDisk::new(
        size,
        Base::Pattern {
            seed: backing_seed,
            len: backing_len,
        },
    );
    for w in plan.iter().flatten() {
        model.write(w.offset, &w.data);
    }
    let old = SparseDisk::new(size, model.base.clone());
    let range = (first * cs, CLUSTERS * cs);
    let expected_old = old.read_vec(range.0, range.1);
    let expected_new = model.read_vec(range.0, range.1);

    let done = AtomicBool::new(false);
    let barrier = Barrier::new(WRITERS + READERS);
    let reads = std::thread::scope(|s| {
        let readers: Vec<_> = (0..READERS)
            .map(|r| {
                let (image, done, barrier) = (&image, &done, &barrier);
                let (expected_old, expected_new) = (&expected_old, &expected_new);
                s.spawn(move || {
                    barrier.wait();
                    let mut reads = 0u64;
                    let mut buf = vec![0u8; cs as usize];
                    loop {
                        let finished = done.load(Ordering::Acquire);
                        for i in 0..CLUSTERS {
                            // Readers start at different clusters to meet writers everywhere.
                            let c = (i + r as u64 * CLUSTERS / READERS as u64) % CLUSTERS;
                            image.read_at(&mut buf, range.0 + c * cs).unwrap();
                            let at = (c * cs) as usize;
                            for (j, &b) in buf.iter().enumerate() {
                                if b != expected_old[at + j] && b != expected_new[at + j] {
                                    panic!(
                                        "guest byte {} reads {b:#x}: neither backing {:#x} nor new {:#x}",
                                        range.0 + at as u64 + j as u64,
                                        expected_old[at + j],
                                        expected_new[at + j]
                                    );
                                }
                            }
                            reads += 1;
                        }
                        if finished {
                            return reads;
                        }
                    }
                })
            })
            .collect();
        let writers: Vec<_> = plan
            .iter()
            .map(|writes| {
                let (image, barrier) = (&image, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for w in writes {
                        image.write_at(&w.data, w.offset).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Release);
        readers.into_iter().map(|r| r.join().unwrap()).sum::<u64>()
    });
    assert!(reads >= READERS as u64 * CLUSTERS);

    check_written(&image, &model, &[range], "after the race");
    let summary = check_extents(&image, &*storage, &model);
    assert_eq!(
        summary.data.len() as u64,
        CLUSTERS,
        "one allocation per cluster"
    );
    image.close().unwrap();
    let layout = parse_layout(&storage.0.to_bytes());
    layout.assert_exact_cover(0);
    let image = open_shared(&storage, &OpenOptions::read_only(), backing.layer());
    check_written(&image, &model, &[range], "after reopen");
}

#[test]
fn readers_race_allocation_over_backing_4k_clusters() {
    readers_race_allocation(4096, 2);
}

#[test]
fn readers_race_allocation_over_backing_64k_clusters() {
    readers_race_allocation(65536, 4);
}

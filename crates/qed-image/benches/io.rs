//! 4 KiB random I/O on a file-backed QED image next to a raw file of the same size, both
//! through [`FileStorage`], so each workload is reported as a `qed`/`raw` pair.
//!
//! Workloads (each at 1 and 4 threads sharing one open image or file; wall time of N ops in
//! total, each thread doing N/threads of them):
//!
//! * `read` — random 4 KiB reads of a fully allocated image;
//! * `write` — random 4 KiB overwrites of a fully allocated image (in place);
//! * `alloc` — random 4 KiB writes, each into a cluster never written before: a fresh, large
//!   sparse image (raw: a sparse file) with distinct random cluster indexes, so every op
//!   allocates. Successive samples share an image until its clusters run out. Before
//!   timing, one cluster per L2 table is written, so table creation and the NEED_CHECK flush
//!   of the first allocation (one-off costs, which `examples/bench.rs` does include) stay
//!   out of the per-op time. After each allocating case the file is removed and `sync` runs,
//!   so that the next case is not throttled by the dirty pages this one left. (Allocating
//!   images of the writeback cases are opened `CacheMode::Unsafe`: the same I/O path, but
//!   closing them does not flush data that is about to be deleted.)
//!
//! Cache modes: `writeback`, and `none` (`O_DIRECT`) when the file system under the target
//! directory supports it. Files live in Cargo's target tmp directory (not /tmp, which may be
//! tmpfs). The run is kept short; `QED_BENCH_SECS` sets the measurement time per case.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use qed_image::storage::{CacheMode, FileOptions, FileStorage, LockMode, Storage};
use qed_image::{CreateParams, Image, OpenOptions};

const BLOCK: usize = 4096;
const CLUSTER: u64 = 64 << 10;
/// Size of the pre-allocated images (reads and overwrites).
const FULL_SIZE: u64 = 256 << 20;
/// Clusters of the sparse images that allocating writes go to (64 GiB virtual).
const SPARSE_CLUSTERS: u64 = 1 << 20;
const THREADS: [usize; 2] = [1, 4];

/// One open image or raw file.
enum Target {
    Qed(Image),
    Raw(FileStorage),
}

impl Target {
    fn open(kind: Kind, path: &Path, cache: CacheMode) -> Target {
        match kind {
            Kind::Qed => Target::Qed(
                Image::open(
                    path,
                    &OpenOptions {
                        cache,
                        ..OpenOptions::read_write()
                    },
                )
                .expect("open image"),
            ),
            Kind::Raw => Target::Raw(
                FileStorage::open(
                    path,
                    &FileOptions {
                        writable: true,
                        create: false,
                        cache,
                        lock: LockMode::Write,
                    },
                )
                .expect("open raw file"),
            ),
        }
    }

    fn read(&self, buf: &mut [u8], offset: u64) {
        match self {
            Target::Qed(image) => image.read_at(buf, offset).expect("read"),
            Target::Raw(file) => file.read_at(buf, offset).expect("read"),
        }
    }

    fn write(&self, buf: &[u8], offset: u64) {
        match self {
            Target::Qed(image) => image.write_at(buf, offset).expect("write"),
            Target::Raw(file) => file.write_at(buf, offset).expect("write"),
        }
    }

    /// Closes outside the timed part (a QED close writes metadata back).
    fn close(self) {
        match self {
            Target::Qed(image) => image.close().expect("close"),
            Target::Raw(file) => drop(file),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Qed,
    Raw,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Qed => "qed",
            Kind::Raw => "raw",
        }
    }

    /// Creates a fresh, empty image (or sparse raw file) of `size` bytes.
    fn create(self, path: &Path, size: u64) {
        let _ = std::fs::remove_file(path);
        match self {
            Kind::Qed => Image::create(
                path,
                &CreateParams {
                    image_size: size,
                    cluster_size: CLUSTER as u32,
                    table_size: 4,
                    backing_file: None,
                    backing_raw: false,
                },
            )
            .expect("create image"),
            Kind::Raw => std::fs::File::create(path)
                .and_then(|f| f.set_len(size))
                .expect("create raw file"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Alloc,
}

/// A 4 KiB buffer aligned for `O_DIRECT`, without unsafe code.
struct AlignedBlock(Vec<u8>, usize);

impl AlignedBlock {
    fn new(fill: u8) -> Self {
        let v = vec![fill; BLOCK * 2];
        let start = v.as_ptr().align_offset(BLOCK);
        Self(v, start)
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.0[self.1..self.1 + BLOCK]
    }
}

/// splitmix64: cheap, good enough to scatter offsets.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The `i`-th of `n` distinct cluster indexes in `0..n` (`n` a power of two), in a random
/// looking order: an odd multiplier and an xor are both bijections modulo `n`.
fn distinct_cluster(i: u64, n: u64, seed: u64) -> u64 {
    let mask = n - 1;
    let odd = mix(seed) | 1;
    ((i.wrapping_mul(odd) & mask) ^ (mix(seed + 1) & mask)).wrapping_mul(0x2545_f491_4f6c_dd1d | 1)
        & mask
}

/// Runs `iters` ops of kind `op` on `target` split over `threads` threads; returns the wall
/// time. Op `i` of an `alloc` run writes into cluster `distinct_cluster(base + i)`.
fn run(
    target: &Target,
    op: Op,
    iters: u64,
    threads: usize,
    space: u64,
    (seed, base): (u64, u64),
) -> Duration {
    let next = AtomicU64::new(0);
    let chunk = 256u64;
    let work = |t: usize| {
        let mut block = AlignedBlock::new(0xa5);
        let buf = block.get();
        let mut rng = seed ^ ((t as u64 + 1) << 40);
        loop {
            // Threads take ops in chunks so the counter is not the bottleneck.
            let start = next.fetch_add(chunk, Ordering::Relaxed);
            if start >= iters {
                break;
            }
            for i in start..(start + chunk).min(iters) {
                rng = mix(rng);
                match op {
                    Op::Read => target.read(buf, (rng % (space / BLOCK as u64)) * BLOCK as u64),
                    Op::Write => target.write(buf, (rng % (space / BLOCK as u64)) * BLOCK as u64),
                    Op::Alloc => {
                        let cluster = distinct_cluster(base + i, space / CLUSTER, seed);
                        let within = (rng % (CLUSTER / BLOCK as u64)) * BLOCK as u64;
                        target.write(buf, cluster * CLUSTER + within);
                    }
                }
            }
            black_box(&buf);
        }
    };
    let start = Instant::now();
    if threads == 1 {
        work(0);
    } else {
        std::thread::scope(|s| {
            for t in 0..threads {
                let work = &work;
                s.spawn(move || work(t));
            }
        });
    }
    start.elapsed()
}

/// The sparse image (or file) of an allocating case, shared by its samples.
struct Sparse {
    target: Target,
    clusters: u64,
    /// Ops done so far: the next op takes cluster `distinct_cluster(used, ..)`.
    used: u64,
    seed: u64,
}

/// Guest clusters mapped by one L2 table (64 KiB clusters, 4-cluster tables).
const TABLE_CLUSTERS: u64 = 4 * CLUSTER / 8;

impl Sparse {
    /// A fresh image with room for more than `iters` allocations, prepared untimed: the
    /// last cluster of every L2 table's range is written, so tables exist and NEED_CHECK
    /// is set and flushed before timing (one-off costs, not the per-op cost of allocation).
    /// Timed ops hit one of these clusters (and write in place) with odds of 1 in 32768.
    fn create(kind: Kind, path: &Path, cache: CacheMode, iters: u64, seed: u64) -> Sparse {
        let clusters = SPARSE_CLUSTERS.max((iters + 1).next_power_of_two());
        kind.create(path, clusters * CLUSTER);
        // Writeback and Unsafe differ only in `flush`, which the timed ops never call; with
        // Unsafe, closing does not write the gigabyte of scattered data that `remove_file`
        // is about to discard (a raw file is not flushed at close either).
        let cache = match cache {
            CacheMode::Writeback => CacheMode::Unsafe,
            other => other,
        };
        let target = Target::open(kind, path, cache);
        let mut block = AlignedBlock::new(0x5a);
        for table in 0..clusters / TABLE_CLUSTERS {
            target.write(block.get(), ((table + 1) * TABLE_CLUSTERS - 1) * CLUSTER);
        }
        Sparse {
            target,
            clusters,
            used: 0,
            seed,
        }
    }
}

fn bench_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qed-bench-io");
    std::fs::create_dir_all(&dir).expect("bench directory");
    dir
}

/// Whether the file system under `dir` takes `O_DIRECT`.
fn direct_supported(dir: &Path) -> bool {
    let probe = dir.join("direct-probe");
    let _ = std::fs::write(&probe, vec![0u8; BLOCK]);
    let ok = FileStorage::open(
        &probe,
        &FileOptions {
            writable: true,
            create: false,
            cache: CacheMode::None,
            lock: LockMode::None,
        },
    )
    .and_then(|f| {
        let mut block = AlignedBlock::new(0);
        f.read_at(block.get(), 0)
    })
    .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// A fully allocated image (or raw file) of `FULL_SIZE` bytes, written once per bench run.
fn prepare_full(kind: Kind, path: &Path) {
    kind.create(path, FULL_SIZE);
    let target = Target::open(kind, path, CacheMode::Writeback);
    let data: Vec<u8> = (0..1u64 << 20).map(|i| mix(i) as u8).collect();
    for off in (0..FULL_SIZE).step_by(data.len()) {
        target.write(&data, off);
    }
    target.close();
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .expect("sync");
}

fn cache_name(cache: CacheMode) -> &'static str {
    match cache {
        CacheMode::None => "none",
        _ => "writeback",
    }
}

fn benches(c: &mut Criterion) {
    let dir = bench_dir();
    let mut caches = vec![CacheMode::Writeback];
    if direct_supported(&dir) {
        caches.push(CacheMode::None);
    } else {
        eprintln!(
            "O_DIRECT not supported under {}: cache=none skipped",
            dir.display()
        );
    }
    let full = |kind: Kind| dir.join(format!("full.{}", kind.name()));
    for kind in [Kind::Qed, Kind::Raw] {
        prepare_full(kind, &full(kind));
    }
    let sparse_path = |kind: Kind| dir.join(format!("sparse.{}", kind.name()));
    let mut seed = 1u64;

    for (op, name) in [
        (Op::Read, "read"),
        (Op::Write, "write"),
        (Op::Alloc, "alloc"),
    ] {
        let mut group = c.benchmark_group(format!("4k-{name}"));
        group.throughput(Throughput::Elements(1));
        for &cache in &caches {
            for threads in THREADS {
                for kind in [Kind::Qed, Kind::Raw] {
                    let id =
                        BenchmarkId::new(kind.name(), format!("{}/t{threads}", cache_name(cache)));
                    if op == Op::Alloc {
                        // Criterion calls the routine once per sample: the image lives out
                        // here so successive samples share it until its clusters run out.
                        let mut image: Option<Sparse> = None;
                        group.bench_function(id, |b| {
                            b.iter_custom(|iters| {
                                let mut sparse = match image.take() {
                                    Some(s) if s.used + iters < s.clusters => s,
                                    old => {
                                        if let Some(old) = old {
                                            old.target.close();
                                        }
                                        seed += 1;
                                        Sparse::create(kind, &sparse_path(kind), cache, iters, seed)
                                    }
                                };
                                let space = sparse.clusters * CLUSTER;
                                let salt = (sparse.seed, sparse.used);
                                let time = run(&sparse.target, op, iters, threads, space, salt);
                                sparse.used += iters;
                                image = Some(sparse);
                                time
                            });
                        });
                        if let Some(old) = image {
                            old.target.close();
                        }
                        // Leave no dirty pages behind for the next case to be throttled by.
                        let _ = std::fs::remove_file(sparse_path(kind));
                        nix::unistd::sync();
                    } else {
                        let target = Target::open(kind, &full(kind), cache);
                        group.bench_function(id, |b| {
                            b.iter_custom(|iters| {
                                seed += 1;
                                run(&target, op, iters, threads, FULL_SIZE, (seed, 0))
                            });
                        });
                        target.close();
                    }
                }
            }
        }
        group.finish();
    }
    for kind in [Kind::Qed, Kind::Raw] {
        let _ = std::fs::remove_file(full(kind));
    }
}

fn config() -> Criterion {
    let secs = std::env::var("QED_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs_f64(secs))
        .configure_from_args()
}

mod group {
    //! The criterion group (its generated function has no docs).
    #![allow(missing_docs)]
    criterion::criterion_group! {
        name = io;
        config = super::config();
        targets = super::benches
    }
}
criterion_main!(group::io);

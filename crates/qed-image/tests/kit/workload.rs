//! Seeded random guest workloads for the crash and fault tests: the geometries under test,
//! the few guest windows the requests are confined to (kept by the model as one flat
//! buffer), and the requests with the effect each has on what the guest reads.

use std::sync::Arc;

use qed_image::storage::{MemoryStorage, Storage};
use qed_image::{BackingLayer, Error, ExtentKind, Geometry, Image, OpenOptions};

use super::images::{params, rw_options};
use super::model::discarded;
use super::pattern::{fill_pattern, PatternStorage};
use super::rng::Rng;

/// How many times the bounded CI run to repeat (`QED_CRASH_SOAK=<n>`, default 1).
pub fn soak() -> u64 {
    std::env::var("QED_CRASH_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// The pattern seed of the raw backing layer of a [`CrashConfig`].
pub const BACKING_SEED: u64 = 0xBAC;

/// An image geometry and size, with or without a raw backing layer (a [`PatternStorage`]).
#[derive(Debug, Clone, Copy)]
pub struct CrashConfig {
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// Clusters per table.
    pub table_size: u32,
    /// Whether a raw backing layer lies underneath.
    pub backing: bool,
}

impl CrashConfig {
    /// The geometries under test, each without and with a backing layer.
    pub fn all() -> Vec<CrashConfig> {
        let mut out = Vec::new();
        for (cluster_size, table_size) in [(4096, 1), (4096, 4), (65536, 4)] {
            for backing in [false, true] {
                out.push(CrashConfig {
                    cluster_size,
                    table_size,
                    backing,
                });
            }
        }
        out
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.cluster_size, self.table_size).expect("valid geometry")
    }

    /// Virtual disk size: a little over two L2 tables' worth, ending mid-cluster.
    pub fn image_size(&self) -> u64 {
        2 * self.geometry().l2_coverage() + u64::from(self.cluster_size) * 2 + 1536
    }

    /// Length of the backing layer: it ends inside the last window, mid-cluster.
    pub fn backing_len(&self) -> u64 {
        self.image_size() - 2 * u64::from(self.cluster_size) - 700
    }

    /// Clusters per window.
    fn window_clusters(&self) -> u64 {
        if self.cluster_size >= 65536 {
            6
        } else {
            20
        }
    }

    /// The guest windows workloads touch: the start of the disk, across the first L2
    /// boundary, and the end of the disk (where the backing layer ends).
    pub fn windows(&self) -> Windows {
        let cs = u64::from(self.cluster_size);
        let w = self.window_clusters() * cs;
        let size = self.image_size();
        let coverage = self.geometry().l2_coverage();
        let end_start = self.geometry().align_down(size) - (self.window_clusters() - 1) * cs;
        Windows {
            ranges: vec![
                (0, w),
                (coverage - w / 2, coverage + w / 2),
                (end_start, size),
            ],
        }
    }

    /// A short name for messages.
    pub fn name(&self) -> String {
        format!(
            "{}K/ts{}{}",
            self.cluster_size / 1024,
            self.table_size,
            if self.backing { "+raw" } else { "" }
        )
    }

    /// A new empty image of this configuration, as bytes.
    pub fn create_image(&self) -> Vec<u8> {
        let storage = MemoryStorage::new();
        let backing = self.backing.then_some("backing.raw");
        Image::create_on(
            &storage,
            &params(
                self.image_size(),
                self.cluster_size,
                self.table_size,
                backing,
                self.backing,
            ),
        )
        .expect("create image");
        storage.to_bytes()
    }

    /// Opens `storage` as an image of this configuration (with its backing layer), the idle
    /// timer out of the way and an L2 cache of `l2_cache_bytes`.
    pub fn open(
        &self,
        storage: Box<dyn Storage>,
        writable: bool,
        l2_cache_bytes: usize,
    ) -> Result<Image, Error> {
        let backing = if self.backing {
            Some(BackingLayer::raw(Box::new(PatternStorage {
                seed: BACKING_SEED,
                len: self.backing_len(),
            }))?)
        } else {
            None
        };
        let options = OpenOptions {
            writable,
            l2_cache_bytes,
            ..rw_options()
        };
        Image::open_storage(storage, &options, backing)
    }

    /// A seeded random workload of `n` requests inside the windows.
    pub fn workload(&self, rng: &mut Rng, n: usize) -> Vec<GuestOp> {
        let cs = u64::from(self.cluster_size);
        let windows = self.windows();
        let mut ops = Vec::with_capacity(n);
        for _ in 0..n {
            let (ws, we) = windows.ranges[rng.below(windows.ranges.len() as u64) as usize];
            let span = we - ws;
            let roll = rng.below(100);
            let aligned = rng.chance(40, 100);
            let len = match roll {
                0..=49 if rng.chance(40, 100) => rng.range(1..=700),
                _ if aligned => cs * rng.range(1..=3),
                _ => rng.range(1..=5 * cs / 2),
            }
            .min(span);
            let offset = if aligned {
                ws + cs * rng.below((span - len) / cs + 1)
            } else {
                ws + rng.below(span - len + 1)
            };
            ops.push(match roll {
                0..=49 => GuestOp::Write {
                    offset,
                    data: rng.bytes(len as usize),
                },
                50..=61 => GuestOp::WriteZeroes { offset, len },
                62..=77 => GuestOp::Discard { offset, len },
                _ => GuestOp::Flush,
            });
        }
        ops
    }

    /// Runs `ops` on a fresh image in memory and returns the disk as a crash right then
    /// leaves it (nothing closed) and what the windows read.
    pub fn crashed_after(&self, ops: &[GuestOp]) -> (Vec<u8>, Vec<u8>) {
        let windows = self.windows();
        let storage = Arc::new(MemoryStorage::from_bytes(self.create_image()));
        let image = self
            .open(Box::new(storage.clone()), true, 32 << 20)
            .expect("open");
        let mut model = windows.initial(self);
        for op in ops {
            op.run(&image).expect("request");
            if let Some((at, data)) = op.effect(self, &windows) {
                model[at..at + data.len()].copy_from_slice(&data);
            }
        }
        let bytes = storage.to_bytes();
        drop(image);
        (bytes, model)
    }
}

/// The guest ranges a workload touches; the model keeps them as one flat buffer.
#[derive(Debug, Clone)]
pub struct Windows {
    /// `[start, end)` guest ranges, sorted, disjoint.
    pub ranges: Vec<(u64, u64)>,
}

impl Windows {
    /// Bytes of all windows together.
    pub fn flat_len(&self) -> usize {
        self.ranges.iter().map(|(s, e)| (e - s) as usize).sum()
    }

    /// Flat index of guest `offset`, which must lie in a window.
    pub fn flat(&self, offset: u64) -> usize {
        let mut base = 0;
        for &(s, e) in &self.ranges {
            if (s..e).contains(&offset) {
                return base + (offset - s) as usize;
            }
            base += (e - s) as usize;
        }
        panic!("guest offset {offset:#x} lies in no window")
    }

    /// Guest offset of flat index `i`.
    pub fn guest(&self, i: usize) -> u64 {
        let mut base = 0;
        for &(s, e) in &self.ranges {
            let len = (e - s) as usize;
            if i < base + len {
                return s + (i - base) as u64;
            }
            base += len;
        }
        panic!("flat index {i} out of range")
    }

    /// What the windows read before any write.
    pub fn initial(&self, config: &CrashConfig) -> Vec<u8> {
        let mut out = vec![0u8; self.flat_len()];
        let backing_len = if config.backing {
            config.backing_len()
        } else {
            0
        };
        let mut base = 0;
        for &(s, e) in &self.ranges {
            let len = (e - s) as usize;
            let backed = backing_len.clamp(s, e) - s;
            fill_pattern(BACKING_SEED, s, &mut out[base..base + backed as usize]);
            base += len;
        }
        out
    }

    /// Reads every window through `image`, flat.
    pub fn read(&self, image: &Image) -> Result<Vec<u8>, Error> {
        let mut out = vec![0u8; self.flat_len()];
        let mut base = 0;
        for &(s, e) in &self.ranges {
            let len = (e - s) as usize;
            image.read_at(&mut out[base..base + len], s)?;
            base += len;
        }
        Ok(out)
    }

    /// Fails if any cluster outside the windows is allocated or zero: nothing wrote there.
    pub fn check_outside(&self, image: &Image) -> Result<(), String> {
        for extent in image.extents(0, image.size()) {
            let extent = extent.map_err(|e| format!("extents: {e}"))?;
            if extent.kind == ExtentKind::Unallocated {
                continue;
            }
            let (mut from, to) = (extent.offset, extent.offset + extent.length);
            for &(s, e) in &self.ranges {
                if from >= s && from < e {
                    from = e;
                }
            }
            if from < to {
                return Err(format!(
                    "guest {from:#x}..{to:#x} is {:?} though no write reached it",
                    extent.kind
                ));
            }
        }
        Ok(())
    }
}

/// A guest request.
#[derive(Debug, Clone)]
pub enum GuestOp {
    /// `write_at(data, offset)`.
    Write {
        /// Guest offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// `write_zeroes_at(offset, len)`.
    WriteZeroes {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// `discard(offset, len)`.
    Discard {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// `flush()`.
    Flush,
}

impl GuestOp {
    /// Runs the request.
    pub fn run(&self, image: &Image) -> Result<(), Error> {
        match self {
            Self::Write { offset, data } => image.write_at(data, *offset),
            Self::WriteZeroes { offset, len } => image.write_zeroes_at(*offset, *len),
            Self::Discard { offset, len } => image.discard(*offset, *len),
            Self::Flush => image.flush(),
        }
    }

    /// A one-line description without the data.
    pub fn describe(&self) -> String {
        match self {
            Self::Write { offset, data } => format!("write {offset:#x}+{:#x}", data.len()),
            Self::WriteZeroes { offset, len } => format!("zero {offset:#x}+{len:#x}"),
            Self::Discard { offset, len } => format!("discard {offset:#x}+{len:#x}"),
            Self::Flush => "flush".into(),
        }
    }

    /// What the request makes the guest read: (flat offset, new bytes), if anything.
    pub fn effect(&self, config: &CrashConfig, windows: &Windows) -> Option<(usize, Vec<u8>)> {
        match self {
            Self::Write { offset, data } => Some((windows.flat(*offset), data.clone())),
            Self::WriteZeroes { offset, len } => {
                (*len > 0).then(|| (windows.flat(*offset), vec![0; *len as usize]))
            }
            Self::Discard { offset, len } => {
                let cs = u64::from(config.cluster_size);
                let zeroed = discarded(config.image_size(), cs, *offset, *len);
                (!zeroed.is_empty()).then(|| {
                    (
                        windows.flat(zeroed.start),
                        vec![0; (zeroed.end - zeroed.start) as usize],
                    )
                })
            }
            Self::Flush => None,
        }
    }
}

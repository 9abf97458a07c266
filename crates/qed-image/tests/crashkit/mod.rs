//! Shared by the crash and fault tests: geometries, seeded random workloads confined to a few
//! guest windows, a model of what each byte may read, and the checks of the durability
//! contract (design.md §Durability).

#![allow(dead_code)]

use std::io;
use std::sync::Arc;
use std::time::Duration;

use qed_image::format::Header;
use qed_image::storage::{MemoryStorage, Storage};
use qed_image::{
    BackingLayer, CheckReport, CreateParams, Error, ExtentKind, Geometry, Image, OpenOptions,
    Repair,
};

/// How many times the bounded CI run to repeat (`QED_CRASH_SOAK=<n>`, default 1).
pub fn soak() -> u64 {
    std::env::var("QED_CRASH_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// A small seeded generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeds the generator.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0xD1B5_4A32_D192_ED03)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// An image geometry and size, with or without a raw backing layer.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// Clusters per table.
    pub table_size: u32,
    /// Whether a raw backing layer lies underneath.
    pub backing: bool,
}

impl Config {
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
    pub fn layout(&self) -> Layout {
        let cs = u64::from(self.cluster_size);
        let w = self.window_clusters() * cs;
        let size = self.image_size();
        let coverage = self.geometry().l2_coverage();
        let end_start = self.geometry().align_down(size) - (self.window_clusters() - 1) * cs;
        Layout {
            windows: vec![
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
}

/// The geometries under test, each with and without a backing layer.
pub fn configs() -> Vec<Config> {
    let mut out = Vec::new();
    for (cluster_size, table_size) in [(4096, 1), (4096, 4), (65536, 4)] {
        for backing in [false, true] {
            out.push(Config {
                cluster_size,
                table_size,
                backing,
            });
        }
    }
    out
}

/// The byte the backing layer holds at `offset`.
pub fn pattern_byte(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 | 0x80
}

/// A read-only raw backing file of any length whose bytes are [`pattern_byte`].
#[derive(Debug)]
pub struct PatternStorage {
    /// Its length.
    pub len: u64,
}

impl Storage for PatternStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = if at < self.len { pattern_byte(at) } else { 0 };
        }
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("backing layer is read-only"))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(io::Error::other("backing layer is read-only"))
    }
}

/// A new empty image of `config`, as bytes.
pub fn create_image(config: &Config) -> Vec<u8> {
    let storage = MemoryStorage::new();
    Image::create_on(
        &storage,
        &CreateParams {
            image_size: config.image_size(),
            cluster_size: config.cluster_size,
            table_size: config.table_size,
            backing_file: config.backing.then(|| "backing.raw".to_owned()),
            backing_raw: config.backing,
        },
    )
    .expect("create image");
    storage.to_bytes()
}

/// Open options for tests: the idle timer never fires, `l2_cache_bytes` as given.
pub fn options(writable: bool, l2_cache_bytes: usize) -> OpenOptions {
    OpenOptions {
        writable,
        l2_cache_bytes,
        clean_after: Duration::from_secs(24 * 3600),
        ..OpenOptions::default()
    }
}

/// Opens `storage` as an image of `config` (with its backing layer).
pub fn open(
    config: &Config,
    storage: Box<dyn Storage>,
    writable: bool,
    l2_cache_bytes: usize,
) -> Result<Image, Error> {
    let backing = if config.backing {
        Some(BackingLayer::raw(Box::new(PatternStorage {
            len: config.backing_len(),
        }))?)
    } else {
        None
    };
    Image::open_storage(storage, &options(writable, l2_cache_bytes), backing)
}

/// Whether the header in `bytes` has NEED_CHECK set.
pub fn need_check(bytes: &[u8]) -> bool {
    Header::decode(bytes).expect("header decodes").needs_check()
}

/// The guest ranges a workload touches; the model keeps them as one flat buffer.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `[start, end)` guest ranges, sorted, disjoint.
    pub windows: Vec<(u64, u64)>,
}

impl Layout {
    /// Bytes of all windows together.
    pub fn flat_len(&self) -> usize {
        self.windows.iter().map(|(s, e)| (e - s) as usize).sum()
    }

    /// Flat index of guest `offset`, which must lie in a window.
    pub fn flat(&self, offset: u64) -> usize {
        let mut base = 0;
        for &(s, e) in &self.windows {
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
        for &(s, e) in &self.windows {
            let len = (e - s) as usize;
            if i < base + len {
                return s + (i - base) as u64;
            }
            base += len;
        }
        panic!("flat index {i} out of range")
    }

    /// What the windows read before any write.
    pub fn initial(&self, config: &Config) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.flat_len());
        for &(s, e) in &self.windows {
            for at in s..e {
                out.push(if config.backing && at < config.backing_len() {
                    pattern_byte(at)
                } else {
                    0
                });
            }
        }
        out
    }

    /// Reads every window through `image`, flat.
    pub fn read(&self, image: &Image) -> Result<Vec<u8>, Error> {
        let mut out = vec![0u8; self.flat_len()];
        let mut base = 0;
        for &(s, e) in &self.windows {
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
            for &(s, e) in &self.windows {
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
    pub fn effect(&self, config: &Config, layout: &Layout) -> Option<(usize, Vec<u8>)> {
        let g = config.geometry();
        let size = config.image_size();
        match self {
            Self::Write { offset, data } => Some((layout.flat(*offset), data.clone())),
            Self::WriteZeroes { offset, len } => {
                (*len > 0).then(|| (layout.flat(*offset), vec![0; *len as usize]))
            }
            Self::Discard { offset, len } => {
                // Whole clusters only; the last cluster counts as whole at the disk's end.
                let end = offset + len;
                let end = if end == size { size } else { g.align_down(end) };
                let start = g.align_up(*offset);
                (start < end).then(|| (layout.flat(start), vec![0; (end - start) as usize]))
            }
            Self::Flush => None,
        }
    }
}

/// A seeded random workload of `n` requests inside the windows of `config`.
pub fn workload(config: &Config, rng: &mut Rng, n: usize) -> Vec<GuestOp> {
    let cs = u64::from(config.cluster_size);
    let layout = config.layout();
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let (ws, we) = layout.windows[rng.below(layout.windows.len() as u64) as usize];
        let span = we - ws;
        let roll = rng.below(100);
        let aligned = rng.chance(40);
        let len = match roll {
            0..=49 if rng.chance(40) => rng.range(1, 700),
            _ if aligned => cs * rng.range(1, 3),
            _ => rng.range(1, 5 * cs / 2),
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

/// Why a state broke the contract.
pub type Verdict = Result<(), String>;

/// Checks that `actual` (the windows, flat) reads, byte by byte, either `flushed` or the
/// value one of `pending` wrote there.
pub fn check_bytes(
    layout: &Layout,
    actual: &[u8],
    flushed: &[u8],
    pending: &[&(usize, Vec<u8>)],
) -> Verdict {
    const CHUNK: usize = 512;
    for start in (0..actual.len()).step_by(CHUNK) {
        let end = (start + CHUNK).min(actual.len());
        if actual[start..end] == flushed[start..end] {
            continue;
        }
        for i in start..end {
            let got = actual[i];
            if got == flushed[i] {
                continue;
            }
            let written = pending
                .iter()
                .any(|(at, data)| i >= *at && i < at + data.len() && data[i - at] == got);
            if !written {
                return Err(format!(
                    "guest byte {:#x} reads {got:#04x}: neither the flushed {:#04x} nor a \
                     value written since ({} pending writes)",
                    layout.guest(i),
                    flushed[i],
                    pending.len()
                ));
            }
        }
    }
    Ok(())
}

/// Asserts-by-result that a report shows no corruption, and (with `leaks`) no leaks either.
pub fn clean(report: &CheckReport, what: &str, allow_leaks: bool) -> Verdict {
    if report.corruptions != 0 || report.check_errors != 0 || (!allow_leaks && report.leaks != 0) {
        return Err(format!(
            "{what}: {} corruptions, {} leaks, {} check errors: {:?}",
            report.corruptions,
            report.leaks,
            report.check_errors,
            &report.findings[..report.findings.len().min(5)]
        ));
    }
    Ok(())
}

/// Opens `bytes` read-write (a dirty image is repaired then), checks it is consistent, and
/// returns the open image and whether leaks were found with NEED_CHECK clear (and then
/// reclaimed by an explicit repair).
pub fn open_and_repair(
    config: &Config,
    storage: Arc<MemoryStorage>,
) -> Result<(Image, Option<CheckReport>), String> {
    let mut header = [0u8; 64];
    storage.read_at(&mut header, 0).map_err(|e| e.to_string())?;
    let dirty = need_check(&header);
    let image = open(config, Box::new(storage.clone()), true, 32 << 20)
        .map_err(|e| format!("read-write open: {e}"))?;
    if dirty && image.open_repair().is_none() {
        return Err("NEED_CHECK was set but the open did not repair".into());
    }
    let report = image
        .check(Repair::None)
        .map_err(|e| format!("check: {e}"))?;
    let mut clean_flag_leaks = None;
    if dirty {
        clean(&report, "check after the repair at open", false)?;
    } else {
        clean(&report, "check of an image with NEED_CHECK clear", true)?;
        if report.leaks > 0 {
            // Leaks are allowed in a clean image (discarded clusters stay in the file until a
            // repair); a repair must reclaim them all.
            let fixed = image
                .check(Repair::All)
                .map_err(|e| format!("repair: {e}"))?;
            let again = image
                .check(Repair::None)
                .map_err(|e| format!("check: {e}"))?;
            clean(&again, "check after an explicit repair", false)?;
            clean_flag_leaks = Some(fixed);
        }
    }
    Ok((image, clean_flag_leaks))
}

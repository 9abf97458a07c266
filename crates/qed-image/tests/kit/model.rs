//! The reference model: a flat, sparse guest disk that tests write alongside the image, and
//! the checks that compare the two (bytes, extents).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use qed_image::storage::Storage;
use qed_image::{ExtentKind, Image};

use super::pattern::fill_pattern;

/// Granularity of the reference disk's pages (independent of the cluster size).
pub const PAGE: u64 = 4096;

static ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];

/// What unwritten bytes of a reference disk read as.
#[derive(Debug, Clone)]
pub enum Base {
    /// Zeros (no backing layer).
    Zeros,
    /// Pattern `seed` in the first `len` bytes, zeros after (a raw backing file).
    Pattern { seed: u64, len: u64 },
    /// These bytes, zeros after (a backing file of known contents).
    Bytes(Arc<[u8]>),
    /// Another reference disk, zeros past its size (a QED backing layer).
    Disk(Box<SparseDisk>),
}

impl Base {
    /// `Bytes`, or `Zeros` when there are none.
    pub fn bytes(bytes: Vec<u8>) -> Self {
        if bytes.is_empty() {
            Base::Zeros
        } else {
            Base::Bytes(bytes.into())
        }
    }

    /// How many leading bytes may be non-zero: the length of the backing layer.
    pub fn data_len(&self) -> u64 {
        match self {
            Base::Zeros => 0,
            Base::Pattern { len, .. } => *len,
            Base::Bytes(bytes) => bytes.len() as u64,
            Base::Disk(disk) => disk.size,
        }
    }

    /// Reads `buf` at `offset` (any offset: zeros past the data).
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        let inside = self.data_len().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return;
        }
        match self {
            Base::Zeros => unreachable!("no data in zeros"),
            Base::Pattern { seed, .. } => fill_pattern(*seed, offset, head),
            Base::Bytes(bytes) => {
                head.copy_from_slice(&bytes[offset as usize..offset as usize + head.len()])
            }
            Base::Disk(disk) => disk.read(offset, head),
        }
    }

    fn is_zero(&self, offset: u64, len: u64) -> bool {
        let end = (offset + len).min(self.data_len());
        if offset >= end {
            return true;
        }
        match self {
            Base::Zeros => true,
            Base::Pattern { .. } => false,
            Base::Bytes(bytes) => bytes[offset as usize..end as usize].iter().all(|&b| b == 0),
            Base::Disk(disk) => disk.is_zero(offset, end - offset),
        }
    }
}

/// The reference disk: a flat guest address space stored as sparse pages over a [`Base`].
#[derive(Debug, Clone)]
pub struct SparseDisk {
    pub size: u64,
    pub base: Base,
    pages: BTreeMap<u64, Vec<u8>>,
}

impl SparseDisk {
    pub fn new(size: u64, base: Base) -> Self {
        Self {
            size,
            base,
            pages: BTreeMap::new(),
        }
    }

    fn each_page(offset: u64, len: u64, mut f: impl FnMut(u64, usize, Range<usize>)) {
        let mut done = 0u64;
        while done < len {
            let p = offset + done;
            let in_page = (p % PAGE) as usize;
            let n = (PAGE - p % PAGE).min(len - done);
            f(p / PAGE, in_page, done as usize..(done + n) as usize);
            done += n;
        }
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        assert!(
            offset + buf.len() as u64 <= self.size,
            "model read past end: {offset}+{} > {}",
            buf.len(),
            self.size
        );
        Self::each_page(offset, buf.len() as u64, |page, at, range| {
            let n = range.len();
            match self.pages.get(&page) {
                Some(bytes) => buf[range].copy_from_slice(&bytes[at..at + n]),
                None => self.base.read(page * PAGE + at as u64, &mut buf[range]),
            }
        });
    }

    pub fn read_vec(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        self.read(offset, &mut buf);
        buf
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        assert!(
            offset + data.len() as u64 <= self.size,
            "model write past end"
        );
        let base = &self.base;
        let pages = &mut self.pages;
        Self::each_page(offset, data.len() as u64, |page, at, range| {
            let bytes = pages.entry(page).or_insert_with(|| {
                let mut fresh = vec![0u8; PAGE as usize];
                base.read(page * PAGE, &mut fresh);
                fresh
            });
            bytes[at..at + range.len()].copy_from_slice(&data[range]);
        });
    }

    pub fn zero(&mut self, offset: u64, len: u64) {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; len.min(CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write(offset + done, &zeros[..n as usize]);
            done += n;
        }
    }

    /// Whether `[offset, offset + len)` reads as zeros.
    pub fn is_zero(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        let mut pos = offset;
        for (&page, bytes) in self.pages.range(offset / PAGE..end.div_ceil(PAGE)) {
            let start = page * PAGE;
            if start > pos && !self.base.is_zero(pos, start - pos) {
                return false;
            }
            let from = pos.max(start);
            let to = end.min(start + PAGE);
            if bytes[(from - start) as usize..(to - start) as usize]
                != ZERO_PAGE[..(to - from) as usize]
            {
                return false;
            }
            pos = to;
        }
        pos >= end || self.base.is_zero(pos, end - pos)
    }

    /// Whether `[offset, offset + len)` reads as the base (nothing written there differs).
    pub fn equals_base(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        self.pages
            .range(offset / PAGE..end.div_ceil(PAGE))
            .all(|(&page, bytes)| {
                let start = page * PAGE;
                let from = offset.max(start);
                let to = end.min(start + PAGE);
                let mut base = vec![0u8; (to - from) as usize];
                self.base.read(from, &mut base);
                bytes[(from - start) as usize..(to - start) as usize] == base[..]
            })
    }

    /// Runs of written pages, clipped to the disk: `(offset, len)`.
    pub fn written_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &page in self.pages.keys() {
            let start = page * PAGE;
            let end = (start + PAGE).min(self.size);
            match runs.last_mut() {
                Some((o, l)) if *o + *l == start => *l = end - *o,
                _ => runs.push((start, end - start)),
            }
        }
        runs
    }

    /// Writes the disk to `path` as a sparse raw file: the base, then the written pages.
    pub fn write_raw(&self, path: &Path) {
        const CHUNK: u64 = 1 << 20;
        let f = std::fs::File::create(path).expect("create raw file");
        f.set_len(self.size).expect("set raw file length");
        let base_len = self.base.data_len().min(self.size);
        let mut buf = vec![0u8; CHUNK as usize];
        let mut pos = 0;
        while pos < base_len {
            let n = (base_len - pos).min(CHUNK) as usize;
            self.base.read(pos, &mut buf[..n]);
            f.write_all_at(&buf[..n], pos).expect("write raw file");
            pos += n as u64;
        }
        for (&page, bytes) in &self.pages {
            let start = page * PAGE;
            let n = (self.size - start).min(PAGE) as usize;
            f.write_all_at(&bytes[..n], start).expect("write raw file");
        }
    }
}

/// The guest bytes a discard of `[offset, offset + len)` makes read as zeros on a disk of
/// `size` bytes with `cluster_size` clusters: the whole clusters inside the request, where
/// the last cluster of the disk counts as whole when the request reaches the end. Empty when
/// no whole cluster is covered.
pub fn discarded(size: u64, cluster_size: u64, offset: u64, len: u64) -> Range<u64> {
    let start = offset.div_ceil(cluster_size) * cluster_size;
    let end = offset + len;
    let end = if end == size {
        size
    } else {
        end / cluster_size * cluster_size
    };
    start.min(end)..end
}

/// Panics with the first differing offset if `actual != expected`.
#[track_caller]
pub fn assert_same(actual: &[u8], expected: &[u8], offset: u64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if actual == expected {
        // memcmp: the byte-by-byte search below is slow in debug builds.
        return;
    }
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (i + 16).min(actual.len());
        panic!(
            "{what}: first difference at guest offset {} ({} bytes from {offset}): got {:02x?}, want {:02x?}",
            offset + i as u64,
            i,
            &actual[i..end],
            &expected[i..end]
        );
    }
}

/// Reads `[offset, offset + len)` through the image and compares it with the model.
#[track_caller]
pub fn check_range(image: &Image, model: &SparseDisk, offset: u64, len: u64, what: &str) {
    const CHUNK: u64 = 1 << 20;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let mut got = vec![0u8; n as usize];
        image
            .read_at(&mut got, offset + done)
            .unwrap_or_else(|e| panic!("{what}: read at {}: {e}", offset + done));
        assert_same(&got, &model.read_vec(offset + done, n), offset + done, what);
        done += n;
    }
}

/// Compares every written page of the model, and `extra` ranges, with the image.
#[track_caller]
pub fn check_written(image: &Image, model: &SparseDisk, extra: &[(u64, u64)], what: &str) {
    for (offset, len) in model
        .written_runs()
        .into_iter()
        .chain(extra.iter().copied())
    {
        check_range(image, model, offset, len, what);
    }
}

/// What [`check_extents`] found.
#[derive(Debug, Default)]
pub struct ExtentSummary {
    /// Guest cluster index → host cluster offset, for every data cluster.
    pub data: BTreeMap<u64, u64>,
    pub zero_bytes: u64,
}

/// Walks the extents of the whole disk and checks them against the model: they tile the disk;
/// data extents' host ranges (read from `storage`) hold exactly the guest bytes; zero extents
/// read zeros; unallocated extents read as the base; no host cluster serves two guest clusters.
#[track_caller]
pub fn check_extents(image: &Image, storage: &dyn Storage, model: &SparseDisk) -> ExtentSummary {
    let cs = image.cluster_size();
    let size = image.size();
    let first_data = (1 + u64::from(image.geometry().table_size())) * cs;
    let mut summary = ExtentSummary::default();
    let mut owner: HashMap<u64, u64> = HashMap::new();
    let mut pos = 0;
    for extent in image.extents(0, size) {
        let e = extent.expect("extent iteration");
        assert_eq!(e.offset, pos, "extents must tile the disk: {e:?}");
        assert!(e.length > 0, "empty extent {e:?}");
        pos += e.length;
        match e.kind {
            ExtentKind::Data { host_offset } => {
                assert_eq!(host_offset % cs, e.offset % cs, "misaligned {e:?}");
                assert!(host_offset >= first_data, "data in header or L1: {e:?}");
                let mut done = 0;
                while done < e.length {
                    let n = (e.length - done).min(1 << 20);
                    let mut host = vec![0u8; n as usize];
                    storage.read_at(&mut host, host_offset + done).unwrap();
                    let what = format!("host bytes of {e:?}");
                    assert_same(
                        &host,
                        &model.read_vec(e.offset + done, n),
                        e.offset + done,
                        &what,
                    );
                    done += n;
                }
                let mut g = e.offset - e.offset % cs;
                while g < e.offset + e.length {
                    let host = host_offset + g.max(e.offset) - e.offset;
                    let host = host - host % cs;
                    if let Some(other) = owner.insert(host, g / cs) {
                        panic!(
                            "host cluster {host} serves guest clusters {other} and {}",
                            g / cs
                        );
                    }
                    summary.data.insert(g / cs, host);
                    g += cs;
                }
            }
            ExtentKind::Zero => {
                assert!(
                    model.is_zero(e.offset, e.length),
                    "zero extent reads non-zero in the model: {e:?}"
                );
                summary.zero_bytes += e.length;
            }
            ExtentKind::Unallocated => {
                assert!(
                    model.equals_base(e.offset, e.length),
                    "unallocated extent where the model differs from the backing layer: {e:?}"
                );
            }
        }
    }
    assert_eq!(pos, size, "extents must reach the end of the disk");
    summary
}

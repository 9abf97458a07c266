//! Helpers shared by the model, concurrency and crash-ordering tests: a sparse reference disk,
//! deterministic patterns, backing layers that can be rebuilt at every reopen, a parser of the
//! on-disk layout, an extent checker and a storage that records its I/O.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use qed_image::format::{Header, ZERO_CLUSTER_ENTRY};
use qed_image::storage::{MemoryStorage, Storage};
use qed_image::{BackingLayer, CreateParams, ExtentKind, Image, OpenOptions};

/// Granularity of the reference disk's pages (independent of the cluster size).
pub const PAGE: u64 = 4096;

static ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];

/// Period of the pattern table: a prime, so patterns never line up with clusters or pages.
const PATTERN_PERIOD: usize = 65_521;

fn pattern_table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        (0..PATTERN_PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Never zero: a zero where pattern data belongs is always a bug.
                (x % 255) as u8 + 1
            })
            .collect()
    })
}

/// Fills `buf` with the (never zero) pattern `seed` as it appears at byte `offset`.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let table = pattern_table();
    let period = PATTERN_PERIOD as u64;
    let mut i = ((offset % period + seed.wrapping_mul(7919) % period) % period) as usize;
    let mut done = 0;
    while done < buf.len() {
        let n = (PATTERN_PERIOD - i).min(buf.len() - done);
        buf[done..done + n].copy_from_slice(&table[i..i + n]);
        done += n;
        i = 0;
    }
}

/// `len` bytes of pattern `seed` as at `offset`.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fill_pattern(seed, offset, &mut buf);
    buf
}

/// A small deterministic generator (xorshift64*), so tests need no extra dependency.
#[derive(Debug, Clone)]
pub struct SeqRng(u64);

impl SeqRng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo < hi);
        lo + self.next_u64() % (hi - lo)
    }
}

/// A read-only storage holding pattern `seed` in its first `len` bytes (a large raw backing
/// file without the memory).
#[derive(Debug)]
pub struct PatternStorage {
    pub seed: u64,
    pub len: u64,
}

impl Storage for PatternStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inside = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        fill_pattern(self.seed, offset, &mut buf[..inside]);
        buf[inside..].fill(0);
        Ok(())
    }

    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"))
    }
}

/// What unwritten bytes of a reference disk read as.
#[derive(Debug, Clone)]
pub enum Base {
    /// Zeros (no backing layer).
    Zeros,
    /// Pattern `seed` in the first `len` bytes, zeros after (a raw backing file).
    Pattern { seed: u64, len: u64 },
    /// Another reference disk, zeros past its size (a QED backing layer).
    Disk(Box<SparseDisk>),
}

impl Base {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        let (limit, inner): (u64, Option<&SparseDisk>) = match self {
            Base::Zeros => {
                buf.fill(0);
                return;
            }
            Base::Pattern { len, .. } => (*len, None),
            Base::Disk(disk) => (disk.size, Some(disk)),
        };
        let inside = limit.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        match (self, inner) {
            (Base::Pattern { seed, .. }, _) => fill_pattern(*seed, offset, head),
            (_, Some(disk)) if !head.is_empty() => disk.read(offset, head),
            (_, Some(_)) => {}
            _ => unreachable!(),
        }
    }

    fn is_zero(&self, offset: u64, len: u64) -> bool {
        match self {
            Base::Zeros => true,
            Base::Pattern { len: plen, .. } => offset >= *plen || len == 0,
            Base::Disk(disk) => {
                let end = (offset + len).min(disk.size);
                offset >= end || disk.is_zero(offset, end - offset)
            }
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

    fn each_page(offset: u64, len: u64, mut f: impl FnMut(u64, usize, std::ops::Range<usize>)) {
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
        self.write(offset, &vec![0u8; len as usize]);
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

/// The metadata of an image file, as parsed from its bytes.
#[derive(Debug, Clone)]
pub struct Layout {
    pub header: Header,
    pub file_len: u64,
    pub cluster_size: u64,
    /// Host offsets of the L2 tables, by L1 index.
    pub l2_tables: BTreeMap<usize, u64>,
    /// Referenced data clusters: host offset → guest offset.
    pub data: BTreeMap<u64, u64>,
    pub zero_entries: u64,
}

impl Layout {
    /// Clusters referenced by the header area, the L1 table, the L2 tables and the entries.
    pub fn used_clusters(&self) -> u64 {
        let ts = u64::from(self.header.table_size);
        u64::from(self.header.header_size)
            + ts
            + self.l2_tables.len() as u64 * ts
            + self.data.len() as u64
    }

    /// Whether NEED_CHECK is set.
    pub fn dirty(&self) -> bool {
        self.header.needs_check()
    }

    /// Asserts that every whole cluster of the file is referenced except `leaked` ones (a
    /// partial cluster at the end, which an interrupted allocation can leave, is not counted).
    #[track_caller]
    pub fn assert_whole_clusters_covered(&self, leaked: u64) {
        assert_eq!(
            self.file_len / self.cluster_size,
            self.used_clusters() + leaked,
            "whole file clusters vs referenced clusters + {leaked} leaked: {self:?}"
        );
    }

    /// Asserts the file is exactly covered: its length is a multiple of the cluster size and
    /// every cluster is referenced except `leaked` ones.
    #[track_caller]
    pub fn assert_exact_cover(&self, leaked: u64) {
        assert_eq!(
            self.file_len % self.cluster_size,
            0,
            "file length {} is not a multiple of the cluster size",
            self.file_len
        );
        assert_eq!(
            self.file_len / self.cluster_size,
            self.used_clusters() + leaked,
            "file clusters vs referenced clusters + {leaked} leaked: {self:?}"
        );
    }
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Parses the tables of an image file and checks them: a valid header; every L1 and L2 entry
/// unallocated, zero (L2) or an aligned cluster inside the file and past the header; no
/// cluster used twice.
#[track_caller]
pub fn parse_layout(bytes: &[u8]) -> Layout {
    let header = Header::decode(&bytes[..64]).expect("header decodes");
    let file_len = bytes.len() as u64;
    let valid = header.validate(file_len).expect("header validates");
    let geometry = valid.geometry();
    let cs = geometry.cluster_size();
    let table_bytes = geometry.table_bytes();
    let clusters = file_len.div_ceil(cs);
    let mut used: Vec<Option<&'static str>> = vec![None; clusters as usize];
    let mut mark = |offset: u64, count: u64, what: &'static str| {
        assert_eq!(offset % cs, 0, "{what} at {offset} is not cluster aligned");
        assert!(
            offset + count * cs <= file_len,
            "{what} at {offset} ({count} clusters) extends past the end of the file ({file_len})"
        );
        for c in offset / cs..offset / cs + count {
            if let Some(other) = used[c as usize].replace(what) {
                panic!("cluster {c} used as {other} and as {what}");
            }
        }
    };
    mark(0, u64::from(header.header_size), "header");
    mark(
        header.l1_table_offset,
        u64::from(header.table_size),
        "L1 table",
    );
    let read_table = |offset: u64| -> Vec<u64> {
        let t = &bytes[offset as usize..(offset + table_bytes) as usize];
        (0..t.len() / 8).map(|i| le_u64(t, i * 8)).collect()
    };
    let mut layout = Layout {
        header,
        file_len,
        cluster_size: cs,
        l2_tables: BTreeMap::new(),
        data: BTreeMap::new(),
        zero_entries: 0,
    };
    let l1 = read_table(header.l1_table_offset);
    for (i, &l2) in l1.iter().enumerate() {
        if l2 == 0 {
            continue;
        }
        mark(l2, u64::from(header.table_size), "L2 table");
        layout.l2_tables.insert(i, l2);
        for (j, &entry) in read_table(l2).iter().enumerate() {
            let guest = geometry.l1_guest_offset(i) + j as u64 * cs;
            match entry {
                0 => {}
                ZERO_CLUSTER_ENTRY => layout.zero_entries += 1,
                host => {
                    assert!(guest < header.image_size, "L2 entry past the disk: {guest}");
                    mark(host, 1, "data cluster");
                    layout.data.insert(host, guest);
                }
            }
        }
    }
    layout
}

/// Image creation parameters.
pub fn params(
    size: u64,
    cluster_size: u32,
    table_size: u32,
    backing: Option<&str>,
    raw: bool,
) -> CreateParams {
    CreateParams {
        image_size: size,
        cluster_size,
        table_size,
        backing_file: backing.map(str::to_owned),
        backing_raw: raw,
    }
}

/// Read-write options with the idle timer out of the way (tests stay deterministic).
pub fn rw_options() -> OpenOptions {
    OpenOptions {
        clean_after: Duration::from_secs(3600),
        ..OpenOptions::read_write()
    }
}

/// A new image in memory.
pub fn create_memory(params: &CreateParams) -> Arc<MemoryStorage> {
    let storage = Arc::new(MemoryStorage::new());
    Image::create_on(&*storage, params).expect("create image");
    storage
}

/// Opens an image on a shared storage (so it can be reopened later).
pub fn open_shared<S: Storage + 'static>(
    storage: &Arc<S>,
    options: &OpenOptions,
    backing: Option<BackingLayer>,
) -> Image {
    Image::open_storage(Box::new(storage.clone()), options, backing).expect("open image")
}

/// Opens an image file. Retries while the image lock is busy: a child process that another
/// test thread is spawning holds copies of our descriptors (and so our locks) until it execs.
pub fn open_file(path: &Path, options: &OpenOptions) -> Image {
    let mut tries = 0;
    loop {
        match Image::open(path, options) {
            Err(qed_image::Error::Io { source, .. })
                if source.kind() == io::ErrorKind::WouldBlock && tries < 100 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other.expect("open image file"),
        }
    }
}

/// A backing layer that can be opened again at every reopen of the image above it.
#[derive(Clone)]
pub enum BackingSpec {
    None,
    Raw(Arc<dyn Storage>),
    Qed(Arc<MemoryStorage>),
}

impl BackingSpec {
    pub fn layer(&self) -> Option<BackingLayer> {
        match self {
            BackingSpec::None => None,
            BackingSpec::Raw(storage) => {
                Some(BackingLayer::raw(Box::new(storage.clone())).expect("raw backing layer"))
            }
            BackingSpec::Qed(storage) => Some(BackingLayer::Qed(Box::new(open_shared(
                storage,
                &OpenOptions::read_only(),
                None,
            )))),
        }
    }
}

/// Calls `qemu-img check` on `path` and asserts exit status 0. Without qemu-img: panics when
/// `CI=true`, otherwise prints a note and returns false.
#[track_caller]
pub fn qemu_img_check(path: &Path) -> bool {
    let out = match std::process::Command::new("qemu-img")
        // -U: another test thread's child may briefly hold a copy of a descriptor (and lock).
        .args(["check", "-U", "-f", "qed"])
        .arg(path)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("qemu-img is required on CI: {e}");
            }
            eprintln!("note: qemu-img not found ({e}); skipping qemu-img check");
            return false;
        }
    };
    assert!(
        out.status.success(),
        "qemu-img check {} failed ({}):\n{}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// One I/O a [`RecordingStorage`] saw.
#[derive(Debug, Clone)]
pub enum Event {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Punch(u64, u64),
    Flush,
}

impl Event {
    /// Does to `disk` what this event did.
    pub fn apply(&self, disk: &dyn Storage) {
        match self {
            Event::Write(offset, data) => disk.write_at(data, *offset).unwrap(),
            Event::SetLen(len) => disk.set_len(*len).unwrap(),
            Event::Punch(offset, len) => disk.punch_hole(*offset, *len).unwrap(),
            Event::Flush => {}
        }
    }
}

/// A memory storage that records every write, length change, hole punch and flush in order.
#[derive(Debug)]
pub struct RecordingStorage {
    initial: Vec<u8>,
    state: Mutex<(MemoryStorage, Vec<Event>)>,
}

impl RecordingStorage {
    pub fn new(initial: Vec<u8>) -> Self {
        Self {
            state: Mutex::new((MemoryStorage::from_bytes(initial.clone()), Vec::new())),
            initial,
        }
    }

    /// Number of events so far.
    pub fn position(&self) -> usize {
        self.state.lock().unwrap().1.len()
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.state.lock().unwrap().1.clone()
    }

    /// The disk before the first event.
    pub fn initial(&self) -> &[u8] {
        &self.initial
    }

    /// The disk after the first `count` events.
    pub fn replay(&self, count: usize) -> Vec<u8> {
        let disk = MemoryStorage::from_bytes(self.initial.clone());
        for event in &self.events()[..count] {
            event.apply(&disk);
        }
        disk.to_bytes()
    }

    fn record<T>(
        &self,
        event: Event,
        apply: impl FnOnce(&MemoryStorage) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut state = self.state.lock().unwrap();
        let result = apply(&state.0)?;
        state.1.push(event);
        Ok(result)
    }
}

impl Storage for RecordingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.state.lock().unwrap().0.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.record(Event::Write(offset, buf.to_vec()), |s| {
            s.write_at(buf, offset)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.record(Event::Flush, |s| s.flush())
    }

    fn len(&self) -> io::Result<u64> {
        self.state.lock().unwrap().0.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.record(Event::SetLen(len), |s| s.set_len(len))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(Event::Punch(offset, len), |s| s.punch_hole(offset, len))
    }
}

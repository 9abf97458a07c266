//! Bodies of the fuzz targets, shared with the corpus replay test
//! (`crates/qed-image/tests/fuzz_corpus.rs` includes this file as a module).
//!
//! Each function takes arbitrary bytes, must never panic, hang or allocate out of proportion,
//! and asserts what must hold whatever the bytes are.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use qed_format::{Header, L1Entry, L2Entry, HEADER_LEN};
use qed_image::storage::{MemoryStorage, Storage};
use qed_image::{Error, ExtentKind, Image, OpenOptions, Repair};

/// Marks the end of the image bytes in an `open_ops` input; what follows is the operation
/// script. Inputs without it are all image, run with [`DEFAULT_SCRIPT`].
pub const OPS_SEPARATOR: &[u8] = b"QEDOPS";

/// The script run on inputs that carry none: a mix of every operation.
pub const DEFAULT_SCRIPT: &[u8] = &[
    0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0xff, 0x0f, // read
    1, 0x37, 0x12, 0, 0, 0, 0, 0, 0, 0x00, 0x30, // write
    5, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, // extents
    2, 0x11, 0x03, 0, 0, 0, 0, 0, 0, 0x00, 0x22, // write zeroes
    1, 0x00, 0x80, 0x01, 0, 0, 0, 0, 0, 0x00, 0x10, // write
    3, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0xff, 0xff, // discard
    4,    // flush
    8,    // repair
    7,    // reopen
    0, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0xff, 0xff, // read
    6,    // check
];

/// Most operations run from one input.
const MAX_OPS: usize = 32;
/// Longest request of one operation.
const MAX_REQUEST: u64 = 64 << 10;
/// Most extents looked at in one walk.
const MAX_EXTENTS: usize = 4096;
const SECTOR: u64 = 512;

/// Open options bounding what an image from fuzz input can make the engine allocate.
pub fn options(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        max_table_bytes: 1 << 20,
        l2_cache_bytes: 1 << 20,
        clean_after: Duration::from_secs(3600),
        ..OpenOptions::default()
    }
}

fn open(storage: &Arc<MemoryStorage>, writable: bool) -> qed_image::Result<Image> {
    Image::open_storage(Box::new(storage.clone()), &options(writable), None)
}

/// Target `header_decode`: decode and validate a header against several file lengths, then
/// probe the validated geometry with words taken from the input.
pub fn header_decode(data: &[u8]) {
    let Ok(header) = Header::decode(data) else {
        return;
    };
    assert_eq!(
        Header::decode(&header.encode()),
        Ok(header),
        "encode round trip"
    );
    let words: Vec<u64> = data
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .take(64)
        .collect();
    let lengths = [
        data.len() as u64,
        0,
        HEADER_LEN as u64,
        u64::MAX,
        words.last().copied().unwrap_or(0),
    ];
    for len in lengths {
        let Ok(valid) = header.validate(len) else {
            continue;
        };
        let g = valid.geometry();
        let cs = g.cluster_size();
        assert!(cs.is_power_of_two() && (4096..=64 << 20).contains(&cs));
        assert!(g.table_size().is_power_of_two() && g.table_size() <= 16);
        assert_eq!(header.image_size % 512, 0);
        assert!(u128::from(header.image_size) <= g.max_image_size());
        let header_bytes = valid.header_bytes();
        assert_eq!(header_bytes, u64::from(header.header_size) * cs);
        let l1 = header.l1_table_offset;
        assert!(l1 % cs == 0 && l1 >= header_bytes);
        assert!(l1.checked_add(g.table_bytes()).is_some_and(|e| e <= len));
        if let Some((off, n)) = valid.backing_name_range() {
            assert!(off + n as u64 <= header_bytes);
        }
        for &w in &words {
            let _ = L1Entry::decode(w, &g);
            let _ = L2Entry::decode(w, &g);
            if valid.check_l2_offset(len, w).is_ok() {
                assert!(w % cs == 0 && w >= header_bytes && w + g.table_bytes() <= len);
            }
            if valid.is_valid_data_offset(len, w) {
                assert!(w % cs == 0 && w >= header_bytes && w + cs <= len);
            }
            if w < header.image_size {
                assert!(g.l1_index(w) < g.entries_per_table());
                assert!(g.l2_index(w) < g.entries_per_table());
                let back = g.l1_guest_offset(g.l1_index(w))
                    + ((g.l2_index(w) as u64) << g.cluster_bits())
                    + g.offset_in_cluster(w);
                assert_eq!(back, w, "address split");
            }
            let _ = g.align_up(w);
            let _ = g.clusters_for(w);
        }
    }
}

/// Splits an `open_ops` input into image bytes and operation script.
pub fn split_ops(data: &[u8]) -> (&[u8], &[u8]) {
    match data
        .windows(OPS_SEPARATOR.len())
        .rposition(|w| w == OPS_SEPARATOR)
    {
        Some(at) => (&data[..at], &data[at + OPS_SEPARATOR.len()..]),
        None => (data, DEFAULT_SCRIPT),
    }
}

/// What the guest must read, per 512-byte sector touched so far (only for images that
/// checked clean at open: on a corrupt image reads may legitimately change under writes).
#[derive(Default)]
struct Shadow {
    sectors: HashMap<u64, Vec<u8>>,
}

impl Shadow {
    /// Loads every sector of `[start, end)` not seen yet; false if a read failed.
    fn touch(&mut self, image: &Image, start: u64, end: u64) -> bool {
        for s in start / SECTOR..end.div_ceil(SECTOR) {
            if self.sectors.contains_key(&s) {
                continue;
            }
            let mut buf = vec![0u8; SECTOR as usize];
            if image.read_at(&mut buf, s * SECTOR).is_err() {
                return false;
            }
            self.sectors.insert(s, buf);
        }
        true
    }

    fn put(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let pos = offset + i as u64;
            if let Some(sector) = self.sectors.get_mut(&(pos / SECTOR)) {
                sector[(pos % SECTOR) as usize] = b;
            }
        }
    }

    fn zero(&mut self, start: u64, end: u64) {
        for pos in start..end {
            if let Some(sector) = self.sectors.get_mut(&(pos / SECTOR)) {
                sector[(pos % SECTOR) as usize] = 0;
            }
        }
    }

    /// Compares `buf` read at guest `offset` with every known sector it covers.
    fn compare(&self, buf: &[u8], offset: u64, what: &str) {
        for (i, &b) in buf.iter().enumerate() {
            let pos = offset + i as u64;
            if let Some(sector) = self.sectors.get(&(pos / SECTOR)) {
                assert_eq!(
                    b,
                    sector[(pos % SECTOR) as usize],
                    "{what}: guest byte {pos} differs from what was written"
                );
            }
        }
    }

    /// Reads every known sector back.
    fn verify_all(&self, image: &Image, what: &str) {
        let mut buf = vec![0u8; SECTOR as usize];
        for (&s, want) in &self.sectors {
            image
                .read_at(&mut buf, s * SECTOR)
                .unwrap_or_else(|e| panic!("{what}: reading sector {s} failed: {e}"));
            assert!(
                &buf == want,
                "{what}: sector {s} differs from what was written"
            );
        }
    }
}

/// Decodes the operation script.
struct Script<'a> {
    bytes: &'a [u8],
}

impl Script<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(b)
    }

    /// An 8-byte little-endian word (missing bytes read as zero).
    fn word(&mut self) -> u64 {
        let n = self.bytes.len().min(8);
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        u64::from_le_bytes(b)
    }

    /// A request `(offset, len)`: mostly inside the disk, sometimes (1 in 16) raw and
    /// possibly out of range.
    fn request(&mut self, size: u64) -> (u64, u64) {
        let flags = self.byte().unwrap_or(0);
        let raw = self.word();
        let len_raw =
            u64::from(self.byte().unwrap_or(0)) | u64::from(self.byte().unwrap_or(0)) << 8;
        if flags & 0xf0 == 0xf0 {
            return (raw, len_raw);
        }
        let mut offset = raw % size.max(1);
        if flags & 1 != 0 {
            offset -= offset % SECTOR;
        }
        let room = (size - offset.min(size)).min(MAX_REQUEST);
        let len = (len_raw << 2) % (room + 1);
        (offset.min(size), len)
    }
}

fn in_range(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// Asserts the outcome of a request against its range: out-of-range requests fail with
/// `OutOfRange`, and nothing else does on an image that checked clean.
fn expect_range<T>(
    result: &qed_image::Result<T>,
    offset: u64,
    len: u64,
    size: u64,
    strict: bool,
    what: &str,
) {
    match result {
        Err(Error::OutOfRange { .. }) => assert!(
            !in_range(offset, len, size),
            "{what} at {offset}+{len} of {size}: OutOfRange inside the disk"
        ),
        Err(e) => {
            assert!(
                in_range(offset, len, size),
                "{what} at {offset}+{len} of {size}: {e} instead of OutOfRange"
            );
            assert!(
                !strict,
                "{what} at {offset}+{len} on a clean image failed: {e}"
            );
        }
        Ok(_) => assert!(
            in_range(offset, len, size),
            "{what} at {offset}+{len} of {size} succeeded outside the disk"
        ),
    }
}

/// Walks the extents of `[offset, offset + len)`: they must tile the clipped range; zero and
/// unallocated ones read zeros; data ones read what the storage holds at their host offset.
fn walk_extents(image: &Image, storage: &MemoryStorage, offset: u64, len: u64, strict: bool) {
    let size = image.size();
    let end = offset.saturating_add(len).min(size);
    let mut pos = offset.min(end);
    let mut guest = vec![0u8; 4096];
    let mut host = vec![0u8; 4096];
    for extent in image.extents(offset, len).take(MAX_EXTENTS) {
        let extent = match extent {
            Ok(e) => e,
            Err(e) => {
                assert!(!strict, "extents of a clean image failed: {e}");
                return;
            }
        };
        assert_eq!(extent.offset, pos, "extents leave a gap or overlap");
        assert!(extent.length > 0, "empty extent");
        pos = extent.offset + extent.length;
        assert!(pos <= end, "extent past the end of the range");
        let n = extent.length.min(4096) as usize;
        let Ok(()) = image.read_at(&mut guest[..n], extent.offset) else {
            assert!(!strict, "read of an extent of a clean image failed");
            continue;
        };
        match extent.kind {
            ExtentKind::Zero | ExtentKind::Unallocated => {
                assert!(
                    guest[..n].iter().all(|&b| b == 0),
                    "{extent:?} does not read zeros"
                );
            }
            ExtentKind::Data { host_offset } => {
                storage
                    .read_at(&mut host[..n], host_offset)
                    .expect("memory read");
                assert!(
                    guest[..n] == host[..n],
                    "{extent:?} reads other bytes than its host range"
                );
            }
        }
    }
}

fn pattern(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (offset.wrapping_add(i) >> 9) as u8 ^ (i as u8).rotate_left(3))
        .collect()
}

/// Target `open_ops`: open the image bytes read-write in memory, run the operation script,
/// and check that reads see what was written (when the image checked clean at open).
pub fn open_ops(data: &[u8]) {
    let (image_bytes, script) = split_ops(data);
    let storage = Arc::new(MemoryStorage::from_bytes(image_bytes.to_vec()));
    let Ok(mut image) = open(&storage, true) else {
        return;
    };
    let clean = image
        .check(Repair::None)
        .is_ok_and(|r| r.corruptions == 0 && r.check_errors == 0);
    let mut shadow = clean.then(Shadow::default);
    let mut script = Script { bytes: script };
    let cs = image.cluster_size();
    for step in 0..MAX_OPS {
        let Some(op) = script.byte() else { break };
        let size = image.size();
        let strict = shadow.is_some();
        match op % 9 {
            0 => {
                let (offset, len) = script.request(size);
                let len = len.min(MAX_REQUEST);
                let mut buf = vec![0u8; len as usize];
                let r = image.read_at(&mut buf, offset);
                expect_range(&r, offset, len, size, strict, "read");
                if let (Ok(()), Some(s)) = (&r, &shadow) {
                    s.compare(&buf, offset, "read");
                }
            }
            1 => {
                let (offset, len) = script.request(size);
                let len = len.min(MAX_REQUEST);
                let data = pattern(step as u8 ^ op, offset, len);
                if in_range(offset, len, size) {
                    if let Some(s) = &mut shadow {
                        if !s.touch(&image, offset, offset + len) {
                            shadow = None;
                        }
                    }
                }
                let r = image.write_at(&data, offset);
                expect_range(&r, offset, len, size, shadow.is_some(), "write");
                if let (Ok(()), Some(s)) = (&r, &mut shadow) {
                    s.put(offset, &data);
                }
            }
            2 | 3 => {
                let (offset, len) = script.request(size);
                let len = len.min(MAX_REQUEST);
                if in_range(offset, len, size) {
                    if let Some(s) = &mut shadow {
                        if !s.touch(&image, offset, offset + len) {
                            shadow = None;
                        }
                    }
                }
                let zero = op % 9 == 2;
                let r = if zero {
                    image.write_zeroes_at(offset, len)
                } else {
                    image.discard(offset, len)
                };
                expect_range(&r, offset, len, size, shadow.is_some(), "zero/discard");
                if let (Ok(()), Some(s)) = (&r, &mut shadow) {
                    if zero {
                        s.zero(offset, offset + len);
                    } else {
                        // Whole clusters read zeros; the last one counts as whole at the
                        // end of the disk.
                        let end = offset + len;
                        let end = if end == size {
                            end.div_ceil(cs) * cs
                        } else {
                            end / cs * cs
                        };
                        let start = offset.div_ceil(cs) * cs;
                        if start < end {
                            s.zero(start, end.min(size));
                        }
                    }
                }
            }
            4 => {
                let r = image.flush();
                assert!(!strict || r.is_ok(), "flush of a clean image failed: {r:?}");
            }
            5 => {
                let (offset, len) = script.request(size);
                walk_extents(&image, &storage, offset, len, strict);
            }
            6 => {
                if let Ok(report) = image.check(Repair::None) {
                    if strict {
                        assert_eq!(
                            report.corruptions, 0,
                            "operations corrupted a clean image: {report:?}"
                        );
                        assert_eq!(report.check_errors, 0, "{report:?}");
                    }
                }
            }
            7 => {
                let closed = image.close();
                assert!(
                    !strict || closed.is_ok(),
                    "close of a clean image failed: {closed:?}"
                );
                image = match open(&storage, true) {
                    Ok(image) => image,
                    Err(e) => {
                        assert!(
                            !strict || closed.is_err(),
                            "reopen of a clean image failed: {e}"
                        );
                        return;
                    }
                };
                if let Some(s) = &shadow {
                    s.verify_all(&image, "after reopen");
                }
            }
            _ => {
                let r = image.check(Repair::All);
                if strict {
                    let report =
                        r.unwrap_or_else(|e| panic!("repair of a clean image failed: {e}"));
                    assert_eq!(report.corruptions, 0, "{report:?}");
                }
            }
        }
        if let Some(s) = &shadow {
            s.verify_all(&image, "after an operation");
        }
    }
    walk_extents(&image, &storage, 0, u64::MAX, shadow.is_some());
    if let Some(s) = &shadow {
        let report = image.check(Repair::None).expect("final check");
        assert_eq!(
            report.corruptions, 0,
            "operations corrupted a clean image: {report:?}"
        );
        s.verify_all(&image, "at the end");
    }
    let _ = image.close();
}

/// Target `check_repair`: check, repair, check. After a repair that returned `Ok`, the next
/// check finds no corruption and exactly the leaks the repair reported left over, everything
/// reads, and the repaired image reopens with the same result.
pub fn check_repair(data: &[u8]) {
    let storage = Arc::new(MemoryStorage::from_bytes(data.to_vec()));
    let Ok(image) = open(&storage, true) else {
        return;
    };
    let _ = image.check(Repair::None);
    let Ok(repair) = image.check(Repair::All) else {
        return;
    };
    let again = image
        .check(Repair::None)
        .unwrap_or_else(|e| panic!("check after a successful repair failed: {e}"));
    assert_eq!(
        again.corruptions, repair.corruptions,
        "{again:?} after {repair:?}"
    );
    assert_eq!(again.check_errors, 0, "{again:?} after {repair:?}");
    assert_eq!(again.leaks, repair.leaks, "{again:?} after {repair:?}");
    if repair.is_clean() {
        assert!(again.is_clean(), "{again:?} after {repair:?}");
    }
    if repair.corruptions == 0 {
        walk_extents(&image, &storage, 0, u64::MAX, true);
    }
    image.close().expect("close after repair");
    let reopened = open(&storage, false).expect("reopen after repair");
    let last = reopened.check(Repair::None).expect("check after reopen");
    assert_eq!(
        (last.corruptions, last.leaks, last.check_errors),
        (again.corruptions, again.leaks, again.check_errors),
        "the repair did not reach the storage"
    );
    if again.is_clean() {
        assert!(
            !reopened.info().dirty,
            "NEED_CHECK left set after a clean repair"
        );
    }
}

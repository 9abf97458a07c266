//! Regression tests for the engine's second pass: each test reproduces one finding and fails
//! on the code that had it.

mod kit;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kit::{create_memory, file_u64, header_of, open_rw, params, patch_file, rw_options};
use qed_image::format::{Header, FEATURE_NEED_CHECK};
use qed_image::storage::{Fault, FaultStorage, MemoryStorage, OpKind};
use qed_image::{Error, ExtentKind, Image, OpenOptions, Repair, Storage};

#[test]
fn a_file_cut_by_one_byte_keeps_its_last_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.qed");
    Image::create(&path, &params(1 << 20, 65536, 4, None, false)).unwrap();
    let image = open_rw(&path);
    image.write_at(&[0x11; 65536], 0).unwrap();
    // The first write put data at 320K and the L2 table after it; this cluster comes last.
    image.write_at(&[0x5a; 65536], 65536).unwrap();
    image.close().unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 1).unwrap();
    drop(file);

    let image = kit::open_ro(&path);
    let mut buf = vec![0u8; 65536];
    image.read_at(&mut buf, 65536).unwrap();
    let host = match image.extents(65536, 65536).next().unwrap().unwrap().kind {
        ExtentKind::Data { host_offset } => host_offset,
        other => panic!("expected data, got {other:?}"),
    };
    assert_eq!(host + 65536, len, "the data cluster is the last one");
    // The cut byte reads as zero, as through QEMU.
    assert!(buf[..65535].iter().all(|&b| b == 0x5a));
    assert_eq!(buf[65535], 0);
    let report = image.check(Repair::None).unwrap();
    assert_eq!(report.corruptions, 0, "{report:?}");
    drop(image);

    // A repair keeps every byte that can be read.
    let image = open_rw(&path);
    let report = image.check(Repair::All).unwrap();
    assert_eq!(report.corruptions_fixed, 0, "{report:?}");
    let mut after = vec![0u8; 65536];
    image.read_at(&mut after, 65536).unwrap();
    assert_eq!(after, buf);
    image.close().unwrap();
}

/// 4 KiB clusters, table size 16: 64 KiB tables, each mapping 32 MiB.
const TABLE: u64 = 65536;

#[test]
fn rewriting_existing_tables_without_a_flush_holds_the_budget() {
    let storage = create_memory(&params(64 << 30, 4096, 16, None, false));
    let budget = 8 * TABLE as usize;
    let options = OpenOptions {
        l2_cache_bytes: budget,
        ..rw_options()
    };
    let image = kit::open_shared(&storage, &options, None);
    // 64 tables exist and are on disk.
    for t in 0..64u64 {
        image.write_at(&[1; 4096], t * (32 << 20)).unwrap();
    }
    image.flush().unwrap();
    // Allocating writes into those tables, never a flush: every table gets dirty again.
    let mut rng = kit::Rng::new(7);
    for _ in 0..2000 {
        let t = rng.below(64);
        let cluster = rng.below(8192);
        image
            .write_at(&[2; 4096], t * (32 << 20) + cluster * 4096)
            .unwrap();
        let stats = image.cache_stats();
        // Within the budget, plus the one table this thread was using.
        assert!(
            stats.dirty_bytes <= budget as u64 + TABLE,
            "dirty tables pinned past the budget: {stats:?}"
        );
        assert!(
            stats.bytes <= budget as u64 + TABLE,
            "tables held past the budget: {stats:?}"
        );
    }
    image.close().unwrap();
}

#[test]
fn a_write_back_lets_the_cache_shrink_to_its_budget() {
    let storage = create_memory(&params(64 << 30, 4096, 16, None, false));
    let budget = 4 * TABLE as usize;
    let options = OpenOptions {
        l2_cache_bytes: budget,
        ..rw_options()
    };
    let image = kit::open_shared(&storage, &options, None);
    for t in 0..32u64 {
        image.write_at(&[1; 512], t * (32 << 20)).unwrap();
    }
    image.flush().unwrap();
    let stats = image.cache_stats();
    assert!(stats.bytes <= budget as u64, "{stats:?}");
    assert_eq!(stats.dirty_bytes, 0, "{stats:?}");
    assert!(stats.evictions > 0, "{stats:?}");
}

#[test]
fn tables_larger_than_the_budget_stay_resident_only_while_in_use() {
    // 16 MiB clusters, table size 1: 16 MiB tables against an 8 MiB budget.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.qed");
    let cs: u64 = 16 << 20;
    let coverage = cs / 8 * cs;
    Image::create(&path, &params(4 * coverage, cs as u32, 1, None, false)).unwrap();
    let options = OpenOptions {
        l2_cache_bytes: 8 << 20,
        ..rw_options()
    };
    let image = kit::open_file(&path, &options);
    for t in 0..4 {
        image.write_at(&[9; 512], t * coverage).unwrap();
        let stats = image.cache_stats();
        assert!(stats.bytes <= cs, "{stats:?}");
        assert!(stats.dirty_bytes <= cs, "{stats:?}");
    }
    image.close().unwrap();
    let image = kit::open_file(&path, &options);
    let report = image.check(Repair::None).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(image.cache_stats().bytes <= cs, "{:?}", image.cache_stats());
    let mut buf = [0u8; 512];
    image.read_at(&mut buf, 3 * coverage).unwrap();
    assert_eq!(buf, [9; 512]);
}

#[test]
fn a_sparse_multi_terabyte_file_with_need_check_opens_and_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.qed");
    Image::create(&path, &params(1 << 30, 4096, 4, None, false)).unwrap();
    let image = open_rw(&path);
    image.write_at(&[3; 8192], 1 << 20).unwrap();
    image.close().unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    // 4 TiB of file, nearly all of it a hole; NEED_CHECK set, so a writable open repairs.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    if file.set_len(4 << 40).is_err() {
        eprintln!("note: this file system cannot hold a 4 TiB sparse file; skipped");
        return;
    }
    drop(file);
    let mut header = header_of(&path);
    header.features |= FEATURE_NEED_CHECK;
    patch_file(&path, 0, &header.encode());
    // One bit per cluster of the file would be 128 MiB; per entry of 55 bytes, 55 GiB.
    let image = open_rw(&path);
    let repair = image.open_repair().expect("repaired at open").clone();
    assert_eq!(repair.leaks, 0, "{repair:?}");
    assert_eq!(repair.leaks_fixed, (4u64 << 40) / 4096 - len / 4096);
    assert_eq!(image.file_length().unwrap(), len);
    let mut buf = [0u8; 8192];
    image.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, [3; 8192]);
    image.close().unwrap();
    assert!(!header_of(&path).needs_check());
}

#[test]
fn a_read_error_in_a_backing_image_names_that_image() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qed");
    let top = dir.path().join("top.qed");
    Image::create(&base, &params(1 << 20, 4096, 4, None, false)).unwrap();
    let image = open_rw(&base);
    image.write_at(&[1; 4096], 0).unwrap();
    image.close().unwrap();
    // L2[0] of the base becomes unaligned.
    let l2 = file_u64(&base, 4096);
    patch_file(&base, l2, &(4096u64 * 7 + 3).to_le_bytes());
    Image::create(&top, &params(1 << 20, 4096, 4, Some("base.qed"), false)).unwrap();
    let image = kit::open_ro(&top);
    let err = image.read_at(&mut [0u8; 512], 0).unwrap_err();
    match &err {
        Error::Backing { path, depth, cause } => {
            assert_eq!(path, &base, "{err}");
            assert_eq!(*depth, 1);
            assert!(matches!(**cause, Error::Corrupt { .. }), "{err}");
        }
        other => panic!("expected a backing error naming base.qed, got {other}"),
    }
    assert!(err.to_string().contains("base.qed"), "{err}");
}

#[test]
fn a_non_utf8_backing_name_opens_that_very_file() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let real = std::ffi::OsStr::from_bytes(b"base\xff.raw");
    std::fs::write(dir.path().join(real), vec![0x77; 65536]).unwrap();
    // What a lossy decoding of the name would open instead.
    std::fs::write(dir.path().join("base\u{fffd}.raw"), vec![0x66; 65536]).unwrap();
    let top = dir.path().join("top.qed");
    Image::create(&top, &params(65536, 4096, 4, Some("placeholder"), true)).unwrap();
    // Store the non-UTF-8 name by hand (CreateParams takes a String).
    let mut header = header_of(&top);
    header.backing_filename_size = 9;
    patch_file(&top, 0, &header.encode());
    patch_file(
        &top,
        u64::from(header.backing_filename_offset),
        b"base\xff.raw",
    );
    let image = kit::open_ro(&top);
    assert_eq!(
        image.info().backing_name.as_deref(),
        Some(&b"base\xff.raw"[..])
    );
    let mut buf = [0u8; 4096];
    image.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x77; 4096], "read the look-alike file");
}

#[test]
fn closing_a_poisoned_image_reports_the_error() {
    let memory = Arc::new(MemoryStorage::new());
    Image::create_on(&*memory, &params(1 << 20, 4096, 4, None, false)).unwrap();
    let storage = Arc::new(FaultStorage::new(memory.clone()));
    let image = Image::open_storage(Box::new(storage.clone()), &rw_options(), None).unwrap();
    image.write_at(&[1; 4096], 0).unwrap();
    storage.arm(Fault::from_nth(OpKind::Flush, 1));
    assert!(image.flush().is_err());
    assert!(image.is_poisoned());
    assert!(image.poison_cause().is_some());
    storage.disarm();
    match image.close() {
        Err(Error::Poisoned) => {}
        other => panic!("close of a poisoned image returned {other:?}"),
    }
    // Nothing was written back: NEED_CHECK stays set for the next open's repair.
    assert!(Header::decode(&memory.to_bytes()).unwrap().needs_check());
}

fn need_check_on_disk(path: &Path) -> bool {
    header_of(path).needs_check()
}

#[test]
fn the_idle_timer_clears_need_check_one_period_after_the_last_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idle.qed");
    Image::create(&path, &params(1 << 20, 4096, 4, None, false)).unwrap();
    let idle = Duration::from_millis(1000);
    let options = OpenOptions {
        clean_after: idle,
        ..OpenOptions::read_write()
    };
    let image = kit::open_file(&path, &options);
    // Just after the timer's first look (at `idle` after the open): a timer that needs a
    // whole quiet period between two of its looks clears only at 2 × idle after this write.
    std::thread::sleep(idle + Duration::from_millis(100));
    image.write_at(&[1; 4096], 0).unwrap();
    let written = Instant::now();
    assert!(need_check_on_disk(&path));
    let deadline = written + idle + Duration::from_millis(600);
    loop {
        if !need_check_on_disk(&path) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "NEED_CHECK still set {:?} after the last change (idle {idle:?})",
            written.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Never before a whole period has passed.
    assert!(
        written.elapsed() >= idle,
        "cleared after {:?}",
        written.elapsed()
    );
    image.close().unwrap();
}

/// A storage whose next flush can be held until released.
struct Gate<S> {
    inner: S,
    armed: AtomicBool,
    held: Mutex<bool>,
    cond: Condvar,
    flushes: AtomicUsize,
}

impl<S> Gate<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            armed: AtomicBool::new(false),
            held: Mutex::new(false),
            cond: Condvar::new(),
            flushes: AtomicUsize::new(0),
        }
    }

    fn wait_held(&self) {
        let mut held = self.held.lock().unwrap();
        while !*held {
            held = self.cond.wait(held).unwrap();
        }
    }

    fn release(&self) {
        *self.held.lock().unwrap() = false;
        self.cond.notify_all();
    }
}

impl<S: Storage> Storage for Gate<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        if self.armed.swap(false, Ordering::SeqCst) {
            let mut held = self.held.lock().unwrap();
            *held = true;
            self.cond.notify_all();
            while *held {
                held = self.cond.wait(held).unwrap();
            }
        }
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

#[test]
fn an_allocation_waits_while_need_check_is_being_flushed() {
    let memory = Arc::new(MemoryStorage::new());
    Image::create_on(&*memory, &params(1 << 20, 4096, 4, None, false)).unwrap();
    // An image with an L2 table on disk and NEED_CHECK clear.
    {
        let image = kit::open_shared(&memory, &rw_options(), None);
        image.write_at(&[1; 4096], 0).unwrap();
        image.close().unwrap();
    }
    assert!(!Header::decode(&memory.to_bytes()).unwrap().needs_check());
    let gate = Arc::new(Gate::new(memory.clone()));
    let image = Arc::new(Image::open_storage(Box::new(gate.clone()), &rw_options(), None).unwrap());
    // A zero cluster in the existing table: a table change with no cluster allocated.
    image.write_zeroes_at(8192, 4096).unwrap();
    // The write-back sets NEED_CHECK and flushes it; that flush is held.
    gate.armed.store(true, Ordering::SeqCst);
    let flusher = {
        let image = image.clone();
        std::thread::spawn(move || image.flush())
    };
    gate.wait_held();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (image, done) = (image.clone(), done.clone());
        std::thread::spawn(move || {
            // The first allocation of the dirty period.
            image.write_at(&[2; 4096], 65536).unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // Until NEED_CHECK is durable, no cluster may be handed out.
    assert!(
        !done.load(Ordering::SeqCst),
        "an allocation went ahead while NEED_CHECK was not yet flushed"
    );
    gate.release();
    flusher.join().unwrap().unwrap();
    writer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    Arc::try_unwrap(image).unwrap().close().unwrap();
}

#[test]
fn a_discard_leaves_no_leak_and_block_status_sees_the_hole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("discard.qed");
    Image::create(&path, &params(16 << 20, 65536, 4, None, false)).unwrap();
    let image = open_rw(&path);
    image.write_at(&vec![1; 8 << 20], 0).unwrap();
    image.discard(1 << 20, 4 << 20).unwrap();
    image.write_zeroes_at(6 << 20, 1 << 20).unwrap();
    let mut buf = vec![9u8; 8 << 20];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf[..1 << 20].iter().all(|&b| b == 1));
    assert!(buf[1 << 20..5 << 20].iter().all(|&b| b == 0));
    assert!(buf[5 << 20..6 << 20].iter().all(|&b| b == 1));
    assert!(buf[6 << 20..7 << 20].iter().all(|&b| b == 0));
    // The entries stay: the plain extents see data throughout.
    let plain: Vec<_> = image.extents(0, 8 << 20).map(|e| e.unwrap()).collect();
    assert!(
        plain
            .iter()
            .all(|e| matches!(e.kind, ExtentKind::Data { .. })),
        "{plain:?}"
    );
    if kit::file_system_reports_holes(dir.path()) {
        // The punched range shows as zeros to block status.
        let zero: u64 = image
            .extents_with_holes(0, 8 << 20)
            .map(|e| e.unwrap())
            .filter(|e| e.kind == ExtentKind::Zero)
            .map(|e| e.length)
            .sum();
        assert_eq!(zero, 4 << 20, "the discarded 4 MiB read as a hole");
    } else {
        eprintln!("note: the file system reports no holes; block status part skipped");
    }
    let report = image.check(Repair::None).unwrap();
    assert!(report.is_clean(), "{report:?}");
    image.close().unwrap();
    kit::assert_qemu_img_check(&path);
}

//! Hostile images (`tests/data/hostile/`, made by `make.py`): every open, read, extent walk,
//! check and repair ends in the typed result the README lists — never a panic, a hang or an
//! allocation out of proportion to the file.

mod kit;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use kit::{panic_message, qemu_check, require_tool, run, scratch_copy, HOSTILE_DIR};
use qed_image::{BackingPolicy, CheckReport, Error, Image, OpenOptions, Repair};

/// Reads at most this many clusters one by one (then only the edges of each extent).
const MAX_CLUSTER_READS: u64 = 4096;

/// A short, stable name of an error's kind: the variant, and for nested errors the cause.
fn kind(e: &Error) -> String {
    fn variant(debug: String) -> String {
        debug
            .split(|c: char| !c.is_alphanumeric() && c != '_')
            .next()
            .unwrap_or_default()
            .to_string()
    }
    match e {
        Error::Format(f) => format!("Format::{}", variant(format!("{f:?}"))),
        Error::Corrupt { table, .. } => format!("Corrupt::{table}"),
        Error::Backing { cause, .. } => format!("Backing({})", kind(cause)),
        Error::Io { source, .. } => format!("Io::{:?}", source.kind()),
        other => variant(format!("{other:?}")),
    }
}

/// What the engine did with one image, in one mode.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    /// `ok` or the error kind of the open.
    open: String,
    /// Corruptions fixed and leaks reclaimed by the repair a writable open ran (NEED_CHECK).
    open_repair: Option<(u64, u64)>,
    /// Kinds of the read errors (sorted, deduplicated); empty when every read succeeded.
    read_errors: Vec<String>,
    /// Error kind that ended the extent walk, if any.
    extents_error: Option<String>,
    /// corruptions, leaks, check_errors of check(None).
    check: Option<(u64, u64, u64)>,
    /// corruptions_fixed, leaks_fixed, and whether the image was clean afterwards, of
    /// check(All); `Err` holds the error kind.
    repair: Option<Result<(u64, u64, bool), String>>,
}

/// One row of the README: the file, how to prepare it, and the expected outcomes.
struct Case {
    file: &'static str,
    /// Extend the copy (sparse) to this length before opening.
    extend_to: Option<u64>,
    /// Open result read-only, read-write (`"ok"` or an error kind).
    open_ro: &'static str,
    open_rw: &'static str,
    /// Kind of the read errors of the read-only open ("" = all reads succeed).
    read_errors: &'static str,
    /// (corruptions, leaks) of check(None) on the read-only open.
    check: Option<(u64, u64)>,
    /// corruptions fixed (by the open's repair for dirty images, else by check(All)), and
    /// leaks reclaimed.
    repaired: Option<(u64, u64)>,
    /// Backing files are not followed (the image is inspected alone).
    ignore_backing: bool,
    /// Two L1 entries share a table: a writable open repairs even with NEED_CHECK clear.
    shares_tables: bool,
}

const fn case(file: &'static str) -> Case {
    Case {
        file,
        extend_to: None,
        open_ro: "ok",
        open_rw: "ok",
        read_errors: "",
        check: Some((0, 0)),
        repaired: Some((0, 0)),
        ignore_backing: false,
        shares_tables: false,
    }
}

impl Case {
    const fn fails(mut self, kind: &'static str) -> Self {
        self.open_ro = kind;
        self.open_rw = kind;
        self.check = None;
        self.repaired = None;
        self
    }
    const fn corrupt(mut self, reads: &'static str, corruptions: u64, leaks: u64) -> Self {
        self.read_errors = reads;
        self.check = Some((corruptions, leaks));
        self
    }
    const fn repaired(mut self, fixed: u64, leaks: u64) -> Self {
        self.repaired = Some((fixed, leaks));
        self
    }
    const fn extend(mut self, len: u64) -> Self {
        self.extend_to = Some(len);
        self
    }
    const fn shares_tables(mut self) -> Self {
        self.shares_tables = true;
        self
    }
    const fn ignore_backing(mut self) -> Self {
        self.ignore_backing = true;
        self
    }
}

fn cases() -> Vec<Case> {
    const L1: &str = "Corrupt::L1";
    const L2: &str = "Corrupt::L2";
    let mut v = vec![
        case("valid.qed"),
        // L1 entries pointing where they must not.
        case("l1-to-header.qed").corrupt(L1, 1, 0).repaired(1, 0),
        case("l1-to-l1.qed").corrupt("", 2, 0).repaired(4, 0),
        case("l1-duplicate.qed")
            .corrupt("", 2, 0)
            .repaired(5, 0)
            .shares_tables(),
        case("l1-duplicate-past-eof.qed")
            .corrupt(L2, 3, 0)
            .repaired(7, 0)
            .shares_tables(),
        // Shared tables of L1 entries past the end of the disk are cleared, not copied.
        case("l1-duplicate-many.qed")
            .corrupt("", 6, 0)
            .repaired(9, 0)
            .shares_tables(),
        case("l1-l2-cycle.qed").corrupt(L2, 4, 0).repaired(1028, 0),
        case("l1-past-eof.qed").corrupt(L1, 2, 0).repaired(2, 0),
        case("l1-entry-one.qed").corrupt(L1, 1, 0).repaired(1, 0),
        case("l1-unaligned.qed").corrupt(L1, 1, 0).repaired(1, 0),
        case("l1-near-u64-max.qed").corrupt(L1, 3, 0).repaired(3, 0),
        // Only the aliases inside the virtual disk get copies: the repair finishes.
        case("l1-l2-duplicate-all.qed")
            .corrupt("", 3069, 0)
            .repaired(4093, 0)
            .shares_tables(),
        // L2 entries pointing where they must not.
        case("l2-to-l2.qed").corrupt("", 2, 0).repaired(2, 0),
        case("l2-to-header.qed").corrupt(L2, 1, 0).repaired(1, 0),
        case("l2-to-l1.qed").corrupt("", 1, 0).repaired(1, 0),
        case("l2-past-eof.qed").corrupt(L2, 2, 0).repaired(2, 0),
        case("l2-unaligned.qed").corrupt(L2, 3, 0).repaired(3, 0),
        case("l2-near-u64-max.qed").corrupt(L2, 3, 0).repaired(3, 0),
        case("l2-duplicate.qed").corrupt("", 2, 0).repaired(2, 0),
        case("l2-duplicate-full.qed")
            .corrupt("", 1024, 0)
            .repaired(1024, 0),
        // The L1 table and the header fields.
        case("l1-table-truncated.qed").fails("Format::TableOffset"),
        case("l1-table-near-u64-max.qed").fails("Format::TableOffset"),
        case("cluster-64m-ts16.qed").fails("Format::TableOffset"),
        case("cluster-64m-ts16-sparse.qed")
            .extend(17 << 26)
            .fails("TooLarge"),
        case("cluster-size-huge.qed").fails("Format::ClusterSize"),
        case("cluster-size-zero.qed").fails("Format::ClusterSize"),
        case("table-size-zero.qed").fails("Format::TableSize"),
        case("table-size-32.qed").fails("Format::TableSize"),
        case("image-size-all-ones.qed").fails("Format::ImageSizeUnaligned"),
        case("image-size-near-max.qed").fails("Format::ImageSizeTooLarge"),
        case("image-size-geometry-max.qed"),
        case("header-size-huge.qed").fails("Format::HeaderSizeTooLarge"),
        case("header-size-65536.qed").fails("Format::TableOffset"),
        case("header-size-zero.qed").fails("Format::HeaderSizeZero"),
        case("unknown-feature-bits.qed").fails("Format::UnknownFeatures"),
        case("short-header.qed").fails("Format::TableOffset"),
        case("empty.qed").fails("Format::BadMagic"),
        // Backing file names and chains.
        case("backing-name-outside-header.qed").fails("Format::BackingNameOutsideHeader"),
        case("backing-name-u32-max.qed").fails("Format::BackingNameOutsideHeader"),
        // The stored size covers NUL padding; the name ends at the first NUL.
        case("backing-name-whole-cluster.qed"),
        // The name ends at its NUL, as QEMU reads it: the backing file is valid.qed.
        case("backing-name-nul.qed"),
        case("backing-name-not-utf8.qed").fails("Backing(Io::NotFound)"),
        case("backing-raw-missing.qed").fails("Backing(Io::NotFound)"),
        case("backing-loop-self.qed").fails("BackingLoop"),
        case("backing-loop-a.qed").fails("BackingLoop"),
        case("backing-loop-b.qed").fails("BackingLoop"),
    ];
    // The same image opened without following its backing file: clean.
    let alone: Vec<Case> = v
        .iter()
        .filter(|c| c.open_ro.starts_with("Backing") || c.open_ro == "Chain")
        .map(|c| case(c.file).ignore_backing())
        .collect();
    v.extend(alone);
    v
}

/// Files with NEED_CHECK set on top of a table corruption: read-only they behave like the
/// clean-flagged file; a writable open repairs what check(All) would, and is clean after.
const DIRTY_PREFIX: &str = "dirty-";

fn options(writable: bool, case: &Case) -> OpenOptions {
    OpenOptions {
        writable,
        backing: if case.ignore_backing {
            BackingPolicy::Ignore
        } else {
            BackingPolicy::Follow
        },
        clean_after: Duration::from_secs(3600),
        ..OpenOptions::default()
    }
}

fn read_everything(image: &Image, out: &mut Outcome) {
    let cs = image.cluster_size();
    let size = image.size();
    let mut buf = vec![0u8; cs as usize];
    let mut read = |pos: u64, out: &mut Outcome| {
        let len = cs.min(size - pos) as usize;
        if let Err(e) = image.read_at(&mut buf[..len], pos) {
            out.read_errors.push(kind(&e));
        }
    };
    let clusters = size.div_ceil(cs);
    for c in 0..clusters.min(MAX_CLUSTER_READS) {
        read(c * cs, out);
    }
    let mut extents = 0u64;
    for extent in image.extents(0, size) {
        match extent {
            Ok(e) => {
                extents += 1;
                assert!(e.length > 0 && e.offset + e.length <= size, "{e:?}");
                read(e.offset - e.offset % cs, out);
                read((e.offset + e.length - 1) / cs * cs, out);
            }
            Err(e) => {
                out.extents_error = Some(kind(&e));
                break;
            }
        }
        assert!(extents <= 1 << 20, "extent walk does not end");
    }
    out.read_errors.sort();
    out.read_errors.dedup();
}

fn summary(r: &CheckReport) -> (u64, u64, u64) {
    (r.corruptions, r.leaks, r.check_errors)
}

/// Opens `path` read-only or read-write and does everything to it.
fn exercise(path: &Path, writable: bool, case: &Case) -> Outcome {
    let mut out = Outcome::default();
    let image = match Image::open(path, &options(writable, case)) {
        Ok(image) => image,
        Err(e) => {
            out.open = kind(&e);
            return out;
        }
    };
    out.open = "ok".into();
    out.open_repair = image
        .open_repair()
        .map(|r| (r.corruptions_fixed, r.leaks_fixed));
    read_everything(&image, &mut out);
    let first = image.check(Repair::None).map(|r| summary(&r));
    out.check = Some(first.unwrap_or_else(|e| panic!("check failed: {e}")));
    if writable {
        let repair = image.check(Repair::All);
        let repair = match repair {
            Ok(r) => {
                let again = image.check(Repair::None).expect("check after repair");
                if r.is_clean() {
                    assert!(
                        again.is_clean(),
                        "repair reported a clean image, the next check did not: {again:?}"
                    );
                }
                assert_eq!(again.corruptions, r.corruptions, "{again:?} after {r:?}");
                // Everything reads after a clean repair.
                let mut after = Outcome::default();
                read_everything(&image, &mut after);
                if again.is_clean() {
                    assert_eq!(after.read_errors, Vec::<String>::new());
                    assert_eq!(after.extents_error, None);
                }
                Ok((r.corruptions_fixed, r.leaks_fixed, again.is_clean()))
            }
            Err(e) => Err(kind(&e)),
        };
        out.repair = Some(repair);
        image.close().expect("close");
    }
    out
}

fn prepare(dir: &Path, file: &str, case: &Case) -> PathBuf {
    let path = dir.join(file);
    if let Some(len) = case.extend_to {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open for extend");
        f.set_len(len).expect("sparse extend");
    }
    path
}

fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => panic!("{what}: panicked: {}", panic_message(p)),
    }
}

/// Whether the image names a backing file (QEMU would try to open it).
fn names_backing_file(path: &Path) -> bool {
    let bytes = std::fs::read(path).expect("read image");
    bytes.len() >= 64 && bytes[16] & 1 != 0 && bytes[60..64] != [0, 0, 0, 0]
}

/// `qemu-img check` of a repaired image: no corruption left (exit 0, or 3 for leaks only).
fn qemu_agrees(path: &Path, what: &str) {
    let report = qemu_check(path);
    assert!(
        matches!(report.status, Some(0 | 3)),
        "{what}: qemu-img check of the repaired image: {report:?}"
    );
}

fn expected_ro(case: &Case) -> Outcome {
    let opened = case.open_ro == "ok";
    Outcome {
        open: case.open_ro.into(),
        read_errors: if case.read_errors.is_empty() {
            vec![]
        } else {
            vec![case.read_errors.into()]
        },
        extents_error: (!case.read_errors.is_empty()).then(|| case.read_errors.into()),
        check: opened
            .then_some(case.check)
            .flatten()
            .map(|(c, l)| (c, l, 0)),
        ..Outcome::default()
    }
}

fn expected_rw(case: &Case, dirty: bool) -> Outcome {
    let mut out = expected_ro(case);
    out.open = case.open_rw.into();
    if out.open != "ok" {
        return out;
    }
    if dirty || case.shares_tables {
        // Repaired at open: nothing left to find.
        out.open_repair = case.repaired;
        out.read_errors.clear();
        out.extents_error = None;
        out.check = Some((0, 0, 0));
        out.repair = Some(Ok((0, 0, true)));
    } else {
        out.repair = Some(match case.repaired {
            Some((fixed, leaks)) => Ok((fixed, leaks, true)),
            None => Err("TooLarge".into()),
        });
    }
    out
}

/// The whole run may take this long; past it, something hangs.
const DEADLINE: Duration = Duration::from_secs(20);

#[test]
fn every_hostile_image_gives_its_expected_result() {
    // A watchdog thread turns a hang into a failure.
    let (done, finished) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        run_every_case();
        let _ = done.send(());
    });
    match finished.recv_timeout(DEADLINE) {
        Ok(()) => worker.join().expect("worker"),
        Err(RecvTimeoutError::Disconnected) => {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(RecvTimeoutError::Timeout) => panic!("hostile images still running after {DEADLINE:?}"),
    }
}

fn run_every_case() {
    let started = Instant::now();
    let qemu = require_tool("qemu-img");
    let files: Vec<String> = kit::files_with_extension(Path::new(HOSTILE_DIR), "qed")
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    let cases = cases();
    let mut runs: Vec<(String, &Case, bool)> = Vec::new();
    for file in &files {
        let base = file.strip_prefix(DIRTY_PREFIX).unwrap_or(file);
        let dirty = base != file;
        let listed: Vec<&Case> = cases.iter().filter(|c| c.file == base).collect();
        assert!(!listed.is_empty(), "{file} has no expected result");
        for case in listed {
            runs.push((file.clone(), case, dirty));
        }
    }
    let mut qemu_checked = 0;
    for (file, case, dirty) in runs {
        let what = format!(
            "{file}{}",
            if case.ignore_backing {
                " (backing ignored)"
            } else {
                ""
            }
        );
        // Backing names are relative: copy every image.
        let dir = scratch_copy(Path::new(HOSTILE_DIR), &["qed"]);
        let path = prepare(dir.path(), &file, case);
        let ro = guarded(&format!("{what} read-only"), || {
            exercise(&path, false, case)
        });
        assert_eq!(ro, expected_ro(case), "{what}, read-only");
        let rw = guarded(&format!("{what} read-write"), || {
            exercise(&path, true, case)
        });
        assert_eq!(rw, expected_rw(case, dirty), "{what}, read-write");
        let repaired = matches!(rw.repair, Some(Ok((_, _, true))));
        if qemu && repaired && !names_backing_file(&path) {
            qemu_agrees(&path, &what);
            qemu_checked += 1;
        }
    }
    eprintln!("qemu-img check agreed on {qemu_checked} repaired images");
    if qemu {
        assert!(
            qemu_checked >= 30,
            "only {qemu_checked} images checked by qemu-img"
        );
    }
    assert!(
        started.elapsed() < DEADLINE,
        "hostile images took {:?}",
        started.elapsed()
    );
}

#[test]
fn aliases_past_the_end_of_the_disk_are_cleared_not_copied() {
    use qed_image::storage::MemoryStorage;
    use std::sync::Arc;
    // Every L1 entry shares one L2 table whose every entry shares one data cluster: giving
    // each reference its own copy would write 4 GiB. Only the references inside the virtual
    // disk get copies; the rest are cleared.
    let bytes =
        std::fs::read(Path::new(HOSTILE_DIR).join("l1-l2-duplicate-all.qed")).expect("read");
    let len = bytes.len() as u64;
    let storage = Arc::new(MemoryStorage::from_bytes(bytes));
    let image = Image::open_storage(Box::new(storage.clone()), &OpenOptions::read_write(), None)
        .expect("open");
    let size = image.size();
    let report = image.check(Repair::All).expect("repair");
    assert_eq!(report.corruptions, 0, "{report:?}");
    let again = image.check(Repair::None).expect("check");
    assert!(again.is_clean(), "{again:?}");
    image.close().expect("close");
    let grown = storage.to_bytes().len() as u64;
    // At most one copy per cluster of the virtual disk, plus its tables.
    assert!(grown <= len + size + (1 << 20), "file grew to {grown}");
}

#[test]
fn a_repair_that_would_grow_too_far_changes_nothing() {
    use qed_image::storage::MemoryStorage;
    use std::sync::Arc;
    // 64 KiB clusters: one table maps 2 GiB; all 32768 entries alias one cluster, so copies
    // for each would write 2 GiB, past the bound (64 MiB for a small file).
    let storage = Arc::new(MemoryStorage::new());
    Image::create_on(
        &*storage,
        &qed_image::CreateParams {
            image_size: 2 << 30,
            cluster_size: 65536,
            table_size: 4,
            backing_file: None,
            backing_raw: false,
        },
    )
    .expect("create");
    let image = Image::open_storage(Box::new(storage.clone()), &OpenOptions::read_write(), None)
        .expect("open");
    image.write_at(&[7; 65536], 0).expect("write");
    image.close().expect("close");
    let mut bytes = storage.to_bytes();
    let l2 = u64::from_le_bytes(bytes[65536..65544].try_into().unwrap()) as usize;
    let data = bytes[l2..l2 + 8].to_vec();
    for entry in 1..32768 {
        bytes[l2 + entry * 8..l2 + entry * 8 + 8].copy_from_slice(&data);
    }
    let storage = Arc::new(MemoryStorage::from_bytes(bytes.clone()));
    let image = Image::open_storage(Box::new(storage.clone()), &OpenOptions::read_write(), None)
        .expect("open");
    let err = image.check(Repair::All).expect_err("repair must refuse");
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    image.close().expect("close");
    assert!(
        storage.to_bytes() == bytes,
        "the refused repair changed the file"
    );
}

#[test]
fn committed_images_match_the_generator() {
    if !require_tool("python3") {
        return;
    }
    let out = tempfile::tempdir().expect("tempdir");
    run(
        "python3",
        [
            std::ffi::OsStr::new(&format!("{HOSTILE_DIR}/make.py")),
            out.path().as_os_str(),
        ],
    )
    .expect_status(0, "make.py");
    let mut made = 0;
    for entry in std::fs::read_dir(out.path()).expect("out dir") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        let committed = std::fs::read(Path::new(HOSTILE_DIR).join(&name))
            .unwrap_or_else(|e| panic!("{name:?} is not committed: {e}"));
        assert!(
            committed == std::fs::read(entry.path()).expect("read"),
            "{name:?} differs from what make.py writes"
        );
        made += 1;
    }
    let committed = kit::files_with_extension(Path::new(HOSTILE_DIR), "qed").len();
    assert_eq!(
        made, committed,
        "images in the directory that make.py does not write"
    );
}

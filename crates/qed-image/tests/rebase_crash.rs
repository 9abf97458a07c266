//! Crash tests of `ops::rebase`: every power-loss state of a safe rebase (onto another file,
//! and onto none) opens into a consistent image that names the old backing file or the new
//! one and reads, through the one it names, exactly what the guest read before; every state
//! of an unsafe rebase names one of the two and keeps the image's own data.

mod kit;

use std::sync::Arc;

use kit::*;
use qed_image::ops::{self, RebaseOptions};
use qed_image::storage::{CrashOptions, CrashStorage, MemoryStorage};
use qed_image::{BackingFormat, BackingLayer, Header, Image, NewBacking, OpenOptions, Repair};

/// The geometries under test: QEMU's smallest tables, more clusters per table, big clusters.
const GEOMETRIES: [(u32, u32); 3] = [(4096, 1), (4096, 4), (65536, 4)];

const OLD_NAME: &[u8] = b"old.qed";
const NEW_NAME: &[u8] = b"new.raw";

fn options() -> CrashOptions {
    CrashOptions {
        exhaustive_limit: 8,
        ..CrashOptions::default()
    }
}

/// The files of one case: the old backing file (QED), the new one (raw) and the image.
struct Files {
    cluster: u64,
    old: Arc<MemoryStorage>,
    new: Arc<MemoryStorage>,
    image: Vec<u8>,
}

impl Files {
    /// The old backing file (20 clusters) holds data and a zero cluster; the new one (22
    /// clusters) differs from it in some clusters and agrees in others; the image (24
    /// clusters and 3 sectors, over the old one) holds data of its own and a zero cluster.
    fn new(cs: u32, ts: u32) -> Self {
        let c = u64::from(cs);
        let coverage = qed_image::Geometry::new(cs, ts).unwrap().l2_coverage();
        let far = (coverage <= 8 << 20).then_some(coverage + 2 * c);
        let old_size = far.map_or(20 * c, |far| far + 4 * c);
        let old = create_memory(&params(old_size, cs, ts, None, false));
        {
            let image = open_shared(&old, &rw_options(), None);
            image.write_at(&pattern(1, 0, 4 * c as usize), c).unwrap();
            image.write_zeroes_at(6 * c, c).unwrap();
            image
                .write_at(&pattern(2, 0, 3 * c as usize / 2), 8 * c)
                .unwrap();
            image.write_at(&pattern(4, 0, 100), 15 * c + 7).unwrap();
            if let Some(far) = far {
                image.write_at(&pattern(7, 0, 2 * c as usize), far).unwrap();
            }
            image.close().unwrap();
        }
        let old_view = read_all(&open_shared(&old, &OpenOptions::read_only(), None));
        let mut new_bytes = vec![0u8; 22 * c as usize];
        new_bytes[2 * c as usize..4 * c as usize].copy_from_slice(&pattern(3, 0, 2 * c as usize));
        // Clusters 8 and 9 read the same in both.
        let same = 8 * c as usize..10 * c as usize;
        new_bytes[same.clone()].copy_from_slice(&old_view[same]);
        // Past the old file's end (without small tables): data only the new one has.
        new_bytes[20 * c as usize + 5..21 * c as usize].fill(0x5a);
        let new = Arc::new(MemoryStorage::from_bytes(new_bytes));
        let name = std::str::from_utf8(OLD_NAME).unwrap();
        let size = old_size.max(22 * c) + 2 * c + 1536;
        let image = create_memory(&params(size, cs, ts, Some(name), false));
        {
            let image = open_shared(&image, &rw_options(), Some(layer_old(&old)));
            image.write_at(&pattern(5, 0, c as usize), 0).unwrap();
            image.write_at(&pattern(6, 0, 10), 3 * c + 5).unwrap();
            image.write_zeroes_at(12 * c, c).unwrap();
            image.close().unwrap();
        }
        Self {
            cluster: c,
            old,
            new,
            image: image.to_bytes(),
        }
    }

    fn layer(&self, name: Option<&[u8]>) -> Option<BackingLayer> {
        match name {
            None => None,
            Some(OLD_NAME) => Some(layer_old(&self.old)),
            Some(NEW_NAME) => Some(BackingLayer::raw(Box::new(self.new.clone())).unwrap()),
            Some(other) => panic!("unknown backing file {other:?}"),
        }
    }
}

fn layer_old(old: &Arc<MemoryStorage>) -> BackingLayer {
    BackingLayer::Qed(Box::new(open_shared(old, &OpenOptions::read_only(), None)))
}

/// The backing file name the header in `bytes` gives, after checking the header is valid.
fn named(bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let header = Header::decode(bytes).map_err(|e| format!("header: {e}"))?;
    let valid = header
        .validate(bytes.len() as u64)
        .map_err(|e| format!("header: {e}"))?;
    Ok(valid
        .backing_name_range()
        .map(|(offset, len)| bytes[offset as usize..offset as usize + len].to_vec()))
}

/// Opens the image in `bytes` read-write (repairing it when NEED_CHECK says so) over the
/// backing file its header names (or none with `follow` false), and checks it is clean.
fn open_state(
    files: &Files,
    bytes: Vec<u8>,
    follow: bool,
) -> Result<(Image, Option<Vec<u8>>), String> {
    let name = named(&bytes)?;
    let layer = if follow {
        files.layer(name.as_deref())
    } else {
        None
    };
    let storage = Arc::new(MemoryStorage::from_bytes(bytes));
    let image = Image::open_storage(Box::new(storage.clone()), &rw_options(), layer)
        .map_err(|e| format!("read-write open: {e}"))?;
    let report = image
        .check(Repair::None)
        .map_err(|e| format!("check: {e}"))?;
    if !report.is_clean() {
        return Err(format!(
            "after the open: {} corruptions, {} leaks, {} check errors: {:?}",
            report.corruptions, report.leaks, report.check_errors, report.findings
        ));
    }
    Ok((image, name))
}

fn first_difference(got: &[u8], want: &[u8]) -> Option<String> {
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    Some(format!(
        "guest {i:#x} reads {:#04x}, not {:#04x}",
        got[i], want[i]
    ))
}

/// Every crash state of a safe rebase onto `target` (the new raw file, or none).
fn safe_rebase_crash(cs: u32, ts: u32, target: Option<&[u8]>) -> u64 {
    let files = Files::new(cs, ts);
    let crash = Arc::new(CrashStorage::new(files.image.clone()));
    let image = Image::open_storage(
        Box::new(crash.clone()),
        &rw_options(),
        files.layer(Some(OLD_NAME)),
    )
    .unwrap();
    let expected = read_all(&image);
    let new = target.map(|name| NewBacking {
        name: name.to_vec(),
        format: Some(BackingFormat::Raw),
        layer: files.layer(Some(name)),
    });
    let stats = ops::rebase(&image, new, &RebaseOptions { safe: true }, &mut |_, _| {}).unwrap();
    assert!(stats.copied > 0, "{stats:?}");
    assert_eq!(
        read_all(&image),
        expected,
        "the guest view changed in the running process"
    );
    image.close().unwrap();
    // Clusters 8 and 9 read the same in both files: they were not copied.
    let (done, _) = open_state(&files, crash.contents(), true).unwrap();
    assert_eq!(done.info().backing_name.as_deref(), target);
    let c = files.cluster;
    if target.is_some() {
        let copied: Vec<_> = done.extents(8 * c, 2 * c).map(Result::unwrap).collect();
        assert!(
            copied
                .iter()
                .all(|e| e.kind == qed_image::ExtentKind::Unallocated),
            "{copied:?}"
        );
    }
    drop(done);
    let what = format!("safe rebase {cs}/{ts}");
    explore_rebase(&what, &files, &crash, target, true, &expected)
}

/// Cuts the rebase `crash` recorded at every instant: each state must name the old backing
/// file or `target`, and read `expected` (through the backing chain when `follow`, else the
/// image's own data).
fn explore_rebase(
    what: &str,
    files: &Files,
    crash: &Arc<CrashStorage>,
    target: Option<&[u8]>,
    follow: bool,
    expected: &[u8],
) -> u64 {
    let what = format!("{what} onto {:?}", target.map(String::from_utf8_lossy));
    explore_joint(
        &what,
        &Timeline::single(crash.op_count()),
        std::slice::from_ref(crash),
        &options(),
        |disks| {
            let (image, name) = open_state(files, disks[0].clone(), follow)?;
            if name.as_deref() != Some(OLD_NAME) && name.as_deref() != target {
                return Err(format!("the header names {name:?}"));
            }
            if let Some(diff) = first_difference(&read_all(&image), expected) {
                return Err(format!("naming {name:?}: {diff}"));
            }
            image.close().map_err(|e| format!("close: {e}"))
        },
    )
}

#[test]
fn safe_rebase_onto_another_file() {
    for (cs, ts) in GEOMETRIES {
        safe_rebase_crash(cs, ts, Some(NEW_NAME));
    }
}

#[test]
fn safe_rebase_onto_no_backing_file() {
    for (cs, ts) in GEOMETRIES {
        safe_rebase_crash(cs, ts, None);
    }
}

#[test]
fn unsafe_rebase_changes_only_the_header() {
    for (cs, ts) in GEOMETRIES {
        let files = Files::new(cs, ts);
        for target in [Some(NEW_NAME), None] {
            let crash = Arc::new(CrashStorage::new(files.image.clone()));
            let image = Image::open_storage(Box::new(crash.clone()), &rw_options(), None).unwrap();
            // Opened without its backing file, as `rebase -u` opens it: the image's own view.
            let own = read_all(&image);
            let new = target.map(|name| NewBacking {
                name: name.to_vec(),
                format: Some(BackingFormat::Raw),
                layer: None,
            });
            let stats =
                ops::rebase(&image, new, &RebaseOptions { safe: false }, &mut |_, _| {}).unwrap();
            assert_eq!(stats, ops::RebaseStats::default());
            image.close().unwrap();
            assert_eq!(named(&crash.contents()).unwrap().as_deref(), target);
            let what = format!("unsafe rebase {cs}/{ts}");
            explore_rebase(&what, &files, &crash, target, false, &own);
        }
    }
}

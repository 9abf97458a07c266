//! Crash tests of `ops::commit`: a power loss at any instant — of the overlay, of the backing
//! file written into, or of both, as they were at that instant — leaves an overlay that opens
//! (repaired when NEED_CHECK says so) and reads, through the backing file as the crash left
//! it, exactly what its guest read before; and a backing file that opens and reads, sector
//! by sector, its old contents or the committed ones. In particular the overlay is never
//! emptied before the backing file's new data is durable.

mod kit;

use std::sync::Arc;

use kit::*;
use qed_image::ops::{self, CommitOptions, Disk, RawDisk};
use qed_image::storage::{CrashOptions, CrashStorage, MemoryStorage};
use qed_image::{BackingLayer, ExtentKind, Header, Image, OpenOptions, Repair};

fn options() -> CrashOptions {
    CrashOptions {
        exhaustive_limit: 8,
        ..CrashOptions::default()
    }
}

/// The format of the backing file committed into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    /// A QED image of this geometry.
    Qed(u32, u32),
    /// A raw file.
    Raw,
}

/// The setup: the backing file (10 overlay clusters, all data), the overlay over it (24
/// clusters and 3 sectors), with data, a zero cluster over the backing data, a partial write
/// and data past the backing file's end.
struct Setup {
    base: Base,
    base_bytes: Vec<u8>,
    top_bytes: Vec<u8>,
    base_size: u64,
    /// What the overlay's guest reads.
    view: Vec<u8>,
    /// What the backing file read before.
    base_view: Vec<u8>,
}

fn base_layer(base: Base, storage: Arc<MemoryStorage>) -> BackingLayer {
    match base {
        Base::Raw => BackingLayer::raw(Box::new(storage)).unwrap(),
        Base::Qed(..) => BackingLayer::Qed(Box::new(open_shared(
            &storage,
            &OpenOptions::read_only(),
            None,
        ))),
    }
}

impl Setup {
    fn new(top_cs: u32, top_ts: u32, base: Base) -> Self {
        let c = u64::from(top_cs);
        let base_size = 10 * c;
        let base_storage = match base {
            Base::Raw => Arc::new(MemoryStorage::from_bytes(pattern(2, 0, base_size as usize))),
            Base::Qed(cs, ts) => {
                let storage = create_memory(&params(base_size, cs, ts, None, false));
                let image = open_shared(&storage, &rw_options(), None);
                image
                    .write_at(&pattern(2, 0, base_size as usize), 0)
                    .unwrap();
                image.close().unwrap();
                storage
            }
        };
        let base_bytes = base_storage.to_bytes();
        let base_view = match base {
            Base::Raw => base_bytes.clone(),
            Base::Qed(..) => read_all(&open_shared(&base_storage, &OpenOptions::read_only(), None)),
        };
        let name = if base == Base::Raw {
            "base.raw"
        } else {
            "base.qed"
        };
        let size = 24 * c + 1536;
        let top = create_memory(&params(size, top_cs, top_ts, Some(name), base == Base::Raw));
        let layer = || {
            base_layer(
                base,
                Arc::new(MemoryStorage::from_bytes(base_bytes.clone())),
            )
        };
        {
            let image = open_shared(&top, &rw_options(), Some(layer()));
            image.write_at(&pattern(1, 0, c as usize), 0).unwrap();
            image.write_at(&pattern(3, 0, 10), 3 * c + 5).unwrap();
            image.write_zeroes_at(5 * c, c).unwrap();
            image
                .write_at(&pattern(4, 0, 2 * c as usize), 12 * c)
                .unwrap();
            image.write_zeroes_at(16 * c, c).unwrap();
            image.write_at(&pattern(5, 0, 700), size - 700).unwrap();
            image.close().unwrap();
        }
        let top_bytes = top.to_bytes();
        let view = read_all(&open_shared(&top, &OpenOptions::read_only(), Some(layer())));
        Self {
            base,
            base_bytes,
            top_bytes,
            base_size,
            view,
            base_view,
        }
    }

    fn base_disk(&self, storage: Box<dyn qed_image::Storage>) -> Disk {
        match self.base {
            Base::Raw => Disk::Raw(RawDisk::new(storage, true).unwrap()),
            Base::Qed(..) => Disk::Qed(Image::open_storage(storage, &rw_options(), None).unwrap()),
        }
    }

    /// Opens the backing file a crash left in `bytes` (repairing a QED one), checks that it is
    /// consistent and that each sector reads its old or its committed contents, and returns
    /// it as a backing layer.
    fn check_base(&self, bytes: Vec<u8>) -> Result<BackingLayer, String> {
        let storage = Arc::new(MemoryStorage::from_bytes(bytes));
        let view = match self.base {
            Base::Raw => storage.to_bytes(),
            Base::Qed(..) => {
                let image = Image::open_storage(Box::new(storage.clone()), &rw_options(), None)
                    .map_err(|e| format!("backing file: read-write open: {e}"))?;
                let report = image
                    .check(Repair::None)
                    .map_err(|e| format!("backing file: check: {e}"))?;
                if !report.is_clean() {
                    return Err(format!("backing file: {:?}", report.findings));
                }
                let view = read_all(&image);
                image
                    .close()
                    .map_err(|e| format!("backing file: close: {e}"))?;
                view
            }
        };
        let new_size = self.view.len() as u64;
        let len = view.len() as u64;
        // A QED image has the old size or the new one; a raw file may also have been extended
        // by a write that landed without the length change before it.
        let size_ok = match self.base {
            Base::Qed(..) => len == self.base_size || len == new_size,
            Base::Raw => len <= new_size,
        };
        if !size_ok {
            return Err(format!("backing file size {len}: neither old nor new"));
        }
        for (i, sector) in view.chunks(512).enumerate() {
            let at = i * 512;
            let old: Vec<u8> = (at..at + sector.len())
                .map(|j| self.base_view.get(j).copied().unwrap_or(0))
                .collect();
            let new = &self.view[at..at + sector.len()];
            if sector != old.as_slice() && sector != new {
                return Err(format!(
                    "backing file sector at {at:#x} is neither old nor committed"
                ));
            }
        }
        Ok(base_layer(self.base, storage))
    }

    /// Opens the overlay a crash left in `bytes` over `layer` and checks it reads what its
    /// guest read before.
    fn check_top(&self, bytes: Vec<u8>, layer: BackingLayer) -> Result<(), String> {
        let image = Image::open_storage(
            Box::new(MemoryStorage::from_bytes(bytes)),
            &rw_options(),
            Some(layer),
        )
        .map_err(|e| format!("overlay: read-write open: {e}"))?;
        let report = image
            .check(Repair::None)
            .map_err(|e| format!("overlay: check: {e}"))?;
        if !report.is_clean() {
            return Err(format!("overlay: {:?}", report.findings));
        }
        let got = read_all(&image);
        if let Some(i) = got.iter().zip(&self.view).position(|(a, b)| a != b) {
            return Err(format!(
                "overlay: guest {i:#x} reads {:#04x}, not {:#04x}",
                got[i], self.view[i]
            ));
        }
        image.close().map_err(|e| format!("overlay: close: {e}"))
    }
}

/// Every joint crash state of a commit of an overlay into its backing file, emptying it.
fn commit_crash(top_cs: u32, top_ts: u32, base: Base) -> u64 {
    let setup = Setup::new(top_cs, top_ts, base);
    let timeline = Timeline::new();
    let base_crash = Arc::new(CrashStorage::new(setup.base_bytes.clone()));
    let top_crash = Arc::new(CrashStorage::new(setup.top_bytes.clone()));
    let base_disk = setup.base_disk(Box::new(timeline.add(base_crash.clone())));
    let top = Image::open_storage(
        Box::new(timeline.add(top_crash.clone())),
        &rw_options(),
        None,
    )
    .unwrap();
    let stats = ops::commit(
        &[&top],
        base_disk,
        &CommitOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert!(stats.copied > 0 && stats.zeroed > 0, "{stats:?}");
    let all: Vec<_> = top.extents(0, top.size()).map(Result::unwrap).collect();
    assert!(
        all.iter().all(|e| e.kind == ExtentKind::Unallocated),
        "the overlay is not empty: {all:?}"
    );
    top.close().unwrap();
    let header = Header::decode(&top_crash.contents()).unwrap();
    let empty_len = u64::from(header.cluster_size) * (1 + u64::from(header.table_size));
    assert_eq!(
        top_crash.contents().len() as u64,
        empty_len,
        "the overlay's file is not cut"
    );
    // The final state: everything committed.
    let layer = setup.check_base(base_crash.contents()).unwrap();
    setup.check_top(top_crash.contents(), layer).unwrap();

    let what = format!("commit {top_cs}/{top_ts} into {base:?}");
    explore_joint(
        &what,
        &timeline,
        &[base_crash, top_crash],
        &options(),
        |disks| {
            let layer = setup.check_base(disks[0].clone())?;
            setup.check_top(disks[1].clone(), layer)
        },
    )
}

#[test]
fn commit_into_a_qed_backing_file() {
    commit_crash(4096, 1, Base::Qed(4096, 1));
    commit_crash(4096, 4, Base::Qed(65536, 4));
    commit_crash(65536, 4, Base::Qed(4096, 4));
}

#[test]
fn commit_into_a_raw_backing_file() {
    commit_crash(4096, 4, Base::Raw);
    commit_crash(65536, 4, Base::Raw);
}

/// Commit with `-b`: an overlay over a middle layer over the base; the overlay and the middle
/// layer are only read (nothing is emptied), the base is written.
#[test]
fn commit_through_a_middle_layer_keeps_the_overlay() {
    let c = 4096u64;
    let setup = Setup::new(4096, 4, Base::Qed(4096, 4));
    // A middle layer (over the base) with data of its own, under the overlay.
    let mid = create_memory(&params(20 * c, 4096, 4, Some("base.qed"), false));
    let base_layer_now = || {
        base_layer(
            setup.base,
            Arc::new(MemoryStorage::from_bytes(setup.base_bytes.clone())),
        )
    };
    {
        let image = open_shared(&mid, &rw_options(), Some(base_layer_now()));
        image
            .write_at(&pattern(8, 0, 3 * c as usize), 6 * c)
            .unwrap();
        image.write_zeroes_at(2 * c, c).unwrap();
        image.close().unwrap();
    }
    let mid_layer = |base: BackingLayer| {
        BackingLayer::Qed(Box::new(open_shared(
            &mid,
            &OpenOptions::read_only(),
            Some(base),
        )))
    };
    let top = Arc::new(MemoryStorage::from_bytes(setup.top_bytes.clone()));
    let view = read_all(&open_shared(
        &top,
        &OpenOptions::read_only(),
        Some(mid_layer(base_layer_now())),
    ));
    let timeline = Timeline::new();
    let base_crash = Arc::new(CrashStorage::new(setup.base_bytes.clone()));
    let base_disk = setup.base_disk(Box::new(timeline.add(base_crash.clone())));
    let top_image = open_shared(&top, &OpenOptions::read_only(), None);
    let mid_image = open_shared(&mid, &OpenOptions::read_only(), None);
    let options = CommitOptions {
        empty_overlay: false,
    };
    ops::commit(
        &[&top_image, &mid_image],
        base_disk,
        &options,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(top.to_bytes(), setup.top_bytes, "the overlay changed");
    // The base now reads what the overlay read.
    let committed = Setup {
        view: view.clone(),
        ..setup
    };
    explore_joint(
        "commit through a middle layer",
        &timeline,
        &[base_crash],
        &CrashOptions {
            exhaustive_limit: 8,
            ..CrashOptions::default()
        },
        |disks| {
            let layer = committed.check_base(disks[0].clone())?;
            let image = open_shared(&top, &OpenOptions::read_only(), Some(mid_layer(layer)));
            let got = read_all(&image);
            match got.iter().zip(&view).position(|(a, b)| a != b) {
                None => Ok(()),
                Some(i) => Err(format!("overlay: guest {i:#x} differs")),
            }
        },
    );
}

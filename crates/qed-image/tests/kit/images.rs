//! Creating and opening test images, and reading their metadata back: creation parameters,
//! open options, backing layers that can be reopened, and a checked parse of the on-disk
//! layout.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use qed_image::format::{Header, ZERO_CLUSTER_ENTRY};
use qed_image::storage::{MemoryStorage, Storage};
use qed_image::{BackingLayer, CreateParams, ExtentKind, Image, OpenOptions};

use super::files::le_u64;

/// Image creation parameters; `backing` names a backing file, raw if `raw`.
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
        clean_after: Duration::from_secs(24 * 3600),
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
            other => return other.unwrap_or_else(|e| panic!("open {}: {e}", path.display())),
        }
    }
}

/// Opens an image file read-only (see [`open_file`]).
pub fn open_ro(path: &Path) -> Image {
    open_file(path, &OpenOptions::read_only())
}

/// Opens an image file read-write with [`rw_options`] (see [`open_file`]).
pub fn open_rw(path: &Path) -> Image {
    open_file(path, &rw_options())
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

/// The header of an image file.
pub fn header_of(path: &Path) -> Header {
    use std::io::Read;
    let mut bytes = Vec::with_capacity(qed_image::format::HEADER_LEN);
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(qed_image::format::HEADER_LEN as u64)
                .read_to_end(&mut bytes)
        })
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    Header::decode(&bytes).expect("header decodes")
}

/// Whether the header at the start of `bytes` has NEED_CHECK set.
pub fn need_check(bytes: &[u8]) -> bool {
    Header::decode(bytes).expect("header decodes").needs_check()
}

/// Data clusters of `image` itself (not of its backing layers) in guest `[start, end)`: what
/// a discard of those whole clusters leaves leaked in the file.
pub fn data_clusters(image: &Image, start: u64, end: u64) -> u64 {
    if start >= end {
        return 0;
    }
    let cs = image.cluster_size();
    image
        .extents(start, end - start)
        .map(|e| e.expect("extent"))
        .filter(|e| matches!(e.kind, ExtentKind::Data { .. }))
        .map(|e| (e.offset + e.length).div_ceil(cs) - e.offset / cs)
        .sum()
}

/// The metadata of an image file, as parsed from its bytes by [`parse_layout`].
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
        self.assert_whole_clusters_covered(leaked);
    }
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

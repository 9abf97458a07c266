//! The fixture images of `fixtures/README.md` (made by QEMU 10.0.2), opened, read, written and
//! mapped through the engine. Expected values come from the README; where `qemu-img` is
//! installed it is also run on a copy as an oracle.
//!
//! Out of scope here: consistency check and repair (the README's `check` results).

mod kit;

use kit::*;
use qed_image::format::FormatError;
use qed_image::{
    BackingFormat, BackingLayer, ChainExtent, ChainKind, Error, Extent, ExtentKind, Image,
    OpenOptions, TableKind,
};

const ZERO_16M: &str = "080acf35a507ac9849cfcba47dc2ad83e01b75663a516279c8b9d243b719643e";
const ZERO_1M: &str = "30e14955ebf1352266dc2ff8067e68104607e750abb9d3b36582b8af909fcb58";
const ZERO_256K: &str = "8a39d2abd3999ab73c34db2476849cddf303ce389b35826850f9a700589b4a90";
const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Raw sha256 of every fixture whose whole disk can be read (README "raw sha256").
const RAW_SHA256: &[(&str, &str)] = &[
    ("empty-default.qed", ZERO_16M),
    (
        "basic-64k.qed",
        "dd0291e9d0d0b7471504b98167b82ab78739be620c101bcc4c0d103e2266cf4e",
    ),
    (
        "small-4k.qed",
        "6c1ca2a0c387cf8686c38deb6d22e99e5e34a0fa6eb2a023a6fd7b1bf13f92b1",
    ),
    (
        "backing-overlay.qed",
        "0ecc71bcd6d9f51aeb4a759eb71cf1911b248b8a59e1c07f2ca922272b4ee8d7",
    ),
    (
        "chain-base.qed",
        "0d57ce7e6f299b77f1aa75b8b0198aaaa910b6fd2ea09bfc4a5fcc4d2023f5d2",
    ),
    (
        "chain-top.qed",
        "753f436ec7a020434c028184ee6addc6808ab86b7f6e30cb7367b7b6a34b197b",
    ),
    (
        "dirty-needcheck.qed",
        "c6dc0a8e3d9f0d41f24f579351684647b4f4c8ba43f014c4d8e180c44cea3ce8",
    ),
    (
        "leak.qed",
        "d7b19910d753b2e244b659722d04b9f33d52c3e196539e010820857a680f5efc",
    ),
    (
        "dup-ref.qed",
        "ebb7d759f14dc5e64ad2533aadaae49062d6b143a003e83e9e2e01f780594f65",
    ),
    ("unknown-compat-autoclear.qed", ZERO_1M),
    ("table-size-1.qed", ZERO_1M),
    ("zero-size.qed", EMPTY),
    (
        "odd-size.qed",
        "3ca810d499eca53367a7a9ac540774e247ab9afc35afe82b0398646dfa6f8b6f",
    ),
    (
        "trailing-garbage.qed",
        "596e2e6287e9a450f220241fd65695f2a73855d777eb3270c32bcdc1bf234c5e",
    ),
    ("unbacked.qed", ZERO_256K),
    // QEMU's result; see `zero_then_partial_follows_the_spec`.
    (
        "zero-then-partial.qed",
        "4f405581e091e4d448253248687c86cfd91229a6620f305a8387e8e084f63b73",
    ),
    (
        "header-size-2.qed",
        "71249f07eee27c4a9c5ea3424460c18d71938690a24b405d109852e502fc093b",
    ),
];

/// Header fields of every fixture (README / `qemu-10.0.2-report.txt`):
/// file, cluster_size, table_size, header_size, features, compat, autoclear,
/// l1_table_offset, image_size, backing_filename_offset, backing_filename_size.
type HeaderRow = (
    &'static str,
    u32,
    u32,
    u32,
    u64,
    u64,
    u64,
    u64,
    u64,
    u32,
    u32,
);
const HEADERS: &[HeaderRow] = &[
    (
        "empty-default.qed",
        65536,
        4,
        1,
        0,
        0,
        0,
        65536,
        16 << 20,
        0,
        0,
    ),
    ("basic-64k.qed", 65536, 4, 1, 0, 0, 0, 65536, 16 << 20, 0, 0),
    ("small-4k.qed", 4096, 2, 1, 0, 0, 0, 4096, 64 << 20, 0, 0),
    (
        "backing-overlay.qed",
        4096,
        4,
        1,
        0x5,
        0,
        0,
        4096,
        524288,
        64,
        16,
    ),
    ("chain-base.qed", 4096, 4, 1, 0, 0, 0, 4096, 524288, 0, 0),
    ("chain-top.qed", 4096, 4, 1, 0x1, 0, 0, 4096, 524288, 64, 14),
    (
        "dirty-needcheck.qed",
        4096,
        4,
        1,
        0x2,
        0,
        0,
        4096,
        1 << 20,
        0,
        0,
    ),
    (
        "dirty-invalid-l2.qed",
        4096,
        4,
        1,
        0x2,
        0,
        0,
        4096,
        1 << 20,
        0,
        0,
    ),
    ("leak.qed", 4096, 4, 1, 0, 0, 0, 4096, 1 << 20, 0, 0),
    ("dup-ref.qed", 4096, 4, 1, 0, 0, 0, 4096, 1 << 20, 0, 0),
    ("l1-invalid.qed", 4096, 4, 1, 0, 0, 0, 4096, 16 << 20, 0, 0),
    (
        "unknown-feature.qed",
        4096,
        4,
        1,
        0x8,
        0,
        0,
        4096,
        1 << 20,
        0,
        0,
    ),
    (
        "unknown-compat-autoclear.qed",
        4096,
        4,
        1,
        0,
        0x1,
        0x10,
        4096,
        1 << 20,
        0,
        0,
    ),
    ("table-size-1.qed", 4096, 1, 1, 0, 0, 0, 4096, 1 << 20, 0, 0),
    ("zero-size.qed", 65536, 4, 1, 0, 0, 0, 65536, 0, 0, 0),
    ("odd-size.qed", 4096, 4, 1, 0, 0, 0, 4096, 1536, 0, 0),
    (
        "trailing-garbage.qed",
        4096,
        4,
        1,
        0,
        0,
        0,
        4096,
        1 << 20,
        0,
        0,
    ),
    (
        "truncated-cluster.qed",
        4096,
        4,
        1,
        0,
        0,
        0,
        4096,
        1 << 20,
        0,
        0,
    ),
    ("unbacked.qed", 4096, 4, 1, 0, 0, 0, 4096, 262144, 64, 0),
    (
        "zero-then-partial.qed",
        4096,
        4,
        1,
        0x5,
        0,
        0,
        4096,
        262144,
        64,
        16,
    ),
    (
        "header-size-2.qed",
        4096,
        4,
        2,
        0x5,
        0,
        0,
        8192,
        524288,
        5000,
        16,
    ),
];

/// Fixtures `qemu-img map` maps completely (the others fail to open or stop at a corrupt entry).
const QEMU_MAPPABLE: &[&str] = &[
    "empty-default.qed",
    "basic-64k.qed",
    "small-4k.qed",
    "backing-overlay.qed",
    "chain-base.qed",
    "chain-top.qed",
    "dirty-needcheck.qed",
    "leak.qed",
    "dup-ref.qed",
    "unknown-compat-autoclear.qed",
    "zero-size.qed",
    "odd-size.qed",
    "trailing-garbage.qed",
    "unbacked.qed",
    "zero-then-partial.qed",
    "header-size-2.qed",
];

fn extents(image: &Image) -> Vec<Extent> {
    image
        .extents(0, image.size())
        .collect::<Result<_, _>>()
        .expect("extents")
}

fn data(offset: u64, length: u64, host: u64) -> Extent {
    Extent {
        offset,
        length,
        kind: ExtentKind::Data { host_offset: host },
    }
}

fn zero(offset: u64, length: u64) -> Extent {
    Extent {
        offset,
        length,
        kind: ExtentKind::Zero,
    }
}

fn unalloc(offset: u64, length: u64) -> Extent {
    Extent {
        offset,
        length,
        kind: ExtentKind::Unallocated,
    }
}

fn chain(offset: u64, length: u64, depth: usize, kind: ChainKind) -> ChainExtent {
    ChainExtent {
        offset,
        length,
        depth,
        kind,
    }
}

fn host(host_offset: u64) -> ChainKind {
    ChainKind::Data { host_offset }
}

/// Reads the whole disk cluster by cluster, substituting zeros for clusters whose read fails;
/// returns the hash and the offsets of the failed clusters (all must fail with `Corrupt`).
fn sha256_skipping_corrupt(image: &Image) -> (String, Vec<u64>) {
    let cs = image.cluster_size();
    let mut all = vec![0u8; image.size() as usize];
    let mut bad = Vec::new();
    for (i, chunk) in all.chunks_mut(cs as usize).enumerate() {
        let at = i as u64 * cs;
        match image.read_at(chunk, at) {
            Ok(()) => {}
            Err(Error::Corrupt { .. }) => {
                chunk.fill(0);
                bad.push(at);
            }
            Err(e) => panic!("read at {at}: unexpected error {e}"),
        }
    }
    (sha256_hex(&all), bad)
}

#[test]
fn raw_sha256_of_every_readable_fixture() {
    let Some(dir) = fixture_dir() else { return };
    for (name, want) in RAW_SHA256 {
        let image = open_ro(&dir.path().join(name));
        assert_eq!(image_sha256(&image), *want, "raw sha256 of {name}");
    }
}

#[test]
fn header_fields_of_every_fixture() {
    let Some(dir) = fixture_dir() else { return };
    for &(name, cs, ts, hs, features, compat, autoclear, l1, size, bfo, bfs) in HEADERS {
        let path = dir.path().join(name);
        let bytes = std::fs::read(&path).unwrap();
        let header = qed_image::Header::decode(&bytes).expect(name);
        assert_eq!(
            (header.cluster_size, header.table_size, header.header_size),
            (cs, ts, hs),
            "{name}: geometry"
        );
        assert_eq!(
            (
                header.features,
                header.compat_features,
                header.autoclear_features
            ),
            (features, compat, autoclear),
            "{name}: feature sets"
        );
        assert_eq!(
            (header.l1_table_offset, header.image_size),
            (l1, size),
            "{name}"
        );
        assert_eq!(
            (header.backing_filename_offset, header.backing_filename_size),
            (bfo, bfs),
            "{name}: backing name location"
        );
        if name == "unknown-feature.qed" {
            continue; // cannot be opened, see `unknown_feature_is_refused`
        }
        let image = open_ro(&path);
        let info = image.info();
        assert_eq!(info.header, header, "{name}: info().header");
        assert_eq!(info.size, size, "{name}");
        assert_eq!(image.size(), size, "{name}");
        assert_eq!(info.cluster_size, u64::from(cs), "{name}");
        assert_eq!(info.table_size, ts, "{name}");
        assert_eq!(info.dirty, features & 0x2 != 0, "{name}: dirty");
        let named = features & 0x1 != 0 && bfs != 0;
        assert_eq!(info.backing_file.is_some(), named, "{name}: backing name");
        assert_eq!(image.backing().is_some(), named, "{name}: backing layer");
    }
}

/// Our extents agree with `qemu-img map --output=json` of the same file. See
/// [`kit::chain_to_map`] for how a `ChainExtent` maps onto QEMU's fields
/// (start/length/present/zero/data/offset compared; depth compared where present).
#[test]
fn chain_extents_agree_with_qemu_img_map() {
    if !require_tool("qemu-img") {
        return;
    }
    let Some(dir) = fixture_dir() else { return };
    for name in QEMU_MAPPABLE {
        let path = dir.path().join(name);
        let qemu = qemu_map(&path);
        let image = open_ro(&path);
        assert_eq!(qemu.is_empty(), image.size() == 0, "{name}: {qemu:?}");
        let ours = chain_to_map(&image.chain_extents(0, image.size()).expect(name));
        assert_eq!(ours, qemu, "{name}: map differs from qemu-img map");
    }
}

/// Where QEMU's map stops with EINVAL, ours reports `Corrupt` at the same offset, after
/// the same extents.
#[test]
fn extents_stop_at_corrupt_entries_like_qemu_img_map() {
    let Some(dir) = fixture_dir() else { return };
    // (fixture, extents before the bad entry, guest offset of the bad entry, table)
    let cases: &[(&str, Vec<Extent>, u64, TableKind)] = &[
        (
            "dirty-invalid-l2.qed",
            vec![data(0, 8192, 20480), unalloc(8192, 12288)],
            20480,
            TableKind::L2,
        ),
        (
            "truncated-cluster.qed",
            vec![data(0, 4096, 20480), unalloc(4096, 61440)],
            65536,
            TableKind::L2,
        ),
        (
            "l1-invalid.qed",
            vec![data(0, 4096, 20480), unalloc(4096, 8 * 1048576 - 4096)],
            8 << 20,
            TableKind::L1,
        ),
    ];
    for (name, before, bad_at, table) in cases {
        let image = open_ro(&dir.path().join(name));
        let mut it = image.extents(0, image.size());
        for want in before {
            assert_eq!(&it.next().unwrap().expect(name), want, "{name}");
        }
        match it.next() {
            Some(Err(Error::Corrupt { table: t, .. })) => assert_eq!(t, *table, "{name}"),
            other => panic!("{name}: expected a Corrupt error, got {other:?}"),
        }
        assert!(
            matches!(
                image.chain_extents(0, image.size()),
                Err(Error::Corrupt { .. })
            ),
            "{name}: chain_extents"
        );
        // QEMU prints the entries before the bad one, then fails "at offset <bad_at>".
        if require_tool("qemu-img") {
            let out = qemu_map_output(&dir.path().join(name));
            assert_ne!(out.status, Some(0), "{name}: qemu-img map should fail");
            assert!(out.stderr.contains("Invalid argument"), "{}", out.stderr);
            let qemu = parse_qemu_map(&out.stdout);
            let covered: u64 = qemu.iter().map(|e| e.length).sum();
            assert!(covered <= *bad_at, "{name}: qemu mapped past the bad entry");
            let ours = chain_to_map(&image.chain_extents(0, covered).unwrap());
            assert_eq!(ours, qemu, "{name}: map before the bad entry");
        }
    }
}

#[test]
fn empty_default_map_is_one_unallocated_extent() {
    let Some(dir) = fixture_dir() else { return };
    let image = open_ro(&dir.path().join("empty-default.qed"));
    assert_eq!(extents(&image), vec![unalloc(0, 16 << 20)]);
    assert_eq!(image.file_length().unwrap(), 327680);
}

#[test]
fn basic_64k_layout() {
    let Some(dir) = fixture_dir() else { return };
    let image = open_ro(&dir.path().join("basic-64k.qed"));
    const K: u64 = 1024;
    const M: u64 = 1024 * K;
    assert_eq!(
        extents(&image),
        vec![
            data(0, 64 * K, 327680),
            unalloc(64 * K, M - 64 * K),
            data(M, 64 * K, 655360),
            unalloc(M + 64 * K, M - 64 * K),
            zero(2 * M, 128 * K),
            unalloc(2 * M + 128 * K, M - 128 * K),
            data(3 * M, 192 * K, 720896),
            unalloc(3 * M + 192 * K, 13 * M - 192 * K),
        ]
    );
    assert_fill(&read_range(&image, 0, 65536), 0xab, "0..64K");
    // Only 4 KiB at 1M+4K were written; the rest of the cluster was written as zeros.
    let c = read_range(&image, M, 65536);
    assert_fill(&c[..4096], 0, "COW head");
    assert_fill(&c[4096..8192], 0xcd, "1M+4K..1M+8K");
    assert_fill(&c[8192..], 0, "COW tail");
    assert_fill(&read_range(&image, 3 * M, 192 * 1024), 0xef, "3M..");
}

#[test]
fn small_4k_layout_crosses_l2_tables() {
    let Some(dir) = fixture_dir() else { return };
    let image = open_ro(&dir.path().join("small-4k.qed"));
    let g = image.geometry();
    assert_eq!(g.entries_per_table(), 1024);
    assert_eq!(g.l2_coverage(), 4 << 20);
    assert_eq!(
        extents(&image),
        vec![
            data(0, 4096, 12288),
            unalloc(4096, 4194304 - 4096),
            data(4194304, 4096, 24576),
            unalloc(4198400, 8384512 - 4198400),
            // L1[1] L2[1023] = 36864 and L1[2] L2[0] = 40960: host-contiguous, one extent.
            data(8384512, 8192, 36864),
            unalloc(8392704, 12582912 - 8392704),
            zero(12582912, 16384),
            unalloc(12599296, 67104768 - 12599296),
            data(67104768, 4096, 61440),
        ]
    );
    // The 512 bytes at 4194816 were COWed into a zeroed cluster.
    let c = read_range(&image, 4194304, 4096);
    assert_fill(&c[..512], 0, "head");
    assert_fill(&c[512..1024], 0x22, "data");
    assert_fill(&c[1024..], 0, "tail");
}

#[test]
fn backing_overlay_with_raw_backing() {
    let Some(dir) = fixture_dir() else { return };
    let image = open_ro(&dir.path().join("backing-overlay.qed"));
    let info = image.info();
    assert_eq!(info.backing_file.as_deref(), Some("backing-base.raw"));
    assert_eq!(info.backing_format, Some(BackingFormat::Raw));
    assert_eq!(
        info.backing_path.as_deref(),
        Some(dir.path().join("backing-base.raw").as_path())
    );
    match image.backing().as_deref() {
        Some(BackingLayer::Raw { len, .. }) => assert_eq!(*len, 262144),
        other => panic!("expected a raw backing layer, got {other:?}"),
    }
    assert_eq!(
        extents(&image),
        vec![
            unalloc(0, 4096),
            data(4096, 4096, 20480),
            unalloc(8192, 57344),
            zero(65536, 8192),
            unalloc(73728, 180224),
            data(253952, 12288, 40960),
            unalloc(266240, 40960),
            data(307200, 4096, 53248),
            unalloc(311296, 212992),
        ]
    );
    // README map; depth 1 = the raw backing file (offset = guest offset there).
    assert_eq!(
        image.chain_extents(0, image.size()).unwrap(),
        vec![
            chain(0, 4096, 1, host(0)),
            chain(4096, 4096, 0, host(20480)),
            chain(8192, 57344, 1, host(8192)),
            chain(65536, 8192, 0, ChainKind::Zero),
            chain(73728, 180224, 1, host(73728)),
            chain(253952, 12288, 0, host(40960)),
            chain(266240, 40960, 1, ChainKind::Unallocated),
            chain(307200, 4096, 0, host(53248)),
            chain(311296, 212992, 1, ChainKind::Unallocated),
        ]
    );
    let c = read_range(&image, 4096, 4096);
    assert_fill(&c[..512], 0x11, "COW head from backing");
    assert_fill(&c[512..1536], 0xaa, "data");
    assert_fill(&c[1536..], 0x11, "COW tail from backing");
    assert_fill(
        &read_range(&image, 65536, 8192),
        0,
        "zero clusters hide the backing",
    );
    // L2[62..64]: front COW from backing (0x22), written data, zeros past backing EOF.
    let c = read_range(&image, 253952, 12288);
    assert_fill(&c[..2048], 0x22, "front COW");
    assert_fill(&c[2048..10240], 0xbb, "data");
    assert_fill(&c[10240..], 0, "beyond backing EOF");
}

#[test]
fn chain_top_probes_qed_backing() {
    let Some(dir) = fixture_dir() else { return };
    let top = open_ro(&dir.path().join("chain-top.qed"));
    let info = top.info();
    assert_eq!(info.header.features, 0x1);
    assert_eq!(info.backing_file.as_deref(), Some("chain-base.qed"));
    // Not recorded in the header: found by probing.
    assert_eq!(info.backing_format, None);
    let backing = top.backing();
    let Some(layer @ BackingLayer::Qed(base)) = backing.as_deref() else {
        panic!(
            "expected a probed QED backing layer, got {:?}",
            top.backing()
        );
    };
    assert_eq!(layer.format(), BackingFormat::Qed);
    assert_eq!(base.size(), 524288);
    assert_eq!(
        extents(&top),
        vec![
            unalloc(0, 8192),
            data(8192, 4096, 20480),
            unalloc(12288, 524288 - 12288)
        ]
    );
    assert_eq!(
        top.chain_extents(0, top.size()).unwrap(),
        vec![
            chain(0, 8192, 1, host(20480)),
            chain(8192, 4096, 0, host(20480)),
            chain(12288, 512000, 1, host(32768)),
        ]
    );
    assert_fill(&read_range(&top, 8192, 4096), 0xa5, "top data");
    assert_fill(&read_range(&top, 0, 8192), 0x5a, "base data");

    let base = open_ro(&dir.path().join("chain-base.qed"));
    assert_eq!(extents(&base), vec![data(0, 524288, 20480)]);
    assert!(base.backing().is_none());
}

#[test]
fn unknown_feature_is_refused() {
    let Some(dir) = fixture_dir() else { return };
    let path = dir.path().join("unknown-feature.qed");
    for options in [OpenOptions::read_only(), OpenOptions::read_write()] {
        match Image::open(&path, &options) {
            Err(Error::Format(FormatError::UnknownFeatures { bits: 8 })) => {}
            other => panic!("expected UnknownFeatures {{ bits: 8 }}, got {other:?}"),
        }
    }
    assert_eq!(
        file_sha256(&path),
        "4775b30b55e5e0abf8e49060835f712306b63f97051e5cf5c9bd1a937291938b",
        "a refused open must not touch the file"
    );
}

#[test]
fn unknown_compat_and_autoclear_bits() {
    let Some(dir) = fixture_dir() else { return };
    let path = dir.path().join("unknown-compat-autoclear.qed");
    let before = file_sha256(&path);
    // Read-only: the header is left alone.
    {
        let image = open_ro(&path);
        assert_eq!(image.info().header.compat_features, 0x1);
        assert_eq!(image.info().header.autoclear_features, 0x10);
        assert_eq!(image_sha256(&image), ZERO_1M);
    }
    assert_eq!(
        file_sha256(&path),
        before,
        "read-only open changed the file"
    );
    assert_eq!(file_u64(&path, 32), 0x10);
    // Read-write: autoclear is reset on disk at open, compat stays.
    let image = open_rw(&path);
    assert_eq!(
        file_u64(&path, 32),
        0,
        "autoclear not cleared at read-write open"
    );
    assert_eq!(file_u64(&path, 24), 0x1, "compat must be kept");
    assert_eq!(image.info().header.autoclear_features, 0);
    assert_eq!(image.info().header.compat_features, 0x1);
    image.close().unwrap();
    assert_eq!(file_u64(&path, 32), 0);
    assert_eq!(file_u64(&path, 24), 0x1);
    assert_eq!(file_u64(&path, 16), 0, "features after close");
}

#[test]
fn table_size_1_opens_although_qemu_cannot() {
    let Some(dir) = fixture_dir() else { return };
    let path = dir.path().join("table-size-1.qed");
    {
        let image = open_ro(&path);
        assert_eq!(image.geometry().table_size(), 1);
        assert_eq!(image.size(), 1 << 20);
        assert_eq!(image_sha256(&image), ZERO_1M);
        assert_eq!(extents(&image), vec![unalloc(0, 1 << 20)]);
    }
    // Spec-valid: writes work too (4K/ts1: one L2 table of 512 entries maps 2 MiB).
    {
        let image = open_rw(&path);
        image.write_at(&[0x42; 5000], 4000).unwrap();
        image.close().unwrap();
    }
    let image = open_ro(&path);
    let c = read_range(&image, 0, 12288);
    assert_fill(&c[..4000], 0, "before");
    assert_fill(&c[4000..9000], 0x42, "written");
    assert_fill(&c[9000..], 0, "after");
    drop(image);
    // QEMU 10.0.2 cannot open any table_size = 1 image (its table-offset check treats
    // `off + (ts - 1) * cs <= off` as overflow; reference §10 bug 1).
    if require_tool("qemu-img") {
        let out = qemu_img(["info", "-f", "qed", path.to_str().unwrap()]);
        assert_eq!(out.status, Some(1));
        assert!(
            out.stderr.contains("QED table offset is invalid"),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn zero_size_image() {
    let Some(dir) = fixture_dir() else { return };
    let path = dir.path().join("zero-size.qed");
    let image = open_rw(&path);
    assert_eq!(image.size(), 0);
    assert_eq!(extents(&image), vec![]);
    assert_eq!(image.chain_extents(0, 0).unwrap(), vec![]);
    image.read_at(&mut [], 0).unwrap();
    assert!(matches!(
        image.read_at(&mut [0u8; 512], 0),
        Err(Error::OutOfRange { size: 0, .. })
    ));
    assert!(matches!(
        image.write_at(&[0u8; 512], 0),
        Err(Error::OutOfRange { size: 0, .. })
    ));
    image.close().unwrap();
}

#[test]
fn odd_size_image() {
    let Some(dir) = fixture_dir() else { return };
    let path = dir.path().join("odd-size.qed");
    let image = open_rw(&path);
    assert_eq!(image.size(), 1536);
    // A whole 4 KiB cluster backs the 1.5 KiB disk.
    assert_eq!(extents(&image), vec![data(0, 1536, 20480)]);
    let c = read_range(&image, 0, 1536);
    assert_fill(&c[..1024], 0, "head");
    assert_fill(&c[1024..], 0x17, "data");
    match image.write_at(&[0u8; 512], 1536) {
        Err(Error::OutOfRange {
            offset: 1536,
            len: 512,
            size: 1536,
        }) => {}
        other => panic!("expected OutOfRange, got {other:?}"),
    }
    assert!(matches!(
        image.write_at(&[1u8; 2], 1535),
        Err(Error::OutOfRange { .. })
    ));
    image.write_at(&[0x18; 512], 1024).unwrap();
    assert_fill(&read_range(&image, 1024, 512), 0x18, "in-place write");
    image.close().unwrap();
}

#[test]
fn trailing_garbage_is_overwritten_by_the_next_allocation() {
    let Some(dir) = fixture_dir() else { return };
    let path = dir.path().join("trailing-garbage.qed");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 41960);
    let image = open_rw(&path);
    image.write_at(&[0x55; 4096], 65536).unwrap();
    // Allocation starts at the length rounded down to whole clusters.
    assert_eq!(
        extents(&image),
        vec![
            data(0, 4096, 20480),
            unalloc(4096, 61440),
            data(65536, 4096, 40960),
            unalloc(69632, (1 << 20) - 69632),
        ]
    );
    image.close().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 45056);
    assert_fill(&bytes[40960..], 0x55, "garbage overwritten");
    assert_eq!(file_u64(&path, 24576 + 16 * 8), 40960, "L2[16]");
    assert_qemu_img_check(&path);
}

#[test]
fn truncated_cluster_fails_only_there() {
    let Some(dir) = fixture_dir() else { return };
    let image = open_ro(&dir.path().join("truncated-cluster.qed"));
    assert_fill(&read_range(&image, 0, 4096), 0x19, "first cluster");
    match image.read_at(&mut [0u8; 4096], 65536) {
        Err(Error::Corrupt {
            table: TableKind::L2,
            table_offset: 24576,
            index: 16,
            value: 40960,
            ..
        }) => {}
        other => panic!("expected Corrupt L2[16], got {other:?}"),
    }
    // A read that only touches part of the bad cluster fails as well.
    assert!(matches!(
        image.read_at(&mut [0u8; 1], 65536 + 4095),
        Err(Error::Corrupt { .. })
    ));
    let (sha, bad) = sha256_skipping_corrupt(&image);
    assert_eq!(bad, vec![65536]);
    // Equals the README's hash after `qemu-img check -r all` (which zeroes L2[16]).
    assert_eq!(
        sha,
        "f4bc97e6d4b152a6bd7042679123a0be0875736c52a0b962e5675b5ea9af66bf"
    );
}

#[test]
fn l1_invalid_fails_only_in_its_range() {
    let Some(dir) = fixture_dir() else { return };
    let image = open_ro(&dir.path().join("l1-invalid.qed"));
    assert_fill(&read_range(&image, 0, 4096), 0x15, "first cluster");
    match image.read_at(&mut [0u8; 512], 8 << 20) {
        Err(Error::Corrupt {
            table: TableKind::L1,
            index: 1,
            value: 0x12345,
            ..
        }) => {}
        other => panic!("expected Corrupt L1[1], got {other:?}"),
    }
    let (sha, bad) = sha256_skipping_corrupt(&image);
    assert_eq!(bad.len(), 2048, "every cluster of 8..16 MiB");
    assert_eq!(bad[0], 8 << 20);
    assert_eq!(
        sha,
        "fd23e4043b881e5ca0e051a601334169fe3d4fde134254bb262491970f62aa02"
    );
}

#[test]
fn dirty_needcheck_reads_but_refuses_writers() {
    let Some(dir) = fixture_dir() else { return };
    let path = dir.path().join("dirty-needcheck.qed");
    let before = file_sha256(&path);
    {
        let image = open_ro(&path);
        assert!(image.info().dirty);
        assert_eq!(
            image_sha256(&image),
            "c6dc0a8e3d9f0d41f24f579351684647b4f4c8ba43f014c4d8e180c44cea3ce8"
        );
        assert_eq!(extents(&image)[0], data(0, 8192, 20480));
    }
    assert_eq!(
        file_sha256(&path),
        before,
        "read-only open changed the file"
    );
    // A writer checks and repairs the dirty image first: nothing to fix but the flag, so
    // the file ends up byte-identical to QEMU's repair of the same fixture.
    {
        let image = open_rw(&path);
        let report = image.open_repair().expect("dirty image checked at open");
        assert!(report.is_clean(), "{report:?}");
        assert!(!image.info().dirty);
        assert_eq!(
            image_sha256(&image),
            "c6dc0a8e3d9f0d41f24f579351684647b4f4c8ba43f014c4d8e180c44cea3ce8"
        );
    }
    assert_eq!(
        file_sha256(&path),
        "064222bf70302f7833875e0ce5e34b8dc2c72ae77973288064534883393f4724"
    );
}

#[test]
fn dirty_invalid_l2_reads_other_clusters() {
    let Some(dir) = fixture_dir() else { return };
    let path = dir.path().join("dirty-invalid-l2.qed");
    {
        let image = open_ro(&path);
        assert!(image.info().dirty);
        assert_fill(&read_range(&image, 0, 8192), 0x12, "valid clusters");
        match image.read_at(&mut [0u8; 4096], 20480) {
            Err(Error::Corrupt {
                table: TableKind::L2,
                index: 5,
                value: 0x1000000,
                ..
            }) => {}
            other => panic!("expected Corrupt L2[5], got {other:?}"),
        }
        let (sha, bad) = sha256_skipping_corrupt(&image);
        assert_eq!(bad, vec![20480]);
        // The README's hash after repair (L2[5] := 0).
        assert_eq!(
            sha,
            "5c73c277aeaf438664c4f15264283a45f6284790e96a61e1351cc63b23cd7578"
        );
    }
    // A writer repairs it at open: L2[5] cleared, flag cleared, file identical to QEMU's.
    {
        let image = open_rw(&path);
        let report = image.open_repair().expect("dirty image checked at open");
        assert_eq!(report.corruptions_fixed, 1, "{report:?}");
        assert_eq!(report.corruptions, 0);
        assert!(!image.info().dirty);
        assert_eq!(
            image_sha256(&image),
            "5c73c277aeaf438664c4f15264283a45f6284790e96a61e1351cc63b23cd7578"
        );
    }
    assert_eq!(
        file_sha256(&path),
        "68513279d117cbc76c3fc025cf0f9c25a20fe738ff22440eb31a75562dcef00d"
    );
}

#[test]
fn leak_next_allocation_goes_after_the_leak() {
    let Some(dir) = fixture_dir() else { return };
    let path = dir.path().join("leak.qed");
    let image = open_rw(&path);
    image.write_at(&[0x31; 4096], 65536).unwrap();
    assert_eq!(extents(&image)[2], data(65536, 4096, 49152));
    image.close().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 53248);
}

#[test]
fn dup_ref_reads_the_shared_cluster_twice() {
    let Some(dir) = fixture_dir() else { return };
    let image = open_ro(&dir.path().join("dup-ref.qed"));
    assert_fill(
        &read_range(&image, 28672, 4096),
        0x14,
        "L2[7] -> L2[0]'s cluster",
    );
    assert_eq!(extents(&image)[2], data(28672, 4096, 20480));
}

#[test]
fn header_size_2_opens_and_allocates_at_eof() {
    let Some(dir) = fixture_dir() else { return };
    let path = dir.path().join("header-size-2.qed");
    {
        let image = open_rw(&path);
        let info = image.info();
        assert_eq!(info.header.header_size, 2);
        assert_eq!(info.header.l1_table_offset, 8192);
        assert_eq!(info.backing_file.as_deref(), Some("backing-base.raw"));
        assert_eq!(info.backing_format, Some(BackingFormat::Raw));
        assert_fill(&read_range(&image, 4096, 4096), 0x99, "existing data");
        assert_fill(&read_range(&image, 0, 4096), 0x11, "backing data");
        // Unallocated entry in the existing L2 table (28672): data at EOF (45056).
        image.write_at(&[0x5b; 1000], 65536 + 100).unwrap();
        assert_eq!(
            image.chain_extents(65536, 4096).unwrap(),
            vec![chain(65536, 4096, 0, host(45056))]
        );
        let c = read_range(&image, 65536, 4096);
        assert_fill(&c[..100], 0x11, "COW head from backing");
        assert_fill(&c[100..1100], 0x5b, "data");
        assert_fill(&c[1100..], 0x11, "COW tail from backing");
        image.close().unwrap();
    }
    assert_eq!(file_u64(&path, 28672 + 16 * 8), 45056, "L2[16]");
    if assert_qemu_img_check(&path) {
        qemu_io(
            &path,
            &[
                "read -P 0x5b 65636 1000".into(),
                "read -P 0x11 65536 100".into(),
                "read -P 0x99 4096 4096".into(),
            ],
        );
    }
}

/// F19. QEMU fills the untouched part of a partially written *zero* cluster from the backing
/// file (reference §10.4, its COW routine does not look at the old entry); the specification
/// says a zero cluster reads as zeros, so the untouched bytes must stay zero. We follow the
/// spec when we write, and read QEMU's file as it is.
#[test]
fn zero_then_partial_follows_the_spec() {
    let Some(dir) = fixture_dir() else { return };
    // QEMU's file, read by us: QEMU's hash (the COWed 0x11 bytes are really in the cluster).
    {
        let image = open_ro(&dir.path().join("zero-then-partial.qed"));
        assert_eq!(
            image_sha256(&image),
            "4f405581e091e4d448253248687c86cfd91229a6620f305a8387e8e084f63b73"
        );
        let c = read_range(&image, 8192, 4096);
        assert_fill(&c[..512], 0xdd, "data");
        assert_fill(&c[512..], 0x11, "QEMU copied backing data");
    }
    // The same operations through our engine on a fresh overlay: the spec's hash.
    let path = dir.path().join("ours-zero-then-partial.qed");
    Image::create(
        &path,
        &params(256 << 10, 4096, 4, Some("backing-base.raw"), true),
    )
    .unwrap();
    let image = open_rw(&path);
    image.write_zeroes_at(8192, 4096).unwrap();
    assert_eq!(
        image.chain_extents(8192, 4096).unwrap(),
        vec![chain(8192, 4096, 0, ChainKind::Zero)]
    );
    image.write_at(&[0xdd; 512], 8192).unwrap();
    let c = read_range(&image, 8192, 4096);
    assert_fill(&c[..512], 0xdd, "data");
    assert_fill(&c[512..], 0, "untouched part of a zero cluster");
    assert_eq!(
        image_sha256(&image),
        "0df66a0e50d9f545584dc1ddaee0a0bc83a576f07571246f862d7d331863804f"
    );
    image.close().unwrap();
    let image = open_ro(&path);
    assert_eq!(
        image_sha256(&image),
        "0df66a0e50d9f545584dc1ddaee0a0bc83a576f07571246f862d7d331863804f"
    );
    drop(image);
    if assert_qemu_img_check(&path) {
        let raw = dir.path().join("ours-zero-then-partial.raw");
        qemu_convert_raw(&path, "qed", &raw);
        assert_eq!(
            file_sha256(&raw),
            "0df66a0e50d9f545584dc1ddaee0a0bc83a576f07571246f862d7d331863804f"
        );
    }
}

#[test]
fn unbacked_has_no_backing_file() {
    let Some(dir) = fixture_dir() else { return };
    let path = dir.path().join("unbacked.qed");
    // The old name bytes are still in the header cluster.
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[64..80], b"backing-base.raw");
    let image = open_ro(&path);
    let info = image.info();
    assert_eq!(info.backing_file, None);
    assert_eq!(info.backing_path, None);
    assert!(image.backing().is_none());
    assert_eq!(
        image.chain_extents(0, image.size()).unwrap(),
        vec![chain(0, 262144, 0, ChainKind::Unallocated)]
    );
    assert_eq!(image_sha256(&image), ZERO_256K);
}

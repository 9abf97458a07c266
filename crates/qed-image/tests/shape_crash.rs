//! Crash tests of the changes of an image's shape: every power-loss state of a shrink, a grow
//! and a change of the backing file opens (read-write: the open repairs what NEED_CHECK says
//! may be wrong) into a consistent image of the old shape or the new one.

mod kit;

use std::sync::Arc;

use kit::*;
use qed_image::format::FEATURE_BACKING_FORMAT_NO_PROBE;
use qed_image::storage::{CrashOptions, CrashState, CrashStorage, MemoryStorage};
use qed_image::{
    BackingFormat, ExtentKind, Geometry, Header, Image, NewBacking, OpenOptions, Repair,
};

/// The geometries under test: QEMU's smallest tables, more clusters per table, big clusters.
const GEOMETRIES: [(u32, u32); 3] = [(4096, 1), (4096, 4), (65536, 4)];

fn options() -> CrashOptions {
    CrashOptions {
        exhaustive_limit: 8,
        ..CrashOptions::default()
    }
}

fn describe(state: &CrashState) -> String {
    format!(
        "cut {} durable {} {:?} applied {:?} torn {:?}",
        state.cut, state.durable, state.kind, state.applied, state.torn
    )
}

/// Runs `verify` on every crash state of `crash`; panics with the first few failures.
/// Returns the number of states.
fn explore(
    what: &str,
    crash: &CrashStorage,
    mut verify: impl FnMut(Vec<u8>) -> Result<(), String>,
) -> u64 {
    let mut states = 0;
    let mut failures = Vec::new();
    for state in crash.crash_states(&options()) {
        states += 1;
        let how = describe(&state);
        if let Err(e) = verify(state.bytes) {
            failures.push(format!("{what}: {how}: {e}"));
            if failures.len() >= 3 {
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\nlog: {}",
        failures.join("\n"),
        log_summary(crash)
    );
    eprintln!("{what}: {states} crash states");
    states
}

fn log_summary(crash: &CrashStorage) -> String {
    crash
        .log()
        .iter()
        .map(|e| match &e.op {
            qed_image::storage::CrashOp::Write { offset, data } => {
                format!("w{offset:#x}+{:#x}", data.len())
            }
            other => format!("{other:?}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_clean(image: &Image, what: &str) -> Result<(), String> {
    let report = image
        .check(Repair::None)
        .map_err(|e| format!("{what}: check: {e}"))?;
    if report.is_clean() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {} corruptions, {} leaks, {} check errors: {:?}",
            report.corruptions,
            report.leaks,
            report.check_errors,
            &report.findings[..report.findings.len().min(4)]
        ))
    }
}

fn read(image: &Image, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len as usize];
    image
        .read_at(&mut buf, offset)
        .map_err(|e| format!("read {offset:#x}+{len:#x}: {e}"))?;
    Ok(buf)
}

fn same(got: &[u8], want: &[u8], offset: u64, what: &str) -> Result<(), String> {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: guest {:#x} reads {:#04x}, not {:#04x}",
            offset + i as u64,
            got[i],
            want[i]
        )),
    }
}

fn zeros(image: &Image, offset: u64, len: u64, what: &str) -> Result<(), String> {
    let got = read(image, offset, len)?;
    match got.iter().position(|&b| b != 0) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: guest {:#x} reads {:#04x}, not zero",
            offset + i as u64,
            got[i]
        )),
    }
}

/// Fails unless every extent of `[offset, offset + len)` is unallocated.
fn unallocated(image: &Image, offset: u64, len: u64, what: &str) -> Result<(), String> {
    for extent in image.extents(offset, len) {
        let extent = extent.map_err(|e| format!("{what}: extents: {e}"))?;
        if extent.kind != ExtentKind::Unallocated {
            return Err(format!(
                "{what}: {:#x}+{:#x} is {:?}",
                extent.offset, extent.length, extent.kind
            ));
        }
    }
    Ok(())
}

/// A closed, clean image in memory holding `writes`, and the model of what it reads.
fn image_with(g: &Geometry, size: u64, writes: &[(u64, Vec<u8>)]) -> (Vec<u8>, SparseDisk) {
    let storage = create_memory(&params(
        size,
        g.cluster_size() as u32,
        g.table_size(),
        None,
        false,
    ));
    let mut model = SparseDisk::new(size, Base::Zeros);
    let image = open_shared(&storage, &rw_options(), None);
    for (offset, data) in writes {
        image.write_at(data, *offset).unwrap();
        model.write(*offset, data);
    }
    image.close().unwrap();
    let bytes = storage.to_bytes();
    assert!(!need_check(&bytes));
    (bytes, model)
}

/// Opens a crash state read-write (the open repairs it when NEED_CHECK is set).
fn open_state(bytes: Vec<u8>) -> Result<(Arc<MemoryStorage>, Image), String> {
    let storage = Arc::new(MemoryStorage::from_bytes(bytes));
    let image = Image::open_storage(Box::new(storage.clone()), &rw_options(), None)
        .map_err(|e| format!("read-write open: {e}"))?;
    Ok((storage, image))
}

fn close_clean(storage: &MemoryStorage, image: Image) -> Result<(), String> {
    image.close().map_err(|e| format!("close: {e}"))?;
    if need_check(&storage.to_bytes()) {
        return Err("NEED_CHECK still set after a close".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// shrink

/// Which checks of a shrink's crash states are strict.
#[derive(Debug, Clone, Copy, Default)]
struct Strict {
    /// No leak in a state whose NEED_CHECK is clear (the open does not repair those).
    leaks_under_a_clear_flag: bool,
    /// No L2 entry maps guest bytes past the size once the open has repaired the state.
    no_entries_past_the_end: bool,
    /// No leak under a clear NEED_CHECK after growing the repaired state again.
    no_leaks_after_growing_again: bool,
}

const ALL_STRICT: Strict = Strict {
    leaks_under_a_clear_flag: true,
    no_entries_past_the_end: true,
    no_leaks_after_growing_again: true,
};

/// The L2 entries (data or zero) of the image in `bytes` that map guest bytes at or past its
/// size: (guest offset, raw entry).
fn entries_past_the_end(bytes: &[u8]) -> Vec<(u64, u64)> {
    let header = Header::decode(bytes).unwrap();
    let g = Geometry::new(header.cluster_size, header.table_size).unwrap();
    let entry = |table: u64, i: usize| le_u64(bytes, (table as usize) + i * 8);
    let mut out = Vec::new();
    for i in 0..g.entries_per_table() {
        let l2 = entry(header.l1_table_offset, i);
        if l2 == 0 || l2 as usize + g.table_bytes() as usize > bytes.len() {
            continue;
        }
        for j in 0..g.entries_per_table() {
            let guest = g.l1_guest_offset(i) + j as u64 * g.cluster_size();
            let raw = entry(l2, j);
            if raw != 0 && guest >= header.image_size {
                out.push((guest, raw));
            }
        }
    }
    out
}

/// A check of an image that may leak only when NEED_CHECK is set on `storage` (leaks are
/// then reclaimed by the next repair); `leaks_ok` allows leaks regardless.
fn check_leaks_only_when_dirty(
    image: &Image,
    storage: &MemoryStorage,
    leaks_ok: bool,
    what: &str,
) -> Result<(), String> {
    let report = image
        .check(Repair::None)
        .map_err(|e| format!("{what}: check: {e}"))?;
    let dirty = need_check(&storage.to_bytes());
    if report.corruptions > 0
        || report.check_errors > 0
        || (report.leaks > 0 && !dirty && !leaks_ok)
    {
        return Err(format!(
            "{what}: {} corruptions, {} leaks with NEED_CHECK {dirty}, {} check errors: {:?}",
            report.corruptions,
            report.leaks,
            report.check_errors,
            &report.findings[..report.findings.len().min(4)]
        ));
    }
    Ok(())
}

/// Every crash state of a shrink from three L2 tables' worth to `new` (the data spans all
/// three tables and the new end): it opens read-write, is consistent, has the old size or
/// the new one, keeps the data inside it, and once the size is the new one, what lay past it
/// never comes back. `strict` says which of the checks that find known faults are made.
fn shrink_crash(cs: u32, ts: u32, unaligned: bool, pending: bool, strict: Strict) -> u64 {
    let g = Geometry::new(cs, ts).unwrap();
    let c = g.cluster_size();
    let cov = g.l2_coverage();
    let old = 3 * cov;
    let new = cov + 2 * c + if unaligned { 2560 } else { 0 };
    // Written in this order, what lies past the new end sits low in the file: the shrink
    // moves the data above it down and slides the tables before it cuts the file.
    let writes = vec![
        (2 * cov + c, pattern(43, 0, (2 * c + 300) as usize)),
        (cov - c + 100, pattern(42, 0, 5 * c as usize)),
        (0, pattern(41, 0, 3 * c as usize)),
    ];
    let (bytes, model) = image_with(&g, old, &writes);
    let crash = Arc::new(CrashStorage::new(bytes));
    let image = Image::open_storage(Box::new(crash.clone()), &rw_options(), None).unwrap();
    // With `pending`, a write not written back when the shrink starts (it writes it back
    // first, and NEED_CHECK is set then); without, NEED_CHECK is clear when it starts.
    let pending = match pending {
        true => (5 * c + 7, pattern(44, 0, 2 * c as usize)),
        false => (5 * c + 7, Vec::new()),
    };
    image.write_at(&pending.1, pending.0).unwrap();
    image.resize(new).unwrap();
    image.close().unwrap();
    let done = parse_layout(&crash.contents());
    assert_eq!(done.header.image_size, new);
    done.assert_exact_cover(0);

    let hull: Vec<(u64, u64)> = writes
        .iter()
        .chain([&pending])
        .map(|(o, d)| (g.align_down(*o), g.align_up(o + d.len() as u64)))
        .collect();
    let what = format!(
        "shrink {cs}/{ts} to {new:#x}{}",
        if pending.1.is_empty() {
            ""
        } else {
            " with a pending write"
        }
    );
    explore(&what, &crash, |bytes| {
        let size = Header::decode(&bytes)
            .map_err(|e| e.to_string())?
            .image_size;
        if size != old && size != new {
            return Err(format!("size {size:#x} is neither old nor new"));
        }
        let dirty = need_check(&bytes);
        let (storage, image) = open_state(bytes)?;
        let flag = format!("size {size:#x}, NEED_CHECK {dirty}");
        // The open repaired a state with NEED_CHECK set: no leak is left there.
        check_leaks_only_when_dirty(
            &image,
            &storage,
            !strict.leaks_under_a_clear_flag,
            &format!("{flag}: after the open"),
        )?;
        for (offset, len) in model.written_runs() {
            let end = (offset + len).min(size);
            if offset < end {
                let got = read(&image, offset, end - offset)?;
                same(&got, &model.read_vec(offset, end - offset), offset, &flag)?;
            }
        }
        let got = read(&image, pending.0, pending.1.len() as u64)?;
        if size == new {
            // The write-back came before the new header.
            same(
                &got,
                &pending.1,
                pending.0,
                &format!("{flag}: the pending write"),
            )?;
        } else if let Some(i) = (0..got.len()).find(|&i| got[i] != 0 && got[i] != pending.1[i]) {
            return Err(format!(
                "{flag}: guest {:#x} is neither old nor new",
                pending.0 + i as u64
            ));
        }
        // Nothing is allocated where nothing was written.
        for extent in image.extents(0, size) {
            let extent = extent.map_err(|e| e.to_string())?;
            let inside = hull
                .iter()
                .any(|&(s, e)| extent.offset >= s && extent.offset + extent.length <= e);
            if extent.kind != ExtentKind::Unallocated && !inside {
                return Err(format!("{flag}: stray extent {extent:?}"));
            }
        }
        if strict.no_entries_past_the_end {
            image.flush().map_err(|e| format!("flush: {e}"))?;
            let past = entries_past_the_end(&storage.to_bytes());
            if !past.is_empty() {
                return Err(format!(
                    "{flag}: after the repairing open, {} L2 entries map guest bytes past the \
                     end (a grow by qemu-img would show them again): {:x?}",
                    past.len(),
                    &past[..past.len().min(4)]
                ));
            }
        }
        if size == new {
            // Once the size is the new one, what lay past it never comes back.
            image
                .resize(old)
                .map_err(|e| format!("{flag}: growing again: {e}"))?;
            zeros(&image, new, g.align_up(new) - new + c, &flag)?;
            for (offset, data) in &writes {
                let from = (*offset).max(new);
                let end = offset + data.len() as u64;
                if from < end {
                    zeros(&image, from, end - from, &format!("{flag}: dropped data"))?;
                }
            }
            let first = g.align_up(new);
            unallocated(&image, first, old - first, &flag)?;
            check_leaks_only_when_dirty(
                &image,
                &storage,
                !strict.no_leaks_after_growing_again,
                &format!("{flag}: after growing again"),
            )?;
        }
        close_clean(&storage, image)
    })
}

#[test]
fn shrink_crash_4k_ts1() {
    shrink_crash(4096, 1, true, false, Strict::default());
    shrink_crash(4096, 1, true, true, Strict::default());
}

#[test]
fn shrink_crash_4k_ts4() {
    shrink_crash(4096, 4, true, false, Strict::default());
    shrink_crash(4096, 4, false, true, Strict::default());
}

#[test]
fn shrink_crash_64k_ts4() {
    shrink_crash(65536, 4, true, true, Strict::default());
}

#[test]
fn shrink_crash_leaves_no_leak_under_a_clear_need_check() {
    for (cs, ts) in GEOMETRIES {
        shrink_crash(
            cs,
            ts,
            true,
            false,
            Strict {
                leaks_under_a_clear_flag: true,
                ..Strict::default()
            },
        );
    }
}

#[test]
fn shrink_crash_leaves_no_entry_past_the_end_after_the_repair() {
    for (cs, ts) in GEOMETRIES {
        shrink_crash(
            cs,
            ts,
            true,
            true,
            Strict {
                no_entries_past_the_end: true,
                ..Strict::default()
            },
        );
    }
}

#[test]
fn shrink_crash_then_grow_leaves_no_leak_under_a_clear_need_check() {
    for (cs, ts) in GEOMETRIES {
        shrink_crash(
            cs,
            ts,
            true,
            true,
            Strict {
                no_leaks_after_growing_again: true,
                ..Strict::default()
            },
        );
    }
}

#[test]
fn shrink_crash_all_checks() {
    for (cs, ts) in GEOMETRIES {
        shrink_crash(cs, ts, true, false, ALL_STRICT);
        shrink_crash(cs, ts, true, true, ALL_STRICT);
    }
}

// ---------------------------------------------------------------------------------------
// grow

/// Every crash state of a grow of an image whose last cluster is partial (its bytes past the
/// end hold garbage) with a write not yet written back: the grow writes it back first.
fn grow_crash(cs: u32, ts: u32) -> u64 {
    let g = Geometry::new(cs, ts).unwrap();
    let c = g.cluster_size();
    let cov = g.l2_coverage();
    let old = 2 * cov + 3 * c + 1536;
    let new = old + 2 * cov + 512;
    let writes = vec![
        (0, pattern(51, 0, 2 * c as usize)),
        (old - 2000, pattern(52, 0, 2000)),
    ];
    let (mut bytes, model) = image_with(&g, old, &writes);
    // What QEMU leaves past the end when it copies the last cluster from a longer backing file.
    let host = {
        let image = Image::open_storage(
            Box::new(MemoryStorage::from_bytes(bytes.clone())),
            &OpenOptions::read_only(),
            None,
        )
        .unwrap();
        match image
            .extents(g.align_down(old), 1)
            .next()
            .unwrap()
            .unwrap()
            .kind
        {
            ExtentKind::Data { host_offset } => host_offset,
            other => panic!("{other:?}"),
        }
    };
    let tail = (old - g.align_down(old)) as usize;
    bytes[host as usize + tail..(host + c) as usize].fill(0xEE);

    let crash = Arc::new(CrashStorage::new(bytes));
    let image = Image::open_storage(Box::new(crash.clone()), &rw_options(), None).unwrap();
    let pending = (cov + 10, pattern(53, 0, 3000));
    image.write_at(&pending.1, pending.0).unwrap();
    image.resize(new).unwrap();
    image.close().unwrap();

    let what = format!("grow {cs}/{ts} to {new:#x}");
    explore(&what, &crash, |bytes| {
        let size = Header::decode(&bytes)
            .map_err(|e| e.to_string())?
            .image_size;
        if size != old && size != new {
            return Err(format!("size {size:#x} is neither old nor new"));
        }
        let dirty = need_check(&bytes);
        let (storage, image) = open_state(bytes)?;
        let flag = format!("size {size:#x}, NEED_CHECK {dirty}");
        check_clean(&image, &format!("{flag}: after the open"))?;
        for (offset, len) in model.written_runs() {
            let got = read(&image, offset, len)?;
            same(&got, &model.read_vec(offset, len), offset, &flag)?;
        }
        let got = read(&image, pending.0, pending.1.len() as u64)?;
        if size == new {
            // The write-back came before the new header.
            same(
                &got,
                &pending.1,
                pending.0,
                &format!("{flag}: the pending write"),
            )?;
            zeros(&image, old, g.align_up(old) - old + 2 * c, &flag)?;
            zeros(&image, new - 2 * c, 2 * c, &flag)?;
            let first = g.align_up(old);
            unallocated(&image, first, new - first, &flag)?;
        } else {
            // The pending write reads old (zeros) or new, byte by byte.
            if let Some(i) = (0..got.len()).find(|&i| got[i] != 0 && got[i] != pending.1[i]) {
                return Err(format!(
                    "{flag}: guest {:#x} is neither old nor new",
                    pending.0 + i as u64
                ));
            }
        }
        close_clean(&storage, image)
    })
}

#[test]
fn grow_crash_4k_ts1() {
    grow_crash(4096, 1);
}

#[test]
fn grow_crash_4k_ts4() {
    grow_crash(4096, 4);
}

#[test]
fn grow_crash_64k_ts4() {
    grow_crash(65536, 4);
}

// ---------------------------------------------------------------------------------------
// set_backing

/// A backing file as a header names it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Named {
    name: Vec<u8>,
    raw: bool,
}

fn named(name: &[u8], raw: bool) -> Option<Named> {
    Some(Named {
        name: name.to_vec(),
        raw,
    })
}

/// What the header at the start of `bytes` names, after checking it is valid for a file of
/// that length.
fn header_names(bytes: &[u8]) -> Result<(Header, Option<Named>), String> {
    let header = Header::decode(bytes).map_err(|e| format!("header: {e}"))?;
    let valid = header
        .validate(bytes.len() as u64)
        .map_err(|e| format!("header: {e}"))?;
    let named = valid.backing_name_range().map(|(offset, len)| Named {
        name: bytes[offset as usize..offset as usize + len].to_vec(),
        raw: header.features & FEATURE_BACKING_FORMAT_NO_PROBE != 0,
    });
    Ok((header, named))
}

/// Every crash state of `set_backing(new)` names either the old backing file or `new`. The
/// image is created naming `created` (written at offset 64, as QEMU does), then `setup`
/// changes it.
fn backing_crash(
    cs: u32,
    ts: u32,
    created: Option<Named>,
    setup: &[Option<Named>],
    new: Option<Named>,
) -> u64 {
    let c = u64::from(cs);
    let name = created
        .as_ref()
        .map(|n| String::from_utf8(n.name.clone()).expect("an ASCII name"));
    let raw = created.as_ref().is_some_and(|n| n.raw);
    let storage = create_memory(&params(64 * c, cs, ts, name.as_deref(), raw));
    let image = open_shared(&storage, &rw_options(), None);
    image.write_at(&pattern(61, 0, 5000), c - 100).unwrap();
    let to_new = |n: &Option<Named>| {
        n.as_ref().map(|n| NewBacking {
            name: n.name.clone(),
            format: Some(if n.raw {
                BackingFormat::Raw
            } else {
                BackingFormat::Qed
            }),
            layer: None,
        })
    };
    for step in setup {
        image.set_backing(to_new(step)).unwrap();
    }
    image.close().unwrap();
    let bytes = storage.to_bytes();
    let (base_header, before) = header_names(&bytes).unwrap();
    assert_eq!(before, setup.last().cloned().unwrap_or(created));
    let base_data = {
        let image = open_shared(&storage, &OpenOptions::read_only(), None);
        read_range(&image, c - 100, 5000)
    };

    let crash = Arc::new(CrashStorage::new(bytes));
    let image = Image::open_storage(Box::new(crash.clone()), &rw_options(), None).unwrap();
    image.set_backing(to_new(&new)).unwrap();
    image.close().unwrap();
    assert_eq!(header_names(&crash.contents()).unwrap().1, new);

    let len = |n: &Option<Named>| n.as_ref().map_or(0, |n| n.name.len());
    let what = format!(
        "set_backing {cs}/{ts}: {} bytes to {} bytes",
        len(&before),
        len(&new)
    );
    explore(&what, &crash, |bytes| {
        let (header, names) = header_names(&bytes)?;
        if names != before && names != new {
            let shown = names
                .as_ref()
                .map(|n| String::from_utf8_lossy(&n.name[..n.name.len().min(80)]).into_owned());
            return Err(format!(
                "the header names {shown:?} (offset {}, {} bytes): neither the old nor the new \
                 backing file",
                header.backing_filename_offset, header.backing_filename_size
            ));
        }
        let shape = |h: &Header| {
            (
                h.cluster_size,
                h.table_size,
                h.header_size,
                h.l1_table_offset,
                h.image_size,
                h.compat_features,
            )
        };
        if shape(&header) != shape(&base_header) {
            return Err(format!("header changed: {header:?} from {base_header:?}"));
        }
        let (storage, image) = open_state(bytes)?;
        let shown = image.info().backing_name;
        if shown != names.as_ref().map(|n| n.name.clone()) {
            return Err(format!("the open reads another name: {shown:?}"));
        }
        same(&read(&image, c - 100, 5000)?, &base_data, c - 100, "data")?;
        check_clean(&image, "after the open")?;
        close_clean(&storage, image)
    })
}

/// A name of `len` bytes (no NUL), different for each `seed`.
fn long_name(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| match i % 7 {
            6 => b'/',
            k => b'a' + (seed + k as u8 + (i / 7 % 13) as u8) % 26,
        })
        .collect()
}

#[test]
fn set_backing_crash_short_names() {
    for (cs, ts) in GEOMETRIES {
        backing_crash(cs, ts, None, &[], named(b"base.raw", true));
        let old = named(b"old.raw", true);
        backing_crash(cs, ts, old.clone(), &[], named(b"new-base.qed", false));
        backing_crash(cs, ts, old, &[], None);
    }
}

#[test]
fn set_backing_crash_names_longer_than_a_sector() {
    for (cs, ts) in GEOMETRIES {
        // From none and from a short name: the name goes after the first sector.
        backing_crash(cs, ts, None, &[], named(&long_name(600, 1), true));
        let old = named(b"old.raw", true);
        backing_crash(cs, ts, old, &[], named(&long_name(700, 2), false));
        // From a long name to another one, to a short one, to none.
        let long = named(&long_name(600, 3), true);
        let setup = [long];
        backing_crash(cs, ts, None, &setup, named(&long_name(1000, 4), true));
        backing_crash(cs, ts, None, &setup, named(b"short.raw", true));
        backing_crash(cs, ts, None, &setup, None);
        // A long name written by QEMU (at offset 64), replaced by one that fits after it.
        let qemu = named(&long_name(1000, 5), true);
        backing_crash(cs, ts, qemu, &[], named(&long_name(2000, 6), true));
    }
}

#[test]
fn set_backing_crash_long_name_that_does_not_fit_after_the_old_one() {
    // In a 4 KiB header, a 1000-byte name at offset 64 (where QEMU writes it) leaves no room
    // clear of it for a 3100-byte name: the change is refused and nothing is written (QEMU
    // would write header and name in one torn-able write). In a 64 KiB header there is room.
    for (cs, ts) in GEOMETRIES {
        let qemu = named(&long_name(1000, 7), true);
        if u64::from(cs) == 4096 {
            let c = u64::from(cs);
            let storage = create_memory(&params(
                64 * c,
                cs,
                ts,
                qemu.as_ref().map(|n| std::str::from_utf8(&n.name).unwrap()),
                true,
            ));
            let before = storage.to_bytes();
            let image = open_shared(&storage, &rw_options(), None);
            let err = image
                .set_backing(Some(NewBacking {
                    name: long_name(3100, 8),
                    format: Some(BackingFormat::Raw),
                    layer: None,
                }))
                .expect_err("no room clear of the old name");
            assert!(err.to_string().contains("No space left"), "{err}");
            image.close().unwrap();
            assert!(
                storage.to_bytes() == before,
                "a refused change wrote something"
            );
            continue;
        }
        backing_crash(cs, ts, qemu, &[], named(&long_name(3100, 8), true));
    }
}

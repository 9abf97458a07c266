//! Consistency check and repair: scans of the L1 table and every L2 table.
//!
//! The scan marks in a bitmap (one bit per cluster, up to the highest cluster referenced) which
//! clusters a table or an entry owns. It reports what `qemu-img check` reports — corruptions,
//! leaks, check errors, allocated and fragmented clusters — with exact counts (QEMU's leak
//! count is skewed by a division by `cluster_size − 1`), plus the image end offset. Tables are
//! looked at one at a time through the cache, so a check holds the cache budget too.
//!
//! Repair goes further than QEMU: invalid entries are cleared; a cluster referenced twice is
//! copied so that every reference owns its data (a second reference past the end of the
//! virtual disk is cleared instead); leaked clusters are reclaimed by moving data clusters from
//! the end of the file into them, sliding L2 tables down into the rest, and truncating the file
//! behind the last cluster in use. A repair first counts the copies it needs and refuses, with
//! nothing changed, when they would grow the file past its bound. Every change goes through
//! the normal write-back, so a crash during repair leaves an image that another repair fixes.
//!
//! A check holds the image exclusively (the I/O gate): no request runs while entries change.

use std::collections::HashMap;

use qed_format::{L1Entry, L2Entry};

use crate::bitmap::Bitmap;
use crate::state::Shared;
use crate::table::Entries;
use crate::{Error, Image, Result};

/// What a repair may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Report only.
    None,
    /// The same repairs as [`Repair::All`]. QEMU's QED driver repairs with a yes/no flag, so
    /// its `-r leaks` also clears invalid entries; here the duplicates must be copied too,
    /// as leaks can only be reclaimed (data moved, the file cut) when every cluster has one
    /// owner.
    Leaks,
    /// Clear invalid entries, copy doubly referenced clusters, reclaim leaks.
    All,
}

/// The result of a check, with the fields `qemu-img check` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated L2 entries (data clusters, valid or not).
    pub allocated_clusters: u64,
    /// Allocated entries not contiguous with the previous one in their table.
    pub fragmented_clusters: u64,
    /// Corruptions found and not repaired.
    pub corruptions: u64,
    /// Leaked clusters found and not repaired.
    pub leaks: u64,
    /// Tables that could not be read or written.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaked clusters reclaimed.
    pub leaks_fixed: u64,
    /// Length of the image file after the check.
    pub image_end_offset: u64,
    /// What was found, one line per problem (at most [`MAX_FINDINGS`]).
    pub findings: Vec<String>,
}

/// Most findings kept in a report (the counters are always exact).
pub const MAX_FINDINGS: usize = 1000;

/// The copies one repair makes (of shared L2 tables and doubly referenced clusters) may grow
/// the file by its own length, or by this much if that is more.
const MIN_REPAIR_GROWTH: u64 = 64 << 20;

/// Cluster moves one pass of leak reclaim plans at once (16 bytes each in a map).
const MOVE_BATCH: usize = 1 << 20;

impl CheckReport {
    fn note(&mut self, finding: impl FnOnce() -> String) {
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(finding());
        }
    }

    /// Whether nothing is wrong (no corruptions, leaks or check errors remain).
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

/// What one scan found.
#[derive(Default)]
struct Scan {
    /// Clusters owned by the header, a table or an entry.
    used: Bitmap,
    /// Clusters owned by the header or a table.
    metadata: Bitmap,
    /// Tables scanned: (L1 index, host offset).
    tables: Vec<(usize, u64)>,
    /// Bytes a repair of what was found would copy.
    copy_bytes: u64,
    /// Data entries that map past the end of the virtual disk (a repair clears them).
    past_end: u64,
}

impl Image {
    /// Checks the image and repairs what `repair` allows. On a writable image, metadata is
    /// written back first so the check sees what is on disk. Requests from other threads wait
    /// while the check runs.
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        if repair != Repair::None && !self.shared.writable {
            return Err(Error::ReadOnly);
        }
        let _all = self.shared.gate.exclusive();
        self.shared.check(repair)
    }
}

impl Shared {
    /// Runs a check; the caller holds the image exclusively.
    pub(crate) fn check(&self, repair: Repair) -> Result<CheckReport> {
        let fix = repair != Repair::None;
        if fix {
            self.check_writable()?;
        }
        let mut report = {
            // Counted as an allocation in flight: the idle timer must not clear NEED_CHECK
            // while a repair is half done.
            let _busy = self.alloc.begin();
            self.check_inner(fix)?
        };
        if fix && report.corruptions == 0 && report.check_errors == 0 {
            self.mark_clean()?;
        }
        report.image_end_offset = self.storage.len().map_err(Error::io("length", 0))?;
        Ok(report)
    }

    fn check_inner(&self, fix: bool) -> Result<CheckReport> {
        self.write_back()?;
        let mut report = CheckReport::default();
        let cs = self.geometry.cluster_size();
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        report.total_clusters = size.div_ceil(cs);
        let end = self.alloc.end();
        let mut scan = self.scan(&mut report, None, end)?;
        if fix && (report.corruptions > 0 || scan.past_end > 0) {
            let limit = end.saturating_add(end.max(MIN_REPAIR_GROWTH));
            if end.saturating_add(scan.copy_bytes) > limit {
                // Refused before anything changed: the file stays as it was.
                return Err(Error::TooLarge {
                    what: "file grown by repair copies",
                    bytes: end.saturating_add(scan.copy_bytes),
                    limit,
                });
            }
            let mut fixing = CheckReport::default();
            self.scan(&mut fixing, Some(limit), end)?;
            report.corruptions_fixed = fixing.corruptions_fixed;
            report.corruptions = fixing.corruptions;
            report.check_errors = report.check_errors.max(fixing.check_errors);
            // Look again so leaks are counted on the repaired image.
            self.write_back()?;
            scan = self.scan(&mut CheckReport::default(), None, self.alloc.end())?;
        }
        let first = self.valid.header_bytes() / cs;
        let file_clusters = self.alloc.end() / cs;
        let leaked = scan.used.count_clear(first, file_clusters);
        if report.check_errors == 0 {
            if fix && leaked > 0 {
                report.leaks_fixed = self.reclaim(&mut scan)?;
                report.leaks = leaked - report.leaks_fixed;
            } else {
                report.leaks = leaked;
            }
        }
        Ok(report)
    }

    /// One pass over every table. With a `limit` (a repair), invalid entries are cleared,
    /// shared tables relocated and doubly referenced clusters copied, the copies stopping
    /// before the file passes `limit`; `end` is the allocated area when the check began (copies
    /// made by the repair lie past it).
    fn scan(&self, report: &mut CheckReport, limit: Option<u64>, end: u64) -> Result<Scan> {
        let fix = limit.is_some();
        let g = self.geometry;
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        let cs = g.cluster_size();
        let ts = u64::from(g.table_size());
        let mut scan = Scan::default();
        for c in 0..self.valid.header_bytes() / cs {
            scan.used.set(c)?;
            scan.metadata.set(c)?;
        }
        let l1_first = self.valid.header().l1_table_offset / cs;
        for c in l1_first..l1_first + ts {
            scan.used.set(c)?;
            scan.metadata.set(c)?;
        }
        for l1_index in 0..self.tables.l1.len() {
            let raw = self.tables.l1.get(l1_index);
            let offset = match L1Entry::decode(raw, &g) {
                Ok(L1Entry::Unallocated) => continue,
                Ok(L1Entry::Table(off)) if self.valid.check_l2_offset(end, off).is_ok() => off,
                _ => {
                    report
                        .note(|| format!("L1[{l1_index}] = {raw:#x} is not a valid table offset"));
                    if fix {
                        self.tables.l1.set(l1_index, 0);
                        report.corruptions_fixed += 1;
                    } else {
                        report.corruptions += 1;
                    }
                    continue;
                }
            };
            let first = offset / cs;
            let taken = (first..first + ts).filter(|&c| scan.used.get(c)).count() as u64;
            let past_end = g.l1_guest_offset(l1_index) >= size;
            if taken > 0 && past_end {
                // A shared table that maps nothing of the virtual disk: cleared, not copied.
                report.note(|| {
                    format!("L2 table at {offset:#x} (L1[{l1_index}], past the end of the disk) overlaps clusters in use")
                });
                if fix {
                    self.tables.l1.set(l1_index, 0);
                    report.corruptions_fixed += taken;
                } else {
                    report.corruptions += taken;
                }
                continue;
            }
            let table = if taken > 0 {
                report.note(|| {
                    format!("L2 table at {offset:#x} (L1[{l1_index}]) overlaps clusters in use")
                });
                scan.copy_bytes += g.table_bytes();
                if !fix {
                    // Its relocated copy will copy every data cluster it maps, too.
                    scan.copy_bytes += self.data_entries_at(offset, end)? * cs;
                    report.corruptions += taken;
                    continue;
                }
                match self.relocate_table(offset, l1_index, limit.unwrap_or(0)) {
                    Ok(table) => {
                        report.corruptions_fixed += taken;
                        table
                    }
                    Err(e) => {
                        report.note(|| format!("L2 table at {offset:#x} could not be moved: {e}"));
                        report.check_errors += 1;
                        continue;
                    }
                }
            } else {
                for c in first..first + ts {
                    scan.used.set(c)?;
                    scan.metadata.set(c)?;
                }
                match self.l2_table_owned(l1_index) {
                    Ok(Some(table)) => table,
                    Ok(None) => continue,
                    Err(e) => {
                        report.note(|| format!("L2 table at {offset:#x} could not be read: {e}"));
                        report.check_errors += 1;
                        continue;
                    }
                }
            };
            scan.tables.push((l1_index, table.offset));
            self.scan_table(&table, l1_index, &mut scan, report, limit, end)?;
            drop(table);
            if fix {
                // Changes held in memory stay within the cache budget.
                self.relieve_pressure()?;
            }
        }
        Ok(scan)
    }

    fn scan_table(
        &self,
        table: &crate::table::L2Table,
        l1_index: usize,
        scan: &mut Scan,
        report: &mut CheckReport,
        limit: Option<u64>,
        end: u64,
    ) -> Result<()> {
        let fix = limit.is_some();
        let g = self.geometry;
        let cs = g.cluster_size();
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        let mut previous: Option<u64> = None;
        for index in 0..table.entries.len() {
            let raw = table.entries.get(index);
            if !L2Entry::is_data_value(raw) {
                continue;
            }
            report.allocated_clusters += 1;
            if previous.is_some_and(|p| p.wrapping_add(cs) != raw) {
                report.fragmented_clusters += 1;
            }
            previous = Some(raw);
            if self.valid.decode_l2(end, raw).is_err() {
                report.note(|| {
                    format!(
                        "L2[{index}] = {raw:#x} in table {:#x} is not a valid data offset",
                        table.offset
                    )
                });
                if fix {
                    table.set(index, 0);
                    report.corruptions_fixed += 1;
                } else {
                    report.corruptions += 1;
                }
                continue;
            }
            let cluster = raw / cs;
            let past_end = g.l1_guest_offset(l1_index) + index as u64 * cs >= size;
            if past_end {
                scan.past_end += 1;
            }
            if past_end && fix {
                // Maps nothing of the virtual disk (a shrink cut short, say): a repair
                // clears it, so growing the disk later cannot show old data, and reclaims its
                // cluster. (QEMU's check does not count these; neither does a check alone.)
                report.note(|| {
                    format!(
                        "L2[{index}] = {raw:#x} in table {:#x} maps past the end of the disk",
                        table.offset
                    )
                });
                table.set(index, 0);
                report.corruptions_fixed += 1;
                continue;
            }
            if !scan.used.get(cluster) {
                scan.used.set(cluster)?;
                continue;
            }
            report.note(|| {
                format!(
                    "L2[{index}] = {raw:#x} in table {:#x} points at a cluster already in use",
                    table.offset
                )
            });
            // A second reference past the end of the virtual disk maps nothing a guest can
            // read: it is cleared, not copied.
            if !past_end {
                scan.copy_bytes += cs;
            }
            if !fix {
                report.corruptions += 1;
                continue;
            }
            if past_end {
                table.set(index, 0);
            } else {
                // Give this reference its own copy of the data.
                let copy = self.copy_cluster(raw, limit.unwrap_or(0))?;
                table.set(index, copy);
            }
            report.corruptions_fixed += 1;
        }
        Ok(())
    }

    /// Valid data entries of the table at host `offset` as it is on disk.
    fn data_entries_at(&self, offset: u64, end: u64) -> Result<u64> {
        let g = self.geometry;
        let entries = Entries::load(
            &*self.storage,
            offset,
            g.entries_per_table(),
            "read L2 table",
        )?;
        Ok((0..entries.len())
            .filter(|&i| {
                let raw = entries.get(i);
                L2Entry::is_data_value(raw) && self.valid.decode_l2(end, raw).is_ok()
            })
            .count() as u64)
    }

    /// Refuses a repair copy of `bytes` that would take the file past `limit` (a safety net:
    /// the counting pass includes every copy).
    fn reserve_copy(&self, bytes: u64, limit: u64) -> Result<()> {
        let end = self.alloc.end().saturating_add(bytes);
        if end > limit {
            return Err(Error::TooLarge {
                what: "file grown by repair copies",
                bytes: end,
                limit,
            });
        }
        Ok(())
    }

    /// Copies the data cluster at host `from` to a new cluster; returns its offset.
    fn copy_cluster(&self, from: u64, limit: u64) -> Result<u64> {
        let cs = self.geometry.cluster_size();
        self.reserve_copy(cs, limit)?;
        let in_flight = self.alloc.begin();
        let copy = self.allocate(&in_flight, 1)?;
        let mut buf = vec![0u8; cs as usize];
        self.storage
            .read_at(&mut buf, from)
            .map_err(Error::io("read", from))?;
        self.storage
            .write_at(&buf, copy)
            .map_err(Error::io("write", copy))?;
        Ok(copy)
    }

    /// Copies the L2 table at `offset` to fresh clusters and points L1[`l1_index`] there.
    fn relocate_table(
        &self,
        offset: u64,
        l1_index: usize,
        limit: u64,
    ) -> Result<std::sync::Arc<crate::table::L2Table>> {
        let g = self.geometry;
        let from_disk = Entries::load(
            &*self.storage,
            offset,
            g.entries_per_table(),
            "read L2 table",
        )?;
        let entries = Entries::unwritten_copy(&from_disk)?;
        drop(from_disk);
        self.reserve_copy(g.table_bytes(), limit)?;
        let in_flight = self.alloc.begin();
        let new_offset = self.allocate(&in_flight, u64::from(g.table_size()))?;
        Ok(self.tables.relocate(l1_index, entries, new_offset))
    }

    /// Reclaims leaked clusters: moves data clusters from the end of the file into them, slides
    /// the L2 tables above the remaining free space down into it, then truncates the file
    /// after the last cluster in use. Returns how many were reclaimed.
    fn reclaim(&self, scan: &mut Scan) -> Result<u64> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let first = self.valid.header_bytes() / cs;
        let file_clusters = self.alloc.end() / cs;
        let leaked_before = scan.used.count_clear(first, file_clusters);
        // Pair the lowest holes with the highest data clusters above them, a bounded batch at
        // a time (the pairing is monotone: holes rise, sources fall, so each batch resumes
        // where the last one stopped).
        let mut buf = vec![0u8; cs as usize];
        let (mut hole_from, mut source_below) = (first, file_clusters);
        loop {
            let mut moves: Vec<(u64, u64)> = Vec::new();
            let mut done = false;
            {
                let used = &scan.used;
                let metadata = &scan.metadata;
                let mut sources = used
                    .set_bits_down(first, source_below)
                    .filter(|&c| !metadata.get(c));
                let mut holes = used.clear_bits(hole_from, used.end());
                while moves.len() < MOVE_BATCH {
                    match (holes.next(), sources.next()) {
                        (Some(hole), Some(source)) if source > hole => moves.push((source, hole)),
                        _ => {
                            done = true;
                            break;
                        }
                    }
                }
            }
            let Some(&(last_source, last_hole)) = moves.last() else {
                break;
            };
            (hole_from, source_below) = (last_hole + 1, last_source);
            self.move_data(scan, &moves, &mut buf)?;
            for &(source, hole) in &moves {
                scan.used.set(hole)?;
                scan.used.clear(source);
            }
            if done {
                break;
            }
        }
        // Barrier (write-back): the moved data and the entries leading to it are durable, so
        // the vacated clusters are free on disk too.
        self.write_back()?;
        self.slide_tables(scan)?;
        let expected_end = self.alloc.end();
        let last = scan.used.end().min(expected_end / cs);
        let truncated = self.truncate_free_tail(expected_end, last * cs)?;
        // Whatever leak is left inside the file gives its space back to the file system.
        let stop = if truncated { last } else { expected_end / cs };
        let mut left = 0u64;
        let mut run: Option<(u64, u64)> = None;
        let punch = |(start, end): (u64, u64)| {
            let at = start * cs;
            self.storage
                .punch_hole(at, (end - start) * cs)
                .map_err(Error::io("punch hole", at))
        };
        for cluster in scan.used.clear_bits(first, stop) {
            left += 1;
            run = match run {
                Some((start, end)) if end == cluster => Some((start, end + 1)),
                Some(whole) => {
                    punch(whole)?;
                    Some((cluster, cluster + 1))
                }
                None => Some((cluster, cluster + 1)),
            };
        }
        if let Some(whole) = run {
            punch(whole)?;
        }
        Ok(leaked_before.saturating_sub(left))
    }

    /// Copies the data of each `(source, hole)` cluster pair into the hole and points the
    /// entry that referenced the source there. Only leaked clusters are written to: a vacated
    /// one may be referenced on disk until the next write-back.
    fn move_data(&self, scan: &Scan, moves: &[(u64, u64)], buf: &mut [u8]) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let targets: HashMap<u64, u64> = moves.iter().copied().collect();
        for &(l1_index, _) in &scan.tables {
            let Some(table) = self.l2_table_owned(l1_index)? else {
                continue;
            };
            for index in 0..table.entries.len() {
                let raw = table.entries.get(index);
                if !L2Entry::is_data_value(raw) {
                    continue;
                }
                let Some(&hole) = targets.get(&(raw / cs)) else {
                    continue;
                };
                let to = hole * cs;
                self.storage
                    .read_at(buf, raw)
                    .map_err(Error::io("read", raw))?;
                self.storage
                    .write_at(buf, to)
                    .map_err(Error::io("write", to))?;
                table.set(index, to);
            }
            drop(table);
            self.relieve_pressure()?;
        }
        Ok(())
    }

    /// Moves the L2 tables that lie above the lowest free cluster down into the free space,
    /// in offset order, so that all free space ends up at the end of the file. Every cluster
    /// written to is free on disk: a table whose target overlaps its own clusters is first
    /// copied past the end of the file.
    fn slide_tables(&self, scan: &mut Scan) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let ts = u64::from(g.table_size());
        let l1_first = self.valid.header().l1_table_offset / cs;
        let floor = (self.valid.header_bytes() / cs).max(l1_first + ts);
        let file_clusters = self.alloc.end() / cs;
        let Some(mut next) = scan.used.clear_bits(floor, file_clusters).next() else {
            return Ok(());
        };
        let mut movers: Vec<(u64, usize)> = scan
            .tables
            .iter()
            .map(|&(l1_index, offset)| (offset / cs, l1_index))
            .filter(|&(first, _)| first > next)
            .collect();
        movers.sort_unstable();
        let mark = |scan: &mut Scan, first: u64, used: bool| -> Result<()> {
            for c in first..first + ts {
                if used {
                    scan.used.set(c)?;
                    scan.metadata.set(c)?;
                } else {
                    scan.used.clear(c);
                    scan.metadata.clear(c);
                }
            }
            Ok(())
        };
        for (mut first, l1_index) in movers {
            if first < next + ts {
                let in_flight = self.alloc.begin();
                let temp = self.allocate(&in_flight, ts)? / cs;
                drop(in_flight);
                self.move_table(l1_index, temp * cs)?;
                mark(scan, first, false)?;
                mark(scan, temp, true)?;
                first = temp;
            }
            self.move_table(l1_index, next * cs)?;
            mark(scan, first, false)?;
            mark(scan, next, true)?;
            next += ts;
        }
        Ok(())
    }

    /// Copies the table of `l1_index` to `offset`, points the L1 entry at the copy and writes
    /// back: when this returns, the copy is what the disk leads to and the old clusters are
    /// free.
    fn move_table(&self, l1_index: usize, offset: u64) -> Result<()> {
        let table = self
            .l2_table_owned(l1_index)?
            .ok_or_else(|| Error::InvalidArgument("moving a table that is gone".into()))?;
        let entries = Entries::unwritten_copy(&table.entries)?;
        drop(table);
        self.tables.relocate(l1_index, entries, offset);
        self.write_back()
    }
}

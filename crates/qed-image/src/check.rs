//! Consistency check and repair: one scan of the L1 table and every L2 table.
//!
//! The scan records which table or entry owns each host cluster. It reports what
//! `qemu-img check` reports — corruptions, leaks, check errors, allocated and fragmented
//! clusters — with exact counts (QEMU's leak count is skewed by a division by
//! `cluster_size − 1`), plus the image end offset.
//!
//! Repair goes further than QEMU: invalid entries are cleared; a cluster referenced twice is
//! copied so that every reference owns its data; leaked clusters are reclaimed by moving data
//! clusters from the end of the file into them, sliding L2 tables down into the rest, and
//! truncating the file behind the last cluster in use. Every change goes through the normal write-back, so a crash during repair
//! leaves an image that another repair fixes.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use qed_format::{L1Entry, L2Entry};

use crate::image::Inner;
use crate::table::{Entries, L2Table};
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
/// the file by its own length, or by this much if that is more. An image whose references
/// all alias one cluster would otherwise make a repair write gigabytes.
const MIN_REPAIR_GROWTH: u64 = 64 << 20;

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

/// Who owns a host cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Free,
    Metadata,
    /// Data cluster of guest cluster (L1 index, L2 index).
    Data(usize, usize),
}

struct InFlight<'a>(&'a Inner);

impl<'a> InFlight<'a> {
    fn enter(inner: &'a Inner) -> Self {
        inner.allocations_in_flight.fetch_add(1, Ordering::AcqRel);
        Self(inner)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.allocations_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Scan {
    owners: Vec<Owner>,
    /// Tables scanned, by L1 index.
    tables: HashMap<usize, Arc<L2Table>>,
}

impl Image {
    /// Checks the image and repairs what `repair` allows. On a writable image, metadata is
    /// written back first so the check sees what is on disk. The image should not be written
    /// by other threads while it is checked.
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        if repair != Repair::None && !self.inner.writable {
            return Err(Error::ReadOnly);
        }
        self.inner.check(repair)
    }
}

impl Inner {
    pub(crate) fn check(&self, repair: Repair) -> Result<CheckReport> {
        // Counted as an allocation in flight: the idle timer must not clear NEED_CHECK while
        // a repair is half done.
        let busy = InFlight::enter(self);
        let mut report = self.check_inner(repair)?;
        drop(busy);
        if repair != Repair::None && report.corruptions == 0 && report.check_errors == 0 {
            self.mark_clean()?;
        }
        report.image_end_offset = self.storage.len().map_err(Error::io("length", 0))?;
        Ok(report)
    }

    fn check_inner(&self, repair: Repair) -> Result<CheckReport> {
        self.write_back()?;
        let mut report = CheckReport::default();
        let cs = self.geometry.cluster_size();
        report.total_clusters = self.size.load(Ordering::Acquire).div_ceil(cs);
        let fix = repair != Repair::None;
        let mut scan = self.scan(&mut report, fix)?;
        if fix && report.corruptions_fixed > 0 {
            // Repairs moved and copied clusters: look again so leaks are counted on the
            // repaired image.
            self.write_back()?;
            scan = self.scan(&mut CheckReport::default(), false)?;
        }
        let leaked: Vec<u64> = scan
            .owners
            .iter()
            .enumerate()
            .skip((self.valid.header_bytes() / cs) as usize)
            .filter(|(_, o)| **o == Owner::Free)
            .map(|(i, _)| i as u64)
            .collect();
        if report.check_errors == 0 {
            if fix && !leaked.is_empty() {
                report.leaks_fixed = self.reclaim(&scan, &leaked)?;
                report.leaks = leaked.len() as u64 - report.leaks_fixed;
            } else {
                report.leaks = leaked.len() as u64;
            }
        }
        Ok(report)
    }

    fn scan(&self, report: &mut CheckReport, fix: bool) -> Result<Scan> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let end = self.next_free.load(Ordering::Acquire);
        let nclusters = (end / cs) as usize;
        let mut owners = vec![Owner::Free; nclusters];
        let header_clusters = (self.valid.header_bytes() / cs) as usize;
        for o in owners.iter_mut().take(header_clusters) {
            *o = Owner::Metadata;
        }
        let ts = u64::from(g.table_size());
        let l1_offset = self.valid.header().l1_table_offset;
        for c in 0..ts {
            if let Some(o) = owners.get_mut((l1_offset / cs + c) as usize) {
                *o = Owner::Metadata;
            }
        }
        let copy_limit = end.saturating_add(end.max(MIN_REPAIR_GROWTH));
        let mut tables = HashMap::new();
        for l1_index in 0..self.l1.len() {
            let raw = self.l1.get(l1_index);
            let offset = match L1Entry::decode(raw, &g) {
                Ok(L1Entry::Unallocated) => continue,
                Ok(L1Entry::Table(off)) if self.valid.check_l2_offset(end, off).is_ok() => off,
                _ => {
                    report
                        .note(|| format!("L1[{l1_index}] = {raw:#x} is not a valid table offset"));
                    if fix {
                        self.l1.set(l1_index, 0);
                        report.corruptions_fixed += 1;
                    } else {
                        report.corruptions += 1;
                    }
                    continue;
                }
            };
            let first = (offset / cs) as usize;
            let taken = (first..first + ts as usize)
                .filter(|&c| owners[c] != Owner::Free)
                .count() as u64;
            let table = if taken > 0 {
                report.note(|| {
                    format!("L2 table at {offset:#x} (L1[{l1_index}]) overlaps clusters in use")
                });
                if !fix {
                    report.corruptions += taken;
                    continue;
                }
                self.reserve_copy(g.table_bytes(), copy_limit)?;
                match self.relocate_table(offset, l1_index) {
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
                for o in &mut owners[first..first + ts as usize] {
                    *o = Owner::Metadata;
                }
                match self.l2_table(l1_index) {
                    Ok(Some(table)) => table,
                    Ok(None) => continue,
                    Err(e) => {
                        report.note(|| format!("L2 table at {offset:#x} could not be read: {e}"));
                        report.check_errors += 1;
                        continue;
                    }
                }
            };
            self.scan_table(&table, l1_index, &mut owners, report, fix, copy_limit)?;
            tables.insert(l1_index, table);
        }
        Ok(Scan { owners, tables })
    }

    fn scan_table(
        &self,
        table: &L2Table,
        l1_index: usize,
        owners: &mut [Owner],
        report: &mut CheckReport,
        fix: bool,
        copy_limit: u64,
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        // The file as it was when the scan began: copies made by this repair lie past it, and
        // an entry pointing there is as invalid as it was before the copy was made.
        let end = owners.len() as u64 * cs;
        let mut previous: Option<u64> = None;
        for index in 0..table.entries.len() {
            let raw = table.entries.get(index);
            if raw <= 1 {
                continue;
            }
            report.allocated_clusters += 1;
            if previous.is_some_and(|p| p.wrapping_add(cs) != raw) {
                report.fragmented_clusters += 1;
            }
            previous = Some(raw);
            let valid = matches!(L2Entry::decode(raw, &g), Ok(L2Entry::Data { host_offset: off })
                if self.valid.is_valid_data_offset(end, off));
            if !valid {
                report.note(|| {
                    format!(
                        "L2[{index}] = {raw:#x} in table {:#x} is not a valid data offset",
                        table.offset
                    )
                });
                if fix {
                    table.entries.set(index, 0);
                    report.corruptions_fixed += 1;
                } else {
                    report.corruptions += 1;
                }
                continue;
            }
            let cluster = (raw / cs) as usize;
            match owners.get(cluster).copied() {
                Some(Owner::Free) => owners[cluster] = Owner::Data(l1_index, index),
                Some(_) => {
                    report.note(|| {
                        format!("L2[{index}] = {raw:#x} in table {:#x} points at a cluster already in use", table.offset)
                    });
                    if !fix {
                        report.corruptions += 1;
                        continue;
                    }
                    // Give this reference its own copy of the data.
                    self.reserve_copy(cs, copy_limit)?;
                    let copy = self.allocate(1)?;
                    let mut buf = vec![0u8; cs as usize];
                    self.storage
                        .read_at(&mut buf, raw)
                        .map_err(Error::io("read", raw))?;
                    self.storage
                        .write_at(&buf, copy)
                        .map_err(Error::io("write", copy))?;
                    table.entries.set(index, copy);
                    report.corruptions_fixed += 1;
                }
                // Cannot happen: validity bounds the offset by the scanned area.
                None => {}
            }
        }
        Ok(())
    }

    /// Refuses a repair copy of `bytes` that would take the file past `limit`.
    fn reserve_copy(&self, bytes: u64, limit: u64) -> Result<()> {
        let end = self.next_free.load(Ordering::Acquire).saturating_add(bytes);
        if end > limit {
            return Err(Error::TooLarge {
                what: "file grown by repair copies",
                bytes: end,
                limit,
            });
        }
        Ok(())
    }

    /// Copies the L2 table at `offset` to fresh clusters and points L1[`l1_index`] there.
    fn relocate_table(&self, offset: u64, l1_index: usize) -> Result<Arc<L2Table>> {
        let mut bytes = vec![0u8; self.geometry.table_bytes() as usize];
        self.storage
            .read_at(&mut bytes, offset)
            .map_err(Error::io("read L2 table", offset))?;
        let new_offset = self.allocate(u64::from(self.geometry.table_size()))?;
        let entries = Entries::new_unwritten(self.geometry.entries_per_table());
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            entries.set(i, u64::from_le_bytes(b));
        }
        let table = self.cache.insert_new(L2Table::new(new_offset, entries));
        self.l1.set(l1_index, new_offset);
        Ok(table)
    }

    /// Reclaims leaked clusters: moves data clusters from the end of the file into them, slides
    /// the L2 tables above the remaining free space down into it, then truncates the file
    /// after the last cluster in use. Returns how many were reclaimed.
    fn reclaim(&self, scan: &Scan, leaked: &[u64]) -> Result<u64> {
        let cs = self.geometry.cluster_size();
        let mut owners = scan.owners.clone();
        // Move data from the highest data clusters into the lowest holes. Only leaked clusters
        // are written to: a vacated one may be referenced on disk until the next write-back.
        let mut source = owners.len();
        for &hole in leaked {
            let mut found = None;
            while source > hole as usize + 1 {
                source -= 1;
                if let Owner::Data(l1_index, index) = owners[source] {
                    found = Some((l1_index, index));
                    break;
                }
            }
            let Some((l1_index, index)) = found else {
                break;
            };
            let Some(table) = scan.tables.get(&l1_index) else {
                break;
            };
            let from = source as u64 * cs;
            let to = hole * cs;
            let mut buf = vec![0u8; cs as usize];
            self.storage
                .read_at(&mut buf, from)
                .map_err(Error::io("read", from))?;
            self.storage
                .write_at(&buf, to)
                .map_err(Error::io("write", to))?;
            table.entries.set(index, to);
            owners[hole as usize] = owners[source];
            owners[source] = Owner::Free;
        }
        // Barrier (write-back): the moved data and the entries leading to it are durable, so
        // the vacated clusters are free on disk too.
        self.write_back()?;
        self.slide_tables(scan, &mut owners)?;
        let mut last = owners.len();
        while last > 0 && owners[last - 1] == Owner::Free {
            last -= 1;
        }
        let new_end = last as u64 * cs;
        let reclaimed_tail = {
            let _growing = self.file_growth.lock().unwrap_or_else(|e| e.into_inner());
            let old_end = self.next_free.load(Ordering::Acquire);
            if new_end < old_end && old_end == owners.len() as u64 * cs {
                self.storage
                    .set_len(new_end)
                    .map_err(Error::io("truncate", new_end))?;
                self.storage.flush().map_err(Error::io("flush", 0))?;
                self.next_free.store(new_end, Ordering::Release);
                self.fresh_from.fetch_min(new_end, Ordering::AcqRel);
                true
            } else {
                false
            }
        };
        // Whatever leak is left inside the file gives its space back to the file system.
        let mut fixed = 0;
        for &cluster in leaked {
            if reclaimed_tail && cluster as usize >= last {
                fixed += 1;
            } else if owners[cluster as usize] != Owner::Free {
                // A moved data cluster now fills this hole.
                fixed += 1;
            } else {
                let at = cluster * cs;
                self.storage
                    .punch_hole(at, cs)
                    .map_err(Error::io("punch hole", at))?;
            }
        }
        Ok(fixed)
    }

    /// Moves the L2 tables that lie above the lowest free cluster down into the free space,
    /// in offset order, so that all free space ends up at the end of the file. Every cluster
    /// written to is free on disk: a table whose target overlaps its own clusters is first
    /// copied past the end of the file.
    fn slide_tables(&self, scan: &Scan, owners: &mut Vec<Owner>) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let ts = u64::from(self.geometry.table_size());
        if self.next_free.load(Ordering::Acquire) != owners.len() as u64 * cs {
            return Ok(());
        }
        // The header and the L1 table stay where they are.
        let l1_first = self.valid.header().l1_table_offset / cs;
        let floor = (self.valid.header_bytes() / cs).max(l1_first + ts);
        let Some(mut next) =
            (floor..owners.len() as u64).find(|&c| owners[c as usize] == Owner::Free)
        else {
            return Ok(());
        };
        let mut movers: Vec<(u64, usize, Arc<L2Table>)> = scan
            .tables
            .iter()
            .filter(|(_, t)| t.offset / cs > next)
            .map(|(&l1_index, t)| (t.offset / cs, l1_index, t.clone()))
            .collect();
        movers.sort_by_key(|m| m.0);
        let mark = |owners: &mut [Owner], first: u64, owner: Owner| {
            for o in &mut owners[first as usize..(first + ts) as usize] {
                *o = owner;
            }
        };
        for (mut first, l1_index, mut table) in movers {
            if first < next + ts {
                let temp = self.allocate(ts)? / cs;
                owners.resize((temp + ts) as usize, Owner::Free);
                table = self.move_table(&table, l1_index, temp * cs)?;
                mark(owners, first, Owner::Free);
                mark(owners, temp, Owner::Metadata);
                first = temp;
            }
            self.move_table(&table, l1_index, next * cs)?;
            mark(owners, first, Owner::Free);
            mark(owners, next, Owner::Metadata);
            next += ts;
        }
        Ok(())
    }

    /// Copies `table` to `offset`, points L1[`l1_index`] at the copy and writes back: when
    /// this returns, the copy is what the disk leads to and the old clusters are free.
    fn move_table(&self, table: &L2Table, l1_index: usize, offset: u64) -> Result<Arc<L2Table>> {
        let entries = Entries::new_unwritten(table.entries.len());
        for i in 0..table.entries.len() {
            entries.set(i, table.entries.get(i));
        }
        let moved = self.cache.insert_new(L2Table::new(offset, entries));
        self.l1.set(l1_index, offset);
        self.write_back()?;
        self.cache.remove(table.offset);
        Ok(moved)
    }
}

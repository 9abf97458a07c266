//! The guest I/O paths: read, write, write zeroes, discard.
//!
//! Requests are split at L2-table boundaries; inside a table, runs of clusters of one kind are
//! handled together. Allocation claims the affected L2 entries (other writers of those
//! clusters wait), writes the data, then publishes the entries in memory; tables reach the
//! disk at the next write-back (see `writeback.rs`).

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use qed_format::{L2Entry, ZERO_CLUSTER_ENTRY};

use crate::image::Inner;
use crate::table::{Entries, L2Table};
use crate::{Error, Image, Result, TableKind};

thread_local! {
    /// Scratch space for copy-on-write of partial clusters, reused across requests.
    static COW_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Where one guest cluster lives, from its (validated) L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Unallocated,
    Zero,
    Data(u64),
}

fn is_data(raw: u64) -> bool {
    raw > ZERO_CLUSTER_ENTRY
}

impl Image {
    /// Reads `buf.len()` guest bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    /// Writes `buf` at guest `offset`, allocating clusters as needed.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)
    }

    /// Makes `[offset, offset + len)` read as zeros. Whole clusters become zero clusters (or
    /// keep their allocation with the host range punched out); unaligned head and tail are
    /// written as data.
    pub fn write_zeroes_at(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes_at(offset, len)
    }

    /// Drops the data of every whole cluster in `[offset, offset + len)`: the entry becomes
    /// unallocated (no backing file) or a zero cluster (so backing data does not reappear);
    /// either way the guest reads zeros there. The host space is punched out; the cluster
    /// stays in the file until a repair reclaims it. Partial clusters are left alone.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)
    }
}

impl Inner {
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size.load(Ordering::Acquire);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        Ok(())
    }

    /// Bytes from `pos` to the end of the L2 table that maps it, capped at `len`.
    fn table_chunk(&self, pos: u64, len: u64) -> u64 {
        let coverage = self.geometry.l2_coverage();
        (coverage - (pos & (coverage - 1))).min(len)
    }

    /// The cached or loaded L2 table for L1 entry `l1_index`, if it has one.
    pub(crate) fn l2_table(&self, l1_index: usize) -> Result<Option<Arc<L2Table>>> {
        let Some(offset) = self.l2_offset(l1_index)? else {
            return Ok(None);
        };
        loop {
            let token = match self.cache.lookup(offset) {
                crate::cache::Lookup::Hit(table) => return Ok(Some(table)),
                crate::cache::Lookup::Miss(token) => token,
            };
            let mut bytes = vec![0u8; self.geometry.table_bytes() as usize];
            self.storage
                .read_at(&mut bytes, offset)
                .map_err(Error::io("read L2 table", offset))?;
            let table = L2Table::new(offset, Entries::from_le_bytes(&bytes));
            if let Some(table) = self.cache.insert(table, token) {
                return Ok(Some(table));
            }
        }
    }

    /// Like [`Inner::l2_table`], creating an empty table when the L1 entry is unallocated.
    fn l2_table_for_write(&self, l1_index: usize) -> Result<Arc<L2Table>> {
        if let Some(table) = self.l2_table(l1_index)? {
            return Ok(table);
        }
        let table = {
            let _creating = self
                .table_creation
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(table) = self.l2_table(l1_index)? {
                return Ok(table);
            }
            let offset = self.allocate(u64::from(self.geometry.table_size()))?;
            let entries = Entries::new_unwritten(self.geometry.entries_per_table());
            let table = self.cache.insert_new(L2Table::new(offset, entries));
            // The table is pinned in the cache (dirty) before the L1 entry can lead to it.
            self.l1.set(l1_index, offset);
            self.generation.fetch_add(1, Ordering::AcqRel);
            table
        };
        if self.cache.dirty_bytes() > self.cache_budget {
            // Cache pressure: write tables back so they can be evicted.
            self.write_back()?;
        }
        Ok(table)
    }

    /// Reserves `clusters` contiguous clusters at the end of the file.
    ///
    /// The first allocation of a dirty period sets NEED_CHECK and flushes it before any
    /// cluster is handed out, so that whatever the new clusters receive before the next
    /// write-back (leaks after a crash) is found by the check at the next open.
    pub(crate) fn allocate(&self, clusters: u64) -> Result<u64> {
        let _growing = self.file_growth.lock().unwrap_or_else(|e| e.into_inner());
        if !self.need_check_on_disk.load(Ordering::Acquire) {
            self.write_need_check(true)?;
            self.storage
                .flush()
                .map_err(Error::io("flush after setting NEED_CHECK", 0))?;
        }
        Ok(self
            .next_free
            .fetch_add(clusters * self.geometry.cluster_size(), Ordering::AcqRel))
    }

    /// Decodes and validates the entry at `index` of `table`.
    pub(crate) fn slot(&self, table: &L2Table, index: usize) -> Result<Slot> {
        let raw = table.entries.get(index);
        let corrupt = |reason| Error::Corrupt {
            table: TableKind::L2,
            table_offset: table.offset,
            index,
            value: raw,
            reason,
        };
        match L2Entry::decode(raw, &self.geometry) {
            Ok(L2Entry::Unallocated) => Ok(Slot::Unallocated),
            Ok(L2Entry::Zero) => Ok(Slot::Zero),
            Ok(L2Entry::Data { host_offset: off }) => {
                if self
                    .valid
                    .is_valid_data_offset(self.next_free.load(Ordering::Acquire), off)
                {
                    Ok(Slot::Data(off))
                } else {
                    Err(corrupt("points outside the file or into the header"))
                }
            }
            Err(_) => Err(corrupt("is not aligned to the cluster size")),
        }
    }

    /// Extends a run starting with `first` at guest `pos` over following clusters of the same
    /// kind (data runs must be contiguous on the host); returns the run's guest end (≤ `end`).
    pub(crate) fn run_end(&self, table: &L2Table, pos: u64, end: u64, first: Slot) -> Result<u64> {
        let cs = self.geometry.cluster_size();
        let mut run_end = (self.geometry.align_down(pos) + cs).min(end);
        let mut index = self.geometry.l2_index(pos);
        while run_end < end {
            index += 1;
            // An invalid entry ends the run; the error is reported when the caller reaches it.
            let Ok(next) = self.slot(table, index) else {
                break;
            };
            let same = match (first, next) {
                (Slot::Data(a), Slot::Data(b)) => {
                    b == a + (run_end - self.geometry.align_down(pos))
                }
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            run_end = (run_end + cs).min(end);
        }
        Ok(run_end)
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = self.table_chunk(pos, (buf.len() - done) as u64) as usize;
            let chunk = &mut buf[done..done + n];
            match self.l2_table(self.geometry.l1_index(pos))? {
                None => self.read_unallocated(chunk, pos)?,
                Some(table) => self.read_in_table(&table, chunk, pos)?,
            }
            done += n;
        }
        Ok(())
    }

    fn read_unallocated(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        match &self.backing {
            Some(backing) => backing.read_at(buf, pos),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn read_in_table(&self, table: &L2Table, buf: &mut [u8], pos: u64) -> Result<()> {
        let end = pos + buf.len() as u64;
        let mut p = pos;
        while p < end {
            let slot = self.slot(table, self.geometry.l2_index(p))?;
            let run_end = self.run_end(table, p, end, slot)?;
            let part = &mut buf[(p - pos) as usize..(run_end - pos) as usize];
            match slot {
                Slot::Data(host) => {
                    let at = host + self.geometry.offset_in_cluster(p);
                    self.storage
                        .read_at(part, at)
                        .map_err(Error::io("read", at))?;
                }
                Slot::Zero => part.fill(0),
                Slot::Unallocated => self.read_unallocated(part, p)?,
            }
            p = run_end;
        }
        Ok(())
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = self.table_chunk(pos, (buf.len() - done) as u64) as usize;
            let table = self.l2_table_for_write(self.geometry.l1_index(pos))?;
            self.write_in_table(&table, &buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    fn write_in_table(&self, table: &L2Table, data: &[u8], pos: u64) -> Result<()> {
        let end = pos + data.len() as u64;
        let mut p = pos;
        while p < end {
            let slot = self.slot(table, self.geometry.l2_index(p))?;
            if let Slot::Data(host) = slot {
                let run_end = self.run_end(table, p, end, slot)?;
                let at = host + self.geometry.offset_in_cluster(p);
                self.storage
                    .write_at(&data[(p - pos) as usize..(run_end - pos) as usize], at)
                    .map_err(Error::io("write", at))?;
                p = run_end;
                continue;
            }
            p = self.allocate_run(table, &data[(p - pos) as usize..], p)?;
        }
        Ok(())
    }

    /// Allocates fresh clusters for the run of unallocated or zero clusters starting at guest
    /// `pos` and writes `data` (which may extend past the run) there. Returns the guest
    /// offset up to which data was written; it equals `pos` if another writer allocated the
    /// first cluster meanwhile (the caller then writes in place).
    fn allocate_run(&self, table: &L2Table, data: &[u8], pos: u64) -> Result<u64> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let end = pos + data.len() as u64;
        let first = g.l2_index(pos);
        let last = g.l2_index(end - 1);
        let mut wanted = 1;
        while first + wanted <= last && !is_data(table.entries.get(first + wanted)) {
            wanted += 1;
        }
        let claim = table.claim(first..first + wanted, |entries| {
            let n = (0..wanted)
                .take_while(|&i| !is_data(entries.get(first + i)))
                .count();
            (n > 0).then(|| {
                let old = (entries.get(first), entries.get(first + n - 1));
                (first..first + n, old)
            })
        });
        let Some((range, (head_old, tail_old))) = claim else {
            return Ok(pos);
        };
        self.allocations_in_flight.fetch_add(1, Ordering::AcqRel);
        let clusters = range.len() as u64;
        let host = match self.allocate(clusters) {
            Ok(host) => host,
            Err(e) => {
                table.settle(range, None);
                self.allocations_in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(e);
            }
        };
        let run_start = g.align_down(pos);
        let written_end = (run_start + clusters * cs).min(end);
        let result = self.write_new_clusters(
            host,
            run_start,
            clusters,
            &data[..(written_end - pos) as usize],
            pos,
            (head_old, tail_old),
        );
        let start = range.start;
        let value = move |i: usize| host + (i - start) as u64 * cs;
        table.settle(
            range,
            result.is_ok().then_some(&value as &dyn Fn(usize) -> u64),
        );
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.allocations_in_flight.fetch_sub(1, Ordering::AcqRel);
        result?;
        Ok(written_end)
    }

    /// Fills `clusters` new host clusters at `host` for the guest run starting at `run_start`:
    /// the untouched head and tail come from the old contents (backing data for unallocated
    /// clusters, zeros for zero clusters), the middle is `data` at guest `pos`.
    fn write_new_clusters(
        &self,
        host: u64,
        run_start: u64,
        clusters: u64,
        data: &[u8],
        pos: u64,
        (head_old, tail_old): (u64, u64),
    ) -> Result<()> {
        let run_end = run_start + clusters * self.geometry.cluster_size();
        let data_end = pos + data.len() as u64;
        if pos > run_start {
            self.copy_on_write(host, run_start, pos - run_start, head_old)?;
        }
        let at = host + (pos - run_start);
        self.storage
            .write_at(data, at)
            .map_err(Error::io("write", at))?;
        if data_end < run_end {
            self.copy_on_write(
                host + (data_end - run_start),
                data_end,
                run_end - data_end,
                tail_old,
            )?;
        }
        Ok(())
    }

    /// Writes the old contents of guest `[guest, guest + len)` to a new cluster at `host`.
    fn copy_on_write(&self, host: u64, guest: u64, len: u64, old_entry: u64) -> Result<()> {
        // A zero cluster's untouched bytes stay zero (the spec; QEMU copies backing data).
        let backing = match &self.backing {
            Some(b) if old_entry == 0 && guest < b.size() => Some(b),
            _ => None,
        };
        if backing.is_none() && host >= self.fresh_from.load(Ordering::Acquire) {
            // Never-written space past the original end of the file already reads as zeros.
            return Ok(());
        }
        COW_BUFFER.with(|cell| {
            let mut buf = cell.borrow_mut();
            buf.clear();
            buf.resize(len as usize, 0);
            if let Some(backing) = backing {
                backing.read_at(&mut buf, guest)?;
            }
            self.storage
                .write_at(&buf, host)
                .map_err(Error::io("write", host))
        })
    }

    pub(crate) fn write_zeroes_at(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let g = self.geometry;
        let end = offset + len;
        let aligned_start = g.align_up(offset).min(end);
        let aligned_end = g.align_down(end).max(aligned_start);
        let zeros = |from: u64, to: u64| -> Result<()> {
            if from < to {
                self.write_at(&vec![0u8; (to - from) as usize], from)?;
            }
            Ok(())
        };
        zeros(offset, aligned_start)?;
        let mut p = aligned_start;
        while p < aligned_end {
            let n = self.table_chunk(p, aligned_end - p);
            let table = self.l2_table_for_write(g.l1_index(p))?;
            self.zero_clusters(&table, p, p + n)?;
            p += n;
        }
        zeros(aligned_end.max(aligned_start), end)
    }

    /// Makes the whole clusters `[pos, end)` of one table read as zeros.
    fn zero_clusters(&self, table: &L2Table, pos: u64, end: u64) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let mut p = pos;
        while p < end {
            let index = self.geometry.l2_index(p);
            match self.slot(table, index)? {
                Slot::Zero => p += cs,
                Slot::Data(host) => {
                    // The cluster stays allocated (as in QEMU); its host range becomes zeros.
                    let run_end = self.run_end(table, p, end, Slot::Data(host))?;
                    self.storage
                        .punch_hole(host, run_end - p)
                        .map_err(Error::io("punch hole", host))?;
                    p = run_end;
                }
                Slot::Unallocated => {
                    let wanted = ((end - p) / cs) as usize;
                    let claim = table.claim(index..index + wanted, |entries| {
                        let n = (0..wanted)
                            .take_while(|&i| entries.get(index + i) == 0)
                            .count();
                        (n > 0).then_some((index..index + n, ()))
                    });
                    if let Some((range, ())) = claim {
                        p += range.len() as u64 * cs;
                        table.settle(range, Some(&|_| ZERO_CLUSTER_ENTRY));
                        self.generation.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let g = self.geometry;
        let size = self.size.load(Ordering::Acquire);
        let end = offset + len;
        // The last cluster counts as whole when the request reaches the end of the disk.
        let end = if end == size {
            g.align_up(end)
        } else {
            g.align_down(end)
        };
        let mut p = g.align_up(offset);
        let cs = g.cluster_size();
        // Unallocated clusters over backing data must become zero clusters as well.
        let backing_end = self.backing.as_ref().map_or(0, |b| b.size());
        while p < end {
            let n = self.table_chunk(p, end - p);
            let table = if p < backing_end {
                Some(self.l2_table_for_write(g.l1_index(p))?)
            } else {
                self.l2_table(g.l1_index(p))?
            };
            if let Some(table) = table {
                let mut q = p;
                while q < p + n {
                    let index = g.l2_index(q);
                    match self.slot(&table, index)? {
                        Slot::Data(_) => self.discard_cluster(&table, index)?,
                        Slot::Unallocated if q < backing_end => self.hide_backing(&table, index),
                        _ => {}
                    }
                    q += cs;
                }
            }
            p += n;
        }
        Ok(())
    }

    /// Turns the unallocated entry at `index` into a zero cluster, so backing data no longer
    /// shows through.
    fn hide_backing(&self, table: &L2Table, index: usize) {
        let claim = table.claim(index..index + 1, |entries| {
            (entries.get(index) == 0).then_some((index..index + 1, ()))
        });
        if let Some((range, ())) = claim {
            table.settle(range, Some(&|_| ZERO_CLUSTER_ENTRY));
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn discard_cluster(&self, table: &L2Table, index: usize) -> Result<()> {
        let replacement = if self.backing.is_some() {
            ZERO_CLUSTER_ENTRY
        } else {
            0
        };
        let claim = table.claim(index..index + 1, |entries| {
            let raw = entries.get(index);
            is_data(raw).then_some((index..index + 1, raw))
        });
        let Some((range, host)) = claim else {
            return Ok(());
        };
        table.settle(range, Some(&|_| replacement));
        self.generation.fetch_add(1, Ordering::AcqRel);
        // The entry no longer leads here; give the space back to the file system.
        self.storage
            .punch_hole(host, self.geometry.cluster_size())
            .map_err(Error::io("punch hole", host))
    }
}

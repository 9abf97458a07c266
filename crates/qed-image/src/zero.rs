//! Write-zeroes and discard.
//!
//! Neither ever drops an allocated cluster: a data cluster keeps its entry and its host range
//! is zeroed or punched, so the image has no leak by anyone's count (`qemu-img check`
//! included) and no cluster is reused while a reader may still hold its old host offset.
//! Whole unallocated clusters become zero clusters (as in QEMU).

use qed_format::{L2Entry, ZERO_CLUSTER_ENTRY};

use crate::state::Shared;
use crate::table::L2Table;
use crate::{Error, Result};

/// How [`crate::Image::write_zeroes_with`] may make a range read as zeros.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Host space of data clusters may be given back (punched) instead of zeroed in place.
    pub may_unmap: bool,
    /// Fail with [`Error::NotFast`] instead of writing zeros as data (NBD's FAST_ZERO).
    pub fast_only: bool,
}

/// What happens to one cluster's range.
enum Zeroing {
    /// It reads zeros already.
    Nothing,
    /// Zero (or punch) the host range of a data cluster.
    Host(u64),
    /// Make it a zero cluster (whole clusters over backing data).
    ZeroEntry,
    /// Write zeros as data (part of a cluster whose old contents show through).
    Data,
}

impl Shared {
    pub(crate) fn write_zeroes_at(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let end = offset + len;
        if flags.fast_only {
            // Fail before anything changes: NBD's FAST_ZERO leaves the disk alone on failure.
            let mut p = offset;
            while p < end {
                let cluster = g.align_down(p);
                let part_end = (cluster + cs).min(end);
                let whole = p == cluster && part_end == cluster + cs;
                if matches!(self.zeroing(p, whole)?, Zeroing::Data) {
                    return Err(Error::NotFast { offset: p });
                }
                p = part_end;
            }
        }
        let mut p = offset;
        while p < end {
            let cluster = g.align_down(p);
            let part_end = (cluster + cs).min(end);
            let whole = p == cluster && part_end == cluster + cs;
            match self.zeroing(p, whole)? {
                Zeroing::Nothing => {}
                Zeroing::Host(host) => {
                    let at = host + (p - cluster);
                    let n = part_end - p;
                    let result = if flags.may_unmap && whole {
                        self.storage.punch_hole(at, n)
                    } else {
                        self.storage.write_zeroes(at, n)
                    };
                    result.map_err(Error::io("write zeroes", at))?;
                }
                Zeroing::ZeroEntry => self.set_zero_entry(p)?,
                Zeroing::Data => {
                    if flags.fast_only {
                        return Err(Error::NotFast { offset: p });
                    }
                    let zeros = &crate::storage::ZERO_BLOCK;
                    let mut q = p;
                    while q < part_end {
                        let n = (part_end - q).min(zeros.len() as u64);
                        self.write_at(&zeros[..n as usize], q)?;
                        q += n;
                    }
                }
            }
            p = part_end;
        }
        self.relieve_pressure()
    }

    /// Decides how guest bytes from `pos` to the end of their cluster (or the whole cluster)
    /// become zeros.
    fn zeroing(&self, pos: u64, whole: bool) -> Result<Zeroing> {
        let g = self.geometry;
        let entry = match self.l2_table(g.l1_index(pos))? {
            None => L2Entry::Unallocated,
            Some(table) => self.entry(&table, g.l2_index(pos))?,
        };
        Ok(match entry {
            L2Entry::Data { host_offset } => Zeroing::Host(host_offset),
            L2Entry::Zero => Zeroing::Nothing,
            // As QEMU does: whole clusters become zero clusters, parts are written as data
            // (so `map` tells the same story whether or not a backing file shows through).
            L2Entry::Unallocated if whole => Zeroing::ZeroEntry,
            L2Entry::Unallocated => Zeroing::Data,
        })
    }

    /// Turns the unallocated entry of the cluster at `pos` into a zero cluster. A data cluster
    /// allocated there meanwhile is zeroed in place instead.
    fn set_zero_entry(&self, pos: u64) -> Result<()> {
        let g = self.geometry;
        let table = self.l2_table_for_write(g.l1_index(pos))?;
        let index = g.l2_index(pos);
        let claim = table.claim(index..index + 1, |entries| {
            let raw = entries.get(index);
            Some((index..index + 1, raw))
        });
        let Some((range, raw)) = claim else {
            return Ok(());
        };
        if raw == 0 {
            table.settle(range, Some(&|_| ZERO_CLUSTER_ENTRY));
            self.activity.touch();
            return Ok(());
        }
        table.settle(range, None);
        if let L2Entry::Data { host_offset } = self.entry(&table, index)? {
            self.storage
                .write_zeroes(host_offset, g.cluster_size())
                .map_err(Error::io("write zeroes", host_offset))?;
        }
        Ok(())
    }

    pub(crate) fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let g = self.geometry;
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        let end = offset + len;
        // The last cluster counts as whole when the request reaches the end of the disk.
        let end = if end == size {
            g.align_up(end)
        } else {
            g.align_down(end)
        };
        let cs = g.cluster_size();
        let mut p = g.align_up(offset);
        while p < end {
            let n = self.table_chunk(p, end - p);
            if let Some(table) = self.l2_table_owned(g.l1_index(p))? {
                self.discard_in_table(&table, p, p + n)?;
            } else if p < self.backing_size() {
                for q in (p..p + n).step_by(cs as usize) {
                    if q < self.backing_size() {
                        self.set_zero_entry(q)?;
                    }
                }
            }
            p += n;
        }
        self.relieve_pressure()
    }

    /// Discards the whole clusters `[pos, end)` of one table.
    fn discard_in_table(&self, table: &L2Table, pos: u64, end: u64) -> Result<()> {
        let g = self.geometry;
        let mut p = pos;
        while p < end {
            let entry = self.entry(table, g.l2_index(p))?;
            let run_end = self.run_end(table, p, end, entry);
            match entry {
                // The entry stays: the cluster reads zeros and its space goes back to the
                // file system, with no leak and no reuse.
                L2Entry::Data { host_offset } => self
                    .storage
                    .punch_hole(host_offset, run_end - p)
                    .map_err(Error::io("punch hole", host_offset))?,
                L2Entry::Unallocated => {
                    let backed_end = run_end.min(self.backing_size());
                    for q in (p..backed_end).step_by(g.cluster_size() as usize) {
                        self.set_zero_entry(q)?;
                    }
                }
                L2Entry::Zero => {}
            }
            p = run_end;
        }
        Ok(())
    }
}

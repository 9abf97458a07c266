//! From a guest offset to its table and entry: the lookups every I/O path shares.

use std::sync::Arc;

use qed_format::L2Entry;

use crate::alloc::InFlight;
use crate::state::Shared;
use crate::table::L2Table;
use crate::tables::TableRef;
use crate::{Error, Result, TableKind};

impl Shared {
    /// The L2 table for L1 entry `l1_index`, for reading, if it has one.
    pub(crate) fn l2_table(&self, l1_index: usize) -> Result<Option<TableRef>> {
        match self.tables.l2_offset(l1_index, || self.alloc.end())? {
            None => Ok(None),
            Some(offset) => self.tables.get(&*self.storage, l1_index, offset).map(Some),
        }
    }

    /// The L2 table for L1 entry `l1_index`, held so that it stays in memory.
    pub(crate) fn l2_table_owned(&self, l1_index: usize) -> Result<Option<Arc<L2Table>>> {
        match self.tables.l2_offset(l1_index, || self.alloc.end())? {
            None => Ok(None),
            Some(offset) => self
                .tables
                .get_owned(&*self.storage, l1_index, offset)
                .map(Some),
        }
    }

    /// Like [`Shared::l2_table_owned`], creating an empty table when the L1 entry is empty.
    pub(crate) fn l2_table_for_write(&self, l1_index: usize) -> Result<Arc<L2Table>> {
        if let Some(table) = self.l2_table_owned(l1_index)? {
            return Ok(table);
        }
        let _creating = self
            .tables
            .creation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(table) = self.l2_table_owned(l1_index)? {
            return Ok(table);
        }
        let in_flight = self.alloc.begin();
        let offset = self.allocate(&in_flight, u64::from(self.geometry.table_size()))?;
        let table = self.tables.create(l1_index, offset)?;
        self.activity.touch();
        Ok(table)
    }

    /// Reserves `clusters` contiguous clusters at the end of the file. NEED_CHECK is on disk
    /// before any cluster is handed out, so whatever the new clusters receive before the next
    /// write-back (leaks after a crash) is found by the check at the next open.
    pub(crate) fn allocate(&self, in_flight: &InFlight<'_>, clusters: u64) -> Result<u64> {
        self.need_check_before_change()?;
        Ok(self.alloc.bump(in_flight, clusters))
    }

    /// The entry at `index` of `table`, validated against the allocated area.
    pub(crate) fn entry(&self, table: &L2Table, index: usize) -> Result<L2Entry> {
        let raw = table.entries.get(index);
        self.valid
            .decode_l2(self.alloc.end(), raw)
            .map_err(|e| Error::Corrupt {
                table: TableKind::L2,
                table_offset: table.offset,
                index,
                value: raw,
                reason: match e {
                    qed_format::FormatError::EntryUnaligned { .. } => {
                        "is not aligned to the cluster size"
                    }
                    _ => "points outside the file or into the header",
                },
            })
    }

    /// Extends a run starting with `first` at guest `pos` over following clusters of the same
    /// kind (data runs must be contiguous on the host); returns the run's guest end (≤ `end`).
    pub(crate) fn run_end(&self, table: &L2Table, pos: u64, end: u64, first: L2Entry) -> u64 {
        let g = self.geometry;
        let cs = g.cluster_size();
        let start = g.align_down(pos);
        let mut run_end = (start + cs).min(end);
        let mut index = g.l2_index(pos);
        while run_end < end {
            index += 1;
            // An invalid entry ends the run; the error is reported when the caller reaches it.
            let Ok(next) = self.entry(table, index) else {
                break;
            };
            let same = match (first, next) {
                (L2Entry::Data { host_offset: a }, L2Entry::Data { host_offset: b }) => {
                    b == a + (run_end - start)
                }
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            run_end = (run_end + cs).min(end);
        }
        run_end
    }
}

//! The write path: in place over data clusters; elsewhere an allocation, in three steps.
//!
//! 1. **Plan** (under the claim of the affected L2 entries): which clusters to allocate, and
//!    which host ranges receive old contents (copy-on-write), zeros or the guest data.
//! 2. **Execute**: the I/O of the plan, with no lock held and owned buffers.
//! 3. **Settle**: publish the new entries in memory (their chunks become dirty) and release
//!    the claim; the tables reach the disk at the next write-back (`writeback.rs`).
//!
//! Other writers of the claimed clusters wait; writers of other clusters do not.

use std::cell::Cell;
use std::ops::Range;

use qed_format::L2Entry;

use crate::alloc::InFlight;
use crate::state::Shared;
use crate::table::L2Table;
use crate::{Error, Result};

thread_local! {
    /// A buffer for copy-on-write, owned by the I/O while it runs and reused afterwards.
    static SPARE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Largest copy-on-write buffer a thread keeps between requests.
const SPARE_MAX: usize = 1 << 20;

/// Where the untouched part of a newly allocated cluster gets its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// From the backing layer at this guest offset.
    Backing { guest: u64 },
    /// Zeros, written.
    Zeros,
    /// Nothing to write: never-written space past the original end of the file reads zeros.
    Nothing,
}

/// One host range of a plan that is not guest data.
#[derive(Debug, Clone, Copy)]
struct Gap {
    host: u64,
    len: u64,
    fill: Fill,
}

/// An allocating write, decided under the claim of `claimed`.
#[derive(Debug)]
struct Plan {
    claimed: Range<usize>,
    /// First new host cluster.
    host: u64,
    /// Guest bytes of the request this plan writes: `data[..data_len]` at host `data_at`.
    data_len: usize,
    data_at: u64,
    head: Option<Gap>,
    tail: Option<Gap>,
}

impl Shared {
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
        self.relieve_pressure()
    }

    fn write_in_table(&self, table: &L2Table, data: &[u8], pos: u64) -> Result<()> {
        let end = pos + data.len() as u64;
        let mut p = pos;
        while p < end {
            let entry = self.entry(table, self.geometry.l2_index(p))?;
            if let L2Entry::Data { host_offset } = entry {
                let run_end = self.run_end(table, p, end, entry);
                let at = host_offset + self.geometry.offset_in_cluster(p);
                self.storage
                    .write_at(&data[(p - pos) as usize..(run_end - pos) as usize], at)
                    .map_err(Error::io("write", at))?;
                p = run_end;
                continue;
            }
            p = self.allocating_write(table, &data[(p - pos) as usize..], p)?;
        }
        Ok(())
    }

    /// Allocates the run of unallocated or zero clusters starting at guest `pos` and writes
    /// `data` (which may extend past the run) there. Returns the guest offset up to which data
    /// was written; it is `pos` if another writer allocated the first cluster meanwhile (the
    /// caller then writes in place).
    fn allocating_write(&self, table: &L2Table, data: &[u8], pos: u64) -> Result<u64> {
        let g = self.geometry;
        let end = pos + data.len() as u64;
        let first = g.l2_index(pos);
        let last = g.l2_index(end - 1);
        let mut wanted = 1;
        while first + wanted <= last && !L2Entry::is_data_value(table.entries.get(first + wanted)) {
            wanted += 1;
        }
        let claim = table.claim(first..first + wanted, |entries| {
            let n = (0..wanted)
                .take_while(|&i| !L2Entry::is_data_value(entries.get(first + i)))
                .count();
            (n > 0).then(|| {
                let old = (entries.get(first), entries.get(first + n - 1));
                (first..first + n, old)
            })
        });
        let Some((claimed, old)) = claim else {
            return Ok(pos);
        };
        let in_flight = self.alloc.begin();
        let plan = match self.plan(&in_flight, claimed.clone(), data.len(), pos, old) {
            Ok(plan) => plan,
            Err(e) => {
                table.settle(claimed, None);
                return Err(e);
            }
        };
        let result = self.execute(&plan, &data[..plan.data_len]);
        let written_end = pos + plan.data_len as u64;
        self.settle(table, &plan, result.is_ok());
        drop(in_flight);
        result.map(|()| written_end)
    }

    /// Decides the host layout of an allocation of the `claimed` entries, whose first and
    /// last old values are `old`.
    fn plan(
        &self,
        in_flight: &InFlight<'_>,
        claimed: Range<usize>,
        len: usize,
        pos: u64,
        (head_old, tail_old): (u64, u64),
    ) -> Result<Plan> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let clusters = claimed.len() as u64;
        let host = self.allocate(in_flight, clusters)?;
        let run_start = g.align_down(pos);
        let run_end = run_start + clusters * cs;
        let data_end = (pos + len as u64).min(run_end);
        let gap = |guest: u64, len: u64, old_entry: u64| {
            (len > 0).then(|| {
                let host = host + (guest - run_start);
                Gap {
                    host,
                    len,
                    fill: self.fill(host, guest, old_entry),
                }
            })
        };
        Ok(Plan {
            claimed,
            host,
            data_len: (data_end - pos) as usize,
            data_at: host + (pos - run_start),
            head: gap(run_start, pos - run_start, head_old),
            tail: gap(data_end, run_end - data_end, tail_old),
        })
    }

    /// What the untouched bytes of a new cluster at `host` (guest `guest`) receive, given the
    /// entry the cluster had.
    fn fill(&self, host: u64, guest: u64, old_entry: u64) -> Fill {
        // A zero cluster's untouched bytes stay zero (the spec; QEMU copies backing data).
        if old_entry == 0 && guest < self.backing_size() {
            Fill::Backing { guest }
        } else if self.alloc.is_fresh(host) {
            Fill::Nothing
        } else {
            Fill::Zeros
        }
    }

    /// Performs the I/O of `plan`: head and tail fills, then the guest data.
    fn execute(&self, plan: &Plan, data: &[u8]) -> Result<()> {
        for gap in [plan.head, plan.tail].into_iter().flatten() {
            self.fill_gap(gap)?;
        }
        self.storage
            .write_at(data, plan.data_at)
            .map_err(Error::io("write", plan.data_at))
    }

    fn fill_gap(&self, gap: Gap) -> Result<()> {
        match gap.fill {
            Fill::Nothing => Ok(()),
            // Written as data, as QEMU does: the new cluster is whole on the host.
            Fill::Zeros => crate::storage::write_zero_bytes(&*self.storage, gap.host, gap.len)
                .map_err(Error::io("write", gap.host)),
            Fill::Backing { guest } => {
                let mut buf = SPARE.take();
                buf.clear();
                buf.resize(gap.len as usize, 0);
                let result = self.read_unallocated(&mut buf, guest).and_then(|()| {
                    self.storage
                        .write_at(&buf, gap.host)
                        .map_err(Error::io("write", gap.host))
                });
                // Kept for the next copy only while small: a thread does not hold a cluster
                // of up to 64 MiB forever.
                if buf.capacity() <= SPARE_MAX {
                    SPARE.set(buf);
                }
                result
            }
        }
    }

    /// Publishes the entries of `plan` (or, on failure, leaves the old ones) and releases
    /// the claim.
    fn settle(&self, table: &L2Table, plan: &Plan, succeeded: bool) {
        let cs = self.geometry.cluster_size();
        let (start, host) = (plan.claimed.start, plan.host);
        let value = move |i: usize| host + (i - start) as u64 * cs;
        table.settle(
            plan.claimed.clone(),
            succeeded.then_some(&value as &dyn Fn(usize) -> u64),
        );
        self.activity.touch();
    }
}

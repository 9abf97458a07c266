//! The read path: data clusters from the file, zero clusters as zeros, the rest from the
//! backing layer (zeros without one, and past its end).

use qed_format::L2Entry;

use crate::state::Shared;
use crate::{Error, Result};

impl Shared {
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

    /// Reads guest bytes that this image does not hold.
    pub(crate) fn read_unallocated(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        match self.backing.load().as_deref() {
            Some(backing) => backing.read_at(buf, pos),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn read_in_table(&self, table: &crate::table::L2Table, buf: &mut [u8], pos: u64) -> Result<()> {
        let end = pos + buf.len() as u64;
        let mut p = pos;
        while p < end {
            let entry = self.entry(table, self.geometry.l2_index(p))?;
            let run_end = self.run_end(table, p, end, entry);
            let part = &mut buf[(p - pos) as usize..(run_end - pos) as usize];
            match entry {
                L2Entry::Data { host_offset } => {
                    let at = host_offset + self.geometry.offset_in_cluster(p);
                    self.storage
                        .read_at(part, at)
                        .map_err(Error::io("read", at))?;
                }
                L2Entry::Zero => part.fill(0),
                L2Entry::Unallocated => self.read_unallocated(part, p)?,
            }
            p = run_end;
        }
        Ok(())
    }
}

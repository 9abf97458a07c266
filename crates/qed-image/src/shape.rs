//! Changes of an image's shape: its virtual size and its backing file. Each holds the image
//! exclusively (the I/O gate), so no request sees half a change.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use qed_format::{
    Header, L2Entry, FEATURE_BACKING_FILE, FEATURE_BACKING_FORMAT_NO_PROBE, HEADER_LEN, SECTOR_SIZE,
};

use crate::backing::{BackingFormat, BackingLayer, BackingPolicy};
use crate::check::Repair;
use crate::image::resolve_backing_name;
use crate::state::Shared;
use crate::{Error, Image, OpenOptions, Result};

/// A backing file for [`Image::set_backing`].
#[derive(Debug)]
pub struct NewBacking {
    /// The name to store (resolved against the image's directory when relative).
    pub name: Vec<u8>,
    /// The format to record: [`BackingFormat::Raw`] sets BACKING_FORMAT_NO_PROBE; anything
    /// else leaves the format to probing, as QEMU does.
    pub format: Option<BackingFormat>,
    /// The layer to read from from now on. `None` opens the named file (read-only) when the
    /// image was opened from a path and follows its backing files
    /// ([`BackingPolicy::Follow`](crate::BackingPolicy::Follow)); otherwise (other storage, or
    /// an image opened without its backing chain, as `qemu-img rebase -u` opens it) the name
    /// is only recorded and the image reads zeros there until it is opened again.
    pub layer: Option<BackingLayer>,
}

impl Image {
    /// Changes the virtual size. Growing writes the new size into the header. Shrinking
    /// (which QEMU cannot do for QED) writes the new size, drops the entries past it, zeroes
    /// the tail of a last partial cluster and gives the space back (data moved down, the file
    /// cut), in an order that a crash at any point leaves repairable: NEED_CHECK is on disk
    /// before the first entry is dropped.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.shared.check_writable()?;
        let _all = self.shared.gate.exclusive();
        self.shared.resize(new_size)
    }

    /// Points the image at another backing file, or at none (`None`: the image stands alone;
    /// unallocated clusters read as zeros), rewriting the header and name in one write at the
    /// start of the file, as `qemu-img rebase -u` does. Every write completed before the call
    /// is made durable first, so a crash never leaves the new header over data that did not
    /// reach the disk. The guest view changes accordingly: copying what differs first (a safe
    /// rebase, [`crate::ops::rebase`]) is the caller's part.
    pub fn set_backing(&self, new: Option<NewBacking>) -> Result<()> {
        self.shared.check_writable()?;
        let open_named = self.options().backing == BackingPolicy::Follow;
        let _all = self.shared.gate.exclusive();
        self.shared.set_backing(new, open_named)
    }

    /// Drops every table entry, so that every guest byte reads from the backing file again
    /// (zeros without one), and gives the space back (the file is cut behind the L1 table):
    /// what `qemu-img commit` does to the overlay once its data is in the backing file (QEMU's
    /// own QED driver cannot). NEED_CHECK is on disk before the first entry is dropped, so a
    /// crash at any point leaves an image whose every cluster reads its old contents or the
    /// backing file's, and which the next open repairs.
    pub fn make_empty(&self) -> Result<()> {
        self.shared.check_writable()?;
        let _all = self.shared.gate.exclusive();
        self.shared.make_empty()
    }
}

impl Shared {
    fn resize(&self, new_size: u64) -> Result<()> {
        let g = self.geometry;
        if new_size % SECTOR_SIZE != 0 || u128::from(new_size) > g.max_image_size() {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} is not a multiple of 512 of at most {} bytes",
                g.max_image_size()
            )));
        }
        let old_size = self.size.load(Ordering::Acquire);
        if new_size == old_size {
            return Ok(());
        }
        self.write_back()?;
        let set_size = |h: &mut Header| h.image_size = new_size;
        if new_size > old_size {
            // Entries past the old end (none in an image this engine wrote) must not appear;
            // the clusters they held are reclaimed before the disk grows over them.
            let dropped = self.drop_entries_from(old_size)?;
            // Barrier (write-back ends with a flush): the zeroed tail of the last cluster and
            // the dropped entries are durable before the size that shows them.
            self.write_back()?;
            if dropped {
                self.check_after_drop()?;
            }
            self.write_shape(set_size, None)?;
            self.size.store(new_size, Ordering::Release);
            return Ok(());
        }
        // A crash from here on leaves entries past the end or leaks under a set NEED_CHECK:
        // the repair at the next open clears the entries and reclaims the clusters.
        self.need_check_before_change()?;
        self.write_shape(set_size, None)?;
        self.size.store(new_size, Ordering::Release);
        self.drop_entries_from(new_size)?;
        self.write_back()?;
        self.check_after_drop()
    }

    fn make_empty(&self) -> Result<()> {
        // Tables written back first: the ones forgotten below are clean.
        self.write_back()?;
        if self.drop_entries_from(0)? {
            // The write-back sets NEED_CHECK (flushed) before the cleared L1 goes out, and
            // ends with a flush: the cleared L1 is durable before the repair cuts the file
            // under the tables it led to.
            self.write_back()?;
            self.check_after_drop()?;
        }
        Ok(())
    }

    /// Reclaims the clusters that dropped entries held (a repair: data moved down, tables
    /// slid, the file cut).
    fn check_after_drop(&self) -> Result<()> {
        let report = self.check(Repair::All)?;
        if report.corruptions > 0 || report.check_errors > 0 {
            return Err(Error::InvalidArgument(format!(
                "the size changed but the repair left {} corruptions and {} check errors",
                report.corruptions, report.check_errors
            )));
        }
        Ok(())
    }

    /// Drops every entry that maps guest bytes at or past `from`, and zeroes the rest of the
    /// cluster that holds `from` (so growing again shows zeros there). Returns whether any
    /// entry was dropped.
    fn drop_entries_from(&self, from: u64) -> Result<bool> {
        let mut dropped = false;
        let g = self.geometry;
        let cs = g.cluster_size();
        if from % cs != 0 {
            if let Some(table) = self.l2_table(g.l1_index(from))? {
                if let L2Entry::Data { host_offset } = self.entry(&table, g.l2_index(from))? {
                    let at = host_offset + g.offset_in_cluster(from);
                    let len = cs - g.offset_in_cluster(from);
                    self.storage
                        .write_zeroes(at, len)
                        .map_err(Error::io("write zeroes", at))?;
                }
            }
        }
        let first_cluster = g.align_up(from);
        let coverage = g.l2_coverage();
        let first_whole_table = first_cluster.div_ceil(coverage) as usize;
        if first_cluster % coverage != 0 {
            if let Some(table) = self.l2_table_owned(g.l1_index(first_cluster))? {
                for index in g.l2_index(first_cluster)..table.entries.len() {
                    if table.entries.get(index) != 0 {
                        table.set(index, 0);
                        dropped = true;
                    }
                }
            }
        }
        for l1_index in first_whole_table..self.tables.l1.len() {
            if self.tables.l1.get(l1_index) != 0 {
                self.tables.forget(l1_index);
                self.tables.l1.set(l1_index, 0);
                dropped = true;
            }
        }
        self.activity.touch();
        Ok(dropped)
    }

    fn set_backing(&self, new: Option<NewBacking>, open_named: bool) -> Result<()> {
        let old = self.header.current();
        let header_bytes = self.valid.header_bytes();
        let name_offset = HEADER_LEN as u64;
        let (name, format, layer) = match new {
            None => (None, None, None),
            Some(new) => {
                if new.name.is_empty() || new.name.contains(&0) {
                    return Err(Error::InvalidArgument(
                        "a backing file name must be non-empty and hold no NUL".into(),
                    ));
                }
                if old.compat_features != 0 {
                    // Unknown compatible features may own the bytes after the header.
                    return Err(Error::Unsupported(format!(
                        "cannot set a backing file with unknown compatible features {:#x}",
                        old.compat_features
                    )));
                }
                let len = new.name.len() as u64;
                if name_offset + len > header_bytes {
                    return Err(Error::InvalidArgument(format!(
                        "No space left in the file header: a backing file name of {len} bytes \
                         does not fit in {header_bytes} bytes"
                    )));
                }
                let layer = match (new.layer, &self.path) {
                    (Some(layer), _) => Some(layer),
                    (None, Some(path)) if open_named => {
                        let resolved = resolve_backing_name(path, &new.name);
                        let options = OpenOptions {
                            cache: crate::storage::CacheMode::Writeback,
                            ..OpenOptions::read_only()
                        };
                        Some(BackingLayer::open(&resolved, new.format, &options)?)
                    }
                    (None, _) => None,
                };
                (Some(new.name), new.format, layer)
            }
        };
        let len = name.as_ref().map_or(0, |n| n.len() as u64);
        // Where the name goes: with the header in the first sector (one write, atomic), or,
        // when longer, somewhere the old name is not, written and flushed before the header
        // that points at it, so a crash leaves the old header and name or the new ones.
        let offset = if name_offset + len <= SECTOR_SIZE {
            name_offset
        } else {
            let old_start = u64::from(old.backing_filename_offset);
            let old_end = old_start + u64::from(old.backing_filename_size);
            let old_named = old.has_backing_file() && old.backing_filename_size > 0;
            let clear_of_old = |at: u64| !old_named || at + len <= old_start || at >= old_end;
            [name_offset, SECTOR_SIZE, old_end.max(SECTOR_SIZE)]
                .into_iter()
                .find(|&at| at + len <= header_bytes && clear_of_old(at))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "No space left in the file header: a backing file name of {len} bytes \
                         does not fit beside the current one in {header_bytes} bytes"
                    ))
                })?
        };
        // Barrier (write-back ends with a flush): data copied into the image for the new
        // backing file (a safe rebase) is durable, with its tables, before the header names it.
        self.write_back()?;
        let change = |h: &mut Header| {
            h.features &= !(FEATURE_BACKING_FILE | FEATURE_BACKING_FORMAT_NO_PROBE);
            h.backing_filename_offset = offset as u32;
            h.backing_filename_size = len as u32;
            if name.is_some() {
                h.features |= FEATURE_BACKING_FILE;
                if format == Some(BackingFormat::Raw) {
                    h.features |= FEATURE_BACKING_FORMAT_NO_PROBE;
                }
            }
        };
        match &name {
            Some(n) if name_offset + len <= SECTOR_SIZE => self.write_shape(change, Some(n))?,
            Some(n) => {
                self.write_backing_name_at(offset, n)?;
                self.write_shape(change, None)?;
            }
            None => self.write_shape(change, None)?,
        }
        *self
            .header
            .backing_name
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = name;
        self.backing.store(layer.map(Arc::new));
        Ok(())
    }
}

//! `convert`: copies what a disk reads into another, sparse-aware.
//!
//! The source is walked by block status (holes under data clusters included), in guest order:
//! a range no layer holds and a zero range are never read, and on a target that reads zeros
//! already they are not written either (elsewhere they become zero clusters or punched
//! holes). Data is read [`IO_BUF_SIZE`] at a time and split into sparse blocks (`-S`,
//! aligned to multiples of the block size): a block of zeros is left out like a zero range.
//! Writes go out in guest order, so a new QED target allocates its clusters in that order
//! and comes out compact.
//!
//! With [`ConvertOptions::diff_backing`] the target's backing layer is the base: a block that
//! reads the same there is not written, a zero block over backing data becomes zeros in the
//! target, and when the source's own backing file is that same file, nothing the source
//! leaves to it is read at all.

use std::path::Path;

use crate::backing::{BackingFormat, BackingPolicy};
use crate::storage::CacheMode;
use crate::{CreateParams, Error, Image, OpenOptions, Result};

use super::disk::Disk;
#[cfg(feature = "foreign")]
use super::disk::DiskFormat;
use super::status::{BlockStatus, BlockStatusIter, Chain, StatusKind};
use super::{is_zero, IO_BUF_SIZE, SECTOR};

/// Largest sparse block (`-S`), as qemu-img allows.
pub const MAX_SPARSE_SIZE: u64 = 16 << 20;

/// A target image to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewTarget<'a> {
    /// A raw file (all holes at first).
    Raw,
    /// A QED image.
    Qed {
        /// Bytes per cluster.
        cluster_size: u32,
        /// Clusters per table.
        table_size: u32,
        /// The backing file name to record (relative to the new image's directory) and its
        /// format.
        backing: Option<(&'a str, BackingFormat)>,
    },
    /// A qcow2 image (version 3, 16-bit refcounts), created through imago.
    #[cfg(feature = "foreign")]
    Qcow2 {
        /// Bytes per cluster (a power of two from 512 to 2 MiB).
        cluster_size: u32,
        /// The backing file name to record (relative to the new image's directory) and its
        /// format.
        backing: Option<(&'a str, DiskFormat)>,
    },
}

/// Creates a target of `size` bytes at `path` and opens it for writing (a QED target with its
/// backing chain), with `cache` for its file.
pub fn create_target(
    path: &Path,
    target: &NewTarget<'_>,
    size: u64,
    cache: CacheMode,
) -> Result<Disk> {
    match target {
        NewTarget::Raw => Disk::create_raw(path, size, cache),
        NewTarget::Qed {
            cluster_size,
            table_size,
            backing,
        } => {
            Image::create(
                path,
                &CreateParams {
                    image_size: size,
                    cluster_size: *cluster_size,
                    table_size: *table_size,
                    backing_file: backing.map(|(name, _)| name.to_string()),
                    backing_raw: matches!(backing, Some((_, BackingFormat::Raw))),
                },
            )?;
            let options = OpenOptions {
                writable: true,
                cache,
                backing: BackingPolicy::Follow,
                ..OpenOptions::read_write()
            };
            Disk::open(path, Some(BackingFormat::Qed), &options)
        }
        #[cfg(feature = "foreign")]
        NewTarget::Qcow2 {
            cluster_size,
            backing,
        } => Disk::create_qcow2(path, size, *cluster_size, *backing, cache),
    }
}

/// How to convert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertOptions {
    /// Bytes of zeros (a multiple of 512, at most [`MAX_SPARSE_SIZE`]) that make a gap in the
    /// output; 0 writes everything, zeros included, as data (a fully allocated target).
    pub sparse_size: u64,
    /// The target reads as zeros where nothing is written (a new image without a backing
    /// file, or `--target-is-zero`): zero ranges are skipped rather than zeroed.
    pub target_is_zero: bool,
    /// Write only what differs from what the target's backing layer reads.
    pub diff_backing: bool,
    /// Where in the target the source's first byte goes (sources concatenated into one
    /// target); must be 0 with `diff_backing`.
    pub target_offset: u64,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            sparse_size: 4096,
            target_is_zero: false,
            diff_backing: false,
            target_offset: 0,
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes written to the target as data.
    pub written: u64,
    /// Bytes made zero in the target without writing data.
    pub zeroed: u64,
}

/// Why a conversion failed, with the guest offset (of the source) where it did.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The options do not fit the disks.
    #[error("{0}")]
    Invalid(Error),
    /// The source's block status could not be found.
    #[error("error while reading block status at offset {offset}: {source}")]
    Status {
        /// Guest offset.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
    /// A read of the source (or of the target's backing layer) failed.
    #[error("error while reading at byte {offset}: {source}")]
    Read {
        /// Guest offset.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
    /// A write to the target failed.
    #[error("error while writing at byte {offset}: {source}")]
    Write {
        /// Guest offset in the target.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
}

/// What happens to one sparse block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Nothing: the target reads the right bytes already.
    Skip,
    /// Make it read as zeros.
    Zero,
    /// Write the source's bytes.
    Data,
}

/// The target side: writes in guest order, zero ranges coalesced.
struct Writer<'a> {
    target: &'a Disk,
    /// Added to source offsets to get target offsets.
    shift: u64,
    pending_zero: Option<(u64, u64)>,
    stats: ConvertStats,
}

impl Writer<'_> {
    fn zero(&mut self, start: u64, end: u64) -> Result<(), ConvertError> {
        match &mut self.pending_zero {
            Some((_, e)) if *e == start => *e = end,
            _ => {
                self.flush_zero()?;
                self.pending_zero = Some((start, end));
            }
        }
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<(), ConvertError> {
        if let Some((start, end)) = self.pending_zero.take() {
            let offset = start + self.shift;
            self.target
                .write_zeroes(offset, end - start, true)
                .map_err(|source| ConvertError::Write { offset, source })?;
            self.stats.zeroed += end - start;
        }
        Ok(())
    }

    fn data(&mut self, buf: &[u8], offset: u64) -> Result<(), ConvertError> {
        self.flush_zero()?;
        let offset = offset + self.shift;
        self.target
            .write_at(buf, offset)
            .map_err(|source| ConvertError::Write { offset, source })?;
        self.stats.written += buf.len() as u64;
        Ok(())
    }
}

/// Whether two paths name the same file.
fn same_file(a: Option<&Path>, b: Option<&Path>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        },
        _ => false,
    }
}

/// Copies what `source` reads into `target` (at least as large), as [`ConvertOptions`] say;
/// `progress(done, total)` is called as guest bytes are covered. The caller closes the
/// target (which makes it durable).
pub fn convert(
    source: &Disk,
    target: &Disk,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats, ConvertError> {
    run(source, target, options, progress, None)
}

/// The longest block-status request qemu-img makes (`BDRV_REQUEST_MAX_SECTORS` sectors).
const MAX_STATUS_REQUEST: u64 = (i32::MAX as u64 >> 9) * SECTOR;

/// [`convert`] that goes on past errors of the source, as `qemu-img convert --salvage`: each
/// is passed to `warn` and the copy continues. A block status that cannot be had is asked
/// again of a quarter of the range, down to one sector, which is then taken as data (warned
/// as [`ConvertError::Status`] at that sector); a read that fails is done again sector by
/// sector, and each sector that cannot be read is warned about ([`ConvertError::Read`]) and
/// written as zeros. As qemu-img does, the source's block status is walked once over the
/// whole disk before the copy (qemu-img counts the allocated sectors for its progress), so
/// its warnings come twice.
pub fn convert_salvaging(
    source: &Disk,
    target: &Disk,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
    warn: &mut dyn FnMut(&ConvertError),
) -> Result<ConvertStats, ConvertError> {
    run(source, target, options, progress, Some(warn))
}

/// The block status of the source from `pos`, asked as qemu-img asks it in salvage mode.
fn salvaged_status(
    source: &Disk,
    pos: u64,
    size: u64,
    warn: &mut dyn FnMut(&ConvertError),
) -> BlockStatus {
    let mut n = (size - pos).min(MAX_STATUS_REQUEST);
    loop {
        match source.block_status_with_holes(pos, n).next() {
            Some(Ok(status)) => return status,
            None => {
                return BlockStatus {
                    offset: pos,
                    length: size - pos,
                    depth: 0,
                    kind: StatusKind::Unallocated,
                }
            }
            Some(Err(source)) if n <= SECTOR => {
                warn(&ConvertError::Status {
                    offset: pos,
                    source,
                });
                return BlockStatus {
                    offset: pos,
                    length: SECTOR.min(size - pos),
                    depth: 0,
                    kind: StatusKind::Data { host_offset: pos },
                };
            }
            Some(Err(_)) => n = n.div_ceil(SECTOR).div_ceil(4) * SECTOR,
        }
    }
}

fn run(
    source: &Disk,
    target: &Disk,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
    warn: Option<&mut dyn FnMut(&ConvertError)>,
) -> Result<ConvertStats, ConvertError> {
    let size = source.size();
    let invalid = |why: String| ConvertError::Invalid(Error::InvalidArgument(why));
    if options
        .target_offset
        .checked_add(size)
        .is_none_or(|end| end > target.size())
    {
        return Err(invalid("output file is smaller than input file".into()));
    }
    let sparse = options.sparse_size;
    if sparse % SECTOR != 0 || sparse > MAX_SPARSE_SIZE {
        return Err(invalid(format!(
            "sparse size {sparse} is not a multiple of {SECTOR} up to {MAX_SPARSE_SIZE}"
        )));
    }
    if options.diff_backing && options.target_offset != 0 {
        return Err(invalid(
            "a backing file for the target makes no sense at a target offset".into(),
        ));
    }
    let base = if options.diff_backing {
        Chain::of_disk(target).without_top()
    } else {
        None
    };
    // The source leaves to this same file what the target leaves to it.
    let shared_backing = base.as_ref().is_some_and(|base| {
        let paths = source.layer_paths();
        same_file(paths.get(1).and_then(Option::as_deref), base.path(0))
    });
    let block = if sparse > 0 { sparse } else { 8 * SECTOR };
    let chunk = (IO_BUF_SIZE as u64).max(block) / block * block;
    let mut copier = Copier {
        source,
        base,
        writer: Writer {
            target,
            shift: options.target_offset,
            pending_zero: None,
            stats: ConvertStats::default(),
        },
        options: *options,
        block,
        chunk,
        cluster: target.cluster_size(),
        buf: vec![0; chunk as usize],
        base_buf: Vec::new(),
        actions: Vec::new(),
        warn: None,
    };
    progress(0, size);
    let step = |copier: &mut Copier<'_, '_>,
                status: BlockStatus,
                progress: &mut dyn FnMut(u64, u64)|
     -> Result<(), ConvertError> {
        let (start, end) = (status.offset, status.offset + status.length);
        let left_to_base = status.depth >= 1 || status.kind == StatusKind::Unallocated;
        if !(shared_backing && left_to_base) {
            copier.range(start, end, status.kind.is_zero(), &mut |done| {
                progress(done, size);
            })?;
        }
        progress(end, size);
        Ok(())
    };
    if let Some(warn) = warn {
        // qemu-img's count of the allocated sectors, then the copy.
        let mut pos = 0;
        while pos < size {
            pos = salvaged_status(source, pos, size, warn).end();
        }
        copier.warn = Some(warn);
        let mut pos = 0;
        while pos < size {
            let Some(warn) = copier.warn.as_mut() else {
                break;
            };
            let status = salvaged_status(source, pos, size, &mut **warn);
            pos = status.end();
            step(&mut copier, status, progress)?;
        }
    } else {
        let mut done = 0;
        for status in source.block_status_with_holes(0, size) {
            let status = status.map_err(|source| ConvertError::Status {
                offset: done,
                source,
            })?;
            done = status.end();
            step(&mut copier, status, progress)?;
        }
    }
    copier.writer.flush_zero()?;
    Ok(copier.writer.stats)
}

/// The state of one conversion.
struct Copier<'a, 'w> {
    /// Salvage mode: where the errors of the source go.
    warn: Option<&'w mut dyn FnMut(&ConvertError)>,
    source: &'a Disk,
    /// The target's layers under its top, when only what differs from them is written.
    base: Option<Chain<'a>>,
    writer: Writer<'a>,
    options: ConvertOptions,
    /// Sparse block size.
    block: u64,
    /// Bytes handled at a time: a multiple of `block`, chunks aligned to it.
    chunk: u64,
    /// The target's cluster size, for QED targets.
    cluster: Option<u64>,
    buf: Vec<u8>,
    base_buf: Vec<u8>,
    actions: Vec<(u64, u64, Action)>,
}

impl Copier<'_, '_> {
    /// Copies `[start, end)`, whose source bytes are zeros when `known_zero`.
    fn range(
        &mut self,
        start: u64,
        end: u64,
        known_zero: bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), ConvertError> {
        if known_zero && self.base.is_none() {
            if self.options.sparse_size > 0 {
                if !self.options.target_is_zero {
                    self.writer.zero(start, end)?;
                }
                return Ok(());
            }
            // Fully allocated output: zeros written as data.
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(self.chunk);
                self.buf[..n as usize].fill(0);
                self.writer.data(&self.buf[..n as usize], pos)?;
                pos += n;
                progress(pos);
            }
            return Ok(());
        }
        let mut pos = start;
        while pos < end {
            let chunk_end = end.min((pos / self.chunk + 1) * self.chunk);
            self.chunk_at(pos, chunk_end, known_zero)?;
            pos = chunk_end;
            progress(pos);
        }
        Ok(())
    }

    /// Reads what the base holds over `[start, end)` into `base_buf`; false when it is all
    /// known zeros (nothing read).
    fn read_base(&mut self, base: &Chain<'_>, start: u64, end: u64) -> Result<bool, ConvertError> {
        let n = (end - start) as usize;
        if self.base_buf.len() < n {
            self.base_buf.resize(self.chunk as usize, 0);
        }
        let mut any_data = false;
        for status in BlockStatusIter::of_chain(base.clone(), start, end - start, true) {
            let status = status.map_err(|source| ConvertError::Status {
                offset: start,
                source,
            })?;
            let a = (status.offset - start) as usize;
            let b = a + status.length as usize;
            if status.kind.is_zero() {
                self.base_buf[a..b].fill(0);
            } else {
                base.read_layer(status.depth, &mut self.base_buf[a..b], status.offset)
                    .map_err(|source| ConvertError::Read {
                        offset: status.offset,
                        source,
                    })?;
                any_data = true;
            }
        }
        // Past the base's end it reads zeros.
        let covered = base.size(0).clamp(start, end);
        self.base_buf[(covered - start) as usize..n].fill(0);
        Ok(any_data)
    }

    /// Copies one chunk (inside one status range, within one aligned chunk).
    fn chunk_at(&mut self, start: u64, end: u64, known_zero: bool) -> Result<(), ConvertError> {
        let n = (end - start) as usize;
        let base = self.base.clone();
        let base_data = match &base {
            Some(base) => self.read_base(base, start, end)?,
            None => false,
        };
        if known_zero {
            if base.is_some() && !base_data {
                // Zeros over zeros.
                return Ok(());
            }
            self.buf[..n].fill(0);
        } else {
            self.read_source(start, n)?;
            self.writer.stats.read += n as u64;
        }
        self.plan(start, end, base.is_some(), known_zero);
        self.fill_gaps();
        for i in 0..self.actions.len() {
            let (a, b, action) = self.actions[i];
            let slice = (a - start) as usize..(b - start) as usize;
            match action {
                Action::Skip => {}
                Action::Zero => self.writer.zero(a, b)?,
                Action::Data => {
                    let buf = std::mem::take(&mut self.buf);
                    let result = self.writer.data(&buf[slice], a);
                    self.buf = buf;
                    result?;
                }
            }
        }
        Ok(())
    }

    /// Reads `n` bytes of the source at `start` into `buf`; in salvage mode a failed read is
    /// done again sector by sector, each sector that fails warned about and read as zeros.
    fn read_source(&mut self, start: u64, n: usize) -> Result<(), ConvertError> {
        let Err(source) = self.source.read_at(&mut self.buf[..n], start) else {
            return Ok(());
        };
        let Some(warn) = self.warn.as_mut() else {
            return Err(ConvertError::Read {
                offset: start,
                source,
            });
        };
        for at in (0..n).step_by(SECTOR as usize) {
            let sector = &mut self.buf[at..n.min(at + SECTOR as usize)];
            let offset = start + at as u64;
            if let Err(source) = self.source.read_at(sector, offset) {
                warn(&ConvertError::Read { offset, source });
                sector.fill(0);
            }
        }
        Ok(())
    }

    /// Decides each sparse block of `[start, end)` and merges neighbours that agree.
    fn plan(&mut self, start: u64, end: u64, with_base: bool, known_zero: bool) {
        self.actions.clear();
        let sparse = self.options.sparse_size > 0;
        let mut a = start;
        while a < end {
            let b = end.min((a / self.block + 1) * self.block);
            let slice = (a - start) as usize..(b - start) as usize;
            let zero = known_zero || is_zero(&self.buf[slice.clone()]);
            let action = if with_base {
                let same = if zero {
                    is_zero(&self.base_buf[slice.clone()])
                } else {
                    self.buf[slice.clone()] == self.base_buf[slice]
                };
                match (same, zero && sparse) {
                    (true, _) => Action::Skip,
                    (false, true) => Action::Zero,
                    (false, false) => Action::Data,
                }
            } else if !sparse || !zero {
                Action::Data
            } else if self.options.target_is_zero {
                Action::Skip
            } else {
                Action::Zero
            };
            match self.actions.last_mut() {
                Some((_, last_end, last)) if *last == action => *last_end = b,
                _ => self.actions.push((a, b, action)),
            }
            a = b;
        }
    }

    /// On a QED target, a gap between two data runs that holds no whole cluster is written as
    /// data: those clusters are allocated by their data anyway, and one write beats three.
    fn fill_gaps(&mut self) {
        let Some(cluster) = self.cluster else { return };
        let mut i = 1;
        while i + 1 < self.actions.len() {
            let (a, b, action) = self.actions[i];
            let holds_cluster = a.next_multiple_of(cluster) + cluster <= b;
            if action != Action::Data
                && self.actions[i - 1].2 == Action::Data
                && self.actions[i + 1].2 == Action::Data
                && !holds_cluster
            {
                let next_end = self.actions[i + 1].1;
                self.actions[i - 1].1 = next_end;
                self.actions.drain(i..i + 2);
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(all(test, feature = "filters"))]
mod tests {
    use super::*;
    use crate::ops::RawDisk;
    use crate::storage::{
        Action, BlkdebugStorage, Event, Injection, IoType, IoTypes, MemoryStorage, Rule,
    };

    fn rule(kind: IoType, offset: u64) -> Rule {
        Rule {
            event: Event::Open,
            state: 0,
            action: Action::Inject(Injection {
                iotypes: IoTypes::only(kind),
                errno: libc::EIO,
                offset: Some(offset),
                once: false,
            }),
        }
    }

    #[test]
    fn salvage_warns_per_sector_and_copies_the_rest() {
        const MIB: u64 = 1 << 20;
        let rules = vec![
            rule(IoType::BlockStatus, MIB + 4096),
            rule(IoType::Read, 3 * MIB),
            rule(IoType::Read, 3 * MIB + 512),
        ];
        let file = MemoryStorage::from_bytes(vec![0x2a; 4 * MIB as usize]);
        let storage = BlkdebugStorage::new(file, 0, rules).unwrap();
        let source = Disk::Raw(RawDisk::new(Box::new(storage), false).unwrap());
        let target = Disk::Raw(
            RawDisk::new(
                Box::new(MemoryStorage::from_bytes(vec![0; 4 * MIB as usize])),
                true,
            )
            .unwrap(),
        );
        let mut warnings = Vec::new();
        let options = ConvertOptions::default();
        assert!(convert(&source, &target, &options, &mut |_, _| {}).is_err());
        convert_salvaging(&source, &target, &options, &mut |_, _| {}, &mut |e| {
            warnings.push(match e {
                ConvertError::Status { offset, .. } => format!("status {offset}"),
                ConvertError::Read { offset, .. } => format!("read {offset}"),
                other => other.to_string(),
            });
        })
        .unwrap();
        let at = |mib: u64, extra: u64| mib * MIB + extra;
        assert_eq!(
            warnings,
            vec![
                format!("status {}", at(1, 4096)),
                format!("status {}", at(1, 4096)),
                format!("read {}", at(3, 0)),
                format!("read {}", at(3, 512)),
            ]
        );
        let mut buf = vec![0u8; 2048];
        target.read_at(&mut buf, 3 * MIB - 512).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0x2a));
        assert!(buf[512..1536].iter().all(|&b| b == 0));
        assert!(buf[1536..].iter().all(|&b| b == 0x2a));
        target.read_at(&mut buf, MIB + 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0x2a));
    }
}

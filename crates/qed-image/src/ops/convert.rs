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

use std::cell::RefCell;
use std::path::Path;

use crate::backing::{BackingFormat, BackingPolicy};
use crate::storage::CacheMode;
use crate::{CreateParams, Error, Image, OpenOptions, Result};

use super::disk::Disk;
#[cfg(feature = "foreign")]
use super::disk::DiskFormat;
use super::status::{BlockStatus, BlockStatusIter, Chain, StatusKind};
use super::{is_zero, IO_BUF_SIZE, SECTOR};

mod pipeline;

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
    /// Copy threads (`qemu-img convert -m`, 1 to [`MAX_PARALLEL`]), each reading a chunk of
    /// its own while earlier ones are written; no more are started than the machine has CPUs
    /// (but two at least), so the chunks in flight are as many as the threads started. 1
    /// copies in the calling thread, and so does salvage mode.
    pub parallel: usize,
    /// Chunks may be written in any order (`-W`) rather than in guest order; a new QED
    /// target then allocates its clusters in the order the reads finish.
    pub out_of_order: bool,
}

impl ConvertOptions {
    /// The unit a copy is planned in: the sparse block, or 4 KiB without sparse detection.
    fn block(&self) -> u64 {
        if self.sparse_size > 0 {
            self.sparse_size
        } else {
            8 * SECTOR
        }
    }
}

/// Most chunks in flight, as qemu-img allows.
pub const MAX_PARALLEL: usize = 16;

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            sparse_size: 4096,
            target_is_zero: false,
            diff_backing: false,
            target_offset: 0,
            parallel: 8,
            out_of_order: false,
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

/// The target side: writes in the order given, zero ranges coalesced.
struct Writer<'a> {
    target: &'a Disk,
    /// Added to source offsets to get target offsets.
    shift: u64,
    pending_zero: Option<(u64, u64)>,
    stats: ConvertStats,
}

impl<'a> Writer<'a> {
    fn new(target: &'a Disk, shift: u64) -> Self {
        Self {
            target,
            shift,
            pending_zero: None,
            stats: ConvertStats::default(),
        }
    }

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

/// Bytes of source chunks in flight at most with more than 4 copy threads: with 8 that is
/// 1 MiB each, half of qemu-img's 8 × 2 MiB. (`-B` holds as much again of the backing file,
/// and a sparse block larger than a thread's share is its chunk.)
const IN_FLIGHT: u64 = 8 << 20;

/// Smallest chunk when copying in parallel.
const MIN_PARALLEL_CHUNK: u64 = 256 << 10;

/// Bytes handled at a time by `workers` threads: a multiple of the sparse `block`,
/// [`IO_BUF_SIZE`] or, with more than 4 threads, a share of [`IN_FLIGHT`].
fn chunk_size(workers: usize, block: u64) -> u64 {
    let share = (IN_FLIGHT / workers.max(1) as u64).clamp(MIN_PARALLEL_CHUNK, IO_BUF_SIZE as u64);
    share.max(block) / block * block
}

fn run(
    source: &Disk,
    target: &Disk,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
    warn: Option<&mut dyn FnMut(&ConvertError)>,
) -> Result<ConvertStats, ConvertError> {
    let workers = if warn.is_some() {
        1
    } else {
        workers_for(options.parallel)
    };
    run_with(
        source,
        target,
        options,
        workers,
        chunk_size(workers, options.block()),
        progress,
        warn,
    )
}

/// Threads that copy with `parallel` chunks in flight: one per chunk, but no more than the
/// machine has CPUs (at least two, so that reads overlap writes). Copying cached files is
/// bound by the CPUs: on two of them, 8 threads copied 1 GiB 30% slower than 2, while reading
/// from the disk they were within 10%.
fn workers_for(parallel: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    parallel.min(cpus.max(2))
}

/// [`run`] with the number of threads and the chunk size given.
fn run_with(
    source: &Disk,
    target: &Disk,
    options: &ConvertOptions,
    workers: usize,
    chunk: u64,
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
    if !(1..=MAX_PARALLEL).contains(&options.parallel) {
        return Err(invalid(format!(
            "{} chunks in flight (1 to {MAX_PARALLEL})",
            options.parallel
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
    let block = options.block();
    let worker = Worker {
        source,
        base,
        options: *options,
        block,
        cluster: target.cluster_size(),
        buf: Vec::new(),
        base_buf: Vec::new(),
        actions: Vec::new(),
        at: 0,
        read: 0,
    };
    let plan = Plan {
        options: *options,
        chunk,
        with_base: worker.base.is_some(),
        shared_backing,
    };
    progress(0, size);
    let stats = match warn {
        Some(warn) => {
            // qemu-img's count of the allocated sectors, then the copy.
            let mut pos = 0;
            while pos < size {
                pos = salvaged_status(source, pos, size, warn).end();
            }
            let warn = RefCell::new(warn);
            let mut pos = 0;
            let mut walk = |emit: &mut dyn FnMut(Task) -> Result<(), ConvertError>| {
                while pos < size {
                    let status = salvaged_status(source, pos, size, &mut **warn.borrow_mut());
                    pos = status.end();
                    plan.tasks(&status, emit)?;
                }
                Ok(())
            };
            let shift = options.target_offset;
            serial(worker, target, shift, &mut walk, progress, Some(&warn))?
        }
        None => {
            let mut walk = |emit: &mut dyn FnMut(Task) -> Result<(), ConvertError>| {
                let mut done = 0;
                for status in source.block_status_with_holes(0, size) {
                    let status = status.map_err(|source| ConvertError::Status {
                        offset: done,
                        source,
                    })?;
                    done = status.end();
                    plan.tasks(&status, emit)?;
                }
                Ok(())
            };
            if workers > 1 {
                pipeline::run(
                    worker,
                    target,
                    options.target_offset,
                    workers,
                    options.out_of_order,
                    &mut walk,
                    progress,
                )?
            } else {
                serial(
                    worker,
                    target,
                    options.target_offset,
                    &mut walk,
                    progress,
                    None,
                )?
            }
        }
    };
    progress(size, size);
    Ok(stats)
}

/// Feeds the tasks `walk` makes to one worker in the calling thread.
fn serial(
    mut worker: Worker<'_>,
    target: &Disk,
    shift: u64,
    walk: Walk<'_>,
    progress: &mut dyn FnMut(u64, u64),
    warn: Option<&Salvage<'_>>,
) -> Result<ConvertStats, ConvertError> {
    let size = worker.source.size();
    let mut writer = Writer::new(target, shift);
    let mut done = 0;
    walk(&mut |task| {
        if task.work != Work::Skip {
            match warn {
                Some(warn) => worker.prepare(&task, Some(&mut **warn.borrow_mut()))?,
                None => worker.prepare(&task, None)?,
            }
            worker.apply(&mut writer)?;
        }
        done += task.end - task.start;
        progress(done, size);
        Ok(())
    })?;
    writer.flush_zero()?;
    Ok(ConvertStats {
        read: worker.read,
        ..writer.stats
    })
}

/// Where salvage mode's warnings go, shared by the walk and the worker.
type Salvage<'w> = RefCell<&'w mut dyn FnMut(&ConvertError)>;

/// A walk of the source: calls its argument with every task, in guest order.
type Walk<'w> =
    &'w mut dyn FnMut(&mut dyn FnMut(Task) -> Result<(), ConvertError>) -> Result<(), ConvertError>;

/// One piece of a conversion: a range of the source within one chunk, or a zero range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Task {
    start: u64,
    end: u64,
    work: Work,
}

/// What a [`Task`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Nothing: the target reads the right bytes already (counted for progress only).
    Skip,
    /// Make the range read as zeros.
    Zero,
    /// Write zeros as data (a fully allocated target).
    Fill,
    /// Read the source (zeros without reading when `known_zero`), write what differs.
    Copy {
        /// The source reads zeros here.
        known_zero: bool,
    },
}

/// How block-status ranges become tasks.
struct Plan {
    options: ConvertOptions,
    /// Bytes handled at a time: a multiple of the sparse block, chunks aligned to it.
    chunk: u64,
    /// Only what differs from the target's base is written.
    with_base: bool,
    /// The source's backing file is the target's base.
    shared_backing: bool,
}

impl Plan {
    /// The tasks of one block-status range, in order.
    fn tasks(
        &self,
        status: &BlockStatus,
        emit: &mut dyn FnMut(Task) -> Result<(), ConvertError>,
    ) -> Result<(), ConvertError> {
        let (start, end) = (status.offset, status.end());
        let whole = |work| Task { start, end, work };
        let left_to_base = status.depth >= 1 || status.kind == StatusKind::Unallocated;
        if self.shared_backing && left_to_base {
            return emit(whole(Work::Skip));
        }
        let known_zero = status.kind.is_zero();
        let with_base = self.with_base;
        if known_zero && !with_base && self.options.sparse_size > 0 {
            return emit(whole(if self.options.target_is_zero {
                Work::Skip
            } else {
                Work::Zero
            }));
        }
        let work = if known_zero && !with_base {
            // Fully allocated output: zeros written as data.
            Work::Fill
        } else {
            Work::Copy { known_zero }
        };
        let mut pos = start;
        while pos < end {
            let chunk_end = end.min((pos / self.chunk + 1) * self.chunk);
            emit(Task {
                start: pos,
                end: chunk_end,
                work,
            })?;
            pos = chunk_end;
        }
        Ok(())
    }
}

/// Reads and plans tasks, one at a time, with buffers of its own.
struct Worker<'a> {
    source: &'a Disk,
    /// The target's layers under its top, when only what differs from them is written.
    base: Option<Chain<'a>>,
    options: ConvertOptions,
    /// Sparse block size.
    block: u64,
    /// The target's cluster size, for QED targets.
    cluster: Option<u64>,
    buf: Vec<u8>,
    base_buf: Vec<u8>,
    /// What the last prepared task writes; `buf` holds its data from `at` on.
    actions: Vec<(u64, u64, Action)>,
    at: u64,
    /// Bytes read from the source.
    read: u64,
}

impl Worker<'_> {
    /// A worker like this one, with buffers of its own.
    fn fresh(&self) -> Self {
        Self {
            base: self.base.clone(),
            buf: Vec::new(),
            base_buf: Vec::new(),
            actions: Vec::new(),
            at: 0,
            read: 0,
            ..*self
        }
    }

    /// Reads and plans `task` (not [`Work::Skip`]): its source bytes in `buf`, its writes in
    /// `actions`. In salvage mode, read errors go to `warn`.
    fn prepare(
        &mut self,
        task: &Task,
        warn: Option<&mut dyn FnMut(&ConvertError)>,
    ) -> Result<(), ConvertError> {
        let (start, end) = (task.start, task.end);
        self.actions.clear();
        self.at = start;
        match task.work {
            Work::Skip => {}
            Work::Zero => self.actions.push((start, end, Action::Zero)),
            Work::Fill => {
                self.buffer(end - start).fill(0);
                self.actions.push((start, end, Action::Data));
            }
            Work::Copy { known_zero } => self.copy(start, end, known_zero, warn)?,
        }
        Ok(())
    }

    /// `buf`, at least `n` bytes long, its first `n` bytes.
    fn buffer(&mut self, n: u64) -> &mut [u8] {
        let n = n as usize;
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        &mut self.buf[..n]
    }

    /// Plans a chunk inside one status range.
    fn copy(
        &mut self,
        start: u64,
        end: u64,
        known_zero: bool,
        warn: Option<&mut dyn FnMut(&ConvertError)>,
    ) -> Result<(), ConvertError> {
        let n = end - start;
        let with_base = self.base.is_some();
        let base_data = match self.base.take() {
            Some(base) => {
                let read = self.read_base(&base, start, end);
                self.base = Some(base);
                read?
            }
            None => false,
        };
        if known_zero {
            if with_base && !base_data {
                // Zeros over zeros.
                return Ok(());
            }
            self.buffer(n).fill(0);
        } else {
            self.buffer(n);
            self.read_source(start, n as usize, warn)?;
            self.read += n;
        }
        self.plan(start, end, with_base, known_zero);
        self.fill_gaps();
        Ok(())
    }

    /// Writes what [`Worker::prepare`] planned.
    fn apply(&self, writer: &mut Writer<'_>) -> Result<(), ConvertError> {
        let first = self.at;
        for &(a, b, action) in &self.actions {
            match action {
                Action::Skip => {}
                Action::Zero => writer.zero(a, b)?,
                Action::Data => {
                    writer.data(&self.buf[(a - first) as usize..(b - first) as usize], a)?
                }
            }
        }
        Ok(())
    }

    /// Reads what the base holds over `[start, end)` into `base_buf`; false when it is all
    /// known zeros (nothing read).
    fn read_base(&mut self, base: &Chain<'_>, start: u64, end: u64) -> Result<bool, ConvertError> {
        let n = (end - start) as usize;
        if self.base_buf.len() < n {
            self.base_buf.resize(n, 0);
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

    /// Reads `n` bytes of the source at `start` into `buf`; in salvage mode (`warn`) a failed
    /// read is done again sector by sector, each sector that fails warned about and read as
    /// zeros.
    fn read_source(
        &mut self,
        start: u64,
        n: usize,
        warn: Option<&mut dyn FnMut(&ConvertError)>,
    ) -> Result<(), ConvertError> {
        let Err(source) = self.source.read_at(&mut self.buf[..n], start) else {
            return Ok(());
        };
        let Some(warn) = warn else {
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

    #[test]
    fn a_failed_read_in_parallel_stops_the_copy_there() {
        const MIB: usize = 1 << 20;
        for out_of_order in [false, true] {
            let rules = vec![rule(IoType::Read, 5 * MIB as u64 + 4096)];
            let file = MemoryStorage::from_bytes(vec![0x2a; 12 * MIB]);
            let storage = BlkdebugStorage::new(file, 0, rules).unwrap();
            let source = Disk::Raw(RawDisk::new(Box::new(storage), false).unwrap());
            let target = Disk::Raw(
                RawDisk::new(Box::new(MemoryStorage::from_bytes(vec![0; 12 * MIB])), true).unwrap(),
            );
            let options = ConvertOptions {
                out_of_order,
                ..ConvertOptions::default()
            };
            // Eight threads whatever the machine, on 1 MiB chunks.
            let err = run_with(
                &source,
                &target,
                &options,
                8,
                MIB as u64,
                &mut |_, _| {},
                None,
            )
            .unwrap_err();
            assert!(
                matches!(err, ConvertError::Read { offset, .. } if offset == 5 * MIB as u64),
                "{err:?}"
            );
            let mut got = vec![0u8; 12 * MIB];
            target.read_at(&mut got, 0).unwrap();
            assert!(got[5 * MIB..6 * MIB].iter().all(|&b| b == 0));
            if !out_of_order {
                // In guest order, everything before the failed chunk is written and nothing
                // after it.
                assert!(got[..5 * MIB].iter().all(|&b| b == 0x2a));
                assert!(got[6 * MIB..].iter().all(|&b| b == 0));
            }
        }
    }

    /// A raw source of `mib` MiB: runs of random bytes, zeros and holes, from `seed`.
    fn mixed_source(seed: u64, mib: usize) -> Disk {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut bytes = vec![0u8; mib << 20];
        let mut pos = 0;
        while pos < bytes.len() {
            let len = ((next() % (300 << 10)) as usize + 1).min(bytes.len() - pos);
            if next() % 3 == 0 {
                for b in &mut bytes[pos..pos + len] {
                    *b = next() as u8 | 1;
                }
            }
            pos += len;
        }
        Disk::Raw(RawDisk::new(Box::new(MemoryStorage::from_bytes(bytes)), false).unwrap())
    }

    #[test]
    fn many_threads_lay_out_the_file_one_thread_does() {
        use std::sync::Arc;
        const SIZE: u64 = 8 << 20;
        for seed in 1..5 {
            let source = mixed_source(seed, 8);
            let copy = |workers: usize| {
                let storage = Arc::new(MemoryStorage::new());
                let params = CreateParams {
                    image_size: SIZE,
                    cluster_size: 4096,
                    table_size: 1,
                    backing_file: None,
                    backing_raw: false,
                };
                Image::create_on(&*storage, &params).unwrap();
                let image = Image::open_storage(
                    Box::new(storage.clone()),
                    &OpenOptions::read_write(),
                    None,
                )
                .unwrap();
                let target = Disk::Qed(image);
                let options = ConvertOptions {
                    target_is_zero: true,
                    parallel: workers,
                    ..ConvertOptions::default()
                };
                let stats = run_with(
                    &source,
                    &target,
                    &options,
                    workers,
                    256 << 10,
                    &mut |_, _| {},
                    None,
                )
                .unwrap();
                target.close().unwrap();
                (storage.to_bytes(), stats)
            };
            let one = copy(1);
            for workers in [3, 8, 16] {
                assert!(
                    copy(workers) == one,
                    "seed {seed}: {workers} threads differ"
                );
            }
        }
    }
}

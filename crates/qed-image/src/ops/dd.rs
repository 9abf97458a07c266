//! `dd`: copies a part of a disk into a new one, with `qemu-img dd`'s size rules.
//!
//! The input is read from `skip × bs`; the part copied ends at `count × bs` when that is less
//! than the input's size (the skipped part counts against it, as in qemu-img), else at the
//! input's end. A skip past the end gives an empty output. Only data ranges are read (block
//! status), and blocks of zeros are not written: the output is new and reads zeros already.

use crate::{Error, Result};

use super::disk::Disk;
use super::{is_zero, IO_BUF_SIZE};

/// The operands of `qemu-img dd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DdOptions {
    /// Block size (`bs=`, default 512).
    pub block_size: u64,
    /// Blocks to copy at most (`count=`).
    pub count: Option<u64>,
    /// Blocks of the input to skip (`skip=`).
    pub skip: u64,
}

impl Default for DdOptions {
    fn default() -> Self {
        Self {
            block_size: 512,
            count: None,
            skip: 0,
        }
    }
}

/// What to copy: input bytes `[start, end)` to output offset 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DdPlan {
    /// First input byte copied.
    pub start: u64,
    /// Input byte after the last copied.
    pub end: u64,
    /// The skip lies past the input's end (qemu-img warns, and writes an empty output).
    pub skip_past_end: bool,
}

impl DdPlan {
    /// The size of the output: the bytes copied.
    pub fn output_size(&self) -> u64 {
        self.end - self.start
    }
}

/// What to copy from an input of `input_size` bytes, as qemu-img computes it.
pub fn plan(input_size: u64, options: &DdOptions) -> DdPlan {
    let bs = u128::from(options.block_size.max(1));
    let mut end = input_size;
    if let Some(count) = options.count {
        let limit = u128::from(count) * bs;
        if limit <= i64::MAX as u128 && limit < u128::from(end) {
            end = limit as u64;
        }
    }
    let skip = u128::from(options.skip) * bs;
    if skip > i64::MAX as u128 || skip > u128::from(end) {
        return DdPlan {
            start: end,
            end,
            skip_past_end: true,
        };
    }
    DdPlan {
        start: skip as u64,
        end,
        skip_past_end: false,
    }
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DdStats {
    /// Bytes read from the input.
    pub read: u64,
    /// Bytes written to the output.
    pub written: u64,
}

/// Why a copy failed, with the input offset where it did.
#[derive(Debug, thiserror::Error)]
pub enum DdError {
    /// The output is smaller than the plan.
    #[error("{0}")]
    Invalid(Error),
    /// The input's block status could not be found.
    #[error("error while reading block status at offset {offset}: {source}")]
    Status {
        /// Input offset.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
    /// A read of the input failed.
    #[error("error while reading from input image file at offset {offset}: {source}")]
    Read {
        /// Input offset.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
    /// A write to the output failed.
    #[error("error while writing to output image file at offset {offset}: {source}")]
    Write {
        /// Output offset.
        offset: u64,
        /// What failed.
        #[source]
        source: Error,
    },
}

/// Copies what `plan` says from `source` to `target` (new: it reads zeros where nothing is
/// written); `progress(done, total)` follows the bytes covered. The caller closes the target.
pub fn dd(
    source: &Disk,
    target: &Disk,
    plan: &DdPlan,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<DdStats, DdError> {
    let total = plan.output_size();
    if target.size() < total {
        return Err(DdError::Invalid(Error::InvalidArgument(
            "output file is smaller than the bytes to copy".into(),
        )));
    }
    let mut stats = DdStats::default();
    let mut buf = Vec::new();
    progress(0, total);
    for status in source.block_status_with_holes(plan.start, total) {
        let status = status.map_err(|source| DdError::Status {
            offset: plan.start,
            source,
        })?;
        let end = status.offset + status.length;
        if status.kind.is_data() {
            if buf.is_empty() {
                buf.resize(IO_BUF_SIZE, 0);
            }
            let mut at = status.offset;
            while at < end {
                let n = (end - at).min(IO_BUF_SIZE as u64) as usize;
                source
                    .read_at(&mut buf[..n], at)
                    .map_err(|source| DdError::Read { offset: at, source })?;
                stats.read += n as u64;
                if !is_zero(&buf[..n]) {
                    let out = at - plan.start;
                    target
                        .write_at(&buf[..n], out)
                        .map_err(|source| DdError::Write {
                            offset: out,
                            source,
                        })?;
                    stats.written += n as u64;
                }
                at += n as u64;
                progress(at - plan.start, total);
            }
        }
        progress(end - plan.start, total);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(bs: u64, count: Option<u64>, skip: u64) -> DdOptions {
        DdOptions {
            block_size: bs,
            count,
            skip,
        }
    }

    #[test]
    fn sizes_as_qemu_img_computes_them() {
        let size = 3 << 20;
        // Everything.
        assert_eq!(plan(size, &DdOptions::default()).output_size(), size);
        // count × bs counts from the start of the input, the skip included.
        let p = plan(size, &opts(65536, Some(3), 1));
        assert_eq!((p.start, p.end, p.output_size()), (65536, 196608, 131072));
        // A count past the end copies to the end.
        assert_eq!(plan(size, &opts(65536, Some(1000), 0)).end, size);
        assert_eq!(plan(size, &opts(512, Some(0), 0)).output_size(), 0);
        let past = plan(size, &opts(512, None, 100_000));
        assert!(past.skip_past_end);
        assert_eq!(past.output_size(), 0);
        assert!(plan(size, &opts(1 << 30, None, u64::MAX)).skip_past_end);
    }
}

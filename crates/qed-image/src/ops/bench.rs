//! `bench`: many reads or writes of one size on a disk, with a queue depth, as `qemu-img
//! bench` runs them, timed.
//!
//! Request `i` goes to the same offset as in qemu-img: the first to the start offset, each
//! next one a step further, wrapping around the disk. The queue depth is
//! the number of worker threads that issue requests at once on the one shared disk (at most
//! [`MAX_WORKERS`], and fewer when their buffers would pass [`MAX_BUFFER_BYTES`]). With a
//! flush interval, a flush follows every that many requests: after the requests in flight
//! have completed (drained, as qemu-img does by default), or alongside them.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{Error, Result};

use super::disk::Disk;

/// Most worker threads a run starts, whatever the queue depth.
pub const MAX_WORKERS: usize = 256;

/// Most bytes of request buffers a run holds (at least one buffer).
pub const MAX_BUFFER_BYTES: usize = 256 << 20;

/// How to run the benchmark (qemu-img bench's options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchOptions {
    /// Requests in all (`-c`).
    pub count: u64,
    /// Requests in flight at once (`-d`).
    pub depth: usize,
    /// Bytes per request (`-s`).
    pub buffer_size: usize,
    /// Distance between the offsets of consecutive requests (`-S`; 0 means the buffer size).
    pub step: u64,
    /// Offset of the first request (`-o`).
    pub offset: u64,
    /// Write instead of read (`-w`).
    pub write: bool,
    /// The byte written (`--pattern`).
    pub pattern: u8,
    /// A flush after every this many requests (0: none).
    pub flush_interval: u64,
    /// Wait for the requests in flight before each flush (`--no-drain` turns it off).
    pub drain: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            count: 75_000,
            depth: 64,
            buffer_size: 4096,
            step: 0,
            offset: 0,
            write: false,
            pattern: 0,
            flush_interval: 0,
            drain: true,
        }
    }
}

impl BenchOptions {
    /// The step between requests: [`BenchOptions::step`], or the buffer size for 0.
    pub fn effective_step(&self) -> u64 {
        if self.step == 0 {
            self.buffer_size as u64
        } else {
            self.step
        }
    }

    /// The offset of request `i` on a disk of `size` bytes: the start offset, then a step
    /// further each time, wrapping modulo the disk's size as qemu-img 10.0 wraps it (so a
    /// wrapped request can run past the end and fail, as there; later QEMU wraps modulo the
    /// size less one buffer).
    pub fn offset_of(&self, i: u64, size: u64) -> u64 {
        if i == 0 {
            return self.offset;
        }
        if size == 0 {
            return 0;
        }
        let step = u128::from(self.effective_step());
        ((u128::from(self.offset) + u128::from(i) * step) % u128::from(size)) as u64
    }

    /// The worker threads a run starts.
    pub fn workers(&self) -> usize {
        let by_memory = (MAX_BUFFER_BYTES / self.buffer_size.max(1)).max(1);
        let count = usize::try_from(self.count).unwrap_or(usize::MAX);
        self.depth.min(MAX_WORKERS).min(by_memory).min(count).max(1)
    }
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A read or write failed.
    #[error("request failed: {0}")]
    Request(#[source] Error),
    /// A flush failed.
    #[error("flush failed: {0}")]
    Flush(#[source] Error),
}

/// The shared progress of a run.
#[derive(Debug, Default)]
struct State {
    /// The next request to hand out.
    next: u64,
    /// Requests completed.
    completed: u64,
    /// Flush points (multiples of the interval) passed with a drained flush.
    flushed: u64,
    /// A worker is flushing.
    flushing: bool,
    /// The first failure; everyone stops.
    failed: Option<BenchError>,
}

/// Runs the benchmark on `disk` (open for writing when `options.write`); returns the time it
/// took.
pub fn bench(disk: &Disk, options: &BenchOptions) -> Result<Duration, BenchError> {
    let state = Mutex::new(State::default());
    let changed = Condvar::new();
    let size = disk.size();
    let mut buffers = Vec::with_capacity(options.workers());
    for _ in 0..options.workers() {
        let mut buf = Vec::new();
        buf.try_reserve_exact(options.buffer_size).map_err(|_| {
            BenchError::Request(Error::TooLarge {
                what: "request buffer",
                bytes: options.buffer_size as u64,
                limit: 0,
            })
        })?;
        buf.resize(options.buffer_size, options.pattern);
        buffers.push(buf);
    }
    let started = Instant::now();
    std::thread::scope(|scope| {
        for buf in buffers {
            let (state, changed) = (&state, &changed);
            scope.spawn(move || worker(disk, options, size, buf, state, changed));
        }
    });
    let elapsed = started.elapsed();
    match state.into_inner().unwrap_or_else(|e| e.into_inner()).failed {
        Some(e) => Err(e),
        None => Ok(elapsed),
    }
}

fn worker(
    disk: &Disk,
    options: &BenchOptions,
    size: u64,
    mut buf: Vec<u8>,
    state: &Mutex<State>,
    changed: &Condvar,
) {
    let interval = options.flush_interval;
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let mut st = lock();
    loop {
        if st.failed.is_some() || st.next >= options.count {
            return;
        }
        if interval > 0 && options.drain {
            // The flush point before the next request: everything before it completed and
            // flushed before it starts.
            let point = st.next / interval;
            if point > st.flushed {
                if st.completed == st.next && !st.flushing {
                    st.flushing = true;
                    drop(st);
                    let result = disk.flush();
                    st = lock();
                    st.flushing = false;
                    st.flushed = point;
                    if let Err(e) = result {
                        st.failed.get_or_insert(BenchError::Flush(e));
                    }
                    changed.notify_all();
                } else {
                    st = changed.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                continue;
            }
        }
        let i = st.next;
        st.next += 1;
        drop(st);
        let offset = options.offset_of(i, size);
        let result = if options.write {
            disk.write_at(&buf, offset)
        } else {
            disk.read_at(&mut buf, offset)
        };
        let flush_now = result.is_ok() && interval > 0 && !options.drain;
        let flushed = if flush_now && (i + 1) % interval == 0 {
            disk.flush().map_err(BenchError::Flush)
        } else {
            Ok(())
        };
        st = lock();
        st.completed += 1;
        if let Err(e) = result {
            st.failed.get_or_insert(BenchError::Request(e));
        }
        if let Err(e) = flushed {
            st.failed.get_or_insert(e);
        }
        changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::RawDisk;
    use crate::storage::MemoryStorage;

    #[test]
    fn offsets_wrap_as_in_qemu_img() {
        let options = BenchOptions {
            offset: 4096,
            step: 131072,
            buffer_size: 65536,
            ..BenchOptions::default()
        };
        let size = 1 << 20;
        assert_eq!(options.offset_of(0, size), 4096);
        assert_eq!(options.offset_of(1, size), 135168);
        // Wraps modulo the size, as qemu-img 10.0 does.
        assert_eq!(options.offset_of(8, size), 4096);
        assert_eq!(options.offset_of(9, size), 135168);
        assert_eq!(options.offset_of(3, 0), 0);
    }

    #[test]
    fn runs_writes_with_flushes() {
        let disk = Disk::Raw(
            RawDisk::new(Box::new(MemoryStorage::from_bytes(vec![0; 1 << 20])), true).unwrap(),
        );
        for drain in [true, false] {
            let options = BenchOptions {
                count: 100,
                depth: 4,
                write: true,
                pattern: 7,
                flush_interval: 8,
                drain,
                ..BenchOptions::default()
            };
            bench(&disk, &options).unwrap();
        }
        let mut buf = vec![0; 100 * 4096];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        let past = BenchOptions {
            count: 3,
            offset: 2 << 20,
            ..BenchOptions::default()
        };
        assert!(matches!(bench(&disk, &past), Err(BenchError::Request(_))));
    }
}

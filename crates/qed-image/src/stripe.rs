//! Per-thread stripes: state that many threads update without sharing a cache line.
//!
//! A thread is given a stripe index the first time it asks; counters and the I/O gate keep one
//! cell per stripe, each on its own cache line, so threads on different stripes never write
//! the same line.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Number of stripes.
pub(crate) const STRIPES: usize = 16;

/// A value alone on its cache line (128 bytes: adjacent-line prefetch pairs lines on x86).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

/// The calling thread's stripe index.
pub(crate) fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    MINE.with(|s| *s)
}

/// A counter that each thread bumps in its own stripe; reading it sums the stripes.
#[derive(Debug, Default)]
pub(crate) struct Counter {
    cells: [Padded<AtomicU64>; STRIPES],
}

impl Counter {
    pub(crate) fn add(&self, n: u64) {
        self.cells[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sum(&self) -> u64 {
        self.cells
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_sums_every_thread() {
        let counter = Counter::default();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        counter.add(1);
                    }
                });
            }
        });
        assert_eq!(counter.sum(), 8000);
        assert_eq!(std::mem::align_of::<Padded<AtomicU64>>(), 128);
    }
}

//! Reply and payload buffers of one connection, used again instead of allocated per request.
//!
//! A fresh buffer of a large read is fresh memory: the kernel maps and zeroes its pages on
//! first touch, which costs more than the read itself. Buffers come back here once their
//! reply is sent (or their payload written) and the next request takes one. What is kept is
//! bounded: at most [`Buffers::new`]'s byte limit in all, and no single buffer over
//! [`MAX_KEPT`].

use std::sync::Mutex;

/// The largest buffer kept for reuse (a larger one, up to the 32 MiB request maximum, is
/// freed once used).
pub const MAX_KEPT: usize = 4 << 20;

/// Idle buffers, bounded in bytes.
#[derive(Debug)]
pub struct Buffers {
    limit: usize,
    idle: Mutex<Idle>,
}

#[derive(Debug, Default)]
struct Idle {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

impl Buffers {
    /// A pool keeping at most `limit` bytes of idle buffers.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            idle: Mutex::new(Idle::default()),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        // A panic while holding the lock leaves a valid list.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty buffer, with capacity from an earlier request when one is idle.
    pub fn take(&self) -> Vec<u8> {
        let mut idle = self.idle();
        match idle.buffers.pop() {
            Some(buf) => {
                idle.bytes -= buf.capacity();
                buf
            }
            None => Vec::new(),
        }
    }

    /// Gives a used buffer back; kept if it fits the bounds, else freed.
    pub fn give(&self, mut buf: Vec<u8>) {
        let capacity = buf.capacity();
        if capacity == 0 || capacity > MAX_KEPT {
            return;
        }
        buf.clear();
        let mut idle = self.idle();
        if idle.bytes + capacity <= self.limit {
            idle.bytes += capacity;
            idle.buffers.push(buf);
        }
    }

    /// Bytes held by idle buffers.
    #[cfg(test)]
    pub fn idle_bytes(&self) -> usize {
        self.idle().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_within_the_bounds() {
        let pool = Buffers::new(1 << 20);
        let mut a = pool.take();
        a.resize(300_000, 7);
        let cap = a.capacity();
        pool.give(a);
        assert_eq!(pool.idle_bytes(), cap);
        let b = pool.take();
        assert!(b.is_empty(), "a reused buffer comes back empty");
        assert_eq!(b.capacity(), cap, "and keeps its capacity");
        assert_eq!(pool.idle_bytes(), 0);
        // Past the byte limit, and past the largest kept size: freed.
        for _ in 0..5 {
            pool.give(vec![0u8; 300_000]);
        }
        assert!(pool.idle_bytes() <= 1 << 20);
        pool.give(vec![0u8; MAX_KEPT + 1]);
        assert!(pool.idle_bytes() <= 1 << 20);
        assert_eq!(pool.idle().buffers.len(), 3);
    }
}

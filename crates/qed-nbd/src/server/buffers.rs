//! Reply and payload buffers of one connection, used again instead of allocated per request.
//!
//! A fresh buffer of a large read is fresh memory: the kernel maps and zeroes its pages on
//! first touch, which costs more than the read itself. Buffers come back here once their
//! reply is sent (or their payload written) and the next request takes one. What is kept is
//! bounded: at most [`Buffers::new`]'s byte limit in all, and no single buffer over
//! [`MAX_KEPT`].
//!
//! A buffer comes back as it was sent, at its length: its bytes stay initialised (stale bytes
//! of an earlier reply or payload), so the next user sets its length with [`fit`], which zeroes
//! only what the buffer lacks, and overwrites every byte it sends. Zeroing a whole read reply
//! before the file read overwrote it was 12% of the server's CPU under `nbdcopy`.

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

    /// A buffer from an earlier request when one is idle (its length and bytes are that
    /// request's: stale, never to be sent as they are), else an empty one.
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

    /// Gives a used buffer back, bytes and all; kept if it fits the bounds, else freed.
    pub fn give(&self, buf: Vec<u8>) {
        let capacity = buf.capacity();
        if capacity == 0 || capacity > MAX_KEPT {
            return;
        }
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

/// Makes `buf` exactly `len` bytes long, every byte initialised: a longer buffer is cut, a
/// shorter one grows by zeros (only the growth is written). What was in it stays: the caller
/// overwrites all of it before sending it. A buffer without the capacity starts over (its
/// stale bytes are not copied) at exactly `len`.
pub fn fit(buf: &mut Vec<u8>, len: usize) {
    if len > buf.capacity() {
        // A new allocation: growing this one would copy the stale bytes.
        *buf = Vec::with_capacity(len);
    }
    if len <= buf.len() {
        buf.truncate(len);
    } else {
        buf.resize(len, 0);
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
        assert_eq!(b.len(), 300_000, "a reused buffer comes back at its length");
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

    #[test]
    fn fit_zeroes_only_the_growth() {
        let mut buf = vec![7u8; 100];
        fit(&mut buf, 40);
        assert_eq!(buf, [7u8; 40], "cut, not zeroed");
        let cap = buf.capacity();
        fit(&mut buf, 90);
        assert_eq!(buf.capacity(), cap, "grown in place");
        assert_eq!(&buf[..40], &[7u8; 40]);
        assert_eq!(&buf[40..], &[0u8; 50]);
        fit(&mut buf, 1000);
        assert_eq!(buf, vec![0u8; 1000], "beyond the capacity: a fresh start");
        assert_eq!(buf.capacity(), 1000, "at exactly the length asked");
        fit(&mut buf, 0);
        assert!(buf.is_empty());
    }
}

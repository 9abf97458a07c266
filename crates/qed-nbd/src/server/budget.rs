//! The in-flight budget of one connection: at most N requests and B bytes of buffers at once.
//! The reader takes before it reads a payload or hands a request on; the writer gives back
//! once the reply is on the wire. While the budget is spent the reader stops reading, so the
//! client's requests wait in the socket, not in memory.

use std::sync::{Condvar, Mutex};

/// Requests and bytes in flight, bounded.
#[derive(Debug)]
pub struct Budget {
    max_requests: usize,
    max_bytes: usize,
    used: Mutex<(usize, usize)>,
    freed: Condvar,
}

impl Budget {
    /// A budget of `max_requests` requests and `max_bytes` bytes.
    pub fn new(max_requests: usize, max_bytes: usize) -> Self {
        Self {
            max_requests: max_requests.max(1),
            max_bytes,
            used: Mutex::new((0, 0)),
            freed: Condvar::new(),
        }
    }

    /// Waits until one more request of `bytes` fits, then takes it. A request larger than the
    /// whole byte budget waits until nothing else is in flight.
    pub fn take(&self, bytes: usize) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (n, b) = *used;
            let fits = n < self.max_requests && (b + bytes <= self.max_bytes || n == 0);
            if fits {
                *used = (n + 1, b + bytes);
                return;
            }
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Gives back one request of `bytes`.
    pub fn give(&self, bytes: usize) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.0 = used.0.saturating_sub(1);
        used.1 = used.1.saturating_sub(bytes);
        self.freed.notify_all();
    }

    /// Waits until nothing is in flight.
    pub fn drain(&self) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while used.0 > 0 {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Requests and bytes in flight now.
    pub fn in_flight(&self) -> (usize, usize) {
        *self.used.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn takes_until_full_then_waits_for_a_give() {
        let b = Arc::new(Budget::new(2, 100));
        b.take(60);
        b.take(0);
        assert_eq!(b.in_flight(), (2, 60));
        let b2 = Arc::clone(&b);
        let waiter = std::thread::spawn(move || b2.take(50));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(b.in_flight(), (2, 60), "the third request waits");
        b.give(0);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(b.in_flight(), (1, 60), "still too many bytes");
        b.give(60);
        waiter.join().unwrap();
        assert_eq!(b.in_flight(), (1, 50));
        b.give(50);
        b.drain();
    }

    #[test]
    fn an_oversized_request_runs_alone() {
        let b = Budget::new(4, 10);
        b.take(1000);
        assert_eq!(b.in_flight(), (1, 1000));
        b.give(1000);
        assert_eq!(b.in_flight(), (0, 0));
    }
}

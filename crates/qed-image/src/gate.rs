//! The I/O gate: requests pass it shared, operations that change the image's shape (resize,
//! a new backing file, check and repair) pass it exclusive, so no request sees half a change.
//!
//! The shared side is striped by thread: a request takes one read lock that only threads of its
//! stripe touch, so requests on different threads never write the same cache line. The
//! exclusive side takes every stripe, in order.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::stripe::{stripe, Padded, STRIPES};

#[derive(Debug, Default)]
pub(crate) struct IoGate {
    stripes: [Padded<RwLock<()>>; STRIPES],
}

/// Held by a request while it runs.
pub(crate) struct Shared<'a>(#[allow(dead_code)] RwLockReadGuard<'a, ()>);

/// Held by a shape change: no request runs meanwhile.
pub(crate) struct Exclusive<'a>(#[allow(dead_code)] Vec<RwLockWriteGuard<'a, ()>>);

impl IoGate {
    /// Passes the gate for one request. Never call while holding [`IoGate::exclusive`].
    pub(crate) fn shared(&self) -> Shared<'_> {
        Shared(
            self.stripes[stripe()]
                .0
                .read()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Waits for every request to finish and keeps new ones out.
    pub(crate) fn exclusive(&self) -> Exclusive<'_> {
        Exclusive(
            self.stripes
                .iter()
                .map(|s| s.0.write().unwrap_or_else(|e| e.into_inner()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[test]
    fn exclusive_waits_for_every_request_and_keeps_new_ones_out() {
        let gate = IoGate::default();
        let inside = AtomicUsize::new(0);
        let changing = AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..2000 {
                        let _pass = gate.shared();
                        assert!(!changing.load(Ordering::SeqCst));
                        inside.fetch_add(1, Ordering::SeqCst);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..50 {
                    let _all = gate.exclusive();
                    changing.store(true, Ordering::SeqCst);
                    assert_eq!(inside.load(Ordering::SeqCst), 0);
                    changing.store(false, Ordering::SeqCst);
                }
            });
        });
    }
}

//! The idle timer: once metadata has not changed for a while, write it back and clear
//! NEED_CHECK, so a long-running writer leaves a clean image between bursts.
//!
//! The timer sleeps until exactly `idle` after the last change; a change meanwhile moves the
//! deadline. A failure to write back poisons the image, so the next request (and the close)
//! reports it.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::state::Shared;
use crate::{Error, Result};

/// A background thread per writable image.
pub(crate) struct IdleTimer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl IdleTimer {
    pub(crate) fn start(shared: Weak<Shared>, idle: Duration) -> Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = stop.clone();
        let thread = std::thread::Builder::new()
            .name("qed-idle".into())
            .spawn(move || run(shared, idle, signal))
            .map_err(Error::io("start the idle timer thread", 0))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    pub(crate) fn stop(mut self) {
        self.signal_stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn signal_stop(&self) {
        let (flag, cond) = &*self.stop;
        *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cond.notify_all();
    }
}

impl Drop for IdleTimer {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// Sleeps until `deadline` or a stop; returns whether to stop.
fn sleep_until(stop: &(Mutex<bool>, Condvar), deadline: Instant) -> bool {
    let (flag, cond) = stop;
    let mut stopped = flag.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if *stopped {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        stopped = cond
            .wait_timeout(stopped, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn run(shared: Weak<Shared>, idle: Duration, stop: Arc<(Mutex<bool>, Condvar)>) {
    let mut deadline = Instant::now() + idle;
    loop {
        if sleep_until(&stop, deadline) {
            return;
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        match shared.activity.last_change() {
            // Changed within the period: wait until a whole period after that change.
            Some(last) if now < last + idle => {
                deadline = last + idle;
                continue;
            }
            _ => deadline = now + idle,
        }
        let dirty = shared.header.need_check_on_disk()
            || shared.tables.l1.is_dirty()
            || shared.tables.dirty_bytes() > 0;
        if dirty && !shared.health.is_poisoned() {
            // A failure poisons the image: the next request and the close report it.
            let _ = shared.mark_clean();
        }
    }
}

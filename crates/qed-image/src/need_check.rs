//! The idle timer: once allocation has been quiet for a while, write metadata back and clear
//! NEED_CHECK, so a long-running writer leaves a clean image between bursts.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::image::Inner;

/// A background thread per writable image.
pub(crate) struct IdleTimer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl IdleTimer {
    pub(crate) fn start(inner: Weak<Inner>, idle: Duration) -> Self {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = stop.clone();
        let thread = std::thread::Builder::new()
            .name("qed-idle".into())
            .spawn(move || run(inner, idle, signal))
            .ok();
        Self { stop, thread }
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

fn run(inner: Weak<Inner>, idle: Duration, stop: Arc<(Mutex<bool>, Condvar)>) {
    let (flag, cond) = &*stop;
    let mut seen = u64::MAX;
    loop {
        {
            let stopped = flag.lock().unwrap_or_else(|e| e.into_inner());
            let (stopped, _) = cond
                .wait_timeout_while(stopped, idle, |s| !*s)
                .unwrap_or_else(|e| e.into_inner());
            if *stopped {
                return;
            }
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = inner.generation.load(Ordering::Acquire);
        let dirty = inner.need_check_on_disk.load(Ordering::Acquire)
            || inner.l1.is_dirty()
            || !inner.cache.dirty_tables().is_empty();
        // Quiet for a whole period since the last look: clean up.
        if now == seen && dirty && !inner.poisoned.load(Ordering::Acquire) {
            let _ = inner.mark_clean();
        }
        seen = now;
    }
}

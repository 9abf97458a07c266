//! A fixed pool of worker threads shared by every connection: they run requests against the
//! image and never touch a socket.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Worker threads fed from one queue. The queue is bounded by the connections' budgets (each
/// connection has at most its budget of requests queued or running).
#[derive(Debug)]
pub struct Pool {
    queue: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `n` workers (at least one).
    pub fn new(n: usize) -> std::io::Result<Self> {
        let (queue, jobs) = channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        let mut workers = Vec::new();
        for i in 0..n.max(1) {
            let jobs = Arc::clone(&jobs);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("nbd-worker-{i}"))
                    .spawn(move || work(&jobs))?,
            );
        }
        Ok(Self {
            queue: Some(queue),
            workers,
        })
    }

    /// Queues a job.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(q) = &self.queue {
            // The workers outlive the queue's sender, so a send cannot fail.
            let _ = q.send(Box::new(job));
        }
    }
}

fn work(jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let jobs = jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.recv()
        };
        match job {
            // A panicking job must not take its worker with it.
            Ok(job) => {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
            Err(_) => return,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the queue ends the workers once it is empty.
        self.queue = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_panicking_job_leaves_its_worker_running() {
        let count = Arc::new(AtomicUsize::new(0));
        let pool = Pool::new(1).unwrap();
        pool.submit(|| panic!("job failure"));
        let c = Arc::clone(&count);
        pool.submit(move || {
            c.fetch_add(1, Ordering::Relaxed);
        });
        drop(pool);
        assert_eq!(count.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn runs_every_job_before_drop_returns() {
        let count = Arc::new(AtomicUsize::new(0));
        let pool = Pool::new(3).unwrap();
        for _ in 0..100 {
            let c = Arc::clone(&count);
            pool.submit(move || {
                c.fetch_add(1, Ordering::Relaxed);
            });
        }
        drop(pool);
        assert_eq!(count.load(Ordering::Relaxed), 100);
    }
}

//! Conversion with several chunks in flight: read by threads of their own, written in guest
//! order (or, when allowed, as they come).
//!
//! The walk of the source runs in the calling thread and hands tasks, numbered in guest
//! order, to the worker threads over a queue as long as the number of workers. Each worker
//! reads and plans its task with buffers of its own; in order, it then waits at the [`Gate`]
//! for its number to come up, writes, and passes the turn on, so the target sees the writes
//! a copy in one thread makes, in the same order. A failure stops the walk and every worker:
//! in order it is reported at its turn, so everything before it is written and nothing after
//! it, as in one thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::Error;

use super::{ConvertError, ConvertStats, Disk, Task, Walk, Work, Worker, Writer};

/// The turn of writes in guest order.
struct Gate<'a> {
    turn: Mutex<Turn<'a>>,
    /// Where the worker holding task `seq` waits: slot `seq % slots.len()`. The tasks not
    /// yet written are held by distinct workers, so their numbers lie within one worker
    /// count of the turn's and no two of them share a slot: a turn wakes only its own task.
    slots: Vec<Condvar>,
}

impl Gate<'_> {
    fn slot(&self, seq: u64) -> &Condvar {
        &self.slots[(seq % self.slots.len() as u64) as usize]
    }
}

/// Whose writes come next, and the target side they go through.
struct Turn<'a> {
    next: u64,
    writer: Writer<'a>,
}

/// What the calling thread and the workers share.
struct Shared<'a> {
    /// In guest order: the turn; out of order, each worker writes through its own writer.
    gate: Option<Gate<'a>>,
    /// Something failed: the walk stops, workers drop what they hold.
    stop: AtomicBool,
    /// The failure earliest in guest order, with its task's number.
    failure: Mutex<Option<(u64, ConvertError)>>,
    /// Bytes of the tasks done.
    done: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Records the failure of task `seq` (the one earliest in guest order is kept) and stops
    /// the walk and the workers; [`Shared::halt`] wakes those waiting.
    fn record(&self, seq: u64, error: ConvertError) {
        let mut failure = lock(&self.failure);
        if failure.as_ref().is_none_or(|(at, _)| seq < *at) {
            *failure = Some((seq, error));
        }
        self.stop.store(true, Ordering::Release);
    }

    /// Stops the walk and wakes every worker waiting for its turn. Not called with the turn
    /// held.
    fn halt(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(gate) = &self.gate {
            // Taken so that a worker between its check and its wait cannot miss the wake-up.
            drop(lock(&gate.turn));
            for slot in &gate.slots {
                slot.notify_all();
            }
        }
    }
}

/// Halts everything when a worker unwinds, so that no other waits forever for its turn, and
/// empties the queue, so that the walk is not left waiting for room if every worker is gone
/// (it sends one task more at most, then sees the stop).
struct HaltOnPanic<'s, 'a>(&'s Shared<'a>, &'s Mutex<Receiver<(u64, Task)>>);

impl Drop for HaltOnPanic<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.halt();
            let queue = lock(self.1);
            while queue.try_recv().is_ok() {}
        }
    }
}

/// Copies the tasks `walk` makes with `parallel` workers, each a fresh copy of `worker`.
pub(super) fn run(
    worker: Worker<'_>,
    target: &Disk,
    shift: u64,
    parallel: usize,
    out_of_order: bool,
    walk: Walk<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats, ConvertError> {
    let size = worker.source.size();
    let shared = Shared {
        gate: (!out_of_order).then(|| Gate {
            turn: Mutex::new(Turn {
                next: 0,
                writer: Writer::new(target, shift),
            }),
            slots: (0..parallel).map(|_| Condvar::new()).collect(),
        }),
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        done: AtomicU64::new(0),
    };
    let (sender, receiver) = sync_channel::<(u64, Task)>(parallel);
    let queue = Mutex::new(receiver);
    let (walked, mut stats) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                let worker = worker.fresh();
                let writer = out_of_order.then(|| Writer::new(target, shift));
                let (shared, queue) = (&shared, &queue);
                scope.spawn(move || work(shared, queue, worker, writer))
            })
            .collect();
        let mut seq = 0;
        let mut skipped = 0;
        let stopped = || ConvertError::Invalid(Error::InvalidArgument("stopped".into()));
        let walked = walk(&mut |task| {
            if shared.stopped() {
                return Err(stopped());
            }
            if task.work == Work::Skip {
                skipped += task.end - task.start;
            } else {
                sender.send((seq, task)).map_err(|_| stopped())?;
                seq += 1;
            }
            progress(skipped + shared.done.load(Ordering::Relaxed), size);
            Ok(())
        });
        drop(sender);
        let mut stats = ConvertStats::default();
        for worker in workers {
            // A worker's panic is the caller's.
            let (read, own) = worker
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            stats.read += read;
            stats.written += own.written;
            stats.zeroed += own.zeroed;
        }
        (walked, stats)
    });
    if let Some((_, error)) = lock(&shared.failure).take() {
        return Err(error);
    }
    walked?;
    if let Some(gate) = &shared.gate {
        let mut turn = lock(&gate.turn);
        turn.writer.flush_zero()?;
        stats.written += turn.writer.stats.written;
        stats.zeroed += turn.writer.stats.zeroed;
    }
    Ok(stats)
}

/// One worker thread: takes tasks until the queue closes. Returns the bytes it read and what
/// its own writer (out of order) wrote.
fn work(
    shared: &Shared<'_>,
    queue: &Mutex<Receiver<(u64, Task)>>,
    mut worker: Worker<'_>,
    mut writer: Option<Writer<'_>>,
) -> (u64, ConvertStats) {
    let _halt = HaltOnPanic(shared, queue);
    loop {
        let Ok((seq, task)) = lock(queue).recv() else {
            break;
        };
        let prepared = (!shared.stopped()).then(|| worker.prepare(&task, None));
        match (&shared.gate, writer.as_mut()) {
            (Some(gate), _) => {
                let mut turn = lock(&gate.turn);
                while turn.next != seq && !shared.stopped() {
                    turn = gate
                        .slot(seq)
                        .wait(turn)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                let result = match prepared {
                    Some(prepared) if !shared.stopped() => {
                        prepared.and_then(|()| worker.apply(&mut turn.writer))
                    }
                    _ => Ok(()),
                };
                turn.next += 1;
                let next = turn.next;
                match result {
                    Ok(()) => {
                        drop(turn);
                        gate.slot(next).notify_all();
                    }
                    Err(error) => {
                        // Recorded, and everything stopped, before the turn passes: no later
                        // task may write.
                        shared.record(seq, error);
                        drop(turn);
                        // Tests: a later worker that missed the stop would write now.
                        #[cfg(test)]
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        shared.halt();
                    }
                }
            }
            (None, Some(writer)) => {
                let result = match prepared {
                    // Out of order, what is read after a failure is not written either.
                    Some(prepared) if !shared.stopped() => {
                        prepared.and_then(|()| worker.apply(writer))
                    }
                    _ => Ok(()),
                };
                if let Err(error) = result {
                    shared.record(seq, error);
                    shared.halt();
                }
            }
            (None, None) => unreachable!("out of order, every worker has a writer"),
        }
        shared
            .done
            .fetch_add(task.end - task.start, Ordering::Relaxed);
    }
    let mut stats = ConvertStats::default();
    if let Some(mut writer) = writer {
        if let Err(error) = writer.flush_zero() {
            shared.record(u64::MAX, error);
            shared.halt();
        }
        stats = writer.stats;
    }
    (worker.read, stats)
}

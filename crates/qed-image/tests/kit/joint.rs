//! Crash states of an operation on several files at once (commit: the overlay and its
//! backing file). Each file is a [`CrashStorage`] behind a [`Sequenced`] wrapper that records,
//! on one shared [`Timeline`], how far each file's log had come after every change. A power
//! loss at any instant leaves every file in a crash state of its own log at the point it had
//! reached then: [`explore_joint`] pairs each crash state of one file with the prefix states
//! the other files were at while it was at that point.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex};

use qed_image::storage::{CrashOptions, CrashStorage, Storage};

/// How far each file's log had come, after each change of any of them.
#[derive(Debug, Default)]
pub struct Timeline {
    /// After each change: the operation count of every file.
    snapshots: Mutex<Vec<Vec<usize>>>,
    files: Mutex<Vec<Arc<CrashStorage>>>,
}

impl Timeline {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds a file; its storage records on this timeline.
    pub fn add(self: &Arc<Self>, file: Arc<CrashStorage>) -> Sequenced {
        let mut files = self.files.lock().unwrap();
        files.push(file.clone());
        Sequenced {
            inner: file,
            timeline: Arc::clone(self),
        }
    }

    fn record(&self) {
        let files = self.files.lock().unwrap();
        let counts = files.iter().map(|f| f.op_count()).collect();
        self.snapshots.lock().unwrap().push(counts);
    }

    /// The timeline of one file on its own, whose log holds `ops` operations: one instant
    /// after each.
    pub fn single(ops: usize) -> Self {
        Self {
            snapshots: Mutex::new((1..=ops).map(|n| vec![n]).collect()),
            files: Mutex::default(),
        }
    }

    /// The operation counts of every file at every instant, the start included.
    pub fn instants(&self) -> Vec<Vec<usize>> {
        let snapshots = self.snapshots.lock().unwrap();
        let width = snapshots
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
            .max(self.files.lock().unwrap().len());
        let mut all = vec![vec![0; width]];
        for snapshot in snapshots.iter() {
            let mut counts = snapshot.clone();
            counts.resize(width, 0);
            all.push(counts);
        }
        all
    }
}

/// A [`CrashStorage`] that marks the shared timeline after each change. `write_zeroes` keeps
/// the default (writes through `write_at`), so every logged operation gets its instant.
#[derive(Debug)]
pub struct Sequenced {
    inner: Arc<CrashStorage>,
    timeline: Arc<Timeline>,
}

impl Sequenced {
    fn after<T>(&self, result: io::Result<T>) -> io::Result<T> {
        self.timeline.record();
        result
    }
}

impl Storage for Sequenced {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.after(self.inner.write_at(buf, offset))
    }
    fn flush(&self) -> io::Result<()> {
        self.after(self.inner.flush())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.after(self.inner.set_len(len))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.after(self.inner.punch_hole(offset, len))
    }
}

/// Runs `verify` on every joint crash state of `files` (in the timeline's order): each crash
/// state of one file, with every other file at a prefix it was at while the first was at that
/// point. Panics with the first failures; returns the number of joint states.
pub fn explore_joint(
    what: &str,
    timeline: &Timeline,
    files: &[Arc<CrashStorage>],
    options: &CrashOptions,
    mut verify: impl FnMut(&[Vec<u8>]) -> Result<(), String>,
) -> u64 {
    let instants = timeline.instants();
    let mut count = 0;
    let mut failures = Vec::new();
    for (i, file) in files.iter().enumerate() {
        for state in file.crash_states(options) {
            // The other files' points while this one was at the state's.
            let others: BTreeSet<Vec<usize>> = instants
                .iter()
                .filter(|cuts| cuts[i] == state.cut)
                .cloned()
                .collect();
            assert!(
                !others.is_empty(),
                "{what}: file {i}, cut {} never seen on the timeline",
                state.cut
            );
            for cuts in others {
                let disks: Vec<Vec<u8>> = files
                    .iter()
                    .enumerate()
                    .map(|(j, f)| {
                        if j == i {
                            state.bytes.clone()
                        } else {
                            f.replay(cuts[j])
                        }
                    })
                    .collect();
                count += 1;
                if let Err(e) = verify(&disks) {
                    failures.push(format!(
                        "{what}: file {i} {:?} cut {} (durable {}, applied {:?}, torn {:?}), \
                         others at {cuts:?}: {e}",
                        state.kind, state.cut, state.durable, state.applied, state.torn
                    ));
                    if failures.len() >= 3 {
                        panic!("{}", failures.join("\n"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{what}: {count} joint crash states");
    count
}

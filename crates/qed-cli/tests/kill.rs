//! Killed writers: `qed io` runs a long list of allocating and in-place writes, zero writes,
//! discards and flushes and is killed with SIGKILL at a random moment. The image must then
//! pass `qemu-img check` without corruption (leaks allowed), reopen cleanly (a writable open
//! repairs a dirty image), check clean afterwards, and hold every write a completed flush
//! covered.
//!
//! Which commands completed is read from qed io's stdout: a write or discard prints its line
//! when it is done; a flush prints nothing (as in qemu-io), so a flush counts as completed
//! when a later command printed its line. Bytes touched by a command after the last completed
//! flush are not verified (they may hold old or new data); every other byte must read as the
//! model says.
//!
//! Seeded (env `QED_KILL_SEED` overrides the seed); the failure message names the round.

mod common;

use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Rounds per image stream (two streams: without and with a raw backing file).
const ROUNDS: usize = 10;
/// Commands per `qed io` run (a debug build needs ~0.3 s for them, so kills land inside).
const COMMANDS: usize = 600;

/// splitmix64: small, seedable, good enough for test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `range` (not empty).
    fn range(&mut self, range: Range<u64>) -> u64 {
        range.start + self.next() % (range.end - range.start)
    }

    fn percent(&mut self) -> u64 {
        self.range(0..100)
    }
}

/// One `qed io` command and its effect on the guest view.
#[derive(Debug, Clone)]
enum Op {
    Write {
        pattern: u8,
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    /// Whole clusters only: they read as zeros afterwards (over a backing file too).
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

impl Op {
    fn command(&self) -> String {
        match self {
            Self::Write {
                pattern,
                offset,
                len,
            } => format!("write -P {pattern} {offset} {len}"),
            Self::Zero { offset, len } => format!("write -z {offset} {len}"),
            Self::Discard { offset, len } => format!("discard {offset} {len}"),
            Self::Flush => "flush".to_string(),
        }
    }

    /// The guest range it changes; `None` for a flush.
    fn range(&self) -> Option<Range<usize>> {
        match *self {
            Self::Write { offset, len, .. }
            | Self::Zero { offset, len }
            | Self::Discard { offset, len } => Some(offset as usize..(offset + len) as usize),
            Self::Flush => None,
        }
    }

    /// The offset its output line names; `None` for a flush (which prints nothing).
    fn printed_offset(&self) -> Option<u64> {
        match *self {
            Self::Write { offset, .. }
            | Self::Zero { offset, .. }
            | Self::Discard { offset, .. } => Some(offset),
            Self::Flush => None,
        }
    }

    fn apply(&self, disk: &mut [u8]) {
        let Some(range) = self.range() else { return };
        let fill = match *self {
            Self::Write { pattern, .. } => pattern,
            _ => 0,
        };
        disk[range].fill(fill);
    }
}

/// One image, rewritten round after round.
struct Stream {
    name: &'static str,
    cluster_size: u64,
    table_size: u32,
    size: u64,
    /// Length of the raw backing file, if there is one.
    backing: Option<u64>,
}

/// What the backing file holds at `offset` (never zero).
fn backing_byte(offset: u64) -> u8 {
    ((offset >> 12) as u8).wrapping_mul(7) | 1
}

fn commands(rng: &mut Rng, stream: &Stream, count: usize) -> Vec<Op> {
    let cs = stream.cluster_size;
    let size = stream.size;
    let mut ops = Vec::with_capacity(count);
    let mut writes: Vec<(u64, u64)> = Vec::new();
    for k in 0..count {
        let pattern = (k % 255) as u8 + 1;
        let p = rng.percent();
        let op = if p < 10 {
            Op::Flush
        } else if p < 20 && !writes.is_empty() {
            // In place: again over a recent write (allocated by then, if it completed).
            let (offset, len) =
                writes[writes.len() - 1 - rng.range(0..writes.len().min(8) as u64) as usize];
            Op::Write {
                pattern,
                offset,
                len,
            }
        } else if p < 70 {
            let len = rng.range(1..3 * cs + 1);
            let (offset, len) = if rng.percent() < 50 {
                // Sector-aligned.
                let len = len.div_ceil(512) * 512;
                (rng.range(0..(size - len) / 512 + 1) * 512, len)
            } else {
                (rng.range(0..size - len + 1), len)
            };
            writes.push((offset, len));
            Op::Write {
                pattern,
                offset,
                len,
            }
        } else if p < 85 {
            let len = rng.range(1..2 * cs / 512 + 1) * 512;
            Op::Zero {
                offset: rng.range(0..(size - len) / 512 + 1) * 512,
                len,
            }
        } else {
            let clusters = rng.range(1..5);
            Op::Discard {
                offset: rng.range(0..size / cs - clusters + 1) * cs,
                len: clusters * cs,
            }
        };
        ops.push(op);
    }
    ops
}

/// Offsets named by the `wrote …`/`discard …` lines, in order.
fn printed_offsets(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter(|line| line.starts_with("wrote ") || line.starts_with("discard "))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// NEED_CHECK (bit 1 of the features at header byte 16).
fn need_check(path: &Path) -> bool {
    std::fs::read(path).expect("read image")[16] & 2 != 0
}

/// How a round went, for the summary.
#[derive(Debug, Default)]
struct Tally {
    killed: usize,
    finished: usize,
    leaky: usize,
    dirty: usize,
    verified_bytes: u64,
}

/// Runs one round; panics with `what` on failure.
#[allow(clippy::too_many_lines)]
fn round(
    dir: &Path,
    stream: &Stream,
    rng: &mut Rng,
    baseline: &mut Vec<u8>,
    what: &str,
    tally: &mut Tally,
) {
    let image = format!("{}.qed", stream.name);
    let path = dir.join(&image);
    let ops = commands(rng, stream, COMMANDS);
    let mut args = vec!["io".to_string(), "-f".into(), "qed".into()];
    for op in &ops {
        args.push("-c".into());
        args.push(op.command());
    }
    args.push(image.clone());
    let mut child = Command::new(qed_path())
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qed io");
    // Read while it runs: a full pipe would stall it.
    let mut out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let mut err = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    std::thread::sleep(Duration::from_millis(rng.range(2..201)));
    let _ = child.kill();
    let status = child.wait().expect("wait");
    let io_out = reader.join().expect("reader");
    let io_err = err_reader.join().expect("stderr reader");
    let killed = status.code().is_none();

    // Which commands completed: the k-th printed line belongs to the k-th printing command.
    let printing: Vec<usize> = (0..ops.len())
        .filter(|&i| ops[i].printed_offset().is_some())
        .collect();
    let offsets = printed_offsets(&io_out);
    assert!(
        offsets.len() <= printing.len(),
        "{what}: more output than commands"
    );
    for (k, offset) in offsets.iter().enumerate() {
        assert_eq!(
            ops[printing[k]].printed_offset(),
            Some(*offset),
            "{what}: output line {k} does not match command {}",
            printing[k]
        );
    }
    let (durable, started) = if killed {
        tally.killed += 1;
        let last_printed = offsets.len().checked_sub(1).map(|k| printing[k]);
        // Flushes before a printed command completed; the last of them is the durable point.
        let durable =
            last_printed.and_then(|last| (0..last).rev().find(|&i| matches!(ops[i], Op::Flush)));
        // Commands up to the next printing one may have run (wholly or in part).
        let started = printing
            .get(offsets.len())
            .copied()
            .unwrap_or(ops.len() - 1);
        (durable, started)
    } else {
        tally.finished += 1;
        assert_eq!(
            status.code(),
            Some(0),
            "{what}: qed io failed before the kill: {io_err}"
        );
        assert_eq!(offsets.len(), printing.len(), "{what}: missing output");
        (Some(ops.len() - 1), ops.len() - 1)
    };
    if killed {
        // Nothing on stderr: no command failed before the kill.
        assert!(io_err.is_empty(), "{what}: qed io stderr: {io_err}");
    }

    // 1. No corruption, as QEMU sees it and as we see it (leaks allowed).
    let q = run_in(dir, "qemu-img", &["check", &image]);
    assert!(
        matches!(code(&q), 0 | 3),
        "{what}: qemu-img check after the kill (rc {}):\n{}{}",
        code(&q),
        stdout(&q),
        stderr(&q)
    );
    let m = qed(dir, &["check", &image]);
    assert!(
        matches!(code(&m), 0 | 3),
        "{what}: qed check after the kill (rc {}):\n{}{}",
        code(&m),
        stdout(&m),
        stderr(&m)
    );
    let leaky = code(&m) == 3;
    let dirty = need_check(&path);
    tally.leaky += usize::from(leaky);
    tally.dirty += usize::from(dirty);

    // 2. A writable open repairs a dirty image; then both checks are clean.
    let m = qed(dir, &["io", "-c", "read 0 512", &image]);
    assert_eq!(code(&m), 0, "{what}: reopen: {}{}", stdout(&m), stderr(&m));
    assert!(
        !need_check(&path),
        "{what}: NEED_CHECK still set after a clean close"
    );
    let m = qed(dir, &["check", &image]);
    if leaky && !dirty {
        // Clusters a killed writer allocated before its first write-back are leaks, and no
        // flag asks the next open to repair them (as after QEMU over a backing file): an
        // explicit repair reclaims them.
        assert_eq!(code(&m), 3, "{what}: {}", stdout(&m));
        let r = qed(dir, &["check", "-r", "all", &image]);
        assert_eq!(
            code(&r),
            0,
            "{what}: check -r all: {}{}",
            stdout(&r),
            stderr(&r)
        );
        let m = qed(dir, &["check", &image]);
        assert_eq!(code(&m), 0, "{what}: after -r all: {}", stdout(&m));
    } else {
        assert_eq!(
            code(&m),
            0,
            "{what}: qed check after reopen (flag was {dirty}):\n{}{}",
            stdout(&m),
            stderr(&m)
        );
    }
    let q = run_in(dir, "qemu-img", &["check", &image]);
    assert_eq!(
        code(&q),
        0,
        "{what}: qemu-img check after reopen:\n{}{}",
        stdout(&q),
        stderr(&q)
    );

    // 3. Every byte a completed flush covered, unless a later command touched it.
    let mut expected = baseline.clone();
    if let Some(durable) = durable {
        for op in &ops[..=durable] {
            op.apply(&mut expected);
        }
    }
    let first_unsure = durable.map_or(0, |d| d + 1);
    let mut unsure = vec![false; expected.len()];
    for op in ops.iter().take(started + 1).skip(first_unsure) {
        if let Some(range) = op.range() {
            unsure[range].fill(true);
        }
    }
    let raw = dir.join("out.raw");
    let c = run_in(
        dir,
        "qemu-img",
        &["convert", "-f", "qed", "-O", "raw", &image, "out.raw"],
    );
    assert_eq!(code(&c), 0, "{what}: convert: {}", stderr(&c));
    let actual = std::fs::read(&raw).expect("read out.raw");
    assert_eq!(actual.len(), expected.len(), "{what}: disk size");
    for (i, (&a, &e)) in actual.iter().zip(&expected).enumerate() {
        if !unsure[i] && a != e {
            let culprits: Vec<String> = ops
                .iter()
                .enumerate()
                .filter(|(_, op)| op.range().is_some_and(|r| r.contains(&i)))
                .map(|(n, op)| format!("#{n} {}", op.command()))
                .collect();
            panic!(
                "{what}: byte {i} reads {a:#04x}, expected {e:#04x} (durable up to command \
                 {durable:?}, started up to {started}, {} lines printed); commands over it: \
                 {culprits:?}",
                offsets.len()
            );
        }
    }
    tally.verified_bytes += unsure.iter().filter(|u| !**u).count() as u64;
    *baseline = actual;
}

#[test]
fn killed_writers_leave_consistent_images_that_keep_flushed_data() {
    if !have("qemu-img") {
        return;
    }
    let seed = std::env::var("QED_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_4b11);
    let streams = [
        Stream {
            name: "plain",
            cluster_size: 4096,
            table_size: 2,
            // Two L2 tables; the file stays under 4095 clusters, where QEMU's check would
            // start counting a phantom leak (reference §7.5).
            size: 8 << 20,
            backing: None,
        },
        Stream {
            name: "overlay",
            cluster_size: 65536,
            table_size: 4,
            size: 32 << 20,
            // Shorter than the disk: the tail reads as zeros.
            backing: Some(24 << 20),
        },
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let mut baselines = Vec::new();
    for stream in &streams {
        let mut baseline = vec![0u8; stream.size as usize];
        let mut args = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qed".into(),
            "-o".into(),
            format!(
                "cluster_size={},table_size={}",
                stream.cluster_size, stream.table_size
            ),
        ];
        if let Some(len) = stream.backing {
            let data: Vec<u8> = (0..len).map(backing_byte).collect();
            let name = format!("{}-base.raw", stream.name);
            std::fs::write(dir.path().join(&name), &data).expect("write backing");
            baseline[..len as usize].copy_from_slice(&data);
            args.extend(["-b".into(), name, "-F".into(), "raw".into()]);
        }
        args.extend([format!("{}.qed", stream.name), stream.size.to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let m = qed(dir.path(), &args);
        assert_eq!(code(&m), 0, "create: {}", stderr(&m));
        baselines.push(baseline);
    }
    let mut tally = Tally::default();
    for n in 0..ROUNDS {
        for (s, stream) in streams.iter().enumerate() {
            let round_seed =
                seed ^ ((n as u64) << 8 | s as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
            let mut rng = Rng(round_seed);
            let what = format!(
                "{} round {n} (QED_KILL_SEED={seed}, round seed {round_seed:#x})",
                stream.name
            );
            round(
                dir.path(),
                stream,
                &mut rng,
                &mut baselines[s],
                &what,
                &mut tally,
            );
        }
    }
    eprintln!("kill test: {tally:?}");
    assert!(tally.killed > 0, "no round was killed: {tally:?}");
}

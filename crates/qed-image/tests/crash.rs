//! Crash tests: every power-loss state of seeded random workloads (and of the repair that
//! follows one) reopens, repairs and reads as design.md §Durability promises.
//!
//! `QED_CRASH_SOAK=<n>` runs n times as many workloads.

mod kit;

use std::collections::BTreeMap;
use std::sync::Arc;

use kit::{
    check_bytes, need_check, open_and_repair, report_clean, soak, CrashConfig, GuestOp, Rng,
    Verdict, Windows,
};
use qed_image::storage::{CrashOp, CrashOptions, CrashState, CrashStorage, MemoryStorage, Storage};

/// Workloads per geometry in the bounded run (64 KiB clusters cost more per state).
fn workloads(config: &CrashConfig) -> u64 {
    let n = if config.cluster_size >= 65536 { 1 } else { 2 };
    n * soak()
}

/// Requests per workload.
fn requests(config: &CrashConfig) -> usize {
    if config.cluster_size >= 65536 {
        12
    } else {
        18
    }
}

/// One guest request and where its storage calls sit in the log.
struct Step {
    op: GuestOp,
    effect: Option<(usize, Vec<u8>)>,
    log_start: usize,
}

/// A workload run on a [`CrashStorage`], with what the model expects.
struct Recording {
    config: CrashConfig,
    windows: Windows,
    steps: Vec<Step>,
    /// Completed guest flushes: (log position at which it completed, steps before it, the
    /// windows then). The first entry is the initial image.
    flushes: Vec<(usize, usize, Vec<u8>)>,
    crash: Arc<CrashStorage>,
}

impl Recording {
    fn run(config: CrashConfig, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let windows = config.windows();
        let crash = Arc::new(CrashStorage::new(config.create_image()));
        // Half the runs keep the L2 cache to one table, so creating a table writes back.
        let cache = if rng.chance(50, 100) {
            32 << 20
        } else {
            config.geometry().table_bytes() as usize
        };
        let image = config
            .open(Box::new(crash.clone()), true, cache)
            .expect("open");
        let mut model = windows.initial(&config);
        let mut flushes = vec![(0, 0, model.clone())];
        let mut steps = Vec::new();
        for op in config.workload(&mut rng, requests(&config)) {
            let log_start = crash.op_count();
            op.run(&image)
                .unwrap_or_else(|e| panic!("{}: {}: {e}", config.name(), op.describe()));
            let effect = op.effect(&config, &windows);
            if let Some((at, data)) = &effect {
                model[*at..at + data.len()].copy_from_slice(data);
            }
            let flush = matches!(op, GuestOp::Flush);
            steps.push(Step {
                op,
                effect,
                log_start,
            });
            if flush {
                flushes.push((crash.op_count(), steps.len(), model.clone()));
            }
        }
        // The close is the last flush: write-back, then NEED_CHECK cleared.
        let log_start = crash.op_count();
        image.close().expect("close");
        steps.push(Step {
            op: GuestOp::Flush,
            effect: None,
            log_start,
        });
        flushes.push((crash.op_count(), steps.len(), model));
        let log = crash.log();
        for &(end, _, _) in &flushes[1..] {
            assert_eq!(
                log[end - 1].op,
                CrashOp::Flush,
                "a guest flush ends with a flush"
            );
        }
        Self {
            config,
            windows,
            steps,
            flushes,
            crash,
        }
    }

    /// The windows at the last guest flush completed before `cut`, and the effects of the
    /// requests started after it and before the cut.
    fn expected(&self, cut: usize) -> (&[u8], Vec<&(usize, Vec<u8>)>) {
        let (_, flushed_steps, flushed) = self
            .flushes
            .iter()
            .rev()
            .find(|(end, _, _)| *end <= cut)
            .expect("the initial image");
        let pending = self.steps[*flushed_steps..]
            .iter()
            .filter(|s| s.log_start < cut)
            .filter_map(|s| s.effect.as_ref())
            .collect();
        (flushed, pending)
    }

    fn describe(&self) -> String {
        self.steps
            .iter()
            .map(|s| format!("  [{}] {}", s.log_start, s.op.describe()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// What one crash state showed.
#[derive(Default)]
struct Tally {
    states: u64,
    by_kind: BTreeMap<String, u64>,
    repaired_at_open: u64,
    leaks_before_repair: u64,
    clean_flag_leaks: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.states += other.states;
        for (k, v) in &other.by_kind {
            *self.by_kind.entry(k.clone()).or_default() += v;
        }
        self.repaired_at_open += other.repaired_at_open;
        self.leaks_before_repair += other.leaks_before_repair;
        self.clean_flag_leaks += other.clean_flag_leaks;
    }

    fn print(&self, test: &str) {
        eprintln!(
            "{test}: {} states {:?}; repaired at open {}, with leaks before repair {}, \
             leaky with NEED_CHECK clear {}",
            self.states,
            self.by_kind,
            self.repaired_at_open,
            self.leaks_before_repair,
            self.clean_flag_leaks
        );
        eprintln!("crash states explored: {}", self.states);
    }
}

/// Checks one crash state: the open repairs it if NEED_CHECK is set (and finds no
/// corruption, only leaks, to repair), a check afterwards is clean, every window byte reads
/// as `expect` allows, nothing is allocated outside the windows, and a close leaves
/// NEED_CHECK clear. Returns the windows as read after the repair.
fn verify_state(
    config: &CrashConfig,
    windows: &Windows,
    bytes: Vec<u8>,
    expect: &dyn Fn(&[u8]) -> Verdict,
    tally: &mut Tally,
) -> Result<Vec<u8>, String> {
    let dirty = need_check(&bytes);
    let storage = Arc::new(MemoryStorage::from_bytes(bytes));
    let (image, clean_flag_leaks) = open_and_repair(config, storage.clone())?;
    if let Some(report) = image.open_repair() {
        // What the repair found is what a check before it would have found: leaks at most.
        if report.corruptions_fixed > 0 {
            return Err(format!(
                "{} corruptions before the repair: {:?}",
                report.corruptions_fixed,
                &report.findings[..report.findings.len().min(5)]
            ));
        }
        tally.leaks_before_repair += u64::from(report.leaks_fixed > 0);
    }
    tally.repaired_at_open += u64::from(dirty);
    tally.clean_flag_leaks += u64::from(clean_flag_leaks.is_some());
    let after = windows
        .read(&image)
        .map_err(|e| format!("read after repair: {e}"))?;
    expect(&after)?;
    windows.check_outside(&image)?;
    image.close().map_err(|e| format!("close: {e}"))?;
    if need_check(&storage.to_bytes()) {
        return Err("NEED_CHECK still set after a repair and a clean close".into());
    }
    Ok(after)
}

fn describe_state(state: &CrashState) -> String {
    format!(
        "cut {} durable {} {:?} applied {:?} torn {:?}",
        state.cut, state.durable, state.kind, state.applied, state.torn
    )
}

fn crash_options(seed: u64) -> CrashOptions {
    CrashOptions {
        seed,
        ..CrashOptions::default()
    }
}

/// Every crash state of `workloads` seeded workloads on `config` keeps the contract.
fn crash_workloads(config: CrashConfig, seed_base: u64) -> Tally {
    let mut total = Tally::default();
    let mut failures = Vec::new();
    for w in 0..workloads(&config) {
        let seed = seed_base * 1000 + w;
        let rec = Recording::run(config, seed);
        let mut tally = Tally::default();
        for state in rec.crash.crash_states(&crash_options(seed)) {
            tally.states += 1;
            *tally
                .by_kind
                .entry(format!("{:?}", state.kind))
                .or_default() += 1;
            let (flushed, pending) = rec.expected(state.cut);
            let expect = |actual: &[u8]| check_bytes(&rec.windows, actual, flushed, &pending);
            let what = describe_state(&state);
            if let Err(e) = verify_state(&config, &rec.windows, state.bytes, &expect, &mut tally) {
                failures.push(format!(
                    "{} seed {seed}: {what}: {e}\nworkload:\n{}",
                    config.name(),
                    rec.describe()
                ));
                if failures.len() >= 3 {
                    break;
                }
            }
        }
        total.add(&tally);
        if !failures.is_empty() {
            break;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    total
}

macro_rules! crash_test {
    ($name:ident, $index:expr) => {
        #[test]
        fn $name() {
            let config = CrashConfig::all()[$index];
            let tally = crash_workloads(config, $index as u64 + 1);
            tally.print(&format!("{} ({})", stringify!($name), config.name()));
        }
    };
}

crash_test!(crash_4k_ts1, 0);
crash_test!(crash_4k_ts1_backing, 1);
crash_test!(crash_4k_ts4, 2);
crash_test!(crash_4k_ts4_backing, 3);
crash_test!(crash_64k_ts4, 4);
crash_test!(crash_64k_ts4_backing, 5);

/// A crash during the repair of a crashed image: every state of the repair reopens (a
/// second repair) into a consistent image that reads exactly what the finished repair reads.
#[test]
fn crash_during_repair() {
    let mut total = Tally::default();
    let mut repairs = 0;
    for (index, config) in CrashConfig::all().into_iter().enumerate() {
        for w in 0..soak() {
            let seed = 7_000 + index as u64 * 100 + w;
            let rec = Recording::run(config, seed);
            if let Some(crash) = busiest_repair(&rec) {
                repairs += 1;
                total.add(&crash_repair(&config, &rec.windows, &crash, seed));
            }
        }
        // A repair that moves data and slides an L2 table down into leaked clusters.
        let crash = Arc::new(CrashStorage::new(trailing_table_image(&config).0));
        config
            .open(Box::new(crash.clone()), true, 32 << 20)
            .expect("repairing open")
            .close()
            .expect("close");
        repairs += 1;
        total.add(&crash_repair(
            &config,
            &config.windows(),
            &crash,
            index as u64,
        ));
    }
    eprintln!("crash_during_repair: {repairs} repairs cut");
    total.print("crash_during_repair");
}

/// Of the disks left by a crash right after each guest flush (NEED_CHECK set, discarded
/// clusters leaked), the one whose repair does the most, repaired on a [`CrashStorage`].
fn busiest_repair(rec: &Recording) -> Option<Arc<CrashStorage>> {
    let mut best: Option<Arc<CrashStorage>> = None;
    for &(end, _, _) in &rec.flushes[1..] {
        let bytes = rec.crash.replay(end);
        if !need_check(&bytes) {
            continue;
        }
        let crash = Arc::new(CrashStorage::new(bytes));
        let image = rec
            .config
            .open(Box::new(crash.clone()), true, 32 << 20)
            .expect("repairing open");
        let report = image.open_repair().expect("NEED_CHECK was set").clone();
        report_clean(&report, "the first repair", false).unwrap();
        image.close().expect("close");
        if best
            .as_ref()
            .is_none_or(|b| b.op_count() < crash.op_count())
        {
            best = Some(crash);
        }
    }
    best
}

fn crash_repair(config: &CrashConfig, windows: &Windows, crash: &CrashStorage, seed: u64) -> Tally {
    let repaired = {
        let image = config
            .open(
                Box::new(MemoryStorage::from_bytes(crash.contents())),
                false,
                32 << 20,
            )
            .expect("open the repaired image");
        windows.read(&image).expect("read")
    };
    let mut tally = Tally::default();
    let expect = |actual: &[u8]| -> Verdict {
        match actual == repaired.as_slice() {
            true => Ok(()),
            false => Err("the guest reads differ from the finished repair's".into()),
        }
    };
    let mut failures = Vec::new();
    for state in crash.crash_states(&crash_options(seed)) {
        tally.states += 1;
        *tally
            .by_kind
            .entry(format!("{:?}", state.kind))
            .or_default() += 1;
        let what = describe_state(&state);
        if let Err(e) = verify_state(config, windows, state.bytes, &expect, &mut tally) {
            failures.push(format!(
                "{} seed {seed}: repair {what}: {e}\nrepair log: {:?}",
                config.name(),
                crash
                    .log()
                    .iter()
                    .map(|e| match &e.op {
                        CrashOp::Write { offset, data } => {
                            format!("w{offset:#x}+{:#x}", data.len())
                        }
                        other => format!("{other:?}"),
                    })
                    .collect::<Vec<_>>()
            ));
            if failures.len() >= 3 {
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    tally
}

/// An image left by a crash (NEED_CHECK set) whose only leaks lie below the last L2 table:
/// two data clusters of table 0 written, then one cluster under table 2, then the two entries
/// of table 0 turned into zero clusters on disk by hand (discard never leaks, so the leak is
/// made directly). Returns the bytes and what the windows read.
fn trailing_table_image(config: &CrashConfig) -> (Vec<u8>, Vec<u8>) {
    let cs = u64::from(config.cluster_size);
    let mut rng = Rng::new(u64::from(config.cluster_size));
    let last = config.windows().ranges[2].0;
    let ops = [
        GuestOp::Write {
            offset: 0,
            data: rng.bytes(2 * cs as usize),
        },
        GuestOp::Write {
            offset: cs,
            data: rng.bytes(100),
        },
        GuestOp::Flush,
        GuestOp::Write {
            offset: last,
            data: rng.bytes(cs as usize),
        },
        GuestOp::Flush,
    ];
    // The crash: the disk as it is then, before a close clears NEED_CHECK.
    let (mut bytes, mut model) = config.crashed_after(&ops);
    assert!(need_check(&bytes));
    let header = qed_image::Header::decode(&bytes).expect("header");
    let l1 = header.l1_table_offset as usize;
    let l2 = u64::from_le_bytes(bytes[l1..l1 + 8].try_into().unwrap()) as usize;
    for entry in 0..2 {
        let at = l2 + entry * 8;
        bytes[at..at + 8].copy_from_slice(&1u64.to_le_bytes());
    }
    let zeroed = GuestOp::Discard {
        offset: 0,
        len: 2 * cs,
    };
    if let Some((at, data)) = zeroed.effect(config, &config.windows()) {
        model[at..at + data.len()].copy_from_slice(&data);
    }
    (bytes, model)
}

/// Regression: leaks below a trailing L2 table used to survive a repair (the reclaim stopped
/// at the first metadata cluster from the end); the table now slides down into them.
#[test]
fn repair_slides_a_trailing_table_into_leaked_clusters() {
    for config in CrashConfig::all() {
        let (bytes, model) = trailing_table_image(&config);
        let storage = Arc::new(MemoryStorage::from_bytes(bytes));
        let image = config
            .open(Box::new(storage.clone()), true, 32 << 20)
            .expect("open");
        let repair = image.open_repair().expect("repaired at open").clone();
        assert_eq!(
            (repair.leaks, repair.leaks_fixed),
            (0, 2),
            "{}: {repair:?}",
            config.name()
        );
        let report = image.check(qed_image::Repair::None).expect("check");
        assert!(report.is_clean(), "{}: {report:?}", config.name());
        assert_eq!(config.windows().read(&image).expect("read"), model);
        image.close().expect("close");
        // Header, L1, two L2 tables and one data cluster: nothing else.
        let cs = u64::from(config.cluster_size);
        let ts = u64::from(config.table_size);
        assert_eq!(
            storage.len().unwrap(),
            (2 + 3 * ts) * cs,
            "{}",
            config.name()
        );
    }
}

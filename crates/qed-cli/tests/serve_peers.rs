//! `qed serve` driven by real peers for the protocol's edge cases: libnbd (python3-libnbd, the
//! module nbdsh runs) and a raw-socket client in Python for what libnbd will not send, both in
//! tests/peers/cases.py, which prints what it saw as JSON for the assertions here; and fio's
//! nbd engine with a verify workload on several connections. Every test ends with the server
//! stopped by SIGTERM (exit 0) and the image clean by `qemu-img check`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::served::*;
use common::*;

/// Where the Python side lives.
const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers");

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

const REP_ACK: u64 = 1;
const REP_ERR_UNSUP: u64 = (1 << 31) + 1;
const REP_ERR_INVALID: u64 = (1 << 31) + 3;
const REP_ERR_EXT_HEADER_REQD: u64 = (1 << 31) + 10;
const REPLY_TYPE_NONE: u64 = 0;
const REPLY_TYPE_BLOCK_STATUS_EXT: u64 = 6;
const REPLY_FLAG_DONE: u64 = 1;
const EOVERFLOW: u64 = 75;
/// base:allocation's HOLE|ZERO.
const HOLE_ZERO: u64 = 3;

/// A Python 3 that imports libnbd's `nbd` module (`python3`, else the system's: nbdsh runs
/// whichever `python3` comes first, which need not be the one python3-libnbd installed into).
/// When there is none: panics under CI=true, else prints a note (the caller then returns).
fn libnbd_python() -> Option<&'static str> {
    for python in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(python)
            .args(["-c", "import nbd"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(python);
        }
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("python3 with libnbd's nbd module (python3-libnbd) is required when CI=true");
    }
    eprintln!("note: no python3 with libnbd's nbd module (python3-libnbd); skipping");
    None
}

/// qemu-img, qemu-io and libnbd's Python module, or `None` (see [`libnbd_python`]).
fn peers() -> Option<&'static str> {
    if !have_qemu() {
        return None;
    }
    libnbd_python()
}

/// Runs `cases.py CASE SOCKET ARGS...` against `served`; its JSON.
fn case(python: &str, name: &str, served: &Served, args: &[&str]) -> Value {
    let out = Command::new(python)
        .arg(Path::new(PEERS).join("cases.py"))
        .arg(name)
        .arg(served.socket_path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cases.py");
    assert!(
        out.status.success(),
        "cases.py {name} failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("cases.py {name}: {e}: {text}"))
}

/// Stops the server with SIGTERM, expects exit 0 and a clean image.
fn stop_clean(served: Served, dir: &Path, file: &str) {
    assert_eq!(served.terminate(), 0, "qed serve exits 0 on SIGTERM");
    assert_clean(dir, file);
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `[[a, b], [c, d]]` as pairs.
fn pairs(v: &Value) -> Vec<(u64, u64)> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|p| (u(&p[0]), u(&p[1])))
        .collect()
}

#[test]
fn unknown_options_get_err_unsup_and_negotiation_goes_on() {
    let Some(python) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "64M");
    qemu_io_ok(dir.path(), "qed", "d.qed", &["write -P 0x5a 0 64k"]);
    let served = Served::unix(dir.path(), &["-t", "-e", "2"], "d.qed");
    let r = case(python, "negotiation", &served, &[]);
    // FIXED_NEWSTYLE | NO_ZEROES.
    assert_eq!(r["greeting_flags"], 3);
    assert_eq!(u(&r["unknown_small"]), REP_ERR_UNSUP, "{r}");
    // 100 KiB of option data, past the 64 KiB held: skipped, still ERR_UNSUP.
    assert_eq!(u(&r["unknown_big"]), REP_ERR_UNSUP, "{r}");
    // The negotiation went on: LIST, STRUCTURED_REPLY, another unknown option, GO.
    assert_eq!(u(&r["list_final"]), REP_ACK);
    assert_eq!(r["list_names"], serde_json::json!([""]));
    assert_eq!(u(&r["unknown_after_structured"]), REP_ERR_UNSUP);
    assert_eq!(u(&r["size"]), 64 * MIB);
    // HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES SEND_DF CAN_MULTI_CONN
    // SEND_CACHE SEND_FAST_ZERO.
    assert_eq!(u(&r["transmission_flags"]), 0x0ded);
    assert_eq!(r["read_error"], 0);
    assert_eq!(r["read_data"], true);
    // libnbd in option mode.
    assert_eq!(r["libnbd_opt_list"], 1);
    assert_eq!(r["libnbd_names"], serde_json::json!([""]));
    assert_eq!(u(&r["libnbd_info_size"]), 64 * MIB);
    assert_eq!(r["libnbd_contexts"], serde_json::json!(["base:allocation"]));
    assert_eq!(r["libnbd_read"], true);
    stop_clean(served, dir.path(), "d.qed");
}

#[test]
fn oversized_requests_are_refused_and_the_connection_goes_on() {
    let Some(python) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "64M");
    let served = Served::unix(dir.path(), &["-t", "-e", "2"], "d.qed");
    let r = case(python, "oversized", &served, &[]);
    for (mode, read_over) in [("structured", "EOVERFLOW"), ("simple", "EINVAL")] {
        let m = &r[mode];
        assert_eq!(u(&m["maximum"]), 32 * MIB, "{mode}: {m}");
        assert_eq!(m["read_over"], read_over, "{mode}: {m}");
        assert_eq!(m["write_over"], "EINVAL", "{mode}: {m}");
        for key in [
            "write_after",
            "read_after",
            "write_max",
            "read_max",
            "nothing_else_written",
        ] {
            let want = if key.starts_with("write") {
                Value::from("ok")
            } else {
                Value::from(true)
            };
            assert_eq!(m[key], want, "{mode} {key}: {m}");
        }
    }
    stop_clean(served, dir.path(), "d.qed");
    // The refused writes left nothing past the maximum; the last good write is there.
    qemu_io_ok(
        dir.path(),
        "qed",
        "d.qed",
        &["read -P 0x43 0 32M", "read -P 0 32M 4k"],
    );
}

#[test]
fn out_of_range_requests_get_einval_or_enospc() {
    let Some(python) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "64M");
    let served = Served::unix(dir.path(), &["-t"], "d.qed");
    let r = case(python, "out_of_range", &served, &[]);
    assert_eq!(u(&r["size"]), 64 * MIB);
    for key in [
        "read_across_end",
        "read_at_end",
        "read_far",
        "read_wrapping",
        "trim_across_end",
        "cache_across_end",
        "status_at_end",
        "status_wrapping",
    ] {
        assert_eq!(r[key], "EINVAL", "{key}: {r}");
    }
    for key in [
        "write_across_end",
        "write_at_end",
        "write_wrapping",
        "zero_across_end",
        "zero_wrapping",
    ] {
        assert_eq!(r[key], "ENOSPC", "{key}: {r}");
    }
    assert_eq!(r["tail_untouched"], true);
    assert_eq!(r["head_untouched"], true);
    assert_eq!(r["tail_write"], "ok");
    assert_eq!(r["tail_read"], true);
    stop_clean(served, dir.path(), "d.qed");
    qemu_io_ok(
        dir.path(),
        "qed",
        "d.qed",
        &["read -P 0x56 67104768 4k", "read -P 0 0 67104768"],
    );
}

#[test]
fn fua_writes_read_back_on_every_connection_and_after_a_restart() {
    let Some(python) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "64M");
    let served = Served::unix(dir.path(), &["-t", "-e", "2"], "d.qed");
    let r = case(python, "fua", &served, &[]);
    assert_eq!(r["can_fua"], true);
    assert_eq!(r["same_connection"], true);
    assert_eq!(r["other_connection"], true);
    assert_eq!(r["zero_fua"], "ok");
    assert_eq!(r["trim_fua"], "ok");
    stop_clean(served, dir.path(), "d.qed");
    // The offsets and patterns of cases.py's FUA_WRITES.
    qemu_io_ok(
        dir.path(),
        "qed",
        "d.qed",
        &[
            "read -P 0x61 0 64k",
            "read -P 0x62 1049088 5000",
            "read -P 0x63 3141632 12288",
            "read -P 0 4M 4k",
        ],
    );
    // Served again, the data is there for a new client too.
    let served = Served::unix(dir.path(), &["-t", "-r"], "d.qed");
    let out = run_ok(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            &served.uri,
            "-c",
            "read -P 0x61 0 64k",
            "-c",
            "read -P 0x63 3141632 12288",
        ],
    );
    assert!(!stdout(&out).contains("failed"), "{}", stdout(&out));
    stop_clean(served, dir.path(), "d.qed");
}

#[test]
fn fast_zero_zeroes_or_fails_with_enotsup_changing_nothing() {
    let Some(python) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run_ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qed", "base.qed", "64M"],
    );
    qemu_io_ok(d, "qed", "base.qed", &["write -P 0x5a 0 4M"]);
    run_ok(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed", "top.qed", "64M",
        ],
    );
    qemu_io_ok(d, "qed", "top.qed", &["write -P 0x11 0 128k"]);
    let served = Served::unix(d, &["-t", "-A"], "top.qed");
    let r = case(python, "fast_zero", &served, &[]);
    assert_eq!(r["can_fast_zero"], true);
    for (name, outcome) in r.as_object().unwrap() {
        if name == "can_fast_zero" {
            continue;
        }
        // The protocol's rule: success and zeros, or ENOTSUP and nothing changed.
        match outcome["result"].as_str() {
            Some("ok") => assert_eq!(outcome["zeroed"], true, "{name}: {outcome}"),
            Some("ENOTSUP") => assert_eq!(outcome["unchanged"], true, "{name}: {outcome}"),
            other => panic!("{name}: FAST_ZERO gave {other:?}"),
        }
    }
    // And what this server does: data clusters are zeroed in place and a whole cluster over
    // backing data becomes a zero cluster, both fast; part of a cluster over backing data
    // would have to be written as data, so it is refused.
    assert_eq!(r["data_whole_cluster"]["result"], "ok", "{r}");
    assert_eq!(r["data_part_cluster"]["result"], "ok", "{r}");
    assert_eq!(r["backing_whole_cluster"]["result"], "ok", "{r}");
    assert_eq!(r["backing_part_cluster"]["result"], "ENOTSUP", "{r}");
    stop_clean(served, d, "top.qed");
    qemu_io_ok(
        d,
        "qed",
        "top.qed",
        &[
            "read -P 0 0 64k",
            "read -P 0x11 64k 4k",
            "read -P 0 68k 8k",
            "read -P 0x11 76k 52k",
            "read -P 0x5a 1M 1M",
            "read -P 0 2M 64k",
            "read -P 0x5a 2112k 64k",
        ],
    );
}

#[test]
fn req_one_block_status_gives_one_extent_per_context() {
    let Some(python) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "d.qed", "64M");
    qemu_io_ok(
        d,
        "qed",
        "d.qed",
        &["write -P 0x21 1M 64k", "write -z 2M 64k"],
    );
    let served = Served::unix(d, &["-t", "-A"], "d.qed");
    let r = case(python, "req_one", &served, &[]);
    // (call, base:allocation, qemu:allocation-depth): exactly one call per context, each
    // with exactly one extent, no longer than asked for.
    let expect = [
        ("start", (MIB, HOLE_ZERO), (MIB, 0)),
        ("data", (64 * KIB, 0), (64 * KIB, 1)),
        ("inside_data", (4 * KIB, 0), (4 * KIB, 1)),
        ("zero_cluster", (64 * KIB, HOLE_ZERO), (64 * KIB, 1)),
        ("tail", (MIB, HOLE_ZERO), (MIB, 0)),
    ];
    for (call, base, depth) in expect {
        let got = &r[call];
        assert_eq!(got.as_object().unwrap().len(), 2, "{call}: {got}");
        for (context, want) in [("base:allocation", base), ("qemu:allocation-depth", depth)] {
            let calls = got[context].as_array().unwrap();
            assert_eq!(calls.len(), 1, "{call} {context}: {got}");
            let entries = calls[0].as_array().unwrap();
            assert_eq!(entries.len(), 2, "one extent: {call} {context}: {got}");
            assert_eq!(
                (u(&entries[0]), u(&entries[1])),
                want,
                "{call} {context}: {got}"
            );
        }
    }
    // Without REQ_ONE the same range is several extents.
    let all = &r["without_req_one"];
    assert_eq!(
        all["base:allocation"][0],
        serde_json::json!([MIB, HOLE_ZERO, 64 * KIB, 0, 3008 * KIB, HOLE_ZERO])
    );
    assert_eq!(
        all["qemu:allocation-depth"][0],
        serde_json::json!([
            MIB,
            0,
            64 * KIB,
            1,
            960 * KIB,
            0,
            64 * KIB,
            1,
            1984 * KIB,
            0
        ])
    );
    stop_clean(served, d, "d.qed");
}

#[test]
fn extended_headers_carry_64_bit_lengths() {
    let Some(python) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "d.qed", "8G");
    let served = Served::unix(d, &["-t", "-A"], "d.qed");
    let r = case(python, "extended", &served, &[]);
    let far = 6 * GIB + 4096;
    // A second EXTENDED_HEADERS is invalid; STRUCTURED_REPLY after it needs extended headers.
    assert_eq!(u(&r["again"]), REP_ERR_INVALID, "{r}");
    assert_eq!(u(&r["structured_after"]), REP_ERR_EXT_HEADER_REQD, "{r}");
    assert_eq!(
        r["contexts"],
        serde_json::json!(["base:allocation", "qemu:allocation-depth"])
    );
    assert_eq!(u(&r["size"]), 8 * GIB);
    // A write past 4 GiB: one extended NONE chunk, DONE, carrying the request's offset.
    assert_eq!(
        r["write"],
        serde_json::json!([[REPLY_TYPE_NONE, REPLY_FLAG_DONE, far]])
    );
    assert_eq!(r["read_matches"], true);
    assert_eq!(r["read_chunk_offsets"], serde_json::json!([far]));
    assert_eq!(u(&r["read_header_offset"]), far);
    // Block status over all 8 GiB (a 64-bit effect length): BLOCK_STATUS_EXT chunks whose
    // descriptors tile the export, the first one longer than 4 GiB.
    for context in ["base:allocation", "qemu:allocation-depth"] {
        let chunk = &r["status_all"][context];
        assert_eq!(u(&chunk["type"]), REPLY_TYPE_BLOCK_STATUS_EXT, "{context}");
        let ds = pairs(&chunk["descriptors"]);
        assert_eq!(
            ds.iter().map(|d| d.0).sum::<u64>(),
            8 * GIB,
            "{context}: {ds:?}"
        );
        assert!(ds[0].0 >= 6 * GIB, "{context}: {ds:?}");
        // REQ_ONE: one descriptor, no longer than the unallocated start, still over 4 GiB.
        let one = &r["status_one"][context];
        assert_eq!(u(&one["type"]), REPLY_TYPE_BLOCK_STATUS_EXT, "{context}");
        let one = pairs(&one["descriptors"]);
        let unallocated = if context == "base:allocation" {
            HOLE_ZERO
        } else {
            0
        };
        assert_eq!(one.len(), 1, "{context}: {one:?}");
        assert!(
            one[0].0 > 4 * GIB && one[0].0 <= far && one[0].1 == unallocated,
            "{context}: {one:?}"
        );
    }
    // The data: 64 KiB at 6 GiB + 4 KiB, in two clusters (depth 1).
    let depth = pairs(&r["status_all"]["qemu:allocation-depth"]["descriptors"]);
    assert_eq!(
        depth,
        vec![(6 * GIB, 0), (128 * KIB, 1), (2 * GIB - 128 * KIB, 0)]
    );
    let base = pairs(&r["status_all"]["base:allocation"]["descriptors"]);
    assert!(base.contains(&(64 * KIB, 0)), "{base:?}");
    // 5 GiB of zeroes in one request: one zero-cluster extent of 5 GiB at depth 1.
    assert_eq!(r["zero_5g"], 0);
    assert_eq!(
        pairs(&r["status_after_zero"]["base:allocation"]["descriptors"]),
        vec![(5 * GIB, HOLE_ZERO)]
    );
    assert_eq!(
        pairs(&r["status_after_zero"]["qemu:allocation-depth"]["descriptors"]),
        vec![(5 * GIB, 1)]
    );
    assert_eq!(r["trim_7g"], 0);
    // A read still may not exceed the 32 MiB maximum.
    assert_eq!(u(&r["read_5g"]), EOVERFLOW);
    assert_eq!(r["read_after"], true);
    // libnbd 1.18 and later negotiate extended headers themselves.
    if !r["libnbd"].is_null() {
        let lib = &r["libnbd"];
        assert_eq!(lib["negotiated"], true, "{lib}");
        assert_eq!(lib["read_matches"], true, "{lib}");
        // (length, flags) flattened, as libnbd's callbacks give them.
        let flat: Vec<u64> = lib["status"][0].as_array().unwrap().iter().map(u).collect();
        let covered: u64 = flat.chunks(2).map(|p| p[0]).sum();
        assert_eq!(covered, 8 * GIB, "{lib}");
    }
    stop_clean(served, d, "d.qed");
    qemu_io_ok(d, "qed", "d.qed", &["read -P 0 0 1M", "read -P 0 6G 4k"]);
}

#[test]
fn structured_reads_send_hole_chunks_for_unallocated_ranges() {
    let Some(python) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "d.qed", "4M");
    qemu_io_ok(
        d,
        "qed",
        "d.qed",
        &[
            "write -P 0x33 64k 64k",
            "write -z 256k 64k",
            "write -P 0x34 1M 4k",
        ],
    );
    let served = Served::unix(d, &["-t", "-r"], "d.qed");
    let r = case(python, "structured_holes", &served, &[]);
    assert_eq!(r["structured"], true);
    let data = u(&r["names"]["data"]);
    let hole = u(&r["names"]["hole"]);
    // The chunks tile the range: data where clusters are allocated (QEMU wrote the whole
    // cluster at 1 MiB), holes for unallocated ranges and the zero cluster.
    let chunks = |v: &Value| -> Vec<(u64, u64, u64)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| (u(&c[0]), u(&c[1]), u(&c[2])))
            .collect()
    };
    assert_eq!(
        chunks(&r["whole"]["chunks"]),
        vec![
            (0, 64 * KIB, hole),
            (64 * KIB, 64 * KIB, data),
            (128 * KIB, 896 * KIB, hole),
            (MIB, 64 * KIB, data),
            (MIB + 64 * KIB, 960 * KIB, hole),
        ]
    );
    assert_eq!(r["whole"]["data_matches"], true);
    assert_eq!(
        chunks(&r["straddling"]["chunks"]),
        vec![(32 * KIB, 32 * KIB, hole), (64 * KIB, 32 * KIB, data)]
    );
    assert_eq!(r["straddling"]["data_matches"], true);
    // DF: one data chunk, holes included as zeros.
    assert_eq!(chunks(&r["df"]["chunks"]), vec![(0, 2 * MIB, data)]);
    assert_eq!(r["df"]["data_matches"], true);
    stop_clean(served, d, "d.qed");
}

#[test]
fn a_client_leaving_mid_request_disturbs_no_one() {
    let Some(python) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "d.qed", "64M");
    let served = Served::unix(d, &["-t", "-e", "4"], "d.qed");
    let r = case(python, "half_write", &served, &[]);
    assert_eq!(r["a_reads_own"], true, "{r}");
    assert_eq!(r["cut_write_absent"], true, "{r}");
    assert_eq!(r["b_reads"], true, "{r}");
    stop_clean(served, d, "d.qed");
    // The half-sent write never reached the image; the others did.
    qemu_io_ok(
        d,
        "qed",
        "d.qed",
        &[
            "read -P 0x44 0 64k",
            "read -P 0 1M 1M",
            "read -P 0x45 2M 64k",
        ],
    );
}

#[test]
fn a_client_that_never_reads_its_replies_is_bounded() {
    let Some(python) = peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "d.qed", "64M");
    // Data where the hog reads, so its replies are real buffers.
    qemu_io_ok(d, "qed", "d.qed", &["write -P 0x5a 0 8M"]);
    let served = Served::unix(d, &["-t", "-e", "2"], "d.qed");
    let (before, _) = served.memory_kib();
    // 8192 reads of 8 MiB (64 GiB of replies), never read: the hog prints how many it could
    // send before its socket stopped taking them.
    let mut hog = Killed(
        Command::new(python)
            .arg(Path::new(PEERS).join("cases.py"))
            .args(["hog", served.socket_path(), "8192", &(8 * MIB).to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the hog"),
    );
    let mut line = String::new();
    BufReader::new(hog.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let sent: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert!(u(&sent["sent"]) >= 256, "{line}");
    std::thread::sleep(Duration::from_millis(500));
    // Another client is served at once.
    let probe = case(python, "probe", &served, &[]);
    assert_eq!(probe["ok"], true, "{probe}");
    assert!(
        probe["seconds"].as_f64().unwrap() < 10.0,
        "the other client waited: {probe}"
    );
    // The server holds the hog's replies up to its in-flight budget (64 MiB), no more.
    let (now, peak) = served.memory_kib();
    assert!(
        now > before + 16 * 1024,
        "the hog's replies are held: {before} KiB before, {now} KiB now"
    );
    assert!(
        peak < before + 128 * 1024,
        "memory grew without bound: {before} KiB before, {peak} KiB at the peak"
    );
    // A stop with the hog still connected ends after the 30 s grace period, not after its
    // thousands of reads.
    let start = Instant::now();
    let mut served = served;
    served.send("-TERM");
    let code = served.wait_within(Duration::from_secs(90));
    let took = start.elapsed();
    assert_eq!(code, Some(0), "qed serve exits 0 on SIGTERM");
    assert!(took < Duration::from_secs(45), "the stop took {took:?}");
    drop(hog);
    assert_clean(d, "d.qed");
    qemu_io_ok(
        d,
        "qed",
        "d.qed",
        &["read -P 0x5a 0 8M", "read -P 0x66 16M 64k"],
    );
}

/// fio's JSON report (after the lines fio prints before it), and how many connections its
/// nbd engine reported.
fn fio_report(text: &str) -> (Value, usize) {
    let start = text.find("\n{").map_or(0, |i| i + 1);
    let report = serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("{e}: {text}"));
    (report, text.matches("connected to NBD server").count())
}

/// fio, and its nbd engine: a note and `false` when missing (a failure under CI=true).
fn have_fio() -> bool {
    if !have("fio") {
        return false;
    }
    let nbd = Command::new("fio")
        .arg("--enghelp=nbd")
        .output()
        .is_ok_and(|o| o.status.success());
    if !nbd {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("fio's nbd engine is required when CI=true");
        }
        eprintln!("note: fio has no nbd engine; skipping");
    }
    nbd
}

#[test]
fn fio_verifies_four_connections_and_the_data_survives_a_restart() {
    if !have_qemu() || !have_fio() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "d.qed", "64M");
    let fio = |served: &Served, extra: &[&str]| {
        let uri = format!("--uri={}", served.uri);
        let mut args = vec![
            "--name=v",
            "--ioengine=nbd",
            uri.as_str(),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--numjobs=4",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--iodepth=16",
            "--output-format=json",
        ];
        args.extend_from_slice(extra);
        let out = run_in(d, "fio", &args);
        assert_eq!(
            code(&out),
            0,
            "fio {args:?}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        assert!(
            !stderr(&out).contains("verify"),
            "verify errors: {}",
            stderr(&out)
        );
        fio_report(&stdout(&out))
    };
    // Each job writes its own 16 MiB with its own connection, then reads it back and checks
    // every block's checksum.
    let served = Served::unix(d, &["-t", "-e", "4"], "d.qed");
    let (report, connections) = fio(&served, &[]);
    assert_eq!(connections, 4);
    let jobs = report["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4);
    for job in jobs {
        assert_eq!(job["error"], 0, "{job}");
        assert_eq!(u(&job["write"]["io_bytes"]), 16 * MIB, "{job}");
        assert_eq!(u(&job["read"]["io_bytes"]), 16 * MIB, "verified: {job}");
    }
    stop_clean(served, d, "d.qed");
    // Every cluster written.
    let check = run_ok(d, "qemu-img", &["check", "-f", "qed", "d.qed"]);
    assert!(
        stdout(&check).contains("1024/1024 = 100.00% allocated"),
        "{}",
        stdout(&check)
    );
    // Served again read-only (so nothing can be rewritten), fio checks every block.
    let served = Served::unix(d, &["-t", "-e", "4", "-r"], "d.qed");
    let (report, connections) = fio(&served, &["--verify_only"]);
    assert_eq!(connections, 4);
    let jobs = report["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4);
    for job in jobs {
        assert_eq!(job["error"], 0, "{job}");
        assert_eq!(u(&job["read"]["io_bytes"]), 16 * MIB, "verified: {job}");
    }
    stop_clean(served, d, "d.qed");
}

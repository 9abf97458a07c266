//! `qemu-img bench` and `qed` invoked as `qemu-img` agree: the lines printed (the time
//! aside), messages and exit codes; write runs leave images that read the same and are clean.

mod common;

use std::path::Path;

use common::*;

/// Small enough (under 4095 clusters of 4 KiB) that `qemu-img check` counts no phantom leak.
fn make(dir: &Path) {
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qed", "b.qed", "8M"],
    );
    qemu_io_ok(dir, "qed", "b.qed", &["write -P 1 1M 1M"]);
    run_ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-o",
            "cluster_size=4k",
            "-b",
            "b.qed",
            "-F",
            "qed",
            "o.qed",
        ],
    );
    run_ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "raw", "r.raw", "4M"],
    );
}

/// The output with the run's time replaced.
fn untimed(out: &std::process::Output) -> String {
    stdout(out)
        .lines()
        .map(|line| match line.strip_prefix("Run completed in ") {
            Some(_) => "Run completed in T seconds.".to_string(),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn same_results_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(make);
    let cases: &[&[&str]] = &[
        &["-c", "1000", "b.qed"],
        &["-c", "1000", "-d", "1", "b.qed"],
        &[
            "-c",
            "500",
            "-w",
            "-d",
            "4",
            "-s",
            "64k",
            "-S",
            "128k",
            "-o",
            "4k",
            "--pattern=5",
            "b.qed",
        ],
        &["-c", "300", "-w", "--flush-interval=100", "b.qed"],
        &[
            "-c",
            "300",
            "-w",
            "--flush-interval=100",
            "--no-drain",
            "o.qed",
        ],
        &["-c", "200", "-w", "-s", "3000", "-S", "5000", "o.qed"],
        &["-c", "100", "-t", "none", "-n", "b.qed"],
        &["-c", "100", "-i", "threads", "-q", "b.qed"],
        &["-c", "010", "-U", "b.qed"],
        &["-f", "raw", "-c", "100", "-w", "--pattern=0x41", "r.raw"],
        &["-c", "100", "-w", "-S", "0", "-s", "1m", "o.qed"],
        // Refused, or failing.
        &["-c", "1000", "-w", "--flush-interval=10", "b.qed"],
        &["-c", "1000", "--flush-interval=100", "b.qed"],
        &["-c", "x", "b.qed"],
        &["-c", "0", "b.qed"],
        &["-c", "-5", "b.qed"],
        &["-d", "0", "b.qed"],
        &["-s", "0", "b.qed"],
        &["-s", "1x", "b.qed"],
        &["-S", "1x", "b.qed"],
        &["-o", "1x", "b.qed"],
        &["--pattern=300", "b.qed"],
        &["-i", "bogus", "b.qed"],
        &["-n", "-c", "10", "b.qed"],
        &["-w", "-U", "-c", "1", "b.qed"],
        &["-c", "10", "-d", "4", "-s", "16M", "b.qed"],
        &["-c", "10", "-o", "32M", "b.qed"],
        &["-c", "20", "-s", "64k", "-S", "100k", "-f", "raw", "r.raw"],
        &["-c", "10", "missing.qed"],
    ];
    for args in cases {
        twins.reset();
        let mut full = vec!["bench"];
        full.extend_from_slice(args);
        let (q, o) = twins.run(&full);
        let check = if args.contains(&"missing.qed") {
            Stderr::Either
        } else {
            Stderr::Same
        };
        assert_eq!(code(&q), code(&o), "{full:?}: {}{}", stderr(&q), stderr(&o));
        assert_eq!(untimed(&q), untimed(&o), "{full:?}");
        let strip = |out: &std::process::Output| std::process::Output {
            stdout: Vec::new(),
            ..out.clone()
        };
        assert_same_run(&full, &strip(&q), &strip(&o), check);
        for file in ["b.qed", "o.qed", "r.raw"] {
            let (qf, of) = (twins.qemu.join(file), twins.ours.join(file));
            assert!(same_contents(&qf, &of), "{full:?}: {file} differs");
            if file.ends_with(".qed") {
                assert_qemu_check_clean(&twins.ours, file);
            }
        }
    }
}

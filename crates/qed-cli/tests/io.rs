//! `qed io` prints what `qemu-io` prints and exits as it does.

mod common;

use std::path::Path;

use common::*;

/// Runs the same commands with qemu-io on `image` copied to `a` and with `qed io` on a copy
/// `b`; returns (stdout with timing masked, exit code) of each.
fn both(dir: &Path, image: &str, extra: &[&str], commands: &[&str]) -> [(String, i32); 2] {
    std::fs::copy(dir.join(image), dir.join("a.img")).expect("copy");
    std::fs::copy(dir.join(image), dir.join("b.img")).expect("copy");
    let mut args: Vec<&str> = extra.to_vec();
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    let mut qemu_args = args.clone();
    qemu_args.push("a.img");
    let mut ours = vec!["io"];
    ours.extend_from_slice(&args);
    ours.push("b.img");
    let q = run_in(dir, "qemu-io", &qemu_args);
    let m = qed(dir, &ours);
    [
        (without_timing(&stdout(&q)), code(&q)),
        (without_timing(&stdout(&m)), code(&m)),
    ]
}

/// A usage line with its option summary cut (qed lists only the options it implements).
fn usage_masked(text: &str) -> String {
    text.lines()
        .map(|line| match line.split_once(" [") {
            Some((cmd, rest)) if line.contains(" -- ") && !cmd.contains(' ') => {
                format!(
                    "{cmd} [OPTIONS]{}",
                    &rest[rest.find(']').map_or(0, |i| i + 1)..]
                )
            }
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_same(dir: &Path, image: &str, extra: &[&str], commands: &[&str]) {
    let [q, m] = both(dir, image, extra, commands);
    let (q, m) = ((usage_masked(&q.0), q.1), (usage_masked(&m.0), m.1));
    assert_eq!(q, m, "{image} {extra:?} {commands:?}");
}

#[test]
fn write_read_verify_like_qemu_io() {
    if !have_qemu() {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    assert_same(
        dir,
        "basic-64k.qed",
        &[],
        &[
            "write -P 0x11 0 64k",
            "read -P 0x11 0 64k",
            "read -v 0 40",
            "write -z 64k 64k",
            "write -q 0 512",
            "write 100 512",
            "read -P 0xcd 100 512",
            "read 1.5k 512",
            "read 0x200 0x200",
            "r 0 512",
            "w -q 0 1",
            "write -f 0 1",
            "read -P 0xcd -s 512 0 512",
            "read -P0xcd 0 1",
            "read 0 512 -q",
            "write -z 1 1",
            "flush",
            "f",
            "map",
            "length",
        ],
    );
    // Reads through a raw backing file, past its end, and a QED chain.
    assert_same(
        dir,
        "backing-overlay.qed",
        &[],
        &[
            "map",
            "read -P 0x11 0 4k",
            "read -P 0x22 200k 4k",
            "read -P 0 300k 4k",
            "read -v 4600 32",
            "write -P 0x33 100k 1k",
            "read -P 0x22 128k 4k",
            "map",
        ],
    );
    assert_same(
        dir,
        "chain-top.qed",
        &[],
        &["map", "read -P 0x5a 0 8k", "read -P 0xa5 8k 4k"],
    );
    assert_same(
        dir,
        "small-4k.qed",
        &["-r"],
        &["map", "read -P 0x22 4194816 512", "read -P 0x33 8384512 8k"],
    );
    assert_same(dir, "zero-size.qed", &[], &["map", "read 0 0", "length"]);
    assert_same(
        dir,
        "backing-base.raw",
        &["-f", "raw"],
        &["read -v 0 16", "write -P 0x99 262143 1", "map", "length"],
    );
}

#[test]
fn failures_like_qemu_io() {
    if !have_qemu() {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    for commands in [
        &["read -P 0x12 0 4k"][..],
        &["read -P 1 -s 10 -l 20 0 512"][..],
        &["read 16M 512"][..],
        &["write 16M 1"][..],
        &["read 0 1x"][..],
        &["read 0 -- -5"][..],
        &["read 0 9E"][..],
        &["read 0 2G"][..],
        &["write -z 0 3G"][..],
        &["discard 0 3G"][..],
        &["write -P 0x1ff 0 512"][..],
        &["write -z -P 1 0 512"][..],
        &["write -u 0 512"][..],
        &["write -n 0 1"][..],
        &["write -c 0 1"][..],
        &["write -c 0 64k"][..],
        &["read -l 20 0 512"][..],
        &["read -P 0xcd -s 10 -l 600 0 512"][..],
        &["read 0 1 2"][..],
        &["foo"][..],
        &["read"][..],
        &["map 0"][..],
        &["read 16M 1", "read -q 0 1"][..],
        &["read -q 0 1", "quit", "read -q 16M 1"][..],
    ] {
        assert_same(dir, "basic-64k.qed", &[], commands);
    }
    // A write to a read-only image fails without running.
    assert_same(dir, "basic-64k.qed", &["-r"], &["write 0 1"]);
    // A corrupt L2 entry reads as EINVAL.
    assert_same(dir, "dirty-invalid-l2.qed", &["-r"], &["read 20480 4096"]);
}

#[test]
fn messages_and_exit_codes() {
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    let out = qed(
        dir,
        &[
            "io",
            "-c",
            "write -P 0x41 0 4k",
            "-c",
            "read -P 0x41 0 4k",
            "empty-default.qed",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        without_timing(&stdout(&out)),
        "wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; T\nread 4096/4096 bytes at offset 0\n4 KiB, 1 ops; T"
    );
    let out = qed(dir, &["io", "-c", "read -P 0x42 0 4k", "empty-default.qed"]);
    assert_eq!(code(&out), 1);
    assert!(stdout(&out).starts_with("Pattern verification failed at offset 0, 4096 bytes\n"));
    let out = qed(dir, &["io", "-c", "read -q 16M 1", "empty-default.qed"]);
    assert_eq!(code(&out), 1);
    assert_eq!(stdout(&out), "read failed: Input/output error\n");
    assert!(stderr(&out).starts_with("qed: read: request at offset 16777216"));
    let out = qed(dir, &["io", "-r", "-c", "write 0 1", "empty-default.qed"]);
    assert_eq!(code(&out), 1);
    assert_eq!(stderr(&out), "qed: Block node is read-only\n");
    let out = qed(dir, &["io", "-U", "-c", "write 0 1", "empty-default.qed"]);
    assert_eq!(code(&out), 1, "-U opens read-only");
    let out = qed(dir, &["io", "-c", "read 0 1", "unknown-feature.qed"]);
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    assert!(
        err.starts_with("qed: can't open device unknown-feature.qed: "),
        "{err}"
    );
    assert!(err.ends_with(": Unsupported QED features: 8\n"), "{err}");
    let out = qed(dir, &["io", "-c", "read -x 0 1", "empty-default.qed"]);
    assert_eq!(code(&out), 1);
    assert_eq!(stderr(&out), "qed: read: invalid option -- 'x'\n");
    let out = qed(dir, &["io", "-c", "bogus", "empty-default.qed"]);
    assert_eq!(stderr(&out), "qed: command \"bogus\" not found\n");
    let out = qed(
        dir,
        &[
            "io",
            "-c",
            "write -q 64k 20",
            "-c",
            "read -v 64k 20",
            "-c",
            "write -C 0 512",
            "empty-default.qed",
        ],
    );
    let text = stdout(&out);
    assert!(
        text.starts_with(
            "00010000:  cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd  ................\n\
         00010010:  cd cd cd cd  ....\nread 20/20 bytes at offset 65536\n"
        ),
        "{text}"
    );
    assert!(
        text.lines()
            .last()
            .unwrap_or_default()
            .starts_with("512,1,0:00:"),
        "{text}"
    );
}

#[test]
fn commands_from_stdin() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Some(dir) = fixtures() else { return };
    let mut child = Command::new(qed_path())
        .args(["io", "empty-default.qed"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"write -q -P 7 0 512\nread -q -P 7 0 512\n\nlength\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(code(&out), 0);
    // qemu-io prints its prompt before every line it reads, a terminal or not.
    assert_eq!(
        stdout(&out),
        "qemu-io> qemu-io> qemu-io> qemu-io> 16 MiB\nqemu-io> "
    );
}

#[test]
fn writes_survive_reopen_and_qemu_reads_them() {
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    let out = qed(
        dir,
        &[
            "io",
            "-c",
            "write -P 0x5c 1M 12k",
            "-c",
            "write -z 2M 64k",
            "-c",
            "discard 0 64k",
            "basic-64k.qed",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let checks = [
        "read -P 0x5c 1M 12k",
        "read -P 0 2M 64k",
        "read -P 0 0 64k",
        "read -P 0xef 3M 192k",
    ];
    let mut args = vec!["io", "-r"];
    for c in &checks {
        args.extend(["-c", c]);
    }
    args.push("basic-64k.qed");
    let out = qed(dir, &args);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    if have("qemu-io") {
        let out = run_in(dir, "qemu-io", &args[1..]);
        assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    }
}

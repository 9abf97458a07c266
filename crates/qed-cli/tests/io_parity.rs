//! `qed` invoked as `qemu-io` against QEMU's own qemu-io: the same command lines on the same
//! fresh images (made by qemu-img and qemu-io), compared on stdout (timing figures masked),
//! stderr and the exit status. qemu-io must be installed (under CI=true its absence fails).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{have, have_qemu, qed_path, run_ok};

/// What one run printed and how it ended, timing figures masked.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    stdout: String,
    stderr: String,
    status: String,
}

/// Timing figures (`; 00.00 sec (1.2 MiB/sec and 3.4 ops/sec)`, the terse `-C` line) and
/// QEMU's bug-report footer of the usage text masked.
fn masked(text: &str) -> String {
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let (body, newline) = match line.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (line, ""),
        };
        if body.starts_with("See <https://qemu.org/contribute/")
            || body.starts_with("More information on the QEMU project")
        {
            continue;
        }
        let body = match body.split_once(" ops; ") {
            Some((head, _)) => format!("{head} ops; T"),
            None => {
                let fields: Vec<&str> = body.split(',').collect();
                let terse = fields.len() == 5
                    && fields[..2].iter().all(|f| f.parse::<u64>().is_ok())
                    && fields[2].contains(':');
                if terse {
                    format!("{},{},T", fields[0], fields[1])
                } else {
                    body.to_string()
                }
            }
        };
        out.push_str(&body);
        out.push_str(newline);
    }
    out
}

fn run_of(out: &Output) -> Run {
    Run {
        stdout: masked(&String::from_utf8_lossy(&out.stdout)),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        status: match (out.status.code(), out.status.signal()) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => "?".into(),
        },
    }
}

/// The images every run starts from: `t.qed` (1 MiB, empty), `base.qed` (1 MiB, 0x07 in its
/// first 128 KiB), `top.qed` (over base.qed, empty), `r.raw` (1000 sparse bytes).
fn images(dir: &Path) {
    let img = |args: &[&str]| {
        run_ok(dir, "qemu-img", args);
    };
    img(&["create", "-q", "-f", "qed", "t.qed", "1M"]);
    img(&["create", "-q", "-f", "qed", "base.qed", "1M"]);
    run_ok(
        dir,
        "qemu-io",
        &["-f", "qed", "-c", "write -q -P 7 0 128k", "base.qed"],
    );
    img(&[
        "create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed", "top.qed",
    ]);
    std::fs::File::create(dir.join("r.raw"))
        .and_then(|f| f.set_len(1000))
        .expect("r.raw");
}

/// `qed` under the name `qemu-io`, through a link in `dir`.
fn ours(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let link = bin.join("qemu-io");
    if !link.exists() {
        std::os::unix::fs::symlink(qed_path(), &link).expect("link");
    }
    link
}

/// Runs `program args` in `dir` with `input` on stdin.
fn run(dir: &Path, program: &Path, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = stdin.write_all(input.as_bytes());
    drop(stdin);
    child.wait_with_output().expect("wait")
}

/// Runs `args` with stdin `input` through QEMU's qemu-io and through ours, each in a fresh
/// directory set up by [`images`] and then `setup`; returns (QEMU's, ours).
fn both_with(setup: &dyn Fn(&Path), args: &[&str], input: &str) -> (Run, Run) {
    let qemu = tempfile::tempdir().expect("temp dir");
    images(qemu.path());
    setup(qemu.path());
    let q = run(qemu.path(), Path::new("qemu-io"), args, input);
    let mine = tempfile::tempdir().expect("temp dir");
    images(mine.path());
    setup(mine.path());
    let m = run(mine.path(), &ours(mine.path()), args, input);
    (run_of(&q), run_of(&m))
}

fn both(args: &[&str]) -> (Run, Run) {
    both_with(&|_| {}, args, "")
}

/// `-c` arguments for `commands`, after `before`.
fn with_commands<'a>(before: &[&'a str], commands: &[&'a str]) -> Vec<&'a str> {
    let mut args = before.to_vec();
    for c in commands {
        args.extend(["-c", c]);
    }
    args
}

#[track_caller]
fn assert_same(args: &[&str]) {
    let (q, m) = both(args);
    assert_eq!(q, m, "qemu-io {args:?}");
}

#[track_caller]
fn assert_same_commands(before: &[&str], commands: &[&str]) {
    assert_same(&with_commands(before, commands));
}

fn qemu_io_present() -> bool {
    have_qemu() && have("qemu-io")
}

#[test]
fn help_usage_and_command_table() {
    if !qemu_io_present() {
        return;
    }
    let mut commands = vec!["help".to_string()];
    for name in [
        "abort",
        "aio_flush",
        "aio_read",
        "aio_write",
        "alloc",
        "break",
        "close",
        "discard",
        "flush",
        "help",
        "info",
        "length",
        "map",
        "open",
        "quit",
        "read",
        "readv",
        "remove_break",
        "reopen",
        "resume",
        "sigraise",
        "sleep",
        "truncate",
        "wait_break",
        "write",
        "writev",
        "zone_append",
        "zone_close",
        "zone_finish",
        "zone_open",
        "zone_report",
        "zone_reset",
        "r",
        "w",
        "?",
        "nosuch",
    ] {
        commands.push(format!("help {name}"));
    }
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    assert_same_commands(&[], &commands);
    // Usage errors print the usage; the first bad option ends the parse.
    for args in [
        &["-h"][..],
        &["-q", "t.qed"],
        &["a", "b"],
        &["--c", "t.qed"],
        &["--foo", "t.qed"],
        &["--snapshot=1", "t.qed"],
        &["--cache"],
        &["-c"],
        &["-t", "bogus", "t.qed"],
        &["-d", "bogus", "t.qed"],
        &["-i", "bogus", "t.qed"],
        &["--", "t.qed", "-c", "length"],
        &["--image-opts", "-f", "qed", "t.qed"],
    ] {
        assert_same(args);
    }
    // Accepted options, long forms and abbreviations, -f given twice, -c attached.
    for args in [
        &["--snap", "--cach=writeback", "--cmd=length", "t.qed"][..],
        &["-f", "raw", "-f", "qed", "-c", "info", "t.qed"],
        &["-f", "qed", "-f", "raw", "-c", "info", "t.qed"],
        &["-cread 0 1", "t.qed"],
        &["t.qed", "-c", "length", "--"],
        &[
            "--object",
            "secret,id=s0,data=x",
            "-m",
            "-c",
            "read -q 0 1",
            "t.qed",
        ],
        &["-i", "io_uring", "-c", "read -q 0 1", "t.qed"],
        &["-k", "-t", "none", "-c", "read -q 0 1", "t.qed"],
        &[
            "--aio=threads",
            "--discard=unmap",
            "-c",
            "read -q 0 1",
            "t.qed",
        ],
    ] {
        assert_same(args);
    }
}

#[test]
fn reads_and_writes_plain_and_vectored() {
    if !qemu_io_present() {
        return;
    }
    assert_same_commands(
        &["t.qed"],
        &[
            "write -P 0x11 0 64k",
            "read -P 0x11 0 64k",
            "read -v 0 40",
            "readv -P 0x11 0 512 1k 4k",
            "readv -v 0 16 16",
            "writev -P 0x22 1000 512 100 3",
            "read -P 0x22 1000 615",
            "readv -P 0x11 0 16 2k",
            "writev -C 2M 512",
            "writev -C 0 512",
            "readv -C 0 512 512",
            "read -C 0 512",
            "writev -q -P 5 64k 4k 4k",
            "readv -q -P 5 64k 8k",
            "readv 0 1 -q 0",
            "writev -f 0 512",
            "write -z 64k 64k",
            "write -z -u 128k 64k",
            "write -p -P 9 0 512",
            "read -p -P 9 0 512",
            "write -r 0 512",
            "read -r 0 512",
            "read -P 9 -s 100 -l 100 0 512",
            "writev",
            "writev 0",
            "readv 0",
            "writev -P 0x1ff 0 1",
            "readv 0 3G",
            "readv 0 1G 1G 1G",
            "readv 0 1x",
            "writev -x 0 1",
            "readv 1M 0",
            "readv 2M 0",
            "write -c 0 64k",
            "write -b 0 512",
            "read -b 0 512",
            "write -b 1 512",
            "write -bz 0 512",
            "write -r -z 0 512",
            "write -z -n 0 512",
            "write -z -n 0 3G",
            "read -b -r 0 512",
            "write -b -f 0 512",
            "write 1M 0",
            "read 2M 0",
            "read 1M 1",
        ],
    );
    assert_same_commands(
        &["-f", "raw", "r.raw"],
        &[
            "writev -P 3 0 100 900",
            "readv -P 3 0 1000",
            "read -v 990 34",
            "write -z -u 0 512",
            "read -P 0 0 512",
        ],
    );
}

/// Completion blocks (a report's two lines) of one stretch of output, sorted: requests in
/// flight together may complete in any order.
fn blocks(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks: Vec<String> = lines.chunks(2).map(|c| c.join("\n")).collect();
    blocks.sort();
    blocks
}

#[test]
fn aio_requests_complete_and_report() {
    if !qemu_io_present() {
        return;
    }
    // One request in flight at a time: the output is fixed.
    assert_same_commands(
        &["t.qed"],
        &[
            "aio_write -P 1 0 64k",
            "aio_flush",
            "aio_write -P 2 64k 64k",
            "aio_flush",
            "aio_read -P 1 0 64k",
            "aio_flush",
            "aio_read -P 2 0 512",
            "aio_flush",
            "aio_read -q 0 512",
            "aio_read -v 0 16",
            "aio_flush",
            "aio_read -C -P 1 0 512",
            "aio_flush",
            "aio_write -z 0 64k",
            "aio_flush",
            "aio_write -z -u 64k 64k",
            "aio_flush",
            "aio_write -f -P 3 0 512",
            "sleep 100",
            "read -P 3 0 512",
            "aio_write -P 4 0 512",
            "aio_flush",
            "aio_read 4M 512",
            "aio_flush",
            "aio_write 4M 512",
            "aio_flush",
        ],
    );
    // Refused before submission.
    assert_same_commands(
        &["t.qed"],
        &[
            "aio_write -u 0 64k",
            "aio_write -z 0 1 2",
            "aio_write -i 0 1",
            "aio_read -i 0 1",
            "aio_write -z 0 1x",
            "aio_write 0 3G",
            "aio_write 0 1G 1G 1G",
            "aio_read 0 1x",
            "aio_read x 1",
            "aio_write -r -z 0 512",
            "aio_read 0",
            "aio_read -x 0 1",
            "aio_write -P 0x100 0 1",
        ],
    );
    // Several in flight at once, to different clusters: the same completions (in an order
    // that depends on timing, in QEMU as here), all printed by aio_flush, before what comes
    // after it; completions still in flight at the end print before the exit.
    let commands = [
        "aio_write -P 1 0 64k",
        "aio_write -P 2 64k 64k",
        "aio_write -P 3 128k 4k",
        "aio_write -z 512k 64k",
        "aio_flush",
        "length",
        "aio_read -P 1 0 64k",
        "aio_read -P 2 64k 64k",
        "aio_read -P 3 128k 4k",
        "aio_read -P 0 512k 64k",
        "aio_flush",
        "length",
        "aio_read -P 1 0 4k",
        "aio_read -P 2 64k 4k",
    ];
    let (q, m) = both(&with_commands(&["t.qed"], &commands));
    assert_eq!((&q.stderr, &q.status), (&m.stderr, &m.status));
    let parts = |text: &str| -> Vec<Vec<String>> { text.split("1 MiB\n").map(blocks).collect() };
    assert_eq!(
        parts(&q.stdout),
        parts(&m.stdout),
        "{}\n---\n{}",
        q.stdout,
        m.stdout
    );
    assert_eq!(parts(&m.stdout).len(), 3, "{}", m.stdout);
}

#[test]
fn alloc_map_info_length() {
    if !qemu_io_present() {
        return;
    }
    assert_same_commands(
        &["t.qed"],
        &[
            "alloc 0",
            "write 0 4k",
            "alloc 0 1M",
            "alloc 100 100",
            "alloc 2M",
            "alloc 1M 100",
            "alloc 0 4M",
            "alloc 1x",
            "alloc 0 1x",
            "alloc",
            "alloc 0 1 2",
            "write -z 128k 64k",
            "alloc 64k 192k",
            "a 4k 1",
            "map",
            "info",
            "i",
            "length",
            "l",
            "info 1",
        ],
    );
    assert_same_commands(
        &["top.qed"],
        &[
            "alloc 0 1M",
            "map",
            "write -P 1 192k 4k",
            "map",
            "alloc 0 1M",
            "info",
        ],
    );
    assert_same_commands(
        &["-f", "raw", "r.raw"],
        &["info", "length", "alloc 0 1000", "alloc 0 2000", "map"],
    );
    assert_same_commands(&["-f", "raw", "t.qed"], &["info", "map"]);
}

#[test]
fn open_close_reopen_and_no_file() {
    if !qemu_io_present() {
        return;
    }
    // Commands with no image open.
    assert_same_commands(
        &[],
        &[
            "read 0 512",
            "alloc 0",
            "info",
            "close",
            "length",
            "map",
            "sleep 1",
            "sigraise 0",
            "open",
            "open -x t.qed",
            "open a b",
            "open t.qed",
            "open t.qed",
            "length",
            "close",
            "close",
            "o -r t.qed",
            "write 0 1",
            "c",
            "open -o driver=raw t.qed",
            "info",
            "close",
            "open -o foo=bar t.qed",
            "open -o x t.qed",
            "open -o driver=qed,file.filename=t.qed",
            "info",
            "close",
            "open -U t.qed",
            "open -r -U t.qed",
            "write 0 1",
            "close",
            "open -t bogus t.qed",
            "open -d bogus t.qed",
            "open -i bogus t.qed",
            "open -i native t.qed",
            "open -C -r t.qed",
            "open -n -t writeback -d ignore -i threads -k t.qed",
            "close",
            "open -s top.qed",
            "write -P 9 0 4k",
            "read -P 9 0 4k",
            "close",
            "open nonexistent",
        ],
    );
    assert_same_commands(
        &["t.qed"],
        &[
            "write -P 1 0 64k",
            "reopen -r",
            "write 0 1",
            "read -P 1 0 64k",
            "reopen -w",
            "write -P 2 0 512",
            "reopen -c none",
            "read -P 2 0 512",
            "reopen -c writethrough",
            "reopen -c unsafe",
            "write -P 3 0 512",
            "reopen -o cache.direct=on -c none",
            "reopen -r -o read-only=off",
            "reopen -r -w",
            "reopen -c bogus",
            "reopen -o foo=bar",
            "reopen -x",
            "reopen x",
            "reopen -r",
            "reopen -o read-only=off",
            "write -P 4 0 1",
            "read -P 4 0 1",
            "aio_write -P 5 64k 4k",
            "reopen -r",
            "read -P 5 64k 4k",
        ],
    );
    // --image-opts.
    for args in [
        &[
            "--image-opts",
            "driver=qed,file.filename=t.qed",
            "-c",
            "info",
        ][..],
        &["--image-opts", "file.filename=t.qed", "-c", "info"],
        &[
            "--image-opts",
            "driver=raw,file.filename=t.qed",
            "-c",
            "info",
        ],
        &["--image-opts", "t.qed", "-c", "info"],
        &["--image-opts", "driver=qed,file=t.qed", "-c", "info"],
        &["--image-opts", "driver=qed", "-c", "info"],
        &["--image-opts", "driver=qed,file.filename=nonexist"],
        &["--image-opts", "driver=qed,file.filename=t.qed,foo=bar"],
        &[
            "--image-opts",
            "-c",
            "open driver=qed,file.filename=t.qed",
            "-c",
            "info",
            "-c",
            "close",
            "-c",
            "open -o driver=qed t.qed",
        ],
    ] {
        assert_same(args);
    }
}

#[test]
fn truncate_grows_and_refuses_as_qemu_io() {
    if !qemu_io_present() {
        return;
    }
    assert_same_commands(
        &["t.qed"],
        &[
            "truncate 2M",
            "length",
            "read -P 0 1M 1M",
            "truncate 1000",
            "truncate -m full 4M",
            "truncate -m bogus 4M",
            "truncate 1x",
            "truncate -m off 1x",
            "truncate -m off 3M",
            "t 4M",
            "length",
            "truncate",
            "write -P 1 3M 64k",
            "map",
        ],
    );
    assert_same_commands(
        &["-f", "raw", "r.raw"],
        &["truncate 64k", "length", "truncate 10000", "length"],
    );
}

#[test]
fn truncate_shrinks_qed_images() {
    // Where QEMU's QED driver refuses ("Shrinking images is currently not supported"), the
    // engine shrinks; the image stays valid for QEMU.
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let qed = qed_path().display().to_string();
    run_ok(d, &qed, &["create", "-q", "-f", "qed", "s.qed", "4M"]);
    let out = run_ok(
        d,
        &ours(d).display().to_string(),
        &[
            "-c",
            "write -P 1 0 3M",
            "-c",
            "truncate 1M",
            "-c",
            "length",
            "-c",
            "truncate 2M",
            "-c",
            "read -q -P 1 0 1M",
            "-c",
            "read -q -P 0 1M 1M",
            "s.qed",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("1 MiB\n"), "{text}");
    run_ok(d, &qed, &["check", "s.qed"]);
    if have("qemu-img") {
        run_ok(d, "qemu-img", &["check", "s.qed"]);
    }
}

fn file_bytes(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn snapshot_writes_are_thrown_away() {
    if !qemu_io_present() {
        return;
    }
    let commands = [
        "map",
        "write -P 9 0 4k",
        "read -P 9 0 4k",
        "read -P 7 4k 4k",
        "map",
        "alloc 0 1M",
        "truncate 2M",
        "length",
        "discard 0 64k",
        "length",
    ];
    assert_same_commands(&["-s", "top.qed"], &commands);
    assert_same_commands(
        &["-s", "-f", "raw", "r.raw"],
        &["write -P 1 0 512", "read -P 1 0 512"],
    );
    assert_same_commands(&["-s", "-r", "top.qed"], &["write -P 9 0 4k"]);
    // The image and its backing file are left byte for byte as they were.
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    images(d);
    let (top, base) = (file_bytes(d, "top.qed"), file_bytes(d, "base.qed"));
    let out = run(
        d,
        &ours(d),
        &with_commands(&["-s", "top.qed"], &commands),
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(file_bytes(d, "top.qed"), top);
    assert_eq!(file_bytes(d, "base.qed"), base);
    let out = run(d, &ours(d), &["-c", "read -P 7 0 4k", "top.qed"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn copy_on_read_copies_into_the_image() {
    if !qemu_io_present() {
        return;
    }
    assert_same_commands(
        &["-C", "top.qed"],
        &[
            "map",
            "read -P 7 0 4k",
            "map",
            "read -P 0 512k 4k",
            "map",
            "readv -P 7 64k 512 512",
            "aio_read -P 7 100k 1k",
            "aio_flush",
            "alloc 0 1M",
            "map",
        ],
    );
    assert_same_commands(&["-C", "t.qed"], &["read -P 0 0 4k", "map"]);
    assert_same_commands(&["-C", "-r", "top.qed"], &["map"]);
    // What was copied is in the image: without its backing file it still reads.
    let (q, m) = both_with(
        &|d: &Path| {
            run_ok(d, "qemu-io", &["-C", "-c", "read -q 0 64k", "top.qed"]);
        },
        &["-c", "map", "-c", "read -P 7 0 64k", "top.qed"],
        "",
    );
    assert_eq!(q, m);
}

#[test]
fn cache_and_discard_modes() {
    if !qemu_io_present() {
        return;
    }
    let commands = [
        "write -P 1 0 64k",
        "read -P 1 0 64k",
        "write -P 2 100 1000",
        "read -P 2 100 1000",
        "read -P 1 1100 100",
        "write -z -u 0 64k",
        "discard 64k 64k",
        "flush",
        "map",
    ];
    for mode in [
        &[][..],
        &["-n"],
        &["-t", "none"],
        &["-t", "off"],
        &["-t", "directsync"],
        &["-t", "writeback"],
        &["-t", "writethrough"],
        &["-t", "unsafe"],
        &["-d", "ignore"],
        &["-d", "off"],
        &["-d", "on"],
    ] {
        let mut before = mode.to_vec();
        before.push("t.qed");
        assert_same_commands(&before, &commands);
    }
    // With discards ignored the data stays.
    assert_same_commands(
        &["-d", "ignore", "t.qed"],
        &["write -P 1 0 64k", "discard 0 64k", "read -P 1 0 64k"],
    );
}

#[test]
fn writethrough_writes_survive_a_kill() {
    if !qemu_io_present() {
        return;
    }
    // The default cache mode flushes every write before reporting it, so what was reported
    // is in the image after SIGKILL (sigraise 9), as with QEMU.
    for write in [
        "write -P 5 0 64k",
        "writev -P 5 0 32k 32k",
        "aio_write -P 5 0 64k",
    ] {
        let (q, m) = both_with(
            &|_| {},
            &["-c", write, "-c", "aio_flush", "-c", "sigraise 9", "t.qed"],
            "",
        );
        assert_eq!(q, m, "{write}");
        assert_eq!(m.status, "signal 9");
        let (q, m) = both_with(
            &|d: &Path| {
                let _ = run(
                    d,
                    &ours(d),
                    &["-c", write, "-c", "aio_flush", "-c", "sigraise 9", "t.qed"],
                    "",
                );
            },
            &["-c", "read -P 5 0 64k", "t.qed"],
            "",
        );
        assert_eq!(q, m, "{write}");
        assert_eq!(m.status, "exit 0", "{write}: {}", m.stdout);
    }
}

/// Prepares a run's directory.
type Setup = dyn Fn(&Path);

#[test]
fn errors_in_qemu_words() {
    if !qemu_io_present() {
        return;
    }
    let setups: &[(&str, &Setup)] = &[
        ("nothing", &|_| {}),
        ("missing backing", &|d: &Path| {
            run_ok(
                d,
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qed",
                    "-u",
                    "-b",
                    "missing.qed",
                    "-F",
                    "qed",
                    "nob.qed",
                    "1M",
                ],
            );
            run_ok(
                d,
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qed",
                    "-u",
                    "-b",
                    "missing.raw",
                    "-F",
                    "raw",
                    "nob2.qed",
                    "1M",
                ],
            );
            run_ok(
                d,
                "qemu-img",
                &[
                    "create", "-q", "-f", "qed", "-u", "-b", "nob.qed", "-F", "qed", "deep.qed",
                    "1M",
                ],
            );
            std::fs::create_dir(d.join("sub")).expect("sub");
            run_ok(
                d,
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qed",
                    "-u",
                    "-b",
                    "missing.qed",
                    "-F",
                    "qed",
                    "sub/nob.qed",
                    "1M",
                ],
            );
            std::fs::write(d.join("notqed"), b"hello\n").expect("notqed");
        }),
    ];
    let cases: &[&[&str]] = &[
        &["-c", "read 0 1", "nonexistent"],
        &["-c", "read 0 1", "/"],
        &["-c", "read 0 1", ""],
        &["-c", "read 0 1", "nob.qed"],
        &["-c", "read 0 1", "nob2.qed"],
        &["-c", "read 0 1", "deep.qed"],
        &["-c", "read 0 1", "sub/nob.qed"],
        &["-c", "read -v 0 6", "notqed"],
        &["-f", "qed", "-c", "read 0 1", "notqed"],
        &["-f", "qed", "r.raw"],
        &["-f", "bogus", "r.raw"],
        &["-U", "-c", "read 0 1", "t.qed"],
        &["-C", "-r", "t.qed"],
        &["-i", "native", "t.qed"],
        &[
            "-r",
            "-c",
            "write 0 1",
            "-c",
            "writev 0 1",
            "-c",
            "aio_write 0 1",
            "-c",
            "discard 0 1",
            "-c",
            "truncate 2M",
            "-c",
            "write -z 0 1",
            "t.qed",
        ],
        &[
            "-c",
            "read 1M 1",
            "-c",
            "write 1M 1",
            "-c",
            "read 0 2G",
            "-c",
            "write -z 0 3G",
            "-c",
            "discard 0 3G",
            "-c",
            "discard 1M 1",
            "-c",
            "read -P 1 0 1",
            "-c",
            "foo",
            "-c",
            "read",
            "-c",
            "read -x 0 1",
            "-c",
            "r -x 0 1",
            "-c",
            "close 1",
            "-c",
            "write -s nonexistent 0 1",
            "t.qed",
        ],
        &[
            "-c",
            "sigraise 100",
            "-c",
            "sleep x",
            "-c",
            "sleep -1",
            "-c",
            "sleep 0x10",
            "-c",
            "sigraise -1",
            "-c",
            "sleep 10ms",
            "-c",
            "break a b",
            "-c",
            "remove_break a",
            "-c",
            "resume a",
            "-c",
            "zone_report 0 1",
            "-c",
            "zone_open 0 1",
            "-c",
            "zone_close 0 1",
            "-c",
            "zone_finish 0 1",
            "-c",
            "zone_reset 0 1",
            "-c",
            "zone_append 0 512 512",
            "-c",
            "zone_report x 1",
            "-c",
            "zone_report 0 5G",
            "t.qed",
        ],
    ];
    for (name, setup) in setups {
        for args in cases {
            let (q, m) = both_with(*setup, args, "");
            assert_eq!(q, m, "{name}: {args:?}");
        }
    }
}

#[test]
fn a_locked_image_is_refused() {
    if !qemu_io_present() {
        return;
    }
    for (holder, args) in [
        (&["-c", "sleep 3000"][..], &["-c", "read 0 1"][..]),
        (&["-c", "sleep 3000"], &["-r", "-c", "read 0 1"]),
        (&["-r", "-c", "sleep 3000"], &["-c", "read 0 1"]),
        (&["-r", "-c", "sleep 3000"], &["-r", "-c", "read -q 0 1"]),
    ] {
        let (q, m) = both_with(
            &|d: &Path| {
                let mut args = holder.to_vec();
                args.push("t.qed");
                let child = Command::new("qemu-io")
                    .args(&args)
                    .current_dir(d)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("qemu-io");
                // Until it holds its lock.
                std::thread::sleep(std::time::Duration::from_millis(500));
                std::mem::forget(child);
            },
            &{
                let mut a = args.to_vec();
                a.push("t.qed");
                a
            },
            "",
        );
        assert_eq!(q, m, "{holder:?} {args:?}");
    }
}

#[test]
fn commands_from_stdin_after_the_prompt() {
    if !qemu_io_present() {
        return;
    }
    let long = format!("{}\nlength\n", "x".repeat(1500));
    for (args, input) in [
        (&["t.qed"][..], "read -q 0 1\nlength\n\nfoo\nquit\nlength\n"),
        (&["t.qed"], "length"),
        (&["t.qed"], "read 0 1x\n"),
        (&["-c", "length", "t.qed"], "length\n"),
        (
            &[],
            "open t.qed\nlength\naio_write 0 64k\naio_flush\nclose\nlength\n",
        ),
        (&["t.qed"], "aio_write 0 64k\n"),
        (&[], ""),
        (&["t.qed"], long.as_str()),
    ] {
        let (q, m) = both_with(&|_| {}, args, input);
        assert_eq!(q, m, "{args:?} {input:?}");
    }
}

#[test]
fn abort_and_signals_end_the_process_as_qemu_io() {
    if !qemu_io_present() {
        return;
    }
    for commands in [
        &["abort"][..],
        &["sigraise 15"],
        &["sigraise 9"],
        &["sigraise 10", "length"],
        &["sigraise 12"],
        &["sigraise 14", "sigraise 29", "sigraise 7", "length"],
        &["sigraise 17", "sigraise 13", "sigraise 65", "length"],
        &["write -q -P 3 0 4k", "abort"],
    ] {
        let (q, m) = both(&with_commands(&["t.qed"], commands));
        // qemu-io's stdout is lost in a pipe when abort() ends it (glibc does not flush it);
        // ours writes each line out as it goes.
        assert_eq!((q.status, q.stderr), (m.status, m.stderr), "{commands:?}");
    }
    // After an abort the written data is there (writethrough), and NEED_CHECK is handled.
    let (q, m) = both_with(
        &|d: &Path| {
            let _ = run(
                d,
                &ours(d),
                &["-c", "write -q -P 3 0 4k", "-c", "abort", "t.qed"],
                "",
            );
        },
        &["-c", "read -P 3 0 4k", "t.qed"],
        "",
    );
    assert_eq!(q, m);
}

//! One binary, several names: through a link named `qemu-img` or `qemu-io`, `qed` is that
//! program, and its error lines start with the name it was invoked as.

mod common;

use common::{code, have_qemu, qed_path, run_in, stderr, stdout};

fn links(dir: &std::path::Path) {
    for name in ["qemu-img", "qemu-io", "qemu-nbd"] {
        std::os::unix::fs::symlink(qed_path(), dir.join(name)).unwrap();
    }
}

#[test]
fn invoked_as_qemu_img_and_qemu_io_it_is_those_programs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    links(d);
    let img = d.join("qemu-img").display().to_string();
    let io = d.join("qemu-io").display().to_string();
    let out = run_in(d, &img, &["create", "-f", "qed", "disk.qed", "1M"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("Formatting 'disk.qed', fmt=qed"),
        "{}",
        stdout(&out)
    );
    let out = run_in(
        d,
        &io,
        &[
            "-c",
            "write -P 0x5a 0 4k",
            "-c",
            "read -P 0x5a 0 4k",
            "disk.qed",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("wrote 4096/4096 bytes at offset 0"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("read 4096/4096 bytes at offset 0"),
        "{}",
        stdout(&out)
    );
    let out = run_in(d, &img, &["check", "disk.qed"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    if have_qemu() {
        let out = run_in(d, "qemu-img", &["check", "disk.qed"]);
        assert_eq!(code(&out), 0, "{}", stdout(&out));
    }
}

#[test]
fn error_lines_start_with_the_name_it_was_invoked_as() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    links(d);
    for (name, args) in [
        ("qemu-img", vec!["info", "missing.qed"]),
        ("qemu-io", vec!["-c", "read 0 512", "missing.qed"]),
        ("qemu-img", vec!["no-such-command"]),
    ] {
        let program = d.join(name).display().to_string();
        let out = run_in(d, &program, &args);
        assert_ne!(code(&out), 0);
        let err = stderr(&out);
        assert!(
            err.starts_with(&format!("{name}: ")),
            "{name} {args:?}: {err}"
        );
        assert!(
            !err.lines().any(|l| l.starts_with("qed: ")),
            "{name} {args:?}: {err}"
        );
    }
    let out = run_in(
        d,
        &qed_path().display().to_string(),
        &["info", "missing.qed"],
    );
    assert!(stderr(&out).starts_with("qed: "), "{}", stderr(&out));
}

#[test]
fn qemu_nbd_fork_keeps_the_name_in_the_background_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    links(d);
    let nbd = d.join("qemu-nbd").display().to_string();
    let out = run_in(
        d,
        &qed_path().display().to_string(),
        &["create", "-f", "qed", "disk.qed", "1M"],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let socket = d.join("s.sock").display().to_string();
    // qemu-nbd's arguments, as QEMU's tests pass them: without `serve`, the background
    // process must still parse them as qemu-nbd's.
    let out = run_in(
        d,
        &nbd,
        &[
            "--pid-file=srv.pid",
            "-v",
            "-k",
            &socket,
            "--fork",
            "-f",
            "qed",
            "disk.qed",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    if have_qemu() {
        let uri = format!("nbd+unix:///?socket={socket}");
        let out = run_in(d, "qemu-io", &["-f", "raw", "-c", "read 0 4k", &uri]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    // Not persistent: the server ends after its client; if the client never ran, stop it.
    let pid = std::fs::read_to_string(d.join("srv.pid")).unwrap_or_default();
    if !pid.trim().is_empty() {
        let _ = std::process::Command::new("kill").arg(pid.trim()).status();
    }
}

/// Under the name qemu-img, `-p` prints what qemu-img prints: percentages rewritten in place
/// on stdout, from 0.00 to 100.00, whether or not stdout is a terminal.
#[test]
fn qemu_img_progress_is_qemu_img_s() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    links(d);
    let img = d.join("qemu-img").display().to_string();
    let out = run_in(d, &img, &["create", "-q", "-f", "qed", "src.qed", "8M"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run_in(
        d,
        &img,
        &["convert", "-p", "-O", "raw", "src.qed", "out.raw"],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("    (0.00/100%)\r"), "{text:?}");
    assert!(text.ends_with("    (100.00/100%)\r\n"), "{text:?}");
    for piece in text.trim_end_matches('\n').split_terminator('\r') {
        let number = piece
            .strip_prefix("    (")
            .and_then(|p| p.strip_suffix("/100%)"))
            .unwrap_or_else(|| panic!("{piece:?} in {text:?}"));
        let value: f64 = number.parse().unwrap();
        assert!((0.0..=100.0).contains(&value), "{text:?}");
    }
    if have_qemu() {
        let theirs = run_in(
            d,
            "qemu-img",
            &["convert", "-p", "-O", "raw", "src.qed", "q.raw"],
        );
        assert_eq!(stdout(&theirs), text, "the same for an empty image");
    }
    // As `qed`, a bar on stderr only when it is a terminal: nothing here.
    let out = run_in(
        d,
        &qed_path().display().to_string(),
        &["convert", "-p", "-O", "raw", "src.qed", "o2.raw"],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).is_empty() && stderr(&out).is_empty(),
        "{out:?}"
    );
}

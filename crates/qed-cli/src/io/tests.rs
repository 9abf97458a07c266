//! The cache modes' flushes, counted: qemu-io's default (writethrough) flushes after every
//! write-type command, writeback only when asked.

use qed_image::{CreateParams, Image};

use super::commands::{run_command, Ctx, Outcome};
use super::console::Console;
use super::flags::OpenFlags;
use super::session::OpenRequest;

/// Runs `commands` on a new 1 MiB image opened with `flags`; returns the flushes issued and
/// stdout.
fn flushes(flags: OpenFlags, commands: &[&str]) -> (u64, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("t.qed");
    Image::create(
        &path,
        &CreateParams {
            image_size: 1 << 20,
            cluster_size: 65536,
            table_size: 4,
            backing_file: None,
            backing_raw: false,
        },
    )
    .expect("create");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let count = {
        let mut ctx = Ctx::new(Console::new(&mut out, &mut err), false);
        assert!(ctx.open_session(OpenRequest {
            name: Some(path.display().to_string()),
            format: None,
            flags,
            options: Vec::new(),
        }));
        for command in commands {
            assert_eq!(run_command(&mut ctx, command), Outcome::Done, "{command}");
        }
        ctx.events.drain(&mut ctx.con);
        let count = ctx.session.as_ref().expect("open").disk().flushes();
        assert_eq!(ctx.close(), Outcome::Done);
        count
    };
    assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
    (count, String::from_utf8(out).expect("utf-8"))
}

const WRITES: &[&str] = &[
    "write -q 0 512",
    "writev -q 4k 512 512",
    "write -q -z 64k 64k",
    "discard -q 64k 64k",
    "truncate 2M",
    "aio_write -q 128k 4k",
    "aio_flush",
    "read -q 0 512",
    "readv -q 0 512 512",
    "aio_read -q 0 512",
    "aio_flush",
];

#[test]
fn writethrough_flushes_after_every_write() {
    let (count, _) = flushes(OpenFlags::default(), WRITES);
    assert_eq!(count, 6);
    let mut flags = OpenFlags::default();
    assert!(flags.set_cache("directsync"));
    let (count, _) = flushes(flags, WRITES);
    assert_eq!(count, 6);
}

#[test]
fn writeback_flushes_when_asked() {
    for mode in ["writeback", "none", "unsafe"] {
        let mut flags = OpenFlags::default();
        assert!(flags.set_cache(mode));
        let (count, _) = flushes(flags, WRITES);
        assert_eq!(count, 0, "{mode}");
        let (count, _) = flushes(
            flags,
            &[
                "write -q 0 512",
                "flush",
                "write -q -f 0 512",
                "writev -q -f 0 512",
                "aio_write -q -f 0 1",
            ],
        );
        assert_eq!(count, 4, "{mode}");
    }
}

#[test]
fn aio_completions_print_by_aio_flush() {
    let (_, out) = flushes(
        OpenFlags::default(),
        &[
            "aio_write -P 1 0 4k",
            "aio_write -P 2 512k 4k",
            "aio_flush",
            "length",
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4 + 1, "{out}");
    assert!(
        lines[..4].contains(&"wrote 4096/4096 bytes at offset 0"),
        "{out}"
    );
    assert!(
        lines[..4].contains(&"wrote 4096/4096 bytes at offset 524288"),
        "{out}"
    );
    assert_eq!(lines[4], "1 MiB", "{out}");
}

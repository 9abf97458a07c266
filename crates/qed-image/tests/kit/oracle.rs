//! External programs, QEMU's tools above all, used as an oracle: running them, the rule for
//! when they are missing, and one wrapper per `qemu-img` / `qemu-io` use.
//!
//! The rule: a test that needs a tool calls [`require_tool`] (or a helper that does) and
//! returns early when it says false. Without the tool that prints a note and the test passes,
//! except under `CI=true`, where it fails.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};

use super::map::{parse_qemu_map, MapEntry};

/// Whether we run under CI (missing tools and fixtures are then a failure, not a skip).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `tool` can be run. When it cannot: panics under CI (`CI=true`), otherwise prints a
/// note and returns false so that the caller returns early.
pub fn require_tool(tool: &str) -> bool {
    let ok = spawn(Command::new(tool).arg("--version"))
        .and_then(std::process::Child::wait_with_output)
        .is_ok_and(|o| o.status.success());
    if !ok {
        if in_ci() {
            panic!("{tool} is required under CI but cannot be run");
        }
        eprintln!("note: {tool} not found; skipping what needs it");
    }
    ok
}

/// Held while a child is started.
static SPAWNING: Mutex<()> = Mutex::new(());

/// Starts `cmd` with its output captured, one child at a time in this process.
///
/// Between fork and exec a child holds a copy of every descriptor of the test process, and
/// with it the open file description an image's OFD lock belongs to. Without this, a test that
/// closes an image and runs qemu-img on it could find the lock still held by another test's
/// child that had not yet exec'd. `spawn` returns once the child has exec'd (and so closed its
/// copies), so a child started after this lock is taken sees no lock of a closed image.
pub fn spawn(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let _one_at_a_time = SPAWNING.lock().unwrap_or_else(PoisonError::into_inner);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// What a finished command left behind.
#[derive(Debug)]
pub struct Output {
    /// Exit code (`None` if killed by a signal).
    pub status: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl Output {
    /// Panics with the command's output unless it exited with `code`.
    #[track_caller]
    pub fn expect_status(&self, code: i32, what: &str) -> &Self {
        assert_eq!(
            self.status,
            Some(code),
            "{what}: unexpected exit status\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `program args...` in `dir` (or the current directory) and returns its output.
/// Panics only if the program cannot be started.
pub fn run_in<I, S>(dir: Option<&Path>, program: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let out = spawn(&mut cmd)
        .and_then(std::process::Child::wait_with_output)
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    Output {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `program args...` in the current directory.
pub fn run<I, S>(program: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_in(None, program, args)
}

/// Runs `qemu-img args...`.
pub fn qemu_img<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run("qemu-img", args)
}

/// Runs `qemu-img args... paths...`.
fn qemu_img_on(args: &[&str], paths: &[&Path]) -> Output {
    let args = args.iter().map(OsStr::new);
    qemu_img(args.chain(paths.iter().map(|p| p.as_os_str())))
}

/// The counters of `qemu-img check --output=json`, with its exit code.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct QemuCheck {
    pub status: Option<i32>,
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub allocated_clusters: u64,
    /// stdout and stderr, for messages.
    pub raw: String,
}

/// Runs `qemu-img check -U --output=json -f qed <image>` (`-U`: another test thread's child
/// may briefly hold a copy of a descriptor, and so of our lock).
pub fn qemu_check(image: &Path) -> QemuCheck {
    let out = qemu_img_on(&["check", "-U", "--output=json", "-f", "qed"], &[image]);
    let field = |key: &str| -> u64 {
        let pat = format!("\"{key}\":");
        out.stdout
            .find(&pat)
            .map(|i| {
                out.stdout[i + pat.len()..]
                    .trim_start()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .expect(key)
            })
            .unwrap_or(0)
    };
    QemuCheck {
        status: out.status,
        corruptions: field("corruptions"),
        leaks: field("leaks"),
        check_errors: field("check-errors"),
        allocated_clusters: field("allocated-clusters"),
        raw: format!("{}{}", out.stdout, out.stderr),
    }
}

/// `qemu-img check` of `image` must exit 0 (no corruption, no leak). Without qemu-img: see
/// [`require_tool`]; returns whether the check ran.
#[track_caller]
pub fn assert_qemu_img_check(image: &Path) -> bool {
    if !require_tool("qemu-img") {
        return false;
    }
    let report = qemu_check(image);
    assert_eq!(
        report.status,
        Some(0),
        "qemu-img check {}:\n{}",
        image.display(),
        report.raw
    );
    true
}

/// `qemu-img map --output=json -f qed <image>`, as it finished (see [`qemu_map`]).
pub fn qemu_map_output(image: &Path) -> Output {
    qemu_img_on(&["map", "--output=json", "-f", "qed"], &[image])
}

/// `qemu-img map` of `image`, parsed. Panics if qemu-img fails.
pub fn qemu_map(image: &Path) -> Vec<MapEntry> {
    let out = qemu_map_output(image);
    out.expect_status(0, "qemu-img map");
    parse_qemu_map(&out.stdout)
}

/// `qemu-img convert -O raw` of `image` (format `fmt`) into `out`; panics on failure.
pub fn qemu_convert_raw(image: &Path, fmt: &str, out: &Path) {
    qemu_img_on(&["convert", "-f", fmt, "-O", "raw"], &[image, out])
        .expect_status(0, "qemu-img convert");
}

/// `qemu-img compare -f qed -F raw <image> <raw>`: exit 0 when identical.
pub fn qemu_compare_raw(image: &Path, raw: &Path) -> Output {
    qemu_img_on(&["compare", "-f", "qed", "-F", "raw"], &[image, raw])
}

/// `qemu-img create -f qed` of a `size`-byte image with the given geometry, over `backing`
/// (name, format) if any; panics on failure.
pub fn qemu_create(path: &Path, size: u64, cs: u64, ts: u32, backing: Option<(&str, &str)>) {
    let opts = format!("cluster_size={cs},table_size={ts}");
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qed", "-o", &opts];
    if let Some((name, fmt)) = backing {
        args.extend(["-b", name, "-F", fmt]);
    }
    args.push(path.to_str().expect("UTF-8 path"));
    args.push(&size);
    qemu_img(args).expect_status(0, "qemu-img create");
}

/// `len` guest bytes at `offset` as QEMU reads them: `qemu-img convert` of a raw-format
/// window (`offset`/`size` options of the raw driver) over the QED image.
pub fn qemu_read_window(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let spec = format!(
        r#"json:{{"driver":"raw","offset":{offset},"size":{len},"file":{{"driver":"qed","file":{{"driver":"file","filename":"{}"}}}}}}"#,
        path.display()
    );
    let out = path.with_extension("window.raw");
    qemu_img([
        "convert",
        "-O",
        "raw",
        spec.as_str(),
        out.to_str().expect("UTF-8 path"),
    ])
    .expect_status(0, "qemu-img convert of a window");
    let bytes = std::fs::read(&out).expect("read the window");
    std::fs::remove_file(&out).expect("remove the window");
    bytes
}

/// Runs `qemu-io -f qed` with one `-c` per command on `image`; panics on failure.
pub fn qemu_io(image: &Path, commands: &[String]) -> Output {
    let mut args: Vec<&OsStr> = vec![OsStr::new("-f"), OsStr::new("qed")];
    for c in commands {
        args.push(OsStr::new("-c"));
        args.push(OsStr::new(c));
    }
    args.push(image.as_os_str());
    let out = run("qemu-io", args);
    out.expect_status(0, "qemu-io");
    assert!(
        !out.stdout.contains("failed") && !out.stderr.contains("failed"),
        "qemu-io reported a failure:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    out
}

/// `qemu-img info -U --output=json -f qed <image>` (the backing file is named, not opened);
/// panics unless it exits 0. Returns the JSON text.
pub fn qemu_info(image: &Path) -> String {
    let out = qemu_img_on(&["info", "-U", "--output=json", "-f", "qed"], &[image]);
    out.expect_status(0, "qemu-img info");
    out.stdout
}

/// A field of the outermost object of a JSON text, as its raw text: a number as written, a
/// string without its quotes (escapes `\"`, `\\` and `\/` undone). `None` when the outermost
/// object has no such key. Enough for `qemu-img info`, whose nested objects repeat some keys.
pub fn json_top_field(json: &str, key: &str) -> Option<String> {
    let bytes = json.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let (text, end) = json_string(bytes, i);
                i = end;
                if depth == 1 && text == key {
                    let rest = json[i..].trim_start();
                    let value = rest.strip_prefix(':')?.trim_start();
                    if value.starts_with('"') {
                        return Some(json_string(value.as_bytes(), 0).0);
                    }
                    let end = value
                        .find(|c: char| c == ',' || c == '}' || c.is_whitespace())
                        .unwrap_or(value.len());
                    return Some(value[..end].to_owned());
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The JSON string starting at the quote at `start`: its text and the index after it.
fn json_string(bytes: &[u8], start: usize) -> (String, usize) {
    let mut out = Vec::new();
    let mut i = start + 1;
    while i < bytes.len() && bytes[i] != b'"' {
        if bytes[i] == b'\\' && i + 1 < bytes.len() {
            i += 1;
        }
        out.push(bytes[i]);
        i += 1;
    }
    (String::from_utf8_lossy(&out).into_owned(), i + 1)
}

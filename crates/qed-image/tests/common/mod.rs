//! Helpers shared by the integration tests: running external tools (QEMU as an oracle),
//! fixture copies, a seeded RNG, hashing of virtual disks, and `qemu-img map` comparison.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use qed_image::{ChainExtent, ChainKind, Image};
use sha2::{Digest, Sha256};

/// Where the fixture images live (override with `QED_FIXTURES`).
pub fn fixtures_source() -> PathBuf {
    std::env::var_os("QED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../testdata/qemu-fixtures"
            ))
        })
}

/// Whether we run under CI (missing tools are then a failure, not a skip).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
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
    let out = cmd
        .output()
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

/// Whether `tool` can be run. When it cannot: panics under CI (`CI=true`), otherwise prints a
/// note and returns false so that the caller returns early.
pub fn require_tool(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if in_ci() {
            panic!("{tool} is required under CI but cannot be run");
        }
        eprintln!("note: {tool} not found; skipping this test");
    }
    ok
}

/// A temporary copy of every fixture, all in one directory (overlays name their backing
/// files relatively). `None` (after a note) when the fixtures are missing outside CI.
pub fn fixture_dir() -> Option<tempfile::TempDir> {
    let src = fixtures_source();
    if !src.join("README.md").is_file() {
        if in_ci() {
            panic!("fixtures not found at {}", src.display());
        }
        eprintln!(
            "note: fixtures not found at {} (set QED_FIXTURES); skipping",
            src.display()
        );
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&src).expect("read fixture dir") {
        let entry = entry.expect("dir entry");
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        if !(name_str.ends_with(".qed") || name_str.ends_with(".raw")) {
            continue;
        }
        let to = dir.path().join(&name);
        std::fs::copy(entry.path(), &to).expect("copy fixture");
        // The originals are read-only; the copies must be writable.
        let mut perm = std::fs::metadata(&to).expect("metadata").permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&to, perm).expect("chmod");
    }
    Some(dir)
}

/// A tiny deterministic xorshift64* generator.
#[derive(Debug, Clone)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// Seeds the generator (0 is replaced by a fixed non-zero constant).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish value in `[lo, hi)`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo < hi, "empty range {lo}..{hi}");
        lo + self.next_u64() % (hi - lo)
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den < num
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a byte slice, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Reads the whole virtual disk through [`Image::read_at`].
pub fn read_all(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    const CHUNK: usize = 1 << 20;
    for (i, chunk) in buf.chunks_mut(CHUNK).enumerate() {
        image
            .read_at(chunk, (i * CHUNK) as u64)
            .unwrap_or_else(|e| panic!("read at {}: {e}", i * CHUNK));
    }
    buf
}

/// sha256 of the whole virtual disk read through [`Image::read_at`] (the "raw sha256").
pub fn image_sha256(image: &Image) -> String {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let size = image.size();
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        image
            .read_at(&mut buf[..n], pos)
            .unwrap_or_else(|e| panic!("read at {pos}: {e}"));
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    hex(&hasher.finalize())
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// `None` where the depth is not compared (see [`chain_to_map`]).
    pub depth: Option<u64>,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub offset: Option<u64>,
}

impl MapEntry {
    fn joins(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

fn merge_push(out: &mut Vec<MapEntry>, e: MapEntry) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.joins(&e) {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}

/// Parses the JSON printed by `qemu-img map --output=json` (one flat object per entry; only
/// numbers and booleans), dropping empty entries and the depth of entries that are not
/// present (see [`chain_to_map`]). Adjacent equal entries are merged again.
pub fn parse_qemu_map(json: &str) -> Vec<MapEntry> {
    let mut out = Vec::new();
    for obj in json.split('{').skip(1) {
        let body = obj.split('}').next().expect("object body");
        let mut fields = BTreeMap::new();
        for pair in body.split(',') {
            let Some((k, v)) = pair.split_once(':') else {
                continue;
            };
            fields.insert(k.trim().trim_matches('"').to_string(), v.trim().to_string());
        }
        let num = |k: &str| -> Option<u64> { fields.get(k).map(|v| v.parse().expect(k)) };
        let flag = |k: &str| fields.get(k).is_some_and(|v| v == "true");
        let present = flag("present");
        merge_push(
            &mut out,
            MapEntry {
                start: num("start").expect("start"),
                length: num("length").expect("length"),
                depth: if present { num("depth") } else { None },
                present,
                zero: flag("zero"),
                data: flag("data"),
                offset: num("offset"),
            },
        );
    }
    out
}

/// Converts our chain extents into `qemu-img map` entries.
///
/// How a [`ChainExtent`] maps onto the fields QEMU prints:
/// * `ChainKind::Data { host_offset }` at depth d → `present: true, data: true, zero: false,
///   depth: d, offset: host_offset` (for a raw backing layer the host offset is the guest
///   offset, exactly what QEMU reports; for a QED layer it is the offset in that layer's file).
/// * `ChainKind::Zero` at depth d → `present: true, zero: true, data: false, depth: d`, no
///   offset (QED zero clusters have no host cluster).
/// * `ChainKind::Unallocated` → `present: false, zero: true, data: false`, no offset. Its
///   depth is not compared: ours counts the layers looked through (1 past the end of a
///   shorter backing file), while QEMU stops at the first layer whose block status says
///   "zero" and prints depth 0 there. The parser drops the depth of non-present entries too.
///
/// Entries are merged like qemu-img does (same fields, contiguous offsets).
pub fn chain_to_map(extents: &[ChainExtent]) -> Vec<MapEntry> {
    let mut out = Vec::new();
    for e in extents {
        let (present, zero, data, offset, depth) = match e.kind {
            ChainKind::Data { host_offset } => {
                (true, false, true, Some(host_offset), Some(e.depth as u64))
            }
            ChainKind::Zero => (true, true, false, None, Some(e.depth as u64)),
            ChainKind::Unallocated => (false, true, false, None, None),
        };
        merge_push(
            &mut out,
            MapEntry {
                start: e.offset,
                length: e.length,
                depth,
                present,
                zero,
                data,
                offset,
            },
        );
    }
    out
}

/// `qemu-img map --output=json -f qed <image>`, parsed. Panics if qemu-img fails.
pub fn qemu_map(image: &Path) -> Vec<MapEntry> {
    let out = run(
        "qemu-img",
        [
            OsStr::new("map"),
            OsStr::new("--output=json"),
            OsStr::new("-f"),
            OsStr::new("qed"),
            image.as_os_str(),
        ],
    );
    out.expect_status(0, "qemu-img map");
    parse_qemu_map(&out.stdout)
}

/// The counters of `qemu-img check --output=json`, with its exit code.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub status: Option<i32>,
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub allocated_clusters: u64,
    pub raw: String,
}

/// Runs `qemu-img check --output=json -f qed <image>`.
pub fn qemu_check(image: &Path) -> CheckReport {
    let out = run(
        "qemu-img",
        [
            OsStr::new("check"),
            OsStr::new("--output=json"),
            OsStr::new("-f"),
            OsStr::new("qed"),
            image.as_os_str(),
        ],
    );
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
    CheckReport {
        status: out.status,
        corruptions: field("corruptions"),
        leaks: field("leaks"),
        check_errors: field("check-errors"),
        allocated_clusters: field("allocated-clusters"),
        raw: format!("{}{}", out.stdout, out.stderr),
    }
}

/// `qemu-img convert -O raw` of `image` (format `fmt`) into `out`; panics on failure.
pub fn qemu_convert_raw(image: &Path, fmt: &str, out: &Path) {
    run(
        "qemu-img",
        [
            OsStr::new("convert"),
            OsStr::new("-f"),
            OsStr::new(fmt),
            OsStr::new("-O"),
            OsStr::new("raw"),
            image.as_os_str(),
            out.as_os_str(),
        ],
    )
    .expect_status(0, "qemu-img convert");
}

/// `qemu-img compare -f qed -F raw <image> <raw>`: exit 0 when identical.
pub fn qemu_compare_raw(image: &Path, raw: &Path) -> Output {
    run(
        "qemu-img",
        [
            OsStr::new("compare"),
            OsStr::new("-f"),
            OsStr::new("qed"),
            OsStr::new("-F"),
            OsStr::new("raw"),
            image.as_os_str(),
            raw.as_os_str(),
        ],
    )
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

/// The raw u64 at `offset` of a file.
pub fn file_u64(path: &Path, offset: u64) -> u64 {
    let bytes = std::fs::read(path).expect("read file");
    let o = offset as usize;
    u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap())
}

/// sha256 of a file's bytes.
pub fn file_sha256(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).expect("read file"))
}

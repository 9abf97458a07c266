//! Image names as QEMU's tools take them, parsed into the tree of block nodes QEMU would build
//! for them — the one parser every command's open path uses.
//!
//! A name is a file name (`disk.qed`; a colon before the first slash names a protocol:
//! `file:a:b.qed`, `blkdebug::disk.qed`, and any other prefix is `Unknown protocol 'x'`), a
//! `json:{...}` object in QEMU's JSON (single-quoted strings allowed), or with `--image-opts`
//! an option string (`driver=qed,file.filename=disk.qed`, `,,` a comma in a value). Options
//! are flattened to dotted keys (`file.filename`), options given beside the name (`-f`,
//! qemu-io's `open -o`) win over those of a `json:` name, and the tree is built as QEMU's
//! `bdrv_open` builds it:
//!
//! - a format node (`qed`, `raw`, or none: probed) has a `file` child, opened as a protocol
//!   (from the name, or `file.*` options, or a `file` object), and for `qed` a `backing`
//!   override (`null`, or a node of its own);
//! - protocol nodes: `file`, `host_device`, `host_cdrom` (a file name), `blkdebug` (its
//!   `image` child, `align`, `inject-error` and `set-state` rules), and the `quorum` driver
//!   (`children`, `vote-threshold`, `read-pattern`);
//! - options a node does not take are refused once the image has opened, in QEMU's words
//!   (`Block format 'qed' does not support the option 'x'`).
//!
//! Errors carry QEMU's text; the caller prints it after `Could not open 'NAME': `.

mod open;
mod qjson;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use qed_image::storage::{Action, Event, Injection, IoType, IoTypes, ReadPattern, Rule};
use serde_json::Value;

use crate::format::{AnyFormat, ImageFormat};
use crate::size::parse_size;

pub use open::{backing_names, open_disk, Access, OpenError, OpenedDisk};

/// Flat options: dotted keys (`file.filename`) and their values (strings from option strings,
/// typed values from `json:` names).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options(BTreeMap<String, Value>);

impl Options {
    /// Options from `key=value` pairs (later pairs win).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), Value::String(v.into())))
                .collect(),
        )
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `key` (replacing what it was).
    pub fn set(&mut self, key: &str, value: Value) {
        self.0.insert(key.to_string(), value);
    }

    /// The options flattened from a JSON object, as QEMU's `qdict_flatten`: nested objects
    /// and lists become dotted keys (`file.filename`, `children.0.driver`); empty ones stay.
    fn flatten(object: serde_json::Map<String, Value>) -> Self {
        fn walk(prefix: &str, value: Value, out: &mut BTreeMap<String, Value>) {
            let join = |key: &str| {
                if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                }
            };
            match value {
                Value::Object(map) if !map.is_empty() => {
                    for (key, value) in map {
                        walk(&join(&key), value, out);
                    }
                }
                Value::Array(list) if !list.is_empty() => {
                    for (i, value) in list.into_iter().enumerate() {
                        walk(&join(&i.to_string()), value, out);
                    }
                }
                other => {
                    out.insert(prefix.to_string(), other);
                }
            }
        }
        let mut out = BTreeMap::new();
        for (key, value) in object {
            walk(&key, value, &mut out);
        }
        Self(out)
    }

    /// Adds what `other` has and this does not (QEMU's `qdict_join` without overwriting).
    fn join(&mut self, other: Options) {
        for (key, value) in other.0 {
            self.0.entry(key).or_insert(value);
        }
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }

    /// `key` if it is a string (QEMU's `qdict_get_try_str`); other values are dropped.
    fn take_str(&mut self, key: &str) -> Option<String> {
        match self.0.remove(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// The options under `prefix.`, taken out, with the prefix dropped.
    fn extract(&mut self, prefix: &str) -> Options {
        let dotted = format!("{prefix}.");
        let keys: Vec<String> = self
            .0
            .keys()
            .filter(|k| k.starts_with(&dotted))
            .cloned()
            .collect();
        Options(
            keys.into_iter()
                .filter_map(|k| {
                    let value = self.0.remove(&k)?;
                    Some((k[dotted.len()..].to_string(), value))
                })
                .collect(),
        )
    }

    /// The indices of `prefix.N.*` entries: 0, 1, ... as long as they follow each other.
    fn array_len(&self, prefix: &str) -> usize {
        let mut n = 0;
        while self.0.keys().any(|k| {
            k.strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('.'))
                .and_then(|r| r.strip_prefix(&n.to_string()))
                .is_some_and(|r| r.is_empty() || r.starts_with('.'))
        }) {
            n += 1;
        }
        n
    }

    /// The first key left (the one QEMU would name as unsupported).
    fn first_key(&self) -> Option<String> {
        self.0.keys().next().cloned()
    }

    /// Each option as a `key=value` string pair (booleans as `on`/`off`).
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), value_text(v)))
            .collect()
    }
}

/// A value as QemuOpts sees it: strings as they are, numbers in decimal, booleans `on`/`off`.
fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "on".into(),
        Value::Bool(false) => "off".into(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Parses a QemuOpts option string (`driver=qed,file.filename=a,,b`): `key=value` items
/// separated by commas (`,,` is a comma inside a value); a bare item is `key=on` (`nokey`:
/// `key=off`) with QEMU's deprecation warning, or with `implied` (qemu-img's `--image-opts`:
/// `file`) the first bare item is that key's value. Returns the pairs and the warnings.
pub fn parse_option_string(
    text: &str,
    implied: Option<&str>,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut pairs = Vec::new();
    let mut warnings = Vec::new();
    let mut rest = text;
    let mut implied = implied;
    while !rest.is_empty() {
        let name_len = rest.find(['=', ',']).unwrap_or(rest.len());
        let has_value = rest[name_len..].starts_with('=');
        if !has_value && implied.is_none() {
            let name = &rest[..name_len];
            rest = rest[name_len..]
                .strip_prefix(',')
                .unwrap_or(&rest[name_len..]);
            let (key, value) = match name.strip_prefix("no") {
                Some(key) => (key.to_string(), "off"),
                None => (name.to_string(), "on"),
            };
            if key != "help" && key != "?" {
                warnings.push(format!(
                    "warning: short-form boolean option '{name}' deprecated\nPlease use \
                     {key}={value} instead"
                ));
            }
            pairs.push((key, value.to_string()));
            continue;
        }
        let (key, value_start) = match (has_value, implied) {
            (false, Some(first)) => (first.to_string(), 0),
            _ => (rest[..name_len].to_string(), name_len + 1),
        };
        implied = None;
        // The value runs to the first single comma; `,,` is a comma.
        let mut value = String::new();
        let bytes = &rest[value_start..];
        let mut consumed = bytes.len();
        let mut chars = bytes.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == ',' {
                if matches!(chars.peek(), Some((_, ','))) {
                    chars.next();
                    value.push(',');
                    continue;
                }
                consumed = i + 1;
                break;
            }
            value.push(c);
        }
        rest = &bytes[consumed..];
        pairs.push((key, value));
    }
    (pairs, warnings)
}

/// The protocol a file name starts with (`file` of `file:x`), if any: QEMU's
/// `path_has_protocol`, a colon before any slash.
fn protocol_of(name: &[u8]) -> Option<&[u8]> {
    let end = name.iter().position(|&b| b == b':' || b == b'/')?;
    (name[end] == b':').then_some(&name[..end])
}

/// A file name with `prefix:` taken off, as QEMU's `bdrv_parse_filename_strip_prefix`: when
/// what is left would look like a protocol itself (`image:top.qed`), it gets `./` in front.
fn strip_prefix(name: &[u8], prefix: &[u8]) -> Option<Vec<u8>> {
    let rest = name.strip_prefix(prefix)?.strip_prefix(b":")?;
    Some(if protocol_of(rest).is_some() {
        [b"./".as_slice(), rest].concat()
    } else {
        rest.to_vec()
    })
}

/// The directory part of a file name (up to and including its last slash; empty when it has
/// none), as QEMU's `path_combine(name, "")`.
fn dir_of(name: &[u8]) -> Vec<u8> {
    match name.iter().rposition(|&b| b == b'/') {
        Some(i) => name[..=i].to_vec(),
        None => Vec::new(),
    }
}

/// Where the backing file `name` of an image in `dir` is, as QEMU's
/// `bdrv_get_full_backing_filename` finds it: an absolute name (or one with a protocol) as it
/// is, a relative one after the directory; `None` without a directory.
pub fn full_backing_name(dir: Option<&Path>, name: &[u8]) -> Option<PathBuf> {
    if name.starts_with(b"/") || protocol_of(name).is_some() {
        return Some(PathBuf::from(OsString::from_vec(name.to_vec())));
    }
    let mut joined = dir?.as_os_str().as_bytes().to_vec();
    joined.extend_from_slice(name);
    Some(PathBuf::from(OsString::from_vec(joined)))
}

/// Parses a command's image argument (`-f`, `--image-opts` as given), printing the warnings
/// QEMU prints while reading it; errors read `Could not open 'ARG': why`, as qemu-img words
/// them (the conflict of `--image-opts` and `-f` alone).
pub fn parse_arg(
    arg: &OsStr,
    image_opts: bool,
    format: Option<ImageFormat>,
) -> crate::error::CliResult<ImageSpec> {
    use crate::error::CliError;
    if image_opts && format.is_some() {
        return Err(CliError::plain(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let spec = ImageSpec::from_arg(arg, image_opts, format)
        .map_err(|why| CliError::new(format!("Could not open '{}'", arg.to_string_lossy()), why))?;
    for warning in &spec.warnings {
        eprintln!("{}: {warning}", crate::prog());
    }
    Ok(spec)
}

/// Opens a qemu-img command's image argument (parsed as [`parse_arg`] parses it) with
/// `access`; errors read `Could not open 'ARG': why`.
pub fn open_arg(
    arg: &OsStr,
    image_opts: bool,
    format: Option<ImageFormat>,
    access: &Access,
) -> crate::error::CliResult<OpenedDisk> {
    let spec = parse_arg(arg, image_opts, format)?;
    open_disk(&spec, access, &mut |_| {}).map_err(|e| {
        crate::error::CliError::new(
            format!("Could not open '{}'", arg.to_string_lossy()),
            e.text(&|e, file| crate::error::open_error(e, file)),
        )
    })
}

/// Opens a `convert` or `compare` image argument: qcow2 and VMDK (given with `-f`, or probed
/// on a plain file name) through the engine's foreign disks, everything else as [`open_arg`]
/// opens it; errors read `Could not open 'ARG': why`.
pub fn open_any_arg(
    arg: &OsStr,
    image_opts: bool,
    format: Option<AnyFormat>,
    access: &Access,
) -> crate::error::CliResult<qed_image::ops::Disk> {
    use crate::error::{open_error, CliError};
    use qed_image::ops::{probe_disk_format, Disk, DiskFormat};
    let could_not =
        |why: String| CliError::new(format!("Could not open '{}'", arg.to_string_lossy()), why);
    let open_foreign = |path: &Path, format: DiskFormat| {
        Disk::open_any(path, Some(format), &access.options(false))
            .map_err(|e| could_not(open_error(&e, &path.to_string_lossy())))
    };
    let native = match format {
        Some(AnyFormat::Qed) => Some(ImageFormat::Qed),
        Some(AnyFormat::Raw) => Some(ImageFormat::Raw),
        Some(foreign @ (AnyFormat::Qcow2 | AnyFormat::Vmdk)) => {
            if image_opts {
                return Err(CliError::plain(
                    "--image-opts and --format are mutually exclusive",
                ));
            }
            let spec = parse_arg(arg, false, None)?;
            return match spec.plain() {
                Some((path, _)) => open_foreign(path, foreign.into()),
                None => Err(could_not(format!(
                    "{} images are opened from plain file names only",
                    foreign.name()
                ))),
            };
        }
        None => None,
    };
    let spec = parse_arg(arg, image_opts, native)?;
    if let Some((path, None)) = spec.plain() {
        if let Ok(probed @ (DiskFormat::Qcow2 | DiskFormat::Vmdk)) = probe_disk_format(path) {
            return open_foreign(path, probed);
        }
    }
    open_disk(&spec, access, &mut |_| {})
        .map(|opened| opened.disk)
        .map_err(|e| could_not(e.text(&|e, file| open_error(e, file))))
}

/// A command's image argument that must be a format over a plain file (the command works on
/// files by their paths: rebase, commit): that file, and the format if one is given.
pub fn plain_arg(
    arg: &OsStr,
    image_opts: bool,
    format: Option<ImageFormat>,
) -> crate::error::CliResult<(PathBuf, Option<ImageFormat>)> {
    let spec = parse_arg(arg, image_opts, format)?;
    match spec.plain() {
        Some((path, format)) => Ok((path.to_path_buf(), format)),
        None => Err(crate::error::CliError::new(
            format!("Could not open '{}'", arg.to_string_lossy()),
            format!(
                "this command works on an image file (a format over a plain file), not on a \
                 '{}' node",
                spec.node.driver_name()
            ),
        )),
    }
}

/// The file a command creates, from its name: `file:` taken off (as QEMU's file driver
/// takes it off); any other protocol, or a `json:` name, is refused in QEMU's words.
pub fn create_path(name: &OsStr) -> Result<PathBuf, String> {
    let bytes = name.as_bytes();
    match protocol_of(bytes) {
        None => Ok(PathBuf::from(name)),
        Some(b"file") => Ok(PathBuf::from(OsString::from_vec(
            strip_prefix(bytes, b"file").unwrap_or_default(),
        ))),
        Some(protocol) => Err(format!(
            "Unknown protocol '{}'",
            String::from_utf8_lossy(protocol)
        )),
    }
}

/// What a node of a format driver is: `qed` or `raw`, or probed.
#[derive(Debug, Clone, PartialEq)]
pub struct FormatNode {
    /// The format; `None`: probed from the first bytes.
    pub driver: Option<ImageFormat>,
    /// The node the format reads its bytes from.
    pub file: Box<Node>,
    /// What the backing file is.
    pub backing: BackingSpec,
    /// Options of every node, as given.
    pub common: Options,
    /// The first option the node does not take.
    pub unknown: Option<String>,
}

/// The backing file of a format node.
#[derive(Debug, Clone, PartialEq)]
pub enum BackingSpec {
    /// The one the header names.
    Default,
    /// None (`backing: null`): unallocated clusters read as zeros.
    Null,
    /// A node referred to by name (there are no named nodes here).
    Reference(String),
    /// A node given in the options.
    Node(Box<Node>),
}

/// The protocol drivers of a file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDriver {
    /// `file`: a regular file.
    File,
    /// `host_device`: a character or block device.
    HostDevice,
    /// `host_cdrom`: a CD-ROM device.
    HostCdrom,
}

impl FileDriver {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::HostDevice => "host_device",
            Self::HostCdrom => "host_cdrom",
        }
    }
}

/// A file of the host.
#[derive(Debug, Clone, PartialEq)]
pub struct FileNode {
    /// The driver.
    pub driver: FileDriver,
    /// The file.
    pub filename: PathBuf,
    /// `locking`: `on`, `off` or `auto`.
    pub locking: Option<String>,
    /// `aio`: `threads`, `native` or `io_uring`.
    pub aio: Option<String>,
    /// Options of every node, as given.
    pub common: Options,
    /// The first option the node does not take.
    pub unknown: Option<String>,
}

/// QEMU's `blkdebug` filter over its `image` child.
#[derive(Debug, Clone, PartialEq)]
pub struct BlkdebugNode {
    /// What it filters.
    pub image: Box<Node>,
    /// Request alignment (0: the child's).
    pub align: u64,
    /// Its `inject-error` and `set-state` rules.
    pub rules: Vec<Rule>,
    /// The first option the node does not take.
    pub unknown: Option<String>,
}

/// QEMU's `quorum` driver over its children.
#[derive(Debug, Clone, PartialEq)]
pub struct QuorumNode {
    /// The children (each may be any node; without a driver, formats are probed).
    pub children: Vec<Node>,
    /// How many must agree.
    pub threshold: usize,
    /// How reads choose.
    pub pattern: ReadPattern,
    /// The first option the node does not take.
    pub unknown: Option<String>,
}

/// A block node.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A format over another node.
    Format(FormatNode),
    /// A host file.
    File(FileNode),
    /// A blkdebug filter.
    Blkdebug(BlkdebugNode),
    /// A quorum.
    Quorum(QuorumNode),
}

/// A parsed image name: what was given, and the node tree it stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    /// The name as given (for `Could not open 'NAME'`).
    pub given: String,
    /// The top node.
    pub node: Node,
    /// Warnings QEMU prints while it reads the name (deprecated forms), to print once.
    pub warnings: Vec<String>,
    /// The top node's options as flattened, `json:` options included.
    pub options: Options,
}

/// Options every node takes (QEMU's `bdrv_runtime_opts` and the cache options).
const COMMON: &[&str] = &[
    "node-name",
    "read-only",
    "auto-read-only",
    "force-share",
    "cache.direct",
    "cache.no-flush",
    "cache.writeback",
    "discard",
    "detect-zeroes",
    "copy-on-read",
];

/// What opens a node: its place decides whether a name without a driver is probed for a
/// format or taken as a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The image itself, a backing file or a quorum child: a format is probed.
    Image,
    /// The `file` child of a format, or the `image` of a filter: a protocol.
    Protocol,
}

/// A driver name: what kind of node it makes.
enum DriverKind {
    Format(ImageFormat),
    File(FileDriver),
    Blkdebug,
    Quorum,
}

fn driver_kind(name: &str) -> Option<DriverKind> {
    Some(match name {
        "qed" => DriverKind::Format(ImageFormat::Qed),
        "raw" => DriverKind::Format(ImageFormat::Raw),
        "file" => DriverKind::File(FileDriver::File),
        "host_device" => DriverKind::File(FileDriver::HostDevice),
        "host_cdrom" => DriverKind::File(FileDriver::HostCdrom),
        "blkdebug" => DriverKind::Blkdebug,
        "quorum" => DriverKind::Quorum,
        _ => return None,
    })
}

/// `Parameter 'KEY' expects 'on' or 'off'` unless `value` is a boolean as QemuOpts reads one.
fn bool_of(key: &str, value: &Value) -> Result<bool, String> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => match s.as_str() {
            "on" | "yes" | "true" | "y" => Ok(true),
            "off" | "no" | "false" | "n" => Ok(false),
            _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
        },
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// A number as QemuOpts reads one (`QEMU_OPT_NUMBER`).
fn number_of(key: &str, value: &Value) -> Result<u64, String> {
    let parsed = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| format!("Parameter '{key}' expects a number"))
}

/// A size as QemuOpts reads one (`QEMU_OPT_SIZE`: a suffix k, M, G, ...).
fn size_of(key: &str, value: &Value) -> Result<u64, String> {
    let parsed = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => parse_size(s).ok(),
        _ => None,
    };
    parsed.ok_or_else(|| {
        format!(
            "Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, \
             G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        )
    })
}

/// Takes out the options every node takes.
fn take_common(options: &mut Options) -> Options {
    let mut common = Options::default();
    for key in COMMON {
        if let Some(value) = options.take(key) {
            common.set(key, value);
        }
    }
    common
}

impl ImageSpec {
    /// Parses an image name: `name` (a file name, `PROTOCOL:...` or `json:{...}`, or none
    /// when `options` name the file) with `options` beside it and, from `-f`, `format` (a
    /// driver name; it wins over a `json:` name's).
    pub fn parse(
        name: Option<&OsStr>,
        options: Options,
        format: Option<&str>,
    ) -> Result<Self, String> {
        let given = name.map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let mut options = options;
        if let Some(format) = format {
            options.set("driver", Value::String(format.to_string()));
        }
        let mut warnings = Vec::new();
        let mut name = name.map(|n| n.as_bytes().to_vec());
        if let Some(json) = name
            .as_deref()
            .and_then(|n| n.strip_prefix(b"json:"))
            .map(|j| String::from_utf8_lossy(j).into_owned())
        {
            let value = qjson::parse(&json)
                .map_err(|e| format!("Could not parse the JSON options: {e}"))?;
            let Value::Object(object) = value else {
                return Err("Invalid JSON object given".into());
            };
            options.join(Options::flatten(object));
            name = None;
        }
        let flat = options.clone();
        let node = build(name, options, Role::Image, &mut warnings)?;
        Ok(Self {
            given,
            node,
            warnings,
            options: flat,
        })
    }

    /// Parses a plain argument: a name, or with `image_opts` an option string (qemu-img's
    /// `--image-opts`: a first bare item is `file=`). `format` is `-f`.
    pub fn from_arg(
        arg: &OsStr,
        image_opts: bool,
        format: Option<ImageFormat>,
    ) -> Result<Self, String> {
        if !image_opts {
            return Self::parse(Some(arg), Options::default(), format.map(ImageFormat::name));
        }
        if format.is_some() {
            return Err("--image-opts and --format are mutually exclusive".into());
        }
        let text = arg.to_string_lossy().into_owned();
        let (pairs, warnings) = parse_option_string(&text, Some("file"));
        let mut spec = Self::parse(None, Options::from_pairs(pairs), None)?;
        spec.given = text;
        spec.warnings.splice(0..0, warnings);
        Ok(spec)
    }

    /// When the image is a format (or a probed one) over a plain file with no options beyond
    /// the ones every node takes: that file and format. Such an image opens as the file does
    /// (its backing files found next to it, its name in messages).
    pub fn plain(&self) -> Option<(&Path, Option<ImageFormat>)> {
        let Node::Format(format) = &self.node else {
            return None;
        };
        let Node::File(file) = &*format.file else {
            return None;
        };
        let simple = file.driver == FileDriver::File
            && file.unknown.is_none()
            && file.aio.is_none()
            && format.unknown.is_none()
            && matches!(format.backing, BackingSpec::Default | BackingSpec::Null);
        simple.then_some((file.filename.as_path(), format.driver))
    }

    /// Whether the top node is told to have no backing file (`backing: null`).
    pub fn no_backing(&self) -> bool {
        matches!(&self.node, Node::Format(f) if f.backing == BackingSpec::Null)
    }

    /// The name QEMU gives the image (`image:` of `qemu-img info`): the file's name when
    /// the image is a format over a file (or a file), else `json:{...}` of its options.
    pub fn display_name(&self) -> String {
        self.node.display_name()
    }

    /// The directory backing file names resolve against (QEMU's `bdrv_dirname`); `None`
    /// when there is none (a quorum).
    pub fn dirname(&self) -> Option<PathBuf> {
        self.node.dirname()
    }

    /// The host file under the top node: its own (a file opened alone) or its `file`
    /// child's, when that is a file.
    pub fn file_path(&self) -> Option<&Path> {
        match &self.node {
            Node::File(file) => Some(&file.filename),
            Node::Format(format) => match &*format.file {
                Node::File(file) => Some(&file.filename),
                _ => None,
            },
            _ => None,
        }
    }
}

impl Node {
    /// See [`ImageSpec::display_name`].
    pub fn display_name(&self) -> String {
        match self.exact_name() {
            Some(name) => name,
            None => format!("json:{}", self.to_json()),
        }
    }

    /// The plain name of the node, when it has one.
    fn exact_name(&self) -> Option<String> {
        match self {
            Node::File(file) => Some(file.filename.display().to_string()),
            Node::Format(format) => match (&*format.file, &format.backing) {
                (Node::File(_), BackingSpec::Default | BackingSpec::Null) => {
                    format.file.exact_name()
                }
                _ => None,
            },
            Node::Blkdebug(_) | Node::Quorum(_) => None,
        }
    }

    /// See [`ImageSpec::dirname`].
    pub fn dirname(&self) -> Option<PathBuf> {
        match self {
            Node::File(file) => Some(PathBuf::from(OsString::from_vec(dir_of(
                file.filename.as_os_str().as_bytes(),
            )))),
            Node::Format(format) => format.file.dirname(),
            Node::Blkdebug(debug) => debug.image.dirname(),
            Node::Quorum(_) => None,
        }
    }

    /// The driver's name.
    pub fn driver_name(&self) -> &'static str {
        match self {
            Node::File(file) => file.driver.name(),
            Node::Format(format) => format.driver.map_or("raw", ImageFormat::name),
            Node::Blkdebug(_) => "blkdebug",
            Node::Quorum(_) => "quorum",
        }
    }

    /// The node's options as a JSON object, as QEMU prints a `json:` name (`{"a": 1, "b":
    /// [2, 3]}`).
    fn to_json(&self) -> String {
        fn write(value: &Value, out: &mut String) {
            match value {
                Value::Object(map) => {
                    out.push('{');
                    for (i, (key, value)) in map.iter().enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        out.push_str(&Value::String(key.clone()).to_string());
                        out.push_str(": ");
                        write(value, out);
                    }
                    out.push('}');
                }
                Value::Array(list) => {
                    out.push('[');
                    for (i, value) in list.iter().enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        write(value, out);
                    }
                    out.push(']');
                }
                scalar => out.push_str(&scalar.to_string()),
            }
        }
        let mut out = String::new();
        write(&self.json_value(), &mut out);
        out
    }

    fn json_value(&self) -> Value {
        let mut map = serde_json::Map::new();
        map.insert("driver".into(), Value::String(self.driver_name().into()));
        match self {
            Node::File(file) => {
                map.insert(
                    "filename".into(),
                    Value::String(file.filename.display().to_string()),
                );
            }
            Node::Format(format) => {
                map.insert("file".into(), format.file.json_value());
                match &format.backing {
                    BackingSpec::Null => {
                        map.insert("backing".into(), Value::Null);
                    }
                    BackingSpec::Node(node) => {
                        map.insert("backing".into(), node.json_value());
                    }
                    BackingSpec::Reference(name) => {
                        map.insert("backing".into(), Value::String(name.clone()));
                    }
                    BackingSpec::Default => {}
                }
            }
            Node::Blkdebug(debug) => {
                map.insert("image".into(), debug.image.json_value());
                if debug.align > 0 {
                    map.insert("align".into(), Value::from(debug.align));
                }
            }
            Node::Quorum(quorum) => {
                map.insert(
                    "children".into(),
                    Value::Array(quorum.children.iter().map(Node::json_value).collect()),
                );
                map.insert("vote-threshold".into(), Value::from(quorum.threshold));
            }
        }
        Value::Object(map)
    }
}

/// Builds the node for `name` and `options` in `role`, as QEMU's `bdrv_open_inherit` (and
/// `bdrv_fill_options`) do.
fn build(
    name: Option<Vec<u8>>,
    mut options: Options,
    role: Role,
    warnings: &mut Vec<String>,
) -> Result<Node, String> {
    let mut name = name;
    if let Some(json) = name
        .as_deref()
        .and_then(|n| n.strip_prefix(b"json:"))
        .map(|j| String::from_utf8_lossy(j).into_owned())
    {
        let value =
            qjson::parse(&json).map_err(|e| format!("Could not parse the JSON options: {e}"))?;
        let Value::Object(object) = value else {
            return Err("Invalid JSON object given".into());
        };
        options.join(Options::flatten(object));
        name = None;
    }
    let driver = options.take_str("driver");
    let kind = match &driver {
        Some(d) => Some(driver_kind(d).ok_or_else(|| format!("Unknown driver '{d}'"))?),
        None => None,
    };
    let protocol = match &kind {
        Some(DriverKind::File(_) | DriverKind::Blkdebug) => true,
        Some(DriverKind::Format(_) | DriverKind::Quorum) => false,
        None => role == Role::Protocol,
    };
    if protocol {
        // A name is the protocol node's `filename`, parsed by its driver.
        let parse = name.is_some();
        if let Some(name) = &name {
            if options.0.contains_key("filename") {
                return Err("Can't specify 'file' and 'filename' options at the same time".into());
            }
            options.set(
                "filename",
                Value::String(String::from_utf8_lossy(name).into_owned()),
            );
        }
        return protocol_node(kind, name, options, parse, warnings);
    }
    match kind {
        Some(DriverKind::Quorum) => {
            if let Some(name) = name {
                options.set(
                    "filename",
                    Value::String(String::from_utf8_lossy(&name).into_owned()),
                );
            }
            quorum_node(options, warnings)
        }
        Some(DriverKind::Format(format)) => format_node(Some(format), name, options, warnings),
        None => format_node(None, name, options, warnings),
        Some(DriverKind::File(_) | DriverKind::Blkdebug) => unreachable!("protocols above"),
    }
}

/// A format node (`driver` given, or probed when `None`) over its `file` child.
fn format_node(
    driver: Option<ImageFormat>,
    name: Option<Vec<u8>>,
    mut options: Options,
    warnings: &mut Vec<String>,
) -> Result<Node, String> {
    let backing = match options.take("backing") {
        None => BackingSpec::Default,
        Some(Value::Null) => BackingSpec::Null,
        Some(Value::String(s)) if s.is_empty() => {
            warnings.push(
                "warning: Use of \"backing\": \"\" is deprecated; use \"backing\": null instead"
                    .into(),
            );
            BackingSpec::Null
        }
        Some(Value::String(s)) => BackingSpec::Reference(s),
        Some(other) => {
            // An empty object, say: not a node.
            options.set("backing", other);
            BackingSpec::Default
        }
    };
    let file_reference = options.take_str("file");
    let file_options = options.extract("file");
    let file = if let Some(reference) = file_reference {
        return Err(format!(
            "Cannot find device='{reference}' nor node-name='{reference}'"
        ));
    } else if name.is_none() && file_options.is_empty() {
        None
    } else {
        Some(build(name, file_options, Role::Protocol, warnings)?)
    };
    let Some(file) = file else {
        return Err(match driver {
            Some(_) => "A block device must be specified for \"file\"".into(),
            None => "Must specify either driver or file".into(),
        });
    };
    let backing = match backing {
        BackingSpec::Default => {
            let sub = options.extract("backing");
            if sub.is_empty() {
                BackingSpec::Default
            } else if driver == Some(ImageFormat::Raw) {
                // raw has no backing file: the options are left over.
                for (k, v) in sub.0 {
                    options.set(&format!("backing.{k}"), v);
                }
                BackingSpec::Default
            } else {
                BackingSpec::Node(Box::new(build(None, sub, Role::Image, warnings)?))
            }
        }
        other => other,
    };
    let common = take_common(&mut options);
    Ok(Node::Format(FormatNode {
        driver,
        file: Box::new(file),
        backing,
        common,
        unknown: options.first_key(),
    }))
}

/// A protocol node: `kind` (found from the name's prefix when `None`), its `filename` in
/// the options; `name` is what the filename was given as (parsed by the driver when
/// `parse`: `file:` taken off, `blkdebug:CONFIG:IMAGE` split).
fn protocol_node(
    kind: Option<DriverKind>,
    name: Option<Vec<u8>>,
    mut options: Options,
    parse: bool,
    warnings: &mut Vec<String>,
) -> Result<Node, String> {
    let kind = match kind {
        Some(kind) => kind,
        None => {
            let Some(Value::String(filename)) = options.0.get("filename") else {
                return Err("Must specify either driver or file".into());
            };
            find_protocol(filename.as_bytes(), parse)?
        }
    };
    match kind {
        DriverKind::File(driver) => {
            let mut filename = match options.take("filename") {
                Some(Value::String(s)) => match &name {
                    Some(raw) if parse => raw.clone(),
                    _ => s.into_bytes(),
                },
                _ => {
                    return Err(format!(
                        "The '{}' block driver requires a file name",
                        driver.name()
                    ))
                }
            };
            if parse {
                let prefix = driver.name().as_bytes();
                if let Some(stripped) = strip_prefix(&filename, prefix) {
                    filename = stripped;
                }
            }
            if filename.is_empty() {
                return Err(format!(
                    "The '{}' block driver requires a file name",
                    driver.name()
                ));
            }
            let locking = options.take("locking").map(|v| value_text(&v));
            let aio = options.take("aio").map(|v| value_text(&v));
            for key in [
                "aio-max-batch",
                "drop-cache",
                "x-check-cache-dropped",
                "pr-manager",
            ] {
                options.take(key);
            }
            let common = take_common(&mut options);
            Ok(Node::File(FileNode {
                driver,
                filename: PathBuf::from(OsString::from_vec(filename)),
                locking,
                aio,
                common,
                unknown: options.first_key(),
            }))
        }
        DriverKind::Blkdebug => {
            let filename = options.take("filename");
            let mut image_name = None;
            if let (true, Some(Value::String(_))) = (parse, &filename) {
                let raw = name.unwrap_or_default();
                let rest = raw.strip_prefix(b"blkdebug:").unwrap_or(&raw);
                let Some(colon) = rest.iter().position(|&b| b == b':') else {
                    return Err("blkdebug requires both config file and image path".into());
                };
                if colon > 0 {
                    options.set(
                        "config",
                        Value::String(String::from_utf8_lossy(&rest[..colon]).into_owned()),
                    );
                }
                image_name = Some(rest[colon + 1..].to_vec());
            } else if let Some(Value::String(s)) = filename {
                image_name = Some(s.into_bytes());
            }
            if let Some(Value::String(x)) = options.take("x-image") {
                image_name = Some(x.into_bytes());
            }
            blkdebug_node(image_name, options, warnings)
        }
        DriverKind::Format(_) | DriverKind::Quorum => unreachable!("not protocols"),
    }
}

/// QEMU's `bdrv_find_protocol`: a name with a prefix (when `parse` allows it) names its
/// protocol; a character or block device is a `host_device`; anything else is a `file`.
fn find_protocol(filename: &[u8], parse: bool) -> Result<DriverKind, String> {
    let path = Path::new(OsStr::from_bytes(filename));
    if filename.starts_with(b"/dev/cdrom") {
        return Ok(DriverKind::File(FileDriver::HostCdrom));
    }
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        let kind = meta.file_type();
        if kind.is_block_device() || kind.is_char_device() {
            return Ok(DriverKind::File(FileDriver::HostDevice));
        }
    }
    match protocol_of(filename) {
        Some(protocol) if parse => {
            let protocol = String::from_utf8_lossy(protocol).into_owned();
            match protocol.as_str() {
                "file" => Ok(DriverKind::File(FileDriver::File)),
                "host_device" => Ok(DriverKind::File(FileDriver::HostDevice)),
                "host_cdrom" => Ok(DriverKind::File(FileDriver::HostCdrom)),
                "blkdebug" => Ok(DriverKind::Blkdebug),
                _ => Err(format!("Unknown protocol '{protocol}'")),
            }
        }
        _ => Ok(DriverKind::File(FileDriver::File)),
    }
}

/// `EIO` on Linux: the errno of an `inject-error` rule without one.
const EIO: i32 = 5;

/// The event names of QEMU's blkdebug (`BlkdebugEvent`).
const BLKDEBUG_EVENTS: &[&str] = &[
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l2_load",
    "l2_update",
    "l2_update_compressed",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "write_compressed",
    "vmstate_load",
    "vmstate_save",
    "cow_read",
    "cow_write",
    "reftable_load",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_alloc_bytes",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "empty_image_prepare",
    "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters",
    "cor_write",
    "cluster_alloc_space",
    "none",
];

/// The `inject-error.N.*` and `set-state.N.*` rules of a blkdebug node.
fn blkdebug_rules(options: &mut Options) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for group in ["inject-error", "set-state"] {
        let n = options.array_len(group);
        for i in 0..n {
            let mut rule = options.extract(&format!("{group}.{i}"));
            let event = match rule.take("event") {
                Some(v) => value_text(&v),
                None => return Err("Missing event name for rule".into()),
            };
            if !BLKDEBUG_EVENTS.contains(&event.as_str()) {
                return Err(format!("Invalid parameter '{event}'"));
            }
            let state = match rule.take("state") {
                Some(v) => number_of("state", &v)?,
                None => 0,
            };
            let action = if group == "inject-error" {
                let errno = match rule.take("errno") {
                    Some(v) => number_of("errno", &v)?,
                    None => EIO as u64,
                };
                let offset = match rule.take("sector") {
                    Some(v) => Some(number_of("sector", &v)?.saturating_mul(512)),
                    None => None,
                };
                let once = match rule.take("once") {
                    Some(v) => bool_of("once", &v)?,
                    None => false,
                };
                if let Some(v) = rule.take("immediately") {
                    bool_of("immediately", &v)?;
                }
                let iotypes = match rule.take("iotype") {
                    None => IoTypes::DEFAULT,
                    Some(v) => {
                        let name = value_text(&v);
                        IoTypes::only(
                            IoType::from_name(&name)
                                .ok_or_else(|| format!("Invalid parameter '{name}'"))?,
                        )
                    }
                };
                Action::Inject(Injection {
                    iotypes,
                    errno: i32::try_from(errno).unwrap_or(EIO),
                    offset,
                    once,
                })
            } else {
                let new_state = match rule.take("new_state") {
                    Some(v) => number_of("new_state", &v)?,
                    None => 0,
                };
                Action::SetState { new_state }
            };
            if let Some(key) = rule.first_key() {
                return Err(format!("Invalid parameter '{key}'"));
            }
            rules.push(Rule {
                event: match event.as_str() {
                    "none" => Event::Open,
                    "write_aio" => Event::Write,
                    _ => Event::Other(event),
                },
                state,
                action,
            });
        }
    }
    Ok(rules)
}

/// A blkdebug node over the image named `image_name` (or given as `image.*` options).
fn blkdebug_node(
    image_name: Option<Vec<u8>>,
    mut options: Options,
    warnings: &mut Vec<String>,
) -> Result<Node, String> {
    if let Some(config) = options.take_str("config") {
        return Err(format!(
            "Could not read blkdebug config file: {config}: blkdebug config files are not \
             supported; give the rules as options"
        ));
    }
    let rules = blkdebug_rules(&mut options)?;
    let align = match options.take("align") {
        Some(v) => size_of("align", &v)?,
        None => 0,
    };
    if align > 0 && (align >= i32::MAX as u64 || !align.is_power_of_two()) {
        return Err(format!("Cannot meet constraints with align {align}"));
    }
    for key in [
        "max-transfer",
        "opt-write-zero",
        "max-write-zero",
        "opt-discard",
        "max-discard",
    ] {
        if let Some(v) = options.take(key) {
            size_of(key, &v)?;
        }
    }
    for prefix in ["take-child-perms", "unshare-child-perms"] {
        options.extract(prefix);
    }
    if let Some(reference) = options.take_str("image") {
        return Err(format!(
            "Cannot find device='{reference}' nor node-name='{reference}'"
        ));
    }
    let image_options = options.extract("image");
    if image_name.is_none() && image_options.is_empty() {
        return Err("A block device must be specified for \"image\"".into());
    }
    let image = build(image_name, image_options, Role::Protocol, warnings)?;
    take_common(&mut options);
    Ok(Node::Blkdebug(BlkdebugNode {
        image: Box::new(image),
        align,
        rules,
        unknown: options.first_key(),
    }))
}

/// A quorum node over `children.N`.
fn quorum_node(mut options: Options, warnings: &mut Vec<String>) -> Result<Node, String> {
    let n = options.array_len("children");
    if n < 1 {
        return Err("Number of provided children must be 1 or more".into());
    }
    let threshold = match options.take("vote-threshold") {
        Some(v) => number_of("vote-threshold", &v)?,
        None => 0,
    };
    if threshold < 1 {
        return Err("Parameter 'vote-threshold' expects a value >= 1".into());
    }
    if threshold > n as u64 {
        return Err("threshold may not exceed children count".into());
    }
    let pattern = match options.take("read-pattern").map(|v| value_text(&v)) {
        None => ReadPattern::Quorum,
        Some(p) if p == "quorum" => ReadPattern::Quorum,
        Some(p) if p == "fifo" => ReadPattern::Fifo,
        Some(_) => return Err("Please set read-pattern as fifo or quorum".into()),
    };
    for key in ["blkverify", "rewrite-corrupted"] {
        if let Some(v) = options.take(key) {
            if bool_of(key, &v)? {
                return Err(format!("quorum option '{key}' is not supported"));
            }
        }
    }
    let mut children = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("children.{i}");
        if let Some(reference) = options.take_str(&key) {
            return Err(format!(
                "Cannot find device='{reference}' nor node-name='{reference}'"
            ));
        }
        let child = options.extract(&key);
        children.push(build(None, child, Role::Image, warnings)?);
    }
    take_common(&mut options);
    Ok(Node::Quorum(QuorumNode {
        children,
        threshold: threshold as usize,
        pattern,
        unknown: options.first_key(),
    }))
}

#[cfg(test)]
mod tests;

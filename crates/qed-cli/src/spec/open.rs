//! Opening a parsed image: a format over a plain file opens as that file does (the engine
//! finds its backing files next to it); any other tree is put together from storages — files,
//! blkdebug and quorum over them, and format nodes used as the storage of another
//! ([`DiskStorage`]).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qed_image::ops::{Disk, DiskStorage, RawDisk};
use qed_image::storage::{
    BlkdebugStorage, CacheMode, FileOptions, FileStorage, LockMode, QuorumStorage, Storage,
};
use qed_image::{has_qed_magic, BackingLayer, BackingNames, BackingPolicy, Error, OpenOptions};

use super::{bool_of, BackingSpec, FileDriver, FileNode, FormatNode, ImageSpec, Node};
use crate::error::os_text;
use crate::format::ImageFormat;

/// How an image is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// For writing.
    pub writable: bool,
    /// Without taking the image locks.
    pub unlocked: bool,
    /// The page-cache mode of its files.
    pub cache: CacheMode,
    /// Whether backing files are opened.
    pub backing: bool,
}

impl Access {
    /// Read-only, locked, through the page cache, with backing files.
    pub fn read_only() -> Self {
        Self {
            writable: false,
            unlocked: false,
            cache: CacheMode::Writeback,
            backing: true,
        }
    }

    pub(crate) fn options(&self, unlocked: bool) -> OpenOptions {
        OpenOptions {
            writable: self.writable,
            force_share: self.unlocked || unlocked,
            cache: self.cache,
            backing: if self.backing {
                BackingPolicy::Follow
            } else {
                BackingPolicy::Ignore
            },
            backing_names: Some(backing_names()),
            ..OpenOptions::default()
        }
    }
}

/// Opens the backing files a header names in QEMU's `json:{...}` syntax as image names are
/// opened (read-only, as every backing file); other names are left to the engine as paths.
/// Files named inside are taken as they are written (QEMU does not resolve them against the
/// image's directory either).
pub fn backing_names() -> BackingNames {
    BackingNames(Arc::new(|name, given, options, above| {
        name.starts_with(b"json:")
            .then(|| open_named_backing(OsStr::from_bytes(name), given, options, above))
    }))
}

thread_local! {
    /// The image files of the `json:`-named backing files being opened in this thread, outer
    /// first. Opening through nodes starts no chain of the engine's, so loops through such
    /// names are found here: each is checked against these and the engine's chain above it.
    static OPENING: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Takes its file off [`OPENING`] when the open is over.
struct Opening;

impl Drop for Opening {
    fn drop(&mut self) {
        OPENING.with(|opening| opening.borrow_mut().pop());
    }
}

/// The file whose bytes a node reads, through formats and filters (none for a quorum).
fn image_file(node: &Node) -> Option<PathBuf> {
    match node {
        Node::Format(format) => image_file(&format.file),
        Node::Blkdebug(debug) => image_file(&debug.image),
        Node::File(file) => Some(file.filename.clone()),
        Node::Quorum(_) => None,
    }
}

fn open_named_backing(
    name: &OsStr,
    given: Option<qed_image::BackingFormat>,
    options: &OpenOptions,
    above: &[PathBuf],
) -> qed_image::Result<BackingLayer> {
    let spec = ImageSpec::from_arg(name, false, given.map(ImageFormat::from))
        .map_err(Error::InvalidArgument)?;
    let file = image_file(&spec.node).map(|f| std::fs::canonicalize(&f).unwrap_or(f));
    let depth = OPENING.with(|opening| opening.borrow().len()) + above.len();
    if depth > qed_image::MAX_CHAIN_DEPTH {
        return Err(Error::Chain(format!(
            "backing chain deeper than {}",
            qed_image::MAX_CHAIN_DEPTH
        )));
    }
    if let Some(file) = &file {
        let looped = above.contains(file) || OPENING.with(|o| o.borrow().contains(file));
        if looped {
            return Err(Error::BackingLoop {
                path: PathBuf::from(name),
            });
        }
    }
    OPENING.with(|opening| {
        opening
            .borrow_mut()
            .push(file.unwrap_or_else(|| PathBuf::from(name)))
    });
    let _opening = Opening;
    let access = Access {
        writable: false,
        unlocked: options.force_share,
        cache: options.cache,
        backing: true,
    };
    if let Some((path, format)) = spec.plain() {
        // A format over a plain file is that file, as QEMU names it: opened by the engine,
        // it keeps its path (for info, map and the backing files it names in turn).
        let format = given.or(format.map(Into::into));
        let options = OpenOptions {
            backing: if spec.no_backing() {
                BackingPolicy::Ignore
            } else {
                options.backing
            },
            ..options.clone()
        };
        return BackingLayer::open(path, format, &options);
    }
    let label = spec.node.display_name();
    let (disk, _) = open_node(&spec.node, &access, &mut |_| {}).map_err(engine_error)?;
    backing_layer(disk, &label).map_err(engine_error)
}

/// An error of opening through nodes, as the engine's (for a backing file the engine asked
/// for).
fn engine_error(e: OpenError) -> Error {
    match e {
        OpenError::Engine { error, .. } => error,
        OpenError::Message(text) => Error::InvalidArgument(text),
        OpenError::Backing(inner) => engine_error(*inner),
    }
}

/// A disk as the backing layer of the image above it.
fn backing_layer(disk: Disk, label: &str) -> Result<BackingLayer, OpenError> {
    Ok(match disk {
        Disk::Qed(image) => BackingLayer::Qed(Box::new(image)),
        Disk::Raw(raw) => {
            BackingLayer::raw(raw.into_storage()).map_err(|error| OpenError::Engine {
                file: label.to_string(),
                error,
            })?
        }
        // open_node opens QED and raw disks only.
        Disk::Foreign(_) => unreachable!("a backing node opened as qcow2 or VMDK"),
    })
}

/// An open image.
#[derive(Debug)]
pub struct OpenedDisk {
    /// The disk.
    pub disk: Disk,
    /// Its format (`file` and the like for a protocol node opened alone).
    pub format: &'static str,
    /// QEMU's name of it ([`ImageSpec::display_name`]).
    pub name: String,
    /// Where its backing file names resolve ([`ImageSpec::dirname`]).
    pub dir: Option<PathBuf>,
    /// The file it was opened from, when it is a format over a plain file.
    pub path: Option<PathBuf>,
}

/// Why an image could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// QEMU's words for it, complete.
    Message(String),
    /// The engine failed on `file`.
    Engine {
        /// The file it is about.
        file: String,
        /// What failed.
        error: Error,
    },
    /// The backing file could not be opened.
    Backing(Box<OpenError>),
}

impl OpenError {
    /// The text after `Could not open 'NAME': `, engine errors worded by `engine(error,
    /// file)`.
    pub fn text(&self, engine: &dyn Fn(&Error, &str) -> String) -> String {
        match self {
            Self::Message(text) => text.clone(),
            Self::Engine { file, error } => engine(error, file),
            Self::Backing(inner) => format!("Could not open backing file: {}", inner.text(engine)),
        }
    }
}

impl From<String> for OpenError {
    fn from(text: String) -> Self {
        Self::Message(text)
    }
}

/// Opens `spec`: the engine's image for a format over a plain file (or a raw file), else the
/// tree of storages it names. `probed_raw(name)` is called when a format was probed as raw.
/// Options no node takes are refused (after the nodes under them opened, as in QEMU).
pub fn open_disk(
    spec: &ImageSpec,
    access: &Access,
    probed_raw: &mut dyn FnMut(&str),
) -> Result<OpenedDisk, OpenError> {
    let mut access = *access;
    if let Some(value) = spec.options.0.get("force-share") {
        access.unlocked |= bool_of("force-share", value)?;
    }
    if let Some(value) = spec.options.0.get("cache.direct") {
        if bool_of("cache.direct", value)? {
            access.cache = CacheMode::None;
        }
    }
    if let Some(value) = spec.options.0.get("cache.no-flush") {
        if bool_of("cache.no-flush", value)? && access.cache == CacheMode::Writeback {
            access.cache = CacheMode::Unsafe;
        }
    }
    if spec.no_backing() {
        access.backing = false;
    }
    let name = spec.display_name();
    let dir = spec.dirname();
    if let (Some((path, given)), Node::Format(top)) = (spec.plain(), &spec.node) {
        let Node::File(file) = &*top.file else {
            unreachable!("plain() is a format over a file")
        };
        let engine = |error| OpenError::Engine {
            file: path.display().to_string(),
            error,
        };
        let format = match given {
            Some(format) => format,
            None => {
                // qcow2 and VMDK are refused here: only convert and compare read them.
                let format = ImageFormat::resolve(path, None).map_err(engine)?;
                if format == ImageFormat::Raw {
                    probed_raw(&name);
                }
                format
            }
        };
        let options = access.options(locking_off(file)?);
        let disk = Disk::open(path, Some(format.into()), &options).map_err(engine)?;
        return Ok(OpenedDisk {
            disk,
            format: format.name(),
            name,
            dir,
            path: Some(path.to_path_buf()),
        });
    }
    let (disk, format) = open_node(&spec.node, &access, probed_raw)?;
    Ok(OpenedDisk {
        disk,
        format,
        name,
        dir,
        path: None,
    })
}

/// Whether a file node says `locking=off`.
fn locking_off(file: &FileNode) -> Result<bool, String> {
    match file.locking.as_deref() {
        None | Some("auto") => Ok(false),
        Some(value) => Ok(!bool_of(
            "locking",
            &serde_json::Value::String(value.into()),
        )?),
    }
}

/// Opens a node as a disk: a format node as its format, any other as raw bytes.
fn open_node(
    node: &Node,
    access: &Access,
    probed_raw: &mut dyn FnMut(&str),
) -> Result<(Disk, &'static str), OpenError> {
    match node {
        Node::Format(format) => open_format(format, access, probed_raw),
        other => {
            let storage = open_storage(other, access, probed_raw)?;
            let disk =
                RawDisk::new(storage, access.writable).map_err(|error| OpenError::Engine {
                    file: other.display_name(),
                    error,
                })?;
            Ok((Disk::Raw(disk), other.driver_name()))
        }
    }
}

/// Opens a format node over the storage of its `file` child.
fn open_format(
    node: &FormatNode,
    access: &Access,
    probed_raw: &mut dyn FnMut(&str),
) -> Result<(Disk, &'static str), OpenError> {
    let storage = open_storage(&node.file, access, probed_raw)?;
    let label = node.file.display_name();
    let engine = |error| OpenError::Engine {
        file: label.clone(),
        error,
    };
    let format = match node.driver {
        Some(format) => format,
        None => {
            let mut magic = [0u8; 4];
            storage.read_at(&mut magic, 0).map_err(|e| {
                engine(Error::Io {
                    op: "read",
                    offset: 0,
                    source: e,
                })
            })?;
            if has_qed_magic(&magic) {
                ImageFormat::Qed
            } else {
                probed_raw(&Node::Format(node.clone()).display_name());
                ImageFormat::Raw
            }
        }
    };
    let disk = match format {
        ImageFormat::Raw => Disk::Raw(RawDisk::new(storage, access.writable).map_err(engine)?),
        ImageFormat::Qed => {
            let mut failed: Option<OpenError> = None;
            let dir = node.file.dirname();
            let backing_access = Access {
                writable: false,
                ..*access
            };
            let opened = qed_image::Image::open_storage_with(
                storage,
                &access.options(false),
                label.clone(),
                |name, given| {
                    open_backing(node, dir.as_deref(), name, given, &backing_access).map_err(|e| {
                        failed = Some(e);
                        Error::Chain("backing file".into())
                    })
                },
            );
            match opened {
                Ok(image) => Disk::Qed(image),
                Err(error) => {
                    return Err(match failed {
                        Some(backing) => OpenError::Backing(Box::new(backing)),
                        None => engine(error),
                    })
                }
            }
        }
    };
    let unknown = node
        .unknown
        .clone()
        .or_else(|| match (&node.backing, access.backing) {
            // Without backing files (qemu-img info), a backing override is an option left over.
            (BackingSpec::Reference(_), false) => Some("backing".into()),
            (BackingSpec::Node(_), false) => Some("backing.driver".into()),
            _ => None,
        });
    if let Some(key) = unknown {
        let _ = disk.close();
        return Err(OpenError::Message(format!(
            "Block format '{}' does not support the option '{key}'",
            format.name()
        )));
    }
    Ok((disk, format.name()))
}

/// The backing layer of a QED image opened on storage: as the options say, or the file the
/// header names, resolved against the directory of the image's file.
fn open_backing(
    node: &FormatNode,
    dir: Option<&Path>,
    name: &[u8],
    given: Option<qed_image::BackingFormat>,
    access: &Access,
) -> Result<Option<BackingLayer>, OpenError> {
    match &node.backing {
        BackingSpec::Null => Ok(None),
        BackingSpec::Reference(r) => Err(OpenError::Message(format!(
            "Cannot find device='{r}' nor node-name='{r}'"
        ))),
        BackingSpec::Node(backing) => {
            let (disk, _) = open_node(backing, access, &mut |_| {})?;
            backing_layer(disk, &backing.display_name()).map(Some)
        }
        BackingSpec::Default if name.starts_with(b"json:") => {
            let above: Vec<PathBuf> = image_file(&Node::Format(node.clone()))
                .map(|f| std::fs::canonicalize(&f).unwrap_or(f))
                .into_iter()
                .collect();
            open_named_backing(
                OsStr::from_bytes(name),
                given,
                &access.options(false),
                &above,
            )
            .map(Some)
            .map_err(|error| OpenError::Engine {
                file: String::from_utf8_lossy(name).into_owned(),
                error,
            })
        }
        BackingSpec::Default => {
            let Some(path) = super::full_backing_name(dir, name) else {
                return Err(OpenError::Message(format!(
                    "Cannot generate a base directory for {} nodes",
                    node.file.driver_name()
                )));
            };
            BackingLayer::open(&path, given, &access.options(false))
                .map(Some)
                .map_err(|error| OpenError::Engine {
                    file: path.display().to_string(),
                    error,
                })
        }
    }
}

/// Opens a node as the storage of the node above it.
fn open_storage(
    node: &Node,
    access: &Access,
    probed_raw: &mut dyn FnMut(&str),
) -> Result<Box<dyn Storage>, OpenError> {
    let refuse = |driver: &str, key: &str| {
        OpenError::Message(format!(
            "Block protocol '{driver}' doesn't support the option '{key}'"
        ))
    };
    match node {
        Node::File(file) => {
            let storage = open_file(file, access)?;
            if let Some(key) = &file.unknown {
                return Err(refuse(file.driver.name(), key));
            }
            Ok(Box::new(storage))
        }
        Node::Blkdebug(debug) => {
            let inner = open_storage(&debug.image, access, probed_raw)?;
            let storage = BlkdebugStorage::new(inner, debug.align, debug.rules.clone())
                .map_err(|e| OpenError::Message(e.to_string()))?;
            if let Some(key) = &debug.unknown {
                return Err(refuse("blkdebug", key));
            }
            Ok(Box::new(storage))
        }
        Node::Quorum(quorum) => {
            let mut children = Vec::with_capacity(quorum.children.len());
            for child in &quorum.children {
                let storage: Box<dyn Storage> = match child {
                    Node::Format(_) => {
                        Box::new(DiskStorage::new(open_node(child, access, probed_raw)?.0))
                    }
                    other => open_storage(other, access, probed_raw)?,
                };
                children.push(storage);
            }
            let storage = QuorumStorage::new(children, quorum.threshold, quorum.pattern)
                .map_err(|e| OpenError::Message(e.to_string()))?;
            if let Some(key) = &quorum.unknown {
                return Err(OpenError::Message(format!(
                    "Block format 'quorum' does not support the option '{key}'"
                )));
            }
            Ok(Box::new(storage))
        }
        Node::Format(_) => Ok(Box::new(DiskStorage::new(
            open_node(node, access, probed_raw)?.0,
        ))),
    }
}

/// Opens a host file as its driver wants it: `file` a regular file, `host_device` and
/// `host_cdrom` a character or block device (QEMU's checks and words).
fn open_file(file: &FileNode, access: &Access) -> Result<FileStorage, OpenError> {
    let path = &file.filename;
    let shown = path.display().to_string();
    let lock = LockMode::for_access(access.writable, access.unlocked || locking_off(file)?);
    let storage = FileStorage::open(
        path,
        &FileOptions {
            writable: access.writable,
            create: false,
            cache: access.cache,
            lock,
        },
    )
    .map_err(|source| OpenError::Engine {
        file: shown.clone(),
        error: Error::Io {
            op: "open",
            offset: 0,
            source,
        },
    })?;
    let kind = storage
        .file()
        .metadata()
        .map_err(|e| OpenError::Message(format!("Could not open '{shown}': {}", os_text(&e))))?
        .file_type();
    match file.driver {
        FileDriver::File if !kind.is_file() => Err(OpenError::Message(format!(
            "'file' driver requires '{shown}' to be a regular file"
        ))),
        FileDriver::HostDevice | FileDriver::HostCdrom
            if !(kind.is_char_device() || kind.is_block_device()) =>
        {
            Err(OpenError::Message(format!(
                "'{}' driver requires '{shown}' to be either a character or block device",
                file.driver.name()
            )))
        }
        _ => Ok(storage),
    }
}

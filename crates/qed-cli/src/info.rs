//! `qed info`: what an image is, laid out as `qemu-img info` lays it out (human text or JSON,
//! same field names and order).
//!
//! Differences from QEMU, on purpose:
//! - `dirty-flag` is the NEED_CHECK bit of the header as it is on disk (QEMU's read-only open
//!   clears it in memory first, so it always says `false` for QED); the human output then
//!   says `cleanly shut down: no`.
//! - QED images get a `format-specific` object (QEMU has none for QED):
//!   `{"type": "qed", "data": {"table-size": N, "header-size": N, "features": N,
//!   "compat-features": N, "autoclear-features": N}}` — the header fields that the other
//!   fields do not already show, feature bit sets as integers. Human output prints them under
//!   `Format specific information:` as QEMU does for qcow2.

use std::fs;
use std::path::{Path, PathBuf};

use qed_image::ops::Disk;
use qed_image::storage::{CacheMode, Storage};
use qed_image::{BackingLayer, Image};
use serde::Serialize;

use crate::error::{open_error, os_text, CliError, CliResult};
use crate::format::{allocated_bytes, sector_rounded_len, ImageFormat, OutputFormat};
use crate::json::to_qemu_json;
use crate::spec::{self, open_disk, Access, ImageSpec, OpenError};
use crate::text::size_to_str;

/// Arguments of `qed info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Format of the image (probed by the QED magic when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<ImageFormat>,
    /// Show every image of the backing chain, top first.
    #[arg(long = "backing-chain")]
    pub backing_chain: bool,
    /// Open without taking the image lock (for images in use).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Output format.
    #[arg(long = "output", value_name = "FMT", value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// FILE is an option string (`driver=qed,file.filename=x.qed`), not a file name.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The image: a file name, `file:NAME`, `json:{...}` (see docs/cli.md).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// One image of the chain, with qemu-img's JSON field names, in its order.
#[derive(Debug, Serialize)]
pub struct ImageInfo {
    children: Vec<ChildNode>,
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    backing_filename_format: Option<&'static str>,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    filename: String,
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    format: &'static str,
    #[serde(rename = "actual-size")]
    actual_size: u64,
    #[serde(rename = "format-specific", skip_serializing_if = "Option::is_none")]
    format_specific: Option<QedSpecific>,
    #[serde(
        rename = "full-backing-filename",
        skip_serializing_if = "Option::is_none"
    )]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    #[serde(rename = "dirty-flag")]
    dirty_flag: bool,
}

/// A child node (the protocol layer: the file itself).
#[derive(Debug, Serialize)]
struct ChildNode {
    name: &'static str,
    info: FileNode,
}

/// The `file` protocol node under an image, as qemu-img reports it.
#[derive(Debug, Serialize)]
struct FileNode {
    children: Vec<ChildNode>,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    filename: String,
    format: &'static str,
    #[serde(rename = "actual-size")]
    actual_size: u64,
    #[serde(rename = "format-specific")]
    format_specific: FileSpecific,
    #[serde(rename = "dirty-flag")]
    dirty_flag: bool,
}

#[derive(Debug, Serialize)]
struct FileSpecific {
    #[serde(rename = "type")]
    kind: &'static str,
    data: Empty,
}

#[derive(Debug, Serialize)]
struct Empty {}

/// `format-specific` of a QED image.
#[derive(Debug, Serialize)]
struct QedSpecific {
    #[serde(rename = "type")]
    kind: &'static str,
    data: QedData,
}

/// The QED header fields no other field shows.
#[derive(Debug, Serialize)]
struct QedData {
    #[serde(rename = "table-size")]
    table_size: u32,
    #[serde(rename = "header-size")]
    header_size: u32,
    features: u64,
    #[serde(rename = "compat-features")]
    compat_features: u64,
    #[serde(rename = "autoclear-features")]
    autoclear_features: u64,
}

impl QedData {
    /// `(key, value)` pairs in order, keys as QEMU prints them in human output.
    fn human_lines(&self) -> [(&'static str, u64); 5] {
        [
            ("table size", u64::from(self.table_size)),
            ("header size", u64::from(self.header_size)),
            ("features", self.features),
            ("compat features", self.compat_features),
            ("autoclear features", self.autoclear_features),
        ]
    }
}

/// Runs `qed info`; returns the exit code.
pub fn run(args: &InfoArgs) -> CliResult<i32> {
    let spec = spec::parse_arg(args.file.as_os_str(), args.image_opts, args.format)?;
    let name = args.file.display().to_string();
    let layers = collect(args, &spec).map_err(|failure| match failure {
        Failure::Open(why) => CliError::new(format!("Could not open '{name}'"), why),
        // qemu-img walks the chain itself and says so in these words.
        Failure::Loop(path) => CliError::plain(format!(
            "Backing file '{}' creates an infinite loop.",
            path.display()
        )),
    })?;
    let text = match args.output {
        OutputFormat::Json if args.backing_chain => to_qemu_json(&layers),
        OutputFormat::Json => match layers.first() {
            Some(layer) => to_qemu_json(layer),
            None => to_qemu_json(&layers),
        },
        OutputFormat::Human => Ok(layers
            .iter()
            .map(render_human)
            .collect::<Vec<_>>()
            .join("\n")),
    }
    .map_err(|e| CliError::new("JSON output", e))?;
    print!("{text}");
    Ok(0)
}

/// Why the layers could not be described.
enum Failure {
    /// A layer could not be opened.
    Open(String),
    /// The chain names this file a second time.
    Loop(std::path::PathBuf),
}

impl From<String> for Failure {
    fn from(why: String) -> Self {
        Self::Open(why)
    }
}

/// Opens the image (and its chain if asked) and describes every layer.
fn collect(args: &InfoArgs, spec: &ImageSpec) -> Result<Vec<ImageInfo>, Failure> {
    let access = Access {
        writable: false,
        unlocked: args.force_share,
        cache: CacheMode::Writeback,
        backing: args.backing_chain,
    };
    let opened = open_disk(spec, &access, &mut |_| {}).map_err(|e| match e {
        OpenError::Engine {
            error: qed_image::Error::BackingLoop { path },
            ..
        } if args.backing_chain => Failure::Loop(path),
        e => Failure::Open(e.text(&|e, file| open_error(e, file))),
    })?;
    let name = opened.name.clone();
    let file = opened
        .path
        .clone()
        .or_else(|| spec.file_path().map(Path::to_path_buf));
    let mut layers = vec![match &opened.disk {
        Disk::Raw(raw) => raw_info(name, file.as_deref(), opened.format, raw.storage())?,
        Disk::Qed(image) => {
            let mut info = qed_info(image, name, file.as_deref())?;
            if opened.path.is_none() {
                // Opened on storage: the backing file resolves against the image's directory,
                // when it has one.
                info.full_backing_filename = image.info().backing_name.as_ref().and_then(|n| {
                    spec::full_backing_name(opened.dir.as_deref(), n)
                        .map(|p| p.display().to_string())
                });
            }
            info
        }
        // Image names open QED and raw disks only.
        Disk::Foreign(_) => unreachable!("info opened a qcow2 or VMDK disk"),
    }];
    if args.backing_chain {
        let mut above = opened.disk.image().map(Image::info);
        let mut next = opened.disk.image().and_then(Image::backing);
        while let Some(layer) = next {
            // A layer opened through a json: name has no file of its own: it is that name.
            let layer_path = layer.path().map(Path::to_path_buf);
            let layer_name = match &layer_path {
                Some(path) => path.display().to_string(),
                None => above
                    .as_ref()
                    .and_then(|info| info.backing_file.clone())
                    .unwrap_or_default(),
            };
            match &*layer {
                BackingLayer::Raw { storage, .. } => {
                    layers.push(raw_info(
                        layer_name,
                        layer_path.as_deref(),
                        "raw",
                        &**storage,
                    )?);
                    next = None;
                }
                BackingLayer::Qed(backing) => {
                    layers.push(qed_info(backing, layer_name, layer_path.as_deref())?);
                    above = Some(backing.info());
                    next = backing.backing();
                }
            }
        }
    }
    drop(opened);
    Ok(layers)
}

/// The `file` child node of an image file.
fn file_node(name: &str, path: &Path) -> Result<(FileNode, u64), String> {
    let metadata = fs::metadata(path).map_err(|e| os_text(&e))?;
    let actual_size = allocated_bytes(path).map_err(|e| os_text(&e))?;
    let node = FileNode {
        children: Vec::new(),
        virtual_size: sector_rounded_len(metadata.len()),
        filename: name.to_string(),
        format: "file",
        actual_size,
        format_specific: FileSpecific {
            kind: "file",
            data: Empty {},
        },
        dirty_flag: false,
    };
    Ok((node, actual_size))
}

/// The child nodes and disk size of a layer: its file when it has one.
fn file_children(path: Option<&Path>) -> Result<(Vec<ChildNode>, u64), String> {
    match path {
        Some(path) => {
            let (node, actual_size) = file_node(&path.display().to_string(), path)?;
            Ok((
                vec![ChildNode {
                    name: "file",
                    info: node,
                }],
                actual_size,
            ))
        }
        None => Ok((Vec::new(), 0)),
    }
}

fn raw_info(
    name: String,
    path: Option<&Path>,
    format: &'static str,
    storage: &dyn Storage,
) -> Result<ImageInfo, String> {
    let (children, actual_size) = file_children(path)?;
    let len = storage.len().map_err(|e| os_text(&e))?;
    Ok(ImageInfo {
        backing_filename_format: None,
        virtual_size: sector_rounded_len(len),
        cluster_size: None,
        format,
        actual_size,
        format_specific: None,
        full_backing_filename: None,
        backing_filename: None,
        dirty_flag: false,
        children,
        filename: name,
    })
}

fn qed_info(image: &Image, name: String, path: Option<&Path>) -> Result<ImageInfo, String> {
    let (children, actual_size) = file_children(path)?;
    let info = image.info();
    Ok(ImageInfo {
        children,
        backing_filename_format: info.backing_format.map(|f| ImageFormat::from(f).name()),
        virtual_size: info.size,
        filename: name,
        cluster_size: Some(info.cluster_size),
        format: ImageFormat::Qed.name(),
        actual_size,
        format_specific: Some(QedSpecific {
            kind: "qed",
            data: QedData {
                table_size: info.table_size,
                header_size: info.header.header_size,
                features: info.header.features,
                compat_features: info.header.compat_features,
                autoclear_features: info.header.autoclear_features,
            },
        }),
        full_backing_filename: info
            .backing_path
            .as_ref()
            .map(|p| p.display().to_string())
            .or_else(|| info.backing_file.clone()),
        backing_filename: info.backing_file.clone(),
        dirty_flag: info.dirty,
    })
}

/// One layer as `qemu-img info` prints it for people.
fn render_human(info: &ImageInfo) -> String {
    let mut out = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        info.filename,
        info.format,
        size_to_str(info.virtual_size),
        info.virtual_size,
        size_to_str(info.actual_size)
    );
    if let Some(cluster_size) = info.cluster_size {
        out.push_str(&format!("cluster_size: {cluster_size}\n"));
    }
    if info.dirty_flag {
        out.push_str("cleanly shut down: no\n");
    }
    if let Some(backing) = &info.backing_filename {
        out.push_str(&format!("backing file: {backing}"));
        match &info.full_backing_filename {
            None => out.push_str(" (cannot determine actual path)"),
            Some(full) if full != backing => {
                out.push_str(&format!(" (actual path: {full})"));
            }
            Some(_) => {}
        }
        out.push('\n');
        if let Some(format) = info.backing_filename_format {
            out.push_str(&format!("backing file format: {format}\n"));
        }
    }
    if let Some(specific) = &info.format_specific {
        out.push_str("Format specific information:\n");
        for (key, value) in specific.data.human_lines() {
            out.push_str(&format!("    {key}: {value}\n"));
        }
    }
    for child in &info.children {
        let node = &child.info;
        out.push_str(&format!(
            "Child node '/{}':\n    filename: {}\n    protocol type: {}\n    file length: {} ({} bytes)\n    disk size: {}\n",
            child.name,
            node.filename,
            node.format,
            size_to_str(node.virtual_size),
            node.virtual_size,
            size_to_str(node.actual_size)
        ));
    }
    out
}

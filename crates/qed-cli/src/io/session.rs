//! Opening, closing and reopening the image of `qed io`, with qemu-io's checks and QEMU's
//! words for what went wrong (`Could not open 'x': No such file or directory`).

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;

use super::console::Console;
use super::disk::Disk;
use super::flags::OpenFlags;
use super::target::Target;
use crate::error::open_error;
use crate::format::ImageFormat;
use crate::snapshot::Overlay;
use crate::spec::{open_disk, Access, ImageSpec, Options};

/// The open image.
#[derive(Debug)]
pub struct Session {
    disk: Arc<Disk>,
    flags: OpenFlags,
    /// The file the disk was opened from (the overlay with `-s`).
    path: PathBuf,
    format: ImageFormat,
    /// With `-s`: the overlay, removed once the disk is closed.
    overlay: Option<Overlay>,
    /// The image name, when it is more than a file: reopened from it.
    tree: Option<ImageSpec>,
}

/// What to open: a file name and flags, and options (`-o`, `--image-opts`).
#[derive(Debug, Clone, Default)]
pub struct OpenRequest {
    /// The file as given (None: the options name it).
    pub name: Option<String>,
    /// The format (`-f` or `driver=`); probed when None.
    pub format: Option<String>,
    /// The flags.
    pub flags: OpenFlags,
    /// `key=value` options.
    pub options: Vec<(String, String)>,
}

/// Parses a QEMU option string (`driver=qed,file.filename=a,,b`) as the image names' parser
/// does, printing its warnings (a bare `key` is `key=on`, deprecated).
pub fn parse_options(text: &str, con: &mut Console<'_>) -> Vec<(String, String)> {
    let (pairs, warnings) = crate::spec::parse_option_string(text, None);
    for warning in &warnings {
        con.error(warning);
    }
    pairs
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// The flags the top node's options set, applied to `request` (the image name's parser
/// refuses the options no node takes).
fn apply_options(request: &mut OpenRequest) -> Result<(), String> {
    let options = std::mem::take(&mut request.options);
    for (key, value) in &options {
        let flags = &mut request.flags;
        let refused = match key.as_str() {
            "read-only" => (parse_bool(key, value)? && !flags.read_only)
                .then(|| "Block node is read-only".to_string()),
            "force-share" => {
                flags.force_share = parse_bool(key, value)?;
                None
            }
            "cache.direct" => {
                flags.nocache = parse_bool(key, value)?;
                None
            }
            "cache.no-flush" => {
                flags.no_flush = parse_bool(key, value)?;
                None
            }
            "copy-on-read" => {
                flags.copy_on_read = parse_bool(key, value)?;
                None
            }
            "discard" | "file.discard" => {
                (!flags.set_discard(value)).then(|| format!("Invalid discard option: {value}"))
            }
            "file.aio" => (!flags.set_aio(value)).then(|| format!("Invalid aio option: {value}")),
            "file.locking" => {
                flags.no_lock = value == "off";
                None
            }
            "backing" if value.is_empty() || value == "null" => {
                flags.no_backing = true;
                None
            }
            _ => None,
        };
        if let Some(why) = refused {
            return Err(why);
        }
    }
    Ok(())
}

/// Opens an image name that is more than a file, with `flags`.
fn open_target(
    spec: &ImageSpec,
    flags: &OpenFlags,
    con: &mut Console<'_>,
) -> Result<Target, String> {
    let access = Access {
        writable: !flags.read_only,
        unlocked: flags.unlocked(),
        cache: flags.cache_mode(),
        backing: !flags.no_backing,
    };
    let opened = open_disk(spec, &access, &mut |name| con.err(&probe_warning(name)))
        .map_err(|e| e.text(&|e, file| open_error(e, file)))?;
    Ok(Target::from_disk(opened.disk))
}

/// QEMU's warning when a raw format was guessed.
fn probe_warning(name: &str) -> String {
    format!(
        "WARNING: Image format was not specified for '{name}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on \
         block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the \
         restrictions.\n"
    )
}

impl Session {
    /// Opens what `request` names; the error is QEMU's text after `can't open device X: `.
    pub fn open(mut request: OpenRequest, con: &mut Console<'_>) -> Result<Self, String> {
        if request.name.as_deref().is_none_or(str::is_empty) && request.options.is_empty() {
            return Err("The 'file' block driver requires a file name".into());
        }
        let spec = ImageSpec::parse(
            request.name.as_deref().map(OsStr::new),
            Options::from_pairs(std::mem::take(&mut request.options)),
            request.format.as_deref(),
        )?;
        for warning in &spec.warnings {
            con.error(warning);
        }
        // The flags of the top node's options, those of a `json:` name included.
        request.options = spec.options.pairs();
        apply_options(&mut request)?;
        let flags = request.flags;
        if flags.force_share && !flags.read_only {
            return Err("force-share=on can only be used with read-only images".into());
        }
        if flags.native_aio && !flags.nocache {
            return Err(
                "aio=native was specified, but it requires cache.direct=on, which was not specified."
                    .into(),
            );
        }
        if flags.copy_on_read && flags.read_only {
            return Err("Can't use copy-on-read on read-only device".into());
        }
        let Some((path, given)) = spec.plain() else {
            return Self::open_tree(spec, flags, con);
        };
        let name = spec.display_name();
        let format = match given {
            Some(format) => format,
            None => {
                let format = ImageFormat::resolve(path, None).map_err(|e| open_error(&e, &name))?;
                if format == ImageFormat::Raw {
                    con.err(&probe_warning(&name));
                }
                format
            }
        };
        let (overlay, opened, opened_format) = if flags.snapshot {
            // The file must open as an image before an overlay is put on it, as in QEMU.
            Target::open(
                path,
                format,
                &OpenFlags {
                    read_only: true,
                    ..flags
                },
            )
            .and_then(Target::close)
            .map_err(|e| open_error(&e, &name))?;
            let overlay = Overlay::create(path, format).map_err(|e| open_error(&e, &name))?;
            let opened = overlay.path().to_path_buf();
            (Some(overlay), opened, ImageFormat::Qed)
        } else {
            (None, path.to_path_buf(), format)
        };
        let target =
            Target::open(&opened, opened_format, &flags).map_err(|e| open_error(&e, &name))?;
        Ok(Self {
            disk: Arc::new(Disk::new(target, &flags)),
            flags,
            path: opened,
            format: opened_format,
            overlay,
            tree: None,
        })
    }

    /// Opens an image whose name is more than a file (blkdebug, quorum, a format over a
    /// format, a protocol node alone).
    fn open_tree(spec: ImageSpec, flags: OpenFlags, con: &mut Console<'_>) -> Result<Self, String> {
        if flags.snapshot {
            return Err(format!(
                "snapshot mode is supported for image files only, not for {}",
                spec.display_name()
            ));
        }
        let target = open_target(&spec, &flags, con)?;
        let format = target.format();
        Ok(Self {
            disk: Arc::new(Disk::new(target, &flags)),
            flags,
            path: PathBuf::from(spec.display_name()),
            format,
            overlay: None,
            tree: Some(spec),
        })
    }

    /// The disk, for commands and requests in flight.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// The flags it was opened with.
    pub fn flags(&self) -> &OpenFlags {
        &self.flags
    }

    /// Closes the image (requests in flight must have completed), then removes the overlay.
    pub fn close(self) -> qed_image::Result<()> {
        let Self { disk, overlay, .. } = self;
        let result = match Arc::try_unwrap(disk) {
            Ok(disk) => disk.close(),
            // Not reached once the requests have completed; the last holder closes it.
            Err(shared) => shared.flush(),
        };
        drop(overlay);
        result
    }

    /// Closes the image and opens the same file again with `flags`. When that fails the old
    /// flags are tried again; the error is returned either way, with the session if one could
    /// be had.
    pub fn reopen(self, flags: OpenFlags) -> (Option<Self>, Result<(), String>) {
        let Self {
            disk,
            flags: old,
            path,
            format,
            overlay,
            tree,
        } = self;
        let name = path.display().to_string();
        let closed = match Arc::try_unwrap(disk) {
            Ok(disk) => disk.close(),
            Err(shared) => shared.flush(),
        };
        if let Err(e) = closed {
            return (None, Err(format!("Could not close '{name}': {e}")));
        }
        let open = |flags: &OpenFlags| match &tree {
            Some(spec) => {
                let (mut out, mut err) = (Vec::new(), Vec::new());
                open_target(spec, flags, &mut Console::new(&mut out, &mut err))
            }
            None => Target::open(&path, format, flags).map_err(|e| open_error(&e, &name)),
        };
        match open(&flags) {
            Ok(target) => (
                Some(Self {
                    disk: Arc::new(Disk::new(target, &flags)),
                    flags,
                    path: path.clone(),
                    format,
                    overlay,
                    tree,
                }),
                Ok(()),
            ),
            Err(why) => {
                let back = open(&old).ok().map(|target| Self {
                    disk: Arc::new(Disk::new(target, &old)),
                    flags: old,
                    path: path.clone(),
                    format,
                    overlay,
                    tree: tree.clone(),
                });
                (back, Err(why))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(text: &str) -> (Vec<(String, String)>, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let pairs = {
            let mut con = Console::new(&mut out, &mut err);
            parse_options(text, &mut con)
        };
        (pairs, String::from_utf8(err).unwrap())
    }

    #[test]
    fn option_strings_as_qemu() {
        let (p, _) = options("driver=qed,file.filename=a,,b");
        assert_eq!(
            p,
            vec![
                ("driver".into(), "qed".into()),
                ("file.filename".into(), "a,b".into())
            ]
        );
        let (p, err) = options("x");
        assert_eq!(p, vec![("x".into(), "on".into())]);
        assert!(err.contains("short-form boolean option 'x' deprecated\nPlease use x=on instead"));
    }
}

//! Temporary snapshots (`-s` of `qed serve` and `qed io`): a QED overlay in the temporary
//! directory whose backing file is the image, so that writes never reach the image. The
//! overlay file is removed when the [`Overlay`] is dropped.

use std::path::{Path, PathBuf};

use qed_image::{CreateParams, Error, Image, OpenOptions};

use crate::format::{sector_rounded_len, ImageFormat};

/// A temporary overlay file, removed on drop.
#[derive(Debug)]
pub struct Overlay {
    path: PathBuf,
}

impl Overlay {
    /// Creates an overlay in the temporary directory on `base` (of `format`), of its size.
    /// Errors are the engine's: the base could not be opened (an [`Error::Io`] with op
    /// `"open"` when the file itself is missing or unreadable), or the overlay not written.
    pub fn create(base: &Path, format: ImageFormat) -> Result<Self, Error> {
        let absolute = std::fs::canonicalize(base).map_err(|source| Error::Io {
            op: "open",
            offset: 0,
            source,
        })?;
        let name = absolute
            .to_str()
            .ok_or_else(|| Error::InvalidArgument("the image path is not UTF-8".into()))?
            .to_string();
        let size = match format {
            ImageFormat::Qed => Image::open(&absolute, &OpenOptions::read_only())?.size(),
            ImageFormat::Raw => sector_rounded_len(
                std::fs::metadata(&absolute)
                    .map_err(|source| Error::Io {
                        op: "open",
                        offset: 0,
                        source,
                    })?
                    .len(),
            ),
        };
        let path = std::env::temp_dir().join(format!(
            "qed-snapshot-{}-{}.qed",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let overlay = Self { path };
        Image::create(
            &overlay.path,
            &CreateParams {
                image_size: size,
                cluster_size: 65536,
                table_size: 4,
                backing_file: Some(name),
                backing_raw: format == ImageFormat::Raw,
            },
        )?;
        Ok(overlay)
    }

    /// The overlay file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

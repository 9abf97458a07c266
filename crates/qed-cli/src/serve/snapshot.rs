//! `qed serve -s`: a temporary QED overlay whose backing file is the image, so that the
//! clients' writes never reach the image. The overlay is removed when the server stops.

use std::path::{Path, PathBuf};

use qed_image::{CreateParams, Image, OpenOptions};

use crate::error::{open_failure, CliError, CliResult};
use crate::format::{sector_rounded_len, ImageFormat};

/// A temporary overlay file, removed on drop.
#[derive(Debug)]
pub struct Overlay {
    path: PathBuf,
}

impl Overlay {
    /// Creates an overlay in the temporary directory on `base` (of `format`), of its size.
    pub fn create(base: &Path, format: ImageFormat) -> CliResult<Self> {
        let what = || format!("snapshot of '{}'", base.display());
        let absolute = std::fs::canonicalize(base).map_err(|e| CliError::new(what(), e))?;
        let name = absolute
            .to_str()
            .ok_or_else(|| CliError::new(what(), "the image path is not UTF-8"))?
            .to_string();
        let size = match format {
            ImageFormat::Qed => Image::open(&absolute, &OpenOptions::read_only())
                .map_err(|e| CliError::new(what(), open_failure(&e)))?
                .size(),
            ImageFormat::Raw => sector_rounded_len(
                std::fs::metadata(&absolute)
                    .map_err(|e| CliError::new(what(), e))?
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
        )
        .map_err(|e| CliError::new(what(), open_failure(&e)))?;
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

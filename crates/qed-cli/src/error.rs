//! The one error type of the command line: what failed, and why.

use std::fmt;
use std::io;

use qed_image::format::FormatError;
use qed_image::Error;

/// A failed command, printed as `qed: <what failed>: <why>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    what: String,
    why: String,
}

impl CliError {
    /// An error about `what` (a file, an option, an operation) because of `why`.
    pub fn new(what: impl Into<String>, why: impl fmt::Display) -> Self {
        Self {
            what: what.into(),
            why: why.to_string(),
        }
    }

    /// An error with no subject: printed as `qed: <why>`.
    pub fn plain(why: impl fmt::Display) -> Self {
        Self::new(String::new(), why)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.what.is_empty() {
            f.write_str(&self.why)
        } else {
            write!(f, "{}: {}", self.what, self.why)
        }
    }
}

impl std::error::Error for CliError {}

/// Result of the command-line layer.
pub type CliResult<T> = Result<T, CliError>;

/// The text of an OS error without Rust's ` (os error N)` tail, as `strerror` prints it.
pub fn os_text(e: &io::Error) -> String {
    let text = e.to_string();
    match (e.raw_os_error(), text.rfind(" (os error ")) {
        (Some(_), Some(pos)) => text[..pos].to_string(),
        _ => text,
    }
}

/// Why an image could not be opened, concise: OS errors read like `strerror`, engine errors
/// keep their own wording.
pub fn open_failure(e: &Error) -> String {
    match e {
        Error::Io { source, .. } => os_text(source),
        Error::Backing { path, cause, .. } => {
            format!("backing file '{}': {}", path.display(), open_failure(cause))
        }
        other => other.to_string(),
    }
}

/// Why an open failed, in QEMU's words; `name` is the file the error is about.
pub fn open_error(e: &Error, name: &str) -> String {
    match e {
        Error::Io { source, .. } => {
            let text = os_text(source);
            match text.find("Failed to ") {
                Some(at) if source.kind() == std::io::ErrorKind::WouldBlock => {
                    let what = &text[at..];
                    let what = what.split(": the image is locked").next().unwrap_or(what);
                    format!("{what}\nIs another process using the image [{name}]?")
                }
                _ => format!("Could not open '{name}': {text}"),
            }
        }
        Error::Format(f) => match f {
            FormatError::BadMagic { .. } | FormatError::HeaderTruncated { .. } => {
                "Image not in QED format".into()
            }
            FormatError::UnknownFeatures { bits } => format!("Unsupported QED features: {bits:x}"),
            FormatError::ClusterSize { .. } => "QED cluster size is invalid".into(),
            FormatError::TableSize { .. } => "QED table size is invalid".into(),
            FormatError::ImageSizeUnaligned { .. } | FormatError::ImageSizeTooLarge { .. } => {
                "QED image size is invalid".into()
            }
            // QEMU does not check header_size itself: the L1 table offset it then finds
            // inside (or past) the header is what it refuses.
            FormatError::TableOffset { .. } | FormatError::HeaderSizeTooLarge { .. } => {
                "QED table offset is invalid".into()
            }
            other => other.to_string(),
        },
        Error::Backing { path, depth, cause } => match cause.as_ref() {
            // Each layer wraps the error of the one below; the innermost knows its depth.
            inner @ Error::Backing { .. } => open_error(inner, name),
            cause => format!(
                "{}{}",
                "Could not open backing file: ".repeat((*depth).max(1)),
                open_error(cause, &path.display().to_string())
            ),
        },
        other => other.to_string(),
    }
}

/// The `strerror` text QEMU would print for an engine error (`read failed: <this>`).
pub fn errno_text(e: &Error) -> String {
    match e {
        Error::Io { source, .. } => {
            if source.raw_os_error().is_some() {
                os_text(source)
            } else {
                "Input/output error".to_string()
            }
        }
        Error::Backing { cause, .. } => errno_text(cause),
        Error::OutOfRange { .. } | Error::Poisoned => "Input/output error".to_string(),
        Error::ReadOnly => "Permission denied".to_string(),
        Error::Unsupported(_) => "Operation not supported".to_string(),
        Error::TooLarge { .. } => "Cannot allocate memory".to_string(),
        _ => "Invalid argument".to_string(),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn open_errors_in_qemu_words() {
        let missing = Error::Io {
            op: "open",
            offset: 0,
            source: std::io::Error::from_raw_os_error(2),
        };
        assert_eq!(
            open_error(&missing, "x"),
            "Could not open 'x': No such file or directory"
        );
        let backing = Error::Backing {
            path: "b.qed".into(),
            depth: 1,
            cause: Box::new(missing),
        };
        assert_eq!(
            open_error(&backing, "top.qed"),
            "Could not open backing file: Could not open 'b.qed': No such file or directory"
        );
        let features = Error::Format(FormatError::UnknownFeatures { bits: 8 });
        assert_eq!(open_error(&features, "x"), "Unsupported QED features: 8");
    }

    use super::*;

    #[test]
    fn display_forms() {
        assert_eq!(CliError::new("x.qed", "bad").to_string(), "x.qed: bad");
        assert_eq!(CliError::plain("bad").to_string(), "bad");
    }

    #[test]
    fn os_text_strips_code() {
        let e = io::Error::from_raw_os_error(2);
        assert_eq!(os_text(&e), "No such file or directory");
        assert_eq!(os_text(&io::Error::other("custom")), "custom");
    }

    #[test]
    fn errno_texts() {
        let e = Error::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(errno_text(&e), "Input/output error");
        assert_eq!(errno_text(&Error::ReadOnly), "Permission denied");
    }
}
